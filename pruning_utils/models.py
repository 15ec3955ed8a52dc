"""The book's models, plain ``nn.Module``s with named submodules so a chapter can address a layer by name.

- :class:`LeNet5` exactly as printed in paper 000 (chapters 0, 1, 5);
- :class:`LeNet300100`, the fully connected net of the neuron-merging paper (chapters 0, 4);
- :class:`CifarResNet`, the CIFAR-style ResNet of depth 6n+2 (ResNet-8/14/20/32/56; chapters 0, 2, 3, 4, 5);
- :func:`vgg`, the VGG-11/16 of the neuron-merging reference code as one Sequential (chapter 4);
- :func:`imagenet_resnet50`, torchvision's ImageNet ResNet-50 with its published weights (chapter 2, full).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .params import ParameterError, check_choice

RESNET_DEPTHS = (8, 14, 20, 32, 56)


# LeNet5's three conv layers by paper 000's names (its conv1..conv3 are c1, c3, c5): the conv module whose
# filters are scored and pruned, and the ReLU whose maps are the filters' activations. Chapters 1, 5, 6.
LENET5_LAYERS = {"conv1": ("convnet.c1", "convnet.relu1"), "conv2": ("convnet.c3", "convnet.relu3"),
                 "conv3": ("convnet.c5", "convnet.relu5")}


class LeNet5(nn.Module):
    """LeNet5 of paper 000: c1-relu1-s2-c3-relu3-s4-c5-relu5 then f6-relu6-f7-sig7 (LogSoftmax).

    Takes 1x32x32 images (MNIST padded by 2); relu1, relu3, relu5 give 6x28x28, 16x10x10, 120x1x1 maps.
    The output is log-probabilities; ``F.cross_entropy`` on it equals the NLL loss, since
    log_softmax is idempotent.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.convnet = nn.Sequential(OrderedDict([
            ("c1", nn.Conv2d(in_channels, 6, kernel_size=5)),
            ("relu1", nn.ReLU()),
            ("s2", nn.MaxPool2d(kernel_size=2, stride=2)),
            ("c3", nn.Conv2d(6, 16, kernel_size=5)),
            ("relu3", nn.ReLU()),
            ("s4", nn.MaxPool2d(kernel_size=2, stride=2)),
            ("c5", nn.Conv2d(16, 120, kernel_size=5)),
            ("relu5", nn.ReLU()),
        ]))
        self.fc = nn.Sequential(OrderedDict([
            ("f6", nn.Linear(120, 84)),
            ("relu6", nn.ReLU()),
            ("f7", nn.Linear(84, num_classes)),
            ("sig7", nn.LogSoftmax(dim=-1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convnet(x).flatten(1))


class LeNet300100(nn.Module):
    """LeNet-300-100: fc1 (784->300) relu1 fc2 (300->100) relu2 fc3 (100->classes), on flattened images."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, 300)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.fc1(self.flatten(x)))
        return self.fc3(self.relu2(self.fc2(x)))


class BasicBlock(nn.Module):
    """conv1-bn1-relu1-conv2-bn2, plus the shortcut (1x1 conv + BN where the shape changes), then relu2."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)),
                ("bn", nn.BatchNorm2d(planes)),
            ]))
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. (2016), depth 6n+2: conv1-bn1-relu, layer1..3 of n blocks, avgpool, fc.

    ``width`` is the first stage's channel count (16 in the original); stages have width, 2w, 4w.
    :meth:`features` returns the fc layer's input, the final-layer features of chapter 3.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        check_choice("depth", depth, RESNET_DEPTHS)
        if width < 1:
            raise ParameterError(f"width={width!r} is not allowed; expected an int >= 1")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width]
        self.layer1 = self._stage(width, planes[0], n, stride=1)
        self.layer2 = self._stage(planes[0], planes[1], n, stride=2)
        self.layer3 = self._stage(planes[1], planes[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_planes, planes, n, stride):
        blocks = [BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1) for i in range(n)]
        return nn.Sequential(*blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the final linear layer (after global average pooling; >= 0)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.avgpool(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


VGG_CFGS = {  # Simonyan and Zisserman (2015), as in the reference code's models/VGG.py ("M": max-pool)
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
}


def vgg_stack(cfg: Sequence, in_channels: int = 3, num_classes: int = 10, hidden: int = 512,
              final_pool: int = 2) -> nn.Sequential:
    """The reference's VGG as one Sequential: conv3x3-BN-ReLU per number in ``cfg`` ("M": 2x2 max-pool),
    avg-pool ``final_pool``, flatten, Linear(cfg[-1], hidden)-BN-ReLU, Linear(hidden, classes)."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU()]
            c = v
    layers += [nn.AvgPool2d(final_pool), nn.Flatten(), nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
               nn.Linear(hidden, num_classes)]
    return nn.Sequential(*layers)


def vgg(depth: int = 16, in_channels: int = 3, num_classes: int = 10) -> nn.Sequential:
    """VGG-``depth`` (11 or 16) of the neuron-merging reference code, as one :func:`vgg_stack` (chapter 4)."""
    check_choice("depth", depth, tuple(VGG_CFGS))
    return vgg_stack(VGG_CFGS[depth], in_channels, num_classes)


MODELS = ("lenet5", "lenet300100", "resnet", "vgg")


def build(name: str, **kwargs) -> nn.Module:
    """A model by name: 'lenet5', 'lenet300100', 'resnet' or 'vgg' (kwargs: depth, width, in_channels,
    num_classes)."""
    check_choice("model", name, MODELS)
    make = {"lenet5": LeNet5, "lenet300100": LeNet300100, "resnet": CifarResNet, "vgg": vgg}[name]
    return make(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases; BatchNorm's affine ones included)."""
    return sum(p.numel() for p in model.parameters())


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def imagenet_resnet50(download: bool = False, weights_path: str | Path | None = None) -> nn.Module:
    """torchvision's ResNet-50 with its IMAGENET1K_V1 weights. From ``weights_path`` if given (a state
    dict; no published hash to check it against), else from torch's hub cache, where the file must match
    the SHA-256 prefix torchvision publishes in its name; fetched there only with ``download=True``.
    Always loaded with ``weights_only=True``: a file in the cache can never run code."""
    import torchvision

    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
    name = weights.url.rsplit("/", 1)[-1]
    published = name.rsplit("-", 1)[-1].split(".")[0]  # resnet50-0676ba61.pth -> 0676ba61
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights_path={str(weights_path)!r} is not a file")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / name
        if not path.exists():
            if not download:
                raise FileNotFoundError(f"download=False and the ResNet-50 weights are not at {path}; pass "
                                        f"download=True, or copy {weights.url} there")
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(weights.url, str(path), hash_prefix=published, progress=False)
            except OSError as err:  # URLError and socket errors: offline, or the server is unreachable
                raise FileNotFoundError(
                    f"download=True, but fetching the ResNet-50 weights from {weights.url} failed "
                    f"({type(err).__name__}: {err}); this machine may have no internet. Copy the file to "
                    f"{path}, or pass weights_path.") from err
        digest = _sha256(path)
        if not digest.startswith(published):
            raise ValueError(f"{path} is not torchvision's published file (SHA-256 {digest[:12]}..., expected "
                             f"{published}...): refusing it. Delete it, or pass your own file as weights_path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that wants to run code, or a damaged file
        raise ValueError(f"{path} cannot be loaded as plain weights ({type(err).__name__}: {err}); refusing it")
    model = torchvision.models.resnet50()
    model.load_state_dict(state)
    return model.eval()
