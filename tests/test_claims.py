"""The verdict functions on hand-made inputs whose answers are worked out by hand."""

import math

import numpy as np
import pytest

from bnjax import claims


def test_max_stable_lr_needs_half_the_seeds_finite_and_accurate():
    lrs = [0.01, 0.1, 1.0, 10.0]
    acc = np.array([[0.95, 0.97, 0.95, 0.99],
                    [0.95, 0.50, 0.93, 0.99],
                    [0.95, 0.50, 0.20, 0.99],
                    [0.95, 0.50, 0.20, 0.10]])
    div = np.zeros_like(acc, bool)
    div[:, 3] = [True, True, True, False]  # accurate before diverging does not count
    # lr 1.0: seeds 0, 1 ok (2 of 4 = half); lr 10: only seed 3 is finite and it is at 0.10
    assert claims.max_stable_lr(lrs, acc, div) == 1.0
    assert claims.max_stable_lr(lrs, acc, div, threshold=0.94) == 0.01  # lr 1.0: only seed 0 >= 0.94
    assert claims.max_stable_lr(lrs, acc * 0, div) is None
    # exactly at the threshold counts
    assert claims.max_stable_lr([1.0], [[0.9]], [[False]]) == 1.0


def test_updates_to_threshold_takes_the_fastest_setting_on_the_seed_mean():
    steps = [1, 11, 21, 31]
    acc = np.array([
        [[0.1, 0.5, 0.9, 1.0], [0.1, 0.95, 0.95, 0.95], [0.1, 0.1, 0.1, 0.1]],
        [[0.1, 0.5, 0.9, 1.0], [0.1, 0.80, 0.95, 0.95], [0.1, 0.1, 0.1, 0.1]],
    ])  # [seeds=2, L=3, R=4]; setting 1's mean is 0.875 at 11 updates, 0.95 at 21: ties setting 0 -> first
    assert claims.updates_to_threshold(steps, acc) == (21, 0)
    acc[1, 1, 1] = 0.86  # mean 0.905 at 11 updates
    assert claims.updates_to_threshold(steps, acc) == (11, 1)
    assert claims.updates_to_threshold(steps, acc[:, 2]) == (None, None)
    assert claims.updates_to_threshold(steps, acc[:, 0]) == (21, 0)


def test_ratio_handles_missing_values():
    assert claims.ratio(3.0, 1.5) == 2.0
    assert claims.ratio(None, 1.0) is None
    assert claims.ratio(1.0, None) is None
    assert claims.ratio(1.0, 0.0) is None


def test_mean_interval_is_the_student_t_interval():
    v = np.array([[1.0, 5.0], [2.0, 5.0], [3.0, 5.0], [6.0, 5.0]])
    mean, lo, hi = claims.mean_interval(v)
    sd = np.std(v[:, 0], ddof=1)  # 2.1602
    half = 3.182 * sd / 2.0  # t(0.975, df=3)
    np.testing.assert_allclose(mean, [3.0, 5.0])
    np.testing.assert_allclose(lo, [3.0 - half, 5.0])
    np.testing.assert_allclose(hi, [3.0 + half, 5.0])
    m1, l1, h1 = claims.mean_interval(np.array([[0.4, 0.7]]))
    np.testing.assert_allclose(l1, m1)
    np.testing.assert_allclose(h1, m1)
    # large samples: the normal quantile
    big = np.random.default_rng(0).normal(size=(5000, 1))
    _, lo, hi = claims.mean_interval(big)
    np.testing.assert_allclose((hi - lo) / 2, 1.96 * big.std(ddof=1) / math.sqrt(5000), rtol=1e-12)


def test_paired_counts_and_sign_test():
    a = np.array([[0.9, 0.5, 0.3], [0.8, 0.5, 0.2], [0.7, 0.6, 0.9]])
    b = np.array([[0.1, 0.5, 0.4], [0.2, 0.4, 0.3], [0.9, 0.6, 0.1]])
    wins, losses, ties = claims.paired_counts(a, b)
    np.testing.assert_array_equal(wins, [2, 1, 1])
    np.testing.assert_array_equal(losses, [1, 0, 2])
    np.testing.assert_array_equal(ties, [0, 2, 0])
    wins, losses, ties = claims.paired_counts(a, b, tolerance=0.15)
    np.testing.assert_array_equal(wins, [2, 0, 1])
    np.testing.assert_array_equal(losses, [1, 0, 0])
    np.testing.assert_array_equal(ties, [0, 3, 2])
    # exact binomial: 9 of 10 -> 2 * (1 + 10) / 1024
    assert claims.sign_test(9, 1) == pytest.approx(22 / 1024)
    assert claims.sign_test(1, 9) == pytest.approx(22 / 1024)
    assert claims.sign_test(5, 5) == 1.0
    assert claims.sign_test(0, 0) == 1.0
    assert claims.sign_test(20, 0) == pytest.approx(2 / 2**20)


def test_trainable_width_counts_decades_of_qualifying_scales():
    scales = np.logspace(0, -4, 16)
    acc = np.zeros(16)
    assert claims.trainable_width(scales, acc) == 0.0
    acc[3:8] = 0.95
    assert claims.trainable_width(scales, acc) == pytest.approx(5 * 4 / 15)
    acc[:] = 0.95
    assert claims.trainable_width(scales, acc) == pytest.approx(16 * 4 / 15)
    # order does not matter; uneven spacing: scales 1, 10, 1000 -> stretches 1, 1.5, 2 decades
    assert claims.trainable_width([1000, 1, 10], [0.9, 0.0, 0.9]) == pytest.approx(1.5 + 2.0)
    assert claims.trainable_width([0.1], [1.0]) == 0.0


def test_overfitting_summary():
    epochs = [0, 5, 10, 15]
    train = np.array([[0.1, 0.8, 1.0, 1.0], [0.1, 0.9, 0.99, 1.0]])
    held = np.array([[0.1, 0.6, 0.7, 0.65], [0.1, 0.6, 0.72, 0.66]])
    s = claims.overfitting_summary(epochs, train, held)
    assert s["final_train"] == pytest.approx(1.0)
    assert s["final_heldout"] == pytest.approx(0.655)
    assert s["gap"] == pytest.approx(0.345)
    assert s["best_heldout"] == pytest.approx(0.71)
    assert s["best_heldout_epoch"] == 10
    assert s["epoch_train_100"] == 15  # the mean reaches 1.0 only when both seeds do
    s = claims.overfitting_summary(epochs, train * 0.5, held)
    assert s["epoch_train_100"] is None


def test_activation_stats_shares():
    sig = np.array([0.01, 0.04, 0.05, 0.5, 0.52, 0.56, 0.96, 0.99])
    s = claims.activation_stats(sig, "sigmoid")
    assert s["saturated"] == pytest.approx(4 / 8)  # 0.01, 0.04, 0.96, 0.99 (0.05 itself is not < 0.05)
    assert s["near_half"] == pytest.approx(2 / 8)  # 0.5, 0.52
    assert s["std"] == pytest.approx(np.std(sig))
    r = claims.activation_stats(np.array([[0.0, 1.0], [0.0, 0.0]]), "relu")
    assert r["zero"] == 0.75 and "saturated" not in r
    with pytest.raises(ValueError, match="activation"):
        claims.activation_stats(sig, "tanh")


def test_largest_step_below_uses_the_median_and_treats_overflow_as_failure():
    etas = [0.01, 0.1, 1.0, 10.0]
    r = np.array([[0.9, 0.5, 0.8, np.nan],
                  [0.9, 0.5, 1.2, np.inf],
                  [0.9, 0.5, 0.7, 0.1]])
    assert claims.largest_step_below(etas, r) == 1.0  # median at 1.0 is 0.8; at 10 it is inf
    assert claims.largest_step_below(etas, r, bound=0.6) == 0.1
    assert claims.largest_step_below(etas, r + 5) is None
    # the median, not the mean: one seed far below 1 does not carry two above it
    assert claims.largest_step_below([0.1, 1.0], [[0.5, 0.1], [0.5, 1.2], [0.5, 1.3]]) == 0.1


def test_all_right_survives_float32_rounding_of_the_accuracy():
    # the engine's accuracy: n right out of n, times a float32 reciprocal (one ulp short of 1 for n = 41)
    n = 41
    acc = np.float32(n) * np.float32(1.0 / n)
    assert acc < 1.0
    s = claims.overfitting_summary([0, 1], [[0.5, acc]], [[0.1, 0.2]])
    assert s["epoch_train_100"] == 1
    assert claims.overfitting_summary([0, 1], [[0.5, 1 - 1 / n]], [[0.1, 0.2]])["epoch_train_100"] is None


def test_overfitting_summary_takes_the_first_best_epoch_on_a_tie():
    held = np.array([[0.1, 0.7, 0.5, 0.7], [0.3, 0.7, 0.5, 0.7]])  # best mean 0.7 at epochs 5 and 15
    s = claims.overfitting_summary([0, 5, 10, 15], held, held)
    assert (s["best_heldout"], s["best_heldout_epoch"]) == (pytest.approx(0.7), 5)
    assert s["gap"] == 0.0 and s["epoch_train_100"] is None


def test_activation_stats_of_an_overflowed_layer_give_a_nan_std_without_a_warning():
    import warnings

    layer = np.array([[0.0, np.inf], [np.nan, 2.0]], np.float32)  # what a diverging net's layer holds
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        relu = claims.activation_stats(layer, "relu")
        sigmoid = claims.activation_stats(np.array([0.5, np.inf, -np.inf]), "sigmoid")
    assert np.isnan(relu["std"]) and relu["zero"] == 0.25
    assert np.isnan(sigmoid["std"]) and sigmoid["saturated"] == pytest.approx(2 / 3)
    assert sigmoid["near_half"] == pytest.approx(1 / 3)
