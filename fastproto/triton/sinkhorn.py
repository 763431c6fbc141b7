"""Triton kernel for batched log-domain Sinkhorn (DESIGN "Ops" item 4).

Math and iteration schedule: :mod:`fastproto.reference.sinkhorn` (this kernel runs the same schedule
per problem, so the two agree on the number of iterations up to rounding at the ``tol`` boundary).

One launch, grid ``(B,)``: one program per problem runs **all** iterations, with the early exit
(``row-marginal error < tol``) decided on the device inside the kernel. Each iteration is **one
sweep** over the cost's row blocks [BLOCK_N, BLOCK_K] (K <= ``MAX_K``, BLOCK_K = next power of two):

* f-update: the row LSE over K is a register reduction; the new f goes to a small float32 workspace
  (two ping-pong buffers per problem, so a converged problem keeps its previous f), and the row-marginal
  error of the current plan, ``a_i |exp((f_i - f_i^new)/eps) - 1|``, is reduced on the way;
* with the new f still in registers, the same block feeds the online (running max / rescaled sum)
  column LSE over N of ``(f^new - C)/eps``, giving the g that follows f^new (g, like f, lives in a
  ping-pong workspace of 2 K floats per problem). If the error test stops
  the loop, that g and f^new are dropped and the plan is built from the accepted (f, g), so the
  schedule is exactly the reference's (f-update, error test, g-update) with the cost read once per
  iteration instead of twice.

Then a final pass writes ``T = exp((f + g - C)/eps)`` in the cost dtype and the loss
``sum T C + eps T log T`` (float32). ``tl.debug_barrier()`` separates the sweeps (the f workspace is
written and read by different threads of the program). N is arbitrary (looped in BLOCK_N blocks; the
workspace is 2 N floats per problem); the cost is read through its strides every pass (for
B=64, N=1024, K=64 fp32 the whole batch is 16 MiB, L2-resident on an H100).

Use :func:`fastproto.ops.sinkhorn` (validation, dispatch); functions here assume validated inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastproto.triton import empty_output, next_pow2, shapes_only

MAX_K = 64

@triton.jit
def _col_lse_exact(c_base, c_sn, c_sk, f_ptr, N, inv_eps, offs_k, mk, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """Column LSE over N of ``(f_i - C_ik)/eps`` by an online (running max / rescaled sum) pass."""
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=mn[:, None] & mk[None, :],
                    other=0.0).to(tl.float32)
        f = tl.load(f_ptr + offs_n, mask=mn, other=0.0)
        y = tl.where(mn[:, None], (f[:, None] - c) * inv_eps, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), axis=0)
        m = m_new
    return m + tl.log(s)


@triton.jit
def _sweep(c_base, c_sn, c_sk, la_base, lb, f_base, g_base, cin, N, K, eps, offs_k, mk,
           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One pass over the cost for one Sinkhorn iteration, from the (f, g) in ping-pong buffer ``cin``:
    per row block, the f-update from g (into buffer 1 - cin) and the row-marginal error of the plan
    (f, g), and the block's share of the column sums that give the next g (into buffer 1 - cin).
    Returns the error. Only scalars cross the call: tensors carried through the caller's loop trip a
    Triton layout pass (3.6).

    The column sums reuse the row pass's exponentials: with ``p_ik = exp(x_ik - max_k x_ik)``,
    ``x_ik = (g_k - C_ik)/eps`` and ``r_i = sum_k p_ik``, the new ``f_i/eps = log a_i - max_k x_ik - log r_i``
    gives ``exp((f_i - C_ik)/eps) = p_ik (a_i / r_i) exp(-g_k/eps)``, so the column LSE is
    ``-g_k/eps + log sum_i p_ik a_i / r_i``: one exponential per cost entry instead of two. The sum
    underflows only for a column far below every row's best entry (about 87 eps in cost); then (or on
    NaN) the column LSE is recomputed exactly from the stored new f by an online pass."""
    inv_eps = 1.0 / eps  # multiplications, not per-element divisions, in the inner loop
    fin = f_base + cin * N
    fout = f_base + (1 - cin) * N
    g = tl.load(g_base + cin * K + offs_k, mask=mk, other=0.0)
    errv = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        m2 = mn[:, None] & mk[None, :]
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=m2, other=0.0).to(tl.float32)
        # row LSE over K -> f_new
        x = tl.where(mk[None, :], (g[None, :] - c) * inv_eps, float("-inf"))
        mx = tl.max(x, axis=1)
        p = tl.exp(x - mx[:, None])
        r = tl.sum(p, axis=1)
        la = tl.load(la_base + offs_n, mask=mn, other=0.0)
        fn = eps * la - eps * (mx + tl.log(r))
        fo = tl.load(fin + offs_n, mask=mn, other=0.0)
        e = tl.exp(la) * tl.abs(tl.exp((fo - fn) * inv_eps) - 1.0)
        e = tl.where(e < float("inf"), e, float("inf"))  # NaN counts as "not converged"
        errv = tl.maximum(errv, tl.where(mn, e, 0.0))
        tl.store(fout + offs_n, fn, mask=mn)
        w = tl.where(mn, tl.exp(la) / r, 0.0)
        acc += tl.sum(p * w[:, None], axis=0)
    n_bad = tl.sum(tl.where(mk & ~(acc > 1e-30), 1, 0), axis=0)  # ~(x > t) also catches NaN
    if n_bad > 0:
        tl.debug_barrier()  # the new f was stored by other threads
        col_lse = _col_lse_exact(c_base, c_sn, c_sk, fout, N, inv_eps, offs_k, mk, BLOCK_N, BLOCK_K)
    else:
        col_lse = tl.log(acc) - g * inv_eps
    tl.store(g_base + (1 - cin) * K + offs_k, eps * lb - eps * col_lse, mask=mk)
    return tl.max(errv, axis=0)


@triton.jit
def _sinkhorn_kernel(
    c_ptr, la_ptr, lb_ptr, f_ptr, g_ptr, plan_ptr, loss_ptr, iters_ptr,
    N, K, eps, tol, n_iters,
    c_sb, c_sn, c_sk, p_sb, p_sn, p_sk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c_base = c_ptr + pid * c_sb
    la_base = la_ptr + pid * N
    f_base = f_ptr + pid * 2 * N
    g_base = g_ptr + pid * 2 * K  # buffer 1 starts as zeros: g0 = 0
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    lb = tl.load(lb_ptr + pid * K + offs_k, mask=mk, other=0.0)
    # iteration 1: f1 from g0 into buffer 0 (its error against the uninitialised f buffer 1 is
    # discarded), g1 from f1 into buffer 0
    _sweep(c_base, c_sn, c_sk, la_base, lb, f_base, g_base, 1, N, K, eps, offs_k, mk, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    it = 1
    cur = 0
    # each sweep: error of the current plan (buffer cur), f_new and the g that follows it into the
    # other buffer (used only if the loop goes on)
    err = _sweep(c_base, c_sn, c_sk, la_base, lb, f_base, g_base, cur, N, K, eps, offs_k, mk, BLOCK_N, BLOCK_K)
    tl.debug_barrier()
    while (it < n_iters) & (err >= tol):
        cur = 1 - cur  # accept f_new and its g
        it += 1
        err = _sweep(c_base, c_sn, c_sk, la_base, lb, f_base, g_base, cur, N, K, eps, offs_k, mk, BLOCK_N,
                     BLOCK_K)
        tl.debug_barrier()
    g = tl.load(g_base + cur * K + offs_k, mask=mk, other=0.0)
    # plan and loss from (f in buffer cur, g)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    n0 = 0
    while n0 < N:
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        m2 = mn[:, None] & mk[None, :]
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=m2, other=0.0).to(tl.float32)
        f = tl.load(f_base + cur * N + offs_n, mask=mn, other=0.0)
        log_t = (f[:, None] + g[None, :] - c) * (1.0 / eps)
        t = tl.exp(log_t)
        tl.store(plan_ptr + pid * p_sb + offs_n[:, None] * p_sn + offs_k[None, :] * p_sk,
                 t.to(plan_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(tl.where(m2, t * c + eps * (t * log_t), 0.0), axis=0)
        n0 += BLOCK_N
    tl.store(loss_ptr + pid, tl.sum(acc, axis=0))
    tl.store(iters_ptr + pid, it)


def _blocks(K: int):
    # no tl.dot here, so K needs no padding to 16: tiny K (DPDiff-AD's K = 2) wastes no lanes
    block_k = next_pow2(K)
    block_n = max(16, min(1024, 8192 // block_k))
    num_warps = 16 if block_n * block_k >= 4096 else 8
    return block_n, block_k, num_warps


def solve(cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, eps: float, n_iters: int, tol: float):
    """Return ``(plan [B, N, K] cost dtype, loss [B] float32, iters [B] int32)``.

    ``cost`` [B, N, K] float32/float16/bfloat16 on CUDA (any strides), ``log_a`` [B, N] and ``log_b``
    [B, K] float32; K <= MAX_K; B >= 1.
    """
    B, N, K = cost.shape
    dev = cost.device
    log_a = log_a.to(torch.float32).contiguous()
    log_b = log_b.to(torch.float32).contiguous()
    f_ws = empty_output((B, 2, N), torch.float32, dev)
    g_ws = torch.zeros((B, 2, K), dtype=torch.float32, device=dev)
    plan = empty_output((B, N, K), cost.dtype, dev)
    loss = empty_output((B,), torch.float32, dev)
    iters = empty_output((B,), torch.int32, dev)
    if shapes_only(cost):
        return plan, loss, iters
    block_n, block_k, num_warps = _blocks(K)
    _sinkhorn_kernel[(B,)](
        cost, log_a, log_b, f_ws, g_ws, plan, loss, iters,
        N, K, float(eps), float(tol), int(n_iters),
        cost.stride(0), cost.stride(1), cost.stride(2), plan.stride(0), plan.stride(1), plan.stride(2),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
    )
    return plan, loss, iters
