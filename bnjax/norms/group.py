"""Group Norm and Layer Norm (Wu & He 2018, "Group Normalization") as values: ``GroupNorm``, ``group_norm()``,
``LayerNorm``, ``layer_norm()`` and their empty state ``GroupNormState``.

Neither keeps running statistics: each example is normalised by its own statistics, over all its non-batch axes
within a group of channels (features on the last axis: ``[N, C]`` or NHWC ``[N, H, W, C]``), in training and in
evaluation alike. Layer Norm is Group Norm with one group (Wu & He 2018, section 3.1), i.e. statistics over every
non-batch axis; Flax's ``LayerNorm`` reduces the last axis only by default, which is the same for ``[N, C]`` but
not for NHWC (there it is ``flax.linen.LayerNorm(reduction_axes=(1, 2, 3))``). Statistics are reduced in float32
(float64 for float64 input) whatever the input dtype, the variance in two passes; ``y`` has ``x``'s dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import _as_input, _check_flag, _check_float_dtype, _check_hyper, _check_mask, _is_bool, _static_float
from bnjax.norms.base import Norm
from bnjax.norms.core import CONVENTIONS, BatchNormParams

Array = jax.Array

__all__ = ["GroupNorm", "LayerNorm", "GroupNormState", "group_norm", "layer_norm"]


class GroupNormState(NamedTuple):
    """The state of a norm without running statistics (Group Norm, Layer Norm): empty, a pytree with no leaves.

    It is a type of its own (not ``()``) so that ``recalibrate`` can tell a network whose norms keep no running
    statistics (refused: there is nothing to re-estimate) from a network without a norm.
    """


def _check_num_groups(num_groups: Any, who: str) -> int:
    if _is_bool(num_groups) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"{who}: num_groups must be an integer >= 1, got {num_groups!r}")
    return int(num_groups)


def _check_divides(num_groups: int, num_channels: int, who: str) -> None:
    if num_channels % num_groups:
        raise ValueError(f"{who}: num_groups={num_groups} must divide the number of channels {num_channels} (the "
                         "last axis); choose a divisor of it")


def _fields(norm: Norm, who: str) -> None:
    """Checks and conversion of ``eps`` and the two flags (every field but ``num_groups``)."""
    object.__setattr__(norm, "eps", _static_float(norm.eps, "eps", who))
    _check_hyper(0.0, norm.eps, who)
    for name in ("use_scale", "use_offset"):
        object.__setattr__(norm, name, _check_flag(getattr(norm, name), name, who))


def _init(num_features: Any, dtype: Any, num_groups: int, use_scale: bool, use_offset: bool,
          who: str) -> tuple[BatchNormParams, GroupNormState]:
    """Per-channel scale (ones) and offset (zeros), ``None`` where disabled, and the empty state."""
    if _is_bool(num_features) or not isinstance(num_features, (int, np.integer)):
        raise TypeError(f"{who}: num_features must be an int (the channels, on the last axis), got "
                        f"{num_features!r}")
    if num_features < 1:
        raise ValueError(f"{who}: num_features must be positive, got {num_features!r}")
    _check_divides(num_groups, int(num_features), who)
    _check_float_dtype(dtype, who)
    shape = (int(num_features),)
    params = BatchNormParams(gamma=jnp.ones(shape, dtype) if use_scale else None,
                             beta=jnp.zeros(shape, dtype) if use_offset else None)
    return params, GroupNormState()


def _apply(params: Any, state: Any, x: Any, train: Any, mask: Any, num_groups: int, eps: float,
           who: str) -> tuple[Array, GroupNormState]:
    """The normalisation both values share (after ``train`` is checked: it changes nothing)."""
    _check_flag(train, "train", who)
    if not isinstance(state, GroupNormState):
        raise TypeError(f"{who}: state must be the GroupNormState that init returns (this norm keeps no running "
                        f"statistics), got {type(state).__name__}")
    if not (hasattr(params, "gamma") and hasattr(params, "beta")):
        raise TypeError(f"{who}: params must be a BatchNormParams(gamma, beta) from init, got "
                        f"{type(params).__name__}")
    x = _as_input(x, who)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{who}: x must have a batch axis and a channel axis (rank >= 2: [N, C] or [N, H, W, C]), "
                         f"got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    _check_divides(num_groups, channels, who)
    for name, v in (("gamma", params.gamma), ("beta", params.beta)):
        if v is not None and tuple(v.shape) != (channels,):
            raise ValueError(f"{who}: {name} has shape {tuple(v.shape)} but x {tuple(x.shape)} has {channels} "
                             "channels on its last axis; no broadcasting is done")
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    if mask is not None:
        if np.ndim(mask) != 1:
            raise ValueError(f"{who}: mask must be [N] (one flag per example, True = valid), got shape "
                             f"{tuple(np.shape(mask))} for x {tuple(x.shape)}; statistics never cross examples, so "
                             "only whole examples can be masked")
        mask = _check_mask(mask, x, (0,), who)
        # A select, not a product: a padding row may hold NaN or inf. A masked row becomes a row of zeros, which
        # normalises to beta and passes no gradient back to x.
        valid = mask.astype(bool).reshape((-1,) + (1,) * (x.ndim - 1))
        xs = jnp.where(valid, xs, jnp.zeros_like(xs))
    # [N, ..., C] -> [N, ..., G, C / G]: statistics per example and group, over every axis but N and G.
    g = xs.reshape(*x.shape[:-1], num_groups, channels // num_groups)
    red = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
    mean = jnp.mean(g, axis=red, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=red, keepdims=True)  # two-pass: never negative
    # Sums of squares past the dtype's max would make the variance inf and every output silently beta: NaN
    # instead (inf - inf), as batch norm's statistics do under a transformation; v - v adds 0 to a finite v.
    var = var + lax.stop_gradient(var - var)
    y = ((g - mean) * lax.rsqrt(var + jnp.asarray(eps, stat_dtype))).reshape(xs.shape)
    if params.gamma is not None:
        y = y * params.gamma.astype(stat_dtype)
    if params.beta is not None:
        y = y + params.beta.astype(stat_dtype)
    return y.astype(x.dtype), state


@dataclasses.dataclass(frozen=True)
class GroupNorm(Norm):
    """Group Norm (Wu & He 2018); build it with ``group_norm(num_groups)``."""

    has_running_stats: ClassVar[bool] = False

    num_groups: int = 32
    eps: float = CONVENTIONS["eps"]
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        who = "group_norm"
        object.__setattr__(self, "num_groups", _check_num_groups(self.num_groups, who))
        _fields(self, who)

    def init(self, num_features, dtype=jnp.float32):
        """Per-channel scale and offset, and the empty state.

        Args:
          num_features: the channels ``C``, an int divisible by ``num_groups``.
          dtype: parameter dtype, floating point.

        Returns:
          ``(BatchNormParams(gamma [C] or None, beta [C] or None), GroupNormState())``.

        Raises:
          TypeError: ``num_features`` not an int, a non-floating dtype.
          ValueError: ``num_features`` < 1 or not divisible by ``num_groups``.
        """
        return _init(num_features, dtype, self.num_groups, self.use_scale, self.use_offset, "group_norm.init")

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None):
        """Normalise each example by its own statistics (the same in training and evaluation).

        ``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with ``mean`` and the biased ``var`` of each example
        over all its non-batch axes within each group of ``C / num_groups`` consecutive channels; ``gamma`` and
        ``beta`` per channel.

        Args:
          params, state: from ``init``; the state is returned as it is.
          x: ``[N, C]``, ``[N, H, W, C]`` or any rank >= 2, channels on the last axis, floating point; bf16 and
            float16 inputs get float32 statistics and come back in their own dtype.
          train: a Python bool, required as for every norm; it changes nothing.
          momentum: accepted and ignored (no running statistics), so the engine's momentum axis passes through.
          mask: ``[N]`` valid-example flags (boolean or 0/1) or ``None``. Valid examples are unchanged by it
            (examples never share statistics); a masked example comes out as ``beta`` (0 without an offset),
            what a row of zeros normalises to, whatever it held (NaN and inf padding included), and passes no
            gradient back to ``x``.
          axis_name: accepted and ignored (statistics never cross examples, so never devices).

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape and dtype.

        Raises:
          TypeError: a flag that is not a bool, a state that is not a ``GroupNormState``, parameters that are not
            ``BatchNormParams``, a non-floating ``x``, a mask of non-numeric dtype.
          ValueError: rank < 2, a number of groups that does not divide the channels, parameters of another
            shape than ``[C]``, a mask that is not ``[N]`` or holds values other than 0 and 1. Sums of squares
            that overflow float32 give NaN outputs, not ``beta``.
        """
        del momentum, axis_name  # no running statistics; statistics never cross examples
        return _apply(params, state, x, train, mask, self.num_groups, self.eps, "group_norm.apply")


@dataclasses.dataclass(frozen=True)
class LayerNorm(Norm):
    """Layer Norm over every non-batch axis (Group Norm with one group); build it with ``layer_norm()``."""

    has_running_stats: ClassVar[bool] = False

    eps: float = CONVENTIONS["eps"]
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        _fields(self, "layer_norm")

    def init(self, num_features, dtype=jnp.float32):
        """Per-channel scale and offset, and the empty state.

        Args:
          num_features: the channels ``C`` (the last axis), an int.
          dtype: parameter dtype, floating point.

        Returns:
          ``(BatchNormParams(gamma [C] or None, beta [C] or None), GroupNormState())``.

        Raises:
          TypeError: ``num_features`` not an int, a non-floating dtype.
          ValueError: ``num_features`` < 1.
        """
        return _init(num_features, dtype, 1, self.use_scale, self.use_offset, "layer_norm.init")

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None):
        """Normalise each example by its own statistics over all its non-batch axes (``GroupNorm.apply`` with one
        group; the same in training and evaluation).

        Args:
          params, state, x, train, momentum, mask, axis_name: as ``GroupNorm.apply`` (``momentum`` and
            ``axis_name`` ignored; a masked example comes out as ``beta``).

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape and dtype.

        Raises:
          TypeError, ValueError: as ``GroupNorm.apply`` (every channel count is valid).
        """
        del momentum, axis_name  # no running statistics; statistics never cross examples
        return _apply(params, state, x, train, mask, 1, self.eps, "layer_norm.apply")


def group_norm(num_groups: int, *, eps: float = CONVENTIONS["eps"], use_scale: bool = True,
               use_offset: bool = True) -> GroupNorm:
    """Group Norm (Wu & He 2018) as a value: each example normalised over its non-batch axes within each of
    ``num_groups`` groups of consecutive channels; no running statistics, the same in training and evaluation.

    ``num_groups=1`` is ``layer_norm()``'s statistics and ``num_groups=C`` Instance Norm's; Wu & He's default is
    32 groups. Flax's ``nn.GroupNorm(num_groups, epsilon=eps)`` gives the same numbers (with
    ``use_fast_variance=False``, the two-pass variance used here).

    Args:
      num_groups: groups of channels, an integer >= 1 that divides the channels (checked at ``init`` and
        ``apply``).
      eps: added to the variance, > 0 (1e-6 as the other norms here and Flax; Wu & He and PyTorch use 1e-5).
      use_scale, use_offset: learn a per-channel gamma / beta.

    Returns:
      a ``GroupNorm``.

    Raises:
      ValueError: ``num_groups`` not an integer >= 1, ``eps`` not positive and finite.
      TypeError: a non-real ``eps`` or non-bool flags.
    """
    return GroupNorm(num_groups, eps, use_scale, use_offset)


def layer_norm(*, eps: float = CONVENTIONS["eps"], use_scale: bool = True, use_offset: bool = True) -> LayerNorm:
    """Layer Norm as a value: each example normalised over all its non-batch axes (Group Norm with one group,
    as Wu & He 2018 define it); a per-channel gamma and beta; no running statistics.

    For ``[N, C]`` this is Flax's ``nn.LayerNorm()``; for NHWC it is ``nn.LayerNorm(reduction_axes=(1, 2, 3))``
    (Flax's default reduces the last axis only, i.e. per pixel).

    Args:
      eps: added to the variance, > 0.
      use_scale, use_offset: learn a per-channel gamma / beta.

    Returns:
      a ``LayerNorm``.

    Raises:
      ValueError: ``eps`` not positive and finite.
      TypeError: a non-real ``eps`` or non-bool flags.
    """
    return LayerNorm(eps, use_scale, use_offset)
