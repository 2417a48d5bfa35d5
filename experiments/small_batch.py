"""Small mini-batches: batch norm, Batch Renorm, Ghost BN, Group Norm and Layer Norm against the plain net.

Held-out accuracy in evaluation mode (running statistics) of the book's 784-100x5-10 ReLU net (He init) trained
on 1000 bundled images with SGD, plain, with batch norm, with Batch Renorm (Ioffe 2017), with Ghost batch norm
(Hoffer et al. 2017), with Group Norm and with Layer Norm (Wu & He 2018), at mini-batch sizes 2, 4, 8, 16, 32
and 100, the learning rate scaled with the batch size (0.1 x B/100: the linear scaling rule), the same number of
epochs for every size, 4 seeds, all in one run of the grid engine. Batch Renorm runs with the paper's settings
(momentum 0.99, r_max 3, d_max 5 after a warm-up). For Ghost BN the size is the *virtual* batch: groups of B rows
inside batches of 100, so the normalisation sees B rows while the gradient sees 100. Group Norm and Layer Norm
normalise each example by its own statistics (no running statistics, training = evaluation), so the batch size
reaches them only through the gradient. Afterwards, for every net with running statistics: its accuracy in
training mode (batch statistics) against evaluation mode on the training images (the train/evaluation
mismatch), and its held-out accuracy after precise statistics (``model.recalibrate`` over the training images in
batches of its own size) against the running averages.

Group Norm's groups (``group_count``) are a function of the network: the largest number of groups, at most Wu &
He's default of 32, that divides every normalised width and leaves at least ``MIN_GROUP_UNITS`` (10) units per
group in the hidden Affine layers. Wu & He's 32 groups do not divide 100, and a hidden Affine layer has no
spatial axes: a group's statistics come from its C/G units of one example alone, so groups of 2-4 units would
normalise almost every pattern away (2 units give +-1, as batch norm at B = 2). The MLP's 100 hidden units give
10 groups of 10 (Layer Norm is the one group of 100); the conv net's 30 channels (each group also spans every
position of the 24x24 map) and its 100 hidden units give 10 groups as well: 3 channels, 10 units.

    python -m experiments.small_batch                         # 144 models: about 1.5 minutes on 2 CPU cores
    python -m experiments.small_batch --batch-sizes 2,8,32 --num-seeds 8

What to expect: batch norm's mismatch between training and evaluation grows as batches shrink, and Batch Renorm
reduces it (Ioffe 2017); Group Norm's accuracy stays flat across batch sizes while batch norm's falls (Wu & He
2018, Figure 1). What is measured is reported, including where it does not hold.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from bnjax import claims
from experiments import cli, protocol, runtime
from experiments.small_batch_figures import (CANDIDATES, NORMALISED, NORMS, arm_name, best_norm, figure, norm_name,
                                             precise_figure)

# The arms before Group and Layer Norm were added: their chunking is kept (see ``grid_config``).
NORMS_BEFORE = ("plain", "batchnorm", "renorm", "ghost")
# Compared with batch norm seed by seed, at every batch size.
CHALLENGERS = ("renorm", "ghost", "groupnorm", "layernorm")
# Wu & He's default number of groups, and the fewest units a group of a hidden Affine layer may have.
MAX_GROUPS = 32
MIN_GROUP_UNITS = 10
_UNIT = cli.float_in(0.0, 1.0)  # momenta and the warm-up share
# Accuracies are shares of whole images: closer than this is the same count.
TIE = 1e-6

EPILOG = (
    "Paired comparison: within a seed every net starts from the same Affine weights; nets of one batch "
    "size see the same mini-batches (Ghost BN uses the batches of --reference-batch). Every arm trains "
    "the same number of epochs of train-size/B updates. Verdict (results.json 'verdict'), per norm and "
    "batch size: held-out accuracy (mean and 95 % interval over seeds), the train/evaluation mismatch "
    "(training-mode minus evaluation-mode accuracy on the training images, in batches of the size trained "
    "with) and held-out accuracy after precise statistics for the norms with running statistics; per batch "
    "size the best norm on held-out accuracy and the norms whose interval overlaps its, and how many seeds "
    "Batch Renorm, Ghost BN, Group Norm and Layer Norm beat batch norm in. "
)


def _batch_sizes(text: str) -> tuple[int, ...]:
    """An argparse type: distinct comma-separated batch sizes in 1..100000, sorted."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 or v > 100_000 for v in values):
        raise argparse.ArgumentTypeError(f"batch sizes must lie in 1..100000, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"batch sizes repeat: {text!r}")
    return tuple(sorted(values))


def add_options(p: argparse.ArgumentParser) -> None:
    """The batch sizes, the learning rate and the norms' settings.

    Args:
      p: the parser.
    """
    g = p.add_argument_group("protocol")
    cli.add_model_arg(g)
    g.add_argument("--batch-sizes", type=_batch_sizes, default=(2, 4, 8, 16, 32, 100), metavar="B1,B2,...",
                   help="mini-batch sizes (Ghost BN: virtual batch sizes), each >= 2 for the norms to see a "
                        "variance (default: 2,4,8,16,32,100)")
    g.add_argument("--reference-batch", type=cli.int_in(2, 100_000), default=100, metavar="B",
                   help="the batch size --lr is given for (lr x B/reference), and Ghost BN's real batch "
                        "(default: 100)")
    g.add_argument("--lr", type=cli.positive_float, default=0.1,
                   help="SGD learning rate at --reference-batch (default: 0.1)")
    g.add_argument("--epochs", type=cli.int_in(2, cli.MAX_RECORDS), default=10,
                   help="records of accuracy; the first after one update, then one every train-size/B updates "
                        "(default: 10)")
    g.add_argument("--momentum", type=_UNIT, default=0.9,
                   help="batch norm's and Ghost BN's running-average momentum, new = m * old + (1 - m) * batch "
                        "(default: 0.9, the book's)")
    g.add_argument("--renorm-momentum", type=_UNIT, default=0.99,
                   help="Batch Renorm's momentum (default: 0.99, the paper's update rate 0.01: r and d compare "
                        "each batch with the running statistics, which must not follow the last few batches)")
    g.add_argument("--r-max", type=cli.positive_float, default=3.0,
                   help="Batch Renorm's clip of r to [1/r_max, r_max], >= 1 (default: 3, the paper's final value)")
    g.add_argument("--d-max", type=cli.float_in(0.0, float32=True), default=5.0,
                   help="Batch Renorm's clip of d to [-d_max, d_max] (default: 5, the paper's final value)")
    g.add_argument("--renorm-warmup", type=_UNIT, default=0.5, metavar="F",
                   help="share of each Batch Renorm net's updates spent warming up: batch norm (r_max 1, d_max 0) "
                        "for the first F/4, then the limits rising linearly to --r-max and --d-max at F "
                        "(the shape of the paper's schedule: 5k hold, r_max full at 40k, d_max at 25k; 0: fixed "
                        "limits; default: 0.5)")


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Batch sizes that the data, the reference batch and the norms allow; held-out images left.

    Args:
      parser: the parser (``error`` exits 2).
      args: the parsed options.
    """
    if args.r_max < 1.0:
        parser.error(f"--r-max must be >= 1 (r_max 1 with d_max 0 is batch norm), got {args.r_max}")
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes: a batch of 1 has no variance; the smallest size is 2")
    if max(args.batch_sizes) > args.train_size:
        parser.error(f"--batch-sizes: {max(args.batch_sizes)} exceeds --train-size {args.train_size}")
    if max(args.batch_sizes) > args.reference_batch:
        parser.error(f"--batch-sizes: {max(args.batch_sizes)} exceeds --reference-batch {args.reference_batch}, the "
                     "real batch Ghost BN's virtual batches are cut from")
    if args.reference_batch > args.train_size:
        parser.error(f"--reference-batch {args.reference_batch} exceeds --train-size {args.train_size}")
    if args.data == "bundled" and args.train_size >= 5000:
        parser.error(f"--train-size {args.train_size} leaves no held-out images in the 5000 of the bundled subset")


def renorm_value(args: argparse.Namespace, num_updates: int):
    """The Batch Renorm value of a net that makes ``num_updates`` updates (the warm-up is a share of them).

    Args:
      args: the parsed options (``renorm_momentum``, ``r_max``, ``d_max``, ``renorm_warmup``).
      num_updates: the net's updates.

    Returns:
      A ``layers.batch_renorm`` norm value.
    """
    from bnjax import layers

    warmup = None
    if args.renorm_warmup > 0:
        end = max(int(round(args.renorm_warmup * num_updates)), 1)
        warmup = (end // 4, end, end)
    return layers.batch_renorm(args.renorm_momentum, r_max=args.r_max, d_max=args.d_max, warmup=warmup)


def normalised_widths(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The widths a norm of the grid's network normalises.

    Args:
      config: a ``grid.GridConfig``.

    Returns:
      ``(spatial, dense)``: the channels of the normalised layers with spatial axes (the conv net's convolution;
      none in the MLP) and the widths of the hidden Affine layers.
    """
    from bnjax import grid

    # The widths do not depend on the input size; 28 x 28 is one every network kind reads (as GridConfig.check).
    net = config.network(grid.Arm(), 28 * 28)
    spatial = (int(net.num_filters),) if hasattr(net, "num_filters") else ()
    return spatial, tuple(int(h) for h in net.hidden_sizes)


def group_count(config) -> int:
    """Group Norm's number of groups for the grid's network (see the module docstring).

    Args:
      config: a ``grid.GridConfig``.

    Returns:
      The largest count <= ``MAX_GROUPS`` that divides every normalised width and leaves at least
      ``MIN_GROUP_UNITS`` units per group in each hidden Affine layer (1, Layer Norm's, when none does): 10 for
      the MLP's 100 hidden units and for the conv net's 30 channels and 100 units.
    """
    spatial, dense = normalised_widths(config)
    common = math.gcd(*spatial, *dense)
    fits = [g for g in range(1, min(common, MAX_GROUPS) + 1)
            if common % g == 0 and all(w // g >= MIN_GROUP_UNITS for w in dense)]
    return max(fits, default=1)


def _base_config(args: argparse.Namespace):
    """The grid without its arms: the protocol the options set."""
    from bnjax import grid

    return grid.GridConfig(axes={}, num_records=args.epochs, batch_size=args.reference_batch,
                           learning_rate=args.lr, weight_scale=1.0, seed=args.seed, num_seeds=args.num_seeds,
                           max_models_per_chunk=args.max_models_per_chunk, **cli.network_fields(args))


def grid_config(args: argparse.Namespace, num_train: int, input_size: int = 784, num_devices: int | None = None):
    """Every (norm, batch size) an arm of one grid: the batch size and the lr scale are the arm's.

    Every arm draws the same initial weights (stream 0) and the batches of its batch size, so the Group and Layer
    Norm arms change no key of the others. What else could move their numbers is the chunking: the number of
    seeds a chunk holds shapes the compiled program, and so the rounding (chaotic small-batch training then
    drifts). Unless ``--max-models-per-chunk`` is given, a chunk therefore holds the seeds it held before those
    arms were added (the memory budget's layout for the other arms), up to 1.5x the budget's models.

    Args:
      args: the parsed options.
      num_train: training images.
      input_size: features per image (the memory estimate's).
      num_devices: devices the grid runs on; ``None``: every device.

    Returns:
      The ``grid.GridConfig`` (the reference batch is the grid's batch size, Ghost BN's real batch).
    """
    from bnjax import grid, layers

    arms = {}
    base = _base_config(args)
    groups = group_count(base)
    for b in args.batch_sizes:
        own = dict(batch_size=b, learning_rate_scale=b / args.reference_batch, weight_init="he", init_stream=0)
        updates = grid.num_updates(base, num_train, b)
        arms[arm_name("plain", b)] = grid.Arm(False, **own)
        arms[arm_name("batchnorm", b)] = grid.Arm(layers.batch_norm(args.momentum, init_var=0.0), **own)
        arms[arm_name("renorm", b)] = grid.Arm(renorm_value(args, updates), **own)
        # Ghost BN: normalisation over b rows, gradient over the reference batch (the grid's batch size).
        arms[arm_name("ghost", b)] = grid.Arm(layers.ghost_batch_norm(b, args.momentum, init_var=0.0),
                                              weight_init="he", init_stream=0)
    for b in args.batch_sizes:  # after the others, so their order (and results.json's) is as it was
        own = dict(batch_size=b, learning_rate_scale=b / args.reference_batch, weight_init="he", init_stream=0)
        arms[arm_name("groupnorm", b)] = grid.Arm(layers.group_norm(groups), **own)
        arms[arm_name("layernorm", b)] = grid.Arm(layers.layer_norm(), **own)
    config = base.replace(arms=arms)
    if config.max_models_per_chunk is None:
        import jax

        before = {n: a for n, a in arms.items() if n.split("@")[0] in NORMS_BEFORE}
        layout = grid.plan_layout(config.replace(arms=before), num_devices or len(jax.devices()), input_size)
        config = config.replace(max_models_per_chunk=len(arms) * layout.seed_block * layout.grid_block)
    return config


def after_training(config, result, x_train, t_train, x_heldout, t_heldout) -> dict:
    """The measures after training of every normalised arm.

    Args:
      config: the grid's ``GridConfig`` (with ``keep_final``).
      result: its ``GridResult``.
      x_train, t_train: ``[N, D]`` images and ``[N]`` labels trained on.
      x_heldout, t_heldout: the held-out images and labels.

    Returns:
      Arm name -> ``{'train_mode', 'eval_mode', 'heldout_precise'}``, each ``[seeds]``, for every arm whose norm
      has running statistics: training-mode and evaluation-mode accuracy on the training images (in batches of
      the size the arm trained with, in order) and held-out accuracy after precise statistics. Group and layer
      norm have none (their training mode is their evaluation mode, and there is nothing to recalibrate).
    """
    import jax
    import jax.numpy as jnp

    from bnjax import grid, networks

    out = {}
    input_size = x_train.shape[1]
    for name, arm in config.arms.items():
        if arm.norm is False or not arm.norm.has_running_stats:
            continue
        net = config.network(arm, input_size)
        model = networks.module_for(net)
        b = grid.arm_batch_size(config, arm)
        nb = x_train.shape[0] // b
        xb = jnp.asarray(x_train[: nb * b].reshape(nb, b, -1))
        tb = jnp.asarray(t_train[: nb * b].reshape(nb, b))

        def one(params, state, net=net, xb=xb, tb=tb, model=model):
            def train_mode(_, batch):
                logits, _ = model.apply(net, params, state, batch[0], train=True)
                return None, jnp.sum(jnp.argmax(logits, -1) == batch[1])

            _, right = jax.lax.scan(train_mode, None, (xb, tb))
            seen_x, seen_t = xb.reshape(-1, xb.shape[-1]), tb.reshape(-1)
            precise = model.recalibrate(net, params, state, xb)
            return (jnp.sum(right) / seen_t.shape[0], model.accuracy(net, params, state, seen_x, seen_t),
                    model.accuracy(net, params, precise, jnp.asarray(x_heldout), jnp.asarray(t_heldout)))

        final = result.final[name]
        train_acc, eval_acc, precise_acc = jax.jit(jax.vmap(one))(final.params, final.state)
        out[name] = {"train_mode": np.asarray(train_acc, float), "eval_mode": np.asarray(eval_acc, float),
                     "heldout_precise": np.asarray(precise_acc, float)}
    return out


def _interval(values) -> dict:
    mean, lo, hi = claims.mean_interval(np.asarray(values, float)[:, None])
    return {"mean": float(mean[0]), "low": float(max(lo[0], 0.0)), "high": float(min(hi[0], 1.0))}


def verdict(batch_sizes, heldout: dict, post: dict) -> dict:
    """The numbers of the comparison.

    Args:
      batch_sizes: ``[K]``.
      heldout: arm name -> final held-out accuracy ``[seeds]`` (running statistics).
      post: ``after_training``'s output (normalised arms only).

    Returns:
      ``per_batch`` (one dict per batch size: per norm the held-out mean and interval; per norm with running
      statistics the mismatch and the precise-statistics held-out mean; the seeds in which each of
      ``CHALLENGERS`` beats BN; ``best``: the norm of ``CANDIDATES`` with the highest mean held-out accuracy, and
      ``overlapping``: the others whose 95 % interval reaches the best's, so not told apart from it),
      ``<challenger>_vs_bn`` sign tests over all (batch size, seed) pairs, ``bn_drop``: BN's held-out accuracy
      at the smallest batch minus at the largest, ``renorm_reduces_mismatch``: the batch sizes where renorm's
      mean mismatch is smaller than BN's, ``precise_helps``: per norm with running statistics, the batch sizes
      where precise statistics raise its mean held-out accuracy.
    """
    per_batch = []
    totals = {other: [0, 0, 0] for other in CHALLENGERS}
    for b in batch_sizes:
        row = {"batch_size": int(b)}
        for norm in NORMS:
            row[norm] = _interval(heldout[arm_name(norm, b)])
        for norm in NORMALISED:
            p = post[arm_name(norm, b)]
            row[norm]["mismatch"] = float(np.mean(p["train_mode"] - p["eval_mode"]))
            row[norm]["precise"] = float(np.mean(p["heldout_precise"]))
        bn = np.asarray(heldout[arm_name("batchnorm", b)], float)
        for other in CHALLENGERS:
            w, l, t = claims.paired_counts(np.asarray(heldout[arm_name(other, b)], float)[:, None], bn[:, None], TIE)
            row[f"{other}_beats_bn"] = {"wins": int(w[0]), "losses": int(l[0]), "ties": int(t[0])}
            for i, n in enumerate((w[0], l[0], t[0])):
                totals[other][i] += int(n)
        # The first of equal means wins (CANDIDATES' order): a tie is then visible in ``overlapping``.
        best = best_norm({n: row[n]["mean"] for n in CANDIDATES})
        row["best"] = best
        row["overlapping"] = [n for n in CANDIDATES if n != best and row[n]["high"] >= row[best]["low"]]
        per_batch.append(row)
    small, large = per_batch[0], per_batch[-1]
    return {
        "num_seeds": int(np.asarray(heldout[arm_name("plain", batch_sizes[0])]).shape[0]),
        "per_batch": per_batch,
        **{f"{other}_vs_bn": {"wins": w, "losses": l, "ties": t, "p_value": claims.sign_test(w, l)}
           for other, (w, l, t) in totals.items()},
        "bn_drop": small["batchnorm"]["mean"] - large["batchnorm"]["mean"],
        "renorm_reduces_mismatch": [row["batch_size"] for row in per_batch
                                    if abs(row["renorm"]["mismatch"]) < abs(row["batchnorm"]["mismatch"])],
        "precise_helps": {norm: [row["batch_size"] for row in per_batch
                                 if row[norm]["precise"] > row[norm]["mean"] + TIE] for norm in NORMALISED},
    }


def _best(row: dict) -> str:
    """The best norm of a verdict row, and the norms its interval does not separate it from."""
    best = f"{norm_name(row['best'])} {row[row['best']]['mean']:.3f}"
    if not row["overlapping"]:
        return best + " (its interval clear of every other norm's)"
    return best + " (intervals overlap " + ", ".join(norm_name(n) for n in row["overlapping"]) + ")"


def render(results: dict) -> str:
    """The verdict, from a results.json dict.

    Args:
      results: the results as read from results.json.

    Returns:
      Markdown: held-out accuracy per batch size and norm (mean and 95 % interval) with the best norm and the
      norms whose intervals overlap its, the train/evaluation mismatch and the held-out accuracy after precise
      statistics per norm with running statistics, then the sign tests against BN, BN's drop, where Batch
      Renorm's mismatch is smaller and where precise statistics help.
    """
    v = results["verdict"]
    # A results.json written before Group and Layer Norm were added has neither (nor a best norm): render its own.
    norms = [n for n in NORMS if n in v["per_batch"][0]]
    best = "best" in v["per_batch"][0]
    rows = ["Held-out accuracy, mean [95 % interval] over seeds (evaluation mode; running statistics where the "
            "norm has them)" + (", and the best norm:" if best else ":"), "",
            "| B | " + " | ".join(norm_name(n) for n in norms) + (" | best norm |" if best else " |"),
            "|---|" + "---|" * (len(norms) + best)]
    for row in v["per_batch"]:
        cells = [f"{row[n]['mean']:.3f} [{row[n]['low']:.3f}, {row[n]['high']:.3f}]" for n in norms]
        rows.append(f"| {row['batch_size']} | " + " | ".join(cells) + (f" | {_best(row)} |" if best else " |"))
    rows += ["", "Train/evaluation mismatch (training-mode minus evaluation-mode accuracy on the training images) / "
             "held-out accuracy after precise statistics:", "",
             "| B | " + " | ".join(f"{norm_name(n)} mismatch / precise" for n in NORMALISED) + " |",
             "|---|" + "---|" * len(NORMALISED)]
    for row in v["per_batch"]:
        rows.append(f"| {row['batch_size']} | "
                    + " | ".join(f"{row[n]['mismatch']:+.3f} / {row[n]['precise']:.3f}" for n in NORMALISED) + " |")
    lines = []
    for other in (c for c in CHALLENGERS if f"{c}_vs_bn" in v):
        s = v[f"{other}_vs_bn"]
        lines.append(f"{norm_name(other)} above BN in {s['wins']} of {s['wins'] + s['losses'] + s['ties']} (batch "
                     f"size, seed) pairs, below in {s['losses']}, tied in {s['ties']}; sign test p = "
                     f"{s['p_value']:.2g}")
    small, large = v["per_batch"][0]["batch_size"], v["per_batch"][-1]["batch_size"]
    lines.append(f"BN's held-out accuracy at B={small} minus at B={large}: {v['bn_drop']:+.3f}")
    fewer = v["renorm_reduces_mismatch"]
    lines.append("Batch Renorm's mismatch is smaller than BN's at B = " + ", ".join(map(str, fewer)) if fewer else
                 "Batch Renorm's mismatch is nowhere smaller than BN's")
    for norm in NORMALISED:
        helped = v["precise_helps"][norm]
        lines.append(f"precise statistics raise {norm_name(norm)}'s held-out accuracy at B = "
                     + (", ".join(map(str, helped)) if helped else "none of the sizes"))
    return "\n".join([f"After {results['config']['epochs']} records, {v['num_seeds']} seeds.", "", *rows, "",
                      *[f"- {line}" for line in lines]]) + "\n"


def measure(run: protocol.Run) -> None:
    """The measures after training, on every process: ``run.data['post']`` (see ``after_training``).

    Args:
      run: the run.
    """
    t0 = time.perf_counter()
    ds = run.dataset
    run.data["post"] = after_training(run.config, run.result, ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    run.timing["after_training_s"] = time.perf_counter() - t0


def _heldout(run: protocol.Run) -> dict:
    return {name: np.asarray(acc, float)[..., -1] for name, acc in run.result.metrics["heldout_accuracy"].items()}


def analyse(run: protocol.Run) -> dict:
    """The verdict from the final held-out accuracies and the measures after training.

    Args:
      run: the run.

    Returns:
      ``batch_sizes``, ``after_training`` and ``verdict``.
    """
    post = run.data["post"]
    return {"batch_sizes": list(run.args.batch_sizes), "after_training": post,
            "verdict": verdict(run.args.batch_sizes, _heldout(run), post)}


def notes(run: protocol.Run) -> list[str]:
    """The results' notes, with the options' learning rate, reference batch and Batch Renorm settings.

    Args:
      run: the run.

    Returns:
      The sentences.
    """
    args = run.args
    return [
        "Held-out accuracy in evaluation mode (running statistics); a diverged model is scored as NaN scores "
        "are (argmax -> class 0).",
        f"Learning rate {args.lr:g} x B/{args.reference_batch} for every arm of batch size B; every arm trains "
        f"{args.epochs - 1} epochs of train-size/B updates after its first update.",
        f"Ghost BN arms train on batches of {args.reference_batch} normalised in groups of B rows (the running "
        "statistics pool the groups); their lr is the reference one.",
        f"Batch Renorm: momentum {args.renorm_momentum:g}, r_max {args.r_max:g}, d_max {args.d_max:g}, "
        + (f"reached linearly at {args.renorm_warmup:g} of each net's updates after batch norm for the first "
           f"{args.renorm_warmup / 4:g}" if args.renorm_warmup > 0 else "from the first update")
        + f"; batch norm and Ghost BN: momentum {args.momentum:g}.",
        f"Group Norm: {group_count(_base_config(args))} groups of each normalised layer's units (see the module "
        "docstring for the choice); Layer Norm: all of them. Neither has running statistics: the same in training "
        "and evaluation, so no mismatch and no precise statistics.",
        "Within a seed every net starts from the same Affine weights (He init); nets of one batch size share "
        "their mini-batches.",
        "Mismatch: accuracy on the training images in training mode (each batch normalised by its own "
        "statistics, batches of the size the net trained with, in order) minus evaluation mode (running "
        "statistics), on the same images.",
        "Precise statistics: model.recalibrate over the training images in those batches (the equal-weight "
        "average of the batch statistics), then held-out accuracy.",
    ]


def _titled(run: protocol.Run, fig):
    """The figure with the network named first in its title (nothing for the MLP)."""
    if cli.network_title(run.args):
        fig.suptitle(cli.network_title(run.args) + fig.get_suptitle(), fontsize=10)
    return fig


EXPERIMENT = protocol.Experiment(
    name="small_batch",
    title="Small batches: batch norm, Batch Renorm, Ghost BN, Group Norm and Layer Norm",
    question="How do batch norm, Batch Renorm, Ghost BN, Group Norm and Layer Norm fare at batch sizes 2 to 100?",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    check=check,
    num_seeds=4,
    heldout=None,  # every image not trained on (bundled) or the test set
    grid=lambda args, dataset: grid_config(args, *dataset.x_train.shape).replace(keep_final=True),
    describe=lambda args, config: (f"{len(NORMS)} norms x {len(args.batch_sizes)} batch sizes x {args.num_seeds} "
                                   "seed(s)"),
    measure=measure,
    analyse=analyse,
    render=render,
    notes=notes,
    figures=(protocol.Figure("small_batch.png", lambda run: _titled(run, figure(run.args.batch_sizes, _heldout(run),
                                                                                 run.data["post"], run.args.num_seeds))),
             protocol.Figure("small_batch_precise.png", lambda run: precise_figure(
                 run.args.batch_sizes, _heldout(run), run.data["post"], run.args.num_seeds))),
    quick=("--batch-sizes", "2,10", "--reference-batch", "10", "--epochs", "2", "--num-seeds", "2",
           "--train-size", "100", "--renorm-warmup", "0.5"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
