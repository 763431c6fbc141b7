"""Bad input gets a clear error (or NaN plus a warning naming the category), never a silent number."""
import math

import numpy as np
import pytest
import torch

from fastproto.metrics import Evaluator, compute_metrics


def good(B=4, H=8, W=8, seed=0):
    rng = np.random.default_rng(seed)
    maps = rng.random((B, H, W), dtype=np.float32)
    masks = np.zeros((B, H, W), bool)
    masks[0, 2:4, 2:4] = True
    return maps, masks


def test_shape_mismatch():
    maps, masks = good()
    with pytest.raises(ValueError, match="masks shape"):
        compute_metrics(maps, masks[:, :4])
    with pytest.raises(ValueError, match=r"anomaly_maps must be \[B,H,W\]"):
        compute_metrics(maps[0], masks[0])
    with pytest.raises(ValueError, match="image_scores has 3 entries"):
        compute_metrics(maps, masks, image_scores=np.zeros(3))
    with pytest.raises(ValueError, match="categories has 2 entries"):
        Evaluator().update(maps, masks, categories=["a", "b"])


def test_dtype_errors():
    maps, masks = good()
    with pytest.raises(TypeError, match="anomaly_maps"):
        compute_metrics(maps.astype(np.complex64), masks)
    with pytest.raises(TypeError, match="anomaly_maps must be a torch.Tensor or numpy.ndarray"):
        compute_metrics("maps.png", masks)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores(bad):
    maps, masks = good()
    maps[1, 3, 3] = bad
    with pytest.raises(ValueError, match="anomaly_maps contains 1 non-finite"):
        compute_metrics(maps, masks)
    maps, masks = good()
    scores = np.ones(4)
    scores[2] = bad
    with pytest.raises(ValueError, match="image_scores contains 1 non-finite"):
        compute_metrics(maps, masks, image_scores=scores)


def test_non_binary_masks():
    maps, masks = good()
    labels = masks.astype(np.uint8) * 2
    labels[1, 0, 0] = 3
    with pytest.raises(ValueError, match="masks is not binary"):
        compute_metrics(maps, labels)
    with pytest.raises(ValueError, match=r"float masks must lie in \[0, 1\]"):
        compute_metrics(maps, masks.astype(np.float32) * 255)
    # 0/255 uint8 PNG masks and soft float masks thresholded at 0.5 are fine
    a = compute_metrics(maps, masks.astype(np.uint8) * 255, image_scores=np.arange(4.0))
    b = compute_metrics(maps, masks.astype(np.float32) * 0.9, image_scores=np.arange(4.0))
    assert a == b
    with pytest.raises(ValueError, match="image_labels must be 0/1"):
        compute_metrics(maps, masks, image_labels=np.array([0, 2, 0, 1]))


def test_contradicting_image_labels():
    maps, masks = good()
    with pytest.raises(ValueError, match=r"image_labels marks image\(s\) \[0\] as normal"):
        compute_metrics(maps, masks, image_labels=np.zeros(4))


def test_empty_input():
    with pytest.raises(ValueError, match="anomaly_maps is empty"):
        compute_metrics(np.zeros((0, 8, 8), np.float32), np.zeros((0, 8, 8), bool))
    with pytest.raises(ValueError, match="before any update"):
        Evaluator().compute()


@pytest.mark.parametrize("protocol", ["exact", "binned"])
def test_category_without_anomalous_pixels(protocol):
    maps, masks = good()
    ev = Evaluator(protocol)
    ev.update(maps, masks, categories=["bottle"] * 4, image_scores=np.arange(4.0))
    ev.update(maps, np.zeros_like(masks), categories=["screw"] * 4, image_scores=np.arange(4.0))
    with pytest.warns(RuntimeWarning, match="category 'screw'.*p_auroc"):
        out = ev.compute()
    assert all(math.isnan(out["screw"][k]) for k in ("i_auroc", "p_auroc", "p_ap", "p_f1max", "aupro", "mad"))
    assert not math.isnan(out["bottle"]["p_auroc"])
    assert math.isnan(out["mean"]["p_auroc"])  # an undefined category makes the mean undefined


def test_category_without_normal_images():
    maps, masks = good()
    with pytest.warns(RuntimeWarning, match="category 'all'.*i_auroc.*no normal image"):
        out = compute_metrics(maps, masks, image_labels=np.ones(4), image_scores=np.arange(4.0))
    assert math.isnan(out["i_auroc"]) and out["i_ap"] == 1.0


def test_bad_options():
    with pytest.raises(ValueError, match="protocol must be one of"):
        Evaluator("sklearn")
    with pytest.raises(ValueError, match="image_score must be one of"):
        Evaluator(image_score="mean")
    with pytest.raises(ValueError, match="bins_bits and max_bins apply to protocol='binned' only"):
        Evaluator(bins_bits=16)
    with pytest.raises(ValueError, match="with_bounds=True applies"):
        ev = Evaluator()
        ev.update(*good(), image_scores=np.arange(4.0))
        ev.compute(with_bounds=True)


def test_float64_input_warns_when_rounded():
    maps, masks = good()
    m64 = maps.astype(np.float64) + 1e-12
    with pytest.warns(UserWarning, match="evaluated as float32"):
        compute_metrics(m64, masks, image_scores=np.arange(4.0))


def test_torch_inputs_and_channel_dim():
    maps, masks = good()
    a = compute_metrics(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None], image_scores=np.arange(4.0))
    b = compute_metrics(maps, masks, image_scores=np.arange(4.0))
    assert a == b
