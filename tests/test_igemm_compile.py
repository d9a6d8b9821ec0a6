"""Every second-generation kernel instantiation the host launches compiles with nvcc for sm_80
and sm_90, with no register spills and no stack frame (runs without a GPU; skipped without nvcc).

The instantiations come from gpuconv.engines.cuda_igemm.IGEMM_KERNELS, the same list the loader
compiles; the struct layouts the host packs (IGEMM_ARGS_DTYPE, WINO_ARGS_DTYPE) are
static_asserted against the C structs. Registers per kernel go to the test report
(``record_property``) and, with ``-s``, to stdout.
"""
import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile

import pytest

from gpuconv import cuda as _cuda
from gpuconv.engines import cuda_igemm as ig

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)
ARCHS = ("sm_80", "sm_90")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")


def translation_unit(file):
    return _cuda.instantiation_source(file, names=dict(ig.IGEMM_KERNELS)[file],
                                      structs=ig.STRUCTS)


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _compile(file, arch, tmp):
    cu = os.path.join(tmp, f"{file}.{arch}.cu")
    with open(cu, "w", encoding="utf-8") as f:
        f.write(translation_unit(file))
    cmd = [NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
           cu + ".cubin", cu]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return file, arch, r.returncode, r.stdout + r.stderr


def _parse(log):
    """{mangled kernel: (registers, stack, spill stores, spill loads)} from ptxas -v."""
    out, cur, frame = {}, None, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur, frame = m.group(1), None
            continue
        m = _FRAME.search(line)
        if m and cur:
            frame = tuple(int(v) for v in m.groups())
            continue
        m = _REGS.search(line)
        if m and cur and frame is not None:
            out[cur] = (int(m.group(1)),) + frame
            cur = None
    return out


@pytest.fixture(scope="module")
def builds():
    """All files x archs, compiled two at a time (CI has 2 cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(f, a) for f, _ in ig.IGEMM_KERNELS for a in ARCHS]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
            res = list(ex.map(lambda j: _compile(*j, tmp), jobs))
    return {(f, a): (rc, log) for f, a, rc, log in res}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", [f for f, _ in ig.IGEMM_KERNELS])
def test_compiles_without_spills(builds, file, arch, record_property):
    rc, log = builds[(file, arch)]
    assert rc == 0, f"nvcc failed for kernels/{file} ({arch}):\n{log}"
    assert_no_spills(log, arch, len(dict(ig.IGEMM_KERNELS)[file]), record_property)


def assert_no_spills(log, arch, expected, record_property):
    """ptxas -v log: `expected` kernels, none with spills or a stack frame (also used by the
    third generation's tests/test_igemm3_compile.py)."""
    stats = _parse(log)
    assert len(stats) == expected, f"expected {expected} kernels, ptxas reported {stats}"
    for kernel, (regs, stack, st, ld) in sorted(stats.items()):
        record_property(f"{arch}:{kernel}:registers", regs)
        print(f"{arch} {regs:4d} regs  {kernel}")
        assert st == 0 and ld == 0, f"{kernel} ({arch}) spills: {st} B stored, {ld} B loaded"
        assert stack == 0, f"{kernel} ({arch}) has a {stack}-byte stack frame (local memory)"
        assert regs <= 255
