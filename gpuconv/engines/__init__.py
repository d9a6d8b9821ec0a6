"""Engines: ``numpy_engine`` (CPU, the reference) and ``cuda_engine`` (CuPy + kernels/*.cu).

Both expose the same functions over a validated :class:`gpuconv.ConvProblem` /
:class:`gpuconv.PoolProblem`: ``conv_fprop``, ``conv_dgrad``, ``conv_wgrad``, ``pool_fprop``,
``pool_dgrad``, ``act_fprop``, ``act_dgrad``, ``maxout_fprop``, ``maxout_dgrad``.
"""
