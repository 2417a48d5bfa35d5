"""Start-up and the run itself, shared by every experiment: XLA flags, several processes, the backend check, the
compilation cache, claiming the output folder, data loading, progress, running a grid through the engine (after
the memory pre-flight of ``experiments.memory``; each finished chunk saved for ``--resume`` by
``experiments.chunks``), and what ends a run in one line: the signals (Ctrl-C, SIGTERM) and a full disk.

JAX is imported inside the functions only, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from experiments import chunks, outputs
from experiments.cli import is_default_out, remove_empty_outputs, usage_error
from experiments.endings import main_wrapper, raise_if_interrupted  # main_wrapper: every experiment's ending
from experiments.memory import memory_problem

__all__ = ["set_xla_flags", "start", "check_backend", "enable_compilation_cache", "claim_out", "prefetch",
           "finish_prefetch", "load_data", "load_timed", "Progress", "say", "FIELD_OPTIONS", "run_engine",
           "main_wrapper"]


def set_xla_flags(cpu_devices: int | None = None) -> None:
    """Defaults for XLA_FLAGS, set before jax loads; flags the user already set win.

    * One host device per CPU core (at most 8), so a CPU run splits the models over cores (2-core machine:
      run 5.0 s -> 3.9 s). Only the CPU platform reads it.
    * No GPU gemm autotuning: on an H200 it cost 10.2 s of compile against 2.5 s without, for the same run
      time (0.21 vs 0.19 s). Only GPUs read it.

    Args:
      cpu_devices: host devices to emulate on CPU (``--cpu-devices``); ``None``: the cores, at most 8.
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
    """Start JAX for a run: XLA flags, then (with --coordinator, or on a TPU pod slice)
    ``jax.distributed.initialize``, float64 if asked, the backend check and the compilation cache.

    Args:
      args: the parsed options (``cpu_devices``, ``coordinator``, ``num_processes``, ``process_id``,
        ``no_cache`` where the parser has them).
      x64: enable float64.

    Returns:
      ``{'cache_dir': str | None, 'is_main': bool (process 0), 'import_s': seconds}``.

    Raises:
      SystemExit: status 1 when the backend cannot start (``check_backend``).
    """
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
    """Check that the backend JAX was asked for (``JAX_PLATFORMS``) starts here.

    Raises:
      SystemExit: status 1, after one line naming the backend and what is installed.
    """
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

    Args:
      directory: where; ``None``: ``$XDG_CACHE_HOME/bnjax/jax-compilation-cache`` (or under ``~/.cache``).

    Returns:
      The directory, or ``None`` if this JAX (or the file system) cannot use it.
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


def claim_out(args: argparse.Namespace, figures: tuple[str, ...] = ()) -> Path:
    """Create, lock and (with ``--overwrite``) clear ``args.out``, once JAX has started (``outputs.claim``).

    Args:
      args: the parsed options (``out``, ``overwrite``, ``resume``).
      figures: the experiment's figure file names.

    Returns:
      The folder, locked until ``outputs.release`` (a default folder may have moved on to the next free name).

    Raises:
      SystemExit: status 2 when the folder holds a run's files or another run holds it (one line), 1 when it
        cannot be created.
    """
    try:
        return outputs.claim(args.out, overwrite=getattr(args, "overwrite", False),
                             resume=getattr(args, "resume", False), figures=figures, fresh=is_default_out(args.out))
    except outputs.OutputError as err:
        usage_error(str(err))
    except OSError as err:
        remove_empty_outputs()
        print(f"error: cannot write to output directory {args.out}: {err.strerror or err}", file=sys.stderr)
        raise SystemExit(1) from None


_PREFETCH: list = []


def prefetch(*work: Callable[[], Any]) -> None:
    """Run ``work`` (slow imports) in a background thread: matplotlib's ~0.5 s import then overlaps the
    training, which runs in XLA's threads without holding the GIL. Call ``finish_prefetch()`` before using
    what it imports (a module half-imported by another thread is not safe to use).

    Args:
      *work: callables run one after the other; their errors are ignored (the main thread's own import reports
        any real problem).
    """
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
    """The data the options name.

    Args:
      args: the parsed options (``data``, ``train_size``, ``data_dir``, ``split_seed``).
      num_heldout: held-out images (``None``: all the images not trained on).

    Returns:
      The ``bnjax.data.Dataset``, or ``None`` after printing why not (the caller exits 1).

    Raises:
      SystemExit: status 2 when the data cannot supply the sizes asked (an option error).
    """
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
    """The data the options name, timed.

    Args:
      args: the parsed options.
      num_heldout: held-out images (``None``: all the images not trained on).
      need_heldout: refuse a dataset without a held-out image.

    Returns:
      ``(dataset, seconds)``.

    Raises:
      SystemExit: status 1 when the data cannot be had (``load_data`` said why), 2 when ``need_heldout`` and no
        held-out image is left.
    """
    t0 = time.perf_counter()
    ds = load_data(args, num_heldout)
    if ds is None:
        raise SystemExit(1)
    if need_heldout and ds.x_heldout.shape[0] == 0:
        print(f"error: --train-size {args.train_size} leaves no held-out images in {ds.source['name']} MNIST",
              file=sys.stderr)
        raise SystemExit(2)
    return ds, time.perf_counter() - t0


class Progress:
    """A tqdm bar over ``progress(done, total)`` calls, created at the first call (once compiled, so its rate
    is training alone); silent when ``enabled`` is false. ``prefetch`` holds callables run in the background
    from the first call on (after the compile, whose tracing would compete for the GIL).

    Args:
      enabled: draw the bar.
      unit, desc: the bar's unit and description.
      prefetch: callables handed to ``prefetch`` at the first call.
    """

    def __init__(self, enabled: bool, unit: str = "record", desc: str = "training", prefetch: tuple = ()):
        self.enabled, self.unit, self.desc, self.bar = enabled, unit, desc, None
        self.prefetch = tuple(prefetch)

    def __call__(self, done: int, total: int) -> None:
        raise_if_interrupted()  # after each record: an interrupt swallowed somewhere still ends the run here
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
    """Print ``lines`` unless ``--quiet``.

    Args:
      args: the parsed options.
      *lines: printed one per line, flushed.
    """
    if not args.quiet:
        for line in lines:
            print(line, flush=True)


# The options behind the engine's fields, for its error messages.
FIELD_OPTIONS = {"weight_scale": "--scales/--init-scale", "learning_rate": "--lr/--lrs", "weight_decay": "--weight-decay",
                 "batch_size": "--batch-size", "num_records": "--epochs", "dtype": "--dtype"}


def run_engine(args: argparse.Namespace, started: dict, config, dataset, *, name: str, what: str,
               heldout: bool = False, unit: str = "record"):
    """Run one grid with the house conventions: the engine's checks and the memory pre-flight, a one-line
    description, a chunk note, a progress bar (once compiled), matplotlib imported in the background meanwhile.

    Args:
      args: the parsed options.
      started: ``start``'s dict (only process 0 prints).
      config: the ``grid.GridConfig``.
      dataset: the ``bnjax.data.Dataset``.
      name: the experiment's name, for the description.
      what: what the models are, for the description.
      heldout: also score the held-out images.
      unit: the progress bar's unit.

    Each finished chunk is written to ``args.out/chunks`` (process 0); with ``--resume`` the chunks already
    there are checked against this run (``chunks.config_hash``) and skipped.

    Returns:
      ``(GridResult, timing)``, timing the engine's (compile, run) plus ``import_s`` (and ``resumed_chunks``
      when some were skipped).

    Raises:
      SystemExit: status 2 for options the engine refuses (naming the option) or chunks made with other
        options (``--resume``), 1 when the run cannot fit in memory (before compiling, or out of device memory
        while running) or a chunk file cannot be read.
    """
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
    layout = grid.plan_layout(config, jax.device_count(), input_size)
    digest = chunks.config_hash(config, dataset, layout, heldout)
    done = _resume_from(args, digest, config, input_size, layout, quiet) if getattr(args, "resume", False) else []
    if not quiet:
        held = f" + {dataset.x_heldout.shape[0]} held-out" if heldout else ""
        print(f"bnjax {name}: {config.num_models} models ({what}), {grid.num_updates(config, num_train)} updates "
              f"each, on {dataset.source['name']} MNIST ({num_train} training images{held}), "
              f"{jax.default_backend()} x{jax.device_count()}"
              + (f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""), flush=True)
        if layout.num_chunks > 1:
            print(f"{layout.num_chunks} chunks of {layout.models_per_chunk(len(config.arms))} models, to bound memory; "
                  f"each is saved in {args.out / outputs.CHUNKS} as it finishes (--resume continues an interrupted "
                  "run)", flush=True)
        if len(done) < layout.num_chunks:
            print("compiling...", flush=True)
    from experiments import plot

    progress = Progress(not quiet, unit=unit,
                        prefetch=() if getattr(args, "no_plot", False) or not started["is_main"] else (plot.pyplot,))
    held_data = (dataset.x_heldout, dataset.t_heldout) if heldout else (None, None)
    # Without a bar or a prefetch, no callback: the records then need no host sync one by one.
    callback = progress if (progress.enabled or progress.prefetch) else None
    writer = chunks.ChunkWriter(args.out, digest, resumed=len(done)) if started["is_main"] else None
    try:
        result = grid.run_grid(config, dataset.x_train, dataset.t_train, *held_data, progress=callback,
                               on_chunk=_checked(writer), done_chunks=done)
    except Exception as err:  # XLA's out-of-memory errors have no class of their own
        if "RESOURCE_EXHAUSTED" not in str(err) and "out of memory" not in str(err).lower():
            raise
        progress.close()
        print(f"error: out of device memory ({str(err).strip().splitlines()[0][:120]}); train fewer models at once "
              "with --max-models-per-chunk N, or use a smaller --batch-size", file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        progress.close()
    timing = dict(result.timing, import_s=started["import_s"])
    if done:
        timing["resumed_chunks"] = len(done)
    return result, timing


def _resume_from(args: argparse.Namespace, digest: str, config, input_size: int, layout, quiet: bool) -> list:
    """The finished chunks ``--resume`` reuses, after saying how many (status 2/1 for ones it cannot)."""
    import jax

    if jax.process_count() > 1:
        usage_error("--resume runs in one process only: the other processes cannot read process 0's chunk files")
    try:
        done = chunks.load(args.out, digest, config, input_size)
    except chunks.ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.status) from None
    if not quiet:
        if done:
            models = sum(c.seeds[1] * c.grid_points[1] for c in done) * len(config.arms)
            print(f"resuming from {args.out / outputs.CHUNKS}: {len(done)} of {layout.num_chunks} chunks finished "
                  f"({models} of {config.num_models} models; config hash {digest})", flush=True)
        else:
            print(f"--resume: no finished chunk in {args.out}; starting from the first", flush=True)
    return done


def _checked(on_chunk):
    """``on_chunk`` (or nothing) after ending the run if an interrupt was swallowed before this chunk finished."""
    def call(chunk):
        raise_if_interrupted()
        if on_chunk is not None:
            on_chunk(chunk)

    return call
