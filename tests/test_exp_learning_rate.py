"""experiments.learning_rate: the verdict on hand-made records, the arms' pairing, and the CLI end to end."""


import json

import numpy as np
import pytest

from bnjax import grid
from experiments import learning_rate as lr_exp
from experiments import protocol
from helpers import assert_quick_run, read_results, run_quick

INITS = ["w=0.1", "he"]


def _records(bn_final, plain_final, seeds=2, records=3):
    """accuracy [seeds, L, R] rising linearly to the given finals."""
    ramp = np.linspace(0.2, 1.0, records)
    return {lr_exp.arm_name("batchnorm", i): np.broadcast_to(np.asarray(bn_final)[None, :, None] * ramp,
                                                             (seeds, len(bn_final), records)).copy() for i in INITS} | \
        {lr_exp.arm_name("plain", i): np.broadcast_to(np.asarray(plain_final)[None, :, None] * ramp,
                                                      (seeds, len(plain_final), records)).copy() for i in INITS}


def test_verdict_on_hand_made_records():
    lrs = [0.01, 0.1, 1.0, 10.0]
    acc = _records([0.95, 1.0, 0.99, 0.1], [0.99, 0.95, 0.1, 0.1])
    div = {name: np.zeros((2, 4), bool) for name in acc}
    for i in INITS:
        div[lr_exp.arm_name("plain", i)][:, 2:] = True
    steps = [1, 11, 21]
    v = lr_exp.verdict(lrs, steps, acc, div, INITS)
    for i in INITS:
        assert v["max_stable_lr"][i] == {"batchnorm": 1.0, "plain": 0.1, "ratio": pytest.approx(10.0)}
        # BN at lr 0.1: 1.0 * 0.6 = 0.6 at record 1, 1.0 at record 2 -> 21 updates; plain likewise at lr 0.01
        assert v["updates_to_90"][i] == {"batchnorm": 21, "plain": 21, "ratio": 1.0}
        assert v["updates_to_90_lr"][i] == {"batchnorm": 0.01, "plain": 0.01}
        assert v["plain_better_lrs"][i] == [0.01]  # 0.99 vs 0.95
    # half the seeds is enough; fewer is not
    acc[lr_exp.arm_name("batchnorm", "he")][0, 3] = 0.95
    assert lr_exp.verdict(lrs, steps, acc, div, INITS)["max_stable_lr"]["he"]["batchnorm"] == 10.0
    div[lr_exp.arm_name("batchnorm", "he")][0, 3] = True
    assert lr_exp.verdict(lrs, steps, acc, div, INITS)["max_stable_lr"]["he"]["batchnorm"] == 1.0
    # the probe's verdict reads the right arm
    probe = {"init": {name: np.ones((2, 3)) * 2.0 for name in acc}}
    probe["init"][lr_exp.arm_name("batchnorm", "he")][:, :2] = 0.5
    v = lr_exp.verdict(lrs, steps, acc, div, INITS, probe, [0.1, 1.0, 10.0])
    assert v["largest_loss_lowering_step"]["init"]["he"] == {"batchnorm": 1.0, "plain": None}
    assert v["largest_loss_lowering_step"]["init"]["w=0.1"] == {"batchnorm": None, "plain": None}
    md = lr_exp.render({"verdict": v, "seeds": [0, 1], "axes": {"learning_rate": lrs}})
    assert "he: plain ends above BN (by > 0.01, mean over seeds) at lr 0.01" in md
    assert "| he | batchnorm | 1 | 21 (0.01) |" in md and "BN's largest stable learning rate is 10x plain's" in md
    assert "probe at initialisation, largest step that lowers the loss (median over seeds): w=0.1: BN never" in md


@pytest.mark.slow
def test_arms_pair_bn_and_plain_of_one_init_and_the_inits_have_their_scales():
    args = protocol.parse_args(lr_exp.EXPERIMENT, ["--lrs", "0.01,0.1", "--num-seeds", "2", "--init-scale", "0.2", "--out", "/tmp/unused"])
    config = lr_exp.grid_config(args)
    assert list(config.arms) == ["batchnorm w=0.2", "plain w=0.2", "batchnorm he", "plain he"]
    assert [a.norm for a in config.arms.values()] == [True, False, True, False]
    start = grid.init_models(config)
    W = {name: ts.params.affine[0].W for name, ts in start.items()}  # [seeds, L, 784, 100]
    np.testing.assert_array_equal(W["batchnorm w=0.2"], W["plain w=0.2"])
    np.testing.assert_array_equal(W["batchnorm he"], W["plain he"])
    np.testing.assert_array_equal(W["plain he"][:, 0], W["plain he"][:, 1])  # one init for every learning rate
    assert not np.array_equal(W["plain he"][0], W["plain he"][1])  # seeds differ
    assert W["plain w=0.2"].std() == pytest.approx(0.2, rel=0.01)
    assert W["plain he"].std() == pytest.approx(np.sqrt(2 / 784), rel=0.01)
    assert start["plain he"].params.affine[1].W.std() == pytest.approx(np.sqrt(2 / 100), rel=0.02)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m experiments.learning_rate`` at the registry's quick options (figures drawn), run once."""
    out = tmp_path_factory.mktemp("learning_rate") / "lr"
    return run_quick("learning_rate", out), out


@pytest.mark.slow
def test_quick_run_records_a_verdict_and_prints_its_rendering(quick_run):
    assert_quick_run("learning_rate", *quick_run)


@pytest.mark.slow
def test_cli_writes_results_verdict_probe_and_figures(quick_run):
    r, out = quick_run
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # lr 3 overflows the plain nets: NaN met silently
    res = read_results(out)
    assert res["axes"]["learning_rate"] == [0.01, 3.0]
    assert np.asarray(res["train_accuracy"]["batchnorm he"]).shape == (2, 2, 3)
    assert set(res["verdict"]["max_stable_lr"]) == {"w=0.1585", "he"}
    ratios = res["probe"]["loss_ratio"]
    assert set(ratios) == {"init", "trained"}
    r0 = np.asarray(ratios["init"]["plain he"], float)
    assert r0.shape == (2, 4) and np.allclose(r0[:, 0], 1.0, atol=1e-2)  # eta 1e-4: the loss barely moves
    assert not np.allclose(r0, np.asarray(ratios["trained"]["plain he"], float))
    for png in lr_exp.EXPERIMENT.figure_files:
        assert (out / png).stat().st_size > 10_000
    assert "| init | arm |" in lr_exp.render(res)


@pytest.mark.parametrize("bad,option", [(["--lrs", "0.1,-1"], "--lrs"), (["--num-lrs", "0"], "--num-lrs"),
                                        (["--init-scale", "0"], "--init-scale"), (["--epochs", "1"], "--epochs"),
                                        (["--probe-steps", "1"], "--probe-steps")])
def test_bad_options_exit_2_naming_the_option(bad, option, capsys):
    with pytest.raises(SystemExit) as exc:
        protocol.parse_args(lr_exp.EXPERIMENT, [*bad, "--out", "/tmp/bnjax-never-written"])
    assert exc.value.code == 2 and option in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# What the reader sees: the table, the sentences and the figures, against the arrays
# --------------------------------------------------------------------------------------------------

LRS = [0.01, 0.1, 1.0, 10.0]
STEPS = [1, 11, 21]
SEED_SHIFT = np.array([0.01, 0.0, -0.01])  # seeds differ; their mean is the hand-made value


def _paired_records(init_scale=0.2):
    """[seeds=3, L=4, R=3] per arm and init, each comparison taking both signs: with He init BN is stable at a
    larger lr and reaches 0.9 sooner (after 11 updates, plain 21); at w the reverse. Plain ends above BN at
    lr 0.01 with w by only 0.005 (not listed) and at lr 0.1 by 0.42 (listed). Plain diverges from lr 1 on."""
    w, he = init_names_list(init_scale)
    finals = {("batchnorm", he): [0.95, 0.96, 0.97, 0.1], ("plain", he): [0.95, 0.94, 0.1, 0.1],
              ("batchnorm", w): [0.945, 0.5, 0.5, 0.1], ("plain", w): [0.95, 0.92, 0.1, 0.1]}
    early = {("batchnorm", he): 1, ("plain", w): 0}  # the lr index that reaches its final at the middle record
    acc, diverged = {}, {}
    for (arm, init), final in finals.items():
        curve = np.stack([np.full(4, 0.1), np.full(4, 0.5), np.asarray(final)], -1)  # [L, R]
        if (arm, init) in early:
            curve[early[arm, init], 1] = curve[early[arm, init], 2]
        name = lr_exp.arm_name(arm, init)
        acc[name] = curve[None] + SEED_SHIFT[:, None, None]
        diverged[name] = np.zeros((3, 4), bool)
        if arm == "plain":
            diverged[name][:, 2:] = True
    return acc, diverged


def init_names_list(init_scale):
    return list(lr_exp.init_names(init_scale))


def _oracle(acc, diverged, name):
    """NumPy, from the arrays: the largest lr with at least half the seeds finite and >= 0.9, and the fewest
    updates (with its lr) after which the mean over seeds reaches 0.9."""
    final = acc[name][..., -1]
    ok = ((final >= 0.9) & ~diverged[name]).mean(0) >= 0.5
    stable = max(np.asarray(LRS)[ok]) if ok.any() else None
    mean = acc[name].mean(0)  # [L, R]
    reach = [(STEPS[np.argmax(row >= 0.9)], lr) for row, lr in zip(mean, LRS) if (row >= 0.9).any()]
    updates, at = min(reach, key=lambda pair: pair[0]) if reach else (None, None)
    return stable, updates, at


def test_render_table_and_comparisons_take_both_signs():
    from presentation import markdown_tables

    acc, diverged = _paired_records()
    inits = init_names_list(0.2)
    v = lr_exp.verdict(LRS, STEPS, acc, diverged, inits)
    md = lr_exp.render(json.loads(json.dumps({"verdict": v, "seeds": [0, 1, 2], "axes": {"learning_rate": LRS}})))
    (table,) = markdown_tables(md)
    assert table[0] == ["init", "arm", "max stable lr", "updates to 0.9 (at lr)"]
    assert [(row[0], row[1]) for row in table[1:]] == [(i, a) for i in inits for a in lr_exp.ARMS]
    expect = {}
    for row in table[1:]:
        stable, updates, at = _oracle(acc, diverged, lr_exp.arm_name(row[1], row[0]))
        expect[row[0], row[1]] = (stable, updates)
        assert float(row[2]) == pytest.approx(stable)
        assert row[3] == f"{updates} ({at:.3g})"
    w, he = inits
    assert expect[he, "batchnorm"][0] > expect[he, "plain"][0] and expect[w, "batchnorm"][0] < expect[w, "plain"][0]
    assert expect[he, "batchnorm"][1] < expect[he, "plain"][1] and expect[w, "batchnorm"][1] > expect[w, "plain"][1]
    for init in inits:
        (bn_lr, bn_n), (plain_lr, plain_n) = expect[init, "batchnorm"], expect[init, "plain"]
        assert (f"{init}: BN's largest stable learning rate is {bn_lr / plain_lr:.3g}x plain's; BN needs "
                f"{bn_n / plain_n:.2g}x the updates plain needs to reach 0.9") in md
    # Plain above BN by more than 0.01 (mean over seeds): w at lr 0.1 only (0.005 at lr 0.01 is not enough).
    assert v["plain_better_lrs"] == {w: [0.1], he: []}
    assert f"{w}: plain ends above BN (by > 0.01, mean over seeds) at lr 0.1\n" in md and f"{he}: plain ends" not in md
    assert "3 seeds, learning rates 0.01 to 10;" in md


def test_figures_draw_each_inits_arms_at_their_learning_rates(monkeypatch):
    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    acc, _ = _paired_records()
    inits = init_names_list(0.2)
    fig = lr_exp.accuracy_figure(LRS, acc, inits, 3, 21)
    panels = fig.axes
    assert [ax.get_title() for ax in panels] == [f"init {i}" for i in inits]
    for ax, init in zip(panels, inits):
        lines = lines_of(ax)
        assert [line["label"] for line in lines] == [plot.arm_label(a) for a in lr_exp.ARMS]
        for line, band, arm in zip(lines, ax.collections, lr_exp.ARMS):
            final = acc[lr_exp.arm_name(arm, init)][..., -1]
            np.testing.assert_allclose(line["x"], LRS)
            np.testing.assert_allclose(line["y"], final.mean(0))
            np.testing.assert_allclose(band_bounds(band, LRS), (final.min(0), final.max(0)))
    plot.pyplot().close(fig)
    fig = lr_exp.curves_figure(LRS, acc, inits, STEPS, 3)
    axes = np.array(fig.axes).reshape(2, 4)  # the learning rates nearest 0.01, 0.1, 1 and 10: all four
    for r, init in enumerate(inits):
        for c, lr in enumerate(LRS):
            assert axes[r, c].get_title() == f"{init}, lr {lr:.3g}"
            for line, arm in zip(lines_of(axes[r, c]), lr_exp.ARMS):
                np.testing.assert_allclose(line["x"], STEPS)
                np.testing.assert_allclose(line["y"], acc[lr_exp.arm_name(arm, init)][:, c].mean(0))
    plot.pyplot().close(fig)


def _probe(inits):
    """[seeds=3, E=4] loss ratios per arm with a NaN and an inf (overflow); median != mean in every column."""
    base = np.array([[0.9, 0.5, 2.0, np.nan], [0.95, 0.7, 0.8, np.inf], [0.99, 0.4, 0.9, 5e3]])
    return {when: {lr_exp.arm_name(arm, init): base * (1 + k + 2 * j) ** (1 if when == "init" else -1)
                   for j, init in enumerate(inits) for k, arm in enumerate(lr_exp.ARMS)}
            for when in ("init", "trained")}


def test_probe_figure_draws_median_and_range_with_overflow_at_the_ceiling_and_no_warning(monkeypatch):
    import warnings

    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    inits = init_names_list(0.2)
    probe = _probe(inits)
    eta = [1e-3, 1e-2, 1e-1, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN and inf ratios are what the probe meets; they warn nothing
        fig = lr_exp.probe_figure(eta, probe, inits)
        v = lr_exp.verdict(LRS, STEPS, *_paired_records(), inits, probe, eta)
    axes = np.array(fig.axes).reshape(2, 2)
    for r, when in enumerate(("init", "trained")):
        for c, init in enumerate(inits):
            assert axes[r, c].get_title().startswith(f"{init}, ")
            for line, band, arm in zip(lines_of(axes[r, c]), axes[r, c].collections, lr_exp.ARMS):
                ratios = probe[when][lr_exp.arm_name(arm, init)]
                shown = np.where(np.isfinite(ratios), np.minimum(ratios, lr_exp.CEILING), lr_exp.CEILING)
                np.testing.assert_allclose(line["y"], np.median(shown, 0))
                np.testing.assert_allclose(band_bounds(band, eta), (shown.min(0), shown.max(0)))
    plot.pyplot().close(fig)
    for when in probe:
        for init in inits:
            for arm in lr_exp.ARMS:
                median = np.median(np.where(np.isfinite(r := probe[when][lr_exp.arm_name(arm, init)]), r, np.inf), 0)
                below = np.asarray(eta)[median < 1.0]
                expected = float(below.max()) if below.size else None
                assert v["largest_loss_lowering_step"][when][init][arm] == expected, (when, init, arm)
    md = lr_exp.render(json.loads(json.dumps({"verdict": v, "seeds": [0, 1, 2], "axes": {"learning_rate": LRS}})))
    for when, label in (("init", "at initialisation"), ("trained", "after 10 updates")):
        steps = v["largest_loss_lowering_step"][when]
        parts = "; ".join(f"{init}: BN {lr_exp._fmt(steps[init]['batchnorm'])}, plain {lr_exp._fmt(steps[init]['plain'])}"
                          for init in inits)
        assert f"probe {label}, largest step that lowers the loss (median over seeds): {parts}\n" in md
    assert len({str(v["largest_loss_lowering_step"][when]) for when in probe}) == 2  # the two moments differ


def test_render_says_never_where_an_arm_never_qualifies():
    acc, diverged = _paired_records()
    inits = init_names_list(0.2)
    plain_he = lr_exp.arm_name("plain", inits[1])
    acc[plain_he] = np.minimum(acc[plain_he], 0.5)  # plain never reaches 0.9 with He init
    v = lr_exp.verdict(LRS, STEPS, acc, diverged, inits)
    md = lr_exp.render(json.loads(json.dumps({"verdict": v, "seeds": [0, 1, 2], "axes": {"learning_rate": LRS}})))
    assert "| he | plain | never | never (never) |" in md
    assert ("he: BN's largest stable learning rate is 1 against plain's never; BN needs 11 updates to reach 0.9, "
            "plain never") in md


def test_analyse_records_the_options_probe_settings():
    from types import SimpleNamespace

    acc, diverged = _paired_records(0.2)
    inits = init_names_list(0.2)
    probe = _probe(inits)
    run = SimpleNamespace(
        args=SimpleNamespace(init_scale=0.2, probe_lr=0.03, num_seeds=3),
        config=SimpleNamespace(axes={"learning_rate": tuple(LRS)}),
        result=SimpleNamespace(record_steps=np.array(STEPS), metrics={"train_accuracy": acc}, diverged=diverged),
        data={"probe": probe, "step_sizes": np.array([1e-3, 1e-2, 1e-1, 1.0])})
    fields = lr_exp.analyse(run)
    assert fields["inits"] == {"w=0.2": 0.2, "he": "he"}
    assert fields["probe"]["learning_rate"] == 0.03 and fields["probe"]["updates_before_trained"] == 10
    assert fields["probe"]["loss_ratio"] is probe
    assert fields["verdict"]["max_stable_lr"]["he"]["ratio"] == pytest.approx(10.0)
    run.data["probe"] = None
    assert "probe" not in lr_exp.analyse(run)
