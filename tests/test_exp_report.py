"""experiments.report (all four experiments, quick configurations) and the Colab notebook, end to end."""

import json
import os
import re

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
        registry.experiment(name).title for name in registry.REPORTED]  # every section, in the registry's order
    for name in registry.REPORTED:
        experiment = registry.experiment(name)
        assert f"## {experiment.title}\n\n{experiment.question}\n" in text
        results = json.loads((quick_report / name / "results.json").read_text())
        assert "verdict" in results
        # the section quotes the experiment's own markdown verdict, computed from its results.json
        assert experiment.render(results) in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == sum(len(registry.experiment(n).figure_files) for n in registry.REPORTED)
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


@pytest.mark.slow
def test_rerun_without_reuse_and_what_each_experiment_is_given(quick_report):
    before = (quick_report / "init" / "results.json").stat().st_mtime_ns
    r = run_cli("experiments.report", "--quick", "--only", "init", "--data", "bundled", "--no-cache", "--quiet",
                "--out", str(quick_report))
    assert r.returncode == 0, r.stderr
    assert (quick_report / "init" / "results.json").stat().st_mtime_ns != before  # ran again
    args = report.parse_args(["--seed", "7", "--data", "bundled", "--no-cache", "--out", str(quick_report)])
    argv = report.experiment_argv(args, "init")
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--out") + 1] == str(quick_report / "init")
    assert "--no-cache" in argv and "--quiet" not in argv and "--scales" not in argv  # defaults, not quick
    quick = report.experiment_argv(report.parse_args(["--quick", "--out", str(quick_report)]), "init")
    assert quick[-len(registry.experiment("init").quick):] == list(registry.experiment("init").quick)


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
