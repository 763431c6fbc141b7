"""The curve engine shared by every protocol: ROC / PR / PRO curves from per-threshold increments.

A curve is given by increments at thresholds in descending order: ``dtp`` (anomalous pixels or images),
``dfp`` (normal ones) and ``dpro`` (PRO weight ``1/|region|``). Exact mode builds one increment per
distinct score (normal-only runs between two anomalous scores collapsed into one point, which changes
no metric); binned mode builds one per histogram bin. :func:`curve_metrics` turns increments into
AUROC, AP, F1-max and AUPRO in float64 on the increments' device.
"""
from __future__ import annotations

import math

import torch

from fastproto import _ext

_NAN = float("nan")


def _trapezoid_to(x: torch.Tensor, y: torch.Tensor, limit: float) -> torch.Tensor:
    """Area under the polyline (x non-decreasing, starting at x[0]) up to ``limit``, interpolated there."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    full = x1 <= limit
    area = torch.sum(torch.where(full, 0.5 * (y0 + y1) * (x1 - x0), 0.0))
    crossing = (x0 < limit) & (x1 > limit)
    width = torch.where(crossing, x1 - x0, 1.0)
    y_at = y0 + (y1 - y0) * (limit - x0) / width
    return area + torch.sum(torch.where(crossing, 0.5 * (y0 + y_at) * (limit - x0), 0.0))


def curve_metrics(dtp: torch.Tensor, dfp: torch.Tensor, dpro: torch.Tensor | None = None, n_regions: int = 0,
                  fpr_limit: float = 0.3) -> dict[str, float]:
    """AUROC, AP, F1-max and AUPRO from descending-threshold increments (float64 accumulation).

    Undefined values are NaN: AUROC without both classes, AP/F1 without positives, AUPRO without regions
    or normal pixels.
    """
    tp = torch.cumsum(dtp.double(), 0)
    fp = torch.cumsum(dfp.double(), 0)
    n_pos = float(tp[-1]) if tp.numel() else 0.0
    n_neg = float(fp[-1]) if fp.numel() else 0.0
    out = {"auroc": _NAN, "ap": _NAN, "f1max": _NAN, "aupro": _NAN}
    zero = tp.new_zeros(1)
    if n_pos > 0:
        predicted = tp + fp
        precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), 0.0)
        out["ap"] = float(torch.sum(dtp.double() * precision) / n_pos)
        out["f1max"] = float(torch.max(2 * tp / (predicted + n_pos)))
        if n_neg > 0:
            tpr = torch.cat([zero, tp / n_pos])
            fpr = torch.cat([zero, fp / n_neg])
            out["auroc"] = float(torch.sum(0.5 * (tpr[1:] + tpr[:-1]) * (fpr[1:] - fpr[:-1])))
    if dpro is not None and n_regions > 0 and n_neg > 0:
        fpr = torch.cat([zero, fp / n_neg]).clamp(max=1.0)
        pro = torch.cat([zero, torch.cumsum(dpro.double(), 0) / n_regions]).clamp(max=1.0)
        out["aupro"] = float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)
    return out


# ----------------------------------------------------------------------------------------------- exact


def group_positives(pos: torch.Tensor, weights: torch.Tensor | None = None):
    """Distinct ascending anomalous scores with their counts and summed PRO weights (float64)."""
    values, perm = torch.sort(pos + 0.0)  # + 0.0 merges -0.0 into +0.0
    distinct, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    wsum = None
    if weights is not None:
        wsum = torch.zeros(distinct.numel(), dtype=torch.float64, device=pos.device)
        wsum.index_add_(0, inverse, weights.double()[perm])
    return distinct.float().contiguous(), counts, wsum


def count_negatives(neg_chunks: list[torch.Tensor], values: torch.Tensor, *, impl: str = "auto"):
    """Normal scores equal to each distinct value (eq[G]) and strictly inside each gap (gap[G+1])."""
    device = values.device.type
    chunks = [c.contiguous() for c in neg_chunks if c.numel()]
    if impl != "reference" and _ext.has_op("count_negatives", device):
        return _ext.op("count_negatives")(chunks, values)
    G = values.numel()
    eq = torch.zeros(G, dtype=torch.long, device=values.device)
    gap = torch.zeros(G + 1, dtype=torch.long, device=values.device)
    for chunk in chunks:
        for part in torch.split(chunk, 1 << 24):  # bounds the int64 index buffer
            part = part + 0.0
            idx = torch.searchsorted(values, part)
            hit = values[idx.clamp(max=max(G - 1, 0))] == part if G else torch.zeros_like(part, dtype=torch.bool)
            hit &= idx < G
            eq += torch.bincount(idx[hit], minlength=G)[:G]
            gap += torch.bincount(idx[~hit], minlength=G + 1)
    return eq, gap


def exact_increments(values, counts, wsum, eq, gap):
    """Descending increments: for each distinct anomalous value, the normal-only run above it, then it."""
    G = values.numel()
    zeros = torch.zeros(G, dtype=torch.long, device=values.device)
    dtp = torch.stack([zeros, counts.flip(0)], 1).reshape(-1)
    dfp = torch.stack([gap[1:].flip(0), eq.flip(0)], 1).reshape(-1)
    tail = torch.zeros(1, dtype=torch.long, device=values.device)
    dtp = torch.cat([dtp, tail])
    dfp = torch.cat([dfp, gap[:1]])
    dpro = None
    if wsum is not None:
        dpro = torch.stack([torch.zeros_like(wsum), wsum.flip(0)], 1).reshape(-1)
        dpro = torch.cat([dpro, wsum.new_zeros(1)])
    return dtp, dfp, dpro


def exact_metrics(neg_chunks, pos, pos_sizes=None, n_regions: int = 0, fpr_limit: float = 0.3,
                  *, impl: str = "auto") -> dict[str, float]:
    """Exact AUROC/AP/F1-max/AUPRO: one sort of the anomalous scores, one streaming pass over the normal ones."""
    weights = None if pos_sizes is None else 1.0 / pos_sizes.double()
    values, counts, wsum = group_positives(pos, weights)
    eq, gap = count_negatives(list(neg_chunks), values, impl=impl)
    dtp, dfp, dpro = exact_increments(values, counts, wsum, eq, gap)
    return curve_metrics(dtp, dfp, dpro, n_regions, fpr_limit)


# ---------------------------------------------------------------------------------------------- binned


def float_key(x: torch.Tensor) -> torch.Tensor:
    """Monotone int64 image of float32 values (uint32 range): a < b <=> key(a) < key(b); -0.0 == +0.0."""
    bits = (x.float() + 0.0).view(torch.int32).long() & 0xFFFFFFFF
    return torch.where(bits >= 0x80000000, 0xFFFFFFFF - bits, bits + 0x80000000)


def histogram_update(neg_hist, pos_hist, weight_hist, neg, pos, pos_sizes, bits: int, *, impl: str = "auto"):
    """Add scores into the binned state (bin = top ``bits`` bits of the monotone key)."""
    device = neg_hist.device.type
    if impl != "reference" and _ext.has_op("histogram_update", device):
        _ext.op("histogram_update")(neg_hist, pos_hist, weight_hist, neg.contiguous(), pos.contiguous(),
                                    pos_sizes.contiguous(), bits)
        return
    shift = 32 - bits
    for part in torch.split(neg, 1 << 24):
        neg_hist += torch.bincount(float_key(part) >> shift, minlength=neg_hist.numel())
    pbins = float_key(pos) >> shift
    pos_hist += torch.bincount(pbins, minlength=pos_hist.numel())
    weight_hist.index_add_(0, pbins, 1.0 / pos_sizes.double())


def _harmonic_gap(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """sum_{j=1..p} 1/(a+j) = digamma(a+p+1) - digamma(a+1), float64."""
    return torch.special.digamma(a + p + 1) - torch.special.digamma(a + 1)


def binned_metrics(neg_hist, pos_hist, weight_hist, n_regions: int, fpr_limit: float = 0.3) -> dict[str, float]:
    """Binned estimates with rigorous error bounds.

    Inside a bin the order of its normal and anomalous scores (and their ties) is unknown; every metric
    is bounded by the two extreme orders, bin by bin, and reported as the midpoint with half the width
    as ``<metric>_bound`` (|exact - estimate| <= bound).
    """
    nz = (neg_hist > 0) | (pos_hist > 0)
    n = neg_hist[nz].flip(0).double()
    p = pos_hist[nz].flip(0).double()
    w = weight_hist[nz].flip(0).double()
    P, N = float(p.sum()), float(n.sum())
    nan = float("nan")
    out = {k: nan for k in ("auroc", "ap", "f1max", "aupro", "auroc_bound", "ap_bound", "f1max_bound", "aupro_bound")}
    if P == 0:
        return out
    tp_after, fp_after = torch.cumsum(p, 0), torch.cumsum(n, 0)
    tpa, fpa = tp_after - p, fp_after - n  # counts above the bin
    # AP: lo = negatives of the bin first and positives distinct; hi = positives first, tied together.
    lo = torch.sum(p - (fpa + n) * _harmonic_gap(tpa + fpa + n, p)) / P
    hi = torch.sum(torch.where(p > 0, p * (tpa + p) / (tpa + p + fpa).clamp_min(1), 0.0)) / P
    out["ap"], out["ap_bound"] = float(lo + hi) / 2, float(hi - lo) / 2
    # F1-max: every bin end is a point of the exact curve; inside a bin tp <= tpa + p and fp >= fpa.
    f1_lo = torch.max(2 * tp_after / (tp_after + fp_after + P))
    f1_hi = torch.max(torch.where(p > 0, 2 * (tpa + p) / (tpa + p + fpa + P), 0.0))
    f1_hi = torch.maximum(f1_hi, f1_lo)
    out["f1max"], out["f1max_bound"] = float(f1_lo + f1_hi) / 2, float(f1_hi - f1_lo) / 2
    if N > 0:
        below = N - fp_after  # negatives in lower bins: each pair counts 1, pairs inside a bin 0..1
        out["auroc"] = float(torch.sum(p * (below + 0.5 * n)) / (P * N))
        out["auroc_bound"] = float(torch.sum(p * n) / (2 * P * N))
    if n_regions > 0 and N > 0:
        x0, dx = fpa / N, n / N
        y0, dy = torch.cumsum(w, 0) / n_regions - w / n_regions, w / n_regions
        width = torch.clamp(torch.minimum(x0 + dx, torch.full_like(x0, fpr_limit)) - x0, min=0.0)
        area_lo = torch.sum(width * y0) / fpr_limit
        area_hi = torch.sum(width * (y0 + dy)) / fpr_limit
        out["aupro"], out["aupro_bound"] = float(area_lo + area_hi) / 2, float(area_hi - area_lo) / 2
    # Rounding of the float64 sums is far below any real bound; keep the bound conservative anyway.
    for key in ("ap", "f1max", "auroc", "aupro"):
        if not math.isnan(out[key + "_bound"]):
            out[key + "_bound"] += 1e-12
    return out
