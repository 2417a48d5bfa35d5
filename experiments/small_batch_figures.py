"""The figures and names of ``experiments.small_batch``: held-out accuracy and the train/evaluation mismatch
against the batch size, and the running averages against precise statistics."""

from __future__ import annotations

import numpy as np

from experiments import plot

NORMS = ("plain", "batchnorm", "renorm", "ghost", "groupnorm", "layernorm")
# The norms with running statistics: the ones with a train/evaluation mismatch and precise statistics.
NORMALISED = ("batchnorm", "renorm", "ghost")
# Every norm (not the plain net): the candidates of the verdict's best norm per batch size.
CANDIDATES = NORMS[1:]
# The names and styles experiments/plot.py does not know (it has the book's arms, Batch Renorm and Ghost BN); their
# own markers too, as their lines run close to the plain net's and BN's above B = 8.
_NAMES = {"groupnorm": "Group Norm", "layernorm": "Layer Norm"}
_STYLES = {"groupnorm": {"linestyle": "-", "color": "C4", "marker": "s"},
           "layernorm": {"linestyle": "--", "color": "C5", "marker": "^"}}


def arm_name(norm: str, batch_size: int) -> str:
    """The engine's arm name of a norm at a batch size.

    Args:
      norm: one of ``NORMS``.
      batch_size: the (virtual) batch size.

    Returns:
      ``'<norm>@<batch_size>'``.
    """
    return f"{norm}@{batch_size}"


def norm_name(norm: str) -> str:
    """A norm's short name, for tables and sentences.

    Args:
      norm: one of ``NORMS``.

    Returns:
      ``plot.arm_short``'s, or Group Norm's and Layer Norm's own.
    """
    return _NAMES.get(norm) or plot.arm_short(norm)


def label(norm: str) -> str:
    """A norm's legend label.

    Args:
      norm: one of ``NORMS``.

    Returns:
      ``plot.arm_label``'s, or Group Norm's and Layer Norm's own.
    """
    return _NAMES.get(norm) or plot.arm_label(norm)


def style(norm: str) -> dict:
    """A norm's line style, colour and marker.

    Args:
      norm: one of ``NORMS``.

    Returns:
      ``{'linestyle', 'color', 'marker'}``: ``plot.arm_style``'s with dots, or Group Norm's and Layer Norm's own.
    """
    return dict(_STYLES.get(norm) or {**plot.arm_style(norm), "marker": "o"})


def _best_runs(batch_sizes, best: list) -> str:
    """``'Layer Norm at B = 2-32, BN at B = 100'``: consecutive batch sizes with the same best norm joined."""
    parts, start = [], 0
    for i in range(1, len(batch_sizes) + 1):
        if i == len(batch_sizes) or best[i] != best[start]:
            span = str(batch_sizes[start]) if i - 1 == start else f"{batch_sizes[start]}-{batch_sizes[i - 1]}"
            parts.append(f"{norm_name(best[start])} at B = {span}")
            start = i
    return ", ".join(parts)


def best_norm(means: dict) -> str:
    """The best of ``CANDIDATES`` by mean held-out accuracy; the first in their order among equal means.

    Args:
      means: norm -> mean held-out accuracy, for every norm of ``CANDIDATES``.

    Returns:
      The norm's name.
    """
    return max(CANDIDATES, key=lambda n: (means[n], -CANDIDATES.index(n)))


def figure(batch_sizes, heldout: dict, post: dict, num_seeds: int):
    """Held-out accuracy (left, a star on the best norm at each batch size) and the train/evaluation mismatch
    (right, the norms with running statistics) against the batch size, one line per norm in its
    ``plot.arm_style``.

    Args:
      batch_sizes: ``[K]``.
      heldout: arm name -> final held-out accuracy ``[seeds]``.
      post: ``after_training``'s output.
      num_seeds: seeds, for the title.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for norm in NORMS:
        line = dict(markersize=3, label=label(norm), **style(norm))
        plot.band(left, batch_sizes, np.stack([heldout[arm_name(norm, b)] for b in batch_sizes], -1), **line)
        if norm not in NORMALISED:  # no running statistics: nothing to mismatch
            continue
        gap = np.stack([post[arm_name(norm, b)]["train_mode"] - post[arm_name(norm, b)]["eval_mode"]
                        for b in batch_sizes], -1)
        plot.band(right, batch_sizes, gap, **line)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.set_xlabel("(virtual) batch size B, lr scaled with B")
    # The verdict's best norm at each batch size (the highest mean over seeds), a star in its colour.
    bests = []
    for b in batch_sizes:
        means = {n: float(np.mean(heldout[arm_name(n, b)])) for n in CANDIDATES}
        bests.append(best_norm(means))
        left.plot([b], [means[bests[-1]]], marker="*", markersize=12, linestyle="none",
                  color=style(bests[-1])["color"], markeredgecolor="black", markeredgewidth=0.5, zorder=5)
    left.plot([], [], marker="*", markersize=10, linestyle="none", color="white", markeredgecolor="black",
              label="best norm at B")
    left.set_ylim(0, 1.0)
    left.set_ylabel("held-out accuracy (evaluation mode)")
    right.axhline(0.0, color="grey", lw=0.5)
    right.set_ylabel("training-mode minus evaluation-mode\naccuracy on the training images")
    left.legend(loc="lower right", fontsize=8)
    left.set_title("best norm by mean (star; intervals in the verdict): " + _best_runs(list(batch_sizes), bests),
                   fontsize=8)
    right.set_title("norms with running statistics (Group and Layer Norm: none, 0)", fontsize=8)
    fig.suptitle(f"mean and min..max over {num_seeds} seed(s)", fontsize=10)
    fig.tight_layout()
    return fig


def precise_figure(batch_sizes, heldout: dict, post: dict, num_seeds: int):
    """Per normalised norm: held-out accuracy with the running averages (solid) and after precise statistics
    (dashed) against the batch size.

    Args:
      batch_sizes: ``[K]``.
      heldout: arm name -> final held-out accuracy ``[seeds]``.
      post: ``after_training``'s output.
      num_seeds: seeds, for the title.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    fig, axes = plt.subplots(1, len(NORMALISED), figsize=(3.6 * len(NORMALISED), 3.4), sharey=True)
    for ax, norm in zip(axes, NORMALISED):
        dots = dict(marker="o", markersize=3)
        plot.band(ax, batch_sizes, np.stack([heldout[arm_name(norm, b)] for b in batch_sizes], -1), linestyle="-",
                  label="running averages", **dots)
        plot.band(ax, batch_sizes, np.stack([post[arm_name(norm, b)]["heldout_precise"] for b in batch_sizes], -1),
                  linestyle="--", label="precise statistics", **dots)
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.set_title(label(norm), fontsize=10)
        ax.set_xlabel("(virtual) batch size B")
        ax.set_ylim(0, 1.0)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"running averages vs precise statistics (batches of B); mean and min..max over {num_seeds} "
                 "seed(s)", fontsize=10)
    fig.tight_layout()
    return fig
