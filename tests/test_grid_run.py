"""The grid engine against models trained one by one, the NumPy reference network and its own invariants.

The keys are re-derived here from the documented scheme (``key(seed)`` split into a data and an init key; init
keys split ``[arms, weight scales]``; batches ``randint(data_key, [updates, B], 0, N)``, or from
``fold_in(fold_in(data_key, 2), B)`` for an arm's own batch size B), so a test fails when
the engine reuses or swaps a key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import data, grid, layers, model, train
from bnjax.grid import driver
from conftest import x64
from helpers import reference_keys
from experiments.numpy_book import Net


@pytest.fixture(scope="module")
def bundled():
    return data.load_bundled(1000, 500)


# The references below train and score one model at a time; compiled once per network (run eagerly, op by op, each
# new shape compiles dozens of small programs: most of a test's time).
_accuracy = jax.jit(model.accuracy, static_argnums=0)


def _jit_step(net, opt, **kw):
    """``train.train_step(net, ts, x, t, opt, key=key, **kw)`` compiled once."""
    return jax.jit(lambda ts, x, t, key=None: train.train_step(net, ts, x, t, opt, key=key, **kw))


def test_seed_keys_are_the_documented_scheme():
    data_key, init_keys, dropout_key = grid.seed_keys(7, 3, 4)
    want_init, want_batches = reference_keys(7, 3, 4, 5, 6, 50)
    assert init_keys.shape == (3, 4)
    np.testing.assert_array_equal(jax.random.key_data(init_keys), jax.random.key_data(want_init))
    np.testing.assert_array_equal(np.asarray(jax.random.randint(data_key, (5, 6), 0, 50)), want_batches)
    want_dropout = jax.random.fold_in(jax.random.split(jax.random.key(7))[0], 1)
    np.testing.assert_array_equal(jax.random.key_data(dropout_key), jax.random.key_data(want_dropout))
    # a stream's keys do not depend on how many streams are drawn beside it
    np.testing.assert_array_equal(jax.random.key_data(grid.seed_keys(7, 1, 4)[1][0]),
                                  jax.random.key_data(init_keys[0]))


@pytest.fixture(scope="module")
def small_grid(bundled):
    """A 2 seeds x 2 scales grid of the two book arms, trained on 100 images (no held-out set)."""
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.02)}, num_records=3, batch_size=25, num_seeds=2, seed=3,
                          hidden_sizes=(8, 8), optimizer="momentum", keep_final=True)
    return cfg, grid.run_grid(cfg, bundled.x_train[:100], bundled.t_train[:100])


def test_vmapped_grid_equals_models_trained_alone(bundled, small_grid):
    cfg, result = small_grid
    x, t = bundled.x_train[:100], bundled.t_train[:100]
    assert result.metrics["train_accuracy"]["batchnorm"].shape == (2, 2, 3)
    opt = train.make_optimizer(cfg.optimizer, cfg.learning_rate)
    steps_at = grid.record_steps(cfg, 100)
    for s in range(2):
        init_keys, batch_idx = reference_keys(cfg.seed + s, 2, 2, steps_at[-1], 25, 100)
        for v, (name, use_bn) in enumerate((("batchnorm", True), ("plain", False))):
            net = model.MLPConfig(784, cfg.hidden_sizes, 10, norm=use_bn)
            step = _jit_step(net, opt)
            for i, scale in enumerate(cfg.axes["weight_scale"]):
                params, state = model.init(net, init_keys[v, i], weight_init=None,
                                           weight_scale=jnp.float32(scale))
                ts = train.train_state_init(params, state, opt)
                accs = []
                for u in range(steps_at[-1]):
                    _, ts = step(ts, x[batch_idx[u]], t[batch_idx[u]])
                    if u + 1 in steps_at:
                        accs.append(float(_accuracy(net, ts.params, ts.state, x, t)))
                np.testing.assert_allclose(result.metrics["train_accuracy"][name][s, i], accs, atol=1e-6)
                np.testing.assert_allclose(np.asarray(result.final[name].params.affine[0].W[s, i]),
                                           np.asarray(ts.params.affine[0].W), rtol=1e-4, atol=1e-6)


def _numpy_eval_loss(net: Net, x, t):
    """Mean cross-entropy in evaluation mode, from log-softmax (finite where softmax underflows to 0)."""
    with np.errstate(all="ignore"):
        scores = net.predict(x, False)
        z = scores - scores.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return -np.mean(log_p[np.arange(len(t)), t])


@pytest.mark.slow
def test_book_grid_matches_numpy_reference_float64(bundled):
    # 300 images, batch 30: 10 iterations per record, so 2 records = 11 updates (1 + 10).
    cfg = grid.GridConfig(axes={"weight_scale": (0.16, 0.05, 0.005)}, num_records=2, batch_size=30, dtype="float64",
                          seed=1, eval_batch_size=64, keep_final=True)
    x, t = bundled.x_train[:300].astype(np.float64), bundled.t_train[:300]
    xh, th = bundled.x_heldout[:77].astype(np.float64), bundled.t_heldout[:77]
    with x64():
        # eval_batch_size 64: both sets are scored in several padded batches.
        result = grid.run_grid(cfg, x, t, xh, th)
        init_keys, batch_idx = reference_keys(1, 2, 3, 11, 30, 300)
        inits = {name: [model.init(model.MLPConfig(norm=bn), init_keys[v, i], weight_init=None,
                                   weight_scale=jnp.float64(w), dtype=jnp.float64)[0]
                        for i, w in enumerate(cfg.axes["weight_scale"])]
                 for v, (name, bn) in enumerate((("batchnorm", True), ("plain", False)))}
        inits = jax.device_get(inits)
    metrics = result.metrics
    for name, use_bn in (("batchnorm", True), ("plain", False)):
        final = result.final[name]
        for i in range(3):
            net = Net([np.asarray(a.W) for a in inits[name][i].affine], use_bn)
            accs, losses, held = [], [], []
            with np.errstate(all="ignore"):
                for u in range(11):
                    net.sgd_step(x[batch_idx[u]], t[batch_idx[u]], cfg.learning_rate)
                    if u in (0, 10):
                        accs.append(net.accuracy(x, t))
                        losses.append(_numpy_eval_loss(net, x, t))
                        held.append((net.accuracy(xh, th), _numpy_eval_loss(net, xh, th)))
            np.testing.assert_allclose(metrics["train_accuracy"][name][0, i], accs, atol=1e-12)
            np.testing.assert_allclose(metrics["train_loss"][name][0, i], losses, rtol=1e-9)
            np.testing.assert_allclose(metrics["heldout_accuracy"][name][0, i], [h[0] for h in held], atol=1e-12)
            np.testing.assert_allclose(metrics["heldout_loss"][name][0, i], [h[1] for h in held], rtol=1e-9)
            for a_ref, a in zip(net.affines, final.params.affine):
                np.testing.assert_allclose(np.asarray(a.W[0, i]), a_ref.W, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(a.b[0, i]), a_ref.b, rtol=1e-8, atol=1e-10)
            for bn_ref, p, s in zip(net.bns, final.params.batch_norm, final.state.batch_norm):
                np.testing.assert_allclose(np.asarray(p.gamma[0, i]), bn_ref.gamma, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(s.mean[0, i]), bn_ref.running_mean, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(s.var[0, i]), bn_ref.running_var, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_vmapped_learning_rate_and_weight_decay_equal_models_trained_alone_float64(bundled):
    """A grid weight_scale x learning_rate x weight_decay: every model against the NumPy network."""
    lrs, decays, scales = (0.3, 0.03), (0.0, 0.2, 0.05), (0.1, 0.04)
    cfg = grid.GridConfig(axes={"learning_rate": lrs, "weight_decay": decays, "weight_scale": scales},
                          num_records=2, batch_size=20, hidden_sizes=(12, 9), dtype="float64", seed=5,
                          keep_final=True)
    x, t = bundled.x_train[:80].astype(np.float64), bundled.t_train[:80]
    with x64():
        result = grid.run_grid(cfg, x, t)
        init_keys, batch_idx = reference_keys(5, 2, 2, 5, 20, 80)
        inits = jax.device_get({
            (name, j): model.init(cfg.network(arm, 784), init_keys[v, j], weight_init=None,
                                  weight_scale=jnp.float64(w), dtype=jnp.float64)[0]
            for v, (name, arm) in enumerate(cfg.arms.items()) for j, w in enumerate(scales)})
    assert result.metrics["train_accuracy"]["plain"].shape == (1, 2, 3, 2, 2)
    for name, arm in cfg.arms.items():
        for a, lr in enumerate(lrs):
            for b, lam in enumerate(decays):
                for c, _ in enumerate(scales):
                    net = Net([np.asarray(p.W) for p in inits[(name, c)].affine], arm.norm is not None,
                              weight_decay_lambda=lam)
                    with np.errstate(all="ignore"):
                        for u in range(5):
                            net.sgd_step(x[batch_idx[u]], t[batch_idx[u]], lr)
                    np.testing.assert_allclose(result.metrics["train_accuracy"][name][0, a, b, c, -1],
                                               net.accuracy(x, t), atol=1e-12)
                    np.testing.assert_allclose(result.metrics["train_loss"][name][0, a, b, c, -1],
                                               _numpy_eval_loss(net, x, t), rtol=1e-9)
                    for ref, got in zip(net.affines, result.final[name].params.affine):
                        np.testing.assert_allclose(got.W[0, a, b, c], ref.W, rtol=1e-8, atol=1e-11)


@pytest.mark.slow
def test_arms_as_a_dict_equal_one_arm_runs(bundled):
    arms = {
        "plain": grid.Arm(),
        "batchnorm": grid.Arm(norm=True),
        "dropout": grid.Arm(dropout_ratio=0.3, dropout_inverted=False),
    }
    base = grid.GridConfig(arms=arms, axes={"weight_scale": (0.2, 0.05)}, num_records=3, batch_size=50,
                           hidden_sizes=(24, 24), num_seeds=2, seed=7, keep_final=True)
    x, t, xh, th = bundled.x_train[:200], bundled.t_train[:200], bundled.x_heldout[:50], bundled.t_heldout[:50]
    together = grid.run_grid(base, x, t, xh, th)
    assert list(together.metrics["train_accuracy"]) == list(arms) == list(together.diverged)
    for position, (name, arm) in enumerate(arms.items()):
        alone = grid.run_grid(base.replace(arms={name: arm._replace(init_stream=position)}), x, t, xh, th)
        for metric in together.metrics:
            np.testing.assert_allclose(alone.metrics[metric][name], together.metrics[metric][name], atol=1e-6)
        np.testing.assert_allclose(alone.final[name].params.affine[0].W, together.final[name].params.affine[0].W,
                                   rtol=1e-5, atol=1e-7)
    # Each arm draws its own weights by default; a shared stream pairs two arms' initial weights.
    w = {name: together.final[name].params.affine[2].W for name in arms}
    assert not np.allclose(w["plain"], w["dropout"], atol=1e-3)
    # (the initial weights themselves: init_models is what run_grid starts from, see
    # test_init_models_are_the_models_run_grid_starts_from)
    paired = grid.init_models(base.replace(arms={"plain": arms["plain"], "dropout": arms["dropout"]._replace(
        init_stream=0)}))
    np.testing.assert_allclose(paired["plain"].params.affine[2].W, paired["dropout"].params.affine[2].W, rtol=1e-6)


@pytest.mark.slow
def test_each_arm_equals_a_model_trained_alone_with_its_structure(bundled):
    """Dropout (book style) and He/sigmoid arms trained by hand with the engine's keys and dropout keys."""
    arms = {"dropout": grid.Arm(dropout_ratio=0.3, dropout_inverted=False),
            "he_sigmoid": grid.Arm(norm=True, activation="sigmoid", weight_init="he")}
    cfg = grid.GridConfig(arms=arms, axes={"weight_scale": (0.5,)}, num_records=2, batch_size=40,
                          hidden_sizes=(20,), seed=11, keep_final=True)
    x, t = bundled.x_train[:120], bundled.t_train[:120]
    result = grid.run_grid(cfg, x, t)
    init_keys, batch_idx = reference_keys(11, 2, 1, 4, 40, 120)
    dropout_key = jax.random.fold_in(jax.random.split(jax.random.key(11))[0], 1)
    opt = optax.sgd(0.01)
    for a, (name, arm) in enumerate(arms.items()):
        net = cfg.network(arm, 784)
        # the book's std 0.5, or He's per-layer std times 0.5 (multiplied here, after the draw)
        if arm.weight_init:
            params, state = model.init(net, init_keys[a, 0], weight_init=arm.weight_init, weight_scale=1.0)
        else:
            params, state = model.init(net, init_keys[a, 0], weight_init=None, weight_scale=0.5)
        if arm.weight_init:
            params = params._replace(affine=tuple(p._replace(W=p.W * 0.5) for p in params.affine))
        ts = train.train_state_init(params, state, opt)
        step = _jit_step(net, opt)
        for u in range(4):
            _, ts = step(ts, x[batch_idx[u]], t[batch_idx[u]], key=jax.random.fold_in(dropout_key, u))
        np.testing.assert_allclose(result.final[name].params.affine[1].W[0, 0], ts.params.affine[1].W,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.metrics["train_accuracy"][name][0, 0, -1],
                                   _accuracy(net, ts.params, ts.state, x, t), atol=1e-6)


@pytest.mark.slow
def test_book_qualitative_result_on_bundled_data(bundled):
    cfg = grid.GridConfig()
    result = grid.run_grid(cfg, bundled.x_train, bundled.t_train)
    bn = result.metrics["train_accuracy"]["batchnorm"][0, :, -1]
    plain = result.metrics["train_accuracy"]["plain"][0, :, -1]
    assert np.sum(bn > plain) >= 13, (bn, plain)
    assert result.diverged["plain"][0, :2].all()
    assert not result.diverged["batchnorm"].any()
    shares = np.bincount(bundled.t_train, minlength=10) / len(bundled.t_train)
    small = np.asarray(cfg.axes["weight_scale"]) <= 0.05
    for acc in plain[small]:
        assert np.isclose(shares, acc, atol=1e-6).any(), f"plain accuracy {acc} is not a class share {shares}"
    # A diverged net is scored as the book scores NaN rows: class 0's share; its loss is not a number.
    np.testing.assert_allclose(plain[:2], shares[0], atol=1e-6)
    assert np.all(np.isnan(result.metrics["train_loss"]["plain"][0, :2, -1]))
    assert np.all(np.isfinite(bn))
    # A net predicting one class c has a loss of at least -log(max softmax) >= 0; BN at w=0.01 learns.
    assert result.metrics["train_loss"]["batchnorm"][0, 10, -1] < result.metrics["train_loss"]["batchnorm"][0, 10, 0]


@pytest.mark.slow
def test_same_seed_same_result_and_seed_i_equals_a_run_at_seed_plus_i(bundled):
    cfg = grid.GridConfig(axes={"weight_scale": (0.1, 0.01)}, num_records=2, hidden_sizes=(32,), keep_final=True)
    x, t = bundled.x_train, bundled.t_train
    a = grid.run_grid(cfg, x, t).metrics["train_accuracy"]
    b = grid.run_grid(cfg, x, t).metrics["train_accuracy"]
    c = grid.run_grid(cfg.replace(seed=1), x, t)
    np.testing.assert_array_equal(a["batchnorm"], b["batchnorm"])
    assert not np.array_equal(a["batchnorm"], c.metrics["train_accuracy"]["batchnorm"])
    multi = grid.run_grid(cfg.replace(num_seeds=3), x, t)
    for name in ("batchnorm", "plain"):
        np.testing.assert_array_equal(multi.metrics["train_accuracy"][name][1], c.metrics["train_accuracy"][name][0])
        np.testing.assert_array_equal(multi.metrics["train_accuracy"][name][0], a[name][0])
        np.testing.assert_allclose(multi.final[name].params.affine[0].W[1], c.final[name].params.affine[0].W[0],
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_models_differing_only_in_learning_rate_share_initial_weights(bundled):
    cfg = grid.GridConfig(axes={"weight_scale": (0.1, 0.05), "learning_rate": (1e-9, 0.5)}, num_records=1,
                          hidden_sizes=(8,), keep_final=True)
    result = grid.run_grid(cfg, bundled.x_train[:100], bundled.t_train[:100])
    w = result.final["plain"].params.affine[0].W  # [seeds, scales, lrs, 784, 8]
    init_keys, _ = reference_keys(0, 2, 2, 1, 1, 1)
    for j, scale in enumerate((0.1, 0.05)):
        w0 = model.init(cfg.network(cfg.arms["plain"], 784), init_keys[1, j], weight_init=None,
                        weight_scale=jnp.float32(scale))[0].affine[0].W
        np.testing.assert_allclose(w[0, j, 0], w0, rtol=1e-6, atol=1e-9)  # lr 1e-9: one step barely moves it
        assert not np.allclose(w[0, j, 1], w0)


@pytest.mark.slow
def test_chunked_run_equals_one_chunk(bundled):
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1, 0.05, 0.02, 0.01), "learning_rate": (0.01, 0.03)},
                          num_records=2, hidden_sizes=(16, 16), num_seeds=3, keep_final=True)
    x, t, xh, th = bundled.x_train[:300], bundled.t_train[:300], bundled.x_heldout[:100], bundled.t_heldout[:100]
    two = jax.devices()[:2]  # a chunk holds at least one model per device
    one = grid.run_grid(cfg, x, t, xh, th, devices=two)
    progress = []
    many = grid.run_grid(cfg.replace(max_models_per_chunk=8), x, t, xh, th, devices=two,
                         progress=lambda d, n: progress.append((d, n)))
    assert one.layout["num_chunks"] == 1 and many.layout["num_chunks"] >= 4
    assert many.layout["models_per_chunk"] <= 8
    total = many.layout["num_chunks"] * 2
    assert progress == [(i, total) for i in range(total + 1)]
    for metric in one.metrics:
        for arm in cfg.arms:
            np.testing.assert_allclose(many.metrics[metric][arm], one.metrics[metric][arm], atol=1e-4, rtol=1e-4)
    for arm in cfg.arms:
        np.testing.assert_array_equal(many.diverged[arm], one.diverged[arm])
        for leaf_one, leaf_many in zip(jax.tree_util.tree_leaves(one.final[arm]),
                                       jax.tree_util.tree_leaves(many.final[arm])):
            assert leaf_one.shape == leaf_many.shape
            np.testing.assert_allclose(leaf_many, leaf_one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_one_device_is_unchanged_and_several_devices_are_really_used(bundled):
    if jax.device_count() < 3:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    cfg = grid.GridConfig(axes={"weight_scale": (0.3, 0.1, 0.03, 0.01, 0.005)}, num_records=2,
                          hidden_sizes=(24, 24), num_seeds=2, keep_final=True)
    x, t = bundled.x_train, bundled.t_train
    one = grid.run_grid(cfg, x, t, devices=jax.devices()[:1])
    three = grid.run_grid(cfg, x, t, devices=jax.devices()[:3])
    assert one.layout["devices_used"] == 1 and three.layout["devices_used"] == 3
    assert three.layout["padded_models"] > 0  # 5 scales x 2 seeds do not divide 3 devices ...
    for name in ("batchnorm", "plain"):  # ... and no padded model shows
        assert three.metrics["train_accuracy"][name].shape == (2, 5, 2)
        assert three.final[name].params.affine[1].W.shape == (2, 5, 24, 24)
        np.testing.assert_allclose(three.metrics["train_accuracy"][name], one.metrics["train_accuracy"][name],
                                   atol=1e-4)
        np.testing.assert_allclose(three.final[name].params.affine[1].W, one.final[name].params.affine[1].W,
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_heldout_accuracy_and_progress(heldout_grid):
    cfg, result, seen = heldout_grid
    assert seen == [(0, 2), (1, 2), (2, 2)]  # one chunk of 2 records
    held = result.metrics["heldout_accuracy"]
    assert held["plain"].shape == (2, 2, 2)  # [seeds, scales, records]
    assert np.all((held["batchnorm"] >= 0) & (held["batchnorm"] <= 1))
    assert "heldout_loss" in result.metrics


@pytest.mark.slow
def test_init_models_are_the_models_run_grid_starts_from(bundled):
    config = grid.GridConfig(num_seeds=2, axes={"weight_scale": (0.3, 0.01), "learning_rate": (1e-30, 1e-30)},
                             num_records=1, keep_final=True)
    start = grid.init_models(config)
    # one update at lr 1e-30 leaves the weights bit-identical in float32 (not the zero biases)
    result = grid.run_grid(config, bundled.x_train[:200], bundled.t_train[:200])
    for arm in config.arms:
        assert start[arm].params.affine[0].W.shape == (2, 2, 2, 784, 100)
        for a, b in zip(start[arm].params.affine, result.final[arm].params.affine):
            np.testing.assert_array_equal(a.W, b.W)
            np.testing.assert_array_equal(a.b, 0.0)
        np.testing.assert_allclose(start[arm].params.affine[1].W.std(axis=(-2, -1)).mean(axis=(0, 2)), [0.3, 0.01],
                                   rtol=0.02)
    assert not np.array_equal(start["batchnorm"].params.affine[0].W, start["plain"].params.affine[0].W)


@pytest.mark.slow
def test_an_arms_own_weight_scale_equals_the_scale_axis(bundled):
    x, t = bundled.x_train[:200], bundled.t_train[:200]
    base = dict(num_records=2, updates_per_record=3)
    by_axis = grid.run_grid(grid.GridConfig(arms={"bn": grid.Arm(norm=True, init_stream=0)},
                                              axes={"weight_scale": (0.16,)}, **base), x, t)
    by_arm = grid.run_grid(grid.GridConfig(
        arms={"bn": grid.Arm(norm=True, weight_init=0.16, init_stream=0),
              "bn_small": grid.Arm(norm=True, weight_init=0.01, init_stream=0)},
        axes={}, weight_scale=1.0, **base), x, t)
    np.testing.assert_array_equal(by_axis.metrics["train_loss"]["bn"][:, 0], by_arm.metrics["train_loss"]["bn"])
    assert not np.array_equal(by_arm.metrics["train_loss"]["bn"], by_arm.metrics["train_loss"]["bn_small"])
    start = grid.init_models(grid.GridConfig(arms={"s": grid.Arm(weight_init=0.05)}, axes={}, weight_scale=2.0))
    assert start["s"].params.affine[2].W.std() == pytest.approx(0.1, rel=0.05)  # 0.05 x weight_scale 2


# --------------------------------------------------------------------------------------------------
# Sampling, initial weights, recorded numbers and sharding checked from first principles: nothing below takes
# keys or batch indices from the engine; what a model saw is read back from its own weights.
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _loss_grad(net, params, state, x, t):
    return jax.grad(lambda p: model.loss(net, p, state, x, t, train=True)[0])(params)


def _batch_counts(net, before, after, x, t, lr, batch_size):
    """How often each training image was in the batch of one SGD update from ``before`` to ``after``.

    With one-hot images (image i is the unit vector e_i) only image i touches row i of the first weight matrix,
    and every copy of it in the batch adds the same gradient G_i to that row: ``dW0[i] = -lr / B * count_i * G_i``.
    ``G_i`` is image i's own gradient, i.e. row i of ``N *`` the gradient of the mean loss over all N images.
    """
    grads = _loss_grad(net, before.params, before.state, x, t)
    g = np.asarray(grads.affine[0].W, np.float64) * x.shape[0]  # [N, H]: row i is image i's gradient
    delta = np.asarray(after.params.affine[0].W, np.float64) - np.asarray(before.params.affine[0].W, np.float64)
    step = -lr / batch_size * g
    counts = np.sum(delta * step, axis=1) / np.sum(step * step, axis=1)
    np.testing.assert_allclose(counts, np.round(counts), atol=0.02)  # whole copies, nothing else moved a row
    return np.round(counts).astype(int)


def _model_at(ts, *index):
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf[index]), ts)


@pytest.mark.slow
def test_batches_are_drawn_with_replacement_and_change_every_step_and_seed():
    n, batch, lr = 1000, 100, 1.0
    x = np.eye(n, dtype=np.float32)
    t = (np.arange(n) * 7) % 10
    # Sigmoid: no unit is ever exactly off, so every image in a batch leaves a trace in its row of W0.
    cfg = grid.GridConfig(arms={"probe": grid.Arm(activation="sigmoid")}, axes={"weight_scale": (0.5, 0.2)},
                          num_records=1, updates_per_record=1, batch_size=batch, learning_rate=lr,
                          hidden_sizes=(6,), num_seeds=2, seed=3, keep_final=True)
    start = grid.init_models(cfg, n)["probe"]
    one = grid.run_grid(cfg, x, t).final["probe"]  # after update 1
    two = grid.run_grid(cfg.replace(num_records=2), x, t).final["probe"]  # after updates 1 and 2
    net = cfg.network(cfg.arms["probe"], n)
    counts = {}  # (seed, step) -> [N] copies of each image in that step's batch
    for s in range(2):
        for j in range(2):
            c1 = _batch_counts(net, _model_at(start, s, j), _model_at(one, s, j), x, t, lr, batch)
            c2 = _batch_counts(net, _model_at(one, s, j), _model_at(two, s, j), x, t, lr, batch)
            if j == 0:
                counts[s, 1], counts[s, 2] = c1, c2
            else:  # every model of a seed sees the same batches
                np.testing.assert_array_equal(c1, counts[s, 1])
                np.testing.assert_array_equal(c2, counts[s, 2])
    for c in counts.values():
        assert c.sum() == batch and c.min() >= 0
    drawn = np.concatenate([np.repeat(np.arange(n), c) for c in counts.values()])
    # 400 uniform draws from 0..999 all above 99 (or all below 900): probability 2 * 0.9**400 < 1e-18.
    assert drawn.min() < n // 10 and drawn.max() >= n - n // 10
    # With replacement, a batch of 100 from 1000 images has no repeated image with probability
    # prod_{k<100} (1 - k/1000) ~ 0.006, so all 4 batches lack one with probability ~1e-9; without
    # replacement none ever has one. The expected number of repeated draws per batch is 100 - 1000 (1 - 0.999**100).
    p_distinct = np.prod(1 - np.arange(batch) / n)
    assert p_distinct < 0.01 and p_distinct ** len(counts) < 1e-8
    repeats = sum(int(np.sum(np.maximum(c - 1, 0))) for c in counts.values())
    expected = len(counts) * (batch - n * (1 - (1 - 1 / n) ** batch))
    assert repeats > 0 and 0.3 * expected < repeats < 3 * expected, (repeats, expected)
    # A new batch at every step and for every seed (two batches of 100 from 1000 are equal with probability ~0).
    assert not np.array_equal(counts[0, 1], counts[0, 2]) and not np.array_equal(counts[1, 1], counts[1, 2])
    assert not np.array_equal(counts[0, 1], counts[1, 1]) and not np.array_equal(counts[0, 2], counts[1, 2])


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_accuracy(net, params, state, x, t):
    return model.apply(net, params, state, x, train=False)[0], model.accuracy(net, params, state, x, t)


def _eval_scores(net, ts, x, t):
    """Accuracy and mean cross-entropy of one model in evaluation mode, straight from bnjax.model."""
    logits, acc = _logits_and_accuracy(net, ts.params, ts.state, jnp.asarray(x), jnp.asarray(t))
    acc = float(acc)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return acc, float(-np.mean(np.asarray(logp)[np.arange(len(t)), t]))


@pytest.fixture(scope="module")
def heldout_grid(bundled):
    """Three arms, 2 seeds x 2 scales, with a held-out set; the progress calls it made."""
    x, t = bundled.x_train[:200], bundled.t_train[:200]
    xh, th = bundled.x_heldout[:150], bundled.t_heldout[:150]
    # the dropout arm starts from the plain arm's weights (stream 1): only dropout tells them apart
    arms = {"batchnorm": grid.Arm(norm=True), "plain": grid.Arm(),
            "dropout": grid.Arm(dropout_ratio=0.5, init_stream=1)}
    cfg = grid.GridConfig(arms=arms, axes={"weight_scale": (0.3, 1e-4)}, num_records=2, updates_per_record=3,
                          batch_size=50, hidden_sizes=(16, 16), num_seeds=2, seed=2, learning_rate=0.1,
                          eval_batch_size=64, keep_final=True)
    seen = []
    result = grid.run_grid(cfg, x, t, xh, th, progress=lambda done, total: seen.append((done, total)))
    return cfg, result, seen


@pytest.mark.slow
def test_recorded_metrics_are_the_final_models_scores_on_each_set(bundled, heldout_grid):
    """Every recorded number against ``model.accuracy`` of the returned final model on the set it names; a net
    predicting one class scores exactly that class's share, on each set its own share."""
    x, t = bundled.x_train[:200], bundled.t_train[:200]
    xh, th = bundled.x_heldout[:150], bundled.t_heldout[:150]
    cfg, result, _ = heldout_grid
    arms = cfg.arms
    sets = {"train": (x, t), "heldout": (xh, th)}
    for name, arm in arms.items():
        net = cfg.network(arm, 784)
        for s in range(2):
            for j in range(2):
                ts = _model_at(result.final[name], s, j)
                for split, (xs, ys) in sets.items():
                    acc, loss = _eval_scores(net, ts, xs, ys)
                    assert result.metrics[f"{split}_accuracy"][name][s, j, -1] == pytest.approx(acc, abs=1e-6)
                    assert result.metrics[f"{split}_loss"][name][s, j, -1] == pytest.approx(loss, rel=1e-4)
                    if name == "dropout":  # inverted dropout is the identity at evaluation
                        assert acc == _eval_scores(net._replace(dropout_ratio=0.0), ts, xs, ys)[0]
    w_plain, w_dropout = result.final["plain"].params.affine[1].W, result.final["dropout"].params.affine[1].W
    assert not np.allclose(w_plain[:, 0], w_dropout[:, 0], rtol=1e-3)  # dropout changed the updates
    # The sets really differ: the held-out numbers are not the training numbers.
    assert not np.allclose(result.metrics["heldout_loss"]["batchnorm"], result.metrics["train_loss"]["batchnorm"])
    shares = {split: np.bincount(ys, minlength=10) / len(ys) for split, (_, ys) in sets.items()}
    assert not np.allclose(shares["train"], shares["heldout"])
    for s in range(2):  # the plain net at scale 1e-4 predicts a single class c, on both sets
        for r in range(2):
            train_acc = result.metrics["train_accuracy"]["plain"][s, 1, r]
            held_acc = result.metrics["heldout_accuracy"]["plain"][s, 1, r]
            classes = [c for c in range(10) if abs(train_acc - shares["train"][c]) < 1e-6
                       and abs(held_acc - shares["heldout"][c]) < 1e-6]
            assert classes, (train_acc, held_acc, shares)


@pytest.mark.slow
def test_book_arms_return_each_sets_own_accuracy(bundled, heldout_grid, small_grid):
    x, t, xh, th = bundled.x_train[:200], bundled.t_train[:200], bundled.x_heldout[:150], bundled.t_heldout[:150]
    cfg, result, _ = heldout_grid
    metrics = result.metrics
    for name, use_bn in (("batchnorm", True), ("plain", False)):
        net = model.MLPConfig(784, cfg.hidden_sizes, 10, norm=use_bn)
        for j in range(2):
            ts = _model_at(result.final[name], 0, j)
            assert metrics["train_accuracy"][name][0, j, -1] == pytest.approx(_eval_scores(net, ts, x, t)[0],
                                                                              abs=1e-6)
            assert metrics["heldout_accuracy"][name][0, j, -1] == pytest.approx(_eval_scores(net, ts, xh, th)[0],
                                                                                abs=1e-6)
    # without a held-out set: the training numbers only
    assert set(small_grid[1].metrics) == {"train_accuracy", "train_loss"}


@pytest.mark.slow
def test_each_device_holds_its_own_block_of_models(bundled, monkeypatch):
    """The trained models are split over the ('seeds', 'grid') mesh, one block per device, not replicated."""
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    captured = []
    to_host = driver._to_host

    def spy(tree):  # the device arrays on their way to the host
        captured.append(tree)
        return to_host(tree)

    monkeypatch.setattr(driver, "_to_host", spy)
    devices = jax.devices()[:4]
    # 2 seeds x 4 scales on 4 devices: a 2 x 2 mesh, each device one seed x two scales.
    cfg = grid.GridConfig(axes={"weight_scale": (0.2, 0.1, 0.05, 0.02)}, num_seeds=2, num_records=1,
                          hidden_sizes=(8,), keep_final=True)
    result = grid.run_grid(cfg, bundled.x_train[:100], bundled.t_train[:100], devices=devices)
    assert result.layout["mesh_shape"] == (2, 2) and result.layout["devices_used"] == 4
    assert (result.layout["seed_block"], result.layout["grid_block"]) == (2, 4)
    mesh = np.asarray(devices).reshape(2, 2)
    models = [tree for tree in captured if isinstance(tree, dict) and set(tree) == set(cfg.arms)
              and isinstance(next(iter(tree.values())), train.TrainState)]
    assert len(models) == 1
    for arm, ts in models[0].items():
        leaves = jax.tree_util.tree_leaves(ts.params)
        assert leaves
        for leaf in leaves:
            assert leaf.shape[:2] == (2, 4)
            shards = leaf.addressable_shards
            assert sorted(s.device.id for s in shards) == sorted(d.id for d in devices)
            for shard in shards:
                assert shard.data.shape == (1, 2, *leaf.shape[2:]), (arm, shard.data.shape)
                i, j = [int(v) for v in np.argwhere(mesh == shard.device)[0]]
                assert shard.index[:2] == (slice(i, i + 1), slice(2 * j, 2 * j + 2))
    # and the numbers are those of one device
    one = grid.run_grid(cfg, bundled.x_train[:100], bundled.t_train[:100], devices=devices[:1])
    for arm in cfg.arms:
        np.testing.assert_allclose(result.metrics["train_loss"][arm], one.metrics["train_loss"][arm], rtol=1e-5)
        np.testing.assert_allclose(result.final[arm].params.affine[0].W, one.final[arm].params.affine[0].W,
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_init_models_follow_the_seed_and_each_arm_draws_its_own_weights():
    cfg = grid.GridConfig(axes={"weight_scale": (0.5, 0.1)}, hidden_sizes=(6,), seed=5, num_seeds=2)
    start = grid.init_models(cfg, 20)
    init_keys = {s: reference_keys(s, 2, 2, 1, 1, 1)[0] for s in (5, 6)}
    for v, (name, arm) in enumerate(cfg.arms.items()):
        net = cfg.network(arm, 20)
        for s in range(2):
            for j, scale in enumerate((0.5, 0.1)):
                params, _ = model.init(net, init_keys[5 + s][v, j], weight_init=None,
                                       weight_scale=jnp.float32(scale))
                for got, want in zip(start[name].params.affine, params.affine):
                    np.testing.assert_allclose(got.W[s, j], want.W, rtol=1e-6)
    w = {name: start[name].params.affine[0].W for name in cfg.arms}
    # BN and plain nets draw their own weights; each seed and each scale too (not just a rescaled copy).
    assert np.corrcoef(w["batchnorm"].ravel(), w["plain"].ravel())[0, 1] < 0.2
    assert np.corrcoef(w["plain"][0, 0].ravel(), w["plain"][1, 0].ravel())[0, 1] < 0.5
    assert np.corrcoef(w["plain"][0, 0].ravel(), w["plain"][0, 1].ravel())[0, 1] < 0.5


@pytest.mark.slow
def test_fixed_hyper_parameters_and_batch_norm_conventions_reach_every_model(bundled):
    """Values without an axis (learning rate, weight decay, the grid's bn_momentum over the norm's own) and the
    norm's eps against one model trained by hand with the same keys and batches."""
    arm = grid.Arm(norm=layers.batch_norm(momentum=0.7, eps=1e-2, init_var=0.0))
    cfg = grid.GridConfig(arms={"bn": arm}, axes={"weight_scale": (0.3,)},
                          learning_rate=0.2, weight_decay=0.05, bn_momentum=0.5, num_records=2,
                          updates_per_record=2, batch_size=40, hidden_sizes=(10,), seed=9, keep_final=True)
    x, t = bundled.x_train[:120], bundled.t_train[:120]
    result = grid.run_grid(cfg, x, t)
    init_keys, batch_idx = reference_keys(9, 1, 1, 3, 40, 120)
    net = model.MLPConfig(784, (10,), 10, norm=layers.batch_norm(momentum=0.5, eps=1e-2, init_var=0.0))
    params, state = model.init(net, init_keys[0, 0], weight_init=None, weight_scale=jnp.float32(0.3))
    opt = optax.sgd(0.2)
    ts = train.train_state_init(params, state, opt)
    step = _jit_step(net, opt, weight_decay=0.05)
    for u in range(3):
        _, ts = step(ts, x[batch_idx[u]], t[batch_idx[u]])
    got = _model_at(result.final["bn"], 0, 0)
    np.testing.assert_allclose(got.params.affine[0].W, ts.params.affine[0].W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.state.batch_norm[0].mean, ts.state.batch_norm[0].mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.state.batch_norm[0].var, ts.state.batch_norm[0].var, rtol=1e-4, atol=1e-6)
    assert result.metrics["train_loss"]["bn"][0, 0, -1] == pytest.approx(_eval_scores(net, ts, x, t)[1], rel=1e-4)


@pytest.mark.slow
def test_norm_values_and_an_arms_own_batch_size_and_lr_scale_equal_models_trained_alone(bundled):
    """Arms with a norm value, a batch size and a learning-rate scale of their own, trained by hand: an arm of
    batch size B != the grid's draws ``randint(fold_in(fold_in(data_key, 2), B), ...)`` and makes N // B updates
    per record; arms of the grid's size share its batches."""
    arms = {"bn": grid.Arm(norm=True),
            "renorm10": grid.Arm(norm=layers.batch_renorm(r_max=2.0, d_max=1.0), batch_size=10,
                                 learning_rate_scale=0.25),
            "ghost8": grid.Arm(norm=layers.ghost_batch_norm(8)),
            "bn_value": grid.Arm(norm=layers.batch_norm(0.9, 1e-6, init_var=0.0), batch_size=40, init_stream=0)}
    cfg = grid.GridConfig(arms=arms, axes={"weight_scale": (0.3,)}, num_records=3, batch_size=40, learning_rate=0.2,
                          hidden_sizes=(20, 15), seed=5, keep_final=True)
    x, t = bundled.x_train[:120], bundled.t_train[:120]
    result = grid.run_grid(cfg, x, t)
    np.testing.assert_array_equal(result.arm_record_steps["renorm10"], [1, 13, 25])
    np.testing.assert_array_equal(result.arm_record_steps["bn"], [1, 4, 7])
    np.testing.assert_array_equal(result.record_steps, [1, 4, 7])
    data_key, init_key = jax.random.split(jax.random.key(5))
    init_keys = jax.random.split(init_key, (3, 1))
    own = np.asarray(jax.random.randint(jax.random.fold_in(jax.random.fold_in(data_key, 2), 10), (25, 10), 0, 120))
    shared = np.asarray(jax.random.randint(data_key, (7, 40), 0, 120))
    for a, (name, arm), batches, lr in ((0, ("bn", arms["bn"]), shared, 0.2),
                                        (1, ("renorm10", arms["renorm10"]), own, 0.05),
                                        (2, ("ghost8", arms["ghost8"]), shared, 0.2)):
        net = cfg.network(arm, 784)
        opt = optax.sgd(lr)
        params, state = model.init(net, init_keys[a, 0], weight_init=None, weight_scale=0.3)
        ts = train.train_state_init(params, state, opt)
        step = _jit_step(net, opt)
        for u in range(len(batches)):
            _, ts = step(ts, x[batches[u]], t[batches[u]])
        np.testing.assert_allclose(result.final[name].params.affine[1].W[0, 0], ts.params.affine[1].W,
                                   rtol=1e-4, atol=1e-6)
        for got, want in zip(jax.tree_util.tree_leaves(result.final[name].state),
                             jax.tree_util.tree_leaves(ts.state)):
            np.testing.assert_allclose(np.asarray(got)[0, 0], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(result.metrics["train_accuracy"][name][0, 0, -1],
                                   _accuracy(net, ts.params, ts.state, x, t), atol=1e-6)
    assert int(result.final["renorm10"].state.batch_norm[0].step[0, 0]) == 25
    # a norm value equal to the boolean's, with the grid's batch size given explicitly: the same program
    for m in ("train_accuracy", "train_loss"):
        np.testing.assert_array_equal(result.metrics[m]["bn_value"], result.metrics[m]["bn"])
    assert grid.grid_flops(cfg, 120, 784)["train"] == (
        3 * 7 * model.num_flops([784, 20, 15, 10], 40, backward=True)
        + 25 * model.num_flops([784, 20, 15, 10], 10, backward=True))
