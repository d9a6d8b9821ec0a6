"""channels_last on the CUDA engine, run on the CPU (its Python unchanged, the first-generation
kernels host-compiled by tests/kernel_host.py, NumPy standing in for CuPy and cuBLAS): the
routing of CONTRACT-layouts (fn.layouts; physical NHWC arrays to "nhwc" algorithms with no copy;
NCHW-only algorithms converted once), results in channels_last, equal to the NumPy engine."""
import types

import numpy as np
import pytest

from gpuconv._arrays import memory_format, to_format
from gpuconv.engines import cuda_engine as ce
from gpuconv.engines import cuda_im2col, cuda_registry, numpy_engine, numpy_nhwc
from gpuconv.problem import ConvProblem, PoolProblem

from . import kernel_host
from .problems import PROBLEMS

pytestmark = pytest.mark.skipif(kernel_host.CXX is None,
                                reason="g++ is not installed: cannot run the kernels on the host")
_OPS = ("conv_fprop", "conv_dgrad", "conv_wgrad", "pool_fprop", "pool_dgrad", "act_fprop",
        "act_dgrad")
CASES = [c for c in PROBLEMS if c[0] in ("pad1", "stride3_pad2", "dil2_stride2", "groups3_stride2",
                                         "depthwise_mult2_s2", "pointwise_s2", "same_even")]


def cl(a):
    return to_format(a, "nhwc")


@pytest.fixture(scope="module")
def _libs(tmp_path_factory):
    return kernel_host.build(str(tmp_path_factory.mktemp("kernels_host_cl")))


@pytest.fixture
def eng(_libs, monkeypatch):
    for mod in (ce, cuda_im2col):
        monkeypatch.setattr(mod, "_cp", lambda: np)
        monkeypatch.setattr(mod, "launch", kernel_host.host_launch)
    return types.SimpleNamespace(**{n: getattr(ce, n).__wrapped__ for n in _OPS})


def _problem(case):
    _, xs, ws, kw = case
    return ConvProblem.from_args(xs, ws, **kw)


def _is_cl(a):
    return a.transpose(0, 2, 3, 1).flags.c_contiguous


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_first_generation_channels_last(eng, case):
    kernel_host.launches.clear()
    _check_first_generation(eng, case, np.float64, 1e-11)
    names = " ".join(kernel_host.launches)
    assert "im2col_nhwc" in names and "dgrad_col_nhwc" in names and "gemm_to_nhwc" in names
    assert "im2col<" not in names and "gemm_to_nchw" not in names  # no NCHW detour


@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16"))
def test_first_generation_channels_last_16bit(eng, dtype):
    from . import cuda_checks as cc
    _check_first_generation(eng, CASES[3], cc.dtype(dtype), cc.tol(cc.dtype(dtype)))


def _check_first_generation(eng, case, dtype, tol):
    """im2col_gemm over NHWC (im2col_nhwc, dgrad_col_nhwc, gemm_to_nhwc): channels_last in ->
    channels_last out, the NumPy results."""
    p = _problem(case)
    rng = np.random.default_rng(3)
    x, w = cl(rng.standard_normal(p.x_shape)), cl(rng.standard_normal(p.w_shape))
    b, dy = rng.standard_normal(p.K), cl(rng.standard_normal(p.y_shape))
    lo = [a.astype(dtype) for a in (x, w, b, dy)]  # astype keeps the layout
    x, w, b, dy = [a.astype(np.float64) for a in lo]  # the reference on the rounded inputs
    for got, ref in ((eng.conv_fprop(p, lo[0], lo[1], lo[2]), numpy_engine.conv_fprop(p, x, w, b)),
                     (eng.conv_dgrad(p, lo[1], lo[3]), numpy_engine.conv_dgrad(p, w, dy)),
                     (eng.conv_wgrad(p, lo[0], lo[3]), numpy_engine.conv_wgrad(p, x, dy))):
        assert _is_cl(got) and got.dtype == dtype, got.strides
        np.testing.assert_allclose(got.astype(np.float64), ref, rtol=tol, atol=tol)


def _nhwc_algorithms(calls):
    """A registered "nhwc" algorithm per op (the NumPy engine's NHWC math on physical arrays),
    recording what it was handed."""
    def fprop(p, x, w, bias):
        calls.append(("fprop", x, w))
        return numpy_nhwc.conv_fprop(p, x.transpose(0, 3, 1, 2), w.transpose(0, 3, 1, 2),
                                     bias).transpose(0, 2, 3, 1)

    def dgrad(p, w, dy):
        calls.append(("dgrad", w, dy))
        return numpy_nhwc.conv_dgrad(p, w.transpose(0, 3, 1, 2),
                                     dy.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)

    def wgrad(p, x, dy):
        calls.append(("wgrad", x, dy))
        return numpy_nhwc.conv_wgrad(p, x.transpose(0, 3, 1, 2),
                                     dy.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    for fn in (fprop, dgrad, wgrad):
        fn.layouts = ("nhwc",)
    return {"fprop": fprop, "dgrad": dgrad, "wgrad": wgrad}


def test_nhwc_algorithm_gets_physical_arrays_without_copy(eng):
    p = _problem(CASES[3])
    rng = np.random.default_rng(4)
    x, w = cl(rng.standard_normal(p.x_shape)), cl(rng.standard_normal(p.w_shape))
    dy = cl(rng.standard_normal(p.y_shape))
    calls = []
    algos = _nhwc_algorithms(calls)
    for op, fn in algos.items():
        cuda_registry.register_algorithm(op, "test_nhwc", fn, replace=True)
    try:
        for op in algos:
            cuda_registry.set_algorithm(op, "test_nhwc")
        y = eng.conv_fprop(p, x, w, None)
        dx = eng.conv_dgrad(p, w, dy)
        dw = eng.conv_wgrad(p, x, dy)
    finally:
        for op in algos:
            cuda_registry.set_algorithm(op, "auto")
            del cuda_registry.ALGORITHMS[op]["test_nhwc"]
    for (op, a, b_), (pa, pb) in zip(calls, ((x, w), (w, dy), (x, dy))):
        assert a.flags.c_contiguous and b_.flags.c_contiguous, op
        assert np.shares_memory(a, pa) and np.shares_memory(b_, pb), op  # no copy on the way
    for got, ref in ((y, numpy_engine.conv_fprop(p, x, w)), (dx, numpy_engine.conv_dgrad(p, w, dy)),
                     (dw, numpy_engine.conv_wgrad(p, x, dy))):
        assert _is_cl(got)
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_nhwc_only_algorithm_on_an_nchw_op_is_converted_once(eng):
    """An "nhwc"-only algorithm (the third generation) chosen by name for NCHW operands gets
    physical NHWC copies (never the NCHW memory read as NHWC) and its result comes back NCHW."""
    p = _problem(CASES[3])
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal(p.x_shape), rng.standard_normal(p.w_shape)
    dy = rng.standard_normal(p.y_shape)
    calls = []
    algos = _nhwc_algorithms(calls)
    for op, fn in algos.items():
        cuda_registry.register_algorithm(op, "test_nhwc", fn, replace=True)
    try:
        for op in algos:
            cuda_registry.set_algorithm(op, "test_nhwc")
        got = (eng.conv_fprop(p, x, w, None), eng.conv_dgrad(p, w, dy), eng.conv_wgrad(p, x, dy))
    finally:
        for op in algos:
            cuda_registry.set_algorithm(op, "auto")
            del cuda_registry.ALGORITHMS[op]["test_nhwc"]
    assert [c[1].shape for c in calls] == [(p.N, p.H, p.W, p.C), (p.K, p.R, p.S, p.C // p.groups),
                                           (p.N, p.H, p.W, p.C)]
    refs = (numpy_engine.conv_fprop(p, x, w), numpy_engine.conv_dgrad(p, w, dy),
            numpy_engine.conv_wgrad(p, x, dy))
    for g, ref in zip(got, refs):
        assert g.flags.c_contiguous and memory_format(g) == "nchw"
        np.testing.assert_allclose(g, ref, rtol=1e-12, atol=1e-12)


def test_selection_is_told_the_memory_format(eng):
    """"auto" asks a layout-aware policy with the op's format; a policy(op, p, dtype) written
    before formats existed is asked for NCHW ops only (channels_last: the first generation)."""
    p = _problem(CASES[0])
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(p.x_shape), rng.standard_normal(p.w_shape)
    seen = []

    def aware(op, p, dtype, layout="nchw"):
        seen.append(layout)
        return "im2col_gemm"

    def old_style(op, p, dtype):
        seen.append("old")
        return "im2col_gemm"
    try:
        cuda_registry.set_auto_policy(aware)
        eng.conv_fprop(p, x, w, None)
        eng.conv_fprop(p, cl(x), w, None)
        cuda_registry.set_auto_policy(old_style)
        eng.conv_fprop(p, x, w, None)
        y = eng.conv_fprop(p, cl(x), w, None)
    finally:
        cuda_registry.set_auto_policy(None)
    assert seen == ["nchw", "nhwc", "old"] and _is_cl(y)


def test_autotuner_tunes_channels_last_ops_apart():
    """layout="nhwc": only algorithms that read NHWC are candidates (no hidden transposes), a
    two-format one is called with layout="nhwc" on physical arrays, and the cache key differs
    from the NCHW op's."""
    from gpuconv import autotune, config
    p = _problem(CASES[0])
    calls = []
    nhwc_only = _nhwc_algorithms([])["fprop"]

    def both(p, x, w, bias, layout="nchw"):
        calls.append((layout, x.shape))
        if layout == "nhwc":
            return numpy_nhwc.conv_fprop(p, x.transpose(0, 3, 1, 2), w.transpose(0, 3, 1, 2),
                                         bias).transpose(0, 2, 3, 1)
        return numpy_engine.conv_fprop(p, x, w, bias)
    both.layouts = ("nchw", "nhwc")

    def nchw_only(p, x, w, bias):
        calls.append(("nchw_only", x.shape))
        return numpy_engine.conv_fprop(p, x, w, bias)
    registry = {"im2col_gemm": both, "nchw_only": nchw_only, "nhwc_only": nhwc_only}
    assert autotune.candidates(p, np.float64, registry, layout="nhwc") == ["im2col_gemm",
                                                                            "nhwc_only"]
    assert autotune.candidates(p, np.float64, registry) == ["im2col_gemm", "nchw_only"]
    tu = autotune.Autotuner(timer=lambda fn: 1.0, device_name="d", source_hash="h",
                            cache_dir="")   # no disk cache
    inputs = autotune.random_inputs("fprop", p, np.float64, np, seed=1)
    ref = numpy_engine.conv_fprop(p, *inputs)
    best = tu.select("fprop", p, np.float64, registry, lambda: inputs, lambda *a: ref,
                     layout="nhwc")
    assert best == "im2col_gemm" and ("nhwc", (p.N, p.H, p.W, p.C)) in calls
    assert not any(c[0] == "nchw_only" for c in calls)
    assert autotune.problem_key("fprop", p, np.float64, False, "nhwc") in tu.memory
    assert autotune.problem_key("fprop", p, np.float64, False) not in tu.memory
    assert "|nhwc|" in autotune.problem_key("fprop", p, np.float64, False, "nhwc")
    assert config.third_generation_enabled() is False


def test_pool_and_activations_channels_last(eng):
    rng = np.random.default_rng(5)
    x = cl(rng.standard_normal((2, 3, 7, 8)))
    pp = PoolProblem.from_args(x.shape, 3, 2, 1, 1, True)
    y, idx = eng.pool_fprop(pp, x)
    y0, i0 = numpy_engine.pool_fprop(pp, np.ascontiguousarray(x))
    assert _is_cl(y) and _is_cl(idx)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(idx, i0)
    dy = cl(rng.standard_normal(y.shape))
    dx = eng.pool_dgrad(pp, dy, idx)
    assert _is_cl(dx)
    # overlapping windows: sums in another order than the NumPy engine's histogram
    np.testing.assert_allclose(dx, numpy_engine.pool_dgrad(pp, np.ascontiguousarray(dy), i0),
                               rtol=1e-13, atol=1e-13)
    g = cl(rng.standard_normal(x.shape))
    for kind in ("relu", "elu", "sigmoid"):
        a = eng.act_fprop(kind, x, 1.0)
        assert _is_cl(a) and memory_format(a) == "nhwc"
        np.testing.assert_allclose(a, numpy_engine.act_fprop(kind, x, 1.0), rtol=1e-15)
        d = eng.act_dgrad(kind, x, a, g, 1.0)
        assert _is_cl(d)
        np.testing.assert_allclose(d, numpy_engine.act_dgrad(kind, x, a, g, 1.0), rtol=1e-15)


POOLS = [((2, 3, 7, 8), (3, 2, 1, 1, True)), ((2, 5, 8, 8), (2, 2, 0, 1, False)),
         ((1, 4, 9, 7), ((3, 2), (1, 2), (1, 0), (2, 1), False)), ((3, 2, 5, 6), (2, 3, 1, 1, True))]


@pytest.mark.parametrize("dtype", (np.float64, np.float32))
@pytest.mark.parametrize("xs, args", POOLS, ids=("overlap_ceil", "2x2", "dil_asym", "s3_pad"))
def test_max_pool_nhwc_kernels(eng, xs, args, dtype):
    """A channels_last pool runs pool.cu's NHWC kernels on the memory as it is (no NCHW launch,
    no copy of x): the NumPy engine's y, idx (ties and a NaN included) and dx; an NCHW idx with a
    channels_last dy is converted once."""
    rng = np.random.default_rng(9)
    x0 = np.round(rng.standard_normal(xs) * 2).astype(dtype)   # ties
    x0[0, 0, 1, 1] = np.nan
    x = cl(x0)
    pp = PoolProblem.from_args(x.shape, *args)
    kernel_host.launches.clear()
    y, idx = eng.pool_fprop(pp, x)
    y0, i0 = numpy_engine.pool_fprop(pp, x0)
    assert _is_cl(y) and _is_cl(idx)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(idx, i0)
    dy0 = rng.standard_normal(y0.shape).astype(dtype)
    dx0 = numpy_engine.pool_dgrad(pp, dy0, i0)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for idx_in in (idx, np.ascontiguousarray(idx)):
        dx = eng.pool_dgrad(pp, cl(dy0), idx_in)
        assert _is_cl(dx) and dx.dtype == dtype
        np.testing.assert_allclose(dx, dx0, rtol=tol, atol=tol)
    names = " ".join(kernel_host.launches)
    assert "maxpool_fprop_nhwc" in names and "maxpool_dgrad_nhwc" in names
    assert "maxpool_fprop<" not in names and "maxpool_dgrad<" not in names


def test_autotuner_calls_nhwc_candidates_in_their_layout():
    """An "nhwc"-only candidate gets physical NHWC inputs and is judged in the NCHW order: the
    correct one is accepted and timed, a wrong one rejected."""
    from gpuconv import autotune
    p = _problem(CASES[0])
    calls = []
    good = _nhwc_algorithms(calls)["fprop"]

    def wrong(p, x, w, bias):  # the right numbers in the wrong (NCHW) order
        return numpy_engine.conv_fprop(p, x.transpose(0, 3, 1, 2), w.transpose(0, 3, 1, 2),
                                       bias)
    wrong.layouts = ("nhwc",)

    def ref(p, x, w, bias):
        return numpy_engine.conv_fprop(p, x, w, bias)
    registry = {"im2col_gemm": ref, "nhwc_good": good, "nhwc_wrong": wrong}
    tu = autotune.Autotuner(timer=lambda fn: 1.0, device_name="d", source_hash="h",
                            cache_dir="")   # no disk cache
    inputs = autotune.random_inputs("fprop", p, np.float64, np, seed=1)
    best, times = tu._tune(p, np.float64, False, list(registry), registry, lambda: inputs,
                           lambda *a: ref(p, *a))
    assert isinstance(times["nhwc_good"], float), times
    assert str(times["nhwc_wrong"]).startswith("rejected"), times
    assert calls and calls[0][1].shape == (p.N, p.H, p.W, p.C)  # physical NHWC input
