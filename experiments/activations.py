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
import math
import sys
import time

from experiments import harness

_START = time.perf_counter()

# Part 1: the book's histogram network.
WIDTH = 100  # input features and units per layer
DEPTH = 5  # hidden layers
ACTIVATIONS = ("sigmoid", "relu")
# The four initial scales of the book's script. Every fan-in is 100, so Xavier and He are one number each.
STDS = {"1": 1.0, "0.01": 0.01, "xavier": math.sqrt(1.0 / WIDTH), "he": math.sqrt(2.0 / WIDTH)}
STD_LABELS = {"1": "std 1", "0.01": "std 0.01", "xavier": "Xavier", "he": "He"}
ARMS = ("plain", "batchnorm")  # in figure order: the BN row right under its plain row
# Part 2: what counts as a collapsed layer.
DEAD_SHARE = 0.99  # more than this share of ReLU outputs exactly 0
FLAT_STD = 1e-3  # or a standard deviation below this

FIGURES = ("histograms_sigmoid.png", "histograms_relu.png", "trained.png")


def config_name(activation: str, std: str, arm: str) -> str:
    """``'sigmoid/std=1/plain'``: the key of a part-1 configuration in the verdict."""
    return f"{activation}/std={std}/{arm}"


def config_names() -> list[str]:
    """Every part-1 configuration in figure order: activation, then std, then plain before batch norm."""
    return [config_name(a, s, arm) for a in ACTIVATIONS for s in STDS for arm in ARMS]


def build_parser() -> argparse.ArgumentParser:
    p = harness.new_parser("activations", __doc__, (
            "Batch norm is measured in training mode in both parts (the statistics of the inputs themselves: the "
            "N random inputs, or all training images), so the trained networks are measured the same way before "
            "and after training."
        ))
    g = p.add_argument_group("part 1: the book's histograms")
    g.add_argument("--num-inputs", type=harness.int_in(2, 1_000_000), default=1000, metavar="N",
                   help="standard-normal inputs of 100 features (default: 1000, the book's)")
    t = p.add_argument_group("part 2: the trained networks of the book's sweep (defaults: the book's)")
    t.add_argument("--skip-trained", action="store_true", help="part 1 only: no data, no training")
    harness.add_scale_args(t, explicit=False)
    harness.add_epochs_arg(t)
    harness.add_common_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    return harness.check_common_args(parser, args, "activations")


# --------------------------------------------------------------------------------------------------
# Part 1: the book's histogram network (JAX)
# --------------------------------------------------------------------------------------------------


def part1_network(activation: str, batch_norm: bool):
    """The book's 100-100x5 network (the output layer is built by ``model.init`` but never used)."""
    from bnjax import model

    return model.MLPConfig(input_size=WIDTH, hidden_sizes=(WIDTH,) * DEPTH, output_size=10, activation=activation,
                           norm=batch_norm)


def part1_keys(seed):
    """``(input key, weight key)`` of a seed."""
    import jax

    data_key, init_key = jax.random.split(jax.random.key(seed))
    return data_key, init_key


def part1_inputs(seed, num_inputs: int):
    """The ``[num_inputs, 100]`` standard-normal inputs of a seed."""
    import jax

    return jax.random.normal(part1_keys(seed)[0], (num_inputs, WIDTH))


def part1_params(seed, activation: str, batch_norm: bool, std):
    """``(params, state)`` of one configuration: every configuration of a seed scales the same normal draw."""
    from bnjax import model

    return model.init(part1_network(activation, batch_norm), part1_keys(seed)[1], weight_init=None, weight_scale=std)


@functools.lru_cache(maxsize=None)
def _part1_program(num_inputs: int):
    import jax
    import jax.numpy as jnp

    from bnjax import model

    @jax.jit
    def run(seed):
        x = part1_inputs(seed, num_inputs)
        stds = jnp.asarray(list(STDS.values()), jnp.float32)
        out = {}
        for activation in ACTIVATIONS:
            for arm in ARMS:
                net = part1_network(activation, arm == "batchnorm")

                def one(std, net=net, activation=activation, arm=arm):
                    params, state = part1_params(seed, activation, arm == "batchnorm", std)
                    layers = model.hidden(net, params, state, x, train=True)
                    return jnp.stack([p for p, _ in layers]), jnp.stack([a for _, a in layers])

                out[activation, arm] = jax.vmap(one)(stds)  # ([stds, L, N, H], [stds, L, N, H])
        return out

    return run


def layer_stats(pre, act, activation: str) -> list[dict]:
    """Per layer: ``claims.activation_stats`` of the activations plus ``std_pre``, the pre-activations' std.

    Args:
      pre, act: ``[layers, ...]`` pre-activations (after batch norm, when used) and activations.
    """
    import numpy as np

    from bnjax import claims

    rows = []
    for i in range(len(act)):
        stats = claims.activation_stats(act[i], activation)
        rows.append({"layer": i + 1, "std_pre": float(np.asarray(pre[i], float).std()), **stats})
    return rows


def mean_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Per-layer stats dicts of several seeds -> their mean per key (one seed: unchanged)."""
    import numpy as np

    return [{k: (v if k == "layer" else float(np.mean([seed[i][k] for seed in per_seed])))
             for k, v in layer.items()} for i, layer in enumerate(per_seed[0])]


def histogram(values, activation: str, bins: int = 30, top: float | None = None) -> dict:
    """The book's histogram of a layer: 30 bins over (0, 1) for sigmoid; for ReLU 30 bins over the positive
    outputs from 0 to ``top`` (default: their 99th percentile), the exact zeros (about half) being counted
    apart, in ``zero``.

    Returns ``{'counts', 'edges', 'zero', 'std'}`` (``zero`` is ``None`` for sigmoid).
    """
    import numpy as np

    v = np.asarray(values, float).ravel()
    if activation == "sigmoid":
        counts, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
        return {"counts": counts, "edges": edges, "zero": None, "std": float(v.std())}
    positive = v[v > 0]
    if top is None:
        top = relu_top(v)
    counts, edges = np.histogram(positive, bins=bins, range=(0.0, top))
    return {"counts": counts, "edges": edges, "zero": float(np.mean(v == 0.0)), "std": float(v.std())}


def relu_top(values) -> float:
    """The 99th percentile of the positive entries of ``values`` (1.0 when there is none)."""
    import numpy as np

    v = np.asarray(values, float).ravel()
    positive = v[(v > 0) & np.isfinite(v)]
    top = float(np.percentile(positive, 99)) if positive.size else 1.0
    return top if top > 0 else 1.0


def layer_histograms(act, activation: str, bins: int = 30) -> list[dict]:
    """One ``histogram`` per layer of ``act`` ``[layers, ...]``; for ReLU the layers of a configuration share
    one range, up to the largest of their 99th percentiles, so a shrinking or growing spread shows."""
    top = max(relu_top(a) for a in act) if activation == "relu" else None
    return [histogram(a, activation, bins, top) for a in act]


def run_part1(seeds, num_inputs: int) -> tuple[dict, dict]:
    """Part 1 for every seed: ``(configs, histograms)``, the per-layer stats (mean over seeds) and the first
    seed's histograms, both keyed by ``config_name``."""
    import jax
    import numpy as np

    program = _part1_program(num_inputs)
    per_seed = {name: [] for name in config_names()}
    histograms = {}
    with jax.default_matmul_precision("highest"):
        for n, seed in enumerate(seeds):
            out = jax.device_get(program(np.int32(seed)))
            for (activation, arm), (pre, act) in out.items():
                for j, std in enumerate(STDS):
                    name = config_name(activation, std, arm)
                    per_seed[name].append(layer_stats(pre[j], act[j], activation))
                    if n == 0:
                        histograms[name] = layer_histograms(act[j], activation)
            del out
    configs = {name: mean_over_seeds(rows) for name, rows in per_seed.items()}
    return configs, histograms


# --------------------------------------------------------------------------------------------------
# Part 1: verdict (pure, on per-layer stats)
# --------------------------------------------------------------------------------------------------


def _range(values) -> list:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return [min(vals), max(vals)] if vals else [None, None]


def shrink_factors(stds) -> list:
    """``std[l-1] / std[l]`` for consecutive layers (``None`` where undefined): how much each layer shrinks."""
    out = []
    for a, b in zip(stds[:-1], stds[1:]):
        ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b != 0
        out.append(a / b if ok else None)
    return out


def part1_summary(configs: dict) -> dict:
    """The key numbers of part 1 from ``configs`` (name -> per-layer stats dicts).

    Returns:
      ``ranges``: per configuration, per statistic, ``[min, max]`` over layers; and where the configurations
      exist, ``sigmoid_std1_saturated`` and ``sigmoid_std0.01_near_half`` (plain and BN ranges over layers),
      ``relu_std0.01`` (per-layer ``std`` plain and BN, and plain's per-layer ``shrink`` factors).
    """
    ranges = {name: {k: _range([layer[k] for layer in rows]) for k in rows[0] if k != "layer"}
              for name, rows in configs.items() if rows}
    out = {"ranges": ranges}

    def pair(activation, std, key):
        names = {arm: config_name(activation, std, arm) for arm in ARMS}
        if all(n in ranges and key in ranges[n] for n in names.values()):
            return {arm: ranges[n][key] for arm, n in names.items()}
        return None

    for label, (activation, std, key) in {"sigmoid_std1_saturated": ("sigmoid", "1", "saturated"),
                                          "sigmoid_std0.01_near_half": ("sigmoid", "0.01", "near_half")}.items():
        found = pair(activation, std, key)
        if found is not None:
            out[label] = found
    plain, bn = (configs.get(config_name("relu", "0.01", arm)) for arm in ARMS)
    if plain and bn:
        plain_std = [layer["std"] for layer in plain]
        out["relu_std0.01"] = {"plain_std": plain_std, "plain_shrink": shrink_factors(plain_std),
                               "batchnorm_std": [layer["std"] for layer in bn]}
    return out


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
                "last_std": [float(v) for v in mean_std], "last_std_range": _range(mean_std.tolist()),
            }
            if "zero" in st:
                mean_zero = np.mean(np.asarray(st["zero"], float)[..., -1], axis=0)
                entry[when]["last_zero"] = [float(v) for v in mean_zero]
                entry[when]["last_zero_range"] = _range(mean_zero.tolist())
        entry["diverged"] = int(np.asarray(diverged[arm], bool).any(axis=0).sum()) if diverged is not None else 0
        out[arm] = entry
    return out


# --------------------------------------------------------------------------------------------------
# Verdict and report
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


def verdict_lines(verdict: dict) -> list[str]:
    """The printed verdict: a few lines of numbers, from ``verdict`` alone (also after a JSON round trip)."""
    lines = []
    p1 = verdict.get("part1")
    if p1:
        s = p1["summary"]
        lines.append(f"part 1: {p1['num_inputs']} x {WIDTH} normal inputs, {DEPTH} layers of {WIDTH} units "
                     f"(seed{'s' if len(p1['seeds']) > 1 else ''} {', '.join(map(str, p1['seeds']))}); "
                     "ranges over the layers:")
        if "sigmoid_std1_saturated" in s:
            r = s["sigmoid_std1_saturated"]
            lines.append(f"  sigmoid, std 1:    saturated (< 0.05 or > 0.95) {_pct(r['plain'])} plain, "
                         f"{_pct(r['batchnorm'])} with BN")
        if "sigmoid_std0.01_near_half" in s:
            r = s["sigmoid_std0.01_near_half"]
            lines.append(f"  sigmoid, std 0.01: within 0.05 of 0.5 {_pct(r['plain'])} plain, "
                         f"{_pct(r['batchnorm'])} with BN")
        if "relu_std0.01" in s:
            r = s["relu_std0.01"]
            lines.append(f"  ReLU, std 0.01:    std shrinks {_span(_range(r['plain_shrink']))}x per layer plain "
                         f"({_num(r['plain_std'][0])} -> {_num(r['plain_std'][-1])}), "
                         f"BN holds it at {_span(_range(r['batchnorm_std']))}")
        ranges = s["ranges"]
        for label, activation, std, key, what, fmt in (
                ("sigmoid, Xavier:  ", "sigmoid", "xavier", "near_half", "within 0.05 of 0.5", _pct),
                ("ReLU, He:         ", "relu", "he", "std", "std", _span)):
            names = [config_name(activation, std, arm) for arm in ARMS]
            if all(n in ranges and key in ranges[n] for n in names):
                lines.append(f"  {label}{what} {fmt(ranges[names[0]][key])} plain, "
                             f"{fmt(ranges[names[1]][key])} with BN")
    p2 = verdict.get("part2")
    if p2:
        s = p2["summary"]
        n = s["num_scales"]
        arms = [a for a in p2["arms"] if a in s]
        label = {a: ("BN" if a == "batchnorm" else a) for a in arms}
        lines.append(f"part 2: the sweep's networks ({n} scales, {p2['num_updates']} updates), layer {DEPTH} on the "
                     f"{p2['num_images']} training images, BN in training mode:")
        cells = [f"{label[a]} at {s[a]['after']['collapsed']} of {n} scales after training "
                 f"({s[a]['before']['collapsed']} before)" for a in arms]
        diverged = [f"{label[a]} diverged at {s[a]['diverged']}" for a in arms if s[a]["diverged"]]
        lines.append(f"  collapsed (> {100 * s['dead_share']:.0f} % zeros or std < {s['flat_std']:g}): "
                     + ", ".join(cells) + (f"; {', '.join(diverged)}" if diverged else ""))
        lines.append("  activation std over the scales: " + "; ".join(
            f"{label[a]} {_span(s[a]['before']['last_std_range'])} before, {_span(s[a]['after']['last_std_range'])} "
            "after" for a in arms))
        zero = [a for a in arms if "last_zero_range" in s[a]["after"]]
        if zero:
            lines.append("  outputs exactly 0: " + "; ".join(
                f"{label[a]} {_pct(s[a]['before']['last_zero_range'])} before, "
                f"{_pct(s[a]['after']['last_zero_range'])} after" for a in zero))
    return lines


def report(results: dict) -> str:
    """Markdown for a combined report (under its own heading there): a paragraph and a table of the key numbers,
    read from results.json alone."""
    v = results["verdict"]
    p1, p2 = v.get("part1"), v.get("part2")
    out, text = [], []
    if p1:
        s = p1["summary"]
        text.append(f"The book's histogram experiment: {p1['num_inputs']} standard-normal inputs through "
                    f"{p1['depth']} layers of {p1['width']} units with weights `std * normal`, each network plain "
                    "and with batch norm in training mode.")
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
            facts.append(f"ReLU with std 0.01 loses a factor {_span(_range(r['plain_shrink']))} of standard "
                         f"deviation per layer, while batch norm holds it at {_span(_range(r['batchnorm_std']))}")
        if facts:
            text.append(facts[0][0].upper() + facts[0][1:] + "".join(
                ("; " if i < len(facts) - 1 else "; and ") + f for i, f in enumerate(facts[1:])) + ".")
    if p2:
        s = p2["summary"]
        text.append(f"On the networks of the book's sweep ({s['num_scales']} weight scales, {p2['num_updates']} "
                    f"updates; layer {DEPTH} on the {p2['num_images']} training images, batch norm in training "
                    "mode) a layer counts as collapsed with more than "
                    f"{100 * s['dead_share']:.0f} % exact zeros or an activation std below {s['flat_std']:g}.")
    out += [" ".join(text), "", "| network | statistic | plain | batch norm |", "|---|---|---|---|"]
    if p1:
        r = p1["summary"]["ranges"]
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
                out.append(f"| {label} | {what}, range over layers | {fmt(r[names[0]][key])} | "
                           f"{fmt(r[names[1]][key])} |")
        s = p1["summary"].get("relu_std0.01")
        if s:
            out.append(f"| ReLU, std 0.01 | std of layer l-1 / layer l | {_span(_range(s['plain_shrink']))} | "
                       f"{_span(_range(shrink_factors(s['batchnorm_std'])))} |")
    if p2:
        s = p2["summary"]
        n = s["num_scales"]
        names = [a for a in ARMS if a in s]
        if len(names) == 2:
            for when in ("before", "after"):
                cells = [f"{s[a][when]['collapsed']} of {n}" for a in names]
                out.append(f"| sweep, layer {DEPTH}, {when} training | scales where it collapsed | {cells[0]} | "
                           f"{cells[1]} |")
            for key, what, fmt in (("last_std_range", "activation std, range over scales", _span),
                                   ("last_zero_range", "outputs exactly 0, range over scales", _pct)):
                if all(key in s[a]["after"] for a in names):
                    cells = [fmt(s[a]["after"][key]) for a in names]
                    out.append(f"| sweep, layer {DEPTH}, after training | {what} | {cells[0]} | {cells[1]} |")
            cells = [str(s[a]["diverged"]) for a in names]
            out.append(f"| sweep, after training | scales where a model diverged | {cells[0]} | {cells[1]} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def histogram_figure(histograms: dict, activation: str):
    """The book's row of histograms ("1-layer" .. "5-layer") per configuration of ``activation``, the BN row
    under its plain row. ``histograms``: config name -> ``layer_histograms(...)``."""
    from experiments import plot

    plt = plot.pyplot()
    names = [n for n in config_names() if n.startswith(activation + "/") and n in histograms]
    rows, cols = len(names), max(len(histograms[n]) for n in names)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.9, 1.05 * rows + 0.8), squeeze=False,
                             sharey="row")
    for r, name in enumerate(names):
        _, std, arm = name.split("/")
        for c, h in enumerate(histograms[name]):
            ax = axes[r, c]
            ax.stairs(h["counts"], h["edges"], fill=True, color="C0" if arm == "plain" else "C1")
            lo, top = h["edges"][0], h["edges"][-1]
            ax.set_xlim(lo, top)
            ax.tick_params(labelsize=6, length=2, pad=1)
            if activation == "sigmoid":
                ax.set_xticks([0, 0.5, 1])
                ax.set_xticklabels(["0", "0.5", "1"] if r == rows - 1 else [])
            else:
                # One range per row: the first panel names it, the others share it.
                ax.set_xticks([0, top])
                ax.set_xticklabels(["0", f"{top:.2g}"] if c == 0 else [])
                for label, align in zip(ax.get_xticklabels(), ("left", "right")):
                    label.set_horizontalalignment(align)
                ax.text(0.97, 0.92, f"0: {100 * h['zero']:.0f} %\nstd {h['std']:.2g}", transform=ax.transAxes,
                        ha="right", va="top", fontsize=6)
            if r == 0:
                ax.set_title(f"{c + 1}-layer", fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{std}\n{'BN' if arm == 'batchnorm' else arm}", fontsize=7)
            else:
                ax.tick_params(labelleft=False)
    if activation == "sigmoid":
        title = "sigmoid activations per layer, plain and with batch norm (30 bins over (0, 1))"
    else:
        title = ("ReLU activations per layer, plain and with batch norm (positive outputs, 30 bins over one range "
                 "per row: 0 to the largest 99th percentile)")
    fig.suptitle(title, fontsize=9)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.1 / width, bottom=0.3 / height, top=1 - 0.55 / height,
                        wspace=0.08, hspace=0.25)
    return fig


def trained_figure(weight_scales, stats: dict, layers=(1, DEPTH)):
    """x = weight scale (log): activation std and share of exact zeros of ``layers``, before and after
    training; BN solid, plain dashed; mean over seeds. ``stats``: as ``part2_summary``'s."""
    import numpy as np

    from experiments import plot

    plt = plot.pyplot()
    rows = [("std", "activation std", True)]
    if any("zero" in st for whens in stats.values() for st in whens.values()):
        rows.append(("zero", "share of outputs = 0", False))
    fig, axes = plt.subplots(len(rows), 2, figsize=(9.0, 3.0 * len(rows) + 0.5), squeeze=False, sharex=True,
                             sharey="row")
    for r, (key, label, log) in enumerate(rows):
        for c, when in enumerate(("before", "after")):
            ax = axes[r, c]
            for arm, whens in stats.items():
                st = whens[when]
                if key not in st:
                    continue
                values = np.asarray(st[key], float).mean(axis=0)  # [S, L]
                for k, layer in enumerate(layers):
                    arm_label = "BN" if arm == "batchnorm" else arm
                    ax.plot(weight_scales, values[:, layer - 1], "-" if arm == "batchnorm" else "--",
                            color=f"C{k}", marker=".", markersize=4, label=f"layer {layer}, {arm_label}")
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
                ax.axhline(FLAT_STD, color="0.5", linestyle=":", linewidth=0.8)
            else:
                ax.set_ylim(-0.02, 1.02)
            if r == 0:
                ax.set_title(f"{when} training", fontsize=10)
            if c == 0:
                ax.set_ylabel(label)
            if r == len(rows) - 1:
                ax.set_xlabel("weight init std")
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle("the sweep's networks on the training images (batch norm in training mode)", fontsize=10)
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.65 / height,
                        wspace=0.08, hspace=0.15)
    return fig


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    started = harness.start(args)
    import numpy as np

    timing = {}
    result = ds = None
    part2 = None
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    if not args.skip_trained:
        from bnjax import grid

        ds, data_s = harness.load_timed(args, 0)
        weight_scales = grid.book_weight_scales(args.num_scales)
        config = grid.GridConfig(axes={"weight_scale": weight_scales}, num_records=args.epochs, seed=args.seed,
                                  num_seeds=args.num_seeds, keep_final=True,
                                  max_models_per_chunk=args.max_models_per_chunk)
        result, timing = harness.run_engine(
            args, started, config, ds, name="activations",
            what=f"{len(weight_scales)} scales x BN/plain x {args.num_seeds} seed(s); then every layer's "
                 "activations before and after")
        timing["data_s"] = data_s
    if not started["is_main"]:  # process 0 alone writes
        return 0

    t0 = time.perf_counter()
    harness.say(args, f"part 1: {len(config_names())} networks on {args.num_inputs} x {WIDTH} normal inputs...")
    configs, histograms = run_part1(seeds, args.num_inputs)
    timing["part1_s"] = time.perf_counter() - t0
    verdict = {"part1": {"num_inputs": args.num_inputs, "width": WIDTH, "depth": DEPTH, "seeds": seeds,
                         "stds": STDS, "configs": configs, "summary": part1_summary(configs)}}
    figures = {
        "histograms_sigmoid.png": lambda: histogram_figure(histograms, "sigmoid"),
        "histograms_relu.png": lambda: histogram_figure(histograms, "relu"),
    }
    if result is not None:
        from bnjax import grid

        t0 = time.perf_counter()
        harness.say(args, "part 2: every layer of the sweep's networks, before and after training...")
        x = np.asarray(ds.x_train, np.float32)
        before = trained_stats(config, grid.init_models(config, x.shape[1]), x)
        after = trained_stats(config, result.final, x, result.diverged)
        part2 = {arm: {"before": before[arm], "after": after[arm]} for arm in config.arms}
        timing["part2_stats_s"] = time.perf_counter() - t0
        verdict["part2"] = {
            "arms": list(config.arms), "weight_scales": list(weight_scales), "layers": list(range(1, DEPTH + 1)),
            "num_images": int(x.shape[0]), "num_updates": grid.num_updates(config, x.shape[0]),
            "stats": part2, "summary": part2_summary(weight_scales, part2, result.diverged),
        }
        figures["trained.png"] = lambda: trained_figure(weight_scales, part2)
    notes = [
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
    ]
    if result is not None:
        record = harness.results_record(args, result, ds, timing, cache_dir=started["cache_dir"],
                                        weight_scales=list(weight_scales), verdict=verdict, notes=notes)
    else:
        timing["import_s"] = started["import_s"]
        record = {"config": vars(args), "grid": {"matmul_precision": "highest"}, "verdict": verdict,
                  "notes": notes[:1], "timing": timing,
                  "environment": dict(harness.environment(), compilation_cache=started["cache_dir"])}
    harness.finish(args, record, figures, verdict_lines(verdict), _START)
    return 0


if __name__ == "__main__":
    sys.exit(harness.main_wrapper(main))
