"""Array-type checks at the API boundary: which engine, which dtype, which device.

The array's module chooses the engine: NumPy arrays run on the CPU, CuPy arrays on their GPU.
CuPy is imported lazily and only if a non-NumPy array arrives, so ``import gpuconv`` needs no
CuPy, no driver and no GPU.
"""
from __future__ import annotations

import sys

import numpy as np

# dtype names (bfloat16 is ml_dtypes.bfloat16, CuPy 14's bf16 dtype; by name, so that NumPy
# without ml_dtypes loaded still compares).
CPU_DTYPES = ("float32", "float64")
# float16 and bfloat16 compute on the GPU only, with float32 accumulation. The NumPy engine
# would have to upcast them to float32 for every GEMM and round back -- honest, but a silent
# 2-4x memory and time cost the user did not ask for -- so a CPU array of either is a TypeError.
GPU_DTYPES = ("float16", "bfloat16", "float32", "float64")
_CPU_DTYPE_SET = frozenset(np.dtype(n) for n in CPU_DTYPES)  # (dtype.name costs ~2 us a call)


def is_cupy_array(a) -> bool:
    """True for a cupy.ndarray; never imports CuPy if the user has not."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def array_module(*arrays):
    """numpy or cupy for a set of arrays (None entries ignored); TypeError if they mix."""
    for a in arrays:  # the common case first: plain NumPy arrays (or None)
        if a is not None and type(a) is not np.ndarray:
            break
    else:
        return np
    kinds = set()
    for a in arrays:
        if a is None:
            continue
        if isinstance(a, np.ndarray):
            kinds.add("numpy")
        elif is_cupy_array(a):
            kinds.add("cupy")
        else:
            raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(a).__name__}")
    if len(kinds) > 1:
        raise TypeError("arrays must all be NumPy (CPU) or all CuPy (GPU), got a mix; move them "
                        "with numpy.asarray / cupy.asarray first")
    if kinds == {"cupy"}:
        import cupy
        return cupy
    return np


def check_arrays(names_arrays, *, ndim=None):
    """Validate a group of arrays that enter one op together.

    ``names_arrays`` is a sequence of (name, array-or-None). Checks the type, the rank (when
    ``ndim`` maps a name to a rank), a floating dtype the engine supports, one dtype for all and
    one device for all. Returns the array module.
    """
    present = [(n, a) for n, a in names_arrays if a is not None]
    xp = array_module(*[a for _, a in present])
    allowed = GPU_DTYPES if xp is not np else CPU_DTYPES
    dtype = None
    for name, a in present:
        if ndim and name in ndim and a.ndim != ndim[name]:
            raise ValueError(f"{name} must be a {ndim[name]}-D array, got shape {a.shape}")
        if (a.dtype not in _CPU_DTYPE_SET) if xp is np else (a.dtype.name not in allowed):
            where = ("on the GPU" if xp is not np else
                     "on the CPU (float16 and bfloat16 run on the GPU only: move the arrays "
                     "with cupy.asarray, or cast them with .astype(numpy.float32))")
            raise TypeError(f"{name} has dtype {a.dtype}; expected one of "
                            f"{', '.join(allowed)} {where}")
        if dtype is None:
            dtype, first = a.dtype, name
        elif a.dtype != dtype:
            raise TypeError(f"{name} has dtype {a.dtype} but {first} has dtype {dtype}; "
                            "all arrays of one op must share a dtype")
    if xp is not np:
        devices = {a.device.id for _, a in present}
        if len(devices) > 1:
            raise ValueError(f"arrays are on different GPUs {sorted(devices)}; move them to one")
    return xp


def check_shape(name, array, expected):
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(array.shape)}")


# ---------------------------------------------------------------------------------------------
# memory formats (PyTorch's): logical shapes stay NCHW; "nhwc" (channels_last) is a logical
# (N, C, H, W) array whose memory is (N, H, W, C), i.e. ``a.transpose(0, 2, 3, 1)`` is dense
# ---------------------------------------------------------------------------------------------
FORMATS = ("nchw", "nhwc")


def memory_format(a) -> str:
    """"nhwc" if the 4-D array `a` has channels_last strides, else "nchw".

    PyTorch's rule (``suggest_memory_format``, from c10's is_channels_last_strides_2d): walking
    the dimensions C, W, H, N, each stride must be at least the extent of the dimensions
    before it (a size-1 dimension adds no extent), C's stride nonzero; an empty array is
    never channels_last, and an array whose N stride equals its C stride (an (N, 1, 1, 1)
    array) is "nchw". So the ambiguous cases resolve as in PyTorch: a C-contiguous (N, 1, H,
    W) or (N, C, 1, 1) array is "nchw", while ``x.transpose(0, 2, 3, 1)`` made contiguous and
    transposed back is "nhwc" whenever C > 1 or H*W > 1 makes the strides differ. (C == 1 or
    H == W == 1 lay out the same bytes either way; the format then only names the results'.)
    Arrays of another rank are "nchw".
    """
    if a.ndim != 4 or a.size == 0:
        return "nchw"
    sizes, strides = a.shape, a.strides
    if strides[1] == 0:
        return "nchw"
    low = 0
    for d in (1, 3, 2, 0):
        if strides[d] < low:
            return "nchw"
        if d == 0 and low == strides[1]:
            return "nchw"
        low = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return "nhwc"


def to_format(a, fmt):
    """`a` (logical NCHW, 4-D) with its memory in `fmt`: itself when it already is (and dense),
    otherwise one copy. "nhwc": a logical view whose ``transpose(0, 2, 3, 1)`` is C-contiguous."""
    xp = array_module(a)
    if fmt == "nhwc":
        return xp.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    if fmt == "nchw":
        return xp.ascontiguousarray(a)
    raise ValueError(f"memory format must be one of {FORMATS}, got {fmt!r}")


def physical_nhwc(a):
    """The C-contiguous (N, H, W, C) memory of a logical (N, C, H, W) array (a view when `a`
    is dense channels_last, else one copy)."""
    return array_module(a).ascontiguousarray(a.transpose(0, 2, 3, 1))


def conv_format(*arrays):
    """The memory format of a convolution's results, PyTorch's rule: channels_last ("nhwc")
    if any of the given arrays (None ignored) is channels_last, else "nchw"."""
    return "nhwc" if any(a is not None and memory_format(a) == "nhwc" for a in arrays) \
        else "nchw"
