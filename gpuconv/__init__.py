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
)

__version__ = "0.1.0"
