"""Synthetic anomaly-map generator, and a smoke run of the metric benchmark (``bench/metrics.py --quick``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import ndimage

from fastproto.metrics.synthetic import heavy_tail_transform, make_maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return make_maps(60, 128, seed=3)


def test_shapes_and_dtypes(data):
    maps, masks = data
    assert maps.shape == masks.shape == (60, 128, 128)
    assert maps.dtype == np.float32 and masks.dtype == np.bool_
    assert np.isfinite(maps).all()
    assert maps.min() >= 4.0  # documented floor (keeps the heavy-tailed transform strictly monotone)
    m64, k64 = make_maps(5, 32, seed=1, dtype=np.float64)
    assert m64.dtype == np.float64 and k64.dtype == np.bool_ and m64.shape == (5, 32, 32)
    m16, _ = make_maps(5, 32, seed=1, dtype=np.float16)
    assert m16.dtype == np.float16


def test_deterministic():
    a = make_maps(12, 64, seed=7)
    b = make_maps(12, 64, seed=7)
    c = make_maps(12, 64, seed=8)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_anomalous_fractions(data):
    maps, masks = data
    labels = masks.any(axis=(1, 2))
    assert labels.sum() == round(60 * 2 / 3)
    frac = masks.mean()
    assert 0.005 < frac < 0.03, frac  # about 1.5 % anomalous pixels overall
    _, k0 = make_maps(10, 32, anomalous_fraction=0.0)
    assert not k0.any()
    _, k1 = make_maps(10, 32, anomalous_fraction=1.0)
    assert k1.any(axis=(1, 2)).all()


def test_region_variety(data):
    """Regions touching the border and one-pixel regions exist; anomalies score higher on average."""
    maps, masks = data
    border = masks[:, 0, :].any() or masks[:, -1, :].any() or masks[:, :, 0].any() or masks[:, :, -1].any()
    assert border
    sizes = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        sizes += list(np.bincount(lab.ravel())[1:])
    assert 1 in sizes
    assert len(sizes) >= 40  # 1-3 regions per anomalous image
    assert maps[masks].mean() > maps[~masks].mean() + 0.5


def test_heavy_tail_same_ranks_and_ties():
    plain, masks = make_maps(20, 64, seed=5)
    heavy, masks_h = make_maps(20, 64, seed=5, heavy_tail=True)
    np.testing.assert_array_equal(masks, masks_h)
    assert heavy.dtype == np.float32
    p, h = plain.ravel(), heavy.ravel()
    order = np.argsort(p, kind="stable")
    ps, hs = p[order], h[order]
    assert np.all(np.diff(hs) >= 0)  # monotone
    np.testing.assert_array_equal(np.diff(ps) == 0, np.diff(hs) == 0)  # no new ties, none removed
    assert np.unique(p).size == np.unique(h).size
    np.testing.assert_array_equal(heavy, heavy_tail_transform(plain))
    # heavy right tail: the top of the distribution is stretched far more than the bulk
    q50, q99, q100 = np.quantile(h, [0.5, 0.99, 1.0])
    assert (q100 - q99) > 10 * (q99 - q50) or q100 / q50 > 50


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_maps(0)
    with pytest.raises(ValueError):
        make_maps(4, 4)
    with pytest.raises(ValueError):
        make_maps(4, 32, anomalous_fraction=1.5)
    with pytest.raises(ValueError):
        make_maps(4, 32, dtype=np.int32)
    with pytest.raises(ValueError):
        make_maps(4, 32, heavy_tail=True, dtype=np.float16)


def test_generation_is_fast():
    t = time.perf_counter()
    make_maps(150, 256)
    # target < 2 s on 2 idle cores; generous bound for loaded CI machines
    assert time.perf_counter() - t < 10.0


def test_bench_metrics_quick(tmp_path):
    """``bench/metrics.py --quick`` runs end to end; fastproto exact agrees with the references."""
    out_json = tmp_path / "quick.json"
    out_md = tmp_path / "RESULTS.md"
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "metrics.py"), "--quick", "--json", str(out_json),
         "--out", str(out_md)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out_json.read_text())
    assert res["memory_check"]["method"] in ("clear_refs", "sampler", "tracemalloc")
    assert len(res["datasets"]) == 2  # plain + heavy-tailed
    metrics = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
    exact_values = []
    for ds in res["datasets"]:
        rows = {r["name"]: r for r in ds["rows"]}
        assert any("Dinomaly" in n and "skipped" in r for n, r in rows.items())  # slow baseline skipped
        ref = ds["reference"]
        for name, r in rows.items():
            if name.startswith("fastproto exact"):
                assert "error" not in r, r
                for k in metrics:
                    assert abs(r["values"][k] - ref[k]) <= 1e-6, (name, k, r["values"][k], ref[k])
                exact_values.append([r["values"][k] for k in metrics])
            if name.startswith(("sklearn", "MVTec official")):
                assert "error" not in r, r
    # heavy-tailed maps have the same ranks: exact metrics identical on both variants
    assert np.allclose(exact_values[0], exact_values[-1], atol=1e-12, rtol=0)
    text = out_md.read_text()
    assert "<!-- bench/metrics.py:quick:start -->" in text and "Time summary" in text
