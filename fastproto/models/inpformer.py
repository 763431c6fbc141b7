"""INP-Former (Luo et al., CVPR 2025): intrinsic normal prototypes guide the reconstruction.

Official code ``luow23/INP-Former`` (``models/uad.py::INP_Former``, ``models/vision_transformer.py``),
re-stated:

* the prefix tokens are dropped first (``remove_class_token=True``); ``F`` = mean of the patch
  tokens of backbone blocks 2..9;
* **INP extractor** (``aggregation``, 1 block): ``M = 6`` learnable tokens (``prototype_token``,
  standard-normal init) cross-attend to ``F`` with softmax attention (same ``norm1`` on both
  sides), residual + MLP, giving per-image prototypes ``P [B, 6, C]``;
* bottleneck ``Mlp(C, 4C, C)`` without dropout;
* **INP-guided decoder**, 8 blocks: tokens attend to ``P`` only, with ``ReLU(learn_scale_h *
  cos(q, k))`` weights (no softmax; :class:`fastproto.ops.PrototypeAttention`) and **no attention
  residual** (``x = attn(...)``; then ``x + mlp(norm2(x))``);
* loss: soft-mining global cosine (gradient x ``(d / mean d) ** 3``) + 0.2 x coherence
  ``mean_n min_m (1 - cos(F_n, P_m))``.

state_dict keys equal the official ``INP_Former``'s: ``prototype_token``, ``encoder.*``,
``bottleneck.0.*``, ``aggregation.0.{norm1, attn.q, attn.kv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``,
``decoder.{i}.{norm1, attn.learn_scale, attn.q, attn.kv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastproto.models import register_model
from fastproto.models._vit_common import (
    AggregationAttention,
    Block,
    Mlp,
    ViTADModel,
    default_num_heads,
)
from fastproto.ops import PrototypeAttention, coherence_loss

__all__ = ["INPFormer"]


@register_model("inpformer")
class INPFormer(ViTADModel):
    """INP-Former on a frozen backbone (see the module docstring).

    Args:
        encoder: frozen backbone (tokens ``[B, P + h*w, C]``).
        num_prototypes: INP tokens ``M`` (6).
        num_aggregation_blocks: INP extractor blocks (1, as the official code, whose loop supports
            only one; more blocks refine the prototypes in turn).
        num_blocks: decoder blocks (default one per tapped layer: 8).
        num_heads: attention heads (default ``C // 64``).
        mlp_ratio: MLP width ratio of every block (4).
        bottleneck_ratio: bottleneck hidden width ratio (4).
        dropout: bottleneck dropout (0: INP-Former's bottleneck is not noisy).
        gamma: soft-mining exponent (3).
        coherence_weight: weight of the INP coherence loss (0.2).
        **kwargs: common options of :class:`~fastproto.models._vit_common.ViTADModel`.
    """

    strip_prefix_before_decoder = True
    OPTIMIZER: ClassVar[dict[str, Any]] = {
        "name": "stable_adamw", "lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), "eps": 1e-10,
        "amsgrad": True, "schedule": "cosine", "warmup_iters": 100, "min_lr_ratio": 0.1, "grad_clip": 0.1}
    TRAINING: ClassVar[dict[str, Any]] = {"epochs": 200, "batch_size": 16}

    def __init__(self, encoder: nn.Module, *, num_prototypes: int = 6, num_aggregation_blocks: int = 1,
                 num_blocks: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 bottleneck_ratio: float = 4.0, dropout: float = 0.0, gamma: float = 3.0,
                 coherence_weight: float = 0.2, **kwargs: Any):
        super().__init__(encoder, **kwargs)
        dim = self.embed_dim
        heads = num_heads or default_num_heads(dim)
        if num_prototypes < 1 or num_aggregation_blocks < 1:
            raise ValueError(f"INPFormer: num_prototypes and num_aggregation_blocks must be >= 1, got "
                             f"{num_prototypes} and {num_aggregation_blocks}")
        self.gamma = float(gamma)
        self.coherence_weight = float(coherence_weight)
        self.prototype_token = nn.Parameter(torch.randn(num_prototypes, dim))
        self.aggregation = nn.ModuleList(
            Block(dim, AggregationAttention(dim, heads, qkv_bias=True), mlp_ratio=mlp_ratio)
            for _ in range(num_aggregation_blocks))
        self.bottleneck = nn.ModuleList([Mlp(dim, int(dim * bottleneck_ratio), dim, drop=dropout)])
        self.decoder = nn.ModuleList(
            Block(dim, PrototypeAttention(dim, num_heads=heads, qkv_bias=True), mlp_ratio=mlp_ratio,
                  attn_residual=False)
            for _ in range(num_blocks or len(self.layers)))
        self._finish_init()

    def prototypes(self, x: Tensor) -> Tensor:
        """Per-image INPs ``[B, M, C]`` extracted from the fused patch tokens ``x [B, N, C]``."""
        p = self.prototype_token.unsqueeze(0).expand(x.shape[0], -1, -1)
        for blk in self.aggregation:
            p = blk(p, x)
        return p

    def decode(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        p = self.prototypes(x)
        h = self.bottleneck[0](x)
        outs = []
        for blk in self.decoder:
            h = blk(h, p)
            outs.append(h)
        return outs, {"prototypes": p, "fused": x}

    def compute_loss(self, en: list[Tensor], de: list[Tensor], extras: dict[str, Tensor]) -> dict[str, Tensor]:
        rec = self.reconstruction_loss(en, de, mode="soft", gamma=self.gamma)
        coh = coherence_loss(extras["fused"].float(), extras["prototypes"].float(), impl=self.impl)
        total = rec + self.coherence_weight * coh
        return {"loss": total, "reconstruction": rec.detach(), "coherence": coh.detach()}
