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
// Variants
//   maxpool_fprop  one thread per output element, scanning its R*S window.
//   maxpool_dgrad  one thread per input element, visiting only the windows that contain it
//                  (at most ceil(R/stride_h) * ceil(S/stride_w) of them).
//
// Benchmark: tests/test_cuda_engine.py checks both against the NumPy engine; time them with
// `gpuconv-bench --op pool` where the benchmark offers it.
#include "common.cuh"

// One thread per output (n, c, p, q): the max of its window and where it is.
template <typename T>
__global__ void maxpool_fprop(const T* __restrict__ x, T* __restrict__ y,
                              long long* __restrict__ idx, const PoolGeom g) {
    typedef typename Acc<T>::type A;
    const long long total = g.N * g.C * g.P * g.Q;
    GRID_STRIDE_LOOP(e, total) {
        const long long q = e % g.Q;
        long long t = e / g.Q;
        const long long p = t % g.P;
        const long long nc = t / g.P;
        const T* xp = x + nc * g.H * g.W;
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
                const A v = to_acc(xp[at]);
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
}

// One thread per input (n, c, h, w): the sum of dy over the windows whose argmax is (h, w).
template <typename T>
__global__ void maxpool_dgrad(const T* __restrict__ dy, const long long* __restrict__ idx,
                              T* __restrict__ dx, const PoolGeom g) {
    typedef typename Acc<T>::type A;
    const long long total = g.N * g.C * g.H * g.W;
    GRID_STRIDE_LOOP(e, total) {
        const long long w = e % g.W;
        long long t = e / g.W;
        const long long h = t % g.H;
        const long long nc = t / g.H;
        const long long me = h * g.W + w;
        const long long* idxp = idx + nc * g.P * g.Q;
        const T* dyp = dy + nc * g.P * g.Q;
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
                if (idxp[p * g.Q + q] == me) acc += to_acc(dyp[p * g.Q + q]);
            }
        }
        dx[e] = from_acc<T>(acc);
    }
}
