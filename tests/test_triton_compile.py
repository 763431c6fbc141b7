"""Every Triton kernel compiles for an H100 (sm_90), through the public ops, on a machine without a GPU.

The interpreter tests check the kernels' arithmetic; this checks what only the compiler sees: that each kernel
lowers for Hopper with the tiles, dtypes and argument specialisation the GPU run will use (bf16 operands, the
autotuned tiles of every config), that the matrix-product kernels keep a software-pipelined main loop (the GEMM
on wgmma), and that no kernel spills registers beyond the one documented case. It runs in a child process: compiling
needs a stand-in Triton driver (tests/_hopper.py) that must not outlive the test. Nothing is launched.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

_TAG = "COMPILED_JSON "
#: kernels allowed to spill: (name, bytes) - the 128x256 GELU-epilogue tile (see fastproto/triton/linear_gelu.py)
SPILL_ALLOWED = {"_linear_gelu_kernel": 64}
#: kernels that stream a reduction dimension through tensor-core products: their main loop must be
#: software-pipelined (asynchronous copies). wgmma is required of the GEMM only: the others run on wgmma where
#: their row tile reaches 64 (a per-location bank's tile is the batch, 16 rows: mma.sync)
PIPELINED = {"_linear_gelu_kernel", "_la_state_kernel", "_la_bwd_q_kernel", "_route_nearest_kernel",
             "_route_soft_fwd_kernel", "_route_soft_bwd_kernel", "_route_linear_kernel"}
WGMMA = {"_linear_gelu_kernel"}


def _all_kernel_names() -> set:
    """Every ``*_kernel`` jitted (or autotuned) function of the fastproto.triton modules."""
    from triton.runtime.jit import KernelInterface

    from fastproto import triton as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"fastproto.triton.{info.name}")
        names |= {name for name, obj in vars(module).items()
                  if isinstance(obj, KernelInterface) and name.endswith("_kernel")}
    return names


def _child() -> None:
    """Run every op's Triton path (forward, and backward where it has one) on CPU tensors at small shapes with the
    models' channel / head sizes, compiling each launch for sm_90; report each kernel's ptxas facts."""
    from fastproto import ops
    from tests._hopper import compile_only, main_loop, ptxas_report

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape).to(dtype).requires_grad_(True)

    with compile_only() as compiled:
        q, k, v = leaf(2, 12, 33, 64), leaf(2, 12, 40, 64), leaf(2, 12, 40, 64)
        ops.linear_attention(q, k, v, impl="triton").float().sum().backward()
        for kind in ("relu_cos", "softmax"):
            q, k, v = leaf(2, 12, 33, 64), leaf(2, 12, 6, 64), leaf(2, 12, 6, 64)
            scale = torch.ones(12, 1, 1, requires_grad=True)
            ops.prototype_attention(q, k, v, kind=kind, scale=scale, impl="triton").float().sum().backward()
        x, p = leaf(2, 33, 768), leaf(6, 768)
        with torch.no_grad():
            ops.route(x, p, mode="nearest", impl="triton")  # its backward is a PyTorch gather
        routed, weights = ops.route(x, p, mode="soft", tau=0.1, impl="triton")
        (routed.float().sum() + weights.float().sum()).backward()
        ops.route(x, p, mode="linear", impl="triton").float().sum().backward()
        ops.route(leaf(2, 16, 2048), leaf(16, 7, 2048), mode="linear", per_location=True,
                  impl="triton").float().sum().backward()
        ops.sinkhorn(leaf(4, 64, 8, dtype=torch.float32), impl="triton")[1].sum().backward()
        with torch.no_grad():
            feats = [torch.randn(2, 768, 7, 7).bfloat16() for _ in range(4)]
            ops.anomaly_map(feats, [f + 1 for f in feats], 28, groups=[[0, 1], [2, 3]], eval_size=20, impl="triton")
            ops.gaussian_blur(torch.randn(2, 28, 28), sigma=4.0, impl="triton")
        out, s = ops.add_layer_norm(leaf(2, 33, 768), leaf(2, 33, 768, dtype=torch.float32),
                                    leaf(768, dtype=torch.float32), leaf(768, dtype=torch.float32),
                                    scale=leaf(768, dtype=torch.float32), out_dtype=torch.bfloat16, impl="triton")
        (out.float().sum() + s.sum()).backward()
        # DiT's adaLN-Zero boundary: per-sample gate and modulation, affine-free norm
        out, s = ops.add_layer_norm(leaf(2, 34, 768), leaf(2, 34, 768, dtype=torch.float32), None, None,
                                    scale=leaf(2, 1, 768), modulation=(leaf(2, 1, 768), leaf(2, 1, 768)),
                                    eps=1e-6, out_dtype=torch.bfloat16, impl="triton")
        (out.float().sum() + s.sum()).backward()
        with torch.no_grad():
            ops.linear_gelu(torch.randn(2, 33, 768).bfloat16(), torch.randn(3072, 768).bfloat16(),
                            torch.randn(3072).bfloat16(), impl="triton")
    report = [{"name": name, **main_loop(kernel), **ptxas_report(kernel)} for name, kernel in compiled]
    print(_TAG + json.dumps(report))


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the kernels would be interpreted, not compiled")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile"], env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_TAG)]
    assert proc.returncode == 0 and lines, f"compile child failed (rc={proc.returncode}):\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len(_TAG):])


def test_every_kernel_compiles_for_sm90(compiled):
    missing = _all_kernel_names() - {k["name"] for k in compiled}
    assert not missing, f"kernels no op call compiled (add a call to _child): {sorted(missing)}"


def test_matrix_product_kernels_are_pipelined(compiled):
    bad = [k for k in compiled if k["name"] in PIPELINED and not k["async_copies"]]
    assert not bad, f"main loop not software-pipelined: {bad}"
    bad = [k for k in compiled if k["name"] in WGMMA and not k["wgmma"]]
    assert not bad, f"not on wgmma: {bad}"


def test_no_register_spills(compiled):
    bad = [k for k in compiled if k["spill_stores"] > SPILL_ALLOWED.get(k["name"], 0)]
    assert not bad, f"register spills: {bad}"
    assert all(0 < k["registers"] <= 255 for k in compiled), compiled


if __name__ == "__main__":
    if sys.argv[1:] == ["--compile"]:
        _child()
    else:
        sys.exit(pytest.main([__file__, "-q"]))
