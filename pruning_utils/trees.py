"""Decision trees on filter scores (paper 000, chapter 1): the depth rule, the two readings of "a single
decision tree", XGBoost's gain, pruning curves, class histograms, and the tree-gain criterion ``gain``.

The paper trains "a single DT" of depth round(log2 n) on the n filter scores of a layer and ranks the
filters by that tree's "gain" (Chen and Guestrin's split gain). It does not say which library grew the
tree, so the book runs both readings side by side (:data:`READINGS`):

- ``"xgboost"``: one XGBoost boosting round. With the multi-class objective that is one tree per class, and
  its importance is XGBoost's gain (the mean gain of the splits on a feature), the paper's formula exactly;
- ``"cart"``: one scikit-learn CART tree for all classes; its importance is the impurity decrease.

Each tree is ranked by its own importance (:func:`tree_gain`), never by that of another model.
XGBoost and scikit-learn are imported when first used, so that importing :mod:`pruning_utils.criteria`
(which registers ``gain`` from here) stays cheap.
"""
from __future__ import annotations

import math

import numpy as np

from . import criteria
from .params import ParameterError, check_choice

READINGS = ("xgboost", "cart")
READING_NAMES = {"xgboost": "one XGBoost round", "cart": "one CART tree"}


def depth_for(n_features: int) -> int:
    """Tree depth d: the integer nearest log2(n), n the number of features (paper 000, Sec. 3); at least 1."""
    return max(1, round(math.log2(max(n_features, 1))))


def _check_threads(threads: int) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ParameterError(f"threads={threads!r} is not allowed; expected an int >= 1")
    return threads


def fit_tree(x: np.ndarray, y: np.ndarray, reading: str = "xgboost", max_depth: int | None = None,
             seed: int = 0, threads: int = 1):
    """The paper's "single DT" on features ``x`` (N, n) and labels ``y``, in one of :data:`READINGS`, of
    depth ``max_depth`` (None: :func:`depth_for` n). XGBoost runs on ``threads`` threads (a parameter,
    never the machine's core count)."""
    check_choice("reading", reading, READINGS)
    if reading == "cart":
        from sklearn.tree import DecisionTreeClassifier

        return DecisionTreeClassifier(max_depth=max_depth or depth_for(x.shape[1]), random_state=seed).fit(x, y)
    return fit_boosted(x, y, 1, max_depth, seed, threads)


def fit_boosted(x: np.ndarray, y: np.ndarray, n_estimators: int = 500, max_depth: int | None = None,
                seed: int = 0, threads: int = 1):
    """XGBoost with ``n_estimators`` boosting rounds of trees of depth ``max_depth`` (None: the rule)."""
    from xgboost import XGBClassifier

    model = XGBClassifier(n_estimators=n_estimators, max_depth=max_depth or depth_for(x.shape[1]),
                          tree_method="hist", random_state=seed, n_jobs=_check_threads(threads),
                          importance_type="gain", eval_metric="mlogloss")
    return model.fit(x, y)


def importance(model, n_features: int) -> np.ndarray:
    """Per-feature importance of a fitted tree model: XGBoost's "gain" (the mean gain of the feature's
    splits, asked for by name: Booster.get_score defaults to "weight"), or a CART tree's impurity
    decrease. Features never split on get 0."""
    if hasattr(model, "get_booster"):
        out = np.zeros(n_features)
        for key, value in model.get_booster().get_score(importance_type="gain").items():
            out[int(key[1:])] = value  # keys are "f0", "f1", ... for numpy input
        return out
    return np.asarray(model.feature_importances_, dtype=float)


def tree_gain(x: np.ndarray, y: np.ndarray, reading: str = "xgboost", max_depth: int | None = None,
              seed: int = 0, threads: int = 1) -> np.ndarray:
    """The gain of each feature in the single tree (reading ``reading``) fitted on ``x``, ``y``: the
    ranking the paper prunes by (its own tree's, not another model's)."""
    return importance(fit_tree(x, y, reading, max_depth, seed, threads), x.shape[1])


def correct(model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image correctness (bool) of a fitted tree model on ``x``: its accuracy is the mean."""
    return np.asarray(model.predict(x)) == np.asarray(y)


def removal_orders(gain: np.ndarray) -> dict[str, np.ndarray]:
    """Best case removes the least important feature first, worst case the most important (Fig. 4).
    Ties keep the feature order in the best case (a stable sort); the worst case is its reverse."""
    best = np.argsort(np.asarray(gain, dtype=float), kind="stable")
    return {"best": best, "worst": best[::-1].copy()}


def removal_steps(n: int, steps: int, fractions_above: tuple[float, ...] = ()) -> np.ndarray:
    """How many of ``n`` features each point of a pruning curve removes: ``steps`` evenly spaced counts
    from 0 to n - 1, plus for each f in ``fractions_above`` the fewest removals that exceed the share f
    (when at least one feature is then left)."""
    if steps < 2:
        raise ParameterError(f"steps={steps!r} is not allowed; expected an int >= 2")
    ks = set(np.linspace(0, n - 1, min(steps, n)).round().astype(int).tolist())
    for f in fractions_above:
        k = math.floor(f * n) + 1
        if k <= n - 1:
            ks.add(k)
    return np.array(sorted(ks))


def pruning_curve(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  order: np.ndarray, removed: np.ndarray, reading: str = "xgboost", max_depth: int | None = None,
                  seed: int = 0, threads: int = 1) -> np.ndarray:
    """Per-image test correctness (points, images) of a single tree refitted after removing the first
    ``k`` features of ``order``, for each k in ``removed`` (paper 000, Fig. 4). The depth is ``max_depth``
    or, when None, the rule on the features that remain, as for a tree trained on them from the start."""
    rows = []
    for k in removed:
        keep = np.sort(order[k:])
        model = fit_tree(x_train[:, keep], y_train, reading, max_depth, seed, threads)
        rows.append(correct(model, x_test[:, keep], y_test))
    return np.array(rows)


def top_map_counts(scores: np.ndarray, labels: np.ndarray, num_classes: int, rank: int = 0) -> np.ndarray:
    """counts[m, c]: images of class c whose ``rank``-th highest score is on map m (paper 000, Fig. 2)."""
    winner = np.argsort(-scores, axis=1, kind="stable")[:, rank]
    counts = np.zeros((scores.shape[1], num_classes), dtype=int)
    np.add.at(counts, (winner, labels), 1)
    return counts


@criteria.register("gain")
class Gain(criteria.Criterion):
    """Paper 000's criterion: score each filter's map on ``data`` by ``aggregation`` (the paper: the mean),
    fit the single tree of ``reading`` on those scores and the labels, and return each filter's gain in
    that tree (:func:`tree_gain`). Chapter 1 prunes LeNet5 with it."""

    needs_data = True

    def __init__(self, reading: str = "xgboost", max_depth: int | None = None, aggregation: str = "mean",
                 topk: int = 5, seed: int = 0, threads: int = 1):
        from .activations import AGGREGATIONS

        self.reading = check_choice("reading", reading, READINGS)
        self.aggregation = check_choice("aggregation", aggregation, AGGREGATIONS)
        self.max_depth, self.topk, self.seed, self.threads = max_depth, topk, seed, _check_threads(threads)

    def score(self, model, target, data=None):
        from .activations import channel_scores

        if target.act is None:
            raise ParameterError(f"criterion 'gain' needs the activation after {target.conv!r}: Target(act=...)")
        x = channel_scores(model, data.x, [target.act], how=self.aggregation, k=self.topk)[target.act]
        return tree_gain(x.numpy(), data.y.numpy(), self.reading, self.max_depth, self.seed, self.threads)
