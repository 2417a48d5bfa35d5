"""experiments.init: the verdict on hand-made records, and the CLI end to end (seed 0 is the book's sweep)."""

import json
import re

import numpy as np
import pytest

from experiments import init as init_exp
from experiments import protocol, registry
from helpers import assert_quick_run, run_quick, read_results, run_cli


def test_verdict_on_hand_made_records():
    scales = [1.0, 0.1, 0.01]
    # [seeds=3, S=3, R=1]
    bn = np.array([[0.5, 0.95, 0.99], [0.5, 0.93, 1.0], [0.5, 0.91, 0.9]])[..., None]
    plain = np.array([[0.1, 0.97, 0.1], [0.5, 0.96, 0.1], [0.1, 0.95, 0.1]])[..., None]
    v = init_exp.verdict(scales, {"batchnorm": bn, "plain": plain})
    s0, s1, s2 = v["per_scale"]
    assert (s0["bn_wins"], s0["plain_wins"], s0["ties"]) == (2, 0, 1)
    assert (s1["bn_wins"], s1["plain_wins"]) == (0, 3)
    assert (s2["bn_wins"], s2["plain_wins"]) == (3, 0)
    assert s2["batchnorm"]["mean"] == pytest.approx(0.9633333)
    half = 4.303 * np.std([0.99, 1.0, 0.9], ddof=1) / np.sqrt(3)
    assert s2["batchnorm"]["low"] == pytest.approx(0.9633333 - half)
    assert s2["batchnorm"]["high"] == 1.0  # 0.963 + 0.136: an accuracy interval is clipped to [0, 1]
    half = 4.303 * np.std([0.95, 0.93, 0.91], ddof=1) / np.sqrt(3)
    assert (s1["batchnorm"]["low"], s1["batchnorm"]["high"]) == (pytest.approx(0.93 - half), pytest.approx(0.93 + half))
    assert v["sign_test"] == {"bn_wins": 5, "plain_wins": 3, "ties": 1, "p_value": pytest.approx(2 * 93 / 256)}
    assert v["trainable_scales"] == {"batchnorm": [0.1, 0.01], "plain": [0.1]}
    assert v["trainable_width"]["batchnorm"] == pytest.approx(2.0)
    assert v["trainable_width"]["plain"] == pytest.approx(1.0)
    assert v["plain_better_scales"] == [0.1]
    md = init_exp.render({"verdict": v, "record_steps": [1, 191]})
    assert "sign test p = 0.73" in md and "| 0.1 | " in md and "| 0 / 3 (plain 3) |" in md
    assert "plain beats BN in most seeds at w = 0.1" in md
    # all tied: nobody is better, and the sign test sees no pair
    same = init_exp.verdict(scales, {"batchnorm": plain, "plain": plain.copy()})
    assert same["plain_better_scales"] == [] and same["sign_test"]["p_value"] == 1.0


QUICK = registry.experiment("init").quick  # scales 0.3 and 0.01, 3 epochs, 2 seeds, 200 training images


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m experiments.init`` at the registry's quick options (figures drawn), run once for this module."""
    out = tmp_path_factory.mktemp("init") / "run"
    return run_quick("init", out), out


@pytest.mark.slow
def test_quick_run_records_a_verdict_and_prints_its_rendering(quick_run):
    assert_quick_run("init", *quick_run)
    assert "Warning" not in quick_run[0].stderr, quick_run[0].stderr[-3000:]


@pytest.mark.slow
def test_cli_seed_zero_is_the_books_sweep(quick_run, tmp_path):
    _, out = quick_run
    r2 = run_cli("experiments.sweep", *QUICK[:QUICK.index("--num-seeds")], *QUICK[QUICK.index("--num-seeds") + 2:],
                 "--data", "bundled", "--no-cache", "--cpu-devices", "2", "--quiet", "--no-plot",
                 "--out", str(tmp_path / "sweep"))
    assert r2.returncode == 0, r2.stderr
    res = read_results(out)
    book = read_results(tmp_path / "sweep")
    assert res["seeds"] == [0, 1] and book["seeds"] == [0]
    for arm in ("batchnorm", "plain"):
        np.testing.assert_array_equal(np.asarray(res["train_accuracy"][arm])[:1], book["train_accuracy"][arm])
    assert [row["scale"] for row in res["verdict"]["per_scale"]] == [0.3, 0.01]
    final = np.asarray(res["train_accuracy"]["batchnorm"])[:, :, -1]
    assert res["verdict"]["per_scale"][1]["batchnorm"]["mean"] == pytest.approx(final[:, 1].mean())
    for png in init_exp.EXPERIMENT.figure_files:
        assert (out / png).stat().st_size > 10_000
    assert "| w | BN mean" in init_exp.render(res)


@pytest.mark.parametrize("bad,option", [(["--scales", "0.1,x"], "--scales"), (["--num-seeds", "0"], "--num-seeds"),
                                        (["--lr", "nan"], "--lr")])
def test_bad_options_exit_2_naming_the_option(bad, option, capsys):
    with pytest.raises(SystemExit) as exc:
        protocol.parse_args(init_exp.EXPERIMENT, [*bad, "--out", "/tmp/bnjax-never-written"])
    assert exc.value.code == 2 and option in capsys.readouterr().err


def _records():
    """[seeds=3, S=4, R=2]: the first record differs from the last; at scale 0.001 BN and plain win one seed
    each and tie in the third; plain diverged in seed 2 at scale 1."""
    scales = [1.0, 0.1, 0.01, 0.001]
    bn = np.array([[0.5, 0.95, 0.99, 0.5], [0.5, 0.93, 1.0, 0.4], [0.5, 0.91, 0.9, 0.3]])
    plain = np.array([[0.1, 0.97, 0.1, 0.4], [0.5, 0.96, 0.1, 0.5], [0.1, 0.95, 0.1, 0.3]])
    first = np.full((3, 4), 0.2)
    acc = {"batchnorm": np.stack([first, bn], -1), "plain": np.stack([first, plain], -1)}
    diverged = {"batchnorm": np.zeros((3, 4), bool), "plain": np.zeros((3, 4), bool)}
    diverged["plain"][2, 0] = True
    return scales, acc, diverged


def _interval(values):
    """NumPy oracle: mean and Student-t 95 % interval (t = 4.303 for 3 seeds), unclipped."""
    values = np.asarray(values, float)
    half = 4.303 * values.std(axis=0, ddof=1) / np.sqrt(values.shape[0])
    return values.mean(0), values.mean(0) - half, values.mean(0) + half


def test_render_reads_back_each_arms_numbers_in_its_own_column():
    from presentation import markdown_tables

    scales, acc, _ = _records()
    v = init_exp.verdict(scales, acc)
    assert v["plain_better_scales"] == [0.1]  # 1 win, 1 loss, 1 tie at 0.001 is no majority either way
    md = init_exp.render(json.loads(json.dumps({"verdict": v, "record_steps": [1, 191]})))
    assert md.startswith("Final training accuracy after 191 updates, 3 seeds.\n")
    (table,) = markdown_tables(md)
    assert table[0] == ["w", "BN mean [95 % interval]", "plain mean [95 % interval]", "BN wins / seeds"]
    final = {arm: a[..., -1] for arm, a in acc.items()}
    diff = final["batchnorm"] - final["plain"]
    for i, row in enumerate(table[1:]):
        assert float(row[0]) == pytest.approx(scales[i])
        for cell, arm in zip(row[1:3], ("batchnorm", "plain")):
            mean, lo, hi = _interval(final[arm][:, i])
            numbers = [float(t) for t in re.findall(r"[0-9.]+", cell)]
            assert numbers == pytest.approx([mean, max(lo, 0.0), min(hi, 1.0)], abs=5e-4), (i, arm, cell)
        wins, losses = int(np.sum(diff[:, i] > 1e-6)), int(np.sum(diff[:, i] < -1e-6))
        assert row[3] == f"{wins} / 3" + (f" (plain {losses})" if losses else "")
    wins, losses = int(np.sum(diff > 1e-6)), int(np.sum(diff < -1e-6))
    ties = diff.size - wins - losses
    assert len({wins, losses, ties}) == 3  # distinct, so a swapped count shows
    assert (f"BN ends above plain in {wins} of {diff.size} (scale, seed) pairs, below in {losses}, tied in {ties}"
            in md)
    # BN reaches a mean of 0.9 at 0.1 and 0.01 (two of the four, 2 decades), plain at 0.1 alone (1 decade).
    assert "BN 2.00 decades of weight scale, plain 1.00" in md
    assert "plain beats BN in most seeds at w = 0.1\n" in md


def test_figures_draw_the_final_record_and_mark_the_diverged_panels(monkeypatch):
    from types import SimpleNamespace

    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    scales, acc, diverged = _records()
    fig = init_exp.accuracy_figure(scales, acc, 191)
    (ax,) = fig.axes
    lines = lines_of(ax)
    assert [line["label"] for line in lines] == [plot.arm_label("batchnorm"), plot.arm_label("plain")]
    for line, band, arm in zip(lines, ax.collections, init_exp.ARMS):
        mean, lo, hi = _interval(acc[arm][..., -1])
        np.testing.assert_allclose(line["x"], scales)
        np.testing.assert_allclose(line["y"], mean)
        np.testing.assert_allclose(band_bounds(band, scales), (lo, hi), atol=1e-12)
    assert ax.get_ylabel() == "training accuracy after 191 updates"
    plot.pyplot().close(fig)
    run = SimpleNamespace(config=SimpleNamespace(axes={"weight_scale": tuple(scales)}), args=SimpleNamespace(num_seeds=3),
                          result=SimpleNamespace(metrics={"train_accuracy": acc}, diverged=diverged,
                                                 record_steps=np.array([1, 191])))
    for figure in init_exp.EXPERIMENT.figures:
        fig = figure.draw(run)
        if figure.file == "init_panels.png":
            panels = [ax for ax in fig.axes if ax.lines]
            assert [[t.get_text() for t in ax.texts] for ax in panels] == [["plain diverged (1/3)"], [], [], []]
            for i, ax in enumerate(panels):
                np.testing.assert_allclose(lines_of(ax)[1]["y"], acc["plain"][:, i].mean(0))
        else:
            np.testing.assert_allclose(lines_of(fig.axes[0])[0]["y"], acc["batchnorm"][..., -1].mean(0))
        plot.pyplot().close(fig)


def test_a_mean_exactly_at_the_threshold_is_trainable():
    # [seeds=1, S=3, R=1]: BN's mean is exactly 0.9 at scale 0.1, plain's just below it
    acc = {"batchnorm": np.array([[[0.5], [0.9], [0.95]]]), "plain": np.array([[[0.5], [0.9 - 1e-9], [0.95]]])}
    v = init_exp.verdict([1.0, 0.1, 0.01], acc)
    assert v["trainable_scales"] == {"batchnorm": [0.1, 0.01], "plain": [0.01]}
    assert v["trainable_width"] == {"batchnorm": pytest.approx(2.0), "plain": pytest.approx(1.0)}
