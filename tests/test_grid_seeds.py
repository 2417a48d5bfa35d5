"""Seed ``i`` of an ``N``-seed run against a one-seed run at ``seed + i`` (docs/engine.md, "Seeds").

What is exact: the keys, the initial models, the mini-batches (and dropout keys); the data never depends on the
training seed. What agrees only to rounding: trained metrics and weights, because the program compiled for
``N`` models per device is not the one compiled for one, and XLA may order or fuse their arithmetic differently.
The batches are re-derived here from the documented scheme (``seed_keys``), not read back from the engine alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import data, grid
from bnjax.grid.programs import ChunkInputs, hyper_dtypes, make_programs

SEED, NUM_SEEDS = 5, 3


def _config(**overrides) -> grid.GridConfig:
    """Two arms of the grid's batch size and one with its own (its batches take another key), two vmapped axes."""
    arms = {"plain": grid.Arm(), "batchnorm": grid.Arm(norm=True), "own": grid.Arm(dropout_ratio=0.3, batch_size=8)}
    fields = dict(arms=arms, axes={"weight_scale": (0.3, 0.05), "learning_rate": (0.1, 0.01)}, hidden_sizes=(6,),
                  batch_size=10, num_records=2, seed=SEED, num_seeds=NUM_SEEDS)
    fields.update(overrides)
    return grid.GridConfig(**fields)


def _setup(config: grid.GridConfig, num_train: int, input_size: int):
    """The engine's ``setup`` program for a chunk of every grid point: ``seeds -> (carry, batches, dropout keys)``.

    Jitted once: each number of seeds compiles its own program, which is the point of the comparison.
    """
    setup = jax.jit(make_programs(config, num_train, input_size, {})[0])
    points, dtypes = grid.grid_points(config), hyper_dtypes(config)
    g = np.arange(config.num_grid_points)
    scale = np.unravel_index(g, config.grid_shape)[list(config.axes).index("weight_scale")]
    hyper = {name: jnp.asarray(points[name][g].astype(dtypes[name])) for name in dtypes}
    return lambda seeds: setup(ChunkInputs(jnp.asarray(seeds, jnp.int32), jnp.asarray(scale, jnp.int32), hyper))


@pytest.mark.slow  # three small compilations
def test_initial_models_of_seed_i_equal_a_one_seed_run_at_seed_plus_i():
    config = _config()
    several = grid.init_models(config, 12)
    for i in range(NUM_SEEDS):
        one = grid.init_models(config.replace(seed=SEED + i, num_seeds=1), 12)
        for arm in config.arms:
            leaves, ones = jax.tree_util.tree_leaves(several[arm]), jax.tree_util.tree_leaves(one[arm])
            assert len(leaves) == len(ones) > 0
            for got, want in zip(leaves, ones):
                np.testing.assert_array_equal(got[i], want[0])  # bit for bit, every weight and statistic
    # Not a tautology: the seeds' models differ from each other.
    w = several["plain"].params.affine[0].W
    assert not np.array_equal(w[0], w[1]) and not np.array_equal(w[1], w[2])


@pytest.mark.slow  # two small compilations
def test_batches_and_dropout_keys_of_seed_i_equal_a_one_seed_run_at_seed_plus_i():
    config, num_train = _config(), 40
    seeds = SEED + np.arange(NUM_SEEDS)
    setup = _setup(config, num_train, 12)
    _, batches, dropout_keys = setup(seeds)
    assert sorted(batches) == [8, 10]  # the grid's batch size and the "own" arm's
    updates = {b: idx.shape[1] for b, idx in batches.items()}
    for i, seed in enumerate(seeds):
        # The one-seed program (compiled once, run at each seed) draws the same batches and keys, bit for bit.
        _, one_batches, one_keys = setup(seeds[i:i + 1])
        for b in batches:
            np.testing.assert_array_equal(np.asarray(batches[b][i]), np.asarray(one_batches[b][0]))
        np.testing.assert_array_equal(jax.random.key_data(dropout_keys[i]), jax.random.key_data(one_keys[0]))
        # ... and both are the documented scheme of seed_keys(seed + i): nothing depends on the number of seeds.
        data_key, _, dropout_key = grid.seed_keys(int(seed), 3, 2)
        want = {10: jax.random.randint(data_key, (updates[10], 10), 0, num_train),
                8: jax.random.randint(jax.random.fold_in(jax.random.fold_in(data_key, 2), 8), (updates[8], 8), 0,
                                      num_train)}
        for b in batches:
            np.testing.assert_array_equal(np.asarray(batches[b][i]), np.asarray(want[b]))
        np.testing.assert_array_equal(jax.random.key_data(dropout_keys[i]), jax.random.key_data(dropout_key))
    assert not np.array_equal(np.asarray(batches[10][0]), np.asarray(batches[10][1]))


@pytest.mark.slow  # two trainings
def test_trained_metrics_of_seed_i_agree_with_a_one_seed_run_to_rounding():
    """On one device the 2-seed program holds twice the models of the 1-seed one: compiled differently, its
    numbers may differ in the last bits. The stated tolerance: losses and weights to 1e-5 relative, accuracies to
    one image; a different seed is far outside it."""
    ds = data.load_bundled(200, 100)
    config = grid.GridConfig(axes={"weight_scale": (0.3, 0.05)}, hidden_sizes=(16,), batch_size=20, num_records=3,
                             seed=3, num_seeds=2, keep_final=True)
    one_device = jax.devices()[:1]
    sets = (ds.x_train, ds.t_train, ds.x_heldout, ds.t_heldout)
    both = grid.run_grid(config, *sets, devices=one_device)
    second = grid.run_grid(config.replace(seed=4, num_seeds=1), *sets, devices=one_device)
    assert both.layout["devices_used"] == 1
    for arm in config.arms:
        for metric, per_arm in both.metrics.items():
            got, want = per_arm[arm][1], second.metrics[metric][arm][0]
            if metric.endswith("accuracy"):
                images = 200 if metric.startswith("train") else 100
                np.testing.assert_allclose(got, want, rtol=0, atol=1.0 / images + 1e-7, err_msg=metric)
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=metric)
        w_both, w_one = both.final[arm].params.affine[0].W[1], second.final[arm].params.affine[0].W[0]
        np.testing.assert_allclose(w_both, w_one, rtol=1e-5, atol=1e-7)
        # The tolerance separates seeds: seed 3's weights and losses are not within it of seed 4's.
        assert not np.allclose(both.final[arm].params.affine[0].W[0], w_one, rtol=1e-5, atol=1e-7)
        assert not np.allclose(both.metrics["train_loss"][arm][0], second.metrics["train_loss"][arm][0], rtol=1e-5)
