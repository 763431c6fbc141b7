"""The implementation choice of every op (``fastproto.ops._dispatch.resolve_impl``), decided without a GPU:
the inputs are stand-ins that carry only a device and ``requires_grad`` (all the dispatcher reads), and the
availability of Triton and of the extension's CUDA kernels is set per test."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastproto.ops import _dispatch


def _inputs(device="cuda", grad=False):
    return [SimpleNamespace(device=torch.device(device, 0) if device == "cuda" else torch.device(device),
                            requires_grad=grad)]


@pytest.fixture
def available(monkeypatch):
    """``available(triton=..., compiled=...)``: whether Triton imports and the extension has CUDA kernels."""

    def set_(triton: bool, compiled: bool):
        monkeypatch.setattr(_dispatch._triton_pkg, "is_available", lambda: triton)
        monkeypatch.setattr(_dispatch._ext, "available", lambda: True)
        monkeypatch.setattr(_dispatch._ext, "has_op", lambda name, device="cpu": compiled)

    return set_


def resolve(impl, inputs, **kw):
    kw.setdefault("impls", ("triton", "cuda"))
    kw.setdefault("compiled_op", "some_op")
    return _dispatch.resolve_impl("op", impl, inputs, **kw)


def test_auto_prefers_triton_then_the_compiled_kernel_then_the_reference(available):
    available(triton=True, compiled=True)
    assert resolve("auto", _inputs()) == "triton"
    available(triton=False, compiled=True)
    assert resolve("auto", _inputs()) == "cuda"
    available(triton=False, compiled=False)
    assert resolve("auto", _inputs()) == "reference"
    assert resolve("auto", _inputs("cpu")) == "reference"


def test_forward_only_ops_go_to_the_reference_or_are_refused_for_training(available):
    available(triton=True, compiled=True)
    assert resolve("auto", _inputs(grad=True), has_backward=False) == "reference"
    assert resolve("auto", _inputs(grad=False), has_backward=False) == "triton"
    assert resolve("auto", _inputs(grad=True)) == "triton"
    for impl in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match="forward-only"):
            resolve(impl, _inputs(grad=True), has_backward=False)
        with torch.no_grad():  # no graph is built: the inference kernel may run
            assert resolve(impl, _inputs(grad=True), has_backward=False) == impl


def test_forced_cuda_names_what_is_missing(available, monkeypatch):
    available(triton=True, compiled=False)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        resolve("cuda", _inputs())
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        resolve("cuda", _inputs("cpu"))
    with pytest.raises(RuntimeError, match="no compiled CUDA kernel"):
        resolve("cuda", _inputs(), compiled_op=None)
    monkeypatch.setattr(_dispatch._ext, "available", lambda: False)
    monkeypatch.setattr(_dispatch._ext, "load_error", lambda: "not built")
    with pytest.raises(RuntimeError, match="fastproto._C is not loaded"):
        resolve("cuda", _inputs())


def test_forced_triton_needs_cuda_tensors_outside_the_interpreter(available, monkeypatch):
    available(triton=True, compiled=True)
    monkeypatch.setattr(_dispatch._triton_pkg, "interpreter_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="impl='triton' needs CUDA tensors"):
        resolve("triton", _inputs("cpu"))
    monkeypatch.setattr(_dispatch._triton_pkg, "interpreter_enabled", lambda: True)  # tests: kernels on the CPU
    assert resolve("triton", _inputs("cpu")) == "triton"
    available(triton=False, compiled=True)
    with pytest.raises(RuntimeError, match="triton package cannot be imported"):
        resolve("triton", _inputs())


def test_unsupported_inputs_fall_back_under_auto_and_raise_when_forced(available):
    available(triton=True, compiled=True)
    with pytest.warns(RuntimeWarning, match="using the reference"):
        assert resolve("auto", _inputs(), unsupported=lambda: "a reason seen once") == "reference"
    for impl in ("triton", "cuda"):
        with pytest.raises(RuntimeError, match="cannot run these inputs: another reason"):
            resolve(impl, _inputs(), unsupported=lambda: "another reason")


def test_impl_outside_the_ops_choices_is_refused(available):
    available(triton=True, compiled=True)
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve("cuda", _inputs(), impls=("triton",))
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve("fast", _inputs())


def test_host_grid_helpers_equal_tritons():
    """``fastproto.triton.cdiv`` / ``next_pow2`` (plain integers: the launchers' grids and tiles) give what
    ``triton.cdiv`` / ``triton.next_power_of_2`` give, without their constexpr-call cost."""
    triton = pytest.importorskip("triton")
    from fastproto.triton import cdiv, next_pow2

    for a in [*range(0, 300), 789, 1024, 1025, 50_000, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        assert next_pow2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 100, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_apply_skips_autograd_only_when_no_gradient_can_flow():
    """``_dispatch.apply``: ``Function.apply`` (outputs attached to the graph) when grad mode is on and a tensor
    argument requires grad; otherwise the forward on an inert context (same values, nothing recorded, what the
    forward saves dropped)."""
    from fastproto.ops._dispatch import apply

    calls = []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, factor):
            calls.append(type(ctx).__name__)
            ctx.save_for_backward(x)
            ctx.factor = factor
            assert len(ctx.needs_input_grad) == 2
            out = x * factor
            aux = out.detach().clone()
            ctx.mark_non_differentiable(aux)
            ctx.set_materialize_grads(False)
            return out, aux

        @staticmethod
        def backward(ctx, grad, _):
            return grad * ctx.factor, None

    x = torch.randn(5)
    leaf = x.clone().requires_grad_(True)
    out, aux = apply(Double, x, 3.0)
    assert torch.equal(out, x * 3) and out.grad_fn is None and not aux.requires_grad
    with torch.no_grad():
        out, _ = apply(Double, leaf, 3.0)
    assert out.grad_fn is None and not out.requires_grad
    assert calls == ["_InferenceContext", "_InferenceContext"]
    out, aux = apply(Double, leaf, 3.0)
    assert out.grad_fn is not None and not aux.requires_grad and calls[-1] != "_InferenceContext"
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.full((5,), 3.0))


def test_every_op_function_forward_runs_on_the_inference_context():
    """``_dispatch.apply`` runs an op's Function forward on ``_InferenceContext`` when no gradient can flow; on the
    CPU the ops take their references, so only a GPU would run that path for real. Every ``forward(ctx, ...)`` in
    fastproto.ops may therefore read only what the context provides (attributes it sets are fine)."""
    import ast
    import pathlib

    from fastproto.ops import _dispatch

    provided = {name for name in vars(_dispatch._InferenceContext) if not name.startswith("_")}
    provided |= set(vars(_dispatch._InferenceContext(1)))
    root = pathlib.Path(_dispatch.__file__).parent
    checked = 0
    for path in sorted(root.glob("*.py")):
        for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
            for fn in cls.body:
                if isinstance(fn, ast.FunctionDef) and fn.name == "forward" and fn.args.args[:1] and \
                        fn.args.args[0].arg == "ctx":
                    read = {n.attr for n in ast.walk(fn)
                            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                            and n.value.id == "ctx" and not isinstance(n.ctx, ast.Store)}
                    assert read <= provided, f"{path.name}:{cls.name}.forward reads ctx.{sorted(read - provided)}"
                    checked += 1
    assert checked >= 10, checked


def test_references_compute_in_their_own_dtypes_under_autocast():
    """Each reference states its compute dtype (float32 for bfloat16 inputs); autocast must not recast its float32
    products to bfloat16: outputs and input gradients equal those of the same call outside autocast, bit for bit.
    (``add_layer_norm``'s output dtype follows autocast by design, as ``F.layer_norm``'s: test_layer_norm.)"""
    from fastproto import reference as R

    seed = int.from_bytes(__import__("os").urandom(3), "little")
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen).bfloat16()

    q, k, v, x, p = r(2, 2, 7, 8), r(2, 2, 5, 8), r(2, 2, 5, 8), r(2, 7, 16), r(3, 16)
    calls = {
        "linear_attention": (lambda q, k, v: R.linear_attention.linear_attention_with_state(q, k, v)[0], (q, k, v)),
        "prototype_attention relu_cos": (lambda q, k, v: R.prototype.prototype_attention(q, k, v), (q, k, v)),
        "prototype_attention softmax": (lambda q, k, v: R.prototype.prototype_attention(q, k, v, kind="softmax"),
                                        (q, k, v)),
        "route soft": (lambda x, p: R.prototype.route(x, p, mode="soft")[0], (x, p)),
        "route nearest": (lambda x, p: R.prototype.route(x, p)[0], (x, p)),
        "coherence_loss": (R.losses.coherence_loss, (x, p)),
        "cosine_mining_loss": (lambda e, d: R.losses.cosine_mining_loss([e], [d]), (x, r(2, 7, 16))),
        "ot_alignment_loss": (lambda x, p: R.sinkhorn.ot_alignment_loss(x, p, n_iters=20), (x, p)),
    }
    for name, (fn, inputs) in calls.items():
        runs = []
        for autocast in (False, True):
            leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = fn(*leaves)
            out.float().sum().backward()
            runs.append([out.detach(), *(t.grad for t in leaves)])
        for a, b in zip(*runs):
            same = a is None and b is None or a is not None and b is not None and a.dtype == b.dtype and torch.equal(a, b)
            assert same, f"{name}: autocast changed the result (seed={seed})"
