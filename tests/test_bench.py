"""gpuconv-bench end to end on the CPU, through the CLI's main(): a tiny suite, the JSON schema,
the compare subcommand, and a deliberately wrong backend that must be reported WRONG and never
timed. No timing is asserted: only that samples exist and the bookkeeping is consistent."""
import json
import math

import numpy as np
import pytest

from gpuconv.benchmark import backends as bk
from gpuconv.benchmark import cli, roofline, suites, timing
from gpuconv.benchmark.runner import geomean, rel_error

try:
    import torch  # noqa: F401
    CPU_BACKENDS = "numpy,torch-cpu"
except Exception:
    CPU_BACKENDS = "numpy"

# Two tiny layers (one grouped with stride 2), every op, two dtypes; few samples, short budgets.
TINY = ["--shape", "2,3,9,9,4,3,3,1,1", "--shape", "2,4,8,8,6,3,3,2,1,1,2",
        "--op", "all", "--dtype", "float32,float64", "--min-samples", "2",
        "--max-samples", "3", "--max-time-per-case", "0.01", "--settle-ms", "1", "--wake-ms", "0",
        "--threads", "1", "--quiet"]

RESULT_KEYS = {"suite", "layer", "op", "dtype", "batch", "problem", "flops", "bytes", "backend",
               "device", "status", "reason", "rel_err", "tol", "samples_s", "count_in_net",
               "input_sets"}
TIMED_KEYS = {"median_s", "q1_s", "q3_s", "min_s", "max_s", "n", "flop_rate", "byte_rate",
              "roofline_fraction", "peak_unit", "workspace_bytes"}


@pytest.fixture(autouse=True)
def small_roofline(monkeypatch):
    """A small matmul for the CPU 'peak' keeps the test fast (the real run uses 1536^2)."""
    fast = roofline.measure_cpu.__wrapped__
    monkeypatch.setattr(roofline, "measure_cpu", lambda: fast(n=128, copy_mib=4))


class _WrongNumpy(bk.NumpyBackend):
    """Off by 1% -- far over the float32 tolerance, as a subtly wrong kernel would be."""

    name = "numpy-wrong"

    def call(self, op):
        right = super().call(op)
        if op == "pool":
            return lambda p, a: (right(p, a)[0] * 1.01, None)
        return lambda p, a: right(p, a) * 1.01


class _Raising(bk.NumpyBackend):
    name = "numpy-raises"

    def call(self, op):
        def f(p, a):
            raise RuntimeError("kernel launch failed (simulated)")
        return f


@pytest.fixture
def bad_backends():
    bk.register("numpy-wrong", _WrongNumpy)
    bk.register("numpy-raises", _Raising)
    yield
    bk._EXTRA.pop("numpy-wrong", None)
    bk._EXTRA.pop("numpy-raises", None)


def _run(tmp_path, name, extra=()):
    out = tmp_path / f"{name}.json"
    rc = cli.main(TINY + ["--backend", CPU_BACKENDS, "--json", str(out)] + list(extra))
    return rc, json.loads(out.read_text())


def test_cpu_run_end_to_end_json_schema(tmp_path, capsys):
    rc, doc = _run(tmp_path, "a")
    text = capsys.readouterr().out
    assert rc == 0
    assert doc["schema"] == "gpuconv-bench/1"
    for key in ("date", "commit", "command", "machine", "versions", "settings", "roofline",
                "backends", "results", "summary", "targets", "not_run"):
        assert key in doc, key
    assert doc["machine"]["cpu_count"] >= 1 and "numpy" in doc["versions"]
    assert doc["roofline"]["cpu"]["source"].startswith("measured")
    assert doc["settings"]["batch"] == 8  # CPU default (the --shape N=2 overrides it per layer)
    assert doc["settings"]["cpu_threads"] >= 1 and doc["settings"]["wake_s"] == 0.0
    assert "gpuconv CPU threads:" in text
    if doc["machine"]["gpu"] is None:
        assert "No GPU here" in text
    n_backends = len(CPU_BACKENDS.split(","))
    assert len(doc["results"]) == 2 * 4 * 2 * n_backends  # layers x ops x dtypes x backends
    for r in doc["results"]:
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["status"] == "ok", r
        assert r["batch"] == 2
        assert r["rel_err"] <= r["tol"]
        assert TIMED_KEYS <= set(r), TIMED_KEYS - set(r)
        assert len(r["samples_s"]) == r["n"] >= 2
        assert all(s > 0 for s in r["samples_s"])
        assert r["min_s"] <= r["q1_s"] <= r["median_s"] <= r["q3_s"] <= r["max_s"]
        assert math.isclose(r["flop_rate"], r["flops"] / r["median_s"])
        assert 0 < r["roofline_fraction"]
        if r["backend"] == "numpy":
            assert r["workspace_bytes"] is not None
    if "torch-cpu" in CPU_BACKENDS:
        numpy_rows = [r for r in doc["results"] if r["backend"] == "numpy"]
        assert all(r["ref_backend"] == "torch-cpu" and r["ratio"] > 0 for r in numpy_rows)
    s = [x for x in doc["summary"] if x["backend"] == "numpy" and x["op"] == "fprop"
         and x["dtype"] == "float32"][0]
    assert s["suite"] == "adhoc" and s["n_layers"] == 2 and s["complete"]
    assert s["net_time_s"] > 0
    assert "Summary per suite" in text and "fprop" in text


def test_wrong_backend_is_reported_and_not_timed(tmp_path, capsys, bad_backends):
    rc, doc = _run(tmp_path, "w", ["--backend", "numpy,numpy-wrong,numpy-raises"])
    text = capsys.readouterr().out
    assert rc == 2  # a wrong backend makes the run fail
    wrong = [r for r in doc["results"] if r["backend"] == "numpy-wrong"]
    raised = [r for r in doc["results"] if r["backend"] == "numpy-raises"]
    assert wrong and raised
    for r in wrong:
        assert r["status"] == "WRONG" and r["samples_s"] == [] and "median_s" not in r
        assert r["rel_err"] > r["tol"]
    for r in raised:
        assert r["status"] == "ERROR" and "simulated" in r["reason"] and r["samples_s"] == []
    assert all(r["status"] == "ok" and r["n"] >= 2 for r in doc["results"]
               if r["backend"] == "numpy")
    assert "WRONG" in text and "not timed" in text


def _set_times(doc, scale_of):
    """Replace measured times by fixed ones (scaled per row), so the verdicts are deterministic."""
    for r in doc["results"]:
        f = scale_of(r)
        r.update(median_s=1e-3 * f, q1_s=0.9e-3 * f, q3_s=1.1e-3 * f, min_s=0.8e-3 * f,
                 max_s=1.2e-3 * f, samples_s=[0.9e-3 * f, 1e-3 * f, 1.1e-3 * f])


def test_compare_marks_regressions(tmp_path, capsys):
    _, doc = _run(tmp_path, "a")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    _set_times(doc, lambda r: 1.0)
    a.write_text(json.dumps(doc))
    _set_times(doc, lambda r: 3.0 if (r["backend"], r["op"]) == ("numpy", "fprop") else 1.02)
    b.write_text(json.dumps(doc))
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b)]) == 0
    text = capsys.readouterr().out
    assert text.count("REGRESSION") == 4  # 2 layers x 2 dtypes; the 2% changes are noise
    assert cli.main(["compare", str(a), str(b), "--fail-on-regression"]) == 1
    capsys.readouterr()
    assert cli.main(["compare", str(b), str(a), "--fail-on-regression"]) == 0
    assert capsys.readouterr().out.count("faster") == 4
    doc["results"][0]["status"] = "WRONG"
    b.write_text(json.dumps(doc))
    assert cli.main(["compare", str(a), str(b), "--fail-on-regression"]) == 1
    assert "BROKEN (WRONG)" in capsys.readouterr().out


def test_markdown_subcommand(tmp_path, capsys):
    _run(tmp_path, "m")
    capsys.readouterr()
    assert cli.main(["markdown", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "| layer | op | dtype | numpy median (IQR)" in text
    assert text.count("| shape:") == 2 * 4 * 2  # layers x ops x dtypes


def test_plot_or_clear_message(tmp_path, capsys):
    png = tmp_path / "p.png"
    rc, _ = _run(tmp_path, "p", ["--plot", str(png)])
    assert rc == 0
    err = capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "needs matplotlib" in err and not png.exists()
    else:
        assert png.stat().st_size > 0


def test_list_and_bad_arguments(capsys):
    assert cli.main(["--list"]) == 0
    text = capsys.readouterr().out
    assert "cpu-target" in text and "r50.stem7x7s2" in text and "numpy" in text
    for bad in (["--suite", "nope"], ["--layer", "nope.*"], ["--shape", "1,2,3"],
                ["--shape", "1,3,4,4,2,5,5"], ["--dtype", "int8"]):
        with pytest.raises(SystemExit):
            cli.main(bad + ["--quiet"])


def test_suites_cover_the_csv():
    layers = suites.load_layers()
    assert {l.suite for l in layers} == set(suites.NETWORK_SUITES)
    for l in layers:
        p = l.problem(2)
        assert p.P >= 1 and p.Q >= 1
        pp = l.pool_problem(2)
        assert pp.P >= 1
    tgt = suites.suite_layers("cpu-target")
    assert [l.name for l in tgt] == list(suites.CPU_TARGET_LAYERS)
    assert all(l.suite == "cpu-target" for l in tgt)
    assert [l.name for l in suites.select(layer_globs=["r50.l2.ds*"])] == ["r50.l2.ds1x1s2"]
    ad = suites.parse_shape("4,8,10,10,16,3,3,2,1,1,2")
    assert (ad.batch, ad.stride, ad.pad, ad.groups) == (4, 2, 1, 2)


def test_helpers():
    assert timing.input_sets_for(10 << 20, 50 << 20) == 8
    assert timing.input_sets_for(40 << 20, 50 << 20) == 3
    assert timing.input_sets_for(60 << 20, 50 << 20) == 1
    st = timing.stats([3.0, 1.0, 2.0])
    assert st["median_s"] == 2.0 and st["n"] == 3
    assert math.isclose(geomean([2.0, 8.0]), 4.0)
    ref = np.ones((2, 3))
    assert rel_error(ref, ref) == 0
    assert rel_error(ref * np.nan, ref) == math.inf
    assert rel_error(np.ones((3, 2)), ref) == math.inf


def test_cuda_registry_expansion_and_supports(tmp_path, monkeypatch, capsys):
    """Without a GPU: a fake CUDA registry of NumPy functions run on the CPU kit exercises the
    expansion of `cuda` into algorithms, --algo, supports() skips and the TF32 tolerance."""
    from gpuconv.engines import numpy_engine as ne

    def only_3x3(p, dtype):
        return p.R == 3
    fprop_3x3 = lambda p, x, w, b: ne.conv_fprop(p, x, w, b)  # noqa: E731
    fprop_3x3.supports = only_3x3
    reg = {"fprop": {"im2col_gemm": ne.conv_fprop, "igemm_tc_x": ne.conv_fprop,
                     "wino": fprop_3x3},
           "dgrad": {"im2col_gemm": ne.conv_dgrad}, "wgrad": {"im2col_gemm": ne.conv_wgrad}}
    monkeypatch.setattr(bk, "cuda_registry", lambda: (reg, None))

    def prepare(self, case):
        from gpuconv.benchmark.timing import CpuKit
        call = bk.engine_op(case.op, self.registry[case.op][self.algo])
        return bk.Runner(self, case, call, case.sets, bk._cpu_kit(CpuKit), np.asarray)
    monkeypatch.setattr(bk.CudaEngineBackend, "prepare", prepare)
    monkeypatch.setattr(bk.CudaEngineBackend, "device", "cpu")  # no GPU roofline or L2 probe
    ready, skipped = bk.resolve(["cuda", "baseline"])
    assert [b.name for b in ready] == ["cuda:igemm_tc_x", "cuda:im2col_gemm", "cuda:wino"]
    assert bk.resolve(["cuda"], algos=["wino"])[0][0].name == "cuda:wino"
    assert bk.resolve(["cuda:nope"])[1][0][0] == "cuda:nope"
    tc = ready[0]
    assert tc.tolerance_key("float32") == "tf32" and tc.tolerance_key("float16") == "float16"
    out = tmp_path / "c.json"
    rc = cli.main(["--shape", "2,3,9,9,4,3,3,1,1", "--shape", "2,3,9,9,4,1,1",
                   "--backend", "cuda,numpy", "--op", "fprop,dgrad", "--min-samples", "2",
                   "--max-samples", "2", "--settle-ms", "0", "--quiet", "--json", str(out)])
    doc = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert rc == 0
    ran = {(r["layer"], r["op"], r["backend"]) for r in doc["results"]}
    assert ("shape:2,3,9,9,4,3,3,1,1", "fprop", "cuda:wino") in ran
    assert ("shape:2,3,9,9,4,1,1", "fprop", "cuda:wino") not in ran  # supports() said no
    assert ("shape:2,3,9,9,4,1,1", "dgrad", "cuda:wino") not in ran  # no dgrad algorithm
    assert "not run: cuda:wino" in text and "supports" in text
    assert any(n["backend"] == "cuda:wino" for n in doc["not_run"])


@pytest.mark.gpu
def test_gpu_backends_check_and_time(tmp_path):
    """On the GPU machine: the CUDA engine's algorithms and cuDNN are checked and timed."""
    out = tmp_path / "g.json"
    rc = cli.main(["--shape", "4,8,12,12,16,3,3,1,1", "--op", "fprop,dgrad,wgrad",
                   "--backend", "cuda,cudnn", "--min-samples", "3", "--max-samples", "5",
                   "--quiet", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0, [r for r in doc["results"] if r["status"] != "ok"]
    assert {r["device"] for r in doc["results"]} == {"cuda"}
    assert all(r["n"] >= 3 for r in doc["results"])


def _timed_rows(samples_by_layer):
    """Rows as run_case leaves them, from injected samples {layer: {backend: [seconds]}}."""
    from gpuconv.benchmark import runner
    rows = []
    for layer, per_backend in samples_by_layer.items():
        case_rows = []
        for backend, s in per_backend.items():
            st = timing.stats(s)
            case_rows.append(dict(suite="cpu-target", layer=layer, op="fprop", dtype="float32",
                                  backend=backend, device="cpu", flops=1e6, bytes=1e3,
                                  tol_key="float32", count_in_net=1, status="ok", **st,
                                  iqr_frac=timing.iqr_fraction(st),
                                  unstable=timing.unstable(st)))
        runner._derive(case_rows, runner.RunSettings(("fprop",), ("float32",), 1,
                                                     timing.TimingSettings()), {})
        rows += case_rows
    return rows


def _verdict(samples_by_layer):
    from gpuconv.benchmark import report, runner
    rows = _timed_rows(samples_by_layer)
    summary = runner.summarize(rows, {"cpu-target": list(samples_by_layer)})
    (t,) = report.target_checks(summary, suites.SUITE_TARGETS)
    return t, rows


STEADY = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]


def test_target_met_only_on_stable_data():
    limit = suites.SUITE_TARGETS["cpu-target"][2]
    scaled = lambda k, s: [k * limit * v for v in s]  # noqa: E731
    t, rows = _verdict({"a": {"numpy": scaled(0.95, STEADY), "torch-cpu": STEADY},
                        "b": {"numpy": scaled(0.9, STEADY), "torch-cpu": STEADY}})
    assert t["met"] and t["verdict"] == "met" and not t["unstable_layers"]
    assert not any(r["unstable"] for r in rows)
    # the same medians, but the reference of one layer swings 0.2x..5x (IQR >> 25%): the
    # geomean would pass, and the summary must refuse to call it met
    wild = [0.2, 0.5, 1.0, 1.0, 2.0, 5.0]
    t, rows = _verdict({"a": {"numpy": scaled(0.95, STEADY), "torch-cpu": wild},
                        "b": {"numpy": scaled(0.9, STEADY), "torch-cpu": STEADY}})
    assert t["geomean"] <= limit and not t["met"]
    assert t["unstable_layers"] == ["a"] and t["verdict"].startswith("UNSTABLE")
    flagged = [r for r in rows if r["unstable"]]
    assert [(r["layer"], r["backend"]) for r in flagged] == [("a", "torch-cpu")]
    numpy_a = next(r for r in rows if (r["layer"], r["backend"]) == ("a", "numpy"))
    assert numpy_a["ratio_unstable"] and numpy_a["ratio_lo"] < numpy_a["ratio"] \
        < numpy_a["ratio_hi"]
    # medians pass but minimum times do not: not met
    t, _ = _verdict({"a": {"numpy": [0.8] + [limit] * 5, "torch-cpu": [0.2] + [1.0] * 5}})
    assert t["geomean"] <= limit and t["geomean_min"] > limit and not t["met"]
    # steady, agreeing and over the limit: NOT met
    t, _ = _verdict({"a": {"numpy": scaled(1.1, STEADY), "torch-cpu": STEADY}})
    assert t["verdict"] == "NOT met" and not t["met"]


def test_unstable_results_are_marked_in_table_and_markdown():
    from gpuconv.benchmark import report, runner
    rows = _timed_rows({"a": {"numpy": STEADY, "torch-cpu": [0.2, 0.5, 1.0, 1.0, 2.0, 5.0]}})
    for r in rows:
        r.update(problem="p", rel_err=0.0, input_sets=1)
    text = "\n".join(report.case_block(rows))
    assert "UNSTABLE" in text and text.count("%!") == 1
    summary = runner.summarize(rows, {"cpu-target": ["a"]})
    doc = {"machine": {"cpu": "x", "cpu_count": 2}, "settings": {}, "versions": {}, "date": "d",
           "commit": "c", "command": "gpuconv-bench", "results": rows, "summary": summary,
           "targets": report.target_checks(summary, suites.SUITE_TARGETS)}
    md = report.markdown(doc)
    assert "%!)" in md and "UNSTABLE" in md


def test_cpu_kit_counts_page_faults_and_the_table_names_them():
    from gpuconv.benchmark import report, timing
    if timing.minor_faults() is None:
        pytest.skip("no resource module here")
    kit = timing.CpuKit()
    fresh = kit.timed(lambda: np.ones(64 << 20, np.uint8), cold=False)  # 64 MiB of new pages
    reused = np.ones(64 << 20, np.uint8)  # (touched: no fault left in it)
    again = kit.timed(lambda: reused.fill(2), cold=False)
    # (>= 32: one a 2 MiB page where the kernel backs the block with transparent huge pages)
    assert fresh.faults >= 32 and again.faults < fresh.faults / 4
    rows = _timed_rows({"a": {"numpy": STEADY, "torch-cpu": STEADY}})
    for r, f in zip(rows, (0.0, 10553.0)):
        r.update(problem="p", rel_err=0.0, input_sets=1, page_faults=f)
    text = "\n".join(report.case_block(rows))
    assert text.count("page faults a call") == 1 and "10,553" in text


def test_wake_calls_until_its_time_is_up_and_at_least_once(monkeypatch):
    """The untimed calls after a settle pause: one even with no time, and enough to fill the
    time (here a fake clock, advanced 30 ms by each call)."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    calls = []

    def call():
        calls.append(now[0])
        now[0] += 0.03

    timing.wake(call, 0.0)
    assert len(calls) == 1
    calls.clear()
    timing.wake(call, 0.1)
    assert len(calls) == 4  # 0, 30, 60, 90 ms: the fourth ends past 0.1 s
