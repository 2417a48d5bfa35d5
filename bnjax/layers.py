"""Pure-functional layers: Affine, ReLU/Sigmoid, Dropout, SoftmaxWithLoss, and every norm (re-exported).

The names follow ch. 6.3 of Saito's *Deep Learning from Scratch* (``Affine``, ``BatchNorm``, ``Relu``,
``SoftmaxWithLoss``, ``train_flg``), but nothing here is mutated: every layer is an ``*_init`` that builds
parameters (and, for a norm, state) as pytrees of arrays, and an ``*_apply`` that is a pure function.
Stateful layers return ``(out, new_state)`` as in Equinox and Haiku; ``train`` is keyword-only and required
wherever a layer behaves differently in training (docs/conventions.md).

This module is the stable public face. The norms live in ``bnjax.norms`` (one module per idea) and are
re-exported here unchanged: the functional ``batch_norm_init`` / ``batch_norm_apply`` / ``batch_norm_stats``,
norm values (``batch_norm()``, ``book_batch_norm()``, ``batch_renorm()``, ``ghost_batch_norm(k)``,
``group_norm(g)`` and ``layer_norm()`` (no running statistics), the ``Norm`` base class), ``recalibrate`` (precise statistics of one norm layer: ``bnjax.norms.recalibrate_norm``; the
network-wide one is ``bnjax.norms.recalibrate``), ``fold_batch_norm`` / ``fold_conv_batch_norm`` and
``torch_batch_norm_to_bnjax``. Their conventions (``CONVENTIONS``): ``new = momentum * old + (1 - momentum) *
batch`` with momentum 0.9, eps 1e-6, a biased running variance, running statistics starting at mean 0 and
variance 1 (``book_batch_norm()`` starts the variance at 0, as the book).

Inputs: ``x`` may be any array-like JAX accepts; a float64 NumPy array becomes JAX's float32 default unless x64
is enabled. The norms check hyper-parameters whenever their value is known on the host and use traced values
unchecked (see ``bnjax.norms.core``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bnjax.norms import (CONVENTIONS, BatchNorm, BatchNormParams, BatchNormState, BatchRenorm, BatchRenormState,
                         GhostBatchNorm, GroupNorm, GroupNormState, LayerNorm, Norm, batch_norm, batch_norm_apply,
                         batch_norm_init, batch_norm_stats, batch_renorm, batch_statistics_as_state, book_batch_norm,
                         fold_batch_norm, fold_conv_batch_norm, ghost_batch_norm, group_norm, identity_running_var,
                         layer_norm, recalibrate_norm, renorm_schedule, torch_batch_norm_to_bnjax)

Array = jax.Array

# Precise statistics of one norm layer; the network-wide version is bnjax.norms.recalibrate.
recalibrate = recalibrate_norm

__all__ = [
    "AffineParams",
    "affine_init",
    "affine_apply",
    "resolve_init_std",
    "relu",
    "sigmoid",
    "dropout_apply",
    "softmax_cross_entropy",
    # re-exported from bnjax.norms
    "BatchNormParams",
    "BatchNormState",
    "BatchRenormState",
    "CONVENTIONS",
    "batch_norm_init",
    "batch_norm_apply",
    "batch_norm_stats",
    "batch_statistics_as_state",
    "torch_batch_norm_to_bnjax",
    "Norm",
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "GroupNormState",
    "LayerNorm",
    "batch_norm",
    "book_batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "layer_norm",
    "renorm_schedule",
    "recalibrate",
    "recalibrate_norm",
    "fold_batch_norm",
    "fold_conv_batch_norm",
    "identity_running_var",
]


# --------------------------------------------------------------------------------------------------
# Affine
# --------------------------------------------------------------------------------------------------


class AffineParams(NamedTuple):
    """Parameters of ``y = x @ W + b``: ``W`` is ``[num_in, num_out]``, ``b`` is ``[num_out]`` or ``None`` (an
    Affine without bias, e.g. before a norm whose offset takes its place)."""

    W: Array
    b: Array | None


def resolve_init_std(weight_init: Any, fan_in: int) -> Any:
    """The standard deviation of a layer's initial weights under the policy ``weight_init`` (the book's
    ``MultiLayerNetExtend`` policies).

    Args:
      weight_init: a number or array (used as is), or ``'he'``/``'relu'`` (sqrt(2/fan_in)) or
        ``'xavier'``/``'sigmoid'`` (sqrt(1/fan_in)).
      fan_in: number of inputs of the layer.

    Returns:
      the standard deviation (a Python float for a named policy, else ``weight_init`` itself).

    Raises:
      ValueError: an unknown policy name.
    """
    if isinstance(weight_init, str):
        name = weight_init.lower()
        if name in ("he", "relu"):
            return (2.0 / fan_in) ** 0.5
        if name in ("xavier", "sigmoid"):
            return (1.0 / fan_in) ** 0.5
        raise ValueError(
            f"weight_init={weight_init!r}: expected a number, an array, 'he'/'relu' or 'xavier'/'sigmoid'"
        )
    return weight_init


def affine_init(
    key: Array,
    num_in: int,
    num_out: int,
    weight_init: Any = 0.01,
    *,
    weight_scale: Any = 1.0,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
) -> AffineParams:
    """``W = std * normal(key, [num_in, num_out])``, ``b = 0`` (the book's initialisation).

    Args:
      key: a ``jax.random`` key.
      num_in, num_out: sizes, >= 1.
      weight_init: the policy (see ``resolve_init_std``); a number may be a traced scalar, so ``jax.vmap`` over
        scales works.
      weight_scale: a factor on the policy's standard deviation (may be traced); the Python ``1.0`` multiplies
        nothing, so the weights are bit-equal to those without it.
      use_bias: ``False`` gives ``b=None`` (an Affine before a norm, whose offset takes the bias's place).
      dtype: parameter dtype.

    Returns:
      ``AffineParams(W [num_in, num_out], b [num_out] or None)``.

    Raises:
      ValueError: sizes < 1, an unknown policy, or a standard deviation that is not a scalar.
    """
    if num_in < 1 or num_out < 1:
        raise ValueError(f"affine_init: sizes must be positive, got num_in={num_in}, num_out={num_out}")
    std = jnp.asarray(resolve_init_std(weight_init, num_in), dtype)
    if not (type(weight_scale) in (int, float) and weight_scale == 1.0):
        # Only when it is not the Python 1.0: std * 1.0 is exact, but skipping it keeps today's program as is.
        std = std * jnp.asarray(weight_scale, dtype)
    if std.ndim != 0:
        raise ValueError(f"affine_init: weight_init and weight_scale must give a scalar std, got shape {std.shape}")
    W = std * jax.random.normal(key, (num_in, num_out), dtype)
    return AffineParams(W=W, b=jnp.zeros((num_out,), dtype) if use_bias else None)


def affine_apply(params: AffineParams, x: Array) -> Array:
    """``x[..., num_in] -> x @ W + b [..., num_out]`` (``x @ W`` when ``b`` is ``None``).

    Args:
      params: ``AffineParams``.
      x: ``[..., num_in]``.

    Returns:
      ``[..., num_out]``.

    Raises:
      ValueError: ``x``'s last axis is not ``num_in``.
    """
    W, b = params
    if x.ndim < 1 or x.shape[-1] != W.shape[0]:
        raise ValueError(f"affine_apply: x has shape {x.shape}, but W expects {W.shape[0]} input features")
    return x @ W if b is None else x @ W + b


# --------------------------------------------------------------------------------------------------
# Activations, dropout, loss
# --------------------------------------------------------------------------------------------------


def relu(x: Array) -> Array:
    """``max(x, 0)``; gradient 0 at exactly 0, as in the book's ``Relu``.

    Args:
      x: any shape.

    Returns:
      ``max(x, 0)``, of the shape of ``x``.
    """
    return jax.nn.relu(x)


def sigmoid(x: Array) -> Array:
    """``1 / (1 + exp(-x))``.

    Args:
      x: any shape.

    Returns:
      the logistic function of ``x``, of its shape.
    """
    return jax.nn.sigmoid(x)


def dropout_apply(
    x: Array, key: Array | None, dropout_ratio: float, *, train: bool, inverted: bool = True
) -> Array:
    """Dropout with an explicit key.

    Args:
      x: any shape.
      key: a ``jax.random`` key; required when ``train`` and ``dropout_ratio > 0``.
      dropout_ratio: probability of dropping a unit (the book's ``dropout_ratio``), in [0, 1).
      train: apply the random mask (True) or the deterministic evaluation path (False); keyword-only, required.
      inverted: scale kept units by ``1 / (1 - dropout_ratio)`` at training time and do nothing at evaluation
        (the modern convention). ``False`` is the book's: no scaling at training, multiply by
        ``1 - dropout_ratio`` at evaluation. Both have the same expectation.

    Returns:
      an array of the shape and dtype of ``x``.

    Raises:
      ValueError: ``dropout_ratio`` outside [0, 1), or no key when one is needed.
    """
    if not 0.0 <= dropout_ratio < 1.0:
        raise ValueError(f"dropout_apply: dropout_ratio must be in [0, 1), got {dropout_ratio}")
    if dropout_ratio == 0.0:
        return x
    if not train:
        return x if inverted else x * jnp.asarray(1.0 - dropout_ratio, x.dtype)
    if key is None:
        raise ValueError("dropout_apply: a jax.random key is required when train=True and dropout_ratio > 0")
    keep = jax.random.bernoulli(key, 1.0 - dropout_ratio, x.shape)
    kept = x / jnp.asarray(1.0 - dropout_ratio, x.dtype) if inverted else x
    return jnp.where(keep, kept, jnp.zeros_like(x))


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy (the book's ``SoftmaxWithLoss``) with integer labels.

    Uses ``log_softmax``, whose gradient is exactly the book's ``(softmax - onehot) / N``; the book's
    ``log(y + 1e-7)`` only changes the reported loss value for near-certain wrong predictions.

    Args:
      logits: ``[N, K]`` scores.
      labels: ``[N]`` integer class indices in ``[0, K)``.

    Returns:
      the mean loss, a scalar (float32 or wider).

    Raises:
      ValueError: logits not ``[N, K]`` or labels not ``[N]``.
      TypeError: non-integer labels.
    """
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: logits must be [N, K], got shape {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax_cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} != [N]={logits.shape[:1]}")
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
