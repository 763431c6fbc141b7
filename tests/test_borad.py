"""BoRAD: tiny models on random EfficientNet-Lite0 taps (64 px, 2 x 2 bank), and the full-size
WideResNet-50-2 parameter count on the meta device."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import fastproto.models.borad as borad_mod
from fastproto.backbones.cnn import efficientnet_lite0
from fastproto.models import create, list_models, model_class
from fastproto.models.borad import BoRAD, ReverseDistillation, official_key
from tests import _interpreter

SIZE = 64
_TEACHER: list = []


def tiny(**cfg) -> BoRAD:
    """A small BoRAD on one shared frozen random EfficientNet-Lite0 (the token adapter's fixed
    projections are slow to build and unused here)."""
    if not _TEACHER:
        torch.manual_seed(0)
        _TEACHER.append(efficientnet_lite0(pretrained=False))
    cfg = {"image_size": SIZE, "decoder_blocks": (1, 1, 1), "oce_blocks": 1, **cfg}
    return create("borad", backbone=_TEACHER[0], **cfg)


@pytest.fixture
def model() -> BoRAD:
    torch.manual_seed(0)
    return tiny()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_registry_and_config_errors():
    assert "borad" in list_models() and model_class("borad") is BoRAD
    by_name = create("borad", backbone="efficientnet_lite0", pretrained=False, image_size=SIZE,
                     decoder_blocks=(1, 1, 1), oce_blocks=1)  # a TokenAdapter: its CNN is the teacher
    assert type(by_name.teacher).__name__ == "EfficientNetLite"
    with pytest.raises(TypeError, match="unknown option"):
        tiny(n_protos=3)
    with pytest.raises(ValueError, match="multiple of 32"):
        tiny(image_size=48)
    with pytest.raises(ValueError, match="momentum"):
        tiny(momentum=(0.999, 0.99))
    with pytest.raises(ValueError, match="momentum_schedule"):
        tiny(momentum_schedule="step")
    with pytest.raises(ValueError, match="unknown optimizer"):
        tiny(optimizer={"learning_rate": 1.0})
    with pytest.raises(ValueError, match="doubling strides"):
        tiny(taps=["blocks.1.1", "blocks.3.2", "blocks.4.2"])
    with pytest.raises(TypeError, match="ConvBackbone"):
        BoRAD(torch.nn.Linear(2, 2))


def test_defaults_and_configs(model):
    assert model.taps == ["blocks.1.1", "blocks.2.1", "blocks.4.2"]  # last taps at strides 4, 8, 16
    assert tuple(model.bank.weight.shape) == (4, 7, 224)  # (64 / 32)² locations, 7, 2 x 112
    cfg = model.optimizer_config()
    assert cfg == {"name": "adam", "lr": 5e-3, "betas": (0.5, 0.999), "schedule": "step",
                   "milestone_epochs": (80,), "gamma": 0.1}
    assert model.training_config() == {"epochs": 100, "batch_size": 16, "image_size": SIZE}
    from fastproto.engine.optim import OptimConfig

    opt, sched = OptimConfig.merge(cfg).build(model.trainable_parameters(), total_iters=1000, iters_per_epoch=10)
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["betas"] == (0.5, 0.999)
    assert list(sched.milestones) == [800]
    assert tiny(optimizer={"lr": 1e-3}).optimizer_config()["lr"] == 1e-3


def test_eval_outputs_are_the_summed_cosine_maps(images):
    torch.manual_seed(0)
    model = tiny(sigma=None).eval()
    with torch.no_grad():
        out = model(images)
        t = model.teacher_features(images)
        _, s = model.student(t)
    assert out["anomaly_map"].shape == (2, SIZE, SIZE) and out["anomaly_map"].dtype == torch.float32
    assert out["score"].shape == (2,)
    expected = sum(F.interpolate((1 - F.cosine_similarity(a, b, dim=1))[:, None], size=(SIZE, SIZE),
                                 mode="bilinear", align_corners=True)[:, 0] for a, b in zip(t, s))
    torch.testing.assert_close(out["anomaly_map"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["score"], expected.flatten(1).amax(1), rtol=1e-5, atol=1e-5)
    blurred = tiny(sigma=4.0).eval()
    blurred.load_state_dict(model.state_dict())
    with torch.no_grad():
        smooth = blurred(images)["anomaly_map"]
    from fastproto.ops import gaussian_blur

    torch.testing.assert_close(smooth, gaussian_blur(expected, 4.0, 33), rtol=1e-5, atol=1e-5)


def test_loss_parts_are_finite_and_combine(model, images):
    model.train()
    torch.manual_seed(3)
    out = model.loss({"image": images})
    assert set(out) == {"loss", "cos", "spatial", "global", "align"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values())
    assert not any(out[k].requires_grad for k in ("cos", "spatial", "global", "align"))
    expected = out["cos"] + out["spatial"] + out["global"] + 0.1 * out["align"]
    torch.testing.assert_close(out["loss"].detach(), expected)
    # the BYOL terms are 2 - 2 cos (in [0, 4]); the RD4AD term sums 3 scales of 1 - cos (in [0, 6])
    assert 0 <= out["spatial"] <= 4 and 0 <= out["global"] <= 4 and 0 <= out["cos"] <= 6
    weighted = tiny(proto_weight=2.0, align_weight=0.0)
    weighted.load_state_dict(model.state_dict())
    weighted.train()
    torch.manual_seed(3)
    w = weighted.loss(images)
    torch.testing.assert_close(w["loss"].detach(), w["cos"] + 2 * (w["spatial"] + w["global"]))


def test_bf16_autocast(model, images):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(images)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        res = model(images)
    assert res["anomaly_map"].dtype == torch.float32 and torch.isfinite(res["anomaly_map"]).all()


def test_gradients_reach_exactly_the_trainable_parameters(model, images):
    model.train()
    model.loss(images)["loss"].backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if name.startswith(("teacher.", "target_projector.")):
            assert id(p) not in trainable and not p.requires_grad and p.grad is None, name
        else:
            assert id(p) in trainable, name
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.bank.weight.grad.abs().sum() > 0


def test_bank_is_orthonormal_per_location(model):
    p = model.bank.weight.detach()
    gram = p @ p.transpose(1, 2)
    torch.testing.assert_close(gram, torch.eye(7).expand_as(gram), rtol=0, atol=1e-5)
    assert not torch.allclose(p[0], p[1])  # a separate set per location


def test_routing_goes_through_the_linear_route_op(model, images, monkeypatch):
    calls = []
    real = borad_mod.route

    def counting(x, protos, **kw):
        calls.append(kw)
        return real(x, protos, **kw)

    monkeypatch.setattr(borad_mod, "route", counting)
    model.train()
    model.loss(images)
    assert len(calls) == 2  # online and target branches
    assert all(kw["mode"] == "linear" and kw["per_location"] is True for kw in calls)
    # routed = Σ_i cos(f, p_i) p̂_i at every location (prototypes off unit norm, as after training)
    with torch.no_grad():
        model.bank.weight.mul_(torch.rand(4, 7, 1) + 0.5)
    f = torch.randn(2, 224, 2, 2)
    routed = model.bank(f)
    tokens = f.flatten(2).transpose(1, 2)  # [B, L, C]
    p_hat = F.normalize(model.bank.weight.detach(), dim=-1)  # [L, M, C]
    cos = F.cosine_similarity(tokens[:, :, None, :], p_hat[None], dim=-1)  # [B, L, M]
    expected = torch.einsum("blm,lmc->blc", cos, p_hat).transpose(1, 2).reshape(2, 224, 2, 2)
    torch.testing.assert_close(routed.detach(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bank"):
        model.bank(torch.randn(1, 224, 4, 4))


def test_reference_switch_reaches_the_ops(images, monkeypatch):
    torch.manual_seed(0)
    model = create("borad", backbone=tiny().teacher, reference=True, image_size=SIZE, decoder_blocks=(1, 1, 1),
                   oce_blocks=1)
    assert model.impl == "reference" and model.bank.impl == "reference"
    seen = []
    real = borad_mod.anomaly_map
    monkeypatch.setattr(borad_mod, "anomaly_map", lambda *a, **kw: seen.append(kw["impl"]) or real(*a, **kw))
    model.eval()
    with torch.no_grad():
        model(images)
    assert seen == ["reference"]
    model.set_impl("auto")
    assert model.bank.impl == "auto" and model.export().impl == "auto"
    with pytest.raises(ValueError, match="impl"):
        model.set_impl("fast")


def test_ema_update_matches_the_restatement(model):
    m0, m1, total = 0.99, 0.999, 10
    assert model.momentum_at(0, total) == pytest.approx(m0)
    assert model.momentum_at(total, total) == pytest.approx(m1)
    k = 3
    m_k = m1 - (m1 - m0) * (math.cos(math.pi * k / total) + 1) / 2
    assert model.momentum_at(k, total) == pytest.approx(m_k)
    assert tiny(momentum_schedule="linear").momentum_at(k, total) == pytest.approx(m0 + (m1 - m0) * k / total)
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p))
    online = {k_: v.clone() for k_, v in model.projector.state_dict().items()}
    before = {k_: v.clone() for k_, v in model.target_projector.state_dict().items()}
    model.on_train_iter(0, total)  # no optimizer step yet: no update
    for name, v in model.target_projector.state_dict().items():
        torch.testing.assert_close(v, before[name], rtol=0, atol=0)
    model.on_train_iter(k + 1, total)  # update of step k
    changed = 0
    for name, v in model.target_projector.state_dict().items():
        torch.testing.assert_close(v, m_k * before[name] + (1 - m_k) * online[name], rtol=1e-6, atol=1e-7)
        changed += not torch.equal(v, before[name])
    assert changed > 0
    assert not any(p.requires_grad for p in model.target_projector.parameters())


def test_export_drops_training_parts_and_gives_the_same_maps(model, images):
    model.train()
    model.loss(images)["loss"].backward()  # moves BN statistics away from the init
    model.eval()
    exported = model.export()
    assert type(exported) is ReverseDistillation and not exported.training
    keys = set(exported.state_dict())
    full = set(model.state_dict())
    assert keys < full
    assert not any(k.startswith(BoRAD.TRAINING_ONLY) for k in keys)
    assert {k.split(".")[0] for k in full - keys} == set(BoRAD.TRAINING_ONLY)
    with torch.no_grad():
        a, b = model(images), exported(images)
    torch.testing.assert_close(a["anomaly_map"], b["anomaly_map"], rtol=0, atol=0)
    torch.testing.assert_close(a["score"], b["score"], rtol=0, atol=0)
    # a deployment checkpoint loads into a freshly exported model
    torch.manual_seed(5)
    fresh = tiny().export().eval()
    fresh.load_state_dict(exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(images)["anomaly_map"], a["anomaly_map"], rtol=0, atol=0)


def test_masking_only_in_training(model, images):
    feats = model.teacher_features(images)
    masked = tiny(mask_prob=1.0)
    masked.train()
    torch.manual_seed(0)
    v1, v2 = masked.views(feats)
    for f, a, b in zip(feats, v1, v2):
        keep = (a != 0).any(1)  # one Bernoulli draw per location, shared over channels
        torch.testing.assert_close(a, f * keep[:, None])
        assert 0.2 < keep.float().mean() < 0.8
        assert not torch.equal(a, b)  # independent masks for the two views
    masked.eval()
    v1, v2 = masked.views(feats)
    assert all(torch.equal(a, f) and torch.equal(b, f) for f, a, b in zip(feats, v1, v2))
    never = tiny(mask_prob=0.0).train()
    v1, _ = never.views(feats)
    assert all(torch.equal(a, f) for f, a in zip(feats, v1))


def test_state_dict_round_trip(model, images, tmp_path):
    model.train()
    model.loss(images)["loss"].backward()
    path = tmp_path / "borad.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(7)
    other = tiny()
    other.load_state_dict(torch.load(path))
    for m in (model, other):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images)["anomaly_map"], other(images)["anomaly_map"], rtol=0, atol=0)
    torch.manual_seed(9)
    la = model.loss(images)
    torch.manual_seed(9)
    lb = other.loss(images)
    torch.testing.assert_close(la["loss"], lb["loss"], rtol=0, atol=0)


def _restated_counts(c=(256, 512, 1024), oce_width=512, blocks=(3, 4, 6), locations=64, protos=7) -> dict[str, int]:
    """The module docstring's arithmetic for the WideResNet-50-2 model."""
    proj = sum(9 * (x * x // 2 + x // 2 * x // 4 + x // 4 * x // 2 + x // 2 * x) + x // 2 + x // 4 + x // 2 + x
               for x in c)
    c1, c2, c3 = c
    w, d = oce_width, 2 * c3
    mff = 9 * (c1 * c2 + c2 * c3 + c2 * c3) + 2 * (c2 + c3 + c3)
    oce = (3 * c3 * w + 9 * w * w + w * d + 3 * c3 * d + 2 * (w + w + d + d)
           + 2 * (d * w + 9 * w * w + w * d + 2 * (w + w + d)))
    dec, cin = 0, d
    for cout, n in zip(reversed(c), blocks):
        w = cout // 2
        dec += cin * w + 4 * w * w + w * cout + 4 * cin * cout + 2 * (2 * w + 2 * cout)
        dec += (n - 1) * (2 * cout * w + 9 * w * w + 2 * (2 * w + cout))
        cin = cout
    heads = locations * protos * d + (2 * d * d + d) + 2 * 2 * (d * d + d)
    return {"projector": proj, "bottleneck": mff + oce, "decoder": dec, "training_only": heads}


def test_wide_resnet50_2_parameter_count():
    with torch.device("meta"):
        model = create("borad", backbone="wide_resnet50_2", pretrained=False)
    assert model.taps == ["layer1", "layer2", "layer3"]
    count = {name: sum(p.numel() for p in getattr(model, name).parameters())
             for name in ("projector", "bottleneck", "decoder", *BoRAD.TRAINING_ONLY)}
    expected = _restated_counts()
    print(count)
    assert count["projector"] == expected["projector"] == 15_486_912
    assert count["bottleneck"] == expected["bottleneck"] == 30_829_568
    assert count["decoder"] == expected["decoder"] == 24_917_504
    heads = sum(count[k] for k in BoRAD.TRAINING_ONLY if k != "target_projector")
    assert heads == expected["training_only"] == 26_093_568
    assert count["target_projector"] == count["projector"]
    assert sum(p.numel() for p in model.trainable_parameters()) == 97_327_552
    assert tuple(model.bank.weight.shape) == (64, 7, 2048)


def test_trainer_runs_the_ema_hook(tmp_path):
    from fastproto.engine import train

    torch.manual_seed(0)
    model = tiny()
    before = [p.clone() for p in model.target_projector.parameters()]
    data = [{"image": torch.randn(3, SIZE, SIZE)} for _ in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    result = train(model, loader, iters=3, out_dir=tmp_path, progress=False, log_every=1)
    assert math.isfinite(result["loss"]["loss"])
    moved = [not torch.equal(a, b) for a, b in zip(before, model.target_projector.parameters())]
    assert all(moved)  # updated after steps 0 and 1 (the hook runs before iterations 1 and 2)


def test_create_without_backbone_takes_the_paper_teacher(monkeypatch):
    """create("borad") with no backbone builds on WideResNet-50-2 (the ViT models keep DINOv2)."""
    import fastproto.backbones as backbones
    from fastproto import models

    asked = []
    real = backbones.create

    def fake(name, **kw):
        asked.append(name)
        raise RuntimeError("stop after the name")

    monkeypatch.setattr(backbones, "create", fake)
    for name in ("borad", "inpformer"):
        with pytest.raises(RuntimeError, match="stop after the name"):
            models.create(name, pretrained=False)
    assert asked == ["wide_resnet50_2", "dinov2_vitb14_reg"]
    assert real is not fake


# ----------------------------------------------------------------------------------------------
# official checkpoints (github.com/luythoangduy/BoRAD on ADer: net.pth / ckpt.pth + loss_terms.pth)
# ----------------------------------------------------------------------------------------------


def _bn(prefix: str, c: int) -> dict[str, tuple]:
    return {**{prefix + n: (c,) for n in ("weight", "bias", "running_mean", "running_var")},
            prefix + "num_batches_tracked": ()}


def _official_bottleneck(prefix: str, cin: int, width: int, cout: int, shortcut: str | None = None) -> dict:
    """torchvision / timm bottleneck keys; ADer's decoder blocks with an ``upsample`` shortcut have 2x2
    transposed convs (weights ``[in, out, 2, 2]``) in the middle and in the shortcut."""
    up = shortcut == "upsample"
    keys = {prefix + "conv1.weight": (width, cin, 1, 1), **_bn(prefix + "bn1.", width),
            prefix + "conv2.weight": (width, width, 2, 2) if up else (width, width, 3, 3), **_bn(prefix + "bn2.", width),
            prefix + "conv3.weight": (cout, width, 1, 1), **_bn(prefix + "bn3.", cout)}
    if shortcut:
        keys[f"{prefix}{shortcut}.0.weight"] = (cin, cout, 2, 2) if up else (cout, cin, 1, 1)
        keys.update(_bn(f"{prefix}{shortcut}.1.", cout))
    return keys


def official_borad_keys(n_prototypes: int = 7) -> dict[str, tuple]:
    """Keys and shapes of an official run at 256 px, transcribed from the official definitions: ``net.pth``
    of ``RDLGC_BYOL`` (timm wide_resnet50_2 features_only out_indices (1, 2, 3) as ``net_t``; RD++
    ``MultiProjectionLayer`` online and momentum; the multi-scale ``MultiPredictorLayer``; BatchNorm
    ``MFF_OCE`` with width-512 bottlenecks; ADer ``de_wide_resnet50_2`` as ``net_s``) and, as
    ``proto.*``, ``loss_terms.pth`` of ``PrototypeBYOLLoss(feat_dim=2048, H=8, W=8)``."""
    keys = {"net_t.conv1.weight": (64, 3, 7, 7), **_bn("net_t.bn1.", 64)}
    cin = 64
    for i, (n, planes) in enumerate(zip((3, 4, 6), (64, 128, 256))):
        for j in range(n):
            keys.update(_official_bottleneck(f"net_t.layer{i + 1}.{j}.", cin, 2 * planes, 4 * planes,
                                             "downsample" if j == 0 else None))
            cin = 4 * planes
    for s, c in zip("abc", (256, 512, 1024)):
        for proj in ("proj_layer", "proj_layer_momentum"):
            for idx, (a, b) in zip((0, 3, 6, 9), ((c, c // 2), (c // 2, c // 4), (c // 4, c // 2), (c // 2, c))):
                keys.update({f"{proj}.proj_{s}.proj.{idx}.weight": (b, a, 3, 3), f"{proj}.proj_{s}.proj.{idx}.bias": (b,)})
        keys.update({f"predictor.pred_{s}.predictor.0.weight": (c // 2, c, 1, 1),
                     f"predictor.pred_{s}.predictor.3.weight": (c, c // 2, 1, 1)})
    keys.update({"mff_oce.conv1.weight": (512, 256, 3, 3), **_bn("mff_oce.bn1.", 512),
                 "mff_oce.conv2.weight": (1024, 512, 3, 3), **_bn("mff_oce.bn2.", 1024),
                 "mff_oce.conv3.weight": (1024, 512, 3, 3), **_bn("mff_oce.bn3.", 1024)})
    for j in range(3):
        keys.update(_official_bottleneck(f"mff_oce.bn_layer.{j}.", 3072 if j == 0 else 2048, 512, 2048,
                                         "downsample" if j == 0 else None))
    cin = 2048
    for i, (n, cout) in enumerate(zip((3, 4, 6), (1024, 512, 256))):
        for j in range(n):
            keys.update(_official_bottleneck(f"net_s.layer{i + 1}.{j}.", cin, cout // 2, cout,
                                             "upsample" if j == 0 else None))
            cin = cout
    c = 2048
    keys.update({"proto.prototypes": (64, n_prototypes, c), "proto.linear_merge.0.weight": (c, 2 * c, 1, 1),
                 "proto.linear_merge.0.bias": (c,)})
    for head, shape in (("predictor", (c, c, 1, 1)), ("global_predictor", (c, c))):
        for i in (0, 3):
            keys.update({f"proto.{head}.{i}.weight": shape, f"proto.{head}.{i}.bias": (c,)})
    return keys


@pytest.fixture(scope="module")
def full_size() -> BoRAD:
    with torch.device("meta"):
        return create("borad", backbone="wide_resnet50_2", pretrained=False)


@pytest.mark.filterwarnings("ignore:.*meta parameter:UserWarning")  # torch: BatchNorm counters on meta
def test_official_keys_map_one_to_one(full_size):
    official = official_borad_keys()
    own = {k: tuple(v.shape) for k, v in full_size.state_dict().items()}
    ours = {k: official_key(k) for k in official}
    assert sorted(k for k, v in ours.items() if v is None) == sorted(k for k in official if k.startswith("predictor."))
    placed = {v: k for k, v in ours.items() if v is not None}
    assert len(placed) == len(official) - 6  # injective
    assert sorted(set(placed) - set(own)) == []
    # only the teacher's layer4 / fc are not in the official file (its timm teacher ends at layer3)
    assert sorted(set(own) - set(placed)) == sorted(k for k in own if k.startswith(("teacher.layer4.", "teacher.fc.")))
    assert {k: (own[k], official[o]) for k, o in placed.items() if own[k] != official[o]} == {}
    assert all(official_key(k, reverse=True) == o for k, o in placed.items())
    # and they load strictly (meta tensors: the key / shape checks without memory)
    files = {k: torch.empty(s, device="meta") for k, s in official.items()}
    net = {k: v for k, v in files.items() if not k.startswith("proto.")}
    terms = {"cos": {}, "proto": {k.removeprefix("proto."): v for k, v in files.items() if k.startswith("proto.")}}
    with pytest.warns(UserWarning, match=r"skipped 6 key\(s\) BoRAD has no use for \(predictor\.\*\)"):
        assert full_size.load_official(net, loss_terms=terms) == ([], [])
    with pytest.warns(UserWarning, match=r"skipped 30 key\(s\).*\(predictor\.\*, proj_layer_momentum\.\*\)"):
        assert full_size.export().load_official(net) == ([], [])


def _official_files(model: BoRAD) -> tuple[dict, dict]:
    """``model`` written the way the official trainer writes it: ADer's ``ckpt.pth`` (weights under "net",
    here with DDP's "module." left on) with the unused multi-scale predictor, and ``loss_terms.pth``."""
    net, proto = {}, {}
    for k, v in model.state_dict().items():
        key = official_key(k, reverse=True)
        if key.startswith("proto."):
            proto[key.removeprefix("proto.")] = v.clone()
        else:
            net["module." + key] = v.clone()
    c1 = model.projector.scales[0][0].in_channels
    net["module.predictor.pred_a.predictor.0.weight"] = torch.randn(c1 // 2, c1, 1, 1)
    ckpt = {"net": net, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100, "iter": 500}
    return ckpt, {"cos": {}, "proto": proto}


def _perturbed(model: BoRAD, seed: int) -> BoRAD:
    """Random values everywhere outside the (shared) teacher: BatchNorm statistics and affine parameters,
    biases, and an EMA projector that differs from the online one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.startswith("teacher."):
                continue
            if not t.is_floating_point():
                t.fill_(int(torch.randint(1, 100, (), generator=g)))
            elif t.ndim == 1:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)  # BN weight / var positive, biases arbitrary
            elif name.startswith("target_projector."):
                t.add_(0.1 * t.std() * torch.randn(t.shape, generator=g))
    return model


def official_mff_oce(sd: dict, feats: list) -> torch.Tensor:
    """``MFF_OCE.forward`` of the official code, re-stated on its key names (BatchNorm in eval mode)."""
    def conv(x, name, stride=1):
        w = sd[name + ".weight"]
        return F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)

    def bn(x, name):
        return F.batch_norm(x, sd[name + ".running_mean"], sd[name + ".running_var"], sd[name + ".weight"],
                            sd[name + ".bias"], training=False, eps=1e-5)

    l1 = F.relu(bn(conv(F.relu(bn(conv(feats[0], "mff_oce.conv1", 2), "mff_oce.bn1")), "mff_oce.conv2", 2), "mff_oce.bn2"))
    l2 = F.relu(bn(conv(feats[1], "mff_oce.conv3", 2), "mff_oce.bn3"))
    x, j = torch.cat([l1, l2, feats[2]], 1), 0
    while f"mff_oce.bn_layer.{j}.conv1.weight" in sd:
        p = f"mff_oce.bn_layer.{j}."
        y = F.relu(bn(conv(x, p + "conv1"), p + "bn1"))
        y = F.relu(bn(conv(y, p + "conv2", 2 if j == 0 else 1), p + "bn2"))
        y = bn(conv(y, p + "conv3"), p + "bn3")
        x = F.relu(y + (bn(conv(x, p + "downsample.0", 2), p + "downsample.1") if j == 0 else x))
        j += 1
    return x


def test_official_checkpoint_loads_strictly_and_gives_the_same_maps(images, tmp_path):
    torch.manual_seed(11)
    src = _perturbed(tiny(), 11).eval()
    ckpt, terms = _official_files(src)
    torch.save(ckpt, tmp_path / "ckpt.pth")
    torch.save(terms, tmp_path / "loss_terms.pth")
    torch.manual_seed(12)
    dst = tiny().eval()
    with pytest.warns(UserWarning, match=r"skipped 1 key\(s\) BoRAD has no use for \(predictor\.\*\)"):
        assert dst.load_official(tmp_path / "ckpt.pth", loss_terms=str(tmp_path / "loss_terms.pth")) == ([], [])
    got = dst.state_dict()
    for k, v in src.state_dict().items():  # training-only parts included (EMA projector, bank, heads)
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)
    # what the same-shaped official names are, written out (the table is read both ways above)
    file = {k.removeprefix("module."): v for k, v in ckpt["net"].items()}
    for name, param in {"proj_layer.proj_b.proj.3.weight": dst.projector.scales[1][3].weight,
                        "proj_layer_momentum.proj_b.proj.3.weight": dst.target_projector.scales[1][3].weight,
                        "mff_oce.bn_layer.0.conv2.weight": dst.bottleneck.oce[0].conv2.weight,
                        "net_s.layer1.0.upsample.1.running_var": dst.decoder.stages[0][0].downsample[1].running_var,
                        "net_s.layer3.0.conv2.weight": dst.decoder.stages[2][0].conv2.weight}.items():
        torch.testing.assert_close(param, file[name], rtol=0, atol=0, msg=name)
    for name, param in {"prototypes": dst.bank.weight, "linear_merge.0.bias": dst.merge[0].bias,
                        "predictor.3.weight": dst.predictor[3].weight,
                        "global_predictor.0.bias": dst.global_predictor[0].bias}.items():
        torch.testing.assert_close(param, terms["proto"][name], rtol=0, atol=0, msg=name)
    with torch.no_grad():
        want = src(images)
        torch.testing.assert_close(dst(images)["anomaly_map"], want["anomaly_map"], rtol=0, atol=0)
        # the MFF-OCE names mean what the official forward does with them (conv2 / conv3 share a shape)
        feats = dst.projector(dst.teacher_features(images))
        torch.testing.assert_close(dst.bottleneck(feats), official_mff_oce(file, feats), rtol=1e-5, atol=1e-5)
    # the inference model takes net.pth alone and skips the training-only keys, saying so
    torch.manual_seed(13)
    exported = tiny().export().eval()
    with pytest.warns(UserWarning, match=r"skipped \d+ key\(s\) ReverseDistillation .*proj_layer_momentum\.\*"):
        assert exported.load_official(ckpt["net"]) == ([], [])
    with pytest.warns(UserWarning, match=r"\(predictor\.\*, proj_layer_momentum\.\*, proto\.\*\)"):
        exported.load_official(ckpt, loss_terms=terms["proto"])  # a bare prototype-loss state_dict works too
    with torch.no_grad():
        torch.testing.assert_close(exported(images)["anomaly_map"], want["anomaly_map"], rtol=0, atol=0)


def test_official_checkpoint_errors_name_the_keys(tmp_path):
    torch.manual_seed(14)
    ckpt, terms = _official_files(tiny())
    net = {k.removeprefix("module."): v for k, v in ckpt["net"].items()}
    bad = dict(net)
    bad.pop("mff_oce.bn_layer.0.conv1.weight")
    bad["mff_oce.extra.weight"] = torch.zeros(1)
    dst = tiny()
    with pytest.raises(RuntimeError, match=r"missing keys: mff_oce\.bn_layer\.0\.conv1\.weight; "
                                           r"unexpected keys: mff_oce\.extra\.weight"):
        dst.load_official(bad, loss_terms=terms)
    with pytest.warns(UserWarning, match="predictor"):
        missing, unexpected = dst.load_official(bad, strict=False, loss_terms=terms)
    assert missing == ["mff_oce.bn_layer.0.conv1.weight"] and unexpected == ["mff_oce.extra.weight"]
    # the full model needs the loss module's file (the bank and heads); a bank of another size is named
    with pytest.raises(RuntimeError, match=r"missing keys: proto\.prototypes, proto\.linear_merge.*pass loss_terms="):
        dst.load_official(net)
    with pytest.raises(RuntimeError, match=r"shape mismatches: proto\.prototypes: file \(4, 5, 224\) vs model \(4, 7, 224\)"):
        dst.load_official(net, loss_terms={**terms["proto"], "prototypes": torch.zeros(4, 5, 224)})
    # files load with weights_only=True; non-tensor entries are refused by name
    from pathlib import PurePosixPath

    torch.save({"net": net, "logdir": PurePosixPath("runs")}, tmp_path / "pickled.pth")
    with pytest.raises(RuntimeError, match=r"pickled\.pth.*weights_only"):
        dst.load_official(tmp_path / "pickled.pth")
    with pytest.raises(TypeError, match=r"'epoch'.* not tensors"):
        dst.export().load_official({**net, "epoch": 3})
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        dst.load_official(tmp_path / "nothing.pth")


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter, subprocess): fused vs reference model end to end
# ----------------------------------------------------------------------------------------------


def _bias_before_norm(model: torch.nn.Module) -> set[str]:
    """Biases of convolutions followed by an instance norm or a train-mode batch norm: their gradient is
    analytically zero (the norm subtracts the mean), so what autograd returns is rounding noise that differs
    between any two correct implementations."""
    names = set()
    for prefix, seq in model.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            for (i, a), b in zip(enumerate(seq), list(seq)[1:]):
                if isinstance(a, torch.nn.Conv2d) and a.bias is not None and isinstance(b, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d)):
                    names.add(f"{prefix}.{i}.bias" if prefix else f"{i}.bias")
    return names


def _runs(seed: int, device: str = "cpu", fused: str = "triton") -> dict:
    """impl=``fused`` vs "reference": the exported model's maps and the training loss parts and gradients (same
    masking draws), on fresh random weights and inputs."""
    torch.manual_seed(seed)
    base = copy.deepcopy(tiny()).to(device)  # tiny() shares one teacher module across the tests: never moved
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
    runs = {}
    for impl in ("reference", fused):
        model = copy.deepcopy(base).set_impl(impl)  # a train-mode forward moves the BatchNorm statistics
        with torch.no_grad():
            amap = model.export().eval()(x)["anomaly_map"]
        torch.manual_seed(seed + 1)
        loss = model.train().loss(x)
        loss["loss"].backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                           if p.grad is not None and n not in _bias_before_norm(model)])
        runs[impl] = (amap, loss, grads)
    return runs


test_triton_model_matches_reference_under_interpreter, test_gpu_model_matches_reference = _interpreter.model_tests(
    __file__, _runs)


if __name__ == "__main__":
    _interpreter.model_main(__file__, _runs)
