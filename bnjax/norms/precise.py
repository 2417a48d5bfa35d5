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
from jax import lax

from bnjax.norms._checks import _as_input
from bnjax.norms.base import Norm
from bnjax.norms.core import RUNNING_STATS_TYPES, batch_statistics_as_state


def _is_stats(node: Any) -> bool:
    return isinstance(node, RUNNING_STATS_TYPES)


def _stats_nodes(tree: Any) -> list:
    """The running-statistics nodes of a state pytree, in pytree order."""
    return [n for n in jax.tree_util.tree_leaves(tree, is_leaf=_is_stats) if _is_stats(n)]


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


def recalibrate(forward: Callable, params: Any, state: Any, batches: Any, *, key: Any = None) -> Any:
    """Precise statistics for any network: every running-statistics node of ``state`` (each
    ``BatchNormState``/``BatchRenormState``: ``mean`` and ``var``) set to the equal-weight mean of that layer's
    batch statistics over ``batches`` (fvcore's precise BN, PyTorch's ``update_bn`` cumulative average).

    ``forward`` runs in training mode (each layer normalised as in training, so layer ``l`` sees the inputs
    training gives it) without gradients; the parameters are unchanged. One ``jax.jit``, a ``lax.scan`` over
    the batches inside (memory does not grow with their number), sums of the statistics divided by the count.

    How the batch statistics come out of a generic forward: ``forward`` is traced inside
    ``batch_statistics_as_state()``, under which every running update uses momentum 0, so the state it returns
    holds each layer's statistics of that batch (the arithmetic of a forward called with ``momentum=0.0``, bit
    for bit). Non-finite old running values count as 0 in that update, so a stale NaN/inf cannot leak, but
    ``forward`` gets ``state`` as it is rather than with zeroed statistics: Batch Renorm's training output reads
    the running statistics (its ``r`` and ``d``), so the later layers' statistics depend on them, as in
    training. Pass the plain function: a ``jax.jit``-wrapped forward traced before keeps its compiled updates
    (refused when no running update was reached while tracing).

    Args:
      forward: ``forward(params, state, x, *, train, key=None) -> (y, new_state)``, any network's forward, e.g.
        ``functools.partial(model.apply, config)``.
      params, state: the network's parameters and state; other state fields (Batch Renorm's ``step``) and
        states of norms without running statistics are kept.
      batches: ``[num_batches >= 1, N >= 1, ...]``, one batch per leading index.
      key: a ``jax.random`` key, folded with the batch index for each batch (dropout), or ``None``.

    Returns:
      the new state, of the structure of ``state``; ``state`` itself when it holds no running statistics.

    Raises:
      TypeError: ``forward`` not callable, ``batches`` not an array-like.
      ValueError: ``batches`` of rank < 2 or with no batch or no row; a forward that made no running update
        under ``batch_statistics_as_state`` (e.g. jitted and traced before) or returned a state with another
        number of running-statistics nodes.
    """
    who = "recalibrate"
    if not callable(forward):
        raise TypeError(f"{who}: forward must be a function forward(params, state, x, *, train, key=None), got "
                        f"{type(forward).__name__}")
    batches = _as_input(batches, who)
    if batches.ndim < 2 or batches.shape[0] < 1 or batches.shape[1] < 1:
        raise ValueError(f"{who}: batches must be [num_batches >= 1, N >= 1, ...] (one batch per leading index), "
                         f"got shape {batches.shape}")
    if not _stats_nodes(state):
        return state
    return _recalibrate(_Static(forward), params, state, batches, key)


@functools.partial(jax.jit, static_argnums=0)
def _recalibrate(forward: _Static, params: Any, state: Any, batches: Any, key: Any) -> Any:
    nodes = _stats_nodes(state)

    def body(sums, xs):
        i, xb = xs
        k = None if key is None else jax.random.fold_in(key, i)
        with batch_statistics_as_state() as updates:
            _, new_state = forward.fn(params, state, xb, train=True, key=k)
        if updates[0] == 0:
            raise ValueError("recalibrate: forward made no running update in training mode while traced here; "
                             "if it is jax.jit-wrapped and was traced before, pass the plain function (a cached "
                             "trace cannot see batch_statistics_as_state); a norm of one's own must update through "
                             "Norm.resolve_momentum")
        new = _stats_nodes(new_state)
        if len(new) != len(nodes):
            raise ValueError(f"recalibrate: forward returned a state with {len(new)} running-statistics nodes, "
                             f"the state given has {len(nodes)}")
        return jax.tree_util.tree_map(lambda acc, n: acc + n, sums, [(n.mean, n.var) for n in new]), None

    zero = [(jnp.zeros_like(n.mean), jnp.zeros_like(n.var)) for n in nodes]
    sums, _ = lax.scan(body, zero, (jnp.arange(batches.shape[0]), batches))
    num = batches.shape[0]
    replaced = iter([n._replace(mean=m / num, var=v / num) for n, (m, v) in zip(nodes, sums)])
    return jax.tree_util.tree_map(lambda n: next(replaced) if _is_stats(n) else n, state, is_leaf=_is_stats)


def recalibrate_norm(norm: Norm, params: Any, state: Any, batches: Any, **call_kwargs: Any) -> Any:
    """Precise statistics of one norm layer (``layers.recalibrate``): ``recalibrate`` with the layer as the
    network.

    Args:
      norm: the layer's norm value.
      params, state: the layer's parameters and state (other state fields are kept).
      batches: ``[num_batches, N, ...]``, one batch per leading index (rank >= 3).
      call_kwargs: passed to ``norm.apply`` (``feature_axes``, ``axis_name``, ``mask``, ...).

    Returns:
      the new state: ``mean`` and ``var`` are the averages of the per-batch statistics the norm's training
      mode computes (for Ghost BN its pooled group statistics; the biased variance unless the norm stores
      another); ``state`` itself for a norm without running statistics.

    Raises:
      TypeError: ``norm`` not a ``Norm``; ``momentum``, ``train``, ``update_stats`` or ``use_batch_stats`` in
        ``call_kwargs``; a state without running statistics for a norm that has them.
      ValueError: ``batches`` of rank < 3 or with no batch or no row, or as ``recalibrate``.
    """
    who = "recalibrate"
    if not isinstance(norm, Norm):
        raise TypeError(f"{who}: norm must be a norm value (layers.batch_norm(), ...), got {type(norm).__name__}")
    refused = sorted(set(call_kwargs) & {"momentum", "train", "update_stats", "use_batch_stats"})
    if refused:
        raise TypeError(f"{who}: {', '.join(refused)} cannot be set here: every batch runs in training mode "
                        "and the running statistics are replaced by the average of the batch statistics")
    if not norm.has_running_stats:
        return state
    if not _is_stats(state):
        raise TypeError(f"{who}: the norm's state must hold running statistics `mean` and `var` (a "
                        f"BatchNormState or BatchRenormState), got {type(state).__name__}")
    batches = _as_input(batches, who)
    if batches.ndim < 3 or batches.shape[0] < 1 or batches.shape[1] < 1:
        raise ValueError(f"{who}: batches must be [num_batches >= 1, N >= 1, ...], got shape {batches.shape}")

    # A partial of a module-level function, so equal norms and keywords reuse one compilation (see _Static).
    forward = functools.partial(_norm_forward, norm, tuple(sorted(call_kwargs.items())))
    return recalibrate(forward, params, state, batches)


def _norm_forward(norm: Norm, call_kwargs: tuple, params: Any, state: Any, x: Any, *, train: bool,
                  key: Any = None) -> Any:
    """One norm layer as a network: ``recalibrate``'s forward for ``recalibrate_norm`` (no randomness)."""
    del key
    return norm.apply(params, state, x, train=train, **dict(call_kwargs))
