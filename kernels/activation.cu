// activation.cu -- elementwise activations forward and backward, and maxout.
//
// Contract (all arrays C-contiguous, one dtype; math in the accumulation type, rounded once)
//   act_fprop<T>(x, y, n, kind, alpha)          x (n,) -> y (n,)
//   act_dgrad<T>(x, y, dy, dx, n, kind, alpha)  dx (n,) from the forward input x, output y and
//                                               the upstream dy (relu/leaky read x; sigmoid/tanh
//                                               read y; elu reads both)
//       kind (the host's ACT_KINDS in gpuconv/engines/cuda_im2col.py):
//         0 relu        y = x > 0 ? x : 0 (NaN stays NaN)          dx = x <= 0 ? 0 : dy
//         1 leaky_relu  y = x > 0 ? x : alpha*x                    dx = x > 0 ? dy : alpha*dy
//         2 sigmoid     y = 1/(1+e) or e/(1+e), e = exp(-|x|)      dx = dy*y*(1-y)
//         3 tanh        y = tanh(x)                                dx = dy*(1-y*y)
//         4 elu         y = x > 0 ? x : alpha*expm1(x)             dx = x <= 0 ? dy*(y+alpha) : dy
//       The gradient's tests are PyTorch's: at the kinks (x == 0) the x <= 0 branch, and at a NaN
//       x (which fails every comparison) dy for relu and elu (PyTorch tests x <= 0) but alpha*dy
//       for leaky_relu (it tests x > 0). NaN propagates as in the NumPy engine
//       (gpuconv/engines/numpy_engine.py: act_fprop / act_dgrad).
//   maxout_fprop<T>(x, y, idx, outer, M, pieces, inner)
//       x (outer, M*pieces, inner) -> y, idx (outer, M, inner); idx int64 in [0, pieces): the
//       first maximum of each group of `pieces` consecutive entries, or its first NaN.
//   maxout_dgrad<T>(dy, idx, dx, outer, M, pieces, inner)
//       dy, idx (outer, M, inner) -> dx (outer, M*pieces, inner): dy at the winner, 0 elsewhere
//       (a gather: every dx element written once, no zero-fill pass, no atomics).
//   convert<TI, TO>(x, y, n)                    y (n,) of TO = x (n,) of TI, rounded once: the
//       engine's bfloat16 <-> float32 casts (its bf16 GEMMs run in fp32), so that no CuPy kernel
//       on bfloat16 data is needed.
//
// Variants
//   one each: one thread per element (per output for maxout_fprop). The kind is a runtime
//   argument, uniform across the grid, so the switch costs no divergence and the package has one
//   instantiation per dtype instead of one per (dtype, kind).
//
// Benchmark: memory-bound; compare with the copy bandwidth of `cupy.copyto` on the same array.
#include "common.cuh"

__device__ __forceinline__ float abs_(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_(double v) { return fabs(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float expm1_(float v) { return expm1f(v); }
__device__ __forceinline__ double expm1_(double v) { return expm1(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }

// One thread per element: y = act(x).
template <typename T>
__global__ void act_fprop(const T* __restrict__ x, T* __restrict__ y, long long n, int kind,
                          typename Acc<T>::type alpha) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE_LOOP(i, n) {
        const A v = to_acc(x[i]);
        A out;
        switch (kind) {
            case 0: out = (v > 0 || is_nan(v)) ? v : A(0); break;
            case 1: out = v > 0 ? v : alpha * v; break;
            case 2: {
                const A e = exp_(-abs_(v));  // never overflows
                out = v >= 0 ? A(1) / (A(1) + e) : e / (A(1) + e);
                break;
            }
            case 3: out = tanh_(v); break;
            default: out = v > 0 ? v : alpha * expm1_(v); break;  // 4: elu
        }
        y[i] = from_acc<T>(out);
    }
}

// One thread per element: dx = act'(x or y) * dy.
template <typename T>
__global__ void act_dgrad(const T* __restrict__ x, const T* __restrict__ y,
                          const T* __restrict__ dy, T* __restrict__ dx, long long n, int kind,
                          typename Acc<T>::type alpha) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE_LOOP(i, n) {
        const A g = to_acc(dy[i]);
        A out;
        switch (kind) {
            case 0: out = to_acc(x[i]) <= 0 ? A(0) : g; break;  // NaN x: g, as PyTorch
            case 1: out = to_acc(x[i]) > 0 ? g : g * alpha; break;
            case 2: { const A v = to_acc(y[i]); out = g * v * (A(1) - v); break; }
            case 3: { const A v = to_acc(y[i]); out = g * (A(1) - v * v); break; }
            default: out = to_acc(x[i]) <= 0 ? g * (to_acc(y[i]) + alpha) : g; break;  // 4: elu
        }
        dx[i] = from_acc<T>(out);
    }
}

// One thread per output (o, m, i): the first max (or first NaN) of x[o, m*pieces + j, i].
template <typename T>
__global__ void maxout_fprop(const T* __restrict__ x, T* __restrict__ y,
                             long long* __restrict__ idx, long long outer, long long M,
                             long long pieces, long long inner) {
    typedef typename Acc<T>::type A;
    const long long total = outer * M * inner;
    GRID_STRIDE_LOOP(e, total) {
        const long long i = e % inner;
        const long long om = e / inner;  // o*M + m
        const T* xg = x + om * pieces * inner + i;
        A best = to_acc(xg[0]);
        long long arg = 0;
        for (long long j = 1; j < pieces && !is_nan(best); ++j) {
            const A v = to_acc(xg[j * inner]);
            if (v > best || is_nan(v)) { best = v; arg = j; }
        }
        y[e] = from_acc<T>(best);
        idx[e] = arg;
    }
}

// One thread per input (o, m*pieces + j, i): dy[o, m, i] if j won, else 0.
template <typename T>
__global__ void maxout_dgrad(const T* __restrict__ dy, const long long* __restrict__ idx,
                             T* __restrict__ dx, long long outer, long long M, long long pieces,
                             long long inner) {
    const long long total = outer * M * pieces * inner;
    GRID_STRIDE_LOOP(e, total) {
        const long long i = e % inner;
        long long t = e / inner;
        const long long j = t % pieces;
        const long long om = t / pieces;
        const long long src = om * inner + i;
        dx[e] = idx[src] == j ? dy[src] : zero<T>();
    }
}

// One thread per element: y = x converted through the accumulation type (rounded once).
template <typename TI, typename TO>
__global__ void convert(const TI* __restrict__ x, TO* __restrict__ y, long long n) {
    GRID_STRIDE_LOOP(i, n) { y[i] = from_acc<TO>(to_acc(x[i])); }
}
