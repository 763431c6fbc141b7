"""Reference (plain PyTorch) batched entropic optimal transport, log-domain Sinkhorn (DESIGN "Ops" item 4).

For a batch of costs ``C`` [B, N, K] and marginals ``a`` [B, N], ``b`` [B, K] (default uniform
``1/N``, ``1/K``), the dual potentials are iterated in the log domain::

    f_i = eps log a_i - eps LSE_k((g_k - C_ik) / eps)
    g_k = eps log b_k - eps LSE_i((f_i - C_ik) / eps)

starting from ``g = 0``. One *iteration* is an f-update followed by a g-update, so after each
iteration the column marginals of the plan are exact (up to rounding) and the convergence error is
the row-marginal error ``err = max_i |sum_k T_ik - a_i|`` of the current plan
``T_ik = exp((f_i + g_k - C_ik) / eps)``. It is computed for free by the next f-update:
``sum_k T_ik = a_i exp((f_i - f_i^new) / eps)``. A problem stops (keeps its current ``f, g``) at
the first iteration whose error is ``< tol``, or after ``n_iters`` iterations. Problems stop
independently; here a stopped problem is frozen with ``torch.where`` (no host synchronisation per
iteration; the loop exits early when every problem has stopped, checked every ``check_every``
iterations). The Triton kernel runs exactly this schedule, per problem.

How :func:`sinkhorn_potentials` computes it (same updates and schedule, different float rounding):
it iterates the scaled potentials ``u = f / eps``, ``v = g / eps`` against the scaled cost
``C / eps`` (no division over [B, N, K] in every update), holds that cost transposed, [B, K, N], so
that both log-sum-exps reduce with the long N axis contiguous (a reduction over a few contiguous K
elements is slow on the CPU), and writes every ``potential - cost`` into one reused buffer (no
[B, N, K] allocation per update). With ``tol = 0`` no problem can stop early (the error is ``>= 0``
or NaN, never ``< 0``), so the error is not computed and every problem runs ``n_iters`` iterations.

Returns ``plan`` T and ``loss = <T, C> + eps sum T log T`` per problem [B]. The plan is computed
without autograd (detached: no unrolled graph through the iterations) and the loss is differentiable
with respect to the cost with ``dloss/dC = T`` (the envelope / Danskin theorem: exact at
convergence, where ``T`` minimises the entropic objective over couplings of ``a`` and ``b``; before
convergence it is the gradient of the loss with the plan held fixed). Marginals get no gradient.

Half/bfloat16 costs are computed in float32 and the results cast back to the input dtype; float32 and
float64 are computed in their own dtype.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from fastproto.reference._precision import outside_autocast


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def log_marginals(cost: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(log a [B, N], log b [B, K])`` in ``dtype`` (uniform when not given)."""
    B, N, K = cost.shape
    if a is None:
        log_a = torch.full((B, N), -math.log(N), dtype=dtype, device=cost.device)
    else:
        log_a = a.detach().to(dtype).log()
    if b is None:
        log_b = torch.full((B, K), -math.log(K), dtype=dtype, device=cost.device)
    else:
        log_b = b.detach().to(dtype).log()
    return log_a, log_b


@torch.no_grad()
def sinkhorn_potentials(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, *, eps: float,
                        n_iters: int, tol: float,
                        check_every: int = 10) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(f [B, N], g [B, K], iters [B] int32)`` for a cost [B, N, K] in its own dtype
    (callers pass float32/float64). ``iters`` counts the g-updates each problem made."""
    B, _, K = cost.shape
    c_t = (cost / eps).transpose(1, 2).contiguous()  # [B, K, N], scaled cost C / eps
    work = torch.empty_like(c_t)  # every update's (potential - cost)

    def u_update(v_):  # f-update / eps: reduce over K
        return log_a - torch.logsumexp(torch.sub(v_[:, :, None], c_t, out=work), dim=1)

    def v_update(u_):  # g-update / eps: reduce over N
        return log_b - torch.logsumexp(torch.sub(u_[:, None, :], c_t, out=work), dim=2)

    u = u_update(torch.zeros(B, K, dtype=cost.dtype, device=cost.device))
    v = v_update(u)
    iters = torch.ones(B, dtype=torch.int32, device=cost.device)
    if tol <= 0:  # no problem can stop early: plain iterations
        for _ in range(1, n_iters):
            u = u_update(v)
            v = v_update(u)
        return eps * u, eps * v, iters.fill_(n_iters)
    active = torch.ones(B, dtype=torch.bool, device=cost.device)
    a = log_a.exp()
    for it in range(1, n_iters):
        u_new = u_update(v)
        # row-marginal error of the current plan (u, v); NaN counts as "not converged"
        err = (a * torch.expm1(u - u_new).abs()).amax(dim=1)
        active = active & ~(err < tol)
        u = torch.where(active[:, None], u_new, u)
        v = torch.where(active[:, None], v_update(u), v)
        iters += active.to(torch.int32)
        if it % check_every == 0 and not bool(active.any()):
            break
    return eps * u, eps * v, iters


def plan_from_potentials(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``T_ik = exp((f_i + g_k - C_ik) / eps)``."""
    return torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps)


@outside_autocast
def sinkhorn(cost: torch.Tensor, *, eps: float = 0.05, n_iters: int = 100, tol: float = 1e-6,
             a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(plan [B, N, K], loss [B])`` in the cost's dtype (see the module docstring).

    No validation here: use :func:`fastproto.ops.sinkhorn`.
    """
    ct = _compute_dtype(cost.dtype)
    c = cost.to(ct)
    log_a, log_b = log_marginals(cost, a, b, ct)
    f, g, _ = sinkhorn_potentials(c.detach(), log_a, log_b, eps=eps, n_iters=n_iters, tol=tol)
    with torch.no_grad():
        log_t = (f[:, :, None] + g[:, None, :] - c) / eps
        plan = log_t.exp()
        ent = eps * (plan * log_t).sum(dim=(1, 2))
    # envelope gradient: plan is a constant, so dloss/dcost = plan
    loss = (plan * c).sum(dim=(1, 2)) + ent
    return plan.to(cost.dtype), loss.to(cost.dtype)


@outside_autocast
def squared_distance_cost(x: torch.Tensor, prototypes: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``C_ik = ||x_i - p_k||^2`` [B, N, K] for ``x`` [B, N, C] and ``prototypes`` [K, C] or [B, K, C]
    (after L2-normalising both over C when ``normalize``), in float32 for half inputs, clamped at 0.
    Differentiable."""
    ct = _compute_dtype(x.dtype)
    x = x.to(ct)
    p = prototypes.to(ct)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
        p = torch.nn.functional.normalize(p, dim=-1)
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
    cross = torch.matmul(x, p.transpose(1, 2))
    cost = (x * x).sum(-1)[:, :, None] + (p * p).sum(-1)[:, None, :] - 2.0 * cross
    return cost.clamp_min(0.0)


@outside_autocast
def ot_alignment_loss(x: torch.Tensor, prototypes: torch.Tensor, *, eps: float = 0.05, normalize: bool = False,
                      n_iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Mean over the batch of the Sinkhorn loss of :func:`squared_distance_cost`, uniform marginals."""
    cost = squared_distance_cost(x, prototypes, normalize)
    _, loss = sinkhorn(cost, eps=eps, n_iters=n_iters, tol=tol)
    return loss.mean().to(x.dtype)
