"""Inference folding (``fold_batch_norm``, ``fold_conv_batch_norm``) against the unfolded layers in evaluation
mode, in float32 and float64; the checks of its arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from conftest import x64
from norms_oracle import _a, _bn_params, _np_bn_eval


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


def test_fold_refuses_integer_weights_negative_variance_and_a_bias_of_the_wrong_size():
    params, state = layers.batch_norm().init(3)
    aff = layers.AffineParams(jnp.ones((2, 3), jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="floating"):
        layers.fold_batch_norm(aff, layers.batch_norm(), params, state)
    with pytest.raises(ValueError, match=r"variance must be finite and >= 0; 1 of 3 values are not "
                                         r"\(first: index 1, -1.0\)"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((2, 3)), jnp.zeros(3)), layers.batch_norm(), params,
                               state._replace(var=jnp.array([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_conv_batch_norm(jnp.ones((3, 3, 2, 3)), jnp.ones(4), layers.batch_norm(), params, state)


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


# --- Kernel shapes, stale statistics, argument types (issue 15, items 7, 14 and "what to build" 5) -----------


@pytest.mark.parametrize("kernel_shape,strides,padding", [
    ((3, 3, 2, 2), (1, 1), "SAME"),  # square, in == out: scaling the wrong axis would broadcast silently
    ((3, 5, 2, 3), (2, 1), "VALID"),  # 3x5, in != out, strided
    ((1, 4, 3, 1), (1, 2), "SAME"),
])
def test_fold_conv_batch_norm_of_any_kernel_equals_the_unfolded_conv_in_float64(kernel_shape, strides, padding):
    rng = np.random.default_rng(140)
    cout = kernel_shape[-1]
    kernel, bias = rng.normal(0, 0.5, kernel_shape), rng.normal(size=cout)
    x = rng.normal(1.0, 2.0, (2, 7, 9, kernel_shape[2]))
    gamma, beta = rng.uniform(0.5, 2.0, cout), rng.normal(size=cout)
    mean, var = rng.normal(2.0, 1.0, cout), rng.uniform(0.05, 0.3, cout)
    norm = layers.batch_norm(0.9, 0.2)  # a large eps: folding with another one would be visibly off
    with x64():
        def conv(k, b):
            out = jax.lax.conv_general_dilated(jnp.asarray(x), k, strides, padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               precision=jax.lax.Precision.HIGHEST)
            return _a(out + b)

        fk, fb = layers.fold_conv_batch_norm(jnp.asarray(kernel), jnp.asarray(bias), norm,
                                             _bn_params(gamma, beta, jnp.float64),
                                             layers.BatchNormState(jnp.asarray(mean), jnp.asarray(var)))
        assert fk.dtype == jnp.float64 and fk.shape == kernel_shape and fb.shape == (cout,)
        folded = conv(fk, fb)
        unfolded = conv(jnp.asarray(kernel), jnp.asarray(bias))
    want = _np_bn_eval(unfolded, gamma, beta, mean, var, 0.2)
    np.testing.assert_allclose(folded, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
    assert np.abs(_np_bn_eval(unfolded, gamma, beta, mean, var, 1e-6) - want).max() > 1e-2


def test_fold_names_the_stale_statistic_and_what_it_expects():
    params, state = layers.batch_norm().init(4)
    aff = layers.AffineParams(jnp.ones((3, 4)), jnp.zeros(4))
    bn = layers.batch_norm()
    # before: "the running variance must be >= 0, got []" for a NaN
    with pytest.raises(ValueError, match=r"running variance must be finite and >= 0; 2 of 4 values are not "
                                         r"\(first: index 1, nan\).*recalibrate"):
        layers.fold_batch_norm(aff, bn, params, state._replace(var=jnp.asarray([1.0, np.nan, 1.0, np.nan])))
    with pytest.raises(ValueError, match=r"running variance .* 1 of 4 values are not \(first: index 3, inf\)"):
        layers.fold_batch_norm(aff, bn, params, state._replace(var=jnp.asarray([1.0, 1.0, 1.0, np.inf])))
    with pytest.raises(ValueError, match=r"running mean must be finite; 1 of 4 values are not \(first: index 0, "
                                         r"-inf\)"):
        layers.fold_conv_batch_norm(jnp.ones((1, 1, 2, 4)), None, bn, params,
                                    state._replace(mean=jnp.asarray([-np.inf, 0.0, 0.0, 0.0])))
    # before: AttributeError: 'str' object has no attribute 'shape' and raw JAX errors
    with pytest.raises(TypeError, match=r"affine must be a layers.AffineParams\(W .*got dict \(a dict is not "
                                        r"accepted: wrap it as layers.AffineParams"):
        layers.fold_batch_norm({"W": jnp.ones((3, 4)), "b": jnp.zeros(4)}, bn, params, state)
    with pytest.raises(TypeError, match=r"parameters must be a BatchNormParams\(gamma, beta\).*got dict"):
        layers.fold_batch_norm(aff, bn, {"gamma": jnp.ones(4), "beta": jnp.zeros(4)}, state)
    with pytest.raises(TypeError, match="fold_batch_norm: W must be an array, got str"):
        layers.fold_batch_norm(layers.AffineParams("W", None), bn, params, state)
    with pytest.raises(TypeError, match="fold_conv_batch_norm: kernel must be an array, got dict"):
        layers.fold_conv_batch_norm({"kernel": jnp.ones((1, 1, 2, 4))}, None, bn, params, state)
    with pytest.raises(TypeError, match="fold_conv_batch_norm: bias must be an array, got dict"):
        layers.fold_conv_batch_norm(jnp.ones((1, 1, 2, 4)), {"b": 0.0}, bn, params, state)


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 1e-7, 1e-3, 0.3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, jnp.bfloat16])
def test_identity_running_var_adds_up_to_one_exactly(eps, dtype):
    v = layers.identity_running_var(eps, dtype)
    assert v.dtype == np.dtype(dtype) and v + np.asarray(eps, dtype) == np.asarray(1.0, dtype)
    with pytest.raises(ValueError, match="needs 0 < eps < 1"):
        layers.identity_running_var(1.0, dtype)


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.3])
def test_a_norm_with_the_identity_running_var_returns_its_input_bit_for_bit(eps):
    # What the Flax and Equinox folds leave in a model: mean 0, gamma 1, beta 0 and v + eps == 1 exactly.
    norm = layers.batch_norm(0.9, eps)
    params, state = norm.init(3)
    state = state._replace(mean=jnp.zeros(3), var=jnp.full((3,), layers.identity_running_var(eps)))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(5, 3)) * 100, jnp.float32)
    y, _ = norm.apply(params, state, x, train=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
