"""bnjax.equinox's whole-model tools (precise statistics, folding) against NumPy oracles and the unfolded model;
the optional-import rules; the Equinox example (docs/examples/equinox_renorm.py)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bnjax.equinox as be  # noqa: E402
from bnjax.equinox import tools  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def batched(model, state, x):
    return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


@eqx.filter_jit
def infer(model, state, x):
    """The model's outputs in inference (running statistics), jitted (eager vmaps are slow)."""
    return batched(eqx.nn.inference_mode(model), state, x)[0]


class _Net(eqx.Module):
    """Linear -> BatchNorm -> relu -> Linear -> BatchRenorm -> relu -> Linear, with explicit attributes."""

    fc1: eqx.nn.Linear
    bn1: be.BatchNorm
    fc2: eqx.nn.Linear
    bn2: be.BatchRenorm
    head: eqx.nn.Linear

    def __init__(self, key, use_bias=True):
        k1, k2, k3 = jax.random.split(key, 3)
        self.fc1, self.bn1 = eqx.nn.Linear(5, 6, use_bias=use_bias, key=k1), be.BatchNorm(6, "batch")
        self.fc2, self.bn2 = eqx.nn.Linear(6, 4, key=k2), be.BatchRenorm(4, "batch")
        self.head = eqx.nn.Linear(4, 3, key=k3)

    def __call__(self, x, state):
        h, state = self.bn1(self.fc1(x), state)
        h, state = self.bn2(self.fc2(jax.nn.relu(h)), state)
        return self.head(jax.nn.relu(h)), state


def _batches(num=3, n=8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (num, n, 5)) * 2.0 + jax.random.normal(k2, (num, 1, 5))


def _numpy_stats(model, xb):
    """The oracle: each norm's batch statistics in float64 NumPy, the first norm applied with its batch statistics
    (training mode), as the second one's input."""
    w1, b1 = np.asarray(model.fc1.weight, np.float64), np.asarray(model.fc1.bias, np.float64)
    h1 = np.asarray(xb, np.float64) @ w1.T + b1
    m1, v1 = h1.mean(0), h1.var(0)
    g1, be1 = np.asarray(model.bn1.weight, np.float64), np.asarray(model.bn1.bias, np.float64)
    a1 = np.maximum((h1 - m1) / np.sqrt(v1 + 1e-5) * g1 + be1, 0.0)
    h2 = a1 @ np.asarray(model.fc2.weight, np.float64).T + np.asarray(model.fc2.bias, np.float64)
    return (m1, v1), (h2.mean(0), h2.var(0))


@eqx.filter_jit
def _perturbed(model, key):
    """Norm weights and biases away from 1 and 0, so the oracle's affine step matters."""
    k1, k2 = jax.random.split(key)
    model = eqx.tree_at(lambda m: (m.bn1.weight, m.bn1.bias), model,
                        (1.0 + 0.3 * jax.random.normal(k1, (6,)), 0.2 * jax.random.normal(k2, (6,))))
    return model


def test_recalibrate_equals_numpy_oracle():
    model, state = _make(_Net, jax.random.key(0))
    model = _perturbed(model, jax.random.key(1))
    batches = _batches()
    new = be.recalibrate(batched, model, state, batches)
    per_batch = [_numpy_stats(model, xb) for xb in batches]
    for i, norm in enumerate((model.bn1, model.bn2)):
        got = new.get(norm.state_index)
        np.testing.assert_allclose(got.mean, np.mean([p[i][0] for p in per_batch], axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.var, np.mean([p[i][1] for p in per_batch], axis=0), rtol=1e-5, atol=1e-5)
    assert int(new.get(model.bn2.state_index).step) == 0  # Batch Renorm's update count is kept
    # A list of batches (one call each) gives the same; the state given stays usable.
    again = be.recalibrate(batched, model, state, list(batches))
    for norm in (model.bn1, model.bn2):
        np.testing.assert_allclose(again.get(norm.state_index).var, new.get(norm.state_index).var, rtol=1e-6)
    jax.tree_util.tree_leaves(state)  # Equinox refuses a state used up by State.set; ours is not


def test_recalibrate_refusals():
    model, state = _make(_Net, jax.random.key(0))
    batches = _batches(num=1)
    with pytest.raises(ValueError, match="in inference mode"):
        be.recalibrate(batched, eqx.nn.inference_mode(model), state, batches)
    plain = eqx.nn.Sequential([eqx.nn.Linear(5, 4, key=jax.random.key(0)), be.GroupNorm(2, 4)])
    with pytest.raises(ValueError, match="holds no bnjax.equinox BatchNorm"):
        be.recalibrate(lambda m, s, x: (jax.vmap(m)(x), s), plain, eqx.nn.State(plain), batches)
    with pytest.raises(ValueError, match="made no running update"):
        be.recalibrate(lambda m, s, x: (batched(eqx.nn.inference_mode(m), s, x)[0], s), model, state, batches)
    with pytest.raises(TypeError, match=r"must return \(y, state\)"):
        be.recalibrate(lambda m, s, x: batched(m, s, x)[0], model, state, batches)
    with pytest.raises(TypeError, match="state must be the model's eqx.nn.State"):
        be.recalibrate(batched, model, {}, batches)


@eqx.filter_jit
def _make(cls, key, **kwargs):
    """``eqx.nn.make_with_state(cls)(key)`` as one compiled program (eager, each initialiser compiles alone)."""
    return eqx.nn.make_with_state(cls)(key, **kwargs)


@eqx.filter_jit
def _with_stats(model, state, key):
    """Random running statistics and norm parameters for every bnjax norm (what training would leave)."""
    for norm in tools._running_layers(model):
        k1, k2, k3, k4, key = jax.random.split(key, 5)
        n = norm.input_size
        stats = state.get(norm.state_index)
        state = state.set(norm.state_index, stats._replace(mean=jax.random.normal(k1, (n,)),
                                                           var=jax.random.uniform(k2, (n,), minval=0.3, maxval=3.0)))
        new = eqx.tree_at(lambda nn: (nn.weight, nn.bias), norm,
                          (1.0 + 0.5 * jax.random.normal(k3, (n,)), jax.random.normal(k4, (n,))))
        model = jax.tree_util.tree_map(lambda node, old=norm, new=new: new if node is old else node, model,
                                       is_leaf=lambda node, old=norm: node is old)
    return model, state


class _ConvNet(eqx.Module):
    body: eqx.nn.Sequential

    def __init__(self, key):
        k = jax.random.split(key, 3)
        self.body = eqx.nn.Sequential([
            eqx.nn.Conv2d(2, 4, 3, use_bias=False, key=k[0]), be.BatchNorm(4, "batch"), eqx.nn.Lambda(jax.nn.relu),
            eqx.nn.Sequential([eqx.nn.Conv2d(4, 3, 3, key=k[1]), be.GhostBatchNorm(3, "batch", virtual_batch_size=2)]),
            eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(3 * 3 * 3, 5, key=k[2]), be.BatchRenorm(5, "batch"),
        ])

    def __call__(self, x, state):
        return self.body(x, state)


def test_fold_leaves_inference_outputs_unchanged():
    x = jax.random.normal(jax.random.key(5), (4, 2, 7, 7))
    model, state = _make(_ConvNet, jax.random.key(0))
    model, state = _with_stats(model, state, jax.random.key(1))
    before = infer(model, state, x)
    folded, folded_state = be.fold(model, state)  # pairs found in the Sequentials (nested one included)
    np.testing.assert_allclose(infer(folded, folded_state, x), before, rtol=1e-5, atol=1e-5)
    conv = folded.body.layers[0]
    assert conv.bias is None and not np.allclose(conv.weight, model.body.layers[0].weight)
    # The norm after a conv without bias keeps the shift; the others are the identity, bit for bit.
    identity = folded.body.layers[6]
    assert np.array_equal(identity.weight, np.ones(5)) and np.array_equal(identity.bias, np.zeros(5))
    h = jax.random.normal(jax.random.key(6), (3, 5))
    np.testing.assert_array_equal(infer(identity, folded_state, h), h)
    assert int(folded_state.get(identity.state_index).step) == 0
    jax.tree_util.tree_leaves(state)  # the state given stays usable

    # Explicit pairs on a model without Sequential, a Linear without bias.
    net, net_state = _make(_Net, jax.random.key(2), use_bias=False)
    net, net_state = _with_stats(net, net_state, jax.random.key(3))
    xs = _batches(num=1)[0]
    ref = infer(net, net_state, xs)
    f_net, f_state = be.fold(net, net_state, [(lambda m: m.fc1, lambda m: m.bn1), (lambda m: m.fc2, lambda m: m.bn2)])
    np.testing.assert_allclose(infer(f_net, f_state, xs), ref, rtol=1e-5, atol=1e-5)


def test_fold_refusals():
    model, state = _make(_Net, jax.random.key(0))
    pair = (lambda m: m.fc1, lambda m: m.bn1)
    with pytest.raises(ValueError, match="has 4 outputs but the BatchNorm normalises 6"):
        be.fold(model, state, [(lambda m: m.fc2, lambda m: m.bn1)])
    with pytest.raises(TypeError, match="where_layer must give an eqx.nn.Linear"):
        be.fold(model, state, [(lambda m: m.bn2, lambda m: m.bn1)])
    with pytest.raises(ValueError, match="in two pairs"):
        be.fold(model, state, [pair, pair])
    with pytest.raises(ValueError, match="no eqx.nn.Linear/Conv2d directly followed"):
        be.fold(model, state)
    with pytest.raises(TypeError, match=r"each pair must be \(where_layer, where_norm\)"):
        be.fold(model, state, [lambda m: m.fc1])
    group = eqx.nn.Sequential([eqx.nn.Linear(5, 4, key=jax.random.key(0)), be.GroupNorm(2, 4)])
    with pytest.raises(ValueError, match="GroupNorm keeps no running statistics"):
        be.fold(group, eqx.nn.State(group), [(lambda m: m.layers[0], lambda m: m.layers[1])])
    theirs = eqx.nn.Sequential([eqx.nn.Linear(5, 4, key=jax.random.key(0)), eqx.nn.BatchNorm(4, "batch", mode="batch")])
    with pytest.raises(TypeError, match="Equinox's own; replace it with bnjax.equinox.BatchNorm"):
        be.fold(theirs, eqx.nn.State(theirs), [(lambda m: m.layers[0], lambda m: m.layers[1])])
    bad = state.set(model.bn1.state_index, state.get(model.bn1.state_index)._replace(var=jnp.full(6, jnp.nan, jnp.float32)))
    with pytest.raises(ValueError, match="running variance must be finite"):
        be.fold(model, bad, [pair])


def _run(code):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_optional_imports():
    """bnjax and bnjax.layers never import Equinox or Flax; bnjax.equinox without Equinox says how to install it."""
    done = _run("import sys, bnjax, bnjax.layers; print(sorted(m for m in ('equinox', 'flax') if m in sys.modules))")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    done = _run("import sys; sys.modules['equinox'] = None; import bnjax.equinox")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        'ImportError: bnjax.equinox needs Equinox, an optional extra: pip install "bnjax[equinox]"')


@pytest.mark.slow
def test_example_runs_and_prints_both_accuracies():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "docs/examples/equinox_renorm.py", "--steps", "20"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["bnjax.equinox.BatchRenorm", "eqx.nn.BatchNorm"], lines
    for line in lines:
        assert 0.0 <= float(line.split(": ")[1]) <= 1.0 and len(line.split(": ")[1]) == 5
