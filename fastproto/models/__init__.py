"""Complete anomaly-detection models and their registry.

``create(name, backbone=..., pretrained=True, reference=False, **cfg)`` builds a model by name
(``list_models()`` lists them). Every model maps images to ``{"anomaly_map": [B, H, W], "score":
[B]}`` in eval mode and has ``loss(batch)`` for training, ``trainable_parameters()``,
``optimizer_config()`` (the paper's defaults), ``on_train_iter(it, total)``, ``set_impl(impl)``
and ``load_official(checkpoint)``.

ViT family (frozen DINOv2 ViT-B/14 with registers by default):

* ``"dinomaly"`` -- :class:`~fastproto.models.dinomaly.Dinomaly`
* ``"inpformer"`` -- :class:`~fastproto.models.inpformer.INPFormer`
* ``"proad"`` -- :class:`~fastproto.models.proad.ProAD`
* ``"dpdiff"`` -- :class:`~fastproto.models.dpdiff.DPDiffAD` (diffusion over the tokens, prototype
  cross-attention, Sinkhorn alignment of the global prototypes)
* ``"uipad"`` -- :class:`~fastproto.models.uipad.UIPAD` (RGB + depth: unified prototypes shared by an RGB
  and a depth decoder; ``model(images, depth)``)

CNN family (frozen WideResNet-50-2 teacher, reverse distillation):

* ``"borad"`` -- :class:`~fastproto.models.borad.BoRAD` (training-only prototype bank and BYOL
  alignment to an EMA target; ``model.export()`` gives the inference-only model)
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["create", "list_models", "model_class", "register_model"]

_REGISTRY: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a model under ``name`` for :func:`create`."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls
    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def model_class(name: str) -> type[nn.Module]:
    """The class registered under ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name]


def _config_options(cls: type) -> list[str]:
    """Keyword options accepted by ``cls(encoder, **cfg)``, along its ``__init__`` MRO."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY and p.name not in names and p.name != "impl":
                names.append(p.name)
    return names


DEFAULT_BACKBONE = "dinov2_vitb14_reg"


def create(name: str, backbone: str | nn.Module | None = None, pretrained: bool | str = True,
           reference: bool = False, **cfg: Any) -> nn.Module:
    """Build the model ``name`` on a frozen backbone.

    Args:
        name: see :func:`list_models`.
        backbone: a :func:`fastproto.backbones.create` name or a ready backbone module; None takes
            the model's paper backbone (its class attribute ``default_backbone``; DINOv2 ViT-B/14 with
            4 registers for the ViT family, WideResNet-50-2 for BoRAD).
        pretrained: for a backbone name: True loads the official backbone checkpoint from disk (a
            clear FileNotFoundError names the file and where to put it when it is missing), False
            keeps random weights and touches no file or network, a path loads that file. Ignored
            when ``backbone`` is an instance.
        reference: run every op with its plain-PyTorch reference (``impl="reference"``), to check
            the fused model end to end; ``model.set_impl(...)`` switches later.
        **cfg: model options (paper defaults otherwise); an unknown option raises a TypeError
            listing the valid ones.
    """
    cls = model_class(name)
    options = _config_options(cls)
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; valid options: {', '.join(options)}")
    if backbone is None:
        backbone = getattr(cls, "default_backbone", DEFAULT_BACKBONE)
    if isinstance(backbone, str):
        from fastproto import backbones

        encoder = backbones.create(backbone, pretrained=pretrained)
    elif isinstance(backbone, nn.Module):
        encoder = backbone
    else:
        raise TypeError(f"{name}: backbone must be a backbone name or a Backbone module, got {type(backbone).__name__}")
    return cls(encoder, impl="reference" if reference else "auto", **cfg)


from fastproto.models import borad as _borad  # noqa: F401  (registers "borad")
from fastproto.models import dinomaly as _dinomaly  # noqa: F401  (registers "dinomaly")
from fastproto.models import dpdiff as _dpdiff  # noqa: F401  (registers "dpdiff")
from fastproto.models import inpformer as _inpformer  # noqa: F401  (registers "inpformer")
from fastproto.models import proad as _proad  # noqa: F401  (registers "proad")
from fastproto.models import uipad as _uipad  # noqa: F401  (registers "uipad")
