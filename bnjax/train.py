"""Training: optax optimizers by name and one pure train step.

The grid engine that trains many models at once (arms x vmapped axes x seeds) is ``bnjax.grid``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnjax import networks

Array = jax.Array

__all__ = ["OPTIMIZERS", "make_optimizer", "TrainState", "train_state_init", "train_step", "step_size_probe"]

# The optimizers a user would expect by name, with optax's defaults (the book's Momentum and Nesterov use
# momentum 0.9; its RMSprop decays by 0.99 where optax's default is 0.9). ``bnjax.options.OPTIMIZERS`` spells
# the same names without importing JAX (a test keeps the two equal); nowhere else names optimizers.
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
    """An optax optimizer by name.

    Args:
      name: one of ``OPTIMIZERS``.
      learning_rate: the step size; may be a traced array.

    Returns:
      the optax ``GradientTransformation``.

    Raises:
      ValueError: for an unknown name (never a silent default).
    """
    try:
        factory = OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return factory(learning_rate)


class TrainState(NamedTuple):
    """Everything one model carries between steps.

    Attributes:
      params: the trained parameters (``model.MLPParams`` or ``convnet.ConvNetParams``).
      state: the running statistics (``model.MLPState`` or ``convnet.ConvNetState``).
      opt_state: the optimizer's state.
    """

    params: Any
    state: Any
    opt_state: Any


def train_state_init(
    params: Any, state: Any, optimizer: optax.GradientTransformation
) -> TrainState:
    """The train state of a freshly initialised model.

    Args:
      params, state: from the network's ``init`` (``model.init``, ``convnet.init``).
      optimizer: the optax optimizer the steps will use.

    Returns:
      ``TrainState(params, state, optimizer.init(params))``.
    """
    return TrainState(params, state, optimizer.init(params))


def train_step(
    config: Any,
    train_state: TrainState,
    x: Array,
    labels: Array,
    optimizer: optax.GradientTransformation,
    *,
    key: Array | None = None,
    weight_decay: float | Array = 0.0,
    norm_kwargs: dict | None = None,
) -> tuple[Array, TrainState]:
    """One optax update of one model on a batch, with the training-mode loss (batch statistics, dropout).

    Pure: jit it with ``config`` and ``optimizer`` closed over (``functools.partial``) or vmap it over stacked
    states.

    Args:
      config: the network's structure (``model.MLPConfig`` or ``convnet.ConvNetConfig``).
      train_state: from ``train_state_init`` or a previous step.
      x: ``[B, input_size]``.
      labels: ``[B]`` integer classes.
      optimizer: the optax optimizer ``train_state.opt_state`` belongs to.
      key: ``jax.random`` key for dropout.
      weight_decay: the book's L2 coefficient added to the loss; may be traced.
      norm_kwargs: passed to every norm's ``apply`` (see ``model.apply``), e.g. ``{"momentum": m}``.

    Returns:
      ``(loss, new_train_state)``: the loss before the step and the state after it.

    Raises:
      ValueError: as ``model.apply``.
    """
    (value, new_state), grads = jax.value_and_grad(networks.module_for(config).loss, argnums=1, has_aux=True)(
        config, train_state.params, train_state.state, x, labels, train=True, key=key, weight_decay=weight_decay,
        norm_kwargs=norm_kwargs)
    updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
    return value, TrainState(optax.apply_updates(train_state.params, updates), new_state, opt_state)


def step_size_probe(
    config: Any,
    params: Any,
    state: Any,
    x: Array,
    labels: Array,
    step_sizes: Array,
) -> Array:
    """Loss ratios ``L(theta - eta * g) / L(theta)`` along the gradient ``g``, one per step size ``eta``.

    Bjorck et al. (2018) use this to show why batch norm allows large learning rates: a ratio below 1 means a
    plain gradient step of that size lowers the loss. The loss is the training-mode cross-entropy on ``x``
    (batch statistics of ``x``, no dropout, no weight decay) and ``g`` its gradient; the running statistics
    play no part.

    Args:
      config, params, state: one model.
      x: ``[N, input_size]``, the probe batch.
      labels: ``[N]`` integer classes.
      step_sizes: ``[E]`` step sizes.

    Returns:
      ``[E]`` ratios (infinite or NaN where the step overflows).

    Raises:
      ValueError: as ``model.apply``.
    """
    config = config._replace(dropout_ratio=0.0)

    def value(p):
        return networks.module_for(config).loss(config, p, state, x, labels, train=True)[0]

    base, grads = jax.value_and_grad(value)(params)

    def at(eta):
        stepped = jax.tree_util.tree_map(lambda p, g: p - eta.astype(p.dtype) * g, params, grads)
        return value(stepped) / base

    return jax.vmap(at)(jnp.asarray(step_sizes))
