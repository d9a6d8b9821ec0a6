"""CUDA C++ sources of the CUDA engine, shipped as package data (``gpuconv.kernels``)."""
