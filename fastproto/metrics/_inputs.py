"""Validation and normalisation of evaluator inputs: every problem is a clear error naming the input."""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


def as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)):
        return torch.as_tensor(np.asarray(x))
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _squeeze_channel(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"{name} must be [B,H,W] (or [B,1,H,W]), got shape {tuple(t.shape)}")
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    # A sum is finite when every value is (NaN and Inf propagate) unless finite values overflow it; it costs
    # one reduction and no copy. The element-wise check runs only when the sum is not finite.
    if bool(torch.isfinite(t.sum())):
        return
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = []
        if bool(torch.isnan(t).any()):
            kinds.append("NaN")
        if bool(torch.isinf(t).any()):
            kinds.append("Inf")
        raise ValueError(f"{name} contains {bad} non-finite value(s) ({'/'.join(kinds)}); metrics would be undefined")


def prepare_maps(maps, name: str = "anomaly_maps", device=None) -> torch.Tensor:
    t = _squeeze_channel(as_tensor(maps, name), name)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real-valued tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if device is not None:
        t = t.to(device)
    if t.dtype == torch.float64:
        # float32 is the evaluation precision (scores are stored as float32); say so when rounding
        # changes values, since it can merge distinct scores into ties.
        f32 = t.float()
        if not torch.equal(f32.double(), t):
            warnings.warn(f"{name} is float64; it is evaluated as float32, which rounds its values "
                          "(distinct scores closer than float32 resolution become ties)", stacklevel=3)
        t = f32
    t = t.float().contiguous()
    check_finite(t, name)
    return t


def prepare_masks(masks, shape, name: str = "masks", device=None, threshold: float = 0.5) -> torch.Tensor:
    t = _squeeze_channel(as_tensor(masks, name), name)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match anomaly_maps shape {tuple(shape)}")
    if device is not None:
        t = t.to(device)
    if t.dtype == torch.bool:
        return t.contiguous()
    if t.is_floating_point():
        check_finite(t, name)
        lo, hi = float(t.min()), float(t.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} has values in [{lo:g}, {hi:g}]; float masks must lie in [0, 1] "
                             "(divide 0/255 masks by 255 or pass bool)")
        return (t > threshold).contiguous()
    values = torch.unique(t)
    allowed = ({0, 1}, {0, 255})
    found = {int(v) for v in values.tolist()[:16]}
    if not any(found <= a for a in allowed):
        raise ValueError(f"{name} is not binary: found values {sorted(found)}; integer masks must hold "
                         "{0, 1} or {0, 255}")
    return (t != 0).contiguous()


def prepare_vector(x, batch: int, name: str, device, *, binary: bool = False) -> torch.Tensor:
    t = as_tensor(x, name).to(device).reshape(-1)
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} entries but the batch has {batch} images")
    if binary:
        if t.dtype != torch.bool:
            if t.is_floating_point():
                check_finite(t, name)
            found = set(torch.unique(t).tolist())
            if not found <= {0, 1}:
                raise ValueError(f"{name} must be 0/1 or bool, found values {sorted(found)[:8]}")
            t = t != 0
        return t
    if not t.is_floating_point():
        t = t.float()
    check_finite(t, name)
    return t.float()


def resize(maps: torch.Tensor, masks: torch.Tensor, resolution):
    """Maps bilinear (align_corners=False), masks nearest, to ``resolution`` (int or (H, W)); None keeps."""
    if resolution is None:
        return maps, masks
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if tuple(maps.shape[-2:]) == size:
        return maps, masks
    maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].contiguous()
    masks = F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return maps, masks.contiguous()


def normalize_categories(categories, batch: int) -> list[str]:
    if categories is None:
        return ["all"] * batch
    if isinstance(categories, str):
        return [categories] * batch
    cats = [str(c) for c in categories]
    if len(cats) != batch:
        raise ValueError(f"categories has {len(cats)} entries but the batch has {batch} images")
    return cats
