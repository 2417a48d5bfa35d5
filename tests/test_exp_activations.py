"""experiments.activations: the verdict functions on hand-made inputs, part 1 against NumPy written from the
formulas, the book's facts, the trained statistics, the figures and the command line."""

import json
import math

import numpy as np
import pytest

from experiments import activations, activations_figures, protocol, results
from experiments import activations_part1 as A
from helpers import assert_quick_run, read_results, run_quick


# --------------------------------------------------------------------------------------------------
# Pure functions on hand-made inputs
# --------------------------------------------------------------------------------------------------


def test_config_names_put_each_bn_row_under_its_plain_row():
    names = A.config_names()
    assert len(names) == 16 and names[:3] == ["sigmoid/std=1/plain", "sigmoid/std=1/batchnorm",
                                              "sigmoid/std=0.01/plain"]
    assert names[-1] == "relu/std=he/batchnorm"
    assert A.STDS["xavier"] == pytest.approx(0.1) and A.STDS["he"] == pytest.approx(math.sqrt(0.02))


def test_shrink_factors_and_mean_over_seeds():
    assert A.shrink_factors([1.0, 0.1, 0.02]) == pytest.approx([10.0, 5.0])
    assert A.shrink_factors([1.0, 0.0, None, 2.0]) == [None, None, None]
    assert A.shrink_factors([3.0]) == []
    a = [{"layer": 1, "std": 1.0, "zero": 0.5}, {"layer": 2, "std": 3.0, "zero": 0.0}]
    b = [{"layer": 1, "std": 2.0, "zero": 0.7}, {"layer": 2, "std": 5.0, "zero": 1.0}]
    assert A.mean_over_seeds([a, b]) == [{"layer": 1, "std": 1.5, "zero": pytest.approx(0.6)},
                                         {"layer": 2, "std": 4.0, "zero": 0.5}]
    assert A.mean_over_seeds([a]) == a


def _layers(**columns):
    n = len(next(iter(columns.values())))
    return [{"layer": i + 1, **{k: v[i] for k, v in columns.items()}} for i in range(n)]


def _hand_configs():
    return {
        "sigmoid/std=1/plain": _layers(std_pre=[9, 6, 6], std=[.45, .44, .43], saturated=[.77, .64, .70],
                                       near_half=[.02, .03, .02]),
        "sigmoid/std=1/batchnorm": _layers(std_pre=[1, 1, 1], std=[.2, .2, .2], saturated=[.003, .002, .001],
                                           near_half=[.16, .15, .16]),
        "sigmoid/std=0.01/plain": _layers(std_pre=[.1, .04, .05], std=[.02, .01, .01], saturated=[0, 0, 0],
                                          near_half=[.96, 1.0, 1.0]),
        "sigmoid/std=0.01/batchnorm": _layers(std_pre=[1, 1, 1], std=[.2, .2, .2], saturated=[0, 0, 0],
                                              near_half=[.16, .17, .15]),
        "relu/std=0.01/plain": _layers(std_pre=[.1, .007, .0005], std=[.06, .004, .0002], zero=[.5, .5, .5]),
        "relu/std=0.01/batchnorm": _layers(std_pre=[1, 1, 1], std=[.58, .6, .57], zero=[.5, .5, .5]),
    }


def test_part1_summary_takes_ranges_over_layers():
    s = A.part1_summary(_hand_configs())
    assert s["ranges"]["sigmoid/std=1/plain"]["saturated"] == [0.64, 0.77]
    assert s["ranges"]["relu/std=0.01/batchnorm"] == {"std_pre": [1, 1], "std": [0.57, 0.6], "zero": [0.5, 0.5]}
    assert s["sigmoid_std1_saturated"] == {"plain": [0.64, 0.77], "batchnorm": [0.001, 0.003]}
    assert s["sigmoid_std0.01_near_half"] == {"plain": [0.96, 1.0], "batchnorm": [0.15, 0.17]}
    r = s["relu_std0.01"]
    assert r["plain_std"] == [.06, .004, .0002] and r["batchnorm_std"] == [.58, .6, .57]
    assert r["plain_shrink"] == pytest.approx([15.0, 20.0])
    # Missing configurations leave their entries out; non-finite values are left out of the ranges.
    partial = {"relu/std=he/plain": _layers(std=[float("nan"), 2.0, 1.0], zero=[.5, .4, .6])}
    s = A.part1_summary(partial)
    assert set(s) == {"ranges"} and s["ranges"]["relu/std=he/plain"]["std"] == [1.0, 2.0]


def _hand_part2():
    # [seeds=2, scales=3, layers=2]
    std = np.array([[[0.5, 2e-4], [0.5, 0.3], [0.5, 5e-4]],
                    [[0.5, 1e-4], [0.5, 0.5], [0.5, 0.2]]])
    zero = np.array([[[0.5, 0.5], [0.5, 0.995], [0.5, 0.5]],
                     [[0.5, 0.5], [0.5, 0.999], [0.5, 0.5]]])
    plain_after = {"std": std.copy(), "zero": zero.copy(), "std_pre": std * 2}
    plain_after["std"][:, 0] = np.nan  # diverged at scale 0 in both seeds
    plain_after["zero"][:, 0] = np.nan
    bn = {"std": np.full((2, 3, 2), 0.58), "zero": np.full((2, 3, 2), 0.5), "std_pre": np.ones((2, 3, 2))}
    stats = {"batchnorm": {"before": bn, "after": bn},
             "plain": {"before": {"std": std, "zero": zero, "std_pre": std * 2}, "after": plain_after}}
    diverged = {"batchnorm": np.zeros((2, 3), bool), "plain": np.array([[True, False, False], [True, False, False]])}
    return stats, diverged


def test_part2_summary_counts_scales_collapsed_in_every_seed():
    stats, diverged = _hand_part2()
    s = activations.part2_summary([1.0, 0.1, 0.01], stats, diverged)
    assert s["num_scales"] == 3 and s["dead_share"] == 0.99 and s["flat_std"] == 1e-3
    before = s["plain"]["before"]
    # scale 0: flat in both seeds; scale 1: dead in both; scale 2: flat in seed 0 only -> not counted.
    assert (before["flat"], before["dead"], before["collapsed"]) == (1, 1, 2)
    assert before["collapsed_scales"] == [1.0, 0.1]
    assert before["last_std"] == pytest.approx([1.5e-4, 0.4, 0.10025])
    assert before["last_std_range"] == pytest.approx([1.5e-4, 0.4])
    assert before["last_zero_range"] == pytest.approx([0.5, 0.997])
    after = s["plain"]["after"]
    assert (after["collapsed"], after["collapsed_scales"]) == (1, [0.1])  # the diverged scale never counts
    assert after["last_std_range"] == pytest.approx([0.10025, 0.4])  # NaN left out
    assert s["plain"]["diverged"] == 1 and s["batchnorm"]["diverged"] == 0
    assert s["batchnorm"]["after"]["collapsed"] == 0 and s["batchnorm"]["after"]["last_std_range"] == [0.58, 0.58]
    # Stricter criteria
    s = activations.part2_summary([1.0, 0.1, 0.01], stats, diverged, dead_share=0.999, flat_std=1.5e-4)
    assert s["plain"]["before"]["collapsed"] == 0
    # Sigmoid arms have no zero share: only the std criterion applies.
    sig = {"s": {"before": {"std": np.array([[[1e-4]]]), "saturated": np.array([[[1.0]]])}}}
    s = activations.part2_summary([0.5], sig)
    assert s["s"]["before"]["collapsed"] == 1 and "last_zero" not in s["s"]["before"] and s["s"]["diverged"] == 0


def _hand_verdict():
    configs = _hand_configs()
    stats, diverged = _hand_part2()
    return {
        "part1": {"num_inputs": 1000, "width": 100, "depth": 5, "seeds": [0], "stds": A.STDS, "configs": configs,
                  "summary": A.part1_summary(configs)},
        "part2": {"arms": ["batchnorm", "plain"], "weight_scales": [1.0, 0.1, 0.01], "layers": [1, 2],
                  "num_images": 1000, "num_updates": 191, "stats": stats,
                  "summary": activations.part2_summary([1.0, 0.1, 0.01], stats, diverged)},
    }


def test_render_reads_the_numbers_from_the_verdict():
    verdict = json.loads(results.dumps(_hand_verdict()))  # as read back from results.json
    md = activations.render({"verdict": verdict})
    assert md.startswith("Part 1, the book's histogram experiment: 1000 standard-normal inputs")
    assert "(seed 0)" in md and "more than 99 % exact zeros or an activation std below 0.001" in md
    assert "| network | statistic | plain | batch norm |" in md
    assert "| sigmoid, std 1 | saturated (< 0.05 or > 0.95), range over layers | 64-77 % | 0 % |" in md
    assert "| sigmoid, std 0.01 | within 0.05 of 0.5, range over layers | 96-100 % | 15-17 % |" in md
    assert "| ReLU, std 0.01 | activation std, range over layers | 0.0002..0.06 | 0.57..0.6 |" in md
    assert "| ReLU, std 0.01 | std of layer l-1 / layer l | 15..20 (std 0.06 -> 0.0002) |" in md
    assert "| sweep, layer 5, before training | scales where it collapsed | 2 of 3 | 0 of 3 |" in md
    assert "| sweep, layer 5, after training | scales where it collapsed | 1 of 3 | 0 of 3 |" in md
    assert "| sweep, after training | scales where a model diverged | 1 | 0 |" in md
    assert "| sweep, layer 5, before training | outputs exactly 0, range over scales | 50-100 % | 50 % |" in md
    assert "| sweep, layer 5, after training | outputs exactly 0, range over scales | 50-100 % | 50 % |" in md
    # The facts in words, each number under its own arm.
    assert ("With std 1, 64-77 % of the plain sigmoid outputs are saturated per layer against 0 % with batch norm; "
            "with std 0.01, 96-100 % sit within 0.05 of 0.5 against 15-17 %; and ReLU with std 0.01 loses a factor "
            "15..20 of standard deviation per layer, while batch norm holds it at 0.57..0.6.") in md
    # Part 1 alone (--skip-trained)
    del verdict["part2"]
    md = activations.render({"verdict": verdict})
    assert "Part 2" not in md and "sweep" not in md.split("|", 1)[1]


def test_histogram_bins_and_zero_share():
    v = np.array([0.01, 0.02, 0.5, 0.51, 0.99, 0.999])
    h = A.histogram(v, "sigmoid")
    assert h["counts"].sum() == 6 and h["counts"][0] == 2 and h["counts"][-1] == 2 and h["zero"] is None
    np.testing.assert_allclose(h["edges"], np.linspace(0, 1, 31))
    r = np.concatenate([np.zeros(300), np.linspace(0.01, 1.0, 100)])
    h = A.histogram(r, "relu")
    assert h["zero"] == 0.75 and h["edges"][-1] == pytest.approx(np.percentile(np.linspace(0.01, 1.0, 100), 99))
    assert h["counts"].sum() == 99  # the positive outputs up to the 99th percentile
    hs = A.layer_histograms(np.stack([r, 10 * r]), "relu")
    assert hs[0]["edges"][-1] == hs[1]["edges"][-1] == pytest.approx(10 * h["edges"][-1])  # one range per row
    assert A.histogram(np.zeros(10), "relu")["edges"][-1] == 1.0


# --------------------------------------------------------------------------------------------------
# Part 1 against NumPy, and the book's facts
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def part1():
    return A.run_part1([0], 1000)


def _numpy_forward(x, weights, activation, batch_norm, eps=1e-6):
    h, out = np.asarray(x, np.float64), []
    for W in weights:
        a = h @ np.asarray(W, np.float64)  # the biases are 0
        if batch_norm:
            mu = a.mean(axis=0)
            var = ((a - mu) ** 2).mean(axis=0)  # biased
            a = (a - mu) / np.sqrt(var + eps)  # gamma 1, beta 0
        h = 1 / (1 + np.exp(-a)) if activation == "sigmoid" else np.maximum(a, 0)
        out.append((a, h))
    return out


@pytest.mark.slow
def test_part1_matches_numpy_written_from_the_formulas(part1):
    configs, _ = part1
    x = np.asarray(A.part1_inputs(0, 1000))
    assert x.shape == (1000, 100) and abs(x.std() - 1) < 0.01
    for activation in A.ACTIVATIONS:
        for std_name, std in A.STDS.items():
            params, _ = A.part1_params(0, activation, False, std)
            weights = [np.asarray(a.W) for a in params.affine[:-1]]
            assert all(np.all(np.asarray(a.b) == 0) for a in params.affine)
            assert np.std(weights[0]) == pytest.approx(std, rel=0.02)
            for arm in A.ARMS:
                got = configs[A.config_name(activation, std_name, arm)]
                assert [g["layer"] for g in got] == [1, 2, 3, 4, 5]
                for g, (pre, act) in zip(got, _numpy_forward(x, weights, activation, arm == "batchnorm")):
                    where = (activation, std_name, arm, g["layer"])
                    assert g["std_pre"] == pytest.approx(pre.std(), rel=2e-3), where
                    assert g["std"] == pytest.approx(act.std(), rel=2e-3), where
                    if activation == "sigmoid":
                        # float32 vs float64 may move an output across 0.05 / 0.95 / 0.45 / 0.55: a few of 1e5
                        assert g["saturated"] == pytest.approx(np.mean((act < 0.05) | (act > 0.95)), abs=2e-4), where
                        assert g["near_half"] == pytest.approx(np.mean(np.abs(act - 0.5) < 0.05), abs=2e-4), where
                    else:
                        assert g["zero"] == pytest.approx(np.mean(act == 0), abs=2e-4), where


def test_every_configuration_of_a_seed_scales_the_same_weights():
    p1, _ = A.part1_params(3, "relu", False, 1.0)
    p2, _ = A.part1_params(3, "sigmoid", True, 0.01)
    for a, b in zip(p1.affine, p2.affine):
        np.testing.assert_allclose(np.asarray(b.W), 0.01 * np.asarray(a.W), rtol=1e-6)


@pytest.mark.slow
def test_the_books_facts_hold(part1):
    configs, histograms = part1

    def col(name, key):
        return np.array([layer[key] for layer in configs[name]])

    assert np.all(col("sigmoid/std=1/plain", "saturated") >= 0.60)
    assert np.all(col("sigmoid/std=1/batchnorm", "saturated") < 0.05)
    assert np.all(col("sigmoid/std=0.01/plain", "near_half") >= 0.9)
    assert np.all(np.abs(col("sigmoid/std=0.01/batchnorm", "near_half") - 0.16) < 0.03)
    std = col("relu/std=0.01/plain", "std")
    assert np.all(std[:-1] / std[1:] > 10)
    assert np.all((col("relu/std=0.01/batchnorm", "std") > 0.4) & (col("relu/std=0.01/batchnorm", "std") < 0.8))
    assert np.all(np.abs(col("relu/std=he/batchnorm", "zero") - 0.5) < 0.03)
    # Batch norm undoes the scale: every std gives the same numbers (up to eps).
    for activation in A.ACTIVATIONS:
        ref = col(f"{activation}/std=1/batchnorm", "std")
        for std_name in A.STDS:
            np.testing.assert_allclose(col(f"{activation}/std={std_name}/batchnorm", "std"), ref, rtol=2e-3)
    assert set(histograms) == set(A.config_names()) and all(len(h) == 5 for h in histograms.values())


@pytest.mark.slow
def test_each_histogram_is_of_its_own_networks_layer(part1):
    """The histograms drawn are of the layer and network they are labelled with: recomputed here from a NumPy
    forward pass of that configuration's weights on seed 0's inputs."""
    _, histograms = part1
    x = np.asarray(A.part1_inputs(0, 1000))
    for activation in A.ACTIVATIONS:
        for std_name, std in A.STDS.items():
            params, _ = A.part1_params(0, activation, False, std)
            weights = [np.asarray(a.W) for a in params.affine[:-1]]
            for arm in A.ARMS:
                name = A.config_name(activation, std_name, arm)
                layers = _numpy_forward(x, weights, activation, arm == "batchnorm")
                tops = [np.percentile(act[act > 0], 99) for _, act in layers] if activation == "relu" else None
                for layer, (h, (_, act)) in enumerate(zip(histograms[name], layers)):
                    top = 1.0 if tops is None else max(tops)
                    np.testing.assert_allclose(h["edges"][-1], top, rtol=1e-3, err_msg=name)
                    counts, _ = np.histogram(act[act > 0] if tops else act, bins=30, range=(0.0, h["edges"][-1]))
                    # float32 against float64: a few of the 1e5 values may cross a bin edge
                    assert np.abs(h["counts"] - counts).sum() <= 20, (name, layer + 1)
                    assert h["std"] == pytest.approx(act.std(), rel=2e-3), (name, layer + 1)
                    if tops:
                        assert h["zero"] == pytest.approx(np.mean(act == 0), abs=2e-4), (name, layer + 1)


@pytest.mark.slow
def test_part1_seeds_are_independent_runs_averaged():
    both, _ = A.run_part1([0, 1], 50)
    one, _ = A.run_part1([0], 50)
    two, _ = A.run_part1([1], 50)
    again, _ = A.run_part1([1], 50)
    assert two == again and one != two
    for name in A.config_names():
        for b, o, t in zip(both[name], one[name], two[name]):
            for k in b:
                assert b[k] == pytest.approx((o[k] + t[k]) / 2 if k != "layer" else o[k]), (name, k)


# --------------------------------------------------------------------------------------------------
# Part 2: the statistics of stacked models
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trained_stats_of_a_stack_of_models_match_numpy():
    from bnjax import grid

    config = grid.GridConfig(axes={"weight_scale": (0.5, 0.05, 0.005)}, hidden_sizes=(12, 12, 12), num_seeds=2,
                             seed=4)
    x = np.random.default_rng(0).uniform(size=(40, 784)).astype(np.float32)
    models = grid.init_models(config, 784)
    diverged = {"batchnorm": np.zeros((2, 3), bool), "plain": np.array([[False, True, False], [False] * 3])}
    stats = activations.trained_stats(config, models, x, diverged)
    assert set(stats) == {"batchnorm", "plain"}
    for arm in ("batchnorm", "plain"):
        st = stats[arm]
        assert set(st) == {"std_pre", "std", "zero"} and st["std"].shape == (2, 3, 3)
        for s in range(2):
            for j in range(3):
                if diverged[arm][s, j]:
                    assert np.isnan(st["std"][s, j]).all() and np.isnan(st["zero"][s, j]).all()
                    continue
                weights = [np.asarray(a.W[s, j]) for a in models[arm].params.affine[:-1]]
                for k, (pre, act) in enumerate(_numpy_forward(x, weights, "relu", arm == "batchnorm")):
                    assert st["std_pre"][s, j, k] == pytest.approx(pre.std(), rel=2e-3)
                    assert st["std"][s, j, k] == pytest.approx(act.std(), rel=2e-3)
                    assert st["zero"][s, j, k] == pytest.approx(np.mean(act == 0), abs=3e-3)


# --------------------------------------------------------------------------------------------------
# Figures and the command line
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_figures_have_the_books_layout(part1):
    from experiments import plot

    _, histograms = part1
    fig = activations_figures.histogram_figure(histograms, "relu")
    axes = np.array(fig.axes).reshape(8, 5)
    assert [ax.get_title() for ax in axes[0]] == [f"{i}-layer" for i in range(1, 6)]
    assert axes[0, 0].get_ylabel() == "std=1\nplain" and axes[1, 0].get_ylabel() == "std=1\nBN"
    assert all(lbl.get_visible() for lbl in axes[0, 0].get_yticklabels())
    assert not any(lbl.get_visible() for ax in axes[:, 1:].flat for lbl in ax.get_yticklabels())
    assert "0: 5" in axes[0, 0].texts[0].get_text()  # the share of exact zeros, about 50 %
    plot.pyplot().close(fig)
    stats, _ = _hand_part2()
    fig = activations_figures.trained_figure([1.0, 0.1, 0.01], stats, layers=(1, 2))
    assert len(fig.axes) == 4 and [ax.get_title() for ax in fig.axes[:2]] == ["before training", "after training"]
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].lines if line.get_label()[0] != "_"}
    assert styles == {"layer 1, BN": "-", "layer 2, BN": "-", "layer 1, plain": "--", "layer 2, plain": "--"}
    plot.pyplot().close(fig)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m experiments.activations`` at the registry's quick options (figures drawn), run once."""
    out = tmp_path_factory.mktemp("activations") / "run"
    return run_quick("activations", out), out


@pytest.mark.slow
def test_quick_run_records_a_verdict_and_prints_its_rendering(quick_run):
    assert_quick_run("activations", *quick_run)


@pytest.mark.slow
def test_cli_writes_the_verdict_and_the_figures(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Its plain nets overflow (inf activations at w = 1 after training): their std is NaN, with no NumPy warning.
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    res = read_results(out)
    md = activations.render(res)
    assert md.strip() in proc.stdout  # the console shows what the report quotes
    assert "Part 1, the book's histogram experiment: 200 standard-normal inputs" in md
    assert "Part 2, the networks of the book's sweep (3 weight scales, 3 updates" in md
    v = res["verdict"]
    assert set(v) == {"part1", "part2"}
    assert set(v["part1"]["configs"]) == set(A.config_names())
    assert set(v["part1"]["summary"]) >= {"ranges", "sigmoid_std1_saturated", "sigmoid_std0.01_near_half",
                                          "relu_std0.01"}
    p2 = v["part2"]
    assert p2["weight_scales"] == [1.0, 0.01, 1e-4] and p2["num_updates"] == 3 and p2["num_images"] == 200
    for arm in ("batchnorm", "plain"):
        for when in ("before", "after"):
            assert np.array(p2["stats"][arm][when]["std"], float).shape == (1, 3, 5)
        assert {"before", "after", "diverged"} <= set(p2["summary"][arm])
    assert res["train_accuracy"]["plain"] and res["seeds"] == [0] and "notes" in res
    # "before" is the grid's own starting models, recomputed here from grid.init_models
    from bnjax import data, grid

    ds = data.load_bundled(200, 0)
    config = grid.GridConfig(axes={"weight_scale": tuple(p2["weight_scales"])}, num_records=2)
    start = activations.trained_stats(config, grid.init_models(config), np.asarray(ds.x_train, np.float32))
    for arm in ("batchnorm", "plain"):
        np.testing.assert_allclose(np.array(p2["stats"][arm]["before"]["std"], float), start[arm]["std"], rtol=1e-5)
        assert not np.allclose(np.array(p2["stats"][arm]["after"]["std"], float), start[arm]["std"], rtol=1e-3)
    for name in activations.EXPERIMENT.figure_files:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert md.count("\n| ") >= 8


@pytest.mark.slow
def test_skip_trained_needs_no_data(tmp_path):
    out = tmp_path / "p1"
    code = activations.main(["--skip-trained", "--num-inputs", "100", "--quiet", "--no-cache", "--no-plot", "--out", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["verdict"]) == {"part1"} and "data" not in res and res["config"]["skip_trained"] is True
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exc:
        activations.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-inputs", "--skip-trained", "--num-scales", "--epochs", "--seed", "--num-seeds", "--out"):
        assert flag in text
    assert "Exit status" in text and "training mode" in text


@pytest.mark.parametrize("bad, message", [
    (["--num-inputs", "1"], "--num-inputs"),
    (["--num-inputs", "many"], "--num-inputs"),
    (["--num-scales", "0"], "--num-scales"),
    (["--epochs", "0"], "--epochs"),
    (["--seed", "-1"], "--seed"),
    (["--data", "web"], "--data"),
    (["--data", "bundled", "--train-size", "6000"], "bundled"),
])
def test_bad_options_exit_2_naming_the_option(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        protocol.parse_args(activations.EXPERIMENT, bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# What the figures show, against the data they are given
# --------------------------------------------------------------------------------------------------


def _hand_histograms(activation):
    """Per configuration of ``activation``, 5 layers of histograms that differ between configurations and
    layers."""
    out = {}
    for k, name in enumerate(n for n in A.config_names() if n.startswith(activation + "/")):
        top = 1.0 if activation == "sigmoid" else 2.0 + k
        out[name] = [{"counts": np.arange(30) * (k + 1) + 100 * layer, "edges": np.linspace(0.0, top, 31),
                      "zero": None if activation == "sigmoid" else 0.4 + 0.01 * k,
                      "std": 0.1 * (layer + 1) + k} for layer in range(5)]
    return out


@pytest.mark.parametrize("activation", A.ACTIVATIONS)
def test_histogram_figure_draws_each_configurations_layers_in_its_row(activation):
    from experiments import plot

    histograms = _hand_histograms(activation)
    fig = activations_figures.histogram_figure(histograms, activation)
    names = list(histograms)
    axes = np.array(fig.axes).reshape(len(names), 5)
    for r, name in enumerate(names):
        _, std, arm = name.split("/")
        assert axes[r, 0].get_ylabel() == f"{std}\n{plot.arm_short(arm)}"
        for c, ax in enumerate(axes[r]):
            (patch,) = ax.patches
            data = patch.get_data()
            np.testing.assert_array_equal(data.values, histograms[name][c]["counts"], err_msg=f"{name} layer {c + 1}")
            np.testing.assert_allclose(data.edges, histograms[name][c]["edges"])
            if activation == "relu":
                h = histograms[name][c]
                assert ax.texts[0].get_text() == f"0: {100 * h['zero']:.0f} %\nstd {h['std']:.2g}"
    plot.pyplot().close(fig)


def test_trained_figure_draws_each_layer_of_each_arm_before_and_after():
    from experiments import plot
    from presentation import lines_of

    stats, _ = _hand_part2()
    scales = [1.0, 0.1, 0.01]
    fig = activations_figures.trained_figure(scales, stats, layers=(1, 2))
    axes = np.array(fig.axes).reshape(2, 2)
    for r, key in enumerate(("std", "zero")):
        for c, when in enumerate(("before", "after")):
            lines = lines_of(axes[r, c])
            expected = [(f"layer {layer}, {plot.arm_short(arm)}", arm, layer) for arm in stats for layer in (1, 2)]
            assert [line["label"] for line in lines] == [label for label, _, _ in expected]
            for line, (_, arm, layer) in zip(lines, expected):
                np.testing.assert_allclose(line["x"], scales)
                np.testing.assert_allclose(line["y"], np.mean(stats[arm][when][key][..., layer - 1], axis=0),
                                           err_msg=f"{key} {when} {arm} layer {layer}")
    plot.pyplot().close(fig)


def test_layer_stats_of_an_overflowed_layer_are_nan_without_a_warning():
    import warnings

    from bnjax import claims

    # What a plain net at a large weight scale produces after training: inf activations, and NaN where
    # inf - inf met in the next layer; the layer before is finite.
    act = np.array([[[0.0, 1.0], [2.0, 3.0]], [[0.0, np.inf], [np.inf, 1.0]], [[np.nan, 0.0], [np.inf, np.nan]]],
                   np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = A.layer_stats(act, act, "relu")
        sig = claims.activation_stats(act[1], "sigmoid")
        hist = A.layer_histograms(act, "relu")
    assert rows[0]["std"] == pytest.approx(np.std([0.0, 1.0, 2.0, 3.0])) and rows[0]["zero"] == 0.25
    assert all(np.isnan(row["std"]) and np.isnan(row["std_pre"]) for row in rows[1:])
    assert rows[1]["zero"] == 0.25 and rows[2]["zero"] == 0.25
    assert np.isnan(sig["std"]) and sig["saturated"] == 1.0  # 0, inf, inf and 1: all outside 0.05..0.95
    assert [h["counts"].sum() for h in hist] == [2, 1, 0] and np.isnan(hist[1]["std"])  # finite positives only
