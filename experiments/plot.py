"""The book's figure: one panel per weight scale, BN solid, plain dashed (matplotlib lives here, not in bnjax)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

from bnjax._files import atomic_file

# The book's legend and line styles for its two arms; any other arm is drawn with its own name.
LABELS = {"batchnorm": "Batch Normalization", "plain": "Normal(without BatchNorm)"}
STYLES = ("-", "--", ":", "-.")
SHORT = {"batchnorm": "BN", "plain": "plain"}


def grid_shape(num_panels: int) -> tuple[int, int]:
    """(rows, cols): 4 x 4 for the book's 16 scales, near-square otherwise."""
    cols = math.ceil(math.sqrt(num_panels))
    return math.ceil(num_panels / cols), cols


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (files only, no display needed)."""
    _config_dir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _config_dir() -> None:
    """Give matplotlib a writable config/cache directory: with an unwritable or missing HOME it otherwise
    prints a long warning and rebuilds its font cache on every run."""
    if "MPLCONFIGDIR" in os.environ or "matplotlib" in sys.modules:
        return
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    directory = os.path.join(base, "matplotlib")
    probe = directory if os.path.isdir(directory) else base
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        import tempfile

        os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="bnjax-matplotlib-")


def save(fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` as a PNG atomically to ``path`` (never a half-written file) and close it."""
    plt = pyplot()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_sweep(weight_scales, accuracy: dict, path: str | os.PathLike, *, title: str | None = None,
               diverged: dict | None = None) -> Path:
    """Draw ``sweep_figure(...)`` and write it as a PNG atomically to ``path``."""
    return save(sweep_figure(weight_scales, accuracy, title=title, diverged=diverged), path)


def sweep_figure(weight_scales, accuracy: dict, *, title: str | None = None, diverged: dict | None = None):
    """The book's grid: ``accuracy`` (arm name -> ``[seeds, S, R]``), one panel per scale, one line per arm.

    The first arm is solid, the second dashed (the book's BN and plain). With several seeds the line is the
    mean and the shaded band spans min..max over seeds. ``diverged`` (arm name -> ``[seeds, S]``) marks the
    panels where an arm's parameters overflowed (its accuracy there is class 0's share, not learning). The
    legend sits under the panels, where it hides no curve. Returns the matplotlib figure.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = [(np.asarray(acc, float), STYLES[i % len(STYLES)], LABELS.get(name, name))
              for i, (name, acc) in enumerate(accuracy.items())]
    num_scales, num_records = curves[0][0].shape[1], curves[0][0].shape[2]
    rows, cols = grid_shape(num_scales)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    x = np.arange(num_records)
    for i, ax in enumerate(axes.flat):
        if i >= num_scales:
            ax.axis("off")
            continue
        for acc, style, label in curves:
            runs = acc[:, i, :]
            (line,) = ax.plot(x, runs.mean(0), style, label=label, markevery=2)
            if runs.shape[0] > 1:
                ax.fill_between(x, runs.min(0), runs.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(f"W:{weight_scales[i]:.4g}", fontsize=9)
        if diverged is not None:
            marks = []
            for name, flags in diverged.items():
                count = int(np.asarray(flags)[:, i].sum())
                if count:
                    seeds = np.asarray(flags).shape[0]
                    marks.append(f"{SHORT.get(name, name)} diverged"
                                 + (f" ({count}/{seeds})" if seeds > 1 else ""))
            if marks:
                ax.text(0.03, 0.95, "\n".join(marks), transform=ax.transAxes, fontsize=6.5, color="firebrick",
                        va="top")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # records are whole epochs
        ax.set_ylim(0, 1.0)
        row, col = divmod(i, cols)
        if col == 0:
            ax.set_ylabel("accuracy")
        else:
            ax.set_yticks([])
        # Bottom row of the filled panels: no panel below this one.
        if i + cols >= num_scales:
            ax.set_xlabel("epochs")
        else:
            ax.set_xticks([])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    # Fixed margins in inches instead of tight_layout, which costs ~0.2 s of text measuring per figure.
    width, height = fig.get_size_inches()
    top_in = 0.35 + (0.3 if title else 0.0)
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.85 / height, top=1 - top_in / height,
                        wspace=0.06, hspace=0.3)
    return fig
