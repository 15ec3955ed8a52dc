"""Neuron merging (Kim et al. 2020, paper 003's subject; chapter 4): prune a layer's neurons and fold a
scaled copy of each pruned one into the next layer, so that the next layer's input is preserved.

The decomposition W_i ≈ Y_i Z_i keeps P of the N neurons of layer i (Y_i, chosen by ℓ1, ℓ2 or ℓ2-GM);
Z_i (N x P) has a 1 for every kept neuron and, for a pruned neuron, one positive entry: the scale of the
most similar kept neuron. Because ReLU and LeakyReLU are positively homogeneous, f(s·y) = s·f(y) for
s > 0, so the next layer can take Z_i in: W_{i+1} becomes Z_i W_{i+1} (Theorem 1).

- :func:`assign` is Algorithm 2 (fully connected, bias appended) and :func:`assign_bn` Algorithm 3 (a
  layer followed by BatchNorm). Both score only the pruned rows against the kept ones, in float32, and
  decide again in float64 every row whose best two candidates (or whose similarity and the threshold)
  lie within :data:`TIE_TOL`, so the choice is the float64 one. Z_i stays sparse (:class:`Assignment`).
- :func:`fold` is Z_i W_{i+1} as a gather of the kept input groups plus one ``index_add`` of the merged
  ones, scaled: no dense product with Z.
- :func:`survey` / :func:`find_chains` find the merge-able ``layer -> [BatchNorm] -> ReLU/LeakyReLU ->
  layer`` chains with torch.fx, or, where fx cannot trace the model (modules built inside ``forward``,
  data-dependent control flow), by running one input with forward hooks and a torch-function recorder
  (the report's proposal, its section 4.1). Surveys are cached per model, so repeated merges trace once.
- :func:`merge` checks every chain, hand-named or found, against that survey (an activation that is not
  positively homogeneous, a branch, a join raise :class:`MergeError` naming it), plans every chain from
  the original weights, as the reference code does, then applies the plans to a copy.
- Threshold: as in the reference code (``if threshold and sim < threshold``), ``None`` and ``0`` mean
  "never drop"; any other value drops a pruned neuron whose best similarity lies below it.
"""
from __future__ import annotations

import copy
import operator
import weakref
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.overrides import TorchFunctionMode

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
               "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "boolean_dispatch", "clone"}
_ACT_CALLS = {"relu", "relu_", "leaky_relu", "leaky_relu_"}
_SHAPE_CALLS = {"size", "dim", "__get__", "numel", "ndimension"}
_VALUE_CALLS = {"__bool__", "item", "__float__", "__int__", "__index__", "tolist", "numpy"}
_JOIN_NAMES = {"add", "add_", "iadd", "__add__", "__iadd__", "__radd__", "cat", "concat", "stack", "mul",
               "mul_", "__mul__", "__rmul__", "sub", "__sub__", "__rsub__", "matmul", "bmm", "einsum"}
_JOINS = {operator.add, operator.mul, operator.iadd, torch.add, torch.cat, torch.stack, torch.mul}
# Float32 scores closer than TIE_TOL * sqrt(d) (d: the length of a neuron's weight vector) are decided again
# in float64: a float32 dot product of unit vectors is off by about sqrt(d) * 6e-8, sixteen times less.
TIE_TOL = 1e-6
_TINY = 1e-30

# The reference's pruned VGG-16 on CIFAR-10 (its main.py): 32, 64, 128, 128, 256 x 3, then 256 x 6.
VGG16_CIFAR10_KEEP = (32, 64, 128, 128, 256, 256, 256, 256, 256, 256, 256, 256, 256)


class MergeError(ParameterError):
    """A model, or a part of it, that neuron merging cannot handle (a branch, an activation, a layer)."""


@dataclass(frozen=True)
class Chain:
    """One merge-able chain: ``layer`` (Linear/Conv2d, pruned) -> ``bn`` (optional BatchNorm) -> ``act``
    (ReLU/LeakyReLU) -> ``next`` (Linear/Conv2d, takes Z_i in). Names are ``model.named_modules()`` names;
    ``act`` is informative (a hand-named chain may leave it None: the survey checks what lies between)."""

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


def _criterion(a: np.ndarray, criterion: str) -> np.ndarray:
    """Per row of ``a``: its ℓ1 or ℓ2 norm, or its summed distance to the other rows (ℓ2-GM, in float64)."""
    if criterion == "l1":
        return np.abs(a).sum(1)
    if criterion == "l2":
        return np.sqrt(np.einsum("ij,ij->i", a, a))
    wd = torch.from_numpy(a).double()
    return torch.cdist(wd, wd).sum(0).numpy()


def keep_indices(w: torch.Tensor, p: int, criterion: str = "l1") -> torch.Tensor:
    """The P kept neurons (sorted indices) of the rows ``w`` (N, d): largest ℓ1 or ℓ2 norm, or ℓ2-GM
    (largest summed distance to the others, i.e. farthest from the geometric median; He et al. 2019).
    Float32 norms that lie too close to the cut between kept and pruned are computed again in float64."""
    check_choice("criterion", criterion, CRITERIA)
    a = w.detach().cpu().numpy()
    score = _criterion(a, criterion)
    order = np.argsort(-score, kind="stable")
    if score.dtype != np.float64 and p < len(a):
        v = score[order]
        tol = TIE_TOL * a.shape[1] ** 0.5 * abs(float(v[p - 1]))
        if float(v[p - 1] - v[p]) <= 2 * tol:
            near = (score >= v[p] - tol) & (score <= v[p - 1] + tol)
            score = score.astype(np.float64)
            score[near] = _criterion(a[near].astype(np.float64), criterion)
            order = np.argsort(-score, kind="stable")
    return torch.from_numpy(np.sort(order[:p]))


def _complement(n: int, kept: torch.Tensor) -> torch.Tensor:
    """The sorted indices below ``n`` that ``kept`` leaves out (in NumPy: a few calls that cost less)."""
    mask = np.ones(n, dtype=bool)
    mask[kept.numpy()] = False
    return torch.from_numpy(np.flatnonzero(mask))


def passes(sim: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Which similarities keep their neuron merged: all when ``threshold`` is None or 0 (the reference's
    ``if threshold and sim < threshold``), else those at or above it."""
    if not threshold:
        return torch.ones_like(sim, dtype=torch.bool)
    return sim >= threshold


@dataclass(frozen=True)
class Assignment:
    """Z_i of one layer in sparse form. ``kept`` (P,) the kept neurons (sorted); ``pruned`` (M,) the
    others; ``col`` (M,) the column of Z (index into ``kept``) each pruned neuron is assigned to;
    ``scale`` (M,) its entry of Z (float64); ``merged`` (M,) whether it is merged (False: dropped, its
    row of Z is zero); ``similarity`` (M,) the cosine similarity to the chosen kept neuron (NaN when
    only pruned)."""

    n: int
    kept: torch.Tensor
    pruned: torch.Tensor
    col: torch.Tensor
    scale: torch.Tensor
    merged: torch.Tensor
    similarity: torch.Tensor

    @property
    def n_merged(self) -> int:
        return int(self.merged.sum())

    @property
    def n_dropped(self) -> int:
        return len(self.pruned) - self.n_merged

    def dense(self) -> torch.Tensor:
        """Z_i as a dense (N x P) float64 matrix."""
        z = torch.zeros(self.n, len(self.kept), dtype=torch.float64)
        z[self.kept, torch.arange(len(self.kept))] = 1.0
        m = self.merged
        z[self.pruned[m], self.col[m]] = self.scale[m].double()
        return z

    def similarities(self) -> torch.Tensor:
        """The similarity of every neuron (N,): 1 for kept ones."""
        sim = torch.ones(self.n, dtype=torch.float64)
        sim[self.pruned] = self.similarity.double()
        return sim


def prune_only(n: int, kept: torch.Tensor) -> Assignment:
    """The Assignment of plain pruning: every pruned neuron dropped."""
    pruned = _complement(n, kept)
    m = len(pruned)
    return Assignment(n, kept, pruned, torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.float64),
                      torch.zeros(m, dtype=torch.bool), torch.full((m,), float("nan"), dtype=torch.float64))


def _ratio(norm_pruned: torch.Tensor, norm_kept: torch.Tensor, s_ratio: str) -> torch.Tensor:
    """s of Algorithm 2: ‖w_n‖ / ‖w_k‖ (or reversed, the report's check), broadcast."""
    if s_ratio == "pruned/kept":
        return norm_pruned / norm_kept.clamp_min(_TINY)
    return norm_kept / norm_pruned.clamp_min(_TINY)


def _cosine(w: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the ``rows`` of ``w`` to its ``kept`` rows (``norm``: the row norms, > 0)."""
    return (w[rows] @ w[kept].T) / (norm[rows, None] * norm[None, kept])


def _near(first: torch.Tensor, second: torch.Tensor | None, sim: torch.Tensor,
          threshold: float | None, d: int) -> torch.Tensor:
    """Rows whose two best scores, or whose similarity and the threshold, lie within TIE_TOL * sqrt(d)."""
    tol = TIE_TOL * d ** 0.5
    close = torch.zeros(len(first), dtype=torch.bool)
    if second is not None:
        close |= (first - second).abs() < tol  # inf - inf = nan: not close
    if threshold:
        close |= (sim - threshold).abs() < tol
    return close.nonzero()[:, 0]


def assign(w: torch.Tensor, kept: torch.Tensor, threshold: float | None = None,
           s_ratio: str = "pruned/kept") -> Assignment:
    """Z_i of Algorithm 2: each pruned row of ``w`` (N, d; bias appended) goes to the kept row of highest
    cosine similarity, scaled by s = ‖w_n‖/‖w_k‖; it is dropped when its similarity lies below
    ``threshold`` (None or 0: never, as in the reference code). In NumPy: its calls cost less than
    torch's on matrices this small, and its BLAS is as fast."""
    check_choice("s_ratio", s_ratio, S_RATIOS)
    pruned = _complement(len(w), kept)
    if not len(pruned):
        return prune_only(len(w), kept)
    a, k, p = w.detach().cpu().numpy(), kept.numpy(), pruned.numpy()
    norm = np.maximum(np.sqrt(np.einsum("ij,ij->i", a, a)), _TINY)
    cos = (a[p] @ a[k].T) / np.outer(norm[p], norm[k])
    col = cos.argmax(1)
    sim = cos[np.arange(len(p)), col].astype(np.float64)
    if a.dtype != np.float64:
        tol = TIE_TOL * a.shape[1] ** 0.5
        close = np.zeros(len(p), bool)
        if len(k) > 1:  # the second best of each row: the best masked out
            runner_up = cos.copy()
            runner_up[np.arange(len(p)), col] = -np.inf
            close = sim - runner_up.max(1) < tol
        if threshold:
            close |= np.abs(sim - threshold) < tol
        for r in np.flatnonzero(close):  # few rows, if any: decide them in float64
            cand = np.flatnonzero(cos[r] >= cos[r, col[r]] - tol)  # the columns that could win
            wr, wc = a[p[r]].astype(np.float64), a[k[cand]].astype(np.float64)
            c64 = (wc @ wr) / np.maximum(np.linalg.norm(wc, axis=1) * np.linalg.norm(wr), _TINY)
            j = int(c64.argmax())
            sim[r], col[r] = c64[j], cand[j]
    ratio = norm[p].astype(np.float64) / norm[k][col].astype(np.float64)
    scale = torch.from_numpy(ratio if s_ratio == "pruned/kept" else 1.0 / ratio)
    merged = sim >= threshold if threshold else np.ones(len(p), dtype=bool)  # as passes()
    return Assignment(len(w), kept, pruned, torch.from_numpy(col), scale, torch.from_numpy(merged),
                      torch.from_numpy(sim))


def _bn_score(w, rows, kept, st, lam, bn_scale, s_ratio, dtype):
    """Algorithm 3's score, scale, validity and cosine for the pruned ``rows`` against ``kept``."""
    w = w.to(dtype)
    norm = w.norm(dim=1).clamp_min(_TINY)
    cos = _cosine(w, rows, kept, norm)
    s = _ratio(norm[rows, None], norm[None, kept], s_ratio)
    g, b, m, v = (st[k].to(dtype) for k in ("gamma", "beta", "mean", "var"))
    g1, b1, m1, v1 = g[rows, None], b[rows, None], m[rows, None], v[rows, None]  # pruned candidate n
    g2, b2, m2, v2 = g[None, kept], b[None, kept], m[None, kept], v[None, kept]  # kept neuron k
    if bn_scale == "reference":
        scale = s * (g2 / g1) * (v1 / v2)
        offset = ((g2 / v2) * (s * (-(v1 * b1 / g1) + m1) - m2) + b2).abs() / scale
        valid = torch.ones_like(scale, dtype=torch.bool)
    else:
        sd = (v + st["eps"]).sqrt()
        sd1, sd2 = sd[rows, None], sd[None, kept]
        scale = s * (g1 / g2) * (sd2 / sd1)
        offset = (b1 - scale * b2 + g1 * (s * m2 - m1) / sd1).abs()
        valid = scale > 0
    lo = offset.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    hi = offset.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    spread = hi - lo
    normed = torch.where(spread > 0, (offset - lo) / spread.clamp_min(_TINY), torch.zeros_like(offset))
    score = (lam * (1.0 - cos) + (1.0 - lam) * normed).masked_fill(~valid, float("inf"))
    return score, scale, valid, cos


def assign_bn(w: torch.Tensor, kept: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
              var: torch.Tensor, eps: float = 1e-5, threshold: float | None = None, lam: float = 0.85,
              bn_scale: str = "reference", s_ratio: str = "pruned/kept") -> Assignment:
    """Z_i of Algorithm 3, a layer followed by BatchNorm (γ, β, running mean μ and variance v).

    The score of a (pruned n, kept k) pair is λ·(cosine distance) + (1-λ)·(BN offset, min-max normalised
    over k); the lowest score wins and the threshold applies to its cosine similarity.

    ``bn_scale="reference"`` is the reference code's formula: scale s·(γ_k/γ_n)(v_n/v_k) and offset
    |(γ_k/v_k)(s(μ_n - v_n β_n/γ_n) - μ_k) + β_k| / scale, with the running *variance* v where a standard
    deviation would belong. ``"exact"`` uses what BN(y_n) = A·BN(y_k) + B gives when y_n = s·y_k:
    A = s(γ_n/γ_k)(σ_k/σ_n) with σ = sqrt(v + eps), offset |B| = |β_n - A β_k + γ_n (s μ_k - μ_n)/σ_n|;
    A ≤ 0 is never chosen. The reference's BN factor (γ_k/γ_n)(σ_n/σ_k) is the inverse of the exact one.
    """
    check_choice("bn_scale", bn_scale, BN_SCALES)
    check_choice("s_ratio", s_ratio, S_RATIOS)
    if not 0.0 <= lam <= 1.0:
        raise ParameterError(f"lam={lam!r} is not allowed; expected a float in [0, 1]")
    st = {"gamma": gamma.detach(), "beta": beta.detach(), "mean": mean.detach(), "var": var.detach(), "eps": eps}
    pruned = _complement(len(w), kept)
    if not len(pruned):
        return prune_only(len(w), kept)
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    score, scale, valid, cos = _bn_score(w, pruned, kept, st, lam, bn_scale, s_ratio, dtype)
    top = score.topk(min(2, len(kept)), dim=1, largest=False)
    col = top.indices[:, 0].clone()
    sim, sc, ok = (t.gather(1, col[:, None])[:, 0] for t in (cos.double(), scale.double(), valid))
    if dtype != torch.float64:
        second = top.values[:, 1] if len(kept) > 1 else None
        rows = _near(top.values[:, 0], second, sim, threshold, w.shape[1])
        if len(rows):
            s64, sc64, ok64, cos64 = _bn_score(w, pruned[rows], kept, st, lam, bn_scale, s_ratio, torch.float64)
            c = s64.argmin(1)
            col[rows] = c
            sim[rows], sc[rows], ok[rows] = (t.gather(1, c[:, None])[:, 0] for t in (cos64, sc64, ok64))
    return Assignment(len(w), kept, pruned, col, sc, passes(sim, threshold) & ok, sim)


def scaling_matrix(w: torch.Tensor, kept: torch.Tensor, threshold: float | None = None,
                   s_ratio: str = "pruned/kept") -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 2 as a dense Z_i (N x P, float64) and every row's best similarity (1 for kept rows)."""
    a = assign(w, kept, threshold, s_ratio)
    return a.dense(), a.similarities()


def scaling_matrix_bn(w: torch.Tensor, kept: torch.Tensor, gamma, beta, mean, var, eps: float = 1e-5,
                      threshold: float | None = None, lam: float = 0.85, bn_scale: str = "reference",
                      s_ratio: str = "pruned/kept") -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 3 as a dense Z_i (N x P, float64) and the chosen pair's cosine (1 for kept rows)."""
    a = assign_bn(w, kept, gamma, beta, mean, var, eps, threshold, lam, bn_scale, s_ratio)
    return a.dense(), a.similarities()


def fold(weight: torch.Tensor, z: Assignment | torch.Tensor) -> torch.Tensor:
    """Z_i W_{i+1}: the next layer's weight (O, N·r) or (O, N, kh, kw) with its N input groups mixed into P
    (for a Linear after a flatten, r = features per channel). With an :class:`Assignment`, a gather of the
    kept groups plus one ``index_add`` of the merged ones, scaled; with a dense Z (N x P), the same
    ``index_add`` over Z's nonzero entries. Computed in the weight's dtype."""
    n = z.n if isinstance(z, Assignment) else z.shape[0]
    w = weight.detach()
    if w.ndim == 2:
        if w.shape[1] % n:
            raise MergeError(f"the next layer has {w.shape[1]} inputs, not a multiple of the {n} neurons")
        w = w.reshape(w.shape[0], n, -1)
    if isinstance(z, Assignment):
        out = w.index_select(1, z.kept)
        rows, cols, vals = z.pruned[z.merged], z.col[z.merged], z.scale[z.merged]
    else:
        out = w.new_zeros((w.shape[0], z.shape[1], *w.shape[2:]))
        rows, cols = z.nonzero(as_tuple=True)
        vals = z[rows, cols]
    if len(rows):
        src = w.index_select(1, rows) * vals.to(w.dtype).view(1, -1, *([1] * (w.ndim - 2)))
        out.index_add_(1, cols, src)
    return out.reshape(weight.shape[0], -1) if weight.ndim == 2 else out


def fold_dense(weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Z_i W_{i+1} as a dense float64 product (the slow, obvious form; tests compare :func:`fold` with it)."""
    n = z.shape[0]
    w = weight.detach().double()
    if w.ndim == 4:
        return torch.einsum("onhw,np->ophw", w, z.double()).to(weight.dtype)
    out = torch.einsum("onr,np->opr", w.reshape(w.shape[0], n, -1), z.double())
    return out.reshape(w.shape[0], -1).to(weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Chains of a model: the survey (torch.fx, or forward hooks where fx cannot trace), cached per model
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class _Node:
    """One operation of a model's dataflow, as both tracers describe it: its ``kind`` ('layer', 'bn',
    'act', 'pass', 'output', or words naming what it is), the registered module name (None for a
    function, or a module built inside forward), its users and its output shape (None if unknown)."""

    label: str
    kind: str
    module: str | None = None
    users: list = field(default_factory=list)
    shape: tuple | None = None


def _module_kind(m: nn.Module, name: str | None) -> str:
    where = name if name is not None else "built inside forward"
    if isinstance(m, LAYERS):
        return "layer" if name is not None else f"a {type(m).__name__} built inside forward"
    if isinstance(m, _BATCHNORMS):
        return "bn" if name is not None else f"a {type(m).__name__} built inside forward"
    if isinstance(m, ACTIVATIONS):
        return "act"
    if isinstance(m, _PASS_MODULES):
        return "pass"
    return f"a {type(m).__name__} ({where})"


def _call_kind(name: str, n_tensor_args: int) -> str:
    if name in _ACT_CALLS:
        return "act"
    if name in _PASS_CALLS:
        return "pass"
    if name in _JOIN_NAMES and n_tensor_args > 1:
        return f"{name.strip('_')} (which joins two branches)"
    return f"the operation {name}"


def _fx_graph(model: nn.Module, example: torch.Tensor | None) -> list[_Node]:
    """The model's dataflow from torch.fx (shapes from one run of ``example`` through the trace, if given)."""
    gm = torch.fx.symbolic_trace(model)
    if example is not None:
        with _eval_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(example)
    modules = dict(gm.named_modules())
    nodes: dict[torch.fx.Node, _Node] = {}
    for node in gm.graph.nodes:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if node.op == "call_module":
            out = _Node(node.target, _module_kind(modules[node.target], node.target), node.target)
        elif node.op == "output":
            out = _Node("output", "output")
        elif node.op in ("call_function", "call_method"):
            shape_only = name in _SHAPE_CALLS or node.target is getattr
            n_tensors = sum(isinstance(a, torch.fx.Node) for a in node.all_input_nodes)
            kind = "shape" if shape_only else _call_kind(name, n_tensors)
            if node.target in _JOINS and not shape_only:
                kind = f"{name} (which joins two branches)"
            out = _Node(node.name, kind)
        else:
            out = _Node(node.name, "input" if node.op == "placeholder" else f"the operation {name}")
        meta = node.meta.get("tensor_meta")
        out.shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
        nodes[node] = out
    for node, out in nodes.items():
        out.users = [nodes[u] for u in node.users]
    return list(nodes.values())


class _eval_mode:
    """Put every module in eval mode for the block, then give each back its own training flag."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc):
        for m, mode in self.modes:
            m.training = mode
        return False


def _tensors_in(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors_in(o)]
    return []


class _Recorder(TorchFunctionMode):
    """Records the dataflow of one forward pass: every leaf-module call (through global forward hooks,
    so modules built inside ``forward`` are seen too) and every torch function called outside leaf
    modules. A tensor maps to the node that last produced or modified it (in-place ops included)."""

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names, self.nodes, self.last, self.depth, self.keep = names, [], {}, 0, []
        self.value_reads: list[str] = []

    def _link(self, node: _Node, inputs) -> None:
        for t in _tensors_in(inputs):
            src = self.last.get(id(t))
            if src is not None and node not in src.users:
                src.users.append(node)

    def _out(self, node: _Node, out) -> None:
        tensors = _tensors_in(out)
        for t in tensors:
            self.last[id(t)] = node
            self.keep.append(t)  # keeps ids unique while recording
        node.shape = tuple(tensors[0].shape) if tensors else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = getattr(func, "__name__", str(func))
            tensors = _tensors_in((args, kwargs))
            if name in _VALUE_CALLS and any(id(t) in self.last for t in tensors):
                self.value_reads.append(name)
            if name in _SHAPE_CALLS or not isinstance(out, (torch.Tensor, tuple, list)):
                return out
            node = _Node(name, _call_kind(name, len(tensors)))
            self.nodes.append(node)
            self._link(node, tensors)
            self._out(node, out)
        return out

    def pre(self, module, args):
        if next(module.children(), None) is None:
            if self.depth == 0:
                name = self.names.get(id(module))
                node = _Node(name or type(module).__name__, _module_kind(module, name), name)
                self.nodes.append(node)
                self._link(node, args)
                self.current = node
            self.depth += 1

    def post(self, module, args, out):
        if next(module.children(), None) is None:
            self.depth -= 1
            if self.depth == 0:
                self._out(self.current, out)


def _eager_graph(model: nn.Module, example: torch.Tensor) -> list[_Node]:
    """The model's dataflow from one forward pass of ``example`` (no tracing: any Python runs)."""
    rec = _Recorder({id(m): n for n, m in model.named_modules()})
    x = example.clone()
    inp = _Node("input", "input")
    rec.last[id(x)] = inp
    hooks = [nn.modules.module.register_module_forward_pre_hook(rec.pre),
             nn.modules.module.register_module_forward_hook(rec.post)]
    try:
        with _eval_mode(model), torch.no_grad(), rec:
            out = model(x)
    except Exception as err:
        raise MergeError(f"example_input of shape {tuple(example.shape)} does not run through "
                         f"{type(model).__name__} ({type(err).__name__}: {err})") from err
    finally:
        for h in hooks:
            h.remove()
    if rec.value_reads:
        raise MergeError(
            f"{type(model).__name__}'s forward reads tensor values computed from its input "
            f"({', '.join(sorted(set(rec.value_reads)))}), so it may take another path for another input and "
            "one run cannot show its dataflow; merging cannot check its chains. Make forward independent of "
            "the data's values (torch.fx can then trace it), or merge a branch-free submodule")
    end = _Node("output", "output")
    rec._link(end, out)
    return [inp, *rec.nodes, end]


def _follow(node: _Node, modules: dict) -> tuple[Chain | None, str | None]:
    """Walk from a layer's node along single users: a Chain, (None, None) at the model's output, or a problem."""
    bn = act = None
    problem = None
    cur = node
    while True:
        users = [u for u in cur.users if u.kind != "shape"]
        if len(users) == 1 and users[0].kind == "output":
            return None, problem
        if len(users) != 1:
            where = f"{len(users)} operations ({', '.join(u.label for u in users)})" if users else "nothing"
            return None, problem or f"branch: the output of {cur.label} feeds {where}"
        u = users[0]
        if u.kind == "layer":
            nxt = modules[u.module]
            if problem is None and act is None:
                problem = f"no ReLU or LeakyReLU between {node.module} and {u.module}"
            if problem is None and isinstance(nxt, nn.Conv2d) and nxt.groups != 1:
                problem = f"{u.module} is a grouped convolution"
            n = modules[node.module].weight.shape[0]
            shape = cur.shape
            flat_ok = shape is None or (len(shape) == 2 and shape[1] % n == 0)
            if problem is None and isinstance(nxt, nn.Linear) and not flat_ok:
                problem = f"{u.module} does not take the {n} channels flattened (its input has shape {shape})"
            if problem is None and isinstance(nxt, nn.Linear) and shape is None and cur is not node \
                    and isinstance(modules[node.module], nn.Conv2d):
                problem = (f"{u.module} takes {node.module}'s channels through a flatten whose layout cannot be "
                           "checked without an input; pass example=<one input batch>")
            return (None, problem) if problem else (Chain(node.module, u.module, bn, act), None)
        if u.kind == "bn" and problem is None:
            if act is not None or bn is not None:
                problem = f"BatchNorm {u.module} comes after the activation or after another BatchNorm"
            bn = u.module
        elif u.kind == "act" and problem is None:
            act = act or u.label
        elif u.kind not in ("bn", "act", "pass") and problem is None:
            problem = (f"{u.kind} lies between {node.module} and the next layer; merging needs a positively "
                       f"homogeneous activation (ReLU or LeakyReLU) and no branch")
        cur = u


_SURVEYS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    """What the survey depends on besides forward's code: the modules, their types and weight shapes."""
    return tuple((n, type(m), getattr(getattr(m, "weight", None), "shape", None)) for n, m in model.named_modules())


def _survey_rows(model: nn.Module, example: torch.Tensor | None) -> tuple[list[dict], str]:
    try:
        nodes, how = _fx_graph(model, example), "torch.fx"
    except Exception as err:  # modules built in forward, data-dependent control flow and the like
        if example is None:
            raise MergeError(
                f"torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}), so its chains "
                "cannot be checked without running it: pass example=<one input batch> (forward hooks then "
                "record the dataflow), or name the chains with merging.Chain(layer, next, bn, act) and pass "
                "example= as well") from err
        nodes, how = _eager_graph(model, example), "forward hooks"
    modules = dict(model.named_modules())
    layer_nodes = [n for n in nodes if n.kind == "layer"]
    calls: dict[str, int] = {}
    for n in layer_nodes:
        calls[n.module] = calls.get(n.module, 0) + 1
    rows, seen = [], set()
    for node in layer_nodes:
        if node.module in seen:
            continue
        seen.add(node.module)
        chain, problem = _follow(node, modules)
        m = modules[node.module]
        if calls[node.module] > 1:
            chain, problem = None, f"{node.module} is called more than once (shared weights)"
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            chain, problem = None, f"{node.module} is a grouped convolution"
        status = "chain" if chain else ("problem" if problem else "output")
        rows.append({"layer": node.module, "type": type(m).__name__,
                     "shape": node.shape[1:] if node.shape is not None else None, "status": status,
                     "chain": chain, "reason": problem or "", "found by": how})
    return rows, how


def _cached_survey(model: nn.Module, example: torch.Tensor | None) -> list[dict]:
    """The survey of ``model`` from the per-model cache (keyed by its modules and the example's shape);
    without an example, any cached survey of the same modules serves."""
    sig = _signature(model)
    per_model = _SURVEYS.setdefault(model, {})
    if example is None:
        for (s, _), rows in per_model.items():
            if s == sig:
                return rows
        key = (sig, None)
    else:
        key = (sig, (tuple(example.shape[1:]), example.dtype))
    if key not in per_model:
        per_model[key] = _survey_rows(model, example)[0]
    return per_model[key]


def survey(model: nn.Module, example_input: torch.Tensor | None = None) -> list[dict]:
    """Every Linear/Conv2d of ``model`` in dataflow order with its status: 'chain' (merge-able, with the
    chain), 'output' (feeds the model's output; nothing to merge into) or 'problem' (with the reason), and
    how the dataflow was found ('torch.fx', or 'forward hooks' where fx cannot trace the model). Cached
    per model; the caller's train/eval modes are left as they were."""
    return [dict(r) for r in _cached_survey(model, example_input)]


def find_chains(model: nn.Module, example_input: torch.Tensor, on_problem: str = "raise") -> list[Chain]:
    """The merge-able chains layer -> [BatchNorm] -> ReLU/LeakyReLU -> [pool, flatten, dropout] -> layer of
    ``model``, found by tracing it with torch.fx (or with forward hooks where fx cannot) and running
    ``example_input`` once. Cached per model, so a second call costs microseconds.

    With ``on_problem="raise"`` any layer that leads to another layer through a branch, an unsupported
    activation or operation raises a MergeError that names it; ``"skip"`` keeps only the branch-free
    chains (in a ResNet: conv1 -> bn1 -> relu1 -> conv2 inside each block, as the reference merges it).
    """
    check_choice("on_problem", on_problem, ON_PROBLEM)
    rows = _cached_survey(model, example_input)
    problems = [f"{r['layer']}: {r['reason']}" for r in rows if r["status"] == "problem"]
    if problems and on_problem == "raise":
        raise MergeError(f"{type(model).__name__} cannot be merged as a whole: " + "; ".join(problems)
                         + ". Pass on_problem='skip' to merge only its branch-free chains.")
    return [r["chain"] for r in rows if r["chain"] is not None]


def check_chains(model: nn.Module, chains: Sequence[Chain], example: torch.Tensor | None = None) -> None:
    """Raise a MergeError unless every chain (hand-named or found) is one the survey finds: the same
    next layer and BatchNorm, and nothing between them but BatchNorm, ReLU/LeakyReLU, pooling, flatten
    or dropout. Names the activation or operation that breaks a chain."""
    rows = {r["layer"]: r for r in _cached_survey(model, example)}
    for c in chains:
        r = rows.get(c.layer)
        if r is None:
            _module(model, c.layer, LAYERS, "layer")  # names what it is instead
            raise MergeError(f"layer={c.layer!r} is never called by {type(model).__name__}'s forward")
        if r["status"] == "problem":
            raise MergeError(f"the chain {c.layer} -> {c.next} cannot be merged: {r['reason']}")
        if r["status"] == "output":
            raise MergeError(f"layer={c.layer!r} feeds the model's output; there is no next layer to merge into")
        found = r["chain"]
        if (found.next, found.bn) != (c.next, c.bn):
            raise MergeError(f"the chain names next={c.next!r}, bn={c.bn!r}, but {c.layer}'s output reaches "
                             f"next={found.next!r} through bn={found.bn!r}")


# ----------------------------------------------------------------------------------------------------
# Planning and applying a merge
# ----------------------------------------------------------------------------------------------------

def _module(model: nn.Module, name: str | None, kinds: tuple, what: str, modules: dict | None = None) -> nn.Module:
    modules = modules if modules is not None else dict(model.named_modules())
    if name not in modules:
        raise MergeError(f"{what}={name!r} is not a module of {type(model).__name__}")
    m = modules[name]
    if not isinstance(m, kinds):
        raise MergeError(f"{what}={name!r} is a {type(m).__name__}; expected one of "
                         f"{', '.join(k.__name__ for k in kinds)}")
    if isinstance(m, nn.Conv2d) and m.groups != 1:
        raise MergeError(f"{what}={name!r} is a grouped convolution (groups={m.groups}); only groups=1 merges")
    return m


def rows_of(layer: nn.Module, bn: nn.Module | None) -> torch.Tensor:
    """w_n of every neuron: flattened weights (in their dtype), with the bias appended unless a BatchNorm
    follows."""
    w = layer.weight.detach().cpu().numpy().reshape(layer.weight.shape[0], -1)
    if layer.bias is not None and bn is None:
        w = np.concatenate([w, layer.bias.detach().cpu().numpy()[:, None]], 1)
    return torch.from_numpy(np.ascontiguousarray(w))


def bn_stats(layer: nn.Module, bn: nn.Module) -> dict:
    """γ, β, μ, v, eps of ``bn``; the layer's bias c is folded into the mean (μ - c), as BN(y + c) needs."""
    mean = bn.running_mean.detach()
    if layer.bias is not None:
        mean = mean - layer.bias.detach()
    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(mean)
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": bn.running_var.detach(), "eps": bn.eps}


def _check_chain(model: nn.Module, chain: Chain, modules: dict | None = None
                 ) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    """The chain's modules, checked for kinds and sizes (what lies between them: :func:`check_chains`)."""
    modules = modules if modules is not None else dict(model.named_modules())
    layer = _module(model, chain.layer, LAYERS, "layer", modules)
    bn = None if chain.bn is None else _module(model, chain.bn, _BATCHNORMS, "bn", modules)
    nxt = _module(model, chain.next, LAYERS, "next", modules)
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


@dataclass(frozen=True)
class Plan:
    """What merging does to one chain: the chain and its :class:`Assignment` (kept neurons and Z_i)."""

    chain: Chain
    assignment: Assignment

    @property
    def kept(self) -> torch.Tensor:
        return self.assignment.kept

    @property
    def z(self) -> torch.Tensor:
        """Z_i, dense (N x P, float64)."""
        return self.assignment.dense()

    @property
    def n(self) -> int:
        return self.assignment.n

    @property
    def p(self) -> int:
        return len(self.assignment.kept)

    @property
    def merged(self) -> int:
        return self.assignment.n_merged

    @property
    def dropped(self) -> int:
        return self.assignment.n_dropped


def plan(model: nn.Module, chain: Chain, ratio: float | None = None, method: str = "merge",
         criterion: str = "l1", threshold: float | None = None, lam: float = 0.85, bn_scale: str = "reference",
         s_ratio: str = "pruned/kept", *, kept: Sequence[int] | torch.Tensor | None = None,
         modules: dict | None = None) -> Plan:
    """The kept neurons and Z_i of one chain, from the weights as they are: the ``criterion`` keeps
    round(N (1 - ``ratio``)) neurons, or ``kept`` names them (any other criterion's choice)."""
    check_choice("method", method, METHODS)
    layer, bn, _ = _check_chain(model, chain, modules)
    w = rows_of(layer, bn)
    if kept is None:
        if ratio is None:
            raise MergeError("plan needs a ratio or the kept indices")
        kept_t = keep_indices(w, n_kept(len(w), ratio), criterion)
    else:
        kept_t = torch.as_tensor(kept, dtype=torch.long).unique()  # sorted, once each
        if len(kept_t) == 0 or int(kept_t.min()) < 0 or int(kept_t.max()) >= len(w):
            raise MergeError(f"kept={list(map(int, kept))[:8]}... is not allowed for {chain.layer!r}; expected "
                             f"between 1 and {len(w)} indices in [0, {len(w) - 1}]")
    if method == "prune":
        a = prune_only(len(w), kept_t)
    elif bn is None:
        a = assign(w, kept_t, threshold, s_ratio)
    else:
        a = assign_bn(w, kept_t, **bn_stats(layer, bn), threshold=threshold, lam=lam, bn_scale=bn_scale,
                      s_ratio=s_ratio)
    return Plan(chain, a)


def _replaced(plans: Sequence[Plan], modules: dict) -> list[torch.Tensor]:
    """The tensors :func:`apply` replaces (so a copy need not duplicate them first)."""
    out = []
    for pl in plans:
        c = pl.chain
        out += [modules[c.layer].weight, modules[c.layer].bias, modules[c.next].weight]
        if c.bn is not None:
            bn = modules[c.bn]
            out += [bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return [t for t in out if t is not None]


_PLAIN = (int, float, bool, str, type(None))


def _plain_module(cls: type) -> bool:
    """Whether instances of ``cls`` copy like a plain nn.Module (no copy protocol of their own)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ is nn.Module.__setstate__ and getattr(cls, "__reduce__") is object.__reduce__)


def _copy(module: nn.Module, skip: set[int], memo: dict) -> nn.Module:
    """A deep copy of ``module`` that clones its tensors but shares those whose id is in ``skip`` (to be
    replaced, never written in place), without ``copy.deepcopy``'s per-attribute overhead on the rest.
    ``memo`` maps id(original) to its copy, for modules as for tensors. A module class with a copy protocol
    of its own (a GraphModule, say) is deep-copied the usual way."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain_module(cls):
        return copy.deepcopy(module, memo)
    new = memo[id(module)] = cls.__new__(cls)
    d = {}
    for key, value in module.__dict__.items():
        if key == "_parameters":
            d[key] = type(value)((k, p if p is None or id(p) in skip else copy.deepcopy(p, memo))
                                 for k, p in value.items())
        elif key == "_buffers":
            d[key] = type(value)((k, b if b is None or id(b) in skip else b.clone()) for k, b in value.items())
        elif key == "_modules":
            d[key] = type(value)((k, None if m is None else _copy(m, skip, memo)) for k, m in value.items())
        elif isinstance(value, _PLAIN):
            d[key] = value
        elif isinstance(value, (dict, set, list)) and not value:  # the many empty hook registries
            d[key] = type(value)()
        else:
            d[key] = copy.deepcopy(value, memo)
    object.__setattr__(new, "__dict__", d)
    return new


def _keep_rows(module: nn.Module, kept: torch.Tensor, names: Sequence[str]) -> None:
    """Keep the rows ``kept`` of each named parameter or buffer of ``module`` (a new tensor each)."""
    for name in names:
        store = module._parameters if name in module._parameters else module._buffers
        t = store[name]
        if t is not None:
            rows = t.detach().index_select(0, kept)
            store[name] = nn.Parameter(rows, t.requires_grad) if isinstance(t, nn.Parameter) else rows


def apply(model: nn.Module, plans: Sequence[Plan]) -> nn.Module:
    """A copy of ``model`` (in eval mode) with each plan applied: the layer (and BN) keep P neurons, the next
    layer becomes Z_i W_{i+1}. The tensors that plans replace are not copied first. Plans commute."""
    modules, memo = dict(model.named_modules()), {}
    model = _copy(model, {id(t) for t in _replaced(plans, modules)}, memo).eval()
    modules = {name: memo[id(m)] for name, m in modules.items()}
    for pl in plans:
        layer, nxt = modules[pl.chain.layer], modules[pl.chain.next]
        kept = pl.kept
        _keep_rows(layer, kept, ("weight", "bias"))
        layer.__dict__["out_channels" if isinstance(layer, nn.Conv2d) else "out_features"] = len(kept)
        if pl.chain.bn is not None:
            bn = modules[pl.chain.bn]
            _keep_rows(bn, kept, ("weight", "bias", "running_mean", "running_var"))
            bn.__dict__["num_features"] = len(kept)
        w = nxt._parameters["weight"]
        nxt._parameters["weight"] = nn.Parameter(fold(w, pl.assignment), w.requires_grad)
        nxt.__dict__["in_channels" if isinstance(nxt, nn.Conv2d) else "in_features"] = nxt.weight.shape[1]
    return model


def _ratios(chains: Sequence[Chain], ratio: float | Mapping[str, float]) -> dict[str, float]:
    if not chains:
        raise MergeError("chains=[] is not allowed; find them with merging.find_chains or name them with Chain")
    if len({c.layer for c in chains}) != len(chains):
        raise MergeError("chains name the same layer twice; each layer is pruned by one chain")
    ratios = dict(ratio) if isinstance(ratio, Mapping) else {c.layer: ratio for c in chains}
    unknown = sorted(set(ratios) - {c.layer for c in chains})
    if unknown:
        raise MergeError(f"ratio names {unknown}, which head no chain; chains: {[c.layer for c in chains]}")
    return ratios


def merge(model: nn.Module, chains: Sequence[Chain], ratio: float | Mapping[str, float], *,
          method: str = "merge", criterion: str = "l1", threshold: float | None = None, lam: float = 0.85,
          bn_scale: str = "reference", s_ratio: str = "pruned/kept",
          example: torch.Tensor | None = None) -> tuple[nn.Module, list[Plan]]:
    """Merge (or, with ``method="prune"``, only prune) every chain at ``ratio`` (one float, or a ratio per
    chain's layer name; a layer not named is left as it is). The chains are checked against the model's
    survey (cached; ``example`` is needed only where torch.fx cannot trace the model). Every Z_i is
    computed from the original weights, as the reference code does. Returns the new model and the plans."""
    ratios = _ratios(chains, ratio)
    check_chains(model, chains, example)
    modules = dict(model.named_modules())
    plans = [plan(model, c, ratios[c.layer], method, criterion, threshold, lam, bn_scale, s_ratio, modules=modules)
             for c in chains if ratios.get(c.layer, 0.0) > 0]
    return apply(model, plans), plans


def merge_kept(model: nn.Module, layer: str, kept: Sequence[int] | torch.Tensor, example: torch.Tensor, *,
               method: str = "merge", threshold: float | None = None, lam: float = 0.85,
               bn_scale: str = "reference") -> tuple[nn.Module, Plan]:
    """Prune ``layer`` to the neurons ``kept`` (chosen by any criterion) and, with ``method="merge"``,
    merge each pruned neuron into its most similar kept one: "prune + merge" after any ranking. The
    chain that ``layer`` heads is found in the model's survey; a layer that heads none raises."""
    rows = {r["layer"]: r for r in _cached_survey(model, example)}
    r = rows.get(layer)
    if r is None or r["chain"] is None:
        reason = r["reason"] if r is not None and r["reason"] else "it heads no merge-able chain"
        raise MergeError(f"layer={layer!r} cannot be merged: {reason}; merge-able layers: "
                         f"{[k for k, v in rows.items() if v['chain'] is not None]}")
    pl = plan(model, r["chain"], None, method, threshold=threshold, lam=lam, bn_scale=bn_scale, kept=kept)
    return apply(model, [pl]), pl


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
        w = rows_of(layer, bn).double()
        kept = keep_indices(w, n_kept(len(w), ratio), criterion)
        pruned = _complement(len(w), kept)
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


# ----------------------------------------------------------------------------------------------------
# Chapter 4: the experiments, as functions that return small results (numbers, tables, figures)
# ----------------------------------------------------------------------------------------------------

LENET_RECIPES = ("baseline", "paper")
VARIANTS = {"prune": {"method": "prune"}, "merge, reference BN scale": {},
            "merge, exact BN scale": {"bn_scale": "exact"},
            "merge, reference BN scale, s reversed": {"s_ratio": "kept/pruned"}}


def paper_config(epochs: int | None = None) -> TrainConfig:
    """The LeNet-300-100 recipe of the reference code and the report's summary (reference.py): plain SGD
    with momentum, a step schedule (x0.1 every ``step_every`` epochs); inputs in [-1, 1] (:func:`signed`)."""
    from . import reference

    r = reference.NEURON_MERGING["lenet300100_paper_recipe"]
    epochs = r["epochs"] if epochs is None else epochs
    return TrainConfig(epochs=epochs, batch_size=r["batch_size"], lr=r["lr"], momentum=r["momentum"],
                       nesterov=False, weight_decay=r["weight_decay"], schedule="step",
                       milestones=tuple(range(r["step_every"], epochs, r["step_every"])), threads=1)


def signed(split):
    """A split with its images mapped from [0, 1] to [-1, 1], as the reference code normalises them."""
    from .data import Split

    return Split(split.x * 2.0 - 1.0, split.y, split.classes, split.name)


def paper_lenet(seed: int, *, epochs: int | None = None, train_subset: int | None = None, device: str = "auto",
                download: bool = False, progress: bool = True, directory=None) -> tuple[nn.Module, dict]:
    """LeNet-300-100 trained with :func:`paper_config` on Fashion-MNIST in [-1, 1], from the checkpoint
    cache or trained there (keyed like ``train.train_cached``: recipe, input range, seed, code). The book's
    Recipe has no input transform, so this is the one model the chapter trains outside ``train_cached``."""
    import hashlib
    import json
    from dataclasses import asdict
    from pathlib import Path

    from . import data, train

    cfg = paper_config(epochs)
    text = json.dumps({"model": "lenet300100", "dataset": "fashion-mnist", "inputs": [-1, 1],
                       "config": asdict(cfg), "train_subset": train_subset, "seed": seed,
                       "code": train.code_version()}, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    folder = Path(directory) if directory is not None else train.cache_dir()
    path = folder / f"lenet300100-paper-fashion-mnist-{key}.pt"
    train.seed_everything(seed)
    model = models.LeNet300100()
    with train.cache_lock(path):
        ckpt = train.load_checkpoint(path, key, ("state_dict", "record"))
        if ckpt is not None:
            model.load_state_dict(ckpt["state_dict"])
            return model.eval(), {**ckpt["record"], "cached": True}
        train.ensure_writable(folder)
        tr = signed(data.load("fashion-mnist", "train", download=download, seed=seed).subset(train_subset, seed))
        te = signed(data.load("fashion-mnist", "test", download=download, seed=seed))
        history = train.fit(model, tr, te, cfg, seed=seed, device=device, progress=progress,
                            desc="LeNet-300-100, the paper's recipe")
        record = {"history": history, "test_acc": history["test_acc"][-1], "n_train": len(tr), "n_test": len(te)}
        train.save_checkpoint({"key": key, "state_dict": model.state_dict(), "record": record}, path)
    return model.eval(), {**record, "cached": False}


def merged(model: nn.Module, chains, ratio, **kw) -> tuple[nn.Module, list]:
    """:func:`merge` on one thread: its products are small, and two threads only add overhead."""
    from . import runtime

    with runtime.threads(1):
        return merge(model, chains, ratio, **kw)


def correct(model: nn.Module, split, device="cpu", batch: int = 10000) -> "np.ndarray":
    """Per test image, whether ``model`` classifies it right (bool array); images in large batches, conv
    nets in channels_last (both several times faster on CPU than small contiguous batches)."""
    return Evaluator(model, split, [], device, batch).correct(model)


class _Fixed(nn.Module):
    """A module that returns a fixed tensor whatever its input: a layer's output computed beforehand."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out


class Evaluator:
    """Which images of ``split`` a network derived from ``model`` by merging ``chains`` classifies right.

    Merging keeps some rows of each chain's first layer and changes nothing else in it; the first chain's
    layer takes no Z in (no chain leads into it). So its output on the images is computed once, from
    ``model``, and a merged network takes the channels it kept (the same numbers, up to float rounding),
    instead of recomputing the layer that costs most (LeNet-300-100's 784 inputs). Images go through in
    batches of ``batch``, conv nets in channels_last."""

    def __init__(self, model: nn.Module, split, chains, device="cpu", batch: int = 10000):
        self.split, self.device, self.batch = split, device, batch
        self.fmt = torch.channels_last if split.x.ndim == 4 else torch.contiguous_format
        nexts = {c.next for c in chains}
        self.layer = next((c.layer for c in chains if c.layer not in nexts), None)
        self.cached = None
        if self.layer is not None and len(split) <= batch:
            seen = {}
            hook = dict(model.named_modules())[self.layer].register_forward_hook(
                lambda m, i, o: seen.setdefault("out", o.detach()))
            try:
                self.base = self.correct(model)
            finally:
                hook.remove()
            self.cached = seen["out"]

    def _predict(self, model: nn.Module) -> torch.Tensor:
        if self.fmt is torch.channels_last:
            model = copy.deepcopy(model).to(memory_format=self.fmt)
        model = model.eval().to(self.device)
        x = self.split.x
        with torch.no_grad():
            return torch.cat([model(x[i:i + self.batch].to(self.device, memory_format=self.fmt)).argmax(1).cpu()
                              for i in range(0, len(x), self.batch)])

    def correct(self, model: nn.Module, plans=()) -> "np.ndarray":
        """Per image, right or wrong; ``plans`` (those that made ``model``) say which channels of the first
        chain's layer it kept."""
        if self.cached is None or model is None:
            return (self._predict(model) == self.split.y).numpy()
        kept = next((p.kept for p in plans if p.chain.layer == self.layer), None)
        out = self.cached if kept is None else self.cached.index_select(1, kept)
        parent_name, _, child = self.layer.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        original = parent._modules[child]
        parent._modules[child] = _Fixed(out)
        try:
            return (self._predict(model) == self.split.y).numpy()
        finally:
            parent._modules[child] = original


@dataclass
class LenetRun:
    """One trained LeNet-300-100 (one training seed): the model, its test split (in the model's input
    range), its merge-able chains and unpruned accuracy."""

    seed: int
    model: nn.Module
    test: object
    chains: list
    accuracy: float
    n_train: int
    epochs: int
    evaluator: Evaluator

    def accuracy_of(self, merged: nn.Module, plans) -> float:
        """Test accuracy of a network merged from this run's model by ``plans``."""
        return float(self.evaluator.correct(merged, plans).mean())


@dataclass
class Lenets:
    """The chapter's LeNet-300-100 runs, one per training seed."""

    runs: list
    recipe: str

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __getitem__(self, i):
        return self.runs[i]

    def survey(self):
        """The survey of the first run's network (every run has the same layers)."""
        return survey_table(survey(self.runs[0].model, self.runs[0].test.x[:1]))

    def numbers(self) -> dict:
        r0 = self.runs[0]
        return {"lenet_recipe": self.recipe, "lenet_epochs": r0.epochs, "n_train_lenet": f"{r0.n_train:,}",
                "n_test": f"{len(r0.test):,}", "n_chains_lenet": len(r0.chains), "n_runs": len(self.runs)}


def lenet_runs(P) -> Lenets:
    """LeNet-300-100 at every seed of ``P.seeds``: chapter 0's baseline recipe (``baselines.get``) or, with
    ``P.lenet_recipe == "paper"``, the reference's recipe (:func:`paper_lenet`)."""
    from . import train

    check_choice("lenet_recipe", P.lenet_recipe, LENET_RECIPES)
    runs = []
    for seed in P.seeds:
        if P.lenet_recipe == "baseline":
            b = baselines.get("lenet300100", P, seed)
            model, test, record, epochs = b.model, b.test, b.record, b.recipe.config.epochs
        else:
            from . import data

            model, record = paper_lenet(seed, device=P.device, download=P.download)
            test = signed(data.load("fashion-mnist", "test", download=P.download, seed=seed))
            epochs = paper_config().epochs
            train.check_trained(float(record["test_acc"]), len(test.classes), f"LeNet-300-100 (seed {seed})")
        chains = find_chains(model, test.x[:1])
        ev = Evaluator(model, test, chains, train.get_device(P.device))
        runs.append(LenetRun(seed, model, test, chains, float(ev.base.mean()), int(record["n_train"]), epochs, ev))
    return Lenets(runs, P.lenet_recipe)


def survey_table(rows: list[dict]):
    """The survey as a table (a Styler, so each reason shows whole)."""
    import pandas as pd

    def chain_text(c):
        return " -> ".join(x.split(".")[-1] for x in (c.layer, c.bn, c.act, c.next) if x) if c else ""

    df = pd.DataFrame([{**r, "chain": chain_text(r["chain"]), "shape": str(r["shape"])} for r in rows])
    return df.set_index("layer").style.set_properties(**{"text-align": "left", "white-space": "normal"})


def _ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval (NaN for one value)."""
    from .claims import Estimate

    e = Estimate.over_seeds(list(values))
    return e.mean, (e.hi - e.lo) / 2 if e.has_interval else float("nan")


def _signed(e) -> str:
    """An estimate of a difference as '+0.0123 ± 0.0045 (n = 5)'."""
    if not e.has_interval:
        return f"{e.mean:+.4f} (n = {e.n})"
    return f"{e.mean:+.4f} ± {(e.hi - e.lo) / 2:.4f} (n = {e.n})"


def _pm(values, fmt: str = ".4f") -> str:
    """'mean ± half-width' of the 95% interval over seeds (the mean alone from one seed)."""
    mean, half = _ci(values)
    return f"{mean:{fmt}}" + (f" ± {half:{fmt.lstrip('+')}}" if half == half else "")


@dataclass
class Table1:
    """Kim et al.'s Table 1 over training seeds: accuracy of every (seed, criterion, ratio, method) without
    fine-tuning, with the counts of merged and dropped neurons."""

    rows: "pd.DataFrame"
    base: dict
    criteria: list
    ratios: list
    fc_threshold: float

    def values(self, criterion: str, ratio: float, method: str) -> list[float]:
        r = self.rows
        sel = r[(r.criterion == criterion) & (r.ratio == ratio) & (r.method == method)].sort_values("seed")
        return sel["accuracy"].tolist()

    def gain(self, criterion: str, ratio: float):
        """Merge minus prune accuracy, paired by seed (the same kept neurons, the same test images)."""
        from .claims import Estimate

        return Estimate.paired(self.values(criterion, ratio, "merge"), self.values(criterion, ratio, "prune"))

    def table(self):
        """Mean ± 95% interval over seeds per cell, the paper's ℓ1 numbers beside them."""
        import pandas as pd

        from . import reference

        paper = reference.NEURON_MERGING["lenet300100_l1"]
        cols = {}
        for c in self.criteria:
            for m in ("prune", "merge"):
                cols[(c, m)] = [_pm(self.values(c, r, m)) for r in self.ratios]
        for m in ("prune", "merge"):
            cols[("paper (l1)", m)] = [f"{paper[r][m]:.4f}" if r in paper else "–" for r in self.ratios]
        df = pd.DataFrame(cols, index=pd.Index([f"{r:g}" for r in self.ratios], name="pruning ratio"))
        return df.style.set_caption(f"test accuracy, mean ± 95% interval over {len(self.base)} training seeds")

    def counts(self, criterion: str):
        """Per ratio: pruned, merged and dropped neurons (both hidden layers; mean over seeds), parameters."""
        r = self.rows
        sel = r[(r.criterion == criterion) & (r.method == "merge")]
        out = sel.groupby("ratio")[["merged", "dropped", "params"]].mean()
        out.insert(0, "pruned neurons", out["merged"] + out["dropped"])
        out.index = [f"{r:g}" for r in out.index]
        return out.rename_axis("pruning ratio").style.format("{:,.1f}", subset=["merged", "dropped"]) \
            .format("{:,.0f}", subset=["pruned neurons", "params"])

    def figure(self):
        """Fig.: accuracy against the ratio, one panel per criterion, one mark per seed, the mean as a line;
        the paper's ℓ1 numbers as crosses."""
        from . import plots, reference

        paper = reference.NEURON_MERGING["lenet300100_l1"]
        fig, axes = plots.panel_grid(len(self.criteria), panel_size=(3.8, 3.2), sharey=True)
        colours = {"prune": "tab:blue", "merge": "tab:orange"}
        for ax, c in zip(axes, self.criteria):
            for m, shift in (("prune", -0.007), ("merge", 0.007)):
                for r in self.ratios:
                    v = self.values(c, r, m)
                    ax.plot([r + shift] * len(v), v, "o", ms=3, alpha=0.5, color=colours[m])
                ax.plot(self.ratios, [_ci(self.values(c, r, m))[0] for r in self.ratios], "-", color=colours[m],
                        label=f"{m} (mean; dots: seeds)")
                if c == "l1":
                    rs = [r for r in self.ratios if r in paper]
                    ax.plot(rs, [paper[r][m] for r in rs], "x:", color=colours[m], alpha=0.7, label=f"paper, {m}")
            ax.set_title(f"criterion {c}")
        plots.label_grid(axes, "pruning ratio (share of hidden neurons removed)", "test accuracy (fraction)")
        return fig

    def numbers(self) -> dict:
        from . import reference

        paper = reference.NEURON_MERGING["lenet300100_l1"]
        c0 = "l1" if "l1" in self.criteria else self.criteria[0]
        lo, hi = min(self.ratios), max(self.ratios)
        gains = {r: self.gain(c0, r) for r in self.ratios}
        counts = self.rows[(self.rows.criterion == c0) & (self.rows.method == "merge") & (self.rows.ratio == hi)]
        nan = float("nan")
        return {"c0": c0, "r_min": lo, "r_max": hi, "n_seeds": len(self.base),
                "base_mean": _ci(self.base.values())[0], "base_text": _pm(self.base.values()),
                "gain_min": gains[lo].mean, "gain_max": gains[hi].mean,
                "paper_gain_min": paper[lo]["merge"] - paper[lo]["prune"] if lo in paper else nan,
                "paper_gain_max": paper[hi]["merge"] - paper[hi]["prune"] if hi in paper else nan,
                "merge_at_max": _pm(self.values(c0, hi, "merge")), "prune_at_max": _pm(self.values(c0, hi, "prune")),
                "paper_merge_at_max": paper.get(hi, {"merge": nan})["merge"],
                "paper_prune_at_max": paper.get(hi, {"prune": nan})["prune"],
                "merge_spread_at_max": float(max(self.values(c0, hi, "merge")) - min(self.values(c0, hi, "merge"))),
                "dropped_at_max": float(counts["dropped"].mean()),
                "pruned_at_max": float((counts["merged"] + counts["dropped"]).mean()),
                "fc_threshold": self.fc_threshold, "fig_lenet": self.figure()}


def table1(runs: list[LenetRun], P, device="cpu") -> Table1:
    """Prune and merge every run at every ratio with every criterion (both hidden layers, threshold
    ``P.fc_threshold``), no fine-tuning; evaluate on the full test split."""
    import pandas as pd

    rows = []
    for run in runs:
        for c in P.criteria:
            for r in P.ratios:
                for m in ("prune", "merge"):
                    net, plans = merged(run.model, run.chains, r, method=m, criterion=c, threshold=P.fc_threshold)
                    rows.append({"seed": run.seed, "criterion": c, "ratio": r, "method": m,
                                 "accuracy": run.accuracy_of(net, plans),
                                 "merged": sum(p.merged for p in plans), "dropped": sum(p.dropped for p in plans),
                                 "params": models.count_parameters(net)})
    return Table1(pd.DataFrame(rows), {run.seed: run.accuracy for run in runs}, list(P.criteria), list(P.ratios),
                  P.fc_threshold)


@dataclass
class LenetChecks:
    """The report's checks on LeNet-300-100, over seeds: the direction of s, and the threshold sweep."""

    reversed_rows: "pd.DataFrame"  # seed, ratio, s as in the paper, s reversed
    sweep: "pd.DataFrame"  # seed, ratio, threshold, accuracy
    at_threshold: "pd.DataFrame"  # seed, ratio, accuracy at the chapter's threshold
    fc_threshold: float
    criterion: str

    def reversed_estimate(self):
        """s reversed minus s as in the paper, mean over ratios, paired by seed."""
        from .claims import Estimate

        per_seed = self.reversed_rows.groupby("seed")[["reversed", "paper"]].mean()
        return Estimate.paired(per_seed["reversed"], per_seed["paper"])

    def reversed_table(self):
        import pandas as pd

        g = self.reversed_rows.groupby("ratio")
        return pd.DataFrame({"s = |w_n| / |w_k| (paper)": g["paper"].apply(_pm),
                             "s reversed": g["reversed"].apply(_pm),
                             "reversed minus paper": g.apply(lambda d: _pm(d["reversed"] - d["paper"], "+.4f"),
                                                             include_groups=False)}).rename_axis("pruning ratio")

    def best_thresholds(self) -> dict:
        """Per ratio, the threshold of the sweep with the highest mean accuracy over seeds."""
        mean = self.sweep.groupby(["ratio", "threshold"])["accuracy"].mean()
        return {r: float(mean[r].idxmax()) for r in sorted(self.sweep.ratio.unique())}

    def shortfall_estimate(self):
        """Accuracy at the best threshold of the sweep minus at the chapter's, mean over ratios, paired by
        seed (the best threshold is chosen on the same test images, which favours it)."""
        from .claims import Estimate

        best = self.best_thresholds()
        s = self.sweep
        at_best = s[[best[r] == t for r, t in zip(s.ratio, s.threshold)]].groupby("seed")["accuracy"].mean()
        at_ours = self.at_threshold.groupby("seed")["accuracy"].mean()
        return Estimate.paired(at_best.sort_index(), at_ours.sort_index())

    def threshold_table(self):
        import pandas as pd

        best = self.best_thresholds()
        rows = {}
        for r, t in best.items():
            at_best = self.sweep[(self.sweep.ratio == r) & (self.sweep.threshold == t)].sort_values("seed")
            at_ours = self.at_threshold[self.at_threshold.ratio == r].sort_values("seed")
            rows[f"{r:g}"] = {"best threshold": f"{t:g}", "its accuracy": _pm(at_best["accuracy"]),
                              f"accuracy at {self.fc_threshold:g}": _pm(at_ours["accuracy"]),
                              "shortfall": _pm(at_best["accuracy"].values - at_ours["accuracy"].values, "+.4f")}
        return pd.DataFrame(rows).T.rename_axis("pruning ratio")

    def figure(self):
        """Merged accuracy against the threshold, one line per ratio (mean; band: 95% interval over seeds)."""
        from . import plots

        fig, (ax,) = plots.panel_grid(1, panel_size=(6.0, 3.6))
        for r, g in self.sweep.groupby("ratio"):
            ts = sorted(g.threshold.unique())
            stats = [_ci(g[g.threshold == t]["accuracy"]) for t in ts]
            mean = [m for m, _ in stats]
            half = [h if h == h else 0.0 for _, h in stats]
            line, = ax.plot(ts, mean, "o-", ms=3, label=f"ratio {r:g}")
            ax.fill_between(ts, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                            color=line.get_color(), alpha=0.2)
        ax.axvline(self.fc_threshold, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"LeNet-300-100, criterion {self.criterion}")
        plots.label_grid([ax], "cosine-similarity threshold (0: never drop)", "test accuracy (fraction)")
        return fig

    def numbers(self) -> dict:
        rev = self.reversed_estimate()
        short = self.shortfall_estimate()
        return {"rev_lenet": rev.mean, "rev_lenet_text": _signed(rev), "thr_shortfall": short.mean,
                "thr_shortfall_text": short.text(".4f"),
                "thr_best_list": ", ".join(f"{t:g}" for t in self.best_thresholds().values()),
                "fig_threshold": self.figure()}


def lenet_checks(runs: list[LenetRun], table: Table1, P, device="cpu") -> LenetChecks:
    """Reverse s, and sweep the threshold, for every run at every ratio (criterion ℓ1, or the first)."""
    import pandas as pd

    c0 = "l1" if "l1" in P.criteria else P.criteria[0]
    rev, sweep = [], []
    for run in runs:
        for r in P.ratios:
            paper_s = table.rows.query("seed == @run.seed and criterion == @c0 and ratio == @r and method == 'merge'")
            net, plans = merged(run.model, run.chains, r, criterion=c0, threshold=P.fc_threshold,
                                s_ratio="kept/pruned")
            rev.append({"seed": run.seed, "ratio": r, "paper": float(paper_s["accuracy"].iloc[0]),
                        "reversed": run.accuracy_of(net, plans)})
            for t in P.threshold_sweep:
                net, plans = merged(run.model, run.chains, r, criterion=c0, threshold=t)
                sweep.append({"seed": run.seed, "ratio": r, "threshold": t, "accuracy": run.accuracy_of(net, plans)})
    rows = table.rows
    at = rows[(rows.criterion == c0) & (rows.method == "merge")][["seed", "ratio", "accuracy"]]
    return LenetChecks(pd.DataFrame(rev), pd.DataFrame(sweep), at.reset_index(drop=True), P.fc_threshold, c0)


@dataclass
class ConvStudy:
    """The convolutional case (Algorithm 3) on one trained BN network: pruning against merging with either
    BN scale and with s reversed, at every ratio, and the λ sweep; per-image correctness for paired
    comparisons (the seeds cannot retrain this network within the budget: only the test images vary)."""

    name: str
    data_name: str
    model: nn.Module
    eval_split: object
    chains: list
    survey: list
    base_correct: "np.ndarray"
    epochs: int
    correct: dict  # (ratio label, variant) -> bool array
    params: dict  # (ratio label, variant) -> parameter count
    lam_correct: dict  # (lambda, bn scale) -> bool array, and "prune" at the λ-sweep ratio
    ratios: list
    lam: float
    lam_ratio: float
    threshold: float

    def accuracy(self, key) -> float:
        return float(self.correct[key].mean())

    def gain(self, label: str, variant: str = "merge, reference BN scale"):
        """Accuracy of ``variant`` minus pruning, paired over the test images."""
        from .claims import Estimate

        return Estimate.paired_images(self.correct[(label, variant)], self.correct[(label, "prune")])

    def reversed_estimate(self):
        """s reversed minus s as in the paper (reference BN scale), over the ratios, paired over images."""
        from .claims import Estimate

        labels = [f"{r:g}" for r in self.ratios]
        rev = np.stack([self.correct[(lb, "merge, reference BN scale, s reversed")] for lb in labels])
        ours = np.stack([self.correct[(lb, "merge, reference BN scale")] for lb in labels])
        return Estimate.paired_images(rev, ours)

    def lam_best(self, bn_scale: str = "reference") -> float:
        accs = {k[0]: float(c.mean()) for k, c in self.lam_correct.items() if k != "prune" and k[1] == bn_scale}
        return max(accs, key=accs.get)

    def lam_estimate(self):
        """Accuracy at the sweep's best λ minus at the chapter's λ (reference BN scale), paired over images."""
        from .claims import Estimate

        return Estimate.paired_images(self.lam_correct[(self.lam_best(), "reference")],
                                      self.lam_correct[(self.lam, "reference")])

    def table(self):
        import pandas as pd

        labels = list(dict.fromkeys(lb for lb, _ in self.correct))
        df = pd.DataFrame({v: [self.accuracy((lb, v)) for lb in labels] for v in VARIANTS},
                          index=pd.Index(labels, name="pruning ratio"))
        df.insert(0, "parameters", [self.params[(lb, "prune")] for lb in labels])
        return df.style.format("{:.4f}", subset=list(VARIANTS)).format("{:,}", subset=["parameters"])

    def lam_table(self):
        import pandas as pd

        lams = sorted({k[0] for k in self.lam_correct if k != "prune"})
        return pd.DataFrame({f"{b} BN scale": [float(self.lam_correct[(lam, b)].mean()) for lam in lams]
                             for b in BN_SCALES}, index=pd.Index([f"{lam:g}" for lam in lams], name="lambda")) \
            .style.format("{:.4f}")

    def figure(self):
        from . import plots

        labels = [f"{r:g}" for r in self.ratios]
        lines = {"unpruned": ([min(self.ratios), max(self.ratios)], [float(self.base_correct.mean())] * 2,
                              {"linestyle": "--", "color": "gray"})}
        for v, colour in zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
            lines[v] = (list(self.ratios), [self.accuracy((lb, v)) for lb in labels], {"marker": "o", "color": colour})
        return plots.curves_grid({f"{self.name}, {self.data_name}": lines},
                                 "pruning ratio (share of each merged conv layer's filters)",
                                 "test accuracy (fraction)", panel_size=(6.5, 3.8))

    def lam_figure(self):
        from . import plots

        lams = sorted({k[0] for k in self.lam_correct if k != "prune"})
        lines = {f"{b} BN scale": (lams, [float(self.lam_correct[(lam, b)].mean()) for lam in lams])
                 for b in BN_SCALES}
        prune = float(self.lam_correct["prune"].mean())
        lines["prune"] = ([min(lams), max(lams)], [prune, prune], {"linestyle": "--", "color": "gray"})
        return plots.curves_grid({f"{self.name}, ratio {self.lam_ratio:g}": lines},
                                 "lambda (weight of the cosine term)", "test accuracy (fraction)",
                                 panel_size=(6.0, 3.6))

    def numbers(self) -> dict:
        labels = [f"{r:g}" for r in self.ratios]
        gains = [self.gain(lb).mean for lb in labels]
        exact = [self.gain(lb, "merge, exact BN scale").mean - g for lb, g in zip(labels, gains)]
        base = float(self.base_correct.mean())
        return {"conv_name": self.name, "conv_data": self.data_name, "conv_base": base, "conv_epochs": self.epochs,
                "n_conv_chains": len(self.chains), "n_conv_layers": len(self.survey),
                "conv_n_images": len(self.base_correct), "conv_gain_mean": float(np.mean(gains)),
                "conv_exact_minus_ref": float(np.mean(exact)), "rev_conv": self.reversed_estimate().mean,
                "conv_threshold": self.threshold, "lam_value": self.lam, "lam_ratio": self.lam_ratio,
                "lam_best_ref": self.lam_best("reference"), "lam_best_exact": self.lam_best("exact"),
                "lam_shortfall": self.lam_estimate().mean,
                "conv_se": (max(base, 0.1) * (1 - max(base, 0.1)) / len(self.base_correct)) ** 0.5,  # binomial
                "fig_conv": self.figure(), "fig_lam": self.lam_figure()}


def conv_network(P):
    """The BN network of the convolutional case: chapter 0's ResNet-20, or (``conv_model="vgg16"``) a
    VGG-16 trained with the reference's CIFAR-10 recipe; returns (name, model, record, test split)."""
    from . import data, train

    if P.conv_model == "resnet20":
        b = baselines.get("resnet20", P, dataset=P.conv_dataset)
        return "ResNet-20", b.model, b.record, b.test
    epochs = P.vgg_epochs
    cfg = TrainConfig(epochs=epochs, batch_size=128, lr=0.1, weight_decay=5e-4, nesterov=False, schedule="step",
                      milestones=(epochs // 2, 3 * epochs // 4), augment=True, channels_last=True, threads=P.threads)
    recipe = vgg_recipe(P.conv_dataset or "cifar10", cfg, train_subset=P.vgg_train_images)
    model, record = train.train_cached(recipe, P.seed, device=P.device, download=P.download)
    test = data.load(recipe.dataset, "test", pad=recipe.pad, download=P.download, seed=P.seed)
    train.check_trained(float(record["test_acc"]), len(test.classes), f"VGG-16 on {recipe.dataset}")
    return "VGG-16", model, record, test


def conv_study(P, device="cpu") -> ConvStudy:
    """Prune and merge the branch-free conv chains of the BN network at every ``P.conv_ratios`` (and, for
    VGG-16, the reference's per-layer widths) with every variant; sweep λ at ``P.lam_sweep_ratio``."""
    name, net, record, test = conv_network(P)
    ev = test.subset(P.conv_eval_images, P.seed)
    example = ev.x[:1]
    modules = dict(net.named_modules())
    chains = [c for c in find_chains(net, example, on_problem="skip") if isinstance(modules[c.layer], nn.Conv2d)]
    settings = [(r, f"{r:g}") for r in P.conv_ratios]
    if name == "VGG-16":
        settings.append((vgg16_reference_ratios(net), "reference widths"))
    evaluator = Evaluator(net, ev, chains, device, batch=len(ev))
    done: dict = {}

    def run(ratio, **kw):  # each distinct merge evaluated once (the λ sweep repeats some of the table's)
        kw = {"method": "merge", "bn_scale": "reference", "s_ratio": "pruned/kept", "lam": P.lam, **kw}
        key = (repr(ratio), tuple(sorted(kw.items())))
        if key not in done:
            m, plans = merged(net, chains, ratio, threshold=P.conv_threshold, **kw)
            done[key] = (evaluator.correct(m, plans), models.count_parameters(m))
        return done[key]

    cor, params = {}, {}
    for r, label in settings:
        for v, kw in VARIANTS.items():
            cor[(label, v)], params[(label, v)] = run(r, **kw)
    lam_cor = {"prune": run(P.lam_sweep_ratio, method="prune")[0]}
    for lam in sorted(set(P.lam_sweep) | {P.lam}):
        for b in BN_SCALES:
            lam_cor[(lam, b)] = run(P.lam_sweep_ratio, lam=lam, bn_scale=b)[0]
    return ConvStudy(name, f"{test.name}, {len(ev):,} test images", net, ev, chains, survey(net, example),
                     evaluator.base, len(record["history"]["epoch"]), cor, params, lam_cor,
                     list(P.conv_ratios), P.lam, P.lam_sweep_ratio, P.conv_threshold)


@dataclass
class Planted:
    """Theorem 1's exact case, planted: every pruned neuron a positive multiple of a kept one. The largest
    change of the outputs after merging (per plant seed), on 200 test images (the conv net: 64)."""

    fc: dict  # seed -> {"merge": err, "prune": err, "scale": max |output|}
    conv: dict  # seed -> {variant: err, "scale": max |output|}
    conv_name: str

    def estimate(self, which: str):
        from .claims import Estimate

        if which == "fc":
            return Estimate.over_seeds([v["merge"] for v in self.fc.values()])
        return Estimate.over_seeds([v[which] for v in self.conv.values()])

    def table(self):
        import pandas as pd

        rows = {"LeNet-300-100, merge": [v["merge"] for v in self.fc.values()],
                "LeNet-300-100, prune": [v["prune"] for v in self.fc.values()],
                "LeNet-300-100, largest |output|": [v["scale"] for v in self.fc.values()]}
        for k in ("merge, exact BN scale", "merge, reference BN scale", "prune", "scale"):
            label = "largest |output|" if k == "scale" else k
            rows[f"{self.conv_name}, {label}"] = [v[k] for v in self.conv.values()]
        df = pd.DataFrame({k: {"mean": np.mean(v), "largest": np.max(v)} for k, v in rows.items()}).T
        return df.rename_axis(f"largest |output change| (200 test images; conv: 64), {len(self.fc)} plant seeds") \
            .style.format("{:.2e}")

    def numbers(self) -> dict:
        mean = {k: float(np.mean([v[k] for v in self.conv.values()])) for k in next(iter(self.conv.values()))}
        ref = mean["merge, reference BN scale"]
        return {"planted_fc_err": float(np.max([v["merge"] for v in self.fc.values()])),
                "planted_exact_err": float(np.max([v["merge, exact BN scale"] for v in self.conv.values()])),
                "planted_ref_err": ref, "planted_prune_err": mean["prune"], "planted_conv_scale": mean["scale"],
                "ref_exact_verdict": "is therefore not exact" if ref > 1e-3 else "is exact here too"}


def _planned(model: nn.Module, chains, ratio: float, **kw) -> nn.Module:
    """Plan and apply ``chains`` at ``ratio`` without surveying ``model`` again: for a copy of a network
    whose chains were found and checked already (its planted twin)."""
    from . import runtime

    with runtime.threads(1):
        return apply(model, [plan(model, c, ratio, **kw) for c in chains])


def planted(runs: list[LenetRun], conv: ConvStudy, P) -> Planted:
    """Plant multiples into each seed's LeNet-300-100 (at the smallest ratio) and, with each seed, into the
    conv network (at the λ-sweep ratio); merge; measure the largest output change."""
    fc, cv = {}, {}
    probe_c = conv.eval_split.x[:64]  # exactness shows on a few images; the conv net costs most
    r, rc = min(P.ratios), P.lam_sweep_ratio
    with torch.no_grad():
        for run in runs:
            pl = plant_multiples(run.model, run.chains, r, seed=run.seed)
            probe = run.test.x[:200]
            ref = pl(probe)
            fc[run.seed] = {m: float((_planned(pl, run.chains, r, method=m, threshold=P.fc_threshold)(probe)
                                      - ref).abs().max()) for m in METHODS}
            fc[run.seed]["scale"] = float(ref.abs().max())
            pc = plant_multiples(conv.model, conv.chains, rc, seed=run.seed)
            ref_c = pc(probe_c)
            cv[run.seed] = {v: float((_planned(pc, conv.chains, rc, threshold=P.conv_threshold, lam=P.lam,
                                               **{"method": "merge", **kw})(probe_c) - ref_c).abs().max())
                            for v, kw in VARIANTS.items() if "reversed" not in v}
            cv[run.seed]["scale"] = float(ref_c.abs().max())
    return Planted(fc, cv, conv.name)


@dataclass
class Twins:
    """Beyond the paper: twin 784-300-100-10 networks trained alike, with ReLU and with LeakyReLU, per seed;
    pruning against merging at every ratio."""

    rows: "pd.DataFrame"  # seed, activation, ratio, method, accuracy
    base: "pd.DataFrame"  # seed, activation, accuracy
    n_train: int
    epochs: int
    slope: float
    ratios: list

    def gain(self, activation: str):
        """Merge minus prune, mean over the ratios, paired by seed."""
        from .claims import Estimate

        r = self.rows[self.rows.activation == activation]
        per = r.pivot_table(index="seed", columns="method", values="accuracy", aggfunc="mean")
        return Estimate.paired(per["merge"], per["prune"])

    def table(self):
        import pandas as pd

        cols = {}
        for a in ("relu", "leaky_relu"):
            for m in ("prune", "merge"):
                sel = self.rows[(self.rows.activation == a) & (self.rows.method == m)]
                cols[(a, m)] = [_pm(sel[sel.ratio == r]["accuracy"]) for r in self.ratios]
        return pd.DataFrame(cols, index=pd.Index([f"{r:g}" for r in self.ratios], name="pruning ratio"))

    def figure(self):
        from . import plots

        names = {"relu": "ReLU twin", "leaky_relu": f"LeakyReLU twin (slope {self.slope:g})"}
        fig, axes = plots.panel_grid(2, panel_size=(3.8, 3.2), sharey=True)
        for ax, (a, title) in zip(axes, names.items()):
            for m, colour, shift in (("prune", "tab:blue", -0.007), ("merge", "tab:orange", 0.007)):
                sel = self.rows[(self.rows.activation == a) & (self.rows.method == m)]
                ax.plot(sel["ratio"] + shift, sel["accuracy"], "o", ms=3, alpha=0.5, color=colour)
                ax.plot(self.ratios, [sel[sel.ratio == r]["accuracy"].mean() for r in self.ratios], "-",
                        color=colour, label=f"{m} (mean; dots: seeds)")
            ax.set_title(title)
        plots.label_grid(axes, "pruning ratio (share of hidden neurons removed)", "test accuracy (fraction)")
        return fig

    def numbers(self) -> dict:
        relu, leaky = self.gain("relu"), self.gain("leaky_relu")
        per_ratio = self.rows.pivot_table(index=["activation", "ratio"], columns="method", values="accuracy")
        wins = (per_ratio["merge"] > per_ratio["prune"]).groupby(level=0).sum()
        return {"leaky_slope": self.slope, "twin_epochs": self.epochs, "twin_n": f"{self.n_train:,}",
                "twin_relu_acc": _pm(self.base[self.base.activation == "relu"]["accuracy"]),
                "twin_leaky_acc": _pm(self.base[self.base.activation == "leaky_relu"]["accuracy"]),
                "twin_relu_gain": _signed(relu), "twin_leaky_gain": _signed(leaky),
                "twin_relu_wins": int(wins.get("relu", 0)), "twin_leaky_wins": int(wins.get("leaky_relu", 0)),
                "n_ratios": len(self.ratios), "fig_twins": self.figure()}


def twins(P, device="cpu") -> Twins:
    """Train the ReLU and LeakyReLU twins at every seed (same initial draw, same images), then prune and merge
    them at ``P.ratios`` (criterion ℓ1, threshold ``P.fc_threshold``)."""
    import pandas as pd

    from . import data, train

    cfg = TrainConfig(epochs=P.twin_epochs, batch_size=128, lr=0.1, weight_decay=1e-4, threads=1)
    test = data.load("fashion-mnist", "test", download=P.download)
    rows, base, n_train = [], [], 0
    for seed in P.seeds:
        tr = data.load("fashion-mnist", "train", download=P.download).subset(P.twin_train_images, seed)
        n_train = len(tr)
        for act in ("relu", "leaky_relu"):
            train.seed_everything(seed)
            net = mlp([784, 300, 100, len(test.classes)], act, P.leaky_slope)
            train.fit(net, tr, None, cfg, seed=seed, device=P.device, progress=False)
            chains = find_chains(net, test.x[:1])
            ev = Evaluator(net, test, chains, device)
            base.append({"seed": seed, "activation": act, "accuracy": float(ev.base.mean())})
            for r in P.ratios:
                for m in METHODS:
                    net_m, plans = merged(net, chains, r, method=m, threshold=P.fc_threshold)
                    rows.append({"seed": seed, "activation": act, "ratio": r, "method": m,
                                 "accuracy": float(ev.correct(net_m, plans).mean())})
    return Twins(pd.DataFrame(rows), pd.DataFrame(base), n_train, P.twin_epochs, P.leaky_slope, list(P.ratios))


def speed_table():
    """The benchmark's last recorded run (``benchmarks/bench_merging.json``, written by
    ``python benchmarks/bench_merging.py --json ...``) as a table, with how it was measured; None if absent."""
    import json

    import pandas as pd

    from .chapters import ROOT

    path = ROOT / "benchmarks" / "bench_merging.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    cols = ["model", "ratio", "merged", "reference-style ms", "ours ms", "speed-up", "speed-up (wall clock)",
            "first survey ms", "same kept", "max |d output|"]
    df = pd.DataFrame(data["rows"])[cols].set_index(["model", "ratio"])
    meta = data["meta"]
    load = f", load average {meta['load average'][0]:g} on its cores" if meta.get("load average") else ""
    caption = (f"{meta['command']}: {meta['clock']} of {meta['repeats']} runs, {meta['threads']} thread, "
               f"{meta['machine']}{load}, torch {meta['torch']}")
    return df.style.format({"reference-style ms": "{:.2f}", "ours ms": "{:.2f}", "speed-up": "{:.1f}x",
                            "speed-up (wall clock)": "{:.1f}x", "first survey ms": "{:.1f}",
                            "max |d output|": "{:.1e}", "merged": "{:,}"}).set_caption(caption)


def chapter_claims(runs: list[LenetRun], t1: Table1, checks: LenetChecks, conv: ConvStudy, plant: Planted,
                   tw: Twins, P) -> list:
    """Every claim of chapter 4 decided by its declared rule (``claims.py``) on the measured estimates."""
    from . import claims, reference
    from .claims import Estimate

    ref = reference.NEURON_MERGING
    c0 = checks.criterion
    seeds = f"{len(runs)} training seeds ({P.lenet_recipe} recipe)"
    out = [claims.decide("nm-baseline", Estimate.over_seeds([r.accuracy for r in runs]),
                         f"{seeds}; the paper's number belongs to one checkpoint", ".4f"),
           claims.decide("nm-beats-prune", {f"{r:g}": t1.gain(c0, r) for r in t1.ratios},
                         f"{seeds}, criterion {c0}, threshold {P.fc_threshold:g}", ".4f")]
    if len(t1.ratios) > 1:
        lo, hi = min(t1.ratios), max(t1.ratios)
        grows = Estimate.paired(np.subtract(t1.values(c0, hi, "merge"), t1.values(c0, hi, "prune")),
                                np.subtract(t1.values(c0, lo, "merge"), t1.values(c0, lo, "prune")))
        out.append(claims.decide("nm-gain-grows", grows, f"ratios {lo:g} and {hi:g}; {seeds}", ".4f"))
    else:
        out.append(claims.untestable("nm-gain-grows", "one pruning ratio only (parameter ratios)"))
    if 0.8 in t1.ratios:
        out.append(claims.decide("nm-kept-at-08", Estimate.over_seeds(t1.values(c0, 0.8, "merge")),
                                 f"{seeds}; pruned: {_pm(t1.values(c0, 0.8, 'prune'))}", ".4f"))
    else:
        out.append(claims.untestable("nm-kept-at-08", "ratio 0.8 is not among this run's ratios"))
    out.append(claims.decide("nm-every-criterion", {f"{c}, {r:g}": t1.gain(c, r) for c in t1.criteria
                                                   for r in t1.ratios}, seeds, ".4f"))
    labels = [f"{r:g}" for r in conv.ratios]
    one_net = (f"one trained {conv.name} ({conv.data_name}); the interval covers the test images only, not "
               "retraining")
    out.append(claims.decide("nm-bn-beats-prune", {lb: conv.gain(lb) for lb in labels}, one_net, ".4f"))
    out.append(claims.decide("nm-s-direction", {"LeNet-300-100": checks.reversed_estimate(),
                                                conv.name: conv.reversed_estimate()},
                             "the report's -4% was measured on the authors' models", ".4f"))
    best = ", ".join(f"{t:g}" for t in checks.best_thresholds().values())
    out.append(claims.decide("nm-threshold", checks.shortfall_estimate(),
                             f"best thresholds by ratio: {best}; chosen on the same test images, which favours "
                             "them", ".4f"))
    out.append(claims.decide("nm-lambda", conv.lam_estimate(),
                             f"best lambda {conv.lam_best():g} of the sweep at ratio {conv.lam_ratio:g}; chosen on "
                             "the same test images; " + one_net, ".4f"))
    out.append(claims.decide("nm-exact-fc", plant.estimate("fc"), f"planted at ratio {min(P.ratios):g}", ".1e"))
    exact = plant.estimate("merge, exact BN scale")
    out.append(claims.decide("nm-exact-bn", plant.estimate("merge, reference BN scale"),
                             f"BatchNorm's own algebra (exact BN scale) gives {exact.mean:.1e}: the reference's "
                             "scale inverts the BN ratio and uses the variance", ".2g"))
    hard = [tuple(c) for c in ref["hard_coded_chains"]["lenet300100"]]
    same = [[(c.layer, c.next) for c in run.chains] == hard for run in runs]
    share = float(np.mean(same))
    out.append(claims.decide("nm-chains", Estimate(share, share, share, len(runs), "exact: every run checked"),
                             f"torch.fx, or forward hooks where fx cannot trace; {conv.name}: {len(conv.chains)} "
                             "branch-free chains; unit tests compare with naming by hand", ".2f"))
    out.append(claims.decide("nm-leaky", tw.gain("leaky_relu"),
                             f"twins trained {tw.epochs} epoch(s) on {tw.n_train:,} images; the ReLU twin's gain: "
                             f"{_signed(tw.gain('relu'))}", ".4f"))
    return out


def key_numbers(runs, t1: Table1, checks: LenetChecks, conv: ConvStudy, plant: Planted) -> dict:
    """A few numbers, rounded coarsely, for nbval to compare on re-execution."""
    c0 = checks.criterion
    return {"LeNet-300-100": [round(r.accuracy, 3) for r in runs],
            f"{c0} prune, merge (mean)": {r: (round(_ci(t1.values(c0, r, "prune"))[0], 3),
                                             round(_ci(t1.values(c0, r, "merge"))[0], 3)) for r in t1.ratios},
            "s reversed (LeNet)": round(checks.reversed_estimate().mean, 3),
            conv.name: round(float(conv.base_correct.mean()), 3),
            "conv prune, merge": {lb: (round(conv.accuracy((lb, "prune")), 3),
                                       round(conv.accuracy((lb, "merge, reference BN scale")), 3))
                                  for lb in (f"{r:g}" for r in conv.ratios)},
            "planted, exact and reference BN": (round(plant.estimate("merge, exact BN scale").mean, 3),
                                                round(plant.estimate("merge, reference BN scale").mean, 3))}


def glue_all(*results) -> None:
    """Glue every number and figure of the chapter's results (their ``numbers()``) for the prose."""
    from myst_nb import glue

    for result in results:
        for name, value in result.numbers().items():
            glue(name, value, display=False)
