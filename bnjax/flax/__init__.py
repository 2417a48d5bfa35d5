"""bnjax's norms as Flax layers (optional extra: ``pip install "bnjax[flax]"``).

* ``bnjax.flax.linen``: ``BatchNorm``, ``BatchRenorm``, ``GhostBatchNorm``, ``GroupNorm``, ``LayerNorm`` as
  ``flax.linen`` modules. Constructor and call follow ``flax.linen.BatchNorm``; parameters ``scale``/``bias`` and
  the ``batch_stats`` collection (``mean``, ``var``, and ``step`` for Batch Renorm) have Flax's names and shapes,
  so a training loop with ``mutable=['batch_stats']`` works unchanged and a Flax ``BatchNorm`` checkpoint loads.
* ``bnjax.flax.nnx``: the same five as ``flax.nnx`` modules (``nnx.Param``, ``nnx.BatchStat``,
  ``model.train()``/``model.eval()``).
* ``bnjax.flax.convert``: a Flax ``BatchNorm``'s variables (linen) or an ``nnx.BatchNorm`` to bnjax's
  ``BatchNormParams``/``BatchNormState`` and norm value, and back.
* ``bnjax.flax.tools``: precise statistics and folding for whole Flax models.

Every module is a thin wrapper: it builds the bnjax norm value (``bnjax.layers.batch_norm(...)``, ...) and calls
its ``apply``; statistics, normalisation and the running update are bnjax's (two-pass variance in float32,
sums and counts reduced across ``axis_name``, so unequal shards and masks give the statistics of the whole
batch). Defaults: ``momentum=0.9`` (bnjax's; Flax's is 0.99, which lags the weights on short runs), ``epsilon``
Flax's own (1e-5 for the batch norms, 1e-6 for Group and Layer Norm).

``import bnjax`` never imports Flax; this package does.
"""

import importlib as _importlib

try:
    for _name in ("flax", "flax.linen", "flax.nnx"):
        _importlib.import_module(_name)
except ImportError as _err:  # one clear line instead of a traceback from deep inside the adapters
    raise ImportError('bnjax.flax needs Flax (with flax.nnx): pip install "bnjax[flax]"') from _err

from bnjax.flax import convert, linen, nnx, tools  # noqa: E402

__all__ = ["linen", "nnx", "convert", "tools"]
