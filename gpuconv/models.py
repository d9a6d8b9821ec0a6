"""Networks built from :mod:`gpuconv.nn` layers: a LeNet-5-style ConvNet and ResNet-18.

``resnet18`` has PyTorch's (torchvision's) layout and parameter names -- ``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc`` -- so state dicts move between the two.
"""
from __future__ import annotations

from collections import OrderedDict
import math

import numpy as np

from . import nn
from .problem import PoolProblem

__all__ = ["ACTIVATIONS", "lenet5", "BasicBlock", "resnet18"]

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "elu": nn.ELU}


def lenet5(num_classes=10, in_channels=1, image_size=(28, 28), activation="relu",
           channels=(16, 32), hidden=64, dtype=np.float32, rng=None):
    """LeNet-5's structure (LeCun et al. 1998) sized for small images::

        conv(in -> 16, k) -> act -> maxpool 2 -> conv(16 -> 32, k) -> act -> maxpool 2
            -> flatten -> linear(32 * H/4 * W/4 -> 64) -> act -> linear(64 -> classes)

    k = 3 for images up to 16 pixels, else 5, with 'same' padding, so 8x8 digits fit too.
    ``image_size`` is (H, W) or an int; ``rng`` an int seed or a numpy Generator.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    act = ACTIVATIONS[activation]
    rng = np.random.default_rng(rng)
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    c = in_channels
    k = 3 if max(h, w) <= 16 else 5
    layers = []
    for c_out in channels:
        layers += [nn.Conv2d(c, c_out, k, padding="same", dtype=dtype, rng=rng), act(),
                   nn.MaxPool2d(2)]
        pool = PoolProblem.from_args((1, c_out, h, w), 2)  # the one place pooling sizes live
        c, h, w = c_out, pool.P, pool.Q
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden, dtype=dtype, rng=rng), act(),
               nn.Linear(hidden, num_classes, dtype=dtype, rng=rng)]
    return nn.Sequential(*layers)


def _conv(c_in, c_out, k, stride, dtype, rng):
    """A bias-free conv with torchvision's ResNet init: kaiming_normal_(mode='fan_out',
    nonlinearity='relu'), std = sqrt(2 / (c_out * k * k))."""
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False, dtype=dtype)
    std = math.sqrt(2.0 / (c_out * k * k))
    conv.weight.data[...] = rng.normal(0.0, std, conv.weight.shape)
    return conv


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)),
    s the identity or, where the shape changes, ``downsample`` = a strided 1x1 conv + BN."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1, dtype=np.float32, rng=None):
        super().__init__()
        rng = np.random.default_rng(rng)
        self.conv1 = _conv(in_planes, planes, 3, stride, dtype, rng)
        self.bn1 = nn.BatchNorm2d(planes, dtype=dtype)
        self.relu1 = nn.ReLU()  # one instance per use: a layer keeps only its last forward
        self.conv2 = _conv(planes, planes, 3, 1, dtype, rng)
        self.bn2 = nn.BatchNorm2d(planes, dtype=dtype)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(_conv(in_planes, planes, 1, stride, dtype, rng),
                                            nn.BatchNorm2d(planes, dtype=dtype))
        self.relu2 = nn.ReLU()
        self._body = [self.conv1, self.bn1, self.relu1, self.conv2, self.bn2]

    def forward(self, x):
        y = x
        for layer in self._body:
            y = layer(y)
        s = x if self.downsample is None else self.downsample(x)
        return self.relu2(y + s)

    def backward(self, grad_output):
        with nn._forget_on_error(self):
            g = self.relu2.backward(grad_output)
            gs = g if self.downsample is None else self.downsample.backward(g)
            for layer in reversed(self._body):
                g = layer.backward(g)
        return g + gs


def resnet18(num_classes=1000, in_channels=3, *, small_input=False, width=64,
             dtype=np.float32, rng=None):
    """ResNet-18: a stem, four stages of two BasicBlocks (width, 2, 4, 8 x width channels,
    stride 2 from the second stage on), global average pooling and a linear classifier.

    The stem is ImageNet's 7x7/2 conv + 3x3/2 max-pool, or with ``small_input=True`` a 3x3/1
    conv and no pooling (for CIFAR- or digit-sized images, which the ImageNet stem would shrink
    to nothing). ``width`` (64 in the paper) scales every stage, for quick experiments.
    """
    rng = np.random.default_rng(rng)
    w = nn._positive_int(width, "width")
    stem_k, stem_s = (3, 1) if small_input else (7, 2)
    layers = OrderedDict(
        conv1=_conv(in_channels, w, stem_k, stem_s, dtype, rng),
        bn1=nn.BatchNorm2d(w, dtype=dtype), relu=nn.ReLU(),
        maxpool=nn.Identity() if small_input else nn.MaxPool2d(3, 2, 1))
    c = w
    for i, planes in enumerate((w, 2 * w, 4 * w, 8 * w), start=1):
        stride = 1 if i == 1 else 2
        layers[f"layer{i}"] = nn.Sequential(BasicBlock(c, planes, stride, dtype, rng),
                                            BasicBlock(planes, planes, 1, dtype, rng))
        c = planes
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c, num_classes, dtype=dtype, rng=rng)
    return nn.Sequential(layers)
