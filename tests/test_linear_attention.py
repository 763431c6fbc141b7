"""Linear attention (DESIGN "Ops" item 1).

- reference vs an independent float64 restatement (einsum in float64, written here), fresh seeds;
- gradcheck of the reference in float64, and the explicit analytic backward vs autograd;
- Triton forward and backward vs reference under the Triton interpreter, run in a subprocess with
  TRITON_INTERPRET=1 set before triton is imported (this file is the subprocess script, see
  ``__main__``), with every buffer the Triton path allocates poisoned with NaN and strided inputs
  taken as views into NaN-filled storage;
- ``LinearAttention`` vs a restatement of Dinomaly's ``LinearAttention2`` forward;
- the compiled kernels' per-row routines (shared by their CUDA and CPU kernels) through the CPU kernels: the
  same float64 comparison as the reference (every case x layout x dtype), forward and backward (gradients vs
  autograd through the float64 restatement), NaN, eps, argument errors;
- GPU tests at real shapes (skipped without CUDA).
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests import _interpreter
from tests._tensors import rel_err, strided_leaf
from tests._op_errors import expect_errors
from fastproto import _ext
from fastproto import triton as _triton_pkg  # noqa: E402  (POISON_OUTPUTS switch)
from fastproto.ops import LinearAttention, LinearCrossAttention, linear_attention
from fastproto.ops.linear_attention import linear_attention_with_state

ref = importlib.import_module("fastproto.reference.linear_attention")
ops_la = importlib.import_module("fastproto.ops.linear_attention")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _make(gen: torch.Generator, shape, dtype=torch.float32, layout="contig", device="cpu"):
    """Random tensor [B, H, N, D] in the given layout; non-contiguous layouts are views into
    NaN-filled storage, so a read outside the view poisons the result."""
    B, H, N, D = shape
    x = torch.randn(shape, generator=gen, dtype=torch.float32).to(device)
    if layout == "contig":
        return x.to(dtype)
    if layout == "tokens":  # [B, N, H, D] storage (the packed-projection layout), padded last dim
        store = torch.full((B, N, H, D + 3), float("nan"), dtype=dtype, device=device)
        view = store[..., :D].permute(0, 2, 1, 3)
    elif layout == "dmajor":  # D is the outer dim of each head ([B, H, D, N] storage)
        store = torch.full((B, H, D, N), float("nan"), dtype=dtype, device=device)
        view = store.transpose(2, 3)
    elif layout == "stepped":  # every other token and channel
        store = torch.full((B, H, 2 * N, 2 * D), float("nan"), dtype=dtype, device=device)
        view = store[:, :, ::2, ::2]
    else:
        raise ValueError(layout)
    view.copy_(x.to(dtype))
    assert 1 in shape or not view.is_contiguous()
    return view


def _phi64(x, phi):
    if phi == "elu":
        return torch.where(x > 0, x + 1.0, torch.exp(x))
    return torch.clamp(x, min=0.0)


def _expected64(q, k, v, phi, eps):
    """Independent float64 restatement (einsum)."""
    q, k, v = q.double(), k.double(), v.double()
    fq, fk = _phi64(q, phi), _phi64(k, phi)
    state = torch.einsum("bhnd,bhne->bhde", fk, v)
    z = torch.einsum("bhnd->bhd", fk)
    num = torch.einsum("bhqd,bhde->bhqe", fq, state)
    den = torch.einsum("bhqd,bhd->bhq", fq, z) + eps
    return num / den[..., None], state



def _seed(rng) -> int:
    return int(rng.integers(0, 2**31 - 1))


# (B, H, Nq, Nk, D, Dv)
CASES = {
    "self_d_eq_dv": (2, 3, 17, 17, 8, 8),
    "cross_nq_ne_nk": (2, 2, 13, 29, 16, 16),
    "d_ne_dv": (1, 2, 11, 7, 12, 20),
    "nq_1": (2, 2, 1, 9, 8, 8),
    "nk_1": (2, 2, 9, 1, 8, 8),
}
LAYOUTS = ("contig", "tokens", "dmajor", "stepped")


def _layout_inputs(gen, case, dtype):
    """(layout, q, k, v, grad_out) for each layout of q, the other three in the next layouts in turn."""
    B, H, Nq, Nk, D, Dv = case
    shapes = ((B, H, Nq, D), (B, H, Nk, D), (B, H, Nk, Dv), (B, H, Nq, Dv))
    for i, layout in enumerate(LAYOUTS):
        yield (layout, *(_make(gen, shape, dtype, LAYOUTS[(i + j) % len(LAYOUTS)]) for j, shape in enumerate(shapes)))


# ----------------------------------------------------------------------------------------------
# reference vs float64 restatement
# ----------------------------------------------------------------------------------------------


def _compiled_with_state(q, k, v, phi, eps):
    if not _ext.has_op(ops_la.COMPILED_OP, "cpu"):
        pytest.skip("compiled extension with linear_attention_forward not built")
    out, state, ksum = ops_la._compiled_forward(q, k, v, phi, eps)
    assert out.transpose(1, 2).is_contiguous(), "out must be a view of [B, Nq, H, Dv] storage (the heads merge freely)"
    want_ksum = _phi64(k.double(), phi).sum(-2)
    assert rel_err(ksum, want_ksum) <= 1e-5 * max(1, k.shape[2] // 8), "ksum"
    return out, state


# the compiled path's CPU kernel runs the per-query routine its CUDA kernel shares
PATHS = {"reference": lambda q, k, v, phi, eps: ref.linear_attention_with_state(q, k, v, phi=phi, eps=eps),
         "compiled": _compiled_with_state}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("phi", ["elu", "relu"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_matches_float64(path, case, phi, dtype, tol, rng, poisoned):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, D, Dv = CASES[case]
    for layout, q, k, v, _ in _layout_inputs(gen, CASES[case], dtype):
        out, state = PATHS[path](q, k, v, phi, 1e-6)
        want, want_state = _expected64(q, k, v, phi, 1e-6)
        assert out.shape == (B, H, Nq, Dv) and out.dtype == dtype
        assert torch.isfinite(out).all(), f"{case} {layout}: non-finite (seed={seed})"
        err = rel_err(out, want)
        assert err <= tol, f"{case} {phi} {dtype} {layout}: rel err {err:.2e} > {tol} (seed={seed})"
        assert rel_err(state, want_state) <= tol, f"{case} {layout}: state (seed={seed})"
        if path == "reference":  # the public op on CPU (auto) is the reference, bit for bit
            assert torch.equal(linear_attention(q, k, v, phi=phi), out)


def test_reference_float64_and_eps(rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (_make(gen, s, torch.float64) for s in [(1, 2, 5, 4), (1, 2, 6, 4), (1, 2, 6, 3)])
    for eps in (0.0, 1e-6, 0.5):
        got = linear_attention(q, k, v, eps=eps)
        want, _ = _expected64(q, k, v, "elu", eps)
        assert got.dtype == torch.float64
        assert rel_err(got, want) <= 1e-12, f"eps={eps} (seed={seed})"


@pytest.mark.parametrize("phi", ["elu", "relu"])
def test_reference_gradcheck_float64(phi, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    q = _make(gen, (1, 2, 5, 4), torch.float64).requires_grad_(True)
    k = _make(gen, (1, 2, 6, 4), torch.float64).requires_grad_(True)
    v = _make(gen, (1, 2, 6, 3), torch.float64).requires_grad_(True)
    fn = lambda a, b, c: ref.linear_attention(a, b, c, phi=phi, eps=1e-3)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, rtol=1e-5), f"seed={seed}"


@pytest.mark.parametrize("phi", ["elu", "relu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_analytic_backward_matches_autograd(phi, dtype, tol, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    q = _make(gen, (2, 2, 7, 8), dtype, "tokens").requires_grad_(True)
    k = _make(gen, (2, 2, 9, 8), dtype).requires_grad_(True)
    v = _make(gen, (2, 2, 9, 5), dtype, "dmajor").requires_grad_(True)
    g = _make(gen, (2, 2, 7, 5), dtype)
    out = ref.linear_attention(q, k, v, phi=phi)
    want = torch.autograd.grad(out, (q, k, v), g)
    got = ref.linear_attention_backward(q.detach(), k.detach(), v.detach(), g, phi=phi)
    for name, a, b in zip("qkv", got, want):
        err = rel_err(a, b, 1.0)
        assert err <= tol, f"d{name}: {err:.2e} (seed={seed})"


def test_nan_propagates(rng):
    gen = torch.Generator().manual_seed(_seed(rng))
    q, k, v = (_make(gen, s) for s in [(2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 4)])
    q2 = q.clone()
    q2[0, 1, 3, 2] = float("nan")
    out = linear_attention(q2, k, v)
    assert torch.isnan(out[0, 1, 3]).all()
    nan_mask = torch.zeros_like(out, dtype=torch.bool)
    nan_mask[0, 1, 3] = True
    assert torch.isfinite(out[~nan_mask]).all()
    for phi in ("elu", "relu"):
        k2 = k.clone()
        k2[1, 0, 4, 0] = float("nan")
        out = linear_attention(q, k2, v, phi=phi)
        assert torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all()


def test_bad_inputs():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    cases = [
        ((q[0], k, v), {}, ValueError, "q must have rank 4"),
        ((q, k, v[0]), {}, ValueError, "v must have rank 4"),
        ((q, torch.randn(2, 4, 6, 8), v), {}, ValueError, "k has batch/heads"),
        ((q, k, torch.randn(1, 3, 6, 4)), {}, ValueError, "v has batch/heads"),
        ((q, torch.randn(2, 3, 6, 7), v), {}, ValueError, "k has head dim"),
        ((q, k, torch.randn(2, 3, 5, 4)), {}, ValueError, "v has 5 tokens but k has 6"),
        ((q, k.double(), v), {}, TypeError, "k has dtype"),
        ((q, k, v.half()), {}, TypeError, "v has dtype"),
        ((q, k.long(), v), {}, TypeError, "k must have a floating dtype"),
        ((q, k, "v"), {}, TypeError, "v must be a torch.Tensor"),
        ((q, k, v), {"phi": "softmax"}, ValueError, "phi must be one of"),
        ((q, k, v), {"eps": -1.0}, ValueError, "eps must be"),
        ((q, k, v), {"eps": float("nan")}, ValueError, "eps must be"),
        ((q, k, v), {"impl": "cuda"}, RuntimeError, "impl='cuda' needs CUDA tensors"),
        ((q, k, v), {"impl": "cutlass"}, ValueError, "impl must be one of"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            linear_attention(*args, **kw)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="k is on"):
            linear_attention(q, k.cuda(), v)


def test_triton_on_cpu_without_interpreter_is_an_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    from fastproto import triton as tpkg

    q = torch.randn(1, 1, 3, 4)
    msg = "needs CUDA tensors" if tpkg.is_available() else "cannot be imported"
    with pytest.raises(RuntimeError, match=msg):
        linear_attention(q, q, q, impl="triton")


# ----------------------------------------------------------------------------------------------
# modules vs Dinomaly LinearAttention2 (restated)
# ----------------------------------------------------------------------------------------------


class _DinomalyLinearAttention2(nn.Module):
    """Restatement of Dinomaly's LinearAttention2 forward (guojiajeremy/Dinomaly
    models/vision_transformer.py): elu+1 feature map, einsum state, reciprocal normaliser without
    eps, no scaling, returns (x, kv)."""

    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        t = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(t[0]) + 1.0, F.elu(t[1]) + 1.0, t[2]
        kv = torch.einsum("bhsd,bhse->bhde", k, v)
        zinv = 1.0 / torch.einsum("bhsd,bhd->bhs", q, k.sum(dim=-2))
        out = torch.einsum("bhde,bhsd,bhs->bhse", kv, q, zinv)
        return self.proj(out.transpose(1, 2).reshape(B, N, C)), kv


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_linear_attention_module_matches_dinomaly(qkv_bias, rng):
    seed = _seed(rng)
    torch.manual_seed(seed)
    dim, heads = 48, 4
    ours = LinearAttention(dim, num_heads=heads, qkv_bias=qkv_bias).double()
    theirs = _DinomalyLinearAttention2(dim, heads, qkv_bias).double()
    keys = ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"] if qkv_bias else \
        ["qkv.weight", "proj.weight", "proj.bias"]
    assert list(ours.state_dict().keys()) == keys
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 13, dim, dtype=torch.float64)
    out, kv = ours(x)
    want, want_kv = theirs(x)
    assert out.shape == (3, 13, dim) and kv.shape == (3, heads, dim // heads, dim // heads)
    assert rel_err(out, want) <= 1e-12 and rel_err(kv, want_kv) <= 1e-12, f"seed={seed}"
    # float32 and gradient flow
    ours32 = ours.float()
    theirs32 = theirs.float()
    x32 = x.float().requires_grad_(True)
    out32, _ = ours32(x32)
    assert rel_err(out32, theirs32(x32.detach())[0]) <= 1e-5
    out32.sum().backward()
    assert ours32.qkv.weight.grad is not None and torch.isfinite(x32.grad).all()
    with pytest.raises(NotImplementedError):
        ours32(x32, attn_mask=torch.ones(13))
    with pytest.raises(ValueError, match=r"x must be \[B, N, 48\]"):
        ours32(torch.randn(2, 13, 40))


def test_linear_cross_attention(rng):
    seed = _seed(rng)
    torch.manual_seed(seed)
    dim, heads = 32, 4
    cross = LinearCrossAttention(dim, num_heads=heads).double()
    assert list(cross.state_dict().keys()) == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    selfattn = LinearAttention(dim, num_heads=heads).double()
    selfattn.load_state_dict(cross.state_dict())
    x = torch.randn(2, 11, dim, dtype=torch.float64)
    y = torch.randn(2, 7, dim, dtype=torch.float64)
    assert rel_err(cross(x, x)[0], selfattn(x)[0]) <= 1e-12
    # restated: the one packed qkv applied to both inputs, q rows from x, k/v rows from y
    tx = cross.qkv(x).reshape(2, 11, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    ty = cross.qkv(y).reshape(2, 7, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    o, _ = _expected64(tx[0], ty[1], ty[2], "elu", 0.0)
    want = cross.proj(o.transpose(1, 2).reshape(2, 11, dim))
    out, kv = cross(x, y)
    assert out.shape == (2, 11, dim) and kv.shape == (2, heads, dim // heads, dim // heads)
    assert rel_err(out, want) <= 1e-12, f"seed={seed}"
    with pytest.raises(ValueError, match="batch"):
        cross(x, y[:1])


# ----------------------------------------------------------------------------------------------
# Triton (interpreter, subprocess) vs reference
# ----------------------------------------------------------------------------------------------

# (B, H, Nq, Nk, D, Dv, phi, dtype, layouts)
INTERP_CASES = {
    "self_37_d16": (2, 2, 37, 37, 16, 16, "elu", "float32", ("contig", "contig", "contig")),
    "cross_d32_relu": (2, 2, 21, 37, 32, 32, "relu", "float32", ("tokens", "dmajor", "stepped")),
    "d_ne_dv_strided": (2, 2, 33, 19, 16, 32, "elu", "float32", ("stepped", "tokens", "dmajor")),
    "nonpow2_d": (1, 2, 5, 9, 20, 12, "relu", "float32", ("dmajor", "contig", "tokens")),
    "nq_1": (2, 2, 1, 17, 16, 16, "elu", "float32", ("contig", "tokens", "tokens")),
    "nk_1": (2, 2, 17, 1, 16, 16, "elu", "float32", ("tokens", "contig", "contig")),
    "fp16": (2, 2, 37, 23, 16, 16, "elu", "float16", ("tokens", "tokens", "tokens")),
    "bf16": (2, 2, 19, 23, 32, 16, "elu", "bfloat16", ("contig", "tokens", "stepped")),
}


def _interp_case(name, seed):
    B, H, Nq, Nk, D, Dv, phi, dt, lay = INTERP_CASES[name]
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(seed)
    q = _make(gen, (B, H, Nq, D), dtype, lay[0])
    k = _make(gen, (B, H, Nk, D), dtype, lay[1])
    v = _make(gen, (B, H, Nk, Dv), dtype, lay[2])
    g = _make(gen, (B, H, Nq, Dv), dtype, "tokens")
    return q, k, v, g, phi


def _fwd_bwd(q, k, v, g, phi, impl):
    leaves = [strided_leaf(t) for t in (q, k, v)]
    out, state = linear_attention_with_state(*leaves, phi=phi, eps=1e-6, impl=impl)
    grads = torch.autograd.grad(out, leaves, g)
    return out.detach(), state.detach(), grads


def _interpreter_main(seed: int) -> None:
    """Subprocess body: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tm = importlib.import_module("fastproto.triton.linear_attention")
    _triton_pkg.POISON_OUTPUTS = True
    from triton.runtime.interpreter import InterpretedFunction

    kernels = (tm._la_state_kernel, tm._la_out_kernel, tm._la_bwd_q_kernel, tm._la_bwd_kv_kernel)
    results = {"_interpreted": all(isinstance(kf, InterpretedFunction) for kf in kernels)}
    for i, name in enumerate(INTERP_CASES):
        try:
            q, k, v, g, phi = _interp_case(name, seed + i)
            o_r, s_r, g_r = _fwd_bwd(q, k, v, g, phi, "reference")
            o_t, s_t, g_t = _fwd_bwd(q, k, v, g, phi, "triton")
            want64, _ = _expected64(q, k, v, phi, 1e-6)
            results[name] = {
                "shape_ok": tuple(o_t.shape) == tuple(o_r.shape) and all(
                    a.shape == b.shape for a, b in zip(g_t, g_r)),
                "dtype_ok": o_t.dtype == q.dtype and all(a.dtype == q.dtype for a in g_t),
                "finite": bool(torch.isfinite(o_t).all()) and all(bool(torch.isfinite(a).all()) for a in g_t),
                "out": rel_err(o_t, o_r), "out64": rel_err(o_t, want64), "state": rel_err(s_t, s_r),
                "dq": rel_err(g_t[0], g_r[0], 1.0), "dk": rel_err(g_t[1], g_r[1], 1.0),
                "dv": rel_err(g_t[2], g_r[2], 1.0),
            }
        except Exception as exc:  # noqa: BLE001  (report; the parent test fails with the message)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # NaN propagation through the kernels
    q, k, v, g, phi = _interp_case("self_37_d16", seed)
    q = q.clone()
    q[1, 0, 5, 3] = float("nan")
    out = linear_attention(q, k, v, impl="triton")
    mask = torch.zeros(out.shape, dtype=torch.bool)
    mask[1, 0, 5] = True
    results["_nan_row"] = bool(torch.isnan(out[mask]).all()) and bool(torch.isfinite(out[~mask]).all())
    # unsupported head dim: forced triton refuses with the reason
    big = torch.randn(1, 1, 3, 160)
    try:
        linear_attention(big, big, big, impl="triton")
        results["_big_refused"] = False
    except RuntimeError as exc:
        results["_big_refused"] = "exceed" in str(exc)
    # the module through the Triton path (packed qkv views, no copies) vs the reference path
    torch.manual_seed(seed)
    m = LinearAttention(64, num_heads=4, impl="triton")
    x = torch.randn(2, 29, 64)
    o_t, kv_t = m(x)
    m.impl = "reference"
    o_r, kv_r = m(x)
    results["_module"] = {"out": rel_err(o_t, o_r), "kv": rel_err(kv_t, kv_r)}
    _interpreter.emit(results)


interpreter_results = _interpreter.results_fixture(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_triton_interpreter_matches_reference(name, interpreter_results):
    seed, res = interpreter_results
    r = res[name]
    assert "error" not in r, f"{name}: {r.get('error')} (seed={seed})"
    assert r["shape_ok"] and r["dtype_ok"] and r["finite"], f"{name}: {r} (seed={seed})"
    tol = 1e-5 if INTERP_CASES[name][7] == "float32" else 1e-2
    for key in ("out", "out64", "state", "dq", "dk", "dv"):
        assert r[key] <= tol, f"{name}: {key} rel err {r[key]:.2e} > {tol} (seed={seed})"


def test_triton_interpreter_nan_unsupported_module(interpreter_results):
    seed, res = interpreter_results
    assert res["_nan_row"], f"NaN did not propagate to exactly its output row (seed={seed})"
    assert res["_big_refused"], f"head dim 160 not refused with a reason (seed={seed})"
    assert res["_module"]["out"] <= 1e-5 and res["_module"]["kv"] <= 1e-5, f"{res['_module']} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# compiled linear_attention_forward / _backward: the per-row routines shared by the CUDA and CPU kernels,
# run by the CPU kernels
# ----------------------------------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(not _ext.has_op(ops_la.COMPILED_OP, "cpu"),
                                    reason="compiled extension with linear_attention_forward not built")


def _compiled_fwd_bwd(q, k, v, g, phi, eps=1e-6):
    """Output and gradients through the autograd Function with the compiled kernel pair, as
    linear_attention(impl="cuda") runs it (here on the extension's CPU kernels)."""
    leaves = [strided_leaf(t) for t in (q, k, v)]
    out, _ = ops_la._LinearAttentionFn.apply(ops_la._KERNELS["cuda"], *leaves, phi, eps, False)
    return out.detach(), torch.autograd.grad(out, leaves, g)


def _gradient_error(got, want, scale):
    """max |got - want| / max(1, scale) elementwise, ``scale`` the float64 magnitude of the terms a float32
    gradient is the difference of (where they cancel, float32 can do no better than their size times its
    epsilon; relu with few keys makes phi(q)·z tiny and the cancelled terms large)."""
    return float(((got.double() - want).abs() / scale.clamp_min(1.0)).max()) if want.numel() else 0.0


def _cancellation_scales(q, k, v, g, phi, eps):
    """Float64 sizes of the terms summed into dq = phi'(q) r (u - w z), dk = phi'(k) (dS v + dz) and
    dv = phi(k) dS (see kernels/linear_attention_row.h), per element: the scale of the rounding of each."""
    q, k, v, g = (t.detach().double() for t in (q, k, v, g))
    f, fk = _phi64(q, phi), _phi64(k, phi)
    dphi = lambda x: torch.where(x > 0, torch.ones_like(x), torch.exp(x) if phi == "elu" else torch.zeros_like(x))
    S, z = fk.transpose(-2, -1) @ v, fk.sum(-2)
    r = 1.0 / ((f * z.unsqueeze(-2)).sum(-1) + eps)
    u = g @ S.transpose(-2, -1)
    w = r * (f * u).sum(-1)
    scale_q = dphi(q).abs() * r.abs().unsqueeze(-1) * (u.abs() + (w.unsqueeze(-1) * z.unsqueeze(-2)).abs())
    a = r.unsqueeze(-1).abs() * f
    dS = a.transpose(-2, -1) @ g.abs()  # |a|^T |g|: the size of the terms of dS
    scale_k = dphi(k).abs() * (v.abs() @ dS.transpose(-2, -1) + (a * w.abs().unsqueeze(-1)).sum(-2).unsqueeze(-2))
    return scale_q, scale_k, fk.abs() @ dS


needs_compiled_backward = pytest.mark.skipif(not _ext.has_op(ops_la.COMPILED_BACKWARD_OP, "cpu"),
                                             reason="compiled extension with linear_attention_backward not built")


@needs_compiled_backward
@pytest.mark.parametrize("phi", ["elu", "relu"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_compiled_backward_matches_float64(case, phi, dtype, tol, rng, poisoned):
    """dq, dk, dv of the compiled backward vs autograd through the float64 einsum restatement, for every
    case (Nq != Nk, D != Dv, Nq = 1, Nk = 1) in every layout of q, k, v and grad_out."""
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    for layout, q, k, v, g in _layout_inputs(gen, CASES[case], dtype):
        out, grads = _compiled_fwd_bwd(q, k, v, g, phi)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        want_out, _ = _expected64(*leaves, phi, 1e-6)
        want = torch.autograd.grad(want_out, leaves, g.double())
        assert rel_err(out, want_out) <= tol, f"{case} {layout}: out (seed={seed})"
        scales = _cancellation_scales(q, k, v, g, phi, 1e-6)
        for name, a, b, t, scale in zip("qkv", grads, want, (q, k, v), scales):
            assert a.dtype == dtype and a.shape == t.shape, name
            err = _gradient_error(a, b, scale)
            assert err <= tol, f"{case} {phi} {dtype} {layout}: d{name} rel err {err:.2e} > {tol} (seed={seed})"


@needs_compiled_backward
@pytest.mark.parametrize("phi", ["elu", "relu"])
def test_compiled_backward_nan_and_eps(phi, rng, poisoned):
    """A NaN query spoils its own dq row and, through the state gradient, its head's dk and dv (as the
    reference's autograd); other heads stay finite. eps = 0 (Dinomaly) and a large eps match too."""
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (_make(gen, s) for s in [(2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 4), (2, 2, 5, 4)])
    q[0, 1, 3, 2] = float("nan")
    _, (dq, dk, dv) = _compiled_fwd_bwd(q, k, v, g, phi)
    leaves = [strided_leaf(t) for t in (q, k, v)]
    want = torch.autograd.grad(ref.linear_attention(*leaves, phi=phi, eps=1e-6), leaves, g)
    for name, a, b in zip("qkv", (dq, dk, dv), want):
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"d{name} NaN pattern (seed={seed})"
        assert rel_err(torch.nan_to_num(a), torch.nan_to_num(b), 1.0) <= 1e-5, f"d{name} (seed={seed})"
    assert torch.isnan(dq[0, 1, 3]).any() and torch.isfinite(dq[1]).all() and torch.isfinite(dk[0, 0]).all()
    q[0, 1, 3, 2] = 0.5  # not 0: there relu's derivative is a convention (torch: 0, the clamp restatement: 1)
    for t in (q, k):  # phi(q)·z > 0 for every query: with eps = 0 a zero denominator is 0 / 0 (NaN) in every path
        t[..., 0] = t[..., 0].abs() + 0.1
    for eps in (0.0, 0.5):
        _, got = _compiled_fwd_bwd(q, k, v, g, phi, eps)
        leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
        want = torch.autograd.grad(_expected64(*leaves, phi, eps)[0], leaves, g.double())
        for name, a, b, scale in zip("qkv", got, want, _cancellation_scales(q, k, v, g, phi, eps)):
            assert _gradient_error(a, b, scale) <= 1e-5, f"eps={eps} d{name} (seed={seed})"


@needs_compiled
def test_compiled_forward_nan_and_eps(rng, poisoned):
    gen = torch.Generator().manual_seed(_seed(rng))
    q, k, v = (_make(gen, s) for s in [(2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 4)])
    q2 = q.clone()
    q2[0, 1, 3, 2] = float("nan")
    out = ops_la._compiled_forward(q2, k, v, "elu", 1e-6)[0]
    nan_mask = torch.zeros_like(out, dtype=torch.bool)
    nan_mask[0, 1, 3] = True
    assert torch.isnan(out[nan_mask]).all() and torch.isfinite(out[~nan_mask]).all()
    for phi in ("elu", "relu"):
        k2 = k.clone()
        k2[1, 0, 4, 0] = float("nan")
        out = ops_la._compiled_forward(q, k2, v, phi, 1e-6)[0]
        assert torch.isnan(out[1, 0]).all() and torch.isfinite(out[0]).all(), phi
    # relu of all-negative queries: 0 / (0 + eps) = 0, as the reference
    out = ops_la._compiled_forward(-q.abs() - 1, k, v, "relu", 0.5)[0]
    assert torch.equal(out, ref.linear_attention(-q.abs() - 1, k, v, phi="relu", eps=0.5))


@needs_compiled
def test_compiled_forward_argument_errors():
    op = _ext.op(ops_la.COMPILED_OP)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    out, st, ks = torch.empty(2, 3, 5, 4), torch.empty(2, 3, 8, 4), torch.empty(2, 3, 8)
    cases = [
        ((q[0], k, v, 0, 1e-6, out, st, ks), "must be \\[B,H,N,D\\]"),
        ((q.double(), k.double(), v.double(), 0, 1e-6, out.double(), st, ks), "float32, float16 or bfloat16"),
        ((q, k.half(), v, 0, 1e-6, out, st, ks), "q's dtype"),
        ((q, torch.randn(2, 4, 6, 8), v, 0, 1e-6, out, st, ks), "share batch and heads"),
        ((q, torch.randn(2, 3, 6, 7), v, 0, 1e-6, out, st, ks), "head dim"),
        ((q, k, torch.randn(2, 3, 5, 4), 0, 1e-6, out, st, ks), "tokens"),
        ((q, k, v, 2, 1e-6, out, st, ks), "phi must be"),
        ((q, k, v, 0, -1.0, out, st, ks), "eps must be"),
        ((q, k, v, 0, 1e-6, torch.empty(2, 3, 5, 8), st, ks), "out must be"),
        ((q, k, v, 0, 1e-6, out, st.double(), ks), "state must be"),
        ((q, k, v, 0, 1e-6, out, st, torch.empty(2, 3, 4)), "ksum must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


@needs_compiled_backward
def test_compiled_backward_argument_errors():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 4)
    _, st, ks = ops_la._compiled_forward(q, k, v, "elu", 1e-6)
    g = torch.randn(2, 3, 5, 4)
    expect_errors(_ext.op(ops_la.COMPILED_BACKWARD_OP),
                  (q, k, v, st, ks, g, 0, 1e-6, torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)), [
                      (5, torch.randn(2, 3, 5, 8), "grad_out must be"),
                      (5, g.half(), "grad_out must be"),
                      (3, st.transpose(-1, -2), "state must be"),
                      (4, ks.double(), "ksum must be"),
                      (8, torch.empty(2, 3, 5, 4), "grad_q must be"),
                      (9, torch.empty_like(k).half(), "grad_k must be"),
                      (10, torch.empty(2, 3, 6, 8), "grad_v must be"),
                      (6, 5, "phi must be"),
                      (7, float("inf"), "eps must be"),
                  ])


# ----------------------------------------------------------------------------------------------
# GPU, real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("phi", ["elu", "relu"])
@pytest.mark.parametrize("impl", ["triton", "cuda"])
def test_gpu_matches_reference_real_shapes(impl, dtype, tol, phi, rng, poisoned):
    """Triton and compiled forward and backward at B=16, H=12, N=789, D=64 (Dinomaly ViT-B), q/k/v as views of
    a packed qkv projection, vs the reference; impl="auto" takes Triton."""
    if impl == "triton":
        if os.environ.get("TRITON_INTERPRET") == "1":
            pytest.skip("TRITON_INTERPRET=1 would run the kernels in the interpreter")
        from fastproto import triton as tpkg

        if not tpkg.is_available():
            pytest.skip("triton is not installed")
    elif not _ext.has_op(ops_la.COMPILED_BACKWARD_OP, "cuda"):
        pytest.skip("the compiled extension has no CUDA kernel")
    seed = _seed(rng)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, H, N, D = 16, 12, 789, 64
    qkv = torch.randn(B, N, 3, H, D, device="cuda", generator=gen).to(dtype).permute(2, 0, 3, 1, 4)
    g = torch.randn(B, H, N, D, device="cuda", generator=gen).to(dtype)
    o_k, s_k, g_k = _fwd_bwd(qkv[0], qkv[1], qkv[2], g, phi, impl)
    o_r, s_r, g_r = _fwd_bwd(qkv[0], qkv[1], qkv[2], g, phi, "reference")
    if impl == "triton":
        assert torch.equal(linear_attention(qkv[0], qkv[1], qkv[2], phi=phi), o_k), \
            f"impl='auto' did not take the Triton path (seed={seed})"
    assert torch.isfinite(o_k).all() and all(torch.isfinite(a).all() for a in g_k), f"seed={seed}"
    for key, a, b in (("out", o_k, o_r), ("state", s_k, s_r), ("dq", g_k[0], g_r[0]),
                      ("dk", g_k[1], g_r[1]), ("dv", g_k[2], g_r[2])):
        err = rel_err(a, b, 1.0 if key.startswith("d") else 1e-30)
        assert err <= tol, f"{impl} {dtype} {phi} {key}: rel err {err:.2e} > {tol} (seed={seed})"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
