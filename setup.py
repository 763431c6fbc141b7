"""Build of the optional compiled extension ``fastproto._C``.

CPU sources (``csrc/*.cpp``, C++17 + OpenMP; they include the host/device solver headers of
``kernels/``) always build. CUDA sources (``kernels/*.cu`` plus the
host wrappers ``csrc/cuda/*.cpp``) build when ``nvcc`` and a CUDA-enabled torch are present, or
when ``FASTPROTO_CUDA=1``; ``FASTPROTO_CUDA=0`` forces a CPU-only build.
``FASTPROTO_NO_EXT=1`` skips the extension entirely (the package then runs on its
pure PyTorch/NumPy paths). Install with ``pip install --no-build-isolation .`` because the build
needs the torch that is already installed.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda(torch):
    flag = os.environ.get("FASTPROTO_CUDA")
    if flag is not None:
        return flag == "1"
    has_nvcc = shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME")
    return bool(has_nvcc) and torch.version.cuda is not None


def _extensions():
    if os.environ.get("FASTPROTO_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    sources = rel("csrc/*.cpp")
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", "-std=c++17", *openmp]
    define = []
    if _want_cuda(torch):
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        if arch is None:
            # Hopper first (the benchmark machines); also a PTX fallback for newer parts.
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        ext = CUDAExtension(
            "fastproto._C",
            sources + rel("csrc/cuda/*.cpp") + rel("kernels/*.cu"),
            include_dirs=[os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")],
            define_macros=define + [("FASTPROTO_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=openmp,
        )
    else:
        ext = CppExtension(
            "fastproto._C",
            sources,
            include_dirs=[os.path.join(ROOT, "kernels"), os.path.join(ROOT, "csrc")],  # shared solver headers
            define_macros=define,
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
