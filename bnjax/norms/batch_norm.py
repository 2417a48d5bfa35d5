"""Batch norm as a value: ``BatchNorm``, ``batch_norm()`` and the book's ``book_batch_norm()``."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from bnjax.norms._checks import _check_flag
from bnjax.norms.base import Norm, _common_fields
from bnjax.norms.core import CONVENTIONS, batch_norm_apply, batch_norm_init


@dataclasses.dataclass(frozen=True)
class BatchNorm(Norm):
    """``batch_norm_init`` / ``batch_norm_apply`` as a value; build it with ``batch_norm(...)``."""

    has_running_stats: ClassVar[bool] = True

    momentum: float = CONVENTIONS["momentum"]
    eps: float = CONVENTIONS["eps"]
    init_mean: float = CONVENTIONS["init_mean"]
    init_var: float = CONVENTIONS["init_var"]
    unbiased_running_var: bool = False
    use_scale: bool = True
    use_offset: bool = True

    def __post_init__(self):
        _common_fields(self, "batch_norm")
        object.__setattr__(self, "unbiased_running_var",
                           _check_flag(self.unbiased_running_var, "unbiased_running_var", "batch_norm"))

    def init(self, num_features, dtype=jnp.float32):
        """``batch_norm_init`` with this value's settings.

        Args:
          num_features: feature size ``C`` or a shape tuple.
          dtype: parameter dtype (running statistics are float32 or wider).

        Returns:
          ``(BatchNormParams, BatchNormState)``.

        Raises:
          TypeError, ValueError: as ``batch_norm_init``.
        """
        return batch_norm_init(num_features, use_scale=self.use_scale, use_offset=self.use_offset,
                               init_mean=self.init_mean, init_var=self.init_var, dtype=dtype)

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None, **call_kwargs):
        """``batch_norm_apply`` with this value's settings.

        Args:
          params, state: from ``init``.
          x: as ``batch_norm_apply``.
          train: required, a Python bool.
          momentum: ``None`` for the value's own, or an override (e.g. a traced schedule).
          mask, axis_name: as ``batch_norm_apply``.
          call_kwargs: ``batch_norm_apply``'s other keywords (``feature_axes``, ``use_batch_stats``,
            ``update_stats``).

        Returns:
          ``(y, new_state)``.

        Raises:
          TypeError: ``eps`` or ``unbiased_running_var`` given (they belong to the value), or as
            ``batch_norm_apply``.
          ValueError: as ``batch_norm_apply``.
        """
        fixed = sorted(set(call_kwargs) & {"eps", "unbiased_running_var"})
        if fixed:
            raise TypeError(f"batch_norm.apply: {', '.join(fixed)} {'belongs' if len(fixed) == 1 else 'belong'} to "
                            "the norm value; build another with "
                            f"layers.batch_norm({fixed[0]}=...)")
        momentum = self.momentum if momentum is None else momentum
        return batch_norm_apply(params, state, x, train=train, momentum=momentum, mask=mask, axis_name=axis_name,
                                eps=self.eps, unbiased_running_var=self.unbiased_running_var, **call_kwargs)


def batch_norm(
    momentum: float = CONVENTIONS["momentum"],
    eps: float = CONVENTIONS["eps"],
    *,
    init_mean: float = CONVENTIONS["init_mean"],
    init_var: float = CONVENTIONS["init_var"],
    unbiased_running_var: bool = False,
    use_scale: bool = True,
    use_offset: bool = True,
) -> BatchNorm:
    """Batch norm as a value: ``norm.init(C)``, ``norm.apply(params, state, x, train=...)``.

    The same numbers as ``batch_norm_init`` / ``batch_norm_apply`` with these settings (see them for the
    conventions); the hyper-parameters are checked here, once.

    Args:
      momentum: ``new = momentum * old + (1 - momentum) * batch``, in [0, 1].
      eps: added to the variance, > 0.
      init_mean, init_var: initial running statistics (0 and 1: Flax, PyTorch; ``book_batch_norm`` for 0, 0).
      unbiased_running_var: store the ``n / (n - 1)``-corrected variance (PyTorch's).
      use_scale, use_offset: learn gamma / beta.

    Returns:
      a ``BatchNorm``.

    Raises:
      TypeError: non-real hyper-parameters or non-bool flags.
      ValueError: ``momentum`` outside [0, 1], ``eps`` not positive and finite, a non-finite or negative start.
    """
    return BatchNorm(momentum, eps, init_mean, init_var, unbiased_running_var, use_scale, use_offset)


def book_batch_norm() -> BatchNorm:
    """The book's batch norm (ch. 6.3): ``batch_norm(momentum=0.9, eps=1e-6, init_var=0.0)``.

    Its running variance starts at 0 as the book's ``BatchNorm`` does; ``norm=True`` in model configurations is
    shorthand for it.

    Returns:
      a ``BatchNorm``.
    """
    return batch_norm(momentum=0.9, eps=1e-6, init_var=0.0)
