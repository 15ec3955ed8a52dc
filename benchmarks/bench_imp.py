"""Iterative magnitude pruning on the CPU: independent IMP runs in this process versus in worker processes.

Times :func:`pruning_utils.imp.run_many` on chapter 2's set-up (a CIFAR ResNet on the synthetic scenes,
its training recipe: batch 32, peak lr 0.1, one thread) for ``--jobs`` independent runs (trials), once
with ``workers=1`` (one after the other, in this process) and once with ``--workers`` spawned processes.
Every run trains on its recipe's one thread either way, so the two timings train the same weights; the
benchmark checks that they are equal. Each timing writes to its own temporary cache, so nothing is loaded
from an earlier run.

Run: ``python benchmarks/bench_imp.py`` (about a minute on 2 CPU cores; at 400 images the start-up of the
workers, a few seconds, eats the gain).
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import torch

from pruning_utils import broden, dissect, imp, models, train


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200, help="synthetic training scenes")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of every level")
    parser.add_argument("--rounds", type=int, default=2, help="pruning rounds of every run")
    parser.add_argument("--jobs", type=int, default=2, help="independent IMP runs (seeds)")
    parser.add_argument("--workers", type=int, default=2, help="processes of the parallel timing")
    parser.add_argument("--width", type=int, default=8, help="channels of the ResNet-8's first stage")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = broden.load(broden.generate(f"{tmp}/scenes", args.images, 100, 32, seed=0))
        train_split, test_split = broden.scene_split(data, "train"), broden.scene_split(data, "val")
        cfg = imp.IMPConfig(rounds=args.rounds, rewind_epochs=1,
                            train=train.TrainConfig(epochs=args.epochs, batch_size=32, lr=0.1, channels_last=True,
                                                    threads=dissect.TRAIN_THREADS))
        build = functools.partial(models.CifarResNet, 8, num_classes=len(broden.SCENES), width=args.width)
        jobs = [imp.Job(build, cfg, {"bench": args.images}, seed) for seed in range(args.jobs)]
        seconds, runs = {}, {}
        for workers in (1, args.workers):
            start = time.perf_counter()
            runs[workers] = imp.run_many(jobs, train_split, test_split, device="cpu", workers=workers,
                                         progress=False, directory=Path(tmp) / f"cache-{workers}")
            seconds[workers] = time.perf_counter() - start
    same = all(torch.equal(a[-1]["state"][k], b[-1]["state"][k])
               for a, b in zip(runs[1], runs[args.workers]) for k in a[-1]["state"])
    epochs = args.jobs * (1 + (args.rounds + 1) * args.epochs)
    print(f"{args.jobs} IMP runs of ResNet-8 (width {args.width}): {args.rounds + 1} levels x {args.epochs} epochs "
          f"on {args.images} scenes of 32x32 ({epochs} training epochs in all)")
    print(f"  {'workers':<8} {'seconds':>8} {'speed-up':>9}")
    for workers, s in seconds.items():
        print(f"  {workers:<8} {s:>8.1f} {seconds[1] / s:>8.2f}x")
    print(f"  identical weights with 1 and {args.workers} workers: {same}")
    return seconds


if __name__ == "__main__":
    main()
