"""Binned protocol: the true error never exceeds the reported bound; state merges by summation."""
import math

import numpy as np
import pytest
import torch

from fastproto import _ext
from fastproto.metrics import Evaluator, compute_metrics
from fastproto.metrics.components import split_pixels
from fastproto.metrics.binned import LOW_BITS, PAGES, PREFIX_BITS, float_key, histogram_update
from fastproto.reference import metrics as ref
from tests._data import blob_masks, maps_for

PIXEL = ("p_auroc", "p_ap", "p_f1max", "aupro")


def exact_and_binned(maps, masks, bits):
    exact = compute_metrics(maps, masks)
    ev = Evaluator("binned", bins_bits=bits)
    for part in np.array_split(np.arange(len(maps)), 3):
        ev.update(maps[part], masks[part])
    return exact, ev.compute(with_bounds=True)["all"]


@pytest.mark.parametrize("bits", [12, 16, 20, 26])
@pytest.mark.parametrize("kind", ["smooth", "ties", "heavy", "constant"])
def test_error_within_bound(rng, bits, kind):
    masks = blob_masks(rng, 10, 32, 32)
    masks[0, 5, 5] = True
    masks[-1] = False
    maps = maps_for(rng, masks, kind)
    exact, binned = exact_and_binned(maps, masks, bits)
    for key in PIXEL:
        err = abs(binned[key] - exact[key])
        assert err <= binned[key + "_bound"], (key, err, binned[key + "_bound"])
    for key in ("i_auroc", "i_ap", "i_f1max"):  # image metrics stay exact
        assert binned[key] == exact[key] and binned[key + "_bound"] == 0


def test_bound_is_not_trivial(rng):
    """Coarse bins on tied data must report a positive bound; fine bins on continuous data a tiny one."""
    masks = blob_masks(rng, 10, 32, 32)
    masks[0, 5, 5] = True
    masks[-1] = False
    _, coarse = exact_and_binned(maps_for(rng, masks, "ties"), masks, 12)
    assert coarse["p_auroc_bound"] > 1e-4
    exact, fine = exact_and_binned(maps_for(rng, masks, "smooth"), masks, 20)
    assert fine["p_auroc_bound"] < 1e-3
    assert abs(fine["p_auroc"] - exact["p_auroc"]) < 1e-3


@pytest.mark.skipif(not _ext.has_op("histogram_update"), reason="extension not built")
def test_cpp_histogram_matches_torch(rng):
    masks = blob_masks(rng, 6, 40, 40)
    maps = maps_for(rng, masks, "heavy")
    maps[0, 0, :3] = [-0.0, 0.0, -1e-30]
    split = split_pixels(torch.from_numpy(maps), torch.from_numpy(masks))
    for max_bits in (0, 4, 10):
        # random layout: pages of random sizes in key order, a few at full resolution
        bits = torch.from_numpy(rng.integers(0, max_bits + 1, PAGES))
        bits[torch.from_numpy(rng.integers(0, PAGES, 3))] = LOW_BITS
        sizes = torch.ones(PAGES, dtype=torch.long) << bits
        base = torch.cumsum(sizes, 0) - sizes
        shift = LOW_BITS - bits
        n_bins = int(sizes.sum())
        hists = []
        for impl in ("auto", "reference"):
            h = (torch.full((n_bins,), 0, dtype=torch.long), torch.zeros(n_bins, dtype=torch.long),
                 torch.zeros(n_bins, dtype=torch.float64))
            histogram_update(*h, base, shift, split.neg, split.pos, split.pos_sizes, PREFIX_BITS, impl=impl)
            hists.append(h)
        assert torch.equal(hists[0][0], hists[1][0]) and torch.equal(hists[0][1], hists[1][1])
        torch.testing.assert_close(hists[0][2], hists[1][2], rtol=1e-12, atol=0)
        assert int(hists[0][0].sum()) == split.neg.numel()


def split_evaluators(protocol, maps, masks, cats, at, **kw):
    left, right = Evaluator(protocol, **kw), Evaluator(protocol, **kw)
    left.update(maps[:at], masks[:at], categories=cats[:at])
    right.update(maps[at:], masks[at:], categories=cats[at:])
    return left, right


def test_exact_merge_equals_single_pass(rng):
    masks = blob_masks(rng, 12, 24, 24)
    masks[0, 1, 1] = True
    maps = maps_for(rng, masks)
    cats = ["a" if i % 3 else "b" for i in range(12)]
    whole = Evaluator()
    whole.update(maps, masks, categories=cats)
    left, right = split_evaluators("exact", maps, masks, cats, 5)
    merged, expected = left.merge(right).compute(), whole.compute()
    for cat in expected:
        for key, value in expected[cat].items():
            assert merged[cat][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (cat, key)


@pytest.mark.parametrize("max_bins", [0, 3000, 1 << 20])
def test_binned_merge_keeps_counts_and_bounds(rng, max_bins):
    """Halves laid out differently (resolution chosen per first batch) merge into one valid state."""
    masks = blob_masks(rng, 12, 24, 24)
    masks[0, 1, 1] = True
    masks[-1] = False
    maps = maps_for(rng, masks, "heavy")
    maps[6:] *= 1e3  # the second half touches pages the first never saw
    cats = ["a"] * 12
    exact = compute_metrics(maps, masks)
    left, right = split_evaluators("binned", maps, masks, cats, 6, bins_bits=24, max_bins=max_bins)
    merged = left.merge(right)
    hist = merged._categories["a"].hist
    assert int(hist.neg.sum()) == int((~masks).sum()) and int(hist.pos.sum()) == int(masks.sum())
    assert hist.n_bins - PAGES <= max_bins
    out = merged.compute(with_bounds=True)["a"]
    for key in PIXEL:
        assert abs(out[key] - exact[key]) <= out[key + "_bound"], key


def test_binned_state_is_fixed_size():
    ev = Evaluator("binned", bins_bits=20, max_bins=1000)
    sizes = []
    rng = np.random.default_rng(0)
    for i in range(4):  # scores spread over ever more octaves: the page budget caps the state
        maps = np.exp(rng.uniform(-20 * (i + 1), 20 * (i + 1), (4, 32, 32))).astype(np.float32)
        ev.update(maps, rng.random((4, 32, 32)) < 0.1)
        cat = ev._categories["all"]
        sizes.append(cat.hist.nbytes)
    assert max(sizes) <= (PAGES + 1000) * 24 and cat.hist.n_bins > PAGES + 250
    assert not cat.neg and not cat.pos  # no pixel kept


def test_float_key_is_monotone():
    x = torch.tensor([-math.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, math.inf])
    k = float_key(x)
    assert torch.all(k[1:] >= k[:-1]) and k[4] == k[5]
    assert int(k.min()) >= 0 and int(k.max()) <= 0xFFFFFFFF


def test_reference_metrics_agree_with_binned_at_fine_bins(rng):
    masks = blob_masks(rng, 8, 32, 32)
    masks[0, 3, 3] = True
    masks[-1] = False
    maps = maps_for(rng, masks, "smooth")
    _, binned = exact_and_binned(maps, masks, 24)
    assert binned["aupro"] == pytest.approx(ref.aupro(maps, masks), abs=binned["aupro_bound"] + 1e-12)
