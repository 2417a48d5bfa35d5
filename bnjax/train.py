"""Training: an optax train step, and the book's weight-scale sweep as one compiled, vmapped program.

The sweep trains ``num_seeds x num_scales`` batch-norm networks and as many plain ones together: ``vmap`` over
scales (and seeds), ``lax.fori_loop`` over the updates between two records, one jitted call per record so
progress can be shown. Within a seed every model sees the same mini-batches: the book already shares them
between its BN and plain nets, and we share them across weight scales too (a controlled experiment: the scale
is the only difference between panels). It also lets XLA turn the first layer of all models into one wide
matmul.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bnjax import model

Array = jax.Array

__all__ = [
    "OPTIMIZERS",
    "make_optimizer",
    "TrainState",
    "train_state_init",
    "train_step",
    "SweepConfig",
    "SweepResult",
    "book_weight_scales",
    "num_updates",
    "record_steps",
    "sweep_keys",
    "sweep_batch_indices",
    "sweep_init",
    "make_sweep_step",
    "run_sweep",
    "sweep_flops",
]

# The optimizers a user would expect by name, with optax's defaults (the book's Momentum and Nesterov use
# momentum 0.9; its RMSprop decays by 0.99 where optax's default is 0.9).
OPTIMIZERS: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adagrad": lambda lr: optax.adagrad(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
    "lion": lambda lr: optax.lion(lr),
}


def make_optimizer(name: str, learning_rate: float | Array) -> optax.GradientTransformation:
    """An optax optimizer by name (see ``OPTIMIZERS``); ``learning_rate`` may be a traced array."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return factory(learning_rate)


class TrainState(NamedTuple):
    """Everything one model carries between steps."""

    params: model.MLPParams
    state: model.MLPState
    opt_state: Any


def train_state_init(params: model.MLPParams, state: model.MLPState, optimizer: optax.GradientTransformation):
    return TrainState(params, state, optimizer.init(params))


def train_step(
    ts: TrainState,
    x: Array,
    t: Array,
    optimizer: optax.GradientTransformation,
    key: Array | None = None,
    weight_decay_lambda: float | Array = 0.0,
) -> tuple[TrainState, Array]:
    """One optax update of one model on the batch ``x [B, D]``, ``t [B]``; returns ``(new_ts, loss)``.

    Pure: jit it with ``optimizer`` closed over (``functools.partial``) or vmap it over stacked states.
    """
    (value, new_state), grads = jax.value_and_grad(model.loss, has_aux=True)(
        ts.params, ts.state, x, t, True, key, weight_decay_lambda
    )
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    return TrainState(optax.apply_updates(ts.params, updates), new_state, opt_state), value


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def book_weight_scales(num_scales: int = 16) -> tuple[float, ...]:
    """``np.logspace(0, -4, num_scales)``: 1.0 down to 1e-4, the book's 16 scales by default."""
    return tuple(float(w) for w in np.logspace(0, -4, num=num_scales))


class SweepConfig(NamedTuple):
    """Static description of a sweep; defaults are the book's protocol (``shared/book_protocol.md``)."""

    weight_scales: tuple[float, ...] = book_weight_scales(16)
    num_records: int = 20  # the book's "epochs": records of training accuracy
    batch_size: int = 100
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    seed: int = 0
    num_seeds: int = 1
    hidden_sizes: tuple[int, ...] = (100, 100, 100, 100, 100)
    num_classes: int = 10
    dtype: str = "float32"
    bn_eps: float = 1e-6
    bn_momentum: float = 0.9
    # True float32 matmuls: on GPUs XLA's default may use TF32, which rounds inputs to 10 mantissa bits.
    matmul_precision: str = "highest"


def _iters_per_record(num_train: int, batch_size: int) -> int:
    # The book: iter_per_epoch = max(train_size / batch_size, 1).
    return max(num_train // batch_size, 1)


def num_updates(config: SweepConfig, num_train: int) -> int:
    """Updates per model: one before the first record, then ``iters_per_record`` before each further one
    (191 for the book's 20 records of 10 iterations)."""
    return 1 + (config.num_records - 1) * _iters_per_record(num_train, config.batch_size)


def record_steps(config: SweepConfig, num_train: int) -> np.ndarray:
    """Number of updates done when each record is taken (1, 11, 21, ..., 191 for the book)."""
    k = _iters_per_record(num_train, config.batch_size)
    return 1 + k * np.arange(config.num_records)


def sweep_keys(config: SweepConfig) -> tuple[Array, Array]:
    """Per seed: a data key and ``[2, S]`` init keys (row 0 batch norm, row 1 plain).

    Returns ``(data_keys [seeds], init_keys [seeds, 2, S])``. Seed ``i`` of a run with ``seed=s`` equals
    seed 0 of a run with ``seed=s+i``, so one extra seed never changes the others.
    """
    num_scales = len(config.weight_scales)

    def per_seed(seed):
        data_key, init_key = jax.random.split(jax.random.key(seed))
        return data_key, jax.random.split(init_key, (2, num_scales))

    seeds = config.seed + jnp.arange(config.num_seeds)
    return jax.vmap(per_seed)(seeds)


def sweep_batch_indices(config: SweepConfig, num_train: int) -> Array:
    """Mini-batch indices ``[seeds, updates, batch]``, drawn with replacement as the book does."""
    data_keys, _ = sweep_keys(config)
    shape = (num_updates(config, num_train), config.batch_size)
    return jax.vmap(lambda k: jax.random.randint(k, shape, 0, num_train))(data_keys)


class SweepCarry(NamedTuple):
    batchnorm: TrainState  # leaves stacked [seeds, S, ...]
    plain: TrainState
    diverged: Array  # [2, seeds, S] bool: (batchnorm, plain)


def _optimizer(config: SweepConfig) -> optax.GradientTransformation:
    return make_optimizer(config.optimizer, config.learning_rate)


@functools.partial(jax.jit, static_argnums=(0, 1))  # one compiled program instead of hundreds of eager ops
def sweep_init(config: SweepConfig, input_size: int) -> SweepCarry:
    """Initial parameters, running statistics and optimizer states of every model, stacked ``[seeds, S]``."""
    _, init_keys = sweep_keys(config)
    dtype = jnp.dtype(config.dtype)
    scales = jnp.asarray(config.weight_scales, dtype)
    opt = _optimizer(config)

    def one(key, scale, use_bn):
        params, state = model.init(
            key, input_size, config.hidden_sizes, config.num_classes, scale,
            use_batchnorm=use_bn, bn_eps=config.bn_eps, bn_momentum=config.bn_momentum, dtype=dtype,
        )
        return train_state_init(params, state, opt)

    def stack(use_bn, keys):  # keys [seeds, S]
        return jax.vmap(jax.vmap(lambda k, s: one(k, s, use_bn)), in_axes=(0, None))(keys, scales)

    bn = stack(True, init_keys[:, 0])
    plain = stack(False, init_keys[:, 1])
    diverged = jnp.zeros((2, config.num_seeds, len(config.weight_scales)), bool)
    return SweepCarry(bn, plain, diverged)


def _nonfinite(params) -> Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves])))


def make_sweep_step(config: SweepConfig, num_train: int, *, with_heldout: bool = False):
    """The compiled unit of the sweep: the updates leading to one record, then the record.

    Returns ``record_fn(carry, record_index, x, t, batch_idx, x_eval, t_eval) -> (carry, acc)`` (not yet
    jitted) where ``x [N, D]``, ``t [N]`` is the training set, ``batch_idx [seeds, updates, B]`` from
    ``sweep_batch_indices``, and ``acc`` is ``{'batchnorm': [seeds, S], 'plain': [seeds, S]}`` training
    accuracy (plus ``'*_heldout'`` on ``x_eval``, ``t_eval`` when ``with_heldout``).
    """
    opt = _optimizer(config)
    k = _iters_per_record(num_train, config.batch_size)

    def step_one(ts, x, t):
        return train_step(ts, x, t, opt)[0]

    # Inner vmap over scales shares the batch (in_axes None): XLA sees one wide first-layer matmul.
    step_scales = jax.vmap(step_one, in_axes=(0, None, None))
    step_all = jax.vmap(step_scales, in_axes=(0, 0, 0))  # over seeds: each seed has its own batches

    def acc_one(ts, x, t):
        return model.accuracy(ts.params, ts.state, x, t)

    acc_all = jax.vmap(jax.vmap(acc_one, in_axes=(0, None, None)), in_axes=(0, None, None))

    def record_fn(carry, record_index, x, t, batch_idx, x_eval=None, t_eval=None):
        # The first record comes after a single update, every later one after k more (the book's loop).
        n = jnp.where(record_index == 0, 1, k)
        start = jnp.where(record_index == 0, 0, 1 + (record_index - 1) * k)

        def body(j, c):
            idx = lax.dynamic_index_in_dim(batch_idx, start + j, axis=1, keepdims=False)  # [seeds, B]
            xb, tb = x[idx], t[idx]
            return SweepCarry(step_all(c.batchnorm, xb, tb), step_all(c.plain, xb, tb), c.diverged)

        carry = lax.fori_loop(0, n, body, carry)
        bad = jnp.stack([
            jax.vmap(jax.vmap(_nonfinite))(carry.batchnorm.params),
            jax.vmap(jax.vmap(_nonfinite))(carry.plain.params),
        ])
        carry = carry._replace(diverged=carry.diverged | bad)
        acc = {"batchnorm": acc_all(carry.batchnorm, x, t), "plain": acc_all(carry.plain, x, t)}
        if with_heldout:
            acc["batchnorm_heldout"] = acc_all(carry.batchnorm, x_eval, t_eval)
            acc["plain_heldout"] = acc_all(carry.plain, x_eval, t_eval)
        return carry, acc

    return record_fn


class SweepResult(NamedTuple):
    """Outputs of ``run_sweep`` as NumPy arrays.

    Attributes:
      train_accuracy: ``{'batchnorm': [seeds, S, R], 'plain': [seeds, S, R]}``.
      heldout_accuracy: the same on the held-out set, or ``None``.
      diverged: ``{'batchnorm': [seeds, S], 'plain': [seeds, S]}``: a parameter became non-finite.
      record_steps: ``[R]`` updates done at each record.
      timing: ``{'compile_s', 'run_s'}``.
      final: the final ``SweepCarry`` (parameters, running statistics, optimizer states).
    """

    train_accuracy: dict
    heldout_accuracy: dict | None
    diverged: dict
    record_steps: np.ndarray
    timing: dict
    final: Any


def run_sweep(
    config: SweepConfig,
    x_train: Any,
    t_train: Any,
    x_heldout: Any = None,
    t_heldout: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
) -> SweepResult:
    """Train every model of ``config`` on ``x_train [N, D]``, ``t_train [N]``; one jitted call per record.

    Args:
      config: the sweep.
      x_train, t_train: training images (float, flattened) and integer labels.
      x_heldout, t_heldout: optional held-out set, also scored at each record.
      progress: called as ``progress(records_done, num_records)`` once compiled (0 done) and after each record.
      devices: devices to spread the weight scales over (default: all of the default backend). The models are
        independent, so each device trains its share of scales with no communication; the data is replicated.
    """
    _validate(config, x_train, t_train)
    dtype = jnp.dtype(config.dtype)
    num_train, input_size = x_train.shape
    x = jnp.asarray(x_train, dtype)
    t = jnp.asarray(t_train, jnp.int32)
    with_heldout = x_heldout is not None
    xe = jnp.asarray(x_heldout, dtype) if with_heldout else None
    te = jnp.asarray(t_heldout, jnp.int32) if with_heldout else None

    carry = sweep_init(config, input_size)
    batch_idx = sweep_batch_indices(config, num_train)
    carry, (x, t, batch_idx, xe, te) = _place(carry, (x, t, batch_idx, xe, te), len(config.weight_scales), devices)
    record_fn = make_sweep_step(config, num_train, with_heldout=with_heldout)
    t0 = time.perf_counter()
    # donate the carry: the models' state is updated in place between records.
    with jax.default_matmul_precision(config.matmul_precision):
        compiled = (
            jax.jit(record_fn, donate_argnums=0)
            .lower(carry, jnp.int32(0), x, t, batch_idx, xe, te)
            .compile()
        )
    compile_s = time.perf_counter() - t0

    if progress is not None:
        progress(0, config.num_records)
    t0 = time.perf_counter()
    accs = []
    for r in range(config.num_records):
        carry, acc = compiled(carry, jnp.int32(r), x, t, batch_idx, xe, te)
        accs.append(acc)
        if progress is not None:
            jax.block_until_ready(acc)
            progress(r + 1, config.num_records)
    accs = jax.device_get(accs)
    jax.block_until_ready(carry)
    run_s = time.perf_counter() - t0

    def stack(name):  # R x [seeds, S] -> [seeds, S, R]
        return np.stack([np.asarray(a[name]) for a in accs], axis=-1)

    train_acc = {"batchnorm": stack("batchnorm"), "plain": stack("plain")}
    held = {"batchnorm": stack("batchnorm_heldout"), "plain": stack("plain_heldout")} if with_heldout else None
    diverged = np.asarray(carry.diverged)
    return SweepResult(
        train_accuracy=train_acc,
        heldout_accuracy=held,
        diverged={"batchnorm": diverged[0], "plain": diverged[1]},
        record_steps=record_steps(config, num_train),
        timing={"compile_s": compile_s, "run_s": run_s},
        final=carry,
    )


def _place(carry: SweepCarry, replicated: tuple, num_scales: int, devices: Sequence[Any] | None):
    """Shard the scale axis of every model leaf over as many devices as divide ``num_scales``."""
    devices = list(jax.devices() if devices is None else devices)
    num_shards = max(d for d in range(1, len(devices) + 1) if num_scales % d == 0)
    if num_shards == 1:
        put = functools.partial(jax.device_put, device=devices[0])
        return jax.tree_util.tree_map(put, carry), jax.tree_util.tree_map(put, replicated)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices[:num_shards]), ("scales",))
    by_scale = NamedSharding(mesh, PartitionSpec(None, "scales"))  # leaves are [seeds, scales, ...]
    models = jax.tree_util.tree_map(lambda a: jax.device_put(a, by_scale), (carry.batchnorm, carry.plain))
    diverged = jax.device_put(carry.diverged, NamedSharding(mesh, PartitionSpec(None, None, "scales")))
    everywhere = NamedSharding(mesh, PartitionSpec())
    return SweepCarry(*models, diverged), jax.tree_util.tree_map(lambda a: jax.device_put(a, everywhere), replicated)


def _validate(config: SweepConfig, x_train: Any, t_train: Any) -> None:
    if np.ndim(x_train) != 2:
        raise ValueError(f"x_train must be [N, D], got shape {np.shape(x_train)}")
    if np.shape(t_train) != np.shape(x_train)[:1]:
        raise ValueError(f"t_train must be [N]={np.shape(x_train)[:1]}, got {np.shape(t_train)}")
    if not config.weight_scales or any(not np.isfinite(w) or w <= 0 for w in config.weight_scales):
        raise ValueError(f"weight_scales must be positive numbers, got {config.weight_scales}")
    for name in ("num_records", "batch_size", "num_seeds"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.dtype not in ("float32", "bfloat16", "float16", "float64"):
        raise ValueError(f"dtype must be float32, bfloat16, float16 or float64, got {config.dtype!r}")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1)")
    make_optimizer(config.optimizer, config.learning_rate)


def sweep_flops(config: SweepConfig, num_train: int, input_size: int, num_eval: int = 0) -> dict:
    """Matmul FLOPs of a sweep: training (forward + backward) and evaluation, over all models."""
    sizes = [input_size, *config.hidden_sizes, config.num_classes]
    models = 2 * len(config.weight_scales) * config.num_seeds
    train = models * num_updates(config, num_train) * model.num_flops(sizes, config.batch_size, backward=True)
    evaluation = models * config.num_records * model.num_flops(sizes, num_train + num_eval)
    return {"train": train, "eval": evaluation, "total": train + evaluation}
