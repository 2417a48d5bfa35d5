"""Running a grid: data checks, device placement, the chunk loop, and the results assembled on the host."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bnjax import options
from bnjax.grid.config import GridConfig, arm_batch_size, grid_points, record_steps, scale_index
from bnjax.grid.plan import Layout, plan_layout
from bnjax.grid.programs import ChunkInputs, hyper_dtypes, make_programs

Array = jax.Array

__all__ = ["METRICS", "Chunk", "GridResult", "run_grid", "init_models"]

METRICS = ("train_accuracy", "train_loss", "heldout_accuracy", "heldout_loss")


class GridResult(NamedTuple):
    """Outputs of ``run_grid`` as host NumPy arrays; no padded model appears in any of them.

    Attributes:
      config: the ``GridConfig`` run.
      axes: name -> values of each axis, in ``config.axes`` order.
      metrics: ``'train_accuracy'``, ``'train_loss'`` (and ``'heldout_accuracy'``, ``'heldout_loss'`` with a
        held-out set) -> arm name -> ``[seeds, *grid_shape, records]``; evaluation mode (running statistics),
        mean cross-entropy without the weight-decay term; NaN for a diverged model's loss.
      diverged: arm name -> ``[seeds, *grid_shape]``: a parameter became non-finite.
      record_steps: ``[records]`` updates done at each record (by arms of the grid's batch size).
      timing: ``compile_s`` (first chunk), ``run_s`` (all chunks, excluding the compile).
      layout: the ``Layout`` used, plus ``devices_used`` (devices whose shards of the models' arrays hold
        models no other device holds: a replicated array counts once), ``processes`` and ``padded_models``.
      final: arm name -> ``TrainState`` with leaves ``[seeds, *grid_shape, ...]``, or ``None`` unless
        ``config.keep_final``.
      arm_record_steps: arm name -> ``[records]`` updates that arm had done at each record (differs from
        ``record_steps`` for arms with a ``batch_size`` of their own).
    """

    config: GridConfig
    axes: dict
    metrics: dict
    diverged: dict
    record_steps: np.ndarray
    timing: dict
    layout: dict
    final: dict | None
    arm_record_steps: dict | None = None


class Chunk(NamedTuple):
    """One finished chunk of a grid: what ``run_grid`` hands to ``on_chunk``, and takes back in ``done_chunks``.

    A chunk's inputs (seeds, grid points, keys) depend only on its index, so a run that is given some chunks
    already finished computes the others bit for bit as a run that computes them all.

    Attributes:
      index: ``(seed chunk, grid chunk)``, in ``0..seed_chunks-1 x 0..grid_chunks-1`` of the run's ``Layout``.
      seeds: ``(first, count)``: the seed positions it holds, ``range(first, first + count)`` of
        ``range(num_seeds)`` (seed ``config.seed + first`` on).
      grid_points: ``(first, count)``: the flat grid points it holds (row-major over ``config.grid_shape``).
      metrics: metric name -> arm name -> ``[count seeds, count grid points, records]`` (host NumPy).
      diverged: arm name -> ``[count seeds, count grid points]`` bool.
      final: arm name -> ``TrainState`` with leaves ``[count seeds, count grid points, ...]`` with
        ``config.keep_final``, else ``None``.
    """

    index: tuple[int, int]
    seeds: tuple[int, int]
    grid_points: tuple[int, int]
    metrics: dict
    diverged: dict
    final: dict | None = None


def _hyper(config: GridConfig, g: np.ndarray) -> dict[str, np.ndarray]:
    """Each hyper-parameter at the grid points ``g``, in the dtype the programs read it in."""
    points, dtypes = grid_points(config), hyper_dtypes(config)
    return {name: points[name][g].astype(dtypes[name]) for name in options.AXES}


def run_grid(
    config: GridConfig,
    x_train: Any,
    t_train: Any,
    x_heldout: Any = None,
    t_heldout: Any = None,
    *,
    progress: Callable[[int, int], None] | None = None,
    devices: Sequence[Any] | None = None,
    on_chunk: Callable[[Chunk], None] | None = None,
    done_chunks: Iterable[Chunk] | None = None,
) -> GridResult:
    """Train every model of ``config``.

    The models run in ``Layout.num_chunks`` chunks (one unless the grid exceeds ``max_models_per_chunk``), which
    are natural checkpoints: ``on_chunk`` receives each one as it finishes, and a later call given them back in
    ``done_chunks`` skips them and returns the same results, bit for bit, as a run that computed them all (on
    the same devices: the layout, and so the chunks, depend on the device count). Nothing here writes a file.

    Args:
      config: the grid.
      x_train, t_train: training images ``[N, D]`` (float, flattened) and integer labels ``[N]``.
      x_heldout, t_heldout: optional held-out set, also scored at each record.
      progress: called as ``progress(done, total)`` once compiled (0 done, or the records of the done chunks)
        and after each record of each chunk computed; ``total = num_chunks * num_records``. When every chunk
        is done already, called once, as ``progress(total, total)``.
      devices: devices to spread the models over (default: every device of every process). With several
        processes (``jax.distributed.initialize``) every process must call ``run_grid`` identically; each
        gets the full results.
      on_chunk: called as ``on_chunk(chunk)`` with each chunk computed here (a ``Chunk`` of host arrays), in
        order, as soon as it is finished; with several processes, on every process. An exception it raises
        ends the run.
      done_chunks: chunks already finished (as ``on_chunk`` received them, e.g. by an earlier, interrupted
        run of the same configuration on the same devices): they are not computed again, and ``progress``
        counts their records as done.

    Returns:
      the ``GridResult``.

    Raises:
      ValueError: for an invalid configuration (``GridConfig.validate``), data of the wrong shape, dtype or
        label range, or a done chunk that does not fit this run (another layout, arms, metrics or shapes).
    """
    config.validate()
    _check_data(x_train, t_train, "train", config)
    with_heldout = x_heldout is not None
    if with_heldout:
        _check_data(x_heldout, t_heldout, "heldout", config)
        if np.shape(x_heldout)[1] != np.shape(x_train)[1]:
            raise ValueError(f"x_heldout has {np.shape(x_heldout)[1]} features, x_train {np.shape(x_train)[1]}")
    dtype = np.dtype(jnp.dtype(config.dtype))
    num_train, input_size = np.shape(x_train)
    devices = list(jax.devices() if devices is None else devices)
    layout = plan_layout(config, len(devices), input_size)
    mesh = Mesh(np.asarray(devices).reshape(layout.mesh_shape), ("seeds", "grid"))
    by_model = NamedSharding(mesh, PartitionSpec("seeds", "grid"))
    by_seed = NamedSharding(mesh, PartitionSpec("seeds"))
    by_grid = NamedSharding(mesh, PartitionSpec("grid"))
    everywhere = NamedSharding(mesh, PartitionSpec())

    x = _global_put(np.asarray(x_train, dtype), everywhere)
    t = _global_put(np.asarray(t_train, np.int32), everywhere)
    sets = {"train": _eval_set(np.asarray(x_train, dtype), np.asarray(t_train), config.eval_batch_size, dtype)}
    if with_heldout:
        sets["heldout"] = _eval_set(np.asarray(x_heldout, dtype), np.asarray(t_heldout), config.eval_batch_size,
                                    dtype)
    eval_sets = {name: tuple(_global_put(np.asarray(a), everywhere) for a in s) for name, s in sets.items()}

    eval_sizes = {"train": num_train, "heldout": np.shape(x_heldout)[0] if with_heldout else 0}
    setup, record = make_programs(config, num_train, input_size, eval_sizes)
    scales = scale_index(config)
    sb, gb = layout.seed_block, layout.grid_block
    num_seeds, num_grid = config.num_seeds, config.num_grid_points

    def chunk_inputs(sc: int, gc: int) -> ChunkInputs:
        # Padded positions repeat the last real seed / grid point: valid numbers, sliced away afterwards.
        s = np.minimum(sc * sb + np.arange(sb), num_seeds - 1)
        g = np.minimum(gc * gb + np.arange(gb), num_grid - 1)
        return ChunkInputs(
            seeds=_global_put((config.seed + s).astype(np.int32), by_seed),
            scale_index=_global_put(scales[g], by_grid),
            hyper={name: _global_put(values, by_grid) for name, values in _hyper(config, g).items()},
        )

    num_records = config.num_records
    names = list(config.arms)
    metric_names = [m for m in METRICS if with_heldout or not m.startswith("heldout")]
    host_dtype = np.float64 if config.dtype == "float64" else np.float32
    out = {m: {a: np.zeros((num_seeds, num_grid, num_records), host_dtype) for a in names} for m in metric_names}
    diverged = {a: np.zeros((num_seeds, num_grid), bool) for a in names}
    finals: dict[str, list] = {a: [] for a in names}

    def bounds(sc: int, gc: int) -> tuple[tuple[int, int], tuple[int, int]]:
        # The real (unpadded) seeds and grid points of a chunk.
        s_lo, g_lo = sc * sb, gc * gb
        return (s_lo, min(sb, num_seeds - s_lo)), (g_lo, min(gb, num_grid - g_lo))

    done_by_index = _check_done(done_chunks, config, layout, bounds, metric_names)

    def place(chunk: Chunk) -> None:
        (s_lo, s_n), (g_lo, g_n) = chunk.seeds, chunk.grid_points
        for m in metric_names:
            for a in names:
                out[m][a][s_lo:s_lo + s_n, g_lo:g_lo + g_n] = chunk.metrics[m][a]
        for a in names:
            diverged[a][s_lo:s_lo + s_n, g_lo:g_lo + g_n] = chunk.diverged[a]
            if config.keep_final:
                finals[a].append((chunk.index, chunk.final[a]))

    compile_s, run_s = 0.0, 0.0
    compiled_setup = compiled_record = None
    devices_used = 0
    total = layout.num_chunks * num_records
    done = len(done_by_index) * num_records
    with jax.default_matmul_precision(config.matmul_precision):
        for sc in range(layout.seed_chunks):
            for gc in range(layout.grid_chunks):
                if (sc, gc) in done_by_index:
                    place(done_by_index[(sc, gc)])
                    continue
                inputs = chunk_inputs(sc, gc)
                if compiled_setup is None:  # every chunk has the same shapes: compile once
                    t0 = time.perf_counter()
                    compiled_setup = jax.jit(setup, out_shardings=(by_model, by_seed, by_seed)).lower(
                        inputs).compile()
                    carry, batch_idx, dropout_keys = compiled_setup(inputs)
                    compiled_record = (
                        jax.jit(record, donate_argnums=0, out_shardings=(by_model, everywhere))
                        .lower(carry, jnp.int32(0), x, t, batch_idx, dropout_keys, inputs, eval_sets)
                        .compile()
                    )
                    compile_s = time.perf_counter() - t0
                    devices_used = _devices_holding_distinct_models(jax.tree_util.tree_leaves(carry)[0])
                    if progress is not None:
                        progress(done, total)
                    t0 = time.perf_counter()
                else:
                    t0 = time.perf_counter()
                    carry, batch_idx, dropout_keys = compiled_setup(inputs)
                records = []
                for r in range(num_records):
                    carry, metrics = compiled_record(carry, jnp.int32(r), x, t, batch_idx, dropout_keys, inputs,
                                                     eval_sets)
                    records.append(metrics)
                    done += 1
                    if progress is not None:
                        jax.block_until_ready(metrics)
                        progress(done, total)
                records = _to_host(records)
                (s_lo, s_n), (g_lo, g_n) = bounds(sc, gc)
                div = _to_host(carry.diverged)
                final = None
                if config.keep_final:
                    host = _to_host(carry.models)
                    final = {a: jax.tree_util.tree_map(lambda l: np.asarray(l)[:s_n, :g_n], host[a]) for a in names}
                chunk = Chunk(
                    index=(sc, gc), seeds=(s_lo, s_n), grid_points=(g_lo, g_n),
                    metrics={m: {a: np.stack([np.asarray(rec[m][a]) for rec in records], axis=-1)[:s_n, :g_n]
                                 for a in names} for m in metric_names},
                    diverged={a: np.asarray(div[a])[:s_n, :g_n] for a in names},
                    final=final,
                )
                place(chunk)
                run_s += time.perf_counter() - t0
                if on_chunk is not None:
                    on_chunk(chunk)
    if compiled_setup is None:  # every chunk was done already: nothing compiled, nothing ran
        devices_used = _devices_holding_distinct_models(_global_put(np.zeros((sb, gb), np.int8), by_model))
        if progress is not None:
            progress(total, total)

    grid_shape = config.grid_shape
    metrics_out = {m: {a: v.reshape(num_seeds, *grid_shape, num_records) for a, v in per_arm.items()}
                   for m, per_arm in out.items()}
    diverged = {a: v.reshape(num_seeds, *grid_shape) for a, v in diverged.items()}
    final = None
    if config.keep_final:
        final = {a: _assemble(finals[a], layout, num_seeds, grid_shape) for a in names}
    padded = layout.num_chunks * layout.models_per_chunk(len(names)) - config.num_models
    return GridResult(
        config=config,
        axes={name: np.asarray(values, float) for name, values in config.axes.items()},
        metrics=metrics_out,
        diverged=diverged,
        record_steps=record_steps(config, num_train),
        timing={"compile_s": compile_s, "run_s": run_s},
        layout=dict(layout._asdict(), num_chunks=layout.num_chunks,
                    models_per_chunk=layout.models_per_chunk(len(names)), devices_used=devices_used,
                    processes=jax.process_count(), padded_models=padded),
        final=final,
        arm_record_steps={a: record_steps(config, num_train, arm_batch_size(config, arm))
                          for a, arm in config.arms.items()},
    )


def init_models(config: GridConfig, input_size: int = 784) -> dict:
    """Every model's state before its first update, exactly as ``run_grid`` starts it.

    For looking at the untrained networks (activations, a step-size probe) beside the trained ones. All models
    are built at once on the default device, so this is meant for grids that fit in memory.

    Args:
      config: the grid.
      input_size: features per image.

    Returns:
      arm name -> ``TrainState`` with leaves ``[seeds, *grid_shape, ...]`` (host NumPy arrays).

    Raises:
      ValueError: for an invalid configuration (``GridConfig.validate``).
    """
    config.validate()
    setup, _ = make_programs(config, 1, int(input_size), {})
    inputs = ChunkInputs(
        seeds=jnp.asarray(config.seed + np.arange(config.num_seeds), jnp.int32),
        scale_index=jnp.asarray(scale_index(config)),
        hyper={name: jnp.asarray(values)
               for name, values in _hyper(config, np.arange(config.num_grid_points)).items()},
    )
    carry, _, _ = jax.jit(setup)(inputs)
    shape = (config.num_seeds, *config.grid_shape)
    return {a: jax.tree_util.tree_map(lambda l: np.asarray(l).reshape(*shape, *l.shape[2:]), ts)
            for a, ts in jax.device_get(carry.models).items()}


def _assemble(pieces: list, layout: Layout, num_seeds: int, grid_shape: tuple[int, ...]):
    """Concatenate per-chunk final states ``[s_n, g_n, ...]`` into ``[seeds, *grid_shape, ...]``."""
    rows = []
    for sc in range(layout.seed_chunks):
        row = [tree for (s, _), tree in pieces if s == sc]
        rows.append(jax.tree_util.tree_map(lambda *ls: np.concatenate(ls, axis=1), *row))
    whole = jax.tree_util.tree_map(lambda *ls: np.concatenate(ls, axis=0), *rows)
    return jax.tree_util.tree_map(lambda l: l.reshape(num_seeds, *grid_shape, *l.shape[2:]), whole)


def _check_done(done_chunks: Iterable[Chunk] | None, config: GridConfig, layout: Layout,
                bounds: Callable[[int, int], tuple], metric_names: list[str]) -> dict[tuple[int, int], Chunk]:
    """``done_chunks`` by index, each checked against the chunk this run would compute at its index."""
    done: dict[tuple[int, int], Chunk] = {}
    names = set(config.arms)
    for chunk in done_chunks or ():
        if not isinstance(chunk, Chunk):
            raise TypeError(f"done_chunks must hold grid.Chunk values, got {type(chunk).__name__}")
        index = tuple(int(i) for i in chunk.index)
        if not (len(index) == 2 and 0 <= index[0] < layout.seed_chunks and 0 <= index[1] < layout.grid_chunks):
            raise ValueError(f"done chunk index {chunk.index} is outside this run's "
                             f"{layout.seed_chunks} x {layout.grid_chunks} chunks; was it made with another "
                             "configuration or device count?")
        if index in done:
            raise ValueError(f"done chunk {index} is given twice")
        seeds, points = bounds(*index)
        if (tuple(chunk.seeds), tuple(chunk.grid_points)) != (seeds, points):
            raise ValueError(f"done chunk {index} holds seeds {tuple(chunk.seeds)} and grid points "
                             f"{tuple(chunk.grid_points)} (first, count), but this run's chunk {index} holds seeds "
                             f"{seeds} and grid points {points}; was it made with another configuration or "
                             "device count?")
        shape = (seeds[1], points[1])
        if set(chunk.metrics) != set(metric_names) or any(set(v) != names for v in chunk.metrics.values()):
            raise ValueError(f"done chunk {index} must hold the metrics {sorted(metric_names)} for the arms "
                             f"{sorted(names)}, got {sorted(chunk.metrics)}")
        for m, per_arm in chunk.metrics.items():
            for a, v in per_arm.items():
                if np.shape(v) != (*shape, config.num_records):
                    raise ValueError(f"done chunk {index}: {m}[{a!r}] must have shape {(*shape, config.num_records)}, "
                                     f"got {np.shape(v)}")
        if set(chunk.diverged) != names or any(np.shape(v) != shape for v in chunk.diverged.values()):
            raise ValueError(f"done chunk {index}: diverged must map each of the arms {sorted(names)} to shape {shape}")
        if config.keep_final and (not isinstance(chunk.final, dict) or set(chunk.final) != names or any(
                np.shape(leaf)[:2] != shape for leaf in jax.tree_util.tree_leaves(chunk.final))):
            raise ValueError(f"done chunk {index} must hold every arm's final models, leaves [{shape[0]}, "
                             f"{shape[1]}, ...] (config.keep_final)")
        done[index] = chunk
    return done


def _devices_holding_distinct_models(array: Array) -> int:
    """Devices whose shard of ``array`` (leading axes: seeds, grid points) holds models no other device holds.

    ``sharding.device_set`` lists the whole mesh even for a replicated array; the shards' index ranges do not:
    devices holding the same range count once.
    """
    blocks = {tuple(sl.indices(n)[:2] for sl, n in zip(index, array.shape[:2]))
              for index in array.sharding.devices_indices_map(array.shape).values()}
    return len(blocks)


def _check_data(x: Any, t: Any, what: str, config: GridConfig) -> None:
    if np.ndim(x) != 2:
        raise ValueError(f"x_{what} must be [N, D], got shape {np.shape(x)}")
    if np.shape(t) != np.shape(x)[:1]:
        raise ValueError(f"t_{what} must be [N]={np.shape(x)[:1]}, got {np.shape(t)}")
    if np.shape(x)[0] < 1:
        raise ValueError(f"x_{what} is empty")
    labels = np.asarray(t)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"t_{what} must hold integer labels, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= config.num_classes:
        raise ValueError(f"t_{what} labels must lie in 0..{config.num_classes - 1}, got {labels.min()}..{labels.max()}")


def _eval_set(x: np.ndarray, t: np.ndarray, batch: int, dtype) -> tuple:
    """Pad ``x [N, D]`` to whole batches: ``(xs [nb, E, D], ts [nb, E], mask [nb, E])``."""
    n = x.shape[0]
    size = min(batch, n)
    nb = -(-n // size)
    xs = np.zeros((nb * size, x.shape[1]), dtype)
    xs[:n] = x
    ts = np.zeros(nb * size, np.int32)
    ts[:n] = t
    mask = np.arange(nb * size) < n
    return xs.reshape(nb, size, -1), ts.reshape(nb, size), mask.reshape(nb, size)


def _global_put(array: np.ndarray, sharding: NamedSharding) -> Array:
    """A global ``jax.Array`` from a host array every process holds (works with one process or many)."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(tree: Any) -> Any:
    """Host NumPy copies of (possibly multi-process) global arrays."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.device_get(tree)
