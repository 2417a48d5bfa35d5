"""The grid engine: named arms x a grid of numeric hyper-parameters x seeds, trained together.

A grid (``GridConfig``; its defaults are the book's ch. 6.3 weight-scale sweep) is

* **arms**: a ``dict[str, Arm]`` of static variants of the network (the norm: none, the book's batch norm or
  any norm value of ``bnjax.layers``; activation, dropout, initialisation, batch size, a learning-rate factor);
  each arm is its own traced program, all arms run in the same compiled call;
* **axes**: a ``dict[str, values]`` of numeric hyper-parameters that are *vmapped* (the names and ranges of
  ``bnjax.options.AXES``: the weight scale, learning rate, weight decay and batch-norm momentum); the grid is
  their product. Each reaches the one consumer its ``options.Axis`` names (the initial weights, the optimizer,
  the train step, the norms); a hyper-parameter without an axis stays a Python constant of the traced program;
* **seeds**: ``num_seeds`` seeds from ``seed`` on; seed ``i`` of a run starts exactly as a one-seed run at
  ``seed + i`` (the same keys, initial models, mini-batches and dropout masks), and its trained numbers agree
  with that run to rounding only (the program compiled for more models may order its arithmetic differently).

Every model of a seed sees the same mini-batches (paired comparisons, and one wide first-layer matmul for all
models of a seed); an arm with a batch size of its own (``Arm.batch_size``) draws its own batches, shared with
the arms of that size, and runs its own number of updates per record, so all arms train the same epochs.
Models that differ only in learning rate, weight decay or batch-norm momentum also share their initial weights;
each arm and each weight scale draws its own (with the book's two arms and its 16 scales this reproduces the
keys the book's sweep always used; ``seed_keys`` documents the scheme).

Layout: the models of an arm are stacked ``[seeds, grid points]`` and sharded over every device (of every
process) on a 2-D mesh ``('seeds', 'grid')``, each axis padded up to a multiple of its mesh size; padded models
repeat a real one and are never returned. A grid larger than ``max_models_per_chunk`` (default: what fits in
``memory_budget_bytes``) runs as consecutive chunks of the same shape, one compiled program for all of them.
Inside a chunk, one jitted call per record runs the updates (``lax.fori_loop``) and then scores every model
in evaluation mode, in batches of ``eval_batch_size`` images (``lax.scan``), so memory does not grow with the
evaluation set.

Modules: ``config`` (what a grid is and its schedule), ``plan`` (mesh, chunks, memory, FLOPs), ``programs``
(the compiled programs and their keys), ``driver`` (``run_grid``, ``init_models``).
"""

from bnjax.grid.config import (BOOK_ARMS, Arm, GridConfig, arm_batch_size, book_weight_scales, grid_points,
                               num_updates, record_steps, updates_per_record)
from bnjax.grid.driver import METRICS, Chunk, GridResult, init_models, run_grid
from bnjax.grid.plan import (Layout, bytes_per_model, default_memory_budget, device_memory_limit, grid_flops,
                             plan_layout)
from bnjax.grid.programs import init_streams, seed_keys

__all__ = [
    "Arm",
    "BOOK_ARMS",
    "Chunk",
    "GridConfig",
    "GridResult",
    "Layout",
    "METRICS",
    "plan_layout",
    "run_grid",
    "grid_points",
    "init_streams",
    "seed_keys",
    "updates_per_record",
    "num_updates",
    "record_steps",
    "arm_batch_size",
    "grid_flops",
    "bytes_per_model",
    "device_memory_limit",
    "default_memory_budget",
    "init_models",
    "book_weight_scales",
]
