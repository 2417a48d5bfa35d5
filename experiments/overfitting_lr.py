"""Claim 3 against the learning rate and the amount of data: the study ``experiments.overfitting`` runs after the
book's protocol.

The same 784-100x6-10 ReLU net (He init, SGD, batches of 100 drawn with replacement), plain and with batch norm,
at learning rates 0.01, 0.03, 0.1, 0.3 and 1 (the grid engine's vmapped ``learning_rate`` axis) and on 300, 1000
and 4000 training images: one engine run per size (the number of training images is static in the engine), 3
seeds. Every size trains the same number of updates, the book's 601 (its 201 epochs of 300 / 100 images), and
is scored on ONE held-out set:

* bundled data: the same 1,000 images for every size, the last 1,000 of the ``--split-seed`` permutation, never
  trained on; the training images of size N are the first N of that permutation (so 300 is ``--train-size
  300``'s, and every smaller set lies inside every larger one);
* ``--data mnist``: the first N MNIST training images, and the 10,000 test images.

Why a fixed number of updates, not the book's epochs: it holds the training (the compute, the learning-rate
schedule, the steps taken) equal, so that the only thing changing between the panels is the data. With epochs
the 4,000-image panel would train 13 times longer (8,001 updates; the three sizes six times the updates of 3 x
601), and any gain would mix more data with more training. The price: 601 updates are 200 epochs of 300 images but 15 of
4,000, so a small learning rate has further to go on the larger sets; that is part of what the axis shows.

The arms: plain and BN without regularisation by default (``--study-regularisers all`` adds the book's
weight-decay and dropout arms, four times the models). The question here is whether BN's held-out deficit at
the book's learning rate is a learning-rate effect (Bjorck et al. 2018, "Understanding Batch Normalization":
BN's generalisation benefit comes from the larger learning rates it makes stable); the regularisers are the
book's own comparison, kept at its learning rate in the book's view.

The verdict and what it says: ``experiments.overfitting_lr_verdict``; the figure: ``experiments.overfitting_figures``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bnjax import data, options
from experiments import cli, outputs, runtime

__all__ = ["NETS", "REGULARISERS", "combination", "LEARNING_RATES", "TRAIN_SIZES", "BUNDLED_HELDOUT",
           "REGULARISER_SETS", "train_sizes", "add_options", "check", "regularisers", "heldout_images",
           "size_datasets", "study_config", "run_study"]

NETS = ("plain", "batchnorm")
# Regularisation of each combination (the book's view's columns, the study's lines): (dropout, weight decay).
REGULARISERS = {"none": (False, False), "weight_decay": (False, True), "dropout": (True, False),
                "dropout+weight_decay": (True, True)}
LEARNING_RATES = (0.01, 0.03, 0.1, 0.3, 1.0)
TRAIN_SIZES = (300, 1000, 4000)
UPDATES = 601  # the book's 201 epochs of 300 / 100 images: 1 + 3 * 200
RECORD_EVERY = 100
SEEDS = 3
# The held-out images of the bundled subset: the last 1,000 of the split permutation, for every size.
BUNDLED_HELDOUT = 1000
BUNDLED_SIZE = 5000
MNIST_TRAIN = 60_000  # MNIST's training images (idx files or tfds): the most any size can have
# The study's regularisers (keys of REGULARISERS), by --study-regularisers.
REGULARISER_SETS = {"none": ("none",), "all": ("none", "weight_decay", "dropout", "dropout+weight_decay")}

# The study's options, their defaults filled in by ``check`` (None: not given, so --no-study can refuse them).
_DEFAULTS = {"lrs": LEARNING_RATES, "train_sizes": TRAIN_SIZES, "study_updates": UPDATES,
             "study_record_every": RECORD_EVERY, "study_seeds": SEEDS, "study_regularisers": "none"}
_FLAGS = {"lrs": "--lrs", "train_sizes": "--train-sizes", "study_updates": "--study-updates",
          "study_record_every": "--study-record-every", "study_seeds": "--study-seeds",
          "study_regularisers": "--study-regularisers"}


def train_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated distinct training sizes, sorted.

    Args:
      text: the option's text, e.g. ``"300,1000"``.

    Returns:
      The sizes, smallest first.

    Raises:
      argparse.ArgumentTypeError: no size, one outside ``1..cli.MAX_SIZE`` or not an integer, or one given twice
        (as every list option: a repeated value would train the same models twice).
    """
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of training sizes")
    parse = cli.int_in(1, cli.MAX_SIZE)
    values = tuple(parse(p) for p in parts)
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"each value must appear once, got {', '.join(map(str, repeated))} more "
                                         f"than once in {text!r}")
    return tuple(sorted(values))


def add_options(p: argparse.ArgumentParser) -> None:
    """The study's options: learning rates, training sizes, its budget, seeds and arms.

    Args:
      p: the parser.
    """
    g = p.add_argument_group("learning rate x data size study (after the book's protocol)")
    g.add_argument("--lrs", type=cli.float_list, metavar="LR1,LR2,...",
                   help="learning rates of the study, one vmapped engine axis (default: 0.01,0.03,0.1,0.3,1); BN "
                        "and plain are also compared at --lr when it is one of them")
    g.add_argument("--train-sizes", type=train_sizes, metavar="N1,N2,...",
                   help="training sizes, one engine run each (default: 300,1000,4000); with the bundled subset at "
                        f"most {BUNDLED_SIZE - BUNDLED_HELDOUT}, the same {BUNDLED_HELDOUT} other images being held "
                        "out for every size (--train-size is the book's view's size)")
    g.add_argument("--study-updates", type=cli.int_in(2, cli.MAX_SIZE), metavar="U",
                   help=f"SGD updates of every model at every size (default: {UPDATES}, the book's 201 epochs of "
                        "300 images: the same training for every size, so only the data changes)")
    g.add_argument("--study-record-every", type=cli.int_in(1, cli.MAX_SIZE), metavar="K",
                   help=f"record after the first update and every K updates; U - 1 must be a multiple of K "
                        f"(default: {RECORD_EVERY})")
    g.add_argument("--study-seeds", type=cli.int_in(1, 1_000_000), metavar="S",
                   help=f"seeds of the study, from --seed on (default: {SEEDS})")
    g.add_argument("--study-regularisers", choices=tuple(REGULARISER_SETS),
                   help="none: plain and BN alone; all: also with weight decay, dropout and both, as the book's view "
                        "(four times the models) (default: none)")
    g.add_argument("--no-study", action="store_true", help="the book's protocol alone, without the study")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The study's options together, and its defaults filled in (``None`` with ``--no-study``).

    Args:
      parser: the parser (``error`` exits 2).
      args: the parsed options.
    """
    given = [flag for name, flag in _FLAGS.items() if getattr(args, name) is not None]
    if args.no_study:
        if given:
            parser.error(f"{', '.join(given)} {'has' if len(given) == 1 else 'have'} no effect with --no-study")
        return
    for name, default in _DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    args.lrs = tuple(sorted(args.lrs))
    if (args.study_updates - 1) % args.study_record_every:
        parser.error(f"--study-record-every {args.study_record_every} must divide --study-updates minus 1 "
                     f"({args.study_updates - 1}): records come after the first update and every K updates")
    if (args.study_updates - 1) // args.study_record_every + 1 > cli.MAX_RECORDS:
        parser.error(f"--study-record-every {args.study_record_every} gives more than {cli.MAX_RECORDS} records")
    largest = max(args.train_sizes)
    if largest > MNIST_TRAIN:
        parser.error(f"--train-sizes: {largest} exceeds the {MNIST_TRAIN} MNIST training images")
    if args.data == "bundled" and largest > BUNDLED_SIZE - BUNDLED_HELDOUT:
        parser.error(f"--train-sizes: {largest} exceeds the {BUNDLED_SIZE - BUNDLED_HELDOUT} bundled images left "
                     f"beside the {BUNDLED_HELDOUT} held out for every size")
    if args.seed + args.study_seeds - 1 > options.MAX_SEED:
        parser.error(f"--seed {args.seed} with --study-seeds {args.study_seeds} reaches seed "
                     f"{args.seed + args.study_seeds - 1}; seeds must stay <= {options.MAX_SEED}")


def combination(net: str, regulariser: str) -> str:
    """The name of a (net, regulariser) combination in the verdicts.

    Args:
      net: ``'plain'`` or ``'batchnorm'``.
      regulariser: a key of ``REGULARISERS``.

    Returns:
      ``plain``, ``plain+weight_decay``, ``plain+dropout``, ``plain+dropout+weight_decay`` (same for BN).
    """
    return net if regulariser == "none" else f"{net}+{regulariser}"


def regularisers(args: argparse.Namespace) -> tuple[str, ...]:
    """The study's regularisers.

    Args:
      args: the checked options.

    Returns:
      Keys of ``REGULARISERS`` (``('none',)`` by default).
    """
    return REGULARISER_SETS[args.study_regularisers]


def heldout_images(dataset: data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The study's one held-out set, from data loaded with every image not trained on held out.

    Args:
      dataset: loaded with the largest training size and ``num_heldout=None``.

    Returns:
      ``(images, labels)``: the bundled subset's last ``BUNDLED_HELDOUT`` images of the split permutation (the
      same whatever the training sizes), else every held-out image (the MNIST test set).
    """
    if dataset.source["name"] == "bundled":
        return dataset.x_heldout[-BUNDLED_HELDOUT:], dataset.t_heldout[-BUNDLED_HELDOUT:]
    return dataset.x_heldout, dataset.t_heldout


def size_datasets(pool: data.Dataset, sizes, heldout: tuple[np.ndarray, np.ndarray]) -> list[data.Dataset]:
    """One dataset per training size: the first N images of the pool, and the one held-out set.

    Args:
      pool: training images (at least ``max(sizes)``) and their source record.
      sizes: the training sizes.
      heldout: ``(images, labels)``, the same for every size.

    Returns:
      A ``Dataset`` per size, in order; its ``source`` has that size's counts (and no hash of the pool).
    """
    out = []
    for n in sizes:
        t = pool.t_train[:n]
        source = {k: v for k, v in pool.source.items() if k != "train_sha256"}
        source.update(num_train=int(n), num_heldout=int(heldout[1].shape[0]),
                      train_class_counts=np.bincount(t, minlength=10).tolist(),
                      training_images=f"the first {n} of the {pool.source['name']} training images")
        out.append(data.Dataset(pool.x_train[:n], t, heldout[0], heldout[1], source))
    return out


def study_config(book, args: argparse.Namespace):
    """The study's grid: the book's arms the study keeps, the learning-rate axis (and the weight-decay one with
    the weight-decay arms), the study's budget and seeds.

    Args:
      book: the book's view ``grid.GridConfig`` (``experiments.overfitting.grid_config``): its arms and weight
        decay are the study's.
      args: the checked options.

    Returns:
      The ``grid.GridConfig``, the same for every size (the size is the data's).
    """
    regs = regularisers(args)
    dropout = any(REGULARISERS[r][0] for r in regs)
    arms = {name: arm for name, arm in book.arms.items() if dropout or not name.endswith("+dropout")}
    axes = {"learning_rate": tuple(float(lr) for lr in args.lrs)}
    if any(REGULARISERS[r][1] for r in regs):
        axes["weight_decay"] = tuple(book.axes["weight_decay"])
    return book.replace(arms=arms, axes=axes, num_records=(args.study_updates - 1) // args.study_record_every + 1,
                        updates_per_record=args.study_record_every, num_seeds=args.study_seeds)


def run_study(args: argparse.Namespace, started: dict, book, *, name: str) -> dict:
    """Load the data and train every size, one engine run each, through ``runtime.run_engine``: its checks,
    progress bar and chunk files, each size's in ``OUT/chunks/size-N`` (so ``--resume`` continues each run and
    a finished run removes them all with the book's).

    Args:
      args: the checked options.
      started: ``runtime.start``'s dict.
      book: the book's view ``grid.GridConfig``.
      name: the experiment's name, for the runs' description.

    Returns:
      ``config`` (the study's ``GridConfig``), ``heldout`` (the held-out record), ``runs`` (per size, in order:
      ``train_size``, ``data``, ``record_steps``, ``metrics``, ``diverged``, ``timing``) and ``data_s``.

    Raises:
      SystemExit: status 2 when the data auto-chosen cannot hold the largest size beside the held-out images,
        and whatever ``runtime.load_timed`` and ``runtime.run_engine`` raise.
    """
    sizes = args.train_sizes
    pool, data_s = runtime.load_timed(argparse.Namespace(**{**vars(args), "train_size": max(sizes)}), None,
                                      need_heldout=True)
    if pool.source["name"] == "bundled" and max(sizes) > BUNDLED_SIZE - BUNDLED_HELDOUT:  # --data auto
        cli.usage_error(f"--train-sizes: {max(sizes)} exceeds the {BUNDLED_SIZE - BUNDLED_HELDOUT} bundled images "
                        f"left beside the {BUNDLED_HELDOUT} held out for every size")
    held = heldout_images(pool)
    config = study_config(book, args)
    regs = ", ".join(regularisers(args))
    runs = []
    for dataset in size_datasets(pool, sizes, held):
        n = dataset.x_train.shape[0]
        view = argparse.Namespace(**{**vars(args), "out": args.out / outputs.CHUNKS / f"size-{n}"})
        what = (f"study, {n} images: {len(config.arms)} arms ({regs}) x {len(args.lrs)} learning rates"
                + (" x weight decay 0/lambda" if "weight_decay" in config.axes else "")
                + f" x {args.study_seeds} seed(s)")
        t0 = time.perf_counter()
        result, timing = runtime.run_engine(view, started, config, dataset, name=name, what=what, heldout=True)
        timing = {k: v for k, v in timing.items() if k != "import_s"}
        timing["wall_s"] = time.perf_counter() - t0
        runs.append({"train_size": int(n), "data": dataset.source,
                     "record_steps": [int(s) for s in result.record_steps], "metrics": result.metrics,
                     "diverged": result.diverged, "timing": timing})
    return {"config": config, "heldout": {"name": pool.source["name"], "num_heldout": int(held[1].shape[0]),
                                          "images": _heldout_words(pool.source["name"])},
            "runs": runs, "data_s": data_s}


def _heldout_words(source: str) -> str:
    if source == "bundled":
        return (f"the last {BUNDLED_HELDOUT} images of the bundled subset's split permutation, never trained on, "
                "the same for every size")
    return f"every {source} test image, the same for every size"
