"""Every chapter's parameters in one place: the rule for each (:class:`Param`) and the three run sizes.

``smoke`` runs in seconds (the tests), ``default`` runs in minutes on 2 CPU cores on embedded data (what
``make book`` renders), ``full`` is the paper's scale (downloads, a GPU). A notebook's parameters cell
sets ``size`` and leaves the rest None; :func:`chapter_params` fills them from the size and validates.
"""
from __future__ import annotations

from types import SimpleNamespace

from .params import Param, ParameterError, resolve
from .runtime import MAX_SEED

_COMMON = {
    "seeds": Param("seeds of the runs the chapter repeats (training, sampling)", int, lo=0, hi=MAX_SEED,
                   many=True),
    "threads": Param("torch CPU threads of the chapter's own work (training recipes fix their own)", int,
                     lo=1, hi=256),
    "device": Param("where to compute", choices=("auto", "cpu", "cuda")),
    "download": Param("allow torchvision downloads of data sets that are missing", bool),
}
_COMMON_DEFAULT = {"seeds": [0], "threads": 2, "device": "auto", "download": False}

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
            "smoke": {**_COMMON_DEFAULT, **_NO_OVERRIDES},
            "default": {**_COMMON_DEFAULT, **_NO_OVERRIDES},
            "full": {**_COMMON_DEFAULT, "download": True, **_NO_OVERRIDES},
        },
    ),
}

# --- chapter 1 (paper 000) ---
_LENET5_LAYERS = ("conv1", "conv2", "conv3")  # paper 000's names; models.LENET5_LAYERS maps them to modules
# One thread: `make book` runs chapters side by side, a core each (the results depend on the count, not the core).
_TREES_DEFAULT = {**_COMMON_DEFAULT, "threads": 1, "seeds": [0, 1, 2], "dataset": None,
                  "layers": list(_LENET5_LAYERS),
                  "aggregation": "mean", "topk": 5, "tree_depth": None, "n_estimators": 500,
                  "pruning_steps": 12, "histogram_layer": "conv2", "compare_estimators": 100,
                  "pruned_depth": "rule", "gain_tree": "xgboost", "cnn_fractions": [0.25, 0.5, 0.75, 0.9],
                  "random_rankings": 2,
                  "finetune_epochs": 1, "finetune_images": 1000, "max_images": None}

CHAPTERS["decision_trees"] = (  # chapter 1, paper 000
    {
        **_COMMON,
        "dataset": Param("LeNet5's data set", choices=("mnist5k", "mnist"), optional=True),
        "layers": Param("LeNet5 conv layers whose filters are scored", choices=_LENET5_LAYERS, many=True),
        "aggregation": Param("how a map becomes one score (the paper: mean)", choices=("mean", "max", "topk")),
        "topk": Param("k of the top-k mean", int, lo=1),
        "tree_depth": Param("depth of every tree (None: round(log2 n) of its n features)", int, lo=1,
                            optional=True),
        "pruned_depth": Param("depth of a tree refitted on fewer features", choices=("rule", "unpruned")),
        "n_estimators": Param("boosting rounds of the XGBoost model (the paper: 500)", int, lo=1),
        "pruning_steps": Param("evenly spaced points on each pruning curve", int, lo=2),
        "histogram_layer": Param("layer of the class histograms (Fig. 2)", choices=_LENET5_LAYERS),
        "compare_estimators": Param("boosting rounds when comparing aggregations", int, lo=1),
        "gain_tree": Param("single tree whose gain ranks the CNN's filters: one XGBoost round or a CART tree",
                           choices=("xgboost", "cart")),
        "cnn_fractions": Param("target fractions of a layer's filters removed from the CNN", float, lo=0.0,
                               hi=0.95, many=True),
        "random_rankings": Param("random filter rankings per network (the null)", int, lo=1),
        "finetune_epochs": Param("epochs of fine-tuning after pruning the CNN (0: none)", int, lo=0),
        "finetune_images": Param("training images of the fine-tuning (None: all)", int, lo=32, optional=True),
        "max_images": Param("cap on training images scored (None: all)", int, lo=100, optional=True),
    },
    {
        "smoke": {**_TREES_DEFAULT, "seeds": [0, 1], "n_estimators": 10, "pruning_steps": 4,
                  "compare_estimators": 5, "cnn_fractions": [0.5], "random_rankings": 1,
                  "finetune_images": 200, "max_images": 600},
        "default": _TREES_DEFAULT,
        "full": {**_TREES_DEFAULT, "download": True, "seeds": [0, 1, 2, 3, 4], "pruning_steps": 20,
                 "compare_estimators": 500, "cnn_fractions": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9],
                 "random_rankings": 5, "finetune_epochs": 2, "finetune_images": None},
    },
)


# --- chapter 3 (paper 002) ---
_WIDTH = 64  # d: the final layer's width in every ResNet of the chapter (4 x 16 channels)
_K_GRID = [1, 2, 3, 5, 8, 10, 16, 32, 64]
# The depth study's ResNet-32 runs at full only: its two seeds cost about 4 CPU-minutes of a cold build.
_CLASS_FILTERS_DEFAULT = {**_COMMON_DEFAULT, "seeds": [0, 1, 2], "network_seed": 0, "dataset": None,
                          "max_images": 10000, "max_test_images": None, "k1": 5, "k2": 5,
                          "k1_values": _K_GRID, "k2_values": _K_GRID, "mass": 0.9, "random_seeds": 5,
                          "bootstrap": 1000, "retrain_epochs": 1, "retrain_lr": 1e-4,
                          "retrain_control": True, "depths": [8, 14, 20],
                          "depth_seeds": [0, 1], "depth_train_images": 6000, "depth_epochs": 2,
                          "depth_batch_size": 64, "depth_images": 3000}

CHAPTERS["class_filters"] = (  # chapter 3, paper 002
    {
        **_COMMON,
        "network_seed": Param("seed of chapter 0's ResNet that is decomposed", int, lo=0, hi=MAX_SEED),
        "dataset": Param("data set of the ResNets", choices=("fashion-mnist", "cifar10"), optional=True),
        "max_images": Param("training images per seed for Algorithm 1 and the retraining (None: all)", int,
                            lo=100, optional=True),
        "max_test_images": Param("test images on which accuracies are measured (None: all)", int, lo=100,
                                 optional=True),
        "k1": Param("top features per instance in Algorithm 1", int, lo=1, hi=_WIDTH),
        "k2": Param("features kept per class (size of S_y)", int, lo=1, hi=_WIDTH),
        "k1_values": Param("k1 values of the r_A grid (Fig. 1)", int, lo=1, hi=_WIDTH, many=True),
        "k2_values": Param("k2 values of the r_A grid (Fig. 1), k2 > k1 included", int, lo=1, hi=_WIDTH,
                           many=True),
        "mass": Param("share of the feature mass that the variant k1 covers", float, lo=0.01, hi=1.0),
        "random_seeds": Param("random S_y drawn per seed and k2 (the null)", int, lo=1),
        "bootstrap": Param("bootstrap replicates over seeds and test images behind each interval", int, lo=100),
        "retrain_epochs": Param("passes over the max_images training images when retraining (the paper: 1)",
                                int, lo=1),
        "retrain_lr": Param("Adam learning rate of the retraining (the paper: 1e-4)", float, lo=1e-7, hi=1.0),
        "retrain_control": Param("retrain with the full final layer too, on the first seed (a control)", bool),
        "depths": Param("ResNet depths of the depth study", choices=(8, 14, 20, 32, 56), many=True),
        "depth_seeds": Param("training seeds of each depth-study ResNet", int, lo=0, hi=MAX_SEED, many=True),
        "depth_train_images": Param("training images of each depth-study ResNet (None: all)", int, lo=100,
                                    optional=True),
        "depth_epochs": Param("training epochs of each depth-study ResNet (None: the recipe)", int, lo=1,
                              optional=True),
        "depth_batch_size": Param("batch size of the depth-study ResNets (learning rate scaled with it)", int,
                                  lo=8),
        "depth_images": Param("training images featurised and test images measured per depth (None: all)",
                              int, lo=100, optional=True),
    },
    {
        "smoke": {**_CLASS_FILTERS_DEFAULT, "seeds": [0, 1], "max_images": 500, "max_test_images": 1000,
                  "k1_values": [1, 3, 5, 8, 64], "k2_values": [1, 3, 5, 8, 64], "random_seeds": 2,
                  "bootstrap": 200, "depths": [8, 14], "depth_seeds": [0], "depth_train_images": 2048,
                  "depth_epochs": 1, "depth_batch_size": 32, "depth_images": 500},
        "default": _CLASS_FILTERS_DEFAULT,
        "full": {**_CLASS_FILTERS_DEFAULT, "download": True, "dataset": "cifar10", "max_images": None,
                 "depths": [8, 14, 20, 32, 56], "depth_seeds": [0, 1, 2], "depth_train_images": None,
                 "depth_epochs": None, "depth_batch_size": 128, "depth_images": None},
    },
)

_RESNET_BLOCKS = ("layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2",
                  "layer3.0", "layer3.1", "layer3.2")
_CAUSAL_OUTCOMES = ("kl", "loss", "prob", "accuracy")
# --- chapter 5 (paper 004) ---
_CAUSAL_DEFAULT = {**_COMMON_DEFAULT, "seeds": [0, 1, 2], "threads": 1,
                   "lenet_layers": ["conv1", "conv2", "conv3"], "interventions": ["zero", "mean"],
                   "images": 1000, "bootstrap": 1000, "dowhy_layer": "conv2", "refute_simulations": 5,
                   "resnet_blocks": list(_RESNET_BLOCKS), "rank_outcomes": list(_CAUSAL_OUTCOMES),
                   "resnet_images": 32, "resnet_val_images": 500, "resnet_fraction": 0.25,
                   "finetune_epochs": 1, "resnet_finetune_images": 256, "resnet_eval_images": 2000,
                   "lenet_finetune_images": 1000, "light_fraction": 0.1,
                   "latency_macs_kept": [0.25, 0.5], "latency_block": 8, "latency_repeats": 20}

CHAPTERS["causal_pruning"] = (  # chapter 5, paper 004
    {
        **_COMMON,
        "lenet_layers": Param("LeNet5 conv layers whose filters' effects are measured",
                              choices=("conv1", "conv2", "conv3"), many=True),
        "interventions": Param("interventions on LeNet5 filters", choices=("zero", "mean"), many=True),
        "images": Param("LeNet5 training images the effects are measured on", int, lo=20),
        "bootstrap": Param("bootstrap resamples of each effect", int, lo=10),
        "dowhy_layer": Param("LeNet5 layer of the DoWhy study (its parents: the layer before)",
                             choices=("conv2", "conv3")),
        "refute_simulations": Param("simulations of each DoWhy refuter", int, lo=2),
        "resnet_blocks": Param("ResNet-20 blocks whose inner conv (conv1) is ranked and pruned",
                               choices=_RESNET_BLOCKS, many=True),
        "rank_outcomes": Param("candidate outcomes; held-out images choose one per seed",
                               choices=_CAUSAL_OUTCOMES, many=True),
        "resnet_images": Param("ResNet-20 training images that rank filters, per seed", int, lo=8),
        "resnet_val_images": Param("held-out ResNet-20 training images that choose the outcome, per seed", int,
                                   lo=50),
        "resnet_fraction": Param("share of every ranked inner conv's filters removed", float, lo=0.05, hi=0.95),
        "finetune_epochs": Param("epochs of fine-tuning after pruning (the same for every criterion)", int,
                                 lo=1),
        "resnet_finetune_images": Param("ResNet-20 training images of the fine-tuning, per seed", int, lo=32),
        "resnet_eval_images": Param("ResNet-20 test images every pruned network is scored on (paired)", int,
                                    lo=100, hi=10000),
        "lenet_finetune_images": Param("LeNet5 training images of the fine-tuning (regularisation claim)", int,
                                       lo=32),
        "light_fraction": Param("share of every LeNet5 layer removed in the regularisation claim", float,
                                lo=0.01, hi=0.5),
        "latency_macs_kept": Param("share of ResNet-20's MACs kept (0.25: 4x fewer), latency study",
                                   float, lo=0.05, hi=0.95, many=True),
        "latency_block": Param("kept widths rounded to multiples of this channel block (None: no rounding)",
                               int, lo=1, hi=64, optional=True),
        "latency_repeats": Param("timed rounds per latency (median)", int, lo=3),
    },
    {
        "smoke": {**_CAUSAL_DEFAULT, "seeds": [0], "lenet_layers": ["conv2"], "images": 200, "bootstrap": 100,
                  "refute_simulations": 3, "resnet_blocks": ["layer1.0", "layer3.2"], "resnet_images": 16,
                  "resnet_val_images": 100, "resnet_finetune_images": 64, "resnet_eval_images": 300,
                  "lenet_finetune_images": 200, "latency_macs_kept": [0.5], "latency_repeats": 3},
        "default": _CAUSAL_DEFAULT,
        "full": {**_CAUSAL_DEFAULT, "download": True, "seeds": [0, 1, 2, 3, 4], "images": 5000,
                 "resnet_images": 256, "resnet_val_images": 2000, "finetune_epochs": 2,
                 "resnet_finetune_images": 10000, "resnet_eval_images": 10000, "lenet_finetune_images": 4000,
                 "refute_simulations": 50, "latency_macs_kept": [0.25, 0.5, 0.75], "latency_repeats": 30},
    },
)

# --- chapter 4 (paper 003) ---
# One thread: the chapter's products are small, and a second thread only adds synchronisation (a ResNet-20
# forward pass of 64 images took 17x longer on two threads than on one on a busy 2-core machine).
_MERGING_DEFAULT = {**_COMMON_DEFAULT, "threads": 1, "seeds": [0, 1, 2, 3, 4], "lenet_recipe": "baseline",
                    "ratios": [0.5, 0.6, 0.7, 0.8], "criteria": ["l1", "l2", "l2-GM"], "fc_threshold": 0.45,
                    "threshold_sweep": [0.0, 0.2, 0.45, 0.6, 0.8],
                    "conv_model": "resnet20", "conv_dataset": None, "conv_ratios": [0.1, 0.2, 0.3],
                    "conv_threshold": 0.1, "lam": 0.85, "lam_sweep": [0.0, 0.85, 1.0], "lam_sweep_ratio": 0.3,
                    "conv_eval_images": 1000, "vgg_epochs": 160, "vgg_train_images": None,
                    "twin_epochs": 3, "twin_train_images": 20000, "leaky_slope": 0.1}

CHAPTERS["neuron_merging"] = (  # chapter 4, paper 003 (Kim et al. 2020 and its reproducibility report)
    {
        **_COMMON,
        "lenet_recipe": Param("LeNet-300-100's training: chapter 0's recipe or the reference code's",
                              choices=("baseline", "paper")),
        "ratios": Param("pruning ratios of LeNet-300-100 (both hidden layers)", float, lo=0.05, hi=0.95, many=True),
        "criteria": Param("which neurons are kept", choices=("l1", "l2", "l2-GM"), many=True),
        "fc_threshold": Param("cosine threshold of Algorithm 2 (0: never drop, as the reference)", float, lo=-1.0, hi=1.0),
        "threshold_sweep": Param("thresholds of the sweep on LeNet-300-100 (0: never drop)", float, lo=-1.0,
                                 hi=1.0, many=True),
        "conv_model": Param("the BN network of the convolutional case", choices=("resnet20", "vgg16")),
        "conv_dataset": Param("its data set (None: the ResNet recipe, or CIFAR-10 for VGG-16)",
                              choices=("fashion-mnist", "cifar10", "mnist"), optional=True),
        "conv_ratios": Param("pruning ratios of the merged conv layers", float, lo=0.05, hi=0.95, many=True),
        "conv_threshold": Param("cosine-similarity threshold of Algorithm 3", float, lo=-1.0, hi=1.0),
        "lam": Param("lambda of Algorithm 3: weight of the cosine distance", float, lo=0.0, hi=1.0),
        "lam_sweep": Param("lambdas of the sweep", float, lo=0.0, hi=1.0, many=True),
        "lam_sweep_ratio": Param("pruning ratio of the lambda sweep", float, lo=0.05, hi=0.95),
        "conv_eval_images": Param("test images for the conv net (None: all)", int, lo=100, optional=True),
        "vgg_epochs": Param("training epochs of VGG-16 (conv_model vgg16 only)", int, lo=1),
        "vgg_train_images": Param("training images of VGG-16 (None: all)", int, lo=100, optional=True),
        "twin_epochs": Param("training epochs of the ReLU and LeakyReLU twins", int, lo=1),
        "twin_train_images": Param("training images of the twins (None: all)", int, lo=100, optional=True),
        "leaky_slope": Param("negative slope of the LeakyReLU twin", float, lo=0.0, hi=0.9),
    },
    {
        "smoke": {**_MERGING_DEFAULT, "seeds": [0, 1], "ratios": [0.5, 0.8], "criteria": ["l1", "l2-GM"],
                  "threshold_sweep": [0.0, 0.45, 0.9], "conv_ratios": [0.3], "lam_sweep": [0.0, 0.85],
                  "conv_eval_images": 200, "twin_epochs": 1, "twin_train_images": 1000},
        "default": _MERGING_DEFAULT,
        "full": {**_MERGING_DEFAULT, "download": True, "lenet_recipe": "paper", "conv_model": "vgg16",
                 "conv_ratios": [0.3, 0.5, 0.7],
                 "threshold_sweep": [0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9],
                 "lam_sweep": [0.0, 0.25, 0.5, 0.7, 0.85, 1.0], "lam_sweep_ratio": 0.5,
                 "conv_eval_images": None, "twin_epochs": 20, "twin_train_images": None},
    },
)

# --- chapter 2 (paper 001) ---
_DISSECTION_DEFAULT = {**_COMMON_DEFAULT, "seeds": [0, 1, 2], "threads": 1, "images": 1600, "val_images": 600,
                       "tune_images": 200, "resolution": 32, "depth": 8, "width": 8, "epochs": 8, "lr": 0.1,
                       "batch_size": 32, "target_remaining": 0.069, "rate": 0.36, "quantile": 0.005, "cutoff": 0.04,
                       "sweep_quantiles": [0.005, 0.01, 0.02, 0.05],
                       "sweep_cutoffs": [0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2], "structured": True,
                       "finetune_epochs": 1, "workers": 2, "broden_dir": None, "resnet50_weights": None}

CHAPTERS["dissection"] = (  # chapter 2, paper 001
    {
        **_COMMON,
        "images": Param("synthetic training scenes", int, lo=16),
        "val_images": Param("held-out scenes (test accuracy; tuning and dissection)", int, lo=18),
        "tune_images": Param("held-out scenes that choose the decision setting", int, lo=16),
        "resolution": Param("side of the scenes in pixels", choices=(32, 48, 64)),
        "depth": Param("depth of the CIFAR ResNet", choices=(8, 14, 20)),
        "width": Param("channels of the ResNet's first stage", int, lo=4),
        "epochs": Param("training epochs of every IMP level", int, lo=1),
        "lr": Param("peak learning rate (SGD, one-cycle)", float, lo=1e-5, hi=1.0),
        "batch_size": Param("training batch size", int, lo=1),
        "target_remaining": Param("prune until at most this share of weights is left", float, lo=0.001, hi=0.99),
        "rate": Param("share of the weights left removed per round (paper 0.2)", float, lo=0.01, hi=0.9),
        "quantile": Param("q of T_k in the paper's figures", float, lo=1e-4, hi=0.5),
        "cutoff": Param("IoU cut-off in the paper's figures (code 0.04, text 0.05)", float, lo=0.0, hi=0.9),
        "sweep_quantiles": Param("q values the decision setting is chosen from", float, lo=1e-4, hi=0.5,
                                 many=True),
        "sweep_cutoffs": Param("cut-offs the decision setting is chosen from", float, lo=0.0, hi=0.9, many=True),
        "structured": Param("also prune whole filters (beyond the paper)", bool),
        "finetune_epochs": Param("fine-tuning epochs per round (0: skip that variant)", int, lo=0),
        "workers": Param("processes running the IMP runs (time only, never results)", int, lo=1),
        "broden_dir": Param("a real Broden folder: also dissect ResNet-50 on it", str, optional=True),
        "resnet50_weights": Param("ResNet-50 state-dict file (None: torchvision's)", str, optional=True),
    },
    {
        "smoke": {**_DISSECTION_DEFAULT, "seeds": [0], "images": 800, "val_images": 128, "tune_images": 48,
                  "epochs": 12, "target_remaining": 0.64, "sweep_quantiles": [0.005, 0.02],
                  "sweep_cutoffs": [0.04, 0.08], "workers": 1},
        "default": _DISSECTION_DEFAULT,
        "full": {**_DISSECTION_DEFAULT, "download": True, "threads": 2, "images": 8000, "val_images": 2000,
                 "tune_images": 500, "resolution": 48, "depth": 14, "width": 16, "epochs": 30, "batch_size": 64,
                 "target_remaining": 0.05, "rate": 0.2, "workers": 1},
    },
)

# --- chapter 6 (the criteria compared) ---
_COMPARISON_CRITERIA = ("l1", "l2", "bn_scale", "taylor", "mean_activation", "apoz", "random", "gain", "class_usage",
                        "causal", "iou")
# One thread, as chapters 1, 2, 4 and 5: `make book` runs two chapters side by side, and its many short
# fine-tunes (batch 32) took 41% more CPU time per step on two threads than on one.
_COMPARISON_DEFAULT = {**_COMMON_DEFAULT, "seeds": [0, 1, 2], "threads": 1,
                       "networks": ["lenet5", "resnet20", "resnet8"],
                       "criteria": list(_COMPARISON_CRITERIA),
                       "resnet20_criteria": ["l1", "bn_scale", "taylor", "mean_activation", "random", "class_usage"],
                       "lenet_layers": ["conv1", "conv2", "conv3"], "layer_fractions": [0.5],
                       "speedups": [2.0, 4.0], "allocations": ["uniform", "global"], "finetune_steps": [0, 20],
                       "finetune_batch": 32, "finetune_lr": 0.01, "score_images": 256, "causal_images": 32,
                       "eval_images": 500, "merge": ["lenet5"], "merge_threshold": 0.45, "merge_bn_threshold": 0.1,
                       "recalibrate_bn": True, "block": None, "iou_quantile": 0.005, "latency_repeats": 10}

CHAPTERS["comparison"] = (  # chapter 6: the papers' criteria and the standard ones under one protocol
    {
        **_COMMON,
        "networks": Param("networks: LeNet5 (layers, whole), ResNet-20 (whole), chapter 2's ResNet-8",
                          choices=("lenet5", "resnet20", "resnet8"), many=True),
        "criteria": Param("criteria compared; random (the null) must be one", choices=_COMPARISON_CRITERIA,
                          many=True),
        "resnet20_criteria": Param("those run on ResNet-20 (minutes each there)", choices=_COMPARISON_CRITERIA,
                                   many=True),
        "lenet_layers": Param("LeNet5 layers pruned one at a time", choices=("conv1", "conv2", "conv3"), many=True),
        "layer_fractions": Param("shares of a layer's filters removed (one-layer settings)", float, lo=0.05,
                                 hi=0.95, many=True),
        "speedups": Param("whole-network targets: times fewer conv and linear MACs", float, lo=1.01, hi=50.0,
                          many=True),
        "allocations": Param("how a MACs target is shared among layers", choices=("uniform", "global"), many=True),
        "finetune_steps": Param("fine-tuning budgets in SGD steps (0: none), equal for every criterion", int, lo=0,
                                many=True),
        "finetune_batch": Param("images per fine-tuning step", int, lo=1),
        "finetune_lr": Param("fine-tuning learning rate (SGD, constant)", float, lo=1e-6, hi=1.0),
        "score_images": Param("training images that score the filters, drawn per seed", int, lo=10),
        "causal_images": Param("of those, what 'causal' scores on (cost: channels x images)", int, lo=2,
                               optional=True),
        "eval_images": Param("fixed test images of ResNet-20 (None: all; the others use all)", int, lo=100,
                             optional=True),
        "merge": Param("networks where prune + merge also runs (None: none)", choices=("lenet5", "resnet20"),
                       many=True, optional=True),
        "merge_threshold": Param("merging's similarity threshold without BatchNorm", float, lo=0.0, hi=1.0),
        "merge_bn_threshold": Param("merging's similarity threshold with BatchNorm", float, lo=0.0, hi=1.0),
        "recalibrate_bn": Param("re-estimate BatchNorm statistics after pruning (no weight update)", bool),
        "block": Param("round kept widths to a multiple of this (None: no rounding)", int, lo=1, optional=True),
        "iou_quantile": Param("q of the iou criterion's unit threshold", float, lo=1e-4, hi=0.5),
        "latency_repeats": Param("timed forward passes per latency (median)", int, lo=1),
    },
    {
        "smoke": {**_COMPARISON_DEFAULT, "seeds": [0], "lenet_layers": ["conv2"], "speedups": [2.0],
                  "resnet20_criteria": ["l1", "bn_scale", "random"], "finetune_steps": [0, 5],
                  "score_images": 64, "causal_images": 16, "eval_images": 200, "latency_repeats": 2},
        "default": _COMPARISON_DEFAULT,
        "full": {**_COMPARISON_DEFAULT, "download": True, "seeds": [0, 1, 2, 3, 4], "speedups": [2.0, 3.0, 4.0],
                 "layer_fractions": [0.25, 0.5, 0.75], "finetune_steps": [0, 20, 200], "score_images": 1024,
                 "causal_images": None, "resnet20_criteria": list(_COMPARISON_CRITERIA), "eval_images": None,
                 "merge": ["lenet5", "resnet20"], "latency_repeats": 30},
    },
)


# The notebook of each chapter (notebooks/<stem>.ipynb) and its key in CHAPTERS.
NOTEBOOKS = {"00_baselines": "baselines", "01_decision_tree_pruning": "decision_trees",
             "02_dissecting_pruned_networks": "dissection", "03_class_specific_filters": "class_filters",
             "04_neuron_merging": "neuron_merging", "05_causal_pruning": "causal_pruning",
             "06_comparing_criteria": "comparison"}
SIZES = ("smoke", "default", "full")
# Names a notebook may hold when it calls start(): IPython's own and those its cells import.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open", "display"}


def chapter_params(chapter: str, size: str = "default", **overrides) -> SimpleNamespace:
    """The validated parameters of ``chapter`` at run ``size``, with the overrides that are not None.
    ``P.seed`` is the first of ``P.seeds``, for work done once."""
    if chapter not in CHAPTERS:
        raise ParameterError(f"chapter={chapter!r} is not allowed; choose one of {', '.join(map(repr, CHAPTERS))}")
    spec, sizes = CHAPTERS[chapter]
    P = resolve(spec, sizes, size, overrides)
    P.seed = P.seeds[0]
    return P


def start(chapter: str, namespace: dict) -> SimpleNamespace:
    """The first call of every chapter, with the notebook's ``globals()``: collect the parameters (the
    ``parameters`` cell as papermill's injected cell left them), stop on any name the chapter does not
    declare (naming the closest ones: papermill itself only warns), resolve None from the run size's
    preset, validate, and fix the process's threads and determinism (:func:`runtime.configure`)."""
    import types

    from . import runtime
    from .params import unknown_error

    if chapter not in CHAPTERS:
        raise ParameterError(f"chapter={chapter!r} is not allowed; choose one of {', '.join(map(repr, CHAPTERS))}")
    spec, _ = CHAPTERS[chapter]
    given = {k: v for k, v in namespace.items()
             if not k.startswith("_") and k not in _IPYTHON_NAMES
             and not isinstance(v, (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type))}
    unknown = set(given) - set(spec) - {"size"}
    if unknown:
        raise unknown_error(unknown, [*spec, "size"], "parameter")
    if "size" not in given:
        raise ParameterError("the parameters cell must set size; choose one of " + ", ".join(map(repr, SIZES)))
    P = chapter_params(chapter, given["size"], **{k: v for k, v in given.items() if k != "size"})
    runtime.configure(P.threads)
    return P


def table(P: SimpleNamespace):
    """The parameters of this run as a one-column table, for the top of a chapter."""
    import pandas as pd

    values = {k: (", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in vars(P).items() if k != "seed"}
    df = pd.DataFrame({"value": {k: str(v) for k, v in values.items()}}).rename_axis("parameter")
    # a Styler shows every value whole (a DataFrame's HTML cuts text at 50 characters)
    return df.style.set_properties(**{"text-align": "left", "white-space": "normal"})


def _short(value) -> str:
    return repr(value) if not isinstance(value, list) else "[" + ", ".join(map(repr, value)) + "]"


def parameters_cell(chapter: str, width: int = 100) -> str:
    """The text of the notebook's ``parameters`` cell, generated from CHAPTERS so that each parameter is
    declared once: one line per parameter, ``name = None  # what it is; what it allows; preset X`` (the
    default size's value; ``None`` takes the run size's preset), shortened to fit ``width`` columns by
    dropping the allowed values, then the preset. ``python -m pruning_utils.presets`` writes the cells.
    A cell holds at most 25 lines (24 parameters) of at most 100 columns (tests/test_presets.py)."""
    spec, sizes = CHAPTERS[chapter]
    lines = [f'size = "default"  # run size: {" | ".join(map(repr, SIZES))}']
    for name, rule in spec.items():
        head = f"{name} = None  # "
        options = [f"{rule.doc}; {rule.allowed()}; preset {_short(sizes['default'][name])}",
                   f"{rule.doc}; preset {_short(sizes['default'][name])}", rule.doc]
        options = [o.replace(" = ", "=") for o in options]  # papermill cannot parse a comment holding " = "
        # A doc too long even alone stays whole: tests/test_presets.py then asks for a shorter one.
        lines.append(next((head + o for o in options if len(head + o) <= width), head + options[-1]))
    return "\n".join(lines) + "\n"


def write_parameter_cells(notebooks_dir) -> list[str]:
    """Rewrite the ``parameters`` cell of each chapter notebook from :func:`parameters_cell`; return the
    stems changed."""
    import json
    from pathlib import Path

    changed = []
    for stem, chapter in NOTEBOOKS.items():
        path = Path(notebooks_dir) / f"{stem}.ipynb"
        if not path.exists():
            continue
        nb = json.loads(path.read_text())
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        text = parameters_cell(chapter)
        if "".join(cell["source"]) != text:
            cell["source"] = text.splitlines(keepends=True)
            path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
            changed.append(stem)
    return changed


if __name__ == "__main__":
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "notebooks"
    print("rewrote:", ", ".join(write_parameter_cells(root)) or "nothing")
    sys.exit(0)
