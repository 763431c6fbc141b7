"""Competitor implementations of the AD metrics, restated from their published algorithms.

Every function takes ``(maps, masks)`` -- anomaly maps ``float [B, H, W]`` and ground-truth masks
``bool/uint8 [B, H, W]`` as numpy arrays -- and returns a dict with the subset of the metric keys
``i_auroc, i_ap, i_f1max, p_auroc, p_ap, p_f1max, aupro`` that the method computes. ``p_ap`` holds
whatever the method reports as pixel "AP" (for ADEval that is the trapezoidal AUPR, not step-AP).

These are restatements (no code copied) of, with the sources read for each:

* scikit-learn ``roc_auc_score`` / ``average_precision_score`` / ``precision_recall_curve`` called
  separately, as research code does (Dinomaly, INP-Former, ADer without ADEval) -- three full sorts.
* The MVTec AD evaluation package (``pro_curve_util.compute_pro`` + ``generic_util.trapezoid`` +
  ``evaluate_experiment.calculate_au_pro``): the exact AUPRO algorithm; also our float64 reference.
* ADEval (``winggan/adeval`` v1.1.0, CPU ``EvalAccumulator`` / ``mem_effic._AccumulateStatCurve``):
  binned P-AUROC, trapezoidal P-AUPR and AUPRO with ``nstrips`` equal-width bins between given bounds,
  called like ADer (nstrips=50) and INP-Former (nstrips=200) with the bounds = min/max of the maps.
* Dinomaly ``utils.compute_pro`` (AnomalyCLIP/cflow-ad lineage): 200 linear thresholds, skimage
  ``label`` + ``regionprops`` of every GT mask at every threshold, FPR < 0.3 kept and divided by its max.
* ADer ``mF1_max_px``: 21 thresholds 0, 0.05, ..., 1 on min-max normalised maps.
* torchmetrics ``BinaryAUROC`` / ``BinaryAveragePrecision`` with ``thresholds=None`` (exact), updated
  batch by batch; inputs outside [0, 1] are passed through a sigmoid per update (implicit
  ``normalize_logits_if_needed``), which turns unbounded anomaly scores into float32 ties.

Image-level metrics everywhere use image score = max of the map and label = mask.any().
"""
from __future__ import annotations

import statistics

import numpy as np
from scipy import ndimage

__all__ = [
    "image_scores_labels",
    "sklearn_p_auroc",
    "sklearn_p_ap",
    "sklearn_p_f1max",
    "sklearn_image",
    "sklearn_all",
    "mvtec_aupro",
    "mvtec_trapezoid",
    "adeval_binned",
    "adeval_binned_cuda",
    "dinomaly_aupro",
    "ader_f1max_px",
    "torchmetrics_exact",
    "numpy_binary_metrics",
    "reference_metrics",
]

_STRUCT8 = np.ones((3, 3), dtype=int)  # 8-connectivity, as in the MVTec code


def _np(x):
    """numpy view of a numpy array or (CPU) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def image_scores_labels(maps, masks):
    """Image score = max of each map, image label = any GT pixel."""
    maps, masks = _np(maps), _np(masks)
    return maps.reshape(len(maps), -1).max(axis=1), masks.reshape(len(masks), -1).any(axis=1)


# ------------------------------------------------------------------------------------------------
# scikit-learn, called per metric as research code does
# ------------------------------------------------------------------------------------------------
def _f1max_from_pr(precision: np.ndarray, recall: np.ndarray) -> float:
    """max 2PR/(P+R) over sklearn's PR curve without its final (P=1, R=0) point; 0 where P+R = 0."""
    p, r = precision[:-1], recall[:-1]
    den = p + r
    f1 = np.divide(2.0 * p * r, den, out=np.zeros_like(den), where=den > 0)
    return float(f1.max()) if f1.size else 0.0


def sklearn_p_auroc(maps, masks):
    from sklearn.metrics import roc_auc_score

    return {"p_auroc": float(roc_auc_score(_np(masks).ravel(), _np(maps).ravel()))}


def sklearn_p_ap(maps, masks):
    from sklearn.metrics import average_precision_score

    return {"p_ap": float(average_precision_score(_np(masks).ravel(), _np(maps).ravel()))}


def sklearn_p_f1max(maps, masks):
    from sklearn.metrics import precision_recall_curve

    precision, recall, _ = precision_recall_curve(_np(masks).ravel(), _np(maps).ravel())
    return {"p_f1max": _f1max_from_pr(precision, recall)}


def sklearn_image(maps, masks):
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    scores, labels = image_scores_labels(maps, masks)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        "i_auroc": float(roc_auc_score(labels, scores)),
        "i_ap": float(average_precision_score(labels, scores)),
        "i_f1max": _f1max_from_pr(precision, recall),
    }


def sklearn_all(maps, masks):
    """All six image/pixel metrics with sklearn: 3 image-level calls + 3 full pixel sorts."""
    out = sklearn_image(maps, masks)
    out.update(sklearn_p_auroc(maps, masks))
    out.update(sklearn_p_ap(maps, masks))
    out.update(sklearn_p_f1max(maps, masks))
    return out


# ------------------------------------------------------------------------------------------------
# MVTec AD official evaluation code (exact AUPRO) -- restated
# ------------------------------------------------------------------------------------------------
def mvtec_trapezoid(x, y, x_max=None) -> float:
    """Trapezoid rule on a curve sorted by x, optionally cut at ``x_max`` with y linearly interpolated.

    Restates ``generic_util.trapezoid``: non-finite points are dropped; if ``x_max`` is not a sample,
    the last segment is cut at ``x_max`` (interpolating between the samples around it) and only the
    samples with x <= x_max enter the plain trapezoid sum.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    correction = 0.0
    if x_max is not None:
        if not np.any(x == x_max):
            ins = int(np.searchsorted(x, x_max, side="right"))  # == bisect.bisect(x, x_max)
            if not 0 < ins < len(x):
                raise ValueError("x_max lies outside the range of x")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def mvtec_aupro(maps, masks, fpr_limit: float = 0.3, *, float32_fpr: bool = False):
    """Exact AUPRO of the MVTec AD evaluation package, restated; the float64 AUPRO reference.

    Algorithm: 8-connected components of each GT map (``scipy.ndimage.label`` with a 3x3 structure);
    per pixel an FP increment (1 for OK pixels, uint32 as in the original, with its overflow guard) and
    a PRO increment (1/|region| for GT pixels, float64); one argsort of all scores (descending), the
    two increment arrays gathered in sorted order (in place, as the original does to save memory) and
    cumulatively summed; FPR = cumsum(fp)/#OK, PRO = cumsum(pro)/#regions; only the last point of each
    run of equal scores is kept (exact tie handling); clip to <= 1; prepend (0, 0), append (1, 1);
    trapezoid up to FPR = ``fpr_limit`` with linear interpolation there; divide by ``fpr_limit``.

    Precision: the original casts the cumulative FP counts to **float32** before dividing (FPR then
    carries ~6e-8 relative rounding and can merge neighbouring FPR values). By default this
    restatement keeps FPR in float64 (``float32_fpr=False``) so that it serves as the 1e-6 exactness
    reference; ``float32_fpr=True`` reproduces the original's rounding.
    """
    maps, masks = _np(maps), _np(masks)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and masks must both be [B, H, W]; got {maps.shape} and {masks.shape}")
    shape = maps.shape
    fp_changes = np.zeros(shape, dtype=np.uint32)
    if maps.size >= np.iinfo(np.uint32).max:
        raise ValueError("too many pixels for uint32 cumulative FP counts (the original asserts too)")
    pro_changes = np.zeros(shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i in range(shape[0]):
        labeled, n_comp = ndimage.label(masks[i], structure=_STRUCT8)
        num_regions += n_comp
        ok = labeled == 0
        num_ok += int(ok.sum())
        fp_changes[i][ok] = 1
        pro_i = pro_changes[i]
        for k in range(1, n_comp + 1):  # one pass per component, as the original does
            region = labeled == k
            pro_i[region] = 1.0 / region.sum()

    scores = np.array(maps).ravel()  # the original copies (np.array of the list of maps)
    fp_flat = fp_changes.ravel()
    pro_flat = pro_changes.ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    np.take(scores, order, out=scores)
    np.take(fp_flat, order, out=fp_flat)
    np.take(pro_flat, order, out=pro_flat)
    del order

    np.cumsum(fp_flat, out=fp_flat)
    fprs = fp_flat.astype(np.float32 if float32_fpr else np.float64, copy=False)
    np.divide(fprs, num_ok, out=fprs)
    np.cumsum(pro_flat, out=pro_flat)
    np.divide(pro_flat, num_regions, out=pro_flat)
    pros = pro_flat

    keep = np.append(np.diff(scores) != 0, np.True_)
    del scores
    fprs, pros = fprs[keep], pros[keep]
    np.clip(fprs, None, 1.0, out=fprs)
    np.clip(pros, None, 1.0, out=pros)
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    return {"aupro": mvtec_trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit}


# ------------------------------------------------------------------------------------------------
# ADEval (binned, iterative accumulation) -- restated
# ------------------------------------------------------------------------------------------------
def _pro_weight(gt: np.ndarray) -> np.ndarray:
    """1/area of the 8-connected GT component for GT pixels, 0 elsewhere, float32.

    ADEval uses ``cv2.connectedComponentsWithStats(connectivity=8)`` and a per-label loop; the
    labelling is identical with scipy and a 3x3 structure (OpenCV is not a dependency here).
    """
    labeled, n = ndimage.label(gt, structure=_STRUCT8)
    weights = np.zeros(n + 1, dtype=np.float32)
    if n:
        weights[1:] = 1.0 / np.bincount(labeled.ravel(), minlength=n + 1)[1:]
    return weights[labeled]


def _adeval_curve(pos: np.ndarray, neg: np.ndarray):
    """(tp, fp, tn, fn) at the nstrips+1 inner bin edges: predicted positive <=> score >= edge."""
    cp, cn = np.cumsum(pos), np.cumsum(neg)
    fn, p = cp[:-1], cp[-1]
    tn, n = cn[:-1], cn[-1]
    return p - fn, n - tn, tn, fn


def _adeval_interp_area(t: float, area: float, y1: float, y2: float) -> float:
    """ADEval's ``_trapezoid_intep``: share of a trapezoid's area up to fraction t of its width.

    Split into a rectangle (height y1) and a triangle; the partial area is rect*t + tri*t^2, which is
    the exact integral of the linearly interpolated segment. (The original divides by y1 + (y2-y1)/2
    and returns NaN when both heights are 0; here that case gives 0.)
    """
    den = y1 + 0.5 * (y2 - y1)
    if den <= 0:
        return 0.0
    rect_ratio = y1 / den
    return area * rect_ratio * t + area * (1.0 - rect_ratio) * t * t


def _adeval_summary(pos, neg, wpos, wneg, limit: float = 0.3):
    tp, fp, tn, fn = _adeval_curve(pos, neg)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tp / (tp + fn)
        fpr = fp / (fp + tn)
        precision = tp / (tp + fp)
    precision[~(tp + fp > 0)] = 1.0  # nothing predicted positive -> precision 1 (as ADEval)
    p_auroc = float(np.trapezoid(tpr[::-1], fpr[::-1]))
    p_aupr = float(np.trapezoid(precision[::-1], tpr[::-1]))

    wtp, wfp, wtn, wfn = _adeval_curve(wpos, wneg)
    pro = wtp / (wtp + wfn)
    wfpr = wfp / (wfp + wtn)
    low = wfpr <= limit
    lo_pro, lo_fpr = pro[low][::-1], wfpr[low][::-1]
    hi_pro, hi_fpr = pro[~low][::-1], wfpr[~low][::-1]
    lo = float(np.trapezoid(lo_pro, lo_fpr))
    hi = float(np.trapezoid(hi_pro, hi_fpr))
    tot = float(np.trapezoid(pro[::-1], wfpr[::-1]))
    if len(lo_fpr) == 0 or len(hi_fpr) == 0:  # the original would fail here
        aupro = float("nan")
    else:
        t = (limit - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1])
        aupro = (lo + _adeval_interp_area(t, tot - (lo + hi), lo_pro[-1], hi_pro[0])) / limit
    return {"p_auroc": p_auroc, "p_ap": p_aupr, "aupro": aupro}


def adeval_binned(maps, masks, nstrips: int = 200, bounds=None):
    """ADEval CPU ``EvalAccumulator`` restated: pixel AUROC, trapezoidal AUPR ("p_ap") and AUPRO.

    Bins: ``nstrips`` equal-width float32 bins between ``bounds`` (default: min and max of all maps,
    as ADer and INP-Former call it), plus an underflow and an overflow bin (``np.histogram`` with
    -inf/+inf outer edges; the top bin [max, inf] holds the maximum). Per image (``add_anomap``): GT
    weights 1/|component| (8-connectivity), OK pixels weight 1; histograms of positive and negative
    pixels, one ``np.histogram`` pair per distinct weight value, accumulated in float64 (counts and
    weighted counts). Curves: cumulative sums give TP/FP/TN/FN at the nstrips+1 inner edges; AUROC and
    AUPR with ``np.trapz``; AUPRO = trapezoid over edges with FPR <= 0.3 + the interpolated share of the
    segment straddling 0.3, / 0.3. ``nstrips`` = 50 is ADer's setting, 200 INP-Former's.
    """
    maps, masks = _np(maps), _np(masks)
    lo, hi = (float(maps.min()), float(maps.max())) if bounds is None else map(float, bounds)
    if not lo < hi:
        raise ValueError("ADEval needs lower bound < upper bound")
    edges = np.linspace(0.0, 1.0, num=nstrips + 1, endpoint=True, dtype=np.float32)
    edges = edges * np.float32(hi - lo) + np.float32(lo)
    inf = np.array([np.inf], dtype=np.float32)
    edges = np.concatenate([-inf, edges, inf])
    pos = np.zeros(len(edges) - 1, dtype=np.float64)
    neg, wpos, wneg = np.zeros_like(pos), np.zeros_like(pos), np.zeros_like(pos)
    for amap, gt in zip(maps, masks):
        gtw = _pro_weight(gt)
        weight = np.ones_like(gtw)
        label = gtw != 0
        weight[label] = gtw[label]
        preds = amap.reshape(-1)
        label = label.reshape(-1)
        weight = weight.reshape(-1)
        preds_pos, preds_neg = preds[label], preds[~label]
        weight_pos, weight_neg = weight[label], weight[~label]
        for wt in np.unique(weight):
            hpos = np.histogram(preds_pos[weight_pos == wt], edges)[0]
            hneg = np.histogram(preds_neg[weight_neg == wt], edges)[0]
            pos += hpos
            neg += hneg
            wpos += hpos * wt
            wneg += hneg * wt
    return _adeval_summary(pos, neg, wpos, wneg)


def adeval_package(maps, masks, nstrips: int = 200):
    """The published ADEval package itself (PyPI ``adeval``), CPU ``EvalAccumulator``, all maps in one
    ``add_anomap_batch`` call, bounds = min/max of the maps as ADer and INP-Former pass them.
    ADEval 1.1.0 calls ``np.trapz``, removed in NumPy 2.4: it is aliased to ``np.trapezoid`` here.
    Raises ImportError when the package is not installed."""
    import warnings

    if not hasattr(np, "trapz"):
        np.trapz = np.trapezoid
    from adeval import EvalAccumulator

    maps, masks = _np(maps), _np(masks)
    acc = EvalAccumulator(0.0, 1.0, float(maps.min()), float(maps.max()), skip_pixel_aupro=False, nstrips=nstrips)
    acc.add_anomap_batch(maps, masks.astype(np.uint8))
    with warnings.catch_warnings():  # its image-level part divides 0/0: no image scores were added
        warnings.simplefilter("ignore", RuntimeWarning)
        res = acc.summary()
    return {"p_auroc": float(res["p_auroc"]), "p_ap": float(res["p_aupr"]), "aupro": float(res["p_aupro"])}


def _histc_cuda_like(x: np.ndarray, nbins: int, lo, hi) -> np.ndarray:
    """CUDA ``torch.histc`` semantics in numpy: values outside [lo, hi] ignored, bin =
    ``int((v - lo) * nbins / (hi - lo))`` in the input dtype (float32 for float32 maps), bin == nbins
    folded into the last bin. (The CPU ``torch.histc`` kernel computes the bin with a different
    operation order, so it does not reproduce the GPU.)"""
    dt = x.dtype.type
    lo, hi = dt(lo), dt(hi)
    x = x[(x >= lo) & (x <= hi)]
    with np.errstate(over="ignore"):
        b = ((x - lo) * dt(nbins) / (hi - lo)).astype(np.int64)
    b[b == nbins] = nbins - 1
    return np.bincount(b, minlength=nbins).astype(np.float64)


def adeval_binned_cuda(maps, masks, nstrips: int = 200, bounds=None):
    """ADEval ``EvalAccumulatorCuda`` restated (what ADer and INP-Former actually run).

    Differences to the CPU class: ``torch.histc(bins=nstrips, min, max)`` for the inner bins, plus
    counts of ``< min`` and ``>= max`` for the outer ones -- so a value equal to the upper bound is
    counted twice (in the last inner bin *and* in the overflow bin); GT weights from the CPU component
    labelling (the mask goes to the CPU and back, as in ADEval), float32 ``1/area``; one histogram
    pair per distinct weight per image, accumulated in float64. With CUDA tensor maps the real
    ``torch.histc`` runs on the GPU; otherwise (numpy or CPU tensors) its GPU binning formula is
    emulated in numpy, which gives the same numbers (the timing is then not that of the GPU code).
    """
    try:
        import torch

        on_cuda = isinstance(maps, torch.Tensor) and maps.is_cuda
    except ImportError:
        on_cuda = False
    masks_np = _np(masks)
    if not on_cuda:
        maps_np = _np(maps)
        lo, hi = (maps_np.min(), maps_np.max()) if bounds is None else bounds
        size = nstrips + 2
        pos, neg = np.zeros(size), np.zeros(size)
        wpos, wneg = np.zeros(size), np.zeros(size)

        def hist(x):
            out = np.zeros(size)
            out[1:-1] = _histc_cuda_like(x, nstrips, lo, hi)
            out[0] = np.count_nonzero(x < lo)
            out[-1] = np.count_nonzero(x >= hi)
            return out

        for amap, gt in zip(maps_np, masks_np):
            gtw = _pro_weight(gt)
            label = gtw != 0
            weight = np.ones_like(gtw)
            weight[label] = gtw[label]
            preds, label, weight = amap.reshape(-1), label.reshape(-1), weight.reshape(-1)
            preds_pos, preds_neg = preds[label], preds[~label]
            weight_pos, weight_neg = weight[label], weight[~label]
            for wt in np.unique(weight):
                hpos = hist(preds_pos[weight_pos == wt])
                hneg = hist(preds_neg[weight_neg == wt])
                pos += hpos
                neg += hneg
                wpos += hpos * float(wt)
                wneg += hneg * float(wt)
        return _adeval_summary(pos, neg, wpos, wneg)

    dev = maps.device
    lo, hi = (float(maps.min()), float(maps.max())) if bounds is None else map(float, bounds)

    def hist_t(x):
        out = torch.zeros(nstrips + 2, dtype=torch.float64, device=dev)
        out[1:-1] = torch.histc(x, bins=nstrips, min=lo, max=hi)
        out[0] = (x < lo).count_nonzero()
        out[-1] = (x >= hi).count_nonzero()
        return out

    pos = torch.zeros(nstrips + 2, dtype=torch.float64, device=dev)
    neg, wpos, wneg = pos.clone(), pos.clone(), pos.clone()
    for i in range(maps.shape[0]):
        gtw = torch.from_numpy(_pro_weight(masks_np[i])).to(dev)
        label = gtw != 0
        weight = torch.ones_like(gtw)
        weight[label] = gtw[label]
        preds = maps[i].reshape(-1)
        label, weight = label.reshape(-1), weight.reshape(-1)
        preds_pos, preds_neg = preds[label], preds[~label]
        weight_pos, weight_neg = weight[label], weight[~label]
        for wt in torch.unique(weight):
            hpos = hist_t(preds_pos[weight_pos == wt])
            hneg = hist_t(preds_neg[weight_neg == wt])
            pos += hpos
            neg += hneg
            wpos.add_(hpos, alpha=float(wt))
            wneg.add_(hneg, alpha=float(wt))
    return _adeval_summary(*(t.cpu().numpy() for t in (pos, neg, wpos, wneg)))


# ------------------------------------------------------------------------------------------------
# Dinomaly / AnomalyCLIP / cflow-ad lineage: thresholded AUPRO with skimage per threshold
# ------------------------------------------------------------------------------------------------
def dinomaly_aupro(maps, masks, num_th: int = 200, expect_fpr: float = 0.3, numpy1_casting: bool = True):
    """Dinomaly ``utils.compute_pro`` restated (slow by nature: O(num_th x images) labelling calls).

    Thresholds ``np.arange(min, max, (max - min)/num_th)``; at each threshold the maps are binarised
    (``> th``), every GT mask is labelled again with ``skimage.measure.label`` and each region's overlap
    read through ``regionprops(...).coords``; PRO = mean overlap over all regions, FPR over all OK pixels.
    Points with FPR < 0.3 are kept, the FPR axis is divided by its largest kept value (not by 0.3, no
    (0, 0) anchor, no interpolation at 0.3), ``sklearn.metrics.auc``. The original stores rows in a
    pandas DataFrame with ``DataFrame.append`` and uses ``np.bool`` (both removed from current
    pandas/NumPy); plain lists here, same numbers.

    ``numpy1_casting``: the original needs NumPy < 1.24 (``np.bool``), where ``float32_map > th`` with
    a float64 scalar threshold compares in float32 (value-based casting); NumPy >= 2 compares in
    float64. True (default) reproduces the original environment by casting each threshold to the
    maps' dtype; False gives what the same code computes under NumPy >= 2 (differs only for pixels
    lying between a float64 threshold and its float32 rounding).
    """
    from skimage import measure
    from sklearn.metrics import auc

    amaps = _np(maps)
    masks = _np(masks).astype(np.uint8)
    binary_amaps = np.zeros_like(amaps, dtype=bool)
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    pros_curve, fprs_curve = [], []
    for th in np.arange(min_th, max_th, delta):
        if numpy1_casting:
            th = amaps.dtype.type(th)
        binary_amaps[amaps <= th] = 0
        binary_amaps[amaps > th] = 1
        pros = []
        for binary_amap, mask in zip(binary_amaps, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp_pixels = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pros.append(tp_pixels / region.area)
        inverse_masks = 1 - masks
        fp_pixels = np.logical_and(inverse_masks, binary_amaps).sum()
        fprs_curve.append(fp_pixels / inverse_masks.sum())
        pros_curve.append(statistics.mean(pros))
    fprs, pros = np.asarray(fprs_curve), np.asarray(pros_curve)
    keep = fprs < expect_fpr
    fprs, pros = fprs[keep], pros[keep]
    fprs = fprs / fprs.max()
    return {"aupro": float(auc(fprs, pros))}


def ader_f1max_px(maps, masks, eps: float = 1e-8, numpy1_casting: bool = True):
    """ADer ``mF1_max_px``: maps min-max normalised over the class, 21 thresholds 0, 0.05, ..., 1,
    F1 = 2PR/(P+R) of all pooled pixels with ``> threshold``, eps 1e-8; the max over thresholds.
    ``numpy1_casting``: compare in the maps' dtype as NumPy 1.x does (ADer's environment); see
    :func:`dinomaly_aupro`."""
    pr_px = _np(maps)
    gt = _np(masks).astype(bool)
    pr_norm = (pr_px - pr_px.min()) / (pr_px.max() - pr_px.min())
    scores = []
    for th in np.arange(0.0, 1.0 + 1e-3, 0.05):
        pr = pr_norm > (pr_norm.dtype.type(th) if numpy1_casting else th)
        inter = np.logical_and(gt, pr).sum()
        precision = inter / (pr.sum() + eps)
        recall = inter / (gt.sum() + eps)
        scores.append(2 * precision * recall / (precision + recall + eps))
    return {"p_f1max": float(np.max(scores))}


# ------------------------------------------------------------------------------------------------
# torchmetrics exact (thresholds=None)
# ------------------------------------------------------------------------------------------------
def torchmetrics_exact(maps, masks, batch_size: int = 16, rescale: bool = False, device=None):
    """torchmetrics ``BinaryAUROC`` and ``BinaryAveragePrecision`` with ``thresholds=None``.

    Updated ``batch_size`` maps at a time (as a validation loop does). Both metrics keep every pixel
    (list states), concatenate at ``compute`` and sort once each. Caveat (torchmetrics
    ``normalize_logits_if_needed``): a batch with any value outside [0, 1] goes through a sigmoid, per
    batch; unbounded anomaly scores then saturate to float32 ties near 1 and AUROC/AP drop -- this is
    what the raw rows show. ``rescale=True`` first min-max scales all maps to [0, 1] (float64, stored
    as float32), the usual workaround, which makes the results exact up to ties created by the scaling.
    ``device``: run the metrics there (batches are moved before ``update``).
    """
    import torch
    from torchmetrics.classification import BinaryAUROC, BinaryAveragePrecision

    maps_np, masks_np = _np(maps), _np(masks)
    if rescale:
        lo, hi = float(maps_np.min()), float(maps_np.max())
        maps_np = ((maps_np.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)
    auroc, ap = BinaryAUROC(thresholds=None), BinaryAveragePrecision(thresholds=None)
    if device is not None:
        auroc, ap = auroc.to(device), ap.to(device)
    for s in range(0, len(maps_np), batch_size):
        preds = torch.from_numpy(np.ascontiguousarray(maps_np[s:s + batch_size]))
        target = torch.from_numpy(masks_np[s:s + batch_size].astype(np.uint8))
        if device is not None:
            preds, target = preds.to(device), target.to(device)
        auroc.update(preds, target)
        ap.update(preds, target)
    return {"p_auroc": float(auroc.compute()), "p_ap": float(ap.compute())}


# ------------------------------------------------------------------------------------------------
# float64 reference for the exactness block
# ------------------------------------------------------------------------------------------------
def numpy_binary_metrics(labels, scores) -> dict:
    """AUROC, AP and F1-max by scikit-learn's algorithm, restated in numpy (float64).

    ``_binary_clf_curve``: stable descending sort, last index of each run of equal scores, cumulative
    TP and FP there; ROC with a (0, 0) start and trapezoid area; AP = sum over thresholds of
    (R_n - R_{n-1}) P_n; F1-max over the PR points (sklearn's appended (P=1, R=0) point excluded).
    Fallback reference where scikit-learn is not installed (e.g. the GPU machine).
    """
    y = _np(labels).ravel().astype(bool)
    s = _np(scores).ravel()
    order = np.argsort(s, kind="mergesort")[::-1]
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y_sorted.size - 1]
    tps = np.cumsum(y_sorted, dtype=np.int64)[last].astype(np.float64)
    fps = (last + 1) - tps
    P, N = tps[-1], fps[-1]
    tpr = np.r_[0.0, tps / P]
    fpr = np.r_[0.0, fps / N]
    auroc = float(np.trapezoid(tpr, fpr))
    precision = tps / (tps + fps)
    recall = tps / P
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    den = precision + recall
    f1 = np.divide(2 * precision * recall, den, out=np.zeros_like(den), where=den > 0)
    return {"auroc": auroc, "ap": ap, "f1max": float(f1.max())}


def reference_metrics(maps, masks, fpr_limit: float = 0.3, sklearn_pixel: dict | None = None):
    """The seven metrics from the references: sklearn (image and pixel AUROC/AP/F1-max, image score =
    max of the map) and the float64 MVTec AUPRO restatement. ``sklearn_pixel`` may pass pixel values
    already computed by the timed sklearn rows, to avoid recomputing three full sorts. Without
    scikit-learn, :func:`numpy_binary_metrics` (its algorithm restated) is used; ``"reference"`` in the
    result says which."""
    try:
        import sklearn  # noqa: F401

        have_sklearn = True
    except ImportError:
        have_sklearn = False
    if have_sklearn:
        out = sklearn_image(maps, masks)
        if sklearn_pixel is not None and all(k in sklearn_pixel for k in ("p_auroc", "p_ap", "p_f1max")):
            out.update({k: sklearn_pixel[k] for k in ("p_auroc", "p_ap", "p_f1max")})
        else:
            out.update(sklearn_p_auroc(maps, masks))
            out.update(sklearn_p_ap(maps, masks))
            out.update(sklearn_p_f1max(maps, masks))
        out["reference"] = "sklearn"
    else:
        scores, labels = image_scores_labels(maps, masks)
        im = numpy_binary_metrics(labels, scores)
        px = numpy_binary_metrics(masks, maps)
        out = {"i_auroc": im["auroc"], "i_ap": im["ap"], "i_f1max": im["f1max"],
               "p_auroc": px["auroc"], "p_ap": px["ap"], "p_f1max": px["f1max"],
               "reference": "sklearn algorithm restated in numpy (sklearn not installed)"}
    out.update(mvtec_aupro(maps, masks, fpr_limit))
    return out
