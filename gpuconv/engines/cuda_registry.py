"""The CUDA engine's algorithm registry: op -> {name: function}, the current choice per op and
the "auto" policy.

It sits above the algorithm modules (it imports them and lets each register itself through its
``register(register_algorithm)`` hook) and below the autotuner and the engine, which installs
the policy that consults the autotuner (DESIGN.md "One-way seams"). Register more algorithms
from anywhere with :func:`register_algorithm`.

Registered functions take the engine op's arguments with every array already C-contiguous and
the op's device current::

    fprop: fn(p, x, w, bias) -> y        dgrad: fn(p, w, dy) -> dx       wgrad: fn(p, x, dy) -> dw

and may carry ``supports(p, dtype) -> bool`` (the autotuner lists only supporting ones) and
``layouts`` (memory formats they take, CONTRACT-layouts: absent = ("nchw",); the third
generation, cuda_igemm3, is ("nhwc",) and takes physical NHWC arrays) and ``generation``
(3: offered to "auto" only while gpuconv.config.third_generation_enabled()).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np

from . import cuda_im2col  # noqa: I001  (first generation first: catalogue order)
from . import cuda_igemm
from . import cuda_igemm3

#: op -> {algorithm name -> function}
ALGORITHMS: dict = {"fprop": {}, "dgrad": {}, "wgrad": {}}
AUTO = "auto"
_selected = {op: AUTO for op in ALGORITHMS}


def default_policy(op, p, dtype, layout="nchw"):
    """The "auto" choice until the engine installs its own: the first generation (both
    memory formats)."""
    return "im2col_gemm"


_auto_policy = _installed_policy = default_policy


def _check_op(op):
    if op not in ALGORITHMS:
        raise ValueError(f"op must be one of {tuple(ALGORITHMS)}, got {op!r}")


def register_algorithm(op, algo_name, fn, *, replace=False):
    """Add `fn` as algorithm `algo_name` of `op`; ValueError if the name is taken (unless replace)."""
    _check_op(op)
    if algo_name == AUTO:
        raise ValueError(f"{AUTO!r} is reserved for the automatic choice")
    if algo_name in ALGORITHMS[op] and not replace:
        raise ValueError(f"{op} algorithm {algo_name!r} is already registered")
    ALGORITHMS[op][algo_name] = fn
    return fn


def set_algorithm(op, algo_name):
    """Use `algo_name` for every later `op` call in this process ("auto": the policy decides)."""
    _check_op(op)
    if algo_name != AUTO and algo_name not in ALGORITHMS[op]:
        raise ValueError(f"unknown {op} algorithm {algo_name!r}; registered: "
                         f"{sorted(ALGORITHMS[op])} or {AUTO!r}")
    _selected[op] = algo_name


def get_algorithm(op):
    """The selected algorithm name of `op` ("auto" unless set)."""
    _check_op(op)
    return _selected[op]


@contextlib.contextmanager
def use_algorithm(op, algo_name):
    """Context manager: `op` runs with `algo_name` inside the block (process-wide, not per thread)."""
    old = get_algorithm(op)
    set_algorithm(op, algo_name)
    try:
        yield
    finally:
        _selected[op] = old


def set_auto_policy(policy=None):
    """Install `policy(op, p, dtype[, layout]) -> algorithm name` for "auto" (None: back to the installed
    default, the engine's second-generation policy once gpuconv.engines.cuda_engine is loaded).

    This is the autotuner's hook; the name it returns must be registered for `op`.
    """
    global _auto_policy
    _auto_policy = _installed_policy if policy is None else policy


def install_default_policy(policy):
    """The engine's hook: `policy` becomes both the current and the default "auto" policy."""
    global _auto_policy, _installed_policy
    _auto_policy = _installed_policy = policy


def _takes_layout(policy):
    """Does `policy` accept the op's memory format (a 4th argument or a `layout` keyword)?"""
    try:
        params = inspect.signature(policy).parameters
    except (TypeError, ValueError):
        return False
    return "layout" in params or len(params) >= 4 or any(
        q.kind == q.VAR_POSITIONAL for q in params.values())


def select(op, p, dtype, layout="nchw"):
    """(name, fn) of the algorithm that `op` on problem `p` in `dtype` runs now, for operands
    in memory format `layout` ("nchw" | "nhwc"). A policy that takes `layout` is told it; one
    written as policy(op, p, dtype) is asked for NCHW ops only: channels_last ops then get the
    first generation (the engine's fallback that takes both formats)."""
    _check_op(op)
    algo = _selected[op]
    if algo == AUTO:
        dt = np.dtype(dtype)
        if _takes_layout(_auto_policy):
            algo = _auto_policy(op, p, dt, layout=layout)
        elif layout == "nchw":
            algo = _auto_policy(op, p, dt)
        else:
            algo = default_policy(op, p, dt)
    try:
        fn = ALGORITHMS[op][algo]
    except KeyError:
        raise ValueError(f"{op} algorithm {algo!r} (chosen by the auto policy) is not "
                         f"registered; registered: {sorted(ALGORITHMS[op])}") from None
    sup = getattr(fn, "supports", None)
    if sup is not None and not sup(p, np.dtype(dtype)):
        # a forced choice (set_algorithm) outside the algorithm's domain: say so here, rather
        # than fail inside it (or launch a grid CUDA rejects)
        raise ValueError(f"{op} algorithm {algo!r} does not support {p} in "
                         f"{np.dtype(dtype).name}; use set_algorithm({op!r}, 'auto')")
    return algo, fn


# every algorithm module registers itself, first generation first (registry order = the
# autotuner's candidate order)
for _module in (cuda_im2col, cuda_igemm, cuda_igemm3):
    _module.register(register_algorithm)
