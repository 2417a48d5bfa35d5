"""Whole-model tools for Flax models built with bnjax's norms: precise statistics and folding.

* ``recalibrate_linen(apply_fn, variables, batches, **apply_kwargs)`` / ``recalibrate_nnx(model, batches)``:
  every bnjax norm's running mean and variance set to the equal-weight mean of its batch statistics over
  ``batches`` (precise statistics). They are ``bnjax.norms.recalibrate`` itself (bnjax/norms/precise.py): the
  model's own training-mode forward runs inside ``batch_statistics_as_state()``, the ``batch_stats`` of bnjax's
  modules are viewed as ``BatchNormState``/``BatchRenormState`` nodes, and ``recalibrate`` averages them; no
  averaging is written here.
* ``fold_linen(apply_fn, variables, sample, **apply_kwargs)`` / ``fold_nnx(model, pairs)``: each bnjax norm that
  directly follows an ``nn.Dense``/``nn.Conv`` (``nnx.Linear``/``nnx.Conv``) folded into that layer's kernel and
  bias (``bnjax.layers.fold_batch_norm`` / ``fold_conv_batch_norm``), the norm set to the identity in evaluation
  (bnjax/flax/_fold.py).

Only bnjax's norms (``bnjax.flax.linen`` / ``bnjax.flax.nnx``) are touched: Flax's own ``BatchNorm`` updates its
statistics with its own code, which ``batch_statistics_as_state`` cannot reach. Group and Layer Norm keep no
running statistics and are refused, as bnjax's own tools refuse them.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
from flax import nnx as fnnx

from bnjax import layers
from bnjax.flax import _fold
from bnjax.flax import linen as blinen
from bnjax.flax import nnx as bnnx
from bnjax.norms import precise

__all__ = ["recalibrate_linen", "recalibrate_nnx", "fold_linen", "fold_nnx", "FoldReport"]

FoldReport = _fold.FoldReport
fold_linen = _fold.fold_linen
fold_nnx = _fold.fold_nnx

_NO_UPDATE = "recalibrate: forward made no running update"


# --------------------------------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------------------------------


def _state_type(module: Any) -> type:
    return layers.BatchRenormState if module._kind == "renorm" else layers.BatchNormState


def _walk(tree: Mapping, path: tuple[str, ...]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


def _plain(tree: Any) -> Any:
    """Nested mappings (dicts, FrozenDicts) as nested plain dicts (new containers, the same arrays)."""
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _as_nodes(batch_stats: Mapping, norms: dict) -> dict:
    """``batch_stats`` with each bnjax norm's dict (at its path) replaced by its state node."""
    tree = _plain(batch_stats)
    for path, state_type in norms.items():
        parent = _walk(tree, path[:-1])
        parent[path[-1]] = state_type(**parent[path[-1]])
    return tree


def _as_dicts(tree: Any) -> Any:
    """The inverse of ``_as_nodes``: state nodes back to Flax's dicts."""
    if isinstance(tree, precise.RUNNING_STATS_TYPES):
        return dict(tree._asdict())
    return {k: _as_dicts(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _linen_norms(apply_fn: Callable, variables: Mapping, x: Any, mutable: Any, apply_kwargs: dict, key: Any,
                 who: str) -> tuple[dict, list, list]:
    """Trace one call (shapes only) and record the modules: ``(bnjax norms with running statistics: {path: state
    type}, bnjax norms without, other batch norms)`` by scope path."""
    with_stats, stateless, foreign, seen = {}, [], [], [0]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__":
            seen[0] += 1
            module, path = context.module, tuple(context.module.scope.path)
            if isinstance(module, blinen._BatchFamily):
                with_stats[path] = _state_type(module)
            elif isinstance(module, blinen._PerExample):
                stateless.append(path)
            elif isinstance(module, nn.BatchNorm):
                foreign.append(path)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        rngs = None if key is None else {"dropout": key}
        jax.eval_shape(lambda v, xb: apply_fn(v, xb, mutable=mutable, rngs=rngs, **apply_kwargs), variables, x)
    if not seen[0]:
        raise ValueError(f"{who}: no Flax module was called while tracing apply_fn; pass model.apply itself (a "
                         "jax.jit-wrapped function traced before hides its modules)")
    return with_stats, stateless, foreign


def _refuse_nothing(found: Any, stateless: list, foreign: list, who: str) -> None:
    if found:
        return
    if stateless:
        raise ValueError(f"{who}: the model's bnjax norms ({len(stateless)}: group or layer norm) keep no running "
                         "statistics, so there is nothing to do: they normalise each example by its own statistics "
                         "in training and evaluation alike")
    hint = (f" (Flax's own BatchNorm at {['/'.join(p) for p in foreign]} is not handled: use "
            "bnjax.flax.linen.BatchNorm, which loads its variables as they are)" if foreign else "")
    raise ValueError(f"{who}: the model has no bnjax norm with running statistics{hint}")


def _linen_forward(apply_fn: Callable, norms: tuple, apply_kwargs: tuple, params: Any, state: Any, x: Any, *,
                   train: bool, key: Any = None) -> tuple[Any, Any]:
    """``recalibrate``'s forward for a linen model: ``state`` is ``batch_stats`` with bnjax's norms as nodes."""
    del train  # the model's own keyword arguments (apply_kwargs) choose its training mode
    variables = {**params, "batch_stats": _as_dicts(state)}
    rngs = None if key is None else {"dropout": key}
    y, updates = apply_fn(variables, x, mutable=["batch_stats"], rngs=rngs, **dict(apply_kwargs))
    return y, _as_nodes(updates["batch_stats"], dict(norms))


def _first_batch(batches: Any) -> tuple[Any, Any]:
    """The first batch and ``batches`` to iterate again from the start (a generator is consumed once)."""
    if precise._is_array(batches):
        return batches[0], batches
    if isinstance(batches, (str, bytes, dict)) or not hasattr(batches, "__iter__"):
        raise TypeError(f"recalibrate: batches must be an array [num_batches, N, ...] or an iterable of batches, "
                        f"got {type(batches).__name__}")
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("recalibrate: batches is empty; give at least one batch") from None
    return first, itertools.chain([first], it)


def recalibrate_linen(apply_fn: Callable, variables: Mapping, batches: Any, *, key: Any = None,
                      batch_ndim: int | None = None, **apply_kwargs: Any) -> dict:
    """Precise statistics of a linen model: every bnjax norm's running ``mean``/``var`` set to the equal-weight
    mean of its batch statistics over ``batches`` (``bnjax.norms.recalibrate``).

    The model runs in training mode over the batches (``apply_fn(variables, x, mutable=['batch_stats'],
    **apply_kwargs)``; each layer sees the inputs training gives it), without gradients; parameters are kept,
    and so are other ``batch_stats`` entries (Batch Renorm's ``step``, Flax's own ``BatchNorm``).

    Args:
      apply_fn: ``model.apply`` (not ``jax.jit``-wrapped: the norms are found and switched while it is traced).
      variables: the model's variables (``params``, ``batch_stats``, ...).
      batches: an array ``[num_batches, N, ...]`` or an iterable of batches ``[N, ...]``.
      key: a ``jax.random`` key for the ``dropout`` rng collection (folded with each batch's index), or ``None``.
      batch_ndim: the rank of one batch, checked when given (as ``bnjax.norms.recalibrate``).
      apply_kwargs: what puts the model in training mode, e.g. ``train=True``.

    Returns:
      the new variables: a dict of ``variables``' structure with the new ``batch_stats``.

    Raises:
      ValueError: no ``batch_stats``, a model without bnjax norms with running statistics (group/layer norms
        only refused), a forward that did not train (``apply_kwargs`` missing), or as ``bnjax.norms.recalibrate``.
      TypeError: as ``bnjax.norms.recalibrate``.
    """
    who = "recalibrate_linen"
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        found = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"{who}: variables must hold the 'batch_stats' collection (model.init's), found {found}")
    first, batches = _first_batch(batches)
    norms, stateless, foreign = _linen_norms(apply_fn, variables, first, ["batch_stats"], apply_kwargs, key, who)
    _refuse_nothing(norms, stateless, foreign, who)
    try:
        state = _as_nodes(variables["batch_stats"], norms)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{who}: variables['batch_stats'] does not hold the statistics of the norms at "
                         f"{['/'.join(p) for p in norms]} ({err!r}); pass the variables of this model") from err
    params = {k: v for k, v in variables.items() if k != "batch_stats"}
    forward = functools.partial(_linen_forward, apply_fn, tuple(norms.items()), tuple(sorted(apply_kwargs.items())))
    try:
        new_state = precise.recalibrate(forward, params, state, batches, key=key, batch_ndim=batch_ndim)
    except ValueError as err:
        if str(err).startswith(_NO_UPDATE):
            raise ValueError(f"{who}: the model made no running update: call it with the keyword arguments that "
                             "put it in training mode (e.g. recalibrate_linen(model.apply, variables, batches, "
                             "train=True))") from err
        raise
    return {**_plain(variables), "batch_stats": _as_dicts(new_state)}


# --------------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------------


def _nnx_norms(model: Any) -> list:
    """The bnjax NNX norms with running statistics in ``model``, in graph order."""
    return [m for _, m in fnnx.iter_graph(model) if isinstance(m, bnnx._BatchFamily)]


def _call_model(model: Any, x: Any) -> Any:
    return model(x)


def _set_stats(norms: list, nodes: list) -> None:
    for module, node in zip(norms, nodes):
        for name, value in node._asdict().items():
            getattr(module, name)[...] = value


def _nnx_forward(graphdef: Any, call: Callable, params: Any, state: Any, x: Any, *, train: bool,
                 key: Any = None) -> tuple[Any, Any]:
    """``recalibrate``'s forward for an NNX model: ``params`` is its whole state, ``state`` the norms' nodes."""
    del key  # randomness comes from the model's own nnx.Rngs
    # Fresh Variables made at this trace level (a scan body's): those unflattened by the outer jit refuse updates.
    model = fnnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v, params))
    norms = _nnx_norms(model)
    _set_stats(norms, state)
    if train:
        model.train()
    y = call(model, x)
    return y, [m._state() for m in norms]


def recalibrate_nnx(model: Any, batches: Any, *, call: Callable | None = None,
                    batch_ndim: int | None = None) -> Any:
    """Precise statistics of an NNX model: a new model whose bnjax norms' running ``mean``/``var`` are the
    equal-weight mean of their batch statistics over ``batches`` (``bnjax.norms.recalibrate``).

    The model runs in training mode (``model.train()`` on a copy) over the batches, without gradients; ``model``
    itself is not changed.

    Args:
      model: an ``nnx.Module`` holding ``bnjax.flax.nnx`` norms.
      batches: an array ``[num_batches, N, ...]`` or an iterable of batches ``[N, ...]``.
      call: ``call(model, x)`` runs the model (``model(x)`` by default).
      batch_ndim: the rank of one batch, checked when given.

    Returns:
      a new model (the same graph) with the recalibrated statistics; every other value as in ``model``.

    Raises:
      ValueError: a model without bnjax norms with running statistics (group/layer norms only refused), or as
        ``bnjax.norms.recalibrate``.
      TypeError: as ``bnjax.norms.recalibrate``.
    """
    who = "recalibrate_nnx"
    norms = _nnx_norms(model)
    stateless = [p for p, m in fnnx.iter_graph(model) if isinstance(m, bnnx._PerExample)]
    foreign = [p for p, m in fnnx.iter_graph(model) if isinstance(m, fnnx.BatchNorm)]
    _refuse_nothing(norms, stateless, [tuple(map(str, p)) for p in foreign], who)
    graphdef, params = fnnx.split(model)
    nodes = [m._state() for m in norms]
    forward = functools.partial(_nnx_forward, graphdef, call if call is not None else _call_model)
    new_nodes = precise.recalibrate(forward, params, nodes, batches, batch_ndim=batch_ndim)
    new_model = fnnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v, params))  # new Variables: model kept
    _set_stats(_nnx_norms(new_model), new_nodes)
    return new_model
