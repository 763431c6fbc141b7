"""Connected components of binary ground-truth masks and the pixel split the curve engines consume.

Dispatch: the compiled op (C++ two-pass union-find on the CPU, union-find kernels on CUDA) when the
extension provides it for the tensor's device, else ``scipy.ndimage.label`` per image.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.ndimage
import torch

from fastproto import _ext


def _as_bool_masks(masks) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B,H,W], got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        masks = masks > 0.5 if masks.is_floating_point() else masks != 0
    return masks.contiguous()


def _scipy_labels(masks: torch.Tensor, connectivity: int) -> tuple[torch.Tensor, np.ndarray]:
    structure = np.ones((3, 3)) if connectivity == 8 else scipy.ndimage.generate_binary_structure(2, 1)
    m = masks.cpu().numpy()
    out = np.zeros(m.shape, dtype=np.int32)
    counts = np.zeros(m.shape[0], dtype=np.int64)
    for b in range(m.shape[0]):  # fallback path only; the compiled op labels the batch at once
        if m[b].any():
            out[b], counts[b] = scipy.ndimage.label(m[b], structure=structure)
    return torch.from_numpy(out).to(masks.device), counts


def _check_connectivity(connectivity: int) -> None:
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")


def connected_components(masks, connectivity: int = 8, *, impl: str = "auto") -> torch.Tensor:
    """Label the connected regions of each binary mask.

    Args:
        masks: ``[B,H,W]`` bool/uint8/float (float binarised with ``> 0.5``), torch or NumPy.
        connectivity: 8 (MVTec AD official, default) or 4.
        impl: ``"auto"`` (compiled op if available), ``"ext"`` (require it) or ``"reference"`` (scipy).

    Returns:
        int32 ``[B,H,W]`` labels, ``1..K_b`` per image in raster order of first appearance, 0 = background.
    """
    _check_connectivity(connectivity)
    masks = _as_bool_masks(masks)
    device = masks.device.type
    if impl not in ("auto", "ext", "reference"):
        raise ValueError(f"impl must be 'auto', 'ext' or 'reference', got {impl!r}")
    use_ext = impl != "reference" and _ext.has_op("connected_components", device)
    if impl == "ext" and not use_ext:
        raise RuntimeError(f"the compiled connected_components op is not available for {device} tensors")
    if use_ext:
        return _ext.op("connected_components")(masks, connectivity)
    return _scipy_labels(masks, connectivity)[0]


class PixelSplit(NamedTuple):
    """Scores of normal pixels, scores of anomalous pixels with their region sizes, region count."""

    neg: torch.Tensor  # float32 [n]
    pos: torch.Tensor  # float32 [p]
    pos_sizes: torch.Tensor  # int32 [p]
    n_regions: int


def split_pixels(maps: torch.Tensor, masks: torch.Tensor, connectivity: int = 8, *, impl: str = "auto") -> PixelSplit:
    """Split float32 maps ``[B,H,W]`` by bool masks into the inputs of the curve engines (image-major order)."""
    _check_connectivity(connectivity)
    device = maps.device.type
    if impl != "reference" and _ext.has_op("split_pixels", device):
        neg, pos, sizes, n_regions = _ext.op("split_pixels")(maps.contiguous(), masks.contiguous(), connectivity)
        return PixelSplit(neg, pos, sizes, int(n_regions))
    labels, counts = _scipy_labels(masks, connectivity)
    offsets = torch.as_tensor(np.r_[0, np.cumsum(counts)[:-1]], device=maps.device).view(-1, 1, 1)
    glob = torch.where(labels > 0, labels.long() + offsets, 0)
    sizes = torch.bincount(glob.flatten(), minlength=int(counts.sum()) + 1)
    pos_labels = glob[masks]
    return PixelSplit(maps[~masks], maps[masks], sizes[pos_labels].int(), int(counts.sum()))
