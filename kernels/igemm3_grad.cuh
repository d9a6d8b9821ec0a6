// igemm3_grad.cuh -- what the third-generation dgrad (igemm3_dgrad.cu) and wgrad
// (igemm3_wgrad.cu) kernels share: their argument struct, their tile configuration, and the
// "[k][n]" shared tile (rows along the GEMM's k, 16-byte chunks along N) with its fragment loads.
//
// A [k][n] tile holds BK rows of COLS elements; the row is cut into sub-tiles of 8 chunks (128
// bytes), each [BK][8 chunks] XOR-swizzled with ig3_swz<8> (8 consecutive rows at one logical
// chunk hit 8 distinct 16-byte bank groups). Fragments of the mma's "col" operand (B: b0 =
// B[k=2(t%4)+e][n=t/4]) come from it by ldmatrix.trans on 16-bit data; the "row" operand (A:
// a0 = A[m=t/4][k=2(t%4)+e]) stored [k][m] likewise (matrix order a0..a3 = (k lo, m lo),
// (k lo, m hi), (k hi, m lo), (k hi, m hi)). TF32 (32-bit elements: ldmatrix.trans moves b16
// halves, not 32-bit words) reads the fragments with plain 32-bit shared loads.
#ifndef GPUCONV_IGEMM3_GRAD_CUH
#define GPUCONV_IGEMM3_GRAD_CUH

#include "igemm3_common.cuh"

// Register budget of the grad kernels: at most 240 per thread (the compile tests' limit; the
// 128x128 f16 tiles land at 242-244 under __launch_bounds__(128, 1) alone), with no spill
// (tests/test_igemm3_compile.py, tests/test_nvrtc_compile.py check). The host shim (g++) has
// no such attribute.
#if defined(__CUDACC__)
#define IG3G_MAXNREG(n) __maxnreg__(n)
#else
#define IG3G_MAXNREG(n)
#endif

// int32 scalars only (numpy mirror IGEMM3_GRAD_ARGS_DTYPE in gpuconv/engines/cuda_igemm3.py).
struct Igemm3GradArgs {
    int N, C, H, W, K, R, S, P, Q;
    int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
    int groups, Cg, Kg;
    int gemm_m, gemm_n, gemm_k;   // dgrad: N*ph_H*ph_W, Cg, Kg*nr*ns; wgrad: Kg, R*S*Cg, N*P*Q
    int splits, iters, iters_per_split;
    // dgrad, one stride phase: output rows h = ph_h0 + i*stride_h (i < ph_H), columns
    // w = ph_w0 + j*stride_w (j < ph_W); its taps r = ph_r0 + a*ph_rstep (a < ph_nr), s likewise;
    // tap a of phase row i reads dy row p = i + ph_p0 - a*ph_dp (ph_dp = ph_rstep*dil_h/stride_h)
    int ph_h0, ph_w0, ph_H, ph_W, ph_p0, ph_q0, ph_dp, ph_dq;
    int ph_r0, ph_rstep, ph_nr, ph_s0, ph_sstep, ph_ns;
    // wgrad: BK (one k-iteration of N*P*Q rows) in the mixed radix (n, p, q)
    int bk_n, bk_p, bk_q;
    int reserved0;
};

template <typename T, int MODE, int BM, int BN, int BK, int WARPS_M, int WARPS_N, int STAGES>
struct Ig3GradCfg {
    static const int THREADS = 32 * WARPS_M * WARPS_N;
    static const int KV = 16 / (int)sizeof(T);       // elements per 16-byte chunk
    static const int KCH = BK / KV;                   // chunks of a [m][k] row (dgrad's A)
    static const int MCH = BM / KV, NCH = BN / KV;    // chunks of a [k][m] / [k][n] row
    static const int WM = BM / WARPS_M, WN = BN / WARPS_N;
    static const int MI = WM / 16, NI = WN / 8;
    static const int KSTEP = MODE == IG_MODE_F16 ? 16 : 8;   // k of one mma
    static_assert(MODE == IG_MODE_F16 ? sizeof(T) == 2 : (MODE == IG_MODE_TF32 && sizeof(T) == 4),
                  "f16/bf16 data on m16n8k16, float on m16n8k8 tf32");
    static_assert(KCH == 4 || KCH == 8, "a k-iteration is 64 or 128 bytes of a [m][k] row");
    static_assert(MCH % 8 == 0 && NCH % 8 == 0, "[k][n] rows: whole 128-byte sub-tiles");
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile: 16-row A and 16-column B");
    static_assert(BK % KSTEP == 0 && STAGES >= 2, "k-steps and pipeline");
};

// byte offset of logical (row, chunk) in a [ROWS][chunks] tile of 8-chunk sub-tiles
template <int ROWS>
__device__ __forceinline__ unsigned ig3_kn_off(int row, int chunk) {
    return (unsigned)((chunk >> 3) * ROWS * 8 + ig3_swz<8>(row, chunk & 7)) * 16u;
}
template <int ROWS>
__device__ __forceinline__ unsigned ig3_kn_store(int row, int chunk) {
    return (unsigned)((chunk >> 3) * ROWS * 8 + ig3_swz_store<8>(row, chunk & 7)) * 16u;
}

// B fragments of n tiles n0 and n0 + 8 (8 columns each) at k-step kk from a [k][n] tile at
// shared address base (ROWS rows): bf0 = tile n0, bf1 = tile n0 + 8.
template <typename T, int MODE, int ROWS>
__device__ __forceinline__ void ig3_kn_bfrag(unsigned* bf0, unsigned* bf1, unsigned base,
                                             const uint4* smem_base, int kk, int n0, int lane) {
    if constexpr (MODE == IG_MODE_F16) {
        // x4.trans: matrices (k lo, n lo), (k hi, n lo), (k lo, n hi), (k hi, n hi)
        const int mi = lane >> 3, lr = lane & 7;
        const int k = kk + lr + 8 * (mi & 1), n = n0 + 8 * (mi >> 1);
        unsigned t4[4];
        ig3_ldsm_x4_trans(t4, base + ig3_kn_off<ROWS>(k, n / 8));
        bf0[0] = t4[0]; bf0[1] = t4[1]; bf1[0] = t4[2]; bf1[1] = t4[3];
    } else {
        // m16n8k8 tf32: b0 = B[k = t%4][n = t/4], b1 = B[k = t%4 + 4][n]
        const unsigned* s32 = reinterpret_cast<const unsigned*>(smem_base) +
                              (base - ig3_smem_addr(smem_base)) / 4u;
        const int k = kk + (lane & 3), n = n0 + (lane >> 2);
        bf0[0] = s32[(ig3_kn_off<ROWS>(k, n / 4) >> 2) + (n & 3)];
        bf0[1] = s32[(ig3_kn_off<ROWS>(k + 4, n / 4) >> 2) + (n & 3)];
        bf1[0] = s32[(ig3_kn_off<ROWS>(k, (n + 8) / 4) >> 2) + (n & 3)];
        bf1[1] = s32[(ig3_kn_off<ROWS>(k + 4, (n + 8) / 4) >> 2) + (n & 3)];
    }
}

// A fragment (16 rows m0.. of the mma's row operand) at k-step kk from a [k][m] tile.
template <typename T, int MODE, int ROWS>
__device__ __forceinline__ void ig3_km_afrag(unsigned* af, unsigned base, const uint4* smem_base,
                                             int kk, int m0, int lane) {
    if constexpr (MODE == IG_MODE_F16) {
        // x4.trans: a0 = (k lo, m lo), a1 = (k lo, m hi), a2 = (k hi, m lo), a3 = (k hi, m hi)
        const int mi = lane >> 3, lr = lane & 7;
        const int k = kk + lr + 8 * (mi >> 1), m = m0 + 8 * (mi & 1);
        ig3_ldsm_x4_trans(af, base + ig3_kn_off<ROWS>(k, m / 8));
    } else {
        // m16n8k8 tf32: a0 = A[g][t], a1 = A[g+8][t], a2 = A[g][t+4], a3 = A[g+8][t+4]
        const unsigned* s32 = reinterpret_cast<const unsigned*>(smem_base) +
                              (base - ig3_smem_addr(smem_base)) / 4u;
        const int k = kk + (lane & 3), m = m0 + (lane >> 2);
        af[0] = s32[(ig3_kn_off<ROWS>(k, m / 4) >> 2) + (m & 3)];
        af[1] = s32[(ig3_kn_off<ROWS>(k, (m + 8) / 4) >> 2) + (m & 3)];
        af[2] = s32[(ig3_kn_off<ROWS>(k + 4, m / 4) >> 2) + (m & 3)];
        af[3] = s32[(ig3_kn_off<ROWS>(k + 4, (m + 8) / 4) >> 2) + (m & 3)];
    }
}

// Two adjacent outputs, 8-byte (float) or 4-byte (16-bit) aligned, in one store.
template <typename T>
__device__ __forceinline__ void ig3g_store2(T* p, float v0, float v1) {
    if constexpr (sizeof(T) == 4) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
        const T h0 = IgNum<T>::from_acc(v0), h1 = IgNum<T>::from_acc(v1);
        *reinterpret_cast<unsigned*>(p) = (unsigned)h0.bits | ((unsigned)h1.bits << 16);
    }
}

#endif  // GPUCONV_IGEMM3_GRAD_CUH
