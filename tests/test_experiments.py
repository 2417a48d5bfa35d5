"""The command-line experiments end to end (tiny configurations) and their error handling."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import sweep

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_help_explains_itself():
    proc = _run("experiments.sweep", "--help")
    assert proc.returncode == 0
    for flag in ("--scales", "--num-scales", "--epochs", "--optimizer", "--num-seeds", "--data", "--heldout",
                 "--out", "--dtype", "--no-plot", "--quiet"):
        assert flag in proc.stdout
    assert "same mini-batches" in proc.stdout


def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = sweep.main(["--num-scales", "2", "--epochs", "2", "--num-seeds", "2", "--heldout", "--heldout-size", "50",
                       "--data", "bundled", "--out", str(out), "--quiet", "--no-cache"])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "sweep.png").stat().st_size > 10_000
    assert res["weight_scales"] == [1.0, 1e-4]
    assert np.array(res["train_accuracy"]["batchnorm"]).shape == (2, 2, 2)
    assert np.array(res["train_accuracy"]["plain"]).shape == (2, 2, 2)
    assert np.array(res["heldout_accuracy"]["plain"]).shape == (2, 2, 2)
    assert np.array(res["diverged"]["plain"]).shape == (2, 2)
    assert res["diverged"]["plain"][0][0] is True  # w = 1.0 overflows, as in the book
    assert res["record_steps"] == [1, 11]
    assert set(res["data"]) >= {"name", "train_sha256", "num_train"} and res["data"]["num_train"] == 1000
    assert set(res["timing"]) >= {"compile_s", "run_s", "total_s"}
    assert set(res["environment"]) >= {"jax", "backend", "device_count", "device_kind"}
    for key in ("epochs", "lr", "optimizer", "seed", "num_seeds", "data", "dtype", "batch_size", "train_size"):
        assert key in res["config"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_same_seed_same_results(tmp_path):
    args = ["--scales", "0.1,0.01", "--epochs", "2", "--data", "bundled", "--no-plot", "--quiet", "--no-cache"]
    assert sweep.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert sweep.main(args + ["--out", str(tmp_path / "b")]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["train_accuracy"] == b["train_accuracy"]


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--scales", "0.1,abc"], "--scales"),
        (["--num-scales", "4", "--scales", "0.1"], "not allowed with"),
        (["--optimizer", "sgdd"], "--optimizer"),
        (["--data", "web"], "--data"),
        (["--dtype", "int8"], "--dtype"),
        (["--batch-size", "x"], "--batch-size"),
        (["--data-dir", "/nonexistent/dir"], "--data-dir"),
        (["--data", "bundled", "--train-size", "6000"], "bundled"),
        (["--out", "/proc/forbidden"], "--out"),
    ],
)
def test_bad_options_exit_2_naming_the_problem(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.parse_args(bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_choices_match_the_library():
    from bnjax import data, train

    assert tuple(sweep.OPTIMIZERS) == tuple(train.OPTIMIZERS)
    assert tuple(sweep.DATA_SOURCES) == tuple(data.SOURCES)


def test_summary_table_counts_wins():
    bn = np.array([[[0.1, 0.9], [0.2, 0.3]]])
    plain = np.array([[[0.1, 0.5], [0.2, 0.4]]])
    table, wins = sweep.summary_table([1.0, 0.1], bn, plain, np.array([[False, True]]), np.zeros((1, 2), bool))
    assert wins == 1
    assert "plain diverged" in table and "BN wins at 1 of 2" in table


def test_benchmark_quick_runs(tmp_path):
    proc = _run("experiments.benchmark", "--quick", "--out", str(tmp_path / "bench.json"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    names = [v["name"] for v in res["variants"]]
    assert names[0].startswith("(a)") and any(n.startswith("(b)") for n in names)
    assert any(n.startswith("(c)") for n in names)
    assert res["variants"][0]["ratio_to_a"] == 1.0
    # The variants train the same protocol: their final accuracies agree on finite, non-diverged models.
    assert "ratio" in proc.stdout
