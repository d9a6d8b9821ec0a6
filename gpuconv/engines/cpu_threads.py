"""A persistent worker pool that splits the NumPy engine's large ops over the batch (opt-in).

NumPy runs its element-wise passes, copies and per-image GEMMs on one core, and OpenBLAS threads
a small GEMM poorly (a batched matmul is one small BLAS call per image). With T threads the
engine's large ops cut the batch into T contiguous parts and run one part per thread: the
calling thread takes the first, T - 1 pool threads the others. NumPy releases the GIL inside
its loops and BLAS calls, so the parts run at once; the Python in between (a few calls per
kernel tap) is short. While the parts run, the BLAS is held to one thread per call (T threads
each starting T BLAS threads would oversubscribe the cores) and restored after.

Off by default (T = 1): on the 2-vCPU machine this was measured on, the split made whole
training steps faster in some runs and slower in others (see bench/NOTES.md, issue 11), so it
is not turned on for everyone. ``set_num_threads(n)`` or ``GPUCONV_CPU_THREADS=n`` turns it on
(never more threads than the cores this process may run on).

Results are deterministic: the parts are fixed by (batch, T), each part is computed by one thread
with single-threaded BLAS, and reductions over parts (the weight gradient) add the partial sums
in part order. They may differ from the unsplit op in the last bits (a different reduction order
or BLAS kernel), and between thread counts, as PyTorch's do. Ops below ``MIN_ELEMENTS`` elements
per part are not split: the hand-off (measured 10-200 us) would cost more than it saves.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

import numpy as np

from . import cpu_memory

MIN_ELEMENTS = 1 << 20  # per part: smaller ops run on the calling thread alone
SPIN_S = 0.0  # seconds a worker (and the caller, for the parts) polls before blocking

_num_threads = None  # None: GPUCONV_CPU_THREADS, else 1
_state = threading.local()  # .busy: this thread is running a part (nested splits run serially)
_lock = threading.Lock()  # one split at a time; a second caller thread runs its op serially
_pool = None  # (pid, [worker queues]); rebuilt after a fork
_blas = None  # threadpoolctl's controllers of the BLAS libraries NumPy loaded ([] if none)


def set_num_threads(n) -> None:
    """Threads for the NumPy engine's split ops: an int >= 1 (1: no split), or None for the
    environment variable GPUCONV_CPU_THREADS (default 1), read again by this call."""
    global _num_threads, _env_seen
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_threads must be an int >= 1 or None, got {n!r}")
    _num_threads = n
    _env_seen = None


def get_num_threads() -> int:
    """The number of parts a large op is split into now (1: no split)."""
    n = _num_threads if _num_threads is not None else _env_threads()
    return 1 if n == 1 else max(1, min(n, _cores()))


_env_seen = None  # GPUCONV_CPU_THREADS parsed; reset in a forked child


def _env_threads():
    """GPUCONV_CPU_THREADS, read when first needed (and after set_num_threads(None) or a fork),
    as OMP_NUM_THREADS is read once: os.environ costs ~3 us a lookup, and get_num_threads runs
    ~30 times in a small model's training step."""
    global _env_seen
    if _env_seen is None:
        _env_seen = _parse_env_threads()
    return _env_seen


def _parse_env_threads():
    v = os.environ.get("GPUCONV_CPU_THREADS", "").strip()
    if not v:
        return 1
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"GPUCONV_CPU_THREADS must be an int >= 1, got {v!r}")
    return n


def _cores():
    """The cores this process may run on (read once per process, and again in a forked child:
    a syscall per op would be a few percent of a small model's step)."""
    global _cores_seen
    if _cores_seen is None:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            n = os.cpu_count() or 1
        _cores_seen = n
    return _cores_seen


_cores_seen = None


def _forget_after_fork():
    """In a forked child: read the environment and the allowed cores again (the child may run
    elsewhere). A hook rather than an os.getpid() per call: on this VM the syscall showed up at
    ~3% of a small model's training step."""
    global _env_seen, _cores_seen
    _env_seen = _cores_seen = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _blas_controllers():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # threadpoolctl missing or unable to inspect: no BLAS control
            _blas = []
    return _blas


# OpenBLAS cores with small-matrix GEMM kernels (SMALL_MATRIX_OPT: AVX-512 only), under which a
# tiny GEMM costs little more than its FLOPs; elsewhere each call pays its packing and set-up.
_SMALL_GEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def blas_small_gemm_kernels() -> bool:
    """Whether NumPy's BLAS runs tiny GEMMs through small-matrix kernels (an AVX-512 OpenBLAS
    core, as threadpoolctl names it); False when unknown. Engine policies that trade one GEMM
    for hundreds of tiny ones ask this: on the 2-core Intel machine (SkylakeX kernels) LeNet's
    first-layer split-tap wgrad (320 GEMMs of 5 x 784 x 6) ran 2x faster than im2col and 64
    per-image GEMMs, on the Zen 3 (Haswell kernels) 1.5x slower."""
    global _small_gemm
    if _small_gemm is None:
        _small_gemm = any(str(getattr(c, "architecture", "") or "").lower() in _SMALL_GEMM_CORES
                          for c in _blas_controllers())
    return _small_gemm


_small_gemm = None


def in_part():
    """True while this thread runs a part of a split op (run), on the pool or on the caller."""
    return getattr(_state, "part", False)


class _part:
    """Marks this thread as running a part of a split op (in_part) inside the block."""

    __slots__ = ("prev",)

    def __enter__(self):
        self.prev = getattr(_state, "part", False)
        _state.part = True

    def __exit__(self, *exc):
        _state.part = self.prev


def blas_threads():
    """The threads one BLAS call of this thread runs on now: 1 inside a pool part or a serial()
    block (see there), or without a BLAS threadpoolctl can see."""
    if getattr(_state, "busy", False):
        return 1
    return max((c.get_num_threads() for c in _blas_controllers()), default=1)


def _get(q):
    if SPIN_S > 0:
        end = time.perf_counter() + SPIN_S
        while time.perf_counter() < end:
            try:
                return q.get_nowait()
            except queue.Empty:
                time.sleep(0)  # lets the GIL go
    return q.get()


def _worker(q):
    while True:
        job = _get(q)
        if job is None:
            return
        fn, i, a, b, run_ = job
        if not run_.claim(i, worker=True):
            continue  # the caller took this part over while this thread was waking up
        _state.busy = True
        try:
            with _part():
                fn(i, a, b)
            run_.done.put(None)
        except BaseException as e:  # handed to the caller, which re-raises it
            run_.done.put(e)
        finally:
            _state.busy = False


class _Run:
    """One run's bookkeeping: who took which part (the caller takes over every part no worker
    has started when it is done with its own, so a worker slow to wake -- 20-200 us on the
    2-vCPU test machine, or much longer when the host has lent that vCPU elsewhere -- costs
    parallelism, never time), and the workers' completion messages."""

    __slots__ = ("lock", "taken", "done", "by_workers")

    def __init__(self, n):
        self.lock = threading.Lock()
        self.taken = [False] * n
        self.done = queue.SimpleQueue()
        self.by_workers = 0

    def claim(self, i, worker):
        with self.lock:
            if self.taken[i]:
                return False
            self.taken[i] = True
            self.by_workers += worker
            return True


def _queues(n):
    global _pool
    if _pool is None or _pool[0] != os.getpid() or len(_pool[1]) < n:
        old = [] if _pool is None or _pool[0] != os.getpid() else _pool[1]
        qs = list(old)
        for _ in range(n - len(old)):
            q = queue.SimpleQueue()
            threading.Thread(target=_worker, args=(q,), name="gpuconv-cpu", daemon=True).start()
            qs.append(q)
        _pool = (os.getpid(), qs)
    return _pool[1]


def parts(n, elements):
    """Contiguous [a, b) ranges splitting range(n) into get_num_threads() near-equal parts, or
    None when the op should not be split (one thread, n < 2, or parts below MIN_ELEMENTS, where
    `elements` is the op's size over all n)."""
    if n < 2 or getattr(_state, "busy", False):
        return None
    t = min(get_num_threads(), n)
    if t < 2:
        return None
    t = min(t, int(elements // max(1, MIN_ELEMENTS)))
    if t < 2:
        return None
    q, r = divmod(n, t)
    bounds = [i * q + min(i, r) for i in range(t + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def run(fn, ranges):
    """fn(i, a, b) for every (a, b) = ranges[i]: the first on this thread, the others on the pool,
    all at once; returns when all are done and re-raises the first error. Serial when another
    thread holds the pool (or this is one of its parts)."""
    if len(ranges) == 1 or getattr(_state, "busy", False) or not _lock.acquire(blocking=False):
        with _part():
            for i, (a, b) in enumerate(ranges):
                fn(i, a, b)
        return
    try:
        with _one_blas_thread():
            qs = _queues(len(ranges) - 1)
            run_ = _Run(len(ranges))
            for q, (i, (a, b)) in zip(qs, list(enumerate(ranges))[1:]):
                q.put((fn, i, a, b, run_))
            errors = []
            _state.busy = True
            try:
                with _part():
                    for i, (a, b) in enumerate(ranges):  # part 0, then any part not yet started
                        if run_.claim(i, worker=False):
                            fn(i, a, b)
            except BaseException as e:
                errors.append(e)
                for i in range(len(ranges)):  # parts nobody started: nobody will
                    run_.claim(i, worker=False)
            finally:
                _state.busy = False
                for _ in range(run_.by_workers):  # the parts write into the caller's arrays
                    e = _get(run_.done)
                    if e is not None:
                        errors.append(e)
            if errors:
                raise errors[0]
    finally:
        _lock.release()


class _one_blas_thread:
    """Hold the BLAS to one thread per call inside the block (restored after)."""

    __slots__ = ("saved",)

    def __enter__(self):
        ctl = _blas_controllers()
        self.saved = [c.get_num_threads() for c in ctl]
        for c, n in zip(ctl, self.saved):
            if n != 1:
                c.set_num_threads(1)

    def __exit__(self, *exc):
        for c, n in zip(_blas_controllers(), self.saved):
            if n != 1:
                c.set_num_threads(n)


def serial(n):
    """The context for an op of batch n that runs unsplit: while the pool is in use (more than
    one thread), a small op's GEMMs run on one BLAS thread too. OpenBLAS's threads spin for a
    long while (~0.1 s) after every threaded call, and a spinning BLAS thread on the core that
    the pool's next part wants slowed a whole MNIST training step from 32 to 48 ms (2 cores).
    An op of a single image (n == 1), which cannot be split, keeps the BLAS's threads."""
    if n < 2 or getattr(_state, "busy", False) or get_num_threads() < 2:
        return contextlib.nullcontext()
    return _one_blas_thread()


def elementwise(fn, *arrays, dtype=None):
    """out = fn(*array slices, out slice) over flat parts of the arrays on the pool, out a new
    C-contiguous array of their shape (dtype: the first array's by default); None (nothing
    done) when they are not C-contiguous arrays of one shape or the op is too small to split."""
    first = arrays[0]
    if not all(a.shape == first.shape and a.flags.c_contiguous for a in arrays):
        return None
    split = parts(first.size, first.size)
    if split is None:
        return None
    out = cpu_memory.empty(first.shape, first.dtype if dtype is None else dtype)
    flat = [a.reshape(-1) for a in arrays + (out,)]
    run(lambda i, lo, hi: fn(*(a[lo:hi] for a in flat)), split)
    return out


def matmul(a, b):
    """a @ b for 2-D NumPy arrays, rows of a split over the pool (each part one BLAS thread; the
    rows of the result do not depend on the split) -- the fully connected layers of gpuconv.nn,
    so that a training step never wakes the BLAS's own threads (see serial)."""
    m = a.shape[0]
    split = parts(m, m * (a.shape[1] + b.shape[1]))
    if split is None:
        with serial(m):
            return a @ b
    out = np.empty((m, b.shape[1]), np.result_type(a, b))
    run(lambda i, lo, hi: np.matmul(a[lo:hi], b, out=out[lo:hi]), split)
    return out
