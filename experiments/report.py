"""What Batch Normalization does, measured: the experiments behind the book's claims, in one report.

Runs the sections ``experiments/registry.py`` lists (``learning_rate``: claim 1, ``init``: claim 2,
``overfitting``: claim 3, ``activations``: the premise, ``small_batch``: what to use at small batches, each at
its defaults; then claims 1 and 2 again on the book's ch. 7 conv net, ``--model convnet``), each into its own folder under ``--out``, or reads the results already there (``--reuse``), and writes ``report.md`` with every figure and
verdict.

    python -m experiments.report                       # a few minutes on a laptop CPU
    python -m experiments.report --reuse --out runs/report-20261129-230000
    python -m experiments.report --quick               # tiny configurations: checks the pipeline in seconds

The experiments run into a staging folder (``DIR/.staging``); only when every one has finished are their
folders and ``report.md`` swapped in together, so an interrupted report leaves the previous one whole, and
``--resume`` continues it (finished experiments are kept, an interrupted one resumes from its chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from bnjax import options
from bnjax.data import SOURCES as DATA_SOURCES
from experiments import cli, outputs, protocol, registry, results, runtime

_START = time.perf_counter()
STAGING = ".staging"
_PLAN = "plan.json"  # in the staging folder: how it was started (--overwrite)
_COMPLETE = "complete.json"  # in the staging folder: every stage finished, the swap may run (and be redone)


def build_parser() -> argparse.ArgumentParser:
    """The report's parser.

    Returns:
      The ``argparse.ArgumentParser`` of ``python -m experiments.report``.
    """
    p = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done, 1 an experiment could not run (data or backend), 2 bad option (a folder "
               "that holds a report, without --overwrite, --reuse or --resume, included), 130/143 interrupted.",
    )
    p.add_argument("--out", type=cli.out_dir, metavar="DIR",
                   help="report folder; each experiment writes into DIR/<name> (default: runs/report-<date>-<time>); "
                        "one that holds a report is refused unless --overwrite, --reuse or --resume")
    p.add_argument("--reuse", action="store_true",
                   help="read DIR/<name>/results.json where it exists instead of running the experiment again")
    cli.add_out_mode_args(p)
    p.add_argument("--only", metavar="NAME,...", type=_names, default=registry.REPORTED,
                   help=f"a subset of {', '.join(registry.REPORTED)} (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny configurations (a check of the pipeline, not results)")
    p.add_argument("--seed", type=cli.int_in(0, options.MAX_SEED), default=0,
                   help="first training seed of every experiment (default: 0)")
    p.add_argument("--data", choices=DATA_SOURCES, default="auto", help="as for every experiment (default: auto)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="directory holding the MNIST idx files (or tfds data)")
    p.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    p.add_argument("--cpu-devices", type=cli.int_in(1, 256), metavar="N", help="as for every experiment")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    return p


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(" ", "").split(",") if n)
    unknown = [n for n in names if n not in registry.REPORTED]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(registry.REPORTED)}, got {text!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"each name must appear once, got {', '.join(repeated)} more than once")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the report's options.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      The options, with ``out`` filled in, proven writable and usable as asked (created only by ``main``).

    Raises:
      SystemExit: status 2 naming the option for a bad value, or a folder in use or holding a report that
        the options do not say what to do with.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.reuse and args.overwrite:
        parser.error("--reuse keeps the results --overwrite would remove: give one of them")
    if args.out is None:
        args.out = cli.default_out("report")
    cli.check_out(parser, args)
    if not cli.is_default_out(args.out):
        try:
            check_report_folder(args)
        except outputs.OutputError as err:
            cli.usage_error(str(err))
    return args


def check_report_folder(args: argparse.Namespace) -> None:
    """Whether the report may use ``args.out`` as asked.

    Args:
      args: the report's options (``out``, ``overwrite``, ``reuse``, ``resume``).

    Raises:
      outputs.OutputError: it holds an interrupted report and neither ``--resume`` nor ``--overwrite`` was
        given; or a finished report and none of ``--overwrite``, ``--reuse``; or ``--resume`` finds nothing to
        continue there.
    """
    out = args.out
    staging = out / STAGING
    interrupted = _interrupted(staging)
    finished = [p for p in ["report.md", *(f"{n}/{outputs.RESULTS}" for n in registry.REPORTED)] if (out / p).exists()]
    if staging.is_dir() and (staging / _COMPLETE).exists():
        finished.append(f"{STAGING} (a finished report not yet swapped in)")
    if args.overwrite:
        return
    if interrupted and not args.resume:
        raise outputs.OutputError(f"--out {out} holds an interrupted report ({STAGING}); use --resume to continue it, "
                                  "--overwrite to start again, or choose another --out")
    if args.resume and not interrupted and finished:
        raise outputs.OutputError(f"--resume: {out} holds a finished report ({finished[0]}); nothing to resume "
                                  "(--reuse reuses its results, --overwrite runs it again)")
    if finished and not (args.reuse or args.resume):
        raise outputs.OutputError(f"--out {out} already holds a report ({', '.join(finished)}); use --overwrite to "
                                  "replace it, --reuse to reuse its results, or choose another --out")


def _interrupted(staging: Path) -> bool:
    """Whether ``staging`` holds the work of an interrupted report: an experiment's files, not yet swapped in."""
    return (staging.is_dir() and not (staging / _COMPLETE).exists()
            and any(outputs.run_files(staging / n) for n in registry.REPORTED if (staging / n).is_dir()))


def experiment_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The command line the report gives one experiment.

    Args:
      args: the report's options.
      name: the experiment.

    Returns:
      Its arguments: the output folder (``DIR/.staging/<name>``, swapped in at the end), ``--resume`` when the
      report resumes and that folder exists, seed, data and process options, and with ``--quick`` its
      ``quick`` options last, then the section's own (``registry.Section.quick``).
    """
    staged = args.out / STAGING / name
    argv = ["--out", str(staged), "--seed", str(args.seed), "--data", args.data]
    if args.resume and staged.exists():
        argv.append("--resume")
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    for flag in ("no_cache", "quiet"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.cpu_devices is not None:
        argv += ["--cpu-devices", str(args.cpu_devices)]
    part = registry.section(name)
    return argv + list(part.argv) + (list(part.experiment.quick + part.quick) if args.quick else list(part.size))


def _command(name: str) -> str:
    """A section's experiment and its own arguments, e.g. ``experiments.init --model convnet``."""
    part = registry.section(name)
    return " ".join([f"experiments.{part.module}", *part.argv, *part.size])


def section(name: str, results: dict, out: Path, folder: Path | None = None) -> str:
    """One experiment's part of the report.

    Args:
      name: the experiment.
      results: its results.json, read back.
      out: the report's folder (figures are linked relative to it, as ``<name>/<file>``).
      folder: where the experiment's files are now (default ``out/<name>``; a staged one until the swap);
        figures not there are left out.

    Returns:
      Markdown: title, what it answers, provenance, figures, and the experiment's own rendering of its verdict.
    """
    part = registry.section(name)
    experiment = part.experiment
    folder = out / name if folder is None else folder
    figures = [f for f in experiment.figure_files if (folder / f).exists()]
    env = results.get("environment", {})
    timing = results.get("timing", {})
    provenance = (f"`python -m {_command(name)}`: {results.get('data', {}).get('name', '?')} data, "
                  f"{env.get('backend', '?')} x{env.get('device_count', '?')}, "
                  f"{timing.get('total_s', float('nan')):.0f} s.")
    parts = [f"## {part.title}", "", experiment.question, "", provenance, ""]
    parts += [f"![{f}]({name}/{f})" for f in figures]
    parts += ["", experiment.render(results), ""]
    return "\n".join(parts)


def write_report(out: Path, sections: dict[str, dict], quick: bool, *, folders: dict[str, Path] | None = None,
                 path: Path | None = None) -> Path:
    """Write ``report.md``.

    Args:
      out: the report's folder.
      sections: experiment name -> its results, in the report's order.
      quick: the results are quick configurations (said at the top).
      folders: experiment name -> where its files are now (default: ``out/<name>``).
      path: the file to write (default ``out/report.md``; the staged one until the swap).

    Returns:
      The path written.
    """
    first = next(iter(sections.values()))
    env = first.get("environment", {})
    head = ["# What Batch Normalization does, measured", "",
            "The claims of *Deep Learning from Scratch* ch. 6.3 (batch norm allows larger learning rates, makes "
            "training far less dependent on the initial weights, and reduces overfitting), each measured over "
            "seeds by one run of bnjax's grid engine. Every number below is computed from the results.json "
            "beside its figures.", "",
            f"Written {datetime.now():%Y-%m-%d %H:%M} with jax {env.get('jax', '?')} on {env.get('backend', '?')} "
            f"({env.get('device_kind', '?')})." + (" **Quick configurations: a pipeline check, not results.**"
                                                    if quick else ""), ""]
    folders = folders or {}
    body = [section(name, res, out, folders.get(name)) for name, res in sections.items()]
    return results.atomic_write_text(out / "report.md" if path is None else path, "\n".join(head + body))


def main(argv=None) -> int:
    """``python -m experiments.report``: run (or ``--reuse``) each experiment, then write ``report.md``.

    The experiments run into ``DIR/.staging``; ``report.md`` and their folders are swapped in together at the
    end (with ``--overwrite``, the previous report's folders are removed then), so an interrupted report
    leaves the previous one whole and ``--resume`` continues it.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      0 when written; an experiment's non-zero status, or 1 when a results file cannot be read.

    Raises:
      SystemExit: status 2 for a bad option (a folder refused or in use included), 1 when an experiment cannot
        run here.
    """
    args = parse_args(argv)
    runtime.start(args)  # JAX up before any folder is created (a garbage XLA_FLAGS ends the process in C++)
    args.out = runtime.claim_out(args)
    try:
        return _report(args)
    finally:
        outputs.release(args.out)


def _report(args: argparse.Namespace) -> int:
    """``main`` once the report's folder is locked."""
    staging = args.out / STAGING
    for trash in args.out.glob(".trash-*"):  # what a killed swap left to delete
        shutil.rmtree(trash, ignore_errors=True)
    if (staging / _COMPLETE).exists():  # a finished report whose swap was cut short (kill -9): finish it
        runtime.say(args, f"completing the report staged in {staging}")
        _swap_in(args.out)
    try:
        check_report_folder(args)  # again, under the lock
    except outputs.OutputError as err:
        cli.usage_error(str(err))
    if args.overwrite or not _interrupted(staging):
        shutil.rmtree(staging, ignore_errors=True)  # nothing there to continue
    try:
        return _run_stages(args, staging)
    finally:
        if not _interrupted(staging) and not (staging / _COMPLETE).exists():
            shutil.rmtree(staging, ignore_errors=True)  # a report that failed before any result leaves nothing


def _run_stages(args: argparse.Namespace, staging: Path) -> int:
    """Run (or reuse, or keep) every experiment, write report.md beside them in ``staging``, swap them in."""
    plan_path = staging / _PLAN
    if not plan_path.exists():  # how the staged report began: a resumed --overwrite still replaces everything
        results.write_json(plan_path, {"overwrite": args.overwrite})
    overwrite = json.loads(plan_path.read_text()).get("overwrite", False)
    sections, folders, staged = {}, {}, []
    for name in args.only:
        final, stage = args.out / name, staging / name
        if args.reuse and (final / outputs.RESULTS).exists():
            folder = final
        elif args.resume and (stage / outputs.RESULTS).exists():
            runtime.say(args, f"== {_command(name)}: finished before the interruption, kept")
            folder = stage
        else:
            runtime.say(args, f"== {_command(name)}")
            status = protocol.main(registry.section(name).experiment, experiment_argv(args, name))
            if status:
                print(f"error: {_command(name)} ended with status {status}; no report written", file=sys.stderr)
                return status
            folder = stage
        path = folder / outputs.RESULTS
        try:
            sections[name] = json.loads(path.read_text())
            if not isinstance(sections[name], dict) or "verdict" not in sections[name]:
                raise ValueError(f"not the results of {_command(name)} (no verdict)")
            section(name, sections[name], args.out, folder)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            print(f"error: cannot read {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
        folders[name] = folder
        if folder == stage:
            staged.append(name)
    write_report(args.out, sections, args.quick, folders=folders, path=staging / "report.md")
    removed = [n for n in registry.REPORTED if n not in staged] if overwrite else []
    results.write_json(staging / _COMPLETE, {"staged": staged, "removed": removed})
    _swap_in(args.out)
    print(f"wrote {args.out / 'report.md'} ({time.perf_counter() - _START:.0f} s)")
    return 0


def _swap_in(out: Path) -> None:
    """Move a finished staging folder's experiments and report.md into ``out``, replacing the previous ones.

    Signals wait until it is done; after a ``kill -9`` midway, running it again (every report run does, when
    the staging folder says it is complete) finishes it: every step is a rename that is skipped once done.
    """
    staging = out / STAGING
    plan = json.loads((staging / _COMPLETE).read_text())
    old = staging / ".old"
    blocked = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        old.mkdir(exist_ok=True)
        for name in [*plan["staged"], *plan["removed"]]:
            if (out / name).exists() and (name in plan["removed"] or (staging / name).exists()):
                shutil.rmtree(old / name, ignore_errors=True)
                os.rename(out / name, old / name)
            if name in plan["staged"] and (staging / name).exists():
                os.rename(staging / name, out / name)
        if (staging / "report.md").exists():
            os.replace(staging / "report.md", out / "report.md")
        trash = out / f".trash-{os.getpid()}"
        os.rename(staging, trash)  # one step: the staging folder is gone, whole
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
    shutil.rmtree(trash, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
