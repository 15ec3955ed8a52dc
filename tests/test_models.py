import pytest
import torch

from pruning_utils import models
from pruning_utils.activations import channel_scores
from pruning_utils.params import ParameterError


def test_lenet5_maps_match_paper():
    net = models.LeNet5()
    maps = channel_scores(net, torch.randn(3, 1, 32, 32), ["convnet.relu1", "convnet.relu3", "convnet.relu5"],
                          keep_maps=True)
    assert maps["convnet.relu1"].shape == (3, 6, 28, 28)
    assert maps["convnet.relu3"].shape == (3, 16, 10, 10)
    assert maps["convnet.relu5"].shape == (3, 120, 1, 1)
    assert [n for n, _ in net.convnet.named_children()] == ["c1", "relu1", "s2", "c3", "relu3", "s4", "c5", "relu5"]
    assert [n for n, _ in net.fc.named_children()] == ["f6", "relu6", "f7", "sig7"]
    assert models.count_parameters(net) == 61706  # "around 60,000 parameters" (paper 000)


def test_lenet5_outputs_log_probabilities():
    out = models.LeNet5()(torch.randn(4, 1, 32, 32))
    assert out.shape == (4, 10)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(4))


def test_lenet300100_shapes():
    net = models.LeNet300100()
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert (net.fc1.out_features, net.fc2.out_features) == (300, 100)
    assert models.count_parameters(net) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


@pytest.mark.parametrize("depth,blocks", [(8, 1), (14, 2), (20, 3), (32, 5), (56, 9)])
def test_resnet_depths(depth, blocks):
    net = models.CifarResNet(depth, in_channels=1)
    assert len(net.layer1) == len(net.layer2) == len(net.layer3) == blocks
    convs = [m for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d) and "shortcut" not in n]
    assert len(convs) + 1 == depth  # 6n + 1 convolutions plus the fc layer
    x = torch.randn(2, 1, 28, 28)
    assert net.features(x).shape == (2, 64)
    assert net(x).shape == (2, 10)


def test_resnet_width_and_channels():
    net = models.build("resnet", depth=8, width=8, in_channels=3, num_classes=4)
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert net.fc.in_features == 32


def test_resnet20_parameter_count_is_the_papers():
    # He et al.: ResNet-20 has 0.27M parameters (1x1-conv shortcuts add a few thousand)
    n = models.count_parameters(models.CifarResNet(20))
    assert 0.27e6 <= n <= 0.28e6


def test_bad_model_arguments_name_the_parameter():
    with pytest.raises(ParameterError, match=r"depth=21 .*8, 14, 20, 32, 56"):
        models.CifarResNet(21)
    with pytest.raises(ParameterError, match="model='alexnet' is not allowed.*'vgg'"):
        models.build("alexnet")


class _Planted:
    """A pickle that runs code when loaded unsafely: it would create the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_imagenet_resnet50_reads_the_hub_cache_and_never_downloads_unasked(tmp_path):
    import torchvision

    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]
    try:
        with pytest.raises(FileNotFoundError, match="download=False and the ResNet-50 weights are not at"):
            models.imagenet_resnet50(download=False)
        torch.manual_seed(0)
        state = torchvision.models.resnet50().state_dict()
        cached.parent.mkdir()
        torch.save(state, cached)  # right name, wrong content: not torchvision's published file
        with pytest.raises(ValueError, match="is not torchvision's published file"):
            models.imagenet_resnet50(download=False)
        own = tmp_path / "mine.pth"
        torch.save(state, own)
        net = models.imagenet_resnet50(weights_path=own)  # the user's own file: no published hash to check
    finally:
        torch.hub.set_dir(old)
    assert torch.equal(net.conv1.weight, state["conv1.weight"]) and not net.training


def test_imagenet_resnet50_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted.pth"
    torch.save({"conv1.weight": _Planted(marker)}, planted)
    with pytest.raises(ValueError, match="cannot be loaded as plain weights"):
        models.imagenet_resnet50(weights_path=planted)
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="weights_path='nowhere.pth' is not a file"):
        models.imagenet_resnet50(weights_path="nowhere.pth")
