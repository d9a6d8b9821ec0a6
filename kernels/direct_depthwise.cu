// direct_depthwise.cu -- direct kernels for depthwise convolutions (groups == C, Cg == 1).
//
// Contract: x (N, C, H, W), w (K, 1, R, S) with K = C * Kg (Kg = channel multiplier), y / dy
// (N, K, P, Q), dx (N, C, H, W), dw (K, 1, R, S); contiguous NCHW of one dtype T; geometry in
// IgemmArgs (igemm_common.cuh), sizes from gpuconv.ConvProblem. Every output is fully written.
// A GEMM has nothing to tile here (its reduction is only R*S long), so these are plain gathers:
//   dw_fprop  one thread per y element: sum over the R x S window of its one input channel.
//   dw_dgrad  one thread per dx element: sum over its Kg output channels and the taps (r, s) with
//             h + pad_h - r*dil_h a multiple of stride_h (the stride zeros are skipped).
//   dw_wgrad  one block per dw element (k, r, s): threads stride over N*P*Q, then a fixed-shape
//             shared-memory tree: deterministic, no atomics.
// Variants: T in {float, double, ig_f16, ig_bf16} (DIRECT_KERNELS in cuda_igemm.py).
#include "igemm_common.cuh"

#define DW_WGRAD_THREADS 256

template <typename T>
__global__ void dw_fprop(const T* __restrict__ x, const T* __restrict__ w,
                         const T* __restrict__ bias, T* __restrict__ y, const IgemmArgs a) {
    typedef typename IgNum<T>::acc Acc;
    const long long total = (long long)a.N * a.K * a.P * a.Q;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int q = (int)(i % a.Q);
        const int p = (int)((i / a.Q) % a.P);
        const long long nk = i / ((long long)a.P * a.Q);
        const int k = (int)(nk % a.K);
        const long long n = nk / a.K;
        const int c = k / a.Kg;
        const long long xb = (n * a.C + c) * a.H * a.W;
        const T* wk = w + (long long)k * a.R * a.S;
        Acc s = a.has_bias ? IgNum<T>::to_acc(bias[k]) : Acc(0);
        for (int r = 0; r < a.R; ++r) {
            const int h = p * a.stride_h - a.pad_h + r * a.dil_h;
            if ((unsigned)h >= (unsigned)a.H) continue;
            for (int t = 0; t < a.S; ++t) {
                const int ww = q * a.stride_w - a.pad_w + t * a.dil_w;
                if ((unsigned)ww >= (unsigned)a.W) continue;
                s += IgNum<T>::to_acc(x[xb + (long long)h * a.W + ww]) *
                     IgNum<T>::to_acc(wk[r * a.S + t]);
            }
        }
        y[i] = IgNum<T>::from_acc(s);
    }
}

template <typename T>
__global__ void dw_dgrad(const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
                         const IgemmArgs a) {
    typedef typename IgNum<T>::acc Acc;
    const long long total = (long long)a.N * a.C * a.H * a.W;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ww = (int)(i % a.W);
        const int h = (int)((i / a.W) % a.H);
        const long long nc = i / ((long long)a.H * a.W);
        const int c = (int)(nc % a.C);
        const long long n = nc / a.C;
        Acc s = Acc(0);
        for (int r = 0; r < a.R; ++r) {
            const int th = h + a.pad_h - r * a.dil_h;   // = p * stride_h for a contributing p
            if (th < 0 || th % a.stride_h) continue;
            const int p = th / a.stride_h;
            if (p >= a.P) continue;
            for (int t = 0; t < a.S; ++t) {
                const int tw = ww + a.pad_w - t * a.dil_w;
                if (tw < 0 || tw % a.stride_w) continue;
                const int q = tw / a.stride_w;
                if (q >= a.Q) continue;
                for (int j = 0; j < a.Kg; ++j) {
                    const int k = c * a.Kg + j;
                    s += IgNum<T>::to_acc(dy[((n * a.K + k) * a.P + p) * a.Q + q]) *
                         IgNum<T>::to_acc(w[((long long)k * a.R + r) * a.S + t]);
                }
            }
        }
        dx[i] = IgNum<T>::from_acc(s);
    }
}

// grid.x = K * R * S blocks of DW_WGRAD_THREADS threads.
template <typename T>
__global__ void __launch_bounds__(DW_WGRAD_THREADS)
dw_wgrad(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw,
         const IgemmArgs a) {
    typedef typename IgNum<T>::acc Acc;
    __shared__ Acc red[DW_WGRAD_THREADS];
    const int krs = blockIdx.x;
    const int t = krs % a.S, r = (krs / a.S) % a.R, k = krs / (a.R * a.S);
    const int c = k / a.Kg;
    const int PQ = a.P * a.Q;
    const long long total = (long long)a.N * PQ;
    Acc s = Acc(0);
    for (long long i = threadIdx.x; i < total; i += DW_WGRAD_THREADS) {
        const long long n = i / PQ;
        const int pq = (int)(i - n * PQ);
        const int p = pq / a.Q, q = pq - p * a.Q;
        const int h = p * a.stride_h - a.pad_h + r * a.dil_h;
        const int ww = q * a.stride_w - a.pad_w + t * a.dil_w;
        if ((unsigned)h >= (unsigned)a.H || (unsigned)ww >= (unsigned)a.W) continue;
        s += IgNum<T>::to_acc(dy[(n * a.K + k) * PQ + pq]) *
             IgNum<T>::to_acc(x[((n * a.C + c) * a.H + h) * a.W + ww]);
    }
    red[threadIdx.x] = s;
    __syncthreads();
    for (int half = DW_WGRAD_THREADS / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) red[threadIdx.x] += red[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) dw[krs] = IgNum<T>::from_acc(red[0]);
}
