"""Where the models go: a ``(seeds, grid)`` device mesh and chunks sized to a memory budget; FLOP counts."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import networks, train
from bnjax.grid.config import GridConfig, arm_batch_size, num_updates

__all__ = ["Layout", "plan_layout", "bytes_per_model", "device_memory_limit", "default_memory_budget", "grid_flops"]


class Layout(NamedTuple):
    """How the models are spread: a ``(seeds, grid)`` device mesh and chunks of ``seed_block x grid_block``.

    ``num_chunks = ceil(num_seeds / seed_block) * ceil(num_grid_points / grid_block)``; both blocks are
    multiples of the mesh's sizes, so every device holds models and the padding is at most one block.
    """

    mesh_shape: tuple[int, int]
    seed_block: int
    grid_block: int
    seed_chunks: int
    grid_chunks: int

    @property
    def num_chunks(self) -> int:
        """Chunks run one after the other."""
        return self.seed_chunks * self.grid_chunks

    def models_per_chunk(self, num_arms: int) -> int:
        """Models trained at once, padding included.

        Args:
          num_arms: the grid's number of arms.

        Returns:
          ``num_arms * seed_block * grid_block``.
        """
        return num_arms * self.seed_block * self.grid_block


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.lru_cache(maxsize=64)
def _optimizer_state_size(net: Any, optimizer: str, learning_rate: float, dtype: str) -> int:
    """Elements of one model's optimizer state, read from the optimizer itself (shapes only, nothing runs)."""
    params = jax.eval_shape(lambda: networks.module_for(net).init(net, jax.random.key(0), dtype=jnp.dtype(dtype))[0])
    state = jax.eval_shape(train.make_optimizer(optimizer, learning_rate).init, params)
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(state))


@functools.lru_cache(maxsize=64)
def _num_params(net: Any, dtype: str) -> int:
    """Elements of one model's parameters and norm state (shapes only, nothing runs)."""
    tree = jax.eval_shape(lambda: networks.module_for(net).init(net, jax.random.key(0), dtype=jnp.dtype(dtype)))
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def bytes_per_model(config: GridConfig, input_size: int) -> int:
    """A generous estimate of one model's working memory in a chunk, used to size chunks.

    Args:
      config: the grid.
      input_size: features per image.

    Returns:
      bytes for parameters (with four per-unit values for a norm), gradients, updates, the donated copy, the
      optimizer's state (its largest over the arms' networks) and training and evaluation activations.
    """
    opt_state = max(_optimizer_state_size(config.network(arm, input_size), config.optimizer,
                                          float(config.learning_rate), config.dtype)
                    for arm in config.arms.values())
    itemsize = np.dtype(jnp.dtype(config.dtype)).itemsize
    batch = max([config.batch_size] + [a.batch_size for a in config.arms.values() if a.batch_size is not None])
    if config.model == "mlp":
        sizes = [input_size, *config.hidden_sizes, config.num_classes]
        num_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) + 4 * sum(config.hidden_sizes)
        width = sum(sizes[1:])
        activations = 6 * batch * width + 3 * config.eval_batch_size * width
    else:
        nets = [config.network(arm, input_size) for arm in config.arms.values()]
        num_params = max(_num_params(net, config.dtype) for net in nets)
        # Evaluation keeps about half of what a training step does per row (no gradients).
        activations = max(networks.activation_floats(net, batch)
                          + networks.activation_floats(net, config.eval_batch_size) // 2 for net in nets)
    params = num_params * 4 + opt_state  # params, grads, updates, donated copy, optimizer state
    return int(itemsize * (params + activations))


def device_memory_limit() -> int | None:
    """The first device's memory.

    Returns:
      bytes on an accelerator; ``None`` on CPU or without memory statistics.
    """
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:  # some backends have no memory statistics
        limit = None
    return int(limit) if limit else None


def default_memory_budget() -> int:
    """The working memory a chunk may use when ``GridConfig.memory_budget_bytes`` is ``None``.

    Returns:
      1 GiB on CPU (host memory is shared with everything else); a quarter of an accelerator's memory.
    """
    limit = device_memory_limit()
    return limit // 4 if limit else 1 << 30


def plan_layout(config: GridConfig, num_devices: int, input_size: int = 784) -> Layout:
    """Choose the device mesh and the chunk blocks that waste the fewest padded models.

    Every factorisation ``d_seeds x d_grid = num_devices`` is tried, and for each a few seed-chunk counts;
    blocks are balanced (the models are split as evenly as the mesh allows), so padding stays below one mesh
    row or column per chunk. Ties go to fewer chunks, then to more grid points per device (the grid axis shares
    batches, the seed axis does not).

    Args:
      config: the grid (``max_models_per_chunk``, else ``memory_budget_bytes``, bounds a chunk).
      num_devices: devices to spread the models over.
      input_size: features per image.

    Returns:
      the ``Layout``.
    """
    num_arms, seeds, grid = len(config.arms), config.num_seeds, config.num_grid_points
    limit = config.max_models_per_chunk
    if limit is None:
        budget = config.memory_budget_bytes or default_memory_budget()
        limit = max(1, budget // bytes_per_model(config, input_size))
    cap = max(limit // num_arms, 1)  # (seed, grid point) pairs per chunk
    best = None
    for d_seed in range(1, num_devices + 1):
        if num_devices % d_seed:
            continue
        d_grid = num_devices // d_seed
        # The largest seed block that still fits next to the smallest grid block (a device needs a model).
        max_sb = max(d_seed, (cap // d_grid) // d_seed * d_seed)
        c_min = -(-seeds // max_sb)
        for seed_chunks in range(c_min, min(c_min + 64, -(-seeds // d_seed)) + 1):
            sb = _round_up(-(-seeds // seed_chunks), d_seed)
            if sb > max_sb:
                continue
            gb_max = max(d_grid, (cap // sb) // d_grid * d_grid)
            grid_chunks = -(-grid // gb_max)
            gb = _round_up(-(-grid // grid_chunks), d_grid)
            layout = Layout((d_seed, d_grid), sb, gb, -(-seeds // sb), -(-grid // gb))
            # Ties: fewer chunks, then wide grid blocks (the models of a seed share a batch, so a wide grid
            # block per device is one wide matmul; a seed block is a batch of narrow ones).
            cost = (layout.num_chunks * sb * gb, layout.num_chunks, -(gb // d_grid), -d_grid)
            if best is None or cost < best[0]:
                best = (cost, layout)
    return best[1]


def grid_flops(config: GridConfig, num_train: int, input_size: int, num_heldout: int = 0) -> dict:
    """Matmul FLOPs of a grid over all its models (elementwise work ignored).

    Args:
      config: the grid.
      num_train: training images (each record scores all of them).
      input_size: features per image.
      num_heldout: held-out images scored at each record.

    Returns:
      ``{'train': forward + backward of every update, 'eval': every record's scoring, 'total': the sum}``.
    """
    per_arm = config.num_models // len(config.arms)
    nets = [(config.network(arm, input_size), arm) for arm in config.arms.values()]
    train_flops = sum(per_arm * num_updates(config, num_train, arm_batch_size(config, arm))
                      * networks.num_flops(net, arm_batch_size(config, arm), backward=True)
                      for net, arm in nets)
    evaluation = sum(per_arm * config.num_records * networks.num_flops(net, num_train + num_heldout)
                     for net, _ in nets)
    return {"train": train_flops, "eval": evaluation, "total": train_flops + evaluation}
