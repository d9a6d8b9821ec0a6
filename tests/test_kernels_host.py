"""The CUDA engine on the CPU: its Python unchanged, its kernels compiled for the host
(tests/kernel_host.py), NumPy's matmul standing in for cuBLAS. Checks every kernel's index
arithmetic against the NumPy engine without a GPU; tests/test_cuda_engine.py runs the same checks
on a GPU.
"""
import types

import numpy as np
import pytest

import gpuconv
from gpuconv.engines import cuda_engine as ce

from . import cuda_checks as cc
from . import kernel_host
from .problems import IDS, PROBLEMS

pytestmark = pytest.mark.skipif(kernel_host.CXX is None,
                                reason="g++ is not installed: cannot run the kernels on the host")

_OPS = ("conv_fprop", "conv_dgrad", "conv_wgrad", "pool_fprop", "pool_dgrad", "act_fprop",
        "act_dgrad", "maxout_fprop", "maxout_dgrad")


@pytest.fixture(scope="module")
def _libs(tmp_path_factory):
    return kernel_host.build(str(tmp_path_factory.mktemp("kernels_host")))


@pytest.fixture
def host(_libs, monkeypatch):
    """An Engine running cuda_engine's Python on NumPy arrays with host-compiled kernels."""
    monkeypatch.setattr(ce, "_cp", lambda: np)
    monkeypatch.setattr(ce, "launch", kernel_host.host_launch)
    kernel_host.launches.clear()
    # the un-decorated ops (the decorator only enters the array's CUDA device)
    eng = types.SimpleNamespace(**{n: getattr(ce, n).__wrapped__ for n in _OPS})
    return cc.Engine(eng, dev=lambda a: a, host=np.asarray)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: np.dtype(d).name)
def test_conv(host, case, dtype):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(host, x_shape, w_shape, kwargs, dtype)


@pytest.mark.parametrize("case", PROBLEMS[:6], ids=IDS[:6])
def test_conv_noncontiguous(host, case):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(host, x_shape, w_shape, kwargs, np.float64, noncontig=True)


@pytest.mark.parametrize("dtype", (np.float64, np.float16), ids=("float64", "float16"))
def test_conv_chunked(host, dtype):
    """A 1-byte workspace limit: one image per chunk, same results; the wgrad sum spans chunks."""
    with gpuconv.workspace_limit(1):
        cc.check_conv(host, (5, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2), dtype)
    im2col = [n for n in kernel_host.launches if n.startswith("im2col")]
    dgrad = [n for n in kernel_host.launches if n.startswith("dgrad_col")]
    assert len(im2col) == 2 * 5  # fprop and wgrad, one launch per image
    assert len(dgrad) == 5 * 4   # 4 stride phases (all with taps) per image


def test_conv_unchunked_launches_once(host):
    cc.check_conv(host, (5, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2),
                  np.float32)
    assert sum(n.startswith("im2col") for n in kernel_host.launches) == 2


def test_fp16_wgrad_reduces_in_fp32(host):
    """dw = sum of 4096 products of ones: fp16 partial sums would stop at 2048."""
    p = gpuconv.ConvProblem.from_args((1, 1, 64, 64), (1, 1, 1, 1))
    x = np.ones(p.x_shape, np.float16)
    dw = host.eng.conv_wgrad(p, x, np.ones(p.y_shape, np.float16))
    assert dw.dtype == np.float16 and float(dw.ravel()[0]) == 4096.0
    assert "im2col<__half, float>" in kernel_host.launches


@pytest.mark.parametrize("case", cc.POOL_CASES, ids=[str(c[1]) for c in cc.POOL_CASES])
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: np.dtype(d).name)
def test_pool(host, case, dtype):
    cc.check_pool(host, case[0], case[1], dtype)


@pytest.mark.parametrize("kind,alpha", cc.ACTS, ids=[a[0] for a in cc.ACTS])
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: np.dtype(d).name)
def test_activation(host, kind, alpha, dtype):
    cc.check_act(host, kind, alpha, dtype)


@pytest.mark.parametrize("shape,pieces,axis", cc.MAXOUT_CASES)
@pytest.mark.parametrize("dtype", cc.DTYPES, ids=lambda d: np.dtype(d).name)
def test_maxout(host, shape, pieces, axis, dtype):
    cc.check_maxout(host, shape, pieces, axis, dtype)
