"""experiments.report (all four experiments, quick configurations) and the Colab notebook, end to end."""

import json
import os
import re
from pathlib import Path

import pytest

from experiments import report
from test_experiments import ROOT, _env, _run


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    r = _run("experiments.report", "--quick", "--data", "bundled", "--no-cache", "--quiet", "--out", str(out),
             timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def test_report_has_every_section_figure_and_verdict(quick_report):
    text = (quick_report / "report.md").read_text()
    assert "Quick configurations" in text
    for name, (title, _) in report.EXPERIMENTS.items():
        assert f"## {title}" in text
        results = json.loads((quick_report / name / "results.json").read_text())
        assert "verdict" in results
        # the section quotes the experiment's own markdown verdict, computed from its results.json
        module = __import__(f"experiments.{name}", fromlist=["report"])
        assert module.report(results) in text
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert len(links) == sum(len(__import__(f"experiments.{n}", fromlist=["FIGURES"]).FIGURES)
                             for n in report.EXPERIMENTS)
    for link in links:
        assert (quick_report / link).stat().st_size > 5_000, link


def test_reuse_reads_results_without_running_again(quick_report):
    before = {n: (quick_report / n / "results.json").stat().st_mtime_ns for n in report.EXPERIMENTS}
    r = _run("experiments.report", "--reuse", "--only", "init,activations", "--quiet", "--out", str(quick_report))
    assert r.returncode == 0, r.stderr
    assert before == {n: (quick_report / n / "results.json").stat().st_mtime_ns for n in report.EXPERIMENTS}
    text = (quick_report / "report.md").read_text()
    assert "## " + report.EXPERIMENTS["init"][0] in text and report.EXPERIMENTS["overfitting"][0] not in text


def test_rerun_without_reuse_and_what_each_experiment_is_given(quick_report):
    before = (quick_report / "activations" / "results.json").stat().st_mtime_ns
    r = _run("experiments.report", "--quick", "--only", "activations", "--data", "bundled", "--no-cache", "--quiet",
             "--out", str(quick_report))
    assert r.returncode == 0, r.stderr
    assert (quick_report / "activations" / "results.json").stat().st_mtime_ns != before  # ran again
    args = report.parse_args(["--seed", "7", "--data", "bundled", "--no-cache", "--out", str(quick_report)])
    argv = report.experiment_argv(args, "init")
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--out") + 1] == str(quick_report / "init")
    assert "--no-cache" in argv and "--quiet" not in argv and "--scales" not in argv  # defaults, not quick
    quick = report.experiment_argv(report.parse_args(["--quick", "--out", str(quick_report)]), "init")
    assert quick[-len(report.QUICK["init"]):] == report.QUICK["init"]


def test_bad_options_exit_2():
    r = _run("experiments.report", "--only", "init,sweeps", "--out", "/tmp/bnjax-never-written")
    assert r.returncode == 2 and "--only" in r.stderr


def test_colab_notebook_runs_top_to_bottom(tmp_path):
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "experiments" / "colab.ipynb", as_version=4)
    assert "REPO_URL = " in nb.cells[1].source  # the one variable to change
    env = _env(BNJAX_NOTEBOOK_QUICK="1", BNJAX_NOTEBOOK_OUT=str(tmp_path))
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "backend: cpu" in outputs
    assert "training accuracy" in outputs
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "sweep" / "sweep.png").exists()
