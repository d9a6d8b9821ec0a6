"""gpuconv-doctor: check an install end to end, the command to run after installing on a machine.

    gpuconv-doctor                      environment, kernels, correctness sweep (a table)
    gpuconv-doctor --bench              ... and a short benchmark beside cuDNN (PyTorch + CUDA)
    gpuconv-doctor --json report.json   ... and everything as JSON (schema gpuconv-doctor/1)
    gpuconv-doctor --require-gpu        exit 1 where CUDA is unusable (for GPU machines and CI)
    python -m gpuconv.doctor            the same

With a GPU it reports the environment (gpuconv, NumPy, CuPy, driver, CUDA runtime, NVRTC, CUDA
headers, device, compute capability, memory), compiles every kernel with timing, and sweeps every
registered algorithm of every op over every dtype on a few shapes against the NumPy engine in
float64. Without one it says exactly why CUDA is unusable and checks the CPU engine against
the convolution's definition (tap loops in float64) and, where installed, PyTorch.

Correctness inputs are random multiples of 1/64 in [-1, 1]: exact in float16, bfloat16, TF32,
float32 and float64, so one float64 reference per (shape, op) serves every dtype and algorithm,
and the products are exact in every precision. Two checks per result: the relative error
‖out − ref‖ / ‖ref‖ (autotune's per-dtype tolerance) and the largest element error over
max |ref| (:data:`MAX_ERR`), which catches a single wrong element the norm would average away.
On CuPy every allocation is filled with NaN first (:func:`nan_filled_allocations`), so an output
element a kernel never writes fails the check.

Exit status: 0 when everything ran passed; 1 on any failure (a kernel that does not compile, a
wrong or raising algorithm, a benchmark backend reported WRONG) or, with --require-gpu, when CUDA
is unusable.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import zlib

import numpy as np

from . import config
from .problem import ConvProblem

SCHEMA = "gpuconv-doctor/1"


def kernel_catalogue():
    """[(file, name expressions, get_kernel)] for every kernel the CUDA engine can launch (both
    generations, gpuconv.cuda.catalogue()): the one place the doctor learns the kernel list."""
    from . import cuda
    return [(f, tuple(names), cuda.get_kernel) for f, names, _structs in cuda.catalogue()]


# ---------------------------------------------------------------------------------------------
# dtypes, tolerances, exact inputs, the comparison
# ---------------------------------------------------------------------------------------------
#: dtype keys of the sweep; "float32+tf32" is float32 with gpuconv.set_allow_tf32(True).
DTYPE_KEYS = ("float64", "float32", "float32+tf32", "float16", "bfloat16")

#: largest |out - ref| allowed, as a fraction of max |ref|. float64/float32: accumulation
#: rounding only (the inputs and products are exact); float16/bfloat16: the output's rounding
#: (2^-11 and 2^-8 of the element, at most that of max |ref|) with headroom; TF32 as float32
#: on exact inputs, but kept at its normal-data bound so the table holds for any input.
MAX_ERR = {"float64": 1e-11, "float32": 3e-5, "float32+tf32": 3e-3, "float16": 4e-3,
           "bfloat16": 3e-2}


def dtype_of(key):
    """np.dtype of a dtype key (bfloat16 through ml_dtypes; ValueError if absent)."""
    from .benchmark.backends import numpy_dtype
    return numpy_dtype(key.split("+")[0])


def tolerances(key):
    """(relative-norm tolerance, max-element tolerance) of a dtype key."""
    from .autotune import tolerance
    return tolerance(dtype_of(key), key.endswith("+tf32")), MAX_ERR[key]


def stable_seed(*parts) -> int:
    """A seed from strings that is the same in every process (hash() of a str is not)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


GRID = 64  # inputs are k / GRID, |k| <= GRID: at most 7 significant bits


def exact_inputs(op, p: ConvProblem, seed):
    """float64 operands of `op` (fprop: x, w, bias; dgrad: w, dy; wgrad: x, dy), each a random
    multiple of 1/64 in [-1, 1], hence exactly representable in every dtype of DTYPE_KEYS."""
    rng = np.random.default_rng(seed)

    def r(shape):
        return rng.integers(-GRID, GRID + 1, shape).astype(np.float64) / GRID

    if op == "fprop":
        return r(p.x_shape), r(p.w_shape), r((p.K,))
    if op == "dgrad":
        return r(p.w_shape), r(p.y_shape)
    if op == "wgrad":
        return r(p.x_shape), r(p.y_shape)
    raise ValueError(f"op must be fprop, dgrad or wgrad, got {op!r}")


def numpy_reference(op, p, inputs):
    """The NumPy engine in float64 on float64 operands."""
    from .engines import numpy_engine as ne
    return {"fprop": ne.conv_fprop, "dgrad": ne.conv_dgrad, "wgrad": ne.conv_wgrad}[op](p, *inputs)


def _xp(a):
    return np if isinstance(a, np.ndarray) else sys.modules["cupy"]


def as_float64(a):
    """`a` (NumPy or CuPy, any float dtype incl. bfloat16) as float64 on the same device."""
    xp = _xp(a)
    try:
        return a.astype(xp.float64)
    except (TypeError, ValueError, NotImplementedError):
        if a.dtype.name != "bfloat16":
            raise
        # bfloat16 is the top half of a float32: widen the bits where no cast exists
        return (a.view(xp.uint16).astype(xp.uint32) << 16).view(xp.float32).astype(xp.float64)


def upload(a64, dtype, xp):
    """A float64 NumPy array as a `dtype` array of module `xp` (exact for exact_inputs)."""
    host = a64.astype(dtype)
    if xp is np:
        return host
    try:
        return xp.asarray(host)
    except (TypeError, ValueError):
        if np.dtype(dtype).name != "bfloat16":
            raise
        return xp.asarray(host.view(np.uint16)).view(dtype)


def compare(out, ref, key):
    """Check `out` against the float64 `ref` (same array module); a dict with ok, rel_err,
    max_err (max |out - ref| / max |ref|), the two tolerances and a reason when not ok."""
    rel_tol, max_tol = tolerances(key)
    res = dict(ok=False, rel_err=None, max_err=None, rel_tol=rel_tol, max_tol=max_tol,
               reason=None)
    if tuple(out.shape) != tuple(ref.shape):
        res["reason"] = f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
        return res
    xp = _xp(ref)
    o = as_float64(out)
    diff = xp.abs(o - ref)
    if not bool(xp.isfinite(o).all()):
        bad = int((~xp.isfinite(o)).sum())
        res["reason"] = f"{bad} NaN/Inf elements (unwritten or overflowed)"
        return res
    from .autotune import relative_error
    rel = relative_error(o, ref)
    scale = float(xp.abs(ref).max()) if ref.size else 0.0
    mx = (float(diff.max()) / scale if scale > 0 else float(diff.max())) if ref.size else 0.0
    res.update(rel_err=rel, max_err=mx)
    if rel > rel_tol:
        res["reason"] = f"relative error {rel:.2e} > {rel_tol:.0e}"
    elif mx > max_tol:
        at = np.unravel_index(int(diff.argmax()), ref.shape)
        res["reason"] = (f"max element error {mx:.2e} of max|ref| > {max_tol:.0e} at "
                         f"{tuple(int(i) for i in at)}")
    else:
        res["ok"] = True
    return res


@contextlib.contextmanager
def nan_filled_allocations(cupy):
    """Inside the block every new CuPy allocation comes from a pool of its own, filled with 0xFF
    bytes (NaN in float16, bfloat16, float32 and float64), so an output element no kernel writes
    reads back as NaN. Unlike freeing a NaN block and hoping the pool hands it out again, this
    cannot miss. The previous allocator is restored afterwards."""
    old = cupy.cuda.get_allocator()
    pool = cupy.cuda.MemoryPool()

    def alloc(nbytes):
        mem = pool.malloc(nbytes)
        if nbytes:
            mem.memset_async(0xFF, nbytes)
        return mem

    cupy.cuda.set_allocator(alloc)
    try:
        yield
    finally:
        cupy.cuda.Device().synchronize()
        cupy.cuda.set_allocator(old)
        pool.free_all_blocks()


@contextlib.contextmanager
def tf32_mode(key):
    """gpuconv's TF32 switch on for "+tf32" keys, off otherwise; restored afterwards."""
    old = config.get_allow_tf32()
    config.set_allow_tf32(key.endswith("+tf32"))
    try:
        yield
    finally:
        config.set_allow_tf32(old)


def applies(fn, p, key):
    """Does algorithm `fn` run (p, key)? Its supports(p, dtype) decides (none: every dtype).

    "float32+tf32" takes only algorithms that TF32 turns on (tensor-core float32); the others
    compute exactly what they do for "float32"."""
    sup = getattr(fn, "supports", None)
    dtype = dtype_of(key)
    if key.endswith("+tf32"):
        if sup is None:
            return False
        with tf32_mode("float32"):
            before = bool(sup(p, dtype))
        with tf32_mode(key):
            return bool(sup(p, dtype)) and not before
    if sup is None:
        return True
    with tf32_mode(key):
        return bool(sup(p, dtype))


# ---------------------------------------------------------------------------------------------
# the correctness sweep: any registry of callables, any array module
# ---------------------------------------------------------------------------------------------
#: (id, input shape, weight shape, conv kwargs): tile edges, stride + dilation + groups,
#: depthwise, 16-byte-load 1x1, a 7x7/2 stem; every algorithm supports at least one.
SWEEP_SHAPES = (
    ("3x3_tile_edges", (3, 37, 19, 23), (70, 37, 3, 3), dict(padding=1)),
    ("3x3_s2_dil2_g2", (2, 16, 17, 15), (24, 8, 3, 3), dict(stride=2, padding=2, dilation=2,
                                                              groups=2)),
    ("depthwise_3x3", (2, 32, 14, 13), (32, 1, 3, 3), dict(padding=1, groups=32)),
    ("1x1_vec", (2, 64, 16, 16), (96, 64, 1, 1), dict()),
    ("7x7_s2_stem", (2, 3, 31, 29), (16, 3, 7, 7), dict(stride=2, padding=3)),
)
OPS = ("fprop", "dgrad", "wgrad")


class Target:
    """Where a sweep runs: the array module, {op: {name: fn(p, *arrays)}}, the dtype keys, and
    how to wait for the device (errors surface at the call that caused them)."""

    def __init__(self, name, xp, registry, dtypes, sync=lambda: None,
                 allocations=contextlib.nullcontext):
        self.name, self.xp, self.registry, self.dtypes = name, xp, registry, tuple(dtypes)
        self.sync, self.allocations = sync, allocations


def sweep(target: Target, shapes=SWEEP_SHAPES, reference=numpy_reference, progress=None):
    """Every (op, algorithm, dtype, shape) the algorithm supports, checked against
    reference(op, p, float64 inputs). Returns result rows (dicts); status PASS, FAIL (wrong
    result), ERROR (raised) or SKIP (the dtype cannot be made here, e.g. no ml_dtypes)."""
    rows = []
    for sid, xs, ws, kw in shapes:
        p = ConvProblem.from_args(xs, ws, **kw)
        for op in OPS:
            algos = target.registry.get(op, {})
            if not algos:
                continue
            inputs = exact_inputs(op, p, stable_seed(sid, op))
            ref = reference(op, p, inputs)
            for key in target.dtypes:
                base = dict(target=target.name, op=op, dtype=key, shape=sid, problem=str(p))
                try:
                    dtype = dtype_of(key)
                    dev = [upload(a, dtype, target.xp) for a in inputs]
                except Exception as e:
                    rows += [dict(base, algo=name, status="SKIP",
                                  reason=f"{key} unavailable: {type(e).__name__}: {e}"[:300])
                             for name in algos]
                    continue
                for name, fn in algos.items():
                    row = dict(base, algo=name)
                    try:
                        if not applies(fn, p, key):
                            continue
                    except Exception as e:
                        rows.append(dict(row, status="ERROR",
                                         reason=f"supports() raised {type(e).__name__}: {e}"))
                        continue
                    t0 = time.perf_counter()
                    try:
                        with tf32_mode(key), target.allocations():
                            out = fn(p, *dev)
                            target.sync()
                        host = as_float64(out.get() if hasattr(out, "get") else out)
                    except Exception as e:
                        rows.append(dict(row, status="ERROR",
                                         reason=f"{type(e).__name__}: {e}"[:300]))
                        continue
                    res = compare(host, ref, key)
                    ok = res.pop("ok")
                    rows.append(dict(row, status="PASS" if ok else "FAIL",
                                     seconds=time.perf_counter() - t0, **res))
                    if progress:
                        progress(rows[-1])
    return rows


# ---- the CPU check's independent reference: the definition, one tap at a time -------------
def _taps(p):
    for r in range(p.R):
        for s in range(p.S):
            hs = slice(r * p.dil_h, r * p.dil_h + p.stride_h * (p.P - 1) + 1, p.stride_h)
            ws = slice(s * p.dil_w, s * p.dil_w + p.stride_w * (p.Q - 1) + 1, p.stride_w)
            yield r, s, hs, ws


def definition_reference(op, p, inputs):
    """y[n,k,i,j] = sum_{c,r,s} x_pad[n, c, i*stride + r*dil, j*stride + s*dil] w[k,c,r,s], and
    the gradients as its adjoints (scatter into the window), in float64, tap by tap: shares no
    code with the NumPy engine's im2col or its stride-phase dgrad."""
    G, Cg, Kg = p.groups, p.Cg, p.Kg
    pads = ((0, 0), (0, 0), (p.pad_h, p.pad_h_end), (p.pad_w, p.pad_w_end))
    if op == "dgrad":
        w, dy = inputs
        dxp = np.zeros((p.N, p.C, p.H + p.pad_h + p.pad_h_end, p.W + p.pad_w + p.pad_w_end))
        for g in range(G):
            ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
            for r, s, hs, ws in _taps(p):
                dxp[:, cs, hs, ws] += np.einsum("nkij,kc->ncij", dy[:, ks], w[ks, :, r, s])
        return dxp[:, :, p.pad_h:p.pad_h + p.H, p.pad_w:p.pad_w + p.W]
    x = np.pad(inputs[0], pads)
    if op == "fprop":
        w, b = inputs[1], inputs[2]
        y = np.zeros(p.y_shape)
        for g in range(G):
            ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
            for r, s, hs, ws in _taps(p):
                y[:, ks] += np.einsum("ncij,kc->nkij", x[:, cs, hs, ws], w[ks, :, r, s])
        return y + b[None, :, None, None]
    dy = inputs[1]
    dw = np.zeros(p.w_shape)
    for g in range(G):
        ks, cs = slice(g * Kg, (g + 1) * Kg), slice(g * Cg, (g + 1) * Cg)
        for r, s, hs, ws in _taps(p):
            dw[ks, :, r, s] = np.einsum("nkij,ncij->kc", dy[:, ks], x[:, cs, hs, ws])
    return dw


def cpu_target():
    """The NumPy engine in float32/float64, and PyTorch's CPU convolutions where installed."""
    from .engines import numpy_engine as ne
    reg = {"fprop": {"numpy": ne.conv_fprop}, "dgrad": {"numpy": ne.conv_dgrad},
           "wgrad": {"numpy": ne.conv_wgrad}}
    torch_fns = _torch_cpu_fns()
    if torch_fns:
        for op, fn in torch_fns.items():
            reg[op]["torch-cpu"] = fn
    return Target("cpu", np, reg, ("float64", "float32"))


def _torch_cpu_fns():
    """PyTorch's conv2d and its two gradients as fn(p, *numpy arrays), or None."""
    try:
        import torch
    except Exception:
        return None

    def kw(p):
        return dict(stride=(p.stride_h, p.stride_w), padding=(p.pad_h, p.pad_w),
                    dilation=(p.dil_h, p.dil_w), groups=p.groups)

    t = torch.from_numpy
    return {
        "fprop": lambda p, x, w, b: torch.nn.functional.conv2d(t(x), t(w), t(b), **kw(p)).numpy(),
        "dgrad": lambda p, w, dy: torch.nn.grad.conv2d_input(p.x_shape, t(w), t(dy),
                                                             **kw(p)).numpy(),
        "wgrad": lambda p, x, dy: torch.nn.grad.conv2d_weight(t(x), p.w_shape, t(dy),
                                                              **kw(p)).numpy(),
    }


def gpu_target():
    """The CUDA engine's registry plus the public "auto" path, every dtype key, on CuPy with
    NaN-filled allocations; or (None, reason) where CUDA is unusable."""
    from . import cuda
    reason = cuda.unavailable_reason()
    if reason:
        return None, reason
    import cupy
    from .engines import cuda_engine as ce
    reg = {op: dict(ce.ALGORITHMS[op]) for op in OPS}
    # the public path: select() and the auto policy, as a user's call takes it
    reg["fprop"]["auto"] = ce.conv_fprop
    reg["dgrad"]["auto"] = ce.conv_dgrad
    reg["wgrad"]["auto"] = ce.conv_wgrad
    return Target("cuda", cupy, reg, DTYPE_KEYS, sync=lambda: cupy.cuda.Device().synchronize(),
                  allocations=lambda: nan_filled_allocations(cupy)), None


# ---------------------------------------------------------------------------------------------
# environment and kernels
# ---------------------------------------------------------------------------------------------
def _version(mod):
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as e:
        return f"not importable ({type(e).__name__}: {str(e)[:80]})"


def _cuda_version(v):
    return f"{v // 1000}.{v % 1000 // 10}" if isinstance(v, int) and v > 0 else str(v)


def cuda_headers():
    """Where cuda_fp16.h is: (directory or None, directories searched). NVRTC needs the CUDA
    headers; CuPy finds them under its CUDA path (a toolkit, or the pip nvidia-* wheels)."""
    dirs = []
    try:
        import cupy._environment as ce
        path = ce.get_cuda_path()
        if path:
            dirs.append(os.path.join(path, "include"))
    except Exception:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            dirs.append(os.path.join(os.environ[var], "include"))
    try:
        import nvidia
        for root in getattr(nvidia, "__path__", []):
            for sub in sorted(os.listdir(root)):
                dirs.append(os.path.join(root, sub, "include"))
    except Exception:
        pass
    dirs.append("/usr/local/cuda/include")
    seen = list(dict.fromkeys(dirs))
    found = next((d for d in seen if os.path.isfile(os.path.join(d, "cuda_fp16.h"))), None)
    return found, seen


def environment():
    """What is installed and which device is there, as a flat dict of strings/numbers."""
    from . import __version__, _blas_kernels, cuda
    from .benchmark import env as benv
    e = {"gpuconv": __version__, "gpuconv_path": os.path.dirname(os.path.abspath(__file__)),
         "commit": benv.git_commit(), "python": sys.version.split()[0],
         "platform": platform.platform(), "numpy": np.__version__, "cupy": _version("cupy"),
         "ml_dtypes": _version("ml_dtypes"), "torch": _version("torch"),
         "cpu": benv.cpu_name(), "cpu_count": os.cpu_count(),
         "blas": benv.blas_kernels(benv.versions())}
    note = _blas_kernels.note()
    if note:
        e["blas_note"] = note
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        e["torch_cuda"] = torch.version.cuda
        try:
            e["torch_sees_gpu"] = bool(torch.cuda.is_available())
        except Exception:
            e["torch_sees_gpu"] = False
    reason = cuda.unavailable_reason()
    e["cuda_usable"] = reason is None
    e["cuda_unavailable_reason"] = reason
    try:
        from cupy_backends.cuda.libs import nvrtc
        e["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
    except Exception as ex:
        e["nvrtc"] = f"not loadable ({type(ex).__name__}: {str(ex)[:120]})"
    found, searched = cuda_headers()
    e["cuda_headers"] = found or f"cuda_fp16.h not found (searched {', '.join(searched)})"
    e["cupy_cache_dir"] = os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache (default)")
    e["second_generation"] = config.second_generation_enabled()
    e["autotune"] = config.autotune_enabled()
    e["allow_tf32"] = config.get_allow_tf32()
    if reason is None:
        import cupy
        rt = cupy.cuda.runtime
        e["cuda_driver_api"] = _cuda_version(rt.driverGetVersion())
        e["cuda_runtime"] = _cuda_version(rt.runtimeGetVersion())
        info = benv.gpu_info() or {}
        e["driver"] = info.get("driver")
        for i in range(rt.getDeviceCount()):
            props = rt.getDeviceProperties(i)
            name = props["name"]
            with cupy.cuda.Device(i):
                free, total = rt.memGetInfo()
            e[f"device{i}"] = (f"{name.decode() if isinstance(name, bytes) else name}, "
                               f"compute capability {props['major']}.{props['minor']}, "
                               f"{props['multiProcessorCount']} SMs, "
                               f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free), "
                               f"L2 {props.get('l2CacheSize', 0) / 2**20:.0f} MiB")
    return e


def compile_kernels(catalogue=None, progress=None):
    """Compile (or load from CuPy's disk cache) every kernel, file by file, timed."""
    rows = []
    for file, names, get in (kernel_catalogue() if catalogue is None else catalogue):
        t0 = time.perf_counter()
        row = dict(file=file, kernels=len(names), status="PASS", reason=None)
        try:
            for n in names:
                get(n)
        except Exception as e:
            row.update(status="FAIL", reason=f"{type(e).__name__}: {e}"[:2000])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if progress:
            progress(row)
    return rows


# ---------------------------------------------------------------------------------------------
# the short benchmark: gpuconv-bench itself, on a few layers
# ---------------------------------------------------------------------------------------------
BENCH_GPU = ["--layer", "r50.l1.3x3_64,vgg16.conv3_1", "--op", "fprop,dgrad,wgrad",
             "--dtype", "float32,float16", "--batch", "32", "--backend", "cuda,cudnn,cudnn-tf32",
             "--warmup-ms", "20", "--min-samples", "5", "--max-samples", "30",
             "--max-time-per-case", "0.3"]
BENCH_CPU = ["--layer", "lenet5.conv2", "--op", "fprop,dgrad,wgrad", "--dtype", "float32",
             "--batch", "8", "--min-samples", "3", "--max-samples", "6",
             "--max-time-per-case", "0.2", "--settle-ms", "20"]


def run_bench(gpu: bool):
    """Run gpuconv-bench (in this process) on a few layers; (its JSON document, its rc, its
    printed output)."""
    from .benchmark import cli, report
    args = list(BENCH_GPU if gpu else BENCH_CPU)
    if not gpu:
        args += ["--backend", "numpy,torch-cpu" if _torch_cpu_fns() else "numpy"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.json")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(args + ["--quiet", "--json", path])
        doc = report.load_json(path) if os.path.exists(path) else None
    return doc, rc, buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def _say(out, line=""):
    print(line, file=out, flush=True)


def sweep_table(rows):
    """Lines: one per (op, algorithm), one column per dtype key (pass/run, worst errors)."""
    keys = [k for k in DTYPE_KEYS if any(r["dtype"] == k for r in rows)] or \
        sorted({r["dtype"] for r in rows})
    lines = [f"  {'op':<6} {'algorithm':<22} " + " ".join(f"{k:<22}" for k in keys)]
    groups = {}
    for r in rows:
        groups.setdefault((r["target"], r["op"], r["algo"]), []).append(r)
    for (_, op, algo), rs in groups.items():
        cells = []
        for k in keys:
            sel = [r for r in rs if r["dtype"] == k]
            if not sel:
                cells.append("-")
                continue
            bad = [r for r in sel if r["status"] in ("FAIL", "ERROR")]
            if all(r["status"] == "SKIP" for r in sel):
                cells.append("SKIP")
                continue
            ran = [r for r in sel if r["status"] != "SKIP"]
            worst = max((r.get("max_err") or 0.0) for r in ran)
            tag = "FAIL" if bad else "ok"
            cells.append(f"{tag} {len(ran) - len(bad)}/{len(ran)} max {worst:.0e}")
        lines.append(f"  {op:<6} {algo:<22} " + " ".join(f"{c:<22}" for c in cells))
    return lines


def build_parser():
    ap = argparse.ArgumentParser(
        prog="gpuconv-doctor",
        description="Check a gpuconv install: environment, kernel compilation, a correctness "
                    "sweep of every algorithm and dtype against the NumPy engine in float64, "
                    "and (--bench) a short benchmark beside cuDNN. Without a GPU: says why, "
                    "and checks the CPU engine.")
    ap.add_argument("--bench", action="store_true",
                    help="also run a short gpuconv-bench (beside cuDNN where PyTorch has CUDA)")
    ap.add_argument("--json", metavar="FILE", help="write the whole report as JSON")
    ap.add_argument("--require-gpu", action="store_true",
                    help="exit 1 when CUDA is unusable (default: check the CPU engine, exit 0)")
    ap.add_argument("--quiet", action="store_true", help="print only the verdict")
    return ap


def main(argv=None, out=None):
    args = build_parser().parse_args(argv)
    out = io.StringIO() if args.quiet else (out or sys.stdout)
    t_start = time.perf_counter()
    from .benchmark import env as benv
    doc = {"schema": SCHEMA, "date": benv.now(), "command": "gpuconv-doctor " + " ".join(
        sys.argv[1:] if argv is None else argv), "failures": []}
    fail = doc["failures"]

    env = environment()
    doc["environment"] = env
    _say(out, "gpuconv-doctor: environment")
    for k, v in env.items():
        _say(out, f"  {k:<24} {v}")

    target, reason = gpu_target()
    doc["cuda"] = {"usable": target is not None, "reason": reason}
    if target is None:
        _say(out, f"\nCUDA is not usable here: {reason}")
        if args.require_gpu:
            fail.append(f"--require-gpu: CUDA is not usable: {reason}")
        _say(out, "Checking the CPU engine instead (NumPy engine, and PyTorch CPU where "
                  "installed, against the convolution's definition in float64).")
        doc["kernels"] = []
        target, reference = cpu_target(), definition_reference
    else:
        _say(out, "\nkernels (compile, or load from CuPy's disk cache)")
        doc["kernels"] = compile_kernels(progress=lambda r: _say(
            out, f"  {r['file']:<24} {r['kernels']:>3} kernels {r['seconds']:7.2f} s "
                 f"{r['status']}" + (f"\n    {r['reason']}" if r["reason"] else "")))
        fail += [f"kernels/{r['file']} does not compile: {r['reason']}"
                 for r in doc["kernels"] if r["status"] != "PASS"]
        reference = numpy_reference

    _say(out, f"\ncorrectness sweep on {target.name} ({len(SWEEP_SHAPES)} shapes x "
              f"{len(OPS)} ops; inputs exact in every dtype, reference in float64)")
    t0 = time.perf_counter()
    rows = sweep(target, SWEEP_SHAPES, reference)
    doc["sweep"] = rows
    doc["sweep_seconds"] = time.perf_counter() - t0
    for line in sweep_table(rows):
        _say(out, line)
    for r in rows:
        if r["status"] in ("FAIL", "ERROR"):
            msg = f"{r['status']}: {r['op']} {r['algo']} {r['dtype']} {r['shape']}: {r['reason']}"
            fail.append(msg)
            _say(out, "  " + msg)
    skips = sorted({r["reason"] for r in rows if r["status"] == "SKIP"})
    for s in skips:
        _say(out, f"  SKIP: {s}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
    doc["sweep_counts"] = counts
    _say(out, "  " + ", ".join(f"{v} {k}" for k, v in counts.items())
         + f" in {doc['sweep_seconds']:.1f} s")

    if args.bench:
        gpu = target.name == "cuda"
        _say(out, f"\nbenchmark (gpuconv-bench {' '.join(BENCH_GPU if gpu else BENCH_CPU)})")
        try:
            bdoc, rc, text = run_bench(gpu)
        except (Exception, SystemExit) as e:  # argparse errors exit: report them, go on
            bdoc, rc, text = None, 2, f"{type(e).__name__}: {e}"
        doc["bench"] = {"rc": rc, "output": text, "run": bdoc}
        if bdoc:
            from .benchmark import report
            for line in report.summary_lines(bdoc.get("summary", []), bdoc.get("targets", [])):
                _say(out, line)
            bad = [r for r in bdoc.get("results", []) if r.get("status") != "ok"]
            for r in bad:
                fail.append(f"bench {r['status']}: {r['backend']} {r['layer']} {r['op']} "
                            f"{r['dtype']}: {r.get('reason')}")
        else:
            _say(out, text[-2000:])
        if rc not in (0, None) and not any(f.startswith("bench") for f in fail):
            fail.append(f"bench: gpuconv-bench exited {rc}")

    doc["seconds"] = time.perf_counter() - t_start
    doc["status"] = "FAIL" if fail else "ok"
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, default=str)
            f.write("\n")
        _say(out, f"\nwrote {args.json}")
    verdict = (f"gpuconv-doctor: {'FAIL' if fail else 'ok'} ({len(fail)} failures, "
               f"{doc['seconds']:.1f} s; {'CUDA' if doc['cuda']['usable'] else 'CPU only'})")
    for f in fail[:20]:  # also under --quiet: the verdict's reasons
        print("  " + f[:300], flush=True)
    print(verdict, flush=True)
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
