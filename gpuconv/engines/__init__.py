"""Engines: ``numpy_engine`` (CPU, the reference) and ``cuda_engine`` (CuPy + kernels/*.cu).

Both expose the same functions over a validated :class:`gpuconv.ConvProblem` /
:class:`gpuconv.PoolProblem`: ``conv_fprop``, ``conv_dgrad``, ``conv_wgrad``, ``pool_fprop``,
``pool_dgrad``, ``act_fprop``, ``act_dgrad``, ``maxout_fprop``, ``maxout_dgrad``.

The CUDA engine's parts, each importing only those before it: ``cuda_im2col`` (first-generation
algorithms and kernels) and ``cuda_igemm`` (second generation) add their kernels to the catalogue
(gpuconv.kernel_loader); ``cuda_registry`` registers their algorithms; gpuconv.autotune chooses
among them; ``cuda_engine`` runs the ops.
"""
