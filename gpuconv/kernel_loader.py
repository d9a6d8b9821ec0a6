"""The CUDA kernel catalogue and loader: sources, instantiations, per-device modules, launches,
workspace. It knows no algorithm: each algorithm module adds its kernels with
:func:`add_kernels` when it is imported (the one list of what the package launches is the union
of those), and :func:`get_kernel` compiles whatever is catalogued. ``gpuconv.cuda`` is the
public face on top (``catalogue()``, ``precompile()``), which imports every algorithm module.

Everything here imports only NumPy and the standard library at module level, so ``import
gpuconv`` works without CuPy, a driver or a GPU; CuPy is imported the first time a kernel is
compiled or CUDA is probed.

- Sources are read from the installed package (``importlib.resources.files("gpuconv.kernels")``,
  so a non-editable wheel works) and ``#include "x.cuh"`` lines are replaced by the header text:
  CuPy's disk cache is keyed on the source text, not on ``-I`` headers, so an edited header
  must change the text (cupy/cupy#941). ``CUPY_CACHE_DIR`` is honoured by CuPy itself.
- One compiled module per (device, file) and one kernel handle per (device, name), memoized: a
  module handle is only valid on the device that loaded it (cupy/cupy#5795).
- Launches use typed NumPy scalars only (a Python int would travel as 64-bit, a float as
  double, unchecked: cupy/cupy#8485) and run on the current CuPy stream.
- A machine with a driver but no CUDA toolkit: CuPy finds no headers or no NVRTC. The kernels
  include no system header (16-bit types are raw bits), and a failure that remains is reported
  as KernelCompileError / CudaUnavailableError naming the extra that installs them
  (``pip install "gpuconv[cuda13]"``: CuPy's ``[ctk]`` wheels).
- The im2col column matrix is bounded by the workspace limit (:func:`set_workspace_limit`, env
  ``GPUCONV_WORKSPACE_BYTES``, default 1 GiB): the engine splits the batch into chunks.
"""
from __future__ import annotations

import contextlib
import importlib.resources
import os
import re
import sys
import threading

import numpy as np

__all__ = [
    "CudaUnavailableError", "KernelCompileError", "cuda_available", "require_cuda",
    "unavailable_reason", "add_kernels", "registered", "get_kernel", "launch", "kernel_source",
    "instantiation_source", "conv_geom", "pool_geom", "ctype", "acc_dtype", "CTYPES",
    "COMPILE_OPTIONS", "STRUCTS", "get_workspace_limit", "set_workspace_limit",
    "workspace_limit", "batch_chunk", "install_hint",
]

# ---------------------------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------------------------
#: numpy dtype name -> the C++ storage type the kernels are instantiated with (kernels/common.cuh;
#: bfloat16 is ml_dtypes.bfloat16, CuPy 14's bf16 dtype).
CTYPES = {"float32": "float", "float64": "double", "float16": "gc_half", "bfloat16": "gc_bf16"}


def dtype_name(dtype) -> str:
    """np.dtype(dtype).name, also for "bfloat16" given as a string without ml_dtypes loaded."""
    if isinstance(dtype, str):
        return dtype
    return np.dtype(dtype).name


def ctype(dtype) -> str:
    """The kernels' C++ type for a NumPy dtype; TypeError for one the CUDA engine lacks."""
    name = dtype
    try:
        name = dtype_name(dtype)
        return CTYPES[name]
    except (KeyError, TypeError):
        raise TypeError(f"the CUDA engine has no kernels for dtype {name}; use "
                        "float16, bfloat16, float32 or float64") from None


def acc_dtype(dtype):
    """The accumulation dtype of a storage dtype: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if dtype_name(dtype) == "float64" else np.dtype(np.float32)


#: NVRTC options. CuPy appends -ftz=true itself; the compile test passes the same to nvcc.
COMPILE_OPTIONS = ("-std=c++17",)

BLOCK = 256
#: Grid cap: kernels use 64-bit grid-stride loops, so any element count fits in this grid.
MAX_BLOCKS = 1 << 16


# ---------------------------------------------------------------------------------------------
# geometry structs (kernels/common.cuh: ConvGeom, PoolGeom) -- all int64, no padding
# ---------------------------------------------------------------------------------------------
CONV_GEOM_FIELDS = ("N", "C", "H", "W", "K", "R", "S", "P", "Q", "pad_h", "pad_w", "pad_h_end",
                    "pad_w_end", "stride_h", "stride_w", "dil_h", "dil_w", "groups")
POOL_GEOM_FIELDS = ("N", "C", "H", "W", "R", "S", "P", "Q", "pad_h", "pad_w", "stride_h",
                    "stride_w", "dil_h", "dil_w")
CONV_GEOM_DTYPE = np.dtype([(f, np.int64) for f in CONV_GEOM_FIELDS])
POOL_GEOM_DTYPE = np.dtype([(f, np.int64) for f in POOL_GEOM_FIELDS])
STRUCTS = (("ConvGeom", CONV_GEOM_DTYPE), ("PoolGeom", POOL_GEOM_DTYPE))


def _pack(dtype, obj):
    # A shape-(1,) structured array is passed by value as the struct's bytes (CuPy's
    # examples/custom_struct does the same).
    g = np.zeros(1, dtype=dtype)
    for f in dtype.names:
        g[f] = getattr(obj, f)
    return g


def conv_geom(p):
    """ConvGeom for a ConvProblem (P and Q taken from the problem, never recomputed)."""
    return _pack(CONV_GEOM_DTYPE, p)


def pool_geom(pp):
    """PoolGeom for a PoolProblem."""
    return _pack(POOL_GEOM_DTYPE, pp)


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)
_PRAGMA_ONCE = re.compile(r'^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$', re.M)


def _read_packaged(name: str) -> str:
    return importlib.resources.files("gpuconv.kernels").joinpath(name).read_text(
        encoding="utf-8")


def kernel_source(file: str, read=_read_packaged) -> str:
    """The text of kernels/`file` with every quoted #include replaced by the header's text.

    Each header is pasted once (later includes of it become a comment), recursively; system
    includes (``<cuda_fp16.h>``) stay as they are. ``read(name) -> str`` is replaceable for tests.
    """
    seen = set()

    def expand(name, text):
        def sub(m):
            inc = m.group(1)
            if inc in seen:
                return f"// (already inlined: {inc})"
            seen.add(inc)
            # `#pragma once` is moot once pasted (and nvcc warns about it in a main file)
            body = _PRAGMA_ONCE.sub("", expand(inc, read(inc)))
            return f"// ---- begin {inc} (inlined) ----\n{body}\n// ---- end {inc} ----"
        return _INCLUDE.sub(sub, text)

    return f"// gpuconv kernel file: {file}\n" + expand(file, read(file))


# ---------------------------------------------------------------------------------------------
# availability
# ---------------------------------------------------------------------------------------------
class CudaUnavailableError(RuntimeError):
    """CUDA was requested but cannot be used; the message says why (no CuPy/driver/device)."""


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel file; the message has the file, the options and NVRTC's log."""


MIN_CUPY = (14, 2)
_cuda_ok = False


def unavailable_reason():
    """None if CUDA is usable, else a sentence saying why not: no CuPy, a CuPy too old, no
    driver, or no device (their fixes differ). The one copy of this probe."""
    try:
        import cupy
    except ImportError as e:
        return (f"CuPy is not installed (ImportError: {e}); install it with "
                "pip install gpuconv[cuda12] or gpuconv[cuda13] (cupy >= 14.2)")
    except Exception as e:  # a broken install: say what broke
        return f"CuPy failed to import ({type(e).__name__}: {e})"
    version = tuple(int(v) for v in re.findall(r"\d+", cupy.__version__)[:2])
    if version < MIN_CUPY:
        return (f"CuPy {cupy.__version__} is too old: gpuconv needs >= 14.2 (templated kernel "
                "modules are reliably disk-cached only from 14.2, cupy/cupy#10173)")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError
        msg = str(e)
        if "NoDevice" in msg or "no CUDA-capable device" in msg:
            return f"no CUDA device is visible ({msg})"
        if "Driver" in msg or "driver" in msg or "libcuda" in msg:
            return (f"no usable NVIDIA driver: CuPy is installed but the CUDA driver is missing "
                    f"or too old ({msg})")
        return f"CUDA is not usable ({type(e).__name__}: {msg})"
    if count < 1:
        return "no CUDA device is visible (the driver reports 0 devices)"
    return None


def cuda_available() -> bool:
    """True if CuPy, an NVIDIA driver and at least one CUDA device are usable."""
    return _cuda_ok or unavailable_reason() is None


def require_cuda():
    """Return the cupy module, or raise CudaUnavailableError naming why CUDA cannot be used."""
    global _cuda_ok
    if not _cuda_ok:
        reason = unavailable_reason()
        if reason is not None:
            raise CudaUnavailableError(f"the CUDA engine is unavailable: {reason}")
        _cuda_ok = True
    import cupy
    return cupy


# ---------------------------------------------------------------------------------------------
# the catalogue: (file, name expressions, structs) added by each algorithm module
# ---------------------------------------------------------------------------------------------
_catalogue: dict = {}   # file -> (name expressions, structs)
_file_of: dict = {}     # name expression -> file


def add_kernels(file: str, names, structs=()):
    """Catalogue the instantiations `names` of kernels/`file` (and the argument structs, as
    (C struct name, NumPy dtype) pairs, that the compile checks pin to the C layout).

    Called by each algorithm module at import. Adding the same entry again is a no-op; a file
    may not be catalogued twice with different names, nor a name under two files.
    """
    names, structs = tuple(names), tuple(structs)
    old = _catalogue.get(file)
    if old is not None:
        if old != (names, structs):
            raise ValueError(f"kernels/{file} is already catalogued with other instantiations")
        return
    if not names or len(set(names)) != len(names):
        raise ValueError(f"kernels/{file}: name expressions must be non-empty and distinct")
    for n in names:
        if n in _file_of:
            raise ValueError(f"{n!r} is already catalogued under kernels/{_file_of[n]}")
    _catalogue[file] = (names, structs)
    _file_of.update((n, file) for n in names)


def registered():
    """((file, name expressions, structs), ...) catalogued so far, in the order added.

    Only the algorithm modules imported so far have added theirs: ``gpuconv.cuda.catalogue()``
    imports them all first."""
    return tuple((f, names, structs) for f, (names, structs) in _catalogue.items())


# ---------------------------------------------------------------------------------------------
# modules, one per (device, file); kernel handles, one per (device, name)
# ---------------------------------------------------------------------------------------------
_modules: dict = {}     # (device id, file) -> cupy.RawModule
_functions: dict = {}   # (device id, name expression) -> cupy.RawKernel
_lock = threading.Lock()


def install_hint() -> str:
    """The pip command that installs CUDA headers and NVRTC beside this CuPy (its [ctk] extra)."""
    extra = None
    try:
        import importlib.metadata as md
        for dist, name in (("cupy-cuda13x", "cuda13"), ("cupy-cuda12x", "cuda12")):
            try:
                md.version(dist)
                extra = name
                break
            except md.PackageNotFoundError:
                continue
    except Exception:  # metadata unreadable: name both
        extra = None
    if extra is None:
        return 'pip install "gpuconv[cuda13]" (CUDA 13 driver) or "gpuconv[cuda12]" (CUDA 12)'
    return f'pip install "gpuconv[{extra}]"'


_MISSING_HEADER = re.compile(r'cannot open source file\s+"?<?(cuda[\w/]*\.h|crt/[\w/]+\.h)'
                             r'|(?:find|found|locate)\w*\s+(?:the\s+)?CUDA (?:headers|include)',
                             re.I)
_MISSING_NVRTC = re.compile(r"nvrtc", re.I)
_LOAD_FAILURE = re.compile(r"cannot open shared object|failed to (?:load|find)|not found|"
                           r"no such file|could not (?:load|find)|unable to (?:load|find)", re.I)


def compile_error(file, options, exc) -> KernelCompileError:
    """A KernelCompileError for CuPy's CompileException `exc` (its message is NVRTC's log)."""
    log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
    hint = ""
    if _MISSING_HEADER.search(log):
        hint = (f"\nNVRTC found no CUDA headers: install them with {install_hint()} "
                "(CuPy's [ctk] wheels) or a CUDA toolkit, or set CUDA_PATH.")
    return KernelCompileError(
        f"compiling kernels/{file} failed (options: {' '.join(options)}).\nNVRTC log:\n{log}\n"
        f"Set CUPY_DUMP_CUDA_SOURCE_ON_ERROR=1 to see the assembled source.{hint}")


def toolkit_error(file, exc):
    """KernelCompileError (no CUDA headers) or CudaUnavailableError (no NVRTC library) for an
    exception CuPy raised while compiling kernels/`file`, or None if it is neither.

    With a driver but no CUDA toolkit CuPy 14 raises RuntimeError("Failed to find CUDA headers")
    or fails to load libnvrtc; both are fixed by CuPy's [ctk] extra, which gpuconv's cuda12 /
    cuda13 extras bring."""
    msg = f"{type(exc).__name__}: {exc}"
    if _MISSING_HEADER.search(msg) or "CUDA headers" in msg:
        return KernelCompileError(
            f"compiling kernels/{file} failed: CuPy found no CUDA headers ({msg}). Install "
            f"them with {install_hint()} (CuPy's [ctk] wheels) or a CUDA toolkit, or set "
            "CUDA_PATH to one.")
    if _MISSING_NVRTC.search(msg) and _LOAD_FAILURE.search(msg):
        return CudaUnavailableError(
            f"the CUDA engine is unavailable: CuPy cannot load NVRTC, the runtime compiler of "
            f"the kernels ({msg}). Install it with {install_hint()} (CuPy's [ctk] wheels) or a "
            "CUDA toolkit.")
    return None


def _module(cupy, file):
    dev = cupy.cuda.runtime.getDevice()
    key = (dev, file)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                try:
                    names = _catalogue[file][0]
                except KeyError:
                    raise KeyError(f"kernels/{file} is not catalogued (gpuconv.kernel_loader."
                                   "add_kernels)") from None
                try:
                    mod = cupy.RawModule(code=kernel_source(file), options=COMPILE_OPTIONS,
                                         name_expressions=list(names))
                    mod.compile()  # compile now, so errors surface here with the file name
                except cupy.cuda.compiler.CompileException as e:
                    raise compile_error(file, COMPILE_OPTIONS, e) from e
                except (RuntimeError, OSError, ImportError) as e:
                    mapped = toolkit_error(file, e)
                    if mapped is None:
                        raise
                    raise mapped from e
                _modules[key] = mod
    return mod


def get_kernel(name: str):
    """The compiled kernel `name` (a catalogued name expression) on the current device; the
    handle is cached per device, so a launch costs no lookup."""
    cupy = require_cuda()
    dev = cupy.cuda.runtime.getDevice()
    fn = _functions.get((dev, name))
    if fn is None:
        try:
            file = _file_of[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a catalogued kernel (gpuconv.cuda.catalogue())") \
                from None
        fn = _module(cupy, file).get_function(name)
        _functions[(dev, name)] = fn
    return fn


def launch(name: str, n_threads: int, args):
    """Launch kernel `name` with one (grid-stride) thread per element on the current stream."""
    n_threads = int(n_threads)
    if n_threads <= 0:
        return
    blocks = min((n_threads + BLOCK - 1) // BLOCK, MAX_BLOCKS)
    get_kernel(name)((blocks,), (BLOCK,), tuple(args))


def compile_all(device=None, verbose=False):
    """Compile every catalogued kernel for `device` (default: the current one) now; returns the
    name expressions in catalogue order. See gpuconv.cuda.precompile (which catalogues all)."""
    cupy = require_cuda()
    ctx = cupy.cuda.Device(device) if device is not None else contextlib.nullcontext()
    done = []
    with ctx:
        for file, names, _ in registered():
            for name in names:
                get_kernel(name)
                done.append(name)
            if verbose:
                print(f"compiled kernels/{file}: {len(names)} kernels", file=sys.stderr)
    return done


# ---------------------------------------------------------------------------------------------
# workspace
# ---------------------------------------------------------------------------------------------
DEFAULT_WORKSPACE_BYTES = 1 << 30
_workspace_override = None


def get_workspace_limit() -> int:
    """Bytes the engine may spend on a temporary (column matrix) before it chunks the batch.

    Set by :func:`set_workspace_limit`, else the env var ``GPUCONV_WORKSPACE_BYTES``, else 1 GiB.
    """
    if _workspace_override is not None:
        return _workspace_override
    env = os.environ.get("GPUCONV_WORKSPACE_BYTES")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"GPUCONV_WORKSPACE_BYTES must be a positive integer number of "
                             f"bytes, got {env!r}") from None
        if value < 1:
            raise ValueError(f"GPUCONV_WORKSPACE_BYTES must be positive, got {env!r}")
        return value
    return DEFAULT_WORKSPACE_BYTES


def set_workspace_limit(nbytes):
    """Set the workspace limit in bytes (None: back to the env var / the 1 GiB default)."""
    global _workspace_override
    if nbytes is not None:
        if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)):
            raise TypeError(f"workspace limit must be an int number of bytes, got {nbytes!r}")
        if nbytes < 1:
            raise ValueError(f"workspace limit must be positive, got {nbytes}")
        nbytes = int(nbytes)
    _workspace_override = nbytes


@contextlib.contextmanager
def workspace_limit(nbytes):
    """Context manager: the workspace limit is `nbytes` inside the block."""
    global _workspace_override
    old = _workspace_override
    set_workspace_limit(nbytes)
    try:
        yield
    finally:
        _workspace_override = old


def batch_chunk(n: int, bytes_per_image: int, limit: int | None = None) -> int:
    """Images per chunk so that the workspace (bytes_per_image each) stays within `limit`.

    At least 1: a single image whose workspace exceeds the limit still runs, alone.
    """
    if limit is None:
        limit = get_workspace_limit()
    if bytes_per_image <= 0:
        return n
    return max(1, min(n, limit // bytes_per_image))


# ---------------------------------------------------------------------------------------------
# the compile check's translation unit (tests/test_kernels_compile.py)
# ---------------------------------------------------------------------------------------------
def instantiation_source(file: str, read=_read_packaged, names=None, structs=None) -> str:
    """kernel_source(file) plus what makes nvcc compile exactly the given instantiations
    (default: those catalogued for the file).

    Taking each kernel's address in host code instantiates it (as NVRTC's name expressions do),
    and static_asserts pin the argument structs (default: the file's catalogued ones) to the
    NumPy dtypes the host packs.
    """
    cat_names, cat_structs = _catalogue.get(file, (None, ()))
    if names is None:
        if cat_names is None:
            raise KeyError(f"kernels/{file} is not catalogued: pass names= (or import "
                           "gpuconv.cuda, which catalogues every algorithm's kernels)")
        names = cat_names
    structs = cat_structs if structs is None else structs
    src = kernel_source(file, read)
    lines = [src, "", "// ---- generated by gpuconv.cuda ----", "#include <cstddef>"]
    for struct, dtype in structs:
        if f"struct {struct}" not in src:
            continue
        lines.append(f"static_assert(sizeof({struct}) == {dtype.itemsize}, \"{struct} size\");")
        for f in dtype.names:
            lines.append(f"static_assert(offsetof({struct}, {f}) == {dtype.fields[f][1]}, "
                         f"\"{struct}.{f} offset\");")
    lines.append("void* gpuconv_instantiations[] = {")
    lines += [f"    (void*)&{name}," for name in names]
    lines.append("};")
    return "\n".join(lines) + "\n"
