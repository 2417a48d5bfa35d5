"""Whole-model tools for Equinox models holding bnjax's norms: precise statistics (``recalibrate``) and folding of
each norm into the ``eqx.nn.Linear``/``eqx.nn.Conv2d`` before it (``fold``).

Both reuse bnjax's own: ``recalibrate`` is ``bnjax.norms.recalibrate`` with the model's arrays as the parameters
(its ``batch_statistics_as_state`` switch reads every layer's batch statistics out of the returned state), and
``fold`` computes the folded weights with ``bnjax.layers.fold_batch_norm`` / ``fold_conv_batch_norm``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from bnjax.equinox.group import _ExampleNorm
from bnjax.equinox.layers import _RunningNorm
from bnjax.layers import AffineParams
from bnjax.norms import BatchNormParams, fold_batch_norm, fold_conv_batch_norm, identity_running_var
from bnjax.norms import recalibrate as _recalibrate_network

__all__ = ["recalibrate", "fold"]

Where = Callable[[Any], Any]


def _clone(state: eqx.nn.State) -> eqx.nn.State:
    """A fresh ``State`` with the same values: ``State.set`` invalidates the object it is called on, and the caller's
    must stay usable (Equinox's own recipe for reusing a state)."""
    leaves, treedef = jtu.tree_flatten(state)
    return jtu.tree_unflatten(treedef, leaves)


def _running_layers(model: Any) -> list:
    return [n for n in jtu.tree_leaves(model, is_leaf=lambda n: isinstance(n, _RunningNorm))
            if isinstance(n, _RunningNorm)]


def _forward(forward: Callable, static: Any, params: Any, state: Any, x: Any, *, train: bool,
             key: Any = None) -> tuple:
    """``bnjax.norms.recalibrate``'s ``forward(params, state, x, *, train, key)`` for an Equinox model split into
    its arrays (``params``) and the rest (``static``); a module-level function, so equal models share one
    compilation."""
    del train  # the user's forward runs the model in training mode itself
    model = eqx.combine(params, static)
    out = forward(model, _clone(state), x) if key is None else forward(model, _clone(state), x, key=key)
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)):
        raise TypeError("bnjax.equinox.recalibrate: forward(model, state, x) must return (y, state) with the eqx.nn.State its layers "
                        f"returned, got {type(out).__name__}")
    return out


def recalibrate(forward: Callable, model: Any, state: eqx.nn.State, batches: Any, *, key: Any = None,
                batch_ndim: int | None = None) -> eqx.nn.State:
    """Precise statistics: every bnjax batch norm's running mean and variance set to the equal-weight mean of its
    batch statistics over ``batches``.

    ``forward`` runs the model in training mode, so each layer sees the inputs training gives it; the model is
    unchanged. The per-batch statistics come out of the state ``forward`` returns under
    ``bnjax.norms.batch_statistics_as_state`` (``bnjax.norms.recalibrate``): one ``jax.jit`` with a ``lax.scan``
    over an array of batches, or one call per batch for a list or generator. Only bnjax's layers
    (``bnjax.equinox.BatchNorm``/``BatchRenorm``/``GhostBatchNorm``) are set; Equinox's own ``eqx.nn.BatchNorm``
    states are left as they are, and Batch Renorm's ``step`` is kept.

    Args:
      forward: ``forward(model, state, x) -> (y, state)`` on a batch ``x``, in training mode, usually
        ``jax.vmap(model, axis_name=..., in_axes=(0, None), out_axes=(0, None))(x, state)``; called with
        ``key=`` as well when ``key`` is given. A plain function: one wrapped in ``eqx.filter_jit`` and traced
        before keeps its compiled running updates.
      model: the Equinox model; its bnjax batch norms must be in training mode (``inference=False``).
      state: its ``eqx.nn.State`` (left usable).
      batches: an array ``[num_batches, N, ...]`` or an iterable of batches ``[N, ...]``.
      key: a ``jax.random`` key folded with each batch's index, or ``None``.
      batch_ndim: the rank of one batch, checked when given (as ``bnjax.norms.recalibrate``).

    Returns:
      the new ``eqx.nn.State``.

    Raises:
      ValueError: a model without bnjax batch norms (Group/Layer Norm keep no running statistics), one in
        inference mode, a forward that made no running update, or as ``bnjax.norms.recalibrate`` for the
        batches.
      TypeError: ``forward`` not callable or not returning ``(y, eqx.nn.State)``, ``state`` not an
        ``eqx.nn.State``, or as ``bnjax.norms.recalibrate``.
    """
    who = "bnjax.equinox.recalibrate"
    if not callable(forward):
        raise TypeError(f"{who}: forward must be a function forward(model, state, x) -> (y, state), got "
                        f"{type(forward).__name__}")
    if not isinstance(state, eqx.nn.State):
        raise TypeError(f"{who}: state must be the model's eqx.nn.State, got {type(state).__name__}")
    layers = _running_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model holds no bnjax.equinox BatchNorm, BatchRenorm or GhostBatchNorm, so "
                         "there are no running statistics to set (GroupNorm/LayerNorm keep none; Equinox's own "
                         "eqx.nn.BatchNorm is not changed)")
    frozen = [type(n).__name__ for n in layers if n.inference is not False]
    if frozen:
        raise ValueError(f"{who}: {len(frozen)} norm layer(s) ({frozen[0]} first) are in inference mode and would "
                         "not return batch statistics; pass the training model (eqx.nn.inference_mode(model, False))")
    params, static = eqx.partition(model, eqx.is_array)
    fn = functools.partial(_forward, forward, static)
    try:
        return _recalibrate_network(fn, params, _clone(state), batches, key=key, batch_ndim=batch_ndim)
    except ValueError as err:
        if "made no running update" not in str(err):
            raise
        raise ValueError(f"{who}: forward made no running update in training mode: it must call the model's layers "
                         "with inference=False, and be a plain function (an eqx.filter_jit-wrapped forward traced "
                         "before keeps its compiled updates)") from err


def _getter(path: tuple) -> Where:
    """The accessor ``model -> node`` of a ``jax.tree_util`` key path (attributes, indices, dict keys)."""
    def get(tree):
        for k in path:
            if isinstance(k, jtu.GetAttrKey):
                tree = getattr(tree, k.name)
            elif isinstance(k, jtu.SequenceKey):
                tree = tree[k.idx]
            elif isinstance(k, jtu.DictKey):
                tree = tree[k.key]
            else:  # a custom pytree node's key: no accessor for it
                raise TypeError(f"fold: cannot follow the key {k!r}; pass the pairs explicitly")
        return tree
    return get


def _foldable(node: Any) -> bool:
    return (isinstance(node, eqx.nn.Linear) and node.out_features != "scalar") or (
        isinstance(node, eqx.nn.Conv) and node.num_spatial_dims == 2)


def _sequential_pairs(model: Any) -> list:
    """``(where_layer, where_norm)`` for each ``Linear``/``Conv2d`` followed directly by a bnjax batch norm inside an
    ``eqx.nn.Sequential`` (which calls its layers in order: the one place where "the layer before" is certain)."""
    pairs: list = []

    def visit(node, get):
        is_seq = lambda n: isinstance(n, eqx.nn.Sequential)  # noqa: E731
        for path, seq in jtu.tree_flatten_with_path(node, is_leaf=is_seq)[0]:
            if not is_seq(seq):
                continue
            at = (lambda g, p: (lambda m: _getter(p)(g(m))))(get, path)
            items = list(seq.layers)
            for i, layer in enumerate(items):
                here = (lambda a, j: (lambda m: a(m).layers[j]))(at, i)
                visit(layer, here)
                if i + 1 < len(items) and _foldable(layer) and isinstance(items[i + 1], _RunningNorm):
                    pairs.append((here, (lambda a, j: (lambda m: a(m).layers[j]))(at, i + 1)))

    visit(model, lambda m: m)
    return pairs


def _fold_pair(layer: Any, norm: _RunningNorm, stats: Any, who: str) -> tuple:
    """The folded layer, the identity norm and its new running statistics."""
    if not 0.0 < norm.eps < 1.0:
        raise ValueError(f"{who}: the folded norm is made the identity through its variance, which needs eps < 1; "
                         f"got eps={norm.eps!r}")
    params = BatchNormParams(norm.weight, norm.bias)
    if isinstance(layer, eqx.nn.Linear):  # bnjax's Affine: W [in, out]; Equinox's weight is [out, in]
        folded = fold_batch_norm(AffineParams(W=layer.weight.T, b=layer.bias), norm.norm, params, stats)
        weight, bias = folded.W.T, folded.b
    else:  # Conv2d: Equinox's OIHW kernel and [O, 1, 1] bias; bnjax folds HWIO and [O]
        b = None if layer.bias is None else layer.bias.reshape(-1)
        kernel, bias = fold_conv_batch_norm(jnp.transpose(layer.weight, (2, 3, 1, 0)), b, norm.norm, params, stats)
        weight = jnp.transpose(kernel, (3, 2, 0, 1))
    dtype = stats.mean.dtype
    if layer.bias is not None:
        layer = eqx.tree_at(lambda lay: (lay.weight, lay.bias), layer, (weight, bias.reshape(layer.bias.shape)))
        mean = jnp.zeros_like(stats.mean)
    else:  # no bias to hold the shift: the norm adds it, as x - mean with mean = -shift
        layer = eqx.tree_at(lambda lay: lay.weight, layer, weight)
        mean = -bias.astype(dtype)
    var = jnp.full(stats.var.shape, identity_running_var(norm.eps, dtype), dtype)
    if norm.weight is not None:
        norm = eqx.tree_at(lambda n: n.weight, norm, jnp.ones_like(norm.weight))
    if norm.bias is not None:
        norm = eqx.tree_at(lambda n: n.bias, norm, jnp.zeros_like(norm.bias))
    return layer, norm, stats._replace(mean=mean, var=var)


def fold(model: Any, state: eqx.nn.State, pairs: Sequence[tuple[Where, Where]] | None = None) -> tuple:
    """Folds each bnjax batch norm into the ``eqx.nn.Linear``/``eqx.nn.Conv2d`` before it, for inference.

    With ``s = weight / sqrt(var + eps)`` of the norm's running statistics, the layer's weights become ``W * s``
    (per output) and its bias ``(b - mean) * s + bias_norm`` (``bnjax.layers.fold_batch_norm`` /
    ``fold_conv_batch_norm``; Equinox's OIHW kernels are transposed to bnjax's HWIO and back). The norm stays in
    the model (an Equinox model's call is code, so a layer cannot be removed) as the identity in inference:
    weight 1, bias 0, running mean 0 and a running variance ``v`` with ``v + eps == 1`` exactly in float32, so
    ``rsqrt(v + eps)`` is 1 and the norm returns its input bit for bit. A layer without bias has no place for
    the shift ``(0 - mean) * s + bias_norm``: the norm keeps it as its running mean ``-shift`` (it then adds the
    shift, exactly). The model's outputs in inference are unchanged up to rounding. Training the folded model
    again would normalise with batch statistics: fold a copy for inference only.

    Args:
      model: the Equinox model.
      state: its ``eqx.nn.State`` (left usable).
      pairs: ``(where_layer, where_norm)`` accessor pairs, as ``eqx.tree_at`` takes them (``lambda m: m.conv1``,
        ``lambda m: m.bn1``): the norm must normalise that layer's output. ``None``: every ``Linear``/``Conv2d``
        directly followed by a bnjax batch norm inside an ``eqx.nn.Sequential`` (the only place where the order
        is known).

    Returns:
      ``(model, state)`` with the layers folded and the norms made the identity.

    Raises:
      TypeError: a layer that is not an ``eqx.nn.Linear`` (with vector output) or a 2-D ``eqx.nn.Conv``, a norm
        that is not a bnjax batch norm (``eqx.nn.BatchNorm`` included), ``state`` not an ``eqx.nn.State``, pairs
        that are not accessor pairs.
      ValueError: a Group/Layer Norm (no running statistics), a layer's outputs that are not the norm's
        ``input_size``, a norm in two pairs, no pair found with ``pairs=None``, ``eps >= 1``, or non-finite
        running statistics (as ``bnjax.layers.fold_batch_norm``).
    """
    who = "bnjax.equinox.fold"
    if not isinstance(state, eqx.nn.State):
        raise TypeError(f"{who}: state must be the model's eqx.nn.State, got {type(state).__name__}")
    if pairs is None:
        pairs = _sequential_pairs(model)
        if not pairs:
            raise ValueError(f"{who}: no eqx.nn.Linear/Conv2d directly followed by a bnjax batch norm inside an "
                             "eqx.nn.Sequential; pass the pairs: fold(model, state, [(lambda m: m.conv, "
                             "lambda m: m.bn)])")
    state, seen = _clone(state), set()
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(callable(w) for w in pair)):
            raise TypeError(f"{who}: each pair must be (where_layer, where_norm), two functions model -> layer, got "
                            f"{pair!r}")
        where_layer, where_norm = pair
        layer, norm = where_layer(model), where_norm(model)
        if isinstance(norm, _ExampleNorm):
            raise ValueError(f"{who}: {type(norm).__name__} keeps no running statistics (each example is normalised "
                             "by its own, in inference too), so it has no fixed scale and shift to fold; keep it")
        if not isinstance(norm, _RunningNorm):
            raise TypeError(f"{who}: where_norm must give a bnjax.equinox BatchNorm, BatchRenorm or GhostBatchNorm, "
                            f"got {type(norm).__name__}"
                            + (" (Equinox's own; replace it with bnjax.equinox.BatchNorm)"
                               if isinstance(norm, eqx.nn.BatchNorm) else ""))
        if not _foldable(layer):
            raise TypeError(f"{who}: where_layer must give an eqx.nn.Linear (vector output) or eqx.nn.Conv2d, got "
                            f"{type(layer).__name__}")
        out = layer.out_features if isinstance(layer, eqx.nn.Linear) else layer.out_channels
        if out != norm.input_size:
            raise ValueError(f"{who}: the {type(layer).__name__} has {out} outputs but the {type(norm).__name__} "
                             f"normalises {norm.input_size} features: the pair does not fit (is the norm the one "
                             "right after this layer?)")
        if norm.state_index.marker in seen:
            raise ValueError(f"{who}: the same {type(norm).__name__} is in two pairs; a norm follows one layer")
        seen.add(norm.state_index.marker)
        stats = norm._stats(state, who)
        new_layer, new_norm, new_stats = _fold_pair(layer, norm, stats, who)
        model = eqx.tree_at(where_layer, model, new_layer)
        model = eqx.tree_at(where_norm, model, new_norm)
        state = state.set(norm.state_index, new_stats)
    return model, state
