"""bnjax's norms as Equinox layers (optional extra ``bnjax[equinox]``).

``BatchNorm``, ``BatchRenorm`` and ``GhostBatchNorm`` are ``eqx.nn.StatefulLayer``s called as
``eqx.nn.BatchNorm`` is: one example per call, channels first (``[C]`` or ``[C, H, W]``), inside
``jax.vmap(..., axis_name=...)``, ``(x, state, *, key=None, inference=None) -> (y, state)``, the running
statistics in an ``eqx.nn.State``. ``GroupNorm`` and ``LayerNorm`` keep no state and are plain layers, as
``eqx.nn.GroupNorm``/``eqx.nn.LayerNorm`` (call them with or without a state). Each layer is a thin wrapper over
a bnjax norm value (``bnjax.norms``): every number comes from that value's ``apply``.

``recalibrate`` (precise statistics) and ``fold`` (each norm folded into the ``eqx.nn.Linear``/``eqx.nn.Conv2d``
before it) work on whole Equinox models (``bnjax/equinox/tools.py``). The batch norms are in
``bnjax/equinox/layers.py``, Group and Layer Norm in ``bnjax/equinox/group.py``.

Conventions: ``momentum=0.9`` by default (bnjax's, not Equinox's 0.99, see ``BatchNorm``), ``eps=1e-5`` (Equinox's),
``new = momentum * old + (1 - momentum) * batch``, a biased running variance starting at mean 0 and variance 1,
no zero-debiasing, statistics in float32 (two-pass).
"""

try:
    import equinox  # the optional dependency; bnjax itself never imports it
except ImportError as err:  # exercised in a subprocess by tests/test_equinox_tools.py
    raise ImportError('bnjax.equinox needs Equinox, an optional extra: pip install "bnjax[equinox]"') from err
del equinox  # only checked here; the modules below import it themselves

from bnjax.equinox.group import GroupNorm, LayerNorm
from bnjax.equinox.layers import BatchNorm, BatchRenorm, GhostBatchNorm
from bnjax.equinox.tools import fold, recalibrate

__all__ = ["BatchNorm", "BatchRenorm", "GhostBatchNorm", "GroupNorm", "LayerNorm", "recalibrate", "fold"]
