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

_TREES_DEFAULT = {"seed": 0, "device": "auto", "download": False, "dataset": None,
                  "layers": ["relu1", "relu3", "relu5"], "aggregation": "mean", "topk": 5,
                  "tree_backend": "xgboost", "n_estimators": 500, "pruning_steps": 12, "histogram_layer": "relu3",
                  "compare_estimators": 100, "cnn_fractions": [0.0, 0.25, 0.5, 0.75, 0.9],
                  "random_rankings": 3, "finetune_epochs": 1, "max_images": None}

CHAPTERS["decision_trees"] = (  # chapter 1, paper 000
    {
        **_COMMON,
        "dataset": Param("LeNet5's data set", choices=("mnist5k", "mnist"), optional=True),
        "layers": Param("activation layers whose filters are scored", choices=("relu1", "relu3", "relu5"),
                        many=True),
        "aggregation": Param("how a map becomes one score", choices=("mean", "max", "topk")),
        "topk": Param("k of the top-k mean", int, lo=1),
        "tree_backend": Param("single tree: one XGBoost round or a CART tree", choices=("xgboost", "cart")),
        "n_estimators": Param("boosting rounds of the XGBoost model", int, lo=1),
        "pruning_steps": Param("points on each pruning curve", int, lo=2),
        "histogram_layer": Param("layer of the class histograms (Fig. 2)", choices=("relu1", "relu3", "relu5")),
        "compare_estimators": Param("boosting rounds when comparing aggregations", int, lo=1),
        "cnn_fractions": Param("fractions of a layer's filters removed from the CNN", float, lo=0.0, hi=0.95,
                               many=True),
        "random_rankings": Param("seeds of the random filter ranking", int, lo=1),
        "finetune_epochs": Param("epochs of fine-tuning after pruning the CNN (0: none)", int, lo=0),
        "max_images": Param("cap on training images scored (None: all)", int, lo=100, optional=True),
    },
    {
        "smoke": {**_TREES_DEFAULT, "n_estimators": 10, "pruning_steps": 4, "compare_estimators": 5,
                  "cnn_fractions": [0.0, 0.5], "random_rankings": 1, "max_images": 600},
        "default": _TREES_DEFAULT,
        "full": {**_TREES_DEFAULT, "download": True, "pruning_steps": 20, "compare_estimators": 500,
                 "cnn_fractions": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "random_rankings": 5,
                 "finetune_epochs": 2},
    },
)


def chapter_params(chapter: str, size: str = "default", **overrides) -> SimpleNamespace:
    """The validated parameters of ``chapter`` at run ``size``, with the overrides that are not None."""
    if chapter not in CHAPTERS:
        raise ParameterError(f"chapter={chapter!r} is not allowed; choose one of {', '.join(map(repr, CHAPTERS))}")
    spec, sizes = CHAPTERS[chapter]
    return resolve(spec, sizes, size, overrides)
