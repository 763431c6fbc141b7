"""Reference (plain PyTorch) residual add + LayerNorm, the pre-norm transformer block's glue.

For a branch output ``x [..., C]``, an optional residual stream ``r`` of the same shape and an optional
per-channel ``scale [C]`` (LayerScale's ``gamma``)::

    s   = r + scale * x          (each of r and scale optional)
    out = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias        over the last dim, biased variance

``s`` keeps PyTorch's promotion of the inputs' dtypes (``result_type(r, x, scale)``): a float32
residual stream with a bfloat16 branch under autocast stays float32, as in the eager block. The
normalisation is computed in ``max(float32, dtype of s)`` (what ``F.layer_norm`` does inside for 16-bit
inputs) and the result is cast to ``out_dtype`` once. With ``out_dtype=None`` the result has the
dtype ``F.layer_norm`` would give: float32 under autocast on the tensors' device (autocast runs
``layer_norm`` in float32), else the dtype of ``s``. Passing the autocast dtype instead gives exactly the
values the next ``nn.Linear`` would compute from the float32 output (its autocast cast rounds once,
the same way), without the float32 round trip through memory.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["add_layer_norm", "layer_norm", "default_out_dtype", "summed_dtype"]


def summed_dtype(x: torch.Tensor, residual: Optional[torch.Tensor], scale: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``residual + scale * x`` under PyTorch's promotion rules."""
    dtype = x.dtype
    if scale is not None:
        dtype = torch.promote_types(dtype, scale.dtype)
    if residual is not None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return dtype


def default_out_dtype(sdtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What ``F.layer_norm`` returns for an input of ``sdtype`` on ``device`` in the current autocast state."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.float32
    return sdtype


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], *, scale: Optional[torch.Tensor] = None, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, s)`` (see the module docstring); differentiable by autograd in every input."""
    sdtype = summed_dtype(x, residual, scale)
    out_dtype = out_dtype or default_out_dtype(sdtype, x.device)
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
        # autocast off: the promotion rules above decide the dtypes, not autocast's op lists
        with torch.autocast(x.device.type, enabled=False):
            return _add_layer_norm(x, residual, weight, bias, scale, eps, sdtype, out_dtype)
    return _add_layer_norm(x, residual, weight, bias, scale, eps, sdtype, out_dtype)


def _add_layer_norm(x, residual, weight, bias, scale, eps, sdtype, out_dtype):
    s = x if scale is None else x * scale  # the eager block's order: residual + (branch * gamma)
    if residual is not None:
        s = residual + s
    ct = torch.promote_types(sdtype, torch.float32)
    out = F.layer_norm(_as(s, ct), (s.shape[-1],), _as(weight, ct), _as(bias, ct), eps)
    return _as(out, out_dtype), s


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``F.layer_norm`` over the last dim with the output cast to ``out_dtype`` (see the module docstring)."""
    return add_layer_norm(x, None, weight, bias, eps=eps, out_dtype=out_dtype)[0]
