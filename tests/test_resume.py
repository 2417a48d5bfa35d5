"""Interrupted runs resume: the engine's chunks as checkpoints (``run_grid``'s ``on_chunk`` and ``done_chunks``),
and the command line's ``--resume`` after ``kill -9`` at two different chunks, compared bit for bit with a run
that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from bnjax import data, grid
from bnjax.grid import driver
from experiments import chunks
from helpers import ROOT, cli_env, read_results, run_cli


@pytest.fixture(scope="module")
def tiny():
    """A grid of 3 seeds x 3 scales x 2 arms in chunks of 4 models on 2 devices (6 chunks), with final models."""
    ds = data.load_bundled(200, 50)
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1, 0.03)}, num_records=2, hidden_sizes=(8, 8), num_seeds=3,
                          keep_final=True, max_models_per_chunk=4, batch_size=20)
    return cfg, (ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout), jax.devices()[:2]


def _assert_same(a: grid.GridResult, b: grid.GridResult) -> None:
    """Every array of two results, bit for bit."""
    assert set(a.metrics) == set(b.metrics)
    for m in a.metrics:
        for arm in a.config.arms:
            np.testing.assert_array_equal(a.metrics[m][arm], b.metrics[m][arm], err_msg=f"{m} {arm}")
    for arm in a.config.arms:
        np.testing.assert_array_equal(a.diverged[arm], b.diverged[arm])
        leaves_a, leaves_b = jax.tree_util.tree_leaves(a.final[arm]), jax.tree_util.tree_leaves(b.final[arm])
        assert len(leaves_a) == len(leaves_b)
        for la, lb in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(la, lb)


@pytest.mark.slow
def test_chunks_are_reported_as_they_finish_and_done_ones_are_skipped_bit_for_bit(tiny, tmp_path):
    cfg, sets, devices = tiny
    seen = []
    whole = grid.run_grid(cfg, *sets, devices=devices, on_chunk=seen.append)
    layout = grid.plan_layout(cfg, len(devices))
    assert whole.layout["num_chunks"] == layout.num_chunks == len(seen) >= 4
    assert [c.index for c in seen] == [(s, g) for s in range(layout.seed_chunks) for g in range(layout.grid_chunks)]
    # Each chunk holds exactly its block of the assembled results, and the blocks tile the grid once.
    covered = np.zeros((cfg.num_seeds, cfg.num_grid_points), int)
    for c in seen:
        (s0, sn), (g0, gn) = c.seeds, c.grid_points
        covered[s0:s0 + sn, g0:g0 + gn] += 1
        for m in whole.metrics:
            for arm in cfg.arms:
                np.testing.assert_array_equal(c.metrics[m][arm], whole.metrics[m][arm][s0:s0 + sn, g0:g0 + gn])
        for arm in cfg.arms:
            np.testing.assert_array_equal(c.diverged[arm], whole.diverged[arm][s0:s0 + sn, g0:g0 + gn])
            np.testing.assert_array_equal(c.final[arm].params.affine[0].W,
                                          whole.final[arm].params.affine[0].W[s0:s0 + sn, g0:g0 + gn])
    assert (covered == 1).all()

    # Resume from two chunks that are not the first: the others are computed, bit for bit as before.
    given = [seen[1], seen[3]]
    progress, again = [], []
    resumed = grid.run_grid(cfg, *sets, devices=devices, done_chunks=given, on_chunk=again.append,
                            progress=lambda d, n: progress.append((d, n)))
    assert [c.index for c in again] == [c.index for c in seen if c.index not in {seen[1].index, seen[3].index}]
    assert {c.index for c in again} | {c.index for c in given} == {c.index for c in seen}
    total = layout.num_chunks * cfg.num_records
    assert progress == [(d, total) for d in range(2 * cfg.num_records, total + 1)]
    _assert_same(resumed, whole)
    assert resumed.layout["devices_used"] == whole.layout["devices_used"] == 2

    # Every chunk done: nothing is compiled, the results are the same.
    progress.clear()
    done = grid.run_grid(cfg, *sets, devices=devices, done_chunks=seen, progress=lambda d, n: progress.append((d, n)))
    assert progress == [(total, total)] and done.timing["compile_s"] == 0.0
    _assert_same(done, whole)
    assert done.layout["devices_used"] == 2
    # A done chunk is placed as given, every field of it (marked values, so nothing recomputed could pass).
    marked = seen[2]._replace(
        metrics={m: {arm: np.full_like(v, 0.25 + i) for arm, v in per.items()} for i, (m, per) in
                 enumerate(seen[2].metrics.items())},
        diverged={arm: ~v for arm, v in seen[2].diverged.items()})
    placed = grid.run_grid(cfg, *sets, devices=devices, done_chunks=[*seen[:2], marked, *seen[3:]])
    (s0, sn), (g0, gn) = marked.seeds, marked.grid_points
    for arm in cfg.arms:
        np.testing.assert_array_equal(placed.diverged[arm].reshape(cfg.num_seeds, -1)[s0:s0 + sn, g0:g0 + gn],
                                      marked.diverged[arm])
        for m in whole.metrics:
            block = placed.metrics[m][arm].reshape(cfg.num_seeds, cfg.num_grid_points, -1)[s0:s0 + sn, g0:g0 + gn]
            np.testing.assert_array_equal(block, marked.metrics[m][arm])

    # The chunk files of the command line hold each chunk whole: written and read back, bit for bit.
    writer = chunks.ChunkWriter(tmp_path, "digest-a")
    for c in seen:
        writer(c)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == sorted(
        f"chunk-{c.index[0]}-{c.index[1]}.npz" for c in seen)  # no temporary file
    loaded = chunks.load(tmp_path, "digest-a", cfg, sets[0].shape[1])
    assert [c.index for c in loaded] == [c.index for c in seen]
    for a, b in zip(loaded, seen):
        assert (a.seeds, a.grid_points) == (b.seeds, b.grid_points)
        for m in b.metrics:
            for arm in cfg.arms:
                assert a.metrics[m][arm].dtype == b.metrics[m][arm].dtype
                np.testing.assert_array_equal(a.metrics[m][arm], b.metrics[m][arm])
        for arm in cfg.arms:
            np.testing.assert_array_equal(a.diverged[arm], b.diverged[arm])
            assert jax.tree_util.tree_structure(a.final[arm]) == jax.tree_util.tree_structure(b.final[arm])
            for la, lb in zip(jax.tree_util.tree_leaves(a.final[arm]), jax.tree_util.tree_leaves(b.final[arm])):
                assert la.dtype == lb.dtype
                np.testing.assert_array_equal(la, lb)
    _assert_same(grid.run_grid(cfg, *sets, devices=devices, done_chunks=loaded), whole)
    with pytest.raises(chunks.ResumeError, match="different options") as refused:
        chunks.load(tmp_path, "digest-b", cfg, sets[0].shape[1])
    assert refused.value.status == 2
    chunks.chunk_path(tmp_path, seen[-1].index).write_bytes(b"PK damaged")
    with pytest.raises(chunks.ResumeError, match="cannot read") as damaged:
        chunks.load(tmp_path, "digest-a", cfg, sets[0].shape[1])
    assert damaged.value.status == 1


def test_the_config_hash_follows_what_the_numbers_depend_on():
    ds = data.load_bundled(100, 20)
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1)}, num_records=2, hidden_sizes=(8,), num_seeds=2)
    layout = grid.plan_layout(cfg, 2)
    base = chunks.config_hash(cfg, ds, layout, heldout=True)
    assert base == chunks.config_hash(cfg, ds, layout, heldout=True)
    # the chunk size settings count only through the layout they give
    assert chunks.config_hash(cfg.replace(max_models_per_chunk=10**6), ds, layout, heldout=True) == base
    other_data = ds._replace(x_train=ds.x_train.copy())
    other_data.x_train[0, 0] += 0.5
    for changed in (chunks.config_hash(cfg.replace(learning_rate=0.02), ds, layout, heldout=True),
                    chunks.config_hash(cfg.replace(arms={"plain": grid.Arm()}), ds, layout, heldout=True),
                    chunks.config_hash(cfg, other_data, layout, heldout=True),
                    chunks.config_hash(cfg, ds._replace(t_heldout=ds.t_heldout[::-1].copy()), layout, heldout=True),
                    chunks.config_hash(cfg, ds, grid.plan_layout(cfg, 1), heldout=True),
                    chunks.config_hash(cfg, ds, layout, heldout=False)):
        assert changed != base


def _fake_chunk(cfg, layout, at, **change):
    """The chunk ``at`` (seed chunk, grid chunk) of ``layout``, zeros, with ``change`` applied."""
    sb, gb = layout.seed_block, layout.grid_block
    s0, g0 = at[0] * sb, at[1] * gb
    sn, gn = min(sb, cfg.num_seeds - s0), min(gb, cfg.num_grid_points - g0)
    chunk = grid.Chunk(index=at, seeds=(s0, sn), grid_points=(g0, gn),
                       metrics={m: {a: np.zeros((sn, gn, cfg.num_records), np.float32) for a in cfg.arms}
                                for m in ("train_accuracy", "train_loss")},
                       diverged={a: np.zeros((sn, gn), bool) for a in cfg.arms}, final=None)
    return chunk._replace(**change)


def test_done_chunks_that_do_not_fit_this_run_are_refused_by_name():
    ds = data.load_bundled(100, 0)
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1, 0.03)}, num_records=2, hidden_sizes=(8,), num_seeds=3,
                          max_models_per_chunk=4)
    devices = jax.devices()[:2]
    layout = grid.plan_layout(cfg, len(devices))
    assert layout.num_chunks > 1
    good = _fake_chunk(cfg, layout, (0, 0))
    zeros = {m: {"plain": np.zeros((1, 1, 2))} for m in ("train_accuracy", "train_loss")}
    for bad, message in [
        (_fake_chunk(cfg, layout, (0, 0), index=(layout.seed_chunks, 0)), "outside"),
        (_fake_chunk(cfg, layout, (0, 0), seeds=(1, 1)), "another configuration or device count"),
        (_fake_chunk(cfg, layout, (0, 0), metrics=zeros), "metrics"),
        (_fake_chunk(cfg, layout, (0, 0), metrics={m: {a: np.zeros((1, 1, 3)) for a in cfg.arms}
                                                   for m in ("train_accuracy", "train_loss")}), "shape"),
        (_fake_chunk(cfg, layout, (0, 0), diverged={"plain": np.zeros((1, 1), bool)}), "diverged"),
    ]:
        with pytest.raises(ValueError, match=message):
            grid.run_grid(cfg, ds.x_train, ds.t_train, devices=devices, done_chunks=[bad])
    with pytest.raises(ValueError, match="twice"):
        grid.run_grid(cfg, ds.x_train, ds.t_train, devices=devices, done_chunks=[good, good])
    with pytest.raises(ValueError, match="final models"):
        grid.run_grid(cfg.replace(keep_final=True), ds.x_train, ds.t_train, devices=devices, done_chunks=[good])
    with pytest.raises(TypeError, match="grid.Chunk"):
        grid.run_grid(cfg, ds.x_train, ds.t_train, devices=devices, done_chunks=[good._asdict()])


@pytest.mark.slow
def test_devices_used_counts_devices_holding_distinct_models(monkeypatch):
    """Finding 11: ``sharding.device_set`` lists the whole mesh even for a replicated array. Here the models are
    forced onto every device whole (replicated): 8 devices hold them, but only 1 distinct set of models."""
    ds = data.load_bundled(100, 0)
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1)}, num_records=1, hidden_sizes=(4,), num_seeds=2)
    real = driver.PartitionSpec

    def replicate_models(*axes):
        return real() if axes == ("seeds", "grid") else real(*axes)

    monkeypatch.setattr(driver, "PartitionSpec", replicate_models)
    replicated = grid.run_grid(cfg, ds.x_train, ds.t_train, devices=jax.devices()[:4])
    assert replicated.layout["mesh_shape"] == (2, 2) and replicated.layout["devices_used"] == 1
    monkeypatch.setattr(driver, "PartitionSpec", real)
    sharded = grid.run_grid(cfg, ds.x_train, ds.t_train, devices=jax.devices()[:4])
    assert sharded.layout["devices_used"] == 4
    np.testing.assert_array_equal(replicated.metrics["train_accuracy"]["plain"],
                                  sharded.metrics["train_accuracy"]["plain"])


# 16 models in 4 chunks of 4, about a second or two each; the session's compilation cache (conftest.py).
SWEEP = ["experiments.sweep", "--num-scales", "4", "--epochs", "40", "--num-seeds", "2", "--train-size", "300",
         "--heldout-size", "100", "--data", "bundled", "--no-plot", "--cpu-devices", "2", "--max-models-per-chunk", "4"]


def _chunk_names(out: Path) -> set:
    return {p.name for p in (out / "chunks").glob("chunk-*.npz")} if (out / "chunks").is_dir() else set()


def _kill_9_after_a_new_chunk(out: Path, *extra: str) -> set:
    """Run SWEEP into ``out``; ``kill -9`` it as soon as a chunk file appears that was not there before."""
    before = _chunk_names(out)
    proc = subprocess.Popen([sys.executable, "-m", *SWEEP, "--out", str(out), "--quiet", *extra], cwd=ROOT,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not _chunk_names(out) - before:
        time.sleep(0.02)
    assert proc.poll() is None, f"ended before a new chunk was seen: {proc.communicate()[1][-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    after = _chunk_names(out)
    assert before < after and len(after) < 4, (before, after)  # killed mid-run, after a new chunk
    return after


# What describes a run rather than its numbers: a resumed run's options say --resume, its timing is its own.
_DESCRIBE = {"config", "timing"}


@pytest.mark.slow
def test_kill_9_twice_at_different_chunks_then_resume_equals_an_uninterrupted_run(tmp_path):
    whole = run_cli(*SWEEP, "--out", tmp_path / "whole", "--quiet")
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "run"
    first = _kill_9_after_a_new_chunk(out)
    files = {name: (out / "chunks" / name).read_bytes() for name in first}

    # Without --resume, or with other options, the interrupted run is refused and left as it is.
    plain = run_cli(*SWEEP, "--out", out)
    assert plain.returncode == 2 and "holds an interrupted run" in plain.stderr and "--resume" in plain.stderr
    other = run_cli(*SWEEP, "--lr", "0.02", "--out", out, "--resume")
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "made with different options" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert {name: (out / "chunks" / name).read_bytes() for name in first} == files

    second = _kill_9_after_a_new_chunk(out, "--resume")  # killed again, at a later chunk
    assert {name: (out / "chunks" / name).read_bytes() for name in first} == files  # finished chunks are kept

    resumed = run_cli(*SWEEP, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / 'chunks'}: {len(second)} of 4 chunks finished" in resumed.stdout
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # chunk files and lock removed once done
    a, b = read_results(tmp_path / "whole"), read_results(out)
    assert set(a) == set(b)
    for key in set(a) - _DESCRIBE - {"environment"}:
        assert a[key] == b[key], key  # every array bit for bit (JSON keeps a float32 exactly)
    assert b["timing"]["resumed_chunks"] == len(second)
    assert a["environment"]["devices_used"] == b["environment"]["devices_used"] == 2
    assert a["environment"]["layout"] == b["environment"]["layout"]
    assert np.array(b["train_accuracy"]["batchnorm"], float).shape == (2, 4, 40)


def test_the_interrupt_note_counts_the_chunks_of_every_grid_an_experiment_runs(tmp_path):
    # experiments.overfitting runs one grid per training size, each into a folder inside the first run's.
    chunks.remove(tmp_path / "elsewhere")  # a clean slate
    chunks.ChunkWriter(tmp_path, "a", resumed=2)
    assert chunks.kept_note() == (f"; 2 finished chunks kept in {tmp_path / 'chunks'} (run the same command with "
                                  "--resume to continue)")
    chunks.ChunkWriter(tmp_path / "chunks" / "size-300", "b", resumed=1)
    assert chunks.kept_note().startswith(f"; 3 finished chunks kept in {tmp_path / 'chunks'} ")
    # a run in an unrelated folder starts its own count
    chunks.ChunkWriter(tmp_path / "other", "c", resumed=0)
    assert chunks.kept_note() == ""
