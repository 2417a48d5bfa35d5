"""The verdict of the learning-rate x data-size study of ``experiments.overfitting`` (``experiments.overfitting_lr``)
and what it says: the one-sentence answer, the table and the sentences, all read from results.json alone.
"""

from __future__ import annotations

import argparse

import numpy as np

from bnjax import claims
from experiments import plot
from experiments.overfitting_lr import NETS, REGULARISERS, combination, regularisers

__all__ = ["CHANCE_LIMIT", "ANCHOR", "final_values", "cell", "summarise", "compare", "verdict", "record", "answer",
           "size_sentences", "render", "combination_label"]

# A seed "stays at chance" when its final training accuracy is below twice chance (10 classes): a net that
# predicts one class scores about 0.1.
CHANCE_LIMIT = 0.2
# Accuracies are shares of whole images: closer than this is the same count.
TIE = 1e-6
ANCHOR = 'Bjorck et al. 2018 ("Understanding Batch Normalization")'
_REGULARISER_WORDS = {"weight_decay": "weight decay", "dropout": "dropout",
                      "dropout+weight_decay": "dropout + weight decay"}


def final_values(metrics: dict, diverged: dict, regs, net_names=NETS) -> dict:
    """Each combination's final training and held-out accuracy and divergence, from one size's engine run.

    Args:
      metrics: ``'train_accuracy'`` and ``'heldout_accuracy'`` -> arm -> ``[seeds, L, R]`` (or ``[seeds, L, 2,
        R]`` with the weight-decay axis ``(0, lambda)``).
      diverged: arm -> ``[seeds, L]`` (or ``[seeds, L, 2]``).
      regs: the study's regularisers.
      net_names: the nets.

    Returns:
      combination name (``plain``, ``batchnorm+weight_decay``, ...) -> ``{'train', 'heldout', 'diverged'}``,
      each ``[seeds, L]``; nets first, regularisers in ``regs`` order within each.
    """
    out = {}
    for net in net_names:
        for reg in regs:
            drop, decay = REGULARISERS[reg]
            arm, column = net + ("+dropout" if drop else ""), int(decay)
            train = np.asarray(metrics["train_accuracy"][arm], float)[..., -1]
            held = np.asarray(metrics["heldout_accuracy"][arm], float)[..., -1]
            div = np.asarray(diverged[arm], bool)
            if train.ndim == 3:  # the weight-decay axis
                train, held, div = train[..., column], held[..., column], div[..., column]
            out[combination(net, reg)] = {"train": train, "heldout": held, "diverged": div}
    return out


def _interval(values) -> dict:
    mean, low, high = claims.mean_interval(np.asarray(values, float)[:, None])
    return {"mean": float(mean[0]), "low": float(low[0]), "high": float(high[0])}


def cell(train, heldout, diverged) -> dict:
    """One (combination, size, learning rate): held-out accuracy over seeds and whether the net trains there.

    Args:
      train, heldout: ``[seeds]`` final training and held-out accuracy.
      diverged: ``[seeds]`` flags.

    Returns:
      ``heldout`` (``mean``, ``low``, ``high``: 95 % interval over seeds, clipped to [0, 1]), ``train`` (mean),
      ``seeds``, ``diverged_seeds``, ``chance_seeds`` (finite but below ``CHANCE_LIMIT`` training accuracy) and
      ``cannot_train``: more than half the seeds diverged or stayed at chance.
    """
    div = np.asarray(diverged, bool)
    train = np.asarray(train, float)
    chance = ~div & (train < CHANCE_LIMIT)
    held = _interval(heldout)
    held.update(low=max(held["low"], 0.0), high=min(held["high"], 1.0))
    n = int(div.shape[0])
    failed = int(div.sum() + chance.sum())
    return {"heldout": held, "train": float(train.mean()), "seeds": n, "diverged_seeds": int(div.sum()),
            "chance_seeds": int(chance.sum()), "cannot_train": 2 * failed > n}


def summarise(lrs, values: dict) -> dict:
    """One combination at one size across the learning rates.

    Args:
      lrs: ``[L]`` learning rates, ascending.
      values: ``{'train', 'heldout', 'diverged'}``, each ``[seeds, L]`` (``final_values``' entry).

    Returns:
      ``cells`` (``cell`` per learning rate, with its ``lr``), ``best`` (the learning rate with the highest mean
      held-out accuracy among those it trains at, the smallest on a tie: ``lr``, ``index`` and its ``heldout``
      interval; ``None`` when it trains at none) and ``cannot_train`` (the learning rates where it cannot).
    """
    cells = [{"lr": float(lr), **cell(values["train"][:, i], values["heldout"][:, i], values["diverged"][:, i])}
             for i, lr in enumerate(lrs)]
    trains = [i for i, c in enumerate(cells) if not c["cannot_train"]]
    best = max(trains, key=lambda i: (cells[i]["heldout"]["mean"], -i)) if trains else None
    return {"cells": cells,
            "best": None if best is None else {"lr": float(lrs[best]), "index": best, **cells[best]["heldout"]},
            "cannot_train": [c["lr"] for c in cells if c["cannot_train"]]}


def compare(a, b) -> dict:
    """``a`` against ``b``, paired by seed.

    Args:
      a, b: ``[seeds]`` final held-out accuracies (same seed: same initial weights and batches).

    Returns:
      ``change`` (mean of a - b) with ``change_low`` / ``change_high`` (its 95 % interval over seeds),
      ``seeds_higher``, ``seeds_lower`` and ``seeds``.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    diff = _interval(a - b)
    wins, losses, _ = claims.paired_counts(a[:, None], b[:, None], TIE)
    return {"change": diff["mean"], "change_low": diff["low"], "change_high": diff["high"],
            "seeds_higher": int(wins[0]), "seeds_lower": int(losses[0]), "seeds": int(a.shape[0])}


def _pair(lrs, bn: dict, plain: dict, bn_values: dict, plain_values: dict, reference_lr: float) -> dict:
    """BN against plain (one regulariser, one size): each at its own best learning rate, and at the reference."""
    at_best = None
    if bn["best"] is not None and plain["best"] is not None:
        i, j = bn["best"]["index"], plain["best"]["index"]
        at_best = {"bn_lr": bn["best"]["lr"], "plain_lr": plain["best"]["lr"],
                   "bn": {k: bn["best"][k] for k in ("mean", "low", "high")},
                   "plain": {k: plain["best"][k] for k in ("mean", "low", "high")},
                   **compare(bn_values["heldout"][:, i], plain_values["heldout"][:, j])}
    at_reference = None
    hits = [i for i, lr in enumerate(lrs) if np.isclose(lr, reference_lr, rtol=1e-9, atol=0.0)]
    if hits:
        i = hits[0]
        at_reference = {"lr": float(lrs[i]), "bn": bn["cells"][i]["heldout"], "plain": plain["cells"][i]["heldout"],
                        "bn_cannot_train": bn["cells"][i]["cannot_train"],
                        "plain_cannot_train": plain["cells"][i]["cannot_train"],
                        **compare(bn_values["heldout"][:, i], plain_values["heldout"][:, i])}
    return {"at_best": at_best, "at_reference": at_reference}


def verdict(sizes, lrs, per_size: list, reference_lr: float, regs=("none",), updates: int | None = None,
            batch_size: int | None = None) -> dict:
    """The study's verdict.

    Args:
      sizes: ``[S]`` training sizes.
      lrs: ``[L]`` learning rates, ascending.
      per_size: per size, ``final_values``' output (combination -> ``{'train', 'heldout', 'diverged'}``,
        ``[seeds, L]`` each).
      reference_lr: the book's learning rate (``--lr``), compared at when it is one of ``lrs``.
      regs: the study's regularisers (each gives a BN / plain pair).
      updates: the updates of every model (for the epochs each size saw), or ``None``.
      batch_size: the batch size (the same).

    Returns:
      ``reference_lr``, ``learning_rates``, ``regularisers`` and ``sizes``: per size ``train_size``, ``epochs``
      (updates x batch / size, or ``None``), ``combinations`` (name -> ``summarise``) and ``pairs`` (regulariser
      -> ``at_best``: BN and plain each at its own best learning rate, ``None`` when one trains at none;
      ``at_reference``: both at ``reference_lr``, ``None`` when it is not among ``lrs``; each with the held-out
      intervals and ``compare``'s paired change).
    """
    lrs = [float(lr) for lr in lrs]
    out = []
    for n, values in zip(sizes, per_size):
        combos = {name: summarise(lrs, v) for name, v in values.items()}
        pairs = {}
        for reg in regs:
            bn, plain = combination("batchnorm", reg), combination("plain", reg)
            pairs[reg] = _pair(lrs, combos[bn], combos[plain], values[bn], values[plain], reference_lr)
        epochs = None if updates is None or batch_size is None else updates * batch_size / n
        out.append({"train_size": int(n), "epochs": epochs, "combinations": combos, "pairs": pairs})
    return {"reference_lr": float(reference_lr), "learning_rates": lrs, "regularisers": list(regs), "sizes": out}


def record(args: argparse.Namespace, study: dict) -> tuple[dict, list]:
    """The results' ``lr_study``, from ``run_study``'s output.

    Args:
      args: the checked options.
      study: ``run_study``'s output.

    Returns:
      ``(lr_study, per_size)``: ``lr_study`` holds the protocol (``train_sizes``, ``learning_rates``,
      ``updates``, ``batch_size``, ``record_steps``, ``seeds``, ``regularisers``, ``arms``, ``axes``,
      ``heldout``), every size's run (``runs``: ``train_size``, ``data``, every metric per arm ``[seeds, L(,
      2), R]`` and ``diverged``) and the ``verdict``; ``per_size`` is ``final_values`` per size (for the figure).
    """
    regs = regularisers(args)
    per_size = [final_values(r["metrics"], r["diverged"], regs) for r in study["runs"]]
    config = study["config"]
    return {
        "train_sizes": list(args.train_sizes), "learning_rates": list(args.lrs), "updates": args.study_updates,
        "batch_size": args.batch_size, "record_steps": study["runs"][0]["record_steps"],
        "seeds": list(range(args.seed, args.seed + args.study_seeds)), "regularisers": list(regs),
        "arms": {name: arm._asdict() for name, arm in config.arms.items()},
        "axes": {name: list(values) for name, values in config.axes.items()}, "heldout": study["heldout"],
        "runs": [{k: r[k] for k in ("train_size", "data", "metrics", "diverged")} for r in study["runs"]],
        "verdict": verdict(args.train_sizes, args.lrs, per_size, args.lr, regs, args.study_updates, args.batch_size),
    }, per_size


# --------------------------------------------------------------------------------------------------
# What it says
# --------------------------------------------------------------------------------------------------


def _relation(change: float) -> str:
    return "above" if change > TIE else ("below" if change < -TIE else "equal to")


def _sizes(sizes) -> str:
    """``300``, ``300 and 1,000``, ``300, 1,000 and 4,000``."""
    words = [f"{n:,}" for n in sizes]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _where(items) -> str:
    """``[(size, relation)]`` -> ``'below plain at every size'`` or ``'below plain with 300 images and above plain
    with 1,000 and 4,000 images'`` (relations in order of first appearance)."""
    groups: dict[str, list[int]] = {}
    for n, rel in items:
        groups.setdefault(rel, []).append(n)
    if len(groups) == 1 and len(items) > 1:
        return f"{next(iter(groups))} plain at every size"
    return " and ".join(f"{rel} plain with {_sizes(ns)} images" for rel, ns in groups.items())


def _lrs(values) -> str:
    """``0.3``, ``0.3 and 1``, ``0.1, 0.3 and 1``."""
    words = [f"{lr:g}" for lr in values]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _cannot(sizes: list, net: str) -> str | None:
    """Where ``net`` cannot train, over the sizes (``'at lr 1 at every size'``, ``'at lr 1 with 300 images and at
    lr 0.3, 1 with 1,000 and 4,000 images'``); ``None`` when it trains everywhere."""
    groups: dict[tuple, list[int]] = {}
    for s in sizes:
        lrs = tuple(s["combinations"][net]["cannot_train"])
        if lrs:
            groups.setdefault(lrs, []).append(s["train_size"])
    if not groups:
        return None
    if len(groups) == 1 and len(next(iter(groups.values()))) == len(sizes):
        return f"at lr {_lrs(next(iter(groups)))}" + (" at every size" if len(sizes) > 1 else "")
    return " and ".join(f"at lr {_lrs(lrs)} with {_sizes(ns)} images" for lrs, ns in groups.items())


def answer(study: dict) -> str:
    """The study's answer in one sentence, with its numbers, citing ``ANCHOR`` (BN against plain without
    regularisation).

    Args:
      study: the results' ``lr_study`` (its ``verdict``).

    Returns:
      The sentence: BN against plain at the book's learning rate (when studied), each at its own best learning
      rate, where plain (and BN) cannot train, and whether the numbers bear out the anchor's account.
    """
    v = study["verdict"]
    sizes = v["sizes"]
    refs = [(s["train_size"], s["pairs"]["none"]["at_reference"]) for s in sizes]
    bests = [(s["train_size"], s["pairs"]["none"]["at_best"]) for s in sizes]
    text = []
    ref_rels = set()
    if all(r is not None for _, r in refs):
        ref_rels = {_relation(r["change"]) for _, r in refs}
        numbers = "; ".join(f"{r['bn']['mean']:.3f} against {r['plain']['mean']:.3f} with {n:,} images"
                            for n, r in refs)
        text.append(f"At the book's learning rate {v['reference_lr']:g}, on held-out images, BN ends "
                    f"{_where([(n, _relation(r['change'])) for n, r in refs])} ({numbers})")
    found = [(n, b) for n, b in bests if b is not None]
    best_rels = {_relation(b["change"]) for _, b in found}
    if found:
        numbers = "; ".join(f"{b['bn']['mean']:.3f} at lr {b['bn_lr']:g} against {b['plain']['mean']:.3f} at lr "
                            f"{b['plain_lr']:g} with {n:,} images" for n, b in found)
        lead = ("but" if best_rels != ref_rels else "and") if text else ""
        text.append(f"{lead} each at its own best learning rate BN ends "
                    f"{_where([(n, _relation(b['change'])) for n, b in found])} ({numbers})".strip())
    failures = []
    for net, name in (("plain", "plain"), ("batchnorm", "BN")):
        where = _cannot(sizes, net)
        if where is not None:
            failures.append(f"{name} cannot train {where}")
    if failures:
        text.append("while " + " and ".join(failures))
    missing = [n for n, b in bests if b is None]
    if missing:  # one of the nets trains at no learning rate there: no best to compare
        text.append(f"so with {_sizes(missing)} images there is no best learning rate to compare")
    sentence = ", ".join(text) if text else "No size has a learning rate at which both nets train"
    backs = [n for n, b in found if b["change"] > TIE and b["bn_lr"] > b["plain_lr"] + 1e-12]
    claim = "BN's generalisation benefit comes from the larger learning rates it makes stable"
    if found and len(backs) == len(sizes):
        sentence += f": as {ANCHOR} argue, {claim}."
    elif backs:
        sentence += f": {ANCHOR} argue that {claim}; here that holds with {_sizes(backs)} images only."
    else:
        sentence += (f": {ANCHOR} argue that {claim}; here BN at a larger learning rate than plain's best does "
                     "not end above it at any size.")
    return sentence[0].upper() + sentence[1:]


def _interval_text(x: dict) -> str:
    return f"{x['mean']:.3f} [{x['low']:.3f}, {x['high']:.3f}]"


def _points(c: dict) -> str:
    return (f"{100 * c['change']:+.1f} points [{100 * c['change_low']:+.1f}, {100 * c['change_high']:+.1f}], higher "
            f"in {c['seeds_higher']} of {c['seeds']} seeds")


def _failure(cell: dict) -> str:
    parts = []
    if cell["diverged_seeds"]:
        parts.append(f"{cell['diverged_seeds']} of {cell['seeds']} seeds diverged")
    if cell["chance_seeds"]:
        parts.append(f"{cell['chance_seeds']} of {cell['seeds']} at chance")
    return ", ".join(parts)


def combination_label(name: str, *, short: bool = True) -> str:
    """A combination's name for tables, sentences and legends.

    Args:
      name: ``plain``, ``batchnorm+weight_decay``, ...
      short: ``plot.arm_short`` (``BN``) rather than ``plot.arm_label`` for the net.

    Returns:
      e.g. ``BN + weight decay``.
    """
    net, _, reg = name.partition("+")
    head = plot.arm_short(net) if short else plot.arm_label(net)
    return head + (f" + {_REGULARISER_WORDS[reg]}" if reg else "")


def size_sentences(study: dict) -> list[str]:
    """Per size and regulariser: BN against plain at each one's best learning rate and at the book's, and where
    each cannot train.

    Args:
      study: the results' ``lr_study``.

    Returns:
      One sentence per (size, regulariser).
    """
    v = study["verdict"]
    out = []
    for s in v["sizes"]:
        epochs = f" ({s['epochs']:.0f} epochs)" if s["epochs"] is not None else ""
        for reg, pair in s["pairs"].items():
            head = f"{s['train_size']:,} images{epochs}" + ("" if reg == "none" else f", {_REGULARISER_WORDS[reg]}")
            parts = []
            b = pair["at_best"]
            if b is not None:
                parts.append(f"each at its best learning rate, BN {_interval_text(b['bn'])} at lr {b['bn_lr']:g} "
                             f"against plain {_interval_text(b['plain'])} at lr {b['plain_lr']:g}: {_points(b)}")
            else:
                none = [plot.arm_short(net) for net in NETS if s["combinations"][combination(net, reg)]["best"] is None]
                parts.append(f"{' and '.join(none)} train{'s' if len(none) == 1 else ''} at no learning rate tried")
            r = pair["at_reference"]
            if r is not None:
                cannot = [name for name, key in (("plain", "plain_cannot_train"), ("BN", "bn_cannot_train")) if r[key]]
                parts.append(f"at lr {r['lr']:g}, BN {r['bn']['mean']:.3f} against plain {r['plain']['mean']:.3f} "
                             f"({_points(r)})" + (f"; {' and '.join(cannot)} cannot train there" if cannot else ""))
            for net in ("plain", "batchnorm"):
                combo = s["combinations"][combination(net, reg)]
                failing = [c for c in combo["cells"] if c["cannot_train"]]
                if failing:
                    parts.append(f"{plot.arm_short(net)} cannot train at "
                                 + ", ".join(f"lr {c['lr']:g} ({_failure(c)})" for c in failing))
            out.append(f"{head}: " + "; ".join(parts) + ".")
    return out


def render(study: dict) -> str:
    """The study's part of the results' rendering.

    Args:
      study: the results' ``lr_study`` as read back from results.json.

    Returns:
      Markdown: the protocol in a paragraph, a table (a row per size and combination: held-out accuracy, mean
      [95 % interval] over seeds, at each learning rate, failures noted, and the best learning rate), then the
      sentences.
    """
    v = study["verdict"]
    lrs = v["learning_rates"]
    seeds = v["sizes"][0]["combinations"]["plain"]["cells"][0]["seeds"]
    text = [
        f"**Against the learning rate and the amount of data.** {seeds} seed(s); every model trains "
        f"{study['updates']} updates of batches of {study['batch_size']} at every training size (the same "
        f"training for every size, so that only the data changes) and is scored on "
        f"{study['heldout']['num_heldout']} held-out images: {study['heldout']['images']}. Final held-out "
        "accuracy, mean [95 % interval] over seeds; 'cannot train': more than half the seeds diverged or ended "
        "below 0.2 training accuracy.",
        "",
        "| images | net | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr (held-out) |",
        "|---|---|" + "---|" * len(lrs) + "---|",
    ]
    for s in v["sizes"]:
        for name, combo in s["combinations"].items():
            cells = []
            for c in combo["cells"]:
                note = _failure(c)
                cells.append(_interval_text(c["heldout"]) + (" cannot train" if c["cannot_train"] else "")
                             + (f" ({note})" if note else ""))
            best = combo["best"]
            text.append(f"| {s['train_size']:,} | {combination_label(name)} | " + " | ".join(cells) + " | "
                        + (f"{best['lr']:g} ({best['mean']:.3f})" if best else "none trains") + " |")
    text.append("")
    text += [f"- {line}" for line in size_sentences(study)]
    return "\n".join(text) + "\n"
