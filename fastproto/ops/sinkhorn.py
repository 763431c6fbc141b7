"""Batched entropic optimal transport (log-domain Sinkhorn; DESIGN "Ops" item 4): functional API, dispatch.

``sinkhorn(cost)`` solves, for each problem of a batch of costs [B, N, K] with marginals ``a`` [B, N]
and ``b`` [B, K] (default uniform), ``min_T <T, C> + eps sum T log T`` over couplings of ``a, b``,
and returns ``(plan, loss)``. ``ot_alignment_loss(x, prototypes)`` is DPDiff-AD's global alignment
loss: the batch mean of that loss for ``C_ik = ||x_i - p_k||^2``.

The maths and the iteration schedule live in :mod:`fastproto.reference.sinkhorn` (plain PyTorch,
ground truth, CPU path); :mod:`fastproto.triton.sinkhorn` holds the Triton kernel and
``kernels/sinkhorn.cu`` the CUDA kernel of the compiled extension (its solver,
``kernels/sinkhorn_solver.h``, is shared with the extension's CPU kernel).

Gradients (both paths): the plan is returned **detached** (no graph through the iterations: it is
not differentiable), and the loss is differentiable with respect to the cost with
``dloss/dcost = plan`` (envelope / Danskin theorem). That is the exact gradient of the optimal
entropic cost **at convergence**; when a problem stops on ``n_iters`` before reaching ``tol`` it is
the gradient with the plan held fixed. Marginals receive no gradient.

Implementations:

* Triton: one launch per batch, one program per problem running all iterations with the
  convergence check (and early exit) on the device; fp32 arithmetic; costs float32/float16/bfloat16
  with K <= 64 (any N). Backward is ``grad_loss * plan`` (elementwise, PyTorch).
* CUDA (``impl="cuda"``, the compiled extension ``torch.ops.fastproto.sinkhorn_solve``): the same
  schedule, one thread block per problem, all iterations in one launch; float32 costs read in place
  (16-bit costs are converted to float32 first and the plan written back); same backward.
  Not yet measured on a GPU, so ``"auto"`` prefers Triton.
* Reference: plain PyTorch, float32/float64 (half/bfloat16 computed in float32); stopped problems
  are frozen on the device, and the loop exits early when all have stopped (checked every 10
  iterations, the only host synchronisations).

``impl="auto"`` takes Triton on CUDA tensors it supports (the CUDA kernel when Triton is not installed)
and the reference otherwise (unsupported inputs on CUDA fall back with a one-time warning).
"""
from __future__ import annotations

import contextlib
import importlib
import numbers
from typing import Optional, Tuple

import torch

from fastproto import _ext
from fastproto.ops._dispatch import apply, device_guard, finite_number, kernel_op, resolve_impl
from fastproto.triton import empty_output

_ref = importlib.import_module("fastproto.reference.sinkhorn")

__all__ = ["sinkhorn", "ot_alignment_loss", "MAX_K"]

MAX_K = 64  # must equal fastproto.triton.sinkhorn.MAX_K and kMaxK of kernels/sinkhorn_solver.h
COMPILED_OP = "sinkhorn_solve"


@kernel_op("triton_sinkhorn")
def _triton_solve(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, eps: float, n_iters: int,
                  tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return importlib.import_module("fastproto.triton.sinkhorn").solve(cost, log_a, log_b, eps, n_iters, tol)


@kernel_op("cuda_sinkhorn")
def _compiled_solve(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, eps: float, n_iters: int,
                    tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.fastproto.sinkhorn_solve`` (the CUDA kernel on CUDA tensors; on CPU tensors the
    extension's CPU kernel, which runs the same solver). Same signature and results as the Triton
    ``solve``: ``(plan [B, N, K] cost dtype, loss [B] float32, iters [B] int32)``."""
    B, N, K = cost.shape
    plan = empty_output((B, N, K), cost.dtype, cost.device)
    loss = empty_output((B,), torch.float32, cost.device)
    iters = empty_output((B,), torch.int32, cost.device)
    _ext.op(COMPILED_OP)(cost, log_a.to(torch.float32).contiguous(), log_b.to(torch.float32).contiguous(),
                         float(eps), int(n_iters), float(tol), plan, loss, iters)
    return plan, loss, iters


_SOLVERS = {"triton": _triton_solve, "cuda": _compiled_solve}


class _SinkhornFn(torch.autograd.Function):
    """Forward by a kernel's ``solve``; backward ``dcost = grad_loss * plan`` (envelope theorem). The
    plan output is non-differentiable."""

    @staticmethod
    def forward(ctx, solve, cost, log_a, log_b, eps, n_iters, tol):
        guard = torch.cuda.device(cost.device) if cost.device.type == "cuda" else contextlib.nullcontext()
        with guard:
            plan, loss, _ = solve(cost.detach(), log_a, log_b, eps, n_iters, tol)
        ctx.save_for_backward(plan)
        ctx.mark_non_differentiable(plan)
        return plan, loss.to(cost.dtype)

    @staticmethod
    def backward(ctx, _grad_plan, grad_loss):
        if grad_loss is None:
            return (None,) * 7
        (plan,) = ctx.saved_tensors
        return None, grad_loss[:, None, None].to(plan.dtype) * plan, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


def _validate(op, cost, eps, n_iters, tol, a, b):
    if not isinstance(cost, torch.Tensor):
        raise TypeError(f"{op}: cost must be a torch.Tensor, got {type(cost).__name__}")
    if cost.dim() != 3:
        raise ValueError(f"{op}: cost must have rank 3 [B, N, K], got shape {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"{op}: cost must have a floating dtype, got {cost.dtype}")
    B, N, K = cost.shape
    if N == 0 or K == 0:
        raise ValueError(f"{op}: cost must have N >= 1 rows and K >= 1 columns, got shape {tuple(cost.shape)}")
    eps = finite_number(op, "eps", eps)
    tol = finite_number(op, "tol", tol, allow_zero=True)
    if isinstance(n_iters, bool) or not isinstance(n_iters, numbers.Integral) or n_iters < 1:
        raise ValueError(f"{op}: n_iters must be an integer >= 1, got {n_iters!r}")
    sums = {}
    for name, m, shape in (("a", a, (B, N)), ("b", b, (B, K))):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(m).__name__}")
        if tuple(m.shape) != shape:
            raise ValueError(f"{op}: marginal {name} must have shape {shape} for cost {tuple(cost.shape)}, "
                             f"got {tuple(m.shape)}")
        if m.dtype != cost.dtype:
            raise TypeError(f"{op}: marginal {name} has dtype {m.dtype} but cost has {cost.dtype}; they must match")
        if m.device != cost.device:
            raise ValueError(f"{op}: marginal {name} is on {m.device} but cost is on {cost.device}")
        if m.numel() and not bool((m > 0).all() & torch.isfinite(m).all()):
            raise ValueError(f"{op}: marginal {name} must be finite and strictly positive")
        sums[name] = m.detach().double().sum(dim=1)
    if sums:
        sa = sums.get("a", torch.ones(B, dtype=torch.float64, device=cost.device))
        sb = sums.get("b", torch.ones(B, dtype=torch.float64, device=cost.device))
        rtol = 1e-2 if cost.dtype in (torch.float16, torch.bfloat16) else 1e-4
        bad = (sa - sb).abs() > rtol * torch.maximum(sa, sb)
        if B and bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{op}: marginals must have equal mass per problem (a uniform / b uniform sum to 1); "
                             f"problem {i}: sum(a) = {float(sa[i]):.6g}, sum(b) = {float(sb[i]):.6g}")
    return eps, int(n_iters), tol


def _unsupported_reason(cost) -> Optional[str]:
    if cost.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {cost.dtype} is not supported by the kernels (float32/float16/bfloat16 only)"
    if cost.shape[2] > MAX_K:
        return f"K={cost.shape[2]} exceeds the kernels' maximum {MAX_K}"
    if cost.shape[0] == 0:
        return "empty batch"
    return None


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def sinkhorn(cost: torch.Tensor, *, eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6,
             a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None,
             impl: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched entropic OT by log-domain Sinkhorn.

    Args:
        cost: [B, N, K] (float16, bfloat16, float32; float64 on the reference only), any strides.
        eps: entropic regularisation (> 0), in the units of the cost.
        n_iters: maximum number of iterations (an f- and a g-update each, >= 1).
        tol: a problem stops at the first iteration whose row-marginal error
            ``max_i |sum_k T_ik - a_i|`` is below ``tol`` (columns are exact after each iteration);
            checked on the device.
        a, b: marginals [B, N] and [B, K] (same dtype and device as the cost, strictly positive,
            equal mass per problem); default uniform ``1/N`` and ``1/K``.
        impl: ``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``.

    Returns ``(plan [B, N, K], loss [B])`` in the cost dtype (computed in float32 for half inputs):
    ``T_ik = exp((f_i + g_k - C_ik)/eps)`` and ``loss = <T, C> + eps sum T log T``. The plan is
    detached (no unrolled graph); ``loss`` is differentiable with ``dloss/dcost = plan`` (envelope
    theorem, exact at convergence). NaN in a problem's cost makes that problem's plan and loss NaN.
    """
    op = "sinkhorn"
    eps, n_iters, tol = _validate(op, cost, eps, n_iters, tol, a, b)
    which = resolve_impl(op, impl, [cost], impls=("triton", "cuda"), has_backward=True,
                         unsupported=lambda: _unsupported_reason(cost), compiled_op=COMPILED_OP)
    if which == "reference":
        return _ref.sinkhorn(cost, eps=eps, n_iters=n_iters, tol=tol, a=a, b=b)
    log_a, log_b = _ref.log_marginals(cost, a, b, torch.float32)
    with device_guard(cost.device):
        return apply(_SinkhornFn, _SOLVERS[which], cost, log_a, log_b, eps, n_iters, tol)


def ot_alignment_loss(x: torch.Tensor, prototypes: torch.Tensor, *, eps: float = 0.05, normalize: bool = False,
                      n_iters: int = 100, tol: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """DPDiff-AD global alignment loss: ``mean_b sinkhorn(C_b).loss`` with ``C_ik = ||x_i - p_k||^2``
    (both L2-normalised over channels first when ``normalize``), uniform marginals.

    Args:
        x: tokens [B, N, C]; prototypes: [K, C] (shared) or [B, K, C]; same floating dtype and device.

    Returns a scalar in ``x``'s dtype. Gradients flow to ``x`` and ``prototypes`` through
    ``dloss/dC = plan`` (envelope theorem) and the differentiable cost.
    """
    op = "ot_alignment_loss"
    for name, t in (("x", x), ("prototypes", prototypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must have a floating dtype, got {t.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{op}: x must have rank 3 [B, N, C], got shape {tuple(x.shape)}")
    if prototypes.dim() not in (2, 3):
        raise ValueError(f"{op}: prototypes must be [K, C] or [B, K, C], got shape {tuple(prototypes.shape)}")
    if prototypes.dtype != x.dtype:
        raise TypeError(f"{op}: prototypes have dtype {prototypes.dtype} but x has {x.dtype}; they must match")
    if prototypes.device != x.device:
        raise ValueError(f"{op}: prototypes are on {prototypes.device} but x is on {x.device}")
    if prototypes.shape[-1] != x.shape[-1]:
        raise ValueError(f"{op}: prototypes have {prototypes.shape[-1]} channels but x has {x.shape[-1]}")
    if prototypes.dim() == 3 and prototypes.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: prototypes have batch {prototypes.shape[0]} but x has {x.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{op}: x has an empty batch; the mean over the batch is undefined")
    cost = _ref.squared_distance_cost(x, prototypes, bool(normalize))
    _, loss = sinkhorn(cost, eps=eps, n_iters=n_iters, tol=tol, impl=impl)
    return loss.mean().to(x.dtype)
