"""bnjax.layers: Affine, dropout, softmax cross-entropy, torch interop, and the norm names it re-exports."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from conftest import x64
from experiments.numpy_book import SoftmaxWithLoss, softmax


def test_softmax_cross_entropy_value_and_gradient_match_reference():
    rng = np.random.default_rng(2)
    with x64():
        logits = rng.normal(size=(9, 4)) * 3
        t = rng.integers(0, 4, 9)
        ref = SoftmaxWithLoss()
        value = ref.forward(logits, t)
        grad = jax.grad(layers.softmax_cross_entropy)(jnp.asarray(logits), jnp.asarray(t))
        np.testing.assert_allclose(float(layers.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(t))), value,
                                   rtol=1e-12)
        np.testing.assert_allclose(np.asarray(grad), ref.backward(), atol=1e-12)
    with pytest.raises(TypeError, match="integer"):
        layers.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="labels shape"):
        layers.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.zeros(3, jnp.int32))


# --------------------------------------------------------------------------------------------------
# Affine, dropout, interop
# --------------------------------------------------------------------------------------------------


def test_affine_init_scales():
    key = jax.random.key(13)
    for std, expected in ((0.05, 0.05), ("he", np.sqrt(2 / 400)), ("xavier", np.sqrt(1 / 400))):
        p = layers.affine_init(key, 400, 300, std)
        assert abs(float(p.W.std()) / expected - 1) < 0.02
        assert np.all(np.asarray(p.b) == 0)
    # A traced scale: vmap over scales.
    Ws = jax.vmap(lambda s: layers.affine_init(key, 10, 10, s).W)(jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(np.asarray(Ws[1]), np.asarray(Ws[0]) * 0.5, rtol=1e-6)


def test_dropout():
    x = jnp.ones((200, 100))
    key = jax.random.key(14)
    y = layers.dropout_apply(x, key, 0.3, train=True)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.3) < 0.02
    np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.03)  # inverted: expectation kept
    np.testing.assert_array_equal(np.asarray(layers.dropout_apply(x, key, 0.3, train=True)), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(layers.dropout_apply(x, None, 0.3, train=False)), np.asarray(x))
    book = layers.dropout_apply(x, None, 0.3, train=False, inverted=False)
    np.testing.assert_allclose(np.asarray(book), 0.7)
    with pytest.raises(ValueError, match="key"):
        layers.dropout_apply(x, None, 0.3, train=True)


def test_torch_state_dict_conversion_reproduces_pytorch_update():
    rng = np.random.default_rng(15)
    sd = {
        "weight": rng.uniform(0.5, 1.5, 3), "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3), "running_var": rng.uniform(0.5, 2, 3),
    }
    params, state, kw = layers.torch_batch_norm_to_bnjax(sd)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y, new_state = layers.batch_norm_apply(params, state, jnp.asarray(x), train=True, **kw)
    # PyTorch, written from its documentation: momentum 0.1 on the new value, unbiased running var, eps 1e-5.
    exp_mean = 0.9 * sd["running_mean"] + 0.1 * x.mean(0)
    exp_var = 0.9 * sd["running_var"] + 0.1 * x.var(0, ddof=1)
    np.testing.assert_allclose(np.asarray(new_state.mean), exp_mean, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.var), exp_var, rtol=1e-5)
    exp_y = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * sd["weight"] + sd["bias"]
    np.testing.assert_allclose(np.asarray(y), exp_y, atol=1e-5)


def test_softmax_reference_is_sane():
    # Guards the oracle itself.
    p = softmax(np.array([[1.0, 2.0, 3.0]]))
    np.testing.assert_allclose(p.sum(), 1.0)


def test_affine_init_weight_init_policy_weight_scale_and_use_bias():
    key = jax.random.key(7)
    noise = np.asarray(jax.random.normal(key, (12, 5), jnp.float32))
    # the policy's std times normal(key) (the book's), bit for bit with weight_scale the Python 1.0
    for weight_init, std in ((0.3, 0.3), ("he", (2.0 / 12) ** 0.5), ("relu", (2.0 / 12) ** 0.5),
                             ("xavier", (1.0 / 12) ** 0.5), ("sigmoid", (1.0 / 12) ** 0.5)):
        p = layers.affine_init(key, 12, 5, weight_init)
        np.testing.assert_array_equal(np.asarray(p.W), np.float32(std) * noise)
        np.testing.assert_array_equal(np.asarray(p.b), np.zeros(5, np.float32))
        scaled = layers.affine_init(key, 12, 5, weight_init, weight_scale=2.5)
        np.testing.assert_array_equal(np.asarray(scaled.W), (np.float32(std) * np.float32(2.5)) * noise)
    # weight_scale may be traced (vmap over scales)
    Ws = jax.vmap(lambda s: layers.affine_init(key, 12, 5, "he", weight_scale=s).W)(jnp.array([1.0, 3.0]))
    np.testing.assert_allclose(np.asarray(Ws[1]), 3.0 * np.asarray(Ws[0]), rtol=1e-6)
    assert layers.resolve_init_std("He", 8) == 0.5 and layers.resolve_init_std(0.2, 8) == 0.2
    # use_bias=False: no bias (an Affine before a norm), and affine_apply is x @ W
    nb = layers.affine_init(key, 12, 5, 0.3, use_bias=False)
    assert nb.b is None
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 12)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(layers.affine_apply(nb, x)), np.asarray(x @ nb.W))
    with pytest.raises(ValueError, match="scalar"):
        layers.affine_init(key, 12, 5, 0.3, weight_scale=jnp.ones(2))
    with pytest.raises(TypeError):
        layers.affine_init(key, 12, 5, 0.3, jnp.float64)  # dtype is keyword-only now


def test_dropout_takes_dropout_ratio_and_requires_train():
    x = jnp.ones((50, 40))
    key = jax.random.key(3)
    y = layers.dropout_apply(x, key, dropout_ratio=0.25, train=True)
    kept = np.asarray(y) != 0
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)
    assert 0.65 < kept.mean() < 0.85
    with pytest.raises(TypeError, match="train"):
        layers.dropout_apply(x, key, 0.25)
    with pytest.raises(TypeError):
        layers.dropout_apply(x, key, 0.25, True)  # train is keyword-only
    with pytest.raises(ValueError, match="dropout_ratio"):
        layers.dropout_apply(x, key, 1.0, train=True)


def test_layers_re_exports_every_public_norm_name():
    from bnjax import norms

    for name in norms.__all__:
        if name == "recalibrate":  # the network-wide one; layers.recalibrate is the one-layer version
            continue
        assert getattr(layers, name) is getattr(norms, name), name
        assert name in layers.__all__, name
    assert layers.recalibrate is norms.recalibrate_norm
    assert layers.book_batch_norm() == norms.book_batch_norm()
