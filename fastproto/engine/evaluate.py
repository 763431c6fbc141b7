"""Evaluate a model on a test loader: per-category metrics (seven + mAD) and their mean, via
:class:`fastproto.metrics.Evaluator`, merged across ranks under torchrun; optional overlay PNGs."""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from fastproto.engine.distributed import EvalSampler, default_device, dist_info, unwrap_model
from fastproto.engine.report import IMAGENET_MEAN, IMAGENET_STD, overlay, save_png
from fastproto.engine.trainer import AMP_DTYPES, to_device
from fastproto.metrics import Evaluator
from fastproto.metrics._inputs import resize
from fastproto.metrics.evaluator import IMAGE_SCORE_RULES


@torch.no_grad()
def evaluate(model: nn.Module, test_loader: Iterable[dict], *, protocol: str = "exact", resolution: int | None = 256,
             image_score: str = "model", topk: float = 0.01, device: str | torch.device | None = None,
             amp: str | None = None, overlays_dir: str | os.PathLike | None = None,
             max_overlays_per_category: int = 8, image_mean: Sequence[float] | None = IMAGENET_MEAN,
             image_std: Sequence[float] | None = IMAGENET_STD, progress: bool = False, compile: str | None = None,
             **evaluator_options) -> dict[str, dict[str, float]]:
    """Run ``model(images) -> {"anomaly_map": [B,H,W], "score": [B]}`` over ``test_loader`` and compute the metrics.

    Args:
        test_loader: batches with ``image``, ``mask`` [B,1,H,W], ``label``, ``category`` (and ``defect``,
            ``path`` for overlay names). Under torchrun use
            :func:`~fastproto.engine.distributed.build_eval_loader` so that every sample is counted once; the
            ranks' evaluator states are merged (``Evaluator.sync``) and every rank returns the same results.
        protocol: :class:`~fastproto.metrics.Evaluator` protocol (``"exact"``, ``"binned"``, legacy ones).
        resolution: evaluation size; maps are resized bilinearly and masks by nearest neighbour (``None``: the
            masks' size).
        image_score: ``"model"`` uses the model's ``score``; ``"max"``, ``"topk_mean"`` or ``"avgpool_max"``
            derive image scores from the maps at the evaluation resolution (``topk`` for ``"topk_mean"``).
        amp: ``"bf16"`` / ``"fp16"`` autocast for the forward pass (maps are evaluated in float32).
        overlays_dir: when set, rank 0 writes ``<dir>/<category>/<defect>_<name>.png`` overlays for the first
            ``max_overlays_per_category`` images of each category it sees, heat maps scaled to the range of that
            category's maps on rank 0; ``image_mean``/``image_std`` undo the input normalisation.
        compile: a ``torch.compile`` backend (e.g. ``"inductor"``) for the model's forward; None runs eagerly.
        evaluator_options: forwarded to :class:`~fastproto.metrics.Evaluator` (``fpr_limit``, ``connectivity``...).

    Returns ``{category: {metric: value}, ..., "mean": {...}}`` as :meth:`Evaluator.compute`.
    """
    if image_score != "model" and image_score not in IMAGE_SCORE_RULES:
        raise ValueError(f"image_score must be 'model' or one of {IMAGE_SCORE_RULES}, got {image_score!r}")
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    info = dist_info()
    if info.world_size > 1 and not isinstance(getattr(test_loader, "sampler", None), EvalSampler):
        raise ValueError(f"evaluate() under {info.world_size} ranks needs a test loader sharded without duplicates: "
                         "build it with fastproto.engine.build_eval_loader (every sample is then counted once)")
    model = unwrap_model(model)
    if device is None:
        device = next((p.device for p in model.parameters()), None) or default_device()
    device = torch.device(device)
    evaluator = Evaluator(protocol, device=device, image_score="max" if image_score == "model" else image_score,
                          topk=topk, resolution=resolution, **evaluator_options)
    keep = _OverlayKeeper(max_overlays_per_category) if overlays_dir is not None and info.is_main else None
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    batches = test_loader
    if progress and info.is_main:
        from tqdm.auto import tqdm

        batches = tqdm(test_loader, desc="eval", dynamic_ncols=True)
    forward = torch.compile(model, backend=compile) if compile else model
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if batch is None:  # every sample of the batch was a bad file skipped by the dataset
                continue
            images = to_device(batch["image"], device)
            with autocast:
                # RGB-D samples (MVTec 3D-AD, Eyecandies) carry a depth image the model takes second
                out = forward(images, to_device(batch["depth"], device)) if "depth" in batch else forward(images)
            maps, masks = _align(out["anomaly_map"].float(), batch["mask"].to(device), resolution)
            scores = out["score"].float() if image_score == "model" else None
            evaluator.update(maps, masks, categories=batch["category"], image_scores=scores,
                             image_labels=batch["label"].to(device))
            if keep is not None:
                keep.add(batch, maps)
    finally:
        model.train(was_training)
    results = evaluator.sync().compute()
    if keep is not None:
        keep.write(os.fspath(overlays_dir), image_mean, image_std)
    return results


def _align(maps: torch.Tensor, masks: torch.Tensor, resolution) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [B,H,W] and masks [B,H,W] of one size: both resized (bilinear / nearest) to ``resolution``, or the
    maps to the masks' size when ``resolution`` is None, as the Evaluator resizes."""
    if maps.dim() == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if maps.dim() != 3 or masks.dim() != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"anomaly_map {tuple(maps.shape)} and mask {tuple(masks.shape)} must be [B,H,W] "
                         "(or [B,1,H,W]) with the same B")
    if maps.shape == masks.shape:
        return maps, masks
    masks = masks > 0.5 if masks.is_floating_point() else masks != 0
    return resize(maps, masks, resolution if resolution is not None else tuple(masks.shape[-2:]))


class _OverlayKeeper:
    """The first ``limit`` images per category (CPU copies) and each category's map range, for overlays."""

    def __init__(self, limit: int):
        self.limit = limit
        self.items: dict[str, list] = {}
        self.range: dict[str, list[float]] = {}

    def add(self, batch: dict, maps: torch.Tensor) -> None:
        n = maps.shape[0]
        defects = batch.get("defect") or [""] * n
        paths = batch.get("path") or [f"{i:05d}" for i in range(n)]
        for i, cat in enumerate(batch["category"]):
            lo, hi = float(maps[i].min()), float(maps[i].max())
            r = self.range.setdefault(cat, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)
            items = self.items.setdefault(cat, [])
            if len(items) < self.limit:
                name = f"{defects[i]}_{os.path.splitext(os.path.basename(str(paths[i])))[0]}".strip("_")
                items.append((name, batch["image"][i].cpu(), maps[i].cpu(), batch["mask"][i].cpu()))

    def write(self, folder: str, mean, std) -> None:
        for cat, items in self.items.items():
            lo, hi = self.range[cat]
            for name, image, amap, mask in items:
                rgb = overlay(image, amap, mask, vmin=lo, vmax=hi, mean=mean, std=std)
                save_png(os.path.join(folder, _safe(cat), f"{_safe(name)}.png"), rgb)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "_"
