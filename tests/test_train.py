"""The sweep: equal to models trained one by one, to the NumPy reference, and to the book's qualitative result."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import data, model, train
from conftest import x64
from experiments.numpy_book import Net


@pytest.fixture(scope="module")
def bundled():
    return data.load_bundled(1000, 500)


def test_book_protocol_counts():
    cfg = train.SweepConfig()
    assert len(cfg.weight_scales) == 16 and cfg.weight_scales[0] == 1.0
    assert cfg.weight_scales[-1] == pytest.approx(1e-4)
    assert train.num_updates(cfg, 1000) == 191
    np.testing.assert_array_equal(train.record_steps(cfg, 1000), 1 + 10 * np.arange(20))
    assert train.num_updates(cfg._replace(num_records=1), 1000) == 1
    assert train.num_updates(cfg, 50) == 20  # fewer images than a batch: one iteration per record


def test_vmapped_sweep_equals_models_trained_alone(bundled):
    cfg = train.SweepConfig(weight_scales=(0.3, 0.02), num_records=3, batch_size=25, num_seeds=2, seed=3,
                            hidden_sizes=(16, 16), optimizer="momentum")
    x, t = bundled.x_train[:100], bundled.t_train[:100]
    result = train.run_sweep(cfg, x, t)
    assert result.train_accuracy["batchnorm"].shape == (2, 2, 3)

    _, init_keys = train.sweep_keys(cfg)
    batch_idx = np.asarray(train.sweep_batch_indices(cfg, 100))
    opt = train.make_optimizer(cfg.optimizer, cfg.learning_rate)
    step = jax.jit(functools.partial(train.train_step, optimizer=opt))
    steps_at = train.record_steps(cfg, 100)
    for s in range(2):
        for v, (name, use_bn) in enumerate((("batchnorm", True), ("plain", False))):
            for i, scale in enumerate(cfg.weight_scales):
                params, state = model.init(init_keys[s, v, i], 784, cfg.hidden_sizes, 10, jnp.float32(scale),
                                           use_batchnorm=use_bn)
                ts = train.train_state_init(params, state, opt)
                accs = []
                for u in range(steps_at[-1]):
                    ts, _ = step(ts, x[batch_idx[s, u]], t[batch_idx[s, u]])
                    if u + 1 in steps_at:
                        accs.append(float(model.accuracy(ts.params, ts.state, x, t)))
                np.testing.assert_allclose(result.train_accuracy[name][s, i], accs, atol=1e-6)
                final = getattr(result.final, name)
                np.testing.assert_allclose(
                    np.asarray(final.params.affine[0].W[s, i]), np.asarray(ts.params.affine[0].W),
                    rtol=1e-4, atol=1e-6,
                )


def test_sweep_matches_numpy_reference_float64(bundled):
    # 300 images, batch 30: 10 iterations per record, so 2 records = 11 updates (1 + 10).
    cfg = train.SweepConfig(weight_scales=(0.16, 0.05, 0.005), num_records=2, batch_size=30, dtype="float64",
                            seed=1)
    x, t = bundled.x_train[:300].astype(np.float64), bundled.t_train[:300]
    with x64():
        result = train.run_sweep(cfg, x, t)
        # To NumPy while float64 is on: older JAX cannot index float64 arrays once x64 is off again.
        final_all = jax.device_get(result.final)
        carry0 = jax.device_get(train.sweep_init(cfg, 784))
        batch_idx = np.asarray(train.sweep_batch_indices(cfg, 300))[0]
    assert batch_idx.shape == (11, 30)
    for name, use_bn in (("batchnorm", True), ("plain", False)):
        init = getattr(carry0, name).params
        final = getattr(final_all, name)
        for i in range(3):
            net = Net([np.asarray(a.W[0, i]) for a in init.affine], use_bn)
            accs = []
            with np.errstate(all="ignore"):
                for u in range(11):
                    net.sgd_step(x[batch_idx[u]], t[batch_idx[u]], cfg.learning_rate)
                    if u in (0, 10):
                        accs.append(net.accuracy(x, t))
            np.testing.assert_allclose(result.train_accuracy[name][0, i], accs, atol=1e-12)
            for a_ref, a in zip(net.affines, final.params.affine):
                np.testing.assert_allclose(np.asarray(a.W[0, i]), a_ref.W, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(a.b[0, i]), a_ref.b, rtol=1e-8, atol=1e-10)
            for bn_ref, p, s in zip(net.bns, final.params.batch_norm, final.state.batch_norm):
                np.testing.assert_allclose(np.asarray(p.gamma[0, i]), bn_ref.gamma, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(s.mean[0, i]), bn_ref.running_mean, rtol=1e-8, atol=1e-10)
                np.testing.assert_allclose(np.asarray(s.var[0, i]), bn_ref.running_var, rtol=1e-8, atol=1e-10)


def test_book_qualitative_result_on_bundled_data(bundled):
    cfg = train.SweepConfig()
    result = train.run_sweep(cfg, bundled.x_train, bundled.t_train)
    bn = result.train_accuracy["batchnorm"][0, :, -1]
    plain = result.train_accuracy["plain"][0, :, -1]
    assert np.sum(bn > plain) >= 13, (bn, plain)
    assert result.diverged["plain"][0, :2].all()
    assert not result.diverged["batchnorm"].any()
    shares = np.bincount(bundled.t_train, minlength=10) / len(bundled.t_train)
    small = np.asarray(cfg.weight_scales) <= 0.05
    for acc in plain[small]:
        assert np.isclose(shares, acc, atol=1e-6).any(), f"plain accuracy {acc} is not a class share {shares}"
    # A diverged net is scored as the book scores NaN rows: class 0's share.
    np.testing.assert_allclose(plain[:2], shares[0], atol=1e-6)
    assert np.all(np.isfinite(bn))


def test_same_seed_same_result_and_other_seed_differs(bundled):
    cfg = train.SweepConfig(weight_scales=(0.1, 0.01), num_records=2, hidden_sizes=(32,))
    x, t = bundled.x_train, bundled.t_train
    a = train.run_sweep(cfg, x, t).train_accuracy["batchnorm"]
    b = train.run_sweep(cfg, x, t).train_accuracy["batchnorm"]
    c = train.run_sweep(cfg._replace(seed=1), x, t).train_accuracy["batchnorm"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Seed i of a multi-seed run equals a single-seed run started at seed + i.
    multi = train.run_sweep(cfg._replace(num_seeds=2), x, t).train_accuracy["batchnorm"]
    np.testing.assert_array_equal(multi[1], c[0])


def test_heldout_accuracy_and_progress(bundled):
    cfg = train.SweepConfig(weight_scales=(0.05,), num_records=3, hidden_sizes=(20,))
    seen = []
    result = train.run_sweep(cfg, bundled.x_train, bundled.t_train, bundled.x_heldout, bundled.t_heldout,
                             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert result.heldout_accuracy["plain"].shape == (1, 1, 3)
    assert np.all((result.heldout_accuracy["batchnorm"] >= 0) & (result.heldout_accuracy["batchnorm"] <= 1))


@pytest.mark.parametrize("name", sorted(train.OPTIMIZERS))
def test_every_optimizer_lowers_the_loss(name, bundled):
    opt = train.make_optimizer(name, 0.01)
    params, state = model.init(jax.random.key(0), 784, [32], 10, "he", use_batchnorm=True)
    ts = train.train_state_init(params, state, opt)
    x, t = jnp.asarray(bundled.x_train[:200]), jnp.asarray(bundled.t_train[:200])
    step = jax.jit(functools.partial(train.train_step, optimizer=opt))
    first = None
    for _ in range(20):
        ts, value = step(ts, x, t)
        first = float(value) if first is None else first
    assert float(value) < first


def test_bad_config_rejected(bundled):
    x, t = bundled.x_train[:10], bundled.t_train[:10]
    with pytest.raises(ValueError, match="unknown optimizer"):
        train.run_sweep(train.SweepConfig(optimizer="sgdd"), x, t)
    with pytest.raises(ValueError, match="weight_scales"):
        train.run_sweep(train.SweepConfig(weight_scales=(0.1, -1.0)), x, t)
    with pytest.raises(ValueError, match="t_train"):
        train.run_sweep(train.SweepConfig(), x, t[:5])


def test_flop_count_of_default_sweep():
    flops = train.sweep_flops(train.SweepConfig(), 1000, 784)
    # ~342 GFLOP training + ~153 GFLOP evaluation (the issue's own count).
    assert flops["train"] == pytest.approx(342e9, rel=0.01)
    assert flops["eval"] == pytest.approx(153e9, rel=0.01)


def test_scales_spread_over_devices_equal_one_device(bundled):
    if jax.device_count() < 4:
        pytest.skip("needs several devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    cfg = train.SweepConfig(weight_scales=(0.3, 0.1, 0.03, 0.01), num_records=2, hidden_sizes=(24, 24),
                            num_seeds=2)
    x, t = bundled.x_train, bundled.t_train
    one = train.run_sweep(cfg, x, t, devices=jax.devices()[:1])
    many = train.run_sweep(cfg, x, t, devices=jax.devices()[:4])
    assert len(many.final.batchnorm.params.affine[0].W.sharding.device_set) == 4
    for name in ("batchnorm", "plain"):
        np.testing.assert_allclose(many.train_accuracy[name], one.train_accuracy[name], atol=2e-3)
        np.testing.assert_allclose(np.asarray(getattr(many.final, name).params.affine[1].W),
                                   np.asarray(getattr(one.final, name).params.affine[1].W), rtol=1e-4, atol=1e-5)
