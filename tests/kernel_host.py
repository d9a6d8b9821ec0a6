"""Run the CUDA kernels on the CPU: the kernels/*.cu text compiled by g++ behind a small shim.

Why: no GPU here or in CI, yet the kernels' index arithmetic (strides, padding, dilation, groups,
stride phases, tie rules, 64-bit offsets) is where bugs hide. The shim turns `__global__` and
`__device__` into plain C++ and makes blockIdx/threadIdx/blockDim/gridDim host variables; every
inline-PTX statement (the cvt conversions of the 16-bit types) becomes a call of a bit-exact
emulation (:func:`emulate_ptx`); a launch runs every (block, thread) of a small grid one after
another.
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
from gpuconv.kernel_loader import CTYPES

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
#define __align__(n) __attribute__((aligned(n)))
struct gc_dim3 { unsigned int x, y, z; };
inline gc_dim3 blockIdx, threadIdx, blockDim, gridDim;
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
// the inline PTX conversions of kernels/common.cuh and igemm_common.cuh, bit-exactly (asm
// statements are rewritten into these calls by emulate_ptx)
inline void gc_ptx_cvt_f32_f16(float& f, unsigned short h) { _Float16 x; memcpy(&x, &h, 2); f = x; }
inline void gc_ptx_cvt_rn_f16_f32(unsigned short& h, float f) {
    _Float16 x = (_Float16)f;   // round to nearest even
    memcpy(&h, &x, 2);
}
inline void gc_ptx_cvt_rn_bf16_f32(unsigned short& h, float f) {
    const unsigned u = __float_as_uint(f);
    h = (u & 0x7fffffffu) > 0x7f800000u ? 0x7fff   // NaN stays NaN
                                        : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline void gc_ptx_cvt_rna_tf32_f32(unsigned& u, float f) {   // nearest, ties away from zero
    const unsigned b = __float_as_uint(f);
    u = (b & 0x7f800000u) == 0x7f800000u ? b : (b + 0x1000u) & 0xffffe000u;
}
template <typename F> void gc_run(F f, unsigned grid, unsigned block) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}
#define GC_T(code, ...) switch (code) { \
    case 'f': { typedef float T; __VA_ARGS__; } break; \
    case 'd': { typedef double T; __VA_ARGS__; } break; \
    case 'b': { typedef gc_bf16 T; __VA_ARGS__; } break; \
    default:  { typedef gc_half T; __VA_ARGS__; } break; }
typedef long long ll;
typedef const void* cv;
typedef void* mv;
"""

# after the kernels (their types are common.cuh's): T and its GEMM type (float for bfloat16, T
# otherwise), the second type of the <T, TG> kernels
PRELUDE = r"""
template <typename T> struct gc_gemm { typedef T type; };
template <> struct gc_gemm<gc_bf16> { typedef float type; };
"""

# extern "C" entry points, one per kernel template; argument order as the engine launches them.
WRAPPERS = {
    "conv_im2col.cu": r"""
extern "C" void h_im2col(char t, char tc, cv x, mv col, const ConvGeom* g, unsigned G, unsigned B) {
    if (t == 'h' && tc == 'f') gc_run([&] { im2col<gc_half, float>((const gc_half*)x, (float*)col, *g); }, G, B);
    else GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TC;
                              im2col<T, TC>((const T*)x, (TC*)col, *g); }, G, B))
}
extern "C" void h_gemm_to_nchw(char t, char ts, cv src, cv bias, int has_bias, mv dst, ll N, ll Kc,
                               ll I, ll J, ll Hd, ll Wd, ll h0, ll w0, ll sh, ll sw, unsigned G,
                               unsigned B) {
    GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TS;
                         gemm_to_nchw<T, TS>((const TS*)src, (const T*)bias, has_bias, (T*)dst, N,
                                             Kc, I, J, Hd, Wd, h0, w0, sh, sw); }, G, B))
}
extern "C" void h_im2col_nhwc(char t, char tc, cv x, mv col, const ConvGeom* g, unsigned G, unsigned B) {
    if (t == 'h' && tc == 'f') gc_run([&] { im2col_nhwc<gc_half, float>((const gc_half*)x, (float*)col, *g); }, G, B);
    else GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TC;
                              im2col_nhwc<T, TC>((const T*)x, (TC*)col, *g); }, G, B))
}
extern "C" void h_gemm_to_nhwc(char t, char ts, cv src, cv bias, int has_bias, mv dst, ll N, ll Gr,
                               ll Cg, ll I, ll J, ll Hd, ll Wd, ll h0, ll w0, ll sh, ll sw,
                               unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TS;
                         gemm_to_nhwc<T, TS>((const TS*)src, (const T*)bias, has_bias, (T*)dst, N,
                                             Gr, Cg, I, J, Hd, Wd, h0, w0, sh, sw); }, G, B))
}
""",
    "conv_dgrad.cu": r"""
extern "C" void h_dgrad_col(char t, char tc, cv dy, mv col, const ConvGeom* g, ll ph, ll pw,
                            ll I, ll J, ll TH, ll TW, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TC;
                         dgrad_col<T, TC>((const T*)dy, (TC*)col, *g, ph, pw, I, J, TH, TW); },
                   G, B))
}
extern "C" void h_dgrad_col_nhwc(char t, char tc, cv dy, mv col, const ConvGeom* g, ll ph, ll pw,
                                 ll I, ll J, ll TH, ll TW, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { typedef typename gc_gemm<T>::type TC;
                         dgrad_col_nhwc<T, TC>((const T*)dy, (TC*)col, *g, ph, pw, I, J, TH, TW); },
                   G, B))
}
""",
    "pool.cu": r"""
extern "C" void h_maxpool_fprop(char t, cv x, mv y, mv idx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_fprop<T>((const T*)x, (T*)y, (ll*)idx, *g); }, G, B))
}
extern "C" void h_maxpool_dgrad(char t, cv dy, cv idx, mv dx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_dgrad<T>((const T*)dy, (const ll*)idx, (T*)dx, *g); }, G, B))
}
extern "C" void h_maxpool_fprop_nhwc(char t, cv x, mv y, mv idx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_fprop_nhwc<T>((const T*)x, (T*)y, (ll*)idx, *g); }, G, B))
}
extern "C" void h_maxpool_dgrad_nhwc(char t, cv dy, cv idx, mv dx, const PoolGeom* g, unsigned G, unsigned B) {
    GC_T(t, gc_run([&] { maxpool_dgrad_nhwc<T>((const T*)dy, (const ll*)idx, (T*)dx, *g); }, G, B))
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
extern "C" void h_convert(char ti, char to, cv x, mv y, ll n, unsigned G, unsigned B) {
    if (ti == 'b') gc_run([&] { convert<gc_bf16, float>((const gc_bf16*)x, (float*)y, n); }, G, B);
    else gc_run([&] { convert<float, gc_bf16>((const float*)x, (gc_bf16*)y, n); }, G, B);
}
""",
}

_CODES = {CTYPES["float32"]: b"f", CTYPES["float64"]: b"d", CTYPES["float16"]: b"h",
          CTYPES["bfloat16"]: b"b"}
_libs: dict = {}

_ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(\s*"([^"]*)"(?:\s*"[^"]*")*\s*:(.*?)\)\s*;', re.S)
_OPERAND = re.compile(r'"[=+&]*\w"\s*\(([^()]*)\)')


def emulate_ptx(text):
    """Every inline-PTX statement `asm("op.x.y ..." : outs : ins);` becomes the call
    `gc_ptx_op_x_y(outs..., ins...);` of the shim's emulation (an unknown one fails to compile)."""
    def call(m):
        op = m.group(1).split()[0].rstrip(";").replace(".", "_")
        return f"gc_ptx_{op}({', '.join(_OPERAND.findall(m.group(2)))});"
    return _ASM.sub(call, text)


def build(workdir):
    """Compile every kernel file for the host; returns {file: ctypes.CDLL}."""
    for file, _ in KERNELS:
        if file in _libs:
            continue
        src = emulate_ptx(kernel_source(file))
        path = os.path.join(workdir, file.replace(".cu", ".cpp"))
        with open(path, "w") as f:
            f.write(SHIM + src + PRELUDE + WRAPPERS[file])
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
