"""Anomaly-detection datasets: MVTec layout (MVTec AD, MPDD, BTAD, prepared VisA), raw VisA, Real-IAD.

Every dataset indexes its files once at construction (cheap existence checks) into :class:`Record` s and
loads lazily. A sample is a dict::

    {"image": float32 [3, H, W] (normalised), "mask": float32 [1, H, W] in {0, 1},
     "label": int (0 normal, 1 anomalous), "category": str, "defect": str ("good" for normal), "path": str}

Multi-class ("one for all") is the default: all categories are concatenated and each sample carries its
category; :meth:`AnomalyDataset.subset` gives per-class datasets.

Bad or missing files (``on_bad_file``): ``"error"`` raises :class:`BadFileError` naming the file (at
construction for missing images/masks, at load time for unreadable images and mask/image size mismatches);
``"skip"`` drops the record at construction, or makes ``__getitem__`` return ``None`` at load time (which
:func:`collate` filters), with a ``warnings.warn`` naming the file.
"""
from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fastproto.data.transforms import (
    Preprocess,
    binarize_mask,
    fewshot_augmentations,
    to_grey,
)

__all__ = [
    "FORMATS",
    "AnomalyDataset",
    "BadFileError",
    "FewShotDataset",
    "MVTecDataset",
    "RealIADDataset",
    "Record",
    "VisARawDataset",
    "build_dataset",
    "collate",
    "fewshot_expand",
    "list_categories",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL_DIRS = ("good", "ok")  # MVTec AD / MPDD / VisA-prepared use "good", BTAD uses "ok"
# ground_truth/<type>/ names tried for test/<type>/<stem>.<ext>, in order: MVTec AD / MPDD ("_mask.png"),
# prepared VisA and BTAD 01/02 (same stem, ".png"), BTAD 03 (".bmp").
MASK_NAMES = ("{stem}_mask.png", "{stem}_mask.bmp", "{stem}.png", "{stem}.bmp")
SPLITS = ("train", "test")
ON_BAD_FILE = ("error", "skip")


class BadFileError(ValueError):
    """A missing, unreadable or inconsistent dataset file. The message names the file; ``path`` holds it
    (``None`` after a DataLoader worker re-raised the error in the main process, message kept)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)


def _bad(path: str | os.PathLike, reason: str) -> BadFileError:
    return BadFileError(f"{reason}: {path}", path)


@dataclass(frozen=True)
class Record:
    """One indexed sample: paths and labels, nothing loaded."""

    image: str
    mask: str | None
    label: int
    category: str
    defect: str


def _check_choice(value, choices, name):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _select(found: Sequence[str], categories: str | Iterable[str] | None, where: str) -> list[str]:
    """The requested categories (all found ones for ``None``); unknown names raise, listing the found ones."""
    if not found:
        raise FileNotFoundError(f"no categories found in {where}")
    if categories is None:
        return list(found)
    wanted = [categories] if isinstance(categories, str) else list(categories)
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"unknown categor{'y' if len(missing) == 1 else 'ies'} {missing} in {where}; "
                         f"found: {list(found)}")
    if not wanted:
        raise ValueError("categories is empty")
    return list(dict.fromkeys(wanted))


def _open_image(path: str) -> Image.Image:
    """Open and decode ``path`` fully, so that truncated or corrupt files fail here with their name."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise _bad(path, "missing file") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _bad(path, f"unreadable image ({type(e).__name__}: {e})") from None


class AnomalyDataset(torch.utils.data.Dataset):
    """A list of :class:`Record` s plus preprocessing; the base of every format.

    Args:
        records: the indexed samples.
        transform: :class:`~fastproto.data.transforms.Preprocess` (default: 448 -> crop 392, ImageNet norm).
        on_bad_file: ``"error"`` or ``"skip"`` (see the module docstring).
        mask_rule: how ground-truth images are binarised (:func:`~fastproto.data.transforms.binarize_mask`).
    """

    def __init__(self, records: Sequence[Record], transform: Preprocess | None = None, on_bad_file: str = "error",
                 mask_rule: str = "half"):
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.records = list(records)
        self.transform = transform if transform is not None else Preprocess()
        self.on_bad_file = on_bad_file
        self.mask_rule = mask_rule
        if not self.records:
            raise ValueError(f"{type(self).__name__}: no samples")

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        n_anom = sum(r.label for r in self.records)
        return (f"{type(self).__name__}({len(self)} samples, {n_anom} anomalous, categories={self.categories}, "
                f"{self.transform})")

    @property
    def categories(self) -> list[str]:
        """Categories present, in order of first appearance."""
        return list(dict.fromkeys(r.category for r in self.records))

    def subset(self, categories: str | Iterable[str]) -> AnomalyDataset:
        """A dataset restricted to ``categories`` (per-class training / evaluation); shares the transform."""
        keep = set(_select(self.categories, categories, type(self).__name__))
        return AnomalyDataset([r for r in self.records if r.category in keep], self.transform, self.on_bad_file,
                              self.mask_rule)

    def load(self, index: int) -> tuple[Image.Image, Image.Image | None]:
        """The raw image and ground-truth image of record ``index``; raises :class:`BadFileError`."""
        rec = self.records[index]
        image = _open_image(rec.image)
        if rec.mask is None:
            return image, None
        mask = _open_image(rec.mask)
        if mask.size != image.size:
            raise _bad(rec.mask, f"mask size {mask.size} differs from image size {image.size} of {rec.image}")
        return image, mask

    def load_extra(self, index: int, image: Image.Image) -> dict:
        """Further fields of sample ``index`` (e.g. an RGB-D dataset's depth); may raise BadFileError."""
        return {}

    def __getitem__(self, index: int) -> dict | None:
        rec = self.records[index]
        try:
            image, mask = self.load(index)
            extra = self.load_extra(index, image)
        except BadFileError as e:
            if self.on_bad_file == "error":
                raise
            warnings.warn(f"skipping sample {index} ({rec.category}): {e}", stacklevel=2)
            return None
        size_hw = (image.height, image.width)
        binary = None if mask is None else binarize_mask(mask, self.mask_rule)
        return {"image": self.transform.image(image), "mask": self.transform.mask(binary, size_hw),
                "label": rec.label, "category": rec.category, "defect": rec.defect, "path": rec.image, **extra}


def _reject(problem: BadFileError, on_bad_file: str) -> None:
    """Construction-time policy for a bad record: raise, or warn (the caller drops the record)."""
    if on_bad_file == "error":
        raise problem
    warnings.warn(f"skipping: {problem}", stacklevel=3)


# --- MVTec layout ------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _mvtec_categories(root: Path) -> list[str]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root does not exist: {root}")
    return sorted(d.name for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and ((d / "train").is_dir() or (d / "test").is_dir()))


def _type_dirs(root: Path, category: str, split: str, on_bad_file: str) -> list[Path]:
    """The defect-type folders of ``<root>/<category>/<split>`` in MVTec layout, sorted (hidden ones skipped); a
    missing split is rejected per ``on_bad_file`` (then no folders)."""
    split_dir = root / category / split
    if not split_dir.is_dir():
        _reject(_bad(split_dir, f"category {category!r} has no {split!r} split"), on_bad_file)
        return []
    return sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def _mvtec_records(root: Path, category: str, split: str, on_bad_file: str) -> list[Record]:
    records = []
    for type_dir in _type_dirs(root, category, split, on_bad_file):
        normal = split == "train" or type_dir.name.lower() in NORMAL_DIRS
        gt_dir = root / category / "ground_truth" / type_dir.name
        gt_files = set() if normal or not gt_dir.is_dir() else set(os.listdir(gt_dir))
        for name in sorted(filter(_is_image, os.listdir(type_dir))):
            image = type_dir / name
            if normal:
                records.append(Record(str(image), None, 0, category, "good"))
                continue
            stem = os.path.splitext(name)[0]
            mask = next((gt_dir / m for m in (p.format(stem=stem) for p in MASK_NAMES) if m in gt_files), None)
            if mask is None:
                tried = ", ".join(p.format(stem=stem) for p in MASK_NAMES)
                _reject(_bad(image, f"no ground-truth mask for anomalous image (looked in {gt_dir} for {tried})"),
                        on_bad_file)
                continue
            records.append(Record(str(image), str(mask), 1, category, type_dir.name))
    split_dir = root / category / split
    if not records and split_dir.is_dir():  # a missing split was rejected already
        _reject(_bad(split_dir, f"no images in the {split!r} split of category {category!r}"), on_bad_file)
    return records


class MVTecDataset(AnomalyDataset):
    """MVTec-layout dataset: ``<root>/<category>/{train/good, test/<type>, ground_truth/<type>/<mask>}``.

    Used by MVTec AD, MPDD, BTAD (normal folders named ``ok``; masks ``<stem>.png`` / ``<stem>.bmp``) and
    VisA prepared with the spot-diff/Dinomaly script (``VisA_pytorch/1cls``). Every image under ``train/``
    is normal; under ``test/``, folders named ``good``/``ok`` are normal and every other folder is a defect
    type whose images need a mask in ``ground_truth/<type>/`` (names tried: :data:`MASK_NAMES`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", categories: str | Iterable[str] | None = None,
                 transform: Preprocess | None = None, on_bad_file: str = "error"):
        _check_choice(split, SPLITS, "split")
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.root, self.split = Path(root), split
        cats = _select(_mvtec_categories(self.root), categories, str(self.root))
        records = [r for c in cats for r in _mvtec_records(self.root, c, split, on_bad_file)]
        super().__init__(records, transform, on_bad_file)


# --- raw VisA (split_csv) -----------------------------------------------------------------------------------

_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def _read_visa_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"VisA split file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in _VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise _bad(path, f"VisA split csv lacks columns {missing} (has {reader.fieldnames})")
        return [{k: (row[k] or "").strip() for k in _VISA_COLUMNS} for row in reader]


class VisARawDataset(AnomalyDataset):
    """Raw VisA (``VisA_20220922.tar`` extracted) indexed by ``<root>/split_csv/1cls.csv``.

    csv columns ``object,split,label,image,mask``; ``label`` is ``normal`` or ``anomaly``; paths are relative
    to ``root``; masks are label-id images (any non-zero value is a defect, as ADer / spot-diff binarise).
    VisA has no defect-type names: anomalous samples get ``defect="anomaly"``.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", categories: str | Iterable[str] | None = None,
                 transform: Preprocess | None = None, on_bad_file: str = "error",
                 csv_file: str | os.PathLike = "split_csv/1cls.csv"):
        _check_choice(split, SPLITS, "split")
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.root, self.split = Path(root), split
        self.csv_file = self.root / csv_file
        rows = _read_visa_csv(self.csv_file)
        cats = _select(sorted({r["object"] for r in rows}), categories, str(self.csv_file))
        records = []
        for row in rows:
            if row["split"] != split or row["object"] not in cats:
                continue
            if row["label"] not in ("normal", "anomaly"):
                raise _bad(self.csv_file, f"label {row['label']!r} is neither 'normal' nor 'anomaly' "
                                                  f"(image {row['image']})")
            anomalous = row["label"] == "anomaly"
            image = self.root / row["image"]
            mask = self.root / row["mask"] if anomalous and row["mask"] else None
            if not image.is_file():
                _reject(_bad(image, "missing image"), on_bad_file)
            elif anomalous and (mask is None or not mask.is_file()):
                reason = "missing ground-truth mask for anomalous image" + ("" if mask else " (empty mask column)")
                _reject(_bad(mask or image, reason), on_bad_file)
            else:
                records.append(Record(str(image), None if mask is None else str(mask), int(anomalous),
                                      row["object"], "anomaly" if anomalous else "good"))
        super().__init__(records, transform, on_bad_file, mask_rule="nonzero")


# --- Real-IAD / Real-IAD Variety (JSON meta files) ----------------------------------------------------------

_REALIAD_JSON_DIRS = ("realiad_jsons/realiad_jsons", "realiad_jsons", "Real-IAD_Variety_jsons",
                      "realiadvariety_jsons/Real-IAD_Variety_jsons", "realiadvariety_jsons", ".")
_REALIAD_IMAGE_DIRS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw", "realiadvariety_1024",
                       "realiadvariety_512", "realiadvariety_256", "realiadvariety_raw", ".")


def _first_dir(root: Path, candidates: Sequence[str], want_json: bool) -> Path:
    for c in candidates:
        d = root / c
        if d.is_dir() and (not want_json or any(n.endswith(".json") for n in os.listdir(d))):
            return d
    kind = "JSON meta files" if want_json else "images"
    raise FileNotFoundError(f"no Real-IAD {kind} under {root} (looked in {list(candidates)})")


def _realiad_json_dir(root: Path, json_dir: str | os.PathLike | None) -> tuple[Path, list[str]]:
    """The folder of the per-category JSON files and the categories (file stems) in it."""
    d = root / json_dir if json_dir is not None else _first_dir(root, _REALIAD_JSON_DIRS, True)
    if not d.is_dir():
        raise FileNotFoundError(f"Real-IAD JSON folder does not exist: {d}")
    return d, sorted(p[:-5] for p in os.listdir(d) if p.endswith(".json"))


class RealIADDataset(AnomalyDataset):
    """Real-IAD and Real-IAD Variety via their per-category JSON meta files.

    JSON: ``{"meta": {"normal_class": "OK", ...}, "train": [...], "test": [...]}``, entries
    ``{category, anomaly_class, image_path, mask_path}`` with paths relative to the category's image folder.
    A view is normal when ``mask_path`` is null or ``anomaly_class`` is the normal class (Real-IAD Variety
    has anomalous objects whose views show no defect: those are normal views, as in Dinomaly2). Each view
    is an independent sample.

    Args:
        root: the dataset folder. ``json_dir`` defaults to the first of :data:`_REALIAD_JSON_DIRS` holding
            ``*.json`` files, ``image_dir`` to the first existing of :data:`_REALIAD_IMAGE_DIRS` (so the
            1024 px release is preferred, as in Dinomaly / INP-Former); images are
            ``<image_dir>/<category>/<image_path>``, the category being the JSON file's stem.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", categories: str | Iterable[str] | None = None,
                 transform: Preprocess | None = None, on_bad_file: str = "error",
                 json_dir: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None):
        _check_choice(split, SPLITS, "split")
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.root, self.split = Path(root), split
        self.json_dir, found = _realiad_json_dir(self.root, json_dir)
        self.image_dir = self.root / image_dir if image_dir is not None else _first_dir(
            self.root, _REALIAD_IMAGE_DIRS, False)
        records = []
        for cat in _select(found, categories, str(self.json_dir)):
            records += self._category_records(cat, on_bad_file)
        super().__init__(records, transform, on_bad_file)

    def _category_records(self, category: str, on_bad_file: str) -> list[Record]:
        path = self.json_dir / f"{category}.json"
        try:
            with open(path) as f:
                meta = json.load(f)
            normal_class = meta.get("meta", {}).get("normal_class", "OK")
            entries = meta[self.split]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise _bad(path, f"not a Real-IAD meta file ({type(e).__name__}: {e})") from None
        base = self.image_dir / category
        records = []
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("image_path"), str)
                    and isinstance(e.get("mask_path"), (str, type(None)))):
                raise _bad(path, f"malformed {self.split} entry (needs image_path and mask_path): {e!r}")
            image = base / e["image_path"]
            mask_path, defect = e.get("mask_path"), e.get("anomaly_class", normal_class)
            normal = mask_path is None or defect == normal_class
            mask = None if normal else base / mask_path
            if not image.is_file():
                _reject(_bad(image, "missing image"), on_bad_file)
            elif mask is not None and not mask.is_file():
                _reject(_bad(mask, f"missing ground-truth mask for anomalous image {image}"), on_bad_file)
            else:
                records.append(Record(str(image), None if mask is None else str(mask), int(not normal), category,
                                      "good" if normal else str(defect)))
        return records


# --- spec parser --------------------------------------------------------------------------------------------

FORMATS = {"mvtec": MVTecDataset, "mpdd": MVTecDataset, "btad": MVTecDataset, "visa": MVTecDataset,
           "visa_raw": VisARawDataset, "realiad": RealIADDataset}


# RGB-D formats live in fastproto.data.rgbd, which builds on this module: resolved lazily
RGBD_FORMATS = {"mvtec3d": "MVTec3DDataset", "eyecandies": "EyecandiesDataset"}


def _dataset_class(fmt: str) -> type:
    if fmt in RGBD_FORMATS:
        from fastproto.data import rgbd

        return getattr(rgbd, RGBD_FORMATS[fmt])
    return FORMATS[fmt]


def _parse_spec(spec: str) -> tuple[str, Path]:
    fmt, sep, path = str(spec).partition(":")
    known = [*FORMATS, *RGBD_FORMATS]
    if not sep or fmt not in known or not path:
        raise ValueError(f"dataset spec must be '<format>:<path>' with format in {known}, got {spec!r}")
    return fmt, Path(path).expanduser()


def list_categories(spec: str, **kwargs) -> list[str]:
    """Categories available in the dataset ``spec`` (``"<format>:<path>"``); ``kwargs`` as for the format's
    dataset class (e.g. ``csv_file`` for ``visa_raw``, ``json_dir`` for ``realiad``)."""
    fmt, root = _parse_spec(spec)
    if fmt in RGBD_FORMATS or FORMATS[fmt] is MVTecDataset:  # one folder per category, with train/ or test/
        return _mvtec_categories(root)
    if fmt == "visa_raw":
        return sorted({r["object"] for r in _read_visa_csv(root / kwargs.get("csv_file", "split_csv/1cls.csv"))})
    return _realiad_json_dir(root, kwargs.get("json_dir"))[1]


def build_dataset(spec: str, split: str = "train", categories: str | Iterable[str] | None = None,
                  image_size: int | Sequence[int] | None = 448, crop_size: int | Sequence[int] | None = 392,
                  on_bad_file: str = "error", **kwargs) -> AnomalyDataset:
    """Dataset from a spec ``"<format>:<path>"``, format one of :data:`FORMATS`
    (``mvtec|mpdd|btad|visa|visa_raw|realiad``; ``visa`` is the prepared MVTec-layout tree, ``visa_raw`` the
    original release with ``split_csv``, ``realiad`` also reads Real-IAD Variety) or an RGB-D format of
    :data:`RGBD_FORMATS` (``mvtec3d``, ``eyecandies``: :mod:`fastproto.data.rgbd`).

    ``categories=None`` concatenates all categories (multi-class); a name or list selects. ``image_size`` /
    ``crop_size`` configure :class:`~fastproto.data.transforms.Preprocess` (``crop_size=None``: no crop);
    a ready ``transform=`` may be passed instead. Other ``kwargs`` go to the format's dataset class.
    """
    fmt, root = _parse_spec(spec)
    transform = kwargs.pop("transform", None) or Preprocess(image_size, crop_size)
    return _dataset_class(fmt)(root, split=split, categories=categories, transform=transform,
                               on_bad_file=on_bad_file, **kwargs)


# --- batching and few-shot ----------------------------------------------------------------------------------


def collate(samples: Sequence[dict | None]) -> dict | None:
    """Batch sample dicts: tensors stacked, numbers as a tensor, strings (and anything else) as lists.

    ``None`` samples (dropped with ``on_bad_file="skip"``) are removed; a batch of only ``None`` gives
    ``None``, which a training / evaluation loop should skip.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


class FewShotDataset(torch.utils.data.Dataset):
    """``base`` restricted to ``indices``, each index expanded into the 22 INP-Former few-shot views
    (:func:`~fastproto.data.transforms.fewshot_augmentations`); item ``i`` is view ``i % 22`` of
    ``base[indices[i // 22]]``. Geometric views are applied to the normalised image (they commute with the
    per-channel normalisation) and to the mask (nearest); the grey view is taken in [0, 1] pixel space."""

    def __init__(self, base: AnomalyDataset, indices: Sequence[int]):
        self.base, self.indices = base, list(indices)
        self.views = fewshot_augmentations()

    def __len__(self) -> int:
        return len(self.indices) * len(self.views)

    def __getitem__(self, index: int) -> dict | None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        sample = self.base[self.indices[index // len(self.views)]]
        if sample is None:
            return None
        _, fn = self.views[index % len(self.views)]
        sample = dict(sample)
        if fn is None:
            t = self.base.transform
            sample["image"] = t.normalize(to_grey(t.denormalize(sample["image"])))
        else:
            sample["image"] = fn(sample["image"], "bilinear")
            sample["mask"] = fn(sample["mask"], "nearest")
        return sample


def fewshot_expand(dataset: AnomalyDataset, k: int, seed: int = 0) -> FewShotDataset:
    """INP-Former's few-shot training set: ``k`` normal images drawn per category (with ``seed``), each
    expanded into 22 augmented views (original, 8 small rotations, 8 translations, horizontal flip, grey,
    3 right-angle rotations; see :func:`~fastproto.data.transforms.fewshot_augmentations`)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for cat in dataset.categories:
        pool = [i for i, r in enumerate(dataset.records) if r.category == cat and r.label == 0]
        if len(pool) < k:
            raise ValueError(f"category {cat!r} has {len(pool)} normal images, fewer than k={k}")
        chosen += [pool[j] for j in torch.randperm(len(pool), generator=gen)[:k].tolist()]
    return FewShotDataset(dataset, chosen)
