// igemm3_common.cuh -- device primitives of the third-generation (NHWC, tensor-core) implicit
// GEMM: igemm3_fprop.cu and (helper gen3grad) igemm3_dgrad.cu / igemm3_wgrad.cu. Inlined as text
// by the loader. Host side: gpuconv/engines/cuda_igemm3.py; CPU emulation: tests/igemm_host.py.
//
//   cp.async      ig3_cp_async16(smem dst, gmem src, bool valid): 16-byte global->shared copy,
//                 zero-filled (src-size 0, nothing read) when !valid; ig3_cp_commit();
//                 ig3_cp_wait<N>(): all but the newest N committed groups have landed.
//   ldmatrix      ig3_ldsm_x4 / _x2 / _x1 and ig3_ldsm_x4_trans / _x2_trans: warp-collective
//                 8x8 b16 matrix loads from shared memory (lane i gives the row address of row
//                 i % 8 of matrix i / 8; thread t receives row t / 4, elements 2(t%4), 2(t%4)+1).
//   mma.sync      reused from igemm_common.cuh: IgMma16<T>::run (m16n8k16 f16/bf16) and
//                 ig_mma_tf32 (m16n8k8), fp32 accumulate.
//   swizzle       ig3_swz<CPR>(row, chunk): the 16-byte chunk of a shared row of CPR chunks
//                 (CPR = 2, 4, 8) XOR-permuted so that 8 consecutive rows at one logical chunk
//                 fall in 8 distinct 16-byte bank groups: ldmatrix is conflict-free.
//   tap masks     Ig3Taps: a row's (h0, w0) -> two bit masks (bit r: h0 + r*dil_h inside H; bit
//                 s: w0 + s*dil_w inside W), built once per tile; per tap a shift and an AND.
//   k iterator    Ig3KIter: k-iteration = (r, s, c0) with c0 stepping by BK over Cg; advanced by
//                 adds and compares only (the one div/mod is at the start of a split).
// Only inline PTX, no CUDA headers. All pointer offsets are formed in 64 bits.
#ifndef GPUCONV_IGEMM3_COMMON_CUH
#define GPUCONV_IGEMM3_COMMON_CUH

#include "igemm_common.cuh"

#define IG3_MAX_RS 32   // R, S <= 32: a tap mask is one 32-bit word (the host checks)

// The problem, one by-value argument: int32 scalars only (numpy mirror IGEMM3_ARGS_DTYPE in
// gpuconv/engines/cuda_igemm3.py). Sizes from gpuconv.ConvProblem (P, Q never recomputed here).
struct Igemm3Args {
    int N, C, H, W, K, R, S, P, Q;
    int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
    int groups, Cg, Kg;
    int gemm_m, gemm_n, gemm_k;   // per group: N*P*Q, Kg, R*S*Cg (dgrad/wgrad: their own)
    int has_bias;
    int splits;                   // split-K factor (grid.z = groups * splits)
    int iters;                    // k-iterations of the whole reduction (fprop: R*S*ceil(Cg/BK))
    int iters_per_split;          // k-iterations of one split (the last may have fewer)
    int reserved0, reserved1, reserved2;   // unused (dgrad/wgrad: Igemm3GradArgs, igemm3_grad.cuh)
};

// ---- shared-memory addresses -------------------------------------------------------------------
__device__ __forceinline__ unsigned ig3_smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

// ---- cp.async ----------------------------------------------------------------------------------
// 16 bytes global -> shared, L2 only (.cg). valid == false: src-size 0, the 16 bytes are zeroed
// and nothing is read (src must still be a mapped address: callers pass the tensor's base).
__device__ __forceinline__ void ig3_cp_async16(unsigned dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}
__device__ __forceinline__ void ig3_cp_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void ig3_cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- ldmatrix ------------------------------------------------------------------------------------
__device__ __forceinline__ void ig3_ldsm_x4(unsigned* d, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ig3_ldsm_x4_trans(unsigned* d, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ig3_ldsm_x2(unsigned* d, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(d[0]), "=r"(d[1])
                 : "r"(addr));
}
__device__ __forceinline__ void ig3_ldsm_x2_trans(unsigned* d, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
                 : "=r"(d[0]), "=r"(d[1])
                 : "r"(addr));
}
__device__ __forceinline__ void ig3_ldsm_x1(unsigned* d, unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(d[0]) : "r"(addr));
}

// ---- swizzle -------------------------------------------------------------------------------------
// A shared tile of rows of CPR 16-byte chunks; chunk index (row-major, in 16-byte units) of
// logical (row, chunk). 8 rows read by one ldmatrix phase span 8*CPR*16 bytes; the XOR term
// (row / (8/CPR)) % CPR moves the rows that share a 128-byte bank line to distinct chunks.
template <int CPR>
__device__ __forceinline__ int ig3_swz(int row, int chunk) {
    static_assert(CPR == 2 || CPR == 4 || CPR == 8, "rows of 32, 64 or 128 bytes");
#ifdef IG3_MUTATE_NO_SWIZZLE_READ
    return row * CPR + chunk;   // (the fprop kernel's mutation tests redefine the read side)
#else
    return row * CPR + (chunk ^ ((row / (8 / CPR)) & (CPR - 1)));
#endif
}
template <int CPR>
__device__ __forceinline__ int ig3_swz_store(int row, int chunk) {
    return row * CPR + (chunk ^ ((row / (8 / CPR)) & (CPR - 1)));
}

// ---- per-row filter-tap masks (CUTLASS's "optimized" iterator idea) -----------------------------
// For an output pixel with input origin (h0, w0): bit r of mr says 0 <= h0 + r*dil_h < H, bit s
// of ms says 0 <= w0 + s*dil_w < W. A row outside the GEMM gets mr = 0.
struct Ig3Taps {
    unsigned mr, ms;
    __device__ __forceinline__ void build(bool row_ok, int h0, int w0, int H, int W, int R, int S,
                                          int dil_h, int dil_w) {
        mr = 0; ms = 0;
        for (int r = 0; r < R; ++r) mr |= (unsigned)((unsigned)(h0 + r * dil_h) < (unsigned)H) << r;
        for (int s = 0; s < S; ++s) ms |= (unsigned)((unsigned)(w0 + s * dil_w) < (unsigned)W) << s;
        if (!row_ok) mr = 0;
    }
    __device__ __forceinline__ bool ok(int r, int s) const { return (mr >> r) & (ms >> s) & 1u; }
};

// ---- k-iteration counter: it -> (r, s, c0), filter-tap offsets incremental ------------------------
// One k-iteration is BK channels of one filter tap. x offset of tap (r, s) relative to the
// window origin: (r*dil_h*W + s*dil_w) * C elements (64-bit); w offset: (r*S + s)*Cg + c0.
struct Ig3KIter {
    int r, s, c0, rs;           // rs = r*S + s
    long long xoff;             // (r*dil_h*W + s*dil_w) * C
    int Cg, S, BK;
    long long x_step_s, x_step_r;   // +1 in s; wrap of s and +1 in r
    __device__ __forceinline__ void init(int it, int Cg_, int S_, int BK_, int W, int C,
                                         int dil_h, int dil_w) {
        Cg = Cg_; S = S_; BK = BK_;
        const int cb = (Cg + BK - 1) / BK;   // k-iterations per tap
        rs = it / cb;
        c0 = (it - rs * cb) * BK;
        r = rs / S;
        s = rs - r * S;
        x_step_s = (long long)dil_w * C;
        x_step_r = (long long)dil_h * W * C - (long long)(S - 1) * dil_w * C;
        xoff = (long long)r * dil_h * W * C + (long long)s * dil_w * C;
    }
    __device__ __forceinline__ void next() {
        c0 += BK;
        if (c0 < Cg) return;
        c0 = 0;
        ++rs;
        if (++s < S) { xoff += x_step_s; return; }
        s = 0; ++r; xoff += x_step_r;
    }
};

#endif  // GPUCONV_IGEMM3_COMMON_CUH
