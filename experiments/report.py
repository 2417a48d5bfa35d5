"""What Batch Normalization does, measured: the four experiments behind the book's claims, in one report.

Runs ``experiments.learning_rate`` (claim 1), ``experiments.init`` (claim 2), ``experiments.overfitting``
(claim 3) and ``experiments.activations`` (the premise) at their defaults, each into its own folder under
``--out``, or reads the results already there (``--reuse``), and writes ``report.md`` with every figure and
verdict.

    python -m experiments.report                       # a few minutes on a laptop CPU
    python -m experiments.report --reuse --out runs/report-20261129-230000
    python -m experiments.report --quick               # tiny configurations: checks the pipeline in seconds
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path

from bnjax import options
from bnjax.data import SOURCES as DATA_SOURCES
from experiments import harness

_START = time.perf_counter()

# name -> (section title, what it answers)
EXPERIMENTS = {
    "learning_rate": ("Claim 1: larger learning rates",
                      "Final training accuracy of the book's network against the learning rate, and the loss "
                      "change along one gradient step of growing size (Bjorck et al.'s probe)."),
    "init": ("Claim 2: less dependence on the initial weights",
             "The book's 16 weight scales over several seeds: mean accuracy with 95 % intervals, paired wins "
             "and the range of scales that train."),
    "overfitting": ("Claim 3: less overfitting",
                    "The book's ch. 6.4 setting (300 training images, a 7-layer net): training against held-out "
                    "accuracy, with and without BN, weight decay and dropout."),
    "activations": ("The premise: the spread of each layer's activations",
                    "The book's ch. 6.2 histograms with and without BN, then the same statistics inside the "
                    "trained networks of the book's sweep."),
}

# Tiny configurations for --quick (CI and the notebook's smoke run): the pipeline, not the science.
QUICK = {
    "learning_rate": ["--lrs", "0.01,1", "--epochs", "3", "--num-seeds", "2", "--train-size", "200",
                      "--probe-steps", "4"],
    "init": ["--scales", "0.1,0.01", "--epochs", "3", "--num-seeds", "2", "--train-size", "200"],
    "overfitting": ["--train-size", "100", "--epochs", "7", "--record-every", "3", "--num-seeds", "2"],
    "activations": ["--train-size", "200", "--epochs", "2", "--num-scales", "3"],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.report",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done, 1 an experiment could not run (data or backend), 2 bad option, "
               "130/143 interrupted.",
    )
    p.add_argument("--out", type=harness.out_dir, metavar="DIR",
                   help="report folder; each experiment writes into DIR/<name> (default: runs/report-<date>-<time>)")
    p.add_argument("--reuse", action="store_true",
                   help="read DIR/<name>/results.json where it exists instead of running the experiment again")
    p.add_argument("--only", metavar="NAME,...", type=_names, default=tuple(EXPERIMENTS),
                   help=f"a subset of {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny configurations (a check of the pipeline, not results)")
    p.add_argument("--seed", type=harness.int_in(0, options.MAX_SEED), default=0,
                   help="first training seed of every experiment (default: 0)")
    p.add_argument("--data", choices=DATA_SOURCES, default="auto", help="as for every experiment (default: auto)")
    p.add_argument("--data-dir", type=Path, metavar="DIR", help="directory holding the MNIST idx files (or tfds data)")
    p.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    p.add_argument("--cpu-devices", type=harness.int_in(1, 256), metavar="N", help="as for every experiment")
    p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    return p


def _names(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.replace(" ", "").split(",") if n)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected names from {', '.join(EXPERIMENTS)}, got {text!r}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.out is None:
        args.out = harness.default_out("report")
    try:
        harness.check_writable(args.out)
    except OSError as err:
        parser.error(f"--out: {err}")
    return args


def experiment_argv(args: argparse.Namespace, name: str) -> list[str]:
    """The command line the report gives one experiment."""
    argv = ["--out", str(args.out / name), "--seed", str(args.seed), "--data", args.data]
    if args.data_dir is not None:
        argv += ["--data-dir", str(args.data_dir)]
    for flag in ("no_cache", "quiet"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    if args.cpu_devices is not None:
        argv += ["--cpu-devices", str(args.cpu_devices)]
    return argv + (QUICK[name] if args.quick else [])


def section(name: str, results: dict, out: Path) -> str:
    """One experiment's part of the report: title, what it answers, figures (linked relative to ``out``, the
    report's folder; those not written are left out), its verdict."""
    module = importlib.import_module(f"experiments.{name}")
    title, what = EXPERIMENTS[name]
    figures = [f for f in module.FIGURES if (out / name / f).exists()]
    env = results.get("environment", {})
    timing = results.get("timing", {})
    provenance = (f"`python -m experiments.{name}`: {results.get('data', {}).get('name', '?')} data, "
                  f"{env.get('backend', '?')} x{env.get('device_count', '?')}, "
                  f"{timing.get('total_s', float('nan')):.0f} s.")
    parts = [f"## {title}", "", what, "", provenance, ""]
    parts += [f"![{f}]({name}/{f})" for f in figures]
    parts += ["", module.report(results), ""]
    return "\n".join(parts)


def write_report(out: Path, results: dict[str, dict], quick: bool) -> Path:
    first = next(iter(results.values()))
    env = first.get("environment", {})
    head = ["# What Batch Normalization does, measured", "",
            "The claims of *Deep Learning from Scratch* ch. 6.3 (batch norm allows larger learning rates, makes "
            "training far less dependent on the initial weights, and reduces overfitting), each measured over "
            "seeds by one run of bnjax's grid engine. Every number below is computed from the results.json "
            "beside its figures.", "",
            f"Written {datetime.now():%Y-%m-%d %H:%M} with jax {env.get('jax', '?')} on {env.get('backend', '?')} "
            f"({env.get('device_kind', '?')})." + (" **Quick configurations: a pipeline check, not results.**"
                                                    if quick else ""), ""]
    body = [section(name, res, out) for name, res in results.items()]
    return harness.atomic_write_text(out / "report.md", "\n".join(head + body))


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    for name in args.only:
        path = args.out / name / "results.json"
        if not (args.reuse and path.exists()):
            harness.say(args, f"== experiments.{name}")
            module = importlib.import_module(f"experiments.{name}")
            status = module.main(experiment_argv(args, name))
            if status:
                print(f"error: experiments.{name} ended with status {status}; no report written", file=sys.stderr)
                return status
        try:
            results[name] = json.loads(path.read_text())
            if not isinstance(results[name], dict) or "verdict" not in results[name]:
                raise ValueError(f"not the results of experiments.{name} (no verdict)")
            section(name, results[name], args.out)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
            print(f"error: cannot read {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    report = write_report(args.out, results, args.quick)
    print(f"wrote {report} ({time.perf_counter() - _START:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(harness.main_wrapper(main))
