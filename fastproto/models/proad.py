"""Pro-AD (Zhou et al., arXiv 2506.13097): comprehensive prototypes with a prototype-based constraint.

No official code is public; this follows the paper on Dinomaly's code base:

* Dinomaly's encoder taps (blocks 2..9, all tokens kept), fusion and **noisy bottleneck**
  ``bMlp(C, 4C, C)`` (dropout 0.2 MVTec / 0.3 VisA / 0.4 Real-IAD);
* an expanded set of learnable prototypes ``P in R^{T x C}``, one per token (``T`` = prefix +
  patch tokens: 789 for ViT-B/14 with registers at 392 px), passed through the **same**
  bottleneck with dropout 0;
* 8 decoder layers; each is **one** ViT block's parameters (``norm1``, linear-attention ``attn``
  with one packed ``qkv``, ``norm2``, ``mlp``) shared by both directions (pre-norm, linear cross
  attention :class:`fastproto.ops.LinearCrossAttention`)::

      A     = P + LCA(P, Q, Q)          prototypes aggregate the features
      P'    = A + FFN(A)
      f_rec = Q + LCA(Q, P', P')        features are rebuilt from the prototypes
      f_D   = f_rec + FFN(P')           prototype-based constraint (FFN of the prototypes, not of f_rec)

  ``Q`` <- ``f_D`` and ``P`` <- ``P'`` feed the next layer;
* loss: the distance-weighted decay loss = soft-mining global cosine (gamma = 3).

Parameter count (the paper's Table 1: 62,031,360 trainable, ViT-B/14, C = 768, 392 px)::

    bottleneck  fc1 768*3072 + 3072, fc2 3072*768 + 768                   =  4,722,432
    one layer   norm1 2*768 + qkv 768*2304 + 2304 + proj 768*768 + 768
                + norm2 2*768 + fc1 768*3072 + 3072 + fc2 3072*768 + 768  =  7,087,872
    8 layers                                                               = 56,702,976
    prototypes  789 * 768                                                  =    605,952
    total                                                                  = 62,031,360

i.e. exactly Dinomaly's trainable set (61,425,408) plus the prototype tensor: one LayerNorm pair,
one 4x FFN and one attention per layer (no second block for the reverse direction, no extra
norms or projections), prototypes stored at the width C and no separate prototype bottleneck.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from fastproto.models import register_model
from fastproto.models._vit_common import (
    Block,
    Mlp,
    ViTADModel,
    default_num_heads,
    grid_tokens,
)
from fastproto.ops import LinearCrossAttention

__all__ = ["BidirectionalBlock", "ProAD"]


class BidirectionalBlock(Block):
    """One Pro-AD decoder layer: a ViT block whose parameters serve both directions.

    ``forward(q [B, T, C], p [B, T, C]) -> (f_D, P')`` with ``A = p + attn(norm1(p), norm1(q))``,
    ``P' = A + mlp(norm2(A))``, ``f_D = q + attn(norm1(q), norm1(P')) + mlp(norm2(P'))``.
    The attention must take ``(queries, keys/values)`` (:class:`fastproto.ops.LinearCrossAttention`).
    """

    def forward(self, q: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        h, a = self.norm(self.norm2, self.attend(p, q), p)  # A = P + LCA(P, Q, Q)
        h, p = self.norm(self.norm2, self.mlp(h), a)  # P' = A + FFN(A), and norm2(P') for the constraint
        return q + self.attend(q, p) + self.mlp(h), p


@register_model("proad")
class ProAD(ViTADModel):
    """Pro-AD on a frozen backbone (see the module docstring).

    Args:
        encoder: frozen backbone (tokens ``[B, P + h*w, C]``).
        image_size: training/test image size; sets the number of prototypes when
            ``num_prototypes`` is None (392 -> 789 tokens with DINOv2-B/14-reg).
        num_prototypes: ``T``; must equal the tokens per image (the constraint adds the prototypes'
            FFN to the features position by position).
        num_blocks: decoder layers (default one per tapped layer: 8).
        num_heads: attention heads (default ``C // 64``).
        mlp_ratio: FFN width ratio (4).
        bottleneck_ratio: bottleneck hidden width ratio (4).
        dropout: noisy-bottleneck dropout on the features (0.2; 0.3 VisA, 0.4 Real-IAD).
        gamma: distance-weighted decay (soft-mining) exponent (3).
        **kwargs: common options of :class:`~fastproto.models._vit_common.ViTADModel`.

    Prototype init: standard normal (as INP-Former's tokens; the paper does not state it).
    """

    #: paper: StableAdamW lr 1e-4, wd 1e-5, 10 warm-up epochs then cosine, 200 epochs, batch 16; the
    #: cosine floor (0.1x), betas, eps, amsgrad and grad clip are not stated and follow Dinomaly / INP-Former
    OPTIMIZER: ClassVar[dict[str, Any]] = {
        "name": "stable_adamw", "lr": 1e-4, "weight_decay": 1e-5, "betas": (0.9, 0.999), "eps": 1e-10,
        "amsgrad": True, "schedule": "cosine", "warmup_epochs": 10, "min_lr_ratio": 0.1, "grad_clip": 0.1}
    TRAINING: ClassVar[dict[str, Any]] = {"epochs": 200, "batch_size": 16}

    def __init__(self, encoder: nn.Module, *, image_size: int | tuple[int, int] = 392,
                 num_prototypes: int | None = None, num_blocks: int | None = None, num_heads: int | None = None,
                 mlp_ratio: float = 4.0, bottleneck_ratio: float = 4.0, dropout: float = 0.2, gamma: float = 3.0,
                 **kwargs: Any):
        super().__init__(encoder, **kwargs)
        dim = self.embed_dim
        heads = num_heads or default_num_heads(dim)
        tokens = grid_tokens(encoder, image_size) if num_prototypes is None else int(num_prototypes)
        if tokens < 1:
            raise ValueError(f"ProAD: num_prototypes must be >= 1, got {tokens}")
        self.gamma = float(gamma)
        self.prototypes = nn.Parameter(torch.randn(tokens, dim))
        self.bottleneck = nn.ModuleList([Mlp(dim, int(dim * bottleneck_ratio), dim, drop=dropout, input_dropout=True)])
        self.decoder = nn.ModuleList(
            BidirectionalBlock(dim, LinearCrossAttention(dim, num_heads=heads, qkv_bias=True), mlp_ratio=mlp_ratio)
            for _ in range(num_blocks or len(self.layers)))
        self._finish_init()

    def decode(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        if x.shape[1] != self.prototypes.shape[0]:
            raise ValueError(
                f"ProAD: the images give {x.shape[1]} tokens but the model has {self.prototypes.shape[0]} "
                "prototypes (one per token); build it with the image size used (image_size=...) or "
                "num_prototypes equal to prefix + patch tokens")
        bottleneck = self.bottleneck[0]
        q = bottleneck(x)
        p = bottleneck(self.prototypes, noise=False).unsqueeze(0).expand(x.shape[0], -1, -1)
        outs = []
        for blk in self.decoder:
            q, p = blk(q, p)
            outs.append(q)
        return outs, {}

    def compute_loss(self, en: list[Tensor], de: list[Tensor], extras: dict[str, Tensor]) -> dict[str, Tensor]:
        rec = self.reconstruction_loss(en, de, mode="soft", gamma=self.gamma)
        return {"loss": rec, "reconstruction": rec.detach()}
