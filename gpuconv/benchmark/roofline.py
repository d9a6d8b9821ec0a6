"""The two ceilings a measured time is judged against: peak FLOP/s of the unit used and memory
bandwidth, so that ``floor = max(flops / peak, bytes / bandwidth)`` and the reported fraction of
the roofline is ``floor / measured``.

GPU: a table of datasheet figures (dense, no sparsity, boost clock) for known devices, or, with
``--roofline measure``, a large matrix product per dtype and a device-to-device copy measured once
per run (bytes read + bytes written). Unknown devices need ``measure``. The unit used for a dtype:
float32 -> the FP32 CUDA cores (TF32 off), tf32 -> TF32 tensor cores, float16 / bfloat16 -> the
FP16/BF16 tensor cores, float64 -> the FP64 tensor cores (DMMA; the FP64 peak).
CPU: a matrix product (NumPy's BLAS, the run's threads) and a large copy, measured once per run;
the CPU's "peak" is what its BLAS reaches, not a datasheet figure.
"""
from __future__ import annotations

import functools
import time

import numpy as np

# name patterns (checked in order, against the lower-cased device name) -> figures
# TFLOP/s: fp32 (CUDA cores), tf32 / fp16 (tensor cores, dense), fp64 (tensor cores); TB/s;
# where given, memory (GB) and L2 (MB) -- the benchmark's L2 flush sizes itself from the L2.
GPU_TABLE = [
    # the H200: the H100 SXM's GH100 compute with 141 GB of HBM3e at 4.8 TB/s, 50 MB L2
    ("h200", "NVIDIA H200 SXM (HBM3e)", dict(fp32=66.9, tf32=494.7, fp16=989.4, fp64=66.9,
                                             tbs=4.8, mem_gb=141, l2_mb=50)),
    ("h100 nvl", "NVIDIA H100 NVL", dict(fp32=60.0, tf32=417.5, fp16=835.0, fp64=60.0,
                                         tbs=3.9)),
    ("h100 pcie", "NVIDIA H100 PCIe", dict(fp32=51.2, tf32=378.0, fp16=756.0, fp64=51.2,
                                           tbs=2.0)),
    ("h100", "NVIDIA H100 SXM5 (HBM3)", dict(fp32=66.9, tf32=494.7, fp16=989.4, fp64=66.9,
                                             tbs=3.35, mem_gb=80, l2_mb=50)),
    ("a100-sxm4-40gb", "NVIDIA A100 SXM4 40GB", dict(fp32=19.5, tf32=156.0, fp16=312.0,
                                                     fp64=19.5, tbs=1.555)),
    ("a100-pcie-40gb", "NVIDIA A100 PCIe 40GB", dict(fp32=19.5, tf32=156.0, fp16=312.0,
                                                     fp64=19.5, tbs=1.555)),
    ("a100 80gb pcie", "NVIDIA A100 PCIe 80GB", dict(fp32=19.5, tf32=156.0, fp16=312.0,
                                                     fp64=19.5, tbs=1.935)),
    ("a100", "NVIDIA A100 SXM4 80GB", dict(fp32=19.5, tf32=156.0, fp16=312.0, fp64=19.5,
                                           tbs=2.039)),
    ("l4", "NVIDIA L4", dict(fp32=30.3, tf32=60.0, fp16=121.0, fp64=0.49, tbs=0.3)),
    ("a10", "NVIDIA A10", dict(fp32=31.2, tf32=62.5, fp16=125.0, fp64=0.98, tbs=0.6)),
    ("v100", "NVIDIA V100 SXM2", dict(fp32=15.7, tf32=15.7, fp16=125.0, fp64=7.8, tbs=0.9)),
    ("t4", "NVIDIA T4", dict(fp32=8.1, tf32=8.1, fp16=65.0, fp64=0.25, tbs=0.32)),
]

UNIT_OF = {"float32": "fp32", "tf32": "tf32", "float16": "fp16", "bfloat16": "fp16",
           "float64": "fp64"}


class Roofline:
    """peak FLOP/s per unit and bandwidth (bytes/s) of one device, and where they came from."""

    def __init__(self, device, source, flops, bandwidth, memory_bytes=None, l2_bytes=None):
        self.device, self.source = device, source
        self.flops = dict(flops)       # unit -> FLOP/s
        self.bandwidth = bandwidth     # bytes/s
        self.memory_bytes, self.l2_bytes = memory_bytes, l2_bytes  # datasheet, where known

    def unit(self, dtype_key):
        return UNIT_OF.get(dtype_key, dtype_key)

    def floor_s(self, flops, nbytes, dtype_key, memory_only=False):
        """The roofline time: the larger of compute time and minimum-traffic time.

        None where the peak of the unit is unknown (e.g. no TF32 figure was measured)."""
        t_mem = nbytes / self.bandwidth if self.bandwidth else 0.0
        if memory_only:
            return t_mem
        peak = self.flops.get(self.unit(dtype_key))
        return max(flops / peak, t_mem) if peak else None

    def to_json(self):
        d = {"device": self.device, "source": self.source,
             "peak_flops": self.flops, "bandwidth_bytes_per_s": self.bandwidth}
        if self.memory_bytes is not None:
            d["memory_bytes"] = self.memory_bytes
        if self.l2_bytes is not None:
            d["l2_bytes"] = self.l2_bytes
        return d


def gpu_from_table(name):
    low = name.lower()
    for pattern, label, f in GPU_TABLE:
        if pattern in low:
            return Roofline(name, f"datasheet table: {label} (dense peaks, boost clock)",
                            {k: f[k] * 1e12 for k in ("fp32", "tf32", "fp16", "fp64")},
                            f["tbs"] * 1e12,
                            memory_bytes=int(f["mem_gb"] * 1e9) if "mem_gb" in f else None,
                            l2_bytes=int(f["l2_mb"]) << 20 if "l2_mb" in f else None)
    return None


def _best_time(fn, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@functools.lru_cache(maxsize=None)
def measure_cpu(n=1536, copy_mib=128):
    """Matmul FLOP/s per unit (float32, float64) and copy bandwidth, best of 3.

    The matmul is NumPy's BLAS and, where importable, PyTorch's (MKL/oneDNN); the faster of the
    two is the CPU's "peak", since either library's convolutions may reach it."""
    rng = np.random.default_rng(0)
    flops, libs = {}, ["NumPy BLAS"]
    try:
        import torch
    except Exception:
        torch = None
    else:
        libs.append("PyTorch")
    for unit, dt in (("fp32", np.float32), ("fp64", np.float64)):
        a = rng.standard_normal((n, n)).astype(dt)
        b = rng.standard_normal((n, n)).astype(dt)
        best = _best_time(lambda: a @ b, 3)
        if torch is not None:
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            best = min(best, _best_time(lambda: ta @ tb, 3))
        flops[unit] = 2 * n ** 3 / best
    src = np.ones(copy_mib * (1 << 20) // 8)
    dst = np.empty_like(src)
    bw = 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src), 3)
    return Roofline("cpu", f"measured on this CPU: {n}x{n} matmul, best of "
                    f"{' and '.join(libs)}; {copy_mib} MiB copy (read + write)", flops, bw)


def measure_gpu(name):
    """Matmul peaks per unit (8192^3, PyTorch or CuPy) and a 1 GiB device copy, once."""
    try:
        import torch
        if not torch.cuda.is_available():
            raise ImportError
        return _measure_gpu_torch(name, torch)
    except ImportError:
        return _measure_gpu_cupy(name)


def _gpu_time(fn, sync, reps=5):
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _measure_gpu_torch(name, torch):
    n = 8192
    flops = {}
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for unit, dt, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                               ("fp16", torch.float16, False), ("fp64", torch.float64, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device="cuda").to(dt)
            b = torch.randn(n, n, device="cuda").to(dt)
            flops[unit] = 2 * n ** 3 / _gpu_time(lambda: a @ b, torch.cuda.synchronize)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    src = torch.ones(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * 4 / _gpu_time(lambda: dst.copy_(src), torch.cuda.synchronize)
    return Roofline(name, "measured once this run: 8192^3 matmul per unit through PyTorch "
                    "(cuBLAS), 1 GiB device copy (read + write)", flops, bw)


def _measure_gpu_cupy(name):
    import cupy
    n = 8192
    flops = {}
    sync = cupy.cuda.Device().synchronize
    for unit, dt in (("fp32", cupy.float32), ("fp16", cupy.float16), ("fp64", cupy.float64)):
        a = cupy.random.standard_normal((n, n)).astype(dt)
        b = cupy.random.standard_normal((n, n)).astype(dt)
        flops[unit] = 2 * n ** 3 / _gpu_time(lambda: a @ b, sync)
    src = cupy.ones(1 << 28, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    bw = 2 * src.nbytes / _gpu_time(lambda: dst.__setitem__(Ellipsis, src), sync)
    return Roofline(name, "measured once this run: 8192^3 matmul per unit through CuPy "
                    "(no TF32 figure), 1 GiB device copy (read + write)", flops, bw)
