"""RGB-D anomaly-detection data: MVTec 3D-AD and Eyecandies loaders, depth preprocessing, a synthetic generator.

A sample is the dict of :mod:`fastproto.data.datasets` plus the depth image::

    {"image": float32 [3, H, W] (RGB, normalised), "depth": float32 [3, H, W] (depth image, normalised),
     "mask": float32 [1, H, W], "label": int, "category": str, "defect": str, "path": str (the RGB file)}

Depth preprocessing (:func:`depth_image`), re-stating the BTF / M3DM / CFM / Dinomaly2 pipeline:

1. **Background plane removal** (:func:`remove_background_plane`): the plane ``z = a x + b y + c`` is fitted by
   least squares to the valid points of the ``border``-pixel frame (10 px, as the reference pipeline), refitted
   twice on the border points within ``3 x`` the median residual (a RANSAC-free trimmed fit: robust to an
   object touching the border); every point closer than ``distance`` (0.005, the reference threshold) to the
   plane becomes missing. The reference pipeline also zero-pads to a square and keeps the largest DBSCAN
   cluster; neither is done here (the resize to a square follows, and isolated specks are rare after the
   plane is gone).
2. **Missing points** (``z == 0`` or not finite, MVTec 3D-AD's convention) of the sensor are filled
   ``fill_iters`` times (3) with the mean of their valid 3 x 3 neighbours (Dinomaly2's hole filling); unlike
   Dinomaly2, points removed as background are not filled (its filling grows the object by 3 pixels); what is
   still missing stays missing.
3. **Encoding** (``depth_encoding``): ``"inverse"`` (default, Dinomaly2's scaling without its colour map):
   ``z' = (z - min) / (max - min)`` over the valid points of the image, ``v = 1 - 0.8 z'`` (near = bright,
   1 .. 0.2) and missing points 0, so that foreground never looks like background; ``"raw"``: the metric
   ``z`` itself, missing 0 (M3DM's ``organized_pc[:, :, 2]``). The value is repeated on 3 channels, resized
   with **nearest** neighbour (M3DM; no interpolation across missing points), centre-cropped like the RGB
   image and normalised with the same mean / std as the RGB image (Dinomaly2 normalises both with ImageNet
   statistics).

Bad input (``on_bad_file`` as in :mod:`fastproto.data.datasets`): an RGB file without its point map or a
point map without its RGB file (found at construction), an unreadable TIFF, a point map that is not
``[H, W, 3]`` of the RGB image's size, or one with no valid point (before or after plane removal) raises
:class:`~fastproto.data.datasets.BadFileError` naming the file, or is skipped with a warning.

:func:`generate_rgbd` writes a synthetic MVTec 3D-AD-layout dataset with depth-only, colour-only and
cross-modal defects (see its docstring).
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

from fastproto.data.datasets import (
    ON_BAD_FILE,
    AnomalyDataset,
    Record,
    _bad,
    _check_choice,
    _open_image,
    _reject,
    _select,
    _type_dirs,
)
from fastproto.data.synthetic import generator_params, prepare_root, write_meta
from fastproto.data.transforms import Preprocess, binarize_mask

__all__ = [
    "DEPTH_ENCODINGS",
    "RGBD_CATEGORIES",
    "EyecandiesDataset",
    "MVTec3DDataset",
    "RGBDDataset",
    "RGBDRecord",
    "depth_image",
    "fill_missing",
    "fit_plane",
    "generate_rgbd",
    "make_rgbd_sample",
    "read_xyz",
    "remove_background_plane",
]

DEPTH_ENCODINGS = ("inverse", "raw")
MVTEC3D_SPLITS = ("train", "validation", "test")
EYECANDIES_SPLITS = {"train": "train", "validation": "val", "test": "test_public"}


# --- depth preprocessing --------------------------------------------------------------------------------------


def _valid(xyz: np.ndarray) -> np.ndarray:
    z = xyz[..., 2]
    return np.isfinite(xyz).all(axis=-1) & (z != 0)


def fit_plane(points: np.ndarray, refits: int = 2) -> np.ndarray:
    """Least-squares plane ``z = a x + b y + c`` of ``points`` [K, 3] -> ``(a, b, c)``; then ``refits`` times
    refitted on the points within 3 x the median absolute residual (trimmed fit, no RANSAC)."""
    if points.shape[0] < 3:
        raise ValueError(f"fit_plane: need at least 3 points, got {points.shape[0]}")
    pts = points.astype(np.float64)
    design = np.column_stack([pts[:, 0], pts[:, 1], np.ones(len(pts))])
    keep = np.ones(len(pts), dtype=bool)
    coef = np.zeros(3)
    for _ in range(refits + 1):
        coef = np.linalg.lstsq(design[keep], pts[keep, 2], rcond=None)[0]
        res = np.abs(design @ coef - pts[:, 2])
        thresh = 3 * np.median(res[keep])
        new = res <= max(thresh, 1e-12)
        if new.sum() < 3 or (new == keep).all():
            break
        keep = new
    return coef


def remove_background_plane(xyz: np.ndarray, border: int = 10, distance: float = 0.005,
                            refits: int = 2) -> np.ndarray:
    """A copy of the point map ``xyz`` [H, W, 3] with the points within ``distance`` of the plane fitted to the
    ``border``-pixel frame set to 0 (missing). Raises ValueError when the frame has fewer than 3 valid points."""
    valid = _valid(xyz)
    frame = np.zeros(valid.shape, dtype=bool)
    frame[:border], frame[-border:], frame[:, :border], frame[:, -border:] = True, True, True, True
    pts = xyz[frame & valid]
    if pts.shape[0] < 3:
        raise ValueError(f"the {border}-pixel border has {pts.shape[0]} valid points: no plane to fit")
    a, b, c = fit_plane(pts, refits)
    x, y, z = (xyz[..., i].astype(np.float64) for i in range(3))
    dist = np.abs(a * x + b * y + c - z) / np.sqrt(a * a + b * b + 1)
    out = np.array(xyz, dtype=np.float32, copy=True)
    out[valid & (dist < distance)] = 0
    return out


def fill_missing(z: np.ndarray, valid: np.ndarray, iters: int = 3, fillable: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Fill missing depths ``iters`` times with the mean of their valid 3 x 3 neighbours -> ``(z, valid)``.
    Only points in ``fillable`` (default: every missing point) are filled."""
    z = np.where(valid, z, 0).astype(np.float64)
    valid = valid.copy()
    kernel = np.ones((3, 3))
    for _ in range(iters):
        total = ndimage.convolve(z, kernel, mode="constant")
        count = ndimage.convolve(valid.astype(np.float64), kernel, mode="constant")
        grow = ~valid & (count > 0) & (True if fillable is None else fillable)
        if not grow.any():
            break
        z[grow] = total[grow] / count[grow]
        valid = valid | grow
    return z.astype(np.float32), valid


def depth_image(xyz: np.ndarray, *, encoding: str = "inverse", remove_plane: bool = True, border: int = 10,
                distance: float = 0.005, fill_iters: int = 3) -> np.ndarray:
    """Point map [H, W, 3] -> depth image float32 [H, W] (see the module docstring: plane removal, hole
    filling, encoding). Raises ValueError when no valid point is left."""
    _check_choice(encoding, DEPTH_ENCODINGS, "depth encoding")
    sensor_holes = ~_valid(xyz)
    if sensor_holes.all():
        raise ValueError("all points are missing (z == 0 or not finite)")
    if remove_plane:
        xyz = remove_background_plane(xyz, border, distance)
    valid = _valid(xyz)
    if not valid.any():
        raise ValueError(f"no point is left after removing the background plane (distance {distance})")
    z, valid = fill_missing(xyz[..., 2], valid, fill_iters, fillable=sensor_holes)
    if encoding == "raw":
        return np.where(valid, z, 0).astype(np.float32)
    lo, hi = float(z[valid].min()), float(z[valid].max())
    scaled = (z - lo) / max(hi - lo, 1e-12)
    return np.where(valid, 1 - 0.8 * scaled, 0).astype(np.float32)


def read_xyz(path: str | os.PathLike) -> np.ndarray:
    """float32 [H, W, 3] organised point map from a TIFF; raises BadFileError naming the file."""
    import tifffile

    try:
        arr = np.asarray(tifffile.imread(path), dtype=np.float32)
    except FileNotFoundError:
        raise _bad(path, "missing file") from None
    except (OSError, ValueError, IndexError, KeyError, tifffile.TiffFileError) as e:  # corrupt data
        raise _bad(path, f"unreadable TIFF ({type(e).__name__}: {e})") from None
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise _bad(path, f"point map must be [H, W, 3] (x, y, z), got shape {arr.shape}")
    return arr


# --- datasets -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RGBDRecord(Record):
    """A :class:`~fastproto.data.datasets.Record` with the point-map (or depth) file."""

    depth: str = ""


class RGBDDataset(AnomalyDataset):
    """RGB-D records + preprocessing; the base of the RGB-D formats (see the module docstring).

    Args:
        records: :class:`RGBDRecord` s.
        transform: RGB preprocessing (default 448 -> crop 392, ImageNet); the depth image gets the same sizes and
            normalisation with nearest-neighbour resizing.
        on_bad_file: ``"error"`` or ``"skip"``.
        depth_encoding, remove_plane, plane_border, plane_distance, fill_iters: see :func:`depth_image`.
    """

    def __init__(self, records: Sequence[RGBDRecord], transform: Preprocess | None = None, on_bad_file: str = "error",
                 *, depth_encoding: str = "inverse", remove_plane: bool = True, plane_border: int = 10,
                 plane_distance: float = 0.005, fill_iters: int = 3):
        _check_choice(depth_encoding, DEPTH_ENCODINGS, "depth_encoding")
        super().__init__(records, transform, on_bad_file)
        self.depth_options = {"encoding": depth_encoding, "remove_plane": remove_plane, "border": plane_border,
                              "distance": plane_distance, "fill_iters": fill_iters}

    def subset(self, categories: str | Iterable[str]) -> RGBDDataset:
        keep = set(_select(self.categories, categories, type(self).__name__))
        opts = self.depth_options
        return RGBDDataset([r for r in self.records if r.category in keep], self.transform, self.on_bad_file,
                           depth_encoding=opts["encoding"], remove_plane=opts["remove_plane"],
                           plane_border=opts["border"], plane_distance=opts["distance"], fill_iters=opts["fill_iters"])

    def read_points(self, record: RGBDRecord) -> np.ndarray:
        """The raw point map [H, W, 3] of ``record`` (MVTec 3D-AD: the xyz TIFF)."""
        return read_xyz(record.depth)

    def load_depth(self, index: int, size_hw: tuple[int, int]) -> np.ndarray:
        """Depth image float32 [H, W] of record ``index`` (its RGB image is ``size_hw``); BadFileError on bad data."""
        rec = self.records[index]
        xyz = self.read_points(rec)
        if xyz.shape[:2] != tuple(size_hw):
            raise _bad(rec.depth, f"point map size {xyz.shape[1]}x{xyz.shape[0]} (WxH) differs from the RGB image "
                                  f"size {size_hw[1]}x{size_hw[0]} of {rec.image}")
        try:
            return depth_image(xyz, **self.depth_options)
        except ValueError as e:
            raise _bad(rec.depth, f"unusable point map ({e})") from None

    def depth_tensor(self, depth: np.ndarray) -> torch.Tensor:
        """Depth image [H, W] -> float32 [3, H', W']: nearest resize, centre crop and normalisation of
        :attr:`transform`."""
        t = self.transform
        d = torch.from_numpy(depth)[None, None]
        if t.image_size is not None and tuple(d.shape[-2:]) != t.image_size:
            d = F.interpolate(d, size=t.image_size, mode="nearest")
        return t.normalize(t._crop(d[0]).expand(3, -1, -1).contiguous())

    def load_extra(self, index: int, image: Image.Image) -> dict:
        """The depth image of sample ``index`` ([3, H, W], preprocessed like the RGB)."""
        return {"depth": self.depth_tensor(self.load_depth(index, (image.height, image.width)))}


def _stems(folder: Path, ext: str) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() == ext and not p.name.startswith(".")}


def _mvtec3d_records(root: Path, category: str, split: str, on_bad_file: str) -> list[RGBDRecord]:
    records = []
    for type_dir in _type_dirs(root, category, split, on_bad_file):
        normal = type_dir.name == "good"
        rgb, xyz = _stems(type_dir / "rgb", ".png"), _stems(type_dir / "xyz", ".tiff")
        gt = {} if normal else _stems(type_dir / "gt", ".png")
        for stem in sorted(set(rgb) | set(xyz)):
            if stem not in xyz:
                _reject(_bad(rgb[stem], f"RGB image has no point map {type_dir / 'xyz' / (stem + '.tiff')}"),
                        on_bad_file)
            elif stem not in rgb:
                _reject(_bad(xyz[stem], f"point map has no RGB image {type_dir / 'rgb' / (stem + '.png')}"),
                        on_bad_file)
            elif not normal and stem not in gt:
                _reject(_bad(rgb[stem], f"no ground-truth mask {type_dir / 'gt' / (stem + '.png')} for anomalous "
                                        "image"), on_bad_file)
            else:
                records.append(RGBDRecord(str(rgb[stem]), None if normal else str(gt[stem]), int(not normal),
                                          category, type_dir.name, depth=str(xyz[stem])))
    split_dir = root / category / split
    if not records and split_dir.is_dir():  # a missing split was rejected already
        _reject(_bad(split_dir, f"no RGB-D samples in the {split!r} split of category {category!r}"), on_bad_file)
    return records


class MVTec3DDataset(RGBDDataset):
    """MVTec 3D-AD layout: ``<root>/<category>/<split>/<type>/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}``.

    ``split`` is ``train``, ``validation`` (normal only) or ``test``; ``good`` folders are normal, every other
    folder is a defect type whose samples need ``gt/<stem>.png``. Also reads Eyecandies converted by the M3DM /
    CFM preprocessing scripts (``test/{good,bad}``) and :func:`generate_rgbd` output. Depth options: see
    :class:`RGBDDataset`.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", categories: str | Iterable[str] | None = None,
                 transform: Preprocess | None = None, on_bad_file: str = "error", **depth_options):
        _check_choice(split, MVTEC3D_SPLITS, "split")
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root does not exist: {self.root}")
        found = sorted(d.name for d in self.root.iterdir()
                       if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()))
        cats = _select(found, categories, str(self.root))
        records = [r for c in cats for r in _mvtec3d_records(self.root, c, split, on_bad_file)]
        super().__init__(records, transform, on_bad_file, **depth_options)


# --- Eyecandies (raw release) ---------------------------------------------------------------------------------

EYECANDIES_FOCAL = 711.11  # pixels, principal point at the image centre (eyecandies docs)


def _yaml_min_max(path: Path) -> tuple[float, float]:
    import yaml

    try:
        info = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise _bad(path, "missing file") from None
    except (OSError, yaml.YAMLError) as e:
        raise _bad(path, f"unreadable YAML ({type(e).__name__})") from None

    def find(node):
        if isinstance(node, dict):
            if "min" in node and "max" in node:
                return float(node["min"]), float(node["max"])
            for v in node.values():
                hit = find(v)
                if hit:
                    return hit
        return None

    hit = find(info)
    if hit is None:
        raise _bad(path, "no normalization min / max in the depth info")
    return hit


class EyecandiesDataset(RGBDDataset):
    """Raw Eyecandies release: ``<root>/<Category>/<train|val|test_public>/data/<idx>_<item>.<ext>``.

    Per sample: RGB ``<idx>_image_<rgb_index>.png`` (default 4, as the M3DM / CFM conversion), depth
    ``<idx>_depth.png`` (16 bit, metric ``d = raw / 65535 (max - min) + min`` with ``min`` / ``max`` from
    ``<idx>_info_depth.yaml``), ground truth ``<idx>_mask.png`` (``test_public`` only; an empty mask means a
    normal sample; anomalous samples get ``defect="bad"``). The depth is back-projected with the documented
    intrinsics (focal 711.11 px, principal point at the centre) to a point map and goes through the same
    plane removal and encoding as MVTec 3D-AD. File names, the ``normalization: {min, max}`` entry of the
    depth YAML, the 16-bit scaling, the focal length and ``image_4`` agree with the M3DM conversion script
    (``utils/preprocess_eyecandies.py``) and the split folders with the eyecandies repository; no release file
    was available here to load. Unlike that script, the points stay in the camera frame (``<idx>_pose.txt``
    is not applied): the plane removal fits the background plane in the frame it is given, and point-to-plane
    distances do not depend on the frame (the camera sees the table plane obliquely, never edge-on). Converted trees (M3DM / CFM scripts) load with :class:`MVTec3DDataset`.
    ``split``: ``train``, ``validation`` (``val``) or ``test`` (``test_public``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", categories: str | Iterable[str] | None = None,
                 transform: Preprocess | None = None, on_bad_file: str = "error", rgb_index: int = 4,
                 **depth_options):
        _check_choice(split, tuple(EYECANDIES_SPLITS), "split")
        _check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.root, self.split = Path(root), split
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root does not exist: {self.root}")
        found = sorted(d.name for d in self.root.iterdir() if (d / EYECANDIES_SPLITS[split] / "data").is_dir())
        cats = _select(found, categories, str(self.root))
        records = []
        for cat in cats:
            data = self.root / cat / EYECANDIES_SPLITS[split] / "data"
            names = set(os.listdir(data))
            for rgb_name in sorted(n for n in names if n.endswith(f"_image_{rgb_index}.png")):
                idx = rgb_name[: -len(f"_image_{rgb_index}.png")]
                depth, mask = f"{idx}_depth.png", f"{idx}_mask.png"
                if depth not in names:
                    _reject(_bad(data / rgb_name, f"RGB image has no depth map {data / depth}"), on_bad_file)
                    continue
                label = 0
                if split == "test":
                    if mask not in names:
                        _reject(_bad(data / rgb_name, f"test image has no mask {data / mask}"), on_bad_file)
                        continue
                    label = int(binarize_mask(_open_image(str(data / mask))).any())
                records.append(RGBDRecord(str(data / rgb_name), str(data / mask) if label else None, label, cat,
                                          "bad" if label else "good", depth=str(data / depth)))
        super().__init__(records, transform, on_bad_file, **depth_options)

    def read_points(self, record: RGBDRecord) -> np.ndarray:
        path = Path(record.depth)
        lo, hi = _yaml_min_max(path.with_name(path.name.replace("_depth.png", "_info_depth.yaml")))
        raw = np.asarray(_open_image(str(path)), dtype=np.float64)
        if raw.ndim != 2:
            raise _bad(path, f"depth map must be single-channel, got shape {raw.shape}")
        d = raw / 65535.0 * (hi - lo) + lo
        h, w = d.shape
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        xyz = np.stack([(u - w / 2) * d / EYECANDIES_FOCAL, (v - h / 2) * d / EYECANDIES_FOCAL, d], axis=-1)
        return xyz.astype(np.float32)  # rendered depth: no missing points (raw 0 is the nearest depth)


# --- synthetic RGB-D generator --------------------------------------------------------------------------------

#: category -> defect types; every category has the same four kinds (see :func:`generate_rgbd`)
RGBD_CATEGORIES: dict[str, tuple[str, ...]] = {
    "cookie": ("bump", "dent", "stain", "swap"),
    "tile": ("bump", "dent", "stain", "swap"),
}
RGBD_META_FILE = "fastproto_synthetic_rgbd.json"
_RGBD_VERSION = 1
_FOV = 0.1  # metres across the image (orthographic camera)
_SPOT_COLOURS = {"red": (200, 30, 30), "blue": (40, 60, 200)}
_SPOT_HEIGHT = 0.002  # metres: a raised red spot
_DEFECT_HEIGHT = 0.0025  # metres: bump / dent amplitude


@dataclass
class _Disc:
    cy: float
    cx: float
    r: float


def _disc_profile(y: np.ndarray, x: np.ndarray, d: _Disc) -> np.ndarray:
    """Spherical-cap profile in [0, 1]: ``sqrt(1 - rho^2)`` inside the disc (rho = distance / radius), 0 outside."""
    rho2 = ((y - d.cy) ** 2 + (x - d.cx) ** 2) / d.r ** 2
    return np.sqrt(np.clip(1 - rho2, 0, None))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _render(category: str, rng: np.random.Generator, size: int, defect: str
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample: (rgb uint8 [H, W, 3], xyz float32 [H, W, 3], mask bool [H, W])."""
    pitch = _FOV / size
    y, x = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5 - size / 2) * pitch  # metres, centred
    # scene: tilted support plane at ~0.5 m, an object on it, two colour spots on the object's top
    a, b = rng.uniform(-0.15, 0.15, size=2)
    plane = 0.5 + a * x + b * y
    cy, cx = rng.uniform(-0.004, 0.004, size=2)
    if category == "cookie":  # dome of radius R and height H
        obj = _Disc(cy, cx, rng.uniform(0.024, 0.027))
        height = rng.uniform(0.014, 0.017) * _disc_profile(y, x, obj)
        inside = _disc_profile(y, x, obj) > 0
    else:  # "tile": flat-topped square slab with soft edges
        half, theta = rng.uniform(0.021, 0.024), rng.uniform(0, np.pi / 2)
        u = np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)
        v = -np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)
        edge = np.clip((half - np.maximum(np.abs(u), np.abs(v))) / 0.003, 0, 1)
        height = rng.uniform(0.010, 0.012) * edge
        inside = edge > 0
        obj = _Disc(cy, cx, half)
    # spots at distance 0.45 R from the centre on opposite sides (interior: height well above the plane band)
    phi = rng.uniform(0, 2 * np.pi)
    spot_r = rng.uniform(0.0035, 0.0045)
    spots = {name: _Disc(cy + s * 0.45 * obj.r * np.sin(phi), cx + s * 0.45 * obj.r * np.cos(phi), spot_r)
             for name, s in (("red", 1), ("blue", -1))}
    # albedo (no shading: RGB does not see the geometry), background dark grey
    base = {"cookie": (196, 150, 96), "tile": (150, 160, 170)}[category]
    tint = rng.uniform(-12, 12, size=3)
    tex = _smooth_noise(rng, size, 12)[..., None] * 10
    rgb = np.where(inside[..., None], np.asarray(base) + tint + tex, np.asarray((45, 45, 48)) + tex * 0.3)
    for name, d in spots.items():
        rgb[_disc_profile(y, x, d) > 0] = _SPOT_COLOURS[name]
    # normal rule: the red spot is raised, the blue spot is flat
    raised = {"red": True, "blue": False}
    local = None
    if defect in ("bump", "dent", "stain"):
        rad, ang = rng.uniform(0.0, 0.3) * obj.r, phi + np.pi / 2 + rng.uniform(-0.5, 0.5)  # clear of both spots
        local = _Disc(cy + rad * np.sin(ang), cx + rad * np.cos(ang), rng.uniform(0.0035, 0.0045))
    elif defect == "swap":  # one spot takes the other colour's geometry: red flat or blue raised
        which = "red" if rng.random() < 0.5 else "blue"
        raised[which] = not raised[which]
    elif defect != "good":
        raise ValueError(f"unknown defect {defect!r} for category {category!r}")

    def surface(raised_spots: dict[str, bool], local_geom: float) -> np.ndarray:
        h = height.copy()
        for name, d in spots.items():
            if raised_spots[name]:
                h += _SPOT_HEIGHT * _disc_profile(y, x, d)
        if local is not None and local_geom:
            h += local_geom * _DEFECT_HEIGHT * _disc_profile(y, x, local)
        return (plane - h).astype(np.float32)  # height towards the camera = smaller z

    clean_z = surface({"red": True, "blue": False}, 0.0)
    z = surface(raised, {"bump": 1.0, "dent": -1.0}.get(defect, 0.0))
    clean_rgb = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    img = clean_rgb
    if defect == "stain":  # colour only: a translucent dark-green blob, at least 8 grey levels off everywhere
        alpha = 0.6 * _disc_profile(y, x, local) ** 0.25
        stained = rgb * (1 - alpha[..., None]) + np.asarray((40, 110, 40)) * alpha[..., None]
        img = np.clip(np.rint(stained), 0, 255).astype(np.uint8)
        weak = (alpha > 0) & (np.abs(img.astype(int) - clean_rgb.astype(int)).max(-1) < 8)
        img[weak] = clean_rgb[weak]  # too faint to see: not part of the defect
    mask = (z != clean_z) | (img != clean_rgb).any(-1)
    xyz = np.stack([x.astype(np.float32), y.astype(np.float32), z], axis=-1)
    # sensor dropouts on the background only (so masks stay exact): MVTec 3D-AD's missing points are zeros
    drop = ~inside & (rng.random((size, size)) < 0.01)
    xyz[drop] = 0
    return img, xyz, mask


def make_rgbd_sample(category: str, rng: np.random.Generator, size: int = 128, defect: str = "good"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic sample ``(rgb uint8 [H, W, 3], xyz float32 [H, W, 3], mask bool [H, W])``; see
    :func:`generate_rgbd`."""
    if category not in RGBD_CATEGORIES:
        raise ValueError(f"unknown synthetic RGB-D category {category!r}; available: {list(RGBD_CATEGORIES)}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    return _render(category, rng, size, defect)


def generate_rgbd(root: str | Path, categories: Sequence[str] = tuple(RGBD_CATEGORIES), n_train: int = 20,
                  n_test: int = 20, size: int = 128, seed: int = 0, anomaly_fraction: float = 0.5,
                  overwrite: bool = False) -> Path:
    """Write a synthetic RGB-D dataset in MVTec 3D-AD layout under ``root`` and return ``root``.

    Scene (orthographic camera, 0.1 m field of view, metres): a support plane ~0.5 m away with a random tilt
    (slopes up to 0.15), an object on it (``cookie``: a dome; ``tile``: a flat-topped square slab), a red and a
    blue colour spot on the object's top. RGB is the albedo only (no shading), so geometry is invisible in RGB.
    xyz is ``(x, y, z)`` with ``z`` = plane distance minus the height; 1 % of the background points are dropped
    (0, as MVTec 3D-AD's missing points). **Normal rule**: the red spot is always a raised cap (+2 mm), the blue
    spot always flat.

    Defects (mask = exactly the pixels whose ``z`` or RGB differs from the same scene rendered normal):

    * ``bump`` / ``dent``: a 2.5 mm spherical cap added / removed on the object, depth only (RGB identical);
    * ``stain``: a translucent green blob on the object, RGB only (``z`` identical; pixels changed by fewer than
      8 grey levels are left untouched);
    * ``swap`` (cross-modal): the red spot is flat or the blue spot raised. Each modality alone shows only what
      normal samples also show (red and blue spots; raised and flat discs of that size) -- only the pairing of
      colour with shape is abnormal. Mask = the swapped spot's disc.

    Writes ``<cat>/train/good/{rgb,xyz}``, ``<cat>/test/<type>/{rgb,xyz,gt}`` (``gt`` 0/255 PNG, all zero for
    ``good``), xyz as float32 ``[H, W, 3]`` TIFF. Deterministic: every sample has its own random stream
    ``(seed, crc32(category), split, index)``. ``root/fastproto_synthetic_rgbd.json`` records the parameters; a
    dataset with the same parameters is reused, other existing folders need ``overwrite=True``.
    """
    import tifffile

    root = Path(root)
    params = generator_params(categories, RGBD_CATEGORIES, "synthetic RGB-D", n_train=n_train, n_test=n_test,
                              size=size, min_size=32, seed=seed, anomaly_fraction=anomaly_fraction)
    categories = params["categories"]
    if prepare_root(root, params, RGBD_META_FILE, _RGBD_VERSION, overwrite, "an RGB-D synthetic dataset"):
        return root

    def write(category: str, entropy: list[int], split: str, defect: str, stem: str) -> None:
        rgb, xyz, mask = _render(category, np.random.default_rng(entropy), size, defect)
        folder = root / category / split / defect
        for sub in ("rgb", "xyz") + (("gt",) if split == "test" else ()):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / "rgb" / f"{stem}.png")
        tifffile.imwrite(folder / "xyz" / f"{stem}.tiff", xyz, photometric="minisblack")
        if split == "test":
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "gt" / f"{stem}.png")

    summary = {}
    for c in categories:
        key, types = zlib.crc32(c.encode()), RGBD_CATEGORIES[c]
        for i in range(n_train):
            write(c, [seed, key, 0, i], "train", "good", f"{i:03d}")
        n_anom = round(n_test * anomaly_fraction)
        plan = ["good"] * (n_test - n_anom) + [types[k % len(types)] for k in range(n_anom)]
        counts = dict.fromkeys(["good", *types], 0)
        for i, defect in enumerate(plan):
            write(c, [seed, key, 1, i], "test", defect, f"{counts[defect]:03d}")
            counts[defect] += 1
        summary[c] = {"defects": list(types), "train": n_train, "test": {k: v for k, v in counts.items() if v}}
    write_meta(root, RGBD_META_FILE, "fastproto.data.rgbd", _RGBD_VERSION, params, summary,
               "MVTec 3D-AD: <category>/{train/good, test/<type>}/{rgb/NNN.png, xyz/NNN.tiff, gt/NNN.png}")
    return root
