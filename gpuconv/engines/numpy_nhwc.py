"""The NumPy engine's channels_last ("nhwc") paths: the same ops as numpy_engine, computed on the
physical (N, H, W, C) memory, so a channels_last input gives channels_last results with no
transposition of the activations on the way (PyTorch's memory-format semantics; the format
decision is gpuconv.functional's, the dispatch numpy_engine's).

Physical layouts (G = groups, Cg = C/G, Kg = K/G):
    x  (N, H, W, C)         w  (K, R, S, Cg)        y, dy  (N, P, Q, K)
    col (G, N*P*Q, R*S*Cg)  -- im2col over NHWC: row (n, p, q), column (r, s, c); one strided
                               copy whose inner runs are Cg contiguous channels
    fprop   y[:, g] = col_g @ w_g^T            (N*P*Q, Kg): for G == 1 written straight into y
    wgrad   dw_g = dy_g^T @ col_g              (Kg, R*S*Cg) == w's physical (K, R, S, Cg)
    dgrad   stride 1: the fprop above on dy with the mirrored, channel-swapped kernel;
            stride > 1: dcol_g = dy_g @ w_g    (N*P*Q, R*S*Cg), then col2im: one strided add
                                               per tap into the padded dx (N, Hp, Wp, C)
Depthwise layers (Cg == 1) skip the GEMMs: one broadcast multiply-add per tap along the
contiguous channels. Max pooling keeps the window logic of numpy_engine.pool_fprop over the
(N, P, Q, C) views; its indices stay PyTorch's h*W + w within each plane.

Everything returned is a logical (N, C, H, W) view of a fresh C-contiguous physical array.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .._arrays import physical_nhwc as _phys
from ..problem import ConvProblem, PoolProblem
from . import numpy_engine as _ne


def _logical(a):
    return a.transpose(0, 3, 1, 2)


def _pad_nhwc(xh, top, bottom, left, right, value=0.0):
    """xh (N, H, W, C) with `value` rows/columns around H and W (itself if no padding)."""
    if top == bottom == left == right == 0:
        return xh
    n, h, w, c = xh.shape
    out = np.empty((n, h + top + bottom, w + left + right, c), xh.dtype)
    out[:, :top] = value
    out[:, top + h:] = value
    out[:, top:top + h, :left] = value
    out[:, top:top + h, left + w:] = value
    out[:, top:top + h, left:left + w] = xh
    return out


def _im2col(p: ConvProblem, xh):
    """col (G, N*P*Q, R*S*Cg) of the physical input xh (N, H, W, C): one strided copy."""
    xp = _pad_nhwc(xh, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)
    sN, sH, sW, sC = xp.strides
    col = np.empty((p.groups, p.N, p.P, p.Q, p.R, p.S, p.Cg), xh.dtype)
    np.copyto(col, as_strided(xp, shape=col.shape, writeable=False,
                              strides=(sC * p.Cg, sN, sH * p.stride_h, sW * p.stride_w,
                                       sH * p.dil_h, sW * p.dil_w, sC)))
    return col.reshape(p.groups, p.N * p.P * p.Q, p.R * p.S * p.Cg)


def _taps(p, padded, rows=None):
    """(r, s, view (N, P, Q, C)) of the padded physical input that tap (r, s) reads; with
    `rows` = (p0, p1) only output rows p0 .. p1-1 (view (N, p1-p0, Q, C))."""
    p0, p1 = (0, p.P) if rows is None else rows
    for r in range(p.R):
        for s in range(p.S):
            h0, w0 = r * p.dil_h + p0 * p.stride_h, s * p.dil_w
            yield r, s, padded[:, h0:h0 + p.stride_h * (p1 - p0 - 1) + 1:p.stride_h,
                               w0:w0 + p.stride_w * (p.Q - 1) + 1:p.stride_w]


#: bytes of output (fprop) / upstream gradient (dgrad) per block of the depthwise tap loops:
#: the block, its product buffer and the input rows it reads stay in a core's L2 through
#: all R*S taps instead of streaming from memory R*S times
DW_BLOCK_BYTES = 256 << 10


def _dw_blocks(p, itemsize):
    """(n0, n1, p0, p1) blocks of (image, output row) covering the output, each about
    DW_BLOCK_BYTES: whole images where an image is smaller, else rows of one image."""
    row = p.Q * p.K * itemsize
    rows = max(1, DW_BLOCK_BYTES // max(row, 1))
    if rows >= p.P:
        imgs = max(1, DW_BLOCK_BYTES // max(row * p.P, 1))
        for n0 in range(0, p.N, imgs):
            yield n0, min(p.N, n0 + imgs), 0, p.P
    else:
        for n0 in range(p.N):
            for p0 in range(0, p.P, rows):
                yield n0, n0 + 1, p0, min(p.P, p0 + rows)


def _chunks(p, op, itemsize):
    return _ne._batch_chunks(p, op, itemsize)


def _weights(p, w):
    """w's physical (G, Kg, R*S*Cg) (converted once if w is not channels_last)."""
    return _phys(w).reshape(p.groups, p.Kg, p.R * p.S * p.Cg)


# ---------------------------------------------------------------------------------------------
# fprop
# ---------------------------------------------------------------------------------------------
def conv_fprop(p: ConvProblem, x, w, bias=None):
    xh = _phys(x)
    y = np.empty((p.N, p.P, p.Q, p.K), x.dtype)
    if p.is_depthwise:
        _fprop_depthwise(p, xh, w, y)
    else:
        wg = _weights(p, w)
        for a, b in _chunks(p, "fprop", x.itemsize):
            _fprop_gemm(p.with_batch(b - a), xh[a:b], wg, y[a:b])
    if bias is not None:
        y += bias
    return _logical(y)


def _fprop_gemm(p, xh, wg, y):
    if _ne._is_pointwise(p):  # 1x1: the (subsampled) input rows already are the GEMM operand
        xs = np.ascontiguousarray(xh[:, ::p.stride_h, ::p.stride_w])
        col = xs.reshape(p.N * p.P * p.Q, p.groups, p.Cg).transpose(1, 0, 2)
    else:
        col = _im2col(p, xh)
    npq = p.N * p.P * p.Q
    if p.groups == 1:
        np.matmul(col[0], wg[0].T, out=y.reshape(npq, p.K))
    else:
        np.matmul(col, wg.transpose(0, 2, 1),
                  out=y.reshape(npq, p.groups, p.Kg).transpose(1, 0, 2))


def _fprop_depthwise(p, xh, w, y):
    """Cg == 1: y[..., c*Kg + j] = sum over taps of x_tap[..., c] * w[c*Kg + j, 0, r, s]."""
    w4 = w.reshape(p.C, p.Kg, p.R, p.S)
    yv = y if p.Kg == 1 else y.reshape(p.N, p.P, p.Q, p.C, p.Kg)  # (a trailing 1 is 2x slower)
    taps, flat = _dw_taps(p, w4)
    xp = _pad_nhwc(xh, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)
    buf = None
    for n0, n1, p0, p1 in _dw_blocks(p, y.itemsize):
        yb = yv[n0:n1, p0:p1]
        if flat:
            yb = yb.reshape(n1 - n0, p1 - p0, p.Q * p.C)
        if buf is None or buf.shape != yb.shape:
            buf = np.empty(yb.shape, y.dtype)
        for t, (r, s, v) in enumerate(_taps(p, xp[n0:n1], (p0, p1))):
            v = _rows(v, yb.shape) if flat else v if p.Kg == 1 else v[..., None]
            np.multiply(v, taps[t], out=buf if t else yb)
            if t:
                yb += buf


def _rows(v, shape):
    """The (n, rows, Q*C) VIEW of a tap window v (n, rows, Q, C) whose W stride is C elements
    (never a copy: dgrad adds into it)."""
    n, h, q, c = v.shape
    assert v.strides[2] == c * v.strides[3] and shape == (n, h, q * c)
    return as_strided(v, shape=shape, strides=(v.strides[0], v.strides[1], v.strides[3]))


def _dw_taps(p, w4):
    """Per tap the depthwise weights to broadcast, and whether rows are flat: for stride_w 1
    and Kg 1 a tap's window row is Q*C contiguous elements (W's stride is C), so the weight
    vector is tiled Q times and every multiply-add runs over whole rows (inner loops Q*C long
    instead of C: 1.4-1.9x faster on 144-channel 56x56 maps here)."""
    flat = p.Kg == 1 and p.stride_w == 1
    taps = []
    for r in range(p.R):
        for s in range(p.S):
            wt = w4[:, 0, r, s] if p.Kg == 1 else w4[:, :, r, s]
            taps.append(np.tile(wt, p.Q) if flat else wt)
    return taps, flat


# ---------------------------------------------------------------------------------------------
# wgrad
# ---------------------------------------------------------------------------------------------
def conv_wgrad(p: ConvProblem, x, dy):
    xh, dyh = _phys(x), _phys(dy)
    dw = None
    for a, b in _chunks(p, "wgrad", x.itemsize):
        part = _wgrad_part(p.with_batch(b - a), xh[a:b], dyh[a:b])
        dw = part if dw is None else dw.__iadd__(part)
    # (G, Kg, R*S*Cg) == the physical (K, R, S, Cg) of a channels_last weight
    return _logical(dw.reshape(p.K, p.R, p.S, p.Cg))


def _wgrad_part(p, xh, dyh):
    npq = p.N * p.P * p.Q
    if p.is_depthwise:
        # Cg == 1: dw[c*Kg + j, r, s] = sum_npq x_tap[npq, c] * dy[npq, c, j], a tap at a time
        dyv = dyh.reshape(npq, p.C, p.Kg)
        dw = np.empty((p.C, p.Kg, p.R, p.S), dyh.dtype)
        for r, s, v in _taps(p, _pad_nhwc(xh, p.pad_h, p.pad_h_end, p.pad_w, p.pad_w_end)):
            vv = np.ascontiguousarray(v).reshape(npq, p.C, 1)
            dw[:, :, r, s] = np.einsum("nck,nck->ck", np.broadcast_to(vv, dyv.shape), dyv)
        return dw.reshape(p.groups, p.Kg, p.R * p.S)
    if _ne._is_pointwise(p):
        xs = np.ascontiguousarray(xh[:, ::p.stride_h, ::p.stride_w])
        col = xs.reshape(npq, p.groups, p.Cg).transpose(1, 0, 2)
    else:
        col = _im2col(p, xh)
    if p.groups == 1:
        # dw^T = col^T @ dy, the small K as the GEMM's columns (as numpy_engine._wgrad): 1.6x
        # faster than dy^T @ col on ResNet-50's 3x3 here
        return np.ascontiguousarray(np.matmul(col[0].T, dyh.reshape(npq, p.K)).T)[None]
    dyg = dyh.reshape(npq, p.groups, p.Kg).transpose(1, 2, 0)  # (G, Kg, NPQ)
    return np.matmul(dyg, col)


# ---------------------------------------------------------------------------------------------
# dgrad: channel contraction first (one GEMM), then col2im, one strided add per tap
# ---------------------------------------------------------------------------------------------
#: at most this many input channels per group, stride-1 dgrad too goes through the channel
#: contraction + col2im: the mirrored-kernel fprop would build an (N*H*W, R*S*K) column matrix
#: for a GEMM with Cg columns (LeNet's conv1, C = 1, 5x5: 11.3 ms that way against ~1 ms here)
NHWC_DGRAD_COL2IM_CG = 4


def conv_dgrad(p: ConvProblem, w, dy):
    dyh = _phys(dy)
    if p.is_depthwise:
        return _logical(_dgrad_depthwise(p, w, dyh))
    top_h, top_w = p.dil_h * (p.R - 1) - p.pad_h, p.dil_w * (p.S - 1) - p.pad_w
    end_h, end_w = p.dil_h * (p.R - 1) - p.pad_h_end, p.dil_w * (p.S - 1) - p.pad_w_end
    if (p.stride_h == p.stride_w == 1 and min(top_h, top_w, end_h, end_w) >= 0
            and p.Cg > NHWC_DGRAD_COL2IM_CG):
        # stride 1: dx is the forward convolution of dy (padded by dil*(R-1) - pad) with the
        # mirrored, channel-swapped kernel -- this file's im2col + GEMM, 2x faster than the
        # col2im below on ResNet-50's and VGG's 3x3 (its 9 strided adds cost more than the GEMM)
        q = ConvProblem(p.N, p.K, p.P, p.Q, p.C, p.R, p.S, pad_h=top_h, pad_w=top_w,
                        dil_h=p.dil_h, dil_w=p.dil_w, groups=p.groups, pad_h_end=end_h,
                        pad_w_end=end_w)
        wm = _phys(w).reshape(p.groups, p.Kg, p.R, p.S, p.Cg)[:, :, ::-1, ::-1]
        wm = np.ascontiguousarray(wm.transpose(0, 4, 2, 3, 1)).reshape(p.C, p.R, p.S, p.Kg)
        return conv_fprop(q, _logical(dyh), _logical(wm))
    top, left = p.pad_h, p.pad_w
    dxp = np.zeros((p.N, p.H + p.pad_h + p.pad_h_end, p.W + p.pad_w + p.pad_w_end, p.C),
                   dy.dtype)
    wg = _weights(p, w)
    for a, b in _chunks(p, "dgrad", dy.itemsize):
        _dgrad_part(p.with_batch(b - a), wg, dyh[a:b], dxp[a:b])
    dx = dxp[:, top:top + p.H, left:left + p.W]
    return _logical(dx if dx is dxp else np.ascontiguousarray(dx))


def _dgrad_depthwise(p, w, dyh):
    """Cg == 1: dx_tap[..., c] += sum_j dy[..., c*Kg + j] * w[c*Kg + j, 0, r, s] per tap, a
    broadcast multiply-add along the contiguous channels (no GEMM, no column matrix)."""
    dxp = np.zeros((p.N, p.H + p.pad_h + p.pad_h_end, p.W + p.pad_w + p.pad_w_end, p.C),
                   dyh.dtype)
    w4 = w.reshape(p.C, p.Kg, p.R, p.S)
    dyv = dyh if p.Kg == 1 else dyh.reshape(p.N, p.P, p.Q, p.C, p.Kg)
    taps, flat = _dw_taps(p, w4)
    buf = None
    for n0, n1, p0, p1 in _dw_blocks(p, dyh.itemsize):  # (fixed block order: deterministic)
        db = dyv[n0:n1, p0:p1]
        if flat:
            db = db.reshape(n1 - n0, p1 - p0, p.Q * p.C)
        if buf is None or buf.shape != db.shape:
            buf = np.empty(db.shape, dyh.dtype)
        for t, (r, s, v) in enumerate(_taps(p, dxp[n0:n1], (p0, p1))):
            if flat:
                _rows(v, db.shape)[...] += np.multiply(db, taps[t], out=buf)
            elif p.Kg == 1:
                v += np.multiply(db, taps[t], out=buf)
            else:
                v += np.multiply(db, taps[t], out=buf).sum(axis=-1)
    dx = dxp[:, p.pad_h:p.pad_h + p.H, p.pad_w:p.pad_w + p.W]
    return dx if dx is dxp else np.ascontiguousarray(dx)


def _dgrad_part(p, wg, dyh, dxp):
    npq = p.N * p.P * p.Q
    if p.groups == 1:
        dcol = np.matmul(dyh.reshape(npq, p.K), wg[0])[None]  # (1, NPQ, R*S*C)
    else:
        dcol = np.matmul(dyh.reshape(npq, p.groups, p.Kg).transpose(1, 0, 2), wg)
    dcol = dcol.reshape(p.groups, p.N, p.P, p.Q, p.R, p.S, p.Cg)
    for r, s, v in _taps(p, dxp):
        src = dcol[:, :, :, :, r, s]  # (G, N, P, Q, Cg)
        if p.groups == 1:
            v += src[0]
        else:
            v.reshape(v.shape[:3] + (p.groups, p.Cg))[...] += src.transpose(1, 2, 3, 0, 4)


# ---------------------------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------------------------
def pool_fprop(pp: PoolProblem, x):
    """numpy_engine.pool_fprop over the channels_last memory: the running maximum over the
    window taps, each tap an (N, P, Q, C) view of the -inf padded physical input; the indices
    (h*W + w in the plane, PyTorch's) come out channels_last too."""
    xh = _pad_nhwc(_phys(x), pp.pad_h, pp.pad_h_end, pp.pad_w, pp.pad_w_end, value=-np.inf)
    # the NCHW routine runs unchanged on the logical views of the NHWC memory; every array it
    # allocates follows its inputs' layout (empty_like / ufunc outputs in 'K' order)
    y, idx = _ne._pool_taps_max(pp, _logical(xh), x)
    return y, idx


def pool_dgrad(pp: PoolProblem, dy, idx):
    """Each dy element onto its window's argmax, over the physical (N, H*W, C) memory."""
    dyh, ih = _phys(dy), _phys(idx)
    n, c, plane = pp.N, pp.C, pp.H * pp.W
    flat = ((ih.reshape(n, -1, c) + (np.arange(n) * plane)[:, None, None]) * c
            + np.arange(c)).ravel()
    if pp.disjoint_windows:
        dx = np.zeros(n * plane * c, dy.dtype)
        dx[flat] = dyh.reshape(-1)
    else:
        dx = np.bincount(flat, weights=dyh.reshape(-1).astype(np.float64),
                         minlength=n * plane * c).astype(dy.dtype)
    return _logical(dx.reshape(n, pp.H, pp.W, c))
