"""Merge time of pruning_utils.merging against a baseline built like the authors' implementation, with a
check that both give the same kept neurons and the same outputs.

The baseline follows the structure of ``decompose.py`` in the authors' repository (friendshipkim/
neuron-merging): a loop over layers; per layer, the whole N x N cosine matrix (scikit-learn's
``pairwise_distances``), then a Python loop over the N neurons (Algorithm 2), with an inner loop over the
kept neurons where a BatchNorm follows (Algorithm 3); the next layer takes Z in one ``torch.mm`` (Linear
after Linear) or one ``torch.mm`` per output filter (a convolution, or a Linear after a flatten). It is
written here in our own code; its per-layer and per-neuron structure is the reference's. Like the
reference it returns the new weights only, while the timed ``merging.merge`` also builds the merged model.

``merging.merge`` scores only the pruned rows against the kept ones in float32 (near-ties decided again in
float64), keeps Z sparse, folds it with a gather and one ``index_add``, and reuses the model's survey of
chains from its cache (the first call's tracing is timed apart).

Run: ``python benchmarks/bench_merging.py`` (one thread; median of 7 runs, each pair interleaved so both
see the same load; about a minute on 2 CPU cores). Times are the process's CPU time, which on one thread
is the run time of an idle machine; the wall-clock ratio is printed beside it. ``--json PATH`` also
writes the table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from sklearn.metrics import pairwise_distances
from torch import nn

from pruning_utils import baselines, merging, models, runtime


# ----------------------------------------------------------------------------------------------------
# The baseline: the reference's structure
# ----------------------------------------------------------------------------------------------------

def ref_scaling_fc(weight: np.ndarray, ind: np.ndarray, threshold) -> np.ndarray:
    """Z (N x P) of Algorithm 2, as the reference computes it: the whole cosine matrix, a loop over neurons."""
    cos = 1 - pairwise_distances(weight, metric="cosine")
    chosen = weight[ind]
    z = np.zeros((weight.shape[0], len(ind)))
    for i in range(weight.shape[0]):
        if i in ind:
            z[i, np.where(ind == i)[0]] = 1
            continue
        row = cos[i][ind]
        best = np.argpartition(row, -1)[-1]
        if threshold and row[best] < threshold:  # 0 and None: no threshold
            continue
        z[i, best] = np.linalg.norm(weight[i]) / np.linalg.norm(chosen[best])
    return z


def ref_scaling_bn(weight: np.ndarray, ind: np.ndarray, threshold, gamma, beta, mean, var, lam) -> np.ndarray:
    """Z (N x P) of Algorithm 3 with the reference's BN formula: the whole cosine-distance matrix, a loop
    over neurons and, inside it, a loop over the kept neurons."""
    weight = weight.reshape(weight.shape[0], -1)
    dist = pairwise_distances(weight, metric="cosine")
    z = np.zeros((weight.shape[0], len(ind)))
    for i in range(weight.shape[0]):
        if i in ind:
            z[i, np.where(ind == i)[0]] = 1
            continue
        norm_i = np.linalg.norm(weight[i])
        g1, b1, m1, v1 = gamma[i], beta[i], mean[i], var[i]
        dists, scales, offsets = [], [], []
        for k in ind:
            g2, b2, m2, v2 = gamma[k], beta[k], mean[k], var[k]
            s = norm_i / np.linalg.norm(weight[k], ord=2)
            scale = s * (g2 / g1) * (v1 / v2)
            dists.append(dist[i][k])
            scales.append(scale)
            offsets.append(abs((g2 / v2) * (s * (-(v1 * b1 / g1) + m1) - m2) + b2) / scale)
        offsets = (offsets - np.min(offsets)) / (np.max(offsets) - np.min(offsets))
        score = lam * np.array(dists) + (1 - lam) * offsets
        best = np.argmin(score)
        if threshold and 1 - dists[best] < threshold:
            continue
        z[i, best] = scales[best]
    return z


def ref_keep(weight: torch.Tensor, p: int) -> np.ndarray:
    """The reference's ℓ1 criterion: row norms, argsort, the P largest, sorted. The norms in float64 (the
    reference: float32), so that a near-tie at the cut is decided as ``merging.keep_indices`` decides it:
    two of the random VGG-16's filters differ by 2e-5 in ℓ1 norm, where float32 sums can disagree."""
    norm = torch.norm(weight.double(), 1, 1).numpy()
    return np.array(sorted(np.argsort(norm)[::-1][:p].tolist()))


def ref_fold(weight: torch.Tensor, z: torch.Tensor, after_flatten: bool) -> torch.Tensor:
    """Z W_{i+1} as the reference does it: one mm for a Linear after a Linear, else one mm per output filter."""
    if weight.ndim == 2 and not after_flatten:
        return torch.mm(weight, z)
    zt = z.t()
    out = torch.zeros(weight.shape[0], zt.shape[0], *weight.shape[2:]) if weight.ndim == 4 else \
        torch.zeros(weight.shape[0], weight.shape[1] // z.shape[0] * zt.shape[0])
    for i, f in enumerate(weight):
        o = torch.mm(zt, f.reshape(z.shape[0], -1))
        out[i] = o.reshape(out.shape[1:])
    return out


def reference_merge(model: nn.Module, chains, ratio: float, threshold, lam: float) -> dict:
    """The merged weights ({state-dict name: tensor}) and kept indices ({layer: array}), layer by layer as
    the reference's ``Decompose`` produces them (ℓ1 criterion; every Z from the original weights)."""
    params = {k: v.detach() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    out, kept, pending = dict(params), {}, {}
    for c in chains:
        w = params[f"{c.layer}.weight"]
        if c.layer in pending:  # this layer is the previous chain's next: take that Z in first
            out[f"{c.layer}.weight"] = ref_fold(w, *pending.pop(c.layer))
        rows = w.reshape(len(w), -1)
        if c.bn is None and modules[c.layer].bias is not None:  # Algorithm 2 appends the bias
            rows = torch.cat([rows, params[f"{c.layer}.bias"][:, None]], 1)
        ind = ref_keep(rows, merging.n_kept(len(w), ratio))
        if c.bn is None:
            z = ref_scaling_fc(rows.numpy(), ind, threshold)
        else:
            bn = [params[f"{c.bn}.{k}"].numpy() for k in ("weight", "bias", "running_mean", "running_var")]
            if modules[c.layer].bias is not None:  # the reference's layers before a BN have none; BN sees y + c
                bn[2] = bn[2] - params[f"{c.layer}.bias"].numpy()
            z = ref_scaling_bn(w.numpy(), ind, threshold, *bn, lam)
        kept[c.layer] = ind
        out[f"{c.layer}.weight"] = out[f"{c.layer}.weight"][ind]
        for key in ([f"{c.layer}.bias"] if modules[c.layer].bias is not None else []) + \
                [f"{c.bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var")] * (c.bn is not None):
            out[key] = params[key][ind]
        after_flatten = isinstance(modules[c.next], nn.Linear) and isinstance(modules[c.layer], nn.Conv2d)
        pending[c.next] = (torch.from_numpy(z).float(), after_flatten)
    for name, (z, after_flatten) in pending.items():
        out[f"{name}.weight"] = ref_fold(params[f"{name}.weight"], z, after_flatten)
    return {"state": out, "kept": kept}


# ----------------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------------

def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random (positive) scales and running statistics, as a trained net has."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + 1.5 * torch.rand(n, generator=g)
    return model.eval()


def _timed(fn) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of one call. With one thread, the process's CPU time is the time
    the call ran; on a shared machine it leaves out the time spent waiting for a core."""
    c, w = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def compare(name: str, model: nn.Module, x: torch.Tensor, ratio: float, threshold, lam: float,
            repeats: int = 7) -> dict:
    """Median times of the baseline and of ``merging.merge`` (interleaved), the first call's survey, and
    whether both keep the same neurons and give the same outputs."""
    trace_time = _timed(lambda: merging.find_chains(model, x))[0]
    chains = merging.find_chains(model, x)
    ref_cpu, ref_wall, our_cpu, our_wall = [], [], [], []
    for _ in range(repeats):
        c, w, ref = _timed(lambda: reference_merge(model, chains, ratio, threshold, lam))
        ref_cpu.append(c)
        ref_wall.append(w)
        c, w, (ours, plans) = _timed(lambda: merging.merge(model, merging.find_chains(model, x), ratio,
                                                           threshold=threshold, lam=lam))
        our_cpu.append(c)
        our_wall.append(w)
    same_kept = all(np.array_equal(p.kept.numpy(), ref["kept"][p.chain.layer]) for p in plans)
    theirs = merging.apply(model, plans)  # the same shapes; then the baseline's weights
    theirs.load_state_dict(ref["state"])
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    med = statistics.median
    return {"model": name, "ratio": ratio, "chains": len(chains),
            "neurons pruned": sum(p.n - p.p for p in plans), "merged": sum(p.merged for p in plans),
            "reference-style ms": 1000 * med(ref_cpu), "ours ms": 1000 * med(our_cpu),
            "speed-up": med(ref_cpu) / med(our_cpu), "speed-up (wall clock)": med(ref_wall) / med(our_wall),
            "first survey ms": 1000 * trace_time, "same kept": bool(same_kept),
            "max |d output|": float((a - b).abs().max()), "max |output|": float(a.abs().max())}


def networks(quick: bool = False) -> list[tuple]:
    """(name, model, example input, threshold, lambda) of the two networks, at the reference's settings:
    the book's trained LeNet-300-100 (chapter 0's, seed 0, from the checkpoint cache or trained there), and a
    VGG-16 at CIFAR widths with random weights and BatchNorm statistics (``--quick``: both small, random)."""
    torch.manual_seed(0)
    lenet = models.LeNet300100().eval() if quick else baselines.load("lenet300100", "default", 0, progress=False)[0]
    cfg = models.VGG_CFGS[16]
    if quick:
        cfg = tuple(v if v == "M" else v // 4 for v in models.VGG_CFGS[11])
    vgg = randomise_bn(models.vgg_stack(cfg, 3, 10, hidden=cfg[-1]))
    return [("LeNet-300-100 (Algorithm 2, threshold 0.45)", lenet, torch.randn(4, 1, 28, 28), 0.45, 0.85),
            (f"VGG-{11 if quick else 16}, CIFAR widths (Algorithm 3, threshold 0.1, λ 0.85)", vgg,
             torch.randn(4, 3, 32, 32), 0.1, 0.85)]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small VGG-11 instead of VGG-16 (seconds)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.8], help="pruning ratios")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (median)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    with runtime.threads(1), threadpool_limits(1):  # one thread for torch and the BLAS behind NumPy/sklearn
        rows = [compare(name, model, x, r, thr, lam, args.repeats)
                for name, model, x, thr, lam in networks(args.quick) for r in args.ratios]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.2g}" if k.startswith("max") else f"{v:.2f}" if isinstance(v, float) else str(v)
                 for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        meta = {"command": "python benchmarks/bench_merging.py " + " ".join(argv or []), "threads": 1,
                "repeats": args.repeats, "clock": "process CPU time (median)",
                "machine": _cpu_name(), "load average": _load(), "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    bad = [r for r in rows if not r["same kept"] or r["max |d output|"] > 1e-5 * max(1.0, r["max |output|"])]
    if bad:
        raise SystemExit(f"the baseline and merging.merge disagree: {bad}")
    return rows


if __name__ == "__main__":
    main()
