"""The papers' own numbers, each with where it comes from, for the tables that put ours beside them."""
from __future__ import annotations

BASELINES = {
    "lenet5": {"model": "LeNet5", "paper_acc": 0.9907, "paper_data": "MNIST, 60,000 train / 10,000 test",
               "source": "paper 000, Table 1 caption"},
    "lenet300100": {"model": "LeNet-300-100", "paper_acc": 0.8980,
                    "paper_data": "Fashion-MNIST, 60,000 train / 10,000 test",
                    "source": "paper 003 (Kim et al. 2020 baseline), Table 1"},
    "resnet20": {"model": "ResNet-20", "paper_acc": (0.9117, 0.9171),
                 "paper_data": "CIFAR-10, 50,000 train / 10,000 test",
                 "source": "paper 002, Tables 1 and 2 (A_f)"},
}

# Paper 000, Table 1: test accuracy of trees on mean filter scores; the paper's conv1..conv3 are the
# outputs of relu1, relu3, relu5.
DECISION_TREES = {
    "single": {"conv1": 0.4495, "conv2": 0.763, "conv3": 0.7805},
    "xgboost": {"conv1": 0.5365, "conv2": 0.902, "conv3": 0.9295},
    "lenet5_acc": 0.9907,
}
