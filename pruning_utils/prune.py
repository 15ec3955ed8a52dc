"""Structured (whole-filter) pruning: rankings, physical removal with torch-pruning, zeroing by a mask.

Used by chapter 1 (pruning LeNet5 by decision-tree gain) and chapter 5 (causal filter importance).
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from .progress import bar

from . import data as data_mod
from .params import ParameterError
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
              device: str = "auto") -> Callable[[nn.Module], object] | None:
    """A function that fine-tunes a pruned model in place: ``epochs`` epochs of SGD at a constant rate
    ``lr`` on ``train`` (None when ``epochs`` is 0)."""
    if epochs == 0:
        return None
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule="none", weight_decay=5e-4)
    return lambda model: fit(model, train, None, cfg, seed=seed, device=device, progress=False)
