"""channels_last ("nhwc") as a memory format, as PyTorch has it, on the NumPy engine and the
layers: logical NCHW shapes, channels_last strides in -> channels_last results out, equal to the
NCHW results (and to torch's channels_last results), no transposition inside the ops."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv._arrays import conv_format, memory_format, to_format

from .naive import central_difference
from .problems import IDS, PROBLEMS

rng = np.random.default_rng(12)


def cl(a):
    return to_format(a, "nhwc")


def assert_dense(a, fmt):
    """a's memory is dense in `fmt` (and named so, where C and H*W make the format unambiguous)."""
    phys = a.transpose(0, 2, 3, 1) if fmt == "nhwc" else a
    assert phys.flags.c_contiguous, (fmt, a.shape, a.strides)
    if a.shape[1] > 1 and a.shape[2] * a.shape[3] > 1 and a.size:
        assert memory_format(a) == fmt, (fmt, a.shape, a.strides)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_conv_channels_last_matches_nchw(case):
    _, xs, ws, kw = case
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    b = rng.standard_normal(ws[0])
    y0 = gc.conv2d(x, w, b, **kw)
    for xin, win in ((cl(x), w), (x, cl(w)), (cl(x), cl(w))):
        y = gc.conv2d(xin, win, b, **kw)
        assert_dense(y, conv_format(xin, win))
        np.testing.assert_allclose(y, y0, rtol=1e-11, atol=1e-11)
    dy = rng.standard_normal(y0.shape)
    dx0 = gc.conv2d_grad_input(xs, w, dy, **kw)
    dx = gc.conv2d_grad_input(xs, w, cl(dy), **kw)
    assert_dense(dx, memory_format(cl(dy)))
    np.testing.assert_allclose(dx, dx0, rtol=1e-11, atol=1e-11)
    dw0 = gc.conv2d_grad_weight(x, ws, dy, **kw)
    dw = gc.conv2d_grad_weight(cl(x), ws, cl(dy), **kw)
    assert_dense(dw, "nhwc")
    np.testing.assert_allclose(dw, dw0, rtol=1e-11, atol=1e-11)


def test_memory_format_follows_pytorch_rule():
    torch = pytest.importorskip("torch")
    shapes = [(2, 3, 4, 5), (2, 1, 4, 5), (2, 3, 1, 1), (1, 3, 4, 4), (2, 3, 1, 4), (1, 1, 1, 1)]
    for shape in shapes:
        for t in (torch.empty(shape), torch.empty(shape, memory_format=torch.channels_last),
                  torch.empty(shape).contiguous(memory_format=torch.channels_last),
                  torch.empty(shape[:1] + shape[2:] + shape[1:2]).permute(0, 3, 1, 2),
                  torch.empty(shape).transpose(2, 3)):
            ours = memory_format(t.normal_().numpy())
            # torch's decision (suggest_memory_format, not exposed) as its conv output's strides
            y = torch.nn.functional.conv2d(t, torch.ones(2, shape[1], 1, 1))
            n, c, h, w = y.shape
            theirs = "nhwc" if y.stride() == (h * w * c, 1, w * c, c) else "nchw"
            assert ours == theirs, (shape, t.stride())
    assert memory_format(np.empty((0, 3, 4, 4)).transpose(0, 1, 3, 2)) == "nchw"


def test_conv_channels_last_matches_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = rng.standard_normal((2, 6, 9, 8)), rng.standard_normal((4, 3, 3, 3)), \
        rng.standard_normal(4)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    for xf, wf in ((True, False), (False, True), (True, True)):
        xa, wa = (cl(x) if xf else x), (cl(w) if wf else w)
        xt = torch.from_numpy(xa).requires_grad_()
        wt = torch.from_numpy(wa).requires_grad_()
        yt = F.conv2d(xt, wt, torch.from_numpy(b), **kw)
        y = gc.conv2d(xa, wa, b, **kw)
        assert memory_format(y) == "nhwc" and yt.is_contiguous(memory_format=torch.channels_last)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        dy = cl(rng.standard_normal(y.shape))
        gi, gw, _ = torch.ops.aten.convolution_backward(
            torch.from_numpy(dy), xt, wt, None, (2, 2), (1, 1), (1, 1), False, (0, 0), 2,
            (True, True, False))
        dx = gc.conv2d_grad_input(x.shape, wa, dy, **kw)
        dw = gc.conv2d_grad_weight(xa, w.shape, dy, **kw)
        assert gi.is_contiguous(memory_format=torch.channels_last)
        assert gw.is_contiguous(memory_format=torch.channels_last)
        assert_dense(dx, "nhwc")
        assert_dense(dw, "nhwc")
        np.testing.assert_allclose(dx, gi.detach().numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, gw.detach().numpy(), rtol=1e-12, atol=1e-12)


def test_conv_channels_last_finite_differences():
    x, w = cl(rng.standard_normal((1, 3, 5, 5))), rng.standard_normal((2, 3, 3, 3))
    kw = dict(stride=2, padding=1, dilation=1)
    g = cl(rng.standard_normal(gc.conv2d(x, w, **kw).shape))

    xa, wa = np.ascontiguousarray(x), w.copy()  # perturbed in place by central_difference
    dx, dw = gc.conv2d_grad_input(x.shape, w, g, **kw), gc.conv2d_grad_weight(x, w.shape, g, **kw)
    assert_dense(dx, "nhwc")
    assert_dense(dw, "nhwc")
    np.testing.assert_allclose(
        dx, central_difference(lambda: float((gc.conv2d(cl(xa), w, **kw) * g).sum()), xa),
        rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        dw, central_difference(lambda: float((gc.conv2d(x, wa, **kw) * g).sum()), wa),
        rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kw", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1,
                                                          ceil_mode=True),
                                dict(kernel_size=3, stride=1, dilation=2, padding=1)])
def test_max_pool_channels_last(kw):
    x = rng.standard_normal((2, 3, 7, 8))
    x[0, 1, 2, 3] = np.nan
    x[1, 2] = -np.inf  # a plane of -inf: windows over padding credit an inside element
    y0, i0 = gc.max_pool2d(x, return_indices=True, **kw)
    y, i = gc.max_pool2d(cl(x), return_indices=True, **kw)
    assert_dense(y, "nhwc")
    assert_dense(i, "nhwc")
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(i, i0)
    dy = rng.standard_normal(y0.shape)
    dx = gc.max_pool2d_backward(cl(dy), i, x.shape, **kw)
    assert_dense(dx, "nhwc")
    np.testing.assert_array_equal(dx, gc.max_pool2d_backward(dy, i0, x.shape, **kw))


def test_activations_keep_channels_last():
    x = cl(rng.standard_normal((2, 3, 4, 5)))
    x[0, 0, 0, 0] = np.nan
    dy = rng.standard_normal(x.shape)  # NCHW: converted to x's format
    for f, g in ((gc.relu, lambda: gc.relu_backward(x, dy)),
                 (gc.leaky_relu, lambda: gc.leaky_relu_backward(x, dy)),
                 (gc.sigmoid, lambda: gc.sigmoid_backward(gc.sigmoid(x), dy)),
                 (gc.tanh, lambda: gc.tanh_backward(gc.tanh(x), dy)),
                 (gc.elu, lambda: gc.elu_backward(x, gc.elu(x), dy))):
        y = f(x)
        assert_dense(y, "nhwc")
        np.testing.assert_array_equal(y, f(np.ascontiguousarray(x)))
        assert_dense(g(), "nhwc")


def test_layer_chain_trains_a_step_in_channels_last():
    def net():
        return gc.nn.Sequential(gc.nn.Conv2d(3, 4, 3, padding=1, rng=1, dtype=np.float64),
                                gc.nn.ReLU(), gc.nn.MaxPool2d(2),
                                gc.nn.Conv2d(4, 6, 3, stride=2, groups=2, rng=2,
                                             dtype=np.float64),
                                gc.nn.Tanh(), gc.nn.Flatten(), gc.nn.Linear(6, 5, rng=3,
                                                                           dtype=np.float64))
    x = rng.standard_normal((4, 3, 8, 8))
    labels = np.array([0, 1, 4, 2])
    results = []
    for xin in (x, cl(x)):
        model, loss = net(), gc.nn.CrossEntropyLoss()
        opt = gc.optim.SGD(model.parameters(), lr=0.1)
        with gc.no_grad():
            h = xin
            for layer in list(model)[:5]:
                h = layer(h)
                assert_dense(h, memory_format(xin))  # every 4-D activation keeps the format
        out = model(xin)
        value = loss(out, labels)
        model.zero_grad()
        gx = model.backward(loss.backward())
        assert_dense(gx, memory_format(xin))
        opt.step()
        results.append((value, out, gx, [p.data.copy() for p in model.parameters()]))
    (l0, o0, g0, p0), (l1, o1, g1, p1) = results
    np.testing.assert_allclose(l1, l0, rtol=1e-12)
    np.testing.assert_allclose(o1, o0, rtol=1e-12, atol=1e-12)  # Flatten: PyTorch's order
    np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-12)
    for a, b in zip(p0, p1):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)


def test_gpuconv_torch_channels_last():
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("gpuconv.torch")
    from torch._subclasses.fake_tensor import FakeTensorMode
    cl = torch.channels_last
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64).contiguous(memory_format=cl)
    ours, ref = gt.Conv2d(4, 6, 3, stride=2, padding=1).double(), \
        torch.nn.Conv2d(4, 6, 3, stride=2, padding=1).double()
    ref.load_state_dict(ours.state_dict())
    results = []
    for m, pool in ((ours, gt.MaxPool2d(2)), (ref, torch.nn.MaxPool2d(2))):
        xi = x.clone().requires_grad_()
        y = pool(m(xi))
        y.backward(torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator()
                               .manual_seed(1)))  # an NCHW grad_output, as from a flatten
        assert y.is_contiguous(memory_format=cl) and xi.grad.is_contiguous(memory_format=cl)
        results.append((y.detach(), xi.grad, m.weight.grad))
    for a, b in zip(*results):
        assert a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the fake kernels report the strides the real ones give
    args = ([2, 2], [1, 1], [1, 1], 1, False)
    w = ours.weight.detach()
    real = torch.ops.gpuconv.conv2d(x, w, None, *args)
    mode = FakeTensorMode()
    fx, fw = mode.from_tensor(x), mode.from_tensor(w)
    with mode:
        fake = torch.ops.gpuconv.conv2d(fx, fw, None, *args)
    assert fake.stride() == real.stride() and real.is_contiguous(memory_format=cl)
    torch.library.opcheck(torch.ops.gpuconv.conv2d, (x, w, None) + args)


def test_gpuconv_torch_channels_last_compiles():
    """torch.compile (aot_eager, fullgraph) through the fake kernels: the same strides and values
    as eager, forward and backward."""
    torch = pytest.importorskip("torch")
    gt = pytest.importorskip("gpuconv.torch")
    torch.manual_seed(2)
    m = torch.nn.Sequential(gt.Conv2d(3, 4, 3, padding=1).double(), gt.MaxPool2d(2),
                            torch.nn.ReLU(), gt.Conv2d(4, 5, 3, stride=2).double())
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    y0 = m(x)
    y0.sum().backward()
    g0, x.grad = x.grad, None
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y.sum().backward()
    assert y.stride() == y0.stride() and y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.stride() == g0.stride() and g0.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, g0, rtol=0, atol=0)


DW_CASES = [  # depthwise problems for the blocked NHWC tap loops (flat rows: stride_w 1, Kg 1)
    ("dw_s1_pad", (3, 5, 9, 7), (5, 1, 3, 3), dict(padding=1, groups=5)),
    ("dw_s2_dil", (2, 4, 11, 10), (4, 1, 3, 2), dict(stride=2, padding=(2, 1), dilation=(2, 1),
                                                     groups=4)),
    ("dw_mult2_sw2", (2, 3, 8, 9), (6, 1, 3, 3), dict(stride=(1, 2), padding=1, groups=3)),
    ("dw_mult2_s1", (2, 3, 7, 6), (6, 1, 2, 3), dict(padding=(1, 0), groups=3)),
]


@pytest.mark.parametrize("block", (1, 200, 10 ** 6), ids=("row", "rows", "images"))
@pytest.mark.parametrize("case", DW_CASES, ids=[c[0] for c in DW_CASES])
def test_depthwise_nhwc_blocks(case, block, monkeypatch):
    """Depthwise fprop and dgrad in cache-sized blocks of output rows (one row, a few rows of
    one image, several whole images): the NCHW results in every blocking."""
    from gpuconv.engines import numpy_nhwc
    monkeypatch.setattr(numpy_nhwc, "DW_BLOCK_BYTES", block)
    _, xs, ws, kw = case
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    y0 = gc.conv2d(x, w, **kw)
    y = gc.conv2d(cl(x), w, **kw)
    assert_dense(y, "nhwc")
    np.testing.assert_allclose(y, y0, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y0.shape)
    dx = gc.conv2d_grad_input(xs, w, cl(dy), **kw)
    assert_dense(dx, "nhwc")
    np.testing.assert_allclose(dx, gc.conv2d_grad_input(xs, w, dy, **kw), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("limit", (0, 10 ** 9), ids=("mirrored_fprop", "col2im"))
@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_nhwc_dgrad_both_paths(case, limit, monkeypatch):
    """Stride-1 NHWC dgrad by either route (the mirrored-kernel fprop, or the channel
    contraction + col2im that small-C layers take) on every shared problem."""
    from gpuconv.engines import numpy_nhwc
    monkeypatch.setattr(numpy_nhwc, "NHWC_DGRAD_COL2IM_CG", limit)
    _, xs, ws, kw = case
    w = rng.standard_normal(ws)
    dy = rng.standard_normal(gc.conv2d(rng.standard_normal(xs), w, **kw).shape)
    dx = gc.conv2d_grad_input(xs, w, cl(dy), **kw)
    assert_dense(dx, memory_format(cl(dy)))
    np.testing.assert_allclose(dx, gc.conv2d_grad_input(xs, w, dy, **kw), rtol=1e-11, atol=1e-11)


def _torch_fmt(t, torch):
    return "nhwc" if t.is_contiguous(memory_format=torch.channels_last) and \
        not t.is_contiguous() else "nchw"


@pytest.mark.parametrize("kw", (dict(stride=2, padding=1, output_padding=1, groups=2),
                                dict(stride=1, padding=0, dilation=3, output_padding=1)),
                         ids=("s2_groups", "dil3_outpad"))
def test_conv_transpose_channels_last_matches_torch(kw):
    """conv_transpose2d and its two gradients: the format and values of torch's, for a
    channels_last input, weight or both (the dilated case grows its input by output_padding)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = rng.standard_normal((2, 4, 5, 6)), rng.standard_normal((4, 3, 3, 2)), \
        rng.standard_normal(3 * kw.get("groups", 1))
    for xf, wf in ((True, False), (False, True), (True, True)):
        xa, wa = (cl(x) if xf else x), (cl(w) if wf else w)
        xt = torch.from_numpy(xa).requires_grad_()
        wt = torch.from_numpy(wa).requires_grad_()
        yt = F.conv_transpose2d(xt, wt, torch.from_numpy(b), **kw)
        y = gc.conv_transpose2d(xa, wa, b, **kw)
        assert memory_format(y) == _torch_fmt(yt, torch) == "nhwc"
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        dy = cl(rng.standard_normal(y.shape))
        gi, gw = torch.autograd.grad(yt, (xt, wt), torch.from_numpy(dy))
        dx = gc.conv_transpose2d_grad_input(x.shape, wa, dy, **kw)
        dw = gc.conv_transpose2d_grad_weight(xa, w.shape, dy, **kw)
        assert_dense(dx, _torch_fmt(gi, torch))
        assert_dense(dw, _torch_fmt(gw, torch))
        np.testing.assert_allclose(dx, gi.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dw, gw.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args", ((3, 2, 1, False, True), (2, 2, 0, True, False),
                                  ((3, 2), (2, 1), (1, 0), True, False)))
def test_avg_pool_channels_last_matches_torch(args):
    torch = pytest.importorskip("torch")
    x = cl(rng.standard_normal((2, 3, 7, 8)))
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.avg_pool2d(xt, *args)
    y = gc.avg_pool2d(x, *args)
    assert_dense(y, "nhwc")
    assert _torch_fmt(yt, torch) == "nhwc"
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    dy = cl(rng.standard_normal(y.shape))
    (gt,) = torch.autograd.grad(yt, (xt,), torch.from_numpy(dy))
    dx = gc.avg_pool2d_backward(dy, x.shape, *args)
    assert_dense(dx, "nhwc")
    np.testing.assert_allclose(dx, gt.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("out", ((2, 3), 1, (None, 2)))
def test_adaptive_avg_pool_and_dropout_keep_channels_last(out):
    """AdaptiveAvgPool2d and Dropout give channels_last for channels_last (as torch), with the
    NCHW values (Dropout: the same mask from the same seed)."""
    x0 = rng.standard_normal((3, 5, 7, 6))
    x = cl(x0)
    pool, pool0 = gc.nn.AdaptiveAvgPool2d(out), gc.nn.AdaptiveAvgPool2d(out)
    y, y0 = pool(x), pool0(x0)
    assert_dense(y, "nhwc")
    np.testing.assert_allclose(y, y0, rtol=1e-13, atol=1e-13)
    g0 = rng.standard_normal(y0.shape)
    dx, dx0 = pool.backward(cl(g0)), pool0.backward(g0)
    assert_dense(dx, "nhwc")
    np.testing.assert_allclose(dx, dx0, rtol=1e-13, atol=1e-13)
    drop, drop0 = gc.nn.Dropout(0.4, rng=3), gc.nn.Dropout(0.4, rng=3)
    z, z0 = drop(x), drop0(x0)
    assert_dense(z, "nhwc")
    np.testing.assert_array_equal(z, z0)
    dz = drop.backward(cl(x0))
    assert_dense(dz, "nhwc")
    np.testing.assert_array_equal(dz, drop0.backward(x0))
