"""The sweep's table and the shared figure code (experiments/sweep.py, experiments/plot.py) read back cell by cell
and line by line, against numbers recomputed here from the arrays with NumPy."""

import numpy as np
import pytest

from experiments import plot, sweep
from presentation import band_bounds, lines_of, markdown_tables

SCALES = [1.0, 0.3, 0.05, 0.001]


def _sweep_arrays():
    """3 seeds, 4 scales, 2 records; the first record is not the last, the mean not the median; BN wins at two
    scales, plain at one, one tie (equal means); plain diverged in one seed at scale 0.001 only."""
    bn = np.array([[[0.1, 0.90], [0.2, 0.80], [0.3, 0.50], [0.1, 0.60]],
                   [[0.2, 0.70], [0.1, 0.82], [0.3, 0.50], [0.2, 0.61]],
                   [[0.3, 0.95], [0.1, 0.84], [0.3, 0.50], [0.1, 0.20]]])
    plain = np.array([[[0.5, 0.10], [0.3, 0.95], [0.2, 0.40], [0.1, 0.11]],
                      [[0.5, 0.12], [0.3, 0.96], [0.2, 0.60], [0.1, 0.11]],
                      [[0.5, 0.11], [0.3, 0.90], [0.2, 0.50], [0.1, 0.11]]])
    diverged = {"batchnorm": np.zeros((3, 4), bool), "plain": np.zeros((3, 4), bool)}
    diverged["plain"][1, 3] = True
    return {"batchnorm": bn, "plain": plain}, diverged


def test_sweep_table_cells_are_each_arms_final_mean_and_the_winner():
    acc, diverged = _sweep_arrays()
    md = sweep.render({"weight_scales": SCALES, "train_accuracy": {k: v.tolist() for k, v in acc.items()},
                       "diverged": {k: v.tolist() for k, v in diverged.items()}})
    (table,) = markdown_tables(md)
    assert table[0] == ["scale", "BN", "plain", "winner"]
    final = {arm: a[:, :, -1].mean(0) for arm, a in acc.items()}  # the last record, mean over seeds
    winners = []
    for i, (w, row) in enumerate(zip(SCALES, table[1:])):
        assert float(row[0]) == pytest.approx(w)
        assert (float(row[1]), float(row[2])) == pytest.approx((final["batchnorm"][i], final["plain"][i]), abs=5e-4)
        if np.isclose(final["batchnorm"][i], final["plain"][i]):
            winner = "tie"
        else:
            winner = "BN" if final["batchnorm"][i] > final["plain"][i] else "plain"
        winners.append(winner)
        # The diverged note sits on the row of the scale where the arm diverged, and only there.
        assert row[3] == winner + (" (plain diverged)" if diverged["plain"][:, i].any() else "")
    assert winners == ["BN", "plain", "tie", "BN"]  # each outcome is present
    bn_wins = sum(winner == "BN" for winner in winners)
    assert f"BN wins at {bn_wins} of 4 scales" in md
    _, wins = sweep.summary_table(SCALES, acc, diverged)
    assert wins == {"batchnorm": 2, "plain": 1}


def test_band_draws_the_mean_or_median_and_the_min_max_band():
    plt = plot.pyplot()
    runs = np.array([[0.1, 0.9, 0.5], [0.2, 0.1, 0.6], [0.9, 0.2, 0.7]])  # median != mean in every column
    x = np.array([1.0, 2.0, 4.0])
    for center, expected in (("mean", runs.mean(0)), ("median", np.median(runs, 0))):
        fig, ax = plt.subplots()
        drawn = plot.band(ax, x, runs, center=center, label="a", color="C2")
        (line,) = lines_of(ax)
        np.testing.assert_allclose(line["x"], x)
        np.testing.assert_allclose(line["y"], expected)
        assert line["label"] == "a" and drawn is ax.lines[0]
        low, high = band_bounds(ax.collections[0], x)
        np.testing.assert_allclose(low, runs.min(0))
        np.testing.assert_allclose(high, runs.max(0))
        plt.close(fig)
    fig, ax = plt.subplots()
    plot.band(ax, x, runs[:1])
    assert not ax.collections  # one seed: no spread to show
    plt.close(fig)


def test_sweep_figure_panels_show_each_scales_mean_and_seed_range():
    acc, diverged = _sweep_arrays()
    fig = plot.sweep_figure(SCALES, acc, diverged=diverged)
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == 4
    for i, ax in enumerate(panels):
        assert ax.get_title() == f"W:{SCALES[i]:.4g}"
        lines = lines_of(ax)
        assert [line["label"] for line in lines] == [plot.arm_label("batchnorm"), plot.arm_label("plain")]
        for line, band, (arm, runs) in zip(lines, ax.collections, acc.items()):
            np.testing.assert_allclose(line["x"], [0, 1])
            np.testing.assert_allclose(line["y"], runs[:, i].mean(0))
            low, high = band_bounds(band, [0, 1])
            np.testing.assert_allclose(low, runs[:, i].min(0))
            np.testing.assert_allclose(high, runs[:, i].max(0))
        assert [t.get_text() for t in ax.texts] == (["plain diverged (1/3)"] if i == 3 else [])
    plot.pyplot().close(fig)


def test_each_arm_has_its_own_label_short_name_and_style():
    arms = ("batchnorm", "plain", "renorm", "ghost")
    assert [plot.arm_short(a) for a in arms] == ["BN", "plain", "Batch Renorm", "Ghost BN"]
    assert [plot.arm_label(a) for a in arms] == ["Batch Normalization", "Normal(without BatchNorm)", "Batch Renorm",
                                                 "Ghost BN (virtual batch)"]
    styles = [tuple(plot.arm_style(a).values()) for a in arms]
    assert styles[0] == ("-", "C0") and styles[1] == ("--", "C1")  # the book's: BN solid, plain dashed
    assert len(set(styles)) == 4  # every arm tells apart from the others
    assert plot.arm_short("other") == plot.arm_label("other") == "other"


def test_sweep_analyse_and_figure_read_the_runs_own_arrays(monkeypatch):
    from types import SimpleNamespace

    drawn = []
    monkeypatch.setattr(plot, "sweep_figure", lambda *args, **kwargs: drawn.append((args, kwargs)))
    acc, diverged = _sweep_arrays()
    for seeds in (3, 1):
        run = SimpleNamespace(args=SimpleNamespace(num_seeds=seeds),
                              config=SimpleNamespace(axes={"weight_scale": tuple(SCALES)}),
                              result=SimpleNamespace(metrics={"train_accuracy": acc}, diverged=diverged))
        fields = sweep.analyse(run)
        sweep.draw_sweep(run)
    assert fields["weight_scales"] == SCALES
    s = fields["summary"]
    final = {arm: a[:, :, -1].mean(0) for arm, a in acc.items()}
    for arm in acc:
        np.testing.assert_allclose(s["final_train_accuracy_mean"][arm], final[arm])
    assert (s["bn_wins"], s["wins"], s["num_scales"]) == (2, {"batchnorm": 2, "plain": 1}, 4)
    (args3, kwargs3), (_, kwargs1) = drawn
    assert list(args3[0]) == SCALES and args3[1] is acc and kwargs3["diverged"] is diverged
    assert kwargs3["title"] == "mean and min..max over 3 seeds" and kwargs1["title"] is None
