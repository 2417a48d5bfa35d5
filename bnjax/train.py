"""Training: optax optimizers by name and one pure train step.

The grid engine that trains many models at once lives in ``bnjax.sweep``; the names it used to have here
(``SweepConfig``, ``run_sweep``, ...) are still importable from this module.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from bnjax import model

Array = jax.Array

__all__ = ["OPTIMIZERS", "make_optimizer", "TrainState", "train_state_init", "train_step", "step_size_probe"]

# The optimizers a user would expect by name, with optax's defaults (the book's Momentum and Nesterov use
# momentum 0.9; its RMSprop decays by 0.99 where optax's default is 0.9). ``bnjax.options.OPTIMIZERS`` spells
# the same names without importing JAX (a test keeps the two equal).
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


def train_state_init(
    params: model.MLPParams, state: model.MLPState, optimizer: optax.GradientTransformation
) -> TrainState:
    return TrainState(params, state, optimizer.init(params))


def train_step(
    net: model.MLPConfig,
    ts: TrainState,
    x: Array,
    t: Array,
    optimizer: optax.GradientTransformation,
    key: Array | None = None,
    weight_decay_lambda: float | Array = 0.0,
) -> tuple[TrainState, Array]:
    """One optax update of one model on the batch ``x [B, D]``, ``t [B]``; returns ``(new_ts, loss)``.

    Pure: jit it with ``net`` and ``optimizer`` closed over (``functools.partial``) or vmap it over stacked
    states. ``key`` feeds dropout; ``weight_decay_lambda`` (may be traced) adds the book's L2 term to the loss.
    """
    (value, new_state), grads = jax.value_and_grad(model.loss, argnums=1, has_aux=True)(
        net, ts.params, ts.state, x, t, True, key, weight_decay_lambda
    )
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    return TrainState(optax.apply_updates(ts.params, updates), new_state, opt_state), value


def step_size_probe(
    net: model.MLPConfig,
    params: model.MLPParams,
    state: model.MLPState,
    x: Array,
    t: Array,
    step_sizes: Array,
) -> Array:
    """Loss ratios ``L(theta - eta * g) / L(theta)`` along the gradient ``g``, one per step size ``eta``.

    Bjorck et al. (2018) use this to show why batch norm allows large learning rates: a ratio below 1 means a
    plain gradient step of that size lowers the loss. The loss is the training-mode cross-entropy on
    ``x [N, D]``, ``t [N]`` (batch statistics of ``x``, no dropout, no weight decay) and ``g`` its gradient;
    the running statistics play no part.

    Args:
      net, params, state: one model.
      x, t: the probe batch.
      step_sizes: ``[E]`` step sizes.

    Returns:
      ``[E]`` ratios (infinite or NaN where the step overflows).
    """
    net = net._replace(dropout_ratio=0.0)

    def value(p):
        return model.loss(net, p, state, x, t, True)[0]

    base, grads = jax.value_and_grad(value)(params)

    def at(eta):
        stepped = jax.tree_util.tree_map(lambda p, g: p - eta.astype(p.dtype) * g, params, grads)
        return value(stepped) / base

    return jax.vmap(at)(jax.numpy.asarray(step_sizes))


_MOVED_TO_SWEEP = ("SweepConfig", "SweepResult", "book_weight_scales", "num_updates", "record_steps", "run_sweep",
                   "sweep_flops")


def __getattr__(name: str):  # the book sweep's old home: keep research code that imported it working
    if name in _MOVED_TO_SWEEP:
        from bnjax import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module 'bnjax.train' has no attribute {name!r}")
