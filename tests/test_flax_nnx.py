"""bnjax.flax.nnx against Flax's own NNX norms (the oracle: nnx.BatchNorm with the two-pass variance, GroupNorm,
LayerNorm) and against bnjax's functional norm values; train()/eval(); an NNX training loop; hostile input."""

import numpy as np
import pytest

flax = pytest.importorskip("flax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from bnjax import layers  # noqa: E402
from bnjax.flax import nnx as bnnx  # noqa: E402

M, EPS = 0.8, 1e-3  # not the defaults of either library, so both are really passed on


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(a, b, rtol=2e-5, atol=2e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


def _fresh(tree):
    """New Variables (at the current trace level) holding the same values: NNX refuses to update a Variable
    made at another trace level."""
    return jax.tree_util.tree_map(lambda v: v, tree)


def _values(state):
    """An nnx.State's arrays as a plain dict (one structure for both versions of Flax)."""
    return {k: v for k, v in zip([str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)],
                                 jax.tree_util.tree_leaves(state))}


def _chain(module, xs, ws, masks):
    """Three chained training steps and an evaluation in one jit: per step the outputs, the new BatchStats and
    the gradients wrt the Params and x of sum(y * w)."""
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    @jax.jit
    def run(params, stats, xs, ws, masks):
        out = []
        for i in range(len(xs)):
            def loss(params, x):
                m = nnx.merge(graphdef, _fresh(params), _fresh(stats))
                y = m(x, mask=None if masks is None else masks[i])
                return jnp.sum(y.astype(jnp.float32) * ws[i]), (y, nnx.state(m, nnx.BatchStat))

            (_, (y, stats)), (gp, gx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, xs[i])
            out.append((y, _values(stats), _values(gp), gx))
        m = nnx.merge(graphdef, _fresh(params), _fresh(stats))
        m.eval()
        return out, m(xs[0])

    return run(params, stats, xs, ws, masks)


# layout, shape, axis, Flax mask shape (None: no mask)
LAYOUTS = [
    ("NC", (8, 3), -1, None),
    ("NHWC-mask", (3, 2, 2, 3), -1, (3, 2, 2, 1)),
    ("NCHW-axis1-mask", (3, 3, 2, 2), 1, (3, 1, 2, 2)),
]


@pytest.mark.parametrize("layout,shape,axis,mask_shape", LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_batch_norm_equals_nnx_batch_norm_over_chained_steps(layout, shape, axis, mask_shape):
    rng = _rng(1)
    xs = [jnp.asarray(rng.normal(size=shape) * 3 + 2, jnp.float32) for _ in range(3)]
    ws = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
    masks = None if mask_shape is None else [jnp.asarray(rng.random(mask_shape) < 0.7).at[(0,) * len(mask_shape)]
                                             .set(True) for _ in range(3)]
    c = shape[axis]
    scale = jnp.asarray(rng.normal(size=c) * 0.1 + 1, jnp.float32)
    bias = jnp.asarray(rng.normal(size=c) * 0.1, jnp.float32)
    ref = nnx.BatchNorm(c, momentum=M, epsilon=EPS, axis=axis, use_fast_variance=False, rngs=nnx.Rngs(0))
    ours = bnnx.BatchNorm(c, momentum=M, epsilon=EPS, axis=axis, rngs=nnx.Rngs(0))
    for m in (ref, ours):
        m.scale[...], m.bias[...] = scale, bias
    assert jax.tree_util.tree_map(jnp.shape, _values(nnx.state(ours))) == \
        jax.tree_util.tree_map(jnp.shape, _values(nnx.state(ref)))
    got, got_eval = _chain(ours, xs, ws, masks)
    want, want_eval = _chain(ref, xs, ws, masks)
    _close(got, want)
    _close(got_eval, want_eval)
    assert not np.allclose(np.asarray(list(got[-1][1].values())[0]), 0.0)


def test_train_eval_switch_view_and_bf16():
    rng = _rng(2)
    x = jnp.asarray(rng.normal(size=(6, 4)) * 2 + 1, jnp.bfloat16)
    ours = bnnx.BatchNorm(4, momentum=M, epsilon=EPS, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(4, momentum=M, epsilon=EPS, use_fast_variance=False, rngs=nnx.Rngs(0))
    y, y_ref = nnx.jit(lambda a, b, x: (a(x), b(x)))(ours, ref, x)
    assert y.dtype == y_ref.dtype == jnp.float32  # bf16 input, float32 parameters: float32 out (Flax's rule)
    _close(y, y_ref, rtol=1e-5, atol=1e-5)
    _close(ours.var[...], ref.var[...], rtol=1e-5, atol=1e-6)
    assert ours.mean[...].dtype == jnp.float32
    before = np.asarray(ours.mean[...])
    ours.eval()
    assert ours.use_running_average is True
    y_eval = ours(x)
    np.testing.assert_array_equal(np.asarray(ours.mean[...]), before)  # evaluation leaves the statistics alone
    _close(y_eval, (np.asarray(x, np.float64) - before) / np.sqrt(np.asarray(ours.var[...]) + EPS), rtol=1e-5,
           atol=1e-5)
    ours.train()
    assert ours.use_running_average is False
    if hasattr(nnx, "view"):  # newer Flax: a view in evaluation mode, the module itself unchanged
        assert nnx.view(ours, use_running_average=True).use_running_average is True
        assert ours.use_running_average is False
    # The call argument overrides the attribute for one call.
    ours(x, use_running_average=True)
    np.testing.assert_array_equal(np.asarray(ours.mean[...]), before)


def test_jax_vmap_with_axis_name_and_shard_map_with_unequal_shards():
    rng = _rng(3)
    x = jnp.asarray(rng.normal(size=(4, 5, 3)) * 2 + 1, jnp.float32)  # 4 shards of 5 rows
    results = []
    for module in (bnnx.BatchNorm(3, momentum=M, epsilon=EPS, axis_name="b", rngs=nnx.Rngs(0)),
                   nnx.BatchNorm(3, momentum=M, epsilon=EPS, axis_name="b", use_fast_variance=False,
                                 rngs=nnx.Rngs(0))):
        graphdef, state = nnx.split(module)

        def f(xs, graphdef=graphdef, state=state):
            m = nnx.merge(graphdef, _fresh(state))
            return m(xs), _values(nnx.state(m, nnx.BatchStat))

        results.append(jax.jit(jax.vmap(f, axis_name="b"))(x))
    (y, s), (y_ref, s_ref) = results
    _close(y, y_ref)
    _close(s, s_ref)
    flat = np.asarray(x).reshape(-1, 3)
    np.testing.assert_allclose(np.asarray(sorted(s.items())[0][1][0]), (1 - M) * flat.mean(0), rtol=1e-5)

    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    from jax.sharding import Mesh, PartitionSpec as P

    try:
        shard_map = jax.shard_map
    except AttributeError:
        from jax.experimental.shard_map import shard_map
    xf = x.reshape(16 + 4, 3)[:16]
    keep = np.zeros((16, 1), bool)
    keep[[0, 4, 5, 6, 8, 12, 13, 14, 15]] = True  # 1, 3, 1 and 4 valid rows per device
    graphdef, state = nnx.split(bnnx.BatchNorm(3, momentum=M, epsilon=EPS, axis_name="d", rngs=nnx.Rngs(0)))

    def g(xs, ms):
        m = nnx.merge(graphdef, _fresh(state))
        return m(xs, mask=ms), _values(nnx.state(m, nnx.BatchStat))

    kwargs = dict(mesh=Mesh(np.array(devices[:4]), ("d",)), in_specs=(P("d"), P("d")), out_specs=(P("d"), P()))
    try:
        sm = shard_map(g, check_vma=False, **kwargs)
    except TypeError:
        sm = shard_map(g, check_rep=False, **kwargs)
    y, s = jax.jit(sm)(xf, jnp.asarray(keep))
    # The oracle: Flax on one device, the whole batch with the same mask.
    one = nnx.BatchNorm(3, momentum=M, epsilon=EPS, use_fast_variance=False, rngs=nnx.Rngs(0))
    y_one = one(xf, mask=jnp.asarray(keep))
    _close(s, _values(nnx.state(one, nnx.BatchStat)))
    _close(np.asarray(y)[keep[:, 0]], np.asarray(y_one)[keep[:, 0]])


def test_renorm_and_ghost_equal_the_functional_norm_values_step_by_step():
    rng = _rng(5)
    xs = [jnp.asarray(rng.normal(size=(6, 3)) * 2 + 1, jnp.float32) for _ in range(3)]
    cases = [(bnnx.BatchRenorm(3, momentum=M, epsilon=EPS, r_max=1.5, d_max=0.5, warmup=(0, 2, 2), rngs=nnx.Rngs(0)),
              layers.batch_renorm(M, EPS, r_max=1.5, d_max=0.5, warmup=(0, 2, 2))),
             (bnnx.GhostBatchNorm(3, momentum=M, epsilon=EPS, virtual_batch_size=2, rngs=nnx.Rngs(0)),
              layers.ghost_batch_norm(2, M, EPS))]
    for module, norm in cases:
        params = layers.BatchNormParams(jnp.asarray([1.5, 0.5, 2.0]), jnp.asarray([0.25, -1.0, 0.0]))
        module.scale[...], module.bias[...] = params.gamma, params.beta
        _, state = norm.init(3)

        @nnx.jit
        def both(module, state, x, norm=norm):
            module.train()
            y = module(x)
            y_ref, new_state = norm.apply(params, state, x, train=True)
            module.eval()
            return y, y_ref, new_state, (module(x), norm.apply(params, new_state, x, train=False)[0])

        for x in xs:
            y, y_ref, state, (y_eval, y_eval_ref) = both(module, state, x)
            _close(y, y_ref, rtol=1e-6, atol=1e-6)
            _close([module.mean[...], module.var[...]], [state.mean, state.var], rtol=1e-6, atol=1e-6)
            _close(y_eval, y_eval_ref, rtol=1e-6, atol=1e-6)
        if isinstance(module, bnnx.BatchRenorm):
            assert int(module.step[...]) == 3 == int(state.step)


def test_group_and_layer_norm_equal_nnx():
    rng = _rng(6)
    x = jnp.asarray(rng.normal(size=(3, 2, 2, 4)) * 2 + 1, jnp.float32)
    cases = [(bnnx.GroupNorm(4, num_groups=2, epsilon=EPS, rngs=nnx.Rngs(0)),
              nnx.GroupNorm(4, num_groups=2, epsilon=EPS, use_fast_variance=False, rngs=nnx.Rngs(0))),
             (bnnx.LayerNorm(4, epsilon=EPS, rngs=nnx.Rngs(0)),
              nnx.LayerNorm(4, epsilon=EPS, reduction_axes=(1, 2, 3), use_fast_variance=False, rngs=nnx.Rngs(0)))]
    for ours, ref in cases:
        for m in (ours, ref):
            m.scale[...] = jnp.asarray([1.5, 0.5, 2.0, 1.0])
            m.bias[...] = jnp.asarray([0.25, -1.0, 0.0, 0.5])
        y, y_ref = nnx.jit(lambda a, b, x: (a(x), b(x)))(ours, ref, x)
        _close(y, y_ref)


class _Net(nnx.Module):
    """Every module of bnjax.flax.nnx in one model, each after a Linear layer."""

    def __init__(self, rngs):
        sizes = [5] + [8] * 5
        self.linears = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])]) \
            if hasattr(nnx, "List") else [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes, sizes[1:])]
        norms = [bnnx.BatchNorm(8, rngs=rngs), bnnx.BatchRenorm(8, rngs=rngs),
                 bnnx.GhostBatchNorm(8, virtual_batch_size=4, rngs=rngs), bnnx.GroupNorm(8, num_groups=2, rngs=rngs),
                 bnnx.LayerNorm(8, rngs=rngs)]
        self.norms = nnx.List(norms) if hasattr(nnx, "List") else norms
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        for linear, norm in zip(self.linears, self.norms):
            x = nnx.relu(norm(linear(x)))
        return self.head(x)


@nnx.jit
def _train_step(model, optimizer, x, labels):
    """An NNX training step as Flax's docs write it."""
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def test_nnx_training_loop_trains_every_module_with_bf16_input():
    rng = _rng(7)
    x = jnp.asarray(rng.normal(size=(8, 5)) * 2 + 1, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 3, 8))
    model = _Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.03), wrt=nnx.Param)
    before = [np.asarray(model.norms[i].mean[...]) for i in range(3)]
    losses = [float(_train_step(model, optimizer, x, labels)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    for i in range(3):
        assert not np.allclose(before[i], np.asarray(model.norms[i].mean[...]))
    assert int(model.norms[1].step[...]) == 15
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, x)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(logits)))


def test_hostile_inputs_give_one_clear_error_each():
    x = jnp.ones((4, 3))
    module = bnnx.BatchNorm(3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'mean' has shape \\(3,\\), but x \\(4, 5\\) has \\(5,\\) features"):
        module(jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="use_running_average must be a Python bool, got a traced value"):
        nnx.jit(lambda m, x, ura: m(x, use_running_average=ura))(module, x, True)
    with pytest.raises(ValueError, match="selects different rows for different features"):
        module(x, mask=jnp.asarray([[True, False, True]] * 4))
    with pytest.raises(ValueError, match="use_running_average is not set"):
        bnnx.BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnnx.BatchRenorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="r_max must be finite and >= 1"):
        bnnx.BatchRenorm(3, r_max=0.5, rngs=nnx.Rngs(0))
