"""Process-wide switches of the CUDA engine's second-generation algorithms.

- TF32 (``set_allow_tf32``): float32 convolutions may run on the tensor cores in TF32 (10-bit
  mantissa operands, fp32 accumulation; relative error near 1e-3 instead of 1e-6). Off by
  default, for exact float32. PyTorch differs here: its cuDNN convolutions use TF32 by default
  (``torch.backends.cudnn.allow_tf32`` defaults to True); only its matmuls default to full fp32
  (``torch.backends.cuda.matmul.allow_tf32 = False``). So gpuconv in float32 matches PyTorch
  with ``torch.backends.cudnn.allow_tf32 = False``; ``set_allow_tf32(True)`` is PyTorch's
  default convolution math (gpuconv-bench reports cuDNN with TF32 off and on).
- Autotuning (``set_autotune``): "auto" algorithm choice times the correct candidates once per
  problem and remembers the fastest (gpuconv.autotune). On by default; the environment variable
  ``GPUCONV_AUTOTUNE=0`` turns it off (a fixed heuristic picks instead).
- Second generation (``set_second_generation``): whether "auto" may pick the implicit-GEMM,
  Winograd and direct-depthwise kernels at all. Off until those kernels have passed their GPU
  tests on a real device (they were written without one): a kernel that faults would take the
  CUDA context down with it, which the autotuner's result check cannot catch. The algorithms
  stay selectable by name (``cuda_engine.set_algorithm``) and in gpuconv-bench either way.
  ``GPUCONV_SECOND_GEN=1`` turns it on.
- Third generation (``set_third_generation``): the same gate for the NHWC tensor-core kernels
  (``igemm3_*``, gpuconv.engines.cuda_igemm3), off until they have passed on a GPU;
  ``GPUCONV_THIRD_GEN=1`` turns it on. Selectable by name either way.
"""
from __future__ import annotations

import os

_allow_tf32 = False
_autotune = None  # None: follow GPUCONV_AUTOTUNE
_second_gen = None  # None: follow GPUCONV_SECOND_GEN
_third_gen = None  # None: follow GPUCONV_THIRD_GEN


def set_allow_tf32(allow: bool) -> None:
    """Allow (True) or forbid (False, the default) TF32 tensor-core math for float32."""
    global _allow_tf32
    _allow_tf32 = bool(allow)


def get_allow_tf32() -> bool:
    return _allow_tf32


def set_autotune(enabled) -> None:
    """True/False: autotune or not; None: follow GPUCONV_AUTOTUNE (default on)."""
    global _autotune
    _autotune = None if enabled is None else bool(enabled)


def autotune_enabled() -> bool:
    if _autotune is not None:
        return _autotune
    return _env_flag("GPUCONV_AUTOTUNE", "1")


def _env_flag(name, default):
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "off", "no", "")


def set_second_generation(enabled) -> None:
    """True/False: let "auto" choose second-generation kernels; None: follow GPUCONV_SECOND_GEN."""
    global _second_gen
    _second_gen = None if enabled is None else bool(enabled)


def second_generation_enabled() -> bool:
    if _second_gen is not None:
        return _second_gen
    return _env_flag("GPUCONV_SECOND_GEN", "0")


def set_third_generation(enabled) -> None:
    """True/False: let "auto" choose third-generation kernels; None: follow GPUCONV_THIRD_GEN."""
    global _third_gen
    _third_gen = None if enabled is None else bool(enabled)


def third_generation_enabled() -> bool:
    if _third_gen is not None:
        return _third_gen
    return _env_flag("GPUCONV_THIRD_GEN", "0")


__all__ = ["set_allow_tf32", "get_allow_tf32", "set_autotune", "autotune_enabled",
           "set_second_generation", "second_generation_enabled", "set_third_generation",
           "third_generation_enabled"]
