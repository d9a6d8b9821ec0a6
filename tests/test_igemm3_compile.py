"""Every third-generation kernel instantiation (gpuconv.engines.cuda_igemm3.IGEMM3_KERNELS, the
list the loader compiles) and the emulation self-test kernels (tests/igemm3_selftest.cu) compile
with nvcc for sm_80 and sm_90 with no register spills and no stack frame; the Igemm3Args layout
the host packs is static_asserted against the C struct. Skipped without nvcc. (NVRTC: the
catalogue-wide tests/test_nvrtc_compile.py covers these kernels too.)"""
import concurrent.futures
import os
import tempfile

import pytest

from gpuconv import cuda as _cuda
from gpuconv.engines import cuda_igemm3 as ig3

from .test_igemm_compile import ARCHS, NVCC, assert_no_spills
from .test_igemm3_host_emulation import SELFTEST, _read

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
FILES = [f for f, _ in ig3.IGEMM3_KERNELS] + ["igemm3_selftest.cu"]


def translation_unit(file):
    if file == "igemm3_selftest.cu":
        return _cuda.kernel_source(file, read=_read)
    return _cuda.instantiation_source(file, names=dict(ig3.IGEMM3_KERNELS)[file],
                                      structs=ig3.STRUCTS)


def _compile(file, arch, tmp):
    import subprocess
    cu = os.path.join(tmp, f"{file}.{arch}.cu")
    with open(cu, "w", encoding="utf-8") as f:
        f.write(translation_unit(file))
    r = subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o",
                        cu + ".cubin", cu], capture_output=True, text=True, timeout=600)
    return file, arch, r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def builds():
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(f, a) for f in FILES for a in ARCHS]
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as ex:
            res = list(ex.map(lambda j: _compile(*j, tmp), jobs))
    return {(f, a): (rc, log) for f, a, rc, log in res}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", FILES)
def test_compiles_without_spills(builds, file, arch, record_property):
    rc, log = builds[(file, arch)]
    assert rc == 0, f"nvcc failed for {file} ({arch}):\n{log}"
    want = len(dict(ig3.IGEMM3_KERNELS).get(file, SELFTEST))
    assert_no_spills(log, arch, want, record_property)


def test_grad_kernels_are_catalogued_with_their_struct():
    """dgrad and wgrad are in the ONE list (every tile of every dtype), and their translation
    units pin Igemm3GradArgs to the host's numpy layout (a static_assert per field)."""
    lists = dict(ig3.IGEMM3_KERNELS)
    for op in ("dgrad", "wgrad"):
        names = lists[f"igemm3_{op}.cu"]
        want = {ig3.kernel_name(op, ct, mode, t) for (ct, mode), tiles in ig3.CONFIGS[op].items()
                for t in tiles}
        assert set(names) == want and len(want) == 6
        tu = translation_unit(f"igemm3_{op}.cu")
        assert "Igemm3GradArgs" in tu and "offsetof(Igemm3GradArgs, bk_q)" in tu
