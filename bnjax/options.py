"""Names the library accepts, in a module that imports nothing heavy (so a CLI's ``--help`` stays instant).

``bnjax.train.OPTIMIZERS``, ``bnjax.model.ACTIVATIONS`` and ``bnjax.networks.KINDS`` hold the implementations; tests keep these lists
equal to them.
"""

import math
from typing import NamedTuple

DTYPES = ("float32", "bfloat16", "float16", "float64")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")
ACTIVATIONS = ("relu", "sigmoid")
# The network kinds (``bnjax.networks.KINDS``): the book's ch. 6 MLP and its ch. 7 SimpleConvNet.
MODELS = ("mlp", "convnet")


class Axis(NamedTuple):
    """How the grid engine checks and uses one numeric hyper-parameter it can vmap over.

    Attributes:
      consumer: the one place the value goes: ``"init"`` (``bnjax.model.init``), ``"optimizer"``
        (``bnjax.train.make_optimizer``), ``"train_step"`` (``bnjax.train.train_step``) or ``"norm"`` (every
        norm's ``apply`` in training, through ``norm_kwargs``).
      keyword: the keyword argument it is passed to its consumer as.
      low, high: the allowed range.
      low_open: whether ``low`` itself is refused (a learning rate of 0 trains nothing).
      optional: whether its fixed value may be ``None``: then it is not passed, and the consumer keeps its own
        default (each norm its own momentum).
    """

    consumer: str
    keyword: str
    low: float = 0.0
    high: float = math.inf
    low_open: bool = False
    optional: bool = False

    def problem(self, values) -> str | None:
        """Why ``values`` (floats) are refused, or None. Kept free of NumPy so ``--help`` stays instant."""
        values = [float(v) for v in values]
        if not all(math.isfinite(v) for v in values):
            return "must be finite"
        if math.isfinite(self.high):
            if any(v < self.low or v > self.high for v in values):
                return f"must lie in [{self.low:g}, {self.high:g}]"
        elif any(v < self.low or (self.low_open and v == self.low) for v in values):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        return None


# The numeric hyper-parameters the grid engine can vmap over (``bnjax.grid.GridConfig.axes``), in the order
# results list them. A new axis is one entry here plus its fixed value on ``bnjax.grid.GridConfig``.
AXES = {
    "weight_scale": Axis("init", "weight_scale", low_open=True),
    "learning_rate": Axis("optimizer", "learning_rate", low_open=True),
    "weight_decay": Axis("train_step", "weight_decay"),
    "bn_momentum": Axis("norm", "momentum", high=1.0, optional=True),
}
# Seeds feed ``jax.random.key`` as int32: the last seed of a run must stay below 2**31.
MAX_SEED = 2**31 - 1
