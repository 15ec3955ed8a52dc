"""Iterative magnitude pruning with rewinding (Frankle & Carbin 2019), as paper 001 prunes ResNet-50 (chapter 2).

Each round removes ``rate`` (20%) of the remaining conv and linear weights, globally by magnitude
(``torch.nn.utils.prune.global_unstructured`` with L1Unstructured), or 20% of each conv layer's remaining
filters by L1 norm (``ln_structured``, the paper's future work); then either rewinds the survivors to
their values after ``rewind_epochs`` of training and retrains (lottery-ticket fine-tuning), or keeps the
trained survivors and fine-tunes them briefly (standard fine-tuning). Masks are forward pre-hooks, so
``train.fit`` trains a pruned model as it is.
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
from . import runtime
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
    """One round in place: remove ``rate`` of the remaining weights globally by magnitude, or ``rate`` of
    each conv layer's remaining filters by L1 norm (``structure='filters'``; linear layers are kept)."""
    check_choice("structure", structure, STRUCTURES)
    if not 0.0 < rate < 1.0:
        raise ParameterError(f"rate={rate!r} is not allowed; expected a float in (0, 1)")
    if structure == "weights":
        tprune.global_unstructured(prunable(model), pruning_method=tprune.L1Unstructured, amount=rate)
        return
    for m, name in prunable(model):
        if isinstance(m, nn.Conv2d) and m.out_channels > 1:
            tprune.ln_structured(m, name, amount=rate, n=1, dim=0)


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


def run(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig, *,
        seed: int = 0, device: str = "auto", progress: bool = True) -> list[dict]:
    """IMP from a fresh ``build()``: train ``rewind_epochs`` and snapshot W_rewind; train the dense level
    from there; then each round prune, rewind to W_rewind (or keep the weights, for 'finetune') and
    retrain. Returns one record per level: level, weights_remaining, test_acc, state (masks applied).
    Everything runs on ``cfg.train.threads`` threads, whatever the process's own setting."""
    with runtime.threads(cfg.train.threads):
        return _run(build, train, test, cfg, seed, device, progress)


def _run(build, train, test, cfg, seed, device, progress):
    train_mod.seed_everything(seed)
    model = build()
    pre = replace(cfg.train, epochs=cfg.rewind_epochs)
    if cfg.rewind_epochs > 0:
        train_mod.fit(model, train, None, pre, seed=seed, device=device, progress=False)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    levels = []
    for level in bar(range(cfg.rounds + 1), desc=f"IMP seed {seed}", disable=not progress, leave=False):
        if level > 0:
            prune_round(model, cfg.rate, cfg.structure)
        if level == 0 or cfg.retraining == "rewind":
            if level > 0:
                rewind(model, snapshot)
            train_mod.fit(model, train, None, cfg.train, seed=seed + level, device=device, progress=False)
        else:
            train_mod.fit(model, train, None, cfg.finetune, seed=seed + level, device=device, progress=False)
        levels.append({"level": level, "weights_remaining": weights_remaining(model),
                       "test_acc": train_mod.accuracy(model, test), "state": effective_state(model)})
    return levels


def _cache_path(cfg: IMPConfig, key_extra: dict, seed: int, directory: Path | None) -> tuple[Path, str]:
    """The cache file of one IMP run and the key stored in it."""
    text = json.dumps({"cfg": asdict(cfg), "extra": key_extra, "seed": seed, "code": train_mod.code_version(),
                       "imp": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]},
                      sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:20]
    return (directory or train_mod.cache_dir()) / f"imp-{key}.pt", key


def run_cached(build: Callable[[], nn.Module], train: data_mod.Split, test: data_mod.Split, cfg: IMPConfig,
               key_extra: dict, *, seed: int = 0, device: str = "auto", progress: bool = True,
               directory: Path | None = None) -> tuple[list[dict], bool]:
    """:func:`run`, cached under the checkpoint cache keyed by ``cfg``, ``key_extra`` (model and data
    settings), the seed and the code version; returns (levels, whether they came from the cache)."""
    path, key = _cache_path(cfg, key_extra, seed, directory)
    ckpt = train_mod.load_checkpoint(path, key, fields=("levels",))
    if ckpt is not None:
        return ckpt["levels"], True
    levels = run(build, train, test, cfg, seed=seed, device=device, progress=progress)
    train_mod.save_checkpoint({"key": key, "levels": levels}, path)
    return levels, False


@dataclass(frozen=True)
class Job:
    """One independent IMP run of :func:`run_many`: a picklable ``build`` (e.g. a functools.partial of a
    model class), its config, the cache-key extras and the seed."""

    build: Callable[[], nn.Module]
    cfg: IMPConfig
    key_extra: dict
    seed: int = 0


def _run_job(job: Job, train: data_mod.Split, test: data_mod.Split, device: str, directory: Path | None):
    return run_cached(job.build, train, test, job.cfg, job.key_extra, seed=job.seed, device=device,
                      progress=False, directory=directory)[0]


def run_many(jobs: list[Job], train: data_mod.Split, test: data_mod.Split, *, device: str = "auto",
             workers: int = 1, progress: bool = True, directory: Path | None = None) -> list[list[dict]]:
    """:func:`run_cached` for independent runs (trials, variants), in job order. Cached runs are loaded;
    the others run here (``workers=1``) or in ``workers`` spawned processes, longest first, which on a
    small CPU model is up to ``workers`` times faster (a round itself is sequential). Each run trains on
    its recipe's thread count, so ``workers`` changes the time taken, never the result."""
    if not isinstance(workers, int) or workers < 1:
        raise ParameterError(f"workers={workers!r} is not allowed; expected an int >= 1")
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
    pbar = bar(total=len(todo), desc=f"IMP runs ({min(workers, max(len(todo), 1))} processes)",
               disable=not progress or not todo, leave=False)
    if workers == 1 or len(todo) < 2:
        for i in todo:
            results[i] = _run_job(jobs[i], train, test, device, directory)
            pbar.update()
    else:
        threads = max(jobs[i].cfg.train.threads for i in todo)  # each run also pins its own (see run)
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=runtime.configure, initargs=(threads,)) as pool:
            futures = {pool.submit(_run_job, jobs[i], train, test, device, directory): i for i in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                pbar.update()
    pbar.close()
    return results


def _cost(cfg: IMPConfig) -> int:
    """Epochs of training an IMP run takes (to start the longest runs first)."""
    per_round = cfg.train.epochs if cfg.retraining == "rewind" else cfg.finetune.epochs
    return cfg.rewind_epochs + cfg.train.epochs + cfg.rounds * per_round
