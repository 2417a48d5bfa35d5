"""The compiled programs of one chunk: ``setup`` (keys, batches, initial models) and ``record`` (updates, then
scores), with the keys they draw from."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax import networks, options, train
from bnjax.grid.config import GridConfig, arm_batch_size, num_updates, updates_per_record

Array = jax.Array

__all__ = ["ChunkCarry", "ChunkInputs", "seed_keys", "init_streams", "hyper_dtypes", "make_programs"]


class ChunkCarry(NamedTuple):
    """What a chunk carries between records: per arm a stacked ``TrainState`` and a divergence flag, leaves
    ``[seed_block, grid_block, ...]``."""

    models: dict
    diverged: dict


class ChunkInputs(NamedTuple):
    """Per-chunk arrays.

    Attributes:
      seeds: int32 ``[sb]``.
      scale_index: int32 ``[gb]``: each grid point's weight-scale index (its initial-weight key).
      hyper: one ``[gb]`` array per name of ``bnjax.options.AXES`` (in ``hyper_dtypes``), the fixed value where
        the grid has no such axis; each is read by its one consumer (``options.Axis.consumer``).
    """

    seeds: Array
    scale_index: Array
    hyper: dict


def seed_keys(seed: Any, num_streams: int, num_scales: int) -> tuple[Array, Array, Array]:
    """One seed's keys, as the engine draws them.

    JAX's default (partitionable) threefry makes ``split(key, (n, S))[i, j]`` independent of ``n``, so an arm's
    weights depend on its stream, not on how many arms run beside it.

    Args:
      seed: an int32 seed (a Python int or a traced scalar).
      num_streams: streams of initial weights (see ``init_streams``).
      num_scales: values of the ``weight_scale`` axis (1 without one).

    Returns:
      ``(data_key, init_keys [num_streams, num_scales], dropout_key)``: batches are
      ``randint(data_key, [updates, B], 0, N)`` (or from ``fold_in(fold_in(data_key, 2), B)`` for an arm's own
      batch size ``B``), arm ``a``'s model at scale ``j`` starts from ``init_keys[stream(a), j]``, and update
      ``u``'s dropout key is ``fold_in(dropout_key, u)``.
    """
    data_key, init_key = jax.random.split(jax.random.key(seed))
    return data_key, jax.random.split(init_key, (num_streams, num_scales)), jax.random.fold_in(data_key, 1)


def init_streams(config: GridConfig) -> dict[str, int]:
    """Each arm's stream of initial weights.

    Args:
      config: the grid.

    Returns:
      arm name -> ``arm.init_stream``, or its position among the arms.
    """
    return {name: (i if arm.init_stream is None else arm.init_stream)
            for i, (name, arm) in enumerate(config.arms.items())}


def hyper_dtypes(config: GridConfig) -> dict[str, np.dtype]:
    """The dtype each hyper-parameter reaches the programs in.

    Args:
      config: the grid.

    Returns:
      name (every name of ``bnjax.options.AXES``) -> dtype: what ``model.init`` reads (the weight scale) in the
      model's dtype, the rest in at least float32 (float64 models get float64 hyper-parameters).
    """
    dtype = np.dtype(jnp.dtype(config.dtype))
    hp_dtype = np.dtype(jnp.promote_types(dtype, jnp.float32))
    return {name: dtype if axis.consumer == "init" else hp_dtype for name, axis in options.AXES.items()}


def make_programs(config: GridConfig, num_train: int, input_size: int, eval_sizes: dict[str, int]):
    """The two programs of a chunk, not yet jitted.

    Args:
      config: the grid (validated).
      num_train: training images.
      input_size: features per image.
      eval_sizes: evaluation set name -> its number of images (the means divide by it).

    Returns:
      ``setup(inputs) -> (carry, batch_idx {B: [sb, U, B]}, dropout_keys [sb])`` and
      ``record(carry, r, x, labels, batch_idx, dropout_keys, inputs, eval_sets) -> (carry, metrics)``.
    """
    dtype = jnp.dtype(config.dtype)
    loss_dtype = jnp.promote_types(dtype, jnp.float32)
    arms = list(config.arms.items())
    nets = {name: config.network(arm, input_size) for name, arm in arms}
    num_scales = len(config.axes.get("weight_scale", (None,)))
    # Arms grouped by mini-batch size: each group shares its batches and runs its own number of updates.
    groups: dict[int, list[str]] = {}
    for name, arm in arms:
        groups.setdefault(arm_batch_size(config, arm), []).append(name)
    per_record = {b: updates_per_record(config, num_train, b) for b in groups}
    total_updates = {b: num_updates(config, num_train, b) for b in groups}
    # Hyper-parameters without an axis stay Python constants: the book's program is unchanged by the engine.
    # What a network's init reads is traced anyway: the initial weights are made per grid point.
    traced = {name: name in config.axes or axis.consumer == "init" for name, axis in options.AXES.items()}

    def consumed_by(consumer, hyper):
        """The keyword arguments of one consumer (an optional hyper-parameter left at None is not passed)."""
        kwargs = {}
        for name, axis in options.AXES.items():
            if axis.consumer == consumer:
                v = hyper[name] if traced[name] else getattr(config, name)
                if v is not None:
                    kwargs[axis.keyword] = v
        return kwargs

    def optimizer(hyper, arm):
        kwargs = consumed_by("optimizer", hyper)
        if arm.learning_rate_scale != 1:  # e.g. the linear scaling rule for an arm's own batch size
            kwargs["learning_rate"] = kwargs["learning_rate"] * arm.learning_rate_scale
        return train.make_optimizer(config.optimizer, **kwargs)

    def init_one(net, arm, key, hyper):
        params, state = networks.module_for(net).init(net, key, weight_init=arm.weight_init, dtype=dtype,
                                                      **consumed_by("init", hyper))
        return train.train_state_init(params, state, optimizer(hyper, arm))

    streams = init_streams(config)

    def setup(inputs: ChunkInputs):
        num_streams = max(streams.values()) + 1
        data_keys, init_keys, dropout_keys = jax.vmap(lambda s: seed_keys(s, num_streams, num_scales))(inputs.seeds)

        def draw(b):
            # The grid's batch size keeps the data key the book's sweep always used; other sizes fold theirs in.
            def one(key):
                if b != config.batch_size:
                    key = jax.random.fold_in(jax.random.fold_in(key, 2), b)
                return jax.random.randint(key, (total_updates[b], b), 0, num_train)
            return jax.vmap(one)(data_keys)

        batch_idx = {b: draw(b) for b in groups}
        models, diverged = {}, {}
        for name, arm in arms:
            keys = init_keys[:, streams[name]][:, inputs.scale_index]  # [sb, gb]
            per_grid = jax.vmap(functools.partial(init_one, nets[name], arm), in_axes=(0, 0))
            models[name] = jax.vmap(per_grid, in_axes=(0, None))(keys, inputs.hyper)
            diverged[name] = jnp.zeros((inputs.seeds.shape[0], inputs.scale_index.shape[0]), bool)
        return ChunkCarry(models, diverged), batch_idx, dropout_keys

    def step_one(net, arm, ts, xb, lb, key, hyper):
        norm_kwargs = consumed_by("norm", hyper) if net.norm is not None else {}
        return train.train_step(net, ts, xb, lb, optimizer(hyper, arm), key=key, norm_kwargs=norm_kwargs or None,
                                **consumed_by("train_step", hyper))[1]

    def evaluate(net, ts, eval_set, count):
        """Accuracy and mean loss ``[sb, gb]`` on one padded evaluation set, batch by batch."""
        xs, labels, mask = eval_set

        def one(model_ts, xb, lb, mb):
            logits, _ = networks.module_for(net).apply(net, model_ts.params, model_ts.state, xb, train=False)
            correct = jnp.sum(jnp.where(mb, jnp.argmax(logits, -1) == lb, False), dtype=jnp.int32)
            # The loss in at least float32, even for bf16 models (as the batch-norm statistics).
            logp = jax.nn.log_softmax(logits.astype(loss_dtype), axis=-1)
            nll = -jnp.take_along_axis(logp, lb[:, None], axis=-1)[:, 0]
            return correct, jnp.sum(jnp.where(mb, nll, 0.0))

        all_models = jax.vmap(jax.vmap(one, in_axes=(0, None, None, None)), in_axes=(0, None, None, None))

        def body(acc, batch):
            c, l = all_models(ts, *batch)
            return (acc[0] + c, acc[1] + l), None

        shape = ts.params.affine[0].b.shape[:2]
        zero = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, loss_dtype))
        (correct, nll), _ = lax.scan(body, zero, (xs, labels, mask))
        # Times a constant reciprocal, as jnp.mean compiles: the same numbers as scoring in one batch.
        return correct.astype(jnp.float32) * np.float32(1.0 / count), nll * np.asarray(1.0 / count, loss_dtype)

    def record(carry, record_index, x, labels, batch_idx, dropout_keys, inputs: ChunkInputs, eval_sets):
        models = dict(carry.models)
        for b, members in groups.items():
            k = per_record[b]
            # The first record comes after a single update, every later one after k more (the book's loop).
            n = jnp.where(record_index == 0, 1, k)
            start = jnp.where(record_index == 0, 0, 1 + (record_index - 1) * k)

            def body(j, group_models, start=start, b=b, members=members):
                u = start + j
                idx = lax.dynamic_index_in_dim(batch_idx[b], u, axis=1, keepdims=False)  # [sb, B]
                xb, lb = x[idx], labels[idx]
                keys = jax.vmap(lambda key: jax.random.fold_in(key, u))(dropout_keys)
                new = {}
                for name in members:
                    # Inner vmap over the grid shares the batch (in_axes None): one wide first-layer matmul.
                    grid = jax.vmap(functools.partial(step_one, nets[name], config.arms[name]),
                                    in_axes=(0, None, None, None, 0))
                    seeds = jax.vmap(grid, in_axes=(0, 0, 0, 0, None))
                    new[name] = seeds(group_models[name], xb, lb, keys, inputs.hyper)
                return new

            models.update(lax.fori_loop(0, n, body, {name: models[name] for name in members}))
        diverged = {name: carry.diverged[name] | _nonfinite(models[name].params) for name, _ in arms}
        metrics = {}
        for split, eval_set in eval_sets.items():
            scores = {name: evaluate(nets[name], models[name], eval_set, eval_sizes[split]) for name, _ in arms}
            metrics[f"{split}_accuracy"] = {name: s[0] for name, s in scores.items()}
            metrics[f"{split}_loss"] = {name: s[1] for name, s in scores.items()}
        return ChunkCarry(models, diverged), metrics

    return setup, record


def _nonfinite(params) -> Array:
    """``[sb, gb]``: True where any parameter of the model is NaN or infinite."""
    flags = [jnp.any(~jnp.isfinite(leaf), axis=tuple(range(2, leaf.ndim)))
             for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.any(jnp.stack(flags), axis=0)
