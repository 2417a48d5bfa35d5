"""experiments.small_batch: the verdict on hand-made numbers, the arms the options describe, the measurements
after training against the model's own functions, and the CLI end to end."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import data, grid, layers, model
from experiments import protocol, small_batch
from helpers import assert_quick_run, read_results, run_quick


def _hand_made():
    """Two batch sizes (2, 100), three seeds: held-out accuracy and the measurements after training."""
    heldout = {
        "plain@2": [0.8, 0.8, 0.8], "batchnorm@2": [0.2, 0.3, 0.1], "renorm@2": [0.4, 0.3, 0.2],
        "ghost@2": [0.1, 0.3, 0.1],
        "plain@100": [0.7, 0.7, 0.7], "batchnorm@100": [0.9, 0.9, 0.9], "renorm@100": [0.9, 0.8, 0.95],
        "ghost@100": [0.9, 0.9, 0.9],
    }
    heldout = {k: np.asarray(v) for k, v in heldout.items()}
    post = {}
    for norm, gaps, precise in (("batchnorm", (0.3, 0.01), (0.5, 0.9)), ("renorm", (0.1, 0.02), (0.3, 0.95)),
                                ("ghost", (0.2, 0.0), (0.1, 0.92))):
        for b, gap, prec in zip((2, 100), gaps, precise):
            eval_mode = np.array([0.5, 0.6, 0.7])
            post[f"{norm}@{b}"] = {"train_mode": eval_mode + gap, "eval_mode": eval_mode,
                                   "heldout_precise": np.full(3, prec)}
    return heldout, post


def test_verdict_on_hand_made_numbers():
    heldout, post = _hand_made()
    v = small_batch.verdict((2, 100), heldout, post)
    small, large = v["per_batch"]
    assert small["batch_size"] == 2 and large["batch_size"] == 100
    assert small["batchnorm"]["mean"] == pytest.approx(0.2)
    half = 4.303 * np.std([0.2, 0.3, 0.1], ddof=1) / np.sqrt(3)
    # an accuracy interval is clipped to [0, 1]
    assert small["batchnorm"]["low"] == 0.0 and small["batchnorm"]["high"] == pytest.approx(0.2 + half)
    assert large["renorm"]["low"] == pytest.approx(
        np.mean([0.9, 0.8, 0.95]) - 4.303 * np.std([0.9, 0.8, 0.95], ddof=1) / np.sqrt(3))
    assert small["plain"]["low"] == pytest.approx(0.8) and "mismatch" not in small["plain"]
    assert small["batchnorm"]["mismatch"] == pytest.approx(0.3) and small["renorm"]["mismatch"] == pytest.approx(0.1)
    assert small["batchnorm"]["precise"] == pytest.approx(0.5)
    assert small["renorm_beats_bn"] == {"wins": 2, "losses": 0, "ties": 1}
    assert small["ghost_beats_bn"] == {"wins": 0, "losses": 1, "ties": 2}
    assert large["renorm_beats_bn"] == {"wins": 1, "losses": 1, "ties": 1}
    assert v["renorm_vs_bn"] == {"wins": 3, "losses": 1, "ties": 2, "p_value": pytest.approx(0.625)}
    assert v["ghost_vs_bn"]["wins"] == 0 and v["ghost_vs_bn"]["losses"] == 1
    assert v["bn_drop"] == pytest.approx(0.2 - 0.9)
    assert v["renorm_reduces_mismatch"] == [2]  # 0.1 < 0.3 at B=2; 0.02 > 0.01 at B=100
    # precise above the running averages: BN 0.5 > 0.2 at B=2 (0.9 = 0.9 at 100 is no gain); renorm 0.95 > 0.883 at B=100; ghost 0.92 > 0.9
    assert v["precise_helps"] == {"batchnorm": [2], "renorm": [100], "ghost": [100]}
    assert v["num_seeds"] == 3
    md = small_batch.render({"verdict": v, "config": {"epochs": 10}})
    lines = md.splitlines()
    assert any("sign test p = 0.62" in line for line in lines)
    assert any(line.endswith("at B = 2") and "mismatch" in line for line in lines)
    assert "| 2 | 0.800 [0.800, 0.800] | 0.200 [0.000, " in md
    # mismatch / precise of BN, Batch Renorm and Ghost BN at B = 2
    assert "| 2 | +0.300 / 0.500 | +0.100 / 0.300 | +0.200 / 0.100 |" in md


def _args(**changes):
    args = protocol.parse_args(small_batch.EXPERIMENT, ["--out", "/tmp/bnjax-never-written-small-batch"])
    return argparse.Namespace(**{**vars(args), **changes})


def test_the_arms_the_options_describe():
    args = _args(batch_sizes=(4, 50), reference_batch=50, lr=0.2, momentum=0.8, renorm_momentum=0.95, r_max=2.0,
                 d_max=1.0, renorm_warmup=0.4)
    config = small_batch.grid_config(args, 1000)
    assert list(config.arms) == ["plain@4", "batchnorm@4", "renorm@4", "ghost@4",
                                 "plain@50", "batchnorm@50", "renorm@50", "ghost@50"]
    assert config.batch_size == 50 and config.learning_rate == 0.2 and config.axes == {}
    a = config.arms
    assert a["plain@4"].norm is False and a["plain@4"].batch_size == 4
    assert a["plain@4"].learning_rate_scale == pytest.approx(4 / 50)
    assert a["batchnorm@4"].norm == layers.batch_norm(0.8, init_var=0.0)
    # the renorm warm-up is a share of the arm's own updates: 1 + 9 * 250 at B=4
    updates = 1 + 9 * 250
    end = round(0.4 * updates)
    assert a["renorm@4"].norm == layers.batch_renorm(0.95, r_max=2.0, d_max=1.0, warmup=(end // 4, end, end))
    assert a["ghost@4"].norm == layers.ghost_batch_norm(4, 0.8, init_var=0.0)
    assert a["ghost@4"].batch_size is None and a["ghost@4"].learning_rate_scale == 1.0
    assert {arm.init_stream for arm in a.values()} == {0} and {arm.weight_init for arm in a.values()} == {"he"}
    assert _args(renorm_warmup=0.0) and small_batch.renorm_value(_args(renorm_warmup=0.0), 100).warmup is None


@pytest.mark.slow
def test_measurements_after_training_are_the_models_own(tmp_path):
    ds = data.load_bundled(60, 40)
    args = _args(batch_sizes=(3, 12), reference_batch=12, epochs=2, num_seeds=2)
    config = small_batch.grid_config(args, 60).replace(keep_final=True, hidden_sizes=(16, 16))
    result = grid.run_grid(config, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    post = small_batch.after_training(config, result, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    assert set(post) == {n for n in config.arms if not n.startswith("plain")}
    # ghost BN with groups as large as the batch is batch norm: the same models, bit for bit
    for m in ("train_accuracy", "heldout_accuracy"):
        np.testing.assert_array_equal(result.metrics[m]["ghost@12"], result.metrics[m]["batchnorm@12"])
    for name in ("batchnorm@3", "renorm@3", "ghost@3"):
        arm = config.arms[name]
        net = config.network(arm, 784)
        b = grid.arm_batch_size(config, arm)
        for s in range(2):
            params = jax.tree_util.tree_map(lambda l: l[s], result.final[name].params)
            state = jax.tree_util.tree_map(lambda l: l[s], result.final[name].state)
            right = 0
            for i in range(60 // b):  # training mode, the training images in order, batches of the arm's size
                logits, _ = model.apply(net, params, state, ds.x_train[i * b:(i + 1) * b], train=True)
                right += int(np.sum(np.argmax(np.asarray(logits), -1) == ds.t_train[i * b:(i + 1) * b]))
            assert post[name]["train_mode"][s] == pytest.approx(right / 60)
            assert post[name]["eval_mode"][s] == pytest.approx(
                float(model.accuracy(net, params, state, ds.x_train, ds.t_train)))
            precise = model.recalibrate(net, params, state, jnp.asarray(ds.x_train).reshape(60 // b, b, 784))
            assert post[name]["heldout_precise"][s] == pytest.approx(
                float(model.accuracy(net, params, precise, ds.x_heldout, ds.t_heldout)))
            # the engine's last record is the evaluation-mode accuracy of these final models
            assert result.metrics["train_accuracy"][name][s, -1] == pytest.approx(post[name]["eval_mode"][s])
    assert result.arm_record_steps["batchnorm@3"].tolist() == [1, 21]
    assert result.arm_record_steps["ghost@3"].tolist() == [1, 6]


# batch sizes 2 and 10 (the reference), 2 epochs, 2 seeds, 100 images, the renorm warm-up half the updates
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m experiments.small_batch`` at the registry's quick options (figures drawn), run once."""
    out = tmp_path_factory.mktemp("small_batch") / "sb"
    return run_quick("small_batch", out), out


@pytest.mark.slow
def test_quick_run_records_a_verdict_and_prints_its_rendering(quick_run):
    assert_quick_run("small_batch", *quick_run)


@pytest.mark.slow
def test_cli_writes_figures_results_and_verdict(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stderr
    res = read_results(out)
    assert res["batch_sizes"] == [2, 10] and res["seeds"] == [0, 1]
    assert res["arm_record_steps"]["plain@2"] == [1, 51] and res["arm_record_steps"]["ghost@2"] == [1, 11]
    assert res["arms"]["renorm@2"]["norm"]["norm"] == "BatchRenorm"
    assert res["arms"]["renorm@2"]["norm"]["warmup"] == [6, 26, 26]  # half of 51 updates
    assert res["arms"]["ghost@2"]["norm"]["virtual_batch_size"] == 2
    final = {name: np.asarray(v)[..., -1] for name, v in res["heldout_accuracy"].items()}
    row = res["verdict"]["per_batch"][0]
    assert row["renorm"]["mean"] == pytest.approx(final["renorm@2"].mean())
    assert row["batchnorm"]["mismatch"] == pytest.approx(
        np.mean(np.asarray(res["after_training"]["batchnorm@2"]["train_mode"])
                - np.asarray(res["after_training"]["batchnorm@2"]["eval_mode"])))
    for png in small_batch.EXPERIMENT.figure_files:
        assert (out / png).stat().st_size > 10_000
    assert "Batch Renorm above BN in" in r.stdout
    assert "| B |" in small_batch.render(res) and small_batch.render(res).strip() in r.stdout
