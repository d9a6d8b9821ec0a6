// conv_im2col.cu -- the explicit column matrix of fprop and wgrad, and the GEMM-result transpose.
//
// Contract (G = groups, Cg = C/G, Kg = K/G; all arrays C-contiguous; sizes from ConvProblem)
//   im2col<T, TC>(x, col, geom)
//       x   (N, C, H, W)             of T
//       col (C*R*S, N*P*Q)           of TC  == (G, Cg*R*S, N*P*Q), row c*R*S + r*S + s,
//                                            column n*P*Q + p*Q + q; padding reads as 0.
//       fprop: y_gemm (G, Kg, N*P*Q) = w (G, Kg, Cg*R*S) @ col         (one batched cuBLAS GEMM)
//       wgrad: dw     (G, Kg, Cg*R*S) = dy (G, Kg, N*P*Q) @ col^T      (one batched cuBLAS GEMM)
//       TC = float with a 16-bit T: the column matrix is stored in fp32 so the GEMM runs in fp32
//       (float16 wgrad: no fp16 rounding of partial sums over N*P*Q; bfloat16: every GEMM, as
//       cuBLAS through CuPy is not relied on for bf16).
//   gemm_to_nchw<T, TS>(src, bias, has_bias, dst, N, Kc, I, J, Hd, Wd, h0, w0, sh, sw)
//       src (Kc, N, I, J) of TS -> dst[n, k, h0 + sh*i, w0 + sw*j] of dst (N, Kc, Hd, Wd) of T,
//       + bias[k] (of T); TS = T, or float for bfloat16's fp32 GEMM result.
//       fprop: (G, Kg, N, P*Q) -> (N, K, P, Q) with the bias fused (h0 = w0 = 0, sh = sw = 1).
//       dgrad: one stride phase (C, N, I, J) -> dx[:, :, h0::sh, w0::sw] (no bias).
//
// Variants (first generation, one each; later generations live in other files)
//   im2col        one thread per (c, n, p, q), R*S strided stores; consecutive threads take
//                 consecutive q, so the stores (and, for stride 1, the loads) are coalesced.
//   gemm_to_nchw  one thread per output element; reads and writes coalesced along j.
//
// Benchmark: `gpuconv-bench --op fprop --algo im2col_gemm` (and --op wgrad) times the whole
// algorithm (im2col + GEMM + transpose) against cuDNN; correctness first in
// tests/test_cuda_engine.py.
#include "common.cuh"

// One thread per (c, n, p, q): writes the R*S column entries of input channel c for output
// pixel (n, p, q).
template <typename T, typename TC>
__global__ void im2col(const T* __restrict__ x, TC* __restrict__ col, const ConvGeom g) {
    const long long PQ = g.P * g.Q;
    const long long NPQ = g.N * PQ;
    const long long total = g.C * NPQ;
    GRID_STRIDE_LOOP(i, total) {
        const long long q = i % g.Q;
        long long t = i / g.Q;
        const long long p = t % g.P;
        t /= g.P;
        const long long n = t % g.N;
        const long long c = t / g.N;
        const T* xc = x + (n * g.C + c) * g.H * g.W;
        TC* out = col + c * g.R * g.S * NPQ + n * PQ + p * g.Q + q;
        const long long h0 = p * g.stride_h - g.pad_h;
        const long long w0 = q * g.stride_w - g.pad_w;
        for (long long r = 0; r < g.R; ++r) {
            const long long h = h0 + r * g.dil_h;
            const bool h_in = h >= 0 && h < g.H;
            for (long long s = 0; s < g.S; ++s) {
                const long long w = w0 + s * g.dil_w;
                // Padding contributes exact zeros (never a load outside x).
                const typename Acc<T>::type v =
                    (h_in && w >= 0 && w < g.W) ? to_acc(xc[h * g.W + w]) : 0;
                out[(r * g.S + s) * NPQ] = from_acc<TC>(v);
            }
        }
    }
}

// One thread per element (n, k, i, j) of dst's sub-grid: dst[n, k, h0 + sh*i, w0 + sw*j] =
// src[k, n, i, j] (+ bias[k], added in the accumulation type and rounded once).
template <typename T, typename TS>
__global__ void gemm_to_nchw(const TS* __restrict__ src, const T* __restrict__ bias, int has_bias,
                             T* __restrict__ dst, long long N, long long Kc, long long I,
                             long long J, long long Hd, long long Wd, long long h0, long long w0,
                             long long sh, long long sw) {
    const long long total = N * Kc * I * J;
    GRID_STRIDE_LOOP(e, total) {
        const long long j = e % J;
        long long t = e / J;
        const long long i = t % I;
        t /= I;
        const long long k = t % Kc;
        const long long n = t / Kc;
        typename Acc<T>::type v = to_acc(src[((k * N + n) * I + i) * J + j]);
        if (has_bias) v += to_acc(bias[k]);
        dst[((n * Kc + k) * Hd + h0 + sh * i) * Wd + w0 + sw * j] = from_acc<T>(v);
    }
}

// ---- channels_last (NHWC) variants --------------------------------------------------------
// Contract (physical C-contiguous arrays; G = groups, Cg = C/G)
//   im2col_nhwc<T, TC>(x, col, geom)
//       x   (N, H, W, C)               of T
//       col (G, N*P*Q, R*S*Cg)         of TC: row n*P*Q + p*Q + q, column (r*S + s)*Cg + c;
//                                       padding reads as 0.
//       fprop: y_gemm (G, N*P*Q, Kg) = col @ w^T, w (G, Kg, R*S*Cg) == (K, R, S, Cg)
//       wgrad: dw (G, Kg, R*S*Cg) = dy^T (G, Kg, N*P*Q) @ col      (both batched cuBLAS GEMMs)
//   gemm_to_nhwc<T, TS>(src, bias, has_bias, dst, N, G, Cg, I, J, Hd, Wd, h0, w0, sh, sw)
//       src (G, N, I, J, Cg) of TS -> dst[n, h0 + sh*i, w0 + sw*j, g*Cg + c] of dst
//       (N, Hd, Wd, G*Cg), + bias[g*Cg + c]. fprop: (G, N*P*Q, Kg) -> y (N, P, Q, K);
//       dgrad: one stride phase (G, N*I*J, Cg) -> dx[:, h0::sh, w0::sw, :].
// Variants: one thread per column / output element, the channel fastest, so loads and stores
// run along contiguous channels.
template <typename T, typename TC>
__global__ void im2col_nhwc(const T* __restrict__ x, TC* __restrict__ col, const ConvGeom g) {
    const long long Cg = g.C / g.groups;
    const long long total = g.C * g.R * g.S * g.N * g.P * g.Q;
    GRID_STRIDE_LOOP(e, total) {
        const long long c = e % Cg;
        long long t = e / Cg;
        const long long s = t % g.S;
        t /= g.S;
        const long long r = t % g.R;
        t /= g.R;
        const long long q = t % g.Q;
        t /= g.Q;
        const long long p = t % g.P;
        t /= g.P;
        const long long n = t % g.N;
        const long long grp = t / g.N;
        const long long h = p * g.stride_h - g.pad_h + r * g.dil_h;
        const long long w = q * g.stride_w - g.pad_w + s * g.dil_w;
        const typename Acc<T>::type v =
            (h >= 0 && h < g.H && w >= 0 && w < g.W)
                ? to_acc(x[((n * g.H + h) * g.W + w) * g.C + grp * Cg + c]) : 0;
        col[e] = from_acc<TC>(v);
    }
}

template <typename T, typename TS>
__global__ void gemm_to_nhwc(const TS* __restrict__ src, const T* __restrict__ bias, int has_bias,
                             T* __restrict__ dst, long long N, long long G, long long Cg,
                             long long I, long long J, long long Hd, long long Wd, long long h0,
                             long long w0, long long sh, long long sw) {
    const long long total = N * I * J * G * Cg;
    GRID_STRIDE_LOOP(e, total) {
        const long long c = e % Cg;
        long long t = e / Cg;
        const long long grp = t % G;
        t /= G;
        const long long j = t % J;
        t /= J;
        const long long i = t % I;
        const long long n = t / I;
        typename Acc<T>::type v = to_acc(src[(((grp * N + n) * I + i) * J + j) * Cg + c]);
        if (has_bias) v += to_acc(bias[grp * Cg + c]);
        dst[((n * Hd + h0 + sh * i) * Wd + w0 + sw * j) * G * Cg + grp * Cg + c] = from_acc<T>(v);
    }
}
