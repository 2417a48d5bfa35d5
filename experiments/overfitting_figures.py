"""The figures of ``experiments.overfitting``: the book's view (training and held-out accuracy against the
epochs, a panel per net and regulariser) and the study's (held-out accuracy against the learning rate, a panel
per training size, a line per net)."""

from __future__ import annotations

import numpy as np

from experiments import overfitting_lr_verdict as lr_verdict
from experiments import plot
from experiments.overfitting_lr import NETS, REGULARISERS

__all__ = ["book_figure", "study_figure"]

# Each regulariser's marker in the study's figure (the net keeps its plot.arm_style).
MARKERS = {"none": "o", "weight_decay": "s", "dropout": "^", "dropout+weight_decay": "D"}


def book_figure(epochs, metrics: dict, num_seeds: int, weight_decay: float, dropout_ratio: float):
    """2 x 4 panels: rows plain and BN; columns none, weight decay, dropout, both. Training accuracy solid,
    held-out dashed; mean over seeds with a min..max band.

    Args:
      epochs: ``[R]`` epoch of each record.
      metrics: ``'train_accuracy'`` and ``'heldout_accuracy'`` -> arm name -> ``[seeds, 2, R]``.
      num_seeds: seeds, for the title.
      weight_decay: lambda, for the panels' titles.
      dropout_ratio: for the panels' titles.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    x = np.asarray(epochs)
    titles = {"none": "", "weight_decay": f" + weight decay {weight_decay:g}", "dropout": f" + dropout {dropout_ratio:g}",
              "dropout+weight_decay": " + dropout + weight decay"}
    fig, axes = plt.subplots(len(NETS), len(REGULARISERS), figsize=(3.2 * len(REGULARISERS), 2.7 * len(NETS)),
                             squeeze=False, sharex=True, sharey=True)
    for r, net in enumerate(NETS):
        for c, (reg, (drop, decay)) in enumerate(REGULARISERS.items()):
            ax = axes[r, c]
            arm = net + ("+dropout" if drop else "")
            for metric, style, label in (("train_accuracy", "-", "train"), ("heldout_accuracy", "--", "held-out")):
                runs = np.asarray(metrics[metric][arm], float)[:, int(decay)]
                (line,) = ax.plot(x, runs.mean(0), style, label=label)
                if runs.shape[0] > 1:
                    ax.fill_between(x, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_ylim(0, 1.0)
            ax.set_title(plot.arm_short(net) + titles[reg], fontsize=9)
            if c == 0:
                ax.set_ylabel("accuracy")
            if r == len(NETS) - 1:
                ax.set_xlabel("epochs")
    axes[-1, -1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"training (solid) and held-out (dashed) accuracy; mean and min..max over {num_seeds} seed(s)",
                 fontsize=10)
    fig.tight_layout()
    return fig


def study_figure(lrs, sizes, per_size: list, verdict: dict, num_seeds: int, updates: int):
    """Held-out accuracy against the learning rate (log x), one panel per training size, one line per
    combination (mean and min..max band over seeds); each line's best learning rate starred, the learning
    rates where it cannot train crossed and named in the panel, the book's learning rate dotted.

    Args:
      lrs: ``[L]`` learning rates.
      sizes: ``[S]`` training sizes.
      per_size: per size, combination -> ``{'heldout': [seeds, L], ...}`` (``overfitting_lr_verdict.final_values``).
      verdict: ``overfitting_lr_verdict.verdict``'s output.
      num_seeds: seeds, for the title.
      updates: updates of every model, for the title.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    lrs = np.asarray(lrs, float)
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(3.6 * len(sizes) + 0.6, 8.0), 4.0), squeeze=False,
                             sharey=True)
    ref = verdict["reference_lr"]
    for ax, n, values, summary in zip(axes[0], sizes, per_size, verdict["sizes"]):
        notes = []
        for name, v in values.items():
            net, _, reg = name.partition("+")
            style = dict(plot.arm_style(net), marker=MARKERS[reg or "none"], markersize=4)
            label = lr_verdict.combination_label(name, short=reg != "")
            line = plot.band(ax, lrs, v["heldout"], label=label, **style)
            combo = summary["combinations"][name]
            mean = np.asarray(v["heldout"], float).mean(0)
            if combo["best"] is not None:
                i = combo["best"]["index"]
                ax.plot([lrs[i]], [mean[i]], marker="*", markersize=13, color=line.get_color(), linestyle="none",
                        markeredgecolor="black", markeredgewidth=0.5)
            bad = [i for i, c in enumerate(combo["cells"]) if c["cannot_train"]]
            if bad:
                ax.plot(lrs[bad], mean[bad], marker="x", markersize=9, color="firebrick", linestyle="none")
                notes.append(f"{lr_verdict.combination_label(name)} cannot train at lr "
                             + ", ".join(f"{lr:g}" for lr in lrs[bad]))
        if lrs.min() <= ref <= lrs.max():
            ax.axvline(ref, color="grey", linestyle=":", linewidth=1)
        if notes:  # between chance (where a net that cannot train ends) and the trained nets' accuracies
            ax.text(0.07, 0.42, "\n".join(notes), transform=ax.transAxes, fontsize=7, color="firebrick", va="top")
        ax.set_xscale("log")
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
        ax.minorticks_off()
        epochs = f", {summary['epochs']:.0f} epochs" if summary["epochs"] is not None else ""
        ax.set_title(f"{n:,} training images{epochs}", fontsize=10)
        ax.set_xlabel("learning rate")
        ax.set_ylim(0, 1.0)
    axes[0, 0].set_ylabel("final held-out accuracy")
    axes[0, 0].legend(loc="upper left", fontsize=7)
    fig.suptitle(f"final held-out accuracy after {updates} updates, mean and min..max over {num_seeds} seed(s)\n"
                 f"star: each line's best lr; x: cannot train there; dotted: the book's lr {ref:g}", fontsize=9)
    fig.tight_layout()
    return fig
