"""What Batch Normalization does, measured: the four experiments behind the book's claims, in one report.

Runs the experiments ``experiments/registry.py`` marks for the report (``learning_rate``: claim 1, ``init``:
claim 2, ``overfitting``: claim 3, ``activations``: the premise) at their defaults, each into its own folder
under ``--out``, or reads the results already there (``--reuse``), and writes ``report.md`` with every figure and
verdict.

    python -m experiments.report                       # a few minutes on a laptop CPU
    python -m experiments.report --reuse --out runs/report-20261129-230000
    python -m experiments.report --quick               # tiny configurations: checks the pipeline in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from bnjax import options
from bnjax.data import SOURCES as DATA_SOURCES
from experiments import cli, protocol, registry, results, runtime

_START = time.perf_counter()


def build_parser() -> argparse.ArgumentParser:
    """The report's parser.

    Returns:
      The ``argparse.ArgumentParser`` of ``python -m experiments.report``.
    """
    p = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done, 1 an experiment could not run (data or backend), 2 bad option, "
               "130/143 interrupted.",
    )
    p.add_argument("--out", type=cli.out_dir, metavar="DIR",
                   help="report folder; each experiment writes into DIR/<name> (default: runs/report-<date>-<time>)")
    p.add_argument("--reuse", action="store_true",
                   help="read DIR/<name>/results.json where it exists instead of running the experiment again")
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
    return names


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the report's options.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      The options, with ``out`` filled in and proven writable.

    Raises:
      SystemExit: status 2 naming the option for a bad value.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.out is None:
        args.out = cli.default_out("report")
    try:
        cli.check_writable(args.out)
    except OSError as err:
        parser.error(f"--out: {err}")
    return args


def experiment_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The command line the report gives one experiment.

    Args:
      args: the report's options.
      name: the experiment.

    Returns:
      Its arguments: the output folder, seed, data and process options, and with ``--quick`` its ``quick``
      options last.
    """
    argv = ["--out", str(args.out / name), "--seed", str(args.seed), "--data", args.data]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    for flag in ("no_cache", "quiet"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.cpu_devices is not None:
        argv += ["--cpu-devices", str(args.cpu_devices)]
    return argv + (list(registry.experiment(name).quick) if args.quick else [])


def section(name: str, results: dict, out: Path) -> str:
    """One experiment's part of the report.

    Args:
      name: the experiment.
      results: its results.json, read back.
      out: the report's folder (figures are linked relative to it; those not written are left out).

    Returns:
      Markdown: title, what it answers, provenance, figures, and the experiment's own rendering of its verdict.
    """
    experiment = registry.experiment(name)
    figures = [f for f in experiment.figure_files if (out / name / f).exists()]
    env = results.get("environment", {})
    timing = results.get("timing", {})
    provenance = (f"`python -m experiments.{name}`: {results.get('data', {}).get('name', '?')} data, "
                  f"{env.get('backend', '?')} x{env.get('device_count', '?')}, "
                  f"{timing.get('total_s', float('nan')):.0f} s.")
    parts = [f"## {experiment.title}", "", experiment.question, "", provenance, ""]
    parts += [f"![{f}]({name}/{f})" for f in figures]
    parts += ["", experiment.render(results), ""]
    return "\n".join(parts)


def write_report(out: Path, sections: dict[str, dict], quick: bool) -> Path:
    """Write ``report.md``.

    Args:
      out: the report's folder.
      sections: experiment name -> its results, in the report's order.
      quick: the results are quick configurations (said at the top).

    Returns:
      The path of ``report.md``.
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
    body = [section(name, res, out) for name, res in sections.items()]
    return results.atomic_write_text(out / "report.md", "\n".join(head + body))


def main(argv=None) -> int:
    """``python -m experiments.report``: run (or ``--reuse``) each experiment, then write ``report.md``.

    Args:
      argv: the arguments (``None``: ``sys.argv[1:]``).

    Returns:
      0 when written; an experiment's non-zero status, or 1 when a results file cannot be read.
    """
    args = parse_args(argv)
    sections = {}
    for name in args.only:
        path = args.out / name / "results.json"
        if not (args.reuse and path.exists()):
            runtime.say(args, f"== experiments.{name}")
            status = protocol.main(registry.experiment(name), experiment_argv(args, name))
            if status:
                print(f"error: experiments.{name} ended with status {status}; no report written", file=sys.stderr)
                return status
        try:
            sections[name] = json.loads(path.read_text())
            if not isinstance(sections[name], dict) or "verdict" not in sections[name]:
                raise ValueError(f"not the results of experiments.{name} (no verdict)")
            section(name, sections[name], args.out)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            print(f"error: cannot read {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    report = write_report(args.out, sections, args.quick)
    print(f"wrote {report} ({time.perf_counter() - _START:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
