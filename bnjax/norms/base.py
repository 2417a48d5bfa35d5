"""``Norm``: what a normalisation layer as a value has, and the checks every norm value's ``apply`` begins with."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp

from bnjax.norms._checks import _check_flag, _check_hyper, _check_per_feature, _static_float
from bnjax.norms.core import CONVENTIONS, _active, _note_update, _prepare

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Norm:
    """A normalisation layer as a value, like optax's ``GradientTransformation``: two pure functions.

    What every norm has:

    * ``has_running_stats`` (class attribute, bool): True when its state holds running statistics (a
      ``BatchNormState``/``BatchRenormState``) and evaluation normalises with them as batch norm does
      (``gamma * (x - mean) / sqrt(var + eps) + beta``), which ``recalibrate`` and ``fold_batch_norm`` rely on.
      False by default: a norm without running statistics (``group_norm``/``layer_norm``, whose state is an empty
      ``GroupNormState``) sets nothing; folding, ``recalibrate_norm`` and ``model.recalibrate`` refuse it, and
      ``recalibrate`` refuses a state whose norm nodes are all ``GroupNormState``.
    * ``eps``: added to the variance (a field of the concrete norms; ``CONVENTIONS["eps"]`` by default).
    * ``init(num_features, dtype=float32) -> (params, state)``.
    * ``apply(params, state, x, *, train, momentum=None, mask=None, axis_name=None) -> (y, new_state)``:
      ``train`` keyword-only and required; ``momentum=None`` means the value's own (a traced momentum is
      allowed); a norm may accept more keywords (``feature_axes``, ...).
    * ``describe()``: the norm as a JSON-friendly dict.

    A norm value is frozen, hashable and compared by value, so it can sit in a static configuration
    (``model.MLPConfig``, ``grid.Arm``). Every subclass is registered as a static pytree (no leaves, the value
    itself as auxiliary data), so norm values pass through ``jax.jit`` as ordinary arguments; what varies per
    call (a traced momentum, ``mask``, ``axis_name``) goes in the call.
    """

    has_running_stats: ClassVar[bool] = False
    # Not annotated on purpose: an annotated base field would come first in every subclass's positional order
    # (``BatchNorm(momentum, eps, ...)``); the concrete norms declare ``eps`` as a field of their own.
    eps = CONVENTIONS["eps"]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_static(cls)

    def init(self, num_features: int | Sequence[int], dtype: Any = jnp.float32) -> tuple[Any, Any]:
        """Parameters and state for ``num_features`` features.

        Args:
          num_features: feature size ``C`` or a shape tuple.
          dtype: parameter dtype.

        Returns:
          ``(params, state)``.

        Raises:
          NotImplementedError: a subclass that does not define it.
        """
        raise NotImplementedError(f"{type(self).__name__} must define init(num_features, dtype) -> (params, state)")

    def apply(self, params: Any, state: Any, x: Array, *, train: bool, momentum: Any = None, mask: Any = None,
              axis_name: Any = None) -> tuple[Array, Any]:
        """Normalise ``x``.

        Args:
          params, state: from ``init`` (or a previous ``apply``).
          x: the input, features on the last axis unless the norm says otherwise.
          train: use batch statistics and update the running ones (True) or evaluate (False); required.
          momentum: ``None`` for the value's own, or a (possibly traced) override.
          mask: valid-row mask over the leading axes, or ``None``.
          axis_name: a bound axis to reduce statistics across, or ``None``.

        Returns:
          ``(y, new_state)``.

        Raises:
          NotImplementedError: a subclass that does not define it.
        """
        raise NotImplementedError(f"{type(self).__name__} must define apply(params, state, x, *, train, momentum, "
                                  "mask, axis_name) -> (y, new_state)")

    def resolve_momentum(self, momentum: Any = None) -> Any:
        """The momentum of a call: ``momentum``, else the value's own; 0 inside ``batch_statistics_as_state``.

        The norms here get momentum 0 inside that switch through their running update; a norm of one's own with
        running statistics calls this so that ``recalibrate`` reaches it too.

        Args:
          momentum: the per-call override or ``None``.

        Returns:
          the momentum to use.
        """
        if _active() is not None:
            _note_update()
            return 0.0
        return getattr(self, "momentum", None) if momentum is None else momentum

    def describe(self) -> dict:
        """The norm as a JSON-friendly dict.

        Returns:
          ``{"norm": class name, **fields}``.
        """
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {"norm": type(self).__name__, **fields}


jax.tree_util.register_static(Norm)


def _common_fields(self: Norm, who: str) -> None:
    """Checks and float conversion of the fields every norm here has (momentum, eps, init_mean, init_var,
    flags)."""
    for name in ("momentum", "eps", "init_mean", "init_var"):
        object.__setattr__(self, name, _static_float(getattr(self, name), name, who))
    _check_hyper(self.momentum, self.eps, who)
    if not (math.isfinite(self.init_mean) and math.isfinite(self.init_var) and self.init_var >= 0):
        raise ValueError(f"{who}: init_mean must be finite and init_var finite and >= 0, got "
                         f"{self.init_mean!r}, {self.init_var!r}")
    for name in ("use_scale", "use_offset"):
        object.__setattr__(self, name, _check_flag(getattr(self, name), name, who))


def _start_apply(norm: Any, params: Any, state: Any, x: Any, train: Any, update_stats: Any, momentum: Any,
                 feature_axes: Any, mask: Any, who: str, axis_name: Any = None):
    """The checks a norm value's ``apply`` begins with: the flags (``update_stats`` defaults to ``train``), the
    momentum (the value's unless given), the input and mask. Returns ``(train, update_stats, momentum, x,
    feature axes, mask)``."""
    train = _check_flag(train, "train", who)
    update_stats = _check_flag(update_stats, "update_stats", who, allow_none=True)
    update_stats = train if update_stats is None else update_stats
    momentum = norm.momentum if momentum is None else momentum
    _check_hyper(momentum, norm.eps, who)
    x, faxes, mask = _prepare(params, state, x, feature_axes, mask, who, axis_name)
    _check_per_feature(momentum, "momentum", tuple(x.shape[a] for a in faxes), who)
    return train, update_stats, momentum, x, faxes, mask
