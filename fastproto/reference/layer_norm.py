"""Reference (plain PyTorch) residual add + LayerNorm, the pre-norm transformer block's glue.

For a branch output ``x [B, ..., C]``, an optional residual stream ``r`` of the same shape, an optional
branch scale (LayerScale's ``gamma [C]``, or a per-sample gate ``[B, 1, ..., C]`` as DiT's adaLN-Zero) and
an optional adaLN modulation ``(shift, mscale)`` (each ``[C]`` or per-sample ``[B, 1, ..., C]``)::

    s   = r + scale * x          (each of r and scale optional)
    ln  = (s - mean(s)) / sqrt(var(s) + eps) * weight + bias        over the last dim, biased variance
    out = ln * (1 + mscale) + shift                                 (DiT's ``modulate``; ln without modulation)

``s`` keeps PyTorch's promotion of the inputs' dtypes (``result_type(r, x, scale)``): a float32
residual stream with a bfloat16 branch under autocast stays float32, as in the eager block. The
normalisation is computed in ``max(float32, dtype of s)`` (what ``F.layer_norm`` does inside for 16-bit
inputs) and the result is cast to ``out_dtype`` once. With ``out_dtype=None`` the result has the
dtype ``F.layer_norm`` would give: float32 under autocast on the tensors' device (autocast runs
``layer_norm`` in float32), else the dtype of ``s``. Passing the autocast dtype instead gives exactly the
values the next ``nn.Linear`` would compute from the float32 output (its autocast cast rounds once,
the same way), without the float32 round trip through memory. With a modulation, ``ln`` has
``F.layer_norm``'s dtype and ``ln * (1 + mscale) + shift`` follows PyTorch's promotion, as the eager
``modulate(norm(s), shift, mscale)``; ``out_dtype=None`` then gives that expression's dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastproto.reference._precision import outside_autocast

__all__ = ["add_layer_norm", "layer_norm", "default_out_dtype", "modulated_dtype", "summed_dtype"]


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


def modulated_dtype(ln_dtype: torch.dtype, modulation: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.dtype:
    """The dtype of ``ln * (1 + mscale) + shift`` for a LayerNorm output of ``ln_dtype`` (``ln_dtype`` itself
    without a modulation)."""
    if modulation is None:
        return ln_dtype
    shift, mscale = modulation
    return torch.promote_types(torch.promote_types(ln_dtype, mscale.dtype), shift.dtype)


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], *, scale: Optional[torch.Tensor] = None, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None,
                   modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, s)`` (see the module docstring); differentiable by autograd in every input."""
    sdtype = summed_dtype(x, residual, scale)
    ln_dtype = default_out_dtype(sdtype, x.device)
    out_dtype = out_dtype or modulated_dtype(ln_dtype, modulation)
    return _add_layer_norm(x, residual, weight, bias, scale, eps, sdtype, ln_dtype, out_dtype, modulation)


@outside_autocast  # the promotion rules above decide the dtypes, not autocast's op lists
def _add_layer_norm(x, residual, weight, bias, scale, eps, sdtype, ln_dtype, out_dtype, modulation):
    s = x if scale is None else x * scale  # the eager block's order: residual + (branch * gamma)
    if residual is not None:
        s = residual + s
    ct = torch.promote_types(sdtype, torch.float32)
    out = F.layer_norm(_as(s, ct), (s.shape[-1],), _as(weight, ct), _as(bias, ct), eps)
    if modulation is not None:  # DiT's modulate(norm(s), shift, mscale), on norm's output in its eager dtype
        shift, mscale = modulation
        out = _as(out, ln_dtype) * (1 + mscale) + shift
    return _as(out, out_dtype), s


def _as(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None,
               modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``F.layer_norm`` over the last dim (then the modulation), cast to ``out_dtype`` (see the module docstring)."""
    return add_layer_norm(x, None, weight, bias, eps=eps, out_dtype=out_dtype, modulation=modulation)[0]
