"""Iteration-based training loop: resumable, deterministic, mixed precision, DDP-aware.

Resuming is exact: a run killed at any point and resumed from its last checkpoint ends with the same weights as
an uninterrupted run with the same seed. A checkpoint taken after iteration ``k`` holds the model, optimizer,
scheduler and grad-scaler states, every rank's RNG states (torch CPU/CUDA, numpy, random) and ``k``; the data
position is ``k`` itself: epoch ``k // iters_per_epoch``, batch ``k % iters_per_epoch`` of that epoch, whose
order a :class:`~fastproto.engine.distributed.TrainSampler` derives from ``(seed, epoch)`` alone (build the
loader with :func:`~fastproto.engine.distributed.build_train_loader`). Other samplers are resumed by drawing and
discarding the epoch's first batches, which is exact when their order per epoch is seeded: the trainer re-seeds
``loader.generator`` at every epoch, so ``DataLoader(..., shuffle=True, generator=torch.Generator())`` qualifies.

Randomness inside ``Dataset.__getitem__`` resumes exactly with ``num_workers=0`` (it draws from the restored
global RNGs). With workers, each worker's seeds are fixed per epoch, but which worker loads which batch shifts
after a mid-epoch resume: deterministic datasets (the models here train without random augmentation) are exact.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler

from fastproto.engine import checkpoint as ckpt_io
from fastproto.engine.distributed import (TrainSampler, all_gather_object, barrier, default_device, derive_seed,
                                          dist_info, unwrap_model, wrap_for_training)
from fastproto.engine.optim import OptimConfig
from fastproto.engine.report import to_jsonable

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_NAME = "last.pt"
LOG_NAME = "log.jsonl"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed ``random``, numpy's global generator and torch (CPU and CUDA). ``deterministic`` also asks torch for
    deterministic kernels (``torch.use_deterministic_algorithms``; CUDA needs ``CUBLAS_WORKSPACE_CONFIG``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def trainable_parameters(model: nn.Module) -> list:
    """``model.trainable_parameters()`` when defined (parameters or param-group dicts), else the parameters
    with ``requires_grad``."""
    fn = getattr(model, "trainable_parameters", None)
    params = list(fn()) if callable(fn) else [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return params


def _flat_params(params: list) -> list[torch.Tensor]:
    return [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch moved to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _split_loss(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return out, {"loss": out}
    if isinstance(out, dict) and "loss" in out:
        return out["loss"], {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in out.items()}
    raise TypeError(f"model.loss(batch) must return a tensor or a dict with a 'loss' entry, got {type(out).__name__}")


def _steps_per_epoch(loader: DataLoader) -> int:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, TrainSampler):
        sampler.set_epoch(sampler.epoch, 0)
    try:
        n = len(loader)
    except TypeError as e:
        raise ValueError("train_loader has no length (iterable dataset?): pass a map-style dataset loader") from e
    if n < 1:
        raise ValueError("train_loader yields no batch per epoch (dataset smaller than batch_size with drop_last?)")
    return n


def _epoch_batches(loader: DataLoader, seed: int, epoch: int, offset: int, rank: int) -> Iterator:
    """The batches of ``epoch`` from batch ``offset`` on, in the order an uninterrupted run sees them."""
    if loader.generator is not None:  # fixes the workers' seeds (and a default RandomSampler's order) per epoch
        loader.generator.manual_seed(derive_seed(seed, epoch, rank, 1))
    sampler = loader.sampler
    if isinstance(sampler, TrainSampler) and loader.batch_size is not None:
        sampler.set_epoch(epoch, offset * loader.batch_size)
        return iter(loader)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    return itertools.islice(iter(loader), offset, None)


class _JsonlLog:
    """Append-only JSON-lines log; on resume, records past the resumed iteration are dropped first."""

    def __init__(self, path: str, resume_step: int | None):
        self.path = path
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            ckpt_io.atomic_write(path, lambda f: f.write("".join(keep).encode()))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")


def train(model: nn.Module, train_loader: DataLoader, *, iters: int | None = None, epochs: float | None = None,
          optimizer: dict | None = None, out_dir: str | os.PathLike, amp: str | None = None,
          grad_clip: float | None = None, seed: int = 0, ckpt_every: int = 1000, resume: bool | str = True,
          eval_fn: Callable[[nn.Module], dict] | None = None, eval_every: int | None = None, log_every: int = 50,
          progress: bool = True, device: str | torch.device | None = None,
          callback: Callable[[int, dict], None] | None = None, find_unused_parameters: bool = False,
          compile: str | None = None) -> dict:
    """Train ``model`` through ``model.loss(batch)`` for ``iters`` iterations (or ``epochs`` x batches per epoch).

    Args:
        model: an ``nn.Module`` with ``loss(batch) -> Tensor | dict`` (dict: ``"loss"`` is minimised, the other
            entries are logged); optional ``trainable_parameters()``, ``optimizer_config()`` (the paper's
            settings, see :class:`~fastproto.engine.optim.OptimConfig`) and ``on_train_iter(it, total)``, called
            before each iteration's forward with the 0-based iteration index.
        train_loader: batches (dicts; a ``None`` batch, all of whose samples were skipped as bad files, is an
            iteration without update); use :func:`~fastproto.engine.distributed.build_train_loader` for exact
            resume and for sharding under torchrun. Iterations are optimizer steps; an epoch is ``len(loader)``.
        optimizer: overrides of ``model.optimizer_config()`` (same keys).
        out_dir: ``last.pt`` (checkpoint) and ``log.jsonl`` (losses, lr, evaluations) go here.
        amp: ``"bf16"`` (autocast, no scaler), ``"fp16"`` (autocast + GradScaler) or ``None`` (fp32).
        grad_clip: global grad-norm clip; ``None`` takes the optimizer config's ``grad_clip``.
        seed: seeds the RNGs (``seed + rank``) at the start of a fresh run; the loader's order uses ``seed``.
        ckpt_every: write ``last.pt`` every this many iterations (and always at the end).
        resume: ``True`` continues from ``out_dir/last.pt`` if present; a path resumes from that file; ``False``
            starts over (overwriting the log).
        eval_fn: ``eval_fn(model) -> dict`` (e.g. :func:`~fastproto.engine.evaluate.evaluate`), run on every
            rank in eval mode every ``eval_every`` iterations and at the end; logged and stored in checkpoints.
        log_every: losses averaged over this many iterations go to the log and the progress bar.
        callback: ``callback(step, record)`` after each iteration (and its checkpoint); may raise to stop.
        find_unused_parameters: passed to DDP.
        compile: a ``torch.compile`` backend (e.g. ``"inductor"``) for the training loss (forward and backward);
            None runs eagerly. Checkpoints hold the plain model's state either way. A loss that reads a Python
            number changing every iteration recompiles for each new value, up to dynamo's recompile limit, then runs
            eagerly; Dinomaly's ramped hard-mining threshold is therefore computed outside the graph.

    Returns ``{"step", "epoch", "checkpoint", "loss", "metrics"}`` (last logged losses and last evaluation).
    """
    if (iters is None) == (epochs is None):
        raise ValueError("pass exactly one of iters and epochs")
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if ckpt_every < 1 or log_every < 1 or (eval_every is not None and eval_every < 1):
        raise ValueError("ckpt_every, log_every and eval_every must be >= 1")
    info = dist_info()
    device = torch.device(device) if device is not None else default_device()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    model = unwrap_model(model).to(device)

    per_epoch = _steps_per_epoch(train_loader)
    total = int(iters) if iters is not None else math.ceil(epochs * per_epoch)
    if total < 1:
        raise ValueError(f"the run has {total} iterations")
    model_cfg = model.optimizer_config() if callable(getattr(model, "optimizer_config", None)) else None
    cfg = OptimConfig.merge(model_cfg, optimizer)
    clip = cfg.grad_clip if grad_clip is None else grad_clip
    params = trainable_parameters(model)
    opt, sched = cfg.build(params, total, per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    runner = wrap_for_training(model, device, find_unused_parameters=find_unused_parameters)
    if compile:
        runner = torch.compile(runner, backend=compile)
    run_config = {"iters": total, "iters_per_epoch": per_epoch, "seed": seed, "amp": amp, "grad_clip": clip,
                  "world_size": info.world_size, "optimizer": cfg.as_dict()}

    path = os.path.join(out_dir, CHECKPOINT_NAME)
    source = resume if isinstance(resume, (str, os.PathLike)) else (path if resume and os.path.exists(path) else None)
    step, metrics = 0, {}
    seed_everything(seed + info.rank)
    if source is not None:
        state = ckpt_io.load_checkpoint(source, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
        step, metrics = state["step"], state.get("metrics", {})
        _check_resume_config(source, state.get("config", {}), run_config)
        _warn_if_unseeded(train_loader)
        rng = state["rng_state"]
        if len(rng) == info.world_size:
            ckpt_io.set_rng_state(rng[info.rank])
        else:
            warnings.warn(f"{source}: saved with {len(rng)} rank(s), resumed with {info.world_size}; RNG states are "
                          "re-seeded, so the run will not match an uninterrupted one", RuntimeWarning, stacklevel=2)
            seed_everything(derive_seed(seed, step, info.rank) % 2**63)
    log = _JsonlLog(os.path.join(out_dir, LOG_NAME), step if source is not None else None) if info.is_main else None

    def save(at: int) -> None:
        rng = all_gather_object(ckpt_io.get_rng_state())
        if info.is_main:
            ckpt_io.save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler, step=at,
                                    epoch=at // per_epoch, rng_state=rng, config=run_config, metrics=metrics)
        barrier()

    def evaluate_now(at: int) -> dict:
        model.eval()
        try:
            result = eval_fn(model)
        finally:
            model.train()
        if log is not None:
            log.write({"step": at, "eval": result})
        return result

    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    hook = getattr(model, "on_train_iter", None)
    flat = _flat_params(params)
    window: dict[str, torch.Tensor] = {}
    count, last_losses, tic = 0, {}, time.perf_counter()
    model.train()
    try:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            for batch in _epoch_batches(train_loader, seed, epoch, offset, info.rank):
                lr = opt.param_groups[0]["lr"]
                if batch is None:  # every sample was a bad file skipped by the dataset: the iteration makes no update
                    if info.world_size > 1:  # the other ranks would wait for this one's gradients forever
                        raise RuntimeError(f"rank {info.rank}, iteration {step}: empty batch (all samples skipped as "
                                           "bad files); under DDP use on_bad_file='error' or remove the bad files")
                    warnings.warn(f"iteration {step}: empty batch (all samples skipped), no update", RuntimeWarning,
                                  stacklevel=2)
                else:
                    if callable(hook):
                        hook(step, total)
                    with autocast:
                        loss, terms = _split_loss(runner(to_device(batch, device)))
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    if clip is not None:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(flat, clip)
                    scaler.step(opt)
                    scaler.update()
                    for k, v in terms.items():
                        window[k] = window.get(k, 0.0) + v.detach().float()
                    count += 1
                sched.step()
                step += 1
                record: dict[str, Any] = {"step": step}
                if count and (step % log_every == 0 or step == total):
                    last_losses = _mean_over_ranks(window, count, info.world_size)
                    if not math.isfinite(last_losses["loss"]):
                        raise FloatingPointError(f"training loss is {last_losses['loss']} around iteration {step}")
                    now = time.perf_counter()
                    record.update(epoch=step / per_epoch, lr=lr, **last_losses, it_per_s=count / (now - tic))
                    window, count, tic = {}, 0, now
                    if log is not None:
                        log.write(record)
                    if bar is not None:
                        bar.set_postfix(loss=f"{last_losses['loss']:.4g}", lr=f"{lr:.3g}")
                if eval_fn is not None and (step == total or (eval_every and step % eval_every == 0)):
                    metrics = evaluate_now(step)
                    record["eval"] = metrics
                if step % ckpt_every == 0 or step == total:
                    save(step)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    callback(step, record)
                if step >= total:
                    break
    finally:
        if bar is not None:
            bar.close()
    return {"step": step, "epoch": step / per_epoch, "checkpoint": path, "loss": last_losses, "metrics": metrics}


def _warn_if_unseeded(loader: DataLoader) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, RandomSampler) and sampler.generator is None and loader.generator is None:
        warnings.warn("train_loader shuffles with the global RNG: a resumed run sees a different order for the rest "
                      "of this epoch; build it with fastproto.engine.build_train_loader (or pass a "
                      "torch.Generator to the DataLoader) to resume exactly", RuntimeWarning, stacklevel=3)


def _mean_over_ranks(window: dict[str, torch.Tensor], count: int, world: int) -> dict[str, float]:
    """Window sums -> means over iterations and (under DDP) over ranks."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in window.values()]) / count
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(window, values.tolist(), strict=True))


def _check_resume_config(source, saved: dict, current: dict) -> None:
    keys = ("iters", "iters_per_epoch", "seed", "amp", "grad_clip", "world_size", "optimizer")
    diff = [k for k in keys if k in saved and saved[k] != current[k]]
    if diff:
        detail = "; ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in diff)
        warnings.warn(f"resuming from {source} with different settings ({detail}): the run will not match an "
                      "uninterrupted one", RuntimeWarning, stacklevel=3)
