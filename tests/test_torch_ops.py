"""gpuconv.torch's custom operators against PyTorch's own ops, finite differences and opcheck.

Every test runs on CPU tensors here and on CUDA tensors where a GPU exists (the `gpu` marker).
"""
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="gpuconv.torch needs PyTorch (pip install torch)")

import gpuconv  # noqa: E402
import gpuconv.torch as gt  # noqa: E402
from gpuconv.torch import _ops  # noqa: E402

F = torch.nn.functional
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# PyTorch's own note on its (reference) 'same' padding with even kernels
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


@pytest.fixture(autouse=True)
def exact_torch_reference():
    """PyTorch's cuDNN convolutions default to TF32 for float32; the reference must not."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

# (x shape, weight shape, stride, padding, dilation, groups): stride, padding (int, pair,
# 'same' with an even kernel = asymmetric, 'valid'), dilation, groups (depthwise too), odd sizes
CONV_CASES = [
    ((2, 3, 7, 6), (4, 3, 3, 3), 1, 0, 1, 1),
    ((2, 4, 9, 8), (6, 2, 3, 2), (2, 3), (1, 2), (2, 1), 2),
    ((1, 3, 8, 7), (5, 3, 2, 4), 1, "same", (1, 2), 1),
    ((2, 6, 7, 7), (6, 1, 3, 3), 2, 1, 1, 6),
    ((2, 4, 5, 6), (4, 4, 1, 1), 2, "valid", 1, 1),
]
POOL_CASES = [  # (x shape, kernel, stride, padding, dilation, ceil_mode)
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((2, 3, 9, 7), 3, 2, 1, 1, True),
    ((1, 2, 11, 10), (3, 2), (2, 1), (1, 0), (2, 1), True),
    ((2, 2, 7, 9), 2, 3, 1, 2, False),
]


def _rand(shape, dtype=torch.float64, device="cpu", grad=True):
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(grad)


def _conv_inputs(case, device, dtype=torch.float64, bias=True):
    xs, ws, *_ = case
    b = _rand((ws[0],), dtype, device) if bias else None
    return _rand(xs, dtype, device), _rand(ws, dtype, device), b


# ---------------------------------------------------------------------------------------------
# the package boundary
# ---------------------------------------------------------------------------------------------
def test_import_gpuconv_never_imports_torch():
    code = "import gpuconv, sys; assert 'torch' not in sys.modules, 'gpuconv imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_torch_inside_gpuconv_torch_is_pytorch():
    for mod in (_ops, gt.functional, gt.modules):
        assert mod.torch is sys.modules["torch"] and hasattr(mod.torch, "nn")
    assert torch.ops.gpuconv.conv2d.default._schema.name == "gpuconv::conv2d"


# ---------------------------------------------------------------------------------------------
# values and gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_matches_torch_and_finite_differences(case, bias, device):
    torch.manual_seed(0)
    x, w, b = _conv_inputs(case, device, bias=bias)
    args = case[2:]
    y = gt.conv2d(x, w, b, *args)
    ref = F.conv2d(x, w, b, *args)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(ref)
    inputs = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(y, inputs, gy)
    want = torch.autograd.grad(ref, inputs, gy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)
    # full Jacobians with the bias; without it, gradcheck's fast mode (random projections of
    # the Jacobian against finite differences) keeps the second half of the cases cheap
    assert torch.autograd.gradcheck(
        lambda x, w, *b: gt.conv2d(x, w, b[0] if b else None, *args), inputs,
        fast_mode=not bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [((1, 4, 5, 4), (2, 2, 3, 2), 2, (1, 0), (1, 2), 2),
                                  ((1, 2, 4, 5), (2, 2, 2, 3), 1, "same", 1, 1)])
def test_conv2d_double_backward(case, device):
    """The gradient ops have gradients too: each is again one of the three convolutions.
    (Small shapes: gradgradcheck differentiates numerically through every input twice.)"""
    torch.manual_seed(1)
    x, w, b = _conv_inputs(case, device)
    assert torch.autograd.gradgradcheck(lambda x, w, b: gt.conv2d(x, w, b, *case[2:]),
                                        (x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_max_pool2d_double_backward(device):
    torch.manual_seed(1)
    x = _rand((1, 2, 7, 6), device=device)
    assert torch.autograd.gradgradcheck(lambda x: gt.max_pool2d(x, 3, 2, 1, (1, 2), True), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_float32_and_unbatched(device):
    torch.manual_seed(2)
    x, w, b = _conv_inputs(CONV_CASES[1], device, torch.float32)
    torch.testing.assert_close(gt.conv2d(x, w, b, *CONV_CASES[1][2:]),
                               F.conv2d(x, w, b, *CONV_CASES[1][2:]), rtol=1e-4, atol=1e-4)
    y = gt.conv2d(x[0], w, b, *CONV_CASES[1][2:])  # (C, H, W) as torch accepts it
    torch.testing.assert_close(y, F.conv2d(x[0], w, b, *CONV_CASES[1][2:]), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "expanded_grad"])
def test_conv2d_layouts(layout, device):
    """channels_last and non-contiguous inputs (and the stride-0 gradient of y.sum())."""
    torch.manual_seed(3)
    x, w, b = _conv_inputs(((2, 4, 12, 10), (6, 2, 3, 3)), device)
    if layout == "channels_last":
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
    elif layout == "sliced":
        x = x.detach()[:, :, 1::2, ::1].requires_grad_()
    elif layout == "transposed":
        x = x.detach().transpose(2, 3).requires_grad_()
    assert layout == "expanded_grad" or not x.is_contiguous()
    args = (2, 1, 1, 2)
    y, ref = gt.conv2d(x, w, b, *args), F.conv2d(x, w, b, *args)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    loss, ref_loss = (y.sum(), ref.sum()) if layout == "expanded_grad" else \
        ((y * y).sum(), (ref * ref).sum())
    for g, r in zip(torch.autograd.grad(loss, (x, w, b)), torch.autograd.grad(ref_loss,
                                                                             (x, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-11, atol=1e-11)


def test_cpu_contiguous_and_channels_last_are_not_copied(monkeypatch):
    """The NumPy engine receives views of the tensors' own memory, and its result becomes the
    output tensor as it is (no copy by the bridge either way)."""
    seen = []
    real = gpuconv.functional.conv2d

    def spy(x, w, *a, **k):
        y = real(x, w, *a, **k)
        seen.append((x.__array_interface__["data"][0], x.strides, y.ctypes.data))
        return y

    monkeypatch.setattr(gpuconv.functional, "conv2d", spy)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    for x in (torch.randn(2, 3, 6, 6, dtype=torch.float64),
              torch.randn(2, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)):
        y = gt.conv2d(x, w, padding=1)
        assert seen[-1] == (x.data_ptr(), tuple(s * 8 for s in x.stride()), y.data_ptr())
        # the output in the input's memory format (channels_last in, channels_last out)
        assert y.is_contiguous(memory_format=x.is_contiguous() and torch.contiguous_format
                               or torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.zeros(0, 3, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = _rand((4, 3, 3, 3), device=device)
    y = gt.conv2d(x, w, padding=1)
    assert y.shape == (0, 4, 6, 6)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()
    p, idx = gt.max_pool2d(x, 2, return_indices=True)
    assert p.shape == idx.shape == (0, 3, 3, 3)
    # an empty batch is validated like any other: the gradient ops too
    with pytest.raises(ValueError, match="channel"):
        torch.ops.gpuconv.conv2d_grad_weight(x.detach(), [4, 5, 3, 3], y.detach(), [1, 1],
                                             [1, 1], [1, 1], 1, False)
    with pytest.raises(ValueError, match="channel"):
        torch.ops.gpuconv.conv2d_grad_input([0, 5, 6, 6], w.detach(), y.detach(), [1, 1],
                                            [1, 1], [1, 1], 1, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", POOL_CASES)
def test_max_pool2d_matches_torch(case, device):
    torch.manual_seed(4)
    shape, *args = case
    x = _rand(shape, device=device)
    y, idx = gt.max_pool2d(x, *args, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, *args, return_indices=True)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    gy = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(y, x, gy)[0],
                               torch.autograd.grad(ref, x, gy)[0], rtol=0, atol=0)
    assert torch.equal(gt.max_pool2d(x, *args), ref)
    assert torch.autograd.gradcheck(lambda x: gt.max_pool2d(x, *args), (x,))


# ---------------------------------------------------------------------------------------------
# opcheck: schema, autograd registration, fake kernel, AOT dispatch with dynamic shapes
# ---------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    torch.manual_seed(5)
    x, w, b = _conv_inputs(CONV_CASES[1], device)
    conv = ([2, 3], [1, 2], [2, 1], 2, False)
    dy = F.conv2d(x, w, None, *conv[:4]).detach().requires_grad_()
    xs, ws, = _conv_inputs(CONV_CASES[2], device, bias=False)[:2]
    same = ([1, 1], [0, 0], [1, 2], 1, True)
    pool = ([3, 2], [2, 1], [1, 0], [2, 1], True)
    xp = _rand((1, 2, 11, 10), device=device)
    py, pidx = F.max_pool2d(xp, *pool, return_indices=True)
    ops = torch.ops.gpuconv
    return [
        (ops.conv2d, (x, w, b) + conv),
        (ops.conv2d, (xs, ws, None) + same),
        (ops.conv2d_grad_input, (list(x.shape), w, dy) + conv),
        (ops.conv2d_grad_weight, (x, list(w.shape), dy) + conv),
        (ops.max_pool2d, (xp,) + pool),
        (ops.max_pool2d_backward, (torch.randn_like(py).requires_grad_(), pidx,
                                   list(xp.shape)) + pool),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    cases = _opcheck_cases(device)
    assert {op._qualified_op_name for op, _ in cases} == {op._qualname for op in _ops.OPS}
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors, never a wrong result
# ---------------------------------------------------------------------------------------------
def test_bad_dtypes():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    for dt in (torch.complex64, torch.int64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="input has dtype"):
            gt.conv2d(x.to(dt), w.to(dt))
        with pytest.raises(TypeError, match="input has dtype"):
            gt.max_pool2d(x.to(dt), 2)
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but input"):
        gt.conv2d(x, w.double())


def test_bad_arguments():
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    cases = [
        (ValueError, "divisible by groups", dict(groups=3)),
        (ValueError, "weight has 2 input channels per group", dict()),
        (ValueError, "padding must be an int, a pair, 'same' or 'valid'", dict(padding="full")),
        (ValueError, "'same' requires stride 1", dict(padding="same", stride=2, groups=2)),
        (ValueError, "stride must be >= 1", dict(stride=0, groups=2)),
        (ValueError, "padding must be non-negative", dict(padding=-1, groups=2)),
        (ValueError, "larger than the padded input", dict(dilation=3, groups=2)),
        (TypeError, "stride must be an int or a pair", dict(stride=1.5, groups=2)),
        (TypeError, "groups must be an int", dict(groups=2.0)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            gt.conv2d(x, w, **kw)
    with pytest.raises(ValueError, match="bias must have shape"):
        gt.conv2d(x, w, torch.randn(5), groups=2)
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        gt.conv2d(x[0, 0], w)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        gt.conv2d(x.numpy(), w)
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        gt.max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="output size would be"):
        gt.max_pool2d(x, 7)


def test_bad_input_under_torch_compile_is_the_same_error():
    """The fake kernels validate as the real ones do, so compiling fails as eagerly running."""
    f = torch.compile(lambda x, w: gt.conv2d(x, w, groups=3), backend="aot_eager",
                      fullgraph=True)
    with pytest.raises(Exception, match="divisible by groups"):
        f(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3))


@pytest.mark.gpu
def test_mixed_devices_are_an_error():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="move them to one device"):
        gt.conv2d(x, torch.randn(3, 2, 3, 3, device="cuda"))


@pytest.mark.gpu
def test_cuda_bfloat16_float16_and_torch_allocator():
    """CUDA: half precisions agree with cuDNN in float32; the bridge's memory is torch's."""
    torch.manual_seed(6)
    for dt, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2e-2)):
        x, w, b = _conv_inputs(CONV_CASES[1], "cuda", dt)
        y = gt.conv2d(x, w, b, *CONV_CASES[1][2:])
        assert y.dtype == dt and y.device == x.device
        ref = F.conv2d(x.float(), w.float(), b.float(), *CONV_CASES[1][2:])
        assert ((y.float() - ref).norm() / ref.norm()).item() < tol
        gx, gw = torch.autograd.grad(y.float().square().sum(), (x, w))
        assert gx.dtype == gw.dtype == dt
    torch.cuda.synchronize()
    x = torch.randn(8, 64, 56, 56, device="cuda")
    w = torch.randn(64, 64, 3, 3, device="cuda")
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = gt.conv2d(x, w, padding=1)
    torch.cuda.synchronize()
    # the output (and the workspace, freed by now) went through torch's caching allocator
    assert torch.cuda.memory_allocated() - before >= y.numel() * 4
    assert torch.cuda.max_memory_allocated() - before > y.numel() * 4
