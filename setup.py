"""Builds masksc._C (C++ always, CUDA where the installed torch has CUDA) and installs
kernels/ as masksc.kernels. Install with `pip install --no-build-isolation .` after torch."""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME
import torch

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("MASKSC_NO_CUDA") != "1"

# at::parallel_for is inlined from torch's headers as OpenMP loops (Linux builds of torch);
# Apple's clang has no -fopenmp, and the loops run serially without it.
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
extra = {"cxx": ["-O3", *openmp]}
if with_cuda:
    extra["nvcc"] = ["-O3"]
    ext = CUDAExtension("masksc._C", cpp_sources + cuda_sources, extra_compile_args=extra,
                        define_macros=[("MASKSC_WITH_CUDA", None)], extra_link_args=openmp)
else:
    ext = CppExtension("masksc._C", cpp_sources, extra_compile_args=extra, extra_link_args=openmp)

setup(
    packages=["masksc", "masksc.data", "masksc.models", "masksc.kernels"],
    package_dir={"masksc.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
)
