"""DPDiff-AD (fastproto.models.dpdiff): registry and configuration, the DDPM/DDIM maths against
float64 re-statements and an oracle noise predictor, the loss parts and their ops, determinism,
reference vs fused ops (Triton interpreter in a subprocess), bf16 autocast, checkpoints, and the
CNN token adapter. Tiny shapes throughout (random-weight DINOv2 with 32 channels, 4 x 4 tokens)."""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.nn.functional as F

from fastproto import backbones, models
from fastproto.models import dpdiff
from fastproto.models.dpdiff import ddim_sample, ddim_timesteps, linear_betas, q_sample, seeded_normal
from tests import _interpreter

SIDE = 56  # 4 x 4 patch grid (+ 5 prefix tokens)
TINY = {"depth": 2, "num_heads": 2}  # DiT depth 2, width 32, head dim 16


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=12, num_heads=2)


def tiny(encoder, **cfg):
    return models.create("dpdiff", backbone=encoder, **{**TINY, **cfg})


def images(seed, b=2, side=SIDE):
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize(model, seed):
    """Weights away from the adaLN-Zero init (which predicts eps = 0 and stops most gradients)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("encoder."):
            continue
        r = torch.randn(p.shape, generator=gen)
        p.copy_(r if name.endswith("_tokens") else r * p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.1 * r)
    return model


# ----------------------------------------------------------------------------------------------
# registry and configuration
# ----------------------------------------------------------------------------------------------


def test_registry_defaults_and_config_errors(encoder):
    assert "dpdiff" in models.list_models() and models.model_class("dpdiff") is dpdiff.DPDiffAD
    model = models.create("dpdiff", backbone=encoder, pretrained=False)
    assert model.layers == [6, 7, 8, 9, 10, 11]  # DINOv2 blocks 6..11
    assert (model.num_local, model.num_global, model.local_weight, model.global_weight) == (8, 2, 0.2, 0.001)
    assert model.num_timesteps == 1000 and model.timesteps == [400, 266, 133]
    assert len(model.dit.blocks) == 6 and model.dit.width == 32 and model.score_rule == "avgpool_max"
    assert model.optimizer_config() == {"name": "adam", "lr": 1e-4, "weight_decay": 0.0, "schedule": "constant"}
    assert model.training_config()["batch_size"] == 32
    assert tiny(encoder, optimizer={"lr": 3e-4}).optimizer_config()["lr"] == 3e-4
    with pytest.raises(TypeError, match="unknown option"):
        tiny(encoder, num_protos=3)
    with pytest.raises(TypeError, match="groups does not apply"):
        tiny(encoder, groups=[[0]])
    with pytest.raises(ValueError, match="noise_step"):
        tiny(encoder, noise_step=1000)
    with pytest.raises(ValueError, match="DDIM needs"):
        tiny(encoder, noise_step=1, ddim_steps=3)
    with pytest.raises(ValueError, match="not divisible"):
        tiny(encoder, num_heads=3)
    with pytest.raises(ValueError, match="layers 0..11"):
        tiny(encoder, layers=[12])
    assert model.sampling_draws == 1  # the paper's single noise draw
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="sampling_draws must be an int >= 1"):
            tiny(encoder, sampling_draws=bad)


# ----------------------------------------------------------------------------------------------
# diffusion maths
# ----------------------------------------------------------------------------------------------


def test_noise_schedule_against_float64_restatement(encoder):
    T = 1000
    betas = [1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)]
    cum, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        cum.append(prod)
    got = linear_betas()
    assert got.dtype == torch.float64 and got[0].item() == 1e-4 and got[-1].item() == pytest.approx(0.02, abs=1e-15)
    torch.testing.assert_close(got, torch.tensor(betas, dtype=torch.float64), atol=1e-15, rtol=0)
    model = tiny(encoder)
    want = torch.tensor(cum, dtype=torch.float64)
    torch.testing.assert_close(model.alphas_cumprod.double(), want, atol=0, rtol=1e-6)
    assert model.alphas_cumprod[400].item() == pytest.approx(cum[400], rel=1e-6)
    assert "alphas_cumprod" not in model.state_dict()  # derived from the config, not a weight


def test_q_sample_and_ddim_timesteps():
    a = linear_betas().neg().add(1).cumprod(0)
    x0, noise = torch.randn(3, 5, 4, dtype=torch.float64), torch.randn(3, 5, 4, dtype=torch.float64)
    t = torch.tensor([0, 400, 999])
    want = torch.stack([a[s].sqrt() * x0[i] + (1 - a[s]).sqrt() * noise[i] for i, s in enumerate(t.tolist())])
    torch.testing.assert_close(q_sample(x0, t, noise, a), want, atol=1e-14, rtol=0)
    assert ddim_timesteps(400, 3) == [400, 266, 133]
    assert ddim_timesteps(2, 3) == [2, 1, 0] and ddim_timesteps(7, 1) == [7]


def test_ddim_with_the_true_noise_recovers_x0():
    a = linear_betas().neg().add(1).cumprod(0)
    z0, noise = torch.randn(2, 9, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    z_t = q_sample(z0, 400, noise, a)
    seen = []

    def oracle(z, t):
        seen.append(t)
        return (z - a[t].sqrt() * z0) / (1 - a[t]).sqrt()

    torch.testing.assert_close(ddim_sample(oracle, z_t, [400, 266, 133], a), z0, atol=1e-12, rtol=0)
    assert seen == [400, 266, 133]
    # the eta = 0 update with a wrong prediction, re-stated: x0_hat, then the step to 266, ...
    wrong = torch.full_like(z0, 0.3)
    x = z_t
    for t, s in ((400, 266), (266, 133), (133, None)):
        x0_hat = (x - (1 - a[t]).sqrt() * wrong) / a[t].sqrt()
        x = x0_hat if s is None else a[s].sqrt() * x0_hat + (1 - a[s]).sqrt() * wrong
    got = ddim_sample(lambda z, t: wrong, z_t, [400, 266, 133], a)
    torch.testing.assert_close(got, x, atol=1e-12, rtol=0)
    assert (got - z0).abs().max() > 0.1


def test_model_with_an_oracle_denoiser_gives_a_zero_map(encoder, monkeypatch):
    """The whole inference path (seeded noising of tokens + prototypes, DDIM, error, map) is exact:
    a denoiser that returns the true noise reconstructs the features, so the map is 0."""
    model = randomize(tiny(encoder, sigma=None), 3).eval()
    x = images(3)
    with torch.no_grad():
        x0, _ = model.tokens(x)
        z0 = torch.cat([x0, *model.prototypes(x0)], dim=1)
    a = model.alphas_cumprod
    monkeypatch.setattr(model, "eps", lambda z, t, grid: (z - a[t].sqrt() * z0) / (1 - a[t]).sqrt())
    with torch.no_grad():
        out = model(x)
    assert out["anomaly_map"].abs().max() < 1e-8
    monkeypatch.undo()
    with torch.no_grad():
        assert model(x)["anomaly_map"].min() > 1e-3  # the untrained denoiser does not reconstruct


def test_untrained_dit_predicts_zero_noise(encoder):
    model = tiny(encoder)  # adaLN-Zero: modulation and output layers start at 0
    z = torch.randn(2, 16 + 10, 32)
    assert model.eps(z, 400, (4, 4)).abs().max() == 0
    with pytest.raises(ValueError, match="4x4 tokens"):
        model.eps(z[:, 1:], 400, (4, 4))


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


def test_eval_outputs_and_score_rule(encoder):
    model = randomize(tiny(encoder), 1).eval()
    with torch.no_grad():
        out = model(images(1, b=3))
    assert set(out) == {"anomaly_map", "score"}
    amap = out["anomaly_map"]
    assert amap.shape == (3, SIDE, SIDE) and amap.dtype == torch.float32 and torch.isfinite(amap).all()
    want = F.avg_pool2d(amap.unsqueeze(1), 16, stride=1).flatten(1).max(1).values
    torch.testing.assert_close(out["score"], want)
    sized = randomize(tiny(encoder, output_size=32, score_rule="max"), 1).eval()
    with torch.no_grad():
        out = sized(images(1, b=2))
    assert out["anomaly_map"].shape == (2, 32, 32)
    torch.testing.assert_close(out["score"], out["anomaly_map"].flatten(1).max(1).values)
    with torch.no_grad():  # non-square: 4 x 6 tokens
        out = sized(torch.randn(1, 3, SIDE, 84))
    assert out["anomaly_map"].shape == (1, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, SIDE, 84))["anomaly_map"].shape == (1, SIDE, 84)


@pytest.mark.parametrize("draws", [1, 3])
def test_map_is_the_upsampled_blurred_token_error(encoder, draws):
    """The map re-stated from the pieces: draw k noises ``[x0; prototypes]`` with block k of the seeded stream,
    DDIM back to x̂0, the token errors averaged over the draws, upsampled and blurred."""
    model = randomize(tiny(encoder, sampling_draws=draws), 2).eval()
    x = images(2)
    with torch.no_grad():
        x0, grid = model.tokens(x)
        z0 = torch.cat([x0, *model.prototypes(x0)], dim=1)
        hats = []
        for k in range(draws):
            noise = seeded_normal((1, *z0.shape[1:]), model.sampling_seed, offset=k * z0[0].numel()).expand_as(z0)
            z_t = q_sample(z0, model.noise_step, noise, model.alphas_cumprod)
            z_hat = ddim_sample(lambda z, t: model.eps(z, t, grid), z_t, model.timesteps, model.alphas_cumprod)
            hats.append(z_hat[:, :x0.shape[1]])
        amap = model(x)["anomaly_map"]
    assert all(not torch.equal(hats[0], h) for h in hats[1:])  # each draw its own noise
    err = sum((h - x0).pow(2).sum(-1) for h in hats).reshape(2, 1, 4, 4) / draws
    up = F.interpolate(err, size=(SIDE, SIDE), mode="bilinear", align_corners=True)
    g = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * 4.0 ** 2))
    kernel = torch.outer(g, g) / torch.outer(g, g).sum()
    want = F.conv2d(up, kernel[None, None], padding=2)[:, 0]
    torch.testing.assert_close(amap, want, atol=1e-4, rtol=1e-5)


def test_inference_is_deterministic_under_the_seed(encoder):
    model = randomize(tiny(encoder), 4).eval()
    x = images(4)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(x)["anomaly_map"]
        torch.manual_seed(2)  # the global RNG does not matter
        second = model(x)["anomaly_map"]
        model.sampling_seed = 1
        other = model(x)["anomaly_map"]
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert not torch.allclose(first, other)
    # an image's map does not depend on its batch or its place in it
    with torch.no_grad():
        model.sampling_seed = 0
        alone = torch.cat([model(x[i:i + 1])["anomaly_map"] for i in range(x.shape[0])])
        flipped = model(x.flip(0))["anomaly_map"].flip(0)
    torch.testing.assert_close(alone, first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flipped, first, atol=1e-5, rtol=1e-5)


def _lowbias32(x: int) -> int:
    """The 32-bit mixer re-stated on Python integers (C. Wellons' published constants)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_seeded_normal_is_a_counter_based_standard_normal():
    import math

    import numpy as np
    from scipy import stats

    seed = int.from_bytes(os.urandom(4), "little")
    # the integer hash equals the Python re-statement bit for bit (int64 tensors, no overflow)
    xs = np.random.default_rng(seed).integers(0, 2 ** 32, 2000).tolist() + [0, 1, 2 ** 32 - 1]
    assert dpdiff._hash32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_lowbias32(x) for x in xs], f"seed={seed}"
    # the first elements against a Python re-statement of the whole draw
    key = _lowbias32(seed & 0xFFFFFFFF)
    u = [((_lowbias32(_lowbias32(c) ^ key) >> 9) + 0.5) / 2 ** 23 for c in range(16)]
    want = [math.sqrt(-2 * math.log(u[2 * i])) * math.cos(2 * math.pi * u[2 * i + 1]) for i in range(8)]
    got = seeded_normal((2, 4), seed)
    assert got.shape == (2, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.flatten().double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    # a pure function of (seed, index): a longer draw starts with the shorter one; bfloat16 is the rounded float32
    assert torch.equal(seeded_normal((3, 1000), seed).flatten()[:8], got.flatten())
    assert torch.equal(seeded_normal((8,), seed, dtype=torch.bfloat16), got.flatten().bfloat16())
    # standard normal, no correlation between neighbours or between seeds (n = 200k: null sd of each ~0.0022)
    z, other = (seeded_normal((200_000,), s).double().numpy() for s in (seed, seed + 1))
    assert abs(z.mean()) < 0.015 and abs(z.std() - 1) < 0.015, f"seed={seed}: {z.mean()}, {z.std()}"
    assert stats.kstest(z, "norm").pvalue > 1e-6, f"seed={seed}"
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.015 and abs(np.corrcoef(z, other)[0, 1]) < 0.015, f"seed={seed}"


def test_cross_attention_goes_through_the_softmax_prototype_op(encoder, monkeypatch):
    model = randomize(tiny(encoder), 5).eval()
    calls = []
    real = dpdiff.prototype_attention

    def spy(q, k, v, **kw):
        calls.append((kw["kind"], tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(dpdiff, "prototype_attention", spy)
    with torch.no_grad():
        model(images(5))
    # 3 DDIM steps x 2 blocks; 16 token queries to 8 + 2 per-sample prototypes, 2 heads of 16
    assert calls == [("softmax", (2, 2, 16, 16), (2, 2, 10, 16))] * 6


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------


def test_loss_parts(encoder, monkeypatch, rng):
    seed = int(rng.integers(1 << 30))
    model = randomize(tiny(encoder, ot_eps=0.1), seed).train()
    assert not model.encoder.training
    ot_calls = []
    real_ot = dpdiff.ot_alignment_loss

    def ot_spy(x, p, **kw):
        ot_calls.append(kw)
        return real_ot(x, p, **kw)

    monkeypatch.setattr(dpdiff, "ot_alignment_loss", ot_spy)
    x = images(seed)
    out = model.loss({"image": x, "label": torch.zeros(2)})
    assert set(out) == {"loss", "diff", "local", "global"}
    assert out["loss"].requires_grad and all(not out[k].requires_grad for k in ("diff", "local", "global"))
    assert all(torch.isfinite(v) for v in out.values())
    assert ot_calls == [{"eps": 0.1, "normalize": True, "n_iters": 100, "impl": "auto"}]
    with torch.no_grad():
        x0, _ = model.tokens(x)
        local, glob = model.prototypes(x0)
        cos = F.cosine_similarity(x0.unsqueeze(2), local.unsqueeze(1), dim=-1)  # [B, N, M]
        want_local = (1 - cos).min(-1).values.mean()
        want_global = real_ot(x0, glob, eps=0.1, normalize=True, impl="reference")
    torch.testing.assert_close(out["local"], want_local, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["global"], want_global, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"].detach(), out["diff"] + 0.2 * out["local"] + 0.001 * out["global"])
    # the diffusion part: eps-MSE over tokens and prototypes noised together, re-stated with the same draws
    torch.manual_seed(seed)
    out = model.loss(x)
    torch.manual_seed(seed)
    t = torch.randint(0, 1000, (2,))
    z0 = torch.cat([x0, local, glob], dim=1)
    noise = torch.randn_like(z0)
    a = model.alphas_cumprod[t].view(2, 1, 1)
    with torch.no_grad():
        pred = model.dit(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, (4, 4))
    torch.testing.assert_close(out["diff"], (pred - noise).pow(2).mean(), atol=1e-6, rtol=1e-5)


def test_backward_reaches_exactly_the_trainable_parameters(encoder):
    model = randomize(tiny(encoder), 6).train()
    model.loss(images(6))["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    trainable = model.trainable_parameters()
    assert {id(p) for p in trainable} == {id(p) for n, p in model.named_parameters() if not n.startswith("encoder.")}
    missing = [n for n, p in model.named_parameters() if not n.startswith("encoder.")
               and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []
    with pytest.raises(TypeError, match="batch must be"):
        model.loss("images")


def test_reference_switch_gives_the_same_maps_losses_and_grads(encoder, rng):
    seed = int(rng.integers(1 << 30))
    x = images(seed)
    results = []
    for reference in (False, True):
        torch.manual_seed(seed)
        model = randomize(models.create("dpdiff", backbone=encoder, reference=reference, **TINY), seed)
        impls = {m.impl for m in model.modules() if isinstance(getattr(m, "impl", None), str)}
        assert impls == {"reference" if reference else "auto"}
        with torch.no_grad():
            amap = model.eval()(x)["anomaly_map"]
        torch.manual_seed(seed)
        loss = model.train().loss(x)
        loss["loss"].backward()
        results.append((amap, loss["loss"].detach(), [p.grad.clone() for p in model.trainable_parameters()]))
    (m0, l0, g0), (m1, l1, g1) = results
    torch.testing.assert_close(m0, m1, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    model.set_impl("auto")
    assert model.dit.blocks[0].cross_attn.impl == "auto"
    with pytest.raises(ValueError, match="impl must be one of"):
        model.set_impl("fast")


def test_bf16_autocast(encoder):
    model = randomize(tiny(encoder), 7).eval()
    x = images(7)
    with torch.no_grad():
        want = model(x)["anomaly_map"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)["anomaly_map"]
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.train().loss(x)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())


def test_state_dict_round_trip(encoder, tmp_path):
    src = randomize(tiny(encoder), 8).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert {"local_tokens", "global_tokens", "dit.proto_embed", "dit.blocks.1.cross_attn.kv.weight"} <= set(sd)
    dst = tiny(encoder).eval()
    dst.load_official({"module." + k: v for k, v in sd.items()})
    x = images(8)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)["anomaly_map"], src(x)["anomaly_map"], atol=0, rtol=0)
    bad = dict(sd)
    bad.pop("dit.head.weight")
    with pytest.raises(RuntimeError, match=r"missing keys: dit\.head\.weight"):
        dst.load_official(bad)


def test_cnn_token_adapter():
    if "efficientnet_lite0" not in backbones.list_backbones():
        pytest.skip("efficientnet_lite0 backbone not available")
    enc = backbones.create("efficientnet_lite0", pretrained=False, embed_dim=32)
    assert enc.num_prefix_tokens == 0 and enc.num_layers == 8
    model = tiny(enc, score_pool_size=4).eval()
    assert model.layers == [4, 5, 6, 7]  # the deeper half of the 8 taps
    side = 4 * enc.patch_size
    with torch.no_grad():
        out = model(images(9, side=side))
    assert out["anomaly_map"].shape == (2, side, side) and torch.isfinite(out["score"]).all()
    model.train().loss(images(10, side=side))["loss"].backward()


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter, subprocess): fused vs reference model end to end
# ----------------------------------------------------------------------------------------------


def _runs(seed: int, device: str = "cpu", fused: str = "triton") -> dict:
    """The model with impl=``fused`` vs "reference": maps, loss parts and gradients."""
    torch.manual_seed(seed)
    enc = backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=4, num_heads=2)
    model = randomize(models.create("dpdiff", backbone=enc, depth=2, num_heads=2, score_pool_size=4), 1).to(device)
    x = images(0, b=1, side=28).to(device)
    runs = {}
    for impl in ("reference", fused):
        model.set_impl(impl).zero_grad()
        with torch.no_grad():
            amap = model.eval()(x)["anomaly_map"]
        torch.manual_seed(1)
        loss = model.train().loss(x)
        loss["loss"].backward()
        runs[impl] = (amap, loss, torch.cat([p.grad.flatten() for p in model.trainable_parameters()]))
    return runs


test_triton_model_matches_reference_under_interpreter, test_gpu_model_matches_reference = _interpreter.model_tests(
    __file__, _runs)


if __name__ == "__main__":
    _interpreter.model_main(__file__, _runs)
