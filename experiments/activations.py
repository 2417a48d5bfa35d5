"""The spread of each layer's activations (Deep Learning from Scratch, ch. 6.2 and 6.3), with and without batch norm.

Part 1 is the book's histogram experiment (its weight_init_activation_histogram.py): N x 100 standard-normal
inputs, 5 layers of 100 units, weights std * normal and no biases, for std 1, 0.01, Xavier sqrt(1/100) and He
sqrt(2/100), sigmoid and ReLU, each plain and with batch norm (training mode: the statistics of the N inputs).
Part 2 measures the same on the networks of the book's sweep (BN and plain, 16 weight scales, 191 updates on the
1000 training images), before and after training. Draws the histograms and the trained statistics and writes
results.json with the verdict.

    python -m experiments.activations                  # both parts, the book's protocol
    python -m experiments.activations --skip-trained   # part 1 only: no data, no training
    python -m experiments.activations --num-seeds 5 --num-inputs 2000

What to expect (a NumPy re-run of the book's script, which this one reproduces): sigmoid with std 1 pushes
64-77 % of the units of every layer into saturation (output below 0.05 or above 0.95, where its gradient
vanishes), and with batch norm almost none; with std 0.01 96-100 % of the outputs sit within 0.05 of 0.5 (every
unit says the same thing), against about 16 % with batch norm, which rescales each unit to unit variance
before the sigmoid. ReLU with std 0.01 divides the activations' standard deviation by about 14 at every layer
(0.01 * sqrt(100 / 2) = 1/14), so the fifth layer's is some 40 000 times below the first's; with batch norm it
stays at about 0.58, the standard deviation of max(z, 0) for a standard normal z. With batch norm the four stds
give the same numbers (up to its eps): it undoes any common scale of the weights.

Within a seed every configuration scales the same standard-normal draw of weights by its std (BN and plain,
sigmoid and ReLU are paired), and sees the same inputs. The statistics are over every unit and input of a
layer (claims.activation_stats); with several seeds they are means over seeds and the histograms show the
first seed.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time

from experiments import activations_figures, cli, protocol, runtime
from experiments.activations_part1 import (ARMS, DEPTH, STD_LABELS, STDS, WIDTH, config_name, config_names,
                                           layer_stats, part1_summary, run_part1, shrink_factors, value_range)

# Part 2: what counts as a collapsed layer.
DEAD_SHARE = 0.99  # more than this share of ReLU outputs exactly 0
FLAT_STD = 1e-3  # or a standard deviation below this

EPILOG = ("Batch norm is measured in training mode in both parts (the statistics of the inputs themselves: the "
          "N random inputs, or all training images), so the trained networks are measured the same way before "
          "and after training.")


def add_options(p: argparse.ArgumentParser) -> None:
    """Part 1's inputs, and part 2's sweep (or ``--skip-trained``).

    Args:
      p: the parser.
    """
    g = p.add_argument_group("part 1: the book's histograms")
    g.add_argument("--num-inputs", type=cli.int_in(2, 1_000_000), default=1000, metavar="N",
                   help="standard-normal inputs of 100 features (default: 1000, the book's)")
    t = p.add_argument_group("part 2: the trained networks of the book's sweep (defaults: the book's)")
    t.add_argument("--skip-trained", action="store_true", help="part 1 only: no data, no training")
    cli.add_scale_args(t, explicit=False)
    cli.add_epochs_arg(t)


def grid_config(args: argparse.Namespace, dataset=None):
    """Part 2's engine run: the book's sweep, final models kept.

    Args:
      args: the parsed options.
      dataset: unused.

    Returns:
      The ``grid.GridConfig``.
    """
    from bnjax import grid

    return grid.GridConfig(axes={"weight_scale": grid.book_weight_scales(args.num_scales)}, num_records=args.epochs,
                           seed=args.seed, num_seeds=args.num_seeds, keep_final=True,
                           max_models_per_chunk=args.max_models_per_chunk)


# --------------------------------------------------------------------------------------------------
# Part 2: the trained networks of the book's sweep
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _hidden_program(net):
    import jax
    import jax.numpy as jnp

    from bnjax import model

    @jax.jit
    def run(params, state, x):
        def one(p, s):
            layers = model.hidden(net, p, s, x, train=True)
            return jnp.stack([q for q, _ in layers]), jnp.stack([a for _, a in layers])

        return jax.vmap(one)(params, state)  # ([scales, L, N, H], [scales, L, N, H])

    return run


def trained_stats(config, models: dict, x, diverged: dict | None = None) -> dict:
    """Per arm, the stats of every hidden layer of every model on ``x``, batch norm in training mode.

    Args:
      config: the ``GridConfig`` (one ``weight_scale`` axis).
      models: arm -> ``TrainState`` with leaves ``[seeds, scales, ...]`` (``run_grid``'s ``final`` or
        ``grid.init_models``).
      x: ``[N, D]`` images.
      diverged: arm -> ``[seeds, scales]``; those models' stats are NaN (their parameters are not finite).

    Returns:
      arm -> statistic -> ``[seeds, scales, layers]``: ``std_pre``, ``std`` and ``claims.activation_stats``'s
      shares (``zero`` for ReLU).
    """
    import jax
    import numpy as np

    out = {}
    with jax.default_matmul_precision(config.matmul_precision):
        for name, arm in config.arms.items():
            program = _hidden_program(config.network(arm, np.shape(x)[1]))
            ts = models[name]
            num_seeds, num_scales = np.shape(ts.params.affine[0].b)[:2]
            per = None
            for s in range(num_seeds):
                pick = lambda leaf: leaf[s]  # noqa: E731
                pre, act = jax.device_get(program(jax.tree_util.tree_map(pick, ts.params),
                                                  jax.tree_util.tree_map(pick, ts.state), x))
                for j in range(num_scales):
                    rows = layer_stats(pre[j], act[j], arm.activation)
                    if per is None:
                        per = {k: np.full((num_seeds, num_scales, len(rows)), np.nan) for k in rows[0] if k != "layer"}
                    for k in per:
                        per[k][s, j] = [r[k] for r in rows]
                del pre, act
            if diverged is not None:
                for k in per:
                    per[k][np.asarray(diverged[name], bool)] = np.nan
            out[name] = per
    return out


def part2_summary(weight_scales, stats: dict, diverged: dict | None = None, *, dead_share: float = DEAD_SHARE,
                  flat_std: float = FLAT_STD) -> dict:
    """How often the last hidden layer has collapsed, per arm, before and after training.

    Args:
      weight_scales: ``[S]``.
      stats: arm -> ``{'before', 'after'}`` -> statistic -> ``[seeds, S, layers]`` (``trained_stats``).
      diverged: arm -> ``[seeds, S]`` (after training).
      dead_share, flat_std: a layer is *dead* when more than ``dead_share`` of its outputs are exactly 0, *flat*
        when its activations' std is below ``flat_std``; *collapsed* when either. A scale counts when it holds
        in every seed (a NaN, i.e. a diverged model, never counts).

    Returns:
      arm -> ``{'before', 'after'}`` -> ``collapsed``, ``dead``, ``flat`` (numbers of scales),
      ``collapsed_scales``, ``last_std`` (``[S]``, mean over seeds) and ``last_std_range`` (over scales; NaN
      left out), for ReLU also ``last_zero`` and ``last_zero_range``; plus per arm ``diverged`` (the number of
      scales where any seed diverged).
    """
    import numpy as np

    scales = [float(w) for w in weight_scales]
    out = {"num_scales": len(scales), "dead_share": dead_share, "flat_std": flat_std}
    for arm, whens in stats.items():
        entry = {}
        for when, st in whens.items():
            std = np.asarray(st["std"], float)[..., -1]  # [seeds, S]
            with np.errstate(invalid="ignore"):
                flat = (std < flat_std).all(axis=0)
                dead = ((np.asarray(st["zero"], float)[..., -1] > dead_share).all(axis=0) if "zero" in st
                        else np.zeros(len(scales), bool))
            collapsed = flat | dead
            mean_std = np.mean(std, axis=0)
            entry[when] = {
                "collapsed": int(collapsed.sum()), "dead": int(dead.sum()), "flat": int(flat.sum()),
                "collapsed_scales": [w for w, c in zip(scales, collapsed) if c],
                "last_std": [float(v) for v in mean_std], "last_std_range": value_range(mean_std.tolist()),
            }
            if "zero" in st:
                mean_zero = np.mean(np.asarray(st["zero"], float)[..., -1], axis=0)
                entry[when]["last_zero"] = [float(v) for v in mean_zero]
                entry[when]["last_zero_range"] = value_range(mean_zero.tolist())
        entry["diverged"] = int(np.asarray(diverged[arm], bool).any(axis=0).sum()) if diverged is not None else 0
        out[arm] = entry
    return out



# --------------------------------------------------------------------------------------------------
# The verdict, rendered
# --------------------------------------------------------------------------------------------------


def _pct(r) -> str:
    if r is None or r[0] is None:
        return "n/a"
    lo, hi = (100 * v for v in r)
    return f"{lo:.0f} %" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} %"


def _num(v) -> str:
    return "n/a" if v is None else f"{v:.2g}"


def _span(r) -> str:
    if r is None or r[0] is None:
        return "n/a"
    return _num(r[0]) if f"{r[0]:.2g}" == f"{r[1]:.2g}" else f"{_num(r[0])}..{_num(r[1])}"


def _part1_text(p1: dict) -> str:
    s = p1["summary"]
    seeds = p1["seeds"]
    text = (f"Part 1, the book's histogram experiment: {p1['num_inputs']} standard-normal inputs through "
            f"{p1['depth']} layers of {p1['width']} units with weights `std * normal`, each network plain and with "
            f"batch norm in training mode (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
            f"{', means over seeds' if len(seeds) > 1 else ''}).")
    facts = []
    if "sigmoid_std1_saturated" in s:
        r = s["sigmoid_std1_saturated"]
        facts.append(f"with std 1, {_pct(r['plain'])} of the plain sigmoid outputs are saturated per layer "
                     f"against {_pct(r['batchnorm'])} with batch norm")
    if "sigmoid_std0.01_near_half" in s:
        r = s["sigmoid_std0.01_near_half"]
        facts.append(f"with std 0.01, {_pct(r['plain'])} sit within 0.05 of 0.5 against {_pct(r['batchnorm'])}")
    if "relu_std0.01" in s:
        r = s["relu_std0.01"]
        facts.append(f"ReLU with std 0.01 loses a factor {_span(value_range(r['plain_shrink']))} of standard "
                     f"deviation per layer, while batch norm holds it at {_span(value_range(r['batchnorm_std']))}")
    if facts:
        text += " " + facts[0][0].upper() + facts[0][1:] + "".join(
            ("; " if i < len(facts) - 2 else "; and ") + f for i, f in enumerate(facts[1:])) + "."
    return text


def _part1_rows(p1: dict) -> list[str]:
    r = p1["summary"]["ranges"]
    out = []
    rows = (("sigmoid", "1", "saturated", "saturated (< 0.05 or > 0.95)", _pct),
            ("sigmoid", "0.01", "near_half", "within 0.05 of 0.5", _pct),
            ("sigmoid", "xavier", "near_half", "within 0.05 of 0.5", _pct),
            ("relu", "0.01", "std", "activation std", _span),
            ("relu", "he", "std", "activation std", _span),
            ("relu", "he", "zero", "outputs exactly 0", _pct))
    for activation, std, key, what, fmt in rows:
        names = [config_name(activation, std, arm) for arm in ARMS]
        if all(n in r and key in r[n] for n in names):
            label = f"{'ReLU' if activation == 'relu' else activation}, {STD_LABELS[std]}"
            out.append(f"| {label} | {what}, range over layers | {fmt(r[names[0]][key])} | {fmt(r[names[1]][key])} |")
    s = p1["summary"].get("relu_std0.01")
    if s:
        out.append(f"| ReLU, std 0.01 | std of layer l-1 / layer l | {_span(value_range(s['plain_shrink']))} "
                   f"(std {_num(s['plain_std'][0])} -> {_num(s['plain_std'][-1])}) | "
                   f"{_span(value_range(shrink_factors(s['batchnorm_std'])))} |")
    return out


def _part2_rows(p2: dict) -> list[str]:
    s = p2["summary"]
    n = s["num_scales"]
    names = [a for a in ARMS if a in s]
    out = []
    if len(names) != 2:
        return out
    for when in ("before", "after"):
        cells = [f"{s[a][when]['collapsed']} of {n}" for a in names]
        out.append(f"| sweep, layer {DEPTH}, {when} training | scales where it collapsed | {cells[0]} | {cells[1]} |")
        for key, what, fmt in (("last_std_range", "activation std, range over scales", _span),
                               ("last_zero_range", "outputs exactly 0, range over scales", _pct)):
            if all(key in s[a][when] for a in names):
                cells = [fmt(s[a][when][key]) for a in names]
                out.append(f"| sweep, layer {DEPTH}, {when} training | {what} | {cells[0]} | {cells[1]} |")
    cells = [str(s[a]["diverged"]) for a in names]
    out.append(f"| sweep, after training | scales where a model diverged | {cells[0]} | {cells[1]} |")
    return out


def render(results: dict) -> str:
    """The verdict, read from a results.json dict alone.

    Args:
      results: the results as read from results.json (part 2 absent after ``--skip-trained``).

    Returns:
      Markdown: what was measured and the key facts in a paragraph, then a table of the key numbers (plain
      against batch norm): part 1's ranges over layers, part 2's collapsed layers and activation spread
      before and after training.
    """
    v = results["verdict"]
    p1, p2 = v.get("part1"), v.get("part2")
    text = [_part1_text(p1)] if p1 else []
    if p2:
        s = p2["summary"]
        text.append(f"Part 2, the networks of the book's sweep ({s['num_scales']} weight scales, {p2['num_updates']} "
                    f"updates; layer {DEPTH} on the {p2['num_images']} training images, batch norm in training "
                    "mode): a layer counts as collapsed with more than "
                    f"{100 * s['dead_share']:.0f} % exact zeros or an activation std below {s['flat_std']:g}, in "
                    "every seed.")
    out = [" ".join(text), "", "| network | statistic | plain | batch norm |", "|---|---|---|---|"]
    out += _part1_rows(p1) if p1 else []
    out += _part2_rows(p2) if p2 else []
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def analyse(run: protocol.Run) -> dict:
    """Part 1, and (after an engine run) part 2 on the sweep's models before and after training.

    Args:
      run: the run; ``run.data`` gets the histograms and part 2's statistics for the figures.

    Returns:
      ``weight_scales`` and ``verdict`` (``part1``, ``part2``); after ``--skip-trained``, ``grid`` (the
      matmul precision) and ``verdict`` (``part1``).
    """
    import numpy as np

    args = run.args
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    t0 = time.perf_counter()
    runtime.say(args, f"part 1: {len(config_names())} networks on {args.num_inputs} x {WIDTH} normal inputs...")
    configs, run.data["histograms"] = run_part1(seeds, args.num_inputs)
    run.timing["part1_s"] = time.perf_counter() - t0
    verdict = {"part1": {"num_inputs": args.num_inputs, "width": WIDTH, "depth": DEPTH, "seeds": seeds,
                         "stds": STDS, "configs": configs, "summary": part1_summary(configs)}}
    if run.result is None:
        return {"grid": {"matmul_precision": "highest"}, "verdict": verdict}
    from bnjax import grid

    config, result = run.config, run.result
    weight_scales = config.axes["weight_scale"]
    t0 = time.perf_counter()
    runtime.say(args, "part 2: every layer of the sweep's networks, before and after training...")
    x = np.asarray(run.dataset.x_train, np.float32)
    before = trained_stats(config, grid.init_models(config, x.shape[1]), x)
    after = trained_stats(config, result.final, x, result.diverged)
    part2 = {arm: {"before": before[arm], "after": after[arm]} for arm in config.arms}
    run.data["part2"] = part2
    run.timing["part2_stats_s"] = time.perf_counter() - t0
    verdict["part2"] = {
        "arms": list(config.arms), "weight_scales": list(weight_scales), "layers": list(range(1, DEPTH + 1)),
        "num_images": int(x.shape[0]), "num_updates": grid.num_updates(config, x.shape[0]),
        "stats": part2, "summary": part2_summary(weight_scales, part2, result.diverged),
    }
    return {"weight_scales": list(weight_scales), "verdict": verdict}


NOTES = (
    "verdict.part1: the book's histogram experiment. N x 100 standard-normal inputs (jax.random, the seed's "
    "first key), 5 layers of 100 units, W = std * normal (one draw per seed, scaled by each configuration's "
    "std: every configuration is paired), zero biases, the output layer unused; batch norm in training "
    "mode (the statistics of the N inputs). Per configuration, one stats dict per layer: std of the "
    "activations, std_pre of the pre-activations (after batch norm when used), and the shares of "
    "bnjax.claims.activation_stats (sigmoid: saturated < 0.05 or > 0.95, near_half within 0.05 of 0.5; "
    "ReLU: zero, exactly 0), over every unit and input of the layer; means over seeds.",
    "verdict.part2: the networks of the book's sweep before training (grid.init_models, the grid's exact "
    "starting models) and after it, run on the training images with batch norm in training mode (the "
    "statistics of all the training images), so before and after are measured alike. stats[arm][before|"
    "after][statistic] is [seeds, scales, layers]; a diverged model's stats are null. The accuracies above "
    "are measured in evaluation mode, as in experiments.sweep.",
    f"A layer is collapsed when more than {100 * DEAD_SHARE:.0f} % of its outputs are exactly 0 or its "
    f"activations' std is below {FLAT_STD:g}; a scale counts when that holds in every seed.",
)


def notes(run: protocol.Run) -> tuple[str, ...]:
    """The results' notes: part 1's alone after ``--skip-trained``.

    Args:
      run: the run.

    Returns:
      The sentences.
    """
    return NOTES if run.result is not None else NOTES[:1]


EXPERIMENT = protocol.Experiment(
    name="activations",
    title="The premise: the spread of each layer's activations",
    question="The premise (ch. 6.2): do activations keep their spread with BN?",
    doc=__doc__,
    epilog=EPILOG,
    options=add_options,
    skip_engine=lambda args: args.skip_trained,
    grid=grid_config,
    describe=lambda args, config: (f"{len(config.axes['weight_scale'])} scales x BN/plain x {args.num_seeds} "
                                   "seed(s); then every layer's activations before and after"),
    analyse=analyse,
    render=render,
    notes=notes,
    figures=(
        protocol.Figure("histograms_sigmoid.png",
                        lambda run: activations_figures.histogram_figure(run.data["histograms"], "sigmoid")),
        protocol.Figure("histograms_relu.png",
                        lambda run: activations_figures.histogram_figure(run.data["histograms"], "relu")),
        protocol.Figure("trained.png", lambda run: activations_figures.trained_figure(
            run.config.axes["weight_scale"], run.data["part2"], flat_std=FLAT_STD),
            when=lambda run: run.result is not None),
    ),
    quick=("--train-size", "200", "--epochs", "2", "--num-scales", "3", "--num-inputs", "200"),
)


main = protocol.command(EXPERIMENT)


if __name__ == "__main__":
    sys.exit(runtime.main_wrapper(main))
