"""The benchmark's layer section: one norm layer alone, bnjax against Flax linen.

The jitted forward + backward of ``sum(norm(x) * w)`` (gradients w.r.t. the norm's parameters and x, training
mode, so the batch statistics and the running update are computed and the new state returned), float32, on
NHWC [128, 32, 32, 64], [256, 14, 14, 256] and [1024, 512], for bnjax ``batch_norm_apply`` (two-pass variance),
bnjax ``batch_renorm()`` and ``ghost_batch_norm(32)``, and Flax linen ``nn.BatchNorm`` with its default one-pass
``use_fast_variance=True`` and with the two-pass ``use_fast_variance=False`` (Flax columns skipped, with a note,
if flax is not installed). Each variant is compiled by a warm-up call, then timed over N rounds (20; 5 and ~1/16
of the elements with --quick) in which every variant runs once in turn, each call blocked on; the median per
variant is reported in ms, and as a ratio to bnjax ``batch_norm_apply`` (Flax-default / bnjax > 1: bnjax
faster). Then, per shape, a float32 accuracy check at mean / std = 1e4 (x = 1e4 + N(0, 1)): the max abs error
of bnjax's batch variance (``layers.batch_norm_stats``), of the one-pass ``E[x^2] - E[x]^2``, and of the
variance Flax uses, against a float64 NumPy two-pass variance of the same values (and of the normalised
outputs): one-pass loses the variance entirely there, two-pass does not. Speeds are reported (as ratios), never
asserted: they depend on the machine and on what else runs on it.

Run through ``python -m experiments.benchmark`` (``--layers-only`` runs just this section, ``--skip l`` leaves it
out); docs/benchmark.md ("Layer speed") has a measured table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

LAYER_SHAPES = ((128, 32, 32, 64), (256, 14, 14, 256), (1024, 512))
# --quick: about 1/16 of the elements (batch / 4 and H, W / 2 for NHWC, batch / 8 for [N, C]), so that
# ghost_batch_norm(32) still forms several groups in every shape.
QUICK_LAYER_SHAPES = ((32, 16, 16, 64), (64, 7, 7, 256), (128, 512))
LAYER_VARIANTS = (  # key, printed name; the ratios divide by the first
    ("bnjax", "bnjax batch_norm_apply (two-pass)"),
    ("bnjax_renorm", "bnjax batch_renorm()"),
    ("bnjax_ghost32", "bnjax ghost_batch_norm(32)"),
    ("flax_fast", "Flax nn.BatchNorm, fast variance (default)"),
    ("flax_two_pass", "Flax nn.BatchNorm, use_fast_variance=False"),
)
# 1 GiB per float32 array: 20 times the default's largest shape; the section holds several such arrays per variant.
MAX_LAYER_ELEMENTS = 2**28
ACCURACY_MEAN = 1e4  # x = 1e4 + N(0, 1): mean / std = 1e4
FLAX_MISSING = "Flax columns skipped: flax is not installed (pip install -e '.[bench]')"


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse ``--layer-shapes``: '128x32x32x64,1024x512' -> ((128, 32, 32, 64), (1024, 512)).

    Args:
      text: comma-separated shapes, dimensions joined by ``x``, channels last.

    Returns:
      The shapes, each with at least two positive dimensions, a batch (the first) of at least 2 (a batch
      variance needs two rows) and at most ``MAX_LAYER_ELEMENTS`` elements.

    Raises:
      argparse.ArgumentTypeError: text that is not such a list.
    """
    try:
        shapes = tuple(tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip())
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like '128x32x32x64,1024x512', got {text!r}")
    for s in shapes:
        name = "x".join(map(str, s))
        if s[0] < 2:
            raise argparse.ArgumentTypeError(f"the batch (first dimension) must be >= 2, got {name}")
        if math.prod(s) > MAX_LAYER_ELEMENTS:
            raise argparse.ArgumentTypeError(f"at most {MAX_LAYER_ELEMENTS} elements per shape (2^28), got {name} "
                                             f"= {math.prod(s)}")
    return shapes


def _import_flax_linen():
    """``flax.linen``, or ``None`` if flax is not installed."""
    try:
        import flax.linen as nn
    except ImportError:
        return None
    return nn


def _layer_steps(shape: tuple[int, ...], key) -> dict:
    """For every variant, a jitted ``step(params, state, x, w) -> ((loss, new_state), (grad_params, grad_x))``
    with ``loss = sum(norm(x) * w)`` in training mode, and its arguments. Flax variants only if flax imports."""
    import jax
    import jax.numpy as jnp

    from bnjax import layers

    kx, kw, kinit = jax.random.split(key, 3)
    x = 3.0 + jax.random.normal(kx, shape, jnp.float32)  # a non-zero mean, as after a ReLU
    w = jax.random.normal(kw, shape, jnp.float32)
    channels = shape[-1]

    def make(apply, params, state):
        def loss(p, xx, s, ww):
            y, new_state = apply(p, s, xx)
            return jnp.sum(y * ww), new_state

        def step(p, s, xx, ww):
            (value, new_state), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, xx, s, ww)
            return (value, new_state), grads

        return jax.jit(step), (params, state, x, w)

    steps = {}
    params, state = layers.batch_norm_init(channels)
    steps["bnjax"] = make(lambda p, s, xx: layers.batch_norm_apply(p, s, xx, train=True), params, state)
    for name, norm in (("bnjax_renorm", layers.batch_renorm()), ("bnjax_ghost32", layers.ghost_batch_norm(32))):
        params, state = norm.init(channels)
        steps[name] = make(lambda p, s, xx, norm=norm: norm.apply(p, s, xx, train=True), params, state)

    nn = _import_flax_linen()
    if nn is not None:
        for name, fast in (("flax_fast", True), ("flax_two_pass", False)):
            m = nn.BatchNorm(use_running_average=False, use_fast_variance=fast)
            variables = m.init(kinit, x)

            def apply(p, s, xx, m=m):
                y, updates = m.apply({"params": p, "batch_stats": s}, xx, mutable=["batch_stats"])
                return y, updates["batch_stats"]

            steps[name] = make(apply, variables["params"], variables["batch_stats"])
    return steps


def time_interleaved(steps: dict, repeats: int) -> dict:
    """Median seconds per call of every ``(fn, args)`` in ``steps``: each compiled by a warm-up call first,
    then ``repeats`` rounds in which every variant is timed once in turn (round robin, the starting variant
    rotating each round), so a slow spell of a shared machine hits all variants alike.

    Args:
      steps: variant name -> ``(fn, args)``, as ``_layer_steps`` builds them.
      repeats: rounds; every variant is timed once per round.

    Returns:
      Variant name -> median seconds per call.

    Raises:
      ValueError: ``repeats`` < 1 (no time to take a median of).
    """
    import jax

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    for fn, args in steps.values():
        jax.block_until_ready(fn(*args))
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn, args = steps[name]
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_accuracy(shape: tuple[int, ...], key, mean: float = ACCURACY_MEAN) -> dict:
    """Float32 batch statistics at mean / std = ``mean`` (x = mean + N(0, 1)) against float64 NumPy computed on
    the same float32 values: the max abs error of each batch variance (the true variances are ~1, so these are
    relative errors too), and of the normalised output (against NumPy's normalisation with that layer's eps).

    ``bnjax``: ``layers.batch_norm_stats`` (two-pass) and ``batch_norm_apply``; ``one_pass_f32``:
    ``max(0, E[x^2] - E[x]^2)`` in float32, the formula of Flax's fast variance; ``flax_fast`` /
    ``flax_two_pass``: the variance Flax's ``nn.BatchNorm`` uses (read back from its running variance with
    ``momentum=0``) and its output, if flax is installed.

    Args:
      shape: the input shape, channels last.
      key: a ``jax.random`` key for the normal draw.
      mean: the input's mean (its std is 1).

    Returns:
      ``{"mean", "std", "true_var_max", <variant>: {"var_max_abs_err", "var_rel_err"[, "out_max_abs_err"]}}``
      for the variants ``bnjax``, ``one_pass_f32`` and, with flax, ``flax_fast``, ``flax_two_pass``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bnjax import layers

    x = mean + jax.random.normal(key, shape, jnp.float32)
    x64 = np.asarray(x, np.float64)
    red = tuple(range(x64.ndim - 1))
    mean64 = x64.mean(axis=red)
    var64 = np.square(x64 - mean64).mean(axis=red)  # two-pass, float64

    def var_err(v) -> float:
        return float(np.max(np.abs(np.asarray(v, np.float64) - var64)))

    def out_err(y, eps) -> float:
        ref = (x64 - mean64) / np.sqrt(var64 + eps)
        return float(np.max(np.abs(np.asarray(y, np.float64) - ref)))

    out = {"mean": mean, "std": 1.0, "true_var_max": float(var64.max())}
    _, var_b, _ = jax.jit(lambda xx: layers.batch_norm_stats(xx))(x)  # a fresh trace: reads the module now
    params, state = layers.batch_norm_init(shape[-1])
    y_b, _ = jax.jit(lambda p, s, xx: layers.batch_norm_apply(p, s, xx, train=True))(params, state, x)
    out["bnjax"] = {"var_max_abs_err": var_err(var_b), "out_max_abs_err": out_err(y_b, layers.CONVENTIONS["eps"])}

    @jax.jit
    def one_pass(xx):
        mu = jnp.mean(xx, axis=red)
        return jnp.maximum(0.0, jnp.mean(jnp.square(xx), axis=red) - jnp.square(mu))

    out["one_pass_f32"] = {"var_max_abs_err": var_err(one_pass(x))}

    nn = _import_flax_linen()
    if nn is not None:
        for name, fast in (("flax_fast", True), ("flax_two_pass", False)):
            m = nn.BatchNorm(use_running_average=False, use_fast_variance=fast, momentum=0.0)
            variables = m.init(key, x)
            y_f, upd = jax.jit(lambda v, xx, m=m: m.apply(v, xx, mutable=["batch_stats"]))(variables, x)
            # momentum 0: the new running variance is 0 * old + 1 * (the batch variance Flax normalised with).
            out[name] = {"var_max_abs_err": var_err(upd["batch_stats"]["var"]),
                         "out_max_abs_err": out_err(y_f, m.epsilon)}
    for entry in out.values():
        if isinstance(entry, dict):
            entry["var_rel_err"] = entry["var_max_abs_err"] / out["true_var_max"]
    return out


def bench_layers(shapes=LAYER_SHAPES, repeats: int = 20, seed: int = 0) -> dict:
    """The layer section: per shape, median ms per call of every variant (interleaved, see
    ``time_interleaved``), each variant's time over bnjax ``batch_norm_apply``'s (``>1``: bnjax faster), and
    the float32 accuracy check of ``layer_accuracy``. Flax variants are left out if flax is not installed.

    Args:
      shapes: the input shapes, channels last.
      repeats: interleaved rounds to take the medians of.
      seed: the seed of the inputs (shape ``i`` draws from ``fold_in(key(seed), i)``).

    Returns:
      The section's JSON: ``what``, ``repeats``, ``variants`` (key -> printed name), ``flax`` (installed),
      ``shapes`` (one row per shape: ``shape``, ``ms``, ``ratio_to_bnjax``, ``ratio_flax_to_bnjax``,
      ``accuracy``) and, without flax, ``note``.
    """
    import jax

    flax_ok = _import_flax_linen() is not None
    rows = []
    for i, shape in enumerate(shapes):
        shape = tuple(int(d) for d in shape)
        print(f"layers: {'x'.join(map(str, shape))} ...", flush=True)
        key = jax.random.fold_in(jax.random.key(seed), i)
        steps = _layer_steps(shape, key)
        seconds = time_interleaved(steps, repeats)
        del steps
        ms = {name: 1e3 * s for name, s in seconds.items()}
        rows.append({
            "shape": list(shape),
            "ms": ms,
            "ratio_to_bnjax": {name: t / ms["bnjax"] for name, t in ms.items()},
            "ratio_flax_to_bnjax": ms["flax_fast"] / ms["bnjax"] if "flax_fast" in ms else None,
            "accuracy": layer_accuracy(shape, jax.random.fold_in(key, 1)),
        })
    result = {
        "what": "jitted forward + backward of sum(norm(x) * w) w.r.t. the norm's params and x, training mode "
                "(batch statistics and the running update computed, the new state returned), float32, "
                "x = 3 + N(0, 1); median ms over interleaved calls",
        "repeats": repeats,
        "variants": {key: name for key, name in LAYER_VARIANTS if flax_ok or not key.startswith("flax")},
        "flax": flax_ok,
        "shapes": rows,
    }
    if not flax_ok:
        result["note"] = FLAX_MISSING
    return result


def print_layers(res: dict) -> None:
    """Print the layer section's speed table and its accuracy table.

    Args:
      res: what ``bench_layers`` returned.
    """
    keys = list(res["variants"])
    short = {"bnjax": "bnjax", "bnjax_renorm": "renorm", "bnjax_ghost32": "ghost32", "flax_fast": "flax fast",
             "flax_two_pass": "flax 2-pass"}
    print(f"\nlayer speed: {res['what']} (N = {res['repeats']})")
    for key in keys:
        print(f"  {short[key]:<11} = {res['variants'][key]}")
    header = f"{'shape':<16}" + "".join(f"{short[k] + ' ms':>15}" for k in keys)
    if res["flax"]:
        header += f"{'flax fast / bnjax':>19}{'flax 2-pass / bnjax':>21}"
    print(header + "\n" + "-" * len(header))
    for row in res["shapes"]:
        line = f"{'x'.join(map(str, row['shape'])):<16}" + "".join(f"{row['ms'][k]:>15.2f}" for k in keys)
        if res["flax"]:
            line += f"{row['ratio_to_bnjax']['flax_fast']:>19.2f}{row['ratio_to_bnjax']['flax_two_pass']:>21.2f}"
        print(line)
    print("ratio = time / time of bnjax batch_norm_apply (> 1: bnjax faster); measured, never asserted.")
    if not res["flax"]:
        print(res["note"])

    acc = [k for k in ("bnjax", "one_pass_f32", "flax_fast", "flax_two_pass") if k in res["shapes"][0]["accuracy"]]
    names = {"bnjax": "bnjax", "one_pass_f32": "E[x2]-E[x]2 f32", "flax_fast": "flax fast",
             "flax_two_pass": "flax 2-pass"}
    print(f"\nfloat32 accuracy at mean / std = {ACCURACY_MEAN:g} (x = {ACCURACY_MEAN:g} + N(0, 1), true variance ~1): "
          "max abs error vs float64 NumPy two-pass")
    header = f"{'shape':<16}" + "".join(f"{'var: ' + names[k]:>22}" for k in acc) + \
        "".join(f"{'y: ' + names[k]:>16}" for k in acc if "out_max_abs_err" in res["shapes"][0]["accuracy"][k])
    print(header + "\n" + "-" * len(header))
    for row in res["shapes"]:
        a = row["accuracy"]
        print(f"{'x'.join(map(str, row['shape'])):<16}" + "".join(f"{a[k]['var_max_abs_err']:>22.3g}" for k in acc)
              + "".join(f"{a[k]['out_max_abs_err']:>16.3g}" for k in acc if "out_max_abs_err" in a[k]))
    print("var: error of the batch variance; y: error of the normalised output (gamma = 1, beta = 0).")
