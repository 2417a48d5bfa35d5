"""Precise statistics: ``layers.recalibrate`` (one norm layer) and ``norms.recalibrate`` (any network) against
float64 NumPy statistics; stale running statistics, the rank of a batch, iterables of batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers, norms
from norms_oracle import _a, _bn_params, _np_ghost, _np_pool


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


# --- Generic recalibrate on a network written here ------------------------------------------------------


def _two_layer_net(second, first=None):
    """x -> Affine -> ``first`` norm (batch norm) -> ReLU -> dropout -> Affine -> ``second`` norm: a conv-free
    network."""
    first = layers.batch_norm(0.9, 1e-5) if first is None else first

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
            "ghost": layers.ghost_batch_norm(4, 0.9, 1e-5)}[second]
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


# --- The rank of a batch, iterables of batches, stale statistics (issue 15, items 6, 13, 14) ------------------


def _np_stats(b, axes=None):
    b = np.asarray(b, np.float64)
    axes = tuple(range(b.ndim - 1)) if axes is None else axes
    return b.mean(axes), b.var(axes)


def test_recalibrating_one_layer_states_the_rank_of_a_batch():
    rng = np.random.default_rng(130)
    bn = layers.batch_norm(0.9, 1e-5)
    params, state = bn.init(2)
    images = jnp.asarray(rng.normal(1.0, 2.0, (4, 6, 6, 2)), jnp.float32)  # one batch of 4 images, no batches axis
    # before: read as 4 "batches" of 6 rows of [6, 2]
    with pytest.raises(ValueError, match=r"batches has shape \(4, 6, 6, 2\) \(rank 4\).*batches\[None\].*batch_ndim=4"):
        layers.recalibrate(bn, params, state, images)
    with pytest.raises(ValueError, match=r"batches has shape \(4, 6, 6, 2\) \(rank 4\).*rank 5"):
        layers.recalibrate(bn, params, state, images, batch_ndim=4)
    with pytest.raises(ValueError, match=r"batch 0 has shape \(6, 6, 2\), but a batch of this layer has rank 2"):
        layers.recalibrate(bn, params, state, list(images))  # a list of single images
    for bad, error in ((1, ValueError), (True, TypeError), (2.0, TypeError)):
        with pytest.raises(error, match="batch_ndim must be an integer >= 2"):
            layers.recalibrate(bn, params, state, images[None], batch_ndim=bad)
    stacked = jnp.asarray(rng.normal(1.0, 2.0, (3, 4, 6, 6, 2)) * rng.uniform(0.5, 2, (3, 1, 1, 1, 2)), jnp.float32)
    new = layers.recalibrate(bn, params, state, stacked, batch_ndim=4)
    stats = [_np_stats(b) for b in _a(stacked)]
    np.testing.assert_allclose(_a(new.mean), np.mean([m for m, _ in stats], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new.var), np.mean([v for _, v in stats], 0), rtol=1e-5)
    # a list of batches of unequal sizes: the equal-weight mean of their statistics
    parts = [stacked[0], stacked[1][:2]]
    new = layers.recalibrate(bn, params, state, parts, batch_ndim=4)
    stats = [_np_stats(b) for b in parts]
    np.testing.assert_allclose(_a(new.mean), np.mean([m for m, _ in stats], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new.var), np.mean([v for _, v in stats], 0), rtol=1e-5)
    # the network-wide recalibrate checks the rank when told it
    forward, init = _two_layer_net(layers.batch_norm(0.9, 1e-5))
    p2, s2 = init(jax.random.key(5))
    with pytest.raises(ValueError, match=r"batches\[0\] of batches \(6, 4\)\) has shape \(4,\).*rank 2"):
        norms.recalibrate(forward, p2, s2, jnp.ones((6, 4)), batch_ndim=2)


@pytest.mark.parametrize("name", ["batch_norm", "ghost_batch_norm"])
def test_recalibrate_takes_any_iterable_of_batches(name):
    norm = _RECAL[name]()
    rng = np.random.default_rng(131)
    sizes = (8, 5, 11)
    batches = [jnp.asarray(rng.normal(0.0, 1.0, (n, 3)) * rng.uniform(0.5, 4.0, 3) + rng.normal(0, 5, 3), jnp.float32)
               for n in sizes]
    params, state = norm.init(3)
    if name.startswith("ghost"):
        stats = [_np_pool(_np_ghost(_a(b), 3, 1.0, 0.0, 0.0, 0.0, momentum=0.0, eps=1e-5)[3], 0.0, 0.0, 0.0)
                 for b in batches]
    else:
        stats = [_np_stats(b) for b in batches]
    # before: a generator gave a raw JAX TypeError (not a valid JAX array type)
    for given in (batches, tuple(batches), (b for b in batches)):
        new = layers.recalibrate(norm, params, state, given)
        np.testing.assert_allclose(_a(new.mean), np.mean([m for m, _ in stats], 0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(_a(new.var), np.mean([v for _, v in stats], 0), rtol=1e-5)
    with pytest.raises(ValueError, match="batches is empty"):
        layers.recalibrate(norm, params, state, iter([]))
    with pytest.raises(ValueError, match=r"batch 1 must have at least one row"):
        layers.recalibrate(norm, params, state, [batches[0], batches[0][:0]])
    with pytest.raises(TypeError, match="batches must be an array .* or an iterable of batches"):
        norms.recalibrate(lambda p, s, x, *, train, key=None: (x, s), params, state, "batches")


def test_generic_recalibrate_over_a_generator_equals_the_stacked_batches():
    forward, init = _two_layer_net(layers.batch_renorm(0.9, 1e-5, r_max=1.5, d_max=0.5))
    params, state = init(jax.random.key(6))
    batches = jnp.asarray(np.random.default_rng(132).normal(0.5, 2.0, (4, 7, 4)), jnp.float32)
    key = jax.random.key(7)
    stacked = norms.recalibrate(forward, params, state, batches, key=key)
    streamed = norms.recalibrate(forward, params, state, (b for b in batches), key=key)
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(streamed)):
        np.testing.assert_allclose(_a(a), _a(b), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(_RECAL))
def test_one_layer_recalibrate_replaces_stale_nan_and_inf_running_statistics(name):
    # issue 15, item 6: the average was built from 0 * old + batch, and 0 * NaN is NaN
    norm = _RECAL[name]()
    rng = np.random.default_rng(133)
    batches = jnp.asarray(rng.normal(1.0, 2.0, (3, 8, 3)), jnp.float32)
    params, state = norm.init(3)
    stale = state._replace(mean=jnp.asarray([np.nan, 1.0, np.inf], jnp.float32),
                           var=jnp.asarray([np.inf, np.nan, -np.inf], jnp.float32))
    want = layers.recalibrate(norm, params, state, batches)
    got = layers.recalibrate(norm, params, stale, batches)
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(_a(a), _a(b))


def test_stale_statistics_that_the_forward_reads_start_from_mean_0_and_variance_1():
    # Batch Renorm's training output reads its running statistics (r and d): a NaN there reached every later
    # layer's statistics. Now non-finite entries are read as the usual start, 0 and 1.
    forward, init = _two_layer_net(layers.batch_norm(0.9, 1e-5), first=layers.batch_renorm(0.9, 1e-5))
    params, state = init(jax.random.key(8))
    state = (state[0]._replace(mean=state[0].mean + 0.4, var=state[0].var * 3.0), state[1])
    batches = jnp.asarray(np.random.default_rng(134).normal(0.5, 2.0, (3, 6, 4)), jnp.float32)
    stale = (state[0]._replace(mean=state[0].mean.at[1].set(jnp.nan), var=state[0].var.at[2].set(jnp.inf)),
             state[1])
    clean = (state[0]._replace(mean=state[0].mean.at[1].set(0.0), var=state[0].var.at[2].set(1.0)), state[1])
    got = norms.recalibrate(forward, params, stale, batches)
    want = norms.recalibrate(forward, params, clean, batches)
    assert all(np.all(np.isfinite(_a(leaf))) for leaf in jax.tree_util.tree_leaves(got))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(_a(a), _a(b))
    # and the statistics do depend on what the renorm layer reads (the replacement is not a no-op)
    other = norms.recalibrate(forward, params, state, batches)
    assert not np.allclose(_a(other[1].mean), _a(got[1].mean))
