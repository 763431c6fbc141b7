"""Anomaly-map post-processing (DESIGN "Ops" item 6): functional API, module, dispatch.

``anomaly_map`` turns encoder/decoder feature pairs into a smoothed pixel anomaly map,
``gaussian_blur`` is its smoothing step on its own, ``image_score`` reduces maps to image scores.
The maths lives in :mod:`fastproto.reference.anomaly_map` (plain PyTorch, ground truth, CPU path);
:mod:`fastproto.triton.anomaly_map` holds the fused GPU kernels.

These are inference ops: the Triton path is **forward only**. With ``impl="auto"`` inputs that
require grad (with grad mode on) go to the reference, which is differentiable; ``impl="triton"``
refuses them with an error instead of silently dropping gradients.
"""
from __future__ import annotations

import importlib
import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from fastproto.ops._dispatch import apply, device_guard, is_finite_real, kernel_op, resolve_impl

# by full name: package attributes may be shadowed by re-exported functions of the same name
_ref = importlib.import_module("fastproto.reference.anomaly_map")

__all__ = ["anomaly_map", "gaussian_blur", "image_score", "AnomalyMap", "IMAGE_SCORE_RULES"]

IMAGE_SCORE_RULES = ("max", "topk_mean", "avgpool_max")

Size = Union[int, Tuple[int, int]]


# ----------------------------------------------------------------------------------------------
# dispatch (the one place that decides between Triton and the reference for this op family)
# ----------------------------------------------------------------------------------------------


def _triton_module():
    # imported lazily: keeps `import fastproto` free of triton and lets TRITON_INTERPRET=1 be set
    # before the kernels are defined
    return importlib.import_module("fastproto.triton.anomaly_map")


def _resolve_impl(op: str, impl: str, tensors: Sequence[torch.Tensor]) -> str:
    """Return "triton" or "reference" (forward-only Triton kernels; see :mod:`fastproto.ops._dispatch`)."""
    return resolve_impl(op, impl, tensors, impls=("triton",), has_backward=False)


def _map_args(members, sizes, eval_size):
    """The kernel ops' flat list arguments back as ``groups`` (None for one pair per group) and ``eval_size``."""
    groups, at = [], 0
    for size in sizes:
        groups.append(list(members[at: at + size]))
        at += size
    return (groups or None), (None if eval_size is None else tuple(eval_size))


def _reference_map(enc: list[torch.Tensor], dec: list[torch.Tensor], out_size: list[int], members: list[int],
                   sizes: list[int], sigma: Optional[float], kernel_size: int,
                   eval_size: Optional[list[int]]) -> torch.Tensor:
    groups, eval_size = _map_args(members, sizes, eval_size)
    return _ref.anomaly_map(enc, dec, tuple(out_size), groups=groups, sigma=sigma, kernel_size=kernel_size,
                            eval_size=eval_size)


# the reference is the fake: the launcher's cached constant tensors must not be built from fake tensors
@kernel_op("triton_anomaly_map", fake=_reference_map)
def _triton_map(enc: list[torch.Tensor], dec: list[torch.Tensor], out_size: list[int], members: list[int],
                sizes: list[int], sigma: Optional[float], kernel_size: int,
                eval_size: Optional[list[int]]) -> torch.Tensor:
    groups, eval_size = _map_args(members, sizes, eval_size)
    return _triton_module().anomaly_map(enc, dec, tuple(out_size), groups=groups, sigma=sigma,
                                        kernel_size=kernel_size, eval_size=eval_size)


def _reference_blur(maps: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    return _ref.gaussian_blur(maps, sigma=sigma, kernel_size=kernel_size)


@kernel_op("triton_gaussian_blur", fake=_reference_blur)
def _triton_blur(maps: torch.Tensor, sigma: float, kernel_size: int) -> torch.Tensor:
    return _triton_module().gaussian_blur(maps, sigma=sigma, kernel_size=kernel_size)


class _AnomalyMapTritonFn(torch.autograd.Function):
    """Thin autograd wrapper of the Triton forward. Forward only: inputs that require grad never
    reach it (see :func:`_resolve_impl`); the backward raises in case one slips through."""

    @staticmethod
    def forward(ctx, n_pairs, options, *features):
        out = _triton_map(list(features[:n_pairs]), list(features[n_pairs:]), *options)
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - unreachable by construction
        raise RuntimeError("anomaly_map: the Triton path has no backward; use impl='reference'")


class _GaussianBlurTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, sigma, kernel_size):
        out = _triton_blur(maps, sigma, kernel_size)
        ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - unreachable by construction
        raise RuntimeError("gaussian_blur: the Triton path has no backward; use impl='reference'")


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _as_size(name: str, value, op: str = "anomaly_map") -> Tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        isinstance(value, (tuple, list, torch.Size))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
    ):
        h, w = int(value[0]), int(value[1])
        if h >= 1 and w >= 1:
            return h, w
    raise ValueError(f"{op}: {name} must be a positive int or a pair (H, W) of positive ints, got {value!r}")


def _as_tensor_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"anomaly_map: {name} must be a sequence of tensors, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"anomaly_map: {name} is empty")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"anomaly_map: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(value)


def _feature_hw(name: str, t: torch.Tensor) -> Tuple[int, int]:
    if not t.is_floating_point():
        raise TypeError(f"anomaly_map: {name} must have a floating dtype, got {t.dtype}")
    if t.dim() == 4:
        _, c, h, w = t.shape
    elif t.dim() == 3:
        _, n, c = t.shape
        side = math.isqrt(n)
        if side * side != n or n == 0:
            raise ValueError(
                f"anomaly_map: {name} is a token tensor [B, N, C] with N={n}, which is not a square "
                "grid; remove the class/register tokens first (or pass [B, C, h, w] maps)"
            )
        h = w = side
    else:
        raise ValueError(
            f"anomaly_map: {name} must be a [B, C, h, w] feature map or [B, N, C] tokens, got shape "
            f"{tuple(t.shape)}"
        )
    if c == 0 or h == 0 or w == 0:
        raise ValueError(f"anomaly_map: {name} has an empty channel or spatial dimension: {tuple(t.shape)}")
    return h, w


def _check_blur_args(op: str, sigma, kernel_size, allow_none: bool):
    if sigma is None:
        if not allow_none:
            raise ValueError(f"{op}: sigma must be a positive number, got None")
    elif not is_finite_real(sigma) or float(sigma) <= 0:
        raise ValueError(f"{op}: sigma must be a positive finite number (or None to disable), got {sigma!r}")
    if (
        isinstance(kernel_size, bool)
        or not isinstance(kernel_size, numbers.Integral)
        or kernel_size < 1
        or kernel_size % 2 == 0
    ):
        raise ValueError(f"{op}: kernel_size must be a positive odd int, got {kernel_size!r}")


def _validate_features(encoder_features, decoder_features, groups):
    enc = _as_tensor_list("encoder_features", encoder_features)
    dec = _as_tensor_list("decoder_features", decoder_features)
    if len(enc) != len(dec):
        raise ValueError(
            f"anomaly_map: encoder_features has {len(enc)} tensors but decoder_features has {len(dec)}; "
            "they are compared pairwise"
        )
    device = enc[0].device
    batch = enc[0].shape[0] if enc[0].dim() > 0 else None
    sizes = []
    for i, (e, d) in enumerate(zip(enc, dec)):
        he = _feature_hw(f"encoder_features[{i}]", e)
        _feature_hw(f"decoder_features[{i}]", d)
        if e.shape != d.shape:
            raise ValueError(
                f"anomaly_map: encoder_features[{i}] has shape {tuple(e.shape)} but decoder_features[{i}] "
                f"has shape {tuple(d.shape)}"
            )
        for side, t in (("encoder_features", e), ("decoder_features", d)):
            if t.device != device:
                raise ValueError(
                    f"anomaly_map: {side}[{i}] is on {t.device} but encoder_features[0] is on {device}"
                )
        if e.shape[0] != batch:
            raise ValueError(
                f"anomaly_map: encoder_features[{i}] has batch size {e.shape[0]} but encoder_features[0] "
                f"has {batch}"
            )
        sizes.append(he)

    if groups is not None:
        if isinstance(groups, torch.Tensor) or not isinstance(groups, (list, tuple)) or len(groups) == 0:
            raise ValueError(f"anomaly_map: groups must be a non-empty sequence of index sequences, got {groups!r}")
        norm_groups = []
        for gi, g in enumerate(groups):
            if not isinstance(g, (list, tuple)) or len(g) == 0:
                raise ValueError(f"anomaly_map: groups[{gi}] must be a non-empty sequence of ints, got {g!r}")
            idx = []
            for j in g:
                if isinstance(j, bool) or not isinstance(j, numbers.Integral) or not 0 <= j < len(enc):
                    raise ValueError(
                        f"anomaly_map: groups[{gi}] holds {j!r}, which is not an index into the "
                        f"{len(enc)} feature pairs"
                    )
                idx.append(int(j))
            first = idx[0]
            for j in idx[1:]:
                if enc[j].shape != enc[first].shape:
                    raise ValueError(
                        f"anomaly_map: groups[{gi}] averages features of different shapes: "
                        f"encoder_features[{first}] {tuple(enc[first].shape)} vs encoder_features[{j}] "
                        f"{tuple(enc[j].shape)}"
                    )
            norm_groups.append(idx)
        sizes = [sizes[g[0]] for g in norm_groups]
        groups = norm_groups
    return enc, dec, groups, sizes


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def anomaly_map(
    encoder_features: Sequence[torch.Tensor],
    decoder_features: Sequence[torch.Tensor],
    out_size: Optional[Size] = None,
    *,
    groups: Optional[Sequence[Sequence[int]]] = None,
    sigma: Optional[float] = 4.0,
    kernel_size: int = 5,
    eval_size: Optional[Size] = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Pixel anomaly map from encoder/decoder feature pairs, float32 [B, H, W].

    For every pair (or, with ``groups``, every group: the features listed in ``groups[i]`` are
    averaged on each side first, as Dinomaly's/INP-Former's ``fuse_feature``), ``d = 1 - cos`` over
    channels (``eps = 1e-8`` per norm, as ``F.cosine_similarity``) is upsampled bilinearly with
    ``align_corners=True`` to ``out_size``; the maps are averaged over pairs; optionally resized
    bilinearly with ``align_corners=False`` to ``eval_size``; then blurred by a zero-padded
    ``kernel_size`` x ``kernel_size`` Gaussian of std ``sigma`` normalised to sum 1 (``sigma=None``
    disables the blur). Computed in float32 whatever the input dtype.

    Args:
        encoder_features, decoder_features: equally long sequences of [B, C, h, w] maps or
            [B, N, C] ViT tokens (N = h*w, square grid, prefix tokens removed); pair ``i`` must have
            equal shapes; pairs may differ in C and resolution. Any strides.
        out_size: size of the upsampled maps; default: the largest feature resolution.
        groups: optional list of index lists into the pairs (Dinomaly/INP-Former:
            ``[[0, 1, 2, 3], [4, 5, 6, 7]]``); members of a group must share a shape.
        sigma, kernel_size: Gaussian smoothing (default 5x5, sigma 4 as Dinomaly/INP-Former).
        eval_size: optional second resize before the blur. The official Dinomaly/INP-Former
            protocol is ``out_size=392, eval_size=256``.
        impl: "auto" (Triton on CUDA tensors when triton imports and no input requires grad,
            else the reference), "triton" or "reference".

    The Triton path is forward only (see the module docstring).
    """
    enc, dec, groups, sizes = _validate_features(encoder_features, decoder_features, groups)
    if out_size is None:
        out_size = (max(h for h, _ in sizes), max(w for _, w in sizes))
    out_size = _as_size("out_size", out_size)
    if eval_size is not None:
        eval_size = _as_size("eval_size", eval_size)
    _check_blur_args("anomaly_map", sigma, kernel_size, allow_none=True)
    sigma = None if sigma is None else float(sigma)
    kernel_size = int(kernel_size)

    which = _resolve_impl("anomaly_map", impl, enc + dec)
    if which == "reference":
        return _ref.anomaly_map(
            enc, dec, out_size, groups=groups, sigma=sigma, kernel_size=kernel_size, eval_size=eval_size
        )
    flat = groups or []  # the kernel operator's schema takes the groups as members and sizes
    options = (list(out_size), [i for g in flat for i in g], [len(g) for g in flat], sigma, kernel_size,
               None if eval_size is None else list(eval_size))
    with device_guard(enc[0].device):
        return apply(_AnomalyMapTritonFn, len(enc), options, *enc, *dec)


def gaussian_blur(maps: torch.Tensor, sigma: float = 4.0, kernel_size: int = 5, impl: str = "auto") -> torch.Tensor:
    """Zero-padded Gaussian blur (Dinomaly's ``get_gaussian_kernel`` conv): [B, H, W] or
    [B, 1, H, W] in, same shape out. float16/bfloat16/float32 maps give float32; float64 maps stay
    float64 (reference only). The Triton path is forward only."""
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"gaussian_blur: maps must be a torch.Tensor, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise TypeError(f"gaussian_blur: maps must have a floating dtype, got {maps.dtype}")
    if not (maps.dim() == 3 or (maps.dim() == 4 and maps.shape[1] == 1)):
        raise ValueError(f"gaussian_blur: maps must be [B, H, W] or [B, 1, H, W], got shape {tuple(maps.shape)}")
    _check_blur_args("gaussian_blur", sigma, kernel_size, allow_none=False)
    which = _resolve_impl("gaussian_blur", impl, [maps])
    if maps.dtype == torch.float64:
        if impl == "triton":
            raise TypeError("gaussian_blur: float64 maps are supported by impl='reference' (or 'auto') only")
        which = "reference"
    if which == "reference":
        return _ref.gaussian_blur(maps, sigma=float(sigma), kernel_size=int(kernel_size))
    with device_guard(maps.device):
        return apply(_GaussianBlurTritonFn, maps, float(sigma), int(kernel_size))


def image_score(maps: torch.Tensor, rule: str = "max", *, topk: float = 0.01, pool_size: Size = 16) -> torch.Tensor:
    """Image anomaly scores [B] from maps [B, H, W] or [B, 1, H, W].

    Rules:
        ``"max"``: maximum of the map.
        ``"topk_mean"``: mean of the ``int(H * W * topk)`` largest values, exactly as Dinomaly's and
            INP-Former's ``max_ratio`` (int() truncates: 256x256 with 0.01 keeps 655 values). An
            error if that count is 0.
        ``"avgpool_max"``: ``avg_pool2d`` with a ``pool_size`` window, stride 1, no padding, then the
            maximum, as ADer's ``pooling_ks`` (ViTAD uses 16).
    float16/bfloat16/float32 maps give float32 scores, float64 gives float64. NaN is not checked.
    """
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"image_score: maps must be a torch.Tensor, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise TypeError(f"image_score: maps must have a floating dtype, got {maps.dtype}")
    if not (maps.dim() == 3 or (maps.dim() == 4 and maps.shape[1] == 1)):
        raise ValueError(f"image_score: maps must be [B, H, W] or [B, 1, H, W], got shape {tuple(maps.shape)}")
    if not isinstance(rule, str) or rule not in IMAGE_SCORE_RULES:
        raise ValueError(f"image_score: unknown rule {rule!r}; expected one of {IMAGE_SCORE_RULES}")
    if not is_finite_real(topk) or not 0.0 < float(topk) <= 1.0:
        raise ValueError(f"image_score: topk must be a fraction in (0, 1], got {topk!r}")
    h, w = maps.shape[-2], maps.shape[-1]
    if h == 0 or w == 0:
        raise ValueError(f"image_score: maps have an empty spatial size {h}x{w}")
    if rule == "topk_mean" and int(h * w * float(topk)) < 1:
        raise ValueError(
            f"image_score: topk={topk} keeps int({h}*{w}*{topk}) = 0 pixels of a {h}x{w} map; "
            "use a larger topk or rule='max'"
        )
    if rule == "avgpool_max":
        ph, pw = _as_size("pool_size", pool_size, op="image_score")
        if ph > h or pw > w:
            raise ValueError(f"image_score: pool_size {ph}x{pw} is larger than the {h}x{w} maps")
        pool_size = (ph, pw)
    return _ref.image_score(maps, rule, topk=float(topk), pool_size=pool_size)


class AnomalyMap(nn.Module):
    """Module form of :func:`anomaly_map` (no parameters): ``AnomalyMap(out_size=392, eval_size=256,
    groups=None)(encoder_features, decoder_features)``."""

    def __init__(
        self,
        out_size: Optional[Size] = None,
        *,
        groups: Optional[Sequence[Sequence[int]]] = None,
        sigma: Optional[float] = 4.0,
        kernel_size: int = 5,
        eval_size: Optional[Size] = None,
        impl: str = "auto",
    ):
        super().__init__()
        self.out_size = out_size
        self.groups = groups
        self.sigma = sigma
        self.kernel_size = kernel_size
        self.eval_size = eval_size
        self.impl = impl

    def forward(self, encoder_features, decoder_features) -> torch.Tensor:
        return anomaly_map(
            encoder_features, decoder_features, self.out_size, groups=self.groups, sigma=self.sigma,
            kernel_size=self.kernel_size, eval_size=self.eval_size, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (f"out_size={self.out_size}, eval_size={self.eval_size}, groups={self.groups}, "
                f"sigma={self.sigma}, kernel_size={self.kernel_size}, impl={self.impl!r}")
