"""One interface for every criterion that ranks filters (in the style of Torch-Pruning's ``Importance``).

A criterion scores the output channels ("filters") of one layer, a :class:`Target`; higher means more
important. Pruning, sweeps and comparisons never care which criterion it was: they take the scores and
remove the lowest first (:func:`ranking`). Chapters register their own criteria here beside the standard
ones (XGBoost gain, chapter 1; class-usage frequency, chapter 3; interventional effect, chapter 5).

Standard criteria: ``l1`` and ``l2`` (norm of the filter's weights, Li et al. 2017), ``random`` (a seeded
null), ``bn_scale`` (|gamma| of the BatchNorm after the layer, network slimming), ``taylor`` (first-order
Taylor, Molchanov et al. 2017), ``mean_activation`` and ``apoz`` (average percentage of zeros, inverted
so that higher is more important).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .params import ParameterError, check_choice


@dataclass(frozen=True)
class Target:
    """The filters of one layer: ``conv`` is the Conv2d / Linear whose output channels are scored and
    removed; ``act`` the module whose output holds those filters' maps after the nonlinearity (needed by
    data-driven criteria); ``bn`` the BatchNorm right after ``conv``, if any."""

    conv: str
    act: str | None = None
    bn: str | None = None


@dataclass(frozen=True)
class Data:
    """Images (and labels) a data-driven criterion scores on; the same for every criterion compared."""

    x: torch.Tensor
    y: torch.Tensor


class Criterion:
    """Scores the filters of a :class:`Target`: one finite number per output channel, higher = keep."""

    name: str = ""
    needs_data: bool = False

    def score(self, model: nn.Module, target: Target, data: Data | None = None) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, model: nn.Module, target: Target, data: Data | None = None) -> np.ndarray:
        if self.needs_data and data is None:
            raise ParameterError(f"criterion {self.name!r} scores filters on data; pass data=Data(x, y)")
        scores = np.asarray(self.score(model, target, data), dtype=float)
        n = _n_out(_module(model, target.conv))
        if scores.shape != (n,) or not np.isfinite(scores).all():
            raise ValueError(f"criterion {self.name!r} gave {scores.shape} scores (finite: "
                             f"{bool(np.isfinite(scores).all())}) for {n} filters of {target.conv!r}")
        return scores


REGISTRY: dict[str, Callable[..., Criterion]] = {}


def register(name: str):
    """Class decorator: make a criterion available as ``make(name, **kwargs)``."""
    def wrap(cls):
        if name in REGISTRY:
            raise ValueError(f"criterion {name!r} is registered twice")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


def make(name: str, **kwargs) -> Criterion:
    """The criterion registered as ``name``, built with ``kwargs`` (e.g. ``seed`` for random)."""
    check_choice("criterion", name, tuple(REGISTRY))
    return REGISTRY[name](**kwargs)


def score(name: str, model: nn.Module, target: Target, data: Data | None = None, **kwargs) -> np.ndarray:
    """Scores of criterion ``name`` for the filters of ``target`` (higher = more important)."""
    return make(name, **kwargs)(model, target, data)


def ranking(scores: np.ndarray) -> np.ndarray:
    """Filter indices from least to most important (stable on ties): the pruning order."""
    scores = np.asarray(scores, dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError("scores hold NaN or infinity")
    return np.argsort(scores, kind="stable")


def _module(model: nn.Module, name: str) -> nn.Module:
    from .prune import module

    return module(model, name)


def _n_out(layer: nn.Module) -> int:
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    if isinstance(layer, nn.Linear):
        return layer.out_features
    raise ParameterError(f"a {type(layer).__name__} has no filters to score; expected Conv2d or Linear")


@register("l1")
class L1(Criterion):
    """Sum of |w| of each filter (Li et al. 2017)."""

    def score(self, model, target, data=None):
        return _module(model, target.conv).weight.detach().abs().flatten(1).sum(1).numpy()


@register("l2")
class L2(Criterion):
    """Euclidean norm of each filter's weights."""

    def score(self, model, target, data=None):
        return _module(model, target.conv).weight.detach().flatten(1).norm(dim=1).numpy()


@register("random")
class Random(Criterion):
    """A seeded random score: the null every criterion is compared with."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, target, data=None):
        n = _n_out(_module(model, target.conv))
        return np.random.default_rng(self.seed).permutation(n).astype(float)


@register("bn_scale")
class BNScale(Criterion):
    """|gamma| of the BatchNorm that follows the layer (network slimming, Liu et al. 2017)."""

    def score(self, model, target, data=None):
        if target.bn is None:
            raise ParameterError(f"criterion 'bn_scale' needs the BatchNorm after {target.conv!r}: Target(bn=...)")
        return _module(model, target.bn).weight.detach().abs().numpy()


def _maps(model, target, data, batch_size=256):
    from .activations import channel_scores

    if target.act is None:
        raise ParameterError(f"a data-driven criterion needs the activation after {target.conv!r}: Target(act=...)")
    return channel_scores(model, data.x, [target.act], keep_maps=True, batch_size=batch_size)[target.act]


@register("mean_activation")
class MeanActivation(Criterion):
    """Mean of each filter's map after the nonlinearity, over images and positions."""

    needs_data = True

    def score(self, model, target, data=None):
        m = _maps(model, target, data)
        return m.flatten(2).mean((0, 2)).numpy() if m.ndim > 2 else m.mean(0).numpy()


@register("apoz")
class APoZ(Criterion):
    """1 - the average percentage of zeros of each filter's map (Hu et al. 2016): higher = more often on."""

    needs_data = True

    def score(self, model, target, data=None):
        m = _maps(model, target, data)
        zero = (m <= 0).float()
        return 1.0 - (zero.flatten(2).mean((0, 2)) if m.ndim > 2 else zero.mean(0)).numpy()


@register("taylor")
class Taylor(Criterion):
    """First-order Taylor criterion E_x |mean over positions of a * dL/da| (Molchanov et al. 2017)."""

    needs_data = True

    def score(self, model, target, data=None):
        from .causal import taylor

        if target.act is None:
            raise ParameterError(f"criterion 'taylor' needs the activation after {target.conv!r}: Target(act=...)")
        return taylor(model, [target.act], data.x, data.y)[target.act][0]
