// igemm_wgrad.cu -- implicit-GEMM weight gradient (second generation), deterministic split-K.
//
// Contract: x (N, C, H, W), dy (N, K, P, Q), dw (K, C/groups, R, S), contiguous NCHW of one
// dtype T. dw is fully written. No atomics: with splits > 1 each split writes its partial sums to
// a workspace (splits, K, Cg*R*S) of the accumulation type, and igemm_wgrad_reduce adds them in
// the fixed order 0, 1, ..., splits-1, so the result is bitwise reproducible run to run.
//
//   GEMM per group g:  dw[m, n] = sum_k A[m, k] * B[n, k]
//     m = kc (Kg), n = (c, r, s) over Cg*R*S, k = (img, p, q) over N*P*Q (the long dimension)
//     A[m, k] = dy[img, g*Kg + kc, p, q]   -- contiguous in k within an image: 16-byte loads when
//               P*Q % (16/size) == 0 and dy is 16-byte aligned (host checks, sets vec_a)
//     B[n, k] = x[img, g*Cg + c, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w]
//   grid z = group * splits + split; split z covers k in [split*k_chunk, (split+1)*k_chunk),
//   k_chunk a multiple of BK chosen on the host.
// Variants: as igemm_fprop.cu (IGEMM_CONFIGS in gpuconv/engines/cuda_igemm.py).
#include "igemm_common.cuh"

template <typename T, int KV>
struct IgWgradDy : IgRadixK {   // operand A: dy rows kc, k = (img, 0, pq)
    const T* dy;
    int rows, PQ, K, k_end, vec;
    long long group_off;
    struct Row { long long base; bool ok; };

    __device__ IgWgradDy(const T* dy_, const IgemmArgs& a, int g, int k_end_, int BK_) {
        dy = dy_; rows = a.Kg; PQ = a.P * a.Q; K = a.K; k_end = k_end_; vec = a.vec_a;
        group_off = (long long)g * a.Kg * PQ;
        init_radix(1, PQ, BK_);
    }
    __device__ __forceinline__ Row row(int kc) const {
        Row r; r.ok = kc < rows; r.base = group_off + (long long)(r.ok ? kc : 0) * PQ; return r;
    }
    __device__ __forceinline__ long long off(const Row& r, const KPos& p) const {
        return r.base + (long long)p.d.hi * K * PQ + p.d.lo;
    }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        return (r.ok && p.k < k_end) ? dy[off(r, p)] : IgNum<T>::zero();
    }
    // k is a multiple of KV and PQ % KV == 0 when vec is set: the group lies in one image.
    __device__ __forceinline__ bool vec_ok(const Row& r, const KPos& p) const {
        return vec && r.ok && p.k + KV <= k_end;
    }
    __device__ __forceinline__ const T* vec_ptr(const Row& r, const KPos& p) const {
        return dy + off(r, p);
    }
};

template <typename T>
struct IgWgradX : IgRadixK {   // operand B: x gathered, rows (c, r, s), k = (img, p, q)
    const T* x;
    int rows, k_end, C, H, W, R, S;
    int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
    long long group_off;
    struct Row { long long base; int dh, dw; bool ok; };

    __device__ IgWgradX(const T* x_, const IgemmArgs& a, int g, int k_end_, int BK_) {
        x = x_; rows = a.gemm_n; k_end = k_end_; C = a.C; H = a.H; W = a.W; R = a.R; S = a.S;
        stride_h = a.stride_h; stride_w = a.stride_w; pad_h = a.pad_h; pad_w = a.pad_w;
        dil_h = a.dil_h; dil_w = a.dil_w;
        group_off = (long long)g * a.Cg * H * W;
        init_radix(a.P, a.Q, BK_);
    }
    __device__ __forceinline__ Row row(int n) const {
        Row r;
        r.ok = n < rows;
        const int nn = r.ok ? n : 0;
        const int c = nn / (R * S), rs = nn - c * (R * S);
        const int rr = rs / S, ss = rs - rr * S;
        r.base = group_off + (long long)c * H * W;
        r.dh = rr * dil_h - pad_h;
        r.dw = ss * dil_w - pad_w;
        return r;
    }
    __device__ __forceinline__ T fetch(const Row& r, const KPos& p) const {
        if (!r.ok || p.k >= k_end) return IgNum<T>::zero();
        return ig_pixel(x, r.base + (long long)p.d.hi * C * H * W,
                        p.d.mid * stride_h + r.dh, p.d.lo * stride_w + r.dw, H, W);
    }
    __device__ __forceinline__ bool vec_ok(const Row&, const KPos&) const { return false; }
    __device__ __forceinline__ const T* vec_ptr(const Row&, const KPos&) const { return x; }
};

template <typename T, typename Acc>
struct IgWgradEpi {   // C[kc, crs] -> dw (splits == 1) or the split's workspace slice
    T* dw;
    Acc* ws;
    int Kg, gemm_n, g;
    long long ws_off;
    __device__ __forceinline__ long long row(int kc) const {
        return kc < Kg ? (long long)(g * Kg + kc) * gemm_n : -1;
    }
    __device__ __forceinline__ long long col(int n) const { return n < gemm_n ? n : -1; }
    __device__ __forceinline__ void put(long long off, int, Acc v) const {
        if (ws) ws[ws_off + off] = v;
        else dw[off] = IgNum<T>::from_acc(v);
    }
};

// One block: a BM x BN tile of (output channel, (c, r, s)) over one split of N*P*Q, one group.
// ws: (splits, K, Cg*R*S) of the accumulation type, used (and dw left alone) when splits > 1.
template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N)
igemm_wgrad(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw,
            typename IgNum<T>::acc* __restrict__ ws, const IgemmArgs a) {
    typedef IgCfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N> Cfg;
    typedef typename IgAccum<Cfg>::Acc Acc;
    const int g = blockIdx.z / a.splits, split = blockIdx.z - g * a.splits;
    const int k_begin = split * a.k_chunk;
    const int k_end = min(a.gemm_k, k_begin + a.k_chunk);
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const IgWgradDy<T, Cfg::KV> opa(dy, a, g, k_end, BK);
    const IgWgradX<T> opb(x, a, g, k_end, BK);
    IgAccum<Cfg> acc;
    ig_mainloop<Cfg>(opa, opb, m0, n0, k_begin, k_end, acc);
    IgWgradEpi<T, Acc> epi;
    epi.dw = dw; epi.ws = a.splits > 1 ? ws : nullptr;
    epi.Kg = a.Kg; epi.gemm_n = a.gemm_n; epi.g = g;
    epi.ws_off = (long long)split * a.K * a.gemm_n;
    ig_epilogue<Cfg>(epi, acc, m0, n0);
}

// dw[i] = sum over s = 0, 1, ..., splits-1 of ws[s, i], in that order (deterministic).
// One thread per element of dw; total = K * Cg * R * S.
template <typename T>
__global__ void igemm_wgrad_reduce(const typename IgNum<T>::acc* __restrict__ ws,
                                   T* __restrict__ dw, long long total, int splits) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        typename IgNum<T>::acc s = ws[i];
        for (int z = 1; z < splits; ++z) s += ws[z * total + i];
        dw[i] = IgNum<T>::from_acc(s);
    }
}
