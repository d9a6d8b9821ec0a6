"""gpuconv: convolution layers for NVIDIA GPUs on CuPy, with a NumPy engine as CPU fallback.

``import gpuconv`` needs only NumPy: CuPy is imported the first time a CuPy array arrives.
"""
from .problem import ConvProblem, PoolProblem, conv_output_size
from .functional import (
    conv2d, conv2d_grad_input, conv2d_grad_weight, conv2d_grad_bias,
    max_pool2d, max_pool2d_backward,
    relu, sigmoid, tanh, elu, leaky_relu, maxout,
    relu_backward, sigmoid_backward, tanh_backward, elu_backward, leaky_relu_backward,
    maxout_backward,
    conv_transpose2d, conv_transpose2d_grad_input, conv_transpose2d_grad_weight,
    avg_pool2d, avg_pool2d_backward,
)
from .config import set_allow_tf32, get_allow_tf32, set_autotune, set_second_generation

# CUDA helpers from gpuconv.cuda, resolved on first use (PEP 562) so that `import gpuconv` loads
# neither CuPy nor gpuconv.cuda, and `python -m gpuconv.cuda` runs without a double import.
_CUDA_EXPORTS = ("cuda_available", "require_cuda", "precompile", "CudaUnavailableError",
                 "KernelCompileError", "get_workspace_limit", "set_workspace_limit",
                 "workspace_limit")


def __getattr__(name):
    if name in _CUDA_EXPORTS:
        from . import cuda
        return getattr(cuda, name)
    raise AttributeError(f"module 'gpuconv' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_CUDA_EXPORTS))


from . import data, device, nn, optim, models
from .nn import no_grad, is_grad_enabled

__version__ = "0.1.0"
