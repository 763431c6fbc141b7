"""Exact engine vs independent references: sklearn, the float64 MVTec-official re-statement, and a
brute-force pairwise AUROC; C++ and pure-torch paths compared."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from fastproto import _ext
from fastproto.metrics import aupro, compute_metrics
from fastproto.metrics.components import split_pixels
from fastproto.metrics.curves import exact_metrics
from fastproto.reference import metrics as ref
from tests._data import blob_masks, maps_for

TOL = 1e-9  # the engine accumulates in float64; the must-reach is 1e-6
IMPLS = ["reference"] + (["auto"] if _ext.has_op("count_negatives") else [])


def sk_f1max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    p, r = p[:-1], r[:-1]
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)
    return f1.max()


def engine(maps, masks, impl, fpr_limit=0.3):
    split = split_pixels(torch.from_numpy(maps), torch.from_numpy(masks), 8,
                         impl="reference" if impl == "reference" else "auto")
    # several chunks: the state of a streaming evaluator
    chunks = list(torch.tensor_split(split.neg, 3))
    return exact_metrics(chunks, split.pos, split.pos_sizes, split.n_regions, fpr_limit, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["smooth", "ties", "heavy", "signed_zero"])
def test_pixel_metrics_match_sklearn_and_mvtec(rng, impl, kind):
    masks = blob_masks(rng, 12, int(rng.integers(8, 48)), int(rng.integers(8, 48)))
    masks[0, 0, 0] = True  # at least one anomalous pixel
    masks[-1] = False  # at least one normal image
    maps = maps_for(rng, masks, kind)
    out = engine(maps, masks, impl)
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["ap"] == pytest.approx(average_precision_score(y, s), abs=TOL)
    assert out["f1max"] == pytest.approx(sk_f1max(y, s), abs=TOL)
    assert out["aupro"] == pytest.approx(ref.aupro(maps, masks), abs=TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_maps(impl):
    masks = np.zeros((3, 10, 10), bool)
    masks[1, 2:5, 2:5] = True
    maps = np.full(masks.shape, 0.25, np.float32)
    out = engine(maps, masks, impl)
    assert out["auroc"] == pytest.approx(0.5, abs=TOL)
    assert out["ap"] == pytest.approx(masks.mean(), abs=TOL)
    # one tie group: PRO rises linearly with FPR from (0,0) to (1,1): area to 0.3 is 0.045, /0.3 = 0.15
    assert out["aupro"] == pytest.approx(0.15, abs=TOL)


def test_pairwise_auroc_bruteforce(rng):
    s = rng.integers(0, 5, 300).astype(np.float32)
    y = rng.random(300) < 0.3
    pos, neg = s[y][:, None], s[~y][None, :]
    expected = np.mean((pos > neg) + 0.5 * (pos == neg))
    out = exact_metrics([torch.from_numpy(s[~y])], torch.from_numpy(s[y]))
    assert out["auroc"] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
def test_aupro_limits(rng, limit):
    masks = blob_masks(rng, 10, 32, 32, frac_anomalous=0.8)
    masks[0, 3, 3] = True
    masks[-1] = False
    maps = maps_for(rng, masks, "smooth")
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(ref.aupro(maps, masks, limit), abs=TOL)


def test_compute_metrics_image_level_matches_sklearn(rng):
    masks = blob_masks(rng, 30, 24, 24)
    masks[0, 1, 1] = True
    masks[-1] = False
    maps = maps_for(rng, masks, "ties")
    out = compute_metrics(maps, masks)
    scores = maps.reshape(30, -1).max(1).astype(np.float64)
    labels = masks.reshape(30, -1).any(1)
    assert out["i_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOL)
    assert out["i_ap"] == pytest.approx(average_precision_score(labels, scores), abs=TOL)
    assert out["i_f1max"] == pytest.approx(sk_f1max(labels, scores), abs=TOL)
    expected = ref.all_metrics(maps, masks, scores, labels)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=TOL), key


def test_image_scores_and_labels_given(rng):
    masks = blob_masks(rng, 16, 20, 20)
    masks[0, 0, 0] = True
    masks[-1] = False
    maps = maps_for(rng, masks)
    scores = rng.random(16)
    labels = masks.reshape(16, -1).any(1).astype(np.uint8)
    out = compute_metrics(torch.from_numpy(maps), torch.from_numpy(masks), image_scores=torch.from_numpy(scores),
                          image_labels=labels)
    assert out["i_auroc"] == pytest.approx(roc_auc_score(labels, scores.astype(np.float32)), abs=TOL)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_property_invariances(data):
    """Exact metrics depend only on the ranking: invariant to scaling by 2**k and to image order."""
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 6, 12, 12, frac_anomalous=0.9)
    masks[0, 0, 0] = True
    masks[-1] = False
    maps = maps_for(rng, masks, data.draw(st.sampled_from(["smooth", "ties", "heavy"])))
    base = compute_metrics(maps, masks)
    k = data.draw(st.integers(-20, 20))
    scaled = compute_metrics(maps * np.float32(2.0**k), masks)
    perm = rng.permutation(len(maps))
    shuffled = compute_metrics(maps[perm], masks[perm])
    for key in base:
        assert scaled[key] == pytest.approx(base[key], abs=1e-12), (key, seed)
        assert shuffled[key] == pytest.approx(base[key], abs=1e-12), (key, seed)
    assert all(0 <= v <= 1 for v in base.values() if not math.isnan(v))


def _bruteforce_aupro(maps, masks, limit):
    """AUPRO by its definition, threshold by threshold (no cumulative sums, no shared helpers)."""
    import scipy.ndimage as nd

    regions = []  # (image index, region mask)
    for b, m in enumerate(masks):
        lab, n = nd.label(m, structure=np.ones((3, 3)))
        regions += [(b, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        xs.append((above & normal).sum() / normal.sum())
        ys.append(float(np.mean([(above[b] & region).sum() / region.sum() for b, region in regions])))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
    return area / limit


@pytest.mark.parametrize("limit", [0.05, 0.3])
def test_reference_aupro_against_definition(rng, limit):
    """The float64 reference (and the engine) against AUPRO computed threshold by threshold."""
    masks = blob_masks(rng, 5, 14, 14, frac_anomalous=0.8)
    masks[0, 2, 2] = True
    masks[-1] = False
    maps = maps_for(rng, masks, "ties").astype(np.float64)
    expected = _bruteforce_aupro(maps, masks, limit)
    assert ref.aupro(maps, masks, limit) == pytest.approx(expected, abs=1e-12)
    assert aupro(maps.astype(np.float32), masks, fpr_limit=limit) == pytest.approx(expected, abs=1e-9)
