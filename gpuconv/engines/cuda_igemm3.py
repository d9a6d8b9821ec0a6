"""Third-generation CUDA algorithms: implicit GEMM over NHWC on the tensor cores (cp.async
pipeline, swizzled shared memory, ldmatrix, mma.sync) -- host side: the ONE list of kernel
instantiations (catalogued in gpuconv.kernel_loader at import), tile configurations, the argument
struct, launch grids, split-K sizing, supports(), and the algorithms registered as ``igemm3_*``.

Importable without CuPy. Layout (CONTRACT-layouts.md): these algorithms are "nhwc" only
(``fn.layouts == ("nhwc",)``) and take PHYSICAL C-contiguous arrays:

    fprop: fn(p, x[N,H,W,C], w[K,R,S,Cg], bias[K] or None) -> y[N,P,Q,K]
    dgrad: fn(p, w[K,R,S,Cg], dy[N,P,Q,K]) -> dx[N,H,W,C]
    wgrad: fn(p, x[N,H,W,C], dy[N,P,Q,K]) -> dw[K,R,S,Cg]

where p is the logical gpuconv.ConvProblem. "auto" never picks them unless
gpuconv.config.third_generation_enabled() (off by default; GPUCONV_THIRD_GEN=1); they stay
selectable by name.

Algorithms: ``igemm3_tc_<BM>x<BN>`` (fprop; float16 / bfloat16 on mma m16n8k16, float32 on
m16n8k8 TF32 while gpuconv.set_allow_tf32(True)), ``igemm3_tc_dgrad_<BM>x<BN>`` (stride phases,
one launch per phase) and ``igemm3_tc_wgrad_<BM>x<BN>`` (split-K over N*P*Q), same dtypes.
Kernel side: kernels/igemm3_common.cuh (primitives), kernels/igemm3_fprop.cu,
kernels/igemm3_grad.cuh + igemm3_dgrad.cu / igemm3_wgrad.cu.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..config import get_allow_tf32
from ..kernel_loader import add_kernels, get_kernel, require_cuda
from ..problem import ConvProblem
from . import cuda_igemm as _gen2   # shared public helpers (dtype -> C++ type names)

MODE_F16, MODE_TF32 = 1, 2   # IG_MODE_* of kernels/igemm_common.cuh
MAX_RS = 32                  # IG3_MAX_RS: a tap mask is one 32-bit word
INT32_MAX = 2**31 - 1
MAX_GRID_YZ = 65535
GENERATION = 3


@dataclass(frozen=True)
class Tile3:
    """A block tile: BM x BN outputs, BK k per iteration, WARPS_M x WARPS_N warps, STAGES
    cp.async buffers."""
    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int

    @property
    def threads(self):
        return 32 * self.warps_m * self.warps_n

    @property
    def label(self):
        return f"{self.bm}x{self.bn}"

    def smem_bytes(self, itemsize):
        return self.stages * (self.bm + self.bn) * self.bk * itemsize


#: (C++ type, mode) -> tiles. Rows of 64 bytes per k-iteration (BK = 32 16-bit / 16 fp32),
#: 3 stages for 128x128 (48 KB static shared memory), 4 for the 64-wide-N tile (K <= 64).
IGEMM3_CONFIGS = {
    ("ig_f16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(128, 64, 32, 2, 2, 4)),
    ("ig_bf16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(128, 64, 32, 2, 2, 4)),
    ("float", MODE_TF32): (Tile3(128, 128, 16, 2, 2, 3), Tile3(128, 64, 16, 2, 2, 4)),
}
#: dgrad: fprop's tiles (A = dy rows as fprop's x, B = w read [k][c]); wgrad: BM == BN (a
#: thread's dy and x chunks share their N*P*Q rows).
#: TF32 128x128 on 8 warps (64x32 warp tiles): its fragments come by 32-bit LDS with their
#: addresses in registers, and 4 warps of 64x64 need more than the 240-register budget.
IGEMM3_DGRAD_CONFIGS = {
    ("ig_f16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(128, 64, 32, 2, 2, 4)),
    ("ig_bf16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(128, 64, 32, 2, 2, 4)),
    ("float", MODE_TF32): (Tile3(128, 128, 16, 2, 4, 3), Tile3(128, 64, 16, 2, 2, 4)),
}
IGEMM3_WGRAD_CONFIGS = {
    ("ig_f16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(64, 64, 32, 2, 2, 4)),
    ("ig_bf16", MODE_F16): (Tile3(128, 128, 32, 2, 2, 3), Tile3(64, 64, 32, 2, 2, 4)),
    ("float", MODE_TF32): (Tile3(128, 128, 16, 2, 4, 3), Tile3(64, 64, 16, 2, 2, 4)),
}
CONFIGS = {"fprop": IGEMM3_CONFIGS, "dgrad": IGEMM3_DGRAD_CONFIGS, "wgrad": IGEMM3_WGRAD_CONFIGS}
ITEMSIZE = {"float": 4, "ig_f16": 2, "ig_bf16": 2}
CTYPES = ("ig_f16", "ig_bf16", "float")


def ctype_of(dtype):
    """numpy dtype (or name) -> the kernels' C++ storage type (the second generation's names),
    or None for a dtype the third generation does not take (float64)."""
    ct = _gen2.ctype_of(dtype)
    return ct if ct in CTYPES else None


def kernel_name(op, ctype, mode, t: Tile3) -> str:
    return (f"igemm3_{op}<{ctype}, {mode}, {t.bm}, {t.bn}, {t.bk}, {t.warps_m}, {t.warps_n}, "
            f"{t.stages}>")


def _names(op):
    out = [kernel_name(op, ct, mode, t) for (ct, mode), tiles in CONFIGS[op].items()
           for t in tiles]
    if op == "fprop":
        out += [f"igemm3_splitk_reduce<{ct}>" for ct in CTYPES]
    return tuple(out)


# ---- the argument struct (Igemm3Args in kernels/igemm3_common.cuh), all int32 ----------------
_FIELDS = ("N C H W K R S P Q pad_h pad_w stride_h stride_w dil_h dil_w groups Cg Kg "
           "gemm_m gemm_n gemm_k has_bias splits iters iters_per_split "
           "reserved0 reserved1 reserved2").split()
IGEMM3_ARGS_DTYPE = np.dtype([(f, np.int32) for f in _FIELDS])
_GRAD_FIELDS = ("N C H W K R S P Q pad_h pad_w stride_h stride_w dil_h dil_w groups Cg Kg "
                "gemm_m gemm_n gemm_k splits iters iters_per_split "
                "ph_h0 ph_w0 ph_H ph_W ph_p0 ph_q0 ph_dp ph_dq "
                "ph_r0 ph_rstep ph_nr ph_s0 ph_sstep ph_ns bk_n bk_p bk_q reserved0").split()
IGEMM3_GRAD_ARGS_DTYPE = np.dtype([(f, np.int32) for f in _GRAD_FIELDS])
STRUCTS = (("Igemm3Args", IGEMM3_ARGS_DTYPE), ("Igemm3GradArgs", IGEMM3_GRAD_ARGS_DTYPE))

#: THE list: (file in kernels/, name expressions); loader, compile tests, SASS tool, CPU runs.
IGEMM3_KERNELS = (
    ("igemm3_fprop.cu", _names("fprop")),
    ("igemm3_dgrad.cu", _names("dgrad")),
    ("igemm3_wgrad.cu", _names("wgrad")),
)

for _file, _n in IGEMM3_KERNELS:
    add_kernels(_file, _n, STRUCTS)


# ---- sizes -----------------------------------------------------------------------------------
def k_iterations(p: ConvProblem, tile: Tile3) -> int:
    """fprop k-iterations: one per (filter tap, BK-channel block)."""
    return p.R * p.S * -(-p.Cg // tile.bk)


def fprop_splits(p: ConvProblem, tile: Tile3, sm_count: int, max_splits=16, min_iters=4):
    """Deterministic split-K factor for fprop: when the (M x Kg x groups) grid gives fewer than
    two waves of one block per SM, split the k-iterations so it does, while every split keeps at
    least `min_iters` iterations. A sizing rule, not a tuned value."""
    blocks = -(-p.N * p.P * p.Q // tile.bm) * -(-p.Kg // tile.bn) * p.groups
    if blocks >= 2 * sm_count:
        return 1
    want = -(-2 * sm_count // max(blocks, 1))
    cap = max(1, k_iterations(p, tile) // min_iters)
    return int(max(1, min(want, cap, max_splits, MAX_GRID_YZ // p.groups)))


def launch_grid(p: ConvProblem, tile: Tile3, splits=1):
    return (-(-p.N * p.P * p.Q // tile.bm), -(-p.Kg // tile.bn), p.groups * int(splits))


def fprop_args(p: ConvProblem, tile: Tile3, *, splits=1, has_bias=False):
    """(Igemm3Args as a (1,) structured array, grid) of fprop on p."""
    a = np.zeros(1, IGEMM3_ARGS_DTYPE)
    for f in ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "pad_h", "pad_w", "stride_h",
              "stride_w", "dil_h", "dil_w", "groups", "Cg", "Kg"):
        a[f] = getattr(p, f)
    a["gemm_m"], a["gemm_n"], a["gemm_k"] = p.N * p.P * p.Q, p.Kg, p.R * p.S * p.Cg
    iters = k_iterations(p, tile)
    splits = max(1, min(int(splits), iters))
    per = -(-iters // splits)
    splits = -(-iters // per)   # no empty split
    a["has_bias"], a["splits"], a["iters"], a["iters_per_split"] = int(has_bias), splits, iters, per
    grid = launch_grid(p, tile, splits)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ or grid[0] > INT32_MAX:
        raise ValueError(f"fprop grid {grid} exceeds CUDA's grid limits (supports() excludes {p})")
    return a, grid


def fits_int32(p: ConvProblem) -> bool:
    """Sizes the kernels hold in int32: the GEMM's rows (N*P*Q) and the weight (K*R*S*Cg, its
    offsets are int32). Offsets into x, y and the split-K workspace are formed in 64 bits, so
    x and y themselves may pass 2^31 elements (tested on a sparse 2^33-element x)."""
    return max(p.N * p.P * p.Q, p.K * p.R * p.S * p.Cg) <= INT32_MAX


def channels_ok(p: ConvProblem, itemsize: int) -> bool:
    """16-byte chunks along C: Cg a multiple of 8 (16-bit) or 4 (fp32); no predicated
    sub-chunk path (supports() is False otherwise)."""
    return p.Cg % (16 // itemsize) == 0


# ---- device facts ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return require_cuda().cuda.Device(device_id).attributes["MultiProcessorCount"]


def _current_sm_count():
    return _sm_count(require_cuda().cuda.runtime.getDevice())


def _mode_for(ctype):
    if ctype in ("ig_f16", "ig_bf16"):
        return MODE_F16
    if ctype == "float" and get_allow_tf32():
        return MODE_TF32
    return None


class Igemm3Fprop:
    """fprop on NHWC: one tile configuration per registered algorithm."""

    layouts = ("nhwc",)
    generation = GENERATION
    op = "fprop"

    def __init__(self, label, splits=None):
        self.label = label
        self.name = f"igemm3_tc_{label}"
        self.splits = splits   # None: fprop_splits(); an int forces it (tests, benchmark)

    def _config(self, dtype):
        ct = ctype_of(dtype)
        mode = _mode_for(ct) if ct else None
        if mode is None:
            return None
        tile = next((t for t in CONFIGS[self.op][(ct, mode)] if t.label == self.label), None)
        return None if tile is None else (ct, mode, tile)

    def supports(self, p: ConvProblem, dtype) -> bool:
        cfg = self._config(dtype)
        if cfg is None:
            return False
        ct, _, tile = cfg
        return (channels_ok(p, ITEMSIZE[ct]) and p.R <= MAX_RS and p.S <= MAX_RS
                and fits_int32(p) and launch_grid(p, tile)[1] <= MAX_GRID_YZ
                and p.groups <= MAX_GRID_YZ)

    def __call__(self, p, x, w, bias=None):
        import cupy
        ct, mode, tile = self._config(x.dtype)
        if x.shape != (p.N, p.H, p.W, p.C) or w.shape != (p.K, p.R, p.S, p.Cg):
            raise ValueError(f"{self.name} takes physical NHWC x {(p.N, p.H, p.W, p.C)} and KRSC "
                             f"w {(p.K, p.R, p.S, p.Cg)}, got {x.shape} and {w.shape}")
        for nm, arr in (("x", x), ("w", w)) + ((("bias", bias),) if bias is not None else ()):
            if arr.dtype != x.dtype:
                raise TypeError(f"{self.name}: {nm} is {arr.dtype}, x is {x.dtype}")
            if not arr.flags.c_contiguous:
                raise ValueError(f"{self.name}: {nm} must be C-contiguous (physical layout)")
            if nm != "bias" and arr.data.ptr % 16:
                raise ValueError(f"{self.name}: {nm} must be 16-byte aligned (cp.async)")
        if bias is not None and bias.shape != (p.K,):
            raise ValueError(f"{self.name}: bias must have shape {(p.K,)}, got {bias.shape}")
        y = cupy.empty((p.N, p.P, p.Q, p.K), x.dtype)
        splits = self.splits if self.splits is not None else fprop_splits(
            p, tile, _current_sm_count())
        a, grid = fprop_args(p, tile, splits=splits, has_bias=bias is not None)
        if 0 in grid:   # no GEMM rows (N == 0): an empty y; CUDA rejects a grid of 0 blocks
            return y
        splits = int(a["splits"][0])
        ws = cupy.empty((splits * y.size,) if splits > 1 else (0,), np.float32)
        b = bias if bias is not None else w
        get_kernel(kernel_name("fprop", ct, mode, tile))(grid, (tile.threads,), (x, w, b, y, ws, a))
        if splits > 1:
            blocks = int(min(-(-y.size // 256), 1 << 16))
            get_kernel(f"igemm3_splitk_reduce<{ct}>")((blocks,), (256,), (ws, b, y, a))
        return y


# ---- dgrad and wgrad ----------------------------------------------------------------------------
def _gcd(a, b):
    while b:
        a, b = b, a % b
    return a


def _axis_phase(ph, size, pad, stride, dil, taps):
    """One axis of a dgrad stride phase: outputs o = o0 + i*stride (i < n_out) with
    (o + pad) % stride == ph; taps t = t0 + a*tstep (a < nt) with t*dil % stride == ph; dy
    index of phase row i under tap a = i + d0 - a*dd. Returns (o0, n_out, t0, tstep, nt, d0, dd)."""
    o0 = (ph - pad) % stride
    n_out = max(0, -(-(size - o0) // stride))
    tstep = stride // _gcd(stride, dil)
    t0 = next((t for t in range(min(taps, tstep)) if (t * dil) % stride == ph), None)
    if t0 is None:
        return o0, n_out, 0, tstep, 0, 0, 0
    nt = -(-(taps - t0) // tstep)
    d0 = (o0 + pad - t0 * dil) // stride   # exact
    return o0, n_out, t0, tstep, nt, d0, tstep * dil // stride


def dgrad_phases(p: ConvProblem):
    """[(ph_h, ph_w, axis_h, axis_w)] of the stride phases that hold output pixels."""
    out = []
    for ph in range(p.stride_h):
        ah = _axis_phase(ph, p.H, p.pad_h, p.stride_h, p.dil_h, p.R)
        for pw in range(p.stride_w):
            aw = _axis_phase(pw, p.W, p.pad_w, p.stride_w, p.dil_w, p.S)
            if ah[1] and aw[1]:
                out.append((ph, pw, ah, aw))
    return out


def _grad_base(p: ConvProblem):
    a = np.zeros(1, IGEMM3_GRAD_ARGS_DTYPE)
    for f in ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "pad_h", "pad_w", "stride_h",
              "stride_w", "dil_h", "dil_w", "groups", "Cg", "Kg"):
        a[f] = getattr(p, f)
    return a


def _split_iters(a, iters, splits):
    a["splits"], a["iters"] = splits, iters
    a["iters_per_split"] = max(1, -(-iters // splits))


def dgrad_args(p: ConvProblem, tile: Tile3, *, splits=1):
    """[(Igemm3GradArgs, grid)] of dgrad on p, one per stride phase with pixels. Every phase
    gets the same split count (partials of all phases land in one workspace over dx); a split
    without k-iterations writes zeros, so does a phase without taps."""
    out = []
    for _, _, (h0, nh, r0, rst, nr, p0, dp), (w0, nw, s0, sst, ns, q0, dq) in dgrad_phases(p):
        a = _grad_base(p)
        a["gemm_m"], a["gemm_n"], a["gemm_k"] = p.N * nh * nw, p.Cg, p.Kg * nr * ns
        for f, v in zip(("ph_h0 ph_w0 ph_H ph_W ph_p0 ph_q0 ph_dp ph_dq ph_r0 ph_rstep ph_nr "
                         "ph_s0 ph_sstep ph_ns").split(),
                        (h0, w0, nh, nw, p0, q0, dp, dq, r0, rst, nr, s0, sst, ns)):
            a[f] = v
        _split_iters(a, nr * ns * -(-p.Kg // tile.bk), splits)
        grid = (-(-p.N * nh * nw // tile.bm), -(-p.Cg // tile.bn), p.groups * splits)
        if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ or grid[0] > INT32_MAX:
            raise ValueError(f"dgrad grid {grid} exceeds CUDA's grid limits")
        out.append((a, grid))
    return out


def dgrad_splits(p: ConvProblem, tile: Tile3, sm_count: int, max_splits=16, min_iters=4):
    """fprop_splits' rule on the largest phase's grid and k-iterations."""
    best_blocks, best_iters = 0, 0
    for _, _, ah, aw in dgrad_phases(p):
        best_blocks = max(best_blocks, -(-p.N * ah[1] * aw[1] // tile.bm) * -(-p.Cg // tile.bn)
                          * p.groups)
        best_iters = max(best_iters, ah[4] * aw[4] * -(-p.Kg // tile.bk))
    if best_blocks >= 2 * sm_count:
        return 1
    want = -(-2 * sm_count // max(best_blocks, 1))
    cap = max(1, best_iters // min_iters)
    return int(max(1, min(want, cap, max_splits, MAX_GRID_YZ // p.groups)))


def wgrad_args(p: ConvProblem, tile: Tile3, *, splits=1):
    """(Igemm3GradArgs, grid) of wgrad on p: GEMM Kg x R*S*Cg x N*P*Q per group."""
    a = _grad_base(p)
    npq, pq = p.N * p.P * p.Q, p.P * p.Q
    a["gemm_m"], a["gemm_n"], a["gemm_k"] = p.Kg, p.R * p.S * p.Cg, npq
    a["bk_n"], a["bk_p"], a["bk_q"] = tile.bk // pq, (tile.bk % pq) // p.Q, tile.bk % p.Q
    iters = -(-npq // tile.bk)
    splits = max(1, min(int(splits), iters))
    if iters:
        splits = -(-iters // -(-iters // splits))   # no empty split
    _split_iters(a, iters, splits)
    grid = (-(-p.Kg // tile.bm), -(-p.R * p.S * p.Cg // tile.bn), p.groups * splits)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ or grid[0] > INT32_MAX:
        raise ValueError(f"wgrad grid {grid} exceeds CUDA's grid limits")
    return a, grid


def wgrad_splits(p: ConvProblem, tile: Tile3, sm_count: int, max_splits=64, min_iters=8):
    """Split N*P*Q when the (Kg x R*S*Cg x groups) grid is under two waves."""
    blocks = -(-p.Kg // tile.bm) * -(-p.R * p.S * p.Cg // tile.bn) * p.groups
    if blocks >= 2 * sm_count:
        return 1
    want = -(-2 * sm_count // max(blocks, 1))
    cap = max(1, -(-p.N * p.P * p.Q // tile.bk) // min_iters)
    return int(max(1, min(want, cap, max_splits, MAX_GRID_YZ // p.groups)))


def _reduce_args(rows, cols, splits):
    """Igemm3Args for igemm3_splitk_reduce over a rows x cols output (no bias)."""
    r = np.zeros(1, IGEMM3_ARGS_DTYPE)
    r["gemm_m"], r["K"], r["splits"], r["has_bias"] = rows, cols, splits, 0
    return r


def _reduce(ct, ws, out, rows, cols, splits):
    blocks = int(min(-(-out.size // 256), 1 << 16))
    get_kernel(f"igemm3_splitk_reduce<{ct}>")((blocks,), (256,),
                                              (ws, out, out, _reduce_args(rows, cols, splits)))


def _check_operands(name, pairs):
    """pairs: [(argument name, array, wanted shape, wanted 'physical' description)]."""
    dt = pairs[0][1].dtype
    for nm, arr, shape, what in pairs:
        if tuple(arr.shape) != shape:
            raise ValueError(f"{name} takes physical {what} {nm} {shape}, got {tuple(arr.shape)}")
        if arr.dtype != dt:
            raise TypeError(f"{name}: {nm} is {arr.dtype}, {pairs[0][0]} is {dt}")
        if not arr.flags.c_contiguous:
            raise ValueError(f"{name}: {nm} must be C-contiguous (physical layout)")
        if arr.data.ptr % 16:
            raise ValueError(f"{name}: {nm} must be 16-byte aligned (cp.async)")


class _Grad3(Igemm3Fprop):
    """Shared by Igemm3Dgrad / Igemm3Wgrad: tile lookup and the support rules (16-byte
    chunks along both K and Cg)."""

    def __init__(self, label, splits=None):
        super().__init__(label, splits)
        self.name = f"igemm3_tc_{self.op}_{label}"

    def _checked_config(self, p, dtype):
        """(ctype, mode, tile) for a call on p in dtype; TypeError/ValueError otherwise."""
        if not isinstance(p, ConvProblem):
            raise TypeError(f"{self.name}: p must be a gpuconv.ConvProblem, got {type(p).__name__}")
        cfg = self._config(dtype)
        if cfg is None or not self.supports(p, dtype):
            raise ValueError(f"{self.name} does not support {p} in {dtype}")
        return cfg

    def supports(self, p: ConvProblem, dtype) -> bool:
        cfg = self._config(dtype)
        if cfg is None:
            return False
        ct, _, tile = cfg
        vec = 16 // ITEMSIZE[ct]
        return (p.Cg % vec == 0 and p.Kg % vec == 0 and p.R <= MAX_RS and p.S <= MAX_RS
                and fits_int32(p) and p.N * p.H * p.W <= INT32_MAX
                and p.groups <= MAX_GRID_YZ and self._grid_ok(p, tile))


class Igemm3Dgrad(_Grad3):
    """dgrad on NHWC: fn(p, w[K,R,S,Cg], dy[N,P,Q,K]) -> dx[N,H,W,C]; one launch per stride
    phase (kernels/igemm3_dgrad.cu), split-K through igemm3_splitk_reduce."""

    op = "dgrad"

    @staticmethod
    def _grid_ok(p, tile):
        return -(-p.Cg // tile.bn) <= MAX_GRID_YZ

    def __call__(self, p, w, dy):
        import cupy
        ct, mode, tile = self._checked_config(p, dy.dtype)
        _check_operands(self.name, [("dy", dy, (p.N, p.P, p.Q, p.K), "NHWC"),
                                    ("w", w, (p.K, p.R, p.S, p.Cg), "KRSC")])
        dx = cupy.empty((p.N, p.H, p.W, p.C), dy.dtype)
        if dx.size == 0:
            return dx
        splits = self.splits if self.splits is not None else dgrad_splits(
            p, tile, _current_sm_count())
        splits = max(1, int(splits))
        ws = cupy.empty((splits * dx.size,) if splits > 1 else (0,), np.float32)
        kern = get_kernel(kernel_name("dgrad", ct, mode, tile))
        for a, grid in dgrad_args(p, tile, splits=splits):
            if grid[0]:
                kern(grid, (tile.threads,), (w, dy, dx, ws, a))
        if splits > 1:
            _reduce(ct, ws, dx, p.N * p.H * p.W, p.C, splits)
        return dx


class Igemm3Wgrad(_Grad3):
    """wgrad on NHWC: fn(p, x[N,H,W,C], dy[N,P,Q,K]) -> dw[K,R,S,Cg]
    (kernels/igemm3_wgrad.cu), deterministic split-K over N*P*Q."""

    op = "wgrad"

    @staticmethod
    def _grid_ok(p, tile):
        return (-(-p.R * p.S * p.Cg // tile.bn) <= MAX_GRID_YZ
                and p.N * p.P * p.Q <= INT32_MAX - tile.bk * 64)

    def __call__(self, p, x, dy):
        import cupy
        ct, mode, tile = self._checked_config(p, x.dtype)
        _check_operands(self.name, [("x", x, (p.N, p.H, p.W, p.C), "NHWC"),
                                    ("dy", dy, (p.N, p.P, p.Q, p.K), "NHWC")])
        dw = cupy.empty((p.K, p.R, p.S, p.Cg), x.dtype)
        if dw.size == 0:
            return dw
        splits = self.splits if self.splits is not None else wgrad_splits(
            p, tile, _current_sm_count())
        a, grid = wgrad_args(p, tile, splits=splits)
        splits = int(a["splits"][0])
        # no rows (N*P*Q == 0): wgrad_args gave one split, and the kernel writes dw = 0
        ws = cupy.empty((splits * dw.size,) if splits > 1 else (0,), np.float32)
        get_kernel(kernel_name("wgrad", ct, mode, tile))(grid, (tile.threads,), (x, dy, dw, ws, a))
        if splits > 1:
            _reduce(ct, ws, dw, p.R * p.S * p.Cg, p.K, splits)
        return dw


def algorithms():
    """op -> [algorithm objects] of this module."""
    labels = sorted({t.label for tiles in IGEMM3_CONFIGS.values() for t in tiles}, reverse=True)
    out = {"fprop": [Igemm3Fprop(lab) for lab in labels]}
    for op, cls in (("dgrad", Igemm3Dgrad), ("wgrad", Igemm3Wgrad)):
        labs = sorted({t.label for tiles in CONFIGS[op].values() for t in tiles}, reverse=True)
        out[op] = [cls(lab) for lab in labs]
    return out


def register(register_algorithm):
    names = {}
    for op, algos in algorithms().items():
        for algo in algos:
            register_algorithm(op, algo.name, algo, replace=True)
            names.setdefault(op, []).append(algo.name)
    return names
