"""The CUDA engine on a GPU against the NumPy engine (skipped, with the reason, without a GPU;
``--require-gpu`` makes the skip a failure). The checks are tests/cuda_checks.py, the same ones
tests/test_kernels_host.py runs on the CPU with host-compiled kernels; here they run through
CuPy, NVRTC and cuBLAS, and the public API's dispatch, devices, streams and errors are checked.
"""
import numpy as np
import pytest

import gpuconv
from gpuconv import cuda as gcuda
from gpuconv import kernel_loader as kl

from . import cuda_checks as cc
from .problems import IDS, PROBLEMS

pytestmark = pytest.mark.gpu


@pytest.fixture
def gpu(cp):
    from gpuconv.engines import cuda_engine
    return cc.Engine(cuda_engine, dev=cp.asarray, host=cp.asnumpy)


@pytest.mark.parametrize("case", PROBLEMS, ids=IDS)
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_conv(gpu, case, dtype):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(gpu, x_shape, w_shape, kwargs, cc.dtype(dtype),
                  seed=cc.seed_of("conv", case[0], dtype))


@pytest.mark.parametrize("case", PROBLEMS[:6], ids=IDS[:6])
@pytest.mark.parametrize("dtype", ("float32", "float16", "bfloat16"))
def test_conv_noncontiguous(gpu, case, dtype):
    _, x_shape, w_shape, kwargs = case
    cc.check_conv(gpu, x_shape, w_shape, kwargs, cc.dtype(dtype), noncontig=True)


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_conv_chunked(gpu, dtype, monkeypatch):
    """A 1-byte workspace limit: one image per chunk, the same results."""
    from gpuconv.engines import cuda_im2col
    names = []
    real = cuda_im2col.launch
    monkeypatch.setattr(cuda_im2col, "launch", lambda n, t, a: (names.append(n), real(n, t, a)))
    with gpuconv.workspace_limit(1):
        cc.check_conv(gpu, (5, 4, 9, 8), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2),
                      cc.dtype(dtype))
    assert sum(n.startswith("im2col") for n in names) == 2 * 5


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_first_generation_outputs_fully_written(gpu, dtype, cp):
    """Every allocation NaN-filled (cuda_checks.nan_filled_memory): an element that the engine's
    kernels leave unwritten fails the comparison, in every op of the first generation."""
    dt = cc.dtype(dtype)
    with cc.nan_filled_memory(cp):
        cc.check_conv(gpu, (3, 4, 11, 9), (6, 2, 3, 3), dict(stride=2, padding=1, groups=2), dt)
        cc.check_conv(gpu, (2, 3, 9, 8), (4, 3, 2, 2), dict(stride=3), dt)  # unreached pixels
        cc.check_pool(gpu, (2, 2, 9, 8), dict(kernel_size=3, stride=2, padding=1), dt)
        cc.check_act(gpu, "elu", 1.3, dt)
        cc.check_maxout(gpu, (2, 6, 3, 4), 3, 1, dt)


def test_conv_large_batch_chunks_by_default_limit(cp):
    """A column matrix of ~1.1 GiB in float32 runs in chunks under the default 1 GiB limit."""
    p = gpuconv.ConvProblem.from_args((160, 64, 56, 56), (64, 64, 3, 3), padding=1)
    assert p.im2col_elements() * 4 > gcuda.get_workspace_limit()
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.uniform(-1, 1, p.x_shape).astype(np.float32))
    w = cp.asarray(rng.uniform(-1, 1, p.w_shape).astype(np.float32))
    y = gpuconv.conv2d(x, w, padding=1)
    # spot-check two images against the NumPy engine
    from gpuconv.engines import numpy_engine
    for n in (0, p.N - 1):
        ref = numpy_engine.conv_fprop(p.with_batch(1), cp.asnumpy(x[n:n + 1]).astype(np.float64),
                                      cp.asnumpy(w).astype(np.float64))
        cc.assert_close(cp.asnumpy(y[n:n + 1]), ref, np.float32, f"image {n}")


def test_fp16_gemm_accumulates_in_fp32(cp):
    """4608 products of ones: exact with fp32 accumulation, stuck at 2048 with fp16 sums.

    This is what we rely on from CuPy's default float16 matmul (cuBLAS COMPUTE_32F)."""
    x = cp.ones((1, 512, 3, 3), cp.float16)
    w = cp.ones((1, 512, 3, 3), cp.float16)
    assert float(gpuconv.conv2d(x, w)[0, 0, 0, 0]) == 4608.0
    dy = cp.ones((1, 1, 64, 64), cp.float16)
    dw = gpuconv.conv2d_grad_weight(cp.ones((1, 1, 64, 64), cp.float16), (1, 1, 1, 1), dy)
    assert float(dw[0, 0, 0, 0]) == 4096.0
    # the centre of dx collects K*R*S = 512*9 = 4608 products
    dx = gpuconv.conv2d_grad_input((1, 1, 3, 3), cp.ones((512, 1, 3, 3), cp.float16),
                                   cp.ones((1, 512, 3, 3), cp.float16), padding=1)
    assert float(dx[0, 0, 1, 1]) == 4608.0


def test_bf16_gemms_accumulate_in_fp32(cp):
    """1 + 256 * 2^-8 = 2 in fp32; a bf16 running sum stays at 1 (1 + 2^-8 rounds to 1)."""
    bf16 = cc.dtype("bfloat16")
    x = np.ones((1, 1, 1, 257), bf16)
    w = np.full((1, 1, 1, 257), 2.0 ** -8, bf16)
    w[..., 0] = 1
    y = gpuconv.conv2d(cp.asarray(x), cp.asarray(w))
    assert y.dtype == bf16 and float(cp.asnumpy(y).astype(np.float64).ravel()[0]) == 2.0


@pytest.mark.parametrize("case", cc.POOL_CASES, ids=[str(c[1]) for c in cc.POOL_CASES])
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_pool(gpu, case, dtype):
    cc.check_pool(gpu, case[0], case[1], cc.dtype(dtype))


@pytest.mark.parametrize("kind,alpha", cc.ACTS, ids=[a[0] for a in cc.ACTS])
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_activation(gpu, kind, alpha, dtype):
    cc.check_act(gpu, kind, alpha, cc.dtype(dtype))


@pytest.mark.parametrize("shape,pieces,axis", cc.MAXOUT_CASES)
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_maxout(gpu, shape, pieces, axis, dtype):
    cc.check_maxout(gpu, shape, pieces, axis, cc.dtype(dtype))


# ---- the public API on CuPy arrays ------------------------------------------------------------
def test_public_api_dispatches_to_cuda(cp):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 4, 9, 8))
    w = rng.uniform(-1, 1, (6, 2, 3, 3))
    b = rng.uniform(-1, 1, 6)
    y = gpuconv.conv2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), stride=2, padding="valid",
                       groups=2)
    assert isinstance(y, cp.ndarray)
    cc.assert_close(cp.asnumpy(y), gpuconv.conv2d(x, w, b, stride=2, groups=2), np.float64,
                    "conv2d")
    yp, idx = gpuconv.max_pool2d(cp.asarray(x), 3, 2, 1, return_indices=True)
    yp_ref, idx_ref = gpuconv.max_pool2d(x, 3, 2, 1, return_indices=True)
    np.testing.assert_array_equal(cp.asnumpy(idx), idx_ref)
    np.testing.assert_array_equal(cp.asnumpy(yp), yp_ref)
    np.testing.assert_allclose(cp.asnumpy(gpuconv.elu(cp.asarray(x), 0.5)), gpuconv.elu(x, 0.5))


def test_runs_on_the_current_stream(cp):
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    w = rng.uniform(-1, 1, (4, 3, 3, 3)).astype(np.float32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        y = gpuconv.conv2d(cp.asarray(x), cp.asarray(w), padding=1)
        dx = gpuconv.conv2d_grad_input(x.shape, cp.asarray(w), y, padding=1)
    s.synchronize()
    cc.assert_close(cp.asnumpy(y), gpuconv.conv2d(x.astype(np.float64), w.astype(np.float64),
                                                  padding=1), np.float32, "conv2d on a stream")
    assert dx.shape == x.shape


def test_result_stays_on_the_input_device(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs to tell devices apart")
    with cp.cuda.Device(1):
        x = cp.ones((1, 2, 5, 5), cp.float32)
        w = cp.ones((3, 2, 3, 3), cp.float32)
    y = gpuconv.conv2d(x, w)  # current device is 0
    assert y.device.id == 1
    assert float(y[0, 0, 0, 0]) == 18.0


def test_precompile_compiles_every_kernel(cp):
    """Both generations: the whole catalogue, every name resolving to a kernel handle."""
    names = gpuconv.precompile()
    assert names == [n for _, ns, _ in gcuda.catalogue() for n in ns]
    assert len(names) > sum(len(ns) for _, ns in gcuda.KERNELS)  # the second generation too
    assert all(gcuda.get_kernel(n) is not None for n in names)
    assert gpuconv.cuda_available()


def test_compile_error_names_file_and_log(cp, monkeypatch):
    monkeypatch.setitem(kl._catalogue, "broken.cu", (("k<float>",), ()))
    monkeypatch.setattr(kl, "kernel_source",
                        lambda f, read=None: "template <typename T> __global__ void k(T* p) "
                                             "{ p[0] = undeclared_name; }")
    with pytest.raises(gcuda.KernelCompileError, match=r"(?s)kernels/broken\.cu.*undeclared_name"):
        kl._module(cp, "broken.cu")


def test_bfloat16_through_the_public_api(cp):
    """CuPy bf16 arrays (ml_dtypes.bfloat16) run every op, results in bf16 on the GPU."""
    bf16 = cc.dtype("bfloat16")
    rng = np.random.default_rng(cc.seed_of("bf16 api"))
    x = rng.uniform(-1, 1, (2, 4, 9, 8)).astype(bf16)
    w = rng.uniform(-1, 1, (6, 2, 3, 3)).astype(bf16)
    b = rng.uniform(-1, 1, 6).astype(bf16)
    y = gpuconv.conv2d(cp.asarray(x), cp.asarray(w), cp.asarray(b), stride=2, groups=2)
    assert isinstance(y, cp.ndarray) and y.dtype == bf16
    ref = gpuconv.conv2d(cc.f64(x), cc.f64(w), cc.f64(b), stride=2, groups=2)
    cc.assert_close(cp.asnumpy(y), ref, bf16, "conv2d bf16")
    yp = gpuconv.max_pool2d(cp.asarray(x), 3, 2, 1)
    np.testing.assert_array_equal(cc.f64(cp.asnumpy(yp)), gpuconv.max_pool2d(cc.f64(x), 3, 2, 1))
    r = gpuconv.relu(cp.asarray(x))
    assert r.dtype == bf16
    np.testing.assert_array_equal(cc.f64(cp.asnumpy(r)), np.maximum(cc.f64(x), 0))
