"""The book's ``MultiLayerNetExtend`` as pure functions.

``Affine -> [BatchNorm] -> activation -> [Dropout]`` for each hidden layer, then ``Affine`` to the scores.
Parameters are an ``MLPParams`` pytree whose *structure* (number of layers, whether batch norm is used, the
activation, the dropout ratio, the batch-norm hyper-parameters) is static metadata, so
``apply(params, state, x, train, key)`` needs no extra configuration, while ``weight_init_std`` may be an
array: ``jax.vmap(lambda s, k: init(k, ..., weight_init_std=s))`` builds a stack of models, one per scale.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from bnjax import layers

Array = jax.Array

__all__ = ["MLPParams", "MLPState", "init", "apply", "loss", "predict", "accuracy", "num_flops"]

_ACTIVATIONS = {"relu": layers.relu, "sigmoid": layers.sigmoid}


@dataclasses.dataclass(frozen=True)
class MLPParams:
    """Trainable parameters; the last four fields are static structure, not leaves.

    Attributes:
      affine: one ``AffineParams`` per layer, hidden layers first, the output layer last.
      batch_norm: one ``BatchNormParams`` per hidden layer, or ``()`` without batch norm.
      activation: ``'relu'`` or ``'sigmoid'``.
      dropout_ratio: 0.0 without dropout.
      bn_momentum, bn_eps: batch-norm hyper-parameters (book: 0.9, 1e-6).
    """

    affine: tuple
    batch_norm: tuple
    activation: str = "relu"
    dropout_ratio: float = 0.0
    bn_momentum: float = layers.CONVENTIONS["momentum"]
    bn_eps: float = layers.CONVENTIONS["eps"]

    @property
    def use_batchnorm(self) -> bool:
        return len(self.batch_norm) > 0


jax.tree_util.register_dataclass(
    MLPParams,
    data_fields=["affine", "batch_norm"],
    meta_fields=["activation", "dropout_ratio", "bn_momentum", "bn_eps"],
)


class MLPState(NamedTuple):
    """Non-trained state: one ``BatchNormState`` per hidden layer (empty without batch norm)."""

    batch_norm: tuple


def init(
    key: Array,
    input_size: int,
    hidden_sizes: Sequence[int],
    output_size: int,
    weight_init_std: Any = "relu",
    activation: str = "relu",
    use_batchnorm: bool = False,
    use_dropout: bool = False,
    dropout_ratio: float = 0.5,
    *,
    bn_momentum: float = layers.CONVENTIONS["momentum"],
    bn_eps: float = layers.CONVENTIONS["eps"],
    bn_init_var: float = layers.CONVENTIONS["init_var"],
    dtype: Any = jnp.float32,
) -> tuple[MLPParams, MLPState]:
    """Initialise the network: ``W = std * normal``, ``b = 0``, gamma = 1, beta = 0, running stats 0.

    Args:
      key: ``jax.random`` key.
      input_size, hidden_sizes, output_size: e.g. 784, [100] * 5, 10 (static).
      weight_init_std: a number or scalar array used for every layer (the book's experiment), or
        ``'he'``/``'relu'``, ``'xavier'``/``'sigmoid'`` for a per-layer ``sqrt(2 / fan_in)``/``sqrt(1 / fan_in)``.
      activation: ``'relu'`` or ``'sigmoid'``.
      use_batchnorm: insert batch norm between each hidden Affine and its activation (static).
      use_dropout, dropout_ratio: dropout after each hidden activation.
      bn_momentum, bn_eps, bn_init_var: batch-norm conventions (see ``bnjax.layers``).
      dtype: parameter dtype.

    Returns:
      ``(params, state)``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: expected one of {sorted(_ACTIVATIONS)}")
    sizes = [int(input_size), *[int(h) for h in hidden_sizes], int(output_size)]
    if any(s < 1 for s in sizes):
        raise ValueError(f"layer sizes must be positive, got {sizes}")
    if use_dropout and not 0.0 < dropout_ratio < 1.0:
        raise ValueError(f"dropout_ratio must be in (0, 1), got {dropout_ratio}")
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
    if use_batchnorm:
        for size in sizes[1:-1]:
            p, s = layers.batch_norm_init(size, init_var=bn_init_var, dtype=dtype)
            bn_params.append(p)
            bn_state.append(s)
    params = MLPParams(
        affine=tuple(affine),
        batch_norm=tuple(bn_params),
        activation=activation,
        dropout_ratio=float(dropout_ratio) if use_dropout else 0.0,
        bn_momentum=float(bn_momentum),
        bn_eps=float(bn_eps),
    )
    return params, MLPState(batch_norm=tuple(bn_state))


def apply(
    params: MLPParams, state: MLPState, x: Array, train: bool = False, key: Array | None = None
) -> tuple[Array, MLPState]:
    """Scores of the network.

    Args:
      params, state: from ``init``.
      x: ``[N, input_size]``.
      train: the book's ``train_flg``: batch statistics + running update + dropout (True), or running
        statistics, no update, no dropout (False).
      key: ``jax.random`` key, needed only for dropout at training time.

    Returns:
      ``(logits [N, output_size], new_state)``.
    """
    if x.ndim != 2:
        raise ValueError(f"model.apply: x must be [N, features], got shape {x.shape}")
    if len(state.batch_norm) != len(params.batch_norm):
        raise ValueError("model.apply: state and params disagree on batch norm (use the pair init returned)")
    act = _ACTIVATIONS[params.activation]
    hidden = params.affine[:-1]
    keys = (
        jax.random.split(key, len(hidden))
        if (train and params.dropout_ratio > 0.0 and key is not None)
        else [None] * len(hidden)
    )
    new_bn = []
    h = x
    for i, aff in enumerate(hidden):
        h = layers.affine_apply(aff, h)
        if params.use_batchnorm:
            h, s = layers.batch_norm_apply(
                params.batch_norm[i], state.batch_norm[i], h, train,
                momentum=params.bn_momentum, eps=params.bn_eps,
            )
            new_bn.append(s)
        h = act(h)
        if params.dropout_ratio > 0.0:
            h = layers.dropout_apply(h, keys[i], params.dropout_ratio, train)
    logits = layers.affine_apply(params.affine[-1], h)
    return logits, MLPState(batch_norm=tuple(new_bn))


def loss(
    params: MLPParams,
    state: MLPState,
    x: Array,
    t: Array,
    train: bool = True,
    key: Array | None = None,
    weight_decay_lambda: float | Array = 0.0,
) -> tuple[Array, MLPState]:
    """Softmax cross-entropy plus ``lambda / 2 * sum(W ** 2)`` over every Affine weight (the book's).

    Returns ``(loss, new_state)``: use ``jax.value_and_grad(loss, has_aux=True)``.
    """
    logits, new_state = apply(params, state, x, train, key)
    value = layers.softmax_cross_entropy(logits, t)
    decay = sum(jnp.sum(jnp.square(a.W)) for a in params.affine)
    return value + 0.5 * weight_decay_lambda * decay, new_state


def predict(params: MLPParams, state: MLPState, x: Array) -> Array:
    """Predicted classes ``[N]`` in evaluation mode; a row with a NaN score counts as the first NaN's class
    (class 0 for an all-NaN row), as NumPy's argmax does in the book."""
    logits, _ = apply(params, state, x, train=False)
    return jnp.argmax(logits, axis=-1)


def accuracy(params: MLPParams, state: MLPState, x: Array, t: Array) -> Array:
    """Share of ``x`` classified as ``t``, in evaluation mode (running statistics, no update)."""
    return jnp.mean((predict(params, state, x) == t).astype(jnp.float32))


def num_flops(sizes: Sequence[int], batch_size: int, *, backward: bool = False) -> int:
    """Multiply-add FLOPs (2 per MAC) of the Affine layers for one batch, ignoring elementwise work.

    With ``backward`` the weight gradients of every layer and the input gradients of all but the first
    layer are added (the input itself needs no gradient).
    """
    macs = [a * b for a, b in zip(sizes[:-1], sizes[1:])]
    fwd = 2 * batch_size * sum(macs)
    if not backward:
        return fwd
    return fwd + 2 * batch_size * sum(macs) + 2 * batch_size * sum(macs[1:])
