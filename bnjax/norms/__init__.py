"""Normalisation layers: the functional batch-norm core and norms as values.

* ``core``: ``batch_norm_init`` / ``batch_norm_apply`` / ``batch_norm_stats``, ``BatchNormParams``,
  ``BatchNormState``, ``CONVENTIONS`` (the defaults: docs/conventions.md), ``batch_statistics_as_state``.
* ``base``: ``Norm``, what a norm value has (``has_running_stats``, ``eps``, ``init``, ``apply``, ``describe``).
* ``batch_norm``, ``renorm``, ``ghost``: ``batch_norm()`` / ``book_batch_norm()``, ``batch_renorm()`` /
  ``renorm_schedule``, ``ghost_batch_norm()``.
* ``group``: ``group_norm()`` / ``layer_norm()`` (Wu & He 2018; no running statistics), ``GroupNormState``.
* ``precise``: ``recalibrate`` (precise statistics of any network) and ``recalibrate_norm`` (one layer).
* ``fold``: ``fold_batch_norm`` / ``fold_conv_batch_norm`` (inference folding), ``identity_running_var``.
* ``torch``: ``torch_batch_norm_to_bnjax``.

``bnjax.layers`` re-exports every public name here (its ``recalibrate`` is ``recalibrate_norm``).
"""

from bnjax.norms.base import Norm
from bnjax.norms.batch_norm import BatchNorm, batch_norm, book_batch_norm
from bnjax.norms.core import (CONVENTIONS, BatchNormParams, BatchNormState, BatchRenormState, batch_norm_apply,
                              batch_norm_init, batch_norm_stats, batch_statistics_as_state)
from bnjax.norms.fold import fold_batch_norm, fold_conv_batch_norm, identity_running_var
from bnjax.norms.ghost import GhostBatchNorm, ghost_batch_norm
from bnjax.norms.group import GroupNorm, GroupNormState, LayerNorm, group_norm, layer_norm
from bnjax.norms.precise import recalibrate, recalibrate_norm
from bnjax.norms.renorm import BatchRenorm, batch_renorm, renorm_schedule
from bnjax.norms.torch import torch_batch_norm_to_bnjax

__all__ = [
    "CONVENTIONS",
    "BatchNormParams",
    "BatchNormState",
    "BatchRenormState",
    "batch_norm_init",
    "batch_norm_apply",
    "batch_norm_stats",
    "batch_statistics_as_state",
    "Norm",
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "GroupNormState",
    "LayerNorm",
    "batch_norm",
    "book_batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "group_norm",
    "layer_norm",
    "renorm_schedule",
    "recalibrate",
    "recalibrate_norm",
    "fold_batch_norm",
    "fold_conv_batch_norm",
    "identity_running_var",
    "torch_batch_norm_to_bnjax",
]
