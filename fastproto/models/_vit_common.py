"""Shared pieces of the ViT-family reconstruction models (Dinomaly, INP-Former, Pro-AD).

All three follow one pattern (Dinomaly's ``ViTill``): a frozen backbone's block outputs at
``layers`` are averaged into one token map, a bottleneck MLP and a stack of decoder blocks
reconstruct it, and the anomaly map compares layer *groups*: group ``g`` of the encoder is the
mean of the encoder outputs listed in ``groups[g]``, group ``g`` of the decoder the mean of the
decoder block outputs listed there after the block order is **reversed** (so shallow encoder
layers meet deep decoder blocks). :class:`ViTADModel` holds this pattern; a model only writes
:meth:`ViTADModel.decode` (fused tokens -> decoder outputs) and its loss.

Blocks keep the official module and parameter names (``norm1``, ``attn``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``; LayerNorm eps 1e-8), so official checkpoints load with strict keys.
Attention is pluggable: any module called as ``attn(x)`` or ``attn(x, context)`` returning a
tensor or an ``(out, aux)`` tuple (the :mod:`fastproto.ops` modules).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.ops import Mlp, anomaly_map, cosine_mining_loss, image_score, pre_norm, set_impl

__all__ = [
    "LN_EPS",
    "AggregationAttention",
    "Block",
    "Mlp",
    "ViTADModel",
    "default_groups",
    "default_layers",
    "default_num_heads",
    "fuse",
    "grid_tokens",
    "init_trainable",
    "mining_ramp",
    "tokens_to_map",
]

#: LayerNorm eps of every trainable block in the official Dinomaly / INP-Former code
LN_EPS = 1e-8
IMPLS = ("auto", "triton", "reference")
_SCORE_RULES = ("max", "topk_mean", "avgpool_max")


# ----------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------


class AggregationAttention(nn.Module):
    """Softmax cross-attention of a few queries (INP tokens) to many tokens: INP-Former's
    ``Aggregation_Attention`` (parameters ``q``, ``kv``, ``proj``; scale ``head_dim ** -0.5``).

    ``forward(x [B, M, C], context [B, N, C]) -> [B, M, C]``. With M = 6 queries this is cheap; it
    runs on ``F.scaled_dot_product_attention`` (the few-prototypes kernels of
    :mod:`fastproto.ops.prototype` cover the opposite shape, many queries to few keys).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AggregationAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, M, C = x.shape
        N, H = context.shape[1], self.num_heads
        q = self.q(x).reshape(B, M, H, C // H).transpose(1, 2)
        k, v = self.kv(context).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, M, C))


class Block(nn.Module):
    """Pre-norm transformer block with a pluggable attention module.

    ``forward(x)``: ``y = attn(norm1(x))``; ``forward(x, context)``: ``y = attn(norm1(x),
    norm1(context))`` (the *same* ``norm1`` on both, as INP-Former's blocks). Then
    ``x = x + y`` (or ``x = y`` with ``attn_residual=False``: INP-Former's decoder drops the
    attention residual so that tokens are rebuilt from prototypes only) and
    ``x = x + mlp(norm2(x))``. No dropout or drop-path: the official decoders use none.

    The residual adds and LayerNorms run through :func:`fastproto.ops.pre_norm` with the block's ``impl``
    (``"reference"``: the eager expressions; otherwise the fused kernel, LayerNorm outputs in the autocast
    dtype under autocast).
    """

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0, attn_residual: bool = True,
                 impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.attn_residual = attn_residual
        self.impl = impl

    def norm(self, norm: nn.LayerNorm, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(norm(s), s)`` with ``s = residual + x`` (``x`` without a residual)."""
        return pre_norm(norm, x, residual=residual, impl=self.impl)

    def attend(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``attn(norm1(x)[, norm1(context)])`` without the residual, auxiliary outputs dropped."""
        h = self.norm(self.norm1, x)[0]
        out = self.attn(h) if context is None else self.attn(h, self.norm(self.norm1, context)[0])
        return out[0] if isinstance(out, tuple) else out

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h, x = self.norm(self.norm2, self.attend(x, context), x if self.attn_residual else None)
        return x + self.mlp(h)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def fuse(features: Sequence[Tensor]) -> Tensor:
    """Unweighted mean of equally shaped tensors (official ``fuse_feature``: stack, mean)."""
    return torch.stack(list(features), dim=1).mean(dim=1)


def tokens_to_map(tokens: Tensor, num_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``[B, P + h*w, C]`` tokens -> ``[B, C, h, w]`` patch map (prefix tokens dropped)."""
    h, w = grid
    patches = tokens[:, num_prefix:]
    if patches.shape[1] != h * w:
        raise ValueError(f"tokens: expected {num_prefix} prefix + {h}x{w} patch tokens, got {tokens.shape[1]}")
    return patches.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def default_layers(num_layers: int) -> list[int]:
    """The official target layers: blocks 2..9 of a 12-block ViT (S, B), every second block 4..18
    of a 24-block ViT (L). Other depths: 8 layers spread over the middle two thirds (all layers
    when there are 8 or fewer, e.g. a CNN adapter's stages)."""
    if num_layers == 12:
        return list(range(2, 10))
    if num_layers == 24:
        return list(range(4, 19, 2))
    if num_layers <= 8:
        return list(range(num_layers))
    span = max(8, round(num_layers * 2 / 3))
    start = min(num_layers // 6, num_layers - span)
    return [start + round(i * (span - 1) / 7) for i in range(8)]


def default_groups(num_layers: int) -> list[list[int]]:
    """Two groups, the first and the second half of the tapped layers (``[[0, 1, 2, 3], [4, 5, 6, 7]]``
    for the official 8); one group for a single layer."""
    if num_layers == 1:
        return [[0]]
    half = num_layers // 2
    return [list(range(half)), list(range(half, num_layers))]


def default_num_heads(dim: int) -> int:
    """Head dim 64, as the official models (ViT-S 6, ViT-B 12, ViT-L 16 heads); one head when
    ``dim`` is not a multiple of 64."""
    return dim // 64 if dim % 64 == 0 else 1


@torch.no_grad()
def init_trainable(module: nn.Module) -> None:
    """Official init of the trainable modules: Linear weights trunc-normal (std 0.01, cut at
    ±0.03), biases 0; LayerNorm weight 1, bias 0. Other parameters keep their own init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _images_from_batch(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images", "img"):
            if key in batch:
                return batch[key]
        raise KeyError(f"batch mapping has no 'image' entry (keys: {sorted(batch)})")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"batch must be an image tensor, a mapping with 'image', or a sequence whose first item is "
                    f"the image tensor; got {type(batch).__name__}")


def _check_fraction(name: str, value: float, low_open: bool = False) -> float:
    value = float(value)
    if not (0.0 < value if low_open else 0.0 <= value) or not value <= 1.0:
        raise ValueError(f"{name} must be in {'(0' if low_open else '[0'}, 1], got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# base model
# ----------------------------------------------------------------------------------------------


class ViTADModel(nn.Module):
    """Frozen backbone + trainable reconstruction head, compared per layer group.

    Subclasses build ``bottleneck`` / ``decoder`` (and whatever else) in ``__init__``, call
    :meth:`_finish_init`, and implement :meth:`decode` and :meth:`compute_loss`.

    Args (common to every model, keyword-only):
        encoder: the frozen :class:`fastproto.backbones.Backbone` (stored as ``encoder``: its
            state_dict keys are ``encoder.*`` as in the official checkpoints).
        layers: 0-based backbone blocks tapped (default :func:`default_layers`: 2..9 for ViT-S/B).
        groups: index lists into ``layers`` (encoder side) and into the reversed decoder outputs
            (decoder side); default the two halves of ``layers``: the official
            ``[[0, 1, 2, 3], [4, 5, 6, 7]]`` for 8 layers.
        output_size: size of the returned anomaly map; None = the input size. Otherwise the map is
            first upsampled to the input size and then resized to ``output_size`` before the blur
            (the official protocol is ``output_size=256``).
        sigma, kernel_size: Gaussian smoothing of the map (5x5, sigma 4; ``sigma=None`` disables).
        score_rule, score_topk, score_pool_size: image score (:func:`fastproto.ops.image_score`);
            default the official mean of the top 1 % of the smoothed map (``max_ratio=0.01``).
        optimizer: overrides of :meth:`optimizer_config` entries (keys of
            :class:`fastproto.engine.optim.OptimConfig`).
        impl: ``"auto"`` | ``"triton"`` | ``"reference"`` for every op of the model.
    """

    #: INP-Former drops the prefix tokens before the bottleneck; Dinomaly / Pro-AD decode them too
    strip_prefix_before_decoder: bool = False
    #: paper defaults of :meth:`optimizer_config` (:class:`fastproto.engine.optim.OptimConfig` keys)
    OPTIMIZER: ClassVar[dict[str, Any]] = {}
    #: paper defaults of :meth:`training_config`
    TRAINING: ClassVar[dict[str, Any]] = {}

    def __init__(self, encoder: nn.Module, *, layers: Sequence[int] | None = None,
                 groups: Sequence[Sequence[int]] | None = None,
                 output_size: int | tuple[int, int] | None = None, sigma: float | None = 4.0,
                 kernel_size: int = 5, score_rule: str = "topk_mean", score_topk: float = 0.01,
                 score_pool_size: int = 16, optimizer: Mapping[str, Any] | None = None, impl: str = "auto"):
        super().__init__()
        for attr in ("embed_dim", "num_prefix_tokens", "num_layers", "grid_size", "forward_layers"):
            if not hasattr(encoder, attr):
                raise TypeError(f"{type(self).__name__}: encoder must be a fastproto Backbone (missing {attr!r}); "
                                f"got {type(encoder).__name__}")
        self.encoder = encoder
        self.embed_dim = int(encoder.embed_dim)
        self.layers = (default_layers(encoder.num_layers) if layers is None
                       else encoder.check_layers(layers) if hasattr(encoder, "check_layers") else list(layers))
        self.groups = (default_groups(len(self.layers)) if groups is None
                       else [list(map(int, g)) for g in groups])
        if not self.groups or any(not g for g in self.groups):
            raise ValueError(f"{type(self).__name__}: groups must be non-empty lists of indices, got {groups!r}")
        bad = [i for g in self.groups for i in g if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"{type(self).__name__}: groups index the {len(self.layers)} tapped layers; got {bad}")
        self.output_size = output_size
        self.sigma = sigma
        self.kernel_size = kernel_size
        if score_rule not in _SCORE_RULES:
            raise ValueError(f"{type(self).__name__}: score_rule must be one of {_SCORE_RULES}, got {score_rule!r}")
        self.score_rule = score_rule
        self.score_topk = _check_fraction("score_topk", score_topk, low_open=True)
        self.score_pool_size = score_pool_size
        if optimizer:
            import dataclasses

            from fastproto.engine.optim import OptimConfig

            known = [f.name for f in dataclasses.fields(OptimConfig)]
            unknown = sorted(set(optimizer) - set(known))
            if unknown:
                raise ValueError(f"{type(self).__name__}: unknown optimizer option(s) {unknown}; known: {known}")
        self._optimizer_overrides = dict(optimizer or {})
        if impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl

    def _finish_init(self) -> None:
        """Official init of every trainable submodule, then propagate ``impl``; subclasses call this
        at the end of ``__init__``. Also checks that the decoder can serve the groups."""
        n_dec = len(self.decoder)
        bad = [i for g in self.groups for i in g if not 0 <= i < n_dec]
        if bad:
            raise ValueError(f"{type(self).__name__}: groups index the {n_dec} decoder blocks (reversed); got {bad}")
        for name, child in self.named_children():
            if name != "encoder":
                init_trainable(child)
        self.set_impl(self.impl)

    # -- configuration ------------------------------------------------------------------------

    def set_impl(self, impl: str) -> ViTADModel:
        """Run every op of the model (attention, routing, loss, anomaly map) with ``impl``:
        ``"reference"`` forces the plain-PyTorch references, ``"triton"`` forces the kernels,
        ``"auto"`` picks per call. The frozen encoder follows (its fastproto blocks)."""
        if impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        return set_impl(self, impl)

    @property
    def _loss_impl(self) -> str:
        # cosine_mining_loss has its own implementation names ("fused" is its fast path)
        return "reference" if self.impl == "reference" else "auto"

    def optimizer_config(self) -> dict[str, Any]:
        """The paper's optimizer, schedule and gradient clipping (plus the ``optimizer=`` overrides),
        as :class:`fastproto.engine.optim.OptimConfig` keys (what the trainer merges)."""
        return {**self.OPTIMIZER, **self._optimizer_overrides}

    def training_config(self) -> dict[str, Any]:
        """The paper's run length and batch size: ``{"iters" or "epochs": ..., "batch_size": ...}``."""
        return dict(self.TRAINING)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train (everything but the frozen encoder), in registration order."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad]

    def on_train_iter(self, it: int, total: int) -> None:
        """Called by the training loop before iteration ``it`` (0-based) of ``total``; schedules
        that live in the model (Dinomaly's hard-mining ramp) update here."""

    # -- forward --------------------------------------------------------------------------------

    def decode(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Fused encoder tokens ``[B, N, C]`` -> (decoder block outputs in block order, extras)."""
        raise NotImplementedError

    def _layer_tokens(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor], int,
                                                     tuple[int, int]]:
        grid = self.encoder.grid_size(tuple(images.shape[-2:]))
        en_list = self.encoder.forward_layers(images, self.layers)
        prefix = self.encoder.num_prefix_tokens
        if self.strip_prefix_before_decoder:
            en_list = [e[:, prefix:] for e in en_list]
            prefix = 0
        de_list, extras = self.decode(fuse(en_list))
        return en_list, de_list[::-1], extras, prefix, grid

    def layer_maps(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """The tapped encoder outputs and the decoder outputs, paired (decoder order reversed), as ``[B, C, h, w]``
        views of the tokens (prefix tokens dropped), and the model's extras. Group ``g`` compares the means of
        the pairs listed in ``groups[g]``."""
        en, de, extras, prefix, grid = self._layer_tokens(images)
        return [tokens_to_map(e, prefix, grid) for e in en], [tokens_to_map(d, prefix, grid) for d in de], extras

    def features(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Encoder and decoder group maps ``[B, C, h, w]`` (one per group) and the model's extras."""
        en, de, extras, prefix, grid = self._layer_tokens(images)
        return ([tokens_to_map(fuse([en[i] for i in g]), prefix, grid) for g in self.groups],
                [tokens_to_map(fuse([de[i] for i in g]), prefix, grid) for g in self.groups], extras)

    def anomaly_map_from_features(self, en: Sequence[Tensor], de: Sequence[Tensor], image_size: tuple[int, int],
                                  groups: Sequence[Sequence[int]] | None = None) -> Tensor:
        """Per pair (or per group of pairs, averaged on each side) ``1 - cos`` -> bilinear upsampling
        (align_corners=True) to ``image_size`` -> mean -> optional resize to ``output_size`` -> Gaussian blur;
        float32 [B, H, W]."""
        return anomaly_map(list(en), list(de), tuple(image_size), groups=groups, sigma=self.sigma,
                           kernel_size=self.kernel_size, eval_size=self.output_size, impl=self.impl)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"anomaly_map": [B, H, W] float32, "score": [B]}`` (call ``eval()`` first: dropout). The group means
        are taken inside :func:`fastproto.ops.anomaly_map` (on the fly in the fused kernel, never materialised)."""
        en, de, _ = self.layer_maps(images)
        amap = self.anomaly_map_from_features(en, de, tuple(images.shape[-2:]), groups=self.groups)
        score = image_score(amap, self.score_rule, topk=self.score_topk, pool_size=self.score_pool_size)
        return {"anomaly_map": amap, "score": score}

    # -- training -------------------------------------------------------------------------------

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """Training loss for a batch (an image tensor, a mapping with ``"image"``, or a sequence whose
        first item is the images): ``{"loss": total, <parts>}``. The parts are detached."""
        en, de, extras = self.features(_images_from_batch(batch))
        return self.compute_loss(en, de, extras)

    def compute_loss(self, en: list[Tensor], de: list[Tensor], extras: dict[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def reconstruction_loss(self, en: list[Tensor], de: list[Tensor], **mining: Any) -> Tensor:
        """Global cosine loss over the groups with gradient mining (float32, encoder detached)."""
        return cosine_mining_loss([e.float() for e in en], [d.float() for d in de], impl=self._loss_impl, **mining)

    # -- checkpoints ----------------------------------------------------------------------------

    def load_official(self, checkpoint: str | Mapping[str, Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
        """Load an official checkpoint (a path or a state_dict, e.g. Dinomaly's / INP-Former's
        ``model.pth``): ``"module."`` prefixes (DataParallel / DDP) are stripped, ``"model"`` /
        ``"state_dict"`` wrappers unwrapped. With ``strict`` a key or shape mismatch raises an error
        listing the keys; otherwise returns ``(missing, unexpected)`` after loading what matches."""
        from fastproto.backbones.weights import load_checked, read_state_dict

        if isinstance(checkpoint, Mapping):
            sd, source = dict(checkpoint), "state_dict"
            for wrapper in ("state_dict", "model"):
                if isinstance(sd.get(wrapper), Mapping):
                    sd = dict(sd[wrapper])
        else:
            sd, source = read_state_dict(checkpoint), f"checkpoint {str(checkpoint)!r}"
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        if strict:
            load_checked(self, sd, source)
            return [], []
        result = self.load_state_dict(sd, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, groups={self.groups}, output_size={self.output_size}, sigma={self.sigma}, "
                f"score_rule={self.score_rule!r}, impl={self.impl!r}")


def mining_ramp(it: int, final: float, ramp_iters: int) -> float:
    """Dinomaly's hard-mining fraction ``min(final * it / ramp_iters, final)``."""
    return min(final * max(it, 0) / ramp_iters, final) if ramp_iters > 0 else final


def grid_tokens(encoder: nn.Module, image_size: int | tuple[int, int]) -> int:
    """Tokens per image (prefix + patches) the encoder gives at ``image_size``."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    h, w = encoder.grid_size(hw)
    return encoder.num_prefix_tokens + h * w

