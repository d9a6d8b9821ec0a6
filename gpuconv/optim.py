"""Optimisers over :class:`gpuconv.nn.Parameter` lists; they work on NumPy and CuPy arrays alike.

>>> import numpy as np
>>> from gpuconv.nn import Parameter
>>> from gpuconv.optim import SGD
>>> p = Parameter(np.array([1.0]), grad=np.array([0.5]))
>>> SGD([p], lr=0.1).step(); p.data.tolist()
[0.95]
"""
from __future__ import annotations

import math
import numbers

from .nn import Parameter

__all__ = ["SGD"]


def _hyper(value, name, *, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


class SGD:
    """Stochastic gradient descent with PyTorch's semantics (no dampening, no Nesterov).

    For each parameter w with accumulated gradient g, on every ``step()``::

        g = g + weight_decay * w            # L2 penalty (weight_decay/2) * ||w||^2
        b = g              (first step)     # momentum buffer
        b = momentum * b + g (later steps)
        w = w - lr * b                      # b is g itself when momentum == 0

    ``step`` does not clear the gradients: call ``zero_grad()`` (here or on the model) first.
    Momentum buffers live beside their parameter; create the optimiser after ``model.to(...)``.
    """

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: pass model.parameters()")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a "
                                "gpuconv.nn.Parameter")
        self.lr = _hyper(lr, "lr", positive=True)
        self.momentum = _hyper(momentum, "momentum")
        self.weight_decay = _hyper(weight_decay, "weight_decay")
        self._buffers = [None] * len(self.params)

    def zero_grad(self):
        for p in self.params:
            p.zero_grad()

    def step(self):
        for i, p in enumerate(self.params):
            if not p.requires_grad:
                continue  # frozen
            g = p.grad
            if self.weight_decay:
                g = g + p.data.dtype.type(self.weight_decay) * p.data
            if self.momentum:
                b = self._buffers[i]
                if b is None:
                    b = self._buffers[i] = g.copy()
                else:
                    b *= p.data.dtype.type(self.momentum)
                    b += g
                g = b
            # in place: the array object (and so its device and dtype) stays the same
            p.data -= p.data.dtype.type(self.lr) * g
