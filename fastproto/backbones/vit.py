"""DINOv2 vision transformers with the official architecture and state_dict keys.

Re-statement of facebookresearch/dinov2's ``DinoVisionTransformer`` as the hub builds it
(``block_chunks=0``, LayerScale, LayerNorm eps 1e-6, 518-pixel position grid of 37x37, no dropout
or drop-path), so that the official ``dinov2_vit*14[_reg4]_pretrain.pth`` files load with
``strict=True`` and official INP-Former / Dinomaly checkpoints (which embed the encoder as
``encoder.*``) keep their keys. Keys::

    cls_token [1,1,C]  pos_embed [1,1+37*37,C]  register_tokens [1,4,C] (reg)  mask_token [1,C]
    patch_embed.proj.{weight,bias}
    blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}
        (ViT-g: mlp.w12, mlp.w3 -- SwiGLU)
    norm.{weight,bias}

Numerics follow the official forward: position embeddings are interpolated exactly as
``interpolate_pos_encoding`` does (bicubic, ``scale_factor=((h0 + 0.1) / 37, (w0 + 0.1) / 37)``,
no antialias, in float32, then cast to the token dtype; untouched when the grid is 37x37), the
4 registers are inserted after the cls token and get no position embedding. Attention uses
``F.scaled_dot_product_attention`` (same math as the official softmax attention).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.backbones import Backbone
from fastproto.ops import Mlp, pre_norm
from fastproto.backbones.weights import dinov2_auto, find_checkpoint, load_checked, read_state_dict

__all__ = ["DinoVisionTransformer", "Attention", "Block", "LayerScale", "SwiGLUFFN", "PatchEmbed",
           "interpolate_pos_embed", "DINOV2_ARCHS", "dinov2", "dinov2_checkpoint_name"]

LayerNorm = partial(nn.LayerNorm, eps=1e-6)

#: name -> (embed_dim, depth, num_heads, ffn): the official vit_small / base / large / giant2
DINOV2_ARCHS: dict[str, tuple[int, int, int, str]] = {
    "vits14": (384, 12, 6, "mlp"),
    "vitb14": (768, 12, 12, "mlp"),
    "vitl14": (1024, 24, 16, "mlp"),
    "vitg14": (1536, 40, 24, "swiglu"),
}


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens ``[B, h*w, C]`` (row-major) with one strided conv ``proj``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head softmax self-attention with a packed ``qkv`` projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    """Per-channel residual scale ``gamma`` (initialised to ``init_values``)."""

    def __init__(self, dim: int, init_values: float = 1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class SwiGLUFFN(nn.Module):
    """``w3(silu(a) * b)`` with ``[a, b] = w12(x)``; the hidden width follows the official rule
    ``(int(hidden * 2 / 3) + 7) // 8 * 8`` (4096 for ViT-g: 1536 * 4 -> 4096)."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``.

    ``impl="reference"`` runs these eager expressions; otherwise LayerScale, the residual add and the
    LayerNorms go through :func:`fastproto.ops.pre_norm` (one fused pass each, LayerNorm outputs in the
    autocast dtype under autocast): see :meth:`forward_normed`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, ffn: str = "mlp",
                 init_values: float = 1.0, qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True,
                 impl: str = "auto"):
        super().__init__()
        self.impl = impl
        ffn_cls = {"mlp": Mlp, "swiglu": SwiGLUFFN}[ffn]
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = LayerNorm(dim)
        self.mlp = ffn_cls(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "reference":
            x = x + self.ls1(self.attn(self.norm1(x)))
            return x + self.ls2(self.mlp(self.norm2(x)))
        return self.forward_normed(x, pre_norm(self.norm1, x, impl=self.impl)[0])[0]

    def forward_normed(self, x: Tensor, h: Tensor,
                       next_norm: nn.LayerNorm | None = None) -> tuple[Tensor, Tensor | None]:
        """The fused path, given ``h = norm1(x)``: ``(x', next_norm(x'))``, or ``(x', None)`` without ``next_norm``.

        A stack of blocks passes the next block's ``norm1`` so that each boundary's LayerScale, residual add and
        LayerNorm are one pass (the last residual is one ``addcmul``, autocast off so that the 16-bit branch is
        not cast up first).
        """
        h, x = pre_norm(self.norm2, self.attn(h), residual=x, scale=self.ls1.gamma, impl=self.impl)
        y = self.mlp(h)
        if next_norm is not None:
            h, x = pre_norm(next_norm, y, residual=x, scale=self.ls2.gamma, impl=self.impl)
            return x, h
        with torch.autocast(x.device.type, enabled=False):
            return torch.addcmul(x, y, self.ls2.gamma), None


def interpolate_pos_embed(pos_embed: Tensor, grid: tuple[int, int], offset: float = 0.1,
                          antialias: bool = False) -> Tensor:
    """Official DINOv2 position-embedding interpolation.

    ``pos_embed [1, 1 + M*M, C]`` (cls slot first) -> ``[1, 1 + h*w, C]`` in float32 for the token
    grid ``grid = (h, w)``. Returned unchanged (same tensor) when ``grid == (M, M)``. Otherwise the
    M x M patch grid is resampled bicubically with ``scale_factor = ((h + offset) / M, (w + offset) / M)``
    (``offset`` = 0.1: the historical work-around kept for backward compatibility; it shifts the
    sampling positions, since the scale, not the output size, sets them) or with ``size=(h, w)``
    when ``offset`` is 0.
    """
    n = pos_embed.shape[1] - 1
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"pos_embed has {n} patch positions, not a square grid")
    h, w = grid
    if (h, w) == (m, m):
        return pos_embed
    pos_embed = pos_embed.float()
    patch_pos = pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if offset:
        resize = {"scale_factor": (float(h + offset) / m, float(w + offset) / m)}
    else:
        resize = {"size": (h, w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **resize)
    if patch_pos.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, expected {(h, w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    return torch.cat([pos_embed[:, :1], patch_pos], dim=1)


class DinoVisionTransformer(Backbone):
    """DINOv2 ViT (official keys and forward), frozen; see the module docstring.

    Models may run it the official way (``x = vit.prepare_tokens(images)``, then
    ``for blk in vit.blocks: x = blk(x)``) or call :meth:`forward_layers`.
    """

    def __init__(self, embed_dim: int = 768, depth: int = 12, num_heads: int = 12, *, patch_size: int = 14,
                 img_size: int = 518, in_chans: int = 3, mlp_ratio: float = 4.0, ffn: str = "mlp",
                 num_register_tokens: int = 0, init_values: float = 1.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, interpolate_offset: float = 0.1,
                 interpolate_antialias: bool = False):
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_layers = self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.num_prefix_tokens = 1 + num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self._pos_cache: tuple | None = None  # (key, interpolated pos-embed); see interpolate_pos_encoding

        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
                                if num_register_tokens else None)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, ffn, init_values, qkv_bias, proj_bias, ffn_bias)
            for _ in range(depth))
        self.norm = LayerNorm(embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self._init_weights()
        self.freeze()

    def _init_weights(self) -> None:
        """The official init (trunc-normal 0.02 position embeddings and Linear weights, tiny cls/registers)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embeddings for an ``h x w``-pixel image: interpolated ones in the dtype of the
        tokens ``x``, the parameter itself on the native grid (as the official code).

        The interpolation is cached per grid size (keyed on the parameter's storage and version, so
        loading weights, moving the model or an in-place update recomputes it): PyTorch's bicubic
        kernel parallelises over output pixels only and took 5.4 ms per forward on an H100 (9 % of an
        INP-Former batch of 64). Not cached while the parameter is being trained (autograd graph), nor under
        ``torch.compile`` / ``torch.export`` (the graph computes it; a storage-keyed cache would break the graph, and
        an exported parameter has no storage)."""
        grid = (h // self.patch_size, w // self.patch_size)
        p = self.pos_embed
        if (p.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():  # also torch.export
            pos = interpolate_pos_embed(p, grid, self.interpolate_offset, self.interpolate_antialias)
        else:
            key = (grid, p.device, p.dtype, p.data_ptr(), p._version)
            if self._pos_cache is None or self._pos_cache[0] != key:
                self._pos_cache = (key, interpolate_pos_embed(p, grid, self.interpolate_offset,
                                                              self.interpolate_antialias))
            pos = self._pos_cache[1]
        return pos if pos is p else pos.to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` -> tokens ``[B, 1 + R + h*w, C]``: patch embedding, optional
        ``mask_token`` substitution where ``masks [B, h*w]`` is True, cls token, position
        embeddings, then the R registers inserted after the cls token."""
        self.check_images(x)
        h, w = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return x

    prepare_tokens = prepare_tokens_with_masks

    def _forward_layers(self, images: Tensor, layers: list[int]) -> list[Tensor]:
        x = self.prepare_tokens(images)
        wanted = set(layers)
        taken: dict[int, Tensor] = {}
        blocks = list(self.blocks[:max(layers) + 1])
        h = None  # norm1 of x for the next block, when the previous fused block computed it with its residual
        for i, blk in enumerate(blocks):
            if blk.impl == "reference":
                x, h = blk(x), None
            else:
                if h is None:
                    h = pre_norm(blk.norm1, x, impl=blk.impl)[0]
                x, h = blk.forward_normed(x, h, blocks[i + 1].norm1 if i + 1 < len(blocks) else None)
            if i in wanted:
                taken[i] = x
        return [taken[i] for i in layers]


def dinov2_checkpoint_name(arch: str, registers: bool) -> str:
    """Official file name, e.g. ``dinov2_vitb14_reg4_pretrain.pth``."""
    return f"dinov2_{arch}{'_reg4' if registers else ''}_pretrain.pth"


def dinov2_name(arch: str, registers: bool) -> str:
    """Registry name, e.g. ``dinov2_vitb14_reg`` (the torch.hub name)."""
    return f"dinov2_{arch}{'_reg' if registers else ''}"


def dinov2(arch: str = "vitb14", registers: bool = True, *, pretrained: bool | str = False,
           **kwargs) -> DinoVisionTransformer:
    """Build a DINOv2 ViT (``arch`` in :data:`DINOV2_ARCHS`), optionally loading a checkpoint.

    ``pretrained``: False (random), True (official file via
    :func:`~fastproto.backbones.weights.find_checkpoint`) or a path. Official and timm layouts are
    both accepted (timm is mapped with :func:`~fastproto.backbones.weights.dinov2_from_timm`).
    Extra keyword arguments override the constructor's (e.g. ``interpolate_offset``).
    """
    if arch not in DINOV2_ARCHS:
        raise ValueError(f"unknown DINOv2 architecture {arch!r}; known: {', '.join(DINOV2_ARCHS)}")
    embed_dim, depth, num_heads, ffn = DINOV2_ARCHS[arch]
    cfg = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "ffn": ffn,
           "num_register_tokens": 4 if registers else 0, **kwargs}
    path = (find_checkpoint(dinov2_checkpoint_name(arch, registers), dinov2_name(arch, registers))
            if pretrained is True else pretrained)  # look the file up before building the model
    model = DinoVisionTransformer(**cfg)
    if path:
        load_checked(model, dinov2_auto(read_state_dict(path)), f"checkpoint {str(path)!r}")
    return model


def dinov2_factory(arch: str, registers: bool):
    """Registry factory ``(pretrained=..., **kw) -> DinoVisionTransformer`` for one variant."""
    return partial(dinov2, arch, registers)
