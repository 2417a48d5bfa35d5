"""The one place for the figures' conventions (each arm's label, short name, line style and colour), the book's
figure (one panel per weight scale, BN solid, plain dashed), and saving. matplotlib lives here, not in bnjax."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bnjax.files import atomic_file

# Every figure and table names and draws an arm (a kind of net) the same way. The book's legend for its two
# arms; an arm not listed here is drawn with its own name.
ARM_LABELS = {"batchnorm": "Batch Normalization", "plain": "Normal(without BatchNorm)", "renorm": "Batch Renorm",
              "ghost": "Ghost BN (virtual batch)"}
# In tables, sentences and panel notes.
ARM_SHORT = {"batchnorm": "BN", "plain": "plain", "renorm": "Batch Renorm", "ghost": "Ghost BN"}
# (line style, colour): BN solid, plain dashed, as in the book.
ARM_STYLES = {"batchnorm": ("-", "C0"), "plain": ("--", "C1"), "renorm": (":", "C2"), "ghost": ("-.", "C3")}
# Line styles of arms not in ARM_STYLES, by their position.
STYLES = ("-", "--", ":", "-.")


def arm_label(name: str) -> str:
    """The legend label of an arm.

    Args:
      name: the arm's name (``batchnorm``, ``plain``, ``renorm``, ``ghost`` or another).

    Returns:
      ``ARM_LABELS[name]``, else ``name``.
    """
    return ARM_LABELS.get(name, name)


def arm_short(name: str) -> str:
    """The short name of an arm, for tables and notes.

    Args:
      name: the arm's name.

    Returns:
      ``ARM_SHORT[name]``, else ``name``.
    """
    return ARM_SHORT.get(name, name)


def arm_style(name: str, index: int = 0) -> dict:
    """The line style and colour of an arm.

    Args:
      name: the arm's name.
      index: its position among the arms drawn, for an arm not in ``ARM_STYLES``.

    Returns:
      ``{'linestyle', 'color'}`` keyword arguments for ``Axes.plot``.
    """
    style, color = ARM_STYLES.get(name, (STYLES[index % len(STYLES)], f"C{index % 10}"))
    return {"linestyle": style, "color": color}


def band(ax, x, runs, *, center: str = "mean", **line) -> Any:
    """One line per arm with its spread over seeds: the mean (or median) and a min..max band.

    Args:
      ax: the matplotlib axes.
      x: ``[K]`` positions.
      runs: ``[seeds, K]`` values.
      center: ``'mean'`` or ``'median'`` over seeds for the line.
      **line: keyword arguments of ``Axes.plot`` (``label``, ``linestyle``, ``color``, ``marker``, ...).

    Returns:
      The line drawn (the band, with several seeds only, shares its colour).
    """
    runs = np.asarray(runs, float)
    (drawn,) = ax.plot(x, np.median(runs, 0) if center == "median" else runs.mean(0), **line)
    if runs.shape[0] > 1:
        ax.fill_between(x, runs.min(0), runs.max(0), color=drawn.get_color(), alpha=0.2, linewidth=0)
    return drawn


def grid_shape(num_panels: int) -> tuple[int, int]:
    """The panels' grid.

    Args:
      num_panels: panels to place.

    Returns:
      ``(rows, cols)``: 4 x 4 for the book's 16 scales, near-square otherwise.
    """
    cols = math.ceil(math.sqrt(num_panels))
    return math.ceil(num_panels / cols), cols


def pyplot():
    """matplotlib's pyplot, imported on demand.

    Returns:
      ``matplotlib.pyplot`` on the non-interactive Agg backend (files only, no display needed).
    """
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
    """Write ``fig`` as a PNG atomically to ``path`` (never a half-written file) and close it.

    Args:
      fig: a matplotlib figure.
      path: the PNG file.

    Returns:
      ``path`` as a ``Path``.
    """
    plt = pyplot()
    try:
        with atomic_file(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def plot_sweep(weight_scales, accuracy: dict, path: str | os.PathLike, *, title: str | None = None,
               diverged: dict | None = None) -> Path:
    """Draw ``sweep_figure(...)`` and write it as a PNG atomically to ``path``.

    Args:
      weight_scales, accuracy, title, diverged: as ``sweep_figure``'s.
      path: the PNG file.

    Returns:
      ``path`` as a ``Path``.
    """
    return save(sweep_figure(weight_scales, accuracy, title=title, diverged=diverged), path)


def sweep_figure(weight_scales, accuracy: dict, *, title: str | None = None, diverged: dict | None = None):
    """The book's grid: ``accuracy`` (arm name -> ``[seeds, S, R]``), one panel per scale, one line per arm.

    Each arm in its ``arm_style`` (the book's BN solid, plain dashed). With several seeds the line is the mean
    and the shaded band spans min..max over seeds. The legend sits under the panels, where it hides no curve.

    Args:
      weight_scales: ``[S]``, one panel each.
      accuracy: arm name -> ``[seeds, S, R]``.
      title: the figure's title, or ``None``.
      diverged: arm name -> ``[seeds, S]``: marks the panels where an arm's parameters overflowed (its accuracy
        there is class 0's share, not learning).

    Returns:
      The matplotlib figure.
    """
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    curves = [(np.asarray(acc, float), arm_style(name, i), arm_label(name)) for i, (name, acc) in enumerate(accuracy.items())]
    num_scales, num_records = curves[0][0].shape[1], curves[0][0].shape[2]
    rows, cols = grid_shape(num_scales)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.4 * rows), squeeze=False)
    x = np.arange(num_records)
    for i, ax in enumerate(axes.flat):
        if i >= num_scales:
            ax.axis("off")
            continue
        for acc, style, label in curves:
            band(ax, x, acc[:, i, :], label=label, markevery=2, **style)
        ax.set_title(f"W:{weight_scales[i]:.4g}", fontsize=9)
        if diverged is not None:
            marks = []
            for name, flags in diverged.items():
                count = int(np.asarray(flags)[:, i].sum())
                if count:
                    seeds = np.asarray(flags).shape[0]
                    marks.append(f"{arm_short(name)} diverged"
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
