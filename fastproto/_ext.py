"""Loads the optional compiled extension ``fastproto._C`` and says what it provides.

The extension registers its operators under ``torch.ops.fastproto``. Everything in the package
works without it (pure PyTorch/NumPy paths); dispatch code asks :func:`has_op` before using one.
"""
from __future__ import annotations

import os

import torch

_LOADED = None  # (module or None, error string or None)


def _load():
    global _LOADED
    if _LOADED is None:
        if os.environ.get("FASTPROTO_DISABLE_EXT") == "1":
            _LOADED = (None, "disabled by FASTPROTO_DISABLE_EXT=1")
        else:
            try:
                from fastproto import _C  # noqa: F401  (registers torch.ops.fastproto.*)

                _LOADED = (_C, None)
                _register_fakes()
            except ImportError as exc:  # not built, or built against another torch
                _LOADED = (None, str(exc))
    return _LOADED


# operators that write into the output tensors they are given and return nothing: their shape-only (fake)
# implementation, for torch.compile, does nothing (fastproto.ops._dispatch.kernel_op)
_WRITING_OPS = ("sinkhorn_solve", "route_nearest", "prototype_attention_forward", "prototype_attention_backward",
                "linear_attention_forward", "linear_attention_backward")


def _register_fakes() -> None:
    for name in _WRITING_OPS:
        torch.library.register_fake(f"fastproto::{name}")(_writes_only)


def _writes_only(*args, **kwargs) -> None:
    return None


def available() -> bool:
    return _load()[0] is not None


def load_error() -> str | None:
    return _load()[1]


def has_op(name: str, device: str = "cpu") -> bool:
    """True when ``torch.ops.fastproto.<name>`` exists and has a kernel for ``device`` ("cpu"/"cuda")."""
    if not available():
        return False
    try:
        packet = getattr(torch.ops.fastproto, name)
    except (AttributeError, RuntimeError):
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device]
    return torch._C._dispatch_has_kernel_for_dispatch_key(packet.default.name(), key)


def cuda_built() -> bool:
    return available() and bool(getattr(_load()[0], "WITH_CUDA", False))


def op(name: str):
    """``torch.ops.fastproto.<name>`` (loading the extension first; a clear error when it is missing)."""
    if not available():
        raise RuntimeError(f"fastproto's compiled extension is not available ({load_error()}); "
                           f"torch.ops.fastproto.{name} cannot run")
    return getattr(torch.ops.fastproto, name)
