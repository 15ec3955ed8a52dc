"""The baseline models every chapter reuses, one training recipe per run size (chapter 0 trains them).

A later chapter calls :func:`load` with the same name, size and seed and gets chapter 0's cached model.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from . import data as data_mod
from .params import check_choice
from .train import Recipe, TrainConfig, check_trained, train_cached, with_overrides

NAMES = ("lenet5", "lenet300100", "resnet20")
SIZES = ("smoke", "default", "full")
IN_CHANNELS = {"mnist5k": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3}
IMAGE_SIDE = {"mnist5k": 28, "mnist": 28, "fashion-mnist": 28, "cifar10": 32}

# Small networks train on one thread (as fast as two here, and it leaves a core free); ResNet-20 on two
# (1.7x faster). The thread count is part of each recipe, hence of its cache key: see runtime.py.
_LENET5 = TrainConfig(epochs=20, batch_size=32, lr=0.1, weight_decay=5e-4, threads=1)
_LENET300 = TrainConfig(epochs=20, batch_size=128, lr=0.1, weight_decay=1e-4, threads=1)
# Two epochs fit the 5-minute CPU budget of chapter 0 (about 110 s an epoch with channels_last).
_RESNET = TrainConfig(epochs=2, batch_size=256, lr=0.2, weight_decay=5e-4, channels_last=True, threads=2)

RECIPES: dict[str, dict[str, Recipe]] = {
    "smoke": {
        "lenet5": Recipe("lenet5", "mnist5k", replace(_LENET5, epochs=2), pad=2, train_subset=1000),
        "lenet300100": Recipe("lenet300100", "fashion-mnist", replace(_LENET300, epochs=2), train_subset=2000),
        # Two short epochs: one left the BatchNorm statistics behind the weights, at chance on test images.
        "resnet20": Recipe("resnet", "fashion-mnist", replace(_RESNET, epochs=2, batch_size=64, lr=0.05),
                           {"depth": 20, "in_channels": 1}, train_subset=2048),
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
                                                           channels_last=True, threads=2),
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


@dataclass
class Baseline:
    """A trained baseline with everything a chapter needs beside it: the recipe, the training record,
    and the train and test splits it was trained and tested on (same seed, same split)."""

    name: str
    seed: int
    model: nn.Module
    recipe: Recipe
    record: dict
    train: data_mod.Split
    test: data_mod.Split

    @property
    def accuracy(self) -> float:
        """Test accuracy of the model on its test split, as recorded when it was trained."""
        return float(self.record["test_acc"])


def get(name: str, P, seed: int | None = None, **overrides) -> Baseline:
    """The one entry point for a chapter's baseline: model ``name`` at the run size, device and download
    setting of the chapter's parameters ``P``, at ``seed`` (default ``P.seed``), with its splits (the
    training split as the model saw it). Stops with :class:`train.UntrainedModel` if the model is near
    chance."""
    seed = P.seed if seed is None else seed
    r = recipe(name, P.size, **overrides)
    model, record = train_cached(r, seed, device=P.device, download=P.download)
    train = data_mod.load(r.dataset, "train", pad=r.pad, download=P.download, seed=seed)
    test = data_mod.load(r.dataset, "test", pad=r.pad, download=P.download, seed=seed)
    check_trained(float(record["test_acc"]), len(test.classes), f"baseline {name} (seed {seed}, {r.dataset})")
    return Baseline(name, seed, model, r, record, train.subset(r.train_subset, seed), test)


@dataclass
class BaselineRuns:
    """Chapter 0's result: every baseline at every seed of the run, with our accuracies beside the papers'."""

    runs: dict[str, list[Baseline]]

    def training(self):
        """One row per model: data, training images, epochs, batch, peak lr, threads, parameters, seeds (the
        run-time page says whether the models came from the checkpoint cache)."""
        import pandas as pd

        from .models import count_parameters

        return pd.DataFrame({name: {
            "data": bs[0].recipe.dataset, "training images": bs[0].record["n_train"],
            "epochs": bs[0].recipe.config.epochs, "batch": bs[0].recipe.config.batch_size,
            "peak lr": bs[0].recipe.config.lr, "threads": bs[0].recipe.config.threads,
            "parameters": count_parameters(bs[0].model), "seeds": len(bs)} for name, bs in self.runs.items()}).T

    def estimates(self) -> dict:
        """Test accuracy per model over seeds (:class:`claims.Estimate`), or one binomial interval over the
        test images when the run has a single seed."""
        from .claims import Estimate

        out = {}
        for name, bs in self.runs.items():
            accs = [b.accuracy for b in bs]
            out[name] = (Estimate.over_seeds(accs) if len(bs) > 1
                         else Estimate.proportion(round(accs[0] * len(bs[0].test)), len(bs[0].test)))
        return out

    def comparison(self):
        """Our test accuracy (mean and 95% interval) beside the paper's, with both data sets."""
        import pandas as pd

        from . import reference

        rows = []
        for name, est in self.estimates().items():
            ref, b = reference.BASELINES[name], self.runs[name][0]
            paper = ref["paper_acc"]
            rows.append({"model": ref["model"],
                         "our data": f"{b.recipe.dataset}, {b.record['n_train']:,} train / {len(b.test):,} test",
                         "our test accuracy": est.text(".4f"), "paper's data": ref["paper_data"],
                         "paper's test accuracy": (f"{paper[0]:.4f}–{paper[1]:.4f}" if isinstance(paper, tuple)
                                                   else f"{paper:.4f}"),
                         "source": ref["source"]})
        return pd.DataFrame(rows).set_index("model")

    def figure(self):
        """Training loss and test accuracy per epoch, one line per model (first seed)."""
        from . import plots, reference

        return plots.training_curves({reference.BASELINES[n]["model"]: bs[0].record["history"]
                                      for n, bs in self.runs.items()})

    def numbers(self) -> dict:
        """The values the chapter's prose glues in."""
        from . import reference

        out = {}
        for name, est in self.estimates().items():
            b = self.runs[name][0]
            out |= {f"{name}_acc": est.mean, f"{name}_half": (est.hi - est.lo) / 2, f"{name}_n": est.n,
                    f"{name}_ntrain": f"{b.record['n_train']:,}", f"{name}_ntest": f"{len(b.test):,}",
                    f"{name}_data": b.recipe.dataset, f"{name}_epochs": b.recipe.config.epochs}
        gap = out["lenet300100_acc"] - reference.BASELINES["lenet300100"]["paper_acc"]
        out |= {"lenet300100_gap": 100 * abs(gap), "lenet300100_side": "above" if gap >= 0 else "below",
                "resnet_depth": self.runs["resnet20"][0].recipe.model_kwargs["depth"]}
        return out


def train_all(P) -> BaselineRuns:
    """Chapter 0: train (or load) LeNet5, LeNet-300-100 and the ResNet at every seed of ``P.seeds``, with
    the chapter's data-set, depth and epoch overrides."""
    overrides = {"lenet5": dict(dataset=P.lenet5_dataset, epochs=P.lenet5_epochs),
                 "lenet300100": dict(epochs=P.lenet300_epochs),
                 "resnet20": dict(dataset=P.resnet_dataset, depth=P.resnet_depth, epochs=P.resnet_epochs)}
    return BaselineRuns({name: [get(name, P, seed, **extra) for seed in P.seeds]
                         for name, extra in overrides.items()})
