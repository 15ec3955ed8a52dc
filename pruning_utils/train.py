"""Seeded training and evaluation, and the checkpoint cache every chapter loads its models from.

A checkpoint is keyed by a hash of everything that determines it (the :class:`Recipe`: model, data,
training settings; the seed; and the source code of the package modules that build and train it).
Writes go to a temporary file that is renamed into place, so an interrupted run never leaves a broken
file; loads use ``torch.load(..., weights_only=True)``; a corrupt or mismatched entry is retrained.
A lock file per entry makes a second process that wants the same model (another chapter run in
parallel) wait for the first to train it instead of training it again. Under ``torchrun``, :func:`fit`
trains a DistributedDataParallel replica on each rank and rank 0 alone writes the cache
(:mod:`pruning_utils.distributed`). Every checkpoint a process loads or writes is recorded in the file
named by ``$PRUNING_BOOK_DEPS_LOG`` when it is set: the chapter runner keys its cache of executed
chapters on those checkpoints (:mod:`pruning_utils.chapters`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune
from .progress import bar

from . import data as data_mod
from . import distributed, models, runtime
from .params import check_choice
from .runtime import seed_everything  # noqa: F401  (re-exported: the book's one seeding function)

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("onecycle", "cosine", "step", "none")
DEVICES = ("auto", "cpu", "cuda")


def get_device(device: str = "auto") -> torch.device:
    """'auto' gives CUDA when present, else the CPU; 'cuda' without a GPU is an error. Under torchrun the
    GPU is the local rank's own (:func:`distributed.device`)."""
    check_choice("device", device, DEVICES)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no GPU; use device='auto' or 'cpu'")
    if device == "cuda" and distributed.is_active():
        return distributed.device()
    return torch.device(device)


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. ``augment`` adds random 4-pixel shifts and horizontal flips (CIFAR);
    ``channels_last`` trains conv nets in NHWC memory layout (about 1.7x faster on CPU for ResNets);
    ``eval_every`` evaluates on the test split every that many epochs (and always after the last);
    ``threads`` is the intra-op thread count training runs with, part of the recipe because the weights
    depend on it (see :mod:`pruning_utils.runtime`).
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
    threads: int = runtime.DEFAULT_THREADS

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads={self.threads!r} is not allowed; expected an int >= 1")


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


class CacheNotWritable(PermissionError):
    """The checkpoint cache cannot be written, so a trained model would be lost."""


STALE_TMP_SECONDS = 24 * 3600


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def remove_stale_temporaries(folder: Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete the ``*.tmp`` files that an interrupted :func:`save_atomic` left in ``folder``: those whose
    writer (the process id in the name) has exited, and any older than ``max_age`` seconds."""
    removed = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for tmp in folder.glob("*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 3)[-3]) if tmp.name.count(".") >= 3 else None
        except ValueError:
            pid = None
        try:
            old = now - tmp.stat().st_mtime > max_age
        except FileNotFoundError:
            continue
        if old or (pid is not None and pid != os.getpid() and not _pid_alive(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def ensure_writable(folder: Path) -> None:
    """Raise :class:`CacheNotWritable`, saying how to choose another folder, unless ``folder`` can be
    created and written; called before any training, so no work is lost to a failed save."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise CacheNotWritable(
            f"the checkpoint cache {folder} is not writable ({type(err).__name__}: {err}); set "
            "PRUNING_BOOK_CACHE to a folder you can write, e.g. `export PRUNING_BOOK_CACHE=$HOME/pruning-cache`"
        ) from err


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file in the same folder (named with this process id), then rename it
    over ``path``; a folder squatting on ``path`` is removed first, stale temporaries are cleaned."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.is_dir() and not path.is_symlink():
            warnings.warn(f"{path} is a folder where a checkpoint belongs; replacing it", stacklevel=2)
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def content_hash(obj) -> str:
    """SHA-256 of a checkpoint's content: nested dicts (in key order), lists and tensors (name, dtype,
    shape and bytes) and plain values. Stored with each checkpoint, so damage inside a tensor, which
    ``torch.load`` does not detect, is caught on load."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}|".encode())
            for k in sorted(x, key=str):
                h.update(f"{k!s}:".encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}|".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}|".encode())

    walk(obj)
    return h.hexdigest()


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _finite(obj) -> bool:
    return all(torch.isfinite(t).all().item() for t in _tensors(obj) if t.is_floating_point())


DEPS_LOG = "PRUNING_BOOK_DEPS_LOG"


def record_dependency(path: Path, sha256: str) -> None:
    """Append (path, content hash) of a checkpoint this process used to ``$PRUNING_BOOK_DEPS_LOG``, if set
    (one JSON line per use; appends of one short line are atomic, so worker processes may share it)."""
    log = os.environ.get(DEPS_LOG)
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"path": str(Path(path).resolve()), "sha256": sha256}) + "\n")


def save_checkpoint(payload: dict, path: Path) -> None:
    """:func:`save_atomic` of ``payload`` plus its :func:`content_hash` under ``"sha256"``."""
    body = {k: v for k, v in payload.items() if k != "sha256"}
    sha = content_hash(body)
    save_atomic({**body, "sha256": sha}, path)
    record_dependency(path, sha)


@contextlib.contextmanager
def cache_lock(path: Path):
    """Hold an exclusive lock on the cache entry ``path`` (a ``.lock`` file beside it) for the body, so
    that processes wanting the same entry compute it once: the others wait, then find it cached. Only
    rank 0 of a torchrun group locks; a folder that cannot be written is not locked (a read-only cache
    still serves its entries)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fcntl = None
    if fcntl is None or distributed.rank() != 0:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a+")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


@contextlib.contextmanager
def inference_layout(model: nn.Module, x: torch.Tensor, device: torch.device):
    """Run the body with ``model`` in eval mode on ``device``, in channels_last when ``x`` holds images
    (oneDNN's faster layout on this CPU: ResNet-20 inference about 1.4x faster; the same function), and
    yield the layout the inputs must take. Every 4-D parameter and buffer (pruning's masks included)
    gets its own tensor back after, and torch pruning's masked weights are recomputed from them, as a
    forward pass in the model's own layouts would set them."""
    with torch.inference_mode(False), torch.no_grad():  # weights stay usable by autograd afterwards
        model.eval().to(device)
    if x.dim() != 4:
        yield torch.contiguous_format
        return
    params = [(p, p.data) for p in model.parameters() if p.dim() == 4]
    buffers = [(m._buffers, name, b) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.dim() == 4]
    with torch.inference_mode(False), torch.no_grad():
        model.to(memory_format=torch.channels_last)
    try:
        yield torch.channels_last
    finally:
        for p, data in params:
            p.data = data
        for where, name, t in buffers:
            where[name] = t
        refresh_pruned_weights(model)


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute torch pruning's masked weight attributes (``weight = weight_orig * weight_mask``) from
    the parameters and masks as they are now, as the next forward pass would. Needed after a change of
    memory layout: the attribute otherwise keeps the last forward pass's layout, and torch pruning's
    ``global_unstructured`` fails on a channels_last ``weight`` (it flattens it with ``view``)."""
    with torch.inference_mode(False), torch.no_grad():
        for m in model.modules():
            for hook in list(m._forward_pre_hooks.values()):
                if isinstance(hook, torch_prune.BasePruningMethod):
                    hook(m, None)


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 256, device: str | torch.device = "cpu") -> torch.Tensor:
    """The model's outputs (logits or log-probabilities) for all of ``x``, in eval mode, on the CPU
    (images in channels_last: :func:`inference_layout`)."""
    device = torch.device(device)
    with inference_layout(model, x, device) as fmt, torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size].to(device, memory_format=fmt)).cpu()
                          for i in range(0, len(x), batch_size)])


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
    """Train ``model`` in place with ``cfg`` on ``cfg.threads`` threads; return its history (per-step loss,
    per-epoch accuracies)."""
    with runtime.threads(cfg.threads):
        return _fit(model, train, test, cfg, seed, device, progress, desc)


def _fit(model, train, test, cfg, seed, device, progress, desc):
    device = get_device(device) if isinstance(device, str) else device
    gen = seed_everything(seed)
    channels_last = cfg.channels_last and runtime.channels_last_safe(model)  # see channels_last_safe
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt)
    net = distributed.wrap(model, device)  # the model itself in one process
    world = distributed.world_size()
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
                x = _augment(x, gen)  # drawn for the whole global batch, so every rank stays in step
            if world > 1:  # this rank's shard; its loss weighted by its share of the global batch
                x, y = distributed.shard(x), distributed.shard(y)
            x, y = x.to(device, memory_format=fmt), y.to(device)
            out = net(x)
            loss = F.cross_entropy(out, y) if len(y) else out.sum() * 0.0
            opt.zero_grad(set_to_none=True)
            (loss * (len(y) * world / len(idx)) if world > 1 else loss).backward()
            opt.step()
            sched.step()
            step += 1
            hits, loss_value = (out.argmax(1) == y).sum().item(), loss.item()
            if world > 1:  # the global batch's loss and hits, as one process would log them
                loss_sum, hits = distributed.all_sum([loss_value * len(y), hits])
                loss_value, hits = loss_sum / len(idx), int(round(hits))
            correct += hits
            history["step"].append(step)
            history["loss"].append(loss_value)
            pbar.update()
        history["epoch"].append(epoch)
        history["train_acc"].append(correct / len(train))
        evaluate = test is not None and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs)
        history["test_acc"].append(accuracy(model, test, device=device) if evaluate else float("nan"))
        pbar.set_postfix(test_acc=f"{history['test_acc'][-1]:.4f}")
    pbar.close()
    model.to("cpu", memory_format=torch.contiguous_format).eval()
    refresh_pruned_weights(model)  # the masked weights of the last training step were channels_last
    return history


def load_checkpoint(path: Path, key: str, fields: tuple[str, ...] = ("state_dict",)) -> dict | None:
    """The checkpoint at ``path`` if it loads (``weights_only=True``), carries ``key`` and ``fields``, its
    content matches the stored hash (:func:`save_checkpoint`) and is finite, and its record (if any) is a
    dict; else None, with a warning naming the file, so that the caller recomputes it."""
    if not path.exists():
        return None
    try:
        if path.is_dir():
            raise IsADirectoryError("a folder, not a file")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("key") != key:
            raise ValueError("not a checkpoint of this recipe (key mismatch)")
        missing = [f for f in fields if f not in ckpt]
        if missing:
            raise ValueError(f"missing field(s) {', '.join(missing)}")
        for f in fields:
            if f == "record" and not isinstance(ckpt[f], dict):
                raise ValueError(f"'record' is a {type(ckpt[f]).__name__}, not a dict")
        body = {k: v for k, v in ckpt.items() if k != "sha256"}
        if ckpt.get("sha256") != content_hash(body):
            raise ValueError("the content does not match its stored hash (damaged or unhashed file)")
        if not _finite(body):
            raise ValueError("the weights hold NaN or infinity")
        record_dependency(path, ckpt["sha256"])
        return ckpt
    except Exception as err:  # a truncated, damaged or foreign file: report it and recompute
        warnings.warn(f"checkpoint {path} is unusable ({type(err).__name__}: {err}); retraining", stacklevel=2)
        return None


def check_trained(acc: float, n_classes: int, what: str, margin: float = 0.1) -> float:
    """Return ``acc`` unless it is within ``margin`` of chance (1 / ``n_classes``); then stop the chapter
    with an error naming the model, because every result built on an untrained network is an artefact."""
    chance = 1.0 / n_classes
    if not math.isfinite(acc) or acc < chance + margin:
        raise UntrainedModel(
            f"{what} reached test accuracy {acc:.3f}, within {margin:.2f} of chance ({chance:.3f}): it did not "
            "learn its task, and nothing measured on it would mean anything. Train it longer or at another "
            "learning rate (the chapter's epochs / lr parameters), or check the data.")
    return acc


class UntrainedModel(RuntimeError):
    """A model that a chapter depends on is at (or near) chance accuracy."""


def train_cached(recipe: Recipe, seed: int = 0, *, device: str = "auto", download: bool = False,
                 progress: bool = True, directory: Path | None = None) -> tuple[nn.Module, dict]:
    """Load the model for ``recipe`` and ``seed`` from the cache, or train it there; return (model, record).

    The record holds the history, the test accuracy and ``cached`` (whether it came from the cache). A
    cache entry that is damaged, foreign or malformed is retrained (with a warning naming the file). A
    process that finds another training the same entry waits for it (:func:`cache_lock`); under
    torchrun all ranks train together and rank 0 writes the entry (:func:`distributed.cached`).
    """
    key = recipe.key(seed)
    folder = Path(directory) if directory is not None else cache_dir()
    path = folder / f"{recipe.model}-{recipe.dataset}-{key}.pt"
    seed_everything(seed)
    model = build_for(recipe)

    def load():
        nonlocal model
        ckpt = load_checkpoint(path, key, ("state_dict", "record"))
        if ckpt is None:
            return None
        try:
            model.load_state_dict(ckpt["state_dict"])
            return ckpt["record"]
        except RuntimeError as err:  # shapes do not match this code's model
            warnings.warn(f"checkpoint {path} does not fit the model ({err}); retraining", stacklevel=2)
            seed_everything(seed)
            model = build_for(recipe)
            return None

    def compute():
        ensure_writable(folder)
        train = data_mod.load(recipe.dataset, "train", pad=recipe.pad, download=download, seed=seed)
        train = train.subset(recipe.train_subset, seed)
        test = data_mod.load(recipe.dataset, "test", pad=recipe.pad, download=download, seed=seed)
        history = fit(model, train, test, recipe.config, seed=seed, device=device, progress=progress,
                      desc=f"{recipe.model} on {recipe.dataset}")
        return {"history": history, "test_acc": history["test_acc"][-1], "n_train": len(train),
                "n_test": len(test)}

    def save(record):
        save_checkpoint({"key": key, "state_dict": model.state_dict(), "record": record}, path)

    with cache_lock(path):
        record, hit = distributed.cached(load, compute, save)
    return model.eval(), {**record, "cached": hit, "path": str(path)}


def build_for(recipe: Recipe) -> nn.Module:
    """A freshly initialised model as ``recipe`` describes it."""
    return models.build(recipe.model, **recipe.model_kwargs)


def with_overrides(recipe: Recipe, **changes) -> Recipe:
    """``recipe`` with the given fields (or TrainConfig fields) replaced; None values are ignored."""
    changes = {k: v for k, v in changes.items() if v is not None}
    cfg_fields = {k: changes.pop(k) for k in list(changes) if k in TrainConfig.__dataclass_fields__}
    return replace(recipe, config=replace(recipe.config, **cfg_fields), **changes)
