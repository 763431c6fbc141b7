import numpy as np
import pytest
import scipy.ndimage as nd
import torch

from fastproto import _ext
from fastproto.metrics import connected_components
from fastproto.metrics.components import split_pixels
from tests._data import blob_masks

IMPLS = ["reference"] + (["ext"] if _ext.has_op("connected_components") else [])


def scipy_labels(masks, connectivity):
    structure = np.ones((3, 3)) if connectivity == 8 else None
    return np.stack([nd.label(m, structure=structure)[0] for m in masks]).astype(np.int32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_matches_scipy_on_random_masks(rng, impl, connectivity):
    for density in (0.05, 0.3, 0.5, 0.6, 0.9):
        H, W = rng.integers(1, 70, 2)
        masks = rng.random((int(rng.integers(1, 6)), H, W)) < density
        out = connected_components(masks, connectivity, impl=impl)
        np.testing.assert_array_equal(out.numpy(), scipy_labels(masks, connectivity))


@pytest.mark.parametrize("impl", IMPLS)
def test_edge_cases(impl):
    checker = (np.indices((9, 11)).sum(0) % 2 == 0)[None]  # diagonal-only connectivity
    cases = [np.zeros((2, 5, 5), bool), np.ones((2, 5, 7), bool), checker, np.eye(6, dtype=bool)[None],
             np.ones((1, 1, 1), bool), np.zeros((1, 1, 1), bool)]
    for masks in cases:
        for c in (4, 8):
            np.testing.assert_array_equal(connected_components(masks, c, impl=impl).numpy(), scipy_labels(masks, c))
    assert int(connected_components(checker, 8, impl=impl).max()) == 1
    assert int(connected_components(checker, 4, impl=impl).max()) == int(checker.sum())


def test_accepts_uint8_float_and_rejects_bad():
    m = np.zeros((1, 4, 4), np.uint8)
    m[0, 1:3, 1:3] = 255
    assert int(connected_components(m).max()) == 1
    assert int(connected_components(m.astype(np.float32) / 255).max()) == 1
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(m, 6)
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        connected_components(np.zeros((4, 4), bool))


@pytest.mark.parametrize("impl", IMPLS)
def test_split_pixels_against_numpy(rng, impl):
    masks = blob_masks(rng, 7, 33, 40)
    maps = rng.standard_normal(masks.shape).astype(np.float32)
    split = split_pixels(torch.from_numpy(maps), torch.from_numpy(masks), 8,
                         impl="reference" if impl == "reference" else "auto")
    labels = scipy_labels(masks, 8).astype(np.int64)
    offsets = np.r_[0, np.cumsum(labels.reshape(len(labels), -1).max(1))[:-1]]
    glob = np.where(labels > 0, labels + offsets[:, None, None], 0)
    sizes = np.bincount(glob.ravel())
    np.testing.assert_array_equal(split.neg.numpy(), maps[~masks])
    np.testing.assert_array_equal(split.pos.numpy(), maps[masks])
    np.testing.assert_array_equal(split.pos_sizes.numpy(), sizes[glob[masks]])
    assert split.n_regions == int(glob.max())
