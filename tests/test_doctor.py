"""gpuconv-doctor on the CPU: the CPU path end to end with --json and its exit codes, and the GPU
path's logic run with fakes (a registry holding a deliberately wrong algorithm on NumPy arrays,
a kernel that does not compile, a benchmark with a WRONG row): each must be reported and must
make the command exit 1. The comparison's two checks and the exact inputs are tested directly.
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from gpuconv import ConvProblem, config, cuda
from gpuconv import doctor as dr
from gpuconv.engines import numpy_engine as ne

from . import naive
from .problems import IDS, PROBLEMS

TINY_SHAPES = dr.SWEEP_SHAPES[:2]


@pytest.fixture
def no_gpu(monkeypatch):
    """The CPU path, even on a GPU machine (the reason is the real one where there is one)."""
    reason = cuda.unavailable_reason() or "no GPU (forced by the test)"
    monkeypatch.setattr(dr, "gpu_target", lambda: (None, reason))
    monkeypatch.setattr(dr, "SWEEP_SHAPES", TINY_SHAPES)
    return reason


def _run(tmp_path, argv, capsys):
    path = tmp_path / "doctor.json"
    rc = dr.main(argv + ["--json", str(path)])
    return rc, json.loads(path.read_text()), capsys.readouterr().out


# ---- the CPU path -------------------------------------------------------------------------
def test_cpu_path_end_to_end(tmp_path, capsys, no_gpu):
    rc, doc, out = _run(tmp_path, [], capsys)
    assert rc == 0, out
    assert doc["schema"] == dr.SCHEMA and doc["status"] == "ok" and doc["failures"] == []
    assert doc["cuda"] == {"usable": False, "reason": no_gpu}
    assert no_gpu in out and "CUDA is not usable here" in out
    env = doc["environment"]
    for k in ("gpuconv", "numpy", "cupy", "nvrtc", "cuda_headers", "python"):
        assert k in env
    rows = doc["sweep"]
    algos = {r["algo"] for r in rows}
    assert "numpy" in algos
    assert {r["op"] for r in rows} == set(dr.OPS)
    assert {r["dtype"] for r in rows} == {"float32", "float64"}
    assert all(r["status"] == "PASS" for r in rows)
    assert len([r for r in rows if r["algo"] == "numpy"]) == len(TINY_SHAPES) * 3 * 2
    assert doc["sweep_counts"]["PASS"] == len(rows)
    assert "gpuconv-doctor: ok" in out


def test_require_gpu_without_gpu_exits_1(tmp_path, capsys, no_gpu):
    rc, doc, out = _run(tmp_path, ["--require-gpu"], capsys)
    assert rc == 1 and doc["status"] == "FAIL"
    assert any("--require-gpu" in f and no_gpu in f for f in doc["failures"])
    assert all(r["status"] == "PASS" for r in doc["sweep"])  # the CPU was still checked


def test_module_entry_point():
    """python -m gpuconv.doctor is wired to main (the full run is the first-contact dry run's)."""
    r = subprocess.run([sys.executable, "-m", "gpuconv.doctor", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--require-gpu" in r.stdout and "gpuconv-doctor" in r.stdout


# ---- the GPU path's logic, with fakes --------------------------------------------------------
def _fp32_accumulate(fn):
    """A NumPy stand-in for a CUDA algorithm: any dtype in, float32 math, that dtype out."""
    def run(p, *arrays):
        wide = [None if a is None else a.astype(np.float32) for a in arrays]
        return fn(p, *wide).astype(arrays[0].dtype)
    return run


GOOD = {"fprop": _fp32_accumulate(ne.conv_fprop), "dgrad": _fp32_accumulate(ne.conv_dgrad),
        "wgrad": _fp32_accumulate(ne.conv_wgrad)}


def _fake_gpu(monkeypatch, broken, dtypes=("float64", "float32", "float16"), catalogue=None):
    reg = {op: {"good": GOOD[op]} for op in dr.OPS}
    reg["fprop"]["broken"] = broken
    target = dr.Target("cuda", np, reg, dtypes)
    monkeypatch.setattr(dr, "gpu_target", lambda: (target, None))
    monkeypatch.setattr(dr, "SWEEP_SHAPES", TINY_SHAPES)
    monkeypatch.setattr(dr, "kernel_catalogue", lambda: catalogue or [
        ("fake.cu", ("k<float>", "k<double>"), lambda name: None)])


def _off_by_one_row(p, x, w, b):
    y = GOOD["fprop"](p, x, w, b)
    return np.roll(y, 1, axis=2)  # a wrong row index


def _one_element(p, x, w, b):
    y = GOOD["fprop"](p, x, w, b)
    y.flat[-1] += 0.05 * np.abs(y).max()  # one wrong element: the norm barely moves
    return y


def _unwritten(p, x, w, b):
    y = GOOD["fprop"](p, x, w, b)
    y[..., -1, -1] = np.nan  # what the NaN-filled allocator shows for a skipped element
    return y


def _raises(p, x, w, b):
    raise RuntimeError("an illegal memory access was encountered (simulated)")


@pytest.mark.parametrize("broken,status,why", [
    (_off_by_one_row, "FAIL", "relative error"),
    (_one_element, "FAIL", "max element error"),
    (_unwritten, "FAIL", "NaN/Inf"),
    (_raises, "ERROR", "illegal memory access"),
])
def test_gpu_path_reports_a_wrong_algorithm(tmp_path, capsys, monkeypatch, broken, status, why):
    _fake_gpu(monkeypatch, broken)
    rc, doc, out = _run(tmp_path, [], capsys)
    assert rc == 1 and doc["status"] == "FAIL"
    assert doc["cuda"]["usable"] is True
    assert [k["status"] for k in doc["kernels"]] == ["PASS"]
    bad = [r for r in doc["sweep"] if r["algo"] == "broken"]
    assert bad and {r["status"] for r in bad} == {status}, bad
    # on the 91770-element output, float16's norm tolerance lets one wrong element through;
    # its max-element check does not
    assert all(why in r["reason"] for r in bad
               if r["dtype"] == "float16" and r["shape"] == "3x3_tile_edges")
    good = [r for r in doc["sweep"] if r["algo"] == "good"]
    assert good and all(r["status"] == "PASS" for r in good), [r for r in good
                                                             if r["status"] != "PASS"]
    assert {r["dtype"] for r in good} == {"float64", "float32", "float16"}
    assert any("broken" in f for f in doc["failures"])
    assert "FAIL" in out or "ERROR" in out


def test_gpu_path_all_good_exits_0(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch, GOOD["fprop"])
    rc, doc, out = _run(tmp_path, ["--require-gpu"], capsys)
    assert rc == 0, doc["failures"]
    assert doc["sweep_counts"]["PASS"] == len(doc["sweep"]) == len(TINY_SHAPES) * (3 + 1) * 3


def test_gpu_path_reports_a_kernel_that_does_not_compile(tmp_path, capsys, monkeypatch):
    def get(name):
        raise cuda.KernelCompileError("compiling kernels/bad.cu failed\nNVRTC log: error")
    _fake_gpu(monkeypatch, GOOD["fprop"], catalogue=[
        ("ok.cu", ("a<float>",), lambda n: None), ("bad.cu", ("b<float>",), get)])
    rc, doc, out = _run(tmp_path, [], capsys)
    assert rc == 1
    assert [k["status"] for k in doc["kernels"]] == ["PASS", "FAIL"]
    assert "NVRTC log" in doc["kernels"][1]["reason"]
    assert any(f.startswith("kernels/bad.cu does not compile") for f in doc["failures"])


def test_bench_wrong_row_fails(tmp_path, capsys, monkeypatch):
    _fake_gpu(monkeypatch, GOOD["fprop"])
    bdoc = {"summary": [], "targets": [], "results": [
        dict(status="ok", backend="cudnn", layer="l", op="fprop", dtype="float32"),
        dict(status="WRONG", backend="cuda:x", layer="l", op="fprop", dtype="float32",
             reason="rel. error 1e-1 > tol 5e-4")]}
    monkeypatch.setattr(dr, "run_bench", lambda gpu: (bdoc, 2, "bench output"))
    rc, doc, out = _run(tmp_path, ["--bench"], capsys)
    assert rc == 1
    assert doc["bench"]["rc"] == 2
    assert any("bench WRONG: cuda:x" in f for f in doc["failures"])


def test_bench_ok_passes_and_reports(tmp_path, capsys, monkeypatch, no_gpu):
    bdoc = {"summary": [], "targets": [], "results": [
        dict(status="ok", backend="numpy", layer="l", op="fprop", dtype="float32")]}
    asked = []
    monkeypatch.setattr(dr, "run_bench", lambda gpu: (asked.append(gpu), (bdoc, 0, ""))[1])
    rc, doc, _ = _run(tmp_path, ["--bench"], capsys)
    assert rc == 0 and asked == [False] and doc["bench"]["run"] == bdoc


# ---- the pieces ----------------------------------------------------------------------------
def test_exact_inputs_are_exact_in_every_dtype():
    p = ConvProblem.from_args((2, 3, 7, 6), (4, 3, 3, 3), padding=1)
    dtypes = [np.float16, np.float32]
    try:
        dtypes.append(dr.dtype_of("bfloat16"))
    except ValueError:
        pass
    for op in dr.OPS:
        arrays = dr.exact_inputs(op, p, dr.stable_seed("t", op))
        for a in arrays:
            assert a.dtype == np.float64 and np.abs(a).max() <= 1 and np.count_nonzero(a) > 0
            for dt in dtypes:
                np.testing.assert_array_equal(a.astype(dt).astype(np.float64), a)
    a = dr.exact_inputs("fprop", p, 1)[0]
    np.testing.assert_array_equal(a, dr.exact_inputs("fprop", p, 1)[0])
    assert not np.array_equal(a, dr.exact_inputs("fprop", p, 2)[0])


def test_stable_seed_is_the_same_in_another_process():
    code = "from gpuconv.doctor import stable_seed; print(stable_seed('r50', 'fprop'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, timeout=60)
    assert int(other.stdout) == dr.stable_seed("r50", "fprop")


def test_compare_two_checks():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 8, 50, 50))
    ok = dr.compare(ref.astype(np.float16), ref, "float16")
    assert ok["ok"] and 0 < ok["rel_err"] < ok["rel_tol"] and ok["max_err"] < ok["max_tol"]
    one = ref.copy()
    one.flat[123] += 0.05 * np.abs(ref).max()
    res = dr.compare(one, ref, "float16")  # the norm alone would pass it
    assert res["rel_err"] < res["rel_tol"] and not res["ok"] and "(0, 0, 2, 23)" in res["reason"]
    nan = ref.copy()
    nan.flat[5] = np.nan
    assert "1 NaN/Inf" in dr.compare(nan, ref, "float64")["reason"]
    assert "shape" in dr.compare(ref[:1], ref, "float32")["reason"]
    assert not dr.compare(ref * (1 + 1e-4), ref, "float32")["ok"]
    assert dr.compare(ref * (1 + 1e-4), ref, "float32+tf32")["ok"]
    assert dr.tolerances("float32+tf32")[0] > dr.tolerances("float32")[0]


def test_bfloat16_widening_matches_the_cast():
    try:
        bf16 = dr.dtype_of("bfloat16")
    except ValueError:
        pytest.skip("no ml_dtypes")
    a = np.linspace(-3, 3, 101).astype(bf16)

    class NoCast(np.ndarray):  # an array module whose astype cannot widen bfloat16
        def astype(self, dtype, *args, **kwargs):
            if self.dtype == bf16 and np.dtype(dtype) == np.float64:
                raise TypeError("no bfloat16 cast")
            return np.ndarray.astype(np.asarray(self), dtype, *args, **kwargs)

    np.testing.assert_array_equal(dr.as_float64(a.view(NoCast)), a.astype(np.float64))


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
def test_definition_reference_matches_naive_loops(case):
    """The CPU check's oracle agrees with the lecture's loops on the shared problem list."""
    _, xs, ws, kw = case
    p = ConvProblem.from_args(xs, ws, **kw)
    x, w, b = dr.exact_inputs("fprop", p, 0)
    dy = dr.exact_inputs("dgrad", p, 1)[1]
    np.testing.assert_allclose(dr.definition_reference("fprop", p, (x, w, b)),
                               naive.conv_fprop(p, x, w, b), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dr.definition_reference("dgrad", p, (w, dy)),
                               naive.conv_dgrad(p, w, dy), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dr.definition_reference("wgrad", p, (x, dy)),
                               naive.conv_wgrad(p, x, dy), rtol=0, atol=1e-12)


def test_applies_and_tf32_mode():
    class TC:
        def supports(self, p, dtype):
            return dtype == np.float16 or (dtype == np.float32 and config.get_allow_tf32())

    p = ConvProblem.from_args((1, 2, 5, 5), (2, 2, 3, 3))
    plain = lambda *a: None  # noqa: E731  (no supports(): every dtype)
    assert dr.applies(TC(), p, "float32+tf32") and dr.applies(TC(), p, "float16")
    assert not dr.applies(TC(), p, "float32") and not dr.applies(plain, p, "float32+tf32")
    assert dr.applies(plain, p, "float64")
    config.set_allow_tf32(True)
    try:
        assert not dr.applies(TC(), p, "float32")  # the plain key forces TF32 off
        with dr.tf32_mode("float64"):
            assert not config.get_allow_tf32()
        assert config.get_allow_tf32()  # restored
    finally:
        config.set_allow_tf32(False)


def test_kernel_catalogue_lists_every_kernel_once():
    from gpuconv.engines import cuda_igemm
    cat = dr.kernel_catalogue()
    names = [n for _, ns, _ in cat for n in ns]
    assert len(names) == len(set(names)) and all(callable(g) for _, _, g in cat)
    both = {n for _, ns in tuple(cuda.KERNELS) + tuple(cuda_igemm.IGEMM_KERNELS) for n in ns}
    assert both <= set(names)  # both generations, whichever list the catalogue comes from


def test_sweep_skips_an_unavailable_dtype(monkeypatch):
    real = dr.dtype_of

    def no_bf16(key):
        if key == "bfloat16":
            raise ValueError("bfloat16 needs the ml_dtypes package")
        return real(key)
    monkeypatch.setattr(dr, "dtype_of", no_bf16)
    reg = {op: {"good": GOOD[op]} for op in dr.OPS}
    rows = dr.sweep(dr.Target("t", np, reg, ("float32", "bfloat16")), TINY_SHAPES[:1])
    assert {r["status"] for r in rows if r["dtype"] == "bfloat16"} == {"SKIP"}
    assert {r["status"] for r in rows if r["dtype"] == "float32"} == {"PASS"}


def test_sweep_syncs_and_poisons_around_every_call():
    """Each call runs inside the target's allocation hook (NaN-filling on CuPy) and is followed
    by a sync, so an asynchronous kernel fault is charged to the algorithm that caused it."""
    import contextlib
    events = []

    @contextlib.contextmanager
    def allocations():
        events.append("enter")
        yield
        events.append("exit")

    def algo(p, x, dy):
        events.append("call")
        return GOOD["wgrad"](p, x, dy)

    target = dr.Target("t", np, {"wgrad": {"a": algo}}, ("float32",),
                       sync=lambda: events.append("sync"), allocations=allocations)
    rows = dr.sweep(target, TINY_SHAPES)
    assert [r["status"] for r in rows] == ["PASS"] * len(TINY_SHAPES)
    assert events == ["enter", "call", "sync", "exit"] * len(TINY_SHAPES)
