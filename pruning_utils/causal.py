"""Causal filter importance and pruning (chapter 5, paper 004, a proposal).

- interventional importance: the average causal effect of do(a_j := 0) or do(a_j := E[a_j]) on a filter's
  map a_j, on the loss, the accuracy and the true-class probability, with a bootstrap interval; a chunk of
  interventions rides in one forward pass (the batch is repeated once per intervention, then masked);
- a structural causal model over filters after Narendra et al. (2018): per image, each filter's map norm;
  each child filter regressed on the previous layer's filters; parent importance = sum of |coefficients|;
- observational estimates of a filter's effect with DoWhy's back-door adjustment, and its refuters;
- the first-order Taylor criterion (Molchanov et al. 2017), the linearisation of do(a_j := 0) on the loss;
- pruning by a plan (several layers at once), masked or physically removed, and measured CPU latency.
"""
from __future__ import annotations

import copy
import logging
import statistics
import time
import warnings
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from . import activations, prune
from .params import ParameterError, check_choice
from .plots import label_grid, panel_grid
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
def outcomes_under(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor,
                   sets: Sequence[Sequence[int]], fill: torch.Tensor | None = None,
                   repeat_at: str | None = None, batch_size: int = 64, max_batch: int = 1024,
                   progress: bool = False) -> dict[str, torch.Tensor]:
    """Per-image outcomes (N, K) under do(a_S := fill_S) for each set S of filters of ``layer`` (fill None:
    zero). The batch is repeated once per set at ``repeat_at`` (default :func:`repeat_point`) and each copy
    masked at ``layer``, so a chunk of interventions costs one forward pass of the layers after the repeat."""
    model.eval()
    target = prune.module(model, layer)
    entry = model if repeat_at == "" else prune.module(model, repeat_at or repeat_point(model, layer))
    sets = [sorted({int(j) for j in s}) for s in sets]
    chunk = max(1, max_batch // batch_size)
    state: dict = {}

    def repeat(_m, args):
        return (args[0].repeat(state["k"], *[1] * (args[0].ndim - 1)), *args[1:])

    def mask(_m, _inp, out):
        k, c = state["k"], out.shape[1]
        if any(j >= c for s in state["sets"] for j in s):
            raise ParameterError(f"sets name filter indices >= {c}, the number of channels of layer {layer!r}")
        m = torch.zeros(k, c, dtype=torch.bool)
        for i, s in enumerate(state["sets"]):
            m[i, s] = True
        o = out.view(k, -1, *out.shape[1:])
        m = m.view(k, 1, c, *[1] * (out.ndim - 2))
        value = torch.zeros((), dtype=out.dtype) if fill is None else fill.to(out.dtype)
        return torch.where(m, value, o).reshape(out.shape)

    parts: dict[str, list[torch.Tensor]] = {o: [] for o in OUTCOMES}
    handles = [entry.register_forward_pre_hook(repeat), target.register_forward_hook(mask)]
    try:
        for i in bar(range(0, len(x), batch_size), desc=f"do() at {layer}", disable=not progress, leave=False):
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


def ranking(scores: np.ndarray) -> np.ndarray:
    """Filter indices from least to most important (ties keep index order): the pruning order."""
    return np.argsort(np.asarray(scores), kind="stable")


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


def backdoor_estimate(frame: pd.DataFrame, treatment: str, outcome: str, common_causes: Sequence[str],
                      refuters: Sequence[str] = (), simulations: int = 10, seed: int = 0,
                      level: float = 0.95) -> dict:
    """DoWhy's back-door linear-regression estimate of the effect of ``treatment`` on ``outcome`` given the
    graph W -> T, W -> Y, T -> Y (W: ``common_causes``), its interval, and each refuter's new effect and p."""
    import networkx as nx
    from dowhy import CausalModel

    for r in refuters:
        check_choice("refuter", r, REFUTERS)
    edges = [(w, treatment) for w in common_causes] + [(w, outcome) for w in common_causes] + [(treatment, outcome)]
    with warnings.catch_warnings():
        # dowhy 0.14 passes copy= to pandas, which pandas >= 3 deprecates; harmless here
        warnings.filterwarnings("ignore", message="The copy keyword is deprecated")
        logging.getLogger("dowhy").setLevel(logging.WARNING)
        model = CausalModel(data=frame[[*common_causes, treatment, outcome]], treatment=treatment,
                            outcome=outcome, graph=nx.DiGraph(edges))
        estimand = model.identify_effect(proceed_when_unidentifiable=True, method_name="maximal-adjustment")
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
        rows.append({"filter": j, "adjustment": a, "slope": slope, "slope lo": lo, "slope hi": hi,
                     "implied effect": -slope * m, "implied lo": -hi * m, "implied hi": -lo * m, **est})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Pruning several layers by a plan, and what it costs on a CPU


def plan(rankings: Mapping[str, Sequence[int]], fraction: float, sizes: Mapping[str, int]) -> dict[str, list[int]]:
    """The filters to prune in each layer: the first round(fraction * n) of its ranking (at most n - 1)."""
    if not 0 <= fraction < 1:
        raise ParameterError(f"fraction={fraction!r} is not allowed; expected 0 <= fraction < 1")
    out = {}
    for layer, order in rankings.items():
        out[layer] = [int(i) for i in list(order)[:prune.n_removed(fraction, sizes[layer])]]
    return out


def masked(model: nn.Module, plan_: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose named activation layers output zero in the planned channels (masks)."""
    model = copy.deepcopy(model).eval()
    for layer, idxs in plan_.items():
        if idxs:
            model = prune.zero_channels(model, layer, idxs)
    return model


def removed(model: nn.Module, plan_: Mapping[str, Sequence[int]], conv_of: Mapping[str, str],
            example: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the planned filters physically removed from the conv layer ``conv_of[layer]``
    of each activation layer (torch-pruning; coupled BatchNorms and next-layer inputs shrink with them)."""
    model = copy.deepcopy(model).eval()
    for layer, idxs in plan_.items():
        if idxs:
            model = prune.remove_channels(model, conv_of[layer], idxs, example)
    return model


def network_sweep(model: nn.Module, rankings: Mapping[str, Mapping[str, Sequence[int]]], sizes: Mapping[str, int],
                  fractions: Sequence[float], evaluate: Callable[[nn.Module], float],
                  finetune: Callable[[nn.Module], object] | None = None, progress: bool = True) -> list[dict]:
    """Prune the same fraction of every planned layer by each method's rankings (masks, which give the same
    outputs and the same fine-tuning as removal), evaluate, and with ``finetune`` fine-tune and evaluate."""
    rows = []
    jobs = [(name, f) for name in rankings for f in fractions]
    for name, f in bar(jobs, desc="pruning the network", disable=not progress, leave=False):
        p = plan(rankings[name], f, sizes)
        net = masked(model, p)
        removed_n = sum(len(v) for v in p.values())
        row = {"ranking": name, "target": f, "fraction": removed_n / sum(sizes[k] for k in p),
               "removed": removed_n, "accuracy": evaluate(net)}
        if finetune is not None:
            finetune(net)
            row["accuracy_finetuned"] = evaluate(net)
        rows.append(row)
    return rows


def latencies_ms(nets: Mapping[str, nn.Module], x: torch.Tensor, repeats: int = 20, warmup: int = 3,
                 threads: int = 1) -> dict[str, float]:
    """Median wall-clock milliseconds of one forward pass on ``x`` of each network (CPU, eval mode, no grad,
    ``threads`` intra-op threads, after ``warmup`` untimed passes each). The networks take turns, pass by pass,
    so that a change of machine load while timing hits all of them alike."""
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ParameterError(f"repeats={repeats}, warmup={warmup}, threads={threads} are not allowed; "
                             "expected repeats >= 1, warmup >= 0, threads >= 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    nets = {name: net.eval().cpu() for name, net in nets.items()}
    times: dict[str, list[float]] = {name: [] for name in nets}
    try:
        with torch.inference_mode():
            for net in nets.values():
                for _ in range(warmup):
                    net(x)
            for _ in range(repeats):
                for name, net in nets.items():
                    start = time.perf_counter()
                    net(x)
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def cost_table(nets: Mapping[str, nn.Module], input_shape: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
               repeats: int = 20, warmup: int = 3, threads: int = 1, seed: int = 0) -> pd.DataFrame:
    """Parameters, MACs per image and median CPU latency at each batch size of each network; the reductions
    are relative to the first network (the unpruned one)."""
    gen = torch.Generator().manual_seed(seed)
    xs = {b: torch.rand(b, *input_shape, generator=gen) for b in batch_sizes}
    rows = []
    for label, net in nets.items():
        macs, params = prune.macs_and_params(net, xs[batch_sizes[0]][:1])
        rows.append({"network": label, "params": params, "MACs": macs})
    df = pd.DataFrame(rows).set_index("network")
    for b in batch_sizes:
        df[f"latency b{b} (ms)"] = pd.Series(latencies_ms(nets, xs[b], repeats, warmup, threads))
    df["MAC reduction"] = 1 - df["MACs"] / df["MACs"].iloc[0]
    for b in batch_sizes:
        col = f"latency b{b} (ms)"
        df[f"latency reduction b{b}"] = 1 - df[col] / df[col].iloc[0]
    return df


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
