"""``python -m experiments.benchmark`` on the shared harness: every bad option exits 2 in one line before any work,
an interrupt ends in one line and status 130, the scaling children write only where the parent says, the final
write fails in one line; the Flax variant (d) against the NumPy oracle; the NumPy variant's subprocess; the shape
parser; and that no experiment reaches into tests/."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import benchmark, benchmark_layers, benchmark_scaling, benchmark_variants
from experiments.numpy_book import Net, run_sweep
from helpers import ROOT, cli_env, run_cli


def test_layer_shapes_parse_and_reject():
    assert benchmark_layers.parse_shapes("128x32x32x64, 1024X512") == ((128, 32, 32, 64), (1024, 512))
    # a batch of one row has no batch variance; 2^28 + 1 elements exceed the cap
    for bad in ("", "128", "128x0", "axb", "128x-4", "1x4", "1x8x8x4", f"{2**14}x{2**14 + 1}"):
        with pytest.raises(argparse.ArgumentTypeError):
            benchmark_layers.parse_shapes(bad)
    assert benchmark_layers.parse_shapes(f"2x{2**27}") == ((2, 2**27),)
    args = benchmark._parser().parse_args(["--layer-shapes", "8x4"])
    assert args.layer_shapes == ((8, 4),)


# Each finding of issue 15 (item 5), and the combinations that used to be ignored: (arguments, option named).
BAD = [
    (["--repeats", "0"], "--repeats"),  # crashed after the whole benchmark ran
    (["--repeats", "x"], "--repeats"),
    (["--layer-repeats", "-1"], "--layer-repeats"),  # crashed after the training variants
    (["--layer-repeats", "0"], "--layer-repeats"),  # silently ran 20 rounds
    (["--scaling", "abc"], "--scaling"),  # crashed after the variants
    (["--scaling", "0"], "--scaling"),  # the child ran the whole benchmark into runs/benchmark.json
    (["--scaling", "48"], "--scaling"),
    (["--scaling", "32,32"], "--scaling"),
    (["--scaling", ","], "--scaling"),
    (["--scaling", str(benchmark_scaling.MAX_MODELS + 32)], "--scaling"),
    (["--skip", "x"], "--skip"),  # an unknown letter was ignored
    (["--skip", "c,e"], "--skip"),
    (["--skip", ""], "--skip"),
    (["--out", ""], "--out"),  # an empty --out crashed at the end
    (["--out", "sub/"], "--out"),
    (["--layers-only", "--scaling", "none"], "--scaling"),
    (["--layers-only", "--skip", "c"], "--skip"),
    (["--layers-only", "--repeats", "2"], "--repeats"),
    (["--skip", "l", "--layer-shapes", "8x4"], "--layer-shapes"),
    (["--skip", "l", "--layer-repeats", "3"], "--layer-repeats"),
    (["--skip", "a,b,c,d,l", "--scaling", "none"], "--skip"),
    (["--layer-shapes", "1x4"], "--layer-shapes"),
    (["--scaling-one", "32"], "--scaling-one"),  # the internal option whose 0 ran the whole benchmark is gone
]


def _refuse_work(monkeypatch):
    # The first step after the checks: any bad option must end before it.
    def work(*args, **kwargs):
        raise AssertionError("the benchmark started working before refusing a bad option")

    monkeypatch.setattr(benchmark.runtime, "set_xla_flags", work)


def _one_error_line(err: str, option: str) -> None:
    assert "Traceback" not in err and option in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and option in errors[0], err


@pytest.mark.parametrize("bad,option", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_option_exits_2_in_one_line_before_any_work(bad, option, tmp_path, monkeypatch, capsys):
    _refuse_work(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a run that wrongly starts writes runs/ here, where the last assertion sees it
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--out", str(tmp_path / "never" / "b.json"), *bad])  # a later --out in ``bad`` wins
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, option)
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_folder_or_cannot_be_written_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    _refuse_work(monkeypatch)
    cases = [tmp_path, "/proc/bnjax-benchmark.json", tmp_path / "file" / "b.json"]  # /proc: read-only, even to root
    (tmp_path / "file").write_text("a file, not a folder")
    if os.geteuid() != 0:  # root writes into a 0o555 folder anyway
        (tmp_path / "ro").mkdir(mode=0o555)
        cases.append(tmp_path / "ro" / "b.json")
    for out in cases:
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(["--out", str(out)])
        assert exit_info.value.code == 2, out
        err = capsys.readouterr().err
        _one_error_line(err, "--out")
        assert str(Path(out).parent if out != tmp_path else out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["file", *(["ro"] if os.geteuid() != 0 else [])])


def test_bad_option_in_a_fresh_process_is_one_line_and_fast(tmp_path):
    t0 = time.perf_counter()
    proc = run_cli("experiments.benchmark", "--scaling", "0", "--out", tmp_path / "b.json", timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and proc.stdout == ""
    _one_error_line(proc.stderr, "--scaling")
    assert elapsed < 20  # ~0.5 s: no JAX import, no benchmark
    assert list(tmp_path.iterdir()) == []


def test_defaults_and_explicit_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = benchmark.parse_args([])
    assert (args.repeats, args.layer_repeats, args.layer_shapes) == (3, 20, benchmark_layers.LAYER_SHAPES)
    assert args.out == Path("runs/benchmark.json") and args.scaling is None and args.skip == frozenset()
    quick = benchmark.parse_args(["--quick"])
    assert (quick.repeats, quick.layer_repeats, quick.layer_shapes) == (1, 5, benchmark_layers.QUICK_LAYER_SHAPES)
    # explicit values win over --quick's (--quick used to force one run of (a))
    explicit = benchmark.parse_args(["--quick", "--repeats", "2", "--layer-repeats", "7", "--skip", "C, d",
                                     "--scaling", "64,32", "--out", "x.json"])
    assert (explicit.repeats, explicit.layer_repeats, explicit.skip) == (2, 7, frozenset("cd"))
    assert explicit.scaling == (64, 32) and explicit.out == Path("x.json")
    assert benchmark.parse_args(["--scaling", "None"]).scaling == ()
    assert benchmark.parse_args(["--layers-only"]).out == Path("runs/benchmark_layers.json")


def test_run_variants_skips_the_letters_given_and_reports_a_variant_that_cannot_run(monkeypatch, capsys):
    called = []

    def fake(letter):
        def run(*args):
            called.append(letter)
            if letter == "d":
                raise benchmark_variants.VariantSkipped("flax is not installed")
            return {"run_s": 1.0}
        return run

    for name, letter in (("bench_sweep", "a"), ("bench_python_loop", "b"), ("bench_numpy", "c"),
                         ("bench_flax", "d")):
        monkeypatch.setattr(benchmark_variants, name, fake(letter))
    rows = benchmark.run_variants(frozenset("a"), None, np.zeros((10, 4)), None, 1)
    assert called == ["b", "c", "c", "d"]
    assert [r["name"][:3] for r in rows] == ["(b)", "(c)", "(c)"]
    out = capsys.readouterr().out
    assert "skipped (flax is not installed)" in out and "(a)" not in out


def test_variants_table_without_a_prints_a_dash_for_the_ratio(capsys):
    # --skip a left every ratio None, and the table crashed formatting it.
    rows = [{"name": "(b) loop", "compile_s": 1.0, "run_s": 2.0, "ratio_to_a": None, "gflops_per_s": 5.0,
             "percent_of_peak": 10.0},
            {"name": "(c) numpy", "compile_s": 0.0, "run_s": 4.0, "ratio_to_a": 1.5, "gflops_per_s": 2.5,
             "percent_of_peak": 5.0}]
    benchmark.print_variants(rows, {"train": 3e9, "eval": 2e9, "total": 5e9}, {"gflops": 50.0, "n": 8})
    lines = capsys.readouterr().out.splitlines()
    b = next(line for line in lines if line.startswith("(b) loop")).split()
    c = next(line for line in lines if line.startswith("(c) numpy")).split()
    assert b[2:] == ["1.00", "2.00", "-", "5.0", "10%"] and c[2:] == ["0.00", "4.00", "1.50", "2.5", "5%"]
    assert "FLOPs = 3 G train + 2 G eval; peak = 50 GFLOP/s" in "\n".join(lines)


def test_scaling_children_write_only_where_the_parent_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_run(cmd, **kwargs):
        # what the child gets: every setting on its command line, and a file to write its row to
        assert cmd[:3] == [sys.executable, "-m", "experiments.benchmark_scaling"] and cmd[3] == "--models"
        assert cmd[5] == "--out" and len(cmd) == 7
        n, out = int(cmd[4]), Path(cmd[6])
        assert out.is_absolute() and out.parent.is_dir() and tmp_path not in out.parents
        seen.append(out)
        if n == 96:
            return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nerror: out of memory")
        out.write_text(json.dumps({"models": n, "run_s": n / 32 * (1.0 if n == 64 else 1.5), "chunks": 1,
                                   "model_updates_per_s": 1.0, "gflops_per_s": 2.0, "peak_rss_gb": 0.5}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(benchmark_scaling.subprocess, "run", fake_run)
    rows = benchmark_scaling.run_scaling([64, 96, 32])
    assert [r["models"] for r in rows] == [64, 32]  # the failed point is left out
    # the first row is the reference: 32 models cost 1.5x per model what 64 did
    assert [r["per_model_cost_vs_first"] for r in rows] == [1.0, 1.5]
    assert "failed: error: out of memory" in capsys.readouterr().out
    assert len({p.parent for p in seen}) == 1 and not seen[0].parent.exists()  # one temporary folder, removed
    assert list(tmp_path.iterdir()) == []  # nothing in runs/ or anywhere else
    for row in rows:
        row["percent_of_peak"] = 10.0
    benchmark_scaling.print_scaling(rows)
    assert "cost/model vs 64" in capsys.readouterr().out  # the header names the reference, not always 32


@pytest.mark.parametrize("bad,option", [(["--models", "0"], "--models"), (["--models", "48"], "--models"),
                                        (["--models", "32"], "--out"), (["--models", "32", "--out", ""], "--out")])
def test_scaling_child_refuses_bad_options_before_any_work(bad, option, monkeypatch, capsys):
    monkeypatch.setattr(benchmark_scaling, "scaling_point", lambda n: pytest.fail("worked despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark_scaling.main(bad)
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, option)


def test_scaling_child_refuses_a_folder_as_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark_scaling, "scaling_point", lambda n: pytest.fail("worked despite a bad option"))
    with pytest.raises(SystemExit) as exit_info:
        benchmark_scaling.main(["--models", "32", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, "--out")


def _fake_layers(monkeypatch):
    monkeypatch.setattr(benchmark_layers, "bench_layers", lambda shapes, repeats: {"shapes": [list(s) for s in shapes],
                                                                                   "repeats": repeats})
    monkeypatch.setattr(benchmark_layers, "print_layers", lambda res: print("layer table"))


def test_results_are_written_atomically_and_a_failed_write_is_one_line(tmp_path, monkeypatch, capsys):
    _fake_layers(monkeypatch)
    out = tmp_path / "new" / "b.json"  # its folder is created when the results are written
    assert benchmark.main(["--layers-only", "--layer-shapes", "8x4", "--layer-repeats", "3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["layers"] == {"shapes": [[8, 4]], "repeats": 3} and res["quick"] is False
    assert f"wrote {out}" in capsys.readouterr().out
    before = out.read_bytes()

    def full(path, obj):
        raise OSError(28, "No space left on device")

    from experiments import results

    monkeypatch.setattr(results, "write_json", full)
    assert benchmark.main(["--layers-only", "--out", str(out), "--overwrite"]) == 1
    captured = capsys.readouterr()
    _one_error_line(captured.err, str(out))
    assert "No space left on device" in captured.err and "wrote" not in captured.out
    assert out.read_bytes() == before and [p.name for p in out.parent.iterdir()] == ["b.json"]


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_and_status_130(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.benchmark", "--layers-only", "--quick",
                             "--layer-shapes", "64x16", "--layer-repeats", str(benchmark.MAX_LAYER_REPEATS),
                             "--out", str(out)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and not line.startswith("layers:"):  # the first progress line
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert line.startswith("layers: 64x16"), err[-2000:]
    assert proc.returncode == 130, err[-2000:]
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0], err[-2000:]
    assert list(tmp_path.iterdir()) == []  # no results, no temporary file


def _flax_params(state):
    """A Flax MLP's kernels, biases, BN scales and offsets, BN running means and variances, layer by layer."""
    params, stats, _ = state
    dense = [params[f"Dense_{i}"] for i in range(sum(k.startswith("Dense") for k in params))]
    bns = [params[f"BatchNorm_{i}"] for i in range(sum(k.startswith("BatchNorm") for k in params))]
    runs = [stats[f"BatchNorm_{i}"] for i in range(len(bns))]
    return ([np.asarray(d["kernel"], np.float64) for d in dense], [np.asarray(d["bias"], np.float64) for d in dense],
            [np.asarray(b["scale"]) for b in bns], [np.asarray(b["bias"]) for b in bns],
            [np.asarray(r["mean"]) for r in runs], [np.asarray(r["var"]) for r in runs])


def _oracle_net(flax_state, use_bn):
    """experiments/numpy_book.py's network on a Flax state's weights, its running variance started at Flax's 1."""
    from bnjax.layers import CONVENTIONS

    net = Net(_flax_params(flax_state)[0], use_bn, momentum=CONVENTIONS["momentum"], eps=CONVENTIONS["eps"])
    for bn in net.bns:
        bn.running_var = np.ones_like(bn.running_var)
    return net


TINY = dict(hidden_sizes=(6, 5), num_classes=3, learning_rate=0.3, batch_size=8)


def _tiny_data(n=24):
    """``n`` images of 7 features with a non-zero mean (BN centres it), labelled by a linear rule (learnable, so
    the accuracy depends on the initial weights and the training)."""
    rng = np.random.RandomState(0)
    x = rng.randn(n, 7).astype(np.float32)
    return x + 2.0, np.argmax(x @ rng.randn(7, 3), axis=1)


# ~2.5 s each (Flax's init compiles a threefry per layer): the BN net in the quick tier, the plain one in slow.
@pytest.mark.parametrize("use_bn", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["bn", "plain"])
def test_flax_variant_trains_the_books_network_as_the_numpy_oracle(use_bn):
    """(d), the one variant no test ran: its init, SGD steps (training-mode BN and its running update) and accuracy
    (evaluation mode) against experiments/numpy_book.py from the same initial weights, on the same batches."""
    pytest.importorskip("flax")
    from bnjax import grid

    config = grid.GridConfig(axes={"weight_scale": (0.01,)}, **TINY)
    x, t = _tiny_data()
    xd, td = jnp.asarray(x), jnp.asarray(t)
    rng = np.random.RandomState(1)
    init, step, acc = (jax.jit(f) for f in benchmark_variants.flax_functions(config, use_bn, xd, td))
    key = jax.random.key(5)
    unit, state = _flax_params(init(key, jnp.float32(1.0))), init(key, jnp.float32(0.01))
    Ws, bs, gammas, betas, means, vars_ = _flax_params(state)
    for w, w1 in zip(Ws, unit[0]):
        np.testing.assert_allclose(w, 0.01 * w1, rtol=1e-6)  # the scale multiplies every kernel
        assert 0.6 < w1.std() < 1.4  # unscaled: N(0, 1), the book's weights before their scale
    assert all((b == 0).all() for b in bs) and len(gammas) == (2 if use_bn else 0)
    assert all((g == 1).all() for g in gammas) and all((b == 0).all() for b in betas)
    assert all((m == 0).all() for m in means) and all((v == 1).all() for v in vars_)  # Flax's start

    net = _oracle_net(state, use_bn)
    for _ in range(4):
        idx = rng.choice(24, 8)
        state = step(state, xd[idx], td[idx])
        net.sgd_step(x[idx].astype(np.float64), t[idx], config.learning_rate)
    Ws, bs, gammas, betas, means, vars_ = _flax_params(state)
    for i, aff in enumerate(net.affines):
        np.testing.assert_allclose(Ws[i], aff.W, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bs[i], aff.b, rtol=1e-4, atol=1e-5)
    for i, bn in enumerate(net.bns):
        np.testing.assert_allclose(gammas[i], bn.gamma, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(betas[i], bn.beta, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(means[i], bn.running_mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(vars_[i], bn.running_var, rtol=1e-4, atol=1e-5)
    # evaluation mode, with the running statistics (float32 against float64: one image may flip)
    assert abs(float(acc(state)) - net.accuracy(x.astype(np.float64), t)) <= 1 / 24 + 1e-9


@pytest.mark.slow
def test_flax_variant_row_is_the_oracle_trained_on_the_sweeps_keys_and_batches():
    """``bench_flax`` end to end: each model starts from its own init key (arm, scale) and trains on the sweep's
    batches; its final accuracy is the NumPy oracle's from the same weights on the same batches."""
    pytest.importorskip("flax")
    from bnjax import grid

    config = grid.GridConfig(axes={"weight_scale": (1.0, 0.3)}, num_records=2, **TINY)
    x, t = _tiny_data(40)
    row = benchmark_variants.bench_flax(config, x, t)
    assert row["compile_s"] > 0 and row["run_s"] > 0 and "running variance starts at 1" in row["note"]
    init_keys, batches = benchmark_variants.book_keys_and_batches(config, 40)
    assert batches.shape == (grid.num_updates(config, 40), 8)
    for v, (arm, use_bn) in enumerate((("final_batchnorm", True), ("final_plain", False))):
        init = jax.jit(benchmark_variants.flax_functions(config, use_bn, jnp.asarray(x), jnp.asarray(t))[0])
        expected = []
        for i, scale in enumerate(config.axes["weight_scale"]):
            net = _oracle_net(init(init_keys[v, i], jnp.float32(scale)), use_bn)
            for idx in batches:
                net.sgd_step(x[idx].astype(np.float64), t[idx], config.learning_rate)
            expected.append(net.accuracy(x.astype(np.float64), t))
        np.testing.assert_allclose(row[arm], expected, atol=1 / 40 + 1e-9)


def test_numpy_variant_subprocess_is_the_oracle_on_the_bundled_subset():
    # The benchmark's (c) runs the oracle as a module in a fresh process; its row must be the in-process sweep.
    from bnjax import grid

    config = grid.GridConfig(axes={"weight_scale": (1.0, 1e-4)}, num_records=2)
    row = benchmark_variants.bench_numpy(config, 300, 1)
    assert row["run_s"] > 0 and row["compile_s"] == 0.0
    with np.load(ROOT / "bnjax" / "assets" / "mnist_5k.npz") as z:
        images, labels = z["images"], z["labels"]
    perm = np.random.RandomState(0).permutation(len(labels))[:300]
    acc = run_sweep(images[perm].reshape(300, -1) / 255.0, labels[perm].astype(np.int64), np.logspace(0, -4, 2),
                    num_records=2)
    assert row["final_batchnorm"] == acc["batchnorm"][:, -1].tolist()
    assert row["final_plain"] == acc["plain"][:, -1].tolist()
    assert all(0.0 <= a <= 1.0 for a in row["final_batchnorm"] + row["final_plain"])


def test_numpy_variant_that_fails_is_skipped_in_one_line(monkeypatch):
    from bnjax import grid

    def failed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback (most recent call last):\nMemoryError: boom")

    monkeypatch.setattr(benchmark_variants.subprocess, "run", failed)
    with pytest.raises(benchmark_variants.VariantSkipped, match="numpy_book failed: MemoryError: boom"):
        benchmark_variants.bench_numpy(grid.GridConfig(), 1000, None)


def test_no_experiment_reaches_into_tests():
    # A path into tests/ built or quoted in code, an import from it, or a sys.path trick (prose may name tests/).
    pattern = re.compile(r"""["']tests["'/]|^\s*(from|import) tests\b|sys\.path""")
    offenders = [f"{p.name}:{i}" for p in sorted((ROOT / "experiments").glob("*.py"))
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if pattern.search(line) and not line.lstrip().startswith("#")]
    assert offenders == []


def test_an_existing_out_is_refused_unless_overwrite_and_a_concurrent_write_keeps_both(tmp_path, monkeypatch,
                                                                                      capsys):
    _fake_layers(monkeypatch)
    out = tmp_path / "b.json"
    out.write_text('{"earlier": true}')
    _refuse_work(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--layers-only", "--layer-shapes", "8x4", "--out", str(out)])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--overwrite")
    assert out.read_text() == '{"earlier": true}'
    monkeypatch.undo()
    _fake_layers(monkeypatch)
    assert benchmark.main(["--layers-only", "--layer-shapes", "8x4", "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["layers"]["shapes"] == [[8, 4]]
    # Another run writes --out while this one works: neither result is lost.
    late = tmp_path / "late.json"

    def other_run_meanwhile(shapes, repeats):
        late.write_text('{"other": true}')
        return {"shapes": [list(s) for s in shapes], "repeats": repeats}

    monkeypatch.setattr(benchmark_layers, "bench_layers", other_run_meanwhile)
    assert benchmark.main(["--layers-only", "--layer-shapes", "8x4", "--out", str(late)]) == 1
    err = capsys.readouterr().err
    kept = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("late.") and p != late)
    assert late.read_text() == '{"other": true}' and len(kept) == 1 and kept[0] in err
    assert json.loads((tmp_path / kept[0]).read_text())["layers"]["shapes"] == [[8, 4]]
