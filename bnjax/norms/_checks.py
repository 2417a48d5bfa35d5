"""Argument checks shared by the norms (private).

Concrete values (Python/NumPy numbers, JAX arrays outside a transformation) are checked on the host; tracers are
passed through unchecked, so ``jit``/``vmap``/``grad`` over hyper-parameters never syncs or raises.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


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


def _check_float_dtype(dtype: Any, who: str) -> None:
    """A parameter dtype must be a floating-point one (``TypeError`` naming ``who`` otherwise)."""
    try:
        floating = jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{who}: dtype must be a floating-point dtype, got {dtype!r}")


def _check_per_feature(value: Any, name: str, feature_shape: tuple[int, ...], who: str) -> None:
    """A hyper-parameter given per call is a scalar or one value per feature: its shape (static, also when traced)
    is ``()`` or ``feature_shape``; anything else would broadcast into the statistics or fail inside JAX."""
    shape = tuple(np.shape(value))
    if shape not in ((), tuple(feature_shape)):
        raise ValueError(f"{who}: {name} must be a scalar or one value per feature (shape {tuple(feature_shape)}), "
                         f"got shape {shape}")


def _static_float(value: Any, name: str, who: str) -> float:
    """A hyper-parameter stored in a norm value: a real Python/NumPy scalar (values are static and hashable)."""
    v = _real_values(value, name, who)
    if v is None or v.ndim != 0:
        raise TypeError(f"{who}: {name} must be a real scalar (pass arrays or traced values per call), got {value!r}")
    return float(v)


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
    if not red_axes:
        # One example per call (a per-example vmap): the mask is that example's own 0/1 flag.
        if ndim != 0:
            raise ValueError(f"{who}: x {tuple(x.shape)} holds one example (every axis is a feature axis), so its "
                             f"mask is a scalar (this example valid or not), got shape {shape}")
    elif ndim == 0 or ndim > len(red_axes) or tuple(red_axes[:ndim]) != tuple(range(ndim)):
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


def _check_input(x: Array, feature_axes: int | Sequence[int], who: str, axis_name: Any = None) -> tuple[int, ...]:
    """Floating point, rank >= 2 (rank >= 1 with ``axis_name``: one example per call of a per-example
    ``jax.vmap(..., axis_name=...)``, the batch being the named axis); returns the sorted, non-negative feature
    axes."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1 or (x.ndim < 2 and axis_name is None):
        raise ValueError(f"{who}: x must have a batch axis and a feature axis (rank >= 2), got shape {x.shape}; "
                         "one example per call (rank 1) needs the batch as a named axis: call it inside "
                         "jax.vmap(..., axis_name=...) and pass that axis_name")
    return _feature_axes(x.ndim, feature_axes)
