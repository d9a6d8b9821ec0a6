// igemm_fprop.cu -- implicit-GEMM forward convolution (second generation).
//
// Contract: x (N, C, H, W), w (K, C/groups, R, S), bias (K) or unused, y (N, K, P, Q), all
// contiguous NCHW of one dtype T (float, double, ig_f16, ig_bf16); P, Q and the padding come in
// IgemmArgs from gpuconv.ConvProblem. y is fully written (no pre-zeroing needed).
//
//   GEMM per group g (grid z):  y[m, n] = sum_k A[m, k] * B[n, k] (+ bias[n])
//     m = (img, p, q) over N*P*Q, n = output channel in the group (Kg), k = (c, r, s) over Cg*R*S
//     A[m, k] = x[img, g*Cg + c, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w]
//               (0 in the padding: the im2col gather, done while loading the shared tile)
//     B[n, k] = w[g*Kg + n, c, r, s]  -- contiguous in k: 16-byte loads when Cg*R*S % (16/size)
//               == 0 and w is 16-byte aligned (host checks, sets vec_b)
//   A block computes a BM x BN tile of (m, n); see igemm_common.cuh for tiles and math modes.
//
// Variants (template): T x MODE (SIMT fp32/fp64, mma f16/bf16, mma tf32) x tile; the list that is
// compiled, launched, autotuned and compile-tested is IGEMM_CONFIGS in
// gpuconv/engines/cuda_igemm.py. Bench: gpuconv-bench --algo igemm_* (see bench/NOTES.md, "CUDA engine, generation 2").
#include "igemm_common.cuh"

template <typename T>
struct IgFpropX : IgRadixK {   // operand A: the im2col view of x; k = (c, r, s)
    const T* x;
    int gemm_m, gemm_k, PQ, Q, C, H, W, R, S, Cg;
    int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    long long group_off;
    struct Row { long long base; int h0, w0; bool ok; };

    __device__ IgFpropX(const T* x_, const IgemmArgs& a, int g, int BK_) {
        x = x_;
        gemm_m = a.gemm_m; gemm_k = a.gemm_k; PQ = a.P * a.Q; Q = a.Q;
        C = a.C; H = a.H; W = a.W; R = a.R; S = a.S; Cg = a.Cg;
        stride_h = a.stride_h; stride_w = a.stride_w; pad_h = a.pad_h; pad_w = a.pad_w;
        dil_h = a.dil_h; dil_w = a.dil_w;
        group_off = (long long)g * Cg * H * W;
        init_radix(R, S, BK_);
    }
    __device__ __forceinline__ Row row(int m) const {
        Row r;
        r.ok = m < gemm_m;
        const int mm = r.ok ? m : 0;
        const int img = mm / PQ, pq = mm - img * PQ;
        const int p = pq / Q, q = pq - p * Q;
        r.base = (long long)img * C * H * W + group_off;
        r.h0 = p * stride_h - pad_h;
        r.w0 = q * stride_w - pad_w;
        return r;
    }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        if (!r.ok || p.k >= gemm_k) return IgNum<T>::zero();
        return ig_pixel(x, r.base + (long long)p.d.hi * H * W, r.h0 + p.d.mid * dil_h,
                        r.w0 + p.d.lo * dil_w, H, W);
    }
    __device__ __forceinline__ bool vec_ok(const Row&, const KPos&) const { return false; }
    __device__ __forceinline__ const T* vec_ptr(const Row&, const KPos&) const { return x; }
};

template <typename T, int KV>
struct IgFpropW {   // operand B: w as (Kg, Cg*R*S) rows
    const T* w;
    int rows, gemm_k, vec, BK;
    long long group_off;
    struct Row { long long base; bool ok; };
    struct KPos { int k; };

    __device__ IgFpropW(const T* w_, const IgemmArgs& a, int g, int BK_) {
        w = w_; rows = a.Kg; gemm_k = a.gemm_k; vec = a.vec_b; BK = BK_;
        group_off = (long long)g * a.Kg * a.gemm_k;
    }
    __device__ __forceinline__ Row row(int n) const {
        Row r; r.ok = n < rows; r.base = group_off + (long long)(r.ok ? n : 0) * gemm_k; return r;
    }
    __device__ __forceinline__ KPos kpos(int k) const { KPos p; p.k = k; return p; }
    __device__ __forceinline__ void step(KPos& p) const { ++p.k; }
    __device__ __forceinline__ void jump(KPos& p) const { p.k += BK; }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        return (r.ok && p.k < gemm_k) ? w[r.base + p.k] : IgNum<T>::zero();
    }
    __device__ __forceinline__ bool vec_ok(const Row& r, const KPos& p) const {
        return vec && r.ok && p.k + KV <= gemm_k;
    }
    __device__ __forceinline__ const T* vec_ptr(const Row& r, const KPos& p) const {
        return w + r.base + p.k;
    }
};

template <typename T, typename Acc>
struct IgFpropEpi {   // C[m, n] -> y[img, g*Kg + n, p, q] (+ bias)
    T* y;
    const T* bias;
    int gemm_m, Kg, K, PQ, g;
    __device__ __forceinline__ long long row(int m) const {
        if (m >= gemm_m) return -1;
        const int img = m / PQ;
        return (long long)img * K * PQ + (m - img * PQ);
    }
    __device__ __forceinline__ long long col(int n) const {
        return n < Kg ? (long long)(g * Kg + n) * PQ : -1;
    }
    __device__ __forceinline__ void put(long long off, int n, Acc v) const {
        if (bias) v += IgNum<T>::to_acc(bias[g * Kg + n]);
        y[off] = IgNum<T>::from_acc(v);
    }
};

// One block: a BM x BN tile of (output pixel, output channel) of group blockIdx.z.
template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
igemm_fprop(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
            T* __restrict__ y, const IgemmArgs a) {
    typedef IgCfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N> Cfg;
    const int g = blockIdx.z;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const IgFpropX<T> opa(x, a, g, BK);
    const IgFpropW<T, Cfg::KV> opb(w, a, g, BK);
    IgAccum<Cfg> acc;
    ig_mainloop<Cfg>(opa, opb, m0, n0, 0, a.gemm_k, acc);
    IgFpropEpi<T, typename IgAccum<Cfg>::Acc> epi;
    epi.y = y; epi.bias = a.has_bias ? bias : nullptr;
    epi.gemm_m = a.gemm_m; epi.Kg = a.Kg; epi.K = a.K; epi.PQ = a.P * a.Q; epi.g = g;
    ig_epilogue<Cfg>(epi, acc, m0, n0);
}
