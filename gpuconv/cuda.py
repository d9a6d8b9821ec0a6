"""gpuconv's CUDA side, public face: availability, the kernel catalogue, precompilation,
workspace limits. ``python -m gpuconv.cuda --precompile`` compiles every kernel for the current
device up front (into CuPy's disk cache, ``CUPY_CACHE_DIR``).

The machinery lives below (DESIGN.md "One-way seams"): gpuconv.kernel_loader (catalogue and
loader, knows no algorithm), the algorithm modules that add their kernels to the catalogue
(gpuconv.engines.cuda_im2col, cuda_igemm), the registry, the autotuner and the engine. This
module imports the engine, so :func:`catalogue` and :func:`precompile` cover every algorithm.
Importing it needs no CuPy, driver or GPU.
"""
from __future__ import annotations

import argparse
import sys

from . import kernel_loader as _loader
from .engines import cuda_engine as _engine  # noqa: F401  (imports every algorithm module)
from .engines.cuda_im2col import ACT_KINDS, KERNELS  # noqa: F401  (the first generation's list)
from .kernel_loader import (  # noqa: F401  (re-exported: the public names of the CUDA side)
    BLOCK, COMPILE_OPTIONS, CONV_GEOM_DTYPE, CONV_GEOM_FIELDS, CTYPES, DEFAULT_WORKSPACE_BYTES,
    MAX_BLOCKS, MIN_CUPY, POOL_GEOM_DTYPE, POOL_GEOM_FIELDS, STRUCTS, CudaUnavailableError,
    KernelCompileError, acc_dtype, add_kernels, batch_chunk, compile_error, conv_geom, ctype,
    cuda_available, get_kernel, get_workspace_limit, install_hint, instantiation_source,
    kernel_source, launch, pool_geom, require_cuda, set_workspace_limit, toolkit_error,
    unavailable_reason, workspace_limit)

__all__ = [
    "catalogue", "precompile", "CudaUnavailableError", "KernelCompileError", "cuda_available",
    "require_cuda", "unavailable_reason", "get_kernel", "launch", "kernel_source",
    "instantiation_source", "COMPILE_OPTIONS", "KERNELS", "get_workspace_limit",
    "set_workspace_limit", "workspace_limit", "batch_chunk", "install_hint",
]


def catalogue():
    """Every kernel instantiation the engine can launch, both generations:
    a tuple of ``(file, name_expressions, structs)``, one per kernels/ file, where
    ``name_expressions`` is a tuple of str (``"im2col<float, float>"``) and ``structs`` a tuple
    of ``(C struct name, numpy structured dtype)`` the host packs for that file's kernels.
    ``instantiation_source(file, names=..., structs=...)`` builds a compile-check unit from it."""
    return _loader.registered()


def precompile(device=None, verbose=False):
    """Compile every catalogued kernel (both generations) for `device` (default: the current
    one) now; returns the list of name expressions compiled, in catalogue order. Compiled
    binaries land in CuPy's disk cache (``CUPY_CACHE_DIR``), so later processes load them."""
    return _loader.compile_all(device, verbose)


def _main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m gpuconv.cuda",
                                 description="gpuconv's CUDA kernels")
    ap.add_argument("--precompile", action="store_true",
                    help="compile every kernel for the current device (fills CuPy's cache)")
    ap.add_argument("--device", type=int, default=None, help="device id for --precompile")
    ap.add_argument("--list", action="store_true", help="list the kernel files and instantiations")
    ap.add_argument("--source", metavar="FILE", help="print the assembled source of a kernel file")
    args = ap.parse_args(argv)
    if args.list:
        for file, names, _ in catalogue():
            print(file)
            for n in names:
                print("   ", n)
    if args.source:
        print(kernel_source(args.source))
    if args.precompile:
        try:
            names = precompile(args.device, verbose=True)
        except (CudaUnavailableError, KernelCompileError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"compiled {len(names)} kernels")
    if not (args.list or args.source or args.precompile):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
