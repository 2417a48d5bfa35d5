"""Ghost batch norm (bnjax.norms.ghost) against a float64 NumPy oracle, and every norm value under jit, vmap
ensembles, axis_name with unequal shards and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from conftest import x64
from norms_oracle import _a, _bn_params, _np_ghost, _np_pool, _np_renorm, _shard_map


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
        y, s = gh.apply(params, state, x, train=True, **kw)
        y_bn, s_bn = layers.batch_norm_apply(params, state, x, train=True, momentum=0.8, eps=1e-5, **kw)
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
    y, s = gh.apply(params, state, jnp.asarray(x), train=True)
    y_groups = [layers.batch_norm_apply(params, state, jnp.asarray(x[i:i + k]), train=True, eps=eps)[0]
                for i in range(0, n, k)]
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
        y, s = gh.apply(_bn_params(gamma, beta, jnp.float64), state, jnp.asarray(x), train=True)
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
                        jnp.asarray(x), train=True, mask=jnp.asarray(mask))
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
                        layers.BatchNormState(jnp.asarray(mean), jnp.asarray(var)), jnp.asarray(x), train=True)
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
        gh.apply(params, state, jnp.ones((4, 4)), train=True, feature_axes=0)
    with pytest.raises(ValueError, match="axis 0"):
        gh.apply(params, state, jnp.ones((4, 4)), feature_axes=(0,), train=False)
    for bad in (0, -3, 2.5, True, "4", None):
        with pytest.raises(ValueError, match="virtual_batch_size"):
            layers.ghost_batch_norm(bad)


def test_fully_masked_batch_leaves_renorm_and_ghost_state_and_step_unchanged():
    x = jnp.asarray(np.random.default_rng(119).normal(size=(6, 2)).astype(np.float32))
    for norm in (layers.batch_renorm(0.5), layers.ghost_batch_norm(4, 0.5, init_var=1.0)):
        params, state = norm.init(2)
        _, s = norm.apply(params, state, x, train=True, mask=jnp.zeros(6, bool))
        for a, b in zip(s, state):
            np.testing.assert_array_equal(_a(a), _a(b))


# --- Every variant: jit, vmap ensembles, axis_name with unequal shards, bf16 ------------------------------

_M, _EPS, _K = 0.7, 1e-5, 4
_VARIANTS = {
    "batch_norm": lambda: layers.batch_norm(_M, _EPS, init_mean=0.5, init_var=2.0),
    "batch_renorm": lambda: layers.batch_renorm(_M, _EPS, r_max=1.5, d_max=0.5, init_mean=0.5, init_var=2.0),
    "ghost_batch_norm": lambda: layers.ghost_batch_norm(_K, _M, _EPS, init_mean=0.5, init_var=2.0),
}


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
        return norm.apply(p, s, xx, train=True)

    jf = jax.jit(f)
    y_j, s_j = jf(params, state, jnp.asarray(x))
    y_e, s_e = f(params, state, jnp.asarray(x))
    np.testing.assert_allclose(_a(y_j), _a(y_e), atol=1e-6)
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
        ys, states = jax.vmap(lambda p, s, xx: norm.apply(p, s, xx, train=train))(params, state, jnp.asarray(xs))
        for i in range(num):
            p_i, s_i = jax.tree_util.tree_map(lambda a: a[i], (params, state))
            y_i, st_i = norm.apply(p_i, s_i, jnp.asarray(xs[i]), train=train)
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
            y_i, _, _, g_i = _np_ghost(xd[i], _K, gamma, beta, mean, var, momentum=_M, eps=_EPS, mask=mask[i])
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
# batch_norm across shards is also test_norms_core's axis_name tests: quick tier keeps renorm and ghost here
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "batch_norm" else n
                                  for n in _VARIANTS])
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
        return norm.apply(params, state, xs, train=True, axis_name="i", mask=ms)

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
    # A mask that leaves one valid row in a ghost group (data, so not refused): beta to float32 rounding (see
    # _lone_row_atol).
    lone = np.zeros_like(mask)
    if name == "ghost_batch_norm":
        for i in range(len(sizes)):
            for g in range(0, nmax, _K):
                if mask[i, g:g + _K].sum() == 1:
                    lone[i, g:g + _K] = mask[i, g:g + _K]
        assert lone.sum() == 2  # the 1-row shard, and shard 0's second group (rows 4.., one of them valid)
        np.testing.assert_allclose(ys[lone], y_ref[lone], atol=_lone_row_atol(x[mask], gamma))
    np.testing.assert_allclose(ys[mask & ~lone], y_ref[mask & ~lone], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_a(states.mean), mu_ref, rtol=1e-5)
    np.testing.assert_allclose(_a(states.var), var_ref, rtol=1e-4)
    if name == "batch_renorm":
        assert int(states.step) == 1
        # And equal to the single-device run on the concatenated valid rows.
        valid = np.concatenate([x[i][mask[i]] for i in range(len(x))])
        y1, s1 = norm.apply(params, state, jnp.asarray(valid), train=True)
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
        y, s = norm.apply(params, state, xb, train=train)
        y32, s32 = norm.apply(params, state, x32, train=train)
        assert y.dtype == jnp.bfloat16
        assert s.mean.dtype == jnp.float32 and s.var.dtype == jnp.float32
        for a, b in zip(s, s32):
            np.testing.assert_allclose(_a(a), _a(b), rtol=1e-6)
        np.testing.assert_allclose(_a(y.astype(jnp.float32)), _a(y32), rtol=2 ** -8, atol=1e-6)


# --- Groups of one value per feature are refused (issue 15, item 12) --------------------------------------


def test_ghost_per_example_vmap_is_refused_not_normalised_to_beta():
    # Equinox's style: jax.vmap(model, axis_name="batch") over single examples. Each call holds one row, so every
    # virtual batch was one row and every output exactly beta (held-out 0.073 in a small conv net).
    gh = layers.ghost_batch_norm(4)
    params, state = gh.init(3)
    x = jnp.asarray(np.random.default_rng(120).normal(size=(8, 3)), jnp.float32)

    def per_example(xi):
        return gh.apply(params, state, xi[None], train=True, axis_name="batch")[0][0]

    with pytest.raises(ValueError, match=r"one row per call across axis_name='batch'.*per-example jax\.vmap"):
        jax.vmap(per_example, axis_name="batch")(x)
    # evaluation never forms groups: per example is fine there, and equals evaluating the batch
    y_eval = jax.vmap(lambda xi: gh.apply(params, state, xi[None], train=False)[0][0])(x)
    np.testing.assert_allclose(_a(y_eval), _a(gh.apply(params, state, x, train=False)[0]), rtol=1e-6)


@pytest.mark.parametrize("n,k,why", [(9, 4, "9 rows in groups of 4 leave a last group of one row"),
                                     (5, 1, "virtual_batch_size=1 makes groups of one row"),
                                     (1, 4, "x has one row;")])
def test_ghost_refuses_any_group_of_one_value_per_feature(n, k, why):
    gh = layers.ghost_batch_norm(k)
    params, state = gh.init(3)
    x = jnp.asarray(np.random.default_rng(121).normal(size=(n, 3)), jnp.float32)
    for flags in (dict(train=True), dict(train=False, update_stats=True)):
        with pytest.raises(ValueError, match=f"one value per feature has variance 0.*{why}"):
            gh.apply(params, state, x, **flags)


def test_ghost_one_row_groups_of_a_conv_input_reduce_over_space():
    # [N, H, W, C] with virtual batches of one row: each image has H * W values per feature, a real variance.
    rng = np.random.default_rng(122)
    x = rng.normal(1.0, 2.0, (3, 2, 5, 4))
    gh = layers.ghost_batch_norm(1, 0.9, 1e-5)
    params, state = gh.init(4)
    y, new = gh.apply(params, state, jnp.asarray(x, jnp.float32), train=True)
    mu, var = x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    np.testing.assert_allclose(_a(y), (x - mu) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_a(new.var), 0.9 + 0.1 * var.mean((0, 1, 2)), rtol=1e-5)


# --- One example per call: batch_axis_name (issue 17, item 5) ---------------------------------------------------


@pytest.mark.parametrize("n,k,masked", [(10, 4, False), (10, 4, True), (8, 3, False), (6, 8, False)])
def test_ghost_per_example_with_batch_axis_name_equals_the_numpy_groups(n, k, masked):
    # Equinox's idiom: one example per call under jax.vmap(..., axis_name="batch"); the virtual batches are k
    # consecutive indices of the named axis, exactly as k consecutive rows of the batch.
    rng = np.random.default_rng(130 + n + k)
    x = rng.normal(2.0, 3.0, (n, 5))
    mask = (rng.random(n) > 0.3) if masked else None
    if masked:
        mask[:2] = True
    gamma, beta = rng.normal(1.0, 0.2, 5), rng.normal(0.0, 0.2, 5)
    mean0, var0 = rng.normal(size=5), rng.random(5) + 0.5
    gh = layers.ghost_batch_norm(k, 0.8, 1e-5)
    params = _bn_params(gamma, beta)
    state = layers.BatchNormState(jnp.asarray(mean0, jnp.float32), jnp.asarray(var0, jnp.float32))

    def per_example(xi, mi):
        return gh.apply(params, state, xi, train=True, batch_axis_name="batch", mask=mi)

    xs = jnp.asarray(x, jnp.float32)
    ms = jnp.ones(n, bool) if mask is None else jnp.asarray(mask)
    y, new = jax.jit(jax.vmap(per_example, axis_name="batch", out_axes=(0, None)))(xs, ms)
    y_np, mean_np, var_np, _ = _np_ghost(x, k, gamma, beta, mean0, var0, momentum=0.8, eps=1e-5, mask=mask)
    rows = np.ones(n, bool) if mask is None else mask
    np.testing.assert_allclose(_a(y)[rows], y_np[rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_a(new.mean), mean_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new.var), var_np, rtol=1e-5, atol=1e-6)
    # gradients equal the batch call's (jax 0.7 could not transpose a psum inside a vmap over the groups)
    weights = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
    keep = jnp.asarray(rows)[:, None]

    def per_example_loss(xv):
        return jnp.sum(jax.vmap(per_example, axis_name="batch")(xv, ms)[0] * weights * keep)

    def batch_loss(xv):
        return jnp.sum(gh.apply(params, state, xv, train=True, mask=None if mask is None else ms)[0] * weights * keep)

    np.testing.assert_allclose(_a(jax.jit(jax.grad(per_example_loss))(xs)), _a(jax.grad(batch_loss)(xs)),
                               rtol=1e-4, atol=1e-5)
    # evaluation: the running statistics, per example as on the batch
    y_eval, same = jax.vmap(lambda xi: gh.apply(params, state, xi, train=False, batch_axis_name="batch"),
                            axis_name="batch", out_axes=(0, None))(xs)
    np.testing.assert_allclose(_a(y_eval), _a(gh.apply(params, state, xs, train=False)[0]), rtol=1e-6)
    np.testing.assert_array_equal(_a(same.mean), mean0.astype(np.float32))
    np.testing.assert_array_equal(_a(same.var), var0.astype(np.float32))


def test_ghost_per_example_channels_first_conv_examples_equal_the_batch_call():
    # Equinox's conv activations are [C, H, W] per example: feature_axes=0, statistics over H, W and the axis.
    rng = np.random.default_rng(140)
    x = rng.normal(1.0, 2.0, (6, 3, 4, 5))
    gh = layers.ghost_batch_norm(4, 0.9, 1e-5)
    params, state = gh.init(3)
    y, new = jax.vmap(lambda xi: gh.apply(params, state, xi, train=True, batch_axis_name="b", feature_axes=0),
                      axis_name="b", out_axes=(0, None))(jnp.asarray(x, jnp.float32))
    y_np, mean_np, var_np, _ = _np_ghost(np.moveaxis(x, 1, -1), 4, 1.0, 0.0, np.zeros(3), np.ones(3),
                                         momentum=0.9, eps=1e-5)
    np.testing.assert_allclose(np.moveaxis(_a(y), 1, -1), y_np, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_a(new.mean), mean_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new.var), var_np, rtol=1e-5, atol=1e-6)


def test_ghost_per_example_refusals_name_the_problem():
    gh = layers.ghost_batch_norm(4)
    params, state = gh.init(3)
    x = jnp.ones((5, 3))
    with pytest.raises(ValueError, match=r"5 rows in groups of 4 leave a last group of one row"):
        jax.vmap(lambda xi: gh.apply(params, state, xi, train=True, batch_axis_name="b"), axis_name="b")(x)
    with pytest.raises(ValueError, match=r"batch_axis_name='b' is not bound"):
        gh.apply(params, state, x[0], train=True, batch_axis_name="b")
    with pytest.raises(ValueError, match=r"batch's named axis as batch_axis_name only"):
        jax.vmap(lambda xi: gh.apply(params, state, xi, train=True, batch_axis_name="b", axis_name="b"),
                 axis_name="b")(jnp.ones((8, 3)))
    with pytest.raises(ValueError, match=r"its mask is a scalar"):
        jax.vmap(lambda xi: gh.apply(params, state, xi, train=True, batch_axis_name="b", mask=jnp.ones(1, bool)),
                 axis_name="b")(jnp.ones((8, 3)))
    # rank 1 with axis_name (not batch_axis_name) is refused with the way out
    with pytest.raises(ValueError, match=r"holds one example.*pass batch_axis_name"):
        jax.vmap(lambda xi: gh.apply(params, state, xi, train=True, axis_name="b"), axis_name="b")(jnp.ones((8, 3)))
