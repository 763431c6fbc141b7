"""UIP-AD (fastproto.models.uipad): registry and configuration, input forms, shapes, the loss parts against
independent re-computations, gradients (trainable parameters only), modes, the reference switch, state_dict
round trip, and one batch from the synthetic RGB-D dataset. Tiny shapes: random-weight DINOv2 with 32 channels,
4 x 4 tokens."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastproto import backbones, models
from fastproto.models import uipad
from fastproto.models.dpdiff import PrototypeCrossAttention
from tests import _interpreter

SIDE = 56  # 4 x 4 patch grid (+ 5 prefix tokens)
TINY = {"num_prototypes": 4, "num_blocks": 4, "groups": [[0, 1], [2, 3]]}


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=12, num_heads=2)


def tiny(encoder, seed=0, **cfg):
    torch.manual_seed(seed)
    return randomize(models.create("uipad", backbone=encoder, **{**TINY, **cfg}), seed)


@torch.no_grad()
def randomize(model, seed):
    """Weights away from the 0.01-std init, so that every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not name.startswith("encoder.") and p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return model


def pair(seed, b=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, SIDE, SIDE, generator=gen), torch.randn(b, 3, SIDE, SIDE, generator=gen)


# ----------------------------------------------------------------------------------------------
# registry, configuration, inputs
# ----------------------------------------------------------------------------------------------


def test_registry_defaults_and_config_errors(encoder):
    assert "uipad" in models.list_models() and models.model_class("uipad") is uipad.UIPAD
    model = models.create("uipad", backbone=encoder)
    assert model.layers == list(range(2, 10)) and model.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert model.prototype_token.shape == (12, 32) and model.mode == "rgbd"
    assert set(model.decoders) == {"rgb", "depth"} and all(len(d) == 8 for d in model.decoders.values())
    assert model.fusion.fc1.in_features == 64  # concat(F_rgb, F_3d)
    sd = model.state_dict()
    assert "decoders.rgb.6.p_attn.q.weight" in sd and "decoders.rgb.7.p_attn.q.weight" not in sd
    assert not any(k.startswith("decoder.") for k in sd)
    with pytest.raises(TypeError, match="unknown option"):
        models.create("uipad", backbone=encoder, prototypes=3)
    with pytest.raises(ValueError, match="mode"):
        models.create("uipad", backbone=encoder, mode="rgb+d")
    with pytest.raises(ValueError, match="tau"):
        models.create("uipad", backbone=encoder, tau=0)
    with pytest.raises(ValueError, match="decoder blocks"):
        models.create("uipad", backbone=encoder, num_blocks=2)  # default groups index 8 blocks


def test_input_forms_agree_and_bad_inputs_are_named(encoder):
    model = tiny(encoder).eval()
    rgb, depth = pair(1)
    with torch.no_grad():
        a = model(rgb, depth)
        b = model({"image": rgb, "depth": depth, "label": torch.zeros(2)})
        c = model(torch.cat([rgb, depth], 1))
    for out in (b, c):
        for k in a:
            torch.testing.assert_close(out[k], a[k], rtol=0, atol=0)
    assert a["anomaly_map"].shape == (2, SIDE, SIDE) and a["score"].shape == (2,)
    assert a["anomaly_map"].dtype == torch.float32
    torch.testing.assert_close(a["anomaly_map"], (a["anomaly_map_rgb"] + a["anomaly_map_depth"]) / 2)
    assert not torch.allclose(a["anomaly_map_rgb"], a["anomaly_map_depth"])
    with pytest.raises(ValueError, match="needs the depth input"):
        model(rgb)
    with pytest.raises(ValueError, match="needs the depth input"):
        model.loss({"image": rgb})
    with pytest.raises(ValueError, match="same shape"):
        model(rgb, depth[:1])
    with pytest.raises(ValueError, match=r"depth input must be \[B, 3, H, W\]"):
        model(rgb, depth[:, :1])


# ----------------------------------------------------------------------------------------------
# blocks and losses
# ----------------------------------------------------------------------------------------------


def test_bidirectional_block_matches_its_formula():
    torch.manual_seed(3)
    blk = uipad.BidirectionalBlock(16, num_heads=2, impl="reference")
    randomize(blk, 3)
    x, p = torch.randn(2, 9, 16), torch.randn(2, 3, 16)

    def attend(q_in, kv_in, q, kv, proj):  # softmax multi-head cross-attention, written out
        B, N, C = q_in.shape
        qh = q(q_in).reshape(B, N, 2, C // 2).transpose(1, 2)
        k, v = kv(kv_in).reshape(B, -1, 2, 2, C // 2).permute(2, 0, 3, 1, 4)
        w = torch.softmax(qh @ k.transpose(-1, -2) / math.sqrt(C // 2), -1)
        return proj((w @ v).transpose(1, 2).reshape(B, N, C))

    x1 = x + attend(blk.norm1(x), blk.p_norm1(p), blk.attn.q, blk.attn.kv, blk.attn.proj)
    x1 = x1 + blk.mlp(blk.norm2(x1))
    p1 = p + attend(blk.p_norm1(p), blk.norm1(x1), blk.p_attn.q, blk.p_attn.kv, blk.p_attn.proj)
    p1 = p1 + blk.p_mlp(blk.p_norm2(p1))
    xo, po = blk(x, p)
    torch.testing.assert_close(xo, x1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(po, p1, rtol=1e-5, atol=1e-5)
    last = uipad.BidirectionalBlock(16, num_heads=2, update_prototypes=False)
    assert last(x, p)[1] is p


def test_loss_parts_match_independent_computations(encoder):
    model = tiny(encoder, seed=2, tau=0.2)
    rgb, depth = pair(2)
    out = model.loss({"image": rgb, "depth": depth})
    assert set(out) == {"loss", "reconstruction", "proto", "assign", "usage", "agreement"}
    with torch.no_grad():
        _, _, ex = model.features(rgb, depth)
        P = ex["prototypes"]
        ws, ls = [], []
        for m in ("rgb", "depth"):
            f = ex["fused"][m]
            cos = F.normalize(f, dim=-1) @ F.normalize(P, dim=-1).transpose(1, 2)
            w = torch.softmax(cos / 0.2, -1)
            ls.append((1 - F.cosine_similarity(f, w @ P, dim=-1)).mean())
            ws.append(w)
        kl = lambda a, b: (a * (a / b).log()).sum(-1).mean()
        u = torch.cat(ws, 1).mean(1)
        usage = (math.log(4) + (u * u.log()).sum(-1)).mean()
    torch.testing.assert_close(out["proto"], sum(ls) / 2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["assign"], (kl(ws[0], ws[1]) + kl(ws[1], ws[0])) / 2, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(out["usage"], usage, rtol=1e-4, atol=1e-6)
    assert out["assign"] > 0 and 0 <= out["agreement"] <= 1 and out["usage"] >= 0
    expected = (out["reconstruction"] + 0.2 * out["proto"] + 0.1 * out["assign"] + 0.05 * out["usage"])
    torch.testing.assert_close(out["loss"].detach(), expected)
    # identical modalities: identical assignments, no consistency loss, full agreement
    same = model.loss({"image": rgb, "depth": rgb})
    assert same["assign"].abs() < 1e-6 and same["agreement"] == 1


def test_gradients_reach_every_trainable_parameter_and_only_those(encoder):
    model = tiny(encoder, seed=4)
    model.train()
    rgb, depth = pair(4)
    model.loss({"image": rgb, "depth": depth})["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if not n.startswith("encoder.")}
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters()
                                                              if n in trainable}
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------
# modes, reference switch, checkpoints
# ----------------------------------------------------------------------------------------------


def test_modes_use_their_own_streams(encoder):
    rgb, depth = pair(5)
    other = pair(6)[1]
    full = tiny(encoder, seed=5).eval()
    with torch.no_grad():
        # rgbd: the RGB map depends on the depth stream (shared unified prototypes)
        a, b = full(rgb, depth), full(rgb, other)
        assert not torch.allclose(a["anomaly_map_rgb"], b["anomaly_map_rgb"])
        only_rgb = tiny(encoder, seed=5, mode="rgb").eval()
        assert set(only_rgb.decoders) == {"rgb"} and only_rgb.fusion.fc1.in_features == 32
        r = only_rgb(rgb)
        torch.testing.assert_close(only_rgb({"image": rgb, "depth": other})["anomaly_map"], r["anomaly_map"])
        assert set(r) == {"anomaly_map", "score"}
        only_depth = tiny(encoder, seed=5, mode="depth").eval()
        d = only_depth({"depth": depth})
        torch.testing.assert_close(only_depth(None, depth)["anomaly_map"], d["anomaly_map"])
        with pytest.raises(ValueError, match="needs the depth input"):
            only_depth({"image": rgb})
    parts = only_depth.loss({"depth": depth})
    assert parts["assign"] == 0 and parts["agreement"] == 1 and torch.isfinite(parts["loss"])


def test_reference_switch(encoder):
    torch.manual_seed(7)
    ref = models.create("uipad", backbone=encoder, reference=True, **TINY)
    attns = [m for m in ref.modules() if isinstance(m, PrototypeCrossAttention)]
    assert len(attns) == 8 and all(m.impl == "reference" for m in attns) and ref.impl == "reference"
    ref.set_impl("auto")
    assert all(m.impl == "auto" for m in attns)
    randomize(ref, 7).eval()
    rgb, depth = pair(7)
    with torch.no_grad():
        auto = ref(rgb, depth)
        reference = ref.set_impl("reference")(rgb, depth)
    torch.testing.assert_close(auto["anomaly_map"], reference["anomaly_map"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        ref.set_impl("cuda")


def test_state_dict_round_trip(encoder):
    a, b = tiny(encoder, seed=8).eval(), tiny(encoder, seed=9).eval()
    rgb, depth = pair(8)
    with torch.no_grad():
        ya, yb = a(rgb, depth), b(rgb, depth)
        assert not torch.allclose(ya["anomaly_map"], yb["anomaly_map"])
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b(rgb, depth)["anomaly_map"], ya["anomaly_map"], rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a single-modality model has other keys
        tiny(encoder, mode="rgb").load_state_dict(a.state_dict())


def test_one_training_batch_from_the_synthetic_rgbd_dataset(encoder, tmp_path):
    from fastproto.data import MVTec3DDataset, Preprocess, collate, generate_rgbd

    root = generate_rgbd(tmp_path, categories=["cookie"], n_train=2, n_test=2, size=64, seed=0)
    ds = MVTec3DDataset(root, "train", transform=Preprocess(64, SIDE), plane_border=6)
    batch = collate([ds[0], ds[1]])
    model = tiny(encoder, seed=10)
    out = model.loss(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    with torch.no_grad():
        pred = model.eval()(batch)
    assert pred["anomaly_map"].shape == (2, SIDE, SIDE)


@pytest.mark.parametrize("decoder_input", uipad.DECODER_INPUTS)
def test_decoders_start_from_the_configured_tokens(encoder, decoder_input, monkeypatch):
    model = tiny(encoder, seed=11, decoder_input=decoder_input).eval()
    seen = {}
    decode = type(model).decode_modality

    def record(self, modality, x, prototypes):
        seen[modality] = x
        return decode(self, modality, x, prototypes)

    monkeypatch.setattr(type(model), "decode_modality", record)
    rgb, depth = pair(11)
    with torch.no_grad():
        _, _, extras = model.features(rgb, depth)
    fused, unified = extras["fused"], extras["unified"]
    expected = {"own": {"rgb": fused["rgb"], "depth": fused["depth"]},
                "cross": {"rgb": fused["depth"], "depth": fused["rgb"]},
                "unified": {"rgb": unified, "depth": unified}}[decoder_input]
    for m in ("rgb", "depth"):
        torch.testing.assert_close(seen[m], expected[m], rtol=0, atol=0)
    assert not torch.equal(fused["rgb"], fused["depth"])  # the check above tells the sources apart
    # one modality: its own tokens whatever the setting (there is no other stream)
    single = tiny(encoder, seed=11, mode="depth", decoder_input=decoder_input).eval()
    seen.clear()
    with torch.no_grad():
        _, _, extras = single.features(None, depth)
    expected_single = extras["unified"] if decoder_input == "unified" else extras["fused"]["depth"]
    torch.testing.assert_close(seen["depth"], expected_single, rtol=0, atol=0)


def test_decoder_input_is_validated(encoder):
    with pytest.raises(ValueError, match="decoder_input must be one of"):
        models.create("uipad", backbone=encoder, decoder_input="rgb", **TINY)


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter, subprocess): fused vs reference model end to end
# ----------------------------------------------------------------------------------------------


def _runs(seed: int, device: str = "cpu", fused: str = "triton") -> dict:
    """The model with impl=``fused`` vs "reference": maps, loss parts and gradients, on fresh random weights and
    inputs."""
    torch.manual_seed(seed)
    enc = backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=10, num_heads=2)
    model = tiny(enc, seed=seed % 1000).to(device)
    rgb, depth = (t.to(device) for t in pair(seed % 1000 + 1, b=1))
    runs = {}
    for impl in ("reference", fused):
        model.set_impl(impl).zero_grad()
        with torch.no_grad():
            out = model.eval()(rgb, depth)
        loss = model.train().loss({"image": rgb, "depth": depth})
        loss["loss"].backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.grad is not None])
        runs[impl] = ({k: v for k, v in out.items() if k.startswith("anomaly_map")}, loss, grads)
    return runs


test_triton_model_matches_reference_under_interpreter, test_gpu_model_matches_reference = _interpreter.model_tests(
    __file__, _runs, maps=("anomaly_map", "anomaly_map_rgb", "anomaly_map_depth"))


if __name__ == "__main__":
    _interpreter.model_main(__file__, _runs)
