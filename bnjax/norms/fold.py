"""Inference folding: a norm in evaluation mode folded into the Affine or convolution before it."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import _check_hyper, _is_concrete
from bnjax.norms.base import Norm
from bnjax.norms.core import RUNNING_STATS_TYPES

Array = jax.Array


def fold_batch_norm(affine: Any, norm: Norm, norm_params: Any, norm_state: Any) -> Any:
    """Affine parameters whose output equals ``Affine`` followed by ``norm`` in evaluation mode.

    ``gamma * (x @ W + b - mean) / sqrt(var + eps) + beta = x @ (W * s) + (b - mean) * s + beta`` with
    ``s = gamma / sqrt(var + eps)`` and ``eps`` the norm's own; for every norm with running statistics (their
    evaluation is batch norm's with the running statistics). Computed in the statistics' precision, returned in
    the Affine's dtype.

    Args:
      affine: ``AffineParams`` with ``W [num_in, C]`` and ``b [C]`` or ``b=None`` (an Affine without bias).
      norm: the norm value (its ``eps`` is used); it must have running statistics.
      norm_params: the norm's parameters (``gamma``/``beta`` may be ``None``).
      norm_state: its running ``mean``/``var`` ``[C]``.

    Returns:
      the folded ``AffineParams`` (of ``affine``'s type), with a bias even when ``affine`` had none.

    Raises:
      ValueError: a norm without running statistics, shapes that disagree (a bias that is not ``[C]``), a running
        variance that is negative or not finite or a running mean that is not finite (the message counts them and
        names the first), an invalid ``eps``.
      TypeError: ``affine`` not an ``AffineParams`` (a dict included), weights that are not floating-point arrays,
        norm parameters without ``gamma``/``beta``, a norm state without running statistics.
    """
    who = "fold_batch_norm"
    if not (isinstance(affine, tuple) and hasattr(affine, "_replace") and hasattr(affine, "W")
            and hasattr(affine, "b")):
        hint = (" (a dict is not accepted: wrap it as layers.AffineParams(W=d['W'], b=d['b']))"
                if isinstance(affine, dict) else "")
        raise TypeError(f"{who}: affine must be a layers.AffineParams(W [num_in, C], b [C] or None), got "
                        f"{type(affine).__name__}{hint}")
    W = _weights(affine.W, "W", who)
    if W.ndim != 2:
        raise ValueError(f"{who}: W must be [num_in, C], got shape {W.shape}")
    b = None if affine.b is None else _weights(affine.b, "b", who)
    scale, shift = _fold_scale_shift(norm, norm_params, norm_state, W.shape[-1], who, W, b)
    dt = scale.dtype
    new_b = shift.astype(W.dtype) if b is None else (b.astype(dt) * scale + shift).astype(b.dtype)
    return affine._replace(W=(W.astype(dt) * scale).astype(W.dtype), b=new_b)


def fold_conv_batch_norm(kernel_hwio: Array, bias: Array | None, norm: Norm, norm_params: Any,
                         norm_state: Any) -> tuple[Array, Array]:
    """``fold_batch_norm`` for a convolution.

    Args:
      kernel_hwio: ``[H, W, I, O]`` (HWIO, for NHWC inputs).
      bias: ``[O]`` or ``None``.
      norm: the norm value (its ``eps`` is used); it must have running statistics.
      norm_params, norm_state: its parameters and running statistics ``[O]``.

    Returns:
      ``(kernel, bias)`` whose convolution equals conv followed by the norm in evaluation mode.

    Raises:
      ValueError: a norm without running statistics, a kernel that is not rank 4, shapes that disagree, running
        statistics as ``fold_batch_norm`` refuses them.
      TypeError: a kernel or bias that is not a floating-point array, or as ``fold_batch_norm``.
    """
    who = "fold_conv_batch_norm"
    kernel = _weights(kernel_hwio, "kernel", who)
    if kernel.ndim != 4:
        raise ValueError(f"{who}: kernel must be HWIO [H, W, I, O], got shape {kernel.shape}")
    bias = None if bias is None else _weights(bias, "bias", who)
    scale, shift = _fold_scale_shift(norm, norm_params, norm_state, kernel.shape[-1], who, kernel, bias)
    dt = scale.dtype
    bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if bias is None else bias
    return (kernel.astype(dt) * scale).astype(kernel.dtype), (bias.astype(dt) * scale + shift).astype(bias.dtype)


def _weights(value: Any, name: str, who: str) -> Array:
    """``value`` as a JAX array, or a TypeError naming it (a dict, a string, ... are not weights)."""
    if isinstance(value, (dict, str, bytes)) or value is None:
        raise TypeError(f"{who}: {name} must be an array, got {type(value).__name__}")
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{who}: {name} must be an array, got {type(value).__name__}") from err


def _bad_values(v: Any, ok: np.ndarray) -> str:
    """How many values fail a check, and the first one with its index: ``2 of 4 values are not (first: index 1,
    nan)``."""
    bad = np.argwhere(~ok)
    first = tuple(int(i) for i in bad[0])
    index = first[0] if len(first) == 1 else first
    return f"{len(bad)} of {ok.size} values are not (first: index {index}, {float(np.asarray(v)[first])})"


def _fold_scale_shift(norm, bn_params, bn_state, num_out, who, weights, bias):
    """``(scale, shift)`` ``[num_out]`` of the norm's evaluation mode, after the checks."""
    if not isinstance(norm, Norm):
        raise TypeError(f"{who}: norm must be a norm value (layers.batch_norm(), ...), got {type(norm).__name__}")
    if not norm.has_running_stats:
        raise ValueError(f"{who}: {type(norm).__name__} has no running statistics to fold (has_running_stats="
                         "False): it normalises each example by its own statistics at evaluation too, so no fixed "
                         "scale and shift exist; keep the norm layer")
    eps = norm.eps
    _check_hyper(0.0, eps, who)
    if not isinstance(bn_state, RUNNING_STATS_TYPES):
        raise TypeError(f"{who}: the norm's state must hold running statistics `mean` and `var`, got "
                        f"{type(bn_state).__name__}")
    if not (hasattr(bn_params, "gamma") and hasattr(bn_params, "beta")):
        raise TypeError(f"{who}: the norm's parameters must be a BatchNormParams(gamma, beta) (from norm.init), "
                        f"got {type(bn_params).__name__}")
    for w in (weights, bias):
        if w is not None and not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
            raise TypeError(f"{who}: weights must be floating point (the folded ones are scaled), got dtype "
                            f"{jnp.asarray(w).dtype}")
    if bias is not None and tuple(bias.shape) != (num_out,):
        raise ValueError(f"{who}: bias has shape {tuple(bias.shape)}, expected ({num_out},) (one per output, the "
                         "weights' last axis)")
    mean, var = bn_state.mean, bn_state.var
    # Folded weights are used without the norm's state, so a stale NaN/inf would silently zero or poison them.
    if _is_concrete(var):
        v = np.asarray(var)
        ok = np.isfinite(v) & (v >= 0)
        if not ok.all():
            raise ValueError(f"{who}: the running variance must be finite and >= 0; {_bad_values(v, ok)} "
                             "(recalibrate the statistics first: layers.recalibrate / model.recalibrate)")
    if _is_concrete(mean):
        m = np.asarray(mean)
        ok = np.isfinite(m)
        if not ok.all():
            raise ValueError(f"{who}: the running mean must be finite; {_bad_values(m, ok)} (recalibrate the "
                             "statistics first: layers.recalibrate / model.recalibrate)")
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


def identity_running_var(eps: float, dtype: Any = jnp.float32) -> np.ndarray:
    """The running variance ``v`` with ``v + eps == 1`` exactly in ``dtype``.

    With running mean 0, ``gamma`` 1 and ``beta`` 0, a norm then returns its input bit for bit in evaluation
    (``rsqrt(v + eps)`` is exactly 1): how the Flax and Equinox tools leave a norm in a model as the identity
    once it is folded into the layer before it (a framework model's call is code, so the layer stays).

    Args:
      eps: the norm's eps, in (0, 1).
      dtype: the running statistics' floating dtype.

    Returns:
      ``v`` as a NumPy scalar array of ``dtype``.

    Raises:
      ValueError: ``eps`` not in (0, 1).
    """
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"identity_running_var: a variance v with v + eps == 1 needs 0 < eps < 1, got eps={eps!r}")
    dt = np.dtype(dtype)
    one, e = dt.type(1.0), dt.type(eps)
    v = one - e
    for _ in range(16):  # 1 - eps rounds to within a few units in the last place of the answer
        total = dt.type(v + e)
        if total == one:
            break
        v = np.nextafter(v, dt.type(-np.inf) if total > one else dt.type(np.inf), dtype=dt)
    return np.asarray(v, dt)
