"""experiments.init: the verdict on hand-made records, and the CLI end to end (seed 0 is the book's sweep)."""

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
