"""GPU checks at real layer sizes: many waves, many k-slabs, partial tiles, split-K with forced
split counts, the autotuner with the second generation end to end, and an output of more than
2^31 elements. Every result is compared with the NumPy engine in float64 twice: the relative
norm and the largest element error (gpuconv.doctor.compare), with every CuPy allocation
NaN-filled first so an element no kernel writes fails.

Inputs are multiples of 1/64 (gpuconv.doctor.exact_inputs): exact in every dtype, so one float64
reference per (shape, op) serves all dtypes and algorithms -- the NumPy reference on the CPU is
the slow part, computed once per shape and op and cached (:class:`ReferenceCache`).

GPU tests are marked ``gpu`` (skipped with the reason here; ``--require-gpu`` on a GPU machine).
The helpers' logic (shape sizes, caching, the parameter lists) is tested on the CPU below.
Budget, estimated (no GPU has run it yet): about a minute on an H200 with 16 CPU cores; the
float64 references, ~90 GFLOP of NumPy work on the CPU, dominate; 188 GPU tests.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import ConvProblem, autotune, config
from gpuconv import doctor as dr
from gpuconv.engines import cuda_engine, cuda_igemm

gpu = pytest.mark.gpu

#: (input shape, weight shape, kwargs). ResNet-50 3x3 at batch 32 (784 M-tiles of 128: ~6 waves
#: on 132 SMs; 576-long k: 36 slabs of 16), its stride-2 3x3 (4 dgrad phases), and a VGG 3x3
#: layer with ragged sizes (57x57, K = 130: partial tiles in M and N; k = 1152: 72 slabs).
LARGE = {
    "r50_3x3": ((32, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
    "r50_3x3_s2": ((32, 128, 56, 56), (128, 128, 3, 3), dict(stride=2, padding=1)),
    "vgg_ragged": ((16, 128, 57, 57), (130, 128, 3, 3), dict(padding=1)),
}
OPS = dr.OPS
SPLITS = (1, 2, 3, 8, 29)  # 29: a split count that divides nothing
SM_REF = 132  # H100/H200 SXM streaming multiprocessors, for the "many waves" check


def problem(name):
    xs, ws, kw = LARGE[name]
    return ConvProblem.from_args(xs, ws, **kw)


class ReferenceCache:
    """(problem, float64 inputs, float64 reference) per (shape name, op), computed once; and the
    inputs/reference as device arrays, uploaded once per dtype."""

    def __init__(self, shapes, compute=dr.numpy_reference):
        self.shapes, self.compute = shapes, compute
        self._host, self._dev = {}, {}

    def host(self, name, op):
        key = (name, op)
        if key not in self._host:
            xs, ws, kw = self.shapes[name]
            p = ConvProblem.from_args(xs, ws, **kw)
            inputs = dr.exact_inputs(op, p, dr.stable_seed("large", name, op))
            self._host[key] = (p, inputs, self.compute(op, p, inputs))
        return self._host[key]

    def device(self, name, op, key, xp):
        """(problem, inputs in the dtype of `key`, float64 reference) on module xp."""
        dkey = (name, op, dr.dtype_of(key).name)
        if dkey not in self._dev:
            p, inputs, ref = self.host(name, op)
            self._dev[dkey] = (p, [dr.upload(a, dr.dtype_of(key), xp) for a in inputs],
                               xp.asarray(ref))
        return self._dev[dkey]


REFS = ReferenceCache(LARGE)


def _dtype_or_reason(key):
    try:
        return dr.dtype_of(key), None
    except ValueError as e:
        return None, str(e)


def algorithm_params(shapes=LARGE, registry=None):
    """pytest params (shape, op, key, algorithm) for every algorithm that supports the case."""
    registry = cuda_engine.ALGORITHMS if registry is None else registry
    out = []
    for name, (xs, ws, kw) in shapes.items():
        p = ConvProblem.from_args(xs, ws, **kw)
        for op in OPS:
            for key in dr.DTYPE_KEYS:
                dtype, why = _dtype_or_reason(key)
                if dtype is None:
                    out.append(pytest.param(name, op, key, None, id=f"{name}-{op}-{key}",
                                            marks=pytest.mark.skip(reason=why)))
                    continue
                for algo, fn in registry[op].items():
                    if dr.applies(fn, p, key):
                        out.append(pytest.param(name, op, key, algo,
                                                id=f"{name}-{op}-{key}-{algo}"))
    return out


def _check(cp, out, ref, key, what):
    res = dr.compare(out, ref, key)
    assert res["ok"], f"{what}: {res['reason']} (rel {res['rel_err']}, max {res['max_err']})"


def _run(cp, fn, p, inputs, key):
    with dr.tf32_mode(key), dr.nan_filled_allocations(cp):
        out = fn(p, *inputs)
        cp.cuda.Device().synchronize()
    return out


# ---------------------------------------------------------------------------------------------
# every algorithm x dtype at real sizes
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("name,op,key,algo", algorithm_params())
def test_large(cp, name, op, key, algo):
    p, inputs, ref = REFS.device(name, op, key, cp)
    out = _run(cp, cuda_engine.ALGORITHMS[op][algo], p, inputs, key)
    assert out.dtype == dr.dtype_of(key)
    _check(cp, out, ref, key, f"{op} {algo} {key} on {p}")


@gpu
@pytest.mark.parametrize("splits", SPLITS)
@pytest.mark.parametrize("key", ("float32", "float32+tf32", "float16", "bfloat16", "float64"))
@pytest.mark.parametrize("name", ("r50_3x3", "vgg_ragged"))
def test_wgrad_split_k(cp, monkeypatch, name, key, splits):
    """The implicit-GEMM wgrad with its split count forced (workspace + ordered reduce)."""
    dtype, why = _dtype_or_reason(key)
    if dtype is None:
        pytest.skip(why)
    p, inputs, ref = REFS.device(name, "wgrad", key, cp)
    asked = []

    def forced(*args, **kwargs):
        asked.append(args)
        return splits
    monkeypatch.setattr(cuda_igemm, "wgrad_splits", forced)
    algos = {a: fn for a, fn in cuda_engine.ALGORITHMS["wgrad"].items()
             if a.startswith("igemm") and dr.applies(fn, p, key)}
    if not algos:
        pytest.skip(f"no implicit-GEMM wgrad algorithm runs {key}")
    for algo, fn in algos.items():
        out = _run(cp, fn, p, inputs, key)
        _check(cp, out, ref, key, f"wgrad {algo} {key} splits={splits}")
    assert asked, "cuda_igemm.wgrad_splits was not consulted: the split count was not forced"


# ---------------------------------------------------------------------------------------------
# the autotuner with the second generation, through the public API
# ---------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("key", dr.DTYPE_KEYS)
def test_autotune_second_generation_end_to_end(cp, monkeypatch, tmp_path, key):
    dtype, why = _dtype_or_reason(key)
    if dtype is None:
        pytest.skip(why)
    monkeypatch.setenv("GPUCONV_AUTOTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_tuners", {})
    name = "r50_3x3"
    kw = LARGE[name][2]
    gpuconv.set_second_generation(True)
    config.set_autotune(True)
    try:
        with dr.tf32_mode(key):
            calls = {
                "fprop": lambda p, x, w, b: gpuconv.conv2d(x, w, b, **kw),
                "dgrad": lambda p, w, dy: gpuconv.conv2d_grad_input(p.x_shape, w, dy, **kw),
                "wgrad": lambda p, x, dy: gpuconv.conv2d_grad_weight(x, p.w_shape, dy, **kw),
            }
            for op, call in calls.items():
                p, inputs, ref = REFS.device(name, op, key, cp)
                out = _run(cp, call, p, inputs, key)
                _check(cp, out, ref, key, f"auto {op} {key}")
            tuner = autotune._gpu_tuner()
            tuned = len(tuner.log)
            assert tuned == len(calls), f"expected one tuning run per op, got {tuner.log}"
            for (k, times) in tuner.log:
                assert any(isinstance(t, float) for t in times.values()), \
                    f"no candidate passed the autotuner's check for {k}: {times}"
            for op, call in calls.items():  # the second call hits the memory cache
                p, inputs, _ = REFS.device(name, op, key, cp)
                call(p, *inputs)
            assert len(tuner.log) == tuned
    finally:
        gpuconv.set_second_generation(None)
        config.set_autotune(None)
    assert list(tmp_path.glob("autotune-*.json")), "the choices were not written to disk"


# ---------------------------------------------------------------------------------------------
# a tensor of more than 2^31 elements
# ---------------------------------------------------------------------------------------------
#: fprop, float16: y = 130 x 64 x 512 x 512 = 2.18e9 elements (4.4 GB); image 128 starts at
#: element exactly 2^31, so the images checked straddle the boundary a 32-bit index wraps at.
BIG = ((130, 8, 512, 512), (64, 8, 1, 1), dict())
BIG_IMAGES = (0, 127, 128, 129)


def big_problem():
    xs, ws, kw = BIG
    return ConvProblem.from_args(xs, ws, **kw)


def big_bytes(p, itemsize=2):
    """Device memory one run needs: x, y, the column-matrix workspace limit, and headroom."""
    return (p.N * p.C * p.H * p.W + p.N * p.K * p.P * p.Q) * itemsize \
        + gpuconv.get_workspace_limit() + (2 << 30)


@gpu
@pytest.mark.parametrize("algo", [a for a, fn in cuda_engine.ALGORITHMS["fprop"].items()
                                  if dr.applies(fn, big_problem(), "float16")])
def test_fprop_output_over_2_31_elements(cp, algo):
    p = big_problem()
    free, _ = cp.cuda.runtime.memGetInfo()
    need = big_bytes(p)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of device memory, {free / 2**30:.1f} free")
    rs = cp.random.RandomState(dr.stable_seed("big", algo))
    x = (rs.randint(-dr.GRID, dr.GRID + 1, p.x_shape, dtype=np.int32) / dr.GRID).astype(
        np.float16)
    w = (rs.randint(-dr.GRID, dr.GRID + 1, p.w_shape, dtype=np.int32) / dr.GRID).astype(
        np.float16)
    y = _run(cp, cuda_engine.ALGORITHMS["fprop"][algo], p, (x, w, None), "float16")
    assert y.shape == p.y_shape and y.size > 2**31
    assert not bool(cp.isnan(y).any()), "output elements left unwritten (NaN from the allocator)"
    w64 = cp.asnumpy(w).astype(np.float64)
    one = p.with_batch(1)
    for n in BIG_IMAGES:
        ref = dr.numpy_reference("fprop", one, (cp.asnumpy(x[n:n + 1]).astype(np.float64), w64,
                                                np.zeros(p.K)))
        _check(cp, y[n:n + 1], cp.asarray(ref), "float16", f"{algo} image {n}")
    del x, y


@gpu
def test_nan_filled_allocations_poison_new_memory(cp):
    """The allocator the checks rely on: fresh arrays are all NaN; the old one is restored."""
    old = cp.cuda.get_allocator()
    for dt in (cp.float16, cp.float32, cp.float64):
        with dr.nan_filled_allocations(cp):
            a = cp.empty(12345, dt)
        assert bool(cp.isnan(a).all())
    assert cp.cuda.get_allocator() == old


# ---------------------------------------------------------------------------------------------
# CPU: the helpers' logic (runs everywhere)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(LARGE))
def test_large_shapes_are_real_sizes(name):
    p = problem(name)
    for op in OPS:
        g, m, n, k = p.gemm_shape(op)
        if op == "dgrad":  # one GEMM per stride phase; the largest
            m = p.N * -(-p.H // p.stride_h) * -(-p.W // p.stride_w)
        blocks = g * -(-m // 128) * -(-n // 128)
        if op != "wgrad":  # wgrad's small grid is what split-K is for
            assert blocks > SM_REF, f"{name} {op}: {blocks} 128x128 tiles, under one wave"
        assert k // 16 >= 32, f"{name} {op}: only {k // 16} k-slabs of 16"
    if name == "vgg_ragged":  # partial tiles in both GEMM dimensions
        g, m, n, k = p.gemm_shape("fprop")
        assert m % 128 and n % 128 and n % 64


def test_big_problem_crosses_2_31():
    p = big_problem()
    per_image = p.K * p.P * p.Q
    assert p.N * per_image > 2**31
    # the checked images include the last one wholly below 2^31 and the first above it
    assert any((n + 1) * per_image <= 2**31 < (n + 2) * per_image for n in BIG_IMAGES)
    assert max(BIG_IMAGES) < p.N


def test_reference_cache_computes_once_and_is_stable():
    calls = []

    def compute(op, p, inputs):
        calls.append(op)
        return dr.numpy_reference(op, p, inputs)

    shapes = {"tiny": ((2, 3, 7, 6), (4, 3, 3, 3), dict(padding=1))}
    cache = ReferenceCache(shapes, compute)
    a = cache.host("tiny", "fprop")
    assert cache.host("tiny", "fprop") is a and calls == ["fprop"]
    cache.host("tiny", "wgrad")
    assert calls == ["fprop", "wgrad"]
    # a second cache (a second process) draws the same inputs
    b = ReferenceCache(shapes).host("tiny", "fprop")
    for u, v in zip(a[1], b[1]):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a[2], b[2])
    # the device copies (NumPy standing in for CuPy) are uploaded once per dtype, exactly
    d1 = cache.device("tiny", "fprop", "float16", np)
    assert cache.device("tiny", "fprop", "float16", np) is d1
    assert d1[1][0].dtype == np.float16
    np.testing.assert_array_equal(d1[1][0].astype(np.float64), a[1][0])
    assert calls == ["fprop", "wgrad"]


def test_algorithm_params_cover_every_case():
    """Every (shape, op, dtype) gets at least one algorithm, and TF32 only tensor-core ones."""
    params = algorithm_params()
    seen = {}
    for prm in params:
        name, op, key, algo = prm.values
        if algo is None:  # dtype unavailable here (no ml_dtypes): skipped with the reason
            assert prm.marks
            continue
        seen.setdefault((name, op, key), []).append(algo)
    for name in LARGE:
        for op in OPS:
            for key in dr.DTYPE_KEYS:
                if _dtype_or_reason(key)[0] is None:
                    continue
                assert seen.get((name, op, key)), f"no algorithm runs {name} {op} {key}"
                if key.endswith("+tf32"):
                    assert all("_tc_" in a for a in seen[(name, op, key)])
    assert "im2col_gemm" in seen[("r50_3x3", "fprop", "float32")]


def test_algorithm_params_follow_supports():
    class Algo:
        def __init__(self, ok):
            self.ok = ok

        def supports(self, p, dtype):
            return self.ok(p, dtype)

    reg = {op: {"plain": lambda *a: None,
                "only_fp16": Algo(lambda p, d: d == np.float16),
                "tf32_only": Algo(lambda p, d: d == np.float32 and config.get_allow_tf32())}
           for op in OPS}
    shapes = {"tiny": ((1, 2, 5, 5), (2, 2, 3, 3), dict())}
    got = {(prm.values[2], prm.values[3]) for prm in algorithm_params(shapes, reg)
           if prm.values[3]}
    assert ("float16", "only_fp16") in got and ("float32", "only_fp16") not in got
    assert ("float32+tf32", "tf32_only") in got and ("float32", "tf32_only") not in got
    assert ("float32+tf32", "plain") not in got and ("float64", "plain") in got
