"""fastproto.ops.convert: another codebase's model with fastproto's modules swapped in.

The foreign modules below re-state the official Dinomaly / INP-Former / DINOv2 / timm modules from their maths
(../shared/notes/inp_dinomaly.md), with the official class and child names, as a user's model would have them.
"""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastproto import ops
from tests import _interpreter

DIM, HEADS, HIDDEN, M = 32, 4, 64, 3


class LinearAttention2(nn.Module):
    """Dinomaly's: elu+1 feature maps, ``z = 1 / (q . sum_s k_s)``, ``out = z (q kv)``, no eps; returns (out, kv)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5  # unused, as in the official module
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        kv = torch.einsum("...sd,...se->...de", k, v)
        z = 1.0 / torch.einsum("...sd,...d->...s", q, k.sum(dim=-2))
        out = torch.einsum("...de,...sd,...s->...se", kv, q, z)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C))), kv


class Prototype_Attention(nn.Module):  # noqa: N801 (the official name is what convert recognises)
    """INP-Former's: cosine of L2-normalised q and k times a per-head scale, ReLU, no softmax; returns (out, attn)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, y):
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        k, v = self.kv(y).reshape(B, y.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)
        attn = F.relu((F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.learn_scale)
        out = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    """DINOv2's / the decoders': ``drop(fc2(drop(gelu(fc1(x)))))``."""

    def __init__(self, in_features, hidden_features, drop=0.0, act=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class bMlp(Mlp):  # noqa: N801
    """Dinomaly's noisy bottleneck: the same dropout on the input too."""

    def forward(self, x):
        return super().forward(self.drop(x))


class _TimmMlp(nn.Module):
    """timm's layout: ``fc1, act, drop1, norm, fc2, drop2``."""

    def __init__(self, dim, hidden, drop1=0.0, drop2=0.0, norm=False):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(drop1)
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2, self.drop2 = nn.Linear(hidden, dim), nn.Dropout(drop2)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


_TimmMlp.__name__ = "Mlp"  # what a timm model's MLP is called


class Block(nn.Module):
    """Dinomaly's decoder block: ``x + attn(norm1(x))[0]``, ``x + mlp(norm2(x))`` (LayerNorm eps 1e-8)."""

    def __init__(self, attn, mlp):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM, eps=1e-8), attn
        self.norm2, self.mlp = nn.LayerNorm(DIM, eps=1e-8), mlp

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class Prototype_Block(Block):  # noqa: N801
    """INP-Former's decoder block: no attention residual, the same ``norm1`` on tokens and prototypes."""

    def forward(self, x, prototypes):
        x = self.attn(self.norm1(x), self.norm1(prototypes))[0]
        return x + self.mlp(self.norm2(x))


class ForeignModel(nn.Module):
    """A noisy bottleneck, two Dinomaly blocks, two INP-Former blocks (one with timm's MLP layout), a final norm."""

    def __init__(self, drop=0.2):
        super().__init__()
        self.bottleneck = nn.ModuleList([bMlp(DIM, HIDDEN, drop=drop)])
        self.prototype_token = nn.Parameter(torch.randn(M, DIM))
        self.decoder = nn.ModuleList([Block(LinearAttention2(DIM, HEADS, qkv_bias=True), Mlp(DIM, HIDDEN))
                                      for _ in range(2)])
        self.inp_decoder = nn.ModuleList([Prototype_Block(Prototype_Attention(DIM, HEADS, qkv_bias=True), mlp)
                                          for mlp in (Mlp(DIM, HIDDEN), _TimmMlp(DIM, HIDDEN))])
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x):
        x = self.bottleneck[0](x)
        for blk in self.decoder:
            x = blk(x)
        prototypes = self.prototype_token.unsqueeze(0).expand(x.shape[0], -1, -1)
        for blk in self.inp_decoder:
            x = blk(x, prototypes)
        return self.norm(x)


def foreign_model(seed, drop=0.2):
    torch.manual_seed(seed)
    model = ForeignModel(drop)
    with torch.no_grad():  # weights off their init, so that scales and biases matter
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


EXPECTED_TYPES = {
    "bottleneck.0": ops.Mlp, "decoder.0.attn": ops.LinearAttention, "decoder.1.mlp": ops.Mlp,
    "decoder.0.norm1": ops.LayerNorm, "inp_decoder.0.attn": ops.PrototypeAttention,
    "inp_decoder.1.mlp": ops.Mlp, "inp_decoder.1.norm2": ops.LayerNorm, "norm": ops.LayerNorm,
}


def _run(model, x, seed):
    """Output and parameter gradients of one training-mode pass (dropout drawn from ``seed``)."""
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------


def test_convert_swaps_the_recognised_modules_and_keeps_the_parameters():
    model = foreign_model(0)
    params = {n: p for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in this model is skipped
        assert ops.convert(model) is model
    named = dict(model.named_modules())
    for path, cls in EXPECTED_TYPES.items():
        assert type(named[path]) is cls, f"{path}: {type(named[path]).__name__}"
    assert not any(type(m).__name__ in ("LinearAttention2", "Prototype_Attention", "bMlp") or type(m) is nn.LayerNorm
                   for m in model.modules())
    assert named["bottleneck.0"].input_dropout and named["bottleneck.0"].drop.p == 0.2
    assert not named["decoder.0.mlp"].input_dropout
    # the very same parameter objects under the same names: optimizers and tied weights keep working
    assert {n: id(p) for n, p in model.named_parameters()} == {n: id(p) for n, p in params.items()}
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    model.load_state_dict(state, strict=True)
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on the meta device


def test_convert_is_idempotent_keeps_sharing_and_replaces_a_root():
    model = foreign_model(1)
    model.decoder[1].norm2 = model.decoder[0].norm2  # one module under two parents
    ops.convert(model)
    assert model.decoder[1].norm2 is model.decoder[0].norm2 and type(model.decoder[0].norm2) is ops.LayerNorm
    before = {n: id(m) for n, m in model.named_modules()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.convert(model)
    assert {n: id(m) for n, m in model.named_modules()} == before
    root = LinearAttention2(DIM, HEADS)
    new = ops.convert(root.eval(), impl="reference")
    assert type(new) is ops.LinearAttention and new.qkv is root.qkv and not new.training and new.impl == "reference"


def test_convert_leaves_what_it_cannot_reproduce_with_a_warning_naming_it():
    model = nn.Sequential(
        Mlp(DIM, HIDDEN, act=nn.GELU(approximate="tanh")),  # 0: another activation
        _TimmMlp(DIM, HIDDEN, drop1=0.1, drop2=0.2),  # 1: two dropout rates
        _TimmMlp(DIM, HIDDEN, norm=True),  # 2: normalised hidden features
        LinearAttention2(DIM, HEADS),  # 3: a hook on it
        nn.LayerNorm([4, DIM]),  # 4: normalises two dims
        Mlp(DIM, HIDDEN),  # 5: convertible
    )
    model[3].num_heads = 5  # does not divide 32
    model[3].register_forward_hook(lambda *args: None)
    with pytest.warns(RuntimeWarning) as record:
        ops.convert(model)
    messages = " | ".join(str(w.message) for w in record)
    for needle in ("left 0 (Mlp)", "not the exact nn.GELU()", "left 1 (Mlp)", "different rates [0.1, 0.2]",
                   "left 2 (Mlp)", "norm is not an Identity", "left 3 (LinearAttention2)", "hooks",
                   "left 4 (LayerNorm)", "over 2 dims"):
        assert needle in messages, f"{needle!r} not in {messages}"
    assert [type(m) for m in model][:5] == [Mlp, _TimmMlp, _TimmMlp, LinearAttention2, nn.LayerNorm]
    assert type(model[2].norm) is ops.LayerNorm  # its children are still converted
    assert type(model[5]) is ops.Mlp
    model[3]._forward_hooks.clear()
    with pytest.warns(RuntimeWarning) as record:
        ops.convert(model)
    assert any("left 3 (LinearAttention2) as it is: its num_heads=5 does not divide the width 32" in str(w.message)
               for w in record), [str(w.message) for w in record]


def test_convert_and_set_impl_errors():
    with pytest.raises(TypeError, match="convert: model must be an nn.Module, got dict"):
        ops.convert({})
    with pytest.raises(ValueError, match="convert: impl must be one of"):
        ops.convert(nn.LayerNorm(4), impl="fast")
    with pytest.raises(ValueError, match="set_impl: impl must be one of"):
        ops.set_impl(nn.Linear(2, 2), "gpu")


def test_set_impl_reaches_every_converted_module():
    model = ops.convert(foreign_model(2))
    ops.set_impl(model, "reference")
    impls = {n: m.impl for n, m in model.named_modules() if hasattr(m, "impl")}
    assert set(EXPECTED_TYPES) <= set(impls) and set(impls.values()) == {"reference"}


# ----------------------------------------------------------------------------------------------
# numerics (reference path here; the kernels under the interpreter below)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True])
def test_converted_model_computes_what_the_original_computes(training):
    seed = int.from_bytes(os.urandom(3), "little")
    original = foreign_model(seed % 1000).train(training)
    converted = ops.convert(copy.deepcopy(original), impl="reference")
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(seed))
    (o0, g0), (o1, g1) = _run(original, x, seed), _run(converted, x, seed)  # same dropout draws in training
    assert _rel(o1, o0) <= 1e-5, f"output rel err {_rel(o1, o0):.2e} (seed={seed})"
    for name in g0:
        assert _rel(g1[name], g0[name]) <= 1e-4, f"{name}: grad rel err {_rel(g1[name], g0[name]):.2e} (seed={seed})"


def test_converted_model_under_bf16_autocast_is_as_accurate_as_the_original():
    """The converted LayerNorms return the autocast dtype, and the converted model under bfloat16 autocast stays as
    close to the float32 original as the original itself does: the mean over 16 random models and inputs (one
    model's max error is noisy: its ReLU-cosine attention amplifies the rounding, so single ratios reach 2 either
    way; the means of 16 were within 0.76-1.11 of each other over 20 groups); no model above 0.25 (at most 0.08
    over 320)."""
    seed = int.from_bytes(os.urandom(3), "little")
    errs = []
    for i in range(16):
        original = foreign_model((seed + i) % 1000).eval()
        converted = ops.convert(copy.deepcopy(original))
        x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert original.norm(x).dtype == torch.float32 and converted.norm(x).dtype == torch.bfloat16
            o0, o1 = original(x), converted(x)
        with torch.no_grad():
            exact = original(x)
        errs.append((_rel(o1.float(), exact), _rel(o0.float(), exact)))
    converted_err, original_err = (sum(e) / len(errs) for e in zip(*errs))
    assert converted_err <= 1.25 * original_err, f"mean rel err {converted_err:.2e} vs {original_err:.2e} (seed={seed})"
    assert max(max(e) for e in errs) < 0.25, f"{errs} (seed={seed})"


def test_converting_a_fastproto_model_changes_nothing():
    from fastproto import backbones, models

    torch.manual_seed(0)
    enc = backbones.create("dinov2_vits14_reg", pretrained=False, embed_dim=32, depth=12, num_heads=2)
    model = models.create("inpformer", backbone=enc, pretrained=False, num_heads=2).eval()
    x = torch.randn(1, 3, 28, 28)
    modules = {n: id(m) for n, m in model.named_modules()}
    with torch.no_grad():
        before = model(x)["anomaly_map"]
        assert ops.convert(model) is model
        after = model(x)["anomaly_map"]
    assert torch.equal(before, after)
    assert {n: id(m) for n, m in model.named_modules()} == modules  # not even its plain nn.LayerNorms
    assert any(type(m) is nn.LayerNorm for m in model.modules())
    # a foreign model holding a fastproto module: the foreign parts are converted, the fastproto one left whole
    mixed = nn.Sequential(Mlp(DIM, HIDDEN), ops.LinearAttention(DIM, HEADS), nn.LayerNorm(DIM))
    mixed[1].add_module("extra_norm", nn.LayerNorm(DIM))
    ops.convert(mixed)
    assert [type(m) for m in mixed] == [ops.Mlp, ops.LinearAttention, ops.LayerNorm]
    assert type(mixed[1].extra_norm) is nn.LayerNorm


# ----------------------------------------------------------------------------------------------
# the kernels (Triton interpreter, subprocess)
# ----------------------------------------------------------------------------------------------


def _interpreter_main(seed: int) -> None:
    """Child: the converted model on the Triton kernels against the original, inference and a training pass."""
    original = foreign_model(seed % 1000, drop=0.0)
    converted = ops.convert(copy.deepcopy(original), impl="triton")
    x = torch.randn(2, 9, DIM, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        inference = _rel(converted.eval()(x), original.eval()(x))
    (o0, g0), (o1, g1) = _run(original.train(), x, seed), _run(converted.train(), x, seed)
    # impl="triton" on CPU tensors runs only when the kernels are interpreted (else it raises)
    _interpreter.emit({"inference": inference, "train_out": _rel(o1, o0), "grads": {n: _rel(g1[n], g0[n]) for n in g0}})


def test_converted_model_on_the_kernels_matches_the_original_under_interpreter():
    seed = int.from_bytes(os.urandom(3), "little")
    res = _interpreter.run(__file__, seed)  # skips without triton
    assert res["inference"] <= 1e-5 and res["train_out"] <= 1e-5, f"{res} (seed={seed})"
    bad = {n: e for n, e in res["grads"].items() if not e <= 1e-4}
    assert not bad, f"grad rel errors {bad} (seed={seed})"


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
