"""``fastproto demo``: the quick demo for every model (one run, UIP-AD first so that the evaluator timing runs on
RGB-D maps), the per-model run settings, the files and tables it writes, and the ``--model`` / ``--models``
options."""
import json
import math

import pytest

from fastproto import demo, models
from fastproto.cli import build_parser, main

METRICS = ("i_auroc", "i_ap", "i_f1max", "p_auroc", "p_ap", "p_f1max", "aupro")
# UIP-AD first: the evaluator timing uses the first model's test maps, which then need the depth input
ORDER = ("uipad", "inpformer", "dinomaly", "proad", "dpdiff", "borad")
RUN_FILES = ("config.json", "last.pt", "log.jsonl", "results.json", "results.md")


def test_demo_configures_every_registered_model():
    assert set(demo.DEMO["models"]) == set(models.list_models()) == set(ORDER)
    assert set(demo.QUICK["models"]) == set(demo.DEMO["models"])


def _argv_options(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_train_args_carry_the_measured_configurations(tmp_path):
    parser = build_parser()
    dpdiff = demo.train_args("dpdiff", "mvtec:/d", str(tmp_path), demo.DEMO)
    assert _argv_options(dpdiff, "--iters") == ["500"] and _argv_options(dpdiff, "--batch-size") == ["8"]
    assert float(_argv_options(dpdiff, "--lr")[0]) == 1e-3 and _argv_options(dpdiff, "--image-size") == ["256"]
    assert {"backbone.embed_dim=128", "backbone.stride=16"} <= set(_argv_options(dpdiff, "--set"))
    assert "warmup_iters=20" in _argv_options(dpdiff, "--opt")
    # BoRAD: the CNN's own taps (no adapter options) and the paper's optimizer / schedule (no lr, no warm-up)
    borad = demo.train_args("borad", "mvtec:/d", str(tmp_path), demo.DEMO)
    assert _argv_options(borad, "--iters") == ["300"] and _argv_options(borad, "--batch-size") == ["8"]
    assert _argv_options(borad, "--image-size") == ["256"]
    assert "--lr" not in borad and "--opt" not in borad and "--set" not in borad
    # UIP-AD (provisional numbers): the RGB-D spec it is given, its dataset's size, both modalities
    uipad = demo.train_args("uipad", "mvtec3d:/d", str(tmp_path), demo.DEMO)
    assert _argv_options(uipad, "--data") == ["mvtec3d:/d"]
    assert _argv_options(uipad, "--image-size") == [str(demo.DEMO["data"]["rgbd"]["size"])]
    assert 'mode="rgbd"' in _argv_options(uipad, "--set")
    assert demo.model_settings(demo.DEMO, "uipad")["data"] == "rgbd"
    for argv in (dpdiff, borad, uipad):  # what the demo runs parses as a `fastproto train` command line
        assert parser.parse_args(argv).command == "train"


def test_model_settings_errors_name_the_problem():
    with pytest.raises(ValueError, match="no configuration for model 'nomodel'.*dpdiff.*borad.*uipad"):
        demo.model_settings(demo.DEMO, "nomodel")
    bad = {**demo.DEMO, "models": {"dpdiff": {"iters": 1, "lr": 1e-3, "learning_rate": 1}}}
    with pytest.raises(ValueError, match=r"'dpdiff'.*unknown key\(s\) \['learning_rate'\]"):
        demo.model_settings(bad, "dpdiff")
    bad = {**demo.DEMO, "models": {"dpdiff": {"iters": 1}}}
    with pytest.raises(ValueError, match=r"'dpdiff'.*missing \['lr'\]"):
        demo.model_settings(bad, "dpdiff")
    bad = {**demo.DEMO, "models": {"uipad": {"iters": 1, "lr": 1e-3, "data": "depth"}}}
    with pytest.raises(ValueError, match="'uipad'.*dataset 'depth'"):
        demo.model_settings(bad, "uipad")
    bad = {**demo.DEMO, "models": {"borad": {"iters": 1, "lr": None, "schedule": "cosine"}}}
    with pytest.raises(ValueError, match="'borad'.*schedule must be one of"):
        demo.model_settings(bad, "borad")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick demo of every model through the CLI, both option spellings mixed; records the datasets
    generated."""
    out = tmp_path_factory.mktemp("demo")
    generated = []
    original = demo.generate_data

    def spy(name, *args, **kwargs):
        generated.append(name)
        return original(name, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(demo, "generate_data", spy)
        argv = ["demo", "--quick", "--out", str(out), "--model", "uipad", "--models", "inpformer,dinomaly",
                "--model", "proad", "--model", "dpdiff,borad", "--model", "proad"]
        assert main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    return out, report, generated


def test_quick_demo_runs_every_model_in_order_on_its_dataset(quick_run):
    out, report, generated = quick_run
    assert list(report["models"]) == list(ORDER)  # the repeated name runs once
    assert generated == ["rgbd", "rgb"]  # each dataset once, in the order first needed
    assert (out / "data" / "fastproto_synthetic.json").is_file()
    assert (out / "data_rgbd" / "fastproto_synthetic_rgbd.json").is_file()
    for name, entry in report["models"].items():
        kind = "rgbd" if name == "uipad" else "rgb"
        assert entry["dataset"] == kind
        assert entry["data"] == f"{demo.DATASETS[kind]['format']}:{out / demo.DATASETS[kind]['folder']}"
        assert report["datasets"][kind]["spec"] == entry["data"]
        assert entry["step"] == demo.QUICK["models"][name]["iters"]


@pytest.mark.parametrize("name", ORDER)
def test_quick_demo_writes_each_model(quick_run, name):
    out, report, _ = quick_run
    folder = out / name
    assert all((folder / f).is_file() for f in RUN_FILES), sorted(p.name for p in folder.iterdir())
    assert list((folder / "overlays").rglob("*.png"))
    results = report["models"][name]["results"]
    categories = demo.QUICK["data"][report["models"][name]["dataset"]]["categories"]
    assert set(results) == {*categories, "mean"}
    for cat in categories:
        assert set(METRICS) <= set(results[cat]), (name, cat, sorted(results[cat]))
        for key in METRICS:
            value = results[cat][key]
            assert value is not None and math.isfinite(value) and 0.0 <= value <= 1.0, (name, cat, key, value)
        assert results[cat]["mad"] == pytest.approx(sum(results[cat][k] for k in METRICS) / len(METRICS))
    # the demo's report holds the run's own results, not a copy of another model's
    assert results == json.loads((folder / "results.json").read_text())["results"]
    text = (out / "results.md").read_text()
    section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
    assert f"dataset `{report['models'][name]['dataset']}`" in section and "| mean |" in section


def test_quick_demo_passes_each_models_switches_to_train(quick_run):
    out, _, _ = quick_run
    config = {n: json.loads((out / n / "config.json").read_text()) for n in ORDER}
    adapter = dict(demo.QUICK["backbone_kwargs"])
    assert config["borad"]["model"]["backbone_kwargs"] == {} and config["borad"]["train"]["optimizer"] == {}
    assert config["dpdiff"]["model"]["backbone_kwargs"] == adapter
    assert config["dpdiff"]["train"]["optimizer"] == {"lr": 1e-3, "warmup_iters": 0, "warmup_epochs": None}
    assert config["uipad"]["model"]["cfg"]["mode"] == "rgbd" and config["uipad"]["data"]["spec"].startswith("mvtec3d:")
    assert all(config[n]["data"]["spec"].startswith("mvtec:") for n in ORDER if n != "uipad")


def test_quick_demo_times_the_evaluator_on_the_first_models_maps(quick_run):
    out, report, _ = quick_run
    timing = report["timing"]
    if timing is None:
        pytest.skip("scikit-learn is not installed")
    d = demo.QUICK["data"]["rgbd"]
    assert timing["pixels"] == len(d["categories"]) * d["n_test"] * d["size"] ** 2
    assert "uipad's test maps" in (out / "results.md").read_text()


def test_quick_demo_generates_only_the_data_it_needs_and_reuses_it(tmp_path, capsys):
    assert main(["demo", "--quick", "--model", "dinomaly", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / "data_rgbd").exists()
    meta = tmp_path / "data" / "fastproto_synthetic.json"
    stamp = meta.stat().st_mtime_ns
    spec = demo.generate_data("rgb", str(tmp_path / "data"), demo.QUICK["data"]["rgb"], seed=0)
    assert spec == f"mvtec:{tmp_path / 'data'}" and meta.stat().st_mtime_ns == stamp
    report = json.loads((tmp_path / "results.json").read_text())
    assert list(report["models"]) == ["dinomaly"] and list(report["datasets"]) == ["rgb"]
    assert "| mean |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["--model", "dpdiff"], ["dpdiff"]),
    (["--models", "borad, uipad"], ["borad", "uipad"]),
    (["--model", "borad", "--models", "uipad,inpformer", "--model", "dinomaly"],
     ["borad", "uipad", "inpformer", "dinomaly"]),
    ([], None),  # the demo's default models
])
def test_cli_model_options(monkeypatch, tmp_path, argv, expected):
    calls = []
    monkeypatch.setattr(demo, "run", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--out", str(tmp_path), "--seed", "3", *argv]) == 0
    assert calls == [{"out": str(tmp_path), "models": expected, "quick": False, "seed": 3}]


def test_cli_help_lists_every_demo_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--model" in help_text and "--models" in help_text
    assert all(name in help_text for name in ORDER)


@pytest.mark.parametrize("models", ["nomodel", "inpformer,nomodel"])
def test_cli_unknown_model_is_a_clear_error_before_any_work(tmp_path, capsys, models):
    assert main(["demo", "--quick", "--models", models, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'nomodel'" in err and all(name in err for name in ORDER)
    assert not list(tmp_path.iterdir())  # no data generated, no model trained


def test_cli_empty_model_list_is_an_error(tmp_path, capsys):
    assert main(["demo", "--model", " , ", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
