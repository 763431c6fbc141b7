"""Real-data run: the models on real MVTec AD images, on the CPU.

    python bench/real_data.py [--data /work/shared/data/mvtec_reduced] [--models inpformer,dinomaly,proad]
                              [--out runs/real] [--report bench/RESULTS.md] [--section real-cpu] [--iters N]

``--models dpdiff,borad --section real-cpu-5`` runs the issue-5 models into their own report section.

Data: ``mvtec_reduced`` (real MVTec AD hazelnut + transistor at 256 px, 50 train / 10 test images each, with
masks; CC BY-NC-SA 4.0, test data only). Skipped with a message when the folder is absent.

Each model is trained multi-class (both categories together) with ``fastproto train`` on frozen
EfficientNet-Lite0 features (offline ImageNet weights), one model at a time, then evaluated with the exact
evaluator (all seven metrics per category and their mean). The report (``--report``) records the date, machine,
versions, the configuration and the wall time per model. Configuration (:data:`CONFIG`): 256 px input (no crop),
adapter width 128 at stride 16 (a 16 x 16 token grid) for the token models, batch 8, a short warm-up
and cosine decay, the papers' losses and dropout. BoRAD distils from the same EfficientNet-Lite0 as its teacher
(its stage taps, no adapter) with the paper's Adam and step schedule.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                            "mvtec_reduced")
MODELS = ("inpformer", "dinomaly", "proad")  # the default run (issue 4); dpdiff and borad on request

#: per-model run settings (iterations sized for <= 15 min per model on 2 shared CPU cores)
CONFIG = {
    "image_size": 256,
    "backbone": "efficientnet_lite0",
    "backbone_kwargs": {"embed_dim": 128, "stride": 16},
    "batch_size": 8,
    "warmup_iters": 20,
    "models": {
        "inpformer": {"iters": 400, "lr": 2e-3},
        "dinomaly": {"iters": 200, "lr": 2e-3},
        "proad": {"iters": 200, "lr": 1e-3},
        "dpdiff": {"iters": 500, "lr": 1e-3, "set": {"sampling_draws": 4}},  # as the demo: 4 noise draws per image
        # the teacher's own stage taps (no token adapter) and the paper's optimizer / schedule
        "borad": {"iters": 300, "lr": None, "backbone_kwargs": {}, "schedule": "paper"},
    },
}


def train_argv(model: str, data: str, out: str, iters: int | None, seed: int) -> list[str]:
    """The ``fastproto train`` command line for ``model`` (see :data:`CONFIG`)."""
    m = CONFIG["models"][model]
    argv = ["train", "--model", model, "--data", f"mvtec:{data}", "--backbone", CONFIG["backbone"],
            "--image-size", str(CONFIG["image_size"]), "--crop-size", "none",
            "--iters", str(iters or m["iters"]), "--batch-size", str(CONFIG["batch_size"]), "--device", "cpu",
            "--seed", str(seed), "--out", out, "--no-resume", "--workers", "0", "--overlays", "4",
            "--log-every", "20", "--ckpt-every", "100000"]
    if m["lr"] is not None:
        argv += ["--lr", str(m["lr"])]
    if m.get("schedule") != "paper":
        argv += ["--opt", f"warmup_iters={CONFIG['warmup_iters']}", "--opt", "warmup_epochs=null"]
    for key, value in m.get("backbone_kwargs", CONFIG["backbone_kwargs"]).items():
        argv += ["--set", f"backbone.{key}={json.dumps(value)}"]
    for key, value in m.get("set", {}).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    return argv


def _report(rows: dict, args, started: str, load: tuple[float, float]) -> str:
    import numpy as np
    import torch

    import fastproto
    from fastproto.engine import markdown_table

    lines = [
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), shared "
        f"with other jobs (load average at start / end {load[0]:.2f} / {load[1]:.2f}: wall times are upper bounds). "
        f"Versions: fastproto {fastproto.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}.",
        f"Data: `{os.path.abspath(args.data)}`: 50 train / 10 test images per category (2 good + 4 defect types x 2), "
        "256 px, multi-class training (one model for both categories).",
        f"Setup: frozen {CONFIG['backbone']} (ImageNet weights, offline) behind the token adapter "
        f"{CONFIG['backbone_kwargs']}, input {CONFIG['image_size']} px without crop, batch {CONFIG['batch_size']}, "
        f"StableAdamW with {CONFIG['warmup_iters']} warm-up iterations then cosine, the papers' losses, dropout "
        "and clipping; exact evaluator at 256 px, image score = each model's own rule (its docstring).",
        *(f"{name}: backbone options {CONFIG['models'][name].get('backbone_kwargs', CONFIG['backbone_kwargs'])}, "
          "the paper's optimizer and schedule (no warm-up / lr override)."
          for name in rows if CONFIG["models"][name].get("schedule") == "paper"),
        *(f"{name}: model options {CONFIG['models'][name]['set']}." for name in rows if CONFIG["models"][name].get("set")),
        f"Command: `python bench/real_data.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        "",
    ]
    for name, r in rows.items():
        lines += [f"### {name}: {r['step']} iterations, lr {r['lr']}, training {r['train_seconds'] / 60:.1f} min, "
                  f"evaluation {r['eval_seconds']:.1f} s", "", markdown_table(r["results"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.normpath(DEFAULT_DATA))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="runs/real")
    ap.add_argument("--report", default="bench/RESULTS.md", help="Markdown file whose --section is written")
    ap.add_argument("--section", default="real-cpu", help="report section (default: real-cpu)")
    ap.add_argument("--iters", type=int, default=None, help="override every model's iterations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not os.path.isdir(args.data):
        print(f"skipped: real-data folder {args.data} is absent (needs mvtec_reduced in MVTec layout)")
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in CONFIG["models"]]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {list(CONFIG['models'])}", file=sys.stderr)
        return 2

    from fastproto import cli

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from metrics import write_section  # the section writer shared by the bench scripts

    started = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    load0 = os.getloadavg()[0]
    rows = {}
    for name in models:  # one model at a time
        argv_m = train_argv(name, args.data, os.path.join(args.out, name), args.iters, args.seed)
        print(f"== {name}: fastproto {' '.join(argv_m)}", flush=True)
        ns = cli.build_parser().parse_args(argv_m)
        s = cli.run_train(ns)
        rows[name] = {"results": s["results"], "step": s["step"], "train_seconds": s["train_seconds"],
                      "eval_seconds": s["eval_seconds"], "lr": CONFIG["models"][name]["lr"] or "paper"}
        print(f"{name}: training {s['train_seconds']:.0f} s, evaluation {s['eval_seconds']:.0f} s", flush=True)
        # the section is rewritten after every model, so a partial run is kept
        write_section(args.report, args.section,
                      f"Real data (MVTec AD hazelnut + transistor, reduced) — CPU, {started}",
                      _report(rows, args, started, (load0, os.getloadavg()[0])))
        with open(os.path.join(args.out, "results_real.json"), "w") as f:
            json.dump({"config": CONFIG, "started": started, "rows": rows}, f, indent=2, allow_nan=True)
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
