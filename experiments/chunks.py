"""Chunk files: each finished chunk of an engine run, written into the output folder as it finishes, so that
``--resume`` continues an interrupted run (``kill -9`` included) where it stopped.

``OUT/chunks/chunk-<seed chunk>-<grid chunk>.npz`` holds one ``grid.Chunk`` (its records, diverged flags and,
with ``keep_final``, its final models) and the hash of what its numbers depend on (``config_hash``: the grid's
settings, the data, the layout, the JAX version and backend). ``--resume`` loads them, refuses any whose hash
differs from this run's, and hands them to ``grid.run_grid(done_chunks=...)``, which skips them: the results are
those of an uninterrupted run, bit for bit. The chunk files are removed once ``results.json`` is written.

JAX is imported inside the functions only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from bnjax.files import atomic_file
from experiments import outputs

__all__ = ["config_hash", "chunk_path", "ChunkWriter", "ResumeError", "load", "remove", "kept_note"]

_NAME = re.compile(r"chunk-(\d+)-(\d+)\.npz")


class ResumeError(Exception):
    """Finished chunks cannot be resumed from; ``status`` is the exit status (2: other options, 1: unreadable)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def config_hash(config, dataset, layout, heldout: bool) -> str:
    """What a chunk's numbers depend on, hashed.

    Args:
      config: the ``grid.GridConfig`` (every field but the chunk size settings, which the layout stands for).
      dataset: the ``bnjax.data.Dataset`` (its arrays are hashed, held-out ones only when scored).
      layout: the ``grid.Layout`` (the device count decides it, and with it which models share a chunk).
      heldout: whether the held-out images are scored.

    Returns:
      16 hex digits.
    """
    import jax
    import jaxlib
    import numpy as np

    from experiments.jsonable import jsonable

    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in ("max_models_per_chunk", "memory_budget_bytes")}
    fields["arms"] = {name: arm._asdict() for name, arm in config.arms.items()}
    h = hashlib.sha256()
    arrays = [dataset.x_train, dataset.t_train] + ([dataset.x_heldout, dataset.t_heldout] if heldout else [])
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    what = {"grid": fields, "layout": layout._asdict(), "heldout": heldout, "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "processes": jax.process_count()}
    h.update(json.dumps(jsonable(what), sort_keys=True).encode())
    return h.hexdigest()[:16]


def chunk_path(folder: Path, index: tuple[int, int]) -> Path:
    """The file of chunk ``index`` in the output folder ``folder``.

    Args:
      folder: the output folder.
      index: ``(seed chunk, grid chunk)``.

    Returns:
      ``folder/chunks/chunk-<s>-<g>.npz``.
    """
    return Path(folder) / outputs.CHUNKS / f"chunk-{index[0]}-{index[1]}.npz"


# The folder whose chunk files this process writes, and how many it holds (for the interrupt message).
_KEPT: dict[str, object] = {"folder": None, "count": 0}


class ChunkWriter:
    """``on_chunk`` for ``grid.run_grid``: writes each finished chunk atomically (never a partial file).

    Args:
      folder: the output folder.
      digest: ``config_hash`` of the run.
      resumed: chunks already in the folder (counted in the interrupt message).
    """

    def __init__(self, folder: Path, digest: str, resumed: int = 0):
        self.folder, self.digest = Path(folder), digest
        here, first = self.folder / outputs.CHUNKS, _KEPT["folder"]
        # An experiment that runs several grids (one per training size, say) writes them into folders inside
        # its first one: the note then names that folder and counts every chunk kept below it.
        if first is None or not here.resolve().is_relative_to(Path(first).resolve()):
            _KEPT.update(folder=here, count=0)
        _KEPT["count"] = int(_KEPT["count"]) + resumed

    def __call__(self, chunk) -> None:
        import jax
        import numpy as np

        arrays, manifest = {}, []

        def add(kind: str, key: list, value) -> None:
            arrays[f"a{len(manifest)}"] = np.asarray(value)
            manifest.append([kind, *key])

        for m, per_arm in chunk.metrics.items():
            for arm, value in per_arm.items():
                add("metric", [m, arm], value)
        for arm, value in chunk.diverged.items():
            add("diverged", [arm], value)
        for arm, state in (chunk.final or {}).items():
            leaves, treedef = jax.tree_util.tree_flatten(state)
            for i, leaf in enumerate(leaves):
                add("final", [arm, i], leaf)
            manifest.append(["treedef", arm, str(treedef)])
        head = {"config_hash": self.digest, "index": list(chunk.index), "seeds": list(chunk.seeds),
                "grid_points": list(chunk.grid_points), "manifest": manifest}
        arrays["head"] = np.array(json.dumps(head))
        path = chunk_path(self.folder, chunk.index)
        outputs.note_created(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            np.savez(f, **arrays)
        _KEPT["count"] = int(_KEPT["count"]) + 1


def load(folder: Path, digest: str, config, input_size: int) -> list:
    """The finished chunks in ``folder``, checked against this run.

    Args:
      folder: the output folder.
      digest: ``config_hash`` of this run.
      config: its ``grid.GridConfig`` (with ``keep_final``, the final models' structure is read from one model
        per arm built by ``grid.init_models``).
      input_size: features per image.

    Returns:
      ``grid.Chunk`` values, in file-name order (none when there is no chunk file).

    Raises:
      ResumeError: a chunk made with other options (status 2), or one that cannot be read (status 1).
    """
    import jax
    import numpy as np

    from bnjax import grid

    paths = sorted(p for p in (Path(folder) / outputs.CHUNKS).glob("chunk-*.npz") if _NAME.fullmatch(p.name))
    done, treedefs = [], None
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                head = json.loads(str(z["head"]))
                if head["config_hash"] != digest:
                    raise ResumeError(f"--resume: {path} was made with different options (config hash "
                                      f"{head['config_hash']}, this run's {digest}); resume with the options, data "
                                      "and device count of the interrupted run, or use --overwrite to start again", 2)
                values = {f"a{i}": z[f"a{i}"] for i, entry in enumerate(head["manifest"]) if entry[0] != "treedef"}
        except ResumeError:
            raise
        except Exception as err:  # a damaged file: zip, JSON or key errors alike
            raise ResumeError(f"--resume: cannot read {path} ({type(err).__name__}: {err}); remove it to compute that "
                              "chunk again, or use --overwrite to start again", 1) from None
        metrics, diverged, leaves, shapes = {}, {}, {}, {}
        for i, entry in enumerate(head["manifest"]):
            if entry[0] == "metric":
                metrics.setdefault(entry[1], {})[entry[2]] = values[f"a{i}"]
            elif entry[0] == "diverged":
                diverged[entry[1]] = values[f"a{i}"]
            elif entry[0] == "final":
                leaves.setdefault(entry[1], []).append(values[f"a{i}"])
            elif entry[0] == "treedef":
                shapes[entry[1]] = entry[2]
        final = None
        if config.keep_final:
            if treedefs is None:
                treedefs = _final_treedefs(config, input_size)
            if {a: str(t) for a, t in treedefs.items()} != shapes:
                raise ResumeError(f"--resume: {path} holds final models of another structure; use --overwrite to "
                                  "start again", 2)
            final = {a: jax.tree_util.tree_unflatten(treedefs[a], leaves[a]) for a in treedefs}
        done.append(grid.Chunk(index=tuple(head["index"]), seeds=tuple(head["seeds"]),
                               grid_points=tuple(head["grid_points"]), metrics=metrics, diverged=diverged,
                               final=final))
    return done


def _final_treedefs(config, input_size: int) -> dict:
    """Each arm's ``TrainState`` structure, from one model per arm."""
    import jax

    from bnjax import grid

    one = config.replace(num_seeds=1, axes={name: tuple(values)[:1] for name, values in config.axes.items()})
    return {a: jax.tree_util.tree_structure(state) for a, state in grid.init_models(one, input_size).items()}


def remove(folder: Path) -> None:
    """Remove the chunk files of a finished run (its ``results.json`` holds everything they held).

    Args:
      folder: the output folder.
    """
    import shutil

    shutil.rmtree(Path(folder) / outputs.CHUNKS, ignore_errors=True)
    _KEPT.update(folder=None, count=0)


def kept_note() -> str:
    """What an interrupted run leaves to resume from, for its last line.

    Returns:
      e.g. ``'; 2 finished chunks kept in runs/x/chunks (run again with --resume to continue)'``, or ``''``.
    """
    if not _KEPT["folder"] or not _KEPT["count"]:
        return ""
    n = int(_KEPT["count"])
    return (f"; {n} finished chunk{'s' if n != 1 else ''} kept in {_KEPT['folder']} (run the same command with "
            "--resume to continue)")
