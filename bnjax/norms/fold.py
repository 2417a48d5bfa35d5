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
      ValueError: a norm without running statistics, shapes that disagree (a bias that is not ``[C]``), a negative
        running variance, an invalid ``eps``.
      TypeError: ``affine`` without ``W``/``b`` fields, a norm state without running statistics, non-floating
        weights.
    """
    who = "fold_batch_norm"
    if not (isinstance(affine, tuple) and hasattr(affine, "_replace") and hasattr(affine, "W")
            and hasattr(affine, "b")):
        raise TypeError(f"{who}: affine must be AffineParams(W, b), got {type(affine).__name__}")
    W, b = jnp.asarray(affine.W), affine.b
    if W.ndim != 2:
        raise ValueError(f"{who}: W must be [num_in, C], got shape {W.shape}")
    b = None if b is None else jnp.asarray(b)
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
      ValueError: a norm without running statistics, a kernel that is not rank 4, shapes that disagree, a
        negative running variance.
      TypeError: as ``fold_batch_norm``.
    """
    who = "fold_conv_batch_norm"
    kernel = jnp.asarray(kernel_hwio)
    if kernel.ndim != 4:
        raise ValueError(f"{who}: kernel must be HWIO [H, W, I, O], got shape {kernel.shape}")
    bias = None if bias is None else jnp.asarray(bias)
    scale, shift = _fold_scale_shift(norm, norm_params, norm_state, kernel.shape[-1], who, kernel, bias)
    dt = scale.dtype
    bias = jnp.zeros(kernel.shape[-1], kernel.dtype) if bias is None else bias
    return (kernel.astype(dt) * scale).astype(kernel.dtype), (bias.astype(dt) * scale + shift).astype(bias.dtype)


def _fold_scale_shift(norm, bn_params, bn_state, num_out, who, weights, bias):
    """``(scale, shift)`` ``[num_out]`` of the norm's evaluation mode, after the checks."""
    if not isinstance(norm, Norm):
        raise TypeError(f"{who}: norm must be a norm value (layers.batch_norm(), ...), got {type(norm).__name__}")
    if not norm.has_running_stats:
        raise ValueError(f"{who}: {type(norm).__name__} has no running statistics (has_running_stats=False); its "
                         "evaluation depends on each input, so it cannot be folded into the weights")
    eps = norm.eps
    _check_hyper(0.0, eps, who)
    if not isinstance(bn_state, RUNNING_STATS_TYPES):
        raise TypeError(f"{who}: the norm's state must hold running statistics `mean` and `var`, got "
                        f"{type(bn_state).__name__}")
    for w in (weights, bias):
        if w is not None and not jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating):
            raise TypeError(f"{who}: weights must be floating point (the folded ones are scaled), got dtype "
                            f"{jnp.asarray(w).dtype}")
    if bias is not None and tuple(bias.shape) != (num_out,):
        raise ValueError(f"{who}: bias has shape {tuple(bias.shape)}, expected ({num_out},) (one per output, the "
                         "weights' last axis)")
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
