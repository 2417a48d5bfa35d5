"""The book's Batch Normalization experiment (Deep Learning from Scratch, ch. 6.3), as one compiled program.

Trains the 784-100-100-100-100-100-10 network with and without batch norm at every weight-init scale
(all models in parallel with jax.vmap, on every device), records training accuracy, draws the book's grid of
curves and writes results.json. The defaults are the book's protocol; every option below can change it.

    python -m experiments.sweep                      # the book's 16 scales on the bundled MNIST subset
    python -m experiments.sweep --num-seeds 5 --heldout --optimizer adam
"""

from __future__ import annotations

import argparse
import sys
import time

from bnjax import options
from experiments import harness

_START = time.perf_counter()

# The two arms of the book, in its order (BN solid, plain dashed in the figure).
ARM_NAMES = ("batchnorm", "plain")


def build_parser() -> argparse.ArgumentParser:
    p = harness.new_parser("sweep", __doc__, (
            "Within a seed, every model (all scales, BN and plain) sees the same mini-batches: the book shares "
            "them between its BN and plain nets, bnjax also across scales, so the scale is the only difference "
            "between panels. BN and plain nets draw their own initial weights, as in the book. "
        ))
    g = p.add_argument_group("protocol (defaults: the book's)")
    harness.add_scale_args(g)
    harness.add_epochs_arg(g)
    g.add_argument("--batch-size", type=harness.int_in(1, 100_000), default=100,
                   help="mini-batch size, drawn with replacement (default: 100)")
    g.add_argument("--lr", type=harness.positive_float, default=0.01, help="learning rate (default: 0.01)")
    g.add_argument("--optimizer", choices=options.OPTIMIZERS, default="sgd", help="optax optimizer (default: sgd)")
    g.add_argument("--dtype", choices=options.DTYPES, default="float32",
                   help="parameter/activation dtype; BN statistics stay float32 (default: float32)")
    harness.add_common_args(p)
    h = p.add_argument_group("held-out images")
    h.add_argument("--heldout", action="store_true", help="also record accuracy on held-out images")
    h.add_argument("--heldout-size", type=harness.int_in(1, harness.MAX_SIZE), metavar="N",
                   help="held-out images to score (default: 1000; implies --heldout)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heldout_size is not None:
        args.heldout = True
    if args.heldout:
        args.heldout_size = args.heldout_size or 1000
    return harness.check_common_args(parser, args, "sweep", args.heldout_size or 0)


def summary_table(weight_scales, final_accuracy: dict, diverged: dict) -> tuple[str, dict]:
    """Per scale: each arm's final accuracy (mean over seeds) and the best arm; and each arm's wins.

    Args:
      weight_scales: ``[S]``.
      final_accuracy: arm -> ``[seeds, S, R]`` accuracy (the last record is used).
      diverged: arm -> ``[seeds, S]``.

    Returns:
      ``(table, wins)`` with ``wins[arm]`` the scales where the arm is strictly above every other arm.
    """
    import numpy as np

    names = list(final_accuracy)
    final = {a: np.asarray(v)[:, :, -1].mean(0) for a, v in final_accuracy.items()}
    labels = {a: ("BN" if a == "batchnorm" else a) for a in names}
    lines = [f"{'scale':>10}  " + "  ".join(f"{labels[a]:>9}" for a in names) + "  winner"]
    wins = {a: 0 for a in names}
    for i, w in enumerate(weight_scales):
        values = np.array([final[a][i] for a in names])
        best = int(np.argmax(values))
        others = np.delete(values, best)
        if others.size and np.any(np.isclose(others, values[best])):
            winner = "tie"
        else:
            winner = labels[names[best]]
            wins[names[best]] += 1
        notes = [f"{labels[a]} diverged" for a in names if np.asarray(diverged[a])[:, i].any()]
        lines.append(f"{w:>10.4g}  " + "  ".join(f"{final[a][i]:9.3f}" for a in names) + f"  {winner}"
                     + (f"  ({', '.join(notes)})" if notes else ""))
    first = names[0]
    lines.append(f"{labels[first]} wins at {wins[first]} of {len(weight_scales)} scales "
                 "(final record, mean over seeds)")
    return "\n".join(lines), wins


def main(argv=None) -> int:
    args = parse_args(argv)
    started = harness.start(args, x64=args.dtype == "float64")
    from bnjax import grid
    from experiments import plot

    ds, data_s = harness.load_timed(args, args.heldout_size if args.heldout else 0)

    weight_scales = args.scales or grid.book_weight_scales(args.num_scales)
    # The book's arms and protocol are GridConfig's defaults; the options change what they name.
    config = grid.GridConfig(
        axes={"weight_scale": tuple(weight_scales)}, num_records=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, optimizer=args.optimizer, seed=args.seed, num_seeds=args.num_seeds,
        dtype=args.dtype, max_models_per_chunk=args.max_models_per_chunk,
    )
    result, timing = harness.run_engine(
        args, started, config, ds, name="sweep", heldout=args.heldout, unit="epoch",
        what=f"{len(weight_scales)} scales x BN/plain x {args.num_seeds} seed(s)")
    timing["data_s"] = data_s
    if not started["is_main"]:  # process 0 alone writes
        return 0

    accuracy = result.metrics["train_accuracy"]
    table, wins = summary_table(weight_scales, accuracy, result.diverged)

    results = harness.results_record(
        args, result, ds, timing, cache_dir=started["cache_dir"],
        weight_scales=list(weight_scales),
        summary={
            "bn_wins": wins["batchnorm"],
            "wins": wins,
            "num_scales": len(weight_scales),
            "final_train_accuracy_mean": {k: v[:, :, -1].mean(0) for k, v in accuracy.items()},
        },
        notes=[
            "Accuracy and loss are measured in evaluation mode (running statistics), as the book; the loss is the "
            "mean cross-entropy without weight decay, null where the model diverged.",
            "Within a seed all models share the mini-batches (the book shares them between BN and plain nets; "
            "bnjax also across scales). BN and plain nets have their own initial weights.",
            "A diverged model (non-finite parameters) is scored as the book scores NaN scores: argmax -> class 0.",
        ],
    )
    title = None if args.num_seeds == 1 else f"mean and min..max over {args.num_seeds} seeds"
    harness.finish(args, results, {"sweep.png": lambda: plot.sweep_figure(weight_scales, accuracy, title=title,
                                                                        diverged=result.diverged)},
                   [table], _START)
    return 0


if __name__ == "__main__":
    sys.exit(harness.main_wrapper(main))
