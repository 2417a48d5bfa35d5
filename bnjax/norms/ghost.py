"""Ghost (virtual) batch norm (Hoffer et al. 2017) as a value: ``GhostBatchNorm``, ``ghost_batch_norm()``."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import _check_mask, _is_bool
from bnjax.norms.base import Norm, _common_fields, _start_apply
from bnjax.norms.batch_norm import BatchNorm
from bnjax.norms.core import (CONVENTIONS, BatchNormState, _batch_stats, _check_state, _normalize, _psum,
                              _refuse_overflow, _running_update)


@dataclasses.dataclass(frozen=True)
class GhostBatchNorm(Norm):
    """Ghost (virtual) batch norm (Hoffer et al. 2017); build it with ``ghost_batch_norm(...)``."""

    has_running_stats: ClassVar[bool] = True

    virtual_batch_size: int = 32
    momentum: float = CONVENTIONS["momentum"]
    eps: float = CONVENTIONS["eps"]
    init_mean: float = CONVENTIONS["init_mean"]
    init_var: float = CONVENTIONS["init_var"]
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        who = "ghost_batch_norm"
        k = self.virtual_batch_size
        if _is_bool(k) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{who}: virtual_batch_size must be an integer >= 1, got {k!r}")
        object.__setattr__(self, "virtual_batch_size", int(k))
        _common_fields(self, who)

    # The same parameters and running state as batch norm (only the statistics differ).
    init = BatchNorm.init

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None, update_stats=None,
              feature_axes=-1, batch_axis_name=None):
        """Training: each group of ``virtual_batch_size`` consecutive rows (axis 0) is normalised with its own
        statistics; evaluation: the running statistics only (never virtual batches).

        If ``virtual_batch_size`` does not divide the batch, the last group is smaller (a batch of 10 with
        groups of 4: 4, 4, 2). The running statistics take one update per call, from the pooled group
        statistics: the mean of the rows and the count-weighted mean of the group variances (the mean of the
        group statistics, as TensorFlow's ``virtual_batch_size``, when the groups are equal). Groups are formed
        on each device from its own rows; with ``axis_name`` the pooled statistics of the running update are
        summed over devices. A mask removes rows from their group (a group with no valid row is skipped).

        The groups are made of axis 0 of each call, never across ``axis_name``: a group with one value per
        feature (one row of ``[N, C]``) has variance 0 and would normalise to ``beta``, so a call whose groups
        include one is refused. That is the case of a per-example ``jax.vmap(..., axis_name=...)`` (Equinox's
        style: each call holds one example) called with ``axis_name``: pass ``batch_axis_name`` instead (below),
        or apply Ghost BN to the batch. A conv layer's example
        ``[H, W, C]`` called per example would be grouped along H; give the batch ``[N, H, W, C]``.

        Args:
          params, state: from ``init``.
          x, train, momentum, mask, axis_name, update_stats, feature_axes: as ``BatchRenorm.apply`` (without
            ``r_max``/``d_max``); feature axes must not include axis 0.
          batch_axis_name: one example per call: the named ``jax.vmap`` axis that holds the batch's rows (then
            ``axis_name`` must be ``None``, ``x`` is one example, any rank >= 1, ``mask`` a scalar). The groups
            are ``virtual_batch_size`` consecutive indices of that axis (``lax.axis_index``), the last one
            smaller, exactly as the rows of a batch ``[N, ...]``; the same numbers as the batch call up to
            rounding (the sums are taken across the axis).

        Returns:
          ``(y, new_state)``.

        Raises:
          TypeError: a ``BatchRenormState``, or as ``batch_norm_apply``.
          ValueError: axis 0 among the feature axes, a group of one value per feature (in training or with
            ``update_stats``), or as ``batch_norm_apply``.
        """
        who = "ghost_batch_norm.apply"
        _check_state(state, who)
        if batch_axis_name is not None:
            return self._apply_per_example(params, state, x, train, momentum, mask, axis_name, update_stats,
                                           feature_axes, batch_axis_name, who)
        if np.ndim(x) == 1:
            raise ValueError(f"{who}: x of shape {np.shape(x)} holds one example; the virtual batches are made of "
                             "axis 0 of each call, never across a named axis, so a per-example jax.vmap(..., "
                             "axis_name=...) cannot use Ghost BN that way: pass batch_axis_name=<that axis> (and no axis_name) for groups of "
                             "consecutive examples of the named axis, or apply it to the batch [N, ...]")
        train, update_stats, momentum, x, faxes, mask = _start_apply(
            self, params, state, x, train, update_stats, momentum, feature_axes, mask, who)
        if 0 in faxes:
            raise ValueError(f"{who}: axis 0 holds the rows the virtual batches are made of; it cannot be a "
                             f"feature axis (feature_axes={feature_axes!r})")
        if not train and not update_stats:
            return _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes), state
        n, k = x.shape[0], self.virtual_batch_size
        self._check_groups(x.shape, faxes, axis_name, who)
        if axis_name is None and n <= k:
            # One group: batch norm itself, bit for bit.
            mean, var, count = _batch_stats(x, faxes, None, mask)
            y = _normalize(x, mean, var, params.gamma, params.beta, self.eps, faxes)
            pooled = (mean, var, count)
        else:
            y, pooled = self._groups(params, x, faxes, mask, axis_name)
        _refuse_overflow(x, mask, faxes, pooled[0], pooled[1], who)
        new_state = state
        if update_stats:
            new_mean, new_var, _ = _running_update(state, *pooled, momentum)
            new_state = BatchNormState(mean=new_mean, var=new_var)
        if not train:
            y = _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes)
        return y, new_state

    def _apply_per_example(self, params, state, x, train, momentum, mask, axis_name, update_stats, feature_axes,
                           name, who):
        """``apply`` with one example per call, the batch's rows being the named axis ``name``."""
        if axis_name is not None:
            raise ValueError(f"{who}: give the batch's named axis as batch_axis_name only (axis_name={axis_name!r} "
                             f"with batch_axis_name={name!r}); virtual batches across devices are not formed")
        train, update_stats, momentum, x, faxes, _ = _start_apply(
            self, params, state, x, train, update_stats, momentum, feature_axes, None, who, name)
        if mask is not None:
            if np.ndim(mask) != 0:
                raise ValueError(f"{who}: with batch_axis_name each call holds one example, so its mask is a scalar "
                                 f"(this example valid or not), got shape {np.shape(mask)}")
            mask = _check_mask(jnp.reshape(mask, (1,)), x[None], (0,), who)[0].astype(bool)
        if not train and not update_stats:
            return _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes), state
        try:
            n = int(lax.psum(1, name))  # the batch size; a Python int under vmap
        except NameError as err:
            raise ValueError(f"{who}: batch_axis_name={name!r} is not bound: call it inside "
                             f"jax.vmap(..., axis_name={name!r})") from err
        k = min(self.virtual_batch_size, n)
        self._check_groups((n,) + tuple(x.shape), tuple(a + 1 for a in faxes), name, who)
        group = lax.axis_index(name) // k
        valid = jnp.ones((), bool) if mask is None else mask

        # The rows of group j, reduced across the named axis: batch norm's own statistics under a mask. One call
        # per group, not a jax.vmap over groups: a psum inside an inner vmap has no transpose in jax 0.7.
        stats = [_batch_stats(x, faxes, name, valid & (group == j)) for j in range(-(-n // k))]
        means, variances, counts = (jnp.stack(v) for v in zip(*stats))
        y = _normalize(x, means[group], variances[group], params.gamma, params.beta, self.eps, faxes)
        pooled = _pool(means, variances, counts, None)  # already summed across the axis
        new_state = state
        if update_stats:
            new_mean, new_var, _ = _running_update(state, *pooled, momentum)
            new_state = BatchNormState(mean=new_mean, var=new_var)
        if not train:
            y = _normalize(x, state.mean, state.var, params.gamma, params.beta, self.eps, faxes)
        return y, new_state

    def _check_groups(self, shape, faxes, axis_name, who):
        """Refuse groups with one value per feature (static shapes; a mask may still leave one valid row)."""
        n, k = shape[0], min(self.virtual_batch_size, shape[0])
        inner = math.prod(shape[a] for a in range(1, len(shape)) if a not in faxes)  # values per row and feature
        last = n - (-(-n // k) - 1) * k
        if min(k, last) * inner >= 2:
            return
        if n == 1:
            why = ("x has one row" + (f" per call across axis_name={axis_name!r}" if axis_name is not None else "")
                   + "; under a per-example jax.vmap(..., axis_name=...) each call holds one example, and the "
                   "virtual batches are made of axis 0 of each call, never across the named axis: apply Ghost BN to "
                   "the batch [N, ...]")
        elif k == 1:
            why = ("virtual_batch_size=1 makes groups of one row; use virtual_batch_size >= 2 (or batch norm "
                   "itself for the whole batch)")
        else:
            why = (f"{n} rows in groups of {k} leave a last group of one row; use a batch size that is not "
                   f"1 more than a multiple of {k}, or another virtual_batch_size")
        raise ValueError(f"{who}: a virtual batch with one value per feature has variance 0 and would normalise "
                         f"to beta: {why} (x has shape {tuple(shape)})")

    def _groups(self, params, x, faxes, mask, axis_name):
        """Per-group normalisation and the pooled statistics ``(mean, var, count)`` of all groups."""
        n, k = x.shape[0], min(self.virtual_batch_size, x.shape[0])
        num_groups = -(-n // k)
        pad = num_groups * k - n
        if pad:
            if mask is None:
                mask = jnp.ones((n,), bool)
            x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
            mask = jnp.concatenate([mask, jnp.zeros((pad, *mask.shape[1:]), mask.dtype)])
        xg = x.reshape(num_groups, k, *x.shape[1:])
        mg = None if mask is None else mask.reshape(num_groups, k, *mask.shape[1:])

        def one(xi, mi):
            mean, var, count = _batch_stats(xi, faxes, None, mi)
            return _normalize(xi, mean, var, params.gamma, params.beta, self.eps, faxes), (mean, var, count)

        yg, (means, variances, counts) = jax.vmap(one)(xg, mg) if mg is not None else \
            jax.vmap(lambda xi: one(xi, None))(xg)
        y = yg.reshape(num_groups * k, *x.shape[1:])[:n]
        return y, _pool(means, variances, counts, axis_name)


def _pool(means, variances, counts, axis_name):
    """The running update's statistics from the groups' ``[G, ...]`` ones: the count-weighted mean of the group
    means and of the group variances, and the total count (summed over ``axis_name`` if given)."""
    w = counts.reshape((counts.shape[0],) + (1,) * (means.ndim - 1))
    sums = (jnp.sum(w * means, axis=0), jnp.sum(w * variances, axis=0), jnp.sum(counts))
    if axis_name is not None:
        sums = _psum(sums, axis_name)
    total = jnp.maximum(sums[2], 1.0)
    return sums[0] / total, sums[1] / total, sums[2]


def ghost_batch_norm(
    virtual_batch_size: int,
    momentum: float = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    *,
    init_mean: float = CONVENTIONS["init_mean"],
    init_var: float = CONVENTIONS["init_var"],
    use_scale: bool = True,
    use_offset: bool = True,
) -> GhostBatchNorm:
    """Ghost batch norm (Hoffer et al. 2017) as a value: training statistics over groups of
    ``virtual_batch_size`` rows, evaluation with the running statistics (see ``GhostBatchNorm.apply``).
    ``virtual_batch_size >= batch`` is batch norm exactly.

    Args:
      virtual_batch_size: rows per group, an integer >= 1.
      momentum, eps, init_mean, init_var, use_scale, use_offset: as ``batch_norm``.

    Returns:
      a ``GhostBatchNorm``.

    Raises:
      ValueError: a ``virtual_batch_size`` that is not an integer >= 1, or as ``batch_norm``.
      TypeError: as ``batch_norm``.
    """
    return GhostBatchNorm(virtual_batch_size, momentum, eps, init_mean, init_var, use_scale, use_offset)
