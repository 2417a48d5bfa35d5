"""experiments.overfitting: the book's view's verdict on hand-made curves, the learning-rate x data-size study's
verdict, answer, table and figure on hand-built results, the study's held-out set and grids, the CLI end to end,
its option checks, and the protocol (record steps, shared initial weights, the book's dropout, held-out images
never trained on)."""

import json

import numpy as np
import pytest

from experiments import overfitting, overfitting_figures, overfitting_lr, protocol
from experiments import overfitting_lr_verdict as lr_verdict
from helpers import assert_quick_run, read_results, run_quick

SUMMARY_KEYS = {"final_train", "final_heldout", "gap", "best_heldout", "best_heldout_epoch", "epoch_train_100",
                "diverged_seeds", "headline", "vs_unregularised", "vs_plain"}
NAMES = ["plain", "plain+weight_decay", "plain+dropout", "plain+dropout+weight_decay",
         "batchnorm", "batchnorm+weight_decay", "batchnorm+dropout", "batchnorm+dropout+weight_decay"]


def _arms(**curves):
    """arm -> [seeds=2, weight decay (0, lambda), R=3] from per-arm ``(seed0 wd0, seed0 wd1, seed1 wd0, seed1 wd1)``."""
    return {arm: np.array(rows, float).reshape(2, 2, 3) for arm, rows in curves.items()}


ONE_ULP_BELOW = float(np.float32(41) * np.float32(1 / 41))  # 41 of 41 right, as float32 computes it


def _hand_made():
    train = _arms(**{
        "plain": ([0.5, 1.0, 1.0], [0.5, 0.8, 0.9], [0.5, 0.9, 1.0], [0.5, 0.8, 0.9]),
        "plain+dropout": ([0.3, 0.6, 0.8], [0.2, 0.3, 0.4], [0.3, 0.6, 0.8], [0.2, 0.3, 0.4]),
        "batchnorm": ([0.6, 1.0, 1.0], [0.6, 1.0, ONE_ULP_BELOW], [0.6, 1.0, 1.0], [0.6, 0.95, 1.0]),
        "batchnorm+dropout": ([0.4, 0.7, 0.9], [0.4, 0.6, 0.7], [0.4, 0.7, 0.9], [0.4, 0.1, 0.1]),
    })
    held = _arms(**{
        "plain": ([0.4, 0.7, 0.6], [0.4, 0.6, 0.7], [0.4, 0.8, 0.7], [0.4, 0.6, 0.72]),
        "plain+dropout": ([0.3, 0.5, 0.62], [0.2, 0.25, 0.3], [0.3, 0.5, 0.6], [0.2, 0.25, 0.3]),
        "batchnorm": ([0.5, 0.8, 0.8], [0.5, 0.82, 0.84], [0.5, 0.8, 0.78], [0.5, 0.8, 0.8]),
        "batchnorm+dropout": ([0.4, 0.6, 0.75], [0.4, 0.5, 0.6], [0.4, 0.6, 0.77], [0.4, 0.1, 0.1]),
    })
    diverged = {arm: np.zeros((2, 2), bool) for arm in train}
    diverged["batchnorm+dropout"][1, 1] = True  # seed 1 with weight decay
    return {"train_accuracy": train, "heldout_accuracy": held}, diverged


def test_verdict_on_hand_made_curves():
    metrics, diverged = _hand_made()
    v = overfitting.verdict([0, 5, 10], metrics, diverged)
    assert list(v) == NAMES
    for name, s in v.items():
        assert set(s) == SUMMARY_KEYS, name
        assert s["headline"] == ("dropout+weight_decay" not in name)
    # (final train, final held-out, gap, best held-out, its epoch, epoch of train 1.0), computed by hand from the
    # seed means above.
    expected = {
        "plain": (1.0, 0.65, 0.35, 0.75, 5, 10),
        "plain+weight_decay": (0.9, 0.71, 0.19, 0.71, 10, None),
        "plain+dropout": (0.8, 0.61, 0.19, 0.61, 10, None),
        "plain+dropout+weight_decay": (0.4, 0.3, 0.1, 0.3, 10, None),
        "batchnorm": (1.0, 0.79, 0.21, 0.8, 5, 5),
        "batchnorm+weight_decay": (1.0, 0.82, 0.18, 0.82, 10, 10),  # one ulp below 1.0 counts as all right
        "batchnorm+dropout": (0.9, 0.76, 0.14, 0.76, 10, None),
        "batchnorm+dropout+weight_decay": (0.4, 0.35, 0.05, 0.4, 0, None),
    }
    for name, (tr, he, gap, best, at, perfect) in expected.items():
        s = v[name]
        assert (s["final_train"], s["final_heldout"], s["gap"], s["best_heldout"]) == pytest.approx(
            (tr, he, gap, best)), name
        assert (s["best_heldout_epoch"], s["epoch_train_100"]) == (at, perfect), name
    assert [v[n]["diverged_seeds"] for n in NAMES] == [0, 0, 0, 0, 0, 0, 0, 1]
    # Paired comparisons of the final held-out accuracy, seed by seed.
    assert v["plain"]["vs_unregularised"] is None and v["plain"]["vs_plain"] is None
    assert v["batchnorm"]["vs_unregularised"] is None
    pwd = v["plain+weight_decay"]["vs_unregularised"]
    assert pwd["heldout_change"] == pytest.approx(0.06) and (pwd["seeds_higher"], pwd["seeds_lower"]) == (2, 0)
    pdo = v["plain+dropout"]["vs_unregularised"]
    assert pdo["heldout_change"] == pytest.approx(-0.04) and (pdo["seeds_higher"], pdo["seeds_lower"]) == (1, 1)
    bn = v["batchnorm"]["vs_plain"]
    assert bn["heldout_change"] == pytest.approx(0.14) and (bn["seeds_higher"], bn["seeds_lower"], bn["seeds"]) == (2, 0, 2)
    assert v["batchnorm+weight_decay"]["vs_plain"]["heldout_change"] == pytest.approx(0.11)
    bdo = v["batchnorm+dropout"]["vs_unregularised"]
    assert bdo["heldout_change"] == pytest.approx(-0.03) and (bdo["seeds_higher"], bdo["seeds_lower"]) == (0, 2)
    assert v["batchnorm+dropout"]["vs_plain"]["heldout_change"] == pytest.approx(0.15)

    results = {"verdict": v, "seeds": [0, 1], "epochs": [0, 5, 10], "axes": {"weight_decay": [0.0, 0.1]},
               "data": {"name": "bundled", "num_train": 300, "num_heldout": 4700},
               "arms": {"plain+dropout": {"dropout_ratio": 0.2, "dropout_inverted": False}}}
    lines = overfitting.render(json.loads(json.dumps(results))).splitlines()  # as read back from results.json
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    assert table[0][:4] == ["combination", "train", "held-out", "gap"] and table[1][0].startswith("---")
    rows = [row[0].split()[0] for row in table[2:]]
    assert rows == [n for n in NAMES if "dropout+weight" not in n] + [n for n in NAMES if "dropout+weight" in n]
    assert table[2][1:] == ["1.000", "0.650", "0.350", "0.750 (5)", "10"]  # plain: the numbers above
    assert "not in the book" in "\n".join(lines)
    text = " ".join(lines)
    assert "BN ends above plain" in text and "0.790 against 0.650" in text and "2 of 2 seeds" in text
    # Plain with dropout: a smaller gap but a lower held-out accuracy is reported as that, not as a win.
    assert "Dropout: for plain it only shrank the gap (0.350 -> 0.190)" in text
    assert "Weight decay: for plain it raised held-out accuracy (+6.0 points" in text
    assert "Highest final held-out accuracy: BN, weight decay (0.820)" in text
    assert [row[0] for row in table if "seed(s) diverged" in row[0]] == [
        "batchnorm+dropout+weight_decay (not in the book) (1 seed(s) diverged)"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m experiments.overfitting`` at the registry's quick options (figure drawn), run once."""
    out = tmp_path_factory.mktemp("overfitting") / "run"
    return run_quick("overfitting", out), out


@pytest.mark.slow
def test_quick_run_records_a_verdict_and_prints_its_rendering(quick_run):
    assert_quick_run("overfitting", *quick_run)


@pytest.mark.slow
def test_cli_tiny_run_end_to_end(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    assert "combination" in proc.stdout and "wrote results.json, overfitting.png" in proc.stdout
    res = read_results(out)
    assert res["epochs"] == [0, 3, 6]
    assert res["record_steps"] == [1, 4, 7]  # 100 images / 100 a batch: one update an epoch
    assert res["iter_per_epoch"] == 1
    assert list(res["verdict"]) == NAMES
    for s in res["verdict"].values():
        assert set(s) == SUMMARY_KEYS
    assert list(res["arms"]) == ["plain", "plain+dropout", "batchnorm", "batchnorm+dropout"]
    for metric in ("train_accuracy", "heldout_accuracy", "train_loss", "heldout_loss"):
        for arm in res["arms"]:
            assert np.array(res[metric][arm], float).shape == (2, 2, 3), (metric, arm)
    assert res["axes"] == {"weight_decay": [0.0, 0.1]} and res["seeds"] == [0, 1]
    for name, arm in res["arms"].items():
        assert arm["init_stream"] == 0 and arm["weight_init"] == "he" and arm["norm"] == name.startswith("b")
        assert arm["dropout_ratio"] == (0.2 if name.endswith("+dropout") else 0.0)
        assert arm["dropout_inverted"] is False
    assert res["data"]["num_train"] == 100 and res["data"]["num_heldout"] == 4900  # all the rest
    assert any("van Laarhoven" in note for note in res["notes"])
    assert (out / "overfitting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = overfitting.render(res)  # from the results file alone
    assert md.strip() in proc.stdout  # what the console showed
    book = md[md.index("**The book's protocol.**"):md.index("**Against the learning rate")]
    table = [line for line in book.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(NAMES) and table[1].startswith("|---")  # header, rule, a row per combination
    assert "4900 held-out" in md and "non-inverted" in md and "(not in the book)" in md


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--dropout-ratio", "0"], "--dropout-ratio"),
        (["--dropout-ratio", "1"], "--dropout-ratio"),
        (["--dropout-ratio", "nan"], "--dropout-ratio"),
        (["--dropout-ratio", "x"], "--dropout-ratio"),
        (["--weight-decay", "0"], "--weight-decay"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--record-every", "0"], "--record-every"),
        (["--epochs", "7", "--record-every", "7"], "--record-every"),
        (["--epochs", "1"], "--epochs"),
        (["--lr", "0"], "--lr"),
        (["--data", "bundled", "--train-size", "5000"], "--train-size"),
        (["--num-seeds", "0"], "--num-seeds"),
        (["--lrs", "0.1,0.01,0.1"], "--lrs"),  # duplicates refused, as every list option
        (["--lrs", "0"], "--lrs"),
        (["--train-sizes", "300,1000,300"], "--train-sizes"),
        (["--train-sizes", "0,300"], "--train-sizes"),
        (["--train-sizes", "300,x"], "--train-sizes"),
        (["--data", "bundled", "--train-sizes", "300,4001"], "--train-sizes"),  # the 1,000 held out must stay
        (["--data", "mnist", "--train-sizes", "60001"], "--train-sizes"),
        (["--study-updates", "601", "--study-record-every", "7"], "--study-record-every"),
        (["--study-updates", "1"], "--study-updates"),
        (["--study-seeds", "0"], "--study-seeds"),
        (["--study-regularisers", "some"], "--study-regularisers"),
        (["--no-study", "--lrs", "0.1"], "--lrs"),  # no effect without the study: refused, not ignored
        (["--no-study", "--study-seeds", "2", "--train-sizes", "300"], "--train-sizes, --study-seeds"),
    ],
)
def test_bad_options_exit_2_naming_the_option(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        protocol.parse_args(overfitting.EXPERIMENT, bad + ["--out", "/tmp/never-written"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_are_the_books_protocol(tmp_path):
    from bnjax import grid

    args = protocol.parse_args(overfitting.EXPERIMENT, ["--out", str(tmp_path)])
    assert (args.train_size, args.epochs, args.record_every, args.num_seeds, args.lr) == (300, 201, 5, 5, 0.01)
    config = overfitting.grid_config(args, 300)
    assert config.hidden_sizes == (100,) * 6 and config.batch_size == 100 and config.optimizer == "sgd"
    assert config.num_records == 41 and config.updates_per_record == 15
    assert grid.record_steps(config, 300)[-1] == 601  # 1 + 3 * 200 updates, the book's 201 epochs
    assert config.arms["plain+dropout"] == grid.Arm(norm=False, dropout_ratio=0.2, dropout_inverted=False,
                                                    weight_init="he", init_stream=0)
    # The study's defaults: 5 learning rates, 3 sizes, the book's 601 updates for every size, 3 seeds, no regulariser.
    assert (args.lrs, args.train_sizes, args.study_updates, args.study_record_every, args.study_seeds,
            args.study_regularisers, args.no_study) == ((0.01, 0.03, 0.1, 0.3, 1.0), (300, 1000, 4000), 601, 100, 3,
                                                        "none", False)
    inverted = overfitting.grid_config(
        protocol.parse_args(overfitting.EXPERIMENT, ["--inverted-dropout", "--out", str(tmp_path)]), 300)
    assert inverted.arms["batchnorm+dropout"].dropout_inverted is True
    # Every model of a seed starts from the same Affine weights (He init), BN or not, dropout or not.
    models = grid.init_models(config.replace(num_seeds=2))
    first = models["plain"].params.affine[0].W  # [seeds, weight decay, 784, 100]
    assert first.shape == (2, 2, 784, 100)
    assert np.std(first) == pytest.approx(np.sqrt(2 / 784), rel=0.02)
    assert not np.allclose(first[0], first[1])  # seeds differ
    for arm in ("plain+dropout", "batchnorm", "batchnorm+dropout"):
        for a, b in zip(models[arm].params.affine, models["plain"].params.affine):
            np.testing.assert_array_equal(a.W, b.W)


@pytest.mark.slow
def test_protocol_matches_the_engine_alone(quick_run):
    """The quick run, 7 epochs recorded every 3: records after 1, 4 and 7 updates; the arms are what they say
    (the plain arm and the book's dropout equal the engine run alone, inverted dropout does not), and the
    held-out images are exactly the bundled images never trained on."""
    from bnjax import data, grid

    _, out = quick_run
    res = read_results(out)
    assert res["record_steps"] == [1, 4, 7] and res["epochs"] == [0, 3, 6]

    ds = data.load_bundled(100, None, split_seed=0)
    assert res["data"]["train_sha256"] == ds.source["train_sha256"] and res["data"]["num_heldout"] == 4900
    trained = {row.tobytes() for row in ds.x_train}
    assert not any(row.tobytes() in trained for row in ds.x_heldout)  # never trained on

    he = dict(weight_init="he", init_stream=0)
    config = grid.GridConfig(
        arms={"plain": grid.Arm(**he), "book": grid.Arm(dropout_ratio=0.2, dropout_inverted=False, **he),
              "inverted": grid.Arm(dropout_ratio=0.2, dropout_inverted=True, **he)},
        axes={}, weight_scale=1.0, num_records=3, updates_per_record=3, hidden_sizes=(100,) * 6, seed=0,
        num_seeds=2)
    alone = grid.run_grid(config, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    for cli_arm, engine_arm in (("plain", "plain"), ("plain+dropout", "book")):
        for metric in ("train_loss", "heldout_loss", "train_accuracy", "heldout_accuracy"):
            got = np.array(res[metric][cli_arm], float)[:, 0]  # weight decay 0; the engine alone has no axis
            tol = 1e-4 if "loss" in metric else 2 / 100 + 1e-6  # two training images
            np.testing.assert_allclose(got, alone.metrics[metric][engine_arm], rtol=1e-4, atol=tol,
                                       err_msg=f"{cli_arm} {metric}")
    held = np.array(res["heldout_loss"]["plain+dropout"], float)[0, 0]
    assert np.abs(held - alone.metrics["heldout_loss"]["inverted"][0]).max() > 1e-3  # not inverted dropout
    assert np.abs(held - np.array(res["heldout_loss"]["plain"], float)[0, 0]).max() > 1e-3  # dropout is on
    # Weight decay (the second column) changes the losses.
    wd = np.array(res["train_loss"]["plain"], float)[0]
    assert np.abs(wd[1] - wd[0]).max() > 1e-4


# --------------------------------------------------------------------------------------------------
# What the reader sees: the table, the sentences and the figure, against the arrays
# --------------------------------------------------------------------------------------------------


def test_render_reads_every_row_and_the_runs_own_settings():
    from presentation import markdown_tables

    metrics, diverged = _hand_made()
    v = overfitting.verdict([0, 5, 10], metrics, diverged)
    results = {"verdict": v, "seeds": [0, 1], "epochs": [0, 5, 10], "axes": {"weight_decay": [0.0, 0.3]},
               "data": {"name": "bundled", "num_train": 300, "num_heldout": 4700},
               "arms": {"plain": {"dropout_ratio": 0.0, "dropout_inverted": True},
                        "plain+dropout": {"dropout_ratio": 0.35, "dropout_inverted": True}}}
    md = overfitting.render(json.loads(json.dumps(results)))
    assert ("2 seed(s), 300 training images and 4700 held-out images (bundled MNIST), recorded at epochs 0 to 10 "
            "every 5; weight decay lambda 0.3, inverted dropout at 0.35;") in md
    (table,) = markdown_tables(md)
    assert table[0] == ["combination", "train", "held-out", "gap", "best held-out (epoch)", "train 1.0 at epoch"]
    for row in table[1:]:
        name = row[0].split()[0]
        net, _, reg = name.partition("+")
        drop, decay = overfitting.REGULARISERS[reg or "none"]
        arm = net + ("+dropout" if drop else "")
        train = metrics["train_accuracy"][arm][:, int(decay)].mean(0)  # NumPy, from the arrays
        held = metrics["heldout_accuracy"][arm][:, int(decay)].mean(0)
        best = int(np.argmax(held))
        perfect = np.nonzero(train >= 1 - 1e-6)[0]
        assert [float(c) for c in row[1:4]] == pytest.approx([train[-1], held[-1], train[-1] - held[-1]], abs=5e-4)
        assert row[4] == f"{held[best]:.3f} ({[0, 5, 10][best]})", name
        assert row[5] == (str([0, 5, 10][perfect[0]]) if perfect.size else "never"), name
        divs = int(diverged[arm][:, int(decay)].sum())
        assert row[0].endswith(f"({divs} seed(s) diverged)") == bool(divs), name


def _sentence_verdict(bn_heldout, changes):
    """A verdict as ``sentences`` reads it: held-out accuracy and gap per combination, from the unregularised
    nets' (plain 0.70, gap 0.30) and ``changes[combination] = (held-out change, gap change)``."""
    v = {}
    for net in overfitting.NETS:
        for reg in overfitting.REGULARISERS:
            name = overfitting.combination(net, reg)
            base = (0.70, 0.30) if net == "plain" else (bn_heldout, 0.20)
            change, gap = changes.get(name, (0.0, 0.0))
            v[name] = {"final_heldout": base[0] + change, "gap": base[1] + gap,
                       "vs_unregularised": None if reg == "none" else
                       {"heldout_change": change, "seeds_higher": int(change > 0), "seeds_lower": int(change < 0),
                        "seeds": 2},
                       "vs_plain": None}
    for reg in overfitting.REGULARISERS:
        a, b = v[overfitting.combination("batchnorm", reg)], v[overfitting.combination("plain", reg)]
        a["vs_plain"] = {"heldout_change": a["final_heldout"] - b["final_heldout"], "seeds": 2,
                         "seeds_higher": int(a["final_heldout"] > b["final_heldout"])}
    return v


def test_sentences_tell_each_outcome_by_its_sign():
    v = _sentence_verdict(0.65, {"plain+weight_decay": (0.02, -0.05), "batchnorm+weight_decay": (0.0, 0.01),
                                 "plain+dropout": (-0.03, -0.10), "batchnorm+dropout": (-0.02, 0.04)})
    text = " ".join(overfitting.sentences(v))
    assert "Without regularisation BN ends below plain on held-out images: 0.650 against 0.700 (-5.0 points" in text
    assert ("Weight decay: for plain it raised held-out accuracy (+2.0 points, higher in 1 of 2 seeds; gap 0.300 -> "
            "0.250); for BN it left held-out accuracy unchanged (gap 0.200 -> 0.210).") in text
    assert ("Dropout: for plain it only shrank the gap (0.300 -> 0.200) while held-out accuracy fell (-3.0 points, "
            "lower in 1 of 2 seeds); for BN it lowered held-out accuracy (-2.0 points) without shrinking the gap "
            "(0.200 -> 0.240).") in text
    assert "Highest final held-out accuracy: plain, weight decay (0.720)" in text
    text = " ".join(overfitting.sentences(_sentence_verdict(0.70, {})))
    assert "BN ends equal to plain" in text
    text = " ".join(overfitting.sentences(_sentence_verdict(0.80, {"batchnorm+dropout": (0.01, 0.0)})))
    assert "BN ends above plain" in text and "Highest final held-out accuracy: BN, dropout (0.810)" in text


def test_figure_panels_show_each_combinations_curves(monkeypatch):
    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    metrics, _ = _hand_made()
    fig = overfitting_figures.book_figure([0, 5, 10], metrics, 2, 0.3, 0.35)
    axes = np.array(fig.axes).reshape(2, 4)
    titles = ["", " + weight decay 0.3", " + dropout 0.35", " + dropout + weight decay"]
    for r, net in enumerate(overfitting.NETS):
        for c, (reg, (drop, decay)) in enumerate(overfitting.REGULARISERS.items()):
            ax = axes[r, c]
            assert ax.get_title() == plot.arm_short(net) + titles[c]
            arm = net + ("+dropout" if drop else "")
            lines = lines_of(ax)
            assert [(line["label"], line["linestyle"]) for line in lines] == [("train", "-"), ("held-out", "--")]
            for line, band, metric in zip(lines, ax.collections, ("train_accuracy", "heldout_accuracy")):
                runs = metrics[metric][arm][:, int(decay)]
                np.testing.assert_allclose(line["x"], [0, 5, 10])
                np.testing.assert_allclose(line["y"], runs.mean(0), err_msg=f"{net} {reg} {metric}")
                np.testing.assert_allclose(band_bounds(band, [0, 5, 10]), (runs.min(0), runs.max(0)))
    plot.pyplot().close(fig)


# --------------------------------------------------------------------------------------------------
# The study: learning rate x training size
# --------------------------------------------------------------------------------------------------

LRS = [0.01, 0.1, 1.0]
# Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds): the intervals' oracle (bnjax.claims rounds it to
# 4.303, hence the abs=1e-5 below).
T975_DF2 = 4.302652729911275
F, T = False, True


def _values(train, held, diverged):
    """One combination at one size: ``[seeds=3, L=3]`` arrays (rows are seeds, columns LRS)."""
    return {"train": np.array(train, float), "heldout": np.array(held, float), "diverged": np.array(diverged, bool)}


def _study_values():
    """Per size (300, 1000), plain and BN: plain best at 0.1 and unable to train at 1 (all seeds diverged at 300;
    one diverged and one at chance at 1000), BN best at 1 and below plain at 0.01."""
    size_300 = {
        "plain": _values([[1, 1, .1]] * 3, [[.78, .80, .10], [.80, .82, .10], [.79, .81, .10]], [[F, F, T]] * 3),
        "batchnorm": _values([[1, 1, 1]] * 3, [[.60, .75, .84], [.62, .74, .82], [.61, .76, .83]], [[F, F, F]] * 3),
    }
    size_1000 = {
        "plain": _values([[1, 1, .1], [1, 1, .15], [1, 1, .9]], [[.85, .88, .10], [.86, .87, .12], [.84, .89, .80]],
                         [[F, F, T], [F, F, F], [F, F, F]]),
        # One seed at chance at 0.01 (training accuracy 0.15): 1 of 3 failing is not "cannot train".
        "batchnorm": _values([[1, 1, 1], [.15, 1, 1], [1, 1, 1]], [[.80, .88, .90], [.82, .88, .91], [.81, .88, .89]],
                             [[F, F, F]] * 3),
    }
    return [size_300, size_1000]


def _study(per_size=None, reference_lr=0.01):
    per_size = _study_values() if per_size is None else per_size
    v = lr_verdict.verdict([300, 1000], LRS, per_size, reference_lr, ("none",), 601, 100)
    study = {"verdict": v, "updates": 601, "batch_size": 100,
             "heldout": {"num_heldout": 1000, "images": "the last 1000 images"}}
    return json.loads(json.dumps(study))  # as read back from results.json


def _t_interval(values):
    v = np.asarray(values, float)
    half = T975_DF2 * v.std(ddof=1) / np.sqrt(v.size)
    return v.mean() - half, v.mean() + half


def test_study_verdict_best_lr_cannot_train_and_comparisons_on_hand_built_results():
    v = _study()["verdict"]
    assert v["learning_rates"] == LRS and v["reference_lr"] == 0.01 and v["regularisers"] == ["none"]
    s300, s1000 = v["sizes"]
    assert (s300["train_size"], s1000["train_size"]) == (300, 1000)
    assert s300["epochs"] == pytest.approx(601 * 100 / 300)
    plain, bn = s300["combinations"]["plain"], s300["combinations"]["batchnorm"]
    # Best learning rate: the highest mean held-out accuracy among those the net trains at.
    assert (plain["best"]["lr"], bn["best"]["lr"]) == (0.1, 1.0)
    assert (plain["best"]["mean"], bn["best"]["mean"]) == pytest.approx((0.81, 0.83))
    assert plain["cannot_train"] == [1.0] and bn["cannot_train"] == []
    lr1 = plain["cells"][2]
    assert (lr1["diverged_seeds"], lr1["chance_seeds"], lr1["cannot_train"]) == (3, 0, True)
    # Each cell's interval is the 95 % t interval over seeds, clipped to [0, 1].
    low, high = _t_interval([.78, .80, .79])
    assert (plain["cells"][0]["heldout"]["low"], plain["cells"][0]["heldout"]["high"]) == pytest.approx((low, high),
                                                                                                      abs=1e-5)
    # 1000 images: one seed diverged and one at chance (finite, training accuracy 0.15 < 0.2): 2 of 3 fail.
    p1000 = s1000["combinations"]["plain"]
    assert (p1000["cells"][2]["diverged_seeds"], p1000["cells"][2]["chance_seeds"]) == (1, 1)
    assert p1000["cannot_train"] == [1.0] and p1000["best"]["lr"] == 0.1
    b1000 = s1000["combinations"]["batchnorm"]
    assert (b1000["cells"][0]["chance_seeds"], b1000["cells"][0]["cannot_train"]) == (1, False)  # 1 of 3: trains

    # BN and plain each at its own best (paired by seed: BN at 1 against plain at 0.1).
    best = s300["pairs"]["none"]["at_best"]
    assert (best["bn_lr"], best["plain_lr"]) == (1.0, 0.1)
    diff = np.array([.84, .82, .83]) - np.array([.80, .82, .81])
    assert best["change"] == pytest.approx(diff.mean())
    assert (best["change_low"], best["change_high"]) == pytest.approx(_t_interval(diff), abs=1e-5)
    assert (best["seeds_higher"], best["seeds_lower"], best["seeds"]) == (2, 0, 3)  # one tie
    # ... and at the book's 0.01, where BN is below in every seed.
    ref = s300["pairs"]["none"]["at_reference"]
    assert ref["lr"] == 0.01 and ref["change"] == pytest.approx(-0.18)
    assert (ref["seeds_higher"], ref["seeds_lower"]) == (0, 3)
    assert (ref["bn"]["mean"], ref["plain"]["mean"]) == pytest.approx((0.61, 0.79))
    assert not ref["plain_cannot_train"] and not ref["bn_cannot_train"]
    ref1000 = s1000["pairs"]["none"]["at_reference"]
    assert ref1000["change"] == pytest.approx(-0.04)
    assert s1000["pairs"]["none"]["at_best"]["change"] == pytest.approx(0.02)

    # The reference learning rate outside the grid: no comparison there.
    outside = lr_verdict.verdict([300], LRS, _study_values()[:1], 0.05)
    assert outside["sizes"][0]["pairs"]["none"]["at_reference"] is None


def test_study_best_lr_skips_where_it_cannot_train_and_takes_the_smaller_on_a_tie():
    # lr 1 has the highest mean but 2 of 3 seeds diverged there: not a learning rate it trains at.
    s = lr_verdict.summarise(LRS, _values([[1, 1, 1]] * 3, [[.7, .8, .9], [.7, .8, .9], [.7, .8, .9]],
                                          [[F, F, T], [F, F, T], [F, F, F]]))
    assert s["best"]["lr"] == 0.1 and s["cannot_train"] == [1.0]
    tie = lr_verdict.summarise(LRS, _values([[1, 1, 1]] * 3, [[.8, .8, .7]] * 3, [[F, F, F]] * 3))
    assert tie["best"]["lr"] == 0.01
    nothing = lr_verdict.summarise(LRS, _values([[.1, .1, .1]] * 3, [[.1, .1, .1]] * 3, [[F, F, T]] * 3))
    assert nothing["best"] is None and nothing["cannot_train"] == LRS
    per_size = _study_values()
    per_size[0]["plain"] = _values([[.1, .1, .1]] * 3, [[.1, .1, .1]] * 3, [[F, F, T]] * 3)
    study = _study(per_size)
    assert study["verdict"]["sizes"][0]["pairs"]["none"]["at_best"] is None
    assert lr_verdict.size_sentences(study)[0].startswith("300 images (200 epochs): plain trains at no learning rate "
                                                          "tried; at lr 0.01, BN 0.610 against plain 0.100")
    assert "so with 300 images there is no best learning rate to compare" in lr_verdict.answer(study)


ANSWER = (
    "At the book's learning rate 0.01, on held-out images, BN ends below plain at every size (0.610 against 0.790 "
    "with 300 images; 0.810 against 0.850 with 1,000 images), but each at its own best learning rate BN ends above "
    "plain at every size (0.830 at lr 1 against 0.810 at lr 0.1 with 300 images; 0.900 at lr 1 against 0.880 at lr "
    "0.1 with 1,000 images), while plain cannot train at lr 1 at every size: as Bjorck et al. 2018 (\"Understanding "
    "Batch Normalization\") argue, BN's generalisation benefit comes from the larger learning rates it makes stable."
)


def test_study_answer_is_one_sentence_with_its_numbers_and_follows_the_signs():
    assert lr_verdict.answer(_study()) == ANSWER
    # BN below plain at its best with 1,000 images: the anchor's account holds with 300 images only.
    per_size = _study_values()
    per_size[1]["batchnorm"]["heldout"][:, 1:] -= 0.05  # its best: 0.850 at lr 1, below plain's 0.880
    text = lr_verdict.answer(_study(per_size))
    assert ("each at its own best learning rate BN ends above plain with 300 images and below plain with 1,000 "
            "images (0.830 at lr 1 against 0.810 at lr 0.1 with 300 images; 0.850 at lr 1 against 0.880") in text
    assert text.endswith("here that holds with 300 images only.")
    # BN's best no higher than plain's anywhere; plain trains everywhere; no reference in the grid.
    per_size = _study_values()
    for size in per_size:
        size["plain"] = _values([[1, 1, 1]] * 3, [[.95, .95, .95]] * 3, [[F, F, F]] * 3)
    text = lr_verdict.answer(_study(per_size, reference_lr=0.05))
    assert text.startswith("Each at its own best learning rate BN ends below plain at every size (")
    assert "cannot train" not in text and "book's learning rate" not in text
    assert text.endswith("does not end above it at any size.")


def test_study_render_reads_every_cell_of_the_table():
    from presentation import markdown_tables

    study = _study()
    md = lr_verdict.render(study)
    (table,) = markdown_tables(md)
    assert table[0] == ["images", "net", "lr 0.01", "lr 0.1", "lr 1", "best lr (held-out)"]
    assert [row[:2] for row in table[1:]] == [["300", "plain"], ["300", "BN"], ["1,000", "plain"], ["1,000", "BN"]]
    per_size = _study_values()
    for row, (size, net) in zip(table[1:], [(0, "plain"), (0, "batchnorm"), (1, "plain"), (1, "batchnorm")]):
        held = per_size[size][net]["heldout"]
        for cell, values in zip(row[2:5], held.T):
            low, high = _t_interval(values)
            assert cell.startswith(f"{values.mean():.3f} [{max(low, 0):.3f}, {min(high, 1):.3f}]"), (row, cell)
    assert table[1][4].endswith("cannot train (3 of 3 seeds diverged)")
    assert table[3][4].endswith("cannot train (1 of 3 seeds diverged, 1 of 3 at chance)")
    assert table[4][2].endswith("(1 of 3 at chance)") and "cannot train" not in table[4][2]
    assert [row[5] for row in table[1:]] == ["0.1 (0.810)", "1 (0.830)", "0.1 (0.880)", "1 (0.900)"]
    assert "1000 held-out images: the last 1000 images" in md
    assert ("- 300 images (200 epochs): each at its best learning rate, BN 0.830 [" in md
            and "at lr 1 against plain 0.810 [" in md)
    assert "at lr 0.01, BN 0.610 against plain 0.790 (-18.0 points [-18.0, -18.0], higher in 0 of 3 seeds)" in md
    assert "plain cannot train at lr 1 (3 of 3 seeds diverged)" in md
    # The experiment's render puts the answer first, then the book's view, then the study.
    metrics, diverged = _hand_made()
    results = {"verdict": overfitting.verdict([0, 5, 10], metrics, diverged), "seeds": [0, 1], "epochs": [0, 5, 10],
               "axes": {"weight_decay": [0.0, 0.1]}, "data": {"name": "bundled", "num_train": 300, "num_heldout": 4700},
               "arms": {"plain+dropout": {"dropout_ratio": 0.2, "dropout_inverted": False}}, "lr_study": study}
    full = overfitting.render(json.loads(json.dumps(results)))
    assert full.startswith(f"**Answer.** {ANSWER}\n\n**The book's protocol.** 2 seed(s), 300 training images")
    assert full.index("| combination |") < full.index("| images | net |") and full.endswith(md)
    assert overfitting.render({**results, "lr_study": None}) == overfitting._render_book(results)


def test_study_figure_has_a_panel_per_size_and_a_line_per_net(monkeypatch):
    from experiments import plot
    from presentation import band_bounds, lines_of, skip_layout

    skip_layout(monkeypatch)
    per_size = _study_values()
    v = _study()["verdict"]
    fig = overfitting_figures.study_figure(LRS, [300, 1000], per_size, v, 3, 601)
    assert len(fig.axes) == 2
    for ax, n, values, epochs in zip(fig.axes, (300, 1000), per_size, ("200", "60")):
        assert ax.get_title() == f"{n:,} training images, {epochs} epochs" and ax.get_xscale() == "log"
        drawn = [line for line in lines_of(ax) if not line["label"].startswith("_")]
        assert [line["label"] for line in drawn] == [plot.arm_label("plain"), plot.arm_label("batchnorm")]
        for line, band, net in zip(drawn, ax.collections, ("plain", "batchnorm")):
            held = values[net]["heldout"]
            assert line["linestyle"] == plot.arm_style(net)["linestyle"]
            np.testing.assert_allclose(line["x"], LRS)
            np.testing.assert_allclose(line["y"], held.mean(0))
            np.testing.assert_allclose(band_bounds(band, LRS), (held.min(0), held.max(0)))
        # The best learning rate of each line starred, where plain cannot train crossed; the book's lr dotted.
        stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines if line.get_marker() == "*"]
        np.testing.assert_allclose(stars, [(0.1, values["plain"]["heldout"][:, 1].mean()),
                                           (1.0, values["batchnorm"]["heldout"][:, 2].mean())])
        crosses = [line for line in ax.lines if line.get_marker() == "x"]
        assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [1.0]
        assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [0.01]
        assert "plain cannot train at lr 1" in " ".join(t.get_text() for t in ax.texts)
    plot.pyplot().close(fig)


def test_study_heldout_set_is_the_same_for_every_size_and_never_trained_on():
    import io
    from importlib import resources

    from bnjax import data

    # The oracle: the bundled file and its split permutation, read here directly.
    with resources.files("bnjax").joinpath("assets", "mnist_5k.npz").open("rb") as f:
        with np.load(io.BytesIO(f.read())) as z:
            images, labels = z["images"], z["labels"]
    perm = np.random.RandomState(0).permutation(5000)
    expected = images[perm[4000:]].reshape(1000, -1).astype(np.float32) / 255.0

    held_sets = []
    for sizes in ((300, 1000, 4000), (50, 300)):
        pool = data.load_bundled(max(sizes), None, split_seed=0)
        views = overfitting_lr.size_datasets(pool, sizes, overfitting_lr.heldout_images(pool))
        for n, ds in zip(sizes, views):
            assert ds.x_train.shape == (n, 784) and ds.source["num_train"] == n
            np.testing.assert_array_equal(ds.x_train, images[perm[:n]].reshape(n, -1).astype(np.float32) / 255.0)
            np.testing.assert_array_equal(ds.x_heldout, expected)  # the same 1,000 for every size and every pool
            np.testing.assert_array_equal(ds.t_heldout, labels[perm[4000:]])
            np.testing.assert_array_equal(ds.t_train, labels[perm[:n]])  # the first n of the permutation
            assert ds.source["train_class_counts"] == np.bincount(labels[perm[:n]], minlength=10).tolist()
        held_sets.append(views[0].x_heldout)
    # Never trained on by any size: disjoint from the largest training set the bundled subset allows.
    trained = {row.tobytes() for row in data.load_bundled(4000, 0).x_train}
    assert not any(row.tobytes() in trained for row in held_sets[0])
    # The book's view trains on the study's 300 (the same images for --train-size 300).
    np.testing.assert_array_equal(data.load_bundled(300, None).x_train,
                                  images[perm[:300]].reshape(300, -1).astype(np.float32) / 255.0)
    # Full MNIST: every held-out image (the test set) is the study's.
    fake = data.Dataset(np.zeros((5, 784), np.float32), np.arange(5) % 10, np.ones((7, 784), np.float32),
                        np.arange(7) % 10, {"name": "mnist"})
    assert overfitting_lr.heldout_images(fake)[0].shape == (7, 784)


def test_study_grid_is_the_books_arms_on_a_learning_rate_axis(tmp_path):
    from bnjax import grid

    args = protocol.parse_args(overfitting.EXPERIMENT, ["--out", str(tmp_path)])
    book = overfitting.grid_config(args, 300)
    config = overfitting_lr.study_config(book, args)
    assert list(config.arms) == ["plain", "batchnorm"] and config.arms["plain"] == book.arms["plain"]
    assert config.axes == {"learning_rate": (0.01, 0.03, 0.1, 0.3, 1.0)} and config.num_seeds == 3
    for n in (300, 1000, 4000):  # the same updates at every size, recorded every 100
        assert list(grid.record_steps(config, n)) == [1, 101, 201, 301, 401, 501, 601]
    # Models that differ only in learning rate start from the same weights (one seed here).
    models = grid.init_models(config.replace(num_seeds=1))
    w = models["batchnorm"].params.affine[0].W  # [seeds, lrs, 784, 100]
    assert w.shape[:2] == (1, 5) and all(np.array_equal(w[0, 0], w[0, i]) for i in range(5))
    np.testing.assert_array_equal(w, models["plain"].params.affine[0].W)
    everything = overfitting_lr.study_config(book, protocol.parse_args(
        overfitting.EXPERIMENT, ["--study-regularisers", "all", "--lrs", "1,0.1", "--out", str(tmp_path)]))
    assert list(everything.arms) == list(book.arms)
    assert everything.axes == {"learning_rate": (0.1, 1.0), "weight_decay": (0.0, 0.1)}  # sorted learning rates
    # Its finals per combination: the weight-decay column and the dropout arm each combination names.
    metrics = {m: {arm: np.random.default_rng(i).random((2, 2, 2, 3)) for i, arm in enumerate(everything.arms)}
               for m in ("train_accuracy", "heldout_accuracy")}
    diverged = {arm: np.zeros((2, 2, 2), bool) for arm in everything.arms}
    finals = lr_verdict.final_values(metrics, diverged, overfitting_lr.REGULARISER_SETS["all"])
    assert list(finals) == NAMES
    np.testing.assert_array_equal(finals["batchnorm+dropout+weight_decay"]["heldout"],
                                  metrics["heldout_accuracy"]["batchnorm+dropout"][:, :, 1, -1])
    np.testing.assert_array_equal(finals["plain+weight_decay"]["train"],
                                  metrics["train_accuracy"]["plain"][:, :, 1, -1])


@pytest.mark.slow
def test_quick_run_records_the_study_and_trains_on_the_books_images(quick_run):
    """The quick run's study (100 images, lr 0.01 and 1, 7 updates recorded every 3, 2 seeds; one size, one compile
    fewer: the sizes' loop is checked on hand-built results above): its results, its figure, and its run at lr 0.01
    trains exactly as the book's view's plain net without weight decay (same 100 images, same initial weights and
    batches: the losses agree to rounding)."""
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    study = res["lr_study"]
    assert study["train_sizes"] == [100] and study["learning_rates"] == [0.01, 1.0] and study["updates"] == 7
    assert study["record_steps"] == [1, 4, 7] and study["seeds"] == [0, 1] and study["regularisers"] == ["none"]
    assert study["heldout"]["name"] == "bundled" and study["heldout"]["num_heldout"] == 1000
    assert list(study["arms"]) == ["plain", "batchnorm"] and study["axes"] == {"learning_rate": [0.01, 1.0]}
    assert len(study["runs"]) == 1
    for run, n in zip(study["runs"], (100,)):
        assert run["train_size"] == n and run["data"]["num_train"] == n and run["data"]["num_heldout"] == 1000
        for metric in ("train_accuracy", "heldout_accuracy", "train_loss", "heldout_loss"):
            for arm in ("plain", "batchnorm"):
                assert np.array(run["metrics"][metric][arm], float).shape == (2, 2, 3), (metric, arm)
        assert np.array(run["diverged"]["plain"]).shape == (2, 2)
    assert [s["train_size"] for s in study["verdict"]["sizes"]] == [100]
    assert len(res["timing"]["study"]["runs"]) == 1
    assert any("Study:" in note for note in res["notes"])
    md = overfitting.render(res)
    assert md.startswith("**Answer.** ") and lr_verdict.ANCHOR in md and md.strip() in proc.stdout
    assert (out / "overfitting_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "chunks").exists()  # every engine run's chunk files removed once results.json is written
    book = np.array(res["train_loss"]["plain"], float)[:, 0]  # [seeds, records], weight decay 0
    mine = np.array(study["runs"][0]["metrics"]["train_loss"]["plain"], float)[:, 0]  # lr 0.01
    np.testing.assert_allclose(mine, book, rtol=1e-4)
    # The held-out images differ (4,900 against the last 1,000 of them), so only the training side is equal.
    assert res["data"]["num_heldout"] == 4900
