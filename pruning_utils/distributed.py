"""Training beyond one process: ``torchrun`` with DistributedDataParallel, and who writes the cache.

Under ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address),
:func:`init` joins the process group (NCCL where every rank has a GPU, gloo on CPUs), and from then on
:func:`pruning_utils.train.fit` trains the model as a DistributedDataParallel replica:

- each global batch of ``batch_size`` indices (the same seeded permutation on every rank) is split
  into ``world`` shards, rank ``r`` taking positions ``r, r + world, ...`` of it: what
  ``DistributedSampler`` does, for the index tensors that our training loop uses instead of a
  DataLoader. Each rank's loss is weighted by its share of the global batch, so the averaged gradient
  is the one-process gradient of the same global batch; the logged loss is the global one.
- BatchNorm statistics are per rank on CPUs (``SyncBatchNorm`` needs GPUs), so a network with BatchNorm
  follows the one-process curve closely but not to the last digit; one without matches it to rounding.
- the device of a rank is ``cuda:LOCAL_RANK`` when GPUs are present, else the CPU.

The checkpoint cache is written by rank 0 alone (atomically, :func:`pruning_utils.train.save_checkpoint`)
while the other ranks wait at a barrier and then load what it wrote (:func:`cached`), so a run on N
ranks leaves exactly one cache entry, the same file that one process would have written.

Command line (what the ``full`` sizes use on several GPUs or machines)::

    torchrun --nproc_per_node 4 -m pruning_utils.distributed resnet20 --size full --seeds 0 1 2
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 -m pruning_utils.distributed ...
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist


def is_active() -> bool:
    """Whether this process is one rank of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by torchrun), 0 outside torchrun."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when this machine has GPUs, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init(backend: str | None = None) -> bool:
    """Join the process group that torchrun describes (no-op when not launched, or already joined);
    NCCL when GPUs are present, else gloo. Returns whether this process is now a rank of a group."""
    if is_active():
        return True
    if not launched():
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend)
    return True


def finish() -> None:
    """Leave the process group (end of a torchrun script)."""
    if is_active():
        dist.destroy_process_group()


def barrier() -> None:
    if is_active():
        dist.barrier()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of one global batch of indices: positions ``rank, rank + world, ...``."""
    return batch[rank()::world_size()] if is_active() else batch


def all_sum(values: list[float]) -> list[float]:
    """Sums of ``values`` over ranks (the values themselves outside a group)."""
    if not is_active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def agree(value):
    """Rank 0's ``value`` on every rank (a picklable object), so that all ranks take the same branch."""
    if not is_active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model: torch.nn.Module, dev: torch.device) -> torch.nn.Module:
    """``model`` as a DistributedDataParallel replica on ``dev`` (the model itself outside a group)."""
    if not is_active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dev.index] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def cached(load: Callable[[], dict | None], compute: Callable[[], dict], save: Callable[[dict], None]
           ) -> tuple[dict, bool]:
    """A cache entry, computed once: ``load()`` it if rank 0 finds it, else ``compute()`` it on every rank
    (the ranks train together), ``save`` it on rank 0 only, and let the other ranks wait for that write
    and ``load()`` the entry rank 0 wrote. Returns (entry, whether it came from the cache). Outside a
    process group this is load-or-compute-and-save."""
    found = load() if rank() == 0 else None
    hit = agree(found is not None)
    if hit:
        return (found if rank() == 0 else load()), True
    entry = compute()
    if rank() == 0:
        save(entry)
    barrier()
    if rank() != 0:
        loaded = load()
        if loaded is None:
            raise RuntimeError("rank 0 wrote a cache entry that this rank cannot load; is the cache folder "
                               "shared by every machine of the run (PRUNING_BOOK_CACHE)?")
        entry = loaded
    return entry, False


def main(argv: list[str] | None = None) -> int:
    """Train baselines under torchrun into the checkpoint cache (rank 0 writes, the others load)."""
    from . import baselines
    from .train import train_cached

    parser = argparse.ArgumentParser(description="Train a baseline with DistributedDataParallel under torchrun.")
    parser.add_argument("name", choices=baselines.NAMES)
    parser.add_argument("--size", default="full", choices=baselines.SIZES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override the recipe's global batch")
    parser.add_argument("--download", action="store_true", help="allow torchvision downloads")
    parser.add_argument("--cache", type=Path, default=None, help="checkpoint cache (default: the book's)")
    args = parser.parse_args(argv)
    init()
    try:
        recipe = baselines.recipe(args.name, args.size, epochs=args.epochs, batch_size=args.batch_size)
        for seed in args.seeds:
            _, record = train_cached(recipe, seed, download=args.download, progress=rank() == 0,
                                     directory=args.cache)
            if rank() == 0:
                print(f"{args.name} seed {seed} on {world_size()} rank(s): test accuracy "
                      f"{record['test_acc']:.4f}, {'from the cache' if record['cached'] else 'trained'}: "
                      f"{record['path']}", flush=True)
    finally:
        finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
