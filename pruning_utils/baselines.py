"""The baseline models every chapter reuses, one training recipe per run size (chapter 0 trains them).

A later chapter calls :func:`load` with the same name, size and seed and gets chapter 0's cached model.
"""
from __future__ import annotations

from dataclasses import replace

from torch import nn

from .params import check_choice
from .train import Recipe, TrainConfig, train_cached, with_overrides

NAMES = ("lenet5", "lenet300100", "resnet20")
SIZES = ("smoke", "default", "full")
IN_CHANNELS = {"mnist5k": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3}
IMAGE_SIDE = {"mnist5k": 28, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}

_LENET5 = TrainConfig(epochs=20, batch_size=32, lr=0.1, weight_decay=5e-4)
_LENET300 = TrainConfig(epochs=20, batch_size=128, lr=0.1, weight_decay=1e-4)
# Two epochs fit the 5-minute CPU budget of chapter 0 (about 110 s an epoch with channels_last).
_RESNET = TrainConfig(epochs=2, batch_size=256, lr=0.2, weight_decay=5e-4, channels_last=True)

RECIPES: dict[str, dict[str, Recipe]] = {
    "smoke": {
        "lenet5": Recipe("lenet5", "mnist5k", replace(_LENET5, epochs=2), pad=2, train_subset=1000),
        "lenet300100": Recipe("lenet300100", "fashion-mnist", replace(_LENET300, epochs=2), train_subset=2000),
        "resnet20": Recipe("resnet", "fashion-mnist", replace(_RESNET, epochs=1),
                           {"depth": 20, "in_channels": 1}, train_subset=512),
    },
    "default": {
        "lenet5": Recipe("lenet5", "mnist5k", _LENET5, pad=2),
        "lenet300100": Recipe("lenet300100", "fashion-mnist", _LENET300),
        "resnet20": Recipe("resnet", "fashion-mnist", _RESNET, {"depth": 20, "in_channels": 1}),
    },
    "full": {  # the papers' scale: full MNIST, full Fashion-MNIST, CIFAR-10 as in open_lth (160 epochs)
        "lenet5": Recipe("lenet5", "mnist", replace(_LENET5, epochs=30), pad=2),
        "lenet300100": Recipe("lenet300100", "fashion-mnist", replace(_LENET300, epochs=60)),
        "resnet20": Recipe("resnet", "cifar10", TrainConfig(epochs=160, lr=0.1, weight_decay=1e-4,
                                                           nesterov=False, schedule="step",
                                                           milestones=(80, 120), augment=True,
                                                           channels_last=True),
                           {"depth": 20, "in_channels": 3}),
    },
}


def recipe(name: str, size: str = "default", *, dataset: str | None = None, depth: int | None = None,
           **config_overrides) -> Recipe:
    """The recipe of baseline ``name`` at run ``size``, with optional data set, ResNet depth and TrainConfig overrides."""
    check_choice("name", name, NAMES)
    check_choice("size", size, SIZES)
    r = RECIPES[size][name]
    if dataset is not None:
        check_choice("dataset", dataset, tuple(IN_CHANNELS))
        kwargs = dict(r.model_kwargs)
        if r.model == "resnet":
            kwargs["in_channels"] = IN_CHANNELS[dataset]
        r = replace(r, dataset=dataset, model_kwargs=kwargs)
    if depth is not None:
        r = replace(r, model_kwargs={**r.model_kwargs, "depth": depth})
    return with_overrides(r, **config_overrides)


def load(name: str, size: str = "default", seed: int = 0, *, device: str = "auto", download: bool = False,
         progress: bool = True, **overrides) -> tuple[nn.Module, dict]:
    """Baseline ``name`` at run ``size`` from the checkpoint cache (trained there on a miss)."""
    return train_cached(recipe(name, size, **overrides), seed, device=device, download=download,
                        progress=progress)


def input_shape(r: Recipe) -> tuple[int, int, int]:
    """(C, H, W) of one input image of recipe ``r``: its data set's channels and side, padded by ``r.pad``."""
    side = IMAGE_SIDE[r.dataset] + 2 * r.pad
    return IN_CHANNELS[r.dataset], side, side
