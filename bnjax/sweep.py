"""The grid engine: named arms x a grid of numeric hyper-parameters x seeds, trained together.

A sweep (``GridConfig``) is

* **arms**: a ``dict[str, Arm]`` of static variants of the network (the norm: none, batch norm or any norm value
  of ``bnjax.layers``; activation, dropout, initialisation, batch size, a learning-rate factor); each arm is its
  own traced program, all arms run in the same compiled call;
* **axes**: a ``dict[str, values]`` of numeric hyper-parameters that are *vmapped* (``weight_scale``,
  ``learning_rate``, ``weight_decay``); the grid is their product;
* **seeds**: ``num_seeds`` seeds from ``seed`` on; seed ``i`` of a run equals a one-seed run at ``seed + i``.

Every model of a seed sees the same mini-batches (paired comparisons, and one wide first-layer matmul for all
models of a seed); an arm with a batch size of its own (``Arm.batch_size``) draws its own batches, shared with
the arms of that size, and runs its own number of updates per record, so all arms train the same epochs. Models that differ only in learning rate or weight decay also share their initial weights;
each arm and each weight scale draws its own (with the book's two arms and its 16 scales this reproduces the
keys the book's sweep always used).

Layout: the models of an arm are stacked ``[seeds, grid points]`` and sharded over every device (of every
process) on a 2-D mesh ``('seeds', 'grid')``, each axis padded up to a multiple of its mesh size; padded models
repeat a real one and are never returned. A grid larger than ``max_models_per_chunk`` (default: what fits in
``memory_budget_bytes``) runs as consecutive chunks of the same shape, one compiled program for all of them.
Inside a chunk, one jitted call per record runs the updates (``lax.fori_loop``) and then scores every model
in evaluation mode, in batches of ``eval_batch_size`` images (``lax.scan``), so memory does not grow with the
evaluation set.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bnjax import layers, model, options, train

Array = jax.Array

__all__ = [
    "Arm",
    "BOOK_ARMS",
    "GridConfig",
    "GridResult",
    "Layout",
    "plan_layout",
    "run_grid",
    "grid_points",
    "init_streams",
    "updates_per_record",
    "num_updates",
    "record_steps",
    "arm_batch_size",
    "grid_flops",
    "init_models",
    # the book's sweep, as one configuration of the engine
    "book_weight_scales",
    "SweepConfig",
    "SweepResult",
    "run_sweep",
    "sweep_flops",
]

METRICS = ("train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss")


class Arm(NamedTuple):
    """A static variant of the network: anything that changes the traced program.

    Attributes:
      batch_norm: the norm between each hidden Affine and its activation: ``True`` for batch norm with the
        grid's ``bn_momentum``/``bn_eps``, ``False`` for none, or a norm value (``layers.batch_renorm()``,
        ``layers.ghost_batch_norm(8)``, ...; see ``model.MLPConfig``).
      activation: ``'relu'`` or ``'sigmoid'``.
      dropout_ratio: dropout after each hidden activation (0: none).
      dropout_inverted: modern inverted dropout (True) or the book's (False: scale at evaluation).
      weight_init: ``None`` to use the ``weight_scale`` hyper-parameter as every layer's std (the book's
        experiment); ``'he'`` / ``'xavier'`` for per-layer ``sqrt(2/fan_in)`` / ``sqrt(1/fan_in)``; or a number,
        a fixed std of the arm (arms of one grid may then start at different scales). ``weight_scale``
        multiplies the last two (set ``GridConfig.weight_scale=1`` to use them as they are).
      init_stream: which stream of initial weights the arm draws from; ``None``: its position among the arms
        (the book's BN and plain nets draw their own weights). Arms given the same stream start from the same
        Affine weights (a paired comparison, e.g. with and without dropout), and an arm run alone with
        ``init_stream=i`` reproduces the arm at position ``i`` of a larger run.
      batch_size: the arm's own mini-batch size; ``None``: ``GridConfig.batch_size``. Arms of one batch size
        share their batches (per seed); an arm with its own size draws its own and, unless
        ``GridConfig.updates_per_record`` is set, runs ``max(num_train // batch_size, 1)`` updates per record,
        so every arm trains for the same number of epochs (see ``GridResult.arm_record_steps``).
      learning_rate_scale: multiplies the learning rate (the axis's or the fixed value) for this arm, e.g.
        ``batch_size / 100`` for the linear scaling rule.
    """

    batch_norm: Any = False
    activation: str = "relu"
    dropout_ratio: float = 0.0
    dropout_inverted: bool = True
    weight_init: str | float | None = None
    init_stream: int | None = None
    batch_size: int | None = None
    learning_rate_scale: float = 1.0


# The book's two arms, in the order its keys were always drawn: row 0 batch norm, row 1 plain.
BOOK_ARMS: dict[str, Arm] = {"batchnorm": Arm(batch_norm=True), "plain": Arm()}


def book_weight_scales(num_scales: int = 16) -> tuple[float, ...]:
    """``np.logspace(0, -4, num_scales)``: 1.0 down to 1e-4, the book's 16 scales by default."""
    return tuple(float(w) for w in np.logspace(0, -4, num=num_scales))


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Everything a sweep needs besides its data; defaults are the book's ch. 6.3 protocol.

    Attributes:
      arms: name -> ``Arm``, in output order.
      axes: name -> values for the vmapped hyper-parameters (``bnjax.options.AXES``), in output order. An
        axis not given takes the fixed value of the field of the same name below.
      weight_scale, learning_rate, weight_decay: values used when the axis is not in ``axes``.
      num_records: records of the metrics (the book's "epochs").
      updates_per_record: updates between two records; ``None``: ``max(num_train // batch_size, 1)`` (the
        book's ``iter_per_epoch``). The first record always follows a single update (the book's loop).
      batch_size: mini-batch size; batches are drawn with replacement, as in the book.
      optimizer: a name of ``bnjax.train.OPTIMIZERS``.
      seed, num_seeds: seeds ``seed .. seed + num_seeds - 1``.
      hidden_sizes, num_classes: the network between the input and the scores.
      dtype: parameter and activation dtype (batch-norm statistics are reduced in float32 anyway).
      bn_momentum, bn_eps: batch-norm conventions (``layers.CONVENTIONS``).
      matmul_precision: ``'highest'`` keeps float32 matmuls float32 on GPUs (XLA's default may use TF32).
      eval_batch_size: images scored per step of the evaluation scan.
      max_models_per_chunk: models trained at once; ``None``: as many as ``memory_budget_bytes`` allows.
      memory_budget_bytes: working memory a chunk may use (parameters, optimizer state, activations);
        ``None``: 1 GiB on CPU, a quarter of the first device's memory on an accelerator.
      keep_final: return every model's final parameters, running statistics and optimizer state (host
        memory grows with the number of models).
    """

    arms: Mapping[str, Arm] = dataclasses.field(default_factory=lambda: dict(BOOK_ARMS))
    axes: Mapping[str, Sequence[float]] = dataclasses.field(
        default_factory=lambda: {"weight_scale": book_weight_scales(16)})
    weight_scale: float = 0.01
    learning_rate: float = 0.01
    weight_decay: float = 0.0
    num_records: int = 20
    updates_per_record: int | None = None
    batch_size: int = 100
    optimizer: str = "sgd"
    seed: int = 0
    num_seeds: int = 1
    hidden_sizes: tuple[int, ...] = (100, 100, 100, 100, 100)
    num_classes: int = 10
    dtype: str = "float32"
    bn_momentum: float = layers.CONVENTIONS["momentum"]
    bn_eps: float = layers.CONVENTIONS["eps"]
    matmul_precision: str = "highest"
    eval_batch_size: int = 1000
    max_models_per_chunk: int | None = None
    memory_budget_bytes: int | None = None
    keep_final: bool = False

    def replace(self, **changes) -> "GridConfig":
        return dataclasses.replace(self, **changes)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in self.axes.values())

    @property
    def num_grid_points(self) -> int:
        return math.prod(self.grid_shape)

    @property
    def num_models(self) -> int:
        return len(self.arms) * self.num_seeds * self.num_grid_points

    def network(self, arm: Arm, input_size: int) -> model.MLPConfig:
        return model.MLPConfig(
            input_size=int(input_size), hidden_sizes=tuple(int(h) for h in self.hidden_sizes),
            output_size=int(self.num_classes), activation=arm.activation,
            batch_norm=arm.batch_norm if isinstance(arm.batch_norm, layers.Norm) else bool(arm.batch_norm or False),
            dropout_ratio=float(arm.dropout_ratio), dropout_inverted=bool(arm.dropout_inverted),
            bn_momentum=float(self.bn_momentum), bn_eps=float(self.bn_eps),
        )

    def validate(self) -> "GridConfig":
        """Raise ``ValueError`` naming the field for a configuration the engine cannot run."""
        if not isinstance(self.arms, Mapping) or not self.arms:
            raise ValueError("arms must be a non-empty dict of name -> Arm")
        for name, arm in self.arms.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"arm names must be non-empty strings, got {name!r}")
            if not isinstance(arm, Arm):
                raise ValueError(f"arm {name!r} must be a bnjax.sweep.Arm, got {type(arm).__name__}")
            if not (arm.batch_norm is None or isinstance(arm.batch_norm, (bool, np.bool_, layers.Norm))) \
                    or type(arm.batch_norm) is layers.Norm:
                raise ValueError(f"arm {name!r}: batch_norm must be True, False/None or a norm value "
                                 f"(layers.batch_renorm(), ...), got {arm.batch_norm!r}")
            if not isinstance(arm.dropout_inverted, (bool, np.bool_)):
                raise ValueError(f"arm {name!r}: dropout_inverted must be True or False, got {arm.dropout_inverted!r}")
            if arm.batch_size is not None and (isinstance(arm.batch_size, (bool, np.bool_)) or
                                               not isinstance(arm.batch_size, (int, np.integer)) or arm.batch_size < 1):
                raise ValueError(f"arm {name!r}: batch_size must be None or an integer >= 1, got {arm.batch_size!r}")
            lr_scale = arm.learning_rate_scale
            if (isinstance(lr_scale, (bool, np.bool_))
                    or not isinstance(lr_scale, (int, float, np.integer, np.floating))
                    or not (np.isfinite(lr_scale) and lr_scale > 0)):
                raise ValueError(f"arm {name!r}: learning_rate_scale must be a finite Python or NumPy number > 0, got "
                                 f"{lr_scale!r}")
            if arm.init_stream is not None and (isinstance(arm.init_stream, bool) or
                                                not (isinstance(arm.init_stream, int) and arm.init_stream >= 0)):
                raise ValueError(f"arm {name!r}: init_stream must be None or an integer >= 0, got {arm.init_stream!r}")
            if not _valid_weight_init(arm.weight_init):
                raise ValueError(f"arm {name!r}: weight_init must be None, 'he', 'xavier' or a finite number > 0, "
                                 f"got {arm.weight_init!r}")
            self.network(arm, 1).check()
        if not isinstance(self.axes, Mapping):
            raise ValueError("axes must be a dict of name -> values")
        for name, values in self.axes.items():
            if name not in options.AXES:
                raise ValueError(f"unknown axis {name!r}; the engine vmaps over {', '.join(options.AXES)}")
            vals = np.asarray(values, dtype=float)
            if vals.ndim != 1 or vals.size == 0:
                raise ValueError(f"axis {name!r} needs a non-empty 1-D list of numbers, got {values!r}")
            _check_values(name, vals)
        for name in options.AXES:
            _check_values(name, np.asarray([getattr(self, name)], dtype=float))
        for name in ("num_records", "batch_size", "num_seeds", "eval_batch_size", "seed", "num_classes",
                     "updates_per_record", "max_models_per_chunk", "memory_budget_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.matmul_precision not in ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"):
            raise ValueError(f"matmul_precision must be 'default', 'high' or 'highest', got {self.matmul_precision!r}")
        for name in ("num_records", "batch_size", "num_seeds", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("updates_per_record", "max_models_per_chunk", "memory_budget_bytes"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed or self.seed + self.num_seeds - 1 > options.MAX_SEED:
            raise ValueError(f"seeds must lie in 0..{options.MAX_SEED}; seed={self.seed} with num_seeds="
                             f"{self.num_seeds} reaches {self.seed + self.num_seeds - 1}")
        if self.dtype not in options.DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(options.DTYPES)}, got {self.dtype!r}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1)")
        # Values that would round to 0 or overflow to inf in the dtype they are used in: weight scales in the
        # model's dtype, learning rates and weight decays in at least float32.
        model_dtype = jnp.dtype(self.dtype)
        # The optimizer scales the updates in the parameters' dtype: the learning rate must survive it too.
        # An arm's learning_rate_scale multiplies the learning rate: the products must survive too.
        scales = sorted({float(arm.learning_rate_scale) for arm in self.arms.values()})
        for name, finfo in (("weight_scale", jnp.finfo(model_dtype)),
                            ("learning_rate", jnp.finfo(model_dtype)),
                            ("weight_decay", jnp.finfo(jnp.promote_types(model_dtype, jnp.float32)))):
            vals = np.abs(np.asarray(self.axes.get(name, [getattr(self, name)]), dtype=float))
            if name == "learning_rate":
                vals = np.concatenate([vals * s for s in scales])
            vals = vals[vals != 0]
            if np.any((vals < float(finfo.tiny)) | (vals > float(finfo.max))):
                what = " (times the arms' learning_rate_scale)" if name == "learning_rate" and scales != [1.0] else ""
                raise ValueError(f"{name} values{what} must lie in {self.dtype}'s range {float(finfo.tiny):.3g}.."
                                 f"{float(finfo.max):.3g}, got {vals.tolist()}")
        train.make_optimizer(self.optimizer, self.learning_rate)
        return self


def _valid_weight_init(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return value in (None, "he", "relu", "xavier", "sigmoid")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return bool(np.isfinite(value) and value > 0)


def _check_values(name: str, vals: np.ndarray) -> None:
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"{name} values must be finite, got {vals.tolist()}")
    if name in ("weight_scale", "learning_rate") and np.any(vals <= 0):
        raise ValueError(f"{name} values must be > 0, got {vals.tolist()}")
    if name == "weight_decay" and np.any(vals < 0):
        raise ValueError(f"weight_decay values must be >= 0, got {vals.tolist()}")


def arm_batch_size(config: GridConfig, arm: Arm) -> int:
    """The mini-batch size an arm trains with: its own, or the grid's."""
    return int(config.batch_size if arm.batch_size is None else arm.batch_size)


def updates_per_record(config: GridConfig, num_train: int, batch_size: int | None = None) -> int:
    """Updates between two records: ``config.updates_per_record`` or the book's ``max(N // B, 1)``, with
    ``B = batch_size`` (an arm's own) or ``config.batch_size``."""
    if config.updates_per_record is not None:
        return int(config.updates_per_record)
    return max(num_train // int(batch_size or config.batch_size), 1)


def num_updates(config: GridConfig | "SweepConfig", num_train: int, batch_size: int | None = None) -> int:
    """Updates per model: one before the first record, then ``updates_per_record`` before each further one
    (191 for the book's 20 records of 10 iterations)."""
    config = _as_grid(config)
    return 1 + (config.num_records - 1) * updates_per_record(config, num_train, batch_size)


def record_steps(config: GridConfig | "SweepConfig", num_train: int, batch_size: int | None = None) -> np.ndarray:
    """Number of updates done when each record is taken (1, 11, 21, ..., 191 for the book)."""
    config = _as_grid(config)
    return 1 + updates_per_record(config, num_train, batch_size) * np.arange(config.num_records)


def grid_points(config: GridConfig) -> dict[str, np.ndarray]:
    """Every hyper-parameter's value at each flattened grid point: name -> ``[num_grid_points]``.

    The grid is the product of ``config.axes`` in their order (the last axis varies fastest, as
    ``np.reshape``); hyper-parameters without an axis repeat their fixed value.
    """
    shape = config.grid_shape
    index = np.unravel_index(np.arange(config.num_grid_points), shape) if shape else ()
    points = {}
    for name in options.AXES:
        if name in config.axes:
            values = np.asarray(config.axes[name], float)
            points[name] = values[index[list(config.axes).index(name)]]
        else:
            points[name] = np.full(config.num_grid_points, float(getattr(config, name)))
    return points


def _scale_index(config: GridConfig) -> np.ndarray:
    """Per grid point, the index of its weight scale: the initial weights depend on it (and on seed and arm)."""
    if "weight_scale" not in config.axes:
        return np.zeros(config.num_grid_points, np.int32)
    shape = config.grid_shape
    index = np.unravel_index(np.arange(config.num_grid_points), shape)
    return index[list(config.axes).index("weight_scale")].astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Layout: mesh, padding, chunks
# --------------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """How the models are spread: a ``(seeds, grid)`` device mesh and chunks of ``seed_block x grid_block``.

    ``num_chunks = ceil(num_seeds / seed_block) * ceil(num_grid_points / grid_block)``; both blocks are
    multiples of the mesh's sizes, so every device holds models and the padding is at most one block.
    """

    mesh_shape: tuple[int, int]
    seed_block: int
    grid_block: int
    seed_chunks: int
    grid_chunks: int

    @property
    def num_chunks(self) -> int:
        return self.seed_chunks * self.grid_chunks

    def models_per_chunk(self, num_arms: int) -> int:
        return num_arms * self.seed_block * self.grid_block


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bytes_per_model(config: GridConfig, input_size: int) -> int:
    """A generous estimate of one model's working memory in a chunk (parameters, gradients, optimizer state,
    training and evaluation activations), used to size chunks."""
    sizes = [input_size, *config.hidden_sizes, config.num_classes]
    num_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) + 4 * sum(config.hidden_sizes)
    slots = {"sgd": 0, "momentum": 1, "nesterov": 1, "adagrad": 1, "rmsprop": 1, "adam": 2, "adamw": 2, "lion": 1}
    itemsize = np.dtype(jnp.dtype(config.dtype)).itemsize
    width = sum(sizes[1:])
    params = num_params * (4 + slots.get(config.optimizer, 2))  # params, grads, updates, donated copy, slots
    batch = max([config.batch_size] + [a.batch_size for a in config.arms.values() if a.batch_size is not None])
    activations = 6 * batch * width + 3 * config.eval_batch_size * width
    return int(itemsize * (params + activations))


def device_memory_limit() -> int | None:
    """The first device's memory in bytes on an accelerator; ``None`` on CPU or without memory statistics."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends have no memory statistics
        limit = None
    return int(limit) if limit else None


def default_memory_budget() -> int:
    """1 GiB on CPU (host memory is shared with everything else); a quarter of an accelerator's memory."""
    limit = device_memory_limit()
    return limit // 4 if limit else 1 << 30


def plan_layout(config: GridConfig, num_devices: int, input_size: int = 784) -> Layout:
    """Choose the device mesh and the chunk blocks that waste the fewest padded models.

    Every factorisation ``d_seeds x d_grid = num_devices`` is tried, and for each a few seed-chunk counts;
    blocks are balanced (the models are split as evenly as the mesh allows), so padding stays below one mesh
    row or column per chunk. Ties go to fewer chunks, then to more grid points per device (the grid axis shares
    batches, the seed axis does not).
    """
    num_arms, seeds, grid = len(config.arms), config.num_seeds, config.num_grid_points
    limit = config.max_models_per_chunk
    if limit is None:
        budget = config.memory_budget_bytes or default_memory_budget()
        limit = max(1, budget // bytes_per_model(config, input_size))
    cap = max(limit // num_arms, 1)  # (seed, grid point) pairs per chunk
    best = None
    for d_seed in range(1, num_devices + 1):
        if num_devices % d_seed:
            continue
        d_grid = num_devices // d_seed
        # The largest seed block that still fits next to the smallest grid block (a device needs a model).
        max_sb = max(d_seed, (cap // d_grid) // d_seed * d_seed)
        c_min = -(-seeds // max_sb)
        for seed_chunks in range(c_min, min(c_min + 64, -(-seeds // d_seed)) + 1):
            sb = _round_up(-(-seeds // seed_chunks), d_seed)
            if sb > max_sb:
                continue
            gb_max = max(d_grid, (cap // sb) // d_grid * d_grid)
            grid_chunks = -(-grid // gb_max)
            gb = _round_up(-(-grid // grid_chunks), d_grid)
            layout = Layout((d_seed, d_grid), sb, gb, -(-seeds // sb), -(-grid // gb))
            # Ties: fewer chunks, then wide grid blocks (the models of a seed share a batch, so a wide grid
            # block per device is one wide matmul; a seed block is a batch of narrow ones).
            cost = (layout.num_chunks * sb * gb, layout.num_chunks, -(gb // d_grid), -d_grid)
            if best is None or cost < best[0]:
                best = (cost, layout)
    return best[1]


def _global_put(array: np.ndarray, sharding: NamedSharding) -> Array:
    """A global ``jax.Array`` from a host array every process holds (works with one process or many)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(tree: Any) -> Any:
    """Host NumPy copies of (possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)


# --------------------------------------------------------------------------------------------------
# The compiled programs of one chunk
# --------------------------------------------------------------------------------------------------


class ChunkCarry(NamedTuple):
    """What a chunk carries between records: per arm a stacked ``TrainState`` and a divergence flag, leaves
    ``[seed_block, grid_block, ...]``."""

    models: dict
    diverged: dict


class ChunkInputs(NamedTuple):
    """Per-chunk arrays: seeds ``[sb]`` and the grid's hyper-parameters ``[gb]``."""

    seeds: Array  # int32 [sb]
    scale_index: Array  # int32 [gb]
    weight_scale: Array  # [gb]
    learning_rate: Array  # [gb]
    weight_decay: Array  # [gb]


def _seed_keys(seed: Array, num_streams: int, num_scales: int):
    """One seed's keys: the data key, ``[streams, scales]`` init keys, and the dropout key.

    JAX's default (partitionable) threefry makes ``split(key, (n, S))[i, j]`` independent of ``n``, so an arm's
    weights depend on its stream, not on how many arms run beside it.
    """
    data_key, init_key = jax.random.split(jax.random.key(seed))
    return data_key, jax.random.split(init_key, (num_streams, num_scales)), jax.random.fold_in(data_key, 1)


def init_streams(config: GridConfig) -> dict[str, int]:
    """Each arm's stream of initial weights: ``arm.init_stream``, or its position among the arms."""
    return {name: (i if arm.init_stream is None else arm.init_stream)
            for i, (name, arm) in enumerate(config.arms.items())}


def _make_programs(config: GridConfig, num_train: int, input_size: int, eval_sizes: dict[str, int]):
    """``setup(inputs) -> (carry, batch_idx [sb, U, B], dropout_keys [sb])`` and
    ``record(carry, r, x, t, batch_idx, dropout_keys, inputs, eval_sets) -> (carry, metrics)``, not yet jitted."""
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
    traced = {name: name in config.axes for name in ("learning_rate", "weight_decay")}

    def optimizer(lr, arm):
        lr = lr if traced["learning_rate"] else config.learning_rate
        if arm.learning_rate_scale != 1:  # e.g. the linear scaling rule for an arm's own batch size
            lr = lr * arm.learning_rate_scale
        return train.make_optimizer(config.optimizer, lr)

    def init_one(net, arm, key, scale, lr):
        if arm.weight_init is None:
            params, state = model.init(key, net, jnp.asarray(scale, dtype), dtype)
        elif not isinstance(arm.weight_init, str):  # the arm's own std, times the weight_scale hyper-parameter
            params, state = model.init(key, net, jnp.asarray(scale, dtype) * jnp.asarray(arm.weight_init, dtype),
                                       dtype)
        else:  # per-layer He/Xavier std, times the weight_scale hyper-parameter
            params, state = model.init(key, net, arm.weight_init, dtype)
            params = params._replace(affine=tuple(a._replace(W=a.W * jnp.asarray(scale, dtype))
                                                  for a in params.affine))
        return train.train_state_init(params, state, optimizer(lr, arm))

    streams = init_streams(config)

    def setup(inputs: ChunkInputs):
        num_streams = max(streams.values()) + 1
        data_keys, init_keys, dropout_keys = jax.vmap(lambda s: _seed_keys(s, num_streams, num_scales))(inputs.seeds)

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
            per_grid = jax.vmap(functools.partial(init_one, nets[name], arm), in_axes=(0, 0, 0))
            models[name] = jax.vmap(per_grid, in_axes=(0, None, None))(keys, inputs.weight_scale,
                                                                        inputs.learning_rate)
            diverged[name] = jnp.zeros((inputs.seeds.shape[0], inputs.scale_index.shape[0]), bool)
        return ChunkCarry(models, diverged), batch_idx, dropout_keys

    def step_one(net, arm, ts, xb, tb, key, lr, wd):
        decay = wd if traced["weight_decay"] else config.weight_decay
        return train.train_step(net, ts, xb, tb, optimizer(lr, arm), key, decay)[0]

    def evaluate(net, ts, eval_set, count):
        """Accuracy and mean loss ``[sb, gb]`` on one padded evaluation set, batch by batch."""
        xs, ts_labels, mask = eval_set

        def one(model_ts, xb, tb, mb):
            logits, _ = model.apply(net, model_ts.params, model_ts.state, xb, train=False)
            correct = jnp.sum(jnp.where(mb, jnp.argmax(logits, -1) == tb, False), dtype=jnp.int32)
            # The loss in at least float32, even for bf16 models (as the batch-norm statistics).
            logp = jax.nn.log_softmax(logits.astype(loss_dtype), axis=-1)
            nll = -jnp.take_along_axis(logp, tb[:, None], axis=-1)[:, 0]
            return correct, jnp.sum(jnp.where(mb, nll, 0.0))

        all_models = jax.vmap(jax.vmap(one, in_axes=(0, None, None, None)), in_axes=(0, None, None, None))

        def body(acc, batch):
            c, l = all_models(ts, *batch)
            return (acc[0] + c, acc[1] + l), None

        shape = ts.params.affine[0].b.shape[:2]
        zero = (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, loss_dtype))
        (correct, nll), _ = lax.scan(body, zero, (xs, ts_labels, mask))
        # Times a constant reciprocal, as jnp.mean compiles: the same numbers as scoring in one batch.
        return correct.astype(jnp.float32) * np.float32(1.0 / count), nll * np.asarray(1.0 / count, loss_dtype)

    def record(carry, record_index, x, t, batch_idx, dropout_keys, inputs: ChunkInputs, eval_sets):
        models = dict(carry.models)
        for b, members in groups.items():
            k = per_record[b]
            # The first record comes after a single update, every later one after k more (the book's loop).
            n = jnp.where(record_index == 0, 1, k)
            start = jnp.where(record_index == 0, 0, 1 + (record_index - 1) * k)

            def body(j, group_models, start=start, b=b, members=members):
                u = start + j
                idx = lax.dynamic_index_in_dim(batch_idx[b], u, axis=1, keepdims=False)  # [sb, B]
                xb, tb = x[idx], t[idx]
                keys = jax.vmap(lambda key: jax.random.fold_in(key, u))(dropout_keys)
                new = {}
                for name in members:
                    # Inner vmap over the grid shares the batch (in_axes None): one wide first-layer matmul.
                    grid = jax.vmap(functools.partial(step_one, nets[name], config.arms[name]),
                                    in_axes=(0, None, None, None, 0, 0))
                    seeds = jax.vmap(grid, in_axes=(0, 0, 0, 0, None, None))
                    new[name] = seeds(group_models[name], xb, tb, keys, inputs.learning_rate, inputs.weight_decay)
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


def _eval_set(x: np.ndarray, t: np.ndarray, batch: int, dtype) -> tuple:
    """Pad ``x [N, D]`` to whole batches: ``(xs [nb, E, D], ts [nb, E], mask [nb, E])``."""
    n = x.shape[0]
    size = min(batch, n)
    nb = -(-n // size)
    xs = np.zeros((nb * size, x.shape[1]), dtype)
    xs[:n] = x
    ts = np.zeros(nb * size, np.int32)
    ts[:n] = t
    mask = np.arange(nb * size) < n
    return xs.reshape(nb, size, -1), ts.reshape(nb, size), mask.reshape(nb, size)


# --------------------------------------------------------------------------------------------------
# Running a grid
# --------------------------------------------------------------------------------------------------


class GridResult(NamedTuple):
    """Outputs of ``run_grid`` as host NumPy arrays; no padded model appears in any of them.

    Attributes:
      config: the ``GridConfig`` run.
      axes: name -> values of each axis, in ``config.axes`` order.
      metrics: ``'train_accuracy'``, ``'train_loss'`` (and ``'heldout_accuracy'``, ``'heldout_loss'`` with a
        held-out set) -> arm name -> ``[seeds, *grid_shape, records]``; evaluation mode (running statistics),
        mean cross-entropy without the weight-decay term; NaN for a diverged model's loss.
      diverged: arm name -> ``[seeds, *grid_shape]``: a parameter became non-finite.
      record_steps: ``[records]`` updates done at each record (by arms of the grid's batch size).
      arm_record_steps: arm name -> ``[records]`` updates that arm had done at each record (differs from
        ``record_steps`` for arms with a ``batch_size`` of their own).
      timing: ``compile_s`` (first chunk), ``run_s`` (all chunks, excluding the compile).
      layout: the ``Layout`` used, plus ``devices_used`` (devices actually holding models, read from the
        arrays), ``processes`` and ``padded_models``.
      final: arm name -> ``TrainState`` with leaves ``[seeds, *grid_shape, ...]``, or ``None`` unless
        ``config.keep_final``.
    """

    config: GridConfig
    axes: dict
    metrics: dict
    diverged: dict
    record_steps: np.ndarray
    timing: dict
    layout: dict
    final: dict | None
    arm_record_steps: dict | None = None


def run_grid(
    config: GridConfig,
    x_train: Any,
    t_train: Any,
    x_heldout: Any = None,
    t_heldout: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
) -> GridResult:
    """Train every model of ``config`` on ``x_train [N, D]``, ``t_train [N]``.

    Args:
      config: the sweep.
      x_train, t_train: training images (float, flattened) and integer labels.
      x_heldout, t_heldout: optional held-out set, also scored at each record.
      progress: called as ``progress(done, total)`` once compiled (0 done) and after each record of each
        chunk; ``total = num_chunks * num_records``.
      devices: devices to spread the models over (default: every device of every process). With several
        processes (``jax.distributed.initialize``) every process must call ``run_grid`` identically; each
        gets the full results.
    """
    config.validate()
    _check_data(x_train, t_train, "train", config)
    with_heldout = x_heldout is not None
    if with_heldout:
        _check_data(x_heldout, t_heldout, "heldout", config)
        if np.shape(x_heldout)[1] != np.shape(x_train)[1]:
            raise ValueError(f"x_heldout has {np.shape(x_heldout)[1]} features, x_train {np.shape(x_train)[1]}")
    dtype = np.dtype(jnp.dtype(config.dtype))
    num_train, input_size = np.shape(x_train)
    devices = list(jax.devices() if devices is None else devices)
    layout = plan_layout(config, len(devices), input_size)
    mesh = Mesh(np.asarray(devices).reshape(layout.mesh_shape), ("seeds", "grid"))
    by_model = NamedSharding(mesh, PartitionSpec("seeds", "grid"))
    by_seed = NamedSharding(mesh, PartitionSpec("seeds"))
    by_grid = NamedSharding(mesh, PartitionSpec("grid"))
    everywhere = NamedSharding(mesh, PartitionSpec())

    x = _global_put(np.asarray(x_train, dtype), everywhere)
    t = _global_put(np.asarray(t_train, np.int32), everywhere)
    sets = {"train": _eval_set(np.asarray(x_train, dtype), np.asarray(t_train), config.eval_batch_size, dtype)}
    if with_heldout:
        sets["heldout"] = _eval_set(np.asarray(x_heldout, dtype), np.asarray(t_heldout), config.eval_batch_size,
                                    dtype)
    eval_sets = {name: tuple(_global_put(np.asarray(a), everywhere) for a in s) for name, s in sets.items()}

    eval_sizes = {"train": num_train, "heldout": np.shape(x_heldout)[0] if with_heldout else 0}
    setup, record = _make_programs(config, num_train, input_size, eval_sizes)
    points = grid_points(config)
    scale_index = _scale_index(config)
    sb, gb = layout.seed_block, layout.grid_block
    num_seeds, num_grid = config.num_seeds, config.num_grid_points

    hp_dtype = np.dtype(jnp.promote_types(dtype, jnp.float32))  # float64 models get float64 hyper-parameters

    def chunk_inputs(sc: int, gc: int) -> ChunkInputs:
        # Padded positions repeat the last real seed / grid point: valid numbers, sliced away afterwards.
        s = np.minimum(sc * sb + np.arange(sb), num_seeds - 1)
        g = np.minimum(gc * gb + np.arange(gb), num_grid - 1)
        return ChunkInputs(
            seeds=_global_put((config.seed + s).astype(np.int32), by_seed),
            scale_index=_global_put(scale_index[g], by_grid),
            weight_scale=_global_put(points["weight_scale"][g].astype(dtype), by_grid),
            learning_rate=_global_put(points["learning_rate"][g].astype(hp_dtype), by_grid),
            weight_decay=_global_put(points["weight_decay"][g].astype(hp_dtype), by_grid),
        )

    num_records = config.num_records
    names = list(config.arms)
    metric_names = [m for m in METRICS if with_heldout or not m.startswith("heldout")]
    host_dtype = np.float64 if config.dtype == "float64" else np.float32
    out = {m: {a: np.zeros((num_seeds, num_grid, num_records), host_dtype) for a in names} for m in metric_names}
    diverged = {a: np.zeros((num_seeds, num_grid), bool) for a in names}
    finals: dict[str, list] = {a: [] for a in names}

    compile_s, run_s = 0.0, 0.0
    compiled_setup = compiled_record = None
    devices_used = 0
    total = layout.num_chunks * num_records
    done = 0
    with jax.default_matmul_precision(config.matmul_precision):
        for sc in range(layout.seed_chunks):
            for gc in range(layout.grid_chunks):
                inputs = chunk_inputs(sc, gc)
                if compiled_setup is None:  # every chunk has the same shapes: compile once
                    t0 = time.perf_counter()
                    compiled_setup = jax.jit(setup, out_shardings=(by_model, by_seed, by_seed)).lower(
                        inputs).compile()
                    carry, batch_idx, dropout_keys = compiled_setup(inputs)
                    compiled_record = (
                        jax.jit(record, donate_argnums=0, out_shardings=(by_model, everywhere))
                        .lower(carry, jnp.int32(0), x, t, batch_idx, dropout_keys, inputs, eval_sets)
                        .compile()
                    )
                    compile_s = time.perf_counter() - t0
                    devices_used = len(jax.tree_util.tree_leaves(carry)[0].sharding.device_set)
                    if progress is not None:
                        progress(0, total)
                    t0 = time.perf_counter()
                else:
                    t0 = time.perf_counter()
                    carry, batch_idx, dropout_keys = compiled_setup(inputs)
                records = []
                for r in range(num_records):
                    carry, metrics = compiled_record(carry, jnp.int32(r), x, t, batch_idx, dropout_keys, inputs,
                                                     eval_sets)
                    records.append(metrics)
                    done += 1
                    if progress is not None:
                        jax.block_until_ready(metrics)
                        progress(done, total)
                records = _to_host(records)
                s_lo, g_lo = sc * sb, gc * gb
                s_n, g_n = min(sb, num_seeds - s_lo), min(gb, num_grid - g_lo)
                for m in metric_names:
                    for a in names:
                        block = np.stack([np.asarray(rec[m][a]) for rec in records], axis=-1)
                        out[m][a][s_lo:s_lo + s_n, g_lo:g_lo + g_n] = block[:s_n, :g_n]
                div = _to_host(carry.diverged)
                for a in names:
                    diverged[a][s_lo:s_lo + s_n, g_lo:g_lo + g_n] = np.asarray(div[a])[:s_n, :g_n]
                if config.keep_final:
                    host = _to_host(carry.models)
                    for a in names:
                        finals[a].append(((sc, gc), jax.tree_util.tree_map(lambda l: np.asarray(l)[:s_n, :g_n],
                                                                           host[a])))
                run_s += time.perf_counter() - t0

    grid_shape = config.grid_shape
    metrics_out = {m: {a: v.reshape(num_seeds, *grid_shape, num_records) for a, v in per_arm.items()}
                   for m, per_arm in out.items()}
    diverged = {a: v.reshape(num_seeds, *grid_shape) for a, v in diverged.items()}
    final = None
    if config.keep_final:
        final = {a: _assemble(finals[a], layout, num_seeds, grid_shape) for a in names}
    padded = layout.num_chunks * layout.models_per_chunk(len(names)) - config.num_models
    return GridResult(
        config=config,
        axes={name: np.asarray(values, float) for name, values in config.axes.items()},
        metrics=metrics_out,
        diverged=diverged,
        record_steps=record_steps(config, num_train),
        timing={"compile_s": compile_s, "run_s": run_s},
        layout=dict(layout._asdict(), num_chunks=layout.num_chunks,
                    models_per_chunk=layout.models_per_chunk(len(names)), devices_used=devices_used,
                    processes=jax.process_count(), padded_models=padded),
        final=final,
        arm_record_steps={a: record_steps(config, num_train, arm_batch_size(config, arm))
                          for a, arm in config.arms.items()},
    )


def init_models(config: GridConfig, input_size: int = 784) -> dict:
    """Every model's state before its first update, exactly as ``run_grid`` starts it.

    For looking at the untrained networks (activations, a step-size probe) beside the trained ones. All models
    are built at once on the default device, so this is meant for grids that fit in memory.

    Returns:
      arm name -> ``TrainState`` with leaves ``[seeds, *grid_shape, ...]`` (host NumPy arrays).
    """
    config.validate()
    setup, _ = _make_programs(config, 1, int(input_size), {})
    dtype = np.dtype(jnp.dtype(config.dtype))
    hp_dtype = np.dtype(jnp.promote_types(dtype, jnp.float32))
    points = grid_points(config)
    inputs = ChunkInputs(
        seeds=jnp.asarray(config.seed + np.arange(config.num_seeds), jnp.int32),
        scale_index=jnp.asarray(_scale_index(config)),
        weight_scale=jnp.asarray(points["weight_scale"].astype(dtype)),
        learning_rate=jnp.asarray(points["learning_rate"].astype(hp_dtype)),
        weight_decay=jnp.asarray(points["weight_decay"].astype(hp_dtype)),
    )
    carry, _, _ = jax.jit(setup)(inputs)
    shape = (config.num_seeds, *config.grid_shape)
    return {a: jax.tree_util.tree_map(lambda l: np.asarray(l).reshape(*shape, *l.shape[2:]), ts)
            for a, ts in jax.device_get(carry.models).items()}


def _assemble(pieces: list, layout: Layout, num_seeds: int, grid_shape: tuple[int, ...]):
    """Concatenate per-chunk final states ``[s_n, g_n, ...]`` into ``[seeds, *grid_shape, ...]``."""
    rows = []
    for sc in range(layout.seed_chunks):
        row = [tree for (s, _), tree in pieces if s == sc]
        rows.append(jax.tree_util.tree_map(lambda *ls: np.concatenate(ls, axis=1), *row))
    whole = jax.tree_util.tree_map(lambda *ls: np.concatenate(ls, axis=0), *rows)
    return jax.tree_util.tree_map(lambda l: l.reshape(num_seeds, *grid_shape, *l.shape[2:]), whole)


def _check_data(x: Any, t: Any, what: str, config: GridConfig) -> None:
    if np.ndim(x) != 2:
        raise ValueError(f"x_{what} must be [N, D], got shape {np.shape(x)}")
    if np.shape(t) != np.shape(x)[:1]:
        raise ValueError(f"t_{what} must be [N]={np.shape(x)[:1]}, got {np.shape(t)}")
    if np.shape(x)[0] < 1:
        raise ValueError(f"x_{what} is empty")
    labels = np.asarray(t)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"t_{what} must hold integer labels, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"t_{what} labels must lie in 0..{config.num_classes - 1}, got {labels.min()}..{labels.max()}")


def grid_flops(config: GridConfig, num_train: int, input_size: int, num_heldout: int = 0) -> dict:
    """Matmul FLOPs of a sweep: training (forward + backward) and evaluation, over all models."""
    sizes = [input_size, *config.hidden_sizes, config.num_classes]
    models = config.num_models
    per_arm = models // len(config.arms)
    train_flops = sum(per_arm * num_updates(config, num_train, arm_batch_size(config, arm))
                      * model.num_flops(sizes, arm_batch_size(config, arm), backward=True)
                      for arm in config.arms.values())
    evaluation = models * config.num_records * model.num_flops(sizes, num_train + num_heldout)
    return {"train": train_flops, "eval": evaluation, "total": train_flops + evaluation}


# --------------------------------------------------------------------------------------------------
# The book's sweep: one configuration of the engine
# --------------------------------------------------------------------------------------------------


class SweepConfig(NamedTuple):
    """The book's weight-scale sweep (defaults: its ch. 6.3 protocol): BN and plain arms, a weight-scale axis."""

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
    bn_eps: float = layers.CONVENTIONS["eps"]
    bn_momentum: float = layers.CONVENTIONS["momentum"]
    # True float32 matmuls: on GPUs XLA's default may use TF32, which rounds inputs to 10 mantissa bits.
    matmul_precision: str = "highest"

    def to_grid(self, **overrides) -> GridConfig:
        fields = self._asdict()
        scales = fields.pop("weight_scales")
        return GridConfig(arms=dict(BOOK_ARMS), axes={"weight_scale": tuple(scales)}, **fields, **overrides)


def _as_grid(config) -> GridConfig:
    return config.to_grid() if isinstance(config, SweepConfig) else config


class SweepResult(NamedTuple):
    """Outputs of ``run_sweep`` as NumPy arrays.

    Attributes:
      train_accuracy: ``{'batchnorm': [seeds, S, R], 'plain': [seeds, S, R]}``.
      heldout_accuracy: the same on the held-out set, or ``None``.
      diverged: ``{'batchnorm': [seeds, S], 'plain': [seeds, S]}``: a parameter became non-finite.
      record_steps: ``[R]`` updates done at each record.
      timing: ``{'compile_s', 'run_s'}``.
      final: ``{'batchnorm': TrainState, 'plain': TrainState}``, leaves ``[seeds, S, ...]``.
      grid: the full ``GridResult`` (losses, layout).
    """

    train_accuracy: dict
    heldout_accuracy: dict | None
    diverged: dict
    record_steps: np.ndarray
    timing: dict
    final: Any
    grid: GridResult


def run_sweep(
    config: SweepConfig,
    x_train: Any,
    t_train: Any,
    x_heldout: Any = None,
    t_heldout: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
    keep_final: bool = True,
    **grid_overrides: Any,
) -> SweepResult:
    """The book's sweep (``SweepConfig``) on the grid engine; see ``run_grid`` for the arguments."""
    grid = run_grid(config.to_grid(keep_final=keep_final, **grid_overrides), x_train, t_train, x_heldout,
                    t_heldout, progress=progress, devices=devices)
    held = grid.metrics.get("heldout_accuracy")
    return SweepResult(
        train_accuracy=grid.metrics["train_accuracy"],
        heldout_accuracy=held,
        diverged=grid.diverged,
        record_steps=grid.record_steps,
        timing=grid.timing,
        final=grid.final,
        grid=grid,
    )


def sweep_flops(config: SweepConfig | GridConfig, num_train: int, input_size: int, num_heldout: int = 0) -> dict:
    """Matmul FLOPs of the book's sweep (``grid_flops`` of its configuration)."""
    return grid_flops(_as_grid(config), num_train, input_size, num_heldout)
