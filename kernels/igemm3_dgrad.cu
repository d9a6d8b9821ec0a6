// igemm3_dgrad.cu -- implicit-GEMM data gradient, third generation (NHWC, tensor cores).
//
// Contract: w (K, R, S, Cg), dy (N, P, Q, K), dx (N, H, W, C): physical C-contiguous arrays of
// one dtype T (ig_f16, ig_bf16; float for TF32), 16-byte aligned, K % (16 / sizeof(T)) == 0
// and Cg % (16 / sizeof(T)) == 0 (host: gpuconv.engines.cuda_igemm3.Igemm3Dgrad.supports).
//
// Stride phases (CUTLASS's "strided dgrad"): dx[h] receives dy[p] through tap r only where
// h + pad_h - r*dil_h = p*stride_h. The output pixels split into stride_h*stride_w phases by
// (h + pad_h) % stride_h and (w + pad_w) % stride_w; in one phase the contributing taps are a
// fixed arithmetic progression r = ph_r0 + a*ph_rstep (and s likewise), and dy row p of phase
// row i under tap a is i + ph_p0 - a*ph_dp: a stride-1 convolution over dy with "dilation"
// -ph_dp. The host launches one grid per phase (Igemm3GradArgs ph_*). Per phase and group g:
//
//   dx[img, h(i), w(j), g*Cg + n] = sum_k A[m, k] * B[k, n]      m = (img, i, j), n over Cg
//     k = (a, b, kc) over nr*ns*Kg, kc fastest
//     A[m, (a,b,kc)] = dy[img, i + ph_p0 - a*ph_dp, j + ph_q0 - b*ph_dq, g*Kg + kc]  (0 outside)
//     B[(a,b,kc), n] = w[g*Kg + kc, ph_r0 + a*ph_rstep, ph_s0 + b*ph_sstep, n]
//   A is fprop's operand (rows m, 16-byte chunks along kc; Ig3Taps masks, Ig3KIter offsets);
//   B is stored [kc][n] (chunks along c, the weight's contiguous axis) and read by
//   ldmatrix.trans (tf32: 32-bit shared loads), igemm3_grad.cuh. A phase with no taps writes 0.
//
// Pipeline and split-K as igemm3_fprop.cu: STAGES cp.async buffers, one commit group per
// k-iteration, wait<STAGES-2> + one __syncthreads per iteration. Split-K (a.splits > 1): split
// z writes fp32 partials ws[split][pixel][C] of its k-iterations (a split with none writes
// zeros); igemm3_splitk_reduce<T> (igemm3_fprop.cu) sums them in split order over all of dx.
//
// Mutation switches (tests/test_igemm3_host_grad.py): IG3D_MUTATE_TAP (the weight tap of the
// phase's first tap index, whatever the index), IG3D_MUTATE_STAGE (read the next stage).
#include "igemm3_grad.cuh"

template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
__global__ void IG3G_MAXNREG(240)
igemm3_dgrad(const T* __restrict__ w, const T* __restrict__ dy, T* __restrict__ dx,
             float* __restrict__ ws, const Igemm3GradArgs a) {
    typedef Ig3GradCfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N, STAGES> Cfg;
    const int KCH = Cfg::KCH, KV = Cfg::KV, NCH = Cfg::NCH;
    const int A_RSTEP = Cfg::THREADS / KCH, A_RPT = BM / A_RSTEP;   // A: [BM][KCH]
    const int B_RSTEP = Cfg::THREADS / NCH, B_RPT = BK / B_RSTEP;   // B: [BK][NCH]
    static_assert(Cfg::THREADS % NCH == 0 && BK % B_RSTEP == 0 && BM % A_RSTEP == 0, "tiling");
    const int A_CHUNKS = BM * KCH, STAGE_CHUNKS = (BM + BK * NCH / KCH) * KCH;
    static_assert(STAGES * STAGE_CHUNKS * 16 <= 48 * 1024, "static shared memory");
    __shared__ __align__(128) uint4 smem[STAGES * STAGE_CHUNKS];
    const unsigned sbase = ig3_smem_addr(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = blockIdx.z % a.groups, split = blockIdx.z / a.groups;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int it0 = split * a.iters_per_split;
    const int niter = max(0, min(a.iters, it0 + a.iters_per_split) - it0);

    // ---- A (dy) rows: offsets and tap masks over the phase's taps ----
    const int achunk = tid % KCH, arow0 = tid / KCH;
    long long a_off[A_RPT];
    Ig3Taps a_taps[A_RPT];
    const int phw = a.ph_H * a.ph_W;
#pragma unroll
    for (int i = 0; i < A_RPT; ++i) {
        const int m = m0 + arow0 + i * A_RSTEP;
        const bool ok = m < a.gemm_m;
        const int mm = ok ? m : 0;
        const int img = mm / phw, ij = mm - img * phw;
        const int pi = ij / a.ph_W, pj = ij - pi * a.ph_W;
        const int p0 = pi + a.ph_p0, q0 = pj + a.ph_q0;
        a_off[i] = (((long long)img * a.P + p0) * a.Q + q0) * a.K + (long long)g * a.Kg +
                   achunk * KV;
        a_taps[i].build(ok, p0, q0, a.P, a.Q, a.ph_nr, a.ph_ns, -a.ph_dp, -a.ph_dq);
    }
    // ---- B (w) rows kc, columns n: w[(g*Kg + kc)*RSCg + tap*Cg + n] ----
    const int bchunk = tid % NCH, brow0 = tid / NCH;
    const int RSCg = a.R * a.S * a.Cg;
    const unsigned bcol_ok = n0 + bchunk * KV < a.Cg ? 1u : 0u;
    const int b_base = g * a.Kg * RSCg + n0 + bchunk * KV;
    const unsigned a_dst = (unsigned)ig3_swz_store<KCH>(arow0, achunk) * 16u;
    // row i's chunk: a constant step from row 0's where B_RSTEP % 8 == 0 (same XOR term),
    // else its own swizzle (tf32 128x128: 4 rows apart)
    const unsigned b_dst0 = (unsigned)A_CHUNKS * 16u + ig3_kn_store<BK>(brow0, bchunk);
    auto b_dst = [&](int i) -> unsigned {
        if constexpr (B_RSTEP % 8 == 0) return b_dst0 + (unsigned)(i * B_RSTEP * 8 * 16);
        else return (unsigned)A_CHUNKS * 16u + ig3_kn_store<BK>(brow0 + i * B_RSTEP, bchunk);
    };

    Ig3KIter ld;   // (tap a = ld.r, tap b = ld.s, kc block ld.c0) of the phase
    ld.init(it0, a.Kg, a.ph_ns > 0 ? a.ph_ns : 1, BK, a.Q, a.K, -a.ph_dp, -a.ph_dq);   // ns 0: no iterations
    auto issue = [&](int stage) {
        const unsigned st = sbase + (unsigned)(stage * STAGE_CHUNKS) * 16u;
        const unsigned cok = ld.c0 + achunk * KV < a.Kg ? 1u : 0u;
        const long long xk = ld.xoff + ld.c0;
#pragma unroll
        for (int i = 0; i < A_RPT; ++i) {
            const unsigned v = cok & (a_taps[i].mr >> ld.r) & (a_taps[i].ms >> ld.s);
            const long long off = (v & 1u) ? a_off[i] + xk : 0;
            ig3_cp_async16(st + a_dst + (unsigned)(i * A_RSTEP * KCH * 16), dy + off, v & 1u);
        }
#ifdef IG3D_MUTATE_TAP
        const int r = a.ph_r0, s = a.ph_s0;
#else
        const int r = a.ph_r0 + ld.r * a.ph_rstep, s = a.ph_s0 + ld.s * a.ph_sstep;
#endif
        const int kb = b_base + ld.c0 * RSCg + (r * a.S + s) * a.Cg;
#pragma unroll
        for (int i = 0; i < B_RPT; ++i) {
            const int kc = ld.c0 + brow0 + i * B_RSTEP;
            const unsigned v = bcol_ok & (kc < a.Kg ? 1u : 0u);
            const int off = v ? kb + (brow0 + i * B_RSTEP) * RSCg : 0;
            ig3_cp_async16(st + b_dst(i), w + off, v);
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
    const int a_lrow = lane & 15, a_lch = lane >> 4;   // A x4: (0-7, k lo), (8-15, lo), ...

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < niter) issue(s);
        ig3_cp_commit();
    }
    int rd = 0, wr = STAGES - 1;
    for (int it = 0; it < niter; ++it) {
        ig3_cp_wait<STAGES - 2>();
        __syncthreads();
        if (it + STAGES - 1 < niter) issue(wr);
        ig3_cp_commit();
        wr = wr + 1 == STAGES ? 0 : wr + 1;
#ifdef IG3D_MUTATE_STAGE
        const int cs = rd + 1 == STAGES ? 0 : rd + 1;
#else
        const int cs = rd;
#endif
        rd = rd + 1 == STAGES ? 0 : rd + 1;
        const unsigned As = sbase + (unsigned)(cs * STAGE_CHUNKS) * 16u;
        const unsigned Bs = As + (unsigned)A_CHUNKS * 16u;
        const uint4* Bp = smem + cs * STAGE_CHUNKS + A_CHUNKS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += Cfg::KSTEP) {
            const int kc = kk / KV;   // chunk of the k-step in A's rows
            unsigned af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
            for (int i = 0; i < Cfg::MI; ++i)
                ig3_ldsm_x4(af[i], As + (unsigned)ig3_swz<KCH>(wm0 + 16 * i + a_lrow,
                                                               kc + a_lch) * 16u);
#pragma unroll
            for (int j = 0; j < Cfg::NI; j += 2)
                ig3_kn_bfrag<T, MODE, BK>(bf[j], bf[j + 1], Bs, Bp, kk, wn0 + 8 * j, lane);
            ig_warp_mma<T, MODE>(acc, af, bf);
        }
    }
    ig3_cp_wait<0>();

    // ---- epilogue: dx pixel of each row (or fp32 partials ws[split][pixel][C]) ----
    const int lg = lane >> 2, lt = lane & 3;
    const bool partial = a.splits > 1;
    float* wsp = ws + (partial ? (long long)split * a.N * a.H * a.W * a.C : 0);
#pragma unroll
    for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int e0 = 0; e0 < 2; ++e0) {
            const int m = m0 + wm0 + 16 * i + 8 * e0 + lg;
            if (m >= a.gemm_m) continue;
            const int img = m / phw, ij = m - img * phw;
            const int pi = ij / a.ph_W, pj = ij - pi * a.ph_W;
            const int h = a.ph_h0 + pi * a.stride_h, x = a.ph_w0 + pj * a.stride_w;
            const long long pix = (((long long)img * a.H + h) * a.W + x) * a.C + g * a.Cg;
#pragma unroll
            for (int j = 0; j < Cfg::NI; ++j) {
                const int n = n0 + wn0 + 8 * j + 2 * lt;   // even; Cg even: n + 1 < Cg too
                if (n >= a.Cg) continue;
                const float v0 = acc[i][j][2 * e0], v1 = acc[i][j][2 * e0 + 1];
                if (partial) *reinterpret_cast<float2*>(wsp + pix + n) = make_float2(v0, v1);
                else ig3g_store2(dx + pix + n, v0, v1);
            }
        }
}
