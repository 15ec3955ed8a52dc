from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import linregress
from torch import nn

from pruning_utils import claims, criteria, presets
from pruning_utils import class_filters as cf
from pruning_utils.claims import Verdict
from pruning_utils.data import Split
from pruning_utils.models import CifarResNet
from pruning_utils.params import ParameterError

PLANTED = torch.tensor([[1, 4, 6], [0, 2, 7], [3, 5, 9]])  # S_y of three classes over d = 10 features


def planted(n_per_class=50, d=10, seed=0, low=1.0, noise=0.5):
    """Class y's instances are large (in [low, low + 1)) exactly on PLANTED[y] and small (noise in
    [0, noise)) elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(PLANTED)).repeat_interleave(n_per_class)
    x = noise * torch.rand(len(labels), d, generator=gen)
    x[torch.arange(len(labels))[:, None], PLANTED[labels]] = low + torch.rand(len(labels), 3, generator=gen)
    return x, labels


def as_sets(sets):
    return [sorted(row) for row in torch.as_tensor(sets).tolist()]


def test_algorithm1_recovers_planted_sets():
    x, y = planted()
    assert as_sets(cf.influential_sets(x, y, k1=3, k2=3)) == as_sets(PLANTED)
    # with a larger k1 the planted features are still in every instance's top k1, so still the most frequent
    assert as_sets(cf.influential_sets(x, y, k1=5, k2=3)) == as_sets(PLANTED)


def test_histogram_and_ranks_by_hand():
    x = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.7, 0.2, 0.7, 0.1], [0.0, 0.3, 0.2, 0.8]])
    ranks = cf.instance_ranks(x)
    # the tie 0.7/0.7 goes to index 0; a zero feature is ranked d = 4, outside every top k1
    assert ranks.tolist() == [[2, 0, 1, 4], [0, 2, 1, 3], [4, 1, 2, 0]]
    hist = cf.class_histograms(ranks, torch.tensor([0, 0, 1]), k1=2, n_classes=2)
    assert hist.tolist() == [[1, 1, 2, 0], [0, 1, 0, 1]]
    # with k1 = d, HIST counts the features that are active (> 0), not every feature
    assert cf.class_histograms(ranks, torch.tensor([0, 0, 1]), k1=4, n_classes=2).tolist() == [[2, 2, 2, 1],
                                                                                                [0, 1, 1, 1]]
    assert cf.top_rows(hist, 2).tolist() == [[2, 0], [1, 3]]  # 1-1 tie at indices 0 and 1 goes to 0
    np.testing.assert_allclose(cf.histogram_share(hist, [[2, 0], [1, 3]]), [0.75, 1.0])


def test_decomposed_layer_with_all_features_equals_original():
    lin = nn.Linear(12, 5)
    x = torch.rand(40, 12)
    full = cf.DecomposedLinear(lin, torch.arange(12).repeat(5, 1))
    torch.testing.assert_close(full(x), lin(x))
    torch.testing.assert_close(full.to_linear().weight, lin.weight)
    assert full.cost() == 12 * 5


def test_decomposed_layer_equals_hand_computation():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 1.0, -1.0, 2.0]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 2.0]])
    head = cf.DecomposedLinear(lin, [[0, 3], [2, 1]])  # S_0 = {0, 3}, S_1 = {1, 2}
    expected = torch.tensor([[1 * 1 + 4 * 4 + 0.1, 1 * 2 - 1 * 3 - 0.2],
                             [1 * 0 + 4 * 2 + 0.1, 1 * 1 - 1 * 0 - 0.2]])
    torch.testing.assert_close(head(x), expected)
    assert head.cost() == 4
    dense = head.to_linear()
    assert dense.weight.tolist() == [[1.0, 0.0, 0.0, 4.0], [0.0, 1.0, -1.0, 0.0]]
    torch.testing.assert_close(dense(x), expected)


def test_head_replaces_resnet_fc():
    net = CifarResNet(depth=8, width=2, in_channels=1).eval()
    x = torch.rand(6, 1, 12, 12)
    sets = cf.weight_sets(net.fc.weight, 3)
    swapped = cf.with_head(net, cf.DecomposedLinear(net.fc, sets))
    assert isinstance(net.fc, nn.Linear)  # the original is untouched
    feats = cf.extract_features(net, x, batch_size=4)
    assert feats.shape == (6, 8) and feats.min() >= 0
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), cf.DecomposedLinear(net.fc, sets)(feats))
        torch.testing.assert_close(cf.with_head(net, cf.DecomposedLinear(net.fc, torch.arange(8).repeat(10, 1)))(x),
                                   net(x))


def test_mass_coverage_and_k1_by_hand():
    x = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 10.0, 0.0]])
    np.testing.assert_allclose(cf.mass_coverage(x).numpy(), [0.7, 0.85, 0.95, 1.0], rtol=1e-6)
    assert cf.k1_for_mass(x, 0.9) == 3
    assert cf.k1_for_mass(x, 0.5) == 1
    with pytest.raises(ParameterError, match=r"mass=1.5 is not allowed"):
        cf.k1_for_mass(x, 1.5)


def test_baseline_sets():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.0], [1.0, 0.2, -0.3, -5.0]])
    assert cf.weight_sets(w, 2).tolist() == [[1, 2], [3, 0]]
    r = cf.random_sets(7, 10, 4, seed=3)
    assert r.shape == (7, 4) and all(len(set(row)) == 4 for row in r.tolist())
    assert torch.equal(r, cf.random_sets(7, 10, 4, seed=3)) and not torch.equal(r, cf.random_sets(7, 10, 4, seed=4))


def test_jaccard_by_hand():
    jac = cf.jaccard_matrix([[0, 1, 2], [1, 2, 3], [4, 5, 6]])
    np.testing.assert_allclose(jac, [[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])


def planted_layer(off=-1.0):
    lin = nn.Linear(10, 3)
    with torch.no_grad():  # a layer that reads the planted features with weight 1 (the others: ``off``)
        use = torch.from_numpy(cf.feature_use(PLANTED, 10))
        lin.weight.copy_(use + off * (1 - use))
        lin.bias.zero_()
    return lin


def test_r_a_grid_on_planted_data():
    x, y = planted()
    xt, yt = planted(seed=1)
    lin = planted_layer()
    grid = cf.r_a_grid(lin, x, y, xt, yt, k1s=[1, 3, 10], k2s=[1, 3, 10])
    assert not np.isnan(grid).any()  # k2 > k1 is filled too
    assert grid[1, 1] == 1.0 and grid[2, 2] == 1.0  # k2 = k1 = 3 finds the planted sets; 10 keeps all
    assert grid[0, 1] == 1.0  # k1 = 1: each image's top feature is planted, so the 3 most frequent are too
    out = cf.relative_accuracy(lin, PLANTED, xt, yt)
    assert out["A_f"] == 1.0 and out["r_A"] == 1.0


def test_retrain_touches_only_the_decomposed_weights_and_lowers_the_loss():
    x, y = planted(n_per_class=100)
    lin = nn.Linear(10, 3)
    head = cf.DecomposedLinear(lin, PLANTED)
    threads = torch.get_num_threads()
    trained, hist = cf.retrain(head, x, y, epochs=3, lr=1e-2, batch_size=30, threads=1, test=(x, y))
    assert torch.get_num_threads() == threads  # runs on the threads asked for, then restores the setting
    assert hist["steps"] == 3 * 10 and len(hist["test_acc"]) == 4
    assert torch.equal(trained.index, head.index) and trained.weight.shape == (3, 3)
    loss = lambda h: nn.functional.cross_entropy(h(x), y).item()  # noqa: E731
    assert loss(trained) < loss(head)
    assert torch.equal(head.weight, lin.weight.gather(1, PLANTED))  # the input head is not changed in place
    with pytest.raises(ParameterError, match="epochs=-1 is not allowed"):
        cf.retrain(head, x, y, epochs=-1)


@pytest.mark.parametrize("k1,k2,message", [(0, 1, r"k1=0 is not allowed; expected an int in \[1, 10\]"),
                                            (3, 11, r"k2=11 is not allowed; expected an int in \[1, 10\]")])
def test_bad_k(k1, k2, message):
    x, y = planted()
    with pytest.raises(ParameterError, match=message):
        cf.influential_sets(x, y, k1, k2)


def test_bad_sets():
    lin = nn.Linear(4, 2)
    with pytest.raises(ParameterError, match="expected \\(n_classes=2, k\\)"):
        cf.DecomposedLinear(lin, [[0, 1]])
    with pytest.raises(ParameterError, match="outside"):
        cf.DecomposedLinear(lin, [[0, 4], [1, 2]])
    with pytest.raises(ParameterError, match="repeat"):
        cf.DecomposedLinear(lin, [[0, 0], [1, 2]])


def test_usage_scores_by_hand():
    x = torch.tensor([[3.0, 2.0, 0.0, 1.0], [3.0, 0.0, 2.0, 1.0], [0.0, 1.0, 0.0, 5.0], [1.0, 0.0, 0.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    # top 2 of each image: {0, 1}, {0, 2}, {3, 1}, {3, 0}
    np.testing.assert_allclose(cf.usage_scores(x, y, 2, 1, "instances"), [0.75, 0.5, 0.25, 0.5])
    # S_0 = {0} (count 2), S_1 = {3} (count 2); each used by one class, ties broken by half the share
    np.testing.assert_allclose(cf.usage_scores(x, y, 2, 1, "classes"), [1.375, 0.25, 0.125, 1.25])
    # k2 = 3: S_0 = {0, 1, 2}, S_1 = {3, 0, 1}; feature 2 has no count in class 1, feature 3 none in class 0
    np.testing.assert_allclose(cf.usage_scores(x, y, 2, 3, "classes"), [2.375, 2.25, 1.125, 1.25])
    with pytest.raises(ParameterError, match="mode='both' is not allowed"):
        cf.usage_scores(x, y, 2, 1, "both")


def test_class_usage_criterion_reads_the_final_block_like_algorithm_1():
    torch.manual_seed(0)
    net = CifarResNet(depth=8, width=4, in_channels=1).eval()
    x, y = torch.rand(40, 1, 12, 12), torch.arange(40) % 4
    target = criteria.Target("layer3.0.conv2", "layer3.0.relu2", "layer3.0.bn2")
    feats = cf.extract_features(net, x)  # the pooled output of the last block is the input of fc
    for mode in ("classes", "instances"):
        got = criteria.score("class_usage", net, target, criteria.Data(x, y), k1=3, k2=4, mode=mode)
        np.testing.assert_allclose(got, cf.usage_scores(feats, y, 3, 4, mode), rtol=1e-6)
    assert criteria.make("class_usage").name == "class_usage" and criteria.REGISTRY["class_usage"].needs_data


def test_resampler_known_cases():
    boot = cf.Resampler(n_seeds=2, n_images=2000, n_boot=400, seed=0)
    ones = np.ones((2, 2000))
    e = boot.estimate(cf.gap, {"a": ones, "b": ones})
    assert (e.mean, e.lo, e.hi) == (0.0, 0.0, 0.0)  # paired: the same draws for both, so no spread
    half = np.tile(np.arange(2000) % 2, (2, 1))
    e = boot.estimate(lambda m: m["a"], {"a": half})
    assert e.mean == 0.5 and 0.015 < (e.hi - e.lo) / 2 < 0.03  # binomial: 1.96 * sqrt(0.25 / 2000) = 0.022
    apart = np.stack([np.full(2000, 0.2), np.full(2000, 0.8)])  # two seeds that disagree: the seeds count
    e = boot.estimate(lambda m: m["a"], {"a": apart})
    assert e.mean == pytest.approx(0.5) and e.lo == pytest.approx(0.2) and e.hi == pytest.approx(0.8)
    with pytest.raises(ValueError, match="do not fit"):
        boot.means(np.ones((3, 2000)))


def test_ols_against_scipy():
    x = np.array([8, 14, 20, 32, 8, 14, 20, 32], float)
    y = np.array([0.90, 0.91, 0.93, 0.94, 0.89, 0.92, 0.92, 0.95])
    (slope,) = cf.ols(y, x)
    ref = linregress(x, y)
    assert slope.mean == pytest.approx(ref.slope)
    assert (slope.hi - slope.lo) / 2 == pytest.approx(2.4469 * ref.stderr, rel=1e-3)  # t(0.975, 6)
    (exact,) = cf.ols(2 * x + 1, x)
    assert exact.mean == pytest.approx(2.0) and exact.hi - exact.lo == pytest.approx(0.0, abs=1e-9)
    (few,) = cf.ols([0.9, 0.95], [8, 20])  # two points: a slope but no interval
    assert few.mean == pytest.approx(0.05 / 12) and not few.has_interval


def fake_setup(k_values, k2=1, n_per_class=100):
    """A Setup without a network: a layer that reads only the planted features (so S_y = PLANTED is
    exact) on data where one planted feature is often not enough (it can be below the noise); two seeds
    draw different training images."""
    lin = planted_layer(off=0.0)
    hard = {"low": 0.4, "noise": 0.9}
    xt, yt = planted(n_per_class, seed=9, **hard)
    draws = [cf.Draw(s, Split(torch.zeros(len(l), 1), l, ("a", "b", "c"), "planted"), f)
             for s, (f, l) in enumerate(planted(n_per_class, seed=s, **hard) for s in (1, 2))]
    P = SimpleNamespace(k1_values=k_values, k2_values=k_values, k1=k2, k2=k2)
    base = SimpleNamespace(model=SimpleNamespace(fc=lin))
    return cf.Setup(P, base, Split(torch.zeros(len(yt), 1), yt, ("a", "b", "c"), "planted"), xt, draws,
                    cf.Resampler(2, len(yt), 300))


def test_claim_2a_can_fail_now_that_k2_may_exceed_k1():
    g = cf.grid(fake_setup([1, 2, 3, 4]))
    one, three = g.neighbours["k1 = 1 (vs k2 = 2)"], g.neighbours["k1 = 3 (vs k2 = 2, 4)"]
    assert one.mean < 0 and one.hi < 0  # with k1 = 1 two features per class beat one: k2 = k1 is not best
    assert three.mean == 0.0  # k2 = 3 finds every planted feature; a fourth adds nothing
    assert claims.decide("cf-2a", g.neighbours).verdict is Verdict.DOES_NOT_HOLD
    assert g.k3.mean == 1.0 and g.large_k1 is not None and g.large_k1_value == 4


def test_k_parameters_are_checked_against_the_width_by_the_name_written():
    with pytest.raises(ParameterError, match=r"k1_values=\[1, 500\]: element \[1\] = 500 is not allowed"):
        presets.chapter_params("class_filters", "smoke", k1_values=[1, 500])
    P = SimpleNamespace(k1=5, k2=5, k1_values=[1, 40], k2_values=[2, 3])
    with pytest.raises(ParameterError, match=r"k1_values=\[1, 40\]: element \[1\] = 40 .* d = 32 features"):
        cf.check_widths(P, 32)
    with pytest.raises(ParameterError, match=r"k2=9 is not allowed; expected an int in \[1, 8\]"):
        cf.check_widths(SimpleNamespace(k1=1, k2=9, k1_values=[1], k2_values=[1]), 8)


def test_whole_network_recipe_trains_every_layer_with_batchnorm_in_train_mode():
    torch.manual_seed(0)
    # width 8: channels_last training of widths 2 and 4 corrupts the heap in this torch build (oneDNN)
    net = CifarResNet(depth=8, width=8, in_channels=1).eval()
    sets = cf.weight_sets(net.fc.weight, 3)
    model = cf.with_head(net, cf.DecomposedLinear(net.fc, sets))
    split = Split(torch.rand(64, 1, 12, 12), torch.arange(64) % 10, tuple("0123456789"), "noise")
    cfg = cf.network_config(epochs=1, lr=1e-2, batch_size=32, augment=True, threads=1)
    assert (cfg.optimizer, cfg.weight_decay, cfg.schedule, cfg.augment) == ("adam", 0.0, "none", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = cf.train.fit(model, split, None, cfg, seed=0, progress=False)
    after = model.state_dict()
    assert len(history["step"]) == cf.steps_per_epoch(64, 32) == 2
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # the backbone moves too
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])  # BatchNorm in train mode
    assert not torch.equal(before["fc.weight"], after["fc.weight"]) and torch.equal(after["fc.index"], sets)
    assert torch.equal(net.conv1.weight, before["conv1.weight"])  # the original network is untouched


def test_depth_recipe_scales_the_learning_rate_and_tests_once():
    P = presets.chapter_params("class_filters", "default")
    r = cf.depth_recipe(P, 14)
    assert r.model_kwargs["depth"] == 14 and r.train_subset == P.depth_train_images
    assert r.config.batch_size == 64 and r.config.lr == pytest.approx(0.2 * 64 / 256)
    assert r.config.eval_every == r.config.epochs == P.depth_epochs


def test_neighbours():
    assert cf._neighbours(5, [1, 2, 3, 5, 8, 64], 64) == [3, 8]
    assert cf._neighbours(1, [1, 2, 64], 64) == [2]
    assert cf._neighbours(32, [1, 32, 64], 64) == [1]  # k2 = d keeps the whole layer: never a neighbour
