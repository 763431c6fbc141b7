"""Ops benchmark: fastproto's fused ops against the eager reference, ``torch.compile(reference)``
and the original codebases' formulations, at the seed models' real shapes, side by side in one run.

    python bench/ops.py --device cuda [--quick] [--no-compile] [--out bench/RESULTS.md] [--json f.json]
    python bench/ops.py --device cpu  [--out bench/RESULTS.md]     # CPU: reference vs original code

Every row: median time of ``--repeats`` timed runs (each of ``--inner`` back-to-back calls, CUDA
events; warm-up runs, and the compile of ``torch.compile`` rows, excluded), peak memory above the
pre-call level (CUDA allocator / host RSS), and, for the fused rows on CUDA, the **floor**: the bytes
the op must move (inputs read once, outputs written once) divided by the HBM bandwidth measured in
the same run (a device-to-device copy), and the ratio time / floor. For a compute-bound op (a matrix
product) the floor is the larger of that and its FLOPs at the cuBLAS rate measured in the same run (an
8192^3 ``torch.matmul`` in the op's dtype). "fwd+bwd" runs the forward and ``backward`` of a random upstream
gradient, and the floor counts the backward's reads and writes too.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastproto  # noqa: E402
from fastproto import _ext, ops  # noqa: E402
ops_linear_attention = importlib.import_module("fastproto.ops.linear_attention")  # the modules (ops re-exports
ops_prototype = importlib.import_module("fastproto.ops.prototype")  # functions of the same names)
ops_sinkhorn = importlib.import_module("fastproto.ops.sinkhorn")
from fastproto.reference import layer_norm as ref_ln  # noqa: E402
from fastproto.reference import linear_attention as ref_la  # noqa: E402
from fastproto.reference import linear_gelu as ref_lg  # noqa: E402
from fastproto.reference import losses as ref_losses  # noqa: E402
from fastproto.reference import prototype as ref_proto  # noqa: E402
from fastproto.reference import sinkhorn as ref_sk  # noqa: E402
from _measure import measure_stats  # noqa: E402
from metrics import md_table, write_section  # noqa: E402

HEADS, HEAD_DIM, DIM = 12, 64, 768


# ----------------------------------------------------------------------------------------------
# the original codebases' formulations (re-stated), the baselines a user would replace
# ----------------------------------------------------------------------------------------------


def dinomaly_linear_attention(q, k, v):
    """Dinomaly ``LinearAttention2``'s einsum formulation (elu + 1, no eps), in the input dtype."""
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    kv = torch.einsum("...sd,...se->...de", k, v)
    z = 1.0 / torch.einsum("...sd,...d->...s", q, k.sum(dim=-2))
    return torch.einsum("...de,...sd,...s->...se", kv, q, z)


def inp_prototype_attention(q, k, v, scale):
    """INP-Former ``Prototype_Attention``: L2-normalised q, k; ReLU of the scaled cosine; no row norm."""
    attn = torch.relu((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale)
    return attn @ v


def sdpa_prototype_attention(q, k, v, scale):
    """Softmax cross-attention to prototypes with PyTorch's fused SDPA (flash/efficient kernels)."""
    return F.scaled_dot_product_attention(q, k, v, scale=float(scale))


def matmul_route_nearest(x, p):
    """Nearest-prototype routing as the original codebases write it: normalised matmul then min."""
    cos = F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).transpose(-2, -1)
    d, i = (1.0 - cos).min(dim=-1)
    return d, i


def matmul_route_soft(x, p, tau):
    """Soft routing as UIP-AD writes it: normalised matmul, softmax, weighted prototypes."""
    w = torch.softmax(F.normalize(x, dim=-1) @ F.normalize(p, dim=-1).transpose(-2, -1) / tau, dim=-1)
    return w @ p, w


def bmm_route_linear_per_location(x, p):
    """BoRAD's linear routing ``(x Pᵀ) P`` with a per-location bank [N, M, C] as batched matmuls over
    the locations."""
    xl = x.transpose(0, 1)  # [N, B, C]
    return torch.bmm(torch.bmm(xl, p.transpose(1, 2)), p).transpose(0, 1)


def eager_log_sinkhorn(cost, eps, n_iters):
    """A plain log-domain Sinkhorn loop in PyTorch (uniform marginals, fixed iterations)."""
    B, N, K = cost.shape
    c = cost.float()
    log_a = torch.full((B, N), -torch.log(torch.tensor(float(N))).item(), device=c.device)
    log_b = torch.full((B, K), -torch.log(torch.tensor(float(K))).item(), device=c.device)
    f = torch.zeros(B, N, device=c.device)
    g = torch.zeros(B, K, device=c.device)
    for _ in range(n_iters):
        f = eps * log_a - eps * torch.logsumexp((g[:, None, :] - c) / eps, dim=2)
        g = eps * log_b - eps * torch.logsumexp((f[:, :, None] - c) / eps, dim=1)
    log_t = (f[:, :, None] + g[:, None, :] - c) / eps
    plan = log_t.exp()
    return plan, (plan * c).sum((1, 2)) + eps * (plan * log_t).sum((1, 2))


def pot_batch_sinkhorn(cost, eps, n_iters):
    import ot.batch  # POT >= 0.9.6
    res = ot.batch.solve_batch(cost.float(), reg=eps, max_iter=n_iters, tol=0.0, method="log_sinkhorn",
                               grad="detach")
    return res.plan, res.value


# ----------------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------------


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[], Dict[str, torch.Tensor]]          # inputs
    impls: Dict[str, Callable]                           # name -> fn(**inputs) -> tensor or tuple
    grad_inputs: List[str] = field(default_factory=list)  # inputs that get requires_grad in fwd+bwd
    floor_fwd: int = 0                                   # bytes a fused forward must move
    floor_bwd: int = 0                                   # bytes a fused forward + backward must move
    fused: tuple = ("fastproto",)                        # rows that get the floor column
    flops: int = 0                                       # a compute-bound op's FLOPs: floor = max(bytes / bandwidth,
    flops_dtype: Optional[torch.dtype] = None            # flops / the measured cuBLAS matmul rate in this dtype)
    compile_ref: Optional[str] = "reference"            # the row torch.compile is applied to
    bwd: bool = True


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def cases(device, dtype, B, quick) -> List[Case]:
    dev = torch.device(device)
    out: List[Case] = []

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev) * scale).to(dtype)

    # 1. linear attention: Dinomaly / Pro-AD decoder, 789 tokens (784 patches + cls + 4 registers)
    for N in ((789,) if quick else (789, 1024)):
        shp = (B, HEADS, N, HEAD_DIM)
        t = _nbytes(shp, dtype)
        compiled_la = (("fastproto (impl='cuda', compiled)",)
                       if dev.type == "cuda" and _ext.has_op(ops_linear_attention.COMPILED_BACKWARD_OP, "cuda") else ())
        out.append(Case(
            "linear_attention (elu+1)", f"B={B} H={HEADS} N={N} D={HEAD_DIM}",
            lambda shp=shp: {"q": rand(*shp), "k": rand(*shp), "v": rand(*shp)},
            {"fastproto": lambda q, k, v: ops.linear_attention(q, k, v, impl="auto"),
             **{name: lambda q, k, v: ops.linear_attention(q, k, v, impl="cuda") for name in compiled_la},
             "reference": lambda q, k, v: ref_la.linear_attention(q, k, v, phi="elu", eps=1e-6),
             "Dinomaly einsum": dinomaly_linear_attention},
            ["q", "k", "v"], floor_fwd=4 * t, floor_bwd=11 * t, fused=("fastproto", *compiled_la)))

    # 2. prototype attention: INP-Former decoder (relu_cos, 6 INP tokens per image, 789 queries);
    #    DPDiff-AD (softmax, 8 prototypes, 1024 tokens); UIP-AD (softmax, 12 prototypes, 789 tokens)
    compiled_attention = (("fastproto (impl='cuda', compiled)",)
                          if dev.type == "cuda" and _ext.has_op(ops_prototype.ATTENTION_BACKWARD_OP, "cuda") else ())
    for kind, M, N in (("relu_cos", 6, 789), ("softmax", 8, 1024), ("softmax", 12, 789)):
        qs, ks = (B, HEADS, N, HEAD_DIM), (B, HEADS, M, HEAD_DIM)
        t, tk = _nbytes(qs, dtype), _nbytes(ks, dtype)
        scale = 10.0 if kind == "relu_cos" else HEAD_DIM ** -0.5
        impls = {"fastproto": lambda q, k, v, kind=kind, s=scale: ops.prototype_attention(q, k, v, kind=kind, scale=s),
                 "reference": lambda q, k, v, kind=kind, s=scale: ref_proto.prototype_attention(q, k, v, kind=kind,
                                                                                                 scale=s)}
        for name in compiled_attention:
            impls[name] = lambda q, k, v, kind=kind, s=scale: ops.prototype_attention(q, k, v, kind=kind, scale=s,
                                                                                      impl="cuda")
        if kind == "relu_cos":
            impls["INP-Former matmul"] = lambda q, k, v, s=scale: inp_prototype_attention(q, k, v, s)
        else:
            impls["torch SDPA"] = lambda q, k, v, s=scale: sdpa_prototype_attention(q, k, v, s)
        out.append(Case(
            f"prototype_attention ({kind})", f"B={B} H={HEADS} N={N} M={M} D={HEAD_DIM}",
            lambda qs=qs, ks=ks: {"q": rand(*qs), "k": rand(*ks), "v": rand(*ks)},
            impls, ["q", "k", "v"], floor_fwd=2 * t + 2 * tk, floor_bwd=5 * t + 6 * tk,
            fused=("fastproto", *compiled_attention)))

    # 3. nearest routing (coherence loss): per-sample INP tokens (M=6), shared DPDiff local
    #    prototypes (M=8), and a 789-prototype bank (Pro-AD-sized) where [B,N,M] must not be built
    compiled_nearest = ({"fastproto (impl='cuda', compiled)"}
                        if dev.type == "cuda" and _ext.has_op(ops_prototype.NEAREST_OP, "cuda") else set())
    for M, shared in ((6, False), (8, True), (789, True)):
        xs = (B, 789, DIM)
        ps = (M, DIM) if shared else (B, M, DIM)
        fwd = _nbytes(xs, dtype) + _nbytes(ps, dtype) + B * 789 * (4 + 8)
        out.append(Case(
            "route (nearest)", f"B={B} N=789 C={DIM} M={M} {'shared' if shared else 'per-sample'}",
            lambda xs=xs, ps=ps: {"x": rand(*xs), "p": rand(*ps)},
            {"fastproto": lambda x, p: ops.route(x, p, mode="nearest"),
             **{k: lambda x, p: ops.route(x, p, mode="nearest", impl="cuda") for k in compiled_nearest},
             "reference": lambda x, p: ref_proto.route(x, p, mode="nearest"),
             "normalised matmul + min": matmul_route_nearest},
            ["x", "p"], floor_fwd=fwd, floor_bwd=fwd + 2 * _nbytes(xs, dtype) + 2 * _nbytes(ps, dtype),
            fused=("fastproto", *compiled_nearest)))

    # soft routing (UIP-AD's target: per-sample bank of 12, tau 0.1) and linear routing (BoRAD: per-location
    # bank, 64 locations x 7 prototypes x 2048 channels). With gradients and M < 64, impl="auto" takes the
    # reference (the rule measured for nearest), so on CUDA the Triton path is also timed forced.
    forced = {"fastproto (impl='triton')"} if dev.type == "cuda" else set()
    compiled = ({"fastproto (impl='cuda', compiled)"}
                if dev.type == "cuda" and _ext.has_op(ops_prototype.ATTENTION_BACKWARD_OP, "cuda") else set())
    xs, ps = (B, 789, DIM), (B, 12, DIM)
    w_bytes = _nbytes((B, 789, 12), dtype)
    fwd = 2 * _nbytes(xs, dtype) + _nbytes(ps, dtype) + w_bytes + B * 789 * 4
    soft = {"fastproto": lambda x, p: ops.route(x, p, mode="soft", tau=0.1),
            **{k: lambda x, p: ops.route(x, p, mode="soft", tau=0.1, impl="triton") for k in forced},
            **{k: lambda x, p: ops.route(x, p, mode="soft", tau=0.1, impl="cuda") for k in compiled},
            "reference": lambda x, p: ref_proto.route(x, p, mode="soft", tau=0.1),
            "normalised matmul + softmax": lambda x, p: matmul_route_soft(x, p, 0.1)}
    out.append(Case(
        "route (soft)", f"B={B} N=789 C={DIM} M=12 per-sample tau=0.1",
        lambda xs=xs, ps=ps: {"x": rand(*xs), "p": rand(*ps)}, soft,
        ["x", "p"], floor_fwd=fwd, floor_bwd=fwd + 3 * _nbytes(xs, dtype) + 2 * _nbytes(ps, dtype),
        fused=("fastproto", *forced, *compiled)))
    xs, ps = (B, 64, 2048), (64, 7, 2048)
    fwd = 2 * _nbytes(xs, dtype) + _nbytes(ps, dtype)
    linear = {"fastproto": lambda x, p: ops.route(x, p, mode="linear", per_location=True),
              **{k: lambda x, p: ops.route(x, p, mode="linear", per_location=True, impl="triton") for k in forced},
              **{k: lambda x, p: ops.route(x, p, mode="linear", per_location=True, impl="cuda") for k in compiled},
              "reference": lambda x, p: ref_proto.route(x, p, mode="linear", per_location=True),
              "batched matmul over locations": bmm_route_linear_per_location}
    out.append(Case(
        "route (linear)", f"B={B} L=64 C=2048 M=7 per-location",
        lambda xs=xs, ps=ps: {"x": rand(*xs), "p": rand(*ps, scale=2048 ** -0.5)}, linear,
        ["x", "p"], floor_fwd=fwd, floor_bwd=fwd + 3 * _nbytes(xs, dtype) + 2 * _nbytes(ps, dtype),
        fused=("fastproto", *forced, *compiled)))

    # 4. cosine mining loss: two groups of [B, 768, 28, 28] (INP-Former / Pro-AD soft, Dinomaly hard)
    fs = (B, DIM, 28, 28)
    t = _nbytes(fs, dtype)
    for mode in ("soft", "hard"):
        out.append(Case(
            f"cosine_mining_loss ({mode})", f"2 groups × B={B} C={DIM} 28×28",
            lambda: {"e0": rand(*fs), "e1": rand(*fs), "d0": rand(*fs), "d1": rand(*fs)},
            {"fastproto": lambda e0, e1, d0, d1, m=mode: ops.cosine_mining_loss([e0, e1], [d0, d1], mode=m),
             "reference": lambda e0, e1, d0, d1, m=mode: ref_losses.cosine_mining_loss([e0, e1], [d0, d1], mode=m)},
            ["d0", "d1"], floor_fwd=4 * t, floor_bwd=4 * t + 2 * t, compile_ref=None))

    # 5. residual add + LayerScale + LayerNorm, the ViT block glue (DINOv2 blocks; every decoder block without
    #    the scale): a float32 residual stream, a branch and the LayerNorm output in `dtype` (autocast's layout).
    #    The reference is the eager block (mul, add, float32 LayerNorm, cast). fwd+bwd: the gradient of the
    #    LayerNorm output (the first output) only.
    xs = (B, 789, DIM)
    td, tf = _nbytes(xs, dtype), _nbytes(xs, torch.float32)
    out.append(Case(
        "add_layer_norm (LayerScale)", f"B={B} N=789 C={DIM}, float32 stream",
        lambda: {"x": rand(*xs), "r": torch.randn(*xs, device=dev), "g": torch.rand(DIM, device=dev),
                 "w": torch.randn(DIM, device=dev), "b": torch.randn(DIM, device=dev)},
        {"fastproto": lambda x, r, g, w, b: ops.add_layer_norm(x, r, w, b, scale=g, eps=1e-6, out_dtype=dtype),
         "reference": lambda x, r, g, w, b: ref_ln.add_layer_norm(x, r, w, b, scale=g, eps=1e-6, out_dtype=dtype)},
        ["x", "r", "g", "w", "b"], floor_fwd=2 * td + 2 * tf, floor_bwd=(2 * td + 2 * tf) + (3 * td + 2 * tf)))
    # ... and DPDiff-AD's DiT boundary (adaLN-Zero): 1024 tokens + 10 prototype positions, per-sample gate, shift and
    #    scale in `dtype` (the adaLN Linear's output under autocast), affine-free LayerNorm, then modulate
    xs, vs = (B, 1034, DIM), (B, 1, DIM)
    td, tf = _nbytes(xs, dtype), _nbytes(xs, torch.float32)
    out.append(Case(
        "add_layer_norm (adaLN)", f"B={B} N=1034 C={DIM}, per-sample adaLN",
        lambda: {"x": rand(*xs), "r": torch.randn(*xs, device=dev), "g": rand(*vs), "sh": rand(*vs),
                 "ms": rand(*vs, scale=0.1)},
        {"fastproto": lambda x, r, g, sh, ms: ops.add_layer_norm(x, r, None, None, scale=g, eps=1e-6, out_dtype=dtype,
                                                                  modulation=(sh, ms)),
         "reference": lambda x, r, g, sh, ms: ref_ln.add_layer_norm(x, r, None, None, scale=g, eps=1e-6,
                                                                    out_dtype=dtype, modulation=(sh, ms))},
        ["x", "r", "g", "sh", "ms"], floor_fwd=2 * td + 2 * tf, floor_bwd=(2 * td + 2 * tf) + (3 * td + 2 * tf)))

    # 6. Linear + exact GELU, a ViT-B MLP's fc1 (768 -> 3072) over B x 789 tokens: compute-bound (the floor is
    #    the larger of the bytes and the FLOPs at the measured cuBLAS rate). Inference op (forward only).
    rows, hidden = B * 789, 4 * DIM
    out.append(Case(
        "linear_gelu (MLP fc1)", f"B={B} N=789 {DIM}->{hidden}",
        lambda: {"x": rand(B, 789, DIM), "w": rand(hidden, DIM, scale=DIM ** -0.5), "b": rand(hidden)},
        {"fastproto": lambda x, w, b: ops.linear_gelu(x, w, b),
         "reference": lambda x, w, b: ref_lg.linear_gelu(x, w, b)},
        [], floor_fwd=_nbytes((rows, DIM), dtype) + _nbytes((hidden, DIM), dtype) + _nbytes((rows, hidden), dtype),
        flops=2 * rows * DIM * hidden, flops_dtype=dtype, bwd=False))
    return out


def overhead_cases(device) -> List[Case]:
    """Tiny shapes: the time is the per-call host overhead (validation, dispatch, kernel launches)."""
    dev = torch.device(device)
    shp = (1, 1, 16, 64)
    return [Case("call overhead: linear_attention", "B=1 H=1 N=16 D=64",
                 lambda: {"q": torch.randn(*shp, device=dev), "k": torch.randn(*shp, device=dev),
                          "v": torch.randn(*shp, device=dev)},
                 {"fastproto": lambda q, k, v: ops.linear_attention(q, k, v),
                  "reference": lambda q, k, v: ref_la.linear_attention(q, k, v, phi="elu", eps=1e-6)},
                 ["q", "k", "v"], compile_ref=None),
            Case("call overhead: prototype_attention", "B=1 H=1 N=16 M=6 D=64",
                 lambda: {"q": torch.randn(*shp, device=dev), "k": torch.randn(1, 1, 6, 64, device=dev),
                          "v": torch.randn(1, 1, 6, 64, device=dev)},
                 {"fastproto": lambda q, k, v: ops.prototype_attention(q, k, v, kind="relu_cos", scale=1.0),
                  "reference": lambda q, k, v: ref_proto.prototype_attention(q, k, v, kind="relu_cos", scale=1.0)},
                 ["q", "k", "v"], compile_ref=None)]


def overhead_breakdown(device) -> List[str]:
    """Host time per call (µs) of the layers between a user and a kernel, on tiny inputs: a bare Triton
    launch with few and with many scalar arguments, the linear-attention kernel launchers called
    directly, and the public op (validation + dispatch + autograd.Function)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _noop(x_ptr, n):
        pid = tl.program_id(0)
        tl.store(x_ptr + pid, n * 1.0)

    @triton.jit
    def _noop_many(x_ptr, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15,
                   A: tl.constexpr, B: tl.constexpr):
        pid = tl.program_id(0)
        tl.store(x_ptr + pid, (a0 + a15) * 1.0)

    from fastproto.triton import linear_attention as tla
    x = torch.zeros(16, device=device)
    q = torch.randn(1, 1, 16, 64, device=device)
    ints = list(range(1, 17))
    calls = {
        "triton launch, 2 args": lambda: _noop[(1,)](x, 3),
        "triton launch, 18 args + 2 constexpr": lambda: _noop_many[(1,)](x, *ints, A=1, B=2),
        "fastproto.triton.linear_attention.forward (2 launches)": lambda: tla.forward(q, q, q, "elu", 1e-6),
        "fastproto.ops.linear_attention, no_grad": lambda: ops.linear_attention(q, q, q),
        "reference linear_attention, no_grad": lambda: ref_la.linear_attention(q, q, q, phi="elu", eps=1e-6),
    }
    lines = []
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(500):
                fn()
            host = (time.perf_counter() - t0) / 500
            torch.cuda.synchronize()
            lines.append(f"{name}: {host * 1e6:.1f} µs per call (host)")
    return lines


def sinkhorn_cases(device, K_list) -> List[Case]:
    dev = torch.device(device)
    out = []
    for K in K_list:
        shp = (64, 1024, K)
        t = _nbytes(shp, torch.float32)
        impls = {"fastproto": lambda cost: ops.sinkhorn(cost, eps=0.05, n_iters=100, tol=0.0),
                 "reference": lambda cost: ref_sk.sinkhorn(cost, eps=0.05, n_iters=100, tol=0.0),
                 "eager log-domain loop": lambda cost: eager_log_sinkhorn(cost, 0.05, 100)}
        if dev.type == "cuda" and _ext.has_op(ops_sinkhorn.COMPILED_OP, "cuda"):
            impls["fastproto (impl='cuda', compiled)"] = lambda cost: ops.sinkhorn(cost, eps=0.05, n_iters=100,
                                                                                   tol=0.0, impl="cuda")
        elif dev.type == "cpu" and _ext.has_op(ops_sinkhorn.COMPILED_OP, "cpu"):
            # not a public CPU path: the extension's CPU kernel runs the impl='cuda' solver, one thread per problem
            impls["extension CPU kernel (impl='cuda' solver)"] = lambda cost: ops_sinkhorn._compiled_solve(
                cost, *ref_sk.log_marginals(cost, None, None, torch.float32), 0.05, 100, 0.0)
        try:
            import ot.batch  # noqa: F401
            impls["POT ot.batch.solve_batch (log_sinkhorn)"] = lambda cost: pot_batch_sinkhorn(cost, 0.05, 100)
        except ImportError:
            pass
        out.append(Case("sinkhorn (100 it, eps 0.05)", f"64 problems × 1024 × K={K}",
                        lambda shp=shp: {"cost": torch.rand(*shp, device=dev) * 2.0},
                        impls, [], floor_fwd=2 * t, bwd=False,
                        fused=("fastproto", "fastproto (impl='cuda', compiled)")))
    return out


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _runner(fn, inputs, grad_names, backward):
    if not backward:
        def run():
            with torch.no_grad():
                return fn(**inputs)
        return run
    leaves = {k: (v.detach().requires_grad_(k in grad_names)) for k, v in inputs.items()}
    g = {}

    def run():
        for v in leaves.values():
            v.grad = None
        y = _first(fn(**leaves))
        if "g" not in g or g["g"].shape != y.shape:
            g["g"] = torch.randn_like(y)
        y.backward(g["g"])
        return y
    return run


def _time(run, cuda, repeats, inner):
    if cuda:
        def call():
            for _ in range(inner):
                run()
        st = measure_stats(call, repeats=repeats, warmup=2, cuda=True)
        return st["median_s"] / inner, st["peak_bytes"]
    st = measure_stats(run, repeats=repeats, warmup=1, budget_s=20.0)
    return st["median_s"], st["peak_bytes"]


def hbm_bandwidth(device) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (read + write of 1 GiB)."""
    x = torch.empty(2**28, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del x, y
    return 2 * 2**30 / statistics.median(times)


_MATMUL_RATES: Dict[torch.dtype, float] = {}


def matmul_rate(dtype) -> float:
    """Measured cuBLAS rate in FLOP/s of an 8192^3 ``torch.matmul`` in ``dtype`` (default precision flags)."""
    if dtype not in _MATMUL_RATES:
        a = torch.randn(8192, 8192, device="cuda").to(dtype)
        b = torch.randn(8192, 8192, device="cuda").to(dtype)
        st = measure_stats(lambda: torch.matmul(a, b), repeats=10, warmup=3, cuda=True)
        _MATMUL_RATES[dtype] = 2 * 8192 ** 3 / st["median_s"]
        del a, b
    return _MATMUL_RATES[dtype]


def run_case(case: Case, *, device, backward, repeats, inner, compile_ref, bw) -> List[dict]:
    cuda = device == "cuda"
    torch.manual_seed(0)
    inputs = case.make()
    impls = dict(case.impls)
    if compile_ref and case.compile_ref and cuda:
        impls[f"torch.compile({case.compile_ref})"] = torch.compile(case.impls[case.compile_ref], dynamic=False)
    rows = []
    for name, fn in impls.items():
        t_c = None
        try:
            run = _runner(fn, inputs, case.grad_inputs, backward)
            if name.startswith("torch.compile"):
                t0 = time.perf_counter()
                run()
                if cuda:
                    torch.cuda.synchronize()
                t_c = time.perf_counter() - t0
            sec, peak = _time(run, cuda, repeats, inner)
            err = None
        except Exception as e:  # a baseline that cannot run this case is reported, not fatal
            sec, peak, err = None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        floor = (case.floor_bwd if backward else case.floor_fwd) / bw if (bw and name in case.fused) else None
        if floor is not None and case.flops:
            floor = max(floor, case.flops / matmul_rate(case.flops_dtype))
        rows.append({"op": case.op, "shape": case.shape, "pass": "fwd+bwd" if backward else "fwd", "impl": name,
                     "time_s": sec, "peak_bytes": peak, "floor_s": floor, "compile_s": t_c, "error": err})
        if cuda:
            torch.cuda.empty_cache()
    ref = next((r["time_s"] for r in rows if r["impl"] == "reference"), None)
    comp = next((r["time_s"] for r in rows if r["impl"].startswith("torch.compile")), None)
    for r in rows:
        r["vs_reference"] = ref / r["time_s"] if (ref and r["time_s"]) else None
        r["vs_compile"] = comp / r["time_s"] if (comp and r["time_s"]) else None
    return rows


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def _ms(s):
    return "—" if s is None else (f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s")


def _x(v):
    return "" if v is None else f"{v:.2f}×"


def render(env: str, rows: List[dict]) -> str:
    lines = [env, ""]
    header = ["op", "shape", "dtype", "pass", "impl", "time", "× vs ref", "× vs compile", "peak MiB",
              "floor", "time / floor"]
    table = []
    for r in rows:
        tf = (r["time_s"] / r["floor_s"]) if (r["time_s"] and r["floor_s"]) else None
        impl = r["impl"] + (f" (compile {r['compile_s']:.1f} s)" if r.get("compile_s") else "")
        if r["error"]:
            impl += f" — failed: {r['error']}"
        table.append([r["op"], r["shape"], r["dtype"], r["pass"], impl, _ms(r["time_s"]), _x(r["vs_reference"]),
                      _x(r["vs_compile"]),
                      "" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}",
                      "" if r["floor_s"] is None else _ms(r["floor_s"]), "" if tf is None else f"{tf:.2f}"])
    lines.append(md_table(header, table))
    return "\n".join(lines)


def environment(device, bw) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        dev = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    s = (f"Device: {dev}; date {now}. Versions: fastproto {fastproto.__version__}, torch {torch.__version__}, "
         f"triton {tv}, Python {platform.python_version()}.")
    if bw:
        s += f" Measured HBM bandwidth (1 GiB device copy, read + write): {bw / 1e12:.2f} TB/s."
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=None)
    ap.add_argument("--dtype", nargs="+", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) rows")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--only", default=None, help="run only ops whose name contains this string")
    ap.add_argument("--out", default=None, help="write/update a section of this Markdown file")
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after every case)")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="render these earlier --json files (one run split over calls) into --out; run nothing")
    ap.add_argument("--overhead", action="store_true", help="print the host-overhead breakdown (CUDA) and exit")
    ap.add_argument("--section", default=None,
                    help="name of the --out section (default ops-cuda / ops-cpu; use another for a partial run)")
    args = ap.parse_args(argv)
    if args.overhead:
        print("\n".join(overhead_breakdown("cuda")))
        return
    if args.from_json:
        parts = [json.load(open(f)) for f in args.from_json]
        env = parts[0]["env"] + " Commands: " + "; ".join(f"`{p['cmd']}`" for p in parts) + "."
        key = args.section or ("ops-cuda" if "CUDA" in parts[0]["env"] else "ops-cpu")
        title = f"Ops benchmark — {'GPU' if key == 'ops-cuda' else 'CPU'}, {parts[0]['env'].split('date ')[1][:10]}"
        write_section(args.out, key, title, render(env, [r for p in parts for r in p["rows"]]))
        print(f"wrote section '{key}' of {args.out}")
        return
    cuda = args.device == "cuda"
    batches = args.batch or ([16, 64] if cuda else [1])
    dtypes = args.dtype or (["bfloat16", "float32"] if cuda else ["float32"])
    repeats = args.repeats or (5 if args.quick else 10)
    inner = 5 if cuda else 1
    bw = hbm_bandwidth("cuda") if cuda else None
    env = environment(args.device, bw)
    cmd = "python bench/ops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(env, flush=True)
    all_rows = []
    plan = []
    for dt in dtypes:
        for B in batches:
            plan += [(c, dt) for c in cases(args.device, getattr(torch, dt), B, args.quick)]
    plan += [(c, "float32") for c in sinkhorn_cases(args.device, (2, 8) if args.quick else (2, 8, 64))]
    if cuda:
        plan += [(c, "float32") for c in overhead_cases(args.device)]
    for case, dt in plan:
        if args.only and args.only not in case.op:
            continue
        for backward in ((False, True) if case.bwd else (False,)):
            rows = run_case(case, device=args.device, backward=backward, repeats=repeats, inner=inner,
                            compile_ref=not args.no_compile, bw=bw)
            for r in rows:
                r["dtype"] = dt
                print(f"{r['op']:32s} {r['shape']:44s} {dt:9s} {r['pass']:8s} {r['impl'][:40]:40s} "
                      f"{_ms(r['time_s']):>12s} {_x(r['vs_reference']):>8s} {_x(r['vs_compile']):>8s}"
                      + (f"  floor {_ms(r['floor_s'])}" if r["floor_s"] else "")
                      + (f"  ERROR {r['error']}" if r["error"] else ""), flush=True)
            all_rows += rows
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({"env": env, "cmd": cmd, "rows": all_rows}, f, indent=1)
    if args.out:
        key = args.section or ("ops-cuda" if cuda else "ops-cpu")
        title = f"Ops benchmark — {'GPU' if cuda else 'CPU'}, {datetime.date.today()}" + (
            f" ({args.section})" if args.section else "")
        write_section(args.out, key, title, render(env + f" Command: `{cmd}`.", all_rows))
        print(f"wrote section '{key}' of {args.out}")


if __name__ == "__main__":
    main()
