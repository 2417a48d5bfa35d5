"""The benchmark's training variants (run through ``python -m experiments.benchmark``; docs/benchmark.md).

(a) bnjax's sweep, one jitted vmapped program; (b) the same jitted train step called model by model from Python;
(c) the book's network in NumPy, in a subprocess (``python -m experiments.numpy_book``); (d) Flax linen + optax,
one model at a time. Every variant trains seed ``config.seed``'s models on the same batches (``(c)`` draws its
own) and returns a row: ``compile_s``, ``run_s``, ``final_batchnorm``, ``final_plain``. A variant that cannot run
here raises ``VariantSkipped`` with a one-line reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["VariantSkipped", "measure_peak_gflops", "book_keys_and_batches", "bench_sweep", "bench_python_loop",
           "bench_numpy", "flax_functions", "flax_factory", "bench_flax"]

FLAX_MISSING = "flax is not installed: pip install -e '.[bench]'"


class VariantSkipped(Exception):
    """A variant that cannot run here (flax missing, the NumPy subprocess failed); the message says why."""


def measure_peak_gflops(n: int | None = None, repeats: int = 5) -> dict:
    """Median float32 GFLOP/s of a large jitted square matmul on the default device.

    Args:
      n: the matrices' size (default 8192 on an accelerator, 2048 on CPU).
      repeats: timed calls after a warm-up.

    Returns:
      ``{"n": n, "gflops": ...}``.
    """
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


def bench_sweep(config, x, t, repeats: int) -> dict:
    """(a): the sweep as one compiled program, ``bnjax.grid.run_grid``.

    Args:
      config: the ``GridConfig`` (one seed, arms ``batchnorm`` and ``plain``).
      x, t: ``[N, 784]`` training images and ``[N]`` labels.
      repeats: runs to take the median run time of, at least 1 (the first one's compile time is reported).

    Returns:
      A variant's row: ``compile_s``, ``run_s``, ``final_batchnorm`` and ``final_plain`` (final training accuracy
      per scale).

    Raises:
      ValueError: ``repeats`` < 1.
    """
    from bnjax import grid

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
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
    engine draws them (``bnjax.grid.seed_keys``), so every variant trains the same models.

    Args:
      config: the ``GridConfig``.
      num_train: the number of training images.

    Returns:
      ``(init_keys [2, scales], batch_indices [updates, batch_size])``.
    """
    import jax
    import numpy as np

    from bnjax import grid

    data_key, init_keys, _ = grid.seed_keys(config.seed, 2, len(config.axes["weight_scale"]))
    shape = (grid.num_updates(config, num_train), config.batch_size)
    return init_keys, np.asarray(jax.random.randint(data_key, shape, 0, num_train))


def bench_python_loop(config, x, t) -> dict:
    """(b): bnjax's own train step, jitted once per network structure, called model by model, step by step.

    Args:
      config: the ``GridConfig``.
      x, t: ``[N, 784]`` training images and ``[N]`` labels.

    Returns:
      A variant's row, as ``bench_sweep``'s.
    """
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
    """(c): the NumPy network (experiments/numpy_book.py) in a subprocess, so the BLAS thread count can be
    pinned before NumPy loads.

    Args:
      config: the ``GridConfig`` (its scale count and records; the oracle draws its own weights and batches).
      num_train: the number of training images.
      threads: BLAS threads, or ``None`` for the library's default (all).

    Returns:
      A variant's row, as ``bench_sweep``'s (``compile_s`` 0).

    Raises:
      VariantSkipped: the subprocess failed or printed no result (its last error line is the message).
    """
    env = dict(os.environ)
    if threads is not None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "experiments.numpy_book",
           "--num-scales", str(len(config.axes["weight_scale"])),
           "--epochs", str(config.num_records), "--train-size", str(num_train)]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    try:
        if proc.returncode != 0:
            raise ValueError
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        row = {"compile_s": 0.0, "run_s": float(out["run_s"]), "final_batchnorm": list(out["final_batchnorm"]),
               "final_plain": list(out["final_plain"])}
    except (ValueError, IndexError, KeyError, TypeError):
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
        raise VariantSkipped(f"python -m experiments.numpy_book failed: {last[:200]}") from None
    return row


def flax_functions(config, use_bn: bool, xd, td):
    """(d)'s functions, uncompiled: idiomatic Flax linen + optax for the network of ``config``.

    The scale multiplies the initialised kernels (it is not baked into the module), so each structure compiles
    once; Flax's BatchNorm (momentum and eps of ``bnjax.layers.CONVENTIONS``) starts its running variance at 1
    (the book's at 0).

    Args:
      config: the ``GridConfig`` (``hidden_sizes``, ``num_classes``, ``learning_rate``; SGD).
      use_bn: a BatchNorm after every hidden Dense layer.
      xd, td: the images and labels ``accuracy`` scores.

    Returns:
      ``(init, step, accuracy)``: ``init(key, scale) -> state`` with ``state = (params, batch_stats,
      opt_state)``, ``step(state, xb, tb) -> state`` (one SGD step in training mode) and ``accuracy(state)`` on
      ``xd``, ``td`` in evaluation mode (running statistics).

    Raises:
      VariantSkipped: flax is not installed.
    """
    try:
        import flax.linen as nn
    except ImportError:
        raise VariantSkipped(FLAX_MISSING) from None
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

    return init, step, acc


def flax_factory(config):
    """(d)'s compiler for ``_one_model_at_a_time``: ``flax_functions``, each lowered and compiled.

    Args:
      config: the ``GridConfig``.

    Returns:
      ``make(use_bn, xd, td, example_batch) -> (init, step, accuracy)``, each compiled (see ``flax_functions``).

    Raises:
      VariantSkipped: flax is not installed.
    """
    import jax
    import jax.numpy as jnp

    if importlib.util.find_spec("flax") is None:  # say so before any work
        raise VariantSkipped(FLAX_MISSING)

    def make(use_bn, xd, td, batch):
        init, step, acc = flax_functions(config, use_bn, xd, td)
        key, scale = jax.random.key(0), jnp.float32(1.0)
        state = init(key, scale)
        return (jax.jit(init).lower(key, scale).compile(), jax.jit(step).lower(state, *batch).compile(),
                jax.jit(acc).lower(state).compile())

    return make


def bench_flax(config, x, t) -> dict:
    """(d): idiomatic Flax linen + optax, one model at a time (``flax_factory``).

    Args:
      config: the ``GridConfig``.
      x, t: ``[N, 784]`` training images and ``[N]`` labels.

    Returns:
      A variant's row, as ``bench_sweep``'s, with a ``note``.

    Raises:
      VariantSkipped: flax is not installed.
    """
    result = _one_model_at_a_time(config, x, t, flax_factory(config))
    result["note"] = "Flax BatchNorm's running variance starts at 1 (the book's at 0)"
    return result
