"""Benchmark: the book's sweep as one compiled program against the obvious alternatives, side by side.

Variants, all on the same data and protocol (the bundled MNIST subset, 1000 training images, 191 updates and
20 records per model, 16 scales x BN/plain by default):

  (a) bnjax's sweep: every model in one jitted, vmapped program (bnjax.grid.run_grid)
  (b) the same jitted train step, looping over the models (and steps) in Python
  (c) the book's network in NumPy, float64, as the book runs it (all BLAS threads, and one BLAS thread)
  (d) Flax linen + optax, one model at a time, with one compile per structure (if flax is installed)

(experiments/benchmark_variants.py). Reports compile and run time separately, each variant's run-time ratio to
(a), and achieved GFLOP/s (matmul FLOPs counted by bnjax.grid.grid_flops) against a float32 matmul peak measured
in the same run.

Then a scaling table of the grid engine (experiments/benchmark_scaling.py): the book's sweep with more seeds
(32, 256, 1024 models; 4096 too on an accelerator), each in a fresh process, reporting model-updates per second,
GFLOP/s, the per-model cost relative to the first (32-model) run, the chunks used, and peak memory (host RSS; device
memory on an accelerator).

Then a layer section (experiments/benchmark_layers.py): one norm layer alone, the jitted forward + backward of
``sum(norm(x) * w)`` in training mode, float32, for bnjax ``batch_norm_apply``, ``batch_renorm()`` and
``ghost_batch_norm(32)`` against Flax linen ``nn.BatchNorm`` (fast and two-pass variance, if flax is installed),
as medians over interleaved rounds (20; 5 on ~1/16 of the elements with --quick) and ratios to bnjax
``batch_norm_apply``; then a float32 accuracy check of each batch variance at mean / std = 1e4 against float64
NumPy. ``--layers-only`` runs just this section; ``--skip l`` leaves it out. Speeds are reported (as ratios),
never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from experiments import benchmark_layers, benchmark_scaling, cli, runtime

__all__ = ["VARIANTS", "parse_skip", "parse_scaling", "out_file", "parse_args", "run_variants", "print_variants",
           "main"]

# --skip's letters: the training variants, then the layer section.
VARIANTS = {"a": "bnjax sweep", "b": "Python loop", "c": "NumPy", "d": "Flax", "l": "the layer section"}
MAX_REPEATS = 1000
MAX_LAYER_REPEATS = 100_000

EPILOG = """Rules, checked before any work: --repeats and --layer-repeats are >= 1; --scaling counts are multiples of
32, none twice; --skip takes only the letters a, b, c, d, l; --layers-only refuses --skip, --scaling and --repeats,
and --skip l refuses --layer-shapes and --layer-repeats; --out names a JSON file (not a folder) in a folder that can
be written. An existing --out file is refused unless --overwrite; if another run writes it meanwhile, both
are kept (this run's beside it, named with the process id)."""


def parse_skip(text: str) -> frozenset[str]:
    """An argparse type: ``--skip``'s comma-separated letters, each one of ``VARIANTS``.

    Args:
      text: the option's text, e.g. ``"c,d"``.

    Returns:
      The letters, lower case.

    Raises:
      argparse.ArgumentTypeError: no letter, or one that names no variant.
    """
    letters = [s.strip().lower() for s in text.split(",") if s.strip()]
    known = ", ".join(f"{k} ({v})" for k, v in VARIANTS.items())
    if not letters:
        raise argparse.ArgumentTypeError(f"expected comma-separated letters of {known}, got {text!r}")
    for letter in letters:
        if letter not in VARIANTS:
            raise argparse.ArgumentTypeError(f"no variant {letter!r}; the letters are {known}")
    return frozenset(letters)


def parse_scaling(text: str) -> tuple[int, ...]:
    """An argparse type: ``--scaling``'s model counts, or ``none``.

    Args:
      text: the option's text, e.g. ``"32,256"``.

    Returns:
      The counts in the order given (the first is the per-model cost's reference); ``()`` for ``none``.

    Raises:
      argparse.ArgumentTypeError: a count that is not a multiple of 32 in 32..``benchmark_scaling.MAX_MODELS``,
        a count given twice, or no count.
    """
    if text.strip().lower() == "none":
        return ()
    counts = tuple(benchmark_scaling.models_count(c.strip()) for c in text.split(",") if c.strip())
    if not counts:
        raise argparse.ArgumentTypeError(f"expected model counts like '32,256' or 'none', got {text!r}")
    if len(set(counts)) < len(counts):
        raise argparse.ArgumentTypeError(f"a model count is given twice in {text!r}")
    return counts


def out_file(text: str) -> Path:
    """An argparse type: the JSON file to write (its folder is checked later, before any work).

    Args:
      text: the option's text.

    Returns:
      The path.

    Raises:
      argparse.ArgumentTypeError: an empty string, or one ending in a path separator (a folder).
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a .json file, got an empty string")
    if text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"must name a file, not a folder: {text!r}")
    return Path(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"{EPILOG} {cli.EXIT_STATUS}")
    p.add_argument("--quick", action="store_true",
                   help="2 scales x 2 records, 1 run of (a), a 32-model scaling point, and small layer shapes with "
                        "5 rounds: checks that every variant runs")
    p.add_argument("--repeats", type=cli.int_in(1, MAX_REPEATS), default=None, metavar="N",
                   help="runs of (a) to take the median of (default: 3; 1 with --quick)")
    p.add_argument("--skip", type=parse_skip, default=frozenset(), metavar="LETTERS",
                   help="comma-separated variants to skip, e.g. 'c,d'; 'l' skips the layer section")
    p.add_argument("--layers-only", action="store_true",
                   help="run only the layer section (no training variants, no scaling table)")
    p.add_argument("--layer-shapes", type=benchmark_layers.parse_shapes, default=None, metavar="NxHxWxC,...",
                   help="shapes of the layer section, channels last (default: 128x32x32x64,256x14x14x256,1024x512; "
                        "32x16x16x64,64x7x7x256,128x512 with --quick)")
    p.add_argument("--layer-repeats", type=cli.int_in(1, MAX_LAYER_REPEATS), default=None, metavar="N",
                   help="interleaved rounds of the layer section to take medians of (default: 20; 5 with --quick)")
    p.add_argument("--scaling", type=parse_scaling, default=None, metavar="N1,N2,...",
                   help="model counts of the scaling table, multiples of 32 (default: 32,256,1024 on CPU, "
                        "32,256,1024,4096 on an accelerator, 32 with --quick; 'none' to skip)")
    p.add_argument("--out", type=out_file, default=None, metavar="FILE",
                   help="JSON output file (default: runs/benchmark.json; runs/benchmark_layers.json with "
                        "--layers-only); an existing file is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the options, fill in the defaults, and prove ``--out``'s folder writable: before any work.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``).

    Returns:
      The options, with ``repeats``, ``layer_shapes``, ``layer_repeats`` and ``out`` filled in (``scaling`` stays
      ``None`` for the backend's default).

    Raises:
      SystemExit: status 2 naming the option for a bad value or combination (0 for ``--help``).
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.layers_only:
        for option, given in (("--skip", bool(args.skip)), ("--scaling", args.scaling is not None),
                              ("--repeats", args.repeats is not None)):
            if given:
                parser.error(f"{option} has no effect with --layers-only (it runs the layer section alone)")
    if "l" in args.skip:
        for option, value in (("--layer-shapes", args.layer_shapes), ("--layer-repeats", args.layer_repeats)):
            if value is not None:
                parser.error(f"{option} has no effect with --skip l (the layer section is skipped)")
    if set(VARIANTS) <= args.skip and args.scaling == ():
        parser.error("--skip a,b,c,d,l with --scaling none leaves nothing to run")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.layer_shapes is None:
        args.layer_shapes = benchmark_layers.QUICK_LAYER_SHAPES if args.quick else benchmark_layers.LAYER_SHAPES
    if args.layer_repeats is None:
        args.layer_repeats = 5 if args.quick else 20
    if args.out is None:
        args.out = Path("runs") / ("benchmark_layers.json" if args.layers_only else "benchmark.json")
    if args.out.is_dir():
        parser.error(f"--out {args.out} is a directory; name a .json file, e.g. {args.out / 'benchmark.json'}")
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} already holds a benchmark; pass --overwrite to replace it, or name "
                     "another file")
    try:
        cli.check_writable(args.out.parent)  # proven writable; created only when written
    except OSError as err:
        parser.error(f"--out: {err}")
    return args


def main(argv=None) -> int:
    """``python -m experiments.benchmark``: run the variants, print the tables, write the JSON.

    Args:
      argv: the command line (``sys.argv[1:]`` if ``None``).

    Returns:
      The exit status: 0, or 1 when the JSON cannot be written.

    Raises:
      SystemExit: status 2 for a bad option (before any work), 1 when the JAX backend asked for is missing.
    """
    args = parse_args(argv)
    runtime.set_xla_flags()  # the same XLA defaults as the sweep CLI; no compilation cache: compiles are timed
    import jax

    runtime.check_backend()
    from experiments import results

    # Every JAX variant multiplies in true float32, as bnjax's sweep does (no TF32 on GPUs).
    with jax.default_matmul_precision("highest"):
        env = results.environment()
        record = _layers_only(args, env) if args.layers_only else _everything(args, env)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # created only now, with something to hold
        if args.overwrite:
            results.write_json(args.out, record)
        else:
            _write_new(args.out, record)
    except FileExistsError:  # another run wrote --out meanwhile: keep both
        kept = args.out.with_name(f"{args.out.stem}.{os.getpid()}{args.out.suffix}")
        results.write_json(kept, record)
        print(f"error: {args.out} was written by another run meanwhile; this run's results are in {kept}",
              file=sys.stderr)
        return 1
    except OSError as err:  # a full disk: the tables above are all that is left
        print(f"error: could not write {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def _write_new(path: Path, record: dict) -> None:
    """Write ``record`` to ``path`` only if no file is there, atomically: a hard link of a complete temporary file
    (``os.link`` refuses an existing name, where a rename would replace it)."""
    from experiments import results

    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        results.write_json(temp, record)
        os.link(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _layers_only(args: argparse.Namespace, env: dict) -> dict:
    print(f"bnjax layer benchmark on {env['backend']} ({env['device_kind']}, {env['cpu_count']} CPUs), "
          f"jax {env['jax']}", flush=True)
    layer_res = benchmark_layers.bench_layers(args.layer_shapes, args.layer_repeats)
    benchmark_layers.print_layers(layer_res)
    return {"environment": env, "layers": layer_res, "quick": args.quick}


def _config_record(config) -> dict:
    """Every field of a ``GridConfig`` for the results file, each arm by its field names."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["arms"] = {name: arm._asdict() for name, arm in config.arms.items()}
    return record


def run_variants(skip, config, x, t, repeats: int) -> list[dict]:
    """Run the training variants not in ``skip``, in order, each announced in one line; one that cannot run
    here is skipped with one line saying why.

    Args:
      skip: letters of ``VARIANTS`` to leave out.
      config: the ``GridConfig``.
      x, t: the training images and labels.
      repeats: runs of (a).

    Returns:
      The rows (experiments/benchmark_variants.py), each with its ``name``.
    """
    from experiments import benchmark_variants as bv

    num_train = x.shape[0]
    plan = [
        ("a", "(a) bnjax sweep, one vmapped program", lambda: bv.bench_sweep(config, x, t, repeats)),
        ("b", "(b) same jitted step, Python loop over models", lambda: bv.bench_python_loop(config, x, t)),
        ("c", "(c) NumPy float64 (book), all BLAS threads", lambda: bv.bench_numpy(config, num_train, None)),
        ("c", "(c) NumPy float64 (book), 1 BLAS thread", lambda: bv.bench_numpy(config, num_train, 1)),
        ("d", "(d) Flax linen + optax, one model at a time", lambda: bv.bench_flax(config, x, t)),
    ]
    variants = []
    for letter, name, fn in plan:
        if letter in skip:
            continue
        print(f"running {name} ...", flush=True)
        try:
            res = fn()
        except bv.VariantSkipped as why:
            print(f"  skipped ({why})", flush=True)
            continue
        res["name"] = name
        variants.append(res)
    return variants


def _everything(args: argparse.Namespace, env: dict) -> dict:
    import jax

    from bnjax import data, grid
    from experiments import benchmark_variants as bv

    ds = data.load_bundled(1000, 0)
    config = grid.GridConfig()
    if args.quick:
        config = config.replace(axes={"weight_scale": (0.1, 0.01)}, num_records=2)
    num_train, input_size = ds.x_train.shape
    flops = grid.grid_flops(config, num_train, input_size)
    print(f"bnjax benchmark on {env['backend']} ({env['device_kind']}, {env['device_count']} device(s), "
          f"{env['cpu_count']} CPUs), jax {env['jax']}; {2 * len(config.axes['weight_scale'])} models, "
          f"{grid.num_updates(config, num_train)} updates, {flops['total'] / 1e9:.0f} GFLOP of matmuls",
          flush=True)
    peak = bv.measure_peak_gflops()
    print(f"float32 matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['n']}^3)", flush=True)

    variants = run_variants(args.skip, config, ds.x_train, ds.t_train, args.repeats)
    base = next((v["run_s"] for v in variants if v["name"].startswith("(a)")), None)
    for v in variants:
        v["ratio_to_a"] = round(v["run_s"] / base, 2) if base else None
        v["gflops_per_s"] = flops["total"] / v["run_s"] / 1e9
        v["percent_of_peak"] = 100 * v["gflops_per_s"] / peak["gflops"]
    if variants:
        print_variants(variants, flops, peak)

    layer_res = None
    if "l" not in args.skip:
        layer_res = benchmark_layers.bench_layers(args.layer_shapes, args.layer_repeats)
        benchmark_layers.print_layers(layer_res)

    counts = args.scaling
    if counts is None:
        counts = (32,) if args.quick else ((32, 256, 1024) if jax.default_backend() == "cpu"
                                           else (32, 256, 1024, 4096))
    scaling = benchmark_scaling.run_scaling(list(counts)) if counts else []
    for row in scaling:
        row["percent_of_peak"] = 100 * row["gflops_per_s"] / peak["gflops"]
    if scaling:
        benchmark_scaling.print_scaling(scaling)
    return {"environment": env, "config": _config_record(config), "flops": flops, "peak": peak,
            "variants": variants, "scaling": scaling, "layers": layer_res, "quick": args.quick}


def print_variants(variants: list[dict], flops: dict, peak: dict) -> None:
    """Print the variants' table: compile and run time, run ratio to (a) (``-`` without (a)), GFLOP/s, % of peak.

    Args:
      variants: the rows, each with ``ratio_to_a``, ``gflops_per_s`` and ``percent_of_peak``.
      flops: ``grid.grid_flops``'s counts.
      peak: ``measure_peak_gflops``'s result.
    """
    header = f"{'variant':<50} {'compile s':>9} {'run s':>8} {'run ratio to (a)':>16} {'GFLOP/s':>8} {'% peak':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for v in variants:
        ratio = "-" if v["ratio_to_a"] is None else f"{v['ratio_to_a']:.2f}"
        print(f"{v['name']:<50} {v['compile_s']:>9.2f} {v['run_s']:>8.2f} {ratio:>16} "
              f"{v['gflops_per_s']:>8.1f} {v['percent_of_peak']:>6.0f}%")
    print(f"\nratio = run time / run time of (a); FLOPs = {flops['train'] / 1e9:.0f} G train + "
          f"{flops['eval'] / 1e9:.0f} G eval; peak = {peak['gflops']:.0f} GFLOP/s measured now.")


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
