"""Structured (whole-filter) pruning: rankings, physical removal with torch-pruning, zeroing by a mask.

Used by chapter 1 (pruning LeNet5 by decision-tree gain) and chapter 5 (causal filter importance).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from .progress import bar

from . import data as data_mod
from .params import ParameterError, check_choice
from .train import TrainConfig, fit


def module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name``; a clear error lists the model's layers when it is absent."""
    modules = dict(model.named_modules())
    if name not in modules:
        raise ParameterError(f"layer={name!r} is not in the model; its layers include "
                             f"{[n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]}")
    return modules[name]


def _check_idxs(layer: nn.Module, name: str, idxs: Sequence[int]) -> list[int]:
    n = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    idxs = sorted({int(i) for i in idxs})
    if any(i < 0 or i >= n for i in idxs):
        raise ParameterError(f"idxs={idxs} is not allowed for layer {name!r}; expected indices in [0, {n - 1}]")
    if len(idxs) >= n:
        raise ParameterError(f"idxs removes all {n} channels of layer {name!r}; keep at least one")
    return idxs


def remove_channels(model: nn.Module, layer: str, idxs: Sequence[int], example_input: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with output channels ``idxs`` of conv/linear ``layer`` physically removed, and
    every coupled layer (BatchNorm, the next layer's inputs) shrunk with it (torch-pruning's DepGraph)."""
    model = copy.deepcopy(model).eval()
    target = module(model, layer)
    if not isinstance(target, (nn.Conv2d, nn.Linear)):
        raise ParameterError(f"layer={layer!r} is a {type(target).__name__}; expected a Conv2d or Linear layer")
    idxs = _check_idxs(target, layer, idxs)
    if not idxs:
        return model
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    fn = tp.prune_conv_out_channels if isinstance(target, nn.Conv2d) else tp.prune_linear_out_channels
    graph.get_pruning_group(target, fn, idxs=idxs).prune()
    return model


def zero_channels(model: nn.Module, layer: str, idxs: Sequence[int]) -> nn.Module:
    """A copy of ``model`` whose ``layer`` outputs zero in channels ``idxs`` (a mask, nothing removed)."""
    model = copy.deepcopy(model).eval()
    target = module(model, layer)
    idxs = list(idxs)

    def mask(_m, _inp, out):
        out = out.clone()
        out[:, idxs] = 0
        return out

    target.register_forward_hook(mask)
    return model


def l1_scores(layer: nn.Module) -> torch.Tensor:
    """The L1 norm of each filter's weights (Li et al. 2017's criterion)."""
    return layer.weight.detach().abs().flatten(1).sum(1)


def l1_ranking(layer: nn.Module) -> torch.Tensor:
    """Filter indices from smallest to largest L1 norm of their weights."""
    return l1_scores(layer).argsort()


def n_removed(fraction: float, n: int) -> int:
    """How many of ``n`` filters a ``fraction`` removes: round(fraction * n), but always one left."""
    return min(int(round(fraction * n)), n - 1)


def macs_and_params(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass on ``example_input`` and the parameter count (torch-pruning)."""
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return int(macs), int(params)


def sweep(model: nn.Module, layer: str, orders: dict[str, Sequence[int]], fractions: Sequence[float],
          example_input: torch.Tensor, evaluate: Callable[[nn.Module], float],
          finetune: Callable[[nn.Module], object] | None = None, progress: bool = True,
          random_seeds: Sequence[int] = ()) -> list[dict]:
    """The book's one pruning sweep of a layer: for each criterion's order (filter indices, least
    important first; see :func:`criteria.ranking`) and for a random order per seed in ``random_seeds``
    (the null), remove each fraction of the filters physically, evaluate, then (with ``finetune``)
    fine-tune the pruned copy and evaluate again. Rows carry the criterion, the random seed (None for
    the deterministic criteria), the fraction really removed, accuracies, MACs and parameters."""
    from .criteria import Random, Target, ranking

    n = module(model, layer).weight.shape[0]
    jobs = [(name, None, list(order)) for name, order in orders.items()]
    jobs += [("random", s, ranking(Random(s).score(model, Target(layer)))) for s in random_seeds]
    rows = []
    work = [(job, f) for job in jobs for f in fractions]
    for (name, seed, order), f in bar(work, desc=f"pruning {layer}", disable=not progress, leave=False):
        k = n_removed(f, n)
        pruned = remove_channels(model, layer, order[:k], example_input)
        macs, params = macs_and_params(pruned, example_input)
        row = {"layer": layer, "criterion": name, "seed": seed, "target_fraction": f, "fraction": k / n,
               "removed": k, "accuracy": evaluate(pruned), "macs": macs, "params": params}
        if finetune is not None:
            finetune(pruned)
            row["accuracy_finetuned"] = evaluate(pruned)
        rows.append(row)
    return rows


def finetuner(train: data_mod.Split, epochs: int, seed: int = 0, lr: float = 0.01, batch_size: int = 32,
              device: str = "auto", **config) -> Callable[[nn.Module], object] | None:
    """A function that fine-tunes a pruned model in place: ``epochs`` epochs of SGD at a constant rate
    ``lr`` on ``train`` (None when ``epochs`` is 0); ``config``: other TrainConfig fields (e.g. threads,
    channels_last)."""
    if epochs == 0:
        return None
    cfg = TrainConfig(**{"epochs": epochs, "batch_size": batch_size, "lr": lr, "schedule": "none",
                         "weight_decay": 5e-4, **config})
    return lambda model: fit(model, train, None, cfg, seed=seed, device=device, progress=False)


# --- whole-network pruning (chapter 5; chapter 6 builds on it) ------------------------------------------
# The groups are torch-pruning's coupled groups, as :func:`criteria.coupled_groups` finds them (the output
# layer is never a group; a residual stream is one group per stage). Per-group scores (higher = keep;
# :func:`criteria.score_group`) become a plan: which channels of each group go, for a fraction per group
# (:func:`plan_fraction`) or a MACs target with "uniform" or "global" allocation (:func:`plan_macs`),
# kept widths optionally rounded to a multiple of ``block`` (the CPU kernels' channel block; see
# :mod:`pruning_utils.latency`). :func:`remove_groups` removes the planned channels physically,
# :func:`mask_groups` zeroes them where that is the same function (tests; interventions, chapter 5).

ALLOCATIONS = ("uniform", "global")
_OUT = ("prune_out_channels",)
_IN = ("prune_in_channels",)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _handler(item) -> str:
    return getattr(item.dep.handler, "__name__", "")


def group_layers(model: nn.Module, group) -> dict[str, list[str]]:
    """The named layers of a coupled ``group``: ``writes`` (Conv2d / Linear whose output channels are the
    group's), ``norms`` (its BatchNorms) and ``reads`` (Conv2d / Linear whose input channels are)."""
    names = {m: n for n, m in model.named_modules()}
    out: dict[str, list[str]] = {"writes": [], "norms": [], "reads": []}
    for item in group.coupled:
        m = item.dep.target.module
        name = names.get(m)
        if name is None:
            continue
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            key = "writes" if _handler(item) in _OUT else "reads" if _handler(item) in _IN else None
        else:
            key = "norms" if isinstance(m, _NORMS) else None
        if key is not None and name not in out[key]:
            out[key].append(name)
    return out


def mask_points(model: nn.Module, group) -> list[str]:
    """Where zeroing the group's channels equals removing them: the output of each writing layer, or of the
    BatchNorm that directly follows it (zeroing before the BatchNorm would not do: it adds its shift back).
    Exact when what comes after maps a zero channel to zero (ReLU, pooling, adding zeros; a test checks
    it on the book's models)."""
    names = {m: n for n, m in model.named_modules()}
    layers = group_layers(model, group)
    after = {}
    for item in group.coupled:
        src, tgt = names.get(item.dep.source.module), names.get(item.dep.target.module)
        for w, b in ((src, tgt), (tgt, src)):  # torch-pruning links neighbours in either direction
            if w in layers["writes"] and b in layers["norms"]:
                after[w] = b
    return [after.get(w, w) for w in layers["writes"]]


def _sizes(groups) -> dict[str, int]:
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ParameterError(f"groups {names} name a group more than once")
    return {g.name: g.size for g in groups}


def round_width(keep: int, n: int, block: int | None) -> int:
    """A kept width rounded to the nearest multiple of ``block`` (halves up), at least one block and at
    most ``n``; unchanged when ``block`` is None or the group is narrower than one block."""
    if block is None or n < block:
        return max(1, min(n, keep))
    return int(min(n, max(block, block * ((2 * keep + block) // (2 * block)))))


def _check_block(block):
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ParameterError(f"block={block!r} is not allowed; expected None or an int >= 1")


def _check_scores(scores: Mapping[str, np.ndarray], sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    missing = sorted(set(sizes) - set(scores))
    if missing:
        raise ParameterError(f"scores lack the group(s) {missing}")
    out = {}
    for name, n in sizes.items():
        s = np.asarray(scores[name], dtype=float)
        if s.shape != (n,) or not np.isfinite(s).all():
            raise ParameterError(f"scores[{name!r}] must be {n} finite numbers; got shape {s.shape}")
        out[name] = s
    return out


class MacModel:
    """Multiply-accumulates of every Conv2d / Linear layer of ``model`` as a function of the kept width of
    each group: a layer's MACs scale with the share of its output channels kept (the group it writes)
    times the share of its input channels kept (the group it reads). Exact for dense layers; BatchNorms,
    activations and pooling are not counted (torch-pruning's count of a pruned network includes them)."""

    def __init__(self, model: nn.Module, groups, example_input: torch.Tensor):
        self.sizes = _sizes(groups)
        base: dict[str, float] = {}
        names = {m: n for n, m in model.named_modules()}

        def count(mod, inp, out):
            per = out.numel() / out.shape[0]
            if isinstance(mod, nn.Conv2d):
                k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            else:
                k = mod.in_features
            base[names[mod]] = base.get(names[mod], 0.0) + per * k

        layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        handles = [m.register_forward_hook(count) for m in layers]
        try:
            with torch.no_grad():
                model.eval()(example_input[:1])
        finally:
            for h in handles:
                h.remove()
        self.base = base
        self.writes: dict[str, str] = {}
        self.reads: dict[str, str] = {}
        for g in groups:
            parts = group_layers(model, g)
            for w in parts["writes"]:
                self.writes[w] = g.name
            for r in parts["reads"]:
                self.reads[r] = g.name
        mods = dict(model.named_modules())
        grouped = [n for n in base if isinstance(mods[n], nn.Conv2d) and mods[n].groups != 1 and n in self.reads]
        if grouped:
            raise ParameterError(f"layers {grouped} are grouped convolutions; MacModel counts dense layers")
        self.total = float(sum(base.values()))

    def macs(self, keep: Mapping[str, int]) -> float:
        """Conv and linear MACs per image with ``keep[g]`` channels kept in group g (others whole)."""
        total = 0.0
        for layer, m in self.base.items():
            w, r = self.writes.get(layer), self.reads.get(layer)
            f = (keep.get(w, self.sizes[w]) / self.sizes[w]) if w in self.sizes else 1.0
            f *= (keep.get(r, self.sizes[r]) / self.sizes[r]) if r in self.sizes else 1.0
            total += m * f
        return total


@dataclass(frozen=True)
class NetworkPlan:
    """Which channels of each group go (``remove``: group name -> indices), the widths kept, and the conv
    and linear MACs per image before and after (:class:`MacModel`, when known)."""

    remove: dict[str, list[int]]
    keep: dict[str, int]
    sizes: dict[str, int]
    allocation: str = "fraction"
    block: int | None = None
    macs: float = float("nan")
    base_macs: float = float("nan")

    @property
    def fraction(self) -> float:
        """Share of all the groups' channels removed."""
        return sum(map(len, self.remove.values())) / max(1, sum(self.sizes.values()))

    @property
    def macs_kept(self) -> float:
        """Share of the unpruned conv and linear MACs that the pruned network keeps."""
        return self.macs / self.base_macs


def _lowest(scores: np.ndarray, n_remove: int) -> list[int]:
    from .criteria import ranking

    return sorted(int(i) for i in ranking(scores)[:n_remove])


def _plan(scores, sizes, keep, allocation, block, mac_model=None) -> NetworkPlan:
    remove = {g: _lowest(scores[g], sizes[g] - keep[g]) for g in sizes}
    macs = mac_model.macs(keep) if mac_model is not None else float("nan")
    base = mac_model.total if mac_model is not None else float("nan")
    return NetworkPlan(remove, dict(keep), dict(sizes), allocation, block, macs, base)


def plan_fraction(groups, scores: Mapping[str, np.ndarray], fraction: float | Mapping[str, float],
                  block: int | None = None, mac_model: MacModel | None = None) -> NetworkPlan:
    """Remove from each group the ``round(fraction * n)`` channels with the lowest scores (one fraction for
    every group, or one per group name; always one channel left), the kept width rounded to ``block``."""
    _check_block(block)
    sizes = _sizes(groups)
    scores = _check_scores(scores, sizes)
    fr = fraction if isinstance(fraction, Mapping) else {g: fraction for g in sizes}
    keep = {}
    for g, n in sizes.items():
        f = fr.get(g, 0.0)
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not (0 <= f < 1):
            raise ParameterError(f"fraction={f!r} is not allowed (group {g!r}); expected 0 <= fraction < 1")
        keep[g] = round_width(n - n_removed(float(f), n), n, block)
    return _plan(scores, sizes, keep, "fraction", block, mac_model)


def plan_macs(model: nn.Module, groups, scores: Mapping[str, np.ndarray], example_input: torch.Tensor,
              macs_kept: float, allocation: str = "uniform", block: int | None = None,
              mac_model: MacModel | None = None) -> NetworkPlan:
    """The plan that keeps at most ``macs_kept`` of the unpruned conv and linear MACs (0.5: 2x fewer).
    ``uniform``: the smallest fraction, the same in every group, that reaches it; ``global``: channels go in
    the order of their scores normalised per group (divided by the group's mean |score|, torch-pruning's
    "mean" normaliser), lowest first, until the target is reached. With ``block``, kept widths are
    multiples of it (groups narrower than a block lose single channels) and global allocation removes
    whole blocks, ranked by their mean normalised score."""
    check_choice("allocation", allocation, ALLOCATIONS)
    _check_block(block)
    if isinstance(macs_kept, bool) or not isinstance(macs_kept, (int, float)) or not (0 < macs_kept <= 1):
        raise ParameterError(f"macs_kept={macs_kept!r} is not allowed; expected a number in (0, 1]")
    sizes = _sizes(groups)
    scores = _check_scores(scores, sizes)
    mm = mac_model or MacModel(model, groups, example_input)
    target = macs_kept * mm.total * (1 + 1e-9)
    if allocation == "uniform":
        cands = sorted({k / n for n in sizes.values() for k in range(n)})
        for f in cands:
            keep = {g: round_width(n - n_removed(f, n), n, block) for g, n in sizes.items()}
            if mm.macs(keep) <= target:
                return _plan(scores, sizes, keep, allocation, block, mm)
        raise ParameterError(f"macs_kept={macs_kept!r} is out of reach with uniform allocation: at most "
                             f"{1 - mm.macs(keep) / mm.total:.3f} of the MACs can go (block={block})")
    norm = {g: s / (np.abs(s).mean() if np.abs(s).mean() > 0 else 1.0) for g, s in scores.items()}
    order = {g: np.sort(norm[g]) for g in sizes}
    keep = {g: n for g, n in sizes.items()}
    while mm.macs(keep) > target:
        best, best_score = None, np.inf
        for g, n in sizes.items():
            unit = 1 if block is None or n < block else (keep[g] % block or block)
            floor = 1 if block is None or n < block else block
            if keep[g] - unit < floor:
                continue
            removed_n = n - keep[g]
            s = float(order[g][removed_n:removed_n + unit].mean())
            if s < best_score:
                best, best_score = (g, unit), s
        if best is None:
            raise ParameterError(f"macs_kept={macs_kept!r} is out of reach with global allocation: at most "
                                 f"{1 - mm.macs(keep) / mm.total:.3f} of the MACs can go (block={block})")
        keep[best[0]] -= best[1]
    return _plan(scores, sizes, keep, allocation, block, mm)


def remove_groups(model: nn.Module, remove: Mapping[str, Sequence[int]], example_input: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the channels ``remove[group name]`` of each coupled group physically removed
    (every layer of the group shrinks: writers, BatchNorms, readers). A group is named by its root layer
    (:func:`criteria.coupled_groups`); the plan of :func:`plan_fraction` / :func:`plan_macs` gives ``remove``."""
    model = copy.deepcopy(model).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    for name, idxs in remove.items():
        root = module(model, name)
        if not isinstance(root, (nn.Conv2d, nn.Linear)):
            raise ParameterError(f"group {name!r} is rooted at a {type(root).__name__}; expected Conv2d or Linear")
        idxs = _check_idxs(root, name, idxs)
        if idxs:
            fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
            graph.get_pruning_group(root, fn, idxs=idxs).prune()
    return model


def mask_groups(model: nn.Module, groups, remove: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose planned channels are zeroed at the groups' :func:`mask_points`: the same
    function as :func:`remove_groups` (and the same fine-tuning: masked channels get no gradient)."""
    by_name = {g.name: g for g in groups}
    unknown = sorted(set(remove) - set(by_name))
    if unknown:
        raise ParameterError(f"remove names unknown group(s) {unknown}; the groups are {sorted(by_name)}")
    points: dict[str, set[int]] = {}
    for name, idxs in remove.items():
        for p in mask_points(model, by_name[name]):
            points.setdefault(p, set()).update(int(i) for i in idxs)
    model = copy.deepcopy(model).eval()
    for p, idxs in points.items():
        if idxs:
            module(model, p).register_forward_hook(_zero_hook(sorted(idxs)))
    return model


def _zero_hook(idxs: list[int]):
    def hook(_m, _inp, out):
        out = out.clone()
        out[:, idxs] = 0
        return out
    return hook
