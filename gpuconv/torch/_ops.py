"""gpuconv's convolution and max-pooling as PyTorch custom operators (namespace ``gpuconv``).

Five ops, each with a fake kernel (shapes without running it: torch.compile, torch.export) and
the autograd formula of the lecture — the backward of a convolution is two more convolutions::

    torch.ops.gpuconv.conv2d(input, weight, bias?, stride, padding, dilation, groups, same) -> y
        backward: dx = conv2d_grad_input, dw = conv2d_grad_weight, db = dy.sum((0, 2, 3))
    torch.ops.gpuconv.conv2d_grad_input(input_shape, weight, grad_output, ...)  -> dx
        backward (double backward): d weight = conv2d_grad_weight, d grad_output = conv2d
    torch.ops.gpuconv.conv2d_grad_weight(input, weight_shape, grad_output, ...) -> dw
        backward: d input = conv2d_grad_input, d grad_output = conv2d
    torch.ops.gpuconv.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
        -> (y, indices int64);  backward: max_pool2d_backward
    torch.ops.gpuconv.max_pool2d_backward(grad_output, indices, input_shape, ...) -> dx
        backward: d grad_output = the gradient gathered at the indices

``padding`` is an (h, w) pair; ``same=True`` means PyTorch's ``padding='same'`` instead (it may be
asymmetric: the odd extra row/column at the bottom/right). Every op calls gpuconv's public
functional API on arrays that share the tensors' memory:

- CPU tensors (float32/float64): NumPy views (``Tensor.numpy()``, zero-copy). Contiguous and
  channels_last tensors are passed as they are; any other layout is made contiguous once. The
  NumPy engine computes channels_last inputs on their NHWC memory (engines/numpy_nhwc.py).
  Results are fresh arrays in the op's memory format, wrapped without a copy
  (``torch.from_numpy``).
- CUDA tensors (float16/float32/float64; bfloat16 computed in float32, see below): CuPy arrays
  through DLPack, under the tensor's device, on torch's current stream
  (``cupy.cuda.ExternalStream``), with every CuPy allocation of the call — outputs and workspace
  — taken from torch's caching allocator, so one memory pool serves both libraries. The CUDA
  engine routes channels_last inputs to NHWC kernels (first generation) or converts them once
  (NCHW-only algorithms); other non-contiguous inputs are made contiguous once.
- bfloat16 (CUDA only): the bridge converts bfloat16 operands to float32, runs the float32
  kernels and rounds the results to bfloat16 (float32 accumulation, one extra conversion pass
  each way). Handing bfloat16 through DLPack as is needs CuPy's ml_dtypes bfloat16 on both sides
  and gpuconv ops that accept it; that exchange has not run on a GPU yet, so the bridge keeps
  the path whose kernels exist for certain (switching is the two bfloat16 lines of _call_cuda).

Memory formats: channels_last tensors in -> channels_last tensors out, gradients included, by
gpuconv.functional's rule (PyTorch's: conv2d's output is channels_last when its input or weight
is; the gradient ops take the forward's format, the backward of conv2d converting a
grad_output of the other format once, as autograd's convolution_backward does). The engines
compute in that format natively; the results are wrapped with their strides, and the fake
kernels report the same strides (:func:`_empty`), so torch.compile sees what eager gives.
"""
from __future__ import annotations

import functools

import torch

from .. import functional as gf
from .._arrays import conv_format as _array_conv_format
from ..problem import ConvProblem, PoolProblem

CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_CONV_ARGS = "int[2] stride, int[2] padding, int[2] dilation, int groups, bool same"
_POOL_ARGS = "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode"


# ---------------------------------------------------------------------------------------------
# checks shared by the real and the fake kernels (so torch.compile fails as eager does)
# ---------------------------------------------------------------------------------------------
def check_tensors(op, named):
    """named: [(name, tensor or None)]. One device (cpu or cuda), one supported float dtype."""
    first = None
    for name, t in named:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"gpuconv.torch.{op}: {name} must be a torch.Tensor, "
                            f"got {type(t).__name__}")
        kind = t.device.type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"gpuconv.torch.{op}: {name} is on device {t.device}; gpuconv runs "
                             "on 'cpu' and 'cuda' tensors only")
        allowed = CUDA_DTYPES if kind == "cuda" else CPU_DTYPES
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            more = "" if kind == "cuda" else " (float16/bfloat16 run on CUDA tensors only)"
            raise TypeError(f"gpuconv.torch.{op}: {name} has dtype {t.dtype}; expected one of "
                            f"{names} on {kind}{more}")
        if first is None:
            first = (name, t)
            continue
        fname, ft = first
        if t.device != ft.device:
            raise ValueError(f"gpuconv.torch.{op}: {name} is on {t.device} but {fname} is on "
                             f"{ft.device}; move them to one device")
        if t.dtype != ft.dtype:
            raise TypeError(f"gpuconv.torch.{op}: {name} has dtype {t.dtype} but {fname} has "
                            f"{ft.dtype}; all tensors of one op must share a dtype")


def _padding(padding, same):
    return "same" if same else tuple(padding)


def conv_problem(x_shape, w_shape, stride, padding, dilation, groups, same):
    """The ConvProblem of an op call, validated (the one place output sizes come from).

    The batch is left out (N=1): under torch.compile the batch may be symbolic and is carried
    through as is, while the other sizes are read as ints (which specialises them).
    """
    return ConvProblem.from_args((1,) + tuple(x_shape[1:]), w_shape, stride,
                                 _padding(padding, same), dilation, groups)


def pool_problem(x_shape, kernel_size, stride, padding, dilation, ceil_mode):
    return PoolProblem.from_args((1,) + tuple(x_shape[1:]), kernel_size, stride, padding,
                                 dilation, ceil_mode)


def _rank4(op, name, shape):
    if len(shape) != 4:
        raise ValueError(f"gpuconv.torch.{op}: {name} must be 4-D (N, C, H, W), "
                         f"got shape {tuple(shape)}")


# ---------------------------------------------------------------------------------------------
# the bridge: tensors -> arrays of the right engine -> tensors
# ---------------------------------------------------------------------------------------------
def _plain(t):
    """t without autograd history, in a layout the engines read in place (or made contiguous
    once: expanded gradients, slices, transposes)."""
    t = t.detach()
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t
    return t.contiguous()


class _Strides:
    """A tensor's sizes and strides in the attributes gpuconv._arrays.memory_format reads."""

    def __init__(self, t):
        self.ndim, self.shape, self.strides = t.dim(), tuple(t.shape), tuple(t.stride())
        self.size = t.numel()


def conv_format(*tensors):
    """"nhwc" if any tensor (None ignored) is channels_last by PyTorch's rule, else "nchw"."""
    return _array_conv_format(*(None if t is None else _Strides(t) for t in tensors))


def _torch_format(fmt):
    return torch.channels_last if fmt == "nhwc" else torch.contiguous_format


def _empty(like, shape, fmt, dtype=None):
    """The fake kernels' result: `shape` in memory format `fmt` (what the engines return)."""
    return like.new_empty(shape, dtype=dtype).contiguous(memory_format=_torch_format(fmt))


def _wrap(t):
    """An engine result as a tensor in the format its strides say (no copy when they already
    are dense in it, the engines' case)."""
    fmt = conv_format(t) if t.dim() == 4 else "nchw"
    return t.contiguous(memory_format=_torch_format(fmt))


def call_engine(fn, *tensors):
    """fn(*arrays) on the engine of the tensors' device; its array result(s) back as tensors.

    ``tensors`` may contain None (an absent bias) and int64 index tensors. Results keep the
    memory the engine allocated: nothing is copied on the way back (the engines return
    C-contiguous arrays; ``.contiguous()`` only guarantees the strides the fake kernels
    promise, which torch.compile relies on).
    """
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cpu":
        out = fn(*[None if t is None else _plain(t).resolve_neg().numpy() for t in tensors])
        return _map(out, lambda a: _wrap(torch.from_numpy(a)))
    return _call_cuda(fn, device, tensors)


def _map(out, f):
    return tuple(f(o) for o in out) if isinstance(out, tuple) else f(out)


def _call_cuda(fn, device, tensors):
    from ..device import require_cuda
    cupy = require_cuda(device.index)
    low = next(t.dtype for t in tensors if t is not None and t.is_floating_point())
    if low == torch.bfloat16:  # see the module docstring: computed in float32
        tensors = [t.float() if t is not None and t.dtype == low else t for t in tensors]
    stream = torch.cuda.current_stream(device)
    # Conversions happen inside the block too: DLPack then sees one stream on both sides and
    # inserts no synchronisation. CuPy's stream and allocator settings are thread-local, and
    # autograd runs CUDA backward passes on a thread of its own, so they are set on every call.
    with cupy.cuda.Device(device.index), \
            cupy.cuda.ExternalStream(stream.cuda_stream, device.index), \
            cupy.cuda.using_allocator(_torch_allocator(cupy)):
        out = fn(*[None if t is None else cupy.from_dlpack(_plain(t)) for t in tensors])
        out = _map(out, lambda a: _wrap(torch.from_dlpack(a)))
    if low == torch.bfloat16:
        out = _map(out, lambda t: t.to(low) if t.is_floating_point() else t)
    return out


@functools.lru_cache(maxsize=None)
def _torch_allocator(cupy):
    """A CuPy allocator that takes its memory from torch's caching allocator, on the stream
    that is current in CuPy at allocation time (torch's stream, inside _call_cuda)."""
    def malloc(size, device_id):
        return torch.cuda.caching_allocator_alloc(size, device_id,
                                                  cupy.cuda.get_current_stream().ptr)

    def free(ptr, device_id):
        torch.cuda.caching_allocator_delete(ptr)

    return cupy.cuda.memory.PythonFunctionAllocator(malloc, free).malloc


# ---------------------------------------------------------------------------------------------
# convolution: fprop, dgrad, wgrad
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gpuconv::conv2d", mutates_args=(),
                         schema=f"(Tensor input, Tensor weight, Tensor? bias, {_CONV_ARGS}) "
                                "-> Tensor")
def conv2d(input, weight, bias, stride, padding, dilation, groups, same):
    check_tensors("conv2d", [("input", input), ("weight", weight), ("bias", bias)])
    pad = _padding(padding, same)
    return call_engine(lambda x, w, b: gf.conv2d(x, w, b, stride, pad, dilation, groups),
                       input, weight, bias)


@conv2d.register_fake
def _fake_conv2d(input, weight, bias, stride, padding, dilation, groups, same):
    check_tensors("conv2d", [("input", input), ("weight", weight), ("bias", bias)])
    _rank4("conv2d", "input", input.shape)
    _rank4("conv2d", "weight", weight.shape)
    p = conv_problem(input.shape, weight.shape, stride, padding, dilation, groups, same)
    if bias is not None and tuple(bias.shape) != (p.K,):
        raise ValueError(f"gpuconv.torch.conv2d: bias must have shape ({p.K},), "
                         f"got {tuple(bias.shape)}")
    return _empty(input, (input.shape[0], p.K, p.P, p.Q), conv_format(input, weight))


@torch.library.custom_op("gpuconv::conv2d_grad_input", mutates_args=(),
                         schema=f"(SymInt[4] input_shape, Tensor weight, Tensor grad_output, "
                                f"{_CONV_ARGS}) -> Tensor")
def conv2d_grad_input(input_shape, weight, grad_output, stride, padding, dilation, groups, same):
    check_tensors("conv2d_grad_input", [("weight", weight), ("grad_output", grad_output)])
    pad = _padding(padding, same)
    return call_engine(lambda w, dy: gf.conv2d_grad_input(input_shape, w, dy, stride, pad,
                                                          dilation, groups),
                       weight, grad_output)


@conv2d_grad_input.register_fake
def _(input_shape, weight, grad_output, stride, padding, dilation, groups, same):
    check_tensors("conv2d_grad_input", [("weight", weight), ("grad_output", grad_output)])
    conv_problem(input_shape, weight.shape, stride, padding, dilation, groups, same)
    return _empty(weight, input_shape, conv_format(grad_output, weight))


@torch.library.custom_op("gpuconv::conv2d_grad_weight", mutates_args=(),
                         schema=f"(Tensor input, SymInt[4] weight_shape, Tensor grad_output, "
                                f"{_CONV_ARGS}) -> Tensor")
def conv2d_grad_weight(input, weight_shape, grad_output, stride, padding, dilation, groups,
                       same):
    check_tensors("conv2d_grad_weight", [("input", input), ("grad_output", grad_output)])
    pad = _padding(padding, same)
    return call_engine(lambda x, dy: gf.conv2d_grad_weight(x, weight_shape, dy, stride, pad,
                                                           dilation, groups),
                       input, grad_output)


@conv2d_grad_weight.register_fake
def _(input, weight_shape, grad_output, stride, padding, dilation, groups, same):
    check_tensors("conv2d_grad_weight", [("input", input), ("grad_output", grad_output)])
    conv_problem(input.shape, weight_shape, stride, padding, dilation, groups, same)
    return _empty(input, weight_shape, conv_format(input, grad_output))


# autograd. The three ops are the bilinear form y = B(x, w) and its two partial adjoints, so
# each one's gradient is again one of the three (which also gives double backward).
def _setup_conv2d(ctx, inputs, output):
    x, w, b, *args = inputs
    ctx.save_for_backward(x, w)
    ctx.args, ctx.has_bias = args, b is not None


def _backward_conv2d(ctx, dy):
    x, w = ctx.saved_tensors
    need = ctx.needs_input_grad
    # the gradients in the forward's memory format (autograd's convolution_backward does so)
    dy = dy.contiguous(memory_format=_torch_format(conv_format(x, w)))
    dx = torch.ops.gpuconv.conv2d_grad_input(x.shape, w, dy, *ctx.args) if need[0] else None
    dw = torch.ops.gpuconv.conv2d_grad_weight(x, w.shape, dy, *ctx.args) if need[1] else None
    db = dy.sum((0, 2, 3)) if ctx.has_bias and need[2] else None
    return (dx, dw, db) + (None,) * len(ctx.args)


def _setup_gradient_op(ctx, inputs, output):
    """conv2d_grad_input / _weight: keep their two tensors (the third argument is a shape)."""
    ctx.save_for_backward(*[t for t in inputs[:3] if isinstance(t, torch.Tensor)])
    ctx.args = inputs[3:]


def _backward_grad_input(ctx, g):
    # <g, B_x(w)^T dy> = <B(g, w), dy>
    w, dy = ctx.saved_tensors
    need = ctx.needs_input_grad
    gw = torch.ops.gpuconv.conv2d_grad_weight(g, w.shape, dy, *ctx.args) if need[1] else None
    gdy = torch.ops.gpuconv.conv2d(g, w, None, *ctx.args) if need[2] else None
    return (None, gw, gdy) + (None,) * len(ctx.args)


def _backward_grad_weight(ctx, g):
    # <g, B_w(x)^T dy> = <B(x, g), dy>
    x, dy = ctx.saved_tensors
    need = ctx.needs_input_grad
    gx = torch.ops.gpuconv.conv2d_grad_input(x.shape, g, dy, *ctx.args) if need[0] else None
    gdy = torch.ops.gpuconv.conv2d(x, g, None, *ctx.args) if need[2] else None
    return (gx, None, gdy) + (None,) * len(ctx.args)


conv2d.register_autograd(_backward_conv2d, setup_context=_setup_conv2d)
conv2d_grad_input.register_autograd(_backward_grad_input, setup_context=_setup_gradient_op)
conv2d_grad_weight.register_autograd(_backward_grad_weight, setup_context=_setup_gradient_op)


# ---------------------------------------------------------------------------------------------
# max pooling
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("gpuconv::max_pool2d", mutates_args=(),
                         schema=f"(Tensor input, {_POOL_ARGS}) -> (Tensor, Tensor)")
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    check_tensors("max_pool2d", [("input", input)])
    return call_engine(lambda x: gf.max_pool2d(x, kernel_size, stride, padding, dilation,
                                               ceil_mode, return_indices=True), input)


@max_pool2d.register_fake
def _fake_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    check_tensors("max_pool2d", [("input", input)])
    _rank4("max_pool2d", "input", input.shape)
    pp = pool_problem(input.shape, kernel_size, stride, padding, dilation, ceil_mode)
    shape = (input.shape[0], pp.C, pp.P, pp.Q)
    fmt = conv_format(input)
    return _empty(input, shape, fmt), _empty(input, shape, fmt, dtype=torch.int64)


@torch.library.custom_op("gpuconv::max_pool2d_backward", mutates_args=(),
                         schema=f"(Tensor grad_output, Tensor indices, SymInt[4] input_shape, "
                                f"{_POOL_ARGS}) -> Tensor")
def max_pool2d_backward(grad_output, indices, input_shape, kernel_size, stride, padding,
                        dilation, ceil_mode):
    _check_pool_grad(grad_output, indices)
    return call_engine(lambda dy, idx: gf.max_pool2d_backward(dy, idx, input_shape, kernel_size,
                                                              stride, padding, dilation,
                                                              ceil_mode),
                       grad_output, indices)


def _check_pool_grad(grad_output, indices):
    check_tensors("max_pool2d_backward", [("grad_output", grad_output)])
    if indices.dtype != torch.int64 or indices.device != grad_output.device:
        raise TypeError("gpuconv.torch.max_pool2d_backward: indices must be the int64 tensor "
                        "max_pool2d returned, on grad_output's device; got "
                        f"{indices.dtype} on {indices.device}")


@max_pool2d_backward.register_fake
def _(grad_output, indices, input_shape, kernel_size, stride, padding, dilation, ceil_mode):
    _check_pool_grad(grad_output, indices)
    pool_problem(input_shape, kernel_size, stride, padding, dilation, ceil_mode)
    return _empty(grad_output, input_shape, conv_format(grad_output))


def _setup_max_pool2d(ctx, inputs, output):
    x, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.input_shape, ctx.args = x.shape, args


def _backward_max_pool2d(ctx, dy, _d_indices):
    idx, = ctx.saved_tensors
    dy = dy.contiguous(memory_format=_torch_format(conv_format(idx)))  # the input's format
    dx = torch.ops.gpuconv.max_pool2d_backward(dy, idx, ctx.input_shape, *ctx.args)
    return (dx,) + (None,) * len(ctx.args)


def _setup_pool_grad(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.n_args = len(inputs)


def _backward_pool_grad(ctx, g):
    # dx scatters dy onto the argmax positions; its adjoint gathers g from them.
    idx, = ctx.saved_tensors
    gdy = g.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
    return (gdy,) + (None,) * (ctx.n_args - 1)


max_pool2d.register_autograd(_backward_max_pool2d, setup_context=_setup_max_pool2d)
max_pool2d_backward.register_autograd(_backward_pool_grad, setup_context=_setup_pool_grad)

OPS = (conv2d, conv2d_grad_input, conv2d_grad_weight, max_pool2d, max_pool2d_backward)
