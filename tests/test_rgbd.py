"""fastproto.data.rgbd: depth preprocessing (plane removal, hole filling, encoding), the MVTec 3D-AD and
Eyecandies loaders on tiny written fixtures, bad-file errors naming the file, and the synthetic RGB-D generator
(determinism, exact masks, modality-specific and cross-modal defects)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from fastproto.data import (
    BadFileError,
    MVTec3DDataset,
    Preprocess,
    collate,
    generate_rgbd,
    rgbd,
)
from fastproto.data.rgbd import (
    EyecandiesDataset,
    depth_image,
    fill_missing,
    fit_plane,
    make_rgbd_sample,
    remove_background_plane,
)
from fastproto.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


def tilted_scene(rng, size=48, bump_height=0.01):
    """Tilted plane ~0.5 m away plus a spherical bump of ``bump_height`` (towards the camera);
    returns (xyz, bump mask = points more than 1 mm above the plane)."""
    y, x = (np.mgrid[0:size, 0:size] - size / 2) * 0.002
    a, b = rng.uniform(-0.3, 0.3, 2)
    cy, cx = rng.uniform(-0.01, 0.01, 2)
    rho2 = ((y - cy) ** 2 + (x - cx) ** 2) / 0.02 ** 2
    height = bump_height * np.sqrt(np.clip(1 - rho2, 0, None))
    z = 0.5 + a * x + b * y - height
    xyz = np.stack([x, y, z], -1).astype(np.float32)
    # distance of a bump point to the plane is height / sqrt(a^2 + b^2 + 1)
    return xyz, height / np.sqrt(a * a + b * b + 1)


# --- depth preprocessing --------------------------------------------------------------------------------------


def test_plane_removal_keeps_the_bump_and_removes_the_tilted_plane(rng):
    xyz, dist = tilted_scene(rng)
    xyz[rng.random(xyz.shape[:2]) < 0.02] = 0  # sensor holes
    out = remove_background_plane(xyz, border=6, distance=0.005)
    valid_in = xyz[..., 2] != 0
    kept = out[..., 2] != 0
    assert np.array_equal(kept, valid_in & (dist >= 0.005))
    assert (dist >= 0.005).sum() > 50 and (~kept & valid_in).sum() > 1000
    np.testing.assert_array_equal(out[kept], xyz[kept])  # survivors untouched


def test_plane_fit_is_robust_to_an_object_reaching_the_border(rng):
    pts = rng.uniform(-1, 1, (400, 2))
    z = 0.2 * pts[:, 0] - 0.1 * pts[:, 1] + 3.0
    z[:60] -= rng.uniform(0.05, 0.2, 60)  # 15 % of the border points lie on an object
    coef = fit_plane(np.column_stack([pts, z]))
    np.testing.assert_allclose(coef, [0.2, -0.1, 3.0], atol=1e-6)
    plain = np.linalg.lstsq(np.column_stack([pts, np.ones(400)]), z, rcond=None)[0]
    assert np.abs(plain - [0.2, -0.1, 3.0]).max() > 1e-3  # the untrimmed fit is off: the trimming matters


def test_fill_missing_fills_holes_with_the_neighbour_mean_only_where_allowed():
    z = np.arange(25, dtype=np.float32).reshape(5, 5) + 1
    valid = np.ones((5, 5), dtype=bool)
    valid[2, 2] = valid[0, 0] = False
    fillable = np.zeros((5, 5), dtype=bool)
    fillable[2, 2] = True
    out, ok = fill_missing(z, valid, iters=3, fillable=fillable)
    assert ok[2, 2] and not ok[0, 0] and out[0, 0] == 0
    assert out[2, 2] == pytest.approx((z[1:4, 1:4].sum() - z[2, 2]) / 8)
    np.testing.assert_array_equal(out[valid], z[valid])


def test_depth_image_encoding(rng):
    xyz, dist = tilted_scene(rng)
    hole = np.unravel_index(np.argmax(dist), dist.shape)  # a sensor hole at the bump's top
    xyz[hole] = 0
    img = depth_image(xyz, border=6)
    fg = img > 0
    assert np.array_equal(fg, dist >= 0.005)  # the hole is filled, the background stays 0
    assert img[fg].min() == pytest.approx(0.2, abs=1e-6) and img[fg].max() == pytest.approx(1.0, abs=1e-6)
    # near = bright: brightness decreases with z over the foreground
    z = xyz[..., 2]
    order = np.argsort(z[fg & (z != 0)])
    assert np.all(np.diff(img[fg & (z != 0)][order]) <= 1e-6)
    raw = depth_image(xyz, border=6, encoding="raw")
    np.testing.assert_allclose(raw[fg & (z != 0)], z[fg & (z != 0)], rtol=1e-6)
    with pytest.raises(ValueError, match="encoding"):
        depth_image(xyz, encoding="colormap")


def test_depth_image_rejects_empty_maps(rng):
    with pytest.raises(ValueError, match="all points are missing"):
        depth_image(np.zeros((20, 20, 3), np.float32))
    xyz, _ = tilted_scene(rng, bump_height=0.0)
    with pytest.raises(ValueError, match="no point is left"):
        depth_image(xyz, border=6)


# --- MVTec 3D-AD loader on written fixtures -------------------------------------------------------------------


def _write(root: Path, rng, cat: str, split: str, kind: str, stem: str, size=(40, 32), mask=None, xyz=None,
           rgb=True):
    d = root / cat / split / kind
    h, w = size
    if rgb:
        (d / "rgb").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / "rgb" / f"{stem}.png")
    if xyz is not False:
        (d / "xyz").mkdir(parents=True, exist_ok=True)
        if xyz is None:
            xyz, _ = tilted_scene(rng, size=max(h, w))
            xyz = xyz[:h, :w]
        tifffile.imwrite(d / "xyz" / f"{stem}.tiff", xyz, photometric="minisblack")
    if mask is not None:
        (d / "gt").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask.astype(np.uint8) * 255).save(d / "gt" / f"{stem}.png")
    return d


def test_mvtec3d_loader_samples(tmp_path, rng):
    _write(tmp_path, rng, "bagel", "train", "good", "000")
    _write(tmp_path, rng, "bagel", "test", "good", "000", mask=np.zeros((40, 32), bool))
    m = np.zeros((40, 32), bool)
    m[10:20, 5:15] = True
    d = _write(tmp_path, rng, "bagel", "test", "crack", "000", mask=m)
    tf = Preprocess(28, None)
    train = MVTec3DDataset(tmp_path, "train", transform=tf, plane_border=6)
    assert len(train) == 1 and train.records[0].depth.endswith("000.tiff")
    test = MVTec3DDataset(tmp_path, "test", transform=tf, plane_border=6)
    assert [(r.defect, r.label) for r in test.records] == [("crack", 1), ("good", 0)]
    s = test[0]
    assert set(s) == {"image", "depth", "mask", "label", "category", "defect", "path"}
    assert s["image"].shape == s["depth"].shape == (3, 28, 28) and s["mask"].shape == (1, 28, 28)
    assert s["path"] == str(d / "rgb" / "000.png") and s["category"] == "bagel" and s["label"] == 1
    assert s["mask"].sum() > 0
    # depth channels: the same encoded value normalised per channel; background (0) maps to -mean/std
    raw = s["depth"].numpy() * STD[:, None, None] + MEAN[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)
    np.testing.assert_allclose(raw[0], raw[2], atol=1e-5)
    assert raw[0].min() == pytest.approx(0, abs=1e-5) and 0.2 < raw[0].max() <= 1 + 1e-5  # background, object
    # nearest resize: values are a subset of the full-resolution encoding
    full = depth_image(tifffile.imread(d / "xyz" / "000.tiff"), border=6)
    assert np.abs(raw[0].reshape(-1, 1) - np.unique(full)[None]).min(1).max() < 1e-5
    batch = collate([test[0], test[1]])
    assert batch["depth"].shape == (2, 3, 28, 28) and batch["label"].tolist() == [1, 0]


def test_mvtec3d_bad_files_name_the_file(tmp_path, rng):
    _write(tmp_path, rng, "cat", "train", "good", "000")
    lonely_rgb = _write(tmp_path, rng, "cat", "train", "good", "001", xyz=False) / "rgb" / "001.png"
    with pytest.raises(BadFileError, match="001.png") as e:
        MVTec3DDataset(tmp_path, "train")
    assert "no point map" in str(e.value) and e.value.path == str(lonely_rgb)
    os.remove(lonely_rgb)
    lonely_xyz = _write(tmp_path, rng, "cat", "train", "good", "002", rgb=False) / "xyz" / "002.tiff"
    with pytest.raises(BadFileError, match="no RGB image") as e:
        MVTec3DDataset(tmp_path, "train")
    assert e.value.path == str(lonely_xyz)
    with pytest.warns(UserWarning, match="002.tiff"):
        ds = MVTec3DDataset(tmp_path, "train", on_bad_file="skip")
    assert len(ds) == 1
    os.remove(lonely_xyz)
    # load-time problems: wrong size, all points missing, not a point map
    wrong = _write(tmp_path, rng, "cat", "train", "good", "003", xyz=np.ones((20, 20, 3), np.float32))
    empty = _write(tmp_path, rng, "cat", "train", "good", "004", xyz=np.zeros((40, 32, 3), np.float32))
    flat = _write(tmp_path, rng, "cat", "train", "good", "005", xyz=np.ones((40, 32), np.float32))
    ds = MVTec3DDataset(tmp_path, "train", transform=Preprocess(28, None), plane_border=6)
    for i, (folder, stem, what) in enumerate([(wrong, "003", "differs from the RGB image size"),
                                              (empty, "004", "all points are missing"),
                                              (flat, "005", r"\[H, W, 3\]")], start=1):
        with pytest.raises(BadFileError, match=what) as e:
            ds[i]
        assert e.value.path == str(folder / "xyz" / f"{stem}.tiff")
    corrupt = _write(tmp_path, rng, "cat", "train", "good", "006") / "xyz" / "006.tiff"
    corrupt.write_bytes(b"II*\x00garbage")
    with pytest.raises(BadFileError, match=r"unreadable TIFF|must be \[H, W, 3\]") as e:
        MVTec3DDataset(tmp_path, "train", transform=Preprocess(28, None))[4]
    assert e.value.path == str(corrupt)
    skip = MVTec3DDataset(tmp_path, "train", transform=Preprocess(28, None), plane_border=6, on_bad_file="skip")
    with pytest.warns(UserWarning, match="004.tiff"):
        assert skip[2] is None
    assert skip[0] is not None


def test_mvtec3d_missing_mask_and_unknown_category(tmp_path, rng):
    d = _write(tmp_path, rng, "cat", "test", "hole", "000")
    with pytest.raises(BadFileError, match="no ground-truth mask") as e:
        MVTec3DDataset(tmp_path, "test")
    assert e.value.path == str(d / "rgb" / "000.png")
    with pytest.raises(ValueError, match="unknown category"):
        MVTec3DDataset(tmp_path, "test", categories="dog")
    with pytest.raises(ValueError, match="split"):
        MVTec3DDataset(tmp_path, "val")


# --- Eyecandies (raw layout) ----------------------------------------------------------------------------------


def test_eyecandies_raw_layout(tmp_path, rng):
    def sample(split, idx, mask=None):
        data = tmp_path / "GummyBear" / split / "data"
        data.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"{idx}_image_4.png")
        raw = np.full((32, 32), 40000, np.uint16)
        raw[10:20, 10:20] = 20000  # closer: an object on the background
        Image.fromarray(raw).save(data / f"{idx}_depth.png")
        (data / f"{idx}_info_depth.yaml").write_text("normalization:\n  min: 0.5\n  max: 1.5\n")
        if mask is not None:
            Image.fromarray(mask.astype(np.uint8) * 255).save(data / f"{idx}_mask.png")

    sample("train", "000")
    m = np.zeros((32, 32), bool)
    m[12:15, 12:15] = True
    sample("test_public", "00", m)
    sample("test_public", "01", np.zeros((32, 32), bool))
    train = EyecandiesDataset(tmp_path, "train", transform=Preprocess(28, None), plane_border=4)
    xyz = train.read_points(train.records[0])
    assert xyz[0, 0, 2] == pytest.approx(40000 / 65535 + 0.5, rel=1e-5)
    assert xyz[16, 20, 0] == pytest.approx(4 * xyz[16, 20, 2] / rgbd.EYECANDIES_FOCAL, rel=1e-5)
    s = train[0]
    assert s["depth"].shape == (3, 28, 28)
    test = EyecandiesDataset(tmp_path, "test", transform=Preprocess(28, None), plane_border=4)
    assert [(r.label, r.defect) for r in test.records] == [(1, "bad"), (0, "good")]
    assert test[0]["mask"].sum() > 0 and test[1]["mask"].sum() == 0
    os.remove(tmp_path / "GummyBear" / "train" / "data" / "000_info_depth.yaml")
    with pytest.raises(BadFileError, match="000_info_depth.yaml"):
        train[0]


# --- synthetic generator --------------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_rgbd_is_deterministic_and_loads(tmp_path):
    a = generate_rgbd(tmp_path / "a", n_train=2, n_test=8, size=48, seed=5)
    b = generate_rgbd(tmp_path / "b", n_train=2, n_test=8, size=48, seed=5)
    c = generate_rgbd(tmp_path / "c", n_train=2, n_test=8, size=48, seed=6)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db and da != dc
    assert generate_rgbd(a, n_train=2, n_test=8, size=48, seed=5) == a  # same parameters: reused
    with pytest.raises(FileExistsError):
        generate_rgbd(a, n_train=3, n_test=8, size=48, seed=5)
    xyz = tifffile.imread(a / "cookie" / "train" / "good" / "xyz" / "000.tiff")
    assert xyz.dtype == np.float32 and xyz.shape == (48, 48, 3)
    ds = MVTec3DDataset(a, "test", transform=Preprocess(None, None), plane_border=6)
    assert sorted({r.defect for r in ds.records}) == ["bump", "dent", "good", "stain", "swap"]
    for i, rec in enumerate(ds.records):
        if rec.label:
            gt = np.asarray(Image.open(rec.mask)) > 127
            np.testing.assert_array_equal(ds[i]["mask"][0].numpy() > 0.5, gt)


@pytest.mark.parametrize("category", list(rgbd.RGBD_CATEGORIES))
def test_synthetic_defects_are_modality_specific_with_exact_masks(category, rng):
    seed = int(rng.integers(1 << 31))
    size = 64
    good_rgb, good_xyz, good_mask = make_rgbd_sample(category, np.random.default_rng(seed), size, "good")
    assert not good_mask.any()
    for defect in ("bump", "dent", "stain", "swap"):
        img, xyz, mask = make_rgbd_sample(category, np.random.default_rng(seed), size, defect)
        assert mask.sum() > 10, defect
        both = (xyz[..., 2] != 0) & (good_xyz[..., 2] != 0)  # dropouts differ; they lie on the background only
        assert both[mask].all()
        z_changed = both & (xyz[..., 2] != good_xyz[..., 2])
        rgb_changed = (img != good_rgb).any(-1)
        if defect == "stain":  # colour only
            assert not z_changed.any() and np.array_equal(rgb_changed, mask)
        else:  # geometry only
            assert not rgb_changed.any() and np.array_equal(z_changed, mask)
        if defect in ("bump", "dent"):
            sign = np.sign(good_xyz[..., 2] - xyz[..., 2])[mask]
            assert (sign == (1 if defect == "bump" else -1)).all()
        if defect == "swap":  # a normal colour (one spot colour) on the other colour's normal shape
            colours = {tuple(c) for c in img[mask]}
            assert len(colours) == 1
            colour = colours.pop()
            spot = (img == colour).all(-1)
            assert np.array_equal(spot, mask) and colour in {tuple(v) for v in rgbd._SPOT_COLOURS.values()}
            raised_now = (good_xyz[..., 2] - xyz[..., 2])[mask].mean() > 0
            assert raised_now == (colour == rgbd._SPOT_COLOURS["blue"])  # blue became raised / red became flat
        # the defect survives the preprocessing: every mask pixel is foreground after plane removal
        assert (depth_image(xyz, border=6)[mask] > 0).all()


def test_generator_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic RGB-D category"):
        generate_rgbd(tmp_path, categories=["bagel"])
    with pytest.raises(ValueError, match="unknown defect"):
        make_rgbd_sample("cookie", np.random.default_rng(0), 48, "scratch")


def test_build_dataset_spec_reaches_the_rgbd_formats(tmp_path):
    """"mvtec3d:<root>" goes through the common spec parser and category listing."""
    from fastproto.data import build_dataset, list_categories

    root = generate_rgbd(tmp_path / "rgbd", categories=("cookie",), n_train=1, n_test=2, size=64, seed=1)
    assert list_categories(f"mvtec3d:{root}") == ["cookie"]
    ds = build_dataset(f"mvtec3d:{root}", "test", image_size=64, crop_size=None)
    assert len(ds) == 2 and ds[0]["depth"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="mvtec3d"):
        build_dataset(f"nosuch:{root}")
