"""Verdicts: the small pure functions that turn recorded arrays into the numbers the experiments report.

Plain NumPy on host arrays (no JAX), so each is checked against hand-made inputs. Accuracies are shares in
``[0, 1]``; ``[seeds, ...]`` arrays hold one row per training seed. A threshold is met when the value is
``>=`` it. ``None`` means "never" or "nowhere" (it is written as ``null`` in results.json).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "max_stable_lr",
    "updates_to_threshold",
    "ratio",
    "mean_interval",
    "paired_counts",
    "sign_test",
    "trainable_width",
    "overfitting_summary",
    "activation_stats",
    "largest_step_below",
]

# Accuracies within this of 1.0 are "every image right" (float32 rounding of n * (1/n)); far below 1/n for any
# set of fewer than a million images.
ALL_RIGHT_TOLERANCE = 1e-6

# Student's t quantile 0.975 by degrees of freedom (a NumPy-only library carries no scipy); between the
# tabulated values the next smaller df is used, which widens the interval slightly (conservative).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def _t975(df: int) -> float:
    if df >= 1000:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


def max_stable_lr(learning_rates: Any, final_accuracy: Any, diverged: Any, threshold: float = 0.9) -> float | None:
    """The largest learning rate at which at least half the seeds stay finite and end at ``>= threshold``.

    Args:
      learning_rates: ``[L]``.
      final_accuracy: ``[seeds, L]`` accuracy at the last record.
      diverged: ``[seeds, L]`` a parameter became non-finite.

    Returns:
      that learning rate, or ``None`` if no learning rate qualifies.
    """
    lrs = np.asarray(learning_rates, float)
    good = (np.asarray(final_accuracy) >= threshold) & ~np.asarray(diverged, bool)
    ok = good.mean(axis=0) >= 0.5
    return float(lrs[ok].max()) if ok.any() else None


def updates_to_threshold(record_steps: Any, accuracy: Any, threshold: float = 0.9) -> tuple[int | None, int | None]:
    """The fewest updates after which the mean accuracy over seeds first reaches ``threshold``.

    Args:
      record_steps: ``[R]`` updates done at each record.
      accuracy: ``[seeds, L, R]`` (one row per setting, e.g. learning rate) or ``[seeds, R]``.

    Returns:
      ``(updates, index)``: the smallest such number of updates over settings and the setting that needs it
      (the first one on a tie), or ``(None, None)`` if no setting reaches it.
    """
    steps = np.asarray(record_steps)
    acc = np.asarray(accuracy, float)
    if acc.ndim == 2:
        acc = acc[:, None, :]
    mean = acc.mean(axis=0)  # [L, R]
    best, where = None, None
    for i, curve in enumerate(mean):
        hits = np.nonzero(curve >= threshold)[0]
        if hits.size and (best is None or steps[hits[0]] < best):
            best, where = int(steps[hits[0]]), i
    return best, where


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or ``None`` when either is missing or the denominator is 0.

    Args:
      numerator, denominator: numbers or ``None``.

    Returns:
      The ratio as a float, or ``None``.
    """
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def mean_interval(values: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and its 95 % Student-t confidence interval.

    Args:
      values: ``[seeds, ...]``.

    Returns:
      ``(mean, low, high)``, each ``[...]``; with one seed the interval is the mean itself (no spread known).
    """
    v = np.asarray(values, float)
    n = v.shape[0]
    mean = v.mean(axis=0)
    if n < 2:
        return mean, mean.copy(), mean.copy()
    half = _t975(n - 1) * v.std(axis=0, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_counts(a: Any, b: Any, tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position, in how many seeds ``a`` beats ``b``, loses, or ties (within ``tolerance``).

    Args:
      a, b: ``[seeds, ...]`` paired results (same seed, same setting).

    Returns:
      ``(wins, losses, ties)``, integer arrays ``[...]``.
    """
    diff = np.asarray(a, float) - np.asarray(b, float)
    wins = (diff > tolerance).sum(axis=0)
    losses = (diff < -tolerance).sum(axis=0)
    return wins, losses, diff.shape[0] - wins - losses


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test: the probability of a split at least this uneven if each non-tied pair were a
    fair coin. Ties are left out before calling. Returns 1.0 with no pairs.

    Args:
      wins, losses: counts of pairs (non-negative integers).

    Returns:
      The two-sided p-value, computed in exact integers.
    """
    wins, losses = int(wins), int(losses)
    if wins < 0 or losses < 0:
        raise ValueError(f"sign_test: counts must be >= 0, got {wins} wins and {losses} losses")
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    # Exact integers: 2.0 ** n overflows a float from n = 1024 on (16 scales x 64 seeds).
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def trainable_width(scales: Any, mean_accuracy: Any, threshold: float = 0.9) -> float:
    """How many decades of weight scale train to ``>= threshold`` (mean over seeds).

    Each scale stands for the stretch of ``log10(scale)`` closer to it than to its neighbours (the end scales
    reach as far out as they reach in); the width is the summed length of the stretches of the scales that
    qualify. For the book's ``logspace(0, -4, 16)`` every scale counts 4/15 of a decade.

    Args:
      scales: ``[S]`` positive, in any order.
      mean_accuracy: ``[S]``.
      threshold: the accuracy a scale must reach.

    Returns:
      The width in decades (0.0 when no scale qualifies).
    """
    logs = np.log10(np.asarray(scales, float))
    acc = np.asarray(mean_accuracy, float)
    order = np.argsort(logs)
    logs, acc = logs[order], acc[order]
    if logs.size == 1:
        return 0.0
    gaps = np.diff(logs)
    left = np.concatenate([[gaps[0]], gaps]) / 2
    right = np.concatenate([gaps, [gaps[-1]]]) / 2
    return float(np.sum((left + right)[acc >= threshold]))


def overfitting_summary(epochs: Any, train_accuracy: Any, heldout_accuracy: Any) -> dict:
    """Training vs held-out accuracy of one arm, on the curves averaged over seeds.

    Args:
      epochs: ``[R]`` epoch of each record.
      train_accuracy, heldout_accuracy: ``[seeds, R]``.

    Returns:
      ``final_train``, ``final_heldout``, ``gap`` (train minus held-out at the end), ``best_heldout`` and its
      ``best_heldout_epoch`` (first on a tie), ``epoch_train_100`` (first record at which every seed classifies
      every training image right, or ``None``).
    """
    # The engine scores n right out of n as n * fl(1/n) in float32, which can fall one ulp short of 1.0.
    epochs = np.asarray(epochs)
    train = np.asarray(train_accuracy, float).mean(axis=0)
    held = np.asarray(heldout_accuracy, float).mean(axis=0)
    best = int(np.argmax(held))
    perfect = np.nonzero(train >= 1.0 - ALL_RIGHT_TOLERANCE)[0]
    return {
        "final_train": float(train[-1]),
        "final_heldout": float(held[-1]),
        "gap": float(train[-1] - held[-1]),
        "best_heldout": float(held[best]),
        "best_heldout_epoch": int(epochs[best]),
        "epoch_train_100": int(epochs[perfect[0]]) if perfect.size else None,
    }


def activation_stats(values: Any, activation: str) -> dict:
    """Shares of units in the regimes the book's ch. 6.2 histograms show, over every entry of ``values``.

    Args:
      values: a layer's activations (any shape).
      activation: ``'sigmoid'``: ``saturated`` (output < 0.05 or > 0.95, where the gradient vanishes) and
        ``near_half`` (within 0.05 of 0.5: every unit says the same); ``'relu'``: ``zero`` (exactly 0).

    Returns:
      ``{'std', ...}`` with the shares for the activation; ``std`` is NaN when a value is not finite (a layer
      that overflowed), without a NumPy warning.
    """
    v = np.asarray(values, float)
    # A layer of a diverging or overflowing net holds inf or NaN: its std is NaN (null in results.json), which
    # is the answer, so the 'inf - inf' of the centring is not worth a RuntimeWarning on every run.
    with np.errstate(invalid="ignore", over="ignore"):
        out = {"std": float(v.std())}
    if activation == "sigmoid":
        out["saturated"] = float(np.mean((v < 0.05) | (v > 0.95)))
        out["near_half"] = float(np.mean(np.abs(v - 0.5) < 0.05))
    elif activation == "relu":
        out["zero"] = float(np.mean(v == 0.0))
    else:
        raise ValueError(f"activation must be 'sigmoid' or 'relu', got {activation!r}")
    return out


def largest_step_below(step_sizes: Any, ratios: Any, bound: float = 1.0) -> float | None:
    """The largest step size at which the median loss ratio over seeds is below ``bound`` (a step that lowers
    the loss); a non-finite ratio counts as not below. ``None`` if no step size qualifies.

    Args:
      step_sizes: ``[E]``.
      ratios: ``[seeds, E]`` from ``bnjax.train.step_size_probe``.
      bound: the ratio a step must stay below.

    Returns:
      The step size, or ``None``.
    """
    r = np.asarray(ratios, float)
    r = np.where(np.isfinite(r), r, np.inf)
    ok = np.median(r, axis=0) < bound
    eta = np.asarray(step_sizes, float)
    return float(eta[ok].max()) if ok.any() else None
