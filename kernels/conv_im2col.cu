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
