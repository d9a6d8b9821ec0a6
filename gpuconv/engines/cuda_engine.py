"""The CUDA engine: CuPy arrays in, CuPy arrays out on the same device; kernels in kernels/*.cu.

Same functions and signatures as :mod:`gpuconv.engines.numpy_engine` (the reference it is tested
against). Inputs arrive validated (gpuconv.functional); they may be non-contiguous, and are made
C-contiguous once here, because every kernel indexes flat C-order arrays.

The CUDA side in one-way layers (DESIGN.md "One-way seams"), each importing only those before it:
    gpuconv.problem              the problem, dgrad's stride phases included
    gpuconv.kernel_loader        the kernel catalogue and loader (knows no algorithm)
    engines.cuda_im2col          first generation: im2col + cuBLAS, and the elementwise kernels
    engines.cuda_igemm           second generation: implicit GEMM, Winograd, direct depthwise
    engines.cuda_registry        the algorithm registry; every algorithm module registers there
    gpuconv.autotune             the per-problem choice among registered algorithms
    engines.cuda_engine          this module: the ops, and the "auto" policy
    gpuconv.cuda                 the public face: catalogue(), precompile(), availability

Convolutions run the registry's selected algorithm (:func:`select`); "auto" is the first
generation's ``im2col_gemm`` until gpuconv.config.second_generation_enabled(), then the
autotuner's choice. Pooling, activations and maxout launch the first generation's kernels.

Memory formats (CONTRACT-layouts): the activation input (x; dgrad: dy) decides the op's format
(gpuconv.functional has already converted the other operand where PyTorch's rule asked for it).
An algorithm declares ``fn.layouts`` (default ``("nchw",)``). A channels_last op with an
algorithm that has "nhwc" gets the PHYSICAL C-contiguous (N, H, W, C) / (K, R, S, Cg) arrays
with no copy (the weight is converted once if it is not channels_last) and its physical result
comes back as a logical channels_last view: the first generation (im2col_gemm, "auto"'s
default) has NHWC kernels of its own (im2col_nhwc, dgrad_col_nhwc, gemm_to_nhwc), so "auto"
makes no transpose. An algorithm without "nhwc" (the second generation, igemm_*, Winograd and
direct depthwise: NCHW kernels) gets the arrays converted once to NCHW, and its result is
converted once back to channels_last: the op's result format is the same either way, and
that conversion is the only transpose. Activations run their flat kernels on the
physical memory (no conversion); so does max pooling (pool.cu's *_nhwc kernels).
"""
from __future__ import annotations

import functools

import numpy as np

from .. import autotune as _autotune
from .. import config as _config
from .._arrays import memory_format, physical_nhwc, to_format
from ..kernel_loader import acc_dtype, ctype, launch, pool_geom, require_cuda
from ..kernel_loader import cuda_available  # noqa: F401  (probed by the benchmark)
from ..problem import ConvProblem, PoolProblem
from . import cuda_registry
from .cuda_im2col import ACT_KINDS
# the registry's API and the first generation's algorithms, under the names users know
from .cuda_im2col import (dgrad_im2col_gemm, fprop_im2col_gemm,  # noqa: F401
                          wgrad_im2col_gemm)
from .cuda_registry import (ALGORITHMS, AUTO, get_algorithm, register_algorithm,  # noqa: F401
                            select, set_algorithm, set_auto_policy, use_algorithm)

name = "cuda"

_i64 = np.int64


def _cp():
    return require_cuda()


def _on_device(fn):
    """Run the op on the device of its first CuPy array argument (results are allocated there)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        cp = _cp()
        for a in args:
            if isinstance(a, cp.ndarray):
                with a.device:
                    return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


# ---------------------------------------------------------------------------------------------
# convolution: the engine ops
# ---------------------------------------------------------------------------------------------
def layouts_of(fn):
    """The memory layouts a registered algorithm takes (its ``layouts``; ("nchw",) if absent)."""
    return tuple(getattr(fn, "layouts", ("nchw",)))


def _run_conv(op, p, fmt, arrays, bias=()):
    """The selected `op` algorithm on `arrays` (the op's 4-D operands) in the op's format."""
    cp = _cp()
    fn = cuda_registry.select(op, p, arrays[-1].dtype, layout=fmt)[1]
    layouts = layouts_of(fn)
    if "nhwc" in layouts and (fmt == "nhwc" or "nchw" not in layouts):
        kw = {"layout": "nhwc"} if len(layouts) > 1 else {}
        out = fn(p, *(physical_nhwc(a) for a in arrays), *bias, **kw)
        out = out.transpose(0, 3, 1, 2)  # the physical result, as a channels_last view
        # an NHWC-only algorithm (the third generation) chosen by name for an NCHW op: its
        # operands were converted once above, its result is converted once back
        return out if fmt == "nhwc" else cp.ascontiguousarray(out)
    out = fn(p, *(cp.ascontiguousarray(a) for a in arrays), *bias)
    return to_format(out, "nhwc") if fmt == "nhwc" else out  # NCHW-only: converted once


@_on_device
def conv_fprop(p: ConvProblem, x, w, bias=None):
    cp = _cp()
    if bias is not None:
        bias = cp.ascontiguousarray(bias)
    return _run_conv("fprop", p, memory_format(x), (x, w), (bias,))


@_on_device
def conv_dgrad(p: ConvProblem, w, dy):
    return _run_conv("dgrad", p, memory_format(dy), (w, dy))


@_on_device
def conv_wgrad(p: ConvProblem, x, dy):
    return _run_conv("wgrad", p, memory_format(x), (x, dy))


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
@_on_device
def pool_fprop(pp: PoolProblem, x):
    """y (N, C, P, Q) and idx (N, C, P, Q) int64 = h*W + w of each window's max (see pool.cu).
    A channels_last x runs the NHWC kernel on its memory: y and idx come back channels_last."""
    cp = _cp()
    if memory_format(x) == "nhwc":
        xh = physical_nhwc(x)   # a view of dense channels_last memory
        N, C, P, Q = pp.y_shape
        y = cp.empty((N, P, Q, C), dtype=x.dtype)
        idx = cp.empty((N, P, Q, C), dtype=np.int64)
        launch(f"maxpool_fprop_nhwc<{ctype(x.dtype)}>", y.size, (xh, y, idx, pool_geom(pp)))
        return y.transpose(0, 3, 1, 2), idx.transpose(0, 3, 1, 2)
    x = cp.ascontiguousarray(x)
    y = cp.empty(pp.y_shape, dtype=x.dtype)
    idx = cp.empty(pp.y_shape, dtype=np.int64)
    launch(f"maxpool_fprop<{ctype(x.dtype)}>", y.size, (x, y, idx, pool_geom(pp)))
    return y, idx


@_on_device
def pool_dgrad(pp: PoolProblem, dy, idx):
    """dx in dy's memory format; an idx in the other format is converted once."""
    cp = _cp()
    if memory_format(dy) == "nhwc":
        N, C, H, W = pp.x_shape
        dx = cp.empty((N, H, W, C), dtype=dy.dtype)
        launch(f"maxpool_dgrad_nhwc<{ctype(dy.dtype)}>", dx.size,
               (physical_nhwc(dy), physical_nhwc(idx), dx, pool_geom(pp)))
        return dx.transpose(0, 3, 1, 2)
    dy, idx = cp.ascontiguousarray(dy), cp.ascontiguousarray(idx)
    dx = cp.empty(pp.x_shape, dtype=dy.dtype)
    launch(f"maxpool_dgrad<{ctype(dy.dtype)}>", dx.size, (dy, idx, dx, pool_geom(pp)))
    return dx


# ---------------------------------------------------------------------------------------------
# activations and maxout
# ---------------------------------------------------------------------------------------------
def _kind(kind):
    try:
        return np.int32(ACT_KINDS[kind])
    except KeyError:
        raise ValueError(f"unknown activation {kind!r}") from None


def _alpha(alpha, dtype):
    return acc_dtype(dtype).type(0.0 if alpha is None else alpha)


def _flat_operands(x, *others):
    """Elementwise kernels read flat memory: a channels_last x and its partners (already in
    x's format, gpuconv.functional) as their physical (N, H, W, C) arrays, no copy; the result
    is then mapped back with `back`."""
    if memory_format(x) == "nhwc":
        return (physical_nhwc(x),) + tuple(None if a is None else physical_nhwc(a)
                                           for a in others), lambda a: a.transpose(0, 3, 1, 2)
    return (x,) + others, lambda a: a


@_on_device
def act_fprop(kind, x, alpha=None):
    (x,), back = _flat_operands(x)
    return back(_act_fprop(kind, x, alpha))


def _act_fprop(kind, x, alpha):
    cp = _cp()
    k = _kind(kind)
    x = cp.ascontiguousarray(x)
    y = cp.empty(x.shape, dtype=x.dtype)
    launch(f"act_fprop<{ctype(x.dtype)}>", x.size, (x, y, _i64(x.size), k, _alpha(alpha, x.dtype)))
    return y


@_on_device
def act_dgrad(kind, x, y, dy, alpha=None):
    """dx from the forward input x, output y (None where unused) and upstream dy."""
    (x, y, dy), back = _flat_operands(x, y, dy)
    return back(_act_dgrad(kind, x, y, dy, alpha))


def _act_dgrad(kind, x, y, dy, alpha):
    cp = _cp()
    k = _kind(kind)
    x, dy = cp.ascontiguousarray(x), cp.ascontiguousarray(dy)
    y = x if y is None else cp.ascontiguousarray(y)  # relu/leaky never read y
    dx = cp.empty(x.shape, dtype=x.dtype)
    launch(f"act_dgrad<{ctype(x.dtype)}>", x.size,
           (x, y, dy, dx, _i64(x.size), k, _alpha(alpha, x.dtype)))
    return dx


def _maxout_dims(shape, pieces, axis):
    outer = int(np.prod(shape[:axis], dtype=np.int64))
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    return outer, shape[axis] // pieces, inner


@_on_device
def maxout_fprop(x, pieces, axis):
    """y = max of each group of `pieces` consecutive entries along `axis`; idx = winner in group."""
    cp = _cp()
    x = cp.ascontiguousarray(x)
    outer, m, inner = _maxout_dims(x.shape, pieces, axis)
    shape = x.shape[:axis] + (m,) + x.shape[axis + 1:]
    y = cp.empty(shape, dtype=x.dtype)
    idx = cp.empty(shape, dtype=np.int64)
    launch(f"maxout_fprop<{ctype(x.dtype)}>", y.size,
           (x, y, idx, _i64(outer), _i64(m), _i64(pieces), _i64(inner)))
    return y, idx


@_on_device
def maxout_dgrad(dy, idx, pieces, axis, x_shape):
    cp = _cp()
    # the kernel reads idx as long long; an index array of another integer type is converted
    dy, idx = cp.ascontiguousarray(dy), cp.ascontiguousarray(idx, dtype=np.int64)
    outer, m, inner = _maxout_dims(tuple(x_shape), pieces, axis)
    dx = cp.empty(tuple(x_shape), dtype=dy.dtype)
    launch(f"maxout_dgrad<{ctype(dy.dtype)}>", dx.size,
           (dy, idx, dx, _i64(outer), _i64(m), _i64(pieces), _i64(inner)))
    return dx


# ---------------------------------------------------------------------------------------------
# "auto": the second generation (implicit GEMM, Winograd, direct depthwise) and the autotuner,
# only once gpuconv.config.second_generation_enabled() (off by default until those kernels have
# passed their GPU tests; see gpuconv/config.py).
# ---------------------------------------------------------------------------------------------
def _second_generation_policy(op, p, dtype, layout="nchw"):
    if not _config.second_generation_enabled():
        return cuda_registry.default_policy(op, p, dtype)
    return _autotune.gpu_policy(op, p, dtype, layout=layout)


cuda_registry.install_default_policy(_second_generation_policy)
