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

import contextlib
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
    """Channels that are removed together (torch-pruning's coupled group, :func:`criteria.coupled_groups`):
    channel j of the group is output filter ``idx`` (dim 0) of every ``producers`` entry (layer name and
    its (j, idx) pairs) and input channel ``idx`` (dim 1) of every ``readers`` entry."""

    name: str
    size: int
    producers: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]
    readers: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]


def filter_groups(model: nn.Module, example_input: torch.Tensor | None = None) -> list[FilterGroup]:
    """The filter groups of ``model``, coupled through residual shortcuts and concatenations as
    torch-pruning's DependencyGraph finds them (:func:`criteria.coupled_groups`; the output layer is
    never a group). For a CIFAR ResNet: per block its inner filters (conv1, read by conv2), and per stage
    its residual stream, written by the stem conv (stage 1) or the projection shortcut and by every
    block's conv2, read by the next convs or the final linear layer. Zeroing a stream channel in all its
    producers makes that unit of every block output constant, which zeroing conv2's filter alone does not
    (the shortcut still carries the block's input). ``example_input`` defaults to one 32 x 32 image."""
    import copy

    import torch_pruning as tp

    from . import criteria

    for m in model.modules():  # a pruned weight is recomputed at every forward; a detached one copies
        if hasattr(m, "weight_mask"):
            m.weight = m.weight.detach()
    plain = copy.deepcopy(model)  # the graph is traced on a copy without pruning hooks
    for m in plain.modules():
        if hasattr(m, "weight_mask"):
            tprune.remove(m, "weight")
    if example_input is None:
        first = next((m for m in plain.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ParameterError(f"model={type(model).__name__} has no Conv2d, so no filters to prune")
        example_input = torch.zeros(1, first.in_channels, 32, 32)
    names = {m: n for n, m in plain.named_modules()}
    writes = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
    reads = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
    out = []
    for g in criteria.coupled_groups(plain, example_input):
        sites = {"producers": [], "readers": []}
        for item in g.coupled:
            kind = "producers" if item.dep.handler in writes else "readers" if item.dep.handler in reads else None
            if kind is not None:
                pairs = tuple(sorted((int(r), int(i)) for r, i in zip(item.root_idxs, item.idxs)))
                sites[kind].append((names[item.dep.target.module], pairs))
        out.append(FilterGroup(g.name, g.size, tuple(sites["producers"]), tuple(sites["readers"])))
    return out


def filter_share(rate: float) -> float:
    """The share of a group's remaining filters that a structured round removes, 1 - sqrt(1 - rate): a
    weight goes when its output or its input channel goes, so about ``rate`` of the weights go per round."""
    return 1.0 - (1.0 - rate) ** 0.5


def alive_channels(model: nn.Module, group: FilterGroup) -> torch.Tensor:
    """Boolean (group size,): the group's channels whose filters are not all zero."""
    modules = dict(model.named_modules())
    alive = torch.zeros(group.size, dtype=torch.bool)
    for name, pairs in group.producers:
        nonzero = modules[name].weight.detach().flatten(1).ne(0).any(1)
        for j, idx in pairs:
            alive[j] |= bool(nonzero[idx])
    return alive


def _mask_module(module: nn.Module, mask: torch.Tensor) -> None:
    """Multiply ``module``'s weight mask by ``mask`` (creating the mask on first use) and apply it now."""
    if hasattr(module, "weight_mask"):
        with torch.no_grad():
            module.weight_mask.mul_(mask)
            module.weight = module.weight_orig * module.weight_mask
    else:
        tprune.custom_from_mask(module, "weight", mask)


def prune_filters(model: nn.Module, rate: float, groups: list[FilterGroup] | None = None) -> dict[str, list[int]]:
    """One structured round in place: in every :func:`filter_groups` group, remove the
    :func:`filter_share` of its remaining channels (rounded, at least one while two or more remain, never
    the last) with the smallest L1 norm summed over the group's producer filters; zero those filters and
    the readers' input channels from them (which would only add a constant that the next BatchNorm or the
    linear layer's bias absorbs). Returns the group channels removed, per group."""
    modules = dict(model.named_modules())
    removed = {}
    for group in groups if groups is not None else filter_groups(model):
        alive = alive_channels(model, group)
        n_alive = int(alive.sum())
        k = min(max(round(filter_share(rate) * n_alive), 1 if n_alive > 1 else 0), max(n_alive - 1, 0))
        norms = torch.zeros(group.size, dtype=torch.float64)
        for name, pairs in group.producers:
            l1 = modules[name].weight.detach().abs().flatten(1).sum(1).double()
            for j, idx in pairs:
                norms[j] += l1[idx]
        norms[~alive] = float("inf")
        dead = set(torch.sort(norms, stable=True).indices[:k].tolist())  # ties: the lower channel first
        removed[group.name] = sorted(dead)
        if not dead:
            continue
        for sites, dim in ((group.producers, 0), (group.readers, 1)):
            for name, pairs in sites:
                w = modules[name].weight
                keep = torch.ones(w.shape[dim], dtype=w.dtype)
                keep[[idx for j, idx in pairs if j in dead]] = 0
                shape = [1] * w.dim()
                shape[dim] = -1
                _mask_module(modules[name], keep.view(shape).expand_as(w).clone())
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
        if isinstance(self.rate, bool) or not isinstance(self.rate, float) or not 0.0 < self.rate < 1.0:
            raise ParameterError(f"rate={self.rate!r} is not allowed; expected a float in (0, 1)")
        for name in ("rounds", "rewind_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(f"{name}={value!r} is not allowed; expected an int >= 0")
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
    groups = filter_groups(model) if cfg.structure == "filters" else None  # the graph is traced once
    for level in bar(range(1, cfg.rounds + 1), desc=f"IMP seed {seed}", disable=not progress, leave=False):
        if groups is None:
            prune_round(model, cfg.rate, cfg.structure)
        else:
            prune_filters(model, cfg.rate, groups)
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


def _in_pool(fn, jobs: list[Job], order: list[int], args: tuple, pool, desc: str, progress: bool) -> dict:
    """``fn(jobs[i], *args)`` for each i of ``order``, started in that order: in ``pool`` (a process pool,
    or None) when there are two or more, else here; returns {i: result}."""
    out = {}
    pbar = bar(total=len(order), desc=desc, disable=not progress or not order, leave=False)
    if pool is None or len(order) < 2:
        for i in order:
            out[i] = fn(jobs[i], *args)
            pbar.update()
    else:
        futures = {pool.submit(fn, jobs[i], *args): i for i in order}
        for future in as_completed(futures):
            out[futures[future]] = future.result()
            pbar.update()
    pbar.close()
    return out


@contextlib.contextmanager
def _pool(jobs: list[Job], workers: int, most: int):
    """``workers`` spawned processes (at most ``most``, and none for one) whose threads are the jobs'
    recipe threads (each run also pins its own, see :func:`run`); None when the work stays here."""
    if workers == 1 or most < 2:
        yield None
        return
    threads = max(_threads_of(job.cfg) for job in jobs)
    with ProcessPoolExecutor(min(workers, most), mp_context=multiprocessing.get_context("spawn"),
                             initializer=runtime.configure, initargs=(threads,)) as pool:
        yield pool


def _missing_dense(jobs: list[Job], directory: Path | None) -> tuple[list, dict, dict]:
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
    return paths, found, first


def dense_many(jobs: list[Job], train: data_mod.Split, test: data_mod.Split, *, device: str = "auto",
               workers: int = 1, progress: bool = True, directory: Path | None = None, pool=None) -> list[dict]:
    """The :func:`dense` network of each job (jobs of one seed and training recipe share one), loaded from
    the cache or trained here or in ``workers`` processes; in job order."""
    _check_workers(workers)
    paths, found, first = _missing_dense(jobs, directory)
    with contextlib.nullcontext(pool) if pool is not None else _pool(jobs, workers, len(first)) as pool:
        done = _in_pool(_dense_job, jobs, list(first.values()), (train, test, device, directory), pool,
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
    todo.sort(key=lambda i: -_cost(jobs[i].cfg))
    with _pool([jobs[i] for i in todo], workers, len(todo)) as pool:
        if todo:
            dense_many([jobs[i] for i in todo], train, test, device=device, workers=workers, progress=progress,
                       directory=directory, pool=pool)
        done = _in_pool(_run_job, jobs, todo, (train, test, device, directory), pool, "IMP runs", progress)
    for i, levels in done.items():
        results[i] = levels
    return results


def _cost(cfg: IMPConfig) -> int:
    """Epochs of training the pruning rounds of a run take (to start the longest runs first)."""
    per_round = cfg.train.epochs if cfg.retraining == "rewind" else cfg.finetune.epochs
    return cfg.rounds * per_round
