"""The figures of ``experiments.activations``: the book's histograms (part 1) and the trained networks'
statistics against the weight scale (part 2)."""

from __future__ import annotations

from experiments import plot
from experiments.activations_part1 import DEPTH, config_names


def histogram_figure(histograms: dict, activation: str):
    """The book's row of histograms ("1-layer" .. "5-layer") per configuration of ``activation``, the BN row
    under its plain row.

    Args:
      histograms: config name -> ``activations_part1.layer_histograms(...)``.
      activation: ``'sigmoid'`` or ``'relu'``.

    Returns:
      The matplotlib figure.
    """
    plt = plot.pyplot()
    names = [n for n in config_names() if n.startswith(activation + "/") and n in histograms]
    rows, cols = len(names), max(len(histograms[n]) for n in names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.9, 1.05 * rows + 0.8), squeeze=False,
                             sharey="row")
    for r, name in enumerate(names):
        _, std, arm = name.split("/")
        for c, h in enumerate(histograms[name]):
            ax = axes[r, c]
            ax.stairs(h["counts"], h["edges"], fill=True, color=plot.arm_style(arm)["color"])
            lo, top = h["edges"][0], h["edges"][-1]
            ax.set_xlim(lo, top)
            ax.tick_params(labelsize=6, length=2, pad=1)
            if activation == "sigmoid":
                ax.set_xticks([0, 0.5, 1])
                ax.set_xticklabels(["0", "0.5", "1"] if r == rows - 1 else [])
            else:
                # One range per row: the first panel names it, the others share it.
                ax.set_xticks([0, top])
                ax.set_xticklabels(["0", f"{top:.2g}"] if c == 0 else [])
                for label, align in zip(ax.get_xticklabels(), ("left", "right")):
                    label.set_horizontalalignment(align)
                ax.text(0.97, 0.92, f"0: {100 * h['zero']:.0f} %\nstd {h['std']:.2g}", transform=ax.transAxes,
                        ha="right", va="top", fontsize=6)
            if r == 0:
                ax.set_title(f"{c + 1}-layer", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{std}\n{plot.arm_short(arm)}", fontsize=7)
            else:
                ax.tick_params(labelleft=False)
    if activation == "sigmoid":
        title = "sigmoid activations per layer, plain and with batch norm (30 bins over (0, 1))"
    else:
        title = ("ReLU activations per layer, plain and with batch norm (positive outputs, 30 bins over one range "
                 "per row: 0 to the largest 99th percentile)")
    fig.suptitle(title, fontsize=9)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.1 / width, bottom=0.3 / height, top=1 - 0.55 / height,
                        wspace=0.08, hspace=0.25)
    return fig


def trained_figure(weight_scales, stats: dict, layers=(1, DEPTH), flat_std: float = 1e-3):
    """x = weight scale (log): activation std and share of exact zeros of ``layers``, before and after
    training; each arm in its ``plot.arm_style`` line style (BN solid, plain dashed), a colour per layer; mean
    over seeds.

    Args:
      weight_scales: ``[S]``.
      stats: arm -> ``{'before', 'after'}`` -> statistic -> ``[seeds, S, layers]`` (``trained_stats``).
      layers: the layers drawn (1-based).
      flat_std: the std below which a layer counts as flat, drawn as a dotted line.

    Returns:
      The matplotlib figure.
    """
    import numpy as np

    plt = plot.pyplot()
    rows = [("std", "activation std", True)]
    if any("zero" in st for whens in stats.values() for st in whens.values()):
        rows.append(("zero", "share of outputs = 0", False))
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.0, 3.0 * len(rows) + 0.5), squeeze=False, sharex=True,
                             sharey="row")
    for r, (key, label, log) in enumerate(rows):
        for c, when in enumerate(("before", "after")):
            ax = axes[r, c]
            for arm, whens in stats.items():
                st = whens[when]
                if key not in st:
                    continue
                values = np.asarray(st[key], float).mean(axis=0)  # [S, L]
                for k, layer in enumerate(layers):
                    ax.plot(weight_scales, values[:, layer - 1], linestyle=plot.arm_style(arm)["linestyle"],
                            color=f"C{k}", marker=".", markersize=4, label=f"layer {layer}, {plot.arm_short(arm)}")
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
                ax.axhline(flat_std, color="0.5", linestyle=":", linewidth=0.8)
            else:
                ax.set_ylim(-0.02, 1.02)
            if r == 0:
                ax.set_title(f"{when} training", fontsize=10)
            if c == 0:
                ax.set_ylabel(label)
            if r == len(rows) - 1:
                ax.set_xlabel("weight init std")
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle("the sweep's networks on the training images (batch norm in training mode)", fontsize=10)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.65 / height,
                        wspace=0.08, hspace=0.15)
    return fig
