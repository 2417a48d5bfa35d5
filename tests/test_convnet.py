"""bnjax.convnet against the float64 NumPy SimpleConvNet (tests/conv_oracle.py: im2col convolution, col2im
backward, argmax-routed max pooling, the book's batch norm), finite differences, and invariants (initial stds,
vmap over scales, folding, hand-counted FLOPs, the residuals autodiff keeps)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnjax import _conv_ops, convnet, layers, model
from conftest import x64
from conv_oracle import ConvNet, col2im, im2col
from norms_oracle import _np_bn_eval, _np_ghost

# Two small geometries: two input channels with padding; one channel with stride 2 and two hidden layers.
GEOMETRIES = {
    "pad": dict(input_shape=(8, 8, 2), num_filters=4, filter_size=3, stride=1, pad=1, pool_size=2,
                hidden_sizes=(6,), output_size=5),
    "stride": dict(input_shape=(9, 9, 1), num_filters=3, filter_size=3, stride=2, pad=0, pool_size=2,
                   hidden_sizes=(5, 4), output_size=3),
}


def _net(geometry="pad", **kw):
    return convnet.ConvNetConfig(**{**GEOMETRIES[geometry], **kw})


def _randomised(params, rng, dtype):
    """Non-zero biases and non-trivial gamma/beta, so every gradient and the bias placement are exercised."""
    r = lambda shape, lo=-0.5, hi=0.5: jnp.asarray(rng.uniform(lo, hi, shape), dtype)  # noqa: E731
    conv = params.conv._replace(b=r(params.conv.b.shape))
    affine = tuple(a._replace(b=r(a.b.shape)) for a in params.affine)
    bn = tuple(p._replace(gamma=r(p.gamma.shape, 0.5, 1.5), beta=r(p.beta.shape)) for p in params.batch_norm)
    return params._replace(conv=conv, affine=affine, batch_norm=bn)


def _oracle(cfg, params, **kw):
    ref = ConvNet(np.asarray(params.conv.W), np.asarray(params.conv.b),
                  [(np.asarray(a.W), np.asarray(a.b)) for a in params.affine], cfg.norm is not None,
                  stride=cfg.stride, pad=cfg.pad, pool=cfg.pool_size, **kw)
    for bn, p in zip(ref.bns, params.batch_norm):
        bn.gamma, bn.beta = np.asarray(p.gamma, np.float64), np.asarray(p.beta, np.float64)
    return ref


def _data(cfg, rng, n=6):
    return rng.normal(size=(n, *cfg.input_shape)), rng.integers(0, cfg.output_size, n)


# --- The NumPy oracle itself ---------------------------------------------------------------------------------


def test_im2col_convolution_is_the_direct_sum_and_col2im_its_adjoint():
    rng = np.random.default_rng(0)
    x, W = rng.normal(size=(2, 5, 6, 2)), rng.normal(size=(3, 2, 2, 4))
    cols, (ho, wo) = im2col(x, 3, 2, 2, 1)
    out = (cols @ W.reshape(-1, 4)).reshape(2, ho, wo, 4)
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    direct = np.array([[[[np.sum(xp[n, 2 * i : 2 * i + 3, 2 * j : 2 * j + 2] * W[..., f]) for f in range(4)]
                         for j in range(wo)] for i in range(ho)] for n in range(2)])
    np.testing.assert_allclose(out, direct, atol=1e-12)
    c = rng.normal(size=cols.shape)  # <im2col(x), c> == <x, col2im(c)>
    np.testing.assert_allclose(np.sum(cols * c), np.sum(x * col2im(c, x.shape, 3, 2, 2, 1)), rtol=1e-12)


def test_max_pool_derivative_goes_to_the_first_maximum_of_each_window_as_the_books():
    from conv_oracle import Pooling

    h = np.array([[3, 3, 0, 1, -1, -2], [2, 1, 1, 0, -2, -1],  # a tie of two maxima; one maximum; all negative
                  [5, 5, 7, 7, 4, 4], [5, 5, 7, 7, 4, 4]], np.float32).reshape(1, 4, 6, 1)
    w = np.arange(1.0, 7.0, dtype=np.float32).reshape(1, 2, 3, 1)
    f = lambda x: jnp.sum(_conv_ops.max_pool(x, 2) * w)  # noqa: E731
    ref = Pooling(2)
    np.testing.assert_array_equal(np.asarray(_conv_ops.max_pool(jnp.asarray(h), 2)), ref.forward(h))
    want = ref.backward(w)
    assert want.sum() == w.sum() and np.count_nonzero(want) == w.size  # one position per window
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.grad(f))(jnp.asarray(h))), want)
    _, tangent = jax.jvp(lambda x: _conv_ops.max_pool(x, 2), (jnp.asarray(h),), (jnp.asarray(want),))
    np.testing.assert_array_equal(np.asarray(tangent), w)  # forward mode works too (a custom JVP)
    h[0, 1, 1, 0] = np.nan  # a NaN in a window makes its maximum NaN, with or without derivatives
    value, _ = jax.jvp(lambda x: _conv_ops.max_pool(x, 2), (jnp.asarray(h),), (jnp.zeros_like(h),))
    assert np.isnan(np.asarray(value)[0, 0, 0, 0]) and np.isnan(np.asarray(_conv_ops.max_pool(h, 2))[0, 0, 0, 0])


# --- Forward and every gradient against the oracle, float64 ---------------------------------------------------


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("geometry", ["pad", pytest.param("stride", marks=pytest.mark.slow)])
def test_loss_gradients_and_running_statistics_match_numpy_float64(geometry, use_bn):
    rng = np.random.default_rng(1)
    decay = 0.1
    with x64():
        cfg = _net(geometry, norm=use_bn)
        params, state = convnet.init(cfg, jax.random.key(0), weight_init=0.5, dtype=jnp.float64)
        params = _randomised(params, rng, jnp.float64)
        x, t = _data(cfg, rng)
        grad = jax.value_and_grad(convnet.loss, argnums=(1, 3), has_aux=True)
        (value, new_state), (g, gx) = jax.jit(lambda p, s, xx, tt: grad(cfg, p, s, xx, tt, train=True,
                                                                          weight_decay=decay))(params, state, x, t)
        ref = _oracle(cfg, params, weight_decay_lambda=decay)
        ref_value, ref_dx = ref.gradient(x, t)
        np.testing.assert_allclose(float(value), ref_value, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(gx), ref_dx, atol=1e-12)  # col2im
        np.testing.assert_allclose(np.asarray(g.conv.W), ref.conv.dW + decay * ref.conv.W, atol=1e-12)
        np.testing.assert_allclose(np.asarray(g.conv.b), ref.conv.db, atol=1e-12)
        for ga, a in zip(g.affine, ref.affines):
            np.testing.assert_allclose(np.asarray(ga.W), a.dW + decay * a.W, atol=1e-12)
            np.testing.assert_allclose(np.asarray(ga.b), a.db, atol=1e-12)
        assert len(g.batch_norm) == len(ref.bns) == (1 + len(cfg.hidden_sizes) if use_bn else 0)
        for gb, s, bn in zip(g.batch_norm, new_state.batch_norm, ref.bns):
            np.testing.assert_allclose(np.asarray(gb.gamma), bn.dgamma, atol=1e-12)
            np.testing.assert_allclose(np.asarray(gb.beta), bn.dbeta, atol=1e-12)
            np.testing.assert_allclose(np.asarray(s.mean), bn.running_mean, atol=1e-12)
            np.testing.assert_allclose(np.asarray(s.var), bn.running_var, atol=1e-12)
        # Evaluation with the updated running statistics, from flat rows.
        logits, _ = convnet.apply(cfg, params, new_state, x.reshape(len(x), -1), train=False)
        np.testing.assert_allclose(np.asarray(logits), ref.predict(x, False), atol=1e-11)


def test_ghost_batch_norm_normalises_each_group_of_images_per_channel():
    rng = np.random.default_rng(2)
    with x64():
        cfg = _net(norm=layers.ghost_batch_norm(3))
        params, state = convnet.init(cfg, jax.random.key(1), weight_init=0.5, dtype=jnp.float64)
        params = _randomised(params, rng, jnp.float64)
        x, _ = _data(cfg, rng, n=5)  # groups of 3 and 2 images
        logits, new_state = jax.jit(lambda p, s, xx: convnet.apply(cfg, p, s, xx, train=True))(params, state, x)
        eval_logits, _ = convnet.apply(cfg, params, new_state, x, train=False)
    stats = {}

    def ghost(i, h, train):
        p, s = params.batch_norm[i], state.batch_norm[i]
        g, b = np.asarray(p.gamma), np.asarray(p.beta)
        if not train:
            return _np_bn_eval(h, g, b, *(np.asarray(v) for v in new_state.batch_norm[i]), cfg.norm.eps)
        y, stats[i, "mean"], stats[i, "var"], _ = _np_ghost(h, 3, g, b, np.asarray(s.mean), np.asarray(s.var),
                                                            momentum=cfg.norm.momentum, eps=cfg.norm.eps)
        return y

    ref = _oracle(cfg, params, norm_forward=ghost)
    np.testing.assert_allclose(np.asarray(logits), ref.predict(x, True), atol=1e-11)
    for i, s in enumerate(new_state.batch_norm):
        np.testing.assert_allclose(np.asarray(s.mean), stats[i, "mean"], atol=1e-12)
        np.testing.assert_allclose(np.asarray(s.var), stats[i, "var"], atol=1e-12)
    np.testing.assert_allclose(np.asarray(eval_logits), ref.predict(x, False), atol=1e-11)


@pytest.mark.skipif(not hasattr(layers, "group_norm"), reason="layers.group_norm not in this checkout")
def test_group_norm_normalises_each_image_over_space_and_a_group_of_channels():
    rng = np.random.default_rng(9)
    with x64():
        cfg = _net(norm=layers.group_norm(2))  # 4 filters and 6 hidden units: groups of 2 and 3 channels
        params, state = convnet.init(cfg, jax.random.key(9), weight_init=0.5, dtype=jnp.float64)
        params = _randomised(params, rng, jnp.float64)
        x, _ = _data(cfg, rng, n=3)
        train, new_state = jax.jit(lambda p, s, xx: convnet.apply(cfg, p, s, xx, train=True))(params, state, x)
        evaluation, _ = convnet.apply(cfg, params, state, x, train=False)
        with pytest.raises(ValueError, match="running statistics"):  # nothing to recalibrate
            convnet.recalibrate(cfg, params, state, x[None])

    def group(i, h, train_flg):  # per image: all non-batch axes of each group of consecutive channels
        g = h.reshape(*h.shape[:-1], 2, h.shape[-1] // 2)
        axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
        y = ((g - g.mean(axes, keepdims=True)) / np.sqrt(g.var(axes, keepdims=True) + cfg.norm.eps)).reshape(h.shape)
        return np.asarray(params.batch_norm[i].gamma) * y + np.asarray(params.batch_norm[i].beta)

    ref = _oracle(cfg, params, norm_forward=group).predict(x, True)
    np.testing.assert_allclose(np.asarray(train), ref, atol=1e-11)
    np.testing.assert_array_equal(np.asarray(evaluation), np.asarray(train))
    with pytest.raises(ValueError, match="running statistics"):
        convnet.fold(cfg, params, new_state)


@pytest.mark.slow
def test_gradients_match_finite_differences():
    rng = np.random.default_rng(3)
    with x64():
        cfg = convnet.ConvNetConfig(input_shape=(6, 6, 1), num_filters=2, filter_size=3, hidden_sizes=(3,),
                                    output_size=3, activation="sigmoid", norm=True)
        params, state = convnet.init(cfg, jax.random.key(2), weight_init=0.7, dtype=jnp.float64)
        params = _randomised(params, rng, jnp.float64)
        x, t = _data(cfg, rng, n=4)
        f = jax.jit(lambda p, xx: convnet.loss(cfg, p, state, xx, t, train=True, weight_decay=0.05)[0])
        check_grads(f, (params, jnp.asarray(x)), order=1, modes=("fwd", "rev"), eps=1e-6, atol=1e-7, rtol=1e-6)


# --- Initialisation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_init,weight_scale,expected", [
    ("he", 1.0, lambda fan_in: math.sqrt(2 / fan_in)),
    ("xavier", 2.0, lambda fan_in: 2 * math.sqrt(1 / fan_in)),
    (0.05, 3.0, lambda fan_in: 0.15),
    (None, 0.01, lambda fan_in: 0.01),  # the book's SimpleConvNet: weight_init_std for every layer
])
def test_initial_std_of_each_layer_follows_the_policy(weight_init, weight_scale, expected):
    cfg = convnet.ConvNetConfig(num_filters=64, hidden_sizes=(100,), norm=True)  # 1,600 conv weights
    params, state = convnet.init(cfg, jax.random.key(3), weight_init=weight_init, weight_scale=weight_scale)
    weights = [params.conv.W, *(a.W for a in params.affine)]
    assert [w.shape for w in weights] == [(5, 5, 1, 64), (12 * 12 * 64, 100), (100, 10)]
    for W, fan_in in zip(weights, (25, 12 * 12 * 64, 100)):
        w = np.asarray(W)
        assert abs(w.std() / expected(fan_in) - 1) < 0.1, (W.shape, w.std(), expected(fan_in))
        assert abs(w.mean()) < 0.2 * expected(fan_in)
    for b in (params.conv.b, *(a.b for a in params.affine)):
        assert not np.any(np.asarray(b))
    assert [p.gamma.shape for p in params.batch_norm] == [(64,), (100,)]
    assert [float(s.var[0]) for s in state.batch_norm] == [0.0, 0.0]  # the book's norm: running var from 0


def test_the_conv_fan_in_counts_the_input_channels():
    # MNIST has one channel, where fh * fw * C_in and fh * fw agree: three channels tell them apart
    cfg = convnet.ConvNetConfig(input_shape=(12, 12, 3), num_filters=64, filter_size=5, hidden_sizes=(20,))
    params, _ = convnet.init(cfg, jax.random.key(5), weight_init="he")
    assert params.conv.W.shape == (5, 5, 3, 64)
    assert abs(float(np.asarray(params.conv.W).std()) / math.sqrt(2 / 75) - 1) < 0.1


def test_vmap_over_weight_scale_scales_every_layer():
    cfg = convnet.ConvNetConfig(norm=True)
    scales = jnp.asarray([1.0, 0.1, 0.003])
    key = jax.random.key(4)
    stack, _ = jax.vmap(lambda s: convnet.init(cfg, key, weight_init=None, weight_scale=s))(scales)
    unit, _ = convnet.init(cfg, key, weight_init=None, weight_scale=1.0)
    for W, W1 in [(stack.conv.W, unit.conv.W), *((a.W, a1.W) for a, a1 in zip(stack.affine, unit.affine))]:
        assert W.shape == (3, *W1.shape)
        np.testing.assert_array_equal(np.asarray(W), np.asarray(scales).reshape(-1, *[1] * W1.ndim) * np.asarray(W1))
    assert stack.batch_norm[0].gamma.shape == (3, 30)


@pytest.mark.slow
def test_models_vmapped_over_a_shared_batch_equal_each_model_alone():
    rng = np.random.default_rng(5)
    cfg = _net(norm=True)
    params, state = jax.vmap(lambda k: convnet.init(cfg, k))(jax.random.split(jax.random.key(5), 3))
    x, t = _data(cfg, rng)
    x = jnp.asarray(x.reshape(len(x), -1), jnp.float32)
    grad = jax.grad(lambda p, s: convnet.loss(cfg, p, s, x, t, train=True)[0])
    stacked = jax.jit(jax.vmap(grad))(params, state)
    alone = jax.jit(grad)
    for i in range(3):
        one = alone(*jax.tree_util.tree_map(lambda a: a[i], (params, state)))
        for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(one)):
            np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-5, atol=1e-6)


# --- Folding, recalibration ---------------------------------------------------------------------------------------


def test_fold_after_sgd_steps_gives_the_same_evaluation_logits():
    rng = np.random.default_rng(6)
    cfg = _net(norm=True)
    params, state = convnet.init(cfg, jax.random.key(6))
    x, t = _data(cfg, rng, n=16)
    x = jnp.asarray(x, jnp.float32)

    @jax.jit
    def step(p, s, xb, tb):
        (_, s), g = jax.value_and_grad(convnet.loss, argnums=1, has_aux=True)(cfg, p, s, xb, tb, train=True)
        return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, g), s

    for i in range(5):
        params, state = step(params, state, x[i % 2 * 8 :][:8], t[i % 2 * 8 :][:8])
    plain, folded, empty = convnet.fold(cfg, params, state)
    assert plain == cfg.replace(norm=None) and folded.batch_norm == () and empty.batch_norm == ()
    want, _ = convnet.apply(cfg, params, state, x, train=False)
    got, _ = convnet.apply(plain, folded, empty, x, train=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
    assert not np.allclose(np.asarray(folded.conv.W), np.asarray(params.conv.W))
    # Without a norm there is nothing to fold.
    p0, s0 = convnet.init(plain, jax.random.key(0))
    assert convnet.fold(plain, p0, s0) == (plain, p0, s0)


def test_fold_refuses_a_norm_without_running_statistics():
    @dataclasses.dataclass(frozen=True)
    class NoStats(layers.Norm):
        def init(self, num_features, dtype=jnp.float32):
            return layers.batch_norm_init(num_features, dtype=dtype)

        def apply(self, params, state, x, *, train, **kwargs):
            return x, state

    cfg = _net(norm=NoStats())
    params, state = convnet.init(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="no running statistics"):
        convnet.fold(cfg, params, state)


def test_recalibrate_sets_the_mean_of_each_layers_batch_statistics():
    rng = np.random.default_rng(7)
    with x64():
        cfg = _net(norm=True)
        params, state = convnet.init(cfg, jax.random.key(7), weight_init=0.5, dtype=jnp.float64)
        params = _randomised(params, rng, jnp.float64)
        batches = np.stack([_data(cfg, rng, n=4)[0] for _ in range(3)])
        new = convnet.recalibrate(cfg, params, state, batches.reshape(3, 4, -1))
    sums = None
    for xb in batches:
        ref = _oracle(cfg, params, momentum=0.0)  # momentum 0: the running statistics are the batch's
        ref.predict(xb, True)
        stats = [(bn.running_mean, bn.running_var) for bn in ref.bns]
        sums = stats if sums is None else [(m + a, v + b) for (m, v), (a, b) in zip(sums, stats)]
    for s, (m, v) in zip(new.batch_norm, sums):
        np.testing.assert_allclose(np.asarray(s.mean), m / 3, atol=1e-12)
        np.testing.assert_allclose(np.asarray(s.var), v / 3, atol=1e-12)


# --- Configuration, inputs, errors ----------------------------------------------------------------------------------


def test_config_is_hashable_and_resolves_norm_once():
    cfg = convnet.ConvNetConfig(input_shape=[28, 28, 1], hidden_sizes=[100], norm=True)
    assert cfg.input_shape == (28, 28, 1) and cfg.hidden_sizes == (100,) and hash(cfg) == hash(cfg.replace())
    assert cfg.norm == layers.book_batch_norm() and cfg.replace(norm=False).norm is None
    assert convnet.ConvNetConfig().replace(norm=True) == cfg
    assert cfg.input_size == 784 and cfg.conv_shape == (24, 24, 30) and cfg.pool_shape == (12, 12, 30)
    assert cfg.affine_sizes == [4320, 100, 10] and cfg.kernel_shape == (5, 5, 1, 30)


def test_flat_rows_and_nhwc_images_and_dropout_at_evaluation():
    rng = np.random.default_rng(8)
    cfg = _net(norm=True, dropout_ratio=0.5)
    params, state = convnet.init(cfg, jax.random.key(8))
    x, t = _data(cfg, rng)
    x = jnp.asarray(x, jnp.float32)
    nhwc, _ = convnet.apply(cfg, params, state, x, train=False)
    flat, _ = convnet.apply(cfg, params, state, x.reshape(len(x), -1), train=False)
    plain, _ = convnet.apply(cfg.replace(dropout_ratio=0.0), params, state, x, train=False)
    np.testing.assert_array_equal(np.asarray(nhwc), np.asarray(flat))
    np.testing.assert_array_equal(np.asarray(nhwc), np.asarray(plain))  # inverted dropout: nothing at evaluation
    dropped, _ = convnet.apply(cfg, params, state, x, train=True, key=jax.random.key(0))
    kept, _ = convnet.apply(cfg.replace(dropout_ratio=0.0), params, state, x, train=True)
    assert not np.allclose(np.asarray(dropped), np.asarray(kept))
    assert float(convnet.accuracy(cfg, params, state, x, jnp.asarray(t))) == pytest.approx(
        np.mean(np.argmax(np.asarray(nhwc), -1) == t))
    with pytest.raises(ValueError, match="key"):
        convnet.apply(cfg, params, state, x, train=True)


@pytest.mark.parametrize("change,field", [
    (dict(input_shape=(28, 28)), "input_shape"), (dict(input_shape=(28, 0, 1)), "input_shape"),
    (dict(num_filters=0), "num_filters"), (dict(filter_size=0), "filter_size"), (dict(stride=0), "stride"),
    (dict(pad=-1), "pad"), (dict(pool_size=0), "pool_size"), (dict(output_size=0), "output_size"),
    (dict(hidden_sizes=(100, 0)), "hidden_sizes"), (dict(filter_size=29), "filter_size=29 is larger"),
    (dict(pool_size=5), "pool_size=5 does not divide"), (dict(activation="tanh"), "activation"),
    (dict(norm="bn"), "norm"), (dict(dropout_ratio=1.0), "dropout_ratio"), (dict(num_filters=2.5), "num_filters"),
])
def test_a_config_that_cannot_build_a_network_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        convnet.init(convnet.ConvNetConfig(**change), jax.random.key(0))


def test_mismatched_inputs_configs_and_params_are_refused_clearly():
    cfg = _net(norm=True)
    params, state = convnet.init(cfg, jax.random.key(0))
    x = jnp.zeros((2, 8, 8, 2))
    with pytest.raises(TypeError, match="ConvNetConfig"):
        convnet.init(jax.random.key(0), cfg)
    with pytest.raises(TypeError, match="ConvNetConfig"):
        convnet.apply(model.MLPConfig(), params, state, x, train=False)
    for bad in (jnp.zeros((2, 64)), jnp.zeros((2, 8, 8, 1)), jnp.zeros((8, 8, 2))):
        with pytest.raises(ValueError, match=r"x must be \[N, 128\]"):
            convnet.apply(cfg, params, state, bad, train=False)
    with pytest.raises(ValueError, match="disagree on the norm"):
        convnet.apply(cfg.replace(norm=None), params, state, x, train=False)
    with pytest.raises(ValueError, match="kernel"):
        convnet.apply(cfg.replace(num_filters=5), params, state, x, train=False)
    with pytest.raises(ValueError, match="Affine weights"):
        convnet.fold(cfg.replace(hidden_sizes=(7,)), params, state)
    mlp_params, mlp_state = model.init(model.MLPConfig(128, (6,), 5), jax.random.key(0))
    with pytest.raises(TypeError, match="ConvNetParams"):
        convnet.apply(cfg.replace(norm=None), mlp_params, mlp_state, x, train=False)
    with pytest.raises(ValueError, match="weight_scale"):
        convnet.init(cfg, jax.random.key(0), weight_scale=jnp.ones(2))
    with pytest.raises(ValueError, match="weight_init"):
        convnet.init(cfg, jax.random.key(0), weight_init="lecun")


# --- Cost model, precision -------------------------------------------------------------------------------------------


def test_num_flops_is_the_hand_count():
    cfg = convnet.ConvNetConfig(input_shape=(6, 6, 1), num_filters=2, filter_size=3, hidden_sizes=(3,), output_size=3)
    # conv 4x4 outputs x 2 filters x 9 taps = 288 MACs per image; Affine 8x3 + 3x3 = 33; batch 5, 2 FLOPs a MAC.
    assert convnet.num_flops(cfg, 5) == 2 * 5 * (288 + 33) == 3210
    # backward: every weight gradient (288 + 33) and the input gradients of the Affines only (33).
    assert convnet.num_flops(cfg, 5, backward=True) == 3210 + 3210 + 2 * 5 * 33
    # The book's net: 24*24*30*25 + 4320*100 + 100*10 MACs per image.
    assert convnet.num_flops(convnet.ConvNetConfig(), 1) == 2 * (432000 + 432000 + 1000)


@pytest.mark.parametrize("norm,dropout", [(None, 0.0), (True, 0.5)])
def test_activation_floats_covers_what_autodiff_keeps_per_image(norm, dropout):
    cfg = convnet.ConvNetConfig(norm=norm, dropout_ratio=dropout)
    params, state = jax.eval_shape(lambda: convnet.init(cfg, jax.random.key(0)))

    def kept(batch):  # the floats of the residuals jax.vjp keeps for the backward pass of one training step
        x, t = jax.ShapeDtypeStruct((batch, 784), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32)

        def residuals(p, s, xx, tt):
            return jax.vjp(lambda q: convnet.loss(cfg, q, s, xx, tt, train=True, key=jax.random.key(0))[0], p)[1]

        leaves = jax.tree_util.tree_leaves(jax.eval_shape(residuals, params, state, x, t))
        return sum(math.prod(a.shape) for a in leaves)

    per_image = (kept(33) - kept(1)) / 32  # weight copies the backward keeps do not grow with the batch
    assert per_image <= convnet.activation_floats(cfg, 1) <= 4 * per_image, per_image
    assert convnet.activation_floats(cfg, 200) == 200 * convnet.activation_floats(cfg, 1)
    assert convnet.activation_floats(cfg, 1) == 784 + 8 * 24 * 24 * 30 + 6 * (4320 + 100 + 10)


def test_the_kernel_gradient_is_a_matmul_not_a_second_convolution():
    # XLA's CPU convolution for the kernel gradient is ~10x slower inside a training loop (see bnjax/_conv_ops.py).
    cfg = _net()
    params, state = convnet.init(cfg, jax.random.key(0))
    grad = jax.grad(lambda p: convnet.loss(cfg, p, state, jnp.zeros((2, 128)), jnp.zeros((2,), jnp.int32),
                                           train=True)[0])
    names = [e.primitive.name for e in _equations(jax.make_jaxpr(grad)(params).jaxpr)]
    assert names.count("conv_general_dilated") == 1  # the forward pass's


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (custom derivatives, jit)."""
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("precision,expected", [("bfloat16", "DEFAULT"), ("float32", "HIGHEST")])
def test_the_callers_matmul_precision_reaches_the_convolution_and_its_gradient(precision, expected):
    cfg = _net()
    params, state = convnet.init(cfg, jax.random.key(0))
    x, t = jnp.zeros((2, 128)), jnp.zeros((2,), jnp.int32)
    with jax.default_matmul_precision(precision):
        for f in (lambda p: convnet.apply(cfg, p, state, x, train=False)[0],
                  jax.grad(lambda p: convnet.loss(cfg, p, state, x, t, train=True)[0])):
            found = [(e.primitive.name, e.params["precision"]) for e in _equations(jax.make_jaxpr(f)(params).jaxpr)
                     if e.primitive.name in ("conv_general_dilated", "dot_general")]
            assert {name for name, _ in found} == {"conv_general_dilated", "dot_general"}
            assert all(p is not None and p[0].name == expected for _, p in found), found
