"""Group Norm and Layer Norm (Wu & He 2018) as Equinox layers: ``GroupNorm``, ``LayerNorm``.

Each holds a bnjax norm value (``bnjax.norms.group_norm``/``layer_norm``) as a static field and its per-channel
``weight``/``bias``; the call gives the channels-first example to the value's ``apply`` as a batch of one,
channels last. They keep no running statistics, so they are plain layers, as Equinox's own.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

from bnjax.equinox.layers import EPS, _example, _flag, _param_dtype, _size
from bnjax.norms import BatchNormParams, GroupNormState, Norm, group_norm, layer_norm

Array = jax.Array

__all__ = ["GroupNorm", "LayerNorm"]

_NO_STATE = object()  # "called without a state", as eqx.nn.GroupNorm's sentinel


class _ExampleNorm(eqx.Module):
    """What Group Norm and Layer Norm share: per-example statistics, no state, Equinox's optional-state call."""

    weight: Array | None
    bias: Array | None
    norm: Norm = eqx.field(static=True)
    channels: int = eqx.field(static=True)

    @property
    def eps(self) -> float:
        """Added to the variance (the norm value's)."""
        return self.norm.eps

    def __call__(self, x: Array, state: Any = _NO_STATE, *, key: Any = None) -> Any:
        """Normalise one example by its own statistics (the same in training and inference).

        Args:
          x: one example, channels first: ``[channels]`` or ``[channels, *spatial]``, floating point.
          state: optional; passed through unchanged (so the layer drops into a stateful model's call as
            ``eqx.nn.GroupNorm`` does).
          key: ignored (Equinox's layer API).

        Returns:
          ``y`` of ``x``'s shape and dtype (statistics in float32), or ``(y, state)`` when a state is given.

        Raises:
          TypeError: a non-floating ``x``.
          ValueError: ``x`` whose first axis is not ``channels``.
        """
        del key
        who = f"bnjax.equinox.{type(self).__name__}"
        x = _example(x, self.channels, "channels", who)
        # bnjax's group and layer norms take channels last with a leading batch axis: [1, *spatial, C].
        y, _ = self.norm.apply(BatchNormParams(self.weight, self.bias), GroupNormState(),
                               jnp.moveaxis(x, 0, -1)[None], train=True)
        y = jnp.moveaxis(y[0], -1, 0)
        return y if state is _NO_STATE else (y, state)


class GroupNorm(_ExampleNorm):
    """Group Norm (Wu & He 2018; ``bnjax.layers.group_norm``) as an Equinox layer, called as ``eqx.nn.GroupNorm``.

    Each example ``[C, *spatial]`` is normalised over each group of ``C / groups`` consecutive channels and every
    spatial axis, two-pass in float32; ``weight``, ``bias`` per channel. It keeps no running statistics, so it is
    a plain layer (not an ``eqx.nn.StatefulLayer``), as Equinox's own: ``y = norm(x)``, or
    ``y, state = norm(x, state)`` in a stateful model. ``eps`` is Equinox's 1e-5.

    Attributes:
      weight, bias: ``[channels]`` or ``None``.
      norm: the bnjax norm value (static).
      groups, channels, channelwise_affine, eps: as given.
    """

    groups: int = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)

    def __init__(self, groups: int, channels: int, eps: float = EPS, channelwise_affine: bool = True,
                 dtype: Any = None):
        """Builds the layer.

        Args:
          groups: groups of channels, an integer >= 1 dividing ``channels``.
          channels: the channels ``C`` (required, unlike ``eqx.nn.GroupNorm``: the parameters and the input check
            need it).
          eps: added to the variance, > 0.
          channelwise_affine: learn a per-channel ``weight`` and ``bias``.
          dtype: the parameters' dtype; ``None`` for the default floating dtype.

        Raises:
          ValueError: ``groups`` or ``channels`` not an integer >= 1, ``groups`` not dividing ``channels``, a bad
            ``eps``.
          TypeError: a flag that is not a bool, a non-floating ``dtype``.
        """
        who = "bnjax.equinox.GroupNorm"
        self.channelwise_affine = _flag(channelwise_affine, "channelwise_affine", who)
        self.groups = _size(groups, "groups", who)
        self.channels = _size(channels, "channels", who)
        if self.channels % self.groups:
            raise ValueError(f"{who}: groups={self.groups} must divide channels={self.channels} (each group holds "
                             "channels / groups consecutive channels)")
        self.norm = group_norm(self.groups, eps=eps, use_scale=self.channelwise_affine,
                               use_offset=self.channelwise_affine)
        params, _ = self.norm.init(self.channels, _param_dtype(dtype, who))
        self.weight, self.bias = params.gamma, params.beta


class LayerNorm(_ExampleNorm):
    """Layer Norm over the whole example (``bnjax.layers.layer_norm``; Group Norm with one group) as an Equinox
    layer.

    Each example ``[C, *spatial]`` is normalised over all its axes, two-pass in float32, with a per-channel
    ``weight`` and ``bias`` (``eqx.nn.LayerNorm(shape)`` has one per element; for ``[C]`` examples the two are
    the same). A plain layer, called as ``eqx.nn.LayerNorm``: ``y = norm(x)`` or ``y, state = norm(x, state)``.
    ``eps`` is Equinox's 1e-5.

    Attributes:
      weight, bias: ``[channels]`` or ``None``.
      norm: the bnjax norm value (static).
      channels, use_weight, use_bias, eps: as given.
    """

    use_weight: bool = eqx.field(static=True)
    use_bias: bool = eqx.field(static=True)

    def __init__(self, channels: int, eps: float = EPS, use_weight: bool = True, use_bias: bool = True,
                 dtype: Any = None):
        """Builds the layer.

        Args:
          channels: the channels ``C`` (the first axis of each example).
          eps: added to the variance, > 0.
          use_weight, use_bias: learn a per-channel scale / offset.
          dtype: the parameters' dtype; ``None`` for the default floating dtype.

        Raises:
          ValueError: ``channels`` not an integer >= 1, a bad ``eps``.
          TypeError: a flag that is not a bool, a non-floating ``dtype``.
        """
        who = "bnjax.equinox.LayerNorm"
        self.use_weight = _flag(use_weight, "use_weight", who)
        self.use_bias = _flag(use_bias, "use_bias", who)
        self.channels = _size(channels, "channels", who)
        self.norm = layer_norm(eps=eps, use_scale=self.use_weight, use_offset=self.use_bias)
        params, _ = self.norm.init(self.channels, _param_dtype(dtype, who))
        self.weight, self.bias = params.gamma, params.beta
