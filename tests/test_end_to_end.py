"""End to end through the CLI: train -> checkpoint -> eval on a tiny synthetic dataset, exact resume, and a
smoke run on real MVTec images (skipped when /work/shared/data is absent)."""
import json
import math
import os
import runpy

import pytest
import torch

from fastproto import engine
from fastproto.cli import main
from fastproto.data import synthetic

REAL_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "mvtec_reduced")
METRIC_KEYS = {"i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro", "mad"}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two synthetic categories, 64 px, 4 train / 4 test (2 anomalous) images each."""
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(root, categories=("fabric", "screw"), n_train=4, n_test=4, size=64, seed=1)
    return f"mvtec:{root}"


def tiny_train_args(model: str, data: str, out, iters: int = 3, *extra: str) -> list[str]:
    """A seconds-long `fastproto train` on random EfficientNet-Lite0 weights, 64 px, width 32."""
    return ["train", "--model", model, "--data", data, "--backbone", "efficientnet_lite0", "--no-pretrained",
            "--set", "backbone.embed_dim=32", "--image-size", "64", "--crop-size", "none", "--iters", str(iters),
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out), "--overlays", "1",
            "--quiet", *extra]


def read_results(folder) -> dict:
    with open(os.path.join(folder, "results.json")) as f:
        return json.load(f)["results"]


@pytest.mark.parametrize("model", ["inpformer", "proad"])
def test_train_checkpoint_eval_round_trip(tiny_data, tmp_path, model):
    run = tmp_path / "run"
    assert main(tiny_train_args(model, tiny_data, run)) == 0
    for name in ("last.pt", "log.jsonl", "config.json", "results.json", "results.md"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "overlays").iterdir()) == ["fabric", "screw"]
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["name"] == model and config["model"]["backbone_kwargs"] == {"embed_dim": 32}
    assert ("image_size" in config["model"]["cfg"]) == (model == "proad")  # Pro-AD: one prototype per token
    # the checkpoint describes itself: eval needs neither config.json nor the training arguments
    (run / "config.json").unlink()
    trained = read_results(run)
    assert set(trained) == {"fabric", "screw", "mean"} and set(trained["mean"]) >= METRIC_KEYS
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--batch-size", "4", "--workers", "0",
                 "--out", str(out), "--overlays", "1", "--quiet"]) == 0
    assert read_results(out) == trained  # same weights, data and evaluator: the same numbers
    assert len(list((out / "overlays" / "screw").glob("*.png"))) == 1
    # a legacy protocol on the same checkpoint runs too (and gives another table)
    assert main(["eval", "--checkpoint", str(run / "last.pt"), "--protocol", "dinomaly", "--workers", "0",
                 "--out", str(tmp_path / "legacy"), "--overlays", "0", "--quiet"]) == 0
    assert set(read_results(tmp_path / "legacy")) == {"fabric", "screw", "mean"}


def test_resume_continues_the_same_run(tiny_data, tmp_path, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(tiny_train_args("inpformer", tiny_data, whole, 4, "--ckpt-every", "2")) == 0

    real_train = engine.train

    def interrupted(*args, **kwargs):  # dies right after the checkpoint of iteration 2
        def stop(step, record):
            if step == 2:
                raise KeyboardInterrupt
        return real_train(*args, callback=stop, **kwargs)

    monkeypatch.setattr(engine, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_train_args("inpformer", tiny_data, parts, 4, "--ckpt-every", "2"))
    assert torch.load(parts / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(engine, "train", real_train)
    assert main(tiny_train_args("inpformer", tiny_data, parts, 4, "--ckpt-every", "2")) == 0

    a = torch.load(whole / "last.pt", weights_only=True)
    b = torch.load(parts / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    steps = [json.loads(line)["step"] for line in (parts / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # no record repeated by the resume
    # --no-resume starts over
    assert main(tiny_train_args("inpformer", tiny_data, parts, 2, "--no-resume")) == 0
    assert torch.load(parts / "last.pt", weights_only=True)["step"] == 2


@pytest.mark.skipif(not os.path.isdir(REAL_DATA), reason="real MVTec data (/work/shared/data) absent")
def test_real_data_smoke(tmp_path):
    out = tmp_path / "real"
    assert main(["train", "--model", "dinomaly", "--data", f"mvtec:{REAL_DATA}", "--categories", "hazelnut",
                 "--backbone", "efficientnet_lite0", "--set", "backbone.embed_dim=64", "--image-size", "128",
                 "--crop-size", "none", "--iters", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu",
                 "--out", str(out), "--overlays", "0", "--quiet"]) == 0
    results = read_results(out)
    assert set(results) == {"hazelnut", "mean"}
    assert all(0.0 <= v <= 1.0 for k, v in results["hazelnut"].items() if k in METRIC_KEYS and not math.isnan(v))


def test_real_data_bench_skips_cleanly_without_data(tmp_path, capsys):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "real_data.py")
    namespace = runpy.run_path(script)
    assert namespace["main"](["--data", str(tmp_path / "absent"), "--report", str(tmp_path / "r.md")]) == 0
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "r.md").exists()
