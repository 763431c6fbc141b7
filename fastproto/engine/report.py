"""Results as JSON and a Markdown table; anomaly-map overlays as PNG (numpy + PIL only)."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastproto.engine.checkpoint import atomic_write
from fastproto.metrics import METRICS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TABLE_KEYS = (*METRICS, "mad")


# ---------------------------------------------------------------------------------------------- tables


def to_jsonable(obj: Any) -> Any:
    """Plain JSON values: non-finite floats become ``null`` (JSON has no NaN), tensors and numpy scalars
    become numbers or lists, tuples become lists."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomic, strict JSON (``allow_nan=False``; NaN is written as ``null``)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def markdown_table(results: Mapping[str, Mapping[str, float]], keys: Sequence[str] = TABLE_KEYS, *,
                   percent: bool = True, digits: int = 2) -> str:
    """One row per category in the given order with ``"mean"`` last, one column per metric; values in percent
    by default; undefined (NaN / missing) values show as ``nan`` / ``-``."""
    def cell(value) -> str:
        if value is None:
            return "-"
        value = float(value)
        return "nan" if math.isnan(value) else f"{(100 * value if percent else value):.{digits}f}"

    rows = [c for c in results if c != "mean"] + (["mean"] if "mean" in results else [])
    lines = ["| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for cat in rows:
        lines.append(f"| {cat} | " + " | ".join(cell(results[cat].get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def save_results(results: Mapping[str, Mapping[str, float]], out_dir: str | os.PathLike, *, name: str = "results",
                 meta: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """Write ``<out_dir>/<name>.json`` (``{"meta": ..., "results": ...}``) and ``<out_dir>/<name>.md`` (the
    table, preceded by the meta entries as a list); returns both paths."""
    out_dir = os.fspath(out_dir)
    json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    write_json(json_path, {"meta": dict(meta or {}), "results": results})
    head = "".join(f"- {k}: {v}\n" for k, v in (meta or {}).items())
    text = head + ("\n" if head else "") + markdown_table(results)
    atomic_write(md_path, lambda f: f.write(text.encode()))
    return json_path, md_path


# ---------------------------------------------------------------------------------------------- overlays


def jet(values: np.ndarray) -> np.ndarray:
    """The 'jet' colour map (blue -> cyan -> yellow -> red) of values in [0, 1]: uint8 ``[..., 3]``."""
    x = np.clip(values, 0.0, 1.0)[..., None] * 4.0
    rgb = np.clip(1.5 - np.abs(x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return np.round(255 * rgb).astype(np.uint8)


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask: in the mask with a 4-neighbour outside it (image edges extend)."""
    m = np.pad(mask.astype(bool), 1, mode="edge")
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


def denormalize(image: torch.Tensor, mean: Sequence[float] | None = IMAGENET_MEAN,
                std: Sequence[float] | None = IMAGENET_STD) -> np.ndarray:
    """A normalised ``[3,H,W]`` image back to uint8 ``[H,W,3]`` (``mean``/``std`` ``None``: already in [0, 1])."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must be [3,H,W] or [1,H,W], got shape {tuple(image.shape)}")
    x = image.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.expand(3, -1, -1).permute(1, 2, 0).clamp(0, 1).numpy()
    return np.round(255 * x).astype(np.uint8)


def overlay(image: torch.Tensor, anomaly_map: torch.Tensor, mask: torch.Tensor | None = None, *,
            vmin: float | None = None, vmax: float | None = None, alpha: float = 0.5,
            mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
            contour_color: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """The de-normalised image with the anomaly map blended as a jet heat map and the ground-truth contour.

    The map is resized bilinearly (and the mask by nearest neighbour) to the image size and scaled from
    ``[vmin, vmax]`` (default: its own range) to [0, 1]; pass a category's range to compare images.
    Returns uint8 ``[H, W, 3]``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = denormalize(image, mean, std)
    size = rgb.shape[:2]
    amap = anomaly_map.detach().float().cpu().reshape(1, 1, *anomaly_map.shape[-2:])
    amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    lo = float(amap.min()) if vmin is None else vmin
    hi = float(amap.max()) if vmax is None else vmax
    heat = jet((amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap))
    out = np.round((1 - alpha) * rgb + alpha * heat).astype(np.uint8)
    if mask is not None:
        m = mask.detach().float().cpu().reshape(1, 1, *mask.shape[-2:])
        m = F.interpolate(m, size=size, mode="nearest")[0, 0].numpy() > 0.5
        out[mask_contour(m)] = contour_color
    return out


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write a uint8 ``[H,W,3]`` array as PNG (atomically, creating the folder)."""
    from PIL import Image

    def write(f):
        Image.fromarray(rgb).save(f, format="PNG")

    atomic_write(path, write)
