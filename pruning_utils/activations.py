"""Feature maps at named layers, captured with forward hooks batch by batch, and per-channel scores."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from .progress import bar
from .train import get_device

from .params import ParameterError, check_choice

AGGREGATIONS = ("mean", "max", "topk", "norm")


def aggregate(maps: torch.Tensor, how: str = "mean", k: int = 5) -> torch.Tensor:
    """One score per channel of (N, C, H, W) maps: the mean (paper 000), the max, the mean of the top k, or
    the L2 norm of the map (the filter variables of Narendra et al., chapter 5)."""
    check_choice("aggregation", how, AGGREGATIONS)
    if maps.ndim < 2:
        raise ParameterError(f"maps of shape {tuple(maps.shape)} is not allowed; expected (N, C, ...)")
    flat = maps.flatten(2) if maps.ndim > 2 else maps.unsqueeze(-1)
    if how == "mean":
        return flat.mean(-1)
    if how == "max":
        return flat.amax(-1)
    if how == "norm":
        return flat.norm(dim=-1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ParameterError(f"k={k!r} is not allowed; expected an int >= 1")
    return flat.topk(min(k, flat.shape[-1]), dim=-1).values.mean(-1)


@contextmanager
def hooked(model: nn.Module, layers: list[str]):
    """Within the block, ``store[name]`` holds the latest output of each named submodule."""
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ParameterError(f"layers {missing} are not in the model; its named modules include "
                             f"{[n for n in modules if n][:30]}")
    store: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: store.__setitem__(name, out.detach())) for name in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def channel_scores(model: nn.Module, x: torch.Tensor, layers: list[str], how: str = "mean", k: int = 5,
                   batch_size: int = 256, device: str | torch.device = "cpu", progress: bool = False,
                   keep_maps: bool = False) -> dict[str, torch.Tensor]:
    """Per-image, per-channel scores (N, C) at each named layer; with ``keep_maps`` the full maps instead."""
    device = get_device(device) if isinstance(device, str) else device
    model.eval().to(device)
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    with hooked(model, layers) as store:
        for i in bar(range(0, len(x), batch_size), desc="activations", disable=not progress, leave=False):
            model(x[i:i + batch_size].to(device))
            for name in layers:
                maps = store[name].cpu()
                out[name].append(maps if keep_maps else aggregate(maps, how, k))
    return {name: torch.cat(parts) for name, parts in out.items()}
