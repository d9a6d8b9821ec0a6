// igemm3_wgrad.cu -- implicit-GEMM weight gradient, third generation (NHWC, tensor cores).
//
// Contract: x (N, H, W, C), dy (N, P, Q, K), dw (K, R, S, Cg): physical C-contiguous arrays of
// one dtype T (ig_f16, ig_bf16; float for TF32), 16-byte aligned, K % (16 / sizeof(T)) == 0
// and Cg % (16 / sizeof(T)) == 0 (host: gpuconv.engines.cuda_igemm3.Igemm3Wgrad.supports).
//
//   GEMM per group g:  dw[g*Kg + m, n] = sum_k A[m, k] * B[k, n]
//     m over Kg, n = (r, s, c) over R*S*Cg (c fastest), k = (img, p, q) over N*P*Q
//     A[m, k] = dy[img, p, q, g*Kg + m]
//     B[k, (r,s,c)] = x[img, p*sh - ph + r*dh, q*sw - pw + s*dw, g*Cg + c]   (0 in the padding)
//   Both operands are stored [k][m] / [k][n] in shared memory (16-byte chunks along K of dy and
//   along C of x, their contiguous axes) and read by ldmatrix.trans (tf32: 32-bit shared loads),
//   igemm3_grad.cuh. BM == BN: a thread's A and B chunks lie in the same k rows, whose (img, p,
//   q) it keeps in registers and advances by BK per k-iteration in the mixed radix (a.bk_n,
//   a.bk_p, a.bk_q): adds and compares, no division in the loop. A B column's (r, s, c) is
//   decoded once per block (Cg % chunk == 0: a chunk never straddles two taps).
//
// Pipeline as igemm3_fprop.cu. Split-K over N*P*Q (deterministic): split z covers k-iterations
// [z*iters_per_split, ...), writes fp32 partials ws[split][K][R*S*Cg]; igemm3_splitk_reduce<T>
// (igemm3_fprop.cu) sums them in split order.
//
// Mutation switches (tests/test_igemm3_host_grad.py): IG3W_MUTATE_CARRY (q's carry into p
// dropped), IG3W_MUTATE_NO_BARRIER (no __syncthreads after the wait).
#include "igemm3_grad.cuh"

template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
__global__ void IG3G_MAXNREG(240)
igemm3_wgrad(const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw,
             float* __restrict__ ws, const Igemm3GradArgs a) {
    typedef Ig3GradCfg<T, MODE, BM, BN, BK, WARPS_M, WARPS_N, STAGES> Cfg;
    const int KV = Cfg::KV, RC = Cfg::NCH;
    static_assert(BM == BN, "A and B chunks of a thread share their k rows");
    const int RSTEP = Cfg::THREADS / RC, RPT = BK / RSTEP;
    static_assert(Cfg::THREADS % RC == 0 && BK % RSTEP == 0, "tiling");
    const int A_CHUNKS = BK * RC, STAGE_CHUNKS = 2 * BK * RC;
    static_assert(STAGES * STAGE_CHUNKS * 16 <= 48 * 1024, "static shared memory");
    __shared__ __align__(128) uint4 smem[STAGES * STAGE_CHUNKS];
    const unsigned sbase = ig3_smem_addr(smem);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = blockIdx.z % a.groups, split = blockIdx.z / a.groups;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const int it0 = split * a.iters_per_split;
    const int niter = max(0, min(a.iters, it0 + a.iters_per_split) - it0);

    const int col = tid % RC, row0 = tid / RC;
    // A column (k of dy) and B column (r, s, c): decoded once
    const unsigned acol_ok = m0 + col * KV < a.Kg ? 1u : 0u;
    const long long a_col = (long long)g * a.Kg + m0 + col * KV;
    const int nn = n0 + col * KV;
    const unsigned bcol_ok = nn < a.gemm_n ? 1u : 0u;
    const int nv = bcol_ok ? nn : 0;
    const int rs = nv / a.Cg, c = nv - rs * a.Cg, r = rs / a.S, s = rs - r * a.S;
    const int rdh = r * a.dil_h - a.pad_h, sdw = s * a.dil_w - a.pad_w;
    const long long b_col = ((long long)rdh * a.W + sdw) * a.C + (long long)g * a.Cg + c;
    // per row: k = (img, p, q) kept as hs = p*sh, ws_ = q*sw and the row's chunk pointers in
    // dy (k*K) and x (((img*H + p*sh)*W + q*sw)*C, which may point outside x where the tap is
    // in the padding: never dereferenced there), advanced by BK per k-iteration in the mixed
    // radix (bk_n, bk_p, bk_q): adds, compares and predicated adds only
    const int QS = a.Q * a.stride_w, PS = a.P * a.stride_h;
    const int dqs = a.bk_q * a.stride_w, dps = a.bk_p * a.stride_h;
    const long long WC = (long long)a.W * a.C;
    const long long x_step = ((long long)a.bk_n * a.H * a.W + (long long)dps * a.W + dqs) * a.C;
    const long long x_cq = (long long)a.stride_h * WC - (long long)QS * a.C;   // q wrapped
    const long long x_cp = (long long)a.H * WC - (long long)PS * WC;           // p wrapped
    const long long a_step = (long long)BK * a.K;
    int k_[RPT], hs_[RPT], ws_[RPT];
    const T* ap_[RPT];   // this row's chunk in dy and in x (pointers: no address math per copy)
    const T* xp_[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
        const int k = it0 * BK + row0 + i * RSTEP;
        const int kk = k < a.gemm_k ? k : 0;
        const int pq = a.P * a.Q;
        const int img = kk / pq, p = (kk - img * pq) / a.Q, q = kk - img * pq - p * a.Q;
        k_[i] = k;
        hs_[i] = p * a.stride_h;
        ws_[i] = q * a.stride_w;
        ap_[i] = dy + ((long long)k * a.K + a_col);
        xp_[i] = x + ((((long long)img * a.H + hs_[i]) * a.W + ws_[i]) * a.C + b_col);
    }
    // row i's chunk (B: the same place in the B tile): a constant step from row 0's where
    // RSTEP % 8 == 0 (same XOR term), else its own swizzle
    const unsigned a_dst0 = ig3_kn_store<BK>(row0, col);
    auto a_dst = [&](int i) -> unsigned {
        if constexpr (RSTEP % 8 == 0) return a_dst0 + (unsigned)(i * RSTEP * 8 * 16);
        else return ig3_kn_store<BK>(row0 + i * RSTEP, col);
    };

    auto issue = [&](int stage) {
        const unsigned st = sbase + (unsigned)(stage * STAGE_CHUNKS) * 16u;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const unsigned rok = k_[i] < a.gemm_k ? 1u : 0u;
            const unsigned va = rok & acol_ok;
            ig3_cp_async16(st + a_dst(i), va ? ap_[i] : dy, va);
            const unsigned vb = rok & bcol_ok &
                                ((unsigned)(hs_[i] + rdh) < (unsigned)a.H ? 1u : 0u) &
                                ((unsigned)(ws_[i] + sdw) < (unsigned)a.W ? 1u : 0u);
            ig3_cp_async16(st + (unsigned)A_CHUNKS * 16u + a_dst(i), vb ? xp_[i] : x, vb);
            // advance k by BK
            k_[i] += BK;
            ap_[i] += a_step;
            // carries as predicated adds (no selects)
            int q = ws_[i] + dqs, hp = hs_[i] + dps;
            const T* xo = xp_[i] + x_step;
            if (q >= QS) {
                q -= QS;
                xo += x_cq;
#ifndef IG3W_MUTATE_CARRY
                hp += a.stride_h;
#endif
            }
            if (hp >= PS) { hp -= PS; xo += x_cp; }
            ws_[i] = q; hs_[i] = hp; xp_[i] = xo;
        }
    };

    float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
    for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int wm0 = (warp % WARPS_M) * Cfg::WM, wn0 = (warp / WARPS_M) * Cfg::WN;
#pragma unroll
    for (int st = 0; st < STAGES - 1; ++st) {
        if (st < niter) issue(st);
        ig3_cp_commit();
    }
    int rd = 0, wr = STAGES - 1;
    for (int it = 0; it < niter; ++it) {
        ig3_cp_wait<STAGES - 2>();
#ifndef IG3W_MUTATE_NO_BARRIER
        __syncthreads();
#endif
        if (it + STAGES - 1 < niter) issue(wr);
        ig3_cp_commit();
        wr = wr + 1 == STAGES ? 0 : wr + 1;
        const int cs = rd;
        rd = rd + 1 == STAGES ? 0 : rd + 1;
        const unsigned As = sbase + (unsigned)(cs * STAGE_CHUNKS) * 16u;
        const unsigned Bs = As + (unsigned)A_CHUNKS * 16u;
        const uint4* Ap = smem + cs * STAGE_CHUNKS;
        const uint4* Bp = Ap + A_CHUNKS;
#pragma unroll
        for (int kk = 0; kk < BK; kk += Cfg::KSTEP) {
            unsigned af[Cfg::MI][4], bf[Cfg::NI][2];
#pragma unroll
            for (int i = 0; i < Cfg::MI; ++i)
                ig3_km_afrag<T, MODE, BK>(af[i], As, Ap, kk, wm0 + 16 * i, lane);
#pragma unroll
            for (int j = 0; j < Cfg::NI; j += 2)
                ig3_kn_bfrag<T, MODE, BK>(bf[j], bf[j + 1], Bs, Bp, kk, wn0 + 8 * j, lane);
            ig_warp_mma<T, MODE>(acc, af, bf);
        }
    }
    ig3_cp_wait<0>();

    // ---- epilogue: dw rows g*Kg + m, columns n (or fp32 partials ws[split][K][R*S*Cg]) ----
    const int lg = lane >> 2, lt = lane & 3;
    const bool partial = a.splits > 1;
    float* wsp = ws + (partial ? (long long)split * a.K * a.gemm_n : 0);
#pragma unroll
    for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
        for (int e0 = 0; e0 < 2; ++e0) {
            const int m = m0 + wm0 + 16 * i + 8 * e0 + lg;
            if (m >= a.Kg) continue;
            const long long row = (long long)(g * a.Kg + m) * a.gemm_n;
#pragma unroll
            for (int j = 0; j < Cfg::NI; ++j) {
                const int n = n0 + wn0 + 8 * j + 2 * lt;   // even; R*S*Cg even: n + 1 inside
                if (n >= a.gemm_n) continue;
                const float v0 = acc[i][j][2 * e0], v1 = acc[i][j][2 * e0 + 1];
                if (partial) *reinterpret_cast<float2*>(wsp + row + n) = make_float2(v0, v1);
                else ig3g_store2(dw + row + n, v0, v1);
            }
        }
}
