"""Reused memory for the NumPy engine's large results (a caching allocator, as PyTorch's CUDA
allocator is for GPU memory).

A training step allocates the same large arrays every step: each layer's output, each input
gradient, the pooling indices. A fresh multi-megabyte NumPy array is fresh memory from the C
allocator, which returns freed blocks above its trim threshold to the kernel, so every step
pays a page fault per 4 KiB on first touch. On the 2-vCPU microVM this was measured on a fault
cost ~4 us: a 2x2 max-pool of 64x32x28x28 took 10 ms with 1,640 faults a call and 3.7 ms
without, and the MNIST CNN's step took ~2,900 faults (see bench/NOTES.md, issue 11).

``empty(shape, dtype)`` hands out a view of a kept buffer whose earlier results are all gone,
else a new buffer (kept while the total stays under ``KEEP_BYTES``). "Gone" is decided by
reference count: every NumPy view of a buffer holds a reference to it (``view.base`` is the
buffer), and so does anything exporting its memory (memoryview, torch.from_numpy, ctypes
wrappers made with NumPy), so a buffer nothing refers to but this cache is free. Arrays under
``MIN_BYTES`` come from NumPy directly (the C allocator keeps those without faults).
"""
from __future__ import annotations

import math
import sys
import threading

import numpy as np

MIN_BYTES = 256 << 10  # smaller results: np.empty (no trimming, no faults below this)
KEEP_BYTES = 512 << 20  # total kept; 0 turns the cache off. Module attribute (tests, users)

_lock = threading.Lock()
_bins: dict = {}  # nbytes -> [uint8 buffers of exactly that size]
_kept = 0


def _counts(buffers):
    return [sys.getrefcount(b) for b in buffers]


def _first_free(buffers):
    """Index of the first buffer in `buffers` that nothing else refers to, or -1. The count
    _counts sees for a free buffer (the list's reference, the loop variable and getrefcount's
    argument on CPython 3.11) is measured once at import with the same function (_FREE)."""
    for i, c in enumerate(_counts(buffers)):
        if c <= _FREE:
            return i
    return -1


def _calibrate():
    global _FREE
    probe = [np.empty(1, np.uint8)]
    _FREE = _counts(probe)[0]
    view = probe[0].view(np.int8).reshape(1, 1)  # a live view must make the buffer busy
    busy = _first_free(probe) == -1
    del view
    return busy and _first_free(probe) == 0


_FREE = 0
_USABLE = _calibrate()


def empty(shape, dtype):
    """A C-contiguous array of `shape` and `dtype` with undefined contents, like np.empty."""
    dtype = np.dtype(dtype)
    if type(shape) is not tuple:
        shape = tuple(shape) if isinstance(shape, (list, tuple)) else (shape,)
    nbytes = dtype.itemsize * math.prod(shape)
    if nbytes < MIN_BYTES or not _USABLE or KEEP_BYTES <= 0:
        return np.empty(shape, dtype)
    global _kept
    with _lock:  # the check and the view are one step: two threads never share a buffer
        buffers = _bins.setdefault(nbytes, [])
        i = _first_free(buffers)
        if i >= 0:
            buf = buffers[i]
        else:
            buf = np.empty(nbytes, np.uint8)
            if _kept + nbytes > KEEP_BYTES:
                _evict(_kept + nbytes - KEEP_BYTES)
            if _kept + nbytes <= KEEP_BYTES:
                buffers.append(buf)
                _kept += nbytes
        return buf.view(dtype).reshape(shape)


def zeros(shape, dtype):
    out = empty(shape, dtype)
    out.fill(0)
    return out


def _evict(need):
    """Drop free buffers (largest sizes first) until `need` bytes are released or none is left."""
    global _kept
    for nbytes in sorted(_bins, reverse=True):
        buffers = _bins[nbytes]
        while need > 0:
            i = _first_free(buffers)
            if i < 0:
                break
            del buffers[i]
            _kept -= nbytes
            need -= nbytes
        if not buffers:
            del _bins[nbytes]
        if need <= 0:
            return


def kept_bytes() -> int:
    """Bytes held by the cache now (in use or free)."""
    return _kept


def release() -> None:
    """Forget every kept buffer (arrays still in use keep their memory until they die)."""
    global _kept
    with _lock:
        _bins.clear()
        _kept = 0
