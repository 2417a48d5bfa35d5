"""bnjax.flax.convert and bnjax.flax.tools: conversion round trips and Flax's own BatchNorm as the oracle, precise
statistics against a NumPy oracle, folding (outputs unchanged, norms the identity), refusals; the import guard and
the runnable example docs/examples/flax_renorm.py."""

import importlib
import subprocess
import sys

import numpy as np
import pytest

flax = pytest.importorskip("flax")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from helpers import ROOT, cli_env  # noqa: E402

from bnjax import layers  # noqa: E402
from bnjax.flax import convert, tools  # noqa: E402
from bnjax.flax import linen as bnn  # noqa: E402
from bnjax.flax import nnx as bnnx  # noqa: E402


def _rng(seed=0):
    return np.random.default_rng(seed)


def _close(a, b, rtol=2e-5, atol=2e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


def _init(module, x, **kwargs):
    return jax.jit(lambda key, x: module.init(key, x, **kwargs))(jax.random.key(0), x)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------


def test_linen_conversion_round_trip_is_exact_and_carries_momentum_and_epsilon():
    rng = _rng(1)
    ref = nn.BatchNorm(momentum=0.8, epsilon=1e-3, use_fast_variance=False)
    xs = jnp.asarray(rng.normal(size=(4, 6, 3)) * 2 + 1, jnp.float32)
    v = _init(ref, xs[0], use_running_average=False)

    @jax.jit
    def train(v, x):  # Flax's own BatchNorm, trained: 3 steps
        _, up = ref.apply(v, x, use_running_average=False, mutable=["batch_stats"])
        return {**v, **up}

    for x in xs[:3]:
        v = train(v, x)
    params, state, norm = convert.linen_to_bnjax(v["params"], v["batch_stats"], module=ref)
    assert (norm.momentum, norm.eps) == (0.8, 1e-3)
    # The same evaluation outputs through bnjax's functional batch norm.
    y_ref = jax.jit(lambda v, x: ref.apply(v, x, use_running_average=True))(v, xs[3])
    y, _ = layers.batch_norm_apply(params, state, xs[3], train=False, eps=norm.eps)
    _close(y, y_ref, rtol=1e-6, atol=1e-6)
    # And the same next training step (momentum carried, two-pass variance).
    _, s_ref = ref.apply(v, xs[3], use_running_average=False, mutable=["batch_stats"])
    _, s = norm.apply(params, state, xs[3], train=True)
    _close(dict(s._asdict()), s_ref["batch_stats"], rtol=1e-6, atol=1e-6)
    # Round trip: the very arrays back.
    p_back, s_back = convert.bnjax_to_linen(params, state)
    for got, want in ((p_back, v["params"]), (s_back, v["batch_stats"])):
        assert sorted(got) == sorted(want)
        for k in got:
            assert got[k].dtype == want[k].dtype and np.array_equal(np.asarray(got[k]), np.asarray(want[k]))
    # Without a module: Flax's defaults; without a scale: gamma None and use_scale=False.
    p2, _, n2 = convert.linen_to_bnjax({"bias": v["params"]["bias"]}, v["batch_stats"])
    assert (n2.momentum, n2.eps, n2.use_scale, p2.gamma) == (0.99, 1e-5, False, None)
    assert sorted(convert.bnjax_to_linen(p2, state)[0]) == ["bias"]
    with pytest.raises(KeyError, match="batch_stats lacks 'var'"):
        convert.linen_to_bnjax(v["params"], {"mean": state.mean})


def test_nnx_conversion_round_trip_is_exact():
    rng = _rng(2)
    bn = nnx.BatchNorm(3, momentum=0.7, epsilon=1e-4, use_fast_variance=False, rngs=nnx.Rngs(0))
    for name in ("scale", "bias", "mean", "var"):
        getattr(bn, name)[...] = jnp.asarray(rng.random(3) + 0.5, jnp.float32)
    params, state, norm = convert.nnx_to_bnjax(bn)
    assert (norm.momentum, norm.eps) == (0.7, 1e-4)
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    bn.eval()
    _close(layers.batch_norm_apply(params, state, x, train=False, eps=norm.eps)[0], bn(x), rtol=1e-6, atol=1e-6)
    back = convert.bnjax_to_nnx(params, state, norm)
    assert isinstance(back, nnx.BatchNorm) and (back.momentum, back.epsilon) == (0.7, 1e-4)
    for name in ("scale", "bias", "mean", "var"):
        assert np.array_equal(np.asarray(getattr(back, name)[...]), np.asarray(getattr(bn, name)[...]))
    # bnjax's own NNX module converts the same way.
    ours = bnnx.BatchNorm(3, momentum=0.7, epsilon=1e-4, rngs=nnx.Rngs(0))
    assert convert.nnx_to_bnjax(ours)[2] == norm
    with pytest.raises(TypeError, match="must be an nnx.BatchNorm"):
        convert.nnx_to_bnjax(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))


# --------------------------------------------------------------------------------------------------
# Precise statistics
# --------------------------------------------------------------------------------------------------


class _ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        h = nn.Conv(4, (3, 3), use_bias=False)(x)
        h = nn.relu(bnn.BatchRenorm(use_running_average=ura, r_max=1.5, d_max=0.5)(h))
        h = nn.Dense(3)(h.mean((1, 2)))
        h = bnn.BatchNorm(use_running_average=ura)(h)
        return nn.BatchNorm(use_running_average=ura)(h)  # Flax's own: left as it is


def _trained_convnet(rng):
    model = _ConvNet()
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)) * 2 + 1, jnp.float32)
    v = _init(model, x, train=False)
    step = jax.jit(lambda v, x: {**v, **model.apply(v, x, train=True, mutable=["batch_stats"])[1]})
    for i in range(2):
        v = step(v, x * (1 + i))
    return model, v, x


def test_recalibrate_linen_equals_the_numpy_oracle():
    rng = _rng(3)
    model, v, x = _trained_convnet(rng)
    batches = jnp.asarray(rng.normal(size=(3, 6, 5, 5, 2)) * 3 - 1, jnp.float32)
    new = tools.recalibrate_linen(model.apply, v, batches, train=True)
    # Oracle: each norm's input in the training-mode forward (Flax's capture_intermediates), per batch; the mean
    # of the per-batch means and biased variances.
    inputs = {"BatchRenorm_0": [], "BatchNorm_0": []}
    capture = jax.jit(lambda v, x: model.apply(v, x, train=True, capture_intermediates=True,
                                               mutable=["batch_stats", "intermediates"])[1]["intermediates"])
    for xb in batches:
        inter = capture(v, xb)
        inputs["BatchRenorm_0"].append(np.asarray(inter["Conv_0"]["__call__"][0], np.float64).reshape(-1, 4))
        inputs["BatchNorm_0"].append(np.asarray(inter["Dense_0"]["__call__"][0], np.float64))
    for name, hs in inputs.items():
        stats = new["batch_stats"][name]
        np.testing.assert_allclose(np.asarray(stats["mean"]), np.mean([h.mean(0) for h in hs], 0), rtol=2e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats["var"]), np.mean([h.var(0) for h in hs], 0), rtol=2e-5,
                                   atol=1e-6)
    # Kept: the parameters, Batch Renorm's step, Flax's own BatchNorm (its update is its own code).
    assert int(new["batch_stats"]["BatchRenorm_0"]["step"]) == 2
    _close(new["params"], v["params"], rtol=0, atol=0)
    _close(new["batch_stats"]["BatchNorm_1"], v["batch_stats"]["BatchNorm_1"], rtol=0, atol=0)
    # A list of batches gives the same numbers.
    _close(tools.recalibrate_linen(model.apply, v, list(batches), train=True), new, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="made no running update.*training mode.*train=True"):
        tools.recalibrate_linen(model.apply, v, batches, train=False)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn = bnnx.BatchRenorm(4, r_max=1.5, d_max=0.5, rngs=rngs)
        self.lin = nnx.Linear(4, 3, rngs=rngs)
        self.bn2 = bnnx.BatchNorm(3, rngs=rngs)

    def __call__(self, x):
        return self.bn2(self.lin(nnx.relu(self.bn(self.conv(x))).mean((1, 2))))


def test_recalibrate_nnx_equals_the_numpy_oracle_and_keeps_the_model():
    rng = _rng(4)
    model = _NNXNet(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)) * 2 + 1, jnp.float32)
    nnx.jit(lambda m, x: m(x))(model, x)
    model.eval()
    old_mean = np.asarray(model.bn.mean[...])
    batches = jnp.asarray(rng.normal(size=(3, 6, 5, 5, 2)) * 3 - 1, jnp.float32)
    new = tools.recalibrate_nnx(model, batches)

    @nnx.jit
    def norm_inputs(m, xb):  # the oracle: each norm's input in training mode
        m.train()
        h = m.conv(xb)
        return h, m.lin(nnx.relu(m.bn(h)).mean((1, 2)))

    hs = [norm_inputs(nnx.clone(model), xb) for xb in batches]
    for i, norm in enumerate((new.bn, new.bn2)):
        h = [np.asarray(pair[i], np.float64).reshape(-1, pair[i].shape[-1]) for pair in hs]
        np.testing.assert_allclose(np.asarray(norm.mean[...]), np.mean([a.mean(0) for a in h], 0), rtol=2e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(np.asarray(norm.var[...]), np.mean([a.var(0) for a in h], 0), rtol=2e-5,
                                   atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), old_mean)  # the model itself is unchanged
    assert model.bn.use_running_average is True and int(new.bn.step[...]) == 1


# --------------------------------------------------------------------------------------------------
# Folding
# --------------------------------------------------------------------------------------------------


class _FoldNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        ura = not train
        h = nn.Conv(4, (3, 3), use_bias=False)(x)  # no bias: the offset stays in the norm's bias
        h = nn.relu(bnn.BatchRenorm(use_running_average=ura)(h))
        h = bnn.BatchNorm(use_running_average=ura)(h)  # not after a layer: left alone
        h = nn.Dense(5)(h.mean((1, 2)))
        h = bnn.GhostBatchNorm(use_running_average=ura, virtual_batch_size=2)(h)
        r = nn.Dense(5)(h)
        h = bnn.BatchNorm(use_running_average=ura, epsilon=1e-3)(r) + r  # residual: r is used twice
        return bnn.LayerNorm()(nn.Dense(4)(h))


def test_fold_linen_keeps_outputs_and_makes_the_norms_identity():
    rng = _rng(5)
    model = _FoldNet()
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)) * 2 + 1, jnp.float32)
    v = _init(model, x, train=False)
    step = jax.jit(lambda v, x: {**v, **model.apply(v, x, train=True, mutable=["batch_stats"])[1]})
    for i in range(3):
        v = step(v, x * (1 + i) + i)
    v["params"]["BatchRenorm_0"]["bias"] = v["params"]["BatchRenorm_0"]["bias"] + 0.3
    new, report = tools.fold_linen(model.apply, v, x, train=False)
    assert report.folded == (("Conv_0", "BatchRenorm_0"), ("Dense_0", "GhostBatchNorm_0"))
    skipped = dict(report.skipped)
    assert "not the output of an nn.Dense" in skipped["BatchNorm_0"]
    assert "used elsewhere too" in skipped["BatchNorm_1"]
    assert "no running statistics" in skipped["LayerNorm_0"]
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    _close(evaluate(new, x * 2), evaluate(v, x * 2), rtol=1e-4, atol=1e-4)
    for name in ("BatchRenorm_0", "GhostBatchNorm_0"):
        stats, params = new["batch_stats"][name], new["params"][name]
        np.testing.assert_array_equal(np.asarray(params["scale"]), 1.0)
        np.testing.assert_array_equal(np.asarray(stats["mean"]), 0.0)
        np.testing.assert_array_equal(np.asarray(stats["var"]) + np.float32(1e-5), np.float32(1.0))
        # The norm in evaluation is the identity (plus its bias), exactly.
        h = jnp.asarray(rng.normal(size=(3, 4 if name == "BatchRenorm_0" else 5)), jnp.float32)
        y = bnn.BatchNorm().apply({"params": params, "batch_stats": {"mean": stats["mean"], "var": stats["var"]}},
                                  h, use_running_average=True)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(h + params["bias"]))
    np.testing.assert_array_equal(np.asarray(new["params"]["GhostBatchNorm_0"]["bias"]), 0.0)  # Dense had a bias
    assert not np.allclose(np.asarray(new["params"]["BatchRenorm_0"]["bias"]), 0.0)  # the conv had none
    assert int(new["batch_stats"]["BatchRenorm_0"]["step"]) == 3
    _close(new["batch_stats"]["BatchNorm_1"], v["batch_stats"]["BatchNorm_1"], rtol=0, atol=0)  # left alone


class _SharedDense(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        dense = nn.Dense(4)  # one layer called twice: folding one norm into it would change the other call
        a = bnn.BatchNorm(use_running_average=not train)(dense(x))
        b = bnn.BatchNorm(use_running_average=not train)(dense(x * 2.0))
        return a + b


def test_fold_linen_leaves_a_norm_after_a_shared_layer_alone():
    x = jnp.asarray(_rng(6).normal(size=(8, 3)), jnp.float32)
    model = _SharedDense()
    v = _init(model, x, train=False)
    v = {**v, **model.apply(v, x, train=True, mutable=["batch_stats"])[1]}
    new, report = tools.fold_linen(model.apply, v, x, train=False)
    assert report.folded == ()
    assert [name for name, _ in report.skipped] == ["BatchNorm_0", "BatchNorm_1"]
    assert all("called more than once" in why for _, why in report.skipped), report.skipped
    _close(new["params"], v["params"], rtol=0, atol=0)


def test_fold_nnx_keeps_outputs_and_the_original_model():
    rng = _rng(6)
    model = _NNXNet(nnx.Rngs(0))
    x = jnp.asarray(rng.normal(size=(6, 5, 5, 2)) * 2 + 1, jnp.float32)
    for i in range(3):
        nnx.jit(lambda m, x: m(x))(model, x * (1 + i))
    old_mean = np.asarray(model.bn.mean[...])
    new, report = tools.fold_nnx(model, [(model.conv, model.bn), (model.lin, model.bn2)], sample=x)
    assert report.folded == (("conv", "bn"), ("lin", "bn2"))
    np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), old_mean)
    assert new.bn.use_running_average is False  # the mode is the model's, not the check's
    model.eval()
    new.eval()
    evaluate = nnx.jit(lambda m, x: m(x))
    _close(evaluate(new, x * 2), evaluate(model, x * 2), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(new.bn2.var[...]) + np.float32(1e-5), np.float32(1.0))
    np.testing.assert_array_equal(np.asarray(new.bn2.bias[...]), 0.0)
    assert int(new.bn.step[...]) == 3


def test_tools_refuse_group_and_layer_norms_and_foreign_models():
    class GroupOnly(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return bnn.GroupNorm(num_groups=2)(nn.Dense(4)(x))

    x = jnp.ones((4, 3))
    v = _init(GroupOnly(), x, train=False)
    v = {**v, "batch_stats": {}}
    with pytest.raises(ValueError, match="keep no running statistics"):
        tools.recalibrate_linen(GroupOnly().apply, v, x[None], train=True)
    with pytest.raises(ValueError, match="nothing to fold.*group or layer norms only"):
        tools.fold_linen(GroupOnly().apply, v, x, train=False)

    class FlaxOnly(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            return nn.BatchNorm(use_running_average=not train)(x)

    vf = _init(FlaxOnly(), x, train=False)
    with pytest.raises(ValueError, match="no bnjax norm with running statistics.*Flax's own BatchNorm"):
        tools.recalibrate_linen(FlaxOnly().apply, vf, x[None], train=True)
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        tools.recalibrate_linen(FlaxOnly().apply, {"params": {}}, x[None], train=True)
    lin, ln = nnx.Linear(3, 4, rngs=nnx.Rngs(0)), bnnx.LayerNorm(4, rngs=nnx.Rngs(0))
    holder = nnx.Sequential(lin, ln)
    with pytest.raises(ValueError, match="keeps no running statistics"):
        tools.fold_nnx(holder, [(lin, ln)])
    with pytest.raises(ValueError, match="keep no running statistics"):
        tools.recalibrate_nnx(holder, x[None])
    with pytest.raises(TypeError, match="must be an nnx.Linear or nnx.Conv"):
        tools.fold_nnx(holder, [(ln, ln)])
    bn = bnnx.BatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="not a module of this model"):
        tools.fold_nnx(holder, [(lin, bn)])


# --------------------------------------------------------------------------------------------------
# Import guard and the example
# --------------------------------------------------------------------------------------------------


def test_bnjax_flax_needs_flax_with_one_clear_import_error(monkeypatch):
    for name in [n for n in sys.modules if n == "bnjax.flax" or n.startswith("bnjax.flax.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flax", None)  # as if Flax were not installed
    with pytest.raises(ImportError, match='pip install "bnjax\\[flax\\]"'):
        importlib.import_module("bnjax.flax")


@pytest.mark.slow
def test_bnjax_and_layers_do_not_import_flax():
    code = "import sys, bnjax, bnjax.layers, bnjax.norms; assert 'flax' not in sys.modules, 'flax imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow
def test_example_runs_and_prints_each_accuracy():
    proc = subprocess.run([sys.executable, "docs/examples/flax_renorm.py", "--steps", "20"], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["flax.linen.BatchNorm",
                                                       "flax.linen.BatchNorm at Flax's default momentum 0.99",
                                                       "bnjax.flax.linen.BatchRenorm"]
    for line in lines:
        assert 0.0 <= float(line.split(": ")[1]) <= 1.0 and len(line.split(": ")[1]) == 5
