"""Reference (plain PyTorch) prototype attention and prototype routing (DESIGN "Ops" items 2, 3).

Ground truth for the tests and the CPU path. Differentiable by autograd; inputs of any dtype and
strides; float16/bfloat16 inputs are computed in float32 and the results cast back, float64 stays
float64. The functions assume validated inputs (see :mod:`fastproto.ops.prototype`).

Numerics (INP-Former):

* ``relu_cos`` attention normalises q and k like ``F.normalize`` (``x / max(||x||, 1e-12)``),
  multiplies the cosine logits by the per-head learnable scale *before* the ReLU, applies no row
  normalisation: ``out = ReLU(s_h * q̂ k̂ᵀ) v``.
* ``softmax`` attention: ``out = softmax(scale * q kᵀ) v`` (``scale`` default ``D ** -0.5``).
* Routing cosines follow ``F.cosine_similarity`` (each norm clamped at ``1e-8`` separately):
  ``cos = x·p / (max(||x||, 1e-8) max(||p||, 1e-8))``.
* ``nearest`` returns ``1 - cos`` minimised over prototypes and the argmin; ties go to the lowest
  prototype index, a row containing NaN gives NaN and the index of its first NaN (as ``torch.min``
  treats NaN as the minimum).
"""
from __future__ import annotations

from typing import Union

import torch

from fastproto.reference._precision import outside_autocast

ATTN_NORM_EPS = 1e-12  # F.normalize default (INP-Former Prototype_Attention)
COS_EPS = 1e-8  # F.cosine_similarity default (INP-Former coherence loss)

ATTN_KINDS = ("relu_cos", "softmax")
ROUTE_MODES = ("nearest", "soft", "linear")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    # times the reciprocal rather than divided by the norm: same value up to rounding, and the
    # backward of a broadcast multiplication is a few [N, C] passes cheaper than a division's
    return x * torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps).reciprocal()


def head_scale(scale, num_heads: int, default: float, device, dtype) -> torch.Tensor:
    """``scale`` (None, a number, or a tensor of H elements, e.g. [H] or [H, 1, 1]) as [H, 1, 1]."""
    if scale is None:
        return torch.full((num_heads, 1, 1), float(default), device=device, dtype=dtype)
    if isinstance(scale, torch.Tensor):
        if scale.numel() == 1:
            return scale.to(dtype).reshape(1, 1, 1).expand(num_heads, 1, 1)
        return scale.to(dtype).reshape(num_heads, 1, 1)
    return torch.full((num_heads, 1, 1), float(scale), device=device, dtype=dtype)


@outside_autocast
def prototype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str = "relu_cos",
                        scale: Union[None, float, torch.Tensor] = None) -> torch.Tensor:
    """``q`` [B, H, N, D], ``k`` [B, H, M, D] or shared [H, M, D], ``v`` like ``k`` with Dv.

    ``relu_cos``: ``ReLU(scale_h * normalize(q) normalize(k)ᵀ) v`` with ``scale`` per head (None: ones,
    INP-Former's initialisation); ``softmax``: ``softmax(scale * q kᵀ) v`` (None: ``D ** -0.5``).
    Returns [B, H, N, Dv] in q's dtype.
    """
    cd = _compute_dtype(q)
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    if kf.dim() == 3:
        kf, vf = kf.unsqueeze(0), vf.unsqueeze(0)
    H = q.shape[1]
    # the per-head scale multiplies the (few) keys rather than the [N, M] logits: s (q . k) = q . (s k)
    if kind == "relu_cos":
        s = head_scale(scale, H, 1.0, q.device, cd)
        k_scaled = _normalize(kf, ATTN_NORM_EPS) * s
        attn = torch.relu(_normalize(qf, ATTN_NORM_EPS) @ k_scaled.transpose(-2, -1))  # [B, H, N, M]
        out = attn @ vf
    elif kind == "softmax":
        s = head_scale(scale, H, q.shape[-1] ** -0.5, q.device, cd)
        # the attention is built transposed, [B, H, M, N]: the softmax then runs over the short M
        # axis across contiguous rows of N, and both products have N as their long output side
        # (on the CPU ~2x faster than the [N, M] layout, whose softmax is over rows of only M)
        attn_t = torch.softmax((kf * s) @ qf.transpose(-2, -1), dim=-2)  # [B, H, M, N]
        out = attn_t.transpose(-2, -1) @ vf
    else:
        raise ValueError(f"prototype_attention: kind must be one of {ATTN_KINDS}, got {kind!r}")
    return out.to(q.dtype)


def _bank_layout(x: torch.Tensor, p: torch.Tensor, per_location: bool) -> str:
    if p.dim() == 2:
        return "shared"
    return "location" if per_location else "batch"


def cosine(x: torch.Tensor, p: torch.Tensor, *, per_location: bool = False) -> torch.Tensor:
    """Cosine similarities [B, N, M] of ``x`` [B, N, C] with ``p`` [M, C], [B, M, C] or [N, M, C]
    (``per_location=True``), in the compute dtype."""
    cd = _compute_dtype(x)
    xn = _normalize(x.to(cd), COS_EPS)
    pn = _normalize(p.to(cd), COS_EPS)
    return _scores(xn, pn, _bank_layout(x, p, per_location))


# Per-sample and per-location banks use torch.bmm, not einsum or a broadcasting matmul: those hand
# autograd p's gradient as views of reshaped buffers, so the gradients of the two products that use
# p (linear / soft routing) are summed out of place (measured ~20 % of a per-location linear route's
# forward + backward on the CPU).


def _scores(x: torch.Tensor, p: torch.Tensor, layout: str) -> torch.Tensor:
    """``x pᵀ`` [B, N, M] for ``x`` [B, N, C] and ``p`` [M, C], [B, M, C] or per-location [N, M, C]."""
    if layout == "shared":
        return x @ p.t()
    if layout == "batch":
        return torch.bmm(x, p.transpose(1, 2))
    return torch.bmm(x.transpose(0, 1), p.transpose(1, 2)).transpose(0, 1)  # one product per location


def _mix(w: torch.Tensor, p: torch.Tensor, layout: str) -> torch.Tensor:
    """``w p`` [B, N, C] for weights ``w`` [B, N, M] and ``p`` as in :func:`_scores`."""
    if layout == "shared":
        return w @ p
    if layout == "batch":
        return torch.bmm(w, p)
    return torch.bmm(w.transpose(0, 1), p).transpose(0, 1)


@outside_autocast
def route(x: torch.Tensor, prototypes: torch.Tensor, *, mode: str = "nearest", tau: float = 1.0,
          per_location: bool = False):
    """Route tokens ``x`` [B, N, C] to ``prototypes`` [M, C], [B, M, C] or per-location [N, M, C].

    * ``nearest``: ``(min_m (1 - cos(x, p_m)) [B, N], argmin [B, N] int64)``; ties: lowest index;
      a NaN distance counts as the minimum;
    * ``soft``: ``(softmax(cos / tau) @ P [B, N, C], weights [B, N, M])``;
    * ``linear``: ``(x Pᵀ) P`` [B, N, C].
    Float results are in x's dtype.
    """
    layout = _bank_layout(x, prototypes, per_location)
    cd = _compute_dtype(x)
    if mode == "nearest":
        # torch.min: ties go to the lowest index, a NaN distance wins (the first NaN), and the gradient
        # flows through the selected prototype only (the semantics the Triton kernel reproduces)
        d, idx = (1.0 - cosine(x, prototypes, per_location=per_location)).min(dim=-1)
        return d.to(x.dtype), idx
    if mode == "soft":
        w = torch.softmax(cosine(x, prototypes, per_location=per_location) / tau, dim=-1)
        return _mix(w, prototypes.to(cd), layout).to(x.dtype), w.to(x.dtype)
    if mode == "linear":
        pf = prototypes.to(cd)
        return _mix(_scores(x.to(cd), pf, layout), pf, layout).to(x.dtype)
    raise ValueError(f"route: mode must be one of {ROUTE_MODES}, got {mode!r}")
