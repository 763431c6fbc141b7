"""Put fastproto's fused ops into an existing model: :func:`convert` swaps the modules it recognises, in place.

For a model built by another codebase (the official Dinomaly or INP-Former code, a DINOv2 or timm ViT): each
recognised module is replaced by the fastproto module with the same parameters, state_dict keys and call
signature, holding the *same* parameter objects (an optimizer built before the conversion keeps working, tied
weights stay tied, ``load_state_dict`` of the original keys still works).

=========================================  ================================================  =====================
module found                               recognised by                                     replaced by
=========================================  ================================================  =====================
``LinearAttention2`` (Dinomaly)            ``qkv`` Linear C -> 3C, ``proj`` Linear C -> C,   :class:`LinearAttention`
                                           ``num_heads``
``Prototype_Attention`` (INP-Former)       ``q`` C -> C, ``kv`` C -> 2C, ``proj`` C -> C,    :class:`PrototypeAttention`
                                           ``learn_scale`` [H, 1, 1], ``num_heads``
``Mlp`` (timm, DINOv2, Dinomaly,           ``fc1``, ``fc2`` Linears, ``act`` an exact GELU,  :class:`Mlp`
INP-Former), ``bMlp`` (Dinomaly)           dropouts of one ``p``, any ``norm`` an Identity   (``bMlp``: input dropout)
``nn.LayerNorm`` over the last dim         the class itself (not subclasses)                 :class:`LayerNorm`
=========================================  ================================================  =====================

Modules are recognised by class name and checked by structure: a module with a listed name whose children or
shapes differ from the above, or that carries hooks (which a replacement would drop), is left as it is with a
warning naming it. Other modules are untouched. What changes in behaviour:

* the converted LayerNorms return the autocast dtype under autocast (``out_dtype="autocast"``: the dtype the
  next Linear computes in; ``nn.LayerNorm`` returns float32 there and the Linear casts it);
* the converted ``Prototype_Attention`` returns ``(out, None)``: the official module also returns its attention
  matrix, which the fused path never builds (the INP-Former blocks discard it);
* the converted ``LinearAttention2`` returns ``(out, kv)`` as the official one, ``kv`` non-differentiable on the
  Triton path.

Residual adds stay in the model's own blocks: :func:`add_layer_norm` fuses them where a block is rewritten.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import nn

from fastproto.ops._dispatch import IMPLS
from fastproto.ops.layer_norm import LayerNorm
from fastproto.ops.linear_attention import LinearAttention
from fastproto.ops.linear_gelu import Mlp
from fastproto.ops.prototype import PrototypeAttention

__all__ = ["convert"]


class _Skip(Exception):
    """A recognised module that cannot be converted; the message says why."""


def _linear(module: nn.Module, name: str, in_features: int, out_features: int) -> nn.Linear:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Linear):
        raise _Skip(f"its {name!r} is not an nn.Linear")
    if (child.in_features, child.out_features) != (in_features, out_features):
        raise _Skip(f"its {name!r} maps {child.in_features} -> {child.out_features}, expected "
                    f"{in_features} -> {out_features}")
    return child


def _only_children(module: nn.Module, allowed: set) -> None:
    extra = sorted(set(dict(module.named_children())) - allowed)
    if extra:
        raise _Skip(f"it has children the fastproto module lacks: {', '.join(extra)}")


def _heads(module: nn.Module, dim: int) -> int:
    heads = getattr(module, "num_heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or dim % heads:
        raise _Skip(f"its num_heads={heads!r} does not divide the width {dim}")
    return heads


def _dropout(module: nn.Module, name: str) -> nn.Dropout:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Dropout) else nn.Dropout(0.0)


def _linear_attention(module: nn.Module, impl: str) -> nn.Module:
    qkv = getattr(module, "qkv", None)
    dim = qkv.in_features if isinstance(qkv, nn.Linear) else -1
    _linear(module, "qkv", dim, 3 * dim)
    _linear(module, "proj", dim, dim)
    _only_children(module, {"qkv", "proj", "attn_drop", "proj_drop"})
    with torch.device("meta"):
        new = LinearAttention(dim, _heads(module, dim), impl=impl)
    new.qkv, new.proj, new.proj_drop = module.qkv, module.proj, _dropout(module, "proj_drop")
    return new


def _prototype_attention(module: nn.Module, impl: str) -> nn.Module:
    q = getattr(module, "q", None)
    dim = q.in_features if isinstance(q, nn.Linear) else -1
    for name, out in (("q", dim), ("kv", 2 * dim), ("proj", dim)):
        _linear(module, name, dim, out)
    _only_children(module, {"q", "kv", "proj", "attn_drop", "proj_drop"})
    heads = _heads(module, dim)
    scale = getattr(module, "learn_scale", None)
    if not isinstance(scale, nn.Parameter) or tuple(scale.shape) != (heads, 1, 1):
        raise _Skip(f"its learn_scale is not a parameter of shape ({heads}, 1, 1)")
    with torch.device("meta"):
        new = PrototypeAttention(dim, heads, impl=impl)
    new.q, new.kv, new.proj, new.learn_scale = module.q, module.kv, module.proj, scale
    new.attn_drop, new.proj_drop = _dropout(module, "attn_drop"), _dropout(module, "proj_drop")
    return new


def _mlp(module: nn.Module, impl: str) -> nn.Module:
    fc1 = getattr(module, "fc1", None)
    if not isinstance(fc1, nn.Linear):
        raise _Skip("its 'fc1' is not an nn.Linear")
    fc2 = getattr(module, "fc2", None)
    out_features = fc2.out_features if isinstance(fc2, nn.Linear) else -1
    _linear(module, "fc2", fc1.out_features, out_features)
    _only_children(module, {"fc1", "act", "fc2", "drop", "drop1", "drop2", "norm"})
    act = getattr(module, "act", None)
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        raise _Skip(f"its activation is {act!r}, not the exact nn.GELU()")
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        raise _Skip("it normalises its hidden features (norm is not an Identity)")
    drops = [getattr(module, name) for name in ("drop", "drop1", "drop2") if hasattr(module, name)]
    if not all(isinstance(d, (nn.Dropout, nn.Identity)) for d in drops):
        raise _Skip("one of its dropouts is neither an nn.Dropout nor an Identity")
    rates = {d.p if isinstance(d, nn.Dropout) else 0.0 for d in drops}
    if len(rates) > 1:
        raise _Skip(f"its dropouts have different rates {sorted(rates)}")
    with torch.device("meta"):
        new = Mlp(fc1.in_features, fc1.out_features, out_features, drop=rates.pop() if rates else 0.0,
                  input_dropout=type(module).__name__ == "bMlp", impl=impl)
    new.fc1, new.fc2 = fc1, fc2
    return new


def _layer_norm(module: nn.LayerNorm, impl: str) -> nn.Module:
    if len(module.normalized_shape) != 1:
        raise _Skip(f"it normalises over {len(module.normalized_shape)} dims (fastproto's: the last one)")
    with torch.device("meta"):
        new = LayerNorm(module.normalized_shape[0], eps=module.eps, elementwise_affine=module.elementwise_affine,
                        bias=module.bias is not None, out_dtype="autocast", impl=impl)
    new.weight, new.bias = module.weight, module.bias
    return new


_BY_NAME: Dict[str, Callable[[nn.Module, str], nn.Module]] = {
    "LinearAttention2": _linear_attention,
    "Prototype_Attention": _prototype_attention,
    "Mlp": _mlp,
    "bMlp": _mlp,
}


def _ours(module: nn.Module) -> bool:
    return type(module).__module__.startswith("fastproto.")


def _rule(module: nn.Module) -> Optional[Callable[[nn.Module, str], nn.Module]]:
    if type(module) is nn.LayerNorm:
        return _layer_norm
    return _BY_NAME.get(type(module).__name__)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
        "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"))


def convert(model: nn.Module, *, impl: str = "auto") -> nn.Module:
    """Replace, in place, every module of ``model`` that fastproto has a fused equivalent of (see the module
    docstring's table), and return the model (``model`` itself unless ``model`` is such a module).

    Args:
        model: any ``nn.Module``; its parameters, buffers, devices, dtypes and training mode are kept.
        impl: the implementation of the new modules' ops: ``"auto"`` (fused on CUDA, the references elsewhere),
            ``"triton"``, ``"cuda"`` or ``"reference"``; change it later with :func:`fastproto.ops.set_impl`.

    A module shared by several parents is replaced once and stays shared. Converting twice changes nothing.
    fastproto's own modules and models are left whole, children included (convert a foreign submodule of one,
    e.g. a model's own encoder, by passing that submodule).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"convert: impl must be one of {IMPLS}, got {impl!r}")
    done: Dict[int, nn.Module] = {}

    def swap(module: nn.Module, path: str) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        if _ours(module):  # fastproto's modules run the fused ops already (their plain LayerNorms included)
            done[id(module)] = module
            return module
        rule, new = _rule(module), module
        if rule is not None:
            try:
                if _has_hooks(module):
                    raise _Skip("it has hooks, which the replacement would not carry")
                new = rule(module, impl).train(module.training)
            except _Skip as why:
                warnings.warn(f"convert: left {path or 'the model'} ({type(module).__name__}) as it is: {why}",
                              RuntimeWarning, stacklevel=3)
        if new is module:
            for name, child in list(module.named_children()):
                replacement = swap(child, f"{path}.{name}" if path else name)
                if replacement is not child:
                    setattr(module, name, replacement)
        done[id(module)] = new
        return new

    return swap(model, "")
