"""Triton kernels, one module per op family.

Nothing here is imported eagerly: :func:`is_available` tells whether ``import triton`` works, and
the ops layer (``fastproto.ops``) imports a kernel module only when it dispatches to it. This keeps
``import fastproto`` free of Triton and lets tests set ``TRITON_INTERPRET=1`` before the kernels
are defined.
"""
from __future__ import annotations

import os

_AVAILABLE = None


def is_available() -> bool:
    """True when the ``triton`` package imports (cached after the first call)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _AVAILABLE = True
        except Exception:  # any import failure means "not available"
            _AVAILABLE = False
    return _AVAILABLE


# Tests set FASTPROTO_POISON_OUTPUTS=1: every buffer a kernel module allocates is then filled with NaN
# (integers: -7) before the kernels run, so an element a kernel fails to write cannot go unnoticed.
POISON_OUTPUTS = os.environ.get("FASTPROTO_POISON_OUTPUTS", "0") == "1"


def empty_output(shape, dtype, device):
    """``torch.empty`` for kernel outputs, poisoned when ``FASTPROTO_POISON_OUTPUTS=1``."""
    import torch

    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.fill_(float("nan") if dtype.is_floating_point else -7)
    return out


def shapes_only(t) -> bool:
    """True when ``t`` is a fake tensor (``torch.compile`` tracing a kernel op, see
    ``fastproto.ops._dispatch.kernel_op``): a launcher then allocates and returns its outputs without launching,
    so that it is also its operator's shape-only implementation."""
    import torch

    if type(t) is torch.Tensor:  # the common case, without the import below (about 2 us)
        return False
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (grids, tile counts). ``triton.cdiv`` is a constexpr function whose call
    unwraps its arguments: about 4 us per call on the host, several per launch."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as ``triton.next_power_of_2``), for host code; see :func:`cdiv`."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on the CPU (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
