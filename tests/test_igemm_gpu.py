"""GPU checks of the second-generation algorithms against the NumPy engine (float64 reference).

Every algorithm of gpuconv.engines.cuda_igemm x every dtype it supports x the shared problem list
plus a few shapes that exercise tile edges, 16-byte loads and split-K. Fresh random inputs per
test; relative error ‖out − ref‖ / ‖ref‖ under autotune's per-dtype tolerance; NaN fails.
"""
import numpy as np
import pytest

from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import cuda_igemm as ig
from gpuconv.engines import numpy_engine as ne

from . import cuda_checks as cc
from .problems import PROBLEMS

pytestmark = pytest.mark.gpu

EXTRA = [  # tile edges, vector loads (Cg*R*S, P*Q multiples of 8), split-K, stride-4 phases
    ("tile_edges", (3, 37, 19, 23), (70, 37, 3, 3), dict(padding=1)),
    ("vec_1x1", (2, 64, 16, 16), (96, 64, 1, 1), dict()),
    ("splitk_wgrad", (8, 16, 32, 32), (16, 16, 3, 3), dict(padding=1)),
    ("alexnet_like_s4", (2, 3, 63, 63), (16, 3, 11, 11), dict(stride=4, padding=2)),
]
CASES = [(n, xs, ws, kw) for n, xs, ws, kw in PROBLEMS + EXTRA]
DTYPES = ["float64", "float32", "float32+tf32", "float16", "bfloat16"]
ALGOS = [(op, a) for op, lst in ig.algorithms().items() for a in lst]


def _run(cp, op, algo, p, dtype_name, seed):
    tf32 = dtype_name.endswith("+tf32")
    dtype = cc.dtype(dtype_name.split("+")[0])
    config.set_allow_tf32(tf32)
    try:
        if not algo.supports(p, dtype) or (tf32 and not algo.name.startswith("igemm_tc")):
            pytest.skip(f"{algo.name} does not support this case")
        host = autotune.random_inputs(op, p, np.float64, np, seed=seed)
        host = tuple(a.astype(dtype).astype(np.float64) for a in host)  # representable inputs
        dev = tuple(cp.asarray(a.astype(dtype)) for a in host)
        out = algo(p, *dev)
        cp.cuda.Device().synchronize()
    finally:
        config.set_allow_tf32(False)
    ref = {"fprop": ne.conv_fprop, "dgrad": ne.conv_dgrad, "wgrad": ne.conv_wgrad}[op](p, *host)
    err = autotune.relative_error(cp.asnumpy(out).astype(np.float64), ref)
    assert out.dtype == dtype and out.shape == ref.shape
    assert err <= autotune.tolerance(dtype, tf32), f"relative error {err:.3g}"


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("op,algo", ALGOS, ids=[f"{op}-{a.name}" for op, a in ALGOS])
@pytest.mark.parametrize("name,xs,ws,kw", CASES, ids=[c[0] for c in CASES])
def test_against_numpy(cp, name, xs, ws, kw, op, algo, dtype_name):
    _run(cp, op, algo, ConvProblem.from_args(xs, ws, **kw), dtype_name,
         seed=cc.seed_of(name, op, algo.name, dtype_name))


def test_wgrad_split_k_is_deterministic(cp):
    p = ConvProblem.from_args((8, 16, 32, 32), (16, 16, 3, 3), padding=1)
    algo = ig.IgemmAlgorithm("wgrad", False, "128x128")
    assert ig.wgrad_splits(p, ig.IGEMM_CONFIGS[("float", 0)][0], ig._current_sm_count()) > 1
    x, dy = (cp.asarray(a.astype(np.float32))
             for a in autotune.random_inputs("wgrad", p, np.float64, np, seed=7))
    first = algo(p, x, dy)
    for _ in range(3):
        assert bool((algo(p, x, dy) == first).all())  # bitwise: fixed-order reduction


def test_nan_filled_memory_poisons_every_allocation(cp):
    """The allocator behind test_outputs_fully_written: what a kernel leaves unwritten is NaN."""
    with cc.nan_filled_memory(cp):
        for dt in (np.float32, np.float16, np.float64, cc.dtype("bfloat16")):
            a = cp.empty(1000, dt)
            assert bool(cp.isnan(a.astype(np.float32)).all()), dt


@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16", "bfloat16"])
def test_outputs_fully_written(cp, dtype_name):
    """Every output (and workspace) allocation is NaN-filled: a kernel that skips an element
    leaves NaN in the result."""
    dtype = cc.dtype(dtype_name)
    p = ConvProblem.from_args((2, 5, 11, 9), (7, 5, 3, 3), stride=2, padding=1)
    ran = 0
    for op, algo in ALGOS:
        if not algo.supports(p, dtype):
            continue
        host = autotune.random_inputs(op, p, np.float32, np, seed=1)
        args = tuple(cp.asarray(a.astype(dtype)) for a in host)  # uploaded before the block
        with cc.nan_filled_memory(cp):
            out = algo(p, *args)
            bad = bool(cp.isnan(out.astype(np.float32)).any())
        assert not bad, f"{op} {algo.name} {dtype_name}"
        ran += 1
    assert ran
