"""Claim 3 of the book (ch. 6.4 with 6.3): batch norm reduces overfitting, as weight decay and dropout do.

The book's overfitting protocol: only the first 300 training images, the 784-100x6-10 ReLU net with He init,
SGD at lr 0.01 on batches of 100 drawn with replacement (3 updates an epoch), 201 epochs (601 updates), then
training accuracy against accuracy on images never trained on. Here for the plain and the BN net, each with no
regularisation, weight decay (lambda 0.1), dropout (ratio 0.2, the book's non-inverted kind) and both, 5 seeds,
all in one run of the grid engine.

    python -m experiments.overfitting                    # 40 models, 601 updates each: about 35 s on 2 CPU cores
    python -m experiments.overfitting --data mnist --record-every 1 --num-seeds 10

Reference: the book's own scripts (ch06/overfit_weight_decay.py, ch06/overfit_dropout.py), run on full MNIST
(held out: the 10,000 test images) with one seed and the plain net only, ended at training / test accuracy
1.00 / 0.753 without regularisation, 0.897 / 0.712 with weight decay 0.1 and 0.923 / 0.717 with dropout 0.2
(the dropout script trains 301 epochs, not 201). Both regularisers closed the gap there, and both lowered the
held-out accuracy at the same time. With the bundled 5,000-image subset the held-out images are the 4,700 left
after the 300 trained on (all drawn from the MNIST training set, 300 chosen by --split-seed, not the first
300 of MNIST), so its numbers need not match those.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bnjax import claims
from experiments import cli, plot, protocol, runtime

NETS = ("plain", "batchnorm")
HIDDEN_SIZES = (100,) * 6
# Regularisation of each column of the figure and of the verdict: (dropout, weight decay).
REGULARISERS = {"none": (False, False), "weight_decay": (False, True), "dropout": (True, False),
                "dropout+weight_decay": (True, True)}
# The six combinations the book (and the claim) name; the dropout + weight decay ones are extras.
HEADLINE = ("none", "weight_decay", "dropout")

EPILOG = (
    "Paired comparison: every model of a seed (plain and BN, with and without dropout and weight decay) "
    "starts from the same Affine weights and sees the same mini-batches; the dropout arms also share their "
    "dropout masks. Held-out images: with the bundled subset all the images not trained on, with --data "
    "mnist the 10,000 test images. Accuracies are measured in evaluation mode (running statistics, the "
    "book's dropout scaling). "
    "Verdict (results.json 'verdict'), per combination, on the curves averaged over seeds: final training "
    "and held-out accuracy, their gap, the best held-out accuracy and its epoch, and the first epoch at "
    "which every seed fits every training image. "
)


def add_options(p: argparse.ArgumentParser) -> None:
    """The book's overfitting protocol and the regularisers' settings.

    Args:
      p: the parser.
    """
    g = p.add_argument_group("protocol (defaults: the book's)")
    g.add_argument("--epochs", type=cli.int_in(2, cli.MAX_RECORDS), default=201,
                   help="epochs of train-size/batch-size updates; the first record comes after one update, as in "
                        "the book, and training stops at the last recorded epoch (default: 201, i.e. 601 updates)")
    g.add_argument("--record-every", type=cli.int_in(1, cli.MAX_RECORDS), default=5, metavar="K",
                   help="record both accuracies every K epochs: epochs 0, K, 2K, ... up to epochs-1 (default: 5; "
                        "1 is the book's: scoring all 40 models on 5,000 images at every epoch costs about "
                        "8 TFLOP more than every 5th, two minutes of a laptop CPU)")
    g.add_argument("--batch-size", type=cli.int_in(1, 100_000), default=100,
                   help="mini-batch size, drawn with replacement (default: 100)")
    g.add_argument("--lr", type=cli.positive_float, default=0.01, help="SGD learning rate (default: 0.01)")
    g.add_argument("--weight-decay", type=cli.positive_float, default=0.1, metavar="LAMBDA",
                   help="lambda of the book's L2 term lambda/2 * sum(W^2) over every Affine weight, for the weight "
                        "decay arms (default: 0.1)")
    g.add_argument("--dropout-ratio", type=cli.float_in(0.0, 1.0, open_low=True, open_high=True), default=0.2,
                   metavar="P",
                   help="share of hidden units dropped after each hidden activation, in the dropout arms "
                        "(default: 0.2)")
    g.add_argument("--inverted-dropout", action="store_true",
                   help="modern inverted dropout (scale kept units by 1/(1-P) in training) instead of the book's "
                        "(no scaling in training, times 1-P at evaluation)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Records within the epochs, and held-out images left in the bundled subset.

    Args:
      parser: the parser (``error`` exits 2).
      args: the parsed options.
    """
    if args.record_every > args.epochs - 1:
        parser.error(f"--record-every {args.record_every} must be <= --epochs minus 1 ({args.epochs - 1})")
    if args.data == "bundled" and args.train_size >= 5000:
        parser.error(f"--train-size {args.train_size} leaves no held-out images in the 5000 of the bundled subset")


def num_records(epochs: int, record_every: int) -> int:
    """Records at epochs ``0, k, 2k, ...`` up to ``epochs - 1``.

    Args:
      epochs: ``--epochs``.
      record_every: ``--record-every`` (k).

    Returns:
      How many.
    """
    return (epochs - 1) // record_every + 1


def record_epochs(epochs: int, record_every: int) -> list[int]:
    """The epoch of each record.

    Args:
      epochs: ``--epochs``.
      record_every: ``--record-every``.

    Returns:
      ``[0, k, 2k, ...]`` up to ``epochs - 1``.
    """
    return [record_every * r for r in range(num_records(epochs, record_every))]


def arm_names() -> tuple[str, ...]:
    """The engine's four arms.

    Returns:
      ``plain``, ``plain+dropout``, ``batchnorm``, ``batchnorm+dropout`` (weight decay is the grid's axis).
    """
    return tuple(f"{net}{'+dropout' if drop else ''}" for net in NETS for drop in (False, True))


def combination(net: str, regulariser: str) -> str:
    """The name of a (net, regulariser) combination in the verdict.

    Args:
      net: ``'plain'`` or ``'batchnorm'``.
      regulariser: a key of ``REGULARISERS``.

    Returns:
      ``plain``, ``plain+weight_decay``, ``plain+dropout``, ``plain+dropout+weight_decay`` (same for BN).
    """
    return net if regulariser == "none" else f"{net}+{regulariser}"


def grid_config(args: argparse.Namespace, num_train: int):
    """The one grid of the experiment: 4 arms (net x dropout) x the weight-decay axis ``(0, lambda)``.

    Every arm draws stream 0 of initial weights (He init, ``weight_scale`` 1), so within a seed all 8 models
    start from the same Affine weights. A record every ``record_every`` epochs of ``max(N // B, 1)`` updates
    (the book's ``iter_per_epoch``; it divides with ``/``, the same for its 300 / 100).

    Args:
      args: the parsed options.
      num_train: training images.

    Returns:
      The ``grid.GridConfig``.
    """
    from bnjax import grid

    arms = {}
    for name in arm_names():
        drop = name.endswith("+dropout")
        arms[name] = grid.Arm(norm=name.startswith("batchnorm"), activation="relu",
                               dropout_ratio=args.dropout_ratio if drop else 0.0,
                               dropout_inverted=bool(args.inverted_dropout), weight_init="he", init_stream=0)
    iter_per_epoch = max(num_train // args.batch_size, 1)
    return grid.GridConfig(
        arms=arms, axes={"weight_decay": (0.0, float(args.weight_decay))}, weight_scale=1.0,
        learning_rate=args.lr, optimizer="sgd", num_records=num_records(args.epochs, args.record_every),
        updates_per_record=iter_per_epoch * args.record_every, batch_size=args.batch_size,
        hidden_sizes=HIDDEN_SIZES, seed=args.seed, num_seeds=args.num_seeds,
        max_models_per_chunk=args.max_models_per_chunk,
    )


def _paired(a, b) -> dict:
    """Final held-out accuracy of ``a`` against ``b`` (``[seeds]`` each, paired by seed)."""
    wins, losses, _ = claims.paired_counts(a, b)
    return {"heldout_change": float(np.mean(a) - np.mean(b)), "seeds_higher": int(wins), "seeds_lower": int(losses),
            "seeds": int(np.shape(a)[0])}


def verdict(epochs, metrics: dict, diverged: dict) -> dict:
    """Training against held-out accuracy for each of the 8 combinations.

    Args:
      epochs: ``[R]`` epoch of each record.
      metrics: ``'train_accuracy'`` and ``'heldout_accuracy'`` -> arm name (``plain``, ``plain+dropout``,
        ``batchnorm``, ``batchnorm+dropout``) -> ``[seeds, 2, R]``, the middle axis weight decay ``(0, lambda)``.
      diverged: arm name -> ``[seeds, 2]``.

    Returns:
      combination name -> ``claims.overfitting_summary`` (``final_train``, ``final_heldout``, ``gap``,
      ``best_heldout``, ``best_heldout_epoch``, ``epoch_train_100``) plus ``diverged_seeds``, ``headline`` (one of
      the six combinations the book names), ``vs_unregularised`` (final held-out accuracy against the same net
      without regularisation: mean change and the seeds in which it is higher / lower; ``None`` for the
      unregularised nets) and ``vs_plain`` (the same against the plain net with the same regularisation;
      ``None`` for plain nets). Plain first, then BN, each in the order none, weight decay, dropout, both.
    """
    epochs = np.asarray(epochs)
    train_all, held_all = metrics["train_accuracy"], metrics["heldout_accuracy"]
    final_held = {}
    out = {}
    for net in NETS:
        for reg, (drop, decay) in REGULARISERS.items():
            arm, column = net + ("+dropout" if drop else ""), int(decay)
            train = np.asarray(train_all[arm], float)[:, column]
            held = np.asarray(held_all[arm], float)[:, column]
            name = combination(net, reg)
            final_held[name] = held[:, -1]
            summary = claims.overfitting_summary(epochs, train, held)
            summary["diverged_seeds"] = int(np.asarray(diverged[arm])[:, column].sum())
            summary["headline"] = reg in HEADLINE
            summary["vs_unregularised"] = None if reg == "none" else _paired(held[:, -1], final_held[net])
            summary["vs_plain"] = (None if net == "plain" else
                                   _paired(held[:, -1], final_held[combination("plain", reg)]))
            out[name] = summary
    return out


def _points(x: float) -> str:
    return f"{100 * x:+.1f} points"


def sentences(v: dict) -> list[str]:
    """The verdict in words, computed from the numbers only (works on a verdict read back from results.json).

    Args:
      v: the verdict (``verdict``'s output).

    Returns:
      The sentences: BN against plain without regularisation, what weight decay and dropout did for each net,
      and the highest final held-out accuracy.
    """
    plain, bn = v["plain"], v["batchnorm"]
    n = bn["vs_plain"]["seeds"]
    relation = "above" if bn["final_heldout"] > plain["final_heldout"] else (
        "below" if bn["final_heldout"] < plain["final_heldout"] else "equal to")
    out = [
        f"Without regularisation BN ends {relation} plain on held-out images: {bn['final_heldout']:.3f} against "
        f"{plain['final_heldout']:.3f} ({_points(bn['vs_plain']['heldout_change'])}, higher in "
        f"{bn['vs_plain']['seeds_higher']} of {n} seeds), with a train - held-out gap of {bn['gap']:.3f} "
        f"against {plain['gap']:.3f}."
    ]
    for reg, label in (("weight_decay", "Weight decay"), ("dropout", "Dropout")):
        parts = []
        for net in NETS:
            s, base = v[combination(net, reg)], v[net]
            change = s["vs_unregularised"]["heldout_change"]
            gap = s["gap"] - base["gap"]
            if change > 0:
                effect = (f"raised held-out accuracy ({_points(change)}, higher in "
                          f"{s['vs_unregularised']['seeds_higher']} of {n} seeds; gap {base['gap']:.3f} -> "
                          f"{s['gap']:.3f})")
            elif change == 0:
                effect = f"left held-out accuracy unchanged (gap {base['gap']:.3f} -> {s['gap']:.3f})"
            elif gap < 0:
                effect = (f"only shrank the gap ({base['gap']:.3f} -> {s['gap']:.3f}) while held-out accuracy fell "
                          f"({_points(change)}, lower in {s['vs_unregularised']['seeds_lower']} of {n} seeds)")
            else:
                effect = (f"lowered held-out accuracy ({_points(change)}) without shrinking the gap "
                          f"({base['gap']:.3f} -> {s['gap']:.3f})")
            parts.append(f"for {plot.arm_short(net)} it {effect}")
        out.append(f"{label}: " + "; ".join(parts) + ".")
    best = max(v, key=lambda k: v[k]["final_heldout"])
    out.append(f"Highest final held-out accuracy: {_describe(best)} ({v[best]['final_heldout']:.3f}); a smaller gap "
               "alone is no win, only held-out accuracy is.")
    return out


def render(results: dict) -> str:
    """The verdict, read from a results.json dict alone.

    Args:
      results: the results as read from results.json.

    Returns:
      Markdown: the protocol in a paragraph, a table (a row per combination: the six the book names, then the
      two dropout + weight decay ones; final training and held-out accuracy, gap, best held-out accuracy and
      its epoch, the epoch every training image is right, diverged seeds), then the verdict in sentences.
    """
    v = results["verdict"]
    data = results["data"]
    epochs = results["epochs"]
    dropout = next(a for name, a in results["arms"].items() if name.endswith("+dropout"))
    kind = "inverted" if dropout["dropout_inverted"] else "the book's non-inverted"
    text = [
        f"{len(results['seeds'])} seed(s), {data['num_train']} training images and {data['num_heldout']} held-out "
        f"images ({data['name']} MNIST), recorded at epochs 0 to {epochs[-1]} every {epochs[1] - epochs[0]}; "
        f"weight decay lambda {results['axes']['weight_decay'][-1]:g}, {kind} dropout at "
        f"{dropout['dropout_ratio']:g}; every model of a seed starts from the same weights and sees the same "
        f"batches. Accuracy in evaluation mode, mean over seeds.",
        "",
        "| combination | train | held-out | gap | best held-out (epoch) | train 1.0 at epoch |",
        "|---|---|---|---|---|---|",
    ]
    for name in [n for n in v if v[n]["headline"]] + [n for n in v if not v[n]["headline"]]:
        s = v[name]
        label = name if s["headline"] else f"{name} (not in the book)"
        div = f" ({s['diverged_seeds']} seed(s) diverged)" if s["diverged_seeds"] else ""
        text.append(f"| {label}{div} | {s['final_train']:.3f} | {s['final_heldout']:.3f} | {s['gap']:.3f} | "
                    f"{s['best_heldout']:.3f} ({s['best_heldout_epoch']}) | {_fmt(s['epoch_train_100'], 'd')} |")
    text.append("")
    text += [f"- {line}" for line in sentences(v)]
    return "\n".join(text) + "\n"


def _fmt(value, spec=".3f") -> str:
    return "never" if value is None else format(value, spec)


def _describe(name: str) -> str:
    net, _, reg = name.partition("+")
    words = {"": "no regularisation", "weight_decay": "weight decay", "dropout": "dropout",
             "dropout+weight_decay": "dropout and weight decay"}
    return f"{plot.arm_short(net)}, {words[reg]}"


def figure(epochs, metrics: dict, num_seeds: int, weight_decay: float, dropout_ratio: float):
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


def analyse(run: protocol.Run) -> dict:
    """The verdict from the recorded curves.

    Args:
      run: the run.

    Returns:
      ``epochs`` (of the records), ``iter_per_epoch`` and ``verdict``.
    """
    args = run.args
    epochs = record_epochs(args.epochs, args.record_every)
    return {"epochs": epochs, "iter_per_epoch": max(run.dataset.x_train.shape[0] // args.batch_size, 1),
            "verdict": verdict(epochs, run.result.metrics, run.result.diverged)}


def notes(run: protocol.Run) -> list[str]:
    """The results' notes (the dropout sentence names the kind the options chose).

    Args:
      run: the run.

    Returns:
      The sentences.
    """
    kind = "inverted (kept units scaled by 1/(1-p) in training)" if run.args.inverted_dropout else \
        "the book's non-inverted (no scaling in training, activations times 1-p at evaluation)"
    return [
        "Accuracies are measured in evaluation mode (running statistics, dropout's evaluation scaling), as the "
        "book; a diverged model is scored as the book scores NaN scores (argmax -> class 0).",
        f"Dropout is {kind}, after each hidden activation.",
        "Every model of a seed starts from the same Affine weights (He init) and sees the same mini-batches "
        "(and the dropout arms the same masks): each comparison is paired. The weight-decay axis (0, lambda) "
        "gives each arm both settings.",
        "The verdict reads the curves averaged over seeds; epoch_train_100 is the first recorded epoch at "
        "which every seed classifies every training image right.",
        "With BN the weight decay of BN-followed layers changes the effective learning rate more than it "
        "regularises (van Laarhoven 2017): those layers' outputs do not depend on their weights' scale.",
        "Held-out images: with the bundled subset every image not trained on (drawn from the MNIST training "
        "set), with full MNIST the test set.",
    ]


def _figure(run: protocol.Run):
    args = run.args
    return figure(record_epochs(args.epochs, args.record_every), run.result.metrics, args.num_seeds,
                  args.weight_decay, args.dropout_ratio)


EXPERIMENT = protocol.Experiment(
    name="overfitting",
    title="Claim 3: less overfitting",
    question="Claim 3: does BN reduce overfitting?",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    check=check,
    train_size=300,
    num_seeds=5,
    # Held out: every image not trained on (bundled) or the test set (mnist): none to add to --train-size.
    heldout=None,
    grid=lambda args, dataset: grid_config(args, dataset.x_train.shape[0]),
    describe=lambda args, config: (f"plain/BN x dropout off/on x weight decay 0/{args.weight_decay:g} x "
                                   f"{args.num_seeds} seed(s), {config.num_records} records"),
    analyse=analyse,
    render=render,
    notes=notes,
    figures=(protocol.Figure("overfitting.png", _figure),),
    quick=("--train-size", "100", "--epochs", "7", "--record-every", "3", "--num-seeds", "2"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
