"""Triton kernels for non-causal linear attention (DESIGN "Ops" item 1), forward and backward.

Math (see :mod:`fastproto.reference.linear_attention`), per (batch, head)::

    S = sum_j phi(k_j)^T v_j   [D, Dv],   z = sum_j phi(k_j)   [D]
    out_i = phi(q_i) S / (phi(q_i) . z + eps)

Forward, two kernels; element-wise arithmetic and accumulation in float32, matrix products through
:func:`fastproto.triton._dot.mm` (16-bit operands on tensor cores for 16-bit inputs, ``tf32x3`` for
float32 inputs):

``_la_state_kernel``   grid (B*H,): streams the keys/values in BLOCK_N tiles and accumulates S and z
                       in fp32 registers; writes them to a small fp32 workspace (kept for backward).
``_la_out_kernel``     grid (cdiv(Nq, BLOCK_N), B*H): one query tile, ``phi(q) S / (phi(q).z + eps)``.

Backward (analytic, with G = grad_out, den_i = phi(q_i).z + eps, o_i the output row)::

    dnum = G / den,  dden = -(G . o) / den
    dphi(q) = dnum S^T + dden z^T,   dS = phi(q)^T dnum,   dz = phi(q)^T dden
    dphi(k) = v dS^T + dz,           dv = phi(k) dS

``_la_bwd_q_kernel``   grid (B*H,): streams query tiles, writes dq and accumulates dS, dz.
``_la_bwd_kv_kernel``  grid (cdiv(Nk, BLOCK_N), B*H): one key tile, writes dk and dv.

All inputs are read through their strides (no contiguous copies). Head dims D, Dv up to
``MAX_HEAD_DIM`` (padded to a power of two >= 16 with masks); tokens masked at the tail. The
output is allocated as [B, Nq, H, Dv] and returned as the permuted [B, H, Nq, Dv] view, so a
module's ``out.transpose(1, 2).reshape(B, Nq, H * Dv)`` costs no copy.

Use :func:`fastproto.ops.linear_attention` (validation, dispatch); the functions here assume
validated inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output, next_pow2, shapes_only
from fastproto.triton._dot import dot_config, mm

MAX_HEAD_DIM = 128
PHI_CODES = {"elu": 0, "relu": 1}

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _phi(x, PHI: tl.constexpr):
    # NaN propagates: NaN > 0 and NaN < 0 are both false
    if PHI == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(x))
    else:
        return tl.where(x < 0, 0.0, x)


@triton.jit
def _dphi(x, PHI: tl.constexpr):
    if PHI == 0:
        return tl.where(x > 0, 1.0, tl.exp(x))
    else:
        return tl.where(x > 0, 1.0, 0.0)


@triton.jit
def _la_state_kernel(
    k_ptr, v_ptr, s_ptr, z_ptr,
    H, N, D, DV,
    k_sb, k_sh, k_sn, k_sd,
    v_sb, v_sh, v_sn, v_se,
    PHI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    k_base = k_ptr + b * k_sb + h * k_sh
    v_base = v_ptr + b * v_sb + h * v_sh
    acc = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    zacc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # a for loop over a range: the compiler software-pipelines its loads (a while loop is not)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        mk = mn[:, None] & md[None, :]
        kt = tl.load(k_base + offs_n[:, None] * k_sn + offs_d[None, :] * k_sd, mask=mk, other=0.0).to(tl.float32)
        fk = tl.where(mk, _phi(kt, PHI), 0.0)
        vt = tl.load(v_base + offs_n[:, None] * v_sn + offs_e[None, :] * v_se,
                     mask=mn[:, None] & me[None, :], other=0.0).to(tl.float32)
        acc += mm(tl.trans(fk), vt, DOT_DT, PREC)
        zacc += tl.sum(fk, axis=0)
    s_base = s_ptr + pid * D * DV
    tl.store(s_base + offs_d[:, None] * DV + offs_e[None, :], acc, mask=md[:, None] & me[None, :])
    tl.store(z_ptr + pid * D + offs_d, zacc, mask=md)


@triton.jit
def _load_state(s_ptr, z_ptr, pid, D, DV, offs_d, offs_e, md, me):
    s = tl.load(s_ptr + pid * D * DV + offs_d[:, None] * DV + offs_e[None, :],
                mask=md[:, None] & me[None, :], other=0.0)
    z = tl.load(z_ptr + pid * D + offs_d, mask=md, other=0.0)
    return s, z


@triton.jit
def _attend(qt, mq, mn, s, z, eps, PHI: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """One query tile against the state: ``(phi(q), phi(q) S / den, 1 / den)`` with
    ``den = phi(q) . z + eps`` (1 on the masked tail rows); shared by the forward and the dq backward."""
    fq = tl.where(mq, _phi(qt, PHI), 0.0)
    inv_den = 1.0 / tl.where(mn, tl.sum(fq * z[None, :], axis=1) + eps, 1.0)
    return fq, mm(fq, s, DOT_DT, PREC) * inv_den[:, None], inv_den


@triton.jit
def _la_out_kernel(
    q_ptr, s_ptr, z_ptr, o_ptr,
    H, N, D, DV, eps,
    q_sb, q_sh, q_sn, q_sd,
    o_sb, o_sh, o_sn, o_se,
    PHI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    s, z = _load_state(s_ptr, z_ptr, pid, D, DV, offs_d, offs_e, md, me)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mn = offs_n < N
    mq = mn[:, None] & md[None, :]
    qt = tl.load(q_ptr + b * q_sb + h * q_sh + offs_n[:, None] * q_sn + offs_d[None, :] * q_sd,
                 mask=mq, other=0.0).to(tl.float32)
    _, out, _ = _attend(qt, mq, mn, s, z, eps, PHI, DOT_DT, PREC)
    tl.store(o_ptr + b * o_sb + h * o_sh + offs_n[:, None] * o_sn + offs_e[None, :] * o_se,
             out.to(o_ptr.dtype.element_ty), mask=mn[:, None] & me[None, :])


@triton.jit
def _la_bwd_q_kernel(
    q_ptr, g_ptr, s_ptr, z_ptr, dq_ptr, ds_ptr, dz_ptr,
    H, N, D, DV, eps,
    q_sb, q_sh, q_sn, q_sd,
    g_sb, g_sh, g_sn, g_se,
    dq_sb, dq_sh, dq_sn, dq_sd,
    PHI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    s, z = _load_state(s_ptr, z_ptr, pid, D, DV, offs_d, offs_e, md, me)
    ds = tl.zeros((BLOCK_D, BLOCK_DV), dtype=tl.float32)
    dz = tl.zeros((BLOCK_D,), dtype=tl.float32)
    q_base = q_ptr + b * q_sb + h * q_sh
    g_base = g_ptr + b * g_sb + h * g_sh
    dq_base = dq_ptr + b * dq_sb + h * dq_sh
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        mq = mn[:, None] & md[None, :]
        mg = mn[:, None] & me[None, :]
        qt = tl.load(q_base + offs_n[:, None] * q_sn + offs_d[None, :] * q_sd, mask=mq, other=0.0).to(tl.float32)
        gt = tl.load(g_base + offs_n[:, None] * g_sn + offs_e[None, :] * g_se, mask=mg, other=0.0).to(tl.float32)
        fq, out, inv_den = _attend(qt, mq, mn, s, z, eps, PHI, DOT_DT, PREC)
        dnum = gt * inv_den[:, None]
        dden = -tl.sum(gt * out, axis=1) * inv_den
        dfq = mm(dnum, tl.trans(s), DOT_DT, PREC) + dden[:, None] * z[None, :]
        dq = dfq * _dphi(qt, PHI)
        tl.store(dq_base + offs_n[:, None] * dq_sn + offs_d[None, :] * dq_sd,
                 dq.to(dq_ptr.dtype.element_ty), mask=mq)
        ds += mm(tl.trans(fq), dnum, DOT_DT, PREC)
        dz += tl.sum(fq * dden[:, None], axis=0)
    tl.store(ds_ptr + pid * D * DV + offs_d[:, None] * DV + offs_e[None, :], ds, mask=md[:, None] & me[None, :])
    tl.store(dz_ptr + pid * D + offs_d, dz, mask=md)


@triton.jit
def _la_bwd_kv_kernel(
    k_ptr, v_ptr, ds_ptr, dz_ptr, dk_ptr, dv_ptr,
    H, N, D, DV,
    k_sb, k_sh, k_sn, k_sd,
    v_sb, v_sh, v_sn, v_se,
    dk_sb, dk_sh, dk_sn, dk_sd,
    dv_sb, dv_sh, dv_sn, dv_se,
    PHI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid = tl.program_id(1).to(tl.int64)
    b = pid // H
    h = pid % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    md = offs_d < D
    me = offs_e < DV
    ds, dz = _load_state(ds_ptr, dz_ptr, pid, D, DV, offs_d, offs_e, md, me)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mn = offs_n < N
    mk = mn[:, None] & md[None, :]
    mv = mn[:, None] & me[None, :]
    kt = tl.load(k_ptr + b * k_sb + h * k_sh + offs_n[:, None] * k_sn + offs_d[None, :] * k_sd,
                 mask=mk, other=0.0).to(tl.float32)
    vt = tl.load(v_ptr + b * v_sb + h * v_sh + offs_n[:, None] * v_sn + offs_e[None, :] * v_se,
                 mask=mv, other=0.0).to(tl.float32)
    fk = tl.where(mk, _phi(kt, PHI), 0.0)
    dfk = mm(vt, tl.trans(ds), DOT_DT, PREC) + dz[None, :]
    dk = dfk * _dphi(kt, PHI)
    dv = mm(fk, ds, DOT_DT, PREC)
    tl.store(dk_ptr + b * dk_sb + h * dk_sh + offs_n[:, None] * dk_sn + offs_d[None, :] * dk_sd,
             dk.to(dk_ptr.dtype.element_ty), mask=mk)
    tl.store(dv_ptr + b * dv_sb + h * dv_sh + offs_n[:, None] * dv_sn + offs_e[None, :] * dv_se,
             dv.to(dv_ptr.dtype.element_ty), mask=mv)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _blocks(d: int, dv: int, device: torch.device):
    bd = max(16, next_pow2(d))
    bdv = max(16, next_pow2(dv))
    block_n = 32 if (device.type != "cuda" or max(bd, bdv) > 64) else 64
    num_warps = 8 if max(bd, bdv) > 64 else 4
    return bd, bdv, block_n, num_warps


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: str, eps: float):
    """Return ``(out, state, ksum)``: out [B, H, Nq, Dv] (input dtype; a permuted view of a
    [B, Nq, H, Dv] buffer), state [B, H, D, Dv] and ksum [B, H, D] in float32."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    dev = q.device
    out = empty_output((B, Nq, H, Dv), q.dtype, dev).permute(0, 2, 1, 3)
    state = empty_output((B, H, D, Dv), torch.float32, dev)
    ksum = empty_output((B, H, D), torch.float32, dev)
    if B * H == 0 or shapes_only(q):
        return out, state, ksum
    bd, bdv, block_n, nw = _blocks(D, Dv, dev)
    code = PHI_CODES[phi]
    dots = dict(zip(("DOT_DT", "PREC"), dot_config(q.dtype)))
    _la_state_kernel[(B * H,)](
        k, v, state, ksum, H, Nk, D, Dv, *k.stride(), *v.stride(),
        PHI=code, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=nw, **dots,
    )
    if Nq > 0:
        _la_out_kernel[(cdiv(Nq, block_n), B * H)](
            q, state, ksum, out, H, Nq, D, Dv, float(eps), *q.stride(), *out.stride(),
            PHI=code, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=nw, **dots,
        )
    return out, state, ksum


def backward(q, k, v, state, ksum, grad_out, phi: str, eps: float):
    """Analytic gradients ``(dq, dk, dv)`` in the input dtype, from the saved fp32 state/ksum."""
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    dev = q.device
    dq = empty_output(q.shape, q.dtype, dev)
    dk = empty_output(k.shape, k.dtype, dev)
    dv = empty_output(v.shape, v.dtype, dev)
    ds = empty_output((B, H, D, Dv), torch.float32, dev)
    dz = empty_output((B, H, D), torch.float32, dev)
    if B * H == 0 or shapes_only(q):
        return dq, dk, dv
    bd, bdv, block_n, nw = _blocks(D, Dv, dev)
    code = PHI_CODES[phi]
    dots = dict(zip(("DOT_DT", "PREC"), dot_config(q.dtype)))
    _la_bwd_q_kernel[(B * H,)](
        q, grad_out, state, ksum, dq, ds, dz, H, Nq, D, Dv, float(eps),
        *q.stride(), *grad_out.stride(), *dq.stride(),
        PHI=code, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=nw, **dots,
    )
    if Nk > 0:
        _la_bwd_kv_kernel[(cdiv(Nk, block_n), B * H)](
            k, v, ds, dz, dk, dv, H, Nk, D, Dv,
            *k.stride(), *v.stride(), *dk.stride(), *dv.stride(),
            PHI=code, BLOCK_N=block_n, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=nw, **dots,
        )
    return dq, dk, dv
