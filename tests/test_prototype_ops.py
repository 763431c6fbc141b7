"""Prototype attention and prototype routing (DESIGN "Ops" items 2, 3).

- the reference vs independent float64 NumPy re-statements (fresh seeds, M in {1, 6, 64}, N not a
  multiple of the Triton block, shared / per-sample / per-location banks, strided inputs, fp32,
  bf16, fp16);
- ``gradcheck`` of the references in float64;
- Triton forward + analytic backward vs the reference under the Triton interpreter, in a subprocess
  with TRITON_INTERPRET=1 set before triton is imported (this file is the subprocess script) and
  every output the Triton path allocates poisoned with NaN;
- every ``route`` mode x bank layout (shared, per-sample, per-location) x dtype through the Triton
  kernels under the interpreter, values and gradients of x and the bank vs the float64 reference
  (M = 1, several prototype tiles, sizes off the blocks, strided inputs, NaN tokens);
- ``PrototypeAttention`` vs a re-statement of INP-Former's ``Prototype_Attention`` (same weights,
  same state_dict keys);
- the compiled ``route_nearest`` (per-token math shared by the extension's CUDA and CPU kernels) through its
  CPU kernel vs the float64 re-statement and the reference: every bank layout, dtypes, strided inputs,
  M = 1, ties, NaN, poisoned outputs, gradients through the autograd Function, argument errors;
- the compiled prototype attention forward and backward (per-query routines shared likewise) through the CPU
  kernels vs float64 (values, and gradients of q, k, v and the per-head scale), NaN, zero vectors, errors;
- GPU tests at real shapes (``@pytest.mark.gpu``; skipped without CUDA).
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import _interpreter
from tests._tensors import rel_err
from tests._op_errors import expect_errors
from fastproto import _ext
from fastproto import triton as _triton_pkg  # noqa: E402  (POISON_OUTPUTS switch)
from fastproto.ops.prototype import PrototypeAttention, prototype_attention, route

ops_proto = importlib.import_module("fastproto.ops.prototype")

_ref = importlib.import_module("fastproto.reference.prototype")


def _new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


@pytest.fixture
def seed(rng):
    return int(rng.integers(0, 2**31 - 1))


# ----------------------------------------------------------------------------------------------
# float64 NumPy re-statements (independent of the package)
# ----------------------------------------------------------------------------------------------


def np_attention(q, k, v, kind, scale):
    """q [B,H,N,D]; k, v [B,H,M,*] or [H,M,*]; scale [H] (relu_cos) or float (softmax)."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    if k.ndim == 3:
        k, v = k[None], v[None]
    if kind == "relu_cos":
        qn = q / np.maximum(np.sqrt((q * q).sum(-1, keepdims=True)), 1e-12)
        kn = k / np.maximum(np.sqrt((k * k).sum(-1, keepdims=True)), 1e-12)
        a = np.maximum(np.einsum("bhnd,bhmd->bhnm", qn, kn) * np.asarray(scale, np.float64).reshape(1, -1, 1, 1), 0)
    else:
        z = np.einsum("bhnd,bhmd->bhnm", q, k) * scale
        z = np.exp(z - z.max(-1, keepdims=True))
        a = z / z.sum(-1, keepdims=True)
    return np.einsum("bhnm,bhme->bhne", a, np.broadcast_to(v, (q.shape[0],) + v.shape[1:]))


def np_route(x, p, mode, tau=1.0, per_location=False):
    x, p = np.asarray(x, np.float64), np.asarray(p, np.float64)
    B, N, C = x.shape
    if p.ndim == 2:
        pb = np.broadcast_to(p[None, None], (B, N) + p.shape)
    elif per_location:
        pb = np.broadcast_to(p[None], (B,) + p.shape)
    else:
        pb = np.broadcast_to(p[:, None], (B, N) + p.shape[1:])
    dots = np.einsum("bnc,bnmc->bnm", x, pb)
    if mode == "linear":
        return np.einsum("bnm,bnmc->bnc", dots, pb)
    xn = np.maximum(np.sqrt((x * x).sum(-1)), 1e-8)
    pn = np.maximum(np.sqrt((pb * pb).sum(-1)), 1e-8)
    cos = dots / xn[..., None] / pn
    if mode == "nearest":
        d = 1 - cos
        idx = np.argmin(d, axis=-1)  # numpy: first occurrence
        return np.take_along_axis(d, idx[..., None], -1)[..., 0], idx
    w = np.exp(cos / tau - (cos / tau).max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bnm,bnmc->bnc", w, pb), w


def _t(gen, shape, dtype=torch.float32, strided=False):
    """Random tensor; ``strided``: a non-contiguous view (last dim stride 2 inside a transposed buffer)."""
    if not strided:
        return torch.randn(*shape, generator=gen).to(dtype)
    big = torch.randn(*shape[:-2], shape[-1] * 2, shape[-2], generator=gen).to(dtype)
    out = big.transpose(-1, -2)[..., ::2]
    assert tuple(out.shape) == tuple(shape) and not out.is_contiguous()
    return out


def _argmin_ok(idx, x, p, per_location=False, tol=1e-5):
    """``idx`` picks a prototype whose float64 distance is within ``tol`` of the minimum (equal to the
    float64 argmin except on near-ties that float32 rounding may flip)."""
    x, p = torch.as_tensor(np.asarray(x, np.float64)), torch.as_tensor(np.asarray(p, np.float64))
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    if p.dim() == 2:
        d = 1 - xn @ pn.T
    elif per_location:
        d = 1 - torch.einsum("bnc,nmc->bnm", xn, pn)
    else:
        d = 1 - xn @ pn.transpose(1, 2)
    idx = torch.as_tensor(np.asarray(idx)).long()
    picked = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    exact = (idx == d.argmin(-1)).double().mean()
    return bool((picked - d.amin(-1) <= tol).all() and exact >= 0.9)



TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


# ----------------------------------------------------------------------------------------------
# reference vs float64 re-statements
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("M", [1, 6, 64])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_reference_matches_float64(kind, M, shared, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D, DV = 2, 3, 37, 16, 8
    q = _t(gen, (B, H, N, D), dtype, strided=True)
    ks = (H, M) if shared else (B, H, M)
    k = _t(gen, ks + (D,), dtype, strided=M > 1)
    v = _t(gen, ks + (DV,), dtype)
    if kind == "relu_cos":
        scale = torch.rand(H, 1, 1, generator=gen) * 4 + 0.25
        want = np_attention(q.double(), k.double(), v.double(), kind, scale.reshape(-1).numpy())
    else:
        scale = None
        want = np_attention(q.double(), k.double(), v.double(), kind, D ** -0.5)
    got = prototype_attention(q, k, v, kind=kind, scale=scale, impl="reference")
    assert got.dtype == dtype and tuple(got.shape) == (B, H, N, DV)
    assert rel_err(got, want, floor=1.0) <= TOL[dtype], f"seed={seed}"
    # auto on CPU is the reference
    assert torch.equal(prototype_attention(q, k, v, kind=kind, scale=scale), got)


def test_attention_scale_forms(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _t(gen, (1, 4, 5, 8)), _t(gen, (4, 3, 8)), _t(gen, (4, 3, 8))
    s = torch.rand(4, generator=gen) + 0.5
    a = prototype_attention(q, k, v, scale=s)
    assert torch.equal(a, prototype_attention(q, k, v, scale=s.reshape(4, 1, 1)))
    assert torch.allclose(prototype_attention(q, k, v, scale=2.0), prototype_attention(q, k, v, scale=torch.full((4,), 2.0)))
    want = np_attention(q, k, v, "softmax", 0.3)
    assert rel_err(prototype_attention(q, k, v, kind="softmax", scale=0.3), want, floor=1.0) <= 1e-5


@pytest.mark.parametrize("bank", ["shared", "batch", "location"])
@pytest.mark.parametrize("M", [1, 6, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_route_reference_matches_float64(bank, M, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, C = 2, 37, 24
    x = _t(gen, (B, N, C), dtype, strided=True)
    pshape = {"shared": (M, C), "batch": (B, M, C), "location": (N, M, C)}[bank]
    p = _t(gen, pshape, dtype, strided=M > 1)
    loc = bank == "location"
    xd, pd = x.double().numpy(), p.double().numpy()
    tol = TOL[dtype]
    d, idx = route(x, p, mode="nearest")
    wd, _ = np_route(xd, pd, "nearest", per_location=loc)
    assert d.dtype == dtype and idx.dtype == torch.int64
    assert rel_err(d, wd, floor=1.0) <= tol, f"seed={seed}"
    if dtype == torch.float32:
        assert _argmin_ok(idx, xd, pd, loc), f"seed={seed}"
    for tau in (0.07, 1.0):
        out, w = route(x, p, mode="soft", tau=tau)
        wo, ww = np_route(xd, pd, "soft", tau=tau, per_location=loc)
        assert rel_err(out, wo, floor=1.0) <= tol and rel_err(w, ww, floor=1.0) <= tol, f"tau={tau} seed={seed}"
    lin = route(x, p, mode="linear")
    assert rel_err(lin, np_route(xd, pd, "linear", per_location=loc), floor=1.0) <= tol, f"seed={seed}"


def test_route_ambiguous_bank_needs_flag(seed):
    gen = torch.Generator().manual_seed(seed)
    x, p = _t(gen, (3, 3, 8)), _t(gen, (3, 5, 8))
    with pytest.raises(ValueError, match="ambiguous"):
        route(x, p)
    a = route(x, p, per_location=True, mode="linear")
    b = route(x, p, per_location=False, mode="linear")
    assert rel_err(a, np_route(x, p, "linear", per_location=True), floor=1.0) <= 1e-5
    assert rel_err(b, np_route(x, p, "linear", per_location=False), floor=1.0) <= 1e-5


def test_route_nearest_ties_lowest_index_and_nan():
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [float("nan"), 1.0], [1.0, 1.0]]])
    p = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    d, idx = route(x, p)
    assert idx.tolist() == [[1, 0, 0, 4]]  # duplicates (up to scale): lowest index wins
    assert torch.isnan(d[0, 2]) and torch.isfinite(d[0, [0, 1, 3]]).all()
    # a NaN prototype: NaN counts as the minimum, at its first index
    p2 = p.clone()
    p2[3, 0] = float("nan")
    d2, idx2 = route(x[:, :2], p2)
    assert idx2.tolist() == [[3, 3]] and torch.isnan(d2).all()


def test_nan_propagates_attention(seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _t(gen, (1, 2, 5, 4)), _t(gen, (1, 2, 3, 4)), _t(gen, (1, 2, 3, 4))
    q[0, 0, 1, 2] = float("nan")
    for kind in ("relu_cos", "softmax"):
        out = prototype_attention(q, k, v, kind=kind)
        assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 1]).all()


def test_zero_vectors_are_finite():
    q = torch.zeros(1, 1, 2, 4)
    k = torch.zeros(1, 3, 4)
    assert torch.equal(prototype_attention(q, k, torch.ones(1, 3, 4)), torch.zeros(1, 1, 2, 4))
    d, idx = route(torch.zeros(1, 2, 4), torch.randn(3, 4))
    assert torch.equal(d, torch.ones(1, 2)) and idx.tolist() == [[0, 0]]


# ----------------------------------------------------------------------------------------------
# gradients of the references (float64)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("shared", [False, True])
def test_attention_reference_gradcheck(kind, shared, seed):
    gen = torch.Generator().manual_seed(seed)
    q = _t(gen, (2, 2, 5, 3), torch.float64).requires_grad_()
    ks = (2, 4) if shared else (2, 2, 4)
    k = _t(gen, ks + (3,), torch.float64).requires_grad_()
    v = _t(gen, ks + (2,), torch.float64).requires_grad_()
    s = (torch.rand(2, 1, 1, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    if kind == "relu_cos":
        fn = lambda q, k, v, s: _ref.prototype_attention(q, k, v, kind=kind, scale=s)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v, s)), f"seed={seed}"
    else:
        fn = lambda q, k, v: _ref.prototype_attention(q, k, v, kind=kind)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v)), f"seed={seed}"


@pytest.mark.parametrize("mode", ["nearest", "soft", "linear"])
@pytest.mark.parametrize("bank", ["shared", "batch", "location"])
def test_route_reference_gradcheck(mode, bank, seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, M, C = 2, 3, 4, 5
    x = _t(gen, (B, N, C), torch.float64).requires_grad_()
    p = _t(gen, {"shared": (M, C), "batch": (B, M, C), "location": (N, M, C)}[bank], torch.float64).requires_grad_()
    loc = bank == "location"

    def fn(x, p):
        r = _ref.route(x, p, mode=mode, tau=0.5, per_location=loc)
        return r[0] if isinstance(r, tuple) else r

    assert torch.autograd.gradcheck(fn, (x, p)), f"seed={seed}"


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, exc, match", [
    (lambda: prototype_attention(torch.randn(2, 3, 4), torch.randn(3, 2, 4), torch.randn(3, 2, 4)), ValueError, "q must be 4-D"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)), ValueError, "k must be"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 5, 8)), ValueError, "v must match k"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8).half(), torch.randn(3, 2, 8)), TypeError, "k has dtype"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), kind="cos"), ValueError, "kind"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), scale=torch.ones(2)), ValueError, "scale"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), impl="fast"), ValueError, "impl"),
    (lambda: prototype_attention(torch.randn(1, 3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8), impl="triton"), RuntimeError, "CUDA|triton"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 7)), ValueError, "prototypes must have C=8"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 3, 8)), ValueError, "prototype bank needs leading dim"),
    (lambda: route(torch.randn(4, 8), torch.randn(3, 8)), ValueError, "x must be 3-D"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 8), mode="hard"), ValueError, "mode"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 8), mode="soft", tau=0.0), ValueError, "tau"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 8).double()), TypeError, "prototypes has dtype"),
    (lambda: route(torch.randn(2, 4, 8).long(), torch.randn(3, 8)), TypeError, "x must be float"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(3, 8), mode="soft", impl="triton"), RuntimeError, "CUDA|triton"),
    (lambda: route(torch.randn(2, 4, 8), torch.randn(4, 3, 8), mode="linear", per_location=True, impl="triton"),
     RuntimeError, "CUDA|triton"),
])
def test_errors(call, exc, match):
    if match == "CUDA|triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter mode")
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# INP-Former module parity
# ----------------------------------------------------------------------------------------------


class _OfficialPrototypeAttention(torch.nn.Module):
    """Re-statement of INP-Former's ``Prototype_Attention`` (eval mode, no dropout)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.learn_scale = torch.nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = torch.nn.Linear(dim, dim, bias=False)
        self.kv = torch.nn.Linear(dim, dim * 2, bias=False)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, protos):
        B, N, C = x.shape
        H, M = self.num_heads, protos.shape[1]
        q = self.q(x).view(B, N, H, C // H).permute(0, 2, 1, 3)
        kv = self.kv(protos).view(B, M, 2, H, C // H)
        k, v = kv[:, :, 0].permute(0, 2, 1, 3), kv[:, :, 1].permute(0, 2, 1, 3)
        a = F.relu(F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1) * self.learn_scale)
        return self.proj((a @ v).permute(0, 2, 1, 3).reshape(B, N, C)), a


def test_prototype_attention_module_matches_inp_former(seed):
    torch.manual_seed(seed)
    C, H = 48, 4
    off = _OfficialPrototypeAttention(C, H).double()
    with torch.no_grad():
        off.learn_scale.uniform_(0.5, 3.0)
    mod = PrototypeAttention(C, num_heads=H).double()
    assert list(mod.state_dict().keys()) == list(off.state_dict().keys())
    assert all(mod.state_dict()[n].shape == t.shape for n, t in off.state_dict().items())
    mod.load_state_dict(off.state_dict())
    x = torch.randn(2, 29, C, dtype=torch.float64, requires_grad=True)
    pr = torch.randn(2, 6, C, dtype=torch.float64, requires_grad=True)
    want, want_a = off(x, pr)
    got, got_a = mod(x, pr, return_attn=True)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12) and torch.allclose(got_a, want_a)
    g = torch.randn_like(want)
    gw = torch.autograd.grad(want, [x, pr, off.learn_scale, off.kv.weight], g)
    gg = torch.autograd.grad(got, [x, pr, mod.learn_scale, mod.kv.weight], g)
    for a, b in zip(gg, gw):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11), f"seed={seed}"
    # shared [M, C] prototypes == the same prototypes repeated over the batch
    shared = pr[0].detach()
    assert torch.allclose(mod(x, shared)[0], mod(x, shared.expand(2, -1, -1))[0], atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Triton (interpreter, subprocess) vs reference
# ----------------------------------------------------------------------------------------------

ATTN_CASES = [  # (kind, B, H, N, M, D, Dv, shared, dtype, strided)
    ("relu_cos", 2, 2, 37, 1, 16, 16, False, "float32", False),
    ("relu_cos", 1, 3, 70, 6, 8, 12, True, "float32", True),
    ("relu_cos", 1, 2, 20, 64, 16, 8, False, "bfloat16", True),
    ("relu_cos", 2, 1, 9, 17, 5, 3, True, "float16", False),
    ("softmax", 2, 2, 37, 6, 16, 8, False, "float32", True),
    ("softmax", 1, 2, 65, 64, 8, 8, True, "float32", False),
    ("softmax", 1, 1, 10, 1, 4, 4, False, "bfloat16", False),
]
ROUTE_CASES = [  # (B, N, M, C, bank, dtype, strided)
    (2, 37, 1, 16, "shared", "float32", False),
    (2, 37, 6, 24, "batch", "float32", True),
    (1, 50, 150, 70, "shared", "float32", True),  # several prototype and channel blocks
    (2, 33, 9, 16, "batch", "bfloat16", False),
]
ROUTE_MODE_CASES = [  # (mode, B, N, M, C, bank, dtype, strided); M > 64 spans several prototype tiles
    ("soft", 2, 37, 1, 16, "shared", "float32", False),
    ("soft", 2, 33, 12, 24, "batch", "float32", True),  # UIP-AD: per-sample bank of 12
    ("soft", 3, 7, 5, 40, "location", "bfloat16", True),
    ("soft", 1, 21, 70, 19, "shared", "float16", True),
    ("soft", 2, 9, 67, 33, "location", "float32", True),
    ("soft", 2, 17, 3, 20, "batch", "bfloat16", False),
    ("linear", 2, 37, 1, 16, "batch", "float32", False),
    ("linear", 5, 8, 7, 72, "location", "float32", True),  # BoRAD: per-location bank of 7
    ("linear", 2, 30, 9, 24, "shared", "bfloat16", True),
    ("linear", 1, 40, 66, 20, "batch", "float32", True),
    ("linear", 3, 6, 70, 17, "location", "float16", False),
    ("linear", 2, 15, 1, 33, "shared", "float16", True),
    ("nearest", 3, 11, 9, 24, "location", "float32", True),
    ("nearest", 2, 9, 70, 20, "location", "bfloat16", False),
]


def _interpreter_main(seed: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tm = importlib.import_module("fastproto.triton.prototype")
    tr = importlib.import_module("fastproto.triton.route")
    _triton_pkg.POISON_OUTPUTS = True
    from triton.runtime.interpreter import InterpretedFunction

    kernels = (tm._proto_attn_fwd_kernel, tm._proto_attn_bwd_kernel, tr._route_nearest_kernel,
               tr._route_soft_fwd_kernel, tr._route_soft_bwd_kernel, tr._route_linear_kernel)
    res = {"_interpreted": all(isinstance(k, InterpretedFunction) for k in kernels)}
    for i, (kind, B, H, N, M, D, DV, shared, dt, strided) in enumerate(ATTN_CASES):
        name = f"attn{i}"
        try:
            gen = torch.Generator().manual_seed(seed + i)
            dtype = getattr(torch, dt)
            q = _t(gen, (B, H, N, D), dtype, strided).requires_grad_()
            ks = (H, M) if shared else (B, H, M)
            k = _t(gen, ks + (D,), dtype, strided and M > 1).requires_grad_()
            v = _t(gen, ks + (DV,), dtype).requires_grad_()
            s = (torch.rand(H, 1, 1, generator=gen) * 3 + 0.2).requires_grad_() if kind == "relu_cos" else None
            ins = [q, k, v] + ([s] if s is not None else [])
            got = prototype_attention(q, k, v, kind=kind, scale=s, impl="triton")
            want = prototype_attention(q, k, v, kind=kind, scale=s, impl="reference")
            g = torch.randn(got.shape, generator=gen).to(dtype)
            gg = torch.autograd.grad(got, ins, g)
            gw = torch.autograd.grad(want, ins, g)
            res[name] = {"dtype_ok": got.dtype == dtype, "finite": bool(torch.isfinite(got).all()),
                         "err": rel_err(got, want, floor=1.0),
                         "gerr": max(rel_err(a, b, floor=1.0) for a, b in zip(gg, gw)), "dt": dt}
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
    for i, (B, N, M, C, bank, dt, strided) in enumerate(ROUTE_CASES):
        name = f"route{i}"
        try:
            gen = torch.Generator().manual_seed(seed + 100 + i)
            dtype = getattr(torch, dt)
            x = _t(gen, (B, N, C), dtype, strided).requires_grad_()
            p = _t(gen, (M, C) if bank == "shared" else (B, M, C), dtype, strided and M > 1).requires_grad_()
            d, idx = route(x, p, impl="triton")
            dr, _ = route(x, p, impl="reference")
            g = torch.randn(d.shape, generator=gen).to(dtype)
            gg = torch.autograd.grad(d, [x, p], g)
            gw = torch.autograd.grad(dr, [x, p], g)
            res[name] = {"dtype_ok": d.dtype == dtype and idx.dtype == torch.int64,
                         "finite": bool(torch.isfinite(d).all()), "err": rel_err(d, dr, floor=1.0),
                         "idx_ok": _argmin_ok(idx, x.detach().double(), p.detach().double()) if dt == "float32" else True,
                         "gerr": max(rel_err(a, b, floor=1.0) for a, b in zip(gg, gw)), "dt": dt}
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # ties and NaN through the streaming argmin (duplicates across prototype blocks)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [float("nan"), 1.0], [1.0, 1.0]]])
    p = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    p = torch.cat([p, p.repeat(20, 1)])  # 105 prototypes, BLOCK_M = 64: ties across blocks
    d, idx = route(x, p, impl="triton")
    res["_ties"] = idx.tolist() == [[1, 0, 0, 4]] and bool(torch.isnan(d[0, 2]))
    p2 = p.clone()
    p2[70, 0] = float("nan")
    d2, idx2 = route(x[:, :2], p2, impl="triton")
    res["_nan_proto"] = idx2.tolist() == [[70, 70]] and bool(torch.isnan(d2).all())
    # NaN propagates through the Triton attention (and never crashes)
    q = torch.randn(1, 2, 5, 4)
    q[0, 0, 1, 2] = float("nan")
    kk, vv = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    res["_nan_attn"] = all(
        bool(torch.isnan(o[0, 0, 1]).all() and torch.isfinite(o[0, 1]).all() and torch.isfinite(o[0, 0, 0]).all())
        for o in (prototype_attention(q, kk, vv, kind=kd, impl="triton") for kd in ("relu_cos", "softmax")))
    # unsupported sizes are refused with the reason when forced
    try:
        prototype_attention(torch.randn(1, 1, 4, 4), torch.randn(1, 65, 4), torch.randn(1, 65, 4), impl="triton")
        res["_m65"] = "accepted"
    except RuntimeError as exc:
        res["_m65"] = str(exc)
    try:
        route(torch.randn(2, 4, 8).double(), torch.randn(3, 8).double(), mode="soft", impl="triton")
        res["_float64"] = "accepted"
    except RuntimeError as exc:
        res["_float64"] = str(exc)
    _route_mode_cases(seed, res)
    _interpreter.emit(res)


def _route_mode_cases(seed: int, res: dict) -> None:
    """``ROUTE_MODE_CASES`` and the soft/linear special cases (interpreter child process): Triton
    values and gradients (x and bank, random upstream gradients) vs the float64 reference."""
    for i, (mode, B, N, M, C, bank, dt, strided) in enumerate(ROUTE_MODE_CASES):
        name = f"mode{i}"
        try:
            gen = torch.Generator().manual_seed(seed + 200 + i)
            dtype = getattr(torch, dt)
            loc = bank == "location"
            x = _t(gen, (B, N, C), dtype, strided).requires_grad_()
            p = _t(gen, {"shared": (M, C), "batch": (B, M, C), "location": (N, M, C)}[bank], dtype,
                   strided and M > 1).requires_grad_()
            tau = 0.1 if i % 2 else 0.7
            got = route(x, p, mode=mode, tau=tau, per_location=loc, impl="triton")
            xd, pd = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
            want = route(xd, pd, mode=mode, tau=tau, per_location=loc, impl="reference")
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            if mode == "nearest":  # the index is not differentiable
                got, want, idx = got[:1], want[:1], got[1]
            elif mode == "soft" and i % 3 == 0:  # the weights unused: no weight gradient reaches the kernel
                got, want = got[:1], want[:1]
            gs = [torch.randn(o.shape, generator=gen).to(dtype) for o in got]
            gg = torch.autograd.grad(got, [x, p], gs)
            gw = torch.autograd.grad(want, [xd, pd], [g.double() for g in gs])
            res[name] = {"dtype_ok": all(o.dtype == dtype for o in got + gg),
                         "finite": all(bool(torch.isfinite(t).all()) for t in got + gg),
                         "err": max(rel_err(a, b, floor=1.0) for a, b in zip(got, want)),
                         "gerr": max(rel_err(a, b, floor=1.0) for a, b in zip(gg, gw)), "dt": dt}
            if mode == "nearest" and dt == "float32":
                res[name]["idx_ok"] = _argmin_ok(idx, xd.detach(), pd.detach(), per_location=True)
        except Exception as exc:
            res[name] = {"error": f"{type(exc).__name__}: {exc}"}
    gen = torch.Generator().manual_seed(seed + 300)
    x, p = _t(gen, (2, 9, 12)), _t(gen, (2, 4, 12))
    # NaN in a token: its row of every output is NaN, every other row finite
    xn = x.clone()
    xn[1, 3, 5] = float("nan")
    rows = torch.ones(2, 9, dtype=torch.bool)
    rows[1, 3] = False
    bank_loc = _t(gen, (9, 3, 12))
    outs = [*route(xn, p, mode="soft", impl="triton"), route(xn, p, mode="linear", impl="triton"),
            route(xn, p[0], mode="soft", impl="triton")[0],
            route(xn, bank_loc, mode="linear", per_location=True, impl="triton"),
            route(xn, bank_loc, mode="nearest", per_location=True, impl="triton")[0]]
    res["_nan"] = all(bool(torch.isnan(o[1, 3]).all() and torch.isfinite(o[rows]).all()) for o in outs)
    # gradient through the weights only, and a strided (expanded) upstream gradient; a bank without grad
    xg, pg = x.clone().requires_grad_(), p.clone()
    xd = x.double().requires_grad_()
    cases = {}
    w = route(xg, pg, mode="soft", tau=0.2, impl="triton")[1]
    wd = route(xd, pg.double(), mode="soft", tau=0.2, impl="reference")[1]
    gw = torch.randn(w.shape, generator=gen)
    cases["weights_only"] = (torch.autograd.grad(w, xg, gw)[0], torch.autograd.grad(wd, xd, gw.double())[0])
    for mode in ("soft", "linear"):
        o = route(xg, pg, mode=mode, tau=0.2, impl="triton")
        od = route(xd, pg.double(), mode=mode, tau=0.2, impl="reference")
        o, od = (o[0], od[0]) if mode == "soft" else (o, od)
        cases[f"expanded_{mode}"] = (torch.autograd.grad(o.sum(), xg)[0], torch.autograd.grad(od.sum(), xd)[0])
    res["_grad_paths"] = {k: (rel_err(a, b, floor=1.0), bool(torch.isfinite(a).all())) for k, (a, b) in cases.items()}


interpreter_results = _interpreter.results_fixture(__file__)


def _check_interpreter_case(label, e, seed):
    """One interpreter case's report: no error, dtype, nothing left unwritten, argmin, forward and backward."""
    assert "error" not in e, f"{label}: {e.get('error')} (seed={seed})"
    assert e["dtype_ok"] and e["finite"], f"{label}: dtype or unwritten (NaN-poisoned) output (seed={seed})"
    assert e.get("idx_ok", True), f"{label}: argmin differs (seed={seed})"
    tol = 1e-5 if e["dt"] == "float32" else 1e-2
    assert e["err"] <= tol, f"{label}: forward rel err {e['err']:.2e} (seed={seed})"
    assert e["gerr"] <= tol, f"{label}: backward rel err {e['gerr']:.2e} (seed={seed})"


@pytest.mark.parametrize("name", [f"attn{i}" for i in range(len(ATTN_CASES))] + [f"route{i}" for i in range(len(ROUTE_CASES))])
def test_triton_interpreter_matches_reference(name, interpreter_results):
    seed, res = interpreter_results
    _check_interpreter_case(name, res[name], seed)


def test_triton_interpreter_ties_nan_and_unsupported(interpreter_results):
    seed, res = interpreter_results
    assert res["_ties"] and res["_nan_proto"] and res["_nan_attn"], f"seed={seed}"
    assert "M=65" in res["_m65"], res["_m65"]
    assert "float64" in res["_float64"], res["_float64"]


@pytest.mark.parametrize("name", [f"mode{i}" for i in range(len(ROUTE_MODE_CASES))])
def test_triton_interpreter_route_modes_match_float64(name, interpreter_results):
    """soft / linear (and per-location nearest) kernels, forward and backward, vs the float64 reference."""
    seed, res = interpreter_results
    _check_interpreter_case(f"{name} {ROUTE_MODE_CASES[int(name[4:])]}", res[name], seed)


def test_triton_interpreter_route_nan_and_gradient_paths(interpreter_results):
    seed, res = interpreter_results
    assert res["_nan"], f"a NaN token must give NaN in its row only (seed={seed})"
    for path, (err, finite) in res["_grad_paths"].items():
        assert finite and err <= 1e-5, f"{path}: rel err {err:.2e}, finite={finite} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# compiled route_nearest: the per-token math shared by the CUDA and CPU kernels, run by the CPU kernel
# ----------------------------------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(not _ext.has_op(ops_proto.NEAREST_OP, "cpu"),
                                    reason="compiled extension with route_nearest not built")


def _route_inputs(gen, B, N, C, M, bank, dtype):
    """Strided tokens [B, N, C] and a strided bank of the layout ``bank`` ("shared", "batch" or "location"),
    both requiring grad, and the per_location flag."""
    x = _t(gen, (B, N, C), dtype, strided=True).requires_grad_()
    shape = {"shared": (M, C), "batch": (B, M, C), "location": (N, M, C)}[bank]
    return x, _t(gen, shape, dtype, strided=M > 1).requires_grad_(), bank == "location"


def _compiled_route(x, p, loc):
    """(dist, idx) of the compiled kernel through the autograd Function, as route(impl="cuda") runs it."""
    return ops_proto._RouteNearestFn.apply(ops_proto._compiled_nearest, x, p, loc)


@needs_compiled
@pytest.mark.parametrize("bank", ["shared", "batch", "location"])
@pytest.mark.parametrize("M", [1, 6, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_route_nearest_matches_float64(bank, M, dtype, seed, poisoned):
    gen = torch.Generator().manual_seed(seed)
    B, N, C = 2, 37, 40
    x, p, loc = _route_inputs(gen, B, N, C, M, bank, dtype)
    d, idx = _compiled_route(x, p, loc)
    dr, idx_r = route(x, p, per_location=loc if p.dim() == 3 else None, impl="reference")
    wd, _ = np_route(x.detach().double().numpy(), p.detach().double().numpy(), "nearest", per_location=loc)
    assert d.dtype == dtype and idx.dtype == torch.int64 and d.shape == (B, N) and idx.shape == (B, N)
    assert torch.isfinite(d).all() and int(idx.min()) >= 0 and int(idx.max()) < M, f"seed={seed}"
    assert rel_err(d, wd, floor=1.0) <= TOL[dtype], f"seed={seed}"
    if dtype == torch.float32:
        assert _argmin_ok(idx, x.detach().double(), p.detach().double(), loc), f"seed={seed}"
        # the gradient follows the argmin: compare with the reference where both picked the same prototype
        same = idx == idx_r
        assert same.float().mean() > 0.9, f"seed={seed}"
        g = torch.randn(B, N, generator=gen) * same
        for a, b in zip(torch.autograd.grad(d, [x, p], g), torch.autograd.grad(dr, [x, p], g)):
            assert rel_err(a, b, floor=1.0) <= 1e-5, f"seed={seed}"
        # only the bank requires grad (frozen features routed to learnt prototypes): it still gets one
        pp = p.detach().requires_grad_()
        (gp,) = torch.autograd.grad(_compiled_route(x.detach(), pp, loc)[0], pp, g)
        (gp_r,) = torch.autograd.grad(route(x.detach(), pp, per_location=loc if pp.dim() == 3 else None,
                                            impl="reference")[0], pp, g)
        assert rel_err(gp, gp_r, floor=1.0) <= 1e-5, f"seed={seed}"


@needs_compiled
def test_compiled_route_nearest_ties_nan_and_zero(poisoned):
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [float("nan"), 1.0], [1.0, 1.0]]])
    p = torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    d, idx = ops_proto._compiled_nearest(x, p, False)
    assert idx.tolist() == [[1, 0, 0, 4]] and torch.isnan(d[0, 2]) and torch.isfinite(d[0, [0, 1, 3]]).all()
    p2 = p.clone()
    p2[3, 0] = float("nan")
    d2, idx2 = ops_proto._compiled_nearest(x[:, :2], p2, False)
    assert idx2.tolist() == [[3, 3]] and torch.isnan(d2).all()
    d3, idx3 = ops_proto._compiled_nearest(torch.zeros(1, 2, 4), torch.randn(3, 4), False)
    assert torch.equal(d3, torch.ones(1, 2)) and idx3.tolist() == [[0, 0]]


@needs_compiled
def test_compiled_route_nearest_argument_errors():
    op = _ext.op(ops_proto.NEAREST_OP)
    x, p = torch.randn(2, 5, 8), torch.randn(3, 8)
    d, i = torch.empty(2, 5), torch.empty(2, 5, dtype=torch.int64)
    cases = [
        ((x[0], p, False, 1e-8, d, i), "x must be"),
        ((x.double(), p.double(), False, 1e-8, d, i), "float32, float16 or bfloat16"),
        ((x, p.half(), False, 1e-8, d, i), "x's dtype"),
        ((x, torch.randn(3, 7), False, 1e-8, d, i), "channels"),
        ((x, torch.randn(0, 8), False, 1e-8, d, i), "no prototypes"),
        ((x, torch.randn(4, 3, 8), False, 1e-8, d, i), "per-sample bank needs leading dim 2"),
        ((x, torch.randn(4, 3, 8), True, 1e-8, d, i), "per-location bank needs leading dim 5"),
        ((x, p, True, 1e-8, d, i), "per_location needs"),
        ((x, p, False, 0.0, d, i), "eps must be"),
        ((x, p, False, 1e-8, d.double(), i), "dist must be"),
        ((x, p, False, 1e-8, d, i.int()), "index must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


needs_compiled_attention = pytest.mark.skipif(not _ext.has_op(ops_proto.ATTENTION_OP, "cpu"),
                                              reason="compiled extension with prototype_attention_forward not built")


def _compiled_attn(q, k, v, kind, scale):
    H, D = q.shape[1], q.shape[-1]
    s = _ref.head_scale(scale, H, 1.0 if kind == "relu_cos" else D ** -0.5, q.device, torch.float32)
    out, attn = ops_proto._compiled_attention(q, k, v, s.reshape(H).contiguous(), kind, _ref.ATTN_NORM_EPS, False)
    assert attn is None
    return out


@needs_compiled_attention
@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("M", [1, 6, 8, 13, 32, 33, 64])  # each prototype-count bucket (8, 16, 32, 64) and edges
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_attention_matches_float64(kind, shared, M, dtype, seed, poisoned):
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D, DV = 2, 3, 37, 40, 24
    q = _t(gen, (B, H, N, D), dtype, strided=True)
    k = _t(gen, (H, M, D) if shared else (B, H, M, D), dtype, strided=M > 1)
    v = _t(gen, (H, M, DV) if shared else (B, H, M, DV), dtype, strided=M > 1)
    scale = torch.rand(H, generator=gen) + 0.5 if kind == "relu_cos" else 0.3
    out = _compiled_attn(q, k, v, kind, scale)
    want = np_attention(q.double(), k.double(), v.double(), kind,
                        scale.double().numpy() if isinstance(scale, torch.Tensor) else scale)
    assert out.dtype == dtype and out.shape == (B, H, N, DV) and torch.isfinite(out).all(), f"seed={seed}"
    assert rel_err(out, want, floor=1.0) <= TOL[dtype], f"rel err {rel_err(out, want, floor=1.0):.2e} (seed={seed})"
    ref_out = prototype_attention(q, k, v, kind=kind, scale=scale, impl="reference")
    assert rel_err(out, ref_out, floor=1.0) <= TOL[dtype], f"seed={seed}"


def _compiled_attn_train(q, k, v, kind, scale):
    """The output through the autograd Function with the compiled kernel pair, as
    prototype_attention(impl="cuda") runs it (here on the extension's CPU kernels)."""
    H, D = q.shape[1], q.shape[-1]
    scale_t = scale if isinstance(scale, torch.Tensor) else None
    with torch.no_grad():
        s = _ref.head_scale(scale_t.detach() if scale_t is not None else scale, H,
                            1.0 if kind == "relu_cos" else D ** -0.5, q.device, torch.float32)
    return ops_proto._ProtoAttnFn.apply(ops_proto._ATTENTION["cuda"], q, k, v, scale_t, kind,
                                        s.reshape(H).contiguous(), _ref.ATTN_NORM_EPS, False)[0]


needs_compiled_attention_backward = pytest.mark.skipif(
    not _ext.has_op(ops_proto.ATTENTION_BACKWARD_OP, "cpu"),
    reason="compiled extension with prototype_attention_backward not built")


@needs_compiled_attention_backward
@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("M", [1, 6, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_attention_backward_matches_float64(kind, shared, M, dtype, seed, poisoned):
    """Gradients of q, k, v and a per-head scale tensor (both kinds) through the compiled backward vs the
    float64 reference's autograd; strided inputs and a strided grad_out."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N, D, DV = 2, 3, 37, 40, 24
    q = _t(gen, (B, H, N, D), dtype, strided=True).requires_grad_()
    k = _t(gen, (H, M, D) if shared else (B, H, M, D), dtype, strided=M > 1).requires_grad_()
    v = _t(gen, (H, M, DV) if shared else (B, H, M, DV), dtype, strided=M > 1).requires_grad_()
    scale = (torch.rand(H, 1, 1, generator=gen) + (0.5 if kind == "relu_cos" else 0.05)).requires_grad_()
    g = _t(gen, (B, H, N, DV), dtype, strided=True)
    leaves = (q, k, v, scale)
    out = _compiled_attn_train(q, k, v, kind, scale)
    got = torch.autograd.grad(out, leaves, g)
    want_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want_out = _ref.prototype_attention(*want_leaves[:3], kind=kind, scale=want_leaves[3])
    want = torch.autograd.grad(want_out, want_leaves, g.double())
    assert rel_err(out, want_out, floor=1.0) <= TOL[dtype], f"seed={seed}"
    for name, a, b, leaf in zip("qkvs", got, want, leaves):
        assert a.dtype == leaf.dtype and a.shape == leaf.shape, name
        assert torch.isfinite(a).all(), f"{name} seed={seed}"
        if name == "s":  # a sum over every query and prototype whose terms cancel: measured against their size
            err = float(((a.double() - b).abs().flatten() / _dscale_terms(q, k, v, g, kind, scale).clamp_min(1)).max())
        else:
            err = rel_err(a, b, floor=1.0)
        assert err <= TOL[dtype], f"d{name} rel err {err:.2e} (seed={seed})"


def _dscale_terms(q, k, v, g, kind, scale):
    """Per head, the float64 sum of |dz_m x_m| over the queries and prototypes, the terms d(scale) adds up
    (kernels/prototype_attention.h): float32 can do no better than their size times its epsilon."""
    q, k, v, g, s = (t.detach().double() for t in (q, k, v, g, scale))
    if k.dim() == 3:
        k, v = k.unsqueeze(0), v.unsqueeze(0)
    gm = g @ v.transpose(-2, -1)
    if kind == "relu_cos":
        x = F.normalize(q, dim=-1, eps=1e-12) @ F.normalize(k, dim=-1, eps=1e-12).transpose(-2, -1)
        dz = gm * (s.reshape(-1, 1, 1) * x > 0)
    else:
        x = q @ k.transpose(-2, -1)
        a = torch.softmax(s.reshape(-1, 1, 1) * x, dim=-1)
        dz = a * (gm - (a * gm).sum(-1, keepdim=True))
    return (dz * x).abs().sum((0, 2, 3))


@needs_compiled_attention_backward
def test_compiled_attention_backward_nan_and_zero_vectors(seed, poisoned):
    """A NaN query poisons its own dq row and the prototype gradients it feeds (as the reference does), and
    no other query's dq; a zero query gets the reference's finite gradient (d(q̂) / eps)."""
    gen = torch.Generator().manual_seed(seed)
    for kind in ("relu_cos", "softmax"):
        q = _t(gen, (2, 2, 5, 4))
        q[0, 0, 1, 2] = float("nan")
        q = q.requires_grad_()
        k, v = _t(gen, (2, 3, 4)).requires_grad_(), _t(gen, (2, 3, 4)).requires_grad_()
        dq, dk, dv = torch.autograd.grad(_compiled_attn_train(q, k, v, kind, None), (q, k, v), torch.ones(2, 2, 5, 4))
        wq, wk, wv = torch.autograd.grad(_ref.prototype_attention(q, k, v, kind=kind), (q, k, v),
                                         torch.ones(2, 2, 5, 4))
        assert torch.isnan(dq[0, 0, 1]).all() and torch.isfinite(dq[0, 0, [0, 2, 3, 4]]).all(), kind
        assert torch.isfinite(dq[1]).all() and torch.isfinite(dk[1]).all() and torch.isfinite(dv[1]).all(), kind
        for a, b in ((dq, wq), (dk, wk), (dv, wv)):
            assert torch.equal(torch.isnan(a), torch.isnan(b)), kind
            assert rel_err(torch.nan_to_num(a), torch.nan_to_num(b), floor=1.0) <= 1e-5, kind
    q = torch.zeros(1, 1, 2, 4, requires_grad=True)
    k, v = torch.randn(1, 3, 4, generator=gen).requires_grad_(), torch.randn(1, 3, 4, generator=gen)
    s = torch.full((1, 1, 1), 2.0)
    g = torch.randn(1, 1, 2, 4, generator=gen)
    (dq,) = torch.autograd.grad(_compiled_attn_train(q, k, v, "relu_cos", s), (q,), g)
    (wq,) = torch.autograd.grad(_ref.prototype_attention(q, k, v, kind="relu_cos", scale=s), (q,), g)
    assert torch.isfinite(dq).all() and rel_err(dq, wq, floor=1.0) <= 1e-5


@needs_compiled_attention
def test_compiled_attention_nan_and_zero_vectors(seed, poisoned):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _t(gen, (1, 2, 5, 4)), _t(gen, (2, 3, 4)), _t(gen, (2, 3, 4))
    q[0, 0, 1, 2] = float("nan")
    for kind in ("relu_cos", "softmax"):
        out = _compiled_attn(q, k, v, kind, None)
        assert torch.isnan(out[0, 0, 1]).all() and torch.isfinite(out[0, 1]).all(), kind
        assert torch.isfinite(out[0, 0, [0, 2, 3, 4]]).all(), kind
    zero = _compiled_attn(torch.zeros(1, 1, 2, 4), torch.zeros(1, 3, 4), torch.ones(1, 3, 4), "relu_cos", None)
    assert torch.equal(zero, torch.zeros(1, 1, 2, 4))


@needs_compiled_attention_backward
@pytest.mark.parametrize("mode", ["soft", "linear"])
@pytest.mark.parametrize("bank", ["shared", "batch", "location"])
@pytest.mark.parametrize("M", [1, 7, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_route_soft_linear_match_float64(mode, bank, M, dtype, seed, poisoned):
    """route(mode="soft" | "linear", impl="cuda") as the compiled attention of the tokens to the bank (as
    route runs it, here on the CPU kernels): values vs the float64 re-statement, and the gradients of x and the
    bank (through both of soft's outputs) vs the float64 reference's autograd; strided inputs."""
    gen = torch.Generator().manual_seed(seed)
    x, p, loc = _route_inputs(gen, 3, 11, 40, M, bank, dtype)
    got = ops_proto._compiled_route(x, p, mode, 0.2, loc)
    got = got if mode == "soft" else (got,)
    want_np = np_route(x.detach().double(), p.detach().double(), mode, tau=0.2, per_location=loc)
    want_np = want_np if mode == "soft" else (want_np,)
    for a, b in zip(got, want_np):
        assert a.dtype == dtype and torch.isfinite(a).all(), f"seed={seed}"
        err = rel_err(a, b, floor=1.0)
        assert err <= TOL[dtype], f"{mode} {bank} M={M}: rel err {err:.2e} (seed={seed})"
    gs = [torch.randn(a.shape, generator=gen).to(dtype) for a in got]
    grads = torch.autograd.grad(got, (x, p), gs)
    leaves = [t.detach().double().requires_grad_() for t in (x, p)]
    want = _ref.route(*leaves, mode=mode, tau=0.2, per_location=loc)
    want = want if mode == "soft" else (want,)
    for name, a, b in zip("xp", grads, torch.autograd.grad(want, leaves, [g.double() for g in gs])):
        assert a.dtype == dtype and a.shape == b.shape, name
        err = rel_err(a, b, floor=1.0)
        assert err <= TOL[dtype], f"d{name} {mode} {bank} M={M}: rel err {err:.2e} (seed={seed})"


@needs_compiled_attention_backward
def test_compiled_route_soft_weights_only_and_nan(seed, poisoned):
    """Soft routing's weights alone carry the gradient (grad_out absent); a NaN token spoils only its own row."""
    gen = torch.Generator().manual_seed(seed)
    x, p = _t(gen, (2, 5, 8)).requires_grad_(), _t(gen, (4, 8)).requires_grad_()
    g = torch.randn(2, 5, 4, generator=gen)
    got = torch.autograd.grad(ops_proto._compiled_route(x, p, "soft", 0.5, False)[1], (x, p), g)
    leaves = [t.detach().double().requires_grad_() for t in (x, p)]
    want = torch.autograd.grad(_ref.route(*leaves, mode="soft", tau=0.5)[1], leaves, g.double())
    for a, b in zip(got, want):
        assert rel_err(a, b, floor=1.0) <= 1e-5, f"seed={seed}"
    xn = x.detach().clone()
    xn[1, 2, 3] = float("nan")
    for mode in ("soft", "linear"):
        out = ops_proto._compiled_route(xn, p.detach(), mode, 0.5, False)
        out = out[0] if mode == "soft" else out
        assert torch.isnan(out[1, 2]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 3:]).all(), mode


@needs_compiled_attention
def test_compiled_attention_argument_errors():
    q, k, v, s = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 6), torch.ones(3)
    out = torch.empty(2, 3, 5, 6)
    expect_errors(_ext.op(ops_proto.ATTENTION_OP), (q, k, v, s, 0, 1e-12, out, None), [
        (0, q[0], "q must be"),
        (0, q.double(), "float32, float16 or bfloat16"),
        (1, k.half(), "q's dtype"),
        (2, v[0], "both"),
        (1, torch.randn(2, 3, 4, 7), "k must be"),
        (1, torch.randn(2, 3, 65, 8), "M <= 64"),
        (2, torch.randn(2, 3, 5, 6), "v must match k"),
        (4, 4, "kind must be"),
        (5, 0.0, "eps must be"),
        (3, torch.ones(2), "scale must be"),
        (6, torch.empty(2, 3, 5, 8), "out must be"),
        (7, torch.empty(2, 3, 5, 5), "attn must be"),
        (7, torch.empty(2, 3, 5, 4).double(), "attn must be"),
    ])


@needs_compiled_attention_backward
def test_compiled_attention_backward_argument_errors():
    q, k, v, s = torch.randn(2, 3, 5, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 6), torch.ones(3)
    g = torch.randn(2, 3, 5, 6)
    dq, dk, dv, ds = torch.empty(2, 3, 5, 8), torch.empty(2, 3, 4, 8), torch.empty(2, 3, 4, 6), torch.empty(2, 3)
    expect_errors(_ext.op(ops_proto.ATTENTION_BACKWARD_OP), (q, k, v, s, g, None, 0, 1e-12, dq, dk, dv, ds), [
        (4, torch.randn(2, 3, 5, 7), "grad_out must be"),
        (4, g.half(), "grad_out must be"),
        (5, torch.randn(2, 3, 5, 5), "grad_attn must be"),
        (5, torch.randn(2, 3, 5, 4).half(), "grad_attn must be"),
        (8, torch.empty(2, 3, 5, 7), "grad_q must be"),
        (8, dq.half(), "grad_q must be"),
        (9, torch.empty(3, 4, 8), r"grad_k must be contiguous float32 \[2, 3, 4, 8\]"),
        (9, torch.empty(2, 3, 8, 4).transpose(-1, -2), "grad_k must be contiguous"),
        (10, torch.empty(2, 3, 4, 6).double(), "grad_v must be"),
        (11, torch.empty(3), "grad_scale must be"),
        (6, 4, "kind must be"),
        (1, torch.randn(3, 65, 8), "M <= 64"),
    ])


def test_attention_cuda_impl_errors():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors"):
        prototype_attention(q, k, k, impl="cuda")


def test_route_cuda_impl_errors():
    for mode in ops_proto.ROUTE_MODES:
        with pytest.raises(RuntimeError, match="impl='cuda' needs CUDA tensors"):
            route(torch.randn(2, 4, 8), torch.randn(3, 8), mode=mode, impl="cuda")
    if torch.cuda.is_available() and _ext.has_op(ops_proto.ATTENTION_OP, "cuda"):
        with pytest.raises(RuntimeError, match="M=65 prototypes > 64"):
            route(torch.randn(2, 4, 8).cuda(), torch.randn(65, 8).cuda(), mode="soft", impl="cuda")


# ----------------------------------------------------------------------------------------------
# GPU: real shapes
# ----------------------------------------------------------------------------------------------


def _gpu_ready():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernels in the interpreter")
    from fastproto import triton as tpkg

    if not tpkg.is_available():
        pytest.skip("triton is not installed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [6, 8, 12])
@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_attention_real_shapes(M, kind, dtype, seed):
    _gpu_ready()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, H, N, D = 16, 12, 784, 64
    q = torch.randn(B, H, N, D, device="cuda", generator=gen)
    k = torch.randn(B, H, M, D, device="cuda", generator=gen)
    if kind == "relu_cos":
        # The gradient jumps at the ReLU kink (cos = 0): two float32 computations that differ by rounding
        # disagree there by O(1) (seen on the H100: 1-2 entries in 1.8 M flipped). Keep the cosines away
        # from 0 (typically |cos| ~ 0.5, minimum ~5e-3 over the 1.8 M entries, far above rounding): a
        # shared direction u in q, and +-u in each prototype (both ReLU branches covered).
        u = torch.nn.functional.normalize(torch.randn(D, device="cuda", generator=gen), dim=0) * 8.0
        sign = torch.where(torch.arange(M, device="cuda") % 2 == 0, 1.0, -1.0)[:, None]
        q, k = q + u, k + sign * u
    q, k = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
    v = torch.randn(B, H, M, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    s = (torch.rand(H, 1, 1, device="cuda", generator=gen) + 0.5).requires_grad_() if kind == "relu_cos" else None
    ins = [q, k, v] + ([s] if s is not None else [])
    got = prototype_attention(q, k, v, kind=kind, scale=s, impl="triton")
    want = prototype_attention(q, k, v, kind=kind, scale=s, impl="reference")
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got.cpu(), want.cpu(), floor=1.0) <= tol
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ins, g)):
        assert rel_err(a.cpu(), b.cpu(), floor=1.0) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("M", [6, 8, 12, 789])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_route_nearest_real_shapes(impl, M, dtype, seed):
    if impl == "triton":
        _gpu_ready()
    elif not _ext.has_op(ops_proto.NEAREST_OP, "cuda"):
        pytest.skip("the compiled extension has no CUDA kernel")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, N, C = 16, 784, 768
    x = torch.randn(B, N, C, device="cuda", generator=gen).to(dtype)
    p = torch.randn(B, M, C, device="cuda", generator=gen).to(dtype)
    old = _triton_pkg.POISON_OUTPUTS
    _triton_pkg.POISON_OUTPUTS = True
    try:
        d, idx = route(x, p, impl=impl)
    finally:
        _triton_pkg.POISON_OUTPUTS = old
    dr, _ = route(x, p, impl="reference")
    assert rel_err(d.cpu(), dr.cpu(), floor=1.0) <= (1e-5 if dtype == torch.float32 else 1e-2)
    if dtype == torch.float32:
        assert _argmin_ok(idx.cpu(), x.double().cpu(), p.double().cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("M", [6, 8, 12])
@pytest.mark.parametrize("kind", ["relu_cos", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_attention_real_shapes(M, kind, dtype, seed, poisoned):
    """prototype_attention(impl="cuda") forward and backward vs the reference, at the models' shapes (shared
    bank: the block-summed prototype gradients add over the whole batch)."""
    if not _ext.has_op(ops_proto.ATTENTION_BACKWARD_OP, "cuda"):
        pytest.skip("the compiled extension has no CUDA kernel")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, H, N, D = 16, 12, 784, 64
    q = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype).requires_grad_()
    shape = (H, M, D) if kind == "softmax" else (B, H, M, D)
    k = torch.randn(*shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    v = torch.randn(*shape, device="cuda", generator=gen).to(dtype).requires_grad_()
    s = (torch.rand(H, 1, 1, device="cuda", generator=gen) + 0.5).requires_grad_()
    g = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    got = prototype_attention(q, k, v, kind=kind, scale=s, impl="cuda")
    want = prototype_attention(q, k, v, kind=kind, scale=s, impl="reference")
    assert rel_err(got.cpu(), want.cpu(), floor=1.0) <= tol, f"seed={seed}"
    for name, a, b in zip("qkvs", torch.autograd.grad(got, (q, k, v, s), g), torch.autograd.grad(want, (q, k, v, s), g)):
        assert rel_err(a.cpu(), b.cpu(), floor=1.0) <= tol, f"d{name} seed={seed}"


GPU_ROUTE_CASES = {  # name: (mode, x shape, bank shape, per_location)
    "uipad_soft": ("soft", (16, 784, 768), (16, 12, 768), False),
    "borad_linear": ("linear", (16, 64, 2048), (64, 7, 2048), True),
    "soft_789_shared": ("soft", (4, 789, 768), (789, 768), False),  # several prototype tiles
    "linear_789_per_sample": ("linear", (4, 789, 768), (4, 789, 768), False),
    "nearest_per_location": ("nearest", (16, 64, 2048), (64, 7, 2048), True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_ROUTE_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_route_modes_real_shapes(name, dtype, impl, seed):
    """UIP-AD's soft and BoRAD's linear routing at their shapes, and Pro-AD-sized banks: Triton (every case) and
    the compiled kernels (M <= 64) forward and backward vs the reference."""
    mode, xs, ps, loc = GPU_ROUTE_CASES[name]
    if impl == "triton":
        _gpu_ready()
    elif not _ext.has_op(ops_proto.ATTENTION_OP, "cuda"):
        pytest.skip("the compiled extension has no CUDA kernel")
    elif ps[-2] > 64:
        pytest.skip("the compiled soft / linear routing holds M <= 64 prototypes")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*xs, device="cuda", generator=gen).to(dtype).requires_grad_()
    p = torch.randn(*ps, device="cuda", generator=gen).to(dtype).requires_grad_()
    got = route(x, p, mode=mode, tau=0.1, per_location=loc, impl=impl)
    want = route(x, p, mode=mode, tau=0.1, per_location=loc, impl="reference")
    got = got[:1] if mode == "nearest" else (got if isinstance(got, tuple) else (got,))
    want = want[:1] if mode == "nearest" else (want if isinstance(want, tuple) else (want,))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b.cpu(), floor=1.0) <= tol, f"{name} seed={seed}"
    if mode == "nearest":  # its gradient follows the argmin, which a float32 near-tie may flip
        return
    gs = [torch.randn_like(o) for o in got]
    for a, b in zip(torch.autograd.grad(got, [x, p], gs), torch.autograd.grad(want, [x, p], gs)):
        assert rel_err(a.cpu(), b.cpu(), floor=1.0) <= tol, f"{name} seed={seed}"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
