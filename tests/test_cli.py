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
    assert proc.returncode == 0 and "eval" in proc.stdout
