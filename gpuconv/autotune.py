"""Per-problem algorithm choice: time the correct candidates once, remember the fastest.

For each (op, problem, dtype, device, TF32 flag) the :class:`Autotuner`
  1. lists the candidates: registered algorithms whose ``supports(p, dtype)`` is true,
  2. runs each on fresh random inputs and compares it with a reference result (a candidate
     whose ``layouts`` lack "nchw" is called on the physical NHWC copies of the same inputs and
     its result compared in the reference's NCHW order; CONTRACT-layouts)
     (‖out − ref‖ / ‖ref‖ under a per-dtype tolerance; NaN, an exception or a wrong shape
     rejects the candidate),
  3. times the accepted ones with the (injectable) timer and picks the fastest,
  4. remembers the choice in memory and in a small JSON file in ``GPUCONV_AUTOTUNE_CACHE``
     (default ``~/.cache/gpuconv``), one file per device name, holding the hash of the kernel
     sources: an edited kernel invalidates every entry. A corrupt file is ignored (and rewritten).
With autotuning off (``GPUCONV_AUTOTUNE=0`` or ``gpuconv.config.set_autotune(False)``) a fixed
heuristic picks: the first supported name of :data:`HEURISTIC_ORDER`. That order is not a speed
claim: it keeps the first-generation baseline until measurements say otherwise.

Everything here except :func:`cuda_event_timer`, :func:`gpu_policy` and the default inputs runs on
the CPU with fake candidates and a fake timer (tests/test_autotune.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
import statistics
import tempfile
import threading
import warnings

import numpy as np

from . import config
from .config import autotune_enabled, get_allow_tf32, set_allow_tf32  # noqa: F401 (re-export)
from .problem import ConvProblem

CACHE_VERSION = 1

#: relative-error tolerance per dtype name (float32 under TF32 gets "float32+tf32").
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float32+tf32": 3e-3, "float16": 3e-3,
             "bfloat16": 2e-2}

#: With autotuning off, the first of these that is registered and supports the problem wins.
HEURISTIC_ORDER = ("direct_depthwise", "im2col_gemm")


# ---------------------------------------------------------------------------------------------
# keys, hashes, candidates
# ---------------------------------------------------------------------------------------------
def problem_key(op, p: ConvProblem, dtype, tf32: bool, layout="nchw") -> str:
    # the dataclass fields only: p.__dict__ would also hold whichever cached sizes (P, Q) had
    # been computed, so one problem could get two keys
    geo = ",".join(f"{k}={getattr(p, k)}" for k in sorted(f.name for f in dataclasses.fields(p)))
    # NCHW keys as before (existing caches stay valid); channels_last ops are tuned apart
    fmt = "" if layout == "nchw" else f"|{layout}"
    return f"{op}|{np.dtype(dtype).name}|tf32={int(bool(tf32))}{fmt}|{geo}"


def kernel_source_hash(read_all=None) -> str:
    """sha256 over every kernels/*.cu and *.cuh file (name and text), in name order."""
    if read_all is None:
        root = importlib.resources.files("gpuconv.kernels")
        files = {e.name: e.read_text(encoding="utf-8") for e in root.iterdir()
                 if e.name.endswith((".cu", ".cuh"))}
    else:
        files = read_all()
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + files[name].encode() + b"\0")
    return h.hexdigest()


def candidates(p: ConvProblem, dtype, registry: dict, layout="nchw"):
    """Names (registry order) of the algorithms that support (p, dtype) on arrays of memory
    format `layout` ("nchw" | "nhwc", fn.layouts): "auto" never picks an algorithm that would
    need a transpose (a channels_last op chooses among the first generation's NHWC path and,
    while gpuconv.config.third_generation_enabled(), the third generation; an NCHW op among the
    first two). Third-generation ones only while that gate is on."""
    out = []
    gen3 = config.third_generation_enabled()
    for name, fn in registry.items():
        # third generation: only when gated on, and only for the memory format it reads
        if getattr(fn, "generation", 0) >= 3 and not gen3:
            continue
        if layout not in getattr(fn, "layouts", ("nchw",)):
            continue
        sup = getattr(fn, "supports", None)
        try:
            ok = True if sup is None else bool(sup(p, np.dtype(dtype)))
        except Exception:  # a broken supports() excludes its algorithm, never the choice
            ok = False
        if ok:
            out.append(name)
    return out


def heuristic(op, p: ConvProblem, dtype, registry: dict, order=HEURISTIC_ORDER, layout="nchw"):
    names = candidates(p, dtype, registry, layout=layout)
    if not names:
        raise ValueError(f"no registered {op} algorithm supports {p} in {np.dtype(dtype).name}")
    for name in order:
        if name in names:
            return name
    return names[0]


def tolerance(dtype, tf32: bool) -> float:
    name = np.dtype(dtype).name
    return TOLERANCE[name + "+tf32" if (tf32 and name == "float32") else name]


def relative_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NumPy or CuPy arrays); inf on a shape mismatch."""
    if getattr(out, "shape", None) != getattr(ref, "shape", None):
        return float("inf")
    xp = _xp(ref)
    o, r = out.astype(xp.float64), ref.astype(xp.float64)
    den = float(xp.linalg.norm(r))
    num = float(xp.linalg.norm(o - r))
    if num != num:  # NaN
        return float("inf")
    return num / den if den > 0 else num


def _nhwc(a):
    """A 4-D operand's physical channels_last array (others, the bias, as they are)."""
    if a is None or a.ndim != 4:
        return a
    return _xp(a).ascontiguousarray(a.transpose(0, 2, 3, 1))


def _logical_result(fn, layout_kw=False):
    """fn called in NHWC (with layout="nhwc" where it takes both formats), its physical result
    seen as the logical NCHW view (no copy)."""
    kw = {"layout": "nhwc"} if layout_kw else {}
    return lambda p, *args: fn(p, *args, **kw).transpose(0, 3, 1, 2)


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


# ---------------------------------------------------------------------------------------------
# the on-disk cache
# ---------------------------------------------------------------------------------------------
def default_cache_dir() -> str:
    return os.environ.get("GPUCONV_AUTOTUNE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "gpuconv")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "device"


class DiskCache:
    """{key: {"algo": name, "times": {name: seconds}}} for one device, tied to a source hash."""

    def __init__(self, directory, device_name, source_hash):
        self.path = os.path.join(directory, f"autotune-{_slug(device_name)}.json")
        self.device_name, self.source_hash = device_name, source_hash
        self.entries = self._read()

    def _read(self):
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"gpuconv autotune cache {self.path} unreadable ({e}); starting afresh")
            return {}
        if (not isinstance(data, dict) or data.get("version") != CACHE_VERSION
                or not isinstance(data.get("entries"), dict)):
            warnings.warn(f"gpuconv autotune cache {self.path} has an unknown format; ignored")
            return {}
        if data.get("source_hash") != self.source_hash or data.get("device") != self.device_name:
            return {}  # the kernels (or the device) changed: every timing is stale
        return {k: v for k, v in data["entries"].items()
                if isinstance(v, dict) and isinstance(v.get("algo"), str)}

    def get(self, key):
        e = self.entries.get(key)
        return e["algo"] if e else None

    def put(self, key, algo, times):
        self.entries[key] = {"algo": algo, "times": times}
        data = {"version": CACHE_VERSION, "device": self.device_name,
                "source_hash": self.source_hash, "entries": self.entries}
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomic: a reader never sees half a file
        except OSError as e:
            warnings.warn(f"gpuconv autotune cache {self.path} not written ({e})")


# ---------------------------------------------------------------------------------------------
# the tuner
# ---------------------------------------------------------------------------------------------
class Autotuner:
    """Chooses algorithms per problem; see the module docstring.

    timer(fn) -> seconds (a representative time of one call of fn, e.g. a median);
    device_name / source_hash: strings naming the device and the kernels' version;
    cache_dir: where the JSON file lives (None: default_cache_dir(); False: memory only).
    """

    def __init__(self, *, timer, device_name, source_hash, cache_dir=None):
        self.timer = timer
        self.device_name, self.source_hash = device_name, source_hash
        directory = default_cache_dir() if cache_dir is None else cache_dir
        self.disk = DiskCache(directory, device_name, source_hash) if directory else None
        self.memory = {}
        self.log = []  # (key, {name: seconds or reason}) per tuning run, for reports and tests
        self._lock = threading.Lock()

    def select(self, op, p: ConvProblem, dtype, registry: dict, make_inputs, reference,
               tf32=None, layout="nchw"):
        """The name of the fastest correct algorithm of `registry` for (op, p, dtype).

        make_inputs() -> tuple of arrays for fn(p, *inputs); reference(*inputs) -> the result to
        match. Raises ValueError when no registered algorithm supports the problem.
        """
        tf32 = get_allow_tf32() if tf32 is None else bool(tf32)
        key = problem_key(op, p, dtype, tf32, layout)
        with self._lock:
            names = candidates(p, dtype, registry, layout=layout)
            if not names:
                raise ValueError(f"no registered {op} algorithm supports {p} in "
                                 f"{np.dtype(dtype).name}")
            hit = self.memory.get(key)
            if hit is None and self.disk is not None:
                hit = self.disk.get(key)
            if hit in names:
                self.memory[key] = hit
                return hit
            best, times = self._tune(p, dtype, tf32, names, registry, make_inputs, reference,
                                     layout)
            self.log.append((key, times))
            if best is None:  # nothing passed: do not cache, fall back to the heuristic
                warnings.warn(f"autotune: no {op} candidate matched the reference for {p} "
                              f"({times}); using the heuristic choice")
                return heuristic(op, p, dtype, registry, layout=layout)
            self.memory[key] = best
            if self.disk is not None:
                self.disk.put(key, best, {k: v for k, v in times.items()
                                          if isinstance(v, float)})
            return best

    def _tune(self, p, dtype, tf32, names, registry, make_inputs, reference, layout="nchw"):
        inputs = make_inputs()
        ref = reference(*inputs)
        tol = tolerance(dtype, tf32)
        times = {}
        nhwc_inputs = None
        for name in names:
            fn, args = registry[name], inputs
            lays = getattr(fn, "layouts", ("nchw",))
            if "nhwc" in lays and (layout == "nhwc" or "nchw" not in lays):
                # a channels_last op's candidate (or an "nhwc"-only one, CONTRACT-layouts) runs
                # as the engine will run it, on the physical NHWC copies of the same inputs,
                # made once; its physical result is compared with the reference in the logical
                # NCHW order
                if nhwc_inputs is None:
                    nhwc_inputs = tuple(_nhwc(a) for a in inputs)
                fn, args = _logical_result(fn, len(lays) > 1), nhwc_inputs
            try:
                err = relative_error(fn(p, *args), ref)
            except Exception as e:  # a candidate that fails is not chosen
                times[name] = f"error: {type(e).__name__}: {e}"
                continue
            if not err <= tol:
                times[name] = f"rejected: relative error {err:.3g} > {tol:.3g}"
                continue
            times[name] = float(self.timer(lambda fn=fn, args=args: fn(p, *args)))
        timed = {k: v for k, v in times.items() if isinstance(v, float)}
        best = min(timed, key=lambda k: (timed[k], names.index(k))) if timed else None
        return best, times


# ---------------------------------------------------------------------------------------------
# the GPU side: timer, inputs, and the cuda_engine policy
# ---------------------------------------------------------------------------------------------
def cuda_event_timer(fn, reps=5, warmup=1, flush_bytes=None):
    """Median seconds of fn() over `reps` samples, CUDA events around each, L2 flushed before
    each sample by zeroing a buffer of twice the device's L2 (METHOD.md / CUPY_NOTES.md)."""
    import cupy
    dev = cupy.cuda.Device()
    if flush_bytes is None:
        flush_bytes = 2 * dev.attributes.get("L2CacheSize", 50 << 20)
    flush = cupy.empty(int(flush_bytes) // 4, np.int32)
    for _ in range(warmup):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for _ in range(reps):
        flush.fill(0)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, stop) * 1e-3)
    return statistics.median(samples)


def random_inputs(op, p: ConvProblem, dtype, xp, seed=None):
    """Fresh normal random operands of `op` (fprop: x, w, bias; dgrad: w, dy; wgrad: x, dy)."""
    rng = np.random.default_rng(seed)

    def r(shape):
        # rounded on the host (NumPy / ml_dtypes), then uploaded: no device cast kernel, so a
        # bfloat16 tuning run needs no CuPy bf16 support beyond the array itself
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32).astype(dtype))

    if op == "fprop":
        return r(p.x_shape), r(p.w_shape), r((p.K,))
    if op == "dgrad":
        return r(p.w_shape), r(p.y_shape)
    return r(p.x_shape), r(p.y_shape)


_tuners = {}
_tuners_lock = threading.Lock()


def _gpu_tuner():
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    with _tuners_lock:
        t = _tuners.get(dev)
        if t is None:
            name = cupy.cuda.runtime.getDeviceProperties(dev)["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            t = _tuners[dev] = Autotuner(timer=cuda_event_timer, device_name=name,
                                         source_hash=kernel_source_hash())
    return t


REFERENCE_ALGORITHM = "im2col_gemm"


def gpu_policy(op, p: ConvProblem, dtype, layout="nchw"):
    """The CUDA engine's "auto" policy (second generation on): autotune (default) or the
    heuristic, among the algorithms of gpuconv.engines.cuda_registry."""
    import cupy
    from .engines import cuda_registry
    registry = cuda_registry.ALGORITHMS[op]
    if not autotune_enabled():
        return heuristic(op, p, dtype, registry, layout=layout)
    ref_fn = registry[REFERENCE_ALGORITHM]
    wide = np.float64 if np.dtype(dtype) == np.float64 else np.float32

    def reference(*inputs):  # the first-generation algorithm on upcast operands
        return ref_fn(p, *[a.astype(wide) if a is not None else None for a in inputs])

    return _gpu_tuner().select(op, p, dtype, registry,
                               lambda: random_inputs(op, p, dtype, cupy), reference,
                               layout=layout)


__all__ = ["Autotuner", "DiskCache", "candidates", "heuristic", "problem_key",
           "kernel_source_hash", "relative_error", "tolerance", "cuda_event_timer",
           "random_inputs", "gpu_policy", "set_allow_tf32", "get_allow_tf32"]
