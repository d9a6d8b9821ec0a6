"""gpuconv.engines.cpu_memory: the NumPy engine's reused result buffers never hand out memory
that anything still refers to."""
import threading

import numpy as np
import pytest

from gpuconv import functional as F
from gpuconv.engines import cpu_memory, numpy_engine
from gpuconv.problem import ConvProblem

BIG = (512, 1024)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    cpu_memory.release()
    yield
    cpu_memory.release()


def test_the_reference_count_calibration_works_here():
    assert cpu_memory._USABLE


def test_a_free_buffer_is_reused_and_a_live_one_is_not():
    a = cpu_memory.empty(BIG, np.float32)
    b = cpu_memory.empty(BIG, np.float32)
    assert not np.shares_memory(a, b)
    address = a.__array_interface__["data"][0]
    del a
    c = cpu_memory.empty(BIG, np.float32)
    assert c.__array_interface__["data"][0] == address  # a's buffer came back
    assert not np.shares_memory(b, c)


@pytest.mark.parametrize("hold", ["view", "reshape", "slice", "memoryview", "transpose"])
def test_anything_derived_from_a_result_keeps_its_buffer_busy(hold):
    a = cpu_memory.empty(BIG, np.float32)
    a.fill(7)
    keep = {"view": lambda: a.view(np.int32), "reshape": lambda: a.reshape(-1),
            "slice": lambda: a[3:5, ::2], "memoryview": lambda: memoryview(a),
            "transpose": lambda: a.T}[hold]()
    before = np.array(keep)
    del a
    for _ in range(3):
        c = cpu_memory.empty(BIG, np.float32)
        c.fill(-1)
        assert not np.shares_memory(c, np.asarray(keep))
    np.testing.assert_array_equal(np.asarray(keep), before)


def test_torch_from_numpy_keeps_the_buffer_busy():
    torch = pytest.importorskip("torch")
    a = cpu_memory.empty(BIG, np.float32)
    a.fill(3)
    t = torch.from_numpy(a)
    del a
    c = cpu_memory.empty(BIG, np.float32)
    c.fill(-1)
    assert float(t.min()) == 3.0 == float(t.max())


def test_small_results_are_not_cached_and_dtypes_and_shapes_are_honoured():
    s = cpu_memory.empty((4, 4), np.float64)
    assert s.shape == (4, 4) and s.dtype == np.float64 and s.base is None
    a = cpu_memory.empty(BIG, np.float64)
    assert a.shape == BIG and a.dtype == np.float64 and a.flags.c_contiguous
    assert cpu_memory.kept_bytes() == a.nbytes
    z = cpu_memory.zeros(BIG, np.float32)
    assert not z.any()


def test_the_cap_is_kept_and_free_buffers_are_evicted(monkeypatch):
    monkeypatch.setattr(cpu_memory, "KEEP_BYTES", 3 * (2 << 20))
    held = [cpu_memory.empty(BIG, np.float32) for _ in range(5)]  # 2 not kept: over the cap
    assert cpu_memory.kept_bytes() == 3 * (2 << 20)
    del held
    other = cpu_memory.empty((1024, 1024), np.float32)  # 4 MiB: evicts two free 2 MiB ones
    assert cpu_memory.kept_bytes() <= 3 * (2 << 20) and other.base is not None
    monkeypatch.setattr(cpu_memory, "KEEP_BYTES", 0)
    assert cpu_memory.empty(BIG, np.float32).base is None  # off


def test_threads_never_share_a_buffer():
    errors, live = [], []
    lock = threading.Lock()

    def work(k):
        try:
            for i in range(200):
                a = cpu_memory.empty(BIG, np.float32)
                a.fill(k * 1000 + i)
                with lock:
                    for b in live:
                        if np.shares_memory(a, b):
                            errors.append("shared")
                    live.append(a)
                if not (a == k * 1000 + i).all():
                    errors.append("overwritten")
                with lock:
                    del live[next(j for j, b in enumerate(live) if b is a)]
                del a
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_engine_results_kept_by_the_caller_are_never_overwritten():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 8, 20, 20), dtype=np.float32)
    w = rng.standard_normal((16, 8, 3, 3), dtype=np.float32)
    ys = [F.conv2d(x * (i + 1), w, padding=1) for i in range(3)]
    rs = [F.relu(y) for y in ys]
    for i in range(3):  # each result still holds its own values
        np.testing.assert_allclose(ys[i], (i + 1) * ys[0], rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(rs[i], np.maximum(ys[i], 0))
    assert len({id(y.base) for y in ys}) == 3
    numpy_engine.release_workspace()
    assert cpu_memory.kept_bytes() == 0
