import pytest
import torch
from torch import nn

from pruning_utils import models
from pruning_utils.activations import aggregate, channel_scores
from pruning_utils.params import ParameterError


def hand_maps():
    # one image, two channels of 2x2: [[1, 2], [3, 10]] and all zeros
    return torch.tensor([[[[1.0, 2.0], [3.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]]]])


def test_aggregations_on_a_hand_made_tensor():
    m = hand_maps()
    torch.testing.assert_close(aggregate(m, "mean"), torch.tensor([[4.0, 0.0]]))
    torch.testing.assert_close(aggregate(m, "max"), torch.tensor([[10.0, 0.0]]))
    torch.testing.assert_close(aggregate(m, "topk", k=2), torch.tensor([[6.5, 0.0]]))
    torch.testing.assert_close(aggregate(m, "norm"), torch.tensor([[114.0 ** 0.5, 0.0]]))  # 1+4+9+100
    torch.testing.assert_close(aggregate(m, "topk", k=99), aggregate(m, "mean"))  # k larger than the map


def test_fully_connected_outputs_are_their_own_score():
    x = torch.tensor([[1.0, -2.0, 3.0]])
    for how in ("mean", "max", "topk"):
        torch.testing.assert_close(aggregate(x, how, k=3), x)
    torch.testing.assert_close(aggregate(x, "norm"), x.abs())


def test_bad_aggregation_and_k():
    with pytest.raises(ParameterError, match="aggregation='median' is not allowed"):
        aggregate(hand_maps(), "median")
    with pytest.raises(ParameterError, match="k=0 is not allowed"):
        aggregate(hand_maps(), "topk", k=0)


def test_channel_scores_batches_and_matches_direct_computation():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(1, 3, 3))
    net.add_module("relu", nn.ReLU())
    x = torch.randn(10, 1, 8, 8)
    scores = channel_scores(net, x, ["relu"], how="max", batch_size=3)["relu"]
    assert scores.shape == (10, 3)
    torch.testing.assert_close(scores, net(x).amax(dim=(2, 3)))


def test_unknown_layer_is_named():
    with pytest.raises(ParameterError, match=r"layers \['nope'\] are not in the model"):
        channel_scores(nn.Sequential(nn.ReLU()), torch.randn(1, 2), ["nope"])


def test_channel_scores_accepts_the_books_auto_device():
    net = models.LeNet5()
    x = torch.rand(3, 1, 32, 32)
    auto = channel_scores(net, x, ["convnet.relu1"], device="auto")["convnet.relu1"]
    torch.testing.assert_close(auto, channel_scores(net, x, ["convnet.relu1"], device="cpu")["convnet.relu1"])
