import pytest
import torch
from torch import nn

from pruning_utils import models, prune
from pruning_utils.params import ParameterError


@pytest.mark.parametrize("layer,idxs", [("convnet.c1", [0, 4]), ("convnet.c3", [1, 2, 3, 15]),
                                        ("convnet.c5", list(range(0, 120, 3)))])
def test_removing_filters_equals_zeroing_them(layer, idxs):
    net = models.LeNet5().eval()
    x = torch.randn(8, 1, 32, 32)
    removed = prune.remove_channels(net, layer, idxs, x[:1])
    zeroed = prune.zero_channels(net, layer, idxs)
    with torch.no_grad():
        torch.testing.assert_close(removed(x), zeroed(x), atol=1e-5, rtol=1e-5)
    n_out = prune.module(net, layer).out_channels
    assert prune.module(removed, layer).out_channels == n_out - len(idxs)
    assert prune.module(net, layer).out_channels == n_out  # the original is untouched
    assert models.count_parameters(removed) < models.count_parameters(net)


def test_removal_shrinks_the_next_layer_and_flops():
    net = models.LeNet5()
    x = torch.randn(1, 1, 32, 32)
    removed = prune.remove_channels(net, "convnet.c5", range(60), x)
    assert removed.fc.f6.in_features == 60
    macs0, params0 = prune.macs_and_params(net, x)
    macs1, params1 = prune.macs_and_params(removed, x)
    assert params0 - params1 == 60 * (16 * 25 + 1) + 60 * 84  # c5's filters and f6's inputs
    assert macs1 < macs0


def test_zeroing_a_resnet_channel_after_batchnorm():
    net = models.CifarResNet(8, in_channels=1).eval()
    x = torch.randn(4, 1, 16, 16)
    z = prune.zero_channels(net, "layer1.0.bn1", [3])
    from pruning_utils.activations import channel_scores
    maps = channel_scores(z, x, ["layer1.0.bn1"], keep_maps=True)["layer1.0.bn1"]
    assert maps[:, 3].abs().sum() == 0 and maps[:, 2].abs().sum() > 0


def test_l1_ranking():
    conv = nn.Conv2d(1, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([2.0, -0.5, 1.0]).view(3, 1, 1, 1))
    assert prune.l1_ranking(conv).tolist() == [1, 2, 0]


def test_bad_arguments():
    net = models.LeNet5()
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(ParameterError, match="layer='convnet.c9' is not in the model"):
        prune.remove_channels(net, "convnet.c9", [0], x)
    with pytest.raises(ParameterError, match=r"expected indices in \[0, 5\]"):
        prune.remove_channels(net, "convnet.c1", [6], x)
    with pytest.raises(ParameterError, match="keep at least one"):
        prune.remove_channels(net, "convnet.c1", range(6), x)
    with pytest.raises(ParameterError, match="is a ReLU; expected a Conv2d or Linear"):
        prune.remove_channels(net, "convnet.relu1", [0], x)


def test_n_removed_rounds_and_always_leaves_a_filter():
    assert [prune.n_removed(f, 10) for f in (0.0, 0.24, 0.25, 0.5, 0.99)] == [0, 2, 2, 5, 9]
    assert prune.n_removed(0.9, 2) == 1
