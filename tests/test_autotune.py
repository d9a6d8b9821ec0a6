"""The autotuner's logic on the CPU: fake candidates, fake timings, a temp cache directory."""
import json
import os

import numpy as np
import pytest

from gpuconv import ConvProblem, autotune, config
from gpuconv.engines import numpy_engine as ne

P = ConvProblem(2, 3, 8, 8, 4, 3, 3, 1, 1)


class Fake:
    """A candidate algorithm: the reference result times `scale` (+ NaN / raise), a fake time."""

    def __init__(self, name, seconds, calls, scale=1.0, nan=False, raises=False, supported=True):
        self.name, self.seconds, self.calls = name, seconds, calls
        self.scale, self.nan, self.raises, self.supported = scale, nan, raises, supported

    def supports(self, p, dtype):
        return self.supported

    def __call__(self, p, x, w, bias):
        self.calls.append(self.name)
        if self.raises:
            raise RuntimeError("launch failed")
        y = ne.conv_fprop(p, x, w, bias) * self.scale
        if self.nan:
            y[0, 0, 0, 0] = np.nan
        return y


class FakeTimer:
    def __init__(self, registry):
        self.registry, self.timed = registry, []

    def __call__(self, thunk):
        calls = []
        for f in self.registry.values():
            f.calls = calls
        thunk()
        self.timed.append(calls[-1])
        return self.registry[calls[-1]].seconds


def make(specs):
    calls = []
    return {name: Fake(name, sec, calls, **kw) for name, sec, kw in specs}


def inputs():
    rng = np.random.default_rng()
    return (rng.standard_normal(P.x_shape), rng.standard_normal(P.w_shape),
            rng.standard_normal(P.K))


def reference(x, w, b):
    return ne.conv_fprop(P, x, w, b)


def tuner(tmp_path, registry, source_hash="h1", device="Fake GPU 80GB"):
    t = FakeTimer(registry)
    return autotune.Autotuner(timer=t, device_name=device, source_hash=source_hash,
                              cache_dir=str(tmp_path)), t


def select(tu, registry, dtype=np.float64, tf32=False):
    return tu.select("fprop", P, dtype, registry, inputs, reference, tf32=tf32)


def test_picks_fastest_correct_supported(tmp_path):
    reg = make([("slow", 3e-3, {}), ("fast", 1e-3, {}), ("fastest_unsupported", 1e-4,
                                                        dict(supported=False))])
    tu, timer = tuner(tmp_path, reg)
    assert select(tu, reg) == "fast"
    assert sorted(timer.timed) == ["fast", "slow"]


@pytest.mark.parametrize("bad", [dict(scale=1.01), dict(nan=True), dict(raises=True)])
def test_wrong_candidate_rejected(tmp_path, bad):
    reg = make([("ok", 2e-3, {}), ("wrong_but_fast", 1e-5, bad)])
    tu, timer = tuner(tmp_path, reg)
    assert select(tu, reg) == "ok"
    assert "wrong_but_fast" not in timer.timed
    assert not isinstance(tu.log[-1][1]["wrong_but_fast"], float)


def test_memory_cache_hit_does_not_retime(tmp_path):
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    tu, timer = tuner(tmp_path, reg)
    assert select(tu, reg) == "b"
    n = len(timer.timed)
    assert select(tu, reg) == "b"
    assert len(timer.timed) == n


def test_disk_cache_survives_process_and_is_keyed_by_device(tmp_path):
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    tu, _ = tuner(tmp_path, reg)
    select(tu, reg)
    files = os.listdir(tmp_path)
    assert files == ["autotune-Fake_GPU_80GB.json"]
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["source_hash"] == "h1" and len(data["entries"]) == 1
    # a new tuner (a new process) with different true timings still takes the cached choice
    reg2 = make([("a", 1e-4, {}), ("b", 1e-3, {})])
    tu2, timer2 = tuner(tmp_path, reg2)
    assert select(tu2, reg2) == "b" and timer2.timed == []
    # another device has its own file: it tunes
    tu3, timer3 = tuner(tmp_path, reg2, device="Other GPU")
    assert select(tu3, reg2) == "a" and timer3.timed


def test_source_hash_change_invalidates(tmp_path):
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    select(tuner(tmp_path, reg)[0], reg)
    reg2 = make([("a", 1e-4, {}), ("b", 1e-3, {})])
    tu, timer = tuner(tmp_path, reg2, source_hash="h2")
    assert select(tu, reg2) == "a" and timer.timed
    data = json.loads((tmp_path / "autotune-Fake_GPU_80GB.json").read_text())
    assert data["source_hash"] == "h2" and len(data["entries"]) == 1


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 99, "entries": {}}', ""])
def test_corrupt_cache_tolerated_and_rewritten(tmp_path, content):
    (tmp_path / "autotune-Fake_GPU_80GB.json").write_text(content)
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    with pytest.warns(UserWarning):
        tu, _ = tuner(tmp_path, reg)
    assert select(tu, reg) == "b"
    data = json.loads((tmp_path / "autotune-Fake_GPU_80GB.json").read_text())
    assert data["version"] == autotune.CACHE_VERSION


def test_cached_choice_no_longer_supported_is_retuned(tmp_path):
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    select(tuner(tmp_path, reg)[0], reg)
    reg2 = make([("a", 2e-3, {}), ("b", 1e-3, dict(supported=False))])
    tu, timer = tuner(tmp_path, reg2)
    assert select(tu, reg2) == "a" and timer.timed == ["a"]


def test_tf32_flag_and_dtype_are_part_of_the_key(tmp_path):
    reg = make([("a", 2e-3, {}), ("b", 1e-3, {})])
    tu, timer = tuner(tmp_path, reg)
    select(tu, reg, tf32=False)
    n = len(timer.timed)
    select(tu, reg, tf32=True)
    assert len(timer.timed) > n
    assert autotune.problem_key("fprop", P, np.float32, True) != \
        autotune.problem_key("fprop", P, np.float32, False)
    assert autotune.problem_key("fprop", P, np.float32, False) != \
        autotune.problem_key("fprop", P, np.float16, False)
    assert autotune.problem_key("fprop", P, np.float32, False) != \
        autotune.problem_key("dgrad", P, np.float32, False)


def test_all_wrong_falls_back_to_heuristic_uncached(tmp_path):
    reg = make([("im2col_gemm", 2e-3, dict(scale=2.0)), ("x", 1e-3, dict(scale=3.0))])
    tu, _ = tuner(tmp_path, reg)
    with pytest.warns(UserWarning, match="no fprop candidate"):
        assert select(tu, reg) == "im2col_gemm"
    assert tu.memory == {}


def test_no_candidate_is_an_error(tmp_path):
    reg = make([("a", 1e-3, dict(supported=False))])
    with pytest.raises(ValueError, match="no registered fprop algorithm"):
        select(tuner(tmp_path, reg)[0], reg)


def test_memory_only_tuner_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCONV_AUTOTUNE_CACHE", str(tmp_path))
    reg = make([("a", 1e-3, {})])
    tu = autotune.Autotuner(timer=FakeTimer(reg), device_name="d", source_hash="h",
                            cache_dir=False)
    assert select(tu, reg) == "a" and os.listdir(tmp_path) == []


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUCONV_AUTOTUNE_CACHE", str(tmp_path / "c"))
    assert autotune.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("GPUCONV_AUTOTUNE_CACHE")
    assert autotune.default_cache_dir().endswith(os.path.join(".cache", "gpuconv"))


def test_heuristic_order_and_fallback():
    reg = make([("igemm", 1e-3, {}), ("im2col_gemm", 1e-3, {}),
                ("direct_depthwise", 1e-3, dict(supported=False))])
    assert autotune.heuristic("fprop", P, np.float32, reg) == "im2col_gemm"
    reg["direct_depthwise"].supported = True
    assert autotune.heuristic("fprop", P, np.float32, reg) == "direct_depthwise"
    only = make([("igemm", 1e-3, {})])
    assert autotune.heuristic("fprop", P, np.float32, only) == "igemm"


def test_autotune_switch(monkeypatch):
    monkeypatch.delenv("GPUCONV_AUTOTUNE", raising=False)
    config.set_autotune(None)
    assert config.autotune_enabled()  # on by default
    monkeypatch.setenv("GPUCONV_AUTOTUNE", "0")
    assert not config.autotune_enabled()
    config.set_autotune(True)
    try:
        assert config.autotune_enabled()
    finally:
        config.set_autotune(None)


def test_tf32_switch_default_off():
    assert config.get_allow_tf32() is False
    assert autotune.tolerance(np.float32, False) < autotune.tolerance(np.float32, True)
    config.set_allow_tf32(True)
    try:
        assert autotune.get_allow_tf32()
    finally:
        config.set_allow_tf32(False)


def test_relative_error():
    a = np.ones((2, 3))
    assert autotune.relative_error(a, a) == 0
    assert autotune.relative_error(a * 1.5, a) == pytest.approx(0.5)
    assert autotune.relative_error(np.ones((3, 2)), a) == float("inf")
    b = a.copy()
    b[0, 0] = np.nan
    assert autotune.relative_error(b, a) == float("inf")


def test_kernel_source_hash():
    files = {"a.cu": "x", "b.cuh": "y"}
    h = autotune.kernel_source_hash(lambda: dict(files))
    assert h == autotune.kernel_source_hash(lambda: dict(reversed(list(files.items()))))
    files["b.cuh"] = "y2"
    assert autotune.kernel_source_hash(lambda: files) != h
    real = autotune.kernel_source_hash()  # the packaged kernels/*.cu(h)
    assert len(real) == 64
