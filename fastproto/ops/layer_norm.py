"""Residual add + LayerNorm: the glue of every pre-norm transformer block, fused.

``add_layer_norm(x, residual, weight, bias, scale=gamma)`` returns ``(out, s)`` with
``s = residual + gamma * x`` (the new residual stream) and ``out = LayerNorm(s)`` (the next branch's
input); ``layer_norm`` is the same without the residual. DiT's adaLN-Zero blocks are covered too: the
branch scale may be a per-sample gate ``[B, 1, C]`` and ``modulation=(shift, scale)`` applies
``modulate(LayerNorm(s), shift, scale) = LayerNorm(s) * (1 + scale) + shift`` in the same pass.

In a ViT block under bfloat16 autocast the eager path spends more time on these element-wise passes than
on attention: LayerScale, the residual add, LayerNorm (float32 under autocast) and the cast to bfloat16 for
the next Linear each read and write the float32 token tensor. The fused kernel reads ``x`` and ``residual``
once and writes ``s`` and ``out`` once, ``out`` directly in the dtype the next Linear wants (``out_dtype``).

The maths lives in :mod:`fastproto.reference.layer_norm` (plain PyTorch, ground truth, CPU path);
:mod:`fastproto.triton.layer_norm` holds the kernels (forward and analytic backward, in Triton).
``impl="auto"`` takes Triton on CUDA tensors (float32/float16/bfloat16, C <= 8192) and the reference
otherwise. There is no compiled CUDA kernel for this op.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastproto.ops._dispatch import apply, autocast_dtype, device_guard, finite_number, kernel_op, resolve_impl

# by full name: package attributes may be shadowed by re-exported functions of the same name
_ref = importlib.import_module("fastproto.reference.layer_norm")

__all__ = ["add_layer_norm", "layer_norm", "pre_norm", "LayerNorm"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_C = 8192  # the Triton kernels hold whole rows in registers


def _triton_module():
    # imported lazily: keeps `import fastproto` free of triton and lets TRITON_INTERPRET=1 be set
    # before the kernels are defined
    return importlib.import_module("fastproto.triton.layer_norm")


@kernel_op("triton_add_layer_norm")
def _triton_forward(x: torch.Tensor, residual: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    mscale: Optional[torch.Tensor], eps: float, rows_per_group: int, *, branch_dtype: torch.dtype,
                    sdtype: torch.dtype, ln_dtype: torch.dtype, mod_dtype: torch.dtype, out_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    return _triton_module().forward(x, residual, scale, weight, bias, shift, mscale, eps, rows_per_group,
                                    branch_dtype=branch_dtype, sdtype=sdtype, ln_dtype=ln_dtype,
                                    mod_dtype=mod_dtype, out_dtype=out_dtype)


@kernel_op("triton_add_layer_norm_backward")
def _triton_backward(grad_out: torch.Tensor, grad_s: Optional[torch.Tensor], s: torch.Tensor,
                     x: Optional[torch.Tensor], scale: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], mscale: Optional[torch.Tensor], mean: torch.Tensor,
                     rstd: torch.Tensor, rows_per_group: int, *,
                     ln_dtype: torch.dtype, dx_dtype: Optional[torch.dtype], dr_dtype: Optional[torch.dtype],
                     sum_weight: bool, sum_bias: bool, sum_scale: bool, sum_modulation: bool
                     ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
                                Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
                                Optional[torch.Tensor]]:
    return _triton_module().backward(grad_out, grad_s, s, x, scale, weight, bias, mscale, mean, rstd,
                                     rows_per_group, ln_dtype=ln_dtype, dx_dtype=dx_dtype, dr_dtype=dr_dtype,
                                     sum_weight=sum_weight, sum_bias=sum_bias, sum_scale=sum_scale,
                                     sum_modulation=sum_modulation)


class _AddLayerNormFn(torch.autograd.Function):
    """Triton forward and analytic backward on 2-D ``[R, C]`` inputs (``scale``, ``shift``, ``mscale``: ``[C]`` or
    one row per group of ``rows_per_group`` rows). Returns ``(out, s)``; ``s`` is None without residual and
    scale (it would be ``x`` itself)."""

    @staticmethod
    def forward(ctx, x, residual, scale, weight, bias, shift, mscale, eps, rows_per_group, ln_dtype, out_dtype):
        branch_dtype = x.dtype if scale is None else torch.promote_types(x.dtype, scale.dtype)
        sdtype = _ref.summed_dtype(x, residual, scale)
        modulation = None if shift is None else (shift, mscale)
        out, s, mean, rstd = _triton_forward(
            x, residual, scale, weight, bias, shift, mscale, eps, rows_per_group, branch_dtype=branch_dtype,
            sdtype=sdtype, ln_dtype=ln_dtype, mod_dtype=_ref.modulated_dtype(ln_dtype, modulation),
            out_dtype=out_dtype)
        ctx.rows_per_group, ctx.ln_dtype = rows_per_group, ln_dtype
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, None if bias is None else bias.dtype,
                      None if shift is None else shift.dtype)
        keep_x = scale is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x if s is None else s, x if keep_x else None, scale, weight,
                              bias if shift is not None else None, mscale, mean, rstd)
        return out, s

    @staticmethod
    @once_differentiable  # the backward kernel is not differentiable itself
    def backward(ctx, grad_out, grad_s):
        s, x, scale, weight, bias, mscale, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if grad_out is None:
            grad_out = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
        x_dtype, r_dtype, b_dtype, sh_dtype = ctx.dtypes
        with device_guard(s.device):
            dx, dr, dw, db, dg, dsh, dms = _triton_backward(
                grad_out, grad_s, s, x, scale, weight, bias, mscale, mean, rstd, ctx.rows_per_group,
                ln_dtype=ctx.ln_dtype, dx_dtype=x_dtype if needs[0] else None, dr_dtype=r_dtype if needs[1] else None,
                sum_weight=weight is not None and needs[3], sum_bias=b_dtype is not None and needs[4],
                sum_scale=scale is not None and needs[2], sum_modulation=mscale is not None and (needs[5] or needs[6]))
        def like(grad, t, dtype=None):  # a float32 column sum in its parameter's dtype
            return None if grad is None else grad.to(dtype or t.dtype)

        return (dx, dr, like(dg, scale), like(dw, weight), like(db, None, b_dtype), like(dsh, None, sh_dtype),
                like(dms, mscale), None, None, None, None)


# ----------------------------------------------------------------------------------------------
# validation and dispatch
# ----------------------------------------------------------------------------------------------


def _validate(op, x, residual, weight, bias, scale, eps, out_dtype, modulation) -> float:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (channel) dim, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must have a floating dtype, got {x.dtype}")
    c = x.shape[-1]
    if modulation is not None and (not isinstance(modulation, (tuple, list)) or len(modulation) != 2):
        raise TypeError(f"{op}: modulation must be a (shift, scale) pair of tensors or None, got "
                        f"{type(modulation).__name__}")
    shift, mscale = modulation if modulation is not None else (None, None)
    channel = (c,)
    per_sample = _per_sample_shape(x) if x.dim() >= 2 else channel  # one vector per sample
    for name, t, shapes in (("residual", residual, (tuple(x.shape),)), ("weight", weight, (channel,)),
                            ("bias", bias, (channel,)), ("scale", scale, (channel, per_sample)),
                            ("modulation shift", shift, (channel, per_sample)),
                            ("modulation scale", mscale, (channel, per_sample))):
        if t is None:
            if modulation is not None and name.startswith("modulation"):
                raise TypeError(f"{op}: {name} must be a torch.Tensor, got None")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.shape not in shapes:
            raise ValueError(f"{op}: {name} must have shape {' or '.join(str(s) for s in dict.fromkeys(shapes))} "
                             f"(x has shape {tuple(x.shape)}), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    if shift is not None and shift.shape != mscale.shape:
        raise ValueError(f"{op}: modulation shift and scale must have the same shape, got {tuple(shift.shape)} and "
                         f"{tuple(mscale.shape)}")
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise TypeError(f"{op}: out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    return finite_number(op, "eps", eps, allow_zero=True)


def _per_sample_shape(x: torch.Tensor) -> Tuple[int, ...]:
    """``(B, 1, ..., 1, C)``: one vector per sample (leading dim) of ``x``, broadcast over its other dims."""
    return (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)


def _unsupported(x, tensors, out_dtype):
    dtypes = {t.dtype for t in tensors if t is not None} | {out_dtype}
    bad = sorted(str(d) for d in dtypes if d not in _KERNEL_DTYPES)
    if bad:
        return f"the Triton kernels take float32/float16/bfloat16, got {', '.join(bad)}"
    if x.shape[-1] > MAX_C:
        return f"the Triton kernels hold whole rows of at most {MAX_C} channels, got {x.shape[-1]}"
    return None


def _rows(t: Optional[torch.Tensor], c: int) -> Optional[torch.Tensor]:
    """``t`` as ``[R, C]`` with a contiguous last dim (a view when the strides allow it)."""
    if t is None:
        return None
    t = t.reshape(-1, c)
    return t if t.stride(-1) == 1 else t.contiguous()


def _vector(t: Optional[torch.Tensor], c: int) -> Optional[torch.Tensor]:
    """A shared ``[C]`` vector as is (contiguous); a per-sample ``[B, 1, ..., C]`` one as ``[B, C]`` with any row stride
    (a view where the strides allow it: DiT's gate, shift and scale are chunks of one adaLN output)."""
    if t is None or t.dim() == 1:
        return t if t is None or t.stride(0) == 1 else t.contiguous()
    return _rows(t, c)


def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], *, scale: Optional[torch.Tensor] = None, eps: float = 1e-5,
                   out_dtype: Optional[torch.dtype] = None,
                   modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Residual add and LayerNorm over the last dim in one pass: ``(out, s)``.

    Args:
        x: the branch output ``[B, ..., C]`` (e.g. an attention or MLP output).
        residual: the residual stream, same shape as ``x`` (None: ``s = scale * x``).
        weight, bias: LayerNorm's affine parameters ``[C]`` (None: 1 / 0).
        scale: scale of the branch: per channel ``[C]`` (LayerScale's ``gamma``) or per sample ``[B, 1, ..., C]``
            (adaLN-Zero's gate), or None.
        eps: LayerNorm's eps (nn.LayerNorm's default 1e-5; DINOv2 1e-6, Dinomaly/INP-Former decoders 1e-8).
        out_dtype: dtype of ``out``; None gives what the eager expression returns (``F.layer_norm``'s dtype: float32
            under autocast, else the dtype of ``s``; then promoted by the modulation). Pass the autocast dtype when
            ``out`` feeds a Linear: same values, half the bytes.
        modulation: ``(shift, scale)``, each ``[C]`` or ``[B, 1, ..., C]``: ``out = LayerNorm(s) * (1 + scale) +
            shift`` (adaLN's ``modulate``), or None.
        impl: ``"auto"`` | ``"triton"`` | ``"reference"``.

    Returns:
        ``out`` (the LayerNorm of ``s``, modulated; ``out_dtype``) and ``s = residual + scale * x`` in the
        promoted dtype of its inputs (a float32 residual stream stays float32 with a bfloat16 branch), both of
        ``x``'s shape.
    """
    op = "add_layer_norm"
    eps = _validate(op, x, residual, weight, bias, scale, eps, out_dtype, modulation)
    shift, mscale = modulation if modulation is not None else (None, None)
    sdtype = _ref.summed_dtype(x, residual, scale)
    ln_dtype = _ref.default_out_dtype(sdtype, x.device)
    out_dtype = out_dtype or _ref.modulated_dtype(ln_dtype, modulation)
    tensors = (x, residual, scale, weight, bias, shift, mscale)
    chosen = resolve_impl(op, impl, [t for t in tensors if t is not None], impls=("triton",),
                          unsupported=lambda: _unsupported(x, tensors, out_dtype))
    if chosen == "reference" or x.numel() == 0:
        return _ref.add_layer_norm(x, residual, weight, bias, scale=scale, eps=eps, out_dtype=out_dtype,
                                   modulation=modulation)
    c = x.shape[-1]
    rows_per_group = x.numel() // (c * x.shape[0]) if x.dim() >= 2 else 1
    with device_guard(x.device):
        out, s = apply(_AddLayerNormFn, _rows(x, c), _rows(residual, c),
                       *(_vector(t, c) for t in (scale, weight, bias, shift, mscale)), eps, rows_per_group, ln_dtype,
                       out_dtype)
    out = out.view(x.shape)
    return out, (x if s is None else s.view(x.shape))


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *, eps: float = 1e-5,
               out_dtype: Optional[torch.dtype] = None, modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
               impl: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim (then ``modulation``), ``out_dtype`` as in :func:`add_layer_norm` (which see)."""
    return add_layer_norm(x, None, weight, bias, eps=eps, out_dtype=out_dtype, modulation=modulation, impl=impl)[0]


def pre_norm(norm: nn.LayerNorm, x: torch.Tensor, *, residual: Optional[torch.Tensor] = None,
             scale: Optional[torch.Tensor] = None, modulation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
             impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's glue with its ``norm`` module's parameters: ``(norm(s), s)``, ``s = residual + scale * x``
    (then ``norm(s) * (1 + m_scale) + m_shift`` with ``modulation=(m_shift, m_scale)``, as DiT's ``modulate``).

    With ``impl="reference"`` this is the eager expression ``norm(residual + x * scale)``, bit for bit (the
    output in ``F.layer_norm``'s dtype). Otherwise :func:`add_layer_norm` runs with ``out_dtype`` = the
    autocast dtype when autocast is on: the block's next Linear computes from the same values, which then
    never exist in float32 in memory.
    """
    out_dtype = None if impl == "reference" else autocast_dtype(x.device.type)
    return add_layer_norm(x, residual, norm.weight, norm.bias, scale=scale, eps=norm.eps, out_dtype=out_dtype,
                          modulation=modulation, impl=impl)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim (same parameters and state_dict keys) running :func:`layer_norm`.

    ``out_dtype`` as in :func:`add_layer_norm`; ``"autocast"`` gives the autocast dtype when autocast is
    on (the dtype the next Linear computes in) and ``F.layer_norm``'s dtype otherwise.
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, out_dtype: Optional[torch.dtype] | str = None, impl: str = "auto", device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias, device=device,
                         dtype=dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"LayerNorm: normalises the last dim only, got normalized_shape {self.normalized_shape}")
        self.out_dtype = out_dtype
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = autocast_dtype(x.device.type) if self.out_dtype == "autocast" else self.out_dtype
        return layer_norm(x, self.weight, self.bias, eps=self.eps, out_dtype=out_dtype, impl=self.impl)
