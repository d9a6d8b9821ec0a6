"""The NumPy engine: the CPU fallback and the reference the CUDA engine is tested against.

Every op works on whole arrays: im2col through strided views and one (batched) BLAS matmul per
call; Python loops run only over kernel taps or stride phases, never over pixels.

Layout conventions inside this file (G = groups, Cg = C/G, Kg = K/G):
    x  (N, C, H, W)        w  (K, Cg, R, S)        y, dy  (N, K, P, Q)
    col (G, Cg*R*S, N*P*Q) -- the im2col matrix, one GEMM operand per group
Inputs are validated by the caller (gpuconv.functional); they may be non-contiguous.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import threading

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._arrays import memory_format
from ..problem import ConvProblem, PoolProblem
from ..problem import phase_taps as _phase_taps  # the one copy of the stride-phase arithmetic
from . import cpu_memory as _mem
from . import cpu_threads as _threads

name = "numpy"
SCRATCH_KEEP_BYTES = 256 << 20
# Column matrices above this are built for part of the batch at a time (VGG-16 conv1_2 at batch
# 32 would need 3.7 GB). Module attribute, so users and tests can change it.
WORKSPACE_BYTES = 512 << 20
TAKE_IM2COL_MAX_Q = 4  # output rows up to this wide: im2col by one gather (see _im2col)
SMALL_IM2COL = 1 << 18  # elements; below this im2col is one strided copy instead of one per tap
# stride_h == 1 and a column matrix up to this size: im2col by column taps, then row taps
# (_im2col_two_stage; 1.5-2.2x faster on LeNet's layers, 10-25% slower on large ones)
IM2COL_TWO_STAGE_BYTES = 8 << 20
# dgrad gathers by flat shifts over dy rows zero-padded up to this many times their width (see
# _dgrad_channel_first; 1.4x on LeNet-5 conv2 measured 20% faster than 4-D slice adds)
DGRAD_FRAME_WIDEN = 1.5
DEPTHWISE_FLAT = True  # stride-1 depthwise fprop and wgrad by _flat_windows (see there)
POOL_STACK_TAPS = True  # max-pool forward copies its window taps into one stack first
POOL_PAIRWISE_2X2 = True  # 2x2 max-pool windows by pairwise maxima (_pool_2x2_max)


def DGRAD_SPLIT_TAPS(p):  # noqa: N802  (a module-level switch tests and benchmarks replace)
    """Stride-1 dgrad by _dgrad_split_taps instead of channel-first or gather-first: measured
    faster (2 threads, this file's bench notes) where gather-first would run (ResNet-50's 3x3
    at batch 8: 25.8 -> 20.0 ms) and for kernels of more than 9 taps (LeNet-5's conv(6->16, 5x5)
    at batch 64: 2.9 -> 1.6 ms; AlexNet's 5x5: 31 -> 27 ms), not for channel-first 3x3 layers
    (MNIST's conv(32->64): 9.1 vs 9.8 ms; gpuconv-train's small ones 0.58 vs 0.71 ms)."""
    return p.R * p.S > 9 or p.C * p.P * p.Q >= p.K * p.H * p.W


# From this many FLOPs a batch's GEMMs run as one call instead of one per image: OpenBLAS
# threads one large call well and many medium ones badly (MNIST conv(32->64) dgrad's GEMMs on 2
# threads: 3.4 ms as one call, 7.6 ms per image), while a small call that it threads costs a
# worker wake-up (10-200 us on a 2-vCPU VM) that per-image calls under its threshold never pay.
ONE_GEMM_FLOPS = 100e6


def FPROP_ONE_GEMM(p):  # noqa: N802  (a module-level switch tests and benchmarks replace)
    """fprop as one GEMM over the batch, W (Kg, Cg*R*S) @ col (Cg*R*S, N*P*Q) per group, and
    a transposing copy into NCHW that adds the bias, instead of one GEMM per image: when the
    BLAS threads a call (>= 2 threads), one large call keeps both cores busy where per-image
    calls are too small for it to thread well. Worth its extra pass over y only where the GEMM
    does much work per output, a reduction of >= 256 (2 threads, whole training steps: MNIST's
    conv(32->64, 3x3), 288: 34.8 -> 32.0 ms a step; ResNet-50's 3x3 on 64 channels at batch 8:
    17.9 -> 17.3 ms an op); not at 144-150 (gpuconv-train's conv2: 1.76 -> 1.89 ms a step;
    LeNet-5's conv2 even) nor for the 7x7 stem's 147 (19.9 -> 21.1 ms an op)."""
    return p.Cg * p.R * p.S >= 256 and _threads.blas_threads() >= 2




def FPROP_SPLIT_TAPS(p):  # noqa: N802  (a module-level switch tests and benchmarks replace)
    """Row-stride-1 fprop by _fprop_split_taps instead of im2col where its GEMM output (K*R rows
    of N*Hp*Q) is at most half the column matrix (C*R*S rows of N*P*Q), i.e. about K <= C*S/2:
    2 threads, batch 8, ResNet-50's 3x3 on 64 channels (0.35 of it) 18.7 -> 15.4 ms; at 0.69-0.76
    it lost or tied (AlexNet's conv2 24.9 -> 25.9 ms, VGG-16's conv3_1 99 -> 94 ms, MNIST's
    conv(32->64) at batch 64 5.9 -> 7.0 ms)."""
    return (p.stride_h == 1 and p.R > 1
            and 2 * p.K * (p.H + p.pad_h + p.pad_h_end) <= p.C * p.S * p.P)


def WGRAD_SPLIT_TAPS(p):  # noqa: N802  (a module-level switch tests and benchmarks replace)
    """Row-stride-1 wgrad by _wgrad_split_taps, unless the fprop's column matrix is at hand
    (_recall_col) or an image's P*Q is over 4096 (a reduction that long with a few rows, as
    a 3-channel 3x3 layer on 224x224 has, ran 31 -> 54 ms). 2 threads, no column matrix kept:
    LeNet-5's conv(6->16, 5x5) at batch 64 1.93 -> 0.57 ms and its conv(1->6) 0.62 -> 0.30
    ms, gpuconv-train's conv2 0.67 -> 0.19 ms, MNIST's conv(32->64) 6.0 -> 5.4 ms; at batch
    8, ResNet-50's 3x3 on 64 channels 17.1 -> 14.9 ms, AlexNet's conv2 23.8 -> 23.0 ms,
    VGG-16's conv3_1 92.9 -> 91.0 ms.

    Not for a layer of few column-matrix rows (Cg*R*S <= SMALL_WGRAD_ROWS: a C = 1 first layer)
    unless the BLAS has small-matrix kernels (cpu_threads.blas_small_gemm_kernels): its N*R
    GEMMs are tiny (LeNet's conv(1->6, 5x5): 320 of 5 x 784 x 6), and on the Zen 3 with
    OpenBLAS's Haswell kernels (2 threads, batch 64, paired calls) the per-image GEMMs over the
    column matrix beat them: LeNet-5's conv(1->6, 5x5) 1.75 -> 1.13 ms, MNIST's conv(1->32, 3x3)
    2.46 -> 1.13 ms, gpuconv-train's conv(1->16, 3x3) on 8x8 at batch 32 93 -> 71 us."""
    if p.Cg * p.R * p.S <= SMALL_WGRAD_ROWS and not _threads.blas_small_gemm_kernels():
        return False
    return p.stride_h == 1 and p.P * p.Q <= 4096


SMALL_WGRAD_ROWS = 32  # Cg*R*S up to this: wgrad as per-image GEMMs summed (see _wgrad)
WGRAD_PER_IMAGE_PQ = 8192  # P*Q from this: the column-matrix wgrad image by image (see there)
_tls = threading.local()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def _strided(a, shape, strides):
    """A read-only view of `a` with this shape and these byte strides (from a's first element).

    For a C-contiguous `a` the view is built by the ndarray constructor over a's buffer, which
    also checks that every element lies inside `a`; NumPy's as_strided (kept for the other
    layouts) goes through an __array_interface__ object and cost ~8 us a call, ~4% of a small
    model's training step that makes ~10 such views."""
    if a.flags.c_contiguous:
        v = np.ndarray(shape, a.dtype, a, 0, strides)
        v.flags.writeable = False
        return v
    return as_strided(a, shape=shape, strides=strides, writeable=False)

def _pad(x, top, bottom, left, right, value=0.0, slot="pad"):
    """x with `value` rows/columns around it; into a reusable scratch buffer unless slot=None
    (the result is then only valid until the next _pad of the same slot in this thread)."""
    if top == bottom == left == right == 0:
        return x
    n, c, h, w = x.shape
    shape = (n, c, h + top + bottom, w + left + right)
    out = np.empty(shape, x.dtype) if slot is None else _scratch(slot, shape, x.dtype)
    if 2 * math.prod(shape) >= 3 * x.size:
        # the border is half the interior or more (narrow planes): one contiguous fill beats
        # strips of a few elements per row (LeNet-5's 64x16x10x10 dy widened by 4+4: 119 ->
        # 67 us; 32x16x4x4 padded by 1: 22 -> 14 us; at 1.3x, 64x32x14x14: 215 vs 259 us)
        out.fill(value)
    else:
        out[:, :, :top] = value
        out[:, :, top + h:] = value
        out[:, :, top:top + h, :left] = value
        out[:, :, top:top + h, left + w:] = value
    out[:, :, top:top + h, left:left + w] = x
    return out


def _tap(xp, p: ConvProblem, r, s):
    """(N, C, P, Q) view of the padded input that kernel tap (r, s) multiplies."""
    h0, w0 = r * p.dil_h, s * p.dil_w
    return xp[:, :, h0:h0 + p.stride_h * (p.P - 1) + 1:p.stride_h,
              w0:w0 + p.stride_w * (p.Q - 1) + 1:p.stride_w]


def _scratch(slot, shape, dtype):
    """A reusable per-thread buffer for internal temporaries (never returned to the caller).

    Fresh multi-megabyte arrays cost a page fault per 4 KiB on first touch (measured here: 8.6
    ms per 100 MB, ~10% of a VGG conv3_1 fprop), so column matrices reuse one buffer per slot.
    Buffers above SCRATCH_KEEP_BYTES are not kept.
    """
    tls = _tls.__dict__
    gens = tls.get("gens")
    if gens is None:
        gens = tls["gens"] = {}
    gens[slot] = gens.get(slot, 0) + 1  # every hand-out may overwrite what the slot held
    views = tls.get("views")  # slot -> {(shape, dtype): the view handed out for it}
    if views is not None:
        v = views.get(slot)
        if v is not None:
            v = v.get((shape, dtype))
            if v is not None:
                return v  # a request seen before: its view (3 array constructions saved)
    key = (tuple(shape), dtype)  # (dtype as the caller names it: a class or a dtype)
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # (np.prod of a tuple costs ~5 us a call)
    if nbytes > SCRATCH_KEEP_BYTES:
        return np.empty(shape, dtype)
    bufs = tls.setdefault("bufs", {})
    buf = bufs.get(slot)
    slot_views = tls.setdefault("views", {}).setdefault(slot, {})
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[slot] = np.empty(nbytes, np.uint8)
        slot_views.clear()  # views of the old buffer
    out = buf[:nbytes].view(dtype).reshape(shape)
    if len(slot_views) < 16:
        slot_views[key] = out
    return out


def release_workspace():
    """Free this thread's reusable buffers (up to SCRATCH_KEEP_BYTES each for the column matrix,
    the padded input and the transposed dy) and the kept result buffers (cpu_memory); the next
    large op allocates them again."""
    _tls.__dict__.pop("bufs", None)
    _tls.__dict__.pop("views", None)
    _tls.__dict__.pop("fprop_col", None)
    _mem.release()


# The column matrix of the last fprop, for the wgrad of the same layer: in a training step the
# last convolution's backward starts with the wgrad of the input its forward just expanded
# (MNIST's conv(32->64) at batch 64: 1.9 ms of im2col saved). It is used only while the "col"
# slot still holds it (nothing else took the slot since), for the same problem, and when the
# input equals a snapshot taken at fprop (a copy and a compare: 2 passes over x instead of an
# R*S-times larger im2col), so an input changed in place in between is expanded again.
class keep_columns:  # noqa: N801  (a context manager, named like contextlib's)
    """Inside the block, this thread's im2col fprops keep their column matrix for the same
    layer's wgrad (above). gpuconv.nn's Conv2d enters it for a training forward whose weight
    gradient will follow; a bare functional conv2d (inference, a per-op benchmark) does not pay
    for the input snapshot (ResNet-50's 7x7 stem at batch 8: 1.6 of 19 ms) it will not use."""

    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = getattr(_tls, "keep_col", False)
        _tls.keep_col = True

    def __exit__(self, *exc):
        _tls.keep_col = self.prev


def _remember_col(p, x, col):
    if _threads.in_part():
        # A part of a batch split over the pool runs on whichever thread takes it (the caller
        # takes over parts no worker has started), and each thread keeps its own matrix: which
        # wgrad part found its matrix, and so took the other summation order, changed run to
        # run (a training step's weight gradient differed in 31 of 72 elements).
        _tls.__dict__.pop("fprop_col", None)
        return
    if col.nbytes > SCRATCH_KEEP_BYTES:  # not a kept slot buffer: do not hold it alive
        _tls.__dict__.pop("fprop_col", None)
        return
    snap = _scratch("col_x", x.shape, x.dtype)
    np.copyto(snap, x)
    _tls.fprop_col = (p, _tls.gens["col"], snap, col)


def _recall_col(p, x):
    if _threads.in_part():  # (see _remember_col)
        return None
    hit = _tls.__dict__.get("fprop_col")
    if hit is None or hit[0] != p or hit[1] != _tls.gens.get("col"):
        return None
    if hit[2].dtype != x.dtype or not np.array_equal(hit[2], x):
        return None
    return hit[3]


def _im2col(p: ConvProblem, x, slot="col"):
    """col (G, Cg*R*S, N*P*Q): column (n, p, q) holds the receptive field of output (n, p, q).

    One strided copy per kernel tap: measured 2.2x faster than reshaping a 7-D strided view
    (3.4 vs 7.5 ms for ResNet-50's 3x3 at batch 8), because each copy moves whole rows. For
    stride > 1 the padded input is first split into its stride phases, so that every tap reads
    unit-stride rows of one phase.
    """
    col = _scratch(slot, (p.groups, p.Cg, p.R, p.S, p.N, p.P, p.Q), x.dtype)
    if p.Q <= TAKE_IM2COL_MAX_Q and col.size <= SMALL_IM2COL:
        # Narrow planes: every strided copy moves rows of a few elements (gpuconv-train's
        # conv(16->32) on 4x4 at batch 32: 156 us in two copies); one gather through a cached
        # index table instead, from x and an appended 0 for the padding (58 us).
        xz = _scratch("col_xz", (x.size + 1,), x.dtype)
        xz[:-1] = x.reshape(-1)
        xz[-1] = 0
        table = _im2col_table(p)
        np.take(xz, table, out=col.reshape(table.shape))
        return col.reshape(p.groups, p.Cg * p.R * p.S, p.N * p.P * p.Q)
    xp = _pad(x, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)
    if p.stride_h == 1 and col.nbytes <= IM2COL_TWO_STAGE_BYTES:
        return _im2col_two_stage(p, xp, col)
    if col.size <= SMALL_IM2COL:  # one strided copy: per-call overhead dominates small layers
        sN, sC, sH, sW = xp.strides
        np.copyto(col, _strided(xp, shape=col.shape,
                                strides=(sC * p.Cg, sC, sH * p.dil_h, sW * p.dil_w, sN,
                                         sH * p.stride_h, sW * p.stride_w)))
        return col.reshape(p.groups, p.Cg * p.R * p.S, p.N * p.P * p.Q)
    phases = {}
    for r in range(p.R):
        for s in range(p.S):
            if p.stride_h == p.stride_w == 1:
                v = _tap(xp, p, r, s)
            else:
                i0, a = divmod(r * p.dil_h, p.stride_h)  # row r*dil + i*stride of phase a
                j0, b = divmod(s * p.dil_w, p.stride_w)
                if (a, b) not in phases:
                    phases[a, b] = np.ascontiguousarray(xp[:, :, a::p.stride_h, b::p.stride_w])
                v = phases[a, b][:, :, i0:i0 + p.P, j0:j0 + p.Q]
            col[:, :, r, s] = v.reshape(p.N, p.groups, p.Cg, p.P, p.Q).transpose(1, 2, 0, 3, 4)
    return col.reshape(p.groups, p.Cg * p.R * p.S, p.N * p.P * p.Q)


@functools.lru_cache(maxsize=16)
def _im2col_table(p: ConvProblem):
    """For _im2col's gather: the flat index into [x.ravel(), 0] of every column-matrix element,
    in col's (C, R, S, N, P, Q) order; padding positions index the appended 0. Read-only."""
    n, c, r, s, i, j = np.ix_(*(np.arange(d) for d in (p.N, p.C, p.R, p.S, p.P, p.Q)))
    h = i * p.stride_h + r * p.dil_h - p.pad_h
    w = j * p.stride_w + s * p.dil_w - p.pad_w
    inside = (h >= 0) & (h < p.H) & (w >= 0) & (w < p.W)
    flat = np.where(inside, ((n * p.C + c) * p.H + h) * p.W + w, p.N * p.C * p.H * p.W)
    table = np.ascontiguousarray(flat.transpose(1, 2, 3, 0, 4, 5), dtype=np.intp)
    table.setflags(write=False)
    return table


def _column_taps(p: ConvProblem, xp, per_image=False):
    """The S column taps of the padded input xp, every padded row h: xs[c, s, n, h, q] =
    xp[n, c, h, s*dil_w + q*stride_w], in (C, S, N, Hp, Q) order, or (N, C, S, Hp, Q) with
    per_image; one strided copy into the "col_rows" scratch buffer."""
    sN, sC, sH, sW = xp.strides
    hp = xp.shape[2]
    if per_image:
        shape, strides = (p.N, p.C, p.S, hp, p.Q), (sN, sC, sW * p.dil_w, sH, sW * p.stride_w)
    else:
        shape, strides = (p.C, p.S, p.N, hp, p.Q), (sC, sW * p.dil_w, sN, sH, sW * p.stride_w)
    xs = _scratch("col_rows", shape, xp.dtype)
    np.copyto(xs, _strided(xp, shape=shape, strides=strides))
    return xs


def _im2col_two_stage(p: ConvProblem, xp, col):
    """_im2col for stride_h == 1 in two copies, so that most of the data moves in long rows:
    first the S column taps, xs[c, s, n, h, q] = xp[n, c, h, s*dil_w + q*stride_w] (every padded
    row h, rows of Q elements); then the R row taps, col[c, r, s, n, :, :] = xs[c, s, n, r*dil_h:
    r*dil_h + P, :], which for stride 1 is one contiguous run of P*Q elements per (c, r, s, n).
    The per-tap copies move N*C*R*S*P rows of Q elements (10-28 wide in LeNet and MNIST
    layers, a few ns of loop overhead each); this moves N*C*S*Hp short rows and C*R*S*N long
    ones, at the price of writing xs (1/R of col): a gain while col stays in the caches (LeNet
    conv2 at batch 64, 3.8 MB: 0.94 -> 0.42 ms), a loss on large layers (MNIST conv2, 14 MB:
    2.7 -> 3.2 ms; ResNet-50's 3x3 at batch 8: 7.1 -> 8.9 ms)."""
    xs = _column_taps(p, xp)
    tC, tS, tN, tH, _ = xs.strides
    pq = p.P * p.Q
    dst = col.reshape(p.C, p.R, p.S, p.N, pq)
    np.copyto(dst, _strided(xs, shape=dst.shape,
                            strides=(tC, tH * p.dil_h, tS, tN, xs.itemsize)))
    return col.reshape(p.groups, p.Cg * p.R * p.S, p.N * pq)


def _is_pointwise(p: ConvProblem):
    return p.R == p.S == 1 and p.pad_h == p.pad_w == p.pad_h_end == p.pad_w_end == 0


# ---------------------------------------------------------------------------------------------
# entry points: the batch is processed in chunks when the column matrix would exceed the limit
# ---------------------------------------------------------------------------------------------
def _batch_chunks(p: ConvProblem, op, itemsize):
    per_image = p.im2col_elements() // p.N
    if op == "dgrad":  # the larger of the two dgrad intermediates (see _dgrad)
        per_image = max(per_image, p.K * p.R * p.S * p.H * p.W)
    n = max(1, WORKSPACE_BYTES // max(1, per_image * itemsize))
    return [(i, min(p.N, i + n)) for i in range(0, p.N, n)]


def _split(p, elements):
    """The batch parts for the thread pool (cpu_threads), or None.

    Depthwise layers split too when the pool is on. On the 2-core Intel machine of issue 11's
    sixth session they timed 1.4-1.7x slower split (cpu-target fprop 1.74 -> 3.04x PyTorch's
    time, in a run before the benchmark let the cores wake after its settle pause), so they
    were kept whole; on the 2-core Zen 3 of the eighth, paired calls gave fprop 0.64x, dgrad
    0.61x, wgrad 0.89x of the unsplit time, and cpu-target with the pool on 3.2-3.3x -> 2.2-2.3x
    PyTorch's fprop time. With the pool off nothing splits: right after a BLAS-threaded GEMM,
    whose OpenBLAS worker spins ~0.1 s on the other core, a split depthwise fprop ran 10.8 ms
    against 9.6 whole."""
    return _threads.parts(p.N, elements)


def _over_batch(p, op, elements, shape, dtype, one):
    """The result of an op whose images are independent, `shape` (batch first): one(q, a, b,
    out) computes images [a, b) (q = p.with_batch(b - a)) into `out`, their slice of the result.
    The batch is split over the thread pool (cpu_threads) and, inside each part, into
    column-matrix chunks (_batch_chunks)."""
    def chunked(a0, b0, out):
        q = p.with_batch(b0 - a0)
        chunks = _batch_chunks(q, op, np.dtype(dtype).itemsize)
        if len(chunks) == 1:
            return one(q, a0, b0, out)
        for a, b in chunks:
            one(q.with_batch(b - a), a0 + a, a0 + b, out[a:b])
        return out

    res = _mem.empty(shape, dtype)  # (reused across steps: no page faults, see cpu_memory)
    split = _split(p, elements)
    if split is None:
        with _threads.serial(p.N):
            return chunked(0, p.N, res)
    _threads.run(lambda i, a, b: chunked(a, b, res[a:b]), split)
    return res


def conv_fprop(p: ConvProblem, x, w, bias=None):
    if memory_format(x) == "nhwc":  # channels_last: numpy_nhwc computes on its NHWC memory
        return _nhwc.conv_fprop(p, x, w, bias)
    keep = getattr(_tls, "keep_col", False)  # (read here: the parts may run on pool threads)
    return _over_batch(p, "fprop", p.im2col_elements() + p.N * p.K * p.P * p.Q, p.y_shape,
                       x.dtype, lambda q, a, b, out: _fprop(q, x[a:b], w, bias, out, keep))


def conv_dgrad(p: ConvProblem, w, dy):
    if memory_format(dy) == "nhwc":
        return _nhwc.conv_dgrad(p, w, dy)
    return _over_batch(p, "dgrad", p.N * p.K * p.P * p.Q * p.R * p.S + p.N * p.C * p.H * p.W,
                       p.x_shape, dy.dtype, lambda q, a, b, out: _dgrad(q, w, dy[a:b], out))


def conv_wgrad(p: ConvProblem, x, dy):
    if memory_format(x) == "nhwc":
        return _nhwc.conv_wgrad(p, x, dy)
    split = _split(p, p.im2col_elements() + p.N * p.K * p.P * p.Q)
    if split is None:
        with _threads.serial(p.N):
            return _wgrad_chunked(p, x, dy)
    part = [None] * len(split)

    def one(i, a, b):
        part[i] = _wgrad_chunked(p.with_batch(b - a), x[a:b], dy[a:b])

    _threads.run(one, split)
    dw = part[0]
    for d in part[1:]:  # in part order: deterministic
        dw += d
    return dw


def _wgrad_chunked(p, x, dy):
    chunks = _batch_chunks(p, "wgrad", x.itemsize)
    dw = _wgrad(p.with_batch(chunks[0][1]), x[:chunks[0][1]], dy[:chunks[0][1]])
    for a, b in chunks[1:]:
        dw += _wgrad(p.with_batch(b - a), x[a:b], dy[a:b])
    return dw


# ---------------------------------------------------------------------------------------------
# fprop: y = conv(x, w) + b
# ---------------------------------------------------------------------------------------------
def _fprop(p: ConvProblem, x, w, bias=None, out=None, keep=False):
    """y = conv(x, w) + bias, into `out` (C-contiguous, y's shape) when given; keep: remember
    the column matrix for wgrad (keep_columns)."""
    if p.is_depthwise:
        return _fprop_depthwise(p, x, w, bias, out)
    wg = w.reshape(p.groups, p.Kg, p.Cg * p.R * p.S)
    if _is_pointwise(p):
        # 1x1: the input (subsampled for stride > 1) already is the GEMM operand, per image.
        xs = x[:, :, ::p.stride_h, ::p.stride_w]
        xs = np.ascontiguousarray(xs).reshape(p.N, p.groups, p.Cg, p.P * p.Q)
        y = np.matmul(wg, xs, out=None if out is None else out.reshape(xs.shape[:2] + (
            p.Kg, p.P * p.Q))).reshape(p.y_shape)  # (N, G, Kg, PQ): already NCHW
        if bias is not None:
            y += bias.reshape(1, p.K, 1, 1)
        return y
    y = (np.empty((p.N, p.groups, p.Kg, p.P * p.Q), dtype=x.dtype) if out is None else
         out.reshape(p.N, p.groups, p.Kg, p.P * p.Q))
    if FPROP_SPLIT_TAPS(p):
        return _fprop_split_taps(p, x, w, bias, y.reshape(p.y_shape))
    col = _im2col(p, x)
    if keep:
        _remember_col(p, x, col)
    if FPROP_ONE_GEMM(p):
        g = np.matmul(wg, col, out=_scratch("fprop_gemm", (p.groups, p.Kg, p.N * p.P * p.Q),
                                              x.dtype))
        g = g.reshape(p.groups, p.Kg, p.N, p.P * p.Q).transpose(2, 0, 1, 3)
        if bias is None:
            np.copyto(y, g)
        else:  # the bias add is the transposing copy
            np.add(g, bias.reshape(1, p.groups, p.Kg, 1), out=y)
        return y.reshape(p.y_shape)
    # One GEMM per image and group, written straight into y: col's image n is the (Cg*R*S, P*Q)
    # slice col[g, :, n] (row stride N*P*Q, which BLAS takes as is), so no transposition pass.
    col = col.reshape(p.groups, p.Cg * p.R * p.S, p.N, p.P * p.Q)
    np.matmul(wg, col.transpose(2, 0, 1, 3), out=y)
    y = y.reshape(p.y_shape)
    if bias is not None:
        y += bias.reshape(1, p.K, 1, 1)
    return y


def _fprop_split_taps(p: ConvProblem, x, w, bias, y):
    """Stride 1: the column taps go into the GEMM, the row taps are gathered after it (the
    fprop twin of _dgrad_split_taps).

        xs[c, s, n, h, q] = xp[n, c, h, s*dil_w + q*stride_w]      (xp: the padded input)
        E[k, r, n, h, q] = sum_{c, s} w[k, c, r, s] * xs[c, s, n, h, q]
        y[n, k, p, q] = bias[k] + sum_r E[k, r, n, p + r*dil_h, q]

    xs is 1/R of the column matrix (the first copy of _im2col_two_stage) and E is K*R rows of
    N*Hp*Q: less memory traffic than im2col's C*R*S rows of N*P*Q written and read back where
    K*Hp <= C*S*P (FPROP_SPLIT_TAPS), for the same GEMM FLOPs within Hp/P. One GEMM per group
    over the batch from ONE_GEMM_FLOPS on, else one per image and group; the R-term gather
    writes y in NCHW either way."""
    xp = _pad(x, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)
    hp = xp.shape[2]
    wm = np.ascontiguousarray(w.reshape(p.groups, p.Kg, p.Cg, p.R, p.S).transpose(
        0, 1, 3, 2, 4)).reshape(p.groups, p.Kg * p.R, p.Cg * p.S)
    lh = hp * p.Q
    if 2 * p.K * p.Cg * p.R * p.S * p.N * lh >= ONE_GEMM_FLOPS:
        rhs = _column_taps(p, xp).reshape(p.groups, p.Cg * p.S, p.N * lh)
        e = _scratch("fprop_e", (p.groups, p.Kg * p.R, p.N * lh), x.dtype)
        ev = e.reshape(p.K, p.R, p.N, hp, p.Q).transpose(2, 0, 1, 3, 4)
    else:
        rhs = _column_taps(p, xp, per_image=True).reshape(p.N, p.groups, p.Cg * p.S, lh)
        e = _scratch("fprop_e", (p.N, p.groups, p.Kg * p.R, lh), x.dtype)
        ev = e.reshape(p.N, p.K, p.R, hp, p.Q)
    np.matmul(wm, rhs, out=e)
    first = ev[:, :, 0, :p.P]  # (N, K, P, Q) views of E, one per row tap
    if bias is None:
        np.copyto(y, first)
    else:
        np.add(first, bias.reshape(1, p.K, 1, 1), out=y)
    for r in range(1, p.R):
        y += ev[:, :, r, r * p.dil_h:r * p.dil_h + p.P]
    return y


def _fprop_depthwise(p: ConvProblem, x, w, bias, out=None):
    """Cg == 1: per block of planes, (Kg x R*S) @ (R*S x P*Q) over the planes' tap windows."""
    taps = [(r * p.dil_h - p.pad_h, s * p.dil_w - p.pad_w) for r in range(p.R)
            for s in range(p.S)]
    rows = np.broadcast_to(w.reshape(1, p.groups, p.Kg, p.R * p.S),
                           (p.N, p.groups, p.Kg, p.R * p.S)).reshape(p.N * p.groups, p.Kg, -1)
    y = (np.empty((p.N * p.groups, p.Kg, p.P * p.Q), x.dtype) if out is None else  # (N, K, PQ)
         out.reshape(p.N * p.groups, p.Kg, p.P * p.Q))
    planes = x.reshape(p.N * p.C, p.H, p.W)
    if DEPTHWISE_FLAT and p.stride_h == p.stride_w == 1:
        ye = None
        yb = y.reshape(p.N * p.groups, p.Kg, p.P, p.Q)
        bias_rows = None if bias is None else np.ascontiguousarray(np.broadcast_to(
            bias.reshape(1, p.groups, p.Kg, 1), (p.N, p.groups, p.Kg, 1))).reshape(
            p.N * p.groups, p.Kg, 1)
        for b0, b1, cb, wp in _flat_windows(p, planes):
            n = b1 - b0
            if wp == p.Q:  # (Q == W: col is the tap windows themselves)
                np.matmul(rows[b0:b1], cb, out=y[b0:b1])
            else:
                if ye is None:
                    ye = np.empty((min(32, len(planes)), p.Kg, p.P, wp), x.dtype)
                np.matmul(rows[b0:b1], cb, out=ye[:n].reshape(n, p.Kg, p.P * wp))
                np.copyto(yb[b0:b1], ye[:n, :, :, :p.Q])  # the garbage columns dropped
            if bias is not None:  # (while the block is in cache)
                y[b0:b1] += bias_rows[b0:b1]
        return y.reshape(p.y_shape)
    else:
        for b0, b1, cb in _windows(planes, taps, p.P, p.Q, p.stride_h, p.stride_w):
            np.matmul(rows[b0:b1], cb, out=y[b0:b1])
    y = y.reshape(p.y_shape)
    if bias is not None:
        y += bias.reshape(1, p.K, 1, 1)
    return y


def _valid_range(d, stride, size, out):
    """[i0, i1): the outputs i whose input index i*stride + d lies in [0, size)."""
    i0 = min(out, max(0, -(d // stride)))
    i1 = max(i0, min(out, -(-(size - d) // stride)))
    return i0, i1


def _flat_windows(p: ConvProblem, planes, block=32):
    """Stride 1: yield (b0, b1, col, wp), col[b, r*S + s, i*wp + j] = xpad[b0 + b, i + r*dil_h,
    j + s*dil_w] for the zero-padded planes xpad: outputs on rows wp wide, so that each tap of a
    plane is ONE contiguous run of P*wp elements of a flat plane, and a block's taps one strided
    copy. _windows instead copies P rows of Q per tap and plane.

    Where the output is as wide as the input (Q == W: 'same' padding), wp = W = Q and the planes
    are copied whole, as flat runs with zeros before and after for the vertical padding
    (_same_width_windows): col is then exactly the tap windows, and the caller's GEMM writes y
    in place. Otherwise the planes are zero-padded to rows of wp = W + pad_w + pad_w_end, and the
    columns j >= Q of col are garbage the caller drops. Depthwise 3x3 over 144 x 56 x 56 planes
    at batch 8, 2 threads: padded rows 6.4 ms fprop, 6.6 wgrad (7.8 / 8.0 by _windows)."""
    if p.Q == p.W:
        yield from _same_width_windows(p, planes, block)
        return
    nb = planes.shape[0]
    hp, wp = p.H + p.pad_h + p.pad_h_end, p.W + p.pad_w + p.pad_w_end
    L = p.P * wp
    n0 = min(block, nb)
    # (slack after the last plane: its last taps' runs end up to (S-1)*dil_w past it)
    buf = np.zeros(n0 * hp * wp + (p.S - 1) * p.dil_w, planes.dtype)
    xpad = buf[:n0 * hp * wp].reshape(n0, hp, wp)
    col = np.empty((n0, p.R, p.S, L), planes.dtype)
    it = buf.itemsize
    for b0 in range(0, nb, block):
        b1 = min(nb, b0 + block)
        n = b1 - b0
        xpad[:n, p.pad_h:p.pad_h + p.H, p.pad_w:p.pad_w + p.W] = planes[b0:b1]
        np.copyto(col[:n], _strided(buf, shape=(n, p.R, p.S, L), strides=(
            hp * wp * it, p.dil_h * wp * it, p.dil_w * it, it)))
        yield b0, b1, col[:n].reshape(n, p.R * p.S, L), wp


def _same_width_windows(p: ConvProblem, planes, block):
    """_flat_windows for Q == W (stride 1). Each plane sits in a flat slot of
    front + H*W + back elements, front = pad_h*W + pad_w and back = pad_h_end*W + pad_w_end zeros
    (written once: the copies only fill the middle). Output (i, j) of tap (r, s) reads slot
    element i*W + j + r*dil_h*W + s*dil_w, which is the padded input's (i + r*dil_h, j + s*dil_w)
    wherever that column lies inside the row; a column outside it (j + s*dil_w - pad_w < 0 or
    >= W) wraps to the neighbouring row, so those entries of col are set to 0 after the copy,
    exactly the padding's zeros. Rows above or below the plane land in the zero front and back.
    No padded rows to copy and no garbage columns to drop: 3x3 over 144 x 56 x 56 planes at
    batch 8, one thread, paired calls (median/min): fprop 8.47/8.10 -> 8.13/7.85 ms, dgrad
    8.97/8.37 -> 8.61/7.99, wgrad 9.11/8.37 -> 8.15/7.68 (fprop and dgrad bit-identical). The tap
    copy (4 ms) and the per-plane GEMVs (3.8 ms) are what is left."""
    nb, hw, pq = planes.shape[0], p.H * p.W, p.P * p.Q
    front = p.pad_h * p.W + p.pad_w
    slot = front + hw + p.pad_h_end * p.W + p.pad_w_end
    n0 = min(block, nb)
    buf = np.zeros((n0, slot), planes.dtype)
    col = np.empty((n0, p.R, p.S, pq), planes.dtype)
    it = buf.itemsize
    flat = planes.reshape(nb, hw)
    wraps = []  # (s, columns of the output that tap column s must not read)
    for s in range(p.S):
        j0, j1 = _valid_range(s * p.dil_w - p.pad_w, 1, p.W, p.Q)  # the columns it may read
        for cut in (slice(0, j0), slice(j1, p.Q)):
            if cut.start < cut.stop:  # (one column by an int: a 1-D strided loop, 6x faster)
                wraps.append((s, cut.start if cut.stop - cut.start == 1 else cut))
    for b0 in range(0, nb, block):
        b1 = min(nb, b0 + block)
        n = b1 - b0
        buf[:n, front:front + hw] = flat[b0:b1]
        np.copyto(col[:n], _strided(buf, shape=(n, p.R, p.S, pq), strides=(
            slot * it, p.dil_h * p.W * it, p.dil_w * it, it)))
        for s, cut in wraps:
            col[:n, :, s].reshape(n * p.R, p.P, p.Q)[:, :, cut] = 0
        yield b0, b1, col[:n].reshape(n, p.R * p.S, pq), p.Q


def _windows(planes, taps, out_h, out_w, sh=1, sw=1, block=32):
    """Yield (b0, b1, col): col[b, t, i*out_w + j] = planes[b0 + b, i*sh + dh_t, j*sw + dw_t]
    for the taps [(dh, dw)], zero where that index falls outside the plane (the padding).

    The column matrix of a block of 32 planes (in L2), built with one 2-D copy per tap straight
    from the unpadded planes: no padded copy and nothing to crop. Depthwise 3x3 over 144 x 56 x 56
    planes at batch 8, fprop: 7.7 ms (10.5 ms with a padded, flattened copy and a cropped output;
    13 ms as a multiply-add per tap). Blocks of 16-64 planes time alike, 8 or fewer are slower.
    """
    nb, h, w = planes.shape
    col = np.zeros((min(block, nb), len(taps), out_h, out_w), planes.dtype)  # borders stay 0
    spans = [(_valid_range(dh, sh, h, out_h), _valid_range(dw, sw, w, out_w)) for dh, dw in taps]
    for b0 in range(0, nb, block):
        b1 = min(nb, b0 + block)
        cb = col[:b1 - b0]
        for t, ((dh, dw), ((i0, i1), (j0, j1))) in enumerate(zip(taps, spans)):
            if i0 < i1 and j0 < j1:
                cb[:, t, i0:i1, j0:j1] = planes[b0:b1, i0 * sh + dh:(i1 - 1) * sh + dh + 1:sh,
                                                j0 * sw + dw:(j1 - 1) * sw + dw + 1:sw]
        yield b0, b1, cb.reshape(b1 - b0, len(taps), out_h * out_w)


def bias_grad(dy):
    """dL/db: dy (N, K, P, Q) summed over N, P and Q.

    A C-contiguous (or channels_last) dy is summed by one matrix-vector product
    with ones -- per (image, channel) row for NCHW, per pixel row for NHWC -- then over the
    images: 4-6x faster than ndarray.sum over axes (0, 2, 3), which walks N*K short reductions
    (MNIST's conv(1->32) at batch 64: 57 vs 349 us). Each output is one BLAS dot product over a
    fixed order, so results are the same run to run.
    """
    n, k, h, w = dy.shape
    if dy.size == 0:
        return dy.sum(axis=(0, 2, 3))
    with _threads.serial(n):  # (the GEMV on one BLAS thread while the pool is on, see serial)
        if dy.flags.c_contiguous:
            ones = np.ones(h * w, dy.dtype)
            return (dy.reshape(n * k, h * w) @ ones).reshape(n, k).sum(axis=0)
        if memory_format(dy) == "nhwc":
            ones = np.ones(n * h * w, dy.dtype)
            return ones @ dy.transpose(0, 2, 3, 1).reshape(n * h * w, k)
    return dy.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# wgrad: dw = conv(x, dy) -- the column matrix times dy, summed over N*P*Q
# ---------------------------------------------------------------------------------------------
def _wgrad(p: ConvProblem, x, dy):
    if p.is_depthwise:
        return _wgrad_depthwise(p, x, dy)
    if _is_pointwise(p):
        xs = x[:, :, ::p.stride_h, ::p.stride_w]
        xs = np.ascontiguousarray(xs).reshape(p.N, p.groups, p.Cg, p.P * p.Q)
        dyg = dy.reshape(p.N, p.groups, p.Kg, p.P * p.Q)
        dw = np.matmul(dyg, xs.transpose(0, 1, 3, 2)).sum(axis=0)  # (G, Kg, Cg)
        return dw.reshape(p.w_shape)
    col = _recall_col(p, x)
    if col is None and WGRAD_SPLIT_TAPS(p):
        return _wgrad_split_taps(p, x, dy)
    if p.Cg * p.R * p.S <= SMALL_WGRAD_ROWS:
        # Few column-matrix rows (a C = 1 first layer): one small GEMM per image and group,
        # dy_n (Kg x P*Q) @ col_n^T, summed over the images in a fixed order. No transposed copy
        # of dy, and BLAS is not stuck with a (Cg*R*S x Kg) output over an N*P*Q-long reduction:
        # MNIST's conv(1->32, 3x3) at batch 64, 0.50 vs 2.4 ms; LeNet's conv(1->6, 5x5) 0.18 vs
        # 0.7 ms. With 150 rows (LeNet's second layer) the single GEMM is 2x faster again.
        col = (_im2col(p, x) if col is None else col).reshape(
            p.groups, p.Cg * p.R * p.S, p.N, p.P * p.Q)
        part = np.matmul(dy.reshape(p.N, p.groups, p.Kg, p.P * p.Q), col.transpose(2, 0, 3, 1))
        return part.sum(axis=0).reshape(p.w_shape)  # (G, Kg, Cg*R*S)
    if p.P * p.Q >= WGRAD_PER_IMAGE_PQ:
        return _wgrad_per_image(p, _im2col(p, x) if col is None else col, dy)
    # dy as (G, Kg, N*P*Q), the same column order as _im2col
    dy_t = _scratch("dy_t", (p.groups, p.Kg, p.N, p.P * p.Q), dy.dtype)
    dy_t[...] = dy.reshape(p.N, p.groups, p.Kg, p.P * p.Q).transpose(1, 2, 0, 3)
    dy_t = dy_t.reshape(p.groups, p.Kg, p.N * p.P * p.Q)
    # dw^T = col @ dy^T: with the long N*P*Q axis as the reduction and the small Kg as GEMM
    # columns; the other orientation (dy @ col^T) ran 10-17x slower in OpenBLAS on 2 threads
    # when the cores were shared (37 ms vs 660 ms for ResNet-50's 3x3).
    col = _im2col(p, x) if col is None else col
    dw_t = np.matmul(col, dy_t.transpose(0, 2, 1))  # (G, Cg*R*S, Kg)
    return np.ascontiguousarray(dw_t.transpose(0, 2, 1)).reshape(p.w_shape)


def _wgrad_per_image(p: ConvProblem, col, dy):
    """dw^T = sum_n col_n @ dy_n^T, image by image in a fixed order: each image's column block
    (row stride N*P*Q) and its dy (transposed by the BLAS flag) as they are, so no transposed
    copy of dy. For planes of >= WGRAD_PER_IMAGE_PQ outputs, where each GEMM still reduces
    over a long P*Q: ResNet-50's 7x7 stem (C=3, 112x112 out) at batch 8, 2 threads, GEMM part
    19.1/17.6 -> 16.7/15.1 ms (median/min, paired calls); at P*Q = 3136 it tied (r50's 3x3),
    at 729 and below it lost (AlexNet conv2 1.07x, MNIST conv2 1.14x, LeNet-5 conv2 1.67x)."""
    c = col.reshape(p.groups, p.Cg * p.R * p.S, p.N, p.P * p.Q)
    d = dy.reshape(p.N, p.groups, p.Kg, p.P * p.Q)
    dw_t = np.matmul(c[:, :, 0], d[0].transpose(0, 2, 1))  # (G, Cg*R*S, Kg)
    for n in range(1, p.N):
        dw_t += np.matmul(c[:, :, n], d[n].transpose(0, 2, 1))
    return np.ascontiguousarray(dw_t.transpose(0, 2, 1)).reshape(p.w_shape)


def _wgrad_split_taps(p: ConvProblem, x, dy):
    """Row stride 1: dw from the column-tap copy of the input, without the column matrix.

        xs[c, s, n, h, q] = xp[n, c, h, s*dil_w + q*stride_w]      (xp: the padded input)
        dw[k, c, r, s] = sum_n sum_{p, q} dy[n, k, p, q] * xs[c, s, n, p + r*dil_h, q]

    For image n and row tap r the (Cg*S, P*Q) operand is a view of xs (rows r*dil_h ..
    r*dil_h + P - 1 of each (c, s) plane are one contiguous run of P*Q, at one row stride), so
    one batched matmul does the N*R*G GEMMs (Cg*S x P*Q) @ (P*Q x Kg), summed over the images
    after in a fixed order. xs is 1/R of the column matrix, and each GEMM reduces over one
    image's P*Q, where BLAS does well."""
    xp = _pad(x, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)
    hp = xp.shape[2]
    xs = _column_taps(p, xp)
    it, pq, row = xs.itemsize, p.P * p.Q, p.N * hp * p.Q
    lhs = _strided(xs, shape=(p.N, p.R, p.groups, p.Cg * p.S, pq),
                   strides=(hp * p.Q * it, p.dil_h * p.Q * it, p.Cg * p.S * row * it,
                            row * it, it))
    dyg = dy.reshape(p.N, 1, p.groups, p.Kg, pq).transpose(0, 1, 2, 4, 3)
    dw = np.matmul(lhs, dyg).sum(axis=0)  # (R, G, Cg*S, Kg)
    return np.ascontiguousarray(dw.reshape(p.R, p.groups, p.Cg, p.S, p.Kg).transpose(
        1, 4, 2, 0, 3)).reshape(p.w_shape)


def _wgrad_depthwise(p: ConvProblem, x, dy):
    """Cg == 1: per block of planes, (R*S x P*Q) tap windows @ dy (P*Q x Kg), summed over N."""
    taps = [(r * p.dil_h - p.pad_h, s * p.dil_w - p.pad_w) for r in range(p.R)
            for s in range(p.S)]
    dyt = dy.reshape(p.N * p.groups, p.Kg, p.P * p.Q).transpose(0, 2, 1)  # (N*G, P*Q, Kg)
    part = np.empty((p.N * p.groups, p.R * p.S, p.Kg), dy.dtype)
    planes = x.reshape(p.N * p.C, p.H, p.W)
    if DEPTHWISE_FLAT and p.stride_h == p.stride_w == 1:
        # dy on rows as wide as _flat_windows' (zero past Q, so its garbage columns add 0)
        dyb = dy.reshape(p.N * p.groups, p.Kg, p.P, p.Q)
        dye = None
        for b0, b1, cb, wp in _flat_windows(p, planes):
            n = b1 - b0
            if wp == p.Q:
                np.matmul(cb, dyt[b0:b1], out=part[b0:b1])
                continue
            if dye is None:
                dye = np.zeros((min(32, len(planes)), p.Kg, p.P, wp), dy.dtype)
            np.copyto(dye[:n, :, :, :p.Q], dyb[b0:b1])
            np.matmul(cb, dye[:n].reshape(n, p.Kg, p.P * wp).transpose(0, 2, 1),
                      out=part[b0:b1])
    else:
        for b0, b1, cb in _windows(planes, taps, p.P, p.Q, p.stride_h, p.stride_w):
            np.matmul(cb, dyt[b0:b1], out=part[b0:b1])
    dw = part.reshape(p.N, p.groups, p.R * p.S, p.Kg).sum(axis=0)  # (G, R*S, Kg)
    return np.ascontiguousarray(dw.transpose(0, 2, 1)).reshape(p.w_shape)


# ---------------------------------------------------------------------------------------------
# dgrad: dx = conv(pad(stride-dilate(dy)), mirror(w)), by stride phases
# ---------------------------------------------------------------------------------------------
def _dgrad(p: ConvProblem, w, dy, out=None):
    """dx = conv(pad(stride-dilate(dy)), mirror(w)), one stride phase at a time.

    Two orders of the same sum, chosen by the size of their intermediate:
    - gather-first: build the column matrix of dy for the phase's mirrored taps (Kg*T rows),
      then one batched GEMM with the mirrored, channel-swapped weights (intermediate ~K*R*S*N*H*W
      / stride^2);
    - channel-first: contract the channels first, dcol = w^T dy (C*R*S rows, one GEMM), then
      gather each phase's mirrored taps from dcol and sum them (intermediate C*R*S*N*P*Q).
    Both read only the taps that hit real dy elements: the stride zeros are never formed.
    """
    if DEPTHWISE_FLAT and p.is_depthwise and p.Kg == 1 and p.stride_h == p.stride_w == 1:
        # stride 1, one kernel per channel: dx is the depthwise fprop of dy padded by
        # dil*(R-1) - pad with the mirrored kernels, when no padding is wider than the dilated
        # kernel (3x3 on 144 x 56 x 56 at batch 8, 2 threads: 9.3 -> 6.4 ms)
        pads = (p.dil_h * (p.R - 1) - p.pad_h, p.dil_h * (p.R - 1) - p.pad_h_end,
                p.dil_w * (p.S - 1) - p.pad_w, p.dil_w * (p.S - 1) - p.pad_w_end)
        if min(pads) >= 0:
            q = dataclasses.replace(p, H=p.P, W=p.Q, pad_h=pads[0], pad_h_end=pads[1],
                                    pad_w=pads[2], pad_w_end=pads[3])
            return _fprop_depthwise(q, dy, w[:, :, ::-1, ::-1], None,
                                    np.empty(p.x_shape, dy.dtype) if out is None else out)
    ph_h, lo_h, hi_h = _phase_taps(p.H, p.pad_h, p.R, p.dil_h, p.stride_h, p.P)
    ph_w, lo_w, hi_w = _phase_taps(p.W, p.pad_w, p.S, p.dil_w, p.stride_w, p.Q)
    if out is None:
        dx = np.zeros(p.x_shape, dtype=dy.dtype)  # (lazily zeroed pages: no pass when unused)
    else:
        dx = out
        dx.fill(0)
    if p.is_depthwise and p.Kg == 1:
        return _dgrad_depthwise(p, w, dy, ph_h, ph_w, dx)
    if p.stride_h == p.stride_w == 1 and not p.is_depthwise and DGRAD_SPLIT_TAPS(p):
        return _dgrad_split_taps(p, w, dy, dx)
    if p.is_depthwise:
        dyp = _pad(dy, lo_h, hi_h, lo_w, hi_w)
        gather = _dgrad_phase_depthwise
    elif p.C * p.P * p.Q < p.K * p.H * p.W // (p.stride_h * p.stride_w):
        return _dgrad_channel_first(p, w, dy, ph_h, ph_w, dx)
    else:
        dyp = _pad(dy, lo_h, hi_h, lo_w, hi_w)  # the boundary zeros of the padded dy
        gather = _dgrad_phase_gemm
    w6 = w.reshape(p.groups, p.Kg, p.Cg, p.R, p.S)
    for h0, n_i, taps_h in ph_h:
        for w0, n_j, taps_w in ph_w:
            if not (n_i and n_j and taps_h and taps_w):
                continue  # no tap reaches these pixels: dx stays exactly 0
            if (n_i, n_j) == (p.H, p.W):  # stride 1: the only phase is the whole of dx
                gather(p, w6, dyp, taps_h, taps_w, n_i, n_j, lo_h, lo_w, out=dx)
            else:
                dx[:, :, h0::p.stride_h, w0::p.stride_w] = gather(
                    p, w6, dyp, taps_h, taps_w, n_i, n_j, lo_h, lo_w)
    return dx


def _dgrad_split_taps(p, w, dy, dx):
    """Stride 1: the column taps go into the GEMM, the row taps are gathered after it.

        dys[k, s', n, p, j] = dy[n, k, p, j + pad_w - (S-1-s')*dil_w]  (0 outside dy)
        E[c, r, n, p, j] = sum_{k, s'} w[k, c, r, S-1-s'] * dys[k, s', n, p, j]
        dx[n, c, h, j] = sum_r E[c, r, n, h + pad_h - r*dil_h, j]

    dys is one strided copy of the width-padded dy (rows of W elements), the GEMM reduces over
    Kg*S instead of Kg (one GEMM over the whole batch from ONE_GEMM_FLOPS on, see there), and the
    gather is R shifted adds of whole row blocks instead of R*S adds of shifted planes with the
    wrapping columns zeroed first. The intermediates are K*S and C*R rows of N*P*W instead of
    one of C*R*S rows."""
    left = max(0, (p.S - 1) * p.dil_w - p.pad_w)  # zero columns so every tap reads inside dyp
    right = max(0, p.W + p.pad_w - p.Q)
    dyp = _pad(dy, 0, 0, left, right)
    sN, sK, sH, sW = dyp.strides
    base = dyp[:, :, :, p.pad_w + left - (p.S - 1) * p.dil_w:]
    wm = w.reshape(p.groups, p.Kg, p.Cg, p.R, p.S)[..., ::-1]  # s' = S-1-s
    wm = np.ascontiguousarray(wm.transpose(0, 2, 3, 1, 4)).reshape(
        p.groups, p.Cg * p.R, p.Kg * p.S)
    pw = p.P * p.W
    one_gemm = 2 * p.C * p.R * p.K * p.S * p.N * pw >= ONE_GEMM_FLOPS
    if one_gemm:  # one GEMM per group: dys (K, S, N, P, W), e (C, R, N, P, W)
        dys = _scratch("dgrad_dys", (p.K, p.S, p.N, p.P, p.W), dy.dtype)
        strides = (sK, sW * p.dil_w, sN, sH, sW)
        rhs = dys.reshape(p.groups, p.Kg * p.S, p.N * pw)
        e = _scratch("dgrad_e", (p.groups, p.Cg * p.R, p.N * pw), dy.dtype)
    else:  # one GEMM per image and group: dys (N, K, S, P, W), e (N, C, R, P, W)
        dys = _scratch("dgrad_dys", (p.N, p.K, p.S, p.P, p.W), dy.dtype)
        strides = (sN, sK, sW * p.dil_w, sH, sW)
        rhs = dys.reshape(p.N, p.groups, p.Kg * p.S, pw)
        e = _scratch("dgrad_e", (p.N, p.groups, p.Cg * p.R, pw), dy.dtype)
    np.copyto(dys, _strided(base, shape=dys.shape, strides=strides))
    np.matmul(wm, rhs, out=e)
    e = (e.reshape(p.C, p.R, p.N, p.P, p.W).transpose(2, 0, 1, 3, 4) if one_gemm else
         e.reshape(p.N, p.C, p.R, p.P, p.W))
    for r in range(p.R):  # e: an (N, C, R, P, W) view
        h0 = max(0, r * p.dil_h - p.pad_h)
        h1 = min(p.H, p.P + r * p.dil_h - p.pad_h)
        if h0 < h1:
            p0 = h0 + p.pad_h - r * p.dil_h
            dx[:, :, h0:h1] += e[:, :, r, p0:p0 + h1 - h0]
    return dx


def _dgrad_depthwise(p, w, dy, ph_h, ph_w, dx):
    """Cg == Kg == 1: each stride phase is a tap-weighted sum of shifted dy planes, the mirrored
    taps' weights as one row per plane: (1 x T) @ (T x I*J) per block of planes."""
    w3 = w.reshape(p.C, p.R, p.S)
    planes = dy.reshape(p.N * p.C, p.P, p.Q)
    for h0, n_i, taps_h in ph_h:
        for w0, n_j, taps_w in ph_w:
            if not (n_i and n_j and taps_h and taps_w):
                continue  # no tap reaches these pixels: dx stays exactly 0
            coefs = np.stack([w3[:, r, s] for r, _ in taps_h for s, _ in taps_w], axis=1)
            rows = np.broadcast_to(coefs[None, :, None], (p.N,) + coefs.shape[:1] + (1,) +
                                   coefs.shape[1:]).reshape(p.N * p.C, 1, -1)
            taps = [(oh, ow) for _, oh in taps_h for _, ow in taps_w]
            out = np.empty((p.N * p.C, 1, n_i * n_j), dy.dtype)
            for b0, b1, cb in _windows(planes, taps, n_i, n_j):
                np.matmul(rows[b0:b1], cb, out=out[b0:b1])
            dx[:, :, h0::p.stride_h, w0::p.stride_w] = out.reshape(p.N, p.C, n_i, n_j)
    return dx


def _dgrad_channel_first(p, w, dy, ph_h, ph_w, dx):
    # dcol[n, g, (cg, r, s), (p, q)] = sum_kg w[g, kg, cg, r, s] * dy[n, g, kg, p, q]: one GEMM
    # per image and group, reading dy in place.
    wt = w.reshape(p.groups, p.Kg, p.Cg * p.R * p.S).transpose(0, 2, 1)  # (G, Cg*R*S, Kg)
    # Stride 1 with dx rows at least as wide as dy's (and not much wider): dy rows are padded
    # with zeros to dx's width W first, so dcol planes and dx planes share a row width and the
    # taps can be gathered as flat shifts (_gather_flat_shifts). The padding costs W/Q more
    # GEMM work (LeNet's 'valid' 5x5 on 14x14: 1.4x of a small GEMM).
    frame = p.stride_h == p.stride_w == 1 and p.Q <= p.W <= DGRAD_FRAME_WIDEN * p.Q
    width = p.W if frame else p.Q
    if width != p.Q:
        dyw = _scratch("dy_t", (p.N, p.K, p.P, width), dy.dtype)
        dyw[..., p.Q:] = 0
        dyw[..., :p.Q] = dy
        dy = dyw
    dcol = _scratch("col", (p.N, p.groups, p.Cg * p.R * p.S, p.P * width), dy.dtype)
    np.matmul(wt, dy.reshape(p.N, p.groups, p.Kg, p.P * width), out=dcol)
    dcol = dcol.reshape(p.N, p.C, p.R, p.S, p.P, width)
    if frame:
        return _gather_flat_shifts(p, dcol, dx)
    for h0, n_i, taps_h in ph_h:
        for w0, n_j, taps_w in ph_w:
            acc = dx[:, :, h0::p.stride_h, w0::p.stride_w]  # (N, C, I, J) view
            for r, oh in taps_h:
                i0, i1 = max(0, -oh), min(n_i, p.P - oh)  # dy rows outside [0, P) are zeros
                for s, ow in taps_w:
                    j0, j1 = max(0, -ow), min(n_j, p.Q - ow)
                    if i0 < i1 and j0 < j1:
                        acc[:, :, i0:i1, j0:j1] += dcol[:, :, r, s, oh + i0:oh + i1,
                                                        ow + j0:ow + j1]
    return dx


def _gather_flat_shifts(p, dcol, dx):
    """Stride 1, dcol planes (P, W) with dx's row width W (dy zero-padded on the right when
    Q < W): dx[h, w] += dcol[r, s][h + ah, w + aw] with ah = pad_h - r*dil_h, aw = pad_w -
    s*dil_w, as one shifted add per tap over flattened planes (rows of H*W elements instead of
    W: 9 adds over 64x32x14x14 take 1.5 ms against 6 ms as 4-D slices). A flat shift by
    ah*W + aw wraps a row's end into the next row; the source columns that wrap are exactly those
    this tap never uses (j < aw, or j >= W + aw), so they are zeroed first (dcol is scratch) and
    the wrap adds zeros. Source rows past P (a flat index past P*W) and dx rows past H are cut
    by the range of the add."""
    hw, pw = p.H * p.W, p.P * p.W
    acc = dx.reshape(p.N * p.C, hw)
    for r in range(p.R):
        for s in range(p.S):
            ah, aw = p.pad_h - r * p.dil_h, p.pad_w - s * p.dil_w
            src = dcol[:, :, r, s]  # (N, C, P, W)
            if aw > 0:
                src[..., :aw] = 0
            elif aw < 0:  # aw <= -W (padding wider than the row): every column wraps
                src[..., max(0, p.W + aw):] = 0
            d = ah * p.W + aw
            lo, hi = max(0, -d), min(hw, pw - d)
            if lo < hi:
                acc[:, lo:hi] += src.reshape(p.N * p.C, pw)[:, lo + d:hi + d]
    return dx


def _dy_tap(dyp, off_h, off_w, n_i, n_j):
    return dyp[:, :, off_h:off_h + n_i, off_w:off_w + n_j]


def _dgrad_phase_gemm(p, w6, dyp, taps_h, taps_w, n_i, n_j, lo_h, lo_w, out=None):
    """One stride phase: per image and group, (Cg, Kg*T) @ (Kg*T, I*J) -> (N, C, I, J)."""
    th, tw = len(taps_h), len(taps_w)
    col = _scratch("col", (p.groups, p.Kg, th, tw, p.N, n_i, n_j), dyp.dtype)
    for a, (_, oh) in enumerate(taps_h):
        for b, (_, ow) in enumerate(taps_w):
            v = _dy_tap(dyp, lo_h + oh, lo_w + ow, n_i, n_j)  # (N, K, I, J)
            col[:, :, a, b] = v.reshape(p.N, p.groups, p.Kg, n_i, n_j).transpose(1, 2, 0, 3, 4)
    rs_h = [r for r, _ in taps_h]
    rs_w = [s for s, _ in taps_w]
    wsub = w6[:, :, :, rs_h][:, :, :, :, rs_w]  # (G, Kg, Cg, th, tw), mirrored tap order
    wsub = wsub.transpose(0, 2, 1, 3, 4).reshape(p.groups, p.Cg, p.Kg * th * tw)
    col = col.reshape(p.groups, p.Kg * th * tw, p.N, n_i * n_j).transpose(2, 0, 1, 3)
    res = np.matmul(wsub, col, out=None if out is None else
                    out.reshape(p.N, p.groups, p.Cg, n_i * n_j))  # (N, G, Cg, I*J)
    return res.reshape(p.N, p.C, n_i, n_j)


def _dgrad_phase_depthwise(p, w6, dyp, taps_h, taps_w, n_i, n_j, lo_h, lo_w, out=None):
    acc = np.zeros((p.N, p.groups, n_i, n_j), dtype=dyp.dtype)
    for r, oh in taps_h:
        for s, ow in taps_w:
            v = _dy_tap(dyp, lo_h + oh, lo_w + ow, n_i, n_j).reshape(
                p.N, p.groups, p.Kg, n_i, n_j)
            wk = w6[:, :, 0, r, s]  # (G, Kg)
            if p.Kg == 1:
                acc += v[:, :, 0] * wk[None, :, 0, None, None]
            else:
                acc += np.einsum("ngkij,gk->ngij", v, wk)
    if out is not None:
        out[...] = acc
    return acc


# ---------------------------------------------------------------------------------------------
# max pooling (PyTorch semantics: padding is -inf; the first maximum in row-major order wins;
# NaN propagates and the first NaN wins)
# ---------------------------------------------------------------------------------------------
def pool_fprop(pp: PoolProblem, x):
    """Returns y (N, C, P, Q) and idx (N, C, P, Q) int64: h*W + w of the max in the input plane.

    A running maximum over the R*S window taps, each tap a strided view of the -inf padded
    input. The winning tap k only grows as the taps go by in row-major order, so it is updated
    as k = max(k, t * (tap > best)): strict '>' keeps the first maximum, and a NaN tap beats a
    non-NaN best, so the first NaN wins. np.maximum carries NaN into the values. (A 2x2/2 pool
    of 8x64x112x112 here: 33 ms, against 75 ms materialising the windows for argmax and 19 ms
    in PyTorch; a boolean-mask update of k instead of the max costs 6 ms a tap.)
    """
    if memory_format(x) == "nhwc":
        return _nhwc.pool_fprop(pp, x)
    split = _threads.parts(pp.N, x.size)
    if split is None:
        return _pool_fprop(pp, x)
    y = np.empty(pp.y_shape, x.dtype)
    idx = np.empty(pp.y_shape, np.int64)
    _threads.run(lambda i, a, b: _pool_fprop(dataclasses.replace(pp, N=b - a), x[a:b],
                                             (y[a:b], idx[a:b])), split)
    return y, idx


def _pool_fprop(pp, x, out=None):
    xp = _pad(x, pp.pad_h, pp.pad_h_end, pp.pad_w, pp.pad_w_end, value=-np.inf,
              slot=None if out is None else "pool_pad")  # (y never aliases the scratch)
    return _pool_taps_max(pp, xp, x, out)


def _pool_taps_max(pp: PoolProblem, xp, x, out=None):
    """pool_fprop's running maximum over the -inf padded input `xp` (of x), into out = (y, idx)
    if given. Its arrays follow the memory layout of `xp` (copies and allocations in 'K'
    order), so that numpy_nhwc runs it unchanged on the logical views of channels_last memory."""
    plain = xp.flags.c_contiguous  # NCHW: results from cpu_memory, temporaries from _scratch
    shape = xp.shape[:2] + (pp.P, pp.Q)
    if plain and POOL_STACK_TAPS:
        # All taps in one strided copy, (R*S, N, C, P, Q): every pass below then runs over
        # contiguous memory instead of rows of Q strided elements (the ufunc loop's per-row
        # cost dominated small planes: a 2x2 pool of 32x32x4x4 took 185 us, 12 us a pass).
        sN, sC, sH, sW = xp.strides
        stack = _scratch("pool_taps", (pp.R * pp.S,) + shape, xp.dtype)
        np.copyto(stack.reshape((pp.R, pp.S) + shape), _strided(
            xp, shape=(pp.R, pp.S) + shape,
            strides=(sH * pp.dil_h, sW * pp.dil_w, sN, sC, sH * pp.stride_h, sW * pp.stride_w)))
        taps = list(stack)
    else:
        taps = [xp[:, :, r * pp.dil_h:r * pp.dil_h + pp.stride_h * (pp.P - 1) + 1:pp.stride_h,
                   s * pp.dil_w:s * pp.dil_w + pp.stride_w * (pp.Q - 1) + 1:pp.stride_w]
                for r in range(pp.R) for s in range(pp.S)]
    y = (out[0] if out is not None else _mem.empty(shape, xp.dtype) if plain else
         np.empty_like(taps[0], order="K"))
    kr = None
    if POOL_PAIRWISE_2X2 and plain and pp.R == pp.S == 2:
        kr, ks = _pool_2x2_max(taps, y)
        # Pairwise maxima carry a NaN of a window into y, so NaN anywhere in y is the sign of
        # a NaN input (one that no window reads changes nothing): then the running maximum
        # below, which picks the first NaN as PyTorch does. (Checked on y, 1/4 of x: a pass
        # over x cost ~1/6 of the pool.)
        if y.size and np.isnan(y.max()):
            kr = None
    if kr is None:
        has_nan = x.size > 0 and bool(np.isnan(x.max()))  # max carries NaN: no bool temporary
        kr, ks = _pool_running_max(pp, taps, y, plain, has_nan)
    # input index = window origin + the winning tap's offset, kr*dil_h*W + ks*dil_w, computed
    # from the narrow kr, ks (a table lookup offset[k] with int16 k took 3 ms on 64x32x14x14
    # outputs, this arithmetic 0.4 ms)
    origin = _pool_origin(pp.P, pp.Q, pp.stride_h, pp.stride_w, pp.pad_h, pp.pad_w, pp.W)
    idx = np.multiply(kr, pp.dil_h * pp.W, dtype=np.int64, out=out[1] if out is not None else
                      _mem.empty(y.shape, np.int64) if plain else None)
    idx += np.multiply(ks, pp.dil_w, dtype=np.int64) if pp.dil_w != 1 else ks
    idx += origin
    padded = pp.pad_h or pp.pad_w or pp.pad_h_end or pp.pad_w_end
    if padded and np.isneginf(y).any():
        # A window whose real elements are all -inf may have picked a padding position: like
        # PyTorch, credit the first in-bounds element of the window instead.
        hh = (np.arange(pp.P) * pp.stride_h - pp.pad_h)[:, None] + kr.astype(np.int64) * pp.dil_h
        ww = (np.arange(pp.Q) * pp.stride_w - pp.pad_w)[None, :] + ks.astype(np.int64) * pp.dil_w
        outside = (hh < 0) | (hh >= pp.H) | (ww < 0) | (ww >= pp.W)
        h_first = _first_inside(np.arange(pp.P) * pp.stride_h - pp.pad_h, pp.dil_h)
        w_first = _first_inside(np.arange(pp.Q) * pp.stride_w - pp.pad_w, pp.dil_w)
        first = h_first[:, None] * pp.W + w_first[None, :]
        np.copyto(idx, np.where(outside, first, idx))
    return y, idx


@functools.lru_cache(maxsize=256)
def _pool_origin(P, Q, stride_h, stride_w, pad_h, pad_w, W):  # noqa: N803
    """(P, Q) int64: the flat input index h*W + w of each pooling window's (padded) origin."""
    o = ((np.arange(P) * stride_h - pad_h) * W)[:, None] + (np.arange(Q) * stride_w - pad_w)
    o.flags.writeable = False
    return o


def _pool_2x2_max(taps, y):
    """y = the max of 2x2 windows from their 4 contiguous taps (no NaN among them), and the
    winning row and column (bool arrays): pairwise maxima, 6 passes and 3 boolean ones instead
    of the running maximum's 14 (strict '>' at every step keeps the first maximum in row-major
    order, as PyTorch)."""
    t0, t1, t2, t3 = taps
    shape = y.shape
    y23 = _scratch("pool_y23", shape, y.dtype)
    m01, m23, kr = (_scratch(n, shape, np.bool_) for n in ("pool_m01", "pool_m23", "pool_kr"))
    np.greater(t1, t0, out=m01)
    np.greater(t3, t2, out=m23)
    np.maximum(t0, t1, out=y)
    np.maximum(t2, t3, out=y23)
    np.greater(y23, y, out=kr)  # the bottom row's max beats the top row's
    np.maximum(y, y23, out=y)
    # ks = m23 where kr else m01, as m01 ^ (kr & (m01 ^ m23))
    np.bitwise_xor(m01, m23, out=m23)
    np.bitwise_and(m23, kr, out=m23)
    np.bitwise_xor(m01, m23, out=m23)
    return kr.view(np.uint8), m23.view(np.uint8)


def _pool_running_max(pp, taps, y, plain, has_nan):
    """y = the running maximum over the window taps (any window), and the winning tap's row
    and column in the window (kr, ks). The winning tap k only grows as the taps go by in
    row-major order: k = max(k, t * (tap > best)), strict '>' keeps the first maximum, and a
    NaN tap beats a non-NaN best, so the first NaN wins."""
    np.copyto(y, taps[0])
    kt = (np.int8 if len(taps) < 1 << 7 else np.int16 if len(taps) < 1 << 15 else np.int64)
    if plain:
        k, won, tk = (_scratch(n, y.shape, d) for n, d in (("pool_k", kt), ("pool_won", bool),
                                                             ("pool_tk", kt)))
        k.fill(0)
    else:
        k, won, tk = np.zeros_like(y, kt), np.empty_like(y, bool), np.empty_like(y, kt)
    for t, v in enumerate(taps[1:], start=1):
        np.greater(v, y, out=won)
        if has_nan:
            won |= np.isnan(v) & ~np.isnan(y)
        np.maximum(k, np.multiply(won, k.dtype.type(t), out=tk), out=k)  # typed t: 10x faster
        np.maximum(y, v, out=y)
    if pp.S & (pp.S - 1) == 0:  # a power of two (2x2 pools): shift and mask, 4x faster
        shift = k.dtype.type(pp.S.bit_length() - 1)
        return np.right_shift(k, shift), np.bitwise_and(k, k.dtype.type(pp.S - 1))
    return np.divmod(k, k.dtype.type(pp.S))


def _first_inside(start, dil):
    return np.where(start >= 0, start, start + (-(start) + dil - 1) // dil * dil)


def pool_dgrad(pp: PoolProblem, dy, idx):
    """Each dy element onto its window's argmax position.

    Windows that cannot overlap (stride >= the dilated window, as in every 2x2/2 pool) send at
    most one dy element to an input position: a plain scatter into zeros (1.0 vs 1.9 ms for
    64x32x28x28). Overlapping windows sum their contributions: a deterministic float64
    histogram (np.bincount), rounded once.
    """
    if memory_format(dy) == "nhwc":
        return _nhwc.pool_dgrad(pp, dy, idx)
    split = _threads.parts(pp.N, pp.N * pp.C * pp.H * pp.W)
    if split is None:
        return _pool_dgrad(pp, dy, idx)
    dx = np.empty(pp.x_shape, dy.dtype)  # planes are independent: parts give the same sums
    _threads.run(lambda i, a, b: _pool_dgrad(dataclasses.replace(pp, N=b - a), dy[a:b],
                                             idx[a:b], dx[a:b]), split)
    return dx


def relu_pool_dgrad(pp: PoolProblem, x, dy, idx, winners_mask=None):
    """dL/dx through ReLU then a max-pool that does not overlap, in one pass over the winners:
    dx = relu_dgrad(x, pool_dgrad(pp, dy, idx)), or None where this shortcut does not apply
    (channels_last or strided arrays, overlapping windows, a batch split over the pool).

    Apart from the zero fill, it touches only the pooled positions (1/4 of a 2x2 pool's
    input): the ReLU mask is read at the winners only, instead of three passes over the whole
    of x and the pool's dx. The values are those of the two steps bit for bit: dy * (x > 0 or
    NaN) at each winner (a negative dy times 0 stays -0.0), 0 elsewhere, and np.where for a
    non-finite dy where x <= 0 (0 there, as PyTorch). winners_mask, if given, is that mask
    ~(x <= 0) at each winner (uint8, dy's shape), so that x is not read at all."""
    if not (x.flags.c_contiguous and dy.flags.c_contiguous and idx.flags.c_contiguous
            and pp.disjoint_windows
            and _threads.parts(pp.N, pp.N * pp.C * pp.H * pp.W) is None):
        return None
    flat = _pool_flat_index(pp, idx)
    if winners_mask is not None and winners_mask.shape == dy.shape \
            and winners_mask.dtype == np.uint8 and winners_mask.flags.c_contiguous:
        mask = winners_mask.reshape(-1)
    else:
        xw = np.take(x.reshape(-1), flat, out=_scratch("relu_pool_x", flat.shape, x.dtype))
        mask = np.less_equal(xw, 0, out=_scratch("relu_pool_mask", flat.shape, np.bool_))
        mask = np.logical_not(mask, out=mask).view(np.uint8)
    vals = _times_relu_mask(dy.reshape(-1), mask,
                            _scratch("relu_pool_v", flat.shape, dy.dtype))
    dx = _mem.zeros(pp.N * pp.C * pp.H * pp.W, dy.dtype)
    dx[flat] = vals
    return dx.reshape(pp.x_shape)


def _pool_flat_index(pp: PoolProblem, idx):
    """The pooling indices (h*W + w within each plane) as flat indices into the whole input,
    (N*C*P*Q,) int64 in the "pool_flat" scratch buffer."""
    nc = pp.N * pp.C
    flat = _scratch("pool_flat", (nc, pp.P * pp.Q), np.int64)
    np.add(idx.reshape(nc, -1), _plane_offsets(nc, pp.H * pp.W), out=flat)
    return flat.reshape(-1)


@functools.lru_cache(maxsize=64)
def _plane_offsets(nc, plane):
    """(nc, 1) int64: the flat offset of each (image, channel) plane. Read-only."""
    o = (np.arange(nc, dtype=np.int64) * plane)[:, None]
    o.flags.writeable = False
    return o


def _pool_dgrad(pp, dy, idx, out=None):
    nc = pp.N * pp.C
    plane = pp.H * pp.W
    flat = _pool_flat_index(pp, idx)
    if pp.disjoint_windows:
        if out is None:
            dx = _mem.zeros(nc * plane, dy.dtype)
        else:
            dx = out.reshape(-1)
            dx.fill(0)
        dx[flat] = dy.reshape(-1)
        return dx.reshape(pp.x_shape)
    dx = np.bincount(flat, weights=dy.reshape(-1).astype(np.float64), minlength=nc * plane)
    if out is not None:
        np.copyto(out.reshape(-1), dx)
        return out
    return dx.astype(dy.dtype).reshape(pp.x_shape)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def act_fprop(kind, x, alpha=None):
    if x.ndim == 0:  # NumPy's ufuncs give a scalar there; a 0-d array chains as in PyTorch
        return act_fprop(kind, x.reshape(1), alpha).reshape(())
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        if kind == "relu":
            y = _threads.elementwise(lambda a, out: np.maximum(a, 0, out=out), x)
            if y is None:  # NaN propagates
                y = np.maximum(x, 0, dtype=x.dtype, out=_result_like(x))
            return y
        if kind == "leaky_relu":
            return np.where(x > 0, x, x * x.dtype.type(alpha))
        if kind == "sigmoid":
            e = np.exp(-np.abs(x))  # never overflows
            return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        if kind == "tanh":
            return np.tanh(x)
        if kind == "elu":
            return np.where(x > 0, x, x.dtype.type(alpha) * np.expm1(np.minimum(x, 0)))
    raise ValueError(f"unknown activation {kind!r}")


def act_dgrad(kind, x, y, dy, alpha=None):
    """dx from the forward input x, output y and upstream dy, with PyTorch's choices: at the
    kinks (x == 0) the x <= 0 branch; at a NaN x relu and elu pass dy through (PyTorch tests
    ``x <= 0``), leaky_relu gives slope*dy (it tests ``x > 0``)."""
    if x.ndim == 0:  # as in act_fprop: an array, not NumPy's scalar
        return act_dgrad(kind, *(None if a is None else a.reshape(1) for a in (x, y, dy)),
                         alpha).reshape(())
    t = x.dtype.type
    if kind == "relu":
        dx = _threads.elementwise(_relu_dgrad, x, dy, dtype=dy.dtype)
        return _relu_dgrad(x, dy) if dx is None else dx
    if kind == "leaky_relu":
        return np.where(x > 0, dy, dy * t(alpha))
    if kind == "sigmoid":
        return dy * y * (1 - y)
    if kind == "tanh":
        return dy * (1 - y * y)
    if kind == "elu":
        return np.where(x <= 0, dy * (y + t(alpha)), dy)
    raise ValueError(f"unknown activation {kind!r}")


def _result_like(a):
    """A reused buffer (cpu_memory) for a C-contiguous result of a's shape and dtype, or None
    (the ufunc then allocates, following a's memory layout)."""
    return _mem.empty(a.shape, a.dtype) if a.flags.c_contiguous else None


def _relu_dgrad(x, dy, out=None):
    # dy * ~(x <= 0), the mask multiplied as uint8: NumPy's bool -> float cast inside a
    # multiply is its slow path (2 threads, 64x32x28x28 float32: 2.8 ms as dy * bool mask, 0.8
    # ms as dy * uint8 view of it, with the mask in a reused buffer; np.where mispredicts a
    # random mask, 5.8 ms). Only a non-finite dy where x <= 0 would differ (inf * 0 = NaN where
    # PyTorch gives 0), so that rare case takes np.where.
    if out is None and x.flags.c_contiguous:
        out = _result_like(dy)
    mask = (_scratch("relu_mask", x.shape, np.bool_) if x.flags.c_contiguous else
            np.empty_like(x, dtype=np.bool_))  # (x's layout: channels_last stays so)
    np.less_equal(x, 0, out=mask)
    np.logical_not(mask, out=mask)
    return _times_relu_mask(dy, mask.view(np.uint8), out)


def _times_relu_mask(dy, mask, out=None):
    """dy * mask for ReLU's uint8 mask ~(x <= 0) (the uint8 multiply: see _relu_dgrad), with
    the rare non-finite dy where the mask is 0 set to 0 as PyTorch does (inf * 0 is NaN)."""
    with np.errstate(invalid="ignore"):
        dx = np.multiply(dy, mask, dtype=dy.dtype, out=out)
    if not np.isfinite(dx).all():
        dx[...] = np.where(mask == 0, dy.dtype.type(0), dy)
    return dx


def maxout_fprop(x, pieces, axis):
    """Groups of `pieces` consecutive entries along `axis`; y = group max, idx = winner in group."""
    shape = x.shape[:axis] + (x.shape[axis] // pieces, pieces) + x.shape[axis + 1:]
    xg = x.reshape(shape)
    k = np.argmax(xg, axis=axis + 1)  # first max; first NaN wins
    y = np.take_along_axis(xg, np.expand_dims(k, axis + 1), axis=axis + 1)
    return np.squeeze(y, axis + 1), k


def maxout_dgrad(dy, idx, pieces, axis, x_shape):
    shape = dy.shape[:axis] + (dy.shape[axis], pieces) + dy.shape[axis + 1:]
    dx = np.zeros(shape, dtype=dy.dtype)
    np.put_along_axis(dx, np.expand_dims(idx, axis + 1), np.expand_dims(dy, axis + 1),
                      axis=axis + 1)
    return dx.reshape(x_shape)


from . import numpy_nhwc as _nhwc  # noqa: E402  (the channels_last paths; it imports this module)
