"""A wheel built from the tree installs and imports from outside the source tree, kernels included."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{r.stdout}\n{r.stderr}")
    (whl,) = out.glob("gpuconv-*.whl")
    return whl


def test_wheel_ships_the_kernel_sources(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    cu = {Path(n).name for n in names if n.startswith("gpuconv/kernels/")}
    expected = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert expected and expected <= cu, f"missing from the wheel: {expected - cu}"
    assert any(n.endswith("entry_points.txt") for n in names)


def test_wheel_in_a_fresh_venv_imports_and_runs_outside_the_tree(wheel, tmp_path):
    """A new venv (no pip, no site-packages of ours), the wheel installed into it with this
    pip, NumPy lent to it by a .pth line (no registry needed), run from an unrelated folder."""
    import numpy
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True)
    (site / "numpy_from_host.pth").write_text(str(Path(numpy.__file__).parents[1]) + "\n")
    code = ("import gpuconv, numpy as np, importlib.resources as r;"
            "assert gpuconv.__file__.startswith(%r), gpuconv.__file__;"
            "src = [f.name for f in r.files('gpuconv.kernels').iterdir()];"
            "assert any(n.endswith('.cu') for n in src), src;"
            "y = gpuconv.conv2d(np.ones((1, 2, 5, 5)), np.ones((3, 2, 3, 3)), padding=1);"
            "assert y.shape == (1, 3, 5, 5) and y[0, 0, 2, 2] == 18; print('ok')" % str(site))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
