"""GPU checks of the third-generation fprop, dgrad and wgrad (gpuconv.engines.cuda_igemm3,
NHWC) against the NumPy engine (float64 reference): every igemm3 algorithm x float16 / bfloat16 /
float32+tf32 x the shared problems it supports plus channel counts that take the 16-byte path,
tile edges and split-K. Physical NHWC / KRSC arrays in, NHWC out (CONTRACT-layouts.md).
Skipped without a GPU; the CPU runs of the same kernels are tests/test_igemm3_host_*.py."""
import numpy as np
import pytest

from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import cuda_igemm3 as ig3
from gpuconv.engines import numpy_engine as ne

from . import cuda_checks as cc
from .problems import PROBLEMS

pytestmark = pytest.mark.gpu

EXTRA = [  # C multiple of 8: the only inputs gen 3 takes
    ("r50_3x3", (4, 64, 28, 28), (64, 64, 3, 3), dict(padding=1)),
    ("r50_1x1_s2", (4, 256, 28, 28), (128, 256, 1, 1), dict(stride=2)),
    ("tile_edges", (3, 40, 19, 23), (70, 40, 3, 3), dict(padding=1)),
    ("groups_dil", (2, 64, 17, 15), (96, 16, 3, 3), dict(padding=2, dilation=2, groups=4)),
    ("late_layer_splitk", (2, 512, 7, 7), (512, 512, 3, 3), dict(padding=1)),
]
CASES = PROBLEMS + EXTRA
DTYPES = ["float16", "bfloat16", "float32+tf32"]
ALGOS = ig3.algorithms()["fprop"]


def _run(cp, algo, p, dtype_name, seed, splits=None):
    tf32 = dtype_name.endswith("+tf32")
    dtype = cc.dtype(dtype_name.split("+")[0])
    config.set_allow_tf32(tf32)
    try:
        if not algo.supports(p, dtype):
            pytest.skip(f"{algo.name} does not support this case")
        rng = np.random.default_rng(seed)
        x, w, b = (rng.uniform(-1, 1, s).astype(dtype).astype(np.float64)
                   for s in (p.x_shape, p.w_shape, (p.K,)))
        dev = [cp.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1)).astype(dtype))
               for a in (x, w)]
        a = ig3.Igemm3Fprop(algo.label, splits=splits)
        y = a(p, *dev, cp.asarray(b.astype(dtype)))
        cp.cuda.Device().synchronize()
    finally:
        config.set_allow_tf32(False)
    ref = ne.conv_fprop(p, x, w, b)
    out = cp.asnumpy(y).transpose(0, 3, 1, 2).astype(np.float64)
    err = autotune.relative_error(out, ref)
    assert y.dtype == dtype and out.shape == ref.shape
    assert err <= autotune.tolerance(dtype, tf32), f"relative error {err:.3g}"
    return cp.asnumpy(y)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("algo", ALGOS, ids=[a.name for a in ALGOS])
@pytest.mark.parametrize("name,xs,ws,kw", CASES, ids=[c[0] for c in CASES])
def test_against_numpy(cp, name, xs, ws, kw, algo, dtype_name):
    _run(cp, algo, ConvProblem.from_args(xs, ws, **kw), dtype_name,
         seed=cc.seed_of(name, "fprop", algo.name, dtype_name))


@pytest.mark.parametrize("algo", ALGOS, ids=[a.name for a in ALGOS])
def test_split_k_on_off_and_deterministic(cp, algo):
    p = ConvProblem.from_args((2, 512, 7, 7), (512, 512, 3, 3), padding=1)
    y1 = _run(cp, algo, p, "float16", 1, splits=1)
    y4 = _run(cp, algo, p, "float16", 1, splits=4)
    y4b = _run(cp, algo, p, "float16", 1, splits=4)
    assert np.array_equal(y4.view(np.uint16), y4b.view(np.uint16))
    assert y1.shape == y4.shape


# ---- dgrad / wgrad (kernels/igemm3_dgrad.cu, igemm3_wgrad.cu) ----------------------------------
GRAD_EXTRA = EXTRA + [
    ("s2_3x3", (2, 64, 15, 17), (64, 64, 3, 3), dict(stride=2, padding=1)),
    ("s12_dil", (2, 32, 13, 14), (48, 32, 3, 2), dict(stride=(1, 2), padding=(2, 1),
                                                      dilation=(2, 3))),
    ("s21_odd", (3, 16, 11, 9), (24, 16, 2, 3), dict(stride=(2, 1), padding=(0, 1))),
    ("wgrad_deep_npq", (8, 32, 30, 30), (32, 32, 3, 3), dict(padding=1)),
]
GRAD_CASES = PROBLEMS + GRAD_EXTRA
GRAD_ALGOS = [(op, a) for op in ("dgrad", "wgrad") for a in ig3.algorithms()[op]]


def _run_grad(cp, op, algo, p, dtype_name, seed, splits=None):
    tf32 = dtype_name.endswith("+tf32")
    dtype = cc.dtype(dtype_name.split("+")[0])
    config.set_allow_tf32(tf32)
    try:
        if not algo.supports(p, dtype):
            pytest.skip(f"{algo.name} does not support this case")
        rng = np.random.default_rng(seed)
        x, w, dy = (rng.uniform(-1, 1, s).astype(dtype).astype(np.float64)
                    for s in (p.x_shape, p.w_shape, p.y_shape))
        dev = {k: cp.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1)).astype(dtype))
               for k, a in (("x", x), ("w", w), ("dy", dy))}
        a = type(algo)(algo.label, splits=splits)
        out = a(p, dev["w"], dev["dy"]) if op == "dgrad" else a(p, dev["x"], dev["dy"])
        cp.cuda.Device().synchronize()
    finally:
        config.set_allow_tf32(False)
    ref = ne.conv_dgrad(p, w, dy) if op == "dgrad" else ne.conv_wgrad(p, x, dy)
    got = cp.asnumpy(out).transpose(0, 3, 1, 2).astype(np.float64)
    err = autotune.relative_error(got, ref)
    assert out.dtype == dtype and got.shape == ref.shape
    assert err <= autotune.tolerance(dtype, tf32), f"relative error {err:.3g}"
    return cp.asnumpy(out)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("op,algo", GRAD_ALGOS, ids=[a.name for _, a in GRAD_ALGOS])
@pytest.mark.parametrize("name,xs,ws,kw", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_grad_against_numpy(cp, name, xs, ws, kw, op, algo, dtype_name):
    _run_grad(cp, op, algo, ConvProblem.from_args(xs, ws, **kw), dtype_name,
              seed=cc.seed_of(name, op, algo.name, dtype_name))


@pytest.mark.parametrize("op,algo", GRAD_ALGOS, ids=[a.name for _, a in GRAD_ALGOS])
def test_grad_split_k_on_off_and_deterministic(cp, op, algo):
    p = ConvProblem.from_args((2, 256, 14, 14), (256, 256, 3, 3), stride=2, padding=1)
    y1 = _run_grad(cp, op, algo, p, "float16", 2, splits=1)
    y4 = _run_grad(cp, op, algo, p, "float16", 2, splits=4)
    y4b = _run_grad(cp, op, algo, p, "float16", 2, splits=4)
    assert np.array_equal(y4.view(np.uint16), y4b.view(np.uint16))
    assert y1.shape == y4.shape
