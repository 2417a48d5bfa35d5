"""What a grid is: its arms (static variants of the network), its axes (vmapped hyper-parameters), its protocol.

``GridConfig``'s defaults are the book's ch. 6.3 protocol; the counting functions here (updates, records, grid
points) are the engine's schedule, shared by the planner, the programs and the driver.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import layers, networks, options, train

__all__ = ["Arm", "BOOK_ARMS", "book_weight_scales", "GridConfig", "arm_batch_size", "updates_per_record",
           "num_updates", "record_steps", "grid_points"]


class Arm(NamedTuple):
    """A static variant of the network: anything that changes the traced program.

    Attributes:
      norm: the norm between each hidden Affine (the conv net: also its convolution, per channel) and its
        activation: a norm value (``layers.batch_norm()``,
        ``layers.batch_renorm()``, ``layers.ghost_batch_norm(8)``, ...; see ``model.MLPConfig``), ``None``
        (or ``False``) for none, or ``True``, shorthand for the book's ``layers.book_batch_norm()``.
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

    norm: Any = None
    activation: str = "relu"
    dropout_ratio: float = 0.0
    dropout_inverted: bool = True
    weight_init: str | float | None = None
    init_stream: int | None = None
    batch_size: int | None = None
    learning_rate_scale: float = 1.0


# The book's two arms, in the order its keys were always drawn: row 0 batch norm, row 1 plain.
BOOK_ARMS: dict[str, Arm] = {"batchnorm": Arm(norm=True), "plain": Arm()}


def book_weight_scales(num_scales: int = 16) -> tuple[float, ...]:
    """The book's weight scales.

    Args:
      num_scales: how many.

    Returns:
      ``np.logspace(0, -4, num_scales)`` as Python floats: 1.0 down to 1e-4, the book's 16 scales by default.
    """
    return tuple(float(w) for w in np.logspace(0, -4, num=num_scales))


@dataclasses.dataclass(frozen=True)
class GridConfig:
    """Everything a grid needs besides its data; defaults are the book's ch. 6.3 protocol.

    Attributes:
      arms: name -> ``Arm``, in output order.
      axes: name -> values for the vmapped hyper-parameters (``bnjax.options.AXES``), in output order. An
        axis not given takes the fixed value of the field of the same name below.
      weight_scale, learning_rate, weight_decay: values used when the axis is not in ``axes``.
      bn_momentum: the running-statistics momentum of every arm with a norm when the ``bn_momentum`` axis is
        not given; ``None``: each norm's own. Arms without a norm ignore it.
      num_records: records of the metrics (the book's "epochs").
      updates_per_record: updates between two records; ``None``: ``max(num_train // batch_size, 1)`` (the
        book's ``iter_per_epoch``). The first record always follows a single update (the book's loop).
      batch_size: mini-batch size; batches are drawn with replacement, as in the book.
      optimizer: a name of ``bnjax.train.OPTIMIZERS``.
      seed, num_seeds: seeds ``seed .. seed + num_seeds - 1``.
      model: the network kind (``bnjax.options.MODELS``): ``'mlp'`` (the book's ch. 6 net) or ``'convnet'`` (its
        ch. 7 ``SimpleConvNet``: conv 30 5x5, pool 2x2, then the hidden Affine layers; each row is read as a
        square one-channel image).
      hidden_sizes, num_classes: the hidden Affine widths (the conv net's follow its pooling; the book's
        ``SimpleConvNet`` has one of 100) and the classes.
      dtype: parameter and activation dtype (batch-norm statistics are reduced in float32 anyway).
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
    bn_momentum: float | None = None
    num_records: int = 20
    updates_per_record: int | None = None
    batch_size: int = 100
    optimizer: str = "sgd"
    model: str = "mlp"
    seed: int = 0
    num_seeds: int = 1
    hidden_sizes: tuple[int, ...] = (100, 100, 100, 100, 100)
    num_classes: int = 10
    dtype: str = "float32"
    matmul_precision: str = "highest"
    eval_batch_size: int = 1000
    max_models_per_chunk: int | None = None
    memory_budget_bytes: int | None = None
    keep_final: bool = False

    def replace(self, **changes: Any) -> "GridConfig":
        """A copy with some fields changed.

        Args:
          **changes: field name -> new value.

        Returns:
          the new ``GridConfig`` (not validated; ``run_grid`` validates).
        """
        return dataclasses.replace(self, **changes)

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The number of values of each axis, in ``axes`` order."""
        return tuple(len(v) for v in self.axes.values())

    @property
    def num_grid_points(self) -> int:
        """The product of ``grid_shape``."""
        return math.prod(self.grid_shape)

    @property
    def num_models(self) -> int:
        """Arms x seeds x grid points."""
        return len(self.arms) * self.num_seeds * self.num_grid_points

    def network(self, arm: Arm, input_size: int) -> Any:
        """The network an arm trains.

        Args:
          arm: one of ``arms``.
          input_size: features per image.

        Returns:
          its ``model.MLPConfig`` or ``convnet.ConvNetConfig`` (``model``; either resolves ``norm=True`` to
          ``layers.book_batch_norm()``).

        Raises:
          ValueError: an unknown ``model``, or an input the conv net cannot read as a square image.
        """
        return networks.network_config(
            self.model, input_size=int(input_size), hidden_sizes=tuple(int(h) for h in self.hidden_sizes),
            output_size=int(self.num_classes), activation=arm.activation, norm=arm.norm,
            dropout_ratio=float(arm.dropout_ratio), dropout_inverted=bool(arm.dropout_inverted),
        )

    def validate(self) -> "GridConfig":
        """Check every field.

        Returns:
          ``self``.

        Raises:
          ValueError: naming the field, for a configuration the engine cannot run.
        """
        if not isinstance(self.arms, Mapping) or not self.arms:
            raise ValueError("arms must be a non-empty dict of name -> Arm")
        if self.model not in options.MODELS:
            raise ValueError(f"model must be one of {', '.join(options.MODELS)}, got {self.model!r}")
        for name, arm in self.arms.items():
            _check_arm(name, arm)
            # The input size is the data's, checked when the grid runs: a stand-in the kind can read here.
            self.network(arm, 1 if self.model == "mlp" else 28 * 28).check()
        if not isinstance(self.axes, Mapping):
            raise ValueError("axes must be a dict of name -> values")
        for name, values in self.axes.items():
            if name not in options.AXES:
                raise ValueError(f"unknown axis {name!r}; the engine vmaps over {', '.join(options.AXES)}")
            vals = np.asarray(values, dtype=float)
            if vals.ndim != 1 or vals.size == 0:
                raise ValueError(f"axis {name!r} needs a non-empty 1-D list of numbers, got {values!r}")
            _check_values(name, vals)
        for name, axis in options.AXES.items():
            fixed = getattr(self, name)
            if fixed is None and not axis.optional:
                raise ValueError(f"{name} must be a number, got None")
            if fixed is not None:  # None (an optional axis): the consumer keeps its own default
                _check_values(name, np.asarray([fixed], dtype=float))
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
        self._check_ranges()
        train.make_optimizer(self.optimizer, self.learning_rate)
        return self

    def _check_ranges(self) -> None:
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


def _check_arm(name: Any, arm: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"arm names must be non-empty strings, got {name!r}")
    if not isinstance(arm, Arm):
        raise ValueError(f"arm {name!r} must be a bnjax.grid.Arm, got {type(arm).__name__}")
    if not (arm.norm is None or isinstance(arm.norm, (bool, np.bool_, layers.Norm))) or type(arm.norm) is layers.Norm:
        raise ValueError(f"arm {name!r}: norm must be True, False/None or a norm value "
                         f"(layers.batch_renorm(), ...), got {arm.norm!r}")
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


def _valid_weight_init(value: Any) -> bool:
    if value is None or isinstance(value, str):
        return value in (None, "he", "relu", "xavier", "sigmoid")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return bool(np.isfinite(value) and value > 0)


def _check_values(name: str, vals: np.ndarray) -> None:
    problem = options.AXES[name].problem(vals.tolist())
    if problem:
        raise ValueError(f"{name} values {problem}, got {vals.tolist()}")


def arm_batch_size(config: GridConfig, arm: Arm) -> int:
    """The mini-batch size an arm trains with.

    Args:
      config: the grid.
      arm: one of its arms.

    Returns:
      ``arm.batch_size``, or ``config.batch_size`` when the arm has none of its own.
    """
    return int(config.batch_size if arm.batch_size is None else arm.batch_size)


def updates_per_record(config: GridConfig, num_train: int, batch_size: int | None = None) -> int:
    """Updates between two records.

    Args:
      config: the grid.
      num_train: training images.
      batch_size: an arm's own batch size; ``None``: ``config.batch_size``.

    Returns:
      ``config.updates_per_record``, or the book's ``max(num_train // batch_size, 1)``.
    """
    if config.updates_per_record is not None:
        return int(config.updates_per_record)
    return max(num_train // int(batch_size or config.batch_size), 1)


def num_updates(config: GridConfig, num_train: int, batch_size: int | None = None) -> int:
    """Updates per model: one before the first record, then ``updates_per_record`` before each further one.

    Args:
      config, num_train, batch_size: as ``updates_per_record``.

    Returns:
      the count (191 for the book's 20 records of 10 iterations).
    """
    return 1 + (config.num_records - 1) * updates_per_record(config, num_train, batch_size)


def record_steps(config: GridConfig, num_train: int, batch_size: int | None = None) -> np.ndarray:
    """Updates done when each record is taken.

    Args:
      config, num_train, batch_size: as ``updates_per_record``.

    Returns:
      ``[num_records]`` integers (1, 11, 21, ..., 191 for the book).
    """
    return 1 + updates_per_record(config, num_train, batch_size) * np.arange(config.num_records)


def grid_points(config: GridConfig) -> dict[str, np.ndarray]:
    """Every hyper-parameter's value at each flattened grid point.

    The grid is the product of ``config.axes`` in their order (the last axis varies fastest, as
    ``np.reshape``); hyper-parameters without an axis repeat their fixed value (NaN for an optional one left at
    ``None``: its consumer keeps its own default).

    Args:
      config: the grid.

    Returns:
      name (every name of ``bnjax.options.AXES``) -> ``[num_grid_points]`` floats.
    """
    shape = config.grid_shape
    index = np.unravel_index(np.arange(config.num_grid_points), shape) if shape else ()
    points = {}
    for name in options.AXES:
        if name in config.axes:
            values = np.asarray(config.axes[name], float)
            points[name] = values[index[list(config.axes).index(name)]]
        else:
            fixed = getattr(config, name)
            points[name] = np.full(config.num_grid_points, np.nan if fixed is None else float(fixed))
    return points


def scale_index(config: GridConfig) -> np.ndarray:
    """Per grid point, the index of its weight scale: the initial weights depend on it (and on seed and arm).

    Args:
      config: the grid.

    Returns:
      ``[num_grid_points]`` int32 (zeros without a ``weight_scale`` axis).
    """
    if "weight_scale" not in config.axes:
        return np.zeros(config.num_grid_points, np.int32)
    shape = config.grid_shape
    index = np.unravel_index(np.arange(config.num_grid_points), shape)
    return index[list(config.axes).index("weight_scale")].astype(np.int32)
