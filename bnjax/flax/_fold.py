"""Folding bnjax norms into the ``nn.Dense``/``nn.Conv`` (``nnx.Linear``/``nnx.Conv``) before them (private; the
public names are in bnjax/flax/tools.py).

The formulas are bnjax's own (``layers.fold_batch_norm`` for a dense kernel ``[in, out]``,
``layers.fold_conv_batch_norm`` for a convolution kernel ``[..., in, out]``): with ``s = scale / sqrt(var +
epsilon)``, the kernel becomes ``kernel * s`` (per output feature) and the bias ``(bias - mean) * s + norm bias``.
The norm is then set to the identity in evaluation: ``scale`` 1, ``bias`` 0, running ``mean`` 0 and running
``var`` the float32 number ``v`` with ``v + epsilon == 1`` exactly, so ``rsqrt(var + epsilon)`` is 1 and the
norm's evaluation output is its input. A layer without a bias (``use_bias=False``, the usual layer before a
norm) cannot take the folded offset: it stays in the norm's ``bias`` (the norm then adds it), and when the norm
has no bias either the pair is left alone unless the offset is zero. Batch Renorm's ``step`` is kept. Folding is
for inference: in training the norm would normalise with batch statistics again.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx as fnnx

from bnjax import layers
from bnjax.flax import linen as blinen
from bnjax.flax import nnx as bnnx


class FoldReport(NamedTuple):
    """What a fold did: ``folded`` holds ``(layer, norm)`` path pairs, ``skipped`` ``(norm, reason)`` pairs
    (paths as ``'Block_0/Dense_0'``)."""

    folded: tuple[tuple[str, str], ...]
    skipped: tuple[tuple[str, str], ...]


def _fold_pair(kind: str, kernel: Any, bias: Any, norm: Any, nparams: Any, nstate: Any) -> tuple[Any, Any]:
    """bnjax's fold of one pair: ``(kernel, bias)`` (the bias always present)."""
    if kind == "dense":
        folded = layers.fold_batch_norm(layers.AffineParams(W=kernel, b=bias), norm, nparams, nstate)
        return folded.W, folded.b
    shape = kernel.shape  # a convolution of any rank: its spatial axes flattened into one HWIO height
    k, b = layers.fold_conv_batch_norm(kernel.reshape((-1, 1) + shape[-2:]), bias, norm, nparams, nstate)
    return k.reshape(shape), b


def _identity(nparams: Any, nstate: Any, eps: float, offset: Any) -> tuple[dict, dict]:
    """The norm's new parameters and statistics: the identity in evaluation (plus ``offset`` as its bias when the
    layer had no bias to take it)."""
    p = {}
    if nparams.gamma is not None:
        p["scale"] = jnp.ones_like(nparams.gamma)
    if nparams.beta is not None:
        p["bias"] = jnp.zeros_like(nparams.beta) if offset is None else offset.astype(nparams.beta.dtype)
    s = dict(nstate._asdict())
    s["mean"] = jnp.zeros_like(nstate.mean)
    s["var"] = jnp.full_like(nstate.var, layers.identity_running_var(eps, nstate.var.dtype))
    return p, s


def _plan(kind: str, kernel: Any, bias: Any, norm: Any, nparams: Any, nstate: Any) -> tuple[Any, str | None]:
    """Fold one pair, or say why not: ``((kernel, bias or None, norm params, norm stats), None)`` or
    ``(None, reason)``."""
    if kernel.shape[-1] != nstate.mean.shape[-1] or nstate.mean.ndim != 1:
        return None, (f"its features {tuple(nstate.mean.shape)} are not the layer's outputs ({kernel.shape[-1]}) on "
                      "the last axis")
    new_k, new_b = _fold_pair(kind, kernel, bias, norm, nparams, nstate)
    if bias is not None:
        p, s = _identity(nparams, nstate, norm.eps, None)
        return (new_k, new_b, p, s), None
    if nparams.beta is None and bool(np.any(np.asarray(new_b) != 0)):
        return None, "neither the layer nor the norm has a bias to hold the folded offset"
    p, s = _identity(nparams, nstate, norm.eps, new_b)
    return (new_k, None, p, s), None


# --------------------------------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------------------------------


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            return None
        tree = tree[name]
    return tree


def _put(tree: dict, path: Sequence[str], values: dict) -> None:
    for name in path:
        tree = tree[name]
    tree.update(values)


def _plain(tree: Any) -> Any:
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _trace_pairs(apply_fn: Callable, variables: Mapping, sample: Any, apply_kwargs: dict, who: str):
    """One forward (shapes only) with ``nn.intercept_methods``: each Dense/Conv output and each bnjax norm's
    input, matched by identity. Returns ``(pairs, unpaired)``: ``[(layer path, kind, norm path, norm module)]`` and
    ``[(norm path, reason)]``."""
    layer_calls, norm_calls, calls = [], [], {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module, path = context.module, tuple(context.module.scope.path)
        calls[path] = calls.get(path, 0) + 1
        if isinstance(module, (nn.Dense, nn.Conv)):
            layer_calls.append((path, "dense" if isinstance(module, nn.Dense) else "conv", out))
        elif isinstance(module, (blinen._BatchFamily, blinen._PerExample)):
            norm_calls.append((path, module, args[0] if args else kwargs.get("x")))
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v, x: apply_fn(v, x, **apply_kwargs), variables, sample)
    if not calls:
        raise ValueError(f"{who}: no Flax module was called while tracing apply_fn; pass model.apply itself (a "
                         "jax.jit-wrapped function traced before hides its modules)")
    pairs, unpaired = [], []
    for path, module, x in norm_calls:
        name = "/".join(path)
        source = next((lc for lc in layer_calls if lc[2] is x), None)
        if isinstance(module, blinen._PerExample):
            unpaired.append((name, "group/layer norm: no running statistics to fold (it normalises each example "
                                   "by its own statistics at evaluation too)"))
        elif source is None:
            unpaired.append((name, "its input is not the output of an nn.Dense or nn.Conv"))
        elif calls[path] > 1 or calls[source[0]] > 1:
            unpaired.append((name, "the norm or the layer before it is called more than once (a shared module)"))
        elif _common_axis(module, x) is not None:
            unpaired.append((name, _common_axis(module, x)))
        else:
            pairs.append((source[0], source[1], path, module))
    return pairs, unpaired


def _common_axis(module: Any, x: Any) -> str | None:
    """Why a norm's features are not the layer's outputs (``None`` when they are: the last axis only)."""
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    if tuple(a % x.ndim for a in axes) != (x.ndim - 1,):
        return f"its feature axis {module.axis!r} is not the last axis (the layer's outputs)"
    return None


def _outputs_close(a: Any, b: Any, rtol: float) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    for u, v in zip(la, lb):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if not np.all(np.abs(u - v) <= rtol * max(1.0, float(np.max(np.abs(u), initial=0.0)))):
            return False
    return len(la) == len(lb)


def fold_linen(apply_fn: Callable, variables: Mapping, sample: Any, *, rtol: float = 1e-3,
               **apply_kwargs: Any) -> tuple[dict, FoldReport]:
    """Fold each bnjax norm that directly follows an ``nn.Dense``/``nn.Conv`` into that layer (inference).

    The pairs are found by tracing one forward on ``sample`` with ``nn.intercept_methods``: a norm whose input is
    the very output of a Dense/Conv call. For each pair the layer's ``kernel``/``bias`` take bnjax's fold
    (``layers.fold_batch_norm`` / ``fold_conv_batch_norm``) and the norm becomes the identity in evaluation
    (module docstring of bnjax/flax/_fold.py). Other norms are left alone and reported. A Dense/Conv output
    used elsewhere too (a residual) cannot be folded: the evaluation outputs on ``sample`` are compared before
    and after, and a pair that changes them is undone and reported.

    Args:
      apply_fn: ``model.apply`` (not ``jax.jit``-wrapped).
      variables: the model's variables (``params``, ``batch_stats``).
      sample: an input batch (only its evaluation output is computed).
      rtol: the check's tolerance, relative to the largest output value (or 1).
      apply_kwargs: what puts the model in evaluation mode, e.g. ``train=False``.

    Returns:
      ``(new_variables, FoldReport)``; ``variables`` is not changed.

    Raises:
      ValueError: a model without any bnjax norm with running statistics (group/layer norms only refused),
        ``apply_kwargs`` that train (the norms' ``batch_stats`` are then immutable), or as the bnjax folds
        (non-finite running statistics).
    """
    who = "fold_linen"
    pairs, unpaired = _trace_pairs(apply_fn, variables, sample, apply_kwargs, who)
    if not pairs and not any("no running statistics" not in r for _, r in unpaired):
        reason = "group or layer norms only: no running statistics to fold" if unpaired else "no bnjax norm"
        raise ValueError(f"{who}: nothing to fold ({reason}); bnjax's norms fold only where they keep running "
                         "statistics (BatchNorm, BatchRenorm, GhostBatchNorm)")
    evaluate = jax.jit(lambda v, x: apply_fn(v, x, **apply_kwargs))  # one compilation for every check below
    reference = evaluate(_plain(variables), sample)
    plans, skipped = {}, list(unpaired)
    for lpath, kind, npath, module in pairs:
        layer = _get(variables["params"], lpath) or {}
        nparams = layers.BatchNormParams(gamma=_get(variables["params"], npath + ("scale",)),
                                         beta=_get(variables["params"], npath + ("bias",)))
        stats = _get(variables.get("batch_stats", {}), npath)
        if "kernel" not in layer or stats is None:
            skipped.append(("/".join(npath), "its variables are not at its path (a lifted transform?)"))
            continue
        nstate = (layers.BatchRenormState if "step" in stats else layers.BatchNormState)(**stats)
        plan, reason = _plan(kind, jnp.asarray(layer["kernel"]), layer.get("bias"), module.norm_value(), nparams,
                             nstate)
        if plan is None:
            skipped.append(("/".join(npath), reason))
        else:
            plans[(lpath, npath)] = plan

    def build(chosen):
        new = _plain(variables)
        for lpath, npath in chosen:
            k, b, p, s = plans[(lpath, npath)]
            _put(new["params"], lpath, {"kernel": k, **({} if b is None else {"bias": b})})
            _put(new["params"], npath, p)
            _put(new["batch_stats"], npath, s)
        return new

    folded = list(plans)
    if folded and not _outputs_close(reference, evaluate(build(folded), sample), rtol):
        # Undo the pairs that change the outputs by themselves (a layer output used elsewhere too).
        bad = [pair for pair in folded
               if not _outputs_close(reference, evaluate(build([pair]), sample), rtol)]
        for pair in bad:
            skipped.append(("/".join(pair[1]), "folding it changed the model's outputs on the sample (the layer's "
                                               "output is used elsewhere too, e.g. a residual)"))
        folded = [pair for pair in folded if pair not in bad]
    report = FoldReport(folded=tuple(("/".join(lp), "/".join(np_)) for lp, np_ in folded),
                        skipped=tuple(skipped))
    return build(folded), report


# --------------------------------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------------------------------


def _path_of(model: Any, target: Any, what: str, who: str) -> tuple:
    for path, node in fnnx.iter_graph(model):
        if node is target:
            return tuple(path)
    raise ValueError(f"{who}: the {what} {type(target).__name__} of a pair is not a module of this model; pass "
                     "(layer, norm) modules taken from the model, e.g. (model.conv1, model.bn1)")


def fold_nnx(model: Any, pairs: Sequence[tuple[Any, Any]], *, sample: Any = None, call: Callable | None = None,
             rtol: float = 1e-3) -> tuple[Any, FoldReport]:
    """Fold each given ``(nnx.Linear or nnx.Conv, bnjax NNX norm)`` pair of ``model``: a new model whose layer
    holds bnjax's fold and whose norm is the identity in evaluation (bnjax/flax/_fold.py's docstring).

    The pairs are named explicitly (an NNX model's call order is plain Python, which no tracer records): the
    norm must take the layer's output directly. With ``sample``, the evaluation outputs of the old and the new
    model are compared (a layer output used elsewhere too cannot be folded).

    Args:
      model: the ``nnx.Module``; not changed.
      pairs: ``[(layer, norm), ...]`` modules of ``model``, e.g. ``[(model.conv1, model.bn1)]``.
      sample: an input to check the evaluation outputs on, or ``None``.
      call: ``call(model, x)`` runs the model (``model(x)`` by default).
      rtol: the check's tolerance, relative to the largest output value (or 1).

    Returns:
      ``(new_model, FoldReport)``.

    Raises:
      TypeError: a layer that is not ``nnx.Linear``/``nnx.Conv``, a norm that is not a bnjax NNX norm.
      ValueError: a module not in ``model``, a group/layer norm (no running statistics), features that are not the
        layer's outputs on the last axis, no bias to hold the offset, outputs on ``sample`` that change, or as
        the bnjax folds.
    """
    who = "fold_nnx"
    call = call if call is not None else (lambda m, x: m(x))
    paths = []
    for layer, norm in pairs:
        if not isinstance(layer, (fnnx.Linear, fnnx.Conv)):
            raise TypeError(f"{who}: the layer of a pair must be an nnx.Linear or nnx.Conv, got {type(layer).__name__}")
        if isinstance(norm, bnnx._PerExample):
            raise ValueError(f"{who}: {type(norm).__name__} keeps no running statistics, so it has nothing to fold "
                             "(it normalises each example by its own statistics at evaluation too)")
        if not isinstance(norm, bnnx._BatchFamily):
            raise TypeError(f"{who}: the norm of a pair must be a bnjax.flax.nnx norm, got {type(norm).__name__}")
        if tuple(norm.axis if isinstance(norm.axis, (tuple, list)) else (norm.axis,)) != (-1,):
            raise ValueError(f"{who}: {type(norm).__name__}'s axis must be -1 (the layer's outputs, on the last "
                             f"axis), got {norm.axis!r}")
        paths.append((_path_of(model, layer, "layer", who), _path_of(model, norm, "norm", who)))
    graphdef, state = fnnx.split(model)

    def copy():  # a model of new Variables (merge alone would share the model's: folding would change it)
        return fnnx.merge(graphdef, jax.tree_util.tree_map(lambda v: v, state))

    new = copy()
    nodes = dict(fnnx.iter_graph(new))
    folded = []
    for lpath, npath in paths:
        layer, norm = nodes[lpath], nodes[npath]
        nparams = layers.BatchNormParams(gamma=None if norm.scale is None else norm.scale[...],
                                         beta=None if norm.bias is None else norm.bias[...])
        bias = None if layer.bias is None else layer.bias[...]
        kind = "dense" if isinstance(layer, fnnx.Linear) else "conv"
        plan, reason = _plan(kind, layer.kernel[...], bias, norm.norm_value(), nparams, norm._state())
        if plan is None:
            raise ValueError(f"{who}: cannot fold {'/'.join(map(str, npath))}: {reason}")
        k, b, p, s = plan
        layer.kernel[...] = k
        if b is not None:
            layer.bias[...] = b
        for name, value in {**p, **s}.items():
            getattr(norm, name)[...] = value
        folded.append(("/".join(map(str, lpath)), "/".join(map(str, npath))))
    if sample is not None:
        before, after = copy(), fnnx.merge(*fnnx.split(new))
        before.eval()
        after.eval()
        evaluate = fnnx.jit(call)
        if not _outputs_close(evaluate(before, sample), evaluate(after, sample), rtol):
            raise ValueError(f"{who}: folding changed the model's evaluation outputs on the sample: a folded layer's "
                             "output is used elsewhere too (e.g. a residual); leave that pair out")
    return new, FoldReport(folded=tuple(folded), skipped=())
