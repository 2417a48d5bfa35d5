"""experiments.report (every section, quick configurations) and the Colab notebook, end to end."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import registry, report
from helpers import ROOT, cli_env, run_cli


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    """The Colab notebook run top to bottom in its quick mode, once: its second half is ``report.main(["--out",
    OUT/report, "--quick"])``, the report every test here reads. Returns (the executed notebook, OUT)."""
    import nbclient
    import nbformat

    out = tmp_path_factory.mktemp("colab")
    nb = nbformat.read(ROOT / "experiments" / "colab.ipynb", as_version=4)
    # XDG_CACHE_HOME is the session's (conftest.py): the compilation cache the quick runs share, never the user's
    # home (and the MNIST folder "auto" looks in, unless BNJAX_DATA_DIR is set, empty: the bundled images).
    env = cli_env(BNJAX_NOTEBOOK_QUICK="1", BNJAX_NOTEBOOK_OUT=str(out))
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb, out


@pytest.fixture(scope="module")
def quick_report(notebook):
    """The folder of the notebook's ``experiments.report --quick``: report.md, and each experiment's folder."""
    return notebook[1] / "report"


@pytest.mark.slow
def test_report_has_every_section_figure_and_verdict(quick_report):
    text = (quick_report / "report.md").read_text()
    assert "Quick configurations" in text
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [
        registry.section(name).title for name in registry.REPORTED]  # every section, in the registry's order
    for name in registry.REPORTED:
        part = registry.section(name)
        experiment = part.experiment
        assert f"## {part.title}\n\n{experiment.question}\n\n`python -m {' '.join(['experiments.' + part.module, *part.argv, *part.size])}`" in text
        results = json.loads((quick_report / name / "results.json").read_text())
        if name == "small_batch":  # the section's own quick options reached the run: one batch size
            assert results["batch_sizes"] == [int(part.quick[part.quick.index("--batch-sizes") + 1])]
        assert "verdict" in results
        # the section's own arguments reached its run (the conv-net sections trained the conv net)
        assert results["config"].get("model", "mlp") == ("convnet" if "convnet" in part.argv else "mlp"), name
        # the section quotes the experiment's own markdown verdict, computed from its results.json
        assert experiment.render(results) in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == sum(len(registry.section(n).experiment.figure_files) for n in registry.REPORTED)
    for link in links:
        assert (quick_report / link).stat().st_size > 5_000, link


@pytest.mark.slow
def test_reuse_reads_results_without_running_again(quick_report):
    before = {n: (quick_report / n / "results.json").stat().st_mtime_ns for n in registry.REPORTED}
    r = run_cli("experiments.report", "--reuse", "--only", "init,activations", "--quiet", "--out", str(quick_report))
    assert r.returncode == 0, r.stderr
    assert before == {n: (quick_report / n / "results.json").stat().st_mtime_ns for n in registry.REPORTED}
    text = (quick_report / "report.md").read_text()
    assert "## " + registry.experiment("init").title in text
    assert registry.experiment("overfitting").title not in text


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_an_interrupted_report_leaves_the_previous_one_whole_and_resume_finishes_it(quick_report, tmp_path):
    """Finding 3: a report stopped after some experiments left their new results beside the old report.md."""
    out = tmp_path / "report"
    shutil.copytree(quick_report, out)
    before = _tree(out)
    refused = run_cli("experiments.report", "--quick", "--only", "init,activations", "--out", str(out))
    assert refused.returncode == 2 and "already holds a report" in refused.stderr and "--overwrite" in refused.stderr
    argv = ["experiments.report", "--quick", "--only", "init,activations", "--data", "bundled", "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", *argv, "--overwrite", "--out", str(out)], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staged = out / report.STAGING / "init" / "results.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not staged.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # init is finished, activations has started
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    after = _tree(out)
    assert {k: v for k, v in after.items() if not k.startswith(report.STAGING)} == before  # the previous report, whole
    assert f"{report.STAGING}/init/results.json" in after

    again = run_cli(*argv, "--out", str(out))
    assert again.returncode == 2 and "holds an interrupted report" in again.stderr and "--resume" in again.stderr
    resumed = run_cli(*argv, "--resume", "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    text = (out / "report.md").read_text()
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == [
        registry.experiment(n).title for n in ("init", "activations")]
    # The staged results were swapped in as they were; the --overwrite of the interrupted run still applies:
    # the previous report's other experiments are gone with it.
    assert (out / "init" / "results.json").read_bytes() == after[f"{report.STAGING}/init/results.json"]
    assert sorted(p.name for p in out.iterdir()) == ["activations", "init", "report.md"]
    for name in ("init", "activations"):
        assert registry.experiment(name).render(json.loads((out / name / "results.json").read_text())) in text


@pytest.mark.slow
def test_a_swap_cut_short_is_finished_by_the_next_run(quick_report, tmp_path):
    """A report killed (-9) while swapping its staged results in: the next report run completes the swap."""
    out = tmp_path / "report"
    shutil.copytree(quick_report / "init", out / report.STAGING / "init")
    (out / report.STAGING / "report.md").write_text("# staged report\n")
    (out / report.STAGING / "complete.json").write_text('{"staged": ["init"], "removed": []}')
    (out / "init").mkdir()
    (out / "init" / "results.json").write_text('{"old": 1}')  # the previous report's, about to be replaced
    r = run_cli("experiments.report", "--reuse", "--only", "init", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "completing the report staged in" in r.stdout
    assert (out / "init" / "results.json").read_bytes() == (quick_report / "init" / "results.json").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["init", "report.md"]
    assert registry.experiment("init").title in (out / "report.md").read_text()


def test_a_folder_holding_a_report_is_refused_unless_told_what_to_do(tmp_path, capsys):
    (tmp_path / "report.md").write_text("# an earlier report\n")
    with pytest.raises(SystemExit) as exc:
        report.parse_args(["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {tmp_path} already holds a report (report.md); use --overwrite to replace it, --reuse to "
        "reuse its results, or choose another --out"]
    with pytest.raises(SystemExit):
        report.parse_args(["--resume", "--out", str(tmp_path)])
    assert "nothing to resume" in capsys.readouterr().err
    for ok in (["--overwrite"], ["--reuse"]):
        assert report.parse_args([*ok, "--out", str(tmp_path)]).out == tmp_path
    (tmp_path / report.STAGING / "init").mkdir(parents=True)
    (tmp_path / report.STAGING / "init" / "results.json").write_text("{}")  # an interrupted report's first stage
    with pytest.raises(SystemExit):
        report.parse_args(["--reuse", "--out", str(tmp_path)])
    assert "holds an interrupted report" in capsys.readouterr().err
    assert report.parse_args(["--resume", "--out", str(tmp_path)]).resume
    assert sorted(p.name for p in tmp_path.iterdir()) == [report.STAGING, "report.md"]  # parsing touched nothing


@pytest.mark.slow
def test_rerun_without_reuse_and_what_each_experiment_is_given(quick_report):
    before = (quick_report / "init" / "results.json").stat().st_mtime_ns
    r = run_cli("experiments.report", "--quick", "--only", "init", "--data", "bundled", "--no-cache", "--quiet",
                "--overwrite", "--out", str(quick_report))
    assert r.returncode == 0, r.stderr
    assert (quick_report / "init" / "results.json").stat().st_mtime_ns != before  # ran again
    assert sorted(p.name for p in quick_report.iterdir()) == ["init", "report.md"]  # the whole report replaced
    args = report.parse_args(["--seed", "7", "--data", "bundled", "--no-cache", "--overwrite", "--out",
                              str(quick_report)])
    argv = report.experiment_argv(args, "init")
    assert argv[argv.index("--seed") + 1] == "7"
    assert argv[argv.index("--out") + 1] == str(quick_report / report.STAGING / "init")  # swapped in at the end
    assert "--no-cache" in argv and "--quiet" not in argv and "--scales" not in argv  # defaults, not quick
    assert "--resume" not in argv
    quick = report.experiment_argv(report.parse_args(["--quick", "--overwrite", "--out", str(quick_report)]), "init")
    assert quick[-len(registry.experiment("init").quick):] == list(registry.experiment("init").quick)
    # a section's own quick options come after its experiment's, so they win
    part = registry.section("small_batch")
    assert part.quick
    sb = report.experiment_argv(report.parse_args(["--quick", "--overwrite", "--out", str(quick_report)]), "small_batch")
    assert sb[-len(part.experiment.quick + part.quick):] == list(part.experiment.quick + part.quick)


def test_bad_options_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        report.parse_args(["--only", "init,sweeps", "--out", "/tmp/bnjax-never-written"])
    assert exc.value.code == 2 and "--only" in capsys.readouterr().err
    # the sweep is an experiment, but not one of the report's
    with pytest.raises(SystemExit):
        report.parse_args(["--only", "init,sweep", "--out", "/tmp/bnjax-never-written"])


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(notebook):
    nb, out = notebook
    assert "REPO_URL = " in nb.cells[1].source  # the one variable to change
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "backend: cpu" in outputs
    assert "training accuracy" in outputs
    assert (out / "report" / "report.md").exists() and (out / "sweep" / "sweep.png").exists()
