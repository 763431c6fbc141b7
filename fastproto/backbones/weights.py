"""Checkpoint files: where they are looked up, how they are read, and key mappings between layouts.

Lookup (:func:`find_checkpoint`), first hit wins:

1. ``$FASTPROTO_WEIGHTS/<file>`` (a directory);
2. ``~/.cache/fastproto/weights/<file>``;
3. ``<torch hub dir>/checkpoints/<file>`` (where ``torch.hub`` / torchvision downloads land).

Nothing is ever downloaded. Key mappings:

* DINOv2, timm layout -> official layout (:func:`dinov2_from_timm`) and back (:func:`dinov2_to_timm`);
* EfficientNet-Lite0, EfficientNet-PyTorch layout -> timm layout (:func:`efficientnet_from_effnet_pytorch`).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["find_checkpoint", "search_dirs", "read_state_dict", "load_checked",
           "dinov2_from_timm", "dinov2_to_timm", "efficientnet_from_effnet_pytorch"]


def search_dirs() -> list[Path]:
    """Directories searched for checkpoint files, in order."""
    dirs = []
    if os.environ.get("FASTPROTO_WEIGHTS"):
        dirs.append(Path(os.environ["FASTPROTO_WEIGHTS"]).expanduser())
    dirs.append(Path.home() / ".cache" / "fastproto" / "weights")
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    return dirs


def find_checkpoint(file_names: str | Sequence[str], what: str) -> Path:
    """The first existing ``<dir>/<file name>`` over :func:`search_dirs` and ``file_names``.

    Raises FileNotFoundError naming the file(s) and where to put them (``what`` names the model).
    """
    names = [file_names] if isinstance(file_names, str) else list(file_names)
    for directory in search_dirs():
        for name in names:
            if (directory / name).is_file():
                return directory / name
    where = "\n  ".join(str(d) for d in search_dirs())
    raise FileNotFoundError(
        f"pretrained weights for {what} not found: put {' or '.join(map(repr, names))} in one of\n  {where}\n"
        f"(set $FASTPROTO_WEIGHTS to use another directory), or pass pretrained='/path/to/file'. "
        "Nothing is downloaded automatically.")


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict from ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``) or ``.safetensors``.

    A checkpoint wrapping the weights under ``"state_dict"`` or ``"model"`` is unwrapped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs the 'safetensors' package (pip install safetensors)") from e
        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"could not read checkpoint {str(path)!r}: {e}") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"checkpoint {str(path)!r} is not a state_dict (a mapping of names to tensors)")
    return dict(sd)


def load_checked(module: nn.Module, state_dict: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error naming ``source`` and the
    mismatching keys/shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
        parts = [f"{name}: {head(items)}" for name, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if items]
        raise RuntimeError(f"{source} does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------
# DINOv2: timm <-> official layout
# ---------------------------------------------------------------------------------------------
# timm's DINOv2 ViTs (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``) store the same blocks
# under the same names, except:
#   * ``mask_token`` is dropped;
#   * with registers, timm uses ``no_embed_class``: ``reg_token`` = official ``register_tokens``,
#     ``cls_token`` = official ``cls_token + pos_embed[:, 0]`` and ``pos_embed`` = official
#     ``pos_embed[:, 1:]`` (patch positions only). Without registers the layout is the official one.
#   * ViT-g's SwiGLU FFN is ``mlp.fc1`` / ``mlp.fc2`` (timm ``SwiGLUPacked``, same packing:
#     ``silu(first half) * second half``) instead of ``mlp.w12`` / ``mlp.w3``.
# Going back, the cls position embedding is set to 0 and cls_token keeps the folded sum: the
# official forward adds ``pos_embed[:, 0]`` to the cls token only, so the outputs are identical.
_SWIGLU_TIMM = re.compile(r"^(blocks\.\d+\.mlp\.)fc([12])\.(weight|bias)$")
_SWIGLU_OFFICIAL = re.compile(r"^(blocks\.\d+\.mlp\.)w(12|3)\.(weight|bias)$")


def _is_swiglu_timm(sd: Mapping[str, Tensor]) -> bool:
    """timm packs SwiGLU into fc1 with twice the hidden width fc2 consumes; a plain MLP's match."""
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def dinov2_from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map a timm DINOv2 state_dict onto the official keys (loads into :class:`DinoVisionTransformer`)."""
    sd = dict(sd)
    for k in [k for k in sd if k.startswith(("head.", "fc_norm.", "norm_pre."))]:
        if sd[k].numel():
            raise ValueError(f"timm DINOv2 state_dict has a non-empty {k!r} (a classifier head?): "
                             "use the backbone weights (num_classes=0)")
        del sd[k]
    out: dict[str, Tensor] = {}
    if "reg_token" in sd:
        reg, cls, pos = sd.pop("reg_token"), sd.pop("cls_token"), sd.pop("pos_embed")
        out["cls_token"] = cls
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
        out["register_tokens"] = reg
    swiglu = _is_swiglu_timm(sd)
    for k, v in sd.items():
        m = _SWIGLU_TIMM.match(k) if swiglu else None
        out[f"{m[1]}{'w12' if m[2] == '1' else 'w3'}.{m[3]}" if m else k] = v
    dim = out["cls_token"].shape[-1]
    out["mask_token"] = torch.zeros(1, dim, dtype=out["cls_token"].dtype)
    return out


def dinov2_to_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official DINOv2 state_dict onto timm's keys (inverse of :func:`dinov2_from_timm` up to
    the dropped ``mask_token`` and the cls position folding)."""
    sd = dict(sd)
    sd.pop("mask_token", None)
    out: dict[str, Tensor] = {}
    if "register_tokens" in sd:
        pos = sd.pop("pos_embed")
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    for k, v in sd.items():
        m = _SWIGLU_OFFICIAL.match(k)
        out[f"{m[1]}{'fc1' if m[2] == '12' else 'fc2'}.{m[3]}" if m else k] = v
    return out


def dinov2_auto(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official layout as is; timm layout (``reg_token`` or no ``mask_token``) mapped onto it."""
    return dinov2_from_timm(sd) if "reg_token" in sd or "mask_token" not in sd else dict(sd)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: EfficientNet-PyTorch layout -> timm layout
# ---------------------------------------------------------------------------------------------
def efficientnet_from_effnet_pytorch(sd: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an EfficientNet-PyTorch state_dict (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``,
    ``_bn1``/``_bn2`` in blocks, ``_conv_head``, ``_bn1``, ``_fc``) onto timm's layout (``target``:
    the state_dict of our :class:`~fastproto.backbones.cnn.EfficientNetLite`).

    Both layouts list the same tensors in the same order (stem, then every block's expand conv +
    BN, depthwise conv + BN, projection conv + BN, then head conv + BN and classifier), so the
    mapping pairs them by position; every pair must have the same shape, and the module kind of
    each pair (conv / BN statistic / linear) must agree, which catches any misalignment. The flat
    EfficientNet-PyTorch block index ``_blocks.N`` becomes timm's ``blocks.<stage>.<index>``.
    """
    src, dst = list(sd.items()), list(target.items())
    if len(src) != len(dst):
        raise ValueError(f"EfficientNet-PyTorch state_dict has {len(src)} tensors, the timm layout {len(dst)}")
    out = {}
    for (ks, v), (kd, ref) in zip(src, dst):
        if v.shape != ref.shape or _param_kind(ks) != _param_kind(kd):
            raise ValueError(f"EfficientNet key mapping misaligned: {ks} {tuple(v.shape)} -> {kd} {tuple(ref.shape)}")
        out[kd] = v
    return out


def _param_kind(key: str) -> str:
    """Coarse kind of a parameter (the last name component, ``weight`` refined by module kind)."""
    module, leaf = key.rsplit(".", 1)
    last = module.rsplit(".", 1)[-1]
    if leaf == "weight":
        if "bn" in last:
            return "bn.weight"
        return "linear.weight" if last in ("_fc", "classifier") else "conv.weight"
    return leaf
