"""Chapter 1 (paper 000): decision trees on LeNet5's filter scores, over several LeNet5 seeds.

Three studies, each a function returning a small result object that the notebook displays and glues:

- :func:`tree_study`: Table 1 (a single tree in both readings of :data:`trees.READINGS`, and XGBoost),
  Figs. 1-4 (maps, class histograms, each tree's own gain per filter, best- and worst-case pruning);
- :func:`aggregation_study`: the paper's future work on other aggregations than the mean (max, top-k mean);
- :func:`cnn_pruning`: the paper's other future work, the CNN rebuilt without the pruned filters, ranked by
  tree gain (the registered criterion ``gain``), by L1 and by random rankings (the null), at the same
  target fractions in every layer, before and after the same fine-tuning, on the same test images.

:func:`claim_results` decides the claims declared in :mod:`pruning_utils.claims` (keys ``dt-*``).
Everything measured is kept per test image (0/1 correctness), so that every comparison is paired on the
same images: with several seeds an estimate is the t interval over the seeds' means; with one seed it is
the interval over the test images of that seed (:func:`estimate`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import activations, baselines, criteria, models, plots, prune, reference, train, trees
from .claims import Estimate
from .progress import bar

LAYERS = tuple(models.LENET5_LAYERS)  # conv1, conv2, conv3: paper 000's names, in network order
AGGREGATIONS = ("mean", "max", "topk")
STYLE = {"best": {"color": "tab:orange", "label": "best case (least important first)"},
         "worst": {"color": "tab:blue", "label": "worst case (most important first)"}}
CNN_STYLE = {"gain": "tab:orange", "L1": "tab:green", "random": "tab:gray"}


def estimate(per_seed: list[np.ndarray]) -> Estimate:
    """A quantity that is a mean over test images, given per seed as per-image values (leading axes, if
    any, are averaged first): the t interval over the seeds' means when there are several seeds, else the
    normal interval over the one seed's test images."""
    vals = [np.asarray(v, float).reshape(-1, np.shape(v)[-1]).mean(0) for v in per_seed]
    if not vals:
        raise ValueError("an estimate needs at least one seed")
    if len(vals) > 1:
        return Estimate.over_seeds([v.mean() for v in vals])
    return Estimate.paired_images(vals[0], np.zeros_like(vals[0]))


def _pm(est: Estimate, fmt: str = ".3f") -> str:
    """'0.912 ± 0.010' (95% interval), or the mean alone where there is no interval."""
    if not est.has_interval:
        return f"{est.mean:{fmt}}"
    return f"{est.mean:{fmt}} ± {(est.hi - est.lo) / 2:{fmt}}"


def _names(layers) -> list[str]:
    """The chapter's layers in network order, whatever order they were given in."""
    return [name for name in LAYERS if name in layers]


# --- the tree study (Table 1, Figs. 1-4) -----------------------------------------------------------------

@dataclass
class Reading:
    """One reading of the paper's single tree at one layer, for one LeNet5: its own gain per filter, its
    per-image test correctness with every filter, and best- and worst-case pruning curves (removals in
    ``removed``; correctness (points, images))."""

    gain: np.ndarray
    correct: np.ndarray
    removed: np.ndarray
    best: np.ndarray
    worst: np.ndarray

    def gap(self) -> np.ndarray:
        """Per image: the mean best-minus-worst gap over the curve (the area between the curves divided by
        the range of fractions removed; Fig. 4)."""
        f = self.removed / len(self.gain)
        return np.trapezoid(self.best.astype(float) - self.worst, f, axis=0) / (f[-1] - f[0])

    def kept(self, share: float) -> np.ndarray | None:
        """Per-image best-case correctness at the fewest removals above ``share`` of the features (None
        when that would remove them all)."""
        k = int(np.floor(share * len(self.gain))) + 1
        hit = np.flatnonzero(self.removed == k)
        return self.best[hit[0]] if hit.size else None


@dataclass
class LayerTrees:
    """The trees of one layer for one LeNet5: XGBoost's per-image correctness and each reading's."""

    layer: str
    n: int
    depth: int
    map_shape: tuple
    boosted: np.ndarray
    single: dict[str, Reading]


@dataclass
class SeedTrees:
    """One LeNet5 seed: the network, its per-image test correctness, the filter scores of the tree's
    training and test images (per aggregation and layer) and the trees of every layer."""

    seed: int
    baseline: baselines.Baseline
    cnn_correct: np.ndarray
    tree_train: object
    scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    layers: dict[str, LayerTrees]

    @property
    def y_train(self) -> np.ndarray:
        return self.tree_train.y.numpy()

    @property
    def y_test(self) -> np.ndarray:
        return self.baseline.test.y.numpy()


def filter_scores(model, x, layers, how: str = "mean", k: int = 5) -> dict[str, np.ndarray]:
    """Per-image, per-filter scores (N, C) at each of paper 000's ``layers`` (conv1..conv3): each map after
    its ReLU reduced to one number by ``how`` (the paper: the mean)."""
    acts = {name: models.LENET5_LAYERS[name][1] for name in layers}
    out = activations.channel_scores(model, x, list(acts.values()), how=how, k=k)
    return {name: out[act].numpy() for name, act in acts.items()}


def layer_trees(x_train, y_train, x_test, y_test, layer: str, map_shape: tuple, P, seed: int) -> LayerTrees:
    """Paper 000 on one layer's filter scores: XGBoost with ``P.n_estimators`` rounds, and for each
    reading of the single tree its own gain and its best- and worst-case pruning curves."""
    n = x_train.shape[1]
    depth = P.tree_depth or trees.depth_for(n)
    # a tree refitted on the features left: the rule on those (None), or the unpruned tree's depth
    refit_depth = P.tree_depth or (depth if P.pruned_depth == "unpruned" else None)
    boosted = trees.fit_boosted(x_train, y_train, P.n_estimators, depth, seed, P.threads)
    removed = trees.removal_steps(n, P.pruning_steps, (reference.DECISION_TREES["kept_removed"],))
    single = {}
    for r in trees.READINGS:
        tree = trees.fit_tree(x_train, y_train, r, depth, seed, P.threads)
        gain = trees.importance(tree, n)
        curves = {case: trees.pruning_curve(x_train, y_train, x_test, y_test, order, removed, r, refit_depth,
                                            seed, P.threads)
                  for case, order in trees.removal_orders(gain).items()}
        single[r] = Reading(gain, trees.correct(tree, x_test, y_test), removed, curves["best"], curves["worst"])
    return LayerTrees(layer, n, depth, map_shape, trees.correct(boosted, x_test, y_test), single)


def seed_trees(P, seed: int) -> SeedTrees:
    """Everything the tree study needs from one LeNet5 seed (chapter 0's cached model)."""
    b = baselines.get("lenet5", P, seed, dataset=P.dataset)
    tree_train = b.train.subset(P.max_images, seed)
    layers = _names(P.layers)
    scores = {}
    for how in AGGREGATIONS:
        tr = filter_scores(b.model, tree_train.x, layers, how, P.topk)
        te = filter_scores(b.model, b.test.x, layers, how, P.topk)
        scores[how] = {name: (tr[name], te[name]) for name in layers}
    acts = {name: models.LENET5_LAYERS[name][1] for name in layers}
    one = activations.channel_scores(b.model, b.test.x[:1], list(acts.values()), keep_maps=True)
    y_train, y_test = tree_train.y.numpy(), b.test.y.numpy()
    per_layer = {}
    for name in layers:
        (x_train, x_test), shape = scores[P.aggregation][name], tuple(one[acts[name]].shape[1:])
        per_layer[name] = layer_trees(x_train, y_train, x_test, y_test, name, shape, P, seed)
    cnn_correct = (train.predict(b.model, b.test.x).argmax(1) == b.test.y).numpy()
    return SeedTrees(seed, b, cnn_correct, tree_train, scores, per_layer)


@dataclass
class TreeStudy:
    """Paper 000's study over every LeNet5 seed of the run (Table 1, Figs. 1-4)."""

    P: object
    runs: list[SeedTrees]

    @property
    def layers(self) -> list[str]:
        return list(self.runs[0].layers)

    def per_seed(self, fn) -> list:
        return [fn(run) for run in self.runs]

    def cnn_accuracy(self) -> Estimate:
        """LeNet5's test accuracy over the seeds."""
        return estimate(self.per_seed(lambda r: r.cnn_correct))

    def single(self, layer: str, reading: str) -> Estimate:
        return estimate(self.per_seed(lambda r: r.layers[layer].single[reading].correct))

    def boosted(self, layer: str) -> Estimate:
        return estimate(self.per_seed(lambda r: r.layers[layer].boosted))

    def gap(self, layer: str, reading: str) -> Estimate:
        """Fig. 4's mean best-minus-worst gap at ``layer`` for ``reading``."""
        return estimate(self.per_seed(lambda r: r.layers[layer].single[reading].gap()))

    def layers_table(self) -> pd.DataFrame:
        """One row per layer: its maps, the number of filters (the trees' features) and the tree depth."""
        run = self.runs[0]
        return pd.DataFrame({name: {"maps (C × H × W)": " × ".join(map(str, t.map_shape)),
                                    "features (filters)": t.n, "tree depth": t.depth}
                             for name, t in run.layers.items()}).T.rename_axis("layer")

    def table1(self):
        """Table 1: each reading of the single tree and XGBoost, ours (mean ± 95% interval over the
        seeds) beside the paper's."""
        ref = reference.DECISION_TREES
        rows = {}
        for name in self.layers:
            rows[name] = {**{f"single: {trees.READING_NAMES[r]}": _pm(self.single(name, r)) for r in trees.READINGS},
                          "single DT (paper)": f"{ref['single'][name]:.4f}",
                          f"XGBoost {self.P.n_estimators}": _pm(self.boosted(name)),
                          f"XGBoost {ref['n_estimators']} (paper)": f"{ref['xgboost'][name]:.4f}"}
        return pd.DataFrame(rows).T.rename_axis("layer").style.set_properties(**{"text-align": "right"})

    def gaps_table(self):
        """Fig. 4's mean best-minus-worst gap per layer and reading (mean ± 95% interval over the seeds)."""
        return pd.DataFrame({name: {trees.READING_NAMES[r]: _pm(self.gap(name, r)) for r in trees.READINGS}
                             for name in self.layers}).T.rename_axis("layer")

    def figure_maps(self):
        """Fig. 1: the maps of the first test digit at each layer (first seed)."""
        run = self.runs[0]
        acts = [models.LENET5_LAYERS[n][1] for n in self.layers]
        maps = activations.channel_scores(run.baseline.model, run.baseline.test.x[:1], acts, keep_maps=True)
        return plots.feature_maps({name: maps[act][0].numpy() for name, act in zip(self.layers, acts)})

    def histogram(self, layer: str):
        """Fig. 2 at ``layer`` (first seed): for each map, the training images of each class whose highest
        score is on it. Returns (figure, maps that are never any image's top map, number of maps)."""
        run = self.runs[0]
        if layer not in run.scores[self.P.aggregation]:
            scores = filter_scores(run.baseline.model, run.tree_train.x, [layer], self.P.aggregation,
                                   self.P.topk)[layer]
        else:
            scores = run.scores[self.P.aggregation][layer][0]
        classes = list(run.baseline.train.classes)
        counts = trees.top_map_counts(scores, run.y_train, len(classes))
        fig = plots.bars_grid({f"map {m}": counts[m] for m in range(len(counts))}, "class", "images",
                              ncols=min(8, len(counts)), ticklabels=classes, panel_size=(1.9, 1.6), sharey=True)
        return fig, int((counts.sum(1) == 0).sum()), len(counts)

    def figure_gain(self):
        """Fig. 3: each single tree's own gain per filter as a share of the layer's total, sorted (bars:
        the mean over seeds of the k-th largest share; dots: each seed)."""
        fig, axes = plots.panel_grid(len(trees.READINGS) * len(self.layers), len(self.layers), (3.6, 2.6))
        for i, r in enumerate(trees.READINGS):
            for j, name in enumerate(self.layers):
                ax = axes[i * len(self.layers) + j]
                shares = np.array([np.sort(_share(run.layers[name].single[r].gain))[::-1] for run in self.runs])
                pos = np.arange(shares.shape[1])
                ax.bar(pos, shares.mean(0), color="tab:orange", alpha=0.6, label="mean over seeds")
                for s in shares:
                    ax.plot(pos, s, ".", color="k", markersize=2)
                ax.set_title(f"{name}, {trees.READING_NAMES[r]}", fontsize="small")
        plots.label_grid(axes, "rank of the filter (most important first)", "share of the tree's gain",
                         len(self.layers), grid=False)
        return fig

    def figure_pruning(self):
        """Fig. 4: accuracy of the single tree refitted on the filters left, features removed in order of
        the tree's own gain; a row per reading. Lines: mean over seeds; dots: each seed."""
        fig, axes = plots.panel_grid(len(trees.READINGS) * len(self.layers), len(self.layers), (3.6, 2.9),
                                     sharey=True)
        for i, r in enumerate(trees.READINGS):
            for j, name in enumerate(self.layers):
                ax = axes[i * len(self.layers) + j]
                for case, style in STYLE.items():
                    f = self.runs[0].layers[name].single[r].removed / self.runs[0].layers[name].n
                    accs = np.array([getattr(run.layers[name].single[r], case).mean(1) for run in self.runs])
                    ax.plot(f, accs.mean(0), marker="o", markersize=3, **style)
                    for a in accs:
                        ax.plot(f, a, ".", color=style["color"], alpha=0.4, markersize=3)
                ax.set_title(f"{name} ({self.runs[0].layers[name].n} features), {trees.READING_NAMES[r]}",
                             fontsize="small")
        plots.label_grid(axes, "fraction of features removed", "test accuracy (fraction correct)",
                         len(self.layers))
        return fig

    def top_share(self, reading: str) -> dict[str, float]:
        """Share of the single tree's gain on its most important tenth of the filters (at least one),
        mean over seeds, per layer."""
        out = {}
        for name in self.layers:
            vals = []
            for run in self.runs:
                s = np.sort(_share(run.layers[name].single[reading].gain))[::-1]
                vals.append(float(s[:max(1, len(s) // 10)].sum()))
            out[name] = float(np.mean(vals))
        return out

    def numbers(self) -> dict:
        """The values the chapter's prose glues in."""
        run = self.runs[0]
        cnn = self.cnn_accuracy()
        out = {"n_seeds": len(self.runs), "seeds_text": ", ".join(str(r.seed) for r in self.runs),
               "n_tree_train": f"{len(run.tree_train):,}", "n_tree_test": f"{len(run.baseline.test):,}",
               "data_name": run.baseline.recipe.dataset, "n_est": self.P.n_estimators,
               "cnn_acc": cnn.mean, "cnn_acc_text": _pm(cnn, ".4f")}
        out["n_cnn_train"] = f"{run.baseline.record['n_train']:,}"
        out |= _unmeasured(["single_xgboost_", "single_cart_", "gap_xgboost_", "gap_cart_", "xgb_", "depth_",
                            "leaves_"])
        for name in self.layers:
            for r in trees.READINGS:
                out[f"single_{r}_{name}"] = self.single(name, r).mean
                out[f"gap_{r}_{name}"] = self.gap(name, r).mean
            out[f"xgb_{name}"] = self.boosted(name).mean
            out[f"depth_{name}"] = run.layers[name].depth
            out[f"leaves_{name}"] = 2 ** run.layers[name].depth
        out["refit_sentence"] = self.refit_sentence()
        for r in trees.READINGS:
            out[f"gain_sentence_{r}"] = "; ".join(f"{100 * v:.0f}% at {k}" for k, v in self.top_share(r).items())
        return out

    def refit_sentence(self) -> str:
        """How deep a tree refitted on fewer features is, in words, for the deepest layer of the run."""
        t = self.runs[0].layers[self.layers[-1]]
        if self.P.tree_depth is not None:
            return f"Every tree has depth {self.P.tree_depth} (parameter tree_depth), whatever is left."
        if self.P.pruned_depth == "unpruned":
            return (f"A refitted tree keeps the depth of the unpruned one ({t.depth} at {t.layer}; parameter "
                    "pruned_depth).")
        left = t.n - (int(np.floor(reference.DECISION_TREES["kept_removed"] * t.n)) + 1)
        d = trees.depth_for(left)
        return (f"A refitted tree is as deep as the rule says for the features left (parameter pruned_depth; "
                f"the paper does not say): on {left} of {t.layer}'s {t.n} features it has depth {d}, so one "
                f"CART tree has at most {2 ** d} leaves for 10 digits.")

    def check(self) -> dict:
        """Key numbers, rounded, for the notebook's nbval cell."""
        return {name: {"xgb": round(self.boosted(name).mean, 3),
                       **{r: round(self.single(name, r).mean, 3) for r in trees.READINGS}} for name in self.layers}


def _by_layer(table: pd.DataFrame) -> pd.DataFrame:
    """A (layer, target fraction) table in network order, the fractions written short (0.25, not 0.250000)."""
    order = [n for n in LAYERS if n in table.index.get_level_values(0)]
    table = table.reindex(order, level=0)
    table.index = pd.MultiIndex.from_tuples([(layer, f"{f:g}") for layer, f in table.index],
                                            names=["layer", "target fraction"])
    return table


def _unmeasured(prefixes, suffixes=("",)) -> dict:
    """NaN for every per-layer number of the prose, so that a run on fewer layers still glues each name."""
    return {f"{p}{name}{s}": float("nan") for p in prefixes for name in LAYERS for s in suffixes}


def _share(gain: np.ndarray) -> np.ndarray:
    total = gain.sum()
    return gain / total if total > 0 else np.zeros_like(gain)


def tree_study(P) -> TreeStudy:
    """Paper 000 on every LeNet5 seed in ``P.seeds`` (chapter 1's parameters)."""
    return TreeStudy(P, [seed_trees(P, s) for s in bar(P.seeds, desc="trees, per LeNet5 seed", leave=False)])


# --- beyond the paper 1: other aggregations ---------------------------------------------------------------

@dataclass
class Aggregations:
    """Per seed, aggregation and layer: per-image correctness of the single trees (both readings) and of
    XGBoost with ``P.compare_estimators`` rounds on filter scores aggregated that way."""

    P: object
    correct: list[dict[str, dict[str, dict[str, np.ndarray]]]]  # seed -> how -> layer -> model -> (images,)

    @property
    def layers(self) -> list[str]:
        return list(self.correct[0]["mean"]) if self.correct else []

    def models(self) -> list[str]:
        return [trees.READING_NAMES[r] for r in trees.READINGS] + [f"XGBoost {self.P.compare_estimators}"]

    def accuracy(self, how: str, layer: str, model: str) -> Estimate:
        return estimate([c[how][layer][model] for c in self.correct])

    def difference(self, layer: str, model: str, how: str = "topk", base: str = "mean") -> Estimate:
        """Accuracy on ``how`` scores minus on ``base`` scores, paired on the test images."""
        return estimate([c[how][layer][model].astype(float) - c[base][layer][model] for c in self.correct])

    def table(self):
        """Accuracy by aggregation (columns) for each layer and model (rows), mean ± 95% interval."""
        label = {"mean": "mean", "max": "max", "topk": f"top-{self.P.topk} mean"}
        rows = {(layer, m): {label[h]: _pm(self.accuracy(h, layer, m)) for h in AGGREGATIONS}
                for layer in self.layers for m in self.models()}
        if not rows:
            return pd.DataFrame(columns=[label[h] for h in AGGREGATIONS])  # no layer with maps over 1x1
        return pd.DataFrame(rows).T.rename_axis(["layer", "model"])

    def numbers(self) -> dict:
        m = self.models()[-1]
        return {"cmp_est": self.P.compare_estimators, **_unmeasured(["agg_topk_", "agg_max_"]),
                **{f"agg_topk_{layer}": self.difference(layer, m).mean for layer in self.layers},
                **{f"agg_max_{layer}": self.difference(layer, m, "max").mean for layer in self.layers}}


def aggregation_study(P, study: TreeStudy) -> Aggregations:
    """Single trees and XGBoost (``P.compare_estimators`` rounds) on mean, max and top-k-mean scores of the
    same images, for each seed and each layer whose maps are larger than 1×1 (conv3's are 1×1, where the
    three are one number). The single trees on ``P.aggregation`` scores are the tree study's own."""
    layers = [name for name in study.layers if np.prod(study.runs[0].layers[name].map_shape[1:]) > 1]
    out = []
    for run in study.runs:
        per_how = {}
        for how in AGGREGATIONS:
            per_layer = {}
            for name in layers:
                (xtr, xte), ytr, yte = run.scores[how][name], run.y_train, run.y_test
                fitted = {}
                for r in trees.READINGS:
                    if how == P.aggregation:
                        fitted[trees.READING_NAMES[r]] = run.layers[name].single[r].correct
                    else:
                        tree = trees.fit_tree(xtr, ytr, r, P.tree_depth, run.seed, P.threads)
                        fitted[trees.READING_NAMES[r]] = trees.correct(tree, xte, yte)
                boosted = trees.fit_boosted(xtr, ytr, P.compare_estimators, P.tree_depth, run.seed, P.threads)
                fitted[f"XGBoost {P.compare_estimators}"] = trees.correct(boosted, xte, yte)
                per_layer[name] = fitted
            per_how[how] = per_layer
        out.append(per_how)
    return Aggregations(P, out)


# --- beyond the paper 2: pruning the CNN itself ------------------------------------------------------------

class _Recorder:
    """An ``evaluate`` for :func:`prune.sweep` that returns the accuracy and keeps each image's correctness,
    in call order."""

    def __init__(self, test):
        self.test, self.correct = test, []

    def __call__(self, model) -> float:
        c = (train.predict(model, self.test.x).argmax(1) == self.test.y).numpy()
        self.correct.append(c)
        return float(c.mean())


@dataclass
class CNNPruning:
    """The sweep's rows (one per LeNet5 seed, layer, criterion, random seed and target fraction) and each
    row's per-image correctness before (``correct``) and after (``correct_ft``) fine-tuning."""

    P: object
    rows: pd.DataFrame
    correct: list[np.ndarray]
    correct_ft: list[np.ndarray] | None
    unpruned: dict[int, np.ndarray] = field(default_factory=dict)
    base_cost: tuple[int, int] = (0, 0)
    n_finetune: int = 0

    @property
    def layers(self) -> list[str]:
        return _names(self.rows["layer"].unique())

    @property
    def finetuned(self) -> bool:
        return self.correct_ft is not None

    def _stack(self, net_seed, layer, criterion, finetuned, fractions) -> np.ndarray:
        """Correctness (rankings, fractions, images) of one criterion (random: every random ranking)."""
        rows = self.rows
        sel = rows[(rows.net_seed == net_seed) & (rows.layer == layer) & (rows.criterion == criterion)
                   & rows.target_fraction.isin(fractions)]
        source = self.correct_ft if finetuned else self.correct
        by_ranking = [np.stack([source[i] for i in part.sort_values("target_fraction").index])
                      for _, part in sel.groupby(sel["seed"].fillna(-1), sort=True)]
        return np.stack(by_ranking)

    def difference(self, layer: str, other: str, finetuned: bool = False) -> Estimate | None:
        """Accuracy after pruning ``layer`` by gain minus by ``other`` ('L1' or 'random', the mean over the
        random rankings), averaged over the target fractions above 0, paired on each seed's test images.
        None when no target fraction above 0 was run."""
        fractions = sorted(f for f in self.rows.target_fraction.unique() if f > 0)
        if not fractions:
            return None
        per_seed = [self._stack(s, layer, "gain", finetuned, fractions).mean(0)
                    - self._stack(s, layer, other, finetuned, fractions).mean(0)
                    for s in sorted(self.rows.net_seed.unique())]
        return estimate(per_seed)

    def summary(self) -> pd.DataFrame:
        """Mean accuracy over seeds (random: over its rankings first) per layer, target fraction and
        criterion, before and after fine-tuning."""
        acc = ["accuracy"] + (["accuracy_finetuned"] if self.finetuned else [])
        per_seed = self.rows.groupby(["layer", "target_fraction", "criterion", "net_seed"])[acc].mean()
        return per_seed.groupby(["layer", "target_fraction", "criterion"]).mean()

    def table(self):
        """Accuracy by criterion (mean over seeds) per layer and target fraction, straight after pruning and
        after fine-tuning, with the share of the layer's filters k/n that each target really removes."""
        s = self.summary()
        wide = s.unstack("criterion")
        phase = {"accuracy": "straight after pruning", "accuracy_finetuned": "after fine-tuning"}
        wide = wide[[(a, c) for a in phase if a in s for c in CNN_STYLE]]
        wide.columns = pd.MultiIndex.from_tuples([(phase[a], c) for a, c in wide.columns])
        real = self.rows.groupby(["layer", "target_fraction"])["fraction"].first()
        wide.insert(0, ("removed", "k/n"), real.reindex(wide.index))
        return _by_layer(wide).style.format("{:.3f}")

    def cost_table(self):
        """Parameters and multiply-accumulates per image of the pruned LeNet5 (the same for every
        criterion), as shares of the unpruned network's."""
        first = self.rows[(self.rows.net_seed == self.rows.net_seed.min()) & (self.rows.criterion == "gain")]
        t = first.set_index(["layer", "target_fraction"])[["removed", "params", "macs"]].copy()
        t["parameters (share)"] = t.pop("params") / self.base_cost[1]
        t["MACs (share)"] = t.pop("macs") / self.base_cost[0]
        t = t.rename(columns={"removed": "filters removed"})
        return _by_layer(t).style.format({"parameters (share)": "{:.3f}", "MACs (share)": "{:.3f}"})

    def figure(self):
        """Accuracy against the target fraction removed, a column per layer; top row straight after
        pruning, bottom row after fine-tuning. Lines: mean over seeds; dots: each seed."""
        phases = [("accuracy", "straight after pruning")]
        if self.finetuned:
            phases.append(("accuracy_finetuned", "after fine-tuning"))
        fig, axes = plots.panel_grid(len(phases) * len(self.layers), len(self.layers), (3.6, 2.9), sharey=True)
        per_seed = self.rows.groupby(["layer", "criterion", "net_seed", "target_fraction"]).mean(numeric_only=True)
        base = float(np.mean([c.mean() for c in self.unpruned.values()]))
        for i, (col, title) in enumerate(phases):
            for j, layer in enumerate(self.layers):
                ax = axes[i * len(self.layers) + j]
                for crit, colour in CNN_STYLE.items():
                    part = per_seed.loc[(layer, crit)][col].unstack("target_fraction")
                    ax.plot(part.columns, part.mean(axis=0), marker="o", markersize=3, color=colour, label=crit)
                    for _, row in part.iterrows():
                        ax.plot(part.columns, row, ".", color=colour, alpha=0.4, markersize=3)
                ax.axhline(base, color="k", linestyle=":", linewidth=1, label="unpruned")
                ax.set_title(f"{layer}, {title}", fontsize="small")
        plots.label_grid(axes, "target fraction of the layer's filters removed", "CNN test accuracy (fraction)",
                         len(self.layers))
        return fig

    def numbers(self) -> dict:
        out = {"n_random": self.P.random_rankings, "ft_epochs": self.P.finetune_epochs,
               "ft_images": f"{self.n_finetune:,}", "base_params": f"{self.base_cost[1]:,}",
               "base_macs": f"{self.base_cost[0]:,}"}
        out |= _unmeasured([f"cnn_{o}_" for o in ("L1", "random")], ("", "_ft"))
        for layer in self.layers:
            for other in ("L1", "random"):
                for ft in ((False, True) if self.finetuned else (False,)):
                    d = self.difference(layer, other, ft)
                    out[f"cnn_{other}_{layer}{'_ft' if ft else ''}"] = d.mean if d is not None else float("nan")
        return out


def cnn_pruning(P, study: TreeStudy) -> CNNPruning:
    """Remove a target fraction of one layer's filters from each seed's LeNet5 (torch-pruning), ranked by
    the gain of ``P.gain_tree``'s single tree (criterion ``gain``, on the tree study's training images),
    by L1 and by ``P.random_rankings`` random rankings; evaluate, fine-tune the same way, evaluate again."""
    rows, correct, correct_ft, unpruned = [], [], [], {}
    base_cost, n_ft = (0, 0), 0
    for run in bar(study.runs, desc="pruning the CNN, per LeNet5 seed", leave=False):
        b = run.baseline
        ft_split = b.train.subset(P.finetune_images, run.seed)
        n_ft = len(ft_split)
        finetune = prune.finetuner(ft_split, P.finetune_epochs, run.seed, device=P.device)
        example = b.test.x[:1]
        base_cost = prune.macs_and_params(b.model, example)
        unpruned[run.seed] = run.cnn_correct
        data = criteria.Data(run.tree_train.x, run.tree_train.y)
        for layer in study.layers:
            conv, act = models.LENET5_LAYERS[layer]
            target = criteria.Target(conv, act)
            gain = criteria.score("gain", b.model, target, data, reading=P.gain_tree, max_depth=P.tree_depth,
                                  aggregation=P.aggregation, topk=P.topk, seed=run.seed, threads=P.threads)
            orders = {"gain": criteria.ranking(gain), "L1": criteria.ranking(criteria.score("l1", b.model, target))}
            recorder = _Recorder(b.test)
            swept = prune.sweep(b.model, conv, orders, P.cnn_fractions, example, recorder, finetune,
                                progress=False, random_seeds=range(P.random_rankings))
            calls = iter(recorder.correct)
            for row in swept:
                correct.append(next(calls))
                if finetune is not None:
                    correct_ft.append(next(calls))
                rows.append({**row, "layer": layer, "net_seed": run.seed})
    return CNNPruning(P, pd.DataFrame(rows), correct, correct_ft if P.finetune_epochs else None, unpruned,
                      base_cost, n_ft)


# --- the claims ------------------------------------------------------------------------------------------

def claim_results(P, study: TreeStudy, aggs: Aggregations, cnn: CNNPruning) -> list:
    """Every claim of chapter 1 decided by its declared rule (keys ``dt-*`` in :mod:`pruning_utils.claims`)."""
    from . import claims

    ref = reference.DECISION_TREES
    layers = study.layers
    seeds = (f"{len(study.runs)} LeNet5 seeds" if len(study.runs) > 1
             else "one LeNet5 seed: the interval covers its test images only")
    data_note = f"our LeNet5 trains on {study.runs[0].baseline.record['n_train']:,} digits, the paper's on 60,000"
    out = [claims.decide("dt-lenet5", study.cnn_accuracy(), f"{seeds}; {data_note}", fmt=".4f")]

    def per_layer(fn):
        return {name: estimate(study.per_seed(lambda run, name=name: fn(run, name))) for name in layers}

    for r in trees.READINGS:
        out.append(claims.decide(f"dt-table1-{r}", per_layer(
            lambda run, n, r=r: run.layers[n].single[r].correct - ref["single"][n]), seeds))
    out.append(claims.decide("dt-table1-boosted", per_layer(lambda run, n: run.layers[n].boosted - ref["xgboost"][n]),
                             f"{seeds}; {P.n_estimators} rounds"))
    for r in trees.READINGS:
        out.append(claims.decide(f"dt-margin-{r}", per_layer(
            lambda run, n, r=r: (run.layers[n].boosted.astype(float) - run.layers[n].single[r].correct)
            / (ref["xgboost"][n] - ref["single"][n])), f"{seeds}; 1 = the paper's gap"))
    out.append(_depth_claim(study, seeds))
    out += [_fig4_claim(study, r, seeds) for r in trees.READINGS]
    out += [_kept_claim(study, r, seeds) for r in trees.READINGS]
    out.append(_aggregation_claim(aggs, seeds))
    for key, other in (("dt-cnn-random", "random"), ("dt-cnn-l1", "L1")):
        parts = {}
        for layer in cnn.layers:
            for ft in ((False, True) if cnn.finetuned else (False,)):
                d = cnn.difference(layer, other, ft)
                if d is not None:
                    parts[f"{layer}, {'fine-tuned' if ft else 'no fine-tuning'}"] = d
        why = (f"{seeds}; gain of {trees.READING_NAMES[P.gain_tree]}; target fractions "
               f"{', '.join(f'{f:g}' for f in P.cnn_fractions)}")
        out.append(claims.decide(key, parts or None, why if parts else "no target fraction above 0 was run"))
    return out


def _depth_claim(study: TreeStudy, note: str):
    from . import claims

    layers = study.layers
    if len(layers) < 2:
        return claims.untestable("dt-depth", "needs at least two layers (parameter layers)")
    models_ = {f"XGBoost {study.P.n_estimators}": lambda run, n: run.layers[n].boosted}
    models_ |= {trees.READING_NAMES[r]: (lambda run, n, r=r: run.layers[n].single[r].correct) for r in trees.READINGS}
    parts = {}
    for label, get in models_.items():
        for lo, hi in zip(layers, layers[1:]):
            parts[f"{label}: {lo} → {hi}"] = estimate(study.per_seed(
                lambda run, lo=lo, hi=hi, get=get: get(run, hi).astype(float) - get(run, lo)))
    return claims.decide("dt-depth", parts, note)


def _fig4_claim(study: TreeStudy, reading: str, note: str):
    from . import claims

    key = f"dt-fig4-{reading}"
    if list(study.layers) != list(LAYERS):
        return claims.untestable(key, "needs all three layers (parameter layers)")

    def gap(run, n):
        return run.layers[n].single[reading].gap()

    parts = {
        "conv1": estimate(study.per_seed(lambda run: claims.DT_NO_GAP - gap(run, "conv1"))),
        "conv2": estimate(study.per_seed(lambda run: claims.DT_MARGINAL * gap(run, "conv3") - gap(run, "conv2"))),
        "conv3": estimate(study.per_seed(lambda run: gap(run, "conv3") - claims.DT_DRASTIC)),
    }
    gaps = ", ".join(f"{n} {study.gap(n, reading).mean:.3f}" for n in LAYERS)
    return claims.decide(key, parts, f"{note}; the gaps themselves: {gaps}")


def _kept_claim(study: TreeStudy, reading: str, note: str):
    from . import claims

    ref = reference.DECISION_TREES
    key, layer = f"dt-kept-{reading}", ref["kept_layer"]
    if layer not in study.layers:
        return claims.untestable(key, f"needs {layer} (parameter layers)")
    per_seed = study.per_seed(lambda run: run.layers[layer].single[reading].kept(ref["kept_removed"]))
    n = study.runs[0].layers[layer].n
    k = int(np.floor(ref["kept_removed"] * n)) + 1
    return claims.decide(key, estimate(per_seed), f"{note}; {k} of {n} features removed ({100 * k / n:.1f}%)")


def _aggregation_claim(aggs: Aggregations, note: str):
    from . import claims

    layers = aggs.layers  # those with maps larger than 1x1: at conv3 every aggregation is the same number
    if not layers:
        return claims.untestable("dt-aggregation", "needs conv1 or conv2 (parameter layers)")
    model = aggs.models()[-1]
    parts = {f"{n}: top-{aggs.P.topk} mean - mean": aggs.difference(n, model) for n in layers}
    return claims.decide("dt-aggregation", parts, f"{note}; {model}")


def sentences(results) -> dict[str, str]:
    """Sentences for the prose that depend on the verdicts (glued, never typed): which layers each reading of
    the single tree reproduces within the tolerance of Table 1, and whether any reading reproduces all."""
    from .claims import DT_TABLE1_TOLERANCE, Verdict

    by_key = {r.claim.key: r for r in results}
    parts, whole, n = [], [], 0
    for r in trees.READINGS:
        res = by_key.get(f"dt-table1-{r}")
        if res is None or not res.part_verdicts:
            continue
        n = len(res.part_verdicts)
        by = {v: [layer for layer, w in res.part_verdicts.items() if w is v] for v in Verdict}
        words = [f"within {DT_TABLE1_TOLERANCE} of the paper at {', '.join(by[Verdict.HOLDS])}"
                 if by[Verdict.HOLDS] else "",
                 f"more than {DT_TABLE1_TOLERANCE} away at {', '.join(by[Verdict.DOES_NOT_HOLD])}"
                 if by[Verdict.DOES_NOT_HOLD] else "",
                 f"undecided at {', '.join(by[Verdict.INCONCLUSIVE])}" if by[Verdict.INCONCLUSIVE] else ""]
        parts.append(f"{trees.READING_NAMES[r]} is " + ", ".join(w for w in words if w))
        if res.verdict is Verdict.HOLDS:
            whole.append(trees.READING_NAMES[r])
    if not parts:
        return {"table1_sentence": "This run cannot compare the single tree with Table 1."}
    which = "all three" if n == 3 else f"the {n} measured here" if n > 1 else "the one measured here"
    if whole:
        ending = f"{_cap(' and '.join(whole))} reproduces {which} of the paper's single-tree numbers."
    elif all(by_key[f"dt-table1-{r}"].verdict is Verdict.DOES_NOT_HOLD for r in trees.READINGS):
        ending = f"No reading reproduces {which} of the paper's single-tree numbers."
    else:
        ending = f"Whether a reading reproduces {which} of the paper's single-tree numbers, this run cannot tell."
    return {"table1_sentence": _cap("; ".join(parts)) + ". " + ending}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def parts_table(results) -> pd.DataFrame:
    """One row per part of each claim made of parts (a layer, a reading, fine-tuning or not): our estimate
    and the part's own verdict, which the claims table folds into one."""
    rows = [{"claim": r.claim.key, "part": name, "ours": e.text(r.fmt), "verdict": r.part_verdicts[name].value}
            for r in results for name, e in r.parts.items()]
    return pd.DataFrame(rows, columns=["claim", "part", "ours", "verdict"]).set_index(["claim", "part"])
