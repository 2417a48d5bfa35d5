"""The benchmark's scaling table: the grid engine on the book's sweep with more seeds.

32, 256, 1024 models (4096 too on an accelerator), each in a fresh process (``python -m experiments.benchmark
--scaling-one N``), reporting model-updates per second, GFLOP/s, the per-model cost relative to the first
(32-model) run, the chunks used, and peak memory (host RSS; device memory on an accelerator). Run through
``python -m experiments.benchmark`` (``--scaling N1,N2,...`` or ``none``); docs/benchmark.md has measured tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def scaling_point(num_models: int) -> dict:
    """One row of the scaling table, measured in this process: the book's sweep with ``num_models / 32`` seeds
    (``run_s`` excludes the compile, which the engine times apart).

    Args:
      num_models: a multiple of 32 (16 scales x 2 arms per seed).

    Returns:
      The row: ``models``, ``compile_s``, ``run_s``, ``model_updates_per_s``, ``gflops_per_s``, ``chunks``,
      ``models_per_chunk``, ``devices_used``, ``peak_rss_gb`` and, on an accelerator, ``peak_device_gb``.

    Raises:
      ValueError: ``num_models`` not a multiple of 32.
    """
    import resource

    import jax

    from bnjax import data, grid

    if num_models % 32:
        raise ValueError(f"scaling points must be multiples of 32 (16 scales x 2 arms), got {num_models}")
    ds = data.load_bundled(1000, 0)
    config = grid.GridConfig(num_seeds=num_models // 32)
    timed = grid.run_grid(config, ds.x_train, ds.t_train)
    updates = num_models * grid.num_updates(config, 1000)
    flops = grid.grid_flops(config, 1000, 784)["total"]
    row = {
        "models": num_models,
        "compile_s": timed.timing["compile_s"],
        "run_s": timed.timing["run_s"],
        "model_updates_per_s": updates / timed.timing["run_s"],
        "gflops_per_s": flops / timed.timing["run_s"] / 1e9,
        "chunks": timed.layout["num_chunks"],
        "models_per_chunk": timed.layout["models_per_chunk"],
        "devices_used": timed.layout["devices_used"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        row["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
    return row


def run_scaling(counts: list[int]) -> list[dict]:
    """Each scaling point in a fresh process, so its peak memory is its own.

    Args:
      counts: model counts, multiples of 32.

    Returns:
      ``scaling_point``'s rows (a failed point is reported and left out), each with ``per_model_cost_vs_first``.
    """
    rows = []
    root = Path(__file__).resolve().parents[1]
    for n in counts:
        print(f"scaling: {n} models ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scaling-one", str(n)], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                  flush=True)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows:
        base = rows[0]["run_s"] / rows[0]["models"]
        for row in rows:
            row["per_model_cost_vs_first"] = round(row["run_s"] / row["models"] / base, 3)
    return rows


def print_scaling(rows: list[dict]) -> None:
    """Print the scaling table.

    Args:
      rows: ``run_scaling``'s rows, each with ``percent_of_peak`` added (of the matmul peak measured in the run).
    """
    header = (f"{'models':>7} {'chunks':>6} {'run s':>8} {'model-updates/s':>16} {'GFLOP/s':>8} {'% peak':>7} "
              f"{'cost/model vs 32':>16} {'peak RSS GB':>11}")
    print("\nscaling (the book's sweep with more seeds)\n" + header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['models']:>7} {row['chunks']:>6} {row['run_s']:>8.2f} {row['model_updates_per_s']:>16.0f} "
              f"{row['gflops_per_s']:>8.1f} {row['percent_of_peak']:>6.0f}% "
              f"{row['per_model_cost_vs_first']:>16.2f} {row['peak_rss_gb']:>11.2f}"
              + (f"  (device peak {row['peak_device_gb']:.2f} GB)" if "peak_device_gb" in row else ""))
