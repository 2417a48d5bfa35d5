"""Values as JSON can hold them: a leaf module (no import of the harness), so both the results record and the chunk
files' configuration hash use one conversion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """``value`` as JSON can hold it.

    Args:
      value: dicts, lists, tuples, paths, NumPy arrays and scalars, norm values (their ``describe()``), ...

    Returns:
      The same with NumPy as lists and Python numbers, paths as strings, dict keys as strings, and NaN and
      infinities (a diverged model's loss) as ``None`` (null, which strict JSON readers accept).
    """
    import numpy as np

    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    describe = getattr(value, "describe", None)  # a norm value (bnjax.layers.Norm): its kind and fields
    if callable(describe):
        return jsonable(describe())
    return value
