"""Claim 2 of the book (ch. 6.3): batch norm makes training far less dependent on the initial weights.

The book's figure made statistical: its 16 weight scales ``logspace(0, -4, 16)``, its network and data (1000
images, batch 100, 191 SGD updates at lr 0.01), with and without batch norm, 8 seeds by default, all in one run
of the grid engine. Per scale: mean final training accuracy with a 95 % interval over seeds, and in how many
seeds BN beats plain; over all scales and seeds, a sign test; and for each arm the "trainable width", how many
decades of weight scale reach a mean accuracy of 0.9.

    python -m experiments.init                    # 256 models
    python -m experiments.init --num-seeds 20 --num-scales 31

``python -m experiments.sweep`` stays exactly the book's one-seed figure; seed 0 here is that run.
What the book's own program shows (two seeds): BN above plain at 14 of 16 scales, plain better at w = 0.29
and 0.16, plain stuck at one class for w <= 0.046 and overflowing at w >= 0.54.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bnjax import claims
from experiments import cli, plot, protocol, runtime

ARMS = ("batchnorm", "plain")
THRESHOLD = 0.9
# Accuracies are shares of 1000 images: closer than this is the same count of right answers.
TIE = 1e-6

EPILOG = ("Within a seed, every model sees the same mini-batches; BN and plain nets draw their own initial "
          "weights, as in the book. The sign test counts, over every (scale, seed) pair, how often BN ends "
          "above plain and below it (ties left out), and gives the two-sided probability of a split at least "
          "this uneven if neither were better. ")

NOTES = (
    "Training accuracy in evaluation mode (running statistics), as the book; a diverged model is scored "
    "as the book scores NaN scores (argmax -> class 0).",
    "Within a seed all models share the mini-batches; BN and plain nets draw their own initial weights "
    "(the book's), so a seed pairs them through the data, not the weights.",
    "95 % intervals are Student-t intervals of the mean over seeds; ties (equal accuracy) are left out of "
    "the sign test.",
)


def add_options(p: argparse.ArgumentParser) -> None:
    """The book's protocol: scales, records, batch size, learning rate.

    Args:
      p: the parser.
    """
    cli.add_model_arg(cli.add_book_protocol(p))


def grid_config(args: argparse.Namespace, dataset=None):
    """The engine configuration the options describe: the book's two arms over the weight scales.

    Args:
      args: the parsed options.
      dataset: unused.

    Returns:
      The ``grid.GridConfig``.
    """
    from bnjax import grid

    weight_scales = tuple(args.scales or grid.book_weight_scales(args.num_scales))
    return grid.GridConfig(axes={"weight_scale": weight_scales}, num_records=args.epochs,
                            batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                            num_seeds=args.num_seeds, max_models_per_chunk=args.max_models_per_chunk,
                            **cli.network_fields(args))


def verdict(weight_scales, accuracy: dict) -> dict:
    """The numbers of the claim from the final training accuracies.

    Args:
      weight_scales: ``[S]``.
      accuracy: ``{'batchnorm', 'plain'} -> [seeds, S, R]``.

    Returns:
      ``per_scale`` (a list, one dict per scale: the scale, each arm's mean and 95 % interval, and in how many
      seeds BN won, lost and tied), ``sign_test`` over every (scale, seed) pair, ``trainable_width`` (decades
      per arm) with the ``trainable_scales`` behind it, and ``plain_better_scales`` (where plain wins in more
      seeds than BN: where the claim does not hold).
    """
    final = {arm: np.asarray(accuracy[arm], float)[..., -1] for arm in ARMS}  # [seeds, S]
    stats = {arm: claims.mean_interval(final[arm]) for arm in ARMS}
    wins, losses, ties = claims.paired_counts(final["batchnorm"], final["plain"], TIE)
    per_scale = []
    for i, w in enumerate(weight_scales):
        row = {"scale": float(w)}
        for arm in ARMS:
            mean, lo, hi = stats[arm]
            # An accuracy lies in [0, 1]: the t interval is clipped to it.
            row[arm] = {"mean": float(mean[i]), "low": float(max(lo[i], 0.0)), "high": float(min(hi[i], 1.0))}
        row.update(bn_wins=int(wins[i]), plain_wins=int(losses[i]), ties=int(ties[i]))
        per_scale.append(row)
    total_w, total_l = int(wins.sum()), int(losses.sum())
    return {
        "threshold": THRESHOLD,
        "num_seeds": int(final["plain"].shape[0]),
        "per_scale": per_scale,
        "sign_test": {"bn_wins": total_w, "plain_wins": total_l, "ties": int(ties.sum()),
                      "p_value": claims.sign_test(total_w, total_l)},
        "trainable_width": {arm: claims.trainable_width(weight_scales, stats[arm][0], THRESHOLD) for arm in ARMS},
        "trainable_scales": {arm: [float(w) for w, m in zip(weight_scales, stats[arm][0]) if m >= THRESHOLD]
                             for arm in ARMS},
        "plain_better_scales": [float(w) for w, a, b in zip(weight_scales, wins, losses) if b > a],
    }


def render(results: dict) -> str:
    """The verdict, from a results.json dict.

    Args:
      results: the results as read from results.json.

    Returns:
      Markdown: per scale each arm's mean and 95 % interval and the seeds BN wins (and plain wins); then the
      sign test, the trainable widths and the scales where plain beats BN.
    """
    v = results["verdict"]
    n = v["num_seeds"]
    rows = ["| w | BN mean [95 % interval] | plain mean [95 % interval] | BN wins / seeds |", "|---|---|---|---|"]
    for row in v["per_scale"]:
        cells = [f"{row[a]['mean']:.3f} [{row[a]['low']:.3f}, {row[a]['high']:.3f}]" for a in ARMS]
        rows.append(f"| {row['scale']:.4g} | {cells[0]} | {cells[1]} | {row['bn_wins']} / {n}"
                    + (f" (plain {row['plain_wins']})" if row["plain_wins"] else "") + " |")
    s = v["sign_test"]
    lines = [f"BN ends above plain in {s['bn_wins']} of {s['bn_wins'] + s['plain_wins'] + s['ties']} "
             f"(scale, seed) pairs, below in {s['plain_wins']}, tied in {s['ties']}; sign test p = {s['p_value']:.2g}"]
    tw = v["trainable_width"]
    lines.append(f"trainable width (mean accuracy >= {v['threshold']}): BN {tw['batchnorm']:.2f} decades of weight "
                 f"scale, plain {tw['plain']:.2f}")
    if v["plain_better_scales"]:
        lines.append("plain beats BN in most seeds at w = " + ", ".join(f"{w:.3g}" for w in v["plain_better_scales"]))
    return "\n".join([f"Final training accuracy after {results['record_steps'][-1]} updates, {n} seeds.", "",
                      *rows, "", *[f"- {line}" for line in lines]]) + "\n"


def accuracy_figure(weight_scales, accuracy: dict, num_updates: int):
    """Final training accuracy against the weight scale, with 95 % intervals over seeds.

    Args:
      weight_scales: ``[S]``.
      accuracy: ``{'batchnorm', 'plain'} -> [seeds, S, R]``.
      num_updates: updates per model, for the axis label.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for arm, marker in zip(ARMS, ("o", "s")):
        mean, lo, hi = claims.mean_interval(np.asarray(accuracy[arm], float)[..., -1])
        (line,) = ax.plot(weight_scales, mean, marker=marker, markersize=3, label=plot.arm_label(arm),
                          **plot.arm_style(arm))
        ax.fill_between(weight_scales, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.axhline(THRESHOLD, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("weight init scale w")
    ax.set_ylabel(f"training accuracy after {num_updates} updates")
    n = np.asarray(accuracy[ARMS[0]]).shape[0]
    ax.set_title(f"mean and 95 % interval over {n} seed(s)", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def analyse(run: protocol.Run) -> dict:
    """The verdict from the final training accuracies.

    Args:
      run: the run.

    Returns:
      ``weight_scales`` and ``verdict``.
    """
    weight_scales = run.config.axes["weight_scale"]
    return {"weight_scales": list(weight_scales),
            "verdict": verdict(weight_scales, run.result.metrics["train_accuracy"])}


def _accuracy_figure(run: protocol.Run):
    fig = accuracy_figure(run.config.axes["weight_scale"], run.result.metrics["train_accuracy"],
                          int(run.result.record_steps[-1]))
    if cli.network_title(run.args):
        fig.suptitle(cli.network_title(run.args).rstrip(": "), fontsize=10)
    return fig


def _panels_figure(run: protocol.Run):
    return plot.sweep_figure(run.config.axes["weight_scale"], run.result.metrics["train_accuracy"],
                             title=f"{cli.network_title(run.args)}mean and min..max over {run.args.num_seeds} seed(s)",
                             diverged=run.result.diverged)


EXPERIMENT = protocol.Experiment(
    name="init",
    title="Claim 2: less dependence on the initial weights",
    question="Claim 2: does BN make training less dependent on the initial weights?",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    num_seeds=8,
    grid=grid_config,
    describe=lambda args, config: (f"{len(config.axes['weight_scale'])} scales x BN/plain x {args.num_seeds} "
                                   "seed(s)"),
    analyse=analyse,
    render=render,
    notes=NOTES,
    figures=(protocol.Figure("init.png", _accuracy_figure), protocol.Figure("init_panels.png", _panels_figure)),
    quick=("--scales", "0.3,0.01", "--epochs", "3", "--num-seeds", "2", "--train-size", "200"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
