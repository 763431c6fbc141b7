"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU, through the real host code.

:func:`compile_only` makes Triton believe an sm_90 device is current and turns every launch into a compile
(``warmup``): the host functions and the public ops run as they would on a GPU (the kernels' own tile and
dtype choices, the runtime's argument specialisation: pointer alignment, strides equal to 1, integers divisible
by 16), so a kernel that the interpreter accepts but the compiler rejects, or a tile that loses its software
pipelining, shows up in CI. Nothing is launched: outputs stay unwritten. :func:`ptxas_report` reads the
registers / spills of a compiled kernel's PTX with the ptxas Triton ships.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import re
import subprocess
import tempfile

import torch


class _Hopper:
    """Enough of a Triton driver to compile for sm_90 (no launches, no memory)."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def compile_only():
    """Within the block, CPU tensors go down the Triton paths of :mod:`fastproto.ops` (``impl="triton"``) and every
    kernel launch compiles for sm_90 instead of running (autotuned kernels: every config). Yields the list the
    compiled kernels are appended to."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from fastproto import triton as triton_pkg

    # import every kernel module first: they bind interpreter_enabled (patched below) at import, and must see the
    # real one (GPU tiles and dtypes)
    for info in pkgutil.iter_modules(triton_pkg.__path__):
        importlib.import_module(f"fastproto.triton.{info.name}")
    compiled: list = []  # (kernel name, CompiledKernel), in launch order
    jit_run, tuner_run, interp = JITFunction.run, Autotuner.run, triton_pkg.interpreter_enabled

    def compile_launch(self, *args, grid, warmup, **kwargs):
        kernel = jit_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    def compile_configs(self, *args, grid, warmup, **kwargs):
        for config in self.configs:
            self.fn.run(*args, grid=grid, warmup=True, **config.all_kwargs(), **kwargs)

    previous = driver._active
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is the current default
    JITFunction.run, Autotuner.run = compile_launch, compile_configs
    # the dispatch lets CPU tensors take impl="triton" (it asks the package); the kernel modules keep their GPU
    # configuration (they bound interpreter_enabled at import)
    triton_pkg.interpreter_enabled = lambda: True
    driver.set_active(_Hopper())
    try:
        yield compiled
    finally:
        JITFunction.run, Autotuner.run, triton_pkg.interpreter_enabled = jit_run, tuner_run, interp
        driver._active = previous


def main_loop(kernel) -> dict:
    """``{"async_copies", "wgmma"}``: whether a matrix-product kernel's main loop was software-pipelined
    (asynchronous global-to-shared copies) and runs on wgmma (Hopper's warp-group MMA; tiles of 64+ rows)."""
    ir = kernel.asm["ttgir"]
    return {"async_copies": "async_copy_global_to_local" in ir, "wgmma": "warp_group_dot" in ir}


def ptxas_report(kernel) -> dict:
    """``{"registers", "stack", "spill_stores", "spill_loads"}`` of a compiled kernel, from ptxas -v on its PTX."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        # Triton ships two ptxas; the PTX it emits may need the newer one
        for tool in filter(None, (getattr(knobs.nvidia, "ptxas_blackwell", None), knobs.nvidia.ptxas)):
            proc = subprocess.run([tool.path, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.devnull],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                break
        else:
            raise RuntimeError(f"ptxas failed on {kernel.name}: {proc.stderr[-500:]}")
    text = proc.stderr
    num = (lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0)
    return {"registers": num(r"Used (\d+) registers"), "stack": num(r"(\d+) bytes stack frame"),
            "spill_stores": num(r"(\d+) bytes spill stores"), "spill_loads": num(r"(\d+) bytes spill loads"),
            "shared": kernel.metadata.shared}
