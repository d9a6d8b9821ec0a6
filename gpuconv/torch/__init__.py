"""gpuconv inside PyTorch models: custom operators, autograd, ``torch.compile``, DDP.

>>> import torch, gpuconv.torch as gt
>>> model = gt.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
...                                        torch.nn.ReLU(), torch.nn.MaxPool2d(2)))
>>> model(torch.randn(2, 3, 8, 8)).shape
torch.Size([2, 8, 4, 4])

- ``conv2d`` / ``max_pool2d``: ``torch.nn.functional`` semantics, differentiable.
- ``Conv2d`` / ``MaxPool2d``: subclasses of ``torch.nn``'s, same ``state_dict``;
  ``convert(model, inplace=False)`` swaps them into an existing model.
- ``torch.ops.gpuconv.{conv2d, conv2d_grad_input, conv2d_grad_weight, max_pool2d,
  max_pool2d_backward}``: the registered operators (fake kernels, autograd; see ``_ops``).

CPU tensors run on the NumPy engine (float32/float64), CUDA tensors on the CUDA engine
(float16/bfloat16/float32/float64) on torch's current stream and with torch's caching allocator.
TF32 follows gpuconv's own switch, ``gpuconv.set_allow_tf32`` (off by default), not
``torch.backends.cudnn.allow_tf32`` (on by default for cuDNN convolutions): a converted float32
model computes in full FP32 unless you opt in with ``gpuconv.set_allow_tf32(True)``.

Needs PyTorch >= 2.4 (``pip install "gpuconv[torch]"``); ``import gpuconv`` alone never imports
torch.
"""
from __future__ import annotations

try:
    import torch
except ImportError as e:
    raise ImportError('gpuconv.torch needs PyTorch >= 2.4: pip install "gpuconv[torch]"') from e

if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):
    raise ImportError(f"gpuconv.torch needs PyTorch >= 2.4 (torch.library.custom_op), found "
                      f"{torch.__version__}")

from .functional import conv2d, max_pool2d  # noqa: E402
from .modules import Conv2d, MaxPool2d, convert  # noqa: E402

__all__ = ["conv2d", "max_pool2d", "Conv2d", "MaxPool2d", "convert"]
