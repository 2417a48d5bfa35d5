"""Network kinds: the one dispatch (``bnjax.networks``) and the grid engine training the conv net.

The oracle for the engine is the same as for the MLP (tests/test_grid_run.py): each conv net trained alone with
``convnet.init`` and ``train.train_step``, its keys re-derived from the documented scheme.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnjax import convnet, data, grid, layers, model, networks, options, train
from bnjax.grid import plan
from helpers import reference_keys


def test_kinds_match_the_names_options_lists():
    assert tuple(networks.KINDS) == options.MODELS
    assert networks.module_for(model.MLPConfig()) is model
    assert networks.module_for(convnet.ConvNetConfig()) is convnet
    assert networks.kind_of(convnet.ConvNetConfig()) == "convnet"
    with pytest.raises(TypeError, match="network configuration"):
        networks.module_for({"hidden_sizes": (100,)})


def test_network_config_builds_each_kind_and_refuses_what_it_cannot_read():
    net = networks.network_config("convnet", input_size=784, hidden_sizes=(100,), output_size=10, norm=True)
    assert net.input_shape == (28, 28, 1) and net.hidden_sizes == (100,) and net.norm == layers.book_batch_norm()
    mlp = networks.network_config("mlp", input_size=784, hidden_sizes=(100,) * 5, output_size=10)
    assert mlp == model.MLPConfig()
    with pytest.raises(ValueError, match="not a square"):
        networks.network_config("convnet", input_size=780, hidden_sizes=(100,), output_size=10)
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        networks.network_config("resnet", input_size=784, hidden_sizes=(100,), output_size=10)


def test_grid_config_checks_the_model_field():
    with pytest.raises(ValueError, match="model must be one of mlp, convnet"):
        grid.GridConfig(model="resnet").validate()
    cfg = grid.GridConfig(model="convnet", hidden_sizes=(100,)).validate()
    assert isinstance(cfg.network(cfg.arms["batchnorm"], 784), convnet.ConvNetConfig)
    assert isinstance(grid.GridConfig().network(cfg.arms["plain"], 784), model.MLPConfig)


def test_flops_and_memory_plan_follow_the_kind():
    cfg = grid.GridConfig(model="convnet", hidden_sizes=(100,), axes={"weight_scale": (1.0, 0.1)})
    net = cfg.network(cfg.arms["plain"], 784)
    flops = plan.grid_flops(cfg, 1000, 784, num_heldout=500)
    updates = grid.num_updates(cfg, 1000)
    assert flops["train"] == 4 * updates * convnet.num_flops(net, 100, backward=True)
    assert flops["eval"] == 4 * cfg.num_records * convnet.num_flops(net, 1500)
    # The conv net keeps far more activations per model than the MLP: the planner must see it.
    mlp = grid.GridConfig(axes={"weight_scale": (1.0, 0.1)})
    assert plan.bytes_per_model(cfg, 784) > 2 * plan.bytes_per_model(mlp, 784)
    assert plan.bytes_per_model(cfg, 784) >= 4 * convnet.activation_floats(net, 100)
    budget = 4 * plan.bytes_per_model(cfg, 784)
    layout = plan.plan_layout(cfg.replace(memory_budget_bytes=budget), 1, 784)
    assert layout.seed_block * layout.grid_block * len(cfg.arms) <= 4


@pytest.mark.slow
def test_vmapped_conv_nets_equal_conv_nets_trained_alone():
    ds = data.load_bundled(40, 10)
    x, t = ds.x_train, ds.t_train
    cfg = grid.GridConfig(model="convnet", hidden_sizes=(8,), axes={"weight_scale": (0.1, 0.02)}, num_records=2,
                          batch_size=10, seed=5, keep_final=True, optimizer="momentum")
    result = grid.run_grid(cfg, x, t)
    # The engine computes at GridConfig.matmul_precision 'highest'; so must the reference (XLA's CPU convolution
    # at default precision differs by ~1e-2 after a few updates).
    with jax.default_matmul_precision("highest"):
        steps_at = grid.record_steps(cfg, 40)
        opt = train.make_optimizer(cfg.optimizer, cfg.learning_rate)
        init_keys, batch_idx = reference_keys(cfg.seed, 2, 2, steps_at[-1], 10, 40)
        accuracy = jax.jit(convnet.accuracy, static_argnums=0)
        for v, (name, norm) in enumerate((("batchnorm", True), ("plain", None))):
            net = convnet.ConvNetConfig(hidden_sizes=(8,), norm=norm)
            step = jax.jit(lambda ts, xb, tb, net=net: train.train_step(net, ts, xb, tb, opt))
            for i, scale in enumerate(cfg.axes["weight_scale"]):
                params, state = convnet.init(net, init_keys[v, i], weight_init=None, weight_scale=jnp.float32(scale))
                ts = train.train_state_init(params, state, opt)
                accs = []
                for u in range(steps_at[-1]):
                    _, ts = step(ts, x[batch_idx[u]], t[batch_idx[u]])
                    if u + 1 in steps_at:
                        accs.append(float(accuracy(net, ts.params, ts.state, x, t)))
                np.testing.assert_allclose(result.metrics["train_accuracy"][name][0, i], accs, atol=1e-6)
                np.testing.assert_allclose(np.asarray(result.final[name].params.conv.W[0, i]),
                                           np.asarray(ts.params.conv.W), rtol=1e-4, atol=1e-6)
                if norm:
                    got = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf[0, i]), result.final[name].state)
                    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ts.state)):
                        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-6)
