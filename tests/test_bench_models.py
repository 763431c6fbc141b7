"""``bench/models.py``: per-model plans (each paper's backbone and size on CUDA), the issue-5 models through
the measuring code on tiny CPU settings, the DPDiff-AD Sinkhorn share, and the report."""
import json
import os
import runpy
import time

import pytest
import torch

from fastproto.models import borad as borad_module
from fastproto.models import dpdiff as dpdiff_module

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "models.py")
ISSUE5 = ("dpdiff", "borad", "uipad")
#: the papers' settings, re-stated (DESIGN.md "Models"): DPDiff-AD DINOv2-B/14 (registers, the library's ViT
#: default) at 448 px, BoRAD a WideResNet-50-2 teacher at 256 px, UIP-AD DINOv2 at the ViT family's 392 px
PAPER = {"inpformer": ("dinov2_vitb14_reg", 392), "dinomaly": ("dinov2_vitb14_reg", 392),
         "proad": ("dinov2_vitb14_reg", 392), "dpdiff": ("dinov2_vitb14_reg", 448),
         "borad": ("wide_resnet50_2", 256), "uipad": ("dinov2_vitb14_reg", 392)}


@pytest.fixture(scope="module")
def bench():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared machine
    yield runpy.run_path(SCRIPT)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_dpdiff(bench):
    """A plan for DPDiff-AD on EfficientNet-Lite0 at 64 px (4 x 4 tokens), no warm-up, and the model."""
    plan = plan_of(bench, "--device", "cpu", "--models", "dpdiff", "--image-size", "64", "--repeats", "2",
                   "--warmup", "0")
    return plan, bench["build"]("dpdiff", plan)


def plan_of(bench, *argv):
    return bench["make_plan"](bench["parse_args"](list(argv)))


def test_cuda_plans_take_each_papers_backbone_and_size(bench):
    quick = plan_of(bench, "--device", "cuda", "--quick")
    assert quick.models == ISSUE5
    assert {m: (quick.backbones[m], quick.image_sizes[m]) for m in ISSUE5} == {m: PAPER[m] for m in ISSUE5}
    assert (quick.batches, quick.dtypes, quick.train_batch, quick.share_batch) == ((64,), ("bfloat16",), None, 16)
    full = plan_of(bench, "--device", "cuda")
    assert set(full.models) == set(PAPER)
    assert {m: (full.backbones[m], full.image_sizes[m]) for m in full.models} == PAPER
    assert (full.batches, full.dtypes, full.train_batch, full.share_batch) == (
        (1, 16, 64), ("float32", "bfloat16"), 16, 16)


def test_cli_overrides_apply_to_every_model(bench):
    p = plan_of(bench, "--device", "cuda", "--quick", "--backbone", "efficientnet_lite0", "--image-size", "128",
                "--train-batch", "8", "--batch", "2", "4", "--dtype", "float32")
    assert set(p.backbones.values()) == {"efficientnet_lite0"} and set(p.image_sizes.values()) == {128}
    assert (p.batches, p.dtypes, p.train_batch, p.share_batch) == ((2, 4), ("float32",), 8, 8)
    assert plan_of(bench, "--device", "cuda", "--quick", "--no-share").share_batch is None
    assert plan_of(bench, "--device", "cuda", "--models", "borad,uipad").share_batch is None  # no DPDiff-AD
    assert plan_of(bench, "--device", "cpu", "--no-train").train_batch is None
    with pytest.raises(SystemExit, match="nosuchmodel"):
        plan_of(bench, "--models", "dpdiff,nosuchmodel")


def test_cpu_plan_builds_the_issue5_models(bench):
    plan = plan_of(bench, "--device", "cpu", "--quick")
    assert plan.models == ISSUE5 and set(plan.backbones.values()) == {"efficientnet_lite0"}
    assert set(plan.image_sizes.values()) == {224} and plan.share_batch == 4
    built = {m: bench["build"](m, plan) for m in ISSUE5}
    teacher = built["borad"].teacher  # the EfficientNet-Lite0 CNN itself (its stage taps), not a WideResNet
    assert type(teacher).__name__ == "EfficientNetLite"
    assert built["borad"].bank.weight.shape[0] == (224 // 32) ** 2  # bank built for the plan's size
    assert built["uipad"].mode == "rgbd"
    # inference runs the deployment graph: BoRAD without its training-only parts, the others as they are
    deployed = bench["deployed"](built["borad"])
    assert not hasattr(deployed, "bank") and deployed.teacher is teacher
    assert bench["deployed"](built["dpdiff"]) is built["dpdiff"]
    inputs = bench["make_inputs"](built["uipad"], 3, 32, "cpu")
    assert set(inputs) == {"image", "depth"} and inputs["depth"].shape == inputs["image"].shape == (3, 3, 32, 32)
    assert not torch.equal(inputs["image"], inputs["depth"])
    assert isinstance(bench["make_inputs"](built["dpdiff"], 3, 32, "cpu"), torch.Tensor)


def test_tiny_cpu_run_of_the_issue5_models(bench, tmp_path, monkeypatch):
    exports = []
    real_export = borad_module.BoRAD.export
    monkeypatch.setattr(borad_module.BoRAD, "export", lambda self: exports.append(1) or real_export(self))
    out_json, out_md = tmp_path / "m.json", tmp_path / "R.md"
    bench["main"](["--device", "cpu", "--models", ",".join(ISSUE5), "--image-size", "64", "--batch", "1",
                   "--train-batch", "2", "--repeats", "1", "--warmup", "0", "--json", str(out_json),
                   "--out", str(out_md), "--section", "models-test"])
    record = json.loads(out_json.read_text())
    rows = record["rows"]
    assert [(r["model"], r["pass"], r["ops"]) for r in rows] == [
        (m, p, o) for m in ISSUE5 for p in ("inference", "train step") for o in ("fused", "reference")]
    for r in rows:
        assert r["error"] is None and r["runs"] == 1 and r["time_s"] > 0, r
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["time_s"])
        assert (r["backbone"], r["image_size"]) == ("efficientnet_lite0", 64)
    assert len(exports) == 1  # BoRAD's one inference setting measured the exported model
    shares = record["shares"]
    assert [(r["model"], r["ops"], r["batch"]) for r in shares] == [("dpdiff", "fused", 2), ("dpdiff", "reference", 2)]
    assert all(r["error"] is None and 0 < r["share_pct"] <= 100 for r in shares)
    text = out_md.read_text()
    assert "<!-- bench/metrics.py:models-test:start -->" in text and "Sinkhorn share of the train step" in text
    assert all(f"| {m} |" in text for m in ISSUE5) and "speed targets" not in text  # targets: CUDA only


def test_compiled_rows_run_both_ops_choices_through_torch_compile(bench, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or real_compile(fn, **kw))
    out_json, out_md = tmp_path / "m.json", tmp_path / "R.md"
    backend = "aot_eager_decomp_partition"  # no code generation: seconds, not minutes, on the CPU
    bench["main"](["--device", "cpu", "--models", "inpformer", "--image-size", "64", "--batch", "1",
                   "--train-batch", "2", "--repeats", "1", "--warmup", "1", "--compile", backend,
                   "--json", str(out_json), "--out", str(out_md), "--section", "models-test"])
    rows = json.loads(out_json.read_text())["rows"]
    assert [(r["pass"], r["ops"]) for r in rows] == [(p, o) for p in ("inference", "train step")
                                                     for o in ("fused", "reference")]
    assert all(r["error"] is None and r["runs"] == 1 for r in rows), rows
    assert [kw for _, kw in compiled] == [{"backend": backend}] * 4  # each pass and ops choice
    assert f"under `torch.compile` (backend `{backend}`" in out_md.read_text()
    assert plan_of(bench, "--compile").compile == "inductor" and plan_of(bench).compile is None


def test_sinkhorn_share_times_the_ot_loss(bench, tiny_dpdiff, monkeypatch):
    """The OT loss slowed by a known sleep: its time must show in both the alone and the step timings, and the
    loss must run once per step and once per alone call (recording step + warm-up + measured runs)."""
    sleep = 0.02
    calls = []
    real = dpdiff_module.ot_alignment_loss

    def slow_ot(x, prototypes, **kwargs):
        calls.append(tuple(x.shape))
        time.sleep(sleep)
        return real(x, prototypes, **kwargs)

    monkeypatch.setattr(dpdiff_module, "ot_alignment_loss", slow_ot)
    plan, model = tiny_dpdiff
    rows = bench["measure_share"](model, plan, name="dpdiff", batch=2, dtype="float32")
    assert len(calls) == 2 * (1 + 2 * plan.warmup + 2 * plan.repeats)  # per ops choice: record, warm-up, runs
    assert dpdiff_module.ot_alignment_loss is slow_ot  # the recording wrapper is gone
    tokens = (64 // 16) ** 2  # EfficientNet-Lite0 tokens at stride 16
    for r in rows:
        assert r["error"] is None and r["runs"] == plan.repeats, r
        assert r["sinkhorn_s"] >= sleep and r["step_s"] >= r["sinkhorn_s"]
        assert r["share_pct"] == pytest.approx(100 * r["sinkhorn_s"] / r["step_s"]) and 0 < r["share_pct"] <= 100
        assert f"cost [2, {tokens}, {model.num_global}] float32" in r["ot_input"]


def test_sinkhorn_share_fails_when_the_step_skips_the_ot_loss(bench, tiny_dpdiff, monkeypatch):
    plan, model = tiny_dpdiff
    monkeypatch.setattr(model, "loss", lambda batch: {"loss": model.local_tokens.square().sum()})
    rows = bench["measure_share"](model, plan, name="dpdiff", batch=1, dtype="float32")
    assert all("called ot_alignment_loss 0 time(s)" in r["error"] and r["share_pct"] is None for r in rows)


def _record(device, rows, shares=None):
    record = {"env": "Device: test.", "date": "2026-01-01", "cmd": "python bench/models.py", "load": [0.0, 0.0],
              "plan": {"device": device, "repeats": 5, "warmup": 3, "budget_s": None}, "rows": rows}
    if shares is not None:
        record["shares"] = shares
    return record


def _row(model, mode, batch, dtype, ops, t):
    return {"model": model, "pass": mode, "batch": batch, "dtype": dtype, "ops": ops, "backbone": "bb",
            "image_size": 448, "time_s": t, "images_per_s": batch / t, "peak_bytes": 2**20, "runs": 5, "error": None}


def _share(ops, step_s, ot_s):
    return {"model": "dpdiff", "pass": "sinkhorn share", "batch": 16, "dtype": "bfloat16", "ops": ops,
            "backbone": "bb", "image_size": 448, "step_s": step_s, "sinkhorn_s": ot_s,
            "share_pct": 100 * ot_s / step_s, "ot_input": "x", "runs": 5, "error": None}


@pytest.mark.parametrize("img_s, share, verdicts", [(150.0, 1.5, ("met", "met")), (80.0, 3.0, ("NOT met", "NOT met"))])
def test_report_states_the_issue5_targets(bench, tmp_path, img_s, share, verdicts):
    rows = [_row("dpdiff", "inference", 64, "bfloat16", "fused", 64 / img_s),
            _row("dpdiff", "inference", 64, "bfloat16", "reference", 1.0)]
    shares = [_share("fused", 0.1, share / 1000), _share("reference", 0.1, 0.01)]
    out = tmp_path / "R.md"
    bench["write_report"]([_record("cuda", rows, shares)], str(out))
    text = out.read_text()
    inference = next(line for line in text.splitlines() if line.startswith("- DPDiff-AD end-to-end"))
    share_line = next(line for line in text.splitlines() if line.startswith("- Sinkhorn share"))
    assert f"{img_s:.1f} img/s" in inference and inference.endswith(": " + verdicts[0])
    assert f"{share:.2f} %" in share_line and share_line.endswith(": " + verdicts[1])
    assert "models-cuda:start" in text and "| 10.00 |" in text  # the reference share row is in the table too


def test_from_json_renders_records_without_share_rows(bench, tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_record("cpu", [_row("proad", "inference", 4, "float32", o, 0.5)
                                              for o in ("fused", "reference")])))  # written before the share rows
    out = tmp_path / "R.md"
    bench["main"](["--from-json", str(old), "--out", str(out)])
    text = out.read_text()
    assert "models-cpu:start" in text and "| proad | inference | 4 | float32 | 500.0 | 500.0 |" in text
    assert "Sinkhorn share" not in text
