"""Huge inputs (issue 15, item 8): float32 statistics against a float64 NumPy oracle up to where their sums
overflow; past it an eager call is refused with a clear error and a traced one gives NaN, never a silent beta."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from norms_oracle import _a, _bn_params, _np_ghost, _np_renorm

_NORMS = {
    "batch_norm": lambda: layers.batch_norm(0.9, 1e-5),
    "batch_renorm": lambda: layers.batch_renorm(0.9, 1e-5, r_max=1.5, d_max=0.5),
    "ghost_batch_norm": lambda: layers.ghost_batch_norm(4, 0.9, 1e-5),
}


def _oracle(name, x, gamma, beta):
    """Float64: (y, new running mean, new running var) from the start (mean 0, var 1)."""
    c = x.shape[-1]
    mean, var = np.zeros(c), np.ones(c)
    if name == "batch_renorm":
        y, m, v, _, _ = _np_renorm(x, gamma, beta, mean, var, r_max=1.5, d_max=0.5, momentum=0.9, eps=1e-5)
        return y, m, v
    if name == "ghost_batch_norm":
        y, m, v, _ = _np_ghost(x, 4, gamma, beta, mean, var, momentum=0.9, eps=1e-5)
        return y, m, v
    mu, v = x.mean(0), x.var(0)
    return gamma * (x - mu) / np.sqrt(v + 1e-5) + beta, 0.9 * mean + 0.1 * mu, 0.9 * var + 0.1 * v


def _case(rng, scale, n=16, c=3, spread=(1.0, 0.3, 0.1)):
    x = (rng.normal(0.0, 1.0, (n, c)) * scale * np.array(spread) + 2.5 * scale).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    return x, gamma, beta


@pytest.mark.parametrize("name", list(_NORMS))
@pytest.mark.parametrize("scale", [1e6, 1e12, 1e18])
def test_huge_inputs_within_range_match_the_float64_oracle(name, scale):
    # 1e18 with a mean of 2.5e18: the squared deviations reach ~1e37, their sum over 16 rows stays below 3.4e38
    norm = _NORMS[name]()
    x, gamma, beta = _case(np.random.default_rng(int(np.log10(scale))), scale)
    params = _bn_params(gamma, beta)
    _, state = norm.init(3)
    y_ref, mean_ref, var_ref = _oracle(name, x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    for fn in (norm.apply, jax.jit(norm.apply, static_argnames="train")) if scale == 1e18 else (norm.apply,):
        y, new = fn(params, state, jnp.asarray(x), train=True)
        np.testing.assert_allclose(_a(y), y_ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(_a(new.mean), mean_ref, rtol=1e-5)
        np.testing.assert_allclose(_a(new.var), var_ref, rtol=1e-4)


@pytest.mark.parametrize("name", list(_NORMS))
def test_statistics_that_overflow_are_refused_eagerly_and_nan_when_traced(name):
    # |x - mean| ~ 1e20: the squares (1e40) overflow float32. Before: variance inf, every output exactly beta.
    norm = _NORMS[name]()
    x, gamma, beta = _case(np.random.default_rng(3), 1e20, spread=(1.0, 0.5, 2.0))
    params = _bn_params(gamma, beta)
    _, state = norm.init(3)
    with pytest.raises(ValueError, match=r"overflow float32 for 3 of 3 features \(first: feature 0, max \|x\| = "):
        norm.apply(params, state, jnp.asarray(x), train=True)
    y, new = jax.jit(norm.apply, static_argnames="train")(params, state, jnp.asarray(x), train=True)
    assert np.all(np.isnan(_a(y))) and np.all(np.isnan(_a(new.var)))
    # only the features whose sums overflow: a moderate feature next to a huge one keeps its numbers
    mixed = x.copy()
    mixed[:, 1:] = np.random.default_rng(4).normal(2.0, 3.0, (len(x), 2))
    y, new = jax.jit(norm.apply, static_argnames="train")(params, state, jnp.asarray(mixed), train=True)
    assert np.all(np.isnan(_a(new.var)[0])) and np.all(np.isfinite(_a(new.var)[1:]))
    y_ref = _oracle(name, mixed.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))[0]
    np.testing.assert_allclose(_a(y)[:, 1:], y_ref[:, 1:], rtol=1e-4, atol=1e-4)


def test_the_functional_core_refuses_too_and_a_nonfinite_input_is_not_called_an_overflow():
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 2)) * 1e20, jnp.float32)
    params, state = layers.batch_norm_init(2)
    with pytest.raises(ValueError, match="batch_norm_stats: the batch statistics overflow float32"):
        layers.batch_norm_stats(x)
    with pytest.raises(ValueError, match="batch_norm_apply: the batch statistics overflow float32"):
        layers.batch_norm_apply(params, state, x, train=False, use_batch_stats=True)
    # evaluation with running statistics computes no batch statistics: nothing to refuse
    y, _ = layers.batch_norm_apply(params, state, x, train=False)
    assert np.all(np.isfinite(_a(y)))
    # an inf in the input gives non-finite statistics of its own: no overflow error (garbage in, NaN out)
    bad = x.at[0, 0].set(jnp.inf) / 1e20
    mean, var, _ = layers.batch_norm_stats(bad)
    assert not np.isfinite(_a(mean)[0]) and np.isfinite(_a(var)[1])


def test_masked_padding_never_enters_the_statistics_even_when_huge_or_infinite():
    rng = np.random.default_rng(6)
    x = rng.normal(1.0, 2.0, (8, 3)).astype(np.float32)
    mask = np.arange(8) < 5
    x[~mask] = 1e30
    x[7, 0] = np.inf
    mean, var, count = layers.batch_norm_stats(jnp.asarray(x), mask=jnp.asarray(mask))
    assert float(count) == 5
    np.testing.assert_allclose(_a(mean), x[mask].astype(np.float64).mean(0), rtol=1e-5)
    np.testing.assert_allclose(_a(var), x[mask].astype(np.float64).var(0), rtol=1e-5)
