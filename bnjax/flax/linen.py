"""bnjax's norms as ``flax.linen`` modules: ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``GroupNorm``,
``LayerNorm``.

Drop-in for ``flax.linen.BatchNorm``: the same constructor and call (``use_running_average`` as attribute or
call argument, merged with ``nn.merge_param``; ``axis``, ``momentum``, ``epsilon``, ``use_bias``/``use_scale``,
``bias_init``/``scale_init``, ``axis_name``, ``dtype``/``param_dtype``; ``mask=`` in the call), the parameters
``scale``/``bias`` and the ``batch_stats`` collection (``mean``, ``var``; plus ``step`` for ``BatchRenorm``) under
Flax's names and shapes, so ``model.apply(variables, x, mutable=['batch_stats'])`` loops work unchanged and a Flax
``BatchNorm`` checkpoint loads as it is::

    import flax.linen as nn
    from bnjax.flax import linen as bnn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(16, (3, 3), use_bias=False)(x)
            x = bnn.BatchRenorm(use_running_average=not train)(x)   # was nn.BatchNorm(...)
            return nn.Dense(10)(nn.relu(x).mean((1, 2)))

Each call builds the bnjax norm value (``bnjax.layers.batch_norm(momentum, epsilon, ...)``, ...) and calls its
``apply``: statistics, normalisation and the running update are bnjax's (docs/norms.md). What differs from
``flax.linen.BatchNorm``, on purpose:

* ``momentum`` defaults to 0.9 (bnjax's), not Flax's 0.99: on short runs a 0.99 running average lags the
  weights (docs/frameworks.md: in docs/examples/flax_renorm.py, 300 steps of 4 images, Flax's ``nn.BatchNorm`` ends
  at 0.836 held-out accuracy with 0.99 and 0.844 with 0.9). The convention is Flax's: ``new = momentum * old + (1 -
  momentum) * batch``.
* the batch variance is two-pass in float32 (Flax's ``use_fast_variance=False``; there is no one-pass option),
  and with ``axis_name`` the sums and counts are reduced across devices, so unequal shards and masks give the
  statistics of the whole batch (Flax averages the per-device means).
* ``mask`` must select whole rows: constant over the feature axes (a per-feature mask is refused).
* while initialising (``model.init``) the output is the evaluation one (the starting statistics, this device
  only), so a one-example sample input initialises every module; the running statistics are not updated
  there, as in Flax.
* ``axis_index_groups``, ``use_fast_variance`` and ``force_float32_reductions`` do not exist.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnjax import layers
from bnjax.flax import _common

Array = jax.Array
Initializer = Any

__all__ = ["BatchNorm", "BatchRenorm", "GhostBatchNorm", "GroupNorm", "LayerNorm"]


class _BatchFamily(nn.Module):
    """The batch norms' shared attributes and call (a private base; use the classes below)."""

    use_running_average: bool | None = None
    axis: int | Sequence[int] = -1
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones
    axis_name: str | None = None

    _kind = "batch"

    def norm_value(self) -> Any:
        """The bnjax norm value this module applies (``bnjax.layers.batch_norm(momentum, epsilon, ...)``, ...).

        Returns:
          a ``bnjax.layers.Norm``.
        """
        return _common.norm_value(self._kind, **{f: getattr(self, f, None) for f in _OPTIONS})

    @nn.compact
    def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
        """Normalise ``x`` with batch statistics (training) or the running ones (evaluation).

        Args:
          x: the input, features on ``axis``; floating point.
          use_running_average: True to evaluate with the running statistics, False to train (batch statistics,
            running ones updated: make ``batch_stats`` mutable). Given here or as the attribute, not both
            (``nn.merge_param``); a Python bool.
          mask: Flax's mask: broadcastable to ``x``, True where a value enters the statistics; it must be
            constant over the feature axes (it selects rows).

        Returns:
          the normalised input, of ``x``'s shape; its dtype ``dtype``, or the promotion of ``x``'s and the
          parameters' (Flax's rule).

        Raises:
          ValueError: ``use_running_average`` given twice or never, missing ``batch_stats`` (wrong collection
            name), variables of another feature size, training with ``batch_stats`` immutable, a mask that does
            not broadcast or differs across features, or as the norm value's ``apply``.
          TypeError: a traced or non-bool ``use_running_average``, a non-floating ``x``.
        """
        who = f"bnjax.flax.linen.{type(self).__name__}"
        use_ra = _common.check_train_flag(
            nn.merge_param("use_running_average", self.use_running_average, use_running_average), who)
        x = _common.as_float_input(x, who)
        faxes = _common.feature_axes(x.ndim, self.axis, who)
        fshape = _common.feature_shape(x.shape, faxes)
        norm = self.norm_value()
        initializing = self.is_initializing()
        names = _common.RENORM_STAT_NAMES if self._kind == "renorm" else _common.STAT_NAMES
        if not initializing:
            _check_variables(self, names, fshape, x.shape, faxes, who)

        def start(name):
            return getattr(norm.init(fshape, self.param_dtype)[1], name)

        stats = {n: self.variable("batch_stats", n, start, n) for n in names}
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
        params = layers.BatchNormParams(gamma=scale, beta=bias)
        state_type = layers.BatchRenormState if self._kind == "renorm" else layers.BatchNormState
        state = state_type(**{n: v.value for n, v in stats.items()})
        if initializing:
            return _common.init_output(norm, params, state, x, faxes=faxes, dtype=self.dtype, who=who)
        if not use_ra and not self.is_mutable_collection("batch_stats"):
            raise ValueError(f"{who}: training (use_running_average=False) updates the running statistics, but the "
                             "'batch_stats' collection is immutable: call model.apply(variables, x, "
                             "mutable=['batch_stats']), or evaluate with use_running_average=True")
        y, new_state = _common.apply_norm(norm, params, state, x, train=not use_ra, faxes=faxes,
                                          axis_name=self.axis_name, mask=mask, dtype=self.dtype, who=who)
        if not use_ra:
            for n, v in stats.items():
                v.value = getattr(new_state, n)
        return y


_OPTIONS = ("momentum", "epsilon", "use_scale", "use_bias", "r_max", "d_max", "warmup", "running_average",
            "virtual_batch_size", "num_groups")


def _check_variables(module: nn.Module, names: Sequence[str], fshape: tuple[int, ...], x_shape: tuple[int, ...],
                     faxes: tuple[int, ...], who: str) -> None:
    """Outside ``init``: the running statistics must be there (under ``batch_stats``), and every stored variable
    must have this input's feature shape."""
    missing = [n for n in names if not module.has_variable("batch_stats", n)]
    if missing:
        found = sorted(module.variables.keys())
        raise ValueError(f"{who}: no running statistics {missing} in the 'batch_stats' collection (this module's "
                         f"variables hold the collections {found}); pass the variables model.init returned, with "
                         "the running statistics under 'batch_stats' (Flax's name), e.g. model.apply({'params': "
                         "params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])")
    for col, name in [("batch_stats", n) for n in names if n != "step"] + [("params", "scale"), ("params", "bias")]:
        if module.has_variable(col, name):
            _common.check_shape(name, module.get_variable(col, name), fshape, x_shape, faxes, col, who)


class BatchNorm(_BatchFamily):
    """Batch norm (bnjax's ``layers.batch_norm``) as a linen module; a drop-in for ``flax.linen.BatchNorm``.

    ``momentum`` defaults to 0.9, not Flax's 0.99: a 0.99 running average lags the weights on short runs
    (docs/frameworks.md: in docs/examples/flax_renorm.py, 300 steps of 4 images, Flax's ``nn.BatchNorm`` ends at
    0.836 held-out accuracy with 0.99 and 0.844 with 0.9). ``bnjax.flax.linen.BatchNorm(momentum=m, epsilon=e)``
    gives the numbers of
    ``flax.linen.BatchNorm(momentum=m, epsilon=e, use_fast_variance=False)`` (to rounding) on one device; across
    devices bnjax's are the whole batch's statistics also for unequal shards.

    Attributes:
      use_running_average: True to evaluate with the running statistics, False to train; or per call.
      axis: the feature axis (or axes); -1 for ``[N, C]`` and NHWC, 1 for NCHW.
      momentum: ``new = momentum * old + (1 - momentum) * batch``, in [0, 1]; 0.9.
      epsilon: added to the variance; Flax's 1e-5.
      dtype: the output dtype (``None``: the promotion of the input's and the parameters').
      param_dtype: the parameters' dtype (running statistics are float32).
      use_bias, use_scale: learn ``bias`` / ``scale``.
      bias_init, scale_init: their initialisers (zeros, ones).
      axis_name: a bound ``vmap``/``pmap``/``shard_map`` axis to reduce the statistics across.
    """


class BatchRenorm(_BatchFamily):
    """Batch Renormalization (Ioffe 2017; bnjax's ``layers.batch_renorm``) as a linen module.

    Flax has no Batch Renorm of its own; CrossQ's deep-RL results (Bhatt et al., ICLR 2024) used one. Training
    normalises with the batch statistics corrected by ``r`` and ``d`` (clipped to ``r_max`` and ``d_max``) so the
    output depends on the running statistics as evaluation does. ``batch_stats`` holds ``mean``, ``var`` and
    ``step`` (the number of updates, which drives ``warmup``). Other attributes and defaults as ``BatchNorm``
    (momentum 0.9: see there).

    Attributes:
      r_max, d_max: the clipping limits (3 and 5); ``r_max=1, d_max=0`` is batch norm.
      warmup: ``(hold_steps, r_steps, d_steps)`` to ramp the limits (the paper's ``(5000, 40000, 25000)``), or
        ``None`` for fixed limits.
      running_average: ``'var'`` (as batch norm) or ``'std'`` (the paper's).
    """

    r_max: float = 3.0
    d_max: float = 5.0
    warmup: tuple[int, int, int] | None = None
    running_average: str = "var"

    _kind = "renorm"


class GhostBatchNorm(_BatchFamily):
    """Ghost (virtual) batch norm (Hoffer et al. 2017; bnjax's ``layers.ghost_batch_norm``) as a linen module.

    Training normalises each group of ``virtual_batch_size`` consecutive rows (axis 0) with its own statistics;
    evaluation uses the running statistics, updated once per call from the pooled group statistics. Groups are
    made on each device; a per-example ``vmap`` (one row per call) is refused. Other attributes and defaults as
    ``BatchNorm`` (momentum 0.9: see there).

    Attributes:
      virtual_batch_size: rows per group (32, bnjax's ``GhostBatchNorm`` default); at least the batch size is
        batch norm exactly.
    """

    virtual_batch_size: int = 32

    _kind = "ghost"


class _PerExample(nn.Module):
    """Group and Layer Norm's shared attributes and call (a private base)."""

    epsilon: float = 1e-6
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    bias_init: Initializer = nn.initializers.zeros
    scale_init: Initializer = nn.initializers.ones

    _kind = "layer"

    def norm_value(self) -> Any:
        """The bnjax norm value this module applies (``bnjax.layers.group_norm``/``layer_norm``).

        Returns:
          a ``bnjax.layers.Norm``.
        """
        return _common.norm_value(self._kind, **{f: getattr(self, f, None) for f in _OPTIONS})

    @nn.compact
    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        """Normalise each example of ``x`` (channels on the last axis) by its own statistics.

        Args:
          x: ``[N, ..., C]``, floating point.
          mask: Flax's mask broadcastable to ``x``; it must flag whole examples (constant over every axis but
            the first). A masked example comes out as ``bias``.

        Returns:
          the normalised input, of ``x``'s shape, in ``dtype`` or the promotion of ``x``'s and the parameters'.

        Raises:
          ValueError: parameters of another channel count, a mask that does not flag whole examples, or as the
            norm value's ``apply``.
          TypeError: a non-floating ``x``.
        """
        who = f"bnjax.flax.linen.{type(self).__name__}"
        x = _common.as_float_input(x, who)
        if x.ndim < 2:
            raise ValueError(f"{who}: x must be [N, ..., C] (rank >= 2), got shape {tuple(x.shape)}")
        fshape = (int(x.shape[-1]),)
        for name in ("scale", "bias"):
            if self.has_variable("params", name):
                _common.check_shape(name, self.get_variable("params", name), fshape, x.shape, (x.ndim - 1,),
                                    "params", who)
        norm = self.norm_value()
        state = layers.GroupNormState()
        scale = self.param("scale", self.scale_init, fshape, self.param_dtype) if self.use_scale else None
        bias = self.param("bias", self.bias_init, fshape, self.param_dtype) if self.use_bias else None
        params = layers.BatchNormParams(gamma=scale, beta=bias)
        y, _ = _common.apply_norm(norm, params, state, x, train=False, faxes=(x.ndim - 1,), axis_name=None,
                                  mask=mask, dtype=self.dtype, who=who)
        return y


class GroupNorm(_PerExample):
    """Group Norm (Wu & He 2018; bnjax's ``layers.group_norm``) as a linen module, named as
    ``flax.linen.GroupNorm``: each example normalised over its non-batch axes within each of ``num_groups``
    groups of consecutive channels (the last axis); no running statistics, the same in training and evaluation.

    Equals ``flax.linen.GroupNorm(num_groups, epsilon=e, use_fast_variance=False)`` (two-pass variance in
    float32). No ``group_size``, ``reduction_axes`` or ``axis_name`` (statistics never cross examples).

    Attributes:
      num_groups: groups of channels (32, Flax's and Wu & He's default); must divide the channels.
      epsilon: added to the variance; Flax's 1e-6.
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as ``BatchNorm``.
    """

    num_groups: int = 32

    _kind = "group"


class LayerNorm(_PerExample):
    """Layer Norm (bnjax's ``layers.layer_norm``) as a linen module: each example normalised over ALL its
    non-batch axes (Group Norm with one group, as Wu & He 2018 define it), per-channel ``scale``/``bias``.

    For ``[N, C]`` this is ``flax.linen.LayerNorm()``; for NHWC it is ``flax.linen.LayerNorm(reduction_axes=(1,
    2, 3))``, since Flax's default reduces the last axis only (per pixel). No ``reduction_axes``,
    ``feature_axes`` or ``axis_name``.

    Attributes:
      epsilon: added to the variance; Flax's 1e-6.
      dtype, param_dtype, use_bias, use_scale, bias_init, scale_init: as ``BatchNorm``.
    """
