"""Benchmark: the book's sweep as one compiled program against the obvious alternatives, side by side.

Variants, all on the same data and protocol (the bundled MNIST subset, 1000 training images, 191 updates and
20 records per model, 16 scales x BN/plain by default):

  (a) bnjax's sweep: every model in one jitted, vmapped program (bnjax.grid.run_grid)
  (b) the same jitted train step, looping over the models (and steps) in Python
  (c) the book's network in NumPy, float64, as the book runs it (all BLAS threads, and one BLAS thread)
  (d) Flax linen + optax, one model at a time, with one compile per structure (if flax is installed)

Reports compile and run time separately, each variant's run-time ratio to (a), and achieved GFLOP/s
(matmul FLOPs counted by bnjax.grid.grid_flops) against a float32 matmul peak measured in the same run.

Then a scaling table of the grid engine: the book's sweep with more seeds (32, 256, 1024 models; 4096 too on an
accelerator), each in a fresh process, reporting model-updates per second, GFLOP/s, the per-model cost
relative to the 32-model run, the chunks used, and peak memory (host RSS; device memory on an accelerator).

Then a layer section: one norm layer alone, the jitted forward + backward of ``sum(norm(x) * w)`` (gradients
w.r.t. the norm's parameters and x, training mode, so the batch statistics and the running update are computed
and the new state returned), float32, on NHWC [128, 32, 32, 64], [256, 14, 14, 256] and [1024, 512], for
bnjax ``batch_norm_apply`` (two-pass variance), bnjax ``batch_renorm()`` and ``ghost_batch_norm(32)``, and Flax
linen ``nn.BatchNorm`` with its default one-pass ``use_fast_variance=True`` and with the two-pass
``use_fast_variance=False`` (Flax columns skipped, with a note, if flax is not installed). Each variant is
compiled by a warm-up call, then timed over N rounds (20; 5 and ~1/16 of the elements with --quick) in which
every variant runs once in turn, each call blocked on; the median per variant is reported in ms, and as a ratio
to bnjax ``batch_norm_apply`` (Flax-default / bnjax > 1: bnjax faster). Then, per shape, a float32 accuracy
check at mean / std = 1e4 (x = 1e4 + N(0, 1)): the max abs error of bnjax's batch variance
(``layers.batch_norm_stats``), of the one-pass ``E[x^2] - E[x]^2``, and of the variance Flax uses, against a
float64 NumPy two-pass variance of the same values (and of the normalised outputs): one-pass loses the
variance entirely there, two-pass does not. ``--layers-only`` runs just this section; ``--skip l`` leaves it
out. Speeds are reported (as ratios), never asserted: they depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 scales x 2 records, and small layer shapes with 5 rounds: checks that every variant runs")
    p.add_argument("--repeats", type=int, default=3, help="runs of (a) to take the median of (default: 3)")
    p.add_argument("--skip", default="", help="comma-separated variants to skip, e.g. 'c,d'; 'l' skips the layer "
                                              "section")
    p.add_argument("--layers-only", action="store_true",
                   help="run only the layer section (no training variants, no scaling table)")
    p.add_argument("--layer-shapes", type=_parse_shapes, default=None, metavar="NxHxWxC,...",
                   help="shapes of the layer section, channels last (default: 128x32x32x64,256x14x14x256,1024x512; "
                        "32x16x16x64,64x7x7x256,128x512 with --quick)")
    p.add_argument("--layer-repeats", type=int, default=None, metavar="N",
                   help="interleaved rounds of the layer section to take medians of (default: 20; 5 with --quick)")
    p.add_argument("--scaling", default=None, metavar="N1,N2,...",
                   help="model counts of the scaling table, multiples of 32 (default: 32,256,1024 on CPU, "
                        "32,256,1024,4096 on an accelerator; 'none' to skip)")
    p.add_argument("--scaling-one", type=int, help=argparse.SUPPRESS)  # internal: one scaling point, JSON out
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: runs/benchmark.json; runs/benchmark_layers.json with "
                        "--layers-only)")
    return p


def measure_peak_gflops(n: int | None = None, repeats: int = 5) -> dict:
    """Median float32 GFLOP/s of a large jitted square matmul on the default device."""
    import jax
    import jax.numpy as jnp

    n = n or (8192 if jax.default_backend() != "cpu" else 2048)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision="highest"))  # true float32, as the sweep
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return {"n": n, "gflops": 2 * n**3 / statistics.median(times) / 1e9}


def _config_record(config) -> dict:
    """Every field of a ``GridConfig`` for the results file, each arm by its field names."""
    record = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    record["arms"] = {name: arm._asdict() for name, arm in config.arms.items()}
    return record


def bench_sweep(config, x, t, repeats: int) -> dict:
    from bnjax import grid

    runs = [grid.run_grid(config, x, t) for _ in range(repeats)]
    return {
        "compile_s": runs[0].timing["compile_s"],  # the first is the cold compile
        "run_s": statistics.median(r.timing["run_s"] for r in runs),
        "final_batchnorm": runs[0].metrics["train_accuracy"]["batchnorm"][0, :, -1].tolist(),
        "final_plain": runs[0].metrics["train_accuracy"]["plain"][0, :, -1].tolist(),
    }


def _one_model_at_a_time(config, x, t, make) -> dict:
    """Compile per network structure, then train the models one by one, step by step, from Python.

    ``make(use_bn, xd, td, example_batch)`` returns compiled ``init(key, scale) -> state``,
    ``step(state, xb, tb) -> state`` and ``accuracy(state) -> scalar`` (on ``xd``, ``td``). Every model gets
    the sweep's init keys and batches.
    """
    import jax.numpy as jnp

    from bnjax import grid

    num_train = x.shape[0]
    init_keys, batch_idx = book_keys_and_batches(config, num_train)
    steps_at = set(grid.record_steps(config, num_train).tolist())
    xd, td = jnp.asarray(x), jnp.asarray(t)
    batches = [(xd[i], td[i]) for i in batch_idx]  # gathered up front: the loop times the steps alone

    t0 = time.perf_counter()
    compiled = {use_bn: make(use_bn, xd, td, batches[0]) for use_bn in (True, False)}
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    finals = {True: [], False: []}
    for v, use_bn in enumerate((True, False)):
        init_c, step_c, acc_c = compiled[use_bn]
        for i, scale in enumerate(config.axes["weight_scale"]):
            state = init_c(init_keys[v, i], jnp.float32(scale))
            last = None
            for u, (xb, tb) in enumerate(batches):
                state = step_c(state, xb, tb)
                if u + 1 in steps_at:
                    last = acc_c(state)
            finals[use_bn].append(float(last))
    run_s = time.perf_counter() - t0
    return {"compile_s": compile_s, "run_s": run_s, "final_batchnorm": finals[True], "final_plain": finals[False]}


def book_keys_and_batches(config, num_train: int):
    """Seed ``config.seed``'s init keys ``[arms, scales]`` and batch indices ``[updates, B]``, drawn as the
    engine draws them (``bnjax.grid.seed_keys``), so every variant trains the same models."""
    import jax
    import numpy as np

    from bnjax import grid

    data_key, init_keys, _ = grid.seed_keys(config.seed, 2, len(config.axes["weight_scale"]))
    shape = (grid.num_updates(config, num_train), config.batch_size)
    return init_keys, np.asarray(jax.random.randint(data_key, shape, 0, num_train))


def bench_python_loop(config, x, t) -> dict:
    """(b): bnjax's own train step, jitted once per network structure, called model by model, step by step."""
    import jax
    import jax.numpy as jnp

    from bnjax import model, train

    opt = train.make_optimizer(config.optimizer, config.learning_rate)

    def make(use_bn, xd, td, batch):
        net = model.MLPConfig(xd.shape[1], tuple(config.hidden_sizes), config.num_classes, norm=use_bn)

        def init(key, scale):
            params, state = model.init(net, key, weight_init=None, weight_scale=scale)
            return train.train_state_init(params, state, opt)

        def step(ts, xb, tb):
            return train.train_step(net, ts, xb, tb, opt)[1]

        def acc(ts):
            return model.accuracy(net, ts.params, ts.state, xd, td)

        key, scale = jax.random.key(0), jnp.float32(1.0)
        ts = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(ts, *batch).compile(),
                jax.jit(acc).lower(ts).compile())

    return _one_model_at_a_time(config, x, t, make)


def bench_numpy(config, num_train: int, threads: int | None) -> dict:
    """(c): the NumPy network in a subprocess, so the BLAS thread count can be pinned before NumPy loads."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "tests" / "numpy_book.py"),
           "--num-scales", str(len(config.axes["weight_scale"])),
           "--epochs", str(config.num_records), "--train-size", str(num_train)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"compile_s": 0.0, "run_s": out["run_s"], "final_batchnorm": out["final_batchnorm"],
            "final_plain": out["final_plain"]}


def bench_flax(config, x, t) -> dict | None:
    """(d): idiomatic Flax linen + optax, one model at a time.

    The scale is applied to the initialised kernels (not baked into the module), so each structure compiles
    once; Flax's BatchNorm starts its running variance at 1 (the book's at 0).
    """
    try:
        import flax.linen as nn
    except ImportError:
        return None
    import jax
    import jax.numpy as jnp
    import optax

    from bnjax.layers import CONVENTIONS

    class MLP(nn.Module):
        hidden: tuple
        use_bn: bool

        @nn.compact
        def __call__(self, h, train_flg: bool):
            for size in self.hidden:
                h = nn.Dense(size, kernel_init=nn.initializers.normal(1.0))(h)
                if self.use_bn:
                    h = nn.BatchNorm(use_running_average=not train_flg, momentum=CONVENTIONS["momentum"],
                                     epsilon=CONVENTIONS["eps"])(h)
                h = nn.relu(h)
            return nn.Dense(config.num_classes, kernel_init=nn.initializers.normal(1.0))(h)

    opt = optax.sgd(config.learning_rate)

    def make(use_bn, xd, td, batch):
        net = MLP(tuple(config.hidden_sizes), use_bn)

        def init(key, scale):
            variables = net.init(key, xd[:2], False)
            params = jax.tree_util.tree_map_with_path(
                lambda path, p: p * scale if "kernel" in jax.tree_util.keystr(path) else p, variables["params"])
            return params, variables.get("batch_stats", {}), opt.init(params)

        def step(state, xb, tb):
            params, stats, opt_state = state

            def loss_fn(p):
                if use_bn:
                    logits, upd = net.apply({"params": p, "batch_stats": stats}, xb, True, mutable=["batch_stats"])
                    return optax.softmax_cross_entropy_with_integer_labels(logits, tb).mean(), upd["batch_stats"]
                logits = net.apply({"params": p}, xb, True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, tb).mean(), stats

            (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, opt_state

        def acc(state):
            params, stats, _ = state
            variables = {"params": params, "batch_stats": stats} if use_bn else {"params": params}
            return jnp.mean(jnp.argmax(net.apply(variables, xd, False), -1) == td)

        key, scale = jax.random.key(0), jnp.float32(1.0)
        state = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(state, *batch).compile(),
                jax.jit(acc).lower(state).compile())

    result = _one_model_at_a_time(config, x, t, make)
    result["note"] = "Flax BatchNorm's running variance starts at 1 (the book's at 0)"
    return result


# --------------------------------------------------------------------------------------------------
# Layer speed: one norm layer's jitted forward + backward, bnjax against Flax linen
# --------------------------------------------------------------------------------------------------

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
ACCURACY_MEAN = 1e4  # x = 1e4 + N(0, 1): mean / std = 1e4
FLAX_MISSING = "Flax columns skipped: flax is not installed (pip install -e '.[bench]')"


def _parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """'128x32x32x64,1024x512' -> ((128, 32, 32, 64), (1024, 512))."""
    try:
        shapes = tuple(tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s.strip())
    except ValueError:
        shapes = ()
    if not shapes or any(len(s) < 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"expected shapes like '128x32x32x64,1024x512', got {text!r}")
    return shapes


def _import_flax_linen():
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
    rotating each round), so a slow spell of a shared machine hits all variants alike."""
    import jax

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
    the float32 accuracy check of ``layer_accuracy``. Flax variants are left out if flax is not installed."""
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


def scaling_point(num_models: int) -> dict:
    """One row of the scaling table, measured in this process: the book's sweep with ``num_models / 32`` seeds
    (``run_s`` excludes the compile, which the engine times apart)."""
    import resource

    import jax

    from bnjax import data, grid

    if num_models % 32:
        raise ValueError(f"scaling points must be multiples of 32 (16 scales x 2 arms), got {num_models}")
    ds = data.load_bundled(1000, 0)
    config = grid.GridConfig(num_seeds=num_models // 32)
    timed = grid.run_grid(config, ds.x_train, ds.t_train)
    updates = num_models * grid.num_updates(config, 1000)
    flops = grid.grid_flops(config, 1000, 784)["total"]
    row = {
        "models": num_models,
        "compile_s": timed.timing["compile_s"],
        "run_s": timed.timing["run_s"],
        "model_updates_per_s": updates / timed.timing["run_s"],
        "gflops_per_s": flops / timed.timing["run_s"] / 1e9,
        "chunks": timed.layout["num_chunks"],
        "models_per_chunk": timed.layout["models_per_chunk"],
        "devices_used": timed.layout["devices_used"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        row["peak_device_gb"] = stats["peak_bytes_in_use"] / 1e9
    return row


def run_scaling(counts: list[int]) -> list[dict]:
    """Each scaling point in a fresh process, so its peak memory is its own."""
    rows = []
    root = Path(__file__).resolve().parents[1]
    for n in counts:
        print(f"scaling: {n} models ...", flush=True)
        proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--scaling-one", str(n)], cwd=root,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
                  flush=True)
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if rows:
        base = rows[0]["run_s"] / rows[0]["models"]
        for row in rows:
            row["per_model_cost_vs_first"] = round(row["run_s"] / row["models"] / base, 3)
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from experiments.harness import set_xla_flags

    set_xla_flags()  # the same XLA defaults as the sweep CLI
    import jax

    # Every JAX variant multiplies in true float32, as bnjax's sweep does (no TF32 on GPUs).
    with jax.default_matmul_precision("highest"):
        if args.scaling_one:
            print(json.dumps(scaling_point(args.scaling_one)))
            return 0
        return _main(args)


def _main(args) -> int:
    skip = {s.strip().lower() for s in args.skip.split(",") if s.strip()}

    import jax

    from bnjax import data, grid
    from experiments import harness

    if args.out is None:
        args.out = Path("runs") / ("benchmark_layers.json" if args.layers_only else "benchmark.json")
    harness.check_writable(args.out.parent)
    layer_shapes = args.layer_shapes or (QUICK_LAYER_SHAPES if args.quick else LAYER_SHAPES)
    layer_repeats = args.layer_repeats or (5 if args.quick else 20)
    if args.layers_only:
        env = harness.environment()
        print(f"bnjax layer benchmark on {env['backend']} ({env['device_kind']}, {env['cpu_count']} CPUs), "
              f"jax {env['jax']}", flush=True)
        layer_res = bench_layers(layer_shapes, layer_repeats)
        print_layers(layer_res)
        harness.write_json(args.out, {"environment": env, "layers": layer_res, "quick": args.quick})
        print(f"wrote {args.out}")
        return 0
    ds = data.load_bundled(1000, 0)
    config = grid.GridConfig()
    if args.quick:
        config = config.replace(axes={"weight_scale": (0.1, 0.01)}, num_records=2)
        args.repeats = 1
    num_train, input_size = ds.x_train.shape
    flops = grid.grid_flops(config, num_train, input_size)
    env = harness.environment()
    print(f"bnjax benchmark on {env['backend']} ({env['device_kind']}, {env['device_count']} device(s), "
          f"{env['cpu_count']} CPUs), jax {env['jax']}; {2 * len(config.axes['weight_scale'])} models, "
          f"{grid.num_updates(config, num_train)} updates, {flops['total'] / 1e9:.0f} GFLOP of matmuls",
          flush=True)
    peak = measure_peak_gflops()
    print(f"float32 matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['n']}^3)", flush=True)

    plan = [
        ("a", "(a) bnjax sweep, one vmapped program", lambda: bench_sweep(config, ds.x_train, ds.t_train,
                                                                          args.repeats)),
        ("b", "(b) same jitted step, Python loop over models", lambda: bench_python_loop(config, ds.x_train,
                                                                                          ds.t_train)),
        ("c", "(c) NumPy float64 (book), all BLAS threads", lambda: bench_numpy(config, num_train, None)),
        ("c", "(c) NumPy float64 (book), 1 BLAS thread", lambda: bench_numpy(config, num_train, 1)),
        ("d", "(d) Flax linen + optax, one model at a time", lambda: bench_flax(config, ds.x_train, ds.t_train)),
    ]
    variants = []
    for letter, name, fn in plan:
        if letter in skip:
            continue
        print(f"running {name} ...", flush=True)
        res = fn()
        if res is None:
            print("  skipped (flax is not installed: pip install -e '.[bench]')", flush=True)
            continue
        res["name"] = name
        variants.append(res)
    base = next((v["run_s"] for v in variants if v["name"].startswith("(a)")), None)
    for v in variants:
        v["ratio_to_a"] = round(v["run_s"] / base, 2) if base else None
        v["gflops_per_s"] = flops["total"] / v["run_s"] / 1e9
        v["percent_of_peak"] = 100 * v["gflops_per_s"] / peak["gflops"]

    header = f"{'variant':<50} {'compile s':>9} {'run s':>8} {'run ratio to (a)':>16} {'GFLOP/s':>8} {'% peak':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for v in variants:
        print(f"{v['name']:<50} {v['compile_s']:>9.2f} {v['run_s']:>8.2f} {v['ratio_to_a']:>16.2f} "
              f"{v['gflops_per_s']:>8.1f} {v['percent_of_peak']:>6.0f}%")
    print(f"\nratio = run time / run time of (a); FLOPs = {flops['train'] / 1e9:.0f} G train + "
          f"{flops['eval'] / 1e9:.0f} G eval; peak = {peak['gflops']:.0f} GFLOP/s measured now.")

    layer_res = None
    if "l" not in skip:
        layer_res = bench_layers(layer_shapes, layer_repeats)
        print_layers(layer_res)

    if args.scaling is None:
        counts = [32] if args.quick else ([32, 256, 1024] if jax.default_backend() == "cpu"
                                               else [32, 256, 1024, 4096])
    elif args.scaling.strip().lower() == "none":
        counts = []
    else:
        counts = [int(c) for c in args.scaling.split(",") if c.strip()]
    scaling = run_scaling(counts) if counts else []
    if scaling:
        header = (f"{'models':>7} {'chunks':>6} {'run s':>8} {'model-updates/s':>16} {'GFLOP/s':>8} {'% peak':>7} "
                  f"{'cost/model vs 32':>16} {'peak RSS GB':>11}")
        print("\nscaling (the book's sweep with more seeds)\n" + header + "\n" + "-" * len(header))
        for row in scaling:
            row["percent_of_peak"] = 100 * row["gflops_per_s"] / peak["gflops"]
            print(f"{row['models']:>7} {row['chunks']:>6} {row['run_s']:>8.2f} {row['model_updates_per_s']:>16.0f} "
                  f"{row['gflops_per_s']:>8.1f} {row['percent_of_peak']:>6.0f}% "
                  f"{row['per_model_cost_vs_first']:>16.2f} {row['peak_rss_gb']:>11.2f}"
                  + (f"  (device peak {row['peak_device_gb']:.2f} GB)" if "peak_device_gb" in row else ""))
    harness.write_json(args.out, {"environment": env, "config": _config_record(config), "flops": flops, "peak": peak,
                                  "variants": variants, "scaling": scaling, "layers": layer_res,
                                  "quick": args.quick})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
