"""Merge time of the vectorised neuron merging (pruning_utils.merging) against a straightforward
per-neuron loop implementation of the same algorithm, with a check that both give the same result.

The reproducibility report (paper 003, section 3.1) re-implemented Algorithms 1-3 "strictly following the
description": for every pruned neuron, the cosine similarity to every kept neuron, one pair at a time.
It ran 346x (fully connected) and 18x (convolutional) slower than the reference code, which computes all
similarities with one matrix operation. The loop version below does the same: a Python loop over the
neurons for the criterion and over (pruned, kept) pairs for Z_i. The table times that decomposition both
ways; folding Z_i into the next layer (:func:`pruning_utils.merging.apply`, shared by both) is timed apart.

Run: ``python benchmarks/bench_merging.py`` (about a minute on 2 CPU cores; ``--quick`` for seconds).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from pruning_utils import merging, models


def loop_keep(w: np.ndarray, p: int, criterion: str) -> np.ndarray:
    """The P kept neurons, one neuron (and for ℓ2-GM one pair) at a time."""
    n = len(w)
    if criterion == "l1":
        score = [sum(abs(float(v)) for v in w[i]) for i in range(n)]
    elif criterion == "l2":
        score = [math.sqrt(float(np.dot(w[i], w[i]))) for i in range(n)]
    else:
        score = [sum(float(np.linalg.norm(w[i] - w[j])) for j in range(n)) for i in range(n)]
    order = sorted(range(n), key=lambda i: -score[i])
    return np.array(sorted(order[:p]))


def loop_scaling_matrix(w: np.ndarray, kept: np.ndarray, threshold, s_ratio="pruned/kept") -> np.ndarray:
    """Algorithm 2 pair by pair: the most similar kept neuron of each pruned one, and its norm ratio."""
    z = np.zeros((len(w), len(kept)))
    for j, k in enumerate(kept):
        z[k, j] = 1.0
    kept_set = set(kept.tolist())
    for i in range(len(w)):
        if i in kept_set:
            continue
        norm_i = float(np.linalg.norm(w[i]))
        best, best_cos = 0, -math.inf
        for j, k in enumerate(kept):
            c = float(np.dot(w[i], w[k])) / (norm_i * float(np.linalg.norm(w[k])))
            if c > best_cos:
                best, best_cos = j, c
        if threshold is not None and best_cos < threshold:
            continue
        s = norm_i / float(np.linalg.norm(w[kept[best]]))
        z[i, best] = s if s_ratio == "pruned/kept" else 1.0 / s
    return z


def loop_scaling_matrix_bn(w, kept, gamma, beta, mean, var, eps, threshold, lam, bn_scale="reference",
                           s_ratio="pruned/kept") -> np.ndarray:
    """Algorithm 3 pair by pair, as the reference's create_scaling_mat_conv_thres_bn (or the exact form)."""
    z = np.zeros((len(w), len(kept)))
    for j, k in enumerate(kept):
        z[k, j] = 1.0
    kept_set = set(kept.tolist())
    for i in range(len(w)):
        if i in kept_set:
            continue
        norm_i = float(np.linalg.norm(w[i]))
        g1, b1, m1, v1 = float(gamma[i]), float(beta[i]), float(mean[i]), float(var[i])
        dists, scales, offsets, valid = [], [], [], []
        for k in kept:
            norm_k = float(np.linalg.norm(w[k]))
            dists.append(1.0 - float(np.dot(w[i], w[k])) / (norm_i * norm_k))
            s = norm_i / norm_k if s_ratio == "pruned/kept" else norm_k / norm_i
            g2, b2, m2, v2 = float(gamma[k]), float(beta[k]), float(mean[k]), float(var[k])
            if bn_scale == "reference":
                scale = s * (g2 / g1) * (v1 / v2)
                offset = abs((g2 / v2) * (s * (-(v1 * b1 / g1) + m1) - m2) + b2) / scale
            else:
                sd1, sd2 = math.sqrt(v1 + eps), math.sqrt(v2 + eps)
                scale = s * (g1 / g2) * (sd2 / sd1)
                offset = abs(b1 - scale * b2 + g1 * (s * m2 - m1) / sd1)
            scales.append(scale)
            offsets.append(offset)
            valid.append(bn_scale == "reference" or scale > 0)
        ok = [o for o, v in zip(offsets, valid) if v]
        if not ok:
            continue
        lo, hi = min(ok), max(ok)
        best, best_score = 0, math.inf
        for j in range(len(kept)):
            if not valid[j]:
                continue
            normed = (offsets[j] - lo) / (hi - lo) if hi > lo else 0.0
            score = lam * dists[j] + (1.0 - lam) * normed
            if score < best_score:
                best, best_score = j, score
        if threshold is not None and 1.0 - dists[best] < threshold:
            continue
        z[i, best] = scales[best]
    return z


def loop_plan(model, chain, ratio, criterion, threshold, lam, bn_scale="reference") -> dict:
    """The same plan as merging.plan, computed neuron by neuron."""
    layer, bn, _ = merging._check_chain(model, chain)
    w = merging.rows_of(layer, bn).numpy()
    kept = loop_keep(w, merging.n_kept(len(w), ratio), criterion)
    if bn is None:
        z = loop_scaling_matrix(w, kept, threshold)
    else:
        st = {k: (v.double().numpy() if torch.is_tensor(v) else v) for k, v in merging.bn_stats(layer, bn).items()}
        z = loop_scaling_matrix_bn(w, kept, st["gamma"], st["beta"], st["mean"], st["var"], st["eps"],
                                   threshold, lam, bn_scale)
    return {"chain": chain, "kept": torch.from_numpy(kept), "z": torch.from_numpy(z)}


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


def compare(name, model, x, ratio, threshold, lam, repeats) -> dict:
    """Time the decomposition (criterion and Z_i of every chain) both ways, and the common fold; check
    that both give the same kept neurons, the same assignments, the same Z_i and the same outputs."""
    chains = merging.find_chains(model, x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        plans = [merging.plan(model, c, ratio, "merge", "l1", threshold, lam) for c in chains]
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    loop_plans = [loop_plan(model, c, ratio, "l1", threshold, lam) for c in chains]
    loop_time = time.perf_counter() - t
    t = time.perf_counter()
    fast = merging.apply(model, plans)
    fold_time = time.perf_counter() - t
    slow = merging.apply(model, loop_plans)
    same_kept = all(torch.equal(a["kept"], b["kept"]) for a, b in zip(plans, loop_plans))
    same_pattern = all(torch.equal(a["z"] != 0, b["z"] != 0) for a, b in zip(plans, loop_plans))
    dz = max(float((a["z"] - b["z"]).abs().max()) for a, b in zip(plans, loop_plans))
    with torch.no_grad():
        dout = float((fast(x) - slow(x)).abs().max())
    fast_time = statistics.median(times)
    return {"model": name, "chains": len(chains), "neurons pruned": sum(p["n"] - p["p"] for p in plans),
            "Z_i vectorised ms": 1000 * fast_time, "Z_i loop ms": 1000 * loop_time,
            "speed-up": loop_time / fast_time, "fold + copy ms": 1000 * fold_time,
            "same kept + assignment": same_kept and same_pattern, "max |dZ|": dz, "max |d output|": dout}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="VGG-11 widths halved instead of VGG-16")
    parser.add_argument("--ratio", type=float, default=0.5, help="pruning ratio of every chain")
    parser.add_argument("--repeats", type=int, default=5, help="timings of the vectorised version (median)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # both versions on one core: a fair comparison, and stable on a shared machine
    lenet = models.LeNet300100().eval()
    cfg = models.VGG_CFGS[11 if args.quick else 16]
    if args.quick:
        cfg = tuple(v if v == "M" else v // 2 for v in cfg)
    vgg = randomise_bn(models.vgg_stack(cfg, 3, 10, hidden=cfg[-1]))
    rows = [compare("LeNet-300-100 (Algorithm 2, threshold 0.45)", lenet, torch.randn(4, 1, 28, 28),
                    args.ratio, 0.45, 0.85, args.repeats),
            compare(f"VGG-{11 if args.quick else 16} stack, CIFAR size (Algorithm 3, threshold 0.1, lambda 0.85)",
                    vgg, torch.randn(4, 3, 32, 32), args.ratio, 0.1, 0.85, args.repeats)]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) and k.startswith("max") else
                 f"{v:.1f}" if isinstance(v, float) else str(v) for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")
    if not all(r["same kept + assignment"] and r["max |d output|"] < 1e-4 for r in rows):
        raise SystemExit("the loop and the vectorised merge disagree")
    return rows


if __name__ == "__main__":
    main()
