"""ViT-family models (Dinomaly, INP-Former, Pro-AD): registry, shapes, training interface, official
checkpoint keys, and equality with an independent plain-PyTorch re-statement of the official
forward maths (random weights, tiny DINOv2).

The re-statements below follow the official module structure (``models/uad.py`` /
``models/vision_transformer.py`` / ``utils.py::evaluation_batch`` of guojiajeremy/Dinomaly and
luow23/INP-Former) with every attention written out, reading the weights from the state_dict by
their official key names, so they check the keys' meaning as well as the maths.
"""
from __future__ import annotations

import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastproto import backbones, models
from fastproto.models._vit_common import default_groups, default_layers
from fastproto.ops import Mlp
from tests import _interpreter

TINY = {"embed_dim": 64, "depth": 12, "num_heads": 2}  # DINOv2-shaped, 12 blocks so layers 2..9 are the default
HEADS = 4  # decoder heads of the tiny models (head dim 16)
SIDE = 56  # 4 x 4 patch grid, 5 prefix tokens
NAMES = ("dinomaly", "inpformer", "proad")


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return backbones.create("dinov2_vits14_reg", pretrained=False, **TINY)


def tiny(name, encoder, side=SIDE, **cfg):
    if name == "proad":
        cfg.setdefault("image_size", side)
    return models.create(name, backbone=encoder, num_heads=HEADS, **cfg)


@torch.no_grad()
def randomize(model, seed):
    """Weights far from the near-zero official init, so that the maps are not trivially ~1."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            continue
        r = torch.randn(p.shape, generator=gen)
        if p.dim() >= 2 and "prototype" not in name:
            p.copy_(r * p.shape[-1] ** -0.5)
        elif name.endswith("learn_scale"):
            p.copy_(0.5 + torch.rand(p.shape, generator=gen) * 1.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * r)
        else:
            p.copy_(r if "prototype" in name else 0.1 * r)
    return model


def images(seed, b=2, h=SIDE, w=SIDE):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# official maths, re-stated with plain torch (weights read by official key names)
# ----------------------------------------------------------------------------------------------


def _lin(x, sd, key):
    return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])


def _ln(x, sd, key):
    return F.layer_norm(x, x.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], eps=1e-8)


def _mlp(x, sd, key):
    return _lin(F.gelu(_lin(x, sd, key + ".fc1")), sd, key + ".fc2")


def _heads(t, h):
    b, n, c = t.shape
    return t.reshape(b, n, h, c // h).transpose(1, 2)


def _merge(t):
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def official_encoder(encoder, img, target_layers):
    """``ViTill.forward``'s encoder loop: prepare_tokens, then the blocks up to the last target."""
    with torch.no_grad():
        x = encoder.prepare_tokens(img)
        en = []
        for i, blk in enumerate(encoder.blocks):
            if i <= target_layers[-1]:
                x = blk(x)
                if i in target_layers:
                    en.append(x)
    return en


def official_linear_attention2(x, sd, key, h):
    """Dinomaly ``LinearAttention2``: elu+1 features, kv state, z = 1 / (q . sum k), no eps."""
    b, n, c = x.shape
    q, k, v = _lin(x, sd, key + ".qkv").reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
    kv = torch.einsum("...sd,...se->...de", k, v)
    z = 1.0 / torch.einsum("...sd,...d->...s", q, k.sum(dim=-2))
    out = torch.einsum("...de,...sd,...s->...se", kv, q, z)
    return _lin(_merge(out), sd, key + ".proj")


def official_groups(en_list, de_list, groups, prefix, side):
    de_list = de_list[::-1]
    en = [torch.stack([en_list[i] for i in g], 1).mean(1) for g in groups]
    de = [torch.stack([de_list[i] for i in g], 1).mean(1) for g in groups]
    b = en[0].shape[0]
    return ([e[:, prefix:].permute(0, 2, 1).reshape(b, -1, side, side) for e in en],
            [d[:, prefix:].permute(0, 2, 1).reshape(b, -1, side, side) for d in de])


def official_dinomaly(model, img, h=HEADS):
    sd = model.state_dict()
    en_list = official_encoder(model.encoder, img, model.layers)
    prefix = model.encoder.num_prefix_tokens
    side = int(math.sqrt(en_list[0].shape[1] - prefix))
    x = torch.stack(en_list, 1).mean(1)
    x = _mlp(x, sd, "bottleneck.0")  # bMlp, dropout inactive in eval
    de_list = []
    for i in range(len(model.decoder)):
        key = f"decoder.{i}"
        x = x + official_linear_attention2(_ln(x, sd, key + ".norm1"), sd, key + ".attn", h)
        x = x + _mlp(_ln(x, sd, key + ".norm2"), sd, key + ".mlp")
        de_list.append(x)
    return official_groups(en_list, de_list, model.groups, prefix, side)


def official_inpformer(model, img, h=HEADS):
    sd = model.state_dict()
    prefix = model.encoder.num_prefix_tokens
    en_list = [e[:, prefix:] for e in official_encoder(model.encoder, img, model.layers)]
    side = int(math.sqrt(en_list[0].shape[1]))
    x = torch.stack(en_list, 1).mean(1)
    b, n, c = x.shape
    # INP extractor: Aggregation_Block, softmax cross-attention, same norm1 on both inputs
    p = sd["prototype_token"].unsqueeze(0).repeat(b, 1, 1)
    key = "aggregation.0"
    pn, xn = _ln(p, sd, key + ".norm1"), _ln(x, sd, key + ".norm1")
    q = _heads(_lin(pn, sd, key + ".attn.q"), h)
    k, v = _lin(xn, sd, key + ".attn.kv").reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // h) ** -0.5).softmax(dim=-1)
    p = p + _lin(_merge(attn @ v), sd, key + ".attn.proj")
    p = p + _mlp(_ln(p, sd, key + ".norm2"), sd, key + ".mlp")
    coherence = (1 - F.cosine_similarity(x.unsqueeze(2), p.unsqueeze(1), dim=-1)).min(dim=2)[0].mean()
    x = _mlp(x, sd, "bottleneck.0")
    de_list = []
    for i in range(len(model.decoder)):
        key = f"decoder.{i}"
        xn, pn = _ln(x, sd, key + ".norm1"), _ln(p, sd, key + ".norm1")
        q = F.normalize(_heads(_lin(xn, sd, key + ".attn.q"), h), dim=-1)
        k, v = _lin(pn, sd, key + ".attn.kv").reshape(b, -1, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = F.relu((q @ F.normalize(k, dim=-1).transpose(-2, -1)) * sd[key + ".attn.learn_scale"])
        x = _lin(_merge(attn @ v), sd, key + ".attn.proj")  # no attention residual
        x = x + _mlp(_ln(x, sd, key + ".norm2"), sd, key + ".mlp")
        de_list.append(x)
    en, de = official_groups(en_list, de_list, model.groups, 0, side)
    return en, de, coherence


def plain_lca(x, y, sd, key, h):
    """Linear cross-attention written with the explicit [Nq, Nk] weight matrix: queries from x,
    keys/values from y through the rows of one packed qkv Linear."""
    c = x.shape[-1]
    w, bias = sd[key + ".qkv.weight"], sd[key + ".qkv.bias"]
    q = F.elu(_heads(F.linear(x, w[:c], bias[:c]), h)) + 1
    k = F.elu(_heads(F.linear(y, w[c:2 * c], bias[c:2 * c]), h)) + 1
    v = _heads(F.linear(y, w[2 * c:], bias[2 * c:]), h)
    a = q @ k.transpose(-2, -1)
    return _lin(_merge((a / a.sum(-1, keepdim=True)) @ v), sd, key + ".proj")


def plain_proad(model, img, h=HEADS):
    """Pro-AD as stated in the paper / DESIGN: A = P + LCA(P, Q, Q), P' = A + FFN(A),
    f_D = Q + LCA(Q, P', P') + FFN(P'), one block's parameters for both, pre-norm."""
    sd = model.state_dict()
    en_list = official_encoder(model.encoder, img, model.layers)
    prefix = model.encoder.num_prefix_tokens
    side = int(math.sqrt(en_list[0].shape[1] - prefix))
    x = torch.stack(en_list, 1).mean(1)
    q = _mlp(x, sd, "bottleneck.0")
    p = _mlp(sd["prototypes"], sd, "bottleneck.0").expand(x.shape[0], -1, -1)
    de_list = []
    for i in range(len(model.decoder)):
        key = f"decoder.{i}"
        a = p + plain_lca(_ln(p, sd, key + ".norm1"), _ln(q, sd, key + ".norm1"), sd, key + ".attn", h)
        p = a + _mlp(_ln(a, sd, key + ".norm2"), sd, key + ".mlp")
        f_rec = q + plain_lca(_ln(q, sd, key + ".norm1"), _ln(p, sd, key + ".norm1"), sd, key + ".attn", h)
        q = f_rec + _mlp(_ln(p, sd, key + ".norm2"), sd, key + ".mlp")
        de_list.append(q)
    return official_groups(en_list, de_list, model.groups, prefix, side)


def official_gaussian(kernel_size=5, sigma=4.0):
    """``utils.get_gaussian_kernel``: 2-D Gaussian on integer offsets, normalised, zero-padded conv."""
    coords = torch.arange(kernel_size).float()
    xx = coords.repeat(kernel_size).view(kernel_size, kernel_size)
    grid = torch.stack([xx, xx.t()], dim=-1)
    mean, var = (kernel_size - 1) / 2.0, sigma ** 2.0
    g = torch.exp(-torch.sum((grid - mean) ** 2.0, dim=-1) / (2 * var)) / (2.0 * math.pi * var)
    return (g / g.sum()).view(1, 1, kernel_size, kernel_size)


def official_map(en, de, img_side, resize=None, max_ratio=0.01):
    """``evaluation_batch``: cal_anomaly_maps (1 - cos, bilinear align_corners=True to the input
    size, mean over groups), optional resize (align_corners=False), Gaussian, top max_ratio mean."""
    maps = [F.interpolate((1 - F.cosine_similarity(e, d)).unsqueeze(1), size=img_side, mode="bilinear",
                          align_corners=True) for e, d in zip(en, de)]
    amap = torch.cat(maps, dim=1).mean(dim=1, keepdim=True)
    if resize is not None:
        amap = F.interpolate(amap, size=resize, mode="bilinear", align_corners=False)
    amap = F.conv2d(amap, official_gaussian(), padding=2)
    flat = amap.flatten(1)
    score = torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * max_ratio)].mean(dim=1)
    return amap[:, 0], score


OFFICIAL = {"dinomaly": official_dinomaly, "inpformer": lambda m, x: official_inpformer(m, x)[:2],
            "proad": plain_proad}


# ----------------------------------------------------------------------------------------------
# registry and configuration
# ----------------------------------------------------------------------------------------------


def test_registry_lists_the_vit_family():
    assert set(NAMES) <= set(models.list_models())
    assert models.list_models() == sorted(models.list_models())


def test_create_errors(encoder):
    with pytest.raises(ValueError, match="unknown model 'nope'.*dinomaly"):
        models.create("nope", backbone=encoder)
    with pytest.raises(TypeError, match="unknown option.*'dropuot'.*valid options:.*dropout"):
        models.create("dinomaly", backbone=encoder, dropuot=0.2)
    with pytest.raises(TypeError, match="backbone must be"):
        models.create("dinomaly", backbone=3)
    with pytest.raises(ValueError, match="groups index the 8 tapped layers"):
        models.create("dinomaly", backbone=encoder, groups=[[0, 8]])
    with pytest.raises(ValueError, match="score_rule"):
        models.create("inpformer", backbone=encoder, score_rule="median")
    with pytest.raises(ValueError, match="unknown optimizer option"):
        models.create("inpformer", backbone=encoder, optimizer={"learning_rate": 1.0})
    with pytest.raises(ValueError, match=r"has layers 0\.\.11"):
        models.create("proad", backbone=encoder, layers=[2, 3, 12])


def test_pretrained_missing_checkpoint_is_the_backbones_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPROTO_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # the default backbone (ViT-B/14 reg), built on the meta device (no memory) before the lookup
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_reg4_pretrain.pth"), torch.device("meta"):
        models.create("dinomaly")


def test_defaults_follow_the_official_code():
    assert default_layers(12) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert default_layers(24) == [4, 6, 8, 10, 12, 14, 16, 18]
    assert default_layers(8) == list(range(8))
    assert len(set(default_layers(40))) == 8 and max(default_layers(40)) < 40
    assert default_groups(8) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_optimizer_config_paper_defaults_and_overrides(encoder):
    from fastproto.engine.optim import OptimConfig

    inp = tiny("inpformer", encoder)
    cfg = OptimConfig.merge(inp.optimizer_config())  # the trainer's merge accepts every key
    assert (cfg.name, cfg.lr, cfg.weight_decay, cfg.eps, cfg.amsgrad, cfg.warmup_iters, cfg.min_lr_ratio,
            cfg.grad_clip) == ("stable_adamw", 1e-3, 1e-4, 1e-10, True, 100, 0.1, 0.1)
    assert inp.training_config() == {"epochs": 200, "batch_size": 16}
    dino = tiny("dinomaly", encoder, optimizer={"lr": 1e-3})
    cfg = OptimConfig.merge(dino.optimizer_config())
    assert (cfg.lr, cfg.warmup_iters, cfg.min_lr_ratio) == (1e-3, 100, 0.1)
    assert dino.training_config() == {"iters": 10_000, "batch_size": 16}
    proad = tiny("proad", encoder)
    cfg = OptimConfig.merge(proad.optimizer_config())
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == (1e-4, 1e-5, 10)
    assert proad.training_config() == {"epochs": 200, "batch_size": 16}


# ----------------------------------------------------------------------------------------------
# official checkpoint keys (full-size models on the meta device: shapes without memory)
# ----------------------------------------------------------------------------------------------


def _official_encoder_keys(depth=12, dim=768):
    keys = {"encoder.cls_token": (1, 1, dim), "encoder.pos_embed": (1, 1370, dim),
            "encoder.register_tokens": (1, 4, dim), "encoder.mask_token": (1, dim),
            "encoder.patch_embed.proj.weight": (dim, 3, 14, 14), "encoder.patch_embed.proj.bias": (dim,),
            "encoder.norm.weight": (dim,), "encoder.norm.bias": (dim,)}
    for i in range(depth):
        b = f"encoder.blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,), b + "ls1.gamma": (dim,),
                     b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                     b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,), b + "ls2.gamma": (dim,)})
    return keys


def _official_mlp(prefix, dim=768):
    return {prefix + "fc1.weight": (4 * dim, dim), prefix + "fc1.bias": (4 * dim,),
            prefix + "fc2.weight": (dim, 4 * dim), prefix + "fc2.bias": (dim,)}


def _official_norms(prefix, dim=768):
    return {prefix + f"norm{j}.{w}": (dim,) for j in (1, 2) for w in ("weight", "bias")}


def official_dinomaly_keys(dim=768):
    """``ViTill(encoder, bottleneck=[bMlp], decoder=8 x Block(attn=LinearAttention2))``."""
    keys = {**_official_encoder_keys(dim=dim), **_official_mlp("bottleneck.0.", dim)}
    for i in range(8):
        b = f"decoder.{i}."
        keys.update({**_official_norms(b, dim), **_official_mlp(b + "mlp.", dim),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
    return keys


def official_inpformer_keys(dim=768, heads=12, inp=6):
    """``INP_Former(encoder, bottleneck=[Mlp], aggregation=[Aggregation_Block], decoder=8 x
    Prototype_Block, prototype_token=ParameterList([randn(6, C)])[0])``."""
    keys = {**_official_encoder_keys(dim=dim), **_official_mlp("bottleneck.0.", dim), "prototype_token": (inp, dim)}
    for b in ["aggregation.0."] + [f"decoder.{i}." for i in range(8)]:
        keys.update({**_official_norms(b, dim), **_official_mlp(b + "mlp.", dim),
                     b + "attn.q.weight": (dim, dim), b + "attn.q.bias": (dim,),
                     b + "attn.kv.weight": (2 * dim, dim), b + "attn.kv.bias": (2 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,)})
        if b.startswith("decoder"):
            keys[b + "attn.learn_scale"] = (heads, 1, 1)
    return keys


@pytest.fixture(scope="module")
def full_size():
    """The three models at paper size (ViT-B/14 reg, random weights) on the meta device."""
    with torch.device("meta"):
        return {name: models.create(name, pretrained=False) for name in NAMES}


@pytest.mark.parametrize("name,expected", [("dinomaly", official_dinomaly_keys),
                                           ("inpformer", official_inpformer_keys)])
def test_state_dict_keys_equal_the_official_checkpoint(full_size, name, expected):
    got = {k: tuple(v.shape) for k, v in full_size[name].state_dict().items()}
    want = expected()
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def test_proad_parameter_count_matches_the_paper(full_size):
    """Table 1 of the paper: 62,031,360 trainable parameters with ViT-B/14 at 392 px."""
    model = full_size["proad"]
    assert model.prototypes.shape == (789, 768)
    assert sum(p.numel() for p in model.trainable_parameters()) == 62_031_360
    # Dinomaly's trainable set is the same minus the prototypes (the derivation in the docstring)
    dino = sum(p.numel() for p in full_size["dinomaly"].trainable_parameters())
    assert dino == 61_425_408 and dino + 789 * 768 == 62_031_360
    assert sum(p.numel() for p in full_size["inpformer"].trainable_parameters()) == 68_517_984


def test_trainable_parameters_exclude_the_frozen_encoder(full_size):
    for model in full_size.values():
        ids = {id(p) for p in model.trainable_parameters()}
        assert not ids & {id(p) for p in model.encoder.parameters()}
        assert all(not p.requires_grad for p in model.encoder.parameters())
        assert len(ids) == sum(1 for n, _ in model.named_parameters() if not n.startswith("encoder."))


# ----------------------------------------------------------------------------------------------
# forward, maps, official equivalence
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_eval_output_shapes(encoder, name):
    model = tiny(name, encoder).eval()
    with torch.no_grad():
        out = model(images(1, b=3))
    assert set(out) == {"anomaly_map", "score"}
    assert out["anomaly_map"].shape == (3, SIDE, SIDE) and out["anomaly_map"].dtype == torch.float32
    assert out["score"].shape == (3,) and torch.isfinite(out["anomaly_map"]).all()
    sized = tiny(name, encoder, output_size=32, score_rule="max").eval()
    with torch.no_grad():
        out = sized(images(1, b=2))
    assert out["anomaly_map"].shape == (2, 32, 32)
    torch.testing.assert_close(out["score"], out["anomaly_map"].flatten(1).max(1)[0])


@pytest.mark.parametrize("name", ("dinomaly", "inpformer"))
def test_non_square_images(encoder, name):
    model = tiny(name, encoder).eval()
    with torch.no_grad():
        out = model(images(2, h=56, w=84))
    assert out["anomaly_map"].shape == (2, 56, 84)


@pytest.mark.parametrize("resize", (None, 32))
@pytest.mark.parametrize("name", NAMES)
def test_maps_equal_official_maths(encoder, name, resize, rng):
    seed = int(rng.integers(1 << 30))
    model = randomize(tiny(name, encoder, output_size=resize), seed).eval()
    x = images(seed)
    with torch.no_grad():
        out = model(x)
        en, de = OFFICIAL[name](model, x)
        want_map, want_score = official_map(en, de, SIDE, resize)
    assert want_map.std() > 1e-3  # a non-degenerate map
    torch.testing.assert_close(out["anomaly_map"], want_map, atol=1e-4, rtol=0)
    torch.testing.assert_close(out["score"], want_score, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_reference_switch_gives_the_same_maps_losses_and_grads(encoder, name, rng):
    seed = int(rng.integers(1 << 30))
    x = images(seed)
    results = []
    for reference in (False, True):
        torch.manual_seed(seed)
        model = randomize(models.create(name, backbone=encoder, reference=reference, num_heads=HEADS,
                                        **({"image_size": SIDE} if name == "proad" else {})), seed)
        assert all(m.impl == ("reference" if reference else "auto")
                   for m in model.modules() if isinstance(getattr(m, "impl", None), str))
        with torch.no_grad():
            amap = model.eval()(x)["anomaly_map"]
        model.train()
        if name == "dinomaly":
            model.on_train_iter(700, 10_000)
        torch.manual_seed(seed)  # same dropout masks
        loss = model.loss(x)
        loss["loss"].backward()
        results.append((amap, loss["loss"].detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    (m0, l0, g0), (m1, l1, g1) = results
    torch.testing.assert_close(m0, m1, atol=1e-5, rtol=0)
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    model.set_impl("auto")
    assert model.impl == "auto" and model.decoder[0].attn.impl == "auto"
    with pytest.raises(ValueError, match="impl must be one of"):
        model.set_impl("cuda-graph")


# ----------------------------------------------------------------------------------------------
# training interface
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_loss_backward_reaches_exactly_the_trainable_parameters(encoder, name):
    model = tiny(name, encoder).train()
    assert not model.encoder.training  # the backbone stays in eval mode
    out = model.loss({"image": images(3), "label": torch.zeros(2)})
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    missing = [n for n, p in model.named_parameters() if not n.startswith("encoder.") and
               (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_loss_parts(encoder, rng):
    seed = int(rng.integers(1 << 30))
    model = randomize(tiny("inpformer", encoder), seed).eval()  # eval: no dropout (INP has none anyway)
    x = images(seed)
    out = model.loss((x, None))
    with torch.no_grad():
        en, de, coherence = official_inpformer(model, x)
    rec = torch.stack([(1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean() for e, d in zip(en, de)]).mean()
    torch.testing.assert_close(out["coherence"], coherence, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["reconstruction"], rec, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["loss"].detach(), rec + 0.2 * coherence, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="batch must be"):
        model.loss("images")
    with pytest.raises(KeyError, match="no 'image' entry"):
        model.loss({"img_tensor": x})


def _grads(model, x, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    model.loss(x)["loss"].backward()
    return torch.cat([p.grad.flatten() for p in model.trainable_parameters()])


def test_dinomaly_hard_mining_ramp(encoder, rng):
    seed = int(rng.integers(1 << 30))
    model = randomize(tiny("dinomaly", encoder, dropout=0.0), seed).train()
    assert model.current_hard_fraction == 0.0
    model.on_train_iter(500, 10_000)
    assert model.current_hard_fraction == pytest.approx(0.45)
    model.on_train_iter(5000, 10_000)
    assert model.current_hard_fraction == pytest.approx(0.9)
    x = images(seed)
    hard = _grads(model, x, seed)
    model.on_train_iter(0, 10_000)
    plain = _grads(model, x, seed)
    assert not torch.allclose(hard, plain)  # easy positions' gradients were damped
    assert hard.norm() < plain.norm()


def test_proad_prototypes_skip_the_bottleneck_dropout(encoder):
    mlp = Mlp(16, 32, drop=0.5, input_dropout=True).train()
    x = torch.randn(4, 16)
    torch.testing.assert_close(mlp(x, noise=False), mlp(x, noise=False))
    assert not torch.allclose(mlp(x), mlp(x))
    model = tiny("proad", encoder, dropout=0.5).train()
    with pytest.raises(ValueError, match="21 prototypes"):
        model(images(0, h=70, w=70))  # 5 x 5 grid + 5 prefix = 30 tokens


def test_state_dict_round_trip_strict(encoder, rng, tmp_path):
    seed = int(rng.integers(1 << 30))
    x = images(seed)
    for name in NAMES:
        src = randomize(tiny(name, encoder), seed).eval()
        buf = io.BytesIO()
        torch.save(src.state_dict(), buf)
        sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
        dst = tiny(name, encoder).eval()
        dst.load_official({"module." + k: v for k, v in sd.items()})  # DDP prefixes stripped
        with torch.no_grad():
            torch.testing.assert_close(dst(x)["anomaly_map"], src(x)["anomaly_map"], atol=0, rtol=0)
    path = tmp_path / "model.pth"
    torch.save({"model": sd}, path)
    dst.load_official(str(path))
    bad = dict(sd)
    bad.pop("decoder.3.mlp.fc1.weight")
    bad["decoder.9.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing keys: decoder\.3\.mlp\.fc1\.weight.*unexpected keys: decoder\.9"):
        dst.load_official(bad)
    missing, unexpected = dst.load_official(bad, strict=False)
    assert missing == ["decoder.3.mlp.fc1.weight"] and unexpected == ["decoder.9.extra"]


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast(encoder, name):
    model = randomize(tiny(name, encoder), 5).eval()
    x = images(4)
    with torch.no_grad():
        want = model(x)["anomaly_map"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)["anomaly_map"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(x)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())


# ----------------------------------------------------------------------------------------------
# other backbones
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_encoder():
    if "efficientnet_lite0" not in backbones.list_backbones():
        pytest.skip("efficientnet_lite0 backbone not available")
    return backbones.create("efficientnet_lite0", pretrained=False, embed_dim=64)


@pytest.mark.parametrize("name", NAMES)
def test_cnn_token_adapter(cnn_encoder, name):
    """EfficientNet-Lite0 behind the token adapter: no prefix tokens, 8 taps."""
    assert cnn_encoder.num_prefix_tokens == 0
    side = 4 * cnn_encoder.patch_size
    model = models.create(name, backbone=cnn_encoder, **({"image_size": side} if name == "proad" else {})).eval()
    assert model.layers == list(range(8)) and model.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    if name == "proad":
        assert model.prototypes.shape == (16, 64)
    with torch.no_grad():
        out = model(images(0, h=side, w=side))
    assert out["anomaly_map"].shape == (2, side, side) and torch.isfinite(out["score"]).all()
    model.train().loss(images(1, h=side, w=side))["loss"].backward()


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter, subprocess): fused vs reference models end to end
# ----------------------------------------------------------------------------------------------


def _map_deltas(seed: int, device: str = "cpu", fused: str = "triton") -> dict:
    """Each model with impl=``fused`` vs "reference": the max difference of the anomaly maps."""
    torch.manual_seed(seed)
    enc = backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=12, num_heads=2)
    x = images(0, h=28, w=28).to(device)
    res = {}
    for name in NAMES:
        model = randomize(tiny(name, enc, side=28), 1).to(device).eval()
        with torch.no_grad():
            ref = model.set_impl("reference")(x)["anomaly_map"]
            out = model.set_impl(fused)(x)["anomaly_map"]
        res[name] = float((out - ref).abs().max())
    return res


def _interpreter_main(seed: int) -> None:
    """Subprocess: the Triton kernels interpreted on the CPU."""
    _interpreter.emit(_map_deltas(seed))


def test_triton_models_match_reference_under_interpreter():
    seed = int.from_bytes(os.urandom(3), "little")
    res = _interpreter.run(__file__, seed)  # skips without triton
    for name, err in res.items():
        assert err <= 1e-4, f"{name}: fused vs reference map differs by {err:.2e} (seed={seed})"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_models_match_reference():
    """The kernels impl="auto" picks on CUDA (float32: tf32x3 products in the Triton GEMMs) vs reference mode."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernels in the interpreter")
    seed = int.from_bytes(os.urandom(3), "little")
    for name, err in _map_deltas(seed, "cuda", "auto").items():
        assert err <= 1e-3, f"{name}: fused vs reference map differs by {err:.2e} (seed={seed})"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
