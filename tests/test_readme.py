"""README's Python examples run as written, on stand-in inputs.

Each ```python block of the README is executed. The names a block uses without defining them (a data loader,
feature tensors, ...) are given small stand-ins of the documented shapes; the few things that cannot run here are
replaced by exact string substitution (each substitution must find its text, so that an edited README fails here
instead of going untested): the CUDA evaluator runs on the CPU, training runs 2 iterations (no warm-up) instead of
500, and the official Dinomaly checkpoint is a state dict this test writes with the official key layout.
"""
import os
import pathlib
import re

import torch

from fastproto import ops
from tests.test_convert import foreign_model

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _substitute(code: str, replacements) -> str:
    for old, new in replacements:
        assert old in code, f"README example changed: {old!r} not found"
        code = code.replace(old, new)
    return code


def test_readme_has_the_examples_this_file_runs():
    assert len(_blocks()) == 2


def test_metrics_and_ops_example_runs():
    g = torch.Generator().manual_seed(0)
    B, H, N, M, D, C = 2, 2, 9, 4, 8, 16

    def r(*shape):
        return torch.randn(*shape, generator=g)

    maps = torch.rand(4, 32, 32, generator=g)
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[2:, 8:16, 4:12] = True  # images 2 (category a) and 3 (b) anomalous: each category has both kinds
    norm, fc1 = torch.nn.LayerNorm(C), torch.nn.Linear(C, 4 * C)
    ns = {
        "loader": [(maps[:2], masks[:2], ["a", "b"]), (maps[2:], masks[2:], ["a", "b"])],
        "encoder_feats": [r(B, C, 4, 4) for _ in range(8)], "decoder_feats": [r(B, C, 4, 4) for _ in range(8)],
        "q": r(B, H, N, D), "k": r(B, H, 7, D), "v": r(B, H, 7, D), "pk": r(H, M, D), "pv": r(H, M, D),
        "learn_scale": torch.ones(H, 1, 1), "x": r(B, N, C), "prototypes": r(M, C), "cost": r(B, N, 3).abs(),
        "enc_groups": [r(B, C, 4, 4)], "dec_groups": [r(B, C, 4, 4)], "branch": r(B, N, C), "residual": r(B, N, C),
        "norm": norm, "ls": type("LayerScale", (), {"gamma": r(C)}), "h": r(B, N, C), "gate": r(B, 1, C),
        "shift": r(B, 1, C), "scale": r(B, 1, C), "fc1": fc1, "model": foreign_model(0),
    }
    code = _substitute(_blocks()[0], [
        ('Evaluator("exact", device="cuda")', 'Evaluator("exact", device="cpu")'),
    ])
    with torch.no_grad():
        exec(compile(code, "README.md (metrics and ops)", "exec"), ns)  # noqa: S102
    assert set(ns["results"]) == {"a", "b", "mean"} and all(v == v for v in ns["results"]["mean"].values())
    assert ns["amap"].shape == (B, 256, 256) and ns["score"].shape == (B,)
    assert ns["h"].shape == (B, N, 4 * C) and ns["out"].shape == (B, N, C)
    assert type(ns["model"].decoder[0].attn) is ops.LinearAttention and ns["model"].norm.impl == "reference"


def test_models_data_training_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from fastproto import models

    # our state_dict keys are the official ones (tests/test_models.py checks them against the official layout)
    torch.save(models.create("dinomaly", pretrained=False).state_dict(), tmp_path / "dinomaly_vitb14_mvtec.pth")
    code = _substitute(_blocks()[1], [
        ("n_train=40, n_test=20, size=256", "n_train=4, n_test=4, size=64"),
        ('image_size=256, crop_size=None)\ntest_set', 'image_size=64, crop_size=None)\ntest_set'),
        ('"test", image_size=256, crop_size=None)', '"test", image_size=64, crop_size=None)'),
        ("iters=500", 'iters=2, optimizer={"warmup_iters": 0}'),
    ])
    ns = {"images": torch.rand(2, 3, 64, 64), "torch": torch}
    exec(compile(code, "README.md (models, data, training)", "exec"), ns)  # noqa: S102
    assert "mean" in ns["results"] and os.path.exists("runs/inp/last.pt")
    assert callable(ns["fast"]) and os.path.exists("inpformer.pt2")
    with torch.no_grad():
        reloaded = torch.export.load("inpformer.pt2").module()(ns["images"])["anomaly_map"]
        torch.testing.assert_close(reloaded, ns["model"].eval()(ns["images"])["anomaly_map"])
