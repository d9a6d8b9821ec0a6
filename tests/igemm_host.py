"""Run the second-generation CUDA kernels (kernels/igemm_*.cu, winograd.cu, direct_depthwise.cu)
on the CPU, faithfully enough for block-cooperative kernels.

tests/kernel_host.py runs every (block, thread) one after another, which is only valid for
kernels whose threads never talk to each other. The implicit-GEMM kernels share shared-memory
tiles and call __syncthreads, and dw_wgrad reduces through shared memory, so here every thread of
a block is a *fiber* (ucontext) on one OS thread:

- a block's blockDim threads start as fibers; each runs until it reaches __syncthreads (or
  returns); when every fiber of the block has arrived, all are released for the next interval.
  That is a legal CUDA schedule (sequentially consistent, barriers respected; the SIMT kernels
  use no warp-synchronous primitives). The order in which fibers run inside an interval is
  selectable (forward, reverse, seeded shuffle): a race-free kernel gives bitwise the same
  result under every order, so comparing orders detects shared-memory races.
- `__shared__` is `static`; blocks run one after another, so that one copy per instantiation is
  the running block's shared memory. Every such variable (a function-local static, `_ZZ...` in
  the library's symbol table) is filled with 0xFF bytes (NaN as float/double) before every
  block: a kernel that relied on shared memory being zero, or read what it never wrote, produces
  NaN.
- warp-collective ops (mma.sync, ldmatrix) wait for their own warp only (gc::warp_sync), so
  warps run ahead of each other between __syncthreads; the 'warp_ahead' order runs one warp
  alone until it blocks, which turns a missing __syncthreads into a read of poisoned memory.
- __syncthreads reached by only part of a block (divergent barrier: undefined behaviour on a GPU)
  and __ldg of a 16-byte vector at a misaligned address are recorded as errors, which the Python
  side raises after the launch.
- threadIdx/blockIdx/blockDim/gridDim come from the launch: the grid and block the host code of
  gpuconv.engines.cuda_igemm computed (HostKernel mirrors a cupy.RawKernel call).
- Arguments travel as cuLaunchKernel's kernelParams do (an array of pointers to the argument
  values); each kernel reports its parameter sizes, and a launch whose typed NumPy scalars,
  structs (a (1,) structured array) or array element sizes do not match is refused.

Inline PTX: every `asm(...)` statement is rewritten into a call of an emulation in the shim
(emulate_ptx): the cvt conversions (f16, bf16, tf32 rounding) bit-exactly, and mma.sync
(m16n8k16 f16/bf16, m16n8k8 tf32, fp32 accumulate) warp-collectively: each lane deposits its
fragments, a barrier, each lane assembles its warp's A and B from the PTX ISA's fragment tables
(groupID = lane / 4, threadID_in_group = lane % 4) and computes its own D fragment in double
rounded to float. So every instantiation of cuda_igemm.IGEMM_KERNELS runs; the tensor-core ones
are checked against this transcription of the ISA, not against hardware (accumulation order and
rounding inside the tensor core differ).

The shim's basic macros (__global__, __device__, dim3 globals, ...) are kernel_host.SHIM.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import types
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from gpuconv.cuda import kernel_source
from gpuconv.engines import cuda_igemm as ig

from .kernel_host import CXX, SHIM as BASE_SHIM, emulate_ptx

# hidden visibility: each library keeps its own shim state (blockIdx, the fibers, ...) instead of
# sharing one process-wide copy through GNU unique symbols
WORKDIR = os.path.join(tempfile.gettempdir(), "gpuconv-igemm-host")  # the .so cache
CXXFLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-w"]

SHIM = BASE_SHIM + r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>
#define __shared__ static
#define __launch_bounds__(...)
#define GC_EXPORT __attribute__((visibility("default")))
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct __attribute__((aligned(8))) float2 { float x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
using std::min;
using std::max;

namespace gc {
enum { RUN, WAIT, DONE, WARP };   // WAIT: at __syncthreads; WARP: at a warp-collective op
struct Fiber { ucontext_t ctx; int state; long syncs; char* stack; };
const size_t STACK = 256 << 10;
inline ucontext_t sched;
inline std::vector<Fiber> fibers;
inline unsigned cur;
inline void (*body)(void*);
inline void* body_arg;
inline int order = 0;   // 0 forward, 1 reverse, 2 shuffled per interval, 3 (4) warp-ahead: the
                        // first (last) warp with work runs alone until it blocks at __syncthreads
inline unsigned long long seed = 1;
inline long errors = 0;
inline char errmsg[512];
inline long barriers = 0;                 // intervals completed (all blocks), for tests
inline std::vector<std::pair<void*, size_t>> shared_vars;   // registered by the Python side

inline void error(const char* what) {
    if (!errors++)
        snprintf(errmsg, sizeof errmsg, "%s (block %u,%u,%u thread %u)", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x);
}
inline void entry() { body(body_arg); fibers[cur].state = DONE; }

inline void cp_reset(unsigned n);
inline void run_block(unsigned n) {
    if (fibers.size() < n) fibers.resize(n, Fiber{});
    cp_reset(n);
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        if (!f.stack) f.stack = (char*)malloc(STACK);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack;
        f.ctx.uc_stack.ss_size = STACK;
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, (void (*)())entry, 0);
        f.state = RUN;
        f.syncs = 0;
    }
    std::vector<unsigned> perm(n);
    for (;;) {
        for (unsigned i = 0; i < n; ++i) perm[i] = (order == 1 || order == 4) ? n - 1 - i : i;
        if (order == 2)
            for (unsigned i = n; i > 1; --i) {
                seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
                std::swap(perm[i - 1], perm[(seed >> 33) % i]);
            }
        int only = -1;   // warp-ahead: only the first warp (in perm order) that can run
        if (order >= 3)
            for (unsigned i = 0; i < n; ++i)
                if (fibers[perm[i]].state == RUN) { only = (int)(perm[i] / 32); break; }
        for (unsigned i = 0; i < n; ++i) {
            const unsigned t = perm[i];
            if (fibers[t].state != RUN || (only >= 0 && (int)(t / 32) != only)) continue;
            cur = t;
            threadIdx.x = t % blockDim.x;
            threadIdx.y = (t / blockDim.x) % blockDim.y;
            threadIdx.z = t / (blockDim.x * blockDim.y);
            swapcontext(&sched, &fibers[t].ctx);
        }
        // a warp whose lanes all reached a warp-collective op goes on, whatever other warps do
        bool released = false;
        for (unsigned w0 = 0; w0 < n; w0 += 32) {
            const unsigned w1 = std::min(n, w0 + 32);
            unsigned at = 0, live = 0;
            for (unsigned t = w0; t < w1; ++t) {
                live += fibers[t].state != DONE;
                at += fibers[t].state == WARP;
            }
            if (!at || at != live) continue;
            if (live != w1 - w0) error("warp-collective op reached by only part of a warp");
            for (unsigned t = w0; t < w1; ++t)
                if (fibers[t].state == WARP) fibers[t].state = RUN;
            released = true;
        }
        if (released) continue;
        unsigned waiting = 0, done = 0, running = 0, warp = 0;
        for (unsigned t = 0; t < n; ++t) {
            const int st = fibers[t].state;
            (st == WAIT ? waiting : st == DONE ? done : st == RUN ? running : warp) += 1;
        }
        if (running) continue;   // warp-ahead: the other warps' turn
        if (warp) {   // lanes at a warp op while the rest of their warp waits at a barrier
            error("warp-collective op reached by only part of a warp");
            break;
        }
        if (!waiting) break;
        ++barriers;
        if (done) error("__syncthreads reached by only part of the block");
        for (unsigned t = 0; t < n; ++t)
            if (fibers[t].state == WAIT) fibers[t].state = RUN;
    }
}

template <class... A, size_t... I>
void call(void (*f)(A...), void** argv, std::index_sequence<I...>) {
    f(*reinterpret_cast<std::decay_t<A>*>(argv[I])...);
}

template <class... A>
void launch(void (*f)(A...), const unsigned* grid, const unsigned* block, void** argv) {
    struct Ctx { void (*f)(A...); void** argv; } c{f, argv};
    body = [](void* p) {
        Ctx* c = (Ctx*)p;
        call(c->f, c->argv, std::index_sequence_for<A...>{});
    };
    body_arg = &c;
    gridDim.x = grid[0]; gridDim.y = grid[1]; gridDim.z = grid[2];
    blockDim.x = block[0]; blockDim.y = block[1]; blockDim.z = block[2];
    for (unsigned z = 0; z < grid[2]; ++z)
        for (unsigned y = 0; y < grid[1]; ++y)
            for (unsigned x = 0; x < grid[0]; ++x) {
                blockIdx.x = x; blockIdx.y = y; blockIdx.z = z;
                for (auto& v : shared_vars) memset(v.first, 0xFF, v.second);
                run_block(block[0] * block[1] * block[2]);
            }
}

// Parameter signature: sizeof(value) for a by-value parameter, 1000 + sizeof(*p) for a pointer.
template <class P> constexpr int param_code() {
    typedef std::decay_t<P> D;
    if constexpr (std::is_pointer_v<D>) return 1000 + (int)sizeof(std::remove_pointer_t<D>);
    else return (int)sizeof(D);
}
template <class... A> int signature(void (*)(A...), int* out) {
    int i = 0;
    ((out[i++] = param_code<A>()), ...);
    return (int)sizeof...(A);
}
}  // namespace gc

inline void __syncthreads() {
    gc::Fiber& f = gc::fibers[gc::cur];
    ++f.syncs;
    f.state = gc::WAIT;
    swapcontext(&f.ctx, &gc::sched);
}
namespace gc {
// the barrier of a warp-collective op (mma.sync, ldmatrix): waits for the 32 lanes of this warp
// only, so warps run ahead of each other between __syncthreads as on a GPU
inline void warp_sync() {
    Fiber& f = fibers[cur];
    ++f.syncs;
    f.state = WARP;
    swapcontext(&f.ctx, &sched);
}
}  // namespace gc
template <class T> inline T __ldg(const T* p) {
    if ((uintptr_t)p % alignof(T)) gc::error("__ldg at a misaligned address");
    return *p;
}

// ---- mma.sync of igemm_common.cuh, emulated (the cvt ones are kernel_host.SHIM's) ----
namespace gc {
// mma.sync is warp-collective: every lane deposits its fragments, a barrier, every lane builds
// its warp's A and B from the PTX ISA's fragment tables and computes its own D. Deposits
// alternate between two slot sets: a lane can only reach the next-but-one mma (same set) after
// the next barrier, which every lane passes only after computing this one. The barrier is the
// warp's own (gc::warp_sync): the other warps need not be there.
struct MmaSlot { unsigned a[4], b[2]; };
inline std::vector<MmaSlot> mma_slots;   // [2][threads]
inline float h16(unsigned w, int e, int kind) {   // element e (low half first) of a b32 word
    const unsigned short h = (unsigned short)(w >> (16 * e));
    if (kind == 1) return __uint_as_float((unsigned)h << 16);   // bf16
    _Float16 x;
    memcpy(&x, &h, 2);
    return x;
}
inline float tf32(unsigned w) { return __uint_as_float(w & 0xffffe000u); }   // low bits ignored
template <int KIND>   // 0: m16n8k16 f16, 1: m16n8k16 bf16, 2: m16n8k8 tf32; D, C f32
inline void mma(float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1,
                unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (mma_slots.size() < 2 * n) mma_slots.resize(2 * n);
    const unsigned set = (fibers[cur].syncs & 1) * n;   // syncs: this thread's barriers so far
    mma_slots[set + tid] = MmaSlot{{a0, a1, a2, a3}, {b0, b1}};
    warp_sync();
    float A[16][16], B[16][8];
    const unsigned warp0 = set + (tid & ~31u), g = (tid & 31) >> 2, t = tid & 3;
    for (unsigned l = 0; l < 32; ++l) {   // groupID gl, threadID_in_group tl
        const MmaSlot& o = mma_slots[warp0 + l];
        const unsigned gl = l >> 2, tl = l & 3;
        if (KIND == 2) {
            A[gl][tl] = tf32(o.a[0]); A[gl + 8][tl] = tf32(o.a[1]);
            A[gl][tl + 4] = tf32(o.a[2]); A[gl + 8][tl + 4] = tf32(o.a[3]);
            B[tl][gl] = tf32(o.b[0]); B[tl + 4][gl] = tf32(o.b[1]);
        } else {
            for (int e = 0; e < 2; ++e) {
                A[gl][2 * tl + e] = h16(o.a[0], e, KIND);
                A[gl + 8][2 * tl + e] = h16(o.a[1], e, KIND);
                A[gl][2 * tl + 8 + e] = h16(o.a[2], e, KIND);
                A[gl + 8][2 * tl + 8 + e] = h16(o.a[3], e, KIND);
                B[2 * tl + e][gl] = h16(o.b[0], e, KIND);
                B[2 * tl + 8 + e][gl] = h16(o.b[1], e, KIND);
            }
        }
    }
    float* d[4] = {&d0, &d1, &d2, &d3};
    for (int i = 0; i < 4; ++i) {   // c0, c1: row g; c2, c3: row g + 8; columns 2t, 2t + 1
        const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        double acc = *d[i];
        for (int k = 0; k < (KIND == 2 ? 8 : 16); ++k) acc += (double)A[row][k] * B[k][col];
        *d[i] = (float)acc;
    }
}
}  // namespace gc
#define GC_MMA_ARGS float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1, \
    unsigned a2, unsigned a3, unsigned b0, unsigned b1
#define GC_MMA_CALL d0, d1, d2, d3, a0, a1, a2, a3, b0, b1
inline void gc_ptx_mma_sync_aligned_m16n8k16_row_col_f32_f16_f16_f32(GC_MMA_ARGS) {
    gc::mma<0>(GC_MMA_CALL);
}
inline void gc_ptx_mma_sync_aligned_m16n8k16_row_col_f32_bf16_bf16_f32(GC_MMA_ARGS) {
    gc::mma<1>(GC_MMA_CALL);
}
inline void gc_ptx_mma_sync_aligned_m16n8k8_row_col_f32_tf32_tf32_f32(GC_MMA_ARGS) {
    gc::mma<2>(GC_MMA_CALL);
}

// ---- cp.async, ldmatrix, __cvta_generic_to_shared of igemm3_common.cuh, emulated ----
// Shared addresses are 32-bit offsets from an anchor in this library's static storage (where
// every __shared__ variable lives): __cvta_generic_to_shared(p) = p - anchor, gc::smem(a) back.
inline char gc_shared_anchor[16];
inline size_t __cvta_generic_to_shared(const void* p) {
    return (size_t)((const char*)p - gc_shared_anchor);
}
namespace gc {
inline unsigned char* smem(unsigned a) { return (unsigned char*)gc_shared_anchor + (int)a; }
inline long cp_async_issued = 0, cp_async_landed = 0, ldmatrix_calls = 0;   // for tests
// cp.async: a copy is RECORDED at issue (its source bytes read then) and lands in shared memory
// only at the cp.async.wait_group that retires its group; the destination is poisoned (0xFF:
// NaN as f16/bf16/f32) at issue, so a read before the matching wait sees NaN.
struct CpCopy { unsigned char* dst; unsigned char data[16]; };
struct CpThread { std::vector<CpCopy> open; std::vector<std::vector<CpCopy>> groups; };
inline std::vector<CpThread> cp_threads;
inline unsigned tid_flat() {
    return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
inline void cp_reset(unsigned n) {   // a block starts with nothing in flight
    cp_threads.assign(n, CpThread{});
}
inline void cp_land(std::vector<CpCopy>& g) {
    for (auto& c : g) { memcpy(c.dst, c.data, 16); ++cp_async_landed; }
}
}  // namespace gc
inline void gc_ptx_cp_async_cg_shared_global(unsigned dst, const void* src, int src_size) {
    unsigned char* d = gc::smem(dst);
    if ((uintptr_t)d % 16 || (src_size && (uintptr_t)src % 16))
        gc::error("cp.async of 16 bytes at a misaligned address");
    if (src_size != 0 && src_size != 16) gc::error("cp.async src-size must be 0 or 16 here");
    gc::CpCopy c;
    c.dst = d;
    memset(c.data, 0, 16);                      // src-size 0: zero-fill, nothing read
    if (src_size) memcpy(c.data, src, src_size);
    memset(d, 0xFF, 16);                        // poisoned until the matching wait
    gc::cp_threads[gc::tid_flat()].open.push_back(c);
    ++gc::cp_async_issued;
}
inline void gc_ptx_cp_async_commit_group() {
    gc::CpThread& t = gc::cp_threads[gc::tid_flat()];
    t.groups.push_back(std::move(t.open));
    t.open.clear();
}
inline void gc_ptx_cp_async_wait_group(int n) {   // all but the newest n committed groups land
    gc::CpThread& t = gc::cp_threads[gc::tid_flat()];
    while ((int)t.groups.size() > n) {
        gc::cp_land(t.groups.front());
        t.groups.erase(t.groups.begin());
    }
}
namespace gc {
// ldmatrix is warp-collective, like mma: every lane deposits its row address, a barrier, every
// lane reads its fragments (same two-slot-set scheme as mma_slots). PTX ISA: for .xN, lane i
// (i < 8N) gives the address of row i % 8 of matrix i / 8 (16 bytes, 16-byte aligned); thread t
// receives, of each matrix j, register d_j = row t / 4, b16 elements 2(t%4), 2(t%4)+1; with
// .trans the matrix is transposed: d_j = elements (row 2(t%4), col t/4), (row 2(t%4)+1, col t/4).
inline std::vector<unsigned> ldsm_slots;   // [2][threads]
inline void ldmatrix(unsigned* d, int num, bool trans, unsigned addr) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z, tid = tid_flat();
    if (ldsm_slots.size() < 2 * n) ldsm_slots.resize(2 * n);
    const unsigned set = (fibers[cur].syncs & 1) * n;
    ldsm_slots[set + tid] = addr;
    if (addr % 16) error("ldmatrix row address not 16-byte aligned");
    warp_sync();
    ++ldmatrix_calls;
    const unsigned warp0 = set + (tid & ~31u), t = tid & 31;
    for (int j = 0; j < num; ++j) {
        unsigned short h[2];
        for (int e = 0; e < 2; ++e) {
            unsigned row, col;   // element (row, col) of matrix j, col in b16 units
            if (trans) { row = 2 * (t % 4) + e; col = t / 4; }
            else { row = t / 4; col = 2 * (t % 4) + e; }
            memcpy(&h[e], smem(ldsm_slots[warp0 + 8 * j + row]) + 2 * col, 2);
        }
        d[j] = (unsigned)h[0] | ((unsigned)h[1] << 16);
    }
}
}  // namespace gc
inline void gc_ptx_ldmatrix_sync_aligned_m8n8_x4_shared_b16(unsigned& d0, unsigned& d1,
                                                           unsigned& d2, unsigned& d3, unsigned a) {
    unsigned d[4]; gc::ldmatrix(d, 4, false, a); d0 = d[0]; d1 = d[1]; d2 = d[2]; d3 = d[3];
}
inline void gc_ptx_ldmatrix_sync_aligned_m8n8_x4_trans_shared_b16(unsigned& d0, unsigned& d1,
                                                                 unsigned& d2, unsigned& d3,
                                                                 unsigned a) {
    unsigned d[4]; gc::ldmatrix(d, 4, true, a); d0 = d[0]; d1 = d[1]; d2 = d[2]; d3 = d[3];
}
inline void gc_ptx_ldmatrix_sync_aligned_m8n8_x2_shared_b16(unsigned& d0, unsigned& d1, unsigned a) {
    unsigned d[2]; gc::ldmatrix(d, 2, false, a); d0 = d[0]; d1 = d[1];
}
inline void gc_ptx_ldmatrix_sync_aligned_m8n8_x2_trans_shared_b16(unsigned& d0, unsigned& d1,
                                                                 unsigned a) {
    unsigned d[2]; gc::ldmatrix(d, 2, true, a); d0 = d[0]; d1 = d[1];
}
inline void gc_ptx_ldmatrix_sync_aligned_m8n8_x1_shared_b16(unsigned& d0, unsigned a) {
    gc::ldmatrix(&d0, 1, false, a);
}
extern "C" GC_EXPORT long gc_cp_async_issued() { return gc::cp_async_issued; }
extern "C" GC_EXPORT long gc_cp_async_landed() { return gc::cp_async_landed; }
extern "C" GC_EXPORT long gc_ldmatrix_calls() { return gc::ldmatrix_calls; }

extern "C" GC_EXPORT void gc_set_order(int order, unsigned long long seed) {
    gc::order = order;
    gc::seed = seed;
}
extern "C" GC_EXPORT long gc_take_errors(char* buf, int size) {
    long e = gc::errors;
    if (e) snprintf(buf, size, "%s", gc::errmsg);
    gc::errors = 0;
    return e;
}
extern "C" GC_EXPORT long gc_barriers() { return gc::barriers; }
extern "C" GC_EXPORT void gc_add_shared(void* p, size_t n) { gc::shared_vars.emplace_back(p, n); }
"""

def _source(text, names):
    lines = [SHIM, text, "// ---- entry points ----"]
    for i, n in enumerate(names):
        lines.append(f'extern "C" GC_EXPORT void gck_{i}(const unsigned* g, const unsigned* b, '
                     f"void** a) {{ gc::launch(&{n}, g, b, a); }}")
        lines.append(f'extern "C" GC_EXPORT int gck_{i}_sig(int* out) '
                     f"{{ return gc::signature(&{n}, out); }}")
    return "\n".join(lines) + "\n"


class Library:
    """One host-compiled kernel file: its instantiations by name."""

    def __init__(self, file, so, names):
        self.file, self.names = file, names
        self.dll = ctypes.CDLL(so)
        self.dll.gc_take_errors.restype = ctypes.c_long
        self.dll.gc_barriers.restype = ctypes.c_long
        self.index = {n: i for i, n in enumerate(names)}
        self.shared = _register_shared(self.dll, so)


def _register_shared(dll, so):
    """Hand the addresses of the kernels' __shared__ variables (function-local statics) to the
    library, which poisons them before every block. Returns their names."""
    syms = {}
    for line in subprocess.run(["nm", "-S", "--defined-only", so], capture_output=True,
                               text=True, check=True).stdout.splitlines():
        f = line.split()
        if len(f) == 4:
            syms[f[3]] = (int(f[0], 16), int(f[1], 16), f[2])
    base = ctypes.cast(dll.gck_0, ctypes.c_void_p).value - syms["gck_0"][0]
    out = []
    for name, (addr, size, kind) in syms.items():
        if name.startswith("_ZZ") and kind in "bBuUdD":
            dll.gc_add_shared(ctypes.c_void_p(base + addr), ctypes.c_size_t(size))
            out.append(name)
    return out


_libs: dict = {}


def compile_source(label, text, names, workdir=WORKDIR):
    """Compile kernel text with the shim and entry points for `names`; returns a Library.
    Cached by content in `workdir`, so a later session with the same sources reuses it."""
    src = _source(text, names)
    key = hashlib.sha256((src + " ".join(CXXFLAGS)).encode()).hexdigest()[:16]
    so = os.path.join(workdir, f"{label}-{key}.so")
    if not os.path.exists(so):  # cached by content: a later session reuses it
        os.makedirs(workdir, exist_ok=True)
        cpp = f"{so[:-3]}.{os.getpid()}.cpp"   # per process: two sessions may build at once
        with open(cpp, "w", encoding="utf-8") as f:
            f.write(src)
        tmp = f"{so}.{os.getpid()}.tmp"
        r = subprocess.run([CXX, *CXXFLAGS, "-o", tmp, cpp], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"host build of {label} failed:\n{r.stderr[-6000:]}")
        os.replace(tmp, so)
    return Library(label, so, names)


def build(workdir=WORKDIR):
    """Compile every kernel file (two g++ at a time); returns {file: Library}."""
    os.makedirs(workdir, exist_ok=True)
    todo = [f for f, _ in ig.IGEMM_KERNELS if f not in _libs]
    with ThreadPoolExecutor(max_workers=2) as ex:
        built = ex.map(lambda f: compile_source(f[:-3], emulate_ptx(kernel_source(f)),
                                                dict(ig.IGEMM_KERNELS)[f], workdir), todo)
        _libs.update(zip(todo, built))
    return _libs


def build3(defines=(), workdir=WORKDIR):
    """Compile the third-generation kernel files (cuda_igemm3.IGEMM3_KERNELS) for the host, with
    `defines` (e.g. the kernels' IG3_MUTATE_* switches) #defined first; returns
    {file: Library}. Cached by content like build()."""
    from gpuconv.engines import cuda_igemm3 as ig3
    os.makedirs(workdir, exist_ok=True)
    out = {}
    for f, names in ig3.IGEMM3_KERNELS:
        label = f[:-3] + "".join("-" + d for d in defines)
        if label not in _libs:
            text = "".join(f"#define {d}\n" for d in defines) + kernel_source(f)
            _libs[label] = compile_source(label, emulate_ptx(text), names, workdir)
        out[f] = _libs[label]
    return out


def install3(monkeypatch, libs, sm_count=132):
    """Route cuda_igemm3's launches to the CPU through the Libraries `libs` (build3's result)."""
    from gpuconv.engines import cuda_igemm3 as ig3
    by_name = {n: lib for lib in libs.values() for n in lib.names}
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(ig3, "get_kernel", lambda name: HostKernel(name, by_name[name]))
    monkeypatch.setattr(ig3, "_current_sm_count", lambda: sm_count)
    reset()


def counters(lib):
    """(cp.async issued, cp.async landed, ldmatrix calls) of one Library so far."""
    d = lib.dll
    for f in (d.gc_cp_async_issued, d.gc_cp_async_landed, d.gc_ldmatrix_calls):
        f.restype = ctypes.c_long
    return d.gc_cp_async_issued(), d.gc_cp_async_landed(), d.gc_ldmatrix_calls()


def set_order(order, seed=1):
    """Fiber order inside each barrier interval: 'forward', 'reverse', 'shuffle', or
    'warp_ahead' ('warp_ahead_reverse'): the first (last) warp with work runs alone through its
    warp-collective ops until it blocks at __syncthreads -- a legal schedule that exposes a
    missing block barrier (a warp reading shared data other warps have not produced yet)."""
    code = {"forward": 0, "reverse": 1, "shuffle": 2, "warp_ahead": 3,
            "warp_ahead_reverse": 4}[order]
    for lib in _libs.values():
        lib.dll.gc_set_order(code, ctypes.c_ulonglong(seed))


def barriers():
    """Barrier intervals completed so far, over all files."""
    return sum(lib.dll.gc_barriers() for lib in _libs.values())


launches: list = []  # (name, grid, block, [struct arguments]) since reset()


class HostKernel:
    """A cupy.RawKernel stand-in: kernel(grid, block, args) runs it on the CPU."""

    grid_cap = None  # set: grid-stride kernels (1-D grids) get at most this many blocks

    def __init__(self, name, lib=None):
        lib = lib or _libs[next(f for f, ns in ig.IGEMM_KERNELS if name in ns)]
        self.name, self.lib = name, lib
        i = lib.index[name]
        self.fn = getattr(lib.dll, f"gck_{i}")
        sig = (ctypes.c_int * 16)()
        self.sig = list(sig[:getattr(lib.dll, f"gck_{i}_sig")(sig)])

    def __call__(self, grid, block, args):
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        block = tuple(int(b) for b in block) + (1,) * (3 - len(block))
        if self.grid_cap and grid[1:] == (1, 1) and not self.name.startswith("dw_wgrad"):
            grid = (min(grid[0], self.grid_cap), 1, 1)
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} args for {self.sig}"
        keep, argv = [], (ctypes.c_void_p * len(args))()
        for i, (a, code) in enumerate(zip(args, self.sig)):
            if isinstance(a, np.ndarray) and a.dtype.names is None:  # a device array
                assert code > 1000, f"{self.name}: array for by-value parameter {i}"
                assert a.dtype.itemsize == code - 1000, \
                    f"{self.name}: parameter {i} wants {code - 1000}-byte elements, got {a.dtype}"
                assert a.flags.c_contiguous, f"{self.name}: non-contiguous array parameter {i}"
                v = ctypes.c_void_p(a.ctypes.data)
                keep.append(v)
                argv[i] = ctypes.addressof(v)
            elif isinstance(a, np.ndarray):  # a struct, (1,) structured array, passed by value
                assert a.shape == (1,) and a.itemsize == code, \
                    f"{self.name}: struct parameter {i} is {code} bytes, got {a.itemsize}"
                argv[i] = a.ctypes.data
            elif isinstance(a, np.generic):  # a typed scalar (a Python int would be refused)
                assert a.itemsize == code, \
                    f"{self.name}: parameter {i} is {code} bytes, got {type(a).__name__}"
                v = np.array(a)
                keep.append(v)
                argv[i] = v.ctypes.data
            else:
                raise TypeError(f"{self.name}: untyped kernel argument {a!r}")
        launches.append((self.name, grid, block,
                         [a.copy() for a in args if isinstance(a, np.ndarray) and a.dtype.names]))
        self.fn((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), argv)
        buf = ctypes.create_string_buffer(512)
        if self.lib.dll.gc_take_errors(buf, 512):
            raise AssertionError(f"{self.name}: {buf.value.decode()}")


# ---- device arrays: NumPy arrays with guard bands, and a minimal `cupy` module --------------
GUARD = 64  # elements of NaN before and after every device array


class DevArray(np.ndarray):
    """A NumPy array that answers `.data.ptr` like a cupy.ndarray."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


_allocs: list = []  # (guarded buffer, start, size) of every device array since reset()


def empty(shape, dtype, offset=0):
    """A NaN-filled device array inside NaN guard bands (`offset` elements into the buffer:
    an odd offset makes a misaligned base)."""
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    n = int(np.prod(shape))
    buf = np.full(2 * GUARD + n + offset, np.nan, dtype)
    start = GUARD + offset
    _allocs.append((buf, start, n))
    return buf[start:start + n].reshape(shape).view(DevArray)


def to_device(a, offset=0):
    out = empty(a.shape, a.dtype, offset)
    out[...] = a
    return out


def check_guards():
    """Assert that no kernel wrote outside its arrays since reset()."""
    for buf, start, n in _allocs:
        assert np.isnan(buf[:start]).all() and np.isnan(buf[start + n:]).all(), \
            "a kernel wrote outside an array (guard band overwritten)"


def reset():
    _allocs.clear()
    launches.clear()


def fake_cupy():
    """The parts of CuPy cuda_igemm's host code uses: empty (NaN-filled, guarded) and matmul
    (NumPy's, in the operands' dtype, standing in for cuBLAS)."""
    return types.SimpleNamespace(__name__="cupy", empty=empty,
                                 matmul=lambda a, b: np.matmul(a, b).view(DevArray))


def install(monkeypatch, sm_count=132):
    """Route cuda_igemm's launches to the CPU: get_kernel -> HostKernel, `import cupy` -> the
    fake module, the SM count (split-K sizing) -> sm_count."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(ig, "get_kernel", HostKernel)
    monkeypatch.setattr(ig, "_current_sm_count", lambda: sm_count)
    reset()
