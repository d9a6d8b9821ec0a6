"""First-generation CUDA algorithms and kernels: explicit im2col + cuBLAS GEMM (through
``cupy.matmul``) for fprop and wgrad, dgrad as the convolution of dy with the mirrored kernel
with the stride zeros skipped; and the elementwise kernels (pooling, activations, maxout,
conversions) the engine's other ops launch. Its kernel list, :data:`KERNELS`, is added to the
kernel catalogue (gpuconv.kernel_loader) at import; :func:`register` hands the three
``im2col_gemm`` algorithms to the registry (gpuconv.engines.cuda_registry).

G = groups, Cg = C/G, Kg = K/G:
    fprop  im2col(x) -> col (G, Cg*R*S, N*P*Q); y_g = w (G, Kg, Cg*R*S) @ col, ONE batched cuBLAS
           GEMM (cupy.matmul) for all groups; gemm_to_nchw turns (G, Kg, N, P*Q) into
           (N, K, P, Q) and adds the bias in the same pass.
    wgrad  dw (G, Kg, Cg*R*S) = dy (G, Kg, N*P*Q) @ col^T, summed over batch chunks in the
           accumulation dtype (float32 for the 16-bit types and float32, float64 for float64).
           For 16-bit data the column matrix and dy are stored in float32, so the whole
           reduction is an fp32 GEMM.
    dgrad  per stride phase (ph, pw) of ConvProblem.dgrad_phases: dgrad_col gathers dy for the
           mirrored taps that reach the phase (stride zeros never stored), one batched GEMM with
           the matching weight taps (G, Cg, Kg*TH*TW), gemm_to_nchw writes
           dx[:, :, ph::stride_h, pw::stride_w]. Phases no tap reaches are zeros (dx comes from
           cupy.zeros, a memset, when there are any).

float16 GEMMs: we rely on CuPy's default compute type for float16 (COMPUTE_TYPE_DEFAULT), under
which cupy.matmul calls cublasGemmEx/GemmStridedBatchedEx with fp32 accumulation
(CUBLAS_COMPUTE_32F) and rounds only the result to fp16; tests/test_cuda_engine.py checks it
with a reduction that fp16 accumulation would get visibly wrong. bfloat16: every GEMM runs in
float32 (columns written as fp32 by the gather kernels, weights converted by ``convert``, the
result rounded once to bf16 by gemm_to_nchw), so no CuPy or cuBLAS bf16 path is relied on.
float32 GEMMs are plain SGEMM unless the user opts into TF32 (CUPY_TF32=1).

Workspace: the column matrix of a chunk of the batch stays below the workspace limit
(``gpuconv.set_workspace_limit`` / GPUCONV_WORKSPACE_BYTES, default 1 GiB); a problem whose
single image needs more runs one image at a time.
"""
from __future__ import annotations

import numpy as np

from ..kernel_loader import (CTYPES, acc_dtype, add_kernels, batch_chunk, conv_geom, ctype,
                             dtype_name, launch, require_cuda, STRUCTS)
from ..problem import ConvProblem

_i64 = np.int64


def _cp():
    return require_cuda()


def gemm_dtype(dtype):
    """The dtype the first generation's GEMMs (and their column matrices) use for `dtype`:
    float32 for bfloat16, the dtype itself otherwise."""
    return np.dtype(np.float32) if dtype_name(dtype) == "bfloat16" else np.dtype(dtype)


def _gemm_ctype(t):
    return "float" if t == CTYPES["bfloat16"] else t


# ---------------------------------------------------------------------------------------------
# the first generation's kernels: ONE list, for the catalogue, the loader and the compile tests
# ---------------------------------------------------------------------------------------------
_ALL = tuple(CTYPES.values())
_HALF, _BF16 = CTYPES["float16"], CTYPES["bfloat16"]


def _each(template, types=_ALL):
    return tuple(f"{template}<{t}>" for t in types)


def _pairs(template):
    """template<T, TG> for each storage type T and its GEMM type TG."""
    return tuple(f"{template}<{t}, {_gemm_ctype(t)}>" for t in _ALL)


KERNELS = (
    ("conv_im2col.cu",
     _pairs("im2col")
     # fp16 wgrad: the column matrix in fp32 so the N*P*Q reduction is an fp32 GEMM
     + (f"im2col<{_HALF}, float>",)
     + _pairs("gemm_to_nchw")
     # channels_last: the NHWC column matrix and epilogue
     + _pairs("im2col_nhwc") + (f"im2col_nhwc<{_HALF}, float>",) + _pairs("gemm_to_nhwc")),
    ("conv_dgrad.cu", _pairs("dgrad_col") + _pairs("dgrad_col_nhwc")),
    ("pool.cu", _each("maxpool_fprop") + _each("maxpool_dgrad") + _each("maxpool_fprop_nhwc")
     + _each("maxpool_dgrad_nhwc")),
    ("activation.cu", _each("act_fprop") + _each("act_dgrad") + _each("maxout_fprop")
     + _each("maxout_dgrad") + (f"convert<{_BF16}, float>", f"convert<float, {_BF16}>")),
)
for _file, _names in KERNELS:
    add_kernels(_file, _names, STRUCTS)

#: activation kind -> the `kind` switch value of kernels/activation.cu
ACT_KINDS = {"relu": 0, "leaky_relu": 1, "sigmoid": 2, "tanh": 3, "elu": 4}


def convert(a, dtype):
    """A contiguous copy of `a` in `dtype` by the package's own kernel (bfloat16 <-> float32
    only: CuPy's casts of bf16 need its bf16 headers, which a driver-only install may lack)."""
    cp = _cp()
    a = cp.ascontiguousarray(a)
    out = cp.empty(a.shape, dtype=dtype)
    launch(f"convert<{ctype(a.dtype)}, {ctype(dtype)}>", a.size, (a, out, _i64(a.size)))
    return out


def _chunks(n, bytes_per_image):
    step = batch_chunk(n, bytes_per_image)
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def _to_nchw(t, src, dst, n, kc, i, j, hd, wd, h0=0, w0=0, sh=1, sw=1, bias=None):
    """gemm_to_nchw: src (kc, n, i, j) -> dst[n, k, h0 + sh*i, w0 + sw*j] (+ bias[k])."""
    launch(f"gemm_to_nchw<{t}, {_gemm_ctype(t)}>", n * kc * i * j,
           (src, src if bias is None else bias, np.int32(bias is not None), dst,
            _i64(n), _i64(kc), _i64(i), _i64(j), _i64(hd), _i64(wd), _i64(h0), _i64(w0),
            _i64(sh), _i64(sw)))


def _gemm_operand(a):
    """A weight (or any operand) in its GEMM dtype: converted for bfloat16, as is otherwise."""
    return convert(a, np.float32) if dtype_name(a.dtype) == "bfloat16" else a


def _to_nhwc(t, src, dst, n, g, cg, i, j, hd, wd, h0=0, w0=0, sh=1, sw=1, bias=None):
    """gemm_to_nhwc: src (g, n, i, j, cg) -> dst[n, h0 + sh*i, w0 + sw*j, :] (+ bias)."""
    launch(f"gemm_to_nhwc<{t}, {_gemm_ctype(t)}>", n * i * j * g * cg,
           (src, src if bias is None else bias, np.int32(bias is not None), dst,
            _i64(n), _i64(g), _i64(cg), _i64(i), _i64(j), _i64(hd), _i64(wd), _i64(h0),
            _i64(w0), _i64(sh), _i64(sw)))


# ---- channels_last: the same three algorithms over physical NHWC arrays ---------------------
# x (N, H, W, C), w (K, R, S, Cg), dy (N, P, Q, K) C-contiguous (CONTRACT-layouts' "nhwc" call):
#   fprop  col (G, N*P*Q, R*S*Cg) = im2col_nhwc(x); y_g = col_g @ w_g^T (one batched GEMM),
#          gemm_to_nhwc writes y (N, P, Q, K) with the bias
#   wgrad  dw (G, Kg, R*S*Cg) = dy_g^T @ col_g == the physical (K, R, S, Cg)
#   dgrad  per stride phase: dgrad_col_nhwc (G, N*I*J, TH*TW*Kg) @ w_phase (G, TH*TW*Kg, Cg),
#          gemm_to_nhwc writes dx[:, ph::sh, pw::sw, :]
def _fprop_nhwc(p, x, w, bias):
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    gd = gemm_dtype(dt)
    G, PQ, RSCg = p.groups, p.P * p.Q, p.R * p.S * p.Cg
    y = cp.empty((p.N, p.P, p.Q, p.K), dtype=dt)
    wt = _gemm_operand(w).reshape(G, p.Kg, RSCg).transpose(0, 2, 1)  # (G, R*S*Cg, Kg) view
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * gd.itemsize
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, nc * PQ, RSCg), dtype=gd)
        launch(f"im2col_nhwc<{t}, {_gemm_ctype(t)}>", p.C * p.R * p.S * nc * PQ,
               (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        yg = cp.ascontiguousarray(cp.matmul(col, wt))  # (G, nc*P*Q, Kg)
        _to_nhwc(t, yg, y[n0:n1], nc, G, p.Kg, p.P, p.Q, p.P, p.Q, bias=bias)
    return y


def _wgrad_nhwc(p, x, dy):
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    acc = acc_dtype(dt)
    G, PQ, RSCg = p.groups, p.P * p.Q, p.R * p.S * p.Cg
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * acc.itemsize
    dw = None
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, nc * PQ, RSCg), dtype=acc)
        launch(f"im2col_nhwc<{t}, {ctype(acc)}>", p.C * p.R * p.S * nc * PQ,
               (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        dyc = _gemm_operand(dy[n0:n1]).reshape(nc * PQ, G, p.Kg).transpose(1, 2, 0)
        part = cp.matmul(cp.ascontiguousarray(dyc, dtype=acc), col)  # (G, Kg, R*S*Cg)
        if dw is None:
            dw = part
        else:
            dw += part
    dw = dw.reshape(p.K, p.R, p.S, p.Cg)
    if dtype_name(dt) == "bfloat16":
        return convert(dw, dt)
    return dw.astype(dt, copy=False)


def _dgrad_nhwc(p, w, dy):
    cp = _cp()
    t, dt = ctype(dy.dtype), dy.dtype
    gd = gemm_dtype(dt)
    G, Kg, Cg = p.groups, p.Kg, p.Cg
    w5 = _gemm_operand(w).reshape(G, Kg, p.R, p.S, Cg)
    plan, per_image, untouched = [], 0, False
    for h0, n_i, taps_h in p.dgrad_phases("h")[0]:
        for w0, n_j, taps_w in p.dgrad_phases("w")[0]:
            if n_i == 0 or n_j == 0:
                continue
            if not taps_h or not taps_w:
                untouched = True
                continue
            th, tw = len(taps_h), len(taps_w)
            rs = cp.asarray(np.array([r for r, _ in taps_h], dtype=np.int64))
            ss = cp.asarray(np.array([s for s, _ in taps_w], dtype=np.int64))
            wsub = cp.take(cp.take(w5, rs, axis=2), ss, axis=3)  # (G, Kg, TH, TW, Cg)
            wsub = cp.ascontiguousarray(wsub.transpose(0, 2, 3, 1, 4)).reshape(G, th * tw * Kg, Cg)
            plan.append((h0, w0, n_i, n_j, th, tw, wsub))
            per_image = max(per_image, (p.K * th * tw + p.C) * n_i * n_j * gd.itemsize)
    dx = (cp.zeros if untouched else cp.empty)((p.N, p.H, p.W, p.C), dtype=dt)
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        geom = conv_geom(p.with_batch(nc))
        for h0, w0, n_i, n_j, th, tw, wsub in plan:
            col = cp.empty((G, nc * n_i * n_j, th * tw * Kg), dtype=gd)
            launch(f"dgrad_col_nhwc<{t}, {_gemm_ctype(t)}>", p.K * nc * n_i * n_j * th * tw,
                   (dy[n0:n1], col, geom, _i64(h0), _i64(w0), _i64(n_i), _i64(n_j), _i64(th),
                    _i64(tw)))
            out = cp.matmul(col, wsub)  # (G, nc*I*J, Cg)
            _to_nhwc(t, out, dx[n0:n1], nc, G, Cg, n_i, n_j, p.H, p.W, h0, w0, p.stride_h,
                     p.stride_w)
    return dx


# ---- im2col + GEMM --------------------------------------------------------------------------
def fprop_im2col_gemm(p: ConvProblem, x, w, bias, layout="nchw"):
    if layout == "nhwc":
        return _fprop_nhwc(p, x, w, bias)
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    gd = gemm_dtype(dt)
    G, PQ, CgRS = p.groups, p.P * p.Q, p.Cg * p.R * p.S
    y = cp.empty(p.y_shape, dtype=dt)
    wg = _gemm_operand(w).reshape(G, p.Kg, CgRS)
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * gd.itemsize  # col + GEMM result
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, CgRS, nc * PQ), dtype=gd)
        launch(f"im2col<{t}, {_gemm_ctype(t)}>", p.C * nc * PQ,
               (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        yg = cp.matmul(wg, col)  # (G, Kg, nc*P*Q) == (K, nc, P, Q)
        _to_nchw(t, yg, y[n0:n1], nc, p.K, p.P, p.Q, p.P, p.Q, bias=bias)
    return y


def wgrad_im2col_gemm(p: ConvProblem, x, dy, layout="nchw"):
    if layout == "nhwc":
        return _wgrad_nhwc(p, x, dy)
    cp = _cp()
    t, dt = ctype(x.dtype), x.dtype
    acc = acc_dtype(dt)  # also the column matrix's dtype: 16-bit columns are stored as fp32
    G, PQ, CgRS = p.groups, p.P * p.Q, p.Cg * p.R * p.S
    per_image = (p.C * p.R * p.S * PQ + p.K * PQ) * acc.itemsize  # col + dy rearranged
    dw = None
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        col = cp.empty((G, CgRS, nc * PQ), dtype=acc)
        launch(f"im2col<{t}, {ctype(acc)}>", p.C * nc * PQ,
               (x[n0:n1], col, conv_geom(p.with_batch(nc))))
        # dy chunk (nc, K, PQ) -> (G, Kg, nc*PQ) in the accumulation dtype, one copy
        dyc = _gemm_operand(dy[n0:n1])
        dyg = cp.ascontiguousarray(
            dyc.reshape(nc, G, p.Kg, PQ).transpose(1, 2, 0, 3), dtype=acc)
        part = cp.matmul(dyg.reshape(G, p.Kg, nc * PQ), col.transpose(0, 2, 1))
        if dw is None:
            dw = part
        else:
            dw += part
    dw = dw.reshape(p.w_shape)
    if dtype_name(dt) == "bfloat16":
        return convert(dw, dt)
    return dw.astype(dt, copy=False)


def dgrad_im2col_gemm(p: ConvProblem, w, dy, layout="nchw"):
    if layout == "nhwc":
        return _dgrad_nhwc(p, w, dy)
    cp = _cp()
    t, dt = ctype(dy.dtype), dy.dtype
    gd = gemm_dtype(dt)
    G, Kg, Cg = p.groups, p.Kg, p.Cg
    phases_h = p.dgrad_phases("h")[0]
    phases_w = p.dgrad_phases("w")[0]
    w6 = _gemm_operand(w).reshape(G, Kg, Cg, p.R, p.S)
    plan, per_image, untouched = [], 0, False
    for h0, n_i, taps_h in phases_h:
        for w0, n_j, taps_w in phases_w:
            if n_i == 0 or n_j == 0:
                continue  # the phase has no pixels (stride larger than the input)
            if not taps_h or not taps_w:
                untouched = True  # no tap reaches it: dx = 0 there
                continue
            th, tw = len(taps_h), len(taps_w)
            # the phase's weight taps, in the kernel's mirrored order: (G, Cg, Kg*TH*TW)
            rs = cp.asarray(np.array([r for r, _ in taps_h], dtype=np.int64))
            ss = cp.asarray(np.array([s for s, _ in taps_w], dtype=np.int64))
            wsub = cp.take(cp.take(w6, rs, axis=3), ss, axis=4)  # (G, Kg, Cg, TH, TW)
            wsub = cp.ascontiguousarray(wsub.transpose(0, 2, 1, 3, 4)).reshape(G, Cg, Kg * th * tw)
            plan.append((h0, w0, n_i, n_j, th, tw, wsub))
            per_image = max(per_image, (p.K * th * tw + p.C) * n_i * n_j * gd.itemsize)
    # zeros by memset where some phase gets no tap (no elementwise kernel on the dtype)
    dx = (cp.zeros if untouched else cp.empty)(p.x_shape, dtype=dt)
    for n0, n1 in _chunks(p.N, per_image):
        nc = n1 - n0
        dyc, dxc = dy[n0:n1], dx[n0:n1]
        geom = conv_geom(p.with_batch(nc))
        for h0, w0, n_i, n_j, th, tw, wsub in plan:
            col = cp.empty((G, Kg * th * tw, nc * n_i * n_j), dtype=gd)
            launch(f"dgrad_col<{t}, {_gemm_ctype(t)}>", p.K * nc * n_i * n_j,
                   (dyc, col, geom, _i64(h0), _i64(w0), _i64(n_i), _i64(n_j), _i64(th), _i64(tw)))
            out = cp.matmul(wsub, col)  # (G, Cg, nc*I*J) == (C, nc, I, J)
            _to_nchw(t, out, dxc, nc, p.C, n_i, n_j, p.H, p.W, h0, w0, p.stride_h, p.stride_w)
    return dx


def register(register_algorithm):
    """Register the three im2col_gemm algorithms through the registry's `register_algorithm`."""
    for op, fn in (("fprop", fprop_im2col_gemm), ("wgrad", wgrad_im2col_gemm),
                   ("dgrad", dgrad_im2col_gemm)):
        fn.layouts = ("nchw", "nhwc")  # CONTRACT-layouts: both, by the layout keyword
        register_algorithm(op, "im2col_gemm", fn, replace=True)
    return {op: ["im2col_gemm"] for op in ("fprop", "wgrad", "dgrad")}
