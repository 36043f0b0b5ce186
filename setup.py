"""Build of pfc_fast and its compiled core ``pfc_fast._C``.

The C++ (CPU, OpenMP) kernels are always built. The CUDA kernels are built when CUDA is available
to torch, or when ``FORCE_CUDA=1`` (to compile them on a machine without a GPU, as CI does);
``FORCE_ONLY_CPU=1`` skips them. Same switches as pytorch_scatter.

The CPU kernels are built for the x86-64 baseline and, on x86-64, also for AVX2 + FMA and for
AVX-512, the best variant the CPU supports being chosen at load time (csrc/common/cpu_isa.h), so
one binary runs fast on any x86-64 CPU; ``PFC_FAST_NATIVE=1`` builds one variant with
``-march=native`` instead (for the build machine only; see README.md "Install").

The metadata (dependencies, extras, version, licence) is in pyproject.toml. The build needs the
torch that is already installed, so it runs without pip's build isolation
(``pip install --no-build-isolation .``); without torch this file still makes the sdist and the
metadata, and stops a build at once, naming that command.

``pfc_fast._simt`` is the CUDA kernels built by the host compiler against the SIMT layer
(``csrc/simt``), which runs them on CPU tensors: the tests' ``simt`` cases. It needs Boost.Context
(Debian's ``libboost-context-dev``). ``PFC_FAST_SIMT=1`` builds it (and fails without Boost), ``0``
skips it, unset builds it where Boost is found. ``PFC_FAST_SIMT_ASAN=1`` builds it with
AddressSanitizer (run Python with ``LD_PRELOAD`` of libasan; see tools/simt_asan.sh).
"""
import glob
import os
import platform
import sys

import setuptools
from setuptools import setup

if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject.toml's licence expression needs it
    raise SystemExit(f"pfc_fast needs setuptools >= 77 to build (this Python has {setuptools.__version__}): "
                     'pip install "setuptools>=77" wheel ninja')

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # an sdist or metadata build, or a build in pip's isolated environment
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
#: The setup.py commands that compile the core (and so need torch).
BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "develop", "install", "editable_wheel"}
NO_TORCH = ("pfc_fast compiles its C++/CUDA core against the torch that is installed, and this Python has no "
            "torch (pip's default build isolation hides it). Install torch (>= 2.11, < 2.15) first, then build "
            "without isolation: pip install --no-build-isolation .  (README.md, Install)")


def _with_cuda():
    if os.getenv("FORCE_ONLY_CPU", "0") == "1":
        return False
    if os.getenv("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _cpu_flags():
    """Compile and link flags of the host-compiled (CPU and SIMT) code."""
    cxx = ["-O3"]
    link = []
    if sys.platform != "darwin":
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    native = os.getenv("PFC_FAST_NATIVE", "0")
    if native not in ("0", "1"):
        raise SystemExit(f"PFC_FAST_NATIVE must be 0 or 1, got {native!r}")
    if native == "1":
        cxx.append("-march=native")
    return cxx, link


def _extension():
    with_cuda = _with_cuda()
    # csrc/<op family>/: <family>_cpu.cpp always, <family>_cuda.cu with CUDA (csrc/simt builds those too)
    sources = [os.path.join("csrc", "pfc_fast.cpp")] + sorted(glob.glob(os.path.join("csrc", "*", "*_cpu.cpp")))
    cxx, link = _cpu_flags()
    macros = []
    if "-march=native" not in cxx and platform.machine().lower() in ("x86_64", "amd64"):
        # the CPU kernels twice more, for AVX2 + FMA and for AVX-512, chosen at load time (csrc/common/cpu_isa.h)
        sources += sorted(glob.glob(os.path.join("csrc", "*", "*_cpu_avx*.cpp")))
        macros.append(("PFC_CPU_VARIANTS", None))
    kwargs = {}
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*", "*_cuda.cu")))
        macros.append(("WITH_CUDA", None))
        kwargs["extra_compile_args"] = {"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}
        extension = CUDAExtension
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx}
        extension = CppExtension
    macros.append(("PFC_NATIVE", "1" if "-march=native" in cxx else "0"))
    return extension(
        "pfc_fast._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=macros,
        extra_link_args=link,
        **kwargs,
    )


BOOST_HEADER = os.path.join("boost", "context", "fiber.hpp")


def _boost_include():
    """The include folder that holds Boost.Context, or None."""
    roots = [os.path.join(os.environ[var], "include") for var in ("BOOST_ROOT", "CONDA_PREFIX") if os.getenv(var)]
    for root in roots + ["/usr/include", "/usr/local/include", "/opt/homebrew/include"]:
        if os.path.exists(os.path.join(root, BOOST_HEADER)):
            return root
    return None


def _simt_extension():
    """pfc_fast._simt, or None when PFC_FAST_SIMT=0 or (unset) Boost.Context is not found."""
    wanted = os.getenv("PFC_FAST_SIMT", "")
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"PFC_FAST_SIMT must be 0 or 1, got {wanted!r}")
    boost = _boost_include()
    if wanted == "0" or (wanted == "" and boost is None):
        return None
    if boost is None:
        raise SystemExit("PFC_FAST_SIMT=1: the SIMT layer needs Boost.Context, and boost/context/fiber.hpp was not "
                         "found (Debian/Ubuntu: apt-get install libboost-context-dev; or set BOOST_ROOT)")
    cxx, link = _cpu_flags()
    cxx += ["-Wno-unknown-pragmas"]  # the kernels' #pragma unroll is for nvcc
    macros = [("PFC_SIMT", None)]
    if os.getenv("PFC_FAST_SIMT_ASAN", "0") == "1":
        cxx = [flag for flag in cxx if flag != "-O3"] + ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        link += ["-fsanitize=address"]
        macros += [("PFC_SIMT_ASAN", None)]
    library_dirs = [] if boost == "/usr/include" else [os.path.join(os.path.dirname(boost), "lib")]
    return CppExtension(
        "pfc_fast._simt",
        sorted(glob.glob(os.path.join("csrc", "simt", "*.cpp"))),
        include_dirs=[os.path.join(HERE, "csrc"), boost],
        define_macros=macros,
        library_dirs=library_dirs,
        libraries=["boost_context"],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


if torch is None and BUILD_COMMANDS & set(sys.argv[1:]):
    raise SystemExit(NO_TORCH)
setup(
    ext_modules=[] if torch is None else [ext for ext in (_extension(), _simt_extension()) if ext is not None],
    cmdclass={} if torch is None else {"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
