"""Host time of each op's Triton path, without the kernels: what fastproto adds around a launch.

At small batches a fused op is bound by its host time, not by the GPU (bench/RESULTS.md, ops-cuda-summary: about
150 us per ``linear_attention`` call on the H100 against 13-18 us per bare Triton launch). This measures the part
that is ours on any machine, without a GPU: every ``*_kernel`` of ``fastproto.triton`` is replaced by a launcher
that does nothing, ``TRITON_INTERPRET=1`` lets the Triton path dispatch on CPU tensors, and each op is called at a
tiny shape (validation, dispatch, autograd, output allocation, launcher arithmetic; Triton's own launch cost is
not included). Best of 7 rounds of ``--calls`` calls, after 200 warm-up calls.

    python bench/host_overhead.py [--calls 3000] [--json out.json] [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import pkgutil
import platform
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the Triton path then accepts CPU tensors

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from fastproto import ops  # noqa: E402


class _NoLaunch:
    """Stands in for a jitted kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_kernels() -> list:
    from triton.runtime.jit import KernelInterface

    from fastproto import triton as pkg

    stubbed = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"fastproto.triton.{info.name}")
        for name, obj in list(vars(module).items()):
            if isinstance(obj, KernelInterface) and name.endswith("_kernel"):
                setattr(module, name, _NoLaunch())
                stubbed.append(name)
    return stubbed


def _calls():
    """(op, shape, make, call): ``make(grad)`` builds the inputs (requiring grad or not; every tensor on the CPU,
    tiny shapes), ``call(*inputs)`` runs the op; ``make`` is None for inference-only rows."""
    def make(*shapes):
        def build(grad):
            gen = torch.Generator().manual_seed(0)
            return [torch.randn(*s, generator=gen).requires_grad_(grad) for s in shapes]
        return build

    return [
        ("linear_attention", "B=1 H=1 N=16 D=64", make((1, 1, 16, 64), (1, 1, 16, 64), (1, 1, 16, 64)),
         lambda q, k, v: ops.linear_attention(q, k, v, impl="triton")),
        ("prototype_attention (softmax)", "N=16 M=6 D=64", make((1, 1, 16, 64), (1, 1, 6, 64), (1, 1, 6, 64)),
         lambda q, k, v: ops.prototype_attention(q, k, v, kind="softmax", impl="triton")),
        ("route (nearest)", "N=16 M=6 C=64", make((1, 16, 64), (6, 64)),
         lambda x, p: ops.route(x, p, mode="nearest", impl="triton")),
        ("route (soft)", "N=16 M=6 C=64", make((1, 16, 64), (6, 64)),
         lambda x, p: ops.route(x, p, mode="soft", tau=0.1, impl="triton")),
        ("add_layer_norm", "16 x 64, residual + LayerScale", make((1, 16, 64), (1, 16, 64), (64,), (64,), (64,)),
         lambda x, r, g, w, b: ops.add_layer_norm(x, r, w, b, scale=g, impl="triton")),
        ("sinkhorn", "1 x 16 x 4", make((1, 16, 4)), lambda cost: ops.sinkhorn(cost, impl="triton")),
        ("anomaly_map", "4 layers, 2 groups, 4x4 -> 16x16", make(*[(1, 64, 4, 4)] * 8),
         lambda *f: ops.anomaly_map(list(f[:4]), list(f[4:]), 16, groups=[[0, 1], [2, 3]], impl="triton")),
    ]


def _best_us(fn, calls: int) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--json", default=None, help="write the rows as JSON")
    ap.add_argument("--out", default=None, help="write/update the host-overhead section of this Markdown file")
    args = ap.parse_args(argv)
    stubbed = _stub_kernels()
    rows = []
    for op, shape, make, call in _calls():
        plain, grad = make(False), make(True)
        with torch.no_grad():
            inference = _best_us(lambda: call(*plain), args.calls)
        training = None if op == "anomaly_map" else _best_us(lambda: call(*grad), args.calls)  # an inference op
        rows.append({"op": op, "shape": shape, "inference_us": inference, "grad_us": training})
        print(f"{op:30s} {shape:34s} inference {inference:7.1f} us   with grad "
              f"{'-' if training is None else f'{training:7.1f} us'}", flush=True)
    import fastproto

    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "fastproto": fastproto.__version__,
            "triton": importlib.import_module("triton").__version__, "kernels_stubbed": len(stubbed)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.out:
        lines = [f"Host time per call of each op's Triton path with every kernel launch stubbed out "
                 f"({meta['kernels_stubbed']} kernels), `python bench/host_overhead.py --calls {args.calls}`: "
                 f"{meta['cpu']}, {meta['threads']} torch threads, {meta['date']}; torch {meta['torch']}, "
                 f"triton {meta['triton']} (interpreter mode, so the Triton path dispatches on CPU tensors), "
                 f"Python {meta['python']}. Best of 7 rounds of {args.calls} calls after 200 warm-up calls. "
                 "Triton's own launch cost (13-18 us per launch on the H100 with Triton 3.6) comes on top.", "",
                 "| op | shape | inference (no grad) | inputs require grad (forward) |", "|---|---|---:|---:|"]
        for row in rows:
            grad = "-" if row["grad_us"] is None else f"{row['grad_us']:.1f} us"
            lines.append(f"| {row['op']} | {row['shape']} | {row['inference_us']:.1f} us | {grad} |")
        from metrics import write_section

        write_section(args.out, "host-overhead", "Host overhead of the Triton paths (CPU, kernels stubbed)",
               "\n".join(lines))


if __name__ == "__main__":
    main()
