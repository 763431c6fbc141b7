"""Prototype attention and prototype routing (DESIGN "Ops" items 2 and 3): API, module, dispatch.

* :func:`prototype_attention` — INP-Former's ReLU-cosine attention to a few prototypes
  (``kind="relu_cos"``) or softmax cross-attention to prototypes (``kind="softmax"``).
* :class:`PrototypeAttention` — INP-Former's ``Prototype_Attention`` module (same parameter names
  and shapes: ``learn_scale`` [H, 1, 1], ``q``, ``kv``, ``proj``), returning ``(out, attn)``.
* :func:`route` — nearest / soft / linear routing of tokens to prototypes.

The maths lives in :mod:`fastproto.reference.prototype`. Triton covers ``prototype_attention`` forward
and backward (M <= 64, D, Dv <= 256; :mod:`fastproto.triton.prototype`) and every ``route`` mode and bank
layout (:mod:`fastproto.triton.route`): streaming over the prototypes, no [B, N, M] intermediate except
``soft``'s returned weights; analytic backward kernels for ``soft`` and ``linear``; ``nearest``'s backward,
through the selected prototype only, is written in PyTorch below (O(B N C)). ``route(mode="nearest",
impl="cuda")`` runs the compiled extension's kernel (``kernels/route.cu``, one warp per token; its
per-token math, ``kernels/route_nearest.h``, is shared with the extension's CPU kernel, which the tests
run); not yet measured on a GPU, so ``"auto"`` prefers Triton. Likewise ``prototype_attention(...,
impl="cuda")``, forward and backward: ``kernels/prototype.cu`` (one warp per query; the backward sums
each block's prototype gradients in shared memory), per-query routines ``kernels/prototype_attention.h``
shared with the CPU kernels. ``route(mode="soft" | "linear", impl="cuda")`` runs on those same kernels as the
attention of the tokens to the bank (k = v = the prototypes, one head; M <= 64).
"""
from __future__ import annotations

import importlib
import math
import numbers
from typing import Optional, Union

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastproto import _ext
from fastproto.ops._dispatch import apply, device_guard, kernel_op, resolve_impl, warn_once
from fastproto.triton import empty_output

_ref = importlib.import_module("fastproto.reference.prototype")

__all__ = ["prototype_attention", "PrototypeAttention", "route", "ATTN_KINDS", "ROUTE_MODES"]

ATTN_KINDS = _ref.ATTN_KINDS
ROUTE_MODES = _ref.ROUTE_MODES
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_module():
    return importlib.import_module("fastproto.triton.prototype")


def _route_module():
    return importlib.import_module("fastproto.triton.route")


NEAREST_OP = "route_nearest"  # the compiled extension's operator behind route(mode="nearest", impl="cuda")


@kernel_op("triton_route_nearest")
def _triton_nearest(x: torch.Tensor, p: torch.Tensor, per_location: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _route_module().route_nearest(x, p, per_location)


@kernel_op("cuda_route_nearest")
def _compiled_nearest(x: torch.Tensor, p: torch.Tensor, per_location: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.fastproto.route_nearest`` (CUDA kernel on CUDA tensors, the same math on the CPU):
    (float32 distance [B, N], int64 index [B, N]), as the Triton ``route_nearest``."""
    B, N, _ = x.shape
    dist = empty_output((B, N), torch.float32, x.device)
    idx = empty_output((B, N), torch.int64, x.device)
    _ext.op(NEAREST_OP)(x, p, bool(per_location), _ref.COS_EPS, dist, idx)
    return dist, idx


_NEAREST = {"triton": _triton_nearest, "cuda": _compiled_nearest}

ATTENTION_OP = "prototype_attention_forward"  # behind prototype_attention(impl="cuda") and route's soft / linear
ATTENTION_BACKWARD_OP = "prototype_attention_backward"
# the kernels' `kind`: prototype_attention's kinds, and route's soft and linear modes as attention of the tokens
# to the bank (k = v = the prototypes, one head)
_KIND_CODE = {"relu_cos": 0, "softmax": 1, "cos_softmax": 2, "linear": 3}
_NORMALISED = ("relu_cos", "cos_softmax")


@kernel_op("cuda_prototype_attention_forward")
def _compiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, kind: str,
                        eps: float, want_attn: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``torch.ops.fastproto.prototype_attention_forward`` (CUDA kernel on CUDA tensors, the same routine
    on the CPU): ``(out [B, H, N, Dv], weights [B, H, N, M] or None)`` in q's dtype; ``scale`` float32 [H]."""
    B, H, N, _ = q.shape
    out = empty_output((B, H, N, v.shape[-1]), q.dtype, q.device)
    attn = empty_output((B, H, N, k.shape[-2]), q.dtype, q.device) if want_attn else None
    _ext.op(ATTENTION_OP)(q, k, v, scale, _KIND_CODE[kind], eps, out, attn)
    return out, attn


@kernel_op("cuda_prototype_attention_backward")
def _compiled_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                                 grad_out: torch.Tensor, grad_attn: Optional[torch.Tensor], kind: str,
                                 eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastproto.prototype_attention_backward``: ``(dq, dk_acc, dv, dscale)`` as the Triton
    ``prototype_attention_backward`` returns them (float32 per-sample sums; d(k̂) for the normalised kinds)."""
    B, H, N, D = q.shape
    M, DV = k.shape[-2], v.shape[-1]
    dq = empty_output((B, H, N, D), q.dtype, q.device)
    dk, dv, ds = (empty_output(shape, torch.float32, q.device) for shape in ((B, H, M, D), (B, H, M, DV), (B, H)))
    _ext.op(ATTENTION_BACKWARD_OP)(q, k, v, scale, grad_out, grad_attn, _KIND_CODE[kind], eps, dq, dk, dv, ds)
    return dq, dk, dv, ds


@kernel_op("triton_prototype_attention_forward")
def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, kind: str,
                      eps: float, want_attn: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    # the Triton kernels: relu_cos / softmax with the reference's norm floor, no weights output
    assert eps == _ref.ATTN_NORM_EPS and not want_attn
    return _triton_module().prototype_attention(q, k, v, scale, kind), None


@kernel_op("triton_prototype_attention_backward")
def _triton_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                               grad_out: torch.Tensor, grad_attn: Optional[torch.Tensor], kind: str,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    assert grad_attn is None
    return _triton_module().prototype_attention_backward(q, k, v, scale, grad_out, kind)


_ATTENTION = {"triton": (_triton_attention, _triton_attention_backward),
              "cuda": (_compiled_attention, _compiled_attention_backward)}


# ----------------------------------------------------------------------------------------------
# analytic backward helpers (PyTorch, compute dtype)
# ----------------------------------------------------------------------------------------------


def _normalize_fwd(x, eps):
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / n.clamp_min(eps), n


def _normalize_bwd(y, n, dy, eps):
    """d(x / max(||x||, eps)) given y, the norm n and dy."""
    big = n > eps
    proj = dy - y * (y * dy).sum(-1, keepdim=True)
    return torch.where(big, proj / n.clamp_min(eps), dy / eps)


class _ProtoAttnFn(torch.autograd.Function):
    """Forward and backward by a kernel pair (Triton, or the compiled one): the backward kernel recomputes
    the attention per query and returns float32 per-sample prototype gradients, finished here on the small
    [M, D] side. Returns ``(out, weights)``, the weights [B, H, N, M] only when ``want_attn`` (route's soft
    mode; differentiable), else None. ``eps``: the norm floor of the normalised kinds."""

    @staticmethod
    def forward(ctx, kernels, q, k, v, scale_t, kind, scale_h, eps, want_attn):
        forward, ctx.backward_kernel = kernels
        out, attn = forward(q, k, v, scale_h, kind, eps, want_attn)
        ctx.save_for_backward(q, k, v, scale_h)
        ctx.kind, ctx.eps = kind, eps
        ctx.scale_shape = None if scale_t is None else scale_t.shape
        ctx.scale_dtype = None if scale_t is None else scale_t.dtype
        ctx.set_materialize_grads(False)  # an unused output costs no zeros
        return out, attn

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, dout, dattn):
        if dout is None and dattn is None:
            return (None,) * 9
        q, k, v, s = ctx.saved_tensors
        if dout is None:  # only the weights were used
            dout = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dq, dk, dv, ds = ctx.backward_kernel(q, k, v, s, dout, dattn, ctx.kind, ctx.eps)
        if ctx.kind in _NORMALISED:  # dk holds d(k / max(||k||, eps)): finish on the small [M, D] side
            kn, knorm = _normalize_fwd(k.float(), ctx.eps)
            kn_b = kn if k.dim() == 4 else kn.unsqueeze(0)
            knorm_b = knorm if k.dim() == 4 else knorm.unsqueeze(0)
            dk = _normalize_bwd(kn_b, knorm_b, dk, ctx.eps)
        if k.dim() == 3:
            dk, dv = dk.sum(0), dv.sum(0)
        dscale = None
        if ctx.scale_shape is not None and ctx.needs_input_grad[4]:  # inputs: kernels, q, k, v, scale_t, ...
            per_head = ds.sum(0)
            one = math.prod(ctx.scale_shape) == 1
            dscale = (per_head.sum() if one else per_head).reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return None, dq, dk.to(k.dtype), dv.to(v.dtype), dscale, None, None, None, None


_ROUTE_KIND = {"soft": "cos_softmax", "linear": "linear"}


def _compiled_route(x, p, mode, tau, per_location):
    """route's soft and linear modes by the compiled attention kernels: the tokens attend to the bank with
    one head and k = v = the prototypes (views, no copies; a per-location bank makes the locations the batch
    and the samples the queries)."""
    if p.dim() == 2:
        q, k = x.unsqueeze(1), p.unsqueeze(0)
    elif per_location:
        q, k = x.transpose(0, 1).unsqueeze(1), p.unsqueeze(1)
    else:
        q, k = x.unsqueeze(1), p.unsqueeze(1)
    s = torch.full((1,), 1.0 / tau if mode == "soft" else 1.0, dtype=torch.float32, device=x.device)
    out, w = apply(_ProtoAttnFn, _ATTENTION["cuda"], q, k, k, None, _ROUTE_KIND[mode], s, _ref.COS_EPS,
                   mode == "soft")
    back = (lambda t: t[:, 0].transpose(0, 1)) if per_location else (lambda t: t[:, 0])
    return (back(out), back(w)) if mode == "soft" else back(out)


class _RouteNearestFn(torch.autograd.Function):
    """Forward by a kernel (Triton streaming min/argmin, or the compiled one); analytic backward in
    PyTorch through the selected prototype only (O(B N C), the [B, N, M] matrix is not rebuilt).

    With ``s`` the selected prototype, ``nx = max(|x|, eps)``, ``ns = max(|s|, eps)`` and the forward's
    ``cos = 1 - dist``, the gradient of ``d = 1 - cos`` is, per token, a combination of two vectors::

        dx = -g (s / (nx ns) - [|x| > eps] cos x / nx^2),   ds = -g (x / (nx ns) - [|s| > eps] cos s / ns^2)

    (``d(v / max(|v|, eps))`` in closed form): per-token scalars, then one fused multiply-add per side, in the
    compute dtype (float32, float64 for float64 inputs), with no normalised copies of x or s."""

    @staticmethod
    def forward(ctx, nearest, x, p, per_location):
        dist, idx = nearest(x, p, per_location)
        ctx.save_for_backward(x, p, idx, dist)
        ctx.per_location = per_location
        ctx.mark_non_differentiable(idx)
        return dist.to(x.dtype), idx

    @staticmethod
    def backward(ctx, ddist, _didx):
        x, p, idx, dist = ctx.saved_tensors
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        eps = _ref.COS_EPS
        B, N, C = x.shape
        # the selected prototype of every token, [B, N, C]; a per-location bank is indexed [N, B]
        if p.dim() == 2:
            index = None
            sel = p[idx]
        elif ctx.per_location:
            index = idx.t().unsqueeze(-1).expand(N, B, C)
            sel = torch.gather(p, 1, index).transpose(0, 1)
        else:
            index = idx.unsqueeze(-1).expand(B, N, C)
            sel = torch.gather(p, 1, index)
        nx = torch.linalg.vector_norm(x, dim=-1, dtype=cd)
        ns = torch.linalg.vector_norm(sel, dim=-1, dtype=cd)
        nxc, nsc = nx.clamp_min(eps), ns.clamp_min(eps)
        g = -ddist.to(cd)
        cos = 1.0 - dist.to(cd)
        cross = (g / (nxc * nsc)).unsqueeze(-1)
        own_x = torch.where(nx > eps, -g * cos / (nxc * nxc), 0.0).unsqueeze(-1)
        dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.addcmul(own_x * x, sel, cross, out=dx)  # computed in cd, rounded once to x's dtype
        dp = None
        if ctx.needs_input_grad[2]:  # p (inputs: the kernel, x, p, per_location)
            own_s = torch.where(ns > eps, -g * cos / (nsc * nsc), 0.0).unsqueeze(-1)
            dsel = torch.addcmul(own_s * sel, x, cross)
            dp = torch.zeros(p.shape, dtype=cd, device=p.device)
            if p.dim() == 2:
                dp.index_add_(0, idx.reshape(-1), dsel.reshape(-1, C))
            else:
                dp.scatter_add_(1, index, dsel.transpose(0, 1) if ctx.per_location else dsel)
            dp = dp.to(p.dtype)
        return None, dx, dp, None


@kernel_op("triton_route_soft")
def _triton_route_soft(x: torch.Tensor, p: torch.Tensor, tau: float,
                       per_location: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _route_module().route_soft(x, p, tau, per_location)


@kernel_op("triton_route_soft_backward")
def _triton_route_soft_backward(x: torch.Tensor, p: torch.Tensor, lse: torch.Tensor, grad_out: torch.Tensor,
                                grad_w: Optional[torch.Tensor], tau: float, per_location: bool,
                                need_dp: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return _route_module().route_soft_backward(x, p, lse, grad_out, grad_w, tau, per_location, need_dp)


@kernel_op("triton_route_linear")
def _triton_route_linear(x: torch.Tensor, p: torch.Tensor, per_location: bool) -> torch.Tensor:
    return _route_module().route_linear(x, p, per_location)


@kernel_op("triton_route_linear_backward")
def _triton_route_linear_backward(x: torch.Tensor, p: torch.Tensor, grad_out: torch.Tensor, per_location: bool,
                                  need_dp: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return _route_module().route_linear_backward(x, p, grad_out, per_location, need_dp)


class _RouteSoftFn(torch.autograd.Function):
    """Triton forward (softmax streamed over prototype tiles; keeps the [B, N] log-normaliser) and
    Triton analytic backward (recomputes the cosines; reads neither the weights nor any [B, N, M])."""

    @staticmethod
    def forward(ctx, x, p, tau, per_location):
        out, w, lse = _triton_route_soft(x, p, tau, per_location)
        ctx.save_for_backward(x, p, lse)
        ctx.tau, ctx.per_location = tau, per_location
        ctx.set_materialize_grads(False)  # an unused weights output costs no [B, N, M] zeros
        return out, w

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, dout, dw):
        if dout is None and dw is None:
            return None, None, None, None
        x, p, lse = ctx.saved_tensors
        if dout is None:  # only the weights were used
            dout = torch.zeros_like(x)
        dx, dp = _triton_route_soft_backward(x, p, lse, dout, dw, ctx.tau, ctx.per_location,
                                             ctx.needs_input_grad[1])
        return dx, (None if dp is None else dp.to(p.dtype)), None, None


class _RouteLinearFn(torch.autograd.Function):
    """Triton forward and analytic backward (``dx = (g Pᵀ) P``, ``dP = Σ (x Pᵀ)ᵀ g + (g Pᵀ)ᵀ x``), both
    streaming over prototype tiles: nothing of size [B, N, M] is built."""

    @staticmethod
    def forward(ctx, x, p, per_location):
        ctx.save_for_backward(x, p)
        ctx.per_location = per_location
        return _triton_route_linear(x, p, per_location)

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, dout):
        x, p = ctx.saved_tensors
        dx, dp = _triton_route_linear_backward(x, p, dout, ctx.per_location, ctx.needs_input_grad[1])
        return dx, (None if dp is None else dp.to(p.dtype)), None


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _check_tensor(op, name, t, dims):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{op}: {name} must be {want}, got shape {tuple(t.shape)}")


def _check_same(op, ref_name, ref, name, t):
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def prototype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str = "relu_cos",
                        scale: Union[None, float, torch.Tensor] = None, impl: str = "auto") -> torch.Tensor:
    """Attention of many queries to a few prototypes.

    Args:
        q: [B, H, N, D] queries.
        k: [B, H, M, D] per-sample or [H, M, D] shared prototype keys.
        v: values, [B, H, M, Dv] or [H, M, Dv] (same sharing as ``k``).
        kind: ``"relu_cos"`` (INP-Former: ``ReLU(scale_h · q̂ k̂ᵀ) v``, no row normalisation; ``scale``
            per head, a tensor of H elements such as [H] or INP-Former's [H, 1, 1] ``learn_scale``,
            or a number; default 1) or ``"softmax"`` (``softmax(scale · q kᵀ) v``; default
            ``D ** -0.5``).
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` (the compiled kernels) or ``"reference"``.

    Returns [B, H, N, Dv] in q's dtype. Differentiable w.r.t. q, k, v and a tensor ``scale``.
    """
    op = "prototype_attention"
    if kind not in ATTN_KINDS:
        raise ValueError(f"{op}: kind must be one of {ATTN_KINDS}, got {kind!r}")
    _check_tensor(op, "q", q, (4,))
    _check_tensor(op, "k", k, (3, 4))
    _check_tensor(op, "v", v, (3, 4))
    _check_same(op, "q", q, "k", k)
    _check_same(op, "q", q, "v", v)
    B, H, _, D = q.shape
    if k.dim() != v.dim():
        raise ValueError(f"{op}: k and v must both be per-sample (4-D) or both shared (3-D), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    lead = (B, H) if k.dim() == 4 else (H,)
    if tuple(k.shape[:-2]) != lead or k.shape[-1] != D:
        raise ValueError(f"{op}: k must be [B, H, M, D] = [{B}, {H}, M, {D}] or [H, M, D], got {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        raise ValueError(f"{op}: v must match k in all but the last dim, got v {tuple(v.shape)}, k {tuple(k.shape)}")
    M, DV = k.shape[-2], v.shape[-1]
    if M == 0:
        raise ValueError(f"{op}: k holds no prototypes (M = 0)")
    scale_t = None
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 and scale.numel() != H:  # not `in (1, H)`: dynamo misjudges it for symbolic sizes
            raise ValueError(f"{op}: scale must have 1 or H={H} elements ([H] or [H, 1, 1]), got {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"{op}: scale must be a floating tensor, got {scale.dtype}")
        if scale.device != q.device:
            raise ValueError(f"{op}: scale is on {scale.device} but q is on {q.device}")
        scale_t = scale
    elif scale is not None and not (isinstance(scale, numbers.Real) and not isinstance(scale, bool)):
        raise TypeError(f"{op}: scale must be None, a number or a tensor, got {type(scale).__name__}")

    def unsupported() -> Optional[str]:
        if M > _MAX_M:
            return f"M={M} prototypes > {_MAX_M} (prototypes are held on chip)"
        if D > _MAX_D or DV > _MAX_D:
            return f"head dim D={D}/Dv={DV} > {_MAX_D}"
        if q.dtype not in _TRITON_DTYPES:
            return f"dtype {q.dtype} (the kernels support float16/bfloat16/float32)"
        return None

    tensors = [q, k, v] + ([scale_t] if scale_t is not None else [])
    chosen = resolve_impl(op, impl, tensors, impls=("triton", "cuda"), has_backward=True, unsupported=unsupported,
                          compiled_op=ATTENTION_OP)
    if chosen == "reference":
        return _ref.prototype_attention(q, k, v, kind=kind, scale=scale)
    default = 1.0 if kind == "relu_cos" else D ** -0.5
    with torch.no_grad():
        s_h = _ref.head_scale(scale_t.detach() if scale_t is not None else scale, H, default, q.device,
                              torch.float32).reshape(H).contiguous()
    with device_guard(q.device):
        return apply(_ProtoAttnFn, _ATTENTION[chosen], q, k, v, scale_t, kind, s_h, _ref.ATTN_NORM_EPS, False)[0]


_MAX_M = 64  # the Triton kernels hold the prototypes on chip; kMaxM of kernels/prototype_attention.h
_MAX_D = 256
_ROUTE_STREAM_MIN_M = 64  # impl="auto" with gradients: below this M the reference is faster


class PrototypeAttention(nn.Module):
    """INP-Former's ``Prototype_Attention`` (decoder attention of tokens to the INPs).

    ``forward(x [B, N, C], prototypes [B, M, C] or [M, C]) -> (out [B, N, C], attn [B, H, N, M])``;
    parameters ``learn_scale`` [H, 1, 1] (ones), ``q`` (C -> C), ``kv`` (C -> 2C), ``proj`` (C -> C)
    with the official names, so INP-Former checkpoints load directly. ``attn`` is recomputed only when
    ``return_attn=True`` (INP-Former returns it; the fused path does not need it), else None.
    ``qk_scale`` is accepted and ignored, as in the official module.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"PrototypeAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.impl = impl
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor, return_attn: bool = False):
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, C // H).transpose(1, 2)
        if prototypes.dim() == 2:
            kv = self.kv(prototypes).reshape(-1, 2, H, C // H).permute(1, 2, 0, 3)  # [2, H, M, d]
        else:
            kv = self.kv(prototypes).reshape(B, -1, 2, H, C // H).permute(2, 0, 3, 1, 4)  # [2, B, H, M, d]
        k, v = kv[0], kv[1]
        attn = None
        if self.training and self.attn_drop.p > 0:
            # dropout on the attention matrix needs it materialised: reference maths, unfused
            qn = torch.nn.functional.normalize(q, dim=-1)
            kn = torch.nn.functional.normalize(k, dim=-1)
            attn = self.attn_drop(torch.relu((qn @ kn.transpose(-2, -1)) * self.learn_scale))
            out = attn @ v
        else:
            out = prototype_attention(q, k, v, kind="relu_cos", scale=self.learn_scale, impl=self.impl)
            if return_attn:
                qn = torch.nn.functional.normalize(q, dim=-1)
                kn = torch.nn.functional.normalize(k, dim=-1)
                attn = torch.relu((qn @ kn.transpose(-2, -1)) * self.learn_scale)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out, attn


def route(x: torch.Tensor, prototypes: torch.Tensor, *, mode: str = "nearest", tau: float = 1.0,
          per_location: Optional[bool] = None, impl: str = "auto"):
    """Route tokens to prototypes.

    Args:
        x: [B, N, C] tokens.
        prototypes: [M, C] shared, [B, M, C] per-sample or [N, M, C] per-location. A 3-D bank whose
            leading dim equals both B and N (> 1) is ambiguous: pass ``per_location``.
        mode: ``"nearest"`` -> ``(min_m (1 - cos) [B, N], argmin [B, N] int64)`` (ties: lowest index;
            a NaN distance counts as the minimum); ``"soft"`` -> ``(softmax(cos / tau) @ P [B, N, C],
            weights [B, N, M])``; ``"linear"`` -> ``(x Pᵀ) P`` [B, N, C].
        tau: softmax temperature (> 0), ``soft`` only.
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` (the compiled kernels: ``nearest``'s own; ``soft`` and
            ``linear`` as the compiled prototype attention of the tokens to the bank, M <= 64) or
            ``"reference"``. Triton covers every mode and bank layout (forward and backward;
            float16/bfloat16/float32). ``"auto"`` takes the streaming Triton path
            on CUDA for inference, and for training only when M >= 64 (where [B, N, M] must not be
            built); with fewer prototypes and gradients it takes the reference, which was measured
            faster for ``nearest`` (bench/RESULTS.md). The same rule applies to ``soft`` and ``linear``,
            whose kernels are not yet measured on a GPU.
    """
    op = "route"
    if mode not in ROUTE_MODES:
        raise ValueError(f"{op}: mode must be one of {ROUTE_MODES}, got {mode!r}")
    if mode == "soft":
        if not isinstance(tau, numbers.Real) or isinstance(tau, bool) or not tau > 0:
            raise ValueError(f"{op}: tau must be a positive number, got {tau!r}")
    _check_tensor(op, "x", x, (3,))
    _check_tensor(op, "prototypes", prototypes, (2, 3))
    _check_same(op, "x", x, "prototypes", prototypes)
    B, N, C = x.shape
    if prototypes.shape[-1] != C:
        raise ValueError(f"{op}: prototypes must have C={C} channels like x, got shape {tuple(prototypes.shape)}")
    M = prototypes.shape[-2]
    if M == 0:
        raise ValueError(f"{op}: prototypes holds no prototypes (M = 0)")
    if prototypes.dim() == 3:
        L = prototypes.shape[0]
        if per_location is None:
            if L == B and L == N and B > 1:
                raise ValueError(f"{op}: prototypes {tuple(prototypes.shape)} is ambiguous (B = N = {B}): pass "
                                 "per_location=True ([N, M, C] bank) or per_location=False ([B, M, C])")
            per_location = L != B
        want = N if per_location else B
        if L != want:
            kind = "per-location [N, M, C]" if per_location else "per-sample [B, M, C]"
            raise ValueError(f"{op}: a {kind} prototype bank needs leading dim {want}, got {tuple(prototypes.shape)}")
    else:
        per_location = False

    def unsupported() -> Optional[str]:
        if x.dtype not in _TRITON_DTYPES:
            return f"dtype {x.dtype} (the kernels support float16/bfloat16/float32)"
        return None

    chosen = resolve_impl(op, impl, [x, prototypes], impls=("triton", "cuda"), has_backward=True,
                          unsupported=unsupported, compiled_op=NEAREST_OP if mode == "nearest" else ATTENTION_OP)
    if chosen == "cuda" and mode != "nearest" and M > _MAX_M:  # the attention kernels hold M <= 64 on chip
        reason = f"mode={mode!r} with M={M} prototypes > {_MAX_M}"
        if impl == "cuda":
            raise RuntimeError(f"{op}: impl='cuda' cannot run these inputs: {reason}; use impl='triton' or 'reference'")
        warn_once(f"{op}:{reason}", f"{op}: {reason} for the compiled kernels; using the reference implementation")
        chosen = "reference"
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or prototypes.requires_grad)
    if impl == "auto" and needs_grad and M < _ROUTE_STREAM_MIN_M:
        # measured on an H100 for nearest (bench/RESULTS.md): with few prototypes the reference's matmul
        # backward beats the streaming path's, and its [B, N, M] matrix is small (soft/linear: unmeasured)
        chosen = "reference"
    if chosen == "reference":
        return _ref.route(x, prototypes, mode=mode, tau=float(tau), per_location=per_location)
    with device_guard(x.device):
        if mode == "nearest":
            return apply(_RouteNearestFn, _NEAREST[chosen], x, prototypes, per_location)
        if chosen == "cuda":
            return _compiled_route(x, prototypes, mode, float(tau), per_location)
        if mode == "soft":
            return apply(_RouteSoftFn, x, prototypes, float(tau), per_location)
        return apply(_RouteLinearFn, x, prototypes, per_location)
