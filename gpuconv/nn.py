"""Layers in the PyTorch style with an explicit backward (the vector-Jacobian product).

Every layer is a :class:`Module`::

    y  = layer(x)              # forward; in train() mode it keeps what backward needs
    dx = layer.backward(dy)    # returns dL/dx and ADDS dL/dparam into each param.grad

Gradients accumulate (``+=``) across backward calls, as in PyTorch, so call ``zero_grad()``
between optimiser steps. The math is done by :mod:`gpuconv.functional`, or by array methods
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
import math
import numbers

import numpy as np

from . import functional as F
from ._arrays import CPU_DTYPES, check_arrays
from .device import device_of, get_array_module, parse_device, to_device
from .problem import ConvProblem, PoolProblem, _pair

__all__ = [
    "Parameter", "Module", "Conv2d", "MaxPool2d", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "ELU",
    "Maxout", "Linear", "Flatten", "Sequential", "CrossEntropyLoss", "save", "load",
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


def _float_dtype(dtype):
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in CPU_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
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


# ---------------------------------------------------------------------------------------------
# Parameter and Module
# ---------------------------------------------------------------------------------------------
class Parameter:
    """A trainable array ``data`` and its accumulated gradient ``grad`` (same shape, dtype and
    device; zeros when not given)."""

    def __init__(self, data, grad=None):
        xp = get_array_module(data)
        self.data = data
        self.grad = xp.zeros_like(data) if grad is None else grad
        if self.grad.shape != data.shape:
            raise ValueError(f"grad must have the shape of data {data.shape}, "
                             f"got {self.grad.shape}")

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def zero_grad(self):
        self.grad[...] = 0

    def __repr__(self):
        return f"Parameter(shape={self.data.shape}, dtype={self.data.dtype}, " \
               f"device={device_of(self.data)})"


class Module:
    """Base class: registers Parameters and sub-Modules assigned as attributes, in order.

    Subclasses implement ``forward(x)`` and ``backward(grad_output)``; ``module(x)`` calls
    forward. In ``train()`` mode (the default) forward keeps the activations backward needs; in
    ``eval()`` mode it keeps nothing, and backward raises.
    """

    def __init__(self):
        object.__setattr__(self, "_params", OrderedDict())
        object.__setattr__(self, "_children", OrderedDict())
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_cache", None)  # what forward keeps for backward

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                               "before assigning attributes")
        self._params.pop(name, None)
        self._children.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._children[name] = value
        object.__setattr__(self, name, value)

    # ---- the computation -----------------------------------------------------------------
    def forward(self, *args):
        raise NotImplementedError

    def backward(self, grad_output):
        raise NotImplementedError

    def __call__(self, *args):
        return self.forward(*args)

    def _keep(self, value):
        """Keeps `value` for backward in train() mode; keeps nothing in eval() mode."""
        self._cache = value if self.training else None

    def _saved(self):
        """What forward kept for backward; RuntimeError when there is nothing to use."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called without a forward in "
                               "train() mode before it")
        return self._cache

    # ---- parameters ------------------------------------------------------------------------
    def named_parameters(self, prefix=""):
        """(name, Parameter) pairs, depth first, named like PyTorch ("0.weight")."""
        for name, p in self._params.items():
            yield prefix + name, p
        for name, child in self._children.items():
            yield from child.named_parameters(prefix + name + ".")

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def modules(self):
        yield self
        for child in self._children.values():
            yield from child.modules()

    def zero_grad(self):
        for p in self.parameters():
            p.zero_grad()

    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
            if not mode:
                m._cache = None
        return self

    def eval(self):
        return self.train(False)

    def to(self, device):
        """Moves every parameter (data and grad) to ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

        RuntimeError naming the cause (no CuPy, no driver, no device) where CUDA is unusable.
        Returns self, so ``model = Model().to("cuda")`` works.
        """
        parse_device(device)  # a bad name fails before anything moves
        for m in self.modules():
            m._cache = None
            for p in m._params.values():
                p.data = to_device(p.data, device)
                p.grad = to_device(p.grad, device)
        return self

    # ---- saving and loading ---------------------------------------------------------------
    def state_dict(self):
        """name -> a copy of the parameter's data, on the parameter's device."""
        return OrderedDict((name, p.data.copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state):
        """Copies arrays (NumPy or CuPy) into the parameters, keeping their device and dtype.

        The names must match exactly (KeyError listing missing and unexpected ones) and so must
        the shapes (ValueError). Nothing is changed unless everything matches.
        """
        params = OrderedDict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise KeyError(f"state dict does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.data.shape):
                raise ValueError(f"{name}: the state dict has shape {tuple(state[name].shape)} "
                                 f"but the model's parameter has shape {tuple(p.data.shape)}")
        for name, p in params.items():
            value = to_device(state[name], device_of(p.data))
            p.data = value.astype(p.data.dtype, copy=True)

    def __repr__(self):
        if not self._children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"  ({k}): " + repr(c).replace("\n", "\n  ") for k, c in self._children.items()]
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"

    def extra_repr(self):
        return ""


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
        C = _positive_int(in_channels, "in_channels")
        K = _positive_int(out_channels, "out_channels")
        g = _positive_int(groups, "groups")
        if C % g:
            raise ValueError(f"in_channels ({C}) must be divisible by groups ({g})")
        if K % g:
            raise ValueError(f"out_channels ({K}) must be divisible by groups ({g})")
        R, S = _pair(kernel_size, "kernel_size")
        dil = _pair(dilation, "dilation")
        # ConvProblem owns the validation of stride/padding/dilation: build one on the smallest
        # input the kernel fits, so a bad argument fails here and not at the first forward.
        ConvProblem.from_args((1, C, dil[0] * (R - 1) + 1, dil[1] * (S - 1) + 1),
                              (K, C // g, R, S), stride, padding, dilation, g)
        self.in_channels, self.out_channels, self.groups = C, K, g
        self.kernel_size = (R, S)
        self.stride, self.padding, self.dilation = stride, padding, dilation
        dtype = _float_dtype(dtype)
        rng = _rng(rng)
        bound = 1.0 / math.sqrt(C // g * R * S)  # fan_in = Cg * R * S
        self.weight = Parameter(_uniform(rng, bound, (K, C // g, R, S), dtype))
        self.bias = Parameter(_uniform(rng, bound, (K,), dtype)) if bias else None

    def _args(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def forward(self, x):
        b = self.bias.data if self.bias is not None else None
        y = F.conv2d(x, self.weight.data, b, **self._args())
        self._keep(x)
        return y

    def backward(self, grad_output):
        x = self._saved()
        w = self.weight
        self.weight.grad += F.conv2d_grad_weight(x, w.shape, grad_output, **self._args())
        if self.bias is not None:
            self.bias.grad += F.conv2d_grad_bias(grad_output)
        return F.conv2d_grad_input(x.shape, w.data, grad_output, **self._args())


    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


class Linear(Module):
    """y = x @ weight.T + bias; x (N, in_features), weight (out_features, in_features)."""

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32, *, rng=None):
        super().__init__()
        self.in_features = _positive_int(in_features, "in_features")
        self.out_features = _positive_int(out_features, "out_features")
        dtype = _float_dtype(dtype)
        rng = _rng(rng)
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight = Parameter(_uniform(rng, bound, (self.out_features, self.in_features),
                                         dtype))
        self.bias = Parameter(_uniform(rng, bound, (self.out_features,), dtype)) if bias else None

    def forward(self, x):
        # The functional layer's checks (type, dtype, device) are reused; matmul would otherwise
        # silently promote float32 @ float64 or fail with an opaque message on mixed devices.
        check_arrays([("input", x), ("weight", self.weight.data)], ndim={"input": 2})
        if x.shape[1] != self.in_features:
            raise ValueError(f"input must have shape (N, {self.in_features}), got {x.shape}")
        y = x @ self.weight.data.T
        if self.bias is not None:
            y += self.bias.data
        self._keep(x)
        return y

    def backward(self, grad_output):
        x = self._saved()
        if grad_output.shape != (x.shape[0], self.out_features):
            raise ValueError(f"grad_output must have shape {(x.shape[0], self.out_features)}, "
                             f"got {grad_output.shape}")
        self.weight.grad += grad_output.T @ x
        if self.bias is not None:
            self.bias.grad += grad_output.sum(axis=0)
        return grad_output @ self.weight.data


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
        y, idx = F.max_pool2d(x, return_indices=True, **self.args)
        self._keep((x.shape, idx))
        return y

    def backward(self, grad_output):
        x_shape, idx = self._saved()
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
        return x.reshape(x.shape[:self.start_dim] + (-1,))

    def backward(self, grad_output):
        return grad_output.reshape(self._saved())


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse. ``seq[i]``, ``seq[a:b]``,
    ``len(seq)`` and iteration work as in PyTorch; parameters are named "<index>.<name>"."""

    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential takes Modules, got {type(layer).__name__} at "
                                f"position {i}")
            setattr(self, str(i), layer)

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __getitem__(self, index):
        layers = list(self._children.values())
        if isinstance(index, slice):
            return Sequential(*layers[index])
        return layers[index]

    def forward(self, x):
        for layer in self:
            x = layer(x)
        return x

    def backward(self, grad_output):
        for layer in reversed(list(self)):
            grad_output = layer.backward(grad_output)
        return grad_output


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
        loss = -log_p[rows, labels].mean()
        self._keep((log_p, labels))
        return loss

    def __call__(self, logits, labels):
        return self.forward(logits, labels)

    def backward(self, grad_output=1.0):
        log_p, labels = self._saved()
        xp = get_array_module(log_p)
        n = log_p.shape[0]
        grad = xp.exp(log_p)
        grad[xp.arange(n), labels] -= 1
        grad *= log_p.dtype.type(1.0 / n) * grad_output
        return grad.astype(log_p.dtype, copy=False)

