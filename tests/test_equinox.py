"""bnjax.equinox's layers against independent oracles: Equinox's own BatchNorm (mode="batch"), GroupNorm and
LayerNorm, and bnjax's functional norm values applied to the whole batch (channels last)."""

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import bnjax.equinox as be  # noqa: E402
from bnjax import layers  # noqa: E402

SHAPES = [(3,), (3, 4, 5)]  # one example: [C] (a dense layer's activation, rank 1) and [C, H, W]


def batched(model, state, x, **kwargs):
    """Equinox's idiom: one example per call, the batch as the named axis, the state not mapped."""
    return jax.vmap(lambda xi, s: model(xi, s, **kwargs), axis_name="batch", in_axes=(0, None),
                    out_axes=(0, None))(x, state)


def data(shape, n=6, seed=0, dtype=jnp.float32):
    """A batch [n, *shape] with per-channel means and scales far from 0 and 1 (so the statistics matter), and
    random output weights of the same shape (NumPy: no compilation)."""
    rng = np.random.RandomState(seed)
    shift = np.arange(shape[0], dtype=np.float32).reshape((-1,) + (1,) * (len(shape) - 1))
    x = rng.standard_normal((n,) + shape).astype(np.float32) * (1.5 + shift) + 2.0 - shift
    return jnp.asarray(x, dtype), jnp.asarray(rng.standard_normal((n,) + shape), jnp.float32)


def channels_last(x):
    return jnp.moveaxis(x, 1, -1)


batched_jit = eqx.filter_jit(batched)


@jax.jit
def train_value(value, params, state, x):
    """A bnjax norm value (a static pytree) in training on the whole batch, jitted (eager is slow)."""
    return value.apply(params, state, x, train=True)


@pytest.mark.parametrize("shape", SHAPES, ids=["C", "CHW"])
def test_batch_norm_equals_equinox_batch_mode(shape):
    ours, s_ours = eqx.nn.make_with_state(be.BatchNorm)(shape[0], "batch", momentum=0.8)
    ref, s_ref = eqx.nn.make_with_state(eqx.nn.BatchNorm)(shape[0], "batch", momentum=0.8, mode="batch")
    weight, bias = jnp.asarray(np.random.RandomState(1).standard_normal((2, shape[0])) + [[1.0], [0.0]], jnp.float32)
    ours = eqx.tree_at(lambda m: (m.weight, m.bias), ours, (weight, bias))
    ref = eqx.tree_at(lambda m: (m.weight, m.bias), ref, (weight, bias))

    @eqx.filter_jit
    def step(model, state, x, w):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def loss(params, x):
            y, new_state = batched(eqx.combine(params, static), state, x)
            return jnp.sum(y * w), (y, new_state)

        (_, (y, new_state)), (g_model, g_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, new_state, g_model.weight, g_model.bias, g_x

    for i in range(3):  # chained: each step starts from the state the previous one returned
        x, w = data(shape, seed=i)
        y1, s_ours, gw1, gb1, gx1 = step(ours, s_ours, x * (i + 1), w)
        y2, s_ref, gw2, gb2, gx2 = step(ref, s_ref, x * (i + 1), w)
        for a, b in ((y1, y2), (gw1, gw2), (gb1, gb2), (gx1, gx2)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
        mean, var = s_ref.get(ref.batch_state_index)
        np.testing.assert_allclose(s_ours.get(ours.state_index).mean, mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s_ours.get(ours.state_index).var, var, rtol=1e-5, atol=1e-6)

    # Inference: the running statistics as they are. Equinox's "batch" mode divides them by 1 - momentum**count
    # at inference; with its counter at 0 it uses them as they are too.
    x, _ = data(shape, seed=7)
    s_ref = s_ref.set(ref.batch_counter, jnp.array(0))
    y1, s_after = batched_jit(eqx.nn.inference_mode(ours), s_ours, x)
    y2, _ = batched_jit(eqx.nn.inference_mode(ref), s_ref, x)
    np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5)
    for a, b in zip(s_after.get(ours.state_index), s_ours.get(ours.state_index)):
        np.testing.assert_array_equal(a, b)  # no update in inference
    # The per-call override wins over the attribute, as Equinox's.
    y3, _ = batched_jit(ours, s_ours, x, inference=True)
    np.testing.assert_allclose(y3, y1, rtol=1e-6, atol=1e-6)


def test_batch_norm_bf16_input_as_equinox():
    """bf16 input: float32 statistics; the output dtype is Equinox's (bf16 promoted with the float32 weight)."""
    shape = (3, 4, 4)
    ours, s_ours = eqx.nn.make_with_state(be.BatchNorm)(3, "batch")
    ref, s_ref = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, "batch", momentum=0.9, mode="batch")
    x, _ = data(shape, n=8, dtype=jnp.bfloat16)
    y1, s_ours = batched_jit(ours, s_ours, x)
    y2, s_ref = batched_jit(ref, s_ref, x)
    assert y1.dtype == y2.dtype == jnp.float32
    # Equinox reduces bf16 statistics in bf16; ours are float32 (the oracle: float64 NumPy on the same values).
    xs = np.asarray(x, np.float64)
    mean, var = xs.mean(axis=(0, 2, 3)), xs.var(axis=(0, 2, 3))
    expect = (xs - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-5)
    np.testing.assert_allclose(y1, expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y1, y2, atol=0.05)
    np.testing.assert_allclose(s_ours.get(ours.state_index).mean, 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(s_ours.get(ours.state_index).var, 0.9 + 0.1 * var, rtol=1e-5)


def test_mask_leaves_an_example_out():
    ours, state = eqx.nn.make_with_state(be.BatchNorm)(3, "batch")
    x, _ = data((3,), n=6)
    mask = jnp.array([True, True, False, True, True, False])
    y, new = eqx.filter_jit(jax.vmap(lambda xi, mi, s: ours(xi, s, mask=mi), axis_name="batch",
                                     in_axes=(0, 0, None), out_axes=(0, None)))(x, mask, state)  # a flag each
    y_ref, ref = batched_jit(ours, state, x[mask])
    np.testing.assert_allclose(y[mask], y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new.get(ours.state_index).var, ref.get(ours.state_index).var, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=["C", "CHW"])
def test_batch_renorm_equals_functional_value(shape):
    """Step by step against bnjax's batch_renorm on the whole batch, channels last; the limits bite (inputs far
    from the running statistics' start) and the warm-up changes them between steps."""
    kwargs = dict(momentum=0.7, r_max=1.5, d_max=0.5, warmup=(1, 3, 2))
    ours, state = eqx.nn.make_with_state(be.BatchRenorm)(shape[0], "batch", **kwargs)
    value = layers.batch_renorm(0.7, 1e-5, r_max=1.5, d_max=0.5, warmup=(1, 3, 2))
    params, ref = value.init(shape[0])
    for i in range(4):
        x, _ = data(shape, seed=i)
        y, state = batched_jit(ours, state, x * 3)
        y_ref, ref = train_value(value, params, ref, channels_last(x * 3))
        np.testing.assert_allclose(channels_last(y), y_ref, rtol=1e-5, atol=1e-5)
        got = state.get(ours.state_index)
        assert isinstance(got, layers.BatchRenormState) and int(got.step) == int(ref.step) == i + 1
        np.testing.assert_allclose(got.mean, ref.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.var, ref.var, rtol=1e-5, atol=1e-6)
    assert (ours.r_max, ours.d_max, ours.warmup, ours.momentum, ours.eps) == (1.5, 0.5, (1, 3, 2), 0.7, 1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=["C", "CHW"])
def test_ghost_equals_functional_value_on_the_batch(shape):
    """Groups of 4 consecutive examples of the vmapped axis, 10 examples (a last group of 2): the functional Ghost
    BN on the batch [10, ..., C]."""
    ours, state = eqx.nn.make_with_state(be.GhostBatchNorm)(shape[0], "batch", virtual_batch_size=4)
    value = layers.ghost_batch_norm(4, 0.9, 1e-5)
    params, ref = value.init(shape[0])
    for i in range(2):
        x, _ = data(shape, n=10, seed=i)
        y, state = batched_jit(ours, state, x)
        y_ref, ref = train_value(value, params, ref, channels_last(x))
        np.testing.assert_allclose(channels_last(y), y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(state.get(ours.state_index).mean, ref.mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.get(ours.state_index).var, ref.var, rtol=1e-5, atol=1e-6)


def test_group_and_layer_norm_equal_equinox():
    x, _ = data((4, 3, 5), n=3)
    weight, bias = jnp.asarray(np.random.RandomState(3).standard_normal((2, 4)), jnp.float32)
    wide = (jnp.broadcast_to(weight[:, None, None], (4, 3, 5)), jnp.broadcast_to(bias[:, None, None], (4, 3, 5)))
    affine = lambda m, wb=(weight, bias): eqx.tree_at(lambda n: (n.weight, n.bias), m, wb)  # noqa: E731
    pairs = [  # ours, Equinox's, input
        (affine(be.GroupNorm(2, 4)), affine(eqx.nn.GroupNorm(2, 4)), x),
        # Layer Norm over the whole example, weight per channel: Equinox's LayerNorm with the weight broadcast.
        (affine(be.LayerNorm(4)), affine(eqx.nn.LayerNorm((4, 3, 5)), wide), x),
        # [C] examples: exactly Equinox's LayerNorm(C).
        (affine(be.LayerNorm(4)), affine(eqx.nn.LayerNorm(4)), x[:, :, 0, 0]),
        # bf16 in, bf16 out (Equinox's returns the input's dtype), float32 statistics.
        (be.GroupNorm(2, 4), eqx.nn.GroupNorm(2, 4), x.astype(jnp.bfloat16)),
    ]
    outs = eqx.filter_jit(lambda pairs: [(jax.vmap(a)(v), jax.vmap(b)(v)) for a, b, v in pairs])(pairs)
    for (y, y_ref), (_, _, v) in zip(outs, pairs):
        assert y.dtype == y_ref.dtype == v.dtype and y.shape == v.shape
        np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32),
                                   **(dict(atol=0.05) if v.dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)))
    state = object()  # any state passes through, as eqx.nn.GroupNorm's
    y, same = pairs[0][0](x[0], state)
    assert same is state and y.shape == x[0].shape


class _MLP(eqx.Module):
    """A dense layer, a norm, a dense layer."""

    first: eqx.nn.Linear
    norm: eqx.Module
    last: eqx.nn.Linear

    def __init__(self, norm, key):
        k1, k2 = jax.random.split(key)
        self.first, self.norm, self.last = eqx.nn.Linear(5, 8, key=k1), norm, eqx.nn.Linear(8, 3, key=k2)

    def __call__(self, x, state):
        h, state = self.norm(self.first(x), state)  # rank 1 per example
        return self.last(jax.nn.relu(h)), state


class _Chain(eqx.Module):
    """Every layer of bnjax.equinox in one net, each after its own dense layer (one compilation per dtype)."""

    dense: list
    norms: list
    head: eqx.nn.Linear

    def __init__(self, key):
        keys = jax.random.split(key, 6)
        self.dense = [eqx.nn.Linear(5 if i == 0 else 8, 8, key=k) for i, k in enumerate(keys[:5])]
        self.norms = [be.BatchNorm(8, "batch"), be.BatchRenorm(8, "batch"), be.GroupNorm(2, 8), be.LayerNorm(8),
                      be.GhostBatchNorm(8, "batch", virtual_batch_size=4)]
        self.head = eqx.nn.Linear(8, 3, key=keys[5])

    def __call__(self, x, state):
        for dense, norm in zip(self.dense, self.norms):
            x, state = norm(dense(x), state)  # the stateless ones pass the state through
            x = jax.nn.relu(x)
        return self.head(x), state


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_filter_jit_training_loop_trains_every_layer(dtype):
    """A plain eqx.filter_jit + optax loop, written for any Equinox model, trains with every layer."""
    model, state = eqx.filter_jit(eqx.nn.make_with_state(_Chain))(jax.random.key(0))  # one compile, not many
    optimizer = optax.adam(0.01)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    x = jnp.asarray(np.random.RandomState(1).standard_normal((8, 5)), dtype)
    labels = jnp.arange(8) % 3

    @eqx.filter_jit
    def train_step(model, state, opt_state):
        def loss_fn(model, state):
            logits, state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean(), state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, loss

    start, start_state = model, jax.tree_util.tree_leaves(state)
    losses = []
    for _ in range(15):
        model, state, opt_state, loss = train_step(model, state, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses
    for before, after in zip(start.norms, model.norms):  # every layer's parameters were trained
        assert not np.allclose(before.weight, after.weight), type(after).__name__
    for before, after in zip(start_state, jax.tree_util.tree_leaves(state)):  # and every running statistic moved
        assert after.dtype == before.dtype and (after.ndim == 0 or not np.allclose(before, after))
        assert bool(jnp.all(jnp.isfinite(after)))
    logits, _ = batched_jit(eqx.nn.inference_mode(model), state, x)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_hostile_input_one_clear_error_each():
    bn, state = eqx.nn.make_with_state(be.BatchNorm)(3, "batch")
    with pytest.raises(ValueError, match=r"first axis must be the 3 channels \(input_size=3\)"):
        batched(bn, state, jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="axis_name is required"):
        be.BatchNorm(3, None)
    with pytest.raises(ValueError, match="input_size must be an integer >= 1"):
        be.BatchRenorm(0, "batch")
    with pytest.raises(ValueError, match="axis_name='batch' is not bound"):
        bn(jnp.ones(3), state)  # training without the vmap
    with pytest.raises(ValueError, match="axis_name='other' is not bound"):
        other = be.BatchNorm(3, "other")
        batched(other, eqx.nn.State(other), jnp.ones((4, 3)))
    y, _ = bn(jnp.ones(3), state, inference=True)  # inference needs no batch
    np.testing.assert_allclose(y, np.ones(3) / np.sqrt(1 + 1e-5), rtol=1e-6)

    @eqx.filter_jit
    def traced(model, state, flag):
        return batched(model, state, jnp.ones((4, 3)), inference=flag)

    with pytest.raises(TypeError, match="inference must be a Python bool.*eqx.nn.inference_mode"):
        traced(bn, state, jnp.array(True))
    with pytest.raises(ValueError, match="no entry for this layer.*another layer or model"):
        batched(bn, eqx.nn.State(be.BatchNorm(3, "batch")), jnp.ones((4, 3)))
    # Two models of one class share their state's keys (make_with_state names them by path): the types differ.
    _, bn_state = eqx.nn.make_with_state(_MLP)(be.BatchNorm(8, "batch"), jax.random.key(0))
    renorm_model, _ = eqx.nn.make_with_state(_MLP)(be.BatchRenorm(8, "batch"), jax.random.key(0))
    with pytest.raises(ValueError, match="holds a BatchNormState where this layer keeps a BatchRenormState"):
        batched(renorm_model, bn_state, jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="state must be an eqx.nn.State"):
        batched(bn, {"mean": 0}, jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        batched(bn, state, jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="groups=3 must divide channels=4"):
        be.GroupNorm(3, 4)
    with pytest.raises(ValueError, match=r"\(channels=4\)"):
        be.LayerNorm(4)(jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="virtual_batch_size must be an integer >= 1"):
        be.GhostBatchNorm(3, "batch", virtual_batch_size=0)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        be.BatchNorm(3, "batch", dtype=jnp.int32)
