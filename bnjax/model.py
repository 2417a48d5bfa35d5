"""The book's ``MultiLayerNetExtend`` as pure functions.

``Affine -> [BatchNorm] -> activation -> [Dropout]`` for each hidden layer, then ``Affine`` to the scores.
The network's *structure* (sizes, activation, which norm is used if any, the dropout ratio, batch-norm
hyper-parameters) is an ``MLPConfig``: static, hashable, passed first to every function, as a Flax module is.
The trained parameters (``MLPParams``) and the running statistics (``MLPState``) are plain pytrees of arrays,
so ``weight_init_std`` may be an array: ``jax.vmap(lambda s, k: init(k, config, s))`` builds a stack of
models, one per scale.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax import layers

Array = jax.Array

__all__ = ["MLPConfig", "MLPParams", "MLPState", "ACTIVATIONS", "init", "apply", "hidden", "loss", "predict", "accuracy",
           "recalibrate", "fold", "num_flops"]

ACTIVATIONS = {"relu": layers.relu, "sigmoid": layers.sigmoid}


class MLPConfig(NamedTuple):
    """Static structure of the network (defaults: the book's 784-100x5-10 ReLU net without batch norm).

    Attributes:
      input_size, hidden_sizes, output_size: layer widths.
      activation: ``'relu'`` or ``'sigmoid'``.
      batch_norm: the norm between each hidden Affine and its activation: a norm value
        (``layers.batch_norm(...)``, ``layers.batch_renorm(...)``, ``layers.ghost_batch_norm(...)`` or any
        ``layers.Norm``), or ``None``/``False`` for none; ``True`` is shorthand for
        ``layers.batch_norm(bn_momentum, bn_eps, init_var=bn_init_var)`` (the book's BatchNorm).
      dropout_ratio: dropout after each hidden activation (0.0: none).
      dropout_inverted: ``True`` scales kept units by ``1/(1-ratio)`` in training (modern); ``False`` is the
        book's (no scaling in training, times ``1-ratio`` at evaluation).
      bn_momentum, bn_eps, bn_init_var: batch-norm conventions of ``batch_norm=True`` (defaults:
        ``layers.CONVENTIONS``); a norm value carries its own.
    """

    input_size: int = 784
    hidden_sizes: tuple[int, ...] = (100, 100, 100, 100, 100)
    output_size: int = 10
    activation: str = "relu"
    batch_norm: Any = False
    dropout_ratio: float = 0.0
    dropout_inverted: bool = True
    bn_momentum: float = layers.CONVENTIONS["momentum"]
    bn_eps: float = layers.CONVENTIONS["eps"]
    bn_init_var: float = layers.CONVENTIONS["init_var"]

    @property
    def sizes(self) -> list[int]:
        return [int(self.input_size), *[int(h) for h in self.hidden_sizes], int(self.output_size)]

    @property
    def norm(self) -> layers.Norm | None:
        """The norm value of the hidden layers, or ``None``."""
        if isinstance(self.batch_norm, layers.Norm):
            return self.batch_norm
        if self.batch_norm is True or (isinstance(self.batch_norm, np.bool_) and bool(self.batch_norm)):
            return layers.batch_norm(self.bn_momentum, self.bn_eps, init_var=self.bn_init_var)
        return None

    def check(self) -> "MLPConfig":
        """Raise ``ValueError`` naming the field if the configuration cannot build a network."""
        if not (self.batch_norm is None or isinstance(self.batch_norm, (bool, np.bool_, layers.Norm))):
            raise ValueError(f"batch_norm must be a norm value (layers.batch_norm(), layers.batch_renorm(), "
                             f"layers.ghost_batch_norm(...)), True, False or None, got {self.batch_norm!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if any(s < 1 for s in self.sizes):
            raise ValueError(f"layer sizes must be positive, got {self.sizes}")
        if not 0.0 <= self.dropout_ratio < 1.0:
            raise ValueError(f"dropout_ratio must be in [0, 1), got {self.dropout_ratio}")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1], got {self.bn_momentum}")
        # Batch-norm statistics are float32: eps must survive the cast (1e-320 would become 0, 1e300 inf).
        if not 1.1754944e-38 <= self.bn_eps <= 3.4028235e38:
            raise ValueError(f"bn_eps must be > 0 and within float32's range, got {self.bn_eps}")
        return self


class MLPParams(NamedTuple):
    """Trainable parameters.

    Attributes:
      affine: one ``AffineParams`` per layer, hidden layers first, the output layer last.
      batch_norm: one ``BatchNormParams`` per hidden layer (the norm's parameters), or ``()`` without a norm.
    """

    affine: tuple
    batch_norm: tuple


class MLPState(NamedTuple):
    """Non-trained state: the norm's state (``BatchNormState``, ...) per hidden layer (empty without a norm)."""

    batch_norm: tuple


def init(
    key: Array, config: MLPConfig, weight_init_std: Any = "relu", dtype: Any = jnp.float32
) -> tuple[MLPParams, MLPState]:
    """Initialise the network: ``W = std * normal``, ``b = 0``, gamma = 1, beta = 0, running stats 0.

    Args:
      key: ``jax.random`` key.
      config: the network's structure.
      weight_init_std: a number or scalar array used for every layer (the book's experiment), or
        ``'he'``/``'relu'``, ``'xavier'``/``'sigmoid'`` for a per-layer ``sqrt(2 / fan_in)``/``sqrt(1 / fan_in)``.
      dtype: parameter dtype.

    Returns:
      ``(params, state)``.
    """
    config.check()
    sizes = config.sizes
    # One normal draw for all weights, sliced afterwards: under vmap one draw per layer compiles ~20x slower.
    shapes = list(zip(sizes[:-1], sizes[1:]))
    noise = jax.random.normal(key, (sum(i * o for i, o in shapes),), dtype)
    affine, offset = [], 0
    for num_in, num_out in shapes:
        std = jnp.asarray(layers.resolve_init_std(weight_init_std, num_in), dtype)
        if std.ndim != 0:
            raise ValueError(f"weight_init_std must be a scalar per model (vmap for several), got {std.shape}")
        W = std * noise[offset : offset + num_in * num_out].reshape(num_in, num_out)
        affine.append(layers.AffineParams(W=W, b=jnp.zeros((num_out,), dtype)))
        offset += num_in * num_out
    bn_params, bn_state = [], []
    norm = config.norm
    if norm is not None:
        for size in sizes[1:-1]:
            p, s = norm.init(size, dtype=dtype)
            bn_params.append(p)
            bn_state.append(s)
    return MLPParams(tuple(affine), tuple(bn_params)), MLPState(tuple(bn_state))


def apply(
    config: MLPConfig, params: MLPParams, state: MLPState, x: Array, train: bool = False, key: Array | None = None
) -> tuple[Array, MLPState]:
    """Scores of the network.

    Args:
      config: the structure ``params`` were made with.
      params, state: from ``init``.
      x: ``[N, input_size]``.
      train: the book's ``train_flg``: batch statistics + running update + dropout (True), or running
        statistics, no update, no dropout (False).
      key: ``jax.random`` key, needed only for dropout at training time.

    Returns:
      ``(logits [N, output_size], new_state)``.
    """
    logits, new_state, _ = _forward(config, params, state, x, train, key)
    return logits, new_state


def hidden(
    config: MLPConfig, params: MLPParams, state: MLPState, x: Array, train: bool = False, key: Array | None = None
) -> list[tuple[Array, Array]]:
    """Each hidden layer's pre-activation (after batch norm, when used) and activation, for looking inside.

    Args: as ``apply``. With ``train=True`` batch norm uses the statistics of ``x`` itself (the book's
    ch. 6.2 histograms of a freshly initialised network need exactly that); the running statistics are not
    returned.

    Returns:
      one ``(pre_activation [N, H], activation [N, H])`` pair per hidden layer, first layer first; the
      activation is taken before dropout.
    """
    return _forward(config, params, state, x, train, key)[2]


def _forward(config, params, state, x, train, key, norm_kwargs=None):
    if x.ndim != 2:
        raise ValueError(f"model.apply: x must be [N, features], got shape {x.shape}")
    norm = config.norm
    num_bn = len(config.hidden_sizes) if norm is not None else 0
    if len(params.batch_norm) != num_bn or len(state.batch_norm) != num_bn:
        raise ValueError("model.apply: config, params and state disagree on batch norm (use the pair init returned "
                         "with the same config)")
    act = ACTIVATIONS[config.activation]
    hidden_layers = params.affine[:-1]
    dropout = config.dropout_ratio > 0.0
    keys = (jax.random.split(key, len(hidden_layers)) if (train and dropout and key is not None)
            else [None] * len(hidden_layers))
    new_bn, inside = [], []
    h = x
    for i, aff in enumerate(hidden_layers):
        h = layers.affine_apply(aff, h)
        if norm is not None:
            h, s = norm.apply(params.batch_norm[i], state.batch_norm[i], h, train, **(norm_kwargs or {}))
            new_bn.append(s)
        pre = h
        h = act(h)
        inside.append((pre, h))
        if dropout:
            h = layers.dropout_apply(h, keys[i], config.dropout_ratio, train, inverted=config.dropout_inverted)
    logits = layers.affine_apply(params.affine[-1], h)
    return logits, MLPState(batch_norm=tuple(new_bn)), inside


def loss(
    config: MLPConfig,
    params: MLPParams,
    state: MLPState,
    x: Array,
    t: Array,
    train: bool = True,
    key: Array | None = None,
    weight_decay_lambda: float | Array = 0.0,
) -> tuple[Array, MLPState]:
    """Softmax cross-entropy plus ``lambda / 2 * sum(W ** 2)`` over every Affine weight (the book's).

    Returns ``(loss, new_state)``: use ``jax.value_and_grad(loss, argnums=1, has_aux=True)``.
    """
    logits, new_state = apply(config, params, state, x, train, key)
    value = layers.softmax_cross_entropy(logits, t)
    decay = sum(jnp.sum(jnp.square(a.W)) for a in params.affine)
    return value + 0.5 * weight_decay_lambda * decay, new_state


def predict(config: MLPConfig, params: MLPParams, state: MLPState, x: Array) -> Array:
    """Predicted classes ``[N]`` in evaluation mode; a row with a NaN score counts as the first NaN's class
    (class 0 for an all-NaN row), as NumPy's argmax does in the book."""
    logits, _ = apply(config, params, state, x, train=False)
    return jnp.argmax(logits, axis=-1)


def accuracy(config: MLPConfig, params: MLPParams, state: MLPState, x: Array, t: Array) -> Array:
    """Share of ``x`` classified as ``t``, in evaluation mode (running statistics, no update)."""
    return jnp.mean((predict(config, params, state, x) == t).astype(jnp.float32))


def recalibrate(
    config: MLPConfig, params: MLPParams, state: MLPState, batches: Array, key: Array | None = None
) -> MLPState:
    """Precise statistics: every norm layer's running mean and variance set to the equal-weight average of its
    batch statistics over ``batches`` (fvcore's precise BN; PyTorch's ``update_bn`` cumulative average).

    The network runs in training mode (each layer normalised as in training, so layer ``l`` sees the inputs
    training gives it) without taking gradients; the parameters are unchanged. One jitted pass, ``lax.scan``
    over the batches, so memory does not grow with their number. Use it after weight averaging (SWA/EMA),
    pruning or other surgery, or to replace running averages that lag behind training.

    Args:
      config, params, state: the network.
      batches: ``[num_batches, N, input_size]``.
      key: a ``jax.random`` key when the network has dropout (the training-mode forward drops units).

    Returns:
      the new ``MLPState`` (other state fields, e.g. Batch Renorm's update count, are kept).
    """
    config.check()
    batches = jnp.asarray(batches)
    if batches.ndim != 3 or batches.shape[0] < 1 or batches.shape[-1] != config.input_size:
        raise ValueError(f"recalibrate: batches must be [num_batches >= 1, N, {config.input_size}], got shape "
                         f"{batches.shape}")
    if config.dropout_ratio > 0 and key is None:
        raise ValueError("recalibrate: the network has dropout; pass a jax.random key")
    if config.norm is None:
        return state
    _forward(config, params, state, batches[0], False, None)  # structure and shapes, before compiling
    # jit keys on the config: make every field hashable (a list of hidden sizes works everywhere else too).
    config = config._replace(hidden_sizes=tuple(int(h) for h in config.hidden_sizes))
    return _recalibrate(config, params, state, batches, key)


@functools.partial(jax.jit, static_argnums=0)
def _recalibrate(config, params, state, batches, key):
    def body(sums, xs):
        i, xb = xs
        k = None if key is None else jax.random.fold_in(key, i)
        # momentum 0: each layer's new state is its batch statistics.
        _, s, _ = _forward(config, params, state, xb, True, k, {"momentum": 0.0})
        return jax.tree_util.tree_map(lambda acc, new: acc + new, sums,
                                      [(b.mean, b.var) for b in s.batch_norm]), None

    zero = [(jnp.zeros_like(b.mean), jnp.zeros_like(b.var)) for b in state.batch_norm]
    sums, _ = lax.scan(body, zero, (jnp.arange(batches.shape[0]), batches))
    num = batches.shape[0]
    return MLPState(tuple(b._replace(mean=m / num, var=v / num) for b, (m, v) in zip(state.batch_norm, sums)))


def fold(config: MLPConfig, params: MLPParams, state: MLPState) -> tuple[MLPConfig, MLPParams, MLPState]:
    """The same network in evaluation mode without norm layers: each norm folded into the Affine before it.

    Returns:
      ``(config without a norm, params, empty state)`` whose ``apply(..., train=False)`` gives the evaluation
      outputs of the original (to float rounding; see ``layers.fold_batch_norm``). Training the folded network
      is training a network without batch norm.
    """
    config.check()
    norm = config.norm
    plain = config._replace(batch_norm=False)
    # Structure and shapes: a config that disagrees with params and state fails here, not after folding.
    _forward(config, params, state, jnp.zeros((1, config.input_size), params.affine[0].W.dtype), False, None)
    if norm is None:
        return plain, params, MLPState(())
    affine = tuple(layers.fold_batch_norm(a, p, s, norm.eps)
                   for a, p, s in zip(params.affine[:-1], params.batch_norm, state.batch_norm))
    return plain, MLPParams(affine + (params.affine[-1],), ()), MLPState(())


def num_flops(sizes: Any, batch_size: int, *, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Affine layers for one batch, ignoring elementwise work.

    With ``backward`` the weight gradients of every layer and the input gradients of all but the first
    layer are added (the input itself needs no gradient).
    """
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    fwd = 2 * batch_size * sum(macs)
    if not backward:
        return fwd
    return fwd + 2 * batch_size * sum(macs) + 2 * batch_size * sum(macs[1:])
