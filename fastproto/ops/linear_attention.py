"""Non-causal linear attention (DESIGN "Ops" item 1): functional API, modules, dispatch.

``linear_attention(q, k, v)`` computes, per batch and head,
``out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)`` with
``phi`` = ``elu + 1`` or ``relu``; queries and keys may differ in number (cross-attention).
The maths lives in :mod:`fastproto.reference.linear_attention` (plain PyTorch, ground truth, CPU
path); :mod:`fastproto.triton.linear_attention` holds the GPU kernels.

Implementations:

* Triton forward: two kernels (fp32 state/key-sum per (batch, head), then query tiles).
* Triton backward: **analytic, in Triton** (two kernels: dq + dS/dz over query tiles, then dk/dv
  over key tiles), from the fp32 state saved by the forward. Not autograd through the reference.
* Reference: plain PyTorch, differentiable by autograd; half/bfloat16 computed in float32.
* CUDA (``impl="cuda"``): the compiled extension's ``linear_attention_forward`` / ``_backward``: the
  products over all tokens of a head (kv state and key sum; in the backward their gradients
  ``dS = sum_i r_i phi(q_i)^T g_i``, ``dz``) by cuBLAS from C++, the per-row work in one kernel per pass
  (one warp per query: outputs, or dq and the query terms; one warp per key: dk, dv). The per-row routines,
  ``kernels/linear_attention_row.h``, are shared with the extension's CPU kernels, which the tests run. Not
  yet measured on a GPU, so ``"auto"`` prefers Triton.

``impl="auto"`` takes Triton on CUDA tensors (float32/float16/bfloat16, head dims <= 128) and the
reference otherwise; unsupported inputs on CUDA fall back with a one-time warning.
"""
from __future__ import annotations

import importlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastproto import _ext
from fastproto.ops._dispatch import apply, device_guard, finite_number, kernel_op, resolve_impl
from fastproto.triton import empty_output

# by full name: package attributes may be shadowed by re-exported functions of the same name
_ref = importlib.import_module("fastproto.reference.linear_attention")

__all__ = ["linear_attention", "linear_attention_with_state", "LinearAttention", "LinearCrossAttention", "PHIS"]

PHIS = _ref.PHIS


def _triton_module():
    # imported lazily: keeps `import fastproto` free of triton and lets TRITON_INTERPRET=1 be set
    # before the kernels are defined
    return importlib.import_module("fastproto.triton.linear_attention")


class _LinearAttentionFn(torch.autograd.Function):
    """Forward and analytic backward by a kernel pair (Triton, or the compiled one); the forward's float32
    state and key sum are saved for the backward. Returns ``(out, state)``; ``state`` (the kv state
    ``sum_j phi(k_j)^T v_j`` in the input dtype, non-differentiable) only when ``want_state``, else None
    (no copy: the plain op does not pay for it)."""

    @staticmethod
    def forward(ctx, kernels, q, k, v, phi, eps, want_state):
        forward, ctx.backward_kernel = kernels
        out, state, ksum = forward(q, k, v, phi, eps)
        ctx.save_for_backward(q, k, v, state, ksum)
        ctx.phi, ctx.eps = phi, eps
        if not want_state:
            return out, None
        state_out = state.to(q.dtype, copy=True)
        ctx.mark_non_differentiable(state_out)
        return out, state_out

    @staticmethod
    @once_differentiable  # the backward kernels are not differentiable themselves
    def backward(ctx, grad_out, _grad_state):
        if grad_out is None:
            return (None,) * 7
        q, k, v, state, ksum = ctx.saved_tensors
        with device_guard(q.device):
            dq, dk, dv = ctx.backward_kernel(q, k, v, state, ksum, grad_out, ctx.phi, ctx.eps)
        return None, dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _validate(q, k, v, phi, eps) -> float:
    op = "linear_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must have rank 4 [B, H, N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}; they must match")
        if t.device != q.device:
            raise ValueError(f"{op}: {name} is on {t.device} but q is on {q.device}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{op}: {name} has batch/heads {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])} "
                f"(shapes q {tuple(q.shape)}, {name} {tuple(t.shape)})")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: k has head dim {k.shape[3]} but q has {q.shape[3]} "
                         f"(shapes q {tuple(q.shape)}, k {tuple(k.shape)})")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: v has {v.shape[2]} tokens but k has {k.shape[2]}; keys and values pair up "
                         f"(shapes k {tuple(k.shape)}, v {tuple(v.shape)})")
    if q.shape[3] == 0 or v.shape[3] == 0:
        raise ValueError(f"{op}: head dims must be positive, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if not isinstance(phi, str) or phi not in PHIS:
        raise ValueError(f"{op}: phi must be one of {PHIS}, got {phi!r}")
    return finite_number(op, "eps", eps, allow_zero=True)


MAX_HEAD_DIM = 128  # must equal fastproto.triton.linear_attention.MAX_HEAD_DIM


def _unsupported_reason(q, v) -> Optional[str]:
    # no triton import here: resolve_impl calls this before it knows triton is usable
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} is not supported by the kernels (float32/float16/bfloat16 only)"
    d, dv = q.shape[-1], v.shape[-1]
    if d > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return f"head dims D={d}, Dv={dv} exceed the Triton kernels' maximum {MAX_HEAD_DIM}"
    return None


COMPILED_OP = "linear_attention_forward"  # behind impl="cuda"
COMPILED_BACKWARD_OP = "linear_attention_backward"


@kernel_op("cuda_linear_attention_forward")
def _compiled_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: str,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastproto.linear_attention_forward`` (CUDA on CUDA tensors, the same routine on the CPU):
    ``(out [B, H, Nq, Dv] in q's dtype, a permuted view of [B, Nq, H, Dv]; state [B, H, D, Dv], ksum [B, H, D])``,
    float32 state and key sum, as the Triton ``forward`` returns them."""
    B, H, N, D = q.shape
    # [B, Nq, H, Dv] storage, as the Triton path: the modules' head merge before `proj` is then a view
    out = empty_output((B, N, H, v.shape[-1]), q.dtype, q.device).permute(0, 2, 1, 3)
    state = empty_output((B, H, D, v.shape[-1]), torch.float32, q.device)
    ksum = empty_output((B, H, D), torch.float32, q.device)
    _ext.op(COMPILED_OP)(q, k, v, PHIS.index(phi), float(eps), out, state, ksum)
    return out, state, ksum


@kernel_op("cuda_linear_attention_backward")
def _compiled_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor,
                       grad_out: torch.Tensor, phi: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastproto.linear_attention_backward``: ``(dq, dk, dv)`` like q, k, v."""
    dq, dk, dv = (empty_output(t.shape, t.dtype, t.device) for t in (q, k, v))
    _ext.op(COMPILED_BACKWARD_OP)(q, k, v, state, ksum, grad_out, PHIS.index(phi), float(eps), dq, dk, dv)
    return dq, dk, dv


@kernel_op("triton_linear_attention_forward")
def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, phi: str,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_module().forward(q, k, v, phi, eps)


@kernel_op("triton_linear_attention_backward")
def _triton_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor, ksum: torch.Tensor,
                     grad_out: torch.Tensor, phi: str, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_module().backward(q, k, v, state, ksum, grad_out, phi, eps)


_KERNELS = {"triton": (_triton_forward, _triton_backward), "cuda": (_compiled_forward, _compiled_backward)}


def _resolve(impl: str, q, k, v) -> str:
    return resolve_impl("linear_attention", impl, [q, k, v], impls=("triton", "cuda"), has_backward=True,
                        unsupported=lambda: _unsupported_reason(q, v), compiled_op=COMPILED_OP)


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def _run(q, k, v, phi, eps, impl, want_state):
    eps = _validate(q, k, v, phi, eps)
    chosen = _resolve(impl, q, k, v)
    if chosen == "reference":
        return _ref.linear_attention_with_state(q, k, v, phi=phi, eps=eps)
    with device_guard(q.device):
        return apply(_LinearAttentionFn, _KERNELS[chosen], q, k, v, phi, eps, want_state)


def linear_attention_with_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: str = "elu",
                                eps: float = 1e-6, impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """As :func:`linear_attention`, also returning the kv state ``sum_j phi(k_j)^T v_j``
    [B, H, D, Dv] in the input dtype (what Dinomaly's ``LinearAttention2`` returns as ``kv``).
    The state is differentiable on the reference path and non-differentiable on the Triton path."""
    return _run(q, k, v, phi, eps, impl, True)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, phi: str = "elu", eps: float = 1e-6,
                     impl: str = "auto") -> torch.Tensor:
    """Non-causal linear attention.

    ``out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)``.

    Args:
        q: [B, H, Nq, D]; k: [B, H, Nk, D]; v: [B, H, Nk, Dv]. Same dtype (float16, bfloat16,
            float32; float64 on the reference only) and device; any strides.
        phi: ``"elu"`` (``elu(x) + 1``, Dinomaly) or ``"relu"``.
        eps: added to the denominator (>= 0). Dinomaly's ``LinearAttention2`` uses none (0).
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` (the compiled kernels) or ``"reference"``.

    Returns [B, H, Nq, Dv] in the input dtype (accumulation in float32). On the Triton and compiled
    paths it is a permuted view of a [B, Nq, H, Dv] buffer. NaN inputs give NaN outputs. Differentiable on every
    path (Triton and compiled: analytic backward kernels).
    """
    return _run(q, k, v, phi, eps, impl, False)[0]


class LinearAttention(nn.Module):
    """Dinomaly's ``LinearAttention2`` (multi-head self linear attention), same parameters and
    numerics: ``qkv = Linear(dim, 3 dim)`` split as ``reshape(B, N, 3, heads, dim/heads)``,
    ``phi = elu + 1``, **no** eps in the denominator (``eps=0.0`` default; Dinomaly has none), no
    scaling (Dinomaly's ``scale``/``qk_scale`` is computed but unused, and so is ``attn_drop``;
    both are accepted here for signature compatibility and ignored), heads merged back as
    ``transpose(1, 2).reshape(B, N, dim)``, then ``proj`` and ``proj_drop``.

    ``forward(x, attn_mask=None)`` returns ``(out, kv)`` like Dinomaly (its ``Block`` unpacks
    ``y, attn = self.attn(...)``): ``out`` [B, N, dim] and the state ``kv`` [B, heads, hd, hd]
    (non-differentiable on the Triton path). ``attn_mask`` is not supported (Dinomaly ignores it in
    this class); passing one raises. state_dict keys: ``qkv.weight, qkv.bias, proj.weight, proj.bias``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_scale=None, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, phi: str = "elu", eps: float = 0.0, impl: str = "auto"):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"LinearAttention: dim={dim} is not divisible by num_heads={num_heads}")
        self.dim, self.num_heads = dim, num_heads
        self.phi, self.eps, self.impl = phi, eps, impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _check_x(self, name: str, x: torch.Tensor):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: {name} must be [B, N, {self.dim}], got {shape}")

    def _finish(self, out: torch.Tensor) -> torch.Tensor:
        B, H, N, hd = out.shape
        out = out.transpose(1, 2).reshape(B, N, H * hd)
        return self.proj_drop(self.proj(out))

    def forward(self, x: torch.Tensor, attn_mask=None):
        if attn_mask is not None:
            raise NotImplementedError("LinearAttention: attn_mask is not supported")
        self._check_x("x", x)
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out, kv = linear_attention_with_state(qkv[0], qkv[1], qkv[2], phi=self.phi, eps=self.eps, impl=self.impl)
        return self._finish(out), kv


class LinearCrossAttention(LinearAttention):
    """Linear cross-attention (Pro-AD's LCA ``A = LCA(P, Q, Q)``): queries from ``x`` [B, Nq, dim],
    keys and values from ``y`` [B, Nk, dim], all through the layer's one packed ``qkv`` Linear
    (rows ``[0, dim)`` give q, ``[dim, 2 dim)`` k, ``[2 dim, 3 dim)`` v, exactly as the self-attention
    split), so ``forward(x, x)`` equals :class:`LinearAttention` ``(x)``. Only the needed rows of
    ``qkv`` are applied to each input. Returns ``(out [B, Nq, dim], kv)``; same defaults
    (``phi="elu"``, ``eps=0.0``) and state_dict keys as :class:`LinearAttention`.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor):  # type: ignore[override]
        self._check_x("x", x)
        self._check_x("y", y)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"LinearCrossAttention: x has batch {x.shape[0]} but y has batch {y.shape[0]}")
        B, Nq, C = x.shape
        Nk = y.shape[1]
        H, hd = self.num_heads, C // self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:C], None if b is None else b[:C]).reshape(B, Nq, H, hd).transpose(1, 2)
        kv_in = F.linear(y, w[C:], None if b is None else b[C:]).reshape(B, Nk, 2, H, hd).permute(2, 0, 3, 1, 4)
        out, kv = linear_attention_with_state(q, kv_in[0], kv_in[1], phi=self.phi, eps=self.eps, impl=self.impl)
        return self._finish(out), kv
