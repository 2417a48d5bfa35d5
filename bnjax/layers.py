"""Pure-functional layers: Affine, BatchNorm, ReLU/Sigmoid, Dropout, SoftmaxWithLoss.

The names follow ch. 6.3 of Saito's *Deep Learning from Scratch* (``Affine``, ``BatchNorm``, ``Relu``,
``SoftmaxWithLoss``, ``train_flg``), but nothing here is mutated: every layer is an ``*_init`` that builds
parameters (and, for batch norm, state) as pytrees of arrays, and an ``*_apply`` that is a pure function.
Stateful layers return ``(out, new_state)`` as in Equinox and Haiku.

Norms are also values (``batch_norm(...)``, ``batch_renorm(...)``, ``ghost_batch_norm(k)``): frozen, hashable
objects with ``init(num_features) -> (params, state)`` and ``apply(params, state, x, train, **kw) -> (y,
new_state)``, which ``model.MLPConfig`` and ``sweep.Arm`` accept in place of ``batch_norm=True``; around them,
``recalibrate`` (precise statistics) and ``fold_batch_norm`` / ``fold_conv_batch_norm`` (inference folding).

Batch-norm conventions (see ``CONVENTIONS`` and the README for the side-by-side table):

* ``momentum`` multiplies the *old* running value: ``new = momentum * old + (1 - momentum) * batch``,
  default 0.9 (the book's and Flax's side; PyTorch's ``momentum=0.1`` is our 0.9).
* Running variance is the biased batch variance by default (the book, Flax); pass
  ``unbiased_running_var=True`` for the ``n / (n - 1)`` correction that PyTorch stores.
  Normalisation always uses the biased batch variance.
* ``eps`` defaults to the book's ``1e-6`` (the book writes ``10e-7``); Flax and PyTorch use ``1e-5``.
* Running statistics start at mean 0 and variance 0 (the book); Flax and PyTorch start the variance at 1
  (``batch_norm_init(..., init_var=1.0)``).

Inputs and validation: ``x`` may be any array-like JAX accepts (a list, a NumPy array); it goes through
``jnp.asarray``, so a float64 NumPy array becomes JAX's float32 default, without a warning, unless x64 is
enabled. Hyper-parameters are checked whenever their value is known on the host (a Python or NumPy number,
or a JAX array outside a transformation): ``momentum`` in [0, 1], ``eps`` finite and > 0, ``mask`` boolean
or 0/1. Values traced by ``jit``/``vmap``/``grad`` are used as they are, unchecked, so momentum schedules
and ensembles over momenta need no host round trip. The flags ``train``, ``use_batch_stats``,
``update_stats``, ``unbiased_running_var`` (and ``use_scale``/``use_offset`` of ``batch_norm_init``) choose
the program and must be Python bools; running statistics must be floating point.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array

__all__ = [
    "AffineParams",
    "BatchNormParams",
    "BatchNormState",
    "CONVENTIONS",
    "affine_init",
    "affine_apply",
    "resolve_init_std",
    "batch_norm_init",
    "batch_norm_apply",
    "batch_norm_stats",
    "relu",
    "sigmoid",
    "dropout_apply",
    "softmax_cross_entropy",
    "torch_batch_norm_to_bnjax",
    "Norm",
    "BatchNorm",
    "BatchRenorm",
    "BatchRenormState",
    "GhostBatchNorm",
    "batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "renorm_schedule",
    "recalibrate",
    "fold_batch_norm",
    "fold_conv_batch_norm",
]

# Module-level so docs, tests and users can read the defaults from one place.
CONVENTIONS = {
    "momentum": 0.9,  # new = momentum * old + (1 - momentum) * batch
    "eps": 1e-6,  # the book's 10e-7
    "running_var": "biased",
    "init_mean": 0.0,
    "init_var": 0.0,
}


# --------------------------------------------------------------------------------------------------
# Affine
# --------------------------------------------------------------------------------------------------


class AffineParams(NamedTuple):
    """Parameters of ``y = x @ W + b``: ``W`` is ``[num_in, num_out]``, ``b`` is ``[num_out]``."""

    W: Array
    b: Array


def resolve_init_std(weight_init_std: Any, fan_in: int) -> Any:
    """The standard deviation the book's ``MultiLayerNetExtend`` uses for a layer with ``fan_in`` inputs.

    Args:
      weight_init_std: a number or array (used as is), or ``'he'``/``'relu'`` (sqrt(2/fan_in)) or
        ``'xavier'``/``'sigmoid'`` (sqrt(1/fan_in)).
      fan_in: number of inputs of the layer.
    """
    if isinstance(weight_init_std, str):
        name = weight_init_std.lower()
        if name in ("he", "relu"):
            return (2.0 / fan_in) ** 0.5
        if name in ("xavier", "sigmoid"):
            return (1.0 / fan_in) ** 0.5
        raise ValueError(
            f"weight_init_std={weight_init_std!r}: expected a number, an array, 'he'/'relu' or "
            "'xavier'/'sigmoid'"
        )
    return weight_init_std


def affine_init(
    key: Array,
    num_in: int,
    num_out: int,
    weight_init_std: Any = 0.01,
    dtype: Any = jnp.float32,
) -> AffineParams:
    """``W = std * normal(key, [num_in, num_out])``, ``b = 0`` (the book's initialisation).

    ``weight_init_std`` may be a traced scalar, so ``jax.vmap`` over scales works.
    """
    if num_in < 1 or num_out < 1:
        raise ValueError(f"affine_init: sizes must be positive, got num_in={num_in}, num_out={num_out}")
    std = jnp.asarray(resolve_init_std(weight_init_std, num_in), dtype)
    if std.ndim != 0:
        raise ValueError(f"affine_init: weight_init_std must be a scalar, got shape {std.shape}")
    W = std * jax.random.normal(key, (num_in, num_out), dtype)
    return AffineParams(W=W, b=jnp.zeros((num_out,), dtype))


def affine_apply(params: AffineParams, x: Array) -> Array:
    """``x[..., num_in] -> x @ W + b [..., num_out]``."""
    W, b = params
    if x.ndim < 1 or x.shape[-1] != W.shape[0]:
        raise ValueError(f"affine_apply: x has shape {x.shape}, but W expects {W.shape[0]} input features")
    return x @ W + b


# --------------------------------------------------------------------------------------------------
# Batch normalisation
# --------------------------------------------------------------------------------------------------


class BatchNormParams(NamedTuple):
    """Learned scale and offset (``None`` when disabled), each of the feature shape."""

    gamma: Array | None
    beta: Array | None


class BatchNormState(NamedTuple):
    """Running statistics, each of the feature shape. Not trained: thread it through ``apply``."""

    mean: Array
    var: Array


# Validation. Concrete values (Python/NumPy numbers, JAX arrays outside a transformation) are checked on the
# host; tracers are passed through unchecked, so jit/vmap/grad over hyper-parameters never syncs or raises.


def _is_concrete(value: Any) -> bool:
    """False for a JAX tracer (a value inside ``jit``/``vmap``/``grad``), whose value is unknown here."""
    return not isinstance(value, jax.core.Tracer)


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _check_flag(value: Any, name: str, who: str, *, allow_none: bool = False) -> bool | None:
    """A static flag: a Python bool (or NumPy bool_); ``None`` where the argument has a default rule."""
    if value is None and allow_none:
        return None
    if _is_bool(value):
        return bool(value)
    hint = ""
    if not _is_concrete(value):
        hint = ("; it chooses the program, so it cannot be traced: make it static "
                "(jax.jit(..., static_argnames=...)) or use lax.cond on the outputs")
    expected = "a Python bool or None" if allow_none else "a Python bool"
    raise TypeError(f"{who}: {name} must be {expected}, got {value!r} of type {type(value).__name__}{hint}")


def _real_values(value: Any, name: str, who: str) -> np.ndarray | None:
    """The concrete value of a real hyper-parameter as float64 NumPy, or None when it is traced."""
    if not _is_concrete(value):
        return None
    try:
        arr = np.asarray(value)
    except Exception as err:  # e.g. a list holding tracers
        raise TypeError(f"{who}: {name} must be a real number or array, got {type(value).__name__}") from err
    # Rejects bools (not a NumPy integer), strings, None and other objects.
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{who}: {name} must be a real number, got {value!r} of type {type(value).__name__}")
    return arr.astype(np.float64)


def _check_hyper(momentum: Any, eps: Any, who: str) -> None:
    """``momentum`` in [0, 1] and ``eps`` finite and > 0, where concrete (see the module docstring)."""
    m = _real_values(momentum, "momentum", who)
    e = _real_values(eps, "eps", who)
    for name, arr in (("momentum", m), ("eps", e)):
        # A scalar, or one value per feature; more dimensions would broadcast the running statistics to a new shape.
        if arr is not None and arr.ndim > 1:
            raise ValueError(f"{who}: {name} must be a scalar or one value per feature (vmap over a stack for "
                             f"several), got shape {arr.shape}")
    if m is not None and not np.all((m >= 0.0) & (m <= 1.0)):  # NaN fails both comparisons
        raise ValueError(
            f"{who}: momentum must be in [0, 1] (new = momentum * old + (1 - momentum) * batch), got {momentum!r}"
        )
    # eps = 0 would turn a constant feature (variance 0) into 0/0 = NaN; the statistics are float32, so eps must
    # survive the cast (1e-320 would become 0, 1e300 inf).
    tiny, big = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    if e is not None and not np.all((e >= tiny) & (e <= big)):
        raise ValueError(f"{who}: eps must be > 0 and within float32's range {tiny:.3g}..{big:.3g} (it is added "
                         f"to the variance), got {eps!r}")


def _as_input(x: Any, who: str) -> Array:
    """``x`` as a JAX array. NumPy float64 becomes the float32 default quietly when x64 is off.

    ``jnp.asarray`` canonicalises float64 to float32 without a warning (JAX warns only when float64 is
    *requested*, as ``promote_types(float64, float32)`` on a raw NumPy input used to do below).
    """
    if isinstance(x, jax.Array):  # includes tracers
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{who}: x must be an array-like of numbers, got {type(x).__name__}: {err}") from err


def _check_mask(mask: Any, x: Array, red_axes: tuple[int, ...], who: str) -> Array:
    """A boolean or 0/1 mask over the leading non-feature axes of ``x``; the values are checked if concrete."""
    dtype = getattr(mask, "dtype", None)
    if dtype is None or not isinstance(mask, (jax.Array, np.ndarray)):
        try:
            mask = np.asarray(mask)
        except Exception as err:
            raise TypeError(f"{who}: mask must be a boolean or 0/1 array, got {type(mask).__name__}") from err
        dtype = mask.dtype
    if dtype != bool and not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{who}: mask must be a boolean or 0/1 array, got dtype {dtype}")
    shape = tuple(np.shape(mask))
    ndim = len(shape)
    if ndim == 0 or ndim > len(red_axes) or tuple(red_axes[:ndim]) != tuple(range(ndim)):
        raise ValueError(
            f"{who}: mask of shape {shape} must cover the leading non-feature axes of x {tuple(x.shape)} "
            f"(non-feature axes {red_axes}; e.g. a mask of shape {tuple(x.shape[:1])} for rows)"
        )
    if shape != tuple(x.shape[:ndim]):
        raise ValueError(
            f"{who}: mask shape {shape} does not match the leading axes {tuple(x.shape[:ndim])} of x {tuple(x.shape)}"
        )
    if dtype != bool and _is_concrete(mask):
        values = np.asarray(mask)
        if not np.all((values == 0) | (values == 1)):  # NaN fails too
            bad = values[~((values == 0) | (values == 1))].ravel()[:3]
            raise ValueError(f"{who}: a numeric mask must hold only 0 and 1 (1 = valid row), got values {bad.tolist()}")
    return jnp.asarray(mask)


def batch_norm_init(
    num_features: int | Sequence[int],
    *,
    use_scale: bool = True,
    use_offset: bool = True,
    init_mean: float = CONVENTIONS["init_mean"],
    init_var: float = CONVENTIONS["init_var"],
    dtype: Any = jnp.float32,
) -> tuple[BatchNormParams, BatchNormState]:
    """Parameters (gamma=1, beta=0) and running state for ``num_features`` features.

    Args:
      num_features: feature size ``C``, or a shape tuple when ``feature_axes`` names several axes.
      use_scale, use_offset: learn gamma / beta (otherwise the field is ``None``); Python bools.
      init_mean, init_var: initial running statistics; the book uses 0 and 0, Flax and PyTorch 0 and 1.
        Checked when concrete: finite, and ``init_var >= 0``.
      dtype: parameter dtype, floating point. Running statistics are always float32 (float64 under x64 with
        a float64 ``dtype``) because they are accumulated in full precision.
    """
    who = "batch_norm_init"
    use_scale = _check_flag(use_scale, "use_scale", who)
    use_offset = _check_flag(use_offset, "use_offset", who)

    shape = _int_tuple(num_features)
    if shape is None:
        raise TypeError(f"{who}: num_features must be an int or a tuple of ints, got {num_features!r}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"batch_norm_init: num_features must be positive, got {num_features!r}")
    try:
        floating = jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{who}: dtype must be a floating-point dtype, got {dtype!r}")
    for name, value in (("init_mean", init_mean), ("init_var", init_var)):
        v = _real_values(value, name, who)
        if v is not None and not np.all(np.isfinite(v) & ((v >= 0.0) if name == "init_var" else True)):
            raise ValueError(f"{who}: {name} must be finite{' and >= 0' if name == 'init_var' else ''}, got {value!r}")
    stat_dtype = jnp.promote_types(dtype, jnp.float32)
    params = BatchNormParams(
        gamma=jnp.ones(shape, dtype) if use_scale else None,
        beta=jnp.zeros(shape, dtype) if use_offset else None,
    )
    state = BatchNormState(mean=jnp.full(shape, init_mean, stat_dtype), var=jnp.full(shape, init_var, stat_dtype))
    return params, state


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    """An int (Python or NumPy, not a bool) or an iterable of them as a tuple of ints; ``None`` if neither."""
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not _is_bool(v)

    if is_int(value):
        return (int(value),)
    try:
        items = tuple(value)
    except TypeError:
        return None
    return tuple(int(v) for v in items) if all(is_int(v) for v in items) else None


def _feature_axes(ndim: int, feature_axes: int | Sequence[int]) -> tuple[int, ...]:
    axes = _int_tuple(feature_axes)
    if not axes:
        raise TypeError(f"batch_norm: feature_axes must be an int or a non-empty tuple of ints, got "
                        f"{feature_axes!r}")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"batch_norm: feature axis {a} is out of range for an input of rank {ndim}")
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"batch_norm: feature_axes {feature_axes!r} repeat an axis")
    return tuple(sorted(out))


def _check_input(x: Array, feature_axes: int | Sequence[int], who: str) -> tuple[int, ...]:
    """Floating point, rank >= 2; returns the sorted, non-negative feature axes."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{who}: x must have a batch axis and a feature axis (rank >= 2), got shape {x.shape}")
    return _feature_axes(x.ndim, feature_axes)


def _psum(x: Any, axis_name: Any) -> Any:
    try:
        return lax.psum(x, axis_name)
    except NameError as err:  # jax's message talks about shard_map; say what the user can do.
        raise ValueError(
            f"batch_norm: axis_name={axis_name!r} is not bound. Call batch_norm_apply inside "
            f"jax.vmap(..., axis_name={axis_name!r}), pmap or shard_map with that axis name, "
            "or pass axis_name=None for per-device statistics."
        ) from err


def batch_norm_stats(
    x: Array,
    *,
    feature_axes: int | Sequence[int] = -1,
    axis_name: Any = None,
    mask: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Batch mean, biased variance and count of ``x``, reduced over all non-feature axes.

    Statistics are computed in float32 (float64 for float64 input) whatever the input dtype. The variance is
    two-pass (centred): the mean is reduced first, then the mean squared deviation from it. With
    ``axis_name`` the *sums* (of x, of the weights, of squared deviations) are ``psum``-ed, so the result is
    exactly the statistics of the concatenated batch, also when shards or masks have unequal sizes.

    Args:
      x: ``[N, C]``, ``[N, H, W, C]``, ... (any rank >= 2), floating point; any array-like (see the module
        docstring for NumPy float64).
      feature_axes: axis or axes that hold features (kept); all others are reduced.
      axis_name: a bound ``vmap``/``pmap``/``shard_map`` axis to reduce across, or ``None``.
      mask: optional boolean/0-1 array over the leading non-feature axes (``[N]`` for rows), True = valid.

    Returns:
      ``(mean, var, count)``: mean and var of the feature shape, ``count`` a scalar (global with axis_name).
    """
    who = "batch_norm_stats"
    x = _as_input(x, who)
    faxes = _check_input(x, feature_axes, who)
    red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
    if mask is not None:
        mask = _check_mask(mask, x, red_axes, who)
    return _batch_stats(x, faxes, axis_name, mask)


def _batch_stats(x: Array, faxes: tuple[int, ...], axis_name: Any, mask: Array | None) -> tuple[Array, Array, Array]:
    """``batch_norm_stats`` on a checked input and mask."""
    red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
    if not red_axes:
        raise ValueError(f"batch_norm: every axis of x {x.shape} is a feature axis; nothing to reduce over")
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stat_dtype)

    if mask is None:
        weight = None
        local_count = jnp.asarray(float(math.prod(x.shape[a] for a in red_axes)), stat_dtype)
    else:
        weight = mask.astype(stat_dtype).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        # Rows not covered by the mask (e.g. H, W of an NHWC input) count once per element.
        local_count = jnp.sum(weight) * float(math.prod(x.shape[a] for a in red_axes[mask.ndim :]))

    def wsum(v: Array) -> Array:
        if weight is not None:
            v = v * weight
        return jnp.sum(v, axis=red_axes, keepdims=True)

    total, count = wsum(xs), local_count
    if axis_name is not None:
        total, count = _psum((total, count), axis_name)
    # A fully masked batch has count 0; divide by 1 instead and let the caller skip the update.
    safe_count = jnp.maximum(count, 1.0)
    mean = total / safe_count
    # var = E[(x - c)^2] - (E[x] - c)^2 holds for any constant c; with c = stop_gradient(mean) the second term is
    # 0 in value and in first derivative, so the backward pass skips a reduction that would sum to zero (~5% of a
    # conv layer's fwd + bwd), while second and higher derivatives stay exact (the term restores them).
    centre = lax.stop_gradient(mean)
    sq = wsum(jnp.square(xs - centre))
    if axis_name is not None:
        sq = _psum(sq, axis_name)
    var = jnp.maximum(sq / safe_count - jnp.square(mean - centre), 0.0)
    return jnp.squeeze(mean, red_axes), jnp.squeeze(var, red_axes), count


def _running_update(state: Any, mean: Array, var: Array, count: Array, momentum: Any) -> tuple[Array, Array, Array]:
    """``momentum * old + (1 - momentum) * batch`` for the running mean and variance, in the state's dtype; the
    old values where the batch had no valid row (an all-masked batch carries no information).

    Returns ``(new_mean, new_var, has_rows)``.
    """
    m = jnp.asarray(momentum, state.mean.dtype)
    has_rows = count > 0
    new_mean = m * state.mean + (1 - m) * mean.astype(state.mean.dtype)
    new_var = m * state.var + (1 - m) * var.astype(state.var.dtype)
    return jnp.where(has_rows, new_mean, state.mean), jnp.where(has_rows, new_var, state.var), has_rows


def _start_apply(norm: Any, params: Any, state: Any, x: Any, train: Any, update_stats: Any, momentum: Any,
                 feature_axes: Any, mask: Any, who: str):
    """The checks a norm value's ``apply`` begins with: the flags (``update_stats`` defaults to ``train``), the
    momentum (the value's unless given), the input and mask. Returns ``(train, update_stats, momentum, x,
    feature axes, mask)``."""
    train = _check_flag(train, "train", who)
    update_stats = _check_flag(update_stats, "update_stats", who, allow_none=True)
    update_stats = train if update_stats is None else update_stats
    momentum = norm.momentum if momentum is None else momentum
    _check_hyper(momentum, norm.eps, who)
    x, faxes, mask = _prepare(params, state, x, feature_axes, mask, who)
    return train, update_stats, momentum, x, faxes, mask


def _normalize(x, mean, var, gamma, beta, eps, faxes, r=None, d=None):
    """The one normalisation every norm uses in training and evaluation, so equal statistics give bit-equal
    outputs: ``gamma * ((x - mean) / sqrt(var + eps) * r + d) + beta``, ``r`` and ``d`` (Batch Renorm's
    corrections) omitted when ``None``; with ``r = 1``, ``d = 0`` the result is bit-equal to omitting them."""
    stat_dtype = mean.dtype

    def expand(v):
        # [feature shape] -> broadcastable against x.
        shape = [1] * x.ndim
        for a, s in zip(faxes, v.shape):
            shape[a] = s
        return v.reshape(shape)

    scale = lax.rsqrt(var + jnp.asarray(eps, stat_dtype))
    if r is not None:
        scale = scale * r
    if gamma is not None:
        scale = scale * gamma.astype(stat_dtype)
    offset = None if beta is None else beta.astype(stat_dtype)
    if d is not None:
        shift = d if gamma is None else gamma.astype(stat_dtype) * d
        offset = shift if offset is None else offset + shift
    # x * scale + (offset - mean * scale): one multiply-add per element, and a backward pass without the
    # broadcast mean (~20% faster fwd + bwd than (x - mean) * scale + offset on a CPU). The rounding is that of
    # x itself: at |mean| / std = 1e4 in float32 both forms are off by ~1e-3, the spacing of float32 there.
    # One case differs: a feature that is constant in the batch (variance << eps) gives beta exactly with
    # (x - mean) * scale when the mean rounds to x, and beta to within the float32 spacing of |mean| * scale
    # here (~0.1 at |x| = 1e4, eps = 1e-6; 0 for x = 0).
    shift = -mean * scale if offset is None else offset - mean * scale
    y = x.astype(stat_dtype) * expand(scale) + expand(shift)
    return y.astype(x.dtype)



def _check_state(state: Any, who: str) -> None:
    """Batch norm and Ghost BN keep (mean, var); a Batch Renorm state would lose its update count here."""
    if isinstance(state, BatchRenormState):
        raise TypeError(f"{who}: got a BatchRenormState (from batch_renorm(...).init); this norm keeps a "
                        "BatchNormState (mean, var): build the state with this norm's init")


def _prepare(params: Any, state: Any, x: Any, feature_axes: Any, mask: Any, who: str):
    """The input checks every norm's ``apply`` makes: returns ``(x, feature axes, mask)``."""
    x = _as_input(x, who)
    faxes = _check_input(x, feature_axes, who)
    feature_shape = tuple(x.shape[a] for a in faxes)
    for name, v in (("gamma", params.gamma), ("beta", params.beta), ("running mean", state.mean),
                    ("running var", state.var)):
        if v is not None and tuple(v.shape) != feature_shape:
            raise ValueError(
                f"{who}: {name} has shape {tuple(v.shape)} but x {tuple(x.shape)} has features "
                f"{feature_shape} on axes {faxes}; no broadcasting is done"
            )
    for name, v in (("running mean", state.mean), ("running var", state.var)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(
                f"{who}: running statistics must be floating point, but state {name} has dtype {v.dtype} "
                "(an integer state would truncate every update); build it with the norm's init"
            )
    if mask is not None:
        red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
        mask = _check_mask(mask, x, red_axes, who)
    return x, faxes, mask


def batch_norm_apply(
    params: BatchNormParams,
    state: BatchNormState,
    x: Array,
    train: bool = True,
    *,
    use_batch_stats: bool | None = None,
    update_stats: bool | None = None,
    momentum: float | Array = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    feature_axes: int | Sequence[int] = -1,
    axis_name: Any = None,
    mask: Array | None = None,
    unbiased_running_var: bool = False,
) -> tuple[Array, BatchNormState]:
    """Batch normalisation ``y = gamma * (x - mu) / sqrt(var + eps) + beta``.

    Args:
      params: from ``batch_norm_init``.
      state: running statistics from ``batch_norm_init`` or a previous call; floating point.
      x: ``[N, C]`` or ``[N, H, W, C]`` (any rank >= 2), floating point; any array-like (a float64 NumPy
        array becomes float32 unless x64 is enabled). bf16/float16 inputs are normalised with float32
        statistics and returned in their own dtype.
      train: the book's ``train_flg``, a Python bool. Sets the defaults of the next two flags: True ->
        normalise with batch statistics and update the running ones; False -> normalise with running
        statistics, no update.
      use_batch_stats: normalise with the batch statistics (True) or the running ones (False).
      update_stats: fold this batch's statistics into the running ones. Independent of ``use_batch_stats``:
        ``use_batch_stats=True, update_stats=False`` evaluates with batch statistics;
        ``train=True`` without taking gradients re-estimates running statistics.
      momentum: ``new = momentum * old + (1 - momentum) * batch`` (the book's / Flax's side), in [0, 1]
        (checked when concrete; a traced momentum, e.g. a schedule or a ``vmap`` over momenta, is not).
      eps: added to the variance; the book's 1e-6 by default. Finite and > 0 (0 would give NaN for a
        constant feature).
      feature_axes: axis (or axes) of the features, -1 for ``[N, C]`` and NHWC.
      axis_name: reduce statistics across this bound ``vmap``/``pmap``/``shard_map`` axis (exact for
        unequal shards: sums and counts are reduced, not per-device means).
      mask: optional valid-row mask over leading non-feature axes (``[N]``), boolean or 0/1 (values checked
        when concrete); masked rows do not enter the batch statistics, the running update or the
        cross-device reduction. If no row is valid the running statistics are left unchanged.
      unbiased_running_var: store ``var * n / (n - 1)`` in the running variance (PyTorch's convention).

    Returns:
      ``(y, new_state)``: ``y`` has the shape and dtype of ``x``; ``new_state`` is ``state`` itself when no
      update is made.

    Raises:
      TypeError: a flag that is not a bool, a non-floating ``x`` or running statistic, a non-real
        ``momentum``/``eps``, a mask of non-numeric dtype.
      ValueError: shapes that disagree, ``momentum`` outside [0, 1], ``eps`` not positive or not finite, a
        numeric mask with values other than 0 and 1.
    """
    who = "batch_norm_apply"
    _check_state(state, who)
    train = _check_flag(train, "train", who)
    use_batch_stats = _check_flag(use_batch_stats, "use_batch_stats", who, allow_none=True)
    update_stats = _check_flag(update_stats, "update_stats", who, allow_none=True)
    unbiased_running_var = _check_flag(unbiased_running_var, "unbiased_running_var", who)
    use_batch_stats = train if use_batch_stats is None else use_batch_stats
    update_stats = train if update_stats is None else update_stats
    _check_hyper(momentum, eps, who)
    x, faxes, mask = _prepare(params, state, x, feature_axes, mask, who)

    new_state = state
    if use_batch_stats or update_stats:
        mean, var, count = _batch_stats(x, faxes, axis_name, mask)
        if update_stats:
            run_var = var
            if unbiased_running_var:
                run_var = var * (count / jnp.maximum(count - 1.0, 1.0))
            new_mean, new_var, _ = _running_update(state, mean, run_var, count, momentum)
            new_state = BatchNormState(mean=new_mean, var=new_var)
    if not use_batch_stats:
        mean, var = state.mean, state.var
    y = _normalize(x, mean, var, params.gamma, params.beta, eps, faxes)
    return y, new_state


# --------------------------------------------------------------------------------------------------
# Norms as values: batch norm, Batch Renorm, Ghost batch norm
# --------------------------------------------------------------------------------------------------


def _static_float(value: Any, name: str, who: str) -> float:
    """A hyper-parameter stored in a norm value: a real Python/NumPy scalar (values are static and hashable)."""
    v = _real_values(value, name, who)
    if v is None or v.ndim != 0:
        raise TypeError(f"{who}: {name} must be a real scalar (pass arrays or traced values per call), got {value!r}")
    return float(v)


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalisation layer as a value, like optax's ``GradientTransformation``: two pure functions.

    ``init(num_features, dtype=float32) -> (params, state)`` and
    ``apply(params, state, x, train=True, **call_kwargs) -> (y, new_state)``. A norm value is frozen,
    hashable and compared by value, so it can sit in a static configuration (``model.MLPConfig``,
    ``sweep.Arm``); what varies per call (a traced momentum, ``mask``, ``axis_name``) goes in the call.
    Every norm here normalises with its running statistics in evaluation mode
    (``gamma * (x - mean) / sqrt(var + eps) + beta``), which ``fold_batch_norm`` and ``recalibrate`` rely on.
    """

    def init(self, num_features: int | Sequence[int], dtype: Any = jnp.float32) -> tuple[Any, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define init(num_features, dtype) -> (params, state)")

    def apply(self, params: Any, state: Any, x: Array, train: bool = True, **call_kwargs: Any) -> tuple[Array, Any]:
        raise NotImplementedError(f"{type(self).__name__} must define apply(params, state, x, train, **kwargs) -> "
                                  "(y, new_state)")

    def describe(self) -> dict:
        """The norm as a JSON-friendly dict: its kind and every field."""
        return {"norm": type(self).__name__, **dataclasses.asdict(self)}


def _common_fields(self, who: str) -> None:
    """Checks and float conversion of the fields every norm has (momentum, eps, init_mean, init_var, flags)."""
    for name in ("momentum", "eps", "init_mean", "init_var"):
        object.__setattr__(self, name, _static_float(getattr(self, name), name, who))
    _check_hyper(self.momentum, self.eps, who)
    if not (math.isfinite(self.init_mean) and math.isfinite(self.init_var) and self.init_var >= 0):
        raise ValueError(f"{who}: init_mean must be finite and init_var finite and >= 0, got "
                         f"{self.init_mean!r}, {self.init_var!r}")
    for name in ("use_scale", "use_offset"):
        object.__setattr__(self, name, _check_flag(getattr(self, name), name, who))


@dataclasses.dataclass(frozen=True)
class BatchNorm(Norm):
    """``batch_norm_init`` / ``batch_norm_apply`` as a value; build it with ``batch_norm(...)``."""

    momentum: float = CONVENTIONS["momentum"]
    eps: float = CONVENTIONS["eps"]
    init_mean: float = CONVENTIONS["init_mean"]
    init_var: float = CONVENTIONS["init_var"]
    unbiased_running_var: bool = False
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        _common_fields(self, "batch_norm")
        object.__setattr__(self, "unbiased_running_var",
                           _check_flag(self.unbiased_running_var, "unbiased_running_var", "batch_norm"))

    def init(self, num_features, dtype=jnp.float32):
        return batch_norm_init(num_features, use_scale=self.use_scale, use_offset=self.use_offset,
                               init_mean=self.init_mean, init_var=self.init_var, dtype=dtype)

    def apply(self, params, state, x, train=True, **call_kwargs):
        """``batch_norm_apply`` with this value's settings; ``call_kwargs`` are its other keyword arguments
        (``momentum`` overrides the value's, e.g. a traced schedule; ``mask``, ``axis_name``, ...)."""
        fixed = sorted(set(call_kwargs) & {"eps", "unbiased_running_var"})
        if fixed:
            raise TypeError(f"batch_norm.apply: {', '.join(fixed)} {'belongs' if len(fixed) == 1 else 'belong'} to "
                            "the norm value; build another with "
                            f"layers.batch_norm({fixed[0]}=...)")
        call_kwargs.setdefault("momentum", self.momentum)
        return batch_norm_apply(params, state, x, train, eps=self.eps,
                                unbiased_running_var=self.unbiased_running_var, **call_kwargs)


def batch_norm(
    momentum: float = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    *,
    init_mean: float = CONVENTIONS["init_mean"],
    init_var: float = CONVENTIONS["init_var"],
    unbiased_running_var: bool = False,
    use_scale: bool = True,
    use_offset: bool = True,
) -> BatchNorm:
    """Batch norm as a value: ``norm.init(C)``, ``norm.apply(params, state, x, train)``.

    The same numbers as ``batch_norm_init`` / ``batch_norm_apply`` with these settings (see them for the
    conventions); the hyper-parameters are checked here, once.
    """
    return BatchNorm(momentum, eps, init_mean, init_var, unbiased_running_var, use_scale, use_offset)


class BatchRenormState(NamedTuple):
    """Running statistics of Batch Renorm, each of the feature shape, and the number of updates made (``step``,
    an int32 scalar that drives the warm-up schedule)."""

    mean: Array
    var: Array
    step: Array


def renorm_schedule(
    step: Any,
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    hold_steps: int = 5000,
    r_steps: int = 40000,
    d_steps: int = 25000,
) -> tuple[Array, Array]:
    """Ioffe (2017)'s warm-up of Batch Renorm's clipping limits: ``(r_max(step), d_max(step))``.

    ``r_max = 1`` and ``d_max = 0`` (plain batch norm) for the first ``hold_steps`` updates, then rising
    linearly to ``r_max`` at ``r_steps`` and ``d_max`` at ``d_steps``, constant afterwards (the paper's
    numbers by default: 5k, 40k and 25k updates). ``step`` may be traced; jit- and vmap-friendly.
    """
    who = "renorm_schedule"
    steps = (hold_steps, r_steps, d_steps)
    if not all(isinstance(v, (int, np.integer)) and not _is_bool(v) and v >= 0 for v in steps) \
            or not hold_steps <= min(r_steps, d_steps):
        raise ValueError(f"{who}: hold_steps, r_steps, d_steps must be integers >= 0 with hold_steps <= the others "
                         f"(they shape the program), got {steps}")
    _check_limits(r_max, d_max, who)
    dtype = jnp.result_type(float)  # the default float dtype: float64 under x64, exact counts up to 2**53
    step = jnp.asarray(step, dtype)

    def ramp(end):
        span = max(float(end) - float(hold_steps), 1.0)
        return jnp.clip((step - float(hold_steps)) / span, 0.0, 1.0)

    r_max, d_max = jnp.asarray(r_max, dtype), jnp.asarray(d_max, dtype)  # may be traced
    return 1.0 + (r_max - 1.0) * ramp(r_steps), d_max * ramp(d_steps)


def _check_limits(r_max: Any, d_max: Any, who: str) -> None:
    """Batch Renorm's clipping limits where concrete: real, finite, ``r_max >= 1``, ``d_max >= 0``, a scalar or
    one value per feature (traced values pass unchecked, as momentum does)."""
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        v = _real_values(value, name, who)
        if v is None:
            continue
        if v.ndim > 1:
            raise ValueError(f"{who}: {name} must be a scalar or one value per feature, got shape {v.shape}")
        if not np.all(np.isfinite(v) & (v >= low)):  # NaN fails too
            raise ValueError(f"{who}: {name} must be finite and >= {low:g} (r_max=1, d_max=0 is batch norm), "
                             f"got {value!r}")


@dataclasses.dataclass(frozen=True)
class BatchRenorm(Norm):
    """Batch Renormalization (Ioffe 2017, Algorithm 1); build it with ``batch_renorm(...)``."""

    momentum: float = CONVENTIONS["momentum"]
    eps: float = CONVENTIONS["eps"]
    r_max: float = 3.0
    d_max: float = 5.0
    warmup: tuple[int, int, int] | None = None
    running_average: str = "var"
    init_mean: float = 0.0
    init_var: float = 1.0
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        who = "batch_renorm"
        _common_fields(self, who)
        for name in ("r_max", "d_max"):
            object.__setattr__(self, name, _static_float(getattr(self, name), name, who))
        if not (self.r_max >= 1.0 and math.isfinite(self.r_max)) or not (self.d_max >= 0.0 and
                                                                         math.isfinite(self.d_max)):
            raise ValueError(f"{who}: r_max must be finite and >= 1 and d_max finite and >= 0 "
                             f"(r_max=1, d_max=0 is batch norm), got r_max={self.r_max!r}, d_max={self.d_max!r}")
        if self.running_average not in ("var", "std"):
            raise ValueError(f"{who}: running_average must be 'var' or 'std', got {self.running_average!r}")
        if self.warmup is not None:
            try:
                steps = tuple(self.warmup)
            except TypeError:
                steps = ()
            if len(steps) != 3 or not all(isinstance(s, (int, np.integer)) and not _is_bool(s) and s >= 0
                                          for s in steps) or not steps[0] <= min(steps[1], steps[2]):
                raise ValueError(f"{who}: warmup must be None or (hold_steps, r_steps, d_steps), integers >= 0 "
                                 f"with hold_steps <= both others, got {self.warmup!r}")
            object.__setattr__(self, "warmup", tuple(int(s) for s in steps))

    def init(self, num_features, dtype=jnp.float32):
        params, state = batch_norm_init(num_features, use_scale=self.use_scale, use_offset=self.use_offset,
                                        init_mean=self.init_mean, init_var=self.init_var, dtype=dtype)
        return params, BatchRenormState(state.mean, state.var, jnp.zeros((), jnp.int32))

    def limits(self, step: Any) -> tuple[Any, Any]:
        """``(r_max, d_max)`` at update ``step``: the fixed values, or the warm-up schedule's."""
        if self.warmup is None:
            return self.r_max, self.d_max
        hold, r_steps, d_steps = self.warmup
        return renorm_schedule(step, self.r_max, self.d_max, hold_steps=hold, r_steps=r_steps, d_steps=d_steps)

    def apply(self, params, state, x, train=True, *, r_max=None, d_max=None, momentum=None, update_stats=None,
              mask=None, axis_name=None, feature_axes=-1):
        """Training: batch statistics corrected by ``r`` and ``d``; evaluation: the running statistics.

        With the batch mean ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and the running ``mu``,
        ``sigma = sqrt(var + eps)``: ``r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))``,
        ``d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))``,
        ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta``.

        Args:
          params, state: from ``init`` (``BatchNormParams``, ``BatchRenormState``).
          x, train, mask, axis_name, feature_axes: as ``batch_norm_apply``.
          r_max, d_max: override the value's limits (and its warm-up) for this call; may be traced.
          momentum: overrides the value's; may be traced.
          update_stats: fold the batch statistics into the running ones (default: ``train``).

        Returns:
          ``(y, new_state)``; ``new_state.step`` counts the updates made.
        """
        who = "batch_renorm.apply"
        if not isinstance(state, BatchRenormState):
            raise TypeError(f"{who}: state must be a BatchRenormState (from batch_renorm(...).init), got "
                            f"{type(state).__name__}; Batch Renorm counts its updates for the warm-up")
        train, update_stats, momentum, x, faxes, mask = _start_apply(
            self, params, state, x, train, update_stats, momentum, feature_axes, mask, who)
        if not train and not update_stats:
            return _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes), state
        mean_b, var_b, count = _batch_stats(x, faxes, axis_name, mask)
        stat_dtype = mean_b.dtype
        eps = jnp.asarray(self.eps, stat_dtype)
        sigma_b = jnp.sqrt(var_b + eps)
        sigma = jnp.sqrt(state.var.astype(stat_dtype) + eps)
        new_state = state
        if update_stats:
            new_mean, new_var, has_rows = _running_update(state, mean_b, var_b, count, momentum)
            if self.running_average == "std":  # the paper's: sigma := sigma + alpha (sigma_B - sigma), stored as
                m = jnp.asarray(momentum, state.var.dtype)  # var = sigma^2 - eps
                new_sigma = m * sigma.astype(state.var.dtype) + (1 - m) * sigma_b.astype(state.var.dtype)
                new_var = jnp.where(has_rows, jnp.maximum(jnp.square(new_sigma) - eps.astype(state.var.dtype), 0.0),
                                    state.var)
            new_state = BatchRenormState(mean=new_mean, var=new_var,
                                         step=state.step + has_rows.astype(state.step.dtype))
        if not train:
            y = _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes)
            return y, new_state
        _check_limits(r_max if r_max is not None else 1.0, d_max if d_max is not None else 0.0, who)
        lim_r, lim_d = self.limits(state.step)
        lim_r = lim_r if r_max is None else r_max
        lim_d = lim_d if d_max is None else d_max
        lim_r = jnp.asarray(lim_r, stat_dtype)
        lim_d = jnp.asarray(lim_d, stat_dtype)
        r = lax.stop_gradient(jnp.clip(sigma_b / sigma, 1.0 / lim_r, lim_r))
        d = lax.stop_gradient(jnp.clip((mean_b - state.mean.astype(stat_dtype)) / sigma, -lim_d, lim_d))
        y = _normalize(x, mean_b, var_b, params.gamma, params.beta, self.eps, faxes, r, d)
        return y, new_state


def batch_renorm(
    momentum: float = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup: tuple[int, int, int] | None = None,
    running_average: str = "var",
    init_mean: float = 0.0,
    init_var: float = 1.0,
    use_scale: bool = True,
    use_offset: bool = True,
) -> BatchRenorm:
    """Batch Renormalization (Ioffe 2017, Algorithm 1) as a value.

    Args:
      momentum, eps: as batch norm's (``new = momentum * old + (1 - momentum) * batch``).
      r_max, d_max: clipping limits of ``r`` (in ``[1/r_max, r_max]``) and ``d`` (in ``[-d_max, d_max]``);
        ``r_max=1, d_max=0`` is batch norm exactly. Per-call ``r_max=``/``d_max=`` may be traced (a schedule).
      warmup: ``(hold_steps, r_steps, d_steps)`` to ramp the limits with ``renorm_schedule`` from the state's
        update count (the paper's ``(5000, 40000, 25000)``), or ``None`` for fixed limits.
      running_average: ``'var'`` averages the variance (as batch norm, Flax-based CrossQ code); ``'std'``
        averages ``sigma = sqrt(var + eps)`` as the paper writes, stored as ``sigma**2 - eps`` so evaluation
        and folding read the state as batch norm's.
      init_mean, init_var: initial running statistics; 0 and 1 by default (not the book's 0 and 0: ``r`` divides
        by the running ``sigma``, which would start at ``sqrt(eps)``).
      use_scale, use_offset: learn gamma / beta.
    """
    return BatchRenorm(momentum, eps, r_max, d_max, warmup, running_average, init_mean, init_var, use_scale,
                       use_offset)


@dataclasses.dataclass(frozen=True)
class GhostBatchNorm(Norm):
    """Ghost (virtual) batch norm (Hoffer et al. 2017); build it with ``ghost_batch_norm(...)``."""

    virtual_batch_size: int = 32
    momentum: float = CONVENTIONS["momentum"]
    eps: float = CONVENTIONS["eps"]
    init_mean: float = CONVENTIONS["init_mean"]
    init_var: float = CONVENTIONS["init_var"]
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        who = "ghost_batch_norm"
        k = self.virtual_batch_size
        if _is_bool(k) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{who}: virtual_batch_size must be an integer >= 1, got {k!r}")
        object.__setattr__(self, "virtual_batch_size", int(k))
        _common_fields(self, who)

    def init(self, num_features, dtype=jnp.float32):
        return batch_norm_init(num_features, use_scale=self.use_scale, use_offset=self.use_offset,
                               init_mean=self.init_mean, init_var=self.init_var, dtype=dtype)

    def apply(self, params, state, x, train=True, *, momentum=None, update_stats=None, mask=None, axis_name=None,
              feature_axes=-1):
        """Training: each group of ``virtual_batch_size`` consecutive rows (axis 0) is normalised with its own
        statistics; evaluation: the running statistics only (never virtual batches).

        If ``virtual_batch_size`` does not divide the batch, the last group is smaller (a batch of 10 with
        groups of 4: 4, 4, 2). The running statistics take one update per call, from the pooled group
        statistics: the mean of the rows and the count-weighted mean of the group variances (the mean of the
        group statistics, as TensorFlow's ``virtual_batch_size``, when the groups are equal). Groups are formed
        on each device from its own rows; with ``axis_name`` the pooled statistics of the running update are
        summed over devices. A mask removes rows from their group (a group with no valid row is skipped).

        Args: as ``BatchRenorm.apply`` without ``r_max``/``d_max``; feature axes must not include axis 0.
        """
        who = "ghost_batch_norm.apply"
        _check_state(state, who)
        train, update_stats, momentum, x, faxes, mask = _start_apply(
            self, params, state, x, train, update_stats, momentum, feature_axes, mask, who)
        if 0 in faxes:
            raise ValueError(f"{who}: axis 0 holds the rows the virtual batches are made of; it cannot be a "
                             f"feature axis (feature_axes={feature_axes!r})")
        if not train and not update_stats:
            return _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes), state
        n, k = x.shape[0], self.virtual_batch_size
        if axis_name is None and n <= k:
            # One group: batch norm itself, bit for bit.
            mean, var, count = _batch_stats(x, faxes, None, mask)
            y = _normalize(x, mean, var, params.gamma, params.beta, self.eps, faxes)
            pooled = (mean, var, count)
        else:
            y, pooled = self._groups(params, x, faxes, mask, axis_name)
        new_state = state
        if update_stats:
            new_mean, new_var, _ = _running_update(state, *pooled, momentum)
            new_state = BatchNormState(mean=new_mean, var=new_var)
        if not train:
            y = _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes)
        return y, new_state

    def _groups(self, params, x, faxes, mask, axis_name):
        """Per-group normalisation and the pooled statistics ``(mean, var, count)`` of all groups."""
        n, k = x.shape[0], min(self.virtual_batch_size, x.shape[0])
        num_groups = -(-n // k)
        pad = num_groups * k - n
        if pad:
            if mask is None:
                mask = jnp.ones((n,), bool)
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
            mask = jnp.concatenate([mask, jnp.zeros((pad, *mask.shape[1:]), mask.dtype)])
        xg = x.reshape(num_groups, k, *x.shape[1:])
        mg = None if mask is None else mask.reshape(num_groups, k, *mask.shape[1:])

        def one(xi, mi):
            mean, var, count = _batch_stats(xi, faxes, None, mi)
            return _normalize(xi, mean, var, params.gamma, params.beta, self.eps, faxes), (mean, var, count)

        yg, (means, variances, counts) = jax.vmap(one)(xg, mg) if mg is not None else \
            jax.vmap(lambda xi: one(xi, None))(xg)
        y = yg.reshape(num_groups * k, *x.shape[1:])[:n]
        w = counts.reshape((num_groups,) + (1,) * (means.ndim - 1))
        sums = (jnp.sum(w * means, axis=0), jnp.sum(w * variances, axis=0), jnp.sum(counts))
        if axis_name is not None:
            sums = _psum(sums, axis_name)
        total = jnp.maximum(sums[2], 1.0)
        return y, (sums[0] / total, sums[1] / total, sums[2])


def ghost_batch_norm(
    virtual_batch_size: int,
    momentum: float = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    *,
    init_mean: float = CONVENTIONS["init_mean"],
    init_var: float = CONVENTIONS["init_var"],
    use_scale: bool = True,
    use_offset: bool = True,
) -> GhostBatchNorm:
    """Ghost batch norm (Hoffer et al. 2017) as a value: training statistics over groups of
    ``virtual_batch_size`` rows, evaluation with the running statistics (see ``GhostBatchNorm.apply``).
    ``virtual_batch_size >= batch`` is batch norm exactly."""
    return GhostBatchNorm(virtual_batch_size, momentum, eps, init_mean, init_var, use_scale, use_offset)


def recalibrate(norm: Norm, params: Any, state: Any, batches: Any, **call_kwargs: Any) -> Any:
    """Precise statistics of one norm layer: the running mean and variance set to the equal-weight average of
    the batch statistics of ``batches`` (fvcore's precise BN, PyTorch's ``update_bn`` cumulative average).

    Args:
      norm: the layer's norm value.
      params, state: the layer's parameters and running statistics (other state fields are kept).
      batches: ``[num_batches, N, ...]``, one batch per leading index; scanned with ``lax.scan``, so memory
        does not grow with the number of batches. Call it under ``jit`` for one compiled pass.
      call_kwargs: passed to ``norm.apply`` (``feature_axes``, ``axis_name``, ...).

    Returns:
      the new state: ``mean`` and ``var`` are the averages of the per-batch statistics the norm's training
      mode computes (for Ghost BN its pooled group statistics; the biased variance unless the norm stores
      another).
    """
    refused = sorted(set(call_kwargs) & {"momentum", "train", "update_stats", "use_batch_stats"})
    if refused:
        raise TypeError(f"recalibrate: {', '.join(refused)} cannot be set here: every batch runs in training mode "
                        "and the running statistics are replaced by the average of the batch statistics")
    if not (hasattr(state, "mean") and hasattr(state, "var")):
        raise TypeError(f"recalibrate: the norm's state must hold running statistics `mean` and `var`, got "
                        f"{type(state).__name__}")
    batches = _as_input(batches, "recalibrate")
    if batches.ndim < 3 or batches.shape[0] < 1 or batches.shape[1] < 1:
        raise ValueError(f"recalibrate: batches must be [num_batches >= 1, N >= 1, ...], got shape {batches.shape}")

    def body(sums, xb):
        _, s = norm.apply(params, state, xb, True, momentum=0.0, **call_kwargs)
        return (sums[0] + s.mean, sums[1] + s.var), None

    zero = (jnp.zeros_like(state.mean), jnp.zeros_like(state.var))
    (mean, var), _ = lax.scan(body, zero, batches)
    num = batches.shape[0]
    return state._replace(mean=mean / num, var=var / num)


def fold_batch_norm(
    affine_params: AffineParams, bn_params: BatchNormParams, bn_state: Any, eps: float = CONVENTIONS["eps"]
) -> AffineParams:
    """Affine parameters whose output equals ``Affine`` followed by a norm in evaluation mode.

    ``gamma * (x @ W + b - mean) / sqrt(var + eps) + beta = x @ (W * s) + (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)``; for every norm of this module (their evaluation is batch norm's with
    the running statistics). Computed in the statistics' precision, returned in the Affine's dtype.

    Args:
      affine_params: ``W [num_in, C]``, ``b [C]``.
      bn_params, bn_state: the norm's parameters (gamma/beta may be ``None``) and running ``mean``/``var``
        ``[C]``.
      eps: the norm's eps.
    """
    W, b = affine_params
    scale, shift = _fold_scale_shift(bn_params, bn_state, eps, W.shape[-1], "fold_batch_norm", W, b)
    dt = scale.dtype
    return AffineParams(W=(W.astype(dt) * scale).astype(W.dtype), b=(b.astype(dt) * scale + shift).astype(b.dtype))


def fold_conv_batch_norm(
    kernel: Array, bias: Array | None, bn_params: BatchNormParams, bn_state: Any, eps: float = CONVENTIONS["eps"]
) -> tuple[Array, Array]:
    """``fold_batch_norm`` for a convolution: ``kernel [H, W, I, O]`` (HWIO, for NHWC inputs) and ``bias [O]``
    (or ``None``) -> the folded kernel and bias, whose convolution equals conv followed by the norm in
    evaluation mode."""
    kernel = jnp.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"fold_conv_batch_norm: kernel must be HWIO [H, W, I, O], got shape {kernel.shape}")
    scale, shift = _fold_scale_shift(bn_params, bn_state, eps, kernel.shape[-1], "fold_conv_batch_norm", kernel,
                                     bias)
    dt = scale.dtype
    bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if bias is None else jnp.asarray(bias)
    if bias.shape != (kernel.shape[-1],):
        raise ValueError(f"fold_conv_batch_norm: bias has shape {bias.shape}, expected ({kernel.shape[-1]},) (one per "
                         "output channel, the kernel's last axis)")
    return (kernel.astype(dt) * scale).astype(kernel.dtype), (bias.astype(dt) * scale + shift).astype(bias.dtype)


def _fold_scale_shift(bn_params, bn_state, eps, num_out, who, *weights):
    _check_hyper(0.0, eps, who)
    if not (hasattr(bn_state, "mean") and hasattr(bn_state, "var")):
        raise TypeError(f"{who}: the norm's state must hold running statistics `mean` and `var`, got "
                        f"{type(bn_state).__name__}")
    for w in weights:
        if w is not None and not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
            raise TypeError(f"{who}: weights must be floating point (the folded ones are scaled), got dtype "
                            f"{jnp.asarray(w).dtype}")
    mean, var = bn_state.mean, bn_state.var
    if _is_concrete(var) and not np.all(np.asarray(var) >= 0):
        raise ValueError(f"{who}: the running variance must be >= 0, got {np.asarray(var)[np.asarray(var) < 0][:3]}")
    for name, v in (("gamma", bn_params.gamma), ("beta", bn_params.beta), ("running mean", mean),
                    ("running var", var)):
        if v is not None and tuple(v.shape) != (num_out,):
            raise ValueError(f"{who}: {name} has shape {tuple(v.shape)}, expected ({num_out},) (one per output)")
    dt = jnp.promote_types(mean.dtype, jnp.float32)
    scale = lax.rsqrt(var.astype(dt) + jnp.asarray(eps, dt))
    if bn_params.gamma is not None:
        scale = scale * bn_params.gamma.astype(dt)
    shift = -mean.astype(dt) * scale
    if bn_params.beta is not None:
        shift = shift + bn_params.beta.astype(dt)
    return scale, shift


# --------------------------------------------------------------------------------------------------
# Activations, dropout, loss
# --------------------------------------------------------------------------------------------------


def relu(x: Array) -> Array:
    """``max(x, 0)``; gradient 0 at exactly 0, as in the book's ``Relu``."""
    return jax.nn.relu(x)


def sigmoid(x: Array) -> Array:
    """``1 / (1 + exp(-x))``."""
    return jax.nn.sigmoid(x)


def dropout_apply(
    x: Array, key: Array | None, rate: float, train: bool = True, *, inverted: bool = True
) -> Array:
    """Dropout with an explicit key.

    Args:
      x: any shape.
      key: a ``jax.random`` key; required when ``train`` and ``rate > 0``.
      rate: probability of dropping a unit (the book's ``dropout_ratio``), in [0, 1).
      train: apply the random mask (True) or the deterministic evaluation path (False).
      inverted: scale kept units by ``1 / (1 - rate)`` at training time and do nothing at evaluation
        (the modern convention). ``False`` is the book's: no scaling at training, multiply by
        ``1 - rate`` at evaluation. Both have the same expectation.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_apply: rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return x
    if not train:
        return x if inverted else x * jnp.asarray(1.0 - rate, x.dtype)
    if key is None:
        raise ValueError("dropout_apply: a jax.random key is required when train=True and rate > 0")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    kept = x / jnp.asarray(1.0 - rate, x.dtype) if inverted else x
    return jnp.where(keep, kept, jnp.zeros_like(x))


def softmax_cross_entropy(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy (the book's ``SoftmaxWithLoss``) with integer labels.

    Uses ``log_softmax``, whose gradient is exactly the book's ``(softmax - onehot) / N``; the book's
    ``log(y + 1e-7)`` only changes the reported loss value for near-certain wrong predictions.

    Args:
      logits: ``[N, K]`` scores.
      labels: ``[N]`` integer class indices in ``[0, K)``.
    """
    if logits.ndim != 2:
        raise ValueError(f"softmax_cross_entropy: logits must be [N, K], got shape {logits.shape}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"softmax_cross_entropy: labels must be integer class indices, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} != [N]={logits.shape[:1]}")
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))


# --------------------------------------------------------------------------------------------------
# Interop
# --------------------------------------------------------------------------------------------------


def torch_batch_norm_to_bnjax(torch_state: dict) -> tuple[BatchNormParams, BatchNormState, dict]:
    """Convert a PyTorch ``BatchNorm1d/2d`` ``state_dict()`` into bnjax params, state and apply kwargs.

    PyTorch stores ``weight``, ``bias``, ``running_mean`` and the *unbiased* ``running_var``; its
    ``momentum=0.1`` weights the new batch, i.e. bnjax ``momentum=0.9``; its eps default is 1e-5.
    Returns ``(params, state, kwargs)`` where ``kwargs`` holds the ``batch_norm_apply`` arguments that
    reproduce PyTorch's behaviour (``momentum``, ``eps``, ``unbiased_running_var``; and
    ``feature_axes=-1``, so move NCHW tensors to NHWC first).

    Values may be torch tensors or NumPy arrays; torch itself is not imported.
    """
    import numpy as np

    def arr(name):
        v = torch_state.get(name)
        if v is None:
            return None
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return jnp.asarray(v, jnp.float32)

    missing = [k for k in ("running_mean", "running_var") if k not in torch_state]
    if missing:
        raise KeyError(f"torch_batch_norm_to_bnjax: state_dict lacks {missing} (track_running_stats=False?)")
    params = BatchNormParams(gamma=arr("weight"), beta=arr("bias"))
    state = BatchNormState(mean=arr("running_mean"), var=arr("running_var"))
    kwargs = {"momentum": 0.9, "eps": 1e-5, "unbiased_running_var": True, "feature_axes": -1}
    return params, state, kwargs
