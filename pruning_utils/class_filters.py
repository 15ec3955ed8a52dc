"""Class-specific filters in the final layer (paper 002, chapter 3): Algorithm 1 and the decomposed layer.

The final layer's input is a feature vector x in R^d (a ResNet's pooled features, all >= 0); its weights
W (n classes x d) and bias b. Algorithm 1 picks, for each class y, an index set S_y of k2 features: for
every training image of class y the indices of its k1 largest features are counted (a histogram per
class), and the k2 most frequent indices form S_y. The decomposed layer then computes
logit_y = sum_{j in S_y} W[y, j] x_j + b_y, at a cost of sum_y |S_y| multiply-adds instead of d x n.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from .params import ParameterError
from .plots import new_figure, panel_grid
from .progress import bar
from .train import get_device, seed_everything


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
    model.eval().to(dev)
    chunks = [model.features(x[i:i + batch_size].to(dev)).cpu()
              for i in bar(range(0, len(x), batch_size), desc="features", disable=not progress, leave=False)]
    model.to("cpu")
    return torch.cat(chunks)


def instance_ranks(features: torch.Tensor) -> torch.Tensor:
    """Rank of each feature within its instance (0 = largest; ties go to the lower index): sorted_k of Alg. 1."""
    order = torch.argsort(features, dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(features.shape[1]).expand_as(order).contiguous())
    return ranks


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
    """The paper's variant of k1: the smallest k whose top-k features carry ``mass`` of the l1 norm on average."""
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
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of final layer ``head`` on precomputed features (A_f for the full layer, A_d decomposed)."""
    return (head(features).argmax(1) == labels).float().mean().item()


def relative_accuracy(linear: nn.Linear, sets, features: torch.Tensor, labels: torch.Tensor) -> dict:
    """A_d, A_f and r_A = A_d / A_f of the layer decomposed on ``sets``, on the given (test) features."""
    a_f = head_accuracy(linear, features, labels)
    a_d = head_accuracy(DecomposedLinear(linear, sets), features, labels)
    return {"A_d": a_d, "A_f": a_f, "r_A": a_d / a_f}


def r_a_grid(linear: nn.Linear, train_features: torch.Tensor, train_labels: torch.Tensor,
             test_features: torch.Tensor, test_labels: torch.Tensor, k1s, k2s) -> np.ndarray:
    """Fig. 1: r_A on the test features for every (k1, k2) with k2 <= k1 (rows k1, columns k2; NaN where k2 > k1)."""
    n, d = linear.weight.shape
    ranks = instance_ranks(train_features)
    a_f = head_accuracy(linear, test_features, test_labels)
    grid = np.full((len(k1s), len(k2s)), np.nan)
    for i, k1 in enumerate(k1s):
        hist = class_histograms(ranks, train_labels, k1, n)
        for j, k2 in enumerate(k2s):
            if _check_k("k2", k2, d) <= k1:
                grid[i, j] = head_accuracy(DecomposedLinear(linear, top_rows(hist, k2)), test_features,
                                           test_labels) / a_f
    return grid


def jaccard_matrix(sets) -> np.ndarray:
    """Overlap |S_a ∩ S_b| / |S_a ∪ S_b| of every pair of classes (n, n); 1 on the diagonal."""
    rows = [set(r) for r in torch.as_tensor(sets).tolist()]
    return np.array([[len(a & b) / len(a | b) for b in rows] for a in rows])


def histogram_share(hist: torch.Tensor, sets) -> np.ndarray:
    """Per class, the share of the histogram's counts that fall on S_y (how concentrated HIST is)."""
    sets = torch.as_tensor(sets, dtype=torch.long)
    return (hist.gather(1, sets).sum(1) / hist.sum(1).clamp_min(1)).numpy().astype(float)


def feature_use(sets, d: int) -> np.ndarray:
    """Membership (n, d): 1 where feature j is in S_y."""
    sets = torch.as_tensor(sets, dtype=torch.long)
    return torch.zeros(sets.shape[0], d).scatter_(1, sets, 1.0).numpy()


def retrain(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, epochs: int = 1, lr: float = 1e-4,
            batch_size: int = 128, seed: int = 0, test: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[nn.Module, dict]:
    """Retrain only the final layer (a copy of ``head``) on fixed features with Adam (Sec. 5.2.3: lr 1e-4).

    Returns the trained copy and its history: test accuracy after each epoch (epoch 0 = before), steps.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ParameterError(f"epochs={epochs!r} is not allowed; expected an int >= 0")
    head = copy.deepcopy(head).train()
    gen = seed_everything(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    history = {"epoch": [0], "test_acc": [head_accuracy(head, *test) if test else float("nan")], "steps": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a layer this small runs 10-20x faster without intra-op threads
    try:
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
                loss = F.cross_entropy(head(features[idx]), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                history["steps"] += 1
            history["epoch"].append(epoch)
            history["test_acc"].append(head_accuracy(head, *test) if test else float("nan"))
    finally:
        torch.set_num_threads(threads)
    return head.eval(), history


def grid_figure(grid: np.ndarray, k1s, k2s) -> Figure:
    """Fig. 1: r_A over (k1, k2) as a heat-map and as lines of r_A against k2, one per k1."""
    fig = new_figure(10, 3.8)
    ax_map, ax_lines = fig.subplots(1, 2)
    im = ax_map.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax_map.set_xticks(range(len(k2s)), [str(k) for k in k2s])
    ax_map.set_yticks(range(len(k1s)), [str(k) for k in k1s])
    for i in range(len(k1s)):
        for j in range(len(k2s)):
            if not np.isnan(grid[i, j]):
                ax_map.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax_map.set(xlabel="k2 (features kept per class)", ylabel="k1 (top features per instance)",
               title="r_A = A_d / A_f")
    fig.colorbar(im, ax=ax_map, label="r_A (ratio of accuracies)")
    for i, k1 in enumerate(k1s):
        ok = ~np.isnan(grid[i])
        ax_lines.plot(np.asarray(k2s)[ok], grid[i, ok], marker="o", label=f"k1 = {k1}")
    ax_lines.set(xscale="log", xlabel="k2 (features kept per class, log scale)", ylabel="r_A (ratio of accuracies)",
                 title="r_A against k2, one line per k1")
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


def depth_figure(depths, r_as, paper: dict, ours_label: str) -> Figure:
    """Fig. 2: r_A against depth, ours (one line) beside the paper's ImageNet families (one line each)."""
    fig = new_figure(10, 3.6)
    ax_ours, ax_paper = fig.subplots(1, 2, sharey=True)
    ax_ours.plot(depths, r_as, marker="o", color="black", label="ours")
    ax_ours.set(title=ours_label, xlabel="depth (layers)", ylabel="r_A = A_d / A_f (ratio of accuracies)")
    for family, rows in paper.items():
        ax_paper.plot([m[1] for m in rows], [m[2] for m in rows], marker="o", label=family)
    ax_paper.set(title="the paper: ImageNet, k1 = k2 = 50", xlabel="depth (layers)")
    for ax in (ax_ours, ax_paper):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
    return fig
