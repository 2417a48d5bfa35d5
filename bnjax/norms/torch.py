"""Interop with PyTorch's batch norm (torch itself is not imported)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bnjax.norms.core import BatchNormParams, BatchNormState


def torch_batch_norm_to_bnjax(torch_state: dict) -> tuple[BatchNormParams, BatchNormState, dict]:
    """Convert a PyTorch ``BatchNorm1d/2d`` ``state_dict()`` into bnjax params, state and apply kwargs.

    PyTorch stores ``weight``, ``bias``, ``running_mean`` and the *unbiased* ``running_var``; its
    ``momentum=0.1`` weights the new batch, i.e. bnjax ``momentum=0.9``; its eps default is 1e-5.

    Args:
      torch_state: the ``state_dict()``; values may be torch tensors or NumPy arrays.

    Returns:
      ``(params, state, kwargs)`` where ``kwargs`` holds the ``batch_norm_apply`` arguments that reproduce
      PyTorch's behaviour (``momentum``, ``eps``, ``unbiased_running_var``; and ``feature_axes=-1``, so move
      NCHW tensors to NHWC first).

    Raises:
      KeyError: no running statistics in the state dict (``track_running_stats=False``).
    """

    def arr(name):
        v = torch_state.get(name)
        if v is None:
            return None
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        return jnp.asarray(v, jnp.float32)

    missing = [k for k in ("running_mean", "running_var") if k not in torch_state]
    if missing:
        raise KeyError(f"torch_batch_norm_to_bnjax: state_dict lacks {missing} (track_running_stats=False?)")
    params = BatchNormParams(gamma=arr("weight"), beta=arr("bias"))
    state = BatchNormState(mean=arr("running_mean"), var=arr("running_var"))
    kwargs = {"momentum": 0.9, "eps": 1e-5, "unbiased_running_var": True, "feature_axes": -1}
    return params, state, kwargs
