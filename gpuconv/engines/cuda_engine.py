"""The CUDA engine: CuPy arrays in, CuPy arrays out on the same device; kernels in kernels/*.cu.

Same functions and signatures as :mod:`gpuconv.engines.numpy_engine` (the reference it is tested
against). Inputs arrive validated (gpuconv.functional); they may be non-contiguous, and are made
C-contiguous once here, because every kernel indexes flat C-order arrays.

First generation (DESIGN.md "The CUDA engine"), G = groups, Cg = C/G, Kg = K/G:
    fprop  im2col(x) -> col (G, Cg*R*S, N*P*Q); y_g = w (G, Kg, Cg*R*S) @ col, ONE batched cuBLAS
           GEMM (cupy.matmul) for all groups; gemm_to_nchw turns (G, Kg, N, P*Q) into
           (N, K, P, Q) and adds the bias in the same pass.
    wgrad  dw (G, Kg, Cg*R*S) = dy (G, Kg, N*P*Q) @ col^T, summed over batch chunks in the
           accumulation dtype (float32 for float16/float32, float64 for float64). For float16 the
           column matrix and dy are stored in float32, so the whole reduction is an fp32 GEMM.
    dgrad  per stride phase (ph, pw): dgrad_col gathers dy for the mirrored taps that reach the
           phase (stride zeros never stored), one batched GEMM with the matching weight taps
           (G, Cg, Kg*TH*TW), gemm_to_nchw writes dx[:, :, ph::stride_h, pw::stride_w].

float16 GEMMs: we rely on CuPy's default compute type for float16 (COMPUTE_TYPE_DEFAULT), under
which cupy.matmul calls cublasGemmEx/GemmStridedBatchedEx with fp32 accumulation
(CUBLAS_COMPUTE_32F) and rounds only the result to fp16; tests/test_cuda_engine.py checks it
with a reduction that fp16 accumulation would get visibly wrong. float32 GEMMs are plain SGEMM
unless the user opts into TF32 (CUPY_TF32=1).

Workspace: the column matrix of a chunk of the batch stays below gpuconv.cuda's workspace limit
(``gpuconv.set_workspace_limit`` / GPUCONV_WORKSPACE_BYTES, default 1 GiB); a problem whose
single image needs more runs one image at a time.

Algorithms: each conv op has a registry of named algorithms, see :data:`ALGORITHMS`.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np

from .. import cuda as _cuda
from ..cuda import acc_dtype, batch_chunk, conv_geom, ctype, launch, pool_geom
from ..cuda import cuda_available  # noqa: F401  (probed by the benchmark)
from ..problem import ConvProblem, PoolProblem
from .numpy_engine import _phase_taps  # the one copy of the stride-phase arithmetic

name = "cuda"

_i64 = np.int64


def _cp():
    return _cuda.require_cuda()


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
# algorithm registry
# ---------------------------------------------------------------------------------------------
#: op -> {algorithm name -> function}. The functions take the engine op's arguments with every
#: array already C-contiguous and the op's device current:
#:     fprop: fn(p, x, w, bias) -> y        dgrad: fn(p, w, dy) -> dx       wgrad: fn(p, x, dy) -> dw
#: Register more with :func:`register_algorithm` (from any module; e.g. an implicit-GEMM file).
ALGORITHMS: dict = {"fprop": {}, "dgrad": {}, "wgrad": {}}
AUTO = "auto"
_selected = {op: AUTO for op in ALGORITHMS}


def _default_auto(op, p, dtype):
    return "im2col_gemm"


_auto_policy = _installed_policy = _default_auto


def _check_op(op):
    if op not in ALGORITHMS:
        raise ValueError(f"op must be one of {tuple(ALGORITHMS)}, got {op!r}")


def register_algorithm(op, algo_name, fn, *, replace=False):
    """Add `fn` as algorithm `algo_name` of `op`; ValueError if the name is taken (unless replace)."""
    _check_op(op)
    if algo_name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved for the automatic choice")
    if algo_name in ALGORITHMS[op] and not replace:
        raise ValueError(f"{op} algorithm {algo_name!r} is already registered")
    ALGORITHMS[op][algo_name] = fn
    return fn


def set_algorithm(op, algo_name):
    """Use `algo_name` for every later `op` call in this process ("auto": the policy decides)."""
    _check_op(op)
    if algo_name != AUTO and algo_name not in ALGORITHMS[op]:
        raise ValueError(f"unknown {op} algorithm {algo_name!r}; registered: "
                         f"{sorted(ALGORITHMS[op])} or {AUTO!r}")
    _selected[op] = algo_name


def get_algorithm(op):
    """The selected algorithm name of `op` ("auto" unless set)."""
    _check_op(op)
    return _selected[op]


@contextlib.contextmanager
def use_algorithm(op, algo_name):
    """Context manager: `op` runs with `algo_name` inside the block (process-wide, not per thread)."""
    old = get_algorithm(op)
    set_algorithm(op, algo_name)
    try:
        yield
    finally:
        _selected[op] = old


def set_auto_policy(policy=None):
    """Install `policy(op, p, dtype) -> algorithm name` for "auto" (None: the module's own,
    _second_generation_policy).

    This is the autotuner's hook; the name it returns must be registered for `op`.
    """
    global _auto_policy
    _auto_policy = _installed_policy if policy is None else policy


def select(op, p, dtype):
    """(name, fn) of the algorithm that `op` on problem `p` in `dtype` runs now."""
    algo = _selected[op]
    if algo == AUTO:
        algo = _auto_policy(op, p, np.dtype(dtype))
    try:
        return algo, ALGORITHMS[op][algo]
    except KeyError:
        raise ValueError(f"{op} algorithm {algo!r} (chosen by the auto policy) is not "
                         f"registered; registered: {sorted(ALGORITHMS[op])}") from None


# ---------------------------------------------------------------------------------------------
# convolution: the engine ops
# ---------------------------------------------------------------------------------------------
@_on_device
def conv_fprop(p: ConvProblem, x, w, bias=None):
    cp = _cp()
    x, w = cp.ascontiguousarray(x), cp.ascontiguousarray(w)
    if bias is not None:
        bias = cp.ascontiguousarray(bias)
    return select("fprop", p, x.dtype)[1](p, x, w, bias)


@_on_device
def conv_dgrad(p: ConvProblem, w, dy):
    cp = _cp()
    return select("dgrad", p, dy.dtype)[1](p, cp.ascontiguousarray(w), cp.ascontiguousarray(dy))


@_on_device
def conv_wgrad(p: ConvProblem, x, dy):
    cp = _cp()
    return select("wgrad", p, dy.dtype)[1](p, cp.ascontiguousarray(x), cp.ascontiguousarray(dy))


def _chunks(n, bytes_per_image):
    step = batch_chunk(n, bytes_per_image)
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def _to_nchw(t, src, dst, n, kc, i, j, hd, wd, h0=0, w0=0, sh=1, sw=1, bias=None):
    """gemm_to_nchw: src (kc, n, i, j) -> dst[n, k, h0 + sh*i, w0 + sw*j] (+ bias[k])."""
    launch(f"gemm_to_nchw<{t}>", n * kc * i * j,
           (src, src if bias is None else bias, np.int32(bias is not None), dst,
            _i64(n), _i64(kc), _i64(i), _i64(j), _i64(hd), _i64(wd), _i64(h0), _i64(w0),
            _i64(sh), _i64(sw)))


# ---- im2col + GEMM --------------------------------------------------------------------------
def fprop_im2col_gemm(p: ConvProblem, x, w, bias):
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    G, PQ, CgRS = p.groups, p.P * p.Q, p.Cg * p.R * p.S
    y = cp.empty(p.y_shape, dtype=dt)
    wg = w.reshape(G, p.Kg, CgRS)
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * dt.itemsize  # col + GEMM result
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, CgRS, nc * PQ), dtype=dt)
        launch(f"im2col<{t}, {t}>", p.C * nc * PQ, (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        yg = cp.matmul(wg, col)  # (G, Kg, nc*P*Q) == (K, nc, P, Q)
        _to_nchw(t, yg, y[n0:n1], nc, p.K, p.P, p.Q, p.P, p.Q, bias=bias)
    return y


def wgrad_im2col_gemm(p: ConvProblem, x, dy):
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    acc = acc_dtype(dt)  # also the column matrix's dtype: float16 columns are stored as fp32
    G, PQ, CgRS = p.groups, p.P * p.Q, p.Cg * p.R * p.S
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * acc.itemsize  # col + dy rearranged
    dw = None
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, CgRS, nc * PQ), dtype=acc)
        launch(f"im2col<{t}, {ctype(acc)}>", p.C * nc * PQ,
               (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        # dy chunk (nc, K, PQ) -> (G, Kg, nc*PQ) in the accumulation dtype, one copy
        dyg = cp.ascontiguousarray(
            dy[n0:n1].reshape(nc, G, p.Kg, PQ).transpose(1, 2, 0, 3), dtype=acc)
        part = cp.matmul(dyg.reshape(G, p.Kg, nc * PQ), col.transpose(0, 2, 1))
        if dw is None:
            dw = part
        else:
            dw += part
    return dw.reshape(p.w_shape).astype(dt, copy=False)


def dgrad_im2col_gemm(p: ConvProblem, w, dy):
    cp = _cp()
    t, dt = ctype(dy.dtype), dy.dtype
    G, Kg, Cg = p.groups, p.Kg, p.Cg
    phases_h = _phase_taps(p.H, p.pad_h, p.R, p.dil_h, p.stride_h, p.P)[0]
    phases_w = _phase_taps(p.W, p.pad_w, p.S, p.dil_w, p.stride_w, p.Q)[0]
    w6 = w.reshape(G, Kg, Cg, p.R, p.S)
    plan, per_image = [], 0
    for h0, n_i, taps_h in phases_h:
        for w0, n_j, taps_w in phases_w:
            if n_i == 0 or n_j == 0:
                continue  # the phase has no pixels (stride larger than the input)
            if not taps_h or not taps_w:
                plan.append((h0, w0, n_i, n_j, 0, 0, None))  # no tap reaches it: dx = 0
                continue
            th, tw = len(taps_h), len(taps_w)
            # the phase's weight taps, in the kernel's mirrored order: (G, Cg, Kg*TH*TW)
            rs = cp.asarray(np.array([r for r, _ in taps_h], dtype=np.int64))
            ss = cp.asarray(np.array([s for s, _ in taps_w], dtype=np.int64))
            wsub = cp.take(cp.take(w6, rs, axis=3), ss, axis=4)  # (G, Kg, Cg, TH, TW)
            wsub = cp.ascontiguousarray(wsub.transpose(0, 2, 1, 3, 4)).reshape(G, Cg, Kg * th * tw)
            plan.append((h0, w0, n_i, n_j, th, tw, wsub))
            per_image = max(per_image, (p.K * th * tw + p.C) * n_i * n_j * dt.itemsize)
    dx = cp.empty(p.x_shape, dtype=dt)
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        dyc, dxc = dy[n0:n1], dx[n0:n1]
        geom = conv_geom(p.with_batch(nc))
        for h0, w0, n_i, n_j, th, tw, wsub in plan:
            if wsub is None:
                dxc[:, :, h0::p.stride_h, w0::p.stride_w] = 0
                continue
            col = cp.empty((G, Kg * th * tw, nc * n_i * n_j), dtype=dt)
            launch(f"dgrad_col<{t}>", p.K * nc * n_i * n_j,
                   (dyc, col, geom, _i64(h0), _i64(w0), _i64(n_i), _i64(n_j), _i64(th), _i64(tw)))
            out = cp.matmul(wsub, col)  # (G, Cg, nc*I*J) == (C, nc, I, J)
            _to_nchw(t, out, dxc, nc, p.C, n_i, n_j, p.H, p.W, h0, w0, p.stride_h, p.stride_w)
    return dx


register_algorithm("fprop", "im2col_gemm", fprop_im2col_gemm)
register_algorithm("wgrad", "im2col_gemm", wgrad_im2col_gemm)
register_algorithm("dgrad", "im2col_gemm", dgrad_im2col_gemm)


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
@_on_device
def pool_fprop(pp: PoolProblem, x):
    """y (N, C, P, Q) and idx (N, C, P, Q) int64 = h*W + w of each window's max (see pool.cu)."""
    cp = _cp()
    x = cp.ascontiguousarray(x)
    y = cp.empty(pp.y_shape, dtype=x.dtype)
    idx = cp.empty(pp.y_shape, dtype=np.int64)
    launch(f"maxpool_fprop<{ctype(x.dtype)}>", y.size, (x, y, idx, pool_geom(pp)))
    return y, idx


@_on_device
def pool_dgrad(pp: PoolProblem, dy, idx):
    cp = _cp()
    dy, idx = cp.ascontiguousarray(dy), cp.ascontiguousarray(idx)
    dx = cp.empty(pp.x_shape, dtype=dy.dtype)
    launch(f"maxpool_dgrad<{ctype(dy.dtype)}>", dx.size, (dy, idx, dx, pool_geom(pp)))
    return dx


# ---------------------------------------------------------------------------------------------
# activations and maxout
# ---------------------------------------------------------------------------------------------
def _kind(kind):
    try:
        return np.int32(_cuda.ACT_KINDS[kind])
    except KeyError:
        raise ValueError(f"unknown activation {kind!r}") from None


def _alpha(alpha, dtype):
    return acc_dtype(dtype).type(0.0 if alpha is None else alpha)


@_on_device
def act_fprop(kind, x, alpha=None):
    cp = _cp()
    k = _kind(kind)
    x = cp.ascontiguousarray(x)
    y = cp.empty(x.shape, dtype=x.dtype)
    launch(f"act_fprop<{ctype(x.dtype)}>", x.size, (x, y, _i64(x.size), k, _alpha(alpha, x.dtype)))
    return y


@_on_device
def act_dgrad(kind, x, y, dy, alpha=None):
    """dx from the forward input x, output y (None where unused) and upstream dy."""
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
# second generation: implicit GEMM, Winograd, direct depthwise (gpuconv.engines.cuda_igemm), and
# the autotuner as the "auto" policy -- only once gpuconv.config.second_generation_enabled()
# (off by default until those kernels have passed their GPU tests; see gpuconv/config.py).
# ---------------------------------------------------------------------------------------------
from . import cuda_igemm as _igemm  # noqa: E402
from .. import config as _config  # noqa: E402

_igemm.register(register_algorithm)


def _second_generation_policy(op, p, dtype):
    if not _config.second_generation_enabled():
        return _default_auto(op, p, dtype)
    from .. import autotune
    return autotune.gpu_policy(op, p, dtype)


_auto_policy = _installed_policy = _second_generation_policy
