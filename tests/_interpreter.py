"""Runs a test file's Triton cases in a child process under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so each Triton test file doubles as the
child's script: called as ``python FILE --interpreter-cases SEED`` it runs its cases (with outputs
poisoned through ``FASTPROTO_POISON_OUTPUTS=1``) and reports them with :func:`emit`; the parent test
collects them with :func:`run`. :func:`main` is that entry point; :func:`model_deltas` /
:func:`check_model` compare a whole model's fused and reference runs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_TAG = "RESULTS_JSON "


def emit(results: dict) -> None:
    print(_TAG + json.dumps(results))


def run(test_file: str, seed: int, timeout: int = 600) -> dict:
    from fastproto import triton as tpkg

    if not tpkg.is_available():
        pytest.skip("triton is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the child imports tests._interpreter
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", FASTPROTO_POISON_OUTPUTS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--interpreter-cases", str(seed)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    assert proc.returncode == 0 and lines, (
        f"interpreter subprocess failed (seed={seed}, rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len(_TAG):])


def results_fixture(test_file: str):
    """A module-scoped fixture ``(seed, results)``: ``test_file``'s interpreter cases run once, with a fresh
    seed (reported in every assertion message, so a failure can be replayed). The child reports under
    ``"_interpreted"`` whether its kernels really were interpreter objects; every test using the fixture fails
    when they were not."""

    @pytest.fixture(scope="module")
    def interpreter_results():
        seed = int.from_bytes(os.urandom(3), "little")
        results = run(test_file, seed)
        assert results.get("_interpreted"), f"{test_file}: the kernels were not interpreted (seed={seed})"
        return seed, results

    return interpreter_results


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even, as the GPU converts (and torch);
    NaN stays a (quiet) NaN of the same sign, overflow rounds to infinity."""
    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), (bits >> 16).astype(np.uint16) | np.uint16(0x40), rounded)


def round_bfloat16_like_the_gpu() -> None:
    """Make the interpreter's float32 -> bfloat16 conversion round to nearest even, as the GPU does.

    The Triton interpreter (3.9) truncates instead: of 4096 random values 2088 differ from round-to-nearest, each
    one the truncated value. Truncation errs one way, so its error adds up coherently in reductions (a weight
    gradient summed over tokens), where the GPU's rounding errors cancel: an interpreter bf16 result then says
    more about the interpreter than about the kernel. Applied in every child (:func:`main`)."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.cast_impl, "_rounds_to_nearest", False):
        return
    truncating = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(bfloat16_bits(src.data), dst_type.scalar)
        return truncating(self, src, dst_type)

    cast_impl._rounds_to_nearest = True
    builder.cast_impl = cast_impl


def main(test_file: str, cases) -> None:
    """A Triton test file's ``__main__``: ``--interpreter-cases SEED`` runs ``cases(seed)`` (the child, with the
    interpreter's bfloat16 conversion made GPU-faithful), anything else runs the file's tests."""
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreter-cases":
        round_bfloat16_like_the_gpu()
        cases(int(sys.argv[2]))
    else:
        sys.exit(pytest.main([test_file, "-q"]))


def model_deltas(runs: dict) -> dict:
    """Differences of a model's fused run from ``runs["reference"]`` (the other entry: ``"triton"`` under the
    interpreter, ``"auto"`` on a GPU), each ``(maps, loss parts, grads)`` (``maps``: a tensor or a dict of named maps;
    ``grads``: one flat tensor): per map and for the gradients the max difference relative to the reference's max
    magnitude, per loss part the absolute difference."""
    (m0, l0, g0), (m1, l1, g1) = runs["reference"], next(v for k, v in runs.items() if k != "reference")
    m0, m1 = ({"anomaly_map": m} if not isinstance(m, dict) else m for m in (m0, m1))
    return {"map_rel": {k: float((m1[k] - m0[k]).abs().max() / m0[k].abs().max()) for k in m0},
            "loss": {k: float((l1[k] - l0[k]).detach().abs()) for k in l0},
            "grad_rel": float((g1 - g0).abs().max() / g0.abs().max())}


def assert_deltas(res: dict, seed: int, maps=("anomaly_map",), map_tol: float = 1e-3, loss_tol: float = 1e-4,
                  grad_tol: float = 1e-3) -> None:
    """Exactly the ``maps`` compared, each and the loss parts and gradients within tolerance (the seed in every
    message, so that a failure can be replayed)."""
    assert set(res["map_rel"]) == set(maps), f"{res} (seed={seed})"
    assert all(v <= map_tol for v in res["map_rel"].values()), f"{res} (seed={seed})"
    assert all(v <= loss_tol for v in res["loss"].values()), f"{res} (seed={seed})"
    assert res["grad_rel"] <= grad_tol, f"{res} (seed={seed})"


def check_model(test_file: str, maps=("anomaly_map",), **tols) -> None:
    """A model test file's fused-vs-reference check: runs its child (the file's ``model_deltas`` emitter) with a
    fresh seed and asserts the deltas (:func:`assert_deltas`). Skips without triton."""
    seed = int.from_bytes(os.urandom(3), "little")
    assert_deltas(run(test_file, seed), seed, maps, **tols)


def model_tests(test_file: str, runs_fn, maps=("anomaly_map",), **tols):
    """A model test file's two fused-vs-reference tests, to assign at module level (pytest collects them by those
    names): under the interpreter in a child (:func:`check_model`; the file's ``__main__`` calls
    :func:`model_main`) and on a GPU (:func:`check_model_gpu`). ``runs_fn(seed, device=, fused=)`` gives the runs."""

    def test_triton_model_matches_reference_under_interpreter():
        check_model(test_file, maps, **tols)

    @pytest.mark.gpu
    @pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device")
    def test_gpu_model_matches_reference():
        check_model_gpu(runs_fn, maps, **tols)

    return test_triton_model_matches_reference_under_interpreter, test_gpu_model_matches_reference


def model_main(test_file: str, runs_fn) -> None:
    """A model test file's ``__main__``: the child emits the deltas of ``runs_fn(seed)`` (:func:`model_deltas`)."""
    main(test_file, lambda seed: emit(model_deltas(runs_fn(seed))))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_model_gpu(runs_fn, maps=("anomaly_map",), **tols) -> None:
    """The same check on a GPU: ``runs_fn(seed, device="cuda", fused="auto")`` (the file's runs, with the kernels
    ``impl="auto"`` picks on CUDA) against reference mode."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernels in the interpreter")
    seed = int.from_bytes(os.urandom(3), "little")
    assert_deltas(model_deltas(runs_fn(seed, device="cuda", fused="auto")), seed, maps, **tols)
