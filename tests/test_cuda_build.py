"""The CUDA sources compile without a GPU: device code with nvcc (sm_90), host wrappers with g++ -fsyntax-only."""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# the flags of the extension build for sm_90 (setup.py, and torch's defines that hide the half conversions);
# bench/kernel_resources.py compiles with them too
NVCC_FLAGS = ["-std=c++17", "-O2", "--use_fast_math", "-gencode=arch=compute_90,code=sm_90",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]


def cuda_home():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return Path(home)
    nvcc = shutil.which("nvcc")
    return Path(nvcc).resolve().parents[1] if nvcc else None


def _run_all(commands):
    """Runs the commands in parallel; returns the failures as text."""
    def run(cmd):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return None if proc.returncode == 0 else f"$ {' '.join(map(str, cmd))}\n{proc.stdout}{proc.stderr}"

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return [f for f in pool.map(run, commands) if f]


def test_kernels_compile_with_nvcc(tmp_path):
    home = cuda_home()
    if home is None:
        pytest.skip("nvcc not found")
    sources = sorted((ROOT / "kernels").glob("*.cu"))
    assert sources, "no kernels/*.cu"
    commands = [[str(home / "bin" / "nvcc"), *NVCC_FLAGS, "-I", str(ROOT / "kernels"), "-c", str(src),
                 "-o", str(tmp_path / f"{src.stem}.o")]
                for src in sources]
    failures = _run_all(commands)
    assert not failures, "\n\n".join(failures)


def test_host_wrappers_syntax():
    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    gxx = shutil.which("g++")
    home = cuda_home()
    if gxx is None:
        pytest.skip("g++ not found")
    if home is None or not (home / "include" / "cuda_runtime_api.h").is_file():
        pytest.skip("CUDA headers not found")
    includes = torch_ext.include_paths()
    torch_inc = Path(includes[0])
    if not (torch_inc / "c10" / "cuda" / "CUDAStream.h").is_file():
        pytest.skip("this torch ships no c10/cuda headers")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cpp"))
    assert sources, "no csrc/cuda/*.cpp"
    flags = ["-std=c++17", "-fsyntax-only", "-w", "-DFASTPROTO_WITH_CUDA", "-I", str(ROOT / "kernels"),
             "-I", str(ROOT / "csrc"), "-I", str(home / "include"), *(f"-I{p}" for p in includes)]
    if not (torch_inc / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        # CPU-only wheels omit this generated header; it only sets export macros.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    failures = _run_all([[gxx, *flags, str(src)] for src in sources])
    assert not failures, "\n\n".join(failures)
