"""Claim 3 of the book (ch. 6.4 with 6.3): batch norm reduces overfitting, as weight decay and dropout do; then
the same claim against the learning rate and the amount of data.

The book's overfitting protocol: only the first 300 training images, the 784-100x6-10 ReLU net with He init,
SGD at lr 0.01 on batches of 100 drawn with replacement (3 updates an epoch), 201 epochs (601 updates), then
training accuracy against accuracy on images never trained on. Here for the plain and the BN net, each with no
regularisation, weight decay (lambda 0.1), dropout (ratio 0.2, the book's non-inverted kind) and both, 5 seeds,
all in one run of the grid engine. Then the study (``experiments.overfitting_lr``): plain and BN at learning
rates 0.01 to 1 (one vmapped axis) on 300, 1000 and 4000 images (one engine run each), 601 updates each, 3
seeds, all scored on one held-out set.

    python -m experiments.overfitting                    # 40 + 90 models: about 70 s on 2 idle CPU cores
    python -m experiments.overfitting --no-study --data mnist --record-every 1 --num-seeds 10

Reference: the book's own scripts (ch06/overfit_weight_decay.py, ch06/overfit_dropout.py), run on full MNIST
(held out: the 10,000 test images) with one seed and the plain net only, ended at training / test accuracy
1.00 / 0.753 without regularisation, 0.897 / 0.712 with weight decay 0.1 and 0.923 / 0.717 with dropout 0.2
(the dropout script trains 301 epochs, not 201). Both regularisers closed the gap there, and both lowered the
held-out accuracy at the same time. With the bundled 5,000-image subset the held-out images of the book's view
are the 4,700 left after the 300 trained on (all drawn from the MNIST training set, 300 chosen by --split-seed,
not the first 300 of MNIST), so its numbers need not match those.

The book's view keeps those 4,700 held-out images (its numbers are today's); the study scores every size on
the 1,000 of them that no size trains on (the last 1,000 of the split permutation). Scoring the book's view on
those 1,000 too would save most of its scoring time but would change every held-out number it reported; the
300 images it trains on are the study's 300, with the same initial weights and batches for a seed.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from bnjax import claims
from experiments import cli, overfitting_figures, overfitting_lr, plot, protocol, runtime
from experiments import overfitting_lr_verdict as lr_verdict
# The nets, the regularisers and the combinations' names, shared with the study and the figures.
from experiments.overfitting_lr import NETS, REGULARISERS, combination

HIDDEN_SIZES = (100,) * 6
# The six combinations the book (and the claim) name; the dropout + weight decay ones are extras.
HEADLINE = ("none", "weight_decay", "dropout")

EPILOG = (
    "Paired comparison: every model of a seed (plain and BN, with and without dropout and weight decay) "
    "starts from the same Affine weights and sees the same mini-batches; the dropout arms also share their "
    "dropout masks. Held-out images of the book's view: with the bundled subset all the images not trained "
    "on, with --data mnist the 10,000 test images. Accuracies are measured in evaluation mode (running "
    "statistics, the book's dropout scaling). "
    "Verdict (results.json 'verdict'), per combination, on the curves averaged over seeds: final training "
    "and held-out accuracy, their gap, the best held-out accuracy and its epoch, and the first epoch at "
    "which every seed fits every training image. "
    "The study (--lrs x --train-sizes, after the book's view): every size trains --study-updates updates and is "
    "scored on one held-out set (bundled: the same 1,000 images never trained on; --data mnist: the test set); "
    "its verdict, per size and net, names the learning rate with the best final held-out accuracy (mean and "
    "95 % interval over seeds) among those it trains at, compares BN and plain each at its own best and at "
    "--lr, and names where a net cannot train (more than half the seeds diverged or below 0.2 training "
    "accuracy). "
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
    overfitting_lr.add_options(p)


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Records within the epochs, held-out images left in the bundled subset, and the study's options
    (``overfitting_lr.check``: its defaults filled in).

    Args:
      parser: the parser (``error`` exits 2).
      args: the parsed options.
    """
    if args.record_every > args.epochs - 1:
        parser.error(f"--record-every {args.record_every} must be <= --epochs minus 1 ({args.epochs - 1})")
    if args.data == "bundled" and args.train_size >= 5000:
        parser.error(f"--train-size {args.train_size} leaves no held-out images in the 5000 of the bundled subset")
    overfitting_lr.check(parser, args)


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
      Markdown: with the study, its answer in one sentence first; then the book's view (the protocol in a
      paragraph, a table: a row per combination, the six the book names, then the two dropout + weight decay
      ones; final training and held-out accuracy, gap, best held-out accuracy and its epoch, the epoch every
      training image is right, diverged seeds; then the verdict in sentences); then the study's
      (``overfitting_lr_verdict.render``).
    """
    study = results.get("lr_study")
    if not study:
        return _render_book(results)
    return (f"**Answer.** {lr_verdict.answer(study)}\n\n**The book's protocol.** " + _render_book(results) + "\n"
            + lr_verdict.render(study))


def _render_book(results: dict) -> str:
    """The book's view in markdown (see ``render``)."""
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


def measure(run: protocol.Run) -> None:
    """The study after the book's view, on every process (``overfitting_lr.run_study``): ``run.data['study']``
    (``None`` with ``--no-study``); its engine runs' seconds in ``run.timing['study']``.

    Args:
      run: the run (the book's view's engine configuration is the study's base).
    """
    run.data["study"] = None
    if run.args.no_study:
        return
    study = overfitting_lr.run_study(run.args, run.started, run.config, name=EXPERIMENT.name)
    run.data["study"] = study
    run.timing["study"] = {"data_s": study["data_s"], "runs": [{"train_size": r["train_size"], **r["timing"]}
                                                              for r in study["runs"]]}


def analyse(run: protocol.Run) -> dict:
    """The verdicts: the book's view's from its recorded curves, the study's from its final accuracies.

    Args:
      run: the run.

    Returns:
      ``epochs`` (of the records), ``iter_per_epoch``, ``verdict`` and ``lr_study`` (``lr_verdict.record``;
      ``None`` with ``--no-study``).
    """
    args = run.args
    epochs = record_epochs(args.epochs, args.record_every)
    study = None
    if run.data.get("study") is not None:
        study, run.data["study_final"] = lr_verdict.record(args, run.data["study"])
        run.data["study_verdict"] = study["verdict"]
    return {"epochs": epochs, "iter_per_epoch": max(run.dataset.x_train.shape[0] // args.batch_size, 1),
            "verdict": verdict(epochs, run.result.metrics, run.result.diverged), "lr_study": study}


def notes(run: protocol.Run) -> list[str]:
    """The results' notes (the dropout sentence names the kind the options chose).

    Args:
      run: the run.

    Returns:
      The sentences.
    """
    args = run.args
    kind = "inverted (kept units scaled by 1/(1-p) in training)" if args.inverted_dropout else \
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
        "Held-out images of the book's view: with the bundled subset every image not trained on (drawn from the "
        "MNIST training set), with full MNIST the test set.",
    ] + ([] if args.no_study else [
        f"Study: plain and BN ({', '.join(overfitting_lr.regularisers(args))}) at learning rates "
        f"{', '.join(f'{lr:g}' for lr in args.lrs)} on {', '.join(map(str, args.train_sizes))} training images, one "
        f"engine run per size, {args.study_updates} updates each at every size (the same training, so that only "
        "the data changes), scored on one held-out set (lr_study.heldout); the training images of size N are the "
        "first N of the split (bundled) or of MNIST, so every smaller set lies inside every larger one.",
        "Study verdict: per size and net, the learning rate with the best mean final held-out accuracy among "
        "those it trains at (cannot train: more than half the seeds diverged or ended below 0.2 training "
        "accuracy), BN against plain each at its own best and at --lr, paired by seed (same initial weights "
        "and batches).",
    ])


def _figure(run: protocol.Run):
    args = run.args
    return overfitting_figures.book_figure(record_epochs(args.epochs, args.record_every), run.result.metrics,
                                           args.num_seeds, args.weight_decay, args.dropout_ratio)


def _study_figure(run: protocol.Run):
    args = run.args
    return overfitting_figures.study_figure(args.lrs, args.train_sizes, run.data["study_final"],
                                            run.data["study_verdict"], args.study_seeds, args.study_updates)


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
    measure=measure,
    analyse=analyse,
    render=render,
    notes=notes,
    figures=(protocol.Figure("overfitting.png", _figure),
             protocol.Figure("overfitting_lr.png", _study_figure, when=lambda run: run.data["study"] is not None)),
    quick=("--train-size", "100", "--epochs", "7", "--record-every", "3", "--num-seeds", "2",
           "--train-sizes", "100", "--lrs", "0.01,1", "--study-updates", "7", "--study-record-every", "3",
           "--study-seeds", "2"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
