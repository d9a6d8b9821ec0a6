// common.cuh -- shared by every kernels/*.cu file of the CUDA engine.
//
// The loader (gpuconv/kernel_loader.py) pastes this header's text in place of
// `#include "common.cuh"`, because CuPy's disk cache is keyed on the source text and not on -I
// headers: an edited header must change the key, or a stale binary would be loaded.
//
// Contents
//   ConvGeom / PoolGeom  the problem geometry as one by-value kernel argument. Field for field
//                        the numpy structured dtypes CONV_GEOM_DTYPE / POOL_GEOM_DTYPE in
//                        gpuconv/kernel_loader.py (all int64, so there is no padding to get wrong;
//                        the compile test static_asserts every offset). Sizes come from
//                        gpuconv.ConvProblem: kernels never derive P or Q themselves.
//   gc_half / gc_bf16    raw 16-bit storage types for float16 / bfloat16 arrays. No
//                        <cuda_fp16.h> / <cuda_bf16.h>: NVRTC then needs no CUDA headers at all
//                        (a driver-only machine may have none), the approach of
//                        kernels/igemm_common.cuh (ig_f16 / ig_bf16). Conversions by inline PTX
//                        cvt (bf16 rounding needs sm_80, the package's floor); bf16 -> float is
//                        exact (a shift).
//   Acc<T>               the accumulation type: float for float and the 16-bit types, double for
//                        double.
//   to_acc / from_acc    loads and stores through the accumulation type (rounded once, to nearest
//                        even); zero<T>() an exact 0 of storage type T.
//   GRID_STRIDE_LOOP     a 64-bit grid-stride loop, so a grid capped at 2^31-1 blocks (and
//                        the launcher's much smaller cap) covers any number of elements.
#pragma once

struct __align__(2) gc_half { unsigned short bits; };
struct __align__(2) gc_bf16 { unsigned short bits; };

struct ConvGeom {
    long long N, C, H, W;       // input  x : N x C x H x W
    long long K, R, S;          // weight w : K x (C / groups) x R x S
    long long P, Q;             // output y : N x K x P x Q   (from ConvProblem, never derived)
    long long pad_h, pad_w, pad_h_end, pad_w_end;
    long long stride_h, stride_w, dil_h, dil_w;
    long long groups;
};

struct PoolGeom {
    long long N, C, H, W;       // input  x : N x C x H x W
    long long R, S;             // window R x S
    long long P, Q;             // output y : N x C x P x Q   (from PoolProblem, never derived)
    long long pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
};

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(gc_half v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_acc(gc_bf16 v) {
    return __uint_as_float(((unsigned)v.bits) << 16);   // exact
}

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ gc_half from_acc<gc_half>(float v) {
    gc_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
template <> __device__ __forceinline__ gc_bf16 from_acc<gc_bf16>(float v) {
    gc_bf16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(v));
    return h;
}
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <typename T> __device__ __forceinline__ T zero() {
    return from_acc<T>(typename Acc<T>::type(0));
}

// -inf without <cmath>'s INFINITY macro (NVRTC does not promise it).
template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() {
    return __int_as_float((int)0xff800000u);
}
template <> __device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000LL);
}

// v != v is the portable NaN test (no header needed; the engine never compiles with fast-math).
__device__ __forceinline__ bool is_nan(float v) { return v != v; }
__device__ __forceinline__ bool is_nan(double v) { return v != v; }

#define GRID_STRIDE_LOOP(i, n)                                                          \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n);       \
         i += (long long)blockDim.x * gridDim.x)
