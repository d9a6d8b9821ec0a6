// igemm3_selftest.cu -- tiny purpose-written kernels that exercise the primitives of
// kernels/igemm3_common.cuh one at a time, for tests/test_igemm3_host_emulation.py (run on the
// CPU through tests/igemm_host.py; they also compile with nvcc, so they are real CUDA).
#include "igemm3_common.cuh"

// cp.async timeline, one warp. Thread t copies src[4t .. 4t+3] into buf[0][t] (zero-filled when
// t % 5 == 0) as group 0 and src[128 + 4t ..] into buf[1][t] as group 1, after zeroing both.
// out[t][snap][4]: snap 0 = buf[0][t] right after issue (poisoned: NaN), 1 = buf[0][t] after
// wait_group 1 (landed), 2 = buf[1][t] after wait_group 1 (still in flight: NaN),
// 3 = buf[1][t] after wait_group 0.
__global__ void st_cp_async(const float* __restrict__ src, float* __restrict__ out) {
    __shared__ __align__(16) uint4 buf[2][32];
    const int t = threadIdx.x;
    buf[0][t] = make_uint4(0u, 0u, 0u, 0u);
    buf[1][t] = make_uint4(0u, 0u, 0u, 0u);
    __syncthreads();
    ig3_cp_async16(ig3_smem_addr(&buf[0][t]), src + 4 * t, t % 5 != 0);
    ig3_cp_commit();
    ig3_cp_async16(ig3_smem_addr(&buf[1][t]), src + 128 + 4 * t, true);
    ig3_cp_commit();
    float* o = out + 16 * t;
    const float* b0 = reinterpret_cast<const float*>(&buf[0][t]);
    const float* b1 = reinterpret_cast<const float*>(&buf[1][t]);
    for (int e = 0; e < 4; ++e) o[e] = b0[e];
    ig3_cp_wait<1>();
    for (int e = 0; e < 4; ++e) o[4 + e] = b0[e];
    for (int e = 0; e < 4; ++e) o[8 + e] = b1[e];
    ig3_cp_wait<0>();
    for (int e = 0; e < 4; ++e) o[12 + e] = b1[e];
}

// ldmatrix, one warp: shared = 32 rows of 8 b16 (row i = src[8i .. 8i+7]); lane i points at
// row perm[i]; out[t][4] = the registers thread t receives (x4, x2 or x1; trans or not).
__global__ void st_ldmatrix(const unsigned short* __restrict__ src, const int* __restrict__ perm,
                            unsigned* __restrict__ out, int num, int trans) {
    __shared__ __align__(16) unsigned short tile[32 * 8];
    const int t = threadIdx.x;
    for (int e = 0; e < 8; ++e) tile[8 * t + e] = src[8 * t + e];
    __syncthreads();
    const int row = perm[t];
    const unsigned addr = ig3_smem_addr(&tile[8 * row]);
    unsigned d[4] = {0u, 0u, 0u, 0u};
    if (num == 4) { if (trans) ig3_ldsm_x4_trans(d, addr); else ig3_ldsm_x4(d, addr); }
    else if (num == 2) { if (trans) ig3_ldsm_x2_trans(d, addr); else ig3_ldsm_x2(d, addr); }
    else ig3_ldsm_x1(d, addr);
    for (int j = 0; j < 4; ++j) out[4 * t + j] = d[j];
}

// ldmatrix feeding mma.sync, one warp: D (16x8, fp32) = A (16x16 f16, row-major) x B, with B
// given as Bt (8 x 16, [n][k]), both staged through cp.async into swizzled shared rows of
// CPR = 2 chunks; fragments by the addressing the fprop kernel uses.
__global__ void st_ldsm_mma(const ig_f16* __restrict__ A, const ig_f16* __restrict__ Bt,
                            float* __restrict__ D) {
    __shared__ __align__(16) uint4 sa[16 * 2];
    __shared__ __align__(16) uint4 sb[8 * 2];
    const int lane = threadIdx.x;
    {   // 32 chunks of A (row = lane / 2, chunk = lane % 2), 16 of Bt
        const int r = lane >> 1, c = lane & 1;
        ig3_cp_async16(ig3_smem_addr(&sa[ig3_swz_store<2>(r, c)]), A + 16 * r + 8 * c, true);
        if (lane < 16)
            ig3_cp_async16(ig3_smem_addr(&sb[ig3_swz_store<2>(r, c)]), Bt + 16 * r + 8 * c, true);
        ig3_cp_commit();
        ig3_cp_wait<0>();
        __syncthreads();
    }
    unsigned a[4], b[2];
    ig3_ldsm_x4(a, ig3_smem_addr(&sa[ig3_swz<2>(lane & 15, lane >> 4)]));
    ig3_ldsm_x2(b, ig3_smem_addr(&sb[ig3_swz<2>(lane & 7, (lane >> 3) & 1)]));
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    IgMma16<ig_f16>::run(c, a, b);
    const int g = lane >> 2, t = lane & 3;
    D[8 * g + 2 * t] = c[0];
    D[8 * g + 2 * t + 1] = c[1];
    D[8 * (g + 8) + 2 * t] = c[2];
    D[8 * (g + 8) + 2 * t + 1] = c[3];
}

// The swizzle tables: out[0][r][c] = ig3_swz<4>(r, c) (r < 64, c < 4), then ig3_swz<8> (c < 8).
__global__ void st_swizzle(int* __restrict__ out) {
    const int r = threadIdx.x;   // 64 threads
    for (int c = 0; c < 4; ++c) out[4 * r + c] = ig3_swz<4>(r, c);
    for (int c = 0; c < 8; ++c) out[256 + 8 * r + c] = ig3_swz<8>(r, c);
}
