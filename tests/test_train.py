"""gpuconv.optim.SGD against hand-computed updates, and gpuconv-train: training works, is
reproducible from a seed, saves loadable parameters, and fails cleanly without CUDA."""
import contextlib
import io
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuconv import data as D
from gpuconv import nn, train as T
from gpuconv.device import cuda_unavailable_reason
from gpuconv.optim import SGD

from .test_data import write_fake_mnist


# ---------------------------------------------------------------------------------------------
# SGD
# ---------------------------------------------------------------------------------------------
def test_sgd_momentum_and_weight_decay_by_hand():
    p = nn.Parameter(np.array([1.0, -2.0]), grad=np.array([0.5, 0.1]))
    opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    opt.step()
    # g = grad + 0.01 w = [0.51, 0.08]; first step b = g; w = w - 0.1 b
    np.testing.assert_allclose(p.data, [0.949, -2.008], rtol=1e-14)
    np.testing.assert_allclose(p.grad, [0.5, 0.1])  # step leaves the gradient alone
    p.grad[...] = [0.2, -0.3]
    opt.step()
    # g = [0.2 + 0.00949, -0.3 - 0.02008] = [0.20949, -0.32008]
    # b = 0.9 [0.51, 0.08] + g = [0.66849, -0.24808]; w = [0.949 - 0.066849, -2.008 + 0.024808]
    np.testing.assert_allclose(p.data, [0.882151, -1.983192], rtol=1e-14)


def test_sgd_plain_step_zero_grad_and_dtype():
    p = nn.Parameter(np.array([[1.0, 2.0]], np.float32), grad=np.array([[4.0, -8.0]], np.float32))
    data_before = p.data
    opt = SGD([p], lr=0.25)
    opt.step()
    np.testing.assert_array_equal(p.data, [[0.0, 4.0]])
    assert p.data is data_before and p.data.dtype == np.float32  # updated in place
    opt.zero_grad()
    assert not p.grad.any()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(lr=0), ValueError, "lr must be > 0"),
    (dict(lr=-0.1), ValueError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=0.1, momentum=-0.5), ValueError, "momentum"),
    (dict(lr=0.1, weight_decay=float("inf")), TypeError, "weight_decay"),
])
def test_sgd_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SGD([nn.Parameter(np.zeros(1))], **kwargs)


def test_sgd_rejects_bad_params():
    with pytest.raises(ValueError, match="params is empty"):
        SGD([], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\] is a ndarray"):
        SGD([np.zeros(2)], lr=0.1)


def test_sgd_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(6)
    grads = rng.standard_normal((4, 6))
    ours = nn.Parameter(w0.copy())
    opt = SGD([ours], lr=0.05, momentum=0.8, weight_decay=0.1)
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = torch.optim.SGD([theirs], lr=0.05, momentum=0.8, weight_decay=0.1)
    for g in grads:
        ours.grad[...] = g
        opt.step()
        theirs.grad = torch.from_numpy(g.copy())
        topt.step()
    np.testing.assert_allclose(ours.data, theirs.detach().numpy(), rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def stripes(n, seed, size=8):
    """A two-class toy set needing no download: a bright horizontal bar in the top half
    (class 0) or the bottom half (class 1), at a random row, in noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(0, 0.3, (n, 1, size, size))
    rows = rng.integers(0, size // 2, n) + y * (size // 2)
    x[np.arange(n), 0, rows, :] += 1.0
    return x.astype(np.float32), y.astype(np.int64)


def stripes_split(n_train=256, n_test=64):
    return D.Split(*stripes(n_train, 1), *stripes(n_test, 2), classes=2, name="stripes")


def run(split, **kwargs):
    kwargs.setdefault("quiet", True)
    return T.train(split, **kwargs)


def test_training_loss_falls_and_learns():
    model, hist = run(stripes_split(), epochs=3, batch_size=16, lr=0.05)
    assert len(hist) == 3
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert hist[-1]["test_acc"] >= 0.9
    assert all(p.data.dtype == np.float32 for p in model.parameters())


def test_same_seed_same_losses_other_seed_other_losses():
    split = stripes_split()
    losses = lambda seed: [h["loss"] for h in run(split, epochs=2, seed=seed)[1]]  # noqa: E731
    first = losses(7)
    assert losses(7) == first  # bit for bit
    assert losses(8) != first


@pytest.mark.parametrize("activation", sorted(T.ACTIVATIONS))
def test_every_activation_trains_in_float64(activation):
    model, hist = run(stripes_split(), epochs=2, activation=activation, dtype=np.float64,
                      lr=0.05)
    assert all(p.data.dtype == np.float64 for p in model.parameters())
    assert all(math.isfinite(h["loss"]) for h in hist)
    assert isinstance(model[1], T.ACTIVATIONS[activation])


def test_epoch_lines_and_progress_bar():
    out, bar_stream = io.StringIO(), io.StringIO()  # StringIO is not a TTY: no bar
    T.train(stripes_split(), epochs=2, out=out, progress_stream=bar_stream)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("epoch   2/2  loss ")
    assert "test acc" in lines[0] and bar_stream.getvalue() == ""

    class TTY(io.StringIO):
        def isatty(self):
            return True

    tty = TTY()
    bar = T.ProgressBar(4, "epoch 1/1", tty)
    for i in range(1, 5):
        bar.update(i, "loss 0.5")
    bar.close()
    text = tty.getvalue()
    assert text.startswith("\repoch 1/1 [") and "4/4 loss 0.5" in text
    assert "#" * 30 in text and "\n" not in text


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def test_cli_on_digits_saves_a_loadable_model(tmp_path, capsys):
    pytest.importorskip("sklearn")
    path = tmp_path / "lenet.npz"
    assert T.main(["--epochs", "2", "--quiet", "--save", str(path), "--seed", "3"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("test accuracy ") and str(path) in out[0]
    reported = float(out[0].split()[2].rstrip("%")) / 100
    assert reported > 0.8  # two epochs already classify most digits
    split = D.standardize(D.load_digits())
    model = nn.load(T.build_lenet((1, 8, 8), 10), path)
    assert math.isclose(T.accuracy(model, split.x_test, split.y_test, "cpu"), reported,
                        abs_tol=0.00005)


def test_cli_on_mnist_idx_files(tmp_path, capsys):
    write_fake_mnist(tmp_path, n_train=20, n_test=6, size=12)
    assert T.main(["--mnist", str(tmp_path), "--epochs", "1", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "20 training and 6 test images of 12x12, 10 classes" in out
    assert "epoch   1/1" in out and "(" in out.splitlines()[-1]


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert T.main(["--mnist", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpuconv-train: error: ") and "train-images-idx3-ubyte" in err
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert T.main(["--quiet"]) == 1
    assert "pip install gpuconv[digits]" in capsys.readouterr().err


def bad_option_cases(tmp_path):
    not_ckpt = tmp_path / "not-a-checkpoint.npz"
    np.savez(not_ckpt, a=np.zeros(2))
    cases = [
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--lr", "inf"], "--lr must be a finite number > 0"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--lr", "abc"], "invalid float value"),
        (["--momentum", "-0.5"], "--momentum must be a finite number >= 0"),
        (["--weight-decay", "nan"], "--weight-decay must be"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch-size", "-3"], "--batch-size must be >= 1"),
        (["--width", "0"], "--width must be >= 1"),
        (["--device", "tpu"], "'cpu', 'cuda' or 'cuda:N'"),
        (["--activation", "swish"], "invalid choice"),
        (["--model", "vgg"], "invalid choice"),
        (["--optim", "lbfgs"], "invalid choice"),
        (["--model", "resnet18", "--activation", "tanh"], "applies to --model lenet5 only"),
        (["--save", str(tmp_path / "no" / "such" / "dir.npz")], "does not exist"),
        (["--save", str(tmp_path)], "is a directory"),
        (["--checkpoint", str(tmp_path / "missing" / "c.npz")], "does not exist"),
        (["--resume", str(tmp_path / "missing.npz")], "--resume"),
        (["--resume", str(not_ckpt)], "not a gpuconv-train checkpoint"),
        (["--mnist", str(tmp_path / "nowhere")], "not a directory"),
        (["--viz", str(not_ckpt)], "--viz"),
    ]
    if os.path.isdir("/proc/self"):  # writable by permission bits for root, yet not really
        cases.append((["--save", "/proc/self/gpuconv.npz"], "is not writable"))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        cases.append((["--save", str(locked / "m.npz")], "is not writable"))
    return cases


def test_cli_bad_option_values_exit_2_with_one_line_before_training(tmp_path, capsys):
    for argv, message in bad_option_cases(tmp_path):
        with pytest.raises(SystemExit) as e:
            T.main(argv + ["--epochs", "1"] if "--epochs" not in argv else argv)
        out, err = capsys.readouterr()
        assert e.value.code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpuconv-train: error: "), (argv, err)
        assert message in lines[0], (argv, lines[0])
        assert out == "" and "Traceback" not in err  # nothing loaded, nothing trained


def test_cli_bad_values_in_a_subprocess_give_no_traceback(tmp_path):
    proc = run_cli(["--lr", "nan", "--save", str(tmp_path / "x.npz")])
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# models, optimisers, checkpoints and --resume
# ---------------------------------------------------------------------------------------------
def test_default_lenet_on_digits_reaches_98_percent():
    pytest.importorskip("sklearn")
    split = D.standardize(D.load_digits())
    _, hist = T.train(split, quiet=True)  # every default: 30 epochs, SGD, cosine
    assert hist[-1]["test_acc"] >= 0.98


@contextlib.contextmanager
def interrupted_after(monkeypatch, stop_epoch):
    """Training inside stops with KeyboardInterrupt (as if Ctrl-C'd) right after the
    checkpoint of `stop_epoch` is written."""
    real_save = T.save_checkpoint

    def save_then_stop(path, model, opt, sched, epoch, *rest):
        real_save(path, model, opt, sched, epoch, *rest)
        if epoch == stop_epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        yield
    monkeypatch.setattr(T, "save_checkpoint", real_save)


@pytest.mark.parametrize("kwargs", [dict(model="lenet5", optim="sgd"),
                                    dict(model="resnet18", optim="adam", width=2),
                                    dict(model="lenet5", optim="adam", schedule="constant")])
def test_resume_continues_exactly_where_it_stopped(tmp_path, monkeypatch, kwargs):
    split = stripes_split(96, 32)
    model_a, hist_a = run(split, epochs=3, batch_size=16, **kwargs)
    path = tmp_path / "run.ckpt"
    with interrupted_after(monkeypatch, 2):
        run(split, epochs=3, batch_size=16, checkpoint=str(path), **kwargs)
    ckpt = T.load_checkpoint(str(path))
    assert ckpt["epoch"] == 2 and len(ckpt["history"]) == 2
    model_b, hist_b = run(split, epochs=3, batch_size=16, resume=ckpt, **kwargs)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(hist_b) == strip(hist_a)  # bit for bit
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)
    with pytest.raises(ValueError, match="other settings"):
        run(split, epochs=4, batch_size=16, resume=ckpt, **kwargs)


def test_cli_resume_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    d = write_dir(tmp_path)
    common = ["--mnist", str(d), "--epochs", "3", "--batch-size", "8", "--quiet"]
    assert T.main(common) == 0
    straight = capsys.readouterr().out.strip().split(" after ")[0]
    ckpt = tmp_path / "c.npz"
    with interrupted_after(monkeypatch, 1):
        T.main(common + ["--checkpoint", str(ckpt)])
    capsys.readouterr()
    assert T.main(["--resume", str(ckpt)]) == 0  # the checkpoint's settings, data included
    out = capsys.readouterr().out
    assert "resuming after epoch 1" in out and "epoch   2/3" in out and "epoch   1/3" not in out
    assert out.strip().splitlines()[-1].split(" after ")[0] == straight


def test_cli_resnet18_with_adam(tmp_path, capsys):
    d = write_dir(tmp_path)
    assert T.main(["--mnist", str(d), "--model", "resnet18", "--width", "2", "--optim", "adam",
                   "--epochs", "1", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "resnet18, adam" in out and "test accuracy" in out


def write_dir(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    write_fake_mnist(d)
    return d


def run_cli(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "gpuconv.train", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def check_cuda_failure(proc, reason):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("gpuconv-train: error: device 'cuda") and reason in lines[0]
    assert proc.stdout == ""  # it stops before loading data or training


def test_cli_device_cuda_without_cupy(tmp_path):
    # a `cupy` that cannot be imported, first on the path: the same outcome on every machine
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: CuPy missing')\n")
    pythonpath = os.pathsep.join([str(tmp_path / "fake"), os.getcwd(),
                                  os.environ.get("PYTHONPATH", "")])
    proc = run_cli(["--device", "cuda", "--epochs", "1"], {"PYTHONPATH": pythonpath})
    check_cuda_failure(proc, "CuPy is not installed (ImportError: simulated: CuPy missing)")


def test_cli_device_cuda_on_this_machine():
    reason = cuda_unavailable_reason(0)
    if reason is None:
        pytest.skip("this machine has a usable GPU; the failure path is covered with a fake")
    proc = run_cli(["--device", "cuda:0", "--epochs", "1"])
    check_cuda_failure(proc, reason.split(" (")[0])


@pytest.mark.gpu
def test_training_on_gpu_matches_cpu(cp):
    split = stripes_split()
    split64 = D.Split(split.x_train.astype(np.float64), split.y_train,
                      split.x_test.astype(np.float64), split.y_test, 2)
    _, cpu = run(split64, epochs=2, dtype=np.float64, seed=1)
    model, gpu = run(split64, epochs=2, dtype=np.float64, seed=1, device="cuda")
    assert isinstance(model[0].weight.data, cp.ndarray)
    for c, g in zip(cpu, gpu):
        assert math.isclose(c["loss"], g["loss"], rel_tol=1e-8)
        assert c["test_acc"] == g["test_acc"]
