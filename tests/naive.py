"""Naive loop references, written straight from the lecture's definition, in float64.

These are the independent oracle for the NumPy engine (which is in turn the oracle for the CUDA
engine). They loop over output rows and columns (the lecture's double for-loop) and share no
code with gpuconv beyond the problem description. dgrad and wgrad are written as the adjoint of
the forward loop (scatter into the window), not as the mirrored-kernel convolution the engines
use, so an error in that derivation cannot cancel out.
"""
import numpy as np


def _padded(x, p):
    return np.pad(x.astype(np.float64),
                  ((0, 0), (0, 0), (p.pad_h, p.pad_h_end), (p.pad_w, p.pad_w_end)))


def _window(p, i, j):
    hs = slice(i * p.stride_h, i * p.stride_h + p.dil_h * (p.R - 1) + 1, p.dil_h)
    ws = slice(j * p.stride_w, j * p.stride_w + p.dil_w * (p.S - 1) + 1, p.dil_w)
    return hs, ws


def conv_fprop(p, x, w, b=None):
    xp = _padded(x, p)
    w = w.astype(np.float64)
    y = np.zeros(p.y_shape)
    for g in range(p.groups):
        cs = slice(g * p.Cg, (g + 1) * p.Cg)
        ks = slice(g * p.Kg, (g + 1) * p.Kg)
        for i in range(p.P):
            for j in range(p.Q):
                hs, ws = _window(p, i, j)
                y[:, ks, i, j] = np.einsum("ncrs,kcrs->nk", xp[:, cs, hs, ws], w[ks])
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def conv_dgrad(p, w, dy):
    dxp = np.zeros((p.N, p.C, p.H + p.pad_h + p.pad_h_end, p.W + p.pad_w + p.pad_w_end))
    w = w.astype(np.float64)
    dy = dy.astype(np.float64)
    for g in range(p.groups):
        cs = slice(g * p.Cg, (g + 1) * p.Cg)
        ks = slice(g * p.Kg, (g + 1) * p.Kg)
        for i in range(p.P):
            for j in range(p.Q):
                hs, ws = _window(p, i, j)
                dxp[:, cs, hs, ws] += np.einsum("nk,kcrs->ncrs", dy[:, ks, i, j], w[ks])
    return dxp[:, :, p.pad_h:p.pad_h + p.H, p.pad_w:p.pad_w + p.W]


def conv_wgrad(p, x, dy):
    xp = _padded(x, p)
    dy = dy.astype(np.float64)
    dw = np.zeros(p.w_shape)
    for g in range(p.groups):
        cs = slice(g * p.Cg, (g + 1) * p.Cg)
        ks = slice(g * p.Kg, (g + 1) * p.Kg)
        for i in range(p.P):
            for j in range(p.Q):
                hs, ws = _window(p, i, j)
                dw[ks] += np.einsum("nk,ncrs->kcrs", dy[:, ks, i, j], xp[:, cs, hs, ws])
    return dw


def max_pool(pp, x):
    """y and the first-max (row-major) index h*W + w per window; padding is never chosen."""
    y = np.empty(pp.y_shape)
    idx = np.empty(pp.y_shape, dtype=np.int64)
    for n in range(pp.N):
        for c in range(pp.C):
            for i in range(pp.P):
                for j in range(pp.Q):
                    best, arg = -np.inf, None
                    for r in range(pp.R):
                        for s in range(pp.S):
                            h = i * pp.stride_h - pp.pad_h + r * pp.dil_h
                            v = j * pp.stride_w - pp.pad_w + s * pp.dil_w
                            if not (0 <= h < pp.H and 0 <= v < pp.W):
                                continue
                            val = x[n, c, h, v]
                            if arg is None or val > best or (np.isnan(val) and not np.isnan(best)):
                                best, arg = val, h * pp.W + v
                    y[n, c, i, j], idx[n, c, i, j] = best, arg
    return y, idx


def central_difference(f, a, eps=1e-6):
    """d f / d a for scalar f by central differences, every element of a."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g
