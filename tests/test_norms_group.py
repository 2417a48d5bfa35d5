"""Group Norm and Layer Norm (bnjax.norms.group) against a float64 NumPy oracle written from Wu & He (2018),
finite differences, and Flax linen's GroupNorm/LayerNorm; their refusals (fold, recalibrate), their use in the
MLP and the grid engine."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import data, grid, layers, model, norms, train
from conftest import x64
from norms_oracle import _a, _bn_params


def _np_group(x, num_groups, gamma=None, beta=None, eps=1e-6, mask=None):
    """Wu & He (2018) eq. 1-3 in float64 NumPy: per example, the mean and biased variance of each group of
    ``C / num_groups`` consecutive channels over every non-batch axis; a masked example is a row of zeros."""
    x = np.array(x, np.float64)
    if mask is not None:
        x[~np.asarray(mask, bool)] = 0.0
    n, c = x.shape[0], x.shape[-1]
    y = np.empty_like(x)
    size = c // num_groups
    for i in range(n):
        for g in range(num_groups):
            part = x[i, ..., g * size:(g + 1) * size]
            y[i, ..., g * size:(g + 1) * size] = (part - part.mean()) / np.sqrt(part.var() + eps)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


@functools.partial(jax.jit, static_argnames=("train",))
def _apply(norm, params, state, x, mask=None, *, train=True):
    """``norm.apply`` compiled once per norm and shape (op by op, each new shape compiles dozens of programs)."""
    return norm.apply(params, state, x, train=train, mask=mask)


def _affine(rng, c, dtype=np.float32):
    return rng.uniform(0.5, 2.0, c).astype(dtype), rng.normal(size=c).astype(dtype)


SHAPES = [(6, 12), (3, 4, 5, 12)]  # [N, C] and NHWC


@pytest.mark.parametrize("shape", SHAPES)
def test_group_and_layer_norm_equal_the_float64_oracle(shape):
    rng = np.random.default_rng(160)
    x = rng.normal(3.0, 2.0, shape) * rng.uniform(0.1, 10.0, shape[-1])  # channels of very different scales
    gamma, beta = _affine(rng, shape[-1], np.float64)
    with x64():
        for norm, groups in [(layers.group_norm(g, eps=1e-5), g) for g in (1, 3, 12)] + [(layers.layer_norm(), 1)]:
            params = _bn_params(gamma, beta, jnp.float64)
            _, state = norm.init(shape[-1], jnp.float64)
            y, _ = _apply(norm, params, state, jnp.asarray(x))
            assert y.dtype == jnp.float64
            np.testing.assert_allclose(_a(y), _np_group(x, groups, gamma, beta, norm.eps), rtol=1e-10, atol=1e-10)
        # without scale / offset: the plain standardised groups
        bare = layers.group_norm(4, use_scale=False, use_offset=False)
        p, s = bare.init(shape[-1], jnp.float64)
        assert p == layers.BatchNormParams(None, None)
        np.testing.assert_allclose(_a(_apply(bare, p, s, jnp.asarray(x), train=False)[0]), _np_group(x, 4),
                                   rtol=1e-10, atol=1e-10)
    # float32: statistics of a large offset stay accurate (two-pass variance: float32's spacing at 1e3 gives ~4e-4;
    # a one-pass E[x^2] - E[x]^2 would be off by ~6e-2 in the variance, percents in y)
    x32 = (rng.normal(size=shape) + 1e3).astype(np.float32)
    norm = layers.group_norm(3)
    params = _bn_params(*_affine(rng, shape[-1]))
    y, _ = _apply(norm, params, norm.init(shape[-1])[1], jnp.asarray(x32))
    np.testing.assert_allclose(_a(y), _np_group(x32, 3, params.gamma, params.beta), atol=2e-3)


def test_gradients_equal_finite_differences_of_the_oracle():
    rng = np.random.default_rng(161)
    x = rng.normal(1.0, 2.0, (2, 3, 2, 6))
    gamma, beta = _affine(rng, 6, np.float64)
    w = rng.normal(size=x.shape)
    norm = layers.group_norm(2)
    with x64():
        def f(x_, g_, b_):
            return jnp.sum(jnp.asarray(w) * norm.apply(layers.BatchNormParams(g_, b_), layers.GroupNormState(),
                                                       x_, train=True)[0])

        grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))

    def oracle(x_, g_, b_):
        return np.sum(w * _np_group(x_, 2, g_, b_))

    h = 1e-6
    for arg, grad in zip(range(3), grads):
        args = [x, gamma, beta]
        flat = args[arg].ravel()
        numeric = np.empty_like(flat)
        for i in range(flat.size):
            up, down = flat.copy(), flat.copy()
            up[i] += h
            down[i] -= h
            a_up, a_down = list(args), list(args)
            a_up[arg], a_down[arg] = up.reshape(args[arg].shape), down.reshape(args[arg].shape)
            numeric[i] = (oracle(*a_up) - oracle(*a_down)) / (2 * h)
        np.testing.assert_allclose(_a(grad).ravel(), numeric, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
def test_outputs_and_gradients_equal_flax_linen(shape):
    nn = pytest.importorskip("flax.linen")
    rng = np.random.default_rng(162)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), jnp.float32)
    c = shape[-1]
    gamma, beta = (jnp.asarray(v) for v in _affine(rng, c))
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    cases = [(nn.GroupNorm(num_groups=g, epsilon=1e-5, use_fast_variance=False), layers.group_norm(g, eps=1e-5))
             for g in ((4, c) if len(shape) == 4 else (4,))]
    # Layer Norm as Wu & He define it: every non-batch axis; Flax's default (the last axis only) for [N, C]
    axes = tuple(range(1, len(shape))) if len(shape) == 4 else -1
    cases.append((nn.LayerNorm(use_fast_variance=False, reduction_axes=axes, feature_axes=-1), layers.layer_norm()))

    @jax.jit
    def both(x_, g_, b_):
        """Per case: outputs and gradients of sum(w * y) for (x, scale, offset), bnjax's then Flax's."""
        out = []
        for flax_module, norm in cases:
            def ours(*a, norm=norm):
                y = norm.apply(layers.BatchNormParams(a[1], a[2]), layers.GroupNormState(), a[0], train=True)[0]
                return jnp.sum(w * y), y

            def theirs(*a, flax_module=flax_module):
                y = flax_module.apply({"params": {"scale": a[1], "bias": a[2]}}, a[0])
                return jnp.sum(w * y), y

            out.append([jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x_, g_, b_) for f in (ours, theirs)])
        return out

    for ((_, y_ours), g_ours), ((_, y_flax), g_flax) in both(x, gamma, beta):
        np.testing.assert_allclose(_a(y_ours), _a(y_flax), rtol=1e-5, atol=1e-5)
        for a, b in zip(g_ours, g_flax):  # x, scale, offset
            np.testing.assert_allclose(_a(a), _a(b), rtol=1e-4, atol=1e-4)
    # the convention that differs: Flax's default LayerNorm on NHWC normalises each pixel on its own
    if len(shape) == 4:
        per_pixel = nn.LayerNorm().apply({"params": {"scale": gamma, "bias": beta}}, x)
        ours = _apply(layers.layer_norm(), layers.BatchNormParams(gamma, beta), layers.GroupNormState(), x)[0]
        assert float(jnp.max(jnp.abs(per_pixel - ours))) > 0.1


def test_bf16_input_float32_statistics_output_in_bf16():
    rng = np.random.default_rng(163)
    # a large offset: a bf16 sum of 1,000 values near 100 would be off by whole units (spacing 0.5 at 100)
    x = jnp.asarray(rng.normal(100.0, 1.0, (2, 10, 10, 10)), jnp.bfloat16)
    for norm, groups in ((layers.group_norm(5), 5), (layers.layer_norm(), 1)):
        params, state = norm.init(10, jnp.bfloat16)
        y, _ = _apply(norm, params, state, x)
        assert y.dtype == jnp.bfloat16
        exact = _np_group(np.asarray(x.astype(jnp.float32)), groups)
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), exact, atol=0.02)  # bf16 rounding of y only


def test_jit_vmap_over_stacked_params_train_equals_eval_and_ignored_keywords():
    rng = np.random.default_rng(164)
    x = jnp.asarray(rng.normal(1.0, 2.0, (5, 2, 2, 6)), jnp.float32)
    norm = layers.group_norm(3)
    _, state = norm.init(6)
    assert jax.tree_util.tree_leaves(state) == [] and jax.tree_util.tree_leaves(norm) == []
    gammas, betas = rng.uniform(0.5, 2.0, (4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    stacked = layers.BatchNormParams(jnp.asarray(gammas), jnp.asarray(betas))
    states = jax.vmap(lambda _: norm.init(6)[1])(jnp.arange(4))
    run = jax.jit(jax.vmap(lambda n, p, s, xx: n.apply(p, s, xx, train=True), in_axes=(None, 0, 0, None)))
    ys, new_states = run(norm, stacked, states, x)
    assert ys.shape == (4, 5, 2, 2, 6) and new_states == layers.GroupNormState()
    for i in range(4):
        expected = _np_group(_a(x), 3, gammas[i], betas[i])
        np.testing.assert_allclose(_a(ys[i]), expected, rtol=1e-5, atol=1e-5)
    # training and evaluation are the same function; momentum and axis_name change nothing (statistics never
    # cross examples, also when a vmapped axis is bound), and the state comes back as it is
    params = layers.BatchNormParams(jnp.asarray(gammas[0]), jnp.asarray(betas[0]))
    y_train, s_train = norm.apply(params, state, x, train=True)
    y_eval, s_eval = norm.apply(params, state, x, train=False, momentum=0.3)
    np.testing.assert_array_equal(_a(y_train), _a(y_eval))
    assert s_train is state and s_eval is state
    y_jit = _apply(norm, params, state, x, train=False)[0]
    per_example = jax.jit(jax.vmap(lambda xi: norm.apply(params, state, xi[None], train=True, axis_name="b")[0][0],
                                   axis_name="b"))(x)
    traced = jax.jit(lambda m: norm.apply(params, state, x, train=True, momentum=m)[0])(jnp.full(6, 0.5))
    for y in (y_jit, per_example, traced):  # compiled: equal up to XLA's fusion of the same operations
        np.testing.assert_allclose(_a(y), _a(y_train), rtol=1e-6, atol=1e-6)


def test_mask_leaves_valid_rows_and_gives_masked_rows_beta_and_no_gradient():
    rng = np.random.default_rng(165)
    x = rng.normal(1.0, 2.0, (6, 3, 8)).astype(np.float32)
    mask = np.array([True, False, True, True, False, True])
    x[1] = np.nan
    x[4] = np.inf  # padding may hold anything
    gamma, beta = _affine(rng, 8)
    params = _bn_params(gamma, beta)
    for norm, groups in ((layers.group_norm(4), 4), (layers.layer_norm(), 1)):
        state = norm.init(8)[1]
        for m in (mask, mask.astype(np.int32), mask.astype(np.float32))[:3 if groups > 1 else 1]:
            y, _ = _apply(norm, params, state, jnp.asarray(x), jnp.asarray(m))
            np.testing.assert_allclose(_a(y)[mask], _np_group(x[mask], groups, gamma, beta), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(_a(y)[~mask], np.broadcast_to(beta, (2, 3, 8)))
        w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

        def loss(p, xx, norm=norm, state=state):
            y, _ = norm.apply(p, state, xx, train=True, mask=jnp.asarray(mask))
            return jnp.sum(jnp.where(jnp.asarray(mask)[:, None, None], w * y, 0.0))

        gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
        assert np.all(_a(gx)[~mask] == 0) and np.all(np.isfinite(_a(gx)))
        # the valid rows alone, without a mask: the same gradients
        gp_valid, gx_valid = jax.jit(jax.grad(
            lambda p, xx, norm=norm, state=state: jnp.sum(w[mask] * norm.apply(p, state, xx, train=True)[0]),
            argnums=(0, 1)))(params, jnp.asarray(x[mask]))
        np.testing.assert_allclose(_a(gx)[mask], _a(gx_valid), rtol=1e-5, atol=1e-5)
        for a, b in zip(gp, gp_valid):
            np.testing.assert_allclose(_a(a), _a(b), rtol=1e-5, atol=1e-5)
    # no offset: a masked row is 0
    bare = layers.group_norm(2, use_offset=False)
    y, _ = _apply(bare, _bn_params(gamma, None), bare.init(8)[1], jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_array_equal(_a(y)[~mask], 0.0)


def test_every_error_is_one_clear_message():
    x = jnp.ones((4, 6))
    norm = layers.group_norm(3)
    params, state = norm.init(6)
    with pytest.raises(ValueError, match=r"num_groups=4 must divide the number of channels 6"):
        layers.group_norm(4).init(6)
    with pytest.raises(ValueError, match=r"num_groups=4 must divide the number of channels 6"):
        layers.group_norm(4).apply(params, state, x, train=True)
    for bad in (0, -2, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="num_groups must be an integer >= 1"):
            layers.group_norm(bad)
    for make in (lambda e: layers.group_norm(2, eps=e), lambda e: layers.layer_norm(eps=e)):
        for bad in (0.0, -1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="eps must be > 0"):
                make(bad)
        with pytest.raises(TypeError, match="eps must be a real"):
            make("1e-5")
    with pytest.raises(TypeError, match="use_scale must be a Python bool"):
        layers.layer_norm(use_scale=1)
    for n in (layers.group_norm(1), layers.layer_norm()):
        with pytest.raises(ValueError, match=r"rank >= 2.*got shape \(6,\)"):
            n.apply(params, state, jnp.ones(6), train=True)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        norm.apply(params, state, jnp.ones((4, 6), jnp.int32), train=True)
    with pytest.raises(TypeError, match="train"):
        norm.apply(params, state, x)
    with pytest.raises(TypeError, match="train must be a Python bool"):
        norm.apply(params, state, x, train=1)
    with pytest.raises(ValueError, match=r"gamma has shape \(5,\) but x \(4, 6\) has 6 channels"):
        norm.apply(_bn_params(np.ones(5), np.zeros(6)), state, x, train=True)
    with pytest.raises(TypeError, match="state must be the GroupNormState"):
        norm.apply(params, layers.batch_norm().init(6)[1], x, train=True)
    with pytest.raises(TypeError, match="params must be a BatchNormParams"):
        norm.apply({"gamma": 1}, state, x, train=True)
    with pytest.raises(ValueError, match=r"mask must be \[N\]"):
        norm.apply(params, state, jnp.ones((4, 2, 6)), train=True, mask=jnp.ones((4, 2), bool))
    with pytest.raises(ValueError, match="does not match"):
        norm.apply(params, state, x, train=True, mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="only 0 and 1"):
        norm.apply(params, state, x, train=True, mask=np.array([0, 1, 2, 1]))
    for bad, error in ((6.0, TypeError), ((6,), TypeError), (0, ValueError)):
        with pytest.raises(error, match="num_features must be"):
            layers.layer_norm().init(bad)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        layers.layer_norm().init(6, jnp.int32)


def test_fold_and_recalibrate_refuse_norms_without_running_statistics():
    rng = np.random.default_rng(166)
    for norm in (layers.group_norm(2), layers.layer_norm()):
        params, state = norm.init(4)
        aff = layers.AffineParams(jnp.ones((3, 4)), jnp.zeros(4))
        with pytest.raises(ValueError, match="has no running statistics to fold.*its own statistics at evaluation"):
            layers.fold_batch_norm(aff, norm, params, state)
        with pytest.raises(ValueError, match="has no running statistics to fold"):
            layers.fold_conv_batch_norm(jnp.ones((1, 1, 3, 4)), None, norm, params, state)
        with pytest.raises(ValueError, match="has no running statistics to recalibrate"):
            layers.recalibrate(norm, params, state, jnp.ones((2, 5, 4)))
        net = model.MLPConfig(hidden_sizes=(4, 4), norm=norm)
        mp, ms = model.init(net, jax.random.key(0))
        with pytest.raises(ValueError, match=r"^fold: the network's norm \w+ has no running statistics to fold"):
            model.fold(net, mp, ms)
        with pytest.raises(ValueError, match=r"^recalibrate: the network's norm \w+ has no running statistics"):
            model.recalibrate(net, mp, ms, jnp.ones((2, 5, 784)))
        # the generic one: a network whose every norm is of this kind
        with pytest.raises(ValueError, match="keep no running statistics.*2 GroupNormState"):
            norms.recalibrate(functools.partial(model.apply, net), mp, ms, jnp.ones((2, 5, 784)))
    # a network mixing them: the batch norm is recalibrated, the group norm's state kept
    gn, bn = layers.group_norm(2), layers.batch_norm()
    (gp, gs), (bp, bs) = gn.init(4), bn.init(4)

    def forward(p, s, xx, *, train, key=None):
        h, s0 = gn.apply(p[0], s[0], xx, train=train)
        h, s1 = bn.apply(p[1], s[1], h, train=train)
        return h, (s0, s1)

    batches = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
    new = norms.recalibrate(forward, (gp, bp), (gs, bs), batches)
    assert new[0] == layers.GroupNormState()
    stats = [np.asarray(gn.apply(gp, gs, b, train=True)[0]) for b in batches]
    np.testing.assert_allclose(_a(new[1].mean), np.mean([s.mean(0) for s in stats], 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_a(new[1].var), np.mean([s.var(0) for s in stats], 0), rtol=1e-5, atol=1e-6)


def test_values_describe_compare_and_hash():
    gn, ln = layers.group_norm(np.int64(10), eps=1e-5), layers.layer_norm(use_offset=False)
    assert json.loads(json.dumps(gn.describe())) == {"norm": "GroupNorm", "num_groups": 10, "eps": 1e-5,
                                                     "use_scale": True, "use_offset": True}
    assert ln.describe() == {"norm": "LayerNorm", "eps": 1e-6, "use_scale": True, "use_offset": False}
    assert gn == layers.group_norm(10, eps=1e-5) and hash(gn) == hash(layers.group_norm(10, eps=1e-5))
    assert gn != layers.group_norm(5, eps=1e-5) and ln != layers.layer_norm()
    assert not layers.GroupNorm.has_running_stats and not layers.LayerNorm.has_running_stats
    assert isinstance(gn, layers.Norm) and isinstance(ln, norms.Norm)


def test_mlp_with_group_norm_trains_with_grad():
    net = model.MLPConfig(hidden_sizes=(20, 20), norm=layers.group_norm(10))
    params, state = model.init(net, jax.random.key(1))
    assert params.batch_norm[0].gamma.shape == (20,) and state.batch_norm == (layers.GroupNormState(),) * 2
    bundled = data.load_bundled(64, 0)
    x, t = jnp.asarray(bundled.x_train), jnp.asarray(bundled.t_train)
    loss = jax.jit(jax.value_and_grad(functools.partial(model.loss, net, train=True), has_aux=True))
    (value, new_state), grads = loss(params, state, x, t)
    assert new_state == state and np.isfinite(float(value))
    assert all(np.all(np.isfinite(_a(g))) for g in jax.tree_util.tree_leaves(grads))
    assert float(jnp.max(jnp.abs(grads.batch_norm[0].gamma))) > 0
    # training and evaluation give the same scores (no dropout, no running statistics)
    scores = jax.jit(model.apply, static_argnames=("config", "train"))
    np.testing.assert_array_equal(_a(scores(net, params, state, x, train=True)[0]),
                                  _a(scores(net, params, state, x, train=False)[0]))


@pytest.mark.slow
def test_the_grid_engine_trains_group_and_layer_norm_arms():
    bundled = data.load_bundled(120, 0)
    x, t = bundled.x_train, bundled.t_train
    arms = {"gn": grid.Arm(layers.group_norm(10)), "ln": grid.Arm(layers.layer_norm())}
    cfg = grid.GridConfig(arms=arms, axes={"weight_scale": (0.1,)}, num_records=2, batch_size=40,
                          hidden_sizes=(20,), seed=5, keep_final=True)
    result = grid.run_grid(cfg, x, t, devices=jax.devices()[:1])
    assert result.final["gn"].state.batch_norm == (layers.GroupNormState(),)
    # the group-norm arm against the same model trained by hand with the engine's keys and batches
    data_key, init_key = jax.random.split(jax.random.key(5))
    init_keys = jax.random.split(init_key, (2, 1))
    steps = grid.record_steps(cfg, 120)[-1]
    batch_idx = np.asarray(jax.random.randint(data_key, (steps, 40), 0, 120))
    net = cfg.network(arms["gn"], 784)
    params, state = model.init(net, init_keys[0, 0], weight_init=None, weight_scale=jnp.float32(0.1))
    opt = train.make_optimizer(cfg.optimizer, cfg.learning_rate)
    ts = train.train_state_init(params, state, opt)
    step = jax.jit(lambda ts_, xb, tb: train.train_step(net, ts_, xb, tb, opt))
    for u in range(steps):
        _, ts = step(ts, x[batch_idx[u]], t[batch_idx[u]])
    np.testing.assert_allclose(_a(result.final["gn"].params.affine[0].W[0, 0]), _a(ts.params.affine[0].W),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(result.metrics["train_accuracy"]["gn"][0, 0, -1],
                               float(model.accuracy(net, ts.params, ts.state, x, t)), atol=1e-6)
    assert np.all(np.isfinite(result.metrics["train_accuracy"]["ln"]))
