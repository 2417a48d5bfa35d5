"""The Norm protocol, validation, hashing and describe (recalibrate: test_norms_precise.py; folding:
test_norms_fold.py)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers, norms
from conftest import x64
from norms_oracle import _a


# --- Validation, hashing, describe -------------------------------------------------------------------------


@pytest.mark.parametrize("factory,kw,exc", [
    (layers.batch_norm, dict(momentum=1.5), ValueError),
    (layers.batch_norm, dict(eps=0.0), ValueError),
    (layers.batch_norm, dict(use_scale=1), TypeError),
    (layers.batch_norm, dict(unbiased_running_var="yes"), TypeError),
    (layers.batch_renorm, dict(momentum=1.5), ValueError),
    (layers.batch_renorm, dict(eps=0.0), ValueError),
    (layers.batch_renorm, dict(r_max=0.5), ValueError),
    (layers.batch_renorm, dict(d_max=-1.0), ValueError),
    (layers.batch_renorm, dict(running_average="x"), ValueError),
    (layers.batch_renorm, dict(warmup=(5, 1, 1)), ValueError),
    (layers.batch_renorm, dict(warmup=(1, 2)), ValueError),
    (layers.batch_renorm, dict(use_scale=None), TypeError),
    (layers.batch_renorm, dict(init_var=-1.0), ValueError),
    (lambda **kw: layers.ghost_batch_norm(4, **kw), dict(momentum=1.5), ValueError),
    (lambda **kw: layers.ghost_batch_norm(4, **kw), dict(eps=0.0), ValueError),
    (lambda **kw: layers.ghost_batch_norm(4, **kw), dict(use_offset="no"), TypeError),
])
def test_norm_factories_reject_bad_hyper_parameters(factory, kw, exc):
    with pytest.raises(exc):
        factory(**kw)


def test_norm_values_are_hashable_equal_by_value_and_static_for_jit():
    assert layers.batch_norm(0.9) == layers.batch_norm(0.9)
    assert hash(layers.batch_norm(0.9)) == hash(layers.batch_norm(np.float64(0.9)))
    assert layers.batch_norm(0.9) != layers.batch_norm(0.8)
    assert layers.batch_renorm(warmup=[1, 2, 3]) == layers.batch_renorm(warmup=(1, 2, 3))
    assert hash(layers.batch_renorm(warmup=[1, 2, 3])) == hash(layers.batch_renorm(warmup=(1, 2, 3)))
    assert layers.ghost_batch_norm(4) == layers.ghost_batch_norm(4) != layers.ghost_batch_norm(5)
    assert len({layers.batch_norm(), layers.batch_renorm(), layers.ghost_batch_norm(8), layers.batch_norm()}) == 3
    traces = []

    def f(norm, p, s, x):
        traces.append(1)
        return norm.apply(p, s, x, train=True)

    jf = jax.jit(f, static_argnums=0)
    params, state = layers.batch_norm(0.9).init(3)
    x = jnp.ones((4, 3))
    jf(layers.batch_norm(0.9), params, state, x)
    jf(layers.batch_norm(0.9), params, state, x)  # a new but equal value: no retrace
    assert len(traces) == 1
    jf(layers.batch_norm(0.8), params, state, x)
    assert len(traces) == 2


def test_describe_is_json_serialisable():
    for norm in (layers.batch_norm(0.8, unbiased_running_var=True), layers.batch_renorm(warmup=(1, 2, 3)),
                 layers.ghost_batch_norm(np.int64(16))):
        d = json.loads(json.dumps(norm.describe()))
        assert d["norm"] == type(norm).__name__
        assert d["momentum"] == norm.momentum and d["eps"] == norm.eps
    assert json.loads(json.dumps(layers.batch_renorm(warmup=(1, 2, 3)).describe()))["warmup"] == [1, 2, 3]
    assert json.loads(json.dumps(layers.ghost_batch_norm(np.int64(16)).describe()))["virtual_batch_size"] == 16


def test_norm_misuse_gets_a_message_that_says_what_to_do():
    renorm = layers.batch_renorm()
    bn_params, bn_state = layers.batch_norm(0.9).init(3)
    x = jnp.ones((4, 3))
    with pytest.raises(TypeError, match="BatchRenormState"):
        renorm.apply(bn_params, bn_state, x, train=True)
    with pytest.raises(TypeError, match="momentum cannot be set here"):
        layers.recalibrate(layers.batch_norm(), bn_params, bn_state, jnp.ones((2, 4, 3)), momentum=0.5)
    with x64():  # the schedule in the default float dtype: float64 limits under x64
        r, d = layers.renorm_schedule(1, 3.0, 5.0, hold_steps=0, r_steps=3, d_steps=3)
        assert float(r) == pytest.approx(5.0 / 3.0, rel=1e-15) and float(d) == pytest.approx(5.0 / 3.0, rel=1e-15)


@pytest.mark.parametrize("kwargs, error", [
    (dict(r_max=-2.0), ValueError), (dict(r_max=0.5), ValueError), (dict(r_max=0.0), ValueError),
    (dict(d_max=-1.0), ValueError), (dict(r_max=float("nan")), ValueError), (dict(d_max=float("inf")), ValueError),
    (dict(r_max=True), TypeError), (dict(r_max="3"), TypeError), (dict(r_max=np.ones((2, 3))), ValueError),
])
def test_renorm_limits_given_per_call_are_checked_when_concrete(kwargs, error):
    renorm = layers.batch_renorm()
    params, state = renorm.init(3)
    x = jnp.asarray(np.random.default_rng(120).normal(size=(8, 3)), jnp.float32)
    with pytest.raises(error, match="r_max|d_max"):
        renorm.apply(params, state, x, train=True, **kwargs)
    # traced limits pass unchecked (a schedule), per-feature limits are fine
    jax.jit(lambda r: renorm.apply(params, state, x, train=True, r_max=r)[0])(2.0)
    renorm.apply(params, state, x, train=True, r_max=np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="r_max"):
        layers.renorm_schedule(10, r_max=0.5)
    with pytest.raises(ValueError, match="hold_steps"):
        layers.renorm_schedule(10, hold_steps=-5)
    r, d = jax.jit(lambda r: layers.renorm_schedule(30000, r_max=r, d_max=4.0))(2.0)
    assert float(r) == pytest.approx(1 + 1.0 * 25 / 35) and float(d) == 4.0


def test_wrong_state_kind_keyword_and_feature_axes_get_clear_errors():
    x = jnp.ones((4, 3))
    renorm_params, renorm_state = layers.batch_renorm().init(3)
    for apply in (layers.batch_norm().apply, layers.ghost_batch_norm(2).apply, layers.batch_norm_apply):
        with pytest.raises(TypeError, match="BatchRenormState"):
            apply(renorm_params, renorm_state, x, train=True)
    params, state = layers.batch_norm().init(3)
    with pytest.raises(TypeError, match="eps belongs to the norm value"):
        layers.batch_norm().apply(params, state, x, train=True, eps=1e-3)
    for bad in ("train", "update_stats"):
        with pytest.raises(TypeError, match=f"{bad} cannot be set"):
            layers.recalibrate(layers.batch_norm(), params, state, jnp.ones((2, 4, 3)), **{bad: False})
    with pytest.raises(ValueError, match="N >= 1"):
        layers.recalibrate(layers.batch_norm(), params, state, jnp.ones((2, 0, 3)))
    for bad in (1.0, True, (), "1"):
        with pytest.raises(TypeError, match="feature_axes"):
            layers.batch_norm_apply(params, state, x, train=True, feature_axes=bad)
    y, _ = layers.batch_norm_apply(params, state, x, train=True, feature_axes=np.int64(1))  # NumPy ints are axes
    assert y.shape == x.shape
    with pytest.raises(NotImplementedError, match="must define init"):
        layers.Norm().init(3)


# --- The Norm protocol, defaults, jit ----------------------------------------------------------------------


def test_defaults_are_flax_and_pytorchs_and_book_batch_norm_is_the_books():
    assert layers.CONVENTIONS["init_var"] == 1.0 and layers.CONVENTIONS["init_mean"] == 0.0
    for state in (layers.batch_norm_init(3)[1], layers.batch_norm().init(3)[1], layers.batch_renorm().init(3)[1],
                  layers.ghost_batch_norm(4).init(3)[1]):
        np.testing.assert_array_equal(_a(state.mean), np.zeros(3))
        np.testing.assert_array_equal(_a(state.var), np.ones(3))
    book = layers.book_batch_norm()
    assert isinstance(book, layers.BatchNorm)
    assert (book.momentum, book.eps, book.init_mean, book.init_var) == (0.9, 1e-6, 0.0, 0.0)
    assert (book.unbiased_running_var, book.use_scale, book.use_offset) == (False, True, True)
    assert book == layers.batch_norm(momentum=0.9, eps=1e-6, init_var=0.0)
    np.testing.assert_array_equal(_a(book.init(3)[1].var), np.zeros(3))
    assert all(cls.has_running_stats for cls in (layers.BatchNorm, layers.BatchRenorm, layers.GhostBatchNorm))


def test_train_is_required_and_keyword_only():
    x = jnp.ones((4, 3))
    params, state = layers.batch_norm_init(3)
    with pytest.raises(TypeError, match="train"):
        layers.batch_norm_apply(params, state, x)
    with pytest.raises(TypeError):
        layers.batch_norm_apply(params, state, x, True)
    for norm in (layers.batch_norm(), layers.batch_renorm(), layers.ghost_batch_norm(2)):
        p, s = norm.init(3)
        with pytest.raises(TypeError, match="train"):
            norm.apply(p, s, x)
        with pytest.raises(TypeError):
            norm.apply(p, s, x, True)
        # the one keyword set every norm accepts
        y, _ = norm.apply(p, s, x, train=True, momentum=None, mask=None, axis_name=None)
        assert y.shape == x.shape


@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm",
                                  pytest.param("ghost_batch_norm", marks=pytest.mark.slow)])  # the slowest of three
def test_norm_values_pass_through_jit_as_ordinary_arguments(name):
    make = {"batch_norm": lambda m: layers.batch_norm(m, 1e-5),
            "batch_renorm": lambda m: layers.batch_renorm(m, 1e-5, r_max=1.5, d_max=0.5),
            "ghost_batch_norm": lambda m: layers.ghost_batch_norm(4, m, 1e-5)}[name]
    norm = make(0.8)
    assert jax.tree_util.tree_leaves(norm) == []  # a static pytree: no leaves, the value is the structure
    params, state = norm.init(3)
    x = jnp.asarray(np.random.default_rng(5).normal(2.0, 3.0, (7, 3)), jnp.float32)
    traces = []

    @jax.jit
    def step(norm, params, state, x):
        traces.append(1)
        return norm.apply(params, state, x, train=True)

    y, s = step(norm, params, state, x)
    y_eager, s_eager = norm.apply(params, state, x, train=True)
    np.testing.assert_allclose(_a(y), _a(y_eager), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_a(s.mean), _a(s_eager.mean), rtol=1e-6)
    step(make(0.8), params, state, x)  # an equal value: no new trace
    assert len(traces) == 1
    _, s2 = step(make(0.5), params, state, x)  # another value: its own momentum
    assert len(traces) == 2
    np.testing.assert_allclose(_a(s2.mean), 0.5 * _a(state.mean) + 0.5 * _a(x).mean(0), rtol=1e-5, atol=1e-6)
    # inside a larger static-free structure too
    out = jax.jit(lambda cfg, p, s, xx: cfg["norm"].apply(p, s, xx, train=False)[0])({"norm": norm}, params, state, x)
    assert out.shape == x.shape


@dataclasses.dataclass(frozen=True)
class _TinyLayerNorm(layers.Norm):
    """A norm without running statistics, written here from the formula: per row, over the features."""

    def init(self, num_features, dtype=jnp.float32):
        return layers.BatchNormParams(jnp.ones(num_features, dtype), jnp.zeros(num_features, dtype)), ()

    def apply(self, params, state, x, *, train, momentum=None, mask=None, axis_name=None):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return params.gamma * (x - mu) / jnp.sqrt(var + self.eps) + params.beta, state


def test_a_norm_without_running_statistics_subclasses_norm_with_init_and_apply_only():
    ln = _TinyLayerNorm()
    assert ln.has_running_stats is False and ln.eps == layers.CONVENTIONS["eps"]
    assert ln.describe() == {"norm": "_TinyLayerNorm"}
    params, state = ln.init(4)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(5, 4)), jnp.float32)
    y, _ = jax.jit(lambda n, p, s, xx: n.apply(p, s, xx, train=True))(ln, params, state, x)
    xd = _a(x).astype(np.float64)
    exp = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(_a(y), exp, rtol=1e-5, atol=1e-5)
    # one layer without running statistics: nothing to recalibrate, refused; inside a network it is left as it is
    batches = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="no running statistics"):
        layers.recalibrate(ln, params, state, batches)
    bn = layers.batch_norm()
    bp, bs = bn.init(4)

    def forward(p, s, xx, *, train, key=None):
        h, s0 = ln.apply(p[0], s[0], xx, train=train)
        h, s1 = bn.apply(p[1], s[1], h, train=train)
        return h, (s0, s1)

    new = norms.recalibrate(forward, (params, bp), ((), bs), batches + jnp.arange(4.0))
    assert new[0] == ()
    row = (np.arange(1.0, 5.0) - 2.5) / np.sqrt(1.25 + 1e-6)  # every row is 1, 2, 3, 4 after layer norm
    np.testing.assert_allclose(_a(new[1].mean), row, rtol=1e-5)
    np.testing.assert_allclose(_a(new[1].var), np.zeros(4), atol=1e-6)
    # folding refuses it
    aff = layers.AffineParams(jnp.ones((3, 4)), jnp.zeros(4))
    with pytest.raises(ValueError, match="no running statistics"):
        layers.fold_batch_norm(aff, ln, params, layers.BatchNormState(jnp.zeros(4), jnp.ones(4)))
    with pytest.raises(ValueError, match="no running statistics"):
        layers.fold_conv_batch_norm(jnp.ones((1, 1, 3, 4)), None, ln, params,
                                    layers.BatchNormState(jnp.zeros(4), jnp.ones(4)))


def test_a_per_feature_hyper_parameter_of_the_wrong_length_is_named():
    # issue 15, item 14: before, JAX's "max got incompatible shapes for broadcasting: (3,), (4,)"
    x = jnp.asarray(np.random.default_rng(20).normal(size=(6, 4)), jnp.float32)
    renorm = layers.batch_renorm()
    params, state = renorm.init(4)
    for name in ("r_max", "d_max"):
        with pytest.raises(ValueError, match=rf"{name} must be a scalar or one value per feature \(shape \(4,\)\), "
                                             r"got shape \(3,\)"):
            renorm.apply(params, state, x, train=True, **{name: jnp.full(3, 2.0)})
        with pytest.raises(ValueError, match=rf"{name} must be a scalar or one value per feature"):  # traced too
            jax.jit(lambda v, name=name: renorm.apply(params, state, x, train=True, **{name: v})[0])(jnp.full(3, 2.0))
    y, _ = renorm.apply(params, state, x, train=True, r_max=jnp.full(4, 2.0), d_max=jnp.zeros(4))
    assert y.shape == x.shape and np.all(np.isfinite(_a(y)))
    for norm in (layers.batch_norm(), renorm, layers.ghost_batch_norm(3)):
        p, s = norm.init(4)
        with pytest.raises(ValueError, match=r"momentum must be a scalar or one value per feature \(shape \(4,\)\)"):
            norm.apply(p, s, x, train=True, momentum=jnp.full(3, 0.5))
    with pytest.raises(ValueError, match=r"momentum must be a scalar or one value per feature"):
        layers.batch_norm_apply(*layers.batch_norm_init(4), x, train=True, momentum=np.full(2, 0.5))
    # one momentum per feature of the right length is the formula feature by feature
    m = jnp.asarray([0.1, 0.5, 0.9, 1.0])
    _, s = layers.batch_norm_apply(*layers.batch_norm_init(4), x, train=True, momentum=m)
    np.testing.assert_allclose(_a(s.mean), (1 - _a(m)) * _a(x).mean(0), rtol=1e-5, atol=1e-7)
