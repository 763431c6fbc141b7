"""Reference (plain PyTorch) Linear + exact GELU, the first half of a transformer MLP.

``linear_gelu(x, weight, bias) = gelu(x @ weight^T + bias)`` with the exact (erf) GELU of ``nn.GELU()``:
``gelu(z) = z / 2 * (1 + erf(z / sqrt(2)))``. Under autocast the product runs in the autocast dtype, the
pre-activation is rounded to it and GELU's result too, as the eager ``act(fc1(x))`` does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear_gelu"]


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``gelu(F.linear(x, weight, bias))`` (exact GELU); differentiable by autograd."""
    return F.gelu(F.linear(x, weight, bias))
