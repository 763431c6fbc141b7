"""Autocast off inside the references: each reference states its own compute dtype (float32 for 16-bit inputs,
float64 for float64), and under autocast the op lists would recast its float32 products to 16 bits again (a
16-bit input's matmul, an elementwise product fed to ``matmul``), so the reference would neither compute what its
docstring says nor what the kernels compute."""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _device_type(args: tuple, kwargs: dict) -> Optional[str]:
    """The device type of the first tensor among the arguments (one level into lists and tuples)."""
    for a in (*args, *kwargs.values()):
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor):
                return t.device.type
    return None


def outside_autocast(fn: F) -> F:
    """Run ``fn`` with autocast disabled on its tensors' device (a no-op where autocast is off)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        dev = _device_type(args, kwargs)
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
