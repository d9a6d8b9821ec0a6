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
    # threadpoolctl: the NumPy engine's thread pool holds the BLAS to one thread per part
    install_requires=["numpy>=1.23", "threadpoolctl>=3.1"],
    extras_require={
        # choose one CuPy build, matching the CUDA major version of the driver; CuPy's [ctk]
        # extra brings the CUDA headers and NVRTC as wheels (a driver-only machine has neither),
        # ml_dtypes is CuPy's bfloat16 dtype
        "cuda12": ["cupy-cuda12x[ctk]>=14.2", "ml_dtypes>=0.5"],
        "cuda13": ["cupy-cuda13x[ctk]>=14.2", "ml_dtypes>=0.5"],
        "digits": ["scikit-learn>=1.3"],
        "torch": ["torch>=2.4"],  # gpuconv.torch (torch.library.custom_op)
        "plot": ["matplotlib>=3.7"],
        # wheel: the install test builds a wheel without build isolation (offline GPU machine);
        # NVRTC + the CUDA headers: tests/test_nvrtc_compile.py compiles every kernel as CuPy
        # does, with no GPU (no macOS wheels: the test skips there); ml_dtypes: the bfloat16
        # host runs of the kernels; matplotlib: gpuconv-train --viz
        "test": ["pytest>=7", "scikit-learn>=1.3", "wheel", "ml_dtypes>=0.5", "matplotlib>=3.7",
                 "nvidia-cuda-nvrtc>=13.0,<14; platform_system != 'Darwin'",
                 "nvidia-cuda-runtime>=13.0,<14; platform_system != 'Darwin'"],
    },
    entry_points={
        "console_scripts": [
            "gpuconv-train=gpuconv.train:main",
            "gpuconv-bench=gpuconv.benchmark.cli:main",
            "gpuconv-doctor=gpuconv.doctor:main",
        ],
    },
)
