"""Tests of the anomaly-map ops (fastproto.ops.anomaly_map / gaussian_blur / image_score).

- reference vs an independent float64 NumPy/SciPy re-statement (explicit cosine, explicit bilinear
  formulas, explicit Gaussian + scipy.ndimage.convolve with zero padding, explicit top-k / avg-pool);
- Triton vs reference under the Triton interpreter, run in a subprocess with TRITON_INTERPRET=1 set
  before triton is imported (this file is the subprocess script, see ``__main__``), with every
  buffer the Triton path allocates poisoned with NaN;
- a GPU test at the real INP-Former/Dinomaly shapes (marked ``gpu``).

Inputs are fresh random draws every run; the seed is in every assertion message and
FASTPROTO_TEST_SEED=<seed> replays a run. Strided inputs are views into NaN-filled storage, so a
read outside the view poisons the result.
"""
from __future__ import annotations

import importlib
import math
import os
import secrets

import numpy as np
import pytest
import scipy.ndimage
import torch

from tests import _interpreter
from fastproto import triton as _triton_pkg  # noqa: E402  (POISON_OUTPUTS switch)
from fastproto.ops import anomaly_map, gaussian_blur, image_score

ref = importlib.import_module("fastproto.reference.anomaly_map")

EPS = 1e-8


def _new_seed() -> int:
    env = os.environ.get("FASTPROTO_TEST_SEED")
    return int(env) if env else secrets.randbits(32)


@pytest.fixture
def seed() -> int:
    s = _new_seed()
    print(f"seed={s}")
    return s


# ----------------------------------------------------------------------------------------------
# independent float64 re-statement
# ----------------------------------------------------------------------------------------------


def np_bchw(x: torch.Tensor) -> np.ndarray:
    a = x.detach().to(torch.float64).cpu().numpy()
    if a.ndim == 3:  # tokens [B, N, C] -> [B, C, s, s]
        b, n, c = a.shape
        s = int(round(math.sqrt(n)))
        a = a.reshape(b, s, s, c).transpose(0, 3, 1, 2)
    return a


def np_cos_dist(e: np.ndarray, d: np.ndarray) -> np.ndarray:
    dot = np.einsum("bchw,bchw->bhw", e, d)
    ne = np.sqrt(np.einsum("bchw,bchw->bhw", e, e))
    nd = np.sqrt(np.einsum("bchw,bchw->bhw", d, d))
    return 1.0 - dot / (np.maximum(ne, EPS) * np.maximum(nd, EPS))


def _src_coords(n_in: int, n_out: int, align_corners: bool):
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
        src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(n_out)
    else:
        src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam


def np_bilinear(m: np.ndarray, size, align_corners: bool) -> np.ndarray:
    """[B, h, w] -> [B, H, W] bilinear with the PyTorch coordinate conventions."""
    _, h, w = m.shape
    y0, y1, ly = _src_coords(h, size[0], align_corners)
    x0, x1, lx = _src_coords(w, size[1], align_corners)
    ly = ly[None, :, None]
    lx = lx[None, None, :]
    top = m[:, y0][:, :, x0] * (1 - lx) + m[:, y0][:, :, x1] * lx
    bot = m[:, y1][:, :, x0] * (1 - lx) + m[:, y1][:, :, x1] * lx
    return top * (1 - ly) + bot * ly


def np_gauss2d(sigma: float, ks: int) -> np.ndarray:
    c = (ks - 1) / 2.0
    i = np.arange(ks, dtype=np.float64) - c
    g = np.exp(-(i[:, None] ** 2 + i[None, :] ** 2) / (2.0 * sigma ** 2))
    return g / g.sum()


def np_blur(m: np.ndarray, sigma: float, ks: int) -> np.ndarray:
    k = np_gauss2d(sigma, ks)
    return np.stack([scipy.ndimage.convolve(x, k, mode="constant", cval=0.0) for x in m])


def np_anomaly_map(enc, dec, out_size, groups=None, sigma=4.0, kernel_size=5, eval_size=None):
    enc = [np_bchw(t) for t in enc]
    dec = [np_bchw(t) for t in dec]
    if groups is not None:
        enc = [np.mean([enc[i] for i in g], axis=0) for g in groups]
        dec = [np.mean([dec[i] for i in g], axis=0) for g in groups]
    if out_size is None:
        out_size = (max(e.shape[2] for e in enc), max(e.shape[3] for e in enc))
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    ups = [np_bilinear(np_cos_dist(e, d), out_size, True) for e, d in zip(enc, dec)]
    m = np.mean(ups, axis=0)
    if eval_size is not None:
        if isinstance(eval_size, int):
            eval_size = (eval_size, eval_size)
        m = np_bilinear(m, eval_size, False)
    if sigma is not None:
        m = np_blur(m, sigma, kernel_size)
    return m


# ----------------------------------------------------------------------------------------------
# inputs: strided views into NaN-poisoned storage
# ----------------------------------------------------------------------------------------------


def _randn(rng, shape, dtype=torch.float32):
    return torch.from_numpy(rng.standard_normal(shape)).to(dtype)


def embed(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Return a view equal to ``x`` whose storage holds NaN everywhere outside the view."""
    nan = float("nan")
    if layout == "contiguous":
        return x.contiguous()
    if x.dim() == 4:
        b, c, h, w = x.shape
        if layout == "padded":  # NCHW with gaps in every dimension
            buf = torch.full((b, c + 2, h + 1, w + 3), nan, dtype=x.dtype)
            v = buf[:, 1:c + 1, :h, 2:w + 2]
        elif layout == "channels_last":  # channels contiguous, padded
            buf = torch.full((b, h, w, c + 3), nan, dtype=x.dtype)
            v = buf[..., :c].permute(0, 3, 1, 2)
        elif layout == "hw_swapped":  # spatial dims transposed in memory
            buf = torch.full((b, c, w, h), nan, dtype=x.dtype)
            v = buf.transpose(2, 3)
        else:
            raise ValueError(layout)
    elif x.dim() == 3:
        b, n, c = x.shape
        if layout == "prefix":  # ViT tokens with the class + 4 register tokens sliced off
            buf = torch.full((b, n + 5, c), nan, dtype=x.dtype)
            v = buf[:, 5:]
        elif layout == "transposed":  # [B, C, N] storage viewed as [B, N, C]
            buf = torch.full((b, c, n), nan, dtype=x.dtype)
            v = buf.transpose(1, 2)
        else:
            raise ValueError(layout)
    else:
        raise ValueError(x.dim())
    v.copy_(x)
    return v


def _pairs(rng, shapes, layouts=("contiguous",), dtype=torch.float32, close=0.3, dtypes_dec=None):
    """Encoder/decoder lists; the decoder is the encoder plus noise (AD-like distances)."""
    enc, dec = [], []
    for i, shape in enumerate(shapes):
        e = _randn(rng, shape)
        d = e + close * _randn(rng, shape) if close is not None else _randn(rng, shape)
        lay = layouts[i % len(layouts)]
        enc.append(embed(e.to(dtype), lay))
        dec.append(embed(d.to(dtypes_dec or dtype), lay))
    return enc, dec


def make_case(name: str, rng):
    """Named input cases shared by the reference tests and the Triton subprocess.

    Returns ("map", enc, dec, kwargs) or ("blur", maps, kwargs)."""
    if name == "nchw_basic":
        e, d = _pairs(rng, [(2, 16, 7, 7)] * 2)
        return "map", e, d, dict(out_size=20)
    if name == "tokens_prefix":
        e, d = _pairs(rng, [(2, 36, 24)] * 2, layouts=("prefix",))
        return "map", e, d, dict(out_size=(16, 16))
    if name == "tokens_transposed_mixed_dtype":
        e, d = _pairs(rng, [(2, 25, 12)] * 2, layouts=("transposed",), dtypes_dec=torch.float16)
        return "map", e, d, dict(out_size=11)
    if name == "groups":
        e, d = _pairs(rng, [(2, 12, 6, 6)] * 4, layouts=("padded", "channels_last"))
        return "map", e, d, dict(out_size=(12, 18), groups=[[0, 1], [2, 3]])
    if name == "groups_uneven_and_eval":
        e, d = _pairs(rng, [(2, 10, 5, 5)] * 5)
        return "map", e, d, dict(out_size=24, groups=[[0, 1, 2], [3], [4, 1]], eval_size=15)
    if name == "groups_big_and_mixed_strides":  # > 8 members and members with different strides
        e, d = _pairs(rng, [(1, 6, 4, 4)] * 10, layouts=("contiguous", "padded"))
        return "map", e, d, dict(out_size=9, groups=[list(range(10)), [0, 2, 4]])
    if name == "eval_upsample":
        e, d = _pairs(rng, [(2, 8, 4, 5)] * 2, layouts=("hw_swapped",))
        return "map", e, d, dict(out_size=10, eval_size=(17, 13))
    if name == "multiscale":
        e, d = _pairs(rng, [(2, 8, 8, 8), (2, 16, 4, 4), (2, 32, 2, 2)], layouts=("channels_last", "padded"))
        return "map", e, d, dict(out_size=16)
    if name == "one_by_one":
        e, d = _pairs(rng, [(2, 5, 1, 1)] * 2)
        return "map", e, d, dict(out_size=5)
    if name == "one_by_one_to_one":
        e, d = _pairs(rng, [(3, 4, 1, 1)], close=None)
        return "map", e, d, dict(out_size=1)
    if name == "out_equals_feature":
        e, d = _pairs(rng, [(2, 9, 7, 9)] * 2, layouts=("padded",))
        return "map", e, d, dict(out_size=None)
    if name == "batch_one":
        e, d = _pairs(rng, [(1, 16, 5, 5)], layouts=("channels_last",))
        return "map", e, d, dict(out_size=13)
    if name == "fp16":
        e, d = _pairs(rng, [(2, 16, 6, 6)] * 2, dtype=torch.float16, layouts=("padded",))
        return "map", e, d, dict(out_size=14)
    if name == "bf16_tokens":
        e, d = _pairs(rng, [(2, 16, 20)] * 2, dtype=torch.bfloat16, layouts=("prefix",))
        return "map", e, d, dict(out_size=12, groups=[[0, 1]])
    if name == "no_blur":
        e, d = _pairs(rng, [(2, 8, 5, 5)] * 2)
        return "map", e, d, dict(out_size=12, sigma=None)
    if name == "ks3_sigma1":
        e, d = _pairs(rng, [(2, 8, 5, 5)] * 2)
        return "map", e, d, dict(out_size=12, sigma=1.0, kernel_size=3)
    if name == "ks7_small_map":  # kernel larger than the map
        e, d = _pairs(rng, [(2, 8, 2, 3)])
        return "map", e, d, dict(out_size=(3, 4), sigma=2.5, kernel_size=7)
    if name == "zero_vectors":  # eps clamping: zero features give cos = 0, d = 1
        e, d = _pairs(rng, [(2, 6, 4, 4)])
        e[0][0, :, 1, 2] = 0
        d[0][1, :, 0, 0] = 0
        return "map", e, d, dict(out_size=6)
    if name == "blur_bhw":
        return "blur", embed(_randn(rng, (3, 1, 11, 13)), "padded")[:, 0], dict()
    if name == "blur_b1hw_transposed":
        return "blur", embed(_randn(rng, (2, 1, 9, 12)), "hw_swapped"), dict(sigma=1.5, kernel_size=3)
    if name == "blur_fp16":
        return "blur", _randn(rng, (2, 7, 10), torch.float16), dict()
    if name == "blur_bf16_ks9":
        return "blur", _randn(rng, (1, 12, 8), torch.bfloat16), dict(sigma=3.0, kernel_size=9)
    raise KeyError(name)


MAP_CASES = [
    "nchw_basic", "tokens_prefix", "tokens_transposed_mixed_dtype", "groups", "groups_uneven_and_eval",
    "groups_big_and_mixed_strides", "eval_upsample", "multiscale", "one_by_one", "one_by_one_to_one",
    "out_equals_feature", "batch_one", "fp16", "bf16_tokens", "no_blur", "ks3_sigma1", "ks7_small_map",
    "zero_vectors",
]
BLUR_CASES = ["blur_bhw", "blur_b1hw_transposed", "blur_fp16", "blur_bf16_ks9"]


def _expected(case):
    if case[0] == "map":
        _, enc, dec, kw = case
        return np_anomaly_map(enc, dec, **kw)
    _, maps, kw = case
    m = maps.detach().to(torch.float64).numpy()
    squeeze = m.ndim == 4
    m = m[:, 0] if squeeze else m
    out = np_blur(m, kw.get("sigma", 4.0), kw.get("kernel_size", 5))
    return out[:, None] if squeeze else out


def _run(case, impl):
    if case[0] == "map":
        _, enc, dec, kw = case
        return anomaly_map(enc, dec, impl=impl, **kw)
    _, maps, kw = case
    return gaussian_blur(maps, impl=impl, **kw)


def _assert_close(actual, expected, *, seed, what, atol=2e-6, rtol=2e-6):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} (seed={seed})"
    assert np.isfinite(actual).all(), f"{what}: non-finite values in the result (seed={seed})"
    err = np.abs(actual - expected)
    bad = err > atol + rtol * np.abs(expected)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} values off, max abs err {err.max():.3e} (seed={seed}; replay "
        f"with FASTPROTO_TEST_SEED={seed})"
    )


# ----------------------------------------------------------------------------------------------
# reference vs NumPy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAP_CASES + BLUR_CASES)
def test_reference_matches_numpy(name, seed):
    case = make_case(name, np.random.default_rng(seed))
    out = _run(case, "reference")
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype} (seed={seed})"
    _assert_close(out.numpy(), _expected(case), seed=seed, what=f"reference {name}", atol=5e-6, rtol=5e-6)


def test_auto_on_cpu_is_reference(seed):
    case = make_case("groups_uneven_and_eval", np.random.default_rng(seed))
    _, enc, dec, kw = case
    a = anomaly_map(enc, dec, **kw)
    r = anomaly_map(enc, dec, impl="reference", **kw)
    assert torch.equal(a, r), f"impl='auto' on CPU differs from the reference (seed={seed})"


def test_official_protocol_shapes(seed):
    """Dinomaly/INP-Former protocol: 8 tapped layers, groups 2-5 / 6-9, 28x28 tokens -> 392 -> 256."""
    rng = np.random.default_rng(seed)
    enc, dec = _pairs(rng, [(1, 784, 8)] * 8, layouts=("prefix",))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    out = anomaly_map(enc, dec, 392, groups=groups, eval_size=256)
    assert out.shape == (1, 256, 256) and out.dtype == torch.float32
    _assert_close(out.numpy(), np_anomaly_map(enc, dec, 392, groups=groups, eval_size=256),
                  seed=seed, what="official protocol", atol=5e-6, rtol=5e-6)


def test_zero_features_give_distance_one():
    z = torch.zeros(1, 4, 3, 3)
    out = anomaly_map([z], [torch.ones(1, 4, 3, 3)], sigma=None)
    assert torch.equal(out, torch.ones(1, 3, 3))


def test_gaussian_kernel_matches_official_values():
    # the 1-D factor quoted from Dinomaly's 5x5 sigma=4 kernel: [0.1876, 0.2061, 0.2126, 0.2061, 0.1876]
    k = ref.gaussian_kernel2d(4.0, 5).double()
    assert abs(float(k.sum()) - 1.0) < 1e-6
    row = k.sum(dim=0).numpy()
    np.testing.assert_allclose(row, [0.1876, 0.2061, 0.2126, 0.2061, 0.1876], atol=1e-4)
    np.testing.assert_allclose(k.numpy(), np_gauss2d(4.0, 5), atol=1e-7)


def test_gaussian_blur_float64_stays_float64(seed):
    m = _randn(np.random.default_rng(seed), (2, 1, 6, 7), torch.float64)
    out = gaussian_blur(m)
    assert out.dtype == torch.float64 and out.shape == m.shape
    _assert_close(out.numpy()[:, 0], np_blur(m.numpy()[:, 0], 4.0, 5), seed=seed, what="fp64 blur",
                  atol=1e-12, rtol=1e-12)


def test_reference_is_differentiable_and_auto_keeps_grad(seed):
    rng = np.random.default_rng(seed)
    e = _randn(rng, (1, 4, 3, 3))
    d = _randn(rng, (1, 4, 3, 3)).requires_grad_(True)
    out = anomaly_map([e], [d], 6)  # auto -> reference, differentiable
    out.sum().backward()
    assert d.grad is not None and torch.isfinite(d.grad).all(), f"seed={seed}"


# ----------------------------------------------------------------------------------------------
# image scores vs NumPy
# ----------------------------------------------------------------------------------------------


def test_image_score_max(seed):
    m = _randn(np.random.default_rng(seed), (4, 1, 9, 11))
    got = image_score(m, "max")
    _assert_close(got.numpy(), m.numpy().reshape(4, -1).max(axis=1), seed=seed, what="max", atol=0, rtol=0)


@pytest.mark.parametrize("shape,topk", [((3, 10, 10), 0.037), ((2, 256, 256), 0.01), ((2, 7, 9), 1.0),
                                        ((2, 1, 20, 30), 0.5)])
def test_image_score_topk_mean_dinomaly_rounding(shape, topk, seed):
    m = _randn(np.random.default_rng(seed), shape)
    flat = m.numpy().reshape(shape[0], -1).astype(np.float64)
    n = flat.shape[1]
    k = int(n * topk)  # Dinomaly: sort descending, keep the first int(N * max_ratio)
    want = np.sort(flat, axis=1)[:, ::-1][:, :k].mean(axis=1)
    got = image_score(m, "topk_mean", topk=topk)
    assert got.shape == (shape[0],) and got.dtype == torch.float32
    _assert_close(got.numpy(), want, seed=seed, what=f"topk_mean k={k}", atol=1e-6, rtol=1e-6)
    if shape[-2:] == (256, 256):
        assert k == 655
    if 1 < k < n:  # the count matters: k+1 values give a different score
        other = np.sort(flat, axis=1)[:, ::-1][:, :k + 1].mean(axis=1)
        assert np.abs(other - want).max() > 1e-6


@pytest.mark.parametrize("shape,pool", [((3, 40, 50), 16), ((2, 1, 16, 16), 16), ((2, 9, 12), (3, 5)),
                                        ((1, 5, 5), 1)])
def test_image_score_avgpool_max_ader(shape, pool, seed):
    m = _randn(np.random.default_rng(seed), shape)
    a = m.numpy().astype(np.float64)
    a = a[:, 0] if a.ndim == 4 else a
    ph, pw = (pool, pool) if isinstance(pool, int) else pool
    win = np.lib.stride_tricks.sliding_window_view(a, (ph, pw), axis=(1, 2))  # stride 1, no padding
    want = win.mean(axis=(-2, -1)).max(axis=(1, 2))
    got = image_score(m, "avgpool_max", pool_size=pool)
    _assert_close(got.numpy(), want, seed=seed, what=f"avgpool_max {pool}", atol=1e-6, rtol=1e-6)


def test_image_score_half_input_and_empty_batch():
    m = torch.rand(2, 8, 8, dtype=torch.float16)
    assert image_score(m).dtype == torch.float32
    assert image_score(torch.zeros(0, 8, 8), "topk_mean", topk=0.5).shape == (0,)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------


def _feat(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(enc=[_feat(1, 4, 3, 3)] * 2, dec=[_feat(1, 4, 3, 3)]), ValueError, "encoder_features has 2"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 4)]), ValueError, r"decoder_features\[0\] has shape"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 5, 3, 3)]), ValueError, "shape"),
        (dict(enc=[_feat(1, 4, 3, 3), _feat(2, 4, 3, 3)], dec=[_feat(1, 4, 3, 3), _feat(2, 4, 3, 3)]),
         ValueError, "batch size"),
        (dict(enc=[torch.ones(1, 4, 3, 3, dtype=torch.int64)], dec=[torch.ones(1, 4, 3, 3, dtype=torch.int64)]),
         TypeError, r"encoder_features\[0\] must have a floating dtype"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[torch.ones(1, 4, 3, 3, dtype=torch.bool)]), TypeError,
         r"decoder_features\[0\] must have a floating dtype"),
        (dict(enc=[_feat(1, 789, 8)], dec=[_feat(1, 789, 8)]), ValueError, "not a square grid"),
        (dict(enc=[_feat(4, 3)], dec=[_feat(4, 3)]), ValueError, r"\[B, C, h, w\]"),
        (dict(enc=[], dec=[]), ValueError, "encoder_features is empty"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[None]), TypeError, r"decoder_features\[0\] must be a torch.Tensor"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], groups=[[0, 1]]), ValueError, r"groups\[0\]"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], groups=[[]]), ValueError, r"groups\[0\]"),
        (dict(enc=[_feat(1, 4, 3, 3), _feat(1, 4, 2, 2)], dec=[_feat(1, 4, 3, 3), _feat(1, 4, 2, 2)],
              groups=[[0, 1]]), ValueError, "different shapes"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], out_size=0), ValueError, "out_size"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], out_size=(3, 3, 3)), ValueError, "out_size"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], eval_size=-1), ValueError, "eval_size"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], sigma=0.0), ValueError, "sigma"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], sigma=float("nan")), ValueError, "sigma"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], kernel_size=4), ValueError, "kernel_size"),
        (dict(enc=[_feat(1, 4, 3, 3)], dec=[_feat(1, 4, 3, 3)], impl="cuda"), ValueError, "impl"),
    ],
)
def test_anomaly_map_errors(kwargs, exc, match):
    kwargs = dict(kwargs)
    enc, dec = kwargs.pop("enc"), kwargs.pop("dec")
    with pytest.raises(exc, match=match):
        anomaly_map(enc, dec, **kwargs)


def test_triton_on_cpu_without_interpreter_is_an_error():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    x = torch.randn(1, 4, 3, 3)
    with pytest.raises(RuntimeError, match="needs CUDA tensors|cannot be imported"):
        anomaly_map([x], [x], impl="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors|cannot be imported"):
        gaussian_blur(torch.randn(1, 5, 5), impl="triton")


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: image_score(torch.rand(2, 4, 4), "mean"), ValueError, "unknown rule"),
        (lambda: image_score(torch.rand(2, 4, 4), "topk_mean", topk=0.0), ValueError, "topk"),
        (lambda: image_score(torch.rand(2, 4, 4), "topk_mean", topk=1.5), ValueError, "topk"),
        (lambda: image_score(torch.rand(2, 4, 4), "max", topk=-0.1), ValueError, "topk"),
        (lambda: image_score(torch.rand(2, 4, 4), "topk_mean", topk=0.01), ValueError, "0 pixels"),
        (lambda: image_score(torch.rand(2, 4, 4), "avgpool_max", pool_size=5), ValueError, "pool_size"),
        (lambda: image_score(torch.rand(2, 4, 4), "avgpool_max", pool_size=0), ValueError, "pool_size"),
        (lambda: image_score(torch.ones(2, 4, 4, dtype=torch.int32)), TypeError, "floating"),
        (lambda: image_score(torch.rand(2, 3, 4, 4)), ValueError, r"\[B, 1, H, W\]"),
        (lambda: gaussian_blur(torch.rand(2, 2, 4, 4)), ValueError, r"\[B, 1, H, W\]"),
        (lambda: gaussian_blur(torch.ones(2, 4, 4, dtype=torch.uint8)), TypeError, "floating"),
        (lambda: gaussian_blur(torch.rand(2, 4, 4), sigma=None), ValueError, "sigma"),
        (lambda: gaussian_blur(torch.rand(2, 4, 4), kernel_size=0), ValueError, "kernel_size"),
        (lambda: gaussian_blur(torch.rand(2, 4, 4), impl="fast"), ValueError, "impl"),
    ],
)
def test_score_and_blur_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------
# Triton (interpreter, subprocess) vs reference
# ----------------------------------------------------------------------------------------------


def _triton_importable() -> bool:
    from fastproto import triton as tpkg

    return tpkg.is_available()


def _interpreter_main(seed: int) -> None:
    """Subprocess body: TRITON_INTERPRET=1 is already in the environment."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    tm = importlib.import_module("fastproto.triton.anomaly_map")
    _triton_pkg.POISON_OUTPUTS = True
    from triton.runtime.interpreter import InterpretedFunction

    results = {"_interpreted": all(
        isinstance(k, InterpretedFunction) for k in (tm._cos_dist_kernel, tm._resample_hblur_kernel, tm._vblur_kernel)
    )}
    for i, name in enumerate(MAP_CASES + BLUR_CASES):
        try:
            case = make_case(name, np.random.default_rng(seed + i))
            want = _run(case, "reference")
            got = _run(case, "triton")
            entry = {
                "shape_ok": tuple(got.shape) == tuple(want.shape),
                "dtype": str(got.dtype),
                "finite": bool(torch.isfinite(got).all()),
            }
            if entry["shape_ok"]:
                err = (got.double() - want.double()).abs()
                entry["max_err"] = float(err.max()) if err.numel() else 0.0
                entry["max_ref"] = float(want.abs().max()) if want.numel() else 0.0
            results[name] = entry
        except Exception as exc:  # report, the parent test fails with the message
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    # forward-only: grad-requiring inputs are refused by impl="triton"
    x = torch.randn(1, 4, 3, 3, requires_grad=True)
    try:
        anomaly_map([x], [x.detach()], impl="triton")
        results["_grad_refused"] = False
    except RuntimeError as exc:
        results["_grad_refused"] = "forward-only" in str(exc)
    with torch.no_grad():
        results["_no_grad_ok"] = bool(torch.isfinite(anomaly_map([x], [x], 4, impl="triton")).all())
    _interpreter.emit(results)


interpreter_results = _interpreter.results_fixture(__file__)


def test_triton_refuses_grad_inputs(interpreter_results):
    seed, res = interpreter_results
    assert res["_grad_refused"], f"impl='triton' accepted requires_grad inputs (seed={seed})"
    assert res["_no_grad_ok"], f"impl='triton' failed under torch.no_grad() (seed={seed})"


@pytest.mark.parametrize("name", MAP_CASES + BLUR_CASES)
def test_triton_interpreter_matches_reference(name, interpreter_results):
    seed, res = interpreter_results
    entry = res[name]
    assert "error" not in entry, f"{name}: {entry.get('error')} (seed={seed})"
    assert entry["shape_ok"], f"{name}: shape differs from the reference (seed={seed})"
    assert entry["dtype"] == "torch.float32", f"{name}: dtype {entry['dtype']} (seed={seed})"
    assert entry["finite"], f"{name}: NaN/Inf in the Triton output: an element was not written (seed={seed})"
    tol = 2e-6 * max(1.0, entry["max_ref"])
    assert entry["max_err"] <= tol, f"{name}: max abs err {entry['max_err']:.3e} > {tol:.1e} (seed={seed})"


# ----------------------------------------------------------------------------------------------
# GPU: real shapes
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["tokens_prefix", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_triton_matches_reference_real_shapes(layout, dtype, seed):
    """B=16, C=768, 28x28, 8 tapped layers in two groups, -> 392 -> 256 and -> 256 directly."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 would run the kernels in the interpreter")
    if not _triton_importable():
        pytest.skip("triton is not installed")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    B, C, S = 16, 768, 28
    enc, dec = [], []
    for _ in range(8):
        if layout == "tokens_prefix":  # raw ViT block outputs [B, 5 + 784, C], prefix sliced off
            e = torch.randn(B, 5 + S * S, C, device="cuda", generator=gen)
            d = e + 0.3 * torch.randn(B, 5 + S * S, C, device="cuda", generator=gen)
            enc.append(e.to(dtype)[:, 5:])
            dec.append(d.to(dtype)[:, 5:])
        else:
            e = torch.randn(B, C, S, S, device="cuda", generator=gen)
            d = e + 0.3 * torch.randn(B, C, S, S, device="cuda", generator=gen)
            enc.append(e.to(dtype))
            dec.append(d.to(dtype))
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    old = _triton_pkg.POISON_OUTPUTS
    _triton_pkg.POISON_OUTPUTS = True
    try:
        for kw in (dict(out_size=392, eval_size=256), dict(out_size=256), dict(out_size=256, sigma=None)):
            got = anomaly_map(enc, dec, groups=groups, impl="triton", **kw)
            want = anomaly_map(enc, dec, groups=groups, impl="reference", **kw)
            auto = anomaly_map(enc, dec, groups=groups, **kw)
            torch.cuda.synchronize()
            assert torch.equal(auto, got), f"impl='auto' did not take the Triton path (seed={seed})"
            assert got.shape == (B, 256, 256) and got.dtype == torch.float32
            assert torch.isfinite(got).all(), f"{kw}: non-finite output (seed={seed})"
            err = (got - want).abs().max().item()
            assert err <= 2e-6, f"{layout} {dtype} {kw}: max abs err {err:.3e} (seed={seed})"
        maps = torch.rand(B, 1, 256, 256, device="cuda", generator=gen)
        err = (gaussian_blur(maps, impl="triton") - gaussian_blur(maps, impl="reference")).abs().max().item()
        assert err <= 1e-6, f"gaussian_blur max abs err {err:.3e} (seed={seed})"
    finally:
        _triton_pkg.POISON_OUTPUTS = old


if __name__ == "__main__":
    _interpreter.main(__file__, _interpreter_main)
