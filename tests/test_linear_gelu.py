"""Linear + exact GELU (``fastproto.ops.linear_gelu``): reference against a float64 re-statement, the Triton
kernel under the interpreter (child process, outputs poisoned) against float64, dispatch and errors."""
from __future__ import annotations

import importlib
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import _interpreter
from tests._tensors import rel_err
from fastproto import triton as _triton_pkg  # noqa: E402  (POISON_OUTPUTS switch)
from fastproto.ops import fc_gelu, linear_gelu

_ref = importlib.import_module("fastproto.reference.linear_gelu")


def _gelu64(x, w, b):
    """float64 NumPy re-statement: z = x w^T + b, z / 2 (1 + erf(z / sqrt 2))."""
    z = x @ w.T + (0.0 if b is None else b)
    erf = np.vectorize(math.erf)
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))



def test_reference_matches_numpy_float64(rng):
    x, w, b = rng.standard_normal((4, 7, 13)), rng.standard_normal((9, 13)), rng.standard_normal(9)
    got = _ref.linear_gelu(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), _gelu64(x, w, b), rtol=1e-12, atol=1e-12)
    got = _ref.linear_gelu(torch.from_numpy(x), torch.from_numpy(w))
    np.testing.assert_allclose(got.numpy(), _gelu64(x, w, None), rtol=1e-12, atol=1e-12)


def test_auto_on_cpu_and_with_grad_is_the_reference(rng):
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    x, w, b = torch.randn(3, 8, generator=gen), torch.randn(5, 8, generator=gen), torch.randn(5, generator=gen)
    assert torch.equal(linear_gelu(x, w, b), F.gelu(F.linear(x, w, b)))
    w.requires_grad_(True)
    y = linear_gelu(x, w, b)
    y.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


def test_fc_gelu_trains_under_a_forced_kernel(rng):
    """The kernel is forward-only: with gradients, ``fc_gelu`` takes the eager pair even when the model forces
    impl="triton" (here on the CPU without the interpreter, where the kernel could not run at all)."""
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    fc = torch.nn.Linear(8, 5)
    x = torch.randn(3, 8, generator=gen)
    y = fc_gelu(fc, x, impl="triton")
    assert torch.equal(y, F.gelu(fc(x)))
    y.sum().backward()
    assert fc.weight.grad is not None and torch.isfinite(fc.weight.grad).all()
    with torch.no_grad():
        assert torch.equal(fc_gelu(fc, x, impl="reference"), F.gelu(fc(x)))


def test_bad_inputs():
    x, w, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(4)
    cases = [((x, w[:, :7], b), ValueError, "x has 8 features"),
             ((x, w[0], b), ValueError, r"weight must be \[out_features, in_features\]"),
             ((x, w, b[:3]), ValueError, r"bias must have shape \(4,\)"),
             ((x.long(), w, b), TypeError, "x must have a floating dtype"),
             (([1.0], w, b), TypeError, "x must be a torch.Tensor"),
             ((x, w, b.to("meta")), ValueError, "bias is on meta")]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            linear_gelu(*args)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_gelu(x, w, b, impl="cuda")


# ----------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (child process, outputs poisoned)
# ----------------------------------------------------------------------------------------------

#: name -> (x shape, out features, dtype, bias, x strided)
INTERP_CASES = {
    "fp32": ((3, 37, 50), 70, "float32", True, False),
    "fp32_no_bias_strided": ((45, 24), 33, "float32", False, True),
    "bf16": ((2, 29, 64), 96, "bfloat16", True, False),
    "fp16_one_row": ((1, 40), 17, "float16", True, True),
}


def _interp_inputs(name, seed):
    shape, n, dt, with_bias, strided = INTERP_CASES[name]
    gen = torch.Generator().manual_seed(seed)
    k = shape[-1]
    x = torch.randn(*shape, generator=gen)
    if strided:  # rows wider than the features (a slice of a packed tensor)
        wide = torch.randn(*shape[:-1], k + 5, generator=gen)
        wide[..., :k] = x
        x = wide[..., :k]
    w = torch.randn(n, k, generator=gen) * k ** -0.5 * 2
    b = torch.randn(n, generator=gen) if with_bias else None
    dtype = getattr(torch, dt)
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _interpreter_main(seed: int) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tm = importlib.import_module("fastproto.triton.linear_gelu")
    _triton_pkg.POISON_OUTPUTS = True
    from triton.runtime.interpreter import InterpretedFunction

    results = {"_interpreted": isinstance(tm._linear_gelu_kernel.fn, InterpretedFunction)}
    for i, name in enumerate(INTERP_CASES):
        try:
            x, w, b = _interp_inputs(name, seed + i)
            y = linear_gelu(x, w, b, impl="triton")
            want = _gelu64(x.double().numpy(), w.double().numpy(), None if b is None else b.double().numpy())
            results[name] = {"shape_ok": tuple(y.shape) == (*x.shape[:-1], w.shape[0]), "dtype_ok": y.dtype == x.dtype,
                             "finite": bool(torch.isfinite(y).all()), "err": rel_err(y, torch.from_numpy(want)),
                             "low_precision": x.dtype != torch.float32}
        except Exception as exc:  # noqa: BLE001  (report; the parent test fails with the message)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # autocast: inputs cast to bfloat16 as F.linear does; same values as the eager pair up to the sum order
    x, w, b = _interp_inputs("fp32", seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = linear_gelu(x, w, b, impl="triton"), F.gelu(F.linear(x, w, b))
    results["_autocast"] = {"dtype_ok": y.dtype == want.dtype == torch.bfloat16, "err": rel_err(y, want)}
    # a NaN in one input row gives NaN in exactly its output row
    x = x.clone()
    x[1, 4, 7] = float("nan")
    y = linear_gelu(x, w, b, impl="triton")
    row = torch.zeros(y.shape[:-1], dtype=torch.bool)
    row[1, 4] = True
    results["_nan_row"] = bool(torch.isnan(y[row]).all()) and bool(torch.isfinite(y[~row]).all())
    # forced Triton refuses inputs that require grad; float64 is refused with the reason
    for key, args, marker in (("_grad_refused", (x, w.requires_grad_(True), b), "forward-only"),
                              ("_float64_refused", (x.double(), w.detach().double(), b.double()), "float64")):
        try:
            linear_gelu(*args, impl="triton")
            results[key] = False
        except RuntimeError as exc:
            results[key] = marker in str(exc)
    # the models' MLP module (DINOv2's; the decoders' and bottlenecks' with dropout) vs its eager pair
    from fastproto.ops import Mlp

    torch.manual_seed(seed)
    xm = torch.randn(2, 11, 24)
    errs = {}
    for name, mlp in (("vit", Mlp(24, 40)), ("decoder", Mlp(24, 40, 24, drop=0.2, input_dropout=True).eval())):
        with torch.no_grad():
            mlp.impl = "triton"
            fused = mlp(xm)
            mlp.impl = "reference"
            errs[name] = rel_err(fused, mlp(xm))
    results["_mlps"] = errs
    _interpreter.emit(results)


interpreter_results = _interpreter.results_fixture(__file__)


@pytest.mark.parametrize("name", list(INTERP_CASES))
def test_triton_interpreter_matches_float64(name, interpreter_results):
    seed, res = interpreter_results
    r = res[name]
    assert "error" not in r, f"{name}: {r.get('error')} (seed={seed})"
    assert r["shape_ok"] and r["dtype_ok"] and r["finite"], f"{name}: {r} (seed={seed})"
    tol = 1e-2 if r["low_precision"] else 1e-5
    assert r["err"] <= tol, f"{name}: rel err {r['err']:.2e} > {tol} (seed={seed})"


def test_triton_interpreter_autocast_nan_refusals_modules(interpreter_results):
    seed, res = interpreter_results
    assert res["_autocast"]["dtype_ok"] and res["_autocast"]["err"] <= 1e-2, f"{res['_autocast']} (seed={seed})"
    assert res["_nan_row"], f"NaN did not propagate to exactly its row (seed={seed})"
    assert res["_grad_refused"] and res["_float64_refused"], f"{res} (seed={seed})"
    assert all(e <= 1e-5 for e in res["_mlps"].values()), f"MLPs fused vs eager: {res['_mlps']} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# GPU, real shapes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_gpu_matches_float64_real_shapes(dtype, tol, rng, poisoned):
    """A ViT-B MLP's fc1 at 16 x 789 tokens (768 -> 3072) vs float64; impl="auto" takes Triton."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernel in the interpreter")
    if not _triton_pkg.is_available():
        pytest.skip("triton is not installed")
    seed = int(rng.integers(1 << 31))
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(16, 789, 768, device="cuda", generator=gen).to(dtype)
    w = (torch.randn(3072, 768, device="cuda", generator=gen) * 768 ** -0.5).to(dtype)
    b = torch.randn(3072, device="cuda", generator=gen).to(dtype)
    y = linear_gelu(x, w, b)
    want = F.gelu(F.linear(x.double(), w.double(), b.double()))
    assert y.dtype == dtype and rel_err(y, want) <= tol, f"rel err {rel_err(y, want):.2e} (seed={seed})"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)


def test_autotuning_timings_are_kept_on_disk_when_triton_can():
    """With Triton >= 3.4 the tile choice of a shape survives the process (``cache_results``); a user's first
    batch of a known shape then skips the tuning (six configs, about a second)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter does not autotune")
    import inspect

    kernels = importlib.import_module("fastproto.triton.linear_gelu")
    supported = "cache_results" in inspect.signature(triton.autotune).parameters
    assert bool(kernels._linear_gelu_kernel.cache_results) == supported
    assert len(kernels._linear_gelu_kernel.configs) == 6
