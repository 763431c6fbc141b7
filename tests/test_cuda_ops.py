"""CUDA kernels of the compiled ops against the CPU kernels: identical outputs on fresh random inputs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastproto import _ext

OPS = ("connected_components", "split_pixels", "count_negatives", "histogram_update")


def _missing_kernels():
    if not torch.cuda.is_available():
        return True
    return not all(_ext.has_op(name, "cuda") and _ext.has_op(name, "cpu") for name in OPS)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(_missing_kernels(), reason="the extension has no CUDA kernels for the fastproto ops"),
]


def op(name):
    return _ext.op(name)


def poison_cache():
    """Leaves freed blocks full of garbage in the CUDA caching allocator, so that output entries a
    kernel forgets to write show up (small pool: 512 KiB blocks; large pool: one 256 MiB block)."""
    blocks = [torch.full((1 << 19,), -7, dtype=torch.int8, device="cuda") for _ in range(64)]
    blocks.append(torch.full((1 << 28,), -7, dtype=torch.int8, device="cuda"))
    del blocks


# ------------------------------------------------------------------------------------------------- masks

KINDS = ("empty", "full", "noise", "single", "checker", "diagonals", "blobs", "border", "snake", "stripes")


def _snake(H, W):
    m = np.zeros((H, W), bool)
    m[::2] = True
    for r in range(1, H, 2):
        m[r, W - 1 if (r // 2) % 2 == 0 else 0] = True
    return m


def _image(rng, H, W, kind):
    if kind == "empty":
        return np.zeros((H, W), bool)
    if kind == "full":
        return np.ones((H, W), bool)
    if kind == "noise":
        return rng.random((H, W)) < rng.uniform(0.05, 0.7)
    if kind == "single":  # isolated pixels: one-pixel regions in both connectivities
        m = np.zeros((H, W), bool)
        m[::2, ::2] = rng.random(((H + 1) // 2, (W + 1) // 2)) < 0.6
        return m
    yy, xx = np.indices((H, W))
    if kind == "checker":  # diagonal-only connectivity: one region in 8-connectivity, singletons in 4
        return (yy + xx) % 2 == int(rng.integers(2))
    if kind == "diagonals":
        step = int(rng.integers(2, 6))
        d = yy - xx if rng.random() < 0.5 else yy + xx
        return d % step == int(rng.integers(step))
    if kind == "blobs":  # blobs with holes, bays and thin bridges
        field = ndimage.uniform_filter(rng.random((H, W)), size=int(rng.integers(3, 12)), mode="wrap")
        return field > np.quantile(field, rng.uniform(0.3, 0.8))
    if kind == "border":  # regions touching the image borders, including the corners
        m = rng.random((H, W)) < 0.05
        for edge in (m[0], m[-1], m[:, 0], m[:, -1]):
            edge |= rng.random(edge.shape) < 0.7
        return m
    if kind == "snake":  # one long serpentine region: deep union-find chains
        return _snake(H, W) if rng.random() < 0.5 else _snake(W, H).T.copy()
    # stripes: long one-pixel lines
    m = np.zeros((H, W), bool)
    if rng.random() < 0.5:
        m[:, :: int(rng.integers(2, 4))] = True
    else:
        m[:: int(rng.integers(2, 4))] = True
    return m


def make_masks(rng, B, H, W, kinds=KINDS):
    return torch.from_numpy(np.stack([_image(rng, H, W, rng.choice(kinds)) for _ in range(B)]).reshape(B, H, W))


SHAPES = [(1, 1, 1), (1, 1, 9), (1, 9, 1), (2, 2, 2), (3, 5, 4), (1, 33, 31), (7, 64, 64), (40, 37, 53),
          (40, 96, 128), (5, 257, 511), (3, 512, 512), (2, 511, 509)]


def _cc_both(masks, connectivity):
    expected = op("connected_components")(masks, connectivity)
    poison_cache()
    for _ in range(2):  # a race would show as a difference between runs
        got = op("connected_components")(masks.cuda(), connectivity)
        assert got.dtype == torch.int32 and got.is_cuda and got.shape == masks.shape
        assert torch.equal(got.cpu(), expected)
    return expected


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_connected_components_matches_cpu(rng, shape, connectivity):
    _cc_both(make_masks(rng, *shape), connectivity)


@pytest.mark.parametrize("kind", KINDS)
def test_connected_components_each_pattern(rng, kind):
    H, W = int(rng.integers(60, 200)), int(rng.integers(60, 200))
    masks = make_masks(rng, 6, H, W, kinds=(kind,))
    for connectivity in (4, 8):
        _cc_both(masks, connectivity)


def test_connected_components_large_batch(rng):
    masks = make_masks(rng, 40, 512, 512, kinds=("blobs", "noise", "full", "snake", "checker", "single"))
    labels = _cc_both(masks, 8)
    assert labels.max() > 1


@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 3), (3, 4, 0)])
def test_connected_components_empty(shape):
    masks = torch.zeros(shape, dtype=torch.bool)
    got = op("connected_components")(masks.cuda(), 8)
    assert got.shape == shape and got.dtype == torch.int32


# ------------------------------------------------------------------------------------------ split_pixels


def _maps(rng, shape):
    maps = rng.standard_normal(shape).astype(np.float32)
    ties = rng.random(shape) < 0.3
    maps[ties] = np.round(maps[ties] * 4) / 4
    maps[rng.random(shape) < 0.01] = -0.0
    return torch.from_numpy(maps)


def _split_both(maps, masks, connectivity):
    expected = op("split_pixels")(maps, masks, connectivity)
    poison_cache()
    for _ in range(2):
        got = op("split_pixels")(maps.cuda(), masks.cuda(), connectivity)
        for g, e, name in zip(got, expected, ("neg", "pos", "sizes", "n_regions")):
            assert g.is_cuda and g.dtype == e.dtype and g.shape == e.shape, name
            assert torch.equal(g.cpu(), e), name
    assert got[3].dim() == 0 and got[3].dtype == torch.int64


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_split_pixels_matches_cpu(rng, shape, connectivity):
    _split_both(_maps(rng, shape), make_masks(rng, *shape), connectivity)


def test_split_pixels_large_batch(rng):
    shape = (40, 256, 256)
    _split_both(_maps(rng, shape), make_masks(rng, *shape, kinds=("blobs", "empty", "single", "border")), 8)


@pytest.mark.parametrize("shape", [(0, 4, 4), (2, 0, 3), (3, 5, 7)])
def test_split_pixels_without_anomalies(rng, shape):
    _split_both(_maps(rng, shape), torch.zeros(shape, dtype=torch.bool), 8)


def test_split_pixels_all_anomalous(rng):
    shape = (3, 17, 12)
    _split_both(_maps(rng, shape), torch.ones(shape, dtype=torch.bool), 4)


# --------------------------------------------------------------------------------------- count_negatives

SPECIAL = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 1.5e-40, -3e-39, 1.1754944e-38, 1.0, -1.0, 0.5],
                   np.float32)


def _values(rng, G):
    """G distinct ascending float32 values (by float comparison: -0.0 and +0.0 are one value)."""
    pool = np.concatenate([rng.standard_normal(2 * G + 16), np.round(rng.standard_normal(G + 16) * 8) / 8]).astype(
        np.float32)
    distinct = torch.unique(torch.from_numpy(np.concatenate([pool, SPECIAL])))
    assert distinct.numel() >= G
    keep = np.sort(rng.choice(distinct.numel(), size=G, replace=False))
    return distinct[torch.from_numpy(keep)].contiguous()


def _scores(rng, n, values):
    """Normal draws, ties with the values, quantised ties among themselves, signed zeros, denormals,
    infinities, NaNs, and scores outside the range of the values."""
    out = rng.standard_normal(n).astype(np.float32) * np.float32(rng.choice([0.1, 1.0, 10.0]))
    kind = rng.integers(0, 6, n)
    if values.numel():
        v = values.numpy()
        out[kind == 1] = rng.choice(v, int((kind == 1).sum()))
        out[kind == 5] = rng.choice([v[0] - 1, v[-1] + 1, v[0], v[-1]], int((kind == 5).sum()))
    out[kind == 2] = np.round(out[kind == 2] * 4) / 4
    out[kind == 3] = rng.choice(np.append(SPECIAL, [np.nan, -np.nan]), int((kind == 3).sum()))
    return torch.from_numpy(out)


def _chunks(rng, lengths, values):
    """CUDA chunks cut from one buffer at random offsets (unaligned starts), and their CPU copies."""
    gaps = rng.integers(0, 4, len(lengths))
    total = int(sum(lengths) + gaps.sum())
    flat = _scores(rng, total, values).cuda()
    chunks, at = [], 0
    for n, gap in zip(lengths, gaps):
        at += int(gap)
        chunks.append(flat[at:at + n])
        at += n
    return chunks, [c.cpu() for c in chunks]


def _count_both(chunks_cuda, chunks_cpu, values):
    expected = op("count_negatives")(chunks_cpu, values)
    poison_cache()
    got = op("count_negatives")(chunks_cuda, values.cuda())
    for g, e in zip(got, expected):
        assert g.is_cuda and g.dtype == torch.int64 and g.shape == e.shape
        assert torch.equal(g.cpu(), e)
    n = sum(c.numel() for c in chunks_cpu)
    assert int(expected[0].sum() + expected[1].sum()) == n


@pytest.mark.parametrize("G", [0, 1, 2, 100, 3072, 3073, 20000, 100000])
def test_count_negatives_matches_cpu(rng, G):
    values = _values(rng, G)
    lengths = [0, 1, 2, 3, 5, 7, 0, 31, 1000, 4099, 100003, 1_000_003]
    chunks_cuda, chunks_cpu = _chunks(rng, lengths, values)
    _count_both(chunks_cuda, chunks_cpu, values)


@pytest.mark.parametrize("G", [10, 50000])
def test_count_negatives_many_chunks(rng, G):
    values = _values(rng, G)
    lengths = [int(n) for n in rng.choice([0, 1, 3, 4, 5, 17, 2000], size=75)]
    _count_both(*_chunks(rng, lengths, values), values)


@pytest.mark.parametrize("G", [5, 100000])
def test_count_negatives_one_hot_counter(rng, G):
    """Every score in gap[0] or eq[0]: the same counter for all threads."""
    values = torch.sort(torch.from_numpy(rng.permutation(np.arange(G, dtype=np.float32) + 10))).values
    flat = torch.from_numpy(np.where(rng.random(2_000_001) < 0.5, -1.0, 10.0).astype(np.float32))
    _count_both([flat.cuda()], [flat], values)


@pytest.mark.parametrize("zero", [0.0, -0.0])
def test_count_negatives_signed_zeros(zero):
    values = torch.tensor([-1.0, zero, 1e-45, 2.0])
    scores = torch.tensor([0.0, -0.0, 0.0, -1e-45, 1e-45, 1.5e-45, -1.0, 3.0, float("nan")])
    _count_both([scores.cuda()], [scores], values)
    eq, gap = op("count_negatives")([scores.cuda()], values.cuda())
    assert eq[1].item() == 3


def test_count_negatives_no_chunks(rng):
    values = _values(rng, 7)
    _count_both([], [], values)


# -------------------------------------------------------------------------------------- histogram_update


def _pages(rng, prefix_bits, max_bits, fine_pages=0):
    """Page tables of a paged histogram: random bins per page (2**0 .. 2**max_bits), plus `fine_pages`
    pages at full resolution."""
    low = 32 - prefix_bits
    bits = rng.integers(0, max_bits + 1, 1 << prefix_bits)
    bits[rng.choice(1 << prefix_bits, fine_pages, replace=False)] = low
    sizes = np.int64(1) << bits
    base = np.cumsum(sizes) - sizes
    return torch.from_numpy(base), torch.from_numpy(low - bits), int(sizes.sum())


@pytest.mark.parametrize("n_neg,n_pos", [(1_000_003, 100_001), (0, 1000), (5000, 0), (0, 0)])
@pytest.mark.parametrize("prefix_bits,max_bits,fine_pages", [(12, 0, 0), (12, 4, 0), (12, 10, 0), (12, 2, 6),
                                                             (8, 8, 0), (16, 3, 0), (20, 0, 0)])
def test_histogram_update_matches_cpu(rng, prefix_bits, max_bits, fine_pages, n_neg, n_pos):
    base, shift, nb = _pages(rng, prefix_bits, max_bits, fine_pages)
    neg = _scores(rng, n_neg, torch.empty(0))
    pos = _scores(rng, n_pos, torch.empty(0))
    sizes = torch.from_numpy(rng.integers(1, 5000, n_pos).astype(np.int32))
    # Non-zero starting state: the op accumulates.
    hists = [torch.from_numpy(rng.integers(0, 1000, nb)), torch.from_numpy(rng.integers(0, 1000, nb)),
             torch.from_numpy(rng.random(nb))]
    cpu = [h.clone() for h in hists]
    op("histogram_update")(*cpu, base, shift, neg, pos, sizes, prefix_bits)
    poison_cache()
    gpu = [h.cuda() for h in hists]
    op("histogram_update")(*gpu, base.cuda(), shift.cuda(), neg.cuda(), pos.cuda(), sizes.cuda(), prefix_bits)
    assert torch.equal(gpu[0].cpu(), cpu[0])
    assert torch.equal(gpu[1].cpu(), cpu[1])
    # float64 atomics add in a run-dependent order
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- checks


_ERROR_CASES = r"""
import sys
import numpy as np
import torch
import fastproto  # noqa: F401  (registers the ops)
from tests.test_cuda_ops import _pages

op = lambda name: getattr(torch.ops.fastproto, name)
masks = torch.zeros(2, 5, 5, dtype=torch.bool, device="cuda")
base, shift, nb = _pages(np.random.default_rng(0), 8, 2)
hist = [torch.zeros(nb, dtype=torch.long, device="cuda"), torch.zeros(nb, dtype=torch.long, device="cuda"),
        torch.zeros(nb, dtype=torch.float64, device="cuda")]
pages = [base.cuda(), shift.cuda()]
empty = torch.zeros(0, device="cuda")
no_sizes = torch.zeros(0, dtype=torch.int32, device="cuda")
cases = [
    lambda: op("connected_components")(masks, 6),
    lambda: op("connected_components")(masks.to(torch.uint8), 8),
    lambda: op("split_pixels")(torch.zeros(2, 5, 4, device="cuda"), masks, 8),
    lambda: op("split_pixels")(torch.zeros(2, 5, 5), masks, 8),
    lambda: op("count_negatives")([torch.zeros(3)], torch.zeros(1, device="cuda")),
    lambda: op("count_negatives")([torch.zeros(3, device="cuda")], torch.zeros(1, dtype=torch.float64, device="cuda")),
    lambda: op("histogram_update")(*hist, *pages, empty, empty, no_sizes, 30),
    lambda: op("histogram_update")(*[h[:-1] for h in hist], *pages, empty, empty, no_sizes, 8),
    lambda: op("histogram_update")(*hist, *pages, torch.zeros(3), empty, no_sizes, 8),
    lambda: op("histogram_update")(*hist, base, shift, empty, empty, no_sizes, 8),
]
for i, case in enumerate(cases):
    print(f"case {i}: start", flush=True)
    try:
        case()
        print(f"case {i}: accepted", flush=True)
    except RuntimeError as exc:
        print(f"case {i}: raised {str(exc).splitlines()[0]}", flush=True)
"""
_ERROR_MESSAGES = ["connectivity must be 4 or 8", "masks must be bool", "differ in shape", "same device",
                   "scores must be a contiguous 1-D float32 CUDA tensor",
                   "values must be a contiguous 1-D float32 CUDA tensor", "prefix_bits must be in",
                   "maps outside the histograms", "neg_scores must be a contiguous 1-D float32 CUDA tensor",
                   "same device"]


@pytest.mark.xfail(reason="on the H100 device (torch 2.11+cu130, extension built with /opt/gcc g++) a C++ "
                   "argument check that throws from a CUDA-registered op crashed the process (2026-11-22, twice); "
                   "the public Python API validates inputs before calling the ops. Open.", strict=False)
def test_argument_errors():
    """Each bad call raises with its message. Runs in a child process, one case after another with a
    progress line before each, so that a crash inside an error path (seen on an H100 on 2026-11-22)
    names the case instead of killing the test session."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _ERROR_CASES], capture_output=True, text=True, timeout=300,
                          cwd=root, env={**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("case ") and not ln.endswith("start")]
    for i, msg in enumerate(_ERROR_MESSAGES):
        got = next((ln for ln in lines if ln.startswith(f"case {i}: ")), None)
        assert got is not None, (f"case {i} did not finish (child exit code {proc.returncode}); "
                                 f"stdout tail: {proc.stdout[-800:]} stderr tail: {proc.stderr[-1500:]}")
        assert "raised" in got and msg in got, f"case {i}: expected an error containing {msg!r}, got {got!r}"
