"""Triton kernels for the anomaly-map post-processing (DESIGN "Ops" item 6). Forward only.

Three kernels, all computing in float32:

``_cos_dist_kernel``
    ``1 - cos`` over channels for one (encoder, decoder) pair at the feature resolution. It reads
    [B, C, h, w] feature maps or [B, N, C] ViT tokens straight through their strides (no
    permute/contiguous copy) and, for layer groups, sums up to ``MAX_GROUP`` member tensors per
    side on the fly, so the group means are never materialised.
``_resample_hblur_kernel``
    Produces one [BLOCK_Y, BLOCK_X] tile of the map to be blurred and applies the horizontal pass
    of the separable Gaussian (zero padding). The map is either (``MODE_PAIRS``) the mean over pairs
    of the ``align_corners=True`` bilinear upsampling of the per-pair distance maps, evaluated on
    the fly from the small feature-resolution maps; or (``MODE_RESIZE``) the ``align_corners=False``
    bilinear resize of a materialised map; or (``MODE_DIRECT``) a strided input map.
    ``KS == 1`` skips the blur. The number of pairs is a compile-time constant (the pair loop is
    unrolled); per-pair offsets, sizes and scales come from two tiny cached device tensors.
``_vblur_kernel``
    The vertical pass of the separable Gaussian (zero padding).

The separable 1-D weights are ``exp(-(i - c)^2 / (2 sigma^2))`` normalised to sum 1; their outer
product is exactly (up to float rounding) Dinomaly's normalised 2-D kernel, and zero padding
commutes with the separation, so the result equals the reference 2-D convolution to float32
rounding. Bilinear coordinates follow PyTorch's ``upsample_bilinear2d`` (float32 scale
``(in-1)/(out-1)`` or ``in/out``, source index clamped at 0, upper neighbour clamped at the edge).

Use :func:`fastproto.ops.anomaly_map` (validation, dispatch); the functions here assume validated
inputs.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output

MAX_GROUP = 8  # members per side the cosine kernel sums on the fly; larger groups are pre-averaged

MODE_DIRECT = 0
MODE_PAIRS = 1
MODE_RESIZE = 2

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_group_sum(p0, p1, p2, p3, p4, p5, p6, p7, offs, mask, NUM: tl.constexpr):
    v = tl.load(p0 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 2:
        v += tl.load(p1 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 3:
        v += tl.load(p2 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 4:
        v += tl.load(p3 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 5:
        v += tl.load(p4 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 6:
        v += tl.load(p5 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 7:
        v += tl.load(p6 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM >= 8:
        v += tl.load(p7 + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _cos_dist_kernel(
    out_ptr,
    e0, e1, e2, e3, e4, e5, e6, e7,
    d0, d1, d2, d3, d4, d5, d6, d7,
    HW, W,
    e_sb, e_sc, e_sy, e_sx,
    d_sb, d_sc, d_sy, d_sx,
    inv_g, eps,
    C,
    NUM: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    y = (offs_p // W).to(tl.int64)
    x = (offs_p % W).to(tl.int64)
    sp_e = b * e_sb + y * e_sy + x * e_sx
    sp_d = b * d_sb + y * d_sy + x * d_sx

    acc_ed = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_ee = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_dd = tl.zeros((BLOCK_P,), dtype=tl.float32)
    # a while loop, not range(0, C, BLOCK_C): the Triton 3.6 interpreter cannot take a runtime
    # int as a range bound, and a constexpr C made the NCHW case up to 2x slower on an H100
    c0 = 0
    while c0 < C:
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        mask = mask_p[:, None] & (offs_c < C)[None, :]
        oe = sp_e[:, None] + offs_c[None, :] * e_sc
        od = sp_d[:, None] + offs_c[None, :] * d_sc
        ev = _load_group_sum(e0, e1, e2, e3, e4, e5, e6, e7, oe, mask, NUM)
        dv = _load_group_sum(d0, d1, d2, d3, d4, d5, d6, d7, od, mask, NUM)
        acc_ed += tl.sum(ev * dv, axis=1)
        acc_ee += tl.sum(ev * ev, axis=1)
        acc_dd += tl.sum(dv * dv, axis=1)
        c0 += BLOCK_C
    # group means: dot(mean_e, mean_d) = dot(sum_e, sum_d) / G^2, |mean| = |sum| / G
    dot = acc_ed * (inv_g * inv_g)
    ne = tl.sqrt_rn(acc_ee) * inv_g
    nd = tl.sqrt_rn(acc_dd) * inv_g
    # torch.nn.functional.cosine_similarity: x.y / (max(|x|, eps) * max(|y|, eps))
    cos = tl.div_rn(dot, tl.maximum(ne, eps) * tl.maximum(nd, eps))
    tl.store(out_ptr + b * HW + offs_p, 1.0 - cos, mask=mask_p)


@triton.jit
def _lin_coords(src, n_in):
    # src >= 0: lower index (trunc == floor), upper index clamped at the edge, weights
    i0 = src.to(tl.int32)
    i1 = i0 + (i0 < n_in - 1).to(tl.int32)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _sample(
    src_ptr, meta_ptr, scale_ptr, inv_pairs,
    s_sb, s_sy, s_sx, SH, SW, scale_y, scale_x,
    b, Y, Xs, valid,
    N_PAIRS: tl.constexpr,
    MODE: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    """Value of the map to be blurred at rows ``Y`` [BLOCK_Y] x columns ``Xs`` [BLOCK_X]; 0 where
    ``valid`` [BLOCK_Y, BLOCK_X] is false (the zero padding of the blur)."""
    if MODE == 0:
        # direct strided read of the input map
        offs = b * s_sb + Y.to(tl.int64)[:, None] * s_sy + Xs.to(tl.int64)[None, :] * s_sx
        v = tl.load(src_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    elif MODE == 1:
        # mean over pairs of the align_corners=True upsampling (src = scale * dst) of the
        # [B, h_p, w_p] distance maps packed in src_ptr
        Yf = tl.maximum(Y, 0).to(tl.float32)
        Xf = tl.maximum(Xs, 0).to(tl.float32)
        v = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
        for p in tl.static_range(N_PAIRS):
            off = tl.load(meta_ptr + 3 * p).to(tl.int64)
            h = tl.load(meta_ptr + 3 * p + 1)
            w = tl.load(meta_ptr + 3 * p + 2)
            sy = tl.load(scale_ptr + 2 * p)
            sx = tl.load(scale_ptr + 2 * p + 1)
            base = src_ptr + off + b * (h * w).to(tl.int64)
            y0, y1, ly0, ly1 = _lin_coords(sy * Yf, h)
            x0, x1, lx0, lx1 = _lin_coords(sx * Xf, w)
            r0 = (y0 * w)[:, None]
            r1 = (y1 * w)[:, None]
            v00 = tl.load(base + r0 + x0[None, :], mask=valid, other=0.0)
            v01 = tl.load(base + r0 + x1[None, :], mask=valid, other=0.0)
            v10 = tl.load(base + r1 + x0[None, :], mask=valid, other=0.0)
            v11 = tl.load(base + r1 + x1[None, :], mask=valid, other=0.0)
            lx0b = lx0[None, :]
            lx1b = lx1[None, :]
            v += ly0[:, None] * (lx0b * v00 + lx1b * v01) + ly1[:, None] * (lx0b * v10 + lx1b * v11)
        v = v * inv_pairs
    else:
        # align_corners=False resize of a strided [B, SH, SW] map: src = max(scale*(dst+0.5)-0.5, 0)
        y0, y1, ly0, ly1 = _lin_coords(tl.maximum(scale_y * (Y.to(tl.float32) + 0.5) - 0.5, 0.0), SH)
        x0, x1, lx0, lx1 = _lin_coords(tl.maximum(scale_x * (Xs.to(tl.float32) + 0.5) - 0.5, 0.0), SW)
        base = src_ptr + b * s_sb
        r0 = (y0.to(tl.int64) * s_sy)[:, None]
        r1 = (y1.to(tl.int64) * s_sy)[:, None]
        c0 = (x0.to(tl.int64) * s_sx)[None, :]
        c1 = (x1.to(tl.int64) * s_sx)[None, :]
        v00 = tl.load(base + r0 + c0, mask=valid, other=0.0).to(tl.float32)
        v01 = tl.load(base + r0 + c1, mask=valid, other=0.0).to(tl.float32)
        v10 = tl.load(base + r1 + c0, mask=valid, other=0.0).to(tl.float32)
        v11 = tl.load(base + r1 + c1, mask=valid, other=0.0).to(tl.float32)
        lx0b = lx0[None, :]
        lx1b = lx1[None, :]
        v = ly0[:, None] * (lx0b * v00 + lx1b * v01) + ly1[:, None] * (lx0b * v10 + lx1b * v11)
    return tl.where(valid, v, 0.0)


@triton.jit
def _resample_hblur_kernel(
    out_ptr, src_ptr, meta_ptr, scale_ptr, w_ptr,
    inv_pairs,
    OH, OW,
    s_sb, s_sy, s_sx, SH, SW, scale_y, scale_x,
    N_PAIRS: tl.constexpr,
    MODE: tl.constexpr,
    KS: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_X: tl.constexpr,
):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Y = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    X = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_y = Y < OH
    mask = mask_y[:, None] & (X < OW)[None, :]
    R: tl.constexpr = KS // 2
    acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    for j in tl.static_range(KS):
        Xs = X + (j - R)
        valid = mask_y[:, None] & ((Xs >= 0) & (Xs < OW))[None, :]
        v = _sample(
            src_ptr, meta_ptr, scale_ptr, inv_pairs,
            s_sb, s_sy, s_sx, SH, SW, scale_y, scale_x,
            b, Y, Xs, valid, N_PAIRS, MODE, BLOCK_Y, BLOCK_X,
        )
        if KS == 1:
            acc = v
        else:
            acc += tl.load(w_ptr + j) * v
    offs = (b * OH + Y.to(tl.int64))[:, None] * OW + X[None, :]
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _vblur_kernel(out_ptr, src_ptr, w_ptr, H, W, KS: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    pid_x = tl.program_id(0)
    pid_y = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Y = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    X = pid_x * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_x = X < W
    R: tl.constexpr = KS // 2
    acc = tl.zeros((BLOCK_Y, BLOCK_X), dtype=tl.float32)
    for i in tl.static_range(KS):
        Ys = Y + (i - R)
        valid = ((Ys >= 0) & (Ys < H))[:, None] & mask_x[None, :]
        offs = (b * H + Ys.to(tl.int64))[:, None] * W + X[None, :]
        acc += tl.load(w_ptr + i) * tl.load(src_ptr + offs, mask=valid, other=0.0)
    offs = (b * H + Y.to(tl.int64))[:, None] * W + X[None, :]
    tl.store(out_ptr + offs, acc, mask=(Y < H)[:, None] & mask_x[None, :])


# ----------------------------------------------------------------------------------------------
# host wrappers (inputs validated by fastproto.ops.anomaly_map)
# ----------------------------------------------------------------------------------------------

_CACHE: "OrderedDict" = OrderedDict()  # small constant device tensors, keyed by their contents
_CACHE_SIZE = 64


def _const_tensor(key, build, dtype, device) -> torch.Tensor:
    """Device copy of the CPU tensor ``build()`` made once per ``key``. The first copy goes through
    pinned memory with ``non_blocking=True``, so it never waits for work queued on the stream."""
    full_key = (key, dtype, str(device))
    t = _CACHE.get(full_key)
    if t is None:
        cpu = torch.tensor(build(), dtype=dtype)
        if device.type == "cuda":
            t = cpu.pin_memory().to(device, non_blocking=True)
        else:
            t = cpu.to(device)
        _CACHE[full_key] = t
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return t


def gaussian_kernel1d(sigma: float, kernel_size: int, device) -> torch.Tensor:
    """1-D factor of the normalised Gaussian, float32 on ``device`` (cached)."""

    def build():
        c = (kernel_size - 1) / 2.0
        g = [math.exp(-((i - c) ** 2) / (2.0 * float(sigma) ** 2)) for i in range(kernel_size)]
        s = sum(g)
        return [v / s for v in g]

    return _const_tensor(("gauss1d", float(sigma), int(kernel_size)), build, torch.float32, device)


def _np2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _spatial_strides(x: torch.Tensor) -> Tuple[int, int, int, int, int, int, int]:
    """(C, h, w, s_b, s_c, s_y, s_x) of a [B, C, h, w] map or [B, N, C] token tensor."""
    if x.dim() == 4:
        _, c, h, w = x.shape
        sb, sc, sy, sx = x.stride()
        return c, h, w, sb, sc, sy, sx
    _, n, c = x.shape
    side = math.isqrt(n)
    sb, sn, sc = x.stride()
    return c, side, side, sb, sc, side * sn, sn


def cos_distance(
    enc: Sequence[torch.Tensor],
    dec: Sequence[torch.Tensor],
    out: Optional[torch.Tensor] = None,
    config: Optional[Tuple[int, int, int]] = None,
):
    """``1 - cos(mean(enc), mean(dec))`` over channels, float32 [B, h, w].

    ``enc`` / ``dec``: the members of one group (a single tensor each for a plain pair); all members
    of a side share one shape. ``out``: optional float32 buffer with B*h*w elements. ``config``:
    (BLOCK_P, BLOCK_C, num_warps) override, for tuning."""
    enc, dec = list(enc), list(dec)
    if len(enc) > MAX_GROUP or len({t.stride() for t in enc}) > 1:
        enc = [torch.stack([t.float() for t in enc], 0).mean(0)]
    if len(dec) > MAX_GROUP or len({t.stride() for t in dec}) > 1:
        dec = [torch.stack([t.float() for t in dec], 0).mean(0)]
    # both sides must sum the same number of members for the 1/G scaling; pre-average the other
    # side too when only one was collapsed above
    if len(enc) != len(dec):
        if len(enc) > 1:
            enc = [torch.stack([t.float() for t in enc], 0).mean(0)]
        if len(dec) > 1:
            dec = [torch.stack([t.float() for t in dec], 0).mean(0)]
    num = len(enc)
    B = enc[0].shape[0]
    C, h, w, e_sb, e_sc, e_sy, e_sx = _spatial_strides(enc[0])
    _, _, _, d_sb, d_sc, d_sy, d_sx = _spatial_strides(dec[0])
    if out is None:
        out = empty_output((B, h, w), torch.float32, enc[0].device)
    if B == 0 or h * w == 0:
        return out.view(B, h, w)
    # tile shapes tuned on an H100 (B=16, 28x28, C=768, groups of 4): ~2.7-3.0 TB/s
    wide = max(t.element_size() for t in enc + dec) >= 4
    if config is not None:
        block_p, block_c, num_warps = config
    elif e_sc == 1 and d_sc == 1:  # channels contiguous (ViT tokens, channels-last maps)
        block_c = min(128, _np2(C))
        block_p = max(1, min(512 // block_c, _np2(h * w)))
        num_warps = 8 if wide else 4
    else:  # positions contiguous (NCHW maps)
        block_c = min(32, _np2(C))
        block_p = min(64 if wide else 16, _np2(h * w))
        num_warps = 8 if wide else 4
    e_ptrs = enc + [enc[0]] * (MAX_GROUP - num)
    d_ptrs = dec + [dec[0]] * (MAX_GROUP - num)
    grid = (cdiv(h * w, block_p), B)
    _cos_dist_kernel[grid](
        out, *e_ptrs, *d_ptrs,
        h * w, w,
        e_sb, e_sc, e_sy, e_sx,
        d_sb, d_sc, d_sy, d_sx,
        1.0 / num, 1e-8, C,
        NUM=num, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out.view(B, h, w)


def _f32_ratio(num: int, den: int) -> float:
    # float32 division as PyTorch computes its resize scales (exactly representable as a float)
    return float(np.float32(num) / np.float32(den))


def _tile(H: int, W: int) -> Tuple[int, int]:
    block_x = min(128, _np2(W))
    block_y = max(1, min(_np2(H), 1024 // block_x))
    return block_y, block_x


def _launch_rows(out, src, meta, scales, weights, n_pairs, OH, OW, B, src_strides, SH, SW, mode, ks):
    block_y, block_x = _tile(OH, OW)
    if src_strides is None:
        src_strides = (0, 0, 0)
    scale_y = _f32_ratio(SH, OH) if mode == MODE_RESIZE else 0.0
    scale_x = _f32_ratio(SW, OW) if mode == MODE_RESIZE else 0.0
    grid = (cdiv(OW, block_x), cdiv(OH, block_y), B)
    _resample_hblur_kernel[grid](
        out, src, meta, scales, weights,
        1.0 / max(n_pairs, 1),
        OH, OW,
        *src_strides, SH, SW, scale_y, scale_x,
        N_PAIRS=n_pairs, MODE=mode, KS=ks, BLOCK_Y=block_y, BLOCK_X=block_x,
        num_warps=4,
    )


def _launch_vblur(out, src, weights, H, W, B, ks):
    block_y, block_x = _tile(H, W)
    grid = (cdiv(W, block_x), cdiv(H, block_y), B)
    _vblur_kernel[grid](out, src, weights, H, W, KS=ks, BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=4)


def _blur_from(src_kind, B, OH, OW, device, sigma, kernel_size, **kw):
    """Run the row kernel (``src_kind`` = MODE_*) and, when blurring, the column kernel."""
    blur = sigma is not None and kernel_size > 1
    ks = kernel_size if blur else 1
    weights = gaussian_kernel1d(sigma, kernel_size, device) if blur else kw["dummy"]
    rows = empty_output((B, OH, OW), torch.float32, device)
    _launch_rows(rows, kw["src"], kw["meta"], kw["scales"], weights, kw["n_pairs"], OH, OW, B,
                 kw.get("src_strides"), kw.get("SH", 1), kw.get("SW", 1), src_kind, ks)
    if not blur:
        return rows
    out = empty_output((B, OH, OW), torch.float32, device)
    _launch_vblur(out, rows, weights, OH, OW, B, ks)
    return out


def anomaly_map(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    out_size: Tuple[int, int],
    *,
    groups: Optional[Sequence[Sequence[int]]] = None,
    sigma: Optional[float] = 4.0,
    kernel_size: int = 5,
    eval_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Triton anomaly map, float32 [B, H, W]; same contract as the reference."""
    if groups is None:
        members = [([e], [d]) for e, d in zip(encoder_features, decoder_features)]
    else:
        members = [([encoder_features[i] for i in g], [decoder_features[i] for i in g]) for g in groups]
    device = members[0][0][0].device
    B = members[0][0][0].shape[0]
    OH, OW = out_size
    FH, FW = eval_size if eval_size is not None else out_size
    if B == 0:
        return empty_output((0, FH, FW), torch.float32, device)

    # 1) per-pair distance maps at feature resolution, packed in one flat buffer
    sizes = [_spatial_strides(e[0])[1:3] for e, _ in members]
    offsets, total = [], 0
    for h, w in sizes:
        offsets.append(total)
        total += B * h * w
    dbuf = empty_output((total,), torch.float32, device)
    for (enc, dec), off, (h, w) in zip(members, offsets, sizes):
        cos_distance(enc, dec, out=dbuf[off: off + B * h * w])
    key = (tuple(sizes), B, OH, OW)
    meta = _const_tensor(
        ("meta",) + key, lambda: [[o, h, w] for o, (h, w) in zip(offsets, sizes)], torch.int32, device
    )
    scales = _const_tensor(
        ("scales",) + key,
        lambda: [[_f32_ratio(h - 1, OH - 1) if OH > 1 else 0.0, _f32_ratio(w - 1, OW - 1) if OW > 1 else 0.0]
                 for h, w in sizes],
        torch.float32, device,
    )
    common = dict(meta=meta, scales=scales, dummy=scales, n_pairs=len(members))

    # 2) upsample + mean over pairs (+ horizontal blur), 3) vertical blur
    if eval_size is None:
        return _blur_from(MODE_PAIRS, B, OH, OW, device, sigma, kernel_size, src=dbuf, **common)
    mean_map = _blur_from(MODE_PAIRS, B, OH, OW, device, None, 1, src=dbuf, **common)
    return _blur_from(
        MODE_RESIZE, B, FH, FW, device, sigma, kernel_size,
        src=mean_map, src_strides=mean_map.stride(), SH=OH, SW=OW, **common,
    )


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, kernel_size: int = 5) -> torch.Tensor:
    """Zero-padded separable Gaussian blur of [B, H, W] or [B, 1, H, W] maps, float32 out."""
    x = maps[:, 0] if maps.dim() == 4 else maps
    B, H, W = x.shape
    device = x.device
    if B == 0 or H == 0 or W == 0:
        return torch.zeros(maps.shape, dtype=torch.float32, device=device)
    dummy = _const_tensor(("dummy",), lambda: [0.0, 0.0], torch.float32, device)
    out = _blur_from(
        MODE_DIRECT, B, H, W, device, sigma, kernel_size,
        src=x, src_strides=x.stride(), SH=H, SW=W, meta=dummy, scales=dummy, dummy=dummy, n_pairs=0,
    )
    return out.view(maps.shape)
