"""Seeded training and evaluation, and the checkpoint cache every chapter loads its models from.

A checkpoint is keyed by a hash of everything that determines it (the :class:`Recipe`: model, data,
training settings; the seed; and the source code of the package modules that build and train it).
Writes go to a temporary file that is renamed into place, so an interrupted run never leaves a broken
file; loads use ``torch.load(..., weights_only=True)``; a corrupt or mismatched entry is retrained.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from .progress import bar

from . import data as data_mod
from . import models
from .params import check_choice

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "step", "none")
DEVICES = ("auto", "cpu", "cuda")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same, for shuffling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def get_device(device: str = "auto") -> torch.device:
    """'auto' gives CUDA when present, else the CPU; 'cuda' without a GPU is an error."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no GPU; use device='auto' or 'cpu'")
    return torch.device(device)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. ``augment`` adds random 4-pixel shifts and horizontal flips (CIFAR);
    ``channels_last`` trains conv nets in NHWC memory layout (about 1.7x faster on CPU for ResNets);
    ``eval_every`` evaluates on the test split every that many epochs (and always after the last).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    milestones: tuple[int, ...] = ()
    augment: bool = False
    channels_last: bool = False
    eval_every: int = 1

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model except the seed: model, data and training settings."""

    model: str
    dataset: str
    config: TrainConfig
    model_kwargs: dict = field(default_factory=dict)
    pad: int = 0
    train_subset: int | None = None

    def key(self, seed: int) -> str:
        """Cache key: hash of this recipe, the seed and the code version."""
        text = json.dumps({"recipe": asdict(self), "seed": seed, "code": code_version()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def code_version() -> str:
    """Hash of the source of the modules that define data, models and training."""
    h = hashlib.sha256()
    for mod in (data_mod, models):
        h.update(Path(mod.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def cache_dir() -> Path:
    """The checkpoint cache: ``$PRUNING_BOOK_CACHE`` or ``~/.cache/pruning_book/checkpoints``."""
    return Path(os.environ.get("PRUNING_BOOK_CACHE", Path.home() / ".cache" / "pruning_book" / "checkpoints"))


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _batches(n: int, batch_size: int, generator: torch.Generator | None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """The model's outputs (logits or log-probabilities) for all of ``x``, in eval mode, on the CPU."""
    device = torch.device(device)
    model.eval().to(device)
    return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, split: data_mod.Split, batch_size: int = 256,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    pred = predict(model, split.x, batch_size, device).argmax(1)
    return (pred == split.y).float().mean().item()


def _make_optimizer(model, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                              nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle" and total >= 8:  # shorter runs keep a constant rate
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                    pct_start=max(0.25, 2.0 / total))
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [m * steps_per_epoch for m in cfg.milestones], 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def fit(model: nn.Module, train: data_mod.Split, test: data_mod.Split | None, cfg: TrainConfig, *,
        seed: int = 0, device: str | torch.device = "auto", progress: bool = True,
        desc: str = "train") -> dict:
    """Train ``model`` in place with ``cfg``; return its history (per-step loss, per-epoch accuracies)."""
    device = get_device(device) if isinstance(device, str) else device
    gen = seed_everything(seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    opt, sched = _make_optimizer(model, cfg, steps_per_epoch)
    history = {"step": [], "loss": [], "epoch": [], "train_acc": [], "test_acc": []}
    pbar = bar(total=cfg.epochs * steps_per_epoch, desc=desc, disable=not progress, leave=False)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        correct = 0
        for idx in _batches(len(train), cfg.batch_size, gen):
            x, y = train.x[idx], train.y[idx]
            if cfg.augment:
                x = _augment(x, gen)
            x, y = x.to(device, memory_format=fmt), y.to(device)
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            correct += (out.argmax(1) == y).sum().item()
            history["step"].append(step)
            history["loss"].append(loss.item())
            pbar.update()
        history["epoch"].append(epoch)
        history["train_acc"].append(correct / len(train))
        evaluate = test is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)
        history["test_acc"].append(accuracy(model, test, device=device) if evaluate else float("nan"))
        pbar.set_postfix(test_acc=f"{history['test_acc'][-1]:.4f}")
    pbar.close()
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    return history


def load_checkpoint(path: Path, key: str, fields: tuple[str, ...] = ("state_dict",)) -> dict | None:
    """The checkpoint at ``path`` if it loads, carries ``key`` and has ``fields``; None (with a warning) if
    it is broken."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("key") != key or any(f not in ckpt for f in fields):
            raise ValueError("key mismatch or missing fields")
        return ckpt
    except Exception as err:  # a truncated or foreign file: report it and retrain
        warnings.warn(f"checkpoint {path} is unusable ({type(err).__name__}: {err}); retraining", stacklevel=2)
        return None


def train_cached(recipe: Recipe, seed: int = 0, *, device: str = "auto", download: bool = False,
                 progress: bool = True, directory: Path | None = None) -> tuple[nn.Module, dict]:
    """Load the model for ``recipe`` and ``seed`` from the cache, or train it there; return (model, record).

    The record holds the history, the test accuracy and ``cached`` (whether it came from the cache).
    """
    key = recipe.key(seed)
    path = (directory or cache_dir()) / f"{recipe.model}-{recipe.dataset}-{key}.pt"
    seed_everything(seed)
    model = build_for(recipe)
    ckpt = load_checkpoint(path, key)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
            return model.eval(), {**ckpt["record"], "cached": True, "path": str(path)}
        except RuntimeError as err:  # shapes do not match this code's model
            warnings.warn(f"checkpoint {path} does not fit the model ({err}); retraining", stacklevel=2)
            seed_everything(seed)
            model = build_for(recipe)
    train = data_mod.load(recipe.dataset, "train", pad=recipe.pad, download=download, seed=seed)
    train = train.subset(recipe.train_subset, seed)
    test = data_mod.load(recipe.dataset, "test", pad=recipe.pad, download=download, seed=seed)
    history = fit(model, train, test, recipe.config, seed=seed, device=device, progress=progress,
                  desc=f"{recipe.model} on {recipe.dataset}")
    record = {"history": history, "test_acc": history["test_acc"][-1], "n_train": len(train),
              "n_test": len(test)}
    save_atomic({"key": key, "state_dict": model.state_dict(), "record": record}, path)
    return model.eval(), {**record, "cached": False, "path": str(path)}


def build_for(recipe: Recipe) -> nn.Module:
    """A freshly initialised model as ``recipe`` describes it."""
    return models.build(recipe.model, **recipe.model_kwargs)


def with_overrides(recipe: Recipe, **changes) -> Recipe:
    """``recipe`` with the given fields (or TrainConfig fields) replaced; None values are ignored."""
    changes = {k: v for k, v in changes.items() if v is not None}
    cfg_fields = {k: changes.pop(k) for k in list(changes) if k in TrainConfig.__dataclass_fields__}
    return replace(recipe, config=replace(recipe.config, **cfg_fields), **changes)
