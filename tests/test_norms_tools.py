"""recalibrate (precise statistics), folding, the Norm protocol, validation, hashing and describe."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers, norms
from conftest import x64
from norms_oracle import _a, _bn_params, _np_bn_eval, _np_ghost, _np_pool


# --- recalibrate ---------------------------------------------------------------------------------------


_RECAL = {
    "batch_norm": lambda: layers.batch_norm(0.9, 1e-5),
    "batch_norm_unbiased": lambda: layers.batch_norm(0.9, 1e-5, unbiased_running_var=True),
    "batch_renorm": lambda: layers.batch_renorm(0.9, 1e-5),
    "batch_renorm_std": lambda: layers.batch_renorm(0.9, 1e-5, running_average="std"),
    "ghost_batch_norm": lambda: layers.ghost_batch_norm(3, 0.9, 1e-5),
}


@pytest.mark.parametrize("name", list(_RECAL))
def test_recalibrate_is_the_mean_of_the_per_batch_statistics(name):
    norm = _RECAL[name]()
    rng = np.random.default_rng(116)
    nb, n, c = 4, 8, 3
    batches = rng.normal(0.0, 1.0, (nb, n, c)) * rng.uniform(0.5, 4.0, (nb, 1, c)) + rng.normal(0, 5, (nb, 1, c))
    batches = batches.astype(np.float32)
    params = _bn_params(rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32))
    _, state = norm.init(c)
    state = state._replace(mean=state.mean + 7.0, var=state.var + 9.0)  # must not leak into the result
    if "renorm" in name:
        state = state._replace(step=jnp.asarray(17, jnp.int32))
    bd = batches.astype(np.float64)
    if name.startswith("ghost"):
        stats = [_np_pool(_np_ghost(b, 3, 1.0, 0.0, 0.0, 0.0, momentum=0.0, eps=1e-5)[3], 0.0, 0.0, 0.0)
                 for b in bd]
        exp_mean, exp_var = np.mean([s[0] for s in stats], 0), np.mean([s[1] for s in stats], 0)
        assert np.abs(exp_var - np.mean([b.var(0) for b in bd], 0)).min() > 1e-2  # pooled groups != full batch
    else:
        ddof = 1 if name.endswith("unbiased") else 0
        exp_mean = np.mean([b.mean(0) for b in bd], 0)
        exp_var = np.mean([b.var(0, ddof=ddof) for b in bd], 0)
    for fn in (layers.recalibrate, jax.jit(layers.recalibrate, static_argnums=0)):
        new = fn(norm, params, state, jnp.asarray(batches))
        assert type(new) is type(state)
        np.testing.assert_allclose(_a(new.mean), exp_mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_a(new.var), exp_var, rtol=1e-5)
        if "renorm" in name:
            assert int(new.step) == 17


# --- Folding ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_gamma,use_beta", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fold_batch_norm_equals_affine_then_batch_norm_eval(dtype, use_gamma, use_beta):
    rng = np.random.default_rng(117)
    nin, nout, n, eps = 6, 4, 5, 1e-5
    W = rng.normal(0, 0.7, (nin, nout))
    b = rng.normal(0, 1.0, nout)
    x = rng.normal(1.0, 2.0, (n, nin))
    gamma = rng.uniform(0.5, 2.0, nout) if use_gamma else None
    beta = rng.normal(0, 1.0, nout) if use_beta else None
    mean, var = rng.normal(2.0, 1.0, nout), rng.uniform(0.3, 3.0, nout)
    tol = 1e-5 if dtype == "float32" else 1e-12
    with x64():
        dt = jnp.dtype(dtype)
        aff = layers.AffineParams(jnp.asarray(W, dt), jnp.asarray(b, dt))
        bnp = _bn_params(gamma, beta, dt)
        st = layers.BatchNormState(jnp.asarray(mean, dt), jnp.asarray(var, dt))
        folded = layers.fold_batch_norm(aff, layers.batch_norm(eps=eps), bnp, st)
        assert folded.W.dtype == dt and folded.b.dtype == dt
        y_fold = _a(layers.affine_apply(folded, jnp.asarray(x, dt)))
        y_ref, _ = layers.batch_norm_apply(bnp, st, layers.affine_apply(aff, jnp.asarray(x, dt)), train=False,
                                           eps=eps)
    y_np = _np_bn_eval(x @ W + b, gamma, beta, mean, var, eps)
    scale = np.abs(y_np).max()
    np.testing.assert_allclose(y_fold, _a(y_ref), rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(y_fold, y_np, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fold_conv_batch_norm_equals_conv_then_batch_norm_eval(dtype, with_bias):
    rng = np.random.default_rng(118)
    cin, cout, eps = 3, 4, 1e-5
    kernel = rng.normal(0, 0.5, (3, 2, cin, cout))
    bias = rng.normal(size=cout) if with_bias else None
    x = rng.normal(1.0, 2.0, (2, 5, 6, cin))
    gamma, beta = rng.uniform(0.5, 2.0, cout), rng.normal(size=cout)
    mean, var = rng.normal(2.0, 1.0, cout), rng.uniform(0.3, 3.0, cout)
    tol = 1e-5 if dtype == "float32" else 1e-12
    with x64():
        dt = jnp.dtype(dtype)

        def conv(k, bb, xx):
            out = jax.lax.conv_general_dilated(xx, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               precision=jax.lax.Precision.HIGHEST)
            return out if bb is None else out + bb

        bnp = _bn_params(gamma, beta, dt)
        st = layers.BatchNormState(jnp.asarray(mean, dt), jnp.asarray(var, dt))
        k_dt, b_dt = jnp.asarray(kernel, dt), (None if bias is None else jnp.asarray(bias, dt))
        fk, fb = layers.fold_conv_batch_norm(k_dt, b_dt, layers.batch_norm(eps=eps), bnp, st)
        assert fk.shape == kernel.shape and fb.shape == (cout,) and fk.dtype == dt
        y_fold = _a(conv(fk, fb, jnp.asarray(x, dt)))
        y_ref, _ = layers.batch_norm_apply(bnp, st, conv(k_dt, b_dt, jnp.asarray(x, dt)), train=False, eps=eps)
        # Independent float64 conv for the NumPy oracle.
        conv64 = _a(conv(jnp.asarray(kernel), None if bias is None else jnp.asarray(bias), jnp.asarray(x)))
    y_np = _np_bn_eval(conv64, gamma, beta, mean, var, eps)
    scale = np.abs(y_np).max()
    np.testing.assert_allclose(y_fold, _a(y_ref), rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(y_fold, y_np, rtol=tol, atol=tol * scale)


def test_fold_shape_mismatches_raise():
    aff = layers.AffineParams(jnp.ones((5, 3)), jnp.zeros(3))
    good = layers.BatchNormState(jnp.zeros(3), jnp.ones(3))
    bn = layers.batch_norm()
    with pytest.raises(ValueError):
        layers.fold_batch_norm(aff, bn, _bn_params(np.ones(4), np.zeros(3)), good)
    with pytest.raises(ValueError):
        layers.fold_batch_norm(aff, bn, _bn_params(np.ones(3), np.zeros(3)),
                               layers.BatchNormState(jnp.zeros(4), jnp.ones(4)))
    with pytest.raises(ValueError):
        layers.fold_conv_batch_norm(jnp.ones((3, 3, 2, 4)), None, bn, _bn_params(np.ones(3), None), good)
    with pytest.raises(ValueError):
        layers.fold_conv_batch_norm(jnp.ones((3, 2, 3)), None, bn, _bn_params(np.ones(3), None), good)
    # eps comes from the norm and is checked there too (a value forced past its own check)
    zero_eps = layers.batch_norm()
    object.__setattr__(zero_eps, "eps", 0.0)
    with pytest.raises(ValueError, match="eps"):
        layers.fold_batch_norm(aff, zero_eps, _bn_params(np.ones(3), np.zeros(3)), good)


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


def test_fold_refuses_integer_weights_negative_variance_and_a_bias_of_the_wrong_size():
    params, state = layers.batch_norm().init(3)
    aff = layers.AffineParams(jnp.ones((2, 3), jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="floating"):
        layers.fold_batch_norm(aff, layers.batch_norm(), params, state)
    with pytest.raises(ValueError, match="variance must be >= 0"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((2, 3)), jnp.zeros(3)), layers.batch_norm(), params,
                               state._replace(var=jnp.array([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_conv_batch_norm(jnp.ones((3, 3, 2, 3)), jnp.ones(4), layers.batch_norm(), params, state)


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
            "ghost_batch_norm": lambda m: layers.ghost_batch_norm(3, m, 1e-5)}[name]
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
    np.testing.assert_allclose(_a(y), _a(y_eager), rtol=1e-5, atol=1e-5)  # a lone ghost row: ~1e-6 apart
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
    # recalibrate leaves its state as it is, for one layer and inside a network
    batches = jnp.ones((2, 5, 4))
    assert layers.recalibrate(ln, params, state, batches) == ()
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


# --- Generic recalibrate on a network written here ------------------------------------------------------


def _two_layer_net(second):
    """x -> Affine -> batch norm -> ReLU -> dropout -> Affine -> ``second`` norm: a conv-free network."""
    first = layers.batch_norm(0.9, 1e-5)

    def forward(params, state, x, *, train, key=None, norm_kwargs=None):
        kw = norm_kwargs or {}
        h = layers.affine_apply(params["a1"], x)
        h, s1 = first.apply(params["n1"], state[0], h, train=train, **kw)
        h = layers.relu(h)
        if key is not None:
            h = layers.dropout_apply(h, key, 0.2, train=train)
        h = layers.affine_apply(params["a2"], h)
        h, s2 = second.apply(params["n2"], state[1], h, train=train, **kw)
        return h, (s1, s2)

    def init(key):
        k1, k2 = jax.random.split(key)
        rng = np.random.default_rng(9)
        p1, st1 = first.init(5)
        p2, st2 = second.init(3)
        p1 = layers.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
                                    jnp.asarray(rng.normal(size=5), jnp.float32))
        params = {"a1": layers.affine_init(k1, 4, 5, 0.8), "n1": p1, "a2": layers.affine_init(k2, 5, 3, 0.8),
                  "n2": p2}
        return params, (st1, st2)

    return forward, init


def _np_net_stats(params, x):
    """Float64 NumPy: the batch statistics of both norm layers of ``_two_layer_net`` (batch norm second) in
    training mode, no dropout."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = x @ p["a1"].W + p["a1"].b
    m1, v1 = h.mean(0), h.var(0)
    h = np.maximum(p["n1"].gamma * (h - m1) / np.sqrt(v1 + 1e-5) + p["n1"].beta, 0.0)
    h = h @ p["a2"].W + p["a2"].b
    return (m1, v1), (h.mean(0), h.var(0))


def test_generic_recalibrate_is_the_mean_of_each_layers_batch_statistics_and_ignores_nan_running_stats():
    forward, init = _two_layer_net(layers.batch_norm(0.9, 1e-5))
    params, state = init(jax.random.key(0))
    rng = np.random.default_rng(10)
    batches = (rng.normal(1.0, 2.0, (5, 8, 4)) * rng.uniform(0.5, 2.0, (5, 1, 4))).astype(np.float32)
    new = norms.recalibrate(forward, params, state, jnp.asarray(batches))
    per_batch = [_np_net_stats(params, b.astype(np.float64)) for b in batches]
    for layer in range(2):
        np.testing.assert_allclose(_a(new[layer].mean), np.mean([s[layer][0] for s in per_batch], 0),
                                   rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(_a(new[layer].var), np.mean([s[layer][1] for s in per_batch], 0),
                                   rtol=2e-5, atol=2e-5)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    # a stale NaN / inf running statistic does not leak into the result (bit for bit the same)
    stale = (state[0]._replace(mean=jnp.full(5, jnp.nan), var=jnp.full(5, jnp.inf)), state[1])
    again = norms.recalibrate(forward, params, stale, jnp.asarray(batches))
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(_a(a), _a(b))


@pytest.mark.parametrize("second,with_key", [
    ("batch_renorm_std", False),
    pytest.param("batch_norm", False, marks=pytest.mark.slow),
    pytest.param("ghost", False, marks=pytest.mark.slow),
    pytest.param("batch_norm", True, marks=pytest.mark.slow),
    pytest.param("batch_renorm_std", True, marks=pytest.mark.slow),
    pytest.param("ghost", True, marks=pytest.mark.slow),
])
def test_generic_recalibrate_is_bit_equal_to_momentum_zero_sums(second, with_key):
    # The arithmetic model.recalibrate had: a jitted scan of the training forward with momentum 0 from the given
    # state, sums of mean/var divided by the number of batches; the key folded with the batch index.
    norm = {"batch_norm": layers.batch_norm(0.9, 1e-5),
            "batch_renorm_std": layers.batch_renorm(0.9, 1e-5, r_max=1.5, d_max=0.5, running_average="std"),
            "ghost": layers.ghost_batch_norm(3, 0.9, 1e-5)}[second]
    forward, init = _two_layer_net(norm)
    params, state = init(jax.random.key(1))
    rng = np.random.default_rng(11)
    batches = jnp.asarray(rng.normal(0.5, 2.0, (4, 7, 4)), jnp.float32)
    # running statistics far from the batch ones (Batch Renorm's r and d read them in training mode)
    state = (state[0]._replace(mean=state[0].mean + 0.3, var=state[0].var * 2.0),
             state[1]._replace(mean=state[1].mean - 0.2, var=state[1].var + 0.7))
    if second.startswith("batch_renorm"):
        state = (state[0], state[1]._replace(step=jnp.asarray(9, jnp.int32)))
    key = jax.random.key(12) if with_key else None

    @jax.jit
    def reference(params, state, batches, key):
        def body(sums, xs):
            i, xb = xs
            k = None if key is None else jax.random.fold_in(key, i)
            _, s = forward(params, state, xb, train=True, key=k, norm_kwargs={"momentum": 0.0})
            return jax.tree_util.tree_map(lambda acc, n: acc + n, sums, [(b.mean, b.var) for b in s]), None

        zero = [(jnp.zeros_like(b.mean), jnp.zeros_like(b.var)) for b in state]
        sums, _ = jax.lax.scan(body, zero, (jnp.arange(batches.shape[0]), batches))
        num = batches.shape[0]
        return tuple(b._replace(mean=m / num, var=v / num) for b, (m, v) in zip(state, sums))

    exp = reference(params, state, batches, key)
    got = norms.recalibrate(forward, params, state, batches, key=key)
    for a, b in zip(jax.tree_util.tree_leaves(exp), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(_a(a), _a(b))
    if second.startswith("batch_renorm"):
        assert int(got[1].step) == 9
    # the same under an outer jit and vmap over two parameter sets (as the small-batch experiment calls it)
    two = jax.tree_util.tree_map(lambda a: jnp.stack([a, a * 1.5]), (params, state))
    vm_exp = jax.jit(jax.vmap(lambda p, s: reference(p, s, batches, key)))(*two)
    vm = jax.jit(jax.vmap(lambda p, s: norms.recalibrate(forward, p, s, batches, key=key)))(*two)
    for a, b in zip(jax.tree_util.tree_leaves(vm_exp), jax.tree_util.tree_leaves(vm)):
        np.testing.assert_array_equal(_a(a), _a(b))


def test_generic_recalibrate_checks_its_input():
    forward, init = _two_layer_net(layers.batch_norm())
    params, state = init(jax.random.key(2))
    for bad in (jnp.ones(4), jnp.ones((0, 3, 4)), jnp.ones((2, 0, 4))):
        with pytest.raises(ValueError, match="batches must be"):
            norms.recalibrate(forward, params, state, bad)
    with pytest.raises(TypeError, match="forward must be"):
        norms.recalibrate("forward", params, state, jnp.ones((2, 3, 4)))
    # a state without running statistics comes back as it is; a forward that reaches no running update is refused
    assert norms.recalibrate(forward, params, (), jnp.ones((2, 3, 4))) == ()
    with pytest.raises(ValueError, match="no running update"):
        norms.recalibrate(lambda p, s, x, *, train, key=None: (x, s), params, state, jnp.ones((2, 3, 4)))
    # the switch itself: a running update inside it stores the batch statistics, whatever the momentum
    x = jnp.asarray(np.random.default_rng(13).normal(size=(6, 3)), jnp.float32)
    p, s = layers.batch_norm_init(3)
    with norms.batch_statistics_as_state() as count:
        _, s_new = layers.batch_norm_apply(p, s._replace(mean=jnp.full(3, jnp.nan)), x, train=True, momentum=0.9)
    assert count[0] == 1
    # a norm of one's own reaches the switch through Norm.resolve_momentum
    bn = layers.batch_norm(0.7)
    assert bn.resolve_momentum() == 0.7 and bn.resolve_momentum(0.2) == 0.2
    with norms.batch_statistics_as_state() as count:
        assert bn.resolve_momentum(0.2) == 0.0
    assert count[0] == 1
    np.testing.assert_allclose(_a(s_new.mean), _a(x).mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_a(s_new.var), _a(x).var(0), rtol=1e-5)


# --- Folding takes eps from the norm -------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [True, False])
def test_fold_with_the_norms_eps_equals_evaluation_mode(use_bias):
    rng = np.random.default_rng(14)
    x = jnp.asarray(rng.normal(1.0, 2.0, (6, 5)), jnp.float32)
    aff = layers.affine_init(jax.random.key(4), 5, 3, 0.7, use_bias=use_bias)
    if use_bias:
        aff = aff._replace(b=jnp.asarray(rng.normal(size=3), jnp.float32))
    for norm in (layers.batch_norm(0.9, 0.3), layers.batch_renorm(eps=0.05), layers.ghost_batch_norm(2, eps=0.2)):
        params, state = norm.init(3)
        params = layers.BatchNormParams(jnp.asarray(rng.uniform(0.5, 2, 3), jnp.float32),
                                        jnp.asarray(rng.normal(size=3), jnp.float32))
        state = state._replace(mean=jnp.asarray(rng.normal(size=3), jnp.float32),
                               var=jnp.asarray(rng.uniform(0.01, 0.2, 3), jnp.float32))
        folded = layers.fold_batch_norm(aff, norm, params, state)
        assert folded.b is not None and folded.b.shape == (3,)
        y_eval, _ = norm.apply(params, state, layers.affine_apply(aff, x), train=False)
        np.testing.assert_allclose(_a(layers.affine_apply(folded, x)), _a(y_eval), rtol=1e-5, atol=1e-5)
        # a large eps matters: folding with another eps would not match
        other = layers.fold_batch_norm(aff, layers.batch_norm(eps=1e-6), params, state)
        assert np.abs(_a(layers.affine_apply(other, x)) - _a(y_eval)).max() > 1e-2


def test_fold_checks_the_bias_shape():
    params, state = layers.batch_norm().init(4)
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((3, 4)), jnp.zeros((2, 4))), layers.batch_norm(),
                               params, state)
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((3, 4)), jnp.zeros(3)), layers.batch_norm(), params,
                               state)
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_conv_batch_norm(jnp.ones((1, 1, 3, 4)), jnp.zeros((2, 4)), layers.batch_norm(), params, state)
    with pytest.raises(TypeError, match="norm must be a norm value"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((3, 4)), jnp.zeros(4)), params, params, state)
