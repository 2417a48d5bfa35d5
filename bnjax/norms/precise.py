"""Precise statistics (``recalibrate``): running statistics set to the equal-weight mean of batch statistics.

One implementation for any network: ``recalibrate(forward, params, state, batches)`` runs the network's own
training-mode forward over the batches and reads every norm layer's batch statistics out of the state it
returns; ``recalibrate_norm`` is the same for one norm layer (``layers.recalibrate``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.norms._checks import _as_input
from bnjax.norms.base import Norm
from bnjax.norms.core import RUNNING_STATS_TYPES, batch_statistics_as_state
from bnjax.norms.group import GroupNormState

Array = jax.Array


def _is_stats(node: Any) -> bool:
    return isinstance(node, RUNNING_STATS_TYPES)


def _stats_nodes(tree: Any) -> list:
    """The running-statistics nodes of a state pytree, in pytree order."""
    return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=_is_stats) if _is_stats(n)]


def _refuse_only_stateless(state: Any, who: str) -> None:
    """Refuse a state whose norms all keep no running statistics (a network of group or layer norms): there is
    nothing to recalibrate. A state without any norm, or with some running statistics, passes."""
    def stateless(node):
        return isinstance(node, GroupNormState)

    if _stats_nodes(state):
        return
    nodes = [n for n in jax.tree_util.tree_leaves(state, is_leaf=stateless) if stateless(n)]
    if nodes:
        raise ValueError(f"{who}: the network's norms keep no running statistics ({len(nodes)} GroupNormState "
                         "node(s): group or layer norm), so there is nothing to recalibrate: they normalise each "
                         "example by its own statistics in training and evaluation alike")


class _Static:
    """``forward`` as a static ``jit`` argument: a ``functools.partial`` compares by its function and arguments
    (``functools.partial(model.apply, config)`` is a new object on every call, and would otherwise compile
    again each time); anything else, or a partial with unhashable arguments, by identity."""

    def __init__(self, fn: Callable):
        self.fn = fn
        key: Any = fn
        if isinstance(fn, functools.partial):
            key = (fn.func, fn.args, tuple(sorted(fn.keywords.items())))
            try:
                hash(key)
            except TypeError:
                key = fn
        self.key = key

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Static) and (self.key is other.key or self.key == other.key)


def _is_array(value: Any) -> bool:
    """An array (JAX, NumPy, or anything with ``__array__``): a stack of batches on its leading axis. Lists,
    tuples, generators and other iterables are sequences of batches."""
    return isinstance(value, (jax.Array, np.ndarray)) or hasattr(value, "__array__")


def _batch_rank(batch: Any, batch_ndim: int | None, where: str, who: str) -> Array:
    """One batch as an array, checked: at least one row, and ``batch_ndim`` dimensions when given."""
    batch = _as_input(batch, who)
    if batch.ndim < 1 or batch.shape[0] < 1:
        raise ValueError(f"{who}: {where} must have at least one row, got shape {tuple(batch.shape)}")
    if batch_ndim is not None and batch.ndim != batch_ndim:
        raise ValueError(
            f"{who}: {where} has shape {tuple(batch.shape)}, but a batch of this layer has rank {batch_ndim} "
            f"(batch_ndim={batch_ndim}); stack batches on a new leading axis ([num_batches, N, ...]: a single "
            "batch needs batches[None]) or pass a list of batches, and set batch_ndim to the rank of one batch "
            "(2 for [N, C], 4 for [N, H, W, C])")
    return batch


def recalibrate(forward: Callable, params: Any, state: Any, batches: Any, *, key: Any = None,
                batch_ndim: int | None = None) -> Any:
    """Precise statistics for any network: every running-statistics node of ``state`` (each
    ``BatchNormState``/``BatchRenormState``: ``mean`` and ``var``) set to the equal-weight mean of that layer's
    batch statistics over ``batches`` (fvcore's precise BN, PyTorch's ``update_bn`` cumulative average).

    ``forward`` runs in training mode (each layer normalised as in training, so layer ``l`` sees the inputs
    training gives it) without gradients; the parameters are unchanged. For an array of batches: one
    ``jax.jit``, a ``lax.scan`` over the batches inside (memory does not grow with their number), sums of the
    statistics divided by the count. For any other iterable of batches (a list, a generator, a data loader):
    one jitted call per batch, summed as they come (batches may differ in size; one compilation per shape).

    How the batch statistics come out of a generic forward: ``forward`` is traced inside
    ``batch_statistics_as_state()``, under which every running update uses momentum 0, so the state it returns
    holds each layer's statistics of that batch (the arithmetic of a forward called with ``momentum=0.0``, bit
    for bit). ``forward`` gets ``state`` as it is, except that non-finite running values are replaced by the
    usual start (mean 0, variance 1), so a stale NaN/inf cannot leak: Batch Renorm's training output reads the
    running statistics (its ``r`` and ``d``), so the later layers' statistics depend on them, as in training.
    Pass the plain function: a ``jax.jit``-wrapped forward traced before keeps its compiled updates (refused
    when no running update was reached while tracing).

    Args:
      forward: ``forward(params, state, x, *, train, key=None) -> (y, new_state)``, any network's forward, e.g.
        ``functools.partial(model.apply, config)``.
      params, state: the network's parameters and state; other state fields (Batch Renorm's ``step``) and
        states of norms without running statistics are kept.
      batches: an array ``[num_batches >= 1, N >= 1, ...]`` (one batch per leading index), or an iterable of
        batches ``[N >= 1, ...]`` (list, tuple, generator), at least one.
      key: a ``jax.random`` key, folded with the batch index for each batch (dropout), or ``None``.
      batch_ndim: the rank of one batch (2 for ``[N, C]``), checked when given: a stack of single examples
        without its batches axis is then refused instead of read as batches of rows.

    Returns:
      the new state, of the structure of ``state``; ``state`` itself when it holds no running statistics.

    Raises:
      TypeError: ``forward`` not callable, ``batches`` neither an array-like nor an iterable of them,
        ``batch_ndim`` not an integer.
      ValueError: a state whose norms all keep no running statistics (only ``GroupNormState`` nodes: group or
        layer norms); ``batch_ndim`` < 1, no batch, a batch with no row, batches of another rank than
        ``batch_ndim``; a forward that made no running update under ``batch_statistics_as_state`` (e.g. jitted
        and traced before) or returned a state with another number of running-statistics nodes.
    """
    who = "recalibrate"
    if not callable(forward):
        raise TypeError(f"{who}: forward must be a function forward(params, state, x, *, train, key=None), got "
                        f"{type(forward).__name__}")
    _refuse_only_stateless(state, who)
    if batch_ndim is not None and (isinstance(batch_ndim, bool) or not isinstance(batch_ndim, int)
                                   or batch_ndim < 1):
        error = ValueError if isinstance(batch_ndim, int) and not isinstance(batch_ndim, bool) else TypeError
        raise error(f"{who}: batch_ndim must be None or an integer >= 1 (the rank of one batch), got "
                    f"{batch_ndim!r}")
    if not _is_array(batches):
        if isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
            raise TypeError(f"{who}: batches must be an array [num_batches, N, ...] or an iterable of batches "
                            f"[N, ...], got {type(batches).__name__}")
        return _recalibrate_iterable(forward, params, state, batches, key, batch_ndim, who)
    batches = _as_input(batches, who)
    if batches.ndim < 2 or batches.shape[0] < 1 or batches.shape[1] < 1:
        raise ValueError(f"{who}: batches must be [num_batches >= 1, N >= 1, ...] (one batch per leading index), "
                         f"got shape {batches.shape}")
    if batch_ndim is not None:
        _batch_rank(batches[0], batch_ndim, f"each batch (batches[0] of batches {tuple(batches.shape)})", who)
    if not _stats_nodes(state):
        return state
    return _recalibrate(_Static(forward), params, state, batches, key)


def _finite_stats(state: Any) -> Any:
    """``state`` with non-finite running means set to 0 and non-finite running variances to 1 (a stale NaN/inf
    must not reach a forward that reads them, as Batch Renorm's training does); finite values unchanged."""
    def clean(node):
        return node._replace(mean=jnp.where(jnp.isfinite(node.mean), node.mean, jnp.zeros_like(node.mean)),
                             var=jnp.where(jnp.isfinite(node.var), node.var, jnp.ones_like(node.var)))

    return jax.tree_util.tree_map(lambda n: clean(n) if _is_stats(n) else n, state, is_leaf=_is_stats)


def _layer_stats(forward: _Static, params: Any, state: Any, xb: Any, i: Any, key: Any, num_nodes: int) -> list:
    """Each running-statistics node's ``(mean, var)`` of batch ``xb`` (the ``i``-th; ``key`` folded with ``i``)."""
    k = None if key is None else jax.random.fold_in(key, i)
    with batch_statistics_as_state() as updates:
        _, new_state = forward.fn(params, state, xb, train=True, key=k)
    if updates[0] == 0:
        raise ValueError("recalibrate: forward made no running update in training mode while traced here; "
                         "if it is jax.jit-wrapped and was traced before, pass the plain function (a cached "
                         "trace cannot see batch_statistics_as_state); a norm of one's own must update through "
                         "Norm.resolve_momentum")
    new = _stats_nodes(new_state)
    if len(new) != num_nodes:
        raise ValueError(f"recalibrate: forward returned a state with {len(new)} running-statistics nodes, "
                         f"the state given has {num_nodes}")
    return [(n.mean, n.var) for n in new]


def _replace_stats(state: Any, sums: list, num: Any) -> Any:
    """``state`` with each running-statistics node's mean and var set to its sums divided by ``num``."""
    nodes = _stats_nodes(state)
    replaced = iter([n._replace(mean=m / num, var=v / num) for n, (m, v) in zip(nodes, sums)])
    return jax.tree_util.tree_map(lambda n: next(replaced) if _is_stats(n) else n, state, is_leaf=_is_stats)


@functools.partial(jax.jit, static_argnums=0)
def _recalibrate(forward: _Static, params: Any, state: Any, batches: Any, key: Any) -> Any:
    nodes = _stats_nodes(state)
    clean = _finite_stats(state)

    def body(sums, xs):
        i, xb = xs
        stats = _layer_stats(forward, params, clean, xb, i, key, len(nodes))
        return jax.tree_util.tree_map(lambda acc, n: acc + n, sums, stats), None

    zero = [(jnp.zeros_like(n.mean), jnp.zeros_like(n.var)) for n in nodes]
    sums, _ = lax.scan(body, zero, (jnp.arange(batches.shape[0]), batches))
    return _replace_stats(state, sums, batches.shape[0])


_one_batch = jax.jit(_layer_stats, static_argnums=(0, 6))


def _recalibrate_iterable(forward: Callable, params: Any, state: Any, batches: Any, key: Any,
                          batch_ndim: int | None, who: str) -> Any:
    """``recalibrate`` over an iterable of batches: one jitted call per batch, the sums kept as they come."""
    nodes = _stats_nodes(state)
    static, clean = _Static(forward), _finite_stats(state)
    sums, num = None, 0
    for xb in batches:
        xb = _batch_rank(xb, batch_ndim, f"batch {num}", who)
        if not nodes:  # nothing to recalibrate: the batches are only checked
            num += 1
            continue
        stats = _one_batch(static, params, clean, xb, jnp.asarray(num, jnp.int32), key, len(nodes))
        sums = stats if sums is None else jax.tree_util.tree_map(lambda acc, n: acc + n, sums, stats)
        num += 1
    if num == 0:
        raise ValueError(f"{who}: batches is empty; give at least one batch")
    return state if not nodes else _replace_stats(state, sums, num)


def recalibrate_norm(norm: Norm, params: Any, state: Any, batches: Any, *, batch_ndim: int = 2,
                     **call_kwargs: Any) -> Any:
    """Precise statistics of one norm layer (``layers.recalibrate``): ``recalibrate`` with the layer as the
    network.

    The rank of one batch cannot be read off a stack (``[4, 28, 28, 16]`` is four images or four batches of 28
    rows), so it is stated: ``batch_ndim`` (2, ``[N, C]``, by default; 4 for a conv layer's ``[N, H, W, C]``),
    and batches of any other rank are refused.

    Args:
      norm: the layer's norm value.
      params, state: the layer's parameters and state (other state fields are kept).
      batches: ``[num_batches, N, ...]`` of rank ``batch_ndim + 1``, one batch per leading index, or an iterable
        of batches of rank ``batch_ndim`` (list, tuple, generator).
      batch_ndim: the rank of one batch as the layer sees it: 2 for ``[N, C]`` (the default), 4 for
        ``[N, H, W, C]``.
      call_kwargs: passed to ``norm.apply`` (``feature_axes``, ``axis_name``, ``mask``, ...).

    Returns:
      the new state: ``mean`` and ``var`` are the averages of the per-batch statistics the norm's training
      mode computes (for Ghost BN its pooled group statistics; the biased variance unless the norm stores
      another).

    Raises:
      TypeError: ``norm`` not a ``Norm``; ``momentum``, ``train``, ``update_stats`` or ``use_batch_stats`` in
        ``call_kwargs``; a state without running statistics for a norm that has them; ``batch_ndim`` not an
        integer.
      ValueError: a norm without running statistics (``has_running_stats=False``: group and layer norm);
        ``batch_ndim`` < 2, batches not of rank ``batch_ndim`` (+ 1 for a stack), with no batch or no row, or as
        ``recalibrate``.
    """
    who = "recalibrate"
    if not isinstance(norm, Norm):
        raise TypeError(f"{who}: norm must be a norm value (layers.batch_norm(), ...), got {type(norm).__name__}")
    refused = sorted(set(call_kwargs) & {"momentum", "train", "update_stats", "use_batch_stats"})
    if refused:
        raise TypeError(f"{who}: {', '.join(refused)} cannot be set here: every batch runs in training mode "
                        "and the running statistics are replaced by the average of the batch statistics")
    if not norm.has_running_stats:
        raise ValueError(f"{who}: {type(norm).__name__} has no running statistics to recalibrate "
                         "(has_running_stats=False): it normalises each example by its own statistics in training "
                         "and evaluation alike")
    if not _is_stats(state):
        raise TypeError(f"{who}: the norm's state must hold running statistics `mean` and `var` (a "
                        f"BatchNormState or BatchRenormState), got {type(state).__name__}")
    if isinstance(batch_ndim, bool) or not isinstance(batch_ndim, int) or batch_ndim < 2:
        error = ValueError if isinstance(batch_ndim, int) and not isinstance(batch_ndim, bool) else TypeError
        raise error(f"{who}: batch_ndim must be an integer >= 2 (the rank of one batch: 2 for [N, C], 4 for "
                    f"[N, H, W, C]), got {batch_ndim!r}")
    if _is_array(batches):
        batches = _as_input(batches, who)
        if batches.ndim != batch_ndim + 1:
            raise ValueError(
                f"{who}: batches has shape {tuple(batches.shape)} (rank {batches.ndim}), but a stack of batches of "
                f"rank {batch_ndim} (batch_ndim={batch_ndim}) has rank {batch_ndim + 1}: [num_batches, N, ...]. A "
                "single batch needs its leading batches axis (batches[None]); a conv layer's [N, H, W, C] batches "
                "need batch_ndim=4")
        if batches.shape[0] < 1 or batches.shape[1] < 1:
            raise ValueError(f"{who}: batches must be [num_batches >= 1, N >= 1, ...], got shape {batches.shape}")

    # A partial of a module-level function, so equal norms and keywords reuse one compilation (see _Static).
    forward = functools.partial(_norm_forward, norm, tuple(sorted(call_kwargs.items())))
    return recalibrate(forward, params, state, batches, batch_ndim=batch_ndim)


def _norm_forward(norm: Norm, call_kwargs: tuple, params: Any, state: Any, x: Any, *, train: bool,
                  key: Any = None) -> Any:
    """One norm layer as a network: ``recalibrate``'s forward for ``recalibrate_norm`` (no randomness)."""
    del key
    return norm.apply(params, state, x, train=train, **dict(call_kwargs))
