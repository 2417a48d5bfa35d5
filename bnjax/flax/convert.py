"""A Flax ``BatchNorm``'s variables to bnjax's params, state and norm value, and back.

The mapping (Flax and bnjax share every convention here, so no value is changed and a round trip is exact):

================================  =======================================  ===================================
Flax (linen ``params`` /          bnjax                                    note
``batch_stats``; ``nnx.BatchNorm``
attributes)
================================  =======================================  ===================================
``scale``                         ``BatchNormParams.gamma``                absent (``use_scale=False``): None
``bias``                          ``BatchNormParams.beta``                 absent (``use_bias=False``): None
``mean``                          ``BatchNormState.mean``                  float32
``var``                           ``BatchNormState.var``                   biased in both
``momentum`` (module attribute)   ``batch_norm(momentum=...)``             same convention:
                                                                           ``m * old + (1 - m) * batch``
``epsilon`` (module attribute)    ``batch_norm(eps=...)``                  Flax's default 1e-5
``axis`` (module attribute)       ``apply(..., feature_axes=axis)``        pass it to ``apply``
================================  =======================================  ===================================

A linen checkpoint holds no ``momentum``/``epsilon``: give the module (``flax.linen.BatchNorm`` or
``bnjax.flax.linen.BatchNorm``) or the values; Flax's defaults (0.99, 1e-5) are used otherwise. The batch
variance Flax computes one-pass by default (``use_fast_variance=True``) and bnjax two-pass: trained statistics
carry over unchanged, new batch statistics may differ in rounding (much more at ``|mean| / std`` of 1e4).
bnjax's running statistics are at least float32: Flax's are float32 too (``force_float32_reductions``).
Compare ``bnjax.layers.torch_batch_norm_to_bnjax`` (bnjax/norms/torch.py), the same for PyTorch.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx

from bnjax import layers

__all__ = ["linen_to_bnjax", "bnjax_to_linen", "nnx_to_bnjax", "bnjax_to_nnx"]

_FLAX_DEFAULTS = {"momentum": 0.99, "epsilon": 1e-5}


def _options(module: Any, momentum: float | None, epsilon: float | None, who: str) -> tuple[float, float]:
    """``momentum`` and ``epsilon``: given, else the module's, else Flax's defaults."""
    if module is not None and not all(hasattr(module, n) for n in ("momentum", "epsilon")):
        raise TypeError(f"{who}: module must be a BatchNorm module (flax.linen.BatchNorm, nnx.BatchNorm or bnjax's), "
                        f"got {type(module).__name__}")
    m = momentum if momentum is not None else module.momentum if module is not None else _FLAX_DEFAULTS["momentum"]
    e = epsilon if epsilon is not None else module.epsilon if module is not None else _FLAX_DEFAULTS["epsilon"]
    return m, e


def _get(tree: Mapping[str, Any], name: str, where: str, who: str, required: bool) -> Any:
    if not isinstance(tree, Mapping):
        raise TypeError(f"{who}: {where} must be a dict of arrays (one BatchNorm layer's), got {type(tree).__name__}")
    if name not in tree:
        if required:
            raise KeyError(f"{who}: {where} lacks {name!r} (found {sorted(tree)}); give one BatchNorm layer's "
                           f"{where}, e.g. variables['{where}']['BatchNorm_0']")
        return None
    return jnp.asarray(tree[name])


def linen_to_bnjax(params: Mapping[str, Any], batch_stats: Mapping[str, Any], *, module: Any = None,
                   momentum: float | None = None,
                   epsilon: float | None = None) -> tuple[layers.BatchNormParams, layers.BatchNormState,
                                                          layers.BatchNorm]:
    """One linen ``BatchNorm`` layer's variables as bnjax's params, state and norm value.

    Args:
      params: the layer's ``params`` dict (``scale``, ``bias``; either may be absent).
      batch_stats: its ``batch_stats`` dict (``mean``, ``var``).
      module: the ``flax.linen.BatchNorm`` (or bnjax's) it came from, for ``momentum``/``epsilon``/``use_*``.
      momentum, epsilon: override the module's (or Flax's defaults 0.99, 1e-5).

    Returns:
      ``(BatchNormParams, BatchNormState, norm)`` with ``norm = layers.batch_norm(momentum, epsilon,
      use_scale=..., use_offset=...)``; use ``norm.apply(params, state, x, train=..., feature_axes=axis)``.
      The arrays are the same values (no copy of meaning, no dtype change).

    Raises:
      KeyError: no ``mean``/``var`` in ``batch_stats``.
      TypeError: dicts that are not mappings, a module without ``momentum``/``epsilon``.
      ValueError: as ``layers.batch_norm`` (momentum outside [0, 1], epsilon not positive).
    """
    who = "linen_to_bnjax"
    m, e = _options(module, momentum, epsilon, who)
    gamma = _get(params, "scale", "params", who, False)
    beta = _get(params, "bias", "params", who, False)
    mean = _get(batch_stats, "mean", "batch_stats", who, True)
    var = _get(batch_stats, "var", "batch_stats", who, True)
    norm = layers.batch_norm(m, e, use_scale=gamma is not None, use_offset=beta is not None)
    return layers.BatchNormParams(gamma=gamma, beta=beta), layers.BatchNormState(mean=mean, var=var), norm


def bnjax_to_linen(params: layers.BatchNormParams, state: Any) -> tuple[dict, dict]:
    """bnjax's params and state as one linen ``BatchNorm`` layer's ``params`` and ``batch_stats`` dicts.

    Args:
      params: ``BatchNormParams`` (``None`` fields are left out, as Flax's ``use_scale``/``use_bias=False``).
      state: ``BatchNormState`` (a ``BatchRenormState`` also gives ``step``, for ``bnjax.flax.linen.BatchRenorm``).

    Returns:
      ``(params_dict, batch_stats_dict)`` to place under ``variables['params'][name]`` and
      ``variables['batch_stats'][name]``; the momentum and epsilon belong to the module (``norm.momentum``,
      ``norm.eps``).

    Raises:
      TypeError: params or state of another type.
    """
    who = "bnjax_to_linen"
    if not isinstance(params, layers.BatchNormParams):
        raise TypeError(f"{who}: params must be a BatchNormParams, got {type(params).__name__}")
    if not isinstance(state, (layers.BatchNormState, layers.BatchRenormState)):
        raise TypeError(f"{who}: state must be a BatchNormState (or BatchRenormState), got {type(state).__name__}")
    p = {k: v for k, v in (("scale", params.gamma), ("bias", params.beta)) if v is not None}
    return p, dict(state._asdict())


def nnx_to_bnjax(module: Any) -> tuple[layers.BatchNormParams, layers.BatchNormState, layers.BatchNorm]:
    """An ``nnx.BatchNorm`` (or ``bnjax.flax.nnx.BatchNorm``) as bnjax's params, state and norm value.

    Args:
      module: the NNX batch norm; its ``momentum`` and ``epsilon`` are carried.

    Returns:
      ``(BatchNormParams, BatchNormState, norm)`` as ``linen_to_bnjax``.

    Raises:
      TypeError: a module without ``mean``/``var``/``momentum``/``epsilon``.
    """
    who = "nnx_to_bnjax"
    if not all(hasattr(module, n) for n in ("mean", "var", "scale", "bias", "momentum", "epsilon")):
        raise TypeError(f"{who}: module must be an nnx.BatchNorm (or bnjax.flax.nnx.BatchNorm), got "
                        f"{type(module).__name__}")
    params = {n: getattr(module, n)[...] for n in ("scale", "bias") if getattr(module, n) is not None}
    stats = {n: getattr(module, n)[...] for n in ("mean", "var")}
    return linen_to_bnjax(params, stats, module=module)


def bnjax_to_nnx(params: layers.BatchNormParams, state: Any, norm: Any, *, axis: Any = -1,
                 rngs: Any = None) -> nnx.BatchNorm:
    """bnjax's params, state and norm value as a new ``nnx.BatchNorm`` holding them.

    Args:
      params, state: ``BatchNormParams`` and ``BatchNormState``.
      norm: the bnjax batch norm value (``layers.batch_norm(...)``); its ``momentum`` and ``eps`` become the
        module's ``momentum`` and ``epsilon``, ``use_scale``/``use_offset`` its ``use_scale``/``use_bias``.
      axis: the module's feature axis.
      rngs: ``nnx.Rngs`` for the constructor (its initial values are replaced), ``nnx.Rngs(0)`` by default.

    Returns:
      an ``nnx.BatchNorm`` whose ``scale``, ``bias``, ``mean``, ``var`` are the given arrays.

    Raises:
      TypeError: a norm value that is not ``layers.BatchNorm``, params or state of another type.
      ValueError: statistics over several feature axes (``nnx.BatchNorm`` has one).
    """
    who = "bnjax_to_nnx"
    if not isinstance(norm, layers.BatchNorm):
        raise TypeError(f"{who}: norm must be a layers.BatchNorm (layers.batch_norm(...)), got {type(norm).__name__}")
    p, stats = bnjax_to_linen(params, state)
    shape = tuple(stats["mean"].shape)
    if len(shape) != 1:
        raise ValueError(f"{who}: nnx.BatchNorm has one feature axis, but the running mean has shape {shape}")
    module = nnx.BatchNorm(shape[0], axis=axis, momentum=norm.momentum,
                           epsilon=norm.eps, use_scale="scale" in p, use_bias="bias" in p,
                           param_dtype=(p.get("scale", p.get("bias", stats["mean"]))).dtype,
                           rngs=rngs if rngs is not None else nnx.Rngs(0))
    for name, value in {**p, "mean": stats["mean"], "var": stats["var"]}.items():
        getattr(module, name)[...] = value
    return module

