"""Preprocessing of images and ground-truth masks, as in the papers' code (PIL + torch, no torchvision).

Images (Dinomaly / INP-Former ``get_data_transforms(448, 392)``): PIL resize to a fixed square (bilinear,
with PIL's antialiasing when downscaling, as ``torchvision.transforms.Resize`` does on PIL images), centre
crop (torchvision's offsets: ``round((size - crop) / 2)``), scale to [0, 1], ImageNet mean/std.

Masks: binarised at load time (:func:`binarize_mask`), resized with nearest neighbour, centre-cropped and
returned as float {0, 1}. Nearest resizing commutes with thresholding, so this equals "resize nearest,
crop, binarise > 0.5" (DESIGN.md); unlike the papers' bilinear mask resize it never grows or shrinks a
defect.

:func:`fewshot_augmentations` gives the INP-Former few-shot expansion (22 fixed views per image).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocess",
    "binarize_mask",
    "fewshot_augmentations",
    "to_grey",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights (kornia / PIL "L")


def _pair(size: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        raise ValueError(f"{name} must be a positive int or (height, width), got {size!r}")
    return h, w


def binarize_mask(mask: Image.Image, rule: str = "half") -> np.ndarray:
    """Boolean [H, W] defect mask from a ground-truth image of any PIL mode.

    ``rule="half"``: value > half of the mode's full scale (0/255 masks; ``> 0.5`` after ``ToTensor``).
    ``rule="nonzero"``: any non-zero value (label-id masks such as raw VisA). Palette images are always
    read as label ids (index != 0). Multi-channel masks take the channel maximum.
    """
    if rule not in ("half", "nonzero"):
        raise ValueError(f"rule must be 'half' or 'nonzero', got {rule!r}")
    if mask.mode == "P":
        return np.asarray(mask) != 0
    if mask.mode == "1":
        return np.asarray(mask, dtype=bool)
    if mask.mode in ("RGBA", "LA"):  # alpha is not part of the annotation
        mask = mask.convert({"RGBA": "RGB", "LA": "L"}[mask.mode])
    arr = np.asarray(mask)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if rule == "nonzero":
        return arr != 0
    # 16-bit PNGs open as "I;16" (or "I" in older Pillow); float masks are in [0, 1]
    full = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I": 65535, "F": 1.0}.get(mask.mode, 255)
    return arr > full / 2


class Preprocess:
    """Resize + centre crop + normalise images; nearest resize + centre crop masks.

    Args:
        image_size: target of the resize, int (square, the papers' ``Resize((s, s))``: the aspect ratio is
            not kept) or (height, width); ``None`` keeps the original size.
        crop_size: centre crop, int or (height, width); ``None`` means no crop.
        mean, std: per-channel normalisation of the [0, 1] image; ``None`` skips normalisation.
        interpolation: image resampling, ``"bilinear"`` (papers' default), ``"bicubic"`` or ``"nearest"``.
    """

    def __init__(self, image_size: int | Sequence[int] | None = 448, crop_size: int | Sequence[int] | None = 392,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 interpolation: str = "bilinear"):
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.image_size = _pair(image_size, "image_size")
        self.crop_size = _pair(crop_size, "crop_size")
        self.interpolation = interpolation
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __repr__(self) -> str:
        return (f"Preprocess(image_size={self.image_size}, crop_size={self.crop_size}, "
                f"interpolation={self.interpolation!r}, normalize={self.mean is not None})")

    def output_size(self, size_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the output for an input of ``size_hw``."""
        h, w = self.image_size or size_hw
        if self.crop_size is None:
            return h, w
        ch, cw = self.crop_size
        if ch > h or cw > w:
            raise ValueError(f"crop {self.crop_size} is larger than the resized image {(h, w)}")
        return ch, cw

    def _crop(self, t: torch.Tensor) -> torch.Tensor:
        if self.crop_size is None:
            return t
        h, w = t.shape[-2:]
        ch, cw = self.output_size((h, w))
        top, left = round((h - ch) / 2), round((w - cw) / 2)  # torchvision's offsets
        return t[..., top:top + ch, left:left + cw]

    def image(self, img: Image.Image) -> torch.Tensor:
        """float32 [3, H, W] (normalised unless ``mean``/``std`` are ``None``)."""
        img = img.convert("RGB")
        if self.image_size is not None and img.size != self.image_size[::-1]:
            img = img.resize(self.image_size[::-1], _RESAMPLE[self.interpolation])
        t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        t = self._crop(t).float().div_(255.0)
        return self.normalize(t)

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """[0, 1] image(s) [..., 3, H, W] -> normalised."""
        return t if self.mean is None else (t - self.mean) / self.std

    def denormalize(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        return t if self.mean is None else t * self.std + self.mean

    def mask(self, mask: np.ndarray | Image.Image | None, size_hw: tuple[int, int]) -> torch.Tensor:
        """float32 [1, H, W] in {0, 1}; ``mask`` is a boolean [H, W] array, a PIL image (binarised with
        :func:`binarize_mask`, ``rule="half"``) or ``None`` (all zeros) for an image of ``size_hw``."""
        if mask is None:
            return torch.zeros((1, *self.output_size(size_hw)), dtype=torch.float32)
        if isinstance(mask, Image.Image):
            mask = binarize_mask(mask)
        pil = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
        if self.image_size is not None and pil.size != self.image_size[::-1]:
            pil = pil.resize(self.image_size[::-1], Image.Resampling.NEAREST)
        t = torch.from_numpy(np.array(pil) > 127).unsqueeze(0)
        return self._crop(t).float()


# --- INP-Former few-shot expansion ------------------------------------------------------------------------


def _affine(x: torch.Tensor, theta: Sequence[Sequence[float]], mode: str) -> torch.Tensor:
    """Sample ``x`` [C, H, W] at ``theta @ (u, v, 1)`` (normalised coordinates), reflection padding."""
    mat = torch.tensor(theta, dtype=torch.float32).unsqueeze(0)
    grid = F.affine_grid(mat, [1, *x.shape], align_corners=False)
    return F.grid_sample(x.unsqueeze(0), grid, mode=mode, padding_mode="reflection", align_corners=False)[0]


def _rotation(angle: float) -> Callable:
    c, s = math.cos(angle), math.sin(angle)
    return lambda x, mode: _affine(x, [[c, -s, 0.0], [s, c, 0.0]], mode)


def _translation(a: float, b: float) -> Callable:
    return lambda x, mode: _affine(x, [[1.0, 0.0, a], [0.0, 1.0, b]], mode)


def fewshot_augmentations() -> list[tuple[str, Callable | None]]:
    """The 22 views of each support image in INP-Former's few-shot setting (its ``augmentation`` helper,
    inherited from RegAD), in order: identity; rotations by -pi/4, -3pi/16, -pi/8, -pi/16, pi/16, pi/8,
    3pi/16, pi/4 (bilinear, reflection padding); translations by (+-0.2, +-0.2) and (+-0.1, +-0.1) in
    normalised coordinates (half of that as a fraction of the side; reflection padding); horizontal flip;
    grey (ITU-R 601 luma, in [0, 1] pixel space); rotations by 90, 180, 270 degrees (exact on square
    images, shape kept otherwise).

    Each entry is ``(name, fn)`` with ``fn(x, mode)`` a geometric map of a [C, H, W] tensor (``mode``:
    grid-sample interpolation, ``"nearest"`` for masks), or ``fn=None`` for the grey view (a colour
    transform, see :func:`to_grey`).
    """
    views: list[tuple[str, Callable | None]] = [("identity", lambda x, mode: x)]
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        views.append((f"rotate{k:+d}pi/16", _rotation(k * math.pi / 16)))
    for a, b in ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1),
                 (0.1, -0.1)):
        views.append((f"translate({a:+.1f},{b:+.1f})", _translation(a, b)))
    views.append(("hflip", lambda x, mode: torch.flip(x, dims=(-1,))))
    views.append(("grey", None))
    for k in (1, 2, 3):  # as a resampled rotation (like kornia's): keeps H x W for non-square images too
        views.append((f"rot90x{k}", _rotation(k * math.pi / 2)))
    return views


def to_grey(x01: torch.Tensor) -> torch.Tensor:
    """[3, H, W] image in [0, 1] -> its luma repeated on 3 channels."""
    w = torch.tensor(_LUMA, dtype=x01.dtype).view(3, 1, 1)
    return (x01 * w).sum(0, keepdim=True).expand(3, -1, -1).contiguous()
