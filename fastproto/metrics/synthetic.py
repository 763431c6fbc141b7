"""Synthetic MVTec-like anomaly maps and ground-truth masks.

Used by the metric benchmark (``bench/metrics.py``), by ``make demo`` and by tests. The recipe follows
the research notes (``notes/metrics.md`` section 5): a smooth noise background on every image, and on
about two thirds of the images one to three elliptic defects whose (soft-edged) signal is added to the
map, for about 1.5 % anomalous pixels overall. A few false-positive blobs (signal without ground truth),
defects clipped by the image border and isolated one-pixel defects make the data exercise every corner
of the AUPRO definition (region weights, 8-connectivity at borders, size-1 regions).

Value range: the plain maps are shifted so that every value is >= 4 (background around 10). That
shift changes no ranking metric; it makes the heavy-tailed variant ``exp(maps / 1.5)`` strictly
monotone in float32 (no two distinct inputs collapse onto one output, no new ties), so exact metrics
are identical on the plain and the heavy-tailed maps while binned/thresholded protocols are not.
Note that the maps are *not* probabilities: they lie outside [0, 1] on purpose (torchmetrics applies
an implicit sigmoid to such inputs; the benchmark shows what that does).
"""
from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["make_maps", "heavy_tail_transform"]

_FLOOR = 4.0  # lowest map value; >= 4 keeps exp(x / 1.5) strictly increasing in float32
_OFFSET = 10.0  # background level
_HEAVY_SCALE = 1.5


def heavy_tail_transform(maps: np.ndarray, dtype=None) -> np.ndarray:
    """Monotone heavy-tailed transform ``exp(maps / 1.5)`` (computed in float64, cast to ``dtype``).

    Strictly increasing on the output of :func:`make_maps` (all values >= 4) in float32 and float64,
    so ranks and ties are preserved exactly.
    """
    dtype = maps.dtype if dtype is None else np.dtype(dtype)
    out = np.exp(maps.astype(np.float64) / _HEAVY_SCALE)
    if not np.isfinite(out).all() or out.max() > np.finfo(dtype).max:
        raise ValueError(f"heavy-tailed maps overflow {np.dtype(dtype).name}; use float32 or float64")
    return out.astype(dtype, copy=False)


def _box(cy: float, cx: float, half: int, h: int, w: int):
    y0, y1 = max(0, int(math.floor(cy)) - half), min(h, int(math.ceil(cy)) + half + 1)
    x0, x1 = max(0, int(math.floor(cx)) - half), min(w, int(math.ceil(cx)) + half + 1)
    return y0, y1, x0, x1


def _ellipse(rng, h: int, w: int, scale: float, *, amin: float, amax: float, border_prob: float):
    """Random ellipse: centre, semi-axes, angle. With ``border_prob`` the centre lies on an image edge."""
    cy, cx = rng.uniform(0, h - 1), rng.uniform(0, w - 1)
    if rng.random() < border_prob:
        side = rng.integers(4)
        if side == 0:
            cy = 0.0
        elif side == 1:
            cy = float(h - 1)
        elif side == 2:
            cx = 0.0
        else:
            cx = float(w - 1)
    a = max(1.0, math.exp(rng.uniform(math.log(amin), math.log(amax))) * scale)
    b = max(1.0, a * rng.uniform(0.3, 1.0))
    theta = rng.uniform(0.0, math.pi)
    return cy, cx, a, b, theta


def _radius(cy, cx, a, b, theta, y0, y1, x0, x1):
    """Normalised elliptic radius (1 on the ellipse boundary) over the box [y0:y1, x0:x1]."""
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    u = (xx * c + yy * s) / np.float32(a)
    v = (-xx * s + yy * c) / np.float32(b)
    return np.sqrt(u * u + v * v), xx, yy


def make_maps(
    n_images: int = 150,
    size: int = 256,
    *,
    anomalous_fraction: float = 2 / 3,
    seed: int = 0,
    heavy_tail: bool = False,
    dtype=np.float32,
):
    """Make MVTec-like synthetic anomaly maps and masks.

    Args:
        n_images: number of images B.
        size: side length H = W of each map.
        anomalous_fraction: fraction of images that carry at least one ground-truth defect
            (rounded to a whole number of images; the anomalous images are spread at random).
        seed: seed of the ``numpy.random.default_rng`` stream; equal arguments give equal arrays.
        heavy_tail: return ``exp(maps / 1.5)`` instead of the plain maps (same ranks and ties).
        dtype: dtype of the maps (float32 default; float64 and, without ``heavy_tail``, float16).

    Returns:
        ``(maps, masks)``: maps ``dtype [B, H, W]`` (all values >= 4 for the plain maps), masks
        ``bool [B, H, W]``. Image labels are ``masks.any(axis=(1, 2))``.
    """
    n_images, size = int(n_images), int(size)
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if not 0.0 <= anomalous_fraction <= 1.0:
        raise ValueError(f"anomalous_fraction must be in [0, 1], got {anomalous_fraction}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")

    rng = np.random.default_rng(seed)
    B, H, W = n_images, size, size
    scale = size / 256.0

    n_anom = int(round(B * anomalous_fraction))
    is_anom = np.zeros(B, dtype=bool)
    is_anom[rng.permutation(B)[:n_anom]] = True

    # --- background: coarse texture (low-res noise, bilinear upsampled like a patch-grid map)
    #     plus fine full-resolution texture, both Gaussian-smoothed, about unit variance.
    low = max(4, size // 4)
    coarse = rng.standard_normal((B, low, low), dtype=np.float32)
    gaussian_filter(coarse, sigma=(0, 1.5, 1.5), output=coarse)
    coarse /= coarse.std(dtype=np.float64)
    import torch  # package dependency; bilinear resize as models do it
    import torch.nn.functional as F

    with torch.no_grad():
        up = F.interpolate(torch.from_numpy(coarse)[:, None], size=(H, W), mode="bilinear",
                           align_corners=False)[:, 0]
    maps = up.numpy()
    maps *= np.float32(0.8)
    del coarse, up
    fine = rng.standard_normal((B, H, W), dtype=np.float32)
    gaussian_filter(fine, sigma=(0, 2.0, 2.0), truncate=3.0, output=fine)
    fine *= np.float32(0.45 / fine[: min(B, 32)].std(dtype=np.float64))
    maps += fine
    del fine
    # per-image level shift (some normal images are globally "hotter")
    maps += rng.normal(0.0, 0.25, size=B).astype(np.float32)[:, None, None]

    masks = np.zeros((B, H, W), dtype=bool)

    # --- defects: 1-3 ellipses per anomalous image, soft-edged signal with a random ramp
    for i in np.flatnonzero(is_anom):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx, a, b, theta = _ellipse(rng, H, W, scale, amin=5.0, amax=45.0, border_prob=0.2)
            width = rng.uniform(0.08, 0.35)  # edge softness (in normalised radius units)
            amp = rng.uniform(0.8, 5.0)  # some defects are barely visible
            ramp = rng.uniform(0.0, 0.9)  # partial detection across the defect
            phi = rng.uniform(0.0, 2 * math.pi)
            half = int(math.ceil(a * (1.0 + 5.0 * width))) + 2
            y0, y1, x0, x1 = _box(cy, cx, half, H, W)
            r, xx, yy = _radius(cy, cx, a, b, theta, y0, y1, x0, x1)
            masks[i, y0:y1, x0:x1] |= r <= 1.0
            along = (xx * np.float32(math.cos(phi)) + yy * np.float32(math.sin(phi))) / np.float32(a)
            gain = np.clip(1.0 + np.float32(ramp) * along, 0.0, None)
            prof = np.float32(amp) * gain / (1.0 + np.exp(np.minimum((r - 1.0) / np.float32(width), 60.0)))
            maps[i, y0:y1, x0:x1] += prof.astype(np.float32)
        if not masks[i].any():  # tiny sizes: make sure the image really is anomalous
            masks[i, H // 2, W // 2] = True

    # --- isolated one-pixel defects on a few anomalous images (size-1 regions, weight 1 in AUPRO)
    anom_idx = np.flatnonzero(is_anom)
    if anom_idx.size:
        n_single = max(1, int(round(0.03 * anom_idx.size)))
        for i in rng.choice(anom_idx, size=min(n_single, anom_idx.size), replace=False):
            for _ in range(50):
                py, px = int(rng.integers(H)), int(rng.integers(W))
                if not masks[i, max(0, py - 1):py + 2, max(0, px - 1):px + 2].any():
                    masks[i, py, px] = True
                    y0, y1, x0, x1 = _box(py, px, 3, H, W)
                    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - py
                    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - px
                    amp = np.float32(rng.uniform(0.5, 3.0))
                    maps[i, y0:y1, x0:x1] += amp * np.exp(-(xx * xx + yy * yy) / np.float32(2 * 1.2**2))
                    break

    # --- false-positive blobs (signal without ground truth), on normal and anomalous images
    for i in np.flatnonzero(rng.random(B) < 0.3):
        for _ in range(int(rng.integers(1, 3))):
            cy, cx, a, b, theta = _ellipse(rng, H, W, scale, amin=3.0, amax=14.0, border_prob=0.1)
            width = rng.uniform(0.2, 0.5)
            amp = rng.uniform(0.5, 3.0)
            half = int(math.ceil(a * (1.0 + 5.0 * width))) + 2
            y0, y1, x0, x1 = _box(cy, cx, half, H, W)
            r, _, _ = _radius(cy, cx, a, b, theta, y0, y1, x0, x1)
            edge = np.exp(np.minimum((r - 1.0) / np.float32(width), 60.0))
            maps[i, y0:y1, x0:x1] += (np.float32(amp) / (1.0 + edge)).astype(np.float32)

    maps += np.float32(_OFFSET)
    np.maximum(maps, np.float32(_FLOOR), out=maps)  # practically never active (> 6 sigma)

    if heavy_tail:
        if dtype == np.float16:
            raise ValueError("heavy_tail=True overflows float16; use float32 or float64")
        maps = heavy_tail_transform(maps, dtype)
    else:
        maps = maps.astype(dtype, copy=False)
    return maps, masks
