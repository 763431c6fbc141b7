"""Make a CNN look like a ViT: equal-width token maps on one grid, fixed and non-trainable.

:class:`TokenAdapter` wraps a :class:`~fastproto.backbones.cnn.ConvBackbone` and exposes the
:class:`~fastproto.backbones.Backbone` interface that the ViT-family models (INP-Former, Dinomaly,
Pro-AD, UIP-AD) consume: layer ``i`` is tap ``taps[i]``, ``num_prefix_tokens = 0`` and
``patch_size`` = the grid stride. For each tap:

1. **Grid.** The map (stride s) is brought to the token grid ``(H / stride, W / stride)``: average
   pooling when it is larger (s < stride: exact ``s/stride`` box average), bilinear interpolation
   (``align_corners=False``) when it is smaller (s > stride), unchanged when equal.
2. **Width.** Channels ``C_i`` are mapped to ``embed_dim`` by a fixed matrix ``W_i [embed_dim, C_i]``
   (a persistent buffer, so checkpoints carry it): a seeded Haar-random matrix with orthonormal
   columns when ``C_i <= embed_dim`` -- an isometry, so norms, inner products and hence every
   cosine distance the AD losses and anomaly maps use are exactly those of the CNN features --
   and orthonormal rows scaled by ``sqrt(C_i / embed_dim)`` otherwise (norm-preserving on
   average). A random rotation rather than zero-padding spreads every tap over all channels, so
   the trainable decoder's LayerNorms and Linear layers see no dead channels; each tap gets its own
   matrix (seed ``seed + i``), generated in float64 on the CPU, so the same seed gives the same
   tokens everywhere.
3. **Input normalisation.** Images normalised with ``input_mean`` / ``input_std`` (default
   ImageNet, as the ViT pipelines) are re-normalised to what the CNN weights expect.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.backbones import Backbone
from fastproto.backbones.cnn import IMAGENET_MEAN, IMAGENET_STD, ConvBackbone, efficientnet_lite0

__all__ = ["TokenAdapter", "fixed_projection", "resize_to_grid", "efficientnet_lite0_tokens",
           "EFFICIENTNET_LITE0_TAPS"]

#: default EfficientNet-Lite0 taps: 8 block outputs over the middle of the network, strides 8..32
#: (channels 40, 80, 80, 80, 112, 112, 192, 192); layers 0-3 are mid-level, 4-7 deep, so the
#: ViT-family grouping [[0..3], [4..7]] reads "shallow vs deep" as it does on DINOv2.
EFFICIENTNET_LITE0_TAPS = ("blocks.2.1", "blocks.3.0", "blocks.3.1", "blocks.3.2",
                           "blocks.4.1", "blocks.4.2", "blocks.5.1", "blocks.5.3")


def fixed_projection(in_dim: int, out_dim: int, seed: int) -> Tensor:
    """``[out_dim, in_dim]`` float32 matrix: orthonormal columns if ``in_dim <= out_dim``, else
    orthonormal rows times ``sqrt(in_dim / out_dim)``; Haar-distributed, a pure function of the
    arguments (float64 CPU QR with the sign convention ``diag(R) > 0``)."""
    gen = torch.Generator().manual_seed(int(seed))
    big, small = max(in_dim, out_dim), min(in_dim, out_dim)
    q, r = torch.linalg.qr(torch.randn(big, small, generator=gen, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    w = q if in_dim <= out_dim else q.T * (in_dim / out_dim) ** 0.5
    return w.float().contiguous()


def resize_to_grid(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, C, *grid]``: box average when larger, bilinear when smaller."""
    if tuple(x.shape[-2:]) == tuple(grid):
        return x
    if x.shape[-2] >= grid[0] and x.shape[-1] >= grid[1]:
        return F.adaptive_avg_pool2d(x, grid)
    return F.interpolate(x, size=grid, mode="bilinear", align_corners=False)


class TokenAdapter(Backbone):
    """A frozen :class:`ConvBackbone` as a token :class:`Backbone` (see the module docstring).

    Args:
        cnn: the feature extractor.
        taps: tap names of ``cnn``, one per layer (layer ``i`` = ``taps[i]``).
        embed_dim: common token width.
        stride: token grid stride in pixels (``patch_size``); images must be multiples of it.
        seed: seed of the fixed projections.
        input_mean, input_std: normalisation of the incoming images.
    """

    num_prefix_tokens = 0

    def __init__(self, cnn: ConvBackbone, taps: Sequence[str], embed_dim: int = 256, stride: int = 16,
                 seed: int = 0, input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.cnn = cnn
        self.taps = cnn.check_taps(taps)
        self.embed_dim = int(embed_dim)
        self.patch_size = int(stride)
        self.num_layers = len(self.taps)
        self.seed = int(seed)
        self.projections = nn.ModuleList(
            _Projection(fixed_projection(cnn.taps[t][0], self.embed_dim, self.seed + i)) for i, t in enumerate(self.taps))
        # x_cnn = (x_in * input_std + input_mean - mean) / std = x_in * scale + shift
        mean, std = torch.tensor(cnn.mean), torch.tensor(cnn.std)
        self.register_buffer("input_scale", (torch.tensor(input_std) / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_shift", ((torch.tensor(input_mean) - mean) / std).view(1, 3, 1, 1),
                             persistent=False)
        self.freeze()

    def _forward_layers(self, images: Tensor, layers: list[int]) -> list[Tensor]:
        grid = self.grid_size(images.shape[-2:])
        images = images * self.input_scale.to(images.dtype) + self.input_shift.to(images.dtype)
        needed = sorted(set(layers))
        maps = dict(zip(needed, self.cnn.forward_taps(images, [self.taps[i] for i in needed])))
        return [self.projections[i](resize_to_grid(maps[i], grid).flatten(2).transpose(1, 2)) for i in layers]

    def extra_repr(self) -> str:
        return f"taps={self.taps}, embed_dim={self.embed_dim}, stride={self.patch_size}, seed={self.seed}"


class _Projection(nn.Module):
    """Fixed linear map by the buffer ``weight [out, in]`` (saved in the state_dict)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def efficientnet_lite0_tokens(pretrained: bool | str = False, *, taps: Sequence[str] = EFFICIENTNET_LITE0_TAPS,
                              embed_dim: int = 256, stride: int = 16, seed: int = 0,
                              input_mean: Sequence[float] = IMAGENET_MEAN, input_std: Sequence[float] = IMAGENET_STD,
                              **cnn_kwargs) -> TokenAdapter:
    """``create("efficientnet_lite0")``: EfficientNet-Lite0 (ImageNet weights with ``pretrained=True``)
    behind the token adapter; 8 layers (:data:`EFFICIENTNET_LITE0_TAPS`), width 256, stride 16."""
    return TokenAdapter(efficientnet_lite0(pretrained, **cnn_kwargs), taps, embed_dim, stride, seed,
                        input_mean, input_std)
