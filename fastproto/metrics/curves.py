"""The curve engine shared by every protocol: ROC / PR / PRO curves from per-threshold increments.

A curve is given by increments at thresholds in descending order: ``dtp`` (anomalous pixels or images),
``dfp`` (normal ones) and ``dpro`` (PRO weight ``1/|region|``). Exact mode builds one increment per
distinct score (normal-only runs between two anomalous scores collapsed into one point, which changes
no metric); binned mode builds one per histogram bin. :func:`curve_metrics` turns increments into
AUROC, AP, F1-max and AUPRO in float64 on the increments' device.
"""
from __future__ import annotations


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
                  fpr_limit: float = 0.3, f1_eps: float = 0.0) -> dict[str, float]:
    """AUROC, AP, F1-max and AUPRO from descending-threshold increments (float64 accumulation).

    AUROC is the trapezoid area of the ROC, written as the Mann-Whitney sum over thresholds with anomalous
    increments (pairs tied at one threshold count 1/2); AP is the step sum of precision over recall
    increments; F1-max = max 2PR/(P+R+f1_eps) (``f1_eps`` > 0 reproduces codes that add it) peaks at a
    threshold with an anomalous increment (elsewhere precision only falls);
    AUPRO integrates the PRO curve only up to the point where FPR crosses the limit.
    Undefined values are NaN: AUROC without both classes, AP/F1 without positives, AUPRO without regions
    or normal pixels.
    """
    fp = torch.cumsum(dfp, 0, dtype=torch.float64)
    n_neg = float(fp[-1]) if fp.numel() else 0.0
    out = {"auroc": _NAN, "ap": _NAN, "f1max": _NAN, "aupro": _NAN}
    hit = torch.nonzero(dtp).flatten()
    if hit.numel():
        step = dtp[hit].double()
        tp = torch.cumsum(step, 0)
        n_pos = float(tp[-1])
        fp_hit = fp[hit]
        out["ap"] = float(torch.sum(step * tp / (tp + fp_hit)) / n_pos)
        precision, recall = tp / (tp + fp_hit), tp / n_pos
        out["f1max"] = float(torch.max(2 * precision * recall / (precision + recall + f1_eps)))
        if n_neg > 0:
            below = n_neg - fp_hit + 0.5 * dfp[hit].double()
            out["auroc"] = float(torch.sum(step * below) / (n_pos * n_neg))
    if dpro is not None and n_regions > 0 and n_neg > 0:
        # points up to and including the first one past the limit
        end = int(torch.searchsorted(fp, fpr_limit * n_neg, right=True)) + 1
        zero = fp.new_zeros(1)
        fpr = torch.cat([zero, fp[:end] / n_neg]).clamp(max=1.0)
        pro = torch.cat([zero, torch.cumsum(dpro[:end], 0, dtype=torch.float64) / n_regions]).clamp(max=1.0)
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
    return distinct.contiguous(), counts, wsum


def count_negatives(neg_chunks: list[torch.Tensor], values: torch.Tensor, *, impl: str = "auto"):
    """Normal scores equal to each distinct value (eq[G]) and strictly inside each gap (gap[G+1])."""
    device = values.device.type
    chunks = [c.to(values.dtype).contiguous() for c in neg_chunks if c.numel()]
    # the compiled kernels take float32 (the evaluator's precision); other dtypes use the torch path
    if impl != "reference" and values.dtype == torch.float32 and _ext.has_op("count_negatives", device):
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
                  *, f1_eps: float = 0.0, impl: str = "auto") -> dict[str, float]:
    """Exact AUROC/AP/F1-max/AUPRO: one sort of the anomalous scores, one streaming pass over the normal ones.

    Scores of any floating dtype are compared in the wider of the two classes' dtypes."""
    neg_chunks = list(neg_chunks)
    dtype = pos.dtype
    for chunk in neg_chunks:
        dtype = torch.promote_types(dtype, chunk.dtype)
    weights = None if pos_sizes is None else 1.0 / pos_sizes.double()
    values, counts, wsum = group_positives(pos.to(dtype), weights)
    eq, gap = count_negatives(neg_chunks, values, impl=impl)
    dtp, dfp, dpro = exact_increments(values, counts, wsum, eq, gap)
    return curve_metrics(dtp, dfp, dpro, n_regions, fpr_limit, f1_eps)
