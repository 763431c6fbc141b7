"""Procedural MVTec-layout anomaly-detection dataset with exact defect masks (NumPy + PIL only).

Categories (:data:`CATEGORIES`): two textures and two objects, each with its own defect types.

- ``fabric``: plain weave of two thread colours; per image the weave phase, angle (+-4 deg), period,
  thread waviness, per-thread tints, fibre noise and illumination vary.
- ``wood``: oriented grain (growth rings bent by anisotropic noise, fibre streaks); per image the angle,
  ring spacing, ring warp, colours and illumination vary (not periodic: nothing to memorise).
- ``flange``: a metal ring with a lug and four brass hex bolts on a dark plate; position, size, rotation
  (any angle), bolt turns, light direction and colours vary.
- ``screw``: a screw lying on a bright plate with a hex nut on its shaft; position, rotation (any angle),
  length, nut position and turn, thread phase and colours vary.

Defects: ``scratch`` (thin curved line, lighter or darker), ``hole`` (dark irregular hole with a rim),
``stain`` (translucent colour blob) are local and drawn on the clean render (on the object for objects);
``missing`` (a bolt / the nut removed) and ``misplaced`` (a bolt turned along the ring / the nut slid along
the shaft) re-render the scene with the part changed. Masks are exact: a local defect's mask is its
footprint, and every footprint pixel differs from the clean render by at least :data:`MIN_DELTA` grey
levels in some channel while every other pixel is untouched; a part defect's mask is the set of pixels
whose value changed. Generation is deterministic under ``seed``: the same pixels every time (and the same
file bytes with the same zlib), whatever the number of threads.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["CATEGORIES", "DEFAULT_CATEGORIES", "LOCAL_DEFECTS", "META_FILE", "MIN_DELTA", "SyntheticImage", "generate",
           "make_image"]

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fabric": ("scratch", "hole", "stain"),
    "wood": ("scratch", "hole", "stain"),
    "flange": ("scratch", "stain", "missing", "misplaced"),
    "screw": ("scratch", "stain", "missing", "misplaced"),
}
DEFAULT_CATEGORIES = tuple(CATEGORIES)
LOCAL_DEFECTS = ("scratch", "hole", "stain")
MIN_DELTA = 6  # grey levels by which every pixel of a local defect differs from the clean image
META_FILE = "fastproto_synthetic.json"
_VERSION = 1


@dataclass
class SyntheticImage:
    """One generated image: ``image`` and ``clean`` uint8 [H, W, 3], ``mask`` bool [H, W]."""

    image: np.ndarray
    mask: np.ndarray
    clean: np.ndarray
    defect: str


# --- fields ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _coords(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), float32 [size, size]."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _noise(rng: np.random.Generator, size: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth value noise in about [-1, 1]: a random (cells_y, cells_x) grid upsampled bicubically by PIL."""
    grid = rng.random((max(cells_y, 2), max(cells_x, 2)), dtype=np.float32) * 2 - 1
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _illumination(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """Slow multiplicative light variation: a random linear gradient plus low-frequency noise."""
    y, x = _coords(size)
    a = rng.uniform(0, 2 * math.pi)
    grad = ((x - size / 2) * math.cos(a) + (y - size / 2) * math.sin(a)) / size
    return 1 + strength * (grad * rng.uniform(0.5, 1.5) + 0.5 * _noise(rng, size, 3, 3))


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage of the region ``sdf < 0`` (signed distance in pixels)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _norm(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.sqrt(u * u + v * v)


def _frame(x: np.ndarray, y: np.ndarray, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) expressed in a frame centred at (cx, cy) and rotated by ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    return dx * c + dy * s, -dx * s + dy * c


def _local(size: int, cx: float, cy: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel of the image in the frame of :func:`_frame`."""
    y, x = _coords(size)
    return _frame(x, y, cx, cy, angle)


def _window(size: int, cx: float, cy: float, r: float) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The image window of half-width ``r`` (plus an anti-aliasing margin) around (cx, cy): its slices and
    pixel-centre coordinates (x, y). Small shapes are drawn in their window only."""
    x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, size)
    y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, size)
    x0, y0 = min(x0, x1), min(y0, y1)
    y, x = _coords(size)
    return (slice(y0, y1), slice(x0, x1)), x[y0:y1, x0:x1], y[y0:y1, x0:x1]


def _box_sdf(u: np.ndarray, v: np.ndarray, hu: float, hv: float, r: float = 0.0) -> np.ndarray:
    qu, qv = np.abs(u) - (hu - r), np.abs(v) - (hv - r)
    return _norm(np.maximum(qu, 0), np.maximum(qv, 0)) + np.minimum(np.maximum(qu, qv), 0) - r


def _hexagon_sdf(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Regular hexagon with circumradius ``r`` (vertices on the u axis)."""
    au, av = np.abs(u), np.abs(v)
    apothem = r * math.sqrt(3) / 2
    return np.maximum(av, au * (math.sqrt(3) / 2) + av * 0.5) - apothem


def _blend(img: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1 - a) + np.asarray(colour, np.float32) * a


def _quantize(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _jitter(rng: np.random.Generator, colour: Sequence[float], rel: float) -> np.ndarray:
    return np.asarray(colour, np.float32) * rng.uniform(1 - rel, 1 + rel, 3).astype(np.float32)


# --- scenes ---------------------------------------------------------------------------------------------------


class _Scene:
    """A sampled scene: ``render(parts)`` gives the float image and the object region (``None`` for
    textures); ``parts`` are the movable parts and ``misplace(rng, i)`` a plausible wrong placement of one.
    All randomness is drawn at construction, so rendering twice gives identical pixels."""

    def __init__(self, rng: np.random.Generator, size: int):
        self.size = size
        self.parts: list = []
        self.defect_scale = float(size)  # reference length for defect sizes
        self.scratch_angle: float | None = None  # preferred scratch direction (None: any)
        self.noise_seed = int(rng.integers(2**63))
        self.sensor_sigma = float(rng.uniform(1.0, 2.0))

    def _sensor(self, img: np.ndarray) -> np.ndarray:
        """Add sensor noise (uniform, std ``sensor_sigma``; the same for every render of the scene)."""
        u = np.random.default_rng(self.noise_seed).random(img.shape, dtype=np.float32) - np.float32(0.5)
        return img + u * np.float32(self.sensor_sigma * math.sqrt(12))

    def render(self, parts: list | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def misplace(self, rng: np.random.Generator, index: int):
        raise NotImplementedError


class _Fabric(_Scene):
    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.period = size / rng.uniform(22, 27)
        self.angle = math.radians(rng.uniform(-4, 4))
        self.phase = rng.uniform(0, 2 * self.period, 2).tolist()
        self.wave = rng.uniform(0.3, 1.0) * self.period * 0.15
        self.warp_colour = _jitter(rng, (62, 84, 138), 0.08)
        self.weft_colour = _jitter(rng, (196, 190, 172), 0.05)
        self.tints = rng.normal(1, 0.05, (2, 64)).astype(np.float32)
        self.fields = [_noise(rng, size, 4, 4), _noise(rng, size, 4, 4), _noise(rng, size, size // 16, size // 2),
                       _noise(rng, size, size // 2, size // 16)]
        self.light = _illumination(rng, size, 0.12)

    def render(self, parts=None):
        n = self.size
        u, v = _local(n, n / 2, n / 2, self.angle)
        wu, wv, fib_warp, fib_weft = self.fields
        u = (u + self.phase[0] + self.wave * wv) / self.period
        v = (v + self.phase[1] + self.wave * wu) / self.period
        i, j = np.floor(u), np.floor(v)
        fu, fv = u - i, v - j
        warp_top = (i + j) % 2 == 0
        profile = lambda t: np.sqrt(np.sin(np.pi * t))
        warp_b = profile(fu) * (0.75 + 0.25 * np.sin(np.pi * fv))
        weft_b = profile(fv) * (0.75 + 0.25 * np.sin(np.pi * fu))
        bright = np.where(warp_top, warp_b, weft_b)
        tint = np.where(warp_top, self.tints[0][i.astype(np.int64) % 64], self.tints[1][j.astype(np.int64) % 64])
        fibre = np.where(warp_top, fib_warp, fib_weft)
        shade = (0.3 + 0.7 * bright) * tint * (1 + 0.1 * fibre) * self.light
        colour = self.weft_colour + warp_top[..., None] * (self.warp_colour - self.weft_colour)
        return self._sensor(colour * shade[..., None]), None


class _Wood(_Scene):
    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.angle = math.radians(rng.uniform(-6, 6))
        self.spacing = size / rng.uniform(8, 12)
        self.phase = rng.uniform(0, 1)
        self.warp = (rng.uniform(1.0, 2.0) * _noise(rng, size, 6, 2) + 0.3 * _noise(rng, size, 14, 4)) * self.spacing
        self.fibres = _noise(rng, size, size // 2, size // 24) + 0.5 * _noise(rng, size, size // 4, size // 48)
        self.light_colour = _jitter(rng, (200, 152, 102), 0.06)
        self.dark_colour = self.light_colour * np.float32(rng.uniform(0.55, 0.7)) * np.asarray((1.0, 0.92, 0.85),
                                                                                                np.float32)
        self.light = _illumination(rng, size, 0.1)

    def render(self, parts=None):
        n = self.size
        _, v = _local(n, n / 2, n / 2, self.angle)
        rings = (v + self.warp) / self.spacing + self.phase
        g = rings - np.floor(rings)
        band = np.exp(-(((g - 0.78) / 0.14) ** 2)) + 0.15 * np.sin(2 * np.pi * g)
        t = np.clip(0.75 * band + 0.12 * self.fibres, 0, 1)
        img = _blend(np.broadcast_to(self.light_colour, (n, n, 3)), self.dark_colour, t)
        return self._sensor(img * self.light[..., None]), None


class _Flange(_Scene):
    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.cx, self.cy = (size / 2 + rng.uniform(-0.05, 0.05, 2) * size).tolist()
        self.R = size * 0.33 * rng.uniform(0.96, 1.04)
        self.defect_scale = 1.6 * self.R
        self.r_in = self.R * rng.uniform(0.30, 0.36)
        self.theta = rng.uniform(0, 2 * math.pi)
        self.light_dir = rng.uniform(0, 2 * math.pi)
        self.bg = _jitter(rng, (58, 62, 72), 0.1)
        self.metal = _jitter(rng, (152, 154, 160), 0.06)
        self.brass = _jitter(rng, (192, 156, 82), 0.06)
        self.ring_r = self.R * 0.66
        self.bolt_r = self.R * 0.14
        self.holes = [self._on_ring(self.theta + math.pi / 4 + k * math.pi / 2, 0.0) for k in range(4)]
        self.parts = [(*h, rng.uniform(0, math.pi / 3)) for h in self.holes]
        self.bg_noise = _noise(rng, size, 8, 8)
        self.brush = rng.uniform(0, 2 * math.pi)
        self.light = _illumination(rng, size, 0.15)

    def _on_ring(self, angle: float, dr: float) -> tuple[float, float]:
        r = self.ring_r + dr
        return self.cx + r * math.cos(angle), self.cy + r * math.sin(angle)

    def misplace(self, rng, index):
        x, y, turn = self.parts[index]
        angle = math.atan2(y - self.cy, x - self.cx) + rng.choice((-1, 1)) * math.radians(rng.uniform(22, 34))
        return (*self._on_ring(angle, rng.uniform(-0.05, 0.05) * self.R), turn + rng.uniform(0.2, 0.8))

    def _body(self, dx: float = 0.0, dy: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Signed distance to the ring with its lug (shifted by (dx, dy)), and the radius of each pixel."""
        u, v = _local(self.size, self.cx + dx, self.cy + dy, self.theta)
        rho = _norm(u, v)
        lug = _box_sdf(u - self.R, v, self.R * 0.16, self.R * 0.12, 2.0)
        return np.minimum(np.maximum(rho - self.R, self.r_in - rho), lug), rho

    def render(self, parts=None):
        parts = self.parts if parts is None else parts
        n, y, x = self.size, *_coords(self.size)
        body, rho = self._body()
        # background plate with the ring's soft shadow (cast away from the light)
        img = np.broadcast_to(self.bg, (n, n, 3)) * (1 + 0.05 * self.bg_noise)[..., None]
        shadow, _ = self._body(-3 * math.cos(self.light_dir), -3 * math.sin(self.light_dir))
        img = img * (1 - 0.45 * np.clip(0.5 - shadow / 4, 0, 1))[..., None]
        # metal: directional light, concentric turning marks, darker bevel at the edges
        phi = np.arctan2(y - self.cy, x - self.cx)
        shade = (0.82 + 0.22 * np.cos(phi - self.light_dir) * np.clip(rho / self.R, 0, 1)
                 + 0.04 * np.sin(rho * 2.1 + self.brush) - 0.3 * np.exp(np.minimum(body, 0) / 2.0))
        img = _blend(img, self.metal * shade[..., None], _coverage(body))
        for hx, hy in self.holes:
            win, wx, wy = _window(n, hx, hy, self.R * 0.1)
            img[win] = _blend(img[win], (30, 31, 34), _coverage(_norm(wx - hx, wy - hy) - self.R * 0.095))
        for bx, by, turn in parts:
            win, wx, wy = _window(n, bx, by, self.bolt_r)
            bu, bv = _frame(wx, wy, bx, by, turn)
            facet = np.floor((np.arctan2(bv, bu) + math.pi) / (math.pi / 3))
            face = 0.78 + 0.22 * np.cos(facet * (math.pi / 3) + turn - self.light_dir)
            socket = np.clip(_norm(bu, bv) - self.bolt_r * 0.3, 0, 1) * 0.7 + 0.3
            img[win] = _blend(img[win], self.brass * (face * socket)[..., None],
                              _coverage(_hexagon_sdf(bu, bv, self.bolt_r)))
        region = body < -0.5
        return self._sensor(img * self.light[..., None]), region


class _Screw(_Scene):
    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.cx, self.cy = (size / 2 + rng.uniform(-0.05, 0.05, 2) * size).tolist()
        self.angle = rng.uniform(0, 2 * math.pi)
        self.L = size * 0.62 * rng.uniform(0.96, 1.04)
        self.sr = self.L * 0.05
        self.defect_scale = 0.6 * self.L
        self.scratch_angle = self.angle
        self.shaft = self.L * 0.78
        self.head_len, self.head_r = self.L * 0.12, self.L * 0.095
        self.pitch = self.L * 0.035
        self.thread_phase = rng.uniform(0, 2 * math.pi)
        self.bg = _jitter(rng, (206, 205, 198), 0.05)
        self.steel = _jitter(rng, (128, 130, 136), 0.08)
        self.zinc = _jitter(rng, (182, 172, 128), 0.06)
        self.bg_noise = _noise(rng, size, 8, 8)
        self.light = _illumination(rng, size, 0.1)
        self.parts = [(self.shaft * rng.uniform(0.42, 0.5), rng.uniform(0, math.pi / 3))]

    def misplace(self, rng, index):
        s, turn = self.parts[index]
        shift = rng.uniform(0.16, 0.26) * self.L
        s = s + shift if s + shift < 0.88 * self.shaft else s - shift
        return s, turn + rng.uniform(0.2, 0.8)

    def _body(self, s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Signed distances to the shaft (with its pointed tip) and the head, and the shaft's half-width,
        in the screw's frame (s along the axis from the head, t across)."""
        tip_len = self.L - self.head_len - self.shaft
        half = self.sr * np.clip((self.shaft + tip_len - s) / tip_len, 0, 1)
        shaft = np.maximum(np.maximum(np.abs(t) - half, -s), s - self.shaft - tip_len)
        head = _box_sdf(s + self.head_len / 2, t, self.head_len / 2, self.head_r, self.head_r * 0.35)
        return shaft, head, half

    def render(self, parts=None):
        parts = self.parts if parts is None else parts
        n = self.size
        ox = self.cx - math.cos(self.angle) * (self.L / 2 - self.head_len)  # axis origin: under the head
        oy = self.cy - math.sin(self.angle) * (self.L / 2 - self.head_len)
        s, t = _local(n, ox, oy, self.angle)
        shaft, head, half = self._body(s, t)
        body = np.minimum(shaft, head)
        img = np.broadcast_to(self.bg, (n, n, 3)) * (1 + 0.04 * self.bg_noise)[..., None]
        shadow = np.minimum(*self._body(s, t - 3)[:2])
        img = img * (1 - 0.35 * np.clip(0.5 - shadow / 4, 0, 1))[..., None]
        # cylinder shading with a highlight; diagonal thread lines on the shaft
        radius = np.where(head < shaft, self.head_r, np.maximum(half, 1e-3))
        across = np.clip(t / radius, -1, 1)
        shade = 0.45 + 0.45 * np.sqrt(1 - across**2) + 0.35 * np.exp(-(((across + 0.35) / 0.18) ** 2))
        thread = np.where(head < shaft, 1.0, 0.78 + 0.22 * np.sin(2 * np.pi * (s + 0.4 * t) / self.pitch
                                                                  + self.thread_phase))
        img = _blend(img, self.steel * (shade * thread)[..., None], _coverage(body))
        region = body < -0.5
        nut_r = self.sr * 2.0
        for pos, turn in parts:  # hex nut seen from the side: three faces whose edges move as it turns
            nx, ny = ox + pos * math.cos(self.angle), oy + pos * math.sin(self.angle)
            win, wx, wy = _window(n, nx, ny, math.hypot(self.L * 0.045, nut_r))
            ns, nt = _frame(wx, wy, nx, ny, self.angle)
            nut = _box_sdf(ns, nt, self.L * 0.045, nut_r, 1.0)
            edges = nut_r * np.sin(turn + np.arange(4) * math.pi / 3 - math.pi / 2)
            face = np.digitize(nt, np.sort(edges)).astype(np.float32)
            shade = 0.7 + 0.3 * np.cos(face * 1.1 + turn)
            img[win] = _blend(img[win], self.zinc * shade[..., None], _coverage(nut))
            region[win] |= nut < -0.5
        return self._sensor(img * self.light[..., None]), region


_SCENES = {"fabric": _Fabric, "wood": _Wood, "flange": _Flange, "screw": _Screw}


# --- defects --------------------------------------------------------------------------------------------------


def _apply_local(clean: np.ndarray, alpha: np.ndarray, colour) -> tuple[np.ndarray, np.ndarray]:
    """Blend ``colour`` into ``clean`` with ``alpha``; returns the image and the footprint ``alpha > 0``,
    every footprint pixel moved by >= MIN_DELTA grey levels (in the blend's direction) and nothing else."""
    foot = alpha > 0
    old = clean[foot].astype(np.float32)
    col = np.broadcast_to(np.asarray(colour, np.float32), clean.shape)[foot]
    a = alpha[foot][:, None]
    new = old * (1 - a) + col * a
    delta = new - old
    weak = np.abs(delta).max(axis=1) < MIN_DELTA
    if weak.any():  # push faint pixels (anti-aliased edges, colour close to the material) to MIN_DELTA
        up = np.where(delta[weak].sum(axis=1) >= 0, 1.0, -1.0)[:, None]
        up = np.where(old[weak].max(axis=1, keepdims=True) + MIN_DELTA > 255, -1.0, up)
        up = np.where(old[weak].min(axis=1, keepdims=True) - MIN_DELTA < 0, 1.0, up)
        new[weak] = old[weak] + up * MIN_DELTA
    out = clean.copy()
    out[foot] = _quantize(new)
    return out, foot


def _blob(rng: np.random.Generator, size: int, cx: float, cy: float, radius: float, wobble: float, margin: float):
    """Irregular closed blob (an ellipse whose radius varies with a few random harmonics) around (cx, cy):
    its window slices and signed distance (approximate, in pixels) inside the window (``margin`` extra)."""
    ecc = rng.uniform(0.6, 1.0)
    win, x, y = _window(size, cx, cy, radius * (1 + wobble) + margin)
    u, v = _frame(x, y, cx, cy, rng.uniform(0, math.pi))
    rho, ang = _norm(u, v / ecc), np.arctan2(v, u)
    r = np.ones_like(ang)
    for k in (2, 3, 5):
        r += wobble / k * rng.uniform(-1, 1) * np.cos(k * ang + rng.uniform(0, 2 * math.pi))
    return win, (rho - radius * r) * ecc


def _scratch_alpha(rng: np.random.Generator, size: int, cx: float, cy: float, length: float,
                   angle: float | None) -> np.ndarray:
    """Anti-aliased coverage of a thin curved line (cubic Bezier) centred near (cx, cy), running along
    ``angle`` +- 12 degrees (any direction for ``None``)."""
    a = rng.uniform(0, math.pi) if angle is None else angle + math.radians(rng.uniform(-12, 12))
    d = np.array([math.cos(a), math.sin(a)])
    nrm = np.array([-d[1], d[0]])
    p0, p3 = np.array([cx, cy]) - d * length / 2, np.array([cx, cy]) + d * length / 2
    p1 = p0 + d * length / 3 + nrm * rng.uniform(-0.3, 0.3) * length
    p2 = p0 + 2 * d * length / 3 + nrm * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0, 1, 25)[:, None]
    pts = ((1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3).astype(np.float32)
    width = rng.uniform(1.3, 2.6)
    pad = width + 2
    x0, y0 = np.maximum(np.floor(pts.min(0) - pad).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0) + pad).astype(int), size)
    alpha = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    q = np.stack([xx.ravel(), yy.ravel()], 1)[:, None, :]  # [P, 1, 2]
    a_, b_ = pts[:-1][None], pts[1:][None]
    ab = b_ - a_
    h = np.clip(((q - a_) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0, 1)
    dist = np.linalg.norm(q - (a_ + h[..., None] * ab), axis=-1).min(1).reshape(yy.shape)
    alpha[y0:y1, x0:x1] = _coverage(dist - width / 2)
    return alpha


def _defect_site(rng: np.random.Generator, size: int, region: np.ndarray | None) -> tuple[float, float]:
    """A defect centre: inside the central 70 % for textures (it survives a 0.875 centre crop), on the
    object at least 3 px from its outline otherwise (so the defect is not mostly clipped away)."""
    if region is None:
        return tuple((rng.uniform(0.15, 0.85, 2) * size).tolist())
    inner = region.copy()
    for axis in (0, 1):
        for shift in (-3, 3):
            inner &= np.roll(region, shift, axis=axis)
    ys, xs = np.nonzero(inner if inner.any() else region)
    k = rng.integers(len(ys))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def _local_defect(rng: np.random.Generator, kind: str, scene: _Scene, clean: np.ndarray,
                  region: np.ndarray | None):
    size, scale = clean.shape[0], scene.defect_scale
    cx, cy = _defect_site(rng, size, region)
    if kind == "scratch":
        alpha = _scratch_alpha(rng, size, cx, cy, rng.uniform(0.2, 0.45) * scale, scene.scratch_angle)
        alpha *= rng.uniform(0.55, 0.85)
        colour = (235, 235, 228) if rng.random() < 0.5 else (25, 24, 22)
    elif kind == "stain":
        win, sdf = _blob(rng, size, cx, cy, rng.uniform(0.04, 0.08) * scale, 0.5, 0.0)
        palette = ((96, 62, 30), (170, 150, 55), (45, 45, 50), (150, 72, 34), (70, 110, 60))
        colour = palette[rng.integers(len(palette))]
        alpha = np.zeros((size, size), np.float32)
        alpha[win] = _coverage(sdf) * rng.uniform(0.4, 0.65) * (1 + 0.3 * np.exp(np.minimum(sdf, 0) / 2))
    elif kind == "hole":
        rim = rng.uniform(1.0, 2.0)
        win, sdf = _blob(rng, size, cx, cy, rng.uniform(0.025, 0.05) * scale, 0.6, rim)
        dark = np.float32(rng.uniform(15, 35)) * (1 - 0.4 * np.clip(-sdf / 3, 0, 1))[..., None]
        colour = np.zeros(clean.shape, np.float32)
        colour[win] = np.where((sdf > 0)[..., None], np.minimum(clean[win] * np.float32(1.3) + 25, 255), dark)
        alpha = np.zeros((size, size), np.float32)
        alpha[win] = _coverage(sdf - rim) * 0.95
    else:
        raise ValueError(f"not a local defect: {kind!r}")
    if region is not None:
        alpha = alpha * region
    return _apply_local(clean, alpha.astype(np.float32), colour)


def make_image(category: str, rng: np.random.Generator, size: int = 256, defect: str = "good") -> SyntheticImage:
    """One image of ``category``: a fresh scene from ``rng``, clean or with one ``defect`` of the category's
    types (:data:`CATEGORIES`)."""
    if category not in _SCENES:
        raise ValueError(f"unknown synthetic category {category!r}; available: {list(CATEGORIES)}")
    if defect != "good" and defect not in CATEGORIES[category]:
        raise ValueError(f"category {category!r} has no defect {defect!r}; available: {CATEGORIES[category]}")
    if size < 64:
        raise ValueError(f"size must be >= 64, got {size}")
    scene = _SCENES[category](rng, size)
    img, region = scene.render()
    clean = _quantize(img)
    if defect == "good":
        return SyntheticImage(clean, np.zeros((size, size), bool), clean, defect)
    if defect in LOCAL_DEFECTS:
        image, mask = _local_defect(rng, defect, scene, clean, region)
        return SyntheticImage(image, mask, clean, defect)
    parts = list(scene.parts)
    index = int(rng.integers(len(parts)))
    if defect == "missing":
        del parts[index]
    else:
        parts[index] = scene.misplace(rng, index)
    image = _quantize(scene.render(parts)[0])
    return SyntheticImage(image, (image != clean).any(axis=2), clean, defect)


# --- dataset --------------------------------------------------------------------------------------------------


def _save_png(arr: np.ndarray, path: Path) -> None:
    """Fast PNG: noisy images barely compress, so Huffman-only level 1 (~2x faster than the default, and
    smaller than plain level 1)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, compress_level=1, compress_type=zlib.Z_HUFFMAN_ONLY)


def generate(root: str | Path, categories: Sequence[str] = DEFAULT_CATEGORIES, n_train: int = 40, n_test: int = 20,
             size: int = 256, seed: int = 0, anomaly_fraction: float = 0.5, overwrite: bool = False) -> Path:
    """Write a synthetic dataset in MVTec layout under ``root`` and return ``root``.

    Per category: ``train/good/NNN.png`` (``n_train``), ``test/good`` and ``test/<defect>`` (``n_test`` in
    all, ``round(n_test * anomaly_fraction)`` anomalous, spread evenly over the category's defect types)
    and ``ground_truth/<defect>/NNN_mask.png`` (0/255). ``root/fastproto_synthetic.json`` records the
    parameters; if it already records the same parameters the existing dataset is reused. Existing category
    folders are otherwise an error unless ``overwrite=True`` (they are then replaced).
    """
    root = Path(root)
    params = generator_params(categories, CATEGORIES, "synthetic", n_train=n_train, n_test=n_test, size=size,
                              min_size=64, seed=seed, anomaly_fraction=anomaly_fraction)
    categories = params["categories"]
    if prepare_root(root, params, META_FILE, _VERSION, overwrite, "a synthetic dataset"):
        return root
    jobs, summary = [], {}
    for c in categories:
        key, types = zlib.crc32(c.encode()), CATEGORIES[c]
        jobs += [(c, [seed, key, 0, i], "good", root / c / "train" / "good" / f"{i:03d}.png") for i in range(n_train)]
        n_anom = round(n_test * anomaly_fraction)
        plan = ["good"] * (n_test - n_anom) + [types[k % len(types)] for k in range(n_anom)]
        counts = dict.fromkeys(["good", *types], 0)
        for i, defect in enumerate(plan):
            jobs.append((c, [seed, key, 1, i], defect, root / c / "test" / defect / f"{counts[defect]:03d}.png"))
            counts[defect] += 1
        summary[c] = {"defects": list(types), "train": n_train, "test": {k: v for k, v in counts.items() if v}}

    def work(job):
        category, entropy, defect, path = job
        sample = make_image(category, np.random.default_rng(entropy), size, defect)
        _save_png(sample.image, path)
        if defect != "good":
            _save_png(sample.mask.astype(np.uint8) * 255,
                      root / category / "ground_truth" / defect / f"{path.stem}_mask.png")

    # every image has its own random stream, so threads (NumPy and PIL release the GIL) keep the bytes fixed
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, jobs))
    write_meta(root, META_FILE, "fastproto.data.synthetic", _VERSION, params, summary,
               "MVTec AD: <category>/{train/good, test/<type>, ground_truth/<type>/<name>_mask.png}")
    return root


def generator_params(categories, known, kind: str, *, n_train: int, n_test: int, size: int, min_size: int,
                     seed: int, anomaly_fraction: float) -> dict:
    """Checked parameters of a generator run (what :func:`prepare_root` and :func:`write_meta` record); raise
    ``ValueError`` for a category not in ``known`` (named, ``kind`` says which generator) or a bad count/size."""
    categories = list(categories)
    for c in categories:
        if c not in known:
            raise ValueError(f"unknown {kind} category {c!r}; available: {list(known)}")
    if not (0 <= anomaly_fraction <= 1) or n_train < 0 or n_test < 0 or size < min_size:
        raise ValueError(f"need n_train >= 0, n_test >= 0, 0 <= anomaly_fraction <= 1 and size >= {min_size}")
    return {"categories": categories, "n_train": n_train, "n_test": n_test, "size": size, "seed": seed,
            "anomaly_fraction": anomaly_fraction}


def prepare_root(root: Path, params: dict, meta_file: str, version: int, overwrite: bool, what: str) -> bool:
    """Get ``root`` ready for a generator run: True when it already holds the dataset of these ``params``
    (recorded in ``meta_file``; reuse it); else clear the category folders this generator owns (those of
    ``params`` and of the recorded run) when ``overwrite``, or raise ``FileExistsError`` naming what is there."""
    meta_path = root / meta_file
    old = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if old.get("version") == version and old.get("params") == params:
        return True
    existing = [c for c in params["categories"] if (root / c).exists()]
    if (existing or old) and not overwrite:
        desc = f"{what} with other parameters ({meta_file})" if old else f"folders {existing}"
        raise FileExistsError(f"{root} already has {desc}; pass overwrite=True to replace it")
    for c in sorted(set(existing) | set(old.get("categories", {}))):  # ours to replace
        shutil.rmtree(root / c, ignore_errors=True)
    meta_path.unlink(missing_ok=True)
    return False


def write_meta(root: Path, meta_file: str, generator: str, version: int, params: dict, summary: dict,
               layout: str) -> None:
    """Record a finished generator run (parameters, per-category counts, layout, licence) in ``meta_file``."""
    meta = {"generator": generator, "version": version, "params": params, "categories": summary,
            "license": "CC0-1.0: procedurally generated, no third-party content", "layout": layout}
    root.mkdir(parents=True, exist_ok=True)
    (root / meta_file).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
