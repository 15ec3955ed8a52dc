"""Network dissection (Bau et al. 2017) of one layer's units, as paper 001 applies it, and chapter 2's study.

For unit k: the threshold T_k with P(a_k > T_k) = q (q = 0.005) over every position of every image's raw
activation map; each map upsampled (bilinear) to the label-mask size and binarised, M_k = a_k > T_k;
IoU(k, c) = sum |M_k ∩ L_c| / sum |M_k ∪ L_c|, both sums over the images that carry labels of c's
category. A unit is interpretable when its best IoU exceeds a cut-off (0.04 in the public NetDissect
code, 0.05 in paper 001's text).

The second half runs chapter 2: iterative magnitude pruning of a CIFAR ResNet on the synthetic scenes
(:mod:`pruning_utils.imp`, :mod:`pruning_utils.broden`), the random-init null of every network, the
decision setting (q, cut-off) chosen on held-out scenes before any pruned level is dissected, the
dissection of every level at the paper's setting and the chosen one, the claims and the figures.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from . import activations, broden, plots
from .broden import ConceptSet
from .params import ParameterError
from .progress import bar

CUTOFFS = {"code": 0.04, "paper": 0.05}


def layer_features(model: nn.Module, layer: str, images: torch.Tensor, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """The activation maps a_k (N, C, h, w) of ``layer`` for all ``images``."""
    return activations.channel_scores(model, images, [layer], batch_size=batch_size, device=device,
                                      keep_maps=True)[layer]


def _check_quantile(quantile) -> None:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0.0 < quantile < 1.0:
        raise ParameterError(f"quantile={quantile!r} is not allowed; expected a float in (0, 1)")


def unit_thresholds(features: torch.Tensor, quantile: float = 0.005) -> torch.Tensor:
    """T_k with P(a_k > T_k) = ``quantile`` over all positions of all images (N, C, h, w): numpy's
    default (linear) quantile of level 1 - ``quantile`` of each unit's values."""
    _check_quantile(quantile)
    if features.ndim != 4:
        raise ParameterError(f"features of shape {tuple(features.shape)} is not allowed; expected (N, C, h, w)")
    flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
    n = flat.shape[1]
    pos = (1.0 - quantile) * (n - 1)
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    hi = min(lo + 1, n - 1)
    top = flat.topk(n - lo, dim=1).values  # descending: ascending position i is top[:, n - 1 - i]
    return (top[:, n - 1 - lo] + (top[:, n - 1 - hi] - top[:, n - 1 - lo]) * frac).float()


def unit_masks(features: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """M_k: maps (N, C, h, w) upsampled bilinearly to ``size`` and binarised at T_k (C values), (N, C, *size)."""
    up = F.interpolate(features.float(), size=size, mode="bilinear", align_corners=False)
    return up > thresholds.view(1, -1, 1, 1)


def _accumulate(features: torch.Tensor, concepts: ConceptSet, thresholds: torch.Tensor, batch_size: int,
                progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over the data set: |M_k ∩ L_c| (C, labels) and |M_k| over the images of each category (C, G).

    Bilinear upsampling gives convex combinations of the raw values, so a map whose maximum is at most
    T_k has an empty mask: only the (image, unit) pairs with max a_k > T_k are upsampled."""
    n, c = features.shape[:2]
    if len(concepts) != n:
        raise ParameterError(f"features of {n} images do not match a concept set of {len(concepts)} images")
    n_labels = len(concepts.label_category)
    size = tuple(concepts.masks.shape[-2:])
    inter = torch.zeros(c * n_labels, dtype=torch.float64)
    unit_area = torch.zeros(c, len(concepts.categories), dtype=torch.float64)
    for i in bar(range(0, n, batch_size), desc="dissection", disable=not progress, leave=False):
        feats = features[i:i + batch_size]
        image, unit = (feats.flatten(2).amax(2) > thresholds.view(1, -1)).nonzero(as_tuple=True)
        if len(image) == 0:
            continue
        up = F.interpolate(feats[image, unit].unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
        m = up[:, 0] > thresholds[unit].view(-1, 1, 1)  # M_k of each pair, (pairs, S, S)
        has = concepts.has_category[i:i + batch_size].double()
        unit_area.index_add_(0, unit, m.sum((1, 2)).double().unsqueeze(1) * has[image])
        pair, y, x = m.nonzero(as_tuple=True)
        masks = concepts.masks[i:i + batch_size]
        for d in range(masks.shape[1]):
            labels = masks[image[pair], d, y, x]
            inter += torch.bincount(unit[pair] * n_labels + labels, minlength=c * n_labels).double()
    return inter.view(c, n_labels), unit_area


def _iou(inter: torch.Tensor, unit_area: torch.Tensor, concepts: ConceptSet) -> torch.Tensor:
    label_area = torch.bincount(concepts.masks.reshape(-1), minlength=len(concepts.label_category)).double()
    category = torch.as_tensor(concepts.label_category)
    union = unit_area[:, category.clamp(min=0)] + label_area - inter
    valid = (category >= 0).unsqueeze(0) & (union > 0)
    return torch.where(valid, inter / union.clamp(min=1e-12), torch.zeros(())).float()


def iou_matrix(features: torch.Tensor, concepts: ConceptSet, thresholds: torch.Tensor,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """IoU(k, c) for every unit k and label number c, (C, number of labels); 0 for label 0 and for labels
    outside the data set's categories. A label repeated in two layers of one pixel would count twice."""
    inter, unit_area = _accumulate(features, concepts, thresholds, batch_size, progress)
    return _iou(inter, unit_area, concepts)


def category_pixels(concepts: ConceptSet) -> np.ndarray:
    """Pixels of the images that carry each category's labels (G,): the denominator of every coverage."""
    side = concepts.masks.shape[-1] * concepts.masks.shape[-2]
    return concepts.has_category.sum(0).double().numpy() * side


@dataclass(frozen=True)
class Dissection:
    """The result of dissecting one layer: IoU (C, labels), thresholds T_k, the label vocabulary, each
    unit's measured mask coverage (C, G: the share of the pixels of category g's images inside M_k) and
    whether the unit is alive (its map is not one constant over every image and position)."""

    iou: np.ndarray
    thresholds: np.ndarray
    names: tuple[str, ...]
    label_category: np.ndarray
    categories: tuple[str, ...]
    coverage: np.ndarray
    alive: np.ndarray


def dissect(features: torch.Tensor, concepts: ConceptSet, quantile: float = 0.005,
            batch_size: int = 64, progress: bool = False) -> Dissection:
    """Dissect the units whose maps are ``features`` (N, C, h, w) on ``concepts`` (same N images)."""
    thresholds = unit_thresholds(features, quantile)
    inter, unit_area = _accumulate(features, concepts, thresholds, batch_size, progress)
    iou = _iou(inter, unit_area, concepts)
    coverage = unit_area.numpy() / np.maximum(category_pixels(concepts), 1.0)[None, :]
    flat = features.transpose(0, 1).reshape(features.shape[1], -1)
    alive = (flat.amax(1) > flat.amin(1)).numpy()
    return Dissection(iou.numpy(), thresholds.numpy(), concepts.names, np.asarray(concepts.label_category),
                      concepts.categories, coverage, alive)


def units_table(result: Dissection, cutoff: float = 0.04) -> pd.DataFrame:
    """Per unit: its best concept, that concept's category, its IoU, whether IoU > ``cutoff``, and whether
    the unit is alive (a constant unit, e.g. a pruned filter's, is never interpretable)."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0.0 <= cutoff < 1.0:
        raise ParameterError(f"cutoff={cutoff!r} is not allowed; expected a float in [0, 1)")
    best = result.iou.argmax(1)
    iou = result.iou[np.arange(len(best)), best]
    return pd.DataFrame({"unit": np.arange(len(best)), "concept": [result.names[b] for b in best],
                         "category": [result.categories[result.label_category[b]] if iou[i] > 0 else "-"
                                      for i, b in enumerate(best)],
                         "iou": iou, "interpretable": iou > cutoff, "alive": result.alive}).set_index("unit")


def summary(table: pd.DataFrame, categories: tuple[str, ...]) -> dict:
    """Interpretable units, distinct concepts among them, and both per category (Figs. 2 and 3), with the
    count of alive units."""
    good = table[table["interpretable"]]
    out = {"units": int(len(good)), "concepts": int(good["concept"].nunique()),
           "alive": int(table["alive"].sum()) if "alive" in table else int(len(table))}
    for cat in categories:
        part = good[good["category"] == cat]
        out[f"units/{cat}"] = int(len(part))
        out[f"concepts/{cat}"] = int(part["concept"].nunique())
    return out


def iou_bound(concepts: ConceptSet, mask_coverage) -> pd.DataFrame:
    """Per concept c present: its category, its coverage c (the share of the pixels of the images that
    carry c's category), and the largest IoU any unit can reach with it, max over units k of
    min(m_k, c) / max(m_k, c), where m_k is unit k's measured mask coverage of that category
    (``mask_coverage``: (units, G), (G,) or one number for every unit and category). Since
    |M ∩ L| <= min(|M|, |L|) and |M ∪ L| >= max(|M|, |L|), no unit can pass a cut-off above this bound,
    whatever it detects. Upsampling thins a mask, so m_k is smaller than q: the bound from q overstates."""
    n_cat = len(concepts.categories)
    m = np.asarray(mask_coverage, dtype=float)
    m = np.full((1, n_cat), float(m)) if m.ndim == 0 else m.reshape(1, -1) if m.ndim == 1 else m
    if m.ndim != 2 or m.shape[1] != n_cat or not np.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise ParameterError(f"mask_coverage of shape {np.shape(mask_coverage)} is not allowed; expected "
                             f"shares in [0, 1] of shape (units, {n_cat}), ({n_cat},) or one number")
    area = torch.bincount(concepts.masks.reshape(-1), minlength=len(concepts.label_category)).double().numpy()
    pixels = category_pixels(concepts)
    rows = {}
    for label, g in enumerate(concepts.label_category):
        if g >= 0 and area[label] > 0:
            cover = area[label] / pixels[g]
            ratio = np.minimum(m[:, g], cover) / np.maximum(m[:, g], cover)
            k = int(ratio.argmax())
            rows[concepts.names[label]] = {"category": concepts.categories[g], "coverage": cover,
                                           "mask_coverage": float(m[k, g]), "max_iou": float(ratio[k])}
    return pd.DataFrame.from_dict(rows, orient="index")


def last_block(model: nn.Module) -> str:
    """The name of a ResNet's last residual block, the layer paper 001 dissects: ``layer3.k`` of a CIFAR
    ResNet, ``layer4.2`` of torchvision's ResNet-50 (the last ``layerN`` stage's last child)."""
    stages = [name for name, m in model.named_children() if name.startswith("layer") and isinstance(m, nn.Sequential)]
    if not stages:
        raise ParameterError(f"model={type(model).__name__} is not allowed; expected a ResNet with layerN stages")
    return f"{stages[-1]}.{len(getattr(model, stages[-1])) - 1}"


def consistency(original: pd.DataFrame, pruned: pd.DataFrame) -> tuple[float, float]:
    """Fig. 4: of the units interpretable in ``original``, the share still interpretable in ``pruned``;
    of the units interpretable in both, the share with the same concept (nan where nothing to count)."""
    before = original["interpretable"].to_numpy()
    both = before & pruned["interpretable"].to_numpy()
    still = both.sum() / before.sum() if before.any() else float("nan")
    same = ((original["concept"].to_numpy() == pruned["concept"].to_numpy()) & both).sum()
    return float(still), float(same / both.sum()) if both.any() else float("nan")


def top_images(features: torch.Tensor, unit: int, k: int = 6) -> torch.Tensor:
    """Indices of the ``k`` images whose maximum activation of ``unit`` is highest."""
    return features[:, unit].flatten(1).amax(1).topk(min(k, len(features))).indices


def top_images_grid(images: torch.Tensor, features: torch.Tensor, thresholds: torch.Tensor, units: list[int],
                    table: pd.DataFrame, k: int = 6) -> Figure:
    """A row per unit: its top-activating images, dimmed outside the unit's mask M_k = a_k > T_k (as in
    NetDissect's reports), titled with the unit's best concept and IoU from its units ``table``."""
    fig = plots.new_figure(1.25 * k, 1.45 * len(units))
    axes = fig.subplots(len(units), k, squeeze=False)
    thresholds = torch.as_tensor(thresholds)
    for r, unit in enumerate(units):
        idx = top_images(features, unit, k)
        mask = unit_masks(features[idx][:, [unit]], thresholds[[unit]], tuple(images.shape[-2:]))[:, 0]
        for c, (i, m) in enumerate(zip(idx.tolist(), mask)):
            ax = axes[r, c]
            shown = images[i].permute(1, 2, 0).numpy() * (0.3 + 0.7 * m.numpy()[..., None])
            ax.imshow(np.clip(shown, 0, 1), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        row = table.loc[unit]
        axes[r, 0].set_ylabel(f"unit {unit}\n{row['concept']}\nIoU {row['iou']:.2f}", fontsize="x-small")
    return fig


# ----------------------------------------------------------------------------------- chapter 2: the study

TRAIN_THREADS = 1  # threads of every IMP training run: part of each run's cache key (see runtime.py)
REWIND_EPOCHS = 1  # epochs of training before the rewind point W_rewind (open_lth rewinds to an early step)
GRID_UNITS = 4  # units shown with their top-activating scenes
BRODEN_IMAGES = 2000  # images of a real Broden folder dissected for ResNet-50
MAIN = "weights, rewind"  # the paper's pruning: single weights, lottery-ticket rewinding
FILTERS, FINETUNE = "filters, rewind", "weights, fine-tune"  # the paper's future work
VARIANTS = (MAIN, FILTERS, FINETUNE)
PAPER, CHOSEN = "paper", "chosen"  # the paper's (q, cut-off), for the figures; the chosen one, for claims
TRAINED, NULL = "trained", "random init"
HIGHER, LOWER = ("object", "scene"), ("color", "texture")  # Fig. 3's higher- and lower-level categories


def subset(concepts: ConceptSet, index) -> ConceptSet:
    """The images ``index`` of a concept set."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    return replace(concepts, images=concepts.images[idx], masks=concepts.masks[idx],
                   has_category=concepts.has_category[idx])


@dataclass
class Scenes:
    """Chapter 2's data: the synthetic scenes in Broden's layout, the training and test splits of the scene
    task, and the held-out scenes split in two: ``tune`` (where the decision setting is chosen) and
    ``concepts`` (dissected for the figures and the claims)."""

    folder: Path
    data: broden.BrodenData
    train: object
    test: object
    tune: ConceptSet
    concepts: ConceptSet

    def table(self) -> pd.DataFrame:
        """Per category: its concepts, a few of their names, and their mean coverage of the pixels."""
        bound = iou_bound(self.concepts, 0.0)
        rows = {}
        for cat in self.data.categories:
            names = [self.data.names[n] for n in self.data.concepts(cat)]
            rows[cat] = {"concepts": len(names), "examples": ", ".join(names[:4]),
                         "mean coverage": float(bound.loc[bound["category"] == cat, "coverage"].mean())}
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("category")

    def figure(self, n: int = 6) -> Figure:
        """``n`` dissected scenes (titled with their scene label) above their object labels."""
        fig = plots.new_figure(1.5 * n, 3.3)
        axes = fig.subplots(2, n)
        obj, scene = self.data.categories.index("object"), self.data.categories.index("scene")
        for j in range(n):
            axes[0, j].imshow(self.concepts.images[j].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[0, j].set_title(self.data.names[int(self.concepts.masks[j, scene, 0, 0])], fontsize="x-small")
            axes[1, j].imshow(self.concepts.masks[j, obj].numpy(), cmap="tab20", vmin=0, vmax=len(self.data.names),
                              interpolation="nearest")
            for ax in axes[:, j]:
                ax.set_xticks([])
                ax.set_yticks([])
        axes[0, 0].set_ylabel("image", fontsize="small")
        axes[1, 0].set_ylabel("object labels", fontsize="small")
        return fig

    def numbers(self) -> dict:
        return {"n_train": f"{len(self.train):,}", "n_test": f"{len(self.test):,}", "n_tune": f"{len(self.tune):,}",
                "n_dissected": f"{len(self.concepts):,}",
                "n_concepts": int(sum(len(self.data.concepts(c)) for c in self.data.categories))}


def scenes(P) -> Scenes:
    """The scenes of chapter 2's parameters ``P``: ``P.images`` training and ``P.val_images`` held-out
    scenes of ``P.resolution`` pixels generated from ``P.seed``; the first ``P.tune_images`` held-out ones
    choose the setting, the others are dissected."""
    if P.tune_images >= P.val_images - 1:
        raise ParameterError(f"tune_images={P.tune_images!r} is not allowed; it must leave held-out scenes to "
                             f"dissect: expected an int below val_images - 1 = {P.val_images - 1}")
    folder = broden.synthetic(P.images, P.val_images, P.resolution, P.seed)
    data = broden.load(folder)
    held = broden.concept_set(data, "val")
    return Scenes(folder, data, broden.scene_split(data, "train"), broden.scene_split(data, "val"),
                  subset(held, range(P.tune_images)), subset(held, range(P.tune_images, len(held))))


def imp_configs(P) -> dict[str, "imp.IMPConfig"]:
    """The IMP runs of the chapter: the paper's (single weights, rewinding) and, as asked by ``P.structured``
    and ``P.finetune_epochs``, whole filters with rewinding and single weights with standard fine-tuning
    (``P.finetune_epochs`` per round at a tenth of the learning rate). Same rounds and rate for all."""
    from . import imp, train

    recipe = train.TrainConfig(epochs=P.epochs, batch_size=P.batch_size, lr=P.lr, channels_last=True,
                               threads=TRAIN_THREADS)
    base = imp.IMPConfig(rounds=imp.rounds_to_reach(P.target_remaining, P.rate), train=recipe,
                         rewind_epochs=REWIND_EPOCHS, rate=P.rate)
    out = {MAIN: base}
    if P.structured:
        out[FILTERS] = replace(base, structure="filters")
    if P.finetune_epochs > 0:
        tune = replace(recipe, epochs=P.finetune_epochs, lr=P.lr / 10, schedule="none")
        out[FINETUNE] = replace(base, retraining="finetune", finetune=tune)
    return out


@dataclass
class Pruning:
    """Every IMP run of the chapter: per variant, per trial (seed), the levels (level, weights_remaining,
    test_acc, state); and per trial its dense network (init W_0, rewind point, state, test_acc)."""

    seeds: list[int]
    configs: dict
    build: functools.partial
    layer: str
    dense: list[dict]
    runs: dict[str, list[list[dict]]]

    def frame(self) -> pd.DataFrame:
        """One row per variant, trial and level: seed, weights remaining, test accuracy."""
        return pd.DataFrame([{"variant": v, "trial": t, "seed": self.seeds[t], "level": lv["level"],
                              "weights_remaining": lv["weights_remaining"], "test_acc": lv["test_acc"]}
                             for v, trials in self.runs.items() for t, levels in enumerate(trials)
                             for lv in levels])

    def dense_table(self) -> pd.DataFrame:
        """Test accuracy of each trial's dense network."""
        return pd.DataFrame({"seed": self.seeds, "dense test accuracy": [d["test_acc"] for d in self.dense]},
                            index=pd.Index(range(len(self.seeds)), name="trial"))

    def accuracy_figure(self) -> Figure:
        """The paper's Figure 1: test accuracy against the weights remaining, one line per trial."""
        fig, (ax,) = plots.panel_grid(1, panel_size=(5.2, 3.3))
        main = self.frame().query("variant == @MAIN")
        for t, g in main.groupby("trial"):
            ax.plot(100 * g["weights_remaining"], g["test_acc"], marker="o", label=f"trial {t} (seed {self.seeds[t]})")
        _log_x(ax, main["weights_remaining"])
        plots.label_grid([ax], "weights remaining (%, log scale)", "test accuracy (fraction correct)")
        return fig


def prune_all(P, sc: Scenes, progress: bool = True) -> Pruning:
    """Train each trial's dense network (``P.seeds``), stop with :class:`train.UntrainedModel` if one is near
    chance, then run every variant of :func:`imp_configs` at every seed (cached; ``P.workers`` processes)."""
    from . import imp, models, train

    configs = imp_configs(P)
    build = functools.partial(models.CifarResNet, P.depth, num_classes=len(sc.train.classes), width=P.width)
    key = {"data": sc.folder.name, "depth": P.depth, "width": P.width}
    run = dict(device=P.device, workers=P.workers, progress=progress)
    dense = imp.dense_many([imp.Job(build, configs[MAIN], key, s) for s in P.seeds], sc.train, sc.test, **run)
    for s, d in zip(P.seeds, dense):
        train.check_trained(float(d["test_acc"]), len(sc.train.classes),
                            f"the dense ResNet-{P.depth} of seed {s} (chapter 2's epochs={P.epochs}, lr={P.lr})")
    jobs = [imp.Job(build, cfg, key, s) for cfg in configs.values() for s in P.seeds]
    levels = imp.run_many(jobs, sc.train, sc.test, **run)
    n = len(P.seeds)
    runs = {v: levels[i * n:(i + 1) * n] for i, v in enumerate(configs)}
    return Pruning(list(P.seeds), configs, build, last_block(build()), dense, runs)


def null_state(init: dict, state: dict) -> dict:
    """The random-init null of a pruned network: the initial weights W_0 with the network's mask (its zero
    conv and linear weights; every weight for the dense level) and W_0's BatchNorm (the identity in eval)."""
    out = {k: v.clone() for k, v in init.items()}
    for k, v in state.items():
        if k.endswith("weight") and v.dim() in (2, 4):
            out[k] = init[k] * v.ne(0).to(init[k].dtype)
    return out


def network_features(build, state: dict, layer: str, images: torch.Tensor,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """The maps of ``layer`` of ``build()`` loaded with ``state``, for ``images``."""
    net = build()
    net.load_state_dict(state)
    return layer_features(net.eval(), layer, images, device=device)


def best_setting(summary_: pd.DataFrame) -> tuple[float, float]:
    """The decision rule, fixed before any pruned level is dissected: the (q, cut-off) with the largest
    mean gap between the dense trained networks' interpretable units and their random-init nulls' (on
    the tuning scenes); ties go to the smaller q, then the smaller cut-off (the paper's side)."""
    if summary_.empty:
        raise ParameterError("the sweep is empty: give at least one quantile and one cut-off")
    top = summary_["gap"].max()
    best = summary_[summary_["gap"] >= top - 1e-9].reset_index().sort_values(["quantile", "cutoff"]).iloc[0]
    return float(best["quantile"]), float(best["cutoff"])


@dataclass
class SettingChoice:
    """The sweep behind the decision setting: per trial, q and cut-off, the interpretable units of the dense
    trained network and of its random-init null on the tuning scenes; and the setting chosen by
    :func:`best_setting`."""

    sweep: pd.DataFrame
    quantile: float
    cutoff: float

    def summary(self) -> pd.DataFrame:
        """Per (q, cut-off): mean units trained and null over trials, their mean gap and smallest gap."""
        s = self.sweep.assign(gap=self.sweep[TRAINED] - self.sweep[NULL])
        return s.groupby(["quantile", "cutoff"]).agg(trained=(TRAINED, "mean"), null=(NULL, "mean"),
                                                    gap=("gap", "mean"), smallest_gap=("gap", "min"))

    def gap_table(self) -> pd.DataFrame:
        """The mean gap (trained minus random init) with q down and the cut-off across."""
        return self.summary()["gap"].unstack("cutoff")

    def figure(self) -> Figure:
        """Mean units (trained, solid; random init, dashed) and their gap against the cut-off, per q."""
        s = self.summary().reset_index()
        fig, axes = plots.panel_grid(2, panel_size=(4.4, 3.2))
        for i, (q, g) in enumerate(s.groupby("quantile")):
            colour = f"C{i}"
            axes[0].plot(g["cutoff"], g["trained"], marker="o", color=colour, label=f"q = {q:g}, trained")
            axes[0].plot(g["cutoff"], g["null"], ls="--", marker=".", color=colour, label=f"q = {q:g}, random init")
            axes[1].plot(g["cutoff"], g["gap"], marker="o", color=colour, label=f"q = {q:g}")
        chosen = s[(s["quantile"] == self.quantile) & (s["cutoff"] == self.cutoff)]
        axes[1].plot(chosen["cutoff"], chosen["gap"], marker="*", ms=16, color="k", ls="none", label="chosen")
        axes[0].set_title("interpretable units (tuning scenes)")
        axes[1].set_title("trained minus random init")
        plots.label_grid(axes, "IoU cut-off", "units (mean over trials)")
        axes[1].legend(fontsize="x-small")
        axes[0].legend(fontsize="xx-small", ncol=2)
        return fig

    def numbers(self) -> dict:
        row = self.summary().loc[(self.quantile, self.cutoff)]
        return {"chosen_q": f"{self.quantile:g}", "chosen_cutoff": f"{self.cutoff:g}",
                "tune_trained": float(row["trained"]), "tune_null": float(row["null"]), "tune_gap": float(row["gap"])}


def choose_setting(pruning: Pruning, sc: Scenes, quantiles, cutoffs, device: str = "cpu") -> SettingChoice:
    """Dissect each trial's dense network and its random-init null on the tuning scenes at every q of
    ``quantiles`` and count the interpretable units at every cut-off of ``cutoffs``; choose by
    :func:`best_setting`. Only dense networks are used: no pruned level is looked at."""
    rows = []
    for t, d in enumerate(pruning.dense):
        feats = {TRAINED: network_features(pruning.build, d["state"], pruning.layer, sc.tune.images, device),
                 NULL: network_features(pruning.build, d["init"], pruning.layer, sc.tune.images, device)}
        counts = {}
        for q in sorted(quantiles):
            for kind, f in feats.items():
                best = dissect(f, sc.tune, q).iou.max(1)
                for c in sorted(cutoffs):
                    counts.setdefault((q, c), {})[kind] = int((best > c).sum())
        rows += [{"trial": t, "quantile": q, "cutoff": c, **v} for (q, c), v in counts.items()]
    sweep = pd.DataFrame(rows)
    choice = SettingChoice(sweep, 0.0, 0.0)
    q, c = best_setting(choice.summary())
    return SettingChoice(sweep, q, c)


@dataclass
class Dissected:
    """Every network of the chapter dissected at each setting (name -> (q, cut-off)): ``curves`` has one
    row per variant, trial, level, network (trained or random init) and setting, with the counts of
    :func:`summary` and, for trained networks, Fig. 4's consistency with the trial's dense network and
    the share of all units interpretable (the chance level of 'still interpretable'); ``tables`` the units
    tables of the trained networks; ``coverage`` the dense trained units' mask coverage per setting."""

    settings: dict[str, tuple[float, float]]
    categories: tuple[str, ...]
    n_units: int
    map_side: int
    curves: pd.DataFrame
    tables: dict
    coverage: dict[str, np.ndarray]
    concepts: ConceptSet

    def of(self, setting: str, network: str = TRAINED, variant: str = MAIN) -> pd.DataFrame:
        c = self.curves
        return c[(c["setting"] == setting) & (c["network"] == network) & (c["variant"] == variant)]

    def bound(self) -> pd.DataFrame:
        """Per category and setting: mean concept coverage, the median mask coverage of the dense trained
        units, the largest IoU any of them can reach (:func:`iou_bound`) and whether it passes the cut-off."""
        rows = []
        for name, (q, cut) in self.settings.items():
            b = iou_bound(self.concepts, self.coverage[name])
            for cat in self.categories:
                part = b[b["category"] == cat]
                rows.append({"setting": f"{name}: q = {q:g}, cut-off {cut:g}", "category": cat,
                             "concepts": len(part), "concept coverage": part["coverage"].mean(),
                             "mask coverage (median unit)": float(np.median(self.coverage[name][:, self.categories.index(cat)])),
                             "largest reachable IoU": part["max_iou"].max(),
                             "can pass": bool(part["max_iou"].max() > cut)})
        return pd.DataFrame(rows).set_index(["setting", "category"])


def _dissect_states(pruning, sc, states: dict, q_values, device) -> dict:
    out = {}
    for key, state in states.items():
        f = network_features(pruning.build, state, pruning.layer, sc.concepts.images, device)
        out[key] = {q: dissect(f, sc.concepts, q) for q in q_values}
    return out


def dissect_all(pruning: Pruning, sc: Scenes, settings: dict[str, tuple[float, float]], device: str = "cpu",
                progress: bool = True) -> Dissected:
    """Dissect every level of every run, and its random-init null (:func:`null_state`), on the dissection
    scenes at every setting of ``settings`` (each trial's dense network once: every variant starts there)."""
    q_values = sorted({q for q, _ in settings.values()})
    cats = sc.concepts.categories
    rows, tables, memo = [], {}, {}
    todo = [(v, t) for v in pruning.runs for t in range(len(pruning.seeds))]
    for v, t in bar(todo, desc="dissecting runs", disable=not progress, leave=False):
        dense = pruning.dense[t]
        for lv in pruning.runs[v][t]:
            key = (t, 0) if lv["level"] == 0 else (v, t, lv["level"])
            if key not in memo:
                states = {TRAINED: lv["state"], NULL: null_state(dense["init"], lv["state"])}
                memo[key] = _dissect_states(pruning, sc, states, q_values, device)
            for name, (q, cut) in settings.items():
                for network, d in memo[key].items():
                    table = units_table(d[q], cut)
                    row = {"variant": v, "trial": t, "seed": pruning.seeds[t], "level": lv["level"],
                           "weights_remaining": lv["weights_remaining"], "test_acc": lv["test_acc"],
                           "network": network, "setting": name, **summary(table, cats),
                           "chance": float(table["interpretable"].mean())}
                    if network == TRAINED:
                        tables[(v, t, lv["level"], name)] = table
                        row["still interpretable"], row["same concept"] = consistency(
                            tables[(v, t, 0, name)], table)
                    rows.append(row)
    coverage = {name: np.concatenate([memo[(t, 0)][TRAINED][q].coverage for t in range(len(pruning.seeds))])
                for name, (q, _) in settings.items()}
    first = network_features(pruning.build, pruning.dense[0]["state"], pruning.layer, sc.concepts.images[:1], device)
    return Dissected(dict(settings), cats, int(first.shape[1]), int(first.shape[-1]), pd.DataFrame(rows), tables,
                     coverage, sc.concepts)


# ------------------------------------------------------------------------------------ measures and claims

def nearest_level(frame: pd.DataFrame, share: float) -> int:
    """The level whose mean share of weights remaining is nearest to ``share`` (on a log scale)."""
    w = frame.groupby("level")["weights_remaining"].mean()
    return int((np.log(w) - math.log(share)).abs().idxmin())


def reaches(frame: pd.DataFrame, share: float, slack: float = 1.25) -> bool:
    """Whether the runs of ``frame`` pruned down to about ``share`` of the weights (within ``slack``)."""
    return float(frame.groupby("level")["weights_remaining"].mean().min()) <= share * slack


def _at(frame: pd.DataFrame, level: int, column: str) -> pd.Series:
    return frame[frame["level"] == level].set_index("trial")[column].sort_index()


def separation(dis: Dissected, setting: str):
    """Interpretable units of each trial's dense trained network minus its random-init null's, paired by
    seed (:class:`claims.Estimate`)."""
    from .claims import Estimate

    return Estimate.paired(_at(dis.of(setting, TRAINED), 0, "units"), _at(dis.of(setting, NULL), 0, "units"))


def relative_change(dis: Dissected, setting: str, share: float, column: str = "units"):
    """Per trial, the count ``column`` at the level nearest ``share`` of the weights over the dense
    network's, minus one (over seeds); None when a dense network has none to lose."""
    from .claims import Estimate

    frame = dis.of(setting)
    dense, pruned = _at(frame, 0, column), _at(frame, nearest_level(frame, share), column)
    if (dense == 0).any():
        return None
    return Estimate.over_seeds((pruned / dense - 1.0).to_numpy())


def accuracy_change(dis: Dissected, share: float):
    """Test accuracy at the level nearest ``share`` of the weights minus the dense network's, paired by seed."""
    from .claims import Estimate

    frame = dis.of(PAPER)
    return Estimate.paired(_at(frame, nearest_level(frame, share), "test_acc"), _at(frame, 0, "test_acc"))


def higher_level_loss(dis: Dissected, setting: str):
    """Per trial, the relative loss of interpretable units whose concept is higher-level (object, scene),
    dense to the sparsest level, minus that of the lower-level ones (colour, texture); over the trials
    whose dense network has units of both kinds (None if no trial has)."""
    from .claims import Estimate

    frame = dis.of(setting)
    last = int(frame["level"].max())
    values = []
    for t in sorted(frame["trial"].unique()):
        g = frame[frame["trial"] == t].set_index("level")
        high = [sum(g.loc[lv, f"units/{c}"] for c in HIGHER) for lv in (0, last)]
        low = [sum(g.loc[lv, f"units/{c}"] for c in LOWER) for lv in (0, last)]
        if high[0] > 0 and low[0] > 0:
            values.append((1 - high[1] / high[0]) - (1 - low[1] / low[0]))
    return Estimate.over_seeds(values) if values else None


def consistency_at(dis: Dissected, setting: str, share: float):
    """Fig. 4 at the level nearest ``share`` of the weights: (still interpretable, same concept), each over
    the trials where it is defined (None where no trial has it)."""
    from .claims import Estimate

    frame = dis.of(setting)
    level = nearest_level(frame, share)
    out = []
    for column in ("still interpretable", "same concept"):
        v = _at(frame, level, column).dropna()
        out.append(Estimate.over_seeds(v.to_numpy()) if len(v) else None)
    return tuple(out)


def claim_results(dis: Dissected) -> list:
    """Chapter 2's claims (declared in :mod:`pruning_utils.claims`), decided over the trials."""
    from . import claims, reference

    ref = reference.DISSECTION
    frame = dis.of(CHOSEN)
    n = frame["trial"].nunique()
    q, cut = dis.settings[CHOSEN]
    seeds = (f"{n} trial(s): the seeds cover the initialisation and the order of the training batches; the "
             "scenes are one generated set and the dissection one set of held-out scenes")
    at = f"chosen setting q = {q:g}, cut-off {cut:g}; {seeds}"
    reach = {s: reaches(frame, s) for s in (ref["acc_matches_down_to"], ref["acc_drop_at"],
                                              1 - ref["sparsity_consistency"])}
    short = f"the runs stop at {100 * frame['weights_remaining'].min():.1f}% of the weights"
    out = [claims.decide("dis-premise-paper", separation(dis, PAPER),
                         f"q = {dis.settings[PAPER][0]:g}, cut-off {dis.settings[PAPER][1]:g}; {seeds}", fmt=".1f"),
           claims.decide("dis-premise-chosen", separation(dis, CHOSEN), at, fmt=".1f")]
    share = ref["acc_matches_down_to"]
    if reach[share]:
        parts = {c: relative_change(dis, CHOSEN, share, c) for c in ("units", "concepts")}
        parts = {c: e for c, e in parts.items() if e is not None}
        out.append(claims.decide("dis-hypothesis-a", parts or None, at if parts else
                                 "a dense network has no interpretable unit at the chosen setting"))
        out.append(claims.decide("dis-accuracy-flat", accuracy_change(dis, share), seeds))
    else:
        out += [claims.untestable("dis-hypothesis-a", short), claims.untestable("dis-accuracy-flat", short)]
    out.append(claims.decide("dis-accuracy-drop", accuracy_change(dis, ref["acc_drop_at"]), seeds)
               if reach[ref["acc_drop_at"]] else claims.untestable("dis-accuracy-drop", short))
    high = higher_level_loss(dis, CHOSEN)
    out.append(claims.decide("dis-higher-first", high, at) if high is not None else claims.untestable(
        "dis-higher-first", "no dense network has interpretable units of both kinds at the chosen setting"))
    share = 1 - ref["sparsity_consistency"]
    still, same = consistency_at(dis, CHOSEN, share) if reach[share] else (None, None)
    out.append(claims.decide("dis-still", still, at) if still is not None else claims.untestable(
        "dis-still", short if not reach[share] else "no dense network has an interpretable unit"))
    out.append(claims.decide("dis-same", same, at) if same is not None else claims.untestable(
        "dis-same", short if not reach[share] else "no unit is interpretable both dense and pruned"))
    return out


# ------------------------------------------------------------------------------------------------ figures

def _log_x(ax, shares) -> None:
    """Log-scale x axis of weights remaining (%), pruning to the right, ticks at the levels' shares."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ticks = sorted({round(100 * float(w), 1) for w in shares}, reverse=True)
    ticks = ticks[::2] if len(ticks) > 8 else ticks
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    if not ax.xaxis_inverted():
        ax.invert_xaxis()


def _trials_and_null(ax, trained: pd.DataFrame, null: pd.DataFrame, y: str, scale: float = 1.0,
                     legend: bool = True) -> None:
    """One line per trial, and the random-init nulls as a grey band (range over trials) with their mean."""
    for t, g in trained.groupby("trial"):
        ax.plot(100 * g["weights_remaining"], scale * g[y], marker="o", ms=4, label=f"trial {t}" if legend else None)
    if not null.empty:
        band = null.groupby("level").agg(x=("weights_remaining", "mean"), lo=(y, "min"), hi=(y, "max"),
                                          mean=(y, "mean"))
        ax.fill_between(100 * band["x"], scale * band["lo"], scale * band["hi"], color="0.6", alpha=0.35,
                        label="random init (range)" if legend else None)
        ax.plot(100 * band["x"], scale * band["mean"], color="0.4", ls="--", lw=1)
    _log_x(ax, trained.groupby("level")["weights_remaining"].mean())


def units_figure(dis: Dissected) -> Figure:
    """The paper's Figure 2 with its null: interpretable units and distinct concepts against the weights
    remaining, one line per trial, random-init networks with the same masks as a band; one row per setting."""
    settings = list(dis.settings)
    fig, axes = plots.panel_grid(2 * len(settings), ncols=2, panel_size=(4.3, 3.0))
    for r, name in enumerate(settings):
        q, cut = dis.settings[name]
        for c, (column, title) in enumerate((("units", "interpretable units"), ("concepts", "distinct concepts"))):
            ax = axes[2 * r + c]
            _trials_and_null(ax, dis.of(name), dis.of(name, NULL), column, legend=(r == 0 and c == 0))
            ax.set_title(f"{title}\n{name}: q = {q:g}, cut-off {cut:g}", fontsize="small")
    plots.label_grid(axes, "weights remaining (%, log scale)", "count", ncols=2)
    return fig


def categories_figure(dis: Dissected) -> Figure:
    """The paper's Figure 3 with its null: distinct concepts per category against the weights remaining,
    one line per trial, random-init networks as a band; one row per setting."""
    settings = list(dis.settings)
    k = len(dis.categories)
    fig, axes = plots.panel_grid(k * len(settings), ncols=k, panel_size=(2.9, 2.6))
    for r, name in enumerate(settings):
        for c, cat in enumerate(dis.categories):
            ax = axes[k * r + c]
            _trials_and_null(ax, dis.of(name), dis.of(name, NULL), f"concepts/{cat}", legend=(r == 0 and c == 0))
            ax.set_title(f"{cat} ({name})", fontsize="small")
    plots.label_grid(axes, "weights remaining (%)", "distinct concepts", ncols=k)
    return fig


def consistency_figure(dis: Dissected, setting: str = CHOSEN) -> Figure:
    """The paper's Figure 4: of the dense network's interpretable units, the share still interpretable
    (left, with the chance level: the share of all units interpretable at that level) and, of those
    interpretable in both, the share with the same concept (right); one line per trial."""
    frame = dis.of(setting)
    fig, axes = plots.panel_grid(2, panel_size=(4.3, 3.2))
    for ax, column in zip(axes, ("still interpretable", "same concept")):
        _trials_and_null(ax, frame, frame.iloc[0:0], column, scale=100)
        ax.set_title(column)
    chance = frame.groupby("level").agg(x=("weights_remaining", "mean"), y=("chance", "mean"))
    axes[0].plot(100 * chance["x"], 100 * chance["y"], color="0.4", ls=":", label="chance (share interpretable)")
    q, cut = dis.settings[setting]
    fig.suptitle(f"{setting} setting: q = {q:g}, cut-off {cut:g}", fontsize="small")
    plots.label_grid(axes, "weights remaining (%, log scale)", "share of units (%)")
    return fig


def unit_grid(pruning: Pruning, dis: Dissected, setting: str = PAPER, units: int = GRID_UNITS,
              trial: int = 0) -> Figure:
    """The ``units`` units of a trial's dense network with the highest IoU at ``setting``, with their
    top-activating dissection scenes (:func:`top_images_grid`)."""
    q, _ = dis.settings[setting]
    feats = network_features(pruning.build, pruning.dense[trial]["state"], pruning.layer, dis.concepts.images)
    table = dis.tables[(MAIN, trial, 0, setting)]
    best = table.sort_values("iou", ascending=False).index[:units].tolist()
    return top_images_grid(dis.concepts.images, feats, unit_thresholds(feats, q), best, table)


# ------------------------------------------------------------------------------------- beyond the paper

def beyond_table(dis: Dissected, setting: str = CHOSEN) -> pd.DataFrame:
    """Each variant at its dense level, the level nearest 16.8% of the weights and its sparsest level:
    weights left, accuracy, interpretable units of the trained networks and of their random-init nulls
    (same masks), the paired gap, the alive units and the share of them interpretable (mean ± 95%
    interval over trials where it has one)."""
    from . import reference
    from .claims import Estimate

    rows = []
    for v in dis.curves["variant"].unique():
        trained, null = dis.of(setting, TRAINED, v), dis.of(setting, NULL, v)
        levels = sorted({0, nearest_level(trained, reference.DISSECTION["acc_matches_down_to"]),
                         int(trained["level"].max())})
        for lv in levels:
            a, b = trained[trained["level"] == lv].sort_values("trial"), null[null["level"] == lv].sort_values("trial")
            share = a["units"] / a["alive"].clip(lower=1)
            rows.append({"variant": v, "level": lv, "weights left (%)": f"{100 * a['weights_remaining'].mean():.1f}",
                         "test accuracy": Estimate.over_seeds(a["test_acc"]).text(".3f"),
                         "units, trained": Estimate.over_seeds(a["units"]).text(".1f"),
                         "units, random init": f"{b['units'].mean():.1f}",
                         "trained minus random init": Estimate.paired(a["units"], b["units"]).text(".1f"),
                         "alive units": f"{a['alive'].mean():.1f}",
                         "interpretable share of alive units": Estimate.over_seeds(share).text(".2f")})
    return pd.DataFrame(rows).set_index(["variant", "level"])


def beyond_figure(dis: Dissected, setting: str = CHOSEN) -> Figure:
    """Per variant: interpretable units (top) and the interpretable share of alive units (bottom) against
    the weights remaining, one line per trial, random-init networks with the same masks as a band."""
    variants = list(dis.curves["variant"].unique())
    fig, axes = plots.panel_grid(2 * len(variants), ncols=len(variants), panel_size=(3.5, 2.8))
    curves = dis.curves.assign(share=dis.curves["units"] / dis.curves["alive"].clip(lower=1))
    for c, v in enumerate(variants):
        trained = curves[(curves["setting"] == setting) & (curves["network"] == TRAINED) & (curves["variant"] == v)]
        null = curves[(curves["setting"] == setting) & (curves["network"] == NULL) & (curves["variant"] == v)]
        for r, (column, title) in enumerate((("units", "interpretable units"), ("share", "share of alive units"))):
            ax = axes[r * len(variants) + c]
            _trials_and_null(ax, trained, null, column, legend=(r == 0 and c == 0))
            ax.set_title(f"{v}\n{title}", fontsize="small")
    plots.label_grid(axes, "weights remaining (%)", "count / share", ncols=len(variants))
    return fig


def numbers(sc: Scenes, pruning: Pruning, choice: SettingChoice, dis: Dissected) -> dict:
    """Every number the chapter's prose glues in."""
    from . import reference

    ref = reference.DISSECTION
    out = {**sc.numbers(), **choice.numbers()}
    acc = [d["test_acc"] for d in pruning.dense]
    main = pruning.frame().query("variant == @MAIN")
    levels = main.groupby("level")["weights_remaining"].mean()
    out |= {"layer": pruning.layer, "n_units": dis.n_units, "n_trials": len(pruning.seeds),
            "rewind_epochs": pruning.configs[MAIN].rewind_epochs,
            "rounds": int(levels.index.max()), "rate_pct": f"{100 * pruning.configs[MAIN].rate:g}",
            "levels_pct": ", ".join(f"{100 * w:.1f}" for w in levels),
            "dense_acc_min": min(acc), "dense_acc_max": max(acc), "map_side": int(dis.map_side),
            "dense_accs": ", ".join(f"{a:.3f}" for a in acc)}
    for name in dis.settings:
        tr, nu = _at(dis.of(name), 0, "units"), _at(dis.of(name, NULL), 0, "units")
        out |= {f"{name}_q": f"{dis.settings[name][0]:g}", f"{name}_cutoff": f"{dis.settings[name][1]:g}",
                f"{name}_units_trained": float(tr.mean()), f"{name}_units_null": float(nu.mean())}
        can = dis.bound().loc[f"{name}: q = {dis.settings[name][0]:g}, cut-off {dis.settings[name][1]:g}"]
        obj = dis.categories.index("object") if "object" in dis.categories else 0
        out[f"{name}_mask_pct"] = 100 * float(np.median(dis.coverage[name][:, obj]))
        out[f"{name}_q_pct"] = f"{100 * dis.settings[name][0]:g}"
        out[f"{name}_passable"] = ", ".join(can.index[can["can pass"]]) or "none"
        out[f"{name}_blocked"] = ", ".join(can.index[~can["can pass"]]) or "none"
    frame, null = dis.of(CHOSEN), dis.of(CHOSEN, NULL)
    last = int(frame["level"].max())
    at_last = null[null["level"] == last]
    cats = {c: float(at_last[f"units/{c}"].mean()) for c in dis.categories}
    out |= {"null_dense": float(_at(null, 0, "units").mean()), "null_sparse": float(_at(null, last, "units").mean()),
            "trained_sparse": float(_at(frame, last, "units").mean()), "sparsest_pct": 100 * float(levels.loc[last]),
            "null_sparse_category": max(cats, key=cats.get)}
    share = 1 - ref["sparsity_consistency"]
    level = nearest_level(frame, share)
    out |= {"consistency_pct": 100 * float(levels.loc[level]),
            "still_mean": float(_at(frame, level, "still interpretable").mean()),
            "same_mean": float(_at(frame, level, "same concept").mean()),
            "chance_mean": float(_at(frame, level, "chance").mean())}
    return out


# ------------------------------------------------------------------------------------ full size: ResNet-50

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet50_inputs(P) -> tuple[broden.BrodenData, nn.Module]:
    """The real Broden folder ``P.broden_dir`` and torchvision's ImageNet ResNet-50 (its published weights,
    or ``P.resnet50_weights``), checked before any work is done."""
    from . import models

    data = broden.load(P.broden_dir)
    return data, models.imagenet_resnet50(P.download, P.resnet50_weights)


def resnet50_levels(model: nn.Module, data: broden.BrodenData, P) -> pd.DataFrame:
    """Dissect the last block of an ImageNet ResNet-50 on :data:`BRODEN_IMAGES` images of a real Broden
    folder at the paper's setting (``P.quantile``, ``P.cutoff``), unpruned and after each round of one-shot
    global magnitude pruning at the paper's 20% down to ``P.target_remaining`` (no retraining, which
    ImageNet puts out of reach here): one row per level with :func:`summary`'s counts."""
    from . import imp, reference

    rate = float(reference.DISSECTION["rate"])
    cs = broden.concept_set(data, limit=BRODEN_IMAGES, image_size=224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    cs = replace(cs, images=(cs.images - mean) / std)
    layer = last_block(model)
    rows = []
    for level in range(imp.rounds_to_reach(P.target_remaining, rate) + 1):
        if level:
            imp.prune_round(model, rate)
        feats = layer_features(model.eval(), layer, cs.images, batch_size=64, device=P.device)
        table = units_table(dissect(feats, cs, P.quantile), P.cutoff)
        rows.append({"level": level, "weights_remaining": imp.weights_remaining(model),
                     **summary(table, data.categories)})
    return pd.DataFrame(rows).set_index("level")
