"""bench/gpu_first_contact.sh --dry-run: the prepared GPU run's steps on the CPU backends, so the
script is tested before a GPU sees it. Checks that every step ran and succeeded and that the
logs, JUnit XML, JSON files and SUMMARY.md exist and parse; and that the time budget skips steps
(the summary still written) instead of overrunning."""
import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from gpuconv import cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_first_contact.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _env(**extra):
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    # the interpreter's bin first: its gpuconv-doctor / gpuconv-bench, where installed
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("GPUCONV_REQUIRE_GPU", None)
    return env


def _steps(out):
    rows = [line.rstrip("\n").split("\t") for line in open(out / "steps.tsv")]
    return {r[0]: r[1] for r in rows}


@pytest.mark.skipif(cuda.cuda_available(), reason="a GPU is here: run the real script instead")
def test_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    steps = _steps(out)
    want = ["install", "doctor", "pytest", "bench-r50-float32", "bench-vgg16-float16"]
    assert list(steps) == want
    bad = {k: v for k, v in steps.items() if v != "0"}
    assert not bad, {k: (out / f"{k}.log").read_text()[-2000:] for k in bad}
    for name in want:
        assert (out / f"{name}.log").stat().st_size > 0
    assert "first contact done" in (out / "steps.log").read_text()

    root = ET.parse(out / "pytest-gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    assert int(suite.get("errors")) == 0
    assert int(suite.get("skipped")) == int(suite.get("tests"))  # no GPU: every GPU test skips

    doc = json.loads((out / "doctor.json").read_text())
    assert doc["schema"] == "gpuconv-doctor/1" and doc["status"] == "ok"
    assert doc["bench"]["rc"] == 0 and doc["bench"]["run"]["results"]

    for name in ("bench-r50-float32", "bench-vgg16-float16"):
        b = json.loads((out / f"{name}.json").read_text())
        assert b["schema"] == "gpuconv-bench/1"
        assert b["results"] and all(row["status"] == "ok" for row in b["results"])
        assert {row["op"] for row in b["results"]} == {"fprop", "dgrad", "wgrad"}
        assert "|" in (out / f"{name}.md").read_text()

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["pytest"]["failures"] == 0
    assert [s["step"] for s in summary["steps"]] == want
    assert summary["doctor"]["status"] == "ok" and len(summary["bench"]) == 2
    md = (out / "SUMMARY.md").read_text()
    for part in ("# gpuconv first contact", "- device:", "- commit:", "## Steps",
                 "| doctor | 0 |", "## pytest -m gpu", "0 failed", "## gpuconv-bench",
                 "### bench-r50-float32.json"):
        assert part in md, part


def test_out_of_time_skips_steps_and_still_summarises(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, timeout=120,
                       env=_env(GPUCONV_FIRST_CONTACT_BUDGET="10"), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert set(_steps(out).values()) == {"skipped"}
    md = (out / "SUMMARY.md").read_text()
    assert "| install | skipped |" in md and "doctor.json unreadable" in md
    assert "pytest-gpu.xml unreadable" in md


def test_usage_error():
    r = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
