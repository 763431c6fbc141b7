"""Binned protocol: the true error never exceeds the reported bound; state merges by summation."""
import math

import numpy as np
import pytest
import torch

from fastproto import _ext
from fastproto.metrics import Evaluator, compute_metrics
from fastproto.metrics.components import split_pixels
from fastproto.metrics.curves import histogram_update
from fastproto.reference import metrics as ref
from tests._data import blob_masks, maps_for

PIXEL = ("p_auroc", "p_ap", "p_f1max", "aupro")


def exact_and_binned(maps, masks, bits):
    exact = compute_metrics(maps, masks)
    ev = Evaluator("binned", bins_bits=bits)
    for part in np.array_split(np.arange(len(maps)), 3):
        ev.update(maps[part], masks[part])
    return exact, ev.compute(with_bounds=True)["all"]


@pytest.mark.parametrize("bits", [8, 12, 16, 20])
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
    _, coarse = exact_and_binned(maps_for(rng, masks, "ties"), masks, 8)
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
    for bits in (8, 16, 22):
        hists = []
        for impl in ("auto", "reference"):
            h = (torch.zeros(1 << bits, dtype=torch.long), torch.zeros(1 << bits, dtype=torch.long),
                 torch.zeros(1 << bits, dtype=torch.float64))
            histogram_update(*h, split.neg, split.pos, split.pos_sizes, bits, impl=impl)
            hists.append(h)
        assert torch.equal(hists[0][0], hists[1][0]) and torch.equal(hists[0][1], hists[1][1])
        torch.testing.assert_close(hists[0][2], hists[1][2], rtol=1e-12, atol=0)
        assert int(hists[0][0].sum()) == split.neg.numel()


def test_merge_equals_single_pass(rng):
    masks = blob_masks(rng, 12, 24, 24)
    masks[0, 1, 1] = True
    maps = maps_for(rng, masks)
    cats = ["a" if i % 3 else "b" for i in range(12)]
    for protocol in ("exact", "binned"):
        whole = Evaluator(protocol)
        whole.update(maps, masks, categories=cats)
        left, right = Evaluator(protocol), Evaluator(protocol)
        left.update(maps[:5], masks[:5], categories=cats[:5])
        right.update(maps[5:], masks[5:], categories=cats[5:])
        merged = left.merge(right).compute()
        expected = whole.compute()
        for cat in expected:
            for key, value in expected[cat].items():
                assert merged[cat][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (protocol, cat, key)


def test_binned_state_is_fixed_size():
    ev = Evaluator("binned", bins_bits=16)
    sizes = []
    rng = np.random.default_rng(0)
    for _ in range(3):
        ev.update(rng.random((4, 32, 32), dtype=np.float32), rng.random((4, 32, 32)) < 0.1)
        cat = ev._categories["all"]
        sizes.append(sum(h.numel() * h.element_size() for h in cat.hist))
    assert sizes[0] == sizes[-1] == (1 << 16) * 24
    assert not cat.neg and not cat.pos  # no pixel kept


def test_float_key_is_monotone():
    from fastproto.metrics.curves import float_key

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
