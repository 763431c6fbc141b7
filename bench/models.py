"""Model benchmark: images/s and peak memory of the complete models, fused ops vs reference ops.

    python bench/models.py --device cuda [--quick] [--out bench/RESULTS.md] [--json f.json] [--section KEY]
    python bench/models.py --device cpu  [--out bench/RESULTS.md]
    python bench/models.py --from-json a.json b.json --out bench/RESULTS.md   # render earlier runs
    python bench/models.py --device cuda --models inpformer,proad --batch 64 --dtype bfloat16 --compile
        # both ops choices under torch.compile: fused + compile against compile(reference)

Issue 5 on one H100 (the DPDiff-AD, BoRAD and UIP-AD rows, the Sinkhorn share and the two targets; the JSON is
rewritten after every row, so a run cut short keeps what it measured), then, on the machine that holds the
checkout, into its own section so that the earlier models' section stays::

    timeout 540 python3 bench/models.py --device cuda --quick --json $OUT/models5.json > $OUT/models5.log 2>&1
    python bench/models.py --from-json models5.json --out bench/RESULTS.md --section models-cuda-5

Every model is built once with random weights (``pretrained=False``: no checkpoint is read; the
speed does not depend on the weights) and measured with its ops switched by ``model.set_impl``:
**fused** = ``"auto"`` (the Triton kernels on CUDA) and **reference** = ``"reference"`` (the
plain-PyTorch formulations), on the same weights and the same random images. Rows:

* inference: the deployed model in eval mode under ``torch.no_grad()`` (anomaly map and score):
  ``model(images)``, for BoRAD ``model.export()`` (the inference graph without the training-only
  prototype bank, heads and EMA projector); DPDiff-AD's inference is its seeded DDIM (3 steps);
* train step: ``model.loss(images)["loss"].backward()`` in train mode (forward, loss, backward; no
  optimizer step), at a mid-run iteration (Dinomaly's hard-mining ramp finished), full model;
* Sinkhorn share (DPDiff-AD): how much of its train step the global alignment loss
  (``ot_alignment_loss``: cost matrix + ``ops.sinkhorn``, forward and backward) takes, see
  :func:`measure_share`.

UIP-AD runs in ``"rgbd"`` mode on the batch mapping ``{"image", "depth"}`` (a second random image as
the depth image); its img/s counts RGB-D pairs. bfloat16 / float16 = ``torch.autocast`` over float32
weights; float32 = plain. Time: median of the measured runs, which alternate between fused and
reference (load drifting on a shared machine hits both alike), after warm-up runs of each (Triton
compilation, cuBLAS heuristics) that are not counted; on CUDA from CUDA events around a
synchronised call. Peak memory: on CUDA the allocator peak above the pre-call level (weights and
inputs already resident are excluded), on the CPU the peak host RSS above the pre-call level
(:mod:`bench._measure`). A row that fails (CUDA out of memory, an op that cannot run) is recorded
with its error and the run goes on.

Defaults. CUDA: each model on its paper backbone and input size (:func:`paper_setting`): the
model's ``default_backbone`` (DINOv2 ViT-B/14 with registers for the ViT family, WideResNet-50-2
for BoRAD) at 392 px (448 resized, centre crop 392; UIP-AD states no size and gets the same),
DPDiff-AD 448 px (32 x 32 tokens), BoRAD 256 px; batches 1/16/64, float32 and bfloat16, train step
and Sinkhorn share at batch 16. ``--backbone`` / ``--image-size`` set one backbone / size for every
model. ``--quick`` (CUDA) = the issue-5 models (DPDiff-AD, BoRAD, UIP-AD), batch 64 bfloat16
inference and the DPDiff-AD Sinkhorn share at batch 16, 5 runs, no train-step rows. Its length is
*estimated, not measured*: about 2-4 minutes on one H100 -- start-up and imports ~20 s, three random-weight
builds (DPDiff-AD 192 M, BoRAD 182 M, UIP-AD 315 M parameters; 16 s on one CPU thread here) ~20 s,
Triton compilation of the fused kernels ~30-90 s, and per setting 2 x (3 warm-up + 5 measured)
calls: DPDiff-AD at 448 px is a ViT-B pass plus 3 x 6 DiT blocks over 1034 tokens (~0.6 TFLOP per
image: ~0.1-0.3 s per batch of 64), UIP-AD encodes 128 images at 392 px and runs two 8-block
decoders (~0.5 TFLOP per RGB-D pair: ~0.1-0.3 s), BoRAD at 256 px is lighter; the share adds
2 x 9 train steps at batch 16 (~0.05-0.1 s each) plus as many loss calls.
CPU: every model on EfficientNet-Lite0 tokens at 224 px (BoRAD distils from the same EfficientNet-
Lite0 as its teacher, its own stage taps, as bench/real_data.py), batches 1/4, float32, train step
and share at batch 4; ``--quick`` = the issue-5 models with 2 runs. On the CPU ``"auto"`` resolves
to the reference for the attention and anomaly-map ops (the kernels are CUDA-only); only the
cosine-mining loss has a fused CPU path, so only the train step can differ.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import measure_stats
from _measure import method as memory_method
from metrics import md_table, write_section

import fastproto
from fastproto import models

#: the default models: issue 4's three, then issue 5's three
MODELS = ("inpformer", "dinomaly", "proad", "dpdiff", "borad", "uipad")
#: issue 5's models: the default of ``--quick``
QUICK_MODELS = ("dpdiff", "borad", "uipad")
#: models whose train step gets the Sinkhorn-share rows (the model must call ``ot_alignment_loss``)
SHARE_MODELS = ("dpdiff",)
#: paper input sizes that differ from the ViT family's 392 px (448 resized, centre crop 392); BoRAD's
#: 256 px comes from its ``TRAINING["image_size"]``
PAPER_SIZES = {"dpdiff": 448}  # DPDiff-AD: 448 px input, 32 x 32 tokens of DINOv2-B/14
VIT_SIZE = 392
#: model options that fix what is measured (the defaults today, stated so that a default change shows)
MODEL_CFG = {"uipad": {"mode": "rgbd"}}
#: ops choice -> the ``impl`` given to ``model.set_impl``
OPS = {"fused": "auto", "reference": "reference"}
DTYPES = ("float32", "bfloat16", "float16")
#: iteration given to ``on_train_iter`` for the train step: past Dinomaly's 1000-iteration ramp
TRAIN_ITER, TRAIN_TOTAL = 5_000, 10_000
#: issue 5's speed targets (on an H100): DPDiff-AD inference img/s at batch 64 bfloat16 (the paper's
#: 101 FPS on an RTX 4090), and the largest Sinkhorn share of a DPDiff-AD train step, in %
TARGET_DPDIFF_IMG_S, TARGET_SHARE_PCT = 100.0, 2.0


def paper_setting(name: str) -> tuple[str, int]:
    """``(backbone, image_size)`` of the paper of model ``name``: the model's ``default_backbone``
    (what ``models.create`` builds without ``backbone=``) and its input size (:data:`PAPER_SIZES`,
    else ``TRAINING["image_size"]``, else the ViT family's 392 px)."""
    cls = models.model_class(name)
    backbone = getattr(cls, "default_backbone", models.DEFAULT_BACKBONE)
    size = PAPER_SIZES.get(name) or getattr(cls, "TRAINING", {}).get("image_size") or VIT_SIZE
    return backbone, int(size)


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how (device-dependent defaults filled in by :func:`make_plan`)."""

    device: str
    models: tuple[str, ...]
    backbones: dict[str, str]    # model -> backbone name
    image_sizes: dict[str, int]  # model -> square input size
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    train_batch: int | None   # None: no train-step rows
    share_batch: int | None   # None: no Sinkhorn-share rows
    repeats: int
    warmup: int
    budget_s: float | None    # stop repeating once the measured runs took this long (CPU)
    compile: str | None = None  # a torch.compile backend: both ops choices run compiled


def make_plan(args: argparse.Namespace) -> Plan:
    cuda = args.device == "cuda"
    names = tuple(args.models or (QUICK_MODELS if args.quick else MODELS))
    unknown = sorted(set(names) - set(models.list_models()))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(models.list_models())}")
    if cuda:
        if args.quick:
            batches, dtypes, train_batch, share_batch, repeats = (64,), ("bfloat16",), None, 16, 5
        else:
            batches, dtypes, train_batch, share_batch, repeats = (1, 16, 64), ("float32", "bfloat16"), 16, 16, 10
        setting = {n: paper_setting(n) for n in names}
        warmup, budget = 3, None
    else:
        batches, dtypes, train_batch, share_batch = (1, 4), ("float32",), 4, 4
        setting = {n: ("efficientnet_lite0", 224) for n in names}
        repeats, warmup, budget = 2 if args.quick else 5, 1, 30.0
    if args.train_batch:  # an explicit train batch asks for the train-step rows, also with --quick
        train_batch = share_batch = args.train_batch
    has_share = any(n in SHARE_MODELS for n in names) and not args.no_share
    return Plan(
        device=args.device, models=names,
        backbones={n: args.backbone or setting[n][0] for n in names},
        image_sizes={n: args.image_size or setting[n][1] for n in names},
        batches=tuple(args.batch or batches), dtypes=tuple(args.dtype or dtypes),
        train_batch=None if args.no_train else train_batch, share_batch=share_batch if has_share else None,
        repeats=args.repeats or repeats, warmup=warmup if args.warmup is None else args.warmup, budget_s=budget,
        compile=args.compile)


# ----------------------------------------------------------------------------------------------
# building and running
# ----------------------------------------------------------------------------------------------


def build(name: str, plan: Plan) -> torch.nn.Module:
    """``models.create(name, ...)`` with random weights on the plan's device, on the plan's backbone
    for ``name``; models whose size depends on the image size (Pro-AD: one prototype per token;
    BoRAD: one bank location per bottleneck cell) get ``image_size``."""
    cfg = dict(MODEL_CFG.get(name, {}))
    if "image_size" in inspect.signature(models.model_class(name).__init__).parameters:
        cfg["image_size"] = plan.image_sizes[name]
    torch.manual_seed(0)
    return models.create(name, backbone=plan.backbones[name], pretrained=False, **cfg).to(plan.device)


def make_inputs(model: torch.nn.Module, batch: int, size: int, device: str) -> torch.Tensor | dict[str, torch.Tensor]:
    """Random images ``[batch, 3, size, size]`` (seeded by the batch size: the same for every model);
    for an RGB-D model (UIP-AD) the batch mapping ``{"image", "depth"}`` with a second random image as
    the depth, which both ``model(batch)`` and ``model.loss(batch)`` take."""
    gen = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    if "depth" in getattr(model, "modalities", ()):
        return {"image": images, "depth": torch.randn(batch, 3, size, size, generator=gen).to(device)}
    return images


def deployed(model: torch.nn.Module) -> torch.nn.Module:
    """The model inference runs: ``model.export()`` where the model has one (BoRAD: the training-only
    parts dropped; it shares the parameters), else the model itself."""
    return model.export() if hasattr(model, "export") else model


def precision(device: str, dtype: str) -> contextlib.AbstractContextManager:
    """float32: nothing; a half type: ``torch.autocast`` to it (weights stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def inference_step(model: torch.nn.Module, inputs, dtype: str, device: str,
                   compile: str | None = None) -> Callable[[], object]:
    """``model(inputs)`` in eval mode without gradients; ``compile``: through ``torch.compile`` with that backend
    (dynamo guards on the ops choice, so each choice gets its own graphs, compiled in the warm-up)."""
    model.eval()
    forward = torch.compile(model, backend=compile) if compile else model

    def run():
        with torch.no_grad(), precision(device, dtype):
            return forward(inputs)
    return run


def train_step(model: torch.nn.Module, inputs, dtype: str, device: str,
               compile: str | None = None) -> Callable[[], object]:
    """Forward + loss + backward; gradients are dropped at the end so each run allocates its own. ``compile``: the
    loss through ``torch.compile`` with that backend."""
    model.train()
    model.on_train_iter(TRAIN_ITER, TRAIN_TOTAL)
    loss_fn = torch.compile(model.loss, backend=compile) if compile else model.loss

    def run():
        with precision(device, dtype):
            loss = loss_fn(inputs)["loss"]
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


def alternate(model: torch.nn.Module, plan: Plan, prepare: Callable[[str], dict[str, Callable[[], object]]]
              ) -> dict[str, dict]:
    """Time the calls of both ops choices, alternating, and return per ops choice ``{"times": {part:
    [s, ...]}, "peaks": {part: [bytes, ...]}, "error": str | None}``.

    For each ops choice: ``model.set_impl``, then ``prepare(ops)`` gives the calls to time (part name ->
    callable) and each is warmed up ``plan.warmup`` times. Then ``plan.repeats`` rounds, each timing
    every part of fused, then of reference, once (load drifting on a shared machine hits both alike).
    A choice that fails (CUDA out of memory, an op that cannot run) gets its error and drops out; the
    other goes on.
    """
    cuda = plan.device == "cuda"
    calls: dict[str, dict[str, Callable[[], object]]] = {}
    out = {ops: {"times": {}, "peaks": {}, "error": None} for ops in OPS}

    def warm_up(ops: str) -> None:
        model.set_impl(OPS[ops])
        calls[ops] = prepare(ops)
        for part in calls[ops].values():
            for _ in range(plan.warmup):
                part()
        if cuda:
            torch.cuda.synchronize()  # an asynchronous kernel failure surfaces here

    def measure(ops: str) -> None:
        model.set_impl(OPS[ops])
        for name, part in calls[ops].items():
            st = measure_stats(part, repeats=1, warmup=0, cuda=cuda)
            out[ops]["times"].setdefault(name, []).append(st["median_s"])
            out[ops]["peaks"].setdefault(name, []).append(st["peak_bytes"])

    try:
        for ops in OPS:
            out[ops]["error"] = _attempt(lambda ops=ops: warm_up(ops), model, plan.device)
        for _ in range(plan.repeats):
            for ops in OPS:
                if ops in calls and not out[ops]["error"]:
                    out[ops]["error"] = _attempt(lambda ops=ops: measure(ops), model, plan.device)
            spent = sum(sum(t) for o in out.values() for t in o["times"].values())
            if all(o["error"] for o in out.values()) or (plan.budget_s and spent >= plan.budget_s):
                break
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        calls.clear()
        _release(plan.device)
    return out


def _rows(plan: Plan, name: str, mode: str, batch: int, dtype: str, error: str | None, **fields) -> dict[str, dict]:
    return {ops: {"model": name, "pass": mode, "batch": batch, "dtype": dtype, "ops": ops,
                  "backbone": plan.backbones[name], "image_size": plan.image_sizes[name], **fields, "runs": 0,
                  "error": error} for ops in OPS}


def _inputs_or_error(model: torch.nn.Module, plan: Plan, name: str, batch: int, rows: dict[str, dict]):
    """The inputs of a setting, or None with the error in both rows (no inputs: nothing runs)."""
    try:
        return make_inputs(model, batch, plan.image_sizes[name], plan.device)
    except Exception as exc:  # noqa: BLE001
        for r in rows.values():
            r["error"] = _error(exc)
        return None


def measure_setting(model: torch.nn.Module | None, plan: Plan, *, name: str, mode: str, batch: int, dtype: str,
                    build_error: str | None = None) -> list[dict]:
    """The fused and the reference row of one (model, pass, batch, dtype) setting (see :func:`alternate`);
    inference runs :func:`deployed`, the train step the full model."""
    rows = _rows(plan, name, mode, batch, dtype, build_error, time_s=None, images_per_s=None, peak_bytes=None)
    if model is None:
        return list(rows.values())
    net = deployed(model) if mode == "inference" else model
    inputs = _inputs_or_error(model, plan, name, batch, rows)
    if inputs is None:
        return list(rows.values())
    step = inference_step if mode == "inference" else train_step
    measured = alternate(net, plan, lambda ops: {"call": step(net, inputs, dtype, plan.device, plan.compile)})
    for ops, r in rows.items():
        m = measured[ops]
        r["error"] = m["error"]
        if m["times"] and not r["error"]:
            t = statistics.median(m["times"]["call"])
            r.update(time_s=t, images_per_s=batch / t, peak_bytes=max(m["peaks"]["call"]),
                     runs=len(m["times"]["call"]))
    return list(rows.values())


#: the module (the attribute ``fastproto.ops.sinkhorn`` is the function)
_SINKHORN_OPS = importlib.import_module("fastproto.ops.sinkhorn")


@contextlib.contextmanager
def _recording(module, name: str, record: Callable[[Callable, tuple, dict], None]) -> Iterator[None]:
    """Within the block, ``module.<name>`` calls ``record(original, args, kwargs)`` before the original."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        record(original, args, kwargs)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def ot_loss_step(loss_fn: Callable, args: tuple, kwargs: dict, dtype: str, device: str) -> Callable[[], object]:
    """The OT loss alone: ``loss_fn(*args, **kwargs)`` under the step's precision, then its backward to
    the inputs that require grad (the global prototypes; the frozen features do not)."""
    def run():
        with precision(device, dtype):
            loss = loss_fn(*args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        for t in args:
            t.grad = None
        return loss.detach()
    return run


def measure_share(model: torch.nn.Module | None, plan: Plan, *, name: str, batch: int, dtype: str,
                  build_error: str | None = None) -> list[dict]:
    """The Sinkhorn share of one train step of ``model`` (DPDiff-AD), per ops choice: ``step_s`` (forward +
    loss + backward, as the train-step rows), ``sinkhorn_s`` (``ot_alignment_loss`` forward + backward) and
    ``share_pct = 100 sinkhorn_s / step_s`` (ratio of the medians).

    Method: a first train step runs with ``ot_alignment_loss`` (in the model's module) and ``ops.sinkhorn``
    wrapped, recording the loss's inputs (``x0 [B, N, C]``, the global prototypes ``[B, K, C]``: detached
    copies, ``requires_grad`` kept), its options (``eps``, ``n_iters``, ``impl``, ...) and the cost matrix's
    shape and dtype; then the step and the loss alone on exactly those inputs, under the same autocast, are
    timed in the same alternation (:func:`alternate`), with the same clock (CUDA events around a
    synchronised call on CUDA, wall time on the CPU). The wrappers are gone while timing.

    Why not ``torch.profiler`` with a ``record_function`` range around the loss call: the range holds
    the forward only -- the backward runs later in the autograd engine, outside it -- and on the CPU the
    profiler's per-op overhead weighs on the reference Sinkhorn's ~100 iterations of small ops far more
    than on the step's large matmuls, inflating the share. Timing the loss alone measures forward and
    backward with the clock the step uses, the same way on both devices. It leaves out the overlap with
    the rest of the step: on CUDA the synchronised loss call also counts its launch latency, which
    inside the step can hide behind queued work, so the share is, if anything, over-estimated
    (conservative against the issue's <= 2 % target).
    """
    rows = _rows(plan, name, "sinkhorn share", batch, dtype, build_error, step_s=None, sinkhorn_s=None,
                 share_pct=None, ot_input=None)
    if model is None:
        return list(rows.values())
    inputs = _inputs_or_error(model, plan, name, batch, rows)
    if inputs is None:
        return list(rows.values())
    module = sys.modules[type(model).__module__]

    def prepare(ops: str) -> dict[str, Callable[[], object]]:
        step = train_step(model, inputs, dtype, plan.device)  # eager: the OT loss's inputs are recorded from it
        losses, costs = [], []
        with _recording(module, "ot_alignment_loss", lambda fn, a, kw: losses.append(
                (fn, tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in a), kw))), \
                _recording(_SINKHORN_OPS, "sinkhorn", lambda fn, a, kw: costs.append((tuple(a[0].shape), a[0].dtype))):
            step()
        if len(losses) != 1 or not costs:
            raise RuntimeError(f"{name}: one train step called ot_alignment_loss {len(losses)} time(s) and "
                               f"ops.sinkhorn {len(costs)} time(s); expected 1 and >= 1")
        fn, args, kwargs = losses[0]
        x, p = args
        rows[ops]["ot_input"] = (f"x {list(x.shape)} {str(x.dtype)[6:]}, prototypes {list(p.shape)} "
                                 f"{str(p.dtype)[6:]}; cost {list(costs[0][0])} {str(costs[0][1])[6:]}, "
                                 f"n_iters {kwargs.get('n_iters', '?')}")
        return {"step": step, "sinkhorn": ot_loss_step(fn, args, kwargs, dtype, plan.device)}

    measured = alternate(model, plan, prepare)
    for ops, r in rows.items():
        m = measured[ops]
        r["error"] = m["error"]
        if len(m["times"]) == 2 and not r["error"]:
            step_s, ot_s = (statistics.median(m["times"][k]) for k in ("step", "sinkhorn"))
            r.update(step_s=step_s, sinkhorn_s=ot_s, share_pct=100.0 * ot_s / step_s, runs=len(m["times"]["step"]))
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
            "images. Inference: `model(images)`, eval mode, `torch.no_grad()` (BoRAD: `model.export()`, without "
            "the training-only parts; DPDiff-AD: seeded DDIM, 3 steps; UIP-AD: RGB + depth, img/s = RGB-D pairs/s); "
            "train step: forward + loss + backward (no optimizer step). bfloat16 = `torch.autocast` (float32 "
            f"weights). Time: median of up to {plan['repeats']} runs per ops choice, alternating fused / reference, "
            f"after {plan['warmup']} warm-up run{'' if plan['warmup'] == 1 else 's'} of each (excluded)"
            + (f", stopping once a setting's measured runs took {plan['budget_s']:g} s" if plan.get("budget_s") else "")
            + f". Memory: {mem}. speed-up = reference time / fused time; memory = fused peak / reference peak."
            + (f" Inference and train step of both ops choices under `torch.compile` (backend `{plan['compile']}`; "
               "compilation in the warm-up; the Sinkhorn share eager)."
               if plan.get("compile") else "")
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


def _notes(pair: dict[str, dict]) -> str:
    errors = {ops: r["error"] for ops, r in pair.items() if r.get("error")}
    if len(errors) == len(OPS) and len(set(errors.values())) == 1:
        errors = {"both": next(iter(errors.values()))}
    return "; ".join(f"{ops} failed: {e}" for ops, e in errors.items()).replace("|", "\\|")


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
        table.append([f"{k[0]} ({k[1]}, {k[2]} px)" if several else k[0], k[3], k[4], k[5], _ms(f.get("time_s")), _ms(ref.get("time_s")),
                      _num(f.get("images_per_s"), ".1f"), _num(ref.get("images_per_s"), ".1f"),
                      _ratio(ref.get("time_s"), f.get("time_s")), _mib(f.get("peak_bytes")),
                      _mib(ref.get("peak_bytes")), _ratio(f.get("peak_bytes"), ref.get("peak_bytes")), _notes(pair)])
    cols = ["model", "pass", "batch", "dtype", "fused ms", "ref ms", "fused img/s", "ref img/s", "speed-up",
            "fused peak MiB", "ref peak MiB", "memory fused/ref", "notes"]
    return header + "\n\n" + md_table(cols, table)


SHARE_METHOD = (
    "Sinkhorn share of the train step (`measure_share`): step = forward + loss + backward, as the train-step rows; "
    "sinkhorn = `ot_alignment_loss` (cost matrix + `ops.sinkhorn`) forward + backward alone, on the inputs that a "
    "first step passed to it (recorded), under the same autocast, timed in the same alternation with the same clock; "
    "share = median sinkhorn / median step. Timed alone, the loss also counts what inside the step can overlap "
    "with other work (on CUDA its launch latency), so the share errs high.")


def render_shares(rows: list[dict]) -> str:
    """One table line per (model, batch, dtype, ops) of the Sinkhorn-share rows."""
    table = [[f"{r['model']} ({r['backbone']}, {r['image_size']} px)", r["batch"], r["dtype"], r["ops"],
              _ms(r["step_s"]), _ms(r["sinkhorn_s"]), _num(r["share_pct"], ".2f"), r["ot_input"] or "—",
              _notes({r["ops"]: r})] for r in rows]
    cols = ["model", "batch", "dtype", "ops", "step ms", "sinkhorn ms", "share %", "OT loss inputs", "notes"]
    return SHARE_METHOD + "\n\n" + md_table(cols, table)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def targets(rows: list[dict], shares: list[dict]) -> list[str]:
    """Issue 5's speed targets against the fused rows that measure them (absent rows: no line)."""
    lines = []
    measured = ("dpdiff", "inference", 64, "bfloat16", "fused")
    for r in rows:
        if (r["model"], r["pass"], r["batch"], r["dtype"], r["ops"]) != measured:
            continue
        v = r["images_per_s"]
        lines.append(f"- DPDiff-AD end-to-end inference, batch 64 bfloat16, fused ops ({r['backbone']}, "
                     f"{r['image_size']} px): {_num(v, '.1f')} img/s; target >= {TARGET_DPDIFF_IMG_S:g} img/s on an "
                     "H100 (the paper's 101 FPS on an RTX 4090): "
                     + _verdict(None if v is None else v >= TARGET_DPDIFF_IMG_S))
    for r in shares:
        if r["ops"] == "fused":
            v = r["share_pct"]
            lines.append(f"- Sinkhorn share of a DPDiff-AD train step, batch {r['batch']} {r['dtype']}, fused ops: "
                         f"{_num(v, '.2f')} % ({_ms(r['sinkhorn_s'])} of {_ms(r['step_s'])} ms); target <= "
                         f"{TARGET_SHARE_PCT:g} %: {_verdict(None if v is None else v <= TARGET_SHARE_PCT)}")
    return lines


def render_body(header: str, rows: list[dict], shares: list[dict], device: str) -> str:
    """The section: throughput table, then the Sinkhorn-share table and (CUDA) the issue-5 targets."""
    body = render(header, rows)
    if shares:
        body += "\n\n" + render_shares(shares)
    lines = targets(rows, shares) if device == "cuda" else []
    if lines:
        body += "\n\nIssue 5 speed targets (device above):\n\n" + "\n".join(lines)
    return body


def _section(device: str, date: str, models_run: list[str], key: str | None = None) -> tuple[str, str]:
    key = key or ("models-cuda" if device == "cuda" else "models-cpu")
    return key, f"Model throughput — {'GPU' if device == 'cuda' else 'CPU'}, {date} ({', '.join(models_run)})"


def _header(parts: list[dict]) -> str:
    p0 = parts[0]
    backbones = ", ".join(dict.fromkeys(f"{r['model']} on {r['backbone']} at {r['image_size']} px"
                                        for p in parts for r in p["rows"] + p.get("shares", [])))
    cmds = "; ".join(f"`{p['cmd']}` (load average 1 min at start / end {p['load'][0]:.2f} / "
                     f"{p['load'][1]:.2f})" for p in parts)
    return f"{p0['env']} {describe(p0['plan'], backbones)}\n\nCommand(s): {cmds}."


def write_report(parts: list[dict], out: str, key: str | None = None) -> str:
    """Render the records ``parts`` (one device) into section ``key`` (default ``models-<device>``) of ``out``."""
    devices = {p["plan"]["device"] for p in parts}
    if len(devices) != 1:
        raise SystemExit(f"the records mix devices {sorted(devices)}; render each device separately")
    device = devices.pop()
    rows = [r for p in parts for r in p["rows"]]
    shares = [r for p in parts for r in p.get("shares", [])]  # absent in records older than the share rows
    key, title = _section(device, parts[0]["date"], list(dict.fromkeys(r["model"] for r in rows + shares)), key)
    write_section(out, key, title, render_body(_header(parts), rows, shares, device))
    return key


def from_json(files: list[str], out: str, key: str | None = None) -> None:
    parts = []
    for name in files:
        with open(name) as f:
            parts.append(json.load(f))
    print(f"wrote section '{write_report(parts, out, key)}' of {out}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=None,
                    help=f"comma-separated model names (default: {','.join(MODELS)}; with --quick "
                         f"{','.join(QUICK_MODELS)})")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="inference batch sizes")
    ap.add_argument("--dtype", nargs="+", choices=DTYPES, default=None)
    ap.add_argument("--backbone", default=None,
                    help="one backbone for every model (default: CUDA each model's paper backbone, CPU "
                         "efficientnet_lite0)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="one input size for every model (default: CUDA each paper's, 392 / DPDiff-AD 448 / "
                         "BoRAD 256; CPU 224)")
    ap.add_argument("--train-batch", type=int, default=None,
                    help="train-step and Sinkhorn-share batch (default 16 CUDA, 4 CPU; given, it adds the "
                         "train-step rows to --quick)")
    ap.add_argument("--no-train", action="store_true", help="skip the train-step rows")
    ap.add_argument("--no-share", action="store_true", help="skip the DPDiff-AD Sinkhorn-share rows")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (CPU; default torch's). On a machine shared with other jobs 1 "
                         "thread gives far steadier timings than threads that wait for each other")
    ap.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                    help="inference and train-step rows under torch.compile (default backend inductor), both ops "
                         "choices; the Sinkhorn share stays eager")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="the issue-5 models; CUDA: batch 64 bfloat16 inference + the Sinkhorn share, 5 runs, "
                         "no train-step rows; CPU: 2 runs")
    ap.add_argument("--out", default=None, help="write/update a section of this Markdown file")
    ap.add_argument("--section", default=None, help="the section key in --out (default models-cuda / models-cpu)")
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after every row)")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="render these earlier --json files (one run split over calls) into --out; run nothing")
    return ap.parse_args(argv)


def _print_row(row: dict) -> None:
    head = f"{row['model']:10s} {row['pass']:14s} B={row['batch']:<3d} {row['dtype']:9s} {row['ops']:9s}"
    if row["pass"] == "sinkhorn share":
        body = (f"step {_ms(row['step_s']):>8s} ms  sinkhorn {_ms(row['sinkhorn_s']):>8s} ms  "
                f"share {_num(row['share_pct'], '6.2f')} %")
    else:
        body = (f"{_ms(row['time_s']):>8s} ms {_num(row['images_per_s'], '8.1f')} img/s  "
                f"peak {_mib(row['peak_bytes']):>6s} MiB")
    print(f"{head} {body} ({row['runs']} runs)" + (f"  ERROR {row['error']}" if row["error"] else ""), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.from_json:
        if not args.out:
            raise SystemExit("--from-json needs --out")
        from_json(args.from_json, args.out, args.section)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    cmd = "python bench/models.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {"env": environment(plan), "date": datetime.date.today().isoformat(), "cmd": cmd,
              "load": [_load(), _load()],
              "plan": {**asdict(plan), "memory_method": memory_method()}, "rows": [], "shares": []}
    print(record["env"], flush=True)

    def emit(kind: str, rows: list[dict]) -> None:
        """Record and print the rows; rewrite --json, so that a run cut short keeps what it measured."""
        record[kind] += rows
        record["load"][1] = _load()
        for row in rows:
            _print_row(row)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(record, f, indent=1)

    t0 = time.perf_counter()
    for name in plan.models:
        model, build_error = None, None
        try:
            t_build = time.perf_counter()
            model = build(name, plan)
            print(f"built {name} on {plan.backbones[name]} at {plan.image_sizes[name]} px in "
                  f"{time.perf_counter() - t_build:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001  (every row of this model then carries the error)
            build_error = "build failed: " + _error(exc)
        for mode, batch, dtype in settings_of(plan):
            emit("rows", measure_setting(model, plan, name=name, mode=mode, batch=batch, dtype=dtype,
                                         build_error=build_error))
        if plan.share_batch and name in SHARE_MODELS:
            for dtype in plan.dtypes:
                emit("shares", measure_share(model, plan, name=name, batch=plan.share_batch, dtype=dtype,
                                             build_error=build_error))
        del model
        _release(plan.device)
    body = render_body(_header([record]), record["rows"], record["shares"], plan.device)
    print("\n" + body + f"\n\n(total {time.perf_counter() - t0:.0f} s)")
    if args.out:
        print(f"wrote section '{write_report([record], args.out, args.section)}' of {args.out}")


if __name__ == "__main__":
    main()
