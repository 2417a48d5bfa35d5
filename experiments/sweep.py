"""The book's Batch Normalization experiment (Deep Learning from Scratch, ch. 6.3), as one compiled program.

Trains the 784-100-100-100-100-100-10 network with and without batch norm at every weight-init scale
(all models in parallel with jax.vmap), records training accuracy, draws the book's grid of curves and writes
results.json. The defaults are the book's protocol; every option below can change it.

    python -m experiments.sweep                      # the book's 16 scales on the bundled MNIST subset
    python -m experiments.sweep --num-seeds 5 --heldout --optimizer adam
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime
from pathlib import Path

from bnjax.data import SOURCES as DATA_SOURCES  # bnjax.data imports no jax: --help stays fast

_START = time.perf_counter()

DTYPES = ("float32", "bfloat16", "float16", "float64")
# bnjax.train.OPTIMIZERS, spelled out so --help does not wait for jax and optax to import (a test keeps them equal).
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _scale_list(text: str) -> tuple[float, ...]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    return tuple(_positive_float(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.sweep",
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Within a seed, every model (all scales, BN and plain) sees the same mini-batches: the book shares "
            "them between its BN and plain nets, bnjax also across scales, so the scale is the only difference "
            "between panels. BN and plain nets draw their own initial weights, as in the book."
        ),
    )
    g = p.add_argument_group("protocol (defaults: the book's)")
    scales = g.add_mutually_exclusive_group()
    scales.add_argument("--num-scales", type=_positive_int, default=16, metavar="N",
                        help="N scales logspace(0, -4, N), 1.0 down to 1e-4 (default: 16)")
    scales.add_argument("--scales", type=_scale_list, metavar="W1,W2,...",
                        help="explicit weight-init scales instead of --num-scales")
    g.add_argument("--epochs", type=_positive_int, default=20,
                   help="records of training accuracy; the first after one update, then one every "
                        "train-size/batch-size updates (default: 20, i.e. 191 updates)")
    g.add_argument("--train-size", type=_positive_int, default=1000, help="training images (default: 1000)")
    g.add_argument("--batch-size", type=_positive_int, default=100,
                   help="mini-batch size, drawn with replacement (default: 100)")
    g.add_argument("--lr", type=_positive_float, default=0.01, help="learning rate (default: 0.01)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="optax optimizer (default: sgd)")
    g.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="parameter/activation dtype; BN statistics stay float32 (default: float32)")
    r = p.add_argument_group("randomness")
    r.add_argument("--seed", type=_nonneg_int, default=0, help="first seed (default: 0)")
    r.add_argument("--num-seeds", type=_positive_int, default=1,
                   help="seeds trained in parallel; the figure shows mean and min..max band (default: 1)")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATA_SOURCES, default="auto",
                   help="auto: full MNIST if already on disk, else the bundled 5k subset (never downloads); "
                        "bundled; mnist: idx files (downloaded once, or from --data-dir); tfds (default: auto)")
    d.add_argument("--data-dir", type=Path, metavar="DIR", help="directory holding the MNIST idx files (or tfds data)")
    d.add_argument("--heldout", action="store_true", help="also record accuracy on held-out images")
    d.add_argument("--heldout-size", type=_positive_int, metavar="N",
                   help="held-out images to score (default: 1000; implies --heldout)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, metavar="DIR",
                   help="output directory (default: runs/sweep-<date>-<time>)")
    o.add_argument("--no-plot", action="store_true", help="skip sweep.png")
    o.add_argument("--cpu-devices", type=_positive_int, metavar="N",
                   help="on CPU, split the models over N host devices (XLA_FLAGS); default: the number of CPU "
                        "cores, at most 8. Ignored on GPU/TPU and when XLA_FLAGS already sets a device count. "
                        "(GPU autotuning is also turned off unless XLA_FLAGS sets it: it cost ~8 s of "
                        "compile for no run-time gain on an H200)")
    o.add_argument("--no-cache", action="store_true", help="do not use JAX's persistent compilation cache")
    o.add_argument("--quiet", action="store_true", help="no progress bar or table; print only the output directory")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a directory")
    if args.data_dir is not None and args.data == "bundled":
        parser.error("--data-dir has no effect with --data bundled")
    if args.heldout_size is not None:
        args.heldout = True
    if args.data == "bundled" and args.train_size + (args.heldout_size or 0) > 5000:
        parser.error("--train-size plus --heldout-size exceed the 5000 images of the bundled subset")
    if args.heldout:
        args.heldout_size = args.heldout_size or 1000
    if args.out is None:
        args.out = Path("runs") / datetime.now().strftime("sweep-%Y%m%d-%H%M%S")
    try:
        from experiments.common import check_writable

        check_writable(args.out)
    except OSError as err:
        parser.error(f"--out: {err}")
    return args


def _say(args, *lines):
    if not args.quiet:
        for line in lines:
            print(line, flush=True)


def summary_table(weight_scales, bn_acc, plain_acc, diverged_plain, diverged_bn) -> tuple[str, int]:
    """Per scale: final BN and plain accuracy (mean over seeds), winner; and the number of BN wins."""
    import numpy as np

    bn_final, plain_final = bn_acc[:, :, -1].mean(0), plain_acc[:, :, -1].mean(0)
    lines = [f"{'scale':>10}  {'BN':>6}  {'plain':>6}  winner"]
    wins = 0
    for i, w in enumerate(weight_scales):
        better = bn_final[i] > plain_final[i]
        wins += int(better)
        note = []
        if diverged_bn[:, i].any():
            note.append("BN diverged")
        if diverged_plain[:, i].any():
            note.append("plain diverged")
        winner = "BN" if better else ("tie" if np.isclose(bn_final[i], plain_final[i]) else "plain")
        lines.append(f"{w:>10.4g}  {bn_final[i]:6.3f}  {plain_final[i]:6.3f}  {winner}"
                     + (f"  ({', '.join(note)})" if note else ""))
    lines.append(f"BN wins at {wins} of {len(weight_scales)} scales (final record, mean over seeds)")
    return "\n".join(lines), wins


def main(argv=None) -> int:
    args = parse_args(argv)
    from experiments.common import set_xla_flags

    set_xla_flags(args.cpu_devices)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)

    from bnjax import data, train
    from experiments import common

    cache_dir = None if args.no_cache else common.enable_compilation_cache()
    import_s = time.perf_counter() - _START

    t0 = time.perf_counter()
    try:
        ds = data.load(args.data, args.train_size, args.heldout_size if args.heldout else 0,
                       data_dir=args.data_dir, seed=args.seed)
    except (data.DataUnavailableError, data.ChecksumError, ValueError) as err:
        print(f"error: could not load data ({args.data}): {err}", file=sys.stderr)
        return 1
    data_s = time.perf_counter() - t0

    weight_scales = args.scales or train.book_weight_scales(args.num_scales)
    config = train.SweepConfig(
        weight_scales=tuple(weight_scales), num_records=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, optimizer=args.optimizer, seed=args.seed, num_seeds=args.num_seeds,
        dtype=args.dtype,
    )
    num_models = 2 * len(weight_scales) * args.num_seeds
    _say(args,
         f"bnjax sweep: {num_models} models ({len(weight_scales)} scales x BN/plain x {args.num_seeds} seed(s)), "
         f"{train.num_updates(config, ds.x_train.shape[0])} updates each, on {ds.source['name']} MNIST "
         f"({ds.x_train.shape[0]} training images), {jax.default_backend()} x{jax.device_count()}",
         "compiling...")

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:  # created once compiled, so the bar times training alone
            from tqdm import tqdm

            bar = tqdm(total=total, unit="epoch", desc="training", leave=True)
        bar.update(done - bar.n)

    held = (ds.x_heldout, ds.t_heldout) if args.heldout else (None, None)
    try:
        result = train.run_sweep(config, ds.x_train, ds.t_train, *held, progress=None if args.quiet else progress)
    finally:
        if bar is not None:
            bar.close()
    timing = dict(result.timing, import_s=import_s, data_s=data_s)

    bn, plain = result.train_accuracy["batchnorm"], result.train_accuracy["plain"]
    table, wins = summary_table(weight_scales, bn, plain, result.diverged["plain"], result.diverged["batchnorm"])

    png = None
    if not args.no_plot:
        t0 = time.perf_counter()
        from experiments.plot import plot_sweep

        title = None if args.num_seeds == 1 else f"mean and min..max over {args.num_seeds} seeds"
        png = plot_sweep(weight_scales, bn, plain, args.out / "sweep.png", title=title)
        timing["plot_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - _START

    results = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "weight_scales": list(weight_scales),
        "record_steps": result.record_steps.tolist(),
        "train_accuracy": {k: v.tolist() for k, v in result.train_accuracy.items()},
        "diverged": {k: v.tolist() for k, v in result.diverged.items()},
        "summary": {
            "bn_wins": wins,
            "num_scales": len(weight_scales),
            "final_train_accuracy_mean": {k: v[:, :, -1].mean(0).tolist() for k, v in result.train_accuracy.items()},
        },
        "data": ds.source,
        "timing": timing,
        "environment": dict(common.environment(), compilation_cache=cache_dir),
        "notes": [
            "Accuracy is measured in evaluation mode (running statistics) on the training images, as the book.",
            "Within a seed all models share the mini-batches (the book shares them between BN and plain nets; "
            "bnjax also across scales). BN and plain nets have their own initial weights.",
            "A diverged model (non-finite parameters) is scored as the book scores NaN scores: argmax -> class 0.",
        ],
    }
    if result.heldout_accuracy is not None:
        results["heldout_accuracy"] = {k: v.tolist() for k, v in result.heldout_accuracy.items()}
    common.write_json(args.out / "results.json", results)

    _say(args, "", table, "",
         f"compile {timing['compile_s']:.2f} s, run {timing['run_s']:.2f} s, total {timing['total_s']:.2f} s")
    outputs = ["results.json"] + (["sweep.png"] if png else [])
    print(f"wrote {', '.join(outputs)} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
