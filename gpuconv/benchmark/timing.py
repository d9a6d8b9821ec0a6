"""Timing the way kernel engineers trust it: warm-up, cache flush, many interleaved samples.

* A *kit* times one call on one device. ``CpuKit`` reads ``time.perf_counter`` around the call;
  ``CupyKit`` and ``TorchKit`` record a CUDA event pair around it on the current stream (both
  libraries default to the legacy null stream, so their work is ordered with each other) and
  read the elapsed time after the round's synchronisation.
* Cold cache (the default): before every sample, outside the timed region, a buffer of at least
  twice the last-level cache (the GPU's L2; the CPU's L3 or L2) is zeroed, so each sample starts
  with operands in DRAM, as a layer does in a real network. ``warm`` skips the flush.
* Warm-up first (absorbs NVRTC/module load, cuDNN autotuning, BLAS thread start), then rounds:
  one sample per backend per round, the order rotated every round, so drift (clocks, thermals,
  other tenants) hits every backend alike. Rounds stop at ``max_samples``, or once
  ``min_samples`` are in and the case has used ``max_time`` seconds.
* When one input set fits in the cache several sets are rotated, so even warm-cache runs do not
  time the same bytes twice in a row.
* CPU only: the libraries' thread pools spin after a call (OpenBLAS's workers busy-wait ~0.1 s,
  libgomp's ~20 ms) and steal cores from whichever backend runs next. Measured on 2 cores,
  LeNet conv2 fprop: PyTorch 0.45 ms alone, 36 ms right after a NumPy call, 0.49 ms after a
  0.1 s pause. So each CPU backend's turn in a round starts with a ``settle_s`` pause, then
  untimed calls for ``wake_s`` (at least one), then ``block`` timed samples. GPU backends need
  no pause: their calls only enqueue work.
* The calls after the pause are a wake-up, not one call: on the 2-vCPU Zen 3 VM of issue 11's
  eighth session the first ~60-80 ms of work after a 0.15 s idle ran up to 1.8x slow (the split
  3x3 depthwise fprop: 13.2, 13.4, 11.2, then 7.6 ms a call, against 7.2 with no pause; a
  plain loop gives the 7.2), so one untimed call left the block's samples on cores still
  waking. ``wake_s`` = 0.1 s of untimed calls (0.2: 6.0 ms) brings the samples to the plain
  loop's level; both backends get the same.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

MiB = 1 << 20


@dataclass
class TimingSettings:
    cold: bool = True
    warmup_s: float = 0.05      # per backend, at least one call
    min_samples: int = 10
    max_samples: int = 200
    max_time: float = 2.0       # seconds per case, all backends together
    block: int = 1              # consecutive samples per backend per round
    settle_s: float = 0.15      # pause before a CPU backend's turn (its thread pool)
    wake_s: float = 0.1         # untimed calls after the pause (at least one), CPU only


CPU_DEFAULTS = TimingSettings(cold=True, warmup_s=0.0, min_samples=6, max_samples=60,
                              max_time=3.0, block=3, settle_s=0.15)
GPU_DEFAULTS = TimingSettings(cold=True, warmup_s=0.05, min_samples=20, max_samples=200,
                              max_time=2.0)


def cpu_cache_bytes() -> int:
    """Size of the CPU's last-level cache (sysconf, then /sys); 32 MiB if unknown."""
    for key in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(key)
            if v and v > 0:
                return int(v)
        except (ValueError, OSError, AttributeError):
            pass
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            with open(os.path.join(base, idx, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": MiB}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KM")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * MiB


def input_sets_for(footprint_bytes: int, cache_bytes: int, limit: int = 8) -> int:
    """How many input sets to rotate: enough to span twice the cache when one set fits in it."""
    if footprint_bytes <= 0 or footprint_bytes >= cache_bytes:
        return 1
    return max(1, min(limit, math.ceil(2 * cache_bytes / footprint_bytes)))


def thread_limits(n):
    """Limit NumPy's BLAS (threadpoolctl, if present) and PyTorch to n threads."""
    stack = contextlib.ExitStack()
    try:
        import threadpoolctl
        stack.enter_context(threadpoolctl.threadpool_limits(n))
    except ImportError:
        pass
    if "torch" in sys.modules or _torch_importable():
        import torch
        torch.set_num_threads(n)
    return stack


def _torch_importable():
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


class _Done:
    __slots__ = ("s", "faults")

    def __init__(self, s, faults=None):
        self.s, self.faults = s, faults

    def seconds(self):
        return self.s


try:
    import resource as _resource
except ImportError:  # (not on Windows)
    _resource = None


def minor_faults():
    """This process's minor page faults so far (all threads), or None where unknown.

    A call that takes fresh memory from the OS pays one fault per 4 KiB page, the kernel
    zeroing it: on the 2-vCPU Zen 3 VM ~3 us each, so PyTorch's NCHW depthwise conv in a fresh
    process (10,553 faults a call) took 22 ms, and 3.9 ms once glibc's malloc kept freed
    memory (its mmap threshold is raised by the first large free). The CPU kits count faults
    around each timed call, so a table shows when one side's time is the OS's."""
    if _resource is None:
        return None
    return _resource.getrusage(_resource.RUSAGE_SELF).ru_minflt


def median_faults(faults, name):
    """The median page faults a sample of `name` from sample()'s `faults` dict, or None."""
    return float(np.median(faults[name])) if faults.get(name) else None


class CpuKit:
    """perf_counter around the call; the flush writes a buffer of 2x the last-level cache."""

    kind = "cpu"

    def __init__(self):
        self.cache_bytes = cpu_cache_bytes()
        self._buf = None

    def flush(self):
        if self._buf is None:
            self._buf = np.empty(max(2 * self.cache_bytes, 8 * MiB) // 8, dtype=np.float64)
        self._buf.fill(0.0)

    def timed(self, fn, cold):
        if cold:
            self.flush()
        f0 = minor_faults()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        f1 = minor_faults()
        return _Done(t1 - t0, None if f0 is None else f1 - f0)

    def sync(self):
        pass


class TorchCpuKit(CpuKit):
    """CpuKit whose flush runs on PyTorch's own intra-op thread pool.

    A NumPy flush (one thread, ~5 ms for 64 MiB) left PyTorch's OpenMP workers asleep, so every
    cold sample paid their wake-up: on a shared 2-core machine, the woken worker waits for a
    core for up to a scheduler slice while the caller waits at the barrier, which gave LeNet-5
    conv samples from 0.33 to 18.8 ms (IQR > 300%; a plain loop: 0.05 ms). A parallel
    torch.zero_ of the same buffer evicts the cache just as well and leaves the workers spinning
    into the timed call, as they are between the layers of a network."""

    def flush(self):
        if self._buf is None:
            import torch
            self._buf = torch.empty(max(2 * self.cache_bytes, 8 * MiB) // 8,
                                    dtype=torch.float64)
        self._buf.zero_()


class _EventPair:
    __slots__ = ("start", "end", "elapsed_ms")

    def __init__(self, start, end, elapsed_ms):
        self.start, self.end, self.elapsed_ms = start, end, elapsed_ms

    def seconds(self):
        return self.elapsed_ms(self.start, self.end) / 1e3


class CupyKit:
    """CUDA events through CuPy on the current stream; the flush zeroes >= 2x L2 on the device."""

    kind = "cuda"

    def __init__(self):
        import cupy
        self.cp = cupy
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        self.cache_bytes = int(props.get("l2CacheSize", 0)) or 64 * MiB
        self._buf = cupy.empty(max(2 * self.cache_bytes, 8 * MiB), dtype=cupy.uint8)

    def flush(self):
        self._buf.fill(0)

    def timed(self, fn, cold):
        cp = self.cp
        if cold:
            self.flush()
        s, e = cp.cuda.Event(), cp.cuda.Event()
        s.record()
        fn()
        e.record()
        return _EventPair(s, e, cp.cuda.get_elapsed_time)

    def sync(self):
        self.cp.cuda.get_current_stream().synchronize()
        self.cp.cuda.Device().synchronize()


class TorchKit:
    """CUDA events through PyTorch on its current stream; the flush zeroes >= 2x L2."""

    kind = "cuda"

    def __init__(self, device="cuda"):
        import torch
        self.torch = torch
        props = torch.cuda.get_device_properties(device)
        self.cache_bytes = int(getattr(props, "L2_cache_size", 0)) or 64 * MiB
        self._buf = torch.empty(max(2 * self.cache_bytes, 8 * MiB), dtype=torch.uint8,
                                device=device)

    def flush(self):
        self._buf.zero_()

    def timed(self, fn, cold):
        torch = self.torch
        if cold:
            self.flush()
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        return _EventPair(s, e, lambda a, b: a.elapsed_time(b))

    def sync(self):
        self.torch.cuda.synchronize()


def _sync_all(kits):
    seen = set()
    for k in kits:
        if id(k) not in seen:
            seen.add(id(k))
            k.sync()


def warm_up(runners: dict, n_sets: int, settings: TimingSettings) -> dict:
    """Run every backend until ``warmup_s`` has passed (at least once).

    Returns {name: calls made}."""
    calls = {}
    for name, r in runners.items():
        t0 = time.perf_counter()
        n = 0
        while True:
            r.run(n % n_sets)
            n += 1
            r.kit.sync()
            if time.perf_counter() - t0 >= settings.warmup_s or n >= 1000:
                break
        calls[name] = n
    return calls


def wake(call, seconds):
    """Untimed calls after a settle pause, until `seconds` have passed (at least one): the
    cores and this backend's thread pool are awake when the timed samples start."""
    t0 = time.perf_counter()
    call()
    while time.perf_counter() - t0 < seconds:
        call()


def sample(runners: dict, n_sets: int, settings: TimingSettings, faults=None) -> dict:
    """Interleaved rounds; returns {backend name: [seconds per sample]}. With a dict `faults`,
    also fills faults[name] with each sample's minor page faults (CPU kits only)."""
    names = list(runners)
    out = {n: [] for n in names}
    if not names:
        return out
    kits = [runners[n].kit for n in names]
    block = max(1, settings.block)
    t0 = time.perf_counter()
    rounds = 0
    while True:
        shift = rounds % len(names)
        pending = []
        for name in names[shift:] + names[:shift]:
            r = runners[name]
            if settings.settle_s > 0 and r.kit.kind == "cpu" and len(names) > 1:
                time.sleep(settings.settle_s)
                wake(lambda r=r: r.run(rounds % n_sets), settings.wake_s)
            for j in range(block):
                i = (rounds * block + j) % n_sets
                pending.append((name, r.kit.timed(lambda r=r, i=i: r.run(i), settings.cold)))
        _sync_all(kits)
        for name, p in pending:
            out[name].append(p.seconds())
            if faults is not None and getattr(p, "faults", None) is not None:
                faults.setdefault(name, []).append(p.faults)
        rounds += 1
        n = rounds * block
        if n >= settings.max_samples:
            break
        if n >= settings.min_samples and time.perf_counter() - t0 >= settings.max_time:
            break
    return out


# A result whose interquartile range is over this fraction of its median is flagged unstable (the
# table marks its IQR with '!', the JSON says "unstable": true, the plot draws its error bar red)
# and never counts as meeting a speed target.
UNSTABLE_IQR = 0.25


def iqr_fraction(st):
    """(q3 - q1) / median of a stats() dict, or None when it has no samples."""
    med = st.get("median_s")
    return (st["q3_s"] - st["q1_s"]) / med if med else None


def unstable(st):
    frac = iqr_fraction(st)
    return frac is not None and frac > UNSTABLE_IQR


def ratios_disagree(ratio, ratio_min, limit=UNSTABLE_IQR):
    """True when the ratio of medians and the ratio of minimum times differ by more than
    `limit` (25%): one side's samples were shifted by interference the other escaped, so
    neither ratio is evidence (seen on a loaded machine: medians 0.88, minima 0.16)."""
    if not ratio or not ratio_min:
        return False
    return abs(math.log(ratio / ratio_min)) > math.log1p(limit)


def stats(samples) -> dict:
    """Median and spread of a list of seconds (IQR, min, max)."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"n": int(a.size), "median_s": float(med), "q1_s": float(q1), "q3_s": float(q3),
            "min_s": float(a.min()), "max_s": float(a.max())}
