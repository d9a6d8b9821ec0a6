"""The public functional API: validate once, then hand the arrays to the engine of their module.

Semantics follow PyTorch: ``conv2d`` is ``torch.nn.functional.conv2d``; ``conv2d_grad_input`` and
``conv2d_grad_weight`` are ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``; ``max_pool2d`` is
``torch.nn.functional.max_pool2d``. NumPy arrays run on the NumPy engine, CuPy arrays on the CUDA
engine of their device, and results stay where the inputs were.

Shapes (CUTLASS letters): x (N, C, H, W), weight (K, C/groups, R, S), y (N, K, P, Q) with
``P = (H + 2*pad - dilation*(R - 1) - 1) // stride + 1`` (see :class:`gpuconv.ConvProblem`).
"""
from __future__ import annotations

import numbers

import numpy as np

from ._arrays import check_arrays, check_shape
from .problem import ConvProblem, PoolProblem

__all__ = [
    "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias",
    "max_pool2d", "max_pool2d_backward",
    "relu", "sigmoid", "tanh", "elu", "leaky_relu", "maxout",
    "relu_backward", "sigmoid_backward", "tanh_backward", "elu_backward",
    "leaky_relu_backward", "maxout_backward",
]


def engine_for(xp):
    """The engine module for an array module (numpy -> NumPy engine, cupy -> CUDA engine)."""
    if xp is np:
        from .engines import numpy_engine
        return numpy_engine
    from .engines import cuda_engine
    return cuda_engine


# ---------------------------------------------------------------------------------------------
# convolution and its two vector-Jacobian products
# ---------------------------------------------------------------------------------------------
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv(x, weight) + bias, a cross-correlation as in every deep-learning library.

    ``y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * x_pad[n, g*Cg + c,
    p*stride_h + r*dil_h, q*stride_w + s*dil_w]`` with g the group of k.

    >>> import numpy as np, gpuconv as gc
    >>> gc.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))).tolist()
    [[[[4.0, 4.0], [4.0, 4.0]]]]
    """
    xp = check_arrays([("input", x), ("weight", weight), ("bias", bias)],
                      ndim={"input": 4, "weight": 4, "bias": 1})
    p = ConvProblem.from_args(x.shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None:
        check_shape("bias", bias, (p.K,))
    return engine_for(xp).conv_fprop(p, x, weight, bias)


def conv2d_grad_input(input_shape, weight, grad_output, stride=1, padding=0, dilation=1,
                      groups=1):
    """dL/dx: the convolution of the padded, stride-dilated grad_output with the mirrored kernel.

    ``input_shape`` is needed because several input sizes give the same output size; rows and
    columns of x that no window reached get exact zeros.
    """
    xp = check_arrays([("weight", weight), ("grad_output", grad_output)],
                      ndim={"weight": 4, "grad_output": 4})
    p = ConvProblem.from_args(input_shape, weight.shape, stride, padding, dilation, groups)
    check_shape("grad_output", grad_output, p.y_shape)
    return engine_for(xp).conv_dgrad(p, weight, grad_output)


def conv2d_grad_weight(input, weight_shape, grad_output, stride=1, padding=0, dilation=1,
                       groups=1):
    """dL/dw: the convolution of the input with grad_output, summed over the batch."""
    xp = check_arrays([("input", input), ("grad_output", grad_output)],
                      ndim={"input": 4, "grad_output": 4})
    p = ConvProblem.from_args(input.shape, weight_shape, stride, padding, dilation, groups)
    check_shape("grad_output", grad_output, p.y_shape)
    return engine_for(xp).conv_wgrad(p, input, grad_output)


def conv2d_grad_bias(grad_output):
    """dL/db = grad_output summed over N, P and Q."""
    check_arrays([("grad_output", grad_output)], ndim={"grad_output": 4})
    return grad_output.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over each window (padding counts as -inf; PyTorch's ceil_mode rule).

    With ``return_indices=True`` also returns, like PyTorch, the int64 index ``h*W + w`` of each
    maximum in its input plane: the first maximum in row-major order, or the first NaN.
    """
    xp = check_arrays([("input", x)], ndim={"input": 4})
    pp = PoolProblem.from_args(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    y, idx = engine_for(xp).pool_fprop(pp, x)
    return (y, idx) if return_indices else y


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0,
                        dilation=1, ceil_mode=False):
    """dL/dx of max_pool2d: each grad_output element goes to its window's recorded maximum."""
    xp = check_arrays([("grad_output", grad_output)], ndim={"grad_output": 4})
    pp = PoolProblem.from_args(input_shape, kernel_size, stride, padding, dilation, ceil_mode)
    check_shape("grad_output", grad_output, pp.y_shape)
    check_shape("indices", indices, pp.y_shape)
    if type(indices) is not type(grad_output) or indices.dtype != np.int64:
        raise TypeError("indices must be the int64 array max_pool2d(..., return_indices=True) "
                        "returned, on the same device as grad_output")
    return engine_for(xp).pool_dgrad(pp, grad_output, indices)


# ---------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------
def _act(kind, x, alpha=None):
    xp = check_arrays([("input", x)])
    return engine_for(xp).act_fprop(kind, x, alpha)


def _act_grad(kind, x, y, grad_output, alpha=None):
    xp = check_arrays([("input", x), ("output", y), ("grad_output", grad_output)])
    for name_, a in (("output", y), ("grad_output", grad_output)):
        if a is not None:
            check_shape(name_, a, x.shape)
    return engine_for(xp).act_dgrad(kind, x, y, grad_output, alpha)


def _scalar(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def relu(x):
    """max(x, 0); NaN propagates."""
    return _act("relu", x)


def leaky_relu(x, negative_slope=0.1):
    """max(slope*x, x) (the lecture's slope 0.1 by default; PyTorch's default is 0.01)."""
    return _act("leaky_relu", x, _scalar(negative_slope, "negative_slope"))


def sigmoid(x):
    """1 / (1 + exp(-x)), computed without overflow for large |x|."""
    return _act("sigmoid", x)


def tanh(x):
    return _act("tanh", x)


def elu(x, alpha=1.0):
    """x for x > 0, alpha * (exp(x) - 1) otherwise."""
    return _act("elu", x, _scalar(alpha, "alpha"))


def relu_backward(x, grad_output):
    """grad_output where x > 0, else 0 (0 at x == 0, as PyTorch)."""
    return _act_grad("relu", x, None, grad_output)


def leaky_relu_backward(x, grad_output, negative_slope=0.1):
    return _act_grad("leaky_relu", x, None, grad_output, _scalar(negative_slope,
                                                                   "negative_slope"))


def sigmoid_backward(y, grad_output):
    """From the forward *output* y: grad_output * y * (1 - y)."""
    return _act_grad("sigmoid", y, y, grad_output)


def tanh_backward(y, grad_output):
    """From the forward *output* y: grad_output * (1 - y^2)."""
    return _act_grad("tanh", y, y, grad_output)


def elu_backward(x, y, grad_output, alpha=1.0):
    """From the forward input x and output y: grad_output * (1 if x > 0 else y + alpha)."""
    return _act_grad("elu", x, y, grad_output, _scalar(alpha, "alpha"))


def _maxout_args(x, pieces, axis):
    if isinstance(pieces, bool) or not isinstance(pieces, numbers.Integral) or pieces < 1:
        raise ValueError(f"pieces must be a positive int, got {pieces!r}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for an input of {x.ndim} dimensions")
    axis = int(axis) % x.ndim
    if x.shape[axis] % pieces:
        raise ValueError(f"input size {x.shape[axis]} along axis {axis} must be divisible by "
                         f"pieces ({pieces})")
    return int(pieces), axis


class _ShapeOnly:
    def __init__(self, shape):
        self.shape, self.ndim = shape, len(shape)


def maxout(x, pieces, axis=1, return_indices=False):
    """Splits `axis` into groups of `pieces` consecutive entries and takes each group's max.

    With ``return_indices=True`` also returns the position (0..pieces-1) of each winner.
    """
    xp = check_arrays([("input", x)])
    pieces, axis = _maxout_args(x, pieces, axis)
    y, idx = engine_for(xp).maxout_fprop(x, pieces, axis)
    return (y, idx) if return_indices else y


def maxout_backward(grad_output, indices, pieces, input_shape, axis=1):
    """dL/dx of maxout: grad_output goes to the winner of each group, zeros elsewhere."""
    xp = check_arrays([("grad_output", grad_output)])
    input_shape = tuple(int(s) for s in input_shape)
    pieces, axis = _maxout_args(_ShapeOnly(input_shape), pieces, axis)
    expected = input_shape[:axis] + (input_shape[axis] // pieces,) + input_shape[axis + 1:]
    check_shape("grad_output", grad_output, expected)
    check_shape("indices", indices, expected)
    return engine_for(xp).maxout_dgrad(grad_output, indices, pieces, axis, input_shape)
