"""Streaming evaluator for the seven AD metrics (torchmetrics-style ``update / compute / reset / merge``).

Protocols:
- ``"exact"`` (default): per category, normal-pixel scores (float32) and anomalous-pixel scores with their
  region sizes are kept (about 4 bytes per pixel); ``compute`` sorts only the anomalous scores and makes
  one streaming pass over the normal ones, so every metric equals the float64 sort-based definition.
- ``"binned"``: fixed memory per category (histograms keyed on the float32 bit pattern), mergeable by
  summation, with a rigorous error bound per pixel metric (``compute(with_bounds=True)``). Image metrics
  stay exact (one score per image is kept).
- ``"dinomaly"``, ``"ader"``, ``"adeval"``: the published codes' algorithms, to reproduce their tables
  (see :mod:`fastproto.metrics.legacy`); they keep every map of a category, as those codes do.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from fastproto.metrics import _inputs
from fastproto.metrics.components import split_pixels
from fastproto.metrics.binned import PagedHistogram
from fastproto.metrics.curves import exact_metrics

METRICS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
PROTOCOLS = ("exact", "binned", "dinomaly", "ader", "adeval")
IMAGE_SCORE_RULES = ("max", "topk_mean", "avgpool_max")
DEFAULT_BINS_BITS = 28
DEFAULT_MAX_BINS = 1 << 20


@dataclass
class _Category:
    image_scores: list = field(default_factory=list)
    image_labels: list = field(default_factory=list)
    n_regions: int = 0
    # exact: compact pixel lists; legacy: dense maps/masks; binned: histograms
    neg: list = field(default_factory=list)
    pos: list = field(default_factory=list)
    pos_sizes: list = field(default_factory=list)
    maps: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    hist: PagedHistogram | None = None

    def merge(self, other: "_Category") -> None:
        for name in ("image_scores", "image_labels", "neg", "pos", "pos_sizes", "maps", "masks"):
            getattr(self, name).extend(getattr(other, name))
        self.n_regions += other.n_regions
        if other.hist is not None:
            self.hist = other.hist.clone() if self.hist is None else self.hist.merge(other.hist)


def image_scores_from_maps(maps: torch.Tensor, rule: str, topk: float) -> torch.Tensor:
    from fastproto.ops import image_score

    return image_score(maps, rule, topk=topk)


class Evaluator:
    """Accumulates anomaly maps per category and computes the seven AD metrics and their mean (mAD).

    Args:
        protocol: ``"exact"``, ``"binned"``, ``"dinomaly"``, ``"ader"`` or ``"adeval"``.
        device: where the state lives and the computation runs (``None``: the device of the first update).
        image_score: rule deriving image scores from maps when none are given: ``"max"``, ``"topk_mean"``
            (mean of the top ``topk`` fraction of pixels, Dinomaly/INP-Former) or ``"avgpool_max"``.
        topk: fraction for ``"topk_mean"``.
        fpr_limit: AUPRO integration limit (0.3).
        resolution: evaluation resolution (int or (H, W)); maps are resized bilinearly and masks by nearest
            neighbour. ``None`` evaluates at the given size.
        connectivity: 8 (MVTec official) or 4 for ground-truth regions.
        mask_threshold: float masks are binarised with ``> mask_threshold``.
        bins_bits: binned protocol only: resolution as bits of the float32 key inside the pages the data
            occupies (default 28: a bin is 2**-19 of its value wide).
        max_bins: binned protocol only: bin budget (default 2**20: at most 24.1 MiB of state per category);
            see :mod:`fastproto.metrics.binned`.
        legacy_options: forwarded to :func:`fastproto.metrics.legacy.legacy_category_metrics`.
    """

    def __init__(self, protocol: str = "exact", *, device=None, image_score: str = "max", topk: float = 0.01,
                 fpr_limit: float = 0.3, resolution=None, connectivity: int = 8, mask_threshold: float = 0.5,
                 bins_bits: int | None = None, max_bins: int | None = None, legacy_options: dict | None = None, impl: str = "auto"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if image_score not in IMAGE_SCORE_RULES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_RULES}, got {image_score!r}")
        if not 0 < topk <= 1:
            raise ValueError(f"topk must be in (0, 1], got {topk}")
        if not 0 < fpr_limit <= 1:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
        bits = DEFAULT_BINS_BITS if bins_bits is None else int(bins_bits)
        if not 12 <= bits <= 32:
            raise ValueError(f"bins_bits must be in [12, 32], got {bits}")
        if protocol != "binned" and (bins_bits is not None or max_bins is not None):
            raise ValueError("bins_bits and max_bins apply to protocol='binned' only")
        budget = DEFAULT_MAX_BINS if max_bins is None else int(max_bins)
        if budget < 0:
            raise ValueError(f"max_bins must be >= 0, got {budget}")
        if legacy_options and protocol not in ("dinomaly", "ader", "adeval"):
            raise ValueError("legacy_options applies to the legacy protocols only")
        self.protocol = protocol
        self.device = torch.device(device) if device is not None else None
        self.image_score = image_score
        self.topk = topk
        self.fpr_limit = fpr_limit
        self.resolution = resolution
        self.connectivity = connectivity
        self.mask_threshold = mask_threshold
        self.bins_bits = bits
        self.max_bins = budget
        self.legacy_options = dict(legacy_options or {})
        self.impl = impl
        self._categories: dict[str, _Category] = {}

    # ------------------------------------------------------------------------------------------- state

    def reset(self) -> None:
        self._categories = {}

    @property
    def categories(self) -> list[str]:
        return list(self._categories)

    def _new_hist(self) -> PagedHistogram:
        return PagedHistogram(self.bins_bits, self.max_bins, self.device)

    @torch.no_grad()
    def update(self, anomaly_maps, masks, categories=None, image_scores=None, image_labels=None) -> None:
        """Add a batch: maps ``[B,H,W]`` float, masks ``[B,H,W]`` bool/uint8/float, optional per-image
        ``categories`` (str or list of B str), ``image_scores`` [B] and ``image_labels`` [B] (default: the
        mask has an anomalous pixel)."""
        maps = _inputs.prepare_maps(anomaly_maps, "anomaly_maps", self.device)
        if self.device is None:
            self.device = maps.device
        masks = _inputs.prepare_masks(masks, maps.shape, "masks", self.device, self.mask_threshold)
        batch = maps.shape[0]
        maps, masks = _inputs.resize(maps, masks, self.resolution)
        has_defect = masks.flatten(1).any(1)
        if image_labels is None:
            labels = has_defect
        else:
            labels = _inputs.prepare_vector(image_labels, batch, "image_labels", self.device, binary=True)
            bad = (~labels) & has_defect
            if bool(bad.any()):
                idx = torch.nonzero(bad).flatten().tolist()[:8]
                raise ValueError(f"image_labels marks image(s) {idx} as normal but their masks have anomalous pixels")
        if image_scores is None:
            scores = image_scores_from_maps(maps, self.image_score, self.topk).float()
        else:
            scores = _inputs.prepare_vector(image_scores, batch, "image_scores", self.device)
        cats = _inputs.normalize_categories(categories, batch)
        for name in dict.fromkeys(cats):
            sel = [i for i, c in enumerate(cats) if c == name]
            index = torch.as_tensor(sel, device=self.device)
            whole = len(sel) == batch
            m, k = (maps, masks) if whole else (maps[index], masks[index])
            self._add(name, m, k, scores[index], labels[index])

    def _add(self, name, maps, masks, scores, labels) -> None:
        cat = self._categories.setdefault(name, _Category())
        cat.image_scores.append(scores)
        cat.image_labels.append(labels)
        if self.protocol in ("dinomaly", "ader", "adeval"):
            cat.maps.append(maps.cpu())
            cat.masks.append(masks.cpu())
            return
        split = split_pixels(maps, masks, self.connectivity, impl=self.impl)
        cat.n_regions += split.n_regions
        if self.protocol == "exact":
            cat.neg.append(split.neg)
            cat.pos.append(split.pos)
            cat.pos_sizes.append(split.pos_sizes)
        else:
            if cat.hist is None:
                cat.hist = self._new_hist()
            cat.hist.update(split.neg, split.pos, split.pos_sizes, impl=self.impl)

    # ------------------------------------------------------------------------------------------- merge

    def _settings(self) -> tuple:
        return (self.protocol, self.fpr_limit, self.connectivity, self.bins_bits, self.max_bins, self.resolution,
                self.image_score, self.topk, self.mask_threshold)

    def merge(self, other: "Evaluator") -> "Evaluator":
        """Add another evaluator's state (same protocol and options) into this one."""
        if not isinstance(other, Evaluator):
            raise TypeError(f"can only merge an Evaluator, got {type(other).__name__}")
        mine = self._settings()
        theirs = other._settings()
        if mine != theirs:
            raise ValueError(f"cannot merge evaluators with different settings: {mine} vs {theirs}")
        if self.device is None:
            self.device = other.device
        for name, cat in other._categories.items():
            self._categories.setdefault(name, _Category()).merge(_to_device(cat, self.device))
        return self

    def sync(self, group=None) -> "Evaluator":
        """Merge the states of all ranks of ``torch.distributed`` into every rank (no-op when not initialised).

        Binned histograms are all-reduced (sum); exact and legacy states are gathered per category."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        world = dist.get_world_size(group)
        if self.protocol == "binned":
            light = {n: (c.image_scores, c.image_labels, c.n_regions) for n, c in self._categories.items()}
            light = {n: ([t.cpu() for t in s], [t.cpu() for t in lab], r) for n, (s, lab, r) in light.items()}
            gathered = [None] * world
            dist.all_gather_object(gathered, light, group=group)
            names = sorted({n for g in gathered for n in g})
            merged = {}
            for name in names:
                cat = _Category(hist=self._categories[name].hist if name in self._categories else self._new_hist())
                cat.hist.all_reduce(group)
                for g in gathered:
                    if name in g:
                        s, lab, r = g[name]
                        cat.image_scores += [t.to(self.device) for t in s]
                        cat.image_labels += [t.to(self.device) for t in lab]
                        cat.n_regions += r
                merged[name] = cat
            self._categories = merged
            return self
        local = {n: _to_device(c, torch.device("cpu")) for n, c in self._categories.items()}
        gathered = [None] * world
        dist.all_gather_object(gathered, local, group=group)
        self._categories = {}
        for g in gathered:
            for name, cat in g.items():
                self._categories.setdefault(name, _Category()).merge(_to_device(cat, self.device))
        return self

    # ----------------------------------------------------------------------------------------- compute

    def compute(self, with_bounds: bool = False) -> dict[str, dict[str, float]]:
        """Per-category metrics plus their unweighted mean under ``"mean"``.

        Values are floats in [0, 1]; an undefined metric (e.g. no anomalous pixel in a category) is NaN and
        a warning names the category. ``with_bounds`` (binned protocol) adds ``<metric>_bound`` entries.
        """
        if not self._categories:
            raise ValueError("Evaluator.compute() called before any update (no images)")
        if with_bounds and self.protocol != "binned":
            raise ValueError("with_bounds=True applies to protocol='binned' only (the others are exact or fixed)")
        results = {}
        for name, cat in self._categories.items():
            results[name] = self._compute_category(name, cat, with_bounds)
        keys = list(next(iter(results.values())))
        results["mean"] = {k: float(sum(r[k] for r in results.values()) / len(results)) for k in keys}
        return results

    def _compute_category(self, name: str, cat: _Category, with_bounds: bool) -> dict[str, float]:
        scores = torch.cat(cat.image_scores)
        labels = torch.cat(cat.image_labels)
        out = {}
        if self.protocol in ("dinomaly", "ader", "adeval"):
            from fastproto.metrics.legacy import legacy_category_metrics

            out = legacy_category_metrics(self.protocol, torch.cat(cat.maps).numpy(), torch.cat(cat.masks).numpy(),
                                          scores.cpu().double().numpy(), labels.cpu().numpy(),
                                          fpr_limit=self.fpr_limit, **self.legacy_options)
            out = {k: float(out[k]) for k in METRICS}
        else:
            image = exact_metrics([scores[~labels]], scores[labels], impl=self.impl)
            out.update(i_auroc=image["auroc"], i_ap=image["ap"], i_f1max=image["f1max"])
            if self.protocol == "exact":
                pixel = exact_metrics(cat.neg, torch.cat(cat.pos), torch.cat(cat.pos_sizes), cat.n_regions,
                                      self.fpr_limit, impl=self.impl)
            else:
                pixel = cat.hist.metrics(cat.n_regions, self.fpr_limit)
            out.update(p_auroc=pixel["auroc"], p_ap=pixel["ap"], p_f1max=pixel["f1max"], aupro=pixel["aupro"])
            if with_bounds:
                bounds = {"i_auroc_bound": 0.0, "i_ap_bound": 0.0, "i_f1max_bound": 0.0,
                          "p_auroc_bound": pixel["auroc_bound"], "p_ap_bound": pixel["ap_bound"],
                          "p_f1max_bound": pixel["f1max_bound"], "aupro_bound": pixel["aupro_bound"]}
        _warn_undefined(name, out, labels)
        out["mad"] = float(sum(out[k] for k in METRICS) / len(METRICS))
        if with_bounds:
            out.update(bounds)
            out["mad_bound"] = sum(bounds.values()) / len(METRICS)
        return out


def _to_device(cat: _Category, device) -> _Category:
    move = lambda xs: [x.to(device) for x in xs]  # noqa: E731
    return _Category(image_scores=move(cat.image_scores), image_labels=move(cat.image_labels), n_regions=cat.n_regions,
                     neg=move(cat.neg), pos=move(cat.pos), pos_sizes=move(cat.pos_sizes), maps=list(cat.maps),
                     masks=list(cat.masks), hist=None if cat.hist is None else cat.hist.to(device))


def _warn_undefined(name: str, out: dict, labels: torch.Tensor) -> None:
    undefined = [k for k in METRICS if math.isnan(out[k])]
    if not undefined:
        return
    n_anomalous = int(labels.sum())
    reasons = []
    if n_anomalous == 0:
        reasons.append("no anomalous image")
    if n_anomalous == labels.numel():
        reasons.append("no normal image")
    if any(k.startswith("p_") or k == "aupro" for k in undefined):
        reasons.append("no anomalous pixel or no normal pixel")
    warnings.warn(f"category {name!r}: {', '.join(undefined)} undefined ({'; '.join(reasons)}): reported as NaN",
                  RuntimeWarning, stacklevel=4)
