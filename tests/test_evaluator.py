"""Evaluator: categories, resizing, merging across processes (torch.distributed, gloo)."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastproto.metrics import METRICS, Evaluator, compute_metrics
from fastproto.reference import metrics as ref
from tests._data import blob_masks, maps_for


def dataset(rng, B=18, H=20, W=20):
    masks = blob_masks(rng, B, H, W)
    masks[:3, 1, 1] = True
    masks[-3:] = False
    maps = maps_for(rng, masks)
    cats = np.array(["bottle", "cable", "screw"])[np.arange(B) % 3]
    return maps, masks, cats


def test_categories_are_independent_and_mean_is_unweighted(rng):
    maps, masks, cats = dataset(rng)
    ev = Evaluator()
    for part in np.array_split(rng.permutation(len(maps)), 4):
        ev.update(maps[part], masks[part], categories=list(cats[part]))
    out = ev.compute()
    assert set(out) == {"bottle", "cable", "screw", "mean"}
    for cat in ("bottle", "cable", "screw"):
        sel = cats == cat
        scores = maps[sel].reshape(sel.sum(), -1).max(1)
        expected = ref.all_metrics(maps[sel], masks[sel], scores, masks[sel].reshape(sel.sum(), -1).any(1))
        for key in (*METRICS, "mad"):
            assert out[cat][key] == pytest.approx(expected[key], abs=1e-9), (cat, key)
    for key in METRICS:
        assert out["mean"][key] == pytest.approx(np.mean([out[c][key] for c in ("bottle", "cable", "screw")]))
    ev.reset()
    with pytest.raises(ValueError):
        ev.compute()


def test_resolution_resizes_maps_bilinear_and_masks_nearest(rng):
    maps, masks, _ = dataset(rng, H=24, W=24)
    out = compute_metrics(maps, masks, resolution=16)
    m = F.interpolate(torch.from_numpy(maps)[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    k = F.interpolate(torch.from_numpy(masks)[:, None].float(), size=(16, 16), mode="nearest")[:, 0] > 0.5
    expected = compute_metrics(m, k)
    assert out == expected


def _worker(rank, world, init_file, protocol, maps, masks, cats, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ev = Evaluator(protocol, **({"bins_bits": 16} if protocol == "binned" else {}))
        idx = np.arange(rank, len(maps), world)
        ev.update(maps[idx], masks[idx], categories=list(cats[idx]))
        queue.put((rank, ev.sync().compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("protocol", ["exact", "binned"])
def test_distributed_sync_equals_single_process(rng, protocol):
    maps, masks, cats = dataset(rng)
    # the single-process equivalent: one evaluator per rank's share, merged
    kw = {"bins_bits": 16} if protocol == "binned" else {}
    shares = [Evaluator(protocol, **kw) for _ in range(2)]
    for rank, ev in enumerate(shares):
        idx = np.arange(rank, len(maps), 2)
        ev.update(maps[idx], masks[idx], categories=list(cats[idx]))
    expected = shares[0].merge(shares[1]).compute()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, protocol, maps, masks, cats, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = dict(queue.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
    for rank in (0, 1):
        for cat, metrics in expected.items():
            for key, value in metrics.items():
                assert results[rank][cat][key] == pytest.approx(value, abs=1e-12, nan_ok=True), (rank, cat, key)
