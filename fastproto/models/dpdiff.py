"""DPDiff-AD (Feng et al., arXiv 2605.24402): a dual-prototype-conditioned diffusion model that
reconstructs frozen backbone features.

No official code is public; this follows the paper's description (DESIGN.md, "Models"):

* **features** ``x0 [B, N, C]``: the patch tokens (prefix tokens dropped) of backbone blocks 6..11
  averaged (DINOv2-B at 448 px: 32 x 32 tokens), then a parameter-free LayerNorm over channels;
* **local prototypes** ``M = 8``: learnable query tokens cross-attend to ``x0`` in one block (the
  INP extractor block of INP-Former); ``L_local = mean_i min_m (1 - cos(x_i, p_m))``
  (:func:`fastproto.ops.coherence_loss`), weight ``lambda1 = 0.2``;
* **global prototypes** ``K = 2`` from a second such block; ``L_global`` = entropic OT (Sinkhorn)
  between the tokens and the prototypes with squared-distance cost
  (:func:`fastproto.ops.ot_alignment_loss`), weight ``lambda2 = 0.001``;
* **denoiser**: a DiT over the sequence ``[tokens; local; global]`` with adaLN-Zero timestep
  conditioning; every block is self-attention (SDPA) over the whole sequence, softmax
  cross-attention of the tokens to the ``M + K`` prototype states
  (:func:`fastproto.ops.prototype_attention`, ``kind="softmax"``, per-sample keys/values) and an MLP,
  each sub-layer shifted/scaled/gated by the timestep embedding;
* **training**: DDPM, ``T = 1000``, linear ``beta`` 1e-4 ... 0.02; tokens and prototypes are noised
  together at the same ``t``, epsilon-prediction MSE over both;
  ``loss = L_diff + 0.2 L_local + 0.001 L_global``;
* **inference**: noise ``[x0; prototypes(x0)]`` to a fixed step, run deterministic DDIM (eta = 0) back to
  ``x̂0``, score ``||x̂0 - x0||^2`` per token, bilinear upsampling, Gaussian blur, image score = max of
  the average-pooled map.

Paper defaults vs our choices (every one is a constructor option):

========================  ============================  =================================================
item                      paper                         here
========================  ============================  =================================================
layers                    DINOv2-B blocks 6-11          :func:`default_layers`: the deeper half of the
                                                        backbone's layers (6..11 of 12; taps 4..7 of the
                                                        8 of the EfficientNet-Lite0 adapter)
feature scale             not stated                    parameter-free LayerNorm (``feature_norm``), so
                                                        the data has the unit scale DDPM assumes
DiT depth / width / heads not stated                    6 / feature dim / ``C // 64`` (12 for C = 768)
MLP ratio                 not stated                    4
noise step at inference   "fixed t" (not stated)        ``noise_step = 400`` (0-based; alpha_bar ~ 0.2)
DDIM steps                3                             3, evenly spaced ``t * (S - k) // S``, eta = 0
Sinkhorn eps, cost        not stated                    0.05 on L2-normalised features (cost in [0, 4]),
                                                        100 iterations
sampling noise            not stated                    :func:`seeded_normal` of ``sampling_seed``: a
                                                        counter-based draw (no generator state), the same
                                                        on every device and under ``torch.compile``; one
                                                        draw shared by the batch: deterministic per image,
                                                        whatever the batch
noise draws per image     one (implied by 101 FPS)      1 (``sampling_draws``; the mean token error of
                                                        several draws lowers the variance of the map:
                                                        the demo uses 4, see :mod:`fastproto.demo`)
map smoothing             "Gaussian"                    5 x 5, sigma 4 (the ViT family's)
score pooling window      not stated                    16 (ADer's ``pooling_ks``)
training length           not stated                    200 epochs, batch 32, Adam lr 1e-4, constant
========================  ============================  =================================================
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.backbones.vit import Attention
from fastproto.models import register_model
from fastproto.models._vit_common import (
    AggregationAttention,
    Block,
    Mlp,
    ViTADModel,
    _images_from_batch,
    default_num_heads,
    fuse,
    init_trainable,
)
from fastproto.ops import (
    coherence_loss,
    gaussian_blur,
    image_score,
    ot_alignment_loss,
    pre_norm,
    prototype_attention,
)

__all__ = [
    "DPDiffAD",
    "DiT",
    "DiTBlock",
    "ddim_sample",
    "ddim_timesteps",
    "default_layers",
    "linear_betas",
    "q_sample",
    "sincos_pos_embed_2d",
    "timestep_embedding",
]


# ----------------------------------------------------------------------------------------------
# diffusion maths
# ----------------------------------------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear schedule, float64 ``[T]``: ``beta_t`` from ``beta_start`` (t = 0) to ``beta_end``
    (t = T - 1), 0-based steps."""
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(f"betas must satisfy 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``x`` in [0, 2**32) held in int64, without overflow (16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mixer (xor-shift-multiply, C. Wellons' "lowbias32" constants) on int64 values in
    [0, 2**32): every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_normal(shape: Sequence[int], seed: int, device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32, offset: int = 0) -> Tensor:
    """Standard-normal numbers that are a pure function of ``(seed mod 2**32, element index)``: counter-based,
    with no generator state, so one ``seed`` gives the same numbers on every device (up to the last-bit rounding
    of ``log`` and ``cos``), in every process and under ``torch.compile`` (no graph break). Element ``i`` hashes
    the counters ``2i`` and ``2i + 1`` (hashed, xor the hashed seed, hashed again) to two 23-bit uniforms in
    (0, 1), exact in float32, and turns them into one normal by Box-Muller (tails cut at about 5.8 sigma).
    ``offset`` skips that many elements of the stream: consecutive blocks of one seed are independent draws."""
    shape = tuple(shape)
    key = _hash32(torch.tensor(int(seed) & _MASK32, dtype=torch.int64, device=device))
    counter = 2 * (torch.arange(math.prod(shape), dtype=torch.int64, device=device) + int(offset))

    def uniform(j: int) -> Tensor:
        return ((_hash32(_hash32((counter + j) & _MASK32) ^ key) >> 9).float() + 0.5) / 2 ** 23

    z = torch.sqrt(-2.0 * torch.log(uniform(0))) * torch.cos(2.0 * math.pi * uniform(1))
    return z.to(dtype).reshape(shape)


def _gather(values: Tensor, t: int | Tensor, like: Tensor) -> Tensor:
    """``values[t]`` broadcastable against ``like`` ([B] steps -> [B, 1, 1]), in ``like``'s dtype."""
    v = values[t] if isinstance(t, int) else values[t.long()]
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, t: int | Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward process ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise`` (``t``: one step
    or one per sample)."""
    a = _gather(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` evenly spaced, strictly decreasing steps from ``t_start``:
    ``t_start * (steps - k) // steps`` for k = 0..steps-1 (400, 266, 133 for 400 and 3)."""
    if steps < 1 or t_start < 0 or steps > t_start + 1:
        raise ValueError(f"DDIM needs 1 <= steps <= t_start + 1, got steps={steps}, t_start={t_start}")
    return [t_start * (steps - k) // steps for k in range(steps)]


def ddim_sample(eps_fn: Callable[[Tensor, int], Tensor], x_t: Tensor, timesteps: Sequence[int],
                alphas_cumprod: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``x_t`` at ``timesteps[0]`` through the other steps to ``x̂0``.

    Each step predicts ``x̂0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`` with ``eps = eps_fn(x, t)`` and moves
    to ``sqrt(a_s) x̂0 + sqrt(1 - a_s) eps`` at the next step ``s`` (``a_s = 1`` after the last step,
    so the result is the last ``x̂0``). With the true noise as ``eps_fn`` it returns ``x0`` exactly
    (up to rounding).
    """
    x = x_t
    steps = list(timesteps)
    for i, t in enumerate(steps):
        eps = eps_fn(x, t)
        a_t = _gather(alphas_cumprod, t, x)
        x0_hat = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if i + 1 == len(steps):
            return x0_hat
        a_s = _gather(alphas_cumprod, steps[i + 1], x)
        x = a_s.sqrt() * x0_hat + (1 - a_s).sqrt() * eps
    raise ValueError("ddim_sample: timesteps is empty")


# ----------------------------------------------------------------------------------------------
# DiT pieces
# ----------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) steps ``t [B]``: ``cos`` then ``sin`` of
    ``t * max_period ** (-i / (dim / 2))`` (DiT / guided-diffusion), float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """Fixed 2-D sin-cos position embedding ``[h*w, dim]`` (row-major; first half encodes the row, second
    half the column; MAE / DiT layout). ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sincos_pos_embed_2d: dim must be a multiple of 4, got {dim}")
    h, w = grid
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim // 4))

    def encode(pos: Tensor) -> Tensor:
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (``shift``/``scale`` [B, 1, C])."""
    return x * (1 + scale) + shift


class PrototypeCrossAttention(nn.Module):
    """Softmax cross-attention of many tokens to a few per-sample prototypes through
    :func:`fastproto.ops.prototype_attention` (``kind="softmax"``; ``impl`` follows the model).

    ``forward(x [B, N, C], prototypes [B, M, C]) -> [B, N, C]``; parameters ``q``, ``kv``, ``proj``.
    """

    def __init__(self, dim: int, num_heads: int, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PrototypeCrossAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, prototypes: Tensor) -> Tensor:
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, C // H).transpose(1, 2)
        k, v = self.kv(prototypes).reshape(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4)
        out = prototype_attention(q, k, v, kind="softmax", impl=self.impl)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    """adaLN-Zero DiT block with prototype cross-attention.

    ``forward(h [B, N + M, W], num_tokens=N, c [B, W])``: the timestep vector ``c`` gives, through
    ``adaLN_modulation`` (SiLU -> Linear, zero-initialised), a shift, scale and gate for each of the
    three sub-layers: self-attention over the whole sequence; cross-attention of the first ``N``
    (token) positions to the last ``M`` (prototype) positions, which it leaves unchanged; the MLP.
    Norms are affine-free LayerNorms (eps 1e-6), as DiT.

    ``impl="reference"`` runs the eager expressions; otherwise each sub-layer boundary (gated residual add,
    LayerNorm, ``modulate``) is one :func:`fastproto.ops.pre_norm` pass (see :meth:`forward_normed`).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)  # the ViT block's packed-qkv SDPA attention
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = PrototypeCrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 9 * dim))
        self.impl = impl

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """The nine ``[B, 1, W]`` vectors of ``c``: (shift, scale, gate) of self-attention, cross-attention, MLP."""
        return self.adaLN_modulation(c).unsqueeze(1).chunk(9, dim=-1)

    def forward(self, h: Tensor, num_tokens: int, c: Tensor) -> Tensor:
        mods = self.modulation(c)
        if self.impl != "reference":
            y = pre_norm(self.norm1, h, modulation=mods[0:2], impl=self.impl)[0]
            return self.forward_normed(h, y, num_tokens, mods)[0]
        (sa_shift, sa_scale, sa_gate, ca_shift, ca_scale, ca_gate, mlp_shift, mlp_scale, mlp_gate) = mods
        h = h + sa_gate * self.attn(modulate(self.norm1(h), sa_shift, sa_scale))
        y = modulate(self.norm2(h), ca_shift, ca_scale)
        tokens = h[:, :num_tokens] + ca_gate * self.cross_attn(y[:, :num_tokens], y[:, num_tokens:])
        h = torch.cat([tokens, h[:, num_tokens:]], dim=1)
        return h + mlp_gate * self.mlp(modulate(self.norm3(h), mlp_shift, mlp_scale))

    def forward_normed(self, h: Tensor, y: Tensor, num_tokens: int, mods: Sequence[Tensor],
                       next_norm: tuple[nn.LayerNorm, Sequence[Tensor]] | None = None) -> tuple[Tensor, Tensor | None]:
        """The fused path, given ``y = modulate(norm1(h), ...)`` and ``mods = modulation(c)``: ``(h', y')`` with
        ``y' = modulate(norm(h'), shift, scale)`` for ``next_norm = (norm, (shift, scale))``, else ``(h', None)``.

        Each boundary (gated residual add, LayerNorm, modulation) is one pass. The cross-attention output is
        zero-padded over the prototype positions so that its residual add is one too (``h + gate * 0`` leaves
        them as they are). A DiT passes the next block's ``norm1`` and modulation; the last residual is one
        ``addcmul`` with autocast off (the 16-bit branch is not cast up first).
        """
        sa_gate, ca_shift, ca_scale, ca_gate, mlp_shift, mlp_scale, mlp_gate = mods[2:]
        y, h = pre_norm(self.norm2, self.attn(y), residual=h, scale=sa_gate, modulation=(ca_shift, ca_scale),
                        impl=self.impl)
        cross = self.cross_attn(y[:, :num_tokens], y[:, num_tokens:])
        cross = F.pad(cross, (0, 0, 0, h.shape[1] - num_tokens))
        y, h = pre_norm(self.norm3, cross, residual=h, scale=ca_gate, modulation=(mlp_shift, mlp_scale),
                        impl=self.impl)
        out = self.mlp(y)
        if next_norm is not None:
            norm, modulation = next_norm
            y, h = pre_norm(norm, out, residual=h, scale=mlp_gate, modulation=tuple(modulation), impl=self.impl)
            return h, y
        with torch.autocast(h.device.type, enabled=False):
            return torch.addcmul(h, out, mlp_gate), None


class DiT(nn.Module):
    """Epsilon-prediction DiT over ``[tokens; prototypes]``.

    ``forward(z [B, N + P, C], t (int or [B]), grid (h, w)) -> eps [B, N + P, C]``, N = h * w tokens
    (row-major) and ``P = num_prototypes`` prototype positions. The tokens get a fixed 2-D sin-cos
    position embedding, the prototype positions a learnable embedding each (``proto_embed``); the
    timestep goes through a sinusoidal embedding (``frequency_dim``) and an MLP (``t_embedder``).
    Init as DiT: Linear layers Xavier-uniform, ``t_embedder`` N(0, 0.02), adaLN and the output layer
    zero (the untrained model predicts eps = 0).
    """

    def __init__(self, in_dim: int, num_prototypes: int, *, width: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, frequency_dim: int = 256, impl: str = "auto"):
        super().__init__()
        self.impl = impl
        if width % 4:
            raise ValueError(f"DiT: width must be a multiple of 4 (2-D sin-cos embedding), got {width}")
        if depth < 1:
            raise ValueError(f"DiT: depth must be >= 1, got {depth}")
        self.width = width
        self.num_prototypes = num_prototypes
        self.frequency_dim = frequency_dim
        self.x_embedder = nn.Linear(in_dim, width)
        self.proto_embed = nn.Parameter(torch.zeros(num_prototypes, width))
        self.t_embedder = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(width, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, in_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.proto_embed, std=0.02)
        for lin in (self.t_embedder[0], self.t_embedder[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in [blk.adaLN_modulation[1] for blk in self.blocks] + [self.adaLN_final[1], self.head]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, z: Tensor, t: int | Tensor, grid: tuple[int, int]) -> Tensor:
        B, L, _ = z.shape
        n = L - self.num_prototypes
        if n != grid[0] * grid[1]:
            raise ValueError(f"DiT: z must hold {grid[0]}x{grid[1]} tokens + {self.num_prototypes} prototypes, "
                             f"got {L} positions")
        if isinstance(t, int):
            t = torch.full((B,), t, device=z.device)
        pos = torch.cat([sincos_pos_embed_2d(self.width, grid, z.device), self.proto_embed.float()], dim=0)
        h = self.x_embedder(z) + pos.to(z.dtype)
        # the sinusoid in the embedder's dtype: a float64 (or 16-bit) DiT takes it as is
        c = self.t_embedder(timestep_embedding(t, self.frequency_dim).to(self.t_embedder[0].weight.dtype))
        final = self.adaLN_final(c).unsqueeze(1).chunk(2, dim=-1)  # (shift, scale)
        if self.impl == "reference":
            for blk in self.blocks:
                h = blk(h, n, c)
            return self.head(modulate(self.norm_final(h), *final))
        # fused: each block boundary's gated residual, the next norm and its modulation in one pass
        mods = [blk.modulation(c) for blk in self.blocks]
        y = pre_norm(self.blocks[0].norm1, h, modulation=mods[0][0:2], impl=self.impl)[0]
        for i, blk in enumerate(self.blocks):
            following = ((self.blocks[i + 1].norm1, mods[i + 1][0:2]) if i + 1 < len(self.blocks)
                         else (self.norm_final, final))
            h, y = blk.forward_normed(h, y, n, mods[i], next_norm=following)
        return self.head(y)


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------


def default_layers(num_layers: int) -> list[int]:
    """The deeper half of the backbone's layers: blocks 6..11 of a 12-block ViT (the paper's choice),
    taps 4..7 of the 8 of the EfficientNet-Lite0 token adapter."""
    return list(range(num_layers // 2, num_layers))


@register_model("dpdiff")
class DPDiffAD(ViTADModel):
    """DPDiff-AD on a frozen backbone (see the module docstring for the method and our choices).

    Args:
        encoder: frozen backbone (tokens ``[B, P + h*w, C]``; the prefix tokens are dropped).
        layers: tapped layers, averaged (default :func:`default_layers`: 6..11 of a 12-block ViT).
        feature_norm: parameter-free LayerNorm of the averaged features (True).
        num_local, num_global: local ``M`` (8) and global ``K`` (2) prototypes.
        local_weight, global_weight: ``lambda1`` (0.2) and ``lambda2`` (0.001).
        ot_eps, ot_normalize, ot_iters: Sinkhorn regularisation (0.05), L2-normalised squared-distance
            cost (True) and iteration cap (100) of the global loss.
        depth, width, num_heads, mlp_ratio: DiT size (6, feature dim, ``width // 64`` or 1, 4); the
            prototype extractor blocks use ``num_heads`` too (default ``C // 64``).
        num_timesteps, beta_start, beta_end: DDPM schedule (1000, 1e-4, 0.02).
        noise_step: 0-based step the clean features are noised to at inference (400).
        ddim_steps: DDIM steps back to ``x̂0`` (3).
        sampling_seed: seed of the inference noise (:func:`seeded_normal`, the same draw at every call).
        sampling_draws: noise draws per image at inference (1, the paper's single draw); the token errors of
            the draws are averaged, which lowers the variance of the map the one draw leaves (``k`` draws cost
            ``k`` reconstructions).
        **kwargs: ``output_size``, ``sigma``, ``kernel_size``, ``score_rule`` (default
            ``"avgpool_max"``), ``score_topk``, ``score_pool_size``, ``optimizer``, ``impl`` of
            :class:`~fastproto.models._vit_common.ViTADModel` (``groups`` does not apply).
    """

    OPTIMIZER: ClassVar[dict[str, Any]] = {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"}
    TRAINING: ClassVar[dict[str, Any]] = {"epochs": 200, "batch_size": 32}

    def __init__(self, encoder: nn.Module, *, layers: Sequence[int] | None = None, feature_norm: bool = True,
                 num_local: int = 8, num_global: int = 2, local_weight: float = 0.2, global_weight: float = 0.001,
                 ot_eps: float = 0.05, ot_normalize: bool = True, ot_iters: int = 100, depth: int = 6,
                 width: int | None = None, num_heads: int | None = None, mlp_ratio: float = 4.0,
                 num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 noise_step: int = 400, ddim_steps: int = 3, sampling_seed: int = 0, sampling_draws: int = 1,
                 **kwargs: Any):
        if kwargs.get("groups") is not None:
            raise TypeError("DPDiffAD: groups does not apply (one averaged feature map is reconstructed)")
        kwargs.setdefault("score_rule", "avgpool_max")
        num_layers = getattr(encoder, "num_layers", None)
        if layers is None and num_layers is not None:
            layers = default_layers(int(num_layers))
        super().__init__(encoder, layers=layers, **kwargs)
        if num_local < 1 or num_global < 1:
            raise ValueError(f"DPDiffAD: num_local and num_global must be >= 1, got {num_local} and {num_global}")
        if isinstance(sampling_draws, bool) or not isinstance(sampling_draws, int) or sampling_draws < 1:
            raise ValueError(f"DPDiffAD: sampling_draws must be an int >= 1, got {sampling_draws!r}")
        if not 0 <= noise_step < num_timesteps:
            raise ValueError(f"DPDiffAD: noise_step must be in [0, {num_timesteps - 1}], got {noise_step}")
        dim = self.embed_dim
        width = int(width or dim)
        heads = num_heads or default_num_heads(dim)
        self.feature_norm = bool(feature_norm)
        self.num_local, self.num_global = int(num_local), int(num_global)
        self.local_weight, self.global_weight = float(local_weight), float(global_weight)
        self.ot_eps, self.ot_normalize, self.ot_iters = float(ot_eps), bool(ot_normalize), int(ot_iters)
        self.noise_step, self.ddim_steps, self.sampling_seed = int(noise_step), int(ddim_steps), int(sampling_seed)
        self.sampling_draws = sampling_draws
        self.timesteps = ddim_timesteps(self.noise_step, self.ddim_steps)

        self.local_tokens = nn.Parameter(torch.randn(num_local, dim))
        self.local_block = Block(dim, AggregationAttention(dim, heads), mlp_ratio=mlp_ratio)
        self.global_tokens = nn.Parameter(torch.randn(num_global, dim))
        self.global_block = Block(dim, AggregationAttention(dim, heads), mlp_ratio=mlp_ratio)
        init_trainable(self.local_block)
        init_trainable(self.global_block)
        self.dit = DiT(dim, num_local + num_global, width=width, depth=depth,
                       num_heads=num_heads or default_num_heads(width), mlp_ratio=mlp_ratio)
        betas = linear_betas(num_timesteps, beta_start, beta_end)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.set_impl(self.impl)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    # -- pieces ---------------------------------------------------------------------------------

    def tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Clean features ``x0 [B, h*w, C]`` (float32) and the token grid ``(h, w)``."""
        grid = self.encoder.grid_size(tuple(images.shape[-2:]))
        x = fuse(self.encoder.forward_layers(images, self.layers))[:, self.encoder.num_prefix_tokens:].float()
        return (F.layer_norm(x, x.shape[-1:]) if self.feature_norm else x), grid

    def prototypes(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Per-image local ``[B, M, C]`` and global ``[B, K, C]`` prototypes of the features ``x0``."""
        B = x0.shape[0]
        local = self.local_block(self.local_tokens.unsqueeze(0).expand(B, -1, -1), x0)
        glob = self.global_block(self.global_tokens.unsqueeze(0).expand(B, -1, -1), x0)
        return local, glob

    def eps(self, z: Tensor, t: int | Tensor, grid: tuple[int, int]) -> Tensor:
        """The DiT's noise prediction for the noisy sequence ``z`` at step(s) ``t``, float32."""
        return self.dit(z, t, grid).float()

    @torch.no_grad()
    def token_errors(self, x0: Tensor, grid: tuple[int, int]) -> Tensor:
        """``‖x̂0 − x0‖²`` per token ``[B, N]``: ``[x0; prototypes(x0)]`` noised to ``noise_step`` with the seeded
        noise, then ``ddim_steps`` deterministic DDIM steps to ``x̂0``; with ``sampling_draws`` > 1 the mean over
        that many draws (draw ``k`` is the stream's ``k``-th block; the prototypes are computed once)."""
        local, glob = self.prototypes(x0)
        z0 = torch.cat([x0, local.float(), glob.float()], dim=1)
        errors = z0.new_zeros(x0.shape[:2])
        for draw in range(self.sampling_draws):
            # one draw [1, L, C] shared by the batch: an image's map must not depend on its batch or its place in it
            noise = seeded_normal((1, *z0.shape[1:]), self.sampling_seed, z0.device, z0.dtype,
                                  offset=draw * z0[0].numel()).expand_as(z0)
            z_t = q_sample(z0, self.noise_step, noise, self.alphas_cumprod)
            z_hat = ddim_sample(lambda z, t: self.eps(z, t, grid), z_t, self.timesteps, self.alphas_cumprod)
            errors += (z_hat[:, :x0.shape[1]] - x0).square().sum(-1)
        return errors / self.sampling_draws

    def score_map(self, errors: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        """Token errors ``[B, h*w]`` -> map ``[B, H, W]`` float32: bilinear upsampling (align_corners=True)
        to ``image_size``, optional resize to ``output_size``, Gaussian blur."""
        amap = errors.float().reshape(-1, 1, *grid)
        amap = F.interpolate(amap, size=tuple(image_size), mode="bilinear", align_corners=True)
        if self.output_size is not None:
            size = (self.output_size,) * 2 if isinstance(self.output_size, int) else tuple(self.output_size)
            amap = F.interpolate(amap, size=size, mode="bilinear", align_corners=False)
        amap = amap[:, 0]
        if self.sigma is not None:
            amap = gaussian_blur(amap, sigma=self.sigma, kernel_size=self.kernel_size, impl=self.impl)
        return amap

    # -- forward / loss -------------------------------------------------------------------------

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"anomaly_map": [B, H, W] float32, "score": [B]}`` (deterministic: seeded noise, DDIM)."""
        x0, grid = self.tokens(images)
        amap = self.score_map(self.token_errors(x0, grid), grid, tuple(images.shape[-2:]))
        score = image_score(amap, self.score_rule, topk=self.score_topk, pool_size=self.score_pool_size)
        return {"anomaly_map": amap, "score": score}

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """``{"loss": L_diff + lambda1 L_local + lambda2 L_global, "diff", "local", "global"}`` (parts
        detached): one DDPM step per sample at a uniform random ``t``, tokens and prototypes noised
        together, epsilon MSE over both (float32)."""
        x0, grid = self.tokens(_images_from_batch(batch))
        local, glob = self.prototypes(x0)
        local, glob = local.float(), glob.float()
        z0 = torch.cat([x0, local, glob], dim=1)
        t = torch.randint(0, self.num_timesteps, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        diff = F.mse_loss(self.eps(q_sample(z0, t, noise, self.alphas_cumprod), t, grid), noise)
        l_local = coherence_loss(x0, local, impl=self.impl)
        l_global = ot_alignment_loss(x0, glob, eps=self.ot_eps, normalize=self.ot_normalize, n_iters=self.ot_iters,
                                     impl=self.impl)
        total = diff + self.local_weight * l_local + self.global_weight * l_global
        return {"loss": total, "diff": diff.detach(), "local": l_local.detach(), "global": l_global.detach()}

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, prototypes={self.num_local}+{self.num_global}, "
                f"T={self.num_timesteps}, noise_step={self.noise_step}, ddim={self.timesteps}, "
                f"output_size={self.output_size}, sigma={self.sigma}, score_rule={self.score_rule!r}, "
                f"impl={self.impl!r}")
