"""BoRAD (Hoang et al., arXiv 2606.14129): reverse distillation with a training-only prototype bank
and BYOL-style alignment against a momentum target.

Built after the paper and its public code (ADer-based ``rd_byol`` model; the loss version with the
align term, see DESIGN.md "Models" and the notes). The mathematics is re-stated here:

* **teacher** ``T``: a frozen CNN, three taps at strides 4, 8, 16 (WideResNet-50-2 ``layer1..3``:
  ``t1 [256, 64, 64]``, ``t2 [512, 32, 32]``, ``t3 [1024, 16, 16]`` at 256 px);
* **projector** (RD++ ``MultiProjectionLayer``): per scale 4 x [conv3x3 -> InstanceNorm ->
  LeakyReLU] with channels ``c -> c/2 -> c/4 -> c/2 -> c``;
* **MFF-OCE bottleneck** (RD4AD ``BN_layer``): ``t1`` -> two strided conv3x3-BN-ReLU (c1 -> c2 -> c3),
  ``t2`` -> one (c2 -> c3), concatenated with ``t3`` (3 c3 channels at stride 16), then 3 ResNet
  bottlenecks (the first with stride 2 and a 1x1 strided shortcut) -> ``f [B, 2 c3, h, w]``
  (2048 x 8 x 8 at 256 px); inner width ``oce_width`` (BoRAD/ADer: c3 / 2 = 512; RD4AD: 1024);
  BatchNorm as RD4AD/ADer (one early official BoRAD snapshot used affine InstanceNorm there);
* **decoder** (RD4AD ``de_wide_resnet50_2``): three stages of bottlenecks whose first block upsamples
  with a 2x2 stride-2 transposed conv (shortcut: transposed conv + BN), ``decoder_blocks = (3, 4, 6)``,
  inner width = half the stage's output channels, producing ``s3, s2, s1`` (the student maps);
* **prototype bank** ``P [L, M, C]`` (``L = h w`` = 64 locations, ``M = 7``, ``C = 2048``), each
  location's ``M`` prototypes initialised orthonormal (QR of a Gaussian matrix);
* **routing**: at every location ``r = (f̂ P̂ᵀ) P̂`` with ``f̂``, ``P̂`` L2-normalised over channels,
  i.e. ``r = Σ_i cos(f, p_i) p̂_i`` -- :func:`fastproto.ops.route` ``mode="linear"``,
  ``per_location=True``. (The official code weights the *raw* prototypes by the cosine; with unit
  prototypes -- exactly so at the orthonormal init -- the two agree. One bank passed to the linear
  op cannot express raw values with cosine weights.)
* **merge**: ``z = LeakyReLU(IN(conv1x1([f, r])))`` (2C -> C); **spatial predictor** ``q``:
  2 x [conv1x1 C -> C, IN, LeakyReLU]; **global predictor**: 2 x [Linear C -> C, normalisation over
  channels (InstanceNorm1d on ``[B, M, C]``, no affine), LeakyReLU].

**Two views in feature space.** In training, with probability ``mask_prob`` (0.5) per batch, every
teacher map is multiplied by an independent Bernoulli spatial mask ``[B, 1, h, w]`` (keep probability
``1 - mask_ratio`` = 0.5, no rescaling) for the online view and, independently, for the target view;
otherwise both views are the unmasked teacher maps. Never in eval mode.

**Branches.** Online: ``f = OCE(proj(view1))`` -> decoder -> student maps (which reconstruct the
*unmasked* teacher maps). Target: ``f' = OCE(proj_ema(view2))`` under no_grad: the EMA copy is the
projector only; OCE and merge are shared with the online branch, as in the official code.

**Losses** (total = ``cos + proto_weight * (spatial_weight * L_s + global_weight * L_g +
align_weight * L_a)``, defaults 1, 1, 1, 0.1):

* ``cos`` (RD4AD): ``Σ_scales mean_b (1 - cos(flatten(t_k), flatten(s_k)))`` (teacher detached);
* ``spatial`` (BYOL spatial prototype alignment): ``mean_{b, locations} (2 - 2 cos(q(z(f)), z(f')))``
  over channels, target side without gradient;
* ``global`` (prototype-shifted global alignment): ``g = GAP(f)``, ``ĝ_i`` = normalised mean over
  locations of the bank (``[M, C]``), shifted vectors ``u_i = ĝlo - ĝ_i`` with ``ĝlo`` the normalised
  ``g``; ``mean_{b, i} (2 - 2 cos(pred(u_i), u'_i))`` with ``u'`` from ``f'`` (no gradient);
* ``align``: ``1 - mean_b max_i cos(g_b, ĝ_i)`` (pulls the nearest global prototype to the features).

**EMA** (BYOL): ``θ_t <- m θ_t + (1 - m) θ_online`` for the projector, ``m`` ramping from 0.99 to
0.999 over the run (``momentum_schedule="cosine"``: ``m_k = m1 - (m1 - m0)(1 + cos(π k / K)) / 2``,
the BYOL schedule; the official code offers both, and its MVTec config as read in the notes ramps
linearly: ``"linear"``). :meth:`BoRAD.on_train_iter` runs the update
for optimizer step ``k`` with ``m_k`` when called for iteration ``k + 1`` -- the trainer calls it
before that iteration's forward, i.e. right after step ``k``; the update after the very last step is
skipped (the target is not used after training).

**Optimisation** (:meth:`BoRAD.optimizer_config`): one Adam, lr 5e-3, betas (0.5, 0.999), x0.1 at
epoch 80 of 100, batch 16, 256 px (DESIGN.md). The official code runs two Adams (betas (0.8, 0.999)
for projector/OCE/decoder, (0.5, 0.999) for the loss heads) with gradient clipping 5; pass
``optimizer={"grad_clip": 5.0}`` for the latter.

**Inference** (training-only parts unused): teacher -> projector -> MFF-OCE -> decoder; anomaly map
``Σ_scales (1 - cos(t_k, s_k))`` per pixel, upsampled bilinearly (align_corners=True) to the input
size, Gaussian blur ``σ = 4`` (``kernel_size = 33``, scipy's 4σ truncation, zero-padded borders where
scipy reflects); image score = max. :meth:`BoRAD.export` gives exactly that model
(:class:`ReverseDistillation`: ``teacher``, ``projector``, ``bottleneck``, ``decoder``); the bank,
merge, predictors and the EMA projector are not in it nor in its state_dict.

**Official checkpoints** (:meth:`ReverseDistillation.load_official`, so both models): the official run's
``net.pth`` / ``ckpt.pth`` hold ``net_t`` (teacher), ``proj_layer`` / ``proj_layer_momentum`` (online /
EMA projector), ``mff_oce``, ``net_s`` (decoder) and an unused multi-scale ``predictor``; the bank and
heads are in ``loss_terms.pth`` (term ``"proto"``: ``prototypes``, ``linear_merge``, ``predictor``,
``global_predictor``). :func:`official_key` maps the names (the test lists the official keys and shapes).

**Parameter count** (WideResNet-50-2 teacher at 256 px, defaults; conv biases only in the projector
and the 1x1 heads; InstanceNorm/LayerNorm without affine have none; the test re-states this):

* projector, per scale ``c``: convs ``9 (c c/2 + c/2 c/4 + c/4 c/2 + c/2 c) = 11.25 c²`` plus biases
  ``2.25 c``: 737,856 + 2,950,272 + 11,798,784 = **15,486,912**;
* MFF-OCE: MFF convs ``9 (256·512 + 512·1024 + 512·1024)`` = 10,616,832 + BN ``2 (512 + 1024 + 1024)``
  = 5,120; OCE (width 512): block 1 ``3072·512 + 9·512² + 512·2048 + 3072·2048 + 2 (512 + 512 + 2048 +
  2048)`` = 11,282,432, blocks 2 and 3 ``2048·512 + 9·512² + 512·2048 + 2 (512 + 512 + 2048)``
  = 4,462,592 each -> **30,829,568**;
* decoder, stage ``cin -> cout`` with width ``w = cout / 2``: first block ``cin w + 4 w² + w cout +
  4 cin cout + 2 (2 w + 2 cout)``, others ``2 cout w + 9 w² + 2 (2 w + cout)``: stage 1 (2048 -> 1024,
  3 blocks) 17,840,128, stage 2 (1024 -> 512, 4) 5,317,632, stage 3 (512 -> 256, 6) 1,759,744
  -> **24,917,504**;
* training-only: bank ``64·7·2048`` = 917,504; merge ``4096·2048 + 2048`` = 8,390,656; spatial and
  global predictors ``2 (2048² + 2048)`` = 8,392,704 each -> **26,093,568**; the EMA projector
  (15,486,912, no gradient) comes on top.

Trainable: 15,486,912 + 30,829,568 + 24,917,504 + 26,093,568 = **97,327,552**; the exported
inference model holds 71,233,984 trained parameters besides the teacher's 68,883,240.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.backbones.cnn import Bottleneck
from fastproto.models import register_model
from fastproto.models._vit_common import IMPLS, _check_fraction, _images_from_batch
from fastproto.ops import anomaly_map, cosine_mining_loss, image_score, route, set_impl

__all__ = ["MFFOCE", "BoRAD", "MultiProjection", "PrototypeBank", "ReverseDecoder", "ReverseDistillation",
           "UpBottleneck", "official_key", "orthonormal_bank"]

MOMENTUM_SCHEDULES = ("cosine", "linear")


# ----------------------------------------------------------------------------------------------
# building blocks
# ----------------------------------------------------------------------------------------------


def _conv_in_lrelu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, padding=k // 2), nn.InstanceNorm2d(cout), nn.LeakyReLU()]


class MultiProjection(nn.Module):
    """RD++ projector: per scale 4 x [conv3x3, InstanceNorm, LeakyReLU], ``c -> c/2 -> c/4 -> c/2 -> c``."""

    def __init__(self, channels: Sequence[int]):
        super().__init__()
        bad = [c for c in channels if c % 4]
        if bad:
            raise ValueError(f"MultiProjection: channels must be multiples of 4, got {list(channels)}")
        self.scales = nn.ModuleList(
            nn.Sequential(*(layer for a, b in zip((c, c // 2, c // 4, c // 2), (c // 2, c // 4, c // 2, c))
                            for layer in _conv_in_lrelu(a, b, 3)))
            for c in channels)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        return [proj(f) for proj, f in zip(self.scales, feats)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UpBottleneck(Bottleneck):
    """RD4AD's de-conv block: the torchvision bottleneck with its middle conv replaced by a 2x2
    stride-2 transposed conv, and an upsampling shortcut (2x2 stride-2 transposed conv + BN)."""

    def __init__(self, cin: int, width: int, cout: int):
        if cout % Bottleneck.expansion:
            raise ValueError(f"UpBottleneck: out channels must be a multiple of {Bottleneck.expansion}, got {cout}")
        super().__init__(cin, cout // Bottleneck.expansion, 1, width)
        self.conv2 = nn.ConvTranspose2d(width, width, 2, 2, bias=False)
        self.downsample = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False), nn.BatchNorm2d(cout))


class MFFOCE(nn.Module):
    """Multi-scale feature fusion + one-class embedding (RD4AD's ``BN_layer``): three maps at strides
    s, 2s, 4s with channels ``(c1, c2, c3)`` -> one ``[B, 2 c3, H / 8s, W / 8s]`` embedding."""

    def __init__(self, channels: Sequence[int], width: int, blocks: int = 3):
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(_conv_bn_relu(c1, c2), _conv_bn_relu(c2, c3))
        self.fuse2 = _conv_bn_relu(c2, c3)
        self.out_channels = 2 * c3
        if c3 % 2:
            raise ValueError(f"MFFOCE: the deepest tap needs an even channel count, got {c3}")
        self.oce = nn.Sequential(*(Bottleneck(3 * c3 if i == 0 else 2 * c3, c3 // 2, 2 if i == 0 else 1, width)
                                   for i in range(blocks)))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f1, f2, f3 = feats
        return self.oce(torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1))


class ReverseDecoder(nn.Module):
    """RD4AD student: stages of de-conv bottlenecks mirroring the teacher's deepest-to-shallowest taps;
    returns the student maps in teacher order (shallow first)."""

    def __init__(self, in_channels: int, channels: Sequence[int], blocks: Sequence[int] = (3, 4, 6)):
        super().__init__()
        if len(blocks) != len(channels) or min(blocks) < 1:
            raise ValueError(f"ReverseDecoder: need one positive block count per scale ({len(channels)}), "
                             f"got {list(blocks)}")
        stages, cin = [], in_channels
        for cout, n in zip(reversed(list(channels)), blocks):
            stages.append(nn.Sequential(UpBottleneck(cin, cout // 2, cout),
                                        *(Bottleneck(cout, cout // 4, 1, cout // 2) for _ in range(n - 1))))
            cin = cout
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[::-1]


@torch.no_grad()
def _kaiming_init(module: nn.Module) -> None:
    """RD4AD init: convs Kaiming-normal (fan_out, ReLU), BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def orthonormal_bank(locations: int, prototypes: int, channels: int, generator: torch.Generator | None = None
                     ) -> Tensor:
    """``[L, M, C]`` bank whose ``M`` rows are orthonormal at every location (QR of a Gaussian ``C x M``)."""
    if prototypes > channels:
        raise ValueError(f"orthonormal_bank: cannot fit {prototypes} orthonormal prototypes in {channels} channels")
    q, _ = torch.linalg.qr(torch.randn(locations, channels, prototypes, generator=generator))
    return q.transpose(1, 2).contiguous()


class PrototypeBank(nn.Module):
    """Spatial prototype bank ``weight [L, M, C]`` (orthonormal per location) and linear routing."""

    def __init__(self, locations: int, prototypes: int, channels: int, impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(orthonormal_bank(locations, prototypes, channels))
        self.impl = impl

    def forward(self, f: Tensor) -> Tensor:
        """``f [B, C, h, w]`` (``h w = L``) -> routed ``Σ_i cos(f, p_i) p̂_i`` of the same shape."""
        b, c, h, w = f.shape
        if h * w != self.weight.shape[0] or c != self.weight.shape[2]:
            raise ValueError(f"PrototypeBank: embedding [B, {c}, {h}, {w}] does not fit the bank "
                             f"{tuple(self.weight.shape)} (built for another image size? set image_size)")
        tokens = F.normalize(f.flatten(2).transpose(1, 2), dim=-1)
        protos = F.normalize(self.weight, dim=-1).to(tokens.dtype)  # autocast: the features' dtype
        out = route(tokens, protos, mode="linear", per_location=True, impl=self.impl)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def global_prototypes(self) -> Tensor:
        """``ĝ [M, C]``: the bank averaged over locations, L2-normalised."""
        return F.normalize(self.weight.mean(0), dim=-1)

    def extra_repr(self) -> str:
        return f"locations={self.weight.shape[0]}, prototypes={self.weight.shape[1]}, channels={self.weight.shape[2]}"


def _byol(p: Tensor, z: Tensor, dim: int) -> Tensor:
    """BYOL regression loss ``mean(2 - 2 cos(p, z))`` over ``dim``, ``z`` detached."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=dim)).mean()


def _vector_head(dim: int) -> nn.Sequential:
    """2 x [Linear, normalisation over channels (no affine), LeakyReLU] on ``[..., C]``."""
    return nn.Sequential(*(m for _ in range(2) for m in (nn.Linear(dim, dim),
                                                         nn.LayerNorm(dim, elementwise_affine=False),
                                                         nn.LeakyReLU())))


# ----------------------------------------------------------------------------------------------
# official checkpoints
# ----------------------------------------------------------------------------------------------
# The official code (github.com/luythoangduy/BoRAD, on ADer; model "rd_lgc_byol", read in the stored
# index) writes after every epoch <logdir>/net.pth (the model's state_dict, DDP's "module." stripped)
# and <logdir>/ckpt.pth ({"net": the same, "optimizer": ..., "epoch": ..., ...}). Its prototype bank and
# heads live in the loss module (PrototypeBYOLLoss, loss term "proto"), saved apart in
# <logdir>/loss_terms.pth = {"cos": {}, "proto": its state_dict}; here such keys read "<term>.<key>".

#: official key prefix -> ours (first match wins; the same table read backwards gives the inverse)
_OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("net_t.", "teacher."),  # timm wide_resnet50_2, features_only, out_indices (1, 2, 3)
    *((f"{src}.proj_{s}.proj.", f"{dst}.scales.{i}.")
      for src, dst in (("proj_layer", "projector"), ("proj_layer_momentum", "target_projector"))
      for i, s in enumerate("abc")),
    # MFF: conv1/bn1 then conv2/bn2 take t1 down twice, conv3/bn3 take t2 down once; bn_layer = OCE
    ("mff_oce.conv1.", "bottleneck.fuse1.0.0."), ("mff_oce.bn1.", "bottleneck.fuse1.0.1."),
    ("mff_oce.conv2.", "bottleneck.fuse1.1.0."), ("mff_oce.bn2.", "bottleneck.fuse1.1.1."),
    ("mff_oce.conv3.", "bottleneck.fuse2.0."), ("mff_oce.bn3.", "bottleneck.fuse2.1."),
    ("mff_oce.bn_layer.", "bottleneck.oce."),
    # ADer's de_wide_resnet50_2: layer1 is the deepest stage; a stage's first block shortcut is "upsample"
    *(pair for i in range(3) for pair in ((f"net_s.layer{i + 1}.0.upsample.", f"decoder.stages.{i}.0.downsample."),
                                          (f"net_s.layer{i + 1}.", f"decoder.stages.{i}."))),
    ("proto.prototypes", "bank.weight"), ("proto.linear_merge.", "merge."),
    ("proto.predictor.", "predictor."), ("proto.global_predictor.", "global_predictor."),
)
#: official keys without a counterpart: the model's multi-scale MultiPredictorLayer (built by default,
#: unused by the final forward)
_OFFICIAL_UNUSED = ("predictor.",)
#: teacher modules the official checkpoint lacks (timm's features_only teacher ends at layer3)
_OFFICIAL_TEACHER_OMITS = ("layer4", "fc")


def official_key(key: str, *, reverse: bool = False) -> str | None:
    """Official BoRAD checkpoint key (loss-module keys as ``"proto.<key>"``) -> ours; with ``reverse``,
    ours -> official. ``None`` when no rule covers the key (e.g. the official unused predictor)."""
    for official, ours in _OFFICIAL_PREFIXES:
        src, dst = (ours, official) if reverse else (official, ours)
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def _read_official(checkpoint: Any, loss_terms: Any) -> tuple[dict[str, Tensor], str]:
    """The official keys of a run's ``net.pth`` / ``ckpt.pth`` (or such a mapping) plus, if given, its
    ``loss_terms.pth`` as ``"<term>.<key>"``; and a name for the errors. Files load with weights_only."""
    from fastproto.engine.checkpoint import read_checkpoint

    def mapping(obj: Any, what: str) -> tuple[dict, str]:
        if isinstance(obj, Mapping):
            return dict(obj), what
        name, obj = f"{what} {str(obj)!r}", read_checkpoint(obj)
        if not isinstance(obj, Mapping):
            raise TypeError(f"{name} holds a {type(obj).__name__}, not a state_dict")
        return dict(obj), name

    net, source = mapping(checkpoint, "official BoRAD checkpoint")
    if isinstance(net.get("net"), Mapping):  # ADer's ckpt.pth
        net = dict(net["net"])
    state = {k.removeprefix("module."): v for k, v in net.items()}
    if loss_terms is not None:
        terms, where = mapping(loss_terms, "loss terms")
        if all(isinstance(v, Tensor) for v in terms.values()):  # one term's state_dict: the prototype loss
            terms = {"proto": terms}
        for name, term in terms.items():
            if not isinstance(term, Mapping):
                raise TypeError(f"{where}: entry {name!r} is a {type(term).__name__}, not a loss term's state_dict")
            state.update({f"{name}.{k}": v for k, v in term.items()})
        source = f"{source} + {where}"
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"{source} is not a state_dict: {', '.join(map(repr, bad[:4]))} are not tensors")
    return state, source


def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------


def _teacher_taps(teacher: nn.Module, taps: Sequence[str] | None) -> tuple[list[str], list[int]]:
    """The three taps (default: the last one at strides 4, 8, 16) and their channels; checks the
    strides double from one to the next."""
    if taps is None:
        last = {stride: name for name, (_, stride) in teacher.taps.items()}
        missing = [s for s in (4, 8, 16) if s not in last]
        if missing:
            raise ValueError(f"{type(teacher).__name__} has no tap at stride(s) {missing}; pass taps=")
        taps = [last[4], last[8], last[16]]
    taps = teacher.check_taps(taps)
    if len(taps) != 3:
        raise ValueError(f"BoRAD needs exactly 3 teacher taps, got {taps}")
    strides = [teacher.taps[t][1] for t in taps]
    if strides[1] != 2 * strides[0] or strides[2] != 2 * strides[1]:
        raise ValueError(f"BoRAD: teacher taps {taps} must have doubling strides, got {strides}")
    return taps, [teacher.taps[t][0] for t in taps]


class ReverseDistillation(nn.Module):
    """Inference model of reverse distillation: frozen teacher -> projector -> MFF-OCE -> decoder;
    ``model(images) -> {"anomaly_map": [B, H, W] float32, "score": [B]}`` (map = sum over scales of
    ``1 - cos``, upsampled to the input size, blurred; score = max)."""

    def __init__(self, teacher: nn.Module, projector: nn.Module, bottleneck: nn.Module, decoder: nn.Module,
                 taps: Sequence[str], *, sigma: float | None = 4.0, kernel_size: int = 33, impl: str = "auto"):
        super().__init__()
        self.teacher = teacher
        self.projector = projector
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.taps = list(taps)
        self.sigma = sigma
        self.kernel_size = int(kernel_size)
        self.set_impl(impl)

    def set_impl(self, impl: str) -> ReverseDistillation:
        """Run every op (routing, anomaly map) with ``impl`` (``"reference"`` forces the references)."""
        if impl not in IMPLS:
            raise ValueError(f"{type(self).__name__}: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        return set_impl(self, impl)

    def teacher_features(self, images: Tensor) -> list[Tensor]:
        return self.teacher.forward_taps(images, self.taps)

    def student(self, feats: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Teacher maps (a view) -> (embedding ``f``, student maps in teacher order)."""
        f = self.bottleneck(self.projector(feats))
        return f, self.decoder(f)

    def anomaly_map_from_features(self, teacher: Sequence[Tensor], student: Sequence[Tensor],
                                  image_size: tuple[int, int]) -> Tensor:
        # anomaly_map averages the pairs; blur is linear, so x n gives the sum over scales
        amap = anomaly_map(list(teacher), list(student), tuple(image_size), sigma=self.sigma,
                           kernel_size=self.kernel_size, impl=self.impl)
        return amap * len(teacher)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``{"anomaly_map": [B, H, W] float32, "score": [B]}`` (call ``eval()`` first: BatchNorm)."""
        t = self.teacher_features(images)
        _, s = self.student(t)
        amap = self.anomaly_map_from_features(t, s, tuple(images.shape[-2:]))
        return {"anomaly_map": amap, "score": image_score(amap, "max")}

    def load_official(self, checkpoint: Any, strict: bool = True, *, loss_terms: Any = None
                      ) -> tuple[list[str], list[str]]:
        """Load the weights of an official BoRAD run (github.com/luythoangduy/BoRAD, ADer-based).

        Args:
            checkpoint: the run's ``net.pth`` (the model's state_dict) or ``ckpt.pth`` (ADer's wrapper,
                weights under ``"net"``; it also pickles the metric history, so ``net.pth`` is the safer
                file), or such a mapping. Files are read with ``weights_only=True``; ``module.`` is stripped.
            strict: raise on missing / unexpected / mis-shaped keys, naming them (official names);
                otherwise load what matches.
            loss_terms: the run's ``loss_terms.pth`` (``{"cos": {}, "proto": ...}``) or the prototype
                loss's state_dict: the bank, merge and predictors, which the official code keeps in its
                loss module. The full :class:`BoRAD` needs it (strict); the inference model does not.

        Keys the model has no use for are skipped with a warning: the training-only parts (EMA projector,
        loss module) in the inference model, and the official model's multi-scale predictor, which its
        final forward never calls. The teacher's ``layer4`` / ``fc`` are not in the official file (timm
        ``features_only`` teacher ending at ``layer3``) and keep their values.

        Verified against the stored official code: model and trainer of the repository's later versions
        (BatchNorm MFF-OCE, plain projector, ``use_predictor=True``), the loss module of the paper's version
        (bank, linear_merge, predictor, global_predictor). Snapshots with another layout -- InstanceNorm /
        positional-norm MFF-OCE, the depthwise projector (``dp=True``), the final PORL loss module
        (prototypes and predictor only; ``strict=False`` loads those) -- fail with the keys named.

        Returns ``(missing, unexpected)``: official keys the model needs but did not get (absent or
        mis-shaped), and keys of the file it cannot place; both empty when ``strict``.
        """
        official, source = _read_official(checkpoint, loss_terms)
        own = self.state_dict()
        state, ignored, unexpected = {}, [], []
        for key, value in official.items():
            ours = official_key(key)
            if ours in own:
                state[ours] = value
            elif key.startswith(_OFFICIAL_UNUSED) or (ours and ours.split(".", 1)[0] in BoRAD.TRAINING_ONLY):
                ignored.append(key)
            else:
                unexpected.append(key)
        kept = tuple(f"teacher.{m}." for m in _OFFICIAL_TEACHER_OMITS if m not in self.taps)
        missing = [official_key(k, reverse=True) for k in own if k not in state and not k.startswith(kept)]
        shapes = {k: f"{official_key(k, reverse=True)}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if v.shape != own[k].shape}
        if strict and (missing or unexpected or shapes):
            parts = [f"{what}: {_head(items)}" for what, items in (
                ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", list(shapes.values())))
                if items]
            hint = ""
            if loss_terms is None and any(k.startswith("proto.") for k in missing):
                hint = (" (the official trainer keeps the bank and heads in loss_terms.pth beside net.pth: pass "
                        "loss_terms=, or load into model.export() for inference)")
            raise RuntimeError(f"{source} does not match {type(self).__name__}: " + "; ".join(parts) + hint)
        self.load_state_dict({k: v for k, v in state.items() if k not in shapes}, strict=False)
        if ignored:
            groups = sorted({k.split(".", 1)[0] + ".*" for k in ignored})
            warnings.warn(f"{source}: skipped {len(ignored)} key(s) {type(self).__name__} has no use for "
                          f"({', '.join(groups)})", stacklevel=2)
        return missing + [official_key(k, reverse=True) for k in shapes], unexpected

    def extra_repr(self) -> str:
        return f"taps={self.taps}, sigma={self.sigma}, kernel_size={self.kernel_size}, impl={self.impl!r}"


@register_model("borad")
class BoRAD(ReverseDistillation):
    """BoRAD (see the module docstring for the architecture, losses and choices).

    Args:
        encoder: the frozen teacher: a :class:`~fastproto.backbones.ConvBackbone` (``wide_resnet50_2``)
            or a :class:`~fastproto.backbones.TokenAdapter` (its CNN is used, e.g. ``efficientnet_lite0``).
        taps: three teacher taps with doubling strides (default the last tap at strides 4, 8, 16).
        image_size: training resolution; fixes the bank's locations ``(image_size / 32)²`` (256 -> 64).
        n_prototypes: prototypes per location (7).
        oce_width: inner width of the OCE bottlenecks (default c3 / 2: 512 as BoRAD/ADer; RD4AD: c3).
        oce_blocks: OCE bottlenecks (3). decoder_blocks: de-conv bottlenecks per stage ((3, 4, 6)).
        mask_ratio: dropped fraction of the Bernoulli spatial mask (0.5). mask_prob: probability that a
            batch is masked (0.5).
        momentum: (start, end) of the EMA momentum (0.99, 0.999); momentum_schedule: "cosine" | "linear".
        proto_weight, spatial_weight, global_weight, align_weight: loss weights (1, 1, 1, 0.1).
        sigma, kernel_size: Gaussian blur of the map (4, 33; ``sigma=None`` disables).
        optimizer: overrides of :meth:`optimizer_config`.
        impl: ``"auto"`` | ``"triton"`` | ``"reference"``.
    """

    default_backbone = "wide_resnet50_2"

    OPTIMIZER: ClassVar[dict[str, Any]] = {"name": "adam", "lr": 5e-3, "betas": (0.5, 0.999), "schedule": "step",
                                           "milestone_epochs": (80,), "gamma": 0.1}
    TRAINING: ClassVar[dict[str, Any]] = {"epochs": 100, "batch_size": 16, "image_size": 256}

    def __init__(self, encoder: nn.Module, *, taps: Sequence[str] | None = None, image_size: int = 256,
                 n_prototypes: int = 7, oce_width: int | None = None, oce_blocks: int = 3,
                 decoder_blocks: Sequence[int] = (3, 4, 6), mask_ratio: float = 0.5, mask_prob: float = 0.5,
                 momentum: tuple[float, float] = (0.99, 0.999), momentum_schedule: str = "cosine",
                 proto_weight: float = 1.0, spatial_weight: float = 1.0, global_weight: float = 1.0,
                 align_weight: float = 0.1, sigma: float | None = 4.0, kernel_size: int = 33,
                 optimizer: Mapping[str, Any] | None = None, impl: str = "auto"):
        teacher = getattr(encoder, "cnn", encoder)  # a TokenAdapter wraps the CNN
        if not hasattr(teacher, "forward_taps") or not hasattr(teacher, "taps"):
            raise TypeError(f"BoRAD: encoder must be a ConvBackbone (e.g. 'wide_resnet50_2') or a TokenAdapter "
                            f"around one; got {type(encoder).__name__}")
        taps, channels = _teacher_taps(teacher, taps)
        stride = teacher.taps[taps[-1]][1] * 2
        if image_size % stride:
            raise ValueError(f"BoRAD: image_size must be a multiple of {stride}, got {image_size}")
        width = channels[2] // 2 if oce_width is None else int(oce_width)
        bottleneck = MFFOCE(channels, width, oce_blocks)
        decoder = ReverseDecoder(bottleneck.out_channels, channels, decoder_blocks)
        _kaiming_init(bottleneck)
        _kaiming_init(decoder)
        super().__init__(teacher, MultiProjection(channels), bottleneck, decoder, taps, sigma=sigma,
                         kernel_size=kernel_size, impl=impl)
        c = bottleneck.out_channels
        self.image_size = int(image_size)
        self.bank = PrototypeBank((image_size // stride) ** 2, n_prototypes, c)
        self.merge = nn.Sequential(*_conv_in_lrelu(2 * c, c, 1))
        self.predictor = nn.Sequential(*_conv_in_lrelu(c, c, 1), *_conv_in_lrelu(c, c, 1))
        self.global_predictor = _vector_head(c)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.mask_ratio = _check_fraction("mask_ratio", mask_ratio)
        self.mask_prob = _check_fraction("mask_prob", mask_prob)
        m0, m1 = (float(m) for m in momentum)
        if not 0.0 <= m0 <= m1 <= 1.0:
            raise ValueError(f"BoRAD: momentum must be (start, end) with 0 <= start <= end <= 1, got {momentum}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(f"BoRAD: momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {momentum_schedule!r}")
        self.momentum, self.momentum_schedule = (m0, m1), momentum_schedule
        self.loss_weights = {"proto": float(proto_weight), "spatial": float(spatial_weight),
                        "global": float(global_weight), "align": float(align_weight)}
        if optimizer:
            from fastproto.engine.optim import OptimConfig

            known = [f.name for f in dataclasses.fields(OptimConfig)]
            unknown = sorted(set(optimizer) - set(known))
            if unknown:
                raise ValueError(f"BoRAD: unknown optimizer option(s) {unknown}; known: {known}")
        self._optimizer_overrides = dict(optimizer or {})
        self.set_impl(impl)

    #: submodules that exist for training only (not in :meth:`export`)
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = ("bank", "merge", "predictor", "global_predictor", "target_projector")

    # -- configuration --------------------------------------------------------------------------

    def optimizer_config(self) -> dict[str, Any]:
        """Adam lr 5e-3, betas (0.5, 0.999), x0.1 at epoch 80 (plus the ``optimizer=`` overrides)."""
        return {**self.OPTIMIZER, **self._optimizer_overrides}

    def training_config(self) -> dict[str, Any]:
        """100 epochs, batch 16, 256 px (the bank is built for ``image_size``)."""
        return {**self.TRAINING, "image_size": self.image_size}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen teacher and the EMA projector."""
        return [p for name, p in self.named_parameters()
                if not name.startswith(("teacher.", "target_projector.")) and p.requires_grad]

    def export(self) -> ReverseDistillation:
        """The inference-only model (teacher, projector, bottleneck, decoder; shares their parameters),
        without the training-only bank, merge, predictors and EMA projector."""
        model = ReverseDistillation(self.teacher, self.projector, self.bottleneck, self.decoder, self.taps,
                                    sigma=self.sigma, kernel_size=self.kernel_size, impl=self.impl)
        return model.train(self.training)

    # -- EMA target -----------------------------------------------------------------------------

    def momentum_at(self, step: int, total: int) -> float:
        """EMA momentum ``m_k`` for optimizer step ``k = step`` of ``total`` (see the module docstring)."""
        m0, m1 = self.momentum
        frac = min(max(step, 0) / max(total, 1), 1.0)
        if self.momentum_schedule == "linear":
            return m0 + (m1 - m0) * frac
        return m1 - (m1 - m0) * (1.0 + math.cos(math.pi * frac)) / 2.0

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """``θ_target <- m θ_target + (1 - m) θ_online`` over the projector's parameters and buffers."""
        online = dict(self.projector.state_dict(keep_vars=True))
        for name, t in self.target_projector.state_dict(keep_vars=True).items():
            if t.is_floating_point():
                t.lerp_(online[name].detach(), 1.0 - momentum)
            else:
                t.copy_(online[name])

    def on_train_iter(self, it: int, total: int) -> None:
        """Called before iteration ``it``: applies the EMA update of optimizer step ``it - 1``."""
        if it > 0:
            self.update_target(self.momentum_at(it - 1, total))

    # -- training -------------------------------------------------------------------------------

    def _mask(self, feats: Sequence[Tensor]) -> list[Tensor]:
        keep = 1.0 - self.mask_ratio
        return [f * torch.bernoulli(torch.full((f.shape[0], 1, *f.shape[2:]), keep, device=f.device, dtype=f.dtype))
                for f in feats]

    def views(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Online and target views of the teacher maps: independently masked with probability
        ``mask_prob`` in training, the maps themselves otherwise (and always in eval mode)."""
        if self.training and self.mask_ratio > 0 and torch.rand(()) < self.mask_prob:
            return self._mask(feats), self._mask(feats)
        return list(feats), list(feats)

    def _shifted(self, f: Tensor, protos: Tensor) -> tuple[Tensor, Tensor]:
        """(normalised GAP(f) [B, C], shifted vectors ``ĝlo - ĝ_i`` [B, M, C])."""
        glo = F.normalize(f.float().mean((2, 3)), dim=-1)
        return glo, glo[:, None, :] - protos[None]

    def loss(self, batch: Any) -> dict[str, Tensor]:
        """``{"loss": total, "cos", "spatial", "global", "align"}`` (parts detached) for a batch (an
        image tensor, a mapping with ``"image"`` or a sequence whose first item is the images)."""
        images = _images_from_batch(batch)
        t = self.teacher_features(images)
        online, target = self.views(t)
        f, s = self.student(online)
        cos = cosine_mining_loss([x.float() for x in t], [x.float() for x in s], gamma=0.0,
                                 impl="reference" if self.impl == "reference" else "auto") * len(t)
        with torch.no_grad():
            f_t = self.bottleneck(self.target_projector(target))
            z_t = self.merge(torch.cat([f_t, self.bank(f_t)], 1))
        z = self.predictor(self.merge(torch.cat([f, self.bank(f)], 1)))
        spatial = _byol(z, z_t, dim=1)
        protos = self.bank.global_prototypes()
        glo, u = self._shifted(f, protos)
        _, u_t = self._shifted(f_t, protos.detach())
        glob = _byol(self.global_predictor(u), u_t, dim=-1)
        align = 1 - F.cosine_similarity(glo[:, None], protos.float()[None], dim=-1).amax(1).mean()
        w = self.loss_weights
        total = cos + w["proto"] * (w["spatial"] * spatial + w["global"] * glob + w["align"] * align)
        parts = {"cos": cos, "spatial": spatial, "global": glob, "align": align}
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, image_size={self.image_size}, momentum={self.momentum}, "
                f"momentum_schedule={self.momentum_schedule!r}, mask_ratio={self.mask_ratio}, "
                f"mask_prob={self.mask_prob}, loss_weights={self.loss_weights}")
