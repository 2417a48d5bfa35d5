"""The results every experiment writes: ``write_json`` (JSON through ``experiments.jsonable``: NaN to null), the
environment, the results record of an engine run, and ``finish`` (figures, results.json, the rendered verdict).

JAX is imported inside the functions only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

# The library's one way to write a file (atomically, umask permissions); every experiment writes through it.
from bnjax.files import atomic_file, atomic_write_text
from experiments.endings import raise_if_interrupted
from experiments.jsonable import jsonable
from experiments.runtime import finish_prefetch, say

__all__ = ["atomic_file", "atomic_write_text", "jsonable", "dumps", "write_json", "environment", "results_record",
           "finish"]


def finish(args: argparse.Namespace, record: dict, figures: dict, render: Callable[[dict], str],
           started_at: float) -> dict:
    """End a run: draw the figures, write results.json, print the rendered verdict and the files written.

    Every file is written atomically. The verdict printed is ``render`` of the results as written (read back
    from their JSON), so the console shows what ``experiments.report`` shows.

    Args:
      args: the parsed options (``out``, ``no_plot``, ``quiet``).
      record: the results; ``timing`` gets ``plot_s`` and ``total_s``.
      figures: file name -> function returning a matplotlib figure (none drawn with ``--no-plot``).
      render: the experiment's renderer, results dict -> markdown.
      started_at: ``time.perf_counter()`` at the start of the run.

    Returns:
      The results as written (a JSON round trip of ``record``).
    """
    raise_if_interrupted()  # nothing is written for a run an interrupt asked to end
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
    text = dumps(record)
    atomic_write_text(args.out / "results.json", text)
    written.insert(0, "results.json")
    written_results = json.loads(text)
    parts = [f"{label} {timing[key]:.2f} s" for key, label in (("compile_s", "compile"), ("run_s", "run"))
             if key in timing]
    say(args, "", *render(written_results).rstrip("\n").splitlines(), "",
        ", ".join(parts + [f"total {timing['total_s']:.2f} s"]))
    print(f"wrote {', '.join(written)} to {args.out}")
    return written_results


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def dumps(obj: Any) -> str:
    """The text of a results file.

    Args:
      obj: anything ``jsonable`` converts.

    Returns:
      Strict JSON (no NaN), indented by one space, with a final newline.
    """
    return json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as a results file, atomically, creating its folder if needed.

    Args:
      path: the file.
      obj: anything ``jsonable`` converts.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      OSError: the file cannot be written (nothing partial is left; a folder created here and left empty is
        removed at exit).
    """
    from experiments import outputs

    path = Path(path)
    text = dumps(obj)  # before any folder is created: a value JSON cannot hold fails here
    outputs.note_created(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, text)


def environment(layout: dict | None = None) -> dict:
    """What the numbers were computed with.

    Args:
      layout: a ``GridResult.layout`` (devices used, mesh, chunks), or ``None``.

    Returns:
      Versions (jax, jaxlib, optax, Python), backend, devices, processes, platform and CPU count, plus the
      layout's devices used and chunking when given.
    """
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
    """The results file every engine experiment writes.

    Args:
      args: the parsed options (recorded as ``config``).
      result: the ``grid.GridResult``.
      dataset: the ``bnjax.data.Dataset`` (its ``source`` is recorded as ``data``).
      timing: seconds per phase.
      cache_dir: the compilation cache used, or ``None``.
      **extra: the experiment's own fields, placed after the metrics in this order.

    Returns:
      ``config``, ``grid`` (every engine setting), ``arms``, ``axes``, ``seeds``, ``record_steps`` (and
      ``arm_record_steps`` where arms have their own batch size), every metric per arm ``[seeds, *grid,
      records]``, ``diverged``, then ``extra``, ``data``, ``timing`` and ``environment``.
    """
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
