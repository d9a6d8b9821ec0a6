"""Where an array lives, and moving arrays between the CPU (NumPy) and a GPU (CuPy).

Devices are named as in PyTorch: ``"cpu"``, ``"cuda"`` (the current CUDA device, index 0 unless
CuPy says otherwise) and ``"cuda:N"``. CuPy is imported only when a CUDA device is asked for, so
this module, like ``import gpuconv``, works with no CuPy, no driver and no GPU.

>>> import numpy as np
>>> from gpuconv.device import device_of, to_device
>>> device_of(to_device(np.zeros(3), "cpu"))
'cpu'
"""
from __future__ import annotations

import numpy as np

from ._arrays import array_module, is_cupy_array

__all__ = ["parse_device", "require_cuda", "cuda_unavailable_reason", "get_array_module",
           "device_of", "to_device"]


def parse_device(device):
    """``"cpu"`` -> ("cpu", None); ``"cuda"`` -> ("cuda", None); ``"cuda:N"`` -> ("cuda", N).

    ValueError (naming the accepted spellings) for anything else.
    """
    if isinstance(device, str):
        name = device.strip().lower()
        if name == "cpu":
            return "cpu", None
        if name == "cuda":
            return "cuda", None
        if name.startswith("cuda:") and name[5:].isdigit():
            return "cuda", int(name[5:])
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def cuda_unavailable_reason(index=None):
    """None if CUDA device `index` (None: the current one) is usable, else a one-line reason:
    the loader's probe (no CuPy / too old / no driver / no device), plus the index check."""
    from .kernel_loader import unavailable_reason
    reason = unavailable_reason()
    if reason is not None or index is None:
        return reason
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= index < count:
        return f"CUDA device {index} does not exist (this machine has {count})"
    return None


def require_cuda(index=None):
    """Import and return cupy if CUDA device `index` is usable; CudaUnavailableError (a
    RuntimeError) saying why not."""
    from .kernel_loader import CudaUnavailableError
    reason = cuda_unavailable_reason(index)
    if reason is not None:
        where = "cuda" if index is None else f"cuda:{index}"
        raise CudaUnavailableError(f"device '{where}' is unavailable: {reason}")
    import cupy
    return cupy


def get_array_module(array):
    """numpy or cupy, whichever owns `array` (never imports CuPy for a NumPy array)."""
    return array_module(array)


def device_of(array):
    """``"cpu"`` for a NumPy array, ``"cuda:N"`` for a CuPy array on device N."""
    if is_cupy_array(array):
        return f"cuda:{array.device.id}"
    if isinstance(array, np.ndarray):
        return "cpu"
    raise TypeError(f"expected a numpy.ndarray or cupy.ndarray, got {type(array).__name__}")


def to_device(array, device):
    """`array` on `device`; the same object where it is already there (no copy)."""
    kind, index = parse_device(device)
    if kind == "cpu":
        return array.get() if is_cupy_array(array) else np.asarray(array)
    cupy = require_cuda(index)
    target = cupy.cuda.Device(index) if index is not None else cupy.cuda.Device()
    if is_cupy_array(array) and array.device.id == target.id:
        return array
    with target:
        # cupy.asarray copies host data (or a peer device's) onto the current device
        return cupy.asarray(array)
