"""bnjax.model's precise statistics (``model.recalibrate``) and folding (``model.fold``) against the float64 NumPy
network: batch statistics per layer, stale running statistics, iterables of batches, non-default eps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers, model
from conftest import x64

SIZES = (12, (9, 7, 8), 5)


def net(*sizes, **kw):
    return model.MLPConfig(*sizes, **kw)


def _numpy_forward(params, x, stats=None, eps=1e-6):
    """The book's network in float64 NumPy, training-mode batch norm (``stats=None``: batch statistics, recorded
    per layer) or evaluation mode with ``stats`` [(mean, var)] per layer. Returns (logits, [(mean, var)])."""
    h, seen = np.asarray(x, np.float64), []
    for i, aff in enumerate(params.affine[:-1]):
        h = h @ np.asarray(aff.W, np.float64) + np.asarray(aff.b, np.float64)
        if params.batch_norm:
            mu, var = (h.mean(0), h.var(0)) if stats is None else stats[i]
            seen.append((mu, var))
            p = params.batch_norm[i]
            h = np.asarray(p.gamma, np.float64) * (h - mu) / np.sqrt(var + eps) + np.asarray(p.beta, np.float64)
        h = np.maximum(h, 0.0)
    last = params.affine[-1]
    return h @ np.asarray(last.W, np.float64) + np.asarray(last.b, np.float64), seen


def _perturbed(params, rng):
    """Non-trivial gamma and beta (1 and 0 would hide a swapped or missing term)."""
    bn = tuple(p._replace(gamma=p.gamma * jnp.asarray(rng.uniform(0.5, 2.0, p.gamma.shape), p.gamma.dtype),
                          beta=p.beta + jnp.asarray(rng.normal(size=p.beta.shape), p.beta.dtype))
               for p in params.batch_norm)
    return params._replace(batch_norm=bn)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_recalibrate_sets_the_average_of_each_layers_batch_statistics(dtype):
    rng = np.random.default_rng(8)
    with x64():
        dt = jnp.dtype(dtype)
        cfg = net(*SIZES, norm=True)
        params, state = model.init(cfg, jax.random.key(3), weight_init=0.5, dtype=dt)
        params = _perturbed(params, rng)
        batches = rng.normal(1.0, 2.0, size=(5, 7, SIZES[0]))
        new = model.recalibrate(cfg, params, state, jnp.asarray(batches, dt))
        per_batch = [_numpy_forward(params, xb)[1] for xb in batches]  # layer statistics of each batch
        tol = 1e-12 if dtype == "float64" else 2e-5
        for i, s in enumerate(new.batch_norm):
            np.testing.assert_allclose(np.asarray(s.mean), np.mean([b[i][0] for b in per_batch], 0), rtol=tol, atol=tol)
            np.testing.assert_allclose(np.asarray(s.var), np.mean([b[i][1] for b in per_batch], 0), rtol=tol, atol=tol)
        # the parameters are unchanged and the state is float, of the same structure
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
        # a renorm network keeps its update count; the statistics are its training-mode batch statistics
        rcfg = net(*SIZES, norm=layers.batch_renorm(running_average="std"))
        rp, rs = model.init(rcfg, jax.random.key(3), weight_init=0.5, dtype=dt)
        rs = model.apply(rcfg, rp, rs, jnp.asarray(batches[0], dt), train=True)[1]
        rnew = model.recalibrate(rcfg, rp, rs, jnp.asarray(batches[:1], dt))
        assert int(rnew.batch_norm[0].step) == 1
        first = _numpy_forward(rp, batches[0])[1][0]
        np.testing.assert_allclose(np.asarray(rnew.batch_norm[0].mean), first[0], rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(rnew.batch_norm[0].var), first[1], rtol=max(tol, 1e-9), atol=max(tol, 1e-9))


@pytest.mark.slow
def test_recalibrate_checks_its_input_and_needs_a_key_with_dropout():
    cfg = net(*SIZES, norm=True)
    params, state = model.init(cfg, jax.random.key(0), weight_init=0.5)
    with pytest.raises(ValueError, match="num_batches"):
        model.recalibrate(cfg, params, state, jnp.zeros((7, SIZES[0])))
    with pytest.raises(ValueError, match="num_batches"):
        model.recalibrate(cfg, params, state, jnp.zeros((2, 7, SIZES[0] + 1)))
    drop = cfg._replace(dropout_ratio=0.5)
    with pytest.raises(ValueError, match="key"):
        model.recalibrate(drop, params, state, jnp.ones((2, 7, SIZES[0])))
    out = model.recalibrate(drop, params, state, jnp.ones((2, 7, SIZES[0])), key=jax.random.key(1))
    assert all(np.all(np.isfinite(np.asarray(s.var))) for s in out.batch_norm)
    plain = net(*SIZES)
    p, s = model.init(plain, jax.random.key(0), weight_init=0.5)
    assert model.recalibrate(plain, p, s, jnp.ones((2, 7, SIZES[0]))) == s


@pytest.mark.slow
@pytest.mark.parametrize("norm", [True, layers.batch_renorm(), layers.ghost_batch_norm(4)])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_fold_gives_the_evaluation_outputs_of_the_unfolded_book_network(norm, dtype, tol):
    rng = np.random.default_rng(9)
    with x64():
        dt = jnp.dtype(dtype)
        cfg = net(784, (100,) * 5, 10, norm=norm)
        params, state = model.init(cfg, jax.random.key(4), weight_init="he", dtype=dt)
        params = _perturbed(params, rng)
        # trained running statistics: a few training-mode passes (momentum 0.9) on shifted, scaled data
        for i in range(5):
            xb = jnp.asarray(rng.normal(0.3, 1.5, size=(16, 784)), dt)
            state = model.apply(cfg, params, state, xb, train=True)[1]
        x = jnp.asarray(rng.normal(0.3, 1.5, size=(32, 784)), dt)
        folded_cfg, folded, folded_state = model.fold(cfg, params, state)
        assert folded_cfg.norm is None and folded.batch_norm == () and folded_state.batch_norm == ()
        want = np.asarray(model.apply(cfg, params, state, x, train=False)[0], np.float64)
        got = np.asarray(model.apply(folded_cfg, folded, folded_state, x, train=False)[0], np.float64)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())
        # an independent float64 NumPy evaluation of the unfolded network agrees too
        ref = _numpy_forward(params, x, [(np.asarray(s.mean, np.float64), np.asarray(s.var, np.float64))
                                         for s in state.batch_norm], eps=cfg.norm.eps)[0]
        np.testing.assert_allclose(got, ref, rtol=tol * 10, atol=tol * 10 * np.abs(ref).max())
        assert all(a.W.dtype == dt for a in folded.affine)


def test_fold_of_a_network_without_norm_is_the_network():
    cfg = net(*SIZES)
    params, state = model.init(cfg, jax.random.key(0), weight_init=0.5)
    folded_cfg, folded, folded_state = model.fold(cfg, params, state)
    assert folded_cfg == cfg and folded is params and folded_state == state


def test_recalibrate_takes_a_list_of_hidden_sizes_and_fold_checks_the_config_first():
    cfg = model.MLPConfig(input_size=5, hidden_sizes=[4, 4], output_size=3, norm=True)
    assert cfg.hidden_sizes == (4, 4) and hash(cfg) == hash(cfg._replace(hidden_sizes=[4, 4]))
    params, state = model.init(cfg, jax.random.key(0), weight_init=0.5)
    batches = jnp.asarray(np.random.default_rng(10).normal(size=(2, 6, 5)), jnp.float32)
    new = model.recalibrate(cfg, params, state, batches)
    np.testing.assert_allclose(new.batch_norm[0].mean, np.mean([_numpy_forward(params, b)[1][0][0] for b in
                                                                 np.asarray(batches)], 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        model.fold(model.MLPConfig(5, (4, 4), 3), params, state)  # a plain config with batch-norm parameters


# --- Issue 15: iterables of batches, stale statistics, folding with a non-default eps -------------------------


def test_recalibrate_takes_an_iterable_of_batches_of_any_sizes():
    rng = np.random.default_rng(11)
    cfg = net(*SIZES, norm=layers.batch_norm(0.9, 1e-5))
    params, state = model.init(cfg, jax.random.key(5), weight_init=0.5)
    params = _perturbed(params, rng)
    batches = [jnp.asarray(rng.normal(1.0, 2.0, (n, SIZES[0])), jnp.float32) for n in (6, 9, 6)]
    per_batch = [_numpy_forward(params, np.asarray(b))[1] for b in batches]
    # before: a generator gave JAX's "not a valid JAX array type"
    new = model.recalibrate(cfg, params, state, (b for b in batches))
    for i, s in enumerate(new.batch_norm):
        assert s.mean.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(s.mean), np.mean([b[i][0] for b in per_batch], 0), rtol=2e-5,
                                   atol=2e-5)
        np.testing.assert_allclose(np.asarray(s.var), np.mean([b[i][1] for b in per_batch], 0), rtol=2e-5, atol=2e-5)
    # equal batches: the same numbers as the stacked array
    stacked = model.recalibrate(cfg, params, state, jnp.stack([batches[0], batches[2]]))
    streamed = model.recalibrate(cfg, params, state, [batches[0], batches[2]])
    for a, b in zip(jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(streamed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="batches is empty"):
        model.recalibrate(cfg, params, state, iter([]))
    with pytest.raises(ValueError, match=rf"batch 1 must be \[N >= 1, {SIZES[0]}\], got shape \(4, 3\)"):
        model.recalibrate(cfg, params, state, [batches[0], jnp.ones((4, 3))])
    with pytest.raises(TypeError, match="batches must be an array"):
        model.recalibrate(cfg, params, state, 7)


@pytest.mark.parametrize("norm", [True, layers.batch_renorm(0.9, 1e-5, r_max=1.5, d_max=0.5)])
def test_recalibrate_replaces_stale_nan_and_inf_running_statistics(norm):
    # issue 15, item 6: PyTorch's update_bn resets the statistics first; stale NaN/inf must not survive or leak
    rng = np.random.default_rng(12)
    cfg = net(*SIZES, norm=norm)
    params, state = model.init(cfg, jax.random.key(6), weight_init=0.5)
    params = _perturbed(params, rng)
    batches = jnp.asarray(rng.normal(1.0, 2.0, (3, 7, SIZES[0])), jnp.float32)
    first = state.batch_norm[0]
    stale = state._replace(batch_norm=(first._replace(mean=first.mean.at[0].set(jnp.nan),
                                                      var=first.var.at[1].set(jnp.inf)),) + state.batch_norm[1:])
    # the state the stale one stands for: non-finite entries read as the start, mean 0 and variance 1
    clean = state._replace(batch_norm=(first._replace(mean=first.mean.at[0].set(0.0),
                                                      var=first.var.at[1].set(1.0)),) + state.batch_norm[1:])
    got = model.recalibrate(cfg, params, stale, batches)
    want = model.recalibrate(cfg, params, clean, batches)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(got))
    for a, b in zip(jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fold_through_the_model_uses_the_norms_own_eps():
    rng = np.random.default_rng(13)
    x = rng.normal(0.3, 1.5, size=(9, SIZES[0]))
    for norm in (layers.batch_norm(0.9, 0.3), layers.batch_renorm(0.9, 0.1), layers.ghost_batch_norm(4, 0.9, 0.2)):
        with x64():
            cfg = net(*SIZES, norm=norm)
            params, state = model.init(cfg, jax.random.key(7), weight_init=0.5, dtype=jnp.float64)
            params = _perturbed(params, rng)
            # small trained variances, so that eps matters
            state = state._replace(batch_norm=tuple(
                s._replace(mean=jnp.asarray(rng.normal(size=s.mean.shape)),
                           var=jnp.asarray(rng.uniform(0.01, 0.1, s.var.shape))) for s in state.batch_norm))
            folded_cfg, folded, folded_state = model.fold(cfg, params, state)
            evaluate = jax.jit(lambda c, p, s: model.apply(c, p, s, jnp.asarray(x), train=False)[0], static_argnums=0)
            got, want = np.asarray(evaluate(folded_cfg, folded, folded_state)), np.asarray(evaluate(cfg, params, state))
        stats = [(np.asarray(s.mean), np.asarray(s.var)) for s in state.batch_norm]
        ref = _numpy_forward(params, x, stats, eps=norm.eps)[0]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
        default_eps = _numpy_forward(params, x, stats, eps=1e-6)[0]  # folding with the default eps would be off
        assert np.abs(default_eps - ref).max() > 1e-2 * np.abs(ref).max()
