"""The NumPy engine against the naive loop reference and central finite differences (float64)."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv.problem import ConvProblem

from . import naive
from .problems import IDS, PROBLEMS


def _data(rng, x_shape, w_shape, dtype=np.float64):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype)
    return x, w, b


def _problem(x_shape, w_shape, kw):
    return ConvProblem.from_args(x_shape, w_shape, kw.get("stride", 1), kw.get("padding", 0),
                                 kw.get("dilation", 1), kw.get("groups", 1))


def _assert_matches_naive(x_shape, w_shape, kw, seed, ops=("fprop", "dgrad", "wgrad")):
    """gpuconv's ops against the naive loops in float64, on random data from `seed`."""
    rng = np.random.default_rng(seed)
    x, w, b = _data(rng, x_shape, w_shape)
    p = _problem(x_shape, w_shape, kw)
    dy = rng.standard_normal(p.y_shape)
    runs = {"fprop": (lambda: gc.conv2d(x, w, b, **kw), lambda: naive.conv_fprop(p, x, w, b)),
            "dgrad": (lambda: gc.conv2d_grad_input(x_shape, w, dy, **kw),
                      lambda: naive.conv_dgrad(p, w, dy)),
            "wgrad": (lambda: gc.conv2d_grad_weight(x, w_shape, dy, **kw),
                      lambda: naive.conv_wgrad(p, x, dy))}
    for op in ops:
        got, want = runs[op][0](), runs[op][1]()
        assert got.shape == want.shape and got.dtype == np.float64, op
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=op)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_three_ops_match_naive_loops_float64(case):
    _, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=1)


def _random_problems(count, seed):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        g = int(rng.choice([1, 1, 2, 3]))
        cg, kg = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        R, S = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        kw = dict(stride=(int(rng.integers(1, 4)), int(rng.integers(1, 4))),
                  padding=(int(rng.integers(0, 3)), int(rng.integers(0, 3))),
                  dilation=(int(rng.integers(1, 3)), int(rng.integers(1, 3))), groups=g)
        x_shape = (int(rng.integers(1, 3)), cg * g, int(rng.integers(1, 13)),
                   int(rng.integers(1, 13)))
        try:
            _problem(x_shape, (kg * g, cg, R, S), kw)
        except ValueError:
            continue  # kernel larger than the padded input: drawn again
        out.append((x_shape, (kg * g, cg, R, S), kw))
    return out


@pytest.mark.parametrize("case", _random_problems(40, seed=7))
def test_random_shapes_match_naive_loops(case):
    _assert_matches_naive(*case, seed=2)


@pytest.mark.parametrize("case", PROBLEMS[:12] + PROBLEMS[15:18], ids=IDS[:12] + IDS[15:18])
def test_float32_close_to_float64_reference(case):
    _, x_shape, w_shape, kw = case
    rng = np.random.default_rng(3)
    x, w, b = _data(rng, x_shape, w_shape)
    p = _problem(x_shape, w_shape, kw)
    dy = rng.standard_normal(p.y_shape)
    f32 = [a.astype(np.float32) for a in (x, w, b, dy)]
    x32, w32, b32, dy32 = f32
    # float32 inputs rounded once, accumulation in float32: error ~ sqrt(terms) * eps32
    for got, want in ((gc.conv2d(x32, w32, b32, **kw), naive.conv_fprop(p, x32, w32, b32)),
                      (gc.conv2d_grad_input(x_shape, w32, dy32, **kw),
                       naive.conv_dgrad(p, w32, dy32)),
                      (gc.conv2d_grad_weight(x32, w_shape, dy32, **kw),
                       naive.conv_wgrad(p, x32, dy32))):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


FD_CASES = ["basic3x3", "stride2_uncovered", "stride3_pad2", "dil2_stride2", "groups3_stride2",
            "depthwise_mult2_s2", "pointwise_s2", "same_even", "pairs"]


@pytest.mark.parametrize("name", FD_CASES)
def test_gradients_match_finite_differences(name):
    _, x_shape, w_shape, kw = PROBLEMS[IDS.index(name)]
    rng = np.random.default_rng(4)
    x, w, b = _data(rng, x_shape, w_shape)
    p = _problem(x_shape, w_shape, kw)
    dy = rng.standard_normal(p.y_shape)

    def loss():  # L = <conv(x, w) + b, dy>, so dL/dx is the VJP with dy
        return float(np.sum(gc.conv2d(x, w, b, **kw) * dy))

    np.testing.assert_allclose(gc.conv2d_grad_input(x_shape, w, dy, **kw),
                               naive.central_difference(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gc.conv2d_grad_weight(x, w_shape, dy, **kw),
                               naive.central_difference(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gc.conv2d_grad_bias(dy), naive.central_difference(loss, b),
                               rtol=1e-6, atol=1e-7)


def test_dgrad_rows_no_window_reached_are_exact_zeros():
    # H=8, R=3, stride 3: windows cover rows 0..2 and 3..5; rows 6 and 7 are never read.
    rng = np.random.default_rng(5)
    w = rng.standard_normal((3, 2, 3, 3))
    p = ConvProblem.from_args((2, 2, 8, 10), w.shape, stride=3)
    dy = rng.standard_normal(p.y_shape) + 10.0
    dx = gc.conv2d_grad_input(p.x_shape, w, dy, stride=3)
    assert np.all(dx[:, :, 6:, :] == 0.0) and np.all(dx[:, :, :, 9:] == 0.0)
    assert np.all(dx[:, :, :6, :9] != 0.0)


def test_dgrad_with_stride_larger_than_kernel_leaves_gaps_zero():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2, 2, 2, 2))
    dy = rng.standard_normal((1, 2, 3, 3))
    dx = gc.conv2d_grad_input((1, 2, 9, 9), w, dy, stride=3)
    # rows/cols 2, 5, 8 lie between windows of a 2-tap kernel at stride 3
    assert np.all(dx[:, :, 2::3, :] == 0) and np.all(dx[:, :, :, 2::3] == 0)


def test_non_contiguous_inputs_give_the_same_results():
    rng = np.random.default_rng(8)
    base = rng.standard_normal((3, 6, 11, 9))
    x = base[::2, ::2, 1:, ::-1]  # strided, offset and negative strides
    w = np.asfortranarray(rng.standard_normal((4, 3, 3, 3)))
    kw = dict(stride=2, padding=1)
    p = ConvProblem.from_args(x.shape, w.shape, **kw)
    dy = rng.standard_normal(p.y_shape).transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2)
    xc, wc, dyc = (np.ascontiguousarray(a) for a in (x, w, dy))
    np.testing.assert_array_equal(gc.conv2d(x, w, **kw), gc.conv2d(xc, wc, **kw))
    np.testing.assert_array_equal(gc.conv2d_grad_input(x.shape, w, dy, **kw),
                                  gc.conv2d_grad_input(x.shape, wc, dyc, **kw))
    np.testing.assert_array_equal(gc.conv2d_grad_weight(x, w.shape, dy, **kw),
                                  gc.conv2d_grad_weight(xc, w.shape, dyc, **kw))


def test_inputs_are_not_modified():
    rng = np.random.default_rng(9)
    x, w, b = _data(rng, (2, 4, 6, 6), (4, 2, 3, 3))
    dy = rng.standard_normal((2, 4, 6, 6))
    copies = [a.copy() for a in (x, w, b, dy)]
    gc.conv2d(x, w, b, padding=1, groups=2)
    gc.conv2d_grad_input(x.shape, w, dy, padding=1, groups=2)
    gc.conv2d_grad_weight(x, w.shape, dy, padding=1, groups=2)
    for a, c in zip((x, w, b, dy), copies):
        np.testing.assert_array_equal(a, c)


def test_result_is_a_new_contiguous_array_of_input_dtype():
    x = np.random.default_rng(0).standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = np.ones((3, 2, 1, 1), np.float32)
    y = gc.conv2d(x, w)
    assert y.dtype == np.float32 and y.flags.c_contiguous and not np.shares_memory(x, y)


# ---- PyTorch as a second oracle (never the only one) -------------------------------------------
@pytest.mark.filterwarnings("ignore:Using padding='same'")  # PyTorch's own note on even kernels
@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_matches_pytorch(case):
    torch = pytest.importorskip("torch")
    _, x_shape, w_shape, kw = case
    rng = np.random.default_rng(10)
    x, w, b = _data(rng, x_shape, w_shape)
    p = _problem(x_shape, w_shape, kw)
    dy = rng.standard_normal(p.y_shape)
    tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, **kw)
    np.testing.assert_allclose(gc.conv2d(x, w, b, **kw), ty.numpy(), rtol=1e-10, atol=1e-10)
    if isinstance(kw.get("padding"), str):
        return  # torch.nn.grad does not take string padding
    tdy = torch.from_numpy(dy)
    np.testing.assert_allclose(gc.conv2d_grad_input(x_shape, w, dy, **kw),
                               torch.nn.grad.conv2d_input(x_shape, tw, tdy, **kw).numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gc.conv2d_grad_weight(x, w_shape, dy, **kw),
                               torch.nn.grad.conv2d_weight(tx, w_shape, tdy, **kw).numpy(),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["basic3x3", "stride2_uncovered", "groups3_stride2", "depthwise",
                                  "pointwise_s2"])
def test_batch_chunking_gives_the_same_result(name, monkeypatch):
    from gpuconv.engines import numpy_engine
    _, x_shape, w_shape, kw = PROBLEMS[IDS.index(name)]
    x_shape = (5,) + x_shape[1:]
    rng = np.random.default_rng(11)
    x, w, b = _data(rng, x_shape, w_shape)
    p = _problem(x_shape, w_shape, kw)
    dy = rng.standard_normal(p.y_shape)
    whole = (gc.conv2d(x, w, b, **kw), gc.conv2d_grad_input(x_shape, w, dy, **kw),
             gc.conv2d_grad_weight(x, w_shape, dy, **kw))
    monkeypatch.setattr(numpy_engine, "WORKSPACE_BYTES", 1)  # one image per chunk
    assert len(numpy_engine._batch_chunks(p, "fprop", 8)) == 5
    chunked = (gc.conv2d(x, w, b, **kw), gc.conv2d_grad_input(x_shape, w, dy, **kw),
               gc.conv2d_grad_weight(x, w_shape, dy, **kw))
    for a, c in zip(whole, chunked):
        np.testing.assert_allclose(c, a, rtol=1e-13, atol=1e-13)


def test_both_dgrad_orders_are_exercised_and_agree():
    from gpuconv.engines import numpy_engine
    rng = np.random.default_rng(12)
    for x_shape, w_shape, kw in (((2, 3, 9, 8), (6, 3, 3, 3), dict(stride=2, padding=1)),
                                 ((2, 6, 9, 8), (3, 6, 3, 3), dict(stride=1, padding=1))):
        p = _problem(x_shape, w_shape, kw)
        w = rng.standard_normal(w_shape)
        dy = rng.standard_normal(p.y_shape)
        ref = naive.conv_dgrad(p, w, dy)
        ph_h, *_ = numpy_engine._phase_taps(p.H, p.pad_h, p.R, p.dil_h, p.stride_h, p.P)
        ph_w, *_ = numpy_engine._phase_taps(p.W, p.pad_w, p.S, p.dil_w, p.stride_w, p.Q)
        first = numpy_engine._dgrad_channel_first(p, w, dy, ph_h, ph_w, np.zeros(p.x_shape))
        np.testing.assert_allclose(first, ref, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(gc.conv2d_grad_input(x_shape, w, dy, **kw), ref,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_per_tap_im2col_path_matches_naive(case, monkeypatch):
    """Small problems take the one-copy im2col; force the per-tap (and stride-phase) path."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "SMALL_IM2COL", 0)
    _, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=13, ops=("fprop", "wgrad"))


def test_release_workspace_frees_the_buffers_and_results_stay_right():
    from gpuconv.engines import numpy_engine
    rng = np.random.default_rng(14)
    x, w, _ = _data(rng, (2, 8, 20, 20), (8, 8, 3, 3))
    y0 = gc.conv2d(x, w, padding=1)
    assert numpy_engine._tls.bufs  # the column matrix and padded input are kept
    numpy_engine.release_workspace()
    assert not getattr(numpy_engine._tls, "bufs", None)
    np.testing.assert_array_equal(gc.conv2d(x, w, padding=1), y0)


_FLAT_SHIFT_CASES = [
    ((2, 2, 7, 6), (5, 2, 3, 3), dict(padding=1)),
    ((1, 3, 9, 8), (4, 3, 3, 3), dict(padding=2, dilation=2)),
    ((2, 1, 6, 9), (3, 1, 3, 5), dict(padding=(1, 2))),
    ((1, 2, 5, 6), (4, 2, 4, 2), dict(padding="same")),       # asymmetric 'same' padding
    ((2, 2, 1, 7), (3, 2, 1, 3), dict(padding=(0, 1))),       # one row: every flat shift wraps
    ((1, 4, 6, 6), (6, 2, 3, 3), dict(padding=1, groups=2)),
    ((2, 2, 14, 14), (5, 2, 5, 5), dict()),                   # 'valid': dy rows padded 10 -> 14
    ((1, 2, 9, 12), (4, 2, 2, 3), dict(padding=(1, 0))),      # taller dy, narrower rows
    ((1, 2, 8, 9), (3, 2, 3, 3), dict(padding=(0, 1), dilation=(2, 1))),
    # padding wider than the input: shifts of W or more columns (a review found these wrong)
    ((1, 1, 2, 2), (2, 1, 7, 7), dict(padding=3)),
    ((2, 2, 3, 2), (4, 2, 7, 7), dict(padding=3)),
    ((1, 1, 4, 3), (2, 1, 1, 9), dict(padding=(0, 4))),
]


def _assert_dgrad_path(monkeypatch, path, split_taps, case, seed):
    """dgrad of `case` against naive loops with DGRAD_SPLIT_TAPS forced, and numpy_engine's
    function `path` proven called."""
    from gpuconv.engines import numpy_engine
    taken = []
    real = getattr(numpy_engine, path)
    monkeypatch.setattr(numpy_engine, "DGRAD_SPLIT_TAPS", lambda p: split_taps)
    monkeypatch.setattr(numpy_engine, path, lambda *a: taken.append(1) or real(*a))
    _assert_matches_naive(*case, seed=seed, ops=("dgrad",))
    assert taken


@pytest.mark.parametrize("x_shape,w_shape,kw", _FLAT_SHIFT_CASES)
def test_stride1_same_size_dgrad_flat_shift_gather(x_shape, w_shape, kw, monkeypatch):
    """Stride 1 with dx rows as wide as dy's, or up to 1.5x wider (dy rows zero-padded), gathers
    the channel-first taps as shifted adds over flattened planes, zeroing the columns a shift
    would wrap: checked against naive loops, with the path proven taken."""
    _assert_dgrad_path(monkeypatch, "_gather_flat_shifts", False, (x_shape, w_shape, kw), 15)


@pytest.mark.parametrize("x_shape,w_shape,kw", _FLAT_SHIFT_CASES + [
    ((2, 3, 7, 5), (4, 3, 3, 2), dict(padding=(2, 0), dilation=(1, 3))),
    ((1, 6, 5, 5), (4, 3, 2, 2), dict(padding=(1, 1), groups=2)),
])
@pytest.mark.parametrize("one_gemm_flops", [0, float("inf")])  # one GEMM / per image
def test_stride1_dgrad_split_taps(x_shape, w_shape, kw, one_gemm_flops, monkeypatch):
    """Stride-1 dgrad with the column taps in the GEMM and the row taps gathered after it, on
    the flat-shift cases (padding wider than the input included) and with dilation and groups,
    in both GEMM layouts: checked against naive loops, with the path proven taken."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "ONE_GEMM_FLOPS", one_gemm_flops)
    _assert_dgrad_path(monkeypatch, "_dgrad_split_taps", True, (x_shape, w_shape, kw), 17)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("rows,per_image_pq", [(0, 10 ** 9), (10 ** 6, 10 ** 9), (0, 0)])
def test_every_wgrad_order_matches_naive(case, rows, per_image_pq, monkeypatch):
    """wgrad from the column matrix as one GEMM over N*P*Q (rows=0), as per-image GEMMs of
    dy @ col^T summed (every problem), and as per-image col @ dy^T summed (_wgrad_per_image,
    proven taken where the column matrix is used)."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "SMALL_WGRAD_ROWS", rows)
    monkeypatch.setattr(numpy_engine, "WGRAD_SPLIT_TAPS", lambda p: False)
    monkeypatch.setattr(numpy_engine, "WGRAD_PER_IMAGE_PQ", per_image_pq)
    taken = []
    real = numpy_engine._wgrad_per_image
    monkeypatch.setattr(numpy_engine, "_wgrad_per_image", lambda *a: taken.append(1) or real(*a))
    name, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=16, ops=("wgrad",))
    if per_image_pq == 0:
        assert bool(taken) == (not name.startswith(("depthwise", "pointwise")))


@pytest.mark.parametrize("case", [c for c in PROBLEMS if c[3].get("stride", 1) in (1, (1, 2))],
                         ids=[c[0] for c in PROBLEMS if c[3].get("stride", 1) in (1, (1, 2))])
@pytest.mark.parametrize("one_gemm_flops", [0, float("inf")])  # one GEMM / per image
def test_fprop_split_taps_matches_naive(case, one_gemm_flops, monkeypatch):
    """Row-stride-1 fprop with the column taps in the GEMM and the row taps gathered after it,
    in both GEMM layouts, with bias: checked against naive loops, the path proven taken
    (depthwise and pointwise layers have their own paths and never take it)."""
    from gpuconv.engines import numpy_engine
    name, x_shape, w_shape, kw = case
    taken = []
    real = numpy_engine._fprop_split_taps
    monkeypatch.setattr(numpy_engine, "ONE_GEMM_FLOPS", one_gemm_flops)
    monkeypatch.setattr(numpy_engine, "FPROP_SPLIT_TAPS", lambda p: True)
    monkeypatch.setattr(numpy_engine, "_fprop_split_taps",
                        lambda *a: taken.append(1) or real(*a))
    _assert_matches_naive(x_shape, w_shape, kw, seed=18, ops=("fprop",))
    assert bool(taken) == (not name.startswith(("depthwise", "pointwise")))


@pytest.mark.parametrize("small_kernels", [True, False])
def test_wgrad_split_taps_policy_follows_the_blas_small_gemm_kernels(small_kernels, monkeypatch):
    """A first layer of few column-matrix rows takes the split-tap wgrad (hundreds of tiny
    GEMMs) only when the BLAS has small-matrix kernels; larger layers do either way."""
    from gpuconv.engines import cpu_threads, numpy_engine
    monkeypatch.setattr(cpu_threads, "_small_gemm", small_kernels)
    first = ConvProblem(64, 1, 32, 32, 6, 5, 5)  # LeNet's conv(1->6, 5x5): 25 rows
    second = ConvProblem(64, 6, 14, 14, 16, 5, 5)  # 150 rows
    assert numpy_engine.WGRAD_SPLIT_TAPS(first) == small_kernels
    assert numpy_engine.WGRAD_SPLIT_TAPS(second)
    monkeypatch.setattr(cpu_threads, "_small_gemm", None)  # asked of threadpoolctl again
    assert cpu_threads.blas_small_gemm_kernels() in (True, False)


@pytest.mark.parametrize("case", [c for c in PROBLEMS if c[3].get("stride", 1) in (1, (1, 2))],
                         ids=[c[0] for c in PROBLEMS if c[3].get("stride", 1) in (1, (1, 2))])
def test_wgrad_split_taps_matches_naive(case, monkeypatch):
    """Row-stride-1 wgrad from the column-tap copy of the input, one GEMM per image and row
    tap: checked against naive loops, the path proven taken (depthwise and pointwise layers
    have their own paths), and never used where the fprop's column matrix can be reused."""
    from gpuconv.engines import numpy_engine
    name, x_shape, w_shape, kw = case
    taken = []
    real = numpy_engine._wgrad_split_taps
    monkeypatch.setattr(numpy_engine, "WGRAD_SPLIT_TAPS", lambda p: True)
    monkeypatch.setattr(numpy_engine, "_wgrad_split_taps",
                        lambda *a: taken.append(1) or real(*a))
    _assert_matches_naive(x_shape, w_shape, kw, seed=20, ops=("wgrad",))
    plain = not name.startswith(("depthwise", "pointwise"))
    assert bool(taken) == plain
    if plain:  # a column matrix kept by a training fprop is used instead
        monkeypatch.setattr(numpy_engine, "FPROP_SPLIT_TAPS", lambda p: False)
        rng = np.random.default_rng(20)
        x, w, _ = _data(rng, x_shape, w_shape)
        with numpy_engine.keep_columns():
            y = gc.conv2d(x, w, **kw)
        taken.clear()
        gc.conv2d_grad_weight(x, w_shape, np.ones_like(y), **kw)
        assert not taken


_DEPTHWISE = [c for c in PROBLEMS if c[0].startswith("depthwise")] + [
    ("depthwise_same_even", (2, 3, 7, 6), (3, 1, 4, 2), dict(groups=3, padding="same")),
    ("depthwise_pad_wider", (1, 2, 3, 4), (2, 1, 3, 3), dict(groups=2, padding=3)),
    ("depthwise_5x5_odd", (3, 4, 9, 5), (4, 1, 5, 5), dict(groups=4, padding=2)),
]


@pytest.mark.parametrize("case", _DEPTHWISE, ids=[c[0] for c in _DEPTHWISE])
@pytest.mark.parametrize("flat", [True, False])
def test_depthwise_flat_windows_and_tap_windows_match_naive(case, flat, monkeypatch):
    """Depthwise layers with stride-1 taps as runs of flat padded planes (dgrad as the fprop of
    the padded dy with mirrored kernels) and with per-row tap windows, against naive loops."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "DEPTHWISE_FLAT", flat)
    taken = []
    real = numpy_engine._flat_windows
    monkeypatch.setattr(numpy_engine, "_flat_windows",
                        lambda *a: taken.append(1) or real(*a))
    name, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=22)
    assert bool(taken) == (flat and kw.get("stride", 1) == 1)


_SAME_WIDTH = [
    ("dw3x3", (2, 5, 8, 7), (5, 1, 3, 3), dict(groups=5, padding=1)),
    ("dw_same_even", (2, 3, 7, 6), (3, 1, 4, 2), dict(groups=3, padding="same")),
    ("dw_dil2_same", (2, 3, 9, 8), (3, 1, 3, 3), dict(groups=3, dilation=2, padding=2)),
    ("dw_mult2_same", (2, 2, 7, 5), (4, 1, 3, 3), dict(groups=2, padding=1)),
    ("dw5x5_rows_narrower_than_pad", (2, 3, 6, 2), (3, 1, 5, 5), dict(groups=3, padding=2)),
    ("dw1x3_one_row", (3, 2, 1, 9), (2, 1, 1, 3), dict(groups=2, padding=(0, 1))),
]


@pytest.mark.parametrize("case", _SAME_WIDTH, ids=[c[0] for c in _SAME_WIDTH])
def test_depthwise_same_width_windows_match_naive(case, monkeypatch):
    """Stride-1 depthwise layers whose output is as wide as the input: the tap windows from flat
    planes with zero fronts and backs, the wrapped columns zeroed (_same_width_windows), in
    fprop, the mirrored-kernel dgrad and wgrad, against naive loops; the path is proven taken."""
    from gpuconv.engines import numpy_engine
    taken = []
    real = numpy_engine._same_width_windows
    monkeypatch.setattr(numpy_engine, "_same_width_windows",
                        lambda *a: taken.append(1) or real(*a))
    name, x_shape, w_shape, kw = case
    p = _problem(x_shape, w_shape, kw)
    assert p.Q == p.W and p.is_depthwise
    for op in ("fprop", "dgrad", "wgrad"):
        taken.clear()
        _assert_matches_naive(x_shape, w_shape, kw, seed=23, ops=(op,))
        # (dgrad by the mirrored-kernel fprop needs one kernel per channel)
        assert bool(taken) == (op != "dgrad" or p.Kg == 1), op


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("max_q", [0, 10 ** 6])  # strided copies / one gather everywhere
def test_im2col_by_gather_and_by_copies_match_naive(case, max_q, monkeypatch):
    """The column matrix by one gather through an index table (padding from an appended 0)
    and by strided copies, through fprop and the column-matrix wgrad, against naive loops."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "TAKE_IM2COL_MAX_Q", max_q)
    monkeypatch.setattr(numpy_engine, "SMALL_IM2COL", 1 << 30)
    monkeypatch.setattr(numpy_engine, "FPROP_SPLIT_TAPS", lambda p: False)
    monkeypatch.setattr(numpy_engine, "WGRAD_SPLIT_TAPS", lambda p: False)
    _, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=24, ops=("fprop", "wgrad"))


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("one_gemm", [True, False])
def test_fprop_one_gemm_and_per_image_match_naive(case, one_gemm, monkeypatch):
    """im2col fprop as one GEMM over the batch (then a transposing copy that adds the bias) and
    as one GEMM per image, against naive loops."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "FPROP_SPLIT_TAPS", lambda p: False)
    monkeypatch.setattr(numpy_engine, "FPROP_ONE_GEMM", lambda p: one_gemm)
    _, x_shape, w_shape, kw = case
    _assert_matches_naive(x_shape, w_shape, kw, seed=19, ops=("fprop",))


def test_wgrad_reuses_the_fprop_column_matrix_only_when_still_valid(monkeypatch):
    """The last fprop's column matrix serves the same layer's wgrad when the forward ran inside
    keep_columns (as gpuconv.nn's training forwards do), but never after the input changed in
    place, for another input of the same shape, or once another op took the buffer."""
    from gpuconv.engines import numpy_engine
    monkeypatch.setattr(numpy_engine, "FPROP_SPLIT_TAPS", lambda p: False)  # im2col's fprop
    monkeypatch.setattr(numpy_engine, "WGRAD_SPLIT_TAPS", lambda p: False)  # and its wgrad
    rng = np.random.default_rng(17)
    x_shape, w_shape, kw = (2, 3, 9, 8), (4, 3, 3, 3), dict(padding=1)
    p = _problem(x_shape, w_shape, kw)
    x, w, _ = _data(rng, x_shape, w_shape)
    x2 = rng.standard_normal(x_shape)
    dy = rng.standard_normal(p.y_shape)
    expanded = []
    real = numpy_engine._im2col
    monkeypatch.setattr(numpy_engine, "_im2col", lambda *a: expanded.append(1) or real(*a))

    def wgrad_after(fprop_input, wgrad_input, between=None, keep=True):
        if keep:
            with numpy_engine.keep_columns():
                gc.conv2d(fprop_input, w, **kw)
        else:
            gc.conv2d(fprop_input, w, **kw)
        if between:
            between()
        expanded.clear()
        got = gc.conv2d_grad_weight(wgrad_input, w_shape, dy, **kw)
        np.testing.assert_allclose(got, naive.conv_wgrad(p, wgrad_input, dy), rtol=1e-12,
                                   atol=1e-12)
        return len(expanded)

    assert wgrad_after(x, x) == 0                       # reused
    assert wgrad_after(x, x, keep=False) == 1           # a forward outside keep_columns
    assert wgrad_after(x2, x) == 1                      # another input of the same shape
    xm = x.copy()
    assert wgrad_after(xm, xm, lambda: xm.__setitem__((0, 0, 0, 0), 5.0)) == 1  # changed
    # the split-tap dgrad leaves the column matrix alone; the channel-first one takes its buffer
    for split, expanded_again in ((True, 0), (False, 1)):
        with monkeypatch.context() as m:
            m.setattr(numpy_engine, "DGRAD_SPLIT_TAPS", lambda p: split)
            assert wgrad_after(x, x, lambda: gc.conv2d_grad_input(x_shape, w, dy, **kw)) \
                == expanded_again
    for small in (0, 10 ** 6):  # both wgrad orders reuse it
        monkeypatch.setattr(numpy_engine, "SMALL_WGRAD_ROWS", small)
        assert wgrad_after(x, x) == 0
    numpy_engine.release_workspace()
    expanded.clear()
    gc.conv2d_grad_weight(x, w_shape, dy, **kw)
    assert len(expanded) == 1


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "strided"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_bias_every_layout_matches_float64_sum(layout, dtype):
    rng = np.random.default_rng(11)
    dy64 = rng.standard_normal((5, 7, 6, 9))
    if layout == "nhwc":
        dy = np.ascontiguousarray(dy64.transpose(0, 2, 3, 1)).astype(dtype).transpose(0, 3, 1, 2)
    elif layout == "strided":
        dy = np.repeat(dy64, 2, axis=3).astype(dtype)[:, :, :, ::2]
    else:
        dy = dy64.astype(dtype)
    want = dy.astype(np.float64).sum(axis=(0, 2, 3))
    got = gc.conv2d_grad_bias(dy)
    assert got.shape == (7,) and got.dtype == dtype
    tol = {np.float64: 1e-12, np.float32: 1e-5}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)
    np.testing.assert_array_equal(got, gc.conv2d_grad_bias(dy))  # same bits run to run
    assert gc.conv2d_grad_bias(dy[:0]).tolist() == [0.0] * 7
