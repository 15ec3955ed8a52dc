"""Decision trees on filter scores (paper 000, chapter 1): depth rule, XGBoost gain, pruning curves."""
from __future__ import annotations

import math

import numpy as np
from sklearn.tree import DecisionTreeClassifier
from xgboost import XGBClassifier

from .params import check_choice

BACKENDS = ("xgboost", "cart")


def depth_for(n_features: int) -> int:
    """Tree depth d: the integer nearest log2(n), n the number of features (paper 000, Sec. 3); at least 1."""
    return max(1, round(math.log2(max(n_features, 1))))


def fit_trees(x: np.ndarray, y: np.ndarray, n_estimators: int = 1, max_depth: int | None = None,
              seed: int = 0, backend: str = "xgboost"):
    """Fit gradient-boosted trees (``n_estimators`` rounds; 1 round = the paper's single DT) or a CART tree.

    In multi-class XGBoost one boosting round is one tree per class, each of depth ``max_depth``
    (default: :func:`depth_for` the number of features); ``backend='cart'`` fits one scikit-learn tree.
    """
    check_choice("backend", backend, BACKENDS)
    depth = max_depth or depth_for(x.shape[1])
    if backend == "cart":
        return DecisionTreeClassifier(max_depth=depth, random_state=seed).fit(x, y)
    model = XGBClassifier(n_estimators=n_estimators, max_depth=depth, tree_method="hist", random_state=seed,
                          n_jobs=2, importance_type="gain", eval_metric="mlogloss")
    return model.fit(x, y)


def accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of a fitted tree model."""
    return float((model.predict(x) == y).mean())


def gain_importance(model, n_features: int) -> np.ndarray:
    """Per-feature importance: XGBoost's average "gain" of the feature's splits (Chen & Guestrin's Gain,
    asked for explicitly: Booster.get_score defaults to "weight"); for CART, the impurity decrease.
    Features never split on get 0."""
    if isinstance(model, DecisionTreeClassifier):
        return model.feature_importances_.astype(float)
    scores = model.get_booster().get_score(importance_type="gain")
    out = np.zeros(n_features)
    for key, value in scores.items():
        out[int(key[1:])] = value  # keys are "f0", "f1", ... for numpy input
    return out


def removal_orders(importance: np.ndarray) -> dict[str, np.ndarray]:
    """Best case removes the least important feature first, worst case the most important (Fig. 4)."""
    best = np.argsort(importance, kind="stable")
    return {"best": best, "worst": best[::-1].copy()}


def pruning_curve(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  order: np.ndarray, steps: int = 10, seed: int = 0, backend: str = "xgboost",
                  n_estimators: int = 1, max_depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Remove features in ``order``, refit a tree on the rest at each step (depth ``max_depth``, or by the
    rule on what is left when None); return the fractions removed and the test accuracies."""
    n = x_train.shape[1]
    removed = np.unique(np.linspace(0, n - 1, min(steps, n)).round().astype(int))
    accs = []
    for k in removed:
        keep = np.sort(order[k:])
        model = fit_trees(x_train[:, keep], y_train, n_estimators, max_depth, seed, backend)
        accs.append(accuracy(model, x_test[:, keep], y_test))
    return removed / n, np.array(accs)


def top_map_counts(scores: np.ndarray, labels: np.ndarray, num_classes: int, rank: int = 0) -> np.ndarray:
    """counts[m, c]: images of class c whose ``rank``-th highest score is on map m (paper 000, Fig. 2)."""
    winner = np.argsort(-scores, axis=1, kind="stable")[:, rank]
    counts = np.zeros((scores.shape[1], num_classes), dtype=int)
    np.add.at(counts, (winner, labels), 1)
    return counts


def layer_study(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                n_estimators: int = 500, steps: int = 10, seed: int = 0, backend: str = "xgboost",
                max_depth: int | None = None) -> dict:
    """Paper 000 on one layer's filter scores: single-tree and XGBoost test accuracy (Table 1), the
    XGBoost gain per filter (Fig. 3), and best- and worst-case pruning curves of a single tree (Fig. 4).
    Trees have depth ``max_depth``, or the paper's rule round(log2 n) when None."""
    single = fit_trees(x_train, y_train, 1, max_depth, seed, backend)
    boosted = fit_trees(x_train, y_train, n_estimators, max_depth, seed)
    gain = gain_importance(boosted, x_train.shape[1])
    curves = {case: pruning_curve(x_train, y_train, x_test, y_test, order, steps, seed, backend, 1, max_depth)
              for case, order in removal_orders(gain).items()}
    return {"depth": max_depth or depth_for(x_train.shape[1]), "single_acc": accuracy(single, x_test, y_test),
            "boosted_acc": accuracy(boosted, x_test, y_test), "gain": gain, "curves": curves}
