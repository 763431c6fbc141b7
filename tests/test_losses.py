"""Mining cosine losses and the INP coherence loss (DESIGN "Ops" item 5).

- the fused op (analytic backward) and the hook-based reference vs in-test re-statements of the
  official functions (Dinomaly ``global_cosine_hm_percent``, INP-Former ``global_cosine_hm_adaptive``,
  both with their gradient hooks): value and decoder gradient, float64 to 1e-10, float32 to 1e-5,
  [B, C, H, W] maps and [B, N, C] tokens, fresh random inputs;
- limits: gamma = 0 and hard_fraction = 0 give the plain global cosine gradient; the encoder never
  gets a gradient; NaN propagates;
- ``coherence_loss`` vs an explicit float64 computation, gradient vs autograd of the reference;
- bad inputs raise clear errors.
"""
from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

from fastproto import ops
from fastproto.ops.losses import coherence_loss, cosine_mining_loss

_ref = importlib.import_module("fastproto.reference.losses")
_ref_proto = importlib.import_module("fastproto.reference.prototype")

TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-10}, torch.float32: {"atol": 1e-5, "rtol": 1e-5}}


# ------------------------------------------------------------------------------------------------
# in-test re-statements of the official losses (hook mechanism included); inputs [B, C, ...]
# ------------------------------------------------------------------------------------------------


def _hook_mask(g, mask, factor):
    g[mask.expand_as(g)] *= factor
    return g


def _hook_mul(g, w):
    g *= w.expand_as(g)
    return g


def _official_plain(a, b):
    cos = torch.nn.CosineSimilarity()
    total = 0
    for x, y in zip(a, b):
        n = x.shape[0]
        total += torch.mean(1 - cos(x.detach().reshape(n, -1), y.reshape(n, -1)))
    return total / len(a)


def _official_hm_percent(a, b, p, factor):
    """Dinomaly: grads of positions with d below the k-th largest d (k = int(n (1 - p))) x factor."""
    cos = torch.nn.CosineSimilarity()
    total = 0
    for x, y in zip(a, b):
        x = x.detach()
        with torch.no_grad():
            dist = 1 - cos(x, y).unsqueeze(1)
        kth = torch.topk(dist.reshape(-1), k=int(dist.numel() * (1 - p)))[0][-1]
        n = x.shape[0]
        total += torch.mean(1 - cos(x.reshape(n, -1), y.reshape(n, -1)))
        y.register_hook(partial(_hook_mask, mask=dist < kth, factor=factor))
    return total / len(a)


def _official_hm_adaptive(a, b, y_exp):
    """INP-Former: grads x (d / mean d) ** y."""
    cos = torch.nn.CosineSimilarity()
    total = 0
    for x, y in zip(a, b):
        x = x.detach()
        with torch.no_grad():
            dist = 1 - cos(x, y).unsqueeze(1).detach()
        w = (dist / dist.mean()) ** y_exp
        n = x.shape[0]
        total += torch.mean(1 - cos(x.reshape(n, -1), y.reshape(n, -1)))
        y.register_hook(partial(_hook_mul, w=w))
    return total / len(a)


def _channels_first(t):
    """[B, N, C] tokens -> [B, C, N] (a view, so gradients reach the tokens); maps unchanged."""
    return t.permute(0, 2, 1) if t.dim() == 3 else t


def _make(shapes, dtype, gen, noise=0.7):
    enc = [torch.randn(s, dtype=torch.float64, generator=gen) for s in shapes]
    dec = [e + noise * torch.randn(s, dtype=torch.float64, generator=gen) for e, s in zip(enc, shapes)]
    return [e.to(dtype) for e in enc], [d.to(dtype) for d in dec]


def _run(fn, enc, dec):
    leaves = [d.clone().requires_grad_() for d in dec]
    encs = [e.clone().requires_grad_() for e in enc]
    val = fn(encs, leaves)
    val.backward()
    return val.detach(), [d.grad for d in leaves], [e.grad for e in encs]


SHAPE_SETS = [
    [(2, 16, 7, 7), (2, 16, 7, 7)],  # two groups of maps (Dinomaly/INP: 2 groups)
    [(3, 9, 5, 6)],  # single group, odd sizes
    [(2, 13, 24), (2, 13, 24), (2, 13, 24)],  # [B, N, C] tokens, three groups
]


@pytest.fixture
def gen(rng):
    return torch.Generator().manual_seed(int(rng.integers(0, 2**31 - 1)))


def _official(mode, gamma, p, factor):
    def f(a, b):
        a, b = [_channels_first(t) for t in a], [_channels_first(t) for t in b]
        if mode == "soft":
            return _official_hm_adaptive(a, b, gamma)
        return _official_hm_percent(a, b, p, factor)
    return f


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPE_SETS)
@pytest.mark.parametrize("mode,gamma,p,factor", [("soft", 3.0, 0.9, 0.1), ("soft", 1.7, 0.9, 0.1),
                                                 ("hard", 3.0, 0.9, 0.1), ("hard", 3.0, 0.45, 0.1),
                                                 ("hard", 3.0, 0.2, 0.37)])
@pytest.mark.parametrize("impl", ["auto", "fused", "reference"])
def test_matches_official(dtype, shapes, mode, gamma, p, factor, impl, gen):
    enc, dec = _make(shapes, dtype, gen)
    want_v, want_g, _ = _run(_official(mode, gamma, p, factor), enc, dec)
    got_v, got_g, got_eg = _run(lambda a, b: cosine_mining_loss(a, b, mode=mode, gamma=gamma, hard_fraction=p,
                                                                hard_factor=factor, impl=impl), enc, dec)
    assert got_v.dtype == dtype and got_v.shape == ()
    torch.testing.assert_close(got_v, want_v, **TOL[dtype])
    for g, w in zip(got_g, want_g):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **TOL[dtype])
    assert all(g is None for g in got_eg), "the encoder side must be detached"


def test_mining_changes_gradient_not_value(gen):
    enc, dec = _make(SHAPE_SETS[0], torch.float64, gen)
    plain_v, plain_g, _ = _run(_official_plain, enc, dec)
    for mode in ("soft", "hard"):
        v, g, _ = _run(partial(cosine_mining_loss, mode=mode), enc, dec)
        torch.testing.assert_close(v, plain_v, **TOL[torch.float64])
        assert not torch.allclose(g[0], plain_g[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shapes", SHAPE_SETS)
def test_limits_reduce_to_plain_loss(dtype, shapes, gen):
    enc, dec = _make(shapes, dtype, gen)
    want_v, want_g, _ = _run(lambda a, b: _official_plain([_channels_first(t) for t in a],
                                                          [_channels_first(t) for t in b]), enc, dec)
    for kw in ({"mode": "soft", "gamma": 0.0}, {"mode": "hard", "hard_fraction": 0.0},
               {"mode": "hard", "hard_factor": 1.0}):
        for impl in ("fused", "reference"):
            v, g, _ = _run(partial(cosine_mining_loss, impl=impl, **kw), enc, dec)
            torch.testing.assert_close(v, want_v, **TOL[dtype])
            for x, y in zip(g, want_g):
                torch.testing.assert_close(x, y, **TOL[dtype])


def test_strided_inputs_and_dinomaly_ramp(gen):
    # channels-last maps (as produced by a token -> map reshape) and the Dinomaly p schedule
    enc, dec = _make([(2, 7, 6, 12)], torch.float64, gen)
    enc = [e.permute(0, 3, 1, 2) for e in enc]  # [2, 12, 7, 6], non-contiguous
    dec = [d.permute(0, 3, 1, 2) for d in dec]
    for it in (0, 1, 500, 999, 1000, 5000):
        p = min(0.9 * it / 1000, 0.9)
        want_v, want_g, _ = _run(_official("hard", 3.0, p, 0.1), enc, dec)
        got_v, got_g, _ = _run(partial(cosine_mining_loss, mode="hard", hard_fraction=p), enc, dec)
        torch.testing.assert_close(got_v, want_v, **TOL[torch.float64])
        torch.testing.assert_close(got_g[0], want_g[0], **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype, gen):
    enc, dec = _make(SHAPE_SETS[0], torch.float32, gen)
    want_v, want_g, _ = _run(lambda a, b: cosine_mining_loss(a, b), [e.to(dtype).float() for e in enc],
                             [d.to(dtype).float() for d in dec])
    v, g, _ = _run(lambda a, b: cosine_mining_loss(a, b), [e.to(dtype) for e in enc], [d.to(dtype) for d in dec])
    assert v.dtype == dtype and g[0].dtype == dtype
    torch.testing.assert_close(v.float(), want_v, atol=2e-2, rtol=2e-2)
    for x, y in zip(g, want_g):
        torch.testing.assert_close(x.float(), y, atol=2e-2 * y.abs().max().item(), rtol=5e-2)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_nan_propagates(mode, gen):
    enc, dec = _make(SHAPE_SETS[0], torch.float32, gen)
    dec[1][1, 3, 2, 2] = float("nan")
    v, g, _ = _run(partial(cosine_mining_loss, mode=mode), enc, dec)
    assert torch.isnan(v)
    assert torch.isnan(g[1][1]).any()


def test_no_grad_and_exports():
    assert ops.cosine_mining_loss is cosine_mining_loss and ops.coherence_loss is coherence_loss
    e = [torch.randn(2, 4, 3, 3)]
    with torch.no_grad():
        v = cosine_mining_loss(e, [e[0] + 1], mode="hard", hard_fraction=0.5)
    assert v.shape == () and torch.isfinite(v)


# ------------------------------------------------------------------------------------------------
# coherence loss
# ------------------------------------------------------------------------------------------------


def _explicit_coherence(f, p):
    f = f.double()
    p = p.double()
    B, N, _ = f.shape
    total = 0.0
    for b in range(B):
        bank = p if p.dim() == 2 else p[b]
        for n in range(N):
            best = min(1.0 - float(torch.dot(f[b, n], q) / (max(f[b, n].norm(), 1e-8) * max(q.norm(), 1e-8)))
                       for q in bank)
            total += best
    return total / (B * N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bank", ["shared", "batch"])
def test_coherence_loss(dtype, bank, gen):
    B, N, M, C = 2, 11, 6, 16
    f = torch.randn(B, N, C, dtype=torch.float64, generator=gen).to(dtype)
    pshape = (M, C) if bank == "shared" else (B, M, C)
    p = torch.randn(pshape, dtype=torch.float64, generator=gen).to(dtype)
    fr, pr = f.clone().requires_grad_(), p.clone().requires_grad_()
    v = coherence_loss(fr, pr)
    assert v.shape == () and v.dtype == dtype
    assert abs(v.item() - _explicit_coherence(f, p)) < TOL[dtype]["atol"]
    v.backward()
    fw, pw = f.clone().requires_grad_(), p.clone().requires_grad_()
    dist, _ = _ref_proto.route(fw, pw, mode="nearest")
    dist.mean().backward()
    torch.testing.assert_close(fr.grad, fw.grad, **TOL[dtype])
    torch.testing.assert_close(pr.grad, pw.grad, **TOL[dtype])
    # the reference module agrees as well
    torch.testing.assert_close(_ref.coherence_loss(f, p), v.detach(), **TOL[dtype])


def test_coherence_loss_matches_torch_min(gen):
    # INP-Former gather_loss: 1 - F.cosine_similarity(q.unsqueeze(2), k.unsqueeze(1), dim=-1), min over m, mean
    f = torch.randn(2, 9, 8, dtype=torch.float64, generator=gen)
    p = torch.randn(2, 6, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    want = (1 - torch.nn.functional.cosine_similarity(f.unsqueeze(2), p.unsqueeze(1), dim=-1)).min(2)[0].mean()
    want.backward()
    pg = p.grad.clone()
    p.grad = None
    got = coherence_loss(f, p)
    got.backward()
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(p.grad, pg, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------


def test_bad_inputs():
    e = [torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)]
    d = [x + 0.1 for x in e]
    with pytest.raises(ValueError, match="groups"):
        cosine_mining_loss(e, d[:1])
    with pytest.raises(ValueError, match="no layer groups"):
        cosine_mining_loss([], [])
    with pytest.raises(TypeError, match="list or tuple"):
        cosine_mining_loss(e[0], d[0])
    with pytest.raises(ValueError, match="shape"):
        cosine_mining_loss(e, [d[0], d[1][:, :, :2]])
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        cosine_mining_loss([torch.randn(2, 4)], [torch.randn(2, 4)])
    with pytest.raises(TypeError, match="dtype"):
        cosine_mining_loss(e, [d[0].double(), d[1]])
    with pytest.raises(TypeError, match="float"):
        cosine_mining_loss([x.int() for x in e], [x.int() for x in d])
    with pytest.raises(ValueError, match="mode"):
        cosine_mining_loss(e, d, mode="focal")
    with pytest.raises(ValueError, match="gamma"):
        cosine_mining_loss(e, d, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        cosine_mining_loss(e, d, gamma=float("nan"))
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="hard_fraction"):
            cosine_mining_loss(e, d, mode="hard", hard_fraction=bad)
    with pytest.raises(ValueError, match="positions"):  # k = int(18 * 0.05) = 0: the official topk would fail
        cosine_mining_loss(e, d, mode="hard", hard_fraction=0.95)
    with pytest.raises(ValueError, match="impl"):
        cosine_mining_loss(e, d, impl="triton")
    with pytest.raises(ValueError, match="C="):
        coherence_loss(torch.randn(2, 5, 8), torch.randn(6, 7))


def test_coherence_loss_per_sample_bank_when_batch_equals_tokens():
    """B == N: a [B, M, C] bank is per-sample for the coherence loss (route alone would call it ambiguous)."""
    x = torch.randn(4, 4, 8)
    p = torch.randn(4, 3, 8)
    want = (1 - torch.nn.functional.cosine_similarity(x[:, :, None], p[:, None], dim=-1)).amin(-1).mean()
    for impl in ("auto", "reference"):
        torch.testing.assert_close(coherence_loss(x, p, impl=impl), want)
