import functools
from dataclasses import replace

import pytest
import torch
from torch import nn

from pruning_utils import data, imp, models, train
from pruning_utils.params import ParameterError


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("rounds", [1, 3, 7])
def test_sparsity_after_r_rounds_is_one_minus_point_eight_to_the_r(rounds):
    net = models.CifarResNet(8, num_classes=6, width=8)
    total = sum(m.weight.numel() for m, _ in imp.prunable(net))
    for _ in range(rounds):
        imp.prune_round(net, 0.2)
    sparsity = 1 - imp.weights_remaining(net)
    assert sparsity == pytest.approx(1 - 0.8 ** rounds, abs=rounds / total)  # one weight of rounding per round


def test_global_pruning_removes_the_smallest_magnitudes():
    net = small_net()
    imp.prune_round(net, 0.2)
    kept = torch.cat([(m.weight != 0).flatten() for m, _ in imp.prunable(net)])
    mags = torch.cat([m.weight_orig.abs().flatten() for m, _ in imp.prunable(net)])
    assert mags[~kept].max() <= mags[kept].min()
    assert imp.rounds_to_reach(0.1) == 11 and 0.8 ** 11 <= 0.1 < 0.8 ** 10


def test_rewind_keeps_the_mask_and_restores_survivors():
    net = small_net()
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # "training"
    imp.prune_round(net, 0.5)
    mask = net[0].weight_mask.clone()
    imp.rewind(net, snapshot)
    torch.testing.assert_close(net[0].weight, snapshot["0.weight"] * mask)
    torch.testing.assert_close(net[3].bias, snapshot["3.bias"])
    assert torch.equal(net[0].weight_mask, mask)
    plain = small_net()
    plain.load_state_dict(imp.effective_state(net))
    torch.testing.assert_close(plain[0].weight, net[0].weight)


def random_bn_resnet(depth=8, width=8):
    """A CIFAR ResNet whose BatchNorms hold random statistics and affine parameters, in eval mode: a
    pruned unit is then constant only if nothing reaches it, not because a BatchNorm happens to be 0."""
    net = models.CifarResNet(depth, num_classes=4, width=width)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_(1.0)
    return net.eval()


def block_outputs(net, x):
    names = [n for n, _ in net.named_modules() if n.endswith(("relu1", "relu2"))]
    from pruning_utils import activations

    with activations.hooked(net, names) as store:
        net(x)
        return {n: store[n].clone() for n in names}


@pytest.mark.parametrize("depth", [8, 14])
def test_a_structurally_pruned_unit_is_constant_on_any_input_shortcut_included(depth):
    net = random_bn_resnet(depth)
    groups = imp.filter_groups(net)
    for _ in range(3):
        imp.prune_filters(net, 0.36, groups)
    maps = block_outputs(net, 3 * torch.randn(8, 3, 32, 32))
    for name, a in maps.items():
        conv = name.replace("relu1", "conv1").replace("relu2", "conv2")
        group = next(g for g in groups if any(p == conv for p, _ in g.producers))
        dead = ~imp.alive_channels(net, group)
        assert dead.sum() >= 0.4 * group.size  # each round removes 20% of the filters: 0.8 ** 3 left
        spread = (a - a[:1, :, :1, :1]).abs().amax((0, 2, 3))
        assert (spread[dead] == 0).all(), f"{name}: a pruned unit still varies"
    # the stream of stage 3 reaches the final layer: its pruned channels are cut from the fc's inputs too
    stream = next(g for g in groups if any(p == "layer3.0.conv2" for p, _ in g.producers))
    assert (net.fc.weight[:, ~imp.alive_channels(net, stream)] == 0).all()


def test_zeroing_a_blocks_second_conv_alone_leaves_its_unit_alive_through_the_shortcut():
    net = random_bn_resnet(8)
    with torch.no_grad():
        net.layer3[0].conv2.weight[5] = 0.0  # what per-layer filter pruning did before
    a = block_outputs(net, 3 * torch.randn(8, 3, 32, 32))["layer3.0.relu2"][:, 5]
    assert (a - a[:1, :1, :1]).abs().max() > 0


def test_filter_rounds_remove_about_rate_of_the_weights_and_bad_values_are_errors():
    net = models.CifarResNet(8, num_classes=6, width=8)
    for rounds in range(1, 4):
        imp.prune_round(net, 0.36, structure="filters")
        assert imp.weights_remaining(net) == pytest.approx(0.64 ** rounds, rel=0.15)
    assert imp.filter_share(0.36) == pytest.approx(0.2)
    with pytest.raises(ParameterError, match="structure='channels' is not allowed"):
        imp.prune_round(net, 0.2, structure="channels")
    with pytest.raises(ParameterError, match="rate=1.0 is not allowed"):
        imp.prune_round(net, 1.0)
    with pytest.raises(ParameterError, match="rate=True is not allowed"):
        imp.IMPConfig(rounds=1, train=train.TrainConfig(), rate=True)
    with pytest.raises(ParameterError, match="has no Conv2d"):
        imp.filter_groups(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))


def test_run_trains_pruned_levels_and_caches(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    split = data.Split(x, (x[:, 0].mean((1, 2)) > 0.5).long() + 2 * (x[:, 1].mean((1, 2)) > 0.5).long(),
                       ("a", "b", "c", "d"), "toy")
    cfg = imp.IMPConfig(rounds=2, train=train.TrainConfig(epochs=1, batch_size=32, lr=0.05), rewind_epochs=1)
    levels, cached = imp.run_cached(small_net, split, split, cfg, {"toy": 1}, seed=0, device="cpu",
                                    progress=False, directory=tmp_path)
    assert not cached and [lv["level"] for lv in levels] == [0, 1, 2]
    assert [round(lv["weights_remaining"], 2) for lv in levels] == [1.0, 0.8, 0.64]
    again, cached = imp.run_cached(small_net, split, split, cfg, {"toy": 1}, seed=0, device="cpu",
                                   progress=False, directory=tmp_path)
    assert cached and torch.equal(again[2]["state"]["0.weight"], levels[2]["state"]["0.weight"])
    path = next(p for p in tmp_path.glob("imp-*.pt") if not p.name.startswith("imp-dense-"))
    path.write_bytes(path.read_bytes()[:50])  # a truncated write
    with pytest.warns(UserWarning, match="unusable"):
        redone, cached = imp.run_cached(small_net, split, split, cfg, {"toy": 1}, seed=0, device="cpu",
                                        progress=False, directory=tmp_path)
    assert not cached and torch.equal(redone[2]["state"]["0.weight"], levels[2]["state"]["0.weight"])


@pytest.mark.parametrize("structure", ["weights", "filters"])
def test_three_rounds_of_a_resnet_trained_in_channels_last(structure):
    """Chapter 2's set-up at toy size: every round after the first prunes weights that were trained in
    channels_last and then evaluated, so a stale layout anywhere (training, inference) fails here."""
    torch.manual_seed(0)
    x = torch.rand(48, 3, 16, 16)
    split = data.Split(x, (x[:, 0].mean((1, 2)) > 0.5).long(), ("a", "b"), "toy")
    build = functools.partial(models.CifarResNet, 8, num_classes=2, width=8)
    cfg = imp.IMPConfig(rounds=3, structure=structure, rewind_epochs=1,
                        train=train.TrainConfig(epochs=1, batch_size=16, lr=0.05, channels_last=True))
    levels = imp.run(build, split, split, cfg, seed=0, device="cpu", progress=False)
    remaining = [lv["weights_remaining"] for lv in levels]
    assert len(levels) == 4 and all(a > b for a, b in zip(remaining, remaining[1:]))


def test_run_many_in_two_processes_equals_runs_here_and_then_loads_from_the_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(48, 3, 8, 8)
    split = data.Split(x, (x[:, 0].mean((1, 2)) > 0.5).long(), ("a", "b"), "toy")
    build = functools.partial(models.CifarResNet, 8, num_classes=2, width=4)
    base = imp.IMPConfig(rounds=2, train=train.TrainConfig(epochs=1, batch_size=16, lr=0.05), rewind_epochs=1)
    jobs = [imp.Job(build, base, {"toy": 2}, seed=0), imp.Job(build, replace(base, structure="filters"), {"toy": 2}, seed=0),
            imp.Job(build, base, {"toy": 2}, seed=1)]
    parallel = imp.run_many(jobs, split, split, device="cpu", workers=2, progress=False, directory=tmp_path / "a")
    assert len(list((tmp_path / "a").glob("imp-dense-*.pt"))) == 2  # one dense network per seed, shared
    assert len(list((tmp_path / "a").glob("imp-*.pt"))) == 5
    for job, levels in zip(jobs, parallel):  # workers change the time taken, never a number
        here, _ = imp.run_cached(job.build, split, split, job.cfg, job.key_extra, seed=job.seed, device="cpu",
                                 progress=False, directory=tmp_path / "b")
        assert [lv["weights_remaining"] for lv in levels] == [lv["weights_remaining"] for lv in here]
        assert [lv["test_acc"] for lv in levels] == [lv["test_acc"] for lv in here]
        for a, b in zip(levels, here):
            assert all(torch.equal(a["state"][name], b["state"][name]) for name in b["state"])
    assert all(torch.equal(parallel[0][0]["state"][k], parallel[1][0]["state"][k]) for k in parallel[0][0]["state"])
    assert parallel[0][2]["weights_remaining"] != parallel[1][2]["weights_remaining"]  # the variants differ
    dense = imp.dense_many(jobs, split, split, workers=2, progress=False, directory=tmp_path / "a")
    assert dense[0] is dense[1] and torch.equal(dense[0]["state"]["fc.weight"], parallel[0][0]["state"]["fc.weight"])
    torch.manual_seed(0)
    assert torch.equal(dense[0]["init"]["conv1.weight"], build().conv1.weight)  # W_0: the seed's fresh network
    monkeypatch.setattr(imp, "_run_job", lambda *args: pytest.fail("a cached run was run again"))
    monkeypatch.setattr(imp, "_dense_job", lambda *args: pytest.fail("a cached dense network was trained again"))
    again = imp.run_many(jobs, split, split, device="cpu", workers=2, progress=False, directory=tmp_path / "a")
    assert all(torch.equal(a[2]["state"]["fc.weight"], b[2]["state"]["fc.weight"]) for a, b in zip(again, parallel))
    with pytest.raises(ParameterError, match="workers=0 is not allowed"):
        imp.run_many(jobs, split, split, workers=0)
