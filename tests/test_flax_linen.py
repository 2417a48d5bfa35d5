"""bnjax.flax.linen against Flax's own linen norms (the oracle: flax.linen.BatchNorm with the two-pass variance,
GroupNorm, LayerNorm) and against bnjax's functional norm values; a Flax TrainState loop; hostile input."""

from typing import Any

import numpy as np
import pytest

flax = pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax.training import train_state  # noqa: E402

from bnjax import layers  # noqa: E402
from bnjax.flax import linen as bnn  # noqa: E402

M, EPS = 0.8, 1e-3  # not the defaults of either library, so both are really passed on


def _rng(seed=0):
    return np.random.default_rng(seed)


def _init(module, x, **kwargs):
    """``module.init`` under jit (eagerly, every operation would be compiled on its own)."""
    return jax.jit(lambda key, x: module.init(key, x, **kwargs))(jax.random.key(0), x)


def _shapes(module, x, **kwargs):
    return jax.tree_util.tree_map(jnp.shape, jax.eval_shape(lambda: module.init(jax.random.key(0), x, **kwargs)))


def _chain(module, variables, xs, ws, masks):
    """Three chained training steps (a scan) and an evaluation, all in one jit: per step the outputs, the new
    batch_stats and the gradients wrt params and x of sum(y * w)."""

    def step(stats, inputs):
        x, w, mask = inputs

        def loss(params, x):
            y, up = module.apply({"params": params, "batch_stats": stats}, x, use_running_average=False, mask=mask,
                                 mutable=["batch_stats"])
            return jnp.sum(y.astype(jnp.float32) * w), (y, up["batch_stats"])

        (_, (y, new)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return new, (y, new, gp, gx)

    @jax.jit
    def run(xs, ws, masks):
        stats, out = jax.lax.scan(step, variables["batch_stats"], (xs, ws, masks))
        y_eval = module.apply({"params": variables["params"], "batch_stats": stats}, xs[0], use_running_average=True)
        return out, y_eval

    return run(jnp.stack(xs), jnp.stack(ws), None if masks[0] is None else jnp.stack(masks))


def _close(a, b, rtol=2e-5, atol=2e-5):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


# layout, shape, axis, Flax mask shape (None: no mask)
LAYOUTS = [
    ("NC-mask", (8, 3), -1, (8, 1)),
    ("NHWC-mask", (3, 2, 2, 3), -1, (3, 2, 2, 1)),
    ("NCHW-axis1-mask", (3, 3, 2, 2), 1, (3, 1, 2, 2)),
]


@pytest.mark.parametrize("layout,shape,axis,mask_shape", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_batch_norm_equals_flax_over_chained_steps(layout, shape, axis, mask_shape):
    rng = _rng(1)
    xs = [jnp.asarray(rng.normal(size=shape) * 3 + 2, jnp.float32) for _ in range(3)]
    ws = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
    masks = [None if mask_shape is None else jnp.asarray(rng.random(mask_shape) < 0.7).at[(0,) * len(mask_shape)]
             .set(True) for _ in range(3)]
    ref = nn.BatchNorm(momentum=M, epsilon=EPS, axis=axis, use_fast_variance=False)
    ours = bnn.BatchNorm(momentum=M, epsilon=EPS, axis=axis)
    variables = _init(ref, xs[0], use_running_average=False)
    variables = {"params": jax.tree_util.tree_map(lambda p: p + jnp.asarray(rng.normal(size=p.shape) * 0.1,
                                                                             p.dtype), variables["params"]),
                 "batch_stats": variables["batch_stats"]}
    # The same variables load into ours as they are: the same names and shapes.
    assert _shapes(ours, xs[0], use_running_average=False) == \
        jax.tree_util.tree_map(jnp.shape, variables)
    got, got_eval = _chain(ours, variables, xs, ws, masks)
    want, want_eval = _chain(ref, variables, xs, ws, masks)
    _close(got, want)
    _close(got_eval, want_eval)
    # The running statistics moved (the test would not see a module that never updates).
    assert not np.allclose(np.asarray(got[1]["mean"][-1]), 0.0)


def test_bf16_input_promotes_as_flax():
    rng = _rng(2)
    x = jnp.asarray(rng.normal(size=(6, 2, 2, 4)) * 2 + 1, jnp.bfloat16)
    ref = nn.BatchNorm(momentum=M, epsilon=EPS, use_fast_variance=False)
    ours = bnn.BatchNorm(momentum=M, epsilon=EPS)
    v = _init(ref, x, use_running_average=False)
    (y_ref, s_ref), (y, s) = jax.jit(lambda v, x: [m.apply(v, x, use_running_average=False, mutable=["batch_stats"])
                                                   for m in (ref, ours)])(v, x)
    assert y.dtype == y_ref.dtype == jnp.float32  # bf16 input, float32 parameters: float32 out (Flax's rule)
    _close(y, y_ref, rtol=1e-5, atol=1e-5)
    _close(s, s_ref, rtol=1e-5, atol=1e-6)
    assert s["batch_stats"]["mean"].dtype == jnp.float32
    # bf16 parameters: bf16 out, statistics still float32.
    v16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), v["params"])
    y16 = jax.eval_shape(lambda: bnn.BatchNorm(param_dtype=jnp.bfloat16).apply(
        {"params": v16, "batch_stats": v["batch_stats"]}, x, use_running_average=True))
    assert y16.dtype == jnp.bfloat16


def _vmapped(cls, **kwargs):
    return nn.vmap(cls, variable_axes={"params": None, "batch_stats": None}, split_rngs={"params": False},
                   in_axes=0, out_axes=0, axis_name="batch")(**kwargs)


def test_inside_nn_vmap_and_jax_vmap_with_axis_name():
    rng = _rng(3)
    x = jnp.asarray(rng.normal(size=(4, 5, 3)) * 2 + 1, jnp.float32)  # 4 shards of 5 rows
    kwargs = dict(momentum=M, epsilon=EPS, axis_name="batch")
    ref = _vmapped(nn.BatchNorm, use_fast_variance=False, use_running_average=False, **kwargs)
    ours = _vmapped(bnn.BatchNorm, use_running_average=False, **kwargs)
    v = _init(ref, x)
    y_ref, s_ref = jax.jit(lambda v, x: ref.apply(v, x, mutable=["batch_stats"]))(v, x)
    y, s = jax.jit(lambda v, x: ours.apply(v, x, mutable=["batch_stats"]))(v, x)
    _close(y, y_ref)
    _close(s, s_ref)
    # Equal shards: the statistics of the whole batch (NumPy oracle).
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(s["batch_stats"]["mean"]), (1 - M) * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(s["batch_stats"]["var"]), M + (1 - M) * flat.var(0), rtol=1e-5)
    # jax.vmap over a plain apply: the same.
    plain = bnn.BatchNorm(**kwargs)
    y2, s2 = jax.jit(jax.vmap(lambda xs: plain.apply(v, xs, use_running_average=False, mutable=["batch_stats"]),
                              axis_name="batch"))(x)
    _close(y2, y)
    _close(jax.tree_util.tree_map(lambda a: a[0], s2), s)


def _shard_map(f, mesh, in_specs, out_specs):
    try:
        shard_map = jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map
    try:
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    except TypeError:
        return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def test_shard_map_with_unequal_shards_via_mask():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    from jax.sharding import Mesh, PartitionSpec as P

    rng = _rng(4)
    x = jnp.asarray(rng.normal(size=(16, 3)) * 2 + 1, jnp.float32)
    keep = np.zeros((16, 1), bool)
    keep[[0, 4, 5, 6, 8, 12, 13, 14, 15]] = True  # 1, 3, 1 and 4 valid rows per device
    ours = bnn.BatchNorm(momentum=M, epsilon=EPS, axis_name="d")
    ref = nn.BatchNorm(momentum=M, epsilon=EPS, axis_name="d", use_fast_variance=False)
    v = _init(ours, x, use_running_average=False)
    mesh = Mesh(np.array(devices[:4]), ("d",))

    def sharded(module):
        def f(xs, ms):
            y, up = module.apply(v, xs, use_running_average=False, mask=ms, mutable=["batch_stats"])
            return y, up["batch_stats"]
        return jax.jit(_shard_map(f, mesh, (P("d"), P("d")), (P("d"), P())))(x, jnp.asarray(keep))

    y, s = sharded(ours)
    # The oracle: Flax on one device, the whole batch with the same mask.
    y_one, s_one = ref.clone(axis_name=None).apply(v, x, use_running_average=False, mask=jnp.asarray(keep),
                                                   mutable=["batch_stats"])
    _close(s, s_one["batch_stats"])
    _close(np.asarray(y)[keep[:, 0]], np.asarray(y_one)[keep[:, 0]])
    # Flax itself averages the per-device means, which unequal shards make wrong: the test can tell.
    _, s_flax = sharded(ref)
    assert not np.allclose(np.asarray(s_flax["mean"]), np.asarray(s["mean"]), rtol=1e-3)


def test_renorm_and_ghost_equal_the_functional_norm_values_step_by_step():
    rng = _rng(5)
    xs = [jnp.asarray(rng.normal(size=(6, 3)) * 2 + 1, jnp.float32) for _ in range(3)]
    cases = [(bnn.BatchRenorm(momentum=M, epsilon=EPS, r_max=1.5, d_max=0.5, warmup=(0, 2, 2)),
              layers.batch_renorm(M, EPS, r_max=1.5, d_max=0.5, warmup=(0, 2, 2))),
             (bnn.GhostBatchNorm(momentum=M, epsilon=EPS, virtual_batch_size=2),
              layers.ghost_batch_norm(2, M, EPS))]
    for module, norm in cases:
        variables = _init(module, xs[0], use_running_average=False)
        params = layers.BatchNormParams(variables["params"]["scale"] * 1.5, variables["params"]["bias"] + 0.25)
        variables["params"] = {"scale": params.gamma, "bias": params.beta}
        _, state = norm.init(3)
        stats = variables["batch_stats"]

        @jax.jit
        def both(stats, state, x, module=module, norm=norm):
            v = {"params": variables["params"], "batch_stats": stats}
            y, up = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
            y_ref, new_state = norm.apply(params, state, x, train=True)
            v_new = {"params": variables["params"], "batch_stats": up["batch_stats"]}
            evals = (module.apply(v_new, x, use_running_average=True), norm.apply(params, new_state, x, train=False)[0])
            return y, y_ref, up["batch_stats"], new_state, evals

        for x in xs:
            y, y_ref, stats, state, (y_eval, y_eval_ref) = both(stats, state, x)
            _close(y, y_ref, rtol=1e-6, atol=1e-6)
            _close(stats, dict(state._asdict()), rtol=1e-6, atol=1e-6)
            _close(y_eval, y_eval_ref, rtol=1e-6, atol=1e-6)
        if isinstance(module, bnn.BatchRenorm):
            assert int(stats["step"]) == 3


def test_init_does_not_update_running_stats_and_accepts_one_example():
    x = jnp.full((1, 4), 7.0)
    for cls in (bnn.BatchNorm, bnn.BatchRenorm, bnn.GhostBatchNorm):
        v = _init(cls(), x, use_running_average=False)
        np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), 0.0)
        np.testing.assert_array_equal(np.asarray(v["batch_stats"]["var"]), 1.0)


def test_group_and_layer_norm_equal_flax():
    rng = _rng(6)
    x = jnp.asarray(rng.normal(size=(3, 2, 2, 4)) * 2 + 1, jnp.float32)
    cases = [(bnn.GroupNorm(num_groups=2, epsilon=EPS), nn.GroupNorm(num_groups=2, epsilon=EPS,
                                                                       use_fast_variance=False)),
             (bnn.LayerNorm(epsilon=EPS), nn.LayerNorm(epsilon=EPS, reduction_axes=(1, 2, 3),
                                                       use_fast_variance=False))]
    for ours, ref in cases:
        v = _init(ref, x)
        v = {"params": jax.tree_util.tree_map(lambda p: p + 0.3, v["params"])}
        assert _shapes(ours, x) == \
            jax.tree_util.tree_map(jnp.shape, v)
        y_ref = jax.jit(ref.apply)(v, x)
        # A mask of whole examples: valid examples unchanged, a masked one gives the bias.
        mask = jnp.asarray([True, False, True])[:, None, None, None]
        y_all, y = jax.jit(lambda v, x: (ours.apply(v, x), ours.apply(v, x, mask=mask)))(v, x)
        _close(y_all, y_ref)
        _close(y[::2], y_ref[::2])
        _close(y[1], jnp.broadcast_to(v["params"]["bias"], y[1].shape))


class _Net(nn.Module):
    """Every module of bnjax.flax.linen in one model, each after a Dense layer."""

    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        for norm in (bnn.BatchNorm(use_running_average=ura), bnn.BatchRenorm(use_running_average=ura),
                     bnn.GhostBatchNorm(use_running_average=ura, virtual_batch_size=4), bnn.GroupNorm(num_groups=2),
                     bnn.LayerNorm()):
            x = nn.relu(norm(nn.Dense(8)(x)))
        return nn.Dense(3)(x)


class _TrainState(train_state.TrainState):
    batch_stats: Any


@jax.jit
def _train_step(state, x, labels):
    """A Flax training step as Flax's docs write it (mutable=['batch_stats'])."""
    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                                         mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads).replace(batch_stats=updates["batch_stats"]), loss


def test_train_state_loop_trains_every_module_with_bf16_input():
    rng = _rng(7)
    x = jnp.asarray(rng.normal(size=(8, 5)) * 2 + 1, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 3, 8))
    model = _Net()
    v = _init(model, x, train=False)
    assert sorted(v["batch_stats"]) == ["BatchNorm_0", "BatchRenorm_0", "GhostBatchNorm_0"]
    state = jax.jit(lambda v: _TrainState.create(apply_fn=model.apply, params=v["params"], tx=optax.adam(0.03),
                                                 batch_stats=v["batch_stats"]))(v)
    losses = []
    for _ in range(15):
        state, loss = _train_step(state, x, labels)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]
    for name, before in v["batch_stats"].items():
        after = state.batch_stats[name]
        assert not np.allclose(np.asarray(before["mean"]), np.asarray(after["mean"])), name
    assert int(state.batch_stats["BatchRenorm_0"]["step"]) == 15
    logits = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x, train=False))(
        state.params, state.batch_stats, x)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


# --------------------------------------------------------------------------------------------------
# Hostile input: one clear error each
# --------------------------------------------------------------------------------------------------


def test_hostile_inputs_give_one_clear_error_each():
    x = jnp.ones((4, 3))
    module = bnn.BatchNorm()
    v = _init(module, x, use_running_average=False)
    with pytest.raises(ValueError, match="no running statistics.*'batch_stats' collection.*collections \\['params'"):
        module.apply({"params": v["params"]}, x, use_running_average=True)
    with pytest.raises(ValueError, match="collections \\['params', 'stats'\\]"):
        module.apply({"params": v["params"], "stats": v["batch_stats"]}, x, use_running_average=True)
    with pytest.raises(ValueError, match="'mean' has shape \\(3,\\), but x \\(4, 5\\) has \\(5,\\) features.*another"):
        module.apply(v, jnp.ones((4, 5)), use_running_average=True)
    small = _init(bnn.BatchNorm(), jnp.ones((4, 2)), use_running_average=False)
    with pytest.raises(ValueError, match="params 'scale' has shape \\(2,\\), but x \\(4, 3\\) has \\(3,\\)"):
        module.apply({"params": small["params"], "batch_stats": v["batch_stats"]}, x, use_running_average=True)
    with pytest.raises(TypeError, match="use_running_average must be a Python bool, got a traced value"):
        jax.jit(lambda v, x, ura: module.apply(v, x, use_running_average=ura))(v, x, True)
    per_feature = jnp.asarray([[True, False, True]] * 4)
    with pytest.raises(ValueError, match="selects different rows for different features"):
        module.apply(v, x, use_running_average=False, mask=per_feature, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="is traced.*size 1 on the feature axes"):
        jax.jit(lambda m: module.apply(v, x, use_running_average=False, mask=m, mutable=["batch_stats"]))(
            per_feature)
    with pytest.raises(ValueError, match="does not broadcast to x"):
        module.apply(v, x, use_running_average=False, mask=jnp.ones(4, bool), mutable=["batch_stats"])
    with pytest.raises(ValueError, match="'batch_stats' collection is immutable.*mutable=\\['batch_stats'\\]"):
        module.apply(v, x, use_running_average=False)
    with pytest.raises(ValueError, match="use_running_average.*must be passed to the constructor or at call time"):
        bnn.BatchRenorm().apply(_init(bnn.BatchRenorm(), x, use_running_average=True), x)
    with pytest.raises(ValueError, match="'step'"):  # a Flax BatchNorm checkpoint in a Batch Renorm lacks step
        bnn.BatchRenorm().apply(v, x, use_running_average=True)
