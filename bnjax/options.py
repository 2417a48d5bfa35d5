"""Names the library accepts, in a module that imports nothing heavy (so a CLI's ``--help`` stays instant).

``bnjax.train.OPTIMIZERS`` and ``bnjax.model.ACTIVATIONS`` hold the implementations; tests keep these lists
equal to them.
"""

DTYPES = ("float32", "bfloat16", "float16", "float64")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw", "lion")
ACTIVATIONS = ("relu", "sigmoid")
# The numeric hyper-parameters the grid engine can vmap over (``bnjax.grid.GridConfig.axes``).
AXES = ("weight_scale", "learning_rate", "weight_decay", "bn_momentum")
# Seeds feed ``jax.random.key`` as int32: the last seed of a run must stay below 2**31.
MAX_SEED = 2**31 - 1
