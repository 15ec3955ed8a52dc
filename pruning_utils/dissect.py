"""Network dissection (Bau et al. 2017) of one layer's units, as paper 001 applies it (chapter 2).

For unit k: the threshold T_k with P(a_k > T_k) = q (q = 0.005) over every position of every image's raw
activation map; each map upsampled (bilinear) to the label-mask size and binarised, M_k = a_k > T_k;
IoU(k, c) = sum |M_k ∩ L_c| / sum |M_k ∪ L_c|, both sums over the images that carry labels of c's
category. A unit is interpretable when its best IoU exceeds a cut-off (0.04 in the public NetDissect
code, 0.05 in paper 001's text).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from . import activations, plots
from .broden import ConceptSet
from .params import ParameterError
from .progress import bar

CUTOFFS = {"code": 0.04, "paper": 0.05}


def layer_features(model: nn.Module, layer: str, images: torch.Tensor, batch_size: int = 128,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """The activation maps a_k (N, C, h, w) of ``layer`` for all ``images``."""
    return activations.channel_scores(model, images, [layer], batch_size=batch_size, device=device,
                                      keep_maps=True)[layer]


def unit_thresholds(features: torch.Tensor, quantile: float = 0.005) -> torch.Tensor:
    """T_k with P(a_k > T_k) = ``quantile`` over all positions of all images (N, C, h, w): numpy's
    default (linear) quantile of level 1 - ``quantile`` of each unit's values."""
    if not 0.0 < quantile < 1.0:
        raise ParameterError(f"quantile={quantile!r} is not allowed; expected a float in (0, 1)")
    if features.ndim != 4:
        raise ParameterError(f"features of shape {tuple(features.shape)} is not allowed; expected (N, C, h, w)")
    values = features.transpose(0, 1).reshape(features.shape[1], -1).double().sort(dim=1).values
    pos = (1.0 - quantile) * (values.shape[1] - 1)
    lo, frac = int(np.floor(pos)), pos - np.floor(pos)
    hi = min(lo + 1, values.shape[1] - 1)
    return (values[:, lo] + (values[:, hi] - values[:, lo]) * frac).float()


def unit_masks(features: torch.Tensor, thresholds: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """M_k: maps (N, C, h, w) upsampled bilinearly to ``size`` and binarised at T_k (C values), (N, C, *size)."""
    up = F.interpolate(features.float(), size=size, mode="bilinear", align_corners=False)
    return up > thresholds.view(1, -1, 1, 1)


def iou_matrix(features: torch.Tensor, concepts: ConceptSet, thresholds: torch.Tensor,
               batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """IoU(k, c) for every unit k and label number c, (C, number of labels); 0 for label 0 and for labels
    outside the data set's categories. A label repeated in two layers of one pixel would count twice.

    Bilinear upsampling gives convex combinations of the raw values, so a map whose maximum is at most
    T_k has an empty mask: only the (image, unit) pairs with max a_k > T_k are upsampled.
    """
    n, c = features.shape[:2]
    if len(concepts) != n:
        raise ParameterError(f"features of {n} images do not match a concept set of {len(concepts)} images")
    n_labels = len(concepts.label_category)
    size = tuple(concepts.masks.shape[-2:])
    inter = torch.zeros(c * n_labels, dtype=torch.float64)
    unit_area = torch.zeros(c, len(concepts.categories), dtype=torch.float64)
    label_area = torch.bincount(concepts.masks.reshape(-1), minlength=n_labels).double()
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
    inter = inter.view(c, n_labels)
    category = torch.as_tensor(concepts.label_category)
    union = unit_area[:, category.clamp(min=0)] + label_area - inter
    valid = (category >= 0).unsqueeze(0) & (union > 0)
    return torch.where(valid, inter / union.clamp(min=1e-12), torch.zeros(())).float()


@dataclass(frozen=True)
class Dissection:
    """The result of dissecting one layer: IoU (C, labels), thresholds T_k, and the label vocabulary."""

    iou: np.ndarray
    thresholds: np.ndarray
    names: tuple[str, ...]
    label_category: np.ndarray
    categories: tuple[str, ...]


def dissect(features: torch.Tensor, concepts: ConceptSet, quantile: float = 0.005,
            batch_size: int = 64, progress: bool = False) -> Dissection:
    """Dissect the units whose maps are ``features`` (N, C, h, w) on ``concepts`` (same N images)."""
    thresholds = unit_thresholds(features, quantile)
    iou = iou_matrix(features, concepts, thresholds, batch_size, progress)
    return Dissection(iou.numpy(), thresholds.numpy(), concepts.names, np.asarray(concepts.label_category),
                      concepts.categories)


def units_table(result: Dissection, cutoff: float = 0.04) -> pd.DataFrame:
    """Per unit: its best concept, that concept's category, its IoU, and whether IoU > ``cutoff``."""
    if not 0.0 <= cutoff < 1.0:
        raise ParameterError(f"cutoff={cutoff!r} is not allowed; expected a float in [0, 1)")
    best = result.iou.argmax(1)
    iou = result.iou[np.arange(len(best)), best]
    return pd.DataFrame({"unit": np.arange(len(best)), "concept": [result.names[b] for b in best],
                         "category": [result.categories[result.label_category[b]] if iou[i] > 0 else "-"
                                      for i, b in enumerate(best)],
                         "iou": iou, "interpretable": iou > cutoff}).set_index("unit")


def summary(table: pd.DataFrame, categories: tuple[str, ...]) -> dict:
    """Interpretable units, distinct concepts among them, and both per category (Figs. 2 and 3)."""
    good = table[table["interpretable"]]
    out = {"units": int(len(good)), "concepts": int(good["concept"].nunique())}
    for cat in categories:
        part = good[good["category"] == cat]
        out[f"units/{cat}"] = int(len(part))
        out[f"concepts/{cat}"] = int(part["concept"].nunique())
    return out


def iou_bound(concepts: ConceptSet, quantile: float = 0.005) -> pd.DataFrame:
    """Per concept c present: its category, its coverage (the share of the pixels of the images that carry
    c's category) and the largest IoU that a mask covering the share q of those pixels can reach,
    min(q, coverage) / max(q, coverage). No unit can pass a cut-off above this bound, whatever it detects."""
    if not 0.0 < quantile < 1.0:
        raise ParameterError(f"quantile={quantile!r} is not allowed; expected a float in (0, 1)")
    area = torch.bincount(concepts.masks.reshape(-1), minlength=len(concepts.label_category)).double().numpy()
    pixels = concepts.has_category.sum(0).double().numpy() * concepts.masks.shape[-1] * concepts.masks.shape[-2]
    rows = {}
    for label, g in enumerate(concepts.label_category):
        if g >= 0 and area[label] > 0:
            cover = area[label] / pixels[g]
            rows[concepts.names[label]] = {"category": concepts.categories[g], "coverage": cover,
                                           "max_iou": min(quantile, cover) / max(quantile, cover)}
    return pd.DataFrame.from_dict(rows, orient="index")


def levels(build, states: list[dict], layer: str, concepts: ConceptSet, quantile: float = 0.005,
           cutoff: float = 0.04, device: str | torch.device = "cpu") -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Dissect ``layer`` of ``build()`` loaded with each IMP level of ``states`` (records with level,
    weights_remaining, test_acc, state): one row per level with its :func:`summary` and its
    :func:`consistency` with the first level (Fig. 4), and each level's units table."""
    rows, tables = [], []
    for lv in states:
        net = build()
        net.load_state_dict(lv["state"])
        table = units_table(dissect(layer_features(net.eval(), layer, concepts.images, device=device), concepts,
                                    quantile), cutoff)
        tables.append(table)
        still, same = consistency(tables[0], table)
        rows.append({"level": lv["level"], "weights_remaining": lv["weights_remaining"], "test_acc": lv["test_acc"],
                     **summary(table, concepts.categories), "still interpretable": still, "same concept": same})
    return pd.DataFrame(rows), tables


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
