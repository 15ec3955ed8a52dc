"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019), as paper 001 prunes ResNet-50 (chapter 2).

Each round removes ``rate`` (the paper: 20%) of the remaining conv and linear weights, globally by
magnitude (``torch.nn.utils.prune.global_unstructured`` with L1Unstructured), or whole filters of a CIFAR
ResNet (:func:`prune_filters`, the paper's future work), coupled through the residual shortcuts so that a
pruned unit is constant on every input; then either rewinds the survivors to their values after
``rewind_epochs`` of training and retrains (lottery-ticket fine-tuning), or keeps the trained survivors
and fine-tunes them briefly (standard fine-tuning). Masks are forward pre-hooks, so ``train.fit`` trains a
pruned model as it is. The dense network of a seed (trained once, with its rewind point) is cached on its
own and shared by every variant that starts from it (:func:`dense_cached`).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from . import data as data_mod
from . import distributed, runtime
from . import train as train_mod
from .params import ParameterError, check_choice
from .progress import bar

STRUCTURES = ("weights", "filters")
RETRAINING = ("rewind", "finetune")


def prunable(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """The (module, 'weight') pairs that IMP prunes: every Conv2d and Linear weight."""
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def weights_remaining(model: nn.Module) -> float:
    """Share of conv and linear weights that are not zero (masked or pruned)."""
    kept = total = 0
    for m, name in prunable(model):
        w = getattr(m, name)
        kept += int(w.ne(0).sum())
        total += w.numel()
    return kept / total


def prune_round(model: nn.Module, rate: float = 0.2, structure: str = "weights") -> None:
    """One round in place: remove ``rate`` of the remaining weights globally by magnitude, or whole
    filters of a CIFAR ResNet (``structure='filters'``, :func:`prune_filters`)."""
    check_choice("structure", structure, STRUCTURES)
    if isinstance(rate, bool) or not isinstance(rate, float) or not 0.0 < rate < 1.0:
        raise ParameterError(f"rate={rate!r} is not allowed; expected a float in (0, 1)")
    if structure == "weights":
        tprune.global_unstructured(prunable(model), pruning_method=tprune.L1Unstructured, amount=rate)
        return
    prune_filters(model, rate)


@dataclass(frozen=True)
class FilterGroup:
    """Channels that are pruned together: channel j of the group is the output filter j (dim 0) of every
    module in ``producers`` and the input channel j (dim 1) of every module in ``readers``."""

    name: str
    producers: tuple[str, ...]
    readers: tuple[str, ...]


def filter_groups(model: nn.Module) -> list[FilterGroup]:
    """The prunable filter groups of a :class:`models.CifarResNet`: per block, its inner filters (conv1,
    read by conv2); per stage, its residual stream, whose channel j every block adds to through the
    shortcut: the filters j of the stage's first producer (the stem conv of stage 1, whose first block
    has an identity shortcut; the projection shortcut of the others) and of every block's conv2, read by
    the blocks' conv1, the next stage's conv1 and shortcut, or the final linear layer. Zeroing channel j
    of a stream in all its producers makes unit j of every block output of the stage constant, which
    zeroing conv2's filter alone does not (the shortcut still carries the input)."""
    from .models import CifarResNet

    if not isinstance(model, CifarResNet):
        raise ParameterError(f"model={type(model).__name__} is not allowed; filter groups are defined for "
                             "models.CifarResNet (residual streams coupled through the shortcuts)")
    stages = [(name, getattr(model, name)) for name in ("layer1", "layer2", "layer3")]
    inner = [FilterGroup(f"{s}.{b}.conv1", (f"{s}.{b}.conv1",), (f"{s}.{b}.conv2",))
             for s, stage in stages for b in range(len(stage))]
    streams = []
    for i, (s, stage) in enumerate(stages):
        first = "conv1" if isinstance(stage[0].shortcut, nn.Identity) else f"{s}.0.shortcut.conv"
        if first == "conv1" and i > 0:
            raise ParameterError(f"{s}.0 has an identity shortcut; expected a projection")  # pragma: no cover
        producers = (first, *[f"{s}.{b}.conv2" for b in range(len(stage))])
        readers = [f"{s}.{b}.conv1" for b in range(0 if first == "conv1" else 1, len(stage))]
        readers += [f"{stages[i + 1][0]}.0.conv1", f"{stages[i + 1][0]}.0.shortcut.conv"] if i + 1 < len(stages) \
            else ["fc"]
        streams.append(FilterGroup(f"{s} stream", producers, tuple(readers)))
    return streams + inner


def filter_share(rate: float) -> float:
    """The share of a group's remaining filters that a structured round removes, 1 - sqrt(1 - rate): a
    weight goes when its output or its input channel goes, so about ``rate`` of the weights go per round."""
    return 1.0 - (1.0 - rate) ** 0.5


def alive_channels(model: nn.Module, group: FilterGroup) -> torch.Tensor:
    """Boolean (channels,): the group's channels whose filters are not pruned."""
    w = dict(model.named_modules())[group.producers[0]].weight
    return w.detach().flatten(1).ne(0).any(1)


def _mask_module(module: nn.Module, mask: torch.Tensor) -> None:
    """Multiply ``module``'s weight mask by ``mask`` (creating the mask on first use) and apply it now."""
    if hasattr(module, "weight_mask"):
        with torch.no_grad():
            module.weight_mask.mul_(mask)
            module.weight = module.weight_orig * module.weight_mask
    else:
        tprune.custom_from_mask(module, "weight", mask)


def prune_filters(model: nn.Module, rate: float) -> dict[str, list[int]]:
    """One structured round in place on a CIFAR ResNet: in every :func:`filter_groups` group, remove the
    :func:`filter_share` of its remaining channels (rounded, at least one while two or more remain, never
    the last) with the smallest L1 norm summed over the group's producer filters; zero those filters
    and the readers' input channels from them (which would only add a constant that the next BatchNorm
    or the linear layer's bias absorbs). Returns the channels removed per group."""
    modules = dict(model.named_modules())
    removed = {}
    for group in filter_groups(model):
        alive = alive_channels(model, group)
        n_alive = int(alive.sum())
        k = min(max(round(filter_share(rate) * n_alive), 1 if n_alive > 1 else 0), n_alive - 1)
        if k == 0:
            removed[group.name] = []
            continue
        norms = sum(modules[p].weight.detach().abs().flatten(1).sum(1) for p in group.producers)
        norms = torch.where(alive, norms.double(), torch.full_like(norms.double(), float("inf")))
        order = torch.sort(norms, stable=True).indices  # ties: lower channel index first
        gone = torch.zeros_like(alive)
        gone[order[:k]] = True
        for p in group.producers:
            w = modules[p].weight
            _mask_module(modules[p], (~gone).to(w.dtype).view(-1, *[1] * (w.dim() - 1)).expand_as(w).clone())
        for r in group.readers:
            w = modules[r].weight
            _mask_module(modules[r], (~gone).to(w.dtype).view(1, -1, *[1] * (w.dim() - 2)).expand_as(w).clone())
        removed[group.name] = sorted(order[:k].tolist())
    return removed


def rewind(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Set every parameter and buffer of a pruned ``model`` to its value in the unpruned ``snapshot``,
    keeping the masks: ``x.weight`` of the snapshot goes to ``x.weight_orig`` where ``x`` is pruned."""
    state = model.state_dict()
    for key, value in snapshot.items():
        target = key + "_orig" if key + "_orig" in state else key
        if target not in state:
            raise ParameterError(f"snapshot entry {key!r} has no counterpart in the model")
        state[target] = value.clone()
    model.load_state_dict(state)
    with torch.no_grad():  # recompute weight = weight_orig * weight_mask now, not at the next forward
        for m, name in prunable(model):
            if hasattr(m, name + "_mask"):
                setattr(m, name, getattr(m, name + "_orig") * getattr(m, name + "_mask"))


def effective_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain (unpruned-module) model with the masks applied: zeros where pruned."""
    state = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            key, value = key[:-5], value * state[key[:-5] + "_mask"]
        out[key] = value.detach().clone()
    return out


def rounds_to_reach(remaining: float, rate: float = 0.2) -> int:
    """The number of rounds r with (1 - rate)^r <= ``remaining`` for the first time."""
    r = 0
    while (1 - rate) ** r > remaining + 1e-12:
        r += 1
    return r


@dataclass(frozen=True)
class IMPConfig:
    """One IMP run: rounds, rate, structure, how to retrain (rewind or finetune), the training settings."""

    rounds: int
    train: train_mod.TrainConfig
    rewind_epochs: int = 1
    rate: float = 0.2
    structure: str = "weights"
    retraining: str = "rewind"
    finetune: train_mod.TrainConfig | None = None

    def __post_init__(self):
        check_choice("structure", self.structure, STRUCTURES)
        check_choice("retraining", self.retraining, RETRAINING)
        if self.retraining == "finetune" and self.finetune is None:
            raise ParameterError("retraining='finetune' needs a finetune TrainConfig")


def _threads_of(cfg: IMPConfig) -> int:
    return cfg.train.threads


def dense(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig, *,
          seed: int = 0, device: str = "auto") -> dict:
    """The dense network of one seed that every IMP variant starts from: ``init`` (W_0, the fresh
    ``build()`` after seeding: the random-init null of this seed), ``rewind`` (W_rewind, after
    ``rewind_epochs`` of training), ``state`` (the dense network trained from W_rewind) and its
    ``test_acc``. Runs on ``cfg.train.threads`` threads, whatever the process's own setting."""
    with runtime.threads(cfg.train.threads):
        train_mod.seed_everything(seed)
        model = build()
        init = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.rewind_epochs > 0:
            pre = replace(cfg.train, epochs=cfg.rewind_epochs)
            train_mod.fit(model, train, None, pre, seed=seed, device=device, progress=False)
        snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        train_mod.fit(model, train, None, cfg.train, seed=seed, device=device, progress=False)
        return {"init": init, "rewind": snapshot, "state": effective_state(model),
                "test_acc": train_mod.accuracy(model, test)}


def run(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig, *,
        seed: int = 0, device: str = "auto", progress: bool = True, start: dict | None = None) -> list[dict]:
    """IMP from the :func:`dense` network of ``seed`` (``start``, computed here if None): level 0 is the
    dense network; each round then prunes, rewinds to W_rewind (or keeps the weights, for 'finetune')
    and retrains. Returns one record per level: level, weights_remaining, test_acc, state (masks
    applied). Everything runs on ``cfg.train.threads`` threads, whatever the process's own setting."""
    if start is None:
        start = dense(build, train, test, cfg, seed=seed, device=device)
    with runtime.threads(cfg.train.threads):
        return _run(build, train, test, cfg, seed, device, progress, start)


def _run(build, train, test, cfg, seed, device, progress, start):
    model = build()
    model.load_state_dict(start["state"])
    levels = [{"level": 0, "weights_remaining": weights_remaining(model), "test_acc": start["test_acc"],
               "state": effective_state(model)}]
    for level in bar(range(1, cfg.rounds + 1), desc=f"IMP seed {seed}", disable=not progress, leave=False):
        prune_round(model, cfg.rate, cfg.structure)
        if cfg.retraining == "rewind":
            rewind(model, start["rewind"])
            train_mod.fit(model, train, None, cfg.train, seed=seed + level, device=device, progress=False)
        else:
            train_mod.fit(model, train, None, cfg.finetune, seed=seed + level, device=device, progress=False)
        levels.append({"level": level, "weights_remaining": weights_remaining(model),
                       "test_acc": train_mod.accuracy(model, test), "state": effective_state(model)})
    return levels


def _key(what: dict, directory: Path | None, prefix: str) -> tuple[Path, str]:
    text = json.dumps({**what, "code": train_mod.code_version(),
                       "imp": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]},
                      sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return (directory or train_mod.cache_dir()) / f"{prefix}-{key}.pt", key


def _cache_path(cfg: IMPConfig, key_extra: dict, seed: int, directory: Path | None) -> tuple[Path, str]:
    """The cache file of one IMP run and the key stored in it."""
    return _key({"cfg": asdict(cfg), "extra": key_extra, "seed": seed}, directory, "imp")


def _dense_path(cfg: IMPConfig, key_extra: dict, seed: int, directory: Path | None) -> tuple[Path, str]:
    """The cache file of one seed's dense network: only the training settings and the rewind point count."""
    return _key({"train": asdict(cfg.train), "rewind_epochs": cfg.rewind_epochs, "extra": key_extra,
                 "seed": seed}, directory, "imp-dense")


def _entry(path: Path, key: str, field: str, compute: Callable[[], object]) -> tuple[object, bool]:
    """The ``field`` of the cache entry at ``path``: loaded, or computed and saved; (value, from cache).
    One process computes an entry while others wanting it wait; under torchrun all ranks compute and
    rank 0 alone writes (:func:`pruning_utils.distributed.cached`)."""
    def load():
        ckpt = train_mod.load_checkpoint(path, key, fields=(field,))
        return None if ckpt is None else ckpt[field]

    with train_mod.cache_lock(path):
        return distributed.cached(load, compute, lambda value: train_mod.save_checkpoint({"key": key, field: value},
                                                                                          path))


def dense_cached(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig,
                 key_extra: dict, *, seed: int = 0, device: str = "auto", directory: Path | None = None
                 ) -> tuple[dict, bool]:
    """:func:`dense`, cached under the checkpoint cache; returns (dense, whether it came from the cache)."""
    path, key = _dense_path(cfg, key_extra, seed, directory)
    return _entry(path, key, "dense", lambda: dense(build, train, test, cfg, seed=seed, device=device))


def run_cached(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig,
               key_extra: dict, *, seed: int = 0, device: str = "auto", progress: bool = True,
               directory: Path | None = None) -> tuple[list[dict], bool]:
    """:func:`run`, cached under the checkpoint cache keyed by ``cfg``, ``key_extra`` (model and data
    settings), the seed and the code version, from the cached :func:`dense` network of the seed;
    returns (levels, whether they came from the cache)."""
    path, key = _cache_path(cfg, key_extra, seed, directory)

    def compute():
        start = dense_cached(build, train, test, cfg, key_extra, seed=seed, device=device, directory=directory)[0]
        return run(build, train, test, cfg, seed=seed, device=device, progress=progress, start=start)

    return _entry(path, key, "levels", compute)


@dataclass(frozen=True)
class Job:
    """One independent IMP run of :func:`run_many`: a picklable ``build`` (e.g. a functools.partial of a
    model class), its config, the cache-key extras and the seed."""

    build: Callable[[], nn.Module]
    cfg: IMPConfig
    key_extra: dict
    seed: int = 0


def _dense_job(job: Job, train: data_mod.Split, test: data_mod.Split, device: str, directory: Path | None):
    return dense_cached(job.build, train, test, job.cfg, job.key_extra, seed=job.seed, device=device,
                        directory=directory)[0]


def _run_job(job: Job, train: data_mod.Split, test: data_mod.Split, device: str, directory: Path | None):
    return run_cached(job.build, train, test, job.cfg, job.key_extra, seed=job.seed, device=device,
                      progress=False, directory=directory)[0]


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ParameterError(f"workers={workers!r} is not allowed; expected an int >= 1")


def _in_pool(fn, jobs: list[Job], order: list[int], args: tuple, workers: int, desc: str, progress: bool) -> dict:
    """``fn(jobs[i], *args)`` for each i of ``order``: here (one worker, or one job) or in ``workers``
    spawned processes, started in the given order; returns {i: result}."""
    out = {}
    pbar = bar(total=len(order), desc=f"{desc} ({min(workers, max(len(order), 1))} processes)",
               disable=not progress or not order, leave=False)
    if workers == 1 or len(order) < 2:
        for i in order:
            out[i] = fn(jobs[i], *args)
            pbar.update()
    else:
        threads = max(_threads_of(jobs[i].cfg) for i in order)  # each run also pins its own (see run)
        with ProcessPoolExecutor(min(workers, len(order)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=runtime.configure, initargs=(threads,)) as pool:
            futures = {pool.submit(fn, jobs[i], *args): i for i in order}
            for future in as_completed(futures):
                out[futures[future]] = future.result()
                pbar.update()
    pbar.close()
    return out


def dense_many(jobs: list[Job], train: data_mod.Split, test: data_mod.Split, *, device: str = "auto",
               workers: int = 1, progress: bool = True, directory: Path | None = None) -> list[dict]:
    """The :func:`dense` network of each job (jobs of one seed and training recipe share one), loaded from
    the cache or trained here or in ``workers`` processes; in job order."""
    _check_workers(workers)
    paths = [_dense_path(job.cfg, job.key_extra, job.seed, directory) for job in jobs]
    found, first = {}, {}
    for i, (path, key) in enumerate(paths):
        if path in first or path in found:
            continue
        ckpt = train_mod.load_checkpoint(path, key, fields=("dense",))
        if ckpt is None:
            first[path] = i
        else:
            found[path] = ckpt["dense"]
    done = _in_pool(_dense_job, jobs, list(first.values()), (train, test, device, directory), workers,
                    "dense networks", progress)
    found |= {path: done[i] for path, i in first.items()}
    return [found[path] for path, _ in paths]


def run_many(jobs: list[Job], train: data_mod.Split, test: data_mod.Split, *, device: str = "auto",
             workers: int = 1, progress: bool = True, directory: Path | None = None) -> list[list[dict]]:
    """:func:`run_cached` for independent runs (trials, variants), in job order. Cached runs are loaded;
    the others run here (``workers=1``) or in ``workers`` spawned processes: first the dense networks
    they start from (one per seed, shared by the variants), then the pruning runs, longest first. On a
    small CPU model that is up to ``workers`` times faster (a round itself is sequential). Each run trains
    on its recipe's thread count, so ``workers`` changes the time taken, never the result."""
    _check_workers(workers)
    results: list[list[dict] | None] = [None] * len(jobs)
    todo = []
    for i, job in enumerate(jobs):
        path, key = _cache_path(job.cfg, job.key_extra, job.seed, directory)
        ckpt = train_mod.load_checkpoint(path, key, fields=("levels",))
        if ckpt is None:
            todo.append(i)
        else:
            results[i] = ckpt["levels"]
    if todo:
        dense_many([jobs[i] for i in todo], train, test, device=device, workers=workers, progress=progress,
                   directory=directory)
    todo.sort(key=lambda i: -_cost(jobs[i].cfg))
    done = _in_pool(_run_job, jobs, todo, (train, test, device, directory), workers, "IMP runs", progress)
    for i, levels in done.items():
        results[i] = levels
    return results


def _cost(cfg: IMPConfig) -> int:
    """Epochs of training the pruning rounds of a run take (to start the longest runs first)."""
    per_round = cfg.train.epochs if cfg.retraining == "rewind" else cfg.finetune.epochs
    return cfg.rounds * per_round
