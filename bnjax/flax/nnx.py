"""bnjax's norms as ``flax.nnx`` modules: ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``GroupNorm``,
``LayerNorm``.

Drop-in for ``nnx.BatchNorm``: the constructor ``(num_features, *, use_running_average=False, axis=-1, momentum,
epsilon, dtype, param_dtype, use_bias, use_scale, bias_init, scale_init, axis_name, rngs)``, the call ``(x,
use_running_average=None, *, mask=None)``, ``scale``/``bias`` as ``nnx.Param`` and ``mean``/``var`` (plus ``step``
for ``BatchRenorm``) as ``nnx.BatchStat``, and ``use_running_average`` switched by ``model.train()`` /
``model.eval()`` (and ``nnx.view`` where Flax has it)::

    from flax import nnx
    from bnjax.flax import nnx as bnnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
            self.norm = bnnx.BatchRenorm(16, rngs=rngs)        # was nnx.BatchNorm(16, rngs=rngs)
            self.head = nnx.Linear(16, 10, rngs=rngs)

Each call builds the bnjax norm value and calls its ``apply`` (no formula of its own). The differences from
``nnx.BatchNorm`` are those of ``bnjax.flax.linen`` (bnjax/flax/linen.py): ``momentum`` 0.9 by default (Flax's
0.99 lags the weights on short runs), two-pass float32 statistics reduced exactly across ``axis_name``, a mask
that selects whole rows; no ``axis_index_groups``, ``use_fast_variance`` or ``promote_dtype``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from bnjax import layers
from bnjax.flax import _common

Array = jax.Array
Initializer = Any

__all__ = ["BatchNorm", "BatchRenorm", "GhostBatchNorm", "GroupNorm", "LayerNorm"]

def _maybe_param(use: bool, init: Initializer, rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any) -> Any:
    return nnx.Param(init(rngs.params(), shape, dtype)) if use else (nnx.data(None) if hasattr(nnx, "data") else None)


def _params(module: Any) -> layers.BatchNormParams:
    """The module's ``scale``/``bias`` as bnjax's ``BatchNormParams`` (``None`` where disabled)."""
    scale = None if module.scale is None else module.scale[...]
    bias = None if module.bias is None else module.bias[...]
    return layers.BatchNormParams(gamma=scale, beta=bias)


class _BatchFamily(nnx.Module):
    """The batch norms' shared constructor and call (a private base; use the classes below)."""

    _kind = "batch"

    def __init__(self, num_features: int | tuple[int, ...], *, use_running_average: bool = False, axis: Any = -1,
                 momentum: float = 0.9, epsilon: float = 1e-5, dtype: Any = None, param_dtype: Any = jnp.float32,
                 use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 scale_init: Initializer = nnx.initializers.ones_init(), axis_name: Any = None,
                 rngs: nnx.Rngs, **extra: Any):
        who = f"bnjax.flax.nnx.{type(self).__name__}"
        shape = _common.num_features_shape(num_features, who)
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        for name, value in extra.items():  # the variants' own options (r_max, virtual_batch_size, ...)
            setattr(self, name, value)
        _, state = self.norm_value().init(shape, param_dtype)  # checks the options once, here
        for name, value in state._asdict().items():
            setattr(self, name, nnx.BatchStat(value))
        self.scale = _maybe_param(use_scale, scale_init, rngs, shape, param_dtype)
        self.bias = _maybe_param(use_bias, bias_init, rngs, shape, param_dtype)

    def norm_value(self) -> Any:
        """The bnjax norm value this module applies (``bnjax.layers.batch_norm(momentum, epsilon, ...)``, ...).

        Returns:
          a ``bnjax.layers.Norm``.
        """
        return _common.norm_value(self._kind, **{f: getattr(self, f, None) for f in _OPTIONS})

    def _state(self) -> Any:
        names = _common.RENORM_STAT_NAMES if self._kind == "renorm" else _common.STAT_NAMES
        state_type = layers.BatchRenormState if self._kind == "renorm" else layers.BatchNormState
        return state_type(**{n: getattr(self, n)[...] for n in names})

    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalise ``x`` with batch statistics (training: the ``BatchStat``s are updated) or the running ones.

        Args:
          x: the input, features on ``axis``; floating point.
          use_running_average: overrides the attribute (which ``model.train()``/``eval()`` set) for this call; a
            Python bool.
          mask: Flax's mask: broadcastable to ``x``, True where a value enters the statistics; constant over the
            feature axes (it selects rows).

        Returns:
          the normalised input, of ``x``'s shape, in ``dtype`` or the promotion of ``x``'s and the parameters'.

        Raises:
          ValueError: running statistics or parameters of another feature size, a mask that does not broadcast
            or differs across features, or as the norm value's ``apply``.
          TypeError: a traced or non-bool ``use_running_average``, a non-floating ``x``.
        """
        who = f"bnjax.flax.nnx.{type(self).__name__}"
        use_ra = _common.check_train_flag(
            self.use_running_average if use_running_average is None else use_running_average, who)
        x = _common.as_float_input(x, who)
        faxes = _common.feature_axes(x.ndim, self.axis, who)
        fshape = _common.feature_shape(x.shape, faxes)
        params, state = _params(self), self._state()
        for name, value in (("mean", state.mean), ("var", state.var), ("scale", params.gamma),
                            ("bias", params.beta)):
            if value is not None:
                _common.check_shape(name, value, fshape, x.shape, faxes, "variable", who)
        y, new_state = _common.apply_norm(self.norm_value(), params, state, x, train=not use_ra, faxes=faxes,
                                          axis_name=self.axis_name, mask=mask, dtype=self.dtype, who=who)
        if not use_ra:
            for name, value in new_state._asdict().items():
                # As nnx.BatchNorm: running statistics are not differentiated.
                getattr(self, name)[...] = lax.stop_gradient(value)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """What ``nnx.view(model, use_running_average=...)`` calls (Flax versions that have it).

        Args:
          use_running_average: the new attribute, or ``None`` to keep it.
        """
        if use_running_average is not None:
            self.use_running_average = use_running_average


_OPTIONS = ("momentum", "epsilon", "use_scale", "use_bias", "r_max", "d_max", "warmup", "running_average",
            "virtual_batch_size", "num_groups")


class BatchNorm(_BatchFamily):
    """Batch norm (bnjax's ``layers.batch_norm``) as an NNX module; a drop-in for ``nnx.BatchNorm``.

    ``momentum`` defaults to 0.9, not Flax's 0.99: a 0.99 running average lags the weights on short runs
    (docs/frameworks.md: in docs/examples/flax_renorm.py, 300 steps of 4 images, Flax's ``nn.BatchNorm`` ends at
    0.836 held-out accuracy with 0.99 and 0.844 with 0.9).
    ``BatchNorm(C, momentum=m, epsilon=e, rngs=rngs)`` gives the numbers of ``nnx.BatchNorm(C, momentum=m,
    epsilon=e, use_fast_variance=False, rngs=rngs)`` (to rounding).

    Args:
      num_features: the feature size (a tuple for several feature axes).
      use_running_average: False (train) by default, as ``nnx.BatchNorm``; ``model.eval()`` sets it True.
      axis: the feature axis (or axes).
      momentum: ``new = momentum * old + (1 - momentum) * batch``; 0.9.
      epsilon: added to the variance; Flax's 1e-5.
      dtype: the output dtype (``None``: the promotion of the input's and the parameters').
      param_dtype: the parameters' dtype (running statistics are float32).
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initialisers.
      axis_name: a bound axis to reduce the statistics across.
      rngs: ``nnx.Rngs`` for the initialisers.
    """


class BatchRenorm(_BatchFamily):
    """Batch Renormalization (Ioffe 2017; bnjax's ``layers.batch_renorm``) as an NNX module: ``BatchNorm``'s
    arguments plus the limits; ``mean``, ``var`` and ``step`` are ``nnx.BatchStat``s.

    Args:
      num_features: the feature size.
      r_max, d_max: the clipping limits (3 and 5).
      warmup: ``(hold_steps, r_steps, d_steps)`` or ``None`` (fixed limits).
      running_average: ``'var'`` or ``'std'``.
      kwargs: as ``BatchNorm`` (``rngs`` required).
    """

    _kind = "renorm"

    def __init__(self, num_features: int | tuple[int, ...], *, r_max: float = 3.0, d_max: float = 5.0,
                 warmup: tuple[int, int, int] | None = None, running_average: str = "var", **kwargs: Any):
        super().__init__(num_features, r_max=r_max, d_max=d_max, warmup=warmup, running_average=running_average,
                         **kwargs)


class GhostBatchNorm(_BatchFamily):
    """Ghost (virtual) batch norm (Hoffer et al. 2017; bnjax's ``layers.ghost_batch_norm``) as an NNX module.

    Args:
      num_features: the feature size.
      virtual_batch_size: rows per group (32); groups are made of axis 0 on each device.
      kwargs: as ``BatchNorm`` (``rngs`` required).
    """

    _kind = "ghost"

    def __init__(self, num_features: int | tuple[int, ...], *, virtual_batch_size: int = 32, **kwargs: Any):
        super().__init__(num_features, virtual_batch_size=virtual_batch_size, **kwargs)


class _PerExample(nnx.Module):
    """Group and Layer Norm's shared constructor and call (a private base)."""

    _kind = "layer"

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype: Any = None,
                 param_dtype: Any = jnp.float32, use_bias: bool = True, use_scale: bool = True,
                 bias_init: Initializer = nnx.initializers.zeros_init(),
                 scale_init: Initializer = nnx.initializers.ones_init(), rngs: nnx.Rngs, **extra: Any):
        self.num_features = num_features
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        for name, value in extra.items():
            setattr(self, name, value)
        self.norm_value().init(num_features, param_dtype)  # checks the options and num_features once
        self.scale = _maybe_param(use_scale, scale_init, rngs, (num_features,), param_dtype)
        self.bias = _maybe_param(use_bias, bias_init, rngs, (num_features,), param_dtype)

    def norm_value(self) -> Any:
        """The bnjax norm value this module applies (``bnjax.layers.group_norm``/``layer_norm``).

        Returns:
          a ``bnjax.layers.Norm``.
        """
        return _common.norm_value(self._kind, **{f: getattr(self, f, None) for f in _OPTIONS})

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalise each example of ``x`` (channels last) by its own statistics.

        Args:
          x: ``[N, ..., C]``, floating point.
          mask: Flax's mask; it must flag whole examples (a masked example comes out as ``bias``).

        Returns:
          the normalised input, of ``x``'s shape.

        Raises:
          ValueError: parameters of another channel count, a mask that does not flag whole examples, or as the
            norm value's ``apply``.
          TypeError: a non-floating ``x``.
        """
        who = f"bnjax.flax.nnx.{type(self).__name__}"
        x = _common.as_float_input(x, who)
        if x.ndim < 2:
            raise ValueError(f"{who}: x must be [N, ..., C] (rank >= 2), got shape {tuple(x.shape)}")
        params = _params(self)
        for name, value in (("scale", params.gamma), ("bias", params.beta)):
            if value is not None:
                _common.check_shape(name, value, (int(x.shape[-1]),), x.shape, (x.ndim - 1,), "variable", who)
        y, _ = _common.apply_norm(self.norm_value(), params, layers.GroupNormState(), x, train=False,
                                  faxes=(x.ndim - 1,), axis_name=None, mask=mask, dtype=self.dtype, who=who)
        return y


class GroupNorm(_PerExample):
    """Group Norm (Wu & He 2018; bnjax's ``layers.group_norm``) as an NNX module, named as ``nnx.GroupNorm``.

    Equals ``nnx.GroupNorm(C, num_groups=g, epsilon=e, use_fast_variance=False)``; no running statistics.

    Args:
      num_features: the channels ``C`` (the last axis).
      num_groups: groups of consecutive channels (32), dividing ``C``.
      kwargs: ``epsilon`` (Flax's 1e-6), ``dtype``, ``param_dtype``, ``use_bias``, ``use_scale``, ``bias_init``,
        ``scale_init``, ``rngs`` (required).
    """

    _kind = "group"

    def __init__(self, num_features: int, num_groups: int = 32, **kwargs: Any):
        super().__init__(num_features, num_groups=num_groups, **kwargs)


class LayerNorm(_PerExample):
    """Layer Norm over ALL non-batch axes (bnjax's ``layers.layer_norm``; Group Norm with one group) as an NNX
    module. For ``[N, C]`` it is ``nnx.LayerNorm(C)``; for NHWC ``nnx.LayerNorm(C, reduction_axes=(1, 2, 3))``
    (Flax's default reduces the last axis only).

    Args:
      num_features: the channels ``C`` (the last axis).
      kwargs: as ``GroupNorm`` (without ``num_groups``).
    """

    def __init__(self, num_features: int, **kwargs: Any):
        super().__init__(num_features, **kwargs)
