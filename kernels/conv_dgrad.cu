// conv_dgrad.cu -- dx as the convolution of the padded, stride-dilated dy with the mirrored w.
//
// The lecture's derivation, one axis (the other is alike): let dyd be dy with stride-1 zeros
// between its elements, padded by dil*(R-1) - pad_h on top. Then
//     dx[h] = sum_r' w[R-1-r'] * dyd[h + r'*dil]           (the 180-degree-rotated kernel)
//           = sum_r  w[r] * dy[p]   where p = (h + pad_h - r*dil) / stride_h is an integer in [0, P)
// and the channel swap makes C the GEMM's output rows. The integer condition depends only on the
// stride phase ph = h % stride_h, so each phase (ph, pw) is an ordinary stride-1 convolution
// with only its own taps: the stride zeros of dyd are skipped by index arithmetic, never stored
// nor multiplied. Input rows/columns that no window reached read only out-of-range p and get
// exact zeros; phases with no tap at all are zero-filled by the host. Every dx element is
// written by exactly one thread (a gather): deterministic, no atomics.
//
// Contract (G = groups, Cg = C/G, Kg = K/G; all arrays C-contiguous; sizes from ConvProblem)
//   dgrad_col<T, TC>(dy, col, geom, ph, pw, I, J, TH, TW)
//       dy  (N, K, P, Q) of T
//       col (K*TH*TW, N*I*J) of TC (T, or float for bfloat16: its GEMM runs in fp32)
//           == (G, Kg*TH*TW, N*I*J), row k*TH*TW + a*TW + b where a (b) counts
//           the taps of this phase in mirrored order (r = R-1 down to 0, s likewise) -- the order
//           the host uses for the weight (G, Cg, Kg*TH*TW); column (n*I + i)*J + j stands for
//           input pixel (n, ph + stride_h*i, pw + stride_w*j).
//       then dx_phase (G, Cg, N*I*J) = w_phase (G, Cg, Kg*TH*TW) @ col   (one batched GEMM)
//       and gemm_to_nchw (conv_im2col.cu) writes it into dx[:, :, ph::stride_h, pw::stride_w].
//
// Variants
//   dgrad_col  one thread per (k, n, i, j): TH*TW stores, coalesced along j.
//
// Benchmark: `gpuconv-bench --op dgrad --algo im2col_gemm` against cuDNN; correctness first in
// tests/test_cuda_engine.py.
#include "common.cuh"

// One thread per (k, n, i, j) of stride phase (ph, pw): writes the TH*TW column entries of
// output channel k for input pixel (n, ph + stride_h*i, pw + stride_w*j), one per tap.
template <typename T, typename TC>
__global__ void dgrad_col(const T* __restrict__ dy, TC* __restrict__ col, const ConvGeom g,
                          long long ph, long long pw, long long I, long long J, long long TH,
                          long long TW) {
    const long long NIJ = g.N * I * J;
    const long long total = g.K * NIJ;
    GRID_STRIDE_LOOP(e, total) {
        const long long j = e % J;
        long long t = e / J;
        const long long i = t % I;
        t /= I;
        const long long n = t % g.N;
        const long long k = t / g.N;
        const long long h = ph + g.stride_h * i;
        const long long w = pw + g.stride_w * j;
        const T* dyk = dy + (n * g.K + k) * g.P * g.Q;
        TC* out = col + k * TH * TW * NIJ + (n * I + i) * J + j;
        long long a = 0;
        for (long long rr = 0; rr < g.R; ++rr) {
            const long long r = g.R - 1 - rr;  // mirrored kernel
            const long long th = h + g.pad_h - r * g.dil_h;
            // C's % is 0 exactly when th is divisible (whatever th's sign): a tap of this phase.
            if (th % g.stride_h != 0) continue;
            const long long p = th / g.stride_h;  // exact, so truncation is harmless
            const bool p_in = p >= 0 && p < g.P;
            long long b = 0;
            for (long long ss = 0; ss < g.S; ++ss) {
                const long long s = g.S - 1 - ss;
                const long long tw = w + g.pad_w - s * g.dil_w;
                if (tw % g.stride_w != 0) continue;
                const long long q = tw / g.stride_w;
                // Out-of-range p or q is the zero padding of dyd: an exact 0, no load.
                out[(a * TW + b) * NIJ] = from_acc<TC>(
                    (p_in && q >= 0 && q < g.Q) ? to_acc(dyk[p * g.Q + q])
                                                : typename Acc<T>::type(0));
                ++b;
            }
            ++a;
        }
    }
}

// ---- channels_last (NHWC) variant ----------------------------------------------------------
//   dgrad_col_nhwc<T, TC>(dy, col, geom, ph, pw, I, J, TH, TW)
//       dy  (N, P, Q, K) of T (physical)
//       col (G, N*I*J, TH*TW*Kg) of TC: row (n*I + i)*J + j (input pixel (n, ph + stride_h*i,
//           pw + stride_w*j)), column (a*TW + b)*Kg + k with a, b the phase's taps in mirrored
//           order, as dgrad_col; then dx_phase (G, N*I*J, Cg) = col @ w_phase (G, TH*TW*Kg, Cg)
//           and gemm_to_nhwc writes dx[:, ph::stride_h, pw::stride_w, :].
//   One thread per column element, the channel fastest (loads and stores along K).
template <typename T, typename TC>
__global__ void dgrad_col_nhwc(const T* __restrict__ dy, TC* __restrict__ col, const ConvGeom g,
                               long long ph, long long pw, long long I, long long J,
                               long long TH, long long TW) {
    const long long Kg = g.K / g.groups;
    const long long total = g.K * g.N * I * J * TH * TW;
    GRID_STRIDE_LOOP(e, total) {
        const long long k = e % Kg;
        long long t = e / Kg;
        const long long b = t % TW;
        t /= TW;
        const long long a = t % TH;
        t /= TH;
        const long long j = t % J;
        t /= J;
        const long long i = t % I;
        t /= I;
        const long long n = t % g.N;
        const long long grp = t / g.N;
        const long long h = ph + g.stride_h * i;
        const long long w = pw + g.stride_w * j;
        // the a-th tap (mirrored order) of this phase along h, the b-th along w
        long long p = -1, q = -1;
        for (long long rr = 0, seen = 0; rr < g.R; ++rr) {
            const long long th = h + g.pad_h - (g.R - 1 - rr) * g.dil_h;
            if (th % g.stride_h != 0) continue;
            if (seen++ == a) { p = th / g.stride_h; break; }
        }
        for (long long ss = 0, seen = 0; ss < g.S; ++ss) {
            const long long tw = w + g.pad_w - (g.S - 1 - ss) * g.dil_w;
            if (tw % g.stride_w != 0) continue;
            if (seen++ == b) { q = tw / g.stride_w; break; }
        }
        col[e] = from_acc<TC>((p >= 0 && p < g.P && q >= 0 && q < g.Q)
                                  ? to_acc(dy[((n * g.P + p) * g.Q + q) * g.K + grp * Kg + k])
                                  : typename Acc<T>::type(0));
    }
}
