"""Class-specific filters in the final layer (paper 002, chapter 3): Algorithm 1, the decomposed layer, and
the chapter's experiments.

The final layer's input is a feature vector x in R^d (a ResNet's pooled features, all >= 0); its weights
W (n classes x d) and bias b. Algorithm 1 picks, for each class y, an index set S_y of k2 features: for
every training image of class y the indices of its k1 largest features are counted (a histogram per
class), and the k2 most frequent indices form S_y. The decomposed layer then computes
logit_y = sum_{j in S_y} W[y, j] x_j + b_y, at a cost of sum_y |S_y| multiply-adds instead of d x n.

Our tie rules, so that every result is deterministic: within an image, equal features rank by index; a
feature that is 0 is never among an image's top k1 (it carries none of the image's l1 mass, and which
zeros would fill the top k1 is arbitrary); within a histogram, equal counts rank by index.

The chapter runs on one trained network (chapter 0's ResNet-20, too costly to retrain per seed); its
seeds vary what is drawn on that network: the training images Algorithm 1 and the retraining see, the
retraining's batch order and augmentation, and the random baselines. Intervals come from a paired
bootstrap over those seeds and the test images (:class:`Resampler`); the depth study trains its own
networks, one per depth and seed.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from . import baselines, claims, criteria, reference, runtime, train
from .claims import Estimate
from .data import Split
from .params import ParameterError, check_choice
from .plots import new_figure, panel_grid
from .progress import bar
from .train import get_device, seed_everything

PAPER = reference.CLASS_FILTERS
# The public code's retraining: batch 64, random shifts and flips (whole network).
RETRAIN_BATCH_SIZE = 64
RETRAIN_AUGMENT = True


# --- Algorithm 1 --------------------------------------------------------------------------------------

def _check_k(name: str, k: int, hi: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= hi:
        raise ParameterError(f"{name}={k!r} is not allowed; expected an int in [1, {hi}]")
    return int(k)


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                     device: str | torch.device = "cpu", progress: bool = False) -> torch.Tensor:
    """The final layer's input I (N, d) for images ``x``: ``model.features`` in eval mode, batch by batch."""
    if not hasattr(model, "features"):
        raise ParameterError(f"model={type(model).__name__} has no .features(x); expected a CifarResNet")
    dev = get_device(device) if isinstance(device, str) else device
    with train.inference_layout(model, x, dev) as fmt:
        chunks = [model.features(x[i:i + batch_size].to(dev, memory_format=fmt)).cpu()
                  for i in bar(range(0, len(x), batch_size), desc="features", disable=not progress, leave=False)]
    model.to("cpu")
    return torch.cat(chunks)


def instance_ranks(features: torch.Tensor) -> torch.Tensor:
    """sorted_k of Algorithm 1: the rank of each feature within its instance (0 = largest; ties to the
    lower index); a feature <= 0 gets rank d, outside every top k1."""
    d = features.shape[1]
    order = torch.argsort(features, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(d).expand_as(order).contiguous())
    return ranks.masked_fill_(features <= 0, d)


def class_histograms(ranks: torch.Tensor, labels: torch.Tensor, k1: int, n_classes: int) -> torch.Tensor:
    """HIST of Algorithm 1 (n_classes, d): how many instances of class y have feature j among their top k1."""
    k1 = _check_k("k1", k1, ranks.shape[1])
    hist = torch.zeros(n_classes, ranks.shape[1], dtype=torch.long)
    return hist.index_add_(0, labels.long(), (ranks < k1).long())


def top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest entries of each row (n, k), largest first, ties to the lower index."""
    k = _check_k("k2", k, scores.shape[1])
    return torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]


def influential_sets(features: torch.Tensor, labels: torch.Tensor, k1: int, k2: int,
                     n_classes: int | None = None) -> torch.Tensor:
    """S_y of Algorithm 1 for every class (n_classes, k2): the k2 most frequent of the instances' top-k1 indices."""
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    return top_rows(class_histograms(instance_ranks(features), labels, k1, n_classes), k2)


def mass_coverage(features: torch.Tensor) -> torch.Tensor:
    """c(k) for k = 1..d: the mean over instances of the share of an instance's l1 norm in its top k features."""
    top = features.abs().sort(dim=1, descending=True).values.cumsum(1)
    return (top / top[:, -1:].clamp_min(1e-12)).mean(0)


def k1_for_mass(features: torch.Tensor, mass: float = 0.9) -> int:
    """The paper's variant of k1 (Sec. 4.4): the smallest k whose top-k features carry ``mass`` of the l1
    norm on average."""
    if not 0.0 < mass <= 1.0:
        raise ParameterError(f"mass={mass!r} is not allowed; expected a float in (0, 1]")
    cov = mass_coverage(features)
    return int(torch.nonzero(cov >= mass - 1e-6)[0, 0]) + 1


def weight_sets(weight: torch.Tensor, k2: int) -> torch.Tensor:
    """Baseline index sets (n, k2): per class the k2 features with the largest |W[y, j]| (weights, not features)."""
    return top_rows(weight.detach().abs(), k2)


def random_sets(n_classes: int, d: int, k2: int, seed: int = 0) -> torch.Tensor:
    """Baseline index sets (n, k2): k2 distinct features per class drawn uniformly at random (seeded)."""
    k2 = _check_k("k2", k2, d)
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d, generator=gen)[:k2] for _ in range(n_classes)])


def usage_scores(features: torch.Tensor, labels: torch.Tensor, k1: int, k2: int, mode: str = "classes"
                 ) -> np.ndarray:
    """Class-usage frequency of each feature j (d,): with ``mode='instances'`` the share of instances that
    have j among their top k1; with ``'classes'`` the number of classes whose S_y holds j with a count
    above zero, plus half the instance share (in [0, 0.5], so it only breaks ties)."""
    check_choice("mode", mode, ClassUsage.MODES)
    ranks = instance_ranks(features)
    share = (ranks < _check_k("k1", k1, ranks.shape[1])).double().mean(0)
    if mode == "instances":
        return share.numpy()
    n_classes = int(labels.max()) + 1
    hist = class_histograms(ranks, labels, k1, n_classes)
    sets = top_rows(hist, k2)
    used = torch.zeros_like(hist, dtype=torch.bool).scatter_(1, sets, True) & (hist > 0)
    return (used.sum(0).double() + 0.5 * share).numpy()


@criteria.register("class_usage")
class ClassUsage(criteria.Criterion):
    """Class-usage frequency (chapter 3, Algorithm 1) of the filters of a layer: each filter's map pooled
    over positions (for a ResNet's final block, exactly the input of ``fc``), then :func:`usage_scores`
    on the scoring images and labels. ``k1`` and ``k2`` are capped at the number of filters."""

    needs_data = True
    MODES = ("classes", "instances")

    def __init__(self, k1: int = 5, k2: int = 5, mode: str = "classes"):
        self.k1, self.k2 = _check_k("k1", k1, 10**9), _check_k("k2", k2, 10**9)
        self.mode = check_choice("mode", mode, self.MODES)

    def score(self, model, target, data=None):
        maps = criteria._maps(model, target, data)
        feats = maps.flatten(2).mean(2) if maps.ndim > 2 else maps
        d = feats.shape[1]
        return usage_scores(feats, data.y, min(self.k1, d), min(self.k2, d), self.mode)


def _as_sets(sets, n_classes: int, d: int) -> torch.Tensor:
    sets = torch.as_tensor(sets, dtype=torch.long)
    if sets.ndim != 2 or sets.shape[0] != n_classes:
        raise ParameterError(f"sets of shape {tuple(sets.shape)} is not allowed; expected (n_classes={n_classes}, k)")
    if sets.numel() and (sets.min() < 0 or sets.max() >= d):
        raise ParameterError(f"sets hold indices outside [0, {d - 1}]")
    if any(len(set(row.tolist())) != len(row) for row in sets):
        raise ParameterError("sets repeat an index within a class; each S_y must hold distinct features")
    return sets


class DecomposedLinear(nn.Module):
    """The decomposed final layer (Sec. 5.2.3): logit_y = sum_{j in S_y} W[y, j] x_j + b_y, one subspace per class.

    Holds only the weights it uses: ``weight`` (n, k) = W[y, S_y] and ``bias`` (n,); ``index`` (n, k) = S_y.
    With S_y = all d features it computes exactly what the original ``nn.Linear`` does.
    """

    def __init__(self, linear: nn.Linear, sets):
        super().__init__()
        n, d = linear.weight.shape
        index = _as_sets(sets, n, d)
        self.in_features, self.out_features = d, n
        self.register_buffer("index", index)
        self.weight = nn.Parameter(linear.weight.detach().gather(1, index).clone())
        bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(n)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, self.index] * self.weight).sum(-1) + self.bias

    def cost(self) -> int:
        """Multiply-adds per instance: sum_y |S_y| (the full layer costs d x n)."""
        return int(self.index.numel())

    def to_linear(self) -> nn.Linear:
        """An equivalent dense ``nn.Linear`` whose weights outside S_y are zero."""
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.zero_().scatter_(1, self.index, self.weight)
            lin.bias.copy_(self.bias)
        return lin


def with_head(model: nn.Module, head: nn.Module) -> nn.Module:
    """A copy of ``model`` whose final layer ``fc`` is replaced by ``head`` (e.g. a DecomposedLinear)."""
    if not isinstance(getattr(model, "fc", None), nn.Linear):
        raise ParameterError(f"model={type(model).__name__} has no nn.Linear `fc` head to replace")
    new = copy.deepcopy(model)
    new.fc = copy.deepcopy(head)
    return new.eval()


@torch.no_grad()
def correct(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Per test image, whether final layer ``head`` on its features predicts its label (bool, (N,))."""
    return (head(features).argmax(1) == labels).numpy()


def head_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of final layer ``head`` on precomputed features (A_f for the full layer, A_d decomposed)."""
    return float(correct(head, features, labels).mean())


def relative_accuracy(linear: nn.Linear, sets, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """A_d, A_f and r_A = A_d / A_f of the layer decomposed on ``sets``, on the given (test) features."""
    a_f = head_accuracy(linear, features, labels)
    a_d = head_accuracy(DecomposedLinear(linear, sets), features, labels)
    return {"A_d": a_d, "A_f": a_f, "r_A": a_d / a_f}


def grid_correct(linear: nn.Linear, train_features: torch.Tensor, train_labels: torch.Tensor,
                 test_features: torch.Tensor, test_labels: torch.Tensor, k1s, k2s) -> np.ndarray:
    """Fig. 1: per test image, whether the layer decomposed with S_y from (k1, k2) is right, for every k1
    (rows) and every k2 (columns), k2 > k1 included: (len(k1s), len(k2s), N) bool."""
    n, d = linear.weight.shape
    ranks = instance_ranks(train_features)
    out = np.zeros((len(k1s), len(k2s), len(test_labels)), dtype=bool)
    for i, k1 in enumerate(k1s):
        hist = class_histograms(ranks, train_labels, k1, n)
        for j, k2 in enumerate(k2s):
            out[i, j] = correct(DecomposedLinear(linear, top_rows(hist, k2)), test_features, test_labels)
    return out


def r_a_grid(linear: nn.Linear, train_features: torch.Tensor, train_labels: torch.Tensor,
             test_features: torch.Tensor, test_labels: torch.Tensor, k1s, k2s) -> np.ndarray:
    """Fig. 1: r_A = A_d / A_f on the test features for every (k1, k2) (rows k1, columns k2)."""
    a_f = head_accuracy(linear, test_features, test_labels)
    return grid_correct(linear, train_features, train_labels, test_features, test_labels, k1s, k2s).mean(-1) / a_f


def jaccard_matrix(sets, other=None) -> np.ndarray:
    """Overlap |S_a ∩ T_b| / |S_a ∪ T_b| of every pair of rows of ``sets`` and ``other`` (default: ``sets``
    itself, then 1 on the diagonal)."""
    rows = [set(r) for r in torch.as_tensor(sets).tolist()]
    cols = rows if other is None else [set(r) for r in torch.as_tensor(other).tolist()]
    return np.array([[len(a & b) / len(a | b) for b in cols] for a in rows])


def histogram_share(hist: torch.Tensor, sets) -> np.ndarray:
    """Per class, the share of the histogram's counts that fall on S_y (how concentrated HIST is)."""
    sets = torch.as_tensor(sets, dtype=torch.long)
    return (hist.gather(1, sets).sum(1) / hist.sum(1).clamp_min(1)).numpy().astype(float)


def feature_use(sets, d: int) -> np.ndarray:
    """Membership (n, d): 1 where feature j is in S_y."""
    sets = torch.as_tensor(sets, dtype=torch.long)
    return torch.zeros(sets.shape[0], d).scatter_(1, sets, 1.0).numpy()


# --- retraining ---------------------------------------------------------------------------------------

def retrain(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int = 1, lr: float = 1e-4,
            batch_size: int = 64, seed: int = 0, threads: int = 1,
            test: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """The head-only recipe: retrain a copy of the final layer ``head`` on fixed features (the backbone
    frozen, its BatchNorm in eval mode, no augmentation) with Adam, on ``threads`` intra-op threads.

    Returns the trained copy and its history: test accuracy after each epoch (epoch 0 = before), steps.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ParameterError(f"epochs={epochs!r} is not allowed; expected an int >= 0")
    head = copy.deepcopy(head).train()
    history = {"epoch": [0], "test_acc": [head_accuracy(head, *test) if test else float("nan")], "steps": 0}
    with runtime.threads(threads):
        gen = seed_everything(seed)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
                loss = F.cross_entropy(head(features[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history["steps"] += 1
            history["epoch"].append(epoch)
            history["test_acc"].append(head_accuracy(head, *test) if test else float("nan"))
    return head.eval(), history


def network_config(epochs: int, lr: float, batch_size: int, augment: bool, threads: int) -> train.TrainConfig:
    """The public code's retraining (its ``main.py``): every parameter, the decomposed head in place,
    BatchNorm in train mode, Adam at a constant rate, no weight decay, augmented images (random shifts
    and horizontal flips)."""
    return train.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer="adam", weight_decay=0.0,
                             schedule="none", augment=augment, channels_last=True, threads=threads)


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n_images`` at ``batch_size`` (the last batch may be short)."""
    return -(-n_images // batch_size)


# --- intervals ----------------------------------------------------------------------------------------

class Resampler:
    """A paired bootstrap over seeds and test images. Each of ``n_boot`` replicates draws ``n_seeds``
    seeds and ``n_images`` test images with replacement; every quantity compared is evaluated on the same
    draws, so differences are paired. Sums of 0/1 correctness with integer weights are exact in float64,
    so the result does not depend on the thread count."""

    def __init__(self, n_seeds: int, n_images: int, n_boot: int = 1000, seed: int = 0):
        if n_seeds < 1 or n_images < 1 or n_boot < 1:
            raise ParameterError(f"a bootstrap needs seeds, images and replicates (got {n_seeds}, {n_images}, "
                                 f"{n_boot})")
        rng = np.random.default_rng(seed)
        self.n_seeds, self.n_images, self.n_boot = n_seeds, n_images, n_boot
        self.seed_draws = rng.integers(0, n_seeds, (n_boot, n_seeds))
        self.image_counts = np.stack([np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
                                      for _ in range(n_boot)]).astype(np.float64)

    def means(self, values) -> tuple[float, np.ndarray]:
        """The mean of ``values`` ((n_seeds, n_images), or (n_images,) for one shared over seeds) and its
        ``n_boot`` replicate means."""
        a = np.atleast_2d(np.asarray(values, dtype=np.float64))
        if a.shape[1] != self.n_images or a.shape[0] not in (1, self.n_seeds):
            raise ValueError(f"values of shape {a.shape} do not fit {self.n_seeds} seeds x {self.n_images} images")
        per_seed = (a @ self.image_counts.T) / self.n_images  # (seeds, replicates)
        if a.shape[0] == 1:
            return float(a.mean()), per_seed[0]
        return float(a.mean()), per_seed[self.seed_draws.T, np.arange(self.n_boot)].mean(0)

    def estimate(self, stat: Callable[[dict], float], values: Mapping[str, np.ndarray]) -> Estimate:
        """``stat`` of the means of ``values`` (name -> array), with its percentile bootstrap interval."""
        point, samples = {}, {}
        for name, v in values.items():
            point[name], samples[name] = self.means(v)
        return Estimate.bootstrap(float(stat(point)), np.asarray(stat(samples), float), self.n_seeds,
                                  method=f"paired bootstrap over {self.n_seeds} seed(s) and "
                                         f"{self.n_images:,} test images")


def ratio(m) -> float:
    """r_A from means: ``m['dec'] / m['full']``."""
    return m["dec"] / m["full"]


def gap_ratio(m) -> float:
    """Difference of two r_A on the same test images: ``(m['a'] - m['b']) / m['full']``."""
    return (m["a"] - m["b"]) / m["full"]


def gap(m) -> float:
    """Difference of two accuracies on the same test images: ``m['a'] - m['b']``."""
    return m["a"] - m["b"]


def ols(y, *xs) -> list[Estimate]:
    """Least squares y = b0 + b1 x1 + ...: an :class:`Estimate` of each slope b1.. with its t interval
    (n - p degrees of freedom; no interval when there are none)."""
    from scipy.stats import t as student

    y = np.asarray(y, float)
    X = np.column_stack([np.ones_like(y), *[np.asarray(x, float) for x in xs]])
    n, p = X.shape
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    df = n - p
    if df < 1 or np.linalg.matrix_rank(X) < p:
        return [Estimate(float(c), math.nan, math.nan, n, "least squares: too few points") for c in coef[1:]]
    resid = y - X @ coef
    cov = (resid @ resid / df) * np.linalg.inv(X.T @ X)
    half = student.ppf(0.5 + claims.LEVEL / 2, df) * np.sqrt(np.diag(cov))
    return [Estimate(float(c), float(c - h), float(c + h), n, f"least squares, t({df}) interval")
            for c, h in zip(coef[1:], half[1:])]


# --- the chapter --------------------------------------------------------------------------------------

def check_widths(P, d: int) -> None:
    """Stop with the parameter's name as the user wrote it when a k exceeds the width d of the final layer."""
    for name in ("k1", "k2"):
        v = getattr(P, name)
        if not 1 <= v <= d:
            raise ParameterError(f"{name}={v!r} is not allowed; expected an int in [1, {d}] (the final layer "
                                 f"has d = {d} features)")
    for name in ("k1_values", "k2_values"):
        values = getattr(P, name)
        for i, v in enumerate(values):
            if not 1 <= v <= d:
                raise ParameterError(f"{name}={list(values)!r}: element [{i}] = {v!r} is not allowed; expected "
                                     f"ints in [1, {d}] (the final layer has d = {d} features)")


@dataclass
class Draw:
    """What one seed draws on the network: the training images Algorithm 1 and the retraining see, and
    their features."""

    seed: int
    split: Split
    features: torch.Tensor

    def sets(self, k1: int, k2: int, n_classes: int) -> torch.Tensor:
        return influential_sets(self.features, self.split.y, k1, k2, n_classes)


@dataclass
class Setup:
    """Chapter 3's network and data: chapter 0's ResNet (seed ``P.network_seed``), its test features, one
    :class:`Draw` per seed, and the bootstrap over those seeds and the test images."""

    P: SimpleNamespace
    baseline: baselines.Baseline
    test: Split
    f_test: torch.Tensor
    draws: list[Draw]
    boot: Resampler

    @property
    def net(self) -> nn.Module:
        return self.baseline.model

    @property
    def fc(self) -> nn.Linear:
        return self.baseline.model.fc

    @property
    def d(self) -> int:
        return self.fc.in_features

    @property
    def n_classes(self) -> int:
        return self.fc.out_features

    @property
    def classes(self) -> list[str]:
        return list(self.test.classes)

    def correct(self, head: nn.Module) -> np.ndarray:
        """Per test image, whether ``head`` on the test features is right."""
        return correct(head, self.f_test, self.test.y)

    def full(self) -> np.ndarray:
        return self.correct(self.fc)

    def alg1(self, k1: int, k2: int) -> np.ndarray:
        """Correctness (seeds, N) of the layer decomposed on each seed's S_y for (k1, k2)."""
        return np.stack([self.correct(DecomposedLinear(self.fc, dr.sets(k1, k2, self.n_classes)))
                         for dr in self.draws])

    def summary(self) -> pd.Series:
        f = torch.cat([dr.features for dr in self.draws])
        r = self.baseline.recipe
        return pd.Series({"data": r.dataset, "network": f"ResNet-{r.model_kwargs['depth']}, chapter 0, seed "
                          f"{self.baseline.seed}", "training images per seed": f"{len(self.draws[0].split):,}",
                          "seeds": ", ".join(str(dr.seed) for dr in self.draws),
                          "test images": f"{len(self.test):,}", "feature width d": self.d,
                          "classes n": self.n_classes, "smallest feature": f"{float(f.min()):.3f}",
                          "A_f (test accuracy)": f"{float(self.full().mean()):.4f}"}, name="value")

    def numbers(self) -> dict:
        r = self.baseline.recipe
        return {"data_name": r.dataset, "n_train": f"{len(self.draws[0].split):,}", "n_test": f"{len(self.test):,}",
                "d": self.d, "n_classes": self.n_classes, "a_full": float(self.full().mean()),
                "feat_min": float(min(float(dr.features.min()) for dr in self.draws)),
                "resnet_epochs": r.config.epochs, "n_seeds": len(self.draws), "network_seed": self.baseline.seed,
                "seed_list": ", ".join(str(dr.seed) for dr in self.draws), "n_boot": self.boot.n_boot,
                "random_seeds": self.P.random_seeds}


def setup(P) -> Setup:
    """Load chapter 0's ResNet (trained there on a cache miss), check the k parameters against its width,
    and featurise the test images and each seed's training images."""
    base = baselines.get("resnet20", P, seed=P.network_seed, dataset=P.dataset)
    check_widths(P, base.model.fc.in_features)
    test = base.test.subset(P.max_test_images, P.network_seed)
    f_test = extract_features(base.model, test.x, device=P.device, progress=True)
    draws = []
    for s in P.seeds:
        split = base.train.subset(P.max_images, s)
        draws.append(Draw(s, split, extract_features(base.model, split.x, device=P.device, progress=True)))
    return Setup(P, base, test, f_test, draws, Resampler(len(draws), len(test), P.bootstrap, seed=P.seed))


@dataclass
class Algorithm1:
    """Algorithm 1 at (k1, k2) on every seed: the first seed's HIST, everyone's S_y, and how stable S_y is."""

    k1: int
    k2: int
    hist: torch.Tensor
    counts: torch.Tensor
    sets: list[torch.Tensor]
    classes: list[str]

    def share(self) -> np.ndarray:
        return histogram_share(self.hist, self.sets[0])

    def stability(self) -> float:
        """Mean Jaccard overlap of a class's S_y between two seeds (1: the same sets on every draw)."""
        if len(self.sets) < 2:
            return float("nan")
        pairs = [(a, b) for i, a in enumerate(self.sets) for b in self.sets[i + 1:]]
        return float(np.mean([np.diag(jaccard_matrix(a, b)).mean() for a, b in pairs]))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"S_y (first seed)": [", ".join(map(str, sorted(s))) for s in self.sets[0].tolist()],
                             "share of HIST on S_y": self.share()}, index=self.classes).style.format(
            {"share of HIST on S_y": "{:.3f}"})

    def figure(self) -> Figure:
        return histogram_figure(self.hist, self.sets[0], self.counts, self.classes)

    def numbers(self) -> dict:
        return {"k1": self.k1, "k2": self.k2, "hist_share": float(self.share().mean()),
                "hist_share_uniform": self.k2 / self.hist.shape[1], "sets_stability": self.stability(),
                "fig_hist": self.figure()}


def algorithm1(S: Setup) -> Algorithm1:
    """Algorithm 1 at the chapter's (k1, k2) on every seed's training images."""
    P, first = S.P, S.draws[0]
    hist = class_histograms(instance_ranks(first.features), first.split.y, P.k1, S.n_classes)
    return Algorithm1(P.k1, P.k2, hist, torch.bincount(first.split.y, minlength=S.n_classes),
                      [dr.sets(P.k1, P.k2, S.n_classes) for dr in S.draws], S.classes)


@dataclass
class Mass:
    """Sec. 4.4's variant: the k1 whose top-k1 features cover ``mass`` of the l1 norm, per seed."""

    mass: float
    coverage: np.ndarray  # (seeds, d)
    k1s: list[int]
    r_a: float  # first seed, k1 = k2 = its k1

    def estimate(self) -> Estimate:
        return Estimate.over_seeds(self.k1s)

    def figure(self) -> Figure:
        d = self.coverage.shape[1]
        fig = new_figure(6.0, 3.2)
        ax = fig.subplots()
        ks = np.arange(1, d + 1)
        for i, c in enumerate(self.coverage):
            ax.plot(ks, c, color="tab:blue", alpha=0.6, label="c(k), one line per seed" if i == 0 else None)
        ax.axhline(self.mass, color="gray", linestyle="--", label=f"{self.mass:.0%} of the mass")
        ax.axvline(self.k1s[0], color="tab:blue", linestyle=":", label=f"k1 = {self.k1s[0]} (ours)")
        ax.axvline(PAPER["k1_mass90"], color="tab:red", linestyle=":", label=f"k1 = {PAPER['k1_mass90']} (the paper)")
        ax.set(xlabel="k (largest features of an image)", ylabel="mean share of the image's l1 norm")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        return fig

    def numbers(self) -> dict:
        k = min(PAPER["k1_mass90"], self.coverage.shape[1])
        reading = ("far more than the paper's: our pooled features are spread more evenly over the channels"
                   if min(self.k1s) > PAPER["k1_mass90"] else
                   "no more than the paper's: as there, a few features hold most of the mass"
                   if max(self.k1s) <= PAPER["k1_mass90"] else "more than the paper's on some seeds only")
        return {"mass": self.mass, "k1_mass": self.k1s[0], "k1_mass_max": max(self.k1s), "mass_reading": reading,
                "cov_at_paper_k1": float(self.coverage[:, k - 1].mean()), "r_a_mass": self.r_a,
                "fig_mass": self.figure()}


def mass(S: Setup) -> Mass:
    """Coverage c(k) and the k1 for the chapter's ``mass`` on each seed's training features."""
    cov = np.stack([mass_coverage(dr.features).numpy() for dr in S.draws])
    k1s = [k1_for_mass(dr.features, S.P.mass) for dr in S.draws]
    first = S.draws[0]
    r_a = relative_accuracy(S.fc, first.sets(k1s[0], k1s[0], S.n_classes), S.f_test, S.test.y)["r_A"]
    return Mass(S.P.mass, cov, k1s, r_a)


@dataclass
class Decomposition:
    """The decomposed layer at the chapter's (k1, k2): equivalence checks, accuracy, cost, class overlap."""

    diff_all: float
    diff_swap: float
    r_a: Estimate
    a_d: float
    cost: int
    d: int
    n_classes: int
    jaccard: float
    jaccard_random: float
    n_used: int
    sets: torch.Tensor
    classes: list[str]

    def table(self) -> pd.DataFrame:
        rows = {"max |decomposed(all features) - fc| on test features": f"{self.diff_all:.1e}",
                "max |network with decomposed head - head(features)|": f"{self.diff_swap:.1e}",
                "A_d (mean over seeds)": f"{self.a_d:.4f}", "r_A = A_d / A_f": self.r_a.text(),
                "multiply-adds, full layer d x n": f"{self.d * self.n_classes}",
                "multiply-adds, decomposed": f"{self.cost}",
                "distinct features read (first seed)": f"{self.n_used} of {self.d}"}
        return pd.Series(rows, name="value").to_frame()

    def figure(self) -> Figure:
        return overlap_figure(self.sets, self.d, self.classes)

    def numbers(self) -> dict:
        return {"diff_all": self.diff_all, "diff_swap": self.diff_swap, "a_d": self.a_d, "r_a": self.r_a.mean,
                "r_a_text": self.r_a.text(), "cost_full": self.d * self.n_classes, "cost_dec": self.cost,
                "jac_mean": self.jaccard, "jac_random": self.jaccard_random, "n_used": self.n_used,
                "n_slots": self.cost, "jac_verdict": "less" if self.jaccard < self.jaccard_random else "no less",
                "fig_overlap": self.figure()}


def decomposition(S: Setup) -> Decomposition:
    """Check the decomposed layer against ``fc`` and inside the network, and measure it at (k1, k2)."""
    P = S.P
    sets = S.draws[0].sets(P.k1, P.k2, S.n_classes)
    head = DecomposedLinear(S.fc, sets)
    with torch.no_grad():
        every = DecomposedLinear(S.fc, torch.arange(S.d).repeat(S.n_classes, 1))
        diff_all = float((every(S.f_test) - S.fc(S.f_test)).abs().max())
        probe = S.test.x[:64]
        diff_swap = float((with_head(S.net, head)(probe) - head(extract_features(S.net, probe))).abs().max())
    dec = S.alg1(P.k1, P.k2)
    r_a = S.boot.estimate(ratio, {"dec": dec, "full": S.full()})
    off = ~np.eye(S.n_classes, dtype=bool)
    rand = np.mean([jaccard_matrix(random_sets(S.n_classes, S.d, P.k2, 1000 + r))[off].mean()
                    for r in range(P.random_seeds)])
    return Decomposition(diff_all, diff_swap, r_a, float(dec.mean()), head.cost(), S.d, S.n_classes,
                         float(jaccard_matrix(sets)[off].mean()), float(rand),
                         int((feature_use(sets, S.d).sum(0) > 0).sum()), sets, S.classes)


@dataclass
class Grid:
    """Fig. 1: r_A for every (k1, k2) on every seed, and the claims read off it."""

    k1s: list[int]
    k2s: list[int]
    r_a: np.ndarray  # (seeds, k1, k2)
    neighbours: dict[str, Estimate]  # claim 2a: r_A(k1, k1) - the best neighbouring k2, per k1
    large_k1: Estimate | None  # claim 2b: r_A(k2, k2) - r_A(largest k1 < d, k2)
    large_k1_value: int | None
    k2_fixed: int
    k3: Estimate  # claim 1a: r_A at k1 = k2 = 3
    a_d_3: float

    def mean(self) -> np.ndarray:
        return self.r_a.mean(0)

    def table(self):
        return pd.DataFrame(self.mean(), index=pd.Index(self.k1s, name="k1"),
                            columns=pd.Index(self.k2s, name="k2")).style.format(precision=3)

    def figure(self) -> Figure:
        return grid_figure(self.r_a, self.k1s, self.k2s)

    def numbers(self) -> dict:
        parts = list(self.neighbours.values())
        n_best = sum(e.mean > 0 for e in parts)
        out = {"n_diag_best": n_best, "n_diag_rows": len(parts), "r_a_3": self.k3.mean, "r_a_3_text": self.k3.text(),
               "a_d_3": self.a_d_3, "k2_fixed": self.k2_fixed, "fig_grid": self.figure()}
        if self.large_k1 is not None:
            i_small, i_big = self.k1s.index(self.k2_fixed), self.k1s.index(self.large_k1_value)
            j = self.k2s.index(self.k2_fixed)
            m = self.mean()
            out |= {"k1_large": self.large_k1_value, "r_small_k": float(m[i_small, j]),
                    "r_big_k1": float(m[i_big, j]), "large_k1_gap": self.large_k1.text()}
        return out


def _neighbours(k: int, ks: list[int], d: int) -> list[int]:
    below = [x for x in ks if x < k]
    above = [x for x in ks if k < x < d]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def grid(S: Setup) -> Grid:
    """r_A over the (k1, k2) grid on every seed; claim 2a per k1 (k2 = k1 against the neighbouring k2 of
    the grid, below d, on both sides), claim 2b at k2 = the chapter's k2, claim 1a at k1 = k2 = 3."""
    P = S.P
    k1s, k2s = list(P.k1_values), list(P.k2_values)
    full = S.full()
    cells = np.stack([grid_correct(S.fc, dr.features, dr.split.y, S.f_test, S.test.y, k1s, k2s) for dr in S.draws])
    r_a = cells.mean(-1) / full.mean()
    parts = {}
    for i, k1 in enumerate(k1s):
        near = _neighbours(k1, k2s, S.d)
        if k1 not in k2s or k1 >= S.d or not near:
            continue
        diag = cells[:, i, k2s.index(k1)]
        others = {f"o{k}": cells[:, i, k2s.index(k)] for k in near}
        parts[f"k1 = {k1} (vs k2 = {', '.join(map(str, near))})"] = S.boot.estimate(
            lambda m: (m["diag"] - np.maximum.reduce([m[k] for k in others])) / m["full"],
            {"diag": diag, **others, "full": full})
    big = max((k for k in k1s if k < S.d), default=None)
    k2 = P.k2
    large = None
    if big is not None and big > k2 and k2 in k1s and k2 in k2s:
        j = k2s.index(k2)
        large = S.boot.estimate(gap_ratio, {"a": cells[:, k1s.index(k2), j], "b": cells[:, k1s.index(big), j],
                                            "full": full})
    k3 = min(3, S.d)
    dec3 = S.alg1(k3, k3)
    return Grid(k1s, k2s, r_a, parts, large, big if large is not None else None, k2,
                S.boot.estimate(ratio, {"dec": dec3, "full": full}), float(dec3.mean()))


@dataclass
class Rules:
    """Beyond the paper: three ways to choose S_y at every k2 (Algorithm 1 with k1 = k2, the largest
    |W[y, j]|, random sets), per seed; claim 7 per k2."""

    k2s: list[int]
    alg: np.ndarray  # (seeds, k2) r_A
    weights: np.ndarray  # (k2,) r_A (no seed involved)
    random: np.ndarray  # (seeds, random seeds, k2) r_A
    versus_weights: dict[str, Estimate]
    versus_random: Estimate  # Algorithm 1 - random sets, at the chapter's k2
    k2: int

    def table(self):
        df = pd.DataFrame({"Algorithm 1 (k1 = k2), mean over seeds": self.alg.mean(0),
                           "top |W[y, j]|": self.weights, "random sets, mean": self.random.mean((0, 1)),
                           "random sets, min": self.random.min((0, 1)), "random sets, max": self.random.max((0, 1))},
                          index=pd.Index(self.k2s, name="k2"))
        return df.style.format(precision=3)

    def figure(self) -> Figure:
        fig = new_figure(7.0, 3.8)
        ax = fig.subplots()
        k = np.asarray(self.k2s)
        for i, row in enumerate(self.alg):
            ax.plot(k, row, color="tab:orange", marker="o", alpha=0.7,
                    label="Algorithm 1 (k1 = k2), one line per seed" if i == 0 else None)
        ax.plot(k, self.weights, color="tab:green", marker="s", label="top |W[y, j]|")
        rnd = self.random.reshape(-1, len(k))
        ax.plot(k, rnd.mean(0), color="tab:gray", marker="^", label="random sets (mean)")
        ax.fill_between(k, rnd.min(0), rnd.max(0), color="tab:gray", alpha=0.2, label="random sets (range)")
        ax.set(xscale="log", xlabel="k2 (features kept per class, log scale)",
               ylabel="r_A = A_d / A_f (ratio of accuracies)", title="choosing S_y, no retraining")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        return fig

    def numbers(self) -> dict:
        parts = list(self.versus_weights.values())
        at = self.k2s.index(self.k2) if self.k2 in self.k2s else None
        return {"n_alg_wins": sum(e.lo > 0 for e in parts if e.has_interval),
                "n_w_wins": sum(e.hi < 0 for e in parts if e.has_interval), "n_k2_parts": len(parts),
                "alg_adv": float(np.mean([e.mean for e in parts])) if parts else float("nan"),
                "vs_random": self.versus_random.text(),
                "rand_r": float(self.random.mean((0, 1))[at]) if at is not None else float("nan"),
                "fig_rules": self.figure()}


def rules(S: Setup) -> Rules:
    """Algorithm 1, |W| and random sets at every k2 of the grid (k1 = k2 for Algorithm 1); claim 7 as the
    paired r_A difference Algorithm 1 - |W| at every k2 below d; Algorithm 1 against random sets (the
    null) at the chapter's k2."""
    P = S.P
    k2s = list(P.k2_values)
    full = S.full()

    def random_correct(k):  # (seeds, random sets, N)
        return np.stack([np.stack([S.correct(DecomposedLinear(S.fc, random_sets(S.n_classes, S.d, k, _mix(dr.seed, r))))
                                   for r in range(P.random_seeds)]) for dr in S.draws])

    alg_c = {k: S.alg1(k, k) for k in k2s}
    w_c = {k: S.correct(DecomposedLinear(S.fc, weight_sets(S.fc.weight, k))) for k in k2s}
    rand_c = {k: random_correct(k) for k in k2s}
    parts = {f"k2 = {k}": S.boot.estimate(gap_ratio, {"a": alg_c[k], "b": w_c[k], "full": full})
             for k in k2s if k < S.d}
    at_k2 = rand_c[P.k2] if P.k2 in rand_c else random_correct(P.k2)
    alg_k2 = alg_c[P.k2] if P.k2 in alg_c else S.alg1(P.k2, P.k2)
    vs_random = S.boot.estimate(gap_ratio, {"a": alg_k2, "b": at_k2.mean(1), "full": full})
    return Rules(k2s, np.stack([alg_c[k].mean(1) for k in k2s], 1) / full.mean(),
                 np.array([w_c[k].mean() for k in k2s]) / full.mean(),
                 np.stack([rand_c[k].mean(-1) for k in k2s], -1) / full.mean(), parts, vs_random, P.k2)


def _mix(seed: int, r: int) -> int:
    """A seed for the r-th random set drawn under chapter seed ``seed`` (distinct for distinct pairs)."""
    return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


@dataclass
class Retraining:
    """Sec. 5.2.3: the decomposed network retrained for the paper's "one epoch", in two recipes, per seed.

    ``network``: the public code's recipe (every parameter, BatchNorm in train mode, augmented images);
    ``head``: the decomposed layer alone on fixed features. Same images, steps, batch and learning rate.
    ``control``: the original network with its full layer, retrained like ``network``, on the first seed
    (absent without ``retrain_control``)."""

    k1: int
    k2: int
    steps: int
    epochs: int
    batch_size: int
    lr: float
    augment: bool
    n_images: int
    correct: dict[str, np.ndarray]  # before / head / network / control -> (seeds, N); full -> (N,)
    estimates: dict[str, Estimate]
    seeds: list[int]

    def accuracies(self) -> pd.DataFrame:
        """Test accuracy per seed (rows) and recipe (columns)."""
        return pd.DataFrame({RECIPE_NAMES[k]: pd.Series(v.mean(1), index=self.seeds[:len(v)])
                             for k, v in self.correct.items() if k != "full"}).rename_axis("seed")

    def table(self):
        a_f = float(self.correct["full"].mean())
        rows = {RECIPE_NAMES[k]: {"test accuracy (mean over seeds)": f"{v.mean():.4f}",
                                  "minus A_f (95% interval)": self.estimates[k].text(".4f")}
                for k, v in self.correct.items() if k != "full"}
        rows["original network, full layer (A_f)"] = {"test accuracy (mean over seeds)": f"{a_f:.4f}",
                                                      "minus A_f (95% interval)": "0"}
        return pd.DataFrame(rows).T

    def figure(self) -> Figure:
        a_f = float(self.correct["full"].mean())
        keys = [k for k in ("before", "head", "network", "control") if k in self.correct]
        fig = new_figure(8.0, 3.8)
        ax = fig.subplots()
        for x, k in enumerate(keys):
            per_seed = 100 * (self.correct[k].mean(1) - a_f)
            ax.scatter(np.full(len(per_seed), x), per_seed, color="tab:blue", zorder=3,
                       label="ours, one mark per seed" if x == 0 else None)
            e = self.estimates[k]
            ax.errorbar(x + 0.12, 100 * e.mean, yerr=[[100 * (e.mean - e.lo)], [100 * (e.hi - e.mean)]],
                        fmt="_", color="black", capsize=4, label="ours, mean and 95% interval" if x == 0 else None)
        paper = {"before": PAPER["A_d_k5"] - PAPER["A_f"][1], "network": PAPER["retrained"] - PAPER["A_f"][1]}
        for x, k in enumerate(keys):
            if k in paper:
                ax.scatter([x - 0.12], [100 * paper[k]], marker="*", s=120, color="tab:red", zorder=3,
                           label="the paper (CIFAR-10)" if k == "before" else None)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.axhline(-100 * claims.CF_RECOVERY_TOLERANCE, color="gray", linestyle=":", linewidth=0.8,
                   label=f"claim 3's bar: {100 * claims.CF_RECOVERY_TOLERANCE:.1f} points below A_f")
        ax.set_xticks(range(len(keys)), [RECIPE_NAMES[k].replace(", ", ",\n") for k in keys], fontsize="small")
        ax.set(ylabel="test accuracy minus A_f (points)",
               title=f"decomposed at k1 = {self.k1}, k2 = {self.k2}; {self.steps} steps of {self.batch_size} images")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="x-small")
        return fig

    def numbers(self) -> dict:
        m = {k: float(v.mean()) for k, v in self.correct.items()}
        out = {"rt_steps": self.steps, "rt_epochs": self.epochs, "rt_batch": self.batch_size, "rt_lr": self.lr,
               "rt_images": f"{self.n_images:,}", "rt_paper_steps": steps_per_epoch(PAPER["cifar10_train"],
                                                                                    self.batch_size),
               "rt_before": m["before"], "rt_head": m["head"], "rt_network": m["network"],
               "rt_network_gap": self.estimates["network"].text(".4f"),
               "rt_head_gap": self.estimates["head"].text(".4f"),
               "rt_network_vs_head": self.estimates["network_vs_head"].text(".4f"),
               "rt_augment": "with" if self.augment else "without", "fig_retrain": self.figure()}
        if "control" in m:
            e = self.estimates["control"]
            out["rt_control_reading"] = (
                "the control gains too, so part of what the retraining gives back is further training of the "
                "network, not recovery from the decomposition" if e.lo > 0 else
                "the control loses accuracy: the recipe itself (its augmentation and constant learning rate) "
                "costs accuracy on this network, also when nothing is decomposed" if e.hi < 0 else
                "the control stays within its interval of A_f: the recipe alone neither adds nor removes "
                "accuracy measurably, so what the decomposed network regains is recovery from the decomposition")
            out |= {"rt_control": m["control"], "rt_control_gap": self.estimates["control"].text(".4f"),
                    "rt_network_vs_control": self.estimates["network_vs_control"].text(".4f")}
        else:
            out |= {"rt_control": float("nan"), "rt_control_gap": "not run", "rt_network_vs_control": "not run",
                    "rt_control_reading": "the control was not run (retrain_control=False)"}
        return out


RECIPE_NAMES = {"before": "decomposed, before retraining", "head": "head only, fixed features",
                "network": "whole network (the public code)",
                "control": "control: full layer, whole network (first seed)"}


def retraining(S: Setup) -> Retraining:
    """Retrain the network decomposed at (k1, k2) on each seed's training images for ``retrain_epochs``
    passes, in both recipes (and, with ``retrain_control``, the control on the first seed); every
    accuracy on the same test images. Claim 3 is the whole-network recipe's accuracy minus A_f."""
    P = S.P
    cfg = network_config(P.retrain_epochs, P.retrain_lr, RETRAIN_BATCH_SIZE, RETRAIN_AUGMENT, P.threads)
    full = S.full()
    out = {k: [] for k in ("before", "head", "network") + (("control",) if P.retrain_control else ())}
    for dr in S.draws:
        head = DecomposedLinear(S.fc, dr.sets(P.k1, P.k2, S.n_classes))
        out["before"].append(S.correct(head))
        trained, _ = retrain(head, dr.features, dr.split.y, P.retrain_epochs, P.retrain_lr, RETRAIN_BATCH_SIZE,
                             dr.seed, P.threads)
        out["head"].append(S.correct(trained))
        for key, start in (("network", head), ("control", S.fc)):
            if key in out and (key == "network" or dr is S.draws[0]):  # the control: on the first seed
                model = with_head(S.net, start)
                train.fit(model, dr.split, None, cfg, seed=dr.seed, device=P.device, desc=f"{key}, seed {dr.seed}")
                pred = train.predict(model, S.test.x, device=get_device(P.device)).argmax(1)
                out[key].append((pred == S.test.y).numpy())
    correct_ = {k: np.stack(v) for k, v in out.items()}
    est = {k: S.boot.estimate(gap, {"a": v, "b": full}) for k, v in correct_.items() if k != "control"}
    est["network_vs_head"] = S.boot.estimate(gap, {"a": correct_["network"], "b": correct_["head"]})
    if "control" in correct_:  # one seed: the interval covers the test images only
        first = Resampler(1, len(S.test), P.bootstrap, seed=P.seed)
        est["control"] = first.estimate(gap, {"a": correct_["control"], "b": full})
        est["network_vs_control"] = first.estimate(gap, {"a": correct_["network"][:1], "b": correct_["control"]})
    n = len(S.draws[0].split)
    return Retraining(P.k1, P.k2, P.retrain_epochs * steps_per_epoch(n, RETRAIN_BATCH_SIZE), P.retrain_epochs,
                      RETRAIN_BATCH_SIZE, P.retrain_lr, RETRAIN_AUGMENT, n, {**correct_, "full": full}, est,
                      [dr.seed for dr in S.draws])


@dataclass
class Depth:
    """Fig. 2 on our data: ResNets of several depths trained alike, several seeds each, decomposed at
    (k1, k2); r_A per network, per depth (with an interval) and its slope against depth."""

    rows: pd.DataFrame  # one row per network: depth, seed, A_f, A_d, r_A, cached
    per_depth: dict[int, Estimate]
    slope: Estimate  # r_A per 10 layers
    slope_a_f: Estimate  # A_f per 10 layers
    slope_given_a_f: Estimate  # r_A per 10 layers with A_f held fixed
    recipe: str
    k1: int
    k2: int
    dataset: str

    def table(self):
        df = self.rows.copy()
        df["from cache"] = df["from cache"].map({True: "yes", False: "no"})
        return df.set_index(["model", "seed"]).style.format({"A_f": "{:.4f}", "A_d": "{:.4f}", "r_A": "{:.3f}"})

    def summary(self) -> pd.DataFrame:
        g = self.rows.groupby("depth")
        return pd.DataFrame({"networks": g.size(), "A_f (mean)": g["A_f"].mean().map("{:.4f}".format),
                             "r_A (95% interval over seeds and test images)":
                                 {k: e.text() for k, e in self.per_depth.items()}}).rename_axis("depth")

    def figure(self) -> Figure:
        fig = new_figure(10, 3.6)
        ax_ours, ax_paper = fig.subplots(1, 2, sharey=True)
        depths = sorted(self.per_depth)
        ax_ours.scatter(self.rows["depth"], self.rows["r_A"], color="black", alpha=0.6, label="one network (seed)")
        mean = [self.per_depth[k].mean for k in depths]
        lo = [self.per_depth[k].mean - self.per_depth[k].lo for k in depths]
        hi = [self.per_depth[k].hi - self.per_depth[k].mean for k in depths]
        ax_ours.errorbar(depths, mean, yerr=[lo, hi], color="black", marker="o", capsize=4, fillstyle="none",
                         label="mean, 95% interval")
        ax_ours.set(title=f"ours: ResNets on {self.dataset}, k1 = {self.k1}, k2 = {self.k2}",
                    xlabel="depth (layers)", ylabel="r_A = A_d / A_f (ratio of accuracies)")
        for family, models_ in reference.CLASS_FILTERS_IMAGENET.items():
            ax_paper.plot([m[1] for m in models_], [m[2] for m in models_], marker="o", label=family)
        ax_paper.set(title="the paper: ImageNet, k1 = k2 = 50", xlabel="depth (layers)")
        for ax in (ax_ours, ax_paper):
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
        return fig

    def numbers(self) -> dict:
        a_f = self.rows.groupby("depth")["A_f"].mean()
        return {"depth_list": "/".join(str(k) for k in sorted(self.per_depth)), "depth_recipe": self.recipe,
                "depth_slope": self.slope.text(), "depth_slope_a_f": self.slope_a_f.text(".4f"),
                "depth_slope_given_a_f": self.slope_given_a_f.text(), "depth_n": len(self.rows),
                "depth_a_f_range": f"{a_f.min():.3f} to {a_f.max():.3f}",
                "depth_r_a_range": f"{min(e.mean for e in self.per_depth.values()):.3f} to "
                                   f"{max(e.mean for e in self.per_depth.values()):.3f}",
                "fig_depth": self.figure()}


def depth_recipe(P, depth: int) -> train.Recipe:
    """The depth study's recipe: chapter 0's ResNet recipe at ``depth``, on ``depth_train_images`` images
    for ``depth_epochs`` epochs at ``depth_batch_size`` (the learning rate scaled with the batch), tested
    once at the end."""
    base = baselines.recipe("resnet20", P.size, dataset=P.dataset, depth=depth)
    epochs = P.depth_epochs or base.config.epochs
    lr = base.config.lr * P.depth_batch_size / base.config.batch_size
    return baselines.recipe("resnet20", P.size, dataset=P.dataset, depth=depth, train_subset=P.depth_train_images,
                            epochs=epochs, batch_size=P.depth_batch_size, lr=lr, eval_every=epochs)


def depth_study(S: Setup) -> Depth:
    """Train (or load) a ResNet per depth and seed of ``depth_seeds``, decompose each at (k1, k2) with
    Algorithm 1 on ``depth_images`` training images, and measure r_A on the same ``depth_images`` test
    images for all."""
    P = S.P
    feats_split = S.baseline.train.subset(P.depth_images, P.network_seed)
    test = S.test.subset(P.depth_images, P.network_seed)
    rows, dec, full = [], {}, {}
    for depth in P.depths:
        r = depth_recipe(P, depth)
        for seed in P.depth_seeds:
            model, rec = train.train_cached(r, seed, device=P.device, download=P.download)
            train.check_trained(float(rec["test_acc"]), S.n_classes, f"depth-study ResNet-{depth} (seed {seed})")
            sets = influential_sets(extract_features(model, feats_split.x, device=P.device), feats_split.y,
                                    P.k1, P.k2, S.n_classes)
            f_test = extract_features(model, test.x, device=P.device)
            full.setdefault(depth, []).append(correct(model.fc, f_test, test.y))
            dec.setdefault(depth, []).append(correct(DecomposedLinear(model.fc, sets), f_test, test.y))
            a_f, a_d = float(full[depth][-1].mean()), float(dec[depth][-1].mean())
            rows.append({"model": f"ResNet-{depth}", "depth": depth, "seed": seed, "A_f": a_f, "A_d": a_d,
                         "r_A": a_d / a_f, "from cache": bool(rec["cached"])})
    boot = Resampler(len(P.depth_seeds), len(test), P.bootstrap, seed=P.seed)
    per_depth = {k: boot.estimate(ratio, {"dec": np.stack(dec[k]), "full": np.stack(full[k])}) for k in dec}
    df = pd.DataFrame(rows)
    depth10 = df["depth"].to_numpy() / 10
    slope, = ols(df["r_A"], depth10)
    slope_a_f, = ols(df["A_f"], depth10)
    given = ols(df["r_A"], depth10, df["A_f"])[0]
    c = r.config
    text = (f"{r.train_subset or len(S.baseline.train):,} training images of {r.dataset}, {c.epochs} epoch(s) at "
            f"batch {c.batch_size} (peak learning rate {c.lr:g}), chapter 0's ResNet recipe otherwise; "
            f"Algorithm 1 on {len(feats_split):,} training images, accuracy on {len(test):,} test images")
    return Depth(df, per_depth, slope, slope_a_f, given, text, P.k1, P.k2, r.dataset)


# --- claims, the side-by-side table and nbval ----------------------------------------------------------

CSG_WHY = ("Table 1 compares, on ResNet-20/34 (CIFAR-10) and ResNet-18/34 (Tiny ImageNet), the standard output "
           "with the output through a class-specific gate matrix (Liang et al. 2020) that is learnt with the "
           "network and needs the label at inference; Algorithm 1 is not in the table. Reproducing it needs a "
           "network trained from scratch with the gate path and its sparsity loss, per seed, on those data "
           "sets: a second training run of every network, beyond this chapter's CPU budget, and the data "
           "sets cannot be had offline. It is not reproduced.")


def decide(S: Setup, mass_: Mass, dec: Decomposition, grid_: Grid, rt: Retraining, depth_: Depth,
           rules_: Rules) -> list:
    """Every claim of chapter 3 (declared in :mod:`pruning_utils.claims`), decided on the estimates."""
    P = S.P
    covers = (f"the {len(S.draws)} seeds vary the training images Algorithm 1 sees; the test images are "
              f"resampled; one network (chapter 0, seed {P.network_seed})")
    res = [claims.decide("cf-1a", grid_.k3, covers),
           claims.decide("cf-1b", dec.r_a, covers + (f"; measured at k1 = {P.k1}, k2 = {P.k2}"
                                                     if (P.k1, P.k2) != (5, 5) else "")),
           claims.decide("cf-2a", grid_.neighbours, "k2 > k1 is in the grid, so k2 = k1 can lose; " + covers)]
    if grid_.large_k1 is None:
        res.append(claims.untestable("cf-2b", "the k1 grid has no value above k2 and below d"))
    else:
        res.append(claims.decide("cf-2b", grid_.large_k1, f"k2 = {grid_.k2_fixed}, k1 = {grid_.k2_fixed} vs "
                                                          f"{grid_.large_k1_value} (k1 = d is excluded: its "
                                                          "histogram counts every active feature)"))
    res += [claims.decide("cf-3", rt.estimates["network"],
                          f"{rt.steps} steps of {rt.batch_size} images = one pass over {rt.n_images:,} images "
                          f"(CIFAR-10's epoch at this batch: {steps_per_epoch(PAPER['cifar10_train'], rt.batch_size)}"
                          f" steps); the seeds vary the images, batch order and augmentation; head-only recipe: "
                          f"{rt.estimates['head'].text('.4f')}", fmt=".4f"),
            claims.decide("cf-4", mass_.estimate(), "computed on each seed's training images", fmt=".1f"),
            claims.decide("cf-5", Estimate.over_seeds([dec.cost / (P.k2 * S.n_classes)] * len(S.draws)),
                          f"a count ({dec.d * dec.n_classes} -> {dec.cost}): it checks that the layer stores and "
                          "reads only W[y, S_y]", fmt=".2f"),
            claims.decide("cf-6", depth_.slope, f"{len(depth_.rows)} networks; A_f also changes with "
                                                f"depth ({depth_.slope_a_f.text('.4f')} per 10 layers); with A_f "
                                                f"held fixed: {depth_.slope_given_a_f.text()}"),
            claims.decide("cf-7", rules_.versus_weights, "k1 = k2 for Algorithm 1; " + covers),
            claims.untestable("cf-csg", CSG_WHY)]
    return res


def side_by_side(S: Setup, mass_: Mass, dec: Decomposition, grid_: Grid, rt: Retraining) -> pd.DataFrame:
    """Our numbers beside the paper's (ResNet-20, CIFAR-10)."""
    r3 = PAPER["A_d_k2_3"] / PAPER["A_f"][0]
    r5 = PAPER["A_d_k5"] / PAPER["A_f"][1]
    rows = [("A_f, full layer", f"{PAPER['A_f'][0]:.4f}-{PAPER['A_f'][1]:.4f}", f"{float(S.full().mean()):.4f}"),
            ("A_d, k1 = k2 = 3", f"{PAPER['A_d_k2_3']:.4f} (r_A {r3:.3f})",
             f"{grid_.a_d_3:.4f} (r_A {grid_.k3.text()})"),
            (f"A_d, k1 = {S.P.k1}, k2 = {S.P.k2}", f"{PAPER['A_d_k5']:.4f} (r_A {r5:.3f}, k1 = k2 = 5)",
             f"{dec.a_d:.4f} (r_A {dec.r_a.text()})"),
            ("after one epoch, whole network", f"{PAPER['retrained']:.4f} ({PAPER['paper_epoch_steps']} steps)",
             f"{rt.correct['network'].mean():.4f} ({rt.steps} steps)"),
            ("after one epoch, head only", "not reported", f"{rt.correct['head'].mean():.4f} ({rt.steps} steps)"),
            ("k1 covering 90% of the mass", str(PAPER["k1_mass90"]), f"{mass_.k1s[0]} (for {mass_.mass:.0%})"),
            ("final-layer multiply-adds", "640 -> 50", f"{dec.d * dec.n_classes} -> {dec.cost}")]
    return pd.DataFrame(rows, columns=["quantity", "paper (ResNet-20, CIFAR-10)", "ours"]).set_index("quantity")


def key_numbers(S: Setup, mass_: Mass, dec: Decomposition, grid_: Grid, rt: Retraining, depth_: Depth,
                rules_: Rules) -> dict:
    """The few numbers nbval compares between two runs (rounded to 3 decimals)."""
    return {"A_f": round(float(S.full().mean()), 3), "r_A": round(dec.r_a.mean, 3), "r_A_k3": round(grid_.k3.mean, 3),
            "k1_mass": mass_.k1s[0], "whole_network": round(float(rt.correct["network"].mean()), 3),
            "head_only": round(float(rt.correct["head"].mean()), 3),
            "r_A_by_depth": {int(k): round(e.mean, 3) for k, e in depth_.per_depth.items()},
            "r_A_weights": [round(float(v), 3) for v in rules_.weights]}


def glue_all(*results) -> None:
    """Glue every number and figure of the chapter's results (their ``numbers()``) for the prose."""
    from myst_nb import glue

    for result in results:
        for name, value in result.numbers().items():
            glue(name, value, display=False)


# --- figures ------------------------------------------------------------------------------------------

def grid_figure(r_a: np.ndarray, k1s, k2s) -> Figure:
    """Fig. 1: mean r_A over seeds on the (k1, k2) grid as a heat-map, and r_A against k2, one line per k1
    (the band: the range over seeds)."""
    grid_ = r_a.mean(0) if r_a.ndim == 3 else r_a
    fig = new_figure(10, 3.8)
    ax_map, ax_lines = fig.subplots(1, 2)
    im = ax_map.imshow(grid_, origin="lower", cmap="viridis", aspect="auto")
    ax_map.set_xticks(range(len(k2s)), [str(k) for k in k2s])
    ax_map.set_yticks(range(len(k1s)), [str(k) for k in k1s])
    for i in range(len(k1s)):
        for j in range(len(k2s)):
            ax_map.text(j, i, f"{grid_[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if grid_[i, j] < np.mean(grid_) else "black")
    ax_map.set(xlabel="k2 (features kept per class)", ylabel="k1 (top features per instance)",
               title="r_A = A_d / A_f, mean over seeds")
    fig.colorbar(im, ax=ax_map, label="r_A (ratio of accuracies)")
    for i, k1 in enumerate(k1s):
        line, = ax_lines.plot(k2s, grid_[i], marker="o", markersize=3, label=f"k1 = {k1}")
        if r_a.ndim == 3 and r_a.shape[0] > 1:
            ax_lines.fill_between(k2s, r_a[:, i].min(0), r_a[:, i].max(0), color=line.get_color(), alpha=0.2)
    ax_lines.set(xscale="log", xlabel="k2 (features kept per class, log scale)", ylabel="r_A (ratio of accuracies)",
                 title="r_A against k2, one line per k1 (band: seeds)")
    ax_lines.grid(alpha=0.3)
    ax_lines.legend(fontsize="x-small", ncol=2)
    return fig


def overlap_figure(sets, d: int, classes) -> Figure:
    """Per-class index sets: the Jaccard overlap of every pair of classes and which features each class uses."""
    jac, use = jaccard_matrix(sets), feature_use(sets, d)
    order = np.lexsort((np.arange(d), -use.sum(0)))  # most shared features first
    used = order[use[:, order].sum(0) > 0]
    fig = new_figure(11, 4.0)
    ax_jac, ax_use = fig.subplots(1, 2, width_ratios=[1, 1.6])
    im = ax_jac.imshow(jac, cmap="magma", vmin=0, vmax=1)
    ax_jac.set_xticks(range(len(classes)), classes, rotation=90, fontsize="x-small")
    ax_jac.set_yticks(range(len(classes)), classes, fontsize="x-small")
    ax_jac.set_title("Jaccard overlap of S_y")
    fig.colorbar(im, ax=ax_jac, label="|S_a ∩ S_b| / |S_a ∪ S_b|")
    ax_use.imshow(use[:, used], cmap="Greys", aspect="auto", vmin=0, vmax=1)
    ax_use.set_xticks(range(len(used)), [str(j) for j in used], fontsize="xx-small", rotation=90)
    ax_use.set_yticks(range(len(classes)), classes, fontsize="x-small")
    ax_use.set(xlabel="feature index j (only features in some S_y; most shared first)",
               title=f"features used per class ({len(used)} of {d} features used at all)")
    return fig


def histogram_figure(hist: torch.Tensor, sets, counts: torch.Tensor, classes, ncols: int = 5) -> Figure:
    """HIST of Algorithm 1 per class, as the share of the class's instances with feature j in their top k1;
    the k2 bars of S_y in orange."""
    use = feature_use(sets, hist.shape[1]).astype(bool)
    share = (hist / counts.clamp_min(1)[:, None]).numpy()
    fig, axes = panel_grid(len(classes), ncols, (2.6, 1.9), sharey=True, sharex=True)
    pos = np.arange(hist.shape[1])
    for y, (ax, name) in enumerate(zip(axes, classes)):
        ax.bar(pos, share[y], width=1.0, color=np.where(use[y], "tab:orange", "tab:blue"))
        ax.set_title(name, fontsize="small")
    for ax in axes[::ncols]:
        ax.set_ylabel("share of class")
    for ax in axes[-ncols:]:
        ax.set_xlabel("feature index j")
    return fig
