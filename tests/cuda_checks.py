"""Checks of the CUDA engine against the NumPy engine, written once for two ways of running it:

- on a GPU (tests/test_cuda_engine.py): the real engine, CuPy arrays, NVRTC, cuBLAS;
- on the CPU (tests/test_kernels_host.py): the engine's Python with NumPy as its array module and
  the kernels compiled for the host (tests/kernel_host.py).

An `Engine` bundles the engine functions with `dev` (NumPy array -> engine array) and `host`
(back). References are the NumPy engine in float64 on the inputs already rounded to the tested
dtype, so the tolerance measures only the engine's own arithmetic: float64 ~1e-12, float32 ~1e-5
(fp32 accumulation), float16 ~2^-11 and bfloat16 ~2^-8 per rounding (fp32 accumulation, 16-bit
results) -- never so loose that a wrong index (an O(1) error on data in [-1, 1]) could pass.

bfloat16 is ml_dtypes.bfloat16 (CuPy 14's bf16 dtype); without ml_dtypes, BF16 is None and the
bf16 cases skip with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from gpuconv import ConvProblem, PoolProblem
from gpuconv.doctor import nan_filled_allocations as nan_filled_memory  # noqa: F401
from gpuconv.doctor import stable_seed as seed_of  # noqa: F401
from gpuconv.engines import numpy_engine as ref

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with gpuconv[cuda12/13]
    BF16 = None

TOL = {"float64": 1e-11, "float32": 3e-5, "float16": 4e-3, "bfloat16": 1.6e-2}
#: dtypes by name ("bfloat16" needs ml_dtypes: use dtype(name), which skips without it)
DTYPES = ("float64", "float32", "float16", "bfloat16")


def dtype(name):
    """np.dtype of a DTYPES name; skips the test when bfloat16 is asked for without ml_dtypes."""
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("bfloat16 needs ml_dtypes (pip install ml_dtypes)")
        return BF16
    return np.dtype(name)


def tol(dt):
    return TOL[np.dtype(dt).name]


@dataclass
class Engine:
    eng: Any                       # namespace with the numpy_engine function names
    dev: Callable                  # numpy array -> engine array
    host: Callable                 # engine array -> numpy array


def _rand(rng, shape, dtype):
    """Uniform in [-1, 1), never all zero, rounded to `dtype`; returns (rounded, as float64)."""
    a = rng.uniform(-1, 1, shape).astype(dtype)
    return a, a.astype(np.float64)


def f64(a):
    return np.asarray(a).astype(np.float64)


def _noncontig(e: Engine, a):
    """The same values as a non-contiguous engine array (a transposed view)."""
    axes = tuple(range(a.ndim - 2)) + (a.ndim - 1, a.ndim - 2)
    return e.dev(np.ascontiguousarray(a.transpose(axes))).transpose(axes)


def assert_close(out, expected, dtype, what):
    out = f64(out)
    assert out.shape == expected.shape, f"{what}: shape {out.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(out - expected))) if out.size else 0.0
    assert err <= tol(dtype) * scale, \
        f"{what} ({np.dtype(dtype)}): max error {err:.3g} > {tol(dtype):.1g} * {scale:.3g}"


def check_conv(e: Engine, x_shape, w_shape, kwargs, dtype, noncontig=False, seed=0):
    """fprop (with bias), dgrad and wgrad of one problem against the NumPy engine."""
    rng = np.random.default_rng(seed)
    p = ConvProblem.from_args(x_shape, w_shape, **kwargs)
    x, x64 = _rand(rng, p.x_shape, dtype)
    w, w64 = _rand(rng, p.w_shape, dtype)
    b, b64 = _rand(rng, (p.K,), dtype)
    dy, dy64 = _rand(rng, p.y_shape, dtype)
    put = (lambda a: _noncontig(e, a)) if noncontig else e.dev

    y = e.host(e.eng.conv_fprop(p, put(x), put(w), e.dev(b)))
    assert y.dtype == np.dtype(dtype)
    assert_close(y, ref.conv_fprop(p, x64, w64, b64), dtype, f"fprop {p}")

    dx = e.host(e.eng.conv_dgrad(p, put(w), put(dy)))
    dx_ref = ref.conv_dgrad(p, w64, dy64)
    assert dx.dtype == np.dtype(dtype)
    assert_close(dx, dx_ref, dtype, f"dgrad {p}")
    # rows/columns no window reached are exact zeros, not merely small
    assert np.all(f64(dx)[dx_ref == 0] == 0), f"dgrad {p}: unreached pixels are not exactly 0"

    dw = e.host(e.eng.conv_wgrad(p, put(x), put(dy)))
    assert dw.dtype == np.dtype(dtype)
    assert_close(dw, ref.conv_wgrad(p, x64, dy64), dtype, f"wgrad {p}")


POOL_CASES = [
    ((2, 3, 7, 9), dict(kernel_size=2)),
    ((2, 2, 9, 8), dict(kernel_size=3, stride=2, padding=1)),
    ((1, 2, 10, 11), dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 1), dilation=(2, 1))),
    ((2, 2, 8, 7), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ((1, 3, 6, 6), dict(kernel_size=3, stride=1, padding=1)),
    ((1, 1, 5, 5), dict(kernel_size=5)),
]


def pool_input(x_shape, dtype, seed=0):
    """Small integers (many ties), a NaN, and a plane that is all -inf (ties with the padding)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, x_shape).astype(dtype)
    x.flat[rng.integers(x.size)] = np.nan
    x[0, 0, :2, :2] = np.nan  # windows with several NaNs: the first one wins
    x[0, -1] = -np.inf
    return x


def check_pool(e: Engine, x_shape, kwargs, dtype, seed=0):
    pp = PoolProblem.from_args(x_shape, **kwargs)
    x = pool_input(x_shape, dtype, seed)
    y, idx = e.eng.pool_fprop(pp, e.dev(x))
    y, idx = e.host(y), e.host(idx)
    y_ref, idx_ref = ref.pool_fprop(pp, x.astype(np.float64))
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, idx_ref, err_msg=f"argmax {pp}")
    np.testing.assert_array_equal(f64(y), y_ref, err_msg=f"max {pp}")

    rng = np.random.default_rng(seed + 1)
    dy, dy64 = _rand(rng, pp.y_shape, dtype)
    dx = e.host(e.eng.pool_dgrad(pp, e.dev(dy), e.dev(idx_ref)))
    assert_close(dx, ref.pool_dgrad(pp, dy64, idx_ref), dtype, f"pool dgrad {pp}")


ACTS = [("relu", None), ("leaky_relu", 0.1), ("sigmoid", None), ("tanh", None), ("elu", 1.3)]


def act_input(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(1000) * 4).astype(dtype)
    x[:7] = [0.0, -0.0, np.nan, 30.0, -30.0, 1e-3, -np.nan]  # kinks, +-NaN, saturation
    return x.reshape(10, 4, 25)


def check_act(e: Engine, kind, alpha, dtype, seed=0):
    x = act_input(dtype, seed)
    x64 = x.astype(np.float64)
    y = e.host(e.eng.act_fprop(kind, e.dev(x), alpha))
    y_ref = ref.act_fprop(kind, x64, alpha)
    assert y.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.isnan(f64(y)), np.isnan(y_ref),
                                  err_msg=f"{kind}: NaN pattern")
    np.testing.assert_allclose(f64(y), y_ref, rtol=tol(dtype), atol=tol(dtype),
                               err_msg=f"{kind} forward")
    rng = np.random.default_rng(seed + 1)
    dy, dy64 = _rand(rng, x.shape, dtype)
    yd = y_ref.astype(dtype)  # the backward's y is the (rounded) forward output
    needs_y = kind in ("sigmoid", "tanh", "elu")
    xin = yd if kind in ("sigmoid", "tanh") else x  # functional passes y as x there
    dx = e.host(e.eng.act_dgrad(kind, e.dev(xin), e.dev(yd) if needs_y else None, e.dev(dy),
                                alpha))
    dx_ref = ref.act_dgrad(kind, xin.astype(np.float64),
                           yd.astype(np.float64) if needs_y else None, dy64, alpha)
    np.testing.assert_array_equal(np.isnan(f64(dx)), np.isnan(dx_ref),
                                  err_msg=f"{kind}: dgrad NaN")
    np.testing.assert_allclose(f64(dx), dx_ref, rtol=tol(dtype), atol=tol(dtype),
                               err_msg=f"{kind} backward")
    # PyTorch's rule at a NaN input, pinned here and not only through the reference: relu and
    # elu pass dy through (they test x <= 0), leaky_relu scales it (it tests x > 0)
    nan = np.isnan(f64(x))
    if kind in ("relu", "elu"):
        np.testing.assert_array_equal(f64(dx)[nan], f64(dy)[nan], err_msg=f"{kind} at NaN")
    elif kind == "leaky_relu":
        np.testing.assert_allclose(f64(dx)[nan], alpha * f64(dy)[nan], rtol=tol(dtype),
                                   err_msg=f"{kind} at NaN")


MAXOUT_CASES = [((2, 6, 3, 4), 3, 1), ((3, 5, 4), 2, 2), ((4, 3), 2, 0), ((2, 8, 2, 2), 4, 1)]


def check_maxout(e: Engine, shape, pieces, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, shape).astype(dtype)  # ties
    x.flat[rng.integers(x.size)] = np.nan
    np.moveaxis(x, axis, 0)[:2, ...] = np.nan  # groups with two NaNs: the first one wins
    y, idx = e.eng.maxout_fprop(e.dev(x), pieces, axis)
    y, idx = e.host(y), e.host(idx)
    y_ref, idx_ref = ref.maxout_fprop(x.astype(np.float64), pieces, axis)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_array_equal(f64(y), y_ref)
    dy, dy64 = _rand(rng, y_ref.shape, dtype)
    dx = e.host(e.eng.maxout_dgrad(e.dev(dy), e.dev(idx_ref), pieces, axis, shape))
    assert dx.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(f64(dx), ref.maxout_dgrad(dy64, idx_ref, pieces, axis, shape))
