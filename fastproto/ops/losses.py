"""Mining cosine losses and the INP coherence loss (DESIGN "Ops" item 5): API, validation, dispatch.

* :func:`cosine_mining_loss` — Dinomaly's hard mining (``global_cosine_hm_percent``) and
  INP-Former / Pro-AD's soft mining (``global_cosine_hm_adaptive``): the value is the plain global
  cosine loss (mean over layer groups of ``mean_b(1 - cos(flatten(E_b), flatten(D_b)))``, encoder
  detached); only the decoder gradient is reweighted per position by ``d = 1 - cos`` over channels.
* :func:`coherence_loss` — INP-Former ``L_c = mean_{b,n} min_m (1 - cos(f, p_m))`` on
  :func:`fastproto.ops.route` (``mode="nearest"``).

``impl="fused"`` (what ``"auto"`` picks, on every device) is a ``torch.autograd.Function`` per
group: the forward computes the value and the per-position weights, the backward writes the
reweighted gradient analytically (no gradient hooks). ``impl="reference"`` is the hook-based
re-statement of the official code in :mod:`fastproto.reference.losses`. There is no Triton kernel
yet.

Difference from the official hooks: those rescale the *whole* gradient reaching each decoder
tensor (including gradients from other loss terms that use the same tensor); the fused op rescales
only the gradient of this loss. In the official training scripts no other term uses the decoder
features, so the two agree there.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence

import torch

from fastproto.ops._dispatch import apply, is_finite_real
from fastproto.ops.prototype import route

_ref = importlib.import_module("fastproto.reference.losses")

__all__ = ["MODES", "coherence_loss", "cosine_mining_loss"]

MODES = _ref.MODES
IMPLS = ("auto", "fused", "reference")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EPS = _ref.COS_EPS


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class _MiningGroupFn(torch.autograd.Function):
    """One layer group: ``scale * mean_b(1 - cos_b)``; backward = analytic gradient × per-position weight."""

    @staticmethod
    def forward(ctx, e, d, mode, gamma, p, factor, scale):
        cd = _compute_dtype(d)
        cdim = 1 if d.dim() == 4 else d.dim() - 1
        B = d.shape[0]
        ef, df = e.to(cd), d.to(cd)
        # global cosine per image
        e2, d2 = ef.reshape(B, -1), df.reshape(B, -1)
        dot = (e2 * d2).sum(1)
        ne = torch.linalg.vector_norm(e2, dim=1)
        nd = torch.linalg.vector_norm(d2, dim=1)
        cos = dot / (ne.clamp_min(_EPS) * nd.clamp_min(_EPS))
        loss = (1 - cos).mean() * scale
        # per-position distance over channels -> gradient weight (keepdim, broadcasts over channels)
        pdot = (ef * df).sum(cdim, keepdim=True)
        pne = torch.linalg.vector_norm(ef, dim=cdim, keepdim=True).clamp_min(_EPS)
        pnd = torch.linalg.vector_norm(df, dim=cdim, keepdim=True).clamp_min(_EPS)
        dist = 1 - pdot / (pne * pnd)
        if mode == "hard":
            thresh = _ref.hard_threshold(dist, p)
            w = torch.where(dist < thresh, torch.full_like(dist, factor), torch.ones_like(dist))
        else:
            w = (dist / dist.mean()) ** gamma
        ctx.save_for_backward(e, d, cos, ne, nd, w)
        ctx.scale = scale
        return loss.to(d.dtype)

    @staticmethod
    def backward(ctx, g):
        e, d, cos, ne, nd, w = ctx.saved_tensors
        cd = _compute_dtype(d)
        B = d.shape[0]
        shape = (B,) + (1,) * (d.dim() - 1)
        ef, df = e.to(cd), d.to(cd)
        Ne, Nd = ne.clamp_min(_EPS), nd.clamp_min(_EPS)
        # d cos_b / d D_b = E_b / (Ne Nd) - cos_b D_b / Nd^2  (second term only where ||D_b|| > eps)
        a = (1.0 / (Ne * Nd)).reshape(shape)
        c = torch.where(nd > _EPS, cos / (Nd * Nd), torch.zeros_like(cos)).reshape(shape)
        coef = -(g.to(cd) * ctx.scale / B)
        grad = coef * (ef * a - df * c)
        grad = grad * w
        return None, grad.to(d.dtype), None, None, None, None, None


def _check_real(op, name, v):
    if not is_finite_real(v):
        raise ValueError(f"{op}: {name} must be a finite real number, got {v!r}")
    return float(v)


def _check_groups(op, encoder_feats, decoder_feats):
    for name, seq in (("encoder_feats", encoder_feats), ("decoder_feats", decoder_feats)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors (one per layer group), "
                            f"got {type(seq).__name__}")
    if len(encoder_feats) != len(decoder_feats):
        raise ValueError(f"{op}: encoder_feats has {len(encoder_feats)} groups but decoder_feats has "
                         f"{len(decoder_feats)}")
    if len(decoder_feats) == 0:
        raise ValueError(f"{op}: no layer groups given")
    ref = decoder_feats[0]
    for i, (e, d) in enumerate(zip(encoder_feats, decoder_feats)):
        for name, t in (("encoder_feats", e), ("decoder_feats", d)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: {name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{op}: {name}[{i}] must be float16/bfloat16/float32/float64, got {t.dtype}")
            if t.dim() not in (3, 4):
                raise ValueError(f"{op}: {name}[{i}] must be [B, C, H, W] or [B, N, C], got shape {tuple(t.shape)}")
            if t.device != ref.device:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but decoder_feats[0] is on {ref.device}")
            if t.numel() == 0:
                raise ValueError(f"{op}: {name}[{i}] is empty (shape {tuple(t.shape)})")
        if e.shape != d.shape:
            raise ValueError(f"{op}: group {i}: encoder shape {tuple(e.shape)} != decoder shape {tuple(d.shape)}")
        if e.dtype != d.dtype:
            raise TypeError(f"{op}: group {i}: encoder dtype {e.dtype} != decoder dtype {d.dtype}")


def cosine_mining_loss(encoder_feats: Sequence[torch.Tensor], decoder_feats: Sequence[torch.Tensor], *,
                       mode: str = "soft", gamma: float = 3.0, hard_fraction: float = 0.9,
                       hard_factor: float = 0.1, impl: str = "auto") -> torch.Tensor:
    """Global cosine reconstruction loss with hard or soft gradient mining.

    Args:
        encoder_feats: per layer group, [B, C, H, W] maps (channels dim 1) or [B, N, C] tokens
            (channels last); detached (never receives gradient).
        decoder_feats: same shapes and dtype as ``encoder_feats``.
        mode: ``"soft"`` (INP-Former / Pro-AD ``global_cosine_hm_adaptive``: gradient × ``(d / mean d)
            ** gamma``, mean over the whole group) or ``"hard"`` (Dinomaly ``global_cosine_hm_percent``:
            ``k = int(n_positions * (1 - hard_fraction))``, positions with ``d`` below the k-th largest
            get gradient × ``hard_factor``; Dinomaly ramps ``hard_fraction = min(0.9 * it / 1000, 0.9)``).
        gamma: soft-mining exponent (>= 0; 0 gives the plain gradient).
        hard_fraction: Dinomaly's ``p`` in [0, 1) (0 rescales nothing); ``k`` must be >= 1.
        hard_factor: Dinomaly's ``factor`` (0.1 in every script).
        impl: ``"auto"``/``"fused"`` (analytic backward, any device) or ``"reference"`` (official hooks).

    Returns:
        a scalar in the decoder dtype: the **mean** over groups of ``mean_b(1 - cos)`` (not reweighted).
    """
    op = "cosine_mining_loss"
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    gamma = _check_real(op, "gamma", gamma)
    if gamma < 0:
        raise ValueError(f"{op}: gamma must be >= 0, got {gamma}")
    hard_fraction = _check_real(op, "hard_fraction", hard_fraction)
    if not 0 <= hard_fraction < 1:
        raise ValueError(f"{op}: hard_fraction must be in [0, 1), got {hard_fraction}")
    hard_factor = _check_real(op, "hard_factor", hard_factor)
    _check_groups(op, encoder_feats, decoder_feats)
    if mode == "hard":
        for i, d in enumerate(decoder_feats):
            n = d.numel() // d.shape[1 if d.dim() == 4 else -1]
            if int(n * (1 - hard_fraction)) < 1:
                raise ValueError(f"{op}: group {i} has {n} positions; hard_fraction={hard_fraction} keeps "
                                 f"int({n} * (1 - p)) = 0 of them (need at least 1)")
    if impl == "reference":
        return _ref.cosine_mining_loss(list(encoder_feats), list(decoder_feats), mode=mode, gamma=gamma,
                                       hard_fraction=hard_fraction, hard_factor=hard_factor)
    G = len(decoder_feats)
    total = None
    for e, d in zip(encoder_feats, decoder_feats):
        term = apply(_MiningGroupFn, e.detach(), d, mode, gamma, hard_fraction, hard_factor, 1.0 / G)
        total = term if total is None else total + term
    return total


def coherence_loss(features: torch.Tensor, prototypes: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """INP-Former coherence loss ``mean_{b,n} min_m (1 - cos(features[b, n], prototypes[(b,) m]))``.

    Args:
        features: [B, N, C] tokens (INP-Former: the fused encoder tokens; no detach, as there).
        prototypes: [M, C] shared or [B, M, C] per-sample (INP-Former: the extractor output).
        impl: passed to :func:`fastproto.ops.route` (``"auto"``, ``"triton"``, ``"cuda"`` or ``"reference"``).

    Returns a scalar in ``features``' dtype (averaged in float32/float64). Gradient flows through the
    nearest prototype of each token only (as ``torch.min``'s).
    """
    # a 3-D bank is per-sample here, never per-location (no ambiguity when B == N)
    dist, _ = route(features, prototypes, mode="nearest", per_location=False, impl=impl)
    cd = _compute_dtype(features)
    return dist.to(cd).mean().to(features.dtype)
