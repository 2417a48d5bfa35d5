"""Every combination of the norms' flags (``train``, ``update_stats``, and batch norm's ``use_batch_stats``) for
every norm value, in the book's and the default conventions, against the float64 NumPy oracle: the outputs and
the new state, and the state returned as it was whenever no update is made."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from norms_oracle import _a, _bn_params, _np_flags

_K = 4  # Ghost BN's virtual batch: 10 rows in groups of 4, 4, 2
_NORMS = {
    "book_batch_norm": lambda: layers.book_batch_norm(),  # running variance starts at 0
    "batch_norm": lambda: layers.batch_norm(),  # Flax / PyTorch start: mean 0, variance 1
    "batch_norm_unbiased": lambda: layers.batch_norm(0.7, 1e-3, init_mean=0.5, init_var=2.0,
                                                     unbiased_running_var=True),
    "batch_renorm": lambda: layers.batch_renorm(),
    "batch_renorm_book": lambda: layers.batch_renorm(0.9, 1e-6, r_max=1.5, d_max=0.5, init_var=0.0),
    "ghost_batch_norm": lambda: layers.ghost_batch_norm(_K),
    "ghost_batch_norm_book": lambda: layers.ghost_batch_norm(_K, 0.9, 1e-6, init_var=0.0),
}
_TRI = (None, True, False)


def _combinations(name):
    if _kind(name) == "batch_norm":
        return [dict(train=t, use_batch_stats=u, update_stats=s) for t, u, s in itertools.product((True, False),
                                                                                              _TRI, _TRI)]
    return [dict(train=t, update_stats=s) for t, s in itertools.product((True, False), _TRI)]


def _kind(name):
    return "batch_renorm" if name.startswith("batch_renorm") else "ghost" if name.startswith("ghost") else "batch_norm"


@pytest.mark.parametrize("start", ["init", "trained"])
@pytest.mark.parametrize("name", list(_NORMS))
def test_every_flag_combination_matches_the_oracle_outputs_and_new_state(name, start):
    norm = _NORMS[name]()
    rng = np.random.default_rng([list(_NORMS).index(name), start == "trained"])
    c = 3
    x = (rng.normal(0.0, 1.0, (10, c)) * rng.uniform(0.5, 3.0, c) + rng.normal(0, 2, c)).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2.0, c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    params, state = norm.init(c)
    params = _bn_params(gamma, beta)
    if start == "trained":  # running statistics far from the batch's and from the start
        state = state._replace(mean=jnp.asarray(rng.normal(1.0, 1.0, c), jnp.float32),
                               var=jnp.asarray(rng.uniform(0.3, 4.0, c), jnp.float32))
    if _kind(name) == "batch_renorm":
        state = state._replace(step=jnp.asarray(7, jnp.int32))
    mean, var = _a(state.mean).astype(np.float64), _a(state.var).astype(np.float64)
    step = int(state.step) if _kind(name) == "batch_renorm" else 0
    combos = _combinations(name)
    assert len(combos) == (18 if _kind(name) == "batch_norm" else 6)
    for flags in combos:
        y, new = norm.apply(params, state, jnp.asarray(x), **flags)
        want_y, want_mean, want_var, want_step = _np_flags(
            _kind(name), x, gamma.astype(np.float64), beta.astype(np.float64), mean, var, momentum=norm.momentum,
            eps=norm.eps, k=_K, unbiased=getattr(norm, "unbiased_running_var", False),
            r_max=getattr(norm, "r_max", None), d_max=getattr(norm, "d_max", None), step=step, **flags)
        label = f"{name} {flags}"
        assert y.shape == x.shape and y.dtype == jnp.float32, label
        scale = np.abs(want_y).max()  # eval with a running variance of 0 divides by sqrt(eps): ~1e3
        np.testing.assert_allclose(_a(y), want_y, rtol=2e-5, atol=2e-5 * scale, err_msg=label)
        np.testing.assert_allclose(_a(new.mean), want_mean, rtol=1e-5, atol=1e-6, err_msg=label)
        np.testing.assert_allclose(_a(new.var), want_var, rtol=1e-5, atol=1e-6, err_msg=label)
        assert type(new) is type(state), label
        if _kind(name) == "batch_renorm":
            assert int(new.step) == want_step, label
        updates = flags["train"] if flags.get("update_stats") is None else flags["update_stats"]
        if not updates:
            assert new is state, label  # documented: the state itself when no update is made
