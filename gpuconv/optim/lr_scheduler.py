"""Learning-rate schedules with ``torch.optim.lr_scheduler``'s semantics and formulas (the
same recursive updates, so the two give the same floats step by step).

Call ``scheduler.step()`` once per epoch, after the epoch's optimiser steps; constructing a
scheduler makes its initial step (last_epoch 0, the optimiser's lr unchanged).
"""
from __future__ import annotations

import math
import numbers

__all__ = ["LRScheduler", "StepLR", "CosineAnnealingLR"]


def _count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _real(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite real number >= 0, got {value!r}")
    return float(value)


class LRScheduler:
    """Base class: sets ``optimizer.lr`` to ``get_lr()`` on each step."""

    def __init__(self, optimizer):
        if not hasattr(optimizer, "lr") or not hasattr(optimizer, "step"):
            raise TypeError(f"{type(optimizer).__name__} is not a gpuconv optimiser")
        self.optimizer = optimizer
        self.base_lr = float(optimizer.lr)
        self.last_epoch = -1
        self._step_count = 0
        self._initial = True
        self.step()
        self._initial = False

    def get_lr(self):
        raise NotImplementedError

    def step(self):
        self._step_count += 1
        self.last_epoch += 1
        self.optimizer.lr = self._last_lr = float(self.get_lr())

    def get_last_lr(self):
        """[the learning rate set by the last step], a list as in PyTorch."""
        return [self._last_lr]

    def state_dict(self):
        return {k: v for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict):
        unknown = sorted(set(state_dict) - set(self.state_dict()))
        if unknown:
            raise ValueError(f"unknown keys {unknown} for {type(self).__name__}")
        self.__dict__.update(state_dict)
        self.optimizer.lr = self._last_lr


class StepLR(LRScheduler):
    """lr times gamma every step_size epochs."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        self.step_size = _count(step_size, "step_size")
        self.gamma = _real(gamma, "gamma")
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size:
            return self.optimizer.lr
        return self.optimizer.lr * self.gamma


class CosineAnnealingLR(LRScheduler):
    """``eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2``, computed with
    PyTorch's recursive form (and its restart rule past T_max)."""

    def __init__(self, optimizer, T_max, eta_min=0.0):
        self.T_max = _count(T_max, "T_max")
        self.eta_min = _real(eta_min, "eta_min")
        super().__init__(optimizer)

    def get_lr(self):
        lr, e, T, lo = self.optimizer.lr, self.last_epoch, self.T_max, self.eta_min
        if self._initial:
            return lr
        if (e - 1 - T) % (2 * T) == 0:
            return lr + (self.base_lr - lo) * (1 - math.cos(math.pi / T)) / 2
        return (1 + math.cos(math.pi * e / T)) / (1 + math.cos(math.pi * (e - 1) / T)) \
            * (lr - lo) + lo
