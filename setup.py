"""gpuconv: convolution layers for NVIDIA GPUs (CuPy + hand-written CUDA), NumPy CPU fallback."""
from setuptools import find_packages, setup

setup(
    name="gpuconv",
    version="0.1.0",
    description="2-D convolution layers with hand-written CUDA kernels (CuPy) and a NumPy engine",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["gpuconv", "gpuconv.*"]) + ["gpuconv.kernels"],
    package_dir={"gpuconv.kernels": "kernels"},
    package_data={"gpuconv.kernels": ["*.cu", "*.cuh"], "gpuconv.benchmark": ["*.csv"]},
    install_requires=["numpy>=1.23"],
    extras_require={
        # choose one CuPy build, matching the CUDA major version of the driver
        "cuda12": ["cupy-cuda12x>=14.2"],
        "cuda13": ["cupy-cuda13x>=14.2"],
        "digits": ["scikit-learn>=1.3"],
        "torch": ["torch>=2.4"],  # gpuconv.torch (torch.library.custom_op)
        "plot": ["matplotlib>=3.7"],
        # wheel: the install test builds a wheel without build isolation (offline GPU machine)
        "test": ["pytest>=7", "scikit-learn>=1.3", "wheel"],
    },
    entry_points={
        "console_scripts": [
            "gpuconv-train=gpuconv.train:main",
            "gpuconv-bench=gpuconv.benchmark.cli:main",
        ],
    },
)
