"""experiments/measured/ stays valid: every stored run is one of a registered experiment, renders with that
experiment's renderer, has every figure the experiment draws, and its verdict agrees with its own arrays."""

import json
from pathlib import Path

import numpy as np
import pytest

from experiments import registry

MEASURED = Path(__file__).resolve().parents[1] / "experiments" / "measured"
RUNS = sorted(p.name for p in MEASURED.iterdir() if (p / "results.json").exists())


def test_every_measured_run_is_a_registered_experiment():
    assert RUNS and set(RUNS) <= set(registry.NAMES), RUNS


@pytest.mark.parametrize("name", RUNS)
def test_measured_results_render_and_have_their_figures(name):
    results = json.loads((MEASURED / name / "results.json").read_text())
    experiment = registry.experiment(name)
    text = experiment.render(results)
    assert "|" in text and len(text.splitlines()) >= 3, text  # a markdown table at least
    # Every figure the experiment draws at its defaults is stored beside the results.
    assert {p.name for p in (MEASURED / name).glob("*.png")} == set(experiment.figure_files)


def test_measured_init_verdict_counts_its_own_pairs():
    """The README quotes this run: BN above plain in 112 of 128 (scale, seed) pairs."""
    results = json.loads((MEASURED / "init" / "results.json").read_text())
    bn = np.asarray(results["train_accuracy"]["batchnorm"], float)[..., -1]
    plain = np.asarray(results["train_accuracy"]["plain"], float)[..., -1]
    assert bn.shape == (8, 16)
    wins = int(np.sum(bn > plain + 1e-6))
    assert wins == 112
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{wins} of {bn.size}" in readme
