"""The one importance interface: every registered criterion on layers and on coupled groups, a planted
filter that every data-driven criterion must find, and hand-computed values of the weight criteria."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from pruning_utils import causal, class_filters, criteria, models, runtime, trees  # noqa: F401 (registering)
from pruning_utils.broden import ConceptSet
from pruning_utils.params import ParameterError

LENET_TARGETS = [criteria.Target(conv, act) for conv, act in models.LENET5_LAYERS.values()]
RESNET_TARGET = criteria.Target("layer3.0.conv1", "layer3.0.relu1", "layer3.0.bn1")
NEEDS_BN = {"bn_scale"}
NEEDS_MAPS = {"iou"}  # dissection reads spatial maps: not a Linear layer's outputs


def _concepts(x: torch.Tensor, masks: torch.Tensor) -> ConceptSet:
    """One category ("object") with one concept ("blob") whose pixels are ``masks`` (N, S, S) of 0/1."""
    return ConceptSet(x, masks.long().unsqueeze(1), torch.ones(len(x), 1, dtype=torch.bool), ("-", "blob"),
                      np.array([-1, 0]), ("object",))


def _data(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor | None = None) -> criteria.Data:
    if masks is None:
        masks = torch.zeros(len(x), *x.shape[-2:])
    return criteria.Data(x, y, _concepts(x, masks))


SIDE = {"lenet": 32, "resnet": 16}  # small ResNet inputs keep the tests fast


def _build():
    torch.manual_seed(0)
    lenet = models.LeNet5().eval()
    resnet = models.CifarResNet(8, in_channels=1).eval()
    with torch.no_grad():  # BatchNorm scales that differ, so bn_scale has something to rank
        for m in resnet.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    return lenet, resnet


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and a loaded machine punishes a second thread."""
    with runtime.threads(1):
        yield


@pytest.fixture(scope="module")
def nets():
    """LeNet5 and a ResNet-8 with their coupled groups (the dependency graphs are built once)."""
    lenet, resnet = _build()
    groups = {name: criteria.coupled_groups(m, torch.rand(1, 1, SIDE[name], SIDE[name]))
              for name, m in (("lenet", lenet), ("resnet", resnet))}
    return {"lenet": lenet, "resnet": resnet, "groups": groups}


def test_every_criterion_is_covered_by_these_tests():
    """A criterion registered later must pass the same checks: each one needs data or not, and a name."""
    assert {"l1", "l2", "random", "bn_scale", "mean_activation", "apoz", "taylor", "iou", "gain", "causal",
            "class_usage"} <= set(criteria.REGISTRY)
    for name, cls in criteria.REGISTRY.items():
        assert cls.name == name and isinstance(cls.needs_data, bool)


@pytest.mark.parametrize("name", sorted(criteria.REGISTRY))
def test_every_criterion_gives_one_finite_score_per_filter(name, nets):
    lenet, resnet = nets["lenet"], nets["resnet"]
    gen = torch.Generator().manual_seed(1)
    cases = [(resnet, RESNET_TARGET, torch.rand(20, 1, 16, 16, generator=gen))]
    if name not in NEEDS_BN:
        cases += [(lenet, t, torch.rand(20, 1, 32, 32, generator=gen)) for t in LENET_TARGETS]
    for model, target, x in cases:
        y = torch.arange(len(x)) % 10
        scores = criteria.score(name, model, target, _data(x, y))
        n = criteria._module(model, target.conv).weight.shape[0]
        assert scores.shape == (n,) and np.isfinite(scores).all()


@pytest.mark.parametrize("name", sorted(criteria.REGISTRY))
def test_every_criterion_scores_every_coupled_group(name, nets):
    gen = torch.Generator().manual_seed(2)
    for key in ("resnet", "lenet"):
        model = nets[key]
        x = torch.rand(20, 1, SIDE[key], SIDE[key], generator=gen)
        data = _data(x, torch.arange(20) % 10)
        for group in nets["groups"][key]:
            if (name in NEEDS_BN and group.target.bn is None) or (
                    name in NEEDS_MAPS and isinstance(criteria._module(model, group.name), nn.Linear)):
                with pytest.raises(ParameterError, match=name):
                    criteria.score_group(name, model, group, data)
                continue
            scores = criteria.score_group(name, model, group, data)
            assert scores.shape == (group.size,) and np.isfinite(scores).all()


def planted(n: int = 160, seed: int = 0):
    """A conv layer of 4 filters where filter 2 alone carries the class: it detects a bright square, which
    class 1 images carry and class 0 images carry dimmed; filters 0, 1, 3 have larger weights (larger
    norms) but a bias that keeps them off on every image, and the classifier reads filter 2 only."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 0.05 * torch.rand(n, 1, 12, 12, generator=gen)
    masks = torch.zeros(n, 12, 12)
    for i in range(n):
        r, c = torch.randint(0, 9, (2,), generator=gen).tolist()
        x[i, 0, r:r + 4, c:c + 4] += 1.0 if y[i] == 1 else 0.4
        masks[i, r:r + 4, c:c + 4] = 1
    model = nn.Sequential(OrderedDict([("conv", nn.Conv2d(1, 4, 3, padding=1)), ("relu", nn.ReLU()),
                                       ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                                       ("fc", nn.Linear(4, 2))]))
    with torch.no_grad():
        model.conv.weight.copy_(torch.randn(4, 1, 3, 3, generator=gen).sign())
        model.conv.bias.fill_(-100.0)
        model.conv.weight[2] = 0.3
        model.conv.bias[2] = -0.5
        model.fc.weight.zero_()
        model.fc.weight[:, 2] = torch.tensor([-8.0, 8.0])
        pooled = model.pool(model.relu(model.conv(x)))[:, 2, 0, 0]
        middle = (pooled[y == 0].mean() + pooled[y == 1].mean()) / 2  # the classes split there
        model.fc.bias.copy_(torch.stack([8 * middle, -8 * middle]))
    return model.eval(), criteria.Target("conv", "relu"), _data(x, y, masks)


def test_the_planted_layer_is_what_it_claims():
    model, target, data = planted()
    with torch.no_grad():
        maps = model.relu(model.conv(data.x))
        acc = (model(data.x).argmax(1) == data.y).float().mean().item()
    assert maps[:, [0, 1, 3]].abs().max() == 0 and (maps[:, 2].flatten(1).amax(1) > 0).all()
    assert acc > 0.95
    l1 = criteria.score("l1", model, target)
    assert l1.argmin() == 2  # the weights alone point the wrong way


@pytest.mark.parametrize("name", sorted(n for n, c in criteria.REGISTRY.items() if c.needs_data))
def test_a_planted_filter_is_ranked_first_by_every_data_driven_criterion(name):
    model, target, data = planted()
    scores = criteria.score(name, model, target, data)
    others = np.delete(scores, 2)
    assert scores[2] > others.max(), scores
    assert criteria.ranking(scores)[-1] == 2


@pytest.mark.parametrize("name", sorted(n for n, c in criteria.REGISTRY.items() if c.needs_data))
def test_a_planted_channel_is_ranked_first_in_its_coupled_group(name):
    model, _, data = planted()
    (group,) = criteria.coupled_groups(model, data.x[:1])
    scores = criteria.score_group(name, model, group, data)
    assert scores[2] > np.delete(scores, 2).max(), scores


def test_weight_criteria_by_hand():
    conv = nn.Conv2d(1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, -0.5]])
                          .view(3, 1, 2, 2))
    model = nn.Sequential(OrderedDict([("conv", conv)]))
    t = criteria.Target("conv")
    np.testing.assert_allclose(criteria.score("l1", model, t), [7.0, 4.0, 0.5])
    np.testing.assert_allclose(criteria.score("l2", model, t), [5.0, 2.0, 0.5])
    assert criteria.ranking(criteria.score("l2", model, t)).tolist() == [2, 1, 0]


def test_group_magnitude_is_the_mean_over_the_coupled_layers(nets):
    """LeNet5's c3 group: c3's 16 filters and the matching 16 input slices of c5 (torch-pruning's group
    norm, reduction 'mean'), computed here by hand."""
    lenet = nets["lenet"]
    group = next(g for g in nets["groups"]["lenet"] if g.name == "convnet.c3")
    out_w = lenet.convnet.c3.weight.detach()
    in_w = lenet.convnet.c5.weight.detach().transpose(0, 1)
    l1 = (out_w.abs().flatten(1).sum(1) + in_w.abs().flatten(1).sum(1)) / 2
    l2 = ((out_w.pow(2).flatten(1).sum(1) + in_w.pow(2).flatten(1).sum(1)) / 2).sqrt()
    np.testing.assert_allclose(criteria.score_group("l1", lenet, group), l1.numpy(), rtol=1e-5)
    np.testing.assert_allclose(criteria.score_group("l2", lenet, group), l2.numpy(), rtol=1e-5)


def test_group_activation_criteria_agree_with_the_layer_where_one_layer_reads_the_group(nets):
    """A block's inner conv is read by one layer (conv2), whose input is relu1's output: the group's mean
    activation and APoZ equal the layer's, and its Taylor score is the layer's times the positions."""
    resnet = nets["resnet"]
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    data = criteria.Data(x, torch.arange(20) % 10)
    group = next(g for g in nets["groups"]["resnet"] if g.name == "layer2.0.conv1")
    assert group.target == criteria.Target("layer2.0.conv1", "layer2.0.relu1", "layer2.0.bn1")
    for name in ("mean_activation", "apoz"):
        np.testing.assert_allclose(criteria.score_group(name, resnet, group, data),
                                   criteria.score(name, resnet, group.target, data), rtol=1e-5, atol=1e-9)
    positions = 8 * 8
    np.testing.assert_allclose(criteria.score_group("taylor", resnet, group, data),
                               positions * criteria.score("taylor", resnet, group.target, data), rtol=1e-4)


def test_residual_stream_groups_read_the_stage_output():
    model = models.CifarResNet(20, in_channels=1)
    groups = {g.name: g for g in criteria.coupled_groups(model, torch.rand(1, 1, 28, 28))}
    assert len(groups) == 12 and "fc" not in groups
    assert groups["layer3.0.shortcut.conv"].target == criteria.Target("layer3.2.conv2", "layer3.2.relu2",
                                                                      "layer3.2.bn2")
    assert groups["conv1"].size == 16 and groups["layer3.0.shortcut.conv"].size == 64
    with pytest.raises(ParameterError, match=r"roots=\['layer9'\] are not allowed"):
        criteria.coupled_groups(model, torch.rand(1, 1, 28, 28), roots=["layer9"])


def test_random_is_seeded_and_independent_across_groups(nets):
    resnet, groups = nets["resnet"], nets["groups"]["resnet"]
    same_size = [g for g in groups if g.size == 16]
    a = [criteria.score_group("random", resnet, g, seed=5) for g in same_size]
    assert np.array_equal(a[0], criteria.score_group("random", resnet, same_size[0], seed=5))
    assert not np.array_equal(a[0], a[1])
    assert not np.array_equal(a[0], criteria.score_group("random", resnet, same_size[0], seed=6))


def test_data_driven_criteria_need_data_and_bad_names_are_named(nets):
    lenet = nets["lenet"]
    with pytest.raises(ParameterError, match="scores filters on data"):
        criteria.score("taylor", lenet, LENET_TARGETS[0])
    with pytest.raises(ParameterError, match="criterion='l3' is not allowed"):
        criteria.make("l3")
    with pytest.raises(ValueError, match="NaN"):
        criteria.ranking(np.array([1.0, np.nan]))


@pytest.mark.parametrize("name", sorted(criteria.REGISTRY))
def test_scoring_groups_together_equals_one_at_a_time(name, nets):
    model, groups = nets["resnet"], nets["groups"]["resnet"]
    x = torch.rand(12, 1, SIDE["resnet"], SIDE["resnet"], generator=torch.Generator().manual_seed(4))
    data = _data(x, torch.arange(12) % 10)
    together = criteria.score_groups(name, model, groups, data)
    for g in groups:
        np.testing.assert_allclose(together[g.name], criteria.score_group(name, model, g, data), rtol=1e-6)
