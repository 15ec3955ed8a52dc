"""Neuron merging (pruning_utils.merging, chapter 4) on hand-made layers whose answer is known."""
import importlib.util
from collections import OrderedDict

import pytest
import torch
from torch import nn

from pruning_utils import merging, models, prune, runtime
from pruning_utils.chapters import ROOT
from pruning_utils.merging import Chain, MergeError

ATOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    """Small products: one thread for torch and for the BLAS behind NumPy / scikit-learn (the baseline's),
    as fast as two here and not slowed by other processes on a shared machine."""
    from threadpoolctl import threadpool_limits

    with runtime.threads(1), threadpool_limits(1):
        yield


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
    assert [p.merged for p in plans] == [4, 3] and [p.dropped for p in plans] == [0, 0]
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
    assert plans[0].kept.tolist() == [0, 1, 2, 3] and plans[0].merged == 4
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
    kept = plans[0].kept
    assert len(kept) == 120 and plans[0].merged == 0
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
    with pytest.raises(MergeError, match=r"fc takes conv2's channels through a flatten whose layout cannot be "
                                         r"checked without an input; pass example="):
        merging.merge(net, chains, 0.5, method="prune")  # fx alone cannot see how the flatten lays channels out
    pruned, plans = merging.merge(net, chains, 0.5, method="prune", example=x[:1])
    assert pruned.fc.in_features == merging.n_kept(5, 0.5) * 16
    zeroed = net
    for chain, relu, n in zip(chains, ("relu1", "relu2"), (8, 5)):
        dropped = sorted(set(range(n)) - set(plans[chains.index(chain)].kept.tolist()))
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
            self.fc1, self.relu, self.fc2 = nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc2(self.relu(self.fc1(x))) if x.sum() > 0 else x

    net = Untraceable()
    with pytest.raises(MergeError, match=r"Untraceable's forward reads tensor values computed from its input "
                                         r"\(__bool__\), so it may take another path"):
        merging.find_chains(net, torch.ones(1, 2))  # fx cannot trace it; one run cannot show every path
    with pytest.raises(MergeError, match=r"torch.fx cannot trace Untraceable .*pass example="):
        merging.merge(net, [Chain("fc1", "fc2")], 0.5)
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


# --- issue 15: the reference-structured baseline, speed-related exactness, defects ---------------------------

@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_merge_equals_the_reference_structured_baseline(ratio):
    bench = _bench()
    torch.manual_seed(3)
    merged = dropped = 0
    for _, net, x, thr, lam in bench.networks(quick=True):
        chains = merging.find_chains(net, x)
        ref = bench.reference_merge(net, chains, ratio, thr, lam)
        ours, plans = merging.merge(net, chains, ratio, threshold=thr, lam=lam)
        assert all(torch.equal(p.kept, torch.as_tensor(ref["kept"][p.chain.layer])) for p in plans)
        theirs = merging.apply(net, plans)
        theirs.load_state_dict(ref["state"])
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        merged, dropped = merged + sum(p.merged for p in plans), dropped + sum(p.dropped for p in plans)
    assert merged > 0 and dropped > 0  # both paths were taken


def test_bench_main_runs_and_checks_equality(tmp_path):
    rows = _bench().main(["--quick", "--repeats", "1", "--json", str(tmp_path / "b.json")])
    assert len(rows) == 4 and all(r["same kept"] and r["max |d output|"] < 1e-5 for r in rows)
    assert (tmp_path / "b.json").read_text().count('"speed-up"') == 4


@pytest.mark.parametrize("bn_scale", ["reference", "exact"])
def test_reference_structured_z_equals_ours(bn_scale):
    bench = _bench()
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 18, generator=g)
    kept = merging.keep_indices(w, 15, "l1")
    assert kept.tolist() == bench.ref_keep(w, 15).tolist()
    z = merging.scaling_matrix(w, kept, 0.2)[0]
    torch.testing.assert_close(z, torch.from_numpy(bench.ref_scaling_fc(w.numpy(), kept.numpy(), 0.2)),
                               atol=1e-6, rtol=1e-6)
    gamma, beta = 0.5 + torch.rand(40, generator=g), 0.1 * torch.randn(40, generator=g)
    mean, var = 0.1 * torch.randn(40, generator=g), 0.5 + torch.rand(40, generator=g)
    z = merging.scaling_matrix_bn(w, kept, gamma, beta, mean, var, 1e-5, 0.1, 0.7, "reference")[0]
    stats = (t.numpy() for t in (gamma, beta, mean, var))
    ref = torch.from_numpy(bench.ref_scaling_bn(w.numpy(), kept.numpy(), 0.1, *stats, 0.7))
    torch.testing.assert_close(z, ref, atol=1e-5, rtol=1e-5)
    assert (z != 0).sum() > 15  # some pruned filters were merged
    z_exact = merging.scaling_matrix_bn(w, kept, gamma, beta, mean, var, 1e-5, 0.1, 0.7, bn_scale)[0]
    assert z_exact.shape == z.shape and ((z_exact != 0).sum(1) <= 1).all()  # one entry per row


def _planted_ties(n_pairs: int, d: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows 0..2n-1: kept pairs (a, a + 1e-7 noise, both large); rows 2n..: a pruned row near each pair, so
    its cosines to the two kept rows differ by about 1e-8, below float32's resolution."""
    a = torch.randn(n_pairs, d, generator=g, dtype=torch.float64) * 10
    b = a + 1e-7 * torch.randn(n_pairs, d, generator=g, dtype=torch.float64)
    p = 0.1 * (a + 0.3 * torch.randn(n_pairs, d, generator=g, dtype=torch.float64))
    return torch.cat([a, b, p]), torch.arange(2 * n_pairs)


def test_float32_near_ties_are_decided_as_in_float64():
    g = torch.Generator().manual_seed(6)
    w64, kept = _planted_ties(40, 300, g)
    w32 = w64.float()
    exact = merging.assign(w32.double(), kept, None)  # the float32 weights, every score in float64
    fast = merging.assign(w32, kept, None)
    assert torch.equal(fast.col, exact.col)
    torch.testing.assert_close(fast.scale, exact.scale, rtol=1e-6, atol=0)
    norm = w32.norm(dim=1)
    naive = merging._cosine(w32, exact.pruned, kept, norm).argmax(1)
    assert not torch.equal(naive, exact.col)  # float32 alone gets some of these wrong
    gamma = torch.ones(len(w32))
    zeros = torch.zeros(len(w32))
    fast_bn = merging.assign_bn(w32, kept, gamma, zeros, zeros, gamma, lam=1.0)
    exact_bn = merging.assign_bn(w32.double(), kept, gamma, zeros, zeros, gamma, lam=1.0)
    assert torch.equal(fast_bn.col, exact_bn.col)


def test_keep_indices_near_the_cut_is_decided_in_float64():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(60, 200, generator=g).abs()
    w = w / w.sum(1, keepdim=True)  # every l1 norm is 1 up to float32 rounding: all near the cut
    w[:, 0] += torch.linspace(0, 1e-6, 60)  # and now ordered in float64, by less than float32 resolves
    exact = merging.keep_indices(w.double(), 20, "l1")
    assert merging.keep_indices(w, 20, "l1").tolist() == exact.tolist()


def test_threshold_zero_means_no_threshold_as_in_the_reference():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.2]])  # row 2: best similarity -0.196 (with row 1)
    kept = torch.tensor([0, 1])
    for thr in (None, 0, 0.0):
        a = merging.assign(w, kept, thr)
        assert a.merged.tolist() == [True] and a.similarity[0] < 0
    assert merging.assign(w, kept, 1e-9).merged.tolist() == [False]  # any other value applies
    assert merging.assign(w, kept, -0.5).merged.tolist() == [True]
    bench = _bench()
    assert bench.ref_scaling_fc(w.numpy(), kept.numpy(), 0)[2].sum() > 0  # the baseline reads 0 the same way


def test_fold_equals_the_dense_product():
    g = torch.Generator().manual_seed(8)
    z = torch.rand(12, 5, generator=g, dtype=torch.float64) * (torch.rand(12, 5, generator=g) < 0.3)
    for weight in (torch.randn(7, 12, 3, 3, generator=g), torch.randn(4, 12, generator=g),
                   torch.randn(4, 12 * 6, generator=g)):
        torch.testing.assert_close(merging.fold(weight, z), merging.fold_dense(weight, z), atol=1e-6, rtol=1e-6)
        w = torch.randn(12, 9, generator=g)
        a = merging.assign(w, merging.keep_indices(w, 5), 0.1)
        torch.testing.assert_close(merging.fold(weight, a), merging.fold_dense(weight, a.dense()), atol=1e-6,
                                   rtol=1e-6)
    with pytest.raises(MergeError, match="the next layer has 13 inputs, not a multiple of the 12 neurons"):
        merging.fold(torch.randn(2, 13), z)


def test_a_hand_named_chain_across_gelu_raises():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2)).eval()
    with pytest.raises(MergeError, match=r"the chain 1 -> 3 cannot be merged: a GELU \(2\) lies between 1 and the "
                                         r"next layer; merging needs a positively homogeneous activation"):
        merging.merge(net, [Chain("1", "3")], 0.5)
    ok = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2), nn.ReLU(), nn.Linear(2, 2))
    with pytest.raises(MergeError, match=r"names next='5', bn=None, but 1's output reaches next='3'"):
        merging.merge(ok, [Chain("1", "5")], 0.5)
    with pytest.raises(MergeError, match=r"layer='5' feeds the model's output"):
        merging.merge(ok, [Chain("5", "3")], 0.5)
    merging.merge(ok, [Chain("1", "3")], 0.5)  # the right chain, hand-named, passes


def test_find_chains_gives_back_the_callers_modes():
    net = _conv_bn_net(torch.Generator().manual_seed(9))[0]
    x = torch.randn(2, 3, 8, 8)
    net.train()
    merging.find_chains(net, x)
    assert net.training and net.bn1.training
    net.eval()
    net.bn2.train()  # a mixed state comes back as it was
    merging.survey(net, torch.randn(1, 3, 8, 8))
    merging.find_chains(nn.Sequential(*net), x)  # a new model object sharing the modules: traced, not cached
    assert not net.training and not net.bn1.training and net.bn2.training


class _BuildsInForward(nn.Module):
    """fx cannot trace it: nn.AvgPool2d and nn.ReLU are created inside forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6 * 2 * 2, 3)

    def forward(self, x):
        x = nn.AvgPool2d(2)(torch.relu(self.bn1(self.conv1(x))))
        x = nn.ReLU()(self.conv2(x))
        return self.fc(nn.MaxPool2d(2)(x).view(x.size(0), -1))


def test_modules_built_in_forward_are_surveyed_with_hooks_and_merge_exactly():
    net = _bench().randomise_bn(_BuildsInForward(), seed=1)
    x = torch.randn(5, 2, 8, 8)
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(net)
    rows = merging.survey(net, x[:1])
    assert {r["found by"] for r in rows} == {"forward hooks"}
    chains = merging.find_chains(net, x[:1])
    assert chains == [Chain("conv1", "conv2", "bn1", "relu"), Chain("conv2", "fc", None, "ReLU")]
    planted = merging.plant_multiples(net, chains, 0.5, seed=2)
    merged, plans = merging.merge(planted, chains, 0.5, threshold=0.1, bn_scale="exact", example=x[:1])
    assert [p.merged for p in plans] == [4, 3]
    with torch.no_grad():
        torch.testing.assert_close(merged(x), planted(x), atol=ATOL, rtol=ATOL)
    with pytest.raises(MergeError, match=r"torch.fx cannot trace _BuildsInForward .*pass example="):
        merging.merge(_BuildsInForward(), chains, 0.5)  # a new model without an example: nothing to run


def test_hooks_see_what_fx_sees():
    x = torch.zeros(1, 1, 28, 28)
    for net, ex in ((models.LeNet300100(), x), (models.CifarResNet(depth=8, in_channels=1), x),
                    (models.vgg_stack((8, "M", 16, "M", 16), 1, 10, hidden=12), torch.zeros(1, 1, 8, 8))):
        fx_rows, how = merging._survey_rows(net, ex)
        assert how == "torch.fx"
        modules = dict(net.named_modules())
        eager = {n.module: merging._follow(n, modules) for n in merging._eager_graph(net, ex) if n.kind == "layer"}
        assert set(eager) == {r["layer"] for r in fx_rows}
        for r in fx_rows:
            chain, problem = eager[r["layer"]]
            assert chain == r["chain"] and bool(problem) == (r["status"] == "problem"), r["layer"]
        assert sum(r["status"] == "chain" for r in fx_rows) >= 2


def test_the_survey_is_cached_per_model(monkeypatch):
    net = models.LeNet300100()
    x = torch.zeros(1, 1, 28, 28)
    calls = []
    trace = torch.fx.symbolic_trace
    monkeypatch.setattr(torch.fx, "symbolic_trace", lambda m: calls.append(1) or trace(m))
    first = merging.find_chains(net, x)
    for _ in range(3):
        assert merging.find_chains(net, x) == first
        merging.merge(net, first, 0.5)
    assert len(calls) == 1
    net.fc1 = nn.Linear(784, 200)  # the modules changed: traced again
    net.fc2 = nn.Linear(200, 100)
    merging.find_chains(net, x)
    assert len(calls) == 2


def test_apply_leaves_the_original_untouched_and_shares_nothing():
    net = _bench().randomise_bn(models.vgg_stack((8, "M", 16), 1, 10, hidden=12))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 1, 4, 4)
    merged, _ = merging.merge(net, merging.find_chains(net, x), 0.5, threshold=0.1)
    with torch.no_grad():
        for t in merged.state_dict().values():
            t.add_(1) if t.is_floating_point() else None
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_merge_kept_is_prune_plus_merge_after_any_ranking():
    net = models.LeNet300100().eval()
    x = torch.randn(16, 1, 28, 28)
    kept = torch.randperm(300)[:90]
    merged, pl = merging.merge_kept(net, "fc1", kept, x[:1], threshold=None)
    assert pl.kept.tolist() == sorted(kept.tolist()) and pl.merged == 210 and merged.fc1.out_features == 90
    pruned, _ = merging.merge_kept(net, "fc1", kept, x[:1], method="prune")
    nothing, pl0 = merging.merge_kept(net, "fc1", kept, x[:1], threshold=0.999)  # every candidate dropped
    assert pl0.merged == 0
    _same_state(nothing, pruned)  # prune + merge equals prune when nothing is merged
    by_l1, _ = merging.merge(net, [Chain("fc1", "fc2")], 0.7, threshold=0.45)
    same, _ = merging.merge_kept(net, "fc1", merging.keep_indices(merging.rows_of(net.fc1, None), 90), x[:1],
                                 threshold=0.45)
    _same_state(by_l1, same)
    with pytest.raises(MergeError, match=r"layer='fc3' cannot be merged: it heads no merge-able chain"):
        merging.merge_kept(net, "fc3", [0, 1], x[:1])
    with pytest.raises(MergeError, match=r"kept=\[0, 400\]... is not allowed for 'fc1'"):
        merging.merge_kept(net, "fc1", [0, 400], x[:1])


# --- chapter 4's experiment functions on hand-made inputs ------------------------------------------------------

def test_chapter_parameters_reject_bad_values():
    from pruning_utils.presets import chapter_params

    for name, value, message in (("fc_threshold", float("nan"), r"fc_threshold=nan is not allowed: not a finite"),
                                 ("ratios", [0.5, 0.5], r"ratios=\[0.5, 0.5\] is not allowed: 0.5 appear"),
                                 ("lenet_recipe", "adam", r"lenet_recipe='adam' is not allowed"),
                                 ("seeds", [1, 1], r"seeds=\[1, 1\] is not allowed")):
        with pytest.raises(merging.ParameterError, match=message):
            chapter_params("neuron_merging", "smoke", **{name: value})
    P = chapter_params("neuron_merging", "default", ratios=[0.8, 0.5])
    assert P.ratios == [0.5, 0.8] and len(P.seeds) >= 5 and P.lenet_recipe == "baseline"


def _table1(rows):
    import pandas as pd

    df = pd.DataFrame(rows, columns=["seed", "criterion", "ratio", "method", "accuracy"])
    df["merged"], df["dropped"], df["params"] = 1, 2, 100
    return merging.Table1(df, {0: 0.9, 1: 0.88, 2: 0.89}, ["l1"], [0.5, 0.8], 0.45)


def test_table1_pairs_merge_and_prune_by_seed():
    rows = [(s, "l1", r, m, acc) for s, off in ((0, 0.0), (1, 0.02), (2, -0.02)) for r, m, acc in
            ((0.5, "prune", 0.80 + off), (0.5, "merge", 0.81 + off), (0.8, "prune", 0.60 + off),
             (0.8, "merge", 0.70 + off + 0.01 * (s == 1)))]
    t1 = _table1(rows)
    g = t1.gain("l1", 0.5)
    assert g.mean == pytest.approx(0.01) and g.hi - g.lo == pytest.approx(0.0, abs=1e-9)  # paired: the offsets cancel
    g8 = t1.gain("l1", 0.8)
    assert g8.mean == pytest.approx(0.1 + 0.01 / 3) and g8.lo < g8.mean < g8.hi
    table = t1.table().data
    assert table.loc["0.5", ("l1", "merge")] == "0.8100 ± 0.0497"
    assert table.loc["0.8", ("paper (l1)", "merge")] == "0.8002"
    nums = t1.numbers()
    assert nums["gain_max"] == pytest.approx(g8.mean) and nums["paper_gain_max"] == pytest.approx(0.8002 - 0.6676)


def test_threshold_shortfall_uses_the_best_mean_threshold_paired_by_seed():
    import pandas as pd

    bonus = {0.0: 0.0, 0.45: 0.02, 0.9: -0.1}
    sweep = pd.DataFrame([(s, 0.5, t, 0.7 + 0.01 * s + bonus[t]) for s in range(3) for t in bonus],
                         columns=["seed", "ratio", "threshold", "accuracy"])
    at = pd.DataFrame([(s, 0.5, 0.7 + 0.01 * s) for s in range(3)], columns=["seed", "ratio", "accuracy"])
    rev = pd.DataFrame([(s, 0.5, 0.7, 0.65) for s in range(3)], columns=["seed", "ratio", "paper", "reversed"])
    checks = merging.LenetChecks(rev, sweep, at, 0.0, "l1")
    assert checks.best_thresholds() == {0.5: 0.45}
    assert checks.shortfall_estimate().mean == pytest.approx(0.02)
    assert checks.reversed_estimate().mean == pytest.approx(-0.05)


def test_the_papers_recipe_is_the_reference_codes(tmp_path):
    cfg = merging.paper_config()
    assert (cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay, cfg.batch_size, cfg.epochs, cfg.schedule,
            cfg.milestones) == (0.1, 0.9, False, 1e-4, 128, 60, "step", (15, 30, 45))
    from pruning_utils import data

    test = data.load("fashion-mnist", "test")
    signed = merging.signed(test)
    assert float(signed.x.min()) == -1.0 and float(signed.x.max()) == 1.0 and torch.equal(signed.y, test.y)
    model, record = merging.paper_lenet(0, epochs=1, train_subset=300, directory=tmp_path, progress=False)
    again, record2 = merging.paper_lenet(0, epochs=1, train_subset=300, directory=tmp_path, progress=False)
    assert not record["cached"] and record2["cached"] and record["n_train"] == 300
    _same_state(model, again)
