"""``fastproto`` console script: ``train``, ``eval``, ``bench``, ``demo``, ``info``.

::

    fastproto train --model proad --data mvtec:/data/mvtec [--categories a,b] [--backbone efficientnet_lite0]
                    [--image-size 448 --crop-size 392] [--iters N | --epochs N] [--batch-size 16] [--lr 1e-4]
                    [--amp bf16] [--device cpu|cuda] [--seed 0] [--out runs/proad] [--no-resume] [--eval-every N]
                    [--workers 4] [--on-bad-file error|skip] [--set key=value ...] [--opt key=value ...]
                    [--no-pretrained] [--overlays 8]
    fastproto eval --checkpoint runs/proad/last.pt [--data mvtec:/data/mvtec] [--protocol exact] [--overlays 8]
    fastproto eval maps.npz [--protocol exact] [--json out.json]        # saved anomaly maps
    fastproto demo [--model inpformer --model proad | --models inpformer,proad] [--out runs/demo] [--quick]
    fastproto bench metrics [...]                                          # bench/ scripts (source checkout)
    fastproto info

``train`` writes ``config.json`` (model, backbone, data and run settings) first, then ``last.pt`` (resumable,
atomic) and ``log.jsonl`` as it trains, and ``results.json`` / ``results.md`` (the seven metrics per category
on the test split) plus overlay PNGs at the end. It runs unchanged under ``torchrun`` (DDP; the evaluator's
states are merged across ranks). ``--set key=value`` overrides a model option (``--set dropout=0.1``,
``--set layers=[0,1,2,3]``; values are JSON literals, else strings) and ``--set backbone.key=value`` a backbone
option (``--set backbone.embed_dim=128``); ``--opt key=value`` overrides the optimizer / schedule
(:class:`fastproto.engine.OptimConfig` keys, e.g. ``--opt warmup_iters=20``).

``eval --checkpoint`` rebuilds the model from the model section stored at training time (in the checkpoint's
``config``, else in ``config.json`` beside it), loads the weights with ``weights_only=True`` and evaluates;
data spec, categories and image sizes default to the training ones.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import runpy
import sys
import time
from typing import Any

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAME = "config.json"
PROTOCOLS = ("exact", "binned", "dinomaly", "ader", "adeval")  # == fastproto.metrics.PROTOCOLS (lazy import)


class UsageError(ValueError):
    """A command-line problem reported as ``error: ...`` with exit status 2."""


# ---------------------------------------------------------------------------------------------- parsing helpers


def parse_value(text: str) -> Any:
    """A ``--set`` value: a JSON literal (number, bool, null, list, object) when it parses, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_overrides(items: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["a=1", "b.c=[1,2]"]`` -> ``{"a": 1, "b.c": [1, 2]}``; a malformed item is a :class:`UsageError`."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def split_model_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` entries -> (model options, backbone options named ``backbone.<key>``)."""
    model_cfg = {k: v for k, v in overrides.items() if not k.startswith("backbone.")}
    backbone_cfg = {k[len("backbone."):]: v for k, v in overrides.items() if k.startswith("backbone.")}
    return model_cfg, backbone_cfg


def _size(text: str) -> int | None:
    """``--image-size`` / ``--crop-size``: a positive int, or ``none`` / ``0`` for no resize / no crop."""
    if text.lower() in ("none", "0"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"size must be >= 0, got {value}")
    return value


def _csv(text: str | None, option: str = "--categories") -> list[str] | None:
    """``"a, b"`` -> ``["a", "b"]`` (``None`` stays ``None``); an empty list is a :class:`UsageError`."""
    if text is None:
        return None
    items = [c.strip() for c in text.split(",") if c.strip()]
    if not items:
        raise UsageError(f"{option} {text!r} names nothing")
    return items


class _Stored:
    """Default of an option left unset: ``eval`` takes the value recorded at training time, ``train`` the
    model's paper setting."""

    def __repr__(self) -> str:
        return "the training one"


STORED = _Stored()


# ---------------------------------------------------------------------------------------------- model specs


def model_spec(name: str, backbone: str, cfg: dict[str, Any] | None = None,
               backbone_kwargs: dict[str, Any] | None = None, input_size: int | None = None) -> dict[str, Any]:
    """The model section stored in ``config.json`` and in checkpoints: everything :func:`build_model` needs.

    Models whose token count depends on the image size (Pro-AD: one prototype per token) get
    ``image_size=input_size`` unless it is set explicitly."""
    from fastproto import models

    cfg = dict(cfg or {})
    takes_size = "image_size" in inspect.signature(models.model_class(name).__init__).parameters
    if input_size is not None and takes_size and "image_size" not in cfg:
        cfg["image_size"] = input_size
    return {"name": name, "backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}), "cfg": cfg}


def build_model(spec: dict[str, Any], pretrained: bool | str = False):
    """Build the model described by ``spec`` (:func:`model_spec`); ``pretrained`` is for the backbone."""
    from fastproto import backbones, models

    missing = [k for k in ("name", "backbone", "cfg") if k not in spec]
    if missing:
        raise UsageError(f"model config lacks {missing} (has {sorted(spec)})")
    models.model_class(spec["name"])  # unknown names fail before the backbone is built
    try:
        encoder = backbones.create(spec["backbone"], pretrained=pretrained, **spec.get("backbone_kwargs", {}))
    except TypeError as e:  # an unknown backbone option (``--set backbone.<key>=...``)
        raise UsageError(f"backbone {spec['backbone']!r}: {e}") from e
    return models.create(spec["name"], backbone=encoder, **spec["cfg"])


def _paper_defaults(args: argparse.Namespace) -> None:
    """Fill ``--backbone`` / ``--image-size`` / ``--crop-size`` left unset with the model's paper setting: its
    ``default_backbone`` (DINOv2 ViT-B/14 reg unless the model names another) and its training image size
    (``TRAINING["image_size"]``, no crop: BoRAD's 256 px) or else 448 -> crop 392."""
    from fastproto import models

    try:
        cls = models.model_class(args.model)
    except ValueError as e:
        raise UsageError(str(e)) from e
    if args.backbone is None:
        args.backbone = getattr(cls, "default_backbone", models.DEFAULT_BACKBONE)
    paper_size = getattr(cls, "TRAINING", {}).get("image_size")
    if args.image_size is STORED:
        args.image_size = paper_size or 448
    if args.crop_size is STORED:
        args.crop_size = None if paper_size else 392


def _input_size(image_size: int | None, crop_size: int | None) -> int | None:
    return crop_size if crop_size is not None else image_size


def _versions() -> dict[str, str]:
    import numpy as np
    import torch

    import fastproto

    return {"fastproto": fastproto.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- train


def _datasets(data: dict[str, Any], splits=("train", "test")):
    from fastproto.data import build_dataset

    return [build_dataset(data["spec"], split, categories=data.get("categories"), image_size=data["image_size"],
                          crop_size=data["crop_size"], on_bad_file=data.get("on_bad_file", "error"))
            for split in splits]


def _device(requested: str | None):
    import torch

    from fastproto.engine.distributed import default_device, dist_info

    if requested is None or (requested == "cuda" and dist_info().world_size > 1):
        return default_device()  # under torchrun: this rank's GPU
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: CUDA is not available (torch {torch.__version__})")
    return torch.device(requested)


def _fit_warmup(optimizer: dict[str, Any], model_defaults: dict[str, Any], length: dict[str, float],
                per_epoch: int) -> None:
    """Shorten a warm-up longer than the run (the papers' 100 iterations / 10 epochs in a short run) to the
    run's length, in ``optimizer`` (the overrides), with a warning."""
    import math
    import warnings

    from fastproto.engine import OptimConfig

    cfg = OptimConfig.merge(model_defaults, optimizer)
    total = int(length["iters"]) if "iters" in length else math.ceil(length["epochs"] * per_epoch)
    warmup = round(cfg.warmup_epochs * per_epoch) if cfg.warmup_epochs is not None else cfg.warmup_iters
    if cfg.schedule == "cosine" and warmup > total:
        warnings.warn(f"the warm-up ({warmup} iterations) is longer than the run ({total}): shortened to {total}",
                      RuntimeWarning, stacklevel=3)
        optimizer.update(warmup_iters=total, warmup_epochs=None)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """``fastproto train``: returns ``{"results", "out", "checkpoint", "train_seconds", "eval_seconds", ...}``."""
    import torch

    from fastproto.data import collate
    from fastproto.engine import (
        build_eval_loader,
        build_train_loader,
        checkpoint,
        evaluate,
        init_distributed,
        markdown_table,
        save_results,
        seed_everything,
        train,
        write_json,
    )

    info = init_distributed()
    device = _device(args.device)
    args.out = args.out or os.path.join("runs", args.model)
    model_cfg, backbone_cfg = split_model_overrides(parse_overrides(args.set))
    optimizer = parse_overrides(args.opt, "--opt")
    if args.lr is not None:
        optimizer["lr"] = args.lr
    _paper_defaults(args)
    data = {"spec": args.data, "categories": _csv(args.categories), "image_size": args.image_size,
            "crop_size": args.crop_size, "on_bad_file": args.on_bad_file}
    spec = model_spec(args.model, args.backbone, model_cfg, backbone_cfg, _input_size(args.image_size, args.crop_size))
    train_set, test_set = _datasets(data)  # bad specs / paths / categories fail before the model is built

    seed_everything(args.seed)  # the same initial weights on every rank and in every run
    model = build_model(spec, pretrained=not args.no_pretrained)
    defaults = model.training_config()
    batch_size = args.batch_size or defaults.get("batch_size", 16)
    if len(train_set) < batch_size * info.world_size:
        raise UsageError(f"--batch-size {batch_size} x {info.world_size} rank(s) exceeds the {len(train_set)} "
                         f"training images of {args.data}")
    if args.iters is not None or args.epochs is not None:
        length = {"iters": args.iters} if args.iters is not None else {"epochs": args.epochs}
    else:
        length = {k: defaults[k] for k in ("iters", "epochs") if k in defaults} or {"iters": 1000}
    train_loader = build_train_loader(train_set, batch_size, seed=args.seed, num_workers=args.workers,
                                      collate_fn=collate, pin_memory=device.type == "cuda")
    _fit_warmup(optimizer, model.optimizer_config(), length, len(train_loader))
    run = {**length, "batch_size": batch_size, "seed": args.seed, "amp": args.amp, "device": str(device),
           "optimizer": optimizer, "world_size": info.world_size, "eval_every": args.eval_every,
           "pretrained": not args.no_pretrained}
    config = {"model": spec, "data": data, "train": run, "versions": _versions()}
    os.makedirs(args.out, exist_ok=True)
    if info.is_main:
        write_json(os.path.join(args.out, CONFIG_NAME), config)

    test_loader = build_eval_loader(test_set, batch_size, num_workers=args.workers, collate_fn=collate)
    overlays_dir = os.path.join(args.out, "overlays") if args.overlays > 0 else None

    def eval_fn(m):
        return evaluate(m, test_loader, protocol=args.protocol, device=device, amp=args.amp,
                        overlays_dir=overlays_dir, max_overlays_per_category=args.overlays, compile=args.compile)

    tic = time.perf_counter()
    out = train(model, train_loader, **length, optimizer=optimizer, out_dir=args.out, amp=args.amp, seed=args.seed,
                ckpt_every=args.ckpt_every, resume=args.resume, eval_fn=eval_fn if args.eval_every else None,
                eval_every=args.eval_every, log_every=args.log_every, progress=not args.quiet, device=device,
                compile=args.compile)
    train_seconds = time.perf_counter() - tic
    if info.is_main:  # the model section goes into the checkpoint itself, so that it is self-describing
        ckpt = checkpoint.read_checkpoint(out["checkpoint"])
        ckpt["config"] = {**ckpt.get("config", {}), "model": spec, "data": data}
        checkpoint.atomic_write(out["checkpoint"], lambda f: torch.save(ckpt, f))
    tic = time.perf_counter()
    results = out["metrics"] if args.eval_every and out["metrics"] else eval_fn(model)
    eval_seconds = time.perf_counter() - tic
    summary = {"results": results, "out": args.out, "checkpoint": out["checkpoint"], "step": out["step"],
               "train_seconds": train_seconds, "eval_seconds": eval_seconds, "loss": out["loss"], "config": config}
    if info.is_main:
        meta = {"model": spec["name"], "backbone": spec["backbone"], "data": args.data, "step": out["step"],
                "protocol": args.protocol, "train_seconds": round(train_seconds, 1),
                "eval_seconds": round(eval_seconds, 1), "device": str(device), "world_size": info.world_size}
        save_results(results, args.out, meta=meta)
        if not args.quiet:
            print(markdown_table(results), end="")
    return summary


# ---------------------------------------------------------------------------------------------- eval


def load_config(checkpoint_path: str) -> dict[str, Any]:
    """The training config of ``checkpoint_path``: the checkpoint's own ``config`` when it holds the model
    section, else ``config.json`` beside it. Raises :class:`UsageError` naming both places."""
    from fastproto.engine import checkpoint

    obj = checkpoint.read_checkpoint(checkpoint_path)
    stored = obj.get("config", {}) if isinstance(obj, dict) and obj.get("format") == checkpoint.FORMAT else {}
    if "model" in stored:
        return stored
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CONFIG_NAME)
    if os.path.isfile(beside):
        with open(beside) as f:
            config = json.load(f)
        if "model" in config:
            return config
    raise UsageError(f"no model config for {checkpoint_path!r}: neither the checkpoint's config nor {beside} has a "
                     "'model' section (train with `fastproto train`, or put its config.json beside the weights)")


def run_eval_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """``fastproto eval --checkpoint``: returns ``{"results", "out", "seconds"}``."""
    from fastproto.data import collate
    from fastproto.engine import (
        build_eval_loader,
        evaluate,
        init_distributed,
        load_weights,
        markdown_table,
        save_results,
    )

    info = init_distributed()
    device = _device(args.device)
    config = load_config(args.checkpoint)
    stored = config.get("data", {})
    data = {"spec": args.data or stored.get("spec"),
            "categories": _csv(args.categories) if args.categories else stored.get("categories"),
            "image_size": args.image_size if args.image_size is not STORED else stored.get("image_size", 448),
            "crop_size": args.crop_size if args.crop_size is not STORED else stored.get("crop_size", 392),
            "on_bad_file": args.on_bad_file}
    if not data["spec"]:
        raise UsageError(f"no --data given and {args.checkpoint!r} records no data spec")
    (test_set,) = _datasets(data, ("test",))
    model = load_weights(args.checkpoint, build_model(config["model"], pretrained=False)).to(device)
    loader = build_eval_loader(test_set, args.batch_size, num_workers=args.workers, collate_fn=collate)
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
    tic = time.perf_counter()
    results = evaluate(model, loader, protocol=args.protocol, resolution=args.resolution,
                       image_score=args.image_score or "model", topk=args.topk, device=device, amp=args.amp,
                       overlays_dir=os.path.join(out_dir, "overlays") if args.overlays > 0 else None,
                       max_overlays_per_category=args.overlays, progress=not args.quiet, fpr_limit=args.fpr_limit,
                       compile=args.compile)
    seconds = time.perf_counter() - tic
    if info.is_main:
        meta = {"checkpoint": args.checkpoint, "model": config["model"]["name"], "data": data["spec"],
                "protocol": args.protocol, "eval_seconds": round(seconds, 1), "device": str(device)}
        os.makedirs(out_dir, exist_ok=True)
        save_results(results, out_dir, meta=meta)
        print(markdown_table(results), end="")
    return {"results": results, "out": out_dir, "seconds": seconds}


def run_eval_scores(args: argparse.Namespace) -> dict[str, Any]:
    """``fastproto eval maps.npz``: the metrics of saved ``anomaly_maps`` / ``masks`` (optional ``categories``,
    ``image_scores``, ``image_labels``)."""
    import numpy as np

    from fastproto.engine import markdown_table, write_json
    from fastproto.metrics import Evaluator

    if not os.path.exists(args.scores):
        raise UsageError(f"{args.scores} does not exist")
    data = np.load(args.scores, allow_pickle=False)
    for key in ("anomaly_maps", "masks"):
        if key not in data:
            raise UsageError(f"{args.scores} has no array {key!r} (found {sorted(data.files)})")
    ev = Evaluator(args.protocol, device=args.device, image_score=args.image_score or "max", topk=args.topk,
                   fpr_limit=args.fpr_limit, resolution=args.resolution)
    get = lambda k: data[k] if k in data.files else None
    cats = get("categories")
    ev.update(data["anomaly_maps"], data["masks"], categories=None if cats is None else [str(c) for c in cats],
              image_scores=get("image_scores"), image_labels=get("image_labels"))
    results = ev.compute(with_bounds=args.protocol == "binned")
    print(markdown_table(results), end="")
    if args.json:
        write_json(args.json, results)
    return {"results": results}


# ---------------------------------------------------------------------------------------------- bench


def _run_bench_script(name: str, argv: list[str]) -> int:
    path = os.path.join(_REPO, "bench", name)
    if not os.path.exists(path):
        raise UsageError(f"{path} not found: benchmarks ship with the source checkout, not the wheel")
    old = sys.argv
    sys.argv = [path, *argv]
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = old
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="exact", choices=PROTOCOLS, help="metric protocol (default: exact)")
    p.add_argument("--overlays", type=int, default=8, metavar="N",
                   help="anomaly-map overlay PNGs per category (0: none)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model's forward (and the training loss) with this backend "
                        "(default: inductor; off without the flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastproto", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and active implementations")

    t = sub.add_parser("train", help="train a model, then evaluate it on the test split")
    t.add_argument("--model", required=True, help="inpformer | dinomaly | proad (fastproto.models.list_models())")
    t.add_argument("--data", required=True, help="dataset spec <format>:<path>, e.g. mvtec:/data/mvtec")
    t.add_argument("--categories", default=None, help="comma-separated categories (default: all, multi-class)")
    t.add_argument("--backbone", default=None,
                   help="fastproto.backbones name (default: the model's paper backbone, dinov2_vitb14_reg; "
                        "BoRAD wide_resnet50_2)")
    t.add_argument("--image-size", type=_size, default=STORED,
                   help="resize to this square size (none: keep; default: the paper's, 448, BoRAD 256)")
    t.add_argument("--crop-size", type=_size, default=STORED,
                   help="centre crop (none: no crop; default: the paper's, 392, BoRAD none)")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, help="optimizer steps (default: the paper's run)")
    length.add_argument("--epochs", type=float, default=None)
    t.add_argument("--batch-size", type=int, default=None, help="per rank (default: the paper's, 16)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's)")
    t.add_argument("--opt", action="append", metavar="KEY=VALUE", help="optimizer / schedule override (repeatable)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model option override, backbone.KEY=VALUE for the backbone (repeatable)")
    t.add_argument("--amp", default=None, choices=["bf16", "fp16"], help="mixed precision (default: fp32)")
    t.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: this rank's GPU, else cpu)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run folder (default: runs/<model>)")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from <out>/last.pt when present (default: yes)")
    t.add_argument("--eval-every", type=int, default=None, metavar="N", help="also evaluate every N iterations")
    t.add_argument("--ckpt-every", type=int, default=1000, metavar="N")
    t.add_argument("--log-every", type=int, default=50, metavar="N")
    t.add_argument("--workers", type=int, default=4, help="DataLoader workers")
    t.add_argument("--on-bad-file", default="error", choices=["error", "skip"])
    t.add_argument("--no-pretrained", action="store_true", help="random backbone weights (tests, smoke runs)")
    t.add_argument("--quiet", action="store_true", help="no progress bar or table")
    _add_eval_options(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a dataset, or saved anomaly maps (.npz)")
    e.add_argument("scores", nargs="?", default=None,
                   help=".npz with anomaly_maps, masks (optional categories, image_scores, image_labels)")
    e.add_argument("--checkpoint", default=None, help="last.pt of `fastproto train` (or exported weights)")
    e.add_argument("--data", default=None, help="dataset spec (default: the training one)")
    e.add_argument("--categories", default=None)
    e.add_argument("--image-size", type=_size, default=STORED, help="default: the training one")
    e.add_argument("--crop-size", type=_size, default=STORED, help="default: the training one")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--workers", type=int, default=4)
    e.add_argument("--on-bad-file", default="error", choices=["error", "skip"])
    e.add_argument("--amp", default=None, choices=["bf16", "fp16"])
    e.add_argument("--image-score", default=None, choices=["model", "max", "topk_mean", "avgpool_max"],
                   help="image score (default: the model's for --checkpoint, max for .npz)")
    e.add_argument("--topk", type=float, default=0.01)
    e.add_argument("--fpr-limit", type=float, default=0.3)
    e.add_argument("--resolution", type=int, default=None, help="evaluation size (default: 256 / the maps' size)")
    e.add_argument("--device", default=None)
    e.add_argument("--out", default=None, help="results folder (default: <checkpoint dir>/eval)")
    e.add_argument("--json", default=None, help="(.npz mode) also write the results as JSON here")
    e.add_argument("--quiet", action="store_true")
    _add_eval_options(e)

    b = sub.add_parser("bench", help="run a benchmark from bench/ (source checkout)")
    b.add_argument("target", nargs="?", default="metrics", choices=["metrics", "ops", "models", "real_data"])
    b.add_argument("rest", nargs=argparse.REMAINDER)

    from fastproto import demo  # standard library imports only

    d = sub.add_parser("demo", help="synthetic data -> train models on the CPU -> metrics and overlays "
                                    "(fastproto/demo.py)")
    d.add_argument("--model", "--models", dest="models", action="append", metavar="NAME[,NAME...]",
                   help=f"model(s) to run, repeatable and / or comma-separated: {', '.join(demo.DEMO['models'])} "
                        f"(default: {','.join(demo.DEFAULT_MODELS)})")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, seconds)")
    d.add_argument("--seed", type=int, default=0)
    return parser


#: reported as ``error: <message>`` (exit status 2) rather than a traceback: bad arguments, paths, data files,
#: checkpoints and option values (``ValueError`` / ``TypeError`` name the option, file or category)
_USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fastproto.engine import CheckpointError

    try:
        if args.command == "info":
            from fastproto import info

            info()
        elif args.command == "train":
            run_train(args)
        elif args.command == "eval":
            if (args.scores is None) == (args.checkpoint is None):
                raise UsageError("eval needs either a .npz of anomaly maps or --checkpoint (not both)")
            if args.scores is not None:
                run_eval_scores(args)
            else:
                if args.resolution is None:
                    args.resolution = 256
                run_eval_checkpoint(args)
        elif args.command == "bench":
            return _run_bench_script(f"{args.target}.py", args.rest)
        elif args.command == "demo":
            from fastproto import demo

            models = [m for item in args.models for m in _csv(item, "--model")] if args.models else None
            demo.run(out=args.out, models=models, quick=args.quick, seed=args.seed)
    except (*_USER_ERRORS, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if args.command in ("train", "eval"):
            from fastproto.engine import destroy_distributed

            destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
