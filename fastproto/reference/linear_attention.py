"""Reference (plain PyTorch) non-causal linear attention (DESIGN "Ops" item 1).

For queries ``q`` [B, H, Nq, D], keys ``k`` [B, H, Nk, D] and values ``v`` [B, H, Nk, Dv]::

    S   = sum_j phi(k_j)^T v_j            [B, H, D, Dv]   (the "kv" state)
    z   = sum_j phi(k_j)                  [B, H, D]
    out_i = phi(q_i) S / (phi(q_i) . z + eps)            [B, H, Nq, Dv]

with ``phi`` = ``elu(x) + 1`` ("elu", Dinomaly's ``LinearAttention2``) or ``relu(x)`` ("relu").
Half/bfloat16 inputs are computed in float32 and the result is cast back to the input dtype;
float32 and float64 are computed in their own dtype. Everything here is differentiable by autograd.

:func:`linear_attention_backward` states the analytic gradient explicitly (used by tests and as a
cross-check of the Triton backward kernels).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from fastproto.reference._precision import outside_autocast

PHIS = ("elu", "relu")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def feature_map(x: torch.Tensor, phi: str) -> torch.Tensor:
    """phi(x): ``elu(x) + 1`` or ``relu(x)``."""
    if phi == "elu":
        # in place on elu's fresh output: one pass fewer, and autograd allows it (elu's backward
        # reads its input, not its output)
        return F.elu(x).add_(1.0)
    if phi == "relu":
        return F.relu(x)
    raise ValueError(f"linear_attention: phi must be one of {PHIS}, got {phi!r}")


def feature_map_grad(x: torch.Tensor, phi: str) -> torch.Tensor:
    """d phi / dx elementwise (at 0: 1 for elu+1, 0 for relu, as PyTorch's autograd)."""
    if phi == "elu":
        return torch.where(x > 0, torch.ones_like(x), torch.exp(x))
    if phi == "relu":
        return (x > 0).to(x.dtype)
    raise ValueError(f"linear_attention: phi must be one of {PHIS}, got {phi!r}")


@outside_autocast
def linear_attention_with_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: str = "elu",
                                eps: float = 1e-6) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out, S)``: the attention output (input dtype) and the kv state S (input dtype)."""
    ct = _compute_dtype(q.dtype)
    fq = feature_map(q.to(ct), phi)
    fk = feature_map(k.to(ct), phi)
    vv = v.to(ct)
    state = torch.matmul(fk.transpose(-2, -1), vv)  # [B, H, D, Dv]
    ksum = fk.sum(dim=-2)  # [B, H, D]
    # numerator and denominator from one product, phi(q) [S | z] = [num | den - eps]: one pass over
    # phi(q) forward and backward instead of a second, badly shaped (width-1) matmul
    num_den = torch.matmul(fq, torch.cat([state, ksum.unsqueeze(-1)], dim=-1))  # [B, H, Nq, Dv + 1]
    # multiply by 1/den rather than divide: the backward of a broadcast division costs several
    # [Nq, Dv] passes more than that of a multiplication
    out = num_den[..., :-1] * torch.reciprocal(num_den[..., -1:] + eps)
    return out.to(q.dtype), state.to(q.dtype)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: str = "elu",
                     eps: float = 1e-6) -> torch.Tensor:
    """``phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j) + eps)``, shapes as the module docstring."""
    return linear_attention_with_state(q, k, v, phi=phi, eps=eps)[0]


@outside_autocast
def linear_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, *,
                              phi: str = "elu", eps: float = 1e-6,
                              state: Optional[torch.Tensor] = None, ksum: Optional[torch.Tensor] = None
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Analytic gradients ``(dq, dk, dv)`` (input dtype), computed in float32 (float64 for float64).

    With Q' = phi(q), K' = phi(k), den_i = Q'_i . z + eps, o_i = Q'_i S / den_i and G = grad_out::

        dnum_i = G_i / den_i            dden_i = -(G_i . o_i) / den_i
        dQ'    = dnum S^T + dden z^T
        dS     = Q'^T dnum              dz     = Q'^T dden
        dK'    = v dS^T + 1 dz^T        dv     = K' dS
        dq = dQ' * phi'(q),  dk = dK' * phi'(k)
    """
    ct = _compute_dtype(q.dtype)
    qc, kc, vc, g = q.to(ct), k.to(ct), v.to(ct), grad_out.to(ct)
    fq = feature_map(qc, phi)
    fk = feature_map(kc, phi)
    if state is None:
        state = torch.matmul(fk.transpose(-2, -1), vc)
    if ksum is None:
        ksum = fk.sum(dim=-2)
    state, ksum = state.to(ct), ksum.to(ct)
    den = torch.matmul(fq, ksum.unsqueeze(-1)) + eps  # [B, H, Nq, 1]
    out = torch.matmul(fq, state) / den
    dnum = g / den
    dden = -(g * out).sum(dim=-1, keepdim=True) / den  # [B, H, Nq, 1]
    dfq = torch.matmul(dnum, state.transpose(-2, -1)) + dden * ksum.unsqueeze(-2)
    dstate = torch.matmul(fq.transpose(-2, -1), dnum)  # [B, H, D, Dv]
    dz = (fq * dden).sum(dim=-2)  # [B, H, D]
    dfk = torch.matmul(vc, dstate.transpose(-2, -1)) + dz.unsqueeze(-2)
    dv = torch.matmul(fk, dstate)
    dq = dfq * feature_map_grad(qc, phi)
    dk = dfk * feature_map_grad(kc, phi)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
