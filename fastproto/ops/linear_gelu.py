"""Linear + exact GELU in one kernel: the first half of a transformer MLP (``act(fc1(x))``).

The eager pair writes the pre-activation and reads it back; the fused kernel applies bias and GELU in the
product's epilogue. The maths lives in :mod:`fastproto.reference.linear_gelu`; the kernel in
:mod:`fastproto.triton.linear_gelu` (tiles autotuned per shape).

An inference op: the Triton path is **forward only**. With ``impl="auto"`` inputs that require grad (with
grad mode on) go to the reference, which is differentiable; ``impl="triton"`` refuses them. Under autocast
the inputs are cast to the autocast dtype first, as ``F.linear`` does.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastproto.ops._dispatch import autocast_dtype, device_guard, kernel_op, resolve_impl

# by full name: package attributes may be shadowed by re-exported functions of the same name
_ref = importlib.import_module("fastproto.reference.linear_gelu")

__all__ = ["linear_gelu", "fc_gelu", "Mlp"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_module():
    # imported lazily: keeps `import fastproto` free of triton and lets TRITON_INTERPRET=1 be set
    # before the kernels are defined
    return importlib.import_module("fastproto.triton.linear_gelu")


def _validate(x, weight, bias) -> None:
    op = "linear_gelu"
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) but weight "
                         f"expects {weight.shape[1]} (shape {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


@kernel_op("triton_linear_gelu")
def _triton_linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _triton_module().forward(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                impl: str = "auto") -> torch.Tensor:
    """``gelu(x @ weight^T + bias)`` with the exact GELU (``nn.GELU()``), ``x [..., in]`` -> ``[..., out]``.

    Args:
        x: input features.
        weight, bias: an ``nn.Linear``'s parameters (``[out, in]``, ``[out]`` or None).
        impl: ``"auto"`` (Triton on CUDA tensors without gradients, else the reference) | ``"triton"`` |
            ``"reference"``.
    """
    op = "linear_gelu"
    _validate(x, weight, bias)
    compute = autocast_dtype(x.device.type)
    tensors = [t for t in (x, weight, bias) if t is not None]

    def unsupported():
        dtypes = {compute} if compute is not None else {t.dtype for t in tensors}
        bad = sorted(str(d) for d in dtypes if d not in _KERNEL_DTYPES)
        if bad:
            return f"the Triton kernel takes float32/float16/bfloat16, got {', '.join(bad)}"
        return None

    chosen = resolve_impl(op, impl, tensors, impls=("triton",), has_backward=False, unsupported=unsupported)
    if chosen == "reference" or x.numel() == 0 or weight.shape[0] == 0:
        return _ref.linear_gelu(x, weight, bias)
    if compute is not None:
        x, weight = x.to(compute), weight.to(compute)
        bias = None if bias is None else bias.to(compute)
    elif len({t.dtype for t in tensors}) > 1:
        raise TypeError(f"{op}: x, weight and bias must share one dtype outside autocast, got "
                        f"{', '.join(str(t.dtype) for t in tensors)}")
    x2 = x.reshape(-1, x.shape[-1])
    with device_guard(x.device):
        y = _triton_linear_gelu(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def fc_gelu(fc: nn.Linear, x: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """``gelu(fc(x))`` for an MLP module: :func:`linear_gelu` when nothing needs a gradient, the eager pair when
    something does (the kernel is forward-only, so a model forced to ``impl="triton"`` still trains) or when
    ``impl="reference"``."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in fc.parameters()))
    if impl == "reference" or needs_grad:
        return F.gelu(fc(x))
    return linear_gelu(x, fc.weight, fc.bias, impl=impl)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Mlp(nn.Module):
    """A transformer MLP ``drop(fc2(drop(gelu(fc1(x)))))``, ``gelu(fc1(x))`` through :func:`fc_gelu` (one kernel
    at inference unless ``impl="reference"``).

    The parameters and state_dict keys (``fc1``, ``fc2``) and the dropout places of timm's, DINOv2's, Dinomaly's
    and INP-Former's ``Mlp`` (one ``p`` for both places, as DINOv2's single ``drop``). ``input_dropout=True``
    also drops the input: Dinomaly's ``bMlp``, the "noisy bottleneck", which applies one ``nn.Dropout`` three
    times. ``forward(x, noise=False)`` skips every dropout even in training (Pro-AD passes its prototypes
    through the noisy bottleneck without noise).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, bias: bool = True,
                 drop: float = 0.0, input_dropout: bool = False, impl: str = "auto"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)
        self.input_dropout = input_dropout
        self.impl = impl

    def forward(self, x: torch.Tensor, noise: bool = True) -> torch.Tensor:
        drop = self.drop if noise else _identity
        if self.input_dropout:
            x = drop(x)
        return drop(self.fc2(drop(fc_gelu(self.fc1, x, impl=self.impl))))
