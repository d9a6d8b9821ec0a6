"""The public functional API: validate once, then hand the arrays to the engine of their module.

Semantics follow PyTorch: ``conv2d`` is ``torch.nn.functional.conv2d``; ``conv2d_grad_input`` and
``conv2d_grad_weight`` are ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``; ``max_pool2d`` is
``torch.nn.functional.max_pool2d``. NumPy arrays run on the NumPy engine, CuPy arrays on the CUDA
engine of their device, and results stay where the inputs were.

Shapes (CUTLASS letters): x (N, C, H, W), weight (K, C/groups, R, S), y (N, K, P, Q) with
``P = (H + 2*pad - dilation*(R - 1) - 1) // stride + 1`` (see :class:`gpuconv.ConvProblem`).

Memory formats, as PyTorch's: shapes are always the logical NCHW ones; an array may be laid out
channels_last ("nhwc": ``a.transpose(0, 2, 3, 1)`` is C-contiguous; see
:func:`gpuconv._arrays.memory_format` for PyTorch's rule on ambiguous strides). Each op decides
the format of its results here, once (:func:`_formats`), converts an input of the other format
once, and both engines then run that format natively (no transposes inside):

==========================  =========================================================
op                          results channels_last when
==========================  =========================================================
conv2d                      input or weight is channels_last (torch.nn.functional.conv2d)
conv2d_grad_input           grad_output or weight is (the forward's format: what autograd's
                            convolution_backward gives; torch.nn.grad.conv2d_input, having no
                            input tensor, follows the weight only)
conv2d_grad_weight          input or grad_output is (torch.nn.grad.conv2d_weight: the input)
max_pool2d (y and indices)  input is;  max_pool2d_backward: grad_output is
activations and backward    input is (the others are converted to its format)
==========================  =========================================================
An empty array is never channels_last (PyTorch's rule), so a batch of 0 gives NCHW results.
"""
from __future__ import annotations

import numbers

import numpy as np

from ._arrays import check_arrays, check_shape, conv_format, memory_format, to_format
from .problem import ConvProblem, PoolProblem, _pair, conv_transpose_output_size

__all__ = [
    "conv2d", "conv2d_grad_input", "conv2d_grad_weight", "conv2d_grad_bias",
    "conv_transpose2d", "conv_transpose2d_grad_input", "conv_transpose2d_grad_weight",
    "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward",
    "relu", "sigmoid", "tanh", "elu", "leaky_relu", "maxout",
    "relu_backward", "sigmoid_backward", "tanh_backward", "elu_backward",
    "leaky_relu_backward", "maxout_backward",
]


def engine_for(xp):
    """The engine module for an array module (numpy -> NumPy engine, cupy -> CUDA engine)."""
    if xp is np:
        return _numpy_engine()
    from .engines import cuda_engine
    return cuda_engine


_NUMPY_ENGINE = []


def _numpy_engine():
    """The NumPy engine, imported on first use and then held (a function-level import costs
    ~2 us a call in the import machinery, ~17 times in a small model's training step)."""
    if not _NUMPY_ENGINE:
        from .engines import numpy_engine
        _NUMPY_ENGINE.append(numpy_engine)
    return _NUMPY_ENGINE[0]


def _run(xp, op, p, *arrays):
    """The engine's `op` (conv_fprop, conv_dgrad, conv_wgrad, pool_fprop, pool_dgrad) on the
    validated problem `p`.

    A batch of 0 images (PyTorch allows one) needs no work and gets no engine call -- so no
    engine has to handle it and the CUDA engine never launches a grid of 0 blocks: the result
    is empty, or zeros for the weight gradient (a sum over no images), on the arrays' device.
    """
    if p.N:
        return getattr(engine_for(xp), op)(p, *arrays)
    like = arrays[0]

    def zeros(shape, dtype=like.dtype):
        if xp is np:
            return np.zeros(shape, dtype)
        with like.device:
            return xp.zeros(shape, dtype)

    if op == "pool_fprop":
        return zeros(p.y_shape), zeros(p.y_shape, np.int64)
    if op == "conv_fprop":
        return zeros(p.y_shape)
    return zeros(p.w_shape if op == "conv_wgrad" else p.x_shape)  # dgrad: dL/dx


def _formats(fmt, *arrays):
    """`arrays` (None kept) in memory format `fmt`: the ones already in it as they are, the
    others converted once (the only layout conversion an op makes)."""
    return tuple(a if a is None or a.ndim != 4 or memory_format(a) == fmt else to_format(a, fmt)
                 for a in arrays)


# ---------------------------------------------------------------------------------------------
# convolution and its two vector-Jacobian products
# ---------------------------------------------------------------------------------------------
def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y = conv(x, weight) + bias, a cross-correlation as in every deep-learning library.

    ``y[n, k, p, q] = b[k] + sum_{c, r, s} w[k, c, r, s] * x_pad[n, g*Cg + c,
    p*stride_h + r*dil_h, q*stride_w + s*dil_w]`` with g the group of k.

    >>> import numpy as np, gpuconv as gc
    y is channels_last when x or weight is (PyTorch's rule), else C-contiguous.

    >>> gc.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))).tolist()
    [[[[4.0, 4.0], [4.0, 4.0]]]]
    """
    xp = check_arrays([("input", x), ("weight", weight), ("bias", bias)],
                      ndim={"input": 4, "weight": 4, "bias": 1})
    p = ConvProblem.from_args(x.shape, weight.shape, stride, padding, dilation, groups)
    if bias is not None:
        check_shape("bias", bias, (p.K,))
    x, weight = _formats(conv_format(x, weight), x, weight)
    return _run(xp, "conv_fprop", p, x, weight, bias)


def conv2d_grad_input(input_shape, weight, grad_output, stride=1, padding=0, dilation=1,
                      groups=1):
    """dL/dx: the convolution of the padded, stride-dilated grad_output with the mirrored kernel.

    ``input_shape`` is needed because several input sizes give the same output size; rows and
    columns of x that no window reached get exact zeros. The result is channels_last when
    grad_output or weight is.
    """
    xp = check_arrays([("weight", weight), ("grad_output", grad_output)],
                      ndim={"weight": 4, "grad_output": 4})
    p = ConvProblem.from_args(input_shape, weight.shape, stride, padding, dilation, groups)
    check_shape("grad_output", grad_output, p.y_shape)
    weight, grad_output = _formats(conv_format(grad_output, weight), weight, grad_output)
    return _run(xp, "conv_dgrad", p, weight, grad_output)


def conv2d_grad_weight(input, weight_shape, grad_output, stride=1, padding=0, dilation=1,
                       groups=1):
    """dL/dw: the convolution of the input with grad_output, summed over the batch; in
    channels_last (memory (K, R, S, C/groups)) when input or grad_output is."""
    xp = check_arrays([("input", input), ("grad_output", grad_output)],
                      ndim={"input": 4, "grad_output": 4})
    p = ConvProblem.from_args(input.shape, weight_shape, stride, padding, dilation, groups)
    check_shape("grad_output", grad_output, p.y_shape)
    input, grad_output = _formats(conv_format(input, grad_output), input, grad_output)
    return _run(xp, "conv_wgrad", p, input, grad_output)


def conv2d_grad_bias(grad_output):
    """dL/db = grad_output summed over N, P and Q."""
    xp = check_arrays([("grad_output", grad_output)], ndim={"grad_output": 4})
    if xp is np:
        return engine_for(np).bias_grad(grad_output)
    return grad_output.sum(axis=(0, 2, 3))


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over each window (padding counts as -inf; PyTorch's ceil_mode rule).

    With ``return_indices=True`` also returns, like PyTorch, the int64 index ``h*W + w`` of each
    maximum in its input plane: the first maximum in row-major order, or the first NaN.
    y and the indices have x's memory format.
    """
    xp = check_arrays([("input", x)], ndim={"input": 4})
    pp = PoolProblem.from_args(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    y, idx = _run(xp, "pool_fprop", pp, x)
    return (y, idx) if return_indices else y


def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride=None, padding=0,
                        dilation=1, ceil_mode=False):
    """dL/dx of max_pool2d: each grad_output element goes to its window's recorded maximum.
    dx has grad_output's memory format (indices are converted to it where they differ)."""
    xp = check_arrays([("grad_output", grad_output)], ndim={"grad_output": 4})
    pp = PoolProblem.from_args(input_shape, kernel_size, stride, padding, dilation, ceil_mode)
    check_shape("grad_output", grad_output, pp.y_shape)
    check_shape("indices", indices, pp.y_shape)
    if type(indices) is not type(grad_output) or indices.dtype != np.int64:
        raise TypeError("indices must be the int64 array max_pool2d(..., return_indices=True) "
                        "returned, on the same device as grad_output")
    (indices,) = _formats(memory_format(grad_output), indices)
    return _run(xp, "pool_dgrad", pp, grad_output, indices)


def _relu_max_pool2d_backward(x, grad_output, indices, kernel_size, stride=None, padding=0,
                              dilation=1, ceil_mode=False, winners_mask=None):
    """relu_backward(x, max_pool2d_backward(grad_output, indices, x.shape, ...)), the same
    values bit for bit: for a ReLU whose output went into a max-pool (gpuconv.nn.Sequential
    calls it for that pair). Non-overlapping NCHW pools on the NumPy engine take one pass over
    the pooled positions (numpy_engine.relu_pool_dgrad); everything else runs the two steps.
    winners_mask: ~(x <= 0) at each window's winner, grad_output's shape, uint8, if known."""
    xp = check_arrays([("input", x), ("grad_output", grad_output)],
                      ndim={"input": 4, "grad_output": 4})
    pp = PoolProblem.from_args(x.shape, kernel_size, stride, padding, dilation, ceil_mode)
    check_shape("grad_output", grad_output, pp.y_shape)
    check_shape("indices", indices, pp.y_shape)
    if xp is np and pp.N and type(indices) is np.ndarray and indices.dtype == np.int64:
        dx = _numpy_engine().relu_pool_dgrad(pp, x, grad_output, indices, winners_mask)
        if dx is not None:
            return dx
    return relu_backward(x, max_pool2d_backward(grad_output, indices, x.shape, kernel_size,
                                                stride, padding, dilation, ceil_mode))


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
    # the result takes x's memory format; y and grad_output are converted to it if they differ
    y, grad_output = _formats(memory_format(x), y, grad_output)
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
    """0 where x <= 0, else grad_output: as PyTorch, 0 at x == 0 and grad_output at x NaN."""
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
    """From the forward input x and output y: grad_output * (y + alpha if x <= 0 else 1), as
    PyTorch (so grad_output itself at a NaN input)."""
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


# ---------------------------------------------------------------------------------------------
# transposed convolution (the "deconvolution" layer): the input gradient of a convolution, run
# as a forward pass; its own gradients are the forward convolution and the weight gradient
# with the roles of x and dy swapped, so no new convolution code
# ---------------------------------------------------------------------------------------------
def _transpose_problem(x_shape, weight_shape, stride, padding, output_padding, groups,
                       dilation):
    """The ConvProblem whose input gradient conv_transpose2d is: its x is the transposed
    convolution's output (N, C_out, H_out, W_out), its weight the same (C_in, C_out/groups,
    kH, kW) array (K = C_in), its y the transposed convolution's input -- grown by
    ``output_padding // stride`` rows/columns of zeros where output_padding >= stride."""
    if isinstance(padding, str):
        raise ValueError(f"conv_transpose2d: padding must be an int or a pair, got {padding!r}")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C_in, H, W = (int(s) for s in x_shape)
    K, C_out_g, R, S = (int(s) for s in weight_shape)
    if K != C_in:
        raise ValueError(f"weight.shape[0] ({K}) must equal the input's channels ({C_in}): "
                         "conv_transpose2d's weight is (in_channels, out_channels // groups, "
                         "kH, kW)")
    if C_in % groups:
        raise ValueError(f"in_channels ({C_in}) must be divisible by groups ({groups})")
    sh, sw = _pair(stride, "stride")
    ph, pw = _pair(padding, "padding", allow_zero=True)
    dh, dw = _pair(dilation, "dilation")
    oph, opw = _pair(output_padding, "output_padding", allow_zero=True)
    for op_, s_, d_ in ((oph, sh, dh), (opw, sw, dw)):
        if not (op_ < s_ or op_ < d_):  # PyTorch's rule
            raise ValueError(f"output_padding ({oph}, {opw}) must be smaller than either "
                             f"stride ({sh}, {sw}) or dilation ({dh}, {dw})")
    h_out = conv_transpose_output_size(H, R, sh, ph, dh, oph)
    w_out = conv_transpose_output_size(W, S, sw, pw, dw, opw)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"conv_transpose2d: output size would be {h_out}x{w_out} for input "
                         f"{H}x{W}: padding {(ph, pw)} is too large")
    return ConvProblem.from_args((N, C_out_g * groups, h_out, w_out), (K, C_out_g, R, S),
                                 stride, padding, dilation, groups)


def _zeros(xp, shape, dtype, fmt):
    """Zeros of logical (N, C, H, W) `shape` with their memory in `fmt`."""
    if fmt == "nhwc":
        n, c, h, w = shape
        return xp.zeros((n, h, w, c), dtype=dtype).transpose(0, 3, 1, 2)
    return xp.zeros(shape, dtype=dtype)


def _grow(xp, a, rows, cols):
    """`a` (N, C, H, W) with zero rows and columns appended up to (rows, cols), in a's format."""
    if a.shape[2:] == (rows, cols):
        return a
    out = _zeros(xp, a.shape[:2] + (rows, cols), a.dtype, memory_format(a))
    out[:, :, :a.shape[2], :a.shape[3]] = a
    return out


def conv_transpose2d(x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                     dilation=1):
    """The transposed convolution, ``torch.nn.functional.conv_transpose2d``.

    x (N, C_in, H, W), weight (C_in, C_out // groups, kH, kW), bias (C_out,) -> y (N, C_out,
    H_out, W_out) with ``H_out = (H - 1)*stride - 2*padding + dilation*(kH - 1) +
    output_padding + 1``: each input pixel scatters its kernel-weighted copy into y. It is
    ``conv2d_grad_input`` with x as the upstream gradient.

    >>> import numpy as np, gpuconv as gc
    >>> gc.conv_transpose2d(np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2))).tolist()
    [[[[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]]]
    """
    xp = check_arrays([("input", x), ("weight", weight), ("bias", bias)],
                      ndim={"input": 4, "weight": 4, "bias": 1})
    p = _transpose_problem(x.shape, weight.shape, stride, padding, output_padding, groups,
                           dilation)
    if bias is not None:
        check_shape("bias", bias, (p.C,))
    weight, x = _formats(conv_format(x, weight), weight, x)   # as conv2d: PyTorch's rule
    y = _run(xp, "conv_dgrad", p, weight, _grow(xp, x, p.P, p.Q))
    if bias is not None:
        y += bias.reshape(1, -1, 1, 1)
    return y


def conv_transpose2d_grad_input(input_shape, weight, grad_output, stride=1, padding=0,
                                output_padding=0, groups=1, dilation=1):
    """dL/dx of conv_transpose2d: the forward convolution of grad_output with the weight."""
    xp = check_arrays([("weight", weight), ("grad_output", grad_output)],
                      ndim={"weight": 4, "grad_output": 4})
    p = _transpose_problem(input_shape, weight.shape, stride, padding, output_padding, groups,
                           dilation)
    check_shape("grad_output", grad_output, p.x_shape)
    fmt = conv_format(grad_output, weight)
    grad_output, weight = _formats(fmt, grad_output, weight)
    dx = _run(xp, "conv_fprop", p, grad_output, weight, None)
    H, W = (int(s) for s in input_shape[2:])
    return dx if dx.shape[2:] == (H, W) else to_format(dx[:, :, :H, :W], fmt)


def conv_transpose2d_grad_weight(input, weight_shape, grad_output, stride=1, padding=0,
                                 output_padding=0, groups=1, dilation=1):
    """dL/dweight of conv_transpose2d: the convolution weight gradient with the roles swapped
    (grad_output as the convolution's input, the input as its upstream gradient)."""
    xp = check_arrays([("input", input), ("grad_output", grad_output)],
                      ndim={"input": 4, "grad_output": 4})
    p = _transpose_problem(input.shape, weight_shape, stride, padding, output_padding, groups,
                           dilation)
    check_shape("grad_output", grad_output, p.x_shape)
    grad_output, input = _formats(conv_format(input, grad_output), grad_output, input)
    return _run(xp, "conv_wgrad", p, grad_output, _grow(xp, input, p.P, p.Q))


# ---------------------------------------------------------------------------------------------
# average pooling, written once over the array module (slices and sums run alike on NumPy
# and CuPy; no engine kernel is warranted for a sum of R*S strided views)
# ---------------------------------------------------------------------------------------------
def _avg_problem(x_shape, kernel_size, stride, padding, ceil_mode):
    # PoolProblem owns the sizes and PyTorch's ceil_mode rule; average pooling has no dilation
    return PoolProblem.from_args(x_shape, kernel_size, stride, padding, 1, ceil_mode)


def _avg_divisor(pp, count_include_pad):
    """(P, Q) float64 divisor of each window, PyTorch's: with count_include_pad the window
    clipped to the padded input, without it the window clipped to the input itself."""
    def counts(out, size, k, s, pad):
        start = np.arange(out) * s - pad
        end = np.minimum(start + k, size + pad)
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, size)
        return (end - start).astype(np.float64)
    return np.outer(counts(pp.P, pp.H, pp.R, pp.stride_h, pp.pad_h),
                    counts(pp.Q, pp.W, pp.S, pp.stride_w, pp.pad_w))


def _avg_taps(pp):
    """For each window tap (r, s): the slices of the padded input it reads."""
    return [(slice(r, r + pp.stride_h * (pp.P - 1) + 1, pp.stride_h),
             slice(s, s + pp.stride_w * (pp.Q - 1) + 1, pp.stride_w))
            for r in range(pp.R) for s in range(pp.S)]


def _padded_size(pp):
    return pp.H + pp.pad_h + pp.pad_h_end, pp.W + pp.pad_w + pp.pad_w_end


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
    """Mean over each window, ``torch.nn.functional.avg_pool2d`` (zero padding; the divisor
    counts the padding when count_include_pad, and never the part of a ceil_mode window that
    lies past the padding)."""
    xp = check_arrays([("input", x)], ndim={"input": 4})
    pp = _avg_problem(x.shape, kernel_size, stride, padding, ceil_mode)
    hp, wp = _padded_size(pp)
    fmt = memory_format(x)   # channels_last in, channels_last out (as PyTorch)
    xpad = _zeros(xp, x.shape[:2] + (hp, wp), x.dtype, fmt)
    xpad[:, :, pp.pad_h:pp.pad_h + pp.H, pp.pad_w:pp.pad_w + pp.W] = x
    acc = np.float32 if x.dtype == np.float16 else x.dtype  # float16 sums in float32
    y = _zeros(xp, pp.y_shape, acc, fmt)
    for rows, cols in _avg_taps(pp):
        y += xpad[:, :, rows, cols]
    y /= xp.asarray(_avg_divisor(pp, count_include_pad), dtype=acc)
    return y.astype(x.dtype, copy=False)


def avg_pool2d_backward(grad_output, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode=False, count_include_pad=True):
    """dL/dx of avg_pool2d: each grad_output element, divided by its window's divisor, is
    added to every input element of the window."""
    xp = check_arrays([("grad_output", grad_output)], ndim={"grad_output": 4})
    pp = _avg_problem(input_shape, kernel_size, stride, padding, ceil_mode)
    check_shape("grad_output", grad_output, pp.y_shape)
    hp, wp = _padded_size(pp)
    g = grad_output / xp.asarray(_avg_divisor(pp, count_include_pad), dtype=grad_output.dtype)
    fmt = memory_format(grad_output)
    dxpad = _zeros(xp, pp.x_shape[:2] + (hp, wp), grad_output.dtype, fmt)
    for rows, cols in _avg_taps(pp):
        dxpad[:, :, rows, cols] += g
    return to_format(dxpad[:, :, pp.pad_h:pp.pad_h + pp.H, pp.pad_w:pp.pad_w + pp.W], fmt)

