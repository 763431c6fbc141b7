"""Model benchmark: images/s and peak memory of the complete models, fused ops vs reference ops.

    python bench/models.py --device cuda [--quick] [--out bench/RESULTS.md] [--json f.json]
    python bench/models.py --device cpu  [--out bench/RESULTS.md]
    python bench/models.py --from-json a.json b.json --out bench/RESULTS.md   # render earlier runs

Every model is built once with random weights (``pretrained=False``: no checkpoint is read; the
speed does not depend on the weights) and measured with its ops switched by ``model.set_impl``:
**fused** = ``"auto"`` (the Triton kernels on CUDA) and **reference** = ``"reference"`` (the
plain-PyTorch formulations), on the same weights and the same random images. Rows:

* inference: ``model(images)`` in eval mode under ``torch.no_grad()`` (anomaly map and score);
* train step: ``model.loss(images)["loss"].backward()`` in train mode (forward, loss, backward; no
  optimizer step), at a mid-run iteration (Dinomaly's hard-mining ramp finished).

bfloat16 / float16 = ``torch.autocast`` over float32 weights; float32 = plain. Time: median of the
measured runs, which alternate between fused and reference (load drifting on a shared machine hits
both alike), after warm-up runs of each (Triton compilation, cuBLAS heuristics) that are not
counted; on CUDA from CUDA events around a synchronised call. Peak memory: on CUDA the allocator
peak above the pre-call level (weights and inputs already resident are excluded), on the CPU the
peak host RSS above the pre-call level (:mod:`bench._measure`). A row that fails (CUDA out of
memory, an op that cannot run) is recorded with its error and the run goes on.

Defaults: CUDA = DINOv2 ViT-B/14 with registers at 392 px (the papers' setting), batches 1/16/64,
float32 and bfloat16, train step at batch 16; ``--quick`` = batches 16/64, bfloat16 only, 5 runs
(estimated 1-2 minutes on one H100 with start-up, model builds and Triton compilation). CPU = EfficientNet-Lite0 tokens
at 224 px, batches 1/4, float32, train step at batch 4 (a few minutes on 2 cores). On the CPU
``"auto"`` resolves to the reference for the attention and anomaly-map ops (the kernels are
CUDA-only); only the cosine-mining loss has a fused CPU path, so only the train step can differ.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import measure_stats
from _measure import method as memory_method
from metrics import md_table, write_section

import fastproto
from fastproto import models

MODELS = ("inpformer", "dinomaly", "proad")
#: ops choice -> the ``impl`` given to ``model.set_impl``
OPS = {"fused": "auto", "reference": "reference"}
DTYPES = ("float32", "bfloat16", "float16")
#: iteration given to ``on_train_iter`` for the train step: past Dinomaly's 1000-iteration ramp
TRAIN_ITER, TRAIN_TOTAL = 5_000, 10_000


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how (device-dependent defaults filled in by :func:`make_plan`)."""

    device: str
    models: tuple[str, ...]
    backbone: str
    image_size: int
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    train_batch: int | None   # None: no train-step rows
    repeats: int
    warmup: int
    budget_s: float | None    # stop repeating once the measured runs took this long (CPU)


def make_plan(args: argparse.Namespace) -> Plan:
    cuda = args.device == "cuda"
    unknown = sorted(set(args.models) - set(models.list_models()))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(models.list_models())}")
    if cuda:
        batches, dtypes, train_batch = ((16, 64), ("bfloat16",), 16) if args.quick else ((1, 16, 64),
                                                                                         ("float32", "bfloat16"), 16)
        backbone, size, repeats, warmup, budget = "dinov2_vitb14_reg", 392, 5 if args.quick else 10, 3, None
    else:
        batches, dtypes, train_batch = (1, 4), ("float32",), 4
        backbone, size, repeats, warmup, budget = "efficientnet_lite0", 224, 2 if args.quick else 5, 1, 30.0
    return Plan(
        device=args.device, models=tuple(args.models), backbone=args.backbone or backbone,
        image_size=args.image_size or size, batches=tuple(args.batch or batches),
        dtypes=tuple(args.dtype or dtypes), train_batch=None if args.no_train else (args.train_batch or train_batch),
        repeats=args.repeats or repeats, warmup=warmup if args.warmup is None else args.warmup, budget_s=budget)


# ----------------------------------------------------------------------------------------------
# building and running
# ----------------------------------------------------------------------------------------------


def build(name: str, plan: Plan) -> torch.nn.Module:
    """``models.create(name, ...)`` with random weights on the plan's device; models whose size
    depends on the image size (Pro-AD: one prototype per token) get ``image_size``."""
    cfg = {}
    if "image_size" in inspect.signature(models.model_class(name).__init__).parameters:
        cfg["image_size"] = plan.image_size
    torch.manual_seed(0)
    return models.create(name, backbone=plan.backbone, pretrained=False, **cfg).to(plan.device)


def precision(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """float32: nothing; a half type: ``torch.autocast`` to it (weights stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def inference_step(model: torch.nn.Module, images: torch.Tensor, dtype: str) -> Callable[[], object]:
    model.eval()

    def run():
        with torch.no_grad(), precision(images.device.type, dtype):
            return model(images)
    return run


def train_step(model: torch.nn.Module, images: torch.Tensor, dtype: str) -> Callable[[], object]:
    """Forward + loss + backward; gradients are dropped at the end so each run allocates its own."""
    model.train()
    model.on_train_iter(TRAIN_ITER, TRAIN_TOTAL)

    def run():
        with precision(images.device.type, dtype):
            loss = model.loss(images)["loss"]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()
    return run


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _attempt(fn: Callable[[], None], model: torch.nn.Module, device: str) -> str | None:
    """``fn()``; on an exception (CUDA out of memory, an op that cannot run) its one-line message,
    after dropping the gradients and releasing memory (outside the ``except``, so that the
    traceback's frames, which hold the step's tensors, are gone)."""
    try:
        fn()
        return None
    except Exception as exc:  # noqa: BLE001  (a failing row is recorded, the run goes on)
        error = _error(exc)
    model.zero_grad(set_to_none=True)
    _release(device)
    return error


def measure_setting(model: torch.nn.Module | None, plan: Plan, *, name: str, mode: str, batch: int, dtype: str,
                    build_error: str | None = None) -> list[dict]:
    """The fused and the reference row of one (model, pass, batch, dtype) setting.

    Both ops choices are warmed up, then measured runs alternate between them (fused, reference,
    fused, ...) so that load drifting on a shared machine hits both alike. A choice that fails (CUDA
    out of memory, an op that cannot run) gets its error and drops out; the other goes on.
    """
    rows = {ops: {"model": name, "pass": mode, "batch": batch, "dtype": dtype, "ops": ops,
                  "backbone": plan.backbone, "image_size": plan.image_size, "time_s": None, "images_per_s": None,
                  "peak_bytes": None, "runs": 0, "error": build_error} for ops in OPS}
    if model is None:
        return list(rows.values())
    cuda = plan.device == "cuda"
    step = inference_step if mode == "inference" else train_step
    runs: dict[str, Callable[[], object]] = {}
    times: dict[str, list[float]] = {ops: [] for ops in OPS}
    peaks: dict[str, list[int]] = {ops: [] for ops in OPS}
    try:
        images = torch.randn(batch, 3, plan.image_size, plan.image_size,
                             generator=torch.Generator().manual_seed(batch)).to(plan.device)
    except Exception as exc:  # noqa: BLE001  (no inputs: both rows fail)
        for r in rows.values():
            r["error"] = _error(exc)
        return list(rows.values())

    def warm_up(ops: str) -> None:
        model.set_impl(OPS[ops])
        runs[ops] = step(model, images, dtype)
        for _ in range(plan.warmup):
            runs[ops]()
        if cuda:
            torch.cuda.synchronize()  # an asynchronous kernel failure surfaces here

    def measure(ops: str) -> None:
        model.set_impl(OPS[ops])
        st = measure_stats(runs[ops], repeats=1, warmup=0, cuda=cuda)
        times[ops].append(st["median_s"])
        peaks[ops].append(st["peak_bytes"])

    try:
        for ops in OPS:
            rows[ops]["error"] = _attempt(lambda ops=ops: warm_up(ops), model, plan.device)
        for _ in range(plan.repeats):
            for ops in OPS:
                if ops in runs and not rows[ops]["error"]:
                    rows[ops]["error"] = _attempt(lambda ops=ops: measure(ops), model, plan.device)
            if all(r["error"] for r in rows.values()) or (
                    plan.budget_s and sum(map(sum, times.values())) >= plan.budget_s):
                break
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        runs.clear()
        _release(plan.device)
    for ops, r in rows.items():
        if times[ops] and not r["error"]:
            t = statistics.median(times[ops])
            r.update(time_s=t, images_per_s=batch / t, peak_bytes=max(peaks[ops]), runs=len(times[ops]))
    return list(rows.values())


def settings_of(plan: Plan) -> list[tuple[str, int, str]]:
    """The (pass, batch, dtype) settings of every model, in run order: inference, then train step."""
    settings = [("inference", b, dt) for dt in plan.dtypes for b in plan.batches]
    if plan.train_batch:
        settings += [("train step", plan.train_batch, dt) for dt in plan.dtypes]
    return settings


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def environment(plan: Plan) -> str:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = (f"{p.name} ({p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, float32 matmul "
               f"precision {torch.get_float32_matmul_precision()!r}")
    else:
        dev = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads: "
               f"{torch.get_num_threads()})")
    return (f"Device: {dev}; date {now}. Versions: fastproto {fastproto.__version__}, torch {torch.__version__}, "
            f"triton {tv}, Python {platform.python_version()}.")


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def describe(plan: dict, backbones: str) -> str:
    mem = ("CUDA allocator peak above the pre-call level (weights and inputs excluded)" if plan["device"] == "cuda"
           else f"host RSS peak above the pre-call level (method `{plan.get('memory_method', '?')}`)")
    return (f"Models: {backbones}, random weights (`pretrained=False`). "
            "fused = `model.set_impl(\"auto\")`, reference = `model.set_impl(\"reference\")`, same weights and "
            "images. Inference: `model(images)`, eval mode, `torch.no_grad()`; train step: forward + loss + "
            "backward (no optimizer step). bfloat16 = `torch.autocast` (float32 weights). Time: median of up to "
            f"{plan['repeats']} runs per ops choice, alternating fused / reference, after {plan['warmup']} warm-up "
            f"run{'' if plan['warmup'] == 1 else 's'} of each (excluded)"
            + (f", stopping once a setting's measured runs took {plan['budget_s']:g} s" if plan.get("budget_s") else "")
            + f". Memory: {mem}. speed-up = reference time / fused time; memory = fused peak / reference peak."
            + (" On the CPU `auto` runs the reference attention and anomaly-map ops (the kernels are CUDA-only); "
               "only the loss of the train step has a fused CPU path, so inference rows measure noise."
               if plan["device"] == "cpu" else ""))


def _ms(s: float | None) -> str:
    return "—" if s is None else (f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}")


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}×" if (a and b) else ""


def render(header: str, rows: list[dict]) -> str:
    """One table line per (model, pass, batch, dtype): the fused and reference rows side by side."""
    keys = []
    for r in rows:
        k = (r["model"], r["backbone"], r["image_size"], r["pass"], r["batch"], r["dtype"])
        if k not in keys:
            keys.append(k)
    several = len({k[1:3] for k in keys}) > 1  # then the model column names the backbone and size
    table = []
    for k in keys:
        pair = {r["ops"]: r for r in rows
                if (r["model"], r["backbone"], r["image_size"], r["pass"], r["batch"], r["dtype"]) == k}
        f, ref = pair.get("fused", {}), pair.get("reference", {})
        errors = {ops: r["error"] for ops, r in pair.items() if r.get("error")}
        if len(errors) == len(OPS) and len(set(errors.values())) == 1:
            errors = {"both": next(iter(errors.values()))}
        notes = "; ".join(f"{ops} failed: {e}" for ops, e in errors.items()).replace("|", "\\|")
        table.append([f"{k[0]} ({k[1]}, {k[2]} px)" if several else k[0], k[3], k[4], k[5], _ms(f.get("time_s")), _ms(ref.get("time_s")),
                      _num(f.get("images_per_s"), ".1f"), _num(ref.get("images_per_s"), ".1f"),
                      _ratio(ref.get("time_s"), f.get("time_s")), _mib(f.get("peak_bytes")),
                      _mib(ref.get("peak_bytes")), _ratio(f.get("peak_bytes"), ref.get("peak_bytes")), notes])
    cols = ["model", "pass", "batch", "dtype", "fused ms", "ref ms", "fused img/s", "ref img/s", "speed-up",
            "fused peak MiB", "ref peak MiB", "memory fused/ref", "notes"]
    return header + "\n\n" + md_table(cols, table)


def _section(device: str, date: str) -> tuple[str, str]:
    key = "models-cuda" if device == "cuda" else "models-cpu"
    return key, f"Model throughput — {'GPU' if device == 'cuda' else 'CPU'}, {date}"


def _header(parts: list[dict]) -> str:
    p0 = parts[0]
    backbones = ", ".join(dict.fromkeys(f"{p['plan']['backbone']} at {p['plan']['image_size']} px" for p in parts))
    cmds = "; ".join(f"`{p['cmd']}` (load average 1 min at start / end {p['load'][0]:.2f} / "
                     f"{p['load'][1]:.2f})" for p in parts)
    return f"{p0['env']} {describe(p0['plan'], backbones)}\n\nCommand(s): {cmds}."


def from_json(files: list[str], out: str) -> None:
    parts = []
    for name in files:
        with open(name) as f:
            parts.append(json.load(f))
    devices = {p["plan"]["device"] for p in parts}
    if len(devices) != 1:
        raise SystemExit(f"--from-json: the files mix devices {sorted(devices)}; render each device separately")
    key, title = _section(devices.pop(), parts[0]["date"])
    write_section(out, key, title, render(_header(parts), [r for p in parts for r in p["rows"]]))
    print(f"wrote section '{key}' of {out}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=list(MODELS),
                    help="comma-separated model names (default: %(default)s)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="inference batch sizes")
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=None)
    ap.add_argument("--backbone", default=None, help="default dinov2_vitb14_reg (CUDA), efficientnet_lite0 (CPU)")
    ap.add_argument("--image-size", type=int, default=None, help="default 392 (CUDA), 224 (CPU)")
    ap.add_argument("--train-batch", type=int, default=None, help="train-step batch (default 16 CUDA, 4 CPU)")
    ap.add_argument("--no-train", action="store_true", help="skip the train-step rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU; default torch's). On a machine shared with other jobs 1 "
                         "thread gives far steadier timings than threads that wait for each other")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="CUDA: batches 16/64, bfloat16 only; fewer repeats")
    ap.add_argument("--out", default=None, help="write/update the models-<device> section of this Markdown file")
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="render these earlier --json files (one run split over calls) into --out; run nothing")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        if not args.out:
            raise SystemExit("--from-json needs --out")
        from_json(args.from_json, args.out)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    cmd = "python bench/models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"env": environment(plan), "date": datetime.date.today().isoformat(), "cmd": cmd,
              "load": [_load(), _load()],
              "plan": {**asdict(plan), "memory_method": memory_method()}, "rows": []}
    print(record["env"], flush=True)
    t0 = time.perf_counter()
    for name in plan.models:
        model, build_error = None, None
        try:
            t_build = time.perf_counter()
            model = build(name, plan)
            print(f"built {name} on {plan.backbone} in {time.perf_counter() - t_build:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001  (every row of this model then carries the error)
            build_error = "build failed: " + _error(exc)
        for mode, batch, dtype in settings_of(plan):
            rows = measure_setting(model, plan, name=name, mode=mode, batch=batch, dtype=dtype,
                                   build_error=build_error)
            record["rows"] += rows
            record["load"][1] = _load()
            for row in rows:
                print(f"{name:10s} {mode:10s} B={batch:<3d} {dtype:9s} {row['ops']:9s} {_ms(row['time_s']):>8s} ms "
                      f"{_num(row['images_per_s'], '8.1f')} img/s  peak {_mib(row['peak_bytes']):>6s} MiB "
                      f"({row['runs']} runs)" + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(record, f, indent=1)
        del model
        _release(plan.device)
    body = render(_header([record]), record["rows"])
    print("\n" + body + f"\n\n(total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        key, title = _section(plan.device, record["date"])
        write_section(args.out, key, title, body)
        print(f"wrote section '{key}' of {args.out}")


if __name__ == "__main__":
    main()
