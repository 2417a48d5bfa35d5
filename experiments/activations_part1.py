"""Part 1 of ``experiments.activations``: the book's histogram experiment (its
weight_init_activation_histogram.py) in JAX, its per-layer statistics and histograms, and their summary.

N x 100 standard-normal inputs, 5 layers of 100 units, weights ``std * normal`` and no biases, for std 1, 0.01,
Xavier and He, sigmoid and ReLU, each plain and with batch norm in training mode. Within a seed every
configuration scales the same normal draw of weights (all configurations are paired) and sees the same inputs.
"""

from __future__ import annotations

import functools
import math

WIDTH = 100  # input features and units per layer
DEPTH = 5  # hidden layers
ACTIVATIONS = ("sigmoid", "relu")
# The four initial scales of the book's script. Every fan-in is 100, so Xavier and He are one number each.
STDS = {"1": 1.0, "0.01": 0.01, "xavier": math.sqrt(1.0 / WIDTH), "he": math.sqrt(2.0 / WIDTH)}
STD_LABELS = {"1": "std 1", "0.01": "std 0.01", "xavier": "Xavier", "he": "He"}
ARMS = ("plain", "batchnorm")  # in figure order: the BN row right under its plain row


def config_name(activation: str, std: str, arm: str) -> str:
    """The key of a part-1 configuration in the verdict.

    Args:
      activation: ``'sigmoid'`` or ``'relu'``.
      std: a key of ``STDS``.
      arm: ``'plain'`` or ``'batchnorm'``.

    Returns:
      E.g. ``'sigmoid/std=1/plain'``.
    """
    return f"{activation}/std={std}/{arm}"


def config_names() -> list[str]:
    """Every part-1 configuration.

    Returns:
      The names in figure order: activation, then std, then plain before batch norm.
    """
    return [config_name(a, s, arm) for a in ACTIVATIONS for s in STDS for arm in ARMS]


def part1_network(activation: str, batch_norm: bool):
    """The book's 100-100x5 network (the output layer is built by ``model.init`` but never used).

    Args:
      activation: ``'sigmoid'`` or ``'relu'``.
      batch_norm: with the book's batch norm after each hidden affine layer.

    Returns:
      The ``model.MLPConfig``.
    """
    from bnjax import model

    return model.MLPConfig(input_size=WIDTH, hidden_sizes=(WIDTH,) * DEPTH, output_size=10, activation=activation,
                           norm=batch_norm)


def part1_keys(seed):
    """The keys of a seed.

    Args:
      seed: an integer (or traced integer).

    Returns:
      ``(input key, weight key)``.
    """
    import jax

    data_key, init_key = jax.random.split(jax.random.key(seed))
    return data_key, init_key


def part1_inputs(seed, num_inputs: int):
    """The inputs of a seed.

    Args:
      seed: an integer.
      num_inputs: N.

    Returns:
      ``[num_inputs, 100]`` standard-normal inputs.
    """
    import jax

    return jax.random.normal(part1_keys(seed)[0], (num_inputs, WIDTH))


def part1_params(seed, activation: str, batch_norm: bool, std):
    """The parameters of one configuration: every configuration of a seed scales the same normal draw.

    Args:
      seed: an integer.
      activation: ``'sigmoid'`` or ``'relu'``.
      batch_norm: with batch norm.
      std: the weights' standard deviation (a number or a traced scalar).

    Returns:
      ``(params, state)`` of ``model.init``, biases 0.
    """
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
      activation: ``'sigmoid'`` or ``'relu'``.

    Returns:
      One dict per layer: ``layer`` (1-based), ``std_pre``, ``std`` and the activation's shares.
    """
    import numpy as np

    from bnjax import claims

    rows = []
    for i in range(len(act)):
        stats = claims.activation_stats(act[i], activation)
        # An overflowed layer's std is NaN (claims.activation_stats): no RuntimeWarning for it.
        with np.errstate(invalid="ignore", over="ignore"):
            std_pre = float(np.asarray(pre[i], float).std())
        rows.append({"layer": i + 1, "std_pre": std_pre, **stats})
    return rows


def mean_over_seeds(per_seed: list[list[dict]]) -> list[dict]:
    """Per-layer stats dicts of several seeds -> their mean per key (one seed: unchanged).

    Args:
      per_seed: ``[seeds][layers]`` dicts of ``layer_stats``.

    Returns:
      ``[layers]`` dicts, ``layer`` kept, every other key the mean over seeds.
    """
    import numpy as np

    return [{k: (v if k == "layer" else float(np.mean([seed[i][k] for seed in per_seed])))
             for k, v in layer.items()} for i, layer in enumerate(per_seed[0])]


def histogram(values, activation: str, bins: int = 30, top: float | None = None) -> dict:
    """The book's histogram of a layer: 30 bins over (0, 1) for sigmoid; for ReLU 30 bins over the positive
    outputs from 0 to ``top`` (default: their 99th percentile), the exact zeros (about half) being counted
    apart, in ``zero``.

    Args:
      values: the layer's activations, any shape.
      activation: ``'sigmoid'`` or ``'relu'``.
      bins: bins.
      top: ReLU's upper end (``None``: ``relu_top(values)``).

    Returns:
      ``{'counts', 'edges', 'zero', 'std'}`` (``zero`` is ``None`` for sigmoid).
    """
    import numpy as np

    v = np.asarray(values, float).ravel()
    with np.errstate(invalid="ignore", over="ignore"):  # an overflowed layer: std NaN, no warning
        std = float(v.std())
    if activation == "sigmoid":
        counts, edges = np.histogram(v, bins=bins, range=(0.0, 1.0))
        return {"counts": counts, "edges": edges, "zero": None, "std": std}
    positive = v[v > 0]
    if top is None:
        top = relu_top(v)
    counts, edges = np.histogram(positive, bins=bins, range=(0.0, top))
    return {"counts": counts, "edges": edges, "zero": float(np.mean(v == 0.0)), "std": std}


def relu_top(values) -> float:
    """The upper end of a ReLU histogram.

    Args:
      values: activations, any shape.

    Returns:
      The 99th percentile of the positive finite entries (1.0 when there is none).
    """
    import numpy as np

    v = np.asarray(values, float).ravel()
    positive = v[(v > 0) & np.isfinite(v)]
    top = float(np.percentile(positive, 99)) if positive.size else 1.0
    return top if top > 0 else 1.0


def layer_histograms(act, activation: str, bins: int = 30) -> list[dict]:
    """One ``histogram`` per layer; for ReLU the layers of a configuration share one range, up to the
    largest of their 99th percentiles, so a shrinking or growing spread shows.

    Args:
      act: ``[layers, ...]`` activations.
      activation: ``'sigmoid'`` or ``'relu'``.
      bins: bins.

    Returns:
      ``[layers]`` histograms.
    """
    top = max(relu_top(a) for a in act) if activation == "relu" else None
    return [histogram(a, activation, bins, top) for a in act]


def run_part1(seeds, num_inputs: int) -> tuple[dict, dict]:
    """Part 1 for every seed.

    Args:
      seeds: the seeds.
      num_inputs: N.

    Returns:
      ``(configs, histograms)``: the per-layer stats (mean over seeds) and the first seed's histograms, both
      keyed by ``config_name``.
    """
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


def value_range(values) -> list:
    """``[min, max]`` of the finite values.

    Args:
      values: numbers or ``None``.

    Returns:
      ``[min, max]`` over the finite ones, ``[None, None]`` when there is none.
    """
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return [min(vals), max(vals)] if vals else [None, None]


def shrink_factors(stds) -> list:
    """How much each layer shrinks its input's spread.

    Args:
      stds: per-layer standard deviations (``None`` allowed).

    Returns:
      ``std[l-1] / std[l]`` for consecutive layers, ``None`` where undefined.
    """
    out = []
    for a, b in zip(stds[:-1], stds[1:]):
        ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b != 0
        out.append(a / b if ok else None)
    return out


def part1_summary(configs: dict) -> dict:
    """The key numbers of part 1.

    Args:
      configs: config name -> per-layer stats dicts (``run_part1``'s first value).

    Returns:
      ``ranges``: per configuration, per statistic, ``[min, max]`` over layers; and where the configurations
      exist, ``sigmoid_std1_saturated`` and ``sigmoid_std0.01_near_half`` (plain and BN ranges over layers),
      ``relu_std0.01`` (per-layer ``std`` plain and BN, and plain's per-layer ``shrink`` factors).
    """
    ranges = {name: {k: value_range([layer[k] for layer in rows]) for k in rows[0] if k != "layer"}
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

