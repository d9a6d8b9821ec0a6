"""The pure-Python parts of the CUDA loader and engine (no GPU needed): source assembly, the
kernel catalogue, compile-error wrapping (NVRTC logs, missing CUDA headers or NVRTC), geometry
packing, workspace chunking, the algorithm registry, and what `import gpuconv` does with CuPy
installed but no driver (or no CuPy)."""
import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gpuconv
from gpuconv import ConvProblem, PoolProblem
from gpuconv import cuda as gcuda
from gpuconv import kernel_loader as kl
from gpuconv.engines import cuda_engine as ce
from gpuconv.engines import cuda_igemm, cuda_registry


# ---- sources ------------------------------------------------------------------------------------
def test_headers_are_inlined_once_and_system_includes_kept():
    files = {"a.cu": '#include "h.cuh"\n#include "h.cuh"\nKERNEL\n',
             "h.cuh": '#pragma once\n#include <cuda_fp16.h>\n#include "g.cuh"\nHEADER\n',
             "g.cuh": "INNER\n"}
    src = gcuda.kernel_source("a.cu", read=files.__getitem__)
    assert src.count("HEADER") == 1 and src.count("INNER") == 1 and "KERNEL" in src
    assert not re.search(r'^\s*#\s*include\s*"', src, re.M) and "#pragma once" not in src
    assert "#include <cuda_fp16.h>" in src
    assert src.index("INNER") < src.index("HEADER") < src.index("KERNEL")


def test_editing_a_header_changes_the_source_text():
    """CuPy's cache key is the source text: a header edit must reach it."""
    files = {"a.cu": '#include "h.cuh"\nK\n', "h.cuh": "int v = 1;\n"}
    before = gcuda.kernel_source("a.cu", read=files.__getitem__)
    files["h.cuh"] = "int v = 2;\n"
    assert gcuda.kernel_source("a.cu", read=files.__getitem__) != before


@pytest.mark.parametrize("file", [f for f, _ in gcuda.KERNELS])
def test_packaged_sources_assemble(file):
    src = gcuda.kernel_source(file)
    assert not re.search(r'^\s*#\s*include\s*"', src, re.M)
    assert "struct ConvGeom" in src and f"gpuconv kernel file: {file}" in src
    for name in dict(gcuda.KERNELS)[file]:
        assert f"void {name.split('<')[0]}(" in src


def test_kernel_list_covers_every_dtype_and_op():
    names = {n for _, ns in gcuda.KERNELS for n in ns}
    for base in ("maxpool_fprop", "maxpool_dgrad", "act_fprop", "act_dgrad", "maxout_fprop",
                 "maxout_dgrad"):
        for t in ("float", "double", "gc_half", "gc_bf16"):
            assert f"{base}<{t}>" in names
    for base in ("im2col", "gemm_to_nchw", "dgrad_col"):  # <T, the GEMM's type>
        for pair in ("float, float", "double, double", "gc_half, gc_half", "gc_bf16, float"):
            assert f"{base}<{pair}>" in names
    assert "im2col<gc_half, float>" in names  # the fp32-reduction wgrad variant
    assert {"convert<gc_bf16, float>", "convert<float, gc_bf16>"} <= names


def test_catalogue_holds_every_generation_and_precompile_takes_it_all(monkeypatch):
    from gpuconv.engines import cuda_igemm3
    cat = gcuda.catalogue()
    files = [f for f, _, _ in cat]
    assert len(files) == len(set(files))
    assert set(files) == ({f for f, _ in gcuda.KERNELS} | {f for f, _ in cuda_igemm.IGEMM_KERNELS}
                          | {f for f, _ in cuda_igemm3.IGEMM3_KERNELS})
    by_file = {f: (names, structs) for f, names, structs in cat}
    for f, names in gcuda.KERNELS:
        assert by_file[f] == (names, gcuda.STRUCTS)
    for f, names in cuda_igemm.IGEMM_KERNELS:
        assert by_file[f] == (names, cuda_igemm.STRUCTS)
    for f, names in cuda_igemm3.IGEMM3_KERNELS:
        assert by_file[f] == (names, cuda_igemm3.STRUCTS)
    # every shipped .cu file is catalogued: nothing the package ships goes uncompiled
    import importlib.resources
    shipped = {e.name for e in importlib.resources.files("gpuconv.kernels").iterdir()
               if e.name.endswith(".cu")}
    assert shipped == set(files)
    # precompile asks the loader for exactly the catalogue, in order (no device needed here)
    asked = []
    monkeypatch.setattr(kl, "require_cuda", lambda: _FakeCupy)
    monkeypatch.setattr(kl, "get_kernel", asked.append)
    assert gcuda.precompile() == [n for _, names, _ in cat for n in names] == asked


class _FakeCupy:
    """Just enough of cupy for the loader's control flow: device 0, a no-op Device context."""
    class cuda:
        class runtime:
            @staticmethod
            def getDevice():
                return 0

        class Device:
            def __init__(self, i):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False


def test_catalogue_rejects_conflicting_entries(monkeypatch):
    f, names, structs = gcuda.catalogue()[0]
    kl.add_kernels(f, names, structs)  # the same entry again: a no-op
    with pytest.raises(ValueError, match="already catalogued with other"):
        kl.add_kernels(f, names[:1], structs)
    with pytest.raises(ValueError, match="already catalogued under"):
        kl.add_kernels("other.cu", names[:1])
    assert "other.cu" not in {x for x, _, _ in gcuda.catalogue()}
    monkeypatch.setattr(kl, "require_cuda", lambda: _FakeCupy)
    with pytest.raises(KeyError, match="not a catalogued kernel"):
        kl.get_kernel("nope<float>")


def test_kernel_handles_are_cached_per_device(monkeypatch):
    """One RawKernel per (device, name): a launch after the first costs no module lookup."""
    made = []

    class Module:
        def get_function(self, name):
            made.append(name)
            return object()

    monkeypatch.setattr(kl, "require_cuda", lambda: _FakeCupy)
    monkeypatch.setattr(kl, "_module", lambda cupy, file: Module())
    monkeypatch.setattr(kl, "_functions", {})
    name = cuda_igemm.igemm_name("fprop", "float", 0, cuda_igemm.IGEMM_CONFIGS[("float", 0)][0])
    first = cuda_igemm.get_kernel(name)
    assert cuda_igemm.get_kernel(name) is first and made == [name]


def test_ctype_and_acc_dtype():
    assert gcuda.ctype(np.float16) == "gc_half" and gcuda.ctype("float64") == "double"
    assert gcuda.ctype("bfloat16") == "gc_bf16"
    assert gcuda.acc_dtype(np.float16) == np.float32 and gcuda.acc_dtype(np.float64) == np.float64
    assert gcuda.acc_dtype("bfloat16") == np.float32
    with pytest.raises(TypeError, match="no kernels for dtype int32"):
        gcuda.ctype(np.int32)


def test_kernels_include_no_system_header():
    """A driver-only install may have no CUDA headers: the kernels must need none (16-bit types
    are raw bits with PTX conversions), so NVRTC compiles them with CuPy's [ctk] wheels alone."""
    for f, _, _ in gcuda.catalogue():
        assert not re.search(r"^\s*#\s*include\s*<", gcuda.kernel_source(f), re.M), f


# ---- compile errors ------------------------------------------------------------------------------
class _FakeCompileException(Exception):
    def get_message(self):
        return 'error: identifier "oops" is undefined'


def test_compile_error_names_the_file_options_and_log():
    err = gcuda.compile_error("pool.cu", ("-std=c++17",), _FakeCompileException())
    assert isinstance(err, gcuda.KernelCompileError)
    msg = str(err)
    assert "kernels/pool.cu" in msg and "-std=c++17" in msg and '"oops" is undefined' in msg


def test_compile_error_from_cupys_exception():
    pytest.importorskip("cupy")
    from cupy.cuda.compiler import CompileException
    exc = CompileException("NVRTC log: expected a ';'", "src", "name", ("-std=c++17",))
    assert "expected a ';'" in str(gcuda.compile_error("conv_dgrad.cu", ("-std=c++17",), exc))


# ---- a driver but no CUDA toolkit: CuPy's failures, named with the extra that fixes them -------
def test_install_hint_names_the_extra_of_the_installed_cupy(monkeypatch):
    import importlib.metadata as md

    def version(dist):
        if dist == "cupy-cuda12x":
            return "14.2.0"
        raise md.PackageNotFoundError(dist)

    monkeypatch.setattr(md, "version", version)
    assert kl.install_hint() == 'pip install "gpuconv[cuda12]"'
    monkeypatch.setattr(md, "version", lambda d: (_ for _ in ()).throw(md.PackageNotFoundError(d)))
    assert "gpuconv[cuda13]" in kl.install_hint() and "gpuconv[cuda12]" in kl.install_hint()


class _RaisingCupy(_FakeCupy):
    """cupy whose RawModule raises `exc` when it compiles, as CuPy 14 does without a toolkit."""
    exc = None

    class cuda(_FakeCupy.cuda):
        class compiler:
            class CompileException(Exception):
                pass

    @classmethod
    def RawModule(cls, **kw):
        raise cls.exc


@pytest.mark.parametrize("exc,kind,words", [
    (RuntimeError("Failed to find CUDA headers"), "compile", "no CUDA headers"),
    (_RaisingCupy.cuda.compiler.CompileException(
        'kernel.cu(1): catastrophic error: cannot open source file "cuda_fp16.h"'),
     "compile", "no CUDA headers"),
    (OSError("libnvrtc.so.13: cannot open shared object file: No such file or directory"),
     "unavailable", "cannot load NVRTC"),
    (RuntimeError("CuPy failed to load libnvrtc.so.12: not found"), "unavailable",
     "cannot load NVRTC"),
])
def test_missing_toolkit_surfaces_as_gpuconv_errors_naming_the_extra(monkeypatch, exc, kind,
                                                                      words):
    monkeypatch.setattr(_RaisingCupy, "exc", exc)
    monkeypatch.setattr(kl, "install_hint", lambda: 'pip install "gpuconv[cuda13]"')
    monkeypatch.setattr(kl, "_modules", {})
    want = kl.KernelCompileError if kind == "compile" else kl.CudaUnavailableError
    with pytest.raises(want) as info:
        kl._module(_RaisingCupy, "pool.cu")
    msg = str(info.value)
    assert words in msg and 'pip install "gpuconv[cuda13]"' in msg and "[ctk]" in msg, msg
    assert "kernels/pool.cu" in msg or kind == "unavailable"


def test_other_cupy_failures_pass_through(monkeypatch):
    monkeypatch.setattr(_RaisingCupy, "exc", RuntimeError("cudaErrorMemoryAllocation"))
    monkeypatch.setattr(kl, "_modules", {})
    with pytest.raises(RuntimeError, match="cudaErrorMemoryAllocation") as info:
        kl._module(_RaisingCupy, "pool.cu")
    assert not isinstance(info.value, (kl.KernelCompileError, kl.CudaUnavailableError))


# ---- geometry -----------------------------------------------------------------------------------
def test_conv_geom_packs_the_problem():
    p = ConvProblem.from_args((3, 4, 9, 8), (6, 2, 4, 3), stride=1, padding="same", dilation=2,
                              groups=2)
    g = gcuda.conv_geom(p)
    assert g.shape == (1,) and g.dtype.itemsize == 8 * len(gcuda.CONV_GEOM_FIELDS)
    for f in gcuda.CONV_GEOM_FIELDS:
        assert int(g[f][0]) == getattr(p, f), f
    assert (int(g["pad_h"][0]), int(g["pad_h_end"][0])) == (3, 3)  # dil 2 * (4-1) = 6
    assert (int(g["pad_w"][0]), int(g["pad_w_end"][0])) == (2, 2)


def test_pool_geom_packs_the_problem():
    pp = PoolProblem.from_args((2, 3, 9, 8), 3, 2, 1, ceil_mode=True)
    g = gcuda.pool_geom(pp)
    for f in gcuda.POOL_GEOM_FIELDS:
        assert int(g[f][0]) == getattr(pp, f), f


# ---- workspace ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,per,limit,expected", [
    (10, 100, 1000, 10), (10, 100, 999, 9), (10, 100, 100, 1), (10, 100, 1, 1),
    (3, 10, 10**9, 3), (7, 0, 5, 7)])
def test_batch_chunk(n, per, limit, expected):
    assert gcuda.batch_chunk(n, per, limit) == expected


def test_workspace_limit_env_setter_and_context(monkeypatch):
    monkeypatch.delenv("GPUCONV_WORKSPACE_BYTES", raising=False)
    assert gpuconv.get_workspace_limit() == 1 << 30
    monkeypatch.setenv("GPUCONV_WORKSPACE_BYTES", "12345")
    assert gpuconv.get_workspace_limit() == 12345
    with gpuconv.workspace_limit(77):
        assert gpuconv.get_workspace_limit() == 77
        assert gcuda.batch_chunk(100, 10) == 7
    assert gpuconv.get_workspace_limit() == 12345
    gpuconv.set_workspace_limit(5)
    try:
        assert gpuconv.get_workspace_limit() == 5
    finally:
        gpuconv.set_workspace_limit(None)
    assert gpuconv.get_workspace_limit() == 12345
    monkeypatch.setenv("GPUCONV_WORKSPACE_BYTES", "lots")
    with pytest.raises(ValueError, match="GPUCONV_WORKSPACE_BYTES"):
        gpuconv.get_workspace_limit()


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-3, ValueError), (1.5, TypeError),
                                     (True, TypeError), ("1GB", TypeError)])
def test_workspace_limit_rejects_bad_values(bad, exc):
    with pytest.raises(exc):
        gpuconv.set_workspace_limit(bad)
    assert kl._workspace_override is None


def test_launch_of_nothing_touches_no_device():
    gcuda.launch("im2col<float, float>", 0, ())  # would need CuPy and a GPU otherwise


# ---- algorithm registry -------------------------------------------------------------------------
@pytest.fixture
def registry():
    saved = {op: dict(a) for op, a in ce.ALGORITHMS.items()}
    sel = dict(cuda_registry._selected)
    yield ce
    for op in ce.ALGORITHMS:
        ce.ALGORITHMS[op].clear()
        ce.ALGORITHMS[op].update(saved[op])
    cuda_registry._selected.update(sel)
    ce.set_auto_policy(None)


def test_registry_defaults(registry):
    p = ConvProblem.from_args((1, 1, 5, 5), (1, 1, 3, 3))
    for op in ("fprop", "dgrad", "wgrad"):
        assert "im2col_gemm" in ce.ALGORITHMS[op]
        assert ce.get_algorithm(op) == "auto"
        assert ce.select(op, p, np.float32)[0] == "im2col_gemm"


def test_registry_register_select_and_context(registry):
    p = ConvProblem.from_args((1, 1, 5, 5), (1, 1, 3, 3))
    fn = lambda p, x, w, b: "mine"  # noqa: E731
    ce.register_algorithm("fprop", "mine", fn)
    with pytest.raises(ValueError, match="already registered"):
        ce.register_algorithm("fprop", "mine", fn)
    with pytest.raises(ValueError, match="reserved"):
        ce.register_algorithm("fprop", "auto", fn)
    with ce.use_algorithm("fprop", "mine"):
        assert ce.select("fprop", p, np.float32) == ("mine", fn)
    assert ce.get_algorithm("fprop") == "auto"
    ce.set_auto_policy(lambda op, p, dtype: "mine" if op == "fprop" else "im2col_gemm")
    assert ce.select("fprop", p, np.float16)[0] == "mine"
    assert ce.select("wgrad", p, np.float16)[0] == "im2col_gemm"
    with pytest.raises(ValueError, match="unknown fprop algorithm 'nope'"):
        ce.set_algorithm("fprop", "nope")
    with pytest.raises(ValueError, match="op must be one of"):
        ce.set_algorithm("pool", "auto")
    ce.set_auto_policy(lambda op, p, dtype: "missing")
    with pytest.raises(ValueError, match="not registered"):
        ce.select("dgrad", p, np.float32)


def test_registry_refuses_a_forced_algorithm_outside_its_domain(registry):
    p = ConvProblem.from_args((1, 2, 5, 5), (2, 2, 3, 3))
    with ce.use_algorithm("fprop", "igemm_simt_128x128"):
        assert ce.select("fprop", p, np.float32)[0] == "igemm_simt_128x128"
        with pytest.raises(ValueError, match="'igemm_simt_128x128' does not support .* float16"):
            ce.select("fprop", p, np.float16)  # the SIMT path has no fp16 data type


# ---- no driver / no CuPy ------------------------------------------------------------------------
def _run(code, tmp_path):
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path / "cupy-cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(gpuconv.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=120)


_NUMPY_STILL_WORKS = """
import sys, numpy as np, gpuconv
assert sys.modules.get("cupy") is None, "import gpuconv imported cupy"
y = gpuconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))
assert y.tolist() == [[[[4.0, 4.0], [4.0, 4.0]]]]
assert gpuconv.cuda_available() is False
for f in (gpuconv.require_cuda, gpuconv.precompile):
    try:
        f()
    except gpuconv.CudaUnavailableError as e:
        print("ERROR:", e)
    else:
        raise SystemExit("no error")
"""


def test_cupy_without_driver(tmp_path):
    if importlib.util.find_spec("cupy") is None:
        pytest.skip("CuPy is not installed")
    if gcuda.cuda_available():
        pytest.skip("a CUDA driver and device are present")
    res = _run(_NUMPY_STILL_WORKS, tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stdout.splitlines() if l.startswith("ERROR:")]
    assert len(lines) == 2
    assert all("driver" in l or "device" in l for l in lines), lines
    cli = _run("from gpuconv.cuda import _main; raise SystemExit(_main(['--precompile']))",
               tmp_path)
    assert cli.returncode == 1 and "CUDA engine is unavailable" in cli.stderr


def test_catalogue_is_complete_in_a_fresh_process(tmp_path):
    """`import gpuconv.cuda` alone catalogues both generations (registration is by import), and
    `import gpuconv` loads neither the loader nor the engine."""
    res = _run("import sys, gpuconv\n"
               "assert 'gpuconv.kernel_loader' not in sys.modules\n"
               "assert 'gpuconv.engines.cuda_engine' not in sys.modules\n"
               "import gpuconv.cuda as c\n"
               "print(sorted((f, len(n)) for f, n, _ in c.catalogue()))", tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(sorted((f, len(n)) for f, n, _ in gcuda.catalogue()))


def test_without_cupy(tmp_path):
    res = _run("import sys; sys.modules['cupy'] = None\n" + _NUMPY_STILL_WORKS, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("CuPy is not installed") == 2
