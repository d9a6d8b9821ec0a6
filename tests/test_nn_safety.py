"""No silent wrong gradients: the stale-forward and double-backward guards, gc.no_grad(),
frozen parameters, np.asarray(param), dtype/device conversion, shared modules, gc.nn.summary."""
import io
import sys

import numpy as np
import pytest

import gpuconv as gc
from gpuconv import nn
from gpuconv.optim import SGD
from gpuconv.problem import ConvProblem

from .test_nn import small_net


def grads(net):
    return [p.grad.copy() for p in net.parameters()]


def clean_grads(x, g, seed=0):
    net = small_net(seed=seed)
    net(x)
    net.backward(g)
    return grads(net)


X = np.random.default_rng(1).standard_normal((2, 2, 6, 6))
X2 = np.random.default_rng(2).standard_normal((2, 2, 6, 6))
G = np.random.default_rng(3).standard_normal((2, 3))


def test_second_training_forward_before_backward_raises_then_recovers():
    net = small_net()
    net(X)
    net(X2)  # e.g. peeking at other logits in train mode
    with pytest.raises(RuntimeError, match=r"forward ran 2 times.*eval\(\).*gpuconv.no_grad"):
        net.backward(G)
    # the error leaves nothing half-used: the next forward + backward is right
    net.zero_grad()
    net(X)
    net.backward(G)
    for a, b in zip(grads(net), clean_grads(X, G)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_second_backward_after_one_forward_raises():
    net = small_net()
    net(X)
    net.backward(G)
    with pytest.raises(RuntimeError, match="backward called twice after one forward"):
        net.backward(G)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(np.zeros((2, 3)), np.array([0, 1]))
    loss_fn.backward()
    with pytest.raises(RuntimeError, match="twice"):
        loss_fn.backward()


@pytest.mark.parametrize("peek", ["no_grad", "eval"])
def test_peeking_in_no_grad_or_eval_leaves_the_gradient_right(peek):
    net = small_net()
    net(X)
    if peek == "no_grad":
        with gc.no_grad():
            assert not gc.is_grad_enabled()
            net(X2)
        assert gc.is_grad_enabled()
    else:
        net.eval()
        net(X2)
        net.train()
    net.backward(G)
    for a, b in zip(grads(net), clean_grads(X, G)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_no_grad_nests_restores_after_errors_and_decorates():
    with gc.no_grad():
        with gc.no_grad():
            pass
        assert not gc.is_grad_enabled()
    assert gc.is_grad_enabled()
    with pytest.raises(KeyError):
        with gc.no_grad():
            raise KeyError
    assert gc.is_grad_enabled()

    @gc.no_grad()
    def f():
        return gc.is_grad_enabled()

    assert f() is False and gc.is_grad_enabled()


def test_no_grad_forward_alone_keeps_nothing():
    layer = nn.Linear(3, 2, dtype=np.float64, rng=0)
    with gc.no_grad():
        layer(np.ones((1, 3)))
    with pytest.raises(RuntimeError, match="without a forward"):
        layer.backward(np.ones((1, 2)))


def test_a_module_used_twice_is_an_error_and_its_parameters_count_once():
    shared = nn.Linear(4, 4, dtype=np.float64, rng=0)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    assert len(net.parameters()) == 2  # as torch: listed once, so stepped once
    assert [n for n, _ in net.named_parameters()] == ["0.weight", "0.bias"]
    assert len(list(net.modules())) == 3
    net(np.ones((2, 4)))
    with pytest.raises(RuntimeError, match="one instance per place"):
        net.backward(np.ones((2, 4)))


def test_requires_grad_freezes_a_parameter():
    net = small_net()
    conv = net[0]
    conv.weight.requires_grad = False
    assert conv.weight.grad is None and conv.bias.grad is not None
    before = conv.weight.data.copy()
    opt = SGD(net.parameters(), lr=0.1)
    net(X)
    net.backward(G)
    opt.step()
    np.testing.assert_array_equal(conv.weight.data, before)  # skipped by the optimiser
    assert np.any(conv.bias.grad)
    # the other gradients are those of the unfrozen network
    for (name, p), ref in zip(small_net().named_parameters(), clean_grads(X, G)):
        if name != "0.weight":
            got = dict(net.named_parameters())[name].grad
            np.testing.assert_allclose(got, ref, rtol=1e-12, err_msg=name)
    conv.weight.requires_grad = True
    assert conv.weight.grad.shape == before.shape and not conv.weight.grad.any()
    net.requires_grad_(False)
    assert all(p.grad is None for p in net.parameters())
    net.zero_grad()  # no error on frozen parameters
    with pytest.raises(TypeError, match="requires_grad must be a bool"):
        conv.weight.requires_grad = 1
    with pytest.raises(ValueError, match="keeps no grad"):
        nn.Parameter(np.zeros(2), grad=np.zeros(2), requires_grad=False)


def test_asarray_of_a_parameter_is_its_data():
    p = nn.Linear(3, 2, rng=0).weight
    a = np.asarray(p)
    assert a is p.data or np.shares_memory(a, p.data)
    assert np.asarray(p, dtype=np.float64).dtype == np.float64
    assert not np.shares_memory(np.array(p, copy=True), p.data)


def test_dtype_conversions_cover_parameters_grads_and_buffers():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, rng=0), nn.BatchNorm2d(3), nn.Flatten())
    assert net.double() is net
    for arr in [p.data for p in net.parameters()] + [p.grad for p in net.parameters()] + \
            [net[1].running_mean, net[1].running_var]:
        assert arr.dtype == np.float64
    assert net[1].num_batches_tracked.dtype == np.int64  # integers stay integers
    net.float()
    assert all(p.data.dtype == np.float32 for p in net.parameters())
    net.to(np.float64)
    assert net[0].weight.dtype == np.float64
    net.to("float32")
    assert net[0].weight.dtype == np.float32
    net.to(dtype=np.dtype("float64"))
    assert net[1].running_var.dtype == np.float64
    with pytest.raises(TypeError, match="dtype must be"):
        net.to(np.int32)


def test_cuda_without_cuda_raises_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    net = small_net(np.float32)
    with pytest.raises(RuntimeError, match="CuPy is not installed"):
        net.cuda()
    with pytest.raises(RuntimeError, match="'cuda:1' is unavailable"):
        net.cuda(1)
    assert net.cpu() is net


def test_summary_shapes_params_and_flops():
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, rng=0), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5, rng=1))
    x = np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32)
    net(x)  # a pending training forward, which summary must leave alone
    stats = net[1].running_mean.copy(), net[1].num_batches_tracked.copy()
    out = io.StringIO()
    rows = nn.summary(net, (3, 2, 6, 6), file=out)
    assert [r["type"] for r in rows] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d",
                                         "Flatten", "Linear"]
    assert [r["output_shape"] for r in rows] == [(3, 4, 6, 6), (3, 4, 6, 6), (3, 4, 6, 6),
                                                 (3, 4, 3, 3), (3, 36), (3, 5)]
    assert [r["params"] for r in rows] == [4 * 2 * 9 + 4, 8, 0, 0, 0, 36 * 5 + 5]
    # 2 x multiply-adds: every output element of the conv sums C*R*S products
    assert rows[0]["flops"] == 2 * (3 * 4 * 6 * 6) * (2 * 3 * 3)
    assert rows[0]["flops"] == ConvProblem.from_args((3, 2, 6, 6), (4, 2, 3, 3), padding=1).flops()
    assert rows[5]["flops"] == 2 * 3 * 36 * 5
    text = out.getvalue()
    assert "Conv2d" in text and f"{sum(r['params'] for r in rows):,} parameters" in text
    assert all(m.training for m in net.modules())
    np.testing.assert_array_equal(net[1].running_mean, stats[0])
    assert net[1].num_batches_tracked == stats[1]
    net.backward(np.ones((3, 5), np.float32))  # the pending forward survived


def _counting(monkeypatch):
    calls = []
    real = gc.functional.conv2d_grad_input

    def spy(*a, **kw):
        calls.append(a[0])
        return real(*a, **kw)
    monkeypatch.setattr(gc.functional, "conv2d_grad_input", spy)
    return calls


@pytest.mark.parametrize("lead", (False, True), ids=("conv_first", "parameter_free_first"))
def test_backward_without_input_grad(lead, monkeypatch):
    """Sequential.backward(g, needs_input_grad=False): the same parameter gradients, None back,
    the first conv's input gradient never computed (as autograd for images that do not require
    grad), parameter-free leading layers skipped -- and the safety errors still hold."""
    def net():
        body = small_net(seed=4)
        return nn.Sequential(nn.ReLU(), *body) if lead else body
    ref = net()
    ref(X)
    dx = ref.backward(G)
    assert dx.shape == X.shape
    calls = _counting(monkeypatch)
    m = net()
    m(X)
    assert m.backward(G, needs_input_grad=False) is None
    for a, b in zip(grads(m), grads(ref)):
        np.testing.assert_array_equal(a, b)
    assert X.shape not in calls and len(calls) == sum(isinstance(l, nn.Conv2d) for l in m) - 1
    with pytest.raises(RuntimeError, match="twice"):
        m.backward(G, needs_input_grad=False)
    m(X)
    m(X2)
    with pytest.raises(RuntimeError, match="forward ran 2 times"):
        m.backward(G, needs_input_grad=False)
    m.zero_grad()
    m(X)
    m.backward(G, needs_input_grad=False)
    for a, b in zip(grads(m), grads(ref)):
        np.testing.assert_array_equal(a, b)


def test_layers_skip_their_input_gradient():
    rng = np.random.default_rng(6)
    f8 = np.float64
    for layer, x in ((nn.Conv2d(2, 3, 3, padding=1, dtype=f8, rng=0), X),
                     (nn.Linear(4, 3, dtype=f8, rng=0), rng.standard_normal((2, 4))),
                     (nn.ConvTranspose2d(2, 3, 3, stride=2, dtype=f8, rng=0), X)):
        y = layer(x)
        g = rng.standard_normal(y.shape)
        layer.backward(g)
        want = [p.grad.copy() for p in layer.parameters()]
        layer.zero_grad()
        layer(x)
        assert layer.backward(g, needs_input_grad=False) is None
        for a, b in zip([p.grad for p in layer.parameters()], want):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(RuntimeError, match="twice"):
            layer.backward(g, needs_input_grad=False)
