"""The book's Batch Normalization experiment (Deep Learning from Scratch, ch. 6.3), as one compiled program.

Trains the 784-100-100-100-100-100-10 network (or, with ``--model convnet``, the book's ch. 7 SimpleConvNet) with
and without batch norm at every weight-init scale
(all models in parallel with jax.vmap, on every device), records training accuracy, draws the book's grid of
curves and writes results.json. The defaults are the book's protocol; every option below can change it.

    python -m experiments.sweep                      # the book's 16 scales on the bundled MNIST subset
    python -m experiments.sweep --num-seeds 5 --heldout --optimizer adam
"""

from __future__ import annotations

import argparse
import sys

from bnjax import options
from experiments import cli, plot, protocol, runtime

# The two arms of the book, in its order (BN solid, plain dashed in the figure).
ARM_NAMES = ("batchnorm", "plain")

EPILOG = ("Within a seed, every model (all scales, BN and plain) sees the same mini-batches: the book shares "
          "them between its BN and plain nets, bnjax also across scales, so the scale is the only difference "
          "between panels. BN and plain nets draw their own initial weights, as in the book. ")

NOTES = (
    "Accuracy and loss are measured in evaluation mode (running statistics), as the book; the loss is the "
    "mean cross-entropy without weight decay, null where the model diverged.",
    "Within a seed all models share the mini-batches (the book shares them between BN and plain nets; "
    "bnjax also across scales). BN and plain nets have their own initial weights.",
    "A diverged model (non-finite parameters) is scored as the book scores NaN scores: argmax -> class 0.",
)


def add_options(p: argparse.ArgumentParser) -> None:
    """The book's protocol, every part an option.

    Args:
      p: the parser.
    """
    g = cli.add_book_protocol(p)
    cli.add_model_arg(g)
    g.add_argument("--optimizer", choices=options.OPTIMIZERS, default="sgd", help="optax optimizer (default: sgd)")
    g.add_argument("--dtype", choices=options.DTYPES, default="float32",
                   help="parameter/activation dtype; BN statistics stay float32 (default: float32)")


def add_heldout_options(p: argparse.ArgumentParser) -> None:
    """``--heldout`` and ``--heldout-size``, listed after the common options.

    Args:
      p: the parser.
    """
    h = p.add_argument_group("held-out images")
    h.add_argument("--heldout", action="store_true", help="also record accuracy on held-out images")
    h.add_argument("--heldout-size", type=cli.int_in(1, cli.MAX_SIZE), metavar="N",
                   help="held-out images to score (default: 1000; implies --heldout)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--heldout-size`` implies ``--heldout``, whose default size is 1000.

    Args:
      parser: the parser.
      args: the parsed options, completed here.
    """
    if args.heldout_size is not None:
        args.heldout = True
    if args.heldout:
        args.heldout_size = args.heldout_size or 1000


def grid_config(args: argparse.Namespace, dataset=None):
    """The engine configuration the options describe: the book's two arms over the weight scales.

    Args:
      args: the parsed options.
      dataset: unused (the grid does not depend on the data).

    Returns:
      The ``grid.GridConfig``; the book's arms and protocol are its defaults, the options change what they name.
    """
    from bnjax import grid

    weight_scales = args.scales or grid.book_weight_scales(args.num_scales)
    return grid.GridConfig(
        axes={"weight_scale": tuple(weight_scales)}, num_records=args.epochs, batch_size=args.batch_size,
        learning_rate=args.lr, optimizer=args.optimizer, seed=args.seed, num_seeds=args.num_seeds,
        dtype=args.dtype, max_models_per_chunk=args.max_models_per_chunk, **cli.network_fields(args),
    )


def summary_table(weight_scales, final_accuracy: dict, diverged: dict) -> tuple[str, dict]:
    """Per scale: each arm's final accuracy (mean over seeds) and the best arm; and each arm's wins.

    Args:
      weight_scales: ``[S]``.
      final_accuracy: arm -> ``[seeds, S, R]`` accuracy (the last record is used).
      diverged: arm -> ``[seeds, S]``.

    Returns:
      ``(table, wins)``: a markdown table (one row per scale, then a sentence) and ``wins[arm]``, the scales
      where the arm is strictly above every other arm.
    """
    import numpy as np

    names = list(final_accuracy)
    final = {a: np.asarray(v)[:, :, -1].mean(0) for a, v in final_accuracy.items()}
    labels = {a: plot.arm_short(a) for a in names}
    lines = ["| scale | " + " | ".join(labels[a] for a in names) + " | winner |",
             "|---|" + "---|" * (len(names) + 1)]
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
        lines.append(f"| {w:.4g} | " + " | ".join(f"{final[a][i]:.3f}" for a in names) + f" | {winner}"
                     + (f" ({', '.join(notes)})" if notes else "") + " |")
    first = names[0]
    lines += ["", f"{labels[first]} wins at {wins[first]} of {len(weight_scales)} scales "
              "(final record, mean over seeds)"]
    return "\n".join(lines), wins


def analyse(run: protocol.Run) -> dict:
    """The summary of the sweep: wins per arm and each arm's final accuracy per scale.

    Args:
      run: the run (its engine result).

    Returns:
      ``weight_scales`` and ``summary`` (``bn_wins``, ``wins``, ``num_scales``, ``final_train_accuracy_mean``).
    """
    weight_scales = run.config.axes["weight_scale"]
    accuracy = run.result.metrics["train_accuracy"]
    _, wins = summary_table(weight_scales, accuracy, run.result.diverged)
    return {
        "weight_scales": list(weight_scales),
        "summary": {
            "bn_wins": wins["batchnorm"],
            "wins": wins,
            "num_scales": len(weight_scales),
            "final_train_accuracy_mean": {k: v[:, :, -1].mean(0) for k, v in accuracy.items()},
        },
    }


def render(results: dict) -> str:
    """The summary table, from a results.json dict.

    Args:
      results: the results as read from results.json.

    Returns:
      Markdown: one row per scale (each arm's final accuracy, mean over seeds; the winner), then BN's wins.
    """
    return summary_table(results["weight_scales"], results["train_accuracy"], results["diverged"])[0] + "\n"


def draw_sweep(run: protocol.Run):
    """The book's figure of this run (``plot.sweep_figure``).

    Args:
      run: the run.

    Returns:
      The matplotlib figure.
    """
    args = run.args
    seeds = "" if args.num_seeds == 1 else f"mean and min..max over {args.num_seeds} seeds"
    title = (cli.network_title(args) + seeds).rstrip(": ")
    return plot.sweep_figure(run.config.axes["weight_scale"], run.result.metrics["train_accuracy"], title=title or None,
                             diverged=run.result.diverged)


EXPERIMENT = protocol.Experiment(
    name="sweep",
    title="The book's figure",
    question="The book's figure: BN against plain at 16 weight scales (ch. 6.3).",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    late_options=add_heldout_options,
    check=check,
    heldout=lambda args: args.heldout_size if args.heldout else 0,
    grid=grid_config,
    describe=lambda args, config: (f"{len(config.axes['weight_scale'])} scales x BN/plain x {args.num_seeds} "
                                   "seed(s)"),
    unit="epoch",
    analyse=analyse,
    render=render,
    notes=NOTES,
    figures=(protocol.Figure("sweep.png", draw_sweep),),
    quick=("--scales", "0.08,0.05,0.03,0.02,0.01", "--epochs", "2", "--num-seeds", "2", "--train-size", "300",
           "--heldout-size", "100"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
