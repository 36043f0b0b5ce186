"""Build of pfc_fast and its compiled core ``pfc_fast._C``.

The C++ (CPU, OpenMP) kernels are always built. The CUDA kernels are built when CUDA is available
to torch, or when ``FORCE_CUDA=1`` (to compile them on a machine without a GPU, as CI does);
``FORCE_ONLY_CPU=1`` skips them. Same switches as pytorch_scatter.

``PFC_FAST_NATIVE=0`` builds the CPU kernels without ``-march=native`` (for a binary that must run
on another CPU than the one it was built on).
"""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _with_cuda():
    if os.getenv("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.getenv("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _extension():
    with_cuda = _with_cuda()
    sources = [os.path.join("csrc", "pfc_fast.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3"]
    link = []
    if sys.platform != "darwin":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.getenv("PFC_FAST_NATIVE", "1") == "1":
        cxx.append("-march=native")
    macros = []
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros.append(("WITH_CUDA", None))
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
        extension = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        extension = CppExtension
    return extension(
        "pfc_fast._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=macros,
        extra_link_args=link,
        **kwargs,
    )


setup(
    name="pfc_fast",
    version="0.1.0",
    description="Exact neural-collapse and progressive-feedforward-collapse metrics for every layer of a "
    "ResNet, with fused C++/CUDA kernels, and optimal-transport tools",
    packages=find_packages(include=["pfc_fast", "pfc_fast.*"]),
    package_data={"pfc_fast": ["data/*"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy", "scipy", "matplotlib", "tqdm"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["pfc-fast=pfc_fast.cli:main"]},
    zip_safe=False,
)
