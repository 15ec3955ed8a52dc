"""Chapter 6: the five papers' criteria and the standard ones, compared under one protocol.

The protocol follows the published advice on comparing pruning methods (Blalock et al. 2020; Liu et al.
2019): the same networks, the same pruning targets (in MACs, with two allocations), the same fine-tuning
budget for every criterion, several seeds, random and magnitude always in the comparison, and every
comparison paired on the same test images.

- :func:`settings` builds what is compared: LeNet5 per layer and as a whole network, ResNet-20 as a whole
  network (residual streams included, :func:`criteria.coupled_groups`), and chapter 2's ResNet-8 on its
  synthetic scenes, whose last block's units the interpretability criterion ranks;
- :func:`run` scores the groups of a setting with every criterion on each seed's scoring images, turns the
  scores into plans (:func:`prune.plan_fraction`, :func:`prune.plan_macs`), prunes ("prune": the channels
  removed, :func:`prune.remove_groups`) or prunes and merges (:func:`merging.plan` with the
  criterion's kept channels, where a chain allows it), evaluates on fixed test images, fine-tunes each
  pruned network for a fixed number of steps and evaluates again;
- :func:`crossed` and :func:`paired` give intervals over seeds and test images together;
  :func:`ranking_table`, :func:`pareto_figure`, :func:`correlation_figure` and :func:`latency_table` show
  the results; :func:`decide_claims` decides the chapter's claims (declared in :mod:`claims`).
"""
from __future__ import annotations

import copy
import functools
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import baselines, claims, criteria, dissect, merging, prune, train
from . import causal, class_filters, trees  # noqa: F401  (they register 'causal', 'class_usage', 'gain')
from . import data as data_mod
from .params import ParameterError
from .plots import label_grid, panel_grid
from .progress import bar

NETWORKS = ("lenet5", "resnet20", "resnet8")
NAMES = {"lenet5": "LeNet5", "resnet20": "ResNet-20", "resnet8": "ResNet-8"}
METHODS = ("prune", "merge")
MERGE_LAM = 0.85  # lambda of merging's Algorithm 3 (BatchNorm chains): the reference code's value (chapter 4)


@dataclass
class Setting:
    """One comparison: a trained ``model``, the coupled ``groups`` that are pruned, the data (``train``
    for scoring and fine-tuning, ``test``: the fixed images every pruned network is evaluated on), the
    targets (fractions of each group for ``scope='layer'``, times fewer MACs for ``'network'``), the
    allocations, the merge-able chains by group name, and the fine-tuning recipe (one step = one batch)."""

    key: str
    network: str
    scope: str
    model: nn.Module
    groups: list[criteria.Group]
    train: data_mod.Split
    test: data_mod.Split
    targets: tuple[float, ...]
    allocations: tuple[str, ...]
    finetune: train.TrainConfig
    example: torch.Tensor
    chains: dict[str, merging.Chain] = field(default_factory=dict)
    concepts: object | None = None  # pixel labels of the training images (broden.ConceptSet), for "iou"
    mac_model: prune.MacModel | None = None
    criteria: tuple[str, ...] | None = None  # the criteria compared here (None: all of the run's)

    def __post_init__(self):
        if self.mac_model is None:
            self.mac_model = prune.MacModel(self.model, self.groups, self.example)

    @property
    def title(self) -> str:
        return self.key


# ---------------------------------------------------------------------------------------------------
# Statistics: intervals over seeds and test images together


# One implementation of the crossed interval serves every chapter: claims.Estimate.crossed (per-(seed, image)
# values) and claims.Estimate.paired_crossed (the same for paired differences).
crossed = claims.Estimate.crossed
paired = claims.Estimate.paired_crossed


def mean_ranks(acc: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean over seeds of each criterion's rank by accuracy (1 = best; ties share the mean rank)."""
    from scipy.stats import rankdata

    names = list(acc)
    m = np.asarray([acc[c] for c in names], dtype=float)  # (criteria, seeds)
    ranks = np.stack([rankdata(-m[:, j]) for j in range(m.shape[1])], axis=1)
    return dict(zip(names, ranks.mean(1).tolist()))


# ---------------------------------------------------------------------------------------------------
# The protocol


def _subset(split: data_mod.Split, n: int | None, seed: int) -> tuple[data_mod.Split, np.ndarray]:
    if n is None or n >= len(split):
        return split, np.arange(len(split))
    idx = data_mod.stratified_indices(split.y.numpy(), n, seed)
    return data_mod.Split(split.x[idx], split.y[idx], split.classes, split.name), idx


def scoring_data(setting: Setting, n: int | None, seed: int) -> criteria.Data:
    """The images (and their pixel labels, where the setting has them) that score filters at ``seed``: a
    stratified draw of ``n`` training images, the same for every criterion."""
    split, idx = _subset(setting.train, n, seed)
    concepts = dissect.subset(setting.concepts, idx) if setting.concepts is not None else None
    return criteria.Data(split.x, split.y, concepts)


def criterion_kwargs(name: str, seed: int, options: Mapping[str, Mapping] | None = None) -> dict:
    """Arguments of criterion ``name`` at ``seed``: the seed of the random null, and ``options[name]``."""
    kw = dict((options or {}).get(name, {}))
    if name == "random":
        kw["seed"] = seed
    return kw


def fewer(data: criteria.Data, n: int | None, seed: int) -> criteria.Data:
    """A stratified part of ``n`` of the scoring images (all of them when ``n`` is None or larger)."""
    if n is None or n >= len(data.x):
        return data
    idx = data_mod.stratified_indices(data.y.numpy(), n, seed)
    concepts = dissect.subset(data.concepts, idx) if data.concepts is not None else None
    return criteria.Data(data.x[idx], data.y[idx], concepts)


def score_all(setting: Setting, name: str, data: criteria.Data, seed: int,
              options: Mapping[str, Mapping] | None = None,
              images: Mapping[str, int] | None = None) -> tuple[dict[str, np.ndarray], float]:
    """Scores of criterion ``name`` for every group of ``setting`` and the seconds they took, on the
    scoring images (or ``images[name]`` of them, :func:`fewer`). A criterion that cannot score a group
    here raises :class:`ParameterError` (e.g. BatchNorm scale without BN)."""
    start = time.perf_counter()
    data = fewer(data, (images or {}).get(name), seed)
    kw = criterion_kwargs(name, seed, options)
    scores = criteria.score_groups(name, setting.model, setting.groups, data, **kw)
    return scores, time.perf_counter() - start


def make_plan(setting: Setting, scores: Mapping[str, np.ndarray], target: float, allocation: str,
              block: int | None = None) -> prune.NetworkPlan:
    """The channels to remove: ``target`` of each group (layer scope) or ``target`` times fewer MACs
    (network scope) with ``allocation`` 'uniform' or 'global'."""
    if setting.scope == "layer":
        return prune.plan_fraction(setting.groups, scores, target, block, setting.mac_model)
    return prune.plan_macs(setting.model, setting.groups, scores, setting.example, 1.0 / target, allocation,
                           block, setting.mac_model)


def pruned(setting: Setting, remove: Mapping[str, Sequence[int]], method: str = "prune",
           threshold: float | None = None, bn_threshold: float | None = None,
           lam: float = 0.85) -> tuple[nn.Module | None, int]:
    """The pruned network and how many removed neurons were merged: the planned channels removed ("prune",
    :func:`prune.remove_groups`), or ("merge") the merge-able groups pruned and merged (each removed
    neuron folded into its most similar kept one, :func:`merging.plan` with the criterion's kept
    channels; ``threshold`` without BatchNorm, ``bn_threshold`` with it) and the other groups removed.
    (None, 0) when ``method='merge'`` and no merge-able group loses a channel (it would equal "prune")."""
    remove = {g: list(v) for g, v in remove.items() if len(v)}
    if method not in METHODS:
        raise ParameterError(f"method={method!r} is not allowed; choose one of {METHODS}")
    heads = [g for g in remove if g in setting.chains] if method == "merge" else []
    if method == "merge" and not heads:
        return None, 0
    rest = {g: v for g, v in remove.items() if g not in heads}
    net = setting.model
    if heads:
        sizes = {g.name: g.size for g in setting.groups}
        plans = [merging.plan(setting.model, setting.chains[g], method="merge", lam=lam,
                              threshold=threshold if setting.chains[g].bn is None else bn_threshold,
                              kept=sorted(set(range(sizes[g])) - set(remove[g]))) for g in heads]
        net = merging.apply(net, plans)
    net = prune.remove_groups(net, rest, setting.example) if rest or not heads else net
    return net.eval(), sum(pl.merged for pl in plans) if heads else 0


def recalibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on the images ``x`` (a plain
    average over them; no weight changes): a pruned network's BatchNorms otherwise normalise with
    statistics of inputs that no longer exist (adaptive BatchNorm, Li et al. 2020). In place; returned."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    for m, mom in zip(norms, momenta):
        m.momentum = mom
    return model.eval()


def correct(model: nn.Module, split: data_mod.Split, batch_size: int = 500) -> np.ndarray:
    """Whether each test image is classified right (bool per image), computed by an inference copy of
    ``model`` (BatchNorm folded, channels_last: :func:`latency.prepare`; the same function, about twice
    as fast on this CPU)."""
    from .latency import prepare

    x = split.x.contiguous(memory_format=torch.channels_last) if split.x.ndim == 4 else split.x
    return (train.predict(prepare(model), x, batch_size).argmax(1) == split.y).numpy()


def finetune_chunks(setting: Setting, budgets: Sequence[int], seed: int) -> list[tuple[int, data_mod.Split]]:
    """For the sorted positive ``budgets`` (steps of one batch), the training images of each stretch of
    one fine-tuning run: budget b is the first b steps (one draw of max(budgets) batches at ``seed``)."""
    steps = sorted(b for b in budgets if b > 0)
    if not steps:
        return []
    bs = setting.finetune.batch_size
    pool, _ = _subset(setting.train, steps[-1] * bs, seed + 7919)  # not the scoring draw
    out, start = [], 0
    for b in steps:
        idx = torch.arange(start * bs, min(b * bs, len(pool)))
        out.append((b, data_mod.Split(pool.x[idx], pool.y[idx], pool.classes, pool.name)))
        start = b
    return out


def evaluate(setting: Setting, net: nn.Module, chunks, seed: int) -> dict[int, np.ndarray]:
    """Correctness on the test images before fine-tuning (budget 0) and after each budget of ``chunks``
    (one run, evaluated as it passes each budget), for a copy of ``net``."""
    out = {0: correct(net, setting.test)}
    if chunks:
        net = copy.deepcopy(net)
        for b, part in chunks:
            train.fit(net, part, None, setting.finetune, seed=seed + b, progress=False)
            out[b] = correct(net, setting.test)
    return out


@dataclass
class Runs:
    """Everything one comparison measured. ``rows``: one per (setting, target, allocation, criterion,
    method, budget, seed) with the accuracy, the share of MACs kept, the share of channels removed and
    ``correct`` (bool per test image); ``seconds``: scoring time per (setting, criterion, seed);
    ``skipped``: criteria that cannot score a setting, with why; ``scores``: (setting, seed, criterion) ->
    scores per group; ``base``: correctness of each unpruned network."""

    rows: pd.DataFrame
    seconds: pd.DataFrame
    skipped: dict[tuple[str, str], str]
    scores: dict[tuple[str, int, str], dict[str, np.ndarray]]
    base: dict[str, np.ndarray]
    settings: dict[str, Setting]


def run(settings: Sequence[Setting], names: Sequence[str], seeds: Sequence[int], budgets: Sequence[int],
        score_images: int | None, *, merge: Sequence[str] = NETWORKS, threshold: float | None = None,
        bn_threshold: float | None = None, lam: float = 0.85, block: int | None = None,
        options: Mapping[str, Mapping] | None = None, images: Mapping[str, int] | None = None,
        recalibrate_bn: bool = True, progress: bool = True) -> Runs:
    """The protocol, for every setting, seed, criterion, target, allocation, method and budget; prune +
    merge runs on the networks named in ``merge`` (where their layers allow it). With ``recalibrate_bn``
    every pruned network's BatchNorm statistics are re-estimated on the seed's scoring images before it is
    evaluated (:func:`recalibrate`): "no fine-tuning" means no weight update."""
    if "random" not in names:
        raise ParameterError(f"criteria={list(names)!r} is not allowed: random, the null, is always compared")
    rows, seconds, skipped, all_scores, base = [], [], {}, {}, {}
    work = [(s, seed) for s in settings for seed in seeds]
    for setting, seed in bar(work, desc="comparison", disable=not progress, leave=False):
        if setting.key not in base:
            base[setting.key] = correct(setting.model, setting.test)
        data = scoring_data(setting, score_images, seed)
        chunks = finetune_chunks(setting, budgets, seed)
        for name in names:
            if setting.criteria is not None and name not in setting.criteria:
                skipped[(setting.key, name)] = "left out of this setting at this run size (its cost)"
            if (setting.key, name) in skipped:
                continue
            try:
                scores, sec = score_all(setting, name, data, seed, options, images)
            except ParameterError as err:
                skipped[(setting.key, name)] = str(err)
                continue
            all_scores[(setting.key, seed, name)] = scores
            seconds.append({"setting": setting.key, "criterion": name, "seed": seed, "seconds": sec})
            for target in setting.targets:
                for allocation in setting.allocations:
                    plan = make_plan(setting, scores, target, allocation, block)
                    for method in (METHODS if setting.network in merge else ("prune",)):
                        net, n_merged = pruned(setting, plan.remove, method, threshold, bn_threshold, lam)
                        if net is None or (method == "merge" and n_merged == 0):
                            continue  # nothing merged: the network is the pruned one, already measured
                        if recalibrate_bn:
                            recalibrate(net, data.x)
                        for b, c in evaluate(setting, net, chunks, seed).items():
                            rows.append({"setting": setting.key, "target": target, "allocation": allocation,
                                         "criterion": name, "method": method, "budget": b, "seed": seed,
                                         "accuracy": float(c.mean()), "macs_kept": plan.macs_kept,
                                         "fraction": plan.fraction, "merged": n_merged, "correct": c})
    return Runs(pd.DataFrame(rows), pd.DataFrame(seconds), skipped, all_scores, base,
                {s.key: s for s in settings})


# ---------------------------------------------------------------------------------------------------
# Settings: the networks of the comparison


def _finetune_config(lr: float, batch_size: int, threads: int, channels_last: bool) -> train.TrainConfig:
    return train.TrainConfig(epochs=1, batch_size=batch_size, lr=lr, schedule="none", weight_decay=5e-4,
                             channels_last=channels_last, threads=threads)


def _chains(model: nn.Module, example: torch.Tensor, groups: Sequence[criteria.Group]) -> dict[str, merging.Chain]:
    heads = {c.layer: c for c in merging.find_chains(model, example, on_problem="skip")}
    return {g.name: heads[g.name] for g in groups if g.name in heads}


def lenet_settings(P, base: baselines.Baseline) -> list[Setting]:
    """LeNet5 on MNIST-5k: each of ``P.lenet_layers`` alone (fractions ``P.layer_fractions``) and the
    three conv layers together (``P.speedups`` times fewer MACs, ``P.allocations``)."""
    from .models import LENET5_LAYERS

    model = base.model.eval()
    example = base.test.x[:1]
    convs = [LENET5_LAYERS[k][0] for k in ("conv1", "conv2", "conv3")]
    groups = {g.name: g for g in criteria.coupled_groups(model, example, roots=convs)}
    chains = _chains(model, example, list(groups.values()))
    ft = _finetune_config(P.finetune_lr, P.finetune_batch, P.threads, False)
    test = base.test  # all of LeNet5's test images: evaluating it is cheap
    out = [Setting(f"LeNet5 {layer}", "lenet5", "layer", model, [groups[LENET5_LAYERS[layer][0]]], base.train,
                   test, tuple(P.layer_fractions), ("fraction",), ft, example, chains)
           for layer in P.lenet_layers]
    if P.speedups:
        out.append(Setting("LeNet5 network", "lenet5", "network", model, list(groups.values()), base.train, test,
                           tuple(P.speedups), tuple(P.allocations), ft, example, chains))
    return out


def resnet20_setting(P, base: baselines.Baseline) -> Setting:
    """Chapter 0's ResNet-20 on Fashion-MNIST, pruned as a whole: every block's inner conv and the three
    residual streams (coupled groups); merging applies to the inner convs only (a stream has no chain).
    Only ``P.resnet20_criteria`` compete here (the costliest criteria wait for the ``full`` size)."""
    if "random" not in P.resnet20_criteria:
        raise ParameterError(f"resnet20_criteria={P.resnet20_criteria!r} is not allowed: random, the null, is "
                             "always compared")
    model = base.model.eval()
    example = base.test.x[:1]
    groups = criteria.coupled_groups(model, example)
    ft = _finetune_config(P.finetune_lr, P.finetune_batch, P.threads, True)
    return Setting("ResNet-20 network", "resnet20", "network", model, groups, base.train,
                   base.test.subset(P.eval_images, P.seed), tuple(P.speedups), tuple(P.allocations), ft, example,
                   _chains(model, example, groups), criteria=tuple(P.resnet20_criteria))


def settings(P, progress: bool = True) -> list[Setting]:
    """The settings of a run, from the chapter's parameters ``P``."""
    out = []
    if "lenet5" in P.networks:
        out += lenet_settings(P, baselines.get("lenet5", P))
    if "resnet20" in P.networks:
        out.append(resnet20_setting(P, baselines.get("resnet20", P)))
    if "resnet8" in P.networks:
        out.append(scenes_setting(P, progress))
    return out


# chapter 2's network: its dense ResNet-8 on the synthetic Broden-format scenes, whose last block it dissects

@dataclass(frozen=True)
class SceneNet:
    """Chapter 2's dense ResNet-8 on its scenes: the model, its accuracy, the train / held-out splits, and
    the pixel labels (concept set) of the training images, which score units for the ``iou`` criterion."""

    model: nn.Module
    accuracy: float
    train: data_mod.Split
    test: data_mod.Split
    concepts: object


def scene_net(P, progress: bool = True) -> SceneNet:
    """Chapter 2's dense network of seed ``P.seed`` at run size ``P.size``: its scenes, its recipe and its
    cache entry (:func:`dissect.scenes`, :func:`dissect.imp_configs`, :func:`imp.dense_cached`), so the
    network is the one chapter 2 dissects and prunes, trained once for both chapters."""
    from . import broden, dissect, imp, models, presets

    P2 = presets.chapter_params("dissection", P.size, seeds=[P.seed], device=P.device, download=P.download)
    sc = dissect.scenes(P2)
    build = functools.partial(models.CifarResNet, P2.depth, num_classes=len(sc.train.classes), width=P2.width)
    key = {"data": sc.folder.name, "depth": P2.depth, "width": P2.width}
    dense, _ = imp.dense_cached(build, sc.train, sc.test, dissect.imp_configs(P2)[dissect.MAIN], key,
                                seed=P.seed, device=P.device)
    model = build()
    model.load_state_dict(dense["state"])
    acc = float(dense["test_acc"])
    train.check_trained(acc, len(sc.train.classes), f"chapter 2's dense ResNet-{P2.depth} (seed {P.seed})")
    concepts = broden.concept_set(sc.data, "train")
    if len(concepts) != len(sc.train) or not torch.equal(concepts.images, sc.train.x):
        raise ParameterError(f"{sc.folder} has training images without a scene label; the concept set and the "
                             "scene split must hold the same images")
    return SceneNet(model.eval(), acc, sc.train, sc.test, concepts)


def scenes_setting(P, progress: bool = True) -> Setting:
    """The units of the ResNet-8's last block (the layer chapter 2 dissects: its residual stream, a
    coupled group) pruned by fractions ``P.layer_fractions``; the scoring images carry pixel labels."""
    net = scene_net(P, progress)
    example = net.test.x[:1]
    stream = [g for g in criteria.coupled_groups(net.model, example) if g.target.act == "layer3.0.relu2"]
    ft = _finetune_config(P.finetune_lr, P.finetune_batch, P.threads, True)
    return Setting("ResNet-8 last block", "resnet8", "layer", net.model, stream, net.train, net.test,
                   tuple(P.layer_fractions), ("fraction",), ft, example, {}, net.concepts)


# ---------------------------------------------------------------------------------------------------
# What the runs show: cells, ranking tables, spreads, figures


def cell(runs: Runs, setting: str, target: float, allocation: str, budget: int,
         method: str = "prune") -> dict[str, np.ndarray]:
    """Per criterion, correctness (seeds, test images) of one cell of the comparison, seeds in order."""
    r = runs.rows
    r = r[(r.setting == setting) & (r.target == target) & (r.allocation == allocation) & (r.budget == budget)
          & (r.method == method)].sort_values("seed")
    return {c: np.stack(g["correct"].to_list()) for c, g in r.groupby("criterion", sort=False)}


PROSE_SPEEDUPS = (2, 4)  # the targets the chapter's prose names (times fewer MACs)


def _tag(key: str) -> str:
    """A setting's key as a glue-name prefix: 'ResNet-20 network' -> 'resnet20_network'."""
    return key.lower().replace(" ", "_").replace("-", "")


def _label(setting: Setting, target: float) -> str:
    return f"{target:g} of each layer" if setting.scope == "layer" else f"{target:g}x fewer MACs"


def _budget_label(b: int) -> str:
    return "no fine-tuning" if b == 0 else f"{b} fine-tuning steps"


def ranking(runs: Runs, setting: str, target: float, allocation: str, budget: int,
            method: str = "prune") -> pd.DataFrame:
    """One cell's ranking: per criterion the accuracy (mean, 95% interval over seeds and test images), its
    mean rank over seeds, and the paired difference from the best criterion of the cell and from random
    (both with intervals; 'below' when the whole interval lies below zero)."""
    cells = cell(runs, setting, target, allocation, budget, method)
    if not cells:
        raise ParameterError(f"no runs for {setting!r} at target {target}, {allocation}, budget {budget}")
    est = {c: crossed(v) for c, v in cells.items()}
    ranks = mean_ranks({c: v.mean(1) for c, v in cells.items()})
    best = max(est, key=lambda c: est[c].mean)
    rows = []
    for c, e in est.items():
        vs_best = paired(cells[c], cells[best]) if c != best else None
        vs_random = paired(cells[c], cells["random"]) if c != "random" else None
        rows.append({"criterion": c, "accuracy": e.mean, "half": (e.hi - e.lo) / 2, "mean rank": ranks[c],
                     "vs best": vs_best.mean if vs_best else 0.0,
                     "below best": bool(vs_best and vs_best.hi < 0),
                     "vs random": vs_random.mean if vs_random else 0.0,
                     "below random": bool(vs_random and vs_random.hi < 0),
                     "above random": bool(vs_random and vs_random.lo > 0)})
    return pd.DataFrame(rows).set_index("criterion").sort_values("mean rank")


def ranking_table(runs: Runs, setting: str, allocation: str, method: str = "prune") -> pd.DataFrame:
    """The ranking of every criterion in every (target, budget) of a setting, one column each: 'accuracy
    ± half-interval (mean rank)', marked * when significantly below the column's best criterion and
    † when significantly below random (paired over seeds and test images). Rows by overall mean rank."""
    s = runs.settings[setting]
    r = runs.rows[(runs.rows.setting == setting) & (runs.rows.allocation == allocation)]
    cols, order = {}, {}
    for target in s.targets:
        for b in sorted(r.budget.unique()):
            t = ranking(runs, setting, target, allocation, int(b), method)
            cols[(_label(s, target), _budget_label(int(b)))] = {
                c: f"{row.accuracy:.3f} ± {row.half:.3f} ({row['mean rank']:.1f})"
                   + (" *" if row["below best"] else "") + (" †" if row["below random"] else "")
                for c, row in t.iterrows()}
            for c, row in t.iterrows():
                order[c] = order.get(c, 0.0) + row["mean rank"]
    df = pd.DataFrame(cols).loc[sorted(order, key=order.get)]
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    df.index.name = "criterion"
    return df


def spread(runs: Runs, setting: str, target: float, allocation: str, budget: int) -> np.ndarray:
    """Per seed, the standard deviation across criteria of their accuracy: how much the choice of
    criterion matters in one cell (pruning only)."""
    cells = cell(runs, setting, target, allocation, budget)
    acc = np.stack([v.mean(1) for v in cells.values()])  # (criteria, seeds)
    return acc.std(0, ddof=1)


def curves(runs: Runs, setting: str, allocation: str, budget: int, method: str = "prune") -> dict:
    """Per criterion: share of MACs kept (mean over seeds), accuracy and interval, one point per target."""
    s = runs.settings[setting]
    out: dict[str, list] = {}
    for target in s.targets:
        for c, v in cell(runs, setting, target, allocation, budget, method).items():
            r = runs.rows
            macs = r[(r.setting == setting) & (r.target == target) & (r.allocation == allocation)
                     & (r.criterion == c) & (r.budget == budget) & (r.method == method)].macs_kept.mean()
            e = crossed(v)
            out.setdefault(c, []).append((float(macs), e.mean, e.lo, e.hi))
    return {c: np.asarray(sorted(p)) for c, p in out.items()}


def _style(name: str, names: Sequence[str]) -> dict:
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    i = sorted(names).index(name) if name in names else 0
    style = {"color": colours(i % 10), "marker": "osD^v<>ph*"[i % 10], "markersize": 4, "capsize": 2,
             "linewidth": 1.2}
    if name == "random":
        style.update(color="black", linestyle="--")
    return style


def pareto_figure(runs: Runs, setting: str, latency: pd.DataFrame | None = None):
    """Accuracy against the share of MACs kept (or, given the :func:`latency_table`, against the measured
    latency at batch 64), one line per criterion with its 95% interval, a panel per allocation and
    fine-tuning budget; the unpruned network is the star."""
    s = runs.settings[setting]
    budgets = sorted(runs.rows[runs.rows.setting == setting].budget.unique())
    panels = [(a, int(b)) for a in s.allocations for b in budgets]
    fig, axes = panel_grid(len(panels), min(len(panels), 4), (3.6, 3.1), sharey=True)
    names = sorted(runs.rows[runs.rows.setting == setting].criterion.unique())
    base = float(runs.base[setting].mean())
    for ax, (alloc, b) in zip(axes, panels):
        for c, pts in curves(runs, setting, alloc, b).items():
            x = pts[:, 0]
            if latency is not None:
                lat = latency.xs(alloc, level="allocation") if "allocation" in latency.index.names else latency
                x = np.asarray([lat.loc[(t, c), "latency b64 (ms)"] for t in sorted(s.targets, reverse=True)])
            lo, hi = np.clip(pts[:, 2], 0, 1), np.clip(pts[:, 3], 0, 1)  # an accuracy lies in [0, 1]
            ax.errorbar(x, pts[:, 1], yerr=[pts[:, 1] - lo, hi - pts[:, 1]], label=c, **_style(c, names))
        x0 = 1.0 if latency is None else float(latency.attrs["unpruned b64 (ms)"])
        ax.plot([x0], [base], marker="*", color="gold", markeredgecolor="black", markersize=11, linestyle="none",
                label="unpruned")
        ax.set_title(f"{alloc}, {_budget_label(b)}", fontsize="small")
    xlabel = ("share of conv and linear MACs kept" if latency is None
              else "latency at batch 64 (ms of one CPU thread)")
    label_grid(axes, xlabel, "test accuracy (fraction correct)", min(len(panels), 4), legend=False)
    axes[0].set_ylim(0, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize="small")
    return fig


def rank_correlation(scores: np.ndarray) -> np.ndarray:
    """Spearman correlation between the rows of ``scores`` (criteria, channels): the Pearson correlation
    of their ranks (ties share the mean rank); NaN where a row is constant (it ranks nothing)."""
    from scipy.stats import rankdata

    r = rankdata(np.asarray(scores, dtype=float), axis=1)
    r -= r.mean(1, keepdims=True)
    norm = np.sqrt((r * r).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r @ r.T) / np.outer(norm, norm)
    out[norm == 0, :] = np.nan
    out[:, norm == 0] = np.nan
    return out


def correlation(runs: Runs, setting: str) -> pd.DataFrame:
    """Spearman rank correlation between the criteria's channel scores, per group and seed, averaged
    (weighted by the group's channels, over the groups where both rank something): do the criteria pick
    the same channels?"""
    s = runs.settings[setting]
    names = sorted({k[2] for k in runs.scores if k[0] == setting})
    seeds = sorted({k[1] for k in runs.scores if k[0] == setting})
    total = np.zeros((len(names), len(names)))
    weight = np.zeros((len(names), len(names)))
    for seed in seeds:
        for g in s.groups:
            rho = rank_correlation(np.stack([runs.scores[(setting, seed, c)][g.name] for c in names]))
            ok = np.isfinite(rho)
            total[ok] += g.size * rho[ok]
            weight[ok] += g.size
    with np.errstate(invalid="ignore"):
        return pd.DataFrame(total / weight, index=names, columns=names)


def correlation_figure(matrices: Mapping[str, pd.DataFrame]):
    """One heat map per setting of :func:`correlation`, values written in the cells."""
    fig, axes = panel_grid(len(matrices), len(matrices), (4.2, 3.8))
    for ax, (title, m) in zip(axes, matrices.items()):
        im = ax.imshow(m.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(m)), m.columns, rotation=60, ha="right", fontsize="x-small")
        ax.set_yticks(range(len(m)), m.index, fontsize="x-small")
        for i in range(len(m)):
            for j in range(len(m)):
                if np.isfinite(m.iat[i, j]):
                    ax.text(j, i, f"{m.iat[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_title(title, fontsize="small")
    fig.colorbar(im, ax=axes, shrink=0.8, label="Spearman rank correlation of channel scores")
    return fig


def seconds_table(runs: Runs) -> pd.DataFrame:
    """Mean seconds each criterion took to score all the groups of each setting (over seeds)."""
    t = runs.seconds.groupby(["criterion", "setting"]).seconds.mean().unstack()
    return t.loc[t.mean(1).sort_values().index]


def applicability(runs: Runs) -> pd.DataFrame:
    """Which criterion ran in which setting, and why not where it did not (the reason in full)."""
    names = sorted({c for _, c in runs.skipped} | set(runs.rows.criterion.unique()))
    out = {k: {c: runs.skipped.get((k, c), "ran") for c in names} for k in runs.settings}
    return pd.DataFrame(out)


def applicability_display(runs: Runs):
    """:func:`applicability` for the page: each reason once, numbered under the table, and 'no (n)' in
    its cells, so that no reason is cut and the table stays narrow."""
    table = applicability(runs)
    reasons = sorted({v for v in table.to_numpy().ravel() if v != "ran"})
    short = table.map(lambda v: v if v == "ran" else f"no ({reasons.index(v) + 1})")
    notes = pd.DataFrame({"why not": reasons}, index=pd.RangeIndex(1, len(reasons) + 1, name="no"))
    return short, notes.style.set_properties(**{"text-align": "left", "white-space": "normal"})


def latency_table(runs: Runs, setting: str, repeats: int = 10, block: int | None = None,
                  batches: Sequence[int] = (1, 64)) -> pd.DataFrame:
    """Per (target, allocation, criterion), the network that the first seed's plan leaves, physically
    pruned (:func:`prune.remove_groups`): parameters, MACs per image (torch-pruning's count), the speed-up
    in MACs and the latency at each batch size after BatchNorm folding and channels_last, on one thread's
    CPU clock, which the load of other processes hardly moves (:func:`latency.cost_table`; networks of
    the same shape are timed once). The unpruned network's latencies are in ``attrs``."""
    from . import latency

    s = runs.settings[setting]
    seed = int(runs.rows[runs.rows.setting == setting].seed.min())
    names = sorted(runs.rows[(runs.rows.setting == setting)].criterion.unique())
    nets, shapes, rows = {"unpruned": s.model}, {}, []
    for target in s.targets:
        for alloc in s.allocations:
            for c in names:
                plan = make_plan(s, runs.scores[(setting, seed, c)], target, alloc, block)
                shape = tuple(plan.keep[g.name] for g in s.groups)
                if shape not in shapes:
                    shapes[shape] = f"shape {len(shapes) + 1}"
                    nets[shapes[shape]] = prune.remove_groups(s.model, plan.remove, s.example)
                rows.append({"target": target, "allocation": alloc, "criterion": c, "network": shapes[shape]})
    costs = latency.cost_table(nets, tuple(s.example.shape[1:]), tuple(batches), repeats, threads=1, seed=seed)
    t = costs.table
    cols = ["params", "MACs"] + [f"latency b{b} (ms)" for b in batches]
    df = pd.DataFrame(rows).join(t[cols], on="network").set_index(["target", "allocation", "criterion"])
    df.insert(2, "MAC speed-up", float(t.loc["unpruned", "MACs"]) / df["MACs"])
    for b in batches:
        df.attrs[f"unpruned b{b} (ms)"] = float(t.loc["unpruned", f"latency b{b} (ms)"])
    df.attrs["unpruned MACs"] = int(t.loc["unpruned", "MACs"])
    return df


# ---------------------------------------------------------------------------------------------------
# The chapter's claims (declared in pruning_utils.claims, chapter 6 block)


def _cells(runs: Runs, scopes: Sequence[str] = ("network",)):
    for key, s in runs.settings.items():
        if s.scope in scopes:
            for target in s.targets:
                for alloc in s.allocations:
                    yield key, s, target, alloc


def _merge_gain(runs: Runs, key: str, target: float, alloc: str, budget: int) -> np.ndarray | None:
    m = cell(runs, key, target, alloc, budget, "merge")
    p = cell(runs, key, target, alloc, budget, "prune")
    names = [c for c in m if c in p]
    return np.mean([m[c].astype(float) - p[c] for c in names], axis=0) if names else None


def merged_anywhere(runs: Runs, key: str, target: float, alloc: str) -> bool:
    """Whether prune + merge merged at least one neuron in this cell (else it equals pruning)."""
    r = runs.rows
    r = r[(r.setting == key) & (r.target == target) & (r.allocation == alloc) & (r.method == "merge")]
    return bool(len(r)) and int(r.merged.max()) > 0


def decide_claims(runs: Runs) -> list:
    """The chapter's claims decided on ``runs`` by the rules declared in :mod:`claims` (each over seeds
    and test images, parts per setting, target, allocation, budget or criterion as declared)."""
    budgets = sorted(int(b) for b in runs.rows.budget.unique())
    top = budgets[-1]
    nets = list(_cells(runs))
    out = []
    shrink = {f"{k}, {t:g}x, {a}": claims.Estimate.paired(spread(runs, k, t, a, top), spread(runs, k, t, a, 0))
              for k, _, t, a in nets} if top > 0 else {}
    out.append(claims.decide("cmp-finetune-shrinks", shrink or None,
                             f"largest budget {top} steps; the seeds cover scoring images and fine-tuning"
                             if shrink else "no fine-tuning budget in this run"))
    strong = {}
    for k, _, t, a in nets:
        for b in budgets:
            c = cell(runs, k, t, a, b)
            others = {n: v.mean() for n, v in c.items() if n not in ("l1", "random")}
            if "l1" in c and others:
                best = max(others, key=others.get)
                strong[f"{k}, {t:g}x, {a}, {b} steps (best: {best})"] = paired(c["l1"], c[best])
    out.append(claims.decide("cmp-magnitude-strong", strong or None, "L1 against the best other criterion "
                             "of each cell, chosen after the fact (which favours the other criterion)"))
    rand = {}
    for k, s in runs.settings.items():  # whole networks, and the one layer where interpretability competes
        alloc = "uniform" if s.scope == "network" else "fraction"
        if alloc not in s.allocations or (s.scope == "layer" and s.network != "resnet8"):
            continue
        c = cell(runs, k, max(s.targets), alloc, 0)
        rand.update({f"{n} @ {k}": paired(v, c["random"]) for n, v in c.items() if n != "random"})
    out.append(claims.decide("cmp-beats-random", rand or None, "largest target of each setting, no fine-tuning; "
                             "a criterion below zero here loses to random"))
    merge0, most = {}, {}
    for k, _, t, a in _cells(runs, ("network", "layer")):
        if not merged_anywhere(runs, k, t, a):
            continue
        g0 = _merge_gain(runs, k, t, a, 0)
        if g0 is None:
            continue
        merge0[f"{k}, {t:g}, {a}"] = crossed(g0)
        if top > 0:
            most[f"{k}, {t:g}, {a}"] = crossed(g0 - _merge_gain(runs, k, t, a, top))
    note = "cells where merging folded at least one neuron (the similarity threshold drops the others)"
    out.append(claims.decide("cmp-merge-helps", merge0 or None, note))
    out.append(claims.decide("cmp-merge-most-without-ft", most or None, note))
    return out


# ---------------------------------------------------------------------------------------------------
# The chapter in one object


@dataclass
class Comparison:
    """Chapter 6's result: the runs, a latency table per whole-network setting, and the parameters."""

    runs: Runs
    latency: dict[str, pd.DataFrame]
    P: object

    def settings_table(self) -> pd.DataFrame:
        """One row per setting: network, what is pruned, channels, unpruned accuracy, targets, test images."""
        rows = {}
        for key, s in self.runs.settings.items():
            pruned_ = (", ".join(g.name for g in s.groups) if len(s.groups) <= 3
                       else f"{len(s.groups)} coupled groups")
            rows[key] = {"network": NAMES[s.network], "pruned": pruned_,
                         "channels": sum(g.size for g in s.groups),
                         "unpruned accuracy": float(self.runs.base[key].mean()),
                         "targets": ", ".join(_label(s, t) for t in s.targets),
                         "allocations": ", ".join(s.allocations), "test images": len(s.test),
                         "merge-able groups": len(s.chains)}
        return pd.DataFrame(rows).T

    def applicability(self):
        """:func:`applicability_display` of the runs: the table and its numbered reasons."""
        return applicability_display(self.runs)

    def seconds(self):
        """:func:`seconds_table`, formatted."""
        return seconds_table(self.runs).style.format("{:.3f}", na_rep="")

    def rankings(self, setting: str, allocation: str, method: str = "prune"):
        """:func:`ranking_table`, styled for the page."""
        return ranking_table(self.runs, setting, allocation, method).style.set_properties(
            **{"white-space": "normal", "text-align": "right", "font-size": "0.85em"})

    def tables(self, network: str, method: str = "prune") -> dict:
        """The ranking tables of every setting of ``network`` ('lenet5', 'resnet20', 'resnet8'), one per
        allocation, by title (empty when the run left that network out)."""
        return {f"{key}, {a} allocation" if a != "fraction" else key: self.rankings(key, a, method)
                for key, s in self.runs.settings.items() if s.network == network for a in s.allocations}

    def figures(self) -> dict:
        """The chapter's figures by glue name: accuracy against MACs and against latency per whole-network
        setting (``fig_cmp_macs_<tag>``, ``fig_cmp_latency_<tag>``), and the rank correlations."""
        out = {}
        for key, s in self.runs.settings.items():
            if s.scope == "network":
                out[f"fig_cmp_macs_{_tag(key)}"] = pareto_figure(self.runs, key)
                out[f"fig_cmp_latency_{_tag(key)}"] = pareto_figure(self.runs, key, self.latency[key])
        corr = {key: correlation(self.runs, key) for key, s in self.runs.settings.items()
                if s.scope == "network" or s.network == "resnet8"}
        if corr:
            out["fig_cmp_correlation"] = correlation_figure(corr)
        return out

    def latency_view(self, setting: str) -> pd.DataFrame:
        """The latency table of a whole-network setting, formatted."""
        lat = self.latency[setting]
        return lat.style.format_index(lambda v: f"{v:g}x" if isinstance(v, float) else v, level=0).format({"params": "{:,.0f}", "MACs": "{:,.0f}", "MAC speed-up": "{:.2f}",
                                 **{c: "{:.2f}" for c in lat.columns if c.startswith("latency")}})

    def merge_table(self) -> pd.DataFrame:
        """Gain of prune + merge over pruning alone (mean over criteria, with its interval), per cell and
        budget, and how many removed neurons merging folded per network (mean)."""
        budgets = sorted(int(b) for b in self.runs.rows.budget.unique())
        rows = []
        for key, s, t, a in _cells(self.runs, ("network", "layer")):
            r = self.runs.rows
            m = r[(r.setting == key) & (r.target == t) & (r.allocation == a) & (r.method == "merge")]
            if not len(m):
                continue
            row = {"setting": key, "target": _label(s, t), "allocation": a, "merged neurons": m.merged.mean()}
            for b in budgets:
                gain = _merge_gain(self.runs, key, t, a, b)
                e = crossed(gain)
                row[f"gain, {_budget_label(b)}"] = f"{e.mean:+.3f} ± {(e.hi - e.lo) / 2:.3f}"
            rows.append(row)
        return pd.DataFrame(rows).set_index(["setting", "target", "allocation"]) if rows else pd.DataFrame()

    def claims(self) -> list:
        return decide_claims(self.runs)

    def winners(self, setting: str, allocation: str, budget: int) -> dict[float, str]:
        """Per target, the criteria tied for first (not significantly below the cell's best)."""
        s = self.runs.settings[setting]
        out = {}
        for t in s.targets:
            r = ranking(self.runs, setting, t, allocation, budget)
            out[t] = ", ".join(c for c, row in r.iterrows() if not row["below best"])
        return out

    def numbers(self) -> dict:
        """The values the chapter's prose glues in: per setting (tagged e.g. ``resnet20_network``) the
        unpruned accuracy, the test images, the criteria tied for first per allocation, target and budget
        (``..._uniform_4x_b0``), the spread across criteria without and after the largest budget; merging's
        gain; and the latency reached at the largest target."""
        top = max(self.P.finetune_steps)
        out = {"n_seeds": len(self.P.seeds), "score_images": self.P.score_images, "budget": top,
               "batch": self.P.finetune_batch, "lr": self.P.finetune_lr}
        for key, s in self.runs.settings.items():
            tag = _tag(key)
            out[f"{tag}_base"] = float(self.runs.base[key].mean())
            out[f"{tag}_test"] = len(s.test)
            for a in s.allocations:
                for b, suffix in ((0, "b0"), (top, "btop")):
                    for t, names in self.winners(key, a, b).items():
                        out[f"{tag}_{a}_{t:g}x_{suffix}".replace(".", "p")] = names
            t, a = max(s.targets), s.allocations[0]
            out[f"{tag}_spread_b0"] = float(spread(self.runs, key, t, a, 0).mean())
            out[f"{tag}_spread_btop"] = float(spread(self.runs, key, t, a, top).mean())
            merged = merged_anywhere(self.runs, key, t, a)  # else NaN: the prose's glue must exist
            for b, suffix in ((0, "b0"), (top, "btop")):
                gain = _merge_gain(self.runs, key, t, a, b) if merged else None
                out[f"{tag}_merge_gain_{suffix}"] = float(gain.mean()) if gain is not None else float("nan")
        for key in self.runs.settings:  # the prose names 2x and 4x: say so where this run has no such target
            for a, t, suffix in itertools.product(("uniform", "global"), PROSE_SPEEDUPS, ("b0", "btop")):
                out.setdefault(f"{_tag(key)}_{a}_{t:g}x_{suffix}", "not run (not among this run's targets)")
        beats = next(r for r in decide_claims(self.runs) if r.claim.key == "cmp-beats-random")
        losers = [k for k, v in beats.part_verdicts.items() if v.value == "does not hold"]
        out["below_random"] = ", ".join(losers) if losers else "none"
        for key, lat in self.latency.items():
            tag = _tag(key)
            uni = lat.xs("uniform", level="allocation") if "uniform" in lat.index.get_level_values(1) else lat
            t = max(uni.index.get_level_values(0))
            row = uni.xs(t, level="target").iloc[0]
            out[f"{tag}_lat_target"] = float(t)
            out[f"{tag}_lat_macs"] = float(row["MAC speed-up"])
            out[f"{tag}_lat_b64"] = float(self.latency[key].attrs["unpruned b64 (ms)"] / row["latency b64 (ms)"])
            out[f"{tag}_lat_b1"] = float(self.latency[key].attrs["unpruned b1 (ms)"] / row["latency b1 (ms)"])
        return out

    def check(self) -> dict:
        """A few key numbers, rounded, for nbval: the unpruned accuracies and each setting's mean accuracy
        per budget (pruning only)."""
        r = self.runs.rows[self.runs.rows.method == "prune"]
        return {"base": {k: round(float(v.mean()), 3) for k, v in self.runs.base.items()},
                "mean": {f"{k} / {b}": round(float(g.accuracy.mean()), 3)
                         for (k, b), g in r.groupby(["setting", "budget"])}}


def compare_all(P, progress: bool = True) -> Comparison:
    """Chapter 6 from its parameters: the settings, the protocol on every one, latency tables."""
    found = settings(P, progress)
    runs = run(found, P.criteria, P.seeds, P.finetune_steps, P.score_images, merge=P.merge or (),
               threshold=P.merge_threshold, bn_threshold=P.merge_bn_threshold, lam=MERGE_LAM, block=P.block,
               options={"iou": {"quantile": P.iou_quantile}}, images={"causal": P.causal_images},
               recalibrate_bn=P.recalibrate_bn, progress=progress)
    lat = {s.key: latency_table(runs, s.key, P.latency_repeats, block=P.block) for s in found if s.scope == "network"}
    return Comparison(runs, lat, P)
