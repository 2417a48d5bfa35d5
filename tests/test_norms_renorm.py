"""Batch Renorm (bnjax.norms.renorm) against a float64 NumPy oracle of Ioffe (2017) Algorithm 1 and finite
differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import layers
from conftest import x64
from norms_oracle import _a, _bn_params, _np_bn_eval, _np_renorm


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
            y, state = norm.apply(params, state, jnp.asarray(x), train=True)
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
            y, _ = norm.apply(layers.BatchNormParams(gg, bb), state, xx, train=True)
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


# eager is the slower of the two (each op compiled on its own): quick tier keeps jit
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"])
def test_renorm_with_unit_limits_is_batch_norm_bit_for_bit(jit):
    rng = np.random.default_rng(102)
    bn = layers.batch_norm(0.8, 1e-5, init_var=1.0)
    rn = layers.batch_renorm(0.8, 1e-5, r_max=1.0, d_max=0.0, init_var=1.0)
    params = _bn_params(rng.uniform(0.5, 2.0, 4).astype(np.float32), rng.normal(size=4).astype(np.float32))

    def run(norm, params, state, x, w):
        def loss(p, xx):
            y, s = norm.apply(p, state, xx, train=True)
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
    y, _ = layers.batch_renorm(0.9, 1e-5, r_max=100.0, d_max=100.0).apply(params, state, x, train=True)
    y_bn, _ = layers.batch_norm_apply(params, layers.BatchNormState(mu, var), x, train=True, eps=1e-5)
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
            y_rn, s_rn = rn.apply(params, s_rn, jnp.asarray(x), train=True)
            y_bn, s_bn = bn.apply(params, s_bn, jnp.asarray(x), train=True)
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
            return norm.apply(p, s, xx, train=True, r_max=rm, d_max=dm)

        jf = jax.jit(f)
        for rm, dm in ((1.5, 0.5), (2.5, 3.0)):
            y, s = jf(params, state, jnp.asarray(x), jnp.asarray(rm), jnp.asarray(dm))
            y_ref, mu_ref, var_ref, _, _ = _np_renorm(x, gamma, beta, mean, var, r_max=rm, d_max=dm, momentum=m,
                                                      eps=eps)
            np.testing.assert_allclose(_a(y), y_ref, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(_a(s.var), var_ref, rtol=1e-10, atol=1e-10)
        assert len(traces) == 1
        rms = jnp.asarray([1.0, 1.3, 2.0, 10.0])
        ys, states = jax.vmap(lambda rm: norm.apply(params, state, jnp.asarray(x), train=True, r_max=rm,
                                                    d_max=0.5))(rms)
        outs = [_np_renorm(x, gamma, beta, mean, var, r_max=float(rm), d_max=0.5, momentum=m, eps=eps)[0]
                for rm in rms]
        for i, y_ref in enumerate(outs):
            np.testing.assert_allclose(_a(ys[i]), y_ref, rtol=1e-10, atol=1e-10)
        assert np.abs(outs[0] - outs[2]).max() > 1e-2  # the limits matter here
        np.testing.assert_array_equal(_a(states.step), 1)
