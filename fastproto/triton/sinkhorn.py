"""Triton kernel for batched log-domain Sinkhorn (DESIGN "Ops" item 4).

Math and iteration schedule: :mod:`fastproto.reference.sinkhorn` (this kernel runs the same schedule
per problem, so the two agree on the number of iterations up to rounding at the ``tol`` boundary).

One launch, grid ``(B,)``: one program per problem runs **all** iterations, with the early exit
(``row-marginal error < tol``) decided on the device inside the kernel. Per iteration:

* row pass (f-update): loops over row blocks [BLOCK_N, BLOCK_K] of the cost; the row LSE over K is
  a register reduction (K <= ``MAX_K`` padded to BLOCK_K with masks); writes the new f to a small
  float32 workspace (two ping-pong buffers per problem, so a converged problem keeps its previous f)
  and returns the row-marginal error of the current plan, ``a_i |exp((f_i - f_i^new)/eps) - 1|``;
* column pass (g-update): loops over row blocks with an online (running max / rescaled sum) LSE over
  N per column, g held in registers.

Then a final pass writes ``T = exp((f + g - C)/eps)`` in the cost dtype and the loss
``sum T C + eps T log T`` (float32). ``tl.debug_barrier()`` separates the passes (the f workspace is
written and read by different threads of the program). N is arbitrary (looped in BLOCK_N blocks; the
workspace is 2 N floats per problem); the cost is read through its strides every pass (for
B=64, N=1024, K=64 fp32 the whole batch is 16 MiB, L2-resident on an H100).

Use :func:`fastproto.ops.sinkhorn` (validation, dispatch); functions here assume validated inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastproto.triton import empty_output

MAX_K = 64

@triton.jit
def _row_pass(c_base, c_sn, c_sk, la_base, f_base, fin_off, fout_off, g, offs_k, mk, N, eps,
              BLOCK_N: tl.constexpr):
    """f-update from g; writes f_new to f_base + fout_off; returns the row-marginal error of the plan
    (f_base + fin_off, g)."""
    errv = tl.zeros((BLOCK_N,), dtype=tl.float32)
    n0 = 0
    while n0 < N:
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        m2 = mn[:, None] & mk[None, :]
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=m2, other=0.0).to(tl.float32)
        x = (g[None, :] - c) / eps
        x = tl.where(mk[None, :], x, float("-inf"))
        mx = tl.max(x, axis=1)
        lse = mx + tl.log(tl.sum(tl.exp(x - mx[:, None]), axis=1))
        la = tl.load(la_base + offs_n, mask=mn, other=0.0)
        fn = eps * la - eps * lse
        fo = tl.load(f_base + fin_off + offs_n, mask=mn, other=0.0)
        e = tl.exp(la) * tl.abs(tl.exp((fo - fn) / eps) - 1.0)
        # NaN counts as "not converged"
        e = tl.where(e < float("inf"), e, float("inf"))
        errv = tl.maximum(errv, tl.where(mn, e, 0.0))
        tl.store(f_base + fout_off + offs_n, fn, mask=mn)
        n0 += BLOCK_N
    return tl.max(errv, axis=0)


@triton.jit
def _col_pass(c_base, c_sn, c_sk, lb, f_base, f_off, offs_k, mk, N, eps,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """g-update from f (f_base + f_off): online LSE over the rows, per column."""
    m = tl.full((BLOCK_K,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_K,), dtype=tl.float32)
    n0 = 0
    while n0 < N:
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        m2 = mn[:, None] & mk[None, :]
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=m2, other=0.0).to(tl.float32)
        f = tl.load(f_base + f_off + offs_n, mask=mn, other=0.0)
        y = (f[:, None] - c) / eps
        y = tl.where(mn[:, None], y, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(y - m_new[None, :]), axis=0)
        m = m_new
        n0 += BLOCK_N
    g = eps * lb - eps * (m + tl.log(s))
    return tl.where(mk, g, 0.0)


@triton.jit
def _sinkhorn_kernel(
    c_ptr, la_ptr, lb_ptr, f_ptr, plan_ptr, loss_ptr, iters_ptr,
    N, K, eps, tol, n_iters,
    c_sb, c_sn, c_sk, p_sb, p_sn, p_sk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    c_base = c_ptr + pid * c_sb
    la_base = la_ptr + pid * N
    f_base = f_ptr + pid * 2 * N
    offs_k = tl.arange(0, BLOCK_K)
    mk = offs_k < K
    lb = tl.load(lb_ptr + pid * K + offs_k, mask=mk, other=0.0)
    g = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # iteration 1 (its error output compares with the uninitialised buffer 1 and is discarded)
    _row_pass(c_base, c_sn, c_sk, la_base, f_base, N, 0, g, offs_k, mk, N, eps, BLOCK_N)
    tl.debug_barrier()
    g = _col_pass(c_base, c_sn, c_sk, lb, f_base, 0, offs_k, mk, N, eps, BLOCK_N, BLOCK_K)
    it = 1
    cur = 0
    # error of the current plan (f in buffer cur, g); f_new goes to the other buffer
    err = _row_pass(c_base, c_sn, c_sk, la_base, f_base, cur * N, (1 - cur) * N, g, offs_k, mk, N, eps, BLOCK_N)
    tl.debug_barrier()
    while (it < n_iters) & (err >= tol):
        cur = 1 - cur  # accept f_new
        g = _col_pass(c_base, c_sn, c_sk, lb, f_base, cur * N, offs_k, mk, N, eps, BLOCK_N, BLOCK_K)
        it += 1
        err = _row_pass(c_base, c_sn, c_sk, la_base, f_base, cur * N, (1 - cur) * N, g, offs_k, mk, N, eps,
                        BLOCK_N)
        tl.debug_barrier()
    # plan and loss from (f in buffer cur, g)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    n0 = 0
    while n0 < N:
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mn = offs_n < N
        m2 = mn[:, None] & mk[None, :]
        c = tl.load(c_base + offs_n[:, None] * c_sn + offs_k[None, :] * c_sk, mask=m2, other=0.0).to(tl.float32)
        f = tl.load(f_base + cur * N + offs_n, mask=mn, other=0.0)
        log_t = (f[:, None] + g[None, :] - c) / eps
        t = tl.exp(log_t)
        tl.store(plan_ptr + pid * p_sb + offs_n[:, None] * p_sn + offs_k[None, :] * p_sk,
                 t.to(plan_ptr.dtype.element_ty), mask=m2)
        acc += tl.sum(tl.where(m2, t * c + eps * (t * log_t), 0.0), axis=0)
        n0 += BLOCK_N
    tl.store(loss_ptr + pid, tl.sum(acc, axis=0))
    tl.store(iters_ptr + pid, it)


def _blocks(K: int):
    block_k = max(16, triton.next_power_of_2(K))
    block_n = max(16, min(256, 4096 // block_k))
    return block_n, block_k


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
    plan = empty_output((B, N, K), cost.dtype, dev)
    loss = empty_output((B,), torch.float32, dev)
    iters = empty_output((B,), torch.int32, dev)
    block_n, block_k = _blocks(K)
    _sinkhorn_kernel[(B,)](
        cost, log_a, log_b, f_ws, plan, loss, iters,
        N, K, float(eps), float(tol), int(n_iters),
        cost.stride(0), cost.stride(1), cost.stride(2), plan.stride(0), plan.stride(1), plan.stride(2),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return plan, loss, iters
