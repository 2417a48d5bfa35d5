"""The layer every experiment shares: option parsing and checks, start-up (XLA flags, several processes,
compilation cache), data loading, progress, the results record, atomic writes and interrupts.

A convention or a fix made here lands in every ``python -m experiments.<name>`` at once. Nothing here imports
JAX at module level, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from bnjax import options
from bnjax._files import atomic_file, atomic_write_text
from bnjax.data import SOURCES as DATA_SOURCES  # bnjax.data imports no jax

__all__ = ["atomic_file", "atomic_write_text", "write_json", "int_in", "positive_float", "float_list",
           "add_common_args", "check_common_args", "start", "say", "run_engine", "finish", "prefetch", "finish_prefetch", "load_data", "Progress", "results_record",
           "environment", "main_wrapper"]

# Sizes beyond these are typing mistakes, not experiments (a 1e9-record run would never end).
MAX_RECORDS = 100_000
MAX_SIZE = 10_000_000


# --------------------------------------------------------------------------------------------------
# Option parsing
# --------------------------------------------------------------------------------------------------


def int_in(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``."""

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
    with ``float32``, a non-zero value must also lie in float32's normal range (see ``positive_float``)."""
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
    """An argparse type: a non-empty output directory (an empty string would mean the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a directory, got an empty string")
    return Path(text)


def float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated positive numbers."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    return tuple(positive_float(p) for p in parts)


EXIT_STATUS = "Exit status: 0 done, 1 data or backend unavailable, 2 bad option, 130/143 interrupted."


def new_parser(name: str, doc: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``python -m experiments.<name>``: the module docstring's first two paragraphs (what it
    does, how to call it) as the description, ``epilog`` and the exit statuses after the options."""
    return argparse.ArgumentParser(
        prog=f"python -m experiments.{name}",
        description="\n\n".join(doc.split("\n\n")[:2]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{epilog.strip()} {EXIT_STATUS}".strip(),
    )


def add_scale_args(group, *, explicit: bool = True) -> None:
    """``--num-scales N`` (the book's ``logspace(0, -4, N)``) or, with ``explicit``, ``--scales W1,W2,...``."""
    if explicit:
        group = group.add_mutually_exclusive_group()
    group.add_argument("--num-scales", type=int_in(1, 4096), default=16, metavar="N",
                       help="N weight-init scales logspace(0, -4, N), 1.0 down to 1e-4 (default: 16)")
    if explicit:
        group.add_argument("--scales", type=float_list, metavar="W1,W2,...",
                           help="explicit weight-init scales instead of --num-scales")


def add_epochs_arg(group, *, minimum: int = 1) -> None:
    """``--epochs``: the book's records of training accuracy (20, i.e. 191 updates of 100 of 1000 images)."""
    group.add_argument("--epochs", type=int_in(minimum, MAX_RECORDS), default=20,
                       help="records of training accuracy; the first after one update, then one every "
                            "train-size/batch-size updates (default: 20, i.e. 191 updates)")


def add_common_args(p: argparse.ArgumentParser, *, train_size: int = 1000, num_seeds: int = 1) -> None:
    """Options every experiment has: randomness, data, output, devices and processes (``train_size`` and
    ``num_seeds`` are the experiment's defaults)."""
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
    o.add_argument("--out", type=out_dir, metavar="DIR", help="output directory (default: runs/<name>-<date>-<time>)")
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


def check_common_args(parser: argparse.ArgumentParser, args: argparse.Namespace, name: str,
                      num_heldout: int = 0) -> argparse.Namespace:
    """Cross-option checks (exit 2 naming the option) and the default output directory."""
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
    if args.out is None:
        args.out = default_out(name)
    if args.process_id in (None, 0):
        try:
            check_writable(args.out)
        except OSError as err:
            parser.error(f"--out: {err}")
    return args


# Output directories this process created: removed again at exit while still empty (a run that fails after
# parsing leaves nothing behind).
_CREATED: list[Path] = []


def default_out(name: str) -> Path:
    """``runs/<name>-<date>-<time>``, with ``-2``, ``-3``, ... when a run started in the same second already
    claimed it (two runs must never share a folder)."""
    base = Path("runs") / datetime.now().strftime(f"{name}-%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        candidate = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()  # atomic: exactly one process creates it
        except FileExistsError:
            continue
        except OSError:
            return candidate  # check_writable reports the problem
        _CREATED.append(candidate)
        return candidate
    return base


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` and prove a file can be written there; raise ``OSError`` with a clear message.

    Directories created here are removed again at exit if nothing was written into them."""
    directory = Path(directory)
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _CREATED.extend(missing)
        with atomic_file(directory / ".write-test", "w"):
            pass
        os.unlink(directory / ".write-test")
    except OSError as err:
        remove_empty_outputs()
        raise OSError(f"cannot write to output directory {directory}: {err.strerror or err}") from err
    return directory


def remove_empty_outputs() -> None:
    """Remove the directories ``check_writable`` created that are still empty, deepest first."""
    # Deepest first: a report's folder holds the folders of the experiments it ran.
    _CREATED.sort(key=lambda d: len(Path(d).absolute().parts), reverse=True)
    while _CREATED:
        directory = _CREATED.pop(0)
        try:
            directory.rmdir()  # only succeeds when empty
        except OSError:
            pass


# --------------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------------


def set_xla_flags(cpu_devices: int | None = None) -> None:
    """Defaults for XLA_FLAGS, set before jax loads; flags the user already set win.

    * One host device per CPU core (at most 8), so a CPU run splits the models over cores (2-core machine:
      run 5.0 s -> 3.9 s). Only the CPU platform reads it.
    * No GPU gemm autotuning: on an H200 it cost 10.2 s of compile against 2.5 s without, for the same run
      time (0.21 vs 0.19 s). Only GPUs read it.
    """
    if "jax" in sys.modules:  # too late: XLA reads the flags once
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = []
    if "xla_force_host_platform_device_count" not in flags:
        extra.append(f"--xla_force_host_platform_device_count={cpu_devices or min(os.cpu_count() or 1, 8)}")
    if "xla_gpu_autotune_level" not in flags:
        extra.append("--xla_gpu_autotune_level=0")
    os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _tpu_pod_slice() -> bool:
    # A multi-host TPU slice lists its workers here; jax.distributed.initialize() then needs no arguments.
    return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def start(args: argparse.Namespace, *, x64: bool = False) -> dict:
    """XLA flags, then (with --coordinator, or on a TPU pod slice) ``jax.distributed.initialize``, float64 if
    asked, and the compilation cache. Returns ``{'cache_dir', 'is_main', 'import_s'}``."""
    t0 = time.perf_counter()
    set_xla_flags(getattr(args, "cpu_devices", None))
    import jax

    if getattr(args, "coordinator", None):
        jax.distributed.initialize(args.coordinator, num_processes=args.num_processes, process_id=args.process_id)
    elif _tpu_pod_slice():
        jax.distributed.initialize()
    if x64:
        jax.config.update("jax_enable_x64", True)
    check_backend()
    cache_dir = None if getattr(args, "no_cache", False) else enable_compilation_cache()
    return {"cache_dir": cache_dir, "is_main": jax.process_index() == 0, "import_s": time.perf_counter() - t0}


def check_backend() -> None:
    """Exit 1 with one line if the backend JAX was asked for (``JAX_PLATFORMS``) cannot start here."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as err:
        import jaxlib

        asked = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or "default"
        # JAX raises a long RuntimeError for a missing libtpu and a bare AssertionError for a missing CUDA plugin.
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else "no plugin for it is installed"
        print(f"error: JAX backend {asked!r} is not available ({reason}); installed: jax {jax.__version__}, "
              f"jaxlib {jaxlib.__version__}. Unset JAX_PLATFORMS to run on what is installed (the CPU at least), "
              "or install the accelerator's JAX (e.g. pip install -U 'jax[cuda12]' or 'jax[tpu]')", file=sys.stderr)
        raise SystemExit(1) from None


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache (a warm second run skips most of the compile).

    Returns the directory, or ``None`` if this JAX cannot use it.
    """
    import jax

    if directory is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        directory = os.path.join(base, "bnjax", "jax-compilation-cache")
    try:
        os.makedirs(directory, exist_ok=True)
        _watch_cache(str(directory))
        jax.config.update("jax_compilation_cache_dir", str(directory))
        # Our programs compile in about a second: cache them all.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    except (OSError, AttributeError, KeyError):
        return None
    return str(directory)


_CACHE_WARNING = "Error reading persistent compilation cache entry for '"


def _watch_cache(directory: str) -> None:
    """Replace corrupt compilation-cache entries instead of warning about them on every run.

    JAX warns when an entry cannot be read, recompiles, and never overwrites the bad file. The warning names
    the program (``jit_record``): its entries are removed at once, so the fresh compile is stored in their place,
    and one line says so.
    """
    import warnings

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if _CACHE_WARNING not in text:
            return previous(message, category, filename, lineno, file, line)
        name = text.split(_CACHE_WARNING, 1)[1].split("'", 1)[0]
        removed = 0
        for entry in Path(directory).glob(f"{name}-*"):
            try:
                entry.unlink()
                removed += 1
            except OSError:
                pass
        print(f"note: replaced {removed} unreadable compilation-cache entr{'y' if removed == 1 else 'ies'} for "
              f"{name!r} in {directory}", file=sys.stderr)

    if getattr(warnings.showwarning, "_bnjax_cache_watch", False):
        return
    show._bnjax_cache_watch = True
    warnings.showwarning = show
    # Every occurrence must reach the hook (the default shows a warning once per code location).
    warnings.filterwarnings("always", message=_CACHE_WARNING)


_PREFETCH: list = []


def prefetch(*work: Callable[[], Any]) -> None:
    """Run ``work`` (slow imports) in a background thread: matplotlib's ~0.5 s import then overlaps the
    training, which runs in XLA's threads without holding the GIL. Call ``finish_prefetch()`` before using
    what it imports (a module half-imported by another thread is not safe to use)."""
    import threading

    def run():
        for fn in work:
            try:
                fn()
            except Exception:  # the main thread's own import will report any real problem
                pass

    thread = threading.Thread(target=run, name="bnjax-prefetch", daemon=True)
    thread.start()
    _PREFETCH.append(thread)


def finish_prefetch() -> None:
    """Wait for every ``prefetch`` to end."""
    while _PREFETCH:
        _PREFETCH.pop().join()


def load_data(args: argparse.Namespace, num_heldout: int):
    """The data the options name, or ``None`` after printing why not (the caller exits 1)."""
    from bnjax import data

    try:
        return data.load(args.data, args.train_size, num_heldout, data_dir=args.data_dir, split_seed=args.split_seed)
    except (data.DataUnavailableError, data.ChecksumError, ValueError) as err:
        if isinstance(err, ValueError) and "(--" in str(err):
            # A size the data cannot supply (e.g. --train-size 6000 with the 5,000 bundled images under --data
            # auto): an option error, exit 2 as the parser's own checks do.
            usage_error(f"{err}")
        print(f"error: could not load data ({args.data}): {err}", file=sys.stderr)
        return None


def load_timed(args: argparse.Namespace, num_heldout: int | None, *, need_heldout: bool = False):
    """``(dataset, seconds)`` for the options; exits 1 when the data cannot be had (``load_data`` said why), and 2
    when ``need_heldout`` and no held-out image is left (``num_heldout=None``: all the images not trained on)."""
    t0 = time.perf_counter()
    ds = load_data(args, num_heldout)
    if ds is None:
        raise SystemExit(1)
    if need_heldout and ds.x_heldout.shape[0] == 0:
        print(f"error: --train-size {args.train_size} leaves no held-out images in {ds.source['name']} MNIST",
              file=sys.stderr)
        raise SystemExit(2)
    return ds, time.perf_counter() - t0


def usage_error(message: str) -> None:
    """Exit 2 with ``message`` (which names the option), as argparse does for the checks it can make itself."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class Progress:
    """A tqdm bar over ``progress(done, total)`` calls, created at the first call (once compiled, so its rate
    is training alone); silent when ``enabled`` is false. ``prefetch`` holds callables run in the background
    from the first call on (after the compile, whose tracing would compete for the GIL)."""

    def __init__(self, enabled: bool, unit: str = "record", desc: str = "training", prefetch: tuple = ()):
        self.enabled, self.unit, self.desc, self.bar = enabled, unit, desc, None
        self.prefetch = tuple(prefetch)

    def __call__(self, done: int, total: int) -> None:
        if self.prefetch:
            prefetch(*self.prefetch)
            self.prefetch = ()
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=self.unit, desc=self.desc, leave=True)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(args: argparse.Namespace, *lines: str) -> None:
    """Print unless ``--quiet``."""
    if not args.quiet:
        for line in lines:
            print(line, flush=True)


# The options behind the engine's fields, for its error messages.
FIELD_OPTIONS = {"weight_scale": "--scales/--init-scale", "learning_rate": "--lr/--lrs", "weight_decay": "--weight-decay",
                 "batch_size": "--batch-size", "num_records": "--epochs", "dtype": "--dtype"}


def run_engine(args: argparse.Namespace, started: dict, config, dataset, *, name: str, what: str,
               heldout: bool = False, unit: str = "record"):
    """Run one grid with the house conventions: a one-line description, a chunk note, a progress bar (once
    compiled), matplotlib imported in the background meanwhile. Returns ``(GridResult, timing)``."""
    import jax

    from bnjax import grid

    quiet = args.quiet or not started["is_main"]
    num_train, input_size = dataset.x_train.shape
    try:
        config.validate()
    except ValueError as err:  # a combination of options the engine cannot run (e.g. a scale float16 rounds to 0)
        field = str(err).split(" ", 1)[0]
        usage_error(f"{FIELD_OPTIONS[field]}: {err}" if field in FIELD_OPTIONS else str(err))
    problem = memory_problem(config, input_size, num_train, dataset.x_heldout.shape[0] if heldout else 0)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    if not quiet:
        held = f" + {dataset.x_heldout.shape[0]} held-out" if heldout else ""
        print(f"bnjax {name}: {config.num_models} models ({what}), {grid.num_updates(config, num_train)} updates "
              f"each, on {dataset.source['name']} MNIST ({num_train} training images{held}), "
              f"{jax.default_backend()} x{jax.device_count()}"
              + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""), flush=True)
        layout = grid.plan_layout(config, jax.device_count(), input_size)
        if layout.num_chunks > 1:
            print(f"{layout.num_chunks} chunks of {layout.models_per_chunk(len(config.arms))} models, to bound memory",
                  flush=True)
        print("compiling...", flush=True)
    from experiments import plot

    progress = Progress(not quiet, unit=unit,
                        prefetch=() if getattr(args, "no_plot", False) or not started["is_main"] else (plot.pyplot,))
    held_data = (dataset.x_heldout, dataset.t_heldout) if heldout else (None, None)
    # Without a bar or a prefetch, no callback: the records then need no host sync one by one.
    callback = progress if (progress.enabled or progress.prefetch) else None
    try:
        result = grid.run_grid(config, dataset.x_train, dataset.t_train, *held_data, progress=callback)
    except Exception as err:  # XLA's out-of-memory errors have no class of their own
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        progress.close()
        print(f"error: out of device memory ({str(err).strip().splitlines()[0][:120]}); train fewer models at once "
              "with --max-models-per-chunk N, or use a smaller --batch-size", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        progress.close()
    return result, dict(result.timing, import_s=started["import_s"])


def available_memory() -> tuple[int, str]:
    """``(bytes, where)``: the first device's memory limit on an accelerator, else the host's available memory."""
    import jax

    from bnjax import grid

    limit = grid.device_memory_limit()
    if limit:
        return limit, f"{jax.devices()[0].device_kind} memory"
    return available_host_memory(), "available host memory"


def memory_problem(config, input_size: int, num_train: int, num_heldout: int) -> str | None:
    """A pre-flight estimate: the working memory of one chunk of models (parameters, optimizer state,
    activations, the data) and the host memory of the results, against what is available. Returns a one-line
    explanation with the options to change, or ``None`` when it fits."""
    import jax
    import numpy as np

    from bnjax import grid

    layout = grid.plan_layout(config, jax.device_count(), input_size)
    per_device = -(-layout.models_per_chunk(len(config.arms)) // (layout.mesh_shape[0] * layout.mesh_shape[1]))
    itemsize = np.dtype(jax.numpy.dtype(config.dtype)).itemsize
    data_bytes = (num_train + num_heldout) * (input_size * itemsize + 8)
    chunk = per_device * grid.bytes_per_model(config, input_size) + data_bytes
    metrics = 4 if num_heldout else 2
    host = config.num_models * config.num_records * metrics * 8
    limit, where = available_memory()
    if jax.devices()[0].platform == "cpu":  # the devices share the host's memory
        chunk *= layout.mesh_shape[0] * layout.mesh_shape[1]
        chunk += host
    elif host > available_host_memory():
        return (f"the results alone need about {host / 2**30:.1f} GiB of host memory: use fewer seeds, grid "
                "points or records (--num-seeds, scales, --epochs)")
    if chunk > limit:
        return (f"this run needs about {chunk / 2**30:.1f} GiB but {where} is {limit / 2**30:.1f} GiB: train fewer "
                "models at once (--max-models-per-chunk), or use a smaller --batch-size, fewer seeds (--num-seeds), "
                "grid points or records (--epochs)")
    return None


def available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def finish(args: argparse.Namespace, record: dict, figures: dict, lines: list[str], started_at: float) -> None:
    """Draw ``figures`` (file name -> function returning a matplotlib figure) unless ``--no-plot``, write
    ``results.json`` (``record``, with the total time added), print ``lines`` (unless ``--quiet``) and the list
    of files written. Every file is written atomically."""
    timing = record.setdefault("timing", {})
    written = []
    if figures and not getattr(args, "no_plot", False):
        t0 = time.perf_counter()
        finish_prefetch()
        from experiments import plot

        for file_name, draw in figures.items():
            plot.save(draw(), args.out / file_name)
            written.append(file_name)
        timing["plot_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - started_at
    write_json(args.out / "results.json", record)
    written.insert(0, "results.json")
    parts = [f"{label} {timing[key]:.2f} s" for key, label in (("compile_s", "compile"), ("run_s", "run"))
             if key in timing]
    say(args, "", *lines, "", ", ".join(parts + [f"total {timing['total_s']:.2f} s"]))
    print(f"wrote {', '.join(written)} to {args.out}")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """NumPy to lists; NaN and infinities (a diverged model's loss) to null, which strict JSON readers accept."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    describe = getattr(value, "describe", None)  # a norm value (bnjax.layers.Norm): its kind and fields
    if callable(describe):
        return _jsonable(describe())
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def environment(layout: dict | None = None) -> dict:
    import jax
    import jaxlib
    import optax

    devices = jax.devices()
    env = {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_count": len(devices),
        "device_kind": devices[0].device_kind,
        "processes": jax.process_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if layout is not None:
        env["devices_used"] = layout["devices_used"]
        env["layout"] = {k: layout[k] for k in ("mesh_shape", "num_chunks", "models_per_chunk", "padded_models")}
    return env


def results_record(args: argparse.Namespace, result, dataset, timing: dict, *, cache_dir: str | None = None,
                   **extra: Any) -> dict:
    """The results file every engine experiment writes: options, axes, arms, every metric per arm
    ``[seeds, *grid, records]``, divergence, data provenance, timing and environment, plus ``extra``."""
    grid = result.config
    record = {
        "config": vars(args),
        # Every setting of the engine (matmul precision, dtype, optimizer, records...), beside the options.
        "grid": {f.name: getattr(grid, f.name) for f in dataclasses.fields(grid) if f.name not in ("arms", "axes")},
        "arms": {name: arm._asdict() for name, arm in result.config.arms.items()},
        "axes": result.axes,
        "seeds": list(range(result.config.seed, result.config.seed + result.config.num_seeds)),
        "record_steps": result.record_steps,
    }
    if any(arm.batch_size is not None for arm in result.config.arms.values()):
        record["arm_record_steps"] = result.arm_record_steps
    record.update(result.metrics)
    record["diverged"] = result.diverged
    record.update(extra)
    record["data"] = dataset.source
    record["timing"] = timing
    record["environment"] = dict(environment(result.layout), compilation_cache=cache_dir)
    return record


# --------------------------------------------------------------------------------------------------
# Interrupts
# --------------------------------------------------------------------------------------------------


def main_wrapper(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main`` as a command: Ctrl-C or SIGTERM end in one line and status 130/143 (never 0).

    Temporary files are removed by the ``atomic_file`` blocks the interrupt unwinds through; then the process
    ends at once (``os._exit``), because a normal interpreter exit with device work still in flight can crash.
    """

    def on_term(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, on_term) if _main_thread() else None
    try:
        return main(argv)
    except KeyboardInterrupt:
        _hard_exit("\ninterrupted; no partial file was written", 130)
    except _Terminated:
        _hard_exit("terminated; no partial file was written", 143)
    except MemoryError:
        _hard_exit("error: out of host memory; use fewer models (--num-seeds, scales) or "
                   "--max-models-per-chunk, or a smaller --batch-size", 1)
    except BrokenPipeError:
        # The reader of our output went away (``| head``): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _hard_exit("", 1)
    except Exception as err:
        if "RESOURCE_EXHAUSTED" in str(err):  # XLA's out-of-memory has no class of its own
            _hard_exit(f"error: out of memory ({str(err).strip().splitlines()[0][:120]}); use smaller sizes or "
                       "--max-models-per-chunk", 1)
        raise
    finally:
        remove_empty_outputs()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 1  # not reached


def _hard_exit(message: str, status: int) -> None:
    remove_empty_outputs()
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class _Terminated(BaseException):
    pass


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
