"""One interface for every criterion that ranks filters (in the style of Torch-Pruning's ``Importance``).

A criterion scores the output channels ("filters") of one layer, a :class:`Target`; higher means more
important. Pruning, sweeps and comparisons never care which criterion it was: they take the scores and
remove the lowest first (:func:`ranking`). Chapters register their own criteria here beside the standard
ones (XGBoost gain, chapter 1; class-usage frequency, chapter 3; interventional effect, chapter 5).

Standard criteria: ``l1`` and ``l2`` (norm of the filter's weights, Li et al. 2017), ``random`` (a seeded
null), ``bn_scale`` (|gamma| of the BatchNorm after the layer, network slimming), ``taylor`` (first-order
Taylor, Molchanov et al. 2017), ``mean_activation`` and ``apoz`` (average percentage of zeros, inverted
so that higher is more important). ``iou`` ranks units by how interpretable network dissection finds them
(chapter 2). Whole-network pruning scores coupled groups (:class:`Group`, :func:`score_group`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
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
    """Images (and labels) a data-driven criterion scores on; the same for every criterion compared.
    ``concepts``: pixel labels of the same images (a ``broden.ConceptSet``), for the ``iou`` criterion."""

    x: torch.Tensor
    y: torch.Tensor
    concepts: object | None = None


class Criterion:
    """Scores the filters of a :class:`Target`: one finite number per output channel, higher = keep."""

    name: str = ""
    needs_data: bool = False

    def score(self, model: nn.Module, target: Target, data: Data | None = None) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover - interface

    def score_group(self, model: nn.Module, group: "Group", data: Data | None = None) -> np.ndarray:
        """Scores of the channels of a coupled group (whole-network pruning); by default, those of the one
        site ``group.target``. Criteria that see every coupled layer override it (see the end of the module)."""
        if type(self).score_groups is not Criterion.score_groups:
            return self.score_groups(model, [group], data)[group.name]
        return self(model, group.target, data)

    def score_groups(self, model: nn.Module, groups: Sequence["Group"], data: Data | None = None) -> dict:
        """Scores of several groups by name; criteria that read activations do them in one pass."""
        return {g.name: self.score_group(model, g, data) for g in groups}

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

    def score_group(self, model, group, data=None):
        return _magnitude(group, 1)


@register("l2")
class L2(Criterion):
    """Euclidean norm of each filter's weights."""

    def score(self, model, target, data=None):
        return _module(model, target.conv).weight.detach().flatten(1).norm(dim=1).numpy()

    def score_group(self, model, group, data=None):
        return np.sqrt(_magnitude(group, 2))


@register("random")
class Random(Criterion):
    """A seeded random score: the null every criterion is compared with."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, model, target, data=None):
        n = _n_out(_module(model, target.conv))
        return np.random.default_rng(self.seed).permutation(n).astype(float)

    def score_group(self, model, group, data=None):
        """Independent across groups: the seed is mixed with the group's name."""
        import zlib

        rng = np.random.default_rng([self.seed, zlib.crc32(group.name.encode())])
        return rng.permutation(group.size).astype(float)


@register("bn_scale")
class BNScale(Criterion):
    """|gamma| of the BatchNorm that follows the layer (network slimming, Liu et al. 2017)."""

    def score(self, model, target, data=None):
        if target.bn is None:
            raise ParameterError(f"criterion 'bn_scale' needs the BatchNorm after {target.conv!r}: Target(bn=...)")
        return _module(model, target.bn).weight.detach().abs().numpy()

    def score_group(self, model, group, data=None):
        import torch_pruning as tp

        return _tp_scores(tp.importance.BNScaleImportance(normalizer=None), group, "bn_scale")


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

    def score_groups(self, model, groups, data=None):
        return dict(zip([g.name for g in groups], consumer_statistics(model, groups, data, "mean")))


@register("apoz")
class APoZ(Criterion):
    """1 - the average percentage of zeros of each filter's map (Hu et al. 2016): higher = more often on."""

    needs_data = True

    def score(self, model, target, data=None):
        m = _maps(model, target, data)
        zero = (m <= 0).float()
        return 1.0 - (zero.flatten(2).mean((0, 2)) if m.ndim > 2 else zero.mean(0)).numpy()

    def score_groups(self, model, groups, data=None):
        return dict(zip([g.name for g in groups], consumer_statistics(model, groups, data, "on")))


@register("taylor")
class Taylor(Criterion):
    """First-order Taylor criterion E_x |mean over positions of a * dL/da| (Molchanov et al. 2017)."""

    needs_data = True

    def score(self, model, target, data=None):
        from .causal import taylor

        if target.act is None:
            raise ParameterError(f"criterion 'taylor' needs the activation after {target.conv!r}: Target(act=...)")
        return taylor(model, [target.act], data.x, data.y)[target.act][0]

    def score_groups(self, model, groups, data=None):
        return dict(zip([g.name for g in groups], consumer_taylor(model, groups, data)))


@register("iou")
class IoU(Criterion):
    """Interpretability (chapter 2's network dissection, Bau et al. 2017): each unit's best IoU with any
    concept of ``data.concepts``, its maps binarised at the top ``quantile`` of its activations."""

    needs_data = True

    def __init__(self, quantile: float = 0.005):
        self.quantile = quantile

    def score(self, model, target, data=None):
        from . import dissect

        if data.concepts is None:
            raise ParameterError("criterion 'iou' needs pixel labels of the scoring images: Data(concepts=...)")
        if target.act is None:
            raise ParameterError(f"criterion 'iou' needs the activation after {target.conv!r}: Target(act=...)")
        maps = dissect.layer_features(model, target.act, data.x)
        if maps.ndim != 4:
            raise ParameterError(f"criterion 'iou' dissects maps (N, C, h, w); {target.act!r} gives "
                                 f"{tuple(maps.shape)}")
        return dissect.dissect(maps, data.concepts, self.quantile).iou.max(1)


# --- chapter 6: coupled groups (whole-network pruning) -------------------------------------------------
# A group is what torch-pruning's DependencyGraph couples: the channels of a residual stream, say, live in
# the stem conv, every block's second conv and BatchNorm, the shortcut, and the inputs of every layer that
# reads the stream; removing one removes it everywhere. Weight criteria score a group with torch-pruning's
# own importance classes (the mean over the coupled layers); activation criteria read the channels where
# the group's consumers read them (exactly what removal takes away); any other criterion scores the one
# site ``Group.target`` names (e.g. a stage's last output for a residual stream).


@dataclass(frozen=True)
class Group:
    """Channels removed together: ``coupled`` is torch-pruning's group (its layers are the model's own
    modules), named by its root layer; ``target`` is where a single-site criterion reads the channels."""

    name: str
    coupled: object
    target: Target

    @property
    def size(self) -> int:
        return len(self.coupled[0].idxs)


def score_group(name: str, model: nn.Module, group: Group, data: Data | None = None, **kwargs) -> np.ndarray:
    """Scores of criterion ``name`` for the channels of a coupled ``group`` (higher = more important)."""
    crit = make(name, **kwargs)
    if crit.needs_data and data is None:
        raise ParameterError(f"criterion {name!r} scores filters on data; pass data=Data(x, y)")
    scores = np.asarray(crit.score_group(model, group, data), dtype=float)
    if scores.shape != (group.size,) or not np.isfinite(scores).all():
        raise ValueError(f"criterion {name!r} gave {scores.shape} scores (finite: "
                         f"{bool(np.isfinite(scores).all())}) for the {group.size} channels of group {group.name!r}")
    return scores


def score_groups(name: str, model: nn.Module, groups: Sequence[Group], data: Data | None = None,
                 **kwargs) -> dict[str, np.ndarray]:
    """Scores of criterion ``name`` for several coupled groups at once (one pass over the images for the
    criteria that read activations), by group name."""
    crit = make(name, **kwargs)
    if crit.needs_data and data is None:
        raise ParameterError(f"criterion {name!r} scores filters on data; pass data=Data(x, y)")
    out = crit.score_groups(model, groups, data)
    for g in groups:
        s = np.asarray(out[g.name], dtype=float)
        if s.shape != (g.size,) or not np.isfinite(s).all():
            raise ValueError(f"criterion {name!r} gave {s.shape} scores (finite: {bool(np.isfinite(s).all())}) "
                             f"for the {g.size} channels of group {g.name!r}")
        out[g.name] = s
    return out


def _tp_scores(importance, group: Group, what: str) -> np.ndarray:
    out = importance(group.coupled)
    if out is None:
        raise ParameterError(f"criterion {what!r} finds nothing to score in group {group.name!r}")
    return out.detach().double().numpy()


def _consumers(group: Group) -> list[tuple[nn.Module, list[int], list[int]]]:
    """(layer, its input-channel indices, the group channel of each) for every layer that reads the group."""
    import torch_pruning as tp

    reads = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    out = []
    for item in group.coupled:
        if item.dep.handler in reads:
            out.append((item.dep.target.module, list(item.idxs), list(item.root_idxs)))
    if not out:
        raise ParameterError(f"group {group.name!r} has no layer that reads its channels")
    return out


def _readers(groups: Sequence[Group]) -> list[tuple[int, nn.Module, list[int], list[int]]]:
    """(group position, reading layer, its input indices, the group channel of each) over ``groups``."""
    return [(i, m, idxs, roots) for i, g in enumerate(groups) for m, idxs, roots in _consumers(g)]


def consumer_statistics(model: nn.Module, groups: Sequence[Group], data: Data, stat: str,
                        batch_size: int = 256) -> list[np.ndarray]:
    """Per group, per channel: the mean (``stat='mean'``) or the share of positive values (``'on'``) of the
    inputs of the layers that read the group, over images and positions, averaged over those layers.
    One pass over the images serves every group."""
    readers = _readers(groups)
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(k):
        def pre(_m, inp):
            a = inp[0].detach()
            v = (a > 0).double() if stat == "on" else a.double()
            part = v.transpose(0, 1).reshape(v.shape[1], -1).sum(1)
            sums[k] = sums[k] + part if k in sums else part
            counts[k] = counts.get(k, 0) + a[:, 0].numel()
        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, (_, m, _, _) in enumerate(readers)]
    try:
        with torch.no_grad():
            model.eval()
            for s in range(0, len(data.x), batch_size):
                model(data.x[s:s + batch_size])
    finally:
        for h in handles:
            h.remove()
    total = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    count = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    for k, (i, _, idxs, roots) in enumerate(readers):
        r = torch.as_tensor(roots)
        total[i].index_add_(0, r, (sums[k] / counts[k])[idxs])
        count[i].index_add_(0, r, torch.ones(len(roots), dtype=torch.float64))
    return [(t / c.clamp_min(1)).numpy() for t, c in zip(total, count)]


def consumer_taylor(model: nn.Module, groups: Sequence[Group], data: Data, batch_size: int = 128) -> list[np.ndarray]:
    """Per group, the first-order Taylor estimate of the loss change when a channel is removed, where the
    group's readers take it in: per image |sum over readers and positions of a * dL/da|, averaged over
    images. One forward and backward pass per batch serves every group."""
    readers = _readers(groups)
    store: dict[int, torch.Tensor] = {}

    def hook(k):
        def pre(_m, inp):
            a = inp[0]
            if a.requires_grad:
                a.retain_grad()
            store[k] = a
        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, (_, m, _, _) in enumerate(readers)]
    score = [torch.zeros(g.size, dtype=torch.float64) for g in groups]
    try:
        model.eval()
        with torch.enable_grad():
            for s in range(0, len(data.x), batch_size):
                x = data.x[s:s + batch_size].clone().requires_grad_(True)
                out = model(x)
                model.zero_grad(set_to_none=True)
                F.cross_entropy(out, data.y[s:s + batch_size], reduction="sum").backward()
                per_image = [torch.zeros(len(x), g.size, dtype=torch.float64) for g in groups]
                for k, (i, _, idxs, roots) in enumerate(readers):
                    ag = (store[k] * store[k].grad).detach().double()
                    ag = ag.flatten(2).sum(2) if ag.ndim > 2 else ag
                    per_image[i].index_add_(1, torch.as_tensor(roots), ag[:, idxs])
                for i, p in enumerate(per_image):
                    score[i] += p.abs().sum(0)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return [(v / len(data.x)).numpy() for v in score]


def _magnitude(group: Group, p: int) -> np.ndarray:
    """torch-pruning's group magnitude: the mean over the coupled layers of each channel's sum of |w|^p."""
    import torch_pruning as tp

    return _tp_scores(tp.importance.GroupMagnitudeImportance(p=p, group_reduction="mean", normalizer=None),
                      group, f"l{p}")


def coupled_groups(model: nn.Module, example_input: torch.Tensor, roots: list[str] | None = None,
                   graph=None) -> list[Group]:
    """The coupled groups of ``model`` (torch-pruning's DependencyGraph on ``example_input``, or ``graph``
    if already built), in forward order of their root layers, each with the single site where a
    one-layer criterion reads its channels: the last ReLU run between the group's last output layer and
    its last reader (a stage's output for a residual stream). The output layer is never a group; with
    ``roots`` only the groups rooted at those layer names are kept (an unknown name is an error)."""
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(names[mod])) for m in leaves]
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in handles:
            h.remove()
    layers = [n for n in order if isinstance(_module(model, n), (nn.Conv2d, nn.Linear))]
    graph = graph or tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    found = {}
    for g in graph.get_all_groups(ignored_layers=[_module(model, layers[-1])],
                                  root_module_types=(nn.Conv2d, nn.Linear)):
        found[names[g[0].dep.target.module]] = g
    if roots is not None:
        unknown = [r for r in roots if r not in found]
        if unknown:
            raise ParameterError(f"roots={unknown} are not allowed; the groups of {type(model).__name__} are "
                                 f"rooted at {sorted(found)}")
        found = {r: found[r] for r in roots}
    out = []
    for name, g in sorted(found.items(), key=lambda kv: order.index(kv[0])):
        writes = [names[i.dep.target.module] for i in g if i.dep.handler in
                  (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)]
        after = order[max(order.index(w) for w in writes) + 1:]
        upto = next((i for i, n in enumerate(after) if n in layers), len(after))
        relus = [n for n in after[:upto] if isinstance(_module(model, n), nn.ReLU)]
        convs = [w for w in writes if isinstance(_module(model, w), (nn.Conv2d, nn.Linear))]
        bns = [w for w in writes if isinstance(_module(model, w), (nn.BatchNorm1d, nn.BatchNorm2d))]
        conv = max(convs, key=order.index)
        out.append(Group(name, g, Target(conv, relus[0] if relus else None,
                                         max(bns, key=order.index) if bns else None)))
    return out


# --- chapter 1 (paper 000) ---
# The tree-gain criterion 'gain' lives with the trees it fits; importing it here registers it, so that
# make("gain") works wherever this module is imported.
from . import trees as _trees  # noqa: E402,F401
