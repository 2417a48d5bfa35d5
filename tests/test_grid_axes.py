"""The batch-norm momentum as a vmapped axis of the grid: against models trained one by one with the momentum in
their norm value, and against the batch statistics themselves (momentum 0 keeps the last batch's)."""

import jax
import numpy as np
import pytest

from bnjax import data, grid, layers

MOMENTA = (0.0, 0.5, 0.9, 0.99)


@pytest.fixture(scope="module")
def bundled():
    return data.load_bundled(1000, 500)


@pytest.mark.slow
def test_bn_momentum_axis_equals_models_trained_one_by_one(bundled):
    x, t, xh, th = bundled.x_train[:200], bundled.t_train[:200], bundled.x_heldout[:100], bundled.t_heldout[:100]
    scales = (0.3, 0.05)
    base = grid.GridConfig(arms={"bn": grid.Arm(norm=True), "plain": grid.Arm()},
                           axes={"weight_scale": scales, "bn_momentum": MOMENTA}, num_records=3,
                           updates_per_record=2, batch_size=40, hidden_sizes=(16, 12), num_seeds=2, seed=4,
                           keep_final=True)
    together = grid.run_grid(base, x, t, xh, th)
    assert together.metrics["train_loss"]["bn"].shape == (2, 2, 4, 3)
    # One model per momentum, the momentum in its norm value, each drawing the "bn" arm's initial weights (stream
    # 0); arms of one run are independent models (test_grid_run checks them against one-arm runs), so one run
    # holds them all (one engine compile instead of one per momentum).
    alone_arms = {f"m{k}": grid.Arm(norm=layers.batch_norm(momentum=m, eps=1e-6, init_var=0.0), init_stream=0)
                  for k, m in enumerate(MOMENTA)}
    alone = grid.run_grid(base.replace(arms=alone_arms, axes={"weight_scale": scales}), x, t, xh, th)
    for k, m in enumerate(MOMENTA):
        for metric, values in alone.metrics.items():
            np.testing.assert_allclose(together.metrics[metric]["bn"][:, :, k], values[f"m{k}"], rtol=1e-5,
                                       atol=1e-6, err_msg=f"{metric} at momentum {m}")
        for got, want in zip(jax.tree_util.tree_leaves(together.final["bn"]),
                             jax.tree_util.tree_leaves(alone.final[f"m{k}"])):
            np.testing.assert_allclose(np.asarray(got)[:, :, k], want, rtol=1e-5, atol=1e-6)
    # The momentum reaches the running statistics only: evaluation differs, training does not.
    final_bn = together.final["bn"]
    stats = jax.tree_util.tree_leaves(final_bn.state)
    assert not np.allclose(stats[0][:, :, 0], stats[0][:, :, 3])
    loss = together.metrics["train_loss"]["bn"]
    assert not np.allclose(loss[:, :, 0], loss[:, :, 3])
    w = final_bn.params.affine[1].W
    for k in range(1, 4):
        np.testing.assert_allclose(w[:, :, k], w[:, :, 0], rtol=1e-5, atol=1e-7)
    # An arm without a norm ignores the axis: every momentum is the same model.
    for metric, values in together.metrics.items():
        for k in range(1, 4):
            np.testing.assert_array_equal(values["plain"][:, :, k], values["plain"][:, :, 0])


@pytest.mark.slow
def test_momentum_zero_keeps_the_last_batchs_statistics(bundled):
    """One update at momentum 0: every layer's running mean and (biased) variance are the statistics of that
    update's batch through the initial network, recomputed here in NumPy from the documented batch keys."""
    n, batch, seed = 300, 50, 6
    x, t = bundled.x_train[:n], bundled.t_train[:n]
    cfg = grid.GridConfig(arms={"bn": grid.Arm(norm=True)}, axes={"bn_momentum": (0.0, 0.9)},
                          weight_scale=0.2, num_records=1, batch_size=batch, hidden_sizes=(16, 12), seed=seed,
                          keep_final=True)
    start = grid.init_models(cfg)["bn"]
    final = grid.run_grid(cfg, x, t).final["bn"]
    data_key = jax.random.split(jax.random.key(seed))[0]
    idx = np.asarray(jax.random.randint(data_key, (1, batch), 0, n))[0]
    h = np.asarray(x[idx], np.float64)
    running = jax.tree_util.tree_leaves(final.state)  # per hidden layer: mean, var
    assert len(running) == 4
    for layer in range(2):
        a = start.params.affine[layer]
        z = h @ np.asarray(a.W[0, 0], np.float64) + np.asarray(a.b[0, 0], np.float64)
        mean, var = z.mean(axis=0), z.var(axis=0)
        np.testing.assert_allclose(running[2 * layer][0, 0], mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(running[2 * layer + 1][0, 0], var, rtol=1e-4, atol=1e-7)
        # momentum 0.9 from the book's start (mean 0, var 0) keeps a tenth of them
        np.testing.assert_allclose(running[2 * layer][0, 1], 0.1 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(running[2 * layer + 1][0, 1], 0.1 * var, rtol=1e-4, atol=1e-7)
        h = np.maximum((z - mean) / np.sqrt(var + 1e-6), 0.0)  # gamma 1, beta 0 at the start
