"""Triton kernels for residual add + LayerNorm (:mod:`fastproto.reference.layer_norm`), forward and backward.

Math, per row of C channels (``r`` the residual stream, ``x`` the branch, ``g`` LayerScale's gamma)::

    s = r + g * x,   n = (s - mean(s)) * rstd,   rstd = 1 / sqrt(var(s) + eps),   out = n * w + b

``_add_ln_fwd_kernel``  grid (cdiv(R, BLOCK_R),): a tile of BLOCK_R whole rows; reads x (and r, g),
                        writes s (when there is a residual or a scale), out in its own dtype, and
                        the per-row mean and rstd (float32) for the backward. Every intermediate is
                        rounded to the dtype the eager expression would give it (``g * x`` to
                        ``result_type(x, g)``, ``s`` to ``result_type(r, x, g)``), so the kernel sees the
                        same LayerNorm input as the eager block; arithmetic in float32.
``_add_ln_bwd_kernel``  grid (G,) persistent programs over row tiles; with ``gs`` the gradient reaching
                        ``s`` directly (the residual stream's own gradient)::

                            dn = dout * w
                            ds = rstd * (dn - mean(dn) - n * mean(dn * n)) + gs
                            dr = ds,  dx = g * ds
                            dw = sum_rows dout * n,  db = sum_rows dout,  dg = sum_rows ds * x

                        The column sums are accumulated per program in float32 and written to a
                        [G, C] workspace that the host sums (deterministic, no atomics).

Rows are read through a row stride (the last dim must be contiguous); whole rows are held in registers
(the ops layer sends C <= ``fastproto.ops.layer_norm.MAX_C``). Use :func:`fastproto.ops.add_layer_norm`
(validation, dispatch); the functions here assume validated 2-D inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastproto.triton import empty_output, interpreter_enabled

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _load_rows(ptr, rows, cols, stride, mask):
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, b_ptr,
    out_ptr, s_ptr, mean_ptr, rstd_ptr,
    R, C, x_stride, r_stride, eps,
    HAS_R: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BR_DT: tl.constexpr, S_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mr = rows < R
    mc = cols < C
    m = mr[:, None] & mc[None, :]
    s = _load_rows(x_ptr, rows, cols, x_stride, m)
    if HAS_G:
        g = tl.load(g_ptr + cols, mask=mc, other=0.0).to(tl.float32)
        s = (s * g[None, :]).to(BR_DT).to(tl.float32)
    if HAS_R:
        s = (_load_rows(r_ptr, rows, cols, r_stride, m) + s).to(S_DT).to(tl.float32)
    if HAS_R or HAS_G:
        tl.store(s_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], s.to(S_DT), mask=m)
    mean = tl.sum(s, axis=1) / C
    d = tl.where(m, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    y = d * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=mr)
    tl.store(rstd_ptr + rows, rstd, mask=mr)


@triton.jit
def _add_ln_bwd_kernel(
    dout_ptr, gs_ptr, s_ptr, x_ptr, g_ptr, w_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dr_ptr, dw_ptr, db_ptr, dg_ptr,
    R, C, s_stride, x_stride, n_tiles,
    HAS_GS: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DR: tl.constexpr, SUM_W: tl.constexpr, SUM_B: tl.constexpr, SUM_G: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    mc = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    if HAS_G:
        g = tl.load(g_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(pid, n_tiles, progs):
        rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        mr = rows < R
        m = mr[:, None] & mc[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=mr, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        n = tl.where(m, (_load_rows(s_ptr, rows, cols, s_stride, m) - mean[:, None]) * rstd[:, None], 0.0)
        dout = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dn = dout
        if HAS_W:
            dn = dout * w[None, :]
        c1 = tl.sum(dn * n, axis=1) / C
        c2 = tl.sum(dn, axis=1) / C
        ds = tl.where(m, (dn - c2[:, None] - n * c1[:, None]) * rstd[:, None], 0.0)
        if HAS_GS:
            ds += tl.load(gs_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if STORE_DR:
            tl.store(dr_ptr + offs, ds.to(dr_ptr.dtype.element_ty), mask=m)
        if STORE_DX:
            dx = ds
            if HAS_G:
                dx = ds * g[None, :]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if SUM_W:
            acc_w += tl.sum(dout * n, axis=0)
        if SUM_B:
            acc_b += tl.sum(dout, axis=0)
        if SUM_G:
            acc_g += tl.sum(ds * _load_rows(x_ptr, rows, cols, x_stride, m), axis=0)
    if SUM_W:
        tl.store(dw_ptr + pid * C + cols, acc_w, mask=mc)
    if SUM_B:
        tl.store(db_ptr + pid * C + cols, acc_b, mask=mc)
    if SUM_G:
        tl.store(dg_ptr + pid * C + cols, acc_g, mask=mc)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _tiles(c: int, elements: int):
    """``(BLOCK_R, BLOCK_C, num_warps)``: whole rows, about ``elements`` values per program."""
    block_c = max(16, triton.next_power_of_2(c))
    block_r = max(1, min(16, elements // block_c))
    return block_r, block_c, 8 if block_r * block_c >= 4096 else 4


_SM_COUNT: dict = {}


def _persistent_programs(device: torch.device, n_tiles: int) -> int:
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(n_tiles, 4))
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, 4 * _SM_COUNT[device]))


def forward(x: torch.Tensor, residual: Optional[torch.Tensor], scale: Optional[torch.Tensor],
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
            branch_dtype: torch.dtype, sdtype: torch.dtype, out_dtype: torch.dtype):
    """``(out, s, mean, rstd)`` for 2-D ``x``/``residual`` [R, C]; ``s`` is None without residual and scale."""
    rows, c = x.shape
    dev = x.device
    out = empty_output((rows, c), out_dtype, dev)
    s = empty_output((rows, c), sdtype, dev) if residual is not None or scale is not None else None
    mean = empty_output((rows,), torch.float32, dev)
    rstd = empty_output((rows,), torch.float32, dev)
    block_r, block_c, nw = _tiles(c, 4096)
    _add_ln_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x, residual if residual is not None else x, scale if scale is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        out, s if s is not None else out, mean, rstd,
        rows, c, x.stride(0), residual.stride(0) if residual is not None else 0, eps,
        HAS_R=residual is not None, HAS_G=scale is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BR_DT=_TL_DTYPES[branch_dtype], S_DT=_TL_DTYPES[sdtype],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return out, s, mean, rstd


def backward(grad_out: torch.Tensor, grad_s: Optional[torch.Tensor], s: torch.Tensor, x: Optional[torch.Tensor],
             scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
             *, dx_dtype: Optional[torch.dtype], dr_dtype: Optional[torch.dtype], sum_weight: bool, sum_bias: bool,
             sum_scale: bool):
    """``(dx, dr, dw, db, dg)`` (float32 column sums for the last three); an output not asked for is None.

    ``s`` is the LayerNorm input the forward saw (the summed tensor, or ``x`` itself without residual and
    scale); ``x`` is needed only for ``sum_scale``; ``dx_dtype`` / ``dr_dtype`` None skip that output."""
    rows, c = s.shape
    dev = s.device
    dx = empty_output((rows, c), dx_dtype, dev) if dx_dtype is not None else None
    dr = empty_output((rows, c), dr_dtype, dev) if dr_dtype is not None else None
    block_r, block_c, nw = _tiles(c, 2048)
    n_tiles = triton.cdiv(rows, block_r)
    progs = _persistent_programs(dev, n_tiles)
    parts = [empty_output((progs, c), torch.float32, dev) if want else None
             for want in (sum_weight, sum_bias, sum_scale)]
    grad_out = grad_out if grad_out.stride(-1) == 1 and grad_out.stride(0) == c else grad_out.contiguous()
    if grad_s is not None and not (grad_s.stride(-1) == 1 and grad_s.stride(0) == c):
        grad_s = grad_s.contiguous()
    any_ptr = grad_out
    _add_ln_bwd_kernel[(progs,)](
        grad_out, grad_s if grad_s is not None else any_ptr, s, x if x is not None else any_ptr,
        scale if scale is not None else any_ptr, weight if weight is not None else any_ptr, mean, rstd,
        dx if dx is not None else any_ptr, dr if dr is not None else any_ptr,
        *(p if p is not None else mean for p in parts),
        rows, c, s.stride(0), x.stride(0) if x is not None else 0, n_tiles,
        HAS_GS=grad_s is not None, HAS_G=scale is not None, HAS_W=weight is not None,
        STORE_DX=dx is not None, STORE_DR=dr is not None, SUM_W=sum_weight, SUM_B=sum_bias, SUM_G=sum_scale,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return (dx, dr, *(p.sum(0) if p is not None else None for p in parts))
