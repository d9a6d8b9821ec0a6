// igemm_dgrad.cu -- implicit-GEMM data gradient (second generation), by stride phases.
//
// Contract: w (K, C/groups, R, S), dy (N, K, P, Q), dx (N, C, H, W), contiguous NCHW of one dtype
// T; dx is fully written, exact zeros where no window reached. The phase tables in IgemmArgs come
// from gpuconv.engines.cuda_igemm.dgrad_phases (checked there against the NumPy engine's).
//
// The lecture's formulation: dx = conv(zero-padded, stride-dilated dy, mirrored w). The stride
// zeros are never stored nor multiplied: input row h = ph + stride_h*i (phase ph) receives
// dy[p] * w[r] exactly when h + pad_h = p*stride_h + r*dil_h, so within one phase only the taps
// r = r0 + j*r_step (j < tr) contribute, with p = i + dp0 - j*dp_step (CUTLASS's strided dgrad
// does the same). Taps by rising p are taps by falling r: the 180-degree mirrored kernel.
//
//   grid z = group * (stride_h*stride_w) + phase; per phase a GEMM
//     m = (img, i, j) over N * n_i * n_j (the phase's input pixels), n = c in the group (Cg),
//     k = (kc, jr, js) over Kg * tr * ts (only the phase's taps)
//     A[m, k] = dy[img, g*Kg + kc, i + dp0 - jr*dp_step, j + dq0 - js*dq_step]  (0 outside)
//     B[n, k] = w[g*Kg + kc, c, r0 + jr*r_step, s0 + js*s_step]
//   A phase with no taps (tr or ts == 0) still runs its tiles and writes zeros.
// Variants: as igemm_fprop.cu (IGEMM_CONFIGS in gpuconv/engines/cuda_igemm.py).
#include "igemm_common.cuh"

struct IgPhase {   // this block's stride phase
    int n_i, n_j, tr, ts, r0, s0, dp0, dq0, ph_h, ph_w, gemm_m, gemm_k;
    __device__ IgPhase(const IgemmArgs& a, int phase) {
        ph_h = phase / a.stride_w;
        ph_w = phase - ph_h * a.stride_w;
        n_i = a.ph_n[ph_h]; tr = a.ph_tr[ph_h]; r0 = a.ph_r0[ph_h]; dp0 = a.ph_dp0[ph_h];
        n_j = a.pw_n[ph_w]; ts = a.pw_ts[ph_w]; s0 = a.pw_s0[ph_w]; dq0 = a.pw_dq0[ph_w];
        gemm_m = a.N * n_i * n_j;
        gemm_k = a.Kg * tr * ts;
    }
};

struct IgDgradK : IgRadixK {   // k = (kc, jr, js) with radices (tr, ts), both operands
    int gemm_k;
    __device__ void init_k(const IgPhase& ph, int BK_) {
        gemm_k = ph.gemm_k;
        init_radix(ph.tr, ph.ts, BK_);
    }
};

template <typename T>
struct IgDgradDy : IgDgradK {   // operand A: dy, gathered per phase
    const T* dy;
    int n_i, n_j, gemm_m, P, Q, K, dp_step, dq_step, dp0, dq0;
    long long group_off;
    struct Row { long long base; int ip, jq; bool ok; };

    __device__ IgDgradDy(const T* dy_, const IgemmArgs& a, const IgPhase& ph, int g, int BK_) {
        init_k(ph, BK_);
        dy = dy_; n_i = ph.n_i; n_j = ph.n_j; gemm_m = ph.gemm_m;
        P = a.P; Q = a.Q; K = a.K; dp_step = a.dp_step; dq_step = a.dq_step;
        group_off = (long long)g * a.Kg * a.P * a.Q;
        dp0 = ph.dp0; dq0 = ph.dq0;
    }
    __device__ __forceinline__ Row row(int m) const {
        Row r;
        r.ok = m < gemm_m;
        const int mm = r.ok ? m : 0;
        const int ij = n_i * n_j;
        const int img = mm / ij, rem = mm - img * ij;
        const int i = rem / n_j, j = rem - i * n_j;
        r.base = (long long)img * K * P * Q + group_off;
        r.ip = i + dp0;
        r.jq = j + dq0;
        return r;
    }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        if (!r.ok || p.k >= gemm_k) return IgNum<T>::zero();
        const int pp = r.ip - p.d.mid * dp_step, qq = r.jq - p.d.lo * dq_step;
        if ((unsigned)pp >= (unsigned)P || (unsigned)qq >= (unsigned)Q) return IgNum<T>::zero();
        return dy[r.base + ((long long)p.d.hi * P + pp) * Q + qq];
    }
    __device__ __forceinline__ bool vec_ok(const Row&, const KPos&) const { return false; }
    __device__ __forceinline__ const T* vec_ptr(const Row&, const KPos&) const { return dy; }
};

template <typename T>
struct IgDgradW : IgDgradK {   // operand B: the phase's taps of w, rows = input channel c
    const T* w;
    int Cg, RS, S, r0, s0, r_step, s_step;
    long long group_off, kc_stride;
    struct Row { long long base; bool ok; };

    __device__ IgDgradW(const T* w_, const IgemmArgs& a, const IgPhase& ph, int g, int BK_) {
        init_k(ph, BK_);
        w = w_; Cg = a.Cg; RS = a.R * a.S; S = a.S; r0 = ph.r0; s0 = ph.s0;
        r_step = a.r_step; s_step = a.s_step;
        kc_stride = (long long)a.Cg * RS;
        group_off = (long long)g * a.Kg * kc_stride;
    }
    __device__ __forceinline__ Row row(int c) const {
        Row r; r.ok = c < Cg; r.base = group_off + (long long)(r.ok ? c : 0) * RS; return r;
    }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        if (!r.ok || p.k >= gemm_k) return IgNum<T>::zero();
        const int rr = r0 + p.d.mid * r_step, ss = s0 + p.d.lo * s_step;
        return w[r.base + p.d.hi * kc_stride + rr * S + ss];
    }
    __device__ __forceinline__ bool vec_ok(const Row&, const KPos&) const { return false; }
    __device__ __forceinline__ const T* vec_ptr(const Row&, const KPos&) const { return w; }
};

template <typename T, typename Acc>
struct IgDgradEpi {   // C[m, c] -> dx[img, g*Cg + c, ph_h + i*stride_h, ph_w + j*stride_w]
    T* dx;
    int gemm_m, n_i, n_j, Cg, C, H, W, ph_h, ph_w, stride_h, stride_w, g;
    __device__ __forceinline__ long long row(int m) const {
        if (m >= gemm_m) return -1;
        const int ij = n_i * n_j;
        const int img = m / ij, rem = m - img * ij;
        const int i = rem / n_j, j = rem - i * n_j;
        const int h = ph_h + i * stride_h, w = ph_w + j * stride_w;
        return (long long)img * C * H * W + (long long)h * W + w;
    }
    __device__ __forceinline__ long long col(int c) const {
        return c < Cg ? (long long)(g * Cg + c) * H * W : -1;
    }
    __device__ __forceinline__ void put(long long off, int, Acc v) const {
        dx[off] = IgNum<T>::from_acc(v);
    }
};

// One block: a BM x BN tile of (input pixel of one stride phase, input channel) of one group.
template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
igemm_dgrad(const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
            const IgemmArgs a) {
    typedef IgCfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N> Cfg;
    const int phases = a.stride_h * a.stride_w;
    const int g = blockIdx.z / phases;
    const IgPhase ph(a, blockIdx.z - g * phases);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    if (m0 >= ph.gemm_m) return;   // grid x is sized for the largest phase; uniform per block
    const IgDgradDy<T> opa(dy, a, ph, g, BK);
    const IgDgradW<T> opb(w, a, ph, g, BK);
    IgAccum<Cfg> acc;
    ig_mainloop<Cfg>(opa, opb, m0, n0, 0, ph.gemm_k, acc);
    IgDgradEpi<T, typename IgAccum<Cfg>::Acc> epi;
    epi.dx = dx; epi.gemm_m = ph.gemm_m; epi.n_i = ph.n_i; epi.n_j = ph.n_j;
    epi.Cg = a.Cg; epi.C = a.C; epi.H = a.H; epi.W = a.W; epi.ph_h = ph.ph_h; epi.ph_w = ph.ph_w;
    epi.stride_h = a.stride_h; epi.stride_w = a.stride_w; epi.g = g;
    ig_epilogue<Cfg>(epi, acc, m0, n0);
}
