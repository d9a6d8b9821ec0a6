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


def is_cupy_array(a) -> bool:
    """True for a cupy.ndarray; never imports CuPy if the user has not."""
    cp = sys.modules.get("cupy")
    return cp is not None and isinstance(a, cp.ndarray)


def array_module(*arrays):
    """numpy or cupy for a set of arrays (None entries ignored); TypeError if they mix."""
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
        if a.dtype.name not in allowed:
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
