"""Every kernel instantiation the engine can launch compiles with NVRTC -- the compiler CuPy runs
on the user's machine -- with CuPy's options, for sm_80 and sm_90, to cubin; every name
expression lowers to a kernel of the cubin; no kernel uses local memory (spills or stack) and
each leaves register headroom. Needs no GPU and no driver: NVRTC comes from the
``nvidia-cuda-nvrtc`` wheel (the ``test`` extra) through ctypes, see gpuconv/nvrtc_check.py.

The nvcc checks (test_kernels_compile.py, test_igemm_compile.py) stay: they static_assert the
argument structs and use another compiler version. Where libnvrtc or the CUDA headers cannot be
found the tests skip with the reason; with ``GPUCONV_REQUIRE_NVRTC=1`` (set by .ci/run) they fail
instead, so CI never skips them silently.

Registers per kernel go to the test report (``record_property``) and, with ``-s``, to stdout;
``python tests/test_nvrtc_compile.py`` prints the table.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

from gpuconv import nvrtc_check as nc
from gpuconv import cuda as _cuda


def catalogue():
    """(file, name expressions) of every kernel the engine can launch, both generations."""
    return tuple((file, names) for file, names, _structs in _cuda.catalogue())


ARCHS = ("sm_80", "sm_90")
#: Register budget per thread. The hardware cap is 255; a kernel compiled just under it by one
#: compiler version can spill under the next, so every kernel must stay at or below this.
MAX_REGISTERS = 240
REQUIRE = os.environ.get("GPUCONV_REQUIRE_NVRTC", "") not in ("", "0")


@pytest.fixture(scope="module")
def nvrtc():
    try:
        lib = nc.Nvrtc()
        include = nc.find_cuda_include(lib.path)
    except nc.NvrtcNotFound as e:
        if REQUIRE:
            pytest.fail(f"GPUCONV_REQUIRE_NVRTC is set but {e}")
        pytest.skip(str(e))
    print(f"\nNVRTC {lib.version[0]}.{lib.version[1]} ({lib.path}); CUDA headers: {include}")
    return lib


@pytest.fixture(scope="module")
def reports(nvrtc):
    t0 = time.perf_counter()
    reps = nc.compile_catalogue(catalogue(), ARCHS, jobs=2, nvrtc=nvrtc, return_errors=True)
    print(f"NVRTC {'.'.join(map(str, nvrtc.version))}: {len(reps)} compiles in "
          f"{time.perf_counter() - t0:.1f} s wall (2 threads)")
    jobs = [(f, a) for f, _ in catalogue() for a in ARCHS]
    return dict(zip(jobs, reps))


def test_nvrtc_version(nvrtc, record_property):
    major, minor = nvrtc.version
    record_property("nvrtc_version", f"{major}.{minor}")
    # CuPy 14 supports CUDA 12 and 13; sm_90 needs NVRTC >= 11.8
    assert major >= 12, f"NVRTC {major}.{minor} is older than any CUDA CuPy 14 supports"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", [f for f, _ in catalogue()])
def test_compiles_with_nvrtc(reports, file, arch, record_property):
    rep = reports[(file, arch)]
    if isinstance(rep, Exception):
        pytest.fail(f"kernels/{file} ({arch}): {rep}")
    names = dict(catalogue())[file]
    assert sorted(rep.kernels) == sorted(names)
    assert not rep.unlisted, f"{file} has kernels no name expression launches: {rep.unlisted}"
    record_property(f"{arch}:{file}:seconds", round(rep.seconds, 2))
    for name in names:
        lowered, res = rep.kernels[name]
        record_property(f"{arch}:{name}:registers", res.registers)
        print(f"{arch} {res.registers:4d} regs  {name}")
        assert res.local_memory == 0, (
            f"{name} ({arch}) uses local memory: frame {res.frame} B, stack {res.min_stack}/"
            f"{res.max_stack} B (register spills or a local array)")
        assert res.registers <= MAX_REGISTERS, (
            f"{name} ({arch}) uses {res.registers} registers (> {MAX_REGISTERS}): too close to "
            "the 255 cap, another compiler version may spill")


# ---------------------------------------------------------------------------------------------
# the cubin reader itself: it must see spills, stack and registers, or the checks above are void
# ---------------------------------------------------------------------------------------------
PROBE = r"""
extern "C" __global__ void spill(const float* __restrict__ a, float* o, int n) {
    float v[64];               // 64 live values against a 32-register cap: must spill
#pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = a[threadIdx.x + i * n];
    float s = 0;
#pragma unroll
    for (int i = 0; i < 64; ++i) s += v[i] * v[63 - i] + v[(i * 7) & 63];
    o[threadIdx.x] = s;
}
extern "C" __global__ void stack(const float* a, float* o, int n) {
    float v[32];               // stored at run-time indices: a 128-byte local array
    for (int i = 0; i < 32; ++i) v[(i * n) & 31] = a[i];
    o[0] = v[n & 31];
}
__shared__ float tile[100];
extern "C" __global__ void plain(float* o) {
    tile[threadIdx.x] = 1;
    __syncthreads();
    o[0] = tile[5];
}
template <typename T> __global__ void twice(T* o) { o[threadIdx.x] *= T(2); }
"""


def _probe_options(nvrtc, arch):
    return nc.compile_options(arch, nc.find_cuda_include(nvrtc.path)) + ("--maxrregcount=32",)


@pytest.mark.parametrize("arch", ARCHS)
def test_reader_sees_spills_and_stack(nvrtc, arch):
    cubin, lowered, _ = nvrtc.compile(PROBE, ["twice<float>", "twice<double>"],
                                      _probe_options(nvrtc, arch))
    res = nc.cubin_resources(cubin)
    assert set(res) == {"spill", "stack", "plain", *lowered.values()}
    assert res["spill"].frame > 0 and res["spill"].registers <= 32
    assert res["stack"].frame == 128
    assert res["plain"].local_memory == 0 and 0 < res["plain"].registers <= 32
    assert res["plain"].shared >= 400
    assert lowered["twice<float>"] != lowered["twice<double>"]


def test_unknown_name_expression_is_an_error(nvrtc):
    with pytest.raises(nc.NvrtcError, match="nosuch"):
        nvrtc.compile(PROBE, ["nosuch<float>"], _probe_options(nvrtc, "sm_80"))


def test_compile_error_carries_the_log(nvrtc):
    with pytest.raises(nc.NvrtcError, match="undefined_thing"):
        nvrtc.compile("__global__ void k() { undefined_thing(); }", [],
                      _probe_options(nvrtc, "sm_80"))


NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if os.path.exists("/usr/local/bin/nvcc")
                                else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found: cannot cross-check against ptxas -v")
@pytest.mark.parametrize("arch", ARCHS)
def test_reader_agrees_with_ptxas(tmp_path, arch):
    """Registers and stack frame read from nvcc's cubin equal what ptxas -v prints."""
    from tests.test_igemm_compile import _parse
    cu = tmp_path / "probe.cu"
    cu.write_text(PROBE + "template __global__ void twice<float>(float*);\n")
    r = subprocess.run([NVCC, f"-arch={arch}", "-cubin", "-maxrregcount=32", "-Xptxas", "-v",
                        "-o", str(cu) + ".cubin", str(cu)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptxas = _parse(r.stdout + r.stderr)
    ours = nc.cubin_resources((tmp_path / "probe.cu.cubin").read_bytes())
    assert set(ptxas) == set(ours) and len(ours) == 4
    for k, (regs, frame, _st, _ld) in ptxas.items():
        assert (ours[k].registers, ours[k].frame) == (regs, frame), k


def test_missing_library_is_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("GPUCONV_NVRTC", raising=False)
    monkeypatch.setattr(nc, "_candidates", lambda: [])
    with pytest.raises(nc.NvrtcNotFound, match="pip install 'nvidia-cuda-nvrtc"):
        nc.find_nvrtc()
    monkeypatch.undo()
    monkeypatch.setenv("GPUCONV_NVRTC", str(tmp_path / "libnvrtc.so"))   # names a missing file
    with pytest.raises(nc.NvrtcNotFound, match="GPUCONV_NVRTC=.*cannot be loaded"):
        nc.find_nvrtc()


if __name__ == "__main__":  # print the register table
    lib = nc.Nvrtc()
    print(f"NVRTC {lib.version} at {lib.path}")
    rows = {}
    for rep in nc.compile_catalogue(catalogue(), ARCHS, nvrtc=lib):
        for name, (_, res) in rep.kernels.items():
            rows.setdefault((rep.file, name), {})[rep.arch] = res
    print(f"{'file':20} {'kernel':48} " + " ".join(f"{a:>14}" for a in ARCHS))
    for (file, name), per in rows.items():
        print(f"{file:20} {name:48} " + " ".join(
            f"{per[a].registers:5d} r {per[a].local_memory:3d} lm" for a in ARCHS))
    sys.exit(0)
