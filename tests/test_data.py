"""fastproto.data: dataset layouts, preprocessing, bad-file handling, few-shot expansion, synthetic data."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastproto.data import (
    BadFileError,
    MVTecDataset,
    Preprocess,
    RealIADDataset,
    VisARawDataset,
    binarize_mask,
    build_dataset,
    collate,
    fewshot_expand,
    list_categories,
    synthetic,
)
from fastproto.data.transforms import IMAGENET_MEAN, IMAGENET_STD, fewshot_augmentations

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_reduced"
MEAN, STD = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)


# --- fixtures written by the tests -----------------------------------------------------------------------------


def _rgb(rng, path, size=(40, 48), ext=None):
    """Random RGB image (w, h) = size at ``path``; returns the array."""
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _mask(path, size=(40, 48), box=(5, 5, 20, 30), value=255, mode="L"):
    """Mask with a filled box (x0, y0, x1, y1) of ``value``; returns the boolean truth."""
    arr = np.zeros((size[1], size[0]), np.uint8)
    x0, y0, x1, y1 = box
    arr[y0:y1, x0:x1] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").convert(mode).save(path)
    return arr > 0


def _mvtec(rng, root, categories=("bottle", "cable"), n_train=3, n_good=2, defects=("crack", "scratch"), n_def=2,
           normal="good", ext=".png", mask_name="{stem}_mask.png"):
    for c in categories:
        for i in range(n_train):
            _rgb(rng, root / c / "train" / normal / f"{i:03d}{ext}")
        for i in range(n_good):
            _rgb(rng, root / c / "test" / normal / f"{i:03d}{ext}")
        for d in defects:
            for i in range(n_def):
                _rgb(rng, root / c / "test" / d / f"{i:03d}{ext}")
                _mask(root / c / "ground_truth" / d / mask_name.format(stem=f"{i:03d}"))
    return root


def _raw(transform_kwargs=None):
    """Preprocessing that keeps the native size and [0, 1] values (for checking loaded pixels)."""
    return Preprocess(None, None, mean=None, std=None, **(transform_kwargs or {}))


# --- preprocessing -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 260), (448, 448), (1000, 700)])
def test_preprocess_matches_restatement(rng, size):
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    out = Preprocess(448, 392).image(img)
    ref = np.asarray(img.resize((448, 448), Image.BILINEAR), np.float64) / 255.0
    ref = (ref[28:420, 28:420] - MEAN) / STD
    assert out.dtype == torch.float32 and out.shape == (3, 392, 392)
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref, atol=1e-5)


def test_preprocess_antialias_like_torch(rng):
    """PIL's bilinear downscale is the antialiased one (torch's antialias=True was built to match it)."""
    arr = rng.integers(0, 256, (900, 937, 3), dtype=np.uint8)
    ours = Preprocess(448, None, mean=None, std=None).image(Image.fromarray(arr)).double()
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].double() / 255
    ref = F.interpolate(x, size=(448, 448), mode="bilinear", antialias=True, align_corners=False)[0]
    plain = F.interpolate(x, size=(448, 448), mode="bilinear", antialias=False, align_corners=False)[0]
    assert (ours - ref).abs().max() <= 1.01 / 255  # uint8 rounding of PIL's output
    assert (ours - plain).abs().mean() > 10 / 255  # without antialiasing it would be far off


def test_preprocess_sizes_and_errors(rng):
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    assert Preprocess(None, None).image(img).shape == (3, 50, 70)
    assert Preprocess((64, 80), None).image(img).shape == (3, 64, 80)
    assert Preprocess(None, (40, 30)).image(img).shape == (3, 40, 30)
    raw = Preprocess(None, (40, 30), mean=None, std=None).image(img)
    np.testing.assert_array_equal((raw.permute(1, 2, 0).numpy() * 255).round(), np.asarray(img)[5:45, 20:50])
    with pytest.raises(ValueError, match="larger"):
        Preprocess(None, 64).image(img)
    with pytest.raises(ValueError, match="image_size"):
        Preprocess(0, None)
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(interpolation="area")


def test_mask_nearest_stays_binary(rng):
    grey = rng.choice(np.array([0, 60, 127, 128, 200, 255], np.uint8), size=(37, 53))
    grey[10:20, 10:30] = 255
    t = Preprocess(448, 392)
    out = t.mask(Image.fromarray(grey, "L"), (37, 53))
    assert out.shape == (1, 392, 392) and set(out.unique().tolist()) <= {0.0, 1.0}
    ref = np.asarray(Image.fromarray(grey, "L").resize((448, 448), Image.NEAREST))[28:420, 28:420] / 255.0 > 0.5
    np.testing.assert_array_equal(out[0].numpy().astype(bool), ref)
    assert out.sum() > 0
    assert t.mask(None, (37, 53)).shape == (1, 392, 392) and t.mask(None, (37, 53)).sum() == 0


def test_binarize_modes():
    ids = np.array([[0, 1, 2], [0, 0, 3]], np.uint8)
    assert binarize_mask(Image.fromarray(ids, "L")).sum() == 0  # id masks are not 0/255 masks ...
    assert binarize_mask(Image.fromarray(ids, "L"), "nonzero").sum() == 3  # ... read them as label ids
    pal = Image.fromarray(ids, "L").convert("P")
    assert binarize_mask(pal).sum() == 3
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[1, 2, 1] = 255
    assert binarize_mask(Image.fromarray(rgb)).tolist() == [[False] * 3, [False, False, True]]
    assert binarize_mask(Image.fromarray(ids * 255 > 0).convert("1")).sum() == 3
    with pytest.raises(ValueError, match="rule"):
        binarize_mask(pal, "any")


# --- MVTec layout -------------------------------------------------------------------------------------------------


def test_mvtec_layout_parsing(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "mvtec")
    (root / "license.txt").write_text("not a category")
    assert list_categories(f"mvtec:{root}") == ["bottle", "cable"]
    train = build_dataset(f"mvtec:{root}", "train", image_size=64, crop_size=56)
    test = build_dataset(f"mvtec:{root}", "test", image_size=64, crop_size=56)
    assert len(train) == 6 and all(r.label == 0 and r.mask is None for r in train.records)
    assert len(test) == 2 * (2 + 2 * 2) and sum(r.label for r in test.records) == 8
    for r in test.records:
        assert (r.label == 1) == (r.defect != "good") == (r.mask is not None)
        if r.mask:
            assert Path(r.mask).name == Path(r.image).stem + "_mask.png"
            assert Path(r.mask).parent.name == Path(r.image).parent.name == r.defect
    s = test[len(test) - 1]
    assert s["image"].shape == (3, 56, 56) and s["mask"].shape == (1, 56, 56) and s["image"].dtype == torch.float32
    assert s["label"] == 1 and s["category"] == "cable" and s["defect"] == "scratch" and s["path"].endswith(".png")
    good = test[[r.defect for r in test.records].index("good")]
    assert good["label"] == 0 and good["mask"].sum() == 0
    assert test.categories == ["bottle", "cable"]
    per_class = test.subset("cable")
    assert len(per_class) == 6 and per_class.categories == ["cable"]
    one = build_dataset(f"mvtec:{root}", "test", categories="bottle")
    assert one.categories == ["bottle"] and len(one) == 6


def test_mask_and_image_pixels_loaded_exactly(rng, tmp_path):
    root = tmp_path / "m"
    img = _rgb(rng, root / "c" / "test" / "hole" / "000.png")
    truth = _mask(root / "c" / "ground_truth" / "hole" / "000_mask.png", box=(3, 7, 33, 21))
    _rgb(rng, root / "c" / "train" / "good" / "000.png")
    s = MVTecDataset(root, "test", transform=_raw())[0]
    np.testing.assert_array_equal((s["image"].permute(1, 2, 0).numpy() * 255).round(), img)
    np.testing.assert_array_equal(s["mask"][0].numpy().astype(bool), truth)


def test_btad_like_layout(rng, tmp_path):
    """Normal folders named ``ok``, .bmp images, masks with the image's own stem (.png and .bmp)."""
    root = tmp_path / "btad"
    _mvtec(rng, root, categories=("01",), defects=("ko",), normal="ok", ext=".bmp", mask_name="{stem}.png")
    _mvtec(rng, root, categories=("03",), defects=("ko",), normal="ok", ext=".bmp", mask_name="{stem}.bmp")
    ds = build_dataset(f"btad:{root}", "test", image_size=32, crop_size=None)
    assert ds.categories == ["01", "03"] and len(ds) == 8
    assert sorted((r.category, r.label) for r in ds.records) == [(c, y) for c in ("01", "03") for y in (0, 0, 1, 1)]
    assert {Path(r.mask).suffix for r in ds.records if r.mask} == {".png", ".bmp"}
    assert all(ds[i]["mask"].sum() > 0 for i in range(len(ds)) if ds.records[i].label)
    assert {r.defect for r in ds.records} == {"good", "ko"}


def test_unknown_category_lists_found(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m")
    with pytest.raises(ValueError, match=r"unknown categor.*'screw'.*found: \['bottle', 'cable'\]"):
        build_dataset(f"mvtec:{root}", categories=["bottle", "screw"])
    with pytest.raises(ValueError, match="format"):
        build_dataset(f"mvtech:{root}")
    with pytest.raises(ValueError, match="split"):
        build_dataset(f"mvtec:{root}", split="val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_dataset(f"mvtec:{tmp_path / 'nowhere'}")


# --- bad files ----------------------------------------------------------------------------------------------------


def test_missing_mask_error_and_skip(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m", categories=("bottle",))
    missing = root / "bottle" / "ground_truth" / "crack" / "001_mask.png"
    missing.unlink()
    image = root / "bottle" / "test" / "crack" / "001.png"
    with pytest.raises(BadFileError, match="no ground-truth mask") as info:
        build_dataset(f"mvtec:{root}", "test")
    assert str(image) in str(info.value) and info.value.path == str(image)
    with pytest.warns(UserWarning, match=str(image)):
        ds = build_dataset(f"mvtec:{root}", "test", on_bad_file="skip")
    assert len(ds) == 2 + 3 and str(image) not in [r.image for r in ds.records]


def test_corrupt_image_error_and_skip(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m", categories=("bottle",))
    bad = root / "bottle" / "test" / "good" / "001.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    ds = build_dataset(f"mvtec:{root}", "test", image_size=32, crop_size=None)
    index = [r.image for r in ds.records].index(str(bad))
    with pytest.raises(BadFileError, match="unreadable image") as info:
        ds[index]
    assert str(bad) in str(info.value)
    # in a DataLoader worker: the error reaches the main process with the file named
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=1)
    with pytest.raises(BadFileError, match=str(bad)):
        list(loader)
    skip = build_dataset(f"mvtec:{root}", "test", image_size=32, crop_size=None, on_bad_file="skip")
    with pytest.warns(UserWarning, match=str(bad)):
        assert skip[index] is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(torch.utils.data.DataLoader(skip, batch_size=4, collate_fn=collate))
    assert sum(len(b["label"]) for b in batches) == len(skip) - 1


def test_mask_size_mismatch(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m", categories=("bottle",), n_def=1, defects=("crack",))
    mask = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
    _mask(mask, size=(41, 48))
    ds = build_dataset(f"mvtec:{root}", "test")
    with pytest.raises(BadFileError, match="mask size") as info:
        ds[[r.mask for r in ds.records].index(str(mask))]
    assert str(mask) in str(info.value)


def test_missing_split_and_empty_category(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m")
    (root / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(BadFileError, match="no images") as info:
        build_dataset(f"mvtec:{root}", "train")
    assert str(root / "empty" / "train") in str(info.value)
    with pytest.warns(UserWarning, match="has no 'test' split"):
        ds = build_dataset(f"mvtec:{root}", "test", on_bad_file="skip")
    assert ds.categories == ["bottle", "cable"]


def test_collate():
    samples = [{"image": torch.zeros(3, 4, 4), "mask": torch.ones(1, 4, 4), "label": i, "category": "a",
                "defect": "good", "path": f"p{i}"} for i in range(3)]
    batch = collate([samples[0], None, samples[1], samples[2]])
    assert batch["image"].shape == (3, 3, 4, 4) and batch["mask"].shape == (3, 1, 4, 4)
    assert batch["label"].tolist() == [0, 1, 2] and batch["path"] == ["p0", "p1", "p2"]
    assert batch["category"] == ["a"] * 3
    assert collate([None, None]) is None


# --- VisA raw and Real-IAD ------------------------------------------------------------------------------------------


def _visa(rng, root):
    rows = ["object,split,label,image,mask"]
    for obj in ("pcb1", "candle"):
        for i in range(3):
            p = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            _rgb(rng, root / p)
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{p},")
        for i in range(2):
            p, m = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
            _rgb(rng, root / p)
            _mask(root / m, value=i + 1)  # label-id mask: values 1, 2 (not 0/255)
            rows.append(f"{obj},test,anomaly,{p},{m}")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa_raw_csv(rng, tmp_path):
    root = _visa(rng, tmp_path / "VisA")
    assert list_categories(f"visa_raw:{root}") == ["candle", "pcb1"]
    train = build_dataset(f"visa_raw:{root}", "train", image_size=32, crop_size=None)
    test = build_dataset(f"visa_raw:{root}", "test", image_size=32, crop_size=None)
    assert len(train) == 4 and len(test) == 6 and train.categories == ["pcb1", "candle"]
    anomalous = [i for i, r in enumerate(test.records) if r.label]
    assert len(anomalous) == 4 and all(test.records[i].defect == "anomaly" for i in anomalous)
    for i in range(len(test)):
        s = test[i]
        assert (s["mask"].sum() > 0) == bool(s["label"])  # id masks with value 1 or 2 are defects
    only = VisARawDataset(root, "test", categories="candle")
    assert only.categories == ["candle"]
    os.remove(root / "candle/Data/Masks/Anomaly/001.png")
    with pytest.raises(BadFileError, match="candle/Data/Masks/Anomaly/001.png"):
        build_dataset(f"visa_raw:{root}", "test")


def _realiad(rng, root, json_dir, image_dir, normal_class="OK"):
    for cat in ("audiojack", "toy"):
        base = root / image_dir / cat
        entries = {"train": [], "test": []}
        for i in range(2):
            p = f"OK/S{i:04d}/{cat}_{i:04d}_OK_C1_2023.jpg"
            _rgb(rng, base / p)
            entries["train"].append({"category": cat, "anomaly_class": normal_class, "image_path": p,
                                     "mask_path": None})
        p = f"OK/S0009/{cat}_0009_OK_C2_2023.jpg"
        _rgb(rng, base / p)
        entries["test"].append({"category": cat, "anomaly_class": normal_class, "image_path": p, "mask_path": None})
        for view in (1, 2):  # an anomalous object: view 1 shows the defect, view 2 does not (null mask)
            p = f"NG/HS/S0044/{cat}_0044_NG_HS_C{view}_2023.jpg"
            _rgb(rng, base / p)
            m = None
            if view == 1:
                m = p.replace(".jpg", ".png")
                _mask(base / m)
            entries["test"].append({"category": cat, "anomaly_class": "HS", "image_path": p, "mask_path": m})
        meta = {"meta": {"prefix": f"{cat}/", "normal_class": normal_class}, **entries}
        (root / json_dir).mkdir(parents=True, exist_ok=True)
        (root / json_dir / f"{cat}.json").write_text(json.dumps(meta))
    return root


@pytest.mark.parametrize("json_dir,image_dir", [("realiad_jsons/realiad_jsons", "realiad_1024"),
                                                ("realiad_jsons", "realiad_256"),
                                                ("Real-IAD_Variety_jsons", "realiadvariety_1024")])
def test_realiad_json(rng, tmp_path, json_dir, image_dir):
    root = _realiad(rng, tmp_path / "Real-IAD", json_dir, image_dir)
    assert list_categories(f"realiad:{root}") == ["audiojack", "toy"]
    train = build_dataset(f"realiad:{root}", "train", image_size=32, crop_size=None)
    test = build_dataset(f"realiad:{root}", "test", image_size=32, crop_size=None)
    assert len(train) == 4 and all(r.label == 0 for r in train.records)
    assert [(r.label, r.defect) for r in test.records] == [(0, "good"), (1, "HS"), (0, "good")] * 2
    assert all(str(root / image_dir) in r.image for r in test.records)
    for i in range(len(test)):
        assert (test[i]["mask"].sum() > 0) == bool(test[i]["label"])


def test_realiad_errors(rng, tmp_path):
    root = _realiad(rng, tmp_path / "R", "realiad_jsons", "realiad_1024")
    with pytest.raises(ValueError, match=r"found: \['audiojack', 'toy'\]"):
        RealIADDataset(root, "test", categories="pcb")
    gone = root / "realiad_1024" / "toy" / "NG/HS/S0044/toy_0044_NG_HS_C1_2023.png"
    gone.unlink()
    with pytest.raises(BadFileError, match=str(gone)):
        RealIADDataset(root, "test")
    with pytest.warns(UserWarning, match=str(gone)):
        assert len(RealIADDataset(root, "test", on_bad_file="skip")) == 5
    (root / "realiad_jsons" / "toy.json").write_text("{not json")
    with pytest.raises(BadFileError, match="toy.json"):
        RealIADDataset(root, "train")


# --- few-shot ----------------------------------------------------------------------------------------------------


def test_fewshot_expand(rng, tmp_path):
    root = _mvtec(rng, tmp_path / "m", n_train=5)
    train = build_dataset(f"mvtec:{root}", "train", image_size=32, crop_size=None)
    fs = fewshot_expand(train, 2, seed=3)
    views = fewshot_augmentations()
    assert len(views) == 22 and len(fs) == 2 * 2 * 22
    assert fs.indices == fewshot_expand(train, 2, seed=3).indices
    assert fs.indices != fewshot_expand(train, 2, seed=4).indices or fs.indices != fewshot_expand(train, 2, 5).indices
    assert [train.records[i].category for i in fs.indices] == ["bottle", "bottle", "cable", "cable"]
    base = train[fs.indices[1]]
    names = [n for n, _ in views]
    item = {n: fs[22 + k] for k, n in enumerate(names)}
    torch.testing.assert_close(item["identity"]["image"], base["image"])
    torch.testing.assert_close(item["hflip"]["image"], base["image"].flip(-1))
    torch.testing.assert_close(item["rot90x2"]["image"], base["image"].flip(-1).flip(-2))
    quarter = item["rot90x1"]["image"]
    assert any(torch.allclose(quarter, base["image"].rot90(k, dims=(-2, -1)), atol=1e-5) for k in (1, -1))
    grey = item["grey"]["image"] * torch.tensor(STD, dtype=torch.float32).view(3, 1, 1) \
        + torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    torch.testing.assert_close(grey[0], grey[1]) and torch.testing.assert_close(grey[1], grey[2])
    rotated = item["rotate+4pi/16"]["image"]
    assert rotated.shape == base["image"].shape and not torch.allclose(rotated, base["image"])
    # a rotation by pi/4 keeps the centre pixel
    torch.testing.assert_close(rotated[:, 15:17, 15:17].mean(), base["image"][:, 15:17, 15:17].mean(), atol=0.3,
                               rtol=0)
    assert item["translate(+0.2,+0.2)"]["mask"].sum() == 0 and item["identity"]["label"] == 0
    with pytest.raises(ValueError, match="fewer than k=6"):
        fewshot_expand(train, 6)


# --- synthetic generator --------------------------------------------------------------------------------------------


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(tmp_path):
    kw = {"n_train": 3, "n_test": 4, "size": 96}
    a = _files(synthetic.generate(tmp_path / "a", **kw))
    b = _files(synthetic.generate(tmp_path / "b", **kw))
    c = _files(synthetic.generate(tmp_path / "c", seed=1, **kw))
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a if k.endswith(".png") and "mask" not in k)


def test_synthetic_layout_and_masks(tmp_path):
    root = synthetic.generate(tmp_path / "syn", n_train=4, n_test=8, size=128, anomaly_fraction=0.5)
    meta = json.loads((root / synthetic.META_FILE).read_text())
    assert meta["params"]["seed"] == 0 and sorted(meta["categories"]) == sorted(synthetic.DEFAULT_CATEGORIES)
    assert list_categories(f"mvtec:{root}") == sorted(synthetic.DEFAULT_CATEGORIES)
    train = MVTecDataset(root, "train", transform=_raw())
    test = MVTecDataset(root, "test", transform=_raw())
    assert len(train) == 16 and len(test) == 32 and sum(r.label for r in test.records) == 16
    for c in synthetic.DEFAULT_CATEGORIES:
        assert {r.defect for r in test.records if r.category == c} == {"good", *synthetic.CATEGORIES[c]}
    for i in range(len(test)):
        s = test[i]
        assert s["image"].shape == (3, 128, 128)
        area = s["mask"].mean().item()
        assert (0.0003 < area < 0.08) if s["label"] else area == 0
    # training images are all different, and differ a lot (poses, phases, colours): nothing to memorise
    imgs = torch.stack([train[i]["image"] for i in range(4)])
    diffs = [(imgs[i] - imgs[j]).abs().mean().item() for i in range(4) for j in range(i)]
    assert min(diffs) > 0.03
    # same parameters: reused; other parameters: refuses unless overwrite
    stamp = (root / "screw" / "train" / "good" / "000.png").stat().st_mtime_ns
    synthetic.generate(root, n_train=4, n_test=8, size=128)
    assert (root / "screw" / "train" / "good" / "000.png").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic.generate(root, n_train=2, n_test=2, size=128)
    synthetic.generate(root, categories=("wood",), n_train=2, n_test=2, size=128, overwrite=True)
    assert list_categories(f"mvtec:{root}") == ["wood"] and len(MVTecDataset(root, "train")) == 2


@pytest.mark.parametrize("category", list(synthetic.CATEGORIES))
def test_synthetic_exact_masks(category):
    for defect in synthetic.CATEGORIES[category]:
        for seed in range(3):
            s = synthetic.make_image(category, np.random.default_rng([seed, 7]), 160, defect)
            changed = (s.image != s.clean).any(axis=2)
            assert s.mask.dtype == bool and s.mask.any(), (category, defect, seed)
            np.testing.assert_array_equal(s.mask, changed, err_msg=f"{category}/{defect}/{seed}")
            diff = np.abs(s.image.astype(int) - s.clean.astype(int)).max(axis=2)
            if defect in synthetic.LOCAL_DEFECTS:
                assert diff[s.mask].min() >= synthetic.MIN_DELTA
                assert (s.image[~s.mask] == s.clean[~s.mask]).all()
            assert diff[s.mask].mean() >= 12, f"{category}/{defect}: defect too faint"
            assert 0.0003 < s.mask.mean() < 0.08, f"{category}/{defect}: area {s.mask.mean()}"
    clean = synthetic.make_image(category, np.random.default_rng(0), 160)
    assert not clean.mask.any() and clean.image is clean.clean and clean.defect == "good"
    again = synthetic.make_image(category, np.random.default_rng(0), 160)
    np.testing.assert_array_equal(clean.image, again.image)


def test_synthetic_errors(tmp_path):
    with pytest.raises(ValueError, match="available"):
        synthetic.make_image("bottle", np.random.default_rng(0))
    with pytest.raises(ValueError, match="no defect 'hole'"):
        synthetic.make_image("screw", np.random.default_rng(0), defect="hole")
    with pytest.raises(ValueError, match="unknown synthetic category"):
        synthetic.generate(tmp_path, categories=("fabric", "bottle"))


# --- real data ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL.is_dir(), reason="real MVTec AD subset not available")
def test_real_mvtec_reduced():
    spec = f"mvtec:{REAL}"
    assert list_categories(spec) == ["hazelnut", "transistor"]
    train, test = build_dataset(spec, "train"), build_dataset(spec, "test")
    for c in ("hazelnut", "transistor"):
        assert len(train.subset(c)) == 50 and len(test.subset(c)) == 10
    native = MVTecDataset(REAL, "test", transform=_raw())
    for i in range(len(test)):
        s, n = test[i], native[i]
        assert s["image"].shape == (3, 392, 392) and -2.2 < s["image"].min() and s["image"].max() < 2.7
        assert set(s["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (n["mask"].sum() > 0) == bool(n["label"]) and n["label"] == (s["defect"] != "good")
    batch = collate([test[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 392, 392) and batch["category"] == ["hazelnut"] * 4
