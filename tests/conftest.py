"""Shared test setup: a CuPy cache in a temp dir, and the `gpu` marker.

GPU tests are marked ``@pytest.mark.gpu`` and skipped, with the probe's reason, where no usable
GPU exists. ``--require-gpu`` (or ``GPUCONV_REQUIRE_GPU=1``) turns that skip into a failure, for
the GPU machine, so GPU tests can never skip silently there.
"""
import os
import tempfile

import pytest

os.environ.setdefault("CUPY_CACHE_DIR", os.path.join(tempfile.gettempdir(), "gpuconv-cupy-cache"))


def _probe_gpu():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken install
        return None, f"CuPy is not importable ({type(e).__name__}: {e})"
    try:
        if not cupy.is_available():
            return None, "CuPy is installed but no CUDA device/driver is available"
        cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return None, f"no usable CUDA device ({type(e).__name__}: {e})"
    return cupy, None


CUPY, GPU_SKIP_REASON = _probe_gpu()


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true", default=False,
                     help="fail, instead of skipping, GPU tests when no GPU is usable")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and CuPy")


def _gpu_required(config):
    return config.getoption("--require-gpu") or os.environ.get("GPUCONV_REQUIRE_GPU") == "1"


def pytest_collection_modifyitems(config, items):
    # third-generation GPU tests last (stable sort): kernels never run on a GPU before may fault,
    # and a fault takes the CUDA context -- every later GPU test of the process -- down with it
    items.sort(key=lambda it: "gpu" in it.keywords and "igemm3" in it.nodeid)
    if CUPY is not None or _gpu_required(config):
        return
    skip = pytest.mark.skip(reason=f"GPU test: {GPU_SKIP_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _gpu_guard(request):
    """Reached by a gpu test without a GPU only under --require-gpu: fail with the reason."""
    if CUPY is None and "gpu" in request.node.keywords:
        pytest.fail(f"--require-gpu given but {GPU_SKIP_REASON}")


@pytest.fixture
def cp():
    """The cupy module (GPU tests only)."""
    return CUPY
