// pool.cu -- max pooling forward (with the argmax) and backward, PyTorch's semantics.
//
// Contract (all arrays C-contiguous; sizes from PoolProblem, never derived here)
//   maxpool_fprop<T>(x, y, idx, geom)
//       x (N, C, H, W) -> y (N, C, P, Q) and idx (N, C, P, Q) int64 = h*W + w in x's plane.
//       Padding counts as -inf and is never loaded. Tie rule, as the NumPy engine (np.argmax
//       over the window in row-major order): the first maximum wins; a NaN beats everything and
//       the first NaN wins; a window whose real elements are all -inf (it ties with the padding)
//       credits its first in-bounds element, as PyTorch does.
//   maxpool_dgrad<T>(dy, idx, dx, geom)
//       dy, idx (N, C, P, Q) -> dx (N, C, H, W): dx[h, w] = sum of dy over the windows whose
//       recorded argmax is (h, w). A gather (each dx element is summed by one thread, in a fixed
//       order): deterministic, no atomics, no zero-fill pass.
//
//   maxpool_fprop_nhwc<T>, maxpool_dgrad_nhwc<T>
//       The same on channels_last memory: x / dx (N, H, W, C) and y, dy, idx (N, P, Q, C), all
//       C-contiguous in that physical order (the engine passes a logical channels_last array's
//       memory, no copy). idx keeps the plane index h*W + w, so both formats record the same
//       numbers and one format's idx is the other's after a transpose.
//
// Variants
//   maxpool_fprop  one thread per output element, scanning its R*S window.
//   maxpool_dgrad  one thread per input element, visiting only the windows that contain it
//                  (at most ceil(R/stride_h) * ceil(S/stride_w) of them).
//   *_nhwc         the same threads, numbered in physical (n, p, q, c) / (n, h, w, c) order, so
//                  neighbouring threads read neighbouring channels (coalesced).
//
// Benchmark: tests/test_cuda_engine.py checks both against the NumPy engine; time them with
// `gpuconv-bench --op pool` where the benchmark offers it.
#include "common.cuh"

// Element e of a C-contiguous (N, C, A, B) array (NCHW) or (N, A, B, C) array (NHWC): its
// (n, c, a, b), the element stride along a plane row (1 or C), and where (n, c)'s plane starts
// in an array of the same format with A2 x B2 planes.
template <bool NHWC> struct PoolAt {
    long long n, c, a, b, step;
    __device__ PoolAt(long long e, long long C, long long A, long long B) : step(NHWC ? C : 1) {
        long long t = e;
        if (NHWC) { c = t % C; t /= C; }
        b = t % B;
        t /= B;
        a = t % A;
        t /= A;
        if (NHWC) n = t;
        else { c = t % C; n = t / C; }
    }
    __device__ long long plane(long long C, long long A2, long long B2) const {
        return NHWC ? n * A2 * B2 * C + c : (n * C + c) * A2 * B2;
    }
};

// One thread per output (n, c, p, q): the max of its window and where it is.
template <typename T, bool NHWC>
__device__ __forceinline__ void maxpool_fprop_at(const T* __restrict__ x, T* __restrict__ y,
                                                 long long* __restrict__ idx, const PoolGeom& g,
                                                 long long e) {
    typedef typename Acc<T>::type A;
    const PoolAt<NHWC> o(e, g.C, g.P, g.Q);
    const long long p = o.a, q = o.b;
    const T* xp = x + o.plane(g.C, g.H, g.W);
    const long long h0 = p * g.stride_h - g.pad_h;
    const long long w0 = q * g.stride_w - g.pad_w;
    A best = neg_inf<A>();
    long long arg = -1;    // index of the running max; -1 while only -inf has been seen
    long long first = -1;  // first in-bounds element, credited if nothing beats -inf
    bool done = false;
    for (long long r = 0; r < g.R && !done; ++r) {
        const long long h = h0 + r * g.dil_h;
        if (h < 0 || h >= g.H) continue;
        for (long long s = 0; s < g.S; ++s) {
            const long long w = w0 + s * g.dil_w;
            if (w < 0 || w >= g.W) continue;
            const long long at = h * g.W + w;
            if (first < 0) first = at;
            const A v = to_acc(xp[at * o.step]);
            // Strict > keeps the first of equal maxima; the first NaN ends the scan.
            if (v > best || is_nan(v)) {
                best = v;
                arg = at;
                if (is_nan(v)) { done = true; break; }
            }
        }
    }
    if (arg < 0) arg = first;  // all real elements are -inf (best is -inf too)
    y[e] = from_acc<T>(best);
    idx[e] = arg;
}

// One thread per input (n, c, h, w): the sum of dy over the windows whose argmax is (h, w).
template <typename T, bool NHWC>
__device__ __forceinline__ void maxpool_dgrad_at(const T* __restrict__ dy,
                                                 const long long* __restrict__ idx,
                                                 T* __restrict__ dx, const PoolGeom& g,
                                                 long long e) {
    typedef typename Acc<T>::type A;
    const PoolAt<NHWC> o(e, g.C, g.H, g.W);
    const long long h = o.a, w = o.b;
    const long long me = h * g.W + w;
    const long long off = o.plane(g.C, g.P, g.Q);   // dy's and idx's plane of this (n, c)
    const long long* idxp = idx + off;
    const T* dyp = dy + off;
    A acc = 0;
    // Window p holds row h through tap r iff p*stride_h - pad_h + r*dil_h == h; th falls as
    // r rises, so the first negative th ends the search.
    for (long long r = 0; r < g.R; ++r) {
        const long long th = h + g.pad_h - r * g.dil_h;
        if (th < 0) break;
        if (th % g.stride_h != 0) continue;
        const long long p = th / g.stride_h;
        if (p >= g.P) continue;
        for (long long s = 0; s < g.S; ++s) {
            const long long tw = w + g.pad_w - s * g.dil_w;
            if (tw < 0) break;
            if (tw % g.stride_w != 0) continue;
            const long long q = tw / g.stride_w;
            if (q >= g.Q) continue;
            const long long at = (p * g.Q + q) * o.step;
            if (idxp[at] == me) acc += to_acc(dyp[at]);
        }
    }
    dx[e] = from_acc<T>(acc);
}

template <typename T>
__global__ void maxpool_fprop(const T* __restrict__ x, T* __restrict__ y,
                              long long* __restrict__ idx, const PoolGeom g) {
    GRID_STRIDE_LOOP(e, g.N * g.C * g.P * g.Q) maxpool_fprop_at<T, false>(x, y, idx, g, e);
}

template <typename T>
__global__ void maxpool_fprop_nhwc(const T* __restrict__ x, T* __restrict__ y,
                                   long long* __restrict__ idx, const PoolGeom g) {
    GRID_STRIDE_LOOP(e, g.N * g.C * g.P * g.Q) maxpool_fprop_at<T, true>(x, y, idx, g, e);
}

template <typename T>
__global__ void maxpool_dgrad(const T* __restrict__ dy, const long long* __restrict__ idx,
                              T* __restrict__ dx, const PoolGeom g) {
    GRID_STRIDE_LOOP(e, g.N * g.C * g.H * g.W) maxpool_dgrad_at<T, false>(dy, idx, dx, g, e);
}

template <typename T>
__global__ void maxpool_dgrad_nhwc(const T* __restrict__ dy, const long long* __restrict__ idx,
                                   T* __restrict__ dx, const PoolGeom g) {
    GRID_STRIDE_LOOP(e, g.N * g.C * g.H * g.W) maxpool_dgrad_at<T, true>(dy, idx, dx, g, e);
}
