"""Which OpenBLAS kernels the NumPy engine's GEMMs run, and whether the environment holds them
below what the CPU can do.

OpenBLAS (bundled with NumPy's wheels) picks its kernels from the CPU model when NumPy loads it,
unless OPENBLAS_CORETYPE names a kernel family. A machine image may pin an older family for all
its hosts: the 2-core AMD EPYC (Zen 5) gpuconv's CPU numbers come from sets
OPENBLAS_CORETYPE=Haswell machine-wide, which holds NumPy to AVX2 kernels on an AVX-512 CPU. One
thread, float32, measured there: GEMM 512^3 at 103 GFLOP/s (Haswell) against 186 (OpenBLAS's
own choice, SkylakeX), and MNIST's conv(32->64) GEMM (64 x 288 x 12544) 5.6 against 4.0 ms.
PyTorch's oneDNN is not affected. gpuconv does not override the setting (it is the machine
owner's); ``note()`` explains it, and gpuconv-doctor and gpuconv-bench print it.
"""
from __future__ import annotations

import os
import sys

# OPENBLAS_CORETYPE values whose kernels stop at AVX2 (or below), lower-cased
_PRE_AVX512 = {"haswell", "zen", "sandybridge", "nehalem", "core2", "penryn", "dunnington",
               "atom", "bulldozer", "piledriver", "steamroller", "excavator", "barcelona",
               "opteron", "prescott", "katmai", "coppermine", "northwood", "banias"}
_AVX512 = ("avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl")  # what SkylakeX uses


def cpu_flags():
    """The first processor's flags from /proc/cpuinfo (an empty set where there is none)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def note(environ=None, flags=None):
    """A warning when OPENBLAS_CORETYPE pins pre-AVX-512 kernels on an AVX-512 CPU, else None."""
    environ = os.environ if environ is None else environ
    pinned = environ.get("OPENBLAS_CORETYPE", "").strip()
    if not pinned or pinned.lower() not in _PRE_AVX512:
        return None
    flags = cpu_flags() if flags is None else flags
    if not all(f in flags for f in _AVX512):
        return None
    return (f"OPENBLAS_CORETYPE={pinned} holds NumPy's OpenBLAS to AVX2 kernels on this AVX-512 "
            "CPU: its GEMMs (most of the NumPy engine's convolution time) ran ~1.4-1.8x slower "
            "than with OpenBLAS's own choice where measured; unset it (before Python starts) "
            "unless it is there for a reason")
