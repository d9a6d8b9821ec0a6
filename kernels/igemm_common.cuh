// igemm_common.cuh -- the implicit-GEMM machinery shared by igemm_fprop.cu, igemm_dgrad.cu,
// igemm_wgrad.cu (second-generation CUDA engine). Inlined as text by the loader, like common.cuh.
//
// Every conv op is a GEMM per group, C[m, n] = sum_k A[m, k] * B[n, k], whose operands are never
// materialised: an op supplies two "operand" classes that fetch A[m, k] and B[n, k] straight from
// x, w or dy (the im2col gather happens while the shared-memory tile is loaded) and an epilogue
// that says where C[m, n] goes.
//
// Block tile BM x BN, k-slab BK, WARPS_M x WARPS_N warps; shared tiles stored [row][BK + pad]
// (k contiguous, padded by 16 bytes: the rows a warp reads at one k fall in distinct banks, and
// 16-byte shared stores stay aligned). Double buffered: while the tensor cores / FMA units work on
// slab t in one shared buffer, slab t+1 is fetched from global memory into registers, then
// stored into the other buffer -- one __syncthreads per slab.
//
// Global loads: thread t owns a fixed k-group of KV = 16 / sizeof(T) consecutive k within the
// slab and RPT rows. An operand that is contiguous along k (fprop's w, wgrad's dy) is read with
// one 16-byte load per group where the host proved alignment (ConvArgs::vec_a / vec_b); gathered
// operands decode k incrementally (no division inside the main loop) and zero-fill padding and
// out-of-range k.
//
// Math modes (template MODE):
//   MODE_SIMT  FP32 (or FP64) FMA; warp = 8 x 4 lanes, a thread owns TM x TN = (WM/8) x (WN/4).
//   MODE_F16   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, FP32 accumulate.
//   MODE_TF32  mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 on float32 data rounded to tf32
//              (cvt.rna) when stored to shared memory; only when the user allowed TF32.
// Only inline PTX, no <mma.h>, no <cuda_fp16.h>: 16-bit types are raw bits here.
#ifndef GPUCONV_IGEMM_COMMON_CUH
#define GPUCONV_IGEMM_COMMON_CUH

#define IG_MODE_SIMT 0
#define IG_MODE_F16 1
#define IG_MODE_TF32 2
#define IG_MAXS 16   // largest stride the dgrad phase tables hold (host checks)

// Raw 16-bit storage types (the host passes float16 / bfloat16 arrays).
struct __align__(2) ig_f16 { unsigned short bits; };
struct __align__(2) ig_bf16 { unsigned short bits; };

// The problem, one by-value argument; all int32 so the host's numpy mirror (IGEMM_ARGS_FIELDS in
// gpuconv/engines/cuda_igemm.py) has no padding. Sizes come from gpuconv.ConvProblem; flat
// offsets are formed in 64 bits in the kernels.
struct IgemmArgs {
    int N, C, H, W, K, R, S, P, Q;
    int pad_h, pad_w, stride_h, stride_w, dil_h, dil_w;
    int groups, Cg, Kg;
    int gemm_m, gemm_n, gemm_k;     // per group (dgrad: gemm_m is the largest phase's)
    int vec_a, vec_b;               // 1: that operand may be read 16 bytes at a time
    int has_bias;                   // fprop: 1 if the bias pointer is real
    int splits, k_chunk;            // wgrad split-K: split z covers k in [z*k_chunk, +k_chunk)
    int r_step, s_step;             // dgrad: tap step inside one stride phase
    int dp_step, dq_step;           // dgrad: how far p (q) moves back per tap step
    int ph_r0[IG_MAXS], ph_tr[IG_MAXS], ph_dp0[IG_MAXS], ph_n[IG_MAXS];   // dgrad h-phases
    int pw_s0[IG_MAXS], pw_ts[IG_MAXS], pw_dq0[IG_MAXS], pw_n[IG_MAXS];   // dgrad w-phases
};

// ---- scalar conversions (inline PTX for the 16-bit types) -------------------------------------
template <typename T> struct IgNum;
template <> struct IgNum<float> {
    typedef float acc;
    static __device__ __forceinline__ float to_acc(float v) { return v; }
    static __device__ __forceinline__ float from_acc(float v) { return v; }
    static __device__ __forceinline__ float zero() { return 0.0f; }
};
template <> struct IgNum<double> {
    typedef double acc;
    static __device__ __forceinline__ double to_acc(double v) { return v; }
    static __device__ __forceinline__ double from_acc(double v) { return v; }
    static __device__ __forceinline__ double zero() { return 0.0; }
};
template <> struct IgNum<ig_f16> {
    typedef float acc;
    static __device__ __forceinline__ float to_acc(ig_f16 v) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
        return f;
    }
    static __device__ __forceinline__ ig_f16 from_acc(float f) {
        ig_f16 v;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v.bits) : "f"(f));
        return v;
    }
    static __device__ __forceinline__ ig_f16 zero() { ig_f16 v; v.bits = 0; return v; }
};
template <> struct IgNum<ig_bf16> {
    typedef float acc;
    static __device__ __forceinline__ float to_acc(ig_bf16 v) {
        return __uint_as_float(((unsigned)v.bits) << 16);   // exact
    }
    static __device__ __forceinline__ ig_bf16 from_acc(float f) {
        ig_bf16 v;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v.bits) : "f"(f));
        return v;
    }
    static __device__ __forceinline__ ig_bf16 zero() { ig_bf16 v; v.bits = 0; return v; }
};

__device__ __forceinline__ float ig_to_tf32(float f) {
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(f));
    return __uint_as_float(u);
}

// ---- mma.sync wrappers -------------------------------------------------------------------------
// m16n8k16, A row-major 16x16 (4 x b32, each two 16-bit values), B col-major 16x8 (2 x b32),
// C/D 16x8 f32 (4 regs). Fragment ownership (PTX ISA, g = lane / 4, t = lane % 4):
//   a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   b0: (k 2t..2t+1, n g)  b1: (k 2t+8.., n g)
//   c0,c1: (g, 2t..2t+1)  c2,c3: (g+8, 2t..2t+1)
template <typename T> struct IgMma16;
template <> struct IgMma16<ig_f16> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
template <> struct IgMma16<ig_bf16> {
    static __device__ __forceinline__ void run(float* c, const unsigned* a, const unsigned* b) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
            "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};
// m16n8k8 tf32: a0: (g, t) a1: (g+8, t) a2: (g, t+4) a3: (g+8, t+4); b0: (k t, n g) b1: (k t+4,
// n g); C as above.
__device__ __forceinline__ void ig_mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One k-step of a warp's MI x NI tile of mma.sync: c[i][j] += a[i] * b[j] (m16n8k16 f16/bf16
// when MODE is IG_MODE_F16, m16n8k8 tf32 otherwise). The main loops of both generations.
template <typename T, int MODE, int MI, int NI>
__device__ __forceinline__ void ig_warp_mma(float (&c)[MI][NI][4], const unsigned (&a)[MI][4],
                                            const unsigned (&b)[NI][2]) {
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j) {
            if constexpr (MODE == IG_MODE_F16) IgMma16<T>::run(c[i][j], a[i], b[j]);
            else ig_mma_tf32(c[i][j], a[i], b[j]);
        }
}

// ---- mixed-radix k counters (incremental decode, no division in the main loop) ----------------
// A position k = (hi, mid, lo) with radices (., MID, LO); step() moves by 1, jump() by a fixed
// stride whose decomposition (dh, dm, dl) the op precomputed once.
struct IgDigits {
    int hi, mid, lo;
};
__device__ __forceinline__ IgDigits ig_decode(int k, int MID, int LO) {
    IgDigits d;
    d.lo = k % LO;
    int t = k / LO;
    d.mid = t % MID;
    d.hi = t / MID;
    return d;
}
__device__ __forceinline__ void ig_step(IgDigits& d, int MID, int LO) {
    if (++d.lo == LO) {
        d.lo = 0;
        if (++d.mid == MID) { d.mid = 0; ++d.hi; }
    }
}
__device__ __forceinline__ void ig_jump(IgDigits& d, const IgDigits& j, int MID, int LO) {
    d.lo += j.lo;
    int carry = d.lo >= LO;
    d.lo -= carry ? LO : 0;
    d.mid += j.mid + carry;
    carry = d.mid >= MID;
    d.mid -= carry ? MID : 0;
    d.hi += j.hi + carry;
}

// The k counter of an operand whose k = (hi, mid, lo) with radices (., MID, LO); operands derive
// from it (init once per block; BK = the slab).
struct IgRadixK {
    int MID, LO, BK;
    IgDigits jb;   // BK as digits
    struct KPos { int k; IgDigits d; };
    __device__ __forceinline__ void init_radix(int MID_, int LO_, int BK_) {
        MID = MID_ > 0 ? MID_ : 1;   // never divide by 0 (a phase without taps runs no slab)
        LO = LO_ > 0 ? LO_ : 1;
        BK = BK_;
        jb = ig_decode(BK, MID, LO);
    }
    __device__ __forceinline__ KPos kpos(int k) const {
        KPos p; p.k = k; p.d = ig_decode(k, MID, LO); return p;
    }
    __device__ __forceinline__ void step(KPos& p) const { ++p.k; ig_step(p.d, MID, LO); }
    __device__ __forceinline__ void jump(KPos& p) const { p.k += BK; ig_jump(p.d, jb, MID, LO); }
};

// x[base + h*W + w], or 0 where (h, w) falls in the padding.
template <typename T>
__device__ __forceinline__ T ig_pixel(const T* x, long long base, int h, int w, int H, int W) {
    if ((unsigned)h >= (unsigned)H || (unsigned)w >= (unsigned)W) return IgNum<T>::zero();
    return x[base + (long long)h * W + w];
}

// ---- tile configuration --------------------------------------------------------------------
template <typename T_, int MODE_, int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_>
struct IgCfg {
    typedef T_ T;
    typedef typename IgNum<T_>::acc Acc;
    static const int MODE = MODE_, BM = BM_, BN = BN_, BK = BK_;
    static const int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
    static const int THREADS = 32 * WARPS_M * WARPS_N;
    static const int KV = 16 / (int)sizeof(T_);   // elements per 16-byte group
    static const int LDS = BK + KV;                // shared row stride (16 bytes of padding)
    static const int KG = BK / KV;                 // k-groups per row
    static const int RSTEP = THREADS / KG;         // rows between one thread's rows
    static const int WM = BM / WARPS_M, WN = BN / WARPS_N;
    // SIMT: warp is 8 (m) x 4 (n) lanes; MMA: MI x NI tiles of 16 x 8.
    static const int TM = WM / 8, TN = WN / 4;
    static const int MI = WM / 16, NI = WN / 8;
    static const int KSTEP = MODE == IG_MODE_F16 ? 16 : 8;
    // SIMT: k-steps per unrolled group of the slab loop (the groups themselves are not unrolled).
    // Fully unrolled, the 8x8-per-thread fp32 tile let ptxas hoist shared loads of later k-steps
    // until it filled the budget: 246-254 of 255 registers under nvcc 13.0 and NVRTC 12.9/13.5,
    // yet spill-free at a forced cap of 184 (appetite, not need). Groups of 4 k-steps (256 FMAs,
    // 64 shared loads, one loop branch) bring it to 210-224, headroom for other compilers.
    // Smaller thread tiles sit at <= 182 fully unrolled and keep it (KU == BK).
    static const int KU = (MODE == IG_MODE_SIMT && TM * TN >= 64) ? 4 : BK;
    static_assert(BK % KV == 0 && THREADS % KG == 0, "k-groups must tile the slab");
    static_assert(BM % RSTEP == 0 && BN % RSTEP == 0, "rows must tile the block");
    static_assert(MODE == IG_MODE_SIMT ? (WM % 8 == 0 && WN % 4 == 0)
                                       : (WM % 16 == 0 && WN % 8 == 0 && BK % KSTEP == 0),
                  "warp tile");
    static_assert(MODE != IG_MODE_F16 || sizeof(T_) == 2, "f16/bf16 mma takes 16-bit data");
    static_assert(MODE != IG_MODE_TF32 || sizeof(T_) == 4, "tf32 mma takes float32 data");
    static_assert(((LDS * (int)sizeof(T_) / 4) % 8) == 4,
                  "row stride = 4 mod 8 words keeps fragment reads free of bank conflicts");
};

// ---- one operand's slab loader ---------------------------------------------------------------
// Operand (the op's class) provides:
//   typedef ... Row;                      per-row state, built once
//   Row row(int r) const;                 r = row index inside the group's GEMM (may be >= rows)
//   typedef ... KPos;                     a decoded k position
//   KPos kpos(int k) const; void step(KPos&) const; void jump(KPos&) const  (by BK)
//   T fetch(const Row&, const KPos&) const       one element, 0 outside the tensor / range
//   const T* vec_ptr(const Row&, const KPos&) const   16-byte group start (vector path only)
//   bool vec_ok(const Row&, const KPos&) const        whole group inside, vector path allowed
template <class Cfg, int ROWS, class Operand>
struct IgSlab {
    typedef typename Cfg::T T;
    static const int RPT = ROWS / Cfg::RSTEP;
    typename Operand::Row rows[RPT];
    typename Operand::KPos kp;
    uint4 regs[RPT];   // one 16-byte group per row

    __device__ __forceinline__ void init(const Operand& op, int row_block0, int k_begin) {
        const int tid = threadIdx.x;
        const int r0 = tid / Cfg::KG;
#pragma unroll
        for (int i = 0; i < RPT; ++i) rows[i] = op.row(row_block0 + r0 + i * Cfg::RSTEP);
        kp = op.kpos(k_begin + (tid % Cfg::KG) * Cfg::KV);
    }
    __device__ __forceinline__ void load(const Operand& op) {
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            if (op.vec_ok(rows[i], kp)) {
                regs[i] = __ldg(reinterpret_cast<const uint4*>(op.vec_ptr(rows[i], kp)));
            } else {
                T* e = reinterpret_cast<T*>(&regs[i]);
                typename Operand::KPos q = kp;
#pragma unroll
                for (int j = 0; j < Cfg::KV; ++j) {
                    e[j] = op.fetch(rows[i], q);
                    if (j + 1 < Cfg::KV) op.step(q);
                }
            }
        }
    }
    __device__ __forceinline__ void next(const Operand& op) { op.jump(kp); }
    __device__ __forceinline__ void store(T* smem) const {
        const int tid = threadIdx.x;
        const int r0 = tid / Cfg::KG, kk = (tid % Cfg::KG) * Cfg::KV;
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            uint4 v = regs[i];
            if constexpr (Cfg::MODE == IG_MODE_TF32) {
                v.x = __float_as_uint(ig_to_tf32(__uint_as_float(v.x)));
                v.y = __float_as_uint(ig_to_tf32(__uint_as_float(v.y)));
                v.z = __float_as_uint(ig_to_tf32(__uint_as_float(v.z)));
                v.w = __float_as_uint(ig_to_tf32(__uint_as_float(v.w)));
            }
            *reinterpret_cast<uint4*>(smem + (r0 + i * Cfg::RSTEP) * Cfg::LDS + kk) = v;
        }
    }
};

// ---- accumulators and the math on one slab ---------------------------------------------------
template <class Cfg, int MODE = Cfg::MODE>
struct IgAccum;

template <class Cfg>
struct IgAccum<Cfg, IG_MODE_SIMT> {
    typedef typename Cfg::T T;
    typedef typename Cfg::Acc Acc;
    Acc c[Cfg::TM][Cfg::TN];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::TN; ++j) c[i][j] = Acc(0);
    }
    // As: [BM][LDS], Bs: [BN][LDS]; lane (lm, ln) = (lane % 8, lane / 8) owns rows
    // wm0 + lm + 8 i and columns wn0 + ln + 4 j: 8 distinct A rows and 4 B rows per warp and k.
    __device__ __forceinline__ void mma_slab(const T* As, const T* Bs, int wm0, int wn0,
                                             int lane) {
        const T* a_base = As + (wm0 + (lane & 7)) * Cfg::LDS;
        const T* b_base = Bs + (wn0 + (lane >> 3)) * Cfg::LDS;
#pragma unroll 1
        for (int k0 = 0; k0 < Cfg::BK; k0 += Cfg::KU) {   // one pass when KU == BK
#pragma unroll
            for (int k = k0; k < k0 + Cfg::KU; ++k) {
                Acc a[Cfg::TM], b[Cfg::TN];
#pragma unroll
                for (int i = 0; i < Cfg::TM; ++i)
                    a[i] = IgNum<T>::to_acc(a_base[i * 8 * Cfg::LDS + k]);
#pragma unroll
                for (int j = 0; j < Cfg::TN; ++j)
                    b[j] = IgNum<T>::to_acc(b_base[j * 4 * Cfg::LDS + k]);
#pragma unroll
                for (int i = 0; i < Cfg::TM; ++i)
#pragma unroll
                    for (int j = 0; j < Cfg::TN; ++j) c[i][j] += a[i] * b[j];
            }
        }
    }
    // Row m_local of accumulator row i, column of accumulator column j.
    static __device__ __forceinline__ int row_of(int wm0, int lane, int i) {
        return wm0 + (lane & 7) + 8 * i;
    }
    static __device__ __forceinline__ int col_of(int wn0, int lane, int j) {
        return wn0 + (lane >> 3) + 4 * j;
    }
    static const int ROWS = Cfg::TM, COLS = Cfg::TN;
    __device__ __forceinline__ Acc get(int i, int j) const { return c[i][j]; }
};

template <class Cfg, int MODE>
struct IgAccum {   // MODE_F16 and MODE_TF32: tensor cores, FP32 accumulators
    typedef typename Cfg::T T;
    typedef float Acc;
    float c[Cfg::MI][Cfg::NI][4];

    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int i = 0; i < Cfg::MI; ++i)
#pragma unroll
            for (int j = 0; j < Cfg::NI; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) c[i][j][e] = 0.0f;
    }
    __device__ __forceinline__ void mma_slab(const T* As, const T* Bs, int wm0, int wn0,
                                             int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int ks = 0; ks < Cfg::BK; ks += Cfg::KSTEP) {
            unsigned a[Cfg::MI][4], b[Cfg::NI][2];
            if constexpr (MODE == IG_MODE_F16) {
                // 32-bit words holding k = 2t, 2t+1 (and +8): element offset even, LDS even.
#pragma unroll
                for (int i = 0; i < Cfg::MI; ++i) {
                    const T* r0 = As + (wm0 + 16 * i + g) * Cfg::LDS + ks + 2 * t;
                    const T* r1 = r0 + 8 * Cfg::LDS;
                    a[i][0] = *reinterpret_cast<const unsigned*>(r0);
                    a[i][1] = *reinterpret_cast<const unsigned*>(r1);
                    a[i][2] = *reinterpret_cast<const unsigned*>(r0 + 8);
                    a[i][3] = *reinterpret_cast<const unsigned*>(r1 + 8);
                }
#pragma unroll
                for (int j = 0; j < Cfg::NI; ++j) {
                    const T* n0 = Bs + (wn0 + 8 * j + g) * Cfg::LDS + ks + 2 * t;
                    b[j][0] = *reinterpret_cast<const unsigned*>(n0);
                    b[j][1] = *reinterpret_cast<const unsigned*>(n0 + 8);
                }
            } else {
#pragma unroll
                for (int i = 0; i < Cfg::MI; ++i) {
                    const T* r0 = As + (wm0 + 16 * i + g) * Cfg::LDS + ks + t;
                    const T* r1 = r0 + 8 * Cfg::LDS;
                    a[i][0] = *reinterpret_cast<const unsigned*>(r0);
                    a[i][1] = *reinterpret_cast<const unsigned*>(r1);
                    a[i][2] = *reinterpret_cast<const unsigned*>(r0 + 4);
                    a[i][3] = *reinterpret_cast<const unsigned*>(r1 + 4);
                }
#pragma unroll
                for (int j = 0; j < Cfg::NI; ++j) {
                    const T* n0 = Bs + (wn0 + 8 * j + g) * Cfg::LDS + ks + t;
                    b[j][0] = *reinterpret_cast<const unsigned*>(n0);
                    b[j][1] = *reinterpret_cast<const unsigned*>(n0 + 4);
                }
            }
            ig_warp_mma<T, MODE>(c, a, b);
        }
    }
    // Accumulator "row" i in [0, 2 MI): tile i / 2, upper/lower 8 rows; "column" j in [0, 2 NI).
    static __device__ __forceinline__ int row_of(int wm0, int lane, int i) {
        return wm0 + 16 * (i >> 1) + 8 * (i & 1) + (lane >> 2);
    }
    static __device__ __forceinline__ int col_of(int wn0, int lane, int j) {
        return wn0 + 8 * (j >> 1) + 2 * (lane & 3) + (j & 1);
    }
    static const int ROWS = 2 * Cfg::MI, COLS = 2 * Cfg::NI;
    __device__ __forceinline__ float get(int i, int j) const {
        return c[i >> 1][j >> 1][2 * (i & 1) + (j & 1)];
    }
};

// ---- the main loop ---------------------------------------------------------------------------
// Runs slabs [k_begin, k_end) of one block tile and leaves the block's partial sums in `acc`.
template <class Cfg, class OpA, class OpB>
__device__ __forceinline__ void ig_mainloop(const OpA& opa, const OpB& opb, int m0, int n0,
                                            int k_begin, int k_end, IgAccum<Cfg>& acc) {
    typedef typename Cfg::T T;
    __shared__ __align__(16) T smem[2][(Cfg::BM + Cfg::BN) * Cfg::LDS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = (warp % Cfg::WARPS_M) * Cfg::WM;
    const int wn0 = (warp / Cfg::WARPS_M) * Cfg::WN;

    acc.clear();
    const int slabs = k_end > k_begin ? (k_end - k_begin + Cfg::BK - 1) / Cfg::BK : 0;
    if (slabs == 0) return;
    IgSlab<Cfg, Cfg::BM, OpA> la;
    IgSlab<Cfg, Cfg::BN, OpB> lb;
    la.init(opa, m0, k_begin);
    lb.init(opb, n0, k_begin);
    la.load(opa);
    lb.load(opb);
    la.store(smem[0]);
    lb.store(smem[0] + Cfg::BM * Cfg::LDS);
    __syncthreads();
    for (int s = 0; s < slabs; ++s) {
        const int cur = s & 1;
        const bool more = s + 1 < slabs;
        if (more) {   // global -> registers for slab s+1, in flight during the math
            la.next(opa);
            lb.next(opb);
            la.load(opa);
            lb.load(opb);
        }
        acc.mma_slab(smem[cur], smem[cur] + Cfg::BM * Cfg::LDS, wm0, wn0, lane);
        if (more) {
            la.store(smem[cur ^ 1]);
            lb.store(smem[cur ^ 1] + Cfg::BM * Cfg::LDS);
        }
        __syncthreads();
    }
}

// ---- epilogue: C[m, n] -> out[epi.row(m) + epi.col(n)] ----------------------------------------
// Epi provides: long long row(int m) (-1: outside), long long col(int n) (-1: outside) and
// void put(long long off, int n, Acc v).
template <class Cfg, class Epi>
__device__ __forceinline__ void ig_epilogue(const Epi& epi, const IgAccum<Cfg>& acc, int m0,
                                            int n0) {
    typedef IgAccum<Cfg> A;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int wm0 = m0 + (warp % Cfg::WARPS_M) * Cfg::WM;
    const int wn0 = n0 + (warp / Cfg::WARPS_M) * Cfg::WN;
    long long cols[A::COLS];
#pragma unroll
    for (int j = 0; j < A::COLS; ++j) cols[j] = epi.col(A::col_of(wn0, lane, j));
#pragma unroll
    for (int i = 0; i < A::ROWS; ++i) {
        const long long r = epi.row(A::row_of(wm0, lane, i));
        if (r < 0) continue;
#pragma unroll
        for (int j = 0; j < A::COLS; ++j)
            if (cols[j] >= 0) epi.put(r + cols[j], A::col_of(wn0, lane, j), acc.get(i, j));
    }
}

#endif  // GPUCONV_IGEMM_COMMON_CUH
