"""bnjax.train: the optimizers by name and the pure train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import data, layers, model, options, train
from conftest import x64
from experiments.numpy_book import Net


@pytest.fixture(scope="module")
def bundled():
    return data.load_bundled(1000, 500)


# Each optimizer is its own compiled step (~1 s): the quick tier keeps plain SGD.
@pytest.mark.parametrize("name", [n if n == "sgd" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(train.OPTIMIZERS)])
def test_every_optimizer_lowers_the_loss(name, bundled):
    opt = train.make_optimizer(name, 0.01)
    net = model.MLPConfig(784, (32,), 10, norm=True)
    params, state = model.init(net, jax.random.key(0), weight_init="he")
    ts = train.train_state_init(params, state, opt)
    x, t = jnp.asarray(bundled.x_train[:200]), jnp.asarray(bundled.t_train[:200])
    step = jax.jit(functools.partial(train.train_step, net, optimizer=opt))
    first = None
    for _ in range(20):
        value, ts = step(ts, x, t)
        first = float(value) if first is None else first
    assert float(value) < first


@pytest.mark.slow
def test_sgd_step_with_weight_decay_matches_numpy_reference(float64):
    # The book's SGD with weight decay: W -= lr * (dW + lambda * W); autodiff adds the decay to the gradient.
    rng = np.random.default_rng(1)
    net = model.MLPConfig(6, (5, 4), 3, norm=True)
    params, state = model.init(net, jax.random.key(2), weight_init=0.7, dtype=jnp.float64)
    ref = Net([np.asarray(a.W) for a in params.affine], True, weight_decay_lambda=0.3)
    ts = train.train_state_init(params, state, optax.sgd(0.1))
    step = jax.jit(lambda ts, x, t: train.train_step(net, ts, x, t, optax.sgd(0.1), weight_decay=0.3))
    for _ in range(3):
        x, t = rng.normal(size=(8, 6)), rng.integers(0, 3, 8)
        _, ts = step(ts, jnp.asarray(x), jnp.asarray(t))
        ref.sgd_step(x, t, 0.1)
    for a, a_ref in zip(ts.params.affine, ref.affines):
        np.testing.assert_allclose(np.asarray(a.W), a_ref.W, rtol=1e-10, atol=1e-12)
    for s, bn_ref in zip(ts.state.batch_norm, ref.bns):
        np.testing.assert_allclose(np.asarray(s.var), bn_ref.running_var, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_sgd_family_follows_the_books_update_rules(name):
    # Oracle: the book's SGD, Momentum and Nesterov updates in NumPy (momentum 0.9).
    lr, mu = 0.1, 0.9
    opt = train.make_optimizer(name, lr)
    p = jnp.array([1.0, -2.0], jnp.float32)
    state = opt.init(p)
    ref, v = np.array([1.0, -2.0]), np.zeros(2)
    for g in ([0.5, 1.0], [0.25, -1.0], [1.0, 0.0]):
        g = np.array(g)
        updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, updates)
        if name == "sgd":
            ref = ref - lr * g
        elif name == "momentum":
            v = mu * v - lr * g
            ref = ref + v
        else:  # the book's Nesterov: params += mu^2 v - (1 + mu) lr g, then v = mu v - lr g
            ref = ref + mu * mu * v - (1 + mu) * lr * g
            v = mu * v - lr * g
        np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'sgdd'"):
        train.make_optimizer("sgdd", 0.1)


def test_option_lists_match_the_library():
    assert tuple(options.OPTIMIZERS) == tuple(train.OPTIMIZERS)
    assert tuple(options.ACTIVATIONS) == tuple(model.ACTIVATIONS)


def test_train_no_longer_forwards_the_engines_names():
    # The lazy shim to the engine's module is gone (it made an import cycle): plain attribute errors.
    for name in ("SweepConfig", "run_sweep", "no_such_name"):
        with pytest.raises(AttributeError):
            getattr(train, name)
    assert not hasattr(train, "_MOVED_TO_SWEEP")

@pytest.mark.slow
@pytest.mark.parametrize("use_bn", [False, True])
def test_step_size_probe_follows_the_first_order_taylor_expansion(use_bn):
    with x64():
        rng = np.random.default_rng(0)
        # Sigmoid: a smooth loss. (With ReLU a sample whose first layer is all zeros puts exact zeros into the
        # next layer, where the one-sided slopes of a step differ from the gradient.)
        config = model.MLPConfig(input_size=6, hidden_sizes=(5, 4), output_size=3, norm=use_bn,
                                 activation="sigmoid")
        params, state = model.init(config, jax.random.key(2), weight_init=0.5, dtype=jnp.float64)
        x = jnp.asarray(rng.normal(size=(30, 6)))
        t = jnp.asarray(rng.integers(0, 3, 30))
        etas = jnp.asarray([0.0, 1e-6, 1e-5, 30.0])
        # compiled once (run eagerly, op by op, it takes seconds)
        ratios = np.asarray(jax.jit(functools.partial(train.step_size_probe, config))(params, state, x, t, etas))

        def value(p):
            return model.loss(config, p, state, x, t, train=True)[0]

        L, g = jax.jit(jax.value_and_grad(value))(params)
        g2 = sum(float(np.sum(np.asarray(leaf) ** 2)) for leaf in jax.tree_util.tree_leaves(g))
        assert ratios[0] == pytest.approx(1.0, abs=1e-15)
        # L(theta - eta g) ~ L - eta |g|^2: the slope at 0 is -|g|^2 / L
        np.testing.assert_allclose((1 - ratios[1:3]) / np.asarray(etas[1:3]), g2 / float(L), rtol=1e-5)
        # a large step: compare with the loss computed directly
        stepped = jax.tree_util.tree_map(lambda p, d: p - 30.0 * d, params, g)
        assert ratios[3] == pytest.approx(float(jax.jit(value)(stepped)) / float(L), rel=1e-12)
        assert abs(ratios[3] - 1) > 1e-3  # the large step really moves the loss


@pytest.mark.slow
def test_train_step_is_one_sgd_step_on_the_dropout_loss_with_its_key():
    # Oracle: jax.grad of model.loss with the same key and weight decay, applied by hand (W -= lr * g).
    net = model.MLPConfig(6, (8, 8), 3, norm=True, dropout_ratio=0.3)
    params, state = model.init(net, jax.random.key(1), weight_init=0.6)
    rng = np.random.default_rng(2)
    x, t = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32), jnp.asarray(rng.integers(0, 3, 10))
    key = jax.random.key(5)
    opt = train.make_optimizer("sgd", 0.3)
    ts = train.train_state_init(params, state, opt)
    # compiled once each (run eagerly, op by op, they take seconds)
    step = jax.jit(lambda ts, key: train.train_step(net, ts, x, t, opt, key=key, weight_decay=0.2))
    value, new = step(ts, key)
    (want_value, want_state), grads = jax.jit(lambda p, key: jax.value_and_grad(model.loss, argnums=1, has_aux=True)(
        net, p, state, x, t, train=True, key=key, weight_decay=0.2))(params, key)
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    for got, p, g in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(params),
                         jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(p) - 0.3 * np.asarray(g), rtol=1e-5, atol=1e-7)
    for got, want in zip(jax.tree_util.tree_leaves(new.state), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    # another key drops other units: another step
    _, other = step(ts, jax.random.key(6))
    assert not np.allclose(np.asarray(other.params.affine[0].W), np.asarray(new.params.affine[0].W))


@pytest.mark.parametrize("name, rule", [
    ("adam", lambda g, m, v, k: (0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g)),
    ("rmsprop", lambda g, m, v, k: (m, 0.9 * v + 0.1 * g * g)),
    ("adagrad", lambda g, m, v, k: (m, v + g * g)),
])
def test_adaptive_optimizers_follow_their_update_rules(name, rule):
    # Oracle: the textbook rules with optax's defaults (adam: b1 0.9, b2 0.999, eps 1e-8, bias-corrected;
    # rmsprop: decay 0.9, eps 1e-8 outside the root; adagrad: initial accumulator 0.1, eps 1e-7).
    lr = 0.05
    opt = train.make_optimizer(name, lr)
    p = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    state = opt.init(p)
    ref = np.array([1.0, -2.0, 0.5])
    m, v = np.zeros(3), np.zeros(3) + (0.1 if name == "adagrad" else 0.0)
    for k, g in enumerate(([0.5, 1.0, -0.2], [0.25, -1.0, 0.3], [1.0, 0.0, -0.1]), start=1):
        g = np.array(g)
        updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, updates)
        m, v = rule(g, m, v, k)
        if name == "adam":
            ref = ref - lr * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
        elif name == "rmsprop":
            ref = ref - lr * g / (np.sqrt(v) + 1e-8)
        else:
            ref = ref - lr * g / np.sqrt(v + 1e-7)
        np.testing.assert_allclose(np.asarray(p), ref, rtol=1e-5)


def test_train_step_returns_the_loss_before_the_step_then_the_new_state():
    # Oracle: model.loss on the state before the step (value first, as every function that threads state).
    rng = np.random.default_rng(3)
    net = model.MLPConfig(5, (6,), 3, norm=True)
    params, state = model.init(net, jax.random.key(0), weight_init=0.5)
    opt = train.make_optimizer("momentum", 0.1)
    ts = train.train_state_init(params, state, opt)
    assert isinstance(ts, train.TrainState) and ts.params is params and ts.state is state
    x, labels = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
    # compiled once each (run eagerly, op by op, they take seconds)
    step = jax.jit(functools.partial(train.train_step, net, optimizer=opt))
    loss = jax.jit(functools.partial(model.loss, net, train=True))
    out = step(ts, x, labels)
    assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], train.TrainState)
    value, new_ts = out
    want, want_state = loss(params, state, x, labels)
    assert value.shape == () and float(value) == pytest.approx(float(want), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(new_ts.state), jax.tree_util.tree_leaves(want_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # the next step's loss is the loss of the stepped parameters (lower, on the same batch)
    value2, _ = step(new_ts, x, labels)
    assert float(value2) == pytest.approx(float(loss(new_ts.params, new_ts.state, x, labels)[0]), rel=1e-6)
    assert float(value2) < float(value)
    with pytest.raises(TypeError):
        train.train_step(net, ts, x, labels, opt, jax.random.key(0))  # key is keyword-only


@pytest.mark.slow
def test_train_step_norm_kwargs_momentum_is_a_network_built_with_that_momentum():
    # Oracle: a step of the network built with layers.batch_norm(momentum=m, init_var=0.0).
    rng = np.random.default_rng(4)
    m = 0.5
    net = model.MLPConfig(5, (6, 4), 3, norm=True)
    oracle = net._replace(norm=layers.batch_norm(momentum=m, init_var=0.0))
    params, state = model.init(net, jax.random.key(0), weight_init=0.5)
    opt = train.make_optimizer("sgd", 0.1)
    ts = train.train_state_init(params, state, opt)
    x, labels = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8))
    # each compiled once (eagerly, op by op, three steps take seconds)
    got_value, got = jax.jit(lambda ts: train.train_step(net, ts, x, labels, opt, norm_kwargs={"momentum": m}))(ts)
    want_value, want = jax.jit(lambda ts: train.train_step(oracle, ts, x, labels, opt))(ts)
    assert float(got_value) == float(want_value)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, book = jax.jit(lambda ts: train.train_step(net, ts, x, labels, opt))(ts)
    assert not np.allclose(np.asarray(book.state.batch_norm[0].mean), np.asarray(got.state.batch_norm[0].mean))
