"""Run the CUDA kernels on the CPU: the kernels/*.cu text compiled by g++ behind a small shim.

Why: no GPU here or in CI, yet the kernels' index arithmetic (strides, padding, dilation, groups,
stride phases, tie rules, 64-bit offsets) is where bugs hide. The shim turns `__global__` and
`__device__` into plain C++, makes blockIdx/threadIdx/blockDim/gridDim host variables and __half
a _Float16 bit pattern; a launch runs every (block, thread) of a small grid one after another.
That is faithful for these kernels because none of them communicates between threads (each
output element is written by exactly one thread and inputs are read-only). A small grid (3
blocks of 5 threads) makes every kernel's grid-stride loop go round many times.

:func:`host_launch` has the signature of gpuconv.cuda.launch, so the CUDA engine's own Python
code (chunking, phase plans, GEMMs via NumPy's matmul in place of cuBLAS) runs unchanged on top.
What this cannot check: real GPU scheduling, cuBLAS, NVRTC, CuPy's argument passing.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np

from gpuconv.cuda import KERNELS, kernel_source

CXX = shutil.which("g++")
GRID, BLOCK = 3, 5

SHIM = r"""
#include <math.h>
#include <string.h>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
struct gc_dim3 { unsigned int x, y, z; };
inline gc_dim3 blockIdx, threadIdx, blockDim, gridDim;
struct __half { unsigned short x; };
inline float __half2float(__half h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; memcpy(&h, &f, 2); return h; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
template <typename F> void gc_run(F f, unsigned grid, unsigned block) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}
#define GC_T(code, ...) switch (code) { \
    case 'f': { typedef float T; __VA_ARGS__; } break; \
    case 'd': { typedef double T; __VA_ARGS__; } break; \
    default:  { typedef __half T; __VA_ARGS__; } break; }
typedef long long ll;
typedef const void* cv;
typedef void* mv;
"""

# extern "C" entry points, one per kernel template; argument order as the engine launches them.
WRAPPERS = {
    "conv_im2col.cu": r"""
extern "C" void h_im2col(char t, char tc, cv x, mv col, const ConvGeom* g, unsigned G, unsigned B) {
    if (t == 'f') gc_run([&] { im2col<float, float>((const float*)x, (float*)col, *g); }, G, B);
    else if (t == 'd') gc_run([&] { im2col<double, double>((const double*)x, (double*)col, *g); }, G, B);
    else if (tc == 'f') gc_run([&] { im2col<__half, float>((const __half*)x, (float*)col, *g); }, G, B);
    else gc_run([&] { im2col<__half, __half>((const __half*)x, (__half*)col, *g); }, G, B);
}
extern "C" void h_gemm_to_nchw(char t, cv src, cv bias, int has_bias, mv dst, ll N, ll Kc, ll I,
                               ll J, ll Hd, ll Wd, ll h0, ll w0, ll sh, ll sw, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { gemm_to_nchw<T>((const T*)src, (const T*)bias, has_bias, (T*)dst, N, Kc, I, J,
                                         Hd, Wd, h0, w0, sh, sw); }, G, B))
}
""",
    "conv_dgrad.cu": r"""
extern "C" void h_dgrad_col(char t, cv dy, mv col, const ConvGeom* g, ll ph, ll pw, ll I, ll J,
                            ll TH, ll TW, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { dgrad_col<T>((const T*)dy, (T*)col, *g, ph, pw, I, J, TH, TW); }, G, B))
}
""",
    "pool.cu": r"""
extern "C" void h_maxpool_fprop(char t, cv x, mv y, mv idx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_fprop<T>((const T*)x, (T*)y, (ll*)idx, *g); }, G, B))
}
extern "C" void h_maxpool_dgrad(char t, cv dy, cv idx, mv dx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_dgrad<T>((const T*)dy, (const ll*)idx, (T*)dx, *g); }, G, B))
}
""",
    "activation.cu": r"""
extern "C" void h_act_fprop(char t, cv x, mv y, ll n, int kind, double alpha, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { act_fprop<T>((const T*)x, (T*)y, n, kind,
                                      (typename Acc<T>::type)alpha); }, G, B))
}
extern "C" void h_act_dgrad(char t, cv x, cv y, cv dy, mv dx, ll n, int kind, double alpha,
                            unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { act_dgrad<T>((const T*)x, (const T*)y, (const T*)dy, (T*)dx, n, kind,
                                      (typename Acc<T>::type)alpha); }, G, B))
}
extern "C" void h_maxout_fprop(char t, cv x, mv y, mv idx, ll o, ll m, ll p, ll i, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxout_fprop<T>((const T*)x, (T*)y, (ll*)idx, o, m, p, i); }, G, B))
}
extern "C" void h_maxout_dgrad(char t, cv dy, cv idx, mv dx, ll o, ll m, ll p, ll i, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxout_dgrad<T>((const T*)dy, (const ll*)idx, (T*)dx, o, m, p, i); }, G, B))
}
""",
}

_CODES = {"float": b"f", "double": b"d", "__half": b"h"}
_libs: dict = {}


def build(workdir):
    """Compile every kernel file for the host; returns {file: ctypes.CDLL}."""
    for file, _ in KERNELS:
        if file in _libs:
            continue
        src = kernel_source(file).replace("#include <cuda_fp16.h>", "")
        path = os.path.join(workdir, file.replace(".cu", ".cpp"))
        with open(path, "w") as f:
            f.write(SHIM + src + WRAPPERS[file])
        so = path[:-4] + ".so"
        res = subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-o", so, path],
                             capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"host build of {file} failed:\n{res.stderr}")
        _libs[file] = ctypes.CDLL(so)
    return _libs


def _arg(a):
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a))
    if isinstance(a, (np.float32, np.float64)):
        return ctypes.c_double(float(a))
    # the engine must pass typed scalars only (CuPy would send a Python int as 64-bit, unchecked)
    raise TypeError(f"untyped kernel argument {a!r} ({type(a).__name__})")


launches: list = []  # names launched since the last clear(), for tests of the control flow


def host_launch(name, n_threads, args):
    """gpuconv.cuda.launch, on the CPU."""
    if int(n_threads) <= 0:
        return
    m = re.fullmatch(r"(\w+)<(.*)>", name)
    base, types = m.group(1), [t.strip() for t in m.group(2).split(",")]
    file = next(f for f, names in KERNELS if name in names)
    fn = getattr(_libs[file], f"h_{base}")
    codes = [ctypes.c_char(_CODES[t]) for t in types]
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous or a.ndim == 1 and a.dtype.names, \
                f"{name}: non-contiguous array argument"
    launches.append(name)
    fn(*codes, *[_arg(a) for a in args], ctypes.c_uint(GRID), ctypes.c_uint(BLOCK))
