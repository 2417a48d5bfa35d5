"""The layer section of ``python -m experiments.benchmark`` (experiments/benchmark_layers.py): its JSON, its
table and its accuracy check.

Timings are checked to be positive and the ratios to be computed from them; their values are never asserted.
"""

import importlib.util
import json
import math

import jax
import jax.numpy as jnp
import pytest

from bnjax import layers
from experiments import benchmark_layers
from helpers import run_cli

HAS_FLAX = importlib.util.find_spec("flax") is not None
SHAPES = [[64, 4, 4, 8], [64, 16]]  # batch 64: ghost_batch_norm(32) forms two groups


@pytest.mark.slow
def test_layer_section_runs_alone_and_writes_every_variant_and_shape(tmp_path):
    out = tmp_path / "layers.json"
    proc = run_cli("experiments.benchmark", "--layers-only", "--quick", "--layer-shapes",
                   ",".join("x".join(map(str, s)) for s in SHAPES), "--layer-repeats", "3", "--out", out,
                   timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True and "variants" not in res and "scaling" not in res  # only the layer section ran
    lay = res["layers"]
    expected = ["bnjax", "bnjax_renorm", "bnjax_ghost32"] + (["flax_fast", "flax_two_pass"] if HAS_FLAX else [])
    assert list(lay["variants"]) == expected and lay["flax"] is HAS_FLAX and lay["repeats"] == 3
    if not HAS_FLAX:
        assert "flax" in lay["note"] and "flax" in proc.stdout
    assert [row["shape"] for row in lay["shapes"]] == SHAPES
    for row in lay["shapes"]:
        assert sorted(row["ms"]) == sorted(expected)
        assert all(math.isfinite(t) and t > 0 for t in row["ms"].values())
        for name in expected:
            assert row["ratio_to_bnjax"][name] == pytest.approx(row["ms"][name] / row["ms"]["bnjax"], rel=1e-12)
        if HAS_FLAX:
            assert row["ratio_flax_to_bnjax"] == pytest.approx(row["ms"]["flax_fast"] / row["ms"]["bnjax"],
                                                               rel=1e-12)
        else:
            assert row["ratio_flax_to_bnjax"] is None
        acc = row["accuracy"]
        assert acc["mean"] == 1e4 and 0.5 < acc["true_var_max"] < 3
        # bnjax's two-pass variance survives mean / std = 1e4 in float32; the one-pass formula does not.
        assert acc["bnjax"]["var_rel_err"] < 1e-2 and acc["bnjax"]["out_max_abs_err"] < 1e-2
        assert acc["one_pass_f32"]["var_rel_err"] > 1e-2
        if HAS_FLAX:
            assert acc["flax_fast"]["var_rel_err"] > 1e-2  # Flax's default is the one-pass formula
            assert acc["flax_two_pass"]["var_rel_err"] < 1e-2
    table = proc.stdout
    assert "layer speed" in table and "accuracy" in table and "64x4x4x8" in table and "64x16" in table
    assert ("flax fast / bnjax" in table) is HAS_FLAX


def _one_pass_stats(x, feature_axes=-1):
    """A one-pass E[x^2] - E[x]^2 in place of bnjax's two-pass batch statistics (features last)."""
    red = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=red)
    var = jnp.maximum(jnp.mean(jnp.square(x), axis=red) - jnp.square(mean), 0.0)
    return mean, var, jnp.asarray(float(math.prod(x.shape[:-1])), x.dtype)


def _one_pass_apply(params, state, x, *, train):
    """``batch_norm_apply`` in training mode, normalising with the one-pass variance (state returned as is)."""
    mean, var, _ = _one_pass_stats(x)
    return (x - mean) / jnp.sqrt(var + layers.CONVENTIONS["eps"]) * params.gamma + params.beta, state


def test_accuracy_check_fails_a_one_pass_variance(monkeypatch):
    key = jax.random.key(3)
    good = benchmark_layers.layer_accuracy((256, 32), key)["bnjax"]
    assert good["var_rel_err"] < 1e-2 and good["out_max_abs_err"] < 1e-2
    # The check reads bnjax's variance from layers.batch_norm_stats and its output from layers.batch_norm_apply:
    # a one-pass variance must show in each error.
    monkeypatch.setattr(layers, "batch_norm_stats", _one_pass_stats)
    monkeypatch.setattr(layers, "batch_norm_apply", _one_pass_apply)
    bad = benchmark_layers.layer_accuracy((256, 32), key)["bnjax"]
    assert bad["var_rel_err"] > 1e-2 and bad["out_max_abs_err"] > 1e-2
