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
        # Group Norm best at B=2 with its interval clear of the others'; at B=100 Layer Norm's mean is the best
        # but its interval overlaps BN's, Batch Renorm's, Ghost BN's and Group Norm's
        "groupnorm@2": [0.85, 0.86, 0.84], "layernorm@2": [0.6, 0.7, 0.65],
        "groupnorm@100": [0.9, 0.88, 0.92], "layernorm@100": [0.95, 0.85, 0.92],
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
    # the best norm per batch size (the plain net is no norm: 0.8 > 0.2 at B=2 does not count)
    assert small["best"] == "groupnorm" and small["overlapping"] == []
    assert large["best"] == "layernorm"
    assert large["overlapping"] == ["batchnorm", "renorm", "ghost", "groupnorm"]
    assert small["groupnorm_beats_bn"] == {"wins": 3, "losses": 0, "ties": 0}
    assert v["layernorm_vs_bn"] == {"wins": 5, "losses": 1, "ties": 0, "p_value": pytest.approx(0.21875)}
    assert "mismatch" not in small["groupnorm"] and "precise" not in small["layernorm"]
    md = small_batch.render({"verdict": v, "config": {"epochs": 10}})
    lines = md.splitlines()
    assert any("sign test p = 0.62" in line for line in lines)
    assert any(line.endswith("at B = 2") and "mismatch" in line for line in lines)
    assert "| 2 | 0.800 [0.800, 0.800] | 0.200 [0.000, " in md
    assert " | Group Norm 0.850 (its interval clear of every other norm's) |" in md
    assert (" | Layer Norm 0.907 (intervals overlap BN, Batch Renorm, Ghost BN, Group Norm) |" in md)
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
                                 "plain@50", "batchnorm@50", "renorm@50", "ghost@50",
                                 "groupnorm@4", "layernorm@4", "groupnorm@50", "layernorm@50"]
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
    # Group Norm: 10 groups of the 100 hidden units; both like the plain net: own batch, scaled lr
    assert a["groupnorm@4"].norm == layers.group_norm(10) and a["layernorm@4"].norm == layers.layer_norm()
    for name in ("groupnorm@4", "layernorm@4"):
        assert a[name].batch_size == 4 and a[name].learning_rate_scale == pytest.approx(4 / 50)
    assert {arm.init_stream for arm in a.values()} == {0} and {arm.weight_init for arm in a.values()} == {"he"}
    assert _args(renorm_warmup=0.0) and small_batch.renorm_value(_args(renorm_warmup=0.0), 100).warmup is None


@pytest.mark.parametrize("num_seeds,num_devices", [(4, 1), (4, 2), (8, 1), (3, 2), (40, 4)])
def test_the_added_arms_keep_the_chunks_of_the_others(num_seeds, num_devices):
    # the seed block shapes the compiled program (and its rounding): the arms that were there before Group and
    # Layer Norm keep the layout the memory budget gave them without those (measured: a seed block of 2 instead
    # of 4 moved Ghost BN at B = 4 by 0.09 on the default run)
    args = _args(num_seeds=num_seeds)
    config = small_batch.grid_config(args, 1000, 784, num_devices)
    before = {n: a for n, a in config.arms.items() if not n.startswith(("groupnorm", "layernorm"))}
    old = config.replace(arms=before, max_models_per_chunk=None)
    assert grid.plan_layout(config, num_devices) == grid.plan_layout(old, num_devices)
    assert config.max_models_per_chunk <= 1.5 * grid.plan_layout(old, num_devices).models_per_chunk(len(before))
    # an explicit --max-models-per-chunk is kept as given
    assert small_batch.grid_config(_args(max_models_per_chunk=7), 1000).max_models_per_chunk == 7


def test_group_count_is_a_function_of_the_network():
    def count(**fields):
        return small_batch.group_count(grid.GridConfig(**fields))

    assert small_batch.normalised_widths(grid.GridConfig()) == ((), (100,) * 5)
    assert count() == 10  # 100 units: at most 32 groups, at least 10 units each
    assert count(hidden_sizes=(20, 40)) == 2 and count(hidden_sizes=(16, 16)) == 1 and count(hidden_sizes=(1000,)) == 25
    assert count(hidden_sizes=(640,)) == 32  # Wu & He's 32 groups where the width allows it
    # the conv net: its 30 channels and its hidden Affine's 100 units, 10 groups of 3 channels / 10 units
    conv = grid.GridConfig(model="convnet", hidden_sizes=(100,))
    assert small_batch.normalised_widths(conv) == ((30,), (100,))
    assert small_batch.group_count(conv) == 10


def test_model_convnet_trains_the_conv_net_with_the_same_arms():
    args = protocol.parse_args(small_batch.EXPERIMENT, ["--out", "/tmp/bnjax-never-written-small-batch", "--model",
                                                        "convnet", "--batch-sizes", "4,20", "--num-seeds", "12"])
    config = small_batch.grid_config(args, 1000)
    assert config.model == "convnet" and config.hidden_sizes == (100,)
    assert list(config.arms) == list(small_batch.grid_config(_args(batch_sizes=(4, 20), num_seeds=12), 1000).arms)
    assert config.arms["groupnorm@4"].norm == layers.group_norm(10)
    # the planner sees the conv net's far larger activations: fewer models per chunk than the MLP's
    mlp = small_batch.grid_config(_args(batch_sizes=(4, 20), num_seeds=12), 1000)
    assert config.max_models_per_chunk < mlp.max_models_per_chunk


@pytest.mark.slow
def test_measurements_after_training_are_the_models_own(tmp_path):
    ds = data.load_bundled(60, 40)
    args = _args(batch_sizes=(3, 12), reference_batch=12, epochs=2, num_seeds=2)
    # 20 hidden units: the default's 10 groups still divide them
    config = small_batch.grid_config(args, 60).replace(keep_final=True, hidden_sizes=(20, 20))
    result = grid.run_grid(config, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    post = small_batch.after_training(config, result, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    assert set(post) == {n for n in config.arms if n.split("@")[0] in small_batch.NORMALISED}
    # the added arms change no other arm's numbers: the same grid without them gives the same metrics, bit for bit
    old = {n: arm for n, arm in config.arms.items() if not n.startswith(("groupnorm", "layernorm"))}
    alone = grid.run_grid(config.replace(arms=old, keep_final=False), ds.x_train, ds.t_train, ds.x_heldout,
                          ds.t_heldout)
    for m in ("train_accuracy", "heldout_accuracy", "train_loss"):
        for name in old:
            np.testing.assert_array_equal(alone.metrics[m][name], result.metrics[m][name], err_msg=f"{m} {name}")
    # ghost BN with groups as large as the batch is batch norm: the same models, bit for bit
    for m in ("train_accuracy", "heldout_accuracy"):
        np.testing.assert_array_equal(result.metrics[m]["ghost@12"], result.metrics[m]["batchnorm@12"])
    # jitted once per network (eager op-by-op dispatch made this loop most of the test's time)
    apply = jax.jit(model.apply, static_argnums=0, static_argnames="train")
    for name in ("batchnorm@3", "renorm@3", "ghost@3"):
        arm = config.arms[name]
        net = config.network(arm, 784)
        b = grid.arm_batch_size(config, arm)
        for s in range(2):
            params = jax.tree_util.tree_map(lambda l: l[s], result.final[name].params)
            state = jax.tree_util.tree_map(lambda l: l[s], result.final[name].state)
            right = 0
            for i in range(60 // b):  # training mode, the training images in order, batches of the arm's size
                logits, _ = apply(net, params, state, ds.x_train[i * b:(i + 1) * b], train=True)
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
    assert "Warning" not in r.stderr, r.stderr[-3000:]
    res = read_results(out)
    assert res["batch_sizes"] == [2, 10] and res["seeds"] == [0, 1]
    assert res["arm_record_steps"]["plain@2"] == [1, 51] and res["arm_record_steps"]["ghost@2"] == [1, 11]
    assert res["arms"]["renorm@2"]["norm"]["norm"] == "BatchRenorm"
    assert res["arms"]["renorm@2"]["norm"]["warmup"] == [6, 26, 26]  # half of 51 updates
    assert res["arms"]["ghost@2"]["norm"]["virtual_batch_size"] == 2
    assert res["arms"]["groupnorm@2"]["norm"] == {"norm": "GroupNorm", "num_groups": 10, "eps": 1e-6,
                                                  "use_scale": True, "use_offset": True}
    assert res["arms"]["layernorm@10"]["norm"]["norm"] == "LayerNorm"
    assert set(res["after_training"]) == {f"{n}@{b}" for n in small_batch.NORMALISED for b in (2, 10)}
    final = {name: np.asarray(v)[..., -1] for name, v in res["heldout_accuracy"].items()}
    row = res["verdict"]["per_batch"][0]
    means = {n: final[f"{n}@2"].mean() for n in small_batch.CANDIDATES}
    assert means[row["best"]] == max(means.values()) and "Group Norm above BN in" in r.stdout
    assert row["renorm"]["mean"] == pytest.approx(final["renorm@2"].mean())
    assert row["batchnorm"]["mismatch"] == pytest.approx(
        np.mean(np.asarray(res["after_training"]["batchnorm@2"]["train_mode"])
                - np.asarray(res["after_training"]["batchnorm@2"]["eval_mode"])))
    for png in small_batch.EXPERIMENT.figure_files:
        assert (out / png).stat().st_size > 10_000
    assert "Batch Renorm above BN in" in r.stdout
    assert "| B |" in small_batch.render(res) and small_batch.render(res).strip() in r.stdout


# --------------------------------------------------------------------------------------------------
# What the reader sees: the tables, the sentences and the figures, against the arrays
# --------------------------------------------------------------------------------------------------


def _interval(values):
    """NumPy oracle: mean and Student-t 95 % interval (t = 4.303 for 3 seeds) clipped to [0, 1]."""
    values = np.asarray(values, float)
    half = 4.303 * values.std(ddof=1) / np.sqrt(values.size)
    return values.mean(), max(values.mean() - half, 0.0), min(values.mean() + half, 1.0)


def test_render_tables_and_sentences_put_each_norm_in_its_own_column():
    import json
    import re

    from presentation import markdown_tables

    heldout, post = _hand_made()
    v = small_batch.verdict((2, 100), heldout, post)
    md = small_batch.render(json.loads(json.dumps({"verdict": v, "config": {"epochs": 10}}, default=float)))
    assert md.startswith("After 10 records, 3 seeds.\n")
    accuracy, mismatch = markdown_tables(md)
    assert accuracy[0] == ["B", "plain", "BN", "Batch Renorm", "Ghost BN", "Group Norm", "Layer Norm", "best norm"]
    assert mismatch[0] == ["B", "BN mismatch / precise", "Batch Renorm mismatch / precise",
                           "Ghost BN mismatch / precise"]
    for b, row, gaps in zip((2, 100), accuracy[1:], mismatch[1:]):
        assert row[0] == gaps[0] == str(b)
        for cell, norm in zip(row[1:-1], small_batch.NORMS):
            numbers = [float(t) for t in re.findall(r"[0-9.]+", cell)]
            assert numbers == pytest.approx(_interval(heldout[f"{norm}@{b}"]), abs=5e-4), (b, norm)
        for cell, norm in zip(gaps[1:], small_batch.NORMALISED):
            p = post[f"{norm}@{b}"]
            assert cell == f"{np.mean(p['train_mode'] - p['eval_mode']):+.3f} / {np.mean(p['heldout_precise']):.3f}"
    for other, label in (("renorm", "Batch Renorm"), ("ghost", "Ghost BN"), ("groupnorm", "Group Norm"),
                         ("layernorm", "Layer Norm")):
        diff = np.stack([heldout[f"{other}@{b}"] - heldout[f"batchnorm@{b}"] for b in (2, 100)])
        wins, losses = int(np.sum(diff > 1e-6)), int(np.sum(diff < -1e-6))
        if other in ("renorm", "ghost"):
            assert len({wins, losses, diff.size - wins - losses}) == 3  # distinct, so a swapped count shows
        assert (f"{label} above BN in {wins} of {diff.size} (batch size, seed) pairs, below in {losses}, tied in "
                f"{diff.size - wins - losses}; sign test p = ") in md
    drop = np.mean(heldout["batchnorm@2"]) - np.mean(heldout["batchnorm@100"])
    assert f"BN's held-out accuracy at B=2 minus at B=100: {drop:+.3f}" in md and drop < 0


def test_render_reads_results_written_before_group_and_layer_norm():
    heldout, post = _hand_made()
    v = small_batch.verdict((2, 100), heldout, post)
    for row in v["per_batch"]:  # what a results.json of the four earlier norms holds
        for key in ("groupnorm", "layernorm", "groupnorm_beats_bn", "layernorm_beats_bn", "best", "overlapping"):
            del row[key]
    old = {k: x for k, x in v.items() if k not in ("groupnorm_vs_bn", "layernorm_vs_bn")}
    md = small_batch.render({"verdict": old, "config": {"epochs": 10}})
    assert "| B | plain | BN | Batch Renorm | Ghost BN |\n" in md and "Group Norm" not in md and "best" not in md
    assert "| 2 | 0.800 [0.800, 0.800] | 0.200 [0.000, " in md and "Ghost BN above BN in" in md


def test_mismatch_is_compared_by_its_size_whatever_its_sign():
    heldout, post = _hand_made()
    # At B=2 BN's mismatch is -0.3 (evaluation mode above training mode) and renorm's +0.1: renorm's is smaller.
    # At B=100 BN's is +0.1 and renorm's -0.2: renorm's is larger.
    for norm, gaps in (("batchnorm", (-0.3, 0.1)), ("renorm", (0.1, -0.2))):
        for b, gap in zip((2, 100), gaps):
            post[f"{norm}@{b}"]["train_mode"] = post[f"{norm}@{b}"]["eval_mode"] + gap
    v = small_batch.verdict((2, 100), heldout, post)
    assert v["per_batch"][0]["batchnorm"]["mismatch"] == pytest.approx(-0.3)
    assert v["renorm_reduces_mismatch"] == [2]


def test_figures_draw_each_norms_numbers_against_the_batch_size(monkeypatch):
    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    heldout, post = _hand_made()
    sizes = [2, 100]
    fig = small_batch.figure(sizes, heldout, post, 3)
    left, right = fig.axes
    lines = lines_of(left)
    labels = [plot.arm_label(n) for n in small_batch.NORMS[:4]] + ["Group Norm", "Layer Norm"]
    assert [line["label"] for line in lines[:6]] == labels
    assert len({(line["linestyle"], line["color"]) for line in lines[:6]}) == 6  # every norm drawn its own way
    # a star on the best norm at each batch size (the verdict's), in its colour, then the star's legend entry
    stars = lines[6:-1]
    assert [star["x"].tolist() for star in stars] == [[2], [100]]
    for star, b, best in zip(stars, sizes, ("groupnorm", "layernorm")):
        np.testing.assert_allclose(star["y"], [np.mean(heldout[f"{best}@{b}"])])
        assert star["color"] == lines[small_batch.NORMS.index(best)]["color"]
    assert lines[-1]["label"] == "best norm at B" and lines[-1]["x"].size == 0
    assert left.get_title() == ("best norm by mean (star; intervals in the verdict): Group Norm at B = 2, Layer Norm "
                                "at B = 100")
    for line, band, norm in zip(lines, left.collections, small_batch.NORMS):
        runs = np.stack([heldout[f"{norm}@{b}"] for b in sizes], -1)
        np.testing.assert_allclose(line["x"], sizes)
        np.testing.assert_allclose(line["y"], runs.mean(0))
        np.testing.assert_allclose(band_bounds(band, sizes), (runs.min(0), runs.max(0)))
    lines = lines_of(right)
    assert [line["label"] for line in lines] == [plot.arm_label(n) for n in small_batch.NORMALISED]
    for line, band, norm in zip(lines, right.collections, small_batch.NORMALISED):
        gap = np.stack([post[f"{norm}@{b}"]["train_mode"] - post[f"{norm}@{b}"]["eval_mode"] for b in sizes], -1)
        np.testing.assert_allclose(line["y"], gap.mean(0))
        np.testing.assert_allclose(band_bounds(band, sizes), (gap.min(0), gap.max(0)))
    plot.pyplot().close(fig)
    fig = small_batch.precise_figure(sizes, heldout, post, 3)
    assert [ax.get_title() for ax in fig.axes] == [plot.arm_label(n) for n in small_batch.NORMALISED]
    for ax, norm in zip(fig.axes, small_batch.NORMALISED):
        running, precise = lines_of(ax)
        assert (running["label"], running["linestyle"]) == ("running averages", "-")
        assert (precise["label"], precise["linestyle"]) == ("precise statistics", "--")
        np.testing.assert_allclose(running["y"], [np.mean(heldout[f"{norm}@{b}"]) for b in sizes])
        np.testing.assert_allclose(precise["y"], [np.mean(post[f"{norm}@{b}"]["heldout_precise"]) for b in sizes])
    plot.pyplot().close(fig)


def test_analyse_and_figures_read_the_final_record_of_the_run(monkeypatch):
    from types import SimpleNamespace

    from experiments import plot
    from presentation import lines_of, skip_layout

    skip_layout(monkeypatch)
    heldout, post = _hand_made()
    # [seeds, records=2]: the first record is not the last, which is the hand-made final accuracy
    curves = {name: np.stack([np.full(3, 0.05), acc], -1) for name, acc in heldout.items()}
    run = SimpleNamespace(args=SimpleNamespace(batch_sizes=(2, 100), num_seeds=3), data={"post": post},
                          result=SimpleNamespace(metrics={"heldout_accuracy": curves}))
    fields = small_batch.analyse(run)
    assert fields["batch_sizes"] == [2, 100] and fields["after_training"] is post
    assert fields["verdict"] == small_batch.verdict((2, 100), heldout, post)
    for figure in small_batch.EXPERIMENT.figures:
        fig = figure.draw(run)
        line = lines_of(fig.axes[0])[0]  # the plain net's accuracy, or BN's with its running averages
        norm = "plain" if figure.file == "small_batch.png" else "batchnorm"
        np.testing.assert_allclose(line["y"], [np.mean(heldout[f"{norm}@{b}"]) for b in (2, 100)], err_msg=figure.file)
        plot.pyplot().close(fig)


def test_notes_name_the_options_settings():
    from types import SimpleNamespace

    args = _args(lr=0.2, reference_batch=50, epochs=7, momentum=0.8, renorm_momentum=0.95, r_max=2.0, d_max=1.0,
                 renorm_warmup=0.4)
    text = " ".join(small_batch.notes(SimpleNamespace(args=args)))
    assert "Learning rate 0.2 x B/50 for every arm of batch size B; every arm trains 6 epochs" in text
    assert "Ghost BN arms train on batches of 50 normalised in groups of B rows" in text
    assert ("Batch Renorm: momentum 0.95, r_max 2, d_max 1, reached linearly at 0.4 of each net's updates after "
            "batch norm for the first 0.1; batch norm and Ghost BN: momentum 0.8.") in text
    text = " ".join(small_batch.notes(SimpleNamespace(args=_args(renorm_warmup=0.0))))
    assert "d_max 5, from the first update;" in text
    assert "Group Norm: 10 groups of each normalised layer's units" in text


def test_bn_drop_is_the_smallest_batch_against_the_largest():
    heldout, post = _hand_made()
    for norm in small_batch.NORMS:  # a middle batch size, whose BN accuracy is neither end's
        heldout[f"{norm}@10"] = np.array([0.5, 0.5, 0.5])
    for norm in small_batch.NORMALISED:
        post[f"{norm}@10"] = {k: v.copy() for k, v in post[f"{norm}@2"].items()}
    v = small_batch.verdict((2, 10, 100), heldout, post)
    assert [row["batch_size"] for row in v["per_batch"]] == [2, 10, 100]
    assert v["bn_drop"] == pytest.approx(np.mean(heldout["batchnorm@2"]) - np.mean(heldout["batchnorm@100"]))
    md = small_batch.render({"verdict": v, "config": {"epochs": 10}})
    assert "BN's held-out accuracy at B=2 minus at B=100: -0.700" in md
