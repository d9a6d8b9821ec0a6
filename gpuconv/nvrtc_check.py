"""Compile kernels with NVRTC -- the compiler CuPy uses -- without a GPU, and read what the
cubins say about registers and local memory.

No GPU, no driver and no CuPy are needed: NVRTC is a plain shared library (the
``nvidia-cuda-nvrtc`` wheel, or a CUDA toolkit) loaded here through :mod:`ctypes`, and a cubin is
an ELF file whose ``.nv.info`` sections carry each kernel's resources. Only the standard library
and :mod:`gpuconv.cuda` (the kernel sources; NumPy only) are imported, so the CI test
(tests/test_nvrtc_compile.py) and a self-check command can use it on any machine.

- :func:`find_nvrtc` locates ``libnvrtc`` (pip wheel first, as CuPy's loader does, then
  ``CUDA_PATH`` / ``/usr/local/cuda``); :func:`find_cuda_include` the directory that holds
  ``cuda_fp16.h`` (``nvidia-cuda-runtime`` wheel or the toolkit), which CuPy passes as ``-I``.
- :class:`Nvrtc` compiles one source with name expressions to a cubin (``nvrtcGetCUBIN``, the
  form CuPy loads: NVRTC 13.5's PTX 9.5 would not load on driver 580) and returns every lowered
  name. :data:`CUPY_OPTIONS` are the options CuPy 14 adds to ours.
- :func:`cubin_resources` parses the cubin: registers (``EIATTR_REGCOUNT``), stack frame and
  stack sizes (``EIATTR_FRAME_SIZE``, ``EIATTR_MIN_STACK_SIZE``, ``EIATTR_MAX_STACK_SIZE``) and
  static shared memory (``.nv.shared.<kernel>``). Register spills live in the stack frame, so
  frame == 0 means no spill (the cubin does not count spill bytes separately; ``ptxas -v`` does;
  on nvcc's cubins both agree: registers and frame equal ptxas' figures, checked in the test).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import glob
import os
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass

from . import cuda as _cuda

__all__ = ["NvrtcError", "NvrtcNotFound", "Nvrtc", "Resources", "find_nvrtc",
           "find_cuda_include", "cubin_resources", "CUPY_OPTIONS", "FileReport", "compile_options",
           "compile_file", "compile_catalogue"]

#: What CuPy 14's RawModule adds to the caller's options on CUDA (cupy/cuda/compiler.py):
#: ``-ftz=true`` and ``--device-as-default-execution-space`` (``-arch=sm_XX`` and the include
#: directories come separately). It also passes ``--pch`` on NVRTC >= 12.8, which only caches
#: parsed headers and does not change the code.
CUPY_OPTIONS = ("-ftz=true", "--device-as-default-execution-space")


class NvrtcNotFound(RuntimeError):
    """No usable libnvrtc (or no CUDA headers) here; the message says where we looked."""


class NvrtcError(RuntimeError):
    """NVRTC failed; the message has the call, the options and NVRTC's log."""


# ---------------------------------------------------------------------------------------------
# finding the library and the headers
# ---------------------------------------------------------------------------------------------
def _site_dirs():
    seen = []
    for d in [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
              *sys.path]:
        if d and os.path.isdir(d) and d not in seen:
            seen.append(d)
    return seen


def _toolkit_roots():
    roots = [os.environ.get(v) for v in ("CUDA_PATH", "CUDA_HOME")]
    return [r for r in roots + ["/usr/local/cuda"] if r and os.path.isdir(r)]


def _candidates():
    """Where libnvrtc may be, in the order CuPy's loader (cuda-pathfinder) prefers: pip wheels
    (CUDA 13's nvidia/cu13/lib, CUDA 12's nvidia/cuda_nvrtc/lib), then a toolkit. The env var
    GPUCONV_NVRTC names one library to use instead (to check another NVRTC version)."""
    if os.environ.get("GPUCONV_NVRTC"):
        return [os.environ["GPUCONV_NVRTC"]]
    pats = []
    lib = "nvrtc64_*.dll" if os.name == "nt" else "libnvrtc.so*"
    for d in _site_dirs():
        pats += [os.path.join(d, "nvidia", "cu1*", "bin" if os.name == "nt" else "lib", lib),
                 os.path.join(d, "nvidia", "cuda_nvrtc", "bin" if os.name == "nt" else "lib",
                              lib)]
    for r in _toolkit_roots():
        pats += [os.path.join(r, sub, lib) for sub in ("lib64", "lib", "bin")]
    out = []
    for p in pats:
        # newest CUDA major first; skip the builtins library and the static/alt variants
        for f in sorted(glob.glob(p), reverse=True):
            base = os.path.basename(f)
            if "builtins" in base or "alt" in base or f.endswith((".a", ".lib")):
                continue
            if f not in out:
                out.append(f)
    return out


def find_nvrtc():
    """Path of the libnvrtc to use, or raise NvrtcNotFound naming the places searched."""
    for f in _candidates():
        try:
            ctypes.CDLL(f)
        except OSError:
            continue
        return f
    where = (f"GPUCONV_NVRTC={os.environ['GPUCONV_NVRTC']} cannot be loaded"
             if os.environ.get("GPUCONV_NVRTC") else
             "libnvrtc not found (searched the nvidia-cuda-nvrtc wheel in site-packages, "
             "CUDA_PATH, CUDA_HOME and /usr/local/cuda)")
    raise NvrtcNotFound(f"{where}: pip install 'nvidia-cuda-nvrtc>=13,<14' (or gpuconv[test])")


def find_cuda_include(nvrtc_path=None):
    """The directory with cuda_fp16.h, the CUDA headers our kernels include.

    CuPy passes ``-I<CUDA root>/include``, its root derived from where libnvrtc lives; for the
    CUDA 13 wheels that is nvidia/cu13/include, filled by ``nvidia-cuda-runtime``. The env var
    GPUCONV_CUDA_INCLUDE names the directory instead (headers matching a GPUCONV_NVRTC).
    """
    dirs = [os.environ["GPUCONV_CUDA_INCLUDE"]] if os.environ.get("GPUCONV_CUDA_INCLUDE") else []
    if nvrtc_path:
        dirs.append(os.path.join(os.path.dirname(os.path.dirname(nvrtc_path)), "include"))
    for d in _site_dirs():
        dirs += sorted(glob.glob(os.path.join(d, "nvidia", "cu1*", "include")), reverse=True)
        dirs.append(os.path.join(d, "nvidia", "cuda_runtime", "include"))
    dirs += [os.path.join(r, "include") for r in _toolkit_roots()]
    for d in dirs:
        if os.path.isfile(os.path.join(d, "cuda_fp16.h")):
            return d
    raise NvrtcNotFound("CUDA headers (cuda_fp16.h) not found next to libnvrtc, in "
                        "site-packages or in a CUDA toolkit: "
                        "pip install 'nvidia-cuda-runtime>=13,<14' (or gpuconv[test])")


# ---------------------------------------------------------------------------------------------
# NVRTC through ctypes (ctypes releases the GIL during each call: compiles run in parallel)
# ---------------------------------------------------------------------------------------------
_P = ctypes.c_void_p
_SZ = ctypes.c_size_t


class Nvrtc:
    """One loaded libnvrtc. ``compile`` may run in several threads at once, one program each
    (as CuPy's compiles do; two threads here give the same cubins as one)."""

    def __init__(self, path=None):
        self.path = path or find_nvrtc()
        lib = ctypes.CDLL(self.path)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        for name, args in (
                ("nvrtcVersion", [ctypes.POINTER(ctypes.c_int)] * 2),
                ("nvrtcCreateProgram", [ctypes.POINTER(_P), ctypes.c_char_p, ctypes.c_char_p,
                                        ctypes.c_int, _P, _P]),
                ("nvrtcDestroyProgram", [ctypes.POINTER(_P)]),
                ("nvrtcAddNameExpression", [_P, ctypes.c_char_p]),
                ("nvrtcCompileProgram", [_P, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]),
                ("nvrtcGetProgramLogSize", [_P, ctypes.POINTER(_SZ)]),
                ("nvrtcGetProgramLog", [_P, ctypes.c_char_p]),
                ("nvrtcGetCUBINSize", [_P, ctypes.POINTER(_SZ)]),
                ("nvrtcGetCUBIN", [_P, ctypes.c_char_p]),
                ("nvrtcGetLoweredName", [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_int, args
        self._lib = lib

    @property
    def version(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)),
                    "nvrtcVersion")
        return major.value, minor.value

    def _check(self, rc, what, log=""):
        if rc != 0:
            msg = self._lib.nvrtcGetErrorString(rc).decode()
            raise NvrtcError(f"{what}: {msg}" + (f"\nNVRTC log:\n{log}" if log else ""))

    def compile(self, source, name_expressions, options, filename="kern.cu"):
        """Compile `source` to a cubin. Returns (cubin bytes, {name expression: lowered name},
        log). Raises NvrtcError on a compile error or a name expression that does not lower."""
        lib = self._lib
        prog = _P()
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(),
                                           filename.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            for n in name_expressions:
                self._check(lib.nvrtcAddNameExpression(prog, n.encode()),
                            f"nvrtcAddNameExpression({n!r})")
            opts = [o.encode() for o in options]
            rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
            size = _SZ()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            buf = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, buf), "log")
            log = buf.value.decode(errors="replace")
            self._check(rc, f"compiling {filename} (options: {' '.join(options)})", log)
            lowered = {}
            for n in name_expressions:
                out = ctypes.c_char_p()
                self._check(lib.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)),
                            f"nvrtcGetLoweredName({n!r}) in {filename}")
                lowered[n] = out.value.decode()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return cubin.raw, lowered, log
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


# ---------------------------------------------------------------------------------------------
# cubin (ELF64) resources
# ---------------------------------------------------------------------------------------------
# .nv.info records: a format byte, an attribute byte, then per format:
#   EIFMT_NVAL (1): a 16-bit zero, no value;  EIFMT_BVAL (2): one byte and a pad byte;
#   EIFMT_HVAL (3): a 16-bit value;           EIFMT_SVAL (4): a 16-bit size, then that many bytes.
# Per-kernel resources are SVAL records (u32 symbol index, u32 value), in the file-wide .nv.info
# section (older toolkits also put some in .nv.info.<kernel>; both are read).
EIFMT_SVAL = 4
EIATTR_FRAME_SIZE = 0x11
EIATTR_MIN_STACK_SIZE = 0x12
EIATTR_MAX_STACK_SIZE = 0x23
EIATTR_REGCOUNT = 0x2F
_RESOURCE_ATTRS = {EIATTR_REGCOUNT: "registers", EIATTR_FRAME_SIZE: "frame",
                   EIATTR_MIN_STACK_SIZE: "min_stack", EIATTR_MAX_STACK_SIZE: "max_stack"}
STT_FUNC = 2
SHT_SYMTAB = 2


@dataclass(frozen=True)
class Resources:
    """What one kernel of a cubin uses. Spills go to the stack frame: frame == 0 means none."""
    registers: int
    frame: int          # stack frame bytes per thread (local arrays and register spills)
    min_stack: int      # stack the kernel needs without calls through pointers
    max_stack: int      # with them (0 when there are none)
    shared: int         # static shared memory (.nv.shared.<kernel>; sm_90 adds 1 KB reserved)

    @property
    def local_memory(self):
        """Per-thread local memory of any kind (0 for a kernel that does not spill)."""
        return max(self.frame, self.min_stack, self.max_stack)


def _sections(elf):
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ValueError("not a little-endian ELF64 cubin")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = raw[shstrndx]

    def cstr(table_off, off):
        end = elf.index(b"\0", table_off + off)
        return elf[table_off + off:end].decode()

    secs = []
    for name, typ, _flags, _addr, off, size, link, info, _align, entsize in raw:
        secs.append(dict(name=cstr(strtab[4], name), type=typ, off=off, size=size, link=link,
                         info=info, entsize=entsize))
    return secs


def _symbols(elf, secs):
    sym = next(s for s in secs if s["type"] == SHT_SYMTAB)
    stroff = secs[sym["link"]]["off"]
    out = []
    for i in range(sym["size"] // sym["entsize"]):
        name, info, _other, _shndx, _value, _size = struct.unpack_from(
            "<IBBHQQ", elf, sym["off"] + i * sym["entsize"])
        end = elf.index(b"\0", stroff + name)
        out.append((elf[stroff + name:end].decode(), info & 0xF))
    return out


def _records(data):
    i = 0
    while i + 4 <= len(data):
        fmt, attr, size = data[i], data[i + 1], struct.unpack_from("<H", data, i + 2)[0]
        if fmt == EIFMT_SVAL:
            yield attr, data[i + 4:i + 4 + size]
            i += 4 + size
        elif fmt in (1, 2, 3):
            i += 4
        else:
            raise ValueError(f"unknown .nv.info record format {fmt} at offset {i}")


def cubin_resources(cubin: bytes) -> dict:
    """{mangled kernel name: Resources} for every kernel (``.text.<name>``) in the cubin."""
    secs = _sections(cubin)
    syms = _symbols(cubin, secs)
    by_name = {s["name"]: s for s in secs}
    vals: dict = {}
    for s in secs:
        if s["name"] != ".nv.info" and not s["name"].startswith(".nv.info."):
            continue
        for attr, payload in _records(cubin[s["off"]:s["off"] + s["size"]]):
            field = _RESOURCE_ATTRS.get(attr)
            if field is None or len(payload) != 8:
                continue
            index, value = struct.unpack("<II", payload)
            name, kind = syms[index]
            if kind == STT_FUNC:
                vals.setdefault(name, {})[field] = value
    out = {}
    for s in secs:
        if not s["name"].startswith(".text."):
            continue
        k = s["name"][len(".text."):]
        v = vals.get(k, {})
        if "registers" not in v:
            raise ValueError(f"cubin has no EIATTR_REGCOUNT for {k}")
        out[k] = Resources(registers=v["registers"], frame=v.get("frame", 0),
                           min_stack=v.get("min_stack", 0), max_stack=v.get("max_stack", 0),
                           shared=by_name.get(".nv.shared." + k, {}).get("size", 0))
    return out


# ---------------------------------------------------------------------------------------------
# a whole kernel catalogue: one compile per (file, arch), all of the file's name expressions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileReport:
    file: str
    arch: str
    seconds: float
    log: str
    kernels: dict       # name expression -> (lowered name, Resources)
    unlisted: tuple     # kernels in the cubin that no name expression asked for


def compile_options(arch, include_dir, base=_cuda.COMPILE_OPTIONS):
    """The options CuPy's RawModule ends up passing to NVRTC for our kernels on `arch`."""
    return (*base, *CUPY_OPTIONS, f"--gpu-architecture={arch}", f"-I{include_dir}")


def compile_file(nvrtc, file, names, arch, include_dir, source_of=_cuda.kernel_source):
    """Compile kernels/`file` as the loader sends it (headers inlined) with every name
    expression; every lowered name must be a kernel of the cubin (else NvrtcError)."""
    t0 = time.perf_counter()
    cubin, lowered, log = nvrtc.compile(source_of(file), names,
                                        compile_options(arch, include_dir), filename=file)
    seconds = time.perf_counter() - t0
    res = cubin_resources(cubin)
    missing = [n for n, low in lowered.items() if low not in res]
    if missing:
        raise NvrtcError(f"{file} ({arch}): no kernel in the cubin for {missing}")
    listed = set(lowered.values())
    return FileReport(file, arch, seconds, log, {n: (low, res[low]) for n, low in lowered.items()},
                      tuple(sorted(k for k in res if k not in listed)))


def compile_catalogue(catalogue, archs=("sm_80", "sm_90"), jobs=2, nvrtc=None,
                      source_of=_cuda.kernel_source, return_errors=False):
    """compile_file for every (file, arch) of `catalogue` ((file, name expressions) pairs),
    `jobs` at a time (ctypes drops the GIL inside NVRTC). Returns FileReports in catalogue order,
    file by file, arch by arch. A failing compile raises its NvrtcError, or with `return_errors`
    stands in the list in place of its report (so one broken file does not hide the others)."""
    nvrtc = nvrtc or Nvrtc()
    inc = find_cuda_include(nvrtc.path)
    work = [(f, tuple(names), a) for f, names in catalogue for a in archs]
    # biggest first (source size x instantiations), so the pool's last job is a short one
    size = {f: len(source_of(f)) * len(names) for f, names, _ in work}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {w: ex.submit(compile_file, nvrtc, w[0], w[1], w[2], inc, source_of)
                for w in sorted(work, key=lambda w: -size[w[0]])}
        out = []
        for w in work:
            err = futs[w].exception()
            if err is not None and not (return_errors and isinstance(err, NvrtcError)):
                raise err
            out.append(err if err is not None else futs[w].result())
        return out
