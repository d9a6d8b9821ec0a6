"""Second-generation CUDA algorithms: implicit GEMM (SIMT and tensor cores), Winograd F(2x2,3x3),
direct depthwise -- host side: the ONE list of kernel instantiations (added to the kernel
catalogue, gpuconv.kernel_loader, at import), tile configurations, launch geometry, argument
packing, and the algorithms that :mod:`gpuconv.engines.cuda_registry` registers.

Importable without CuPy (the compile test and the CPU tests use the tables and the pure
functions); CuPy is touched only when an algorithm runs.

Algorithms (names as registered in ``cuda_registry.ALGORITHMS[op]``):
    igemm_simt_<BM>x<BN>   fprop/dgrad/wgrad, float32 / float64, FMA on CUDA cores
    igemm_tc_<BM>x<BN>     fprop/dgrad/wgrad, float16 / bfloat16 (mma m16n8k16, fp32 accumulate);
                           float32 only while TF32 is allowed (gpuconv.set_allow_tf32, mma m16n8k8)
    winograd_f2x3          fprop and dgrad, 3x3 stride 1 dilation 1, float32 / float64 only (its
                           GEMM is cupy.matmul on float32 (float64) transforms; not offered for
                           16-bit inputs, see WINO_CTYPES)
    direct_depthwise       fprop/dgrad/wgrad, groups == C (one input channel per group)
Each registered function has ``supports(p, dtype) -> bool``, which the autotuner reads.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..config import get_allow_tf32
from ..kernel_loader import add_kernels, batch_chunk, get_kernel, require_cuda
from ..problem import ConvProblem

# ---------------------------------------------------------------------------------------------
# tiles and the one list of instantiations (loader, compile test, dispatch)
# ---------------------------------------------------------------------------------------------
MODE_SIMT, MODE_F16, MODE_TF32 = 0, 1, 2
MAX_STRIDE = 16  # IG_MAXS in kernels/igemm_common.cuh: the dgrad phase tables' length


@dataclass(frozen=True)
class Tile:
    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int

    @property
    def threads(self):
        return 32 * self.warps_m * self.warps_n

    @property
    def label(self):
        return f"{self.bm}x{self.bn}"


#: (C++ type, mode) -> the tiles compiled for it. Two per data path keeps the compile within the
#: CI budget (the compile test times it); the autotuner picks among them per problem.
IGEMM_CONFIGS = {
    ("float", MODE_SIMT): (Tile(128, 128, 16, 2, 4), Tile(64, 64, 16, 2, 2)),
    ("double", MODE_SIMT): (Tile(64, 64, 8, 2, 2),),
    ("ig_f16", MODE_F16): (Tile(128, 128, 32, 2, 4), Tile(64, 64, 32, 2, 2)),
    ("ig_bf16", MODE_F16): (Tile(128, 128, 32, 2, 4), Tile(64, 64, 32, 2, 2)),
    ("float", MODE_TF32): (Tile(128, 128, 16, 2, 4), Tile(64, 64, 16, 2, 2)),
}
ITEMSIZE = {"float": 4, "double": 8, "ig_f16": 2, "ig_bf16": 2}
ACC_CTYPE = {"float": "float", "double": "double", "ig_f16": "float", "ig_bf16": "float"}
DIRECT_CTYPES = ("float", "double", "ig_f16", "ig_bf16")
# Winograd is not offered for float16 / bfloat16 (issue 12, item 3): its transforms U, V, M are
# float32 in global memory and its batched GEMM is an fp32 cupy.matmul on CUDA cores, so for
# 16-bit inputs it moves twice the bytes and gives up the tensor cores that the implicit GEMM
# (igemm_tc_*) uses; keeping the transforms in 16 bits instead would round B^T d B and G g G^T a
# second time (an error a 16-bit user did not ask for). A tensor-core Winograd is left undone.
WINO_CTYPES = ("float", "double")


def ctype_of(dtype):
    """numpy dtype (or name) -> the C++ storage type of these kernels, or None."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    return {"float32": "float", "float64": "double", "float16": "ig_f16",
            "bfloat16": "ig_bf16"}.get(name)


def igemm_name(op, ctype, mode, tile: Tile) -> str:
    return (f"igemm_{op}<{ctype}, {mode}, {tile.bm}, {tile.bn}, {tile.bk}, {tile.warps_m}, "
            f"{tile.warps_n}>")


def _igemm_names(op):
    names = [igemm_name(op, ct, mode, t) for (ct, mode), tiles in IGEMM_CONFIGS.items()
             for t in tiles]
    if op == "wgrad":
        names += [f"igemm_wgrad_reduce<{ct}>" for ct in DIRECT_CTYPES]
    return tuple(names)


def _wino_names():
    return tuple(f"{k}<{ct}, {ACC_CTYPE[ct]}>" for k in ("wino_filter", "wino_input",
                                                          "wino_output") for ct in WINO_CTYPES)


#: THE list: (file in kernels/, name expressions). The loader compiles exactly these, the
#: compile test (tests/test_igemm_compile.py) compiles exactly these with nvcc for sm_80/sm_90.
IGEMM_KERNELS = (
    ("igemm_fprop.cu", _igemm_names("fprop")),
    ("igemm_dgrad.cu", _igemm_names("dgrad")),
    ("igemm_wgrad.cu", _igemm_names("wgrad")),
    ("winograd.cu", _wino_names()),
    ("direct_depthwise.cu", tuple(f"{k}<{ct}>" for k in ("dw_fprop", "dw_dgrad", "dw_wgrad")
                                  for ct in DIRECT_CTYPES)),
)

# ---------------------------------------------------------------------------------------------
# the kernels' argument struct (IgemmArgs in kernels/igemm_common.cuh), all int32
# ---------------------------------------------------------------------------------------------
_SCALARS = ("N C H W K R S P Q pad_h pad_w stride_h stride_w dil_h dil_w groups Cg Kg "
            "gemm_m gemm_n gemm_k vec_a vec_b has_bias splits k_chunk r_step s_step "
            "dp_step dq_step").split()
_TABLES = ("ph_r0 ph_tr ph_dp0 ph_n pw_s0 pw_ts pw_dq0 pw_n").split()
IGEMM_ARGS_DTYPE = np.dtype([(f, np.int32) for f in _SCALARS]
                            + [(f, np.int32, (MAX_STRIDE,)) for f in _TABLES])
WINO_ARGS_FIELDS = ("N G Ci Ko Hin Win Hout Wout tiles_h tiles_w off_h off_w flip "
                    "has_bias").split()
WINO_ARGS_DTYPE = np.dtype([(f, np.int32) for f in WINO_ARGS_FIELDS])
STRUCTS = (("IgemmArgs", IGEMM_ARGS_DTYPE), ("WinoArgs", WINO_ARGS_DTYPE))
INT32_MAX = 2**31 - 1
#: CUDA's limit on gridDim.y and gridDim.z (gridDim.x goes to 2^31 - 1).
MAX_GRID_YZ = 65535

for _file, _names in IGEMM_KERNELS:
    add_kernels(_file, _names, STRUCTS)


def wgrad_splits(p: ConvProblem, tile: Tile, sm_count: int, max_splits=64, min_slabs=8):
    """Split-K factor for wgrad: enough blocks for two per SM when the (Kg x Cg*R*S) grid alone
    has fewer, while every split keeps >= min_slabs k-slabs. A sizing rule, not a tuned value.
    Never more than grid.z can hold (groups * splits <= 65535)."""
    _, m, n, k = p.gemm_shape("wgrad")
    blocks = -(-m // tile.bm) * -(-n // tile.bn) * p.groups
    want = -(-2 * sm_count // blocks)
    cap = max(1, k // (tile.bk * min_slabs))
    return int(max(1, min(want, cap, max_splits, MAX_GRID_YZ // p.groups)))


def gemm_rows(op, p: ConvProblem) -> int:
    """The GEMM's M as the kernel covers it: dgrad runs one stride phase per grid.z slice, so
    its M is the largest phase's N * ceil(H / stride_h) * ceil(W / stride_w)."""
    if op == "dgrad":
        return p.N * -(-p.H // p.stride_h) * -(-p.W // p.stride_w)
    return p.gemm_shape(op)[1]


def launch_grid(op, p: ConvProblem, tile: Tile, splits=1):
    """The (x, y, z) grid of the implicit-GEMM kernel of `op` on `p`: x covers the GEMM's M
    (dgrad: the largest stride phase), y its N, z the groups times the stride phases (dgrad) or
    the K splits (wgrad)."""
    g, _, n, _ = p.gemm_shape(op)
    m = gemm_rows(op, p)
    z = g * (p.stride_h * p.stride_w if op == "dgrad" else int(splits) if op == "wgrad" else 1)
    return (-(-m // tile.bm), -(-n // tile.bn), z)


def grid_fits(op, p: ConvProblem, tile: Tile, splits=1) -> bool:
    """gridDim.y and gridDim.z within CUDA's 65535 (dgrad: groups * stride^2 <= 65535)."""
    _, y, z = launch_grid(op, p, tile, splits)
    return y <= MAX_GRID_YZ and z <= MAX_GRID_YZ


def igemm_args(op, p: ConvProblem, tile: Tile, itemsize: int, *, splits=1, vec_a=False,
               vec_b=False, has_bias=False):
    """The IgemmArgs struct (a (1,) structured array) and the launch grid of `op` on `p`."""
    if max(p.stride_h, p.stride_w) > MAX_STRIDE:
        raise ValueError(f"implicit GEMM supports strides up to {MAX_STRIDE}")
    a = np.zeros(1, IGEMM_ARGS_DTYPE)
    for f in ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "pad_h", "pad_w", "stride_h",
              "stride_w", "dil_h", "dil_w", "groups", "Cg", "Kg"):
        a[f] = getattr(p, f)
    _, _, n, k = p.gemm_shape(op)
    splits = int(splits) if op == "wgrad" else 1
    k_chunk = -(-k // splits)
    k_chunk = -(-k_chunk // tile.bk) * tile.bk
    if op == "dgrad":
        # the stride phases, from the problem's own description (gpuconv.problem.phase_rows)
        rows_h, a["r_step"], a["dp_step"] = p.dgrad_phase_rows("h")
        rows_w, a["s_step"], a["dq_step"] = p.dgrad_phase_rows("w")
        for name, col in zip(("ph_r0", "ph_tr", "ph_dp0", "ph_n"), zip(*rows_h)):
            a[name][0, :len(col)] = col
        for name, col in zip(("pw_s0", "pw_ts", "pw_dq0", "pw_n"), zip(*rows_w)):
            a[name][0, :len(col)] = col
    a["gemm_m"], a["gemm_n"], a["gemm_k"] = gemm_rows(op, p), n, k
    a["vec_a"], a["vec_b"], a["has_bias"] = int(vec_a), int(vec_b), int(has_bias)
    a["splits"], a["k_chunk"] = splits, k_chunk
    grid = launch_grid(op, p, tile, splits)
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"{op} grid {grid} exceeds CUDA's 65535 limit on grid.y / grid.z "
                         f"(supports() excludes this problem: {p})")
    return a, grid


def fits_int32(p: ConvProblem) -> bool:
    """The kernels index with int32 inside one image/GEMM and int64 across images."""
    return max(p.N * p.P * p.Q, p.N * p.H * p.W, p.C * p.H * p.W, p.K * p.P * p.Q,
               p.K * p.Cg * p.R * p.S) <= INT32_MAX


def vec_ok(op, p: ConvProblem, itemsize: int, ptr: int) -> bool:
    """May the contiguous operand (fprop: w; wgrad: dy) be read in 16-byte groups?

    Every group starts at a multiple of kv = 16/itemsize elements of its row (tiles and splits
    start at multiples of BK), so rows must be whole groups and the base 16-byte aligned."""
    kv = 16 // itemsize
    row = p.Cg * p.R * p.S if op == "fprop" else p.P * p.Q
    return row % kv == 0 and ptr % 16 == 0


# ---------------------------------------------------------------------------------------------
# Winograd F(2x2, 3x3): the matrices and the tile algorithm in NumPy (the kernel's math, tested)
# ---------------------------------------------------------------------------------------------
WINO_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64)
WINO_G = np.array([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], np.float64)
WINO_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)


def winograd_supports(p: ConvProblem) -> bool:
    return (p.R == p.S == 3 and p.stride_h == p.stride_w == 1 and p.dil_h == p.dil_w == 1)


def winograd_geometry(op, p: ConvProblem):
    """(in_channels/group, out_channels/group, Hin, Win, Hout, Wout, off_h, off_w, flip)."""
    if op == "fprop":
        return p.Cg, p.Kg, p.H, p.W, p.P, p.Q, p.pad_h, p.pad_w, 0
    # dgrad, stride 1: dx = conv(dy zero-padded by 2 - pad, rot180(w) with k and c swapped)
    return p.Kg, p.Cg, p.P, p.Q, p.H, p.W, 2 - p.pad_h, 2 - p.pad_w, 1


def winograd_f2x3_numpy(op, p: ConvProblem, inp, w, bias=None):
    """The kernels' tile algorithm in NumPy (float64): fprop(x, w) or dgrad(dy, w)."""
    ci, ko, hin, win, hout, wout, off_h, off_w, flip = winograd_geometry(op, p)
    G, N = p.groups, p.N
    th, tw = -(-hout // 2), -(-wout // 2)
    w5 = w.astype(np.float64).reshape(G, p.Kg, p.Cg, 3, 3)
    filt = w5[:, :, :, ::-1, ::-1].transpose(0, 2, 1, 3, 4) if flip else w5  # (G, ko, ci, 3, 3)
    U = np.einsum("ar,gkcrs,bs->gkcab", WINO_G, filt, WINO_G)  # (G, ko, ci, 4, 4)
    # zero-padded input so that every 4x4 tile (rows 2*t - off .. +3) lies inside
    pad_t, pad_l = max(off_h, 0), max(off_w, 0)
    need_h, need_w = 2 * (th - 1) + 4 - off_h, 2 * (tw - 1) + 4 - off_w
    xin = inp.astype(np.float64).reshape(N, G, ci, hin, win)
    buf = np.zeros((N, G, ci, pad_t + max(need_h, hin), pad_l + max(need_w, win)))
    buf[..., pad_t:pad_t + hin, pad_l:pad_l + win] = xin
    h0, w0 = pad_t - off_h, pad_l - off_w
    d = np.stack([np.stack([buf[..., h0 + 2 * i:h0 + 2 * i + 4, w0 + 2 * j:w0 + 2 * j + 4]
                            for j in range(tw)], axis=3) for i in range(th)], axis=3)
    V = np.einsum("ar,ngcijrs,bs->ngcijab", WINO_BT, d, WINO_BT)  # (N, G, ci, th, tw, 4, 4)
    M = np.einsum("gkcab,ngcijab->ngkijab", U, V)
    Y = np.einsum("ra,ngkijab,sb->ngkirjs", WINO_AT, M, WINO_AT)  # (N, G, ko, th, 2, tw, 2)
    y = Y.reshape(N, G * ko, 2 * th, 2 * tw)[:, :, :hout, :wout]
    if bias is not None:
        y = y + bias.reshape(1, -1, 1, 1)
    return y


# ---------------------------------------------------------------------------------------------
# device facts (kernels come from gpuconv.kernel_loader.get_kernel, cached per device)
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _sm_count(device_id):
    return require_cuda().cuda.Device(device_id).attributes["MultiProcessorCount"]


def _current_sm_count():
    return _sm_count(require_cuda().cuda.runtime.getDevice())


# ---------------------------------------------------------------------------------------------
# the algorithms
# ---------------------------------------------------------------------------------------------
def _mode_for(ctype, tensor_cores):
    if tensor_cores:
        if ctype in ("ig_f16", "ig_bf16"):
            return MODE_F16
        if ctype == "float" and get_allow_tf32():
            return MODE_TF32
        return None
    return MODE_SIMT if ctype in ("float", "double") else None


class IgemmAlgorithm:
    """One registered implicit-GEMM algorithm: an op, a data path (SIMT / tensor cores), a tile."""

    def __init__(self, op, tensor_cores, label):
        self.op, self.tensor_cores, self.label = op, tensor_cores, label
        self.name = f"igemm_{'tc' if tensor_cores else 'simt'}_{label}"

    def _config(self, dtype):
        ct = ctype_of(dtype)
        mode = _mode_for(ct, self.tensor_cores) if ct else None
        if mode is None:
            return None
        tile = next((t for t in IGEMM_CONFIGS[(ct, mode)] if t.label == self.label), None)
        return None if tile is None else (ct, mode, tile)

    def supports(self, p: ConvProblem, dtype) -> bool:
        cfg = self._config(dtype)
        # wgrad: splits are capped to fit grid.z (wgrad_splits), so one split is what must fit
        return (cfg is not None and fits_int32(p) and max(p.stride_h, p.stride_w) <= MAX_STRIDE
                and grid_fits(self.op, p, cfg[2]))

    def __call__(self, p, *arrays):
        ct, mode, tile = self._config(arrays[0].dtype)
        return getattr(self, "_" + self.op)(p, ct, mode, tile, *arrays)

    def _launch(self, ct, mode, tile, args_grid, ptrs):
        a, grid = args_grid
        if 0 in grid:  # no rows of the GEMM (a batch of 0): an empty output, and CUDA rejects
            return     # a grid of 0 blocks (as launch() and _launch_1d skip it)
        get_kernel(igemm_name(self.op, ct, mode, tile))(grid, (tile.threads,), (*ptrs, a))

    def _fprop(self, p, ct, mode, tile, x, w, bias):
        import cupy
        y = cupy.empty(p.y_shape, x.dtype)
        isz = x.dtype.itemsize
        ag = igemm_args("fprop", p, tile, isz, vec_b=vec_ok("fprop", p, isz, w.data.ptr),
                        has_bias=bias is not None)
        self._launch(ct, mode, tile, ag, (x, w, bias if bias is not None else w, y))
        return y

    def _dgrad(self, p, ct, mode, tile, w, dy):
        import cupy
        dx = cupy.empty(p.x_shape, dy.dtype)
        self._launch(ct, mode, tile, igemm_args("dgrad", p, tile, dy.dtype.itemsize),
                     (w, dy, dx))
        return dx

    def _wgrad(self, p, ct, mode, tile, x, dy):
        import cupy
        isz = x.dtype.itemsize
        dw = cupy.empty(p.w_shape, x.dtype)
        splits = wgrad_splits(p, tile, _current_sm_count())
        acc = np.float64 if ct == "double" else np.float32
        # the workspace parameter is Acc*: with one split it is unused, but still of its type
        # (fp16 data has an fp32 Acc, so dw would not do)
        ws = cupy.empty(((splits,) + p.w_shape) if splits > 1 else (0,), acc)
        ag = igemm_args("wgrad", p, tile, isz, splits=splits,
                        vec_a=vec_ok("wgrad", p, isz, dy.data.ptr))
        self._launch(ct, mode, tile, ag, (x, dy, dw, ws))
        if splits > 1:
            _launch_1d(f"igemm_wgrad_reduce<{ct}>", dw.size,
                       (ws, dw, np.int64(dw.size), np.int32(splits)))
        return dw


def _launch_1d(name, n, args, block=256):
    blocks = int(min(-(-n // block), 1 << 16))
    if blocks:
        get_kernel(name)((blocks,), (block,), args)


class DepthwiseAlgorithm:
    name = "direct_depthwise"

    def __init__(self, op):
        self.op = op

    def supports(self, p: ConvProblem, dtype) -> bool:
        return (p.is_depthwise and ctype_of(dtype) is not None and fits_int32(p)
                and max(p.stride_h, p.stride_w) <= MAX_STRIDE)

    def __call__(self, p, *arrays):
        import cupy
        ct = ctype_of(arrays[0].dtype)
        a, _ = igemm_args("fprop", p, Tile(1, 1, 1, 1, 1), 4)
        if self.op == "fprop":
            x, w, bias = arrays
            y = cupy.empty(p.y_shape, x.dtype)
            a["has_bias"] = int(bias is not None)
            _launch_1d(f"dw_fprop<{ct}>", y.size, (x, w, bias if bias is not None else w, y, a))
            return y
        if self.op == "dgrad":
            w, dy = arrays
            dx = cupy.empty(p.x_shape, dy.dtype)
            _launch_1d(f"dw_dgrad<{ct}>", dx.size, (w, dy, dx, a))
            return dx
        x, dy = arrays
        dw = cupy.empty(p.w_shape, x.dtype)
        get_kernel(f"dw_wgrad<{ct}>")((dw.size,), (256,), (x, dy, dw, a))
        return dw


class WinogradAlgorithm:
    name = "winograd_f2x3"

    def __init__(self, op):
        self.op = op

    def supports(self, p: ConvProblem, dtype) -> bool:
        # float32 / float64 only: see WINO_CTYPES for why 16-bit inputs are not offered
        return winograd_supports(p) and ctype_of(dtype) in WINO_CTYPES and fits_int32(p)

    def __call__(self, p, *arrays):
        import cupy
        if self.op == "fprop":
            inp, w, bias = arrays
        else:
            w, inp = arrays
            bias = None
        ct = ctype_of(inp.dtype)
        acc = np.float64 if ct == "double" else np.float32
        ci, ko, hin, win, hout, wout, off_h, off_w, flip = winograd_geometry(self.op, p)
        G = p.groups
        th, tw = -(-hout // 2), -(-wout // 2)
        out = cupy.empty((p.N, G * ko, hout, wout), inp.dtype)
        U = cupy.empty((16, G, ko, ci), acc)
        a = np.zeros(1, WINO_ARGS_DTYPE)
        a["G"], a["Ci"], a["Ko"], a["Hin"], a["Win"] = G, ci, ko, hin, win
        a["Hout"], a["Wout"], a["tiles_h"], a["tiles_w"] = hout, wout, th, tw
        a["off_h"], a["off_w"], a["flip"], a["has_bias"] = off_h, off_w, flip, bias is not None
        _launch_1d(f"wino_filter<{ct}, {ACC_CTYPE[ct]}>", G * ko * ci, (w, U, a))
        isz = np.dtype(acc).itemsize
        per_image = 16 * th * tw * G * (ci + ko) * isz
        step = batch_chunk(p.N, per_image)
        for n0 in range(0, p.N, step):
            n = min(step, p.N - n0)
            a["N"] = n
            t = n * th * tw
            V = cupy.empty((16, G, ci, t), acc)
            _launch_1d(f"wino_input<{ct}, {ACC_CTYPE[ct]}>", G * ci * t, (inp[n0:n0 + n], V, a))
            M = cupy.matmul(U.reshape(16 * G, ko, ci), V.reshape(16 * G, ci, t))
            _launch_1d(f"wino_output<{ct}, {ACC_CTYPE[ct]}>", G * ko * t,
                       (M, bias if bias is not None else inp, out[n0:n0 + n], a))
        return out


def algorithms():
    """op -> [algorithm objects] of this module (fresh objects; register() installs them)."""
    labels = sorted({t.label for tiles in IGEMM_CONFIGS.values() for t in tiles}, reverse=True)
    out = {op: [IgemmAlgorithm(op, tc, lab) for tc in (False, True) for lab in labels]
           for op in ("fprop", "dgrad", "wgrad")}
    for op in ("fprop", "dgrad", "wgrad"):
        out[op].append(DepthwiseAlgorithm(op))
    for op in ("fprop", "dgrad"):
        out[op].append(WinogradAlgorithm(op))
    return out


def register(register_algorithm):
    """Register every algorithm here through `register_algorithm` (the registry's; idempotent).

    Returns {op: [names]}. The registry's functions take the engine's C-contiguous arrays."""
    names = {}
    for op, algos in algorithms().items():
        for algo in algos:
            register_algorithm(op, algo.name, algo, replace=True)
            names.setdefault(op, []).append(algo.name)
    return names
