"""Chapter 6's protocol: intervals over seeds and test images, the protocol on small networks, prune +
merge against prune, the latency table against torch-pruning's count, and claims that can go either way."""
import copy
import functools

import numpy as np
import pandas as pd
import pytest
import torch

from pruning_utils import claims, compare, criteria, models, prune, runtime
from pruning_utils import data as data_mod
from pruning_utils.params import ParameterError


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with runtime.threads(1):
        yield


def _split(n, shape, seed, classes=10):
    g = torch.Generator().manual_seed(seed)
    return data_mod.Split(torch.rand(n, *shape, generator=g), torch.arange(n) % classes,
                          tuple(map(str, range(classes))), f"random-{seed}")


@functools.lru_cache(maxsize=None)  # a setting is never changed by the protocol: build each once
def _setting(kind="lenet", scope="network", targets=(2.0,), allocations=("uniform", "global")):
    torch.manual_seed(0)
    if kind == "lenet":
        model, shape = models.LeNet5().eval(), (1, 32, 32)
        roots = ["convnet.c1", "convnet.c3", "convnet.c5"]
    else:
        model, shape = models.CifarResNet(8, in_channels=1).eval(), (1, 16, 16)
        roots = None
    tr, te = _split(200, shape, 1), _split(120, shape, 2)
    groups = criteria.coupled_groups(model, te.x[:1], roots=roots)
    if scope == "layer":
        groups, allocations = groups[1:2], ("fraction",)
    ft = compare._finetune_config(0.01, 16, 1, False)
    return compare.Setting(f"{kind} {scope}", kind, scope, model, groups, tr, te, tuple(targets), tuple(allocations),
                           ft, te.x[:1], compare._chains(model, te.x[:1], groups))


# --- ranks --------------------------------------------------------------------------------------

def test_mean_ranks_by_hand():
    ranks = compare.mean_ranks({"a": [0.9, 0.8], "b": [0.7, 0.8], "c": [0.5, 0.6]})
    assert ranks == {"a": 1.25, "b": 1.75, "c": 3.0}


# --- the protocol --------------------------------------------------------------------------------------

def test_scoring_images_depend_on_the_seed_only():
    s = _setting()
    a, b, c = (compare.scoring_data(s, 50, seed) for seed in (3, 3, 4))
    assert torch.equal(a.x, b.x) and not torch.equal(a.x, c.x) and len(a.x) == 50


def test_finetune_budgets_are_the_first_steps_of_one_run():
    s = _setting()
    chunks = compare.finetune_chunks(s, [0, 2, 5], seed=0)
    assert [b for b, _ in chunks] == [2, 5]
    assert [len(p) for _, p in chunks] == [2 * 16, 3 * 16]
    assert compare.finetune_chunks(s, [0], seed=0) == []


def test_the_protocol_runs_every_cell_and_names_what_it_skips():
    s = _setting()
    runs = compare.run([s], ["l1", "bn_scale", "random"], [0, 1], [0, 2], 40, threshold=0.45, progress=False)
    assert runs.skipped == {(s.key, "bn_scale"): runs.skipped[(s.key, "bn_scale")]}
    assert "BatchNorm" in runs.skipped[(s.key, "bn_scale")] or "bn_scale" in runs.skipped[(s.key, "bn_scale")]
    r = runs.rows
    # 2 seeds x 2 criteria x 1 target x 2 allocations x 2 budgets, pruned; merged where a neuron merged
    assert len(r[r.method == "prune"]) == 2 * 2 * 2 * 2
    assert set(r.criterion) == {"l1", "random"} and set(r.budget) == {0, 2}
    assert (r.macs_kept <= 0.5 + 1e-9).all() and all(len(c) == len(s.test) for c in r.correct)
    assert len(runs.seconds) == 2 * 2
    with pytest.raises(ParameterError, match="random, the null, is always compared"):
        compare.run([s], ["l1"], [0], [0], 40, progress=False)


def test_pruned_networks_are_physically_smaller_and_compute_the_masked_function():
    s = _setting("resnet")
    scores = criteria.score_groups("l1", s.model, s.groups)
    plan = compare.make_plan(s, scores, 2.0, "global")
    net, n = compare.pruned(s, plan.remove, "prune")
    masked = prune.mask_groups(s.model, s.groups, plan.remove)
    assert n == 0 and models.count_parameters(net) < models.count_parameters(s.model)
    with torch.no_grad():
        torch.testing.assert_close(net(s.test.x), masked(s.test.x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lenet", "resnet"])
def test_prune_plus_merge_equals_prune_when_nothing_is_merged(kind):
    """A threshold above any cosine similarity drops every removed neuron: merging then folds nothing,
    and the network is the pruned one (LeNet5: Algorithm 2; ResNet-8's inner convs: Algorithm 3)."""
    s = _setting(kind)
    assert s.chains, "the setting has merge-able groups"
    scores = criteria.score_groups("random", s.model, s.groups, seed=1)
    plan = compare.make_plan(s, scores, 2.0, "uniform")
    merged, n = compare.pruned(s, plan.remove, "merge", threshold=1.5, bn_threshold=1.5)
    only, _ = compare.pruned(s, plan.remove, "prune")
    assert n == 0
    with torch.no_grad():
        torch.testing.assert_close(merged(s.test.x), only(s.test.x), atol=1e-4, rtol=1e-4)
    merged_some, n_some = compare.pruned(s, plan.remove, "merge", threshold=None, bn_threshold=None)
    assert n_some == sum(len(v) for g, v in plan.remove.items() if g in s.chains)  # never drop: all fold
    with torch.no_grad():
        assert not torch.allclose(merged_some(s.test.x), only(s.test.x), atol=1e-4)


def test_merge_is_none_where_no_merge_able_group_loses_a_channel():
    s = _setting("resnet")
    stream = next(g for g in s.groups if g.name not in s.chains)
    assert compare.pruned(s, {stream.name: [0, 1]}, "merge") == (None, 0)
    with pytest.raises(ParameterError, match="method='graft' is not allowed"):
        compare.pruned(s, {}, "graft")


def test_latency_table_macs_equal_torch_pruning_count():
    s = _setting("resnet", targets=(2.0, 4.0))
    runs = compare.run([s], ["l1", "random"], [0], [0], 40, merge=(), progress=False)
    lat = compare.latency_table(runs, s.key, repeats=1, batches=(1, 4))
    assert len(lat) == 2 * 2 * 2
    for (target, alloc, c), row in lat.iterrows():
        plan = compare.make_plan(s, runs.scores[(s.key, 0, c)], target, alloc)
        macs, params = prune.macs_and_params(prune.remove_groups(s.model, plan.remove, s.example), s.example)
        assert row["MACs"] == macs and row["params"] == params
        assert row["MAC speed-up"] == pytest.approx(lat.attrs["unpruned MACs"] / macs)
        assert row["MAC speed-up"] >= target * 0.9  # torch-pruning also counts BatchNorm and ReLU
    assert {"latency b1 (ms)", "latency b4 (ms)"} <= set(lat.columns)


# --- tables and claims on hand-made runs ----------------------------------------------------------------

def _fake_runs(acc: dict, n=400, seeds=(0, 1, 2), merge_gain=None):
    """Runs whose correctness is drawn at the given accuracy per (criterion, budget); with ``merge_gain``
    ({budget: gain}), merge rows exist too, ``gain`` more accurate than pruning."""
    rng = np.random.default_rng(0)
    s = _setting()
    rows = []
    u = {seed: rng.random(n) for seed in seeds}  # shared per seed and image: paired differences are tight
    for (c, b), p in acc.items():
        for seed in seeds:
            base = u[seed] < p
            rows.append({"setting": s.key, "target": 2.0, "allocation": "uniform", "criterion": c, "method": "prune",
                         "budget": b, "seed": seed, "accuracy": base.mean(), "macs_kept": 0.5, "fraction": 0.3,
                         "merged": 0, "correct": base})
            if merge_gain is not None:
                m = u[seed] < p + merge_gain[b]
                rows.append({**rows[-1], "method": "merge", "merged": 3, "accuracy": m.mean(), "correct": m})
    s = copy.copy(s)
    s.allocations = ("uniform",)
    return compare.Runs(pd.DataFrame(rows), pd.DataFrame(), {}, {}, {s.key: np.ones(n, bool)}, {s.key: s})


def _verdicts(runs):
    return {r.claim.key: r.verdict for r in compare.decide_claims(runs)}


def test_claims_can_hold():
    acc = {("l1", 0): 0.7, ("taylor", 0): 0.65, ("random", 0): 0.3,
           ("l1", 10): 0.8, ("taylor", 10): 0.79, ("random", 10): 0.77}
    v = _verdicts(_fake_runs(acc, merge_gain={0: 0.1, 10: 0.0}))
    assert v["cmp-finetune-shrinks"] is claims.Verdict.HOLDS
    assert v["cmp-magnitude-strong"] is claims.Verdict.HOLDS
    assert v["cmp-beats-random"] is claims.Verdict.HOLDS
    assert v["cmp-merge-helps"] is claims.Verdict.HOLDS
    assert v["cmp-merge-most-without-ft"] is claims.Verdict.HOLDS


def test_claims_can_fail_and_a_criterion_below_random_is_named():
    acc = {("l1", 0): 0.5, ("taylor", 0): 0.7, ("random", 0): 0.55,
           ("l1", 10): 0.2, ("taylor", 10): 0.8, ("random", 10): 0.5}
    runs = _fake_runs(acc, merge_gain={0: -0.1, 10: 0.0})
    results = {r.claim.key: r for r in compare.decide_claims(runs)}
    assert results["cmp-finetune-shrinks"].verdict is claims.Verdict.DOES_NOT_HOLD
    assert results["cmp-magnitude-strong"].verdict is claims.Verdict.DOES_NOT_HOLD
    assert results["cmp-beats-random"].verdict is claims.Verdict.DOES_NOT_HOLD
    parts = results["cmp-beats-random"].part_verdicts
    assert parts["l1 @ lenet network"] is claims.Verdict.DOES_NOT_HOLD
    assert parts["taylor @ lenet network"] is claims.Verdict.HOLDS
    assert results["cmp-merge-helps"].verdict is claims.Verdict.DOES_NOT_HOLD
    assert results["cmp-merge-most-without-ft"].verdict is claims.Verdict.DOES_NOT_HOLD
    table = compare.ranking(runs, "lenet network", 2.0, "uniform", 0)
    assert table.loc["l1", "below random"] and table.loc["l1", "below best"]
    assert table.index[0] == "taylor" and not table.loc["taylor", "below best"]
    text = compare.ranking_table(runs, "lenet network", "uniform")
    assert text.loc["l1"].iloc[0].endswith(" * †") and text.columns[0] == ("2x fewer MACs", "no fine-tuning")


def test_without_a_budget_the_finetuning_claims_cannot_be_tested():
    acc = {("l1", 0): 0.7, ("taylor", 0): 0.65, ("random", 0): 0.3}
    v = _verdicts(_fake_runs(acc))
    assert v["cmp-finetune-shrinks"] is claims.Verdict.UNTESTABLE
    assert v["cmp-merge-helps"] is claims.Verdict.UNTESTABLE  # no merge rows


def test_a_setting_can_leave_costly_criteria_out():
    s = copy.copy(_setting())
    s.criteria = ("l1", "random")
    runs = compare.run([s], ["l1", "taylor", "random"], [0], [0], 40, merge=(), progress=False)
    assert set(runs.rows.criterion) == {"l1", "random"}
    assert "left out" in runs.skipped[(s.key, "taylor")]
    assert compare.applicability(runs).loc["taylor", s.key].startswith("left out")
    short, notes = compare.applicability_display(runs)
    assert short.loc["taylor", s.key] == "no (1)" and short.loc["l1", s.key] == "ran"
    assert notes.data.loc[1, "why not"] == runs.skipped[(s.key, "taylor")]  # the reason whole, once


def test_rank_correlation_is_spearman_and_leaves_a_constant_row_out():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(1)
    m = np.vstack([rng.integers(0, 4, 12), rng.random(12), np.ones(12), rng.random(12)])
    rho = compare.rank_correlation(m)
    assert rho[0, 1] == pytest.approx(spearmanr(m[0], m[1]).statistic)  # ties in row 0
    assert rho[1, 3] == pytest.approx(spearmanr(m[1], m[3]).statistic)
    assert np.isnan(rho[2]).all() and np.isnan(rho[:, 2]).all()
    assert np.allclose(np.diag(rho)[[0, 1, 3]], 1.0)


def test_recalibration_re_estimates_batchnorm_statistics_and_nothing_else():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    net[1].running_mean.fill_(5.0)
    net[1].running_var.fill_(9.0)
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    x = torch.randn(50, 1, 8, 8)
    with torch.no_grad():
        pre = net[0](x)
    compare.recalibrate(net, x, batch_size=50)  # one batch: the statistics of exactly these inputs
    torch.testing.assert_close(net[1].running_mean, pre.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, pre.var((0, 2, 3), unbiased=True))
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    assert net[1].momentum == 0.1 and not net.training
    lenet = models.LeNet5().eval()
    assert compare.recalibrate(lenet, torch.rand(4, 1, 32, 32)) is lenet  # no BatchNorm: nothing to do
