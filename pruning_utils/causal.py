"""Causal filter importance and pruning (chapter 5, paper 004, a proposal).

- interventional importance: the average causal effect of do(a_j := 0) or do(a_j := E[a_j]) on a filter's
  map a_j, on the loss, the accuracy, the true-class probability and the KL divergence from the unmodified
  output, with a bootstrap interval; a chunk of interventions rides in one forward pass (the batch is
  repeated once per intervention, then masked); the same for a coupled group of channels (masked at every
  layer of the group, e.g. a residual stream); registered as the criterion ``"causal"``
  (:mod:`pruning_utils.criteria`);
- a structural causal model over filters after Narendra et al. (2018): per image, each filter's map norm;
  each child filter regressed on the previous layer's filters; parent importance = sum of |coefficients|;
- observational estimates of a filter's effect with DoWhy's back-door adjustment, its refuters, and a check
  that can fail (the interventional truth, which a network lets us measure);
- the first-order Taylor criterion (Molchanov et al. 2017), the linearisation of do(a_j := 0) on the loss;
- the chapter's studies (:func:`setup`, then one function per section, each returning a small result
  object): effects, criteria agreement, DoWhy, the fine-tuned comparison on ResNet-20, CexCNN's setting,
  regularisation, latency, and the claims.
"""
from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import activations, criteria, prune
from .params import ParameterError, check_choice
from .plots import label_grid, new_figure, panel_grid
from .progress import bar

INTERVENTIONS = ("zero", "mean")
OUTCOMES = ("loss", "accuracy", "prob", "kl")
ADJUSTMENTS = ("none", "parents", "parents+siblings")
REFUTERS = ("placebo_treatment_refuter", "random_common_cause", "data_subset_refuter")


# ---------------------------------------------------------------------------------------------------------
# Interventions on filters


def outcomes(out: torch.Tensor, y: torch.Tensor, reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image outcomes Y of the model output ``out`` (logits or log-probabilities): the loss, whether it
    is correct, p(y|x), and KL(p_ref || p), the divergence from the ``reference`` log-probabilities (0 if None)."""
    logp = F.log_softmax(out.float(), dim=1)
    true = logp.gather(1, y.view(-1, 1)).squeeze(1)
    kl = (reference.exp() * (reference - logp)).sum(1) if reference is not None else torch.zeros_like(true)
    return {"loss": -true, "accuracy": (logp.argmax(1) == y).float(), "prob": true.exp(), "kl": kl}


def repeat_point(model: nn.Module, layer: str) -> str:
    """Where the batch is repeated for batched interventions at ``layer``: the layer itself when its parent is
    an nn.Sequential (its output feeds only the next sibling), else its parent (e.g. a ResNet block, whose
    shortcut reuses the block's input)."""
    prune.module(model, layer)
    parent = layer.rpartition(".")[0]
    return layer if isinstance(prune.module(model, parent) if parent else model, nn.Sequential) else parent


@torch.no_grad()
def mean_map(model: nn.Module, layer: str, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """E[a] over the images ``x``: the mean output map of ``layer`` (the value of do(a_j := E[a_j]))."""
    total = None
    with activations.hooked(model.eval(), [layer]) as store:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
            s = store[layer].sum(0)
            total = s if total is None else total + s
    return total / len(x)


@torch.no_grad()
def outcomes_under(model: nn.Module, layer: str | Sequence[str], x: torch.Tensor, y: torch.Tensor,
                   sets: Sequence[Sequence[int]], fill: torch.Tensor | None = None,
                   repeat_at: str | None = None, batch_size: int = 64, max_batch: int = 1024,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-image outcomes (N, K) under do(a_S := fill_S) for each set S of channels of ``layer`` (fill None:
    zero), or of several layers at once (a coupled group: the same channels zeroed in each). The batch is
    repeated once per set at ``repeat_at`` (default :func:`repeat_point` for one layer, the model's input
    for several) and each copy masked, so a chunk of interventions costs one forward pass of the layers
    after the repeat."""
    layers = [layer] if isinstance(layer, str) else list(layer)
    if not layers:
        raise ParameterError("layer=[] is not allowed; name at least one layer")
    if fill is not None and len(layers) > 1:
        raise ParameterError("fill (do(a := E[a])) takes one layer; several layers take do(a := 0)")
    model.eval()
    targets = {name: prune.module(model, name) for name in layers}
    if repeat_at is None:
        repeat_at = repeat_point(model, layers[0]) if len(layers) == 1 else ""
    entry = model if repeat_at == "" else prune.module(model, repeat_at)
    sets = [sorted({int(j) for j in s}) for s in sets]
    chunk = max(1, max_batch // batch_size)
    state: dict = {}

    def repeat(_m, args):
        return (args[0].repeat(state["k"], *[1] * (args[0].ndim - 1)), *args[1:])

    def mask(name):
        def hook(_m, _inp, out):
            k, c = state["k"], out.shape[1]
            if any(j >= c for s in state["sets"] for j in s):
                raise ParameterError(f"sets name channel indices >= {c}, the number of channels of layer {name!r}")
            m = torch.zeros(k, c, dtype=torch.bool)
            for i, s in enumerate(state["sets"]):
                m[i, s] = True
            o = out.view(k, -1, *out.shape[1:])
            m = m.view(k, 1, c, *[1] * (out.ndim - 2))
            value = torch.zeros((), dtype=out.dtype) if fill is None else fill.to(out.dtype)
            return torch.where(m, value, o).reshape(out.shape)
        return hook

    parts: dict[str, list[torch.Tensor]] = {o: [] for o in OUTCOMES}
    handles = [entry.register_forward_pre_hook(repeat)]
    handles += [t.register_forward_hook(mask(name)) for name, t in targets.items()]
    try:
        for i in bar(range(0, len(x), batch_size), desc=f"do() at {layers[0]}", disable=not progress, leave=False):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            state["sets"], state["k"] = [[]], 1
            ref = F.log_softmax(model(xb).float(), dim=1)  # no intervention: the reference of the KL
            cols: dict[str, list[torch.Tensor]] = {o: [] for o in OUTCOMES}
            for c0 in range(0, len(sets), chunk):
                state["sets"] = sets[c0:c0 + chunk]
                state["k"] = len(state["sets"])
                res = outcomes(model(xb), yb.repeat(state["k"]), ref.repeat(state["k"], 1))
                for o in OUTCOMES:
                    cols[o].append(res[o].view(state["k"], -1).T)
            for o in OUTCOMES:
                parts[o].append(torch.cat(cols[o], 1))
    finally:
        for h in handles:
            h.remove()
    return {o: torch.cat(p) for o, p in parts.items()}


@torch.no_grad()
def baseline_outcomes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict:
    """Per-image outcomes (N,) of the unmodified model (no intervention)."""
    model.eval()
    res = [outcomes(model(x[i:i + batch_size]), y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {o: torch.cat([r[o] for r in res]) for o in OUTCOMES}


def bootstrap_ci(diffs: np.ndarray, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple:
    """Mean of per-image differences (N, K) and its percentile bootstrap interval over images (lo, hi)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.ndim == 1:
        diffs = diffs[:, None]
    n = len(diffs)
    if n_boot < 1 or not 0 < level < 1:
        raise ParameterError(f"n_boot={n_boot!r}, level={level!r} are not allowed; expected n_boot >= 1, 0 < level < 1")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    boot = counts @ diffs / n
    alpha = (1 - level) / 2
    return diffs.mean(0), np.quantile(boot, alpha, axis=0), np.quantile(boot, 1 - alpha, axis=0)


def effects(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor,
            interventions: Sequence[str] = INTERVENTIONS, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
            repeat_at: str | None = None, batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """Average causal effect E[Y | do(a_j := v)] - E[Y] of every filter j of ``layer`` on each outcome Y
    (loss, accuracy, true-class probability, KL from the unmodified output), v = 0 or E[a_j], with a
    bootstrap interval over the images."""
    for v in interventions:
        check_choice("intervention", v, INTERVENTIONS)
    base = baseline_outcomes(model, x, y)
    n_filters = mean_map(model, layer, x[:2]).shape[0]
    rows = []
    for v in interventions:
        fill = mean_map(model, layer, x) if v == "mean" else None
        do = outcomes_under(model, layer, x, y, [[j] for j in range(n_filters)], fill, repeat_at, batch_size,
                            progress=progress)
        for o in OUTCOMES:
            mean, lo, hi = bootstrap_ci((do[o] - base[o][:, None]).numpy(), n_boot, level, seed)
            rows += [{"layer": layer, "filter": j, "intervention": v, "outcome": o, "effect": mean[j],
                      "lo": lo[j], "hi": hi[j]} for j in range(n_filters)]
    return pd.DataFrame(rows)


def importance(table: pd.DataFrame, intervention: str = "zero", outcome: str = "loss") -> np.ndarray:
    """One importance per filter from :func:`effects` (larger: the intervention matters more): the rise of
    the loss, the fall of the accuracy or of the true-class probability, or the mean KL divergence."""
    check_choice("intervention", intervention, INTERVENTIONS)
    check_choice("outcome", outcome, OUTCOMES)
    part = table[(table["intervention"] == intervention) & (table["outcome"] == outcome)].sort_values("filter")
    if part.empty:
        raise ParameterError(f"intervention={intervention!r} is not in the effects table; it has "
                             f"{sorted(table['intervention'].unique())}")
    sign = 1.0 if outcome in ("loss", "kl") else -1.0
    return sign * part["effect"].to_numpy()


def group_effects(model: nn.Module, group, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64,
                  max_batch: int = 1024) -> dict[str, np.ndarray]:
    """Importance of each channel of a coupled ``group`` (:func:`criteria.coupled_groups`) under every
    outcome: the mean effect of do(channel := 0) at all the group's :func:`prune.mask_points` at once (the
    same function as removing it), signed so that larger = the network needs it more (the rise of the loss
    and of the KL divergence, the fall of the accuracy and of the true-class probability)."""
    points = prune.mask_points(model, group)
    repeat_at = repeat_point(model, points[0]) if len(points) == 1 else ""
    do = outcomes_under(model, points, x, y, [[j] for j in range(group.size)], repeat_at=repeat_at,
                        batch_size=batch_size, max_batch=max_batch)
    base = baseline_outcomes(model, x, y)
    return {o: SIGN[o] * (do[o] - base[o][:, None]).mean(0).double().numpy() for o in OUTCOMES}


SIGN = {"loss": 1.0, "kl": 1.0, "accuracy": -1.0, "prob": -1.0}  # importance = SIGN * effect


@criteria.register("causal")
class Interventional(criteria.Criterion):
    """The interventional effect of removing a filter, measured (chapter 5): the mean change of ``outcome``
    under do(a_j := 0) (``intervention="zero"``, removal) or do(a_j := E[a_j]) (``"mean"``) at the
    target's activation ``act``; for a coupled group, do(channel := 0) at every layer of the group."""

    needs_data = True

    def __init__(self, outcome: str = "kl", intervention: str = "zero", batch_size: int = 64):
        self.outcome = check_choice("outcome", outcome, OUTCOMES)
        self.intervention = check_choice("intervention", intervention, INTERVENTIONS)
        self.batch_size = batch_size

    def score(self, model, target, data=None):
        if target.act is None:
            raise ParameterError(f"criterion 'causal' intervenes after the nonlinearity of {target.conv!r}: "
                                 "Target(act=...)")
        n = prune.module(model, target.conv).weight.shape[0]
        fill = mean_map(model, target.act, data.x) if self.intervention == "mean" else None
        do = outcomes_under(model, target.act, data.x, data.y, [[j] for j in range(n)], fill,
                            batch_size=self.batch_size)
        base = baseline_outcomes(model, data.x, data.y)[self.outcome]
        return SIGN[self.outcome] * (do[self.outcome] - base[:, None]).mean(0).double().numpy()

    def score_group(self, model, group, data=None):
        if self.intervention != "zero":
            raise ParameterError("intervention='mean' is not allowed on a coupled group; use 'zero' (removal)")
        return group_effects(model, group, data.x, data.y, self.batch_size)[self.outcome]


# ---------------------------------------------------------------------------------------------------------
# A structural causal model over filters (Narendra et al. 2018) and the Taylor criterion


def map_norms(model: nn.Module, layers: Sequence[str], x: torch.Tensor, batch_size: int = 256) -> dict:
    """Per image, the L2 norm of each channel's map at each layer, (N, C): the SCM's variables."""
    norms = activations.channel_scores(model, x, list(layers), how="norm", batch_size=batch_size)
    return {name: v.numpy().astype(np.float64) for name, v in norms.items()}


def _standardize(z: np.ndarray, scale: bool) -> np.ndarray:
    z = z - z.mean(0)
    if scale:
        sd = z.std(0)
        z = np.divide(z, sd, out=np.zeros_like(z), where=sd > 1e-12)
    return z


def structural_equations(parents: np.ndarray, children: np.ndarray, standardize: bool = True,
                         ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Linear structural equations child_k = sum_j beta_jk parent_j + e_k of Narendra et al.'s SCM, fitted by
    ridge least squares (on z-scores if ``standardize``); returns beta (P, Q) and each equation's R^2 (Q,)."""
    if len(parents) != len(children) or len(parents) < 2:
        raise ParameterError(f"parents {parents.shape} and children {children.shape} need the same number "
                             "(>= 2) of rows")
    xs, ys = _standardize(parents, standardize), _standardize(children, standardize)
    p, q = xs.shape[1], ys.shape[1]
    aug_x = np.vstack([xs, np.sqrt(ridge * len(xs)) * np.eye(p)])  # ridge as extra rows; lstsq gives the
    aug_y = np.vstack([ys, np.zeros((p, q))])                        # minimum-norm fit for dead parents
    beta = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0]
    resid = ((ys - xs @ beta) ** 2).sum(0)
    total = (ys ** 2).sum(0)
    r2 = np.divide(total - resid, total, out=np.zeros_like(total), where=total > 1e-12)
    return beta, r2


def scm_importance(parents: np.ndarray, children: np.ndarray, standardize: bool = True,
                   ridge: float = 1e-3) -> np.ndarray:
    """Importance of each parent filter in the SCM: sum over the child filters of |beta_jk|."""
    beta, _ = structural_equations(parents, children, standardize, ridge)
    return np.abs(beta).sum(1)


def taylor(model: nn.Module, layers: Sequence[str], x: torch.Tensor, y: torch.Tensor,
           batch_size: int = 128) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """First-order Taylor scores per filter of each layer: Molchanov et al.'s criterion E|mean_m a_m dL/da_m|
    and the signed first-order estimate of do(a_j := 0) on the loss, E[-sum_m a_m dL/da_m]."""
    model.eval()
    modules = {name: prune.module(model, name) for name in layers}
    store: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, _i, out):
            out.retain_grad()
            store[name] = out
        return hook

    crit = {name: 0.0 for name in layers}
    delta = {name: 0.0 for name in layers}
    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    try:
        with torch.enable_grad():
            for i in range(0, len(x), batch_size):
                out = model(x[i:i + batch_size])
                model.zero_grad(set_to_none=True)
                F.cross_entropy(out, y[i:i + batch_size], reduction="sum").backward()
                for name in layers:
                    a = store[name]
                    ag = (a * a.grad).detach()
                    ag = ag.flatten(2) if ag.ndim > 2 else ag.unsqueeze(-1)
                    crit[name] = crit[name] + ag.mean(2).abs().sum(0)
                    delta[name] = delta[name] - ag.sum(2).sum(0)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {name: ((crit[name] / len(x)).numpy(), (delta[name] / len(x)).numpy()) for name in layers}


# ---------------------------------------------------------------------------------------------------------
# Observational estimates with DoWhy


def _causal_model():
    """DoWhy's CausalModel, imported without the ``sympy.init_printing()`` that dowhy runs on import: in a
    notebook it would render every later number as a LaTeX image (and glued numbers as figures)."""
    from unittest import mock

    with mock.patch("sympy.init_printing", lambda *args, **kwargs: None):
        from dowhy import CausalModel
    return CausalModel


def backdoor_estimate(frame: pd.DataFrame, treatment: str, outcome: str, common_causes: Sequence[str],
                      refuters: Sequence[str] = (), simulations: int = 10, seed: int = 0,
                      level: float = 0.95) -> dict:
    """DoWhy's back-door linear-regression estimate of the effect of ``treatment`` on ``outcome`` given the
    graph W -> T, W -> Y, T -> Y (W: ``common_causes``), its interval, and each refuter's new effect and p."""
    import networkx as nx

    CausalModel = _causal_model()
    for r in refuters:
        check_choice("refuter", r, REFUTERS)
    if frame[treatment].std() == 0:  # a dead filter: no variation, nothing to estimate from
        return {"estimate": math.nan, "lo": math.nan, "hi": math.nan,
                **{k: math.nan for r in refuters for k in (r, f"{r} p")}}
    common_causes = [w for w in common_causes if frame[w].std() > 0]  # dead parents carry no information
    edges = [(w, treatment) for w in common_causes] + [(w, outcome) for w in common_causes] + [(treatment, outcome)]
    with warnings.catch_warnings():
        # dowhy 0.14 passes copy= to pandas, which pandas >= 3 deprecates; harmless here
        warnings.filterwarnings("ignore", message="The copy keyword is deprecated")
        # collinear norms (one filter a copy of another) leave the slope of the other causes unidentified,
        # not the treatment's; the interval reports what is identified
        warnings.filterwarnings("ignore", message="The design matrix is rank-deficient")
        logging.getLogger("dowhy").setLevel(logging.WARNING)
        model = CausalModel(data=frame[[*common_causes, treatment, outcome]], treatment=treatment,
                            outcome=outcome, graph=nx.DiGraph(edges))
        estimand = model.identify_effect(proceed_when_unidentifiable=True, method_name="maximal-adjustment")
        # DoWhy collects the adjustment set in a Python set, so the design matrix's column order (and with it
        # the last bits of the regression) followed the process's string-hash seed: put it in the frame's order
        order = {name: i for i, name in enumerate(common_causes)}
        for key, names in (estimand.backdoor_variables or {}).items():
            estimand.backdoor_variables[key] = sorted(names, key=lambda v: (order.get(v, len(order)), v))
        est = model.estimate_effect(estimand, method_name="backdoor.linear_regression", confidence_intervals=True)
        lo, hi = np.asarray(est.get_confidence_intervals(confidence_level=level), dtype=float).ravel()[:2]
        res = {"estimate": float(est.value), "lo": float(lo), "hi": float(hi)}
        for r in refuters:
            extra = {"placebo_type": "permute"} if r == "placebo_treatment_refuter" else {}
            ref = model.refute_estimate(estimand, est, method_name=r, num_simulations=simulations,
                                        random_seed=seed, **extra)
            res[r] = float(ref.new_effect)
            res[f"{r} p"] = float(ref.refutation_result["p_value"])
    return res


def observational_effects(treatments: np.ndarray, outcome: np.ndarray, parents: np.ndarray,
                          adjustments: Sequence[str] = ADJUSTMENTS, filters: Sequence[int] | None = None,
                          refuters: Sequence[str] = (), simulations: int = 10, seed: int = 0,
                          level: float = 0.95, progress: bool = False) -> pd.DataFrame:
    """For each filter j: DoWhy's back-door slope of the outcome on T_j (its map norm), adjusting for nothing,
    the previous layer's norms, or those and the other filters of the layer; the effect of do(T_j := 0)
    that the slope implies, -slope * E[T_j] (with the interval mapped the same way); and the refuters' results."""
    for a in adjustments:
        check_choice("adjustment", a, ADJUSTMENTS)
    n, c = treatments.shape
    cols = {f"w{i}": parents[:, i] for i in range(parents.shape[1])}
    cols.update({f"t{j}": treatments[:, j] for j in range(c)})
    frame = pd.DataFrame({**cols, "y": outcome})
    rows = []
    jobs = [(j, a) for j in (range(c) if filters is None else filters) for a in adjustments]
    for j, a in bar(jobs, desc="DoWhy estimates", disable=not progress, leave=False):
        w = [] if a == "none" else [f"w{i}" for i in range(parents.shape[1])]
        if a == "parents+siblings":
            w += [f"t{k}" for k in range(c) if k != j]
        est = backdoor_estimate(frame, f"t{j}", "y", w, refuters, simulations, seed, level)
        m = float(treatments[:, j].mean())
        slope, lo, hi = est.pop("estimate"), est.pop("lo"), est.pop("hi")
        if math.isnan(slope):  # a dead filter's map is always 0: do(T := 0) changes nothing
            implied = (0.0, 0.0, 0.0)
        else:
            implied = (-slope * m, -hi * m, -lo * m)
        rows.append({"filter": j, "adjustment": a, "slope": slope, "slope lo": lo, "slope hi": hi,
                     "implied effect": implied[0], "implied lo": implied[1], "implied hi": implied[2], **est})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Figures of chapter 5


def effects_figure(panels: Mapping[str, Mapping[str, tuple]], ylabel: str, ncols: int | None = None,
                   panel_size: tuple[float, float] = (3.8, 3.0)):
    """One panel per layer: each series ``label -> (effect, lo, hi)`` per filter, as points with interval
    bars, filters sorted by the first series (most important on the right)."""
    fig, axes = panel_grid(len(panels), ncols, panel_size)
    for ax, (title, series) in zip(axes, panels.items()):
        order = None
        for s, (label, (eff, lo, hi)) in enumerate(series.items()):
            eff, lo, hi = map(np.asarray, (eff, lo, hi))
            order = np.argsort(eff, kind="stable") if order is None else order
            pos = np.arange(len(eff)) + 0.2 * s
            ax.errorbar(pos, eff[order], yerr=[eff[order] - lo[order], hi[order] - eff[order]], fmt="o",
                        markersize=3, capsize=0, elinewidth=0.8, label=label)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(title)
    label_grid(axes, "filters, sorted by the first series", ylabel, ncols)
    return fig


def scatter_figure(panels: Mapping[str, Mapping[str, tuple]], xlabel: str, ylabel: str, diagonal: bool = True,
                   ncols: int | None = None, panel_size: tuple[float, float] = (3.6, 3.2)):
    """One panel per entry, each series ``label -> (x, y)`` or ``(x, y, ylo, yhi)`` as points (with
    vertical interval bars); ``diagonal`` draws y = x."""
    fig, axes = panel_grid(len(panels), ncols, panel_size)
    for ax, (title, series) in zip(axes, panels.items()):
        values = []
        for label, pts in series.items():
            x, y = np.asarray(pts[0], dtype=float), np.asarray(pts[1], dtype=float)
            if len(pts) == 4:
                ax.errorbar(x, y, yerr=[y - np.asarray(pts[2]), np.asarray(pts[3]) - y], fmt="o", markersize=4,
                            elinewidth=0.8, label=label)
            else:
                ax.plot(x, y, "o", markersize=4, label=label)
            values += [x, y]
        if diagonal and values:
            lo, hi = min(v.min() for v in values), max(v.max() for v in values)
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.7, linestyle="--", label="y = x")
        ax.set_title(title)
    label_grid(axes, xlabel, ylabel, ncols)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Chapter 5: the studies. Each section of the chapter calls one function, which returns a small result
# object with its tables, figure, numbers for the prose, and the estimates its claims are decided on.

METHOD = {"zero": "do(0)", "mean": "do(mean)"}
LENET_NEXT = {"conv1": "convnet.relu3", "conv2": "convnet.relu5", "conv3": "fc.relu6"}  # the SCM's children
PREVIOUS = {"conv2": "conv1", "conv3": "conv2"}
CRITERIA = ("causal", "SCM", "Taylor", "L1", "random")  # compared on ResNet-20, in this order
CHEAP = ("L1", "Taylor")  # the cheap criteria of claim 1
LENET_FT_THREADS = 1  # LeNet5 fine-tunes on one thread, like its training recipe


def _cpu() -> float:
    """CPU seconds of this process (all threads): what a computation costs, whatever else the machine runs."""
    return time.process_time()


@torch.no_grad()
def correct(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Per test image, whether ``net`` classifies it right (evaluated BatchNorm-folded and channels_last,
    :func:`latency.prepare`: the same function, faster)."""
    from . import latency

    fast = latency.prepare(net)
    xs = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
    pred = torch.cat([fast(xs[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (pred == y).numpy()


@dataclass
class Study:
    """The chapter's networks (chapter 0's cached LeNet5 and ResNet-20 at the first seed) and the images
    shared by the sections: LeNet5's ranking images and ResNet-20's fixed test subset (every pruned
    ResNet-20 is scored on the same images, so comparisons are paired)."""

    P: SimpleNamespace
    lenet: object
    resnet: object
    lenet_rank: object
    resnet_test: object

    def table(self) -> pd.DataFrame:
        rows = {}
        for label, b, extra in (("LeNet5", self.lenet, {"images that measure the effects": len(self.lenet_rank),
                                                        "test images": len(self.lenet.test)}),
                                ("ResNet-20", self.resnet, {"images that rank, per seed": self.P.resnet_images,
                                                            "test images": len(self.resnet_test)})):
            rows[label] = {"data": b.recipe.dataset, "training images": f"{b.record['n_train']:,}",
                           "test accuracy (recorded)": f"{b.accuracy:.4f}", **{k: f"{v:,}" for k, v in extra.items()}}
        return pd.DataFrame(rows).fillna("")

    def numbers(self) -> dict:
        r = self.resnet
        return {"l_acc": self.lenet.accuracy, "r_acc": r.accuracy, "n_l_rank": len(self.lenet_rank),
                "n_l_test": len(self.lenet.test), "n_r_test": len(self.resnet_test), "n_boot": self.P.bootstrap,
                "l_ntrain": f"{self.lenet.record['n_train']:,}", "r_epochs": r.recipe.config.epochs,
                "r_data": r.recipe.dataset, "n_seeds": len(self.P.seeds)}


def setup(P: SimpleNamespace) -> Study:
    """Load the chapter's networks (:func:`baselines.get`, which stops if one is near chance) and draw the
    shared images."""
    from . import baselines

    lenet = baselines.get("lenet5", P)
    resnet = baselines.get("resnet20", P)
    need = P.resnet_images + P.resnet_val_images + P.resnet_finetune_images
    if need > len(resnet.train):
        raise ParameterError(f"resnet_images + resnet_val_images + resnet_finetune_images = {need} is not allowed: "
                             f"the training split has {len(resnet.train)} images")
    return Study(P, lenet, resnet, lenet.train.subset(P.images, P.seed),
                 resnet.test.subset(P.resnet_eval_images, P.seed))


# --- interventional effects on LeNet5 ---


@dataclass
class LeNetEffects:
    """Every LeNet5 filter's interventional effect (:func:`effects`) per layer and intervention."""

    tables: dict[tuple[str, str], pd.DataFrame]
    layers: list[str]
    interventions: list[str]
    seconds: float

    def series(self, layer: str, v: str = "zero", outcome: str = "loss") -> tuple[np.ndarray, ...]:
        part = self.tables[(layer, v)]
        part = part[part["outcome"] == outcome].sort_values("filter")
        return part["effect"].to_numpy(), part["lo"].to_numpy(), part["hi"].to_numpy()

    def importance(self, layer: str, v: str = "zero", outcome: str = "loss") -> np.ndarray:
        return importance(self.tables[(layer, v)], v, outcome)

    def summary(self) -> pd.DataFrame:
        rows = []
        for (layer, v), t in self.tables.items():
            loss, acc, kl = (t[t["outcome"] == o] for o in ("loss", "accuracy", "kl"))
            rows.append({"layer": layer, "intervention": METHOD[v], "filters": len(loss),
                         "share whose loss interval excludes 0": float((loss["lo"] > 0).mean()),
                         "share that lower the loss": float((loss["effect"] < 0).mean()),
                         "largest loss rise (nats)": float(loss["effect"].max()),
                         "largest accuracy drop": float(-acc["effect"].min()),
                         "largest mean KL (nats)": float(kl["effect"].max())})
        return pd.DataFrame(rows).set_index(["layer", "intervention"])

    def figure(self):
        from .models import LENET5_LAYERS

        return effects_figure({f"{l} ({LENET5_LAYERS[l][1]})": {METHOD[v]: self.series(l, v)
                                                               for v in self.interventions}
                               for l in self.layers}, "rise of the loss (nats per image)")

    def numbers(self) -> dict:
        s = self.summary().reset_index()
        first = s[s["intervention"] == METHOD[self.interventions[0]]].reset_index(drop=True)
        out = {"lenet_max_drop": float(first["largest accuracy drop"].max()),
               "lenet_max_drop_layer": str(first.loc[first["largest accuracy drop"].idxmax(), "layer"]),
               "first_do": METHOD[self.interventions[0]], "lenet_effect_seconds": self.seconds}
        if set(INTERVENTIONS) <= set(self.interventions):
            from scipy.stats import spearmanr

            rho = [spearmanr(self.series(l, "zero")[0], self.series(l, "mean")[0])[0] for l in self.layers]
            out["rho_zero_mean"] = ", ".join(f"{l} {r:.2f}" for l, r in zip(self.layers, rho))
        else:
            out["rho_zero_mean"] = "not computed in this run (one intervention)"
        return out


def lenet_effects(study: Study) -> LeNetEffects:
    """The effect of do(0) and do(mean) on every filter of the chosen LeNet5 layers, on the ranking images
    (bootstrap intervals over the images)."""
    from .models import LENET5_LAYERS

    P, net = study.P, study.lenet.model
    x, y = study.lenet_rank.x, study.lenet_rank.y
    start, tables = _cpu(), {}
    for layer in P.lenet_layers:
        for v in P.interventions:
            tables[(layer, v)] = effects(net, LENET5_LAYERS[layer][1], x, y, [v], P.bootstrap, seed=P.seed)
    return LeNetEffects(tables, list(P.lenet_layers), list(P.interventions), _cpu() - start)


# --- the SCM and the cheap criteria on LeNet5 ---


@dataclass
class Agreement:
    """How each criterion orders LeNet5's filters beside the measured effect of do(0) on the loss
    (Spearman's rho per layer), and how well the SCM's linear equations fit (median R^2)."""

    spearman: pd.DataFrame
    r2: pd.DataFrame


def lenet_criteria(study: Study, eff: LeNetEffects) -> Agreement:
    """Score LeNet5's filters by the SCM (Narendra et al.), L1, Taylor and the other interventions, and
    compare each ordering with the measured effect of do(0) on the loss."""
    from scipy.stats import spearmanr

    from .models import LENET5_LAYERS

    net, x, y = study.lenet.model, study.lenet_rank.x, study.lenet_rank.y
    data = criteria.Data(x, y)
    acts = sorted({LENET5_LAYERS[l][1] for l in eff.layers} | {LENET_NEXT[l] for l in eff.layers})
    norms = map_norms(net, acts, x)
    rho, r2 = {}, {}
    for layer in eff.layers:
        conv, act = LENET5_LAYERS[layer]
        target = criteria.Target(conv, act)
        beta, fit = structural_equations(norms[act], norms[LENET_NEXT[layer]])
        scores = {"SCM": np.abs(beta).sum(1), "L1": criteria.score("l1", net, target),
                  "Taylor": criteria.score("taylor", net, target, data),
                  "do(0) on the KL divergence": eff.importance(layer, "zero", "kl")}
        if "mean" in eff.interventions:
            scores["do(mean) on the loss"] = eff.importance(layer, "mean", "loss")
        ref = eff.importance(layer, "zero", "loss")
        rho[layer] = {k: float(spearmanr(v, ref)[0]) for k, v in scores.items()}
        r2[layer] = {"parents": f"{layer} ({beta.shape[0]} filters)", "children": LENET_NEXT[layer],
                     "median R^2 of the child equations": float(np.median(fit))}
    sp = pd.DataFrame(rho)
    sp.index.name = "Spearman with do(0) on the loss"
    return Agreement(sp, pd.DataFrame(r2).T)


# --- DoWhy: observational estimates against the interventional truth ---


@dataclass
class DoWhyResult:
    """DoWhy's estimates of each filter's effect (three adjustment sets), the interventional truth beside
    them, the refuters on every filter, and a negative control whose truth is known."""

    layer: str
    parents: str
    obs: pd.DataFrame
    refuted: pd.DataFrame
    control: pd.DataFrame
    zero_share: float
    ever_zero: float
    seconds: float
    seed: int = 0

    def table(self) -> pd.DataFrame:
        from scipy.stats import spearmanr

        rows = {}
        for a, part in self.obs.groupby("adjustment", sort=False):
            inside = (part["implied lo"] <= part["interventional"]) & (part["interventional"] <= part["implied hi"])
            rows[a] = {"Spearman with the interventional effect": spearmanr(part["implied effect"],
                                                                            part["interventional"])[0],
                       "share of filters whose interval holds the truth": float(inside.mean()),
                       "mean |implied - interventional| (nats)":
                           float((part["implied effect"] - part["interventional"]).abs().mean()),
                       "same sign": float((np.sign(part["implied effect"]) == np.sign(part["interventional"])).mean())}
        return pd.DataFrame(rows).T

    def estimate(self, adjustment: str = "parents", n_boot: int = 2000):
        """Spearman's rho between DoWhy's implied effects and the measured ones (one adjustment set), with a
        percentile-bootstrap interval over the filters (:class:`claims.Estimate`)."""
        from scipy.stats import spearmanr

        from .claims import Estimate

        part = self.obs[self.obs["adjustment"] == adjustment]
        a, b = part["implied effect"].to_numpy(), part["interventional"].to_numpy()
        rng = np.random.default_rng(self.seed)
        boot = []
        for _ in range(n_boot):
            i = rng.integers(0, len(a), len(a))
            if np.ptp(a[i]) > 0 and np.ptp(b[i]) > 0:
                boot.append(spearmanr(a[i], b[i])[0])
        return Estimate.bootstrap(float(spearmanr(a, b)[0]), boot, len(a), method="bootstrap over filters")

    def refuter_estimate(self):
        """Among the estimates that pass all three refuters, the share whose 95% interval holds the measured
        effect (Wilson interval over those filters)."""
        from .claims import Estimate

        passing = self.refuted[self.refuted["passes all refuters"]]
        if passing.empty:
            return None
        return Estimate.proportion(int(passing["interval holds the truth"].sum()), len(passing))

    def figure(self):
        return scatter_figure({f"adjusting for: {a}": {"filters": (p["interventional"], p["implied effect"],
                                                                    p["implied lo"], p["implied hi"])}
                               for a, p in self.obs.groupby("adjustment", sort=False)},
                              "interventional effect of do(0) on the loss (nats)",
                              "DoWhy estimate, -slope x E[T] (nats)")

    def numbers(self) -> dict:
        t = self.table()
        out = {"dowhy_layer": f"{self.layer} (adjusting with {self.parents})", "dw_zero_share": self.zero_share,
               "dw_ever_zero": self.ever_zero, "dowhy_seconds": self.seconds}
        for a in t.index:
            out[f"dw_rho_{a}"] = float(t.loc[a, "Spearman with the interventional effect"])
            out[f"dw_in_{a}"] = float(t.loc[a, "share of filters whose interval holds the truth"])
        par = self.obs[self.obs["adjustment"] == "parents"]
        out["dw_scale"] = float(par["interventional"].abs().mean() / max(par["implied effect"].abs().mean(), 1e-12))
        r = self.refuted
        out["refute_pass"] = f"{int(r['passes all refuters'].sum())} of {len(r)}"
        out["refute_pass_right"] = f"{int((r['passes all refuters'] & r['interval holds the truth']).sum())}"
        c = self.control.iloc[0]
        out |= {"ctl_truth": float(c["true effect"]), "ctl_est": float(c["estimate"]), "ctl_lo": float(c["lo"]),
                "ctl_hi": float(c["hi"]),
                "ctl_pass": f"{int(sum(c[f'{r} p'] > 0.05 for r in REFUTERS))} of {len(REFUTERS)}"}
        return out


def refuter_control(n: int = 2000, simulations: int = 5, seed: int = 0) -> pd.DataFrame:
    """A negative control for DoWhy's refuters: data from a known linear SCM (T = W + U + e, Y = T + 2U + W
    + e, true effect 1) with the confounder U left out of the graph, so the back-door estimate is biased
    (about 2). A check that can detect the error would flag it; the refuters' p-values say whether they do."""
    rng = np.random.default_rng(seed)
    w, u = rng.normal(size=n), rng.normal(size=n)
    t = w + u + rng.normal(size=n)
    yv = 1.0 * t + 2.0 * u + w + rng.normal(size=n)
    est = backdoor_estimate(pd.DataFrame({"w": w, "t": t, "y": yv}), "t", "y", ["w"], REFUTERS, simulations, seed)
    return pd.DataFrame([{"true effect": 1.0, **est}])


def dowhy_study(study: Study, eff: LeNetEffects) -> DoWhyResult:
    """DoWhy's back-door estimates of the effect of each filter's map norm (layer ``P.dowhy_layer``) on the
    per-image loss, with no adjustment, the previous layer's norms, or those and the layer's other filters;
    the refuters on every filter (parents adjustment); and the negative control."""
    from .models import LENET5_LAYERS

    P, net = study.P, study.lenet.model
    x, y = study.lenet_rank.x, study.lenet_rank.y
    layer, parents = P.dowhy_layer, PREVIOUS[P.dowhy_layer]
    start = _cpu()
    act, pact = LENET5_LAYERS[layer][1], LENET5_LAYERS[parents][1]
    norms = map_norms(net, [act, pact], x)
    loss = baseline_outcomes(net, x, y)["loss"].double().numpy()
    truth = (effects(net, act, x, y, ["zero"], n_boot=10, seed=P.seed) if layer not in eff.layers
             else eff.tables[(layer, "zero")])
    truth = truth[(truth["outcome"] == "loss") & (truth["intervention"] == "zero")].sort_values("filter")
    truth = truth["effect"].to_numpy()
    obs = observational_effects(norms[act], loss, norms[pact])
    obs["interventional"] = truth[obs["filter"].to_numpy()]
    ref = observational_effects(norms[act], loss, norms[pact], adjustments=["parents"], refuters=list(REFUTERS),
                                simulations=P.refute_simulations, seed=P.seed)
    ref["interventional"] = truth[ref["filter"].to_numpy()]
    ref["passes all refuters"] = (ref[[f"{r} p" for r in REFUTERS]] > 0.05).all(axis=1)
    ref["interval holds the truth"] = (ref["implied lo"] <= ref["interventional"]) & \
                                      (ref["interventional"] <= ref["implied hi"])
    ref = ref.drop(columns=["adjustment", "slope", "slope lo", "slope hi"]).set_index("filter")
    control = refuter_control(simulations=P.refute_simulations, seed=P.seed)
    t = norms[act]
    return DoWhyResult(layer, parents, obs, ref, control, float((t == 0).mean()), float((t == 0).any(0).mean()),
                       _cpu() - start, P.seed)


# --- claim 1: which ranking prunes ResNet-20 best, after the same fine-tuning ---


@dataclass
class Comparison:
    """Per criterion and seed, which test images the pruned ResNet-20 classifies right before and after the
    same fine-tuning; the outcome chosen per seed on held-out images and every outcome's accuracy; the
    CPU seconds each criterion took to score."""

    seeds: list[int]
    fraction: float
    pre: dict[str, np.ndarray]
    post: dict[str, np.ndarray]
    outcomes: pd.DataFrame
    seconds: pd.DataFrame
    unpruned: float

    @property
    def n_test(self) -> int:
        return self.pre["causal"].shape[1]

    def estimate(self, a: str, b: str, after: bool = True):
        """Accuracy of ``a`` minus ``b``, paired on the same seeds and test images, with an interval that
        counts the seeds (ranking images, fine-tuning) and the test images together
        (:meth:`claims.Estimate.paired_crossed`): three seeds that disagree make it wide, as they should."""
        from .claims import Estimate

        d = self.post if after else self.pre
        return Estimate.paired_crossed(d[a], d[b])

    def seed_gaps(self, a: str, b: str, after: bool = True) -> str:
        """The accuracy difference ``a - b`` seed by seed (the spread the interval's seed term counts)."""
        d = self.post if after else self.pre
        return ", ".join(f"{v:+.3f}" for v in d[a].mean(1) - d[b].mean(1))

    def table(self) -> pd.DataFrame:
        rows = {}
        for name in self.pre:
            row = {"before fine-tuning": float(self.pre[name].mean()), "after fine-tuning": float(self.post[name].mean()),
                   "after, per seed": ", ".join(f"{v:.3f}" for v in self.post[name].mean(1))}
            if name != "causal":
                e = self.estimate("causal", name)
                row["causal minus this, after (95% interval)"] = f"{e.mean:+.4f} [{e.lo:+.4f}, {e.hi:+.4f}]"
            else:
                row["causal minus this, after (95% interval)"] = ""
            rows[name] = row
        df = pd.DataFrame(rows).T
        df.index.name = f"ranking ({self.fraction:.0%} of every inner conv removed)"
        return df

    def styled(self):
        return self.table().style.format({"before fine-tuning": "{:.4f}", "after fine-tuning": "{:.4f}"})

    def outcome_table(self):
        return self.outcomes.style.format(lambda v: f"{v:.4f}" if isinstance(v, float) else v)

    def cost_table(self):
        t = self.seconds.copy()
        t.loc["mean"] = t.mean()
        return t.style.format("{:.2f}")

    def figure(self):
        fig = new_figure(8.5, 3.4)
        axes = fig.subplots(1, 2, sharey=True)
        names = list(self.pre)
        for ax, (title, d) in zip(axes, (("straight after pruning", self.pre), ("after fine-tuning", self.post))):
            for i, name in enumerate(names):
                per_seed = d[name].mean(1)
                ax.plot(np.full(len(per_seed), i) + np.linspace(-0.12, 0.12, len(per_seed)), per_seed, "o",
                        markersize=4, color="tab:gray")
                ax.plot([i - 0.25, i + 0.25], [per_seed.mean()] * 2, color="black", linewidth=1.5)
            ax.axhline(self.unpruned, color="tab:green", linestyle="--", linewidth=0.8, label="unpruned")
            ax.set_xticks(range(len(names)), names)
            ax.set(title=title, xlabel="ranking")
            ax.grid(alpha=0.3, axis="y")
        axes[0].set_ylabel("test accuracy (fraction correct)")
        axes[0].legend(fontsize="small")
        return fig

    def numbers(self) -> dict:
        out = {"cmp_fraction": self.fraction, "cmp_n_test": self.n_test, "cmp_unpruned": self.unpruned,
               "chosen_outcomes": ", ".join(self.outcomes["chosen"]),
               "cmp_seconds_causal": float(self.seconds["causal"].mean()),
               "cmp_seconds_taylor": float(self.seconds["Taylor"].mean()),
               "cmp_gaps_taylor": self.seed_gaps("causal", "Taylor"), "cmp_gaps_l1": self.seed_gaps("causal", "L1")}
        for name in self.pre:
            out[f"cmp_pre_{name}"] = float(self.pre[name].mean())
            out[f"cmp_post_{name}"] = float(self.post[name].mean())
        return out


def _split(x, y, name):
    from .data import Split

    return Split(x, y, tuple(str(i) for i in range(int(y.max()) + 1)), name)


def compare(study: Study, progress: bool = True) -> Comparison:
    """Claim 1's experiment on ResNet-20. Per seed: rank the inner filters of every chosen block on that
    seed's ranking images by the interventional effect (every outcome from one pass), the SCM, Taylor, L1
    and a random order; choose the outcome whose ranking prunes best on held-out training images (no test
    image is seen); remove ``resnet_fraction`` of every inner conv by each ranking; score on the shared test
    images; fine-tune every pruned network the same way (same images, steps and seed) and score again."""
    P, net = study.P, study.resnet.model
    train, test = study.resnet.train, study.resnet_test
    ex = test.x[:1]
    groups = criteria.coupled_groups(net, ex, roots=[f"{b}.conv1" for b in P.resnet_blocks])
    pre = {c: [] for c in CRITERIA}
    post = {c: [] for c in CRITERIA}
    rows, secs = [], []
    n1, n2, n3 = P.resnet_images, P.resnet_val_images, P.resnet_finetune_images
    for s in bar(P.seeds, desc="seeds", disable=not progress, leave=False):
        perm = torch.from_numpy(np.random.default_rng(s).permutation(len(train)))
        r_idx, v_idx, f_idx = perm[:n1], perm[n1:n1 + n2], perm[n1 + n2:n1 + n2 + n3]
        data = criteria.Data(train.x[r_idx], train.y[r_idx])
        t0 = _cpu()
        eff = {g.name: group_effects(net, g, data.x, data.y) for g in groups}
        t_causal = _cpu() - t0
        t0 = _cpu()
        tay = {g.name: criteria.score("taylor", net, g.target, data) for g in groups}
        t_taylor = _cpu() - t0
        t0 = _cpu()
        children = {g.name: g.target.act.rpartition(".")[0] + ".bn2" for g in groups}
        norms = map_norms(net, sorted({g.target.act for g in groups} | set(children.values())), data.x)
        scm = {g.name: scm_importance(norms[g.target.act], norms[children[g.name]]) for g in groups}
        t_scm = _cpu() - t0
        scores = {"SCM": scm, "Taylor": tay, "L1": {g.name: criteria.score("l1", net, g.target) for g in groups},
                  "random": {g.name: criteria.make("random", seed=s).score_group(net, g) for g in groups}}
        nets, row = {}, {"seed": s}
        for o in P.rank_outcomes:
            plan = prune.plan_fraction(groups, {k: v[o] for k, v in eff.items()}, P.resnet_fraction)
            nets[o] = prune.remove_groups(net, plan.remove, ex)
            row[f"held-out: {o}"] = float(correct(nets[o], train.x[v_idx], train.y[v_idx]).mean())
        chosen = max(P.rank_outcomes, key=lambda o: (row[f"held-out: {o}"], -P.rank_outcomes.index(o)))
        row["chosen"] = chosen
        ft_split = _split(train.x[f_idx], train.y[f_idx], "fine-tuning")
        finetune = prune.finetuner(ft_split, P.finetune_epochs, seed=s, device=P.device, threads=P.threads,
                                   channels_last=True)
        for o in P.rank_outcomes:
            row[f"test, no fine-tuning: {o}"] = float(correct(nets[o], test.x, test.y).mean())
        for name in CRITERIA:
            if name == "causal":
                pruned = nets[chosen]
            else:
                plan = prune.plan_fraction(groups, scores[name], P.resnet_fraction)
                pruned = prune.remove_groups(net, plan.remove, ex)
            pre[name].append(correct(pruned, test.x, test.y))
            finetune(pruned)
            post[name].append(correct(pruned, test.x, test.y))
        rows.append(row)
        secs.append({"seed": s, "causal": t_causal, "Taylor": t_taylor, "SCM": t_scm, "L1": 0.0})
    unpruned = float(correct(net, test.x, test.y).mean())
    return Comparison(list(P.seeds), P.resnet_fraction, {k: np.stack(v) for k, v in pre.items()},
                      {k: np.stack(v) for k, v in post.items()}, pd.DataFrame(rows).set_index("seed"),
                      pd.DataFrame(secs).set_index("seed"), unpruned)


# --- CexCNN's setting on LeNet5 ---


@dataclass
class CexResult:
    table: pd.DataFrame

    def numbers(self) -> dict:
        from . import reference

        ref = reference.CAUSAL_PRUNING
        t = self.table["accuracy"]
        return {"cex_ours": float(t["do(0) on p(true class)"]), "cex_l1": float(t["L1"]),
                "cex_random": float(t["random"]), "cex_paper": ref["cexcnn"]["acc_no_finetune"],
                "cex_base": ref["cexcnn"]["base_acc"], "tp_base": ref["torch_pruning_resnet56"]["base_acc"],
                "tp_pruned": ref["torch_pruning_resnet56"]["pruned_acc"],
                "tp_speedup": ref["torch_pruning_resnet56"]["mac_speedup"]}


def cexcnn(study: Study) -> CexResult:
    """CexCNN's experiment in LeNet5's sizes: keep 2 of conv1's 6 filters and 7 of conv2's 16 (CexCNN kept
    7/20 and 22/50), chosen by the interventional drop of the true-class probability, by L1, or at random
    (mean over the seeds); both layers at once, no fine-tuning."""
    from . import reference

    P, net = study.P, study.lenet.model
    ex = study.lenet.test.x[:1]
    groups = criteria.coupled_groups(net, ex, roots=["convnet.c1", "convnet.c3"])
    data = criteria.Data(study.lenet_rank.x, study.lenet_rank.y)
    keep = {"convnet.c1": 2, "convnet.c3": 7}
    frac = {g.name: (g.size - keep[g.name]) / g.size for g in groups}
    orders = {"do(0) on p(true class)": {g.name: criteria.score("causal", net, g.target, data, outcome="prob")
                                         for g in groups},
              "L1": {g.name: criteria.score("l1", net, g.target) for g in groups}}
    rows = {}
    for name, sc in orders.items():
        net_p = prune.remove_groups(net, prune.plan_fraction(groups, sc, frac).remove, ex)
        rows[name] = float(correct(net_p, study.lenet.test.x, study.lenet.test.y).mean())
    accs = []
    for s in P.seeds:
        sc = {g.name: criteria.make("random", seed=s).score_group(net, g) for g in groups}
        net_p = prune.remove_groups(net, prune.plan_fraction(groups, sc, frac).remove, ex)
        accs.append(float(correct(net_p, study.lenet.test.x, study.lenet.test.y).mean()))
    rows["random"] = float(np.mean(accs))
    cex = reference.CAUSAL_PRUNING["cexcnn"]
    df = pd.DataFrame({"accuracy": rows, "unpruned": study.lenet.accuracy})
    df.loc["CexCNN (its paper; 7/20 and 22/50 kept)"] = [cex["acc_no_finetune"], cex["base_acc"]]
    return CexResult(df)


# --- claim 5: does light pruning regularise? ---


@dataclass
class Regularisation:
    """LeNet5 lightly pruned (every layer, L1) and fine-tuned, against the unpruned LeNet5 fine-tuned the
    same way (same images, steps and seed), per seed, per test image."""

    pruned: np.ndarray
    unpruned: np.ndarray
    fraction: float
    base: float

    def estimate(self):
        from .claims import Estimate

        # seeds (fine-tuning images and order) and test images crossed: one seed leaves the image term only
        return Estimate.paired_crossed(np.atleast_2d(self.pruned), np.atleast_2d(self.unpruned))

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"test accuracy": {
            "unpruned, not fine-tuned": self.base, "unpruned, fine-tuned": float(self.unpruned.mean()),
            f"{self.fraction:.0%} of every layer removed (L1), fine-tuned": float(self.pruned.mean())}})

    def numbers(self) -> dict:
        e = self.estimate()
        return {"reg_fraction": self.fraction, "reg_pruned": float(self.pruned.mean()),
                "reg_unpruned": float(self.unpruned.mean()), "reg_diff": e.mean, "reg_lo": e.lo, "reg_hi": e.hi}


def regularisation(study: Study) -> Regularisation:
    """Remove ``light_fraction`` of every LeNet5 layer (all coupled groups, by L1), fine-tune it and the
    unpruned network on the same images with the same seed, per seed; score both on the test images."""
    P, net = study.P, study.lenet.model
    test = study.lenet.test
    ex = test.x[:1]
    groups = criteria.coupled_groups(net, ex)
    plan = prune.plan_fraction(groups, {g.name: criteria.score("l1", net, g.target) for g in groups},
                               P.light_fraction)
    small = prune.remove_groups(net, plan.remove, ex)
    pruned, unpruned = [], []
    for s in P.seeds:
        ft = prune.finetuner(study.lenet.train.subset(P.lenet_finetune_images, s), P.finetune_epochs, seed=s,
                             device=P.device, threads=LENET_FT_THREADS)
        a, b = copy.deepcopy(small), copy.deepcopy(net)
        ft(a)
        ft(b)
        pruned.append(correct(a, test.x, test.y))
        unpruned.append(correct(b, test.x, test.y))
    return Regularisation(np.stack(pruned), np.stack(unpruned), P.light_fraction, study.lenet.accuracy)


# --- what pruning buys on a CPU ---


@dataclass
class LatencyStudy:
    """Measured CPU cost of ResNet-20 pruned in several ways (:func:`latency.cost_table`), the same networks
    without BatchNorm folding and channels_last, and the convolution block scan."""

    costs: object
    plain: object
    scan: pd.DataFrame
    final: str
    block: int | None
    threads: int

    def table(self):
        t = self.costs.table.copy()
        for b in (1, 64):
            t[f"without folding / channels_last: latency drop / MAC drop b{b}"] = \
                self.plain.table[f"latency drop / MAC drop b{b}"].reindex(t.index)
        fmt = {"params": "{:,.0f}", "MACs": "{:,.0f}", "latency b1 (ms)": "{:.3f}", "latency b64 (ms)": "{:.2f}"}
        return t.style.format({**fmt, **{c: "{:.3f}" for c in t.columns if c not in fmt}}, na_rep="")

    def ratio(self, batch: int):
        """Latency drop / MAC drop of the final network at ``batch`` (median over rounds, bootstrap)."""
        return self.costs.ratio(self.final, batch)

    def reduction(self, batch: int):
        from .claims import Estimate

        ref = self.costs.table.index[0]
        r = self.costs.timings[batch].reduction(self.final, ref)
        e = self.costs.timings[batch].reduction_estimate(self.final, ref)
        return Estimate(e.mean, e.lo, e.hi, len(r), e.method)

    def figure(self):
        fig = new_figure(10, 3.6)
        ax1, ax2 = fig.subplots(1, 2)
        s = self.scan
        ax1.plot(s.index, s["ms"], "o-", color="tab:gray", markersize=3, label="any width")
        if self.block:
            on = s[s.index % self.block == 0]
            ax1.plot(on.index, on["ms"], "o", color="tab:red", label=f"multiples of {self.block}")
        ax1.set(xlabel="output channels of the convolution", ylabel="CPU time per batch of 64 (ms)",
                title=f"one 3x3 convolution, {self.scan.attrs.get('what', '')}")
        ax1.legend(fontsize="small")
        ax1.grid(alpha=0.3)
        t = self.costs.table.iloc[1:]
        ref = self.costs.table.index[0]
        for b, marker in ((64, "o"), (1, "s")):
            est = [self.costs.timings[b].reduction_estimate(n, ref) for n in t.index]
            y = t[f"latency reduction b{b}"].to_numpy()
            ax2.errorbar(t["MAC reduction"], y, yerr=[y - [e.lo for e in est], [e.hi for e in est] - y],
                         fmt=marker, markersize=4, capsize=2, label=f"batch {b} (95% interval over rounds)")
        for name, row in t.iterrows():
            ax2.annotate(_short(name), (row["MAC reduction"], row["latency reduction b64"]),
                         fontsize=7, xytext=(3, -9), textcoords="offset points")
        ax2.plot([0, 1], [0, 1], "k--", linewidth=0.7, label="latency follows MACs")
        ax2.plot([0, 1], [0, 0.8], ":", color="tab:red", linewidth=0.9, label="0.8 x the MAC reduction")
        ax2.set(xlabel="MAC reduction (share of the unpruned MACs)",
                ylabel="latency reduction (share, median)", xlim=(0, 1))
        ax2.legend(fontsize="small")
        ax2.grid(alpha=0.3)
        return fig

    def numbers(self) -> dict:
        t = self.costs.table
        f = t.loc[self.final]
        ms = self.scan["ms"]
        out = {"lat_final": self.final, "lat_mac_red": float(f["MAC reduction"]),
               "lat_b64_red": float(f["latency reduction b64"]), "lat_b1_red": float(f["latency reduction b1"]),
               "lat_ratio_b64": float(f["latency drop / MAC drop b64"]),
               "lat_ratio_b1": float(f["latency drop / MAC drop b1"]),
               "lat_plain_ratio_b64": float(self.plain.table.loc[self.final, "latency drop / MAC drop b64"]),
               "lat_block": self.block if self.block else "none", "lat_threads": self.threads,
               "lat_repeats": len(next(iter(self.costs.timings[64].seconds.values()))),
               "lat_cpu": torch.backends.cpu.get_cpu_capability(), "scan_what": self.scan.attrs.get("what", ""),
               **{f"scan_{w}": float(ms.get(w, math.nan)) for w in (12, 16, 20, 24)}}
        inner = [i for i in t.index if i.startswith("inner")]
        if inner:
            out |= {"lat_inner_mac": float(t.loc[inner[0], "MAC reduction"]),
                    "lat_inner_ratio": float(t.loc[inner[0], "latency drop / MAC drop b64"])}
        return out


def _short(label: str) -> str:
    """A figure label for a latency network: '4x', '4x, block 8', 'inner'."""
    if label.startswith("inner"):
        return "inner convs"
    parts = label.split(", ")
    return parts[1].split(" ")[0] + (f", block {parts[2].rsplit(' ', 1)[-1]}" if len(parts) > 2 else "")


def latency_study(study: Study) -> LatencyStudy:
    """Whole-network pruning of ResNet-20 (every coupled group, the residual stream included, the same share
    in every group, filters by L1: which filters go does not change the cost) at each ``latency_macs_kept``,
    without and with widths rounded to ``latency_block``; beside it, the inner convs alone at the share
    that the smallest target removes from every group. Each is timed BatchNorm-folded and channels_last,
    on one thread's CPU clock (:func:`latency.time_forward`), at batch 1 and 64; the final (most pruned,
    rounded) network and the unpruned one also plain, to show what folding and the layout add."""
    from . import baselines, latency

    P, net = study.P, study.resnet.model
    shape = baselines.input_shape(study.resnet.recipe)
    ex = torch.zeros(1, *shape)
    groups = criteria.coupled_groups(net, ex)
    scores = {g.name: criteria.score_group("l1", net, g) for g in groups}
    mm = prune.MacModel(net, groups, ex)
    nets, final = {"unpruned": net}, None
    smallest = min(P.latency_macs_kept)
    inner = [g for g in groups if g.name.endswith(".conv1") and g.name.startswith("layer")]
    for kept in sorted(P.latency_macs_kept, reverse=True):
        for block in ([None, P.latency_block] if P.latency_block else [None]):
            plan = prune.plan_macs(net, groups, scores, ex, kept, "uniform", block, mac_model=mm)
            label = f"whole network, {1 / kept:.0f}x fewer MACs" + (f", widths multiples of {block}" if block else "")
            nets[label] = prune.remove_groups(net, plan.remove, ex)
            if kept == smallest:
                final = label
                if block is None and inner:
                    share = plan.fraction
                    ip = prune.plan_fraction(inner, {g.name: scores[g.name] for g in inner}, share)
                    nets[f"inner convs only, {share:.0%} of their filters"] = prune.remove_groups(net, ip.remove, ex)
    costs = latency.cost_table(nets, shape, (1, 64), P.latency_repeats, threads=1, seed=P.seed)
    plain = latency.cost_table({k: nets[k] for k in ("unpruned", final)}, shape, (1, 64), P.latency_repeats,
                               threads=1, seed=P.seed, fold_bn=False, channels_last=False)
    side = shape[1] // 2
    scan = latency.block_scan(2 * study.resnet.model.conv1.out_channels, list(range(4, 65, 4)), side,
                              repeats=max(3, P.latency_repeats // 2), seed=P.seed)
    scan.attrs["what"] = f"{2 * net.conv1.out_channels} input channels, {side}x{side} maps"
    return LatencyStudy(costs, plain, scan, final, P.latency_block, 1)


# --- beyond the paper: do single effects add up, and is Taylor their linearisation? ---


@dataclass
class Additivity:
    layer: str
    ks: np.ndarray
    joint: np.ndarray
    summed: np.ndarray
    measured: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]

    def figure(self):
        fig = new_figure(9.5, 3.4)
        ax1, ax2 = fig.subplots(1, 2)
        ax1.plot(self.ks, self.joint, "o-", markersize=3, label="measured, filters removed together")
        ax1.plot(self.ks, self.summed, "s--", markersize=3, label="sum of single-filter effects")
        ax1.set(xlabel="k least important filters removed", ylabel="rise of the loss (nats per image)",
                title=f"{self.layer}: joint against summed effects")
        ax1.legend(fontsize="small")
        ax1.grid(alpha=0.3)
        for layer in self.measured:
            ax2.plot(self.measured[layer], self.predicted[layer], "o", markersize=3, label=layer)
        lim = [min(ax2.get_xlim()[0], ax2.get_ylim()[0]), max(ax2.get_xlim()[1], ax2.get_ylim()[1])]
        ax2.plot(lim, lim, "k--", linewidth=0.7, label="y = x")
        ax2.set(xlabel="measured effect of do(0) on the loss (nats)", ylabel="Taylor first-order estimate (nats)",
                title="Taylor against the intervention")
        ax2.legend(fontsize="small")
        ax2.grid(alpha=0.3)
        return fig

    def numbers(self) -> dict:
        from scipy.stats import spearmanr

        half = len(self.ks) // 2
        m = np.concatenate(list(self.measured.values()))
        p = np.concatenate(list(self.predicted.values()))
        return {"add_layer": self.layer, "add_k": int(self.ks[half]), "add_joint": float(self.joint[half]),
                "add_sum": float(self.summed[half]),
                "tay_rho": ", ".join(f"{l} {spearmanr(self.predicted[l], self.measured[l])[0]:.2f}"
                                     for l in self.measured),
                "tay_scale": float(np.abs(m).sum() / max(np.abs(p).sum(), 1e-12))}


def additivity(study: Study, eff: LeNetEffects) -> Additivity:
    """Remove the k least important filters of one LeNet5 layer together (every k) and compare the measured
    rise of the loss with the sum of their single effects; and Taylor's signed first-order estimate of
    do(a_j := 0) on the loss against the measured effect, per layer."""
    from .models import LENET5_LAYERS

    net, x, y = study.lenet.model, study.lenet_rank.x, study.lenet_rank.y
    layer = study.P.dowhy_layer if study.P.dowhy_layer in eff.layers else eff.layers[0]
    single = eff.series(layer, "zero")[0]
    order = criteria.ranking(single)
    sets = [list(order[:k]) for k in range(1, len(order))]
    base = baseline_outcomes(net, x, y)["loss"].mean().item()
    joint = outcomes_under(net, LENET5_LAYERS[layer][1], x, y, sets)["loss"].mean(0).numpy() - base
    tay = taylor(net, [LENET5_LAYERS[l][1] for l in eff.layers], x, y)
    return Additivity(f"{layer} ({LENET5_LAYERS[layer][1]})", np.arange(1, len(order)), joint,
                      np.cumsum(single[order])[:-1],
                      {l: eff.series(l, "zero")[0] for l in eff.layers},
                      {l: tay[LENET5_LAYERS[l][1]][1] for l in eff.layers})


# --- the claims ---


def decide_claims(study: Study, dw: DoWhyResult, cmp: Comparison, lat: LatencyStudy, reg: Regularisation) -> list:
    """Every claim of chapter 5 decided by its declared rule (:mod:`pruning_utils.claims`)."""
    from . import claims
    from .claims import Estimate

    P = study.P
    n_note = (f"{len(cmp.seeds)} seed(s): each seed draws its ranking images, held-out images and fine-tuning "
              f"images and seeds the fine-tuning and the random ranking; one ResNet-20 (chapter 0's seed "
              f"{P.seed}), so retraining variance is not covered; {cmp.n_test} test images, paired")
    if cmp.n_test < 2000:
        n_note += " (fewer than the 2,000 the comparison asks for: a smoke-size run)"
    chosen = ", ".join(cmp.outcomes["chosen"])
    gaps = "; ".join(f"{c} {cmp.seed_gaps('causal', c)}" for c in CHEAP)
    res = [claims.decide("causal-1", {c: cmp.estimate("causal", c) for c in CHEAP},
                         f"outcome chosen on held-out images per seed: {chosen}; per seed, causal minus {gaps}; "
                         f"{n_note}", fmt=".4f"),
           claims.decide("causal-1-noft", {c: cmp.estimate("causal", c, after=False) for c in CHEAP},
                         "the same networks before their fine-tuning", fmt=".4f"),
           claims.decide("causal-1-null", cmp.estimate("causal", "random"), n_note, fmt=".4f"),
           claims.decide("causal-2", cmp.estimate("SCM", "L1"), n_note, fmt=".4f"),
           claims.decide("causal-3", dw.estimate("parents"),
                         f"layer {dw.layer}, {len(dw.refuted)} filters; observational data cannot show a filter "
                         "switched off (positivity), the loss is not linear in a norm")]
    ref_est = dw.refuter_estimate()
    res.append(claims.decide("causal-3-refuters", ref_est,
                             f"{int(dw.refuted['passes all refuters'].sum())} of {len(dw.refuted)} estimates pass; "
                             "negative control (a confounder left out, true effect 1): estimate "
                             f"{dw.control.iloc[0]['estimate']:.2f}, passes "
                             f"{int(sum(dw.control.iloc[0][f'{r} p'] > 0.05 for r in REFUTERS))} of 3 refuters"
                             if ref_est is not None else "no estimate passed the refuters"))
    lat_note = (f"{lat.final}; BatchNorm folded, channels_last, one thread's CPU time, median of "
                f"{len(next(iter(lat.costs.timings[64].seconds.values())))} paired rounds; one machine")
    res += [claims.decide("causal-4a", lat.reduction(64), lat_note),
            claims.decide("causal-4b", lat.ratio(64), lat_note),
            claims.decide("causal-4c", lat.ratio(1), lat_note + "; per-layer overhead does not shrink with MACs"),
            claims.decide("causal-5", reg.estimate(),
                          f"LeNet5, {reg.pruned.shape[0]} fine-tuning seed(s), {reg.pruned.shape[1]} test images; "
                          "both networks get the same fine-tuning, so the comparison isolates the pruning", fmt=".4f"),
            claims.decide("causal-6", Estimate.over_seeds(cmp.seconds["causal"] / cmp.seconds["Taylor"].clip(lower=1e-9)),
                          "CPU seconds to score ResNet-20's inner filters, per seed", fmt=".1f")]
    return res


def key_numbers(study: Study, dw: DoWhyResult, cmp: Comparison, cex: CexResult, reg: Regularisation) -> dict:
    """The chapter's key numbers, rounded to be stable (nbval compares them on every test run); no timings."""
    return {"lenet5_acc": round(study.lenet.accuracy, 3), "resnet20_acc": round(study.resnet.accuracy, 3),
            "chosen_outcomes": list(cmp.outcomes["chosen"]),
            "resnet_after_ft": {k: round(float(v.mean()), 3) for k, v in cmp.post.items()},
            "resnet_before_ft": {k: round(float(v.mean()), 3) for k, v in cmp.pre.items()},
            "dowhy_rho": {a: round(float(v), 3) for a, v in dw.table()["Spearman with the interventional effect"].items()},
            "cexcnn_like": round(float(cex.table.loc["do(0) on p(true class)", "accuracy"]), 3),
            "regularisation": round(reg.numbers()["reg_diff"], 3)}
