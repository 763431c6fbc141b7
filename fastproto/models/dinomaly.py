"""Dinomaly (Guo et al., CVPR 2025): "less is more" reconstruction on a frozen DINOv2.

Official code ``guojiajeremy/Dinomaly`` (``models/uad.py::ViTill``, ``models/vision_transformer.py``),
re-stated:

* the mean of the backbone block outputs 2..9 (all tokens, cls + registers kept) goes through the
  **noisy bottleneck** ``bMlp(C, 4C, C)``: one dropout (p = 0.2 MVTec / VisA, 0.4 Real-IAD)
  applied to the input, the hidden activations and the output;
* 8 pre-norm blocks with **linear attention** (``elu + 1`` feature map, no eps, no scaling;
  :class:`fastproto.ops.LinearAttention`), attention and MLP residuals, LayerNorm eps 1e-8;
* groups ``[[0..3], [4..7]]`` over the reversed decoder outputs, prefix tokens dropped for the
  comparison;
* loss: global cosine with **hard mining** (gradients of the easiest ``p`` fraction of positions
  x 0.1, ``p`` ramping 0 -> 0.9 over the first 1000 iterations: :meth:`Dinomaly.on_train_iter`).

state_dict keys equal the official ``ViTill``'s: ``encoder.*``, ``bottleneck.0.fc{1,2}.*``,
``decoder.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*``.
"""
from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from fastproto.models import register_model
from fastproto.models._vit_common import (
    Block,
    Mlp,
    ViTADModel,
    default_num_heads,
    mining_ramp,
)
from fastproto.ops import LinearAttention

__all__ = ["Dinomaly"]


@register_model("dinomaly")
class Dinomaly(ViTADModel):
    """Dinomaly on a frozen backbone (see the module docstring).

    Args:
        encoder: frozen backbone (tokens ``[B, P + h*w, C]``).
        num_blocks: decoder blocks (default one per tapped layer: 8).
        num_heads: attention heads (default ``C // 64``: 12 for ViT-B).
        mlp_ratio: decoder MLP width ratio (4).
        bottleneck_ratio: bottleneck hidden width ratio (4: 768 -> 3072 -> 768).
        dropout: noisy-bottleneck dropout (0.2; 0.4 for Real-IAD).
        hard_fraction: final hard-mining fraction ``p`` (0.9).
        hard_factor: gradient factor of the easy positions (0.1).
        hard_ramp_iters: iterations of the linear ramp of ``p`` from 0 (1000).
        **kwargs: the common options of :class:`~fastproto.models._vit_common.ViTADModel`
            (layers, groups, output_size, sigma, score rule, optimizer, impl).
    """

    OPTIMIZER: ClassVar[dict[str, Any]] = {
        "name": "stable_adamw", "lr": 2e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), "eps": 1e-10,
        "amsgrad": True, "schedule": "cosine", "warmup_iters": 100, "min_lr_ratio": 0.1, "grad_clip": 0.1}
    TRAINING: ClassVar[dict[str, Any]] = {"iters": 10_000, "batch_size": 16}

    def __init__(self, encoder: nn.Module, *, num_blocks: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, bottleneck_ratio: float = 4.0, dropout: float = 0.2,
                 hard_fraction: float = 0.9, hard_factor: float = 0.1, hard_ramp_iters: int = 1000, **kwargs: Any):
        super().__init__(encoder, **kwargs)
        dim = self.embed_dim
        heads = num_heads or default_num_heads(dim)
        if not 0.0 <= hard_fraction < 1.0:
            raise ValueError(f"Dinomaly: hard_fraction must be in [0, 1), got {hard_fraction}")
        self.hard_fraction = float(hard_fraction)
        self.hard_factor = float(hard_factor)
        self.hard_ramp_iters = int(hard_ramp_iters)
        #: the mining fraction of the current iteration (0 at iteration 0, as the official ramp)
        self.current_hard_fraction = mining_ramp(0, self.hard_fraction, self.hard_ramp_iters)
        self.bottleneck = nn.ModuleList([Mlp(dim, int(dim * bottleneck_ratio), dim, drop=dropout, input_dropout=True)])
        self.decoder = nn.ModuleList(
            Block(dim, LinearAttention(dim, num_heads=heads, qkv_bias=True), mlp_ratio=mlp_ratio)
            for _ in range(num_blocks or len(self.layers)))
        self._finish_init()

    def decode(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        x = self.bottleneck[0](x)
        outs = []
        for blk in self.decoder:
            x = blk(x)
            outs.append(x)
        return outs, {}

    def on_train_iter(self, it: int, total: int) -> None:
        self.current_hard_fraction = mining_ramp(it, self.hard_fraction, self.hard_ramp_iters)

    def compute_loss(self, en: list[Tensor], de: list[Tensor], extras: dict[str, Tensor]) -> dict[str, Tensor]:
        rec = self.reconstruction_loss(en, de, mode="hard", hard_fraction=self.current_hard_fraction,
                                       hard_factor=self.hard_factor)
        return {"loss": rec, "reconstruction": rec.detach()}
