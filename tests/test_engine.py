"""Engine: StableAdamW and schedules, atomic checkpoints, exact resume, DDP (gloo), evaluation and reports."""
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastproto.engine import (CheckpointError, EvalSampler, OptimConfig, StableAdamW, TrainSampler, WarmupCosineLR,
                              build_eval_loader, build_optimizer, build_train_loader, evaluate, export_weights,
                              get_rng_state, load_checkpoint, load_weights, markdown_table, overlay, save_checkpoint,
                              save_png, save_results, set_rng_state, train)
from fastproto.engine.report import mask_contour
from fastproto.metrics import METRICS, Evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- stand-ins


class TinyAD(nn.Module):
    """Per-pixel 2-layer MLP auto-encoder (1x1 convs) with dropout; anomaly map = reconstruction error."""

    def __init__(self, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Dropout(dropout), nn.Conv2d(8, 3, 1))
        self.register_buffer("ramp", torch.zeros(()))

    def optimizer_config(self):
        return {"name": "stable_adamw", "lr": 2e-2, "weight_decay": 1e-4, "amsgrad": True, "eps": 1e-10,
                "warmup_iters": 3, "min_lr_ratio": 0.1, "grad_clip": 0.5}

    def on_train_iter(self, it, total):
        self.ramp.fill_(it / total)

    def loss(self, batch):
        x = batch["image"]
        mse = (self.net(x) - x).pow(2).mean()
        return {"loss": mse * (1 + self.ramp), "mse": mse}

    def forward(self, images):
        amap = (self.net(images) - images).pow(2).mean(1)
        return {"anomaly_map": amap, "score": amap.flatten(1).amax(1)}


class TinyData(Dataset):
    """Batches as fastproto.data's collate makes them; ``augment`` flips with the global torch RNG."""

    def __init__(self, n=10, size=8, augment=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.masks = torch.zeros(n, 1, size, size)
        for i in range(n):
            if i % 4 >= 2:  # anomalous: a rectangle with a shifted texture
                y, x = torch.randint(0, size - 3, (2,), generator=g).tolist()
                self.masks[i, 0, y:y + 3, x:x + 2 + i % 2] = 1
        self.images += 2.0 * self.masks
        self.augment = augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, mask = self.images[i], self.masks[i]
        if self.augment and bool(torch.rand(()) < 0.5):
            image, mask = image.flip(-1), mask.flip(-1)
        cat = "ab"[i % 2]
        return {"image": image, "mask": mask, "label": torch.tensor(int(mask.any())), "category": cat,
                "defect": "bad" if mask.any() else "good", "path": f"/data/{cat}/test/{i:03d}.png"}


def run_tiny(out_dir, iters=12, init_seed=0, callback=None, **kw):
    torch.manual_seed(init_seed)
    model = TinyAD()
    loader = build_train_loader(TinyData(), batch_size=3, seed=7)
    train(model, loader, iters=iters, out_dir=out_dir, seed=3, ckpt_every=4, log_every=1, progress=False,
          callback=callback, device="cpu", **kw)
    return model


# ---------------------------------------------------------------------------------------------- optim


def stable_adamw_float64(params, grads, lr, betas, eps, wd, amsgrad, lrs=None):
    """The StableAdamW update re-stated in float64 numpy; returns the parameters and the RMS ratios seen."""
    b1, b2 = betas
    p = [x.astype(np.float64).copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    vmax = [np.zeros_like(x) for x in p]
    ratios = []
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(gs):
            g = g.astype(np.float64)
            p[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = np.maximum(vmax[i], v[i])
            d = np.sqrt(vmax[i] if amsgrad else v[i]) / np.sqrt(1 - b2 ** t) + eps
            rms = np.sqrt(np.mean((g / d) ** 2))
            ratios.append(rms)
            p[i] -= lr / (1 - b1 ** t) / max(1.0, rms) * m[i] / d
    return p, ratios


@pytest.mark.parametrize("amsgrad", [False, True])
def test_stable_adamw_matches_float64_restatement(rng, amsgrad):
    shapes = [(5, 7), (11,), (3, 2, 2)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    # grads: small, then a spike (update clipping must act), then normal ones
    scales = [0.1, 0.1, 30.0, 1.0, 0.01, 1.0]
    grads = [[(s * rng.standard_normal(x.shape)).astype(np.float32) for x in init] for s in scales]
    params = [nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    opt = StableAdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.from_numpy(g)
        opt.step()
    expected, ratios = stable_adamw_float64(init, grads, 1e-2, (0.9, 0.99), 1e-8, 0.1, amsgrad)
    assert max(ratios) > 1.5 and min(ratios) < 1  # both branches of the clipping were exercised
    for p, e in zip(params, expected, strict=True):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-5, atol=1e-6)
    # the float64 model really differs from plain AdamW on these gradients (the check can fail)
    plain = [nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    adamw = torch.optim.AdamW(plain, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad)
    for gs in grads:
        for p, g in zip(plain, gs, strict=True):
            p.grad = torch.from_numpy(g)
        adamw.step()
    assert not all(np.allclose(p.detach().numpy(), e, atol=1e-4) for p, e in zip(plain, expected, strict=True))


def test_stable_adamw_state_dict_resumes_bitwise(rng, tmp_path):
    init = rng.standard_normal((4, 6)).astype(np.float32)
    grads = [torch.from_numpy(rng.standard_normal((4, 6)).astype(np.float32)) for _ in range(5)]

    def make():
        p = nn.Parameter(torch.from_numpy(init.copy()))
        return p, StableAdamW([p], lr=1e-2, weight_decay=1e-2, amsgrad=True)

    def steps(p, opt, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p_full, opt_full = make()
    steps(p_full, opt_full, grads)
    p_a, opt_a = make()
    steps(p_a, opt_a, grads[:3])
    torch.save({"p": p_a.detach(), "opt": opt_a.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    p_b, opt_b = make()
    with torch.no_grad():
        p_b.copy_(saved["p"])
    opt_b.load_state_dict(saved["opt"])
    steps(p_b, opt_b, grads[3:])
    assert torch.equal(p_b, p_full)


def test_build_optimizer_by_name_and_errors():
    p = [nn.Parameter(torch.zeros(3))]
    assert isinstance(build_optimizer(p, "stable_adamw", lr=1e-3, clip_threshold=2.0), StableAdamW)
    assert isinstance(build_optimizer(p, "adam", lr=1e-3, betas=(0.5, 0.999)), torch.optim.Adam)
    assert type(build_optimizer(p, "adamw", lr=1e-3)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer(p, "sgd")
    with pytest.raises(ValueError, match="clip_threshold"):
        build_optimizer(p, "adam", clip_threshold=1.0)
    with pytest.raises(ValueError, match="no parameters"):
        build_optimizer([], "adamw")
    with pytest.raises(ValueError, match="warmup_itrs"):
        OptimConfig.merge({"lr": 1e-3}, {"warmup_itrs": 5})
    cfg = OptimConfig.merge({"name": "adam", "lr": 1e-3}, {"lr": 5e-3})
    assert (cfg.name, cfg.lr) == ("adam", 5e-3)


def _lrs(sched, n):
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def test_warmup_cosine_matches_dinomaly_schedule():
    base, final, total, warm = 2e-3, 2e-4, 40, 10
    # Dinomaly's WarmCosineScheduler, re-stated: linspace warm-up then a cosine over the remaining iterations
    iters = np.arange(total - warm)
    expected = np.concatenate([np.linspace(0, base, warm),
                               final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])
    expected = np.concatenate([expected, [final] * 5])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    got = _lrs(WarmupCosineLR(opt, total, warm, min_lr_ratio=final / base), total + 5)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-18)
    assert got[0] == 0.0 and got[warm - 1] == pytest.approx(base) and got[warm] == pytest.approx(base)
    assert got[total] == pytest.approx(final) and got[total + 4] == pytest.approx(final)
    # resumable: a scheduler restored mid-way continues identically
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    s2 = WarmupCosineLR(opt2, total, warm, min_lr_ratio=final / base)
    _lrs(s2, 17)
    opt3 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    s3 = WarmupCosineLR(opt3, total, warm, min_lr_ratio=final / base)
    opt3.load_state_dict(opt2.state_dict())
    s3.load_state_dict(s2.state_dict())
    assert _lrs(s3, total + 5 - 17) == got[17:]


def test_constant_and_step_schedules_from_config():
    p = [nn.Parameter(torch.zeros(1))]
    _, sched = OptimConfig(name="adam", lr=5e-3, schedule="step", milestone_epochs=(2,)).build(p, 50, 5)
    lrs = _lrs(sched, 15)
    assert lrs[:10] == [5e-3] * 10 and lrs[10:] == pytest.approx([5e-4] * 5)
    _, sched = OptimConfig(lr=1e-3, schedule="constant", warmup_epochs=1).build(p, 50, 4)
    assert _lrs(sched, 8) == pytest.approx([0, 1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="warm-up"):
        OptimConfig(schedule="step", warmup_iters=3).build(p, 50, 5)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_atomic_save_keeps_previous_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = TinyAD()
    save_checkpoint(path, model=model, step=3)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with torch.no_grad():
        model.net[0].weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, step=4)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]  # no temporary file left behind
    assert load_checkpoint(path)["step"] == 3


def test_checkpoint_loads_with_weights_only_and_restores_rng(tmp_path):
    model, path = TinyAD(), tmp_path / "ck.pt"
    opt, sched = OptimConfig.merge(model.optimizer_config()).build(model.parameters(), 20, 5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    rng = get_rng_state()
    draws = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=5, epoch=1, rng_state=rng,
                    config={"seed": 3, "betas": (0.9, 0.999)}, metrics={"a": {"i_auroc": float("nan")}})
    raw = torch.load(path, weights_only=True)  # plain torch, weights_only: no pickled objects inside
    assert raw["step"] == 5 and raw["config"]["betas"] == (0.9, 0.999) and math.isnan(raw["metrics"]["a"]["i_auroc"])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(load_checkpoint(path)["rng_state"])
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert [random.random() for _ in range(3)] == draws[2]
    with pytest.raises(TypeError, match=r"config\['fn'\]"):
        save_checkpoint(path, model=model, config={"fn": len})


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        load_checkpoint(missing)
    path = tmp_path / "good.pt"
    save_checkpoint(path, model=TinyAD(), step=1)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pt.*truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": TinyAD()}, pickled)  # a pickled module: refused by weights_only
    with pytest.raises(CheckpointError, match=r"pickled\.pt.*weights_only"):
        load_weights(pickled, TinyAD())


def test_wrong_model_keys_are_listed(tmp_path):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model=TinyAD())
    other = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=other)
    msg = str(info.value)
    assert "ck.pt" in msg and "missing keys (4)" in msg and "0.weight" in msg
    assert "unexpected keys (5)" in msg and "net.0.weight" in msg and "ramp" in msg
    wide = TinyAD()
    wide.net[0] = nn.Conv2d(3, 16, 1)
    wide.net[3] = nn.Conv2d(16, 3, 1)
    with pytest.raises(CheckpointError, match=r"net.0.weight: \(8, 3, 1, 1\) vs \(16, 3, 1, 1\)"):
        load_checkpoint(path, model=wide)


def test_load_weights_from_checkpoint_export_and_ddp_prefix(tmp_path):
    src = TinyAD()
    save_checkpoint(tmp_path / "ck.pt", model=src, step=2)
    export_weights(tmp_path / "w.pt", src)
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    for name in ("ck.pt", "w.pt", "ddp.pt"):
        dst = load_weights(tmp_path / name, TinyAD())
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), (name, k)
    half = tmp_path / "half.pt"
    export_weights(half, src, dtype=torch.bfloat16)
    assert torch.load(half, weights_only=True)["net.0.weight"].dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match=r"w\.pt.*not a fastproto training checkpoint"):
        load_checkpoint(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------------- training


def _assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_after_exception_matches_uninterrupted_run(tmp_path):
    full = run_tiny(tmp_path / "full")

    class Killed(Exception):
        pass

    def kill(step, record):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        run_tiny(tmp_path / "cut", callback=kill)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 4  # mid-epoch (3 batches per epoch)
    resumed = run_tiny(tmp_path / "cut", init_seed=123)  # different init: the weights come from the checkpoint
    _assert_same_weights(resumed, full)
    # the log has each iteration once, with the same losses as the uninterrupted run
    cut, ref = _log(tmp_path / "cut"), _log(tmp_path / "full")
    assert [r["step"] for r in cut] == list(range(1, 13))
    assert [r["loss"] for r in cut] == [r["loss"] for r in ref]
    # a finished run resumes to nothing
    again = run_tiny(tmp_path / "cut", init_seed=5)
    _assert_same_weights(again, full)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    full = run_tiny(tmp_path / "full")
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from tests.test_engine import run_tiny\n"
        "def kill(step, record):\n"
        "    if step == 10:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"run_tiny({str(tmp_path / 'cut')!r}, callback=kill)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 8
    _assert_same_weights(run_tiny(tmp_path / "cut", init_seed=99), full)


def test_train_bf16_autocast_logs_and_evaluates(tmp_path):
    torch.manual_seed(0)
    model = TinyAD()
    loader = build_train_loader(TinyData(), batch_size=4, seed=0)
    test = DataLoader(TinyData(augment=False, seed=1), batch_size=4)
    calls = []

    def eval_fn(m):
        calls.append(m.training)
        return evaluate(m, test, resolution=None)

    out = train(model, loader, epochs=2, out_dir=tmp_path, amp="bf16", progress=True, log_every=2,
                eval_fn=eval_fn, eval_every=3, device="cpu", optimizer={"lr": 1e-2, "warmup_iters": 0})
    assert out["step"] == 4 and calls == [False, False] and model.training  # evals at 3 and 4, in eval mode
    assert set(out["metrics"]) == {"a", "b", "mean"}
    log = _log(tmp_path)
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == [2, 4] and all(math.isfinite(r["loss"]) and "mse" in r for r in losses)
    assert [r["step"] for r in log if "eval" in r] == [3, 4]
    assert load_checkpoint(tmp_path / "last.pt")["metrics"]["mean"]["mad"] == out["metrics"]["mean"]["mad"]


def test_compiled_training_and_evaluation_equal_eager(tmp_path, monkeypatch):
    """``compile=``: the training loss and the evaluation forward through ``torch.compile`` (here a backend without
    code generation): the same losses, weights (dropout off) and metrics as eagerly; checkpoints of the plain model."""
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(type(fn).__name__) or real_compile(fn, **kw))
    runs = {}
    for backend in (None, "aot_eager_decomp_partition"):
        torch.manual_seed(0)
        model = TinyAD(dropout=0.0)
        test = DataLoader(TinyData(augment=False, seed=1), batch_size=4)
        out = train(model, build_train_loader(TinyData(), batch_size=3, seed=7), iters=6,
                    out_dir=tmp_path / str(backend), seed=3, log_every=1, progress=False, device="cpu", compile=backend,
                    eval_fn=lambda m: evaluate(m, test, resolution=None, compile=backend))
        runs[backend] = (model, [r["loss"] for r in _log(tmp_path / str(backend)) if "loss" in r], out["metrics"])
    assert compiled == ["LossForward", "TinyAD"]  # the training loss, then the evaluation forward
    (m0, l0, e0), (m1, l1, e1) = runs.values()
    assert len(l0) == 6 and l1 == pytest.approx(l0, rel=1e-5)
    for k, v in m0.state_dict().items():
        torch.testing.assert_close(m1.state_dict()[k], v, rtol=1e-4, atol=1e-6)
    assert e1.keys() == e0.keys()
    assert all(e1[c] == pytest.approx(e0[c], rel=1e-5) for c in e0)
    saved = load_checkpoint(tmp_path / "aot_eager_decomp_partition" / "last.pt")
    assert not any("_orig_mod" in k for k in saved["model"]), list(saved["model"])


def test_train_rejects_bad_arguments(tmp_path):
    loader = build_train_loader(TinyData(), batch_size=3)
    with pytest.raises(ValueError, match="exactly one"):
        train(TinyAD(), loader, out_dir=tmp_path)
    with pytest.raises(ValueError, match="amp"):
        train(TinyAD(), loader, iters=1, out_dir=tmp_path, amp="fp8")
    with pytest.raises(TypeError, match="no loss"):
        train(nn.Linear(2, 2), loader, iters=1, out_dir=tmp_path, progress=False)


def test_empty_batch_is_an_iteration_without_update(tmp_path):
    class Skipped(TinyData):  # the data module's collate gives None when every sample was a skipped bad file
        def __getitem__(self, i):
            return None

    def collate(samples):
        return None

    torch.manual_seed(0)
    model = TinyAD()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = build_train_loader(Skipped(), batch_size=3, collate_fn=collate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(model, loader, iters=4, out_dir=tmp_path, progress=False, device="cpu")
    assert sum("empty batch (all samples skipped)" in str(w.message) for w in caught) == 4
    assert out["step"] == 4 and out["loss"] == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_train_sampler_shards_and_skips():
    full = list(TrainSampler(10, seed=4, world_size=1, rank=0))
    assert sorted(full) == list(range(10)) and full != list(range(10))
    shards = [list(TrainSampler(10, seed=4, world_size=3, rank=r)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # padded to 12 by wrapping around
    assert {i for s in shards for i in s} == set(range(10))
    s = TrainSampler(10, seed=4, world_size=3, rank=1)
    s.set_epoch(0, skip=2)
    assert list(s) == shards[1][2:] and len(s) == 2
    s.set_epoch(1)
    assert list(s) != shards[1]  # another epoch, another order
    got = [list(EvalSampler(11, world_size=3, rank=r)) for r in range(3)]
    assert [i for g in got for i in g] == list(range(11))


# ---------------------------------------------------------------------------------------------- evaluation


def test_evaluate_equals_direct_evaluator_and_writes_overlays(tmp_path):
    torch.manual_seed(0)
    model = TinyAD().eval()
    data = TinyData(n=16, augment=False, seed=2)
    batch = {k: [data[i][k] for i in range(len(data))] for k in data[0]}
    images, masks = torch.stack(batch["image"]), torch.stack(batch["mask"])
    with torch.no_grad():
        out = model(images)
    ev = Evaluator(resolution=16)
    ev.update(out["anomaly_map"], masks, categories=batch["category"], image_scores=out["score"],
              image_labels=torch.stack(batch["label"]))
    expected = ev.compute()
    model.train()
    loader = DataLoader(data, batch_size=5)
    got = evaluate(model, loader, resolution=16, overlays_dir=tmp_path / "ov", max_overlays_per_category=3)
    assert model.training  # mode restored
    assert got == expected and set(got) == {"a", "b", "mean"}
    assert set(got["mean"]) == {*METRICS, "mad"}
    pngs = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "ov") for d, _, fs in os.walk(tmp_path / "ov")
                  for f in fs)
    assert pngs == ["a/bad_002.png", "a/good_000.png", "a/good_004.png",
                    "b/bad_003.png", "b/good_001.png", "b/good_005.png"]
    assert np.asarray(Image.open(tmp_path / "ov" / "a" / "bad_002.png")).shape == (8, 8, 3)
    ev = Evaluator(resolution=16, image_score="topk_mean", topk=0.1)
    ev.update(out["anomaly_map"], masks, categories=batch["category"], image_labels=torch.stack(batch["label"]))
    assert evaluate(model, loader, resolution=16, image_score="topk_mean", topk=0.1) == ev.compute()
    with pytest.raises(ValueError, match="image_score"):
        evaluate(model, loader, image_score="mean")


class _DepthTaker(torch.nn.Module):
    """An RGB-D model stand-in: its map is the depth's first channel, so the depth must be passed."""

    def forward(self, images, depth):
        maps = depth[:, 0]
        return {"anomaly_map": maps, "score": maps.flatten(1).amax(1)}


def test_evaluate_passes_depth_to_rgbd_models():
    data = TinyData(n=6, augment=False, seed=3)
    samples = [dict(data[i], depth=data[i]["mask"].expand(3, -1, -1).clone()) for i in range(len(data))]
    loader = DataLoader(samples, batch_size=3)
    got = evaluate(_DepthTaker(), loader, resolution=None)
    assert got["mean"]["p_auroc"] == 1.0  # the depth is the ground truth itself


def _dist_worker(rank, world, init_file, out_dir, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = TinyAD(dropout=0.0)
        results = evaluate(model, build_eval_loader(TinyData(n=15, augment=False, seed=2), batch_size=4),
                           resolution=None)
        torch.manual_seed(0)
        model = TinyAD(dropout=0.0)
        loader = build_train_loader(TinyData(n=8, augment=False), batch_size=2, seed=5)
        train(model, loader, iters=5, out_dir=out_dir, ckpt_every=2, progress=False, device="cpu")
        try:  # a plain loader on every rank would count each sample twice
            evaluate(model, DataLoader(TinyData(n=4), batch_size=4))
            refused = False
        except ValueError as e:
            refused = "build_eval_loader" in str(e)
        queue.put((rank, results, {k: v.numpy().copy() for k, v in model.state_dict().items()}, refused))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_evaluate_and_train_like_one(tmp_path):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = tempfile.mktemp(dir=tmp_path)
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, init_file, str(tmp_path / "ddp"), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {r: rest for r, *rest in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # one process: the same test set (every sample once), and batch 4 = the union of the two ranks' batches of 2
    torch.manual_seed(0)
    model = TinyAD(dropout=0.0)
    expected = evaluate(model, DataLoader(TinyData(n=15, augment=False, seed=2), batch_size=4), resolution=None)
    torch.manual_seed(0)
    model = TinyAD(dropout=0.0)
    loader = build_train_loader(TinyData(n=8, augment=False), batch_size=4, seed=5, rank=0, world_size=1)
    train(model, loader, iters=5, out_dir=tmp_path / "one", progress=False, device="cpu")
    for rank in (0, 1):
        results, state, refused = got[rank]
        assert results == expected and refused, rank
        for k, v in model.state_dict().items():
            torch.testing.assert_close(torch.from_numpy(state[k]), v, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {k}")
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["step"] == 5
    assert len(load_checkpoint(tmp_path / "ddp" / "last.pt")["rng_state"]) == 2  # every rank's RNG state


# ---------------------------------------------------------------------------------------------- reports


def test_results_json_and_markdown(tmp_path):
    results = {"bottle": {k: 0.9 for k in (*METRICS, "mad")}, "cable": {k: 0.5 for k in (*METRICS, "mad")}}
    results["cable"]["aupro"] = float("nan")
    results["mean"] = {k: (results["bottle"][k] + results["cable"][k]) / 2 for k in results["bottle"]}
    js, md = save_results(results, tmp_path / "rep", meta={"model": "tiny", "protocol": "exact"})
    with open(js) as f:
        data = json.load(f)  # strict JSON: NaN became null
    assert data["meta"]["model"] == "tiny" and data["results"]["cable"]["aupro"] is None
    assert data["results"]["bottle"]["i_auroc"] == 0.9
    with open(md) as f:
        text = f.read()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| category | " + " | ".join((*METRICS, "mad")) + " |"
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| bottle", "| cable", "| mean"]
    assert "| 90.00 |" in rows[1] and "nan" in rows[2] and "- model: tiny" in text
    assert markdown_table({"x": {"i_auroc": 0.5}}, keys=("i_auroc", "p_ap"), percent=False).splitlines()[-1] == \
        "| x | 0.50 | - |"


def test_overlay_shape_colours_and_contour(tmp_path):
    image = torch.zeros(3, 12, 10)  # normalised zeros -> the ImageNet mean colour
    amap = torch.zeros(6, 5)
    amap[0, 0] = 1.0
    mask = torch.zeros(1, 12, 10)
    mask[0, 4:9, 3:7] = 1
    rgb = overlay(image, amap, mask, alpha=1.0, contour_color=(255, 0, 255))
    assert rgb.shape == (12, 10, 3) and rgb.dtype == np.uint8
    edge = mask_contour(mask[0].numpy() > 0)
    assert edge.sum() == 14 and not edge[5:8, 4:6].any()
    assert (rgb[edge] == (255, 0, 255)).all()
    assert tuple(rgb[0, 0]) == (128, 0, 0) and tuple(rgb[11, 9]) == (0, 0, 128)  # jet: high red, low blue
    plain = overlay(image, amap, alpha=0.0)
    assert tuple(plain[0, 0]) == (124, 116, 104)  # de-normalised ImageNet mean
    save_png(tmp_path / "o" / "x.png", rgb)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "x.png")), rgb)
