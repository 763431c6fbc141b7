"""Legacy protocols (fastproto.metrics.legacy) against plain loop-based restatements of the published codes.

The restatements below follow the published algorithms step by step (loops over thresholds, images and
regions; skimage labelling at every threshold for Dinomaly; per-image, per-weight histograms for ADEval;
one pass per threshold for ADer's pixel F1) on small random data, fresh seeds every run (the seed is in
every assertion message). Two conventions of the official environments are emulated explicitly:
- NumPy 1.x value-based casting: a float32 map compared with a float64 threshold compares in float32;
- ADer / INP-Former run ADEval's EvalAccumulatorCuda, so bins follow CUDA ``torch.histc`` arithmetic
  (float32 for float32 maps) and values equal to the maximum also land in the ``>= max`` overflow bin.
"""
from __future__ import annotations

import os
import statistics

import numpy as np
import pytest
import scipy.ndimage as nd
from skimage import measure
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score

from fastproto.metrics.legacy import LEGACY_PROTOCOLS, legacy_category_metrics
from fastproto.reference import metrics as exact_ref

TOL = 1e-9
KINDS = ("smooth", "ties", "heavy", "power", "plateau")


def _seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


# ---------------------------------------------------------------------------------------- data


def _masks(rng, b, h, w):
    masks = np.zeros((b, h, w), bool)
    yy, xx = np.mgrid[:h, :w]
    for i in range(b):
        if rng.random() < 0.35:
            continue  # normal image
        for _ in range(rng.integers(1, 4)):
            kind = rng.integers(0, 4)
            if kind == 0:  # one-pixel region
                masks[i, rng.integers(0, h), rng.integers(0, w)] = True
            elif kind == 1:  # diagonal line: one region under 8-connectivity
                n = int(rng.integers(2, min(h, w) // 2))
                y0, x0 = rng.integers(0, h - n), rng.integers(0, w - n)
                masks[i, y0 + np.arange(n), x0 + np.arange(n)] = True
            else:  # ellipse, possibly cut by the border
                cy, cx = rng.integers(-2, h + 2), rng.integers(-2, w + 2)
                ry, rx = rng.uniform(1, h / 3), rng.uniform(1, w / 3)
                masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    masks[0] = False  # at least one normal image
    if not masks.any():
        masks[-1, h // 2, w // 2] = True
    return masks


def make_case(rng, kind, b=6, h=20, w=20):
    masks = _masks(rng, b, h, w)
    noise = nd.gaussian_filter(rng.standard_normal((b, h, w)), (0, 1.2, 1.2))
    signal = nd.gaussian_filter(masks.astype(float), (0, 1, 1))
    base = noise / noise.std() + rng.uniform(0.5, 2.0) * signal
    if kind == "smooth":
        maps = base
    elif kind == "ties":  # few distinct levels: ties inside and across classes, levels near thresholds
        maps = np.round(base * 4) / 4
    elif kind == "heavy":  # heavy right tail over orders of magnitude
        maps = np.exp(3.0 * base)
    elif kind == "power":
        maps = (base - base.min()) ** 8
    elif kind == "plateau":  # constant patches (ties spanning normal and anomalous pixels)
        maps = base.copy()
        for i in range(b):
            y0, x0 = rng.integers(0, h - 5), rng.integers(0, w - 5)
            maps[i, y0:y0 + 6, x0:x0 + 6] = rng.choice([base.min(), base.max(), 0.3])
    else:
        raise ValueError(kind)
    maps = maps.astype(np.float32)
    flat = maps.reshape(b, -1)
    scores = np.sort(flat, axis=1)[:, -4:].mean(axis=1)  # top-k mean image score
    if kind == "ties":
        scores = np.round(scores * 2) / 2
    labels = masks.reshape(b, -1).any(axis=1)
    return maps, masks, scores.astype(np.float64), labels


# ------------------------------------------------------------- loop-based restatements of the codes


def ref_dinomaly_compute_pro(masks, amaps, num_th=200, fpr_limit=0.3):
    """Dinomaly utils.compute_pro: linear levels, skimage regions per level per image, FPR < limit, /max."""
    min_th, max_th = amaps.min(), amaps.max()
    delta = (max_th - min_th) / num_th
    rows = []
    for th in np.arange(min_th, max_th, delta):
        th_cmp = amaps.dtype.type(th)  # NumPy 1.x: float32 array vs float64 scalar compares in float32
        binary = np.zeros_like(amaps, dtype=bool)
        binary[amaps <= th_cmp] = False
        binary[amaps > th_cmp] = True
        pros = []
        for binary_amap, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask)):
                tp = binary_amap[region.coords[:, 0], region.coords[:, 1]].sum()
                pros.append(tp / region.area)
        inverse = ~masks
        fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
        rows.append((statistics.mean(pros), fpr))
    pro = np.array([r[0] for r in rows])
    fpr = np.array([r[1] for r in rows])
    keep = fpr < fpr_limit
    pro, fpr = pro[keep], fpr[keep]
    with np.errstate(invalid="ignore"):  # all kept FPRs 0: NaN, as pandas gives
        fpr = fpr / fpr.max()
    return auc(fpr, pro)


def ref_f1_score_max(y_true, y_score):
    """Dinomaly / INP-Former f1_score_max."""
    precs, recs, _ = precision_recall_curve(y_true, y_score)
    f1s = 2 * precs * recs / (precs + recs + 1e-7)
    return f1s[:-1].max()


def ref_ader_image_f1(y_true, y_score):
    """ADer mF1_max_sp_max: max of the finite 2PR/(P+R)."""
    precs, recs, _ = precision_recall_curve(y_true, y_score)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1s = (2 * precs * recs) / (precs + recs)
    return np.max(f1s[np.isfinite(f1s)])


def ref_ader_pixel_f1(gt_px, pr_px, step=0.05):
    """ADer mF1_max_px: min-max normalised maps, thresholds 0, 0.05, ..., 1.0, pooled F1, max."""
    eps, beta = 1e-8, 1.0
    norm = (pr_px - pr_px.min()) / (pr_px.max() - pr_px.min())
    scores = []
    for score in np.arange(0.0, 1.0 + 1e-3, step):
        pr = norm > norm.dtype.type(score)  # NumPy 1.x comparison in the map dtype
        inter = np.logical_and(gt_px, pr).sum()
        pred = pr.sum()
        label = gt_px.sum()
        precision = inter / (pred + eps)
        recall = inter / (label + eps)
        scores.append((1 + beta ** 2) * precision * recall / (beta ** 2 * precision + recall + eps))
    return np.array(scores).max()


def ref_histc_cuda(values, bins, lo, hi):
    """CUDA torch.histc, one value at a time, arithmetic in the value dtype, plus ADEval's overflow bins."""
    t = values.dtype.type
    lo, hi = t(lo), t(hi)
    stat = np.zeros(bins + 2)
    for v in values:
        if lo <= v <= hi:
            b = int(t(t(t(v - lo) * t(bins)) / t(hi - lo)))
            if b == bins:
                b -= 1
            stat[1 + b] += 1
    stat[0] = np.count_nonzero(values < lo)
    stat[-1] = np.count_nonzero(values >= hi)
    return stat


def ref_pro_weight(gt):
    """ADEval _pro_weight: 8-connected components (cv2 in the original), float32 weight 1/area."""
    comp, n = nd.label(gt, structure=np.ones((3, 3)))
    weighted = np.zeros(gt.shape, np.float32)
    for lab in range(1, n + 1):
        weighted[comp == lab] = 1.0 / np.count_nonzero(comp == lab)
    return weighted


def ref_trapezoid_intep(interp, area, y1, y2):
    assert area >= 0 and interp >= 0 and 0 <= y1 <= y2
    with np.errstate(invalid="ignore"):  # y1 = y2 = 0 gives NaN, as in ADEval
        rect_ratio = np.float64(y1) / (y1 + 0.5 * (y2 - y1))
    return area * rect_ratio * interp + area * (1 - rect_ratio) * interp * interp


def ref_adeval(pr_px, gt_px, nstrips, limit=0.3):
    """EvalAccumulatorCuda(min, max of the maps, nstrips): add_anomap per image, then summary()."""
    lo, hi = pr_px.min(), pr_px.max()
    pos_stat, neg_stat = np.zeros(nstrips + 2), np.zeros(nstrips + 2)
    wpos_stat, wneg_stat = np.zeros(nstrips + 2), np.zeros(nstrips + 2)
    for pred, gt in zip(pr_px, gt_px):
        gtw = ref_pro_weight(gt)
        weight = np.ones(gt.shape, np.float32)
        label = gtw != 0
        weight[label] = gtw[label]
        preds, lab, w = pred.ravel(), label.ravel(), weight.ravel()
        pp, pn, wp, wn = preds[lab], preds[~lab], w[lab], w[~lab]
        for wt in np.unique(w):
            hp = ref_histc_cuda(pp[wp == wt], nstrips, lo, hi)
            hn = ref_histc_cuda(pn[wn == wt], nstrips, lo, hi)
            pos_stat += hp
            neg_stat += hn
            wpos_stat += hp * float(wt)
            wneg_stat += hn * float(wt)

    def curve(pos, neg):
        cp, cn = np.cumsum(pos), np.cumsum(neg)
        fn, p = cp[:-1], cp[-1]
        tn, n = cn[:-1], cn[-1]
        tp, fp = p - fn, n - tn
        return tp, fp, tn, fn

    tp, fp, tn, fn = curve(pos_stat, neg_stat)
    tpr, fpr = tp / (tp + fn), fp / (fp + tn)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / (tp + fp)
    precision[~(tp + fp > 0)] = 1.0
    p_auroc = np.trapezoid(tpr[::-1], fpr[::-1])
    p_aupr = np.trapezoid(precision[::-1], tpr[::-1])
    tp, fp, tn, fn = curve(wpos_stat, wneg_stat)
    pro, fpr = tp / (tp + fn), fp / (fp + tn)
    mask = fpr <= limit
    lo_pro, lo_fpr = pro[mask][::-1], fpr[mask][::-1]
    hi_pro, hi_fpr = pro[~mask][::-1], fpr[~mask][::-1]
    lo_a = float(np.trapezoid(lo_pro, lo_fpr))
    hi_a = float(np.trapezoid(hi_pro, hi_fpr))
    tot = float(np.trapezoid(pro[::-1], fpr[::-1]))
    try:
        aupro = (lo_a + ref_trapezoid_intep((limit - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1]), tot - (lo_a + hi_a),
                                            lo_pro[-1], hi_pro[0])) / limit
    except AssertionError:  # ADEval fails here (PRO = 0 on both sides of the limit); the package gives NaN
        aupro = float("nan")
    return p_auroc, p_aupr, aupro


def ref_legacy(protocol, maps, masks, scores, labels, *, num_thresholds=None, nstrips=None, fpr_limit=0.3):
    out = {"i_auroc": roc_auc_score(labels, scores), "i_ap": average_precision_score(labels, scores)}
    gt, pr = masks.ravel(), maps.ravel()
    if protocol == "dinomaly":
        out["i_f1max"] = ref_f1_score_max(labels, scores)
        out.update(p_auroc=roc_auc_score(gt, pr), p_ap=average_precision_score(gt, pr), p_f1max=ref_f1_score_max(gt, pr))
        out["aupro"] = ref_dinomaly_compute_pro(masks, maps, num_thresholds or 200, fpr_limit)
    elif protocol == "ader":
        out["i_f1max"] = ref_ader_image_f1(labels, scores)
        out["p_auroc"], out["p_ap"], out["aupro"] = ref_adeval(maps, masks, nstrips or 50, fpr_limit)
        step = 0.05 if num_thresholds is None else 1.0 / (num_thresholds - 1)
        out["p_f1max"] = ref_ader_pixel_f1(masks, maps, step)
    else:
        out["i_f1max"] = ref_f1_score_max(labels, scores)
        out["p_auroc"], out["p_ap"], out["aupro"] = ref_adeval(maps, masks, nstrips or 200, fpr_limit)
        out["p_f1max"] = ref_f1_score_max(gt, pr)
    return out


def _assert_close(got, want, seed, ctx, tol=TOL):
    for k, v in want.items():
        if np.isnan(v) and np.isnan(got[k]):
            continue
        assert abs(got[k] - v) <= tol, f"{ctx} {k}: got {got[k]!r}, reference {v!r} (seed={seed})"


# ----------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("protocol", LEGACY_PROTOCOLS)
def test_matches_loop_restatement(protocol, kind):
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), kind)
    got = legacy_category_metrics(protocol, maps, masks, scores, labels)
    assert set(got) == {"i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro"}
    _assert_close(got, ref_legacy(protocol, maps, masks, scores, labels), seed, f"{protocol}/{kind}")


@pytest.mark.parametrize("protocol,opts", [("dinomaly", dict(num_thresholds=37)),
                                           ("ader", dict(nstrips=7, num_thresholds=11)),
                                           ("adeval", dict(nstrips=13)),
                                           ("adeval", dict(fpr_limit=0.05)),
                                           ("dinomaly", dict(fpr_limit=0.1))])
def test_overrides(protocol, opts):
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), "smooth", b=5, h=16, w=16)
    got = legacy_category_metrics(protocol, maps, masks, scores, labels, **opts)
    _assert_close(got, ref_legacy(protocol, maps, masks, scores, labels, **opts), seed, f"{protocol}/{opts}")


def test_float64_maps():
    """float64 maps keep float64 arithmetic (ADer models that build float64 maps)."""
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), "heavy", b=5, h=16, w=16)
    maps = maps.astype(np.float64) * (1 + 1e-12 * np.random.default_rng(seed).random(maps.shape))
    for protocol in LEGACY_PROTOCOLS:
        got = legacy_category_metrics(protocol, maps, masks, scores, labels)
        _assert_close(got, ref_legacy(protocol, maps, masks, scores, labels), seed, f"{protocol}/float64")


@pytest.mark.parametrize("kind", ("smooth", "ties", "plateau"))
def test_exact_parts_match_sklearn(kind):
    """Larger data: the exact (sort-based) parts equal sklearn."""
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), kind, b=24, h=48, w=48)
    got = legacy_category_metrics("dinomaly", maps, masks, scores, labels)
    gt, pr = masks.ravel(), maps.ravel()
    want = {"i_auroc": roc_auc_score(labels, scores), "i_ap": average_precision_score(labels, scores),
            "i_f1max": ref_f1_score_max(labels, scores), "p_auroc": roc_auc_score(gt, pr),
            "p_ap": average_precision_score(gt, pr), "p_f1max": ref_f1_score_max(gt, pr)}
    _assert_close(got, want, seed, f"dinomaly-exact/{kind}")
    got = legacy_category_metrics("ader", maps, masks, scores, labels)
    _assert_close(got, {"i_f1max": ref_ader_image_f1(labels, scores)}, seed, f"ader-image-f1/{kind}")
    got = legacy_category_metrics("adeval", maps, masks, scores, labels)
    _assert_close(got, {k: want[k] for k in ("i_auroc", "i_ap", "i_f1max", "p_f1max")}, seed, f"adeval/{kind}")


def test_signed_zero_and_ties():
    seed = _seed()
    rng = np.random.default_rng(seed)
    masks = _masks(rng, 6, 16, 16)
    maps = np.where(rng.random(masks.shape) < 0.5, -0.0, 0.0) + masks * (rng.random(masks.shape) < 0.6)
    maps = maps.astype(np.float32)
    scores = maps.reshape(6, -1).max(1).astype(np.float64)
    labels = masks.reshape(6, -1).any(1)
    got = legacy_category_metrics("dinomaly", maps, masks, scores, labels)
    gt, pr = masks.ravel(), maps.ravel()
    _assert_close(got, {"p_auroc": roc_auc_score(gt, pr), "p_ap": average_precision_score(gt, pr),
                        "p_f1max": ref_f1_score_max(gt, pr)}, seed, "signed-zero")


def test_legacy_aupro_is_biased_on_heavy_tails():
    """The legacy AUPROs are not the exact one. A monotone transform (exp(k * s), a heavy right tail) leaves
    every exact metric unchanged but moves the legacy values, which are then off the exact AUPRO (Dinomaly's
    200 linear levels by several points). Fails if the legacy code is replaced by the exact algorithm."""
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), "smooth", b=24, h=48, w=48)
    exact = exact_ref.aupro(maps, masks)
    light = {p: legacy_category_metrics(p, maps, masks, scores, labels) for p in LEGACY_PROTOCOLS}
    off = dict.fromkeys(LEGACY_PROTOCOLS, 0.0)
    moved = dict.fromkeys(LEGACY_PROTOCOLS, 0.0)
    auroc_moved = 0.0
    for k in (2.0, 3.0):
        heavy = np.exp(k * maps.astype(np.float64)).astype(np.float32)
        assert abs(exact_ref.aupro(heavy, masks) - exact) < 1e-6, f"seed={seed}"
        for p in LEGACY_PROTOCOLS:
            tail = legacy_category_metrics(p, heavy, masks, scores, labels)
            # NaN (too few levels below the FPR limit) never happens to the exact algorithm
            off[p] = max(off[p], 1.0 if np.isnan(tail["aupro"]) else abs(tail["aupro"] - exact))
            moved[p] = max(moved[p], 1.0 if np.isnan(tail["aupro"]) else abs(tail["aupro"] - light[p]["aupro"]))
            if p == "dinomaly":  # the exact pixel AUROC is transform-invariant (up to float32 rounding) ...
                assert abs(tail["p_auroc"] - light[p]["p_auroc"]) < 1e-6, f"seed={seed}"
            if p == "ader":  # ... ADEval's binned one is not
                auroc_moved = max(auroc_moved, abs(tail["p_auroc"] - light[p]["p_auroc"]))
    assert off["dinomaly"] > 0.05, f"dinomaly legacy AUPRO too close to exact {exact}: {off} (seed={seed})"
    for p in LEGACY_PROTOCOLS:
        assert off[p] > 1e-4, f"{p} legacy AUPRO equals the exact {exact}: {off} (seed={seed})"
        assert moved[p] > 1e-4, f"{p} legacy AUPRO invariant to a monotone transform: {moved} (seed={seed})"
    assert auroc_moved > 1e-4, f"ADEval P-AUROC invariant to a monotone transform (seed={seed})"


def test_dinomaly_rescaling_not_interpolation():
    """Dinomaly keeps FPR < 0.3, divides by the largest kept FPR and has no (0, 0) point: hand-checked toy.

    18 normal pixels (0..9 and eight zeros), one 2-pixel region scored (7.5, 10). Kept levels have FPR
    (9 - k)/18 for k = 4..9, rescaled to 1, 0.8, ..., 0; PRO is 1 below 7.5 and 0.5 above: area 0.8.
    The exact (MVTec) AUPRO is (0.5 * 2/18 + (0.3 - 2/18)) / 0.3 = 0.8148...
    """
    maps = np.zeros((2, 1, 10), np.float32)
    maps[0, 0] = np.arange(10)
    maps[1, 0, :2] = (7.5, 10.0)
    masks = np.zeros(maps.shape, bool)
    masks[1, 0, :2] = True
    got = legacy_category_metrics("dinomaly", maps, masks, np.array([9.0, 10.0]), np.array([False, True]))
    assert abs(got["aupro"] - 0.8) < TOL, got
    assert abs(ref_dinomaly_compute_pro(masks, maps) - 0.8) < TOL
    assert abs(exact_ref.aupro(maps, masks) - (0.5 * 2 / 18 + (0.3 - 2 / 18)) / 0.3) < 1e-6


def test_degenerate_inputs_give_nan():
    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), "smooth", b=4, h=12, w=12)
    empty = np.zeros_like(masks)
    for p in LEGACY_PROTOCOLS:
        out = legacy_category_metrics(p, maps, empty, scores, np.zeros(4, bool))
        assert all(np.isnan(out[k]) for k in out), (p, out)
    const = np.full_like(maps, 0.25)
    out = legacy_category_metrics("dinomaly", const, masks, scores, labels)
    assert np.isnan(out["aupro"]) and out["p_auroc"] == 0.5, out
    for p in ("ader", "adeval"):
        out = legacy_category_metrics(p, const, masks, scores, labels)
        assert all(np.isnan(out[k]) for k in ("p_auroc", "p_ap", "aupro")), (p, out)
        assert not np.isnan(out["i_auroc"])


def test_bad_inputs_raise():
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[1, 2:4, 2:4] = True
    s, lab = np.array([0.1, 0.9]), np.array([False, True])
    with pytest.raises(ValueError, match="protocol"):
        legacy_category_metrics("mvtec", maps, masks, s, lab)
    with pytest.raises(ValueError, match="shape"):
        legacy_category_metrics("ader", maps, masks[:, :4], s, lab)
    with pytest.raises(ValueError, match="NaN"):
        legacy_category_metrics("ader", np.where(masks, np.nan, maps), masks, s, lab)
    with pytest.raises(ValueError, match="binary"):
        legacy_category_metrics("ader", maps, masks * 3, s, lab)
    with pytest.raises(ValueError, match="num_thresholds"):
        legacy_category_metrics("adeval", maps, masks, s, lab, num_thresholds=10)
    with pytest.raises(ValueError, match="nstrips"):
        legacy_category_metrics("dinomaly", maps, masks, s, lab, nstrips=10)
    with pytest.raises(ValueError, match="one entry per image"):
        legacy_category_metrics("dinomaly", maps, masks, s[:1], lab)


@pytest.mark.gpu
def test_histc_binning_matches_cuda_torch_histc():
    """The float32 bin formula equals CUDA torch.histc (and ADEval's overflow bins) bit for bit."""
    import torch

    from fastproto.metrics.legacy import _histc_bins

    seed = _seed()
    rng = np.random.default_rng(seed)
    for transform in (lambda x: x, np.exp, lambda x: x ** 9):
        v = transform(rng.standard_normal(1 << 20) * 3).astype(np.float32)
        v[:1000] = np.round(v[:1000] * 4) / 4  # ties and edge values
        lo, hi = v.min(), v.max()
        for nbins in (50, 200, 1000):
            t = torch.from_numpy(v).cuda()
            stat = t.new_zeros(nbins + 2, dtype=torch.float64)
            torch.histc(t, bins=nbins, min=float(lo), max=float(hi), out=stat[1:-1])
            stat[0] = t.less(float(lo)).count_nonzero()
            stat[-1] = t.greater_equal(float(hi)).count_nonzero()
            ours = np.bincount(_histc_bins(v, nbins, lo, hi) + 1, minlength=nbins + 2).astype(np.float64)
            ours[-1] += np.count_nonzero(v >= hi)
            np.testing.assert_array_equal(ours, stat.cpu().numpy(), err_msg=f"nbins={nbins} seed={seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ("smooth", "heavy", "ties"))
def test_adeval_pipeline_matches_cuda_accumulator(kind):
    """ADEval's CUDA accumulation restated with torch CUDA ops (histc per image and per PRO weight, float64
    CUDA statistics and cumsum) gives the same P-AUROC / P-AP / AUPRO as the vectorised NumPy version."""
    import torch

    seed = _seed()
    maps, masks, scores, labels = make_case(np.random.default_rng(seed), kind, b=32, h=64, w=64)
    for nstrips, protocol in ((50, "ader"), (200, "adeval")):
        lo, hi = float(maps.min()), float(maps.max())
        stats = [torch.zeros(nstrips + 2, dtype=torch.float64, device="cuda") for _ in range(3)]

        def hist(x):
            s = x.new_zeros(nstrips + 2, dtype=torch.float64)
            torch.histc(x, bins=nstrips, min=lo, max=hi, out=s[1:-1])
            s[0] = x.less(lo).count_nonzero()
            s[-1] = x.greater_equal(hi).count_nonzero()
            return s

        for pred, gt in zip(torch.from_numpy(maps).cuda(), masks):
            w = torch.from_numpy(ref_pro_weight(gt)).cuda()
            lab = w != 0
            weight = torch.where(lab, w, torch.ones_like(w))
            pp, pw = pred[lab], weight[lab]
            stats[1].add_(hist(pred[~lab]))
            for wt in torch.unique(pw):
                h = hist(pp[pw == wt])
                stats[0].add_(h)
                stats[2].add_(h, alpha=float(wt))

        def curve(pos, neg):
            cp, cn = torch.cumsum(pos, 0), torch.cumsum(neg, 0)
            fn, tn = cp[:-1].cpu().numpy(), cn[:-1].cpu().numpy()
            tp, fp = float(cp[-1]) - fn, float(cn[-1]) - tn
            return tp, fp, tn, fn

        tp, fp, tn, fn = curve(stats[0], stats[1])
        tpr, fpr = tp / (tp + fn), fp / (fp + tn)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = tp / (tp + fp)
        precision[~(tp + fp > 0)] = 1.0
        tp, fp, tn, fn = curve(stats[2], stats[1])
        pro = tp / (tp + fn)
        mask = fpr <= 0.3
        lo_pro, lo_fpr, hi_pro, hi_fpr = pro[mask][::-1], fpr[mask][::-1], pro[~mask][::-1], fpr[~mask][::-1]
        lo_a, hi_a = np.trapezoid(lo_pro, lo_fpr), np.trapezoid(hi_pro, hi_fpr)
        tot = np.trapezoid(pro[::-1], fpr[::-1])
        aupro = (lo_a + ref_trapezoid_intep((0.3 - lo_fpr[-1]) / (hi_fpr[0] - lo_fpr[-1]), tot - (lo_a + hi_a),
                                            lo_pro[-1], hi_pro[0])) / 0.3
        want = {"p_auroc": np.trapezoid(tpr[::-1], fpr[::-1]), "p_ap": np.trapezoid(precision[::-1], tpr[::-1]),
                "aupro": aupro}
        got = legacy_category_metrics(protocol, maps, masks, scores, labels)
        _assert_close(got, want, seed, f"{protocol}/{kind}/cuda")
