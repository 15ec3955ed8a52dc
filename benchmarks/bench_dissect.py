"""Dissection throughput on the CPU: images per second for the units of a CIFAR ResNet's last block.

Times the three stages of :mod:`pruning_utils.dissect` on the synthetic Broden-format scenes of
:mod:`pruning_utils.broden` (generated once into a temporary folder): the forward pass that records the
last block's maps, the thresholds T_k (a top-k per unit), and the IoU accumulation (upsampling,
binarising, intersections, unions and mask coverage against every label layer), at the paper's q and at
a larger one (more pairs to upsample). Each stage is the median of ``--repeats`` timings. Chapter 2
dissects each of its networks once per setting, so these rates bound its dissection time.

Run: ``python benchmarks/bench_dissect.py`` (seconds on 2 CPU cores; ``--images 2000 --size 48`` for more).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pruning_utils import broden, dissect, models, runtime


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls of ``fn`` and its last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500, help="synthetic scenes dissected")
    parser.add_argument("--size", type=int, default=32, choices=(32, 48, 64), help="image side in pixels")
    parser.add_argument("--depth", type=int, default=8, choices=models.RESNET_DEPTHS, help="ResNet depth")
    parser.add_argument("--width", type=int, default=16, help="channels of the first stage")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (chapter 2 uses 1)")
    parser.add_argument("--quantile", type=float, default=0.02, help="the larger q timed beside 0.005")
    parser.add_argument("--repeats", type=int, default=3, help="timings per stage (median)")
    args = parser.parse_args(argv)
    runtime.configure(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = broden.load(broden.generate(f"{tmp}/scenes", 0, args.images, args.size, seed=0))
        concepts = broden.concept_set(data)
    model = models.CifarResNet(args.depth, num_classes=len(broden.SCENES), width=args.width).eval()
    layer = dissect.last_block(model)
    t_feat, feats = timed(lambda: dissect.layer_features(model, layer, concepts.images), args.repeats)
    t_thr, thr = timed(lambda: dissect.unit_thresholds(feats), args.repeats)
    t_iou, _ = timed(lambda: dissect.iou_matrix(feats, concepts, thr), args.repeats)
    t_big, _ = timed(lambda: dissect.dissect(feats, concepts, args.quantile), args.repeats)
    total = t_feat + t_thr + t_iou
    n = len(concepts)
    result = {"layer": layer, "units": feats.shape[1], "maps": tuple(feats.shape[2:]),
              "masks": tuple(concepts.masks.shape[1:]), "labels": len(concepts.names) - 1, "images": n,
              "features_img_per_s": n / t_feat, "thresholds_img_per_s": n / t_thr, "iou_img_per_s": n / t_iou,
              "total_img_per_s": n / total, f"dissect_q{args.quantile:g}_img_per_s": n / t_big}
    print(f"ResNet-{args.depth} (width {args.width}), {layer}: {result['units']} units, maps {result['maps']}, "
          f"{n} images of {args.size}x{args.size}, label layers {result['masks']}, {result['labels']} labels, "
          f"{args.threads} threads")
    for stage in ("features", "thresholds", "iou", "total", f"dissect_q{args.quantile:g}"):
        print(f"  {stage:<14} {result[stage + '_img_per_s']:>10.0f} images/s")
    return result


if __name__ == "__main__":
    main()
