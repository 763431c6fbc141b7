"""Triton kernel for Linear + exact GELU (:mod:`fastproto.reference.linear_gelu`). Forward only.

``_linear_gelu_kernel``  grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), programs in groups of ``GROUP_M`` row
                         tiles (L2 reuse of the weight tiles): one [BLOCK_M, BLOCK_N] tile of
                         ``x @ weight^T`` accumulated in float32 (:func:`fastproto.triton._dot.mm`: 16-bit
                         operands on tensor cores, ``tf32x3`` for float32), then the epilogue: bias, one
                         rounding to the output dtype (where the eager Linear writes its output), exact
                         GELU in float32, one rounding. The pre-activation never goes to memory: the eager
                         pair writes it and reads it back (for a ViT-B MLP at 64 x 789 tokens, 310 MB each way
                         in bfloat16).

The tile shape is autotuned per (M, N, K) and dtype on the GPU over six Hopper tiles (about a second at the first
call of a shape); with Triton >= 3.4 the timings are kept in Triton's cache directory (``cache_results``: keyed by
the kernel source, the configs and the tuning key), so a new process does not tune a known shape again. The
interpreter runs one small tile. Use
:func:`fastproto.ops.linear_gelu` (validation, dispatch, autocast); the function here assumes validated
2-D inputs of one dtype.
"""
from __future__ import annotations

from typing import Optional

import inspect

import torch
import triton
import triton.language as tl

from fastproto.triton import cdiv, empty_output, interpreter_enabled, shapes_only
from fastproto.triton._dot import dot_config, mm


def _configs():
    if interpreter_enabled():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    # Hopper tiles (wgmma, 3-5 pipeline stages; checked by tests/test_triton_compile.py). 64 accumulators per
    # thread keep the GELU epilogue in registers (157-160 registers, no spills, sm_90 ptxas); 128 per thread
    # (128x256 on 8 warps) spills 32 B in the epilogue but has the most efficient main loop: the tuner decides
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 3),
                                     (128, 128, 32, 8, 5), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4))]


#: Triton >= 3.4 can keep the autotuning timings on disk; older versions tune once per process
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


@triton.autotune(configs=_configs(), key=["M", "N", "K"], **AUTOTUNE_CACHE)
@triton.jit
def _linear_gelu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, sxm, sxk, swn, swk,
    HAS_BIAS: tl.constexpr, DOT_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mm_ = rm < M
    mn = rn < N
    x_tile = x_ptr + rm.to(tl.int64)[:, None] * sxm + rk[None, :] * sxk
    w_tile = w_ptr + rn.to(tl.int64)[None, :] * swn + rk[:, None] * swk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mk = rk < K - k0
        a = tl.load(x_tile, mask=mm_[:, None] & mk[None, :], other=0.0)
        b = tl.load(w_tile, mask=mk[:, None] & mn[None, :], other=0.0)
        acc += mm(a, b, DOT_DT, PREC)
        x_tile += BLOCK_K * sxk
        w_tile += BLOCK_K * swk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=mn, other=0.0).to(tl.float32)[None, :]
    z = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # the eager Linear's output, as GELU reads it
    y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mm_[:, None] & mn[None, :])


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(x @ weight^T + bias)`` for ``x`` [M, K], ``weight`` [N, K], ``bias`` [N] or None, one dtype."""
    m, k = x.shape
    n = weight.shape[0]
    y = empty_output((m, n), x.dtype, x.device)
    if shapes_only(x):
        return y
    dot_dt, prec = dot_config(x.dtype)
    _linear_gelu_kernel[lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)](
        x, weight, bias if bias is not None else x, y,
        m, n, k, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, DOT_DT=dot_dt, PREC=prec,
    )
    return y
