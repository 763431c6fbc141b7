"""Binned protocol on a Real-IAD-sized stream: host memory stays fixed however many pixels go through.

    python bench/stream_memory.py [--pixels 7.5e9] [--categories 30] [--batch 16] [--out bench/RESULTS.md]

A pool of synthetic MVTec-like batches (``fastproto.metrics.synthetic``) is made once and cycled,
round-robin over the categories, through one ``Evaluator("binned")`` until ``--pixels`` pixels were
evaluated; the pool stands in for a data loader. Reported: peak resident memory of the process above
the level before the stream (kernel ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
the evaluator's state size, wall time and throughput.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _measure import rss_bytes  # noqa: E402
from metrics import write_section  # noqa: E402

from fastproto.metrics import Evaluator  # noqa: E402
from fastproto.metrics.synthetic import make_maps  # noqa: E402


def peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pixels", type=float, default=7.5e9)
    ap.add_argument("--categories", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pool", type=int, default=8, help="distinct batches generated and cycled")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    pool = [tuple(map(torch.from_numpy, make_maps(args.batch, args.size, seed=s))) for s in range(args.pool)]
    per_batch = args.batch * args.size * args.size
    n_batches = int(np.ceil(args.pixels / per_batch))
    ev = Evaluator("binned")
    base = rss_bytes()
    peak_rss_reset()
    t0 = time.perf_counter()
    state_sizes = []
    for i in range(n_batches):
        maps, masks = pool[i % args.pool]
        ev.update(maps, masks, categories=f"cat{i % args.categories:02d}")
        if (i + 1) % max(1, n_batches // 10) == 0:
            state_sizes.append(sum(c.hist.nbytes for c in ev._categories.values()))
            print(f"{(i + 1) * per_batch / 1e9:6.2f} G px, state {state_sizes[-1] / 2**20:7.1f} MiB, "
                  f"peak extra RSS {(peak_rss() - base) / 2**20:7.1f} MiB, {time.perf_counter() - t0:6.1f} s", flush=True)
    res = ev.compute(with_bounds=True)
    elapsed = time.perf_counter() - t0
    peak = peak_rss() - base
    state = sum(c.hist.nbytes for c in ev._categories.values())
    total = n_batches * per_batch
    bounds = {k: max(r[k] for c, r in res.items() if c != "mean")
              for k in ("p_auroc_bound", "p_ap_bound", "p_f1max_bound", "aupro_bound")}
    body = "\n".join([
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M')}.",
        f"Command: `python bench/stream_memory.py {' '.join(argv or sys.argv[1:])}`",
        "",
        "| pixels | categories | batches | time | throughput | state (all categories) | peak extra RSS | "
        "max bound P-AUROC / P-AP / P-F1 / AUPRO |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | :--- |",
        f"| {total / 1e9:.2f} G | {args.categories} | {n_batches} | {elapsed:.1f} s | "
        f"{total / elapsed / 1e6:.0f} M px/s | {state / 2**20:.1f} MiB | {peak / 2**20:.1f} MiB | "
        + " / ".join(f"{bounds[k]:.1e}" for k in bounds) + " |",
        "",
        "State size at each tenth of the stream (MiB): " + ", ".join(f"{s / 2**20:.1f}" for s in state_sizes) + ".",
    ])
    print(body)
    if args.out:
        write_section(args.out, "stream", "Binned evaluation of a Real-IAD-sized stream (CPU)", body)


if __name__ == "__main__":
    main()
