"""One experiment protocol: what an experiment is (``Experiment``) and the one ``main`` that runs any of them.

An experiment module describes itself in an ``EXPERIMENT`` and hands it to ``main``::

    EXPERIMENT = protocol.Experiment(name="mine", title=..., question=..., doc=__doc__, options=add_options,
                                     grid=grid_config, describe=..., analyse=analyse, render=render, ...)

    def main(argv=None):
        return protocol.main(EXPERIMENT, argv)

    if __name__ == "__main__":
        sys.exit(runtime.main_wrapper(main))

``main`` parses and checks the options, starts JAX, claims the output folder (``experiments.outputs``: refused
when it holds another run's files, unless ``--overwrite`` or ``--resume``; locked against a concurrent run),
loads the data, runs the grid through the engine with a progress bar (each finished chunk saved for
``--resume``), measures (every process), analyses, records, draws the figures and prints the rendered verdict
(process 0 alone). Adding the module's name to ``experiments/registry.py`` puts it in the report, the README's
table and the tests. Nothing here imports JAX at module level, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

from experiments import chunks, cli, outputs, results, runtime

__all__ = ["Run", "Figure", "Experiment", "build_parser", "parse_args", "num_heldout", "main"]

# The clock of a command-line run starts when the experiments load (the first ``main`` call of a process);
# later calls in the same process (experiments.report) start their own.
_IMPORTED = time.perf_counter()
_FIRST_CALL = [True]


@dataclasses.dataclass
class Run:
    """What one run has so far, handed to an experiment's ``measure``, ``analyse``, notes and figures.

    Attributes:
      args: the parsed options.
      started: ``runtime.start``'s dict (``cache_dir``, ``is_main``, ``import_s``).
      dataset: the ``bnjax.data.Dataset`` (``None`` without an engine run).
      config: the ``grid.GridConfig`` (``None`` without an engine run).
      result: the ``grid.GridResult`` (``None`` without an engine run).
      timing: seconds per phase, recorded in results.json.
      data: what ``measure`` and ``analyse`` computed for the figures and notes (e.g. the probe's ratios).
    """

    args: argparse.Namespace
    started: dict
    dataset: Any = None
    config: Any = None
    result: Any = None
    timing: dict = dataclasses.field(default_factory=dict)
    data: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Figure:
    """One figure of an experiment.

    Attributes:
      file: the PNG's name in the output folder.
      draw: run -> a matplotlib figure.
      when: run -> whether this run has the figure (``None``: always).
    """

    file: str
    draw: Callable[[Run], Any]
    when: Callable[[Run], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    """An experiment, described once: its command line, its grid, its analysis, its rendering and its figures.

    Attributes:
      name: the module name (``python -m experiments.<name>``), also its default output folder's prefix.
      title: the report's section title.
      question: what it answers, one sentence (the report's section and the README's table).
      doc: the module docstring; its first two paragraphs are ``--help``'s description.
      epilog: ``--help``'s text after the options (the protocol's details).
      options: parser -> adds the experiment's own options (listed before the common ones).
      grid: ``(args, dataset) -> grid.GridConfig``, the one engine run (``None``: the experiment has none).
      describe: ``(args, config) ->`` what the models are, for the line printed before the run.
      analyse: run -> the results fields beside the metrics (the verdict, and whatever else the experiment
        records), in their order. Process 0 only.
      render: results dict (as read back from results.json) -> markdown, printed at the end of a run and quoted
        by ``experiments.report``.
      figures: the ``Figure``s, drawn after the analysis unless ``--no-plot``.
      notes: the results' ``notes``: a sequence of sentences, or run -> sentences.
      quick: options of a tiny configuration (``experiments.report --quick``: the pipeline, not the science).
      check: ``(parser, args)`` -> cross-option checks (``parser.error`` exits 2); may fill in defaults.
      late_options: parser -> options listed after the common ones.
      train_size: the default ``--train-size``.
      num_seeds: the default ``--num-seeds``.
      heldout: held-out images: a number, ``None`` (every image not trained on; at least one needed), or
        args -> either.
      unit: the progress bar's unit.
      measure: run -> device work after the engine run that every process takes part in (it fills
        ``run.data``), or ``None``.
      skip_engine: args -> no data and no engine run this time (``analyse`` then sees ``run.result is None``).
    """

    name: str
    title: str
    question: str
    doc: str
    epilog: str
    options: Callable[[argparse.ArgumentParser], None]
    grid: Callable[[argparse.Namespace, Any], Any] | None
    describe: Callable[[argparse.Namespace, Any], str]
    analyse: Callable[[Run], dict]
    render: Callable[[dict], str]
    figures: tuple[Figure, ...] = ()
    notes: Sequence[str] | Callable[[Run], Sequence[str]] = ()
    quick: tuple[str, ...] = ()
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None
    late_options: Callable[[argparse.ArgumentParser], None] | None = None
    train_size: int = 1000
    num_seeds: int = 1
    heldout: int | None | Callable[[argparse.Namespace], int | None] = 0
    unit: str = "record"
    measure: Callable[[Run], None] | None = None
    skip_engine: Callable[[argparse.Namespace], bool] | None = None

    @property
    def figure_files(self) -> tuple[str, ...]:
        """Every figure's file name, in drawing order."""
        return tuple(f.file for f in self.figures)


def build_parser(experiment: Experiment) -> argparse.ArgumentParser:
    """The experiment's parser: its options, the common ones, then its late options.

    Args:
      experiment: the experiment.

    Returns:
      The ``argparse.ArgumentParser`` of ``python -m experiments.<name>``.
    """
    p = cli.new_parser(experiment.name, experiment.doc, experiment.epilog)
    experiment.options(p)
    cli.add_common_args(p, train_size=experiment.train_size, num_seeds=experiment.num_seeds)
    if experiment.late_options is not None:
        experiment.late_options(p)
    return p


def num_heldout(experiment: Experiment, args: argparse.Namespace) -> int | None:
    """The held-out images the options ask of the data.

    Args:
      experiment: the experiment.
      args: its parsed options.

    Returns:
      A count (0: none), or ``None`` for every image not trained on.
    """
    return experiment.heldout(args) if callable(experiment.heldout) else experiment.heldout


def parse_args(experiment: Experiment, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the experiment's options.

    Args:
      experiment: the experiment.
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      The options, checked, with ``out`` filled in (process 0 has proven it writable).

    Raises:
      SystemExit: status 2 naming the option for any bad value or combination (0 for ``--help``).
    """
    parser = build_parser(experiment)
    args = parser.parse_args(argv)
    if experiment.check is not None:
        experiment.check(parser, args)
    return cli.check_common_args(parser, args, experiment.name, num_heldout(experiment, args) or 0,
                                 experiment.figure_files)


def main(experiment: Experiment, argv: Sequence[str] | None = None) -> int:
    """Run an experiment from its command line, end to end.

    Parse and check the options; start JAX; claim the output folder (process 0: created, locked, the old run's
    files removed with ``--overwrite``); unless ``skip_engine``, load the data and run the grid through the
    engine with a progress bar, each finished chunk written to the folder (``--resume`` skips those already
    there); ``measure`` on every process; then on process 0 alone: ``analyse``, record (results.json), draw the
    figures, print the rendered verdict and the files written, and remove the chunk files.

    Args:
      experiment: the experiment.
      argv: its arguments (``None``: ``sys.argv[1:]``).

    Returns:
      0 when done (every process).

    Raises:
      SystemExit: status 2 for a bad option (an output folder refused or in use included), 1 when the data,
        the backend or the memory is not there (one line on stderr each).
    """
    started_at = _IMPORTED if _FIRST_CALL[0] else time.perf_counter()
    _FIRST_CALL[0] = False
    args = parse_args(experiment, argv)
    started = runtime.start(args, x64=getattr(args, "dtype", None) == "float64")
    if not started["is_main"]:
        return _run(experiment, args, started, started_at)
    args.out = runtime.claim_out(args, experiment.figure_files)
    try:
        return _run(experiment, args, started, started_at)
    finally:
        outputs.release(args.out)


def _run(experiment: Experiment, args: argparse.Namespace, started: dict, started_at: float) -> int:
    """``main`` once the output folder is claimed."""
    run = Run(args=args, started=started)
    if experiment.grid is not None and not (experiment.skip_engine and experiment.skip_engine(args)):
        heldout = num_heldout(experiment, args)
        run.dataset, data_s = runtime.load_timed(args, heldout, need_heldout=heldout is None)
        run.config = experiment.grid(args, run.dataset)
        run.result, run.timing = runtime.run_engine(
            args, started, run.config, run.dataset, name=experiment.name, what=experiment.describe(args, run.config),
            heldout=heldout != 0, unit=experiment.unit)
        run.timing["data_s"] = data_s
    if experiment.measure is not None:
        experiment.measure(run)
    if not started["is_main"]:  # process 0 alone writes
        return 0

    fields = experiment.analyse(run)
    notes = list(experiment.notes(run) if callable(experiment.notes) else experiment.notes)
    if run.result is not None:
        record = results.results_record(args, run.result, run.dataset, run.timing, cache_dir=started["cache_dir"],
                                        **fields, notes=notes)
    else:
        run.timing["import_s"] = started["import_s"]
        record = {"config": vars(args), **fields, "notes": notes, "timing": run.timing,
                  "environment": dict(results.environment(), compilation_cache=started["cache_dir"])}
    figures = {f.file: functools.partial(f.draw, run) for f in experiment.figures if f.when is None or f.when(run)}
    results.finish(args, record, figures, experiment.render, started_at)
    chunks.remove(args.out)  # results.json holds everything they held
    return 0


def command(experiment: Experiment) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv=None) -> int`` of an experiment module: ``main(experiment, argv)``.

    Every experiment module ends with ``main = protocol.command(EXPERIMENT)`` and
    ``if __name__ == "__main__": sys.exit(runtime.main_wrapper(main))``.

    Args:
      experiment: the experiment.

    Returns:
      a function of the arguments (``None``: ``sys.argv[1:]``) returning the exit status.
    """

    def run_command(argv: Sequence[str] | None = None) -> int:
        return main(experiment, argv)

    run_command.__doc__ = f"``python -m experiments.{experiment.name}`` (see the module docstring)."
    return run_command
