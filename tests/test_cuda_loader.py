"""The pure-Python parts of the CUDA loader and engine (no GPU needed): source assembly, the
kernel list, compile-error wrapping, geometry packing, workspace chunking, the algorithm
registry, and what `import gpuconv` does with CuPy installed but no driver (or no CuPy)."""
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
from gpuconv.engines import cuda_engine as ce


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
    for base in ("gemm_to_nchw", "dgrad_col", "maxpool_fprop", "maxpool_dgrad", "act_fprop",
                 "act_dgrad", "maxout_fprop", "maxout_dgrad"):
        for t in ("float", "double", "__half"):
            assert f"{base}<{t}>" in names
    assert "im2col<__half, float>" in names  # the fp32-reduction wgrad variant


def test_ctype_and_acc_dtype():
    assert gcuda.ctype(np.float16) == "__half" and gcuda.ctype("float64") == "double"
    assert gcuda.acc_dtype(np.float16) == np.float32 and gcuda.acc_dtype(np.float64) == np.float64
    with pytest.raises(TypeError, match="no kernels for dtype int32"):
        gcuda.ctype(np.int32)


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
    assert gcuda._workspace_override is None


def test_launch_of_nothing_touches_no_device():
    gcuda.launch("im2col<float, float>", 0, ())  # would need CuPy and a GPU otherwise


# ---- algorithm registry -------------------------------------------------------------------------
@pytest.fixture
def registry():
    saved = {op: dict(a) for op, a in ce.ALGORITHMS.items()}
    sel = dict(ce._selected)
    yield ce
    for op in ce.ALGORITHMS:
        ce.ALGORITHMS[op].clear()
        ce.ALGORITHMS[op].update(saved[op])
    ce._selected.update(sel)
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


def test_without_cupy(tmp_path):
    res = _run("import sys; sys.modules['cupy'] = None\n" + _NUMPY_STILL_WORKS, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("CuPy is not installed") == 2
