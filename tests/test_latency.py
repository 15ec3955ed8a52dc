"""Whole-network pruning (prune.py: groups, plans, removal, masks, the MAC model) and CPU costs (latency.py)."""
import numpy as np
import pytest
import torch
from torch import nn

from pruning_utils import criteria, latency, models, prune
from pruning_utils.params import ParameterError


def _randomise_batchnorm(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def resnet():
    net = _randomise_batchnorm(models.CifarResNet(8, in_channels=1))
    x = torch.randn(6, 1, 16, 16)
    return net, x, criteria.coupled_groups(net, x[:1])


@pytest.fixture(scope="module")
def lenet():
    net = models.LeNet5().eval()
    x = torch.randn(6, 1, 32, 32)
    return net, x, criteria.coupled_groups(net, x[:1])


def _conv_linear_macs(net, x):
    total = []

    def hook(m, _i, out):
        k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups if isinstance(m, nn.Conv2d) \
            else m.in_features
        total.append(out[0].numel() * k)

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(x[:1])
    for h in hs:
        h.remove()
    return sum(total)


def test_groups_of_a_resnet_include_the_residual_stream(resnet):
    net, x, groups = resnet
    names = [g.name for g in groups]
    assert "conv1" in names and "layer1.0.conv1" in names and "fc" not in names  # never the output layer
    stream = next(g for g in groups if g.name == "conv1")
    parts = prune.group_layers(net, stream)
    assert set(parts["writes"]) == {"conv1", "layer1.0.conv2"}  # the stem and the block's second conv
    assert set(prune.mask_points(net, stream)) == {"bn1", "layer1.0.bn2"}  # after BN, where zero = removal
    assert "layer1.0.conv1" in parts["reads"] and "layer2.0.shortcut.conv" in parts["reads"]


@pytest.mark.parametrize("which,allocation,block", [("resnet", "uniform", None), ("resnet", "global", 4),
                                                     ("lenet", "uniform", 4), ("lenet", "global", None)])
def test_masks_equal_removal_and_the_mac_model_is_exact(which, allocation, block, request):
    net, x, groups = request.getfixturevalue(which)
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.size) for g in groups}
    plan = prune.plan_macs(net, groups, scores, x[:1], 0.4, allocation, block)
    assert plan.macs_kept <= 0.4 + 1e-9 and plan.fraction > 0
    gone = prune.remove_groups(net, plan.remove, x[:1])
    masked = prune.mask_groups(net, groups, plan.remove)
    with torch.no_grad():
        torch.testing.assert_close(gone(x), masked(x), atol=1e-4, rtol=1e-4)
    assert _conv_linear_macs(gone, x) == pytest.approx(plan.macs, rel=1e-12)
    assert _conv_linear_macs(net, x) == pytest.approx(plan.base_macs, rel=1e-12)
    for g in groups:  # the kept widths are what the plan says, rounded to the block where a group is wide
        kept = g.size - len(plan.remove[g.name])
        assert kept == plan.keep[g.name] >= 1
        if block is not None and g.size >= block:
            assert kept % block == 0
    assert prune.macs_and_params(gone, x[:1])[0] < prune.macs_and_params(net, x[:1])[0]


def test_uniform_allocation_takes_the_same_share_everywhere(resnet):
    net, x, groups = resnet
    scores = {g.name: np.arange(g.size, dtype=float) for g in groups}
    plan = prune.plan_macs(net, groups, scores, x[:1], 0.3, "uniform")
    shares = {g.name: len(plan.remove[g.name]) / g.size for g in groups}
    assert max(shares.values()) - min(shares.values()) <= 1 / min(g.size for g in groups) + 1e-9
    for g in groups:  # the lowest scores go
        assert plan.remove[g.name] == list(range(len(plan.remove[g.name])))


def test_global_allocation_removes_the_lowest_normalised_scores_first(lenet):
    net, x, groups = lenet
    scores = {g.name: np.ones(g.size) for g in groups}
    scores["convnet.c5"] = np.linspace(0.01, 1.0, 120)  # c5's low half scores far below the others' mean
    plan = prune.plan_macs(net, groups, scores, x[:1], 0.95, "global")
    assert set(k for k, v in plan.remove.items() if v) == {"convnet.c5"}
    assert plan.remove["convnet.c5"] == list(range(len(plan.remove["convnet.c5"])))


def test_plan_fraction_and_rounding():
    sizes = {"a": 32, "b": 6}
    fake = [type("G", (), {"name": n, "size": s})() for n, s in sizes.items()]  # plans need names and sizes
    scores = {"a": np.arange(32.0)[::-1], "b": np.arange(6.0)}
    plan = prune.plan_fraction(fake, scores, 0.5)
    assert plan.remove == {"a": list(range(16, 32)), "b": [0, 1, 2]} and plan.fraction == pytest.approx(19 / 38)
    plan = prune.plan_fraction(fake, scores, {"a": 0.3}, block=16)
    assert plan.keep == {"a": 16, "b": 6}  # 22 kept rounds to 16; b is untouched
    assert [prune.round_width(k, 64, 16) for k in (1, 8, 23, 24, 40, 64)] == [16, 16, 16, 32, 48, 64]
    assert prune.round_width(3, 6, 16) == 3 and prune.round_width(0, 6, None) == 1


def test_bad_arguments(lenet):
    net, x, groups = lenet
    scores = {g.name: np.ones(g.size) for g in groups}
    with pytest.raises(ParameterError, match="allocation='greedy' is not allowed"):
        prune.plan_macs(net, groups, scores, x[:1], 0.5, "greedy")
    for bad in (float("nan"), 0.0, 1.5, True):
        with pytest.raises(ParameterError, match="macs_kept="):
            prune.plan_macs(net, groups, scores, x[:1], bad)
    with pytest.raises(ParameterError, match="block=0 is not allowed"):
        prune.plan_macs(net, groups, scores, x[:1], 0.5, block=0)
    with pytest.raises(ParameterError, match="out of reach"):
        prune.plan_macs(net, groups, scores, x[:1], 0.001)
    with pytest.raises(ParameterError, match="scores lack the group"):
        prune.plan_fraction(groups, {}, 0.5)
    with pytest.raises(ParameterError, match=r"scores\['convnet.c1'\] must be 6 finite numbers"):
        prune.plan_fraction(groups, {**scores, "convnet.c1": np.full(6, np.nan)}, 0.5)
    with pytest.raises(ParameterError, match="fraction=1.0 is not allowed"):
        prune.plan_fraction(groups, scores, 1.0)
    with pytest.raises(ParameterError, match="unknown group"):
        prune.mask_groups(net, groups, {"convnet.c9": [0]})


def test_folding_batchnorm_keeps_the_function(resnet):
    net, x, _ = resnet
    folded = latency.fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    ready = latency.prepare(net)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ready(x.contiguous(memory_format=torch.channels_last)), net(x),
                                   atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the original is untouched


def test_cost_table_counts_like_torch_pruning_and_pairs_the_rounds(lenet):
    net, x, groups = lenet
    scores = {g.name: np.arange(g.size, dtype=float) for g in groups}
    small = prune.remove_groups(net, prune.plan_fraction(groups, scores, 0.5).remove, x[:1])
    costs = latency.cost_table({"unpruned": net, "half": small}, (1, 32, 32), batch_sizes=(1, 4), repeats=3,
                               warmup=1)
    t = costs.table
    assert t.loc["half", "MACs"] == prune.macs_and_params(small, x[:1])[0]
    assert t.loc["half", "params"] == prune.macs_and_params(small, x[:1])[1] < t.loc["unpruned", "params"]
    assert t.loc["unpruned", "MAC reduction"] == 0 and 0.5 < t.loc["half", "MAC reduction"] < 1
    assert (t[["latency b1 (ms)", "latency b4 (ms)"]] > 0).all().all()
    assert len(costs.timings[4].seconds["half"]) == 3
    r = costs.timings[4].reduction("half", "unpruned")
    assert r.shape == (3,) and np.median(r) == pytest.approx(t.loc["half", "latency reduction b4"])
    est = costs.ratio("half", 4)
    assert est.n == 3 and est.lo <= est.mean <= est.hi
    with pytest.raises(ParameterError, match="no fewer MACs"):
        costs.ratio("unpruned", 4)


def test_timing_reduction_is_paired_by_round():
    timing = latency.Timing({"a": (1.0, 2.0, 4.0), "b": (0.5, 1.0, 2.0)})
    assert timing.reduction("b", "a").tolist() == [0.5, 0.5, 0.5]  # the load changed, the ratio did not
    est = timing.reduction_estimate("b", "a", scale=0.5)
    assert est.mean == est.lo == est.hi == 1.0
    assert timing.median_ms("a") == 2000.0


def test_bad_timing_arguments():
    net = nn.Linear(2, 2)
    for kw, msg in (({"repeats": 0}, "repeats=0"), ({"threads": 0}, "threads=0"), ({"warmup": -1}, "warmup=-1"),
                    ({"repeats": True}, "repeats=True")):
        with pytest.raises(ParameterError, match=msg):
            latency.time_forward({"n": net}, torch.zeros(1, 2), **kw)
    with pytest.raises(ParameterError, match="batch_sizes"):
        latency.cost_table({"n": net}, (2,), batch_sizes=(0,))


def test_block_scan_gives_one_row_per_width():
    df = latency.block_scan(4, [2, 4, 8], side=6, batch=2, repeats=2, warmup=1)
    assert df.index.tolist() == [2, 4, 8] and (df["ms"] > 0).all()
