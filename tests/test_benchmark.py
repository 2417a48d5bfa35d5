"""``python -m experiments.benchmark``'s pieces that need no timing: its shape parser, its NumPy variant's
subprocess (``python -m experiments.numpy_book``), and that no experiment reaches into tests/."""

import argparse
import json
import re

import numpy as np
import pytest

from experiments import benchmark, benchmark_layers
from experiments.numpy_book import run_sweep
from helpers import ROOT, run_cli


def test_layer_shapes_parse_and_reject():
    assert benchmark_layers.parse_shapes("128x32x32x64, 1024X512") == ((128, 32, 32, 64), (1024, 512))
    for bad in ("", "128", "128x0", "axb", "128x-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark_layers.parse_shapes(bad)
    args = benchmark._parser().parse_args(["--layer-shapes", "8x4"])
    assert args.layer_shapes == ((8, 4),)


def test_numpy_variant_subprocess_is_the_oracle_on_the_bundled_subset():
    # The benchmark's (c) runs the oracle as a module in a fresh process; its JSON must be the in-process sweep.
    proc = run_cli("experiments.numpy_book", "--num-scales", "2", "--epochs", "2", "--train-size", "300",
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["run_s"] > 0
    with np.load(ROOT / "bnjax" / "assets" / "mnist_5k.npz") as z:
        images, labels = z["images"], z["labels"]
    perm = np.random.RandomState(0).permutation(len(labels))[:300]
    acc = run_sweep(images[perm].reshape(300, -1) / 255.0, labels[perm].astype(np.int64), np.logspace(0, -4, 2),
                    num_records=2)
    assert out["final_batchnorm"] == acc["batchnorm"][:, -1].tolist()
    assert out["final_plain"] == acc["plain"][:, -1].tolist()
    assert all(0.0 <= a <= 1.0 for a in out["final_batchnorm"] + out["final_plain"])


def test_no_experiment_reaches_into_tests():
    # A path into tests/ built or quoted in code, an import from it, or a sys.path trick (prose may name tests/).
    pattern = re.compile(r"""["']tests["'/]|^\s*(from|import) tests\b|sys\.path""")
    offenders = [f"{p.name}:{i}" for p in sorted((ROOT / "experiments").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []
