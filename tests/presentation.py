"""Reading back what the experiments present: the cells of a rendered markdown table, the data of a drawn figure.

Imported as ``from presentation import markdown_tables, lines_of, band_bounds`` (pytest puts ``tests/`` on the
path). These give the tests of the renderers and figures an independent view of what a reader sees, to compare
with numbers recomputed from the arrays.
"""

from __future__ import annotations

import numpy as np


def markdown_tables(md: str) -> list[list[list[str]]]:
    """Every markdown table of ``md``: its rows (the header first, the ``|---|`` rule left out) of stripped cells.

    Args:
      md: the rendered markdown.

    Returns:
      One list of rows per table, in order.
    """
    tables, current = [], None
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                tables.append(current)
            if not all(set(cell) <= {"-", ":"} and cell for cell in cells):
                current.append(cells)
        else:
            current = None
    return tables


def lines_of(ax) -> list[dict]:
    """The data lines of an axes (not reference lines such as ``axhline``): label, x, y and line style.

    Args:
      ax: a matplotlib axes.

    Returns:
      One dict per line drawn with ``ax.plot``, in drawing order.
    """
    out = []
    for line in ax.lines:
        x = np.asarray(line.get_xdata(), float)
        if x.size == 2 and line.get_transform() != ax.transData:  # axhline / axvline: axes coordinates
            continue
        out.append({"label": line.get_label(), "x": x, "y": np.asarray(line.get_ydata(), float),
                    "linestyle": line.get_linestyle(), "color": line.get_color()})
    return out


def band_bounds(collection, x) -> tuple[np.ndarray, np.ndarray]:
    """The lower and upper edge of a ``fill_between`` band at each of ``x``.

    Args:
      collection: the band (an item of ``ax.collections``).
      x: the positions it was drawn at.

    Returns:
      ``(low, high)``, each ``[len(x)]``.
    """
    vertices = np.concatenate([p.vertices for p in collection.get_paths()])
    low, high = [], []
    for xi in np.asarray(x, float):
        ys = vertices[np.isclose(vertices[:, 0], xi, rtol=1e-12, atol=0.0), 1]
        low.append(ys.min())
        high.append(ys.max())
    return np.array(low), np.array(high)


def skip_layout(monkeypatch) -> None:
    """Make ``Figure.tight_layout`` a no-op for one test: it measures every text (seconds a figure on a slow CPU),
    and what a figure shows, the data read back here, does not depend on it.

    Args:
      monkeypatch: the test's ``monkeypatch`` fixture (undone after the test).
    """
    import matplotlib.figure

    monkeypatch.setattr(matplotlib.figure.Figure, "tight_layout", lambda self, *args, **kwargs: None)
