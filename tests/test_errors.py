"""Bad input is a ValueError or TypeError whose message names the argument and what was expected."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv.problem import ConvProblem

X = np.ones((2, 4, 8, 8), np.float32)
W = np.ones((6, 4, 3, 3), np.float32)
DY = np.ones((2, 6, 6, 6), np.float32)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: gc.conv2d(X[0], W), ValueError, r"input must be a 4-D array"),
    (lambda: gc.conv2d(X, W[0]), ValueError, r"weight must be a 4-D array"),
    (lambda: gc.conv2d(X, np.ones((6, 3, 3, 3), np.float32)), ValueError,
     r"weight has 3 input channels.*expected weight.shape\[1\] == 4"),
    (lambda: gc.conv2d(X, np.ones((6, 2, 3, 3), np.float32), groups=3), ValueError,
     r"in_channels \(4\) must be divisible by groups \(3\)"),
    (lambda: gc.conv2d(X, np.ones((5, 2, 3, 3), np.float32), groups=2), ValueError,
     r"out_channels \(5\) must be divisible by groups \(2\)"),
    (lambda: gc.conv2d(X, np.ones((6, 4, 9, 3), np.float32)), ValueError,
     r"kernel height.*larger than the padded input height"),
    (lambda: gc.conv2d(X, W, dilation=5), ValueError, r"kernel height with dilation \(11\)"),
    (lambda: gc.conv2d(X, W, stride=0), ValueError, r"stride must be >= 1"),
    (lambda: gc.conv2d(X, W, dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
    (lambda: gc.conv2d(X, W, padding=-1), ValueError, r"padding must be non-negative"),
    (lambda: gc.conv2d(X, W, padding=(1, 2, 3)), ValueError, r"padding must be an int or a pair"),
    (lambda: gc.conv2d(X, W, padding="full"), ValueError, r"padding must be an int, a pair"),
    (lambda: gc.conv2d(X, W, stride=1.5), TypeError, r"stride must be an int"),
    (lambda: gc.conv2d(X, W, groups=0), ValueError, r"groups must be a positive int"),
    (lambda: gc.conv2d(X, W, padding="same", stride=2), ValueError,
     r"padding='same' requires stride 1"),
    (lambda: gc.conv2d(X.astype(np.int32), W), TypeError, r"input has dtype int32"),
    (lambda: gc.conv2d(X, W.astype(np.float64)), TypeError,
     r"weight has dtype float64 but input has dtype float32"),
    (lambda: gc.conv2d(X.astype(np.float16), W.astype(np.float16)), TypeError,
     r"float16 and bfloat16 run on the GPU only"),
    (lambda: gc.conv2d(X.tolist(), W), TypeError, r"expected a numpy.ndarray or cupy.ndarray"),
    (lambda: gc.conv2d(X, W, bias=np.ones(5, np.float32)), ValueError,
     r"bias must have shape \(6,\)"),
    (lambda: gc.conv2d(X, W, bias=np.ones((6, 1), np.float32)), ValueError,
     r"bias must be a 1-D array"),
    (lambda: gc.conv2d_grad_input(X.shape, W, DY[:, :, :5]), ValueError,
     r"grad_output must have shape \(2, 6, 6, 6\)"),
    (lambda: gc.conv2d_grad_input((2, 4, 8), W, DY), ValueError, r"input must have 4 dim"),
    (lambda: gc.conv2d_grad_input(X.shape, W, DY.astype(np.float64)), TypeError,
     r"grad_output has dtype float64"),
    (lambda: gc.conv2d_grad_weight(X, (6, 4, 3), DY), ValueError, r"weight must have 4 dim"),
    (lambda: gc.conv2d_grad_weight(X, W.shape, DY[:1]), ValueError,
     r"grad_output must have shape"),
    (lambda: gc.conv2d_grad_weight(X, (6, 4, 0, 3), DY), ValueError,
     r"weight must have positive sizes"),
    (lambda: gc.conv2d(np.ones((0, 0, 8, 8), np.float32), W), ValueError,
     r"input must have a batch size >= 0 and positive other sizes"),  # a batch of 0 is valid
    (lambda: gc.conv2d_grad_input((-1, 4, 8, 8), W, DY), ValueError,
     r"input must have a batch size >= 0"),
    (lambda: ConvProblem(-1, 4, 8, 8, 6, 3, 3), ValueError, r"N must be >= 0, got -1"),
    (lambda: gc.conv2d_grad_input((0, 4, 8, 8), W, DY), ValueError,
     r"grad_output must have shape \(0, 6, 6, 6\)"),
    (lambda: gc.max_pool2d(X, 3, padding=2), ValueError,
     r"padding should be at most half of kernel_size"),
    (lambda: gc.max_pool2d(X, 9), ValueError, r"window is larger than the padded input"),
    (lambda: gc.max_pool2d(X, 0), ValueError, r"kernel_size must be >= 1"),
    (lambda: gc.max_pool2d(X[0], 2), ValueError, r"input must be a 4-D array"),
    (lambda: gc.max_pool2d_backward(DY, np.zeros(DY.shape, np.int64), X.shape, 2), ValueError,
     r"grad_output must have shape \(2, 4, 4, 4\)"),
    (lambda: gc.max_pool2d_backward(np.ones((2, 4, 4, 4), np.float32),
                                    np.zeros((2, 4, 4, 4), np.int32), X.shape, 2), TypeError,
     r"indices must be the int64 array"),
    (lambda: gc.maxout(X, 3), ValueError, r"must be divisible by pieces \(3\)"),
    (lambda: gc.maxout(X, 0), ValueError, r"pieces must be a positive int"),
    (lambda: gc.maxout(X, 2, axis=4), ValueError, r"axis 4 is out of range"),
    (lambda: gc.leaky_relu(X, negative_slope="a"), TypeError, r"negative_slope must be a real"),
    (lambda: gc.relu(X.astype(np.int64)), TypeError, r"input has dtype int64"),
    (lambda: gc.sigmoid_backward(X, DY), ValueError, r"grad_output must have shape"),
])
def test_bad_input_raises_a_clear_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_conv_problem_sizes_and_ops():
    p = ConvProblem.from_args((8, 64, 56, 56), (128, 64, 3, 3), stride=2, padding=1)
    assert (p.P, p.Q) == (28, 28)
    assert p.gemm_shape("fprop") == (1, 8 * 28 * 28, 128, 64 * 9)
    assert p.gemm_shape("dgrad") == (1, 8 * 56 * 56, 64, 128 * 9)
    assert p.gemm_shape("wgrad") == (1, 128, 64 * 9, 8 * 28 * 28)
    assert p.flops("dgrad") == 2 * 8 * 128 * 64 * 9 * 28 * 28
    with pytest.raises(ValueError, match="op must be one of"):
        p.flops("bwd")
    # floor division, not C truncation: H=2, R=3, pad 0 is invalid; pad 1 gives P=1 at stride 2
    assert ConvProblem.from_args((1, 1, 2, 2), (1, 1, 3, 3), stride=2, padding=1).P == 1
    s = ConvProblem.from_args((1, 1, 6, 6), (1, 1, 4, 4), padding="same")
    assert (s.pad_h, s.pad_h_end, s.P) == (1, 2, 6)
    assert p.with_batch(3).N == 3 and p.with_batch(3).P == 28


def test_mixed_numpy_and_other_arrays_rejected():
    class FakeArray:
        shape, ndim, dtype = (6, 4, 3, 3), 4, np.dtype(np.float32)
    with pytest.raises(TypeError, match="expected a numpy.ndarray or cupy.ndarray"):
        gc.conv2d(X, FakeArray())


def test_bfloat16_numpy_arrays_are_a_clear_type_error():
    """bf16 computes on the GPU only (fp32 accumulation); a NumPy bf16 array says so and names
    the two ways out, instead of silently running an upcast copy."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = X.astype(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"input has dtype bfloat16; expected one of float32, "
                                        r"float64 on the CPU \(float16 and bfloat16 run on the "
                                        r"GPU only.*cupy\.asarray.*float32"):
        gc.conv2d(x, W.astype(ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match="bfloat16"):
        gc.relu(x)
