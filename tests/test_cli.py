"""The console script: info, eval on a saved .npz, and clear errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from fastproto.cli import main
from fastproto.metrics import Evaluator
from tests._data import blob_masks, maps_for


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "implementations:" in out
    from fastproto import _ext
    from fastproto.info import info

    impls = info(print_out=False)["implementations"]
    want = "built" if _ext.has_op("sinkhorn_solve", "cuda") else "not built"
    assert impls["sinkhorn"]["impl='cuda'"] == want and "impl='cuda'" not in impls["anomaly_map"]


def test_eval_npz_matches_evaluator(tmp_path, rng, capsys):
    masks = blob_masks(rng, 12, 20, 20)
    masks[:2, 1, 1] = True
    masks[-2:] = False
    maps = maps_for(rng, masks)
    cats = np.array(["a", "b"] * 6)
    path = tmp_path / "maps.npz"
    np.savez(path, anomaly_maps=maps, masks=masks, categories=cats)
    out_json = tmp_path / "out.json"
    assert main(["eval", str(path), "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    assert "| a |" in table and "| mean |" in table
    got = json.loads(out_json.read_text())
    ev = Evaluator()
    ev.update(maps, masks, categories=list(cats))
    expected = ev.compute()
    for cat in expected:
        for key, value in expected[cat].items():
            assert got[cat][key] == pytest.approx(value, abs=1e-12), (cat, key)


def test_eval_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    path = tmp_path / "bad.npz"
    np.savez(path, maps=np.zeros((1, 4, 4)))
    assert main(["eval", str(path)]) == 2
    assert "no array 'anomaly_maps'" in capsys.readouterr().err


def test_console_entry_point():
    proc = subprocess.run([sys.executable, "-m", "fastproto.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("train", "eval", "demo", "bench", "info"))


# ---------------------------------------------------------------------------------------------- train / eval


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    from fastproto.data import synthetic

    root = tmp_path_factory.mktemp("cli_data")
    synthetic.generate(root, categories=("fabric",), n_train=2, n_test=2, size=64, seed=0)
    return f"mvtec:{root}"


def test_parse_overrides_values_and_errors():
    from fastproto.cli import UsageError, parse_overrides, split_model_overrides

    got = parse_overrides(["dropout=0.1", "layers=[0, 1]", "score_rule=max", "sigma=null", "flag=true", "x=a=b"])
    assert got == {"dropout": 0.1, "layers": [0, 1], "score_rule": "max", "sigma": None, "flag": True, "x": "a=b"}
    model, backbone = split_model_overrides({"dropout": 0.1, "backbone.embed_dim": 64})
    assert model == {"dropout": 0.1} and backbone == {"embed_dim": 64}
    for bad in (["dropout"], ["=1"]):
        with pytest.raises(UsageError, match="key=value"):
            parse_overrides(bad)


def test_model_spec_gives_proad_its_token_count():
    from fastproto.cli import build_model, model_spec

    assert model_spec("proad", "efficientnet_lite0", input_size=64)["cfg"] == {"image_size": 64}
    assert model_spec("proad", "efficientnet_lite0", {"image_size": 32}, input_size=64)["cfg"] == {"image_size": 32}
    assert model_spec("inpformer", "efficientnet_lite0", input_size=64)["cfg"] == {}
    spec = model_spec("proad", "efficientnet_lite0", backbone_kwargs={"embed_dim": 32}, input_size=64)
    model = build_model(spec)
    assert model.prototypes.shape == (16, 32)  # 64 px / stride 16 = 4 x 4 tokens of width 32


def test_train_arguments_are_parsed():
    from fastproto.cli import build_parser

    args = build_parser().parse_args(["train", "--model", "proad", "--data", "mvtec:/d", "--crop-size", "none",
                                      "--epochs", "2.5", "--no-resume", "--set", "a=1", "--set", "b=2"])
    assert args.crop_size is None and args.epochs == 2.5 and args.iters is None
    assert args.resume is False and args.set == ["a=1", "b=2"] and args.protocol == "exact"
    # sizes and backbone left unset take the model's paper setting (BoRAD: WRN-50-2 at 256 px, no crop)
    from fastproto.cli import _paper_defaults

    _paper_defaults(args)
    assert (args.backbone, args.image_size, args.crop_size) == ("dinov2_vitb14_reg", 448, None)
    for model, want in (("proad", ("dinov2_vitb14_reg", 448, 392)), ("borad", ("wide_resnet50_2", 256, None))):
        args = build_parser().parse_args(["train", "--model", model, "--data", "mvtec:/d"])
        _paper_defaults(args)
        assert (args.backbone, args.image_size, args.crop_size) == want
    with pytest.raises(SystemExit):  # --iters and --epochs exclude each other
        build_parser().parse_args(["train", "--model", "proad", "--data", "mvtec:/d", "--iters", "1", "--epochs", "1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--checkpoint", "x.pt", "--protocol", "nope"])


def test_compile_flag_reaches_training_and_evaluation(tiny_spec, tmp_path, monkeypatch):
    from fastproto import engine
    from fastproto.cli import build_parser

    base = ["train", "--model", "inpformer", "--data", "mvtec:/d"]
    assert build_parser().parse_args(base).compile is None
    assert build_parser().parse_args([*base, "--compile"]).compile == "inductor"
    assert build_parser().parse_args(["eval", "--checkpoint", "x.pt", "--compile", "aot_eager"]).compile == "aot_eager"
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(model, loader, **kw):
        seen["train"] = kw["compile"]
        kw["eval_fn"](model)

    def fake_evaluate(model, loader, **kw):
        seen["evaluate"] = kw["compile"]
        raise Stop

    monkeypatch.setattr(engine, "train", fake_train)
    monkeypatch.setattr(engine, "evaluate", fake_evaluate)
    with pytest.raises(Stop):
        main(["train", "--no-pretrained", "--quiet", "--model", "inpformer", "--data", tiny_spec, "--backbone",
              "efficientnet_lite0", "--image-size", "64", "--crop-size", "none", "--iters", "1", "--batch-size", "2",
              "--out", str(tmp_path), "--workers", "0", "--eval-every", "1", "--compile", "aot_eager_decomp_partition"])
    assert seen == {"train": "aot_eager_decomp_partition", "evaluate": "aot_eager_decomp_partition"}


@pytest.mark.parametrize("argv, message", [
    (["--data", "nope:/x"], "dataset spec must be '<format>:<path>'"),
    (["--data", "mvtec:/does/not/exist"], "dataset root does not exist: /does/not/exist"),
    (["--categories", "fabric,carpet"], "unknown category ['carpet']"),
    (["--model", "nomodel"], "unknown model 'nomodel'"),
    (["--set", "no_such_option=1"], "unknown option(s) ['no_such_option']"),
    (["--set", "backbone.no_such_option=1"], "no_such_option"),
    (["--set", "dropout"], "--set expects key=value"),
    (["--batch-size", "64"], "--batch-size 64 x 1 rank(s) exceeds the 2 training images"),
])
def test_train_errors_name_the_problem(tiny_spec, tmp_path, capsys, argv, message):
    base = {"--model": "inpformer", "--data": tiny_spec, "--backbone": "efficientnet_lite0", "--image-size": "64",
            "--crop-size": "none", "--iters": "1", "--batch-size": "2", "--out": str(tmp_path), "--workers": "0"}
    base.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["train", "--no-pretrained", "--quiet", *[x for kv in base.items() for x in kv]]) == 2
    assert message in capsys.readouterr().err


def test_eval_checkpoint_errors_name_the_problem(tmp_path, capsys):
    import torch

    missing = tmp_path / "missing.pt"
    assert main(["eval", "--checkpoint", str(missing)]) == 2
    assert f"checkpoint {str(missing)!r} does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    assert main(["eval", "--checkpoint", str(corrupt)]) == 2
    assert "corrupt.pt" in capsys.readouterr().err
    bare = tmp_path / "weights.pt"  # exported weights with no config.json beside them
    torch.save({"w": torch.zeros(2)}, bare)
    assert main(["eval", "--checkpoint", str(bare)]) == 2
    err = capsys.readouterr().err
    assert "no model config" in err and "config.json" in err
    assert main(["eval"]) == 2
    assert "either a .npz of anomaly maps or --checkpoint" in capsys.readouterr().err
