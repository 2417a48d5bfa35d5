"""bnjax's batch norms as Equinox stateful layers: ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm`` (Group and
Layer Norm, which keep no state, are in ``bnjax/equinox/group.py``), and the checks all the layers share.

Each layer holds a bnjax norm value (``bnjax.norms``) as a static field, its parameters as arrays (``weight``,
``bias``, as ``eqx.nn.BatchNorm``) and an ``eqx.nn.StateIndex`` whose value in the ``eqx.nn.State`` is the norm's
own state (``BatchNormState`` or ``BatchRenormState``); the call gives Equinox's channels-first example to the
norm value's ``apply`` (``feature_axes=0``, the batch as the named axis). No formula is written here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Hashable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from bnjax.norms import (BatchNormParams, BatchNormState, BatchRenormState, Norm,
                         batch_norm, batch_renorm, ghost_batch_norm)

Array = jax.Array

__all__ = ["BatchNorm", "BatchRenorm", "GhostBatchNorm"]

# Equinox's default for every one of its norms (bnjax's own norm values default to 1e-6).
EPS = 1e-5
# bnjax's default, not Equinox's 0.99: see BatchNorm's docstring.
MOMENTUM = 0.9


def _flag(value: Any, name: str, who: str) -> bool:
    """A Python bool (or NumPy bool_); a traced or array value gets a message saying how to make it static."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    hint = ""
    if isinstance(value, jax.core.Tracer) or isinstance(value, jax.Array):
        hint = ("; it chooses the program, so it cannot be an array or traced: set it with "
                "eqx.nn.inference_mode(model, value) or pass a Python bool (eqx.filter_jit keeps Python bools static)")
    raise TypeError(f"{who}: {name} must be a Python bool, got {value!r} of type {type(value).__name__}{hint}")


def _size(value: Any, name: str, who: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _param_dtype(dtype: Any, who: str) -> Any:
    """``dtype`` or the default floating dtype (float64 under x64, as Equinox's default); floating point."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    try:
        floating = jnp.issubdtype(dtype, jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(f"{who}: dtype must be a floating-point dtype (the parameters'), got {dtype!r}")
    return jnp.dtype(dtype)


def _example(x: Any, channels: int, name: str, who: str) -> Array:
    """One example, channels first: ``[C]`` or ``[C, *spatial]`` with ``C == channels``, floating point."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{who}: x must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] != channels:
        raise ValueError(f"{who}: x has shape {tuple(x.shape)}, but its first axis must be the {channels} channels "
                         f"({name}={channels}): one example [C] or [C, H, W], channels first as Equinox's layers; "
                         "map the layer over the batch with jax.vmap")
    return x


class _RunningNorm(eqx.nn.StatefulLayer):
    """What the three batch norms share: the fields of ``eqx.nn.BatchNorm``, the checks, the call."""

    weight: Array | None
    bias: Array | None
    state_index: eqx.nn.StateIndex
    axis_name: Hashable | Sequence[Hashable]
    inference: bool
    norm: Norm = eqx.field(static=True)
    input_size: int = eqx.field(static=True)
    channelwise_affine: bool = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    _state_type: ClassVar[type] = BatchNormState

    def _setup(self, norm: Norm, input_size: Any, axis_name: Any, channelwise_affine: Any, inference: Any,
               dtype: Any, who: str) -> None:
        """Checks the constructor's arguments and sets every field; called by the subclasses' ``__init__``."""
        self.input_size = _size(input_size, "input_size", who)
        if axis_name is None:
            raise ValueError(f"{who}: axis_name is required: the name of the batch axis of the jax.vmap (or pmap) the "
                             "layer is called under, e.g. 'batch' with jax.vmap(model, axis_name='batch', "
                             "in_axes=(0, None), out_axes=(0, None)); statistics per example would be another norm")
        self.axis_name = tuple(axis_name) if isinstance(axis_name, list) else axis_name
        self.channelwise_affine = _flag(channelwise_affine, "channelwise_affine", who)
        self.inference = _flag(inference, "inference", who)
        self.dtype = _param_dtype(dtype, who)
        self.norm = norm
        params, stats = norm.init(self.input_size, self.dtype)
        self.weight, self.bias = params.gamma, params.beta
        self.state_index = eqx.nn.StateIndex(stats)

    @property
    def eps(self) -> float:
        """Added to the variance (the norm value's)."""
        return self.norm.eps

    @property
    def momentum(self) -> float:
        """``new = momentum * old + (1 - momentum) * batch`` (the norm value's)."""
        return self.norm.momentum

    def _stats(self, state: Any, who: str) -> Any:
        """This layer's running statistics in ``state``, or one clear error."""
        if not isinstance(state, eqx.nn.State):
            raise TypeError(f"{who}: state must be an eqx.nn.State (from eqx.nn.make_with_state(Model)(...) or "
                            f"eqx.nn.State(model)), got {type(state).__name__}")
        try:
            stats = state.get(self.state_index)
        except KeyError:
            stats = None
        expected = self._state_type
        if not isinstance(stats, expected) or tuple(np.shape(stats.mean)) != (self.input_size,):
            got = "no entry for this layer" if stats is None else f"a {type(stats).__name__}"
            raise ValueError(f"{who}: the state holds {got} where this layer keeps a {expected.__name__} of "
                             f"{self.input_size} features: it comes from another layer or model; pass the state made "
                             "with this model (eqx.nn.make_with_state) and returned by its previous call")
        return stats

    def _run(self, params: BatchNormParams, stats: Any, x: Array, train: bool, mask: Any, who: str) -> tuple:
        """The norm value's ``apply`` on one channels-first example (overridden by Ghost BN)."""
        return self.norm.apply(params, stats, x, train=train, mask=mask, axis_name=self.axis_name, feature_axes=0)

    def __call__(self, x: Array, state: eqx.nn.State, *, key: Any = None, inference: bool | None = None,
                 mask: Any = None) -> tuple[Array, eqx.nn.State]:
        """Normalise one example; in training, update the running statistics in ``state``.

        Args:
          x: one example, channels first: ``[input_size]`` or ``[input_size, *spatial]``, floating point. Call the
            layer under ``jax.vmap(..., axis_name=self.axis_name)`` (the batch is the named axis; the state is not
            mapped: ``in_axes=(0, None), out_axes=(0, None)``).
          state: the model's ``eqx.nn.State``.
          key: ignored (Equinox's layer API).
          inference: a Python bool overriding ``self.inference`` for this call, or ``None``.
          mask: ``None``, or this example's validity, a boolean or 0/1 scalar: a masked example enters neither
            the batch statistics nor the running update (padding of a last, short batch).

        Returns:
          ``(y, state)``: ``y`` of ``x``'s shape, in the promotion of ``x``'s dtype and the layer's ``dtype``
          (as ``eqx.nn.BatchNorm``'s arithmetic gives); ``state`` updated in training, unchanged in inference.

        Raises:
          TypeError: ``inference`` not a Python bool (a traced or array value included), a non-floating ``x``, a
            ``state`` that is not an ``eqx.nn.State``.
          ValueError: ``x`` whose first axis is not ``input_size``, an ``axis_name`` not bound by an enclosing
            ``vmap``/``pmap`` in training, a state from another layer or model, a bad mask (as the norm value).
        """
        del key
        who = f"bnjax.equinox.{type(self).__name__}"
        inference = self.inference if inference is None else inference
        train = not _flag(inference, "inference", who)
        x = _example(x, self.input_size, "input_size", who)
        stats = self._stats(state, who)
        if train:
            try:
                jax.lax.psum(1, self.axis_name)  # a constant: folded away; only asks whether the name is bound
            except NameError as err:
                raise ValueError(f"{who}: axis_name={self.axis_name!r} is not bound: in training the layer takes one "
                                 f"example per call inside jax.vmap(model, axis_name={self.axis_name!r}, "
                                 "in_axes=(0, None), out_axes=(0, None)) (or pmap), whose named axis is the "
                                 "batch") from err
        # Equinox's output dtype: the promotion of the input's and the parameters' (the statistics are float32).
        x = x.astype(jnp.promote_types(x.dtype, self.dtype))
        y, new_stats = self._run(BatchNormParams(self.weight, self.bias), stats, x, train, mask, who)
        if train:
            state = state.set(self.state_index, new_stats)
        return y, state


class BatchNorm(_RunningNorm):
    """Batch norm (``bnjax.layers.batch_norm``) as an ``eqx.nn.StatefulLayer``: ``eqx.nn.BatchNorm``'s constructor
    and call, bnjax's numbers.

    Called on one example per call under ``jax.vmap(..., axis_name=axis_name)`` as ``eqx.nn.BatchNorm``; the
    statistics are those of the whole batch (the named axis and every spatial axis), two-pass, in float32 even
    for bf16 input, reduced as sums and counts (exact with a ``mask`` or across devices). Running statistics:
    ``new = momentum * old + (1 - momentum) * batch``, the biased variance, starting at mean 0 and variance 1,
    held in the ``eqx.nn.State`` as a ``bnjax.norms.BatchNormState``; inference normalises with them as they are
    (``eqx.nn.BatchNorm(mode="batch")`` divides them by ``1 - momentum**count`` at inference; PyTorch, Flax and
    bnjax do not). Equal to ``eqx.nn.BatchNorm(mode="batch")`` in training (outputs, gradients, running
    statistics) with the same ``momentum`` and ``eps``.

    ``momentum`` defaults to 0.9, bnjax's, not Equinox's 0.99: on short runs a 0.99 running average lags the
    weights, so evaluation normalises with statistics of weights long gone (docs/frameworks.md: in
    docs/examples/flax_renorm.py, 300 steps of 4 images, Flax's ``nn.BatchNorm`` ends at 0.836 held-out accuracy
    with 0.99 and 0.844 with 0.9). ``eps`` is
    Equinox's 1e-5.

    Attributes:
      weight, bias: ``[input_size]`` scale and offset, ``None`` without ``channelwise_affine``.
      state_index: where the running statistics are in the ``eqx.nn.State``.
      axis_name: the batch's named axis (or a tuple of them).
      inference: use the running statistics (True) or the batch's, updating the running ones (False); toggled
        by ``eqx.nn.inference_mode``.
      norm: the bnjax norm value that computes everything (static).
      input_size, channelwise_affine, dtype, eps, momentum: as given.
    """

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = EPS,
                 channelwise_affine: bool = True, momentum: float = MOMENTUM, inference: bool = False,
                 dtype: Any = None):
        """Builds the layer.

        Args:
          input_size: the channels ``C`` (the first axis of each example).
          axis_name: the name of the ``vmap``/``pmap`` axis that holds the batch (required), or a tuple of names.
          eps: added to the variance, > 0; Equinox's 1e-5.
          channelwise_affine: learn a per-channel ``weight`` and ``bias``.
          momentum: in [0, 1]; 0.9 (see the class docstring).
          inference: the default mode, a Python bool.
          dtype: the parameters' dtype (running statistics are float32, or float64 under x64); ``None`` for the
            default floating dtype.

        Raises:
          ValueError: ``input_size`` not an integer >= 1, ``axis_name`` missing, ``momentum``/``eps`` out of range.
          TypeError: flags that are not bools, a non-floating ``dtype``, non-real ``momentum``/``eps``.
        """
        who = "bnjax.equinox.BatchNorm"
        _flag(channelwise_affine, "channelwise_affine", who)
        norm = batch_norm(momentum, eps, use_scale=channelwise_affine, use_offset=channelwise_affine)
        self._setup(norm, input_size, axis_name, channelwise_affine, inference, dtype, who)


class BatchRenorm(_RunningNorm):
    """Batch Renormalization (Ioffe 2017; ``bnjax.layers.batch_renorm``) as an ``eqx.nn.StatefulLayer``.

    Training normalises with the batch statistics corrected towards the running ones (``r`` clipped to
    ``[1/r_max, r_max]``, ``d`` to ``[-d_max, d_max]``), so training and inference agree even at batch size 4;
    inference uses the running statistics. The state (a ``bnjax.norms.BatchRenormState``) also counts the updates
    (``step``), which drives ``warmup``. Everything else as ``BatchNorm`` (defaults, call, dtypes).

    Attributes:
      as ``BatchNorm``; ``r_max``, ``d_max``, ``warmup`` are those of ``norm``.
    """

    _state_type: ClassVar[type] = BatchRenormState

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = EPS,
                 channelwise_affine: bool = True, momentum: float = MOMENTUM, inference: bool = False,
                 dtype: Any = None, *, r_max: float = 3.0, d_max: float = 5.0,
                 warmup: tuple[int, int, int] | None = None):
        """Builds the layer.

        Args:
          input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype: as ``BatchNorm``.
          r_max, d_max: the limits of ``r`` and ``d`` (``r_max=1, d_max=0`` is batch norm).
          warmup: ``(hold_steps, r_steps, d_steps)`` ramping the limits from batch norm's (the paper's
            ``(5000, 40000, 25000)``), or ``None`` for fixed limits; as ``bnjax.layers.batch_renorm``.

        Raises:
          ValueError, TypeError: as ``BatchNorm``, or as ``bnjax.layers.batch_renorm`` for the limits.
        """
        who = "bnjax.equinox.BatchRenorm"
        _flag(channelwise_affine, "channelwise_affine", who)
        norm = batch_renorm(momentum, eps, r_max=r_max, d_max=d_max, warmup=warmup, use_scale=channelwise_affine,
                            use_offset=channelwise_affine)
        self._setup(norm, input_size, axis_name, channelwise_affine, inference, dtype, who)

    @property
    def r_max(self) -> float:
        """The limit of ``r`` (after the warm-up)."""
        return self.norm.r_max

    @property
    def d_max(self) -> float:
        """The limit of ``d`` (after the warm-up)."""
        return self.norm.d_max

    @property
    def warmup(self) -> tuple[int, int, int] | None:
        """``(hold_steps, r_steps, d_steps)`` or ``None``."""
        return self.norm.warmup


class GhostBatchNorm(_RunningNorm):
    """Ghost batch norm (Hoffer et al. 2017; ``bnjax.layers.ghost_batch_norm``) as an ``eqx.nn.StatefulLayer``.

    In training each group of ``virtual_batch_size`` consecutive examples of the named axis (the last group
    smaller when it does not divide the batch) is normalised with its own statistics; the running statistics take
    one update per call from the pooled group statistics; inference uses the running statistics only. Everything
    else as ``BatchNorm``.

    Attributes:
      as ``BatchNorm``; ``virtual_batch_size`` is ``norm``'s.
    """

    def __init__(self, input_size: int, axis_name: Hashable | Sequence[Hashable], eps: float = EPS,
                 channelwise_affine: bool = True, momentum: float = MOMENTUM, inference: bool = False,
                 dtype: Any = None, *, virtual_batch_size: int):
        """Builds the layer.

        Args:
          input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype: as ``BatchNorm``.
          virtual_batch_size: examples per group, an integer >= 1 (required, keyword-only).

        Raises:
          ValueError, TypeError: as ``BatchNorm``, or a ``virtual_batch_size`` that is not an integer >= 1.
        """
        who = "bnjax.equinox.GhostBatchNorm"
        _flag(channelwise_affine, "channelwise_affine", who)
        norm = ghost_batch_norm(virtual_batch_size, momentum, eps, use_scale=channelwise_affine,
                                use_offset=channelwise_affine)
        self._setup(norm, input_size, axis_name, channelwise_affine, inference, dtype, who)

    @property
    def virtual_batch_size(self) -> int:
        """Examples per group."""
        return self.norm.virtual_batch_size

    def _run(self, params, stats, x, train, mask, who):
        kwargs = {} if mask is None else {"mask": mask}
        return self.norm.apply(params, stats, x, train=train, feature_axes=0, batch_axis_name=self.axis_name,
                               **kwargs)
