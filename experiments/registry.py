"""The one list of experiments: their module names, in the report's order, and whether the report runs each.

Read by ``experiments.report`` (its ``SECTIONS``: each reported experiment, some also with arguments of their own
such as ``--model convnet``; ``--only`` and ``--quick``), by the tests (every entry's
``--help``, quick run and rendering) and by the README's experiments table (``readme_table``, checked by the
tests). A new experiment is one module defining ``EXPERIMENT`` (``experiments.protocol.Experiment``) plus one
line here.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

from bnjax.files import atomic_write_text
from experiments import protocol

__all__ = ["Entry", "ENTRIES", "NAMES", "Section", "SECTIONS", "REPORTED", "section", "OTHER_COMMANDS", "experiment", "readme_table", "write_readme_table"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One experiment.

    Attributes:
      name: its module, ``experiments.<name>``.
      in_report: whether ``experiments.report`` runs it.
      time: its typical wall time at the defaults (2-core laptop CPU), for the README's table.
    """

    name: str
    in_report: bool
    time: str


ENTRIES = (
    Entry("sweep", False, "~5 s"),
    Entry("learning_rate", True, "52 s"),
    Entry("init", True, "39 s"),
    Entry("overfitting", True, "90 s"),
    Entry("activations", True, "14 s"),
    Entry("small_batch", True, "104 s"),
)
NAMES = tuple(e.name for e in ENTRIES)


@dataclasses.dataclass(frozen=True)
class Section:
    """One part of the report: an experiment run with the report's arguments plus its own.

    Attributes:
      name: the section, its folder under the report's ``--out`` and its ``--only`` name.
      module: the experiment, ``experiments.<module>``.
      argv: the experiment's own arguments in this section (e.g. ``--model convnet``), before ``--quick``'s.
      size: arguments that set its size, given only without ``--quick`` (whose own sizes replace them).
      label: what the section adds to the experiment's title (empty for its defaults).
      quick: arguments given after the experiment's own ``quick`` ones under the report's ``--quick``: a smaller
        check of the same pipeline where the report runs it (the experiment's own quick run is tested alone).
    """

    name: str
    module: str
    argv: tuple[str, ...] = ()
    size: tuple[str, ...] = ()
    label: str = ""
    quick: tuple[str, ...] = ()

    @property
    def experiment(self) -> protocol.Experiment:
        """The experiment the section runs (its module's ``EXPERIMENT``)."""
        return experiment(self.module)

    @property
    def title(self) -> str:
        """The section's heading: the experiment's title, then the label when there is one."""
        return f"{self.experiment.title}: {self.label}" if self.label else self.experiment.title


# Each reported experiment at its defaults, then claims 1 and 2 again on the book's ch. 7 conv net. A conv net
# step costs ~10x an MLP step on a CPU, so these run one seed over fewer points (each ~2 min on 2 cores); the
# experiments themselves keep their defaults with --model convnet.
# Under the report's --quick, the costliest sections shrink further (REPORT_QUICK): one batch size, one seed.
REPORT_QUICK = {"small_batch": ("--batch-sizes", "4", "--reference-batch", "4")}
SECTIONS = (*(Section(e.name, e.name, quick=REPORT_QUICK.get(e.name, ())) for e in ENTRIES if e.in_report),
            Section("learning_rate_convnet", "learning_rate", ("--model", "convnet"),
                    ("--lrs", "0.001,0.01,0.1,1,10", "--num-seeds", "1"), "SimpleConvNet",
                    ("--num-seeds", "1", "--train-size", "100", "--probe-steps", "2")),
            Section("init_convnet", "init", ("--model", "convnet"), ("--num-scales", "8", "--num-seeds", "1"),
                    "SimpleConvNet", ("--num-seeds", "1")))
REPORTED = tuple(s.name for s in SECTIONS)

# The commands beside the experiments, listed after them in the README's table: (name, what it answers, time).
OTHER_COMMANDS = (
    ("report", "Runs " + ", ".join(f"`{s.module}`" for s in SECTIONS if not s.argv) + ", then "
     + " and ".join(f"`{s.module} {' '.join(s.argv + s.size)}`" for s in SECTIONS if s.argv) + "; writes one "
     "`report.md`.",
     "537 s"),
    ("benchmark", "How fast is the grid engine against a Python loop, NumPy and Flax?", "~1 min"),
)


def experiment(name: str) -> protocol.Experiment:
    """An experiment's description.

    Args:
      name: a name of ``NAMES``.

    Returns:
      The module's ``EXPERIMENT``.

    Raises:
      KeyError: ``name`` is not registered.
    """
    if name not in NAMES:
        raise KeyError(f"no experiment {name!r}; registered: {', '.join(NAMES)}")
    return importlib.import_module(f"experiments.{name}").EXPERIMENT


def section(name: str) -> Section:
    """A section of the report by name.

    Args:
      name: a name of ``REPORTED``.

    Returns:
      Its ``Section``.

    Raises:
      KeyError: ``name`` is not a section.
    """
    for s in SECTIONS:
        if s.name == name:
            return s
    raise KeyError(f"no report section {name!r}; sections: {', '.join(REPORTED)}")


def readme_table() -> str:
    """The README's experiments table (between its ``experiments:begin`` and ``experiments:end`` markers).

    Returns:
      A markdown table: a row per registered experiment (name, what it answers, typical time), then the report
      and the benchmark.
    """
    rows = ["| name | what it answers | time |", "| --- | --- | --- |"]
    for entry in ENTRIES:
        rows.append(f"| `{entry.name}` | {experiment(entry.name).question} | {entry.time} |")
    rows += [f"| `{name}` | {what} | {time} |" for name, what, time in OTHER_COMMANDS]
    return "\n".join(rows) + "\n"


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- experiments:begin -->\n", "<!-- experiments:end -->"


def write_readme_table(readme: Path = README) -> bool:
    """Write ``readme_table()`` between the README's markers (after adding or renaming an experiment).

    Args:
      readme: the README to rewrite.

    Returns:
      Whether the table changed.

    Raises:
      ValueError: the README lacks the markers.
    """
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN.strip()} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    new = head + BEGIN + readme_table() + END + rest.split(END, 1)[1]
    if new != text:
        atomic_write_text(readme, new)
    return new != text


def main(argv: list[str] | None = None, readme: Path = README) -> int:
    """``python -m experiments.registry``: refresh the README's table of experiments.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``); it takes no options.
      readme: the README to rewrite.

    Returns:
      0, or 1 (with one line on stderr) for an argument, a README without the markers, or one that cannot be
      read or written.
    """
    if sys.argv[1:] if argv is None else argv:
        print("usage: python -m experiments.registry  (rewrites README.md's table of experiments; no options)",
              file=sys.stderr)
        return 1
    try:
        changed = write_readme_table(readme)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"error: cannot rewrite {readme}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"{readme.name} table " + ("updated" if changed else "already up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
