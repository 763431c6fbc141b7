"""Float64 NumPy reference of the AD metrics: the ground truth the fast engines are tested against.

Every metric is computed from one descending sort of all scores with exact tie grouping:
- AUROC: trapezoid area of the ROC through every distinct threshold (= sklearn ``roc_auc_score``);
- AP: step sum ``sum_n (R_n - R_{n-1}) P_n`` (= sklearn ``average_precision_score``);
- F1-max: ``max 2PR/(P+R)`` over the exact PR curve (sklearn's curve without its artificial last point);
- AUPRO: the MVTec AD official algorithm (8-connected ground-truth regions, per-pixel PRO weight
  ``1/|region|``, FPR over normal pixels, last point of every tie run, curve from (0, 0), trapezoid up to
  the FPR limit with linear interpolation there, divided by the limit), accumulated in float64.
Slow and memory-hungry on purpose (plain, obviously correct code).
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage


def _tie_curve(scores, labels, weights=None):
    """Cumulative (tp, fp[, weight]) at the last index of every run of equal scores, descending."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order].astype(np.float64)
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    if weights is None:
        return tps, fps
    w = np.asarray(weights, dtype=np.float64).ravel()[order]
    return tps, fps, np.cumsum(w)[ends]


def roc_auc(scores, labels) -> float:
    tps, fps = _tie_curve(scores, labels)
    if tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))


def average_precision(scores, labels) -> float:
    tps, fps = _tie_curve(scores, labels)
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels) -> float:
    tps, fps = _tie_curve(scores, labels)
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f1.max())


def trapezoid_to(x, y, x_max) -> float:
    """Area under the polyline (x, y) (x non-decreasing) from x[0] to x_max, interpolating at x_max."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max))
        assert 0 < ins < x.size
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def region_labels(masks, connectivity: int = 8):
    """scipy.ndimage.label per image; returns (labels [B,H,W] int64 unique across images, number of regions)."""
    masks = np.asarray(masks).astype(bool)
    structure = np.ones((3, 3)) if connectivity == 8 else scipy.ndimage.generate_binary_structure(2, 1)
    out = np.zeros(masks.shape, dtype=np.int64)
    total = 0
    for b in range(masks.shape[0]):
        lab, n = scipy.ndimage.label(masks[b], structure=structure)
        out[b] = np.where(lab > 0, lab + total, 0)
        total += n
    return out, total


def aupro(maps, masks, fpr_limit: float = 0.3, connectivity: int = 8) -> float:
    maps = np.asarray(maps, dtype=np.float64)
    labels, n_regions = region_labels(masks, connectivity)
    normal = labels == 0
    if n_regions == 0 or not normal.any():
        return float("nan")
    sizes = np.bincount(labels.ravel())
    pro_change = np.where(normal, 0.0, 1.0 / sizes[labels])
    _, fps, pro = _tie_curve(maps, ~normal, pro_change)
    fpr = np.clip(np.r_[0.0, fps / normal.sum()], 0, 1)
    pro = np.clip(np.r_[0.0, pro / n_regions], 0, 1)
    fpr, pro = np.r_[fpr, 1.0], np.r_[pro, 1.0]
    return trapezoid_to(fpr, pro, fpr_limit) / fpr_limit


def all_metrics(maps, masks, image_scores, image_labels, fpr_limit: float = 0.3) -> dict:
    """The seven metrics and their mean, from dense maps and binary masks."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    out = {
        "i_auroc": roc_auc(image_scores, image_labels),
        "i_ap": average_precision(image_scores, image_labels),
        "i_f1max": f1_max(image_scores, image_labels),
        "p_auroc": roc_auc(maps, masks),
        "p_ap": average_precision(maps, masks),
        "p_f1max": f1_max(maps, masks),
        "aupro": aupro(maps, masks, fpr_limit),
    }
    out["mad"] = float(np.mean(list(out.values())))
    return out
