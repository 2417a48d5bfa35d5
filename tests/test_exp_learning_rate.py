"""experiments.learning_rate: the verdict on hand-made records, the arms' pairing, and the CLI end to end."""


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
