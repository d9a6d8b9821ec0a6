"""One description of a convolution (and of a pooling window) that drives every engine.

Letters as CUTLASS and cuDNN use them::

    input  x : N x C x H x W
    weight w : K x (C / groups) x R x S
    output y : N x K x P x Q

    P = (H + pad_h + pad_h_end - dil_h * (R - 1) - 1) // stride_h + 1      (Q likewise)

This module is the only place that computes P and Q (and the pooling output size). Arguments are
validated here, once; engines and kernels receive a valid problem and never re-derive its sizes.
Padding may be asymmetric only through ``padding='same'`` with an even effective kernel, where,
as in PyTorch, the extra row/column goes at the bottom/right (``pad_h_end = pad_h + 1``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
import math
import numbers

OPS = ("fprop", "dgrad", "wgrad")


def _pair(value, name, *, allow_zero=False):
    """An int or an (h, w) pair of ints -> (h, w); ValueError/TypeError naming `name`."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair (h, w), got {value!r}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    lo = 0 if allow_zero else 1
    if min(pair) < lo:
        what = "non-negative" if allow_zero else ">= 1"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(pair[0]), int(pair[1])


def _shape(shape, name, rank, *, batch=False):
    """`shape` as a tuple of `rank` positive ints; with ``batch`` the first (N) may be 0, as
    PyTorch allows an empty batch."""
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name} must be a shape (a tuple of {rank} ints), got {shape!r}") from None
    if len(shape) != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {shape}")
    if min(shape[1:] if batch else shape) < 1 or shape[0] < 0:
        what = "a batch size >= 0 and positive other sizes" if batch else "positive sizes"
        raise ValueError(f"{name} must have {what}, got shape {shape}")
    return shape


@dataclass(frozen=True)
class ConvProblem:
    """A validated 2-D convolution problem; the fields are plain ints."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    pad_h: int = 0
    pad_w: int = 0
    stride_h: int = 1
    stride_w: int = 1
    dil_h: int = 1
    dil_w: int = 1
    groups: int = 1
    pad_h_end: int | None = None
    pad_w_end: int | None = None

    def __post_init__(self):
        if self.pad_h_end is None:
            object.__setattr__(self, "pad_h_end", self.pad_h)
        if self.pad_w_end is None:
            object.__setattr__(self, "pad_w_end", self.pad_w)
        if self.N < 0:  # a batch of 0 is valid (PyTorch's); the ops return empty results
            raise ValueError(f"N must be >= 0, got {self.N}")
        for f in ("C", "H", "W", "K", "R", "S", "stride_h", "stride_w", "dil_h", "dil_w",
                  "groups"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("pad_h", "pad_w", "pad_h_end", "pad_w_end"):
            if getattr(self, f) < 0:
                raise ValueError(f"padding must be non-negative, got {f}={getattr(self, f)}")
        if self.C % self.groups:
            raise ValueError(f"in_channels ({self.C}) must be divisible by groups ({self.groups})")
        if self.K % self.groups:
            raise ValueError(f"out_channels ({self.K}) must be divisible by groups ({self.groups})")
        for (size, pad0, pad1, k, dil, axis) in (
                (self.H, self.pad_h, self.pad_h_end, self.R, self.dil_h, "height"),
                (self.W, self.pad_w, self.pad_w_end, self.S, self.dil_w, "width")):
            extent = dil * (k - 1) + 1
            if extent > size + pad0 + pad1:
                raise ValueError(
                    f"kernel {axis} with dilation ({extent}) is larger than the padded input "
                    f"{axis} ({size} + padding {pad0 + pad1} = {size + pad0 + pad1})")

    # ---- construction from the public API's arguments ----------------------------------------
    @classmethod
    def from_args(cls, input_shape, weight_shape, stride=1, padding=0, dilation=1, groups=1):
        """Validate the arguments of ``conv2d`` & co. and build the problem.

        ``padding`` is an int, an (h, w) pair, ``'valid'`` (0) or ``'same'`` (stride 1 only;
        output size equals input size, the odd extra pad at the bottom/right as in PyTorch).
        """
        return _memo(cls, cls._from_args, input_shape, weight_shape, stride, padding, dilation,
                     groups)

    @classmethod
    def _from_args(cls, input_shape, weight_shape, stride, padding, dilation, groups):
        N, C, H, W = _shape(input_shape, "input", 4, batch=True)
        K, Cg, R, S = _shape(weight_shape, "weight", 4)
        stride_h, stride_w = _pair(stride, "stride")
        dil_h, dil_w = _pair(dilation, "dilation")
        if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        groups = int(groups)
        if C % groups:
            raise ValueError(f"in_channels ({C}) must be divisible by groups ({groups})")
        if Cg * groups != C:
            raise ValueError(
                f"weight has {Cg} input channels per group but input has {C} channels with "
                f"groups={groups}: expected weight.shape[1] == {C // groups}")
        if isinstance(padding, str):
            if padding == "valid":
                pads = (0, 0, 0, 0)
            elif padding == "same":
                if (stride_h, stride_w) != (1, 1):
                    raise ValueError("padding='same' requires stride 1, got stride="
                                     f"{(stride_h, stride_w)}")
                th, tw = dil_h * (R - 1), dil_w * (S - 1)
                pads = (th // 2, tw // 2, th - th // 2, tw - tw // 2)
            else:
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', "
                                 f"got {padding!r}")
        else:
            ph, pw = _pair(padding, "padding", allow_zero=True)
            pads = (ph, pw, ph, pw)
        return cls(N, C, H, W, K, R, S, pads[0], pads[1], stride_h, stride_w, dil_h, dil_w,
                   groups, pads[2], pads[3])

    # ---- sizes ---------------------------------------------------------------------------------
    @cached_property
    def P(self) -> int:
        return (self.H + self.pad_h + self.pad_h_end - self.dil_h * (self.R - 1) - 1) \
            // self.stride_h + 1

    @cached_property
    def Q(self) -> int:
        return (self.W + self.pad_w + self.pad_w_end - self.dil_w * (self.S - 1) - 1) \
            // self.stride_w + 1

    @property
    def Cg(self) -> int:
        """Input channels per group."""
        return self.C // self.groups

    @property
    def Kg(self) -> int:
        """Output channels per group."""
        return self.K // self.groups

    @property
    def x_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def w_shape(self):
        return (self.K, self.Cg, self.R, self.S)

    @property
    def y_shape(self):
        return (self.N, self.K, self.P, self.Q)

    @property
    def symmetric_padding(self) -> bool:
        return self.pad_h == self.pad_h_end and self.pad_w == self.pad_w_end

    @property
    def is_depthwise(self) -> bool:
        return self.groups > 1 and self.Cg == 1

    def gemm_shape(self, op: str):
        """(batch, M, N, K) of the op as a GEMM per group (implicit-GEMM view, as CUTLASS)."""
        g = self.groups
        if op == "fprop":
            return (g, self.N * self.P * self.Q, self.Kg, self.Cg * self.R * self.S)
        if op == "dgrad":
            return (g, self.N * self.H * self.W, self.Cg, self.Kg * self.R * self.S)
        if op == "wgrad":
            return (g, self.Kg, self.Cg * self.R * self.S, self.N * self.P * self.Q)
        raise ValueError(f"op must be one of {OPS}, got {op!r}")

    def flops(self, op: str = "fprop") -> int:
        """Multiply-adds x 2; the same for all three ops (stride zeros are not counted)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        return 2 * self.N * self.K * self.Cg * self.R * self.S * self.P * self.Q

    def bytes_moved(self, op: str = "fprop", itemsize: int = 4) -> int:
        """Minimum DRAM traffic: each operand read once and the result written once."""
        x = self.N * self.C * self.H * self.W
        w = self.K * self.Cg * self.R * self.S
        y = self.N * self.K * self.P * self.Q
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        return (x + w + y) * itemsize

    def dgrad_phases(self, axis: str):
        """The stride-phase decomposition of dgrad along `axis` ("h" or "w"): see
        :func:`phase_taps` (one copy of this arithmetic for every engine)."""
        if axis == "h":
            return phase_taps(self.H, self.pad_h, self.R, self.dil_h, self.stride_h, self.P)
        if axis == "w":
            return phase_taps(self.W, self.pad_w, self.S, self.dil_w, self.stride_w, self.Q)
        raise ValueError(f"axis must be 'h' or 'w', got {axis!r}")

    def dgrad_phase_rows(self, axis: str):
        """dgrad's stride phases along `axis` as arithmetic progressions: see
        :func:`phase_rows` (the implicit-GEMM kernels' phase tables)."""
        return phase_rows(self.dgrad_phases(axis)[0], self.stride_h if axis == "h"
                          else self.stride_w, self.dil_h if axis == "h" else self.dil_w)

    def im2col_elements(self) -> int:
        """Elements of the explicit column matrix (C*R*S) x (N*P*Q) of the im2col algorithm."""
        return self.C * self.R * self.S * self.N * self.P * self.Q

    def with_batch(self, n: int) -> "ConvProblem":
        """The same problem on a batch of `n` (used to chunk the batch); itself for its own N
        (dataclasses.replace costs ~20 us, several times per op of a small model's step)."""
        return self if n == self.N else replace(self, N=int(n))

    def __str__(self):
        s = (f"N{self.N} C{self.C} H{self.H} W{self.W} K{self.K} R{self.R} S{self.S} "
             f"stride{self.stride_h}x{self.stride_w} pad{self.pad_h}x{self.pad_w}")
        if not self.symmetric_padding:
            s += f"(end {self.pad_h_end}x{self.pad_w_end})"
        return s + f" dil{self.dil_h}x{self.dil_w} g{self.groups} -> P{self.P} Q{self.Q}"


_MEMO: dict = {}
_MEMO_MAX = 4096


def _plain(v):
    """An argument the memo may key on (with its type: True and 1 are different keys): a Python
    int, bool, str or None, or a tuple of ints (floats, NumPy scalars and other sequences take
    the validating path every time, so they still raise)."""
    t = type(v)
    return t is int or t is bool or t is str or v is None or (
        t is tuple and all(type(e) is int for e in v))


def _memo(cls, build, *args):
    """build(*args), memoised for plain arguments: the problems are immutable, and validating
    them took 15-45 us a call, ~0.3 ms of a small model's training step."""
    if not all(_plain(a) for a in args):
        return build(*args)
    key = (cls,) + tuple((type(a), a) for a in args)
    p = _MEMO.get(key)
    if p is None:
        p = build(*args)  # raises on bad arguments: nothing is stored
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = p
    return p


@dataclass(frozen=True)
class PoolProblem:
    """A validated 2-D max-pooling problem with PyTorch's semantics (padding is -inf)."""

    N: int
    C: int
    H: int
    W: int
    R: int
    S: int
    stride_h: int
    stride_w: int
    pad_h: int = 0
    pad_w: int = 0
    dil_h: int = 1
    dil_w: int = 1
    ceil_mode: bool = False

    @classmethod
    def from_args(cls, input_shape, kernel_size, stride=None, padding=0, dilation=1,
                  ceil_mode=False):
        return _memo(cls, cls._from_args, input_shape, kernel_size, stride, padding, dilation,
                     ceil_mode)

    @classmethod
    def _from_args(cls, input_shape, kernel_size, stride, padding, dilation, ceil_mode):
        N, C, H, W = _shape(input_shape, "input", 4, batch=True)
        R, S = _pair(kernel_size, "kernel_size")
        sh, sw = _pair(kernel_size if stride is None else stride, "stride")
        ph, pw = _pair(padding, "padding", allow_zero=True)
        dh, dw = _pair(dilation, "dilation")
        if ph > R // 2 or pw > S // 2:
            raise ValueError(f"padding should be at most half of kernel_size, got padding="
                             f"{(ph, pw)} for kernel_size={(R, S)}")
        p = cls(N, C, H, W, R, S, sh, sw, ph, pw, dh, dw, bool(ceil_mode))
        if p.P < 1 or p.Q < 1:
            raise ValueError(f"max_pool2d: output size would be {p.P}x{p.Q} for input "
                             f"{H}x{W}, kernel_size={(R, S)}, padding={(ph, pw)}, "
                             f"dilation={(dh, dw)}: the window is larger than the padded input")
        return p

    @staticmethod
    def _out(size, k, s, pad, dil, ceil_mode):
        span = size + 2 * pad - dil * (k - 1) - 1
        if span < 0:
            return 0
        out = (-(-span // s) if ceil_mode else span // s) + 1
        # PyTorch's rule: the last window must start inside the input or the left padding.
        if ceil_mode and (out - 1) * s >= size + pad:
            out -= 1
        return out

    @cached_property  # (read several times per op)
    def P(self) -> int:
        return self._out(self.H, self.R, self.stride_h, self.pad_h, self.dil_h, self.ceil_mode)

    @cached_property  # (read several times per op)
    def Q(self) -> int:
        return self._out(self.W, self.S, self.stride_w, self.pad_w, self.dil_w, self.ceil_mode)

    @property
    def x_shape(self):
        return (self.N, self.C, self.H, self.W)

    @property
    def y_shape(self):
        return (self.N, self.C, self.P, self.Q)

    @property
    def disjoint_windows(self) -> bool:
        """No two windows share an input position (stride past the dilated window, as in every
        2x2/2 pool): each input gets at most one output's gradient."""
        return (self.stride_h > self.dil_h * (self.R - 1)
                and self.stride_w > self.dil_w * (self.S - 1))

    @cached_property  # (read several times per op)
    def pad_h_end(self) -> int:
        """Rows of -inf needed below the input so that every window lies inside the array."""
        return max(0, (self.P - 1) * self.stride_h + self.dil_h * (self.R - 1) + 1
                   - self.H - self.pad_h)

    @cached_property  # (read several times per op)
    def pad_w_end(self) -> int:
        return max(0, (self.Q - 1) * self.stride_w + self.dil_w * (self.S - 1) + 1
                   - self.W - self.pad_w)


# ---------------------------------------------------------------------------------------------
# dgrad's stride phases (part of the problem's description: every engine's dgrad uses them)
# ---------------------------------------------------------------------------------------------
def phase_taps(size, pad, k, dil, stride, out_size):
    """Split one axis of dgrad into stride phases.

    Input index h = ph + stride*i (i = 0..n_i-1) receives dy[p] * w[r] exactly when
    h + pad = p*stride + r*dil, i.e. p = off_r + i with off_r = (ph + pad - r*dil) / stride an
    integer. Only those taps are listed, so the stride zeros of the dilated dy are never touched.
    Taps are ordered by rising offset = falling r: the mirrored (180-degree rotated) kernel.
    Returns [(ph, n_i, [(r, off_r), ...])] and the (lo, hi) zero padding dy needs.
    """
    phases, lo, hi = [], 0, 0
    for ph in range(stride):
        n_i = -(-(size - ph) // stride) if ph < size else 0
        taps = [(r, (ph + pad - r * dil) // stride) for r in reversed(range(k))
                if (ph + pad - r * dil) % stride == 0]
        if n_i and taps:
            lo = max(lo, -min(off for _, off in taps))
            hi = max(hi, max(off for _, off in taps) + n_i - out_size)
        phases.append((ph, n_i, taps))
    return phases, lo, hi


def phase_rows(phases, stride, dil):
    """The phases of :func:`phase_taps` as arithmetic progressions, as kernel tables want them.

    The taps of one phase are r = r0 + j*step (j < taps) with p = i + p0 - j*p_step, where
    step = stride / gcd(stride, dil) and p_step = dil / gcd. Returns (rows, step, p_step),
    rows = [(r0, taps, p0, n_i)] per phase ((0, 0, 0, n_i) for a phase no tap reaches).
    """
    g = math.gcd(stride, dil)
    rows = []
    for _, n, taps in phases:
        # taps come by falling r: the last one is the smallest, r0
        rows.append((taps[-1][0], len(taps), taps[-1][1], n) if taps else (0, 0, 0, n))
    return rows, stride // g, dil // g


def conv_output_size(size, kernel, stride=1, padding=0, dilation=1):
    """Output length of one axis, for users and layers (delegates to ConvProblem)."""
    p = ConvProblem(1, 1, size, 1, 1, kernel, 1, padding, 0, stride, 1, dilation, 1)
    return p.P


def conv_transpose_output_size(size, kernel, stride=1, padding=0, dilation=1, output_padding=0):
    """Output length of one axis of a transposed convolution (PyTorch's formula): the input
    length of the convolution whose input gradient it is, plus output_padding -- the largest
    length that convolution maps back to `size` is (size - 1) * stride - 2 * padding +
    dilation * (kernel - 1) + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


__all__ = ["ConvProblem", "PoolProblem", "conv_output_size", "conv_transpose_output_size",
           "phase_taps", "phase_rows", "OPS"]
