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
from gpuconv.engines import cuda_im2col

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
    for mod in (ce, cuda_im2col):  # the engine's ops and the first generation's algorithms
        monkeypatch.setattr(mod, "_cp", lambda: np)
        monkeypatch.setattr(mod, "launch", kernel_host.host_launch)
    kernel_host.launches.clear()
    # the un-decorated ops (the decorator only enters the array's CUDA device)
    eng = types.SimpleNamespace(**{n: getattr(ce, n).__wrapped__ for n in _OPS})
    return cc.Engine(eng, dev=lambda a: a, host=np.asarray)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_conv(host, case, dtype):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(host, x_shape, w_shape, kwargs, cc.dtype(dtype))


@pytest.mark.parametrize("case", PROBLEMS[:6], ids=IDS[:6])
def test_conv_noncontiguous(host, case):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(host, x_shape, w_shape, kwargs, np.float64, noncontig=True)


@pytest.mark.parametrize("dtype", ("float64", "float16", "bfloat16"))
def test_conv_chunked(host, dtype):
    """A 1-byte workspace limit: one image per chunk, same results; the wgrad sum spans chunks."""
    with gpuconv.workspace_limit(1):
        cc.check_conv(host, (5, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2),
                      cc.dtype(dtype))
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
    assert "im2col<gc_half, float>" in kernel_host.launches


def test_bf16_gemms_run_in_fp32(host):
    """bfloat16 has 8 significant bits: 1 + 2^-8 is not representable, yet each of its GEMMs sums
    in fp32 (the columns and weights reach the GEMM as fp32) and rounds once."""
    bf16 = cc.dtype("bfloat16")
    p = gpuconv.ConvProblem.from_args((1, 1, 1, 257), (1, 1, 1, 257))
    x = np.ones(p.x_shape, bf16)
    w = np.full(p.w_shape, 2.0 ** -8, bf16)
    w[..., 0] = 1
    # fp32: 1 + 256 * 2^-8 = 2 exactly; a bf16 running sum would stay at 1 (1 + 2^-8 rounds to 1)
    y = host.eng.conv_fprop(p, x, w, None)
    assert y.dtype == bf16 and float(y.ravel()[0]) == 2.0
    assert "im2col<gc_bf16, float>" in kernel_host.launches
    assert "gemm_to_nchw<gc_bf16, float>" in kernel_host.launches
    dx = host.eng.conv_dgrad(p, w, np.ones(p.y_shape, bf16))
    assert dx.dtype == bf16 and float(dx.ravel()[0]) == 1.0
    dw = host.eng.conv_wgrad(p, x, np.ones(p.y_shape, bf16))
    assert dw.dtype == bf16 and float(dw.ravel()[0]) == 1.0


@pytest.mark.parametrize("case", cc.POOL_CASES, ids=[str(c[1]) for c in cc.POOL_CASES])
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_pool(host, case, dtype):
    cc.check_pool(host, case[0], case[1], cc.dtype(dtype))


@pytest.mark.parametrize("kind,alpha", cc.ACTS, ids=[a[0] for a in cc.ACTS])
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_activation(host, kind, alpha, dtype):
    cc.check_act(host, kind, alpha, cc.dtype(dtype))


@pytest.mark.parametrize("shape,pieces,axis", cc.MAXOUT_CASES)
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_maxout(host, shape, pieces, axis, dtype):
    cc.check_maxout(host, shape, pieces, axis, cc.dtype(dtype))
