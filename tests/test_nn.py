"""gpuconv.nn: layer gradients against central finite differences (float64), accumulation,
modes, initialisation, argument checks, saving and loading, devices; torch where installed.

The finite-difference oracle is independent of the code under test: it only calls forward.
For a layer f and a fixed random G, L = sum(f(x) * G), so dL/dx = backward(G) and
dL/dparam = param.grad after that backward.
"""
import math
import sys
import types

import numpy as np
import pytest

import gpuconv as gc
from gpuconv import nn
from gpuconv.device import cuda_unavailable_reason, device_of, parse_device, to_device

# one finite-difference helper for the whole suite (it perturbs `a` in place and restores it)
from .naive import central_difference as numeric_grad


# ---------------------------------------------------------------------------------------------
# the finite-difference oracle
# ---------------------------------------------------------------------------------------------
def check_layer_grads(layer, x, seed=0, rtol=1e-6, atol=1e-8):
    """backward() and every param.grad against finite differences of sum(layer(x) * G)."""
    with gc.no_grad():  # a forward that needs no backward
        G = np.random.default_rng(seed).standard_normal(layer(x).shape)
    layer.zero_grad()
    layer(x)
    dx = layer.backward(G)
    assert dx.shape == x.shape and dx.dtype == x.dtype

    def loss():
        with gc.no_grad():
            return float((layer(x) * G).sum())

    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=rtol, atol=atol)
    for name, p in layer.named_parameters():
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numeric_grad(loss, p.data), rtol=rtol, atol=atol,
                                   err_msg=name)
    return dx


def spaced(shape, seed=0):
    """Distinct values at least 0.01 apart, shuffled: no ties for max-type layers and no point
    within a finite-difference step of a kink (x == 0 for ReLU)."""
    n = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    vals = (np.arange(n) - n / 2 + 0.5) * 0.01 + rng.uniform(-0.002, 0.002, n)
    return rng.permutation(vals).reshape(shape)


# ---------------------------------------------------------------------------------------------
# gradients of each layer
# ---------------------------------------------------------------------------------------------
CONV_CASES = [  # (C, K, kernel, stride, padding, dilation, groups, H, W)
    (3, 4, 3, 1, 0, 1, 1, 6, 5),
    (3, 4, 3, 2, 1, 1, 1, 7, 6),            # stride 2: the last row/col no window reaches
    (2, 3, (3, 2), 1, 2, 2, 1, 6, 7),       # dilation, rectangular kernel, padding 2
    (4, 6, 3, (2, 1), (1, 0), (1, 2), 2, 7, 8),  # groups, asymmetric stride/dilation/padding
    (4, 4, 3, 1, 1, 1, 4, 5, 5),            # depthwise
    (2, 2, 2, 1, "same", 1, 1, 5, 4),       # even kernel with 'same': extra pad bottom/right
    (3, 2, 1, 3, 0, 1, 1, 7, 7),            # 1x1, stride 3
]


@pytest.mark.parametrize("C,K,k,stride,padding,dilation,groups,H,W", CONV_CASES)
def test_conv2d_gradients(C, K, k, stride, padding, dilation, groups, H, W):
    layer = nn.Conv2d(C, K, k, stride, padding, dilation, groups, dtype=np.float64, rng=1)
    x = np.random.default_rng(2).standard_normal((2, C, H, W))
    check_layer_grads(layer, x)


def test_conv2d_without_bias_gradients():
    layer = nn.Conv2d(2, 3, 3, padding=1, bias=False, dtype=np.float64, rng=0)
    assert layer.bias is None and len(layer.parameters()) == 1
    check_layer_grads(layer, np.random.default_rng(1).standard_normal((2, 2, 4, 5)))


def test_conv2d_forward_matches_functional():
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1, rng=0)
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    y = layer(x)
    assert y.shape == (2, 5, 5, 5) and y.dtype == np.float32
    np.testing.assert_array_equal(
        y, gc.conv2d(x, layer.weight.data, layer.bias.data, stride=2, padding=1))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradients_and_forward(bias):
    layer = nn.Linear(5, 3, bias=bias, dtype=np.float64, rng=0)
    x = np.random.default_rng(1).standard_normal((4, 5))
    expected = np.einsum("ni,oi->no", x, layer.weight.data)  # y = x W^T + b, written out
    if bias:
        expected = expected + layer.bias.data
    with gc.no_grad():
        np.testing.assert_allclose(layer(x), expected, rtol=1e-12)
    check_layer_grads(layer, x)


@pytest.mark.parametrize("kwargs,H,W", [
    (dict(kernel_size=2), 6, 6),
    (dict(kernel_size=3, stride=2, padding=1), 7, 6),
    (dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1)), 7, 8),
    (dict(kernel_size=3, stride=2, ceil_mode=True), 6, 8),  # partial windows at the end
])
def test_maxpool_gradients(kwargs, H, W):
    layer = nn.MaxPool2d(**kwargs)
    x = spaced((2, 3, H, W))
    dx = check_layer_grads(layer, x)
    # each output gradient lands on one input; with stride >= kernel nothing overlaps
    assert np.count_nonzero(dx) <= np.prod(layer(x).shape)


ACTIVATIONS = [nn.ReLU(), nn.LeakyReLU(), nn.LeakyReLU(0.3), nn.Sigmoid(), nn.Tanh(), nn.ELU(),
               nn.ELU(alpha=0.5)]


@pytest.mark.parametrize("layer", ACTIVATIONS, ids=repr)
def test_activation_gradients(layer):
    x = spaced((2, 3, 4, 5)) * 20  # values in about [-12, 12], well clear of 0
    check_layer_grads(layer, x)


@pytest.mark.parametrize("layer,expected", [
    (nn.ReLU(), lambda x: np.maximum(x, 0)),
    (nn.LeakyReLU(), lambda x: np.where(x > 0, x, 0.1 * x)),
    (nn.Sigmoid(), lambda x: 1 / (1 + np.exp(-x))),
    (nn.Tanh(), np.tanh),
    (nn.ELU(alpha=0.7), lambda x: np.where(x > 0, x, 0.7 * (np.exp(x) - 1))),
], ids=repr)
def test_activation_forward(layer, expected):
    x = np.linspace(-5, 5, 41)
    np.testing.assert_allclose(layer(x), expected(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("pieces,axis,shape", [(2, 1, (2, 6, 3, 3)), (3, -1, (4, 9)),
                                               (1, 1, (2, 3, 2, 2))])
def test_maxout_gradients(pieces, axis, shape):
    layer = nn.Maxout(pieces, axis=axis)
    x = spaced(shape)
    with gc.no_grad():
        y = layer(x)
    ax = axis % len(shape)
    grouped = x.reshape(shape[:ax] + (shape[ax] // pieces, pieces) + shape[ax + 1:])
    np.testing.assert_array_equal(y, grouped.max(axis=ax + 1))
    check_layer_grads(layer, x)


def test_flatten_round_trip():
    layer = nn.Flatten()
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    y = layer(x)
    assert y.shape == (2, 60)
    np.testing.assert_array_equal(layer.backward(y), x)


# ---------------------------------------------------------------------------------------------
# cross-entropy
# ---------------------------------------------------------------------------------------------
def test_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)) * 3
    labels = np.array([0, 3, 1, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    # the definition, written plainly: -mean log(exp(z_y) / sum exp(z))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(5), labels]))
    loss = loss_fn(logits, labels)
    assert loss.shape == () and math.isclose(float(loss), expected, rel_tol=1e-12)
    d = loss_fn.backward(2.5)  # the upstream gradient scales the result
    num = numeric_grad(lambda: 2.5 * float(loss_fn(logits, labels)), logits)
    np.testing.assert_allclose(d, num, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(d.sum(axis=1), 0, atol=1e-12)  # softmax - onehot rows sum to 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    loss_fn = nn.CrossEntropyLoss()
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], dtype=dtype)
    loss = float(loss_fn(logits, np.array([1, 2])))
    # row 0: log-sum-exp is 1e4, label logit 0 -> 1e4; row 1: two equal maxima -> log 2
    assert math.isclose(loss, (1e4 + math.log(2)) / 2, rel_tol=1e-6)
    d = loss_fn.backward()
    assert np.all(np.isfinite(d)) and d.dtype == dtype
    np.testing.assert_allclose(d, np.array([[0.5, -0.5, 0], [0, 0.25, -0.25]]), atol=1e-6)


def test_cross_entropy_rejects_bad_labels():
    loss_fn = nn.CrossEntropyLoss()
    logits = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        loss_fn(logits, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"labels must lie"):
        loss_fn(logits, np.array([0, -1, 1]))
    with pytest.raises(TypeError, match="labels must be integers"):
        loss_fn(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        loss_fn(logits, np.array([0, 1]))
    with pytest.raises(ValueError, match="logits must be a 2-D array"):
        loss_fn(np.zeros((3, 4, 1)), np.array([0, 1, 2]))


# ---------------------------------------------------------------------------------------------
# Sequential: a whole network end to end
# ---------------------------------------------------------------------------------------------
def small_net(dtype=np.float64, seed=0, act=nn.Tanh):
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=rng), act(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, stride=1, padding=1, groups=2, dtype=dtype, rng=rng), nn.Maxout(2),
        nn.Flatten(), nn.Linear(2 * 3 * 3, 5, dtype=dtype, rng=rng), nn.ELU(),
        nn.Linear(5, 3, dtype=dtype, rng=rng))


def test_sequential_network_gradients_through_the_loss():
    net, loss_fn = small_net(), nn.CrossEntropyLoss()
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6))
    labels = np.array([2, 0, 1])

    def loss():
        return float(loss_fn(net(x), labels))

    loss()
    net.zero_grad()
    dx = net.backward(loss_fn.backward())
    np.testing.assert_allclose(dx, numeric_grad(loss, x), rtol=1e-5, atol=1e-9)
    names = [n for n, _ in net.named_parameters()]
    assert names == ["0.weight", "0.bias", "3.weight", "3.bias", "6.weight", "6.bias",
                     "8.weight", "8.bias"]
    for name, p in net.named_parameters():
        analytic = p.grad.copy()
        np.testing.assert_allclose(analytic, numeric_grad(loss, p.data), rtol=1e-5, atol=1e-9,
                                   err_msg=name)


def test_sequential_indexing_and_order():
    layers = [nn.Linear(3, 4, rng=0), nn.ReLU(), nn.Linear(4, 2, rng=1)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and seq[0] is layers[0] and seq[-1] is layers[2]
    assert list(seq) == layers
    head = seq[:2]
    assert isinstance(head, nn.Sequential) and len(head) == 2 and head[1] is layers[1]
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(seq(x), layers[2](layers[1](layers[0](x))))
    with pytest.raises(TypeError, match="position 1"):
        nn.Sequential(nn.ReLU(), lambda x: x)


def test_sequential_backward_runs_in_reverse():
    calls = []

    class Tap(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            return x

        def backward(self, g):
            calls.append(self.tag)
            return g

    seq = nn.Sequential(Tap("a"), Tap("b"), Tap("c"))
    seq.backward(seq(np.zeros(1)))
    assert calls == ["c", "b", "a"]


# ---------------------------------------------------------------------------------------------
# accumulation, zero_grad, modes
# ---------------------------------------------------------------------------------------------
def test_gradients_accumulate_and_zero_grad_clears_them():
    net = small_net()
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 6))
    g = np.random.default_rng(2).standard_normal((2, 3))
    net(x)
    net.backward(g)
    once = [p.grad.copy() for p in net.parameters()]
    assert all(np.any(o != 0) for o in once)
    net(x)
    net.backward(g)
    for o, p in zip(once, net.parameters()):
        np.testing.assert_allclose(p.grad, 2 * o, rtol=1e-12)
    net.zero_grad()
    assert all(not np.any(p.grad) for p in net.parameters())


def test_backward_before_forward_and_in_eval_mode_raise():
    for layer in [nn.Conv2d(1, 1, 1), nn.Linear(2, 2), nn.ReLU(), nn.Sigmoid(), nn.MaxPool2d(2),
                  nn.Maxout(2), nn.Flatten(), nn.CrossEntropyLoss()]:
        with pytest.raises(RuntimeError, match="without a forward"):
            layer.backward(np.zeros((1, 1, 1, 1), np.float32))
    net = small_net()
    x = np.zeros((1, 2, 6, 6))
    net.eval()
    assert not any(m.training for m in net.modules())
    y_eval = net(x)
    with pytest.raises(RuntimeError, match="without a forward"):
        net.backward(np.zeros((1, 3)))
    net.train()
    assert all(m.training for m in net.modules())
    np.testing.assert_array_equal(net(x), y_eval)  # no dropout/batchnorm: modes agree
    net.backward(np.zeros((1, 3)))


# ---------------------------------------------------------------------------------------------
# initialisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,fan_in", [
    (lambda rng: nn.Conv2d(16, 64, (3, 5), rng=rng), 16 * 3 * 5),
    (lambda rng: nn.Conv2d(16, 64, 3, groups=4, rng=rng), 4 * 3 * 3),
    (lambda rng: nn.Linear(100, 300, rng=rng), 100),
])
def test_init_is_pytorch_uniform(make, fan_in):
    layer = make(0)
    bound = 1 / math.sqrt(fan_in)
    w, b = layer.weight.data.astype(np.float64), layer.bias.data.astype(np.float64)
    assert layer.weight.data.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # U(-a, a): mean 0, variance a^2/3; the tolerances are ~5 standard errors
    n = w.size
    assert abs(w.mean()) < 5 * bound / math.sqrt(3 * n)
    assert abs(w.var() / (bound ** 2 / 3) - 1) < 5 * math.sqrt(0.8 / n)
    assert np.abs(w).max() > bound * (1 - 10 / n)  # the support really reaches the bound
    # seeds: same seed same weights, different seed different weights
    np.testing.assert_array_equal(make(0).weight.data, layer.weight.data)
    assert not np.array_equal(make(1).weight.data, layer.weight.data)


def test_dtype_option():
    layer = nn.Conv2d(1, 2, 3, dtype=np.float64, rng=0)
    assert layer.weight.data.dtype == layer.bias.data.dtype == np.float64
    assert layer.weight.grad.dtype == np.float64
    # one seed gives the same draws in either precision
    np.testing.assert_array_equal(nn.Conv2d(1, 2, 3, rng=0).weight.data,
                                  layer.weight.data.astype(np.float32))
    with pytest.raises(TypeError, match="dtype"):
        nn.Linear(2, 2, dtype=np.int32)
    with pytest.raises(TypeError, match="dtype"):
        nn.Conv2d(1, 1, 1, dtype=np.float16)  # the CPU engine has no float16


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,error,match", [
    (lambda: nn.Conv2d(0, 4, 3), ValueError, "in_channels"),
    (lambda: nn.Conv2d(2.5, 4, 3), TypeError, "in_channels"),
    (lambda: nn.Conv2d(True, 4, 3), TypeError, "in_channels"),
    (lambda: nn.Conv2d(3, -1, 3), ValueError, "out_channels"),
    (lambda: nn.Conv2d(3, 4, 3, groups=2), ValueError, "in_channels .3. must be divisible by "
                                                       "groups"),
    (lambda: nn.Conv2d(4, 3, 3, groups=2), ValueError, "out_channels .3. must be divisible"),
    (lambda: nn.Conv2d(4, 4, 3, groups=0), ValueError, "groups"),
    (lambda: nn.Conv2d(3, 4, 0), ValueError, "kernel_size"),
    (lambda: nn.Conv2d(3, 4, (3, 3, 3)), ValueError, "kernel_size"),
    (lambda: nn.Conv2d(3, 4, 3, stride=0), ValueError, "stride"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), ValueError, "padding"),
    (lambda: nn.Conv2d(3, 4, 3, padding="full"), ValueError, "padding"),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding="same"), ValueError, "same"),
    (lambda: nn.Conv2d(3, 4, 3, dilation=0), ValueError, "dilation"),
    (lambda: nn.Linear(0, 3), ValueError, "in_features"),
    (lambda: nn.Linear(3, 1.0), TypeError, "out_features"),
    (lambda: nn.MaxPool2d(0), ValueError, "kernel_size"),
    (lambda: nn.MaxPool2d(2, stride=0), ValueError, "stride"),
    (lambda: nn.MaxPool2d(2, padding=2), ValueError, "padding"),
    (lambda: nn.Maxout(0), ValueError, "pieces"),
    (lambda: nn.Maxout(2, axis=1.0), TypeError, "axis"),
    (lambda: nn.LeakyReLU("0.1"), TypeError, "negative_slope"),
    (lambda: nn.ELU(alpha=float("nan")), ValueError, "alpha"),
    (lambda: nn.Flatten(-1), ValueError, "start_dim"),
    (lambda: nn.Conv2d(1, 1, 1, rng="seed"), TypeError, "rng"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"input must have shape \(N, 3\)"):
        nn.Linear(3, 2)(np.zeros((4, 5), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        nn.Linear(3, 2)(np.zeros((4, 3), np.float64))  # float32 layer, float64 input
    with pytest.raises(ValueError, match="input must be a 4-D array"):
        nn.Conv2d(1, 1, 1)(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="weight has 1 input channels per group"):
        nn.Conv2d(1, 1, 1)(np.zeros((1, 3, 2, 2), np.float32))


# ---------------------------------------------------------------------------------------------
# saving, loading, devices
# ---------------------------------------------------------------------------------------------
def test_state_dict_save_load_round_trip(tmp_path):
    net = small_net(np.float32, seed=0)
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)
    path = tmp_path / "model"  # no suffix: the file must be written at exactly this path
    nn.save(net, path)
    with np.load(path) as f:
        assert sorted(f.files) == sorted(n for n, _ in net.named_parameters())
    other = small_net(np.float32, seed=1)
    assert not np.array_equal(other(x), net(x))
    assert nn.load(other, path) is other
    np.testing.assert_array_equal(other(x), net(x))
    # the state dict holds copies: changing it does not change the model
    sd = net.state_dict()
    sd["0.weight"][...] = 0
    assert np.any(net[0].weight.data)


def test_load_state_dict_checks_names_shapes_and_keeps_dtype():
    net = small_net(np.float32)
    sd = {k: v.astype(np.float64) for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    assert all(p.data.dtype == np.float32 for p in net.parameters())
    bad = dict(sd)
    bad["0.weight"] = np.zeros((4, 2, 3, 2))
    with pytest.raises(ValueError, match=r"0.weight.*\(4, 2, 3, 2\).*\(4, 2, 3, 3\)"):
        net.load_state_dict(bad)
    missing = dict(sd)
    del missing["8.bias"]
    with pytest.raises(KeyError, match="missing.*8.bias"):
        net.load_state_dict(missing)
    with pytest.raises(KeyError, match="unexpected.*extra"):
        net.load_state_dict({**sd, "extra": np.zeros(1)})


def test_to_cpu_and_device_names():
    net = small_net(np.float32)
    assert net.to("cpu") is net and device_of(net[0].weight.data) == "cpu"
    assert parse_device("cuda:1") == ("cuda", 1) and parse_device("CPU") == ("cpu", None)
    for bad in ["gpu", "cuda:", "cuda:x", 0, None]:
        with pytest.raises(ValueError, match="'cpu', 'cuda' or 'cuda:N'"):
            net.to(bad)
    with pytest.raises(TypeError):
        device_of([1.0])


@pytest.fixture
def fake_cupy(monkeypatch):
    """Installs a stand-in `cupy` whose getDeviceCount raises `error` (or returns a count)."""
    def install(error=None, count=1):
        def get_count():
            if error is not None:
                raise error
            return count
        runtime = types.SimpleNamespace(getDeviceCount=get_count)
        mod = types.ModuleType("cupy")
        mod.__version__ = "14.2.0"
        mod.cuda = types.SimpleNamespace(runtime=runtime)
        monkeypatch.setitem(sys.modules, "cupy", mod)
    return install


def test_cuda_unavailable_reasons_name_the_cause(monkeypatch, fake_cupy):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    assert "CuPy is not installed" in cuda_unavailable_reason()
    assert "pip install gpuconv[cuda12]" in cuda_unavailable_reason()
    fake_cupy(RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient"))
    assert "no usable NVIDIA driver" in cuda_unavailable_reason()
    fake_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected"))
    assert "no CUDA device" in cuda_unavailable_reason()
    fake_cupy(count=0)
    assert "no CUDA device" in cuda_unavailable_reason()
    fake_cupy(count=2)
    assert cuda_unavailable_reason(1) is None
    assert "CUDA device 2 does not exist (this machine has 2)" in cuda_unavailable_reason(2)


def test_to_cuda_without_cuda_raises_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    net = small_net(np.float32)
    with pytest.raises(RuntimeError, match="device 'cuda:1' is unavailable: CuPy is not"):
        net.to("cuda:1")
    assert device_of(net[0].weight.data) == "cpu"  # nothing moved


# ---------------------------------------------------------------------------------------------
# GPU: the same layers on CuPy arrays give the CPU's results
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_network_on_gpu_matches_cpu(cp):
    cpu_net, gpu_net = small_net(np.float64, seed=3), small_net(np.float64, seed=3).to("cuda")
    assert device_of(gpu_net[0].weight.data).startswith("cuda")
    loss_fn = nn.CrossEntropyLoss()
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6))
    labels = np.array([2, 0, 1])
    loss_c = float(loss_fn(cpu_net(x), labels))
    dx_c = cpu_net.backward(loss_fn.backward())
    loss_g = float(loss_fn(gpu_net(cp.asarray(x)), cp.asarray(labels)))
    dx_g = gpu_net.backward(loss_fn.backward())
    assert isinstance(dx_g, cp.ndarray)
    assert math.isclose(loss_c, loss_g, rel_tol=1e-10)
    np.testing.assert_allclose(dx_g.get(), dx_c, rtol=1e-8, atol=1e-12)
    for (name, pc), pg in zip(cpu_net.named_parameters(), gpu_net.parameters()):
        np.testing.assert_allclose(pg.grad.get(), pc.grad, rtol=1e-8, atol=1e-12, err_msg=name)
    gpu_net.to("cpu")
    assert device_of(gpu_net[0].weight.data) == "cpu"
    assert device_of(to_device(np.zeros(2), "cuda:0")) == "cuda:0"


# ---------------------------------------------------------------------------------------------
# PyTorch on copied weights (an independent implementation; skipped where torch is missing)
# ---------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("C,K,k,stride,padding,dilation,groups,H,W", CONV_CASES)
def test_conv2d_matches_torch(C, K, k, stride, padding, dilation, groups, H, W):
    torch = pytest.importorskip("torch")
    ours = nn.Conv2d(C, K, k, stride, padding, dilation, groups, dtype=np.float64, rng=0)
    theirs = torch.nn.Conv2d(C, K, k, stride, padding, dilation, groups).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight.data))
        theirs.bias.copy_(torch.from_numpy(ours.bias.data))
    x = np.random.default_rng(1).standard_normal((2, C, H, W))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    y = ours(x)
    yt = theirs(xt)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    g = np.random.default_rng(2).standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_linear_and_loss_match_torch():
    torch = pytest.importorskip("torch")
    ours, theirs = nn.Linear(7, 4, dtype=np.float64, rng=0), torch.nn.Linear(7, 4).double()
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(ours.weight.data))
        theirs.bias.copy_(torch.from_numpy(ours.bias.data))
    x = np.random.default_rng(1).standard_normal((6, 7)) * 4
    labels = np.array([0, 3, 2, 1, 3, 0])
    xt = torch.from_numpy(x.copy()).requires_grad_()
    loss_t = torch.nn.functional.cross_entropy(theirs(xt), torch.from_numpy(labels))
    loss_t.backward()
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(ours(x), labels)
    dx = ours.backward(loss_fn.backward())
    assert math.isclose(float(loss), loss_t.item(), rel_tol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=1e-10,
                               atol=1e-14)
    np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_init_bounds_match_torch():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    for ours, theirs in [(nn.Conv2d(6, 9, 5, groups=3, rng=0), torch.nn.Conv2d(6, 9, 5, groups=3)),
                         (nn.Linear(50, 20, rng=0), torch.nn.Linear(50, 20))]:
        for name in ("weight", "bias"):
            t = getattr(theirs, name).detach().numpy()
            o = getattr(ours, name).data
            assert o.shape == t.shape and o.dtype == t.dtype
            # both U(-a, a) with one a: their ranges agree to within sampling error
            a = max(np.abs(t).max(), np.abs(o).max())
            assert np.abs(o).max() > 0.8 * a and np.abs(t).max() > 0.8 * a
