"""The command line every experiment shares: argparse types, the parser, the common options and their checks,
usage errors, and the output folders' checks at parse time (``experiments.outputs`` holds their contract).

Nothing here imports JAX, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Callable

from bnjax import options
from bnjax.data import SOURCES as DATA_SOURCES  # bnjax.data imports no jax
from bnjax.files import atomic_file
from experiments import outputs

__all__ = ["MAX_RECORDS", "MAX_SIZE", "FLOAT32_TINY", "FLOAT32_MAX", "EXIT_STATUS", "int_in", "positive_float",
           "float_in", "out_dir", "float_list", "new_parser", "add_scale_args", "add_epochs_arg", "add_common_args",
           "check_common_args", "usage_error", "default_out", "is_default_out", "check_writable", "check_out",
           "remove_empty_outputs"]


# Sizes beyond these are typing mistakes, not experiments (a 1e9-record run would never end).
MAX_RECORDS = 100_000
MAX_SIZE = 10_000_000


# --------------------------------------------------------------------------------------------------
# Option parsing
# --------------------------------------------------------------------------------------------------


def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``.

    Args:
      minimum: the smallest value accepted.
      maximum: the largest, or ``None`` for no upper end.

    Returns:
      A function from the option's text to the integer; it raises ``argparse.ArgumentTypeError`` (exit 2,
      naming the option) for anything else.
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


# float32's normal range: hyper-parameters are float32 on the devices (a bf16 or float16 model's weight scales
# are checked again against its dtype by GridConfig.validate), so 1e-320 would silently become 0 and 1e308 inf.
FLOAT32_TINY = 1.1754944e-38
FLOAT32_MAX = 3.4028235e38


def positive_float(text: str) -> float:
    """An argparse type: a finite number > 0 within float32's normal range.

    Args:
      text: the option's text.

    Returns:
      The number.

    Raises:
      argparse.ArgumentTypeError: not a number, not finite, not > 0, or outside float32's range.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    if not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must lie in float32's range {FLOAT32_TINY:.3g}..{FLOAT32_MAX:.3g}, got {text}")
    return value


def float_in(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False,
             float32: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (ends open on request, ``high=None``: no upper end);
    with ``float32``, a non-zero value must also lie in float32's normal range (see ``positive_float``).

    Args:
      low, high: the interval's ends (``high=None``: none).
      open_low, open_high: leave that end out of the interval.
      float32: also require float32's normal range for a non-zero value.

    Returns:
      A function from the option's text to the number (``-0`` becomes ``0``); it raises
      ``argparse.ArgumentTypeError`` for anything else.
    """
    if high is None:
        interval = f"> {low:g}" if open_low else f">= {low:g}"
    else:
        interval = f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {interval}, got {text!r}") from None
        inside = (value > low if open_low else value >= low) and (
            high is None or (value < high if open_high else value <= high))
        if not math.isfinite(value) or not inside:  # NaN fails the comparisons too
            raise argparse.ArgumentTypeError(f"must be a finite number {interval}, got {text}")
        if float32 and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
            raise argparse.ArgumentTypeError(f"must be 0 or within float32's range {FLOAT32_TINY:.3g}.."
                                             f"{FLOAT32_MAX:.3g}, got {text}")
        return abs(value) if value == 0 else value  # -0 -> 0

    return parse


def out_dir(text: str) -> Path:
    """An argparse type: a non-empty output directory (an empty string would mean the current directory).

    Args:
      text: the option's text.

    Returns:
      The path.

    Raises:
      argparse.ArgumentTypeError: an empty (or blank) string.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return Path(text)


def float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated distinct positive numbers (each as ``positive_float``).

    Args:
      text: the option's text, e.g. ``"0.1,0.01"``.

    Returns:
      The numbers, in the order given.

    Raises:
      argparse.ArgumentTypeError: no number, one that ``positive_float`` refuses, or one given twice (every
        list option refuses repeats: a repeated value would train the same models twice).
    """
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    values = tuple(positive_float(p) for p in parts)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"each value must appear once, got {', '.join(f'{v:g}' for v in repeated)} "
                                         f"more than once in {text!r}")
    return values


EXIT_STATUS = "Exit status: 0 done, 1 data or backend unavailable, 2 bad option, 130/143 interrupted."


def new_parser(name: str, doc: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.<name>``.

    Args:
      name: the experiment's module name.
      doc: its module docstring; the first two paragraphs (what it does, how to call it) are the description.
      epilog: text shown after the options, followed by the exit statuses.

    Returns:
      An ``argparse.ArgumentParser`` with no option yet.
    """
    return argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description="\n\n".join(doc.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{epilog.strip()} {EXIT_STATUS}".strip(),
    )


def add_scale_args(group, *, explicit: bool = True) -> None:
    """Add ``--num-scales N`` (the book's ``logspace(0, -4, N)``) or, with ``explicit``, ``--scales W1,W2,...``.

    Args:
      group: the parser or argument group to add them to.
      explicit: also offer ``--scales`` (mutually exclusive with ``--num-scales``).
    """
    if explicit:
        group = group.add_mutually_exclusive_group()
    group.add_argument("--num-scales", type=int_in(1, 4096), default=16, metavar="N",
                       help="N weight-init scales logspace(0, -4, N), 1.0 down to 1e-4 (default: 16)")
    if explicit:
        group.add_argument("--scales", type=float_list, metavar="W1,W2,...",
                           help="explicit weight-init scales instead of --num-scales")


def add_epochs_arg(group, *, minimum: int = 1) -> None:
    """Add ``--epochs``: the book's records of training accuracy (20, i.e. 191 updates of 100 of 1000 images).

    Args:
      group: the parser or argument group to add it to.
      minimum: the fewest records accepted.
    """
    group.add_argument("--epochs", type=int_in(minimum, MAX_RECORDS), default=20,
                       help="records of training accuracy; the first after one update, then one every "
                            "train-size/batch-size updates (default: 20, i.e. 191 updates)")


# The hidden Affine widths of each network kind as the book builds it: MultiLayerNetExtend's five of 100
# (ch. 6) and SimpleConvNet's one of 100 after its convolution and pooling (ch. 7).
BOOK_HIDDEN_SIZES = {"mlp": (100,) * 5, "convnet": (100,)}


def add_model_arg(group) -> None:
    """Add ``--model``: the book's MLP (ch. 6) or its SimpleConvNet (ch. 7), with the same arms and protocol.

    Args:
      group: the parser or argument group to add it to.
    """
    group.add_argument("--model", choices=options.MODELS, default="mlp",
                       help="the network: 'mlp', the book's 784-100x5-10 net of ch. 6, or 'convnet', its ch. 7 "
                            "SimpleConvNet (conv 30 5x5, ReLU, 2x2 max pool, Affine 100, ReLU, Affine 10; a norm "
                            "arm normalises after the conv, per channel, and after the hidden Affine) "
                            "(default: mlp)")


def network_title(args: argparse.Namespace) -> str:
    """What a figure's title says of the network: nothing for the book's MLP, ``'SimpleConvNet: '`` for the conv net.

    Args:
      args: the parsed options (``model``; absent means the MLP).

    Returns:
      the prefix.
    """
    return "SimpleConvNet: " if getattr(args, "model", "mlp") == "convnet" else ""


def network_fields(args: argparse.Namespace) -> dict:
    """The ``GridConfig`` fields ``--model`` sets: the kind and the book's hidden widths for it.

    Args:
      args: the parsed options (``model``).

    Returns:
      ``{"model": ..., "hidden_sizes": ...}``.
    """
    kind = getattr(args, "model", "mlp")
    return {"model": kind, "hidden_sizes": BOOK_HIDDEN_SIZES[kind]}


def add_book_protocol(p: argparse.ArgumentParser):
    """Add the book's protocol as options: weight scales, ``--epochs``, ``--batch-size``, ``--lr``.

    Args:
      p: the parser.

    Returns:
      the argument group, for an experiment's own protocol options.
    """
    g = p.add_argument_group("protocol (defaults: the book's)")
    add_scale_args(g)
    add_epochs_arg(g)
    g.add_argument("--batch-size", type=int_in(1, 100_000), default=100,
                   help="mini-batch size, drawn with replacement (default: 100)")
    g.add_argument("--lr", type=positive_float, default=0.01, help="learning rate (default: 0.01)")
    return g


def add_common_args(p: argparse.ArgumentParser, *, train_size: int = 1000, num_seeds: int = 1) -> None:
    """Add the options every experiment has: randomness, data, output, devices and processes.

    Args:
      p: the parser.
      train_size: the experiment's default ``--train-size``.
      num_seeds: its default ``--num-seeds``.
    """
    r = p.add_argument_group("randomness")
    r.add_argument("--seed", type=int_in(0, options.MAX_SEED), default=0,
                   help="first training seed: initial weights, mini-batches, dropout (default: 0)")
    r.add_argument("--num-seeds", type=int_in(1, 1_000_000), default=num_seeds,
                   help=f"seeds trained in parallel; seed i of a run equals a run with --seed SEED+i "
                        f"(default: {num_seeds})")
    r.add_argument("--split-seed", type=int_in(0, options.MAX_SEED), default=0,
                   help="how the bundled subset is split into training and held-out images, the same for every "
                        "training seed (default: 0)")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATA_SOURCES, default="auto",
                   help="auto: full MNIST if already on disk, else the bundled 5k subset (never downloads); "
                        "bundled; mnist: idx files (downloaded once, or from --data-dir); tfds (default: auto)")
    d.add_argument("--data-dir", type=Path, metavar="DIR", help="directory holding the MNIST idx files (or tfds data)")
    d.add_argument("--train-size", type=int_in(1, MAX_SIZE), default=train_size,
                   help=f"training images (default: {train_size})")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=out_dir, metavar="DIR",
                   help="output directory (default: runs/<name>-<date>-<time>); one that already holds a run's files "
                        "is refused unless --overwrite or --resume")
    add_out_mode_args(o)
    o.add_argument("--quiet", action="store_true", help="no progress bar or table; print only the output directory")
    o.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    o.add_argument("--no-plot", action="store_true", help="write results.json only, no figure")
    x = p.add_argument_group("devices and processes")
    x.add_argument("--cpu-devices", type=int_in(1, 256), metavar="N",
                   help="on CPU, split the models over N host devices (XLA_FLAGS); default: the number of CPU "
                        "cores, at most 8. Ignored on GPU/TPU and when XLA_FLAGS already sets a device count. "
                        "(GPU autotuning is also turned off unless XLA_FLAGS sets it: it cost ~8 s of "
                        "compile for no run-time gain on an H200)")
    x.add_argument("--max-models-per-chunk", type=int_in(1), metavar="N",
                   help="train at most N models at once; larger grids run as consecutive chunks "
                        "(default: as many as fit in about 1 GiB)")
    x.add_argument("--coordinator", metavar="HOST:PORT",
                   help="run on several machines: the address of process 0 (jax.distributed); run the same "
                        "command on every machine with its own --process-id. Not needed on a TPU pod slice")
    x.add_argument("--num-processes", type=int_in(1, 65_536), metavar="N", help="processes in all (with --coordinator)")
    x.add_argument("--process-id", type=int_in(0, 65_535), metavar="I", help="this process, 0..N-1 (with --coordinator)")


def add_out_mode_args(group) -> None:
    """Add ``--overwrite`` and ``--resume`` (mutually exclusive): what to do with an output folder that already
    holds a run's files.

    Args:
      group: the parser or argument group to add them to.
    """
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true",
                      help="remove the files of the run already in --out (results, figures, chunks), then run")
    mode.add_argument("--resume", action="store_true",
                      help="continue the interrupted run in --out: its finished chunks are kept, the rest is "
                           "computed (same options needed; the results equal an uninterrupted run's)")


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str,
                      num_heldout: int = 0, figures: tuple[str, ...] = ()) -> argparse.Namespace:
    """The cross-option checks of the common options, and the default output directory.

    Args:
      parser: the parser (its ``error`` exits 2 naming the option).
      args: the parsed options; ``args.out`` is filled in when not given.
      name: the experiment's name, for the default ``runs/<name>-<date>-<time>``.
      num_heldout: held-out images the experiment takes from the data beside ``--train-size``.
      figures: the experiment's figure file names (a run's files, for the output-folder checks).

    Returns:
      ``args``, checked. Process 0 has proven that ``args.out`` is writable and may be used as asked (it is
      created only later, by ``outputs.claim``).

    Raises:
      SystemExit: status 2 with a message naming the option.
    """
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.data_dir is not None and args.data == "bundled":
        parser.error("--data-dir has no effect with --data bundled")
    if args.data == "bundled" and args.train_size + num_heldout > 5000:
        parser.error("--train-size plus held-out images exceed the 5000 images of the bundled subset")
    if args.seed + args.num_seeds - 1 > options.MAX_SEED:
        parser.error(f"--seed {args.seed} with --num-seeds {args.num_seeds} reaches seed "
                     f"{args.seed + args.num_seeds - 1}; seeds must stay <= {options.MAX_SEED}")
    given = [args.coordinator is not None, args.num_processes is not None, args.process_id is not None]
    if any(given) and not all(given):
        parser.error("--coordinator, --num-processes and --process-id go together")
    if all(given):
        if args.process_id >= args.num_processes:
            parser.error(f"--process-id {args.process_id} must be < --num-processes {args.num_processes}")
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            parser.error(f"--coordinator must be HOST:PORT, got {args.coordinator!r}")
    if args.resume and args.coordinator is not None:
        parser.error("--resume runs in one process only (not with --coordinator): the other processes cannot "
                     "read process 0's chunk files")
    if args.out is None:
        args.out = default_out(name)
    if args.process_id in (None, 0) and os.environ.get("TPU_WORKER_ID", "0") == "0":  # process 0 alone writes
        check_out(parser, args, figures)
    return args


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace, figures: tuple[str, ...] = ()) -> None:
    """Check ``args.out`` at parse time: writable, not in use, and usable as ``--overwrite``/``--resume`` ask.

    Args:
      parser: the parser (its ``error`` exits 2).
      args: the parsed options (``out``, ``overwrite``, ``resume``).
      figures: the experiment's figure file names.

    Raises:
      SystemExit: status 2 naming ``--out`` (a folder refused or in use: one line, without the usage).
    """
    try:
        check_writable(args.out)
    except OSError as err:
        parser.error(f"--out: {err}")
    if not is_default_out(args.out):
        try:
            outputs.check_folder(args.out, overwrite=args.overwrite, resume=args.resume, figures=figures)
        except outputs.OutputError as err:
            usage_error(str(err))


# Default output folders chosen by this process: ``outputs.claim`` creates them, taking the next free name if
# another run took the name first.
_DEFAULTS: set[Path] = set()


def default_out(name: str) -> Path:
    """A fresh output folder ``runs/<name>-<date>-<time>`` (created later, by ``outputs.claim``).

    Args:
      name: the experiment's name.

    Returns:
      The folder, with ``-2``, ``-3``, ... appended when it exists already (two runs never share a folder:
      ``outputs.claim`` creates it atomically, moving on to the next name if another run was first).
    """
    base = Path("runs") / datetime.now().strftime(f"{name}-%Y%m%d-%H%M%S")
    candidate = base
    for i in range(2, 1000):
        if not candidate.exists():
            break
        candidate = base.with_name(f"{base.name}-{i}")
    _DEFAULTS.add(candidate)
    return candidate


def is_default_out(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a default output folder this process chose (``default_out``).

    Args:
      folder: an output folder.

    Returns:
      ``True`` for a folder ``default_out`` returned.
    """
    return Path(folder) in _DEFAULTS


def check_writable(directory: str | os.PathLike) -> Path:
    """Prove a file can be written in ``directory``, leaving nothing behind.

    The folder and its missing parents are created for the test and removed again at once: a folder is
    created for good only when the run has started (``outputs.claim``), so a run that dies before (a garbage
    ``XLA_FLAGS`` ends the process from C++) leaves none.

    Args:
      directory: the output folder.

    Returns:
      The folder as a ``Path``.

    Raises:
      OSError: with a one-line message naming the folder, when it cannot be created or written.
    """
    directory = Path(directory)
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / ".write-test", "w"):
            pass
        os.unlink(directory / ".write-test")
    except OSError as err:
        raise OSError(f"cannot write to output directory {directory}: {err.strerror or err}") from err
    finally:
        for d in missing:  # deepest first
            try:
                d.rmdir()
            except OSError:
                pass
    return directory


def remove_empty_outputs() -> None:
    """Release this process's output-folder locks and remove the folders it created that are still empty
    (``outputs.release_all``)."""
    outputs.release_all()


def usage_error(message: str) -> None:
    """Exit 2 with ``message`` (which names the option), as argparse does for the checks it can make itself.

    Args:
      message: the error, printed after ``error:`` on stderr.

    Raises:
      SystemExit: always, status 2.
    """
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)

