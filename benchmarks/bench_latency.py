"""Measured CPU latency of structurally pruned networks (chapter 5): parameters, MACs per image and the
median latency of a forward pass at batch 1 and batch 64, and latency reduction against MAC reduction.

    python benchmarks/bench_latency.py                      # both models, ratios 0 to 0.9, 1 thread
    python benchmarks/bench_latency.py --models resnet20 --fractions 0 0.5 --threads 2 --repeats 50

LeNet5 loses the same fraction of the filters of c1, c3 and c5; ResNet-20 of the inner convolution (conv1)
of every residual block, whose output feeds only conv2 (the residual stream keeps its width). The filters
are physically removed with torch-pruning. Which filters go does not change the cost, only how many, so
the filters are chosen by the L1 norm of their weights, which needs no data. Models come from the book's
checkpoint cache (chapter 0 trains them on a miss).
"""
from __future__ import annotations

import argparse
import platform
import sys

import pandas as pd
import torch

from pruning_utils import baselines, causal, prune

SETUPS = {  # the prunable activation layers and the conv layer whose filters each one's channels are
    "lenet5": {"convnet.relu1": "convnet.c1", "convnet.relu3": "convnet.c3", "convnet.relu5": "convnet.c5"},
    "resnet20": {f"layer{s}.{b}.relu1": f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in (0, 1, 2)},
}


def pruned_networks(name: str, size: str, fractions: list[float]) -> dict[str, torch.nn.Module]:
    """The baseline ``name`` with each fraction of its prunable filters removed (L1 order)."""
    net, _ = baselines.load(name, size, 0, progress=False)
    conv_of = SETUPS[name]
    example = torch.zeros(1, *baselines.input_shape(baselines.recipe(name, size)))
    rankings = {act: prune.l1_ranking(prune.module(net, conv)).tolist() for act, conv in conv_of.items()}
    sizes = {act: prune.module(net, conv).out_channels for act, conv in conv_of.items()}
    return {f"{f:.2f}": causal.removed(net, causal.plan(rankings, f, sizes), conv_of, example) for f in fractions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--size", default="default", choices=baselines.SIZES, help="which cached baselines")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=20, help="timed passes per latency (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing")
    args = parser.parse_args(argv)
    if args.fractions[0] != 0.0:
        args.fractions = [0.0, *args.fractions]  # reductions are relative to the unpruned network
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if platform.system() == "Linux" else platform.processor()
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU: {cpu}; median of {args.repeats} passes "
          f"after {args.warmup} warm-up passes")
    tables = {}
    for name in args.models:
        shape = baselines.input_shape(baselines.recipe(name, args.size))
        tables[name] = causal.cost_table(pruned_networks(name, args.size, args.fractions), shape, tuple(args.batches),
                                         args.repeats, args.warmup, args.threads)
    table = pd.concat(tables, names=["model", "fraction removed"])
    for b in args.batches:
        table[f"speed-up b{b}"] = 1 / (1 - table[f"latency reduction b{b}"])
    table["MAC speed-up"] = 1 / (1 - table["MAC reduction"])
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:.3f}".format):
        print(table.to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
