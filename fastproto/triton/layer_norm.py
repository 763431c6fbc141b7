"""Triton kernels for residual add + LayerNorm (:mod:`fastproto.reference.layer_norm`), forward and backward.

Math, per row of C channels (``r`` the residual stream, ``x`` the branch, ``g`` LayerScale's gamma or a
per-sample gate, ``(sh, ms)`` an optional adaLN modulation)::

    s = r + g * x,   n = (s - mean(s)) * rstd,   rstd = 1 / sqrt(var(s) + eps),   ln = n * w + b
    out = ln * (1 + ms) + sh                    (out = ln without a modulation)

``g``, ``sh`` and ``ms`` are either one ``[C]`` vector or one row per *group* of ``rows_per_group``
consecutive rows (``[G, C]``: a sample's timestep-conditioned vectors in a DiT block).

``_add_ln_fwd_kernel``  grid (cdiv(R, BLOCK_R),): a tile of BLOCK_R whole rows; reads x (and r, g),
                        writes s (when there is a residual or a scale), out in its own dtype, and
                        the per-row mean and rstd (float32) for the backward. Every intermediate is
                        rounded to the dtype the eager expression would give it (``g * x`` to
                        ``result_type(x, g)``, ``s`` to ``result_type(r, x, g)``, ``ln`` to
                        ``F.layer_norm``'s dtype, ``1 + ms`` to ``ms``'s, the modulation's products
                        to their promoted dtype), so the kernel sees the same values as the eager
                        block; arithmetic in float32.
``_add_ln_bwd_kernel``  grid (P, G) persistent programs, P per group, over the row tiles of their group;
                        with ``gs`` the gradient reaching ``s`` directly (the residual stream's own)::

                            dln = dout * (1 + ms)                 (dout without a modulation)
                            dn = dln * w
                            ds = rstd * (dn - mean(dn) - n * mean(dn * n)) + gs
                            dr = ds,  dx = g * ds
                            dw = sum_rows dln * n,  db = sum_rows dln,  dg = sum_rows ds * x
                            dsh = sum_rows dout,  dms = sum_rows dout * ln

                        The column sums are accumulated per program in float32 and written to a
                        [G * P, C] workspace; the host sums a group's P rows (per-group vectors) or
                        all rows (shared vectors): deterministic, no atomics.

Rows are read through a row stride (the last dim must be contiguous); whole rows are held in registers
(the ops layer sends C <= ``fastproto.ops.layer_norm.MAX_C``). Use :func:`fastproto.ops.add_layer_norm`
(validation, dispatch); the functions here assume validated 2-D inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output, interpreter_enabled, next_pow2, shapes_only

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _load_rows(ptr, rows, cols, stride, mask):
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_vec(ptr, grp, stride, cols, mr, mc, PER_GROUP: tl.constexpr):
    """A [C] vector as [1, BLOCK_C] (float32), or the rows ``grp`` of a [G, C] tensor (row stride ``stride``) as
    [BLOCK_R, BLOCK_C]."""
    if PER_GROUP:
        offs = grp.to(tl.int64)[:, None] * stride + cols[None, :]
        v = tl.load(ptr + offs, mask=mr[:, None] & mc[None, :], other=0.0).to(tl.float32)
    else:
        v = tl.load(ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    return v


@triton.jit
def _add_ln_fwd_kernel(
    x_ptr, r_ptr, g_ptr, w_ptr, b_ptr, sh_ptr, ms_ptr,
    out_ptr, s_ptr, mean_ptr, rstd_ptr,
    R, C, x_stride, r_stride, g_stride, sh_stride, ms_stride, rows_per_group, eps,
    HAS_R: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
    G_PER_GROUP: tl.constexpr, MOD_PER_GROUP: tl.constexpr,
    BR_DT: tl.constexpr, S_DT: tl.constexpr, LN_DT: tl.constexpr, MS_DT: tl.constexpr, MOD_DT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    mr = rows < R
    mc = cols < C
    m = mr[:, None] & mc[None, :]
    grp = rows // rows_per_group
    s = _load_rows(x_ptr, rows, cols, x_stride, m)
    if HAS_G:
        s = (s * _load_vec(g_ptr, grp, g_stride, cols, mr, mc, G_PER_GROUP)).to(BR_DT).to(tl.float32)
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
    if HAS_MOD:
        k = (1.0 + _load_vec(ms_ptr, grp, ms_stride, cols, mr, mc, MOD_PER_GROUP)).to(MS_DT).to(tl.float32)
        y = (y.to(LN_DT).to(tl.float32) * k).to(MOD_DT).to(tl.float32)
        y = (y + _load_vec(sh_ptr, grp, sh_stride, cols, mr, mc, MOD_PER_GROUP)).to(MOD_DT).to(tl.float32)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(mean_ptr + rows, mean, mask=mr)
    tl.store(rstd_ptr + rows, rstd, mask=mr)


@triton.jit
def _group_vec(ptr, group, stride, cols, mc, PER_GROUP: tl.constexpr):
    """Row ``group`` of a [G, C] tensor (row stride ``stride``), or the [C] vector, as [1, BLOCK_C] float32."""
    base = ptr + group.to(tl.int64) * stride if PER_GROUP else ptr
    return tl.load(base + cols, mask=mc, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _add_ln_bwd_kernel(
    dout_ptr, gs_ptr, s_ptr, x_ptr, g_ptr, w_ptr, b_ptr, ms_ptr, mean_ptr, rstd_ptr,
    dx_ptr, dr_ptr, dw_ptr, db_ptr, dg_ptr, dsh_ptr, dms_ptr,
    C, s_stride, x_stride, g_stride, ms_stride, rows_per_group, tiles_per_group,
    HAS_GS: tl.constexpr, HAS_G: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_MOD: tl.constexpr,
    G_PER_GROUP: tl.constexpr, MOD_PER_GROUP: tl.constexpr, LN_DT: tl.constexpr, MS_DT: tl.constexpr,
    STORE_DX: tl.constexpr, STORE_DR: tl.constexpr, SUM_W: tl.constexpr, SUM_B: tl.constexpr, SUM_G: tl.constexpr,
    SUM_MOD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    group = tl.program_id(1)
    cols = tl.arange(0, BLOCK_C)
    mc = cols < C
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=mc, other=0.0).to(tl.float32)[None, :]
    if HAS_G:  # a program's rows are all in one group
        g = _group_vec(g_ptr, group, g_stride, cols, mc, G_PER_GROUP)
    if HAS_MOD:
        k = (1.0 + _group_vec(ms_ptr, group, ms_stride, cols, mc, MOD_PER_GROUP)).to(MS_DT).to(tl.float32)
    acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_sh = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_ms = tl.zeros([BLOCK_C], dtype=tl.float32)
    for tile in range(pid, tiles_per_group, progs):
        local = tile * BLOCK_R + tl.arange(0, BLOCK_R)
        mr = local < rows_per_group
        rows = group * rows_per_group + local
        m = mr[:, None] & mc[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        mean = tl.load(mean_ptr + rows, mask=mr, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=mr, other=0.0)
        n = tl.where(m, (_load_rows(s_ptr, rows, cols, s_stride, m) - mean[:, None]) * rstd[:, None], 0.0)
        dout = tl.load(dout_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dln = dout
        if HAS_MOD:
            dln = dout * k
            if SUM_MOD:
                ln = n
                if HAS_W:
                    ln = ln * w
                if HAS_B:
                    ln = ln + b
                acc_sh += tl.sum(dout, axis=0)
                acc_ms += tl.sum(dout * ln.to(LN_DT).to(tl.float32), axis=0)
        dn = dln
        if HAS_W:
            dn = dln * w
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
                dx = ds * g
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if SUM_W:
            acc_w += tl.sum(dln * n, axis=0)
        if SUM_B:
            acc_b += tl.sum(dln, axis=0)
        if SUM_G:
            acc_g += tl.sum(ds * _load_rows(x_ptr, rows, cols, x_stride, m), axis=0)
    part = (group * progs + pid) * C + cols
    if SUM_W:
        tl.store(dw_ptr + part, acc_w, mask=mc)
    if SUM_B:
        tl.store(db_ptr + part, acc_b, mask=mc)
    if SUM_G:
        tl.store(dg_ptr + part, acc_g, mask=mc)
    if SUM_MOD:
        tl.store(dsh_ptr + part, acc_sh, mask=mc)
        tl.store(dms_ptr + part, acc_ms, mask=mc)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


def _tiles(c: int, elements: int):
    """``(BLOCK_R, BLOCK_C, num_warps)``: whole rows, about ``elements`` values per program."""
    block_c = max(16, next_pow2(c))
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
            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            mscale: Optional[torch.Tensor], eps: float, rows_per_group: int, *, branch_dtype: torch.dtype,
            sdtype: torch.dtype, ln_dtype: torch.dtype, mod_dtype: torch.dtype, out_dtype: torch.dtype):
    """``(out, s, mean, rstd)`` for 2-D ``x``/``residual`` [R, C]; ``s`` is None without residual and scale.

    ``scale``, ``shift`` and ``mscale`` are [C] or [R // rows_per_group, C] (one row per group of rows, any row
    stride, the last dim contiguous);
    ``shift`` and ``mscale`` come together (the modulation) or not at all, in one of the two layouts."""
    rows, c = x.shape
    dev = x.device
    out = empty_output((rows, c), out_dtype, dev)
    s = empty_output((rows, c), sdtype, dev) if residual is not None or scale is not None else None
    mean = empty_output((rows,), torch.float32, dev)
    rstd = empty_output((rows,), torch.float32, dev)
    if shapes_only(x):
        return out, s, mean, rstd
    block_r, block_c, nw = _tiles(c, 4096)
    _add_ln_fwd_kernel[(cdiv(rows, block_r),)](
        x, residual if residual is not None else x, scale if scale is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        shift if shift is not None else x, mscale if mscale is not None else x,
        out, s if s is not None else out, mean, rstd,
        rows, c, x.stride(0), residual.stride(0) if residual is not None else 0,
        *(_group_stride(t) for t in (scale, shift, mscale)), max(1, rows_per_group), eps,
        HAS_R=residual is not None, HAS_G=scale is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        HAS_MOD=shift is not None, G_PER_GROUP=_per_group(scale), MOD_PER_GROUP=_per_group(mscale),
        BR_DT=_TL_DTYPES[branch_dtype], S_DT=_TL_DTYPES[sdtype], LN_DT=_TL_DTYPES[ln_dtype],
        MS_DT=_TL_DTYPES[mscale.dtype if mscale is not None else ln_dtype], MOD_DT=_TL_DTYPES[mod_dtype],
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
    )
    return out, s, mean, rstd


def _per_group(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.dim() == 2


def _group_stride(t: Optional[torch.Tensor]) -> int:
    """The row stride of a per-group [G, C] tensor (e.g. a chunk of a wider adaLN output), else 0."""
    return t.stride(0) if _per_group(t) else 0


def backward(grad_out: torch.Tensor, grad_s: Optional[torch.Tensor], s: torch.Tensor, x: Optional[torch.Tensor],
             scale: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mscale: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, rows_per_group: int, *,
             ln_dtype: torch.dtype, dx_dtype: Optional[torch.dtype], dr_dtype: Optional[torch.dtype],
             sum_weight: bool, sum_bias: bool, sum_scale: bool, sum_modulation: bool):
    """``(dx, dr, dw, db, dg, dshift, dmscale)``; the last five are float32 column sums, [C] for a shared
    vector and [G, C] for a per-group one; an output not asked for is None.

    ``s`` is the LayerNorm input the forward saw (the summed tensor, or ``x`` itself without residual and
    scale); ``x`` is needed only for ``sum_scale``, ``bias`` and ``mscale`` only with a modulation;
    ``dx_dtype`` / ``dr_dtype`` None skip that output."""
    rows, c = s.shape
    dev = s.device
    per_group = _per_group(scale) or _per_group(mscale)
    rows_per_group = rows_per_group if per_group else rows
    groups = rows // rows_per_group if rows else 1
    dx = empty_output((rows, c), dx_dtype, dev) if dx_dtype is not None else None
    dr = empty_output((rows, c), dr_dtype, dev) if dr_dtype is not None else None
    block_r, block_c, nw = _tiles(c, 2048)
    tiles_per_group = cdiv(rows_per_group, block_r)
    progs = max(1, _persistent_programs(dev, groups * tiles_per_group) // groups)
    progs = min(progs, tiles_per_group)
    wants = (sum_weight, sum_bias, sum_scale, sum_modulation, sum_modulation)
    parts = [empty_output((groups * progs, c), torch.float32, dev) if want else None for want in wants]
    grad_out = grad_out if grad_out.stride(-1) == 1 and grad_out.stride(0) == c else grad_out.contiguous()
    if grad_s is not None and not (grad_s.stride(-1) == 1 and grad_s.stride(0) == c):
        grad_s = grad_s.contiguous()
    any_ptr = grad_out
    has_mod = mscale is not None
    if not shapes_only(s):  # the column sums below still give the fake outputs their shapes
        _add_ln_bwd_kernel[(progs, groups)](
            grad_out, grad_s if grad_s is not None else any_ptr, s, x if x is not None else any_ptr,
            *(t if t is not None else any_ptr for t in (scale, weight, bias, mscale)), mean, rstd,
            dx if dx is not None else any_ptr, dr if dr is not None else any_ptr,
            *(p if p is not None else mean for p in parts),
            c, s.stride(0), x.stride(0) if x is not None else 0, _group_stride(scale), _group_stride(mscale),
            rows_per_group, tiles_per_group,
            HAS_GS=grad_s is not None, HAS_G=scale is not None, HAS_W=weight is not None,
            HAS_B=bias is not None and has_mod, HAS_MOD=has_mod, G_PER_GROUP=_per_group(scale),
            MOD_PER_GROUP=_per_group(mscale), LN_DT=_TL_DTYPES[ln_dtype],
            MS_DT=_TL_DTYPES[mscale.dtype if has_mod else ln_dtype],
            STORE_DX=dx is not None, STORE_DR=dr is not None, SUM_W=sum_weight, SUM_B=sum_bias, SUM_G=sum_scale,
            SUM_MOD=sum_modulation, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=nw,
        )
    sums = []
    for part, vec in zip(parts, (weight, None, scale, mscale, mscale)):
        if part is None:
            sums.append(None)
        elif _per_group(vec):
            sums.append(part.view(groups, progs, c).sum(1))
        else:
            sums.append(part.sum(0))
    return (dx, dr, *sums)
