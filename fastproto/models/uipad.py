"""UIP-AD: unified intrinsic prototypes for RGB + depth anomaly detection (ICLR 2026 submission 16616).

No public code; the method is re-stated from the abstract and DESIGN.md, unstated details are our choices
(marked *choice*):

* **Encoder**: one frozen backbone shared by both modalities; the RGB and the depth image (a 3-channel image,
  :mod:`fastproto.data.rgbd`) are stacked along the batch and encoded in one pass (as Dinomaly2's RGB-D model),
  prefix tokens dropped, ``F_m`` = mean of the patch tokens of blocks 2..9 for modality ``m``.
* **Unified feature**: ``F_u = MLP(concat(F_rgb, F_3d))`` per token (``Mlp(2C, 2C, C)``; hidden width *choice*).
* **Unified intrinsic prototypes**: ``M = 12`` learnable tokens cross-attend to ``F_u`` (softmax, SDPA) with
  residual + FFN (one INP-Former ``aggregation`` block) -> per-image ``P [B, M, C]``.
* **Shared bottleneck** ``Mlp(C, 4C, C)`` applied to each decoder's input tokens.
* **Decoder input** (``decoder_input``, *choice*; the abstract says only that the parallel decoders reconstruct
  "under UIP guidance enforcing cross-modal consistency"): ``"cross"`` (default) starts the RGB decoder from the
  depth tokens and the depth decoder from the RGB tokens, so each modality is *predicted* from the other one and
  the unified prototypes (cross-modal feature mapping, as CFM); a colour / shape pairing never seen in training
  is then a reconstruction error in both maps. ``"own"`` starts each decoder from its own tokens (the residual
  stream can carry them straight through, so a pairing that is locally normal in each modality is missed);
  ``"unified"`` starts both from ``F_u``. A single-modality mode always uses its own tokens (``"unified"``: the
  fusion MLP of its one stream). Measured on the synthetic RGB-D set (``bench/rgbd_modes.py``, bench/RESULTS.md):
  with ``"cross"`` the RGB-D model catches the colour / shape swaps (image AUROC 95.0) that its RGB-only (31.2)
  and depth-only (43.8) runs miss.
* **Two decoders** (RGB, depth), each of 8 bidirectional blocks (:class:`BidirectionalBlock`, pre-norm):
  ``F' = F + Attn(F, P, P)`` (tokens -> prototypes, :func:`fastproto.ops.prototype_attention`
  ``kind="softmax"``), ``F' = F' + FFN(F')``, ``P' = P + Attn(P, F', F')`` (prototypes -> tokens, SDPA),
  ``P' = P' + FFN(P')``. Both decoders start from the same ``P``; each carries its own updated copy through
  its blocks (*choice*; the last block has no prototype update: its result would be unused).
* **Losses** (parts weighted by *choice* values; the paper's weights are not public):

  - ``rec``: per modality, the decoders reconstruct the encoder's layer groups (INP-Former's soft-mining
    global cosine loss, gamma 3), averaged over modalities;
  - ``L_s`` (``proto_weight`` 0.2): every modality's features against their *soft prototype target*
    ``softmax(cos(F, P) / tau) @ P`` (:func:`fastproto.ops.route`, ``mode="soft"``, tau 0.1):
    ``mean(1 - cos(F, target))`` -- the prototypes must span the normal features of both modalities;
  - ``L_a`` (``assign_weight`` 0.1): assignment consistency, the symmetric KL divergence between the RGB and
    depth assignment weights of each token (the differentiable form of "same nearest prototype"; the hard
    agreement rate is reported as ``agreement``);
  - ``L_p`` (``usage_weight`` 0.05): prototype usage entropy, ``log M - H(u)`` with ``u`` the per-image mean
    assignment over tokens and modalities (0 when all prototypes are used equally).

* **Score**: per modality, ``1 - cos(x, x̂)`` per group, bilinear upsampling, mean over groups; the unified
  map is the **mean of the RGB and depth maps** (equal to averaging all groups of both modalities), then the
  optional resize and the Gaussian (5 x 5, sigma 4). Image score as the ViT family (max by default).

**Modes** (``mode=``): ``"rgbd"`` (default), ``"rgb"`` or ``"depth"``: the single-modality modes build the
same architecture on one stream (the fusion MLP takes ``C`` inputs, one decoder, no ``L_a``), so the
contribution of each modality can be measured with the same code.

**API**: ``model(images, depth)`` or ``model(batch)`` (a mapping with ``"image"`` and ``"depth"``) or
``model(x6)`` (``[B, 6, H, W]``: RGB then depth channels) -> ``{"anomaly_map": [B, H, W], "score": [B]}``
(plus ``"anomaly_map_rgb"`` / ``"anomaly_map_depth"`` in ``"rgbd"`` mode); ``model.loss(batch)`` with
``batch["image"]`` and ``batch["depth"]`` (a ``"depth"`` mode model needs only ``"depth"``, an ``"rgb"`` one
only ``"image"``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.models import register_model
from fastproto.models._vit_common import (
    LN_EPS,
    AggregationAttention,
    Block,
    Mlp,
    ViTADModel,
    default_num_heads,
    fuse,
    init_trainable,
    tokens_to_map,
)
from fastproto.models.dpdiff import PrototypeCrossAttention
from fastproto.ops import image_score, pre_norm, route

__all__ = ["DECODER_INPUTS", "MODES", "UIPAD", "BidirectionalBlock"]

MODES: dict[str, tuple[str, ...]] = {"rgbd": ("rgb", "depth"), "rgb": ("rgb",), "depth": ("depth",)}
_BATCH_KEYS = {"rgb": "image", "depth": "depth"}
DECODER_INPUTS = ("cross", "own", "unified")


class BidirectionalBlock(nn.Module):
    """Tokens and prototypes update each other (pre-norm, see the module docstring).

    ``forward(x [B, N, C], p [B, M, C]) -> (x', p')``. Token side: ``norm1``, ``attn`` (softmax attention to the
    prototypes through :func:`fastproto.ops.prototype_attention`), ``norm2``, ``mlp``; prototype side (absent
    with ``update_prototypes=False``, then ``p' = p``): ``p_norm1``, ``p_attn`` (SDPA over the updated tokens),
    ``p_norm2``, ``p_mlp``. A stream read as keys / values is normalised with its own first norm.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, update_prototypes: bool = True,
                 impl: str = "auto"):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = PrototypeCrossAttention(dim, num_heads, impl=impl)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, hidden)
        self.p_norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.update_prototypes = update_prototypes
        if update_prototypes:
            self.p_attn = AggregationAttention(dim, num_heads)
            self.p_norm2 = nn.LayerNorm(dim, eps=LN_EPS)
            self.p_mlp = Mlp(dim, hidden)
        self.impl = impl

    def forward(self, x: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        # residual adds and LayerNorms through fastproto.ops.pre_norm (fused unless impl="reference")
        hp = pre_norm(self.p_norm1, p, impl=self.impl)[0]
        h, x = pre_norm(self.norm2, self.attn(pre_norm(self.norm1, x, impl=self.impl)[0], hp), residual=x,
                        impl=self.impl)
        if not self.update_prototypes:
            return x + self.mlp(h), p
        hx, x = pre_norm(self.norm1, self.mlp(h), residual=x, impl=self.impl)  # x + mlp, and norm1 of it for p
        h, p = pre_norm(self.p_norm2, self.p_attn(hp, hx), residual=p, impl=self.impl)
        return x, p + self.p_mlp(h)


def _symmetric_kl(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``mean over tokens of 0.5 (KL(a || b) + KL(b || a))`` for distributions over the last dim."""
    return (0.5 * (a - b) * (torch.log(a + eps) - torch.log(b + eps))).sum(-1).mean()


def _usage_entropy_gap(weights: Tensor) -> Tensor:
    """``log M - H(u)``, ``u = mean over tokens of weights [B, N, M]`` per image, averaged over images."""
    u = weights.mean(1)
    entropy = -(u * torch.log(u.clamp_min(1e-12))).sum(-1)
    return (math.log(weights.shape[-1]) - entropy).mean()


@register_model("uipad")
class UIPAD(ViTADModel):
    """UIP-AD on a frozen backbone shared by RGB and depth (see the module docstring).

    Args:
        encoder: frozen backbone (tokens ``[B, P + h*w, C]``; prefix tokens are dropped).
        mode: ``"rgbd"`` (default), ``"rgb"`` or ``"depth"`` (:data:`MODES`).
        num_prototypes: unified prototypes ``M`` (12).
        num_blocks: blocks per decoder (default one per tapped layer: 8).
        num_heads: attention heads (default ``C // 64``).
        mlp_ratio: FFN width ratio of every block (4).
        bottleneck_ratio: shared bottleneck hidden width ratio (4).
        fusion_ratio: hidden width of the fusion MLP, as a multiple of ``C`` (2).
        dropout: bottleneck dropout (0).
        tau: softmax temperature of the prototype assignment (0.1).
        gamma: soft-mining exponent of the reconstruction loss (3).
        proto_weight, assign_weight, usage_weight: weights of ``L_s`` (0.2), ``L_a`` (0.1), ``L_p`` (0.05).
        decoder_input: ``"cross"`` (default), ``"own"`` or ``"unified"`` (:data:`DECODER_INPUTS`; see the module
            docstring).
        **kwargs: common options of :class:`~fastproto.models._vit_common.ViTADModel` (``layers``, ``groups``,
            ``output_size``, ``sigma``, ``kernel_size``, ``score_rule``, ...).
    """

    strip_prefix_before_decoder = True
    # not published: INP-Former's recipe (the closest prototype model of the same group), our choice
    OPTIMIZER: ClassVar[dict[str, Any]] = {
        "name": "stable_adamw", "lr": 1e-3, "weight_decay": 1e-4, "betas": (0.9, 0.999), "eps": 1e-10,
        "amsgrad": True, "schedule": "cosine", "warmup_iters": 100, "min_lr_ratio": 0.1, "grad_clip": 0.1}
    TRAINING: ClassVar[dict[str, Any]] = {"epochs": 200, "batch_size": 16}

    def __init__(self, encoder: nn.Module, *, mode: str = "rgbd", num_prototypes: int = 12,
                 num_blocks: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 bottleneck_ratio: float = 4.0, fusion_ratio: float = 2.0, dropout: float = 0.0, tau: float = 0.1,
                 gamma: float = 3.0, proto_weight: float = 0.2, assign_weight: float = 0.1,
                 usage_weight: float = 0.05, decoder_input: str = "cross", **kwargs: Any):
        super().__init__(encoder, **kwargs)
        if mode not in MODES:
            raise ValueError(f"UIPAD: mode must be one of {list(MODES)}, got {mode!r}")
        if decoder_input not in DECODER_INPUTS:
            raise ValueError(f"UIPAD: decoder_input must be one of {DECODER_INPUTS}, got {decoder_input!r}")
        self.decoder_input = decoder_input
        if num_prototypes < 1:
            raise ValueError(f"UIPAD: num_prototypes must be >= 1, got {num_prototypes}")
        if not tau > 0:
            raise ValueError(f"UIPAD: tau must be > 0, got {tau}")
        self.mode = mode
        self.modalities = MODES[mode]
        dim = self.embed_dim
        heads = num_heads or default_num_heads(dim)
        depth = num_blocks or len(self.layers)
        self.num_blocks = depth
        self.tau, self.gamma = float(tau), float(gamma)
        self.proto_weight, self.assign_weight = float(proto_weight), float(assign_weight)
        self.usage_weight = float(usage_weight)
        self.fusion = Mlp(len(self.modalities) * dim, int(dim * fusion_ratio), dim)
        self.prototype_token = nn.Parameter(torch.randn(num_prototypes, dim))
        self.aggregation = nn.ModuleList([Block(dim, AggregationAttention(dim, heads), mlp_ratio=mlp_ratio)])
        self.bottleneck = nn.ModuleList([Mlp(dim, int(dim * bottleneck_ratio), dim, drop=dropout)])
        self.decoders = nn.ModuleDict({
            m: nn.ModuleList(BidirectionalBlock(dim, heads, mlp_ratio, update_prototypes=i < depth - 1)
                             for i in range(depth))
            for m in self.modalities})
        bad = [i for g in self.groups for i in g if not 0 <= i < depth]
        if bad:
            raise ValueError(f"UIPAD: groups index the {depth} decoder blocks (reversed); got {bad}")
        for name, child in self.named_children():
            if name != "encoder":
                init_trainable(child)
        self.set_impl(self.impl)

    # -- inputs ---------------------------------------------------------------------------------

    def inputs(self, images: Any, depth: Tensor | None = None) -> dict[str, Tensor]:
        """The model's modality tensors ``{"rgb": [B, 3, H, W], "depth": [B, 3, H, W]}`` (those of
        :attr:`mode`) from ``(images, depth)``, a batch mapping, or a 6-channel tensor (RGB, then depth)."""
        found: dict[str, Tensor | None] = {"rgb": None, "depth": depth}
        if isinstance(images, Mapping):
            found = {m: images.get(key) for m, key in _BATCH_KEYS.items()}
            if depth is not None:
                found["depth"] = depth
        elif isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 6 and depth is None:
            found = {"rgb": images[:, :3], "depth": images[:, 3:]}
        elif images is not None and not isinstance(images, Tensor):
            raise TypeError(f"UIPAD: images must be a tensor, a batch mapping or None, got {type(images).__name__}")
        else:
            found["rgb"] = images
        out = {}
        for m in self.modalities:
            t = found[m]
            if t is None:
                raise ValueError(f"UIPAD (mode={self.mode!r}) needs the {m} input: pass batch[{_BATCH_KEYS[m]!r}]"
                                 + (", model(images, depth) or a 6-channel tensor" if m == "depth" else ""))
            if not isinstance(t, Tensor) or t.dim() != 4 or t.shape[1] != 3:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"UIPAD: the {m} input must be [B, 3, H, W], got {shape}")
            out[m] = t
        shapes = {m: tuple(t.shape) for m, t in out.items()}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"UIPAD: the RGB and depth inputs must have the same shape, got {shapes}")
        return out

    # -- pieces ---------------------------------------------------------------------------------

    def prototypes(self, unified: Tensor) -> Tensor:
        """Per-image unified prototypes ``[B, M, C]`` from the unified tokens ``[B, N, C]``."""
        p = self.prototype_token.unsqueeze(0).expand(unified.shape[0], -1, -1)
        for blk in self.aggregation:
            p = blk(p, unified)
        return p

    def decoder_source(self, modality: str, fused: dict[str, Tensor], unified: Tensor) -> Tensor:
        """The tokens the decoder of ``modality`` starts from (:attr:`decoder_input`; one modality: its own)."""
        if self.decoder_input == "unified":
            return unified
        if self.decoder_input == "cross" and len(self.modalities) == 2:
            return fused[next(m for m in self.modalities if m != modality)]
        return fused[modality]

    def decode_modality(self, modality: str, x: Tensor, prototypes: Tensor) -> list[Tensor]:
        """Decoder block outputs (block order) of ``modality`` for the tokens ``x`` and the shared prototypes."""
        h, p = self.bottleneck[0](x), prototypes
        outs = []
        for blk in self.decoders[modality]:
            h, p = blk(h, p)
            outs.append(h)
        return outs

    def features(self, images: Any, depth: Tensor | None = None
                 ) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]], dict[str, Any]]:
        """Per modality, encoder and decoder group maps ``[B, C, h, w]``; extras ``prototypes``, ``fused`` (per
        modality ``[B, N, C]``) and ``unified``."""
        return self._features(self.inputs(images, depth))

    def _features(self, x: dict[str, Tensor]
                  ) -> tuple[dict[str, list[Tensor]], dict[str, list[Tensor]], dict[str, Any]]:
        mods = self.modalities
        stacked = torch.cat([x[m] for m in mods], dim=0) if len(mods) > 1 else x[mods[0]]
        grid = self.encoder.grid_size(tuple(stacked.shape[-2:]))
        prefix, B = self.encoder.num_prefix_tokens, x[mods[0]].shape[0]
        layers = [e[:, prefix:] for e in self.encoder.forward_layers(stacked, self.layers)]
        per_mod = {m: [e[i * B:(i + 1) * B] for e in layers] for i, m in enumerate(mods)}
        fused = {m: fuse(per_mod[m]) for m in mods}
        unified = self.fusion(torch.cat([fused[m] for m in mods], dim=-1))
        protos = self.prototypes(unified)
        en, de = {}, {}
        for m in mods:
            outs = self.decode_modality(m, self.decoder_source(m, fused, unified), protos)[::-1]
            en[m] = [tokens_to_map(fuse([per_mod[m][i] for i in g]), 0, grid) for g in self.groups]
            de[m] = [tokens_to_map(fuse([outs[i] for i in g]), 0, grid) for g in self.groups]
        return en, de, {"prototypes": protos, "fused": fused, "unified": unified}

    # -- forward / loss -------------------------------------------------------------------------

    def forward(self, images: Any, depth: Tensor | None = None) -> dict[str, Tensor]:
        """``{"anomaly_map": [B, H, W] float32, "score": [B]}`` (+ per-modality maps in ``"rgbd"`` mode)."""
        x = self.inputs(images, depth)
        en, de, _ = self._features(x)
        size = tuple(x[self.modalities[0]].shape[-2:])
        maps = {m: self.anomaly_map_from_features(en[m], de[m], size) for m in self.modalities}
        amap = fuse(list(maps.values()))
        out = {"anomaly_map": amap,
               "score": image_score(amap, self.score_rule, topk=self.score_topk, pool_size=self.score_pool_size)}
        if len(maps) > 1:
            out.update({f"anomaly_map_{m}": v for m, v in maps.items()})
        return out

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """``{"loss": rec + w_s L_s + w_a L_a + w_p L_p, "reconstruction", "proto", "assign", "usage",
        "agreement"}`` (parts detached; ``assign`` and ``agreement`` are 0 / 1 with one modality)."""
        en, de, extras = self.features(batch)
        mods = self.modalities
        rec = sum(self.reconstruction_loss(en[m], de[m], mode="soft", gamma=self.gamma) for m in mods) / len(mods)
        protos = extras["prototypes"].float()
        weights, l_s = {}, 0.0
        for m in mods:
            f = extras["fused"][m].float()
            target, weights[m] = route(f, protos, mode="soft", tau=self.tau, impl=self.impl)
            l_s = l_s + (1 - F.cosine_similarity(f, target, dim=-1)).mean() / len(mods)
        if len(mods) == 2:
            w_a, w_b = weights.values()
            l_a = _symmetric_kl(w_a, w_b)
            agreement = (w_a.argmax(-1) == w_b.argmax(-1)).float().mean()
        else:
            l_a, agreement = protos.new_zeros(()), protos.new_ones(())
        l_p = _usage_entropy_gap(torch.cat(list(weights.values()), dim=1))
        total = rec + self.proto_weight * l_s + self.assign_weight * l_a + self.usage_weight * l_p
        return {"loss": total, "reconstruction": rec.detach(), "proto": l_s.detach(), "assign": l_a.detach(),
                "usage": l_p.detach(), "agreement": agreement.detach()}

    def extra_repr(self) -> str:
        return (f"mode={self.mode!r}, decoder_input={self.decoder_input!r}, layers={self.layers}, groups={self.groups}, "
                f"prototypes={self.prototype_token.shape[0]}, blocks={self.num_blocks}, tau={self.tau}, "
                f"output_size={self.output_size}, sigma={self.sigma}, score_rule={self.score_rule!r}, "
                f"impl={self.impl!r}")
