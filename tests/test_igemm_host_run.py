"""The second-generation kernels *run* on the CPU (tests/igemm_host.py: one fiber per CUDA thread,
__syncthreads a real barrier, shared memory poisoned before every block), driven by
gpuconv.engines.cuda_igemm's own host code (argument structs, tile configs, launch grids, dgrad
phase tables, split-K sizing, the Winograd pipeline with NumPy's matmul for cuBLAS), against the
NumPy engine in float64.

What runs: every instantiation of cuda_igemm.IGEMM_KERNELS. The SIMT implicit-GEMM kernels (fp32
128x128 and 64x64, fp64 64x64; fprop, dgrad, wgrad with split-K and its reduce), Winograd
F(2x2,3x3) and direct depthwise run as written. The tensor-core kernels (fp16 m16n8k16, tf32
m16n8k8) run against an *emulation* of mma.sync and of the cvt conversions (igemm_host.py), so
their fragment indexing is checked against the PTX ISA's fragment tables as igemm_host.py
transcribes them, not against hardware. bfloat16 (ml_dtypes.bfloat16 on the host; skipped
without ml_dtypes) runs the bf16 mma emulation and the bf16 depthwise path on a subset
(Winograd is float32 / float64 only). tests/test_igemm_gpu.py is the check on a real GPU.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import cuda_igemm as ig
from gpuconv.engines import numpy_engine as ne

from . import cuda_checks as cc
from . import igemm_host as ih
from .kernel_host import CXX
from .problems import PROBLEMS
from .test_igemm_gpu import EXTRA
from .test_igemm_host import WINO_PROBLEMS

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ is not installed: cannot run the "
                                                    "kernels on the host")

REF = {"fprop": ne.conv_fprop, "dgrad": ne.conv_dgrad, "wgrad": ne.conv_wgrad}
SIMT = [("float64", "64x64"), ("float32", "64x64"), ("float32", "128x128")]
TC = [("float16", "64x64"), ("float32+tf32", "64x64")]  # emulated mma.sync
TC_BF16 = [("bfloat16", "64x64"), ("bfloat16", "128x128")]  # the same fragments, bf16 data
TC_BIG = [("float16", "128x128"), ("float32+tf32", "128x128")]
CASES = PROBLEMS + EXTRA + [
    ("stride_gt_input", (2, 2, 2, 3), (3, 2, 1, 1), dict(stride=3)),  # dgrad phases with no rows
    ("stride16", (1, 2, 20, 35), (3, 2, 3, 3), dict(stride=(16, 15), padding=1)),  # IG_MAXS
    ("wide_k", (1, 40, 5, 6), (130, 20, 3, 3), dict(padding=1, groups=2)),  # n-blocks, long k
]


@pytest.fixture(scope="module")
def _libs():
    return ih.build()


@pytest.fixture
def host(_libs, monkeypatch):
    ih.install(monkeypatch)
    ih.set_order("forward")
    yield
    ih.set_order("forward")


def _inputs(op, p, dtype, seed):
    rng = np.random.default_rng(seed)
    shapes = {"fprop": (p.x_shape, p.w_shape, (p.K,)), "dgrad": (p.w_shape, p.y_shape),
              "wgrad": (p.x_shape, p.y_shape)}[op]
    return tuple(rng.uniform(-1, 1, s).astype(dtype) for s in shapes)


def run(algo, p, op, dtype, seed=0, offsets=None):
    """algo on fresh inputs (device copies inside NaN guards); checks the output against the
    NumPy engine, that nothing was written outside an array, and returns the output.
    dtype "float32+tf32": float32 data with TF32 allowed (the tf32 tensor-core path)."""
    dtype, tf32 = dtype.split("+")[0], dtype.endswith("+tf32")
    cc.dtype(dtype)  # bfloat16 without ml_dtypes: skip, saying so
    host = _inputs(op, p, dtype, seed)
    offsets = offsets or (0,) * len(host)
    config.set_allow_tf32(tf32)
    try:
        out = algo(p, *(ih.to_device(a, o) for a, o in zip(host, offsets)))
    finally:
        config.set_allow_tf32(False)
    ih.check_guards()
    ref = REF[op](p, *(a.astype(np.float64) for a in host))
    assert out.dtype == np.dtype(dtype)
    if tf32:  # operands rounded to 10-bit mantissas: the GPU test's relative-error bound
        err = autotune.relative_error(np.asarray(out, np.float64), ref)
        assert err <= autotune.tolerance(np.dtype(dtype), True), f"{op} {algo.name} {p}: {err}"
    else:
        cc.assert_close(np.asarray(out), ref, dtype, f"{op} {algo.name} {p}")
    if op == "dgrad":  # pixels no window reached are exact zeros
        assert np.all(np.asarray(out)[ref == 0] == 0)
    return np.array(out)


def _problem(case):
    _, xs, ws, kw = case
    return ConvProblem.from_args(xs, ws, **kw)


# ---- implicit GEMM ---------------------------------------------------------------------------
# SIMT: every problem; tensor cores (emulated, slower): the shared problems, the 128x128 tile on
# a few of them
IGEMM = ([(c, d, t, False) for c in CASES for d, t in SIMT]
         + [(c, d, t, True) for c in PROBLEMS for d, t in TC]
         + [(c, d, t, True) for c in PROBLEMS[:6] for d, t in TC_BIG]
         + [(c, d, t, True) for c in PROBLEMS[:4] for d, t in TC_BF16])


@pytest.mark.parametrize("op", ("fprop", "dgrad", "wgrad"))
@pytest.mark.parametrize("case,dtype,label,tc", IGEMM,
                         ids=[f"{c[0]}-{d}-{'tc' if tc else 'simt'}_{t}" for c, d, t, tc in IGEMM])
def test_igemm(host, case, dtype, label, tc, op):
    p = _problem(case)
    algo = ig.IgemmAlgorithm(op, tc, label)
    config.set_allow_tf32(dtype.endswith("+tf32"))
    try:
        assert algo.supports(p, cc.dtype(dtype.split("+")[0]))
        ct, mode, tile = algo._config(dtype.split("+")[0])
    finally:
        config.set_allow_tf32(False)
    assert mode == {"float16": ig.MODE_F16, "bfloat16": ig.MODE_F16,
                    "float32+tf32": ig.MODE_TF32}.get(dtype, ig.MODE_SIMT)
    run(algo, p, op, dtype)
    assert ih.launches[0][0] == ig.igemm_name(op, ct, mode, tile)


def test_igemm_runs_barriers_and_multiblock_tiles(host):
    """K = 70 over 64-wide tiles: two n-blocks, the second mostly outside; several m-blocks."""
    p = ConvProblem.from_args((3, 37, 19, 23), (70, 37, 3, 3), padding=1)
    before = ih.barriers()
    run(ig.IgemmAlgorithm("fprop", False, "64x64"), p, "fprop", "float32")
    _, grid, block, _ = ih.launches[-1]
    assert grid == (-(-3 * 19 * 23 // 64), 2, 1) and block == (128, 1, 1)
    slabs = -(-37 * 9 // 16)
    assert ih.barriers() - before == grid[0] * grid[1] * (slabs + 1)


SPLIT_K = [(d, t, False) for d, t in SIMT] + [("float16", "64x64", True),
                                              ("bfloat16", "64x64", True)]


@pytest.mark.parametrize("dtype,label,tc", SPLIT_K,
                         ids=[f"{d}-{'tc' if tc else 'simt'}_{t}" for d, t, tc in SPLIT_K])
def test_wgrad_split_k(host, dtype, label, tc):
    """A long N*P*Q reduction: split-K > 1, the workspace and igemm_wgrad_reduce in use."""
    p = ConvProblem.from_args((4, 3, 24, 20), (5, 3, 3, 3), padding=1)
    algo = ig.IgemmAlgorithm("wgrad", tc, label)
    splits = ig.wgrad_splits(p, algo._config(dtype)[2], 132)
    assert splits > 1
    run(algo, p, "wgrad", dtype)
    (name, grid, _, (args,)), (reduce, *_) = ih.launches
    assert args["splits"][0] == splits and grid[2] == splits
    assert reduce == f"igemm_wgrad_reduce<{ig.ctype_of(dtype)}>"


@pytest.mark.parametrize("dtype", ("float16", "float32+tf32"))
def test_wgrad_tensor_cores_one_split(host, dtype):
    """One split: the unused workspace argument still has the accumulator type (fp32 for fp16
    data; the host used to pass the fp16 dw there, which the launch's type check refuses)."""
    p = ConvProblem.from_args((1, 2, 5, 6), (3, 2, 3, 3), padding=1)
    run(ig.IgemmAlgorithm("wgrad", True, "64x64"), p, "wgrad", dtype)
    assert ih.launches[0][3][0]["splits"][0] == 1


def test_wgrad_split_k_grouped_and_strided(host):
    p = ConvProblem.from_args((3, 4, 21, 19), (6, 2, 3, 2), stride=2, padding=1, dilation=(1, 2),
                              groups=2)
    algo = ig.IgemmAlgorithm("wgrad", False, "64x64")
    run(algo, p, "wgrad", "float64")
    assert ih.launches[0][3][0]["splits"][0] > 1 and ih.launches[0][1][2] > 2


def test_wgrad_split_k_with_vector_loads(host):
    """dy rows read 16 bytes at a time (P*Q = 96) while split-K cuts N*P*Q into chunks."""
    p = ConvProblem.from_args((12, 3, 8, 12), (5, 3, 3, 3), padding=1)
    run(ig.IgemmAlgorithm("wgrad", False, "64x64"), p, "wgrad", "float32")
    args = ih.launches[0][3][0]
    assert args["vec_a"][0] == 1 and args["splits"][0] > 1


def test_wgrad_split_k_empty_splits(host, monkeypatch):
    """Many SMs: 64 splits of a k = 8281 reduction; rounding k_chunk up to BK leaves the last
    splits with no k at all, which must contribute zeros."""
    monkeypatch.setattr(ig, "_current_sm_count", lambda: 10000)
    p = ConvProblem.from_args((1, 2, 91, 91), (3, 2, 1, 1))
    run(ig.IgemmAlgorithm("wgrad", False, "64x64"), p, "wgrad", "float32")
    args = ih.launches[0][3][0]
    splits, chunk = int(args["splits"][0]), int(args["k_chunk"][0])
    assert splits == 64 and (splits - 1) * chunk >= 91 * 91


@pytest.mark.parametrize("op,dtype", [("fprop", "float32"), ("fprop", "float64"),
                                      ("wgrad", "float32"), ("wgrad", "float64")])
@pytest.mark.parametrize("misalign", (False, True), ids=("aligned", "misaligned"))
def test_vector_loads(host, op, dtype, misalign):
    """fprop's w (Cg*R*S = 8*3*3 = 72) and wgrad's dy (P*Q = 8*12 = 96) are whole 16-byte
    groups: the 16-byte path is on for an aligned base and off (scalar path) for a misaligned
    one; the shim refuses a misaligned 16-byte load."""
    p = ConvProblem.from_args((2, 8, 8, 12), (12, 8, 3, 3), padding=1)
    algo = ig.IgemmAlgorithm(op, False, "64x64")
    offsets = (0, 1, 0) if op == "fprop" else (0, 1)  # w / dy one element off
    run(algo, p, op, dtype, offsets=offsets if misalign else None)
    flag = "vec_b" if op == "fprop" else "vec_a"
    assert ih.launches[0][3][0][flag][0] == (0 if misalign else 1)


@pytest.mark.parametrize("op", ("fprop", "dgrad", "wgrad"))
@pytest.mark.parametrize("order", ("reverse", "shuffle"))
def test_igemm_schedule_independent(host, op, order):
    """A race-free block gives bitwise the same result whatever order its threads run in."""
    p = ConvProblem.from_args((2, 5, 11, 9), (7, 5, 3, 3), stride=2, padding=1)
    for label, dtype in (("128x128", "float32"), ("64x64", "float64")):
        algo = ig.IgemmAlgorithm(op, False, label)
        first = run(algo, p, op, dtype, seed=3)
        ih.set_order(order, seed=11)
        again = run(algo, p, op, dtype, seed=3)
        ih.set_order("forward")
        assert np.array_equal(first, again)


# ---- direct depthwise and Winograd F(2x2, 3x3) ----------------------------------------
DW_CASES = [c for c in PROBLEMS if _problem(c).is_depthwise] + [
    ("depthwise_mult3_asym", (1, 2, 7, 6), (6, 1, 2, 4), dict(groups=2, padding="same")),
    ("depthwise_long", (3, 2, 13, 14), (2, 1, 3, 3), dict(groups=2, padding=1)),  # N*P*Q > 256
]


WINO_CASES = [c for c in PROBLEMS if ig.winograd_supports(_problem(c))] + WINO_PROBLEMS
NON_GEMM = ([(ig.DepthwiseAlgorithm, c, op) for c in DW_CASES for op in ("fprop", "dgrad", "wgrad")]
            + [(ig.WinogradAlgorithm, c, op) for c in WINO_CASES for op in ("fprop", "dgrad")])


@pytest.mark.parametrize("dtype", ("float64", "float32", "float16", "bfloat16"))
@pytest.mark.parametrize("kind,case,op", NON_GEMM,
                         ids=[f"{k.name}-{c[0]}-{op}" for k, c, op in NON_GEMM])
def test_depthwise_and_winograd(host, kind, case, op, dtype):
    """direct_depthwise (fprop/dgrad/wgrad) and winograd_f2x3 (fprop/dgrad; 32/64-bit only)."""
    p = _problem(case)
    algo = kind(op)
    if kind is ig.WinogradAlgorithm and dtype in ("float16", "bfloat16"):
        assert not algo.supports(p, cc.dtype(dtype))
        return
    assert algo.supports(p, cc.dtype(dtype))
    run(algo, p, op, dtype)


@pytest.mark.parametrize("op", ("fprop", "dgrad"))
def test_grid_stride_loops(host, monkeypatch, op):
    """2 blocks of 256 threads for 1-D kernels: their grid-stride loops go round."""
    monkeypatch.setattr(ih.HostKernel, "grid_cap", 2)
    p = ConvProblem.from_args((3, 4, 13, 14), (8, 1, 3, 3), groups=4, padding=1)
    run(ig.DepthwiseAlgorithm(op), p, op, "float32")
    assert ih.launches[-1][1] == (2, 1, 1)
    q = ConvProblem.from_args((3, 4, 15, 14), (5, 4, 3, 3), padding=1)
    run(ig.WinogradAlgorithm(op), q, op, "float64")
    p = ConvProblem.from_args((6, 3, 24, 20), (40, 3, 3, 3), padding=1)  # reduce: 1080 elements
    run(ig.IgemmAlgorithm("wgrad", False, "64x64"), p, "wgrad", "float32")
    assert ih.launches[-1][0].startswith("igemm_wgrad_reduce") and ih.launches[-1][1] == (2, 1, 1)


def test_dw_wgrad_schedule_independent(host):
    p = ConvProblem.from_args((3, 2, 13, 14), (4, 1, 3, 3), groups=2, padding=1)
    algo = ig.DepthwiseAlgorithm("wgrad")
    first = run(algo, p, "wgrad", "float32", seed=5)
    ih.set_order("reverse")
    assert np.array_equal(first, run(algo, p, "wgrad", "float32", seed=5))


@pytest.mark.parametrize("op", ("fprop", "dgrad"))
def test_winograd_chunked(host, op):
    """A 1-byte workspace: one image per chunk (wino_input/wino_output per image)."""
    p = ConvProblem.from_args((3, 4, 7, 8), (6, 2, 3, 3), groups=2, padding=1)
    with gpuconv.workspace_limit(1):
        run(ig.WinogradAlgorithm(op), p, op, "float32")
    names = [n for n, *_ in ih.launches]
    assert names.count("wino_input<float, float>") == 3 == names.count("wino_output<float, float>")


# ---- the harness itself ----------------------------------------------------------------------
BAD = r"""
// reads its neighbour's shared slot with no barrier in between: a race
__global__ void racy(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}
// sums a shared array it never initialised: relies on zeroed shared memory
__global__ void uninit(float* out) {
    __shared__ float s[64];
    if (threadIdx.x == 0) s[0] = 1.0f;
    __syncthreads();
    if (threadIdx.x == 0) { float t = 0; for (int i = 0; i < 64; ++i) t += s[i]; out[0] = t; }
}
__global__ void divergent(float* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.0f;
}
__global__ void misaligned(const float* in, float* out) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(in + 1));
    out[0] = __uint_as_float(v.x);
}
"""


@pytest.fixture(scope="module")
def bad(_libs):
    names = ("racy", "uninit", "divergent", "misaligned")
    lib = ih.compile_source("harness_selftest", BAD, names)
    return {n: ih.HostKernel(n, lib) for n in names}


def test_harness_detects_races(bad):
    out = np.zeros(64, np.float32)
    for order, code in (("forward", 0), ("reverse", 1)):
        bad["racy"].lib.dll.gc_set_order(code, ih.ctypes.c_ulonglong(1))
        bad["racy"]((1,), (64,), (out,))
        if order == "forward":
            first = out.copy()
    bad["racy"].lib.dll.gc_set_order(0, ih.ctypes.c_ulonglong(1))
    assert not np.array_equal(first, out)


def test_harness_poisons_shared_memory(bad):
    out = np.zeros(1, np.float32)
    bad["uninit"]((2,), (64,), (out,))
    assert np.isnan(out[0])


def test_harness_flags_divergent_barrier_and_misaligned_vector_load(bad):
    with pytest.raises(AssertionError, match="only part of the block"):
        bad["divergent"]((1,), (64,), (np.zeros(64, np.float32),))
    with pytest.raises(AssertionError, match="misaligned"):
        bad["misaligned"]((1,), (1,), (np.zeros(8, np.float32), np.zeros(1, np.float32)))


def test_harness_checks_argument_types(bad, host):
    with pytest.raises(AssertionError, match="4-byte elements"):
        bad["uninit"]((1,), (64,), (np.zeros(1, np.float64),))
    with pytest.raises(TypeError, match="untyped"):
        ih.HostKernel("igemm_wgrad_reduce<float>")((1,), (32,), (
            np.zeros(4, np.float32), np.zeros(2, np.float32), 2, np.int32(2)))
    with pytest.raises(AssertionError, match="parameter 2 is 8 bytes"):
        ih.HostKernel("igemm_wgrad_reduce<float>")((1,), (32,), (
            np.zeros(4, np.float32), np.zeros(2, np.float32), np.int32(2), np.int32(2)))
