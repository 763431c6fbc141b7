"""UIP-AD on the synthetic RGB-D data in its three modes: what each modality catches, on the CPU.

    python bench/rgbd_modes.py [--out runs/rgbd_modes] [--modes rgbd,rgb,depth] [--iters N] [--size 128]
                               [--set key=value ...] [--report bench/RESULTS.md] [--section rgbd-modes-cpu]

Data: :func:`fastproto.data.rgbd.generate_rgbd` (cookie, tile; 40 train / 20 test images each, half anomalous:
``bump`` / ``dent`` (depth only), ``stain`` (colour only), ``swap`` (cross-modal: a red spot that is flat or a
blue spot that is raised; each modality alone looks normal)). The same UIP-AD configuration is trained once per
mode (``--set mode=...``; ``--set`` adds model options to every run) with ``fastproto train`` and evaluated with
the exact evaluator; the report gives the seven metrics (mean over the categories) and the image AUROC of each
defect type (good vs that type, both categories pooled), so a cross-modal gain shows as a ``swap`` column that
the ``rgbd`` run catches and the single-modality runs do not.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time

#: the run configuration (EfficientNet-Lite0 features behind the token adapter, both modalities)
CONFIG = {
    "categories": ("cookie", "tile"),
    "n_train": 40,
    "n_test": 20,
    "backbone": "efficientnet_lite0",
    "backbone_kwargs": {"embed_dim": 128, "stride": 8},
    "batch_size": 8,
    "lr": 2e-3,
    "iters": 300,
    "warmup_iters": 20,
}


def train_argv(mode: str, data: str, out: str, size: int, iters: int, overrides: list[str], seed: int) -> list[str]:
    """The ``fastproto train`` command line of one mode."""
    argv = ["train", "--model", "uipad", "--data", data, "--backbone", CONFIG["backbone"],
            "--image-size", str(size), "--crop-size", "none", "--iters", str(iters),
            "--batch-size", str(CONFIG["batch_size"]), "--lr", str(CONFIG["lr"]),
            "--opt", f"warmup_iters={CONFIG['warmup_iters']}", "--opt", "warmup_epochs=null", "--device", "cpu",
            "--seed", str(seed), "--out", out, "--no-resume", "--workers", "0", "--overlays", "2",
            "--log-every", "50", "--ckpt-every", "100000", "--quiet", "--set", f"mode={json.dumps(mode)}"]
    for key, value in CONFIG["backbone_kwargs"].items():
        argv += ["--set", f"backbone.{key}={json.dumps(value)}"]
    for item in overrides:
        argv += ["--set", item]
    return argv


def defect_auroc(checkpoint: str, data: str, size: int) -> dict[str, float]:
    """Image AUROC (in %) of every defect type against the good images, categories pooled, from the model's
    image scores on the test split."""
    import numpy as np
    import torch

    from fastproto.cli import build_model, load_config
    from fastproto.data import build_dataset, collate
    from scipy.stats import rankdata

    from fastproto.engine import load_weights

    model = load_weights(checkpoint, build_model(load_config(checkpoint)["model"])).eval()
    test = build_dataset(data, "test", image_size=size, crop_size=None)
    scores, defects = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(test, batch_size=16, collate_fn=collate):
            scores.append(model(batch)["score"].float().numpy())
            defects += list(batch["defect"])
    scores, defects = np.concatenate(scores), np.asarray(defects)
    good = defects == "good"
    out = {}
    for kind in sorted(set(defects) - {"good"}):
        pos = defects == kind
        ranks = rankdata(scores[good | pos])[pos[good | pos]]  # Mann-Whitney U: AUROC with ties counted half
        out[kind] = float(100 * (ranks.sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * good.sum()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/rgbd_modes")
    ap.add_argument("--modes", default="rgbd,rgb,depth")
    ap.add_argument("--iters", type=int, default=CONFIG["iters"])
    ap.add_argument("--size", type=int, default=128, help="generated image size = input size (default: 128)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model option for every run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", default="bench/RESULTS.md")
    ap.add_argument("--section", default="rgbd-modes-cpu")
    args = ap.parse_args(argv)

    import torch

    import fastproto
    from fastproto import cli
    from fastproto.data.rgbd import generate_rgbd

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from metrics import write_section  # the section writer shared by the bench scripts

    started = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    root = generate_rgbd(os.path.join(args.out, f"data{args.size}"), categories=CONFIG["categories"],
                         n_train=CONFIG["n_train"], n_test=CONFIG["n_test"], size=args.size, seed=args.seed)
    data = f"mvtec3d:{root}"
    rows = {}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        run_argv = train_argv(mode, data, os.path.join(args.out, mode), args.size, args.iters, args.set, args.seed)
        print(f"== {mode}: fastproto {' '.join(run_argv)}", flush=True)
        tic = time.perf_counter()
        s = cli.run_train(cli.build_parser().parse_args(run_argv))
        rows[mode] = {"mean": s["results"]["mean"], "defects": defect_auroc(s["checkpoint"], data, args.size),
                      "train_seconds": s["train_seconds"], "seconds": time.perf_counter() - tic}
        print(json.dumps({mode: rows[mode]}, indent=1), flush=True)

    kinds = sorted({k for r in rows.values() for k in r["defects"]})
    lines = [
        f"{started}; machine: {platform.machine()} CPU, {os.cpu_count()} cores (torch threads "
        f"{torch.get_num_threads()}); fastproto {fastproto.__version__}, torch {torch.__version__}.",
        f"Data: `generate_rgbd` ({', '.join(CONFIG['categories'])}; {CONFIG['n_train']} train / {CONFIG['n_test']} "
        f"test each, {args.size} px, seed {args.seed}). Model: UIP-AD on {CONFIG['backbone']} "
        f"{CONFIG['backbone_kwargs']} (ImageNet weights, both modalities), {args.iters} iterations of batch "
        f"{CONFIG['batch_size']}, lr {CONFIG['lr']}, options {args.set or 'defaults'}.",
        f"Command: `python bench/rgbd_modes.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        "",
        "| mode | I-AUROC | P-AUROC | AUPRO | " + " | ".join(f"{k} I-AUROC" for k in kinds) + " | training |",
        "|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|",
    ]
    for mode, r in rows.items():
        m = r["mean"]
        lines.append(f"| {mode} | {100 * m['i_auroc']:.2f} | {100 * m['p_auroc']:.2f} | {100 * m['aupro']:.2f} | "
                     + " | ".join(f"{r['defects'].get(k, float('nan')):.1f}" for k in kinds)
                     + f" | {r['train_seconds']:.0f} s |")
    write_section(args.report, args.section, "UIP-AD modes on synthetic RGB-D data — CPU", "\n".join(lines) + "\n")
    with open(os.path.join(args.out, "rgbd_modes.json"), "w") as f:
        json.dump({"config": CONFIG, "args": vars(args), "rows": rows}, f, indent=2, allow_nan=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
