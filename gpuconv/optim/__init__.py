"""Optimisers over :class:`gpuconv.nn.Parameter` lists, with PyTorch's update rules; they work
on NumPy and CuPy arrays alike. Learning-rate schedules are in :mod:`gpuconv.optim.lr_scheduler`.

>>> import numpy as np
>>> from gpuconv.nn import Parameter
>>> from gpuconv.optim import SGD
>>> p = Parameter(np.array([1.0]), grad=np.array([0.5]))
>>> SGD([p], lr=0.1).step(); p.data.tolist()
[0.95]

Every optimiser has one learning rate ``opt.lr`` (what a scheduler sets), ``zero_grad()``,
``step()``, and ``state_dict()`` / ``load_state_dict()``: the hyperparameters plus, per
parameter, its buffers (momentum, Adam's moments) as arrays on the parameter's device.
Frozen parameters (``requires_grad = False``) are skipped.
"""
from __future__ import annotations

import math
import numbers

from ..device import device_of, to_device
from ..nn import Parameter
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler"]


def _hyper(value, name, *, positive=False, below_one=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    if below_one and value >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return float(value)


class Optimizer:
    """The common part: the parameter list, per-parameter state, zero_grad and state dicts.
    Subclasses list their hyperparameters in ``_hyper_names`` and implement ``_update``."""

    _hyper_names = ("lr",)

    def __init__(self, params, lr):
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: pass model.parameters()")
        for i, p in enumerate(self.params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a "
                                "gpuconv.nn.Parameter")
        self.lr = _hyper(lr, "lr", positive=True)
        self.state = [{} for _ in self.params]  # name -> array or int, per parameter

    def zero_grad(self):
        for p in self.params:
            p.zero_grad()

    def step(self):
        for p, state in zip(self.params, self.state):
            if p.requires_grad:
                self._update(p, p.grad, state)

    def _update(self, p, g, state):
        raise NotImplementedError

    # ---- state dicts -------------------------------------------------------------------------
    def state_dict(self):
        """{"hyper": {name: value}, "state": [per parameter {name: array copy or int}]}."""
        return {"hyper": {k: getattr(self, k) for k in self._hyper_names},
                "state": [{k: (v.copy() if hasattr(v, "copy") else v) for k, v in s.items()}
                          for s in self.state]}

    def load_state_dict(self, state_dict):
        """Restores what state_dict() gave, onto the parameters' devices and dtypes; ValueError
        when the parameter count or a buffer's shape does not match. Nothing changes unless
        everything matches."""
        hyper, states = state_dict["hyper"], list(state_dict["state"])
        if len(states) != len(self.params):
            raise ValueError(f"the state dict is for {len(states)} parameters, this optimiser "
                             f"has {len(self.params)}")
        unknown = sorted(set(hyper) - set(self._hyper_names))
        if unknown:
            raise ValueError(f"unknown hyperparameters {unknown} for {type(self).__name__}")
        for i, (p, s) in enumerate(zip(self.params, states)):
            for k, v in s.items():
                if hasattr(v, "shape") and tuple(v.shape) != tuple(p.shape):
                    raise ValueError(f"state of parameter {i} ({k}) has shape "
                                     f"{tuple(v.shape)}, the parameter {tuple(p.shape)}")
        for k, v in hyper.items():
            setattr(self, k, v if isinstance(v, tuple) else float(v)
                    if isinstance(v, numbers.Real) and not isinstance(v, bool) else v)
        self.state = [{k: (to_device(v, device_of(p.data)).astype(p.dtype, copy=True)
                           if hasattr(v, "shape") else int(v)) for k, v in s.items()}
                      for p, s in zip(self.params, states)]


class SGD(Optimizer):
    """Stochastic gradient descent with PyTorch's semantics (no dampening, no Nesterov).

    For each parameter w with accumulated gradient g, on every ``step()``::

        g = g + weight_decay * w            # L2 penalty (weight_decay/2) * ||w||^2
        b = g              (first step)     # momentum buffer
        b = momentum * b + g (later steps)
        w = w - lr * b                      # b is g itself when momentum == 0

    ``step`` does not clear the gradients: call ``zero_grad()`` (here or on the model) first.
    Momentum buffers live beside their parameter; create the optimiser after ``model.to(...)``.
    """

    _hyper_names = ("lr", "momentum", "weight_decay")

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0):
        super().__init__(params, lr)
        self.momentum = _hyper(momentum, "momentum")
        self.weight_decay = _hyper(weight_decay, "weight_decay")

    def _update(self, p, g, state):
        t = p.data.dtype.type
        if self.weight_decay:
            g = g + t(self.weight_decay) * p.data
        if self.momentum:
            b = state.get("momentum_buffer")
            if b is None:
                b = state["momentum_buffer"] = g.copy()
            else:
                b *= t(self.momentum)
                b += g
            g = b
        # in place: the array object (and so its device and dtype) stays the same
        p.data -= t(self.lr) * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) as ``torch.optim.Adam``: per parameter, with t the step count,

        g = g + weight_decay * w                      # L2 (coupled) decay, if any
        m = beta1 * m + (1 - beta1) * g               # as torch: m.lerp_(g, 1 - beta1)
        v = beta2 * v + (1 - beta2) * g^2             # (amsgrad: v_max = max(v_max, v))
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    _hyper_names = ("lr", "betas", "eps", "weight_decay", "amsgrad")
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False):
        super().__init__(params, lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (_hyper(betas[0], "betas[0]", below_one=True),
                      _hyper(betas[1], "betas[1]", below_one=True))
        self.eps = _hyper(eps, "eps")
        self.weight_decay = _hyper(weight_decay, "weight_decay")
        self.amsgrad = bool(amsgrad)

    def _update(self, p, g, state):
        xp_t = p.data.dtype.type
        beta1, beta2 = self.betas
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = p.data * 0
            state["exp_avg_sq"] = p.data * 0
            if self.amsgrad:
                state["max_exp_avg_sq"] = p.data * 0
        state["step"] += 1
        step = state["step"]
        if self.weight_decay:
            if self._decoupled:
                p.data *= xp_t(1 - self.lr * self.weight_decay)
            else:
                g = g + xp_t(self.weight_decay) * p.data
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += xp_t(1 - beta1) * (g - m)
        v *= xp_t(beta2)
        v += xp_t(1 - beta2) * g * g
        if self.amsgrad:
            vmax = state["max_exp_avg_sq"]
            vmax[...] = (vmax >= v) * vmax + (vmax < v) * v  # max, NaN-free, on any xp
            v = vmax
        step_size = self.lr / (1 - beta1 ** step)
        denom = (v ** 0.5) / xp_t((1 - beta2 ** step) ** 0.5) + xp_t(self.eps)
        p.data -= xp_t(step_size) * (m / denom)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), ``torch.optim.AdamW``:
    ``w = w * (1 - lr * weight_decay)`` before the Adam step, the gradient left alone."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)
