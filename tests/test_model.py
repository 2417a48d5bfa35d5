"""bnjax.model against the NumPy reference network (book formulas, hand-written backward)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers, model
from conftest import x64
from experiments.numpy_book import Net

SIZES = (12, (9, 7, 8), 5)


def net(*sizes, **kw):
    return model.MLPConfig(*sizes, **kw)


def _data(rng, n=16):
    x = rng.normal(size=(n, SIZES[0]))
    t = rng.integers(0, SIZES[2], n)
    return x, t


@pytest.mark.slow
@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_loss_and_gradients_match_numpy_reference_float64(use_bn, decay):
    rng = np.random.default_rng(0)
    with x64():
        cfg = net(*SIZES, norm=use_bn)
        params, state = model.init(cfg, jax.random.key(0), weight_init=0.5, dtype=jnp.float64)
        ref = Net([np.asarray(a.W) for a in params.affine], use_bn, weight_decay_lambda=decay)
        x, t = _data(rng)
        # compiled once (run eagerly, op by op, it takes seconds)
        (value, new_state), grads = jax.jit(lambda p, s, xx, tt: jax.value_and_grad(
            model.loss, argnums=1, has_aux=True)(cfg, p, s, xx, tt, train=True, weight_decay=decay))(
            params, state, jnp.asarray(x), jnp.asarray(t))
        ref_value = ref.gradient(x, t)
        np.testing.assert_allclose(float(value), ref_value, rtol=1e-10)
        for g, a in zip(grads.affine, ref.affines):
            # the reference adds the decay term in its SGD step; autodiff includes it in the gradient
            np.testing.assert_allclose(np.asarray(g.W), a.dW + decay * a.W, atol=1e-10)
            np.testing.assert_allclose(np.asarray(g.b), a.db, atol=1e-10)
        for g, bn in zip(grads.batch_norm, ref.bns):
            np.testing.assert_allclose(np.asarray(g.gamma), bn.dgamma, atol=1e-10)
            np.testing.assert_allclose(np.asarray(g.beta), bn.dbeta, atol=1e-10)
        for s, bn in zip(new_state.batch_norm, ref.bns):
            np.testing.assert_allclose(np.asarray(s.mean), bn.running_mean, atol=1e-10)
            np.testing.assert_allclose(np.asarray(s.var), bn.running_var, atol=1e-10)
        # Evaluation mode with the updated running statistics.
        logits, _ = model.apply(cfg, params, new_state, jnp.asarray(x), train=False)
        np.testing.assert_allclose(np.asarray(logits), ref.predict(x, False), atol=1e-9)


def test_init_structure_scale_and_vmap_over_scales():
    key = jax.random.key(1)
    params, state = model.init(net(784, (100,) * 5, 10, norm=True), key, weight_init=0.01)
    assert [a.W.shape for a in params.affine] == [(784, 100)] + [(100, 100)] * 4 + [(100, 10)]
    assert len(params.batch_norm) == 5 and len(state.batch_norm) == 5
    assert all(np.all(np.asarray(p.gamma) == 1) and np.all(np.asarray(p.beta) == 0) for p in params.batch_norm)
    assert all(np.all(np.asarray(s.mean) == 0) and np.all(np.asarray(s.var) == 0) for s in state.batch_norm)
    assert abs(float(params.affine[0].W.std()) / 0.01 - 1) < 0.02
    he, _ = model.init(net(784, (100,) * 5, 10), key, weight_init="he")
    assert abs(float(he.affine[1].W.std()) / np.sqrt(2 / 100) - 1) < 0.05
    plain, plain_state = model.init(net(784, (100,) * 5, 10), key, weight_init=0.01)
    assert plain.batch_norm == () and plain_state.batch_norm == ()
    scales = jnp.array([1.0, 0.1, 0.01])
    bn_net = net(784, (100,) * 5, 10, norm=True)
    stacked, _ = jax.vmap(lambda s: model.init(bn_net, key, weight_init=None, weight_scale=s))(scales)
    for i, s in enumerate([1.0, 0.1, 0.01]):
        single, _ = model.init(bn_net, key, weight_init=None, weight_scale=s)
        np.testing.assert_allclose(np.asarray(stacked.affine[2].W[i]), np.asarray(single.affine[2].W), rtol=1e-6)


def test_same_key_same_model_and_different_keys_differ():
    a, _ = model.init(net(10, (4,), 3), jax.random.key(3), weight_init=0.1)
    b, _ = model.init(net(10, (4,), 3), jax.random.key(3), weight_init=0.1)
    c, _ = model.init(net(10, (4,), 3), jax.random.key(4), weight_init=0.1)
    np.testing.assert_array_equal(np.asarray(a.affine[0].W), np.asarray(b.affine[0].W))
    assert not np.allclose(np.asarray(a.affine[0].W), np.asarray(c.affine[0].W))


def test_dropout_needs_key_in_training_and_is_off_in_eval():
    cfg = net(12, (50, 50), 5, dropout_ratio=0.5)
    params, state = model.init(cfg, jax.random.key(5), weight_init="he")
    x = jnp.ones((4, 12))
    y1, _ = model.apply(cfg, params, state, x, train=True, key=jax.random.key(0))
    y2, _ = model.apply(cfg, params, state, x, train=True, key=jax.random.key(1))
    assert not np.allclose(np.asarray(y1), np.asarray(y2))
    e1, _ = model.apply(cfg, params, state, x, train=False)
    e2, _ = model.apply(cfg, params, state, x, train=False)
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2))
    with pytest.raises(ValueError, match="key"):
        model.apply(cfg, params, state, x, train=True, key=None)


def test_accuracy_counts_nan_rows_as_class_zero():
    cfg = net(4, (3,), 3)
    params, state = model.init(cfg, jax.random.key(6), weight_init=0.1)
    bad = jax.tree_util.tree_map(lambda a: a * jnp.nan, params)
    t = jnp.array([0, 1, 2, 0])
    acc = model.accuracy(cfg, bad, state, jnp.ones((4, 4)), t)
    assert float(acc) == pytest.approx(0.5)


def test_apply_rejects_bad_input():
    cfg = net(4, (3,), 2, norm=True)
    params, state = model.init(cfg, jax.random.key(7), weight_init=0.1)
    with pytest.raises(ValueError, match="features"):
        model.apply(cfg, params, state, jnp.ones((2, 5)), train=True)
    with pytest.raises(ValueError, match=r"\[N, features\]"):
        model.apply(cfg, params, state, jnp.ones(4), train=True)
    with pytest.raises(ValueError, match="activation"):
        model.init(net(4, (3,), 2, activation="tanh"), jax.random.key(0), weight_init=0.1)
    with pytest.raises(ValueError, match="disagree on batch norm"):
        model.apply(cfg, params, model.MLPState(()), jnp.ones((2, 4)), train=False)
    with pytest.raises(ValueError, match="disagree on batch norm"):
        model.apply(cfg._replace(norm=False), params, state, jnp.ones((2, 4)), train=False)
    # the norm's own hyper-parameters are checked where the norm value is built
    with pytest.raises(ValueError, match="eps"):
        layers.batch_norm(eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        layers.batch_norm(momentum=1.5)
    for bad, field in (({"dropout_ratio": 1.0}, "dropout_ratio"), ({"hidden_sizes": (0,)}, "sizes"),
                       ({"hidden_sizes": 3}, "sizes")):
        with pytest.raises(ValueError, match=field):
            model.init(cfg._replace(**bad), jax.random.key(0), weight_init=0.1)
    with pytest.raises(ValueError, match="weight_init"):
        model.init(cfg, jax.random.key(0), weight_init="lecun")
    with pytest.raises(ValueError, match="weight_scale must be a scalar"):
        model.init(cfg, jax.random.key(0), weight_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="weight_init must be a scalar"):
        model.init(cfg, jax.random.key(0), weight_init=jnp.ones(2))


def test_flop_count():
    # 784-100-10 with batch 1: 2 * (78400 + 1000) forward.
    assert model.num_flops([784, 100, 10], 1) == 2 * 79400
    assert model.num_flops([784, 100, 10], 1, backward=True) == 2 * 79400 * 2 + 2 * 1000


@pytest.mark.slow  # sigmoid layers: also test_hidden_returns_what_each_layer_feeds_forward[True-sigmoid]
def test_sigmoid_network_and_layers_compose():
    cfg = net(6, (5,), 3, activation="sigmoid")
    params, state = model.init(cfg, jax.random.key(8), weight_init="xavier")
    x = jax.random.normal(jax.random.key(9), (7, 6))
    logits, _ = model.apply(cfg, params, state, x, train=False)
    h = layers.sigmoid(layers.affine_apply(params.affine[0], x))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(layers.affine_apply(params.affine[1], h)), atol=1e-6)


def test_dropout_uses_its_own_key_in_each_hidden_layer():
    # Oracle: the network built by hand from bnjax.layers, one split key per hidden layer.
    cfg = model.MLPConfig(6, (5, 5), 3, dropout_ratio=0.5)
    params, state = model.init(cfg, jax.random.key(1), weight_init="he")
    x = jax.random.normal(jax.random.key(2), (4, 6))
    key = jax.random.key(3)
    got, _ = model.apply(cfg, params, state, x, train=True, key=key)
    keys = jax.random.split(key, 2)
    h = x
    for i, aff in enumerate(params.affine[:-1]):
        h = layers.dropout_apply(layers.relu(layers.affine_apply(aff, h)), keys[i], 0.5, train=True, inverted=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.affine_apply(params.affine[-1], h)), atol=1e-6)


def test_init_slices_one_normal_draw_into_disjoint_layer_weights():
    # Oracle: the documented single normal draw, sliced by hand in layer order.
    shapes = [(12, 9), (9, 7), (7, 5)]
    params, _ = model.init(model.MLPConfig(12, (9, 7), 5), jax.random.key(0), weight_init=0.5)
    noise = np.asarray(jax.random.normal(jax.random.key(0), (sum(i * o for i, o in shapes),)))
    offset = 0
    for a, (i, o) in zip(params.affine, shapes):
        np.testing.assert_allclose(np.asarray(a.W), 0.5 * noise[offset:offset + i * o].reshape(i, o), rtol=1e-6)
        offset += i * o


@pytest.mark.parametrize("use_bn,activation", [(False, "relu"), (True, "relu"), (True, "sigmoid")])
def test_hidden_returns_what_each_layer_feeds_forward(use_bn, activation):
    rng = np.random.default_rng(3)
    config = model.MLPConfig(8, (6, 5), 3, norm=use_bn, activation=activation)
    params, state = model.init(config, jax.random.key(1), weight_init=0.7)
    x = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
    inside = model.hidden(config, params, state, x, train=True)
    assert len(inside) == 2 and inside[0][0].shape == (40, 6) and inside[1][1].shape == (40, 5)
    # layer 1 by hand, from the formulas
    z = np.asarray(x) @ np.asarray(params.affine[0].W)
    if use_bn:
        z = (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-6)
    np.testing.assert_allclose(inside[0][0], z, rtol=1e-4, atol=1e-5)
    act = {"relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v))}[activation]
    for pre, post in inside:
        np.testing.assert_allclose(post, act(np.asarray(pre)), rtol=1e-5, atol=1e-6)
    # the last activation times the output layer gives the scores
    logits, _ = model.apply(config, params, state, x, train=True)
    last = np.asarray(inside[-1][1]) @ np.asarray(params.affine[-1].W) + np.asarray(params.affine[-1].b)
    np.testing.assert_allclose(logits, last, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("use_bn", [False, True])
def test_evaluation_has_no_dropout_and_the_books_dropout_scales_each_layer(use_bn):
    # Oracles: the dropout-free network (inverted dropout is the identity at evaluation) and the network built
    # by hand from bnjax.layers, each hidden activation times (1 - ratio) (the book's dropout at evaluation).
    rng = np.random.default_rng(4)
    cfg = model.MLPConfig(6, (7, 5), 3, norm=use_bn, dropout_ratio=0.4)
    params, state = model.init(cfg, jax.random.key(2), weight_init=0.8)
    if use_bn:  # non-trivial running statistics
        state = model.apply(cfg, params, state, jnp.asarray(rng.normal(size=(30, 6)), jnp.float32), train=True,
                            key=jax.random.key(0))[1]
    x = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
    plain_cfg = cfg._replace(dropout_ratio=0.0)
    want, _ = model.apply(plain_cfg, params, state, x, train=False)
    for key in (None, jax.random.key(7)):  # a key given at evaluation changes nothing
        got, _ = model.apply(cfg, params, state, x, train=False, key=key)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.predict(cfg, params, state, x), model.predict(plain_cfg, params, state, x))
    book = cfg._replace(dropout_inverted=False)
    got, _ = model.apply(book, params, state, x, train=False)
    h = x
    for i, aff in enumerate(params.affine[:-1]):
        h = layers.affine_apply(aff, h)
        if use_bn:
            h, _ = layers.batch_norm_apply(params.batch_norm[i], state.batch_norm[i], h, train=False)
        h = layers.relu(h) * 0.6
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.affine_apply(params.affine[-1], h)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow  # a key per layer: also test_dropout_uses_its_own_key_in_each_hidden_layer
def test_training_dropout_masks_each_layer_with_its_own_key_and_the_books_keeps_the_scale():
    # Oracle: layers.dropout_apply with the per-layer split keys; the book's dropout keeps units unscaled.
    cfg = model.MLPConfig(5, (40, 40), 4, dropout_ratio=0.5, dropout_inverted=False)
    params, state = model.init(cfg, jax.random.key(3), weight_init="he")
    x = jnp.abs(jax.random.normal(jax.random.key(4), (3, 5))) + 0.1
    key = jax.random.key(9)
    inside = []
    h = x
    keys = jax.random.split(key, 2)
    for i, aff in enumerate(params.affine[:-1]):
        a = layers.relu(layers.affine_apply(aff, h))
        h = layers.dropout_apply(a, keys[i], 0.5, train=True, inverted=False)
        inside.append((a, h))
    got, _ = model.apply(cfg, params, state, x, train=True, key=key)
    np.testing.assert_allclose(np.asarray(got), np.asarray(layers.affine_apply(params.affine[-1], h)), rtol=1e-5,
                               atol=1e-6)
    for a, dropped in inside:  # kept units unscaled, about half of the active ones dropped
        a, dropped = np.asarray(a), np.asarray(dropped)
        kept = dropped != 0
        np.testing.assert_array_equal(dropped[kept], a[kept])
        assert 0.2 < kept[a > 0].mean() < 0.8
    # the two (same-shaped) layers are not masked alike
    assert not np.array_equal(np.asarray(inside[0][1]) != 0, np.asarray(inside[1][1]) != 0)


def test_the_norm_value_of_the_config_is_used():
    # Oracle: layers.batch_norm_apply called with the norm value's momentum and eps.
    rng = np.random.default_rng(5)
    cfg = model.MLPConfig(4, (6,), 3, norm=layers.batch_norm(0.3, 0.5, init_var=0.0))
    params, state = model.init(cfg, jax.random.key(1), weight_init=0.2)
    x = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
    logits, new_state = model.apply(cfg, params, state, x, train=True)
    z = layers.affine_apply(params.affine[0], x)
    bn, bn_state = layers.batch_norm_apply(params.batch_norm[0], state.batch_norm[0], z, train=True, momentum=0.3,
                                           eps=0.5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(layers.affine_apply(params.affine[1], layers.relu(bn))),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state.batch_norm[0].mean), np.asarray(bn_state.mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state.batch_norm[0].var), np.asarray(bn_state.var), rtol=1e-6)
    # evaluation mode: the running statistics with the norm's eps
    ev, _ = model.apply(cfg, params, new_state, x, train=False)
    zn = (np.asarray(z) - np.asarray(bn_state.mean)) / np.sqrt(np.asarray(bn_state.var) + 0.5)
    want = np.maximum(zn * np.asarray(params.batch_norm[0].gamma) + np.asarray(params.batch_norm[0].beta), 0)
    want = want @ np.asarray(params.affine[1].W) + np.asarray(params.affine[1].b)
    np.testing.assert_allclose(np.asarray(ev), want, rtol=1e-5, atol=1e-6)
    # the initial running variance of the norm value (the book's 0; Flax's and PyTorch's 1, the library default)
    _, state1 = model.init(cfg._replace(norm=layers.batch_norm(0.3, 0.5, init_var=1.0)), jax.random.key(1),
                           weight_init=0.2)
    assert np.all(np.asarray(state1.batch_norm[0].var) == 1.0) and np.all(np.asarray(state.batch_norm[0].var) == 0.0)
    _, default = model.init(cfg._replace(norm=layers.batch_norm()), jax.random.key(1))
    _, book = model.init(cfg._replace(norm=True), jax.random.key(1))
    assert np.all(np.asarray(default.batch_norm[0].var) == 1.0) and np.all(np.asarray(book.batch_norm[0].var) == 0.0)


def test_accuracy_and_predict_follow_the_scores():
    cfg = model.MLPConfig(3, (4,), 5)
    params, state = model.init(cfg, jax.random.key(0), weight_init=0.5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(12, 3)), jnp.float32)
    logits, _ = model.apply(cfg, params, state, x, train=False)
    pred = np.argmax(np.asarray(logits), axis=1)
    assert len(set(pred.tolist())) > 2
    np.testing.assert_array_equal(model.predict(cfg, params, state, x), pred)
    t = pred.copy()
    t[:3] = (t[:3] + 1) % 5  # 9 of 12 right
    assert float(model.accuracy(cfg, params, state, x, jnp.asarray(t))) == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------
# Norm values in the network (issue 9; precise statistics and folding: test_model_precise.py)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_norm_value_plugs_into_the_network_as_the_boolean_did():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(10, SIZES[0])), jnp.float32)
    # True is the book's BatchNorm: momentum 0.9, eps 1e-6, running variance starting at 0
    book = net(*SIZES, norm=True)
    book_value = net(*SIZES, norm=layers.batch_norm(0.9, 1e-6, init_var=0.0))
    base = net(*SIZES, norm=layers.batch_norm(0.7, 1e-3, init_var=0.0))
    params, state = model.init(base, jax.random.key(0), weight_init=0.5)
    for a_cfg, b_cfg in ((book, book_value), (base, base)):
        pa, sa = model.init(a_cfg, jax.random.key(0), weight_init=0.5)
        pb, sb = model.init(b_cfg, jax.random.key(0), weight_init=0.5)
        for a, b in zip(jax.tree_util.tree_leaves((pa, sa)), jax.tree_util.tree_leaves((pb, sb))):
            np.testing.assert_array_equal(a, b)
    for train in (True, False):
        (la, sa), (lb, sb) = (model.apply(book, params, state, x, train=train),
                              model.apply(book_value, params, state, x, train=train))
        np.testing.assert_array_equal(la, lb)
        for a, b in zip(jax.tree_util.tree_leaves(sa), jax.tree_util.tree_leaves(sb)):
            np.testing.assert_array_equal(a, b)
    # renorm with r_max = 1, d_max = 0 and ghost BN with one group are batch norm (same init variance)
    for norm in (layers.batch_renorm(0.7, 1e-3, r_max=1.0, d_max=0.0, init_var=0.0),
                 layers.ghost_batch_norm(10, 0.7, 1e-3, init_var=0.0)):
        cfg = net(*SIZES, norm=norm)
        p, s = model.init(cfg, jax.random.key(0), weight_init=0.5)
        logits, new = model.apply(cfg, p, s, x, train=True)
        np.testing.assert_array_equal(logits, model.apply(base, params, state, x, train=True)[0])
        np.testing.assert_array_equal(new.batch_norm[0].var,
                                      model.apply(base, params, state, x, train=True)[1].batch_norm[0].var)
    # a renorm network's state counts its updates; ghost groups of 5 differ from batch norm over 10
    cfg = net(*SIZES, norm=layers.batch_renorm())
    p, s = model.init(cfg, jax.random.key(0), weight_init=0.5)
    assert int(model.apply(cfg, p, s, x, train=True)[1].batch_norm[2].step) == 1
    ghost = net(*SIZES, norm=layers.ghost_batch_norm(5, 0.7, 1e-3, init_var=0.0))
    assert not np.allclose(model.apply(ghost, params, state, x, train=True)[0],
                           model.apply(base, params, state, x, train=True)[0])
    with pytest.raises(ValueError, match="norm must be a norm value"):
        model.init(net(*SIZES, norm="yes"), jax.random.key(0), weight_init=0.5)



# --------------------------------------------------------------------------------------------------
# The one API (issue 14): norm resolved once, config first, the init policy, train keyword-only
# --------------------------------------------------------------------------------------------------


def test_norm_true_is_the_books_batch_norm_resolved_once():
    cfg = model.MLPConfig(norm=True)
    assert cfg.norm == layers.book_batch_norm() == layers.batch_norm(0.9, 1e-6, init_var=0.0)
    assert cfg.norm is cfg.norm  # a stored value, not rebuilt on each read
    assert isinstance(cfg.norm, layers.Norm) and cfg.norm.eps == 1e-6 and cfg.norm.init_var == 0.0
    assert model.MLPConfig(norm=np.bool_(True)).norm == layers.book_batch_norm()
    for off in (False, np.bool_(False), None):
        assert model.MLPConfig(norm=off).norm is None
    assert model.MLPConfig().norm is None
    # _replace and replace resolve too; a norm value passes through untouched
    plain = model.MLPConfig(6, (5,), 3)
    assert plain._replace(norm=True).norm == layers.book_batch_norm()
    assert plain.replace(norm=True) == plain._replace(norm=True) and isinstance(plain.replace(norm=True),
                                                                                  model.MLPConfig)
    renorm = layers.batch_renorm()
    assert plain.replace(norm=renorm).norm is renorm
    assert model.MLPConfig(norm=True)._replace(norm=False).norm is None
    # hashable and equal by value, so jit can key on it
    assert hash(model.MLPConfig(norm=True)) == hash(model.MLPConfig(norm=layers.book_batch_norm()))
    assert model.MLPConfig(norm=True) == model.MLPConfig(norm=layers.batch_norm(0.9, 1e-6, init_var=0.0))
    assert model.MLPConfig(norm=True) != model.MLPConfig(norm=layers.batch_norm())  # init_var 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weight_init", [None, 0.05, "he", "relu", "xavier", "sigmoid"])
def test_init_policy_is_the_numpy_formula_on_the_same_normal_draw(weight_init, dtype):
    # Oracle: NumPy in the parameter dtype on the single normal draw, the float operations of each policy:
    # None: scale * z; number w: (scale * w) * z; a name: (policy(fan_in) * z) * scale.
    dt = jnp.dtype(dtype)
    cfg = model.MLPConfig(7, (6, 5), 4, norm=True)
    key, scale = jax.random.key(11), 0.37
    params, state = model.init(cfg, key, weight_init=weight_init, weight_scale=scale, dtype=dt)
    shapes = [(7, 6), (6, 5), (5, 4)]
    noise = np.asarray(jax.random.normal(key, (sum(i * o for i, o in shapes),), dt))
    s = np.asarray(scale, dt)
    offset = 0
    for a, (i, o) in zip(params.affine, shapes):
        z = noise[offset:offset + i * o].reshape(i, o)
        if weight_init is None:
            want = s * z
        elif isinstance(weight_init, str):
            gain = 2.0 if weight_init in ("he", "relu") else 1.0
            want = (np.asarray(np.sqrt(gain / i), dt) * z) * s
        else:
            want = (s * np.asarray(weight_init, dt)) * z
        assert a.W.dtype == dt and a.b.dtype == dt
        np.testing.assert_array_equal(np.asarray(a.W), want)
        np.testing.assert_array_equal(np.asarray(a.b), np.zeros(o, dt))
        offset += i * o
    assert len(state.batch_norm) == 2
    # the defaults: He, scale 1 (the named policy alone)
    he, _ = model.init(cfg, key, dtype=dt)
    first = noise[:42].reshape(7, 6)
    np.testing.assert_array_equal(np.asarray(he.affine[0].W), np.asarray(np.sqrt(2 / 7), dt) * first)


@pytest.mark.slow
def test_init_under_vmap_over_the_scale_is_bit_identical_to_single_calls():
    # The grid engine vmaps weight_scale: the stacked weights must be the single-model ones, bit for bit.
    cfg = model.MLPConfig(9, (8, 8), 3, norm=True)
    key = jax.random.key(2)
    scales = jnp.asarray([1.0, 0.1, 3.0])
    for weight_init in (None, 0.2, "he"):
        stacked, _ = jax.jit(jax.vmap(lambda s: model.init(cfg, key, weight_init=weight_init, weight_scale=s)))(scales)
        for i, s in enumerate(np.asarray(scales)):
            single, _ = model.init(cfg, key, weight_init=weight_init, weight_scale=float(s))
            for a, b in zip(stacked.affine, single.affine):
                np.testing.assert_array_equal(np.asarray(a.W[i]), np.asarray(b.W))


def test_train_is_required_and_keyword_only():
    cfg = model.MLPConfig(4, (3,), 2, norm=True, dropout_ratio=0.2)
    params, state = model.init(cfg, jax.random.key(0))
    x, labels = jnp.ones((5, 4)), jnp.zeros(5, jnp.int32)
    with pytest.raises(TypeError, match="train"):
        model.apply(cfg, params, state, x)
    with pytest.raises(TypeError):
        model.apply(cfg, params, state, x, True)
    with pytest.raises(TypeError, match="train"):
        model.hidden(cfg, params, state, x)
    with pytest.raises(TypeError, match="train"):
        model.loss(cfg, params, state, x, labels)
    with pytest.raises(TypeError, match="config comes first"):
        model.init(jax.random.key(0), cfg)  # a key is not a config
    with pytest.raises(TypeError):
        model.recalibrate(cfg, params, state, jnp.ones((2, 5, 4)), jax.random.key(0))  # key is keyword-only


@pytest.mark.slow
def test_norm_kwargs_momentum_is_a_network_built_with_that_momentum():
    # Oracle: the same network built with layers.batch_norm(momentum=m, init_var=0.0), the book's norm with
    # only the momentum changed.
    rng = np.random.default_rng(12)
    m = 0.3
    cfg = net(*SIZES, norm=True)
    oracle = net(*SIZES, norm=layers.batch_norm(momentum=m, init_var=0.0))
    params, state = model.init(cfg, jax.random.key(1), weight_init=0.5)
    state = model.apply(cfg, params, state, jnp.asarray(rng.normal(size=(12, SIZES[0])), jnp.float32),
                        train=True)[1]  # non-zero running statistics
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(12, SIZES[0])), jnp.float32)
    labels = jnp.asarray(rng.integers(0, SIZES[2], 12))
    got_logits, got = model.apply(cfg, params, state, x, train=True, norm_kwargs={"momentum": m})
    want_logits, want = model.apply(oracle, params, state, x, train=True)
    np.testing.assert_array_equal(got_logits, want_logits)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(a, b)
    # and it really changes the statistics: the book's momentum gives others
    assert not np.allclose(model.apply(cfg, params, state, x, train=True)[1].batch_norm[0].mean, got.batch_norm[0].mean)
    # a traced momentum through loss (the engine's vmapped axis)
    ms = jnp.asarray([m, 0.9])
    values, states = jax.vmap(lambda mm: model.loss(cfg, params, state, x, labels, train=True,
                                                    norm_kwargs={"momentum": mm}))(ms)
    np.testing.assert_allclose(np.asarray(states.batch_norm[1].var[0]), np.asarray(want.batch_norm[1].var),
                               rtol=1e-6, atol=1e-7)
    book_state = model.loss(cfg, params, state, x, labels, train=True)[1]
    np.testing.assert_allclose(np.asarray(states.batch_norm[1].var[1]), np.asarray(book_state.batch_norm[1].var),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(values[0]), float(values[1]), rtol=1e-6)  # the loss uses batch statistics
