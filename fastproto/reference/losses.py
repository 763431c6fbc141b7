"""Reference (plain PyTorch) mining cosine losses and the INP coherence loss (DESIGN "Ops" item 5).

A re-statement of the official training losses, *including their gradient-hook mechanism*, used as
the ground truth for :mod:`fastproto.ops.losses` (whose backward is analytic and fused instead).
The functions assume validated inputs (see :mod:`fastproto.ops.losses`).

Semantics (Dinomaly ``utils.global_cosine_hm_percent``; INP-Former ``utils.global_cosine_hm_adaptive``;
``INP_Former.gather_loss``):

* Per layer group ``g`` (encoder ``E_g``, decoder ``D_g``; [B, C, H, W] maps, channel dim 1, or
  [B, N, C] tokens, channel dim -1) the value is the *global* cosine loss
  ``mean_b(1 - cos(flatten(E_g[b]), flatten(D_g[b])))`` with the encoder side detached; the loss is
  the **mean** over groups (both official functions divide by ``len(a)``).
* A per-position distance ``d = 1 - cos`` over channels is computed without grad (over the whole
  group: all images and positions) and a hook on ``D_g`` rescales its gradient per position
  (broadcast over channels):

  - ``hard`` (Dinomaly): ``k = int(d.numel() * (1 - p))``, ``thresh`` = the k-th largest ``d``
    (``torch.topk``); positions with ``d < thresh`` get gradient ``× factor``; the top-k keep theirs.
    ``p = 0`` rescales nothing.
  - ``soft`` (INP-Former / Pro-AD): gradient ``× (d / mean(d)) ** y`` (mean over the whole group).

  The value is never reweighted. Cosines follow ``torch.nn.CosineSimilarity`` (eps = 1e-8).
* ``coherence_loss``: ``mean_{b,n} min_m (1 - cos(f[b, n], p_m))`` (gradient through the selected
  prototype only, as ``torch.min``'s).

float16/bfloat16 inputs are computed in float32; the scalar is returned in the decoder's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F

from fastproto.reference import prototype as _proto
from fastproto.reference._precision import outside_autocast

COS_EPS = 1e-8  # torch.nn.CosineSimilarity default, as in the official code
MODES = ("soft", "hard")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def channel_dim(t: torch.Tensor) -> int:
    """1 for [B, C, H, W] maps, -1 (last) for [B, N, C] tokens."""
    return 1 if t.dim() == 4 else -1


def point_distance(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` over channels, keepdim (so it broadcasts against the features), compute dtype."""
    cd = _compute_dtype(d)
    cdim = channel_dim(d)
    return (1 - F.cosine_similarity(e.to(cd), d.to(cd), dim=cdim, eps=COS_EPS)).unsqueeze(cdim)


def hard_threshold(dist: torch.Tensor, p: float) -> torch.Tensor:
    """The k-th largest distance, ``k = int(numel * (1 - p))`` (Dinomaly).

    Under ``torch.compile`` it runs outside the graph: k sets topk's output size, and Dinomaly's ramp changes p (so
    k) every iteration of its first 1000; compiled, each new k would be a recompilation, and the recompile limit
    would leave the whole loss eager for the rest of the run. (Disabled at call time: ``torch.compiler.disable``
    at import would import dynamo, about 2 s, into every ``import fastproto``.)"""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_kth_largest)(dist, p)
    return _kth_largest(dist, p)


def _kth_largest(dist: torch.Tensor, p: float) -> torch.Tensor:
    k = int(dist.numel() * (1 - p))
    return torch.topk(dist.reshape(-1), k=k)[0][-1]


def _scale_where(g: torch.Tensor, inds: torch.Tensor, factor: float) -> torch.Tensor:
    g = g.clone()
    g[inds.expand_as(g)] *= factor
    return g


def _scale_by(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return g * w.to(g.dtype).expand_as(g)


def _global_cos_term(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    cd = _compute_dtype(d)
    b = d.shape[0]
    return torch.mean(1 - F.cosine_similarity(e.to(cd).reshape(b, -1), d.to(cd).reshape(b, -1), dim=1, eps=COS_EPS))


@outside_autocast
def cosine_mining_loss(encoder_feats: Sequence[torch.Tensor], decoder_feats: Sequence[torch.Tensor], *,
                       mode: str = "soft", gamma: float = 3.0, hard_fraction: float = 0.9,
                       hard_factor: float = 0.1) -> torch.Tensor:
    """Mean over groups of the global cosine loss; decoder gradients reweighted by hooks (see module doc)."""
    if mode not in MODES:
        raise ValueError(f"cosine_mining_loss: mode must be one of {MODES}, got {mode!r}")
    loss = 0
    for e, d in zip(encoder_feats, decoder_feats):
        e = e.detach()
        with torch.no_grad():
            dist = point_distance(e, d)
            if mode == "hard":
                hook = partial(_scale_where, inds=dist < hard_threshold(dist, hard_fraction), factor=hard_factor)
            else:
                hook = partial(_scale_by, w=(dist / dist.mean()) ** gamma)
        loss = loss + _global_cos_term(e, d)
        if d.requires_grad and torch.is_grad_enabled():
            d.register_hook(hook)
    loss = loss / len(decoder_feats)
    return loss.to(decoder_feats[0].dtype)


@outside_autocast
def coherence_loss(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """INP-Former ``L_c = mean_{b,n} min_m (1 - cos(f[b, n], p_m))``; ``features`` [B, N, C],
    ``prototypes`` [M, C] or [B, M, C]."""
    dist, _ = _proto.route(features, prototypes, mode="nearest", per_location=False)
    cd = _compute_dtype(features)
    return dist.to(cd).mean().to(features.dtype)
