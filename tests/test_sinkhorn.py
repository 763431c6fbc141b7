"""Batched log-domain Sinkhorn and the OT alignment loss (DESIGN "Ops" item 4).

- reference vs an independent float64 numpy log-domain restatement (its own loop, run to 1e-13),
  fresh seeds, uniform and given marginals, K = 1, K = 64, N not a multiple of the kernel's blocks;
- the plan's marginals match ``a`` and ``b`` to ``tol`` at convergence;
- the envelope gradient ``dloss/dcost = plan`` vs central finite differences of the converged loss
  (float64);
- ``ot_alignment_loss`` gradients vs autograd through ``<T, C> + eps sum T log T`` with the
  reference's converged plan held fixed and an independently written cost;
- Triton vs reference under the Triton interpreter, in a subprocess with TRITON_INTERPRET=1 set
  before triton is imported (this file is the subprocess script, see ``__main__``), every buffer the
  Triton path allocates poisoned with NaN and one strided cost read as a view into NaN storage;
- the compiled extension's solver (``kernels/sinkhorn_solver.h``, shared by its CUDA and CPU kernels) through
  its CPU kernel vs the reference: the interpreter cases plus NaN, the iteration cap, the gradient through
  the autograd Function, argument errors;
- GPU tests at B = 64, N = 1024, K in {2, 8, 64} for Triton and the CUDA kernel (skipped without CUDA).
"""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from tests import _interpreter
from tests._tensors import rel_err, strided_leaf
from fastproto import _ext
from fastproto import triton as _triton_pkg  # noqa: E402  (POISON_OUTPUTS switch)
from fastproto.ops import ot_alignment_loss, sinkhorn

ops_sk = importlib.import_module("fastproto.ops.sinkhorn")

ref = importlib.import_module("fastproto.reference.sinkhorn")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _seed(rng) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _lse(x, axis):
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def _numpy_sinkhorn(C, a, b, eps, tol=1e-13, max_iters=20000):
    """Independent float64 restatement: plain alternating log-domain updates per problem until both
    marginal errors are < tol. Returns (plan, loss)."""
    C = np.asarray(C, dtype=np.float64)
    plans, losses = [], []
    for c, aa, bb in zip(C, a, b):
        la, lb = np.log(aa), np.log(bb)
        f = np.zeros(c.shape[0])
        g = np.zeros(c.shape[1])
        for _ in range(max_iters):
            f = eps * la - eps * _lse((g[None, :] - c) / eps, axis=1)
            g = eps * lb - eps * _lse((f[:, None] - c) / eps, axis=0)
            t = np.exp((f[:, None] + g[None, :] - c) / eps)
            if max(np.abs(t.sum(1) - aa).max(), np.abs(t.sum(0) - bb).max()) < tol:
                break
        log_t = (f[:, None] + g[None, :] - c) / eps
        t = np.exp(log_t)
        plans.append(t)
        losses.append(float((t * c).sum() + eps * (t * log_t).sum()))
    return np.stack(plans), np.array(losses)


def _marginals(gen, B, N, K, given, dtype=torch.float64):
    if not given:
        return None, None, np.full((B, N), 1.0 / N), np.full((B, K), 1.0 / K)
    a = torch.rand(B, N, generator=gen, dtype=torch.float64) + 0.2
    b = torch.rand(B, K, generator=gen, dtype=torch.float64) + 0.2
    a = a / a.sum(1, keepdim=True)
    b = b / b.sum(1, keepdim=True)
    return a.to(dtype), b.to(dtype), a.numpy(), b.numpy()



# (B, N, K, given marginals, eps)
CASES = {
    "uniform": (3, 37, 5, False, 0.05),
    "given": (2, 29, 7, True, 0.1),
    "k1": (2, 13, 1, True, 0.05),
    "k64": (2, 70, 64, False, 0.1),
    "n_odd_blocks": (2, 300, 3, True, 0.2),
    "n1": (2, 1, 6, True, 0.05),
}


# ----------------------------------------------------------------------------------------------
# reference vs numpy float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_numpy_float64(case, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, N, K, given, eps = CASES[case]
    cost = torch.rand(B, N, K, generator=gen, dtype=torch.float64)
    a, b, a_np, b_np = _marginals(gen, B, N, K, given)
    want_plan, want_loss = _numpy_sinkhorn(cost.numpy(), a_np, b_np, eps)
    plan, loss = sinkhorn(cost, eps=eps, n_iters=20000, tol=1e-13, a=a, b=b)
    assert plan.dtype == torch.float64 and plan.shape == (B, N, K) and loss.shape == (B,)
    assert rel_err(plan, want_plan) <= 1e-8, f"{case}: plan (seed={seed})"
    assert rel_err(loss, want_loss) <= 1e-8, f"{case}: loss (seed={seed})"
    # float32 at a float32-sized tolerance
    a32 = None if a is None else a.float()
    b32 = None if b is None else b.float()
    plan32, loss32 = sinkhorn(cost.float(), eps=eps, n_iters=5000, tol=1e-7, a=a32, b=b32)
    assert plan32.dtype == torch.float32
    assert rel_err(plan32, want_plan) <= 2e-3, f"{case}: float32 plan (seed={seed})"
    assert float(np.abs(loss32.double().numpy() - want_loss).max()) <= 1e-4, f"{case}: float32 loss (seed={seed})"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_computed_in_float32(dtype, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(2, 21, 6, generator=gen).to(dtype)
    plan, loss = sinkhorn(cost, eps=0.1, n_iters=1000)
    want_plan, want_loss = sinkhorn(cost.float(), eps=0.1, n_iters=1000)
    assert plan.dtype == dtype and loss.dtype == dtype
    assert rel_err(plan, want_plan) <= 1e-2 and rel_err(loss, want_loss) <= 1e-2, f"seed={seed}"


@pytest.mark.parametrize("case", ["uniform", "given", "k64"])
def test_marginals_at_convergence(case, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, N, K, given, eps = CASES[case]
    cost = torch.rand(B, N, K, generator=gen, dtype=torch.float64)
    a, b, a_np, b_np = _marginals(gen, B, N, K, given)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-6)):
        aa = None if a is None else a.to(dtype)
        bb = None if b is None else b.to(dtype)
        plan, _ = sinkhorn(cost.to(dtype), eps=eps, n_iters=10000, tol=tol, a=aa, b=bb)
        plan = plan.double()
        row_err = float((plan.sum(2) - torch.from_numpy(a_np)).abs().max())
        col_err = float((plan.sum(1) - torch.from_numpy(b_np)).abs().max())
        slack = 0 if dtype == torch.float64 else 1e-6  # float32 rounding of the column sums
        assert row_err < tol + slack and col_err < tol + slack, f"{case} {dtype}: {row_err} {col_err} (seed={seed})"


def test_iterations_stop_early_and_cap(rng):
    gen = torch.Generator().manual_seed(_seed(rng))
    cost = torch.rand(3, 20, 4, generator=gen, dtype=torch.float64)
    la, lb = ref.log_marginals(cost, None, None, torch.float64)
    _, _, iters = ref.sinkhorn_potentials(cost, la, lb, eps=0.5, n_iters=1000, tol=1e-6)
    assert (iters < 1000).all() and (iters >= 1).all()
    _, _, iters = ref.sinkhorn_potentials(cost, la, lb, eps=0.01, n_iters=3, tol=0.0)
    assert (iters == 3).all()


@pytest.mark.parametrize("given", [False, True])
def test_tol_zero_matches_the_tracked_loop(given, rng):
    """tol = 0 skips the convergence error (no problem can stop early): bit for bit the potentials of
    the tracked loop run with a tolerance that no problem reaches."""
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, N, K = 3, 23, 5
    cost = torch.rand(B, N, K, generator=gen, dtype=torch.float64)
    a, b, _, _ = _marginals(gen, B, N, K, given)
    la, lb = ref.log_marginals(cost, a, b, torch.float64)
    f0, g0, it0 = ref.sinkhorn_potentials(cost, la, lb, eps=0.05, n_iters=40, tol=0.0)
    f1, g1, it1 = ref.sinkhorn_potentials(cost, la, lb, eps=0.05, n_iters=40, tol=1e-300)
    assert it0.tolist() == [40] * B and it1.tolist() == [40] * B, f"seed={seed}"
    assert torch.equal(f0, f1) and torch.equal(g0, g1), f"seed={seed}"


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [False, True])
def test_envelope_gradient_matches_finite_differences(given, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, N, K, eps = 2, 6, 4, 0.1
    cost = torch.rand(B, N, K, generator=gen, dtype=torch.float64)
    a, b, _, _ = _marginals(gen, B, N, K, given)
    kw = {"eps": eps, "n_iters": 20000, "tol": 1e-14, "a": a, "b": b}
    c = cost.clone().requires_grad_(True)
    plan, loss = sinkhorn(c, **kw)
    assert not plan.requires_grad, "the plan must be detached"
    w = torch.tensor([1.0, -0.7], dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * w).sum(), c)
    assert torch.equal(grad, plan * w[:, None, None])
    h = 1e-6
    fd = torch.zeros_like(cost)
    for idx in np.ndindex(B, N, K):
        cp, cm = cost.clone(), cost.clone()
        cp[idx] += h
        cm[idx] -= h
        fd[idx] = (sinkhorn(cp, **kw)[1] - sinkhorn(cm, **kw)[1]).dot(w) / (2 * h)
    err = float((fd - grad).abs().max())
    assert err <= 1e-6, f"envelope gradient vs finite differences: {err:.2e} (seed={seed})"


def _pairwise_sq(x, p):
    """||x_i - p_k||^2 written by broadcasting (independent of the library's expansion)."""
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(x.shape[0], -1, -1)
    return ((x[:, :, None, :] - p[:, None, :, :]) ** 2).sum(-1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_ot_alignment_loss_gradient(shared, normalize, rng):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    B, N, K, C, eps = 3, 11, 4, 5, 0.5 if not normalize else 0.05
    x = (0.5 * torch.randn(B, N, C, generator=gen, dtype=torch.float64)).requires_grad_(True)
    p = (0.5 * torch.randn(*((K, C) if shared else (B, K, C)), generator=gen, dtype=torch.float64)).requires_grad_(True)
    got = ot_alignment_loss(x, p, eps=eps, normalize=normalize, n_iters=20000, tol=1e-13)
    gx, gp = torch.autograd.grad(got, (x, p))
    # expected: autograd through the loss with the reference's converged plan held fixed
    xx = torch.nn.functional.normalize(x, dim=-1) if normalize else x
    pp = torch.nn.functional.normalize(p, dim=-1) if normalize else p
    cost = _pairwise_sq(xx, pp)
    plan, _ = ref.sinkhorn(cost.detach(), eps=eps, n_iters=20000, tol=1e-13)
    log_t = torch.log(plan)
    want = ((plan * cost).sum((1, 2)) + eps * (plan * log_t).sum((1, 2))).mean()
    wx, wp = torch.autograd.grad(want, (x, p))
    assert abs(float(got.detach()) - float(want.detach())) <= 1e-10 * max(1.0, abs(float(want.detach()))), f"value (seed={seed})"
    assert rel_err(gx, wx) <= 1e-8 and rel_err(gp, wp) <= 1e-8, f"grads (seed={seed})"


# ----------------------------------------------------------------------------------------------
# NaN, bad inputs
# ----------------------------------------------------------------------------------------------


def test_nan_propagates(rng):
    gen = torch.Generator().manual_seed(_seed(rng))
    cost = torch.rand(3, 9, 4, generator=gen)
    cost[1, 4, 2] = float("nan")
    c = cost.clone().requires_grad_(True)
    plan, loss = sinkhorn(c, n_iters=50)
    assert torch.isnan(plan[1]).all() and torch.isnan(loss[1])
    assert torch.isfinite(plan[[0, 2]]).all() and torch.isfinite(loss[[0, 2]]).all()
    loss.sum().backward()
    assert torch.isnan(c.grad[1]).all() and torch.isfinite(c.grad[[0, 2]]).all()
    x = torch.randn(2, 5, 3)
    x[0, 1, 1] = float("nan")
    assert torch.isnan(ot_alignment_loss(x, torch.randn(4, 3)))


def test_bad_inputs():
    c = torch.rand(2, 5, 3)
    a, b = torch.full((2, 5), 0.2), torch.full((2, 3), 1 / 3)
    cases = [
        ((c[0],), {}, ValueError, "cost must have rank 3"),
        (("c",), {}, TypeError, "cost must be a torch.Tensor"),
        ((c.long(),), {}, TypeError, "floating dtype"),
        ((torch.rand(2, 0, 3),), {}, ValueError, "N >= 1"),
        ((c,), {"eps": 0.0}, ValueError, "eps must be"),
        ((c,), {"eps": -1.0}, ValueError, "eps must be"),
        ((c,), {"eps": float("nan")}, ValueError, "eps must be"),
        ((c,), {"n_iters": 0}, ValueError, "n_iters must be"),
        ((c,), {"n_iters": 2.5}, ValueError, "n_iters must be"),
        ((c,), {"tol": -1e-3}, ValueError, "tol must be"),
        ((c,), {"a": a[:, :4]}, ValueError, "marginal a must have shape"),
        ((c,), {"b": b[0]}, ValueError, "marginal b must have shape"),
        ((c,), {"a": a.double()}, TypeError, "marginal a has dtype"),
        ((c,), {"a": torch.cat([a[:, :1] * 0, a[:, 1:] * 1.25], 1)}, ValueError, "strictly positive"),
        ((c,), {"b": -b}, ValueError, "strictly positive"),
        ((c,), {"a": a * 2}, ValueError, "equal mass"),
        ((c,), {"a": a * 2, "b": b * 2.5}, ValueError, "equal mass"),
        ((c,), {"a": a, "b": "b"}, TypeError, "b must be a torch.Tensor"),
        ((c,), {"impl": "cuda"}, RuntimeError, "impl='cuda' needs CUDA tensors"),
        ((c,), {"impl": "cutlass"}, ValueError, "impl must be one of"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            sinkhorn(*args, **kw)
    # equal but non-unit mass is fine
    plan, _ = sinkhorn(c, a=a * 2, b=b * 2, n_iters=500)
    assert abs(float(plan[0].sum()) - 2.0) < 1e-4
    x, p = torch.randn(2, 5, 3), torch.randn(4, 3)
    for args, exc, msg in [
        ((x[0], p), ValueError, "x must have rank 3"),
        ((x, p[0]), ValueError, "prototypes must be"),
        ((x, p.double()), TypeError, "prototypes have dtype"),
        ((x, torch.randn(4, 2)), ValueError, "channels"),
        ((x, torch.randn(3, 4, 3)), ValueError, "batch"),
    ]:
        with pytest.raises(exc, match=msg):
            ot_alignment_loss(*args)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="marginal a is on"):
            sinkhorn(c, a=a.cuda())


def test_triton_on_cpu_without_interpreter_is_an_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    from fastproto import triton as tpkg

    msg = "needs CUDA tensors" if tpkg.is_available() else "cannot be imported"
    with pytest.raises(RuntimeError, match=msg):
        sinkhorn(torch.rand(1, 3, 2), impl="triton")


# ----------------------------------------------------------------------------------------------
# Triton (interpreter, subprocess) vs reference
# ----------------------------------------------------------------------------------------------

# (B, N, K, given marginals, eps, dtype, strided cost)
INTERP_CASES = {
    "uniform_f32": (3, 37, 5, False, 0.1, "float32", False),
    "given_k64_two_row_blocks": (2, 70, 64, True, 0.2, "float32", True),
    "k1_n_not_multiple": (2, 300, 1, True, 0.1, "float32", False),
    "k3_strided": (2, 45, 3, False, 0.1, "float32", True),
    "fp16": (2, 33, 8, False, 0.2, "float16", False),
    "bf16": (2, 19, 6, True, 0.2, "bfloat16", True),
    # column 0 lies ~120 eps above every row's best entry: the one-exponential column sums underflow
    # and the kernel must take its exact column pass
    "far_column": (2, 40, 5, False, 0.1, "float32", False),
}


def _interp_cost(name, seed):
    B, N, K, given, eps, dt, strided = INTERP_CASES[name]
    dtype = getattr(torch, dt)
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(B, N, K, generator=gen)
    if name == "far_column":
        cost[:, :, 0] += 12.0
    if strided:  # [B, K, N + 3] NaN storage, read transposed
        store = torch.full((B, K, N + 3), float("nan"), dtype=dtype)
        view = store[:, :, :N].transpose(1, 2)
        view.copy_(cost.to(dtype))
        cost = view
    else:
        cost = cost.to(dtype)
    a, b, _, _ = _marginals(gen, B, N, K, given, dtype)
    return cost, a, b, eps


def _interpreter_main(seed: int) -> None:
    """Subprocess body: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tm = importlib.import_module("fastproto.triton.sinkhorn")
    _triton_pkg.POISON_OUTPUTS = True
    from triton.runtime.interpreter import InterpretedFunction

    results = {"_interpreted": isinstance(tm._sinkhorn_kernel, InterpretedFunction)}
    for i, name in enumerate(INTERP_CASES):
        try:
            cost, a, b, eps = _interp_cost(name, seed + i)
            kw = {"eps": eps, "n_iters": 300, "tol": 1e-6, "a": a, "b": b}
            out = {}
            for impl in ("reference", "triton"):
                c = strided_leaf(cost)
                plan, loss = sinkhorn(c, impl=impl, **kw)
                w = torch.linspace(0.5, 1.5, cost.shape[0], dtype=loss.dtype)
                (grad,) = torch.autograd.grad((loss * w).sum(), c)
                out[impl] = (plan.detach(), loss.detach(), grad)
            ct = torch.float32
            la, lb = ref.log_marginals(cost, a, b, ct)
            _, _, it_r = ref.sinkhorn_potentials(cost.to(ct), la, lb, eps=eps, n_iters=300, tol=1e-6)
            _, _, it_t = tm.solve(cost, la, lb, eps, 300, 1e-6)
            (pr, lr, gr), (pt, lt, gt) = out["reference"], out["triton"]
            results[name] = {
                "shape_ok": pt.shape == pr.shape and lt.shape == lr.shape and gt.shape == gr.shape,
                "dtype_ok": pt.dtype == cost.dtype and lt.dtype == cost.dtype and gt.dtype == cost.dtype,
                "finite": bool(torch.isfinite(pt).all() and torch.isfinite(lt).all() and torch.isfinite(gt).all()),
                "plan": rel_err(pt, pr), "loss": rel_err(lt, lr), "grad": rel_err(gt, gr),
                "iters_ref": it_r.tolist(), "iters_triton": it_t.tolist(),
            }
        except Exception as exc:  # noqa: BLE001  (report; the parent test fails with the message)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # NaN in one problem: that problem NaN, the others finite
    cost, _, _, _ = _interp_cost("uniform_f32", seed)
    cost = cost.clone()
    cost[1, 7, 2] = float("nan")
    plan, loss = sinkhorn(cost, eps=0.1, n_iters=50, impl="triton")
    results["_nan"] = (bool(torch.isnan(plan[1]).all() and torch.isnan(loss[1]))
                       and bool(torch.isfinite(plan[[0, 2]]).all() and torch.isfinite(loss[[0, 2]]).all()))
    # n_iters cap is honoured
    la, lb = ref.log_marginals(cost, None, None, torch.float32)
    plan_t, _, it = tm.solve(cost[[0]], la[[0]], lb[[0]], 0.02, 4, 0.0)
    plan_r, _ = ref.sinkhorn(cost[[0]], eps=0.02, n_iters=4, tol=0.0)  # far from converged: exact schedule
    results["_cap"] = it.tolist() == [4] and rel_err(plan_t, plan_r) <= 1e-4
    # K > 64: forced triton refuses with the reason
    try:
        sinkhorn(torch.rand(1, 4, 65), impl="triton")
        results["_big_refused"] = False
    except RuntimeError as exc:
        results["_big_refused"] = "exceeds" in str(exc)
    # ot_alignment_loss through the Triton path vs the reference path
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 23, 8, generator=gen)
    p = torch.randn(5, 8, generator=gen)
    vals = {}
    for impl in ("reference", "triton"):
        xx, pp = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        v = ot_alignment_loss(xx, pp, normalize=True, impl=impl)
        vals[impl] = (v.detach(), *torch.autograd.grad(v, (xx, pp)))
    results["_ot_loss"] = [rel_err(t, r) for t, r in zip(vals["triton"], vals["reference"])]
    _interpreter.emit(results)


interpreter_results = _interpreter.results_fixture(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_triton_interpreter_matches_reference(name, interpreter_results):
    seed, res = interpreter_results
    r = res[name]
    assert "error" not in r, f"{name}: {r.get('error')} (seed={seed})"
    assert r["shape_ok"] and r["dtype_ok"] and r["finite"], f"{name}: {r} (seed={seed})"
    tol = 1e-4 if INTERP_CASES[name][5] == "float32" else 1e-2
    for key in ("plan", "loss", "grad"):
        assert r[key] <= tol, f"{name}: {key} rel err {r[key]:.2e} > {tol} (seed={seed})"
    # same schedule: iteration counts agree up to rounding at the tol boundary; float32 problems
    # converge early (half marginals rounded to bf16/fp16 need not have equal mass, so may not)
    cap = 300 if INTERP_CASES[name][5] == "float32" else 301
    for i_r, i_t in zip(r["iters_ref"], r["iters_triton"]):
        assert abs(i_r - i_t) <= 1 and 1 <= i_t < cap, f"{name}: iters {r} (seed={seed})"


def test_triton_interpreter_nan_cap_unsupported_ot_loss(interpreter_results):
    seed, res = interpreter_results
    assert res["_nan"], f"NaN did not stay in its problem (seed={seed})"
    assert res["_cap"], f"n_iters cap not honoured or capped plan != reference (seed={seed})"
    assert res["_big_refused"], f"K=65 not refused with a reason (seed={seed})"
    assert max(res["_ot_loss"]) <= 1e-4, f"ot_alignment_loss triton vs reference {res['_ot_loss']} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# compiled extension: the solver shared by the CUDA and CPU kernels, run by the CPU kernel
# ----------------------------------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(not _ext.has_op(ops_sk.COMPILED_OP, "cpu"),
                                    reason="compiled extension with sinkhorn_solve not built")


def _compiled(cost, a, b, eps, n_iters, tol):
    """(plan, loss, grad, iters) of the compiled solver through the autograd Function, loss weighted."""
    la, lb = ref.log_marginals(cost, a, b, torch.float32)
    c = cost.detach().clone().requires_grad_(True)
    plan, loss = ops_sk._SinkhornFn.apply(ops_sk._compiled_solve, c, la, lb, eps, n_iters, tol)
    w = torch.linspace(0.5, 1.5, cost.shape[0], dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * w).sum(), c)
    _, _, iters = ops_sk._compiled_solve(cost, la, lb, eps, n_iters, tol)
    return plan, loss, grad, iters, w


@needs_compiled
@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_compiled_solver_matches_reference(name, rng, poisoned):
    seed = _seed(rng)
    cost, a, b, eps = _interp_cost(name, seed)
    plan, loss, grad, iters, w = _compiled(cost, a, b, eps, 300, 1e-6)
    c = cost.detach().clone().requires_grad_(True)
    plan_r, loss_r = sinkhorn(c, eps=eps, n_iters=300, tol=1e-6, a=a, b=b, impl="reference")
    (grad_r,) = torch.autograd.grad((loss_r * w).sum(), c)
    ct = torch.float32
    la, lb = ref.log_marginals(cost, a, b, ct)
    _, _, iters_r = ref.sinkhorn_potentials(cost.to(ct), la, lb, eps=eps, n_iters=300, tol=1e-6)
    assert plan.dtype == cost.dtype and loss.dtype == cost.dtype and grad.dtype == cost.dtype
    assert torch.isfinite(plan).all() and torch.isfinite(loss).all() and torch.isfinite(grad).all(), f"seed={seed}"
    tol = 1e-4 if INTERP_CASES[name][5] == "float32" else 1e-2
    for key, got, want in (("plan", plan, plan_r), ("loss", loss, loss_r), ("grad", grad, grad_r)):
        assert rel_err(got, want) <= tol, f"{name}: {key} rel err {rel_err(got, want):.2e} (seed={seed})"
    cap = 300 if INTERP_CASES[name][5] == "float32" else 301
    for i_r, i_c in zip(iters_r.tolist(), iters.tolist()):
        assert abs(i_r - i_c) <= 1 and 1 <= i_c < cap, f"{name}: iters {iters_r} vs {iters} (seed={seed})"


@needs_compiled
def test_compiled_solver_far_column_takes_the_exact_pass(rng, poisoned):
    """With every column sum underflowing, the one-exponential g-update would give inf; the plan is
    finite and equal to the reference only through the exact column pass."""
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(2, 40, 5, generator=gen)
    cost[:, :, 0] += 12.0  # ~120 eps above every row's best entry
    plan, loss, _, _, _ = _compiled(cost, None, None, 0.1, 300, 1e-6)
    plan_r, loss_r = ref.sinkhorn(cost, eps=0.1, n_iters=300, tol=1e-6)
    assert torch.isfinite(plan).all() and rel_err(plan, plan_r) <= 1e-4, f"seed={seed}"
    assert float(plan[:, :, 0].sum(1).min()) > 0.19, f"column 0 lost its mass (seed={seed})"


@needs_compiled
def test_compiled_solver_nan_cap_and_tol_zero(rng, poisoned):
    seed = _seed(rng)
    gen = torch.Generator().manual_seed(seed)
    cost = torch.rand(3, 37, 5, generator=gen)
    cost[1, 7, 2] = float("nan")
    plan, loss, _, _, _ = _compiled(cost, None, None, 0.1, 50, 1e-6)
    assert torch.isnan(plan[1]).all() and torch.isnan(loss[1]), f"seed={seed}"
    assert torch.isfinite(plan[[0, 2]]).all() and torch.isfinite(loss[[0, 2]]).all(), f"seed={seed}"
    # a cap far below convergence: the exact schedule of the reference, iteration for iteration
    la, lb = ref.log_marginals(cost, None, None, torch.float32)
    plan_c, loss_c, iters = ops_sk._compiled_solve(cost[[0]], la[[0]], lb[[0]], 0.02, 4, 0.0)
    plan_r, loss_r = ref.sinkhorn(cost[[0]], eps=0.02, n_iters=4, tol=0.0)
    assert iters.tolist() == [4] and rel_err(plan_c, plan_r) <= 1e-4 and rel_err(loss_c, loss_r) <= 1e-4
    # n_iters = 1: one f- and one g-update
    _, _, iters = ops_sk._compiled_solve(cost[[0, 2]], la[[0, 2]], lb[[0, 2]], 0.1, 1, 1e-6)
    assert iters.tolist() == [1, 1]


@needs_compiled
def test_compiled_solver_argument_errors():
    op = _ext.op(ops_sk.COMPILED_OP)
    c = torch.rand(2, 5, 3)
    la, lb = torch.zeros(2, 5), torch.zeros(2, 3)
    outs = lambda cost=c: (torch.empty_like(cost), torch.empty(cost.shape[0]),  # noqa: E731
                           torch.empty(cost.shape[0], dtype=torch.int32))
    cases = [
        ((c[0], la, lb, 0.1, 10, 0.0, *outs()), "cost must be \\[B,N,K\\]"),
        ((c.double(), la, lb, 0.1, 10, 0.0, *outs(c.double())), "float32, float16 or bfloat16"),
        ((torch.rand(2, 5, 65), la, torch.zeros(2, 65), 0.1, 10, 0.0, *outs(torch.rand(2, 5, 65))), "K <= 64"),
        ((c, la[:, :4], lb, 0.1, 10, 0.0, *outs()), "log_a must be"),
        ((c, la, lb.double(), 0.1, 10, 0.0, *outs()), "log_b must be"),
        ((c, la, lb, 0.0, 10, 0.0, *outs()), "eps must be"),
        ((c, la, lb, 0.1, 0, 0.0, *outs()), "n_iters must be"),
        ((c, la, lb, 0.1, 10, -1.0, *outs()), "tol must be"),
        ((c, la, lb, 0.1, 10, 0.0, torch.empty(2, 5, 4), *outs()[1:]), "plan must be"),
        ((c, la, lb, 0.1, 10, 0.0, outs()[0], torch.empty(3), outs()[2]), "loss must be"),
        ((c, la, lb, 0.1, 10, 0.0, *outs()[:2], torch.empty(2)), "iters must be"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    # the largest K is accepted
    cost = torch.rand(1, 7, 64)
    plan, loss, _ = ops_sk._compiled_solve(cost, *ref.log_marginals(cost, None, None, torch.float32), 0.1, 50, 1e-6)
    assert rel_err(plan, ref.sinkhorn(cost, eps=0.1, n_iters=50, tol=1e-6)[0]) <= 1e-4


def test_cuda_impl_without_a_cuda_extension_is_an_error():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to reach the extension check")
    if _ext.has_op(ops_sk.COMPILED_OP, "cuda"):
        pytest.skip("the extension has the CUDA kernel")
    with pytest.raises(RuntimeError, match="impl='cuda' requested but"):
        sinkhorn(torch.rand(1, 3, 2, device="cuda"), impl="cuda")


# ----------------------------------------------------------------------------------------------
# GPU, real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("K", [2, 8, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 2e-2)])
def test_gpu_kernel_matches_reference_real_shapes(impl, K, dtype, tol, rng):
    """B=64, N=1024 (DPDiff-AD tokens), normalised squared distances as the cost."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel in the interpreter")
    from fastproto import triton as tpkg

    if impl == "triton" and not tpkg.is_available():
        pytest.skip("triton is not installed")
    if impl == "cuda" and not _ext.has_op(ops_sk.COMPILED_OP, "cuda"):
        pytest.skip("the compiled extension has no CUDA kernel")
    seed = _seed(rng)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, N = 64, 1024
    x = torch.nn.functional.normalize(torch.randn(B, N, 32, device="cuda", generator=gen), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(K, 32, device="cuda", generator=gen), dim=-1)
    cost = ref.squared_distance_cost(x, p).to(dtype)
    old = _triton_pkg.POISON_OUTPUTS
    _triton_pkg.POISON_OUTPUTS = True
    try:
        c_t = cost.clone().requires_grad_(True)
        plan_t, loss_t = sinkhorn(c_t, eps=0.05, n_iters=200, impl=impl)
        loss_t.sum().backward()
        plan_r, loss_r = sinkhorn(cost, eps=0.05, n_iters=200, impl="reference")
        plan_a, _ = sinkhorn(cost, eps=0.05, n_iters=200)
        torch.cuda.synchronize()
    finally:
        _triton_pkg.POISON_OUTPUTS = old
    if impl == "triton":
        assert torch.equal(plan_a, plan_t), f"impl='auto' did not take the Triton path (seed={seed})"
    assert torch.isfinite(plan_t).all() and torch.isfinite(loss_t).all(), f"seed={seed}"
    assert torch.equal(c_t.grad, plan_t), f"seed={seed}"
    assert rel_err(plan_t, plan_r) <= tol and rel_err(loss_t, loss_r) <= tol, f"{impl} K={K} {dtype} (seed={seed})"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
