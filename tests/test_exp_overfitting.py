"""experiments.overfitting: the verdict on hand-made curves, the CLI end to end, its option checks, and the
protocol (record steps, shared initial weights, the book's dropout, held-out images never trained on)."""

import json

import numpy as np
import pytest

from experiments import overfitting, protocol
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
    table = [line for line in md.splitlines() if line.startswith("|")]
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
    fig = overfitting.figure([0, 5, 10], metrics, 2, 0.3, 0.35)
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
