"""``gpuconv-bench train`` end to end, tiny (batch 4, two samples per side), and its verdict
logic on injected timings. No speed is asserted: only that both sides ran the same step (the
check), that samples and per-layer profiles exist, and that unstable data is never 'met'."""
import json

import numpy as np
import pytest

from gpuconv.benchmark import cli, timing
from gpuconv.benchmark import train_step as ts

try:
    import torch  # noqa: F401
except Exception:
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")

TINY = ["train", "--batch", "4", "--min-samples", "2", "--max-samples", "2", "--max-time", "0",
        "--warmup-ms", "0", "--settle-ms", "1", "--wake-ms", "0", "--block", "1", "--profile-steps", "1",
        "--threads", "1"]


@needs_torch
def test_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert cli.main(TINY + ["--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert [r["model"] for r in doc["results"]] == list(ts.MODELS)
    for r in doc["results"]:
        assert r["status"] == "ok" and r["rel_err"] <= ts.TOLERANCE
        for side in ("gpuconv-numpy", "torch-cpu"):
            assert r[side]["n"] == 2 and len(r[side]["samples_s"]) == 2
            assert all(s > 0 for s in r[side]["samples_s"])
            prof = r["profile"][side]
            # every layer's forward and backward was timed, on both sides
            n_layers = len(ts.MODELS[r["model"]][0](np.random.default_rng(0)))
            assert sum(k.endswith(" fwd") for k in prof) == n_layers
            assert sum(k.endswith(" bwd") for k in prof) == n_layers
            assert prof["step"] > 0
        assert r["ratio"] == pytest.approx(r["gpuconv-numpy"]["median_s"]
                                           / r["torch-cpu"]["median_s"])
        assert r["verdict"] == ts.verdict(r, ts.TARGET)
        assert f"Where a {r['model']} step goes" in text


@needs_torch
def test_models_match_pytorch_in_float32():
    for name in ts.MODELS:
        err, lg, lt = ts.check(name, batch=3, seed=1)
        assert err < 1e-5, name
        assert np.isfinite(lg) and lg == pytest.approx(lt, rel=1e-5)


@needs_torch
def test_wrong_step_is_reported_and_not_timed(monkeypatch):
    real = ts.GpuconvSide.run

    def off(self, i=0):  # a subtly wrong update, as a broken backward would give
        loss = real(self, i)
        for p in self.model.parameters():
            p.data *= np.float32(1.01)
        return loss
    monkeypatch.setattr(ts.GpuconvSide, "run", off)
    row = ts.run_model("train-default", 4, ts.DEFAULTS, profile_steps=0)
    assert row["status"] == "WRONG" and "rel. error" in row["reason"]
    assert "gpuconv-numpy" not in row and ts.verdict(row, ts.TARGET) == "WRONG"


def _row(g_samples, t_samples):
    row = dict(model="m", batch=1, status="ok")
    for side, s in (("gpuconv-numpy", g_samples), ("torch-cpu", t_samples)):
        st = timing.stats(s)
        row[side] = dict(st, unstable=timing.unstable(st))
    row["ratio"] = row["gpuconv-numpy"]["median_s"] / row["torch-cpu"]["median_s"]
    row["ratio_min"] = row["gpuconv-numpy"]["min_s"] / row["torch-cpu"]["min_s"]
    row["unstable"] = row["gpuconv-numpy"]["unstable"] or row["torch-cpu"]["unstable"] \
        or timing.ratios_disagree(row["ratio"], row["ratio_min"])
    return row


def test_verdict_refuses_unstable_data():
    steady = [1.0, 1.01, 0.99, 1.02, 1.0]
    assert ts.verdict(_row(steady, steady), 1.5) == "met"
    assert ts.verdict(_row([2 * s for s in steady], steady), 1.5) == "NOT met"
    # both ratios over the limit and agreeing: not met
    assert ts.verdict(_row([1.5, 1.6, 1.6, 1.6, 1.6], [1.0] * 5), 1.5) == "NOT met"
    # steady samples, but the median and minimum ratios disagree (0.5 vs 1.0 here, as when one
    # side's whole run was slowed by another tenant): not evidence either way
    row = _row([0.5, 0.5, 0.5, 0.5, 0.5], [0.5, 1.0, 1.0, 1.0, 1.0])
    assert not row["gpuconv-numpy"]["unstable"] and not row["torch-cpu"]["unstable"]
    assert ts.verdict(row, 1.5).startswith("unstable")
    assert timing.ratios_disagree(0.88, 0.16) and not timing.ratios_disagree(1.2, 1.1)
    # a wildly spread reference (IQR ~ 100%) makes any ratio meaningless: never 'met'
    wild = [0.3, 0.5, 1.0, 1.5, 3.0]
    row = _row(steady, wild)
    assert row["torch-cpu"]["unstable"] and not row["gpuconv-numpy"]["unstable"]
    assert ts.verdict(row, 1.5).startswith("unstable")
    assert "!" in "\n".join(ts.lines([row], 1.5))  # the table marks the IQR


def test_training_steps_are_bit_identical_run_to_run():
    """Same initial weights, same batches: two runs of three steps give the same bits (no
    nondeterministic reduction order anywhere in the engine, the layers or the optimiser)."""
    def run():
        build, shape, classes, _ = ts.MODELS["mnist-cnn"]
        side = ts.GpuconvSide(build(np.random.default_rng(3)),
                              ts.make_batches(shape, classes, 5, 2, seed=4), None)
        losses = [side.run(i % 2) for i in range(3)]
        return losses, [p.data.copy() for p in side.model.parameters()]
    (l1, p1), (l2, p2) = run(), run()
    assert l1 == l2
    for a, b in zip(p1, p2):
        assert a.dtype == np.float32 and a.tobytes() == b.tobytes()
