"""Layers in the PyTorch style with an explicit backward (the vector-Jacobian product).

Every layer is a :class:`Module`::

    y  = layer(x)              # forward; in train() mode it keeps what backward needs
    dx = layer.backward(dy)    # returns dL/dx and ADDS dL/dparam into each param.grad

Gradients accumulate (``+=``) across backward calls, as in PyTorch, so call ``zero_grad()``
between optimiser steps. A layer keeps only its last training forward: a second training
forward before backward, or a second backward after one forward, raises RuntimeError instead of
giving a wrong gradient; run forwards that need no backward in ``eval()`` mode or inside
``with gpuconv.no_grad():`` (see :class:`Module`). The math is done by :mod:`gpuconv.functional`, or by array methods
every array module has (``x @ w.T``), so a layer runs on NumPy arrays on the CPU and on CuPy
arrays on a GPU alike; ``module.to("cuda")`` moves its parameters.

Shapes: images (N, C, H, W); ``Linear`` takes (N, in_features); ``CrossEntropyLoss`` takes logits
(N, classes) and integer labels (N,). Initialisation is PyTorch's (``kaiming_uniform_(a=sqrt(5))``
for weights, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for biases), so a model
built here starts from the same distribution as its torch twin, and copying weights across gives
the same outputs.
"""
from __future__ import annotations

from collections import OrderedDict
import contextlib
import inspect
import math
import numbers
import threading

import numpy as np

from . import functional as F
from ._arrays import (CPU_DTYPES, GPU_DTYPES, check_arrays, check_shape, is_cupy_array,
                      memory_format, to_format)
from .device import device_of, get_array_module, parse_device, to_device
from .engines import cpu_memory as _cpu_memory
from .engines import cpu_threads as _cpu_threads
from .engines import numpy_engine as _numpy_engine
from .problem import ConvProblem, PoolProblem, _pair

__all__ = [
    "Parameter", "Module", "Conv2d", "MaxPool2d", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "ELU",
    "Maxout", "Linear", "Flatten", "Sequential", "CrossEntropyLoss", "save", "load",
    "no_grad", "is_grad_enabled", "ConvTranspose2d", "BatchNorm2d", "Dropout", "AvgPool2d",
    "AdaptiveAvgPool2d", "Identity", "ModuleList", "Residual", "summary", "record_outputs",
]


# ---------------------------------------------------------------------------------------------
# argument checks (constructor arguments; array arguments are checked by gpuconv.functional)
# ---------------------------------------------------------------------------------------------
def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _real(value, name, *, minimum=None, positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0) or (
            minimum is not None and value < minimum):
        need = "> 0" if positive else f">= {minimum}" if minimum is not None else "finite"
        raise ValueError(f"{name} must be finite and {need}, got {value!r}")
    return value


def _float_dtype(dtype, allowed=CPU_DTYPES):
    names = " or ".join(str(d) for d in allowed)
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be {names}, got {dtype!r}") from None
    if dt not in allowed:
        raise TypeError(f"dtype must be {names}, got {dt}")
    return dt


def _rng(rng):
    """A numpy Generator from None (fresh entropy), an int seed, or a Generator."""
    if rng is None or isinstance(rng, numbers.Integral):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise TypeError(f"rng must be None, an int seed or a numpy.random.Generator, got {rng!r}")


def _uniform(rng, bound, shape, dtype):
    # drawn in float64 and rounded, so float32 and float64 models from one seed agree
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _channels(in_channels, out_channels, groups):
    C = _positive_int(in_channels, "in_channels")
    K = _positive_int(out_channels, "out_channels")
    g = _positive_int(groups, "groups")
    if C % g:
        raise ValueError(f"in_channels ({C}) must be divisible by groups ({g})")
    if K % g:
        raise ValueError(f"out_channels ({K}) must be divisible by groups ({g})")
    return C, K, g


def _init_weight_and_bias(layer, rng, fan_in, weight_shape, n_out, bias, dtype):
    """PyTorch's default: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight first."""
    dtype = _float_dtype(dtype)
    rng = _rng(rng)
    bound = 1.0 / math.sqrt(fan_in)
    layer.weight = Parameter(_uniform(rng, bound, weight_shape, dtype))
    layer.bias = Parameter(_uniform(rng, bound, (n_out,), dtype)) if bias else None


# ---------------------------------------------------------------------------------------------
# gradient mode: gc.no_grad()
# ---------------------------------------------------------------------------------------------
class _GradMode(threading.local):
    enabled = True


_GRAD_MODE = _GradMode()


@contextlib.contextmanager
def no_grad():
    """Forwards inside ``with gpuconv.no_grad():`` keep nothing for backward, in any mode.

    Use it (or ``eval()``) for forwards that need no backward, such as peeking at validation
    logits between a training forward and its backward: the pending training forward stays
    what backward uses. Train-mode behaviour (dropout masks, batch statistics) is unchanged, as
    in PyTorch. Thread-local; works as a decorator too (``@gpuconv.no_grad()``).
    """
    previous = _GRAD_MODE.enabled
    _GRAD_MODE.enabled = False
    try:
        yield
    finally:
        _GRAD_MODE.enabled = previous


def is_grad_enabled():
    """False inside :func:`no_grad`."""
    return _GRAD_MODE.enabled


# ---------------------------------------------------------------------------------------------
# Parameter and Module
# ---------------------------------------------------------------------------------------------
class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (same shape, dtype and
    device; zeros when not given).

    ``requires_grad = False`` freezes it: ``grad`` becomes None, layers skip its gradient and
    optimisers skip it. ``np.asarray(param)`` gives its data (NumPy data only, as for CuPy
    arrays, which refuse an implicit copy to the host).
    """

    def __init__(self, data, grad=None, requires_grad=True):
        xp = get_array_module(data)
        self.data = data
        self._requires_grad = bool(requires_grad)
        if not self._requires_grad:
            if grad is not None:
                raise ValueError("a Parameter with requires_grad=False keeps no grad")
            self.grad = None
            return
        self.grad = xp.zeros_like(data) if grad is None else grad
        if self.grad.shape != data.shape:
            raise ValueError(f"grad must have the shape of data {data.shape}, "
                             f"got {self.grad.shape}")

    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, flag):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"requires_grad must be a bool, got {flag!r}")
        self._requires_grad = bool(flag)
        if not flag:
            self.grad = None
        elif self.grad is None:
            self.grad = get_array_module(self.data).zeros_like(self.data)

    def requires_grad_(self, flag=True):
        self.requires_grad = flag
        return self

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __array__(self, dtype=None, copy=None):
        a = np.asarray(self.data, dtype=dtype)  # CuPy data: CuPy's TypeError, as for its arrays
        return a.copy() if copy else a

    def zero_grad(self):
        if self.grad is not None:
            self.grad[...] = 0

    def __repr__(self):
        frozen = "" if self._requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, " \
               f"device={device_of(self.data)}{frozen})"


def _in_format(a, fmt):
    """`a` in memory format `fmt` (one copy if it is in the other; see gpuconv._arrays)."""
    return a if a.ndim != 4 or memory_format(a) == fmt else to_format(a, fmt)


def _add_grad(param, compute):
    """param.grad += compute(), unless param is None or frozen (then compute is not run)."""
    if param is not None and param.requires_grad:
        param.grad += compute()


_STATE = frozenset(("_cache", "_forwards", "_used", "_format"))


class Module:
    """Base class: registers Parameters, buffers and sub-Modules assigned as attributes, in order.

    Subclasses implement ``forward(x)`` and ``backward(grad_output)``; ``module(x)`` calls
    forward. In ``train()`` mode (the default) forward keeps what backward needs; in ``eval()``
    mode, or inside :func:`no_grad`, it keeps nothing and leaves the last training forward as
    it was.

    A layer keeps only its *last* training forward, and backward uses it up. So that this can
    never silently give a wrong gradient, backward raises RuntimeError when it is called twice
    after one forward (the gradients would be added twice) and when forward ran more than once
    in train mode since the last backward (backward would pair the gradient with the wrong
    activations). The second case also covers one module instance used at two places of a
    model (legitimate in PyTorch, whose autograd records every use): here give each place its
    own instance. Parameters and modules reached twice are listed once, as in PyTorch.
    """

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)  # what forward keeps for backward
        object.__setattr__(self, "_forwards", 0)  # training forwards since the last backward
        object.__setattr__(self, "_used", False)  # backward has used the last forward

    def __setattr__(self, name, value):
        if name in _STATE:  # forward's bookkeeping (every training step): never registered
            object.__setattr__(self, name, value)
            return
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes")
        if name in self._buffers:  # buffers stay buffers: running_mean = new array
            self._buffers[name] = value
            object.__setattr__(self, name, value)
            return
        if isinstance(value, (list, tuple)) and not name.startswith("_") \
                and any(isinstance(v, (Module, Parameter)) for v in value):
            # PyTorch accepts this silently and the model then has no such parameters
            raise TypeError(f"{type(self).__name__}.{name}: a plain {type(value).__name__} "
                            "hides its modules' parameters from parameters(), state_dict() "
                            "and the optimiser; use gpuconv.nn.ModuleList (or Sequential)")
        # a replaced Parameter or Module keeps its place (and so its state-dict position)
        if not isinstance(value, Parameter):
            self._params.pop(name, None)
        if not isinstance(value, Module):
            self._children.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, value):
        """A non-trained array saved in the state dict and moved by ``to()`` (None: absent)."""
        self._params.pop(name, None)
        self._children.pop(name, None)
        self._buffers[name] = value
        object.__setattr__(self, name, value)

    # ---- the computation -----------------------------------------------------------------
    def forward(self, *args):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def __call__(self, *args):
        return self.forward(*args)

    def _keep(self, value):
        """Keeps `value` for backward in train() mode with gradients enabled; otherwise keeps
        nothing and leaves a pending training forward in place."""
        if self.training and _GRAD_MODE.enabled:
            self._cache = value
            self._forwards += 1

    def _saved(self):
        """What forward kept for backward, used up; RuntimeError when it cannot be right."""
        name = type(self).__name__
        if self._forwards > 1:
            n = self._forwards
            self._forget()
            raise RuntimeError(
                f"{name}.backward: forward ran {n} times in train() mode since the last "
                "backward, but a layer keeps only its last forward, so this gradient would be "
                "wrong. Run forwards that need no backward in eval() mode or inside "
                "`with gpuconv.no_grad():`; a module used at two places in one model needs "
                "one instance per place. Run forward again, then backward.")
        if self._forwards == 0:
            if self._used:
                raise RuntimeError(
                    f"{name}.backward called twice after one forward: the gradients would be "
                    "added twice. Run forward again before each backward.")
            raise RuntimeError(f"{name}.backward called without a forward in train() mode "
                               "before it")
        cache = self._cache
        self._cache, self._forwards, self._used = None, 0, True
        return cache

    def _forget(self):
        """Drops what forward kept, here and in every sub-module."""
        for m in self.modules():
            m._cache, m._forwards, m._used = None, 0, False

    # ---- parameters and buffers --------------------------------------------------------------
    def _named_members(self, kind, prefix, seen):
        if id(self) in seen["modules"]:
            return
        seen["modules"].add(id(self))
        for name, v in getattr(self, kind).items():
            if v is not None and id(v) not in seen["members"]:
                seen["members"].add(id(v))
                yield prefix + name, v
        for name, child in self._children.items():
            yield from child._named_members(kind, prefix + name + ".", seen)

    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs, depth first, named like PyTorch ("0.weight"); a Parameter
        or module reached twice is listed once."""
        return self._named_members("_params", prefix, {"modules": set(), "members": set()})

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix=""):
        return self._named_members("_buffers", prefix, {"modules": set(), "members": set()})

    def named_modules(self, prefix="", _seen=None):
        """(name, module) pairs, this module first ("" for itself), each module once."""
        _seen = set() if _seen is None else _seen
        if id(self) in _seen:
            return
        _seen.add(id(self))
        yield prefix, self
        for name, child in self._children.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, _seen)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def children(self):
        return iter(self._children.values())

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def requires_grad_(self, flag=True):
        """Freezes (False) or unfreezes every parameter; returns self."""
        for p in self.parameters():
            p.requires_grad = flag
        return self

    def train(self, mode=True):
        """Sets the mode of every sub-module. A pending training forward survives eval(), so a
        validation pass in eval() mode between a forward and its backward is harmless."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    # ---- devices and dtypes ------------------------------------------------------------------
    def to(self, device=None, dtype=None):
        """Moves every parameter (data and grad) and buffer to ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``, and/or converts floating ones to `dtype`; ``to(np.float64)`` and
        ``to("float64")`` work as in PyTorch.

        RuntimeError naming the cause (no CuPy, no driver, no device) where CUDA is unusable.
        Returns self, so ``model = Model().to("cuda")`` works. Create optimisers afterwards:
        their state stays where it was.
        """
        if dtype is None and _looks_like_dtype(device):
            device, dtype = None, device
        if device is not None or dtype is None:
            parse_device(device)  # a bad name fails before anything moves
        dt = None if dtype is None else _float_dtype(dtype, GPU_DTYPES)

        def convert(a):
            if a is None:
                return None
            if device is not None:
                a = to_device(a, device)
            if dt is not None and a.dtype.kind == "f":
                a = a.astype(dt, copy=False)
            return a

        self._forget()
        for m in self.modules():
            for p in m._params.values():
                if p is not None:
                    p.data, p.grad = convert(p.data), convert(p.grad)
            for name, b in m._buffers.items():
                setattr(m, name, convert(b))
        return self

    def cuda(self, device=None):
        return self.to("cuda" if device is None else f"cuda:{int(device)}")

    def cpu(self):
        return self.to("cpu")

    def double(self):
        return self.to(np.float64)

    def float(self):
        return self.to(np.float32)

    def half(self):
        """float16: the GPU engine only."""
        return self.to(np.float16)

    # ---- saving and loading ---------------------------------------------------------------
    def _state_items(self):
        """(name, holder, attribute) in PyTorch's state_dict order: each module's parameters,
        then its buffers, then its children."""
        seen = set()
        for prefix, m in self.named_modules():
            prefix = prefix + "." if prefix else ""
            for name, p in m._params.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, p, "data"
            for name, b in m._buffers.items():
                if b is not None:
                    yield prefix + name, m, name

    def state_dict(self):
        """name -> a copy of each parameter's data and buffer, on its device (PyTorch's names
        and order, so a torch state dict converted with ``.numpy()`` loads)."""
        return OrderedDict((name, getattr(holder, attr).copy())
                           for name, holder, attr in self._state_items())

    def load_state_dict(self, state):
        """Copies arrays (NumPy, CuPy, or anything ``np.asarray`` takes) into the parameters
        and buffers, keeping their device and dtype.

        The names must match exactly (KeyError listing missing and unexpected ones) and so must
        the shapes (ValueError). Nothing is changed unless everything matches.
        """
        items = [(name, holder, attr) for name, holder, attr in self._state_items()]
        names = [name for name, _, _ in items]
        missing = [k for k in names if k not in state]
        unexpected = [k for k in state if k not in names]
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
        for name, holder, attr in items:
            have = getattr(holder, attr)
            if tuple(state[name].shape) != tuple(have.shape):
                raise ValueError(f"{name}: the state dict has shape {tuple(state[name].shape)} "
                                 f"but the model's has shape {tuple(have.shape)}")
        for name, holder, attr in items:
            have = getattr(holder, attr)
            value = state[name]
            if not isinstance(value, np.ndarray) and not is_cupy_array(value):
                value = np.asarray(value)  # e.g. a torch CPU tensor
            value = to_device(value, device_of(have)).astype(have.dtype, copy=True)
            setattr(holder, attr, value)
        self._forget()

    def __repr__(self):
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({k}): " + repr(c).replace("\n", "\n  ") for k, c in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


@contextlib.contextmanager
def _forget_on_error(container):
    """A backward through a container that fails part way leaves some layers used and others
    pending; forget them all, so that the next forward + backward starts clean."""
    try:
        yield
    except BaseException:
        container._forget()
        raise


def _looks_like_dtype(value):
    """True for a dtype given to Module.to() where a device could stand (np.float64,
    np.dtype('float32'), 'float64'); device names and bad values are left to parse_device."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return True
    if isinstance(value, str):
        try:
            parse_device(value)
            return False
        except ValueError:
            pass
        try:
            return np.dtype(value).kind == "f"
        except TypeError:
            return False
    return False


def save(model, path):
    """Writes ``model.state_dict()`` to an .npz file (NumPy arrays, names like "0.weight")."""
    arrays = {name: to_device(a, "cpu") for name, a in model.state_dict().items()}
    with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
        np.savez(f, **arrays)


def load(model, path):
    """Loads parameters saved by :func:`save` into `model` (on whatever device it is)."""
    with np.load(path, allow_pickle=False) as f:
        model.load_state_dict({name: f[name] for name in f.files})
    return model


# ---------------------------------------------------------------------------------------------
# layers with parameters
# ---------------------------------------------------------------------------------------------
class Conv2d(Module):
    """2-D convolution y = conv(x, weight) + bias (a cross-correlation, as in PyTorch).

    x (N, in_channels, H, W) -> y (N, out_channels, P, Q); weight (out_channels,
    in_channels // groups, kH, kW), bias (out_channels,). ``padding`` may be an int, a pair,
    ``'valid'`` or ``'same'``. ``rng`` (an int seed or a numpy Generator) makes the
    initialisation reproducible.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, dtype=np.float32, *, rng=None):
        super().__init__()
        C, K, g = _channels(in_channels, out_channels, groups)
        R, S = _pair(kernel_size, "kernel_size")
        dil = _pair(dilation, "dilation")
        # ConvProblem owns the validation of stride/padding/dilation: build one on the smallest
        # input the kernel fits, so a bad argument fails here and not at the first forward.
        ConvProblem.from_args((1, C, dil[0] * (R - 1) + 1, dil[1] * (S - 1) + 1),
                              (K, C // g, R, S), stride, padding, dilation, g)
        self.in_channels, self.out_channels, self.groups = C, K, g
        self.kernel_size = (R, S)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        _init_weight_and_bias(self, rng, C // g * R * S, (K, C // g, R, S), K, bias, dtype)

    def _args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def forward(self, x):
        b = self.bias.data if self.bias is not None else None
        wgrad_follows = self.training and _GRAD_MODE.enabled and self.weight.requires_grad
        # (then the NumPy engine keeps the column matrix for that wgrad)
        with _numpy_engine.keep_columns() if wgrad_follows else contextlib.nullcontext():
            y = F.conv2d(x, self.weight.data, b, **self._args())
        self._keep(x)
        self._format = memory_format(y)
        return y

    def backward(self, grad_output, needs_input_grad=True):
        """Adds dL/dweight, dL/dbias into the parameters' grad and returns dL/dx -- or None
        with ``needs_input_grad=False`` (a first layer: the input gradient is not computed, as
        PyTorch skips it for an input that does not require grad)."""
        x = self._saved()
        w = self.weight
        # as autograd's convolution_backward: the gradients take the forward's memory format
        # (grad_output converted once if it comes in the other); weight.grad keeps its own
        grad_output = _in_format(grad_output, getattr(self, "_format", "nchw"))
        _add_grad(w, lambda: F.conv2d_grad_weight(x, w.shape, grad_output, **self._args()))
        _add_grad(self.bias, lambda: F.conv2d_grad_bias(grad_output))
        if not needs_input_grad:
            return None
        return F.conv2d_grad_input(x.shape, w.data, grad_output, **self._args())


    def _flops(self, x_shape):
        return ConvProblem.from_args(x_shape, self.weight.shape, **self._args()).flops()

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


def _matmul(a, b):
    """a @ b; for NumPy arrays on the NumPy engine's thread pool (see engines.cpu_threads)."""
    if type(a) is np.ndarray and type(b) is np.ndarray and a.ndim == b.ndim == 2:
        return _cpu_threads.matmul(a, b)
    return a @ b


class Linear(Module):
    """y = x @ weight.T + bias; x (N, in_features), weight (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, *, rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        _init_weight_and_bias(self, rng, self.in_features,
                              (self.out_features, self.in_features), self.out_features, bias,
                              dtype)

    def forward(self, x):
        # The functional layer's checks (type, dtype, device) are reused; matmul would otherwise
        # silently promote float32 @ float64 or fail with an opaque message on mixed devices.
        check_arrays([("input", x), ("weight", self.weight.data)], ndim={"input": 2})
        if x.shape[1] != self.in_features:
            raise ValueError(f"input must have shape (N, {self.in_features}), got {x.shape}")
        y = _matmul(x, self.weight.data.T)
        if self.bias is not None:
            y += self.bias.data
        self._keep(x)
        return y

    def backward(self, grad_output, needs_input_grad=True):
        """Adds the parameter gradients; returns dL/dx, or None with needs_input_grad=False."""
        x = self._saved()
        if grad_output.shape != (x.shape[0], self.out_features):
            raise ValueError(f"grad_output must have shape {(x.shape[0], self.out_features)}, "
                             f"got {grad_output.shape}")
        _add_grad(self.weight, lambda: _matmul(grad_output.T, x))
        _add_grad(self.bias, lambda: grad_output.sum(axis=0))
        return _matmul(grad_output, self.weight.data) if needs_input_grad else None


    def _flops(self, x_shape):
        return 2 * x_shape[0] * self.in_features * self.out_features

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------
# layers without parameters
# ---------------------------------------------------------------------------------------------
class MaxPool2d(Module):
    """Max over each kernel_size window (PyTorch's semantics; stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        dh, dw = _pair(dilation, "dilation")
        # PoolProblem owns the validation; the smallest input the window fits makes it run now
        PoolProblem.from_args((1, 1, dh * (kh - 1) + 1, dw * (kw - 1) + 1), kernel_size,
                              stride, padding, dilation, ceil_mode)
        self.args = dict(kernel_size=kernel_size, stride=stride, padding=padding,
                         dilation=dilation, ceil_mode=bool(ceil_mode))

    def forward(self, x):
        return self._forward(x, after_relu=False)

    def _forward(self, x, after_relu):
        """forward; after_relu (gpuconv.nn.Sequential, for an input that is a ReLU's output)
        also keeps ~(y <= 0) as uint8, which is the ReLU's mask ~(x_relu <= 0) at each
        window's winner (y = max(x_relu, 0) there: > 0 exactly where x_relu > 0, NaN where it
        is NaN), taken now, before anything can change y; _relu_pool_backward then reads no x.
        Only NumPy arrays and disjoint windows, the only case whose backward uses it."""
        y, idx = F.max_pool2d(x, return_indices=True, **self.args)
        if after_relu and self.training and _GRAD_MODE.enabled and type(y) is np.ndarray \
                and PoolProblem.from_args(x.shape, **self.args).disjoint_windows:
            # (a reused buffer: no fresh pages every step)
            mask = np.less_equal(y, 0, out=_cpu_memory.empty(y.shape, np.bool_))
            np.logical_not(mask, out=mask)
            self._keep((x.shape, idx, mask.view(np.uint8)))
        else:
            self._keep((x.shape, idx))
        return y

    def backward(self, grad_output):
        x_shape, idx = self._saved()[:2]
        # dx in the input's memory format (PyTorch's), which the indices carry
        grad_output = _in_format(grad_output, memory_format(idx))
        return F.max_pool2d_backward(grad_output, idx, x_shape, **self.args)


    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.args.items())


class _Activation(Module):
    """An elementwise activation: ``forward`` keeps the input x and/or output y its gradient
    needs (``saves`` is "x", "y" or "xy")."""

    saves = "x"

    def _fwd(self, x):
        raise NotImplementedError

    def _bwd(self, x, y, grad_output):
        raise NotImplementedError

    def forward(self, x):
        y = self._fwd(x)
        self._keep((x if "x" in self.saves else None, y if "y" in self.saves else None))
        return y

    def backward(self, grad_output):
        x, y = self._saved()
        return self._bwd(x, y, grad_output)


class ReLU(_Activation):
    """max(x, 0)."""

    def _fwd(self, x):
        return F.relu(x)

    def _bwd(self, x, y, grad_output):
        return F.relu_backward(x, grad_output)


class LeakyReLU(_Activation):
    """x for x > 0, negative_slope * x otherwise (default slope 0.1, as in the lecture)."""

    def __init__(self, negative_slope=0.1):
        super().__init__()
        self.negative_slope = _real(negative_slope, "negative_slope")

    def _fwd(self, x):
        return F.leaky_relu(x, self.negative_slope)

    def _bwd(self, x, y, grad_output):
        return F.leaky_relu_backward(x, grad_output, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


class Sigmoid(_Activation):
    """1 / (1 + exp(-x)); backward from the output: dy * y * (1 - y)."""

    saves = "y"

    def _fwd(self, x):
        return F.sigmoid(x)

    def _bwd(self, x, y, grad_output):
        return F.sigmoid_backward(y, grad_output)


class Tanh(_Activation):
    """tanh(x); backward from the output: dy * (1 - y^2)."""

    saves = "y"

    def _fwd(self, x):
        return F.tanh(x)

    def _bwd(self, x, y, grad_output):
        return F.tanh_backward(y, grad_output)


class ELU(_Activation):
    """x for x > 0, alpha * (exp(x) - 1) otherwise."""

    saves = "xy"

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = _real(alpha, "alpha")

    def _fwd(self, x):
        return F.elu(x, self.alpha)

    def _bwd(self, x, y, grad_output):
        return F.elu_backward(x, y, grad_output, self.alpha)

    def extra_repr(self):
        return f"alpha={self.alpha}"


class Maxout(Module):
    """Max over groups of `pieces` consecutive entries of `axis` (channels by default):
    (N, C, ...) -> (N, C // pieces, ...)."""

    def __init__(self, pieces, axis=1):
        super().__init__()
        self.pieces = _positive_int(pieces, "pieces")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {axis!r}")
        self.axis = int(axis)

    def forward(self, x):
        y, idx = F.maxout(x, self.pieces, self.axis, return_indices=True)
        self._keep((x.shape, idx))
        return y

    def backward(self, grad_output):
        x_shape, idx = self._saved()
        return F.maxout_backward(grad_output, idx, self.pieces, x_shape, self.axis)


    def extra_repr(self):
        return f"pieces={self.pieces}, axis={self.axis}"


class Flatten(Module):
    """(N, d1, d2, ...) -> (N, d1*d2*...): dimensions from start_dim on become one."""

    def __init__(self, start_dim=1):
        super().__init__()
        if isinstance(start_dim, bool) or not isinstance(start_dim, numbers.Integral) \
                or start_dim < 0:
            raise ValueError(f"start_dim must be a non-negative int, got {start_dim!r}")
        self.start_dim = int(start_dim)

    def forward(self, x):
        if x.ndim < self.start_dim:
            raise ValueError(f"input has {x.ndim} dimensions, fewer than start_dim "
                             f"({self.start_dim})")
        self._keep(x.shape)
        # the size written out: reshape(..., -1) cannot infer it for an empty batch
        return x.reshape(x.shape[:self.start_dim] + (math.prod(x.shape[self.start_dim:]),))

    def backward(self, grad_output):
        x_shape = self._saved()
        flat = x_shape[:self.start_dim] + (math.prod(x_shape[self.start_dim:]),)
        check_arrays([("grad_output", grad_output)])
        check_shape("grad_output", grad_output, flat)
        return grad_output.reshape(x_shape)


class _ModuleSequence:
    """len(), iteration and indexing (a slice gives a new container of the same type) over
    a module's children, for Sequential and ModuleList."""

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __getitem__(self, index):
        items = list(self._children.values())
        return self._from_list(items[index]) if isinstance(index, slice) else items[index]


class Sequential(_ModuleSequence, Module):
    """Layers applied in order; backward runs them in reverse. ``seq[i]``, ``seq[a:b]``,
    ``len(seq)`` and iteration work as in PyTorch; parameters are named "<index>.<name>", or
    "<name>.<name>" for ``Sequential(OrderedDict([(name, layer), ...]))``."""

    def __init__(self, *layers):
        super().__init__()
        # Sequential(OrderedDict(name=layer, ...)) names the layers, as in PyTorch
        named = layers[0].items() if len(layers) == 1 and isinstance(layers[0], OrderedDict) \
            else ((str(i), layer) for i, layer in enumerate(layers))
        for i, (name, layer) in enumerate(named):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at "
                                f"position {i}")
            setattr(self, name, layer)

    @classmethod
    def _from_list(cls, layers):
        return cls(*layers)

    def forward(self, x):
        prev = None
        for layer in self:
            if _relu_then_pool(prev, layer, "forward"):
                x = layer._forward(x, after_relu=True)  # also keeps the winners' ReLU mask
            else:
                x = layer(x)
            prev = layer
        return x

    def backward(self, grad_output, needs_input_grad=True):
        """Backward through the layers in reverse; returns dL/dx.

        ``needs_input_grad=False`` (what a training loop wants: nobody needs dL/d(images))
        returns None and computes no more than the parameters need, as autograd does for an
        input that does not require grad: the first layer with trainable parameters gets
        ``needs_input_grad=False`` (Conv2d, Linear, ConvTranspose2d then skip their input
        gradient; another layer computes and drops it), and the parameter-free layers before
        it run no backward at all (their kept forward is used up, so the same safety errors
        hold: a second backward after one forward still raises)."""
        layers = list(self)
        start = 0 if needs_input_grad else next(
            (i for i, m in enumerate(layers) if _has_trainable(m)), len(layers))
        with _forget_on_error(self):
            i = len(layers) - 1
            while i >= start:
                if i == start and not needs_input_grad:
                    _backward_params_only(layers[i], grad_output)
                elif i - 1 >= start and _relu_then_pool(layers[i - 1], layers[i]):
                    grad_output = _relu_pool_backward(layers[i - 1], layers[i], grad_output)
                    i -= 1
                else:
                    grad_output = layers[i].backward(grad_output)
                i -= 1
            for layer in layers[:start]:
                _use_up_forward(layer)
        return grad_output if needs_input_grad else None


_TAKES_NEEDS_INPUT_GRAD = {}


def _takes_needs_input_grad(method):
    """Whether a bound backward accepts needs_input_grad= (inspect.signature, ~50 us, once per
    class's function; a method set on the instance is looked at every time)."""
    fn = getattr(method, "__func__", None)
    if fn is None or getattr(method, "__self__", None) is None:
        return "needs_input_grad" in inspect.signature(method).parameters
    v = _TAKES_NEEDS_INPUT_GRAD.get(fn)
    if v is None:
        v = _TAKES_NEEDS_INPUT_GRAD[fn] = "needs_input_grad" in inspect.signature(
            method).parameters
    return v


FUSE_RELU_POOL = True  # Sequential: a ReLU followed by a MaxPool2d back-propagated in one step


def _relu_then_pool(a, b, method="backward"):
    """Whether Sequential may run a's and b's `method` as one (MaxPool2d._forward(after_relu),
    _relu_pool_backward): exactly a ReLU then a MaxPool2d, neither with that method replaced
    on the instance (a profiler's wrapper, say, must see its calls)."""
    return (FUSE_RELU_POOL and type(a) is ReLU and type(b) is MaxPool2d
            and method not in a.__dict__ and method not in b.__dict__)


def _relu_pool_backward(relu, pool, grad_output):
    """relu.backward(pool.backward(grad_output)) with the same values and the same safety
    checks (both kept forwards are used up); on the NumPy engine one pass over the pooled
    positions instead of three over the ReLU's whole input and the pool's gradient (see
    bench/NOTES.md, issue 11 seventh session). The ReLU's mask at the pool's winners is the
    one MaxPool2d._forward(after_relu=True) kept, when that forward ran; else it is read from x."""
    saved = pool._saved()
    x_shape, idx = saved[:2]
    x, _ = relu._saved()
    grad_output = _in_format(grad_output, memory_format(idx))
    if tuple(x.shape) != tuple(x_shape):  # not the pair's own forwards: the two steps raise
        return F.relu_backward(x, F.max_pool2d_backward(grad_output, idx, x_shape, **pool.args))
    return F._relu_max_pool2d_backward(x, grad_output, idx, **pool.args,
                                       winners_mask=saved[2] if len(saved) > 2 else None)


def _has_trainable(module):
    return any(p.requires_grad for p in module.parameters())


def _backward_params_only(module, grad_output):
    """module.backward for its parameters' gradients only (its input gradient unused)."""
    if _takes_needs_input_grad(module.backward):
        module.backward(grad_output, needs_input_grad=False)
    else:
        module.backward(grad_output)


def _use_up_forward(module):
    """What a skipped backward would have done to the safety state: every sub-module that kept
    a forward (or already used its last one) goes through _saved(), which raises on a stale
    forward or a second backward and otherwise marks the forward used."""
    for m in module.modules():
        if m._forwards or m._used:
            m._saved()


class CrossEntropyLoss(Module):
    """Softmax + mean negative log-likelihood over integer labels.

    ``loss = -(1/N) * sum_n log softmax(logits[n])[labels[n]]``; logits (N, classes), labels
    (N,) integers in [0, classes). ``forward`` returns a 0-d array on the logits' device
    (``float(loss)`` reads it); ``backward(grad_output=1.0)`` returns dlogits
    ``= grad_output * (softmax(logits) - onehot(labels)) / N``.
    """

    def __init__(self):
        super().__init__()

    def forward(self, logits, labels):
        xp = check_arrays([("logits", logits)], ndim={"logits": 2})
        if get_array_module(labels) is not xp:
            raise TypeError("labels must be on the same device as logits")
        if labels.shape != (logits.shape[0],):
            raise ValueError(f"labels must have shape ({logits.shape[0]},), got {labels.shape}")
        if labels.dtype.kind not in "iu":
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        n, k = logits.shape
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in [0, {k}), got values in "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        # log-softmax with the row max subtracted: exp never overflows, and the largest term
        # is exp(0) = 1, so the log never sees 0
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_sum = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
        log_p = shifted - log_sum
        rows = xp.arange(n)
        # an empty batch gives NaN, as in PyTorch (the mean of nothing), without a warning
        loss = -log_p[rows, labels].sum() / log_p.dtype.type(n) if n else \
            xp.asarray(np.nan, dtype=log_p.dtype)
        self._keep((log_p, labels))
        return loss

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def backward(self, grad_output=1.0):
        log_p, labels = self._saved()
        xp = get_array_module(log_p)
        if isinstance(grad_output, numbers.Real) and not isinstance(grad_output, bool):
            scale = float(grad_output)
        elif (isinstance(grad_output, np.ndarray) or is_cupy_array(grad_output)) \
                and grad_output.shape == () and grad_output.dtype.kind == "f":
            scale = float(grad_output)  # the loss is a scalar: so is its upstream gradient
        else:
            raise ValueError("grad_output must be a real number or a 0-d float array (the "
                             f"loss is a scalar), got {getattr(grad_output, 'shape', grad_output)!r}")
        n = log_p.shape[0]
        grad = xp.exp(log_p)
        grad[xp.arange(n), labels] -= 1
        if n:
            grad *= log_p.dtype.type(scale / n)
        return grad



# ---------------------------------------------------------------------------------------------
# the lecture's next layers: deconvolution, batch normalisation, dropout, average pooling
# ---------------------------------------------------------------------------------------------
class ConvTranspose2d(Module):
    """The transposed convolution ("deconvolution"), ``torch.nn.ConvTranspose2d``.

    x (N, in_channels, H, W) -> y (N, out_channels, H_out, W_out) with ``H_out = (H - 1)*stride
    - 2*padding + dilation*(kH - 1) + output_padding + 1``; weight (in_channels, out_channels //
    groups, kH, kW), bias (out_channels,), initialised as PyTorch does (fan_in from the
    weight's second axis: U(-b, b), b = 1/sqrt(out_channels/groups * kH * kW)).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, dtype=np.float32, *,
                 rng=None):
        super().__init__()
        C, K, g = _channels(in_channels, out_channels, groups)
        R, S = _pair(kernel_size, "kernel_size")
        ph, pw = _pair(padding, "padding", allow_zero=True) if not isinstance(padding, str) \
            else (0, 0)
        self.args = dict(stride=stride, padding=padding, output_padding=output_padding,
                         groups=g, dilation=dilation)
        # the functional op owns the validation: run it on an input every padding fits
        F._transpose_problem((1, C, 2 * ph + 1, 2 * pw + 1), (C, K // g, R, S), **self.args)
        self.in_channels, self.out_channels, self.kernel_size = C, K, (R, S)
        # torch takes fan_in from the weight's second axis: out_channels / groups here
        _init_weight_and_bias(self, rng, K // g * R * S, (C, K // g, R, S), K, bias, dtype)

    def forward(self, x):
        b = self.bias.data if self.bias is not None else None
        y = F.conv_transpose2d(x, self.weight.data, b, **self.args)
        self._keep(x)
        return y

    def backward(self, grad_output, needs_input_grad=True):
        """Adds the parameter gradients; returns dL/dx, or None with needs_input_grad=False."""
        x = self._saved()
        w = self.weight
        _add_grad(w, lambda: F.conv_transpose2d_grad_weight(x, w.shape, grad_output,
                                                            **self.args))
        _add_grad(self.bias, lambda: F.conv2d_grad_bias(grad_output))
        if not needs_input_grad:
            return None
        return F.conv_transpose2d_grad_input(x.shape, w.data, grad_output, **self.args)

    def _flops(self, x_shape):
        return F._transpose_problem(x_shape, self.weight.shape, **self.args).flops("dgrad")

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                + ", ".join(f"{k}={v!r}" for k, v in self.args.items())
                + f", bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Batch normalisation over (N, H, W) per channel, ``torch.nn.BatchNorm2d``.

    Train mode normalises with the batch's mean and biased variance and updates
    ``running_mean`` / ``running_var`` (the unbiased variance) with ``momentum`` (None: the
    cumulative average over ``num_batches_tracked`` batches); eval mode uses the running
    statistics (the batch's when ``track_running_stats=False``). ``y = (x - mean) /
    sqrt(var + eps) * weight + bias``; state-dict keys ``weight, bias, running_mean,
    running_var, num_batches_tracked`` as PyTorch's, so its checkpoints load.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, dtype=np.float32):
        super().__init__()
        self.num_features = _positive_int(num_features, "num_features")
        self.eps = _real(eps, "eps", positive=True)
        self.momentum = None if momentum is None else _real(momentum, "momentum", minimum=0)
        if self.momentum is not None and self.momentum > 1:
            raise ValueError(f"momentum must lie in [0, 1] or be None, got {momentum!r}")
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        dtype = _float_dtype(dtype)
        C = self.num_features
        self.weight = Parameter(np.ones(C, dtype)) if affine else None
        self.bias = Parameter(np.zeros(C, dtype)) if affine else None
        track = self.track_running_stats
        self.register_buffer("running_mean", np.zeros(C, dtype) if track else None)
        self.register_buffer("running_var", np.ones(C, dtype) if track else None)
        self.register_buffer("num_batches_tracked", np.array(0, np.int64) if track else None)

    def forward(self, x):
        xp = check_arrays([("input", x), ("weight", getattr(self.weight, "data", None)),
                           ("running_mean", self.running_mean)], ndim={"input": 4})
        if x.shape[1] != self.num_features:
            raise ValueError(f"input must have {self.num_features} channels (N, "
                             f"{self.num_features}, H, W), got shape {x.shape}")
        acc = np.float32 if x.dtype == np.float16 else x.dtype  # float16 statistics in float32
        m = x.shape[0] * x.shape[2] * x.shape[3]
        batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1  # counted even for an empty batch, as in PyTorch
        if m == 0:
            self._keep((None, None))
            return x.copy()
        if batch_stats:
            if self.training and m == 1:
                raise ValueError("BatchNorm2d: expected more than 1 value per channel when "
                                 f"training, got input of shape {x.shape}")
            xa = x.astype(acc, copy=False)
            mean = xa.mean(axis=(0, 2, 3))
            var = xa.var(axis=(0, 2, 3))
            if self.training and self.track_running_stats:
                f = self.momentum if self.momentum is not None \
                    else 1.0 / float(self.num_batches_tracked)
                rt = self.running_mean.dtype.type
                self.running_mean *= rt(1 - f)
                self.running_mean += (rt(f) * mean).astype(rt, copy=False)
                self.running_var *= rt(1 - f)
                self.running_var += (rt(f * m / (m - 1)) * var).astype(rt, copy=False)
        else:
            xa = x.astype(acc, copy=False)
            mean = self.running_mean.astype(acc, copy=False)
            var = self.running_var.astype(acc, copy=False)
        invstd = 1 / xp.sqrt(var + np.dtype(acc).type(self.eps))
        xhat = (xa - mean[:, None, None]) * invstd[:, None, None]
        y = xhat
        if self.affine:
            y = xhat * self.weight.data.astype(acc)[:, None, None] \
                + self.bias.data.astype(acc)[:, None, None]
        self._keep((xhat, invstd))
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        xhat, invstd = self._saved()  # train mode: the batch statistics' gradient
        if xhat is None:  # an empty batch
            return grad_output.copy()
        check_shape("grad_output", grad_output, xhat.shape)
        g = grad_output.astype(xhat.dtype, copy=False)
        _add_grad(self.weight, lambda: (g * xhat).sum(axis=(0, 2, 3)).astype(
            self.weight.dtype, copy=False))
        _add_grad(self.bias, lambda: g.sum(axis=(0, 2, 3)).astype(self.bias.dtype, copy=False))
        if self.affine:
            g = g * self.weight.data.astype(xhat.dtype)[:, None, None]
        # dx = invstd * (g - mean(g) - xhat * mean(g * xhat)), the means over (N, H, W)
        dx = (g - g.mean(axis=(0, 2, 3), keepdims=True)
              - xhat * (g * xhat).mean(axis=(0, 2, 3), keepdims=True)) * invstd[:, None, None]
        return dx.astype(grad_output.dtype, copy=False)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class Dropout(Module):
    """Zeroes each element with probability p in train mode and scales the rest by 1/(1 - p)
    (inverted dropout: eval mode is the identity). ``rng`` (an int seed or a numpy Generator)
    makes the masks reproducible; masks are drawn on the host, so a CPU and a GPU model from
    one seed drop the same elements."""

    def __init__(self, p=0.5, *, rng=None):
        super().__init__()
        p = _real(p, "p", minimum=0)
        if p > 1:
            raise ValueError(f"dropout probability p must lie in [0, 1], got {p!r}")
        self.p = p
        self.rng = _rng(rng)

    def forward(self, x):
        check_arrays([("input", x)])
        if not self.training or self.p == 0:
            self._keep(None)
            return x
        keep = self.rng.random(x.shape) >= self.p
        scale = 0.0 if self.p == 1 else 1.0 / (1.0 - self.p)
        mask = to_device((keep * scale).astype(x.dtype), device_of(x))
        mask = _in_format(mask, memory_format(x))   # the same values, laid out as x (PyTorch)
        self._keep(mask)
        return x * mask

    def backward(self, grad_output):
        mask = self._saved()
        if mask is None:
            return grad_output
        check_shape("grad_output", grad_output, mask.shape)
        return grad_output * mask

    def extra_repr(self):
        return f"p={self.p}"


class AvgPool2d(Module):
    """Mean over each window, ``torch.nn.AvgPool2d`` (stride defaults to kernel_size)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False,
                 count_include_pad=True):
        super().__init__()
        kh, kw = _pair(kernel_size, "kernel_size")
        PoolProblem.from_args((1, 1, kh, kw), kernel_size, stride, padding, 1, ceil_mode)
        self.args = dict(kernel_size=kernel_size, stride=stride, padding=padding,
                         ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad))

    def forward(self, x):
        y = F.avg_pool2d(x, **self.args)
        self._keep(x.shape)
        return y

    def backward(self, grad_output):
        return F.avg_pool2d_backward(grad_output, self._saved(), **self.args)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.args.items())


class AdaptiveAvgPool2d(Module):
    """Mean over PyTorch's adaptive bins: output row i averages input rows floor(i*H/P) to
    ceil((i+1)*H/P) - 1 (columns likewise). ``output_size`` is an int or a pair whose entries
    may be None (keep that input size); 1 is the global average pooling of ResNet."""

    def __init__(self, output_size):
        super().__init__()
        pair = tuple(output_size) if isinstance(output_size, (tuple, list)) \
            else (output_size, output_size)
        if len(pair) != 2:
            raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
        self.output_size = tuple(None if v is None else _positive_int(v, "output_size")
                                 for v in pair)

    @staticmethod
    def _bins(size, out, dtype):
        """(out, size) matrix whose rows average the bins (the pooling as a matmul)."""
        a = np.zeros((out, size))
        for i in range(out):
            lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
            a[i, lo:hi] = 1.0 / (hi - lo)
        return a.astype(dtype)

    def _matrices(self, x_shape, dtype, device):
        H, W = x_shape[2:]
        P = H if self.output_size[0] is None else self.output_size[0]
        Q = W if self.output_size[1] is None else self.output_size[1]
        return (to_device(self._bins(H, P, dtype), device),
                to_device(self._bins(W, Q, dtype), device))

    @staticmethod
    def _pool(ah, aw, x, fmt):
        """ah @ x @ aw.T over the (H, W) planes, the result in memory format `fmt`: for "nhwc"
        two matmuls on x's (N, H, W*C) / (N*P, W, C) memory (a view when x is channels_last)."""
        if fmt != "nhwc":
            return ah @ x @ aw.T
        N, C, H, W = x.shape
        P, Q = ah.shape[0], aw.shape[0]
        t = ah @ x.transpose(0, 2, 3, 1).reshape(N, H, W * C)        # (N, P, W*C)
        y = aw @ t.reshape(N * P, W, C)                               # (N*P, Q, C)
        return y.reshape(N, P, Q, C).transpose(0, 3, 1, 2)

    def forward(self, x):
        check_arrays([("input", x)], ndim={"input": 4})
        ah, aw = self._matrices(x.shape, x.dtype, device_of(x))
        fmt = memory_format(x)
        self._keep((x.shape, ah, aw, fmt))
        return self._pool(ah, aw, x, fmt)

    def backward(self, grad_output):
        # dx in the forward input's format, as torch (an (N, C, 1, 1) grad names none)
        x_shape, ah, aw, fmt = self._saved()
        check_shape("grad_output", grad_output, x_shape[:2] + (ah.shape[0], aw.shape[0]))
        return self._pool(ah.T, aw.T, grad_output, fmt)

    def extra_repr(self):
        return f"output_size={self.output_size}"


class Identity(Module):
    """y = x (a placeholder, e.g. the shortcut of a residual block)."""

    def forward(self, x):
        return x

    def backward(self, grad_output):
        return grad_output


# ---------------------------------------------------------------------------------------------
# containers for networks that are not a plain chain
# ---------------------------------------------------------------------------------------------
class ModuleList(_ModuleSequence, Module):
    """A list of Modules whose parameters are registered (named "<index>.<name>"); a plain
    Python list attribute would hide them from parameters() and the optimiser. It has no
    forward: the owner decides how its entries are applied."""

    def __init__(self, modules=()):
        super().__init__()
        self.extend(modules)

    def append(self, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList takes Modules, got {type(module).__name__}")
        setattr(self, str(len(self._children)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    _from_list = classmethod(lambda cls, layers: cls(layers))

    def __setitem__(self, index, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList takes Modules, got {type(module).__name__}")
        key = list(self._children)[index]
        setattr(self, key, module)

    def forward(self, *args):
        raise NotImplementedError("ModuleList has no forward: apply its modules in your own "
                                  "Module's forward (and their backward in reverse)")


class Residual(Module):
    """y = body(x) + shortcut(x), the shortcut the identity when None (He et al. 2016);
    backward sums the gradients of both paths."""

    def __init__(self, body, shortcut=None):
        super().__init__()
        for name, m in (("body", body), ("shortcut", shortcut)):
            if m is not None and not isinstance(m, Module):
                raise TypeError(f"{name} must be a Module, got {type(m).__name__}")
        self.body = body
        self.shortcut = shortcut

    def forward(self, x):
        y = self.body(x)
        s = x if self.shortcut is None else self.shortcut(x)
        if y.shape != s.shape:
            raise ValueError(f"Residual: the body gives shape {y.shape} but the shortcut "
                             f"{s.shape}; give a shortcut that matches (e.g. a strided 1x1 "
                             "convolution)")
        return y + s

    def backward(self, grad_output):
        with _forget_on_error(self):
            g = self.body.backward(grad_output)
            gs = grad_output if self.shortcut is None else self.shortcut.backward(grad_output)
        return g + gs


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def record_outputs(model, x, select=None):
    """Runs ``model(x)`` in eval mode under no_grad and returns, for each leaf module that
    ``select(name, module)`` accepts (all when None), in call order, a dict with its
    ``name``, ``module``, ``input_shape`` and ``output`` array. The model's modes, pending
    training forwards and running statistics are left as they were."""
    leaves = [(n, m) for n, m in model.named_modules()
              if not m._children and (select is None or select(n, m))]
    records = []

    def recorder(name, m, forward):
        def run(*args):
            y = forward(*args)
            records.append({"name": name or type(m).__name__, "module": m,
                            "input_shape": tuple(args[0].shape), "output": y})
            return y
        return run

    modes = {id(m): m.training for m in model.modules()}
    try:
        for name, m in leaves:
            object.__setattr__(m, "forward", recorder(name, m, m.forward))
        model.eval()  # keeps pending training forwards; no_grad adds none
        with no_grad():
            model(x)
    finally:
        for _, m in leaves:
            m.__dict__.pop("forward", None)
        for m in model.modules():
            object.__setattr__(m, "training", modes[id(m)])
    return records


def summary(model, input_shape, file=None):
    """Prints, for each leaf layer of `model` run on an input of `input_shape` (batch
    included), its output shape, parameter count and FLOPs (multiply-adds x 2, from
    ConvProblem for convolutions), then the totals; returns the rows as dicts.

    The forward runs in eval mode under no_grad on zeros of the model's dtype and device, so
    the model's state (running statistics, pending forwards) is unchanged.
    """
    import sys
    out = sys.stdout if file is None else file
    params = model.parameters()
    dtype = params[0].dtype if params else np.float32
    device = device_of(params[0].data) if params else "cpu"
    x = to_device(np.zeros(tuple(int(s) for s in input_shape), dtype), device)
    rows = []
    for r in record_outputs(model, x):
        m = r["module"]
        rows.append({"name": r["name"], "type": type(m).__name__,
                     "output_shape": tuple(r["output"].shape),
                     "params": sum(p.data.size for p in m._params.values() if p is not None),
                     "flops": int(m._flops(r["input_shape"])) if hasattr(m, "_flops") else 0})
    width = max([len(r["name"]) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'type':<18} {'output shape':<20} {'params':>10} "
          f"{'FLOPs':>14}", file=out)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['type']:<18} {str(r['output_shape']):<20} "
              f"{r['params']:>10,} {r['flops']:>14,}", file=out)
    total_params = sum(p.data.size for p in params)
    print(f"total: {total_params:,} parameters, {sum(r['flops'] for r in rows):,} FLOPs "
          f"for input {tuple(input_shape)}", file=out)
    return rows
