"""``fastproto`` console script: ``info``, ``eval``, ``bench``, ``demo``."""
from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_bench_script(name: str, argv: list[str]) -> int:
    path = os.path.join(_REPO, "bench", name)
    if not os.path.exists(path):
        print(f"error: {path} not found: benchmarks ship with the source checkout, not the wheel", file=sys.stderr)
        return 2
    old = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old
    return 0


def format_table(results: dict[str, dict[str, float]], keys=None) -> str:
    """Markdown table: one row per category (``mean`` last), values in percent."""
    from fastproto.metrics import METRICS

    keys = list(keys or [*METRICS, "mad"])
    lines = ["| category | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    order = [c for c in results if c != "mean"] + (["mean"] if "mean" in results else [])
    for cat in order:
        cells = ["nan" if math.isnan(results[cat][k]) else f"{100 * results[cat][k]:.2f}" for k in keys]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _eval(args) -> int:
    import numpy as np

    from fastproto.metrics import Evaluator

    if not os.path.exists(args.npz):
        print(f"error: {args.npz} does not exist", file=sys.stderr)
        return 2
    data = np.load(args.npz, allow_pickle=False)
    for key in ("anomaly_maps", "masks"):
        if key not in data:
            print(f"error: {args.npz} has no array {key!r} (found {sorted(data.files)})", file=sys.stderr)
            return 2
    ev = Evaluator(args.protocol, device=args.device, image_score=args.image_score, topk=args.topk,
                   fpr_limit=args.fpr_limit, resolution=args.resolution)
    get = lambda k: data[k] if k in data.files else None  # noqa: E731
    cats = get("categories")
    ev.update(data["anomaly_maps"], data["masks"], categories=None if cats is None else [str(c) for c in cats],
              image_scores=get("image_scores"), image_labels=get("image_labels"))
    results = ev.compute(with_bounds=args.protocol == "binned")
    print(format_table(results))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastproto", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and active implementations")
    p_eval = sub.add_parser("eval", help="evaluate saved anomaly maps (.npz with anomaly_maps, masks, "
                                         "optional categories, image_scores, image_labels)")
    p_eval.add_argument("npz")
    p_eval.add_argument("--protocol", default="exact", choices=["exact", "binned", "dinomaly", "ader", "adeval"])
    p_eval.add_argument("--image-score", default="max", choices=["max", "topk_mean", "avgpool_max"])
    p_eval.add_argument("--topk", type=float, default=0.01)
    p_eval.add_argument("--fpr-limit", type=float, default=0.3)
    p_eval.add_argument("--resolution", type=int, default=None)
    p_eval.add_argument("--device", default=None)
    p_eval.add_argument("--json", default=None, help="also write the results as JSON here")
    p_bench = sub.add_parser("bench", help="run a benchmark from bench/ (source checkout)")
    p_bench.add_argument("target", nargs="?", default="metrics", choices=["metrics"])
    p_bench.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("demo", help="the metrics benchmark on built-in synthetic data (150 images, 256x256)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from fastproto import info

        info()
        return 0
    if args.command == "eval":
        return _eval(args)
    if args.command == "bench":
        return _run_bench_script(f"{args.target}.py", args.rest)
    if args.command == "demo":
        return _run_bench_script("metrics.py", ["--images", "150", "--no-heavy", "--repeats", "3"])
    return 2


if __name__ == "__main__":
    sys.exit(main())
