"""Build of the taylorshift C++/CUDA extension against the installed torch.

Install with `pip install --no-build-isolation .` so that the extension is
compiled against the torch already in the environment (an isolated build
environment would pull a second torch of several GB).

Switches (environment variables):
  TAYLORSHIFT_FORCE_CPU=1   build the CPU kernels only, even where CUDA is found
  TAYLORSHIFT_FORCE_CUDA=1  fail unless the CUDA kernels can be built
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0a": 9.0a is H100/H200 with wgmma)
  MAX_JOBS                  parallel compile jobs (read by torch's builder)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

DEFAULT_CUDA_ARCH_LIST = "8.0;9.0a"


def want_cuda() -> bool:
    force_cpu = os.environ.get("TAYLORSHIFT_FORCE_CPU", "0") == "1"
    force_cuda = os.environ.get("TAYLORSHIFT_FORCE_CUDA", "0") == "1"
    if force_cpu and force_cuda:
        raise RuntimeError("TAYLORSHIFT_FORCE_CPU and TAYLORSHIFT_FORCE_CUDA are both set")
    cuda_available = torch.version.cuda is not None and CUDA_HOME is not None
    if force_cuda and not cuda_available:
        raise RuntimeError(
            "TAYLORSHIFT_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, nvcc home={CUDA_HOME}"
        )
    return cuda_available and not force_cpu


def add_wheel_cuda_headers() -> None:
    """torch's CUDA headers include cusparse.h, cublas_v2.h and others. A minimal CUDA toolkit can
    lack them while the nvidia-* wheels that a CUDA build of torch depends on carry them: append
    those wheels' include folders to CPATH, which the compilers search after every -I folder, so
    the toolkit's own headers still come first."""
    if os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return
    site = os.path.dirname(os.path.dirname(torch.__file__))
    wheel_dirs = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH"), *wheel_dirs]))


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp"]
    define_macros = [("TORCH_EXTENSION_NAME", "_C")]
    if not want_cuda():
        return CppExtension(
            "taylorshift._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            define_macros=define_macros,
        )
    add_wheel_cuda_headers()
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    define_macros += [
        ("TAYLORSHIFT_WITH_CUDA", "1"),
        ("TAYLORSHIFT_CUDA_ARCH_LIST", f'"{arch_list}"'),
    ]
    return CUDAExtension(
        "taylorshift._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo"],
        },
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
