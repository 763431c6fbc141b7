"""Resources of every CUDA kernel as ptxas reports them (registers, stack frame, spills), for sm_90 with the
extension's flags, and of every Triton kernel as the ops launch it (compiled for sm_90 through the real host
code by tests/test_triton_compile.py: registers, spills, shared memory, pipelined main loop, wgmma). Needs nvcc
and triton, no GPU: what a kernel keeps in registers and what goes to local memory is read here before any GPU
time is spent (HOPPER.md: a run-time indexed array or a spill costs local-memory traffic).

    python bench/kernel_resources.py [--out bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metrics import write_section  # noqa: E402
from tests.test_cuda_build import NVCC_FLAGS, ROOT, cuda_home  # noqa: E402
from tests.test_triton_compile import _TAG as TRITON_TAG  # noqa: E402

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = []
    for name in out.splitlines():
        name = re.sub(r"\(anonymous namespace\)::|fastproto::cuda::|fastproto::", "", name)
        short.append(re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name))  # drop the parameter list
    return short


def report(source: Path, nvcc: Path):
    """[(kernel, registers, stack bytes, spill store bytes, spill load bytes)] of one .cu file."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(nvcc), *NVCC_FLAGS, "-Xptxas", "-v", "-I", str(ROOT / "kernels"), "-c",
                               str(source), "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"nvcc failed on {source}:\n{proc.stderr}")
    rows, name, frame = [], None, None
    for line in proc.stderr.splitlines():
        if m := _ENTRY.search(line):
            name = m.group(1)
        elif m := _FRAME.search(line):
            frame = tuple(int(x) for x in m.groups())
        elif (m := _REGS.search(line)) and name is not None:
            rows.append((name, int(m.group(1)), *(frame or (0, 0, 0))))
            name, frame = None, None
    names = demangle([r[0] for r in rows])
    return sorted((n, *r[1:]) for n, r in zip(names, rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write/update the kernel-resources section of this Markdown file")
    args = ap.parse_args(argv)
    home = cuda_home()
    if home is None:
        raise SystemExit("nvcc not found")
    nvcc = home / "bin" / "nvcc"
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [f"{version}; flags `{' '.join(NVCC_FLAGS)}`; {datetime.date.today()}. Compile-time facts, no GPU run: "
             "stack frame > 0 means local memory (a run-time indexed array or spills).", "",
             "| file | kernel | registers | stack frame (B) | spill stores / loads (B) |", "|---|---|---:|---:|---:|"]
    for source in sorted((ROOT / "kernels").glob("*.cu")):
        for name, regs, stack, st, ld in report(source, nvcc):
            lines.append(f"| {source.name} | `{name}` | {regs} | {stack} | {st} / {ld} |")
    body = "\n".join(lines)
    print(body)
    if args.out:
        write_section(args.out, "kernel-resources", "CUDA kernel resources (ptxas, sm_90)", body)
    triton_body = triton_report()
    print(triton_body)
    if args.out:
        write_section(args.out, "triton-resources", "Triton kernel resources (compiled for sm_90 without a GPU)",
                      triton_body)


def triton_report() -> str:
    """Every Triton kernel as the ops launch it (tests/test_triton_compile.py's calls, compiled for sm_90 through
    the real host code): registers, spills, shared memory, and whether a main loop is pipelined / on wgmma."""
    import triton

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "test_triton_compile.py"), "--compile"], env=env,
                          capture_output=True, text=True, check=True)
    rows = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith(TRITON_TAG)][-1][len(TRITON_TAG):])
    lines = [f"Triton {triton.__version__}, sm_90 target, ptxas -v on the PTX; {datetime.date.today()}. One row per "
             "compiled variant, in launch order (forward, then backward; autotuned kernels: every config). "
             "Compile-time facts, no GPU run.", "",
             "| kernel | registers | spill stores / loads (B) | shared (B) | pipelined main loop | wgmma |",
             "|---|---:|---:|---:|:---:|:---:|"]
    for k in rows:
        lines.append(f"| `{k['name']}` | {k['registers']} | {k['spill_stores']} / {k['spill_loads']} | {k['shared']} | "
                     f"{'yes' if k['async_copies'] else ''} | {'yes' if k['wgmma'] else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
