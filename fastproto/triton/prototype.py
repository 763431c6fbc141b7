"""Triton kernels for prototype attention, forward and backward (DESIGN "Ops" 2; routing, item 3, is
in :mod:`fastproto.triton.route`). Matrix products go through :func:`fastproto.triton._dot.mm` (16-bit
operands on tensor cores for 16-bit inputs, ``tf32x3`` for float32); everything else is float32.

``_proto_attn_fwd_kernel``
    One program per (batch * head, query tile of ``BLOCK_N``). The head's prototype keys and values
    ([M, D] and [M, Dv], M padded to a power of two >= 16 with masks) are loaded once and stay in
    registers; the query tile is read through its strides, the logits ``[BLOCK_N, M]`` and the
    output tile are computed on chip and the output is written in the input dtype.
``_proto_attn_bwd_kernel``
    Same grid; recomputes the tile's attention, writes dq, and atomically accumulates the tile's
    share of dk, dv (and d(scale)) into small float32 [B, H, M, ·] buffers. ``KIND_RELU_COS``: ``ReLU(s_h q̂ k̂ᵀ) v`` with ``x̂ = x /
    max(||x||, 1e-12)``; ``KIND_SOFTMAX``: ``softmax(s_h q kᵀ) v``.

Use :mod:`fastproto.ops.prototype` (validation, dispatch, autograd); these functions assume
validated inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output, next_pow2, shapes_only
from fastproto.triton._dot import dot_config, mm

KIND_RELU_COS = 0
KIND_SOFTMAX = 1
MAX_M = 64
MAX_D = 256

def _dots(dtype):
    return dict(zip(("DOT_DT", "PREC"), dot_config(dtype)))


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(int(n)))


@triton.jit
def _weights(q, k, mask_m, s, eps, KIND: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """Attention weights of a query tile ``[BLOCK_N, BLOCK_M]`` (masked prototypes get 0), shared by the
    forward and the backward. Returns ``(attn, qa, ka, x, ||q||)``: for relu_cos ``qa, ka`` are the
    normalised q, k and ``x`` the cosines; for softmax ``q, k`` themselves and the unscaled ``q kᵀ``."""
    qnorm = tl.sqrt(tl.sum(q * q, axis=1))
    if KIND == 0:
        qa = q * (1.0 / tl.maximum(qnorm, eps))[:, None]
        ka = k * (1.0 / tl.maximum(tl.sqrt(tl.sum(k * k, axis=1)), eps))[:, None]
        # float32 operands: the ReLU kink must fall where the float32 reference puts it
        x = mm(qa, tl.trans(ka), tl.float32, PREC)
        z = x * s
        attn = tl.where(z < 0.0, 0.0, z)  # ReLU that keeps NaN (tl.maximum may drop it on GPU)
        attn = tl.where(mask_m[None, :], attn, 0.0)
    else:
        qa = q
        ka = k
        x = mm(q, tl.trans(k), DOT_DT, PREC)
        logits = tl.where(mask_m[None, :], x * s, float("-inf"))
        e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        e = tl.where(mask_m[None, :], e, 0.0)
        attn = e * (1.0 / tl.sum(e, axis=1))[:, None]
    return attn, qa, ka, x, qnorm


@triton.jit
def _proto_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, o_ptr,
    H, N, M, D, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    sob, soh, son, sod,
    eps,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_dv = offs_dv < DV

    k = tl.load(k_ptr + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * svb + h * svh + offs_m[:, None] * svm + offs_dv[None, :] * svd,
                mask=mask_m[:, None] & mask_dv[None, :], other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    s = tl.load(s_ptr + h).to(tl.float32)
    attn, _, _, _, _ = _weights(q, k, mask_m, s, eps, KIND, DOT_DT, PREC)
    out = mm(attn, v, DOT_DT, PREC)
    tl.store(o_ptr + b * sob + h * soh + offs_n[:, None] * son + offs_dv[None, :] * sod,
             out.to(o_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_dv[None, :])


def prototype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                        kind: str) -> torch.Tensor:
    """q [B,H,N,D]; k [B,H,M,D] or [H,M,D]; v like k with Dv; ``scale`` float32 [H] on q's device."""
    B, H, N, D = q.shape
    M, DV = k.shape[-2], v.shape[-1]
    out = empty_output((B, H, N, DV), q.dtype, q.device)
    if out.numel() == 0 or shapes_only(q):
        return out
    skb, svb = (k.stride(0), v.stride(0)) if k.dim() == 4 else (0, 0)
    BLOCK_N = 32 if max(_p2(D), _p2(DV)) > 64 else 64
    grid = (B * H, cdiv(N, BLOCK_N))
    _proto_attn_fwd_kernel[grid](
        q, k, v, scale, out, H, N, M, D, DV,
        *q.stride(), skb, *k.stride()[-3:], svb, *v.stride()[-3:], *out.stride(),
        1e-12,
        KIND=KIND_RELU_COS if kind == "relu_cos" else KIND_SOFTMAX,
        BLOCK_N=BLOCK_N, BLOCK_M=_p2(M), BLOCK_D=_p2(D), BLOCK_DV=_p2(DV), **_dots(q.dtype),
    )
    return out


@triton.jit
def _proto_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, dq_ptr, dk_ptr, dv_ptr, ds_ptr,
    H, N, M, D, DV,
    sqb, sqh, sqn, sqd,
    skb, skh, skm, skd,
    svb, svh, svm, svd,
    sgb, sgh, sgn, sgd,
    sdqb, sdqh, sdqn, sdqd,
    eps,
    KIND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    """One (batch * head, query tile): writes dq for the tile and atomically adds the tile's share of
    the prototype gradients to float32 buffers: dk_ptr gets d(k̂) for relu_cos (the k normalisation's
    backward is applied on the host, [M, D] per head) and dk for softmax; dv_ptr gets dv; ds_ptr the
    per-(batch, head) share of d(scale)."""
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    m_md = mask_m[:, None] & mask_d[None, :]
    m_mv = mask_m[:, None] & mask_dv[None, :]

    k = tl.load(k_ptr + b * skb + h * skh + offs_m[:, None] * skm + offs_d[None, :] * skd,
                mask=m_md, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + b * svb + h * svh + offs_m[:, None] * svm + offs_dv[None, :] * svd,
                mask=m_mv, other=0.0).to(tl.float32)
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_n[:, None] * sqn + offs_d[None, :] * sqd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * sgb + h * sgh + offs_n[:, None] * sgn + offs_dv[None, :] * sgd,
                mask=mask_n[:, None] & mask_dv[None, :], other=0.0).to(tl.float32)
    s = tl.load(s_ptr + h).to(tl.float32)
    dattn = mm(g, tl.trans(v), DOT_DT, PREC)  # [BLOCK_N, BLOCK_M]
    attn, qa, ka, x, qnorm = _weights(q, k, mask_m, s, eps, KIND, DOT_DT, PREC)
    if KIND == 0:
        qn, kn, cos = qa, ka, x
        dz = tl.where((cos * s > 0.0) & mask_m[None, :], dattn, 0.0)
        tl.atomic_add(ds_ptr + pid_bh, tl.sum(tl.sum(dz * cos, axis=1), axis=0))
        dlog = dz * s
        dqn = mm(dlog, kn, DOT_DT, PREC)
        # backward of x / max(||x||, eps)
        proj = dqn - qn * tl.sum(qn * dqn, axis=1)[:, None]
        dq = tl.where((qnorm > eps)[:, None], proj * (1.0 / tl.maximum(qnorm, eps))[:, None], dqn * (1.0 / eps))
        dk_part = mm(tl.trans(dlog), qn, DOT_DT, PREC)
    else:
        dz = attn * (dattn - tl.sum(dattn * attn, axis=1)[:, None])
        tl.atomic_add(ds_ptr + pid_bh, tl.sum(tl.sum(tl.where(mask_m[None, :], dz * x, 0.0), axis=1), axis=0))
        dlog = dz * s
        dq = mm(dlog, k, DOT_DT, PREC)
        dk_part = mm(tl.trans(dlog), q, DOT_DT, PREC)
    tl.store(dq_ptr + b * sdqb + h * sdqh + offs_n[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(dq_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    dv_part = mm(tl.trans(attn), g, DOT_DT, PREC)
    base_kd = pid_bh.to(tl.int64) * M * D
    base_kv = pid_bh.to(tl.int64) * M * DV
    tl.atomic_add(dk_ptr + base_kd + offs_m[:, None] * D + offs_d[None, :], dk_part, mask=m_md)
    tl.atomic_add(dv_ptr + base_kv + offs_m[:, None] * DV + offs_dv[None, :], dv_part, mask=m_mv)


def prototype_attention_backward(q, k, v, scale, grad_out, kind: str):
    """Gradients of :func:`prototype_attention`: ``(dq, dk_acc, dv, dscale)`` where ``dq`` is in q's
    dtype, ``dk_acc`` [B, H, M, D] float32 holds d(k̂) (relu_cos; the caller applies the backward of
    the k normalisation) or dk (softmax), ``dv`` [B, H, M, Dv] float32 and ``dscale`` [B, H] float32
    . Per-batch accumulators also for shared k/v (the caller sums)."""
    B, H, N, D = q.shape
    M, DV = k.shape[-2], v.shape[-1]
    dev = q.device
    dq = empty_output((B, H, N, D), q.dtype, dev)
    dk = torch.zeros((B, H, M, D), dtype=torch.float32, device=dev)
    dv = torch.zeros((B, H, M, DV), dtype=torch.float32, device=dev)
    ds = torch.zeros((B, H), dtype=torch.float32, device=dev)
    if dq.numel() == 0 or shapes_only(q):
        return dq, dk, dv, ds
    skb, svb = (k.stride(0), v.stride(0)) if k.dim() == 4 else (0, 0)
    BLOCK_N = 32 if max(_p2(D), _p2(DV)) > 64 else 64
    grid = (B * H, cdiv(N, BLOCK_N))
    _proto_attn_bwd_kernel[grid](
        q, k, v, scale, grad_out, dq, dk, dv, ds, H, N, M, D, DV,
        *q.stride(), skb, *k.stride()[-3:], svb, *v.stride()[-3:], *grad_out.stride(), *dq.stride(),
        1e-12,
        KIND=KIND_RELU_COS if kind == "relu_cos" else KIND_SOFTMAX,
        BLOCK_N=BLOCK_N, BLOCK_M=_p2(M), BLOCK_D=_p2(D), BLOCK_DV=_p2(DV), **_dots(q.dtype),
    )
    return dq, dk, dv, ds

