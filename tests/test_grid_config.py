"""bnjax.grid's configuration, schedule, layout and FLOP counts: what is decided before anything trains."""

import numpy as np
import pytest

from bnjax import data, grid, layers, model, options


@pytest.fixture(scope="module")
def bundled():
    return data.load_bundled(1000, 500)


def test_book_protocol_counts():
    cfg = grid.GridConfig()
    scales = cfg.axes["weight_scale"]
    assert len(scales) == 16 and scales[0] == 1.0 and scales == grid.book_weight_scales()
    assert scales[-1] == pytest.approx(1e-4)
    assert grid.num_updates(cfg, 1000) == 191
    np.testing.assert_array_equal(grid.record_steps(cfg, 1000), 1 + 10 * np.arange(20))
    assert grid.num_updates(cfg.replace(num_records=1), 1000) == 1
    assert grid.num_updates(cfg, 50) == 20  # fewer images than a batch: one iteration per record
    assert list(cfg.arms) == ["batchnorm", "plain"] and cfg.arms["batchnorm"].norm is True
    assert cfg.arms["plain"].norm is None and cfg.num_models == 32
    assert (cfg.learning_rate, cfg.batch_size, cfg.optimizer, cfg.bn_momentum) == (0.01, 100, "sgd", None)
    # norm=True is the book's batch norm: momentum 0.9, eps 1e-6 (its 10e-7), running statistics from 0
    book = cfg.network(cfg.arms["batchnorm"], 784).norm
    assert book == layers.book_batch_norm()
    assert (book.momentum, book.eps, book.init_mean, book.init_var) == (0.9, 1e-6, 0.0, 0.0)
    assert cfg.network(cfg.arms["plain"], 784).norm is None
    assert cfg.network(grid.Arm(norm=False), 784).norm is None


def test_network_follows_the_arm_and_the_grid():
    cfg = grid.GridConfig(hidden_sizes=[7, 5], num_classes=4)
    norm = layers.ghost_batch_norm(8)
    net = cfg.network(grid.Arm(norm=norm, activation="sigmoid", dropout_ratio=0.25, dropout_inverted=False), 12)
    assert net == model.MLPConfig(input_size=12, hidden_sizes=(7, 5), output_size=4, activation="sigmoid",
                                  norm=norm, dropout_ratio=0.25, dropout_inverted=False)
    hash(net)  # static: usable as a jit argument


@pytest.mark.parametrize("change, message", [
    ({"axes": {"momentum": (0.9,)}}, "unknown axis 'momentum'"),
    ({"axes": {"learning_rate": ()}}, "learning_rate"),
    ({"axes": {"learning_rate": (0.1, -1.0)}}, "learning_rate values must be > 0"),
    ({"axes": {"weight_decay": (float("nan"),)}}, "weight_decay values must be finite"),
    ({"axes": {"weight_scale": (0.0,)}}, "weight_scale values must be > 0"),
    ({"axes": {"bn_momentum": (0.5, 1.5)}}, r"bn_momentum values must lie in \[0, 1\]"),
    ({"axes": {"bn_momentum": (-0.1,)}}, r"bn_momentum values must lie in \[0, 1\]"),
    ({"bn_momentum": 1.01}, r"bn_momentum values must lie in \[0, 1\]"),
    ({"bn_momentum": float("inf")}, "bn_momentum values must be finite"),
    ({"learning_rate": None}, "learning_rate must be a number, got None"),  # only an optional axis may be None
    ({"weight_decay": None}, "weight_decay must be a number, got None"),
    ({"arms": {}}, "arms"),
    ({"arms": {"x": "bn"}}, "bnjax.grid.Arm"),
    ({"arms": {"x": grid.Arm(activation="tanh")}}, "activation"),
    ({"arms": {"x": grid.Arm(dropout_ratio=1.0)}}, "dropout_ratio"),
    ({"arms": {"x": grid.Arm(weight_init="lecun")}}, "weight_init"),
    ({"arms": {"x": grid.Arm(weight_init=-0.1)}}, "weight_init"),
    ({"arms": {"x": grid.Arm(weight_init=float("nan"))}}, "weight_init"),
    ({"arms": {"x": grid.Arm(weight_init=True)}}, "weight_init"),
    ({"optimizer": "sgdd"}, "unknown optimizer"),
    ({"seed": 2**31 - 2, "num_seeds": 3}, "seeds must lie"),
    ({"num_records": 0}, "num_records"),
    ({"dtype": "int8"}, "dtype"),
    ({"max_models_per_chunk": 0}, "max_models_per_chunk"),
])
def test_bad_config_rejected(change, message, bundled):
    with pytest.raises(ValueError, match=message):
        grid.run_grid(grid.GridConfig(**change), bundled.x_train[:10], bundled.t_train[:10])


@pytest.mark.parametrize("arm, message", [
    (grid.Arm(norm="yes"), "norm must be True, False/None or a norm value"),
    (grid.Arm(batch_size=0), "batch_size"),
    (grid.Arm(batch_size=2.5), "batch_size"),
    (grid.Arm(batch_size=True), "batch_size"),
    (grid.Arm(learning_rate_scale=0.0), "learning_rate_scale"),
    (grid.Arm(learning_rate_scale=float("inf")), "learning_rate_scale"),
    (grid.Arm(learning_rate_scale=1e-300), "times the arms' learning_rate_scale"),  # lr * scale underflows to 0
    (grid.Arm(norm=layers.Norm()), "norm value"),  # the base class has no init/apply
])
def test_bad_arm_fields_rejected(arm, message, bundled):
    with pytest.raises(ValueError, match=message):
        grid.run_grid(grid.GridConfig(arms={"x": arm}), bundled.x_train[:10], bundled.t_train[:10])


def test_bad_data_rejected(bundled):
    x, t = bundled.x_train[:10], bundled.t_train[:10]
    cfg = grid.GridConfig()
    with pytest.raises(ValueError, match="t_train"):
        grid.run_grid(cfg, x, t[:5])
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        grid.run_grid(cfg, x, t + 10)
    with pytest.raises(ValueError, match="integer labels"):
        grid.run_grid(cfg, x, t.astype(float))
    with pytest.raises(ValueError, match="features"):
        grid.run_grid(cfg, x, t, x[:, :5], t)


def test_grid_points_last_axis_fastest():
    cfg = grid.GridConfig(axes={"learning_rate": (1.0, 2.0), "weight_decay": (0.0, 0.1, 0.2)}, weight_scale=0.5)
    points = grid.grid_points(cfg)
    assert list(points) == list(options.AXES)
    np.testing.assert_array_equal(points["learning_rate"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(points["weight_decay"], [0, 0.1, 0.2] * 2)
    np.testing.assert_array_equal(points["weight_scale"], [0.5] * 6)
    assert np.isnan(points["bn_momentum"]).all()  # None: each norm keeps its own momentum
    with_momentum = grid.grid_points(cfg.replace(bn_momentum=0.7, axes={"bn_momentum": (0.1, 0.2),
                                                                      "weight_decay": (0.0, 0.5)}))
    np.testing.assert_array_equal(with_momentum["bn_momentum"], [0.1, 0.1, 0.2, 0.2])
    np.testing.assert_array_equal(with_momentum["weight_decay"], [0.0, 0.5, 0.0, 0.5])
    assert np.all(grid.grid_points(cfg.replace(bn_momentum=0.7))["bn_momentum"] == 0.7)


def test_flop_count_of_default_grid():
    flops = grid.grid_flops(grid.GridConfig(), 1000, 784)
    # ~342 GFLOP training + ~153 GFLOP evaluation.
    assert flops["train"] == pytest.approx(342e9, rel=0.01)
    assert flops["eval"] == pytest.approx(153e9, rel=0.01)
    # A held-out set of 500 adds half the training set's evaluation; a grid counts arms x seeds x points.
    assert grid.grid_flops(grid.GridConfig(), 1000, 784, 500)["eval"] == pytest.approx(1.5 * flops["eval"])
    cfg = grid.GridConfig(axes={"learning_rate": (0.1, 0.01, 0.001)}, num_seeds=2, num_records=1,
                          hidden_sizes=(10,))
    forward = 2 * 100 * (784 * 10 + 10 * 10)  # batch 100, 2 FLOPs per multiply-add
    one_model = 2 * forward + 2 * 100 * 10 * 10  # + weight gradients + input gradients past the first layer
    assert grid.grid_flops(cfg, 1000, 784)["train"] == 12 * one_model


@pytest.mark.parametrize("num_devices", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("seeds, points, arms, limit", [(1, 16, 2, None), (3, 5, 2, None), (7, 6, 3, 20),
                                                        (40, 16, 2, 64), (1, 1, 1, None), (2, 3, 4, 1)])
def test_layout_uses_every_device_and_covers_every_model(num_devices, seeds, points, arms, limit):
    cfg = grid.GridConfig(arms={f"a{i}": grid.Arm() for i in range(arms)},
                          axes={"learning_rate": tuple(np.linspace(0.01, 0.1, points))}, num_seeds=seeds,
                          max_models_per_chunk=limit)
    layout = grid.plan_layout(cfg, num_devices)
    d_seed, d_grid = layout.mesh_shape
    assert d_seed * d_grid == num_devices
    assert layout.seed_block % d_seed == 0 and layout.grid_block % d_grid == 0
    assert layout.seed_chunks * layout.seed_block >= seeds > (layout.seed_chunks - 1) * layout.seed_block
    assert layout.grid_chunks * layout.grid_block >= points > (layout.grid_chunks - 1) * layout.grid_block
    if limit is not None and limit >= arms * num_devices:
        assert layout.models_per_chunk(arms) <= limit
    # Padding never exceeds one mesh row or column of each block (balanced chunks).
    assert layout.seed_block - (-(-seeds // layout.seed_chunks)) < d_seed
    assert layout.grid_block - (-(-points // layout.grid_chunks)) < d_grid


def test_layout_ties_go_to_more_grid_points_per_device():
    # 4 seeds x 4 grid points on 4 devices: every mesh pads nothing; a device holding one seed's 4 grid
    # points trains them on one shared batch (one wide matmul), so seeds go across devices.
    cfg = grid.GridConfig(axes={"learning_rate": (0.01, 0.02, 0.03, 0.04)}, num_seeds=4)
    assert grid.plan_layout(cfg, 4).mesh_shape == (4, 1)
    assert grid.plan_layout(cfg.replace(num_seeds=2), 2).mesh_shape == (2, 1)
    # One seed: the grid axis is the only one without padding.
    assert grid.plan_layout(cfg.replace(num_seeds=1), 4).mesh_shape == (1, 4)
    # 8 seeds of the book's 32 models on 2 devices in chunks of 64: a seed's 16 scales stay on one device.
    layout = grid.plan_layout(grid.GridConfig(num_seeds=8, max_models_per_chunk=64), 2)
    assert layout.grid_block // layout.mesh_shape[1] == 16


@pytest.mark.parametrize("optimizer, slots", [("sgd", 0), ("momentum", 1), ("nesterov", 1), ("adagrad", 1),
                                              ("rmsprop", 1), ("lion", 1), ("adam", 2), ("adamw", 2)])
def test_memory_estimate_counts_the_optimizers_own_state(optimizer, slots):
    """The optimizer-state term is read from the optimizer: its slots per trainable parameter (Affine weights
    and biases, gamma and beta), plus a scalar step count (Adam, Lion); the other terms do not depend on it."""
    cfg = grid.GridConfig(optimizer=optimizer, hidden_sizes=(30, 20), eval_batch_size=50)
    sizes = [784, 30, 20, 10]
    trainable = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:])) + 2 * (30 + 20)  # with the norm's gamma, beta
    width = sum(sizes[1:])
    activations = 6 * 100 * width + 3 * 50 * width
    counter = 1 if optimizer in ("adam", "adamw", "lion") else 0  # a step count (int32, one element)
    # params (+ running mean and var), gradients, updates, the donated copy; the optimizer's state; activations
    expected = 4 * (4 * (trainable + 2 * 50) + slots * trainable + counter + activations)
    assert grid.bytes_per_model(cfg, 784) == expected
    # Without a norm in any arm, its parameters leave the optimizer's state (not the generous base term).
    plain = cfg.replace(arms={"plain": grid.Arm()})
    assert grid.bytes_per_model(plain, 784) == expected - 4 * slots * 2 * (30 + 20)


def test_chunks_follow_the_memory_budget():
    cfg = grid.GridConfig(num_seeds=10)  # 320 models
    per_model = grid.bytes_per_model(cfg, 784)
    assert grid.plan_layout(cfg.replace(memory_budget_bytes=1000 * per_model), 1).num_chunks == 1
    tight = grid.plan_layout(cfg.replace(memory_budget_bytes=64 * per_model), 1)
    assert tight.models_per_chunk(2) <= 64 and tight.num_chunks * tight.models_per_chunk(2) >= 320
    # Adam's two slots make a model bigger than SGD's: fewer fit in the same budget.
    budget = 64 * per_model
    adam = grid.plan_layout(cfg.replace(memory_budget_bytes=budget, optimizer="adam"), 1)
    assert adam.models_per_chunk(2) < tight.models_per_chunk(2) or adam.num_chunks > tight.num_chunks
    assert grid.default_memory_budget() == 1 << 30  # CPU
    assert grid.device_memory_limit() is None
