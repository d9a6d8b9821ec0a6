"""gpuconv-bench's torch-bridge backends: checked against the reference like every backend."""
import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch-bridge backends need PyTorch")

from gpuconv import ConvProblem  # noqa: E402
from gpuconv.benchmark import backends as bk  # noqa: E402
from gpuconv.benchmark import cli, roofline  # noqa: E402
from gpuconv.engines import numpy_engine  # noqa: E402


def test_torch_bridge_runs_checked_and_timed(tmp_path, monkeypatch):
    fast = roofline.measure_cpu.__wrapped__
    monkeypatch.setattr(roofline, "measure_cpu", lambda: fast(n=128, copy_mib=4))
    out = tmp_path / "bridge.json"
    rc = cli.main(["--shape", "2,4,8,8,6,3,3,2,1,1,2", "--op", "all", "--dtype",
                   "float32,float64", "--backend", "numpy,torch-bridge,torch-bridge-cuda",
                   "--min-samples", "2", "--max-samples", "3", "--max-time-per-case", "0.01",
                   "--settle-ms", "1", "--wake-ms", "0", "--threads", "1", "--quiet", "--json", str(out)])
    doc = json.loads(out.read_text())
    assert rc == 0
    rows = [r for r in doc["results"] if r["backend"] == "torch-bridge"]
    assert len(rows) == 4 * 2  # ops x dtypes
    for r in rows:
        assert r["status"] == "ok" and r["rel_err"] <= r["tol"] and r["n"] >= 2, r
    cuda = [b for b in doc["backends"] if b["name"] == "torch-bridge-cuda"][0]
    if doc["machine"]["gpu"] is None:  # skipped, with the reason
        assert cuda["status"] == "skipped" and "CUDA" in cuda["reason"]


def test_torch_bridge_serves_same_padding_and_says_what_it_cannot():
    b = bk.TorchBridgeBackend("cpu")
    assert "float32, float64" in b.unsupported("fprop", "float16")
    same = ConvProblem.from_args((2, 3, 7, 6), (4, 3, 2, 4), 1, "same", (1, 2))
    assert not same.symmetric_padding and b.unsupported("fprop", "float64", same) is None
    odd = ConvProblem(2, 3, 7, 6, 4, 3, 3, 0, 0, pad_h_end=2)
    assert "asymmetric" in b.unsupported("fprop", "float64", odd)
    rng = np.random.default_rng(0)
    a = {"x": rng.standard_normal(same.x_shape), "w": rng.standard_normal(same.w_shape),
         "dy": rng.standard_normal(same.y_shape)}
    t = {k: bk._to_torch(v, "cpu", "float64") for k, v in a.items()}
    for op, want in (("fprop", numpy_engine.conv_fprop(same, a["x"], a["w"])),
                     ("dgrad", numpy_engine.conv_dgrad(same, a["w"], a["dy"])),
                     ("wgrad", numpy_engine.conv_wgrad(same, a["x"], a["dy"]))):
        np.testing.assert_allclose(bk.bridge_ops(op, same)(same, t).numpy(), want, rtol=1e-12,
                                   atol=1e-12)
