"""Environment report: versions and which implementation each op family dispatches to."""
from __future__ import annotations

import platform

import numpy as np
import torch

from fastproto import _ext


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception:  # triton is optional; any import failure means "not available"
        return None


def _compiled_ops() -> dict:
    """op -> the extension operator behind its ``impl="cuda"`` (named where the op defines it)."""
    import importlib

    proto = importlib.import_module("fastproto.ops.prototype")
    return {"linear_attention": importlib.import_module("fastproto.ops.linear_attention").COMPILED_OP,
            "prototype_attention": proto.ATTENTION_OP, "route": proto.NEAREST_OP,
            "sinkhorn": importlib.import_module("fastproto.ops.sinkhorn").COMPILED_OP}


def _op_implementations(name: str) -> dict:
    """What ``impl="auto"`` runs on each device, and whether the compiled ``impl="cuda"`` kernel is built."""
    compiled = _compiled_ops().get(name)
    has_cuda_kernel = compiled is not None and _ext.has_op(compiled, "cuda")
    auto_cuda = "triton" if _triton_version() else ("cuda" if has_cuda_kernel else "reference")
    entry = {"cpu": "reference", "cuda": auto_cuda}
    if compiled is not None:
        entry["impl='cuda'"] = "built" if has_cuda_kernel else "not built"
    return entry


def info(print_out: bool = True) -> dict:
    """Collect (and by default print) versions and active implementations."""
    import fastproto

    cuda = torch.cuda.is_available()
    report = {
        "fastproto": fastproto.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": _triton_version(),
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "extension": _ext.available(),
        "extension_error": _ext.load_error(),
        "extension_cuda": _ext.cuda_built(),
        "openmp_threads": torch.get_num_threads(),
        "implementations": {
            "connected_components": {
                "cpu": "c++" if _ext.has_op("connected_components", "cpu") else "scipy",
                "cuda": "cuda" if _ext.has_op("connected_components", "cuda") else "cpu-copy",
            },
            "exact_metrics": {
                "cpu": "c++" if _ext.has_op("count_negatives", "cpu") else "torch",
                "cuda": "cuda" if _ext.has_op("count_negatives", "cuda") else "torch",
            },
            "binned_metrics": {
                "cpu": "c++" if _ext.has_op("histogram_update", "cpu") else "torch",
                "cuda": "cuda" if _ext.has_op("histogram_update", "cuda") else "torch",
            },
            **{name: _op_implementations(name) for name in
               ("anomaly_map", "add_layer_norm", "linear_gelu", "linear_attention", "prototype_attention", "route",
                "sinkhorn")},
        },
    }
    if print_out:
        width = max(len(k) for k in report)
        for key, value in report.items():
            if key == "implementations":
                print("implementations:")
                for name, impls in value.items():
                    print(f"  {name:<22} " + ", ".join(f"{d}={i}" for d, i in impls.items()))
            elif value is not None or key == "extension_error":
                if key == "extension_error" and value is None:
                    continue
                print(f"{key:<{width}} {value}")
    return report
