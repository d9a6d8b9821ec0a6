"""Every kernel file compiles with nvcc for sm_80 and sm_90, exactly the instantiations the
package launches (gpuconv.cuda.KERNELS), with zero register spills. Runs without a GPU.

The translation unit is gpuconv.cuda.instantiation_source(file): the assembled source (headers
inlined, as the loader sends it to NVRTC) plus the address of every name expression (which
instantiates it, as NVRTC's name expressions do) and static_asserts pinning ConvGeom/PoolGeom to
the NumPy dtypes the host packs. ``python tests/test_kernels_compile.py`` prints the register
table.
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

from gpuconv.cuda import COMPILE_OPTIONS, KERNELS, instantiation_source

NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
ARCHS = ("sm_80", "sm_90")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed: cannot compile-check "
                                                     "the CUDA kernels on this machine")

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _demangle(names):
    tool = shutil.which("c++filt")
    if tool is None:
        return {n: None for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    result = {}
    for mangled, d in zip(names, out.splitlines()):
        # "void im2col<float, float>(float const*, ...)" -> "im2col<float, float>"
        m = re.match(r"void (\w+<.*?>)\(", d)
        result[mangled] = m.group(1) if m else None
    return result


def compile_file(file, arch, workdir):
    """nvcc -cubin one kernel file; returns {name expression or mangled name: (regs, spill bytes)}."""
    src = os.path.join(workdir, f"{arch}_{file}")
    with open(src, "w") as f:
        f.write(instantiation_source(file))
    # -ftz=true: CuPy adds it to every NVRTC compile, so registers match what runs.
    cmd = [NVCC, *COMPILE_OPTIONS, "-ftz=true", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
           "-o", src + ".cubin", src]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"nvcc failed for {file} ({arch}):\n{res.stderr}"
    kernels, current = {}, None
    for line in res.stderr.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = m.group(1)
            kernels[current] = [None, None]
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            kernels[current][1] = int(m.group(1)) + int(m.group(2))
        m = _REGS.search(line)
        if m:
            kernels[current][0] = int(m.group(1))
    names = _demangle(list(kernels))
    return {names[k] or k: tuple(v) for k, v in kernels.items()}, res.stderr


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("file", [f for f, _ in KERNELS])
def test_kernel_file_compiles_without_spills(file, arch, tmp_path):
    kernels, log = compile_file(file, arch, str(tmp_path))
    expected = dict(KERNELS)[file]
    assert len(kernels) == len(expected), f"expected {len(expected)} entry functions:\n{log}"
    if shutil.which("c++filt"):
        # demangled names print like the name expressions ("im2col<__half, float>")
        assert sorted(kernels) == sorted(expected)
    for name, (regs, spill) in kernels.items():
        assert regs is not None and spill is not None, f"no ptxas report for {name}:\n{log}"
        assert spill == 0, f"{name} spills {spill} bytes on {arch}"
        assert regs <= 255


def test_kernels_list_is_consistent():
    """Every file in KERNELS ships with the package and names only its own kernels."""
    import importlib.resources
    pkg = importlib.resources.files("gpuconv.kernels")
    seen = set()
    for file, names in KERNELS:
        text = pkg.joinpath(file).read_text()
        assert names and len(set(names)) == len(names)
        for n in names:
            base = n.split("<")[0]
            assert re.search(rf"__global__ void {base}\(", text), f"{base} is not in {file}"
            assert n not in seen
            seen.add(n)
    shipped = {p.name for p in pkg.iterdir() if p.name.endswith(".cu")}
    ours = {f for f, _ in KERNELS}
    assert ours <= shipped


if __name__ == "__main__":  # print the register table
    import tempfile
    if NVCC is None:
        sys.exit("nvcc not found")
    with tempfile.TemporaryDirectory() as d:
        rows = {}
        for file, _ in KERNELS:
            for arch in ARCHS:
                for name, (regs, spill) in compile_file(file, arch, d)[0].items():
                    rows.setdefault((file, name), {})[arch] = (regs, spill)
    print(f"{'file':16} {'kernel':28} " + " ".join(f"{a:>12}" for a in ARCHS))
    for (file, name), per in rows.items():
        cells = " ".join(f"{per[a][0]:>4} regs {per[a][1]:>2}s" if a in per else " " * 12
                         for a in ARCHS)
        print(f"{file:16} {name:28} {cells}")
