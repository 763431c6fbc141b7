"""Plain-PyTorch reference of the anomaly-map post-processing (DESIGN "Ops" item 6).

This is the ground truth the Triton path is tested against, and the implementation used for CPU
tensors (and for inputs that need autograd). It follows the official Dinomaly / INP-Former
evaluation (``utils.py``: ``cal_anomaly_maps``, ``get_gaussian_kernel``, ``evaluation_batch``) and
ADer's ``Evaluator`` (``util/metric.py``) step by step:

1. optional layer groups: the features of a group are averaged (an unweighted mean, as Dinomaly's
   and INP-Former's ``fuse_feature``) *before* the cosine;
2. per (encoder, decoder) pair ``d = 1 - cos`` over channels, ``eps = 1e-8`` clamping each norm
   separately (``torch.nn.functional.cosine_similarity``);
3. bilinear upsampling of every ``d`` to ``out_size`` with ``align_corners=True``;
4. the mean (not the sum) over pairs;
5. optional second bilinear resize to ``eval_size`` with ``align_corners=False`` (Dinomaly's and
   INP-Former's ``resize_mask=256`` step, 392 -> 256);
6. optional Gaussian blur: a ``kernel_size`` x ``kernel_size`` kernel (default 5x5, sigma 4)
   normalised to sum 1, applied as a cross-correlation with zero padding of ``kernel_size // 2``.

Everything is computed in float32 (inputs of any floating dtype are cast first).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity's default, used by Dinomaly/INP-Former

__all__ = [
    "anomaly_map",
    "gaussian_blur",
    "gaussian_kernel2d",
    "image_score",
    "pair_distances",
    "COSINE_EPS",
]


def as_bchw(x: torch.Tensor) -> torch.Tensor:
    """View a feature tensor as [B, C, h, w]: 4-D tensors as they are, ViT tokens [B, N, C]
    (N = h*w, square grid, prefix tokens already removed) as a permuted view (no copy)."""
    if x.dim() == 4:
        return x
    b, n, c = x.shape
    side = math.isqrt(n)
    return x.reshape(b, side, side, c).permute(0, 3, 1, 2)


def pair_distances(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    groups: Optional[Sequence[Sequence[int]]] = None,
) -> list:
    """``1 - cos`` over channels for every (encoder, decoder) pair, float32 [B, h, w] each.

    With ``groups``, pair ``i`` compares the mean of the encoder features listed in ``groups[i]``
    with the mean of the decoder features listed there. Inputs are assumed validated by
    :mod:`fastproto.ops.anomaly_map`.
    """
    if groups is None:
        pairs = list(zip(encoder_features, decoder_features))
    else:
        pairs = []
        for members in groups:
            e = torch.stack([as_bchw(encoder_features[i]).float() for i in members], dim=0).mean(dim=0)
            d = torch.stack([as_bchw(decoder_features[i]).float() for i in members], dim=0).mean(dim=0)
            pairs.append((e, d))
    out = []
    for e, d in pairs:
        e = as_bchw(e).float()
        d = as_bchw(d).float()
        out.append(1.0 - F.cosine_similarity(e, d, dim=1, eps=COSINE_EPS))
    return out


def gaussian_kernel2d(sigma: float, kernel_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The 2-D Gaussian of Dinomaly's ``get_gaussian_kernel``: an isotropic Gaussian evaluated at
    integer offsets from the kernel centre ``(kernel_size - 1) / 2``, then divided by its sum.
    Shape [kernel_size, kernel_size]."""
    coords = torch.arange(kernel_size, dtype=dtype, device=device)
    centre = (kernel_size - 1) / 2.0
    variance = float(sigma) ** 2
    sq = (coords[None, :] - centre) ** 2 + (coords[:, None] - centre) ** 2
    kernel = (1.0 / (2.0 * math.pi * variance)) * torch.exp(-sq / (2.0 * variance))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, kernel_size: int = 5) -> torch.Tensor:
    """Zero-padded Gaussian blur of [B, H, W] or [B, 1, H, W] maps (same shape out).

    float16/bfloat16 inputs are computed and returned in float32; float32 and float64 keep their
    dtype. The kernel is built in the output dtype, exactly as Dinomaly builds it."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps
    dtype = torch.promote_types(x.dtype, torch.float32)
    # On CUDA, cuDNN may run float32 convolutions in TF32 (torch.backends.cudnn.allow_tf32 is True
    # by default), which costs ~1e-5 absolute on typical maps: convolve in float64 there instead.
    conv_dtype = torch.float64 if x.is_cuda else dtype
    x = x.to(conv_dtype)
    weight = gaussian_kernel2d(sigma, kernel_size, dtype=dtype, device=x.device).to(conv_dtype)
    y = F.conv2d(x, weight[None, None], padding=kernel_size // 2).to(dtype)
    return y[:, 0] if squeeze else y


def anomaly_map(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    out_size: Tuple[int, int],
    *,
    groups: Optional[Sequence[Sequence[int]]] = None,
    sigma: Optional[float] = 4.0,
    kernel_size: int = 5,
    eval_size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """Reference anomaly map, float32 [B, H, W] (H, W = ``eval_size`` or ``out_size``).

    ``out_size`` / ``eval_size`` are (H, W) tuples; validation happens in
    :func:`fastproto.ops.anomaly_map`."""
    dists = pair_distances(encoder_features, decoder_features, groups)
    ups = [
        F.interpolate(d.unsqueeze(1), size=tuple(out_size), mode="bilinear", align_corners=True)
        for d in dists
    ]
    amap = torch.cat(ups, dim=1).mean(dim=1, keepdim=True)
    if eval_size is not None:
        amap = F.interpolate(amap, size=tuple(eval_size), mode="bilinear", align_corners=False)
    if sigma is not None:
        amap = gaussian_blur(amap, sigma=sigma, kernel_size=kernel_size)
    return amap[:, 0]


def image_score(maps: torch.Tensor, rule: str = "max", *, topk: float = 0.01, pool_size=16) -> torch.Tensor:
    """Image score [B] from maps [B, H, W] / [B, 1, H, W] (validated by the ops layer).

    - ``max``: the maximum of each map;
    - ``topk_mean``: the mean of the ``int(H * W * topk)`` largest values (Dinomaly's and
      INP-Former's ``max_ratio``: sort descending, keep the first ``int(N * ratio)``; int() truncates);
    - ``avgpool_max``: ``avg_pool2d(kernel=pool_size, stride=1, no padding)`` then the maximum
      (ADer's ``pooling_ks``).
    """
    if maps.dim() == 4:
        maps = maps[:, 0]
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
    b, h, w = maps.shape
    flat = maps.reshape(b, h * w)
    if rule == "max":
        return flat.max(dim=1).values
    if rule == "topk_mean":
        k = int(h * w * topk)
        return torch.topk(flat, k, dim=1, largest=True, sorted=True).values.mean(dim=1)
    if rule == "avgpool_max":
        ph, pw = (pool_size, pool_size) if isinstance(pool_size, int) else tuple(pool_size)
        pooled = F.avg_pool2d(maps.unsqueeze(1), (ph, pw), stride=1)
        return pooled.reshape(b, -1).max(dim=1).values
    raise ValueError(f"unknown image score rule {rule!r}")
