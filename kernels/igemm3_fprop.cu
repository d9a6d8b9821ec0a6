// igemm3_fprop.cu -- implicit-GEMM forward convolution, third generation (NHWC, tensor cores).
//
// Contract: x (N, H, W, C), w (K, R, S, Cg), bias (K) or unused, y (N, P, Q, K): physical
// C-contiguous NHWC / KRSC arrays of one dtype T (ig_f16, ig_bf16; float for TF32). P, Q and the
// padding come in Igemm3Args from gpuconv.ConvProblem. Cg % (16 / sizeof(T)) == 0 and x, w
// 16-byte aligned (host checks: gpuconv.engines.cuda_igemm3.supports). y is fully written.
//
//   GEMM per group g:  y[m, g*Kg + n] = sum_k A[m, k] * B[n, k] (+ bias)
//     m = (img, p, q) over N*P*Q, n over Kg, k = (r, s, c) over R*S*Cg, c fastest
//     A[m, (r,s,c)] = x[img, p*sh - ph + r*dh, q*sw - pw + s*dw, g*Cg + c]   (0 in the padding)
//     B[n, (r,s,c)] = w[g*Kg + n, r, s, c]
//   k-iteration = BK channels of one tap (r, s): every thread's 16-byte chunk is one cp.async
//   (zero-filled where the tap is in the padding or c >= Cg); tap validity comes from the
//   per-row masks built once per block (Ig3Taps), the tap's address from Ig3KIter's offsets.
//
// Pipeline: STAGES shared buffers; the prologue issues STAGES-1 k-iterations (one commit group
// each, empty groups included so the counting is uniform); iteration it waits for all but the
// newest STAGES-2 groups (= iteration it has landed), one __syncthreads (data visible to all,
// and every warp is done reading the buffer the next issue overwrites), issues iteration
// it + STAGES - 1 into that buffer, then runs the math on buffer it % STAGES.
// Shared tiles: [row][CPR chunks of 16 bytes], chunk XOR-swizzled (ig3_swz); fragments by
// ldmatrix.x4 (A: rows 0-15 x k 0-15 per call; B, stored [n][k]: two 8-column n tiles), the
// exact mma.sync fragment layouts, for f16/bf16 (m16n8k16) and tf32 (m16n8k8: one b16 pair =
// one fp32). TF32: operands go to the tensor cores as fp32 bits (the mma ignores the low 13
// mantissa bits: truncation, within the TF32 tolerance the tests use).
//
// Split-K (a.splits > 1, deterministic): grid.z = groups * splits; split z covers k-iterations
// [z*iters_per_split, ...) and writes fp32 partials to ws[split][m][K]; igemm3_splitk_reduce
// sums the splits in split order and adds the bias.
//
// Mutation switches (tests/test_igemm3_host_mutations.py compiles the kernel with one defined
// and asserts a wrong result): IG3_MUTATE_STAGE (read the wrong stage), IG3_MUTATE_WAIT (wait
// for one group too few), IG3_MUTATE_NO_BARRIER (no __syncthreads after the wait: caught by
// the host's 'warp_ahead' fiber order), IG3_MUTATE_NO_SWIZZLE_READ (igemm3_common.cuh), IG3_MUTATE_LDSM (A's
// ldmatrix lane -> matrix mapping transposed).
// Variants: IGEMM3_CONFIGS in gpuconv/engines/cuda_igemm3.py (the one list).
#include "igemm3_common.cuh"

template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
struct Ig3Cfg {
    static const int THREADS = 32 * WARPS_M * WARPS_N;
    static const int KV = 16 / (int)sizeof(T);       // elements per 16-byte chunk
    static const int CPR = BK / KV;                   // chunks per shared row
    static const int RSTEP = THREADS / CPR;           // rows between one thread's rows
    static const int A_RPT = BM / RSTEP, B_RPT = BN / RSTEP;
    static const int WM = BM / WARPS_M, WN = BN / WARPS_N;
    static const int MI = WM / 16, NI = WN / 8;
    static const int STAGE_CHUNKS = (BM + BN) * CPR;
    static_assert(MODE == IG_MODE_F16 ? sizeof(T) == 2 : (MODE == IG_MODE_TF32 && sizeof(T) == 4),
                  "f16/bf16 data on m16n8k16, float on m16n8k8 tf32");
    static_assert(CPR == 4 || CPR == 8, "a k-iteration is 64 or 128 bytes of each row");
    static_assert(THREADS % CPR == 0 && BM % RSTEP == 0 && BN % RSTEP == 0 && RSTEP % 8 == 0,
                  "chunks tile the block");
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: 16-row A and 16-column B ldmatrix");
    static_assert(STAGES >= 2, "pipeline");
    static_assert(STAGES * STAGE_CHUNKS * 16 <= 48 * 1024, "static shared memory");
};

// Two adjacent outputs, 8-byte (float) or 4-byte (16-bit) aligned, in one store.
template <typename T>
__device__ __forceinline__ void ig3_store2(T* p, float v0, float v1) {
    if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
        const T h0 = IgNum<T>::from_acc(v0), h1 = IgNum<T>::from_acc(v1);
        *reinterpret_cast<unsigned*>(p) = (unsigned)h0.bits | ((unsigned)h1.bits << 16);
    }
}

template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
__global__ void __launch_bounds__(32 * WARPS_M * WARPS_N, 1)
igemm3_fprop(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
             T* __restrict__ y, float* __restrict__ ws, const Igemm3Args a) {
    typedef Ig3Cfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N, STAGES> Cfg;
    const int CPR = Cfg::CPR, KV = Cfg::KV;
    __shared__ __align__(128) uint4 smem[STAGES * Cfg::STAGE_CHUNKS];
    const unsigned sbase = ig3_smem_addr(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = blockIdx.z % a.groups, split = blockIdx.z / a.groups;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int it0 = split * a.iters_per_split;
    const int niter = max(0, min(a.iters, it0 + a.iters_per_split) - it0);

    // ---- per-tile precomputation: row offsets and tap masks (no div/mod after this) ----
    const int chunk = tid % CPR, row0 = tid / CPR;
    long long a_off[Cfg::A_RPT];
    Ig3Taps a_taps[Cfg::A_RPT];
    const int PQ = a.P * a.Q;
#pragma unroll
    for (int i = 0; i < Cfg::A_RPT; ++i) {
        const int m = m0 + row0 + i * Cfg::RSTEP;
        const bool ok = m < a.gemm_m;
        const int mm = ok ? m : 0;
        const int img = mm / PQ, pq = mm - img * PQ;
        const int p = pq / a.Q, q = pq - p * a.Q;
        const int h0 = p * a.stride_h - a.pad_h, w0 = q * a.stride_w - a.pad_w;
        a_off[i] = (((long long)img * a.H + h0) * a.W + w0) * a.C + (long long)g * a.Cg +
                   chunk * KV;
        a_taps[i].build(ok, h0, w0, a.H, a.W, a.R, a.S, a.dil_h, a.dil_w);
    }
    int b_off[Cfg::B_RPT];   // K * R * S * Cg <= 2^31 - 1 (host: fits_int32)
    unsigned b_ok[Cfg::B_RPT];
#pragma unroll
    for (int i = 0; i < Cfg::B_RPT; ++i) {
        const int n = n0 + row0 + i * Cfg::RSTEP;
        b_ok[i] = n < a.Kg ? 1u : 0u;
        b_off[i] = (g * a.Kg + (b_ok[i] ? n : 0)) * a.gemm_k + chunk * KV;
    }
    // shared byte offsets of this thread's chunks inside a stage (swizzled)
    const unsigned a_dst = (unsigned)ig3_swz_store<CPR>(row0, chunk) * 16u;
    const unsigned b_dst = (unsigned)(BM * CPR + ig3_swz_store<CPR>(row0, chunk)) * 16u;

    Ig3KIter ld;
    ld.init(it0, a.Cg, a.S, BK, a.W, a.C, a.dil_h, a.dil_w);
    auto issue = [&](int stage) {   // branch-free: validity is a bit, the source a select
        const unsigned st = sbase + (unsigned)(stage * Cfg::STAGE_CHUNKS) * 16u;
        const unsigned cok = ld.c0 + chunk * KV < a.Cg ? 1u : 0u;
        const long long xk = ld.xoff + ld.c0;
#pragma unroll
        for (int i = 0; i < Cfg::A_RPT; ++i) {
            const unsigned v = cok & (a_taps[i].mr >> ld.r) & (a_taps[i].ms >> ld.s);
            const long long off = (v & 1u) ? a_off[i] + xk : 0;
            ig3_cp_async16(st + a_dst + (unsigned)(i * Cfg::RSTEP * CPR * 16), x + off, v & 1u);
        }
        const int kb = ld.rs * a.Cg + ld.c0;
#pragma unroll
        for (int i = 0; i < Cfg::B_RPT; ++i) {
            const unsigned v = cok & b_ok[i];
            const int off = v ? b_off[i] + kb : 0;
            ig3_cp_async16(st + b_dst + (unsigned)(i * Cfg::RSTEP * CPR * 16), w + off, v);
        }
        ld.next();
    };

    float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
    for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int wm0 = (warp % WARPS_M) * Cfg::WM, wn0 = (warp / WARPS_M) * Cfg::WN;
    // ldmatrix lane roles: A x4 = (rows 0-7, k lo), (rows 8-15, k lo), (0-7, k hi), (8-15, k hi)
#ifdef IG3_MUTATE_LDSM
    const int a_lrow = (lane & 7) + 8 * (lane >> 4), a_lch = (lane >> 3) & 1;
#else
    const int a_lrow = lane & 15, a_lch = lane >> 4;
#endif
    // B x4 = (n 0-7, k lo), (n 0-7, k hi), (n 8-15, k lo), (n 8-15, k hi)
    const int b_lrow = (lane & 7) + 8 * (lane >> 4), b_lch = (lane >> 3) & 1;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < niter) issue(s);
        ig3_cp_commit();
    }
    int rd = 0, wr = STAGES - 1;
    for (int it = 0; it < niter; ++it) {
#ifdef IG3_MUTATE_WAIT
        ig3_cp_wait<STAGES - 1>();
#else
        ig3_cp_wait<STAGES - 2>();
#endif
#ifndef IG3_MUTATE_NO_BARRIER
        __syncthreads();
#endif
        if (it + STAGES - 1 < niter) issue(wr);
        ig3_cp_commit();
        wr = wr + 1 == STAGES ? 0 : wr + 1;
#ifdef IG3_MUTATE_STAGE
        const int cs = rd + 1 == STAGES ? 0 : rd + 1;
#else
        const int cs = rd;
#endif
        rd = rd + 1 == STAGES ? 0 : rd + 1;
        const unsigned As = sbase + (unsigned)(cs * Cfg::STAGE_CHUNKS) * 16u;
        const unsigned Bs = As + (unsigned)(BM * CPR) * 16u;
#pragma unroll
        for (int kc = 0; kc < CPR; kc += 2) {   // one mma k-step = 2 chunks (16 x 16-bit, 8 x fp32)
            unsigned af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
            for (int i = 0; i < Cfg::MI; ++i)
                ig3_ldsm_x4(af[i], As + (unsigned)ig3_swz<CPR>(wm0 + 16 * i + a_lrow,
                                                               kc + a_lch) * 16u);
#pragma unroll
            for (int j = 0; j < Cfg::NI; j += 2) {
                unsigned t4[4];
                ig3_ldsm_x4(t4, Bs + (unsigned)ig3_swz<CPR>(wn0 + 8 * j + b_lrow,
                                                            kc + b_lch) * 16u);
                bf[j][0] = t4[0]; bf[j][1] = t4[1]; bf[j + 1][0] = t4[2]; bf[j + 1][1] = t4[3];
            }
            ig_warp_mma<T, MODE>(acc, af, bf);
        }
    }
    ig3_cp_wait<0>();

    // ---- epilogue: fused bias (or fp32 partials for the split-K reduce) ----
    // A thread holds columns (2 lt, 2 lt + 1) of each 8-column tile: one paired store (32 bits
    // for 16-bit T, 64 for float) where both are inside and the pair is aligned (col even, K even).
    const int lg = lane >> 2, lt = lane & 3;
    const bool partial = a.splits > 1;
    float* wsp = ws + (partial ? (long long)split * a.gemm_m * a.K : 0);
#pragma unroll
    for (int j = 0; j < Cfg::NI; ++j) {
        const int n = n0 + wn0 + 8 * j + 2 * lt;   // even
        if (n >= a.Kg) continue;
        const int col = g * a.Kg + n;
        const bool two = n + 1 < a.Kg;
        const bool pair = two && ((col | a.K) & 1) == 0;
        float b0 = 0.0f, b1 = 0.0f;
        if (!partial && a.has_bias) {
            b0 = IgNum<T>::to_acc(bias[col]);
            if (two) b1 = IgNum<T>::to_acc(bias[col + 1]);
        }
#pragma unroll
        for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
            for (int e0 = 0; e0 < 2; ++e0) {
                const int m = m0 + wm0 + 16 * i + 8 * e0 + lg;
                if (m >= a.gemm_m) continue;
                const long long o = (long long)m * a.K + col;
                const float v0 = acc[i][j][2 * e0], v1 = acc[i][j][2 * e0 + 1];
                if (partial) {
                    if (pair) { *reinterpret_cast<float2*>(wsp + o) = make_float2(v0, v1); }
                    else { wsp[o] = v0; if (two) wsp[o + 1] = v1; }
                } else if (pair) {
                    ig3_store2(y + o, v0 + b0, v1 + b1);
                } else {
                    y[o] = IgNum<T>::from_acc(v0 + b0);
                    if (two) y[o + 1] = IgNum<T>::from_acc(v1 + b1);
                }
            }
    }
}

// y[m, k] = sum over splits (in order) of ws[split][m][k] + bias[k]; grid-stride over M*K.
template <typename T>
__global__ void igemm3_splitk_reduce(const float* __restrict__ ws, const T* __restrict__ bias,
                                     T* __restrict__ y, const Igemm3Args a) {
    const long long total = (long long)a.gemm_m * a.K;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < a.splits; ++s) v += ws[(long long)s * total + i];
        if (a.has_bias) v += IgNum<T>::to_acc(bias[i % a.K]);
        y[i] = IgNum<T>::from_acc(v);
    }
}
