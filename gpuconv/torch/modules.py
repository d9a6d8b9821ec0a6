"""``torch.nn`` layers whose forward runs gpuconv, and ``convert`` to swap them into a model.

The classes subclass torch's own and add no state: same constructor, same parameters and
buffers, same ``state_dict`` keys, so a checkpoint saved from either loads into the other.
"""
from __future__ import annotations

import copy
import warnings

import torch

from . import functional as F

__all__ = ["Conv2d", "MaxPool2d", "convert"]


class Conv2d(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` computed by gpuconv (``padding_mode='zeros'`` only)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None):
        _check_padding_mode(padding_mode)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)

    def _conv_forward(self, input, weight, bias):
        # torch.nn.Conv2d.forward calls this with the parameters (after any parametrization)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _get_name(self):
        return "gpuconv.Conv2d"


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by gpuconv (``return_indices`` and ``ceil_mode`` too)."""

    def forward(self, input):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)

    def _get_name(self):
        return "gpuconv.MaxPool2d"


def _check_padding_mode(padding_mode):
    if padding_mode != "zeros":
        raise ValueError(f"gpuconv.torch.Conv2d supports padding_mode='zeros' only, got "
                         f"{padding_mode!r}: keep torch.nn.Conv2d for this layer, or pad with "
                         "torch.nn.functional.pad and use padding=0")


_REPLACEMENTS = {torch.nn.Conv2d: Conv2d, torch.nn.MaxPool2d: MaxPool2d}


def convert(model, inplace=False):
    """`model` with every ``nn.Conv2d`` (``padding_mode='zeros'``) and ``nn.MaxPool2d`` computed
    by gpuconv, nested modules included (and `model` itself if it is one).

    Each replaced module keeps its parameters, buffers, hooks and training flag: its class
    becomes the gpuconv subclass, which adds no state. ``inplace=False`` (the default) converts
    a deep copy and leaves `model` untouched; ``inplace=True`` converts `model` itself, so an
    optimizer built on its parameters keeps working. Modules it cannot serve (another padding
    mode; subclasses of nn.Conv2d/nn.MaxPool2d, whose forward may differ, such as lazy or
    quantization-aware ones) stay as they are, named in one warning.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    left = []
    for name, m in model.named_modules():
        target = _REPLACEMENTS.get(type(m))
        where = name or "(the model itself)"
        if target is Conv2d and m.padding_mode != "zeros":
            left.append(f"{where} (padding_mode={m.padding_mode!r})")
        elif target is not None:
            m.__class__ = target
        elif isinstance(m, tuple(_REPLACEMENTS)) and not isinstance(m, (Conv2d, MaxPool2d)):
            left.append(f"{where} ({type(m).__name__}, a subclass gpuconv does not replace)")
    if left:
        warnings.warn(f"gpuconv.torch.convert left {len(left)} module(s) to PyTorch: "
                      + "; ".join(left), stacklevel=2)
    return model
