import numpy as np
import pytest

from pruning_utils import trees
from pruning_utils.params import ParameterError


def planted(n=600, n_features=8, j=5, seed=0):
    """Only feature j predicts the label (4 classes); the rest is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, n_features))
    x[:, j] = y + 0.1 * rng.normal(size=n)
    return x, y


@pytest.mark.parametrize("n,d", [(1, 1), (2, 1), (6, 3), (16, 4), (120, 7), (1000, 10)])
def test_depth_is_nearest_integer_to_log2(n, d):
    assert trees.depth_for(n) == d


@pytest.mark.parametrize("backend", ["xgboost", "cart"])
def test_gain_ranks_the_planted_feature_first(backend):
    x, y = planted()
    model = trees.fit_trees(x, y, n_estimators=5, backend=backend)
    gain = trees.gain_importance(model, x.shape[1])
    assert gain.shape == (8,) and gain.argmax() == 5
    assert gain[5] > 10 * np.delete(gain, 5).max()


def test_gain_is_xgboost_gain_not_weight():
    x, y = planted()
    model = trees.fit_trees(x, y, n_estimators=5)
    booster_gain = model.get_booster().get_score(importance_type="gain")
    assert trees.gain_importance(model, 8)[5] == pytest.approx(booster_gain["f5"])
    assert booster_gain != model.get_booster().get_score(importance_type="weight")


def test_best_case_pruning_keeps_accuracy_until_the_feature_goes():
    x, y = planted()
    xt, yt = planted(seed=1)
    gain = trees.gain_importance(trees.fit_trees(x, y, n_estimators=5), 8)
    orders = trees.removal_orders(gain)
    assert orders["best"][-1] == 5 and orders["worst"][0] == 5
    frac, best = trees.pruning_curve(x, y, xt, yt, orders["best"], steps=8)
    _, worst = trees.pruning_curve(x, y, xt, yt, orders["worst"], steps=8)
    np.testing.assert_allclose(frac, np.arange(8) / 8)
    assert best.min() > 0.95  # feature 5 is the last one left, never removed
    assert worst[0] > 0.95 and worst[1:].max() < 0.45  # chance is 0.25


def test_top_map_counts_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.3, 0.5, 0.4], [0.0, 0.1, 0.2]])
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_array_equal(trees.top_map_counts(scores, labels, 2),
                                  [[0, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(trees.top_map_counts(scores, labels, 2, rank=2),
                                  [[1, 1], [0, 0], [1, 1]])
    assert trees.top_map_counts(scores, labels, 2).sum() == len(labels)


def test_bad_backend():
    with pytest.raises(ParameterError, match="backend='lightgbm' is not allowed"):
        trees.fit_trees(*planted(), backend="lightgbm")


def test_layer_study_uses_the_depth_rule_or_a_fixed_depth():
    x, y = planted(n=300, n_features=16)
    xt, yt = planted(n=100, n_features=16, seed=1)
    assert trees.layer_study(x, y, xt, yt, n_estimators=2, steps=3)["depth"] == 4  # round(log2 16)
    fixed = trees.layer_study(x, y, xt, yt, n_estimators=2, steps=3, backend="cart", max_depth=1)
    assert fixed["depth"] == 1 and fixed["single_acc"] < 0.6  # one CART split has 2 leaves for 4 classes
