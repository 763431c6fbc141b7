"""Legacy evaluation protocols: reproduce the numbers of published codes exactly, but fast.

``legacy_category_metrics(protocol, maps, masks, image_scores, image_labels)`` computes the seven
metrics of one category the way a published code base does, including its approximations, so that
published tables can be reproduced (and compared with the exact protocol of
:mod:`fastproto.metrics.functional`). Inputs are what those codes see at the metric call: maps already
resized/smoothed, masks already binarised, image scores already aggregated (all the caller's job).

Protocols (repository names only; the algorithms are restated here, vectorised):

* ``"dinomaly"``: guojiajeremy/Dinomaly ``utils.py`` (``evaluation_batch`` -> ``compute_pro``,
  ``f1_score_max``, sklearn), also the CPU path of luow23/INP-Former.
* ``"ader"``: zhangzjn/ADer ``util/metric.py`` ``Evaluator`` with ``use_adeval=True``, whose pixel
  AUROC / AP / AUPRO come from winggan/adeval (``EvalAccumulatorCuda``, 50 strips).
* ``"adeval"``: luow23/INP-Former ``utils.py`` ``ader_evaluator`` (winggan/adeval
  ``EvalAccumulatorCuda``, 200 strips, plus sklearn).

Differences from the exact protocol (MVTec AD AUPRO; sklearn AUROC / AP / F1-max), per protocol.
"same" = identical to exact; every listed item is reproduced on purpose:

===============  ========================================  =============================================  =========================================
item             dinomaly (Dinomaly; INP-Former CPU path)  ader (ADer + ADEval, nstrips=50)               adeval (INP-Former + ADEval, nstrips=200)
===============  ========================================  =============================================  =========================================
I-AUROC, I-AP    same (sklearn)                            same (sklearn)                                 same (sklearn)
I-F1max          max 2PR/(P+R+1e-7) over the exact         max of the finite 2PR/(P+R), no eps            as dinomaly (eps 1e-7)
                 PR curve
P-AUROC          same (sklearn, every pixel)               ADEval: 50 equal-width bins between the        as ader with 200 bins
                                                           category's map min and max (CUDA torch.histc
                                                           arithmetic in the maps' dtype), trapezoid
                                                           over the 51 edges; the maximum pixel counted
                                                           twice (histc last bin + '>= max' overflow
                                                           bin); no (0, 0) point
P-AP             same (sklearn step AP)                    ADEval 'AUPR': trapezoid of precision over     as ader with 200 bins
                                                           recall on the binned curve (precision := 1
                                                           where nothing is predicted positive), not AP
P-F1max          max 2PR/(P+R+1e-7), exact curve           ADer mF1_max_px: maps min-max normalised over  as dinomaly (exact, eps 1e-7)
                                                           the category (maps' dtype), 21 levels
                                                           np.arange(0, 1.001, 0.05), 'norm > t',
                                                           P = I/(Pred+1e-8), R = I/(L+1e-8),
                                                           F1 = 2PR/(P+R+1e-8), max over levels
AUPRO levels     np.arange(min, max, (max-min)/200)        the 51 bin edges above                         the 201 bin edges
                 (200, sometimes 201), 'map > t'
AUPRO regions    8-connected GT regions; PRO = mean        same regions (cv2, 8-connected); pixel         as ader
                 overlap over all regions of the           weight float32(1/area), i.e. rounded to
                 category                                  float32
AUPRO FPR        all normal pixels of the category         same                                           same
AUPRO at limit   keep levels with FPR < 0.3 (strict),      trapezoid up to the last edge <= 0.3 plus      as ader
                 no (0, 0) point, FPR divided by the       the exact partial trapezoid of the segment
                 largest kept FPR (not 0.3), sklearn       crossing 0.3 (ADEval 'trapezoid-interp'),
                 auc                                       divided by 0.3; NaN if PRO = 0 on both
                                                           sides of the crossing (as ADEval)
GT regions       labelled once here (the original          labelled once (as ADEval)                      labelled once
                 re-labels with skimage at every level)
GT binarisation  caller's (Dinomaly: > 0)                  caller's (dataset masks)                       caller's (INP-Former: > 0.5)
image score      caller's (top-1 % mean)                   caller's (max of the 16x16 avg-pooled map,     caller's (top-1 % mean)
                                                           or max)
image labels     caller's (dataset labels)                 caller's (ADer: mask.any() per image)          caller's (dataset labels)
===============  ========================================  =============================================  =========================================

Numerical conventions reproduced (all documented choices, not accidents):

* ADEval: the ADer/INP-Former accumulator is ``EvalAccumulatorCuda`` (adeval 1.1.0), so the pixel
  histograms follow CUDA ``torch.histc``: bin = ``int((v - min) * nbins / (max - min))`` evaluated in the
  maps' dtype (float32 for float32 maps), ``bin == nbins`` folded into the last bin, values ``>= max``
  counted again in the overflow bin. The CPU ``EvalAccumulator`` (``np.histogram`` on float32 edges)
  bins differently and has no double count; it is *not* what those codes run. Bin counts are
  identical; the float64 PRO-weighted sums equal ADEval's up to summation order (~1e-16). ADEval's
  bilinear resize of each map to its mask is the identity here (same size). ADer also feeds ADEval's
  image curves (bounds: image-score min/max -/+ 1e-7) but reports sklearn's image metrics, so those
  bounds play no part; INP-Former does not feed them at all.
* Threshold comparisons (Dinomaly levels, ADer's 21 F1 levels) are made after casting the float64
  thresholds to the maps' dtype, i.e. with NumPy 1.x value-based casting (float32 array vs float64
  scalar compares in float32), the NumPy of the official environments (Dinomaly pins 1.18; ADer needs
  torch 2.1 hence NumPy 1.x). Under NumPy >= 2 the same code would compare in float64; the two differ
  only for a pixel exactly equal to a rounded threshold. Pass float64 maps to get float64 comparisons
  (ADer models that build float64 maps).
* Degenerate inputs return NaN instead of the original's exception: no anomalous or no normal pixel
  (pixel metrics), one image class only (image metrics), constant maps (Dinomaly AUPRO; all ADEval
  pixel metrics since ADEval asserts ``min < max``), fewer than two kept AUPRO points, an ADEval curve
  with no edge at FPR <= limit, or a failing ADEval interpolation assertion.

Cost: O(N) passes plus one sort of the normal pixels where an exact pixel curve is needed (dinomaly:
P-AUROC, P-AP, P-F1max; adeval: P-F1max); the 200-level AUPRO is O(N log T + R T) (one ``searchsorted`` per
pixel, one ``bincount`` over (region, level), cumulative sums), the ADEval curves O(N + nstrips).
"""
from __future__ import annotations

import numpy as np

LEGACY_PROTOCOLS = ("dinomaly", "ader", "adeval")
METRIC_KEYS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")

_DEFAULT_NUM_THRESHOLDS = {"dinomaly": 200, "ader": 21}  # Dinomaly AUPRO levels; ADer pixel-F1 levels
_DEFAULT_NSTRIPS = {"ader": 50, "adeval": 200}
_F1_EPS = 1e-7  # Dinomaly / INP-Former ``f1_score_max``
_ADER_EPS = 1e-8  # ADer ``Evaluator.eps``

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # NumPy >= 2 / < 2
_NAN = float("nan")


# ------------------------------------------------------------------------------------------ inputs


def _validate(protocol, maps, masks, image_scores, image_labels, fpr_limit, num_thresholds, nstrips):
    if protocol not in LEGACY_PROTOCOLS:
        raise ValueError(f"protocol must be one of {LEGACY_PROTOCOLS}, got {protocol!r}")
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B,H,W], got shape {maps.shape}")
    if maps.size == 0:
        raise ValueError(f"maps is empty (shape {maps.shape})")
    if not (np.issubdtype(maps.dtype, np.floating) or np.issubdtype(maps.dtype, np.integer)):
        raise TypeError(f"maps must be real-valued, got dtype {maps.dtype}")
    if maps.dtype != np.float64:
        maps = maps.astype(np.float32, copy=False)
    if not np.isfinite(maps).all():
        raise ValueError("maps contains NaN/Inf values; metrics would be undefined")
    masks = np.asarray(masks)
    if masks.shape != maps.shape:
        raise ValueError(f"masks shape {masks.shape} does not match maps shape {maps.shape}")
    if masks.dtype != np.bool_:
        values = np.unique(masks)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"masks must be binary (bool or 0/1), found values {values[:8].tolist()}")
        masks = masks != 0
    scores = np.asarray(image_scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(image_labels).reshape(-1)
    b = maps.shape[0]
    if scores.size != b or labels.size != b:
        raise ValueError(f"image_scores ({scores.size}) and image_labels ({labels.size}) must have one entry "
                         f"per image ({b})")
    if not np.isfinite(scores).all():
        raise ValueError("image_scores contains NaN/Inf values")
    if labels.dtype != np.bool_:
        if not np.isin(np.unique(labels), (0, 1)).all():
            raise ValueError("image_labels must be bool or 0/1")
        labels = labels != 0
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None:
        if protocol not in _DEFAULT_NUM_THRESHOLDS:
            raise ValueError(f"num_thresholds does not apply to protocol {protocol!r} (ADEval uses nstrips)")
        if int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise ValueError(f"num_thresholds must be an integer >= 2, got {num_thresholds}")
    if nstrips is not None:
        if protocol not in _DEFAULT_NSTRIPS:
            raise ValueError(f"nstrips does not apply to protocol {protocol!r} (it has no ADEval curves)")
        if int(nstrips) != nstrips or nstrips < 5:  # ADEval asserts nstrips >= 5
            raise ValueError(f"nstrips must be an integer >= 5, got {nstrips}")
    return maps, masks, scores, labels


def _region_ids(masks: np.ndarray):
    """Global region index (0..R-1) of every anomalous pixel (raveled order) and the region areas."""
    from fastproto.metrics.components import connected_components

    labels = connected_components(masks, connectivity=8)
    labels = labels.cpu().numpy() if hasattr(labels, "cpu") else np.asarray(labels)
    labels = labels.reshape(masks.shape[0], -1).astype(np.int64, copy=False)
    per_image = labels.max(axis=1)  # labels are 1..K_b per image
    offsets = np.cumsum(per_image) - per_image
    glob = labels[masks.reshape(masks.shape[0], -1)] + np.repeat(offsets, masks.reshape(masks.shape[0], -1).sum(1))
    # compact (robust to label gaps), 0-based
    areas = np.bincount(glob)
    present = areas > 0
    remap = np.cumsum(present) - 1
    return remap[glob], areas[present]


# ------------------------------------------------------------------------- exact (sklearn) curves


def _exact_metrics(scores, labels, f1_mode: str):
    """sklearn ``roc_auc_score`` / ``average_precision_score`` and the F1-max of the given code, from the
    package's exact curve engine: ``"eps"`` is Dinomaly/INP-Former's 2PR/(P+R+1e-7); ``"finite"`` is
    ADer's max over the finite 2PR/(P+R) (the engine only visits thresholds where P, R > 0)."""
    import torch

    from fastproto.metrics.curves import exact_metrics

    scores, labels = scores.ravel(), labels.ravel()
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return _NAN, _NAN, _NAN
    out = exact_metrics([torch.from_numpy(neg)], torch.from_numpy(pos), f1_eps=_F1_EPS if f1_mode == "eps" else 0.0)
    return out["auroc"], out["ap"], out["f1max"]


# ------------------------------------------------------------------------------- Dinomaly AUPRO


def _sk_auc(x: np.ndarray, y: np.ndarray) -> float:
    """sklearn.metrics.auc semantics (monotone x either way); NaN where sklearn raises."""
    if x.size < 2:
        return _NAN
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            return _NAN
    return float(direction * _trapezoid(y, x))


def _level_index(values: np.ndarray, levels: np.ndarray):
    """For thresholds ``levels`` (any order), return the sorted order of the levels and, per value, the
    number of levels strictly below it: ``value > sorted_levels[j]`` iff ``index > j``."""
    order = np.argsort(levels, kind="stable")
    return order, np.searchsorted(levels[order], values, side="left")


def _suffix_counts(hist: np.ndarray) -> np.ndarray:
    """hist[..., k] for k = 0..T  ->  out[..., j] = sum_{k > j} hist[..., k], j = 0..T-1."""
    c = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]
    return c[..., 1:]


def _dinomaly_aupro(maps, masks, num_th: int, fpr_limit: float) -> float:
    min_th, max_th = maps.min(), maps.max()
    if not max_th > min_th:  # np.arange with a zero step raises in the original
        return _NAN
    delta = (max_th - min_th) / num_th  # in the maps' dtype, as the original
    levels = np.arange(min_th, max_th, delta)  # float64 levels, exactly the original's
    cmp_levels = levels.astype(maps.dtype)  # NumPy 1.x: float32 map vs float64 scalar compares in float32
    order, k = _level_index(maps.ravel(), cmp_levels)
    t = levels.size
    flat_masks = masks.ravel()
    neg_k = k[~flat_masks]
    n_neg = neg_k.size
    rid, areas = _region_ids(masks)
    r = areas.size
    if r == 0 or n_neg == 0:
        return _NAN
    fp_sorted = _suffix_counts(np.bincount(neg_k, minlength=t + 1))
    hist = np.bincount(rid * (t + 1) + k[flat_masks], minlength=r * (t + 1)).reshape(r, t + 1)
    tp_sorted = _suffix_counts(hist)  # [R, T] pixels of region r above sorted level j
    pro_sorted = (tp_sorted / areas[:, None]).mean(axis=0)
    fpr = np.empty(t)
    pro = np.empty(t)
    fpr[order] = fp_sorted / n_neg
    pro[order] = pro_sorted
    keep = fpr < fpr_limit
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size == 0:
        return _NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        fpr = fpr / fpr.max()
    return _sk_auc(fpr, pro)


# --------------------------------------------------------------------------------- ADEval curves


def _histc_bins(values: np.ndarray, nbins: int, lo, hi) -> np.ndarray:
    """CUDA ``torch.histc`` bin of each value in [lo, hi], arithmetic in the values' dtype."""
    dt = values.dtype.type
    lo, hi = dt(lo), dt(hi)
    with np.errstate(over="ignore"):
        b = ((values - lo) * dt(nbins) / (hi - lo)).astype(np.int64)
    return np.minimum(b, nbins - 1)  # bin == nbins (the maximum) goes to the last bin


def _adeval_stats(maps, masks, nstrips: int):
    """ADEval (EvalAccumulatorCuda) pixel statistics: positive, negative and PRO-weighted positive
    histograms over nstrips + 2 bins (underflow, nstrips histc bins, overflow ``>= max``)."""
    lo, hi = maps.min(), maps.max()
    if not hi > lo:
        return None
    flat = maps.ravel()
    flat_masks = masks.ravel()
    idx = _histc_bins(flat, nstrips, lo, hi) + 1
    at_max = flat >= hi  # counted a second time in the overflow bin
    size = nstrips + 2
    rid, areas = _region_ids(masks)
    weights = (1.0 / areas).astype(np.float32).astype(np.float64)  # cv2 area -> float32 weight map
    pos_idx, neg_idx = idx[flat_masks], idx[~flat_masks]
    pos_w = weights[rid]
    pos = np.bincount(pos_idx, minlength=size).astype(np.float64)
    neg = np.bincount(neg_idx, minlength=size).astype(np.float64)
    wpos = np.bincount(pos_idx, weights=pos_w, minlength=size)
    pos_max = at_max[flat_masks]
    pos[-1] += np.count_nonzero(pos_max)
    neg[-1] += np.count_nonzero(at_max[~flat_masks])
    wpos[-1] += pos_w[pos_max].sum()
    return pos, neg, wpos


def _cum(stat):
    c = np.cumsum(stat)
    return c[:-1], c[-1]


def _adeval_metrics(stats, fpr_limit: float):
    """ADEval summary(): p_auroc, p_aupr, p_aupro from the accumulated histograms."""
    pos, neg, wpos = stats
    fn, p = _cum(pos)
    tn, n = _cum(neg)
    tp, fp = p - fn, n - tn
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp / (tp + fn)
        fpr = fp / (fp + tn)
        precision = tp / (tp + fp)
    precision[~(tp + fp > 0)] = 1.0
    auroc = float(_trapezoid(tpr[::-1], fpr[::-1]))
    aupr = float(_trapezoid(precision[::-1], tpr[::-1]))
    wfn, wp = _cum(wpos)
    wtp = wp - wfn
    with np.errstate(divide="ignore", invalid="ignore"):
        pro = wtp / (wtp + wfn)  # weighted FPR == FPR (normal pixels have weight 1)
    return auroc, aupr, _adeval_aupro(fpr, pro, fpr_limit)


def _adeval_aupro(fpr, pro, limit: float) -> float:
    below = fpr <= limit
    lo_pro, lo_fpr = pro[below][::-1], fpr[below][::-1]
    hi_pro, hi_fpr = pro[~below][::-1], fpr[~below][::-1]
    if lo_fpr.size == 0 or hi_fpr.size == 0:  # IndexError in the original
        return _NAN
    lo = float(_trapezoid(lo_pro, lo_fpr))
    hi = float(_trapezoid(hi_pro, hi_fpr))
    tot = float(_trapezoid(pro[::-1], fpr[::-1]))
    frac = (limit - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1])
    area = tot - (lo + hi)  # the trapezoid of the segment crossing the limit
    y1, y2 = lo_pro[-1], hi_pro[0]
    if not (area >= 0 and frac >= 0 and 0 <= y1 <= y2):  # AssertionError in the original
        return _NAN
    # exact integral of the linear segment up to the limit: rectangle part * t + triangle part * t^2
    with np.errstate(divide="ignore", invalid="ignore"):
        rect_ratio = y1 / (y1 + 0.5 * (y2 - y1))
    partial = area * rect_ratio * frac + area * (1 - rect_ratio) * frac * frac
    return float((lo + partial) / limit)


# ------------------------------------------------------------------------------ ADer pixel F1


def _ader_pixel_f1max(maps, masks, num_thresholds: int) -> float:
    lo, hi = maps.min(), maps.max()
    if not hi > lo:
        return _NAN
    norm = ((maps - lo) / (hi - lo)).ravel()  # in the maps' dtype, as ADer
    levels = np.arange(0.0, 1.0 + 1e-3, 1.0 / (num_thresholds - 1))  # 21 levels: step 1/20 == 0.05 exactly
    order, k = _level_index(norm, levels.astype(maps.dtype))
    t = levels.size
    flat_masks = masks.ravel()
    pred = _suffix_counts(np.bincount(k, minlength=t + 1))
    inter = _suffix_counts(np.bincount(k[flat_masks], minlength=t + 1))
    label = np.int64(np.count_nonzero(flat_masks))
    back = np.argsort(order)  # sorted position -> level order (the levels are ascending already)
    pred, inter = pred[back], inter[back]
    precision = inter / (pred + _ADER_EPS)
    recall = inter / (label + _ADER_EPS)
    f1 = (1 + 1.0 ** 2) * precision * recall / (1.0 ** 2 * precision + recall + _ADER_EPS)
    return float(f1.max())


# ------------------------------------------------------------------------------------- public


def legacy_category_metrics(protocol: str, maps: np.ndarray, masks: np.ndarray, image_scores: np.ndarray,
                            image_labels: np.ndarray, *, fpr_limit: float = 0.3, num_thresholds: int | None = None,
                            nstrips: int | None = None) -> dict[str, float]:
    """The seven metrics of one category under a legacy protocol (see the module docstring).

    Args:
        protocol: ``"dinomaly"``, ``"ader"`` or ``"adeval"``.
        maps: ``[B,H,W]`` anomaly maps (float32; float64 is kept as float64, other dtypes become float32),
            already resized and smoothed.
        masks: ``[B,H,W]`` bool (or 0/1) ground truth, already binarised.
        image_scores: ``[B]`` image scores, already aggregated.
        image_labels: ``[B]`` bool (or 0/1) image labels.
        fpr_limit: AUPRO FPR limit (0.3 in every published code).
        num_thresholds: ``dinomaly``: AUPRO levels (default 200); ``ader``: pixel-F1 levels
            ``np.arange(0, 1.001, 1 / (num_thresholds - 1))`` (default 21: step 0.05). Not for ``adeval``.
        nstrips: ADEval strips for ``ader`` (default 50) and ``adeval`` (default 200).

    Returns:
        ``{"i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro"}`` as floats; NaN where the
        metric is undefined (one class only, constant maps, ...).
    """
    maps, masks, scores, labels = _validate(protocol, maps, masks, image_scores, image_labels, fpr_limit,
                                            num_thresholds, nstrips)
    out = dict.fromkeys(METRIC_KEYS, _NAN)
    i_auroc, i_ap, i_f1 = _exact_metrics(scores, labels, "finite" if protocol == "ader" else "eps")
    out.update(i_auroc=i_auroc, i_ap=i_ap, i_f1max=i_f1)

    n_pos = int(np.count_nonzero(masks))
    if n_pos == 0 or n_pos == masks.size:  # pixel metrics undefined
        return out

    if protocol == "dinomaly":
        p_auroc, p_ap, p_f1 = _exact_metrics(maps, masks, "eps")
        num_th = int(num_thresholds or _DEFAULT_NUM_THRESHOLDS["dinomaly"])
        out.update(p_auroc=p_auroc, p_ap=p_ap, p_f1max=p_f1, aupro=_dinomaly_aupro(maps, masks, num_th, fpr_limit))
        return out

    stats = _adeval_stats(maps, masks, int(nstrips or _DEFAULT_NSTRIPS[protocol]))
    if stats is not None:
        p_auroc, p_ap, aupro = _adeval_metrics(stats, fpr_limit)
        out.update(p_auroc=p_auroc, p_ap=p_ap, aupro=aupro)
    if protocol == "ader":
        if stats is not None:  # ADer builds the ADEval accumulator first, which fails on constant maps
            out["p_f1max"] = _ader_pixel_f1max(maps, masks, int(num_thresholds or _DEFAULT_NUM_THRESHOLDS["ader"]))
    else:
        out["p_f1max"] = _exact_metrics(maps, masks, "eps")[2]
    return {k: float(v) for k, v in out.items()}
