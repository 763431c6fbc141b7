"""Triton kernels for prototype routing (DESIGN "Ops" item 3): ``nearest``, ``soft`` and ``linear``,
forward and backward, for shared [M, C], per-sample [B, M, C] and per-location [N, M, C] banks.

Maths (see :mod:`fastproto.reference.prototype`), per token x with its bank P = [p_1 .. p_M]::

    cos_m = x·p_m / (max(||x||, eps) max(||p_m||, eps))                       (eps = 1e-8)
    nearest: min_m (1 - cos_m), argmin
    soft:    w = softmax(cos / tau),  out = Σ_m w_m p_m
    linear:  s_m = x·p_m,             out = Σ_m s_m p_m

Every kernel sees the tokens as *groups of rows sharing one bank*: shared and per-sample banks group
the tokens by sample (group b, rows n; a shared bank has group stride 0), a per-location bank by
location (group n, rows b). One program per (group, tile of ``BLOCK_R`` rows) streams the prototypes
in tiles of ``BLOCK_M`` and the channels in chunks of ``BLOCK_C``, so no [B, N, M] intermediate is
built (``soft`` writes its weights, which are an output). A row tile's [BLOCK_R, C] result is
accumulated across prototype tiles in the output itself (float32 for 16-bit inputs when M spans
several tiles; the caller casts), each program owning its rows; ``tl.debug_barrier()`` orders a
tile's stores before the next tile's loads. Matrix products go through
:func:`fastproto.triton._dot.mm` (16-bit operands on tensor cores for 16-bit inputs, ``tf32x3`` for
float32); everything else is float32. Inputs are read through their strides.

``_route_nearest_kernel``
    Running min of ``1 - cos`` and its argmin (prototype inverse norms precomputed once on the host).
    Ties go to the lowest index, NaN wins (as ``torch.min``). Its backward (through the selected
    prototype only) is PyTorch in :mod:`fastproto.ops.prototype`.
``_route_soft_fwd_kernel``
    With several prototype tiles a first pass computes the softmax normaliser ``lse = log Σ exp(cos /
    tau)`` (running max and sum), so the second pass writes final weights and accumulates ``w P``
    without rescaling; with one tile it is one pass. ``lse`` [B, N] (float32) is kept for the backward.
``_route_soft_bwd_kernel``
    Recomputes cos and ``w = exp(cos / tau - lse)``. With g = d out and g_w = d w::

        dw_m = g·p_m + g_w,m,   r = Σ_m w_m dw_m,   dc_m = w_m (dw_m - r) / tau,   q = Σ_m dc_m cos_m
        dx   = Σ_m dc_m ix ip_m p_m - [||x|| > eps] q ix² x                       (ix, ip: inverse norms)
        dp_m = Σ_tokens (dc_m ix ip_m x + w_m g) - [||p_m|| > eps] ip_m² p_m Σ_tokens dc_m cos_m

    With several prototype tiles ``r`` and ``q`` come from a first pass (``q = (Σ w dw cos - r Σ w
    cos) / tau``). ``dp`` is accumulated atomically in a float32 buffer shaped like the bank.
``_route_linear_kernel``
    ``o = (a Pᵀ) P`` for a row tile; the forward (a = x) and the backward (a = g gives dx; with
    ``WITH_DP`` and b = x also ``dP += (b Pᵀ)ᵀ a + (a Pᵀ)ᵀ b``, atomically, float32).

Use :func:`fastproto.ops.route` (validation, dispatch, autograd); these functions assume validated
inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output, next_pow2, shapes_only
from fastproto.triton._dot import dot_config, mm

COS_EPS = 1e-8  # F.cosine_similarity's norm clamp, as the reference
_MAX_BLOCK = 64


def _dots(dtype):
    return dict(zip(("DOT_DT", "PREC"), dot_config(dtype)))


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, next_pow2(int(n)))


# ----------------------------------------------------------------------------------------------
# shared device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile_dots(a_rows, sac, mask_r, p_bank, spm, spc, offs_m, mask_m, C, b_rows, sbc,
               TWO: tl.constexpr, NORMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_C: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """A row tile against a prototype tile, streaming the channels: ``(a Pᵀ, b Pᵀ, ||a||², ||p||²)``
    ([BLOCK_R, BLOCK_M], the same (``TWO``), [BLOCK_R], [BLOCK_M] (``NORMS``); zeros when not asked)."""
    offs_c = tl.arange(0, BLOCK_C)
    ap = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    bp = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    aa = tl.zeros((BLOCK_R,), dtype=tl.float32)
    pp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        cm = cc < C
        pt = tl.load(p_bank + offs_m[:, None] * spm + cc[None, :] * spc, mask=mask_m[:, None] & cm[None, :],
                     other=0.0)
        at = tl.load(a_rows + cc[None, :] * sac, mask=mask_r[:, None] & cm[None, :], other=0.0)
        ap += mm(at, tl.trans(pt), DOT_DT, PREC)
        if TWO:
            bt = tl.load(b_rows + cc[None, :] * sbc, mask=mask_r[:, None] & cm[None, :], other=0.0)
            bp += mm(bt, tl.trans(pt), DOT_DT, PREC)
        if NORMS:
            af = at.to(tl.float32)
            pf = pt.to(tl.float32)
            aa += tl.sum(af * af, axis=1)
            pp += tl.sum(pf * pf, axis=1)
    return ap, bp, aa, pp


@triton.jit
def _soft_tile(xp, xx, pp, lse, mask_r, mask_m, tau, eps):
    """Cosines, softmax weights ``exp(cos / tau - lse)`` (0 outside the tile) and inverse norms."""
    ix = 1.0 / tl.maximum(tl.sqrt(xx), eps)
    ip = 1.0 / tl.maximum(tl.sqrt(pp), eps)
    cos = xp * ix[:, None] * ip[None, :]
    w = tl.where(mask_r[:, None] & mask_m[None, :], tl.exp(cos / tau - lse[:, None]), 0.0)
    return cos, w, ix, ip


@triton.jit
def _soft_logits(xp, xx, pp, mask_m, tau, eps):
    """``cos / tau`` of a tile, -inf on the padded prototypes."""
    cos = xp * (1.0 / tl.maximum(tl.sqrt(xx), eps))[:, None] * (1.0 / tl.maximum(tl.sqrt(pp), eps))[None, :]
    return tl.where(mask_m[None, :], cos / tau, float("-inf"))


# ----------------------------------------------------------------------------------------------
# nearest
# ----------------------------------------------------------------------------------------------


@triton.jit
def _route_nearest_kernel(
    x_ptr, p_ptr, ip_ptr, d_ptr, i_ptr,
    R, M, C,
    sxg, sxr, sxc,
    spg, spm, spc, sipg,
    sdg, sdr, sig, sir,
    eps,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    x_rows = x_ptr + g * sxg + offs_r[:, None] * sxr
    p_bank = p_ptr + g * spg
    offs_c = tl.arange(0, BLOCK_C)
    xx = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):  # token norms
        cm = (c0 + offs_c) < C
        xt = tl.load(x_rows + (c0 + offs_c)[None, :] * sxc, mask=mask_r[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        xx += tl.sum(xt * xt, axis=1)
    inv_x = 1.0 / tl.maximum(tl.sqrt(xx), eps)

    best = tl.full((BLOCK_R,), float("inf"), dtype=tl.float32)
    best_i = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        dot, _, _, _ = _tile_dots(x_rows, sxc, mask_r, p_bank, spm, spc, offs_m, mask_m, C, x_rows, sxc,
                                  False, False, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
        inv_p = tl.load(ip_ptr + g * sipg + offs_m, mask=mask_m, other=1.0)
        d = 1.0 - dot * inv_x[:, None] * inv_p[None, :]
        isn = d != d
        # NaN wins: map NaN to -inf for the block minimum, remember which rows hold one
        d_key = tl.where(isn, float("-inf"), d)
        d_key = tl.where(mask_m[None, :], d_key, float("inf"))
        bmin = tl.min(d_key, axis=1)
        hit = (d_key == bmin[:, None]) & mask_m[None, :]
        bidx = tl.min(tl.where(hit, offs_m[None, :], 2147483647), axis=1)
        bval_nan = tl.max(tl.where(hit & isn, 1, 0), axis=1) > 0
        bval = tl.where(bval_nan, float("nan"), bmin)
        # strict comparison keeps the earlier (lower) index on ties; an earlier NaN is never replaced
        best_nan = best != best
        take = (~best_nan) & (bval_nan | (bval < best))
        best = tl.where(take, bval, best)
        best_i = tl.where(take, bidx, best_i)
    tl.store(d_ptr + g * sdg + offs_r * sdr, best, mask=mask_r)
    tl.store(i_ptr + g * sig + offs_r * sir, best_i.to(tl.int64), mask=mask_r)


# ----------------------------------------------------------------------------------------------
# soft
# ----------------------------------------------------------------------------------------------


@triton.jit
def _route_soft_fwd_kernel(
    x_ptr, p_ptr, o_ptr, w_ptr, lse_ptr,
    R, M, C,
    sxg, sxr, sxc,
    spg, spm, spc,
    sog, sor, soc,
    swg, swr, swm,
    slg, slr,
    tau, eps,
    MULTI: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_c = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + g * sxg + offs_r[:, None] * sxr
    p_bank = p_ptr + g * spg
    o_rows = o_ptr + g * sog + offs_r[:, None] * sor
    w_rows = w_ptr + g * swg + offs_r[:, None] * swr
    lse = tl.zeros((BLOCK_R,), dtype=tl.float32)
    if MULTI:  # the normaliser first (running max and sum), so the second pass writes final weights
        run_max = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            xp, _, xx, pp = _tile_dots(x_rows, sxc, mask_r, p_bank, spm, spc, offs_m, mask_m, C, x_rows, sxc,
                                       False, True, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
            z = _soft_logits(xp, xx, pp, mask_m, tau, eps)
            new_max = tl.maximum(run_max, tl.max(z, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        xp, _, xx, pp = _tile_dots(x_rows, sxc, mask_r, p_bank, spm, spc, offs_m, mask_m, C, x_rows, sxc,
                                   False, True, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
        if not MULTI:
            z = _soft_logits(xp, xx, pp, mask_m, tau, eps)
            z_max = tl.max(z, axis=1)
            lse = z_max + tl.log(tl.sum(tl.exp(z - z_max[:, None]), axis=1))
        _, w, _, _ = _soft_tile(xp, xx, pp, lse, mask_r, mask_m, tau, eps)
        tl.store(w_rows + offs_m[None, :] * swm, w.to(w_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_m[None, :])
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            cm = cc < C
            pt = tl.load(p_bank + offs_m[:, None] * spm + cc[None, :] * spc, mask=mask_m[:, None] & cm[None, :],
                         other=0.0)
            om = mask_r[:, None] & cm[None, :]
            acc = tl.load(o_rows + cc[None, :] * soc, mask=om & (m0 > 0), other=0.0).to(tl.float32)
            acc += mm(w, pt, DOT_DT, PREC)
            tl.store(o_rows + cc[None, :] * soc, acc.to(o_ptr.dtype.element_ty), mask=om)
        tl.debug_barrier()  # this tile's partial output is read back by the next one
    tl.store(lse_ptr + g * slg + offs_r * slr, lse, mask=mask_r)


@triton.jit
def _soft_bwd_tile(x_rows, sxc, mask_r, p_bank, spm, spc, m0, M, C, g_rows, sgc, gw_rows, swm, lse, tau, eps,
                   HAS_GW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                   DOT_DT: tl.constexpr, PREC: tl.constexpr):
    """One prototype tile of the soft backward: its indices and mask, cosines, weights, inverse norms, squared
    norms and the upstream gradient of the weights ``dw`` (through the output, plus the weights' own)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    xp, gp, xx, pp = _tile_dots(x_rows, sxc, mask_r, p_bank, spm, spc, offs_m, mask_m, C, g_rows, sgc,
                                True, True, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
    cos, w, ix, ip = _soft_tile(xp, xx, pp, lse, mask_r, mask_m, tau, eps)
    dw = gp
    if HAS_GW:
        dw += tl.load(gw_rows + offs_m[None, :] * swm, mask=mask_r[:, None] & mask_m[None, :],
                      other=0.0).to(tl.float32)
    return offs_m, mask_m, cos, w, ix, ip, xx, pp, dw


@triton.jit
def _route_soft_bwd_kernel(
    x_ptr, p_ptr, lse_ptr, go_ptr, gw_ptr, dx_ptr, dp_ptr,
    R, M, C,
    sxg, sxr, sxc,
    spg, spm, spc,
    slg, slr,
    sgg, sgr, sgc,
    swg, swr, swm,
    sdg, sdr, sdc,
    sdpg,
    tau, eps,
    HAS_GW: tl.constexpr, WITH_DP: tl.constexpr, MULTI: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_c = tl.arange(0, BLOCK_C)
    x_rows = x_ptr + g * sxg + offs_r[:, None] * sxr
    g_rows = go_ptr + g * sgg + offs_r[:, None] * sgr
    gw_rows = gw_ptr + g * swg + offs_r[:, None] * swr
    dx_rows = dx_ptr + g * sdg + offs_r[:, None] * sdr
    p_bank = p_ptr + g * spg
    dp_bank = dp_ptr + g * sdpg
    lse = tl.load(lse_ptr + g * slg + offs_r * slr, mask=mask_r, other=0.0)
    r = tl.zeros((BLOCK_R,), dtype=tl.float32)  # Σ_m w_m dw_m
    q = tl.zeros((BLOCK_R,), dtype=tl.float32)  # Σ_m dc_m cos_m
    if MULTI:  # both row sums need every prototype: a first pass
        swdc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        swc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m, mask_m, cos, w, _, _, xx, pp, dw = _soft_bwd_tile(
                x_rows, sxc, mask_r, p_bank, spm, spc, m0, M, C, g_rows, sgc, gw_rows, swm, lse, tau, eps,
                HAS_GW, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
            r += tl.sum(w * dw, axis=1)
            swdc += tl.sum(w * dw * cos, axis=1)
            swc += tl.sum(w * cos, axis=1)
        q = (swdc - r * swc) / tau
    for m0 in range(0, M, BLOCK_M):
        offs_m, mask_m, cos, w, ix, ip, xx, pp, dw = _soft_bwd_tile(
            x_rows, sxc, mask_r, p_bank, spm, spc, m0, M, C, g_rows, sgc, gw_rows, swm, lse, tau, eps,
            HAS_GW, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
        if not MULTI:
            r = tl.sum(w * dw, axis=1)
        dc = w * (dw - r[:, None]) / tau
        if not MULTI:
            q = tl.sum(dc * cos, axis=1)
        e = dc * ix[:, None] * ip[None, :]  # d(x·p_m)
        # the norm terms: x's is added once (with the first tile), each prototype's per tile
        x_coef = tl.where((tl.sqrt(xx) > eps) & (m0 == 0), q * ix * ix, 0.0)
        p_coef = tl.where(tl.sqrt(pp) > eps, tl.sum(dc * cos, axis=0) * ip * ip, 0.0)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            cm = cc < C
            pm = mask_m[:, None] & cm[None, :]
            om = mask_r[:, None] & cm[None, :]
            pt = tl.load(p_bank + offs_m[:, None] * spm + cc[None, :] * spc, mask=pm, other=0.0)
            xt = tl.load(x_rows + cc[None, :] * sxc, mask=om, other=0.0)
            acc = tl.load(dx_rows + cc[None, :] * sdc, mask=om & (m0 > 0), other=0.0).to(tl.float32)
            acc += mm(e, pt, DOT_DT, PREC) - x_coef[:, None] * xt.to(tl.float32)
            tl.store(dx_rows + cc[None, :] * sdc, acc.to(dx_ptr.dtype.element_ty), mask=om)
            if WITH_DP:
                gt = tl.load(g_rows + cc[None, :] * sgc, mask=om, other=0.0)
                part = (mm(tl.trans(e), xt, DOT_DT, PREC) + mm(tl.trans(w), gt, DOT_DT, PREC)
                        - p_coef[:, None] * pt.to(tl.float32))
                tl.atomic_add(dp_bank + offs_m[:, None] * C + cc[None, :], part, mask=pm)
        tl.debug_barrier()  # this tile's partial dx is read back by the next one


# ----------------------------------------------------------------------------------------------
# linear
# ----------------------------------------------------------------------------------------------


@triton.jit
def _route_linear_kernel(
    a_ptr, b_ptr, p_ptr, o_ptr, dp_ptr,
    R, M, C,
    sag, sar, sac,
    sbg, sbr, sbc,
    spg, spm, spc,
    sog, sor, soc,
    sdpg,
    WITH_DP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_DT: tl.constexpr, PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_c = tl.arange(0, BLOCK_C)
    a_rows = a_ptr + g * sag + offs_r[:, None] * sar
    b_rows = b_ptr + g * sbg + offs_r[:, None] * sbr
    o_rows = o_ptr + g * sog + offs_r[:, None] * sor
    p_bank = p_ptr + g * spg
    dp_bank = dp_ptr + g * sdpg
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        ap, bp, _, _ = _tile_dots(a_rows, sac, mask_r, p_bank, spm, spc, offs_m, mask_m, C, b_rows, sbc,
                                  WITH_DP, False, BLOCK_R, BLOCK_M, BLOCK_C, DOT_DT, PREC)
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + offs_c
            cm = cc < C
            pm = mask_m[:, None] & cm[None, :]
            om = mask_r[:, None] & cm[None, :]
            pt = tl.load(p_bank + offs_m[:, None] * spm + cc[None, :] * spc, mask=pm, other=0.0)
            acc = tl.load(o_rows + cc[None, :] * soc, mask=om & (m0 > 0), other=0.0).to(tl.float32)
            acc += mm(ap, pt, DOT_DT, PREC)
            tl.store(o_rows + cc[None, :] * soc, acc.to(o_ptr.dtype.element_ty), mask=om)
            if WITH_DP:
                at = tl.load(a_rows + cc[None, :] * sac, mask=om, other=0.0)
                bt = tl.load(b_rows + cc[None, :] * sbc, mask=om, other=0.0)
                part = mm(tl.trans(bp), at, DOT_DT, PREC) + mm(tl.trans(ap), bt, DOT_DT, PREC)
                tl.atomic_add(dp_bank + offs_m[:, None] * C + cc[None, :], part, mask=pm)
        tl.debug_barrier()  # this tile's partial output is read back by the next one


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


class _Plan:
    """The group/row view of one routing problem: groups share a bank (samples, or locations for a
    per-location bank), rows are the tokens of a group; grid, block sizes and bank strides."""

    def __init__(self, x: torch.Tensor, p: torch.Tensor, per_location: bool):
        B, N, C = x.shape
        self.per_location = per_location
        self.G, self.R = (N, B) if per_location else (B, N)
        self.M, self.C = p.shape[-2], C
        block_r, block_m = min(_MAX_BLOCK, _p2(self.R)), min(_MAX_BLOCK, _p2(self.M))
        self.multi = self.M > block_m  # the prototypes span several tiles
        self.grid = (self.G, cdiv(self.R, block_r))
        self.bank = ((p.stride(0) if p.dim() == 3 else 0),) + tuple(p.stride()[-2:])
        self.blocks = dict(BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_C=min(_MAX_BLOCK, _p2(C)), **_dots(x.dtype))

    def rows(self, t: torch.Tensor):
        """(group, row) strides of a [B, N, ...] tensor, then its last stride."""
        gr = (t.stride(1), t.stride(0)) if self.per_location else (t.stride(0), t.stride(1))
        return gr + ((t.stride(2),) if t.dim() == 3 else ())

    def accumulator(self, shape, dtype, device) -> torch.Tensor:
        """Row output accumulated across prototype tiles: float32 when there are several (caller casts)."""
        return empty_output(shape, torch.float32 if self.multi else dtype, device)

    @staticmethod
    def bank_grad(p: torch.Tensor):
        """Zeroed float32 buffer shaped like the bank (contiguous), for atomic accumulation, and its
        group stride (0 for a shared bank)."""
        buf = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return buf, (buf.stride(0) if p.dim() == 3 else 0)


def route_nearest(x: torch.Tensor, p: torch.Tensor, per_location: bool = False):
    """x [B,N,C]; p [M,C], [B,M,C] or per-location [N,M,C]. Returns (float32 distance [B,N], int64 index [B,N])."""
    B, N, _ = x.shape
    dist = empty_output((B, N), torch.float32, x.device)
    idx = empty_output((B, N), torch.int64, x.device)
    if dist.numel() == 0 or shapes_only(x):
        return dist, idx
    plan = _Plan(x, p, per_location)
    # prototype inverse norms once (float32, [M] or [G, M]) instead of once per token tile
    inv_p = 1.0 / torch.linalg.vector_norm(p.float(), dim=-1).clamp_min(COS_EPS)
    sipg = inv_p.stride(0) if p.dim() == 3 else 0
    _route_nearest_kernel[plan.grid](
        x, p, inv_p, dist, idx, plan.R, plan.M, plan.C, *plan.rows(x), *plan.bank, sipg,
        *plan.rows(dist), *plan.rows(idx), COS_EPS, **plan.blocks,
    )
    return dist, idx


def route_soft(x: torch.Tensor, p: torch.Tensor, tau: float, per_location: bool = False):
    """Soft routing. Returns ``(out [B,N,C], weights [B,N,M])`` in x's dtype and ``lse`` [B,N] float32
    (the softmax normaliser, for :func:`route_soft_backward`)."""
    B, N, C = x.shape
    plan = _Plan(x, p, per_location)
    out = plan.accumulator((B, N, C), x.dtype, x.device)
    w = empty_output((B, N, plan.M), x.dtype, x.device)
    lse = empty_output((B, N), torch.float32, x.device)
    if lse.numel() == 0 or shapes_only(x):
        return out.to(x.dtype), w, lse
    _route_soft_fwd_kernel[plan.grid](
        x, p, out, w, lse, plan.R, plan.M, C,
        *plan.rows(x), *plan.bank, *plan.rows(out), *plan.rows(w), *plan.rows(lse),
        float(tau), COS_EPS, MULTI=plan.multi, **plan.blocks,
    )
    return out.to(x.dtype), w, lse


def route_soft_backward(x: torch.Tensor, p: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                        grad_w: Optional[torch.Tensor], tau: float, per_location: bool = False,
                        need_dp: bool = True):
    """Gradients of :func:`route_soft`: ``(dx [B,N,C] in x's dtype, dp float32 like p, or None)``.
    ``grad_w`` None: the weights were not used."""
    B, N, C = x.shape
    plan = _Plan(x, p, per_location)
    dx = plan.accumulator((B, N, C), x.dtype, x.device)
    dp, sdpg = plan.bank_grad(p) if need_dp else (None, 0)
    if dx.numel() == 0 or shapes_only(x):
        return dx.to(x.dtype), dp
    gw = grad_w if grad_w is not None else lse  # never read without HAS_GW
    _route_soft_bwd_kernel[plan.grid](
        x, p, lse, grad_out, gw, dx, dp if need_dp else dx, plan.R, plan.M, C,
        *plan.rows(x), *plan.bank, *plan.rows(lse), *plan.rows(grad_out),
        *(plan.rows(grad_w) if grad_w is not None else (0, 0, 0)), *plan.rows(dx),
        sdpg, float(tau), COS_EPS,
        HAS_GW=grad_w is not None, WITH_DP=need_dp, MULTI=plan.multi, **plan.blocks,
    )
    return dx.to(x.dtype), dp


def _linear(a: torch.Tensor, b: Optional[torch.Tensor], p: torch.Tensor, per_location: bool):
    B, N, C = a.shape
    plan = _Plan(a, p, per_location)
    out = plan.accumulator((B, N, C), a.dtype, a.device)
    dp, sdpg = plan.bank_grad(p) if b is not None else (None, 0)
    if out.numel() == 0 or shapes_only(a):
        return out.to(a.dtype), dp
    b_ = b if b is not None else a  # never read without WITH_DP
    _route_linear_kernel[plan.grid](
        a, b_, p, out, dp if dp is not None else out, plan.R, plan.M, C,
        *plan.rows(a), *plan.rows(b_), *plan.bank, *plan.rows(out), sdpg,
        WITH_DP=b is not None, **plan.blocks,
    )
    return out.to(a.dtype), dp


def route_linear(x: torch.Tensor, p: torch.Tensor, per_location: bool = False) -> torch.Tensor:
    """Linear routing ``(x Pᵀ) P`` [B,N,C] in x's dtype."""
    return _linear(x, None, p, per_location)[0]


def route_linear_backward(x: torch.Tensor, p: torch.Tensor, grad_out: torch.Tensor, per_location: bool = False,
                          need_dp: bool = True):
    """Gradients of :func:`route_linear`: ``dx = (g Pᵀ) P`` in x's dtype (the op is self-adjoint in x)
    and ``dp = Σ (x Pᵀ)ᵀ g + (g Pᵀ)ᵀ x`` float32 like p (None unless ``need_dp``)."""
    return _linear(grad_out, x if need_dp else None, p, per_location)
