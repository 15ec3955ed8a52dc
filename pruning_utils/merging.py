"""Neuron merging (Kim et al. 2020, paper 003's subject; chapter 4): prune a layer's neurons and fold a
scaled copy of each pruned one into the next layer, so that the next layer's input is preserved.

The decomposition W_i ≈ Y_i Z_i keeps P of the N neurons of layer i (Y_i, chosen by ℓ1, ℓ2 or ℓ2-GM);
Z_i (N x P) has a 1 for every kept neuron and, for a pruned neuron, one positive entry: the scale of the
most similar kept neuron. Because ReLU and LeakyReLU are positively homogeneous, f(s·y) = s·f(y) for
s > 0, so the next layer can take Z_i in: W_{i+1} becomes Z_i W_{i+1} (Theorem 1).

- :func:`scaling_matrix` is Algorithm 2 (fully connected, bias appended) and :func:`scaling_matrix_bn`
  Algorithm 3 (a layer followed by BatchNorm), both vectorised: no Python loop over neuron pairs.
- :func:`find_chains` finds the merge-able ``layer -> [BatchNorm] -> ReLU/LeakyReLU -> layer`` chains of a
  model with torch.fx, so that no architecture is hard-coded (the report's proposal, its section 4.1).
- :func:`merge` plans every chain from the original weights, as the reference code does, then applies.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from . import baselines, models
from .params import ParameterError, check_choice
from .train import Recipe, TrainConfig

CRITERIA = ("l1", "l2", "l2-GM")
METHODS = ("merge", "prune")
BN_SCALES = ("reference", "exact")
S_RATIOS = ("pruned/kept", "kept/pruned")
ON_PROBLEM = ("raise", "skip")
LAYERS = (nn.Linear, nn.Conv2d)
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# Per-channel maps that commute with a positive scale: pool(s·y) = s·pool(y), flatten, dropout (eval).
_PASS_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
                 nn.Identity, nn.Flatten)
_PASS_CALLS = {"flatten", "view", "reshape", "contiguous", "max_pool2d", "_max_pool2d", "avg_pool2d",
               "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "boolean_dispatch"}
_ACT_CALLS = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
_SHAPE_CALLS = {"size", "dim"}
_JOINS = {operator.add, operator.mul, operator.iadd, torch.add, torch.cat, torch.stack, torch.mul}

# The reference's pruned VGG-16 on CIFAR-10 (its main.py): 32, 64, 128, 128, 256 x 3, then 256 x 6.
VGG16_CIFAR10_KEEP = (32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256)


class MergeError(ParameterError):
    """A model, or a part of it, that neuron merging cannot handle (a branch, an activation, a layer)."""


@dataclass(frozen=True)
class Chain:
    """One merge-able chain: ``layer`` (Linear/Conv2d, pruned) -> ``bn`` (optional BatchNorm) -> ``act``
    (ReLU/LeakyReLU) -> ``next`` (Linear/Conv2d, takes Z_i in). Names are ``model.named_modules()`` names."""

    layer: str
    next: str
    bn: str | None = None
    act: str | None = None


# ----------------------------------------------------------------------------------------------------
# Algorithms 1-3 on tensors
# ----------------------------------------------------------------------------------------------------

def n_kept(n: int, ratio: float) -> int:
    """P_{i+1}, the neurons kept of ``n`` at pruning ``ratio``: round(n (1 - ratio)), at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ParameterError(f"ratio={ratio!r} is not allowed; expected a float in [0, 1)")
    return max(1, min(n, round(n * (1.0 - ratio))))


def keep_indices(w: torch.Tensor, p: int, criterion: str = "l1") -> torch.Tensor:
    """The P kept neurons (sorted indices) of the rows ``w`` (N, d): largest ℓ1 or ℓ2 norm, or ℓ2-GM
    (largest summed distance to the others, i.e. farthest from the geometric median; He et al. 2019)."""
    check_choice("criterion", criterion, CRITERIA)
    w = w.double()
    if criterion == "l1":
        score = w.abs().sum(1)
    elif criterion == "l2":
        score = w.norm(dim=1)
    else:
        score = torch.cdist(w, w).sum(0)
    return score.topk(p).indices.sort().values


def _cosine(w: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return unit @ unit[kept].T


def _ratio(w: torch.Tensor, kept: torch.Tensor, s_ratio: str) -> torch.Tensor:
    """s of Algorithm 2 for every (pruned, kept) pair: ‖w_n‖ / ‖w_k‖ (or reversed, the report's check)."""
    check_choice("s_ratio", s_ratio, S_RATIOS)
    norm = w.norm(dim=1)
    s = norm[:, None] / norm[kept][None, :].clamp_min(1e-30)
    return s if s_ratio == "pruned/kept" else 1.0 / s.clamp_min(1e-30)


def _assemble(n: int, kept: torch.Tensor, best: torch.Tensor, scale: torch.Tensor,
              merged: torch.Tensor) -> torch.Tensor:
    """Z_i (N x P): identity on the kept rows, ``scale`` at (n, best[n]) for the merged pruned rows."""
    z = torch.zeros(n, len(kept), dtype=torch.float64)
    rows = torch.arange(n)[merged]
    z[rows, best[merged]] = scale[merged]
    z[kept, torch.arange(len(kept))] = 1.0
    return z


def scaling_matrix(w: torch.Tensor, kept: torch.Tensor, threshold: float | None = None,
                   s_ratio: str = "pruned/kept") -> tuple[torch.Tensor, torch.Tensor]:
    """Z_i of Algorithm 2: each pruned row of ``w`` (N, d; bias appended) goes to the kept row of highest
    cosine similarity, scaled by s = ‖w_n‖/‖w_k‖; below ``threshold`` (None: never) it is dropped.
    Returns Z (N x P, float64) and the best similarity of every row (1 for kept rows)."""
    w = w.double()
    cos = _cosine(w, kept)
    sim, best = cos.max(1)
    scale = _ratio(w, kept, s_ratio).gather(1, best[:, None])[:, 0]
    merged = _pruned_mask(len(w), kept) & _above(sim, threshold)
    sim[kept] = 1.0
    return _assemble(len(w), kept, best, scale, merged), sim


def _pruned_mask(n: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return mask


def _above(sim: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return torch.ones_like(sim, dtype=torch.bool) if threshold is None else sim >= threshold


def scaling_matrix_bn(w: torch.Tensor, kept: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5, threshold: float | None = None,
                      lam: float = 0.85, bn_scale: str = "reference",
                      s_ratio: str = "pruned/kept") -> tuple[torch.Tensor, torch.Tensor]:
    """Z_i of Algorithm 3, a layer followed by BatchNorm (γ, β, running mean μ and variance v).

    The score of a (pruned n, kept k) pair is λ·(cosine distance) + (1-λ)·(BN offset, min-max normalised
    over k); the lowest score wins and the threshold applies to its cosine similarity.

    ``bn_scale="reference"`` is the reference code's formula: scale s·(γ_k/γ_n)(σ_n/σ_k) and offset
    |(γ_k/σ_k)(s(μ_n - σ_n β_n/γ_n) - μ_k) + β_k| / scale, with σ the running *variance* (not its root).
    ``"exact"`` uses what BN(y_n) = A·BN(y_k) + B gives when y_n = s·y_k: A = s(γ_n/γ_k)(σ_k/σ_n) with
    σ = sqrt(v + eps), offset |B| = |β_n - A β_k + γ_n (s μ_k - μ_n)/σ_n|; A ≤ 0 is never chosen.
    Returns Z (N x P, float64) and the cosine similarity of the chosen pair (1 for kept rows).
    """
    check_choice("bn_scale", bn_scale, BN_SCALES)
    if not 0.0 <= lam <= 1.0:
        raise ParameterError(f"lam={lam!r} is not allowed; expected a float in [0, 1]")
    w = w.double()
    g, b, m, v = (t.detach().double() for t in (gamma, beta, mean, var))
    cos = _cosine(w, kept)
    s = _ratio(w, kept, s_ratio)
    g1, b1, m1 = g[:, None], b[:, None], m[:, None]          # the pruned candidate n (rows)
    g2, b2, m2 = g[kept][None, :], b[kept][None, :], m[kept][None, :]  # the kept neuron k (columns)
    if bn_scale == "reference":
        v1, v2 = v[:, None], v[kept][None, :]
        scale = s * (g2 / g1) * (v1 / v2)
        offset = ((g2 / v2) * (s * (-(v1 * b1 / g1) + m1) - m2) + b2).abs() / scale
        valid = torch.ones_like(scale, dtype=torch.bool)
    else:
        sd = (v + eps).sqrt()
        sd1, sd2 = sd[:, None], sd[kept][None, :]
        scale = s * (g1 / g2) * (sd2 / sd1)
        offset = (b1 - scale * b2 + g1 * (s * m2 - m1) / sd1).abs()
        valid = scale > 0
    lo = offset.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    hi = offset.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    spread = hi - lo
    normed = torch.where(spread > 0, (offset - lo) / spread.clamp_min(1e-300), torch.zeros_like(offset))
    score = (lam * (1.0 - cos) + (1.0 - lam) * normed).masked_fill(~valid, float("inf"))
    best = score.argmin(1)
    sim = cos.gather(1, best[:, None])[:, 0]
    ok = valid.gather(1, best[:, None])[:, 0]
    merged = _pruned_mask(len(w), kept) & _above(sim, threshold) & ok
    sim[kept] = 1.0
    return _assemble(len(w), kept, best, scale.gather(1, best[:, None])[:, 0], merged), sim


def fold(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Z_i W_{i+1}: the next layer's weight (O, N·r) or (O, N, kh, kw) with its N input groups mixed by
    Z (N x P) into P; for a Linear after a flatten, r = features per channel (r = (O·N·r)/(O·N))."""
    n, p = z.shape
    w = weight.detach().double()
    if w.ndim == 4:
        out = torch.einsum("onhw,np->ophw", w, z)
    else:
        if w.shape[1] % n:
            raise MergeError(f"the next layer has {w.shape[1]} inputs, not a multiple of the {n} neurons")
        out = torch.einsum("onr,np->opr", w.reshape(w.shape[0], n, -1), z).reshape(w.shape[0], -1)
    return out.to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Chains of a model: by name, or found with torch.fx
# ----------------------------------------------------------------------------------------------------

def _module(model: nn.Module, name: str | None, kinds: tuple, what: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        raise MergeError(f"{what}={name!r} is not a module of {type(model).__name__}")
    m = modules[name]
    if not isinstance(m, kinds):
        raise MergeError(f"{what}={name!r} is a {type(m).__name__}; expected one of "
                         f"{', '.join(k.__name__ for k in kinds)}")
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise MergeError(f"{what}={name!r} is a grouped convolution (groups={m.groups}); only groups=1 merges")
    return m


def _kind(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, LAYERS):
            return "layer"
        if isinstance(m, _BATCHNORMS):
            return "bn"
        if isinstance(m, ACTIVATIONS):
            return "act"
        if isinstance(m, _PASS_MODULES):
            return "pass"
        return f"a {type(m).__name__} ({node.target})"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method"):
        if name in _ACT_CALLS:
            return "act"
        if name in _PASS_CALLS:
            return "pass"
        if node.target in _JOINS or name in ("add", "cat", "mul", "stack"):
            return f"{name} (which joins two branches)"
    return f"the operation {name}"


def _shape_only(node: torch.fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _SHAPE_CALLS)
            or (node.op == "call_function" and node.target is getattr))


def _follow(node: torch.fx.Node, modules: dict) -> tuple[Chain | None, str | None]:
    """Walk from a layer's node along single users: a Chain, (None, None) at the model's output, or a problem."""
    bn = act = None
    problem = None
    cur = node
    while True:
        users = [u for u in cur.users if not _shape_only(u)]
        if any(u.op == "output" for u in users) and len(users) == 1:
            return None, None
        if len(users) != 1:
            return None, problem or (f"branch: the output of {cur.name} feeds {len(users)} operations "
                                     f"({', '.join(u.name for u in users)})")
        u = users[0]
        kind = _kind(u, modules)
        if kind == "layer":
            if problem is None and act is None:
                problem = f"no ReLU or LeakyReLU between {node.target} and {u.target}"
            if problem is None and isinstance(modules[u.target], nn.Conv2d) and modules[u.target].groups != 1:
                problem = f"{u.target} is a grouped convolution"
            shape = tuple(cur.meta["tensor_meta"].shape)
            n = modules[node.target].weight.shape[0]
            if problem is None and isinstance(modules[u.target], nn.Linear) and (len(shape) != 2 or shape[1] % n):
                problem = f"{u.target} does not take the {n} channels flattened (its input has shape {shape})"
            return (None, problem) if problem else (Chain(node.target, u.target, bn, act), None)
        if kind == "bn" and problem is None:
            if act is not None or bn is not None:
                problem = f"BatchNorm {u.target} comes after the activation or after another BatchNorm"
            bn = u.target
        elif kind == "act" and problem is None:
            act = act or (u.target if u.op == "call_module" else u.name)
        elif kind not in ("bn", "act", "pass") and problem is None:
            problem = (f"{kind} lies between {node.target} and the next layer; merging needs a positively "
                       f"homogeneous activation (ReLU or LeakyReLU) and no branch")
        cur = u


def _trace(model: nn.Module, example_input: torch.Tensor) -> torch.fx.GraphModule:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # data-dependent control flow and the like
        raise MergeError(f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}); "
                         "name the chains by hand with merging.Chain(layer, next, bn, act)") from err
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)  # the dummy input: runs the traced graph once
    return gm


def survey(model: nn.Module, example_input: torch.Tensor) -> list[dict]:
    """Every Linear/Conv2d of ``model`` in graph order with its status: 'chain' (merge-able, with the
    chain), 'output' (feeds the model's output; nothing to merge into) or 'problem' (with the reason)."""
    gm = _trace(model, example_input)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], LAYERS)]
    calls = {}
    for node in nodes:
        calls[node.target] = calls.get(node.target, 0) + 1
    rows = []
    for node in nodes:
        chain, problem = _follow(node, modules)
        if calls[node.target] > 1:
            chain, problem = None, f"{node.target} is called more than once (shared weights)"
        if isinstance(modules[node.target], nn.Conv2d) and modules[node.target].groups != 1:
            chain, problem = None, f"{node.target} is a grouped convolution"
        status = "chain" if chain else ("problem" if problem else "output")
        rows.append({"layer": node.target, "type": type(modules[node.target]).__name__,
                     "shape": tuple(node.meta["tensor_meta"].shape[1:]), "status": status, "chain": chain,
                     "reason": problem or ""})
    return rows


def find_chains(model: nn.Module, example_input: torch.Tensor, on_problem: str = "raise") -> list[Chain]:
    """The merge-able chains layer -> [BatchNorm] -> ReLU/LeakyReLU -> [pool, flatten, dropout] -> layer of
    ``model``, found by tracing it with torch.fx and running ``example_input`` through the trace.

    With ``on_problem="raise"`` any layer that leads to another layer through a branch, an unsupported
    activation or operation raises a MergeError that names it; ``"skip"`` keeps only the branch-free
    chains (in a ResNet: conv1 -> bn1 -> relu1 -> conv2 inside each block, as the reference merges it).
    """
    check_choice("on_problem", on_problem, ON_PROBLEM)
    rows = survey(model, example_input)
    problems = [f"{r['layer']}: {r['reason']}" for r in rows if r["status"] == "problem"]
    if problems and on_problem == "raise":
        raise MergeError(f"{type(model).__name__} cannot be merged as a whole: " + "; ".join(problems)
                         + ". Pass on_problem='skip' to merge only its branch-free chains.")
    return [r["chain"] for r in rows if r["chain"] is not None]


# ----------------------------------------------------------------------------------------------------
# Planning and applying a merge
# ----------------------------------------------------------------------------------------------------

def rows_of(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """w_n of every neuron: flattened weights, with the bias appended unless a BatchNorm follows."""
    w = layer.weight.detach().flatten(1).double()
    if layer.bias is not None and bn is None:
        w = torch.cat([w, layer.bias.detach().double()[:, None]], 1)
    return w


def bn_stats(layer: nn.Module, bn: nn.Module) -> dict:
    """γ, β, μ, v, eps of ``bn``; the layer's bias c is folded into the mean (μ - c), as BN(y + c) needs."""
    mean = bn.running_mean.detach().double()
    if layer.bias is not None:
        mean = mean - layer.bias.detach().double()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": bn.running_var.detach(), "eps": bn.eps}


def _check_chain(model: nn.Module, chain: Chain) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    layer = _module(model, chain.layer, LAYERS, "layer")
    bn = None if chain.bn is None else _module(model, chain.bn, _BATCHNORMS, "bn")
    nxt = _module(model, chain.next, LAYERS, "next")
    n = layer.weight.shape[0]
    if bn is not None and bn.running_mean is None:
        raise MergeError(f"bn={chain.bn!r} keeps no running statistics; merging needs them (eval-mode BN)")
    if bn is not None and bn.num_features != n:
        raise MergeError(f"bn={chain.bn!r} has {bn.num_features} channels but {chain.layer!r} has {n} outputs")
    n_in = nxt.weight.shape[1]
    if (isinstance(nxt, nn.Conv2d) and n_in != n) or (isinstance(nxt, nn.Linear) and n_in % n):
        raise MergeError(f"next={chain.next!r} takes {n_in} inputs, which does not fit the {n} outputs of "
                         f"{chain.layer!r}")
    return layer, bn, nxt


def plan(model: nn.Module, chain: Chain, ratio: float, method: str = "merge", criterion: str = "l1",
         threshold: float | None = None, lam: float = 0.85, bn_scale: str = "reference",
         s_ratio: str = "pruned/kept") -> dict:
    """The kept neurons and Z_i of one chain (from the weights as they are), with counts and similarities."""
    check_choice("method", method, METHODS)
    layer, bn, _ = _check_chain(model, chain)
    w = rows_of(layer, bn)
    kept = keep_indices(w, n_kept(len(w), ratio), criterion)
    if method == "prune":
        none = torch.zeros(len(w), dtype=torch.bool)
        z, sim = _assemble(len(w), kept, none.long(), none.double(), none), None
    elif bn is None:
        z, sim = scaling_matrix(w, kept, threshold, s_ratio)
    else:
        z, sim = scaling_matrix_bn(w, kept, **bn_stats(layer, bn), threshold=threshold, lam=lam,
                                   bn_scale=bn_scale, s_ratio=s_ratio)
    merged = int((z != 0).sum()) - len(kept)
    return {"chain": chain, "kept": kept, "z": z, "n": len(w), "p": len(kept), "merged": merged,
            "dropped": len(w) - len(kept) - merged, "similarity": sim}


def apply(model: nn.Module, plans: Sequence[dict]) -> nn.Module:
    """A copy of ``model`` with each plan applied: the layer (and BN) keep P neurons, the next layer
    becomes Z_i W_{i+1}. Plans commute, so they are applied in any order."""
    model = copy.deepcopy(model).eval()
    for pl in plans:
        layer, bn, nxt = _check_chain(model, pl["chain"])
        kept = pl["kept"]
        layer.weight = nn.Parameter(layer.weight.detach()[kept].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[kept].clone())
        setattr(layer, "out_channels" if isinstance(layer, nn.Conv2d) else "out_features", len(kept))
        if bn is not None:
            for name in ("weight", "bias"):
                if getattr(bn, name) is not None:
                    setattr(bn, name, nn.Parameter(getattr(bn, name).detach()[kept].clone()))
            bn.running_mean = bn.running_mean[kept].clone()
            bn.running_var = bn.running_var[kept].clone()
            bn.num_features = len(kept)
        nxt.weight = nn.Parameter(fold(nxt.weight, pl["z"]))
        setattr(nxt, "in_channels" if isinstance(nxt, nn.Conv2d) else "in_features", nxt.weight.shape[1])
    return model


def merge(model: nn.Module, chains: Sequence[Chain], ratio: float | Mapping[str, float], *,
          method: str = "merge", criterion: str = "l1", threshold: float | None = None, lam: float = 0.85,
          bn_scale: str = "reference", s_ratio: str = "pruned/kept") -> tuple[nn.Module, list[dict]]:
    """Merge (or, with ``method="prune"``, only prune) every chain at ``ratio`` (one float, or a ratio per
    chain's layer name; a layer not named is left as it is). Every Z_i is computed from the original
    weights, as the reference code does. Returns the new model and the plans."""
    if not chains:
        raise MergeError("chains=[] is not allowed; find them with merging.find_chains or name them with Chain")
    if len({c.layer for c in chains}) != len(chains):
        raise MergeError("chains name the same layer twice; each layer is pruned by one chain")
    ratios = ratio if isinstance(ratio, Mapping) else {c.layer: ratio for c in chains}
    unknown = sorted(set(ratios) - {c.layer for c in chains})
    if unknown:
        raise MergeError(f"ratio names {unknown}, which head no chain; chains: {[c.layer for c in chains]}")
    plans = [plan(model, c, ratios[c.layer], method, criterion, threshold, lam, bn_scale, s_ratio)
             for c in chains if ratios.get(c.layer, 0.0) > 0]
    return apply(model, plans), plans


def plant_multiples(model: nn.Module, chains: Sequence[Chain], ratio: float, criterion: str = "l1",
                    seed: int = 0) -> nn.Module:
    """A copy of ``model`` in which every neuron that ``ratio`` prunes is a positive multiple s·w_k of a
    random kept neuron k (s below the smallest kept norm, so the kept set stays), with the BN shift β set
    so that BN(y_n) = A·BN(y_k) holds exactly: the case where merging must give the original outputs."""
    check_choice("criterion", criterion, ("l1", "l2"))
    model = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    for chain in chains:
        layer, bn, _ = _check_chain(model, chain)
        w = rows_of(layer, bn)
        kept = keep_indices(w, n_kept(len(w), ratio), criterion)
        pruned = torch.arange(len(w))[_pruned_mask(len(w), kept)]
        k = kept[torch.randint(len(kept), (len(pruned),), generator=g)]
        score = w.abs().sum(1) if criterion == "l1" else w.norm(dim=1)
        s = (0.5 + 0.4 * torch.rand(len(pruned), generator=g, dtype=torch.float64)) * score[kept].min() / score[k]
        weight = layer.weight.detach().double().flatten(1)
        weight[pruned] = s[:, None] * weight[k]
        layer.weight.data = weight.reshape(layer.weight.shape).to(layer.weight.dtype)
        if layer.bias is not None:
            bias = layer.bias.detach().double()
            bias[pruned] = s * bias[k] if bn is None else bias[pruned]
            layer.bias.data = bias.to(layer.bias.dtype)
        if bn is not None:
            st = bn_stats(layer, bn)
            gam, beta, mean = (st[x].double() for x in ("gamma", "beta", "mean"))
            sd = (st["var"].double() + st["eps"]).sqrt()
            a = s * (gam[pruned] / gam[k]) * (sd[k] / sd[pruned])
            beta[pruned] = a * beta[k] - gam[pruned] * (s * mean[k] - mean[pruned]) / sd[pruned]
            bn.bias.data = beta.to(bn.bias.dtype)
    return model


# ----------------------------------------------------------------------------------------------------
# Branch-free models for tests, the benchmark and the full-size run
# ----------------------------------------------------------------------------------------------------

def mlp(widths: Sequence[int], activation: str = "relu", slope: float = 0.1) -> nn.Sequential:
    """Flatten, then Linear layers of the given ``widths`` (input first) with ReLU or LeakyReLU between."""
    check_choice("activation", activation, ("relu", "leaky_relu"))
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU() if activation == "relu" else nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


def vgg16_reference_ratios(model: nn.Sequential) -> dict[str, float]:
    """The reference's per-layer pruning of VGG-16 on CIFAR-10 as ratios per conv layer name."""
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != len(VGG16_CIFAR10_KEEP):
        raise MergeError(f"the model has {len(convs)} conv layers; the reference's VGG-16 has 13")
    ratios = {}
    for name, keep in zip(convs, VGG16_CIFAR10_KEEP):
        n = dict(model.named_modules())[name].out_channels
        if keep < n:
            ratios[name] = 1.0 - keep / n
    return ratios


def vgg_recipe(dataset: str, config: TrainConfig, depth: int = 16, train_subset: int | None = None) -> Recipe:
    """The recipe of a VGG (``models.vgg``) trained on ``dataset`` with ``config``, for ``train.train_cached``
    like the book's baselines (images of 28 pixels are padded to 32 so that four 2x2 pools and the final one fit)."""
    check_choice("depth", depth, tuple(models.VGG_CFGS))
    check_choice("dataset", dataset, tuple(baselines.IN_CHANNELS))
    pad = (32 - baselines.IMAGE_SIDE[dataset]) // 2
    return Recipe("vgg", dataset, config, {"depth": depth, "in_channels": baselines.IN_CHANNELS[dataset]}, pad=pad,
                  train_subset=train_subset)
