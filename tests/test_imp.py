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


def test_filter_pruning_zeroes_whole_filters_and_bad_values_are_errors():
    net = small_net()
    imp.prune_round(net, 0.25, structure="filters")
    zero_filters = (net[0].weight.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_filters == 2 and (net[3].weight != 0).all()
    with pytest.raises(ParameterError, match="structure='channels' is not allowed"):
        imp.prune_round(net, 0.2, structure="channels")
    with pytest.raises(ParameterError, match="rate=1.0 is not allowed"):
        imp.prune_round(net, 1.0)


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
    path = next(tmp_path.glob("imp-*.pt"))
    path.write_bytes(path.read_bytes()[:50])  # a truncated write
    with pytest.warns(UserWarning, match="unusable"):
        redone, cached = imp.run_cached(small_net, split, split, cfg, {"toy": 1}, seed=0, device="cpu",
                                        progress=False, directory=tmp_path)
    assert not cached and torch.equal(redone[2]["state"]["0.weight"], levels[2]["state"]["0.weight"])


def test_run_many_in_two_processes_matches_runs_here_and_then_loads_from_the_cache(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(48, 3, 8, 8)
    split = data.Split(x, (x[:, 0].mean((1, 2)) > 0.5).long(), ("a", "b"), "toy")
    build = functools.partial(models.CifarResNet, 8, num_classes=2, width=4)
    base = imp.IMPConfig(rounds=2, train=train.TrainConfig(epochs=1, batch_size=16, lr=0.05), rewind_epochs=1)
    jobs = [imp.Job(build, base, {"toy": 2}, seed=0), imp.Job(build, replace(base, structure="filters"), {"toy": 2}, seed=1)]
    parallel = imp.run_many(jobs, split, split, device="cpu", workers=2, progress=False, directory=tmp_path / "a")
    assert len(list((tmp_path / "a").glob("imp-*.pt"))) == 2
    for job, levels in zip(jobs, parallel):
        here, _ = imp.run_cached(job.build, split, split, job.cfg, job.key_extra, seed=job.seed, device="cpu",
                                 progress=False, directory=tmp_path / "b")
        assert [lv["weights_remaining"] for lv in levels] == [lv["weights_remaining"] for lv in here]
        for a, b in zip(levels, here):
            for name in b["state"]:
                torch.testing.assert_close(a["state"][name], b["state"][name], atol=1e-4, rtol=1e-4)
    assert parallel[0][2]["weights_remaining"] != parallel[1][2]["weights_remaining"]  # the jobs differ
    monkeypatch.setattr(imp, "_run_job", lambda *args: pytest.fail("a cached run was run again"))
    again = imp.run_many(jobs, split, split, device="cpu", workers=2, progress=False, directory=tmp_path / "a")
    assert all(torch.equal(a[2]["state"]["fc.weight"], b[2]["state"]["fc.weight"]) for a, b in zip(again, parallel))
    with pytest.raises(ParameterError, match="workers=0 is not allowed"):
        imp.run_many(jobs, split, split, workers=0)
