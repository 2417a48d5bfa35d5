"""bnjax.norms.core (the functional batch norm) against the NumPy oracle (experiments/numpy_book.py), finite
differences and invariants."""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnjax import layers
from conftest import x64
from norms_oracle import _a
from experiments.numpy_book import BatchNorm as RefBatchNorm


def _random_bn_case(rng, n=8, c=5, dtype=np.float64):
    x = rng.normal(2.0, 3.0, (n, c)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    dout = rng.normal(size=(n, c)).astype(dtype)
    return x, gamma, beta, dout


# --------------------------------------------------------------------------------------------------
# Against the NumPy reference
# --------------------------------------------------------------------------------------------------


@jax.jit  # compiled once per shape (run eagerly, op by op, the forward and backward pass take seconds)
def _forward_backward(params, state, x, dout):
    """Training-mode output, new state, and the gradients of ``sum(y * dout)`` w.r.t. the parameters and ``x``."""

    def f(p, xx):
        return layers.batch_norm_apply(p, state, xx, train=True)

    (y, new_state), vjp = jax.vjp(f, params, x)
    zero_state = jax.tree_util.tree_map(jnp.zeros_like, new_state)
    dparams, dx = vjp((dout, zero_state))
    return y, new_state, dparams, dx


@pytest.mark.parametrize("dtype,tol", [pytest.param("float64", 1e-10, marks=pytest.mark.slow), ("float32", 1e-5)])
def test_batch_norm_matches_numpy_reference_forward_backward_and_running_stats(dtype, tol):
    rng = np.random.default_rng(0)
    with x64():
        ref = None
        params = state = None
        for step in range(4):
            x, gamma, beta, dout = _random_bn_case(rng, n=6 + step, c=5)
            if ref is None:
                ref = RefBatchNorm(gamma, beta)
                params, state = layers.batch_norm_init(5, dtype=dtype, init_var=0.0)
            # Same gamma/beta in both, as if a training step had set them.
            ref.gamma, ref.beta = gamma, beta
            params = layers.BatchNormParams(jnp.asarray(gamma, dtype), jnp.asarray(beta, dtype))
            y_ref = ref.forward(x, train_flg=True)
            dx_ref = ref.backward(dout)

            y, new_state, dparams, dx = _forward_backward(params, state, jnp.asarray(x, dtype),
                                                          jnp.asarray(dout, dtype))
            scale = 1.0 if dtype == "float64" else np.abs(y_ref).max()
            np.testing.assert_allclose(np.asarray(y), y_ref, atol=tol * scale, rtol=0)
            np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=tol * np.abs(dx_ref).max(), rtol=0)
            np.testing.assert_allclose(np.asarray(dparams.gamma), ref.dgamma, atol=tol * np.abs(ref.dgamma).max())
            np.testing.assert_allclose(np.asarray(dparams.beta), ref.dbeta, atol=tol * np.abs(ref.dbeta).max())
            state = new_state
            np.testing.assert_allclose(np.asarray(state.mean), ref.running_mean, rtol=tol, atol=tol)
            np.testing.assert_allclose(np.asarray(state.var), ref.running_var, rtol=tol, atol=tol)
        # Evaluation mode uses the accumulated running statistics.
        x, *_ = _random_bn_case(rng)
        y_eval, same_state = layers.batch_norm_apply(params, state, jnp.asarray(x, dtype), train=False)
        np.testing.assert_allclose(np.asarray(y_eval), ref.forward(x, train_flg=False), rtol=tol * 10, atol=tol * 10)
        assert same_state is state


@pytest.mark.slow
def test_check_grads_float64():
    rng = np.random.default_rng(1)
    with x64():
        x, gamma, beta, _ = _random_bn_case(rng, n=7, c=3)
        params, state = layers.batch_norm_init(3, dtype=jnp.float64)

        def f(g, b, xx):
            return layers.batch_norm_apply(layers.BatchNormParams(g, b), state, xx, train=True)[0]

        # jit: the finite differences evaluate f many times (each call, run eagerly op by op, is slow)
        check_grads(jax.jit(f), (jnp.asarray(gamma), jnp.asarray(beta), jnp.asarray(x)), order=2,
                    modes=("fwd", "rev"))


# --------------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_output_is_standardised_per_feature():
    x = jax.random.normal(jax.random.key(0), (256, 7)) * 5 + 3
    params, state = layers.batch_norm_init(7)
    y, _ = layers.batch_norm_apply(params, state, x, train=True, eps=1e-12)
    np.testing.assert_allclose(np.asarray(y.mean(0)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y.var(0)), 1, atol=1e-4)


@pytest.mark.slow
def test_output_invariant_to_scaling_preceding_weights():
    # BN(a * (x W + b)) == BN(x W + b) for a > 0 (up to eps): why BN makes training insensitive to init scale.
    key_x, key_w = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (64, 20))
    aff = layers.affine_init(key_w, 20, 6, 0.1)
    params, state = layers.batch_norm_init(6)
    base, _ = layers.batch_norm_apply(params, state, layers.affine_apply(aff, x), train=True, eps=1e-12)
    for a in (1e-3, 0.5, 40.0):
        scaled = layers.AffineParams(aff.W * a, aff.b * a)
        y, _ = layers.batch_norm_apply(params, state, layers.affine_apply(scaled, x), train=True, eps=1e-12)
        np.testing.assert_allclose(np.asarray(y), np.asarray(base), atol=2e-4)


def test_eval_leaves_state_unchanged_and_flags_are_independent():
    x = jax.random.normal(jax.random.key(2), (16, 4)) + 1
    params, state = layers.batch_norm_init(4, init_var=1.0)
    _, s_eval = layers.batch_norm_apply(params, state, x, train=False)
    assert s_eval is state
    # Evaluate with batch statistics, no update: same output as training, state untouched.
    y_train, s_train = layers.batch_norm_apply(params, state, x, train=True)
    y_batch_eval, s_batch_eval = layers.batch_norm_apply(params, state, x, train=False, use_batch_stats=True)
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_batch_eval))
    assert s_batch_eval is state
    # Re-estimate running statistics while normalising with the running ones.
    y_run, s_re = layers.batch_norm_apply(params, state, x, train=False, update_stats=True)
    np.testing.assert_allclose(np.asarray(s_re.mean), np.asarray(s_train.mean))
    y_eval, _ = layers.batch_norm_apply(params, state, x, train=False)
    np.testing.assert_array_equal(np.asarray(y_run), np.asarray(y_eval))


@pytest.mark.slow
def test_train_and_eval_give_identical_output_for_identical_stats_in_bf16():
    x = (jax.random.normal(jax.random.key(3), (32, 8)) * 4 + 7).astype(jnp.bfloat16)
    params, state = layers.batch_norm_init(8)
    mean, var, _ = layers.batch_norm_stats(x)
    y_train, _ = layers.batch_norm_apply(params, state, x, train=True)
    y_eval, _ = layers.batch_norm_apply(params, layers.BatchNormState(mean, var), x, train=False)
    assert y_train.dtype == jnp.bfloat16 and y_eval.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y_train, np.float32), np.asarray(y_eval, np.float32))


def test_bf16_statistics_are_float32_and_close_to_float32_input():
    x32 = jax.random.normal(jax.random.key(4), (512, 16)) * 3 + 10
    xb = x32.astype(jnp.bfloat16)
    mean_b, var_b, _ = layers.batch_norm_stats(xb)
    assert mean_b.dtype == jnp.float32 and var_b.dtype == jnp.float32
    mean_f, var_f, _ = layers.batch_norm_stats(x32)
    np.testing.assert_allclose(np.asarray(mean_b), np.asarray(mean_f), rtol=1e-2)
    np.testing.assert_allclose(np.asarray(var_b), np.asarray(var_f), rtol=1e-2)
    params, state = layers.batch_norm_init(16)
    _, new_state = layers.batch_norm_apply(params, state, xb, train=True)
    assert new_state.mean.dtype == jnp.float32


def test_variance_is_stable_at_large_mean_and_never_negative():
    rng = np.random.default_rng(5)
    x = (1e4 + rng.normal(size=(1000, 3))).astype(np.float32)
    _, var, _ = layers.batch_norm_stats(jnp.asarray(x))
    # The one-pass E[x^2] - E[x]^2 loses every digit here in float32; the two-pass variance keeps them.
    np.testing.assert_allclose(np.asarray(var), x.astype(np.float64).var(0), rtol=1e-2)
    for value in (12345.678, 0.1, -3.3e3, 7.0):
        const = jnp.full((10, 3), value, jnp.float32)
        _, var_c, _ = layers.batch_norm_stats(const)
        # Only the rounding of the float32 mean remains: far below float32 eps^2 relative to value^2.
        assert np.all(np.asarray(var_c) >= 0.0)
        assert np.all(np.asarray(var_c) <= 1e-12 * value**2)
        y, _ = layers.batch_norm_apply(*layers.batch_norm_init(3), const, train=True)
        assert np.all(np.isfinite(np.asarray(y)))
    # Many nearly equal values: the sum of squared deviations can round, but never below zero.
    near = jnp.asarray(1e4 + 1e-3 * np.random.default_rng(0).normal(size=(999, 5)), jnp.float32)
    assert np.all(np.asarray(layers.batch_norm_stats(near)[1]) >= 0.0)


def test_nhwc_reduces_over_batch_and_space():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32) * 2 + 1
    params, state = layers.batch_norm_init(3, init_var=0.0)
    y, new_state = layers.batch_norm_apply(params, state, jnp.asarray(x), train=True)
    mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + 1e-6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.var), 0.1 * var, rtol=1e-5)
    # Feature axis 1 (NCHW) works too when asked for.
    xc = np.moveaxis(x, -1, 1)
    y1, _ = layers.batch_norm_apply(params, state, jnp.asarray(xc), train=True, feature_axes=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y1), 1, -1), np.asarray(y), atol=1e-6)


def test_unbiased_running_var_and_no_scale_offset():
    x = np.random.default_rng(7).normal(size=(5, 2)).astype(np.float32)
    params, state = layers.batch_norm_init(2, use_scale=False, use_offset=False)
    assert params.gamma is None and params.beta is None
    _, s = layers.batch_norm_apply(params, state, jnp.asarray(x), train=True, unbiased_running_var=True, momentum=0.0)
    np.testing.assert_allclose(np.asarray(s.var), x.var(0, ddof=1), rtol=1e-5)


def test_jit_equals_eager_and_second_call_does_not_retrace():
    traces = []

    def f(p, s, x):
        traces.append(1)
        return layers.batch_norm_apply(p, s, x, train=True)

    params, state = layers.batch_norm_init(5)
    x1 = jax.random.normal(jax.random.key(8), (10, 5))
    x2 = jax.random.normal(jax.random.key(9), (10, 5))
    jf = jax.jit(f)
    y_jit, s_jit = jf(params, state, x1)
    y_eager, s_eager = f(params, state, x1)
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), atol=1e-6)
    np.testing.assert_allclose(np.asarray(s_jit.var), np.asarray(s_eager.var), rtol=1e-6)
    n = len(traces)
    jf(params, s_jit, x2)
    assert len(traces) == n, "second call with same shapes retraced"


@pytest.mark.slow
def test_vmapped_ensemble_keeps_one_running_state_per_member():
    num = 3
    keys = jax.random.split(jax.random.key(10), num)
    xs = jax.vmap(lambda k: jax.random.normal(k, (12, 4)))(keys) * jnp.arange(1, num + 1)[:, None, None]
    params, state = jax.vmap(lambda _: layers.batch_norm_init(4))(jnp.arange(num))
    params = params._replace(gamma=params.gamma * jnp.arange(1.0, num + 1)[:, None])
    ys, states = jax.vmap(functools.partial(layers.batch_norm_apply, train=True))(params, state, xs)
    for i in range(num):
        p_i = jax.tree_util.tree_map(lambda a: a[i], params)
        s_i = jax.tree_util.tree_map(lambda a: a[i], state)
        y_i, st_i = layers.batch_norm_apply(p_i, s_i, xs[i], train=True)
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y_i), atol=1e-6)
        np.testing.assert_allclose(np.asarray(states.var[i]), np.asarray(st_i.var), rtol=1e-6)
    # Nested vmap: an ensemble of ensembles.
    xs2 = jnp.stack([xs, xs * 2])
    p2, s2 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), (params, state))
    ys2, _ = jax.vmap(jax.vmap(functools.partial(layers.batch_norm_apply, train=True)))(p2, s2, xs2)
    np.testing.assert_allclose(np.asarray(ys2[0]), np.asarray(ys), atol=1e-6)


@pytest.mark.slow
def test_axis_name_statistics_equal_concatenated_batch_with_unequal_shards_and_mask():
    rng = np.random.default_rng(11)
    sizes = [5, 1, 9, 3]  # valid rows per shard
    nmax = max(sizes)
    x = rng.normal(3.0, 2.0, (len(sizes), nmax, 4)).astype(np.float32)
    mask = np.arange(nmax)[None, :] < np.array(sizes)[:, None]
    x[~mask] = 1e6  # garbage in padding must not leak into the statistics
    valid = np.concatenate([x[i, :n] for i, n in enumerate(sizes)])
    params, state = layers.batch_norm_init(4, init_var=0.0)

    def per_shard(xs, ms):
        return layers.batch_norm_apply(params, state, xs, train=True, axis_name="shards", mask=ms)

    ys, states = jax.vmap(per_shard, axis_name="shards")(jnp.asarray(x), jnp.asarray(mask))
    mu, var = valid.mean(0), valid.var(0)
    np.testing.assert_allclose(np.asarray(states.mean[0]), 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(states.var[2]), 0.1 * var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ys[2, :9]), (x[2, :9] - mu) / np.sqrt(var + 1e-6), atol=1e-4)
    # Unbiased running var counts the global number of valid rows.
    _, s_unb = jax.vmap(
        lambda xs, ms: layers.batch_norm_apply(params, state, xs, train=True, axis_name="s", mask=ms,
                                               unbiased_running_var=True),
        axis_name="s",
    )(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(s_unb.var[0]), 0.1 * valid.var(0, ddof=1), rtol=1e-4)


def test_axis_name_across_devices_with_shard_map():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs >= 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    try:
        shard_map = jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(devices[:4]), ("d",))
    rng = np.random.default_rng(12)
    x = rng.normal(size=(4 * 6, 3)).astype(np.float32) * 3 + 1
    mask = rng.random(4 * 6) < 0.6
    mask[:6] = False  # one device holds no valid row at all
    params, state = layers.batch_norm_init(3, init_var=0.0)

    def f(xs, ms):
        return layers.batch_norm_apply(params, state, xs, train=True, axis_name="d", mask=ms)[1]

    kwargs = dict(mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P())
    try:
        sm = shard_map(f, check_vma=False, **kwargs)
    except TypeError:
        sm = shard_map(f, check_rep=False, **kwargs)
    new_state = jax.jit(sm)(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(new_state.mean), 0.1 * x[mask].mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.var), 0.1 * x[mask].var(0), rtol=1e-4)


def test_fully_masked_batch_keeps_running_stats():
    params, state = layers.batch_norm_init(2, init_var=1.0)
    x = jnp.ones((4, 2))
    _, s = layers.batch_norm_apply(params, state, x, train=True, mask=jnp.zeros(4, bool))
    np.testing.assert_array_equal(np.asarray(s.mean), np.asarray(state.mean))
    np.testing.assert_array_equal(np.asarray(s.var), np.asarray(state.var))


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    params, state = layers.batch_norm_init(4)
    with pytest.raises(ValueError, match=r"rank >= 2.*one example per call \(rank 1\) needs the batch as a named"):
        layers.batch_norm_apply(params, state, jnp.ones(4), train=True)
    with pytest.raises(ValueError, match=r"gamma has shape \(4,\)"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 5)), train=True)
    with pytest.raises(TypeError, match="floating-point"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4), jnp.int32), train=True)
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), train=True, axis_name="batch")
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        jax.jit(lambda x: layers.batch_norm_apply(params, state, x, train=True, axis_name="batch"))(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), train=True, mask=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="out of range"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), train=True, feature_axes=2)
    with pytest.raises(ValueError, match="input features"):
        layers.affine_apply(layers.AffineParams(jnp.ones((3, 2)), jnp.zeros(2)), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="weight_init="):
        layers.affine_init(jax.random.key(0), 3, 2, "bogus")


# Hyper-parameter validation: concrete values are checked, traced ones are not.

def _bn_case(n=6, c=4, seed=20):
    x = np.random.default_rng(seed).normal(1.0, 2.0, (n, c)).astype(np.float32)
    params, state = layers.batch_norm_init(c, init_var=1.0)
    return params, state, x


# (keyword arguments, exception, text the message must contain: the argument's name)
_BAD_APPLY = [
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": -0.1}, ValueError, "momentum"),
    ({"momentum": float("nan")}, ValueError, "momentum"),
    ({"momentum": np.float32(1.01)}, ValueError, "momentum"),
    ({"momentum": np.array([0.5, 2.0, 0.5, 0.5])}, ValueError, "momentum"),
    ({"momentum": jnp.asarray(1.5)}, ValueError, "momentum"),  # a concrete (not traced) jax array scalar
    ({"momentum": "0.9"}, TypeError, "momentum"),
    ({"momentum": True}, TypeError, "momentum"),
    ({"momentum": None}, TypeError, "momentum"),
    ({"eps": -1e-5}, ValueError, "eps"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"eps": None}, TypeError, "eps"),
    ({"train": "no"}, TypeError, "train"),
    ({"train": 1}, TypeError, "train"),
    ({"train": None}, TypeError, "train"),
    ({"use_batch_stats": "yes"}, TypeError, "use_batch_stats"),
    ({"update_stats": 0}, TypeError, "update_stats"),
    ({"unbiased_running_var": "no"}, TypeError, "unbiased_running_var"),
    ({"mask": np.array([1, -1, 0, 1, 1, 1])}, ValueError, "mask"),
    ({"mask": [1.0, 0.5, 1.0, 1.0, 1.0, 1.0]}, ValueError, "mask"),
    ({"mask": np.array([1.0, np.nan, 1.0, 1.0, 0.0, 1.0])}, ValueError, "mask"),
    ({"mask": jnp.array([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])}, ValueError, "mask"),
    ({"mask": np.array(list("abcdef"))}, TypeError, "mask"),
    ({"mask": jnp.ones(5, bool)}, ValueError, "mask shape (5,)"),
    ({"mask": jnp.ones((6, 4), bool)}, ValueError, "mask of shape (6, 4)"),
    ({"mask": True}, ValueError, "mask of shape ()"),
]


@pytest.mark.parametrize("kw,exc,name", _BAD_APPLY, ids=[f"{k}={v!r}" for d, _, _ in _BAD_APPLY for k, v in d.items()])
def test_bad_hyper_parameters_raise_naming_the_argument(kw, exc, name):
    params, state, x = _bn_case()
    with pytest.raises(exc, match=re.escape(name)) as info:
        layers.batch_norm_apply(params, state, x, **{"train": True, **kw})
    assert "batch_norm_apply" in str(info.value)
    # Evaluation mode does not skip the checks.
    if "train" not in kw:
        with pytest.raises(exc, match=re.escape(name)):
            layers.batch_norm_apply(params, state, x, **{"train": False, **kw})
    if set(kw) == {"mask"}:
        with pytest.raises(exc, match=re.escape(name)) as info:
            layers.batch_norm_stats(x, **kw)
        assert "batch_norm_stats" in str(info.value)


def test_boundary_hyper_parameters_are_accepted():
    params, state, x = _bn_case()
    for momentum in (0, 0.0, 1, 1.0, np.float64(0.5), jnp.asarray(0.25), np.array([0.0, 0.5, 1.0, 0.9])):
        _, s = layers.batch_norm_apply(params, state, x, train=True, momentum=momentum)
        m = np.broadcast_to(np.asarray(momentum, np.float64), (4,))
        np.testing.assert_allclose(np.asarray(s.mean), (1 - m) * x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    for flag in (np.True_, np.False_):
        layers.batch_norm_apply(params, state, x, train=flag, unbiased_running_var=np.False_)


def test_traced_hyper_parameters_are_not_checked_and_momentum_traced_by_jit_is_exact():
    params, state, x = _bn_case()
    bad_mask = np.array([1, -1, 0, 1, 1, 1])
    # Out-of-range values that are only known at run time: no error, no host sync.
    jax.jit(lambda m: layers.batch_norm_apply(params, state, x, train=True, momentum=m))(1.5)
    jax.jit(lambda e: layers.batch_norm_apply(params, state, x, train=True, eps=e))(-1.0)
    jax.jit(lambda mk: layers.batch_norm_apply(params, state, x, train=True, mask=mk))(bad_mask)
    jax.jit(lambda mk: layers.batch_norm_stats(x, mask=mk))(bad_mask)
    # A traced momentum gives the eager result and the NumPy formula.
    f = jax.jit(lambda m, s: layers.batch_norm_apply(params, s, x, train=True, momentum=m))
    for m in (0.0, 0.3, 0.9, 1.0):
        y_jit, s_jit = f(m, state)
        y_eager, s_eager = layers.batch_norm_apply(params, state, x, train=True, momentum=m)
        np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s_jit.mean), np.asarray(s_eager.mean), rtol=1e-6, atol=1e-7)
        x64_ = x.astype(np.float64)
        np.testing.assert_allclose(np.asarray(s_jit.var), m * 1.0 + (1 - m) * x64_.var(0), rtol=1e-5)
    # A concrete bad value closed over by jit is still caught while tracing.
    with pytest.raises(ValueError, match="momentum"):
        jax.jit(lambda xx: layers.batch_norm_apply(params, state, xx, train=True, momentum=1.5))(x)
    # A traced flag cannot choose the program: a TypeError that says so, not a ConcretizationTypeError.
    with pytest.raises(TypeError, match="train.*static"):
        jax.jit(lambda t: layers.batch_norm_apply(params, state, x, train=t))(True)


def test_vmap_over_momenta_is_not_validated_and_matches_the_formula():
    params, state, x = _bn_case()
    momenta = jnp.array([0.0, 0.5, 0.9, 1.0])
    states = jax.vmap(lambda m: layers.batch_norm_apply(params, state, x, train=True, momentum=m)[1])(momenta)
    x64_ = x.astype(np.float64)
    m = np.asarray(momenta, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(states.mean), (1 - m) * x64_.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(states.var), m + (1 - m) * x64_.var(0), rtol=1e-5)
    # Out of range, but traced: the caller's business.
    jax.vmap(lambda mm: layers.batch_norm_apply(params, state, x, train=True, momentum=mm)[1])(jnp.array([1.5, -1.0]))


def test_array_likes_int_input_and_float64_numpy_without_x64():
    params, state, x = _bn_case()
    y_ref, s_ref = layers.batch_norm_apply(params, state, jnp.asarray(x), train=True)
    y_list, s_list = layers.batch_norm_apply(params, state, x.tolist(), train=True)
    assert y_list.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y_list), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(s_list.var), np.asarray(s_ref.var))
    for got, want in zip(layers.batch_norm_stats(x.tolist()), layers.batch_norm_stats(jnp.asarray(x))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Integer input: a clear TypeError, whatever its container.
    for xi in (np.ones((3, 4), np.int64), [[1, 2, 3, 4]] * 3, jnp.ones((3, 4), jnp.int32)):
        with pytest.raises(TypeError, match="floating-point"):
            layers.batch_norm_apply(params, state, xi, train=True)
        with pytest.raises(TypeError, match="floating-point"):
            layers.batch_norm_stats(xi)
    with pytest.raises(TypeError, match="x must be an array"):
        layers.batch_norm_apply(params, state, None, train=True)
    # float64 NumPy without x64: quietly the float32 computation.
    assert not jax.config.jax_enable_x64
    x_rounded = x.astype(np.float64) + 1e-12  # not exactly representable in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y64, s64 = layers.batch_norm_apply(params, state, x_rounded, train=True)
        stats64 = layers.batch_norm_stats(x_rounded, mask=np.ones(6))
    y32, s32 = layers.batch_norm_apply(params, state, jnp.asarray(x_rounded.astype(np.float32)), train=True)
    assert y64.dtype == jnp.float32 and s64.var.dtype == jnp.float32 and stats64[0].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y64), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(s64.mean), np.asarray(s32.mean))
    # With x64 on, float64 NumPy input stays float64.
    with x64():
        p64, st64 = layers.batch_norm_init(4, dtype=jnp.float64)
        y, s = layers.batch_norm_apply(p64, st64, x.astype(np.float64), train=True)
        assert y.dtype == jnp.float64 and s.var.dtype == jnp.float64


def test_integer_running_statistics_raise():
    params, state, x = _bn_case()
    for dtype in (jnp.int32, np.int64, bool):
        int_state = layers.BatchNormState(np.zeros(4, dtype), np.ones(4, dtype))
        with pytest.raises(TypeError, match="running statistics must be floating"):
            layers.batch_norm_apply(params, int_state, x, train=True)
        with pytest.raises(TypeError, match="running statistics must be floating"):
            layers.batch_norm_apply(params, int_state, x, train=False)


def test_bool_and_zero_one_masks_agree_with_the_valid_rows():
    params, state, x = _bn_case(n=8)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1])
    valid = x[keep == 1].astype(np.float64)
    results = []
    for mask in (keep.astype(bool), keep.astype(np.float32), keep, jnp.asarray(keep, jnp.float32), keep.tolist()):
        y, s = layers.batch_norm_apply(params, state, x, train=True, mask=mask)
        np.testing.assert_allclose(np.asarray(s.mean), 0.1 * valid.mean(0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(s.var), 0.9 + 0.1 * valid.var(0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(y)[keep == 1], (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-6),
                                   atol=1e-5)
        results.append(np.asarray(s.var))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_batch_norm_init_validates_its_arguments():
    p, s = layers.batch_norm_init(np.int64(3))
    assert p.gamma.shape == (3,) and s.var.shape == (3,)
    assert layers.batch_norm_init((2, np.int32(3)))[1].mean.shape == (2, 3)
    for kw, exc, name in (
        ({"num_features": 3.0}, TypeError, "num_features"),
        ({"num_features": (2, 1.5)}, TypeError, "num_features"),
        ({"num_features": True}, TypeError, "num_features"),
        ({"num_features": 0}, ValueError, "num_features"),
        ({"use_scale": "no"}, TypeError, "use_scale"),
        ({"use_offset": 1}, TypeError, "use_offset"),
        ({"dtype": jnp.int32}, TypeError, "dtype"),
        ({"init_var": -1.0}, ValueError, "init_var"),
        ({"init_var": float("nan")}, ValueError, "init_var"),
        ({"init_mean": float("inf")}, ValueError, "init_mean"),
        ({"init_mean": "0"}, TypeError, "init_mean"),
    ):
        kw = {"num_features": 3, **kw}
        with pytest.raises(exc, match=name):
            layers.batch_norm_init(kw.pop("num_features"), **kw)
    # Traced initial statistics (an ensemble over init_var) are not checked.
    states = jax.vmap(lambda v: layers.batch_norm_init(2, init_var=v)[1])(jnp.array([-1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(states.var), [[-1.0, -1.0], [1.0, 1.0]])


# --------------------------------------------------------------------------------------------------
# One example per call under a named axis (Equinox's idiom; issue 17, item 5)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["batch_norm", "batch_renorm"])
@pytest.mark.parametrize("masked", [False, True])
def test_rank_1_examples_under_a_named_vmap_equal_the_numpy_batch(name, masked):
    rng = np.random.default_rng(150)
    x = rng.normal(3.0, 2.0, (9, 4))
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool) if masked else np.ones(9, bool)
    norm = layers.batch_norm(0.8, 1e-5) if name == "batch_norm" else layers.batch_renorm(0.8, 1e-5, r_max=1.5,
                                                                                       d_max=0.5)
    params, state = norm.init(4)
    y, new = jax.jit(jax.vmap(lambda xi, mi: norm.apply(params, state, xi, train=True, axis_name="b", mask=mi),
                              axis_name="b", out_axes=(0, None)))(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    v = x[mask]
    mu, var = v.mean(0), v.var(0)
    if name == "batch_norm":
        y_np = (x - mu) / np.sqrt(var + 1e-5)
    else:  # r and d from the running statistics (mean 0, var 1), clipped
        sigma = np.sqrt(var + 1e-5)
        r = np.clip(sigma / np.sqrt(1.0 + 1e-5), 1 / 1.5, 1.5)
        d = np.clip(mu / np.sqrt(1.0 + 1e-5), -0.5, 0.5)
        y_np = (x - mu) / sigma * r + d
    np.testing.assert_allclose(_a(y)[mask], y_np[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_a(new.mean), 0.2 * mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new.var), 0.8 + 0.2 * var, rtol=1e-5)
    # gradients too (jax 0.7 could not transpose the masked per-example psum): equal to the batch call's
    weights = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)

    def per_example_loss(xs):
        ys, _ = jax.vmap(lambda xi, mi: norm.apply(params, state, xi, train=True, axis_name="b", mask=mi),
                         axis_name="b")(xs, jnp.asarray(mask))
        return jnp.sum(ys * weights * jnp.asarray(mask)[:, None])

    def batch_loss(xs):
        ys, _ = norm.apply(params, state, xs, train=True, mask=jnp.asarray(mask))
        return jnp.sum(ys * weights * jnp.asarray(mask)[:, None])

    xs = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(_a(jax.jit(jax.grad(per_example_loss))(xs)), _a(jax.grad(batch_loss)(xs)),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="its mask is a scalar"):
        jax.vmap(lambda xi: norm.apply(params, state, xi, train=True, axis_name="b", mask=jnp.ones(1, bool)),
                 axis_name="b")(jnp.asarray(x, jnp.float32))


def test_batch_norm_stats_of_one_example_per_call_need_the_named_axis():
    x = jnp.asarray(np.random.default_rng(151).normal(size=(6, 3)), jnp.float32)
    mean, var, count = jax.vmap(lambda xi: layers.batch_norm_stats(xi, axis_name="b"), axis_name="b",
                                out_axes=None)(x)
    np.testing.assert_allclose(_a(mean), _a(x).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(var), _a(x).var(0), rtol=1e-5)
    assert float(count) == 6.0
    with pytest.raises(ValueError, match="rank >= 2"):
        layers.batch_norm_stats(x[0])
