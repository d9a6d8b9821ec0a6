"""The implementations a run compares, behind one small interface.

=============  ======  ==========================================================================
name           device  what runs
=============  ======  ==========================================================================
cuda:ALGO      GPU     gpuconv's CUDA engine, one backend per algorithm of its registry
                       ``cuda_engine.ALGORITHMS[op][ALGO]`` (``cuda`` = all of them; ``--algo``)
baseline       GPU     alias of ``cuda:im2col_gemm``: explicit im2col + cuBLAS, the floor to beat
cudnn          GPU     cuDNN through PyTorch, TF32 off (``allow_tf32 = False``)
cudnn-tf32     GPU     cuDNN through PyTorch, TF32 on (float32 inputs only)
numpy          CPU     gpuconv's NumPy engine
torch-cpu      CPU     ``torch.nn.functional.conv2d`` / ``torch.nn.grad.conv2d_input`` /
                       ``conv2d_weight`` / ``max_pool2d`` on the CPU
torch-bridge   CPU     gpuconv through its PyTorch custom ops (``torch.ops.gpuconv.*``, from
                       ``gpuconv.torch``) on CPU tensors: the NumPy engine plus the bridge
torch-bridge-  GPU     the same on CUDA tensors: the CUDA engine on torch's stream and caching
cuda                   allocator
=============  ======  ==========================================================================

A backend that cannot run here (no GPU, no PyTorch, no CUDA engine yet, an op or dtype it lacks)
is skipped with a reason, never silently. ``register()`` adds backends (the tests add a wrong one
to prove that the check catches it).

Every backend calls its op with the bias left out (``bias=None``), and max-pooling returns the
argmax indices too (what a training step needs), on every backend alike.
"""
from __future__ import annotations

import numpy as np

from ..engines import numpy_engine

CONV_OPS = ("fprop", "dgrad", "wgrad")
OPS = CONV_OPS + ("pool",)
DTYPES = ("float32", "float16", "float64", "bfloat16")

# Relative Frobenius error ||out - ref|| / ||ref|| allowed against the float64 reference computed
# from the same (already rounded) inputs. float32 lands far under 1e-3; TF32 near 3e-4; fp16
# operands with fp32 accumulation are limited by the fp16 output rounding (~3e-4); bf16 outputs
# by theirs (~2e-3). See /work/.library/device/METHOD.md and bench/NOTES.md.
TOLERANCE = {"float64": 1e-10, "float32": 5e-4, "tf32": 3e-3, "float16": 3e-3,
             "bfloat16": 1.5e-2}


def numpy_dtype(name: str):
    """np.dtype for a dtype name; bfloat16 through ml_dtypes (ValueError if absent)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("bfloat16 needs the ml_dtypes package (pip install ml_dtypes)") \
                from None
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return np.dtype(name)


# ---------------------------------------------------------------------------------------------
# the ops on array-module-agnostic engines (NumPy engine, CUDA engine)
# ---------------------------------------------------------------------------------------------
def engine_op(op, fn):
    """Adapt an engine function (numpy_engine signatures) to call(problem, arrays dict)."""
    if op == "fprop":
        return lambda p, a: fn(p, a["x"], a["w"], None)
    if op == "dgrad":
        return lambda p, a: fn(p, a["w"], a["dy"])
    if op == "wgrad":
        return lambda p, a: fn(p, a["x"], a["dy"])
    if op == "pool":
        return lambda p, a: fn(p, a["x"])  # (y, idx)
    raise ValueError(op)


def first(out):
    """The op's result proper: y of max-pooling's (y, idx)."""
    return out[0] if isinstance(out, tuple) else out


class Runner:
    """One backend bound to one case: its inputs uploaded, ready to run on input set i."""

    def __init__(self, backend, case, call, sets, kit, download):
        self.backend, self.case, self._call, self._sets = backend, case, call, sets
        self.kit, self._download = kit, download

    def run(self, i=0):
        return self._call(self.case.problem, self._sets[i])

    def result(self, out):
        """The op's result as a float64 NumPy array (for the check)."""
        return np.asarray(self._download(first(out)), dtype=np.float64)

    def workspace_bytes(self):
        """(bytes, how measured) of memory the call needed beyond its output, or (None, why)."""
        return self.backend.workspace_bytes(self)

    def algo_info(self):
        return self.backend.algo_info(self)


class Backend:
    name = "?"
    device = "cpu"
    description = ""

    def unavailable(self):
        """None, or why this backend cannot run on this machine."""
        return None

    def unsupported(self, op, dtype, problem=None):
        """None, or why this backend does not run (op, dtype[, problem])."""
        return None

    def tolerance_key(self, dtype):
        return dtype

    def prepare(self, case):
        raise NotImplementedError

    def info(self):
        return {"name": self.name, "device": self.device, "description": self.description}

    def workspace_bytes(self, runner):
        return None, "not measured for this backend"

    def algo_info(self, runner):
        return None


# ---------------------------------------------------------------------------------------------
# CPU: gpuconv's NumPy engine
# ---------------------------------------------------------------------------------------------
_NUMPY_FNS = {"fprop": numpy_engine.conv_fprop, "dgrad": numpy_engine.conv_dgrad,
              "wgrad": numpy_engine.conv_wgrad, "pool": numpy_engine.pool_fprop}


class NumpyBackend(Backend):
    name = "numpy"
    description = "gpuconv NumPy engine (CPU)"

    def unsupported(self, op, dtype, problem=None):
        if dtype not in ("float32", "float64"):
            return f"the NumPy engine runs float32/float64 only (no {dtype} BLAS on the CPU)"
        return None

    def call(self, op):
        return engine_op(op, _NUMPY_FNS[op])

    def prepare(self, case):
        from .timing import CpuKit
        return Runner(self, case, self.call(case.op), case.sets, _cpu_kit(CpuKit), np.asarray)

    def workspace_bytes(self, runner):
        """tracemalloc peak of one extra call (NumPy reports its buffers to tracemalloc)."""
        import tracemalloc
        started = not tracemalloc.is_tracing()
        if started:
            tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            out = runner.run(0)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            if started:
                tracemalloc.stop()
        outs = out if isinstance(out, tuple) else (out,)
        return max(0, peak - sum(o.nbytes for o in outs)), "tracemalloc peak - output"


_KITS = {}


def _cpu_kit(cls):
    """One kit per kind (each keeps its flush buffer): NumPy's, and PyTorch's own."""
    if cls.__name__ not in _KITS:
        _KITS[cls.__name__] = cls()
    return _KITS[cls.__name__]


def _torch_cuda_kit(cls):
    """One TorchKit (CUDA events on torch's stream) for every backend timing torch tensors."""
    if "torch-cuda" not in _KITS:
        _KITS["torch-cuda"] = cls()
    return _KITS["torch-cuda"]


# ---------------------------------------------------------------------------------------------
# PyTorch (CPU and cuDNN)
# ---------------------------------------------------------------------------------------------
def _torch():
    import torch
    return torch


def _torch_reason():
    try:
        _torch()
    except Exception as e:
        return f"PyTorch is not importable ({type(e).__name__}: {e})"
    return None


def torch_ops(op, case):
    """call(problem, tensors) with PyTorch's functional ops, for a ConvProblem/PoolProblem."""
    torch = _torch()
    F = torch.nn.functional
    p = case.problem
    if op == "pool":
        return lambda p, a: F.max_pool2d(a["x"], (p.R, p.S), (p.stride_h, p.stride_w),
                                         (p.pad_h, p.pad_w), (p.dil_h, p.dil_w), p.ceil_mode,
                                         return_indices=True)
    if not p.symmetric_padding:
        raise ValueError("asymmetric padding has no PyTorch conv2d equivalent")
    kw = dict(stride=(p.stride_h, p.stride_w), padding=(p.pad_h, p.pad_w),
              dilation=(p.dil_h, p.dil_w), groups=p.groups)
    if op == "fprop":
        return lambda p, a: F.conv2d(a["x"], a["w"], None, **kw)
    if op == "dgrad":
        return lambda p, a: torch.nn.grad.conv2d_input(p.x_shape, a["w"], a["dy"], **kw)
    if op == "wgrad":
        return lambda p, a: torch.nn.grad.conv2d_weight(a["x"], p.w_shape, a["dy"], **kw)
    raise ValueError(op)


def _to_torch(a, device, dtype_name):
    torch = _torch()
    if dtype_name == "bfloat16":  # torch.from_numpy knows no ml_dtypes: go through float32
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device, torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _from_torch(t):
    return t.detach().to("cpu", _torch().float64).numpy()


class TorchCpuBackend(Backend):
    name = "torch-cpu"
    description = "PyTorch CPU (F.conv2d, torch.nn.grad.conv2d_input/conv2d_weight, max_pool2d)"

    def unavailable(self):
        return _torch_reason()

    def unsupported(self, op, dtype, problem=None):
        if dtype not in ("float32", "float64"):
            return f"compared on the CPU in float32/float64 only, not {dtype}"
        return None

    def prepare(self, case):
        from .timing import TorchCpuKit
        torch = _torch()
        sets = [{k: _to_torch(v, "cpu", case.dtype) for k, v in s.items()} for s in case.sets]
        call = torch_ops(case.op, case)

        def run(p, a):
            with torch.no_grad():
                return call(p, a)
        return Runner(self, case, run, sets, _cpu_kit(TorchCpuKit), _from_torch)

    def info(self):
        d = super().info()
        d["threads"] = _torch().get_num_threads()
        return d

    def workspace_bytes(self, runner):
        return None, "PyTorch CPU allocations are invisible to tracemalloc"


def torch_cuda_reason():
    r = _torch_reason()
    if r:
        return r
    torch = _torch()
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} sees no CUDA device"
    if not torch.backends.cudnn.is_available():
        return "PyTorch was built without cuDNN"
    return None


class CudnnBackend(Backend):
    device = "cuda"

    def __init__(self, tf32: bool, autotune: bool = True):
        self.tf32, self.autotune = tf32, autotune
        self.name = "cudnn-tf32" if tf32 else "cudnn"
        self.description = (f"cuDNN through PyTorch, TF32 {'on' if tf32 else 'off'}, "
                            f"cudnn.benchmark={'on' if autotune else 'off'}; pool is PyTorch's "
                            "own CUDA max_pool2d")

    def unavailable(self):
        return torch_cuda_reason()

    def unsupported(self, op, dtype, problem=None):
        if self.tf32 and dtype != "float32":
            return "TF32 applies to float32 inputs only"
        return None

    def tolerance_key(self, dtype):
        return "tf32" if self.tf32 and dtype == "float32" else dtype

    def _flags(self):
        torch = _torch()
        torch.backends.cudnn.allow_tf32 = self.tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.benchmark = self.autotune
        torch.backends.cudnn.deterministic = False

    def prepare(self, case):
        from .timing import TorchKit
        torch = _torch()
        kit = _torch_cuda_kit(TorchKit)
        sets = [{k: _to_torch(v, "cuda", case.dtype) for k, v in s.items()} for s in case.sets]
        call = torch_ops(case.op, case)

        def run(p, a):
            self._flags()  # cudnn-tf32 and cudnn interleave: set the flags on every call
            with torch.no_grad():
                return call(p, a)
        return Runner(self, case, run, sets, kit, _from_torch)

    def info(self):
        torch = _torch()
        d = super().info()
        d.update(tf32=self.tf32, cudnn_benchmark=self.autotune,
                 cudnn_version=torch.backends.cudnn.version())
        return d

    def workspace_bytes(self, runner):
        torch = _torch()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = runner.run(0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        outs = out if isinstance(out, tuple) else (out,)
        return (max(0, peak - sum(o.numel() * o.element_size() for o in outs)),
                "torch.cuda.max_memory_allocated delta - output (cuDNN workspace included)")

    def algo_info(self, runner):
        """The CUDA kernels one call launches, read with torch.profiler: cuDNN's choice."""
        torch = _torch()
        try:
            from torch.profiler import ProfilerActivity, profile
            runner.run(0)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.run(0)
                torch.cuda.synchronize()
            names = []
            for ev in prof.events():
                dev = str(getattr(ev, "device_type", ""))
                if "CUDA" in dev and ev.name not in names and "Memset" not in ev.name:
                    names.append(ev.name)
            if not names:
                return "not obtainable: the profiler recorded no CUDA kernel"
            return "kernels: " + "; ".join(n[:120] for n in names)
        except Exception as e:  # profiler missing or CUPTI refused: say so
            return f"not obtainable ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------------------------
# GPU: gpuconv's CUDA engine (its algorithm registry)
# ---------------------------------------------------------------------------------------------
def cuda_reason():
    """None if CuPy sees a usable device, else why not (gpuconv.device's wording if present)."""
    try:
        from ..device import cuda_unavailable_reason
        return cuda_unavailable_reason()
    except ImportError:
        pass
    try:
        import cupy
    except Exception as e:
        return f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is present"
    except Exception as e:
        return f"CUDA is not usable ({type(e).__name__}: {e})"
    return None


def cuda_registry():
    """(registry {op: {algo: fn}}, None) or (None, why not)."""
    r = cuda_reason()
    if r:
        return None, r
    try:
        from ..engines import cuda_engine as ce
    except Exception as e:
        return None, f"gpuconv's CUDA engine is not importable ({type(e).__name__}: {e})"
    for probe in ("cuda_available", "is_available", "available"):
        fn = getattr(ce, probe, None)
        if callable(fn):
            try:
                ok = fn()
            except Exception as e:
                return None, f"cuda_engine.{probe}() raised {type(e).__name__}: {e}"
            if ok is False:
                return None, f"cuda_engine.{probe}() is False"
            break
    reg = getattr(ce, "ALGORITHMS", None)
    if reg is None:  # an engine without a registry: its default functions as one algorithm
        names = {"fprop": "conv_fprop", "dgrad": "conv_dgrad", "wgrad": "conv_wgrad"}
        reg = {op: {"default": getattr(ce, f)} for op, f in names.items() if hasattr(ce, f)}
    reg = {op: dict(algos) for op, algos in reg.items()}
    if "pool" not in reg and hasattr(ce, "pool_fprop"):
        reg["pool"] = {"pool": ce.pool_fprop}
    return reg, None


class CudaEngineBackend(Backend):
    device = "cuda"

    def __init__(self, algo, registry):
        self.algo, self.registry = algo, registry
        self.name = f"cuda:{algo}"
        base = " (im2col + cuBLAS: the baseline)" if algo == "im2col_gemm" else ""
        self.description = f"gpuconv CUDA engine, algorithm {algo}{base}"

    def unsupported(self, op, dtype, problem=None):
        if self.algo not in self.registry.get(op, {}):
            return f"no {op} algorithm named {self.algo!r} in cuda_engine.ALGORITHMS"
        supports = getattr(self.registry[op][self.algo], "supports", None)
        if problem is not None and callable(supports):
            try:
                ok = supports(problem, numpy_dtype(dtype))
            except Exception as e:
                return f"its supports() raised {type(e).__name__}: {e}"[:200]
            if not ok:
                return "its supports(problem, dtype) is False (shape, stride or dtype)"
        if dtype == "bfloat16":
            try:
                import cupy
                cupy.asarray(np.zeros(2, dtype=numpy_dtype("bfloat16"))) * 2
            except Exception as e:
                return f"this CuPy has no bfloat16 ({type(e).__name__}: {e})"[:200]
        return None

    def tolerance_key(self, dtype):
        """float32 on tensor cores ("_tc_" or "tf32" in the name) is TF32 arithmetic."""
        tc = "_tc_" in self.algo or "tf32" in self.algo
        return "tf32" if dtype == "float32" and tc else dtype

    def prepare(self, case):
        import cupy
        from .timing import CupyKit
        if "cupy" not in _KITS:
            _KITS["cupy"] = CupyKit()
        sets = [{k: cupy.asarray(v) for k, v in s.items()} for s in case.sets]
        call = engine_op(case.op, self.registry[case.op][self.algo])
        return Runner(self, case, call, sets, _KITS["cupy"], cupy.asnumpy)

    def workspace_bytes(self, runner):
        """Peak of live CuPy-pool allocations during one call, minus the output."""
        import cupy
        from cupy.cuda import memory_hook

        class Peak(memory_hook.MemoryHook):
            name = "gpuconv-bench-peak"

            def __init__(self):
                self.live, self.now, self.peak = {}, 0, 0

            def malloc_postprocess(self, **kw):
                self.live[kw["mem_ptr"]] = kw["mem_size"]
                self.now += kw["mem_size"]
                self.peak = max(self.peak, self.now)

            def free_postprocess(self, **kw):
                self.now -= self.live.pop(kw["mem_ptr"], 0)

        cupy.cuda.Device().synchronize()
        hook = Peak()
        with hook:
            out = runner.run(0)
            cupy.cuda.Device().synchronize()
        outs = out if isinstance(out, tuple) else (out,)
        return (max(0, hook.peak - sum(o.nbytes for o in outs)),
                "CuPy memory-pool peak delta - output (cuBLAS' own workspace not included)")


# ---------------------------------------------------------------------------------------------
# the registry of backend names
# ---------------------------------------------------------------------------------------------
_EXTRA = {}
CPU_BACKENDS = ("numpy", "torch-cpu")
GPU_BACKENDS = ("cuda", "cudnn", "cudnn-tf32")
ALIASES = {"baseline": "cuda:im2col_gemm"}


def register(name, factory):
    """Add a backend: ``factory()`` returns a Backend (or raises to be reported as skipped)."""
    _EXTRA[name] = factory


def known_names():
    return list(GPU_BACKENDS) + ["cuda:ALGO", "baseline"] + list(CPU_BACKENDS) + list(_EXTRA)


def resolve(names, algos=None, cudnn_autotune=True):
    """Backend objects for the requested names and the skipped ones as (name, reason).

    ``cuda`` expands into one backend per algorithm of the registry (filtered by ``algos``).
    """
    ready, skipped, seen = [], [], set()

    def add(b):
        if b.name not in seen:
            seen.add(b.name)
            ready.append(b)

    for raw in names:
        name = ALIASES.get(raw, raw)
        if name in _EXTRA:
            try:
                add(_EXTRA[name]())
            except Exception as e:
                skipped.append((name, f"{type(e).__name__}: {e}"))
        elif name == "numpy":
            add(NumpyBackend())
        elif name == "torch-cpu":
            r = _torch_reason()
            skipped.append((name, r)) if r else add(TorchCpuBackend())
        elif name in ("cudnn", "cudnn-tf32"):
            r = torch_cuda_reason()
            if r:
                skipped.append((name, r))
            else:
                add(CudnnBackend(name == "cudnn-tf32", cudnn_autotune))
        elif name == "cuda" or name.startswith("cuda:"):
            reg, r = cuda_registry()
            if r:
                skipped.append((name, r))
                continue
            all_algos = sorted({a for op in reg.values() for a in op})
            want = all_algos if name == "cuda" else [name.split(":", 1)[1]]
            if algos:
                want = [a for a in want if a in algos]
            for a in want:
                if a in all_algos:
                    add(CudaEngineBackend(a, reg))
                else:
                    skipped.append((f"cuda:{a}", f"no algorithm {a!r} in the registry "
                                    f"(has: {', '.join(all_algos) or 'none'})"))
        else:
            raise ValueError(f"unknown backend {raw!r}; choose from {', '.join(known_names())}")
    return ready, skipped


# ---------------------------------------------------------------------------------------------
# gpuconv through its PyTorch custom ops (gpuconv.torch): the bridge's cost beside its engine
# ---------------------------------------------------------------------------------------------
def bridge_ops(op, p):
    """call(problem, tensors) through torch.ops.gpuconv.* for a ConvProblem/PoolProblem."""
    torch = _torch()
    import gpuconv.torch  # noqa: F401  (registers torch.ops.gpuconv)
    ops = torch.ops.gpuconv
    if op == "pool":
        args = ([p.R, p.S], [p.stride_h, p.stride_w], [p.pad_h, p.pad_w], [p.dil_h, p.dil_w],
                p.ceil_mode)
        return lambda p, a: ops.max_pool2d(a["x"], *args)
    # the ops' only asymmetric padding is PyTorch's 'same' (checked in unsupported())
    args = ([p.stride_h, p.stride_w], [p.pad_h, p.pad_w], [p.dil_h, p.dil_w], p.groups,
            not p.symmetric_padding)
    if op == "fprop":
        return lambda p, a: ops.conv2d(a["x"], a["w"], None, *args)
    if op == "dgrad":
        return lambda p, a: ops.conv2d_grad_input(list(p.x_shape), a["w"], a["dy"], *args)
    if op == "wgrad":
        return lambda p, a: ops.conv2d_grad_weight(a["x"], list(p.w_shape), a["dy"], *args)
    raise ValueError(op)


class TorchBridgeBackend(Backend):
    """``torch-bridge``: CPU tensors, so the NumPy engine behind the custom op (its overhead is
    the difference to ``numpy``); ``torch-bridge-cuda``: CUDA tensors, the CUDA engine behind
    it, on torch's stream and allocator (compare with ``cuda:*`` and ``cudnn``)."""

    def __init__(self, device):
        self.device = device
        self.name = "torch-bridge" if device == "cpu" else "torch-bridge-cuda"
        engine = "NumPy engine" if device == "cpu" else "CUDA engine"
        self.description = (f"gpuconv's {engine} through its PyTorch custom ops "
                            f"(torch.ops.gpuconv.*) on {device} tensors")

    def unsupported(self, op, dtype, problem=None):
        allowed = ("float32", "float64") if self.device == "cpu" else DTYPES
        if dtype not in allowed:
            return f"gpuconv.torch runs {', '.join(allowed)} on {self.device} tensors"
        if problem is not None and op != "pool" and not problem.symmetric_padding:
            from ..problem import ConvProblem
            same = ConvProblem.from_args(problem.x_shape, problem.w_shape, 1, "same",
                                         (problem.dil_h, problem.dil_w), problem.groups)
            if (problem.stride_h, problem.stride_w) != (1, 1) or same != problem:
                return "asymmetric padding other than PyTorch's padding='same'"
        return None

    def prepare(self, case):
        from .timing import CpuKit, TorchKit
        torch = _torch()
        sets = [{k: _to_torch(v, self.device, case.dtype) for k, v in s.items()}
                for s in case.sets]
        call = bridge_ops(case.op, case.problem)

        def run(p, a):
            with torch.no_grad():
                return call(p, a)
        kit = _cpu_kit(CpuKit) if self.device == "cpu" else _torch_cuda_kit(TorchKit)
        return Runner(self, case, run, sets, kit, _from_torch)

    def info(self):
        d = super().info()
        d["torch_threads"] = _torch().get_num_threads()
        return d

    def workspace_bytes(self, runner):
        if self.device == "cpu":  # the NumPy engine's buffers, as for the numpy backend
            return NumpyBackend.workspace_bytes(self, runner)
        # every CuPy allocation of the call comes from torch's caching allocator
        return CudnnBackend.workspace_bytes(self, runner)


def _bridge_factory(device):
    def make():
        reason = _torch_reason() or (torch_cuda_reason() or cuda_reason()
                                     if device == "cuda" else None)
        if reason:
            raise RuntimeError(reason)
        return TorchBridgeBackend(device)
    return make


register("torch-bridge", _bridge_factory("cpu"))
register("torch-bridge-cuda", _bridge_factory("cuda"))
