"""Every chapter's parameters in one place: the rule for each (:class:`Param`) and the three run sizes.

``smoke`` runs in seconds (the tests), ``default`` runs in minutes on 2 CPU cores on embedded data (what
``make book`` renders), ``full`` is the paper's scale (downloads, a GPU). A notebook's parameters cell
sets ``size`` and leaves the rest None; :func:`chapter_params` fills them from the size and validates.
"""
from __future__ import annotations

from types import SimpleNamespace

from .params import Param, ParameterError, resolve

_COMMON = {
    "seed": Param("random seed of training and sampling", int, lo=0),
    "device": Param("where to compute", choices=("auto", "cpu", "cuda")),
    "download": Param("allow torchvision downloads of data sets that are missing", bool),
}

_NO_OVERRIDES = {"lenet5_dataset": None, "resnet_dataset": None, "resnet_depth": None,
                 "lenet5_epochs": None, "lenet300_epochs": None, "resnet_epochs": None}

CHAPTERS: dict[str, tuple[dict[str, Param], dict[str, dict]]] = {
    # Chapter 0. None means "as in the run size's recipe" (pruning_utils.baselines.RECIPES).
    "baselines": (
        {
            **_COMMON,
            "lenet5_dataset": Param("data set of LeNet5", choices=("mnist5k", "mnist"), optional=True),
            "resnet_dataset": Param("data set of the ResNet", choices=("fashion-mnist", "cifar10"), optional=True),
            "resnet_depth": Param("depth of the CIFAR ResNet", choices=(8, 14, 20, 32, 56), optional=True),
            "lenet5_epochs": Param("training epochs of LeNet5", int, lo=1, optional=True),
            "lenet300_epochs": Param("training epochs of LeNet-300-100", int, lo=1, optional=True),
            "resnet_epochs": Param("training epochs of the ResNet", int, lo=1, optional=True),
        },
        {
            "smoke": {"seed": 0, "device": "auto", "download": False, **_NO_OVERRIDES},
            "default": {"seed": 0, "device": "auto", "download": False, **_NO_OVERRIDES},
            "full": {"seed": 0, "device": "auto", "download": True, **_NO_OVERRIDES},
        },
    ),
}


def chapter_params(chapter: str, size: str = "default", **overrides) -> SimpleNamespace:
    """The validated parameters of ``chapter`` at run ``size``, with the overrides that are not None."""
    if chapter not in CHAPTERS:
        raise ParameterError(f"chapter={chapter!r} is not allowed; choose one of {', '.join(map(repr, CHAPTERS))}")
    spec, sizes = CHAPTERS[chapter]
    return resolve(spec, sizes, size, overrides)
