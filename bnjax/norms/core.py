"""The functional batch-norm core: parameters and state, statistics, normalisation, running update.

``batch_norm_init`` / ``batch_norm_apply`` are batch norm as two pure functions; ``batch_norm_stats`` the
statistics alone. The private pieces (``_batch_stats``, ``_running_update``, ``_normalize``, ``_prepare``) are
shared by every norm value of this package, so equal statistics give bit-equal outputs across them.

Conventions (``CONVENTIONS``, docs/conventions.md): ``new = momentum * old + (1 - momentum) * batch`` with
``momentum`` 0.9 by default; a biased running variance unless ``unbiased_running_var=True`` (PyTorch's);
``eps = 1e-6`` (the book's ``10e-7``); running statistics start at mean 0 and variance 1 (Flax, PyTorch; the
book's 0 is ``init_var=0.0``, see ``book_batch_norm``). Statistics are reduced in float32 (float64 for float64
input) whatever the input dtype.

``batch_statistics_as_state()`` is the trace-time switch ``recalibrate`` uses: inside it every running update
made here uses momentum 0, i.e. stores the batch statistics.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import (_as_input, _check_flag, _check_float_dtype, _check_hyper, _check_input, _check_mask,
                                 _check_per_feature, _int_tuple, _real_values)

Array = jax.Array

# Module-level so docs, tests and users can read the defaults from one place.
CONVENTIONS = {
    "momentum": 0.9,  # new = momentum * old + (1 - momentum) * batch
    "eps": 1e-6,  # the book's 10e-7
    "running_var": "biased",
    "init_mean": 0.0,
    "init_var": 1.0,  # Flax and PyTorch; the book starts at 0 (book_batch_norm)
}


class BatchNormParams(NamedTuple):
    """Learned scale and offset (``None`` when disabled), each of the feature shape."""

    gamma: Array | None
    beta: Array | None


class BatchNormState(NamedTuple):
    """Running statistics, each of the feature shape. Not trained: thread it through ``apply``."""

    mean: Array
    var: Array


class BatchRenormState(NamedTuple):
    """Running statistics of Batch Renorm, each of the feature shape, and the number of updates made (``step``,
    an int32 scalar that drives the warm-up schedule)."""

    mean: Array
    var: Array
    step: Array


# The state types that hold running statistics (``mean``, ``var``): what ``recalibrate`` replaces.
RUNNING_STATS_TYPES = (BatchNormState, BatchRenormState)


# --------------------------------------------------------------------------------------------------
# The recalibration switch
# --------------------------------------------------------------------------------------------------

# A thread-local stack of counters, one per active ``batch_statistics_as_state()``; each counts the running
# updates traced inside it, so ``recalibrate`` can tell a forward that never reached them (a function compiled
# before, whose cached trace ignores the switch) from one that did.
_SWITCH = threading.local()


def _active() -> list | None:
    stack = getattr(_SWITCH, "stack", None)
    return stack[-1] if stack else None


@contextlib.contextmanager
def batch_statistics_as_state() -> Iterator[list]:
    """While active (at trace time), every running update uses momentum 0: it stores the batch statistics.

    A training-mode forward then returns each layer's batch statistics as its new state, which is how
    ``recalibrate`` reads them out of any network without knowing its layers. Non-finite old running values
    count as 0 in the update, so a stale NaN/inf cannot leak through ``0 * NaN = NaN``; for finite ones the
    result is bit-equal to calling the norms with ``momentum=0.0``. It acts where a norm's running update is
    traced (or run eagerly): a function jitted and traced before keeps its compiled updates, so pass
    ``recalibrate`` the plain function.

    Yields:
      a one-element list counting the running updates made inside (read by ``recalibrate``).

    Raises:
      nothing itself; nesting is allowed (the innermost counts).
    """
    stack = getattr(_SWITCH, "stack", None)
    if stack is None:
        stack = _SWITCH.stack = []
    counter = [0]
    stack.append(counter)
    try:
        yield counter
    finally:
        stack.pop()


def _note_update() -> None:
    """Count a running update made inside ``batch_statistics_as_state`` (see above)."""
    counter = _active()
    if counter is not None:
        counter[0] += 1


def _blend(momentum: Any, old: Array, batch: Array) -> Array:
    """``momentum * old + (1 - momentum) * batch`` in ``old``'s dtype.

    Inside ``batch_statistics_as_state`` the momentum is 0 and non-finite old values count as 0: the same
    operations as an update with momentum 0 (so the compiled program, and its rounding, is that of a forward
    called with ``momentum=0.0``; returning ``batch`` directly fuses differently and can differ in the last
    bit), while a stale NaN/inf running value cannot leak through ``0 * NaN = NaN``.
    """
    if _active() is not None:
        momentum = 0.0
        old = jnp.where(jnp.isfinite(old), old, jnp.zeros_like(old))
    m = jnp.asarray(momentum, old.dtype)
    return m * old + (1 - m) * batch.astype(old.dtype)


# --------------------------------------------------------------------------------------------------
# Init, statistics, update, normalisation
# --------------------------------------------------------------------------------------------------


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
      init_mean, init_var: initial running statistics; 0 and 1 by default (Flax, PyTorch), the book's 0 and 0
        with ``init_var=0.0``. Checked when concrete: finite, and ``init_var >= 0``.
      dtype: parameter dtype, floating point. Running statistics are always float32 (float64 under x64 with
        a float64 ``dtype``) because they are accumulated in full precision.

    Returns:
      ``(BatchNormParams, BatchNormState)``, each field of shape ``num_features``.

    Raises:
      TypeError: a flag that is not a bool, ``num_features`` not an int or tuple of ints, a non-floating dtype.
      ValueError: a size < 1, a non-finite ``init_mean``/``init_var`` or a negative ``init_var``.
    """
    who = "batch_norm_init"
    use_scale = _check_flag(use_scale, "use_scale", who)
    use_offset = _check_flag(use_offset, "use_offset", who)

    shape = _int_tuple(num_features)
    if shape is None:
        raise TypeError(f"{who}: num_features must be an int or a tuple of ints, got {num_features!r}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"batch_norm_init: num_features must be positive, got {num_features!r}")
    _check_float_dtype(dtype, who)
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
      x: ``[N, C]``, ``[N, H, W, C]``, ... (any rank >= 2; rank >= 1 with ``axis_name``: one example per call
        of a per-example ``jax.vmap``), floating point; any array-like (a float64 NumPy array becomes float32
        unless x64 is enabled).
      feature_axes: axis or axes that hold features (kept); all others are reduced.
      axis_name: a bound ``vmap``/``pmap``/``shard_map`` axis to reduce across, or ``None``.
      mask: optional boolean/0-1 array over the leading non-feature axes (``[N]`` for rows), True = valid.

    Returns:
      ``(mean, var, count)``: mean and var of the feature shape, ``count`` a scalar (global with axis_name).

    Raises:
      TypeError: a non-floating ``x``, bad ``feature_axes`` or mask dtype.
      ValueError: rank < 2, feature axes out of range or covering every axis, a mask of the wrong shape or values,
        an unbound ``axis_name``; called eagerly, statistics that overflow their dtype for a finite ``x`` (under a
        transformation the variance is NaN there instead).
    """
    who = "batch_norm_stats"
    x = _as_input(x, who)
    faxes = _check_input(x, feature_axes, who, axis_name)
    red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
    if mask is not None:
        mask = _check_mask(mask, x, red_axes, who)
    mean, var, count = _batch_stats(x, faxes, axis_name, mask)
    _refuse_overflow(x, mask, faxes, mean, var, who)
    return mean, var, count


def _batch_stats(x: Array, faxes: tuple[int, ...], axis_name: Any, mask: Array | None) -> tuple[Array, Array, Array]:
    """``batch_norm_stats`` on a checked input and mask."""
    red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
    if not red_axes and axis_name is None:
        raise ValueError(f"batch_norm: every axis of x {x.shape} is a feature axis; nothing to reduce over (one "
                         "example per call needs the batch as a named axis: jax.vmap(..., axis_name=...))")
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
            # A select, not v * weight: padding rows may hold anything (inf * 0 would be NaN, and huge values
            # square to inf).
            v = jnp.where(weight > 0, v, jnp.zeros_like(v))
        return jnp.sum(v, axis=red_axes, keepdims=True)

    total, count = wsum(xs), local_count
    if axis_name is not None:
        # Two psums, not one over the pair: the count depends on the mask only, and jax 0.7's transpose of a psum
        # that mixes a linear operand with a constant one per named-axis example fails (an AssertionError in
        # grad through a masked per-example vmap).
        total, count = _psum(total, axis_name), _psum(count, axis_name)
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
    # The squares overflow once sum((x - mean)^2) passes the dtype's max (float32: |x - mean| ~1.8e19 / sqrt(count)):
    # the variance would be inf and every output silently beta. NaN instead, so the failure shows (a traced call
    # cannot raise; an eager one is refused by _refuse_overflow): inf - inf is NaN, and v - v = 0 adds nothing to a
    # finite v. Written as arithmetic, not jnp.where: it fuses with the line above (a select cost ~8% of a small
    # dense layer's forward + backward on a CPU), and stop_gradient keeps the backward pass as it was.
    var = var + lax.stop_gradient(var - var)
    return jnp.squeeze(mean, red_axes), jnp.squeeze(var, red_axes), count


def _refuse_overflow(x: Array, mask: Array | None, faxes: tuple[int, ...], mean: Array, var: Array,
                     who: str) -> None:
    """Outside a transformation (concrete values), refuse batch statistics that are not finite although ``x`` is:
    the sums overflowed ``x``'s statistics dtype. Under ``jit``/``vmap``/``grad`` nothing is checked (the variance is
    NaN there, see ``_batch_stats``)."""
    if isinstance(var, jax.core.Tracer) or isinstance(mean, jax.core.Tracer) or isinstance(x, jax.core.Tracer):
        return
    bad = np.asarray(~(jnp.isfinite(mean) & jnp.isfinite(var)))
    if not bad.any():
        return
    valid = x if mask is None else jnp.where(
        mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)).astype(bool), x, jnp.zeros((), x.dtype))
    if not bool(jnp.all(jnp.isfinite(valid))):
        return  # non-finite input: non-finite statistics are its own, not an overflow
    red_axes = tuple(a for a in range(x.ndim) if a not in faxes)
    amax = np.asarray(jnp.max(jnp.abs(valid), axis=red_axes))
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    where = first[0] if len(first) == 1 else first
    dtype = mean.dtype
    raise ValueError(
        f"{who}: the batch statistics overflow {dtype} for {int(bad.sum())} of {bad.size} features (first: feature "
        f"{where}, max |x| = {float(amax[first]):.3g}): sum(x) or sum((x - mean)**2) passes "
        f"{float(jnp.finfo(dtype).max):.3g}. Scale the input down, or compute in float64 (jax_enable_x64 and a "
        "float64 x); under jit, vmap or grad such a batch gives NaN statistics and outputs")


def _running_update(state: Any, mean: Array, var: Array, count: Array, momentum: Any) -> tuple[Array, Array, Array]:
    """``momentum * old + (1 - momentum) * batch`` for the running mean and variance, in the state's dtype; the
    old values where the batch had no valid row (an all-masked batch carries no information). Inside
    ``batch_statistics_as_state`` momentum 0 (see ``_blend``).

    Returns ``(new_mean, new_var, has_rows)``.
    """
    has_rows = count > 0
    _note_update()
    new_mean, new_var = _blend(momentum, state.mean, mean), _blend(momentum, state.var, var)
    return jnp.where(has_rows, new_mean, state.mean), jnp.where(has_rows, new_var, state.var), has_rows


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


def _prepare(params: Any, state: Any, x: Any, feature_axes: Any, mask: Any, who: str, axis_name: Any = None):
    """The input checks every norm's ``apply`` makes: returns ``(x, feature axes, mask)``."""
    x = _as_input(x, who)
    faxes = _check_input(x, feature_axes, who, axis_name)
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
    *,
    train: bool,
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
        array becomes float32 unless x64 is enabled). With ``axis_name``, one example per call is allowed
        (Equinox's per-example ``jax.vmap(..., axis_name=...)``): ``x`` of shape ``[C]`` (or ``[H, W, C]`` with
        ``feature_axes=-1``), the batch being the named axis. bf16/float16 inputs are normalised with float32
        statistics and returned in their own dtype.
      train: the book's ``train_flg``, a Python bool, keyword-only and required. Sets the defaults of the next
        two flags: True -> normalise with batch statistics and update the running ones; False -> normalise
        with running statistics, no update.
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
        ``momentum``/``eps``, a mask of non-numeric dtype, a ``BatchRenormState``; ``train`` missing.
      ValueError: shapes that disagree, ``momentum`` outside [0, 1] or neither a scalar nor one value per
        feature, ``eps`` not positive or not finite, a numeric mask with values other than 0 and 1; called
        eagerly, batch statistics that overflow float32 for a finite ``x`` (``sum((x - mean)**2)`` past 3.4e38;
        under ``jit``/``vmap``/``grad`` the variance and outputs are NaN there instead of a silent ``beta``).
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
    x, faxes, mask = _prepare(params, state, x, feature_axes, mask, who, axis_name)
    _check_per_feature(momentum, "momentum", tuple(x.shape[a] for a in faxes), who)

    new_state = state
    if use_batch_stats or update_stats:
        mean, var, count = _batch_stats(x, faxes, axis_name, mask)
        _refuse_overflow(x, mask, faxes, mean, var, who)
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
