"""Third-generation CUDA algorithms: implicit GEMM over NHWC on the tensor cores (cp.async
pipeline, swizzled shared memory, ldmatrix, mma.sync) -- host side: the ONE list of kernel
instantiations (catalogued in gpuconv.kernel_loader at import), tile configurations, the argument
struct, launch grids, split-K sizing, supports(), and the algorithms registered as ``igemm3_*``.

Importable without CuPy. Layout (CONTRACT-layouts.md): these algorithms are "nhwc" only
(``fn.layouts == ("nhwc",)``) and take PHYSICAL C-contiguous arrays:

    fprop: fn(p, x[N,H,W,C], w[K,R,S,Cg], bias[K] or None) -> y[N,P,Q,K]

where p is the logical gpuconv.ConvProblem. "auto" never picks them unless
gpuconv.config.third_generation_enabled() (off by default; GPUCONV_THIRD_GEN=1); they stay
selectable by name.

Algorithms: ``igemm3_tc_<BM>x<BN>`` (fprop; float16 / bfloat16 on mma m16n8k16, float32 on
m16n8k8 TF32 while gpuconv.set_allow_tf32(True)). dgrad / wgrad: see the GEN3GRAD markers.
Kernel side: kernels/igemm3_common.cuh (primitives), kernels/igemm3_fprop.cu.
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
    out = [kernel_name(op, ct, mode, t) for (ct, mode), tiles in IGEMM3_CONFIGS.items()
           for t in tiles]
    if op == "fprop":
        out += [f"igemm3_splitk_reduce<{ct}>" for ct in CTYPES]
    return tuple(out)


# ---- the argument struct (Igemm3Args in kernels/igemm3_common.cuh), all int32 ----------------
_FIELDS = ("N C H W K R S P Q pad_h pad_w stride_h stride_w dil_h dil_w groups Cg Kg "
           "gemm_m gemm_n gemm_k has_bias splits iters iters_per_split "
           "reserved0 reserved1 reserved2").split()
IGEMM3_ARGS_DTYPE = np.dtype([(f, np.int32) for f in _FIELDS])
STRUCTS = (("Igemm3Args", IGEMM3_ARGS_DTYPE),)

#: THE list: (file in kernels/, name expressions); loader, compile tests, SASS tool, CPU runs.
#: GEN3GRAD: append ("igemm3_dgrad.cu", _names("dgrad")) and ("igemm3_wgrad.cu", ...) here.
IGEMM3_KERNELS = (
    ("igemm3_fprop.cu", _names("fprop")),
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
        tile = next((t for t in IGEMM3_CONFIGS[(ct, mode)] if t.label == self.label), None)
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


# GEN3GRAD: class Igemm3Dgrad / Igemm3Wgrad (layouts = ("nhwc",), generation = 3) go here and
# into algorithms() below.


def algorithms():
    """op -> [algorithm objects] of this module."""
    labels = sorted({t.label for tiles in IGEMM3_CONFIGS.values() for t in tiles}, reverse=True)
    out = {"fprop": [Igemm3Fprop(lab) for lab in labels]}
    # GEN3GRAD: out["dgrad"] = [...]; out["wgrad"] = [...]
    return out


def register(register_algorithm):
    names = {}
    for op, algos in algorithms().items():
        for algo in algos:
            register_algorithm(op, algo.name, algo, replace=True)
            names.setdefault(op, []).append(algo.name)
    return names
