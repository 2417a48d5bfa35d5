"""The benchmark's scaling table: the grid engine on the book's sweep with more seeds.

32, 256, 1024 models (4096 too on an accelerator), each in a fresh process, reporting model-updates per second,
GFLOP/s, the per-model cost relative to the first run, the chunks used, and peak memory (host RSS; device memory
on an accelerator). Run through ``python -m experiments.benchmark`` (``--scaling N1,N2,...`` or ``none``);
docs/benchmark.md has measured tables.

Each point is ``python -m experiments.benchmark_scaling --models N --out FILE``, started by ``run_scaling``: the
child gets every setting on its command line and writes its row, atomically, to the file the parent names (a
fresh temporary folder), so it never touches the benchmark's own ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from experiments import cli, runtime

__all__ = ["MAX_MODELS", "models_count", "scaling_point", "run_scaling", "print_scaling", "main"]

# 4096 seeds of the book's 32 models: hours on a CPU, far beyond the default 4096 models of an accelerator.
MAX_MODELS = 131_072


def models_count(text: str) -> int:
    """An argparse type: a number of models, a multiple of 32 (16 scales x 2 arms per seed) up to ``MAX_MODELS``.

    Args:
      text: the option's text.

    Returns:
      The count.

    Raises:
      argparse.ArgumentTypeError: not such a number.
    """
    value = cli.int_in(32, MAX_MODELS)(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (16 scales x BN/plain per seed), got {value}")
    return value


def scaling_point(num_models: int) -> dict:
    """One row of the scaling table, measured in this process: the book's sweep with ``num_models / 32`` seeds
    (``run_s`` excludes the compile, which the engine times apart).

    Args:
      num_models: a positive multiple of 32 (16 scales x 2 arms per seed).

    Returns:
      The row: ``models``, ``compile_s``, ``run_s``, ``model_updates_per_s``, ``gflops_per_s``, ``chunks``,
      ``models_per_chunk``, ``devices_used``, ``peak_rss_gb`` and, on an accelerator, ``peak_device_gb``.

    Raises:
      ValueError: ``num_models`` not a positive multiple of 32.
    """
    import resource

    import jax

    from bnjax import data, grid

    if num_models < 32 or num_models % 32:
        raise ValueError(f"scaling points must be positive multiples of 32 (16 scales x 2 arms), got {num_models}")
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


def child_command(num_models: int, out: str | Path) -> list[str]:
    """The command line of one scaling point: every setting explicit, the row written to ``out``.

    Args:
      num_models: the point's model count.
      out: the JSON file the child writes its row to.

    Returns:
      The argument list (``sys.executable -m experiments.benchmark_scaling ...``).
    """
    return [sys.executable, "-m", "experiments.benchmark_scaling", "--models", str(num_models), "--out", str(out)]


def run_scaling(counts: list[int]) -> list[dict]:
    """Each scaling point in a fresh process, so its peak memory is its own.

    Each child writes its row into a fresh temporary folder, removed afterwards (an interrupt included).

    Args:
      counts: model counts, multiples of 32.

    Returns:
      ``scaling_point``'s rows (a failed point is reported in one line and left out), each with
      ``per_model_cost_vs_first`` (its run time per model over the first row's).
    """
    rows = []
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="bnjax-scaling-") as tmp:
        for n in counts:
            print(f"scaling: {n} models ...", flush=True)
            out = Path(tmp) / f"point-{n}.json"
            proc = subprocess.run(child_command(n, out), cwd=root, capture_output=True, text=True)
            try:
                if proc.returncode != 0:
                    raise ValueError
                row = json.loads(out.read_text())
                if row.get("models") != n:
                    raise ValueError
            except (OSError, ValueError, AttributeError):
                last = (proc.stderr.strip().splitlines()[-1] if proc.stderr.strip()
                        else f"exit status {proc.returncode}")
                print(f"  failed: {last[:200]}", flush=True)
                continue
            rows.append(row)
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
    first = f"cost/model vs {rows[0]['models']}" if rows else "cost/model"
    header = (f"{'models':>7} {'chunks':>6} {'run s':>8} {'model-updates/s':>16} {'GFLOP/s':>8} {'% peak':>7} "
              f"{first:>16} {'peak RSS GB':>11}")
    print("\nscaling (the book's sweep with more seeds)\n" + header + "\n" + "-" * len(header))
    for row in rows:
        print(f"{row['models']:>7} {row['chunks']:>6} {row['run_s']:>8.2f} {row['model_updates_per_s']:>16.0f} "
              f"{row['gflops_per_s']:>8.1f} {row['percent_of_peak']:>6.0f}% "
              f"{row['per_model_cost_vs_first']:>16.2f} {row['peak_rss_gb']:>11.2f}"
              + (f"  (device peak {row['peak_device_gb']:.2f} GB)" if "peak_device_gb" in row else ""))


def _parser() -> argparse.ArgumentParser:
    p = cli.new_parser("benchmark_scaling", __doc__,
                       "Started by python -m experiments.benchmark, one process per point of its scaling table.")
    p.add_argument("--models", type=models_count, required=True, metavar="N",
                   help="models of the point: the book's sweep with N / 32 seeds")
    p.add_argument("--out", type=cli.out_dir, required=True, metavar="FILE", help="the JSON file to write the row to")
    return p


def main(argv=None) -> int:
    """``python -m experiments.benchmark_scaling --models N --out FILE``: one point of the scaling table.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``).

    Returns:
      0 when the row is written.

    Raises:
      SystemExit: status 2 for a bad option (an ``--out`` that is a folder or cannot be written included,
        checked before any work), 1 when the backend is missing or the file cannot be written.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; name a .json file")
    try:
        cli.check_writable(args.out.parent)
    except OSError as err:
        parser.error(f"--out: {err}")
    runtime.set_xla_flags()
    import jax

    runtime.check_backend()
    with jax.default_matmul_precision("highest"):  # true float32, as bnjax's sweep
        row = scaling_point(args.models)
    from experiments import results

    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results.write_json(args.out, row)
    except OSError as err:
        print(f"error: could not write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
