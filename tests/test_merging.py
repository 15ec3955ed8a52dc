"""Neuron merging (pruning_utils.merging, chapter 4) on hand-made layers whose answer is known."""
import importlib.util
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pruning_utils import merging, models, prune
from pruning_utils.chapters import ROOT
from pruning_utils.merging import Chain, MergeError

ATOL = 1e-5


def _bench():
    spec = importlib.util.spec_from_file_location("bench_merging", ROOT / "benchmarks" / "bench_merging.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _with_multiples(rows: int, cols: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """2·rows rows: ``rows`` bases of l1 norm 1 to 1.2, then each base times a positive s in [0.3, 0.8]
    (so l1 and l2 keep the bases), in a shuffled order. Returns the rows and the multiples' scales."""
    base = torch.randn(rows, cols, generator=g)
    base = base / base.abs().sum(1, keepdim=True) * (1 + 0.2 * torch.rand(rows, 1, generator=g))
    s = 0.3 + 0.5 * torch.rand(rows, generator=g)
    w = torch.cat([base, s[:, None] * base])
    return w, s


def _set_linear(layer: nn.Linear, rows: torch.Tensor):
    layer.weight.data = rows[:, :-1].clone()
    layer.bias.data = rows[:, -1].clone()


def test_n_kept_and_bad_ratio():
    assert merging.n_kept(300, 0.7) == 90 and merging.n_kept(100, 0.5) == 50 and merging.n_kept(3, 0.9) == 1
    with pytest.raises(merging.ParameterError, match=r"ratio=1.0 is not allowed; expected a float in \[0, 1\)"):
        merging.n_kept(10, 1.0)


def test_keep_criteria_on_a_known_case():
    w = torch.tensor([[3.0, 0.0], [2.0, 2.0], [0.1, 0.0]])
    assert merging.keep_indices(w, 1, "l1").tolist() == [1]  # l1: 3, 4, 0.1
    assert merging.keep_indices(w, 1, "l2").tolist() == [0]  # l2: 3, 2.83, 0.1
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])  # summed distances 11, 10, 19
    assert merging.keep_indices(line, 2, "l2-GM").tolist() == [0, 2]
    with pytest.raises(merging.ParameterError, match="criterion='l3' is not allowed"):
        merging.keep_indices(w, 1, "l3")


def test_scaling_matrix_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.2], [1.0, 1.0]])
    kept = torch.tensor([0, 1])
    z, sim = merging.scaling_matrix(w, kept, threshold=None)
    expected = torch.tensor([[1.0, 0.0], [0.0, 1.0], [4.04 ** 0.5, 0.0], [2 ** 0.5, 0.0]])
    torch.testing.assert_close(z, expected.double())  # row 3 ties; either kept neuron is right, the first wins
    assert sim[2] == pytest.approx(2 / 4.04 ** 0.5)
    z, _ = merging.scaling_matrix(w, kept, threshold=0.8)  # cos 0.707 < 0.8: row 3 is dropped
    assert z[3].abs().sum() == 0 and z[2, 0] > 0
    z, _ = merging.scaling_matrix(w, kept, threshold=None, s_ratio="kept/pruned")
    assert z[2, 0].item() == pytest.approx(1 / 4.04 ** 0.5)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu"])
@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_linear_merge_is_exact_for_positive_multiples(activation, criterion):
    g = torch.Generator().manual_seed(1)
    net = merging.mlp([6, 8, 6, 3], activation).eval()  # Flatten, Linear(6,8), act, Linear(8,6), act, Linear
    rows1, _ = _with_multiples(4, 7, g)
    rows2, _ = _with_multiples(3, 9, g)
    _set_linear(net[1], rows1[torch.randperm(8, generator=g)])
    _set_linear(net[3], rows2[torch.randperm(6, generator=g)])
    x = torch.randn(64, 6, generator=g)
    chains = merging.find_chains(net, x[:1])
    merged, plans = merging.merge(net, chains, 0.5, criterion=criterion, threshold=0.45)
    assert [p["merged"] for p in plans] == [4, 3] and [p["dropped"] for p in plans] == [0, 0]
    assert merged[1].out_features == 4 and merged[3].weight.shape == (3, 4) and merged[5].in_features == 3
    with torch.no_grad():
        torch.testing.assert_close(merged(x), net(x), atol=ATOL, rtol=ATOL)
        pruned, _ = merging.merge(net, chains, 0.5, method="prune", criterion=criterion)
        assert (pruned(x) - net(x)).abs().max() > 1e-2  # without compensation the output changes


def _conv_bn_net(g):
    net = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(8, 5, 3, padding=1)), ("bn2", nn.BatchNorm2d(5)), ("relu2", nn.ReLU()),
        ("flat", nn.Flatten()), ("fc", nn.Linear(5 * 4 * 4, 4)),
    ])).eval()
    rows, s = _with_multiples(4, 27, g)
    net.conv1.weight.data = rows.reshape(8, 3, 3, 3)
    for bn in (net.bn1, net.bn2):
        n = bn.num_features
        bn.weight.data = 0.5 + torch.rand(n, generator=g)
        bn.running_var = 0.3 + torch.rand(n, generator=g)
        bn.running_mean = 0.2 * torch.randn(n, generator=g)
        bn.bias.data = 0.2 * torch.randn(n, generator=g)
    return net, s


def _exact_bn_offsets(net, s):
    """Set β of each multiple n = 4 + k so that BN(y_n) = A·BN(y_k) exactly (offset B = 0)."""
    bn = net.bn1
    g_, b, m, v = bn.weight.data, bn.bias.data, bn.running_mean, bn.running_var
    sd = (v + bn.eps).sqrt()
    for k in range(4):
        n = 4 + k
        a = s[k] * (g_[n] / g_[k]) * (sd[k] / sd[n])
        b[n] = a * b[k] - g_[n] * (s[k] * m[k] - m[n]) / sd[n]


def test_conv_bn_merge_is_exact_with_the_exact_bn_scale():
    g = torch.Generator().manual_seed(2)
    net, s = _conv_bn_net(g)
    _exact_bn_offsets(net, s)
    x = torch.randn(16, 3, 8, 8, generator=g)
    chains = merging.find_chains(net, x[:1])
    assert chains == [Chain("conv1", "conv2", "bn1", "relu1"), Chain("conv2", "fc", "bn2", "relu2")]
    merged, plans = merging.merge(net, chains[:1], 0.5, threshold=0.1, lam=0.85, bn_scale="exact")
    assert plans[0]["kept"].tolist() == [0, 1, 2, 3] and plans[0]["merged"] == 4
    assert merged.bn1.num_features == 4 and merged.conv2.in_channels == 4
    with torch.no_grad():
        torch.testing.assert_close(merged(x), net(x), atol=ATOL, rtol=ATOL)


def test_reference_bn_scale_is_exact_only_when_gamma_and_variance_match():
    g = torch.Generator().manual_seed(3)
    net, s = _conv_bn_net(g)
    _exact_bn_offsets(net, s)
    x = torch.randn(16, 3, 8, 8, generator=g)
    chains = [Chain("conv1", "conv2", "bn1", "relu1")]
    with torch.no_grad():
        ref, _ = merging.merge(net, chains, 0.5, threshold=0.1, lam=1.0, bn_scale="reference")
        assert (ref(x) - net(x)).abs().max() > 1e-2  # its BN ratio is inverted (and uses the variance)
        bn = net.bn1  # the same γ and variance for every pair: both formulas give the scale s
        bn.weight.data[4:] = bn.weight.data[:4]
        bn.running_var[4:] = bn.running_var[:4]
        _exact_bn_offsets(net, s)
        ref, _ = merging.merge(net, chains, 0.5, threshold=0.1, lam=1.0, bn_scale="reference")
        torch.testing.assert_close(ref(x), net(x), atol=ATOL, rtol=ATOL)


def test_prune_only_equals_dropping_the_columns():
    net = models.LeNet300100().eval()
    x = torch.randn(32, 1, 28, 28)
    pruned, plans = merging.merge(net, [Chain("fc1", "fc2")], 0.6, method="prune", criterion="l2")
    kept = plans[0]["kept"]
    assert len(kept) == 120 and plans[0]["merged"] == 0
    torch.testing.assert_close(pruned.fc1.weight, net.fc1.weight[kept])
    torch.testing.assert_close(pruned.fc1.bias, net.fc1.bias[kept])
    torch.testing.assert_close(pruned.fc2.weight, net.fc2.weight[:, kept])
    dropped = sorted(set(range(300)) - set(kept.tolist()))
    zeroed = prune.zero_channels(net, "relu1", dropped)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=ATOL, rtol=ATOL)


def test_prune_only_conv_bn_equals_zeroing_the_channels():
    g = torch.Generator().manual_seed(4)
    net, _ = _conv_bn_net(g)
    x = torch.randn(8, 3, 8, 8, generator=g)
    chains = [Chain("conv1", "conv2", "bn1"), Chain("conv2", "fc", "bn2")]  # conv2 -> flatten -> fc: 16 per channel
    pruned, plans = merging.merge(net, chains, 0.5, method="prune")
    assert pruned.fc.in_features == merging.n_kept(5, 0.5) * 16
    zeroed = net
    for chain, relu, n in zip(chains, ("relu1", "relu2"), (8, 5)):
        dropped = sorted(set(range(n)) - set(plans[chains.index(chain)]["kept"].tolist()))
        zeroed = prune.zero_channels(zeroed, relu, dropped)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=ATOL, rtol=ATOL)


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_automatic_chains_equal_naming_by_hand_on_lenet300100():
    net = models.LeNet300100().eval()
    found = merging.find_chains(net, torch.zeros(1, 1, 28, 28))
    assert found == [Chain("fc1", "fc2", None, "relu1"), Chain("fc2", "fc3", None, "relu2")]
    auto, _ = merging.merge(net, found, 0.7, threshold=0.45)
    hand, _ = merging.merge(net, [Chain("fc1", "fc2"), Chain("fc2", "fc3")], 0.7, threshold=0.45)
    _same_state(auto, hand)


def test_automatic_chains_equal_naming_by_hand_on_a_vgg_sequential():
    net = _bench().randomise_bn(models.vgg_stack((8, "M", 16, 16, "M", 32), 1, 10, hidden=24))
    x = torch.randn(4, 1, 8, 8)
    found = merging.find_chains(net, x[:1])
    by_hand = [Chain("0", "4", "1", "2"), Chain("4", "7", "5", "6"), Chain("7", "11", "8", "9"),
               Chain("11", "16", "12", "13"), Chain("16", "19", "17", "18")]
    assert found == by_hand
    auto, _ = merging.merge(net, found, 0.5, threshold=0.1)
    hand, _ = merging.merge(net, [Chain(c.layer, c.next, c.bn) for c in by_hand], 0.5, threshold=0.1)
    _same_state(auto, hand)
    assert auto[16].in_features == 16 and auto[19].in_features == 12
    assert auto(x).shape == (4, 10)


def test_unsupported_activation_raises_a_clear_error():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    with pytest.raises(MergeError, match=r"a Tanh \(2\) lies between 1 and the next layer; merging needs a "
                                         r"positively homogeneous activation \(ReLU or LeakyReLU\)"):
        merging.find_chains(net, torch.zeros(1, 4))
    assert merging.find_chains(net, torch.zeros(1, 4), on_problem="skip") == []
    with pytest.raises(MergeError, match=r"chains=\[\] is not allowed"):
        merging.merge(net, [], 0.5)


def test_a_branch_raises_and_skip_keeps_the_inner_chains_of_a_resnet():
    net = models.CifarResNet(depth=8, in_channels=1).eval()
    x = torch.zeros(1, 1, 28, 28)
    with pytest.raises(MergeError, match=r"CifarResNet cannot be merged as a whole: conv1: branch: the output of "
                                         r"relu feeds 2 operations"):
        merging.find_chains(net, x)
    chains = merging.find_chains(net, x, on_problem="skip")
    assert chains == [Chain(f"layer{i}.0.conv1", f"layer{i}.0.conv2", f"layer{i}.0.bn1", f"layer{i}.0.relu1")
                      for i in (1, 2, 3)]
    reasons = {r["layer"]: r["reason"] for r in merging.survey(net, x)}
    assert reasons["layer3.0.conv2"].startswith("add (which joins two branches)")


def test_other_unsupported_models_raise():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(MergeError, match="torch.fx cannot trace Untraceable"):
        merging.find_chains(Untraceable(), torch.ones(1, 2))
    bn_after = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 3))
    with pytest.raises(MergeError, match="BatchNorm 2 comes after the activation"):
        merging.find_chains(bn_after, torch.zeros(1, 1, 8, 8))
    spatial_fc = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(2), nn.Linear(16, 8))  # acts on pixels
    with pytest.raises(MergeError, match=r"3 does not take the 4 channels flattened \(its input has shape"):
        merging.find_chains(spatial_fc, torch.zeros(1, 1, 6, 6))
    no_act = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(MergeError, match="no ReLU or LeakyReLU between 0 and 1"):
        merging.find_chains(no_act, torch.zeros(1, 3))
    with pytest.raises(MergeError, match="next='2' takes 6 inputs, which does not fit the 4 outputs of '0'"):
        merging.merge(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(6, 2)), [Chain("0", "2")], 0.5)


@pytest.mark.parametrize("bn_scale", ["reference", "exact"])
def test_vectorised_equals_the_per_neuron_loop(bn_scale):
    bench = _bench()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 18, generator=g).double()
    kept = merging.keep_indices(w, 15, "l2-GM")
    assert kept.tolist() == bench.loop_keep(w.numpy(), 15, "l2-GM").tolist()
    z, _ = merging.scaling_matrix(w, kept, 0.2)
    torch.testing.assert_close(z, torch.from_numpy(bench.loop_scaling_matrix(w.numpy(), kept.numpy(), 0.2)))
    gamma, beta = 0.5 + torch.rand(40, generator=g), 0.1 * torch.randn(40, generator=g)
    mean, var = 0.1 * torch.randn(40, generator=g), 0.5 + torch.rand(40, generator=g)
    z, _ = merging.scaling_matrix_bn(w, kept, gamma, beta, mean, var, 1e-5, 0.1, 0.7, bn_scale)
    stats = (t.double().numpy() for t in (gamma, beta, mean, var))
    loop = bench.loop_scaling_matrix_bn(w.numpy(), kept.numpy(), *stats, 1e-5, 0.1, 0.7, bn_scale)
    torch.testing.assert_close(z, torch.from_numpy(loop))
    assert (z != 0).sum() > 15  # some pruned filters were merged


def test_vgg16_reference_ratios():
    net = models.vgg_stack(models.VGG_CFGS[16], 3, 10)
    ratios = merging.vgg16_reference_ratios(net)
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    assert ratios == {convs[0]: 0.5, **{c: 0.5 for c in convs[7:]}}
    assert len(merging.find_chains(net, torch.zeros(1, 3, 32, 32))) == 14


def test_vgg_recipe_pads_28_pixel_images_to_32_and_builds_through_the_baseline_cache_path():
    from pruning_utils import train

    cfg = train.TrainConfig(epochs=1)
    fashion = merging.vgg_recipe("fashion-mnist", cfg, depth=11, train_subset=100)
    assert (fashion.model, fashion.pad, fashion.train_subset) == ("vgg", 2, 100)
    assert train.build_for(fashion)(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    cifar = merging.vgg_recipe("cifar10", cfg)
    assert cifar.pad == 0 and train.build_for(cifar)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert fashion.key(0) != merging.vgg_recipe("fashion-mnist", cfg, depth=16, train_subset=100).key(0)
    with pytest.raises(merging.ParameterError, match="depth=13 is not allowed"):
        merging.vgg_recipe("cifar10", cfg, depth=13)
