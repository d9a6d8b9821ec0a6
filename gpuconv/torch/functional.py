"""Differentiable functions with ``torch.nn.functional`` semantics, run by gpuconv's engines.

Each is a thin layer over a custom operator of :mod:`gpuconv.torch._ops`: it normalises the
arguments PyTorch accepts (an int or a pair, ``'same'``/``'valid'`` padding, ``stride=None``,
unbatched 3-D input) into the ops' schema and leaves the computing, and the gradients, to them.
"""
from __future__ import annotations

import numbers

import torch

from . import _ops  # noqa: F401  (registers torch.ops.gpuconv.*)

__all__ = ["conv2d", "max_pool2d"]


def _pair(value, name):
    """An int or a sequence of two ints -> [h, w]; TypeError naming `name` for anything else.
    (Ranges are checked by gpuconv's ConvProblem/PoolProblem, inside the ops.)"""
    pair = list(value) if isinstance(value, (tuple, list, torch.Size)) else [value, value]
    if len(pair) == 1:  # torch accepts (k,) for k
        pair = pair * 2
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {value!r}")
    return [int(v) for v in pair]


def _unbatched(fn, input, *args, **kwargs):
    """PyTorch's unbatched (C, H, W) input: run as a batch of one and drop the batch axis."""
    out = fn(input.unsqueeze(0), *args, **kwargs)
    return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


def _check_input(op, input):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"gpuconv.torch.{op}: input must be a torch.Tensor, "
                        f"got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(f"gpuconv.torch.{op}: input must be 3-D (C, H, W) or 4-D (N, C, H, W), "
                         f"got shape {tuple(input.shape)}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``torch.nn.functional.conv2d`` on gpuconv's engines; differentiable in every tensor.

    ``padding`` is an int, an (h, w) pair, ``'valid'`` or ``'same'`` (stride 1; for an even
    kernel extent the extra row/column goes at the bottom/right, as in PyTorch).
    """
    _check_input("conv2d", input)
    if input.dim() == 3:
        return _unbatched(conv2d, input, weight, bias, stride, padding, dilation, groups)
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
        same, pad = padding == "same", [0, 0]
    else:
        same, pad = False, _pair(padding, "padding")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {groups!r}")
    return torch.ops.gpuconv.conv2d(input, weight, bias, _pair(stride, "stride"), pad,
                                    _pair(dilation, "dilation"), int(groups), same)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """``torch.nn.functional.max_pool2d`` on gpuconv's engines (padding counts as -inf).

    With ``return_indices=True`` also returns PyTorch's int64 indices (``h*W + w`` in each
    input plane), usable with ``torch.nn.functional.max_unpool2d``.
    """
    _check_input("max_pool2d", input)
    if input.dim() == 3:
        return _unbatched(max_pool2d, input, kernel_size, stride, padding, dilation, ceil_mode,
                          return_indices)
    kernel = _pair(kernel_size, "kernel_size")
    # PyTorch: stride None (or an empty list, as nn.MaxPool2d stores it) means kernel_size
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) \
        else _pair(stride, "stride")
    y, idx = torch.ops.gpuconv.max_pool2d(input, kernel, stride, _pair(padding, "padding"),
                                          _pair(dilation, "dilation"), bool(ceil_mode))
    return (y, idx) if return_indices else y

