"""The lecture's next layers against naive loops, finite differences (float64) and PyTorch:
conv_transpose2d / ConvTranspose2d, BatchNorm2d, Dropout, avg_pool2d / AvgPool2d,
AdaptiveAvgPool2d, Identity, ModuleList, Residual; and PyTorch's edge cases (batch 0, 0-d
activations, NaN gradients, wrong-shaped gradients)."""
import math

import numpy as np
import pytest

import gpuconv as gc
from gpuconv import nn

from .test_nn import check_layer_grads, spaced

try:  # the PyTorch comparisons run where it is installed; the other oracles everywhere
    import torch
    TF = torch.nn.functional
except ImportError:
    torch = TF = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def close(a, b, tol=1e-10):
    b = b.detach().numpy() if hasattr(b, "detach") else b
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------------
# transposed convolution
# ---------------------------------------------------------------------------------------------
def naive_conv_transpose(x, w, b, stride, padding, output_padding, groups, dilation):
    """Each input pixel scatters its kernel-weighted copy into the output (the definition)."""
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    (sh, sw), (ph, pw), (oh, ow), (dh, dw) = map(pair, (stride, padding, output_padding,
                                                        dilation))
    N, Cin, H, W = x.shape
    _, Cog, R, S = w.shape
    Ho = (H - 1) * sh - 2 * ph + dh * (R - 1) + oh + 1
    Wo = (W - 1) * sw - 2 * pw + dw * (S - 1) + ow + 1
    y = np.zeros((N, Cog * groups, Ho, Wo))
    Cig = Cin // groups
    for ci in range(Cin):
        g = ci // Cig
        for h in range(H):
            for wi in range(W):
                for r in range(R):
                    for s in range(S):
                        yh, yw = h * sh - ph + r * dh, wi * sw - pw + s * dw
                        if 0 <= yh < Ho and 0 <= yw < Wo:
                            y[:, g * Cog:(g + 1) * Cog, yh, yw] += x[:, ci, h, wi, None] * \
                                w[ci, :, r, s]
    if b is not None:
        y += b[None, :, None, None]
    return y


TRANSPOSE_CASES = [  # Cin, Cout, kernel, stride, padding, output_padding, groups, dilation, H, W
    (3, 4, 3, 1, 0, 0, 1, 1, 5, 6),
    (4, 6, 3, 2, 1, 1, 2, 1, 5, 4),               # stride 2 + output_padding, groups
    (2, 3, (3, 2), (2, 3), (1, 0), (1, 2), 1, (1, 2), 4, 5),  # everything asymmetric
    (2, 2, 3, 1, 0, 1, 1, 2, 4, 4),               # output_padding >= stride (allowed: < dilation)
    (4, 4, 3, 2, 1, 0, 4, 1, 3, 3),               # depthwise
    (3, 2, 1, 3, 0, 2, 1, 1, 3, 2),               # 1x1, stride 3
]


@needs_torch
@pytest.mark.parametrize("Cin,Cout,k,s,p,op,g,d,H,W", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_naive_and_torch(Cin, Cout, k, s, p, op, g, d, H, W):
    rng = np.random.default_rng(0)
    kk = k if isinstance(k, tuple) else (k, k)
    x = rng.standard_normal((2, Cin, H, W))
    w = rng.standard_normal((Cin, Cout // g) + kk)
    b = rng.standard_normal(Cout)
    y = gc.conv_transpose2d(x, w, b, s, p, op, g, d)
    close(y, naive_conv_transpose(x, w, b, s, p, op, g, d))
    xt, wt, bt = (t(a).requires_grad_() for a in (x, w, b))
    yt = TF.conv_transpose2d(xt, wt, bt, s, p, op, g, d)
    close(y, yt)
    G = rng.standard_normal(y.shape)
    yt.backward(t(G))
    close(gc.conv_transpose2d_grad_input(x.shape, w, G, s, p, op, g, d), xt.grad)
    close(gc.conv_transpose2d_grad_weight(x, w.shape, G, s, p, op, g, d), wt.grad)


@needs_torch
@pytest.mark.parametrize("Cin,Cout,k,s,p,op,g,d,H,W", TRANSPOSE_CASES[:4])
def test_conv_transpose_layer_gradients_and_torch(Cin, Cout, k, s, p, op, g, d, H, W):
    layer = nn.ConvTranspose2d(Cin, Cout, k, s, p, op, g, True, d, dtype=np.float64, rng=0)
    x = np.random.default_rng(1).standard_normal((2, Cin, H, W))
    check_layer_grads(layer, x)
    theirs = torch.nn.ConvTranspose2d(Cin, Cout, k, s, p, op, g, True, d).double()
    assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in layer.named_parameters()]
    theirs.load_state_dict({k_: t(v) for k_, v in layer.state_dict().items()})
    layer.zero_grad()
    xt = t(x).requires_grad_()
    yt = theirs(xt)
    close(layer(x), yt)
    G = np.random.default_rng(2).standard_normal(yt.shape)
    yt.backward(t(G))
    close(layer.backward(G), xt.grad)
    close(layer.weight.grad, theirs.weight.grad)
    close(layer.bias.grad, theirs.bias.grad)


@needs_torch
def test_conv_transpose_init_is_torchs():
    layer = nn.ConvTranspose2d(6, 8, 3, groups=2, rng=0)
    assert layer.weight.shape == (6, 4, 3, 3) and layer.bias.shape == (8,)
    bound = 1 / math.sqrt(4 * 3 * 3)  # torch: fan_in from weight.size(1) * kH * kW
    assert np.abs(layer.weight.data).max() <= bound < 1.05 * np.abs(layer.weight.data).max()
    torch.manual_seed(0)
    tw = torch.nn.ConvTranspose2d(6, 8, 3, groups=2).weight.detach().abs().max().item()
    assert tw <= bound < 1.05 * tw


@pytest.mark.parametrize("make,match", [
    (lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=2), "output_padding"),
    (lambda: nn.ConvTranspose2d(2, 3, 3, groups=2), "out_channels"),
    (lambda: nn.ConvTranspose2d(3, 2, 3, groups=2), "in_channels"),
    (lambda: nn.ConvTranspose2d(2, 2, 3, padding="same"), "padding"),
    (lambda: nn.ConvTranspose2d(2, 2, 3, stride=0), "stride"),
])
def test_conv_transpose_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_conv_transpose_bad_inputs():
    with pytest.raises(ValueError, match=r"weight.shape\[0\] \(2\) must equal"):
        gc.conv_transpose2d(np.zeros((1, 3, 4, 4)), np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match="output size would be"):
        gc.conv_transpose2d(np.zeros((1, 2, 1, 1)), np.zeros((2, 2, 1, 1)), padding=1)
    with pytest.raises(ValueError, match="bias must have shape"):
        gc.conv_transpose2d(np.zeros((1, 2, 3, 3)), np.zeros((2, 2, 3, 3)), np.zeros(3))


# ---------------------------------------------------------------------------------------------
# batch normalisation
# ---------------------------------------------------------------------------------------------
@needs_torch
@pytest.mark.parametrize("kwargs", [{}, dict(momentum=None), dict(affine=False),
                                    dict(track_running_stats=False), dict(eps=1e-3,
                                                                          momentum=0.3)])
def test_batchnorm_matches_torch_step_by_step(kwargs):
    rng = np.random.default_rng(0)
    ours = nn.BatchNorm2d(3, dtype=np.float64, **kwargs)
    theirs = torch.nn.BatchNorm2d(3, **kwargs).double()
    if ours.affine:
        with torch.no_grad():
            theirs.weight.copy_(t(rng.standard_normal(3)))
            theirs.bias.copy_(t(rng.standard_normal(3)))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    for step in range(3):
        x = rng.standard_normal((4, 3, 5, 6)) * (step + 1) + step
        xt = t(x).requires_grad_()
        yt = theirs(xt)
        close(ours(x), yt)
        G = rng.standard_normal(x.shape)
        yt.backward(t(G))
        close(ours.backward(G), xt.grad)
        for name, p in ours.named_parameters():
            close(p.grad, dict(theirs.named_parameters())[name].grad)
        for name, b in theirs.named_buffers():
            close(ours.state_dict()[name], b.numpy())
    ours.eval()
    theirs.eval()
    x = rng.standard_normal((2, 3, 4, 4))
    close(ours(x), theirs(t(x)))


def test_batchnorm_gradients_by_finite_differences():
    layer = nn.BatchNorm2d(3, dtype=np.float64)
    rng = np.random.default_rng(0)
    layer.weight.data[...] = rng.standard_normal(3)
    layer.bias.data[...] = rng.standard_normal(3)
    check_layer_grads(layer, rng.standard_normal((3, 3, 2, 3)))


@needs_torch
def test_batchnorm_loads_a_torch_checkpoint():
    theirs = torch.nn.BatchNorm2d(4)
    theirs.train()
    for _ in range(3):  # running statistics that are not the initial ones
        theirs(torch.randn(8, 4, 3, 3) * 2 + 1)
    ours = nn.BatchNorm2d(4)
    ours.load_state_dict(theirs.state_dict())  # torch tensors straight in
    assert int(ours.num_batches_tracked) == 3 and ours.num_batches_tracked.dtype == np.int64
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(1).standard_normal((2, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(x), theirs(t(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_batchnorm_checks():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(2)(np.zeros((1, 2, 1, 1), np.float32))
    with pytest.raises(ValueError, match="must have 2 channels"):
        nn.BatchNorm2d(2)(np.zeros((2, 3, 2, 2), np.float32))
    with pytest.raises(ValueError, match="momentum"):
        nn.BatchNorm2d(2, momentum=1.5)
    with pytest.raises(ValueError, match="eps"):
        nn.BatchNorm2d(2, eps=0)
    assert list(nn.BatchNorm2d(2, track_running_stats=False).state_dict()) == ["weight", "bias"]


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------
def test_dropout_inverted_scaling_backward_eval_and_seed():
    x = np.random.default_rng(0).standard_normal((40, 50)) + 3
    layer = nn.Dropout(0.3, rng=5)
    y = layer(x)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-15)
    # keep probability 0.7 over 2000 draws: ~ 21 standard errors of margin below
    assert abs(kept.mean() - 0.7) < 0.05
    g = np.random.default_rng(1).standard_normal(x.shape)
    np.testing.assert_allclose(layer.backward(g), np.where(kept, g / 0.7, 0), rtol=1e-15)
    np.testing.assert_array_equal(nn.Dropout(0.3, rng=5)(x), y)  # same seed, same mask
    assert not np.array_equal(nn.Dropout(0.3, rng=6)(x), y)
    layer.eval()
    assert layer(x) is x
    assert not nn.Dropout(1.0)(x).any()
    d0 = nn.Dropout(0.0)
    np.testing.assert_array_equal(d0(x), x)
    np.testing.assert_array_equal(d0.backward(g), g)
    with pytest.raises(ValueError, match="dropout probability"):
        nn.Dropout(1.5)


@needs_torch
def test_dropout_matches_torch_statistics():
    # same semantics as torch: E[y] = x, and zeros with probability p
    x = np.ones((200, 200), np.float32)
    y = nn.Dropout(0.5, rng=0)(x)
    yt = TF.dropout(t(x), 0.5, training=True).numpy()
    assert set(np.unique(y)) == set(np.unique(yt)) == {0.0, 2.0}
    assert abs(y.mean() - 1) < 0.02 and abs(yt.mean() - 1) < 0.02


# ---------------------------------------------------------------------------------------------
# average pooling
# ---------------------------------------------------------------------------------------------
def naive_avg_pool(x, k, s, p, ceil_mode, count_include_pad):
    kh, kw = (k, k) if isinstance(k, int) else k
    s = k if s is None else s
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    N, C, H, W = x.shape

    def out(size, kk, ss, pp):
        n = (size + 2 * pp - kk + (ss - 1 if ceil_mode else 0)) // ss + 1
        if ceil_mode and (n - 1) * ss >= size + pp:
            n -= 1
        return n
    P, Q = out(H, kh, sh, ph), out(W, kw, sw, pw)
    y = np.zeros((N, C, P, Q))
    for i in range(P):
        for j in range(Q):
            h0, w0 = i * sh - ph, j * sw - pw
            h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
            area = (h1 - h0) * (w1 - w0)
            hs, he, ws, we = max(h0, 0), min(h1, H), max(w0, 0), min(w1, W)
            if not count_include_pad:
                area = (he - hs) * (we - ws)
            y[:, :, i, j] = x[:, :, hs:he, ws:we].sum(axis=(2, 3)) / area
    return y


AVG_CASES = [  # kernel, stride, padding, ceil_mode, count_include_pad, H, W
    (2, None, 0, False, True, 6, 6),
    (3, 2, 1, False, True, 7, 6),
    (3, 2, 1, False, False, 7, 6),
    (3, 2, 1, True, True, 6, 8),       # ceil_mode windows past the padding
    (3, 2, 1, True, False, 6, 8),
    ((2, 3), (1, 2), (1, 1), False, False, 5, 7),
]


@needs_torch
@pytest.mark.parametrize("k,s,p,ceil,cip,H,W", AVG_CASES)
def test_avg_pool_matches_naive_torch_and_finite_differences(k, s, p, ceil, cip, H, W):
    x = np.random.default_rng(0).standard_normal((2, 3, H, W))
    y = gc.avg_pool2d(x, k, s, p, ceil, cip)
    close(y, naive_avg_pool(x, k, s, p, ceil, cip))
    xt = t(x).requires_grad_()
    yt = TF.avg_pool2d(xt, k, s, p, ceil, cip)
    close(y, yt)
    G = np.random.default_rng(1).standard_normal(y.shape)
    yt.backward(t(G))
    close(gc.avg_pool2d_backward(G, x.shape, k, s, p, ceil, cip), xt.grad)
    check_layer_grads(nn.AvgPool2d(k, s, p, ceil, cip), x)


def test_avg_pool_float32_and_errors():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    assert gc.avg_pool2d(x, 2).dtype == np.float32
    with pytest.raises(ValueError, match="padding should be at most half"):
        nn.AvgPool2d(2, padding=2)
    with pytest.raises(ValueError, match="input must be a 4-D"):
        gc.avg_pool2d(np.zeros((2, 2)), 2)


@needs_torch
@pytest.mark.parametrize("size,H,W", [(1, 7, 10), ((2, 3), 7, 10), ((3, None), 7, 10),
                                      (5, 7, 10), ((4, 4), 4, 4)])
def test_adaptive_avg_pool_matches_torch(size, H, W):
    x = np.random.default_rng(0).standard_normal((2, 3, H, W))
    layer = nn.AdaptiveAvgPool2d(size)
    xt = t(x).requires_grad_()
    yt = TF.adaptive_avg_pool2d(xt, size)
    close(layer(x), yt)
    G = np.random.default_rng(1).standard_normal(yt.shape)
    yt.backward(t(G))
    close(layer.backward(G), xt.grad)
    check_layer_grads(layer, x)


# ---------------------------------------------------------------------------------------------
# Identity, ModuleList, Residual
# ---------------------------------------------------------------------------------------------
def test_identity_and_module_list():
    x = np.ones((2, 3))
    assert nn.Identity()(x) is x and nn.Identity().backward(x) is x
    layers = nn.ModuleList([nn.Linear(3, 4, rng=0), nn.ReLU()])
    layers.append(nn.Linear(4, 2, rng=1))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = layers
            self._view = [layers[0]]  # private names are the owner's business

    net = Net()
    with pytest.raises(TypeError, match="use gpuconv.nn.ModuleList"):
        net.plain = [nn.Linear(2, 2)]  # torch would silently register nothing
    assert [n for n, _ in net.named_parameters()] == ["blocks.0.weight", "blocks.0.bias",
                                                      "blocks.2.weight", "blocks.2.bias"]
    assert len(layers) == 3 and layers[-1].out_features == 2 and len(layers[:2]) == 2
    layers[1] = nn.Tanh()
    assert isinstance(list(layers)[1], nn.Tanh)
    with pytest.raises(TypeError, match="takes Modules"):
        layers.append(lambda v: v)
    with pytest.raises(NotImplementedError, match="no forward"):
        layers(x)


def test_residual_gradients_with_identity_and_projection_shortcuts():
    rng = np.random.default_rng(0)
    body = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, dtype=np.float64, rng=rng), nn.Tanh(),
                         nn.Conv2d(2, 2, 3, padding=1, dtype=np.float64, rng=rng))
    block = nn.Residual(body)
    x = rng.standard_normal((2, 2, 4, 5))
    with gc.no_grad():
        np.testing.assert_allclose(block(x), body(x) + x, rtol=1e-14)
    check_layer_grads(block, x)
    down = nn.Residual(
        nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dtype=np.float64, rng=rng),
                      nn.BatchNorm2d(3, dtype=np.float64)),
        nn.Conv2d(2, 3, 1, stride=2, dtype=np.float64, rng=rng))
    check_layer_grads(down, x)
    with pytest.raises(ValueError, match="the body gives shape"):
        nn.Residual(nn.Conv2d(2, 3, 1, dtype=np.float64))(x)
    with pytest.raises(TypeError, match="body must be a Module"):
        nn.Residual(lambda v: v)


# ---------------------------------------------------------------------------------------------
# PyTorch's edge cases
# ---------------------------------------------------------------------------------------------
EMPTY_LAYERS = [
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dtype=np.float64),
     lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), (0, 3, 7, 6)),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1, dtype=np.float64),
     lambda: torch.nn.ConvTranspose2d(3, 4, 3, stride=2, output_padding=1), (0, 3, 4, 5)),
    (lambda: nn.MaxPool2d(3, 2, 1), lambda: torch.nn.MaxPool2d(3, 2, 1), (0, 3, 7, 6)),
    (lambda: nn.AvgPool2d(3, 2, 1), lambda: torch.nn.AvgPool2d(3, 2, 1), (0, 3, 7, 6)),
    (lambda: nn.AdaptiveAvgPool2d(2), lambda: torch.nn.AdaptiveAvgPool2d(2), (0, 3, 7, 6)),
    (lambda: nn.BatchNorm2d(3, dtype=np.float64), lambda: torch.nn.BatchNorm2d(3),
     (0, 3, 4, 4)),
    (lambda: nn.Flatten(), lambda: torch.nn.Flatten(), (0, 3, 4, 4)),
    (lambda: nn.Linear(5, 2, dtype=np.float64), lambda: torch.nn.Linear(5, 2), (0, 5)),
    (lambda: nn.ReLU(), lambda: torch.nn.ReLU(), (0, 3, 2, 2)),
    (lambda: nn.Dropout(0.5), lambda: torch.nn.Dropout(0.5), (0, 3)),
]


@needs_torch
@pytest.mark.parametrize("ours,theirs,shape", EMPTY_LAYERS)
def test_batch_of_zero_flows_through_every_layer(ours, theirs, shape):
    layer, ref = ours(), theirs().double()
    y = layer(np.zeros(shape))
    xt = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    yt = ref(xt)
    assert y.shape == tuple(yt.shape) and y.dtype == np.float64
    yt.sum().backward()
    dx = layer.backward(np.zeros(y.shape))
    assert dx.shape == shape == tuple(xt.grad.shape)
    for name, p in layer.named_parameters():
        assert p.grad.shape == p.shape and not p.grad.any()


@needs_torch
def test_batch_of_zero_in_the_functional_ops_and_the_loss():
    x0, w = np.zeros((0, 3, 6, 6)), np.ones((4, 3, 3, 3))
    assert gc.conv2d(x0, w, np.ones(4)).shape == (0, 4, 4, 4)
    assert gc.conv2d_grad_input((0, 3, 6, 6), w, np.zeros((0, 4, 4, 4))).shape == x0.shape
    gw = gc.conv2d_grad_weight(x0, w.shape, np.zeros((0, 4, 4, 4)))
    assert gw.shape == w.shape and not gw.any()
    y, idx = gc.max_pool2d(x0, 2, return_indices=True)
    assert y.shape == idx.shape == (0, 3, 3, 3) and idx.dtype == np.int64
    assert gc.max_pool2d_backward(y, idx, x0.shape, 2).shape == x0.shape
    assert gc.avg_pool2d_backward(np.zeros((0, 3, 3, 3)), x0.shape, 2).shape == x0.shape
    with pytest.raises(ValueError, match="weight has 2 input channels"):
        gc.conv2d(x0, np.ones((4, 2, 3, 3)))  # still validated
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(np.zeros((0, 5)), np.zeros(0, np.int64))
    lt = TF.cross_entropy(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, dtype=torch.long))
    assert loss.shape == () and math.isnan(float(loss)) and math.isnan(lt.item())
    assert loss_fn.backward().shape == (0, 5)


def test_batch_of_zero_makes_no_engine_call(monkeypatch):
    """The functional ops answer a batch of 0 themselves (so no engine sees one, and the CUDA
    engine launches no grid of 0): empty results of the input's dtype, zeros for dL/dw."""
    from gpuconv.engines import numpy_engine
    for op in ("conv_fprop", "conv_dgrad", "conv_wgrad", "pool_fprop", "pool_dgrad"):
        monkeypatch.setattr(numpy_engine, op, lambda *a, op=op: pytest.fail(f"{op} was called"))
    x0, w = np.zeros((0, 4, 7, 6), np.float32), np.ones((6, 2, 3, 3), np.float32)
    args = dict(stride=2, padding=1, groups=2)
    y = gc.conv2d(x0, w, np.ones(6, np.float32), **args)
    assert y.shape == (0, 6, 4, 3) and y.dtype == np.float32
    assert gc.conv2d_grad_input(x0.shape, w, y, **args).shape == x0.shape
    gw = gc.conv2d_grad_weight(x0, w.shape, y, **args)
    assert gw.shape == w.shape and gw.dtype == np.float32 and not gw.any()
    wt = np.ones((4, 3, 3, 3), np.float32)  # transposed: (C_in, C_out // groups, kH, kW)
    targs = dict(stride=2, output_padding=1, groups=2)
    yt = gc.conv_transpose2d(x0, wt, None, **targs)
    assert yt.shape == (0, 6, 16, 14) and yt.dtype == np.float32
    assert gc.conv_transpose2d_grad_input(x0.shape, wt, yt, **targs).shape == x0.shape
    gwt = gc.conv_transpose2d_grad_weight(x0, wt.shape, yt, **targs)
    assert gwt.shape == wt.shape and not gwt.any()
    p, idx = gc.max_pool2d(x0, 3, 2, 1, return_indices=True)
    assert p.shape == idx.shape == (0, 4, 4, 3) and p.dtype == np.float32
    assert gc.max_pool2d_backward(p, idx, x0.shape, 3, 2, 1).shape == x0.shape
    with pytest.raises(ValueError, match=r"grad_output must have shape \(0, 6, 4, 3\)"):
        gc.conv2d_grad_weight(x0, w.shape, np.zeros((1, 6, 4, 3), np.float32), **args)


def test_activations_on_0d_arrays_return_0d_arrays_and_chain():
    x = np.array(0.3)
    for f in (gc.relu, gc.sigmoid, gc.tanh, gc.elu, gc.leaky_relu):
        y = f(x)
        assert isinstance(y, np.ndarray) and y.shape == ()
    y = gc.relu(gc.tanh(gc.sigmoid(x)))
    np.testing.assert_allclose(y, np.tanh(1 / (1 + np.exp(-0.3))), rtol=1e-15)
    g = np.array(2.0)
    for dx in (gc.relu_backward(x, g), gc.sigmoid_backward(x, g), gc.tanh_backward(x, g),
               gc.elu_backward(x, x, g), gc.leaky_relu_backward(x, g)):
        assert isinstance(dx, np.ndarray) and dx.shape == ()
    for layer in (nn.ReLU(), nn.Sigmoid(), nn.Tanh(), nn.ELU(), nn.LeakyReLU()):
        assert layer(x).shape == () and layer.backward(g).shape == ()


@needs_torch
@pytest.mark.parametrize("name,ours,alpha", [("relu", nn.ReLU, None), ("elu", nn.ELU, 1.0),
                                             ("elu", nn.ELU, 0.5),
                                             ("leaky_relu", nn.LeakyReLU, 0.1)])
def test_gradients_at_nan_and_kinks_are_torchs(name, ours, alpha):
    x = np.array([np.nan, -2.0, -0.0, 0.0, 1.5, np.nan])
    g = np.array([3.0, 1.0, 2.0, 5.0, 7.0, -1.0])
    xt = t(x).requires_grad_()
    fn = {"relu": TF.relu, "elu": lambda v: TF.elu(v, alpha),
          "leaky_relu": lambda v: TF.leaky_relu(v, alpha)}[name]
    fn(xt).backward(t(g))
    layer = ours() if alpha is None else ours(alpha)
    layer(x)
    np.testing.assert_array_equal(layer.backward(g), xt.grad.numpy())
    if name == "relu":
        np.testing.assert_array_equal(gc.relu_backward(x, g), xt.grad.numpy())
    if name == "elu":
        np.testing.assert_array_equal(gc.elu_backward(x, gc.elu(x, alpha), g, alpha),
                                      xt.grad.numpy())


def test_wrong_shaped_gradients_get_clear_errors():
    flat = nn.Flatten()
    flat(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(2, 12\), got \(2, 11\)"):
        flat.backward(np.zeros((2, 11)))
    loss_fn = nn.CrossEntropyLoss()
    for bad in (np.ones(3), np.ones((2, 1)), "1.0", np.array(1, np.int64)):
        loss_fn(np.zeros((2, 3)), np.array([0, 1]))
        with pytest.raises(ValueError, match="grad_output must be a real number or a 0-d"):
            loss_fn.backward(bad)
    loss_fn(np.zeros((2, 3)), np.array([0, 1]))
    np.testing.assert_allclose(loss_fn.backward(np.array(2.0)).sum(axis=1), 0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# GPU: the new layers on CuPy arrays give the CPU's results
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_new_layers_on_gpu_match_cpu(cp):
    def net(seed):
        rng = np.random.default_rng(seed)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, dtype=np.float64, rng=rng), nn.BatchNorm2d(4, dtype=np.float64),
            nn.ReLU(), nn.ConvTranspose2d(4, 3, 3, stride=2, output_padding=1, dtype=np.float64, rng=rng),
            nn.AvgPool2d(3, 2, 1, ceil_mode=True), nn.Residual(nn.Identity()),
            nn.Dropout(0.3, rng=seed), nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(),
            nn.Linear(18, 5, dtype=np.float64, rng=rng))
    cpu, gpu = net(3), net(3).to("cuda")
    x = np.random.default_rng(1).standard_normal((3, 2, 6, 6))
    g = np.random.default_rng(2).standard_normal((3, 5))
    y_c, y_g = cpu(x), gpu(cp.asarray(x))
    np.testing.assert_allclose(y_g.get(), y_c, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(gpu.backward(cp.asarray(g)).get(), cpu.backward(g), rtol=1e-8,
                               atol=1e-12)
    for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
        np.testing.assert_allclose(pg.grad.get(), pc.grad, rtol=1e-8, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(gpu[1].running_var.get(), cpu[1].running_var, rtol=1e-10)
    e = cp.zeros((0, 2, 6, 6))
    assert gpu.eval()(e).shape == (0, 5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_functional_transpose_and_avg_pool_on_gpu_match_cpu(cp, dtype, tol):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 4)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype)
    args = (2, 1, 1, 2, 1)  # stride, padding, output_padding, groups, dilation
    y = gc.conv_transpose2d(x, w, b, *args)
    yg = gc.conv_transpose2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), *args)
    np.testing.assert_allclose(yg.get(), y, rtol=tol, atol=tol)
    g = rng.standard_normal(y.shape).astype(dtype)
    np.testing.assert_allclose(
        gc.conv_transpose2d_grad_input(x.shape, cp.asarray(w), cp.asarray(g), *args).get(),
        gc.conv_transpose2d_grad_input(x.shape, w, g, *args), rtol=tol, atol=tol)
    np.testing.assert_allclose(
        gc.conv_transpose2d_grad_weight(cp.asarray(x), w.shape, cp.asarray(g), *args).get(),
        gc.conv_transpose2d_grad_weight(x, w.shape, g, *args), rtol=tol, atol=tol)
    p = gc.avg_pool2d(x, 3, 2, 1, True, False)
    np.testing.assert_allclose(gc.avg_pool2d(cp.asarray(x), 3, 2, 1, True, False).get(), p,
                               rtol=tol, atol=tol)
    gp = rng.standard_normal(p.shape).astype(dtype)
    np.testing.assert_allclose(
        gc.avg_pool2d_backward(cp.asarray(gp), x.shape, 3, 2, 1, True, False).get(),
        gc.avg_pool2d_backward(gp, x.shape, 3, 2, 1, True, False), rtol=tol, atol=tol)
    xn = cp.asarray(np.array([np.nan, -1.0, 2.0], dtype))
    np.testing.assert_array_equal(gc.relu_backward(xn, cp.ones(3, dtype)).get(), [1, 0, 1])
