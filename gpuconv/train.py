"""``gpuconv-train``: trains a ConvNet on handwritten digits with gpuconv's layers.

The default network, ``--model lenet5`` (:func:`gpuconv.models.lenet5`; for an H x W input,
k = 3 on images up to 16 pixels, else 5; 'same' padding)::

    conv(1 -> 16, k) -> act -> maxpool 2 -> conv(16 -> 32, k) -> act -> maxpool 2
        -> flatten -> linear(32 * H/4 * W/4 -> 64) -> act -> linear(64 -> classes)

or ``--model resnet18`` (:func:`gpuconv.models.resnet18`, the small-image stem for images up to
32 pixels). Trained with SGD + momentum (or ``--optim adam``) on softmax cross-entropy, the
learning rate decaying along a cosine to lr/100. The default data set is scikit-learn's 8x8
digits with a fixed 20% test split; ``--mnist DIR`` reads MNIST IDX files instead. Per epoch it
prints loss and accuracies; the last line gives the test accuracy and the wall time. Same
``--seed`` => same initial weights, same batch order, same losses. ``--checkpoint PATH`` writes
the model, optimiser, schedule, batch-order state and history after every epoch, and
``--resume PATH`` continues such a run exactly where it stopped (with the settings it was
started with). ``--viz DIR`` writes PNGs of what the network learned (needs matplotlib).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from . import data as D
from . import models, nn
from .device import parse_device, require_cuda, to_device
from .models import ACTIVATIONS
from .optim import SGD, Adam
from .optim.lr_scheduler import CosineAnnealingLR

MODELS = ("lenet5", "resnet18")
OPTIMISERS = {"sgd": 0.05, "adam": 1e-3}  # name -> default learning rate


def build_lenet(image_shape, classes, activation="relu", dtype=np.float32, rng=None,
                channels=(16, 32), hidden=64):
    """The LeNet-style network above for images of `image_shape` (C, H, W)."""
    c, h, w = image_shape
    return models.lenet5(classes, c, (h, w), activation, channels, hidden, dtype, rng)


def build_model(name, image_shape, classes, activation="relu", dtype=np.float32, rng=None,
                width=64):
    """``--model``: "lenet5" (the default above) or "resnet18" (ReLU; `width` base channels)."""
    if name == "lenet5":
        return build_lenet(image_shape, classes, activation, dtype, rng)
    if name == "resnet18":
        c, h, w = image_shape
        return models.resnet18(classes, c, small_input=max(h, w) <= 32, width=width,
                               dtype=dtype, rng=rng)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


class ProgressBar:
    """A one-line progress bar on `stream` (stderr), redrawn in place with '\\r'.

    Where the stream is not a terminal (a log file, a pipe, CI) it draws nothing: carriage
    returns would fill the log with hundreds of partial lines.
    """

    def __init__(self, total, label="", stream=None, enabled=True, width=30):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled and callable(isatty) and isatty()
        self._last = 0.0

    def update(self, done, info=""):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < 0.1:  # redraw at most 10 times a second
            return
        self._last = now
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {info}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r\033[K")  # clear the line for the epoch summary
            self.stream.flush()


def predict(model, x, device, batch_size=512):
    """Class predictions of `model` (switched to eval mode, then back) for `x`, on the host."""
    model.eval()
    out = []
    with nn.no_grad():
        for idx in D.minibatches(len(x), batch_size):
            logits = model(to_device(x[idx], device))
            out.append(to_device(logits.argmax(axis=1), "cpu"))
    model.train()
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def accuracy(model, x, y, device, batch_size=512):
    """Fraction of `x` that `model` (switched to eval mode) classifies as `y`."""
    return float((predict(model, x, device, batch_size) == y).mean())


# ---------------------------------------------------------------------------------------------
# checkpoints: one .npz holding arrays plus a JSON record of everything else
# ---------------------------------------------------------------------------------------------
CHECKPOINT_VERSION = 1


def save_checkpoint(path, model, optimizer, scheduler, epoch, history, order_rng, config):
    """Writes the state after `epoch` epochs: model (parameters and buffers), optimiser
    (hyperparameters and buffers), schedule, the batch-order generator, the history so far,
    and the run's `config` (the options it was started with). Written to a temporary file
    and renamed, so an interrupted write never leaves a half checkpoint."""
    arrays = {f"model/{k}": to_device(v, "cpu") for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    scalars = []
    for i, s in enumerate(opt["state"]):
        scalars.append({k: v for k, v in s.items() if not hasattr(v, "shape")})
        arrays.update({f"optim/{i}/{k}": to_device(v, "cpu") for k, v in s.items()
                       if hasattr(v, "shape")})
    meta = {"version": CHECKPOINT_VERSION, "epoch": epoch, "history": history,
            "config": config, "optim_hyper": opt["hyper"], "optim_scalars": scalars,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "order_rng": order_rng.bit_generator.state}
    arrays["meta"] = np.array(json.dumps(meta))
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path):
    """The checkpoint at `path` as a dict (meta fields, "model" and "optim" arrays);
    ValueError naming the file when it is not a gpuconv-train checkpoint."""
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a gpuconv-train checkpoint ({type(e).__name__}: "
                         f"{e})") from None
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {meta.get('version')!r}, expected "
                         f"{CHECKPOINT_VERSION}")
    meta["model"] = {k[6:]: v for k, v in arrays.items() if k.startswith("model/")}
    states = [dict(s) for s in meta["optim_scalars"]]
    for k, v in arrays.items():
        if k.startswith("optim/"):
            _, i, name = k.split("/", 2)
            states[int(i)][name] = v
    hyper = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["optim_hyper"].items()}
    meta["optim"] = {"hyper": hyper, "state": states}
    return meta


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def train(split, epochs=30, batch_size=32, lr=None, momentum=0.9, weight_decay=1e-4,
          activation="relu", seed=0, device="cpu", dtype=np.float32, quiet=False, out=None,
          progress_stream=None, schedule="cosine", *, model="lenet5", optim="sgd", width=64,
          checkpoint=None, resume=None, data=None):
    """Trains `model` on `split`; returns (model, history) with one dict per epoch.

    ``lr=None`` takes the optimiser's default (0.05 for SGD, 0.001 for Adam). `checkpoint`
    is a path written after every epoch; `resume` a checkpoint (from :func:`load_checkpoint`)
    whose state training continues from (its settings must be the ones passed here); `data`
    names the data set in the checkpoint (the --mnist directory, None for the digits).
    """
    out = sys.stdout if out is None else out
    lr = OPTIMISERS[optim] if lr is None else lr
    dtype = np.dtype(dtype)
    config = {"model": model, "optim": optim, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "momentum": momentum, "weight_decay": weight_decay,
              "activation": activation, "seed": seed, "dtype": dtype.name, "schedule": schedule,
              "width": width, "mnist": data}
    init_seed, order_seed = np.random.SeedSequence(seed).spawn(2)
    net = build_model(model, split.x_train.shape[1:], split.classes, activation, dtype,
                      np.random.default_rng(init_seed), width).to(device)
    order_rng = np.random.default_rng(order_seed)
    loss_fn = nn.CrossEntropyLoss()
    if optim == "sgd":
        opt = SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optim == "adam":
        opt = Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optim must be one of {sorted(OPTIMISERS)}, got {optim!r}")
    # cosine decay from lr to lr/100 over the run: large steps explore early, small steps at
    # the end stop the test accuracy from jumping between epochs
    sched = CosineAnnealingLR(opt, T_max=epochs, eta_min=lr / 100) if schedule == "cosine" \
        else None
    history, first = [], 1
    if resume is not None:
        mismatched = {k: (resume["config"].get(k), v) for k, v in config.items()
                      if resume["config"].get(k) != v}
        if mismatched:
            raise ValueError(f"the checkpoint was made with other settings: {mismatched} "
                             "(checkpoint, now)")
        net.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optim"])
        if sched is not None:
            sched.load_state_dict(resume["scheduler"])
        order_rng.bit_generator.state = resume["order_rng"]
        history, first = list(resume["history"]), resume["epoch"] + 1
    # the data in the model's precision (the layers reject mixed dtypes instead of promoting)
    x_train, x_test = split.x_train.astype(dtype), split.x_test.astype(dtype)
    n = len(split.y_train)
    n_batches = -(-n // batch_size)
    for epoch in range(first, epochs + 1):
        t0 = time.perf_counter()
        bar = ProgressBar(n_batches, f"epoch {epoch}/{epochs}", progress_stream, not quiet)
        loss_sum = correct = 0.0
        for b, idx in enumerate(D.minibatches(n, batch_size, order_rng), 1):
            x = to_device(x_train[idx], device)
            y = to_device(split.y_train[idx], device)
            logits = net(x)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            net.backward(loss_fn.backward(), needs_input_grad=False)  # no d(images)
            opt.step()
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(axis=1) == y).sum())
            bar.update(b, f"loss {loss_sum / min(b * batch_size, n):.4f}")
        bar.close()
        if sched is not None:
            sched.step()
        rec = {"epoch": epoch, "loss": loss_sum / n, "train_acc": correct / n,
               "test_acc": accuracy(net, x_test, split.y_test, device),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if not quiet:
            print(f"epoch {epoch:3d}/{epochs}  loss {rec['loss']:.4f}  train acc "
                  f"{100 * rec['train_acc']:6.2f}%  test acc {100 * rec['test_acc']:6.2f}%  "
                  f"({rec['seconds']:.2f} s)", file=out, flush=True)
        if checkpoint:
            save_checkpoint(checkpoint, net, opt, sched, epoch, history, order_rng, config)
    return net, history


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """Errors as one line, "gpuconv-train: error: ...", exit status 2 (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser():
    p = _Parser(
        prog="gpuconv-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a ConvNet on handwritten digits with gpuconv's layers (default "
                    "data: scikit-learn's 8x8 digits, a fixed 20% test split).")
    p.add_argument("--model", choices=MODELS, default="lenet5",
                   help="the network: the LeNet-style ConvNet or ResNet-18")
    p.add_argument("--optim", choices=sorted(OPTIMISERS), default="sgd",
                   help="optimiser: SGD with momentum, or Adam")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=None,
                   help="(initial) learning rate (default: 0.05 for sgd, 0.001 for adam)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty added to grads")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule: cosine decay to lr/100, or constant")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu",
                   help="activation of lenet5 after each conv and the hidden linear layer")
    p.add_argument("--width", type=int, default=64,
                   help="resnet18's base channels (64 in the paper; smaller trains faster)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the batch order (not the test split)")
    p.add_argument("--mnist", metavar="DIR",
                   help="train on MNIST IDX files in DIR (train-images-idx3-ubyte[.gz], ...)")
    p.add_argument("--save", metavar="PATH", help="write the trained parameters to PATH (.npz)")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="write a checkpoint to PATH after every epoch (for --resume)")
    p.add_argument("--resume", metavar="PATH",
                   help="continue the run saved in checkpoint PATH, with its settings")
    p.add_argument("--viz", metavar="DIR",
                   help="after training, write PNGs of filters, feature maps, top patches, "
                        "curves and the confusion matrix to DIR (needs matplotlib: "
                        "pip install gpuconv[plot])")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of parameters and data")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def _writable_file(path):
    """Why `path` cannot be written as a file, or None. Probed by opening it for appending
    (which changes nothing; a file that did not exist is removed again): permission bits
    alone say "writable" to root on a read-only file system or under /proc."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        return f"{path} is a directory"
    if not os.path.isdir(parent):
        return f"directory {parent} does not exist"
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        return f"{path} is not writable ({e.strerror})"
    if not existed:
        os.remove(path)
    return None


def _check_options(parser, args):
    """Every option value checked before any data is loaded: parser.error (exit 2) on the
    first bad one."""
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    for name in ("momentum", "weight_decay"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
    if args.model == "resnet18" and args.activation != "relu":
        parser.error("--activation applies to --model lenet5 only (resnet18 uses relu)")
    try:
        parse_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    for opt in ("save", "checkpoint"):
        path = getattr(args, opt)
        if path is not None:
            why = _writable_file(path)
            if why:
                parser.error(f"--{opt} {path}: {why}")
    if args.mnist is not None and not os.path.isdir(args.mnist):
        parser.error(f"--mnist {args.mnist}: not a directory")
    if args.viz is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--viz needs matplotlib: pip install gpuconv[plot]")
        try:
            os.makedirs(args.viz, exist_ok=True)
        except OSError as e:
            parser.error(f"--viz {args.viz}: cannot create the directory ({e.strerror})")
        if not os.access(args.viz, os.W_OK):
            parser.error(f"--viz {args.viz}: not writable")
    if args.resume is not None:
        try:
            return load_checkpoint(args.resume)
        except (ValueError, OSError) as e:
            parser.error(f"--resume: {e}")
    return None


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    resume = _check_options(parser, args)
    kind, index = parse_device(args.device)

    def fail(message):
        print(f"gpuconv-train: error: {message}", file=sys.stderr)
        return 1

    if kind == "cuda":
        try:
            require_cuda(index)
        except RuntimeError as e:
            return fail(str(e))
    if resume is not None:  # the run's own settings, so that it continues exactly
        for k, v in resume["config"].items():
            setattr(args, k, v)
    try:
        split = D.load_mnist(args.mnist) if args.mnist else D.load_digits()
    except (ImportError, OSError, ValueError) as e:
        return fail(str(e))
    split = D.standardize(split)
    if not args.quiet:
        print(f"{split.name}: {len(split.y_train)} training and {len(split.y_test)} test "
              f"images of {split.x_train.shape[2]}x{split.x_train.shape[3]}, {split.classes} "
              f"classes; {args.model}, {args.optim}; device {args.device}, {args.dtype}" +
              (f"; resuming after epoch {resume['epoch']}" if resume else ""), flush=True)
    t0 = time.perf_counter()
    try:
        model, history = train(split, args.epochs, args.batch_size, args.lr, args.momentum,
                               args.weight_decay, args.activation, args.seed, args.device,
                               np.dtype(args.dtype), args.quiet, schedule=args.schedule,
                               model=args.model, optim=args.optim, width=args.width,
                               checkpoint=args.checkpoint, resume=resume,
                               data=args.mnist)
    except (ValueError, OSError) as e:  # e.g. the disk filling up under --checkpoint
        return fail(str(e))
    seconds = time.perf_counter() - t0
    written = []
    try:
        if args.save:
            nn.save(model, args.save)
        if args.viz:
            from . import viz
            y_pred = predict(model, split.x_test.astype(args.dtype), args.device)
            written = viz.write_all(model, split, history, args.viz, y_pred)
    except OSError as e:
        return fail(str(e))
    acc = history[-1]["test_acc"]
    n_test = len(split.y_test)
    print(f"test accuracy {100 * acc:.2f}% ({round(acc * n_test)}/{n_test}) after "
          f"{args.epochs} epochs in {seconds:.1f} s" +
          (f"; parameters saved to {args.save}" if args.save else "") +
          (f"; {len(written)} figures in {args.viz}" if args.viz else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
