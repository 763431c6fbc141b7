"""Optimizers and learning-rate schedules of the models' papers.

- :class:`StableAdamW`: AdamW with per-tensor update clipping, as used by Dinomaly and INP-Former.
- :func:`build_optimizer`: ``"stable_adamw"``, ``"adam"`` or ``"adamw"`` by name.
- :class:`WarmupCosineLR`: linear warm-up then cosine decay to ``min_lr_ratio`` x lr, iteration based, with
  the semantics of Dinomaly's ``WarmCosineScheduler``; ``"step"`` decay (BoRAD: x0.1 at an epoch) is torch's
  ``MultiStepLR`` on iterations.
- :class:`OptimConfig`: one flat configuration for optimizer, schedule and gradient clipping, merged from
  library defaults < ``model.optimizer_config()`` < user overrides.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR

OPTIMIZERS = ("stable_adamw", "adam", "adamw")
SCHEDULES = ("cosine", "constant", "step")


class StableAdamW(Optimizer):
    """AdamW whose step is shrunk per tensor when the current gradient is large relative to the second moment.

    For every parameter tensor ``p`` with gradient ``g`` at step ``t`` (1-based), learning rate ``lr``:

    .. code-block:: text

        p  <- p * (1 - lr * weight_decay)                      decoupled decay, with the unclipped lr
        m  <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   (amsgrad) v_max <- max(v_max, v), v := v_max
        d  =  sqrt(v) / sqrt(1 - b2^t) + eps
        r  =  max(1, RMS(g / d) / clip_threshold)              RMS over the tensor's elements, current g
        p  <- p - lr / (1 - b1^t) / r * m / d

    This is the update of the ``StableAdamW`` file shipped with Dinomaly and INP-Former (their defaults there:
    amsgrad=True, eps 1e-10 or 1e-8, weight decay 1e-4 on every tensor). It differs from the StableAdamW paper
    (Wortsman et al., 2023) in two details, kept here so published runs reproduce: the decay uses the unclipped
    lr, and the RMS includes ``eps`` in the denominator.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: moment coefficients (b1, b2).
        eps: added to the bias-corrected root of the second moment.
        weight_decay: decoupled weight decay coefficient (multiplied by lr).
        amsgrad: normalise by the running maximum of the second moment.
        clip_threshold: RMS of ``g / d`` above which the step is scaled down.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, clip_threshold: float = 1.0):
        if not lr >= 0.0:
            raise ValueError(f"StableAdamW: lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise ValueError(f"StableAdamW: eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"StableAdamW: betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"StableAdamW: weight_decay must be >= 0, got {weight_decay}")
        if not clip_threshold > 0.0:
            raise ValueError(f"StableAdamW: clip_threshold must be > 0, got {clip_threshold}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "clip_threshold": clip_threshold}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("StableAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    second = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                denom = (second.sqrt() / math.sqrt(1.0 - beta2 ** t)).add_(eps)
                rms = torch.linalg.vector_norm(grad / denom) / math.sqrt(grad.numel())
                shrink = torch.clamp(rms / group["clip_threshold"], min=1.0)
                p.sub_(exp_avg / denom * (lr / (1.0 - beta1 ** t) / shrink))
        return loss


class WarmupCosineLR(LRScheduler):
    """Linear warm-up then half-cosine decay, stepped once per iteration (0-based iteration ``i``):

    - ``i < warmup_iters``: ``lr * (s + (1 - s) * i / (warmup_iters - 1))`` with ``s = warmup_start_ratio``;
      the first iteration runs at ``s * lr`` (0 by default) and the last warm-up iteration at ``lr``
      (``numpy.linspace(s * lr, lr, warmup_iters)``; one warm-up iteration runs at ``s * lr``).
    - ``warmup_iters <= i < total_iters``: ``lr * (m + (1 - m) * (1 + cos(pi * j / n)) / 2)`` with
      ``j = i - warmup_iters``, ``n = total_iters - warmup_iters``, ``m = min_lr_ratio``.
    - ``i >= total_iters``: ``m * lr``.

    This is Dinomaly's / INP-Former's ``WarmCosineScheduler(opt, lr, m * lr, total_iters, warmup_iters)``
    expressed per parameter group as a factor of its initial lr. ``min_lr_ratio=1`` gives warm-up then constant.
    """

    def __init__(self, optimizer: Optimizer, total_iters: int, warmup_iters: int = 0, min_lr_ratio: float = 0.0,
                 warmup_start_ratio: float = 0.0, last_epoch: int = -1):
        if total_iters < 1 or warmup_iters < 0 or warmup_iters > total_iters:
            raise ValueError(f"WarmupCosineLR: need 0 <= warmup_iters <= total_iters and total_iters >= 1, "
                             f"got warmup_iters={warmup_iters}, total_iters={total_iters}")
        if not 0.0 <= min_lr_ratio <= 1.0 or not 0.0 <= warmup_start_ratio <= 1.0:
            raise ValueError(f"WarmupCosineLR: min_lr_ratio and warmup_start_ratio must be in [0, 1], "
                             f"got {min_lr_ratio} and {warmup_start_ratio}")
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.min_lr_ratio = float(min_lr_ratio)
        self.warmup_start_ratio = float(warmup_start_ratio)
        super().__init__(optimizer, last_epoch)

    def lr_factor(self, i: int) -> float:
        """Multiplier of the initial lr at 0-based iteration ``i``."""
        w, m, s = self.warmup_iters, self.min_lr_ratio, self.warmup_start_ratio
        if i < w:
            return s + (1.0 - s) * (i / (w - 1) if w > 1 else 0.0)
        if i >= self.total_iters:
            return m
        return m + 0.5 * (1.0 - m) * (1.0 + math.cos(math.pi * (i - w) / (self.total_iters - w)))

    def get_lr(self) -> list[float]:
        return [base * self.lr_factor(self.last_epoch) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_optimizer(params: Iterable, name: str = "adamw", **kwargs: Any) -> Optimizer:
    """Optimizer by name: ``"stable_adamw"`` (:class:`StableAdamW`), ``"adam"`` or ``"adamw"`` (torch's).

    ``kwargs`` are the optimizer's own (lr, betas, eps, weight_decay, amsgrad; clip_threshold for stable_adamw).
    ``weight_decay`` for ``"adam"`` is coupled L2 (torch semantics); for the other two it is decoupled."""
    classes = {"stable_adamw": StableAdamW, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
    if name != "stable_adamw" and "clip_threshold" in kwargs:
        raise ValueError(f"clip_threshold applies to 'stable_adamw' only, not {name!r}")
    params = list(params)
    if not params:
        raise ValueError("build_optimizer: no parameters to optimize (is every parameter frozen?)")
    return classes[name](params, **kwargs)


@dataclasses.dataclass
class OptimConfig:
    """Optimizer, schedule and gradient clipping of one training run.

    Epoch-based fields (``warmup_epochs``, ``milestone_epochs``) are converted to iterations with the run's
    iterations per epoch; when both forms are given the epoch form wins. ``total_iters=None`` means the run's
    length. ``weight_decay=None`` is the optimizer's default (0 for adam, 1e-2 for adamw and stable_adamw).
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    clip_threshold: float = 1.0
    schedule: str = "cosine"
    warmup_iters: int = 0
    warmup_epochs: float | None = None
    warmup_start_ratio: float = 0.0
    total_iters: int | None = None
    min_lr_ratio: float = 0.0
    milestones: tuple[int, ...] = ()
    milestone_epochs: tuple[float, ...] = ()
    gamma: float = 0.1
    grad_clip: float | None = None

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        self.betas = tuple(self.betas)
        self.milestones = tuple(int(m) for m in self.milestones)
        self.milestone_epochs = tuple(self.milestone_epochs)

    @classmethod
    def merge(cls, *sources: dict | None) -> OptimConfig:
        """Defaults updated by each source in turn (later wins); unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for src in sources:
            if not src:
                continue
            unknown = sorted(set(src) - known)
            if unknown:
                raise ValueError(f"unknown optimizer config key(s) {unknown}; known keys: {sorted(known)}")
            values.update(src)
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def build(self, params: Iterable, total_iters: int, iters_per_epoch: int) -> tuple[Optimizer, LRScheduler]:
        """The optimizer and its per-iteration scheduler for a run of ``total_iters`` iterations."""
        kwargs: dict[str, Any] = {"lr": self.lr, "betas": self.betas, "eps": self.eps, "amsgrad": self.amsgrad}
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        if self.name == "stable_adamw":
            kwargs["clip_threshold"] = self.clip_threshold
        optimizer = build_optimizer(params, self.name, **kwargs)

        def per_epoch(epochs: float) -> int:
            return round(epochs * iters_per_epoch)

        if self.schedule == "step":
            if self.warmup_iters or self.warmup_epochs:
                raise ValueError("schedule='step' has no warm-up; use schedule='cosine' or drop warmup_*")
            milestones = [per_epoch(e) for e in self.milestone_epochs] or list(self.milestones)
            return optimizer, MultiStepLR(optimizer, milestones=milestones, gamma=self.gamma)
        warmup = per_epoch(self.warmup_epochs) if self.warmup_epochs is not None else self.warmup_iters
        total = self.total_iters if self.total_iters is not None else total_iters
        ratio = 1.0 if self.schedule == "constant" else self.min_lr_ratio
        return optimizer, WarmupCosineLR(optimizer, total, warmup, ratio, self.warmup_start_ratio)
