"""Runs a test file's Triton cases in a child process under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so each Triton test file doubles as the
child's script: called as ``python FILE --interpreter-cases SEED`` it runs its cases (with outputs
poisoned through ``FASTPROTO_POISON_OUTPUTS=1``) and reports them with :func:`emit`; the parent test
collects them with :func:`run`.
"""
import json
import os
import subprocess
import sys

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
    seed (reported in every assertion message, so a failure can be replayed)."""

    @pytest.fixture(scope="module")
    def interpreter_results():
        seed = int.from_bytes(os.urandom(3), "little")
        return seed, run(test_file, seed)

    return interpreter_results
