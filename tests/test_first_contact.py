"""bench/gpu_first_contact.sh --dry-run: the prepared GPU run's steps on the CPU backends, so the
script is tested before a GPU sees it. Checks that every step ran and succeeded, that the logs,
JUnit XML, JSON files and SUMMARY.md exist and parse, that OUTDIR fits what the device tool
returns (at most 8 files, names of letters, digits, '.', '_', '-'), and that the time budget
skips steps (the summary still written) instead of overrunning."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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


def _outputs(out):
    """OUTDIR's files as the device tool would return them, and the tarball's members."""
    names = sorted(os.listdir(out))
    assert len(names) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    assert all((out / n).is_file() and (out / n).stat().st_size < 16 << 20 for n in names)
    with tarfile.open(out / "outputs.tar.gz") as tar:
        files = {m.name.lstrip("./"): tar.extractfile(m).read().decode()
                 for m in tar.getmembers() if m.isfile()}
    return names, files


def _steps(files):
    rows = [line.split("\t") for line in files["steps.tsv"].splitlines()]
    return {r[0]: r[1] for r in rows}


@pytest.mark.skipif(cuda.cuda_available(), reason="a GPU is here: run the real script instead")
def test_dry_run_writes_every_output(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    names, files = _outputs(out)
    assert names == sorted(["SUMMARY.md", "summary.json", "steps.log", "doctor.json",
                            "pytest-gpu.xml", "outputs.tar.gz"])
    steps = _steps(files)
    want = ["install", "doctor", "pytest", "bench-r50-float32", "bench-vgg16-float16"]
    assert list(steps) == want
    bad = {k: v for k, v in steps.items() if v != "0"}
    assert not bad, {k: files[f"{k}.log"][-2000:] for k in bad}
    for name in want:
        assert files[f"{name}.log"]
    assert "first contact done" in (out / "steps.log").read_text()
    for name in ("SUMMARY.md", "summary.json", "doctor.json", "pytest-gpu.xml"):
        assert files[name] == (out / name).read_text()  # the copies are the final ones

    root = ET.parse(out / "pytest-gpu.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert int(suite.get("tests")) > 0 and int(suite.get("failures")) == 0
    assert int(suite.get("errors")) == 0
    assert int(suite.get("skipped")) == int(suite.get("tests"))  # no GPU: every GPU test skips

    doc = json.loads((out / "doctor.json").read_text())
    assert doc["schema"] == "gpuconv-doctor/1" and doc["status"] == "ok"
    assert doc["bench"]["rc"] == 0 and doc["bench"]["run"]["results"]

    for name in ("bench-r50-float32", "bench-vgg16-float16"):
        b = json.load(io.StringIO(files[f"{name}.json"]))
        assert b["schema"] == "gpuconv-bench/1"
        assert b["results"] and all(row["status"] == "ok" for row in b["results"])
        assert {row["op"] for row in b["results"]} == {"fprop", "dgrad", "wgrad"}
        assert "|" in files[f"{name}.md"]

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
    names, files = _outputs(out)
    assert set(_steps(files).values()) == {"skipped"}
    assert "doctor.json" not in names
    md = (out / "SUMMARY.md").read_text()
    assert "| install | skipped |" in md and "doctor.json unreadable" in md
    assert "pytest-gpu.xml unreadable" in md


def test_usage_error():
    r = subprocess.run(["bash", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr
