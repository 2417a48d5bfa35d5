"""bnjax.layers against the NumPy oracle (tests/numpy_reference.py), finite differences and invariants."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bnjax import layers
from conftest import x64
from numpy_book import BatchNorm as RefBatchNorm
from numpy_book import SoftmaxWithLoss, softmax


def _bn_jax(gamma, beta, mean, var, x, train=True, **kw):
    params = layers.BatchNormParams(jnp.asarray(gamma), jnp.asarray(beta))
    state = layers.BatchNormState(jnp.asarray(mean), jnp.asarray(var))
    return layers.batch_norm_apply(params, state, jnp.asarray(x), train, **kw)


def _random_bn_case(rng, n=8, c=5, dtype=np.float64):
    x = rng.normal(2.0, 3.0, (n, c)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, c).astype(dtype)
    beta = rng.normal(size=c).astype(dtype)
    dout = rng.normal(size=(n, c)).astype(dtype)
    return x, gamma, beta, dout


# --------------------------------------------------------------------------------------------------
# Against the NumPy reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-5)])
def test_batch_norm_matches_numpy_reference_forward_backward_and_running_stats(dtype, tol):
    rng = np.random.default_rng(0)
    with x64():
        ref = None
        params = state = None
        for step in range(4):
            x, gamma, beta, dout = _random_bn_case(rng, n=6 + step, c=5)
            if ref is None:
                ref = RefBatchNorm(gamma, beta)
                params, state = layers.batch_norm_init(5, dtype=dtype)
            # Same gamma/beta in both, as if a training step had set them.
            ref.gamma, ref.beta = gamma, beta
            params = layers.BatchNormParams(jnp.asarray(gamma, dtype), jnp.asarray(beta, dtype))
            y_ref = ref.forward(x, train_flg=True)
            dx_ref = ref.backward(dout)

            def f(p, xx):
                return layers.batch_norm_apply(p, state, xx, True)

            (y, new_state), vjp = jax.vjp(f, params, jnp.asarray(x, dtype))
            zero_state = jax.tree_util.tree_map(jnp.zeros_like, new_state)
            dparams, dx = vjp((jnp.asarray(dout, dtype), zero_state))
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
        y_eval, same_state = layers.batch_norm_apply(params, state, jnp.asarray(x, dtype), False)
        np.testing.assert_allclose(np.asarray(y_eval), ref.forward(x, train_flg=False), rtol=tol * 10, atol=tol * 10)
        assert same_state is state


def test_check_grads_float64():
    rng = np.random.default_rng(1)
    with x64():
        x, gamma, beta, _ = _random_bn_case(rng, n=7, c=3)
        params, state = layers.batch_norm_init(3, dtype=jnp.float64)

        def f(g, b, xx):
            return layers.batch_norm_apply(layers.BatchNormParams(g, b), state, xx)[0]

        check_grads(f, (jnp.asarray(gamma), jnp.asarray(beta), jnp.asarray(x)), order=2, modes=("fwd", "rev"))


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
# Invariants
# --------------------------------------------------------------------------------------------------


def test_train_output_is_standardised_per_feature():
    x = jax.random.normal(jax.random.key(0), (256, 7)) * 5 + 3
    params, state = layers.batch_norm_init(7)
    y, _ = layers.batch_norm_apply(params, state, x, eps=1e-12)
    np.testing.assert_allclose(np.asarray(y.mean(0)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y.var(0)), 1, atol=1e-4)


def test_output_invariant_to_scaling_preceding_weights():
    # BN(a * (x W + b)) == BN(x W + b) for a > 0 (up to eps): why BN makes training insensitive to init scale.
    key_x, key_w = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (64, 20))
    aff = layers.affine_init(key_w, 20, 6, 0.1)
    params, state = layers.batch_norm_init(6)
    base, _ = layers.batch_norm_apply(params, state, layers.affine_apply(aff, x), eps=1e-12)
    for a in (1e-3, 0.5, 40.0):
        scaled = layers.AffineParams(aff.W * a, aff.b * a)
        y, _ = layers.batch_norm_apply(params, state, layers.affine_apply(scaled, x), eps=1e-12)
        np.testing.assert_allclose(np.asarray(y), np.asarray(base), atol=2e-4)


def test_eval_leaves_state_unchanged_and_flags_are_independent():
    x = jax.random.normal(jax.random.key(2), (16, 4)) + 1
    params, state = layers.batch_norm_init(4, init_var=1.0)
    _, s_eval = layers.batch_norm_apply(params, state, x, False)
    assert s_eval is state
    # Evaluate with batch statistics, no update: same output as training, state untouched.
    y_train, s_train = layers.batch_norm_apply(params, state, x, True)
    y_batch_eval, s_batch_eval = layers.batch_norm_apply(params, state, x, False, use_batch_stats=True)
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_batch_eval))
    assert s_batch_eval is state
    # Re-estimate running statistics while normalising with the running ones.
    y_run, s_re = layers.batch_norm_apply(params, state, x, False, update_stats=True)
    np.testing.assert_allclose(np.asarray(s_re.mean), np.asarray(s_train.mean))
    y_eval, _ = layers.batch_norm_apply(params, state, x, False)
    np.testing.assert_array_equal(np.asarray(y_run), np.asarray(y_eval))


def test_train_and_eval_give_identical_output_for_identical_stats_in_bf16():
    x = (jax.random.normal(jax.random.key(3), (32, 8)) * 4 + 7).astype(jnp.bfloat16)
    params, state = layers.batch_norm_init(8)
    mean, var, _ = layers.batch_norm_stats(x)
    y_train, _ = layers.batch_norm_apply(params, state, x, True)
    y_eval, _ = layers.batch_norm_apply(params, layers.BatchNormState(mean, var), x, False)
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
    _, new_state = layers.batch_norm_apply(params, state, xb)
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
        y, _ = layers.batch_norm_apply(*layers.batch_norm_init(3), const)
        assert np.all(np.isfinite(np.asarray(y)))
    # Many nearly equal values: the sum of squared deviations can round, but never below zero.
    near = jnp.asarray(1e4 + 1e-3 * np.random.default_rng(0).normal(size=(999, 5)), jnp.float32)
    assert np.all(np.asarray(layers.batch_norm_stats(near)[1]) >= 0.0)


def test_nhwc_reduces_over_batch_and_space():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 5, 6, 3)).astype(np.float32) * 2 + 1
    params, state = layers.batch_norm_init(3)
    y, new_state = layers.batch_norm_apply(params, state, jnp.asarray(x))
    mu, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    np.testing.assert_allclose(np.asarray(y), (x - mu) / np.sqrt(var + 1e-6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state.var), 0.1 * var, rtol=1e-5)
    # Feature axis 1 (NCHW) works too when asked for.
    xc = np.moveaxis(x, -1, 1)
    y1, _ = layers.batch_norm_apply(params, state, jnp.asarray(xc), feature_axes=1)
    np.testing.assert_allclose(np.moveaxis(np.asarray(y1), 1, -1), np.asarray(y), atol=1e-6)


def test_unbiased_running_var_and_no_scale_offset():
    x = np.random.default_rng(7).normal(size=(5, 2)).astype(np.float32)
    params, state = layers.batch_norm_init(2, use_scale=False, use_offset=False)
    assert params.gamma is None and params.beta is None
    _, s = layers.batch_norm_apply(params, state, jnp.asarray(x), unbiased_running_var=True, momentum=0.0)
    np.testing.assert_allclose(np.asarray(s.var), x.var(0, ddof=1), rtol=1e-5)


def test_jit_equals_eager_and_second_call_does_not_retrace():
    traces = []

    def f(p, s, x):
        traces.append(1)
        return layers.batch_norm_apply(p, s, x)

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


def test_vmapped_ensemble_keeps_one_running_state_per_member():
    num = 3
    keys = jax.random.split(jax.random.key(10), num)
    xs = jax.vmap(lambda k: jax.random.normal(k, (12, 4)))(keys) * jnp.arange(1, num + 1)[:, None, None]
    params, state = jax.vmap(lambda _: layers.batch_norm_init(4))(jnp.arange(num))
    params = params._replace(gamma=params.gamma * jnp.arange(1.0, num + 1)[:, None])
    ys, states = jax.vmap(layers.batch_norm_apply)(params, state, xs)
    for i in range(num):
        p_i = jax.tree_util.tree_map(lambda a: a[i], params)
        s_i = jax.tree_util.tree_map(lambda a: a[i], state)
        y_i, st_i = layers.batch_norm_apply(p_i, s_i, xs[i])
        np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y_i), atol=1e-6)
        np.testing.assert_allclose(np.asarray(states.var[i]), np.asarray(st_i.var), rtol=1e-6)
    # Nested vmap: an ensemble of ensembles.
    xs2 = jnp.stack([xs, xs * 2])
    p2, s2 = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), (params, state))
    ys2, _ = jax.vmap(jax.vmap(layers.batch_norm_apply))(p2, s2, xs2)
    np.testing.assert_allclose(np.asarray(ys2[0]), np.asarray(ys), atol=1e-6)


def test_axis_name_statistics_equal_concatenated_batch_with_unequal_shards_and_mask():
    rng = np.random.default_rng(11)
    sizes = [5, 1, 9, 3]  # valid rows per shard
    nmax = max(sizes)
    x = rng.normal(3.0, 2.0, (len(sizes), nmax, 4)).astype(np.float32)
    mask = np.arange(nmax)[None, :] < np.array(sizes)[:, None]
    x[~mask] = 1e6  # garbage in padding must not leak into the statistics
    valid = np.concatenate([x[i, :n] for i, n in enumerate(sizes)])
    params, state = layers.batch_norm_init(4)

    def per_shard(xs, ms):
        return layers.batch_norm_apply(params, state, xs, axis_name="shards", mask=ms)

    ys, states = jax.vmap(per_shard, axis_name="shards")(jnp.asarray(x), jnp.asarray(mask))
    mu, var = valid.mean(0), valid.var(0)
    np.testing.assert_allclose(np.asarray(states.mean[0]), 0.1 * mu, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(states.var[2]), 0.1 * var, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(ys[2, :9]), (x[2, :9] - mu) / np.sqrt(var + 1e-6), atol=1e-4)
    # Unbiased running var counts the global number of valid rows.
    _, s_unb = jax.vmap(
        lambda xs, ms: layers.batch_norm_apply(params, state, xs, axis_name="s", mask=ms, unbiased_running_var=True),
        axis_name="s",
    )(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(s_unb.var[0]), 0.1 * valid.var(0, ddof=1), rtol=1e-4)


def test_axis_name_across_devices_with_shard_map():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs >= 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
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
    params, state = layers.batch_norm_init(3)

    def f(xs, ms):
        return layers.batch_norm_apply(params, state, xs, axis_name="d", mask=ms)[1]

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
    _, s = layers.batch_norm_apply(params, state, x, mask=jnp.zeros(4, bool))
    np.testing.assert_array_equal(np.asarray(s.mean), np.asarray(state.mean))
    np.testing.assert_array_equal(np.asarray(s.var), np.asarray(state.var))


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    params, state = layers.batch_norm_init(4)
    with pytest.raises(ValueError, match="rank >= 2"):
        layers.batch_norm_apply(params, state, jnp.ones(4))
    with pytest.raises(ValueError, match=r"gamma has shape \(4,\)"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 5)))
    with pytest.raises(TypeError, match="floating-point"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), axis_name="batch")
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        jax.jit(lambda x: layers.batch_norm_apply(params, state, x, axis_name="batch"))(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="mask shape"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), mask=jnp.ones(2, bool))
    with pytest.raises(ValueError, match="out of range"):
        layers.batch_norm_apply(params, state, jnp.ones((3, 4)), feature_axes=2)
    with pytest.raises(ValueError, match="input features"):
        layers.affine_apply(layers.AffineParams(jnp.ones((3, 2)), jnp.zeros(2)), jnp.ones((5, 4)))
    with pytest.raises(ValueError, match="weight_init_std"):
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
        layers.batch_norm_apply(params, state, x, **kw)
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
        _, s = layers.batch_norm_apply(params, state, x, momentum=momentum)
        m = np.broadcast_to(np.asarray(momentum, np.float64), (4,))
        np.testing.assert_allclose(np.asarray(s.mean), (1 - m) * x.astype(np.float64).mean(0), rtol=1e-6, atol=1e-7)
    for flag in (np.True_, np.False_):
        layers.batch_norm_apply(params, state, x, flag, unbiased_running_var=np.False_)


def test_traced_hyper_parameters_are_not_checked_and_momentum_traced_by_jit_is_exact():
    params, state, x = _bn_case()
    bad_mask = np.array([1, -1, 0, 1, 1, 1])
    # Out-of-range values that are only known at run time: no error, no host sync.
    jax.jit(lambda m: layers.batch_norm_apply(params, state, x, momentum=m))(1.5)
    jax.jit(lambda e: layers.batch_norm_apply(params, state, x, eps=e))(-1.0)
    jax.jit(lambda mk: layers.batch_norm_apply(params, state, x, mask=mk))(bad_mask)
    jax.jit(lambda mk: layers.batch_norm_stats(x, mask=mk))(bad_mask)
    # A traced momentum gives the eager result and the NumPy formula.
    f = jax.jit(lambda m, s: layers.batch_norm_apply(params, s, x, momentum=m))
    for m in (0.0, 0.3, 0.9, 1.0):
        y_jit, s_jit = f(m, state)
        y_eager, s_eager = layers.batch_norm_apply(params, state, x, momentum=m)
        np.testing.assert_allclose(np.asarray(y_jit), np.asarray(y_eager), atol=1e-6)
        np.testing.assert_allclose(np.asarray(s_jit.mean), np.asarray(s_eager.mean), rtol=1e-6, atol=1e-7)
        x64_ = x.astype(np.float64)
        np.testing.assert_allclose(np.asarray(s_jit.var), m * 1.0 + (1 - m) * x64_.var(0), rtol=1e-5)
    # A concrete bad value closed over by jit is still caught while tracing.
    with pytest.raises(ValueError, match="momentum"):
        jax.jit(lambda xx: layers.batch_norm_apply(params, state, xx, momentum=1.5))(x)
    # A traced flag cannot choose the program: a TypeError that says so, not a ConcretizationTypeError.
    with pytest.raises(TypeError, match="train.*static"):
        jax.jit(lambda t: layers.batch_norm_apply(params, state, x, t))(True)


def test_vmap_over_momenta_is_not_validated_and_matches_the_formula():
    params, state, x = _bn_case()
    momenta = jnp.array([0.0, 0.5, 0.9, 1.0])
    states = jax.vmap(lambda m: layers.batch_norm_apply(params, state, x, momentum=m)[1])(momenta)
    x64_ = x.astype(np.float64)
    m = np.asarray(momenta, np.float64)[:, None]
    np.testing.assert_allclose(np.asarray(states.mean), (1 - m) * x64_.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(states.var), m + (1 - m) * x64_.var(0), rtol=1e-5)
    # Out of range, but traced: the caller's business.
    jax.vmap(lambda mm: layers.batch_norm_apply(params, state, x, momentum=mm)[1])(jnp.array([1.5, -1.0]))


def test_array_likes_int_input_and_float64_numpy_without_x64():
    params, state, x = _bn_case()
    y_ref, s_ref = layers.batch_norm_apply(params, state, jnp.asarray(x))
    y_list, s_list = layers.batch_norm_apply(params, state, x.tolist())
    assert y_list.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y_list), np.asarray(y_ref))
    np.testing.assert_array_equal(np.asarray(s_list.var), np.asarray(s_ref.var))
    for got, want in zip(layers.batch_norm_stats(x.tolist()), layers.batch_norm_stats(jnp.asarray(x))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Integer input: a clear TypeError, whatever its container.
    for xi in (np.ones((3, 4), np.int64), [[1, 2, 3, 4]] * 3, jnp.ones((3, 4), jnp.int32)):
        with pytest.raises(TypeError, match="floating-point"):
            layers.batch_norm_apply(params, state, xi)
        with pytest.raises(TypeError, match="floating-point"):
            layers.batch_norm_stats(xi)
    with pytest.raises(TypeError, match="x must be an array"):
        layers.batch_norm_apply(params, state, None)
    # float64 NumPy without x64: quietly the float32 computation.
    assert not jax.config.jax_enable_x64
    x_rounded = x.astype(np.float64) + 1e-12  # not exactly representable in float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y64, s64 = layers.batch_norm_apply(params, state, x_rounded)
        stats64 = layers.batch_norm_stats(x_rounded, mask=np.ones(6))
    y32, s32 = layers.batch_norm_apply(params, state, jnp.asarray(x_rounded.astype(np.float32)))
    assert y64.dtype == jnp.float32 and s64.var.dtype == jnp.float32 and stats64[0].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y64), np.asarray(y32))
    np.testing.assert_array_equal(np.asarray(s64.mean), np.asarray(s32.mean))
    # With x64 on, float64 NumPy input stays float64.
    with x64():
        p64, st64 = layers.batch_norm_init(4, dtype=jnp.float64)
        y, s = layers.batch_norm_apply(p64, st64, x.astype(np.float64))
        assert y.dtype == jnp.float64 and s.var.dtype == jnp.float64


def test_integer_running_statistics_raise():
    params, state, x = _bn_case()
    for dtype in (jnp.int32, np.int64, bool):
        int_state = layers.BatchNormState(np.zeros(4, dtype), np.ones(4, dtype))
        with pytest.raises(TypeError, match="running statistics must be floating"):
            layers.batch_norm_apply(params, int_state, x)
        with pytest.raises(TypeError, match="running statistics must be floating"):
            layers.batch_norm_apply(params, int_state, x, False)


def test_bool_and_zero_one_masks_agree_with_the_valid_rows():
    params, state, x = _bn_case(n=8)
    keep = np.array([1, 0, 1, 1, 0, 1, 1, 1])
    valid = x[keep == 1].astype(np.float64)
    results = []
    for mask in (keep.astype(bool), keep.astype(np.float32), keep, jnp.asarray(keep, jnp.float32), keep.tolist()):
        y, s = layers.batch_norm_apply(params, state, x, mask=mask)
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
    y = layers.dropout_apply(x, key, 0.3)
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 0.3) < 0.02
    np.testing.assert_allclose(float(y.mean()), 1.0, atol=0.03)  # inverted: expectation kept
    np.testing.assert_array_equal(np.asarray(layers.dropout_apply(x, key, 0.3)), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(layers.dropout_apply(x, None, 0.3, train=False)), np.asarray(x))
    book = layers.dropout_apply(x, None, 0.3, train=False, inverted=False)
    np.testing.assert_allclose(np.asarray(book), 0.7)
    with pytest.raises(ValueError, match="key"):
        layers.dropout_apply(x, None, 0.3)


def test_torch_state_dict_conversion_reproduces_pytorch_update():
    rng = np.random.default_rng(15)
    sd = {
        "weight": rng.uniform(0.5, 1.5, 3), "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3), "running_var": rng.uniform(0.5, 2, 3),
    }
    params, state, kw = layers.torch_batch_norm_to_bnjax(sd)
    x = rng.normal(size=(8, 3)).astype(np.float32)
    y, new_state = layers.batch_norm_apply(params, state, jnp.asarray(x), **kw)
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


# ==================================================================================================
# Norms as values: batch_norm / batch_renorm / ghost_batch_norm, recalibrate, folding
#
# Every expected value below comes from an independent float64 NumPy oracle written from the formulas
# (Ioffe 2017 Algorithm 1 for Batch Renorm, Hoffer et al. 2017 for Ghost BN), from finite differences, or
# from the plain ``batch_norm_apply`` function where the brief asks for exact equality with it.
# ==================================================================================================

import json  # noqa: E402


def _np_renorm(x, gamma, beta, mean, var, *, r_max, d_max, momentum, eps, mode="var"):
    """Ioffe (2017) Algorithm 1 in float64 NumPy; features on the last axis, every other axis reduced.

    Returns y, new running mean, new running var, and the unclipped / clipped r and d."""
    x = np.asarray(x, np.float64)
    red = tuple(range(x.ndim - 1))
    mu_b = x.mean(red)
    var_b = ((x - mu_b) ** 2).mean(red)  # biased
    sigma_b = np.sqrt(var_b + eps)
    sigma = np.sqrt(var + eps)
    r_raw = sigma_b / sigma
    d_raw = (mu_b - mean) / sigma
    r = np.clip(r_raw, 1.0 / r_max, r_max)
    d = np.clip(d_raw, -d_max, d_max)
    y = gamma * ((x - mu_b) / sigma_b * r + d) + beta
    new_mean = momentum * mean + (1 - momentum) * mu_b
    if mode == "var":
        new_var = momentum * var + (1 - momentum) * var_b
    else:
        sigma_new = momentum * sigma + (1 - momentum) * sigma_b
        new_var = sigma_new ** 2 - eps
    return y, new_mean, new_var, (r_raw, d_raw), (r, d)


def _np_bn_eval(x, gamma, beta, mean, var, eps):
    g = 1.0 if gamma is None else gamma
    b = 0.0 if beta is None else beta
    return g * (np.asarray(x, np.float64) - mean) / np.sqrt(var + eps) + b


def _np_ghost(x, k, gamma, beta, mean, var, *, momentum, eps, mask=None):
    """Ghost BN oracle for one device: groups of k consecutive rows (axis 0; the last one smaller), masked rows
    dropped from their group, empty groups skipped. Returns y (NaN at masked rows), the new running statistics,
    and the per-group (count, mean, var) list (for pooling across devices)."""
    x = np.asarray(x, np.float64)
    n = x.shape[0]
    c = x.shape[-1]
    y = np.full_like(x, np.nan)
    groups = []
    for start in range(0, n, k):
        rows = np.arange(start, min(start + k, n))
        if mask is not None:
            rows = rows[np.asarray(mask, bool)[rows]]
        if len(rows) == 0:
            continue
        g = x[rows].reshape(-1, c)
        mu, v = g.mean(0), g.var(0)
        y[rows] = gamma * (x[rows] - mu) / np.sqrt(v + eps) + beta
        groups.append((g.shape[0], mu, v))
    new_mean, new_var = _np_pool(groups, mean, var, momentum)
    return y, new_mean, new_var, groups


def _np_pool(groups, mean, var, momentum):
    if not groups:  # no valid row anywhere: no update
        return mean, var
    cnt = np.array([g[0] for g in groups], np.float64)
    mu = sum(n * m for n, m, _ in groups) / cnt.sum()
    v = sum(n * vv for n, _, vv in groups) / cnt.sum()  # count-weighted mean of the group variances
    return momentum * mean + (1 - momentum) * mu, momentum * var + (1 - momentum) * v


def _bn_params(gamma, beta, dtype=None):
    as_ = (lambda a: None if a is None else jnp.asarray(a, dtype))
    return layers.BatchNormParams(as_(gamma), as_(beta))


def _a(v):
    return np.asarray(v)


def _shard_map():
    try:
        return jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map

        return shard_map


# --- Batch Renorm: Algorithm 1 ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["var", "std"])
def test_renorm_matches_float64_algorithm_1_over_chained_steps_with_and_without_clipping(mode):
    rng = np.random.default_rng(100)
    C = 4
    locs = np.array([12.0, -7.0, 0.3, 2.0])
    scales = np.array([6.0, 0.15, 1.0, 2.5])
    m, eps, r_max, d_max = 0.6, 1e-3, 2.0, 1.5
    gamma = rng.uniform(0.5, 2.0, C)
    beta = rng.normal(0.0, 2.0, C)
    r_clip, d_clip = [], []
    with x64():
        norm = layers.batch_renorm(m, eps, r_max=r_max, d_max=d_max, running_average=mode)
        _, state = norm.init(C, dtype=jnp.float64)
        assert state.mean.dtype == jnp.float64 and state.step.dtype == jnp.int32 and int(state.step) == 0
        np.testing.assert_array_equal(_a(state.mean), 0.0)
        np.testing.assert_array_equal(_a(state.var), 1.0)
        params = _bn_params(gamma, beta, jnp.float64)
        mean, var = np.zeros(C), np.ones(C)
        for t in range(7):
            x = rng.normal(locs * (1 + 0.05 * t), scales, (10, C))
            y, state = norm.apply(params, state, jnp.asarray(x))
            y_ref, mean, var, (r_raw, d_raw), _ = _np_renorm(
                x, gamma, beta, mean, var, r_max=r_max, d_max=d_max, momentum=m, eps=eps, mode=mode)
            assert y.dtype == jnp.float64
            np.testing.assert_allclose(_a(y), y_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(_a(state.mean), mean, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(_a(state.var), var, rtol=1e-10, atol=1e-10)
            assert int(state.step) == t + 1
            r_clip.append((r_raw > r_max) | (r_raw < 1 / r_max))
            d_clip.append(np.abs(d_raw) > d_max)
        r_clip, d_clip = np.array(r_clip), np.array(d_clip)
        # The clipping really happens (r from above and below) and really does not happen elsewhere.
        assert r_clip.any() and not r_clip.all() and d_clip.any() and not d_clip.all()
        # Evaluation: the running statistics, no update, step kept.
        x = rng.normal(locs, scales, (5, C))
        y, s_eval = norm.apply(params, state, jnp.asarray(x), train=False)
        np.testing.assert_allclose(_a(y), _np_bn_eval(x, gamma, beta, mean, var, eps), rtol=1e-10, atol=1e-10)
        for a, b in zip(s_eval, state):
            np.testing.assert_array_equal(_a(a), _a(b))


def test_renorm_r_clips_from_below_and_above_in_the_oracle_case():
    # Guards the case design of the previous test: r is clipped at 1/r_max (small std) and r_max (large std).
    rng = np.random.default_rng(100)
    gamma, beta = rng.uniform(0.5, 2.0, 4), rng.normal(0.0, 2.0, 4)
    x = rng.normal(np.array([12.0, -7.0, 0.3, 2.0]), np.array([6.0, 0.15, 1.0, 2.5]), (10, 4))
    _, _, _, (r_raw, _), (r, _) = _np_renorm(x, gamma, beta, np.zeros(4), np.ones(4), r_max=2.0, d_max=1.5,
                                             momentum=0.6, eps=1e-3)
    assert r[0] == 2.0 and r[1] == 0.5


def _renorm_fd_case(clipped):
    rng = np.random.default_rng(101 + clipped)
    x = rng.normal(2.0, 3.0, (6, 3))
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.normal(size=3)
    w = rng.normal(size=(6, 3))
    mu_b, sb = x.mean(0), np.sqrt(x.var(0) + 1e-5)
    if clipped:
        r_max, d_max = 1.2, 0.1
        sigma = sb * np.array([2.0, 1 / 3.0, 4.0])  # r = 0.5, 3, 0.25: all clipped
        mean = mu_b - np.array([2.0, -1.5, 0.8]) * sigma
    else:
        r_max, d_max = 3.0, 5.0
        sigma = sb * np.array([1.5, 0.7, 1.25])  # r = 0.67, 1.43, 0.8
        mean = mu_b - np.array([0.5, -0.4, 0.2]) * sigma
    var = sigma ** 2 - 1e-5
    return x, gamma, beta, w, mean, var, r_max, d_max


def _central_fd(f, arr, h=1e-5):
    g = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        a = arr.copy()
        a[idx] += h
        fp = f(a)
        a[idx] -= 2 * h
        g[idx] = (fp - f(a)) / (2 * h)
    return g


@pytest.mark.parametrize("clipped", [False, True], ids=["r_d_inside", "r_d_clipped"])
def test_renorm_gradients_treat_r_and_d_as_constants(clipped):
    x, gamma, beta, w, mean, var, r_max, d_max = _renorm_fd_case(clipped)
    eps = 1e-5
    _, _, _, (r_raw, d_raw), (r, d) = _np_renorm(x, gamma, beta, mean, var, r_max=r_max, d_max=d_max,
                                                 momentum=0.9, eps=eps)
    if clipped:
        assert np.all((r_raw > r_max) | (r_raw < 1 / r_max)) and np.all(np.abs(d_raw) > d_max)
    else:
        assert np.all((r_raw < r_max) & (r_raw > 1 / r_max)) and np.all(np.abs(d_raw) < d_max)
        assert np.all(np.abs(r - 1) > 0.1) and np.all(np.abs(d) > 0.1)

    def loss_np(xx, gg, bb, rr=r, dd=d):  # r and d frozen at their values for x
        mu, sb = xx.mean(0), np.sqrt(xx.var(0) + eps)
        return np.sum(w * (gg * ((xx - mu) / sb * rr + dd) + bb))

    fd = [_central_fd(lambda a: loss_np(a, gamma, beta), x),
          _central_fd(lambda a: loss_np(x, a, beta), gamma),
          _central_fd(lambda a: loss_np(x, gamma, a), beta)]
    with x64():
        norm = layers.batch_renorm(0.9, eps, r_max=r_max, d_max=d_max)
        state = layers.BatchRenormState(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))

        def loss(xx, gg, bb):
            y, _ = norm.apply(layers.BatchNormParams(gg, bb), state, xx)
            return jnp.sum(jnp.asarray(w) * y)

        grads = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    for g, f in zip(grads, fd):
        np.testing.assert_allclose(_a(g), f, rtol=1e-7, atol=1e-7)
    if not clipped:
        # The case discriminates: letting r and d follow x changes the x-gradient.
        def loss_full(xx):
            _, _, _, _, (rr, dd) = _np_renorm(xx, gamma, beta, mean, var, r_max=r_max, d_max=d_max, momentum=0.9,
                                              eps=eps)
            return loss_np(xx, gamma, beta, rr, dd)

        assert np.abs(_central_fd(loss_full, x) - fd[0]).max() > 1e-2


# --- Batch Renorm with r_max=1, d_max=0 is batch norm ---------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_renorm_with_unit_limits_is_batch_norm_bit_for_bit(jit):
    rng = np.random.default_rng(102)
    bn = layers.batch_norm(0.8, 1e-5, init_var=1.0)
    rn = layers.batch_renorm(0.8, 1e-5, r_max=1.0, d_max=0.0, init_var=1.0)
    params = _bn_params(rng.uniform(0.5, 2.0, 4).astype(np.float32), rng.normal(size=4).astype(np.float32))

    def run(norm, params, state, x, w):
        def loss(p, xx):
            y, s = norm.apply(p, state, xx)
            return jnp.sum(w * y), (y, s)

        (_, (y, s)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, s, gp, gx

    run = jax.jit(run, static_argnums=0) if jit else run
    _, s_bn = bn.init(4)
    _, s_rn = rn.init(4)
    for t in range(3):
        x = jnp.asarray(rng.normal(3.0 - 2 * t, 2.0 + t, (9, 4)).astype(np.float32))
        w = jnp.asarray(rng.normal(size=(9, 4)).astype(np.float32))
        y1, s_bn, gp1, gx1 = run(bn, params, s_bn, x, w)
        y2, s_rn, gp2, gx2 = run(rn, params, s_rn, x, w)
        for a, b in ((y1, y2), (s_bn.mean, s_rn.mean), (s_bn.var, s_rn.var), (gp1.gamma, gp2.gamma),
                     (gp1.beta, gp2.beta), (gx1, gx2)):
            np.testing.assert_array_equal(_a(a), _a(b))
        assert int(s_rn.step) == t + 1


def test_renorm_with_running_stats_equal_to_batch_stats_is_batch_norm():
    rng = np.random.default_rng(103)
    x = jnp.asarray(rng.normal(5.0, 3.0, (8, 3)).astype(np.float32))
    params = _bn_params(rng.uniform(0.5, 2.0, 3).astype(np.float32), rng.normal(size=3).astype(np.float32))
    mu, var = x.mean(0), x.var(0)  # what the batch will measure
    state = layers.BatchRenormState(mu, var, jnp.asarray(0, jnp.int32))
    y, _ = layers.batch_renorm(0.9, 1e-5, r_max=100.0, d_max=100.0).apply(params, state, x)
    y_bn, _ = layers.batch_norm_apply(params, layers.BatchNormState(mu, var), x, eps=1e-5)
    np.testing.assert_allclose(_a(y), _a(y_bn), atol=1e-6)


# --- Warm-up schedule and traced limits ----------------------------------------------------------------


def test_renorm_schedule_at_hand_computed_steps():
    # Defaults: hold 5000, r_max 3 at 40000, d_max 5 at 25000.
    for step, r, d in ((0, 1.0, 0.0), (4999, 1.0, 0.0), (5000, 1.0, 0.0), (22500, 2.0, 4.375),
                       (30000, 1.0 + 2.0 * 25000 / 35000, 5.0), (40000, 3.0, 5.0), (10 ** 6, 3.0, 5.0)):
        got = layers.renorm_schedule(step)
        np.testing.assert_allclose([float(got[0]), float(got[1])], [r, d], rtol=1e-6, atol=1e-6, err_msg=str(step))
    # Custom: hold 2, r reaches 3 at 6, d reaches 2 at 4; traced steps under jit and vmap.
    steps = jnp.arange(9)
    exp_r = [1, 1, 1, 1.5, 2, 2.5, 3, 3, 3]
    exp_d = [0, 0, 0, 1, 2, 2, 2, 2, 2]
    f = jax.jit(lambda s: layers.renorm_schedule(s, 3.0, 2.0, hold_steps=2, r_steps=6, d_steps=4))
    r, d = f(steps)
    np.testing.assert_allclose(_a(r), exp_r, atol=1e-6)
    np.testing.assert_allclose(_a(d), exp_d, atol=1e-6)
    r, d = jax.vmap(f)(steps)
    np.testing.assert_allclose(_a(r), exp_r, atol=1e-6)
    np.testing.assert_allclose(_a(d), exp_d, atol=1e-6)


def test_renorm_warmup_is_batch_norm_during_hold_then_follows_the_schedule():
    hold, r_steps, d_steps, r_max, d_max, m, eps = 3, 7, 5, 3.0, 5.0, 0.5, 1e-4
    rng = np.random.default_rng(104)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.normal(size=3)
    differs = []
    with x64():
        rn = layers.batch_renorm(m, eps, r_max=r_max, d_max=d_max, warmup=(hold, r_steps, d_steps))
        bn = layers.batch_norm(m, eps, init_var=1.0)
        params = _bn_params(gamma, beta, jnp.float64)
        _, s_rn = rn.init(3, jnp.float64)
        _, s_bn = bn.init(3, jnp.float64)
        mean, var = np.zeros(3), np.ones(3)
        for t in range(8):
            x = rng.normal(4.0 + 2 * t, [0.2, 2.0, 6.0], (7, 3))
            y_rn, s_rn = rn.apply(params, s_rn, jnp.asarray(x))
            y_bn, s_bn = bn.apply(params, s_bn, jnp.asarray(x))
            lim_r = 1 + (r_max - 1) * np.clip((t - hold) / (r_steps - hold), 0, 1)
            lim_d = d_max * np.clip((t - hold) / (d_steps - hold), 0, 1)
            y_ref, mean, var, _, _ = _np_renorm(x, gamma, beta, mean, var, r_max=lim_r, d_max=lim_d,
                                                momentum=m, eps=eps)
            if t < hold:
                np.testing.assert_array_equal(_a(y_rn), _a(y_bn))
                np.testing.assert_array_equal(_a(s_rn.mean), _a(s_bn.mean))
                np.testing.assert_array_equal(_a(s_rn.var), _a(s_bn.var))
            np.testing.assert_allclose(_a(y_rn), y_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(_a(s_rn.var), var, rtol=1e-10, atol=1e-10)
            assert int(s_rn.step) == t + 1
            differs.append(np.abs(_a(y_rn) - _a(y_bn)).max() > 1e-3)
    assert not any(differs[:hold]) and all(differs[hold + 1:])


def test_renorm_traced_limits_under_jit_and_vmap_agree_with_the_oracle():
    rng = np.random.default_rng(105)
    gamma, beta = rng.uniform(0.5, 2.0, 3), rng.normal(size=3)
    x = rng.normal([3.0, -1.0, 0.0], [4.0, 0.3, 1.0], (8, 3))
    mean, var = np.array([0.5, 0.0, 0.1]), np.array([1.0, 2.0, 0.8])
    eps, m = 1e-5, 0.9
    traces = []
    with x64():
        norm = layers.batch_renorm(m, eps)
        params = _bn_params(gamma, beta, jnp.float64)
        state = layers.BatchRenormState(jnp.asarray(mean), jnp.asarray(var), jnp.asarray(0, jnp.int32))

        def f(p, s, xx, rm, dm):
            traces.append(1)
            return norm.apply(p, s, xx, r_max=rm, d_max=dm)

        jf = jax.jit(f)
        for rm, dm in ((1.5, 0.5), (2.5, 3.0)):
            y, s = jf(params, state, jnp.asarray(x), jnp.asarray(rm), jnp.asarray(dm))
            y_ref, mu_ref, var_ref, _, _ = _np_renorm(x, gamma, beta, mean, var, r_max=rm, d_max=dm, momentum=m,
                                                      eps=eps)
            np.testing.assert_allclose(_a(y), y_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(_a(s.var), var_ref, rtol=1e-10, atol=1e-10)
        assert len(traces) == 1
        rms = jnp.asarray([1.0, 1.3, 2.0, 10.0])
        ys, states = jax.vmap(lambda rm: norm.apply(params, state, jnp.asarray(x), r_max=rm, d_max=0.5))(rms)
        outs = [_np_renorm(x, gamma, beta, mean, var, r_max=float(rm), d_max=0.5, momentum=m, eps=eps)[0]
                for rm in rms]
        for i, y_ref in enumerate(outs):
            np.testing.assert_allclose(_a(ys[i]), y_ref, rtol=1e-10, atol=1e-10)
        assert np.abs(outs[0] - outs[2]).max() > 1e-2  # the limits matter here
        np.testing.assert_array_equal(_a(states.step), 1)


# --- Ghost batch norm ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [9, 20])
def test_ghost_with_virtual_batch_at_least_the_batch_is_batch_norm_exactly(k):
    rng = np.random.default_rng(106)
    x = jnp.asarray(rng.normal(2.0, 3.0, (9, 4)).astype(np.float32))
    mask = jnp.asarray(rng.random(9) < 0.7)
    params = _bn_params(rng.uniform(0.5, 2.0, 4).astype(np.float32), rng.normal(size=4).astype(np.float32))
    gh = layers.ghost_batch_norm(k, 0.8, 1e-5, init_var=1.0)
    _, state = gh.init(4)
    for kw in ({}, {"mask": mask}):
        y, s = gh.apply(params, state, x, **kw)
        y_bn, s_bn = layers.batch_norm_apply(params, state, x, momentum=0.8, eps=1e-5, **kw)
        np.testing.assert_array_equal(_a(y), _a(y_bn))
        np.testing.assert_array_equal(_a(s.mean), _a(s_bn.mean))
        np.testing.assert_array_equal(_a(s.var), _a(s_bn.var))


def test_ghost_dividing_groups_equal_batch_norm_group_by_group():
    rng = np.random.default_rng(107)
    n, k, c, m, eps = 12, 4, 3, 0.7, 1e-5
    x = rng.normal(2.0, 3.0, (n, c)).astype(np.float32)
    x[4:8] += 10.0  # groups with different statistics
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    params = _bn_params(gamma, beta)
    gh = layers.ghost_batch_norm(k, m, eps, init_mean=0.5, init_var=2.0)
    _, state = gh.init(c)
    y, s = gh.apply(params, state, jnp.asarray(x))
    y_groups = [layers.batch_norm_apply(params, state, jnp.asarray(x[i:i + k]), eps=eps)[0] for i in range(0, n, k)]
    np.testing.assert_allclose(_a(y), np.concatenate([_a(g) for g in y_groups]), atol=1e-6)
    xd = x.astype(np.float64)
    group_vars = [xd[i:i + k].var(0) for i in range(0, n, k)]
    np.testing.assert_allclose(_a(s.mean), m * 0.5 + (1 - m) * xd.mean(0), rtol=1e-5)
    np.testing.assert_allclose(_a(s.var), m * 2.0 + (1 - m) * np.mean(group_vars, 0), rtol=1e-5)
    assert np.abs(np.mean(group_vars, 0) - xd.var(0)).min() > 1.0  # not the full-batch variance


def test_ghost_non_dividing_groups_last_group_smaller_count_weighted():
    rng = np.random.default_rng(108)
    n, k, c, m, eps = 10, 4, 3, 0.7, 1e-5
    x = rng.normal(2.0, 3.0, (n, c))
    x[8:] = rng.normal(-5.0, 0.5, (2, c))  # the small last group has a very different variance
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    with x64():
        gh = layers.ghost_batch_norm(k, m, eps)
        state = layers.BatchNormState(jnp.asarray(mean), jnp.asarray(var))
        y, s = gh.apply(_bn_params(gamma, beta, jnp.float64), state, jnp.asarray(x))
    y_ref, mu_ref, var_ref, groups = _np_ghost(x, k, gamma, beta, mean, var, momentum=m, eps=eps)
    assert [g[0] for g in groups] == [4, 4, 2]
    np.testing.assert_allclose(_a(y), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.mean), mu_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.var), var_ref, rtol=1e-10, atol=1e-10)
    unweighted = m * var + (1 - m) * np.mean([g[2] for g in groups], 0)
    assert np.abs(unweighted - var_ref).min() > 1e-2  # the weighting is tested


def test_ghost_evaluation_is_batch_norm_evaluation_with_the_running_stats():
    rng = np.random.default_rng(109)
    x = jnp.asarray(rng.normal(2.0, 3.0, (10, 3)).astype(np.float32))
    params = _bn_params(rng.uniform(0.5, 2.0, 3).astype(np.float32), rng.normal(size=3).astype(np.float32))
    state = layers.BatchNormState(jnp.asarray(rng.normal(size=3).astype(np.float32)),
                                  jnp.asarray(rng.uniform(0.5, 3.0, 3).astype(np.float32)))
    for k in (3, 4, 10, 16):
        y, s = layers.ghost_batch_norm(k, 0.9, 1e-5).apply(params, state, x, train=False)
        y_bn, _ = layers.batch_norm_apply(params, state, x, train=False, eps=1e-5)
        np.testing.assert_array_equal(_a(y), _a(y_bn))
        np.testing.assert_array_equal(_a(s.mean), _a(state.mean))
        np.testing.assert_array_equal(_a(s.var), _a(state.var))


def test_ghost_mask_removes_rows_from_their_groups():
    rng = np.random.default_rng(110)
    n, k, c, m, eps = 11, 4, 3, 0.6, 1e-5
    x = rng.normal(1.0, 2.0, (n, c))
    mask = np.array([1, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0], bool)  # group 2 (rows 4..7) fully masked: skipped
    x[~mask] = 1e4  # garbage in masked rows must not leak
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    with x64():
        gh = layers.ghost_batch_norm(k, m, eps)
        y, s = gh.apply(_bn_params(gamma, beta, jnp.float64), layers.BatchNormState(jnp.asarray(mean),
                                                                                     jnp.asarray(var)),
                        jnp.asarray(x), mask=jnp.asarray(mask))
    y_ref, mu_ref, var_ref, groups = _np_ghost(x, k, gamma, beta, mean, var, momentum=m, eps=eps, mask=mask)
    assert [g[0] for g in groups] == [3, 2]
    np.testing.assert_allclose(_a(y)[mask], y_ref[mask], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.mean), mu_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.var), var_ref, rtol=1e-10, atol=1e-10)


def test_ghost_nhwc_groups_rows_and_reduces_space():
    rng = np.random.default_rng(111)
    n, k, c, m, eps = 6, 4, 3, 0.6, 1e-5
    x = rng.normal(1.0, 2.0, (n, 2, 3, c))
    x[4:] += 3.0
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    with x64():
        gh = layers.ghost_batch_norm(k, m, eps)
        y, s = gh.apply(_bn_params(gamma, beta, jnp.float64),
                        layers.BatchNormState(jnp.asarray(mean), jnp.asarray(var)), jnp.asarray(x))
    y_ref, mu_ref, var_ref, groups = _np_ghost(x, k, gamma, beta, mean, var, momentum=m, eps=eps)
    assert [g[0] for g in groups] == [24, 12]
    assert y.shape == x.shape
    np.testing.assert_allclose(_a(y), y_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.mean), mu_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(_a(s.var), var_ref, rtol=1e-10, atol=1e-10)


def test_ghost_rejects_axis_0_as_feature_axis_and_bad_virtual_batch_sizes():
    gh = layers.ghost_batch_norm(2)
    params, state = gh.init(4)
    with pytest.raises(ValueError, match="axis 0"):
        gh.apply(params, state, jnp.ones((4, 4)), feature_axes=0)
    with pytest.raises(ValueError, match="axis 0"):
        gh.apply(params, state, jnp.ones((4, 4)), feature_axes=(0,), train=False)
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            layers.ghost_batch_norm(bad)


def test_fully_masked_batch_leaves_renorm_and_ghost_state_and_step_unchanged():
    x = jnp.asarray(np.random.default_rng(119).normal(size=(6, 2)).astype(np.float32))
    for norm in (layers.batch_renorm(0.5), layers.ghost_batch_norm(4, 0.5, init_var=1.0)):
        params, state = norm.init(2)
        _, s = norm.apply(params, state, x, mask=jnp.zeros(6, bool))
        for a, b in zip(s, state):
            np.testing.assert_array_equal(_a(a), _a(b))


# --- Every variant: jit, vmap ensembles, axis_name with unequal shards, bf16 ------------------------------

_M, _EPS = 0.7, 1e-5
_VARIANTS = {
    "batch_norm": lambda: layers.batch_norm(_M, _EPS, init_mean=0.5, init_var=2.0),
    "batch_renorm": lambda: layers.batch_renorm(_M, _EPS, r_max=1.5, d_max=0.5, init_mean=0.5, init_var=2.0),
    "ghost_batch_norm": lambda: layers.ghost_batch_norm(3, _M, _EPS, init_mean=0.5, init_var=2.0),
}


def _rows_in_groups_of_two_or_more(name, n, k=3):
    """Rows whose normalisation group has >= 2 rows (all but Ghost BN's last group of ``n % k == 1`` rows)."""
    rows = np.ones(n, bool)
    if name == "ghost_batch_norm" and n % k == 1:
        rows[-1] = False
    return rows


def _lone_row_atol(x, gamma, eps=_EPS):
    """In a group of one row the output is beta exactly in real numbers; computed as x * scale + (beta - mean *
    scale) with scale = gamma / sqrt(0 + eps), each product rounds to float32 spacing, amplified 1 / sqrt(eps)."""
    return 4 * float(np.finfo(np.float32).eps) * float(np.abs(x).max() * np.abs(gamma).max()) / np.sqrt(eps)


def _variant_case(rng, n=10, c=3):
    x = rng.normal(3.0, 2.0, (n, c)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    return x, gamma, beta


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_every_norm_jit_equals_eager_without_retracing(name):
    norm = _VARIANTS[name]()
    rng = np.random.default_rng(112)
    x, gamma, beta = _variant_case(rng)
    params = _bn_params(gamma, beta)
    _, state = norm.init(3)
    traces = []

    def f(p, s, xx):
        traces.append(1)
        return norm.apply(p, s, xx)

    jf = jax.jit(f)
    y_j, s_j = jf(params, state, jnp.asarray(x))
    y_e, s_e = f(params, state, jnp.asarray(x))
    rows = _rows_in_groups_of_two_or_more(name, len(x))
    np.testing.assert_allclose(_a(y_j)[rows], _a(y_e)[rows], atol=1e-6)
    for y in (y_j, y_e):  # a group of one row (ghost, 10 rows in groups of 3): beta, to float32 rounding
        np.testing.assert_allclose(_a(y)[~rows], np.broadcast_to(beta, _a(y)[~rows].shape),
                                   atol=_lone_row_atol(x, gamma))
    for a, b in zip(s_j, s_e):
        np.testing.assert_allclose(_a(a), _a(b), rtol=1e-6)
    n = len(traces)
    jf(params, s_j, jnp.asarray(x * 2))
    assert len(traces) == n


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_every_norm_vmapped_ensemble_matches_a_python_loop(name):
    norm = _VARIANTS[name]()
    rng = np.random.default_rng(113)
    num, n, c = 3, 10, 3
    xs = rng.normal(3.0, 2.0, (num, n, c)).astype(np.float32) * np.arange(1, num + 1)[:, None, None]
    params = _bn_params(rng.uniform(0.5, 2.0, (num, c)).astype(np.float32),
                        rng.normal(size=(num, c)).astype(np.float32))
    _, state = jax.vmap(lambda _: norm.init(c))(jnp.arange(num))
    state = state._replace(mean=state.mean + jnp.arange(num, dtype=jnp.float32)[:, None])
    for train in (True, False):
        ys, states = jax.vmap(lambda p, s, xx: norm.apply(p, s, xx, train))(params, state, jnp.asarray(xs))
        for i in range(num):
            p_i, s_i = jax.tree_util.tree_map(lambda a: a[i], (params, state))
            y_i, st_i = norm.apply(p_i, s_i, jnp.asarray(xs[i]), train)
            np.testing.assert_allclose(_a(ys[i]), _a(y_i), atol=1e-5)
            for a, b in zip(states, st_i):
                np.testing.assert_allclose(_a(a[i]), _a(b), rtol=1e-6)


def _shards(rng, sizes, nmax, c):
    """Per-device shards padded to nmax rows, a mask with padding and a few extra masked rows."""
    x = rng.normal(3.0, 2.0, (len(sizes), nmax, c)).astype(np.float32)
    x[1] += 4.0  # devices see different data
    mask = np.arange(nmax)[None, :] < np.array(sizes)[:, None]
    mask[0, 1] = False
    mask[2, 4] = False
    x[~mask] = 1e6
    return x, mask


def _expected_sharded(name, x, mask, gamma, beta, mean, var):
    """Float64 oracle of the cross-device run: (y per shard, NaN at masked rows; new mean; new var)."""
    xd = x.astype(np.float64)
    valid = np.concatenate([xd[i][mask[i]] for i in range(len(xd))])
    if name == "ghost_batch_norm":
        ys, groups = [], []
        for i in range(len(xd)):
            y_i, _, _, g_i = _np_ghost(xd[i], 3, gamma, beta, mean, var, momentum=_M, eps=_EPS, mask=mask[i])
            ys.append(y_i)
            groups += g_i
        mu, v = _np_pool(groups, mean, var, _M)
        return np.stack(ys), mu, v
    if name == "batch_renorm":
        y_valid, mu, v, _, _ = _np_renorm(valid, gamma, beta, mean, var, r_max=1.5, d_max=0.5, momentum=_M,
                                          eps=_EPS)
    else:
        mu_b, var_b = valid.mean(0), valid.var(0)
        y_valid = gamma * (valid - mu_b) / np.sqrt(var_b + _EPS) + beta
        mu, v = _M * mean + (1 - _M) * mu_b, _M * var + (1 - _M) * var_b
    y = np.full_like(xd, np.nan)
    y[mask] = y_valid
    return y, mu, v


@pytest.mark.parametrize("how", ["vmap", "shard_map"])
@pytest.mark.parametrize("name", list(_VARIANTS))
def test_every_norm_across_unequal_masked_shards_equals_the_concatenated_valid_rows(name, how):
    norm = _VARIANTS[name]()
    rng = np.random.default_rng(114)
    sizes, nmax, c = [5, 1, 7, 3], 7, 3
    x, mask = _shards(rng, sizes, nmax, c)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    params = _bn_params(gamma, beta)
    _, state = norm.init(c)
    if name == "batch_renorm":
        assert int(state.step) == 0

    def per_shard(xs, ms):
        return norm.apply(params, state, xs, axis_name="i", mask=ms)

    if how == "vmap":
        ys, states = jax.vmap(per_shard, axis_name="i")(jnp.asarray(x), jnp.asarray(mask))
        ys = _a(ys)
        states = jax.tree_util.tree_map(lambda a: a[0], states)
    else:
        from jax.sharding import Mesh, PartitionSpec as P

        if len(jax.devices()) < 4:
            pytest.skip("needs 4 devices")
        mesh = Mesh(np.array(jax.devices()[:4]), ("i",))
        kwargs = dict(mesh=mesh, in_specs=(P("i"), P("i")), out_specs=(P("i"), P()))
        try:
            sm = _shard_map()(per_shard, check_vma=False, **kwargs)
        except TypeError:
            sm = _shard_map()(per_shard, check_rep=False, **kwargs)
        ys, states = jax.jit(sm)(jnp.asarray(x.reshape(-1, c)), jnp.asarray(mask.reshape(-1)))
        ys = _a(ys).reshape(x.shape)
    y_ref, mu_ref, var_ref = _expected_sharded(name, x, mask, gamma.astype(np.float64), beta.astype(np.float64),
                                               0.5, 2.0)
    # A shard with one valid row makes a ghost group of one row: beta to float32 rounding (see _lone_row_atol).
    lone = np.zeros_like(mask)
    if name == "ghost_batch_norm":
        for i in range(len(sizes)):
            for g in range(0, nmax, 3):
                if mask[i, g:g + 3].sum() == 1:
                    lone[i, g:g + 3] = mask[i, g:g + 3]
        assert lone.sum() == 2  # the 1-row shard, and the 7-row shard's last group (rows 6..)
        np.testing.assert_allclose(ys[lone], y_ref[lone], atol=_lone_row_atol(x[mask], gamma))
    np.testing.assert_allclose(ys[mask & ~lone], y_ref[mask & ~lone], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_a(states.mean), mu_ref, rtol=1e-5)
    np.testing.assert_allclose(_a(states.var), var_ref, rtol=1e-4)
    if name == "batch_renorm":
        assert int(states.step) == 1
        # And equal to the single-device run on the concatenated valid rows.
        valid = np.concatenate([x[i][mask[i]] for i in range(len(x))])
        y1, s1 = norm.apply(params, state, jnp.asarray(valid))
        np.testing.assert_allclose(ys[mask], _a(y1), atol=1e-5)
        np.testing.assert_allclose(_a(states.mean), _a(s1.mean), rtol=1e-6)
        np.testing.assert_allclose(_a(states.var), _a(s1.var), rtol=1e-6)


@pytest.mark.parametrize("name", list(_VARIANTS))
def test_every_norm_bf16_input_bf16_output_float32_state(name):
    norm = _VARIANTS[name]()
    rng = np.random.default_rng(115)
    x, gamma, beta = _variant_case(rng)
    params = _bn_params(gamma, beta)
    _, state = norm.init(3)
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    x32 = xb.astype(jnp.float32)  # the same numbers in float32
    for train in (True, False):
        y, s = norm.apply(params, state, xb, train)
        y32, s32 = norm.apply(params, state, x32, train)
        assert y.dtype == jnp.bfloat16
        assert s.mean.dtype == jnp.float32 and s.var.dtype == jnp.float32
        for a, b in zip(s, s32):
            np.testing.assert_allclose(_a(a), _a(b), rtol=1e-6)
        np.testing.assert_allclose(_a(y.astype(jnp.float32)), _a(y32), rtol=2 ** -8, atol=1e-6)


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
        folded = layers.fold_batch_norm(aff, bnp, st, eps)
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
        fk, fb = layers.fold_conv_batch_norm(k_dt, b_dt, bnp, st, eps)
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
    with pytest.raises(ValueError):
        layers.fold_batch_norm(aff, _bn_params(np.ones(4), np.zeros(3)), good)
    with pytest.raises(ValueError):
        layers.fold_batch_norm(aff, _bn_params(np.ones(3), np.zeros(3)),
                               layers.BatchNormState(jnp.zeros(4), jnp.ones(4)))
    with pytest.raises(ValueError):
        layers.fold_conv_batch_norm(jnp.ones((3, 3, 2, 4)), None, _bn_params(np.ones(3), None), good)
    with pytest.raises(ValueError):
        layers.fold_conv_batch_norm(jnp.ones((3, 2, 3)), None, _bn_params(np.ones(3), None), good)
    with pytest.raises(ValueError):
        layers.fold_batch_norm(aff, _bn_params(np.ones(3), np.zeros(3)), good, eps=0.0)


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
        return norm.apply(p, s, x)

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
        renorm.apply(bn_params, bn_state, x, True)
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
        renorm.apply(params, state, x, True, **kwargs)
    # traced limits pass unchecked (a schedule), per-feature limits are fine
    jax.jit(lambda r: renorm.apply(params, state, x, True, r_max=r)[0])(2.0)
    renorm.apply(params, state, x, True, r_max=np.array([1.0, 2.0, 3.0]))
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
            apply(renorm_params, renorm_state, x, True)
    params, state = layers.batch_norm().init(3)
    with pytest.raises(TypeError, match="eps belongs to the norm value"):
        layers.batch_norm().apply(params, state, x, True, eps=1e-3)
    for bad in ("train", "update_stats"):
        with pytest.raises(TypeError, match=f"{bad} cannot be set"):
            layers.recalibrate(layers.batch_norm(), params, state, jnp.ones((2, 4, 3)), **{bad: False})
    with pytest.raises(ValueError, match="N >= 1"):
        layers.recalibrate(layers.batch_norm(), params, state, jnp.ones((2, 0, 3)))
    for bad in (1.0, True, (), "1"):
        with pytest.raises(TypeError, match="feature_axes"):
            layers.batch_norm_apply(params, state, x, True, feature_axes=bad)
    y, _ = layers.batch_norm_apply(params, state, x, True, feature_axes=np.int64(1))  # NumPy ints are axes
    assert y.shape == x.shape
    with pytest.raises(NotImplementedError, match="must define init"):
        layers.Norm().init(3)


def test_fold_refuses_integer_weights_negative_variance_and_a_bias_of_the_wrong_size():
    params, state = layers.batch_norm().init(3)
    aff = layers.AffineParams(jnp.ones((2, 3), jnp.int32), jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="floating"):
        layers.fold_batch_norm(aff, params, state)
    with pytest.raises(ValueError, match="variance must be >= 0"):
        layers.fold_batch_norm(layers.AffineParams(jnp.ones((2, 3)), jnp.zeros(3)), params,
                               state._replace(var=jnp.array([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="bias has shape"):
        layers.fold_conv_batch_norm(jnp.ones((3, 3, 2, 3)), jnp.ones(4), params, state)
