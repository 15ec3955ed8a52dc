"""Measured CPU latency of structurally pruned networks (chapter 5): parameters, MACs per image, the median
latency of a forward pass at batch 1 and batch 64, and latency reduction against MAC reduction.

    python benchmarks/bench_latency.py                       # ResNet-20, 2x / 3x / 4x fewer MACs, block 8
    python benchmarks/bench_latency.py --macs-kept 0.5 0.25 --block 0 --no-fold --no-channels-last
    python benchmarks/bench_latency.py --scan                # also the convolution block scan
    python benchmarks/bench_latency.py --clock wall          # the wall clock (a quiet machine only)

ResNet-20 is pruned as a whole (every coupled group torch-pruning's dependency graph finds, the residual
stream of each stage included; the same share of every group, filters by L1: which filters go does not
change the cost), with kept widths rounded to multiples of ``--block`` (oneDNN's output-channel block: 8 on
this AVX2 CPU, 16 on AVX-512; 0: no rounding), and, for reference, the inner convolutions alone. Networks
are timed BatchNorm-folded and channels_last (unless told otherwise), in turns, round by round, on one
thread's CPU clock (``--clock cpu``: time spent waiting for other processes is not counted, so a busy
machine gives the latency of an idle core). The last line is the target of issue 14: the latency drop at
batch 64 of the most pruned (rounded) network over its MAC drop. The model comes from the book's
checkpoint cache (chapter 0 trains it on a miss); ``--untrained`` times a freshly initialised one (the same
cost).
"""
from __future__ import annotations

import argparse
import platform
import sys

import pandas as pd
import torch

from pruning_utils import baselines, criteria, latency, models, prune, train


def pruned_networks(net: torch.nn.Module, shape: tuple[int, ...], macs_kept: list[float],
                    block: int | None) -> tuple[dict[str, torch.nn.Module], str]:
    """The unpruned ``net``, the inner convs alone at the largest cut's share, and the whole network at each
    target (unrounded, and rounded to ``block``); returns them and the label of the most pruned, rounded one."""
    ex = torch.zeros(1, *shape)
    groups = criteria.coupled_groups(net, ex)
    scores = {g.name: criteria.score_group("l1", net, g) for g in groups}
    mm = prune.MacModel(net, groups, ex)
    inner = [g for g in groups if g.name.startswith("layer") and g.name.endswith(".conv1")]
    nets, final = {"unpruned": net}, ""
    for kept in sorted(macs_kept, reverse=True):
        for b in ([None, block] if block else [None]):
            plan = prune.plan_macs(net, groups, scores, ex, kept, "uniform", b, mac_model=mm)
            label = f"whole, {kept:.2f} of the MACs" + (f", block {b}" if b else "")
            nets[label] = prune.remove_groups(net, plan.remove, ex)
            final = label if kept == min(macs_kept) else final
            if kept == min(macs_kept) and b is None:
                ip = prune.plan_fraction(inner, {g.name: scores[g.name] for g in inner}, plan.fraction)
                nets[f"inner convs only, {plan.fraction:.0%}"] = prune.remove_groups(net, ip.remove, ex)
    return nets, final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="default", choices=baselines.SIZES, help="which cached baseline")
    parser.add_argument("--untrained", action="store_true", help="time a freshly initialised ResNet-20")
    parser.add_argument("--macs-kept", nargs="+", type=float, default=[0.5, 0.33, 0.25],
                        help="shares of the unpruned MACs to keep (0.25: 4x fewer)")
    parser.add_argument("--block", type=int, default=8, help="round kept widths to this channel block (0: no)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds per latency (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clock", default="cpu", choices=latency.CLOCKS)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads while timing (cpu clock: 1)")
    parser.add_argument("--no-fold", action="store_true", help="keep the BatchNorms")
    parser.add_argument("--no-channels-last", action="store_true", help="time in NCHW layout")
    parser.add_argument("--scan", action="store_true", help="also time one convolution across output widths")
    args = parser.parse_args(argv)
    if 64 not in args.batches:
        parser.error("--batches must include 64 (the target is measured at batch 64)")
    recipe = baselines.recipe("resnet20", args.size)
    shape = baselines.input_shape(recipe)
    if args.untrained:
        torch.manual_seed(0)
        net = train.build_for(recipe).eval()
    else:
        net, _ = baselines.load("resnet20", args.size, 0, progress=False)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if platform.system() == "Linux" else platform.processor()
    print(f"torch {torch.__version__}, CPU: {cpu} ({torch.backends.cpu.get_cpu_capability()}), {args.threads} "
          f"thread(s), {args.clock} clock, median of {args.repeats} rounds after {args.warmup} warm-up passes, "
          f"BatchNorm {'kept' if args.no_fold else 'folded'}, "
          f"{'NCHW' if args.no_channels_last else 'channels_last'}; {models.count_parameters(net):,} parameters")
    nets, final = pruned_networks(net, shape, args.macs_kept, args.block or None)
    costs = latency.cost_table(nets, shape, tuple(args.batches), args.repeats, args.warmup, args.threads,
                               fold_bn=not args.no_fold, channels_last=not args.no_channels_last, clock=args.clock)
    table = costs.table.copy()
    table["MAC speed-up"] = 1 / (1 - table["MAC reduction"])
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.float_format", "{:.3f}".format):
        print(table.to_string())
    if args.scan:
        side = shape[1] // 2
        scan = latency.block_scan(2 * net.conv1.out_channels, list(range(4, 65, 4)), side, repeats=args.repeats,
                                  warmup=args.warmup, clock=args.clock)
        print(f"\none 3x3 convolution, {2 * net.conv1.out_channels} input channels, {side}x{side} maps, batch 64:")
        print(scan.T.to_string(float_format="{:.3f}".format))
    est = costs.ratio(final, 64)
    print(f"\n{final}: latency drop / MAC drop at batch 64 {est.mean:.3f} (95% interval {est.lo:.3f} to "
          f"{est.hi:.3f} over {est.n} rounds); at batch 1 {table.loc[final, 'latency drop / MAC drop b1']:.3f}"
          if 1 in args.batches else "")
    print(f"latency drop / MAC drop, batch 64, largest ratio: {table.loc[final, 'latency drop / MAC drop b64']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
