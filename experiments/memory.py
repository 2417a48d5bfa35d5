"""The memory pre-flight of a run: will one chunk of models, and the results, fit? Checked before compiling, so
a run too large for the machine ends in one line naming the options to change instead of an out-of-memory crash.
"""

from __future__ import annotations

import os

__all__ = ["available_memory", "memory_problem", "available_host_memory"]


def available_memory() -> tuple[int, str]:
    """The memory one chunk of models may use.

    Returns:
      ``(bytes, where)``: the first device's memory limit on an accelerator, else the host's available memory.
    """
    import jax

    from bnjax import grid

    limit = grid.device_memory_limit()
    if limit:
        return limit, f"{jax.devices()[0].device_kind} memory"
    return available_host_memory(), "available host memory"


def memory_problem(config, input_size: int, num_train: int, num_heldout: int) -> str | None:
    """A pre-flight estimate: the working memory of one chunk of models (parameters, optimizer state,
    activations, the data) and the host memory of the results, against what is available.

    Args:
      config: the ``grid.GridConfig``.
      input_size: features per image.
      num_train, num_heldout: images on the devices.

    Returns:
      A one-line explanation with the options to change, or ``None`` when it fits.
    """
    import jax
    import numpy as np

    from bnjax import grid

    layout = grid.plan_layout(config, jax.device_count(), input_size)
    per_device = -(-layout.models_per_chunk(len(config.arms)) // (layout.mesh_shape[0] * layout.mesh_shape[1]))
    itemsize = np.dtype(jax.numpy.dtype(config.dtype)).itemsize
    data_bytes = (num_train + num_heldout) * (input_size * itemsize + 8)
    chunk = per_device * grid.bytes_per_model(config, input_size) + data_bytes
    metrics = 4 if num_heldout else 2
    host = config.num_models * config.num_records * metrics * 8
    limit, where = available_memory()
    if jax.devices()[0].platform == "cpu":  # the devices share the host's memory
        chunk *= layout.mesh_shape[0] * layout.mesh_shape[1]
        chunk += host
    elif host > available_host_memory():
        return (f"the results alone need about {host / 2**30:.1f} GiB of host memory: use fewer seeds, grid "
                "points or records (--num-seeds, scales, --epochs)")
    if chunk > limit:
        return (f"this run needs about {chunk / 2**30:.1f} GiB but {where} is {limit / 2**30:.1f} GiB: train fewer "
                "models at once (--max-models-per-chunk), or use a smaller --batch-size, fewer seeds (--num-seeds), "
                "grid points or records (--epochs)")
    return None


def available_host_memory() -> int:
    """The host's available memory.

    Returns:
      Bytes: MemAvailable from /proc/meminfo (Linux), else the physical memory.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
