"""The command-line experiments end to end (tiny configurations): the registry (every experiment's --help; the
sweep's quick run and rendering here, each other experiment's in its own test module; the README's table),
devices, processes, seeds, files, errors."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import cli, protocol, registry, results, sweep
from helpers import ROOT, cli_env, read_results, run_cli

# The sweep's quick configuration (5 scales, 2 epochs, 2 seeds, 300 training and 100 held-out images): the
# registry's quick run on 2 CPU devices is also the single-chunk, single-process run the tests below compare with.
TINY = [*registry.experiment("sweep").quick, "--data", "bundled", "--no-plot"]  # the session's compile cache


_results = read_results

# --------------------------------------------------------------------------------------------------
# The registry: every experiment, its --help, its quick run and rendering, the README's table
# --------------------------------------------------------------------------------------------------

# What each experiment's results call their verdict: the sweep keeps the book's "summary" (its results must stay
# field for field what they were).
VERDICT_FIELD = {"sweep": "summary"}

_HELP_ALL = """
import contextlib, io, json, sys
from experiments import registry
out = {}
for name in registry.NAMES:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        try:
            registry.experiment(name)
            __import__("experiments." + name, fromlist=["main"]).main(["--help"])
            code = None
        except SystemExit as exit:
            code = exit.code
    out[name] = {"code": code, "help": text.getvalue()}
print(json.dumps({"jax_imported": "jax" in sys.modules, "runs": out}))
"""


@pytest.fixture(scope="module")
def every_help():
    """Every registered experiment's --help, in one fresh process (which must not import JAX for it)."""
    proc = subprocess.run([sys.executable, "-c", _HELP_ALL], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_registered_experiment_explains_itself_without_jax(every_help, name):
    assert not every_help["jax_imported"]  # --help stays instant
    run = every_help["runs"][name]
    experiment = registry.experiment(name)
    assert run["code"] == 0 and experiment.name == name
    text = run["help"]
    assert text.startswith(f"usage: python -m experiments.{name}") and "Exit status" in text
    for flag in ("--seed", "--num-seeds", "--split-seed", "--data", "--train-size", "--out", "--overwrite", "--resume",
                 "--quiet", "--no-plot", "--cpu-devices", "--max-models-per-chunk", "--coordinator"):
        assert flag in text, (name, flag)
    assert experiment.doc.split("\n\n")[0].split("\n")[0] in text  # the module docstring describes it


def test_registry_lists_each_experiment_once_and_the_report_reads_it():
    from experiments import report

    assert len(set(registry.NAMES)) == len(registry.NAMES)
    assert report.build_parser().get_default("only") == registry.REPORTED
    for name in registry.NAMES:
        experiment = registry.experiment(name)
        assert experiment.question.endswith(("?", ".")) and experiment.title and experiment.quick
        assert len(set(experiment.figure_files)) == len(experiment.figure_files)
    with pytest.raises(KeyError):
        registry.experiment("harness")


def test_registry_writes_the_readme_table_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- experiments:begin -->\n| old |\n<!-- experiments:end -->\nrest\n")
    assert registry.write_readme_table(readme) is True
    assert readme.read_text() == ("intro\n<!-- experiments:begin -->\n" + registry.readme_table()
                                  + "<!-- experiments:end -->\nrest\n")
    assert registry.write_readme_table(readme) is False  # idempotent
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        registry.write_readme_table(readme)


def test_registry_command_rewrites_a_stale_table_and_fails_in_one_line(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- experiments:begin -->\nstale\n<!-- experiments:end -->\nrest\n")
    assert registry.main([], readme) == 0
    assert readme.read_text() == ("intro\n<!-- experiments:begin -->\n" + registry.readme_table()
                                  + "<!-- experiments:end -->\nrest\n")
    assert registry.main([], readme) == 0 and "already up to date" in capsys.readouterr().out
    for bad, message in ((["--help"], "usage:"), ([], "has no")):
        if message == "has no":
            readme.write_text("no markers\n")
        assert registry.main(bad, readme) == 1
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert registry.main([], tmp_path / "missing.md") == 1
    err = capsys.readouterr().err
    assert "cannot rewrite" in err and len(err.strip().splitlines()) == 1


def test_readme_table_lists_exactly_the_registry():
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- experiments:begin -->\n", 1)[1].split("<!-- experiments:end -->", 1)[0]
    assert table == registry.readme_table(), "run `python -m experiments.registry` to refresh README.md's table"
    names = [line.split("`")[1] for line in table.splitlines()[2:]]
    assert names == [*registry.NAMES, *(name for name, _, _ in registry.OTHER_COMMANDS)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The sweep's TINY configuration from its command line, run once per option set and shared by every test
    that reads it: ``tiny_run(*extra)`` -> (completed process, output folder)."""
    runs = {}

    def run(*extra: str):
        if extra not in runs:
            out = tmp_path_factory.mktemp("tiny") / "run"
            runs[extra] = (run_cli("experiments.sweep", *TINY, *extra, "--out", out), out)
        return runs[extra]

    return run


@pytest.mark.slow
def test_every_registered_experiment_records_a_verdict_and_prints_its_rendering(tiny_run):
    """The sweep's quick configuration from its command line (each other experiment's quick run is its test
    module's CLI test: ``test_every_registered_experiment_has_a_cli_test_of_its_quick_configuration``)."""
    proc, out = tiny_run("--cpu-devices", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    assert res[VERDICT_FIELD["sweep"]]
    rendered = registry.experiment("sweep").render(res)
    assert rendered.strip() and rendered.strip() in proc.stdout  # the console shows what the report quotes
    assert f"wrote results.json to {out}" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # --no-plot


@pytest.mark.parametrize("name", [n for n in registry.NAMES if n != "sweep"])
def test_every_registered_experiment_has_a_cli_test_of_its_quick_configuration(name):
    # Each runs ``python -m experiments.<name>`` at the registry's quick options once (helpers.run_quick), and
    # checks the verdict, the console's rendering and the files there (helpers.assert_quick_run).
    text = (ROOT / "tests" / f"test_exp_{name}.py").read_text()
    assert f'run_quick("{name}", ' in text and f'assert_quick_run("{name}", *quick_run)' in text
    helpers_text = (ROOT / "tests" / "helpers.py").read_text()
    assert ".quick" in helpers_text and "rendered.strip() in proc.stdout" in helpers_text


def test_help_explains_itself():
    proc = run_cli("experiments.sweep", "--help")
    assert proc.returncode == 0
    for flag in ("--scales", "--num-scales", "--epochs", "--optimizer", "--num-seeds", "--split-seed", "--data",
                 "--heldout", "--out", "--dtype", "--no-plot", "--quiet", "--coordinator", "--num-processes",
                 "--process-id", "--max-models-per-chunk"):
        assert flag in proc.stdout
    assert "same mini-batches" in proc.stdout and "Exit status" in proc.stdout


@pytest.mark.slow
def test_tiny_sweep_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = sweep.main(["--num-scales", "2", "--epochs", "2", "--num-seeds", "2", "--heldout", "--heldout-size", "50",
                       "--data", "bundled", "--out", str(out), "--quiet", "--no-cache"])
    assert code == 0
    res = _results(out)
    png = out / "sweep.png"
    assert png.stat().st_size > 10_000
    assert res["weight_scales"] == [1.0, 1e-4]
    for metric in ("train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss"):
        for arm in ("batchnorm", "plain"):
            assert np.array(res[metric][arm], dtype=float).shape == (2, 2, 2), (metric, arm)
    assert np.array(res["diverged"]["plain"]).shape == (2, 2)
    assert res["diverged"]["plain"][0][0] is True  # w = 1.0 overflows, as in the book ...
    assert res["train_loss"]["plain"][0][0][-1] is None  # ... and its loss is null, not NaN (strict JSON)
    assert res["record_steps"] == [1, 11]
    assert res["arms"]["batchnorm"]["norm"] is True and res["arms"]["plain"]["norm"] is None
    assert res["axes"] == {"weight_scale": [1.0, 1e-4]} and res["seeds"] == [0, 1]
    assert set(res["data"]) >= {"name", "train_sha256", "num_train"} and res["data"]["num_train"] == 1000
    assert set(res["timing"]) >= {"compile_s", "run_s", "total_s"}
    assert set(res["environment"]) >= {"jax", "backend", "device_count", "device_kind", "devices_used", "processes"}
    for key in ("epochs", "lr", "optimizer", "seed", "num_seeds", "split_seed", "data", "dtype", "batch_size",
                "train_size"):
        assert key in res["config"]
    assert res["summary"]["bn_wins"] == res["summary"]["wins"]["batchnorm"]
    assert res["grid"]["matmul_precision"] == "highest" and res["grid"]["num_records"] == 2
    assert res["grid"]["learning_rate"] == 0.01 and res["grid"]["batch_size"] == 100
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # Files get the umask's permissions (mkstemp alone makes them 0600).
    mask = os.umask(0o022)
    os.umask(mask)
    for path in (png, out / "results.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


@pytest.mark.slow
def test_seed_i_of_a_run_equals_a_run_at_seed_plus_i_with_the_same_split(tmp_path):
    base = ["--scales", "0.1,0.02", "--epochs", "2", "--data", "bundled", "--no-plot", "--quiet", "--no-cache",
            "--heldout-size", "200"]
    assert sweep.main(base + ["--num-seeds", "3", "--out", str(tmp_path / "three")]) == 0
    assert sweep.main(base + ["--seed", "2", "--out", str(tmp_path / "two")]) == 0
    assert sweep.main(base + ["--seed", "2", "--out", str(tmp_path / "again")]) == 0
    three, two, again = _results(tmp_path / "three"), _results(tmp_path / "two"), _results(tmp_path / "again")
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["results.json"]  # --no-plot: no figure
    assert three["data"] == two["data"]  # the training seed never changes the split
    assert three["seeds"] == [0, 1, 2] and two["seeds"] == [2]
    for metric in ("train_accuracy", "heldout_accuracy", "train_loss"):
        for arm in ("batchnorm", "plain"):
            assert two[metric][arm] == again[metric][arm]  # same seed, same numbers
            np.testing.assert_array_equal(np.array(three[metric][arm][2], float), np.array(two[metric][arm][0], float))
    assert two["train_accuracy"] != _results(tmp_path / "three")["train_accuracy"]
    # The split is its own option.
    assert sweep.main(base + ["--split-seed", "3", "--out", str(tmp_path / "split")]) == 0
    split = _results(tmp_path / "split")
    assert split["data"]["split_seed"] == 3 and split["data"]["train_sha256"] != two["data"]["train_sha256"]


def _compare(a: dict, b: dict, tol: float = 1e-4, accuracy_tol: float | None = None):
    """Equal within ``tol``; accuracies within ``accuracy_tol`` (other device counts round differently, and a
    model at a near-tie may then classify one image differently)."""
    for metric in ("train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss"):
        for arm in ("batchnorm", "plain"):
            x, y = np.array(a[metric][arm], float), np.array(b[metric][arm], float)
            assert x.shape == y.shape == (2, 5, 2)  # no padded model appears
            limit = accuracy_tol if (accuracy_tol is not None and "accuracy" in metric) else tol
            np.testing.assert_allclose(x, y, atol=limit, rtol=tol, err_msg=metric)
    assert a["diverged"] == b["diverged"]


@pytest.mark.slow
def test_one_three_and_eight_cpu_devices_give_the_same_results(tiny_run):
    runs = {}
    for n in (1, 3, 8):
        proc, out = tiny_run("--cpu-devices", str(n))
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[n] = _results(out)
        assert runs[n]["environment"]["device_count"] == n
        assert runs[n]["environment"]["devices_used"] == n  # read from the arrays' shardings
    assert runs[3]["environment"]["layout"]["padded_models"] > 0
    one_image = 1 / 100 + 1e-6  # the held-out set has 100 images, the training set 300
    _compare(runs[1], runs[3], accuracy_tol=one_image)
    _compare(runs[1], runs[8], accuracy_tol=one_image)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_and_only_process_0_writes(tmp_path, tiny_run):
    # Two processes of one CPU device each against one process of two devices: the same mesh.
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, "-m", "experiments.sweep", *TINY, "--cpu-devices", "1", "--coordinator",
               f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid), "--out", str(tmp_path / f"p{pid}")]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "in 2 processes" in outs[0][0] and "wrote" in outs[0][0]
    assert "wrote" not in outs[1][0] and not (tmp_path / "p1").exists()
    two = _results(tmp_path / "p0")
    assert two["environment"]["processes"] == 2 and two["environment"]["devices_used"] == 2
    proc, out = tiny_run("--cpu-devices", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = _results(out)
    assert one["environment"]["processes"] == 1 and one["environment"]["devices_used"] == 2
    _compare(one, two, tol=1e-6)


@pytest.mark.slow
def test_chunked_cli_run_equals_one_chunk(tiny_run):
    (proc, one_out), (chunked, chunks_out) = (tiny_run("--cpu-devices", "2"),
                                              tiny_run("--cpu-devices", "2", "--max-models-per-chunk", "4"))
    assert proc.returncode == 0 and chunked.returncode == 0, (proc.stderr + chunked.stderr)[-2000:]
    one, chunks = _results(one_out), _results(chunks_out)
    assert one["environment"]["layout"]["num_chunks"] == 1 and chunks["environment"]["layout"]["num_chunks"] == 5
    _compare(one, chunks, accuracy_tol=1 / 100 + 1e-6)


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "1e9"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--scales", "0.1,abc"], "--scales"),
        (["--num-scales", "4", "--scales", "0.1"], "not allowed with"),
        (["--optimizer", "sgdd"], "--optimizer"),
        (["--data", "web"], "--data"),
        (["--dtype", "int8"], "--dtype"),
        (["--batch-size", "x"], "--batch-size"),
        (["--data-dir", "/nonexistent/dir"], "--data-dir"),
        (["--data", "bundled", "--train-size", "6000"], "bundled"),
        (["--data", "bundled", "--train-size", "4500", "--heldout-size", "1000"], "bundled"),
        (["--out", "/proc/forbidden"], "--out"),
        (["--seed", "2147483648"], "--seed"),
        (["--seed", "2147483647", "--num-seeds", "2"], "--num-seeds"),
        (["--split-seed", "-1"], "--split-seed"),
        (["--coordinator", "127.0.0.1:1234"], "go together"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
        (["--max-models-per-chunk", "0"], "--max-models-per-chunk"),
        (["--cpu-devices", "100000"], "--cpu-devices"),
    ],
)
def test_bad_options_exit_2_naming_the_problem(bad, message, capsys):
    with pytest.raises(SystemExit) as exc:
        protocol.parse_args(sweep.EXPERIMENT, bad)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_summary_table_counts_wins_over_any_arms():
    acc = {"batchnorm": np.array([[[0.1, 0.9], [0.2, 0.3], [0.0, 0.5]]]),
           "plain": np.array([[[0.1, 0.5], [0.2, 0.4], [0.0, 0.5]]]),
           "dropout": np.array([[[0.0, 0.1], [0.0, 0.2], [0.0, 0.1]]])}
    diverged = {"batchnorm": np.zeros((1, 3), bool), "plain": np.array([[False, True, False]]),
                "dropout": np.zeros((1, 3), bool)}
    table, wins = sweep.summary_table([1.0, 0.1, 0.01], acc, diverged)
    assert wins == {"batchnorm": 1, "plain": 1, "dropout": 0}
    assert "plain diverged" in table and "BN wins at 1 of 3" in table and "tie" in table.splitlines()[4]  # header, rule, then the third scale


def test_plot_draws_every_arm_in_every_panel(tmp_path):
    from experiments import plot

    rng = np.random.default_rng(0)
    acc = {name: rng.uniform(size=(2, 3, 4)) for name in ("batchnorm", "plain", "dropout")}
    fig = plot.sweep_figure([1.0, 0.1, 0.01], acc, title="t")
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert len(panels) == 3 and fig.axes[3].axison is False  # 2 x 2 grid, the fourth panel empty
    for i, ax in enumerate(panels):
        assert ax.get_title() == f"W:{[1.0, 0.1, 0.01][i]:.4g}"
        assert [line.get_linestyle() for line in ax.lines] == ["-", "--", ":"]  # BN solid, plain dashed
        for line, (name, runs) in zip(ax.lines, acc.items()):
            np.testing.assert_allclose(line.get_ydata(), runs[:, i].mean(0))  # mean over seeds, this scale
        assert len(ax.collections) == 3  # a min..max band per arm
    labels = [t.get_text() for t in fig.legends[0].get_texts()]  # one legend, under the panels
    assert labels == ["Batch Normalization", "Normal(without BatchNorm)", "dropout"]
    assert not any(ax.get_legend() for ax in fig.axes) and not any(ax.texts for ax in panels)
    plot.pyplot().close(fig)
    # a diverged arm is written into its panels only
    diverged = {"batchnorm": np.zeros((2, 3), bool), "plain": np.array([[True, False, False], [True, True, False]]),
                "dropout": np.zeros((2, 3), bool)}
    fig = plot.sweep_figure([1.0, 0.1, 0.01], acc, diverged=diverged)
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.lines]
    assert [[t.get_text() for t in ax.texts] for ax in panels] == [["plain diverged (2/2)"],
                                                                   ["plain diverged (1/2)"], []]
    plot.pyplot().close(fig)
    path = plot.plot_sweep([1.0, 0.1, 0.01], acc, tmp_path / "f.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                              (signal.SIGTERM, 143, "terminated")])
def test_interrupt_prints_one_line_and_exits_non_zero(tmp_path, sig, status, word):
    proc = subprocess.Popen([sys.executable, "-m", "experiments.sweep", "--num-seeds", "64", "--data", "bundled",
                             "--no-cache", "--out", str(tmp_path / "run")], cwd=ROOT, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and "compiling" not in (proc.stdout.readline() or ""):
        pass
    time.sleep(1.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    assert "Traceback" not in err and word in err
    out = tmp_path / "run"
    if out.exists():  # chunks finished before the signal are kept, whole, and the last line says how to resume
        assert [p.name for p in out.iterdir()] == ["chunks"] and "--resume" in err.strip().splitlines()[-1]
        assert all(p.name.startswith("chunk-") and p.suffix == ".npz" for p in (out / "chunks").iterdir())
    # else nothing was written: the empty output directory is gone too (no lock file left either)


def test_json_writer_turns_non_finite_numbers_into_null(tmp_path):
    path = results.write_json(tmp_path / "r.json", {"a": np.array([1.0, np.nan, np.inf]), "b": np.float32(0.5),
                                                     "c": np.bool_(True), "d": Path("x")})
    assert json.loads(path.read_text()) == {"a": [1.0, None, None], "b": 0.5, "c": True, "d": "x"}


@pytest.mark.slow
def test_benchmark_quick_runs(tmp_path):
    # No layer section ("l"): test_benchmark_layers.py runs it.
    proc = run_cli("experiments.benchmark", "--quick", "--skip", "d,l", "--out", str(tmp_path / "bench.json"),
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "bench.json").read_text())
    names = [v["name"] for v in res["variants"]]
    assert names[0].startswith("(a)") and any(n.startswith("(b)") for n in names)
    assert any(n.startswith("(c)") for n in names)
    assert res["variants"][0]["ratio_to_a"] == 1.0
    # (a) and (b) train the same models on the same batches: their final accuracies agree.
    finals = {v["name"][:3]: v["final_batchnorm"] + v["final_plain"] for v in res["variants"]}
    np.testing.assert_allclose(finals["(b)"], finals["(a)"], atol=2e-3)
    assert [row["models"] for row in res["scaling"]] == [32]
    assert res["scaling"][0]["model_updates_per_s"] > 0 and res["scaling"][0]["peak_rss_gb"] > 0
    assert "ratio" in proc.stdout and "scaling" in proc.stdout


@pytest.mark.slow
def test_results_file_table_and_figure_hold_each_arms_own_numbers(tmp_path, monkeypatch, capsys):
    """results.json, the summary table and the figure's data against the engine run directly on the same split,
    with every option away from its default, so a swapped arm, set or option shows."""
    from bnjax import data
    from bnjax import grid
    from experiments import plot

    drawn = []
    figure = plot.sweep_figure

    def spy(scales, accuracy, **kwargs):
        drawn.append((list(scales), accuracy, kwargs))
        return figure(scales, accuracy, **kwargs)

    monkeypatch.setattr(plot, "sweep_figure", spy)
    scales = (0.3, 0.05, 1e-4)
    out = tmp_path / "run"
    code = sweep.main(["--scales", "0.3,0.05,0.0001", "--epochs", "3", "--train-size", "200", "--heldout-size", "150",
                       "--batch-size", "40", "--lr", "0.1", "--optimizer", "momentum", "--dtype", "bfloat16", "--seed", "3",
                       "--split-seed", "2", "--data", "bundled", "--no-cache", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    res = _results(out)
    ds = data.load("bundled", 200, 150, split_seed=2)
    assert res["data"]["train_sha256"] == ds.source["train_sha256"]
    direct = grid.run_grid(grid.GridConfig(axes={"weight_scale": scales}, num_records=3, batch_size=40,
                                           learning_rate=0.1, optimizer="momentum", dtype="bfloat16", seed=3),
                           ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    metrics = direct.metrics
    assert res["record_steps"] == [1, 6, 11] and res["seeds"] == [3]
    assert set(res) >= {"train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss", "diverged", "summary"}
    for metric in ("train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss"):
        assert set(res[metric]) == {"batchnorm", "plain"}
        for arm in ("batchnorm", "plain"):
            np.testing.assert_allclose(np.array(res[metric][arm], float), metrics[metric][arm], rtol=1e-6, atol=1e-7,
                                       err_msg=f"{metric} {arm}")
    for arm in ("batchnorm", "plain"):
        assert res["diverged"][arm] == direct.diverged[arm].tolist()
    # The arms differ here, so swapping two of them cannot go unseen.
    assert not np.allclose(metrics["train_accuracy"]["batchnorm"][0, :, -1], metrics["train_accuracy"]["plain"][0, :, -1])
    # The plain net at scale 1e-4 predicts one class: each set's accuracy is that class's share of the set.
    shares = {split: np.bincount(labels, minlength=10) / len(labels)
              for split, labels in (("train", ds.t_train), ("heldout", ds.t_heldout))}
    train_acc, held_acc = res["train_accuracy"]["plain"][0][2][-1], res["heldout_accuracy"]["plain"][0][2][-1]
    assert [c for c in range(10) if abs(train_acc - shares["train"][c]) < 1e-6
            and abs(held_acc - shares["heldout"][c]) < 1e-6]
    # Summary: the final records, mean over seeds, and the wins computed here.
    final = {arm: metrics["train_accuracy"][arm][:, :, -1].mean(0) for arm in ("batchnorm", "plain")}
    summary = res["summary"]
    for arm in ("batchnorm", "plain"):
        np.testing.assert_allclose(summary["final_train_accuracy_mean"][arm], final[arm], atol=1e-7)
    bn_wins = int(np.sum(final["batchnorm"] > final["plain"] + 1e-6))
    plain_wins = int(np.sum(final["plain"] > final["batchnorm"] + 1e-6))
    assert bn_wins != plain_wins
    assert summary["bn_wins"] == summary["wins"]["batchnorm"] == bn_wins and summary["wins"]["plain"] == plain_wins
    assert summary["num_scales"] == 3 and res["weight_scales"] == list(scales)
    # The printed table: one row per scale, BN's column first.
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| scale | BN | plain |"))
    assert lines[header + 1].startswith("|---")
    for i, w in enumerate(scales):
        row = [cell.strip() for cell in lines[header + 2 + i].strip("|").split("|")]
        assert float(row[0]) == pytest.approx(w, rel=1e-3)
        assert (float(row[1]), float(row[2])) == pytest.approx((final["batchnorm"][i], final["plain"][i]), abs=6e-4)
    assert f"BN wins at {bn_wins} of 3 scales" in printed
    # The figure is drawn from the same numbers, BN first (solid), at the scales in their order.
    assert len(drawn) == 1 and drawn[0][0] == list(scales) and list(drawn[0][1]) == ["batchnorm", "plain"]
    for arm in ("batchnorm", "plain"):
        np.testing.assert_allclose(drawn[0][1][arm], metrics["train_accuracy"][arm], atol=1e-7)
        np.testing.assert_array_equal(drawn[0][2]["diverged"][arm], direct.diverged[arm])
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_float_in_keeps_to_its_interval_and_float32():
    import argparse

    ratio = cli.float_in(0.0, 1.0, open_low=True, open_high=True)
    assert ratio("0.2") == 0.2 and ratio("1e-40") == 1e-40
    non_negative = cli.float_in(0.0, float32=True)
    assert non_negative("5") == 5.0 and str(non_negative("-0")) == "0.0" and non_negative("0e0") == 0.0
    unit = cli.float_in(0.0, 1.0)
    assert unit("0") == 0.0 and unit("1") == 1.0
    for parse, bad in ((ratio, "0"), (ratio, "1"), (ratio, "nan"), (ratio, "x"), (unit, "1.5"), (unit, "-0.1"),
                       (non_negative, "-1"), (non_negative, "inf"), (non_negative, "1e-40"), (non_negative, "1e39")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_list_options_refuse_repeated_values():
    """Finding 15: ``--lrs 0.1,0.1`` trained the same models twice while ``--batch-sizes 4,4`` was refused."""
    import argparse

    assert cli.float_list("0.1, 0.01,1") == (0.1, 0.01, 1.0)
    for text, repeated in (("0.1,0.1", "0.1"), ("1,0.5,1e0", "1"), ("0.01,1e-2,3,3", "0.01, 3")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got {repeated} more than once"):
            cli.float_list(text)
