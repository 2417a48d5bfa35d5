"""What the linen and NNX adapters share (private): the flag and axis checks, Flax's mask turned into bnjax's,
the dtypes, the bnjax norm value built from a module's options, and the one call of its ``apply``.

Nothing here computes a statistic or normalises: the norm value's ``apply`` does (bnjax/norms/).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import layers

Array = jax.Array

# The state fields each family keeps in Flax's ``batch_stats`` collection (linen) or as ``nnx.BatchStat``s.
STAT_NAMES = ("mean", "var")
RENORM_STAT_NAMES = ("mean", "var", "step")


def check_train_flag(value: Any, who: str) -> bool:
    """``use_running_average`` after merging attribute and call argument: a Python bool.

    Raises:
      ValueError: neither the attribute nor the call gave it.
      TypeError: anything else than a bool, a traced value included (it chooses the program).
    """
    if value is None:
        raise ValueError(f"{who}: use_running_average is not set: give it to the constructor or the call "
                         "(False to train with batch statistics, True to evaluate with the running ones)")
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{who}: use_running_average must be a Python bool, got a traced value ({value!r}); it "
                        "chooses the program, so make it static (jax.jit(..., static_argnames=...)) or set it on "
                        "the module")
    raise TypeError(f"{who}: use_running_average must be a Python bool, got {value!r} of type "
                    f"{type(value).__name__}")


def as_float_input(x: Any, who: str) -> Array:
    """``x`` as a floating-point JAX array (a TypeError naming ``who`` otherwise)."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}")
    return x


def feature_axes(ndim: int, axis: Any, who: str) -> tuple[int, ...]:
    """Flax's ``axis`` (an int or a sequence of ints) as sorted non-negative axes of an input of rank ``ndim``."""
    axes = (axis,) if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) else axis
    try:
        axes = tuple(axes)
    except TypeError:
        axes = None
    if not axes or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in axes):
        raise TypeError(f"{who}: axis must be an int or a non-empty sequence of ints, got {axis!r}")
    out = sorted({int(a) % ndim for a in axes if -ndim <= a < ndim})
    if len(out) != len(axes):
        raise ValueError(f"{who}: axis={axis!r} is out of range or repeats an axis for x of rank {ndim}")
    return tuple(out)


def check_shape(name: str, value: Any, feature_shape: tuple[int, ...], x_shape: tuple[int, ...],
                faxes: tuple[int, ...], where: str, who: str) -> None:
    """A stored parameter or running statistic must have the features' shape of this ``x`` (a checkpoint of
    another layer size is refused by name, not broadcast)."""
    shape = tuple(np.shape(value))
    if shape != tuple(feature_shape):
        raise ValueError(f"{who}: {where} '{name}' has shape {shape}, but x {tuple(x_shape)} has {feature_shape} "
                         f"features on axis {faxes if len(faxes) > 1 else faxes[0]}; these variables belong to a "
                         "layer of another size (build them with this model's init)")


def convert_mask(mask: Any, x_shape: tuple[int, ...], faxes: tuple[int, ...],
                 who: str) -> tuple[Array | None, tuple[int, ...] | None]:
    """Flax's ``mask`` (broadcastable to ``x``, True where a value counts) as bnjax's (over the leading non-feature
    axes), and the transpose that brings ``x``'s feature axes last when the mask needs it.

    A mask constant over the feature axes is the same selection of rows in both conventions. One whose values
    differ across features (each feature with its own rows) has no bnjax equivalent and is refused; under a
    transformation its values are unknown, so a mask of more than one element along a feature axis is refused
    there (give it size 1 on those axes).

    Returns:
      ``(mask, perm)``: the bnjax mask (boolean, of ``x``'s shape on its leading non-feature axes; a scalar when
      every axis of ``x`` is a feature axis) and ``None``, or a permutation of ``x``'s axes (non-feature axes
      first, in order) under which the mask covers the leading axes.
    """
    if mask is None:
        return None, None
    ndim = len(x_shape)
    try:
        m = mask if isinstance(mask, jax.Array) else jnp.asarray(mask)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{who}: mask must be a boolean array broadcastable to x, got {type(mask).__name__}") from err
    shape = tuple(m.shape)
    full = (1,) * (ndim - len(shape)) + shape
    if len(shape) > ndim or any(s not in (1, n) for s, n in zip(full, x_shape)):
        raise ValueError(f"{who}: mask of shape {shape} does not broadcast to x {tuple(x_shape)}: Flax's mask lines "
                         "up with x from the right (for one flag per row of an [N, C] input use mask[:, None])")
    m = m.astype(bool).reshape(full)
    per_feature = [a for a in faxes if full[a] != 1]
    if per_feature:
        if isinstance(m, jax.core.Tracer):
            raise ValueError(f"{who}: mask of shape {shape} has one value per feature on axis {per_feature[0]} and "
                             "is traced, so it cannot be checked to select the same rows for every feature: give "
                             "it size 1 on the feature axes (e.g. mask[..., :1])")
        arr = np.asarray(m)
        if not all(np.array_equal(arr, np.broadcast_to(np.take(arr, [0], axis=a), arr.shape)) for a in per_feature):
            raise ValueError(f"{who}: mask of shape {shape} selects different rows for different features; bnjax "
                             "masks whole rows (one flag per position of the non-feature axes, the same for every "
                             "feature): make it constant over the feature axes")
        m = m[tuple(slice(0, 1) if a in per_feature else slice(None) for a in range(ndim))]
    red = [a for a in range(ndim) if a not in faxes]
    if not red:  # one example per call (a per-example vmap with axis_name): this example's own flag
        return m.reshape(()), None
    varying = [i for i, a in enumerate(red) if full[a] != 1]
    k = max(varying, default=0) + 1  # the mask must cover red[:k]
    perm = None
    if tuple(red[:k]) != tuple(range(k)):
        perm = tuple(red) + tuple(faxes)
        m, x_shape = jnp.transpose(m, perm), tuple(x_shape[a] for a in perm)
    lead = tuple(x_shape[:k])
    return jnp.broadcast_to(m, lead + (1,) * (ndim - k)).reshape(lead), perm


def norm_value(kind: str, **opts: Any) -> layers.Norm:
    """The bnjax norm value a module's options describe (``kind``: batch, renorm, ghost, group, layer)."""
    scale, offset = opts["use_scale"], opts["use_bias"]
    if kind == "batch":
        return layers.batch_norm(opts["momentum"], opts["epsilon"], use_scale=scale, use_offset=offset)
    if kind == "renorm":
        return layers.batch_renorm(opts["momentum"], opts["epsilon"], r_max=opts["r_max"], d_max=opts["d_max"],
                                   warmup=opts["warmup"], running_average=opts["running_average"],
                                   use_scale=scale, use_offset=offset)
    if kind == "ghost":
        return layers.ghost_batch_norm(opts["virtual_batch_size"], opts["momentum"], opts["epsilon"],
                                       use_scale=scale, use_offset=offset)
    if kind == "group":
        return layers.group_norm(opts["num_groups"], eps=opts["epsilon"], use_scale=scale, use_offset=offset)
    return layers.layer_norm(eps=opts["epsilon"], use_scale=scale, use_offset=offset)


def apply_norm(norm: layers.Norm, params: Any, state: Any, x: Array, *, train: bool, faxes: tuple[int, ...],
               axis_name: Any, mask: Any, dtype: Any, who: str) -> tuple[Array, Any]:
    """``norm.apply`` with Flax's conventions around it: the input cast to the promotion of its dtype and the
    parameters' (bf16 input with float32 parameters is normalised in float32, as Flax does), Flax's mask
    converted, the output in ``dtype`` (``None``: that promotion, Flax's rule)."""
    present = [p for p in (params.gamma, params.beta) if p is not None]
    compute = jnp.result_type(x, *present)
    out = compute if dtype is None else jnp.dtype(dtype)
    x = x.astype(compute)
    has_stats = norm.has_running_stats
    if not has_stats:  # group / layer norm: statistics per example; a mask flags whole examples
        faxes = tuple(range(1, x.ndim))
    bn_mask, perm = convert_mask(mask, x.shape, faxes, who)
    if perm is not None:
        x = jnp.transpose(x, perm)
        faxes = tuple(range(x.ndim - len(faxes), x.ndim))
    kwargs = {"feature_axes": faxes} if has_stats else {}
    y, new_state = norm.apply(params, state, x, train=train, mask=bn_mask, axis_name=axis_name, **kwargs)
    if perm is not None:
        y = jnp.transpose(y, np.argsort(perm))
    return y.astype(out), new_state


def init_output(norm: layers.Norm, params: Any, state: Any, x: Array, *, faxes: tuple[int, ...], dtype: Any,
                who: str) -> Array:
    """The output a linen module returns while initialising: evaluation mode with the starting statistics, on
    this device only (the ``axis_name`` need not be bound yet), for a one-example input as well."""
    if x.ndim == len(faxes):  # one example (a per-example vmap): give it a batch axis of one row
        y = init_output(norm, params, state, x[None], faxes=tuple(a + 1 for a in faxes), dtype=dtype, who=who)
        return y[0]
    return apply_norm(norm, params, state, x, train=False, faxes=faxes, axis_name=None, mask=None, dtype=dtype,
                      who=who)[0]


def feature_shape(x_shape: Sequence[int], faxes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the parameters and running statistics: ``x``'s sizes on the feature axes."""
    return tuple(int(x_shape[a]) for a in faxes)


def num_features_shape(num_features: Any, who: str) -> tuple[int, ...]:
    """NNX's ``num_features`` (an int, or a tuple for several feature axes) as a shape."""
    if isinstance(num_features, (int, np.integer)) and not isinstance(num_features, bool):
        shape = (int(num_features),)
    else:
        try:
            shape = tuple(int(s) for s in num_features)
        except (TypeError, ValueError):
            shape = ()
    if not shape or any(s < 1 for s in shape) or math.prod(shape) < 1:
        raise ValueError(f"{who}: num_features must be a positive int (or a tuple of them), got {num_features!r}")
    return shape
