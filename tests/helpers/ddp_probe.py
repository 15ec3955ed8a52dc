"""Run under torchrun by tests/test_distributed.py: DDP training, the checkpoint cache and IMP, on CPU.

``torchrun --standalone --nproc_per_node 2 tests/helpers/ddp_probe.py OUT CACHE`` writes OUT/rank<r>.json
with the loss curve of :func:`train.fit` on a small synthetic task, and what :func:`train.train_cached`
and :func:`imp.run_cached` returned on this rank.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from pruning_utils import data, distributed, imp, runtime, train

SIDE, CLASSES, N = 8, 4, 201


def synthetic(seed: int) -> data.Split:
    """Images whose class is the quadrant holding the brightest pixel (learnable by a small MLP)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 1, SIDE, SIDE, generator=g)
    flat = x.flatten(1).argmax(1)
    row, col = flat // SIDE, flat % SIDE
    y = (row >= SIDE // 2).long() * 2 + (col >= SIDE // 2).long()
    return data.Split(x, y, tuple(map(str, range(CLASSES))), "synthetic")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 32), nn.ReLU(), nn.Linear(32, CLASSES))


CFG = train.TrainConfig(epochs=2, batch_size=32, lr=0.05, threads=1)  # 201 = 6 x 32 + 9: a last batch that splits 5 + 4
RECIPE = train.Recipe("lenet300100", "mnist5k", train.TrainConfig(epochs=1, batch_size=64, lr=0.05, threads=1),
                      train_subset=256)
IMP = imp.IMPConfig(rounds=1, train=train.TrainConfig(epochs=1, batch_size=32, lr=0.05, threads=1),
                    rewind_epochs=1)


def main(out: str, cache: str) -> None:
    runtime.configure(1)
    assert distributed.init(), "not launched by torchrun"
    history = train.fit(mlp(), synthetic(0), synthetic(1), CFG, seed=3, progress=False)
    model, record = train.train_cached(RECIPE, 0, progress=False, directory=Path(cache))
    levels, hit = imp.run_cached(mlp, synthetic(0), synthetic(1), IMP, {"probe": "mlp"}, seed=0,
                                 progress=False, directory=Path(cache))
    result = {"rank": distributed.rank(), "world": distributed.world_size(), "device": str(distributed.device()),
              "loss": history["loss"], "train_acc": history["train_acc"],
              "baseline_hash": train.content_hash(model.state_dict()), "baseline_cached": record["cached"],
              "imp_hash": train.content_hash([lv["state"] for lv in levels]), "imp_cached": hit}
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:3])
