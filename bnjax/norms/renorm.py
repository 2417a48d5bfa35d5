"""Batch Renormalization (Ioffe 2017) as a value: ``BatchRenorm``, ``batch_renorm()``, ``renorm_schedule``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import _check_per_feature, _is_bool, _real_values, _static_float
from bnjax.norms.base import Norm, _common_fields, _start_apply
from bnjax.norms.core import (CONVENTIONS, BatchRenormState, _batch_stats, _blend, _normalize, _refuse_overflow,
                              _running_update, batch_norm_init)

__all__ = ["BatchRenorm", "BatchRenormState", "batch_renorm", "renorm_schedule"]


def renorm_schedule(
    step: Any,
    r_max: float = 3.0,
    d_max: float = 5.0,
    *,
    hold_steps: int = 5000,
    r_steps: int = 40000,
    d_steps: int = 25000,
) -> tuple[Any, Any]:
    """Ioffe (2017)'s warm-up of Batch Renorm's clipping limits: ``(r_max(step), d_max(step))``.

    ``r_max = 1`` and ``d_max = 0`` (plain batch norm) for the first ``hold_steps`` updates, then rising
    linearly to ``r_max`` at ``r_steps`` and ``d_max`` at ``d_steps``, constant afterwards (the paper's
    numbers by default: 5k, 40k and 25k updates). ``step`` may be traced; jit- and vmap-friendly.

    Args:
      step: the number of updates made (a scalar, possibly traced).
      r_max, d_max: the final limits (may be traced).
      hold_steps, r_steps, d_steps: Python integers >= 0, ``hold_steps <= min(r_steps, d_steps)``.

    Returns:
      ``(r_max(step), d_max(step))`` as scalars of the default float dtype.

    Raises:
      ValueError: bad step counts, or concrete limits with ``r_max < 1``, ``d_max < 0`` or not finite.
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

    has_running_stats: ClassVar[bool] = True

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
        """Parameters and a ``BatchRenormState`` (update count 0).

        Args:
          num_features: feature size ``C`` or a shape tuple.
          dtype: parameter dtype.

        Returns:
          ``(BatchNormParams, BatchRenormState)``.

        Raises:
          TypeError, ValueError: as ``batch_norm_init``.
        """
        params, state = batch_norm_init(num_features, use_scale=self.use_scale, use_offset=self.use_offset,
                                        init_mean=self.init_mean, init_var=self.init_var, dtype=dtype)
        return params, BatchRenormState(state.mean, state.var, jnp.zeros((), jnp.int32))

    def limits(self, step: Any) -> tuple[Any, Any]:
        """``(r_max, d_max)`` at update ``step``: the fixed values, or the warm-up schedule's.

        Args:
          step: the update count (may be traced).

        Returns:
          ``(r_max, d_max)``.
        """
        if self.warmup is None:
            return self.r_max, self.d_max
        hold, r_steps, d_steps = self.warmup
        return renorm_schedule(step, self.r_max, self.d_max, hold_steps=hold, r_steps=r_steps, d_steps=d_steps)

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None, r_max=None, d_max=None,
              update_stats=None, feature_axes=-1):
        """Training: batch statistics corrected by ``r`` and ``d``; evaluation: the running statistics.

        With the batch mean ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` and the running ``mu``,
        ``sigma = sqrt(var + eps)``: ``r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))``,
        ``d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))``,
        ``y = gamma * ((x - mu_B) / sigma_B * r + d) + beta``.

        Args:
          params, state: from ``init`` (``BatchNormParams``, ``BatchRenormState``).
          x, train, mask, axis_name, feature_axes: as ``batch_norm_apply`` (``train`` required).
          momentum: ``None`` for the value's own, or an override; may be traced.
          r_max, d_max: override the value's limits (and its warm-up) for this call; may be traced.
          update_stats: fold the batch statistics into the running ones (default: ``train``).

        Returns:
          ``(y, new_state)``; ``new_state.step`` counts the updates made.

        Raises:
          TypeError: a state that is not a ``BatchRenormState``, or as ``batch_norm_apply``.
          ValueError: concrete limits out of range, limits neither scalars nor one value per feature (checked on
            the shape, also when traced), or as ``batch_norm_apply``.
        """
        who = "batch_renorm.apply"
        if not isinstance(state, BatchRenormState):
            raise TypeError(f"{who}: state must be a BatchRenormState (from batch_renorm(...).init), got "
                            f"{type(state).__name__}; Batch Renorm counts its updates for the warm-up")
        train, update_stats, momentum, x, faxes, mask = _start_apply(
            self, params, state, x, train, update_stats, momentum, feature_axes, mask, who, axis_name)
        if not train and not update_stats:
            return _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes), state
        mean_b, var_b, count = _batch_stats(x, faxes, axis_name, mask)
        _refuse_overflow(x, mask, faxes, mean_b, var_b, who)
        stat_dtype = mean_b.dtype
        eps = jnp.asarray(self.eps, stat_dtype)
        sigma_b = jnp.sqrt(var_b + eps)
        sigma = jnp.sqrt(state.var.astype(stat_dtype) + eps)
        new_state = state
        if update_stats:
            new_mean, new_var, has_rows = _running_update(state, mean_b, var_b, count, momentum)
            if self.running_average == "std":  # the paper's: sigma := sigma + alpha (sigma_B - sigma), stored as
                new_sigma = _blend(momentum, sigma.astype(state.var.dtype), sigma_b)  # var = sigma^2 - eps
                new_var = jnp.where(has_rows, jnp.maximum(jnp.square(new_sigma) - eps.astype(state.var.dtype), 0.0),
                                    state.var)
            new_state = BatchRenormState(mean=new_mean, var=new_var,
                                         step=state.step + has_rows.astype(state.step.dtype))
        if not train:
            y = _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes)
            return y, new_state
        _check_limits(r_max if r_max is not None else 1.0, d_max if d_max is not None else 0.0, who)
        for name, value in (("r_max", r_max), ("d_max", d_max)):
            _check_per_feature(value, name, mean_b.shape, who)
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
      init_mean, init_var: initial running statistics; 0 and 1 by default (``r`` divides by the running
        ``sigma``, which would start at ``sqrt(eps)`` from a variance of 0).
      use_scale, use_offset: learn gamma / beta.

    Returns:
      a ``BatchRenorm``.

    Raises:
      TypeError: non-real hyper-parameters or non-bool flags.
      ValueError: out-of-range hyper-parameters, a bad ``warmup`` or ``running_average``.
    """
    return BatchRenorm(momentum, eps, r_max, d_max, warmup, running_average, init_mean, init_var, use_scale,
                       use_offset)
