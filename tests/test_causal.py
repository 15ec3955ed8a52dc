import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pruning_utils import causal, models, prune
from pruning_utils.params import ParameterError


def tiny_net(head: list[list[float]], bias: list[float]) -> nn.Sequential:
    """conv 1x1 (3 -> 3, identity) -> relu -> global mean -> linear 3 -> 2 with the given head."""
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 3, 1))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(3, 2))
    with torch.no_grad():
        net.conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        net.conv.bias.zero_()
        net.fc.weight.copy_(torch.tensor(head))
        net.fc.bias.copy_(torch.tensor(bias))
    return net.eval()


def signal_data(n=400, seed=0):
    """Class 1 lights channel 0; channels 1 and 2 are noise that carries no class information."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 3, 4, 4, generator=g)
    x[:, 0] = y.view(-1, 1, 1).float() + 0.1 * torch.rand(n, 4, 4, generator=g)
    return x, y


def test_dead_filter_has_zero_effect_and_zero_scores():
    net = tiny_net([[0.0, 1.0, -1.0], [2.0, -1.0, 1.0]], [0.0, -1.0])
    with torch.no_grad():
        net.conv.bias[1] = -10.0  # inputs are in [0, 1.1]: filter 1 never fires
    x, y = signal_data()
    table = causal.effects(net, "relu", x, y, n_boot=200)
    dead = table[table["filter"] == 1]
    assert len(dead) == 2 * len(causal.OUTCOMES)  # two interventions x four outcomes
    assert (dead[["effect", "lo", "hi"]].to_numpy() == 0).all()
    alive = table[(table["filter"] != 1) & (table["outcome"] == "loss") & (table["intervention"] == "zero")]
    assert (alive["effect"].abs() > 1e-3).all()
    crit, delta = causal.taylor(net, ["relu"], x, y)["relu"]
    assert crit[1] == 0 and delta[1] == 0 and crit[0] > 0
    norms = causal.map_norms(net, ["relu", "fc"], x)
    assert causal.scm_importance(norms["relu"], norms["fc"])[1] == 0


def test_the_filter_that_carries_the_class_has_the_largest_effect():
    net = tiny_net([[-4.0, 0.5, 0.0], [4.0, 0.0, 0.5]], [2.0, 0.0])  # logit gap 8 a0 - 2 + noise terms
    x, y = signal_data()
    table = causal.effects(net, "relu", x, y, n_boot=200)
    for outcome in causal.OUTCOMES:
        for v in causal.INTERVENTIONS:
            imp = causal.importance(table, v, outcome)
            assert imp.argmax() == 0, (outcome, v, imp)
            assert causal.ranking(imp)[-1] == 0
    # without channel 0 the net calls every image class 0: accuracy falls to the share of class 0
    acc = table[(table["filter"] == 0) & (table["outcome"] == "accuracy") & (table["intervention"] == "zero")]
    base = causal.baseline_outcomes(net, x, y)["accuracy"].mean().item()
    assert base == 1.0
    assert acc["effect"].item() == pytest.approx((y == 0).float().mean().item() - 1.0)
    row = table[(table["filter"] == 0) & (table["outcome"] == "loss") & (table["intervention"] == "zero")]
    assert row["lo"].item() > 0  # the interval excludes no effect
    crit, _ = causal.taylor(net, ["relu"], x, y)["relu"]
    assert crit.argmax() == 0


@pytest.mark.parametrize("make,layer,shape", [
    (lambda: models.LeNet5(), "convnet.relu3", (1, 32, 32)),
    (lambda: models.LeNet5(), "fc.relu6", (1, 32, 32)),
    (lambda: models.CifarResNet(8, in_channels=1), "layer2.0.relu1", (1, 16, 16)),
])
def test_batched_interventions_equal_one_model_copy_each(make, layer, shape):
    net = make().eval()
    x, y = torch.randn(24, *shape), torch.randint(0, 10, (24,))
    sets = [[0], [1, 2], [3]]
    do = causal.outcomes_under(net, layer, x, y, sets, batch_size=8, max_batch=16)  # chunks of 2 sets
    with torch.no_grad():
        unmodified = torch.log_softmax(net(x), 1)
    assert (do["kl"] >= -1e-6).all()
    for k, s in enumerate(sets):
        with torch.no_grad():
            ref = causal.outcomes(prune.zero_channels(net, layer, s)(x), y, unmodified)
        for o in causal.OUTCOMES:
            torch.testing.assert_close(do[o][:, k], ref[o], atol=1e-5, rtol=1e-5)


def test_repeat_point_moves_up_to_a_block_with_a_shortcut():
    net = models.CifarResNet(8, in_channels=1)
    assert causal.repeat_point(net, "layer1.0.relu1") == "layer1.0"
    assert causal.repeat_point(models.LeNet5(), "convnet.relu3") == "convnet.relu3"


def test_bootstrap_interval():
    mean, lo, hi = causal.bootstrap_ci(np.full((50, 2), 0.25), n_boot=100)
    assert np.all(mean == 0.25) and np.allclose(lo, 0.25) and np.allclose(hi, 0.25)
    d = np.random.default_rng(0).normal(1.0, 1.0, size=(2000, 1))
    mean, lo, hi = causal.bootstrap_ci(d, n_boot=500, seed=1)
    assert lo[0] < 1.0 < hi[0]
    assert hi[0] - lo[0] == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.2)


def test_dowhy_recovers_a_known_coefficient_of_a_linear_scm():
    rng = np.random.default_rng(0)
    n = 2000
    z = rng.normal(size=(n, 2))
    t = z @ [1.0, -0.5] + rng.normal(size=n)
    y = 1.5 * t + z @ [2.0, 1.0] + rng.normal(size=n)
    frame = pd.DataFrame({"z0": z[:, 0], "z1": z[:, 1], "t": t, "y": y})
    adjusted = causal.backdoor_estimate(frame, "t", "y", ["z0", "z1"], refuters=["placebo_treatment_refuter"],
                                        simulations=5)
    assert adjusted["lo"] < 1.5 < adjusted["hi"]
    assert abs(adjusted["placebo_treatment_refuter"]) < 0.1  # a permuted treatment has no effect
    naive = causal.backdoor_estimate(frame, "t", "y", [])
    assert not naive["lo"] < 1.5 < naive["hi"]  # confounded by z without the back-door set


def test_observational_effects_imply_the_zeroing_effect():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(1000, 2))
    t = np.abs(w @ [[1.0, 0.2], [0.5, 1.0]] + rng.normal(size=(1000, 2))) + 1.0
    y = -2.0 * t[:, 0] + w[:, 0] + 0.1 * rng.normal(size=1000)
    out = causal.observational_effects(t, y, w, adjustments=["parents", "parents+siblings"], filters=[0])
    for _, row in out.iterrows():
        assert row["slope lo"] < -2.0 < row["slope hi"]
        assert row["implied effect"] == pytest.approx(2.0 * t[:, 0].mean(), rel=0.02)
        assert row["implied lo"] <= row["implied effect"] <= row["implied hi"]


def test_scm_recovers_structural_coefficients():
    rng = np.random.default_rng(0)
    parents = rng.normal(size=(500, 3))
    parents[:, 2] = 0.0  # a dead parent filter
    beta = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 0.0]])
    children = parents @ beta + 0.01 * rng.normal(size=(500, 2))
    est, r2 = causal.structural_equations(parents, children, standardize=False, ridge=0.0)
    np.testing.assert_allclose(est, beta, atol=0.01)
    assert (r2 > 0.99).all()
    np.testing.assert_allclose(causal.scm_importance(parents, children, standardize=False, ridge=0.0),
                               [3.0, 0.5, 0.0], atol=0.02)


def _randomise_batchnorm(net):
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return net.eval()


def test_resnet_inner_conv_removal_equals_zeroing_after_relu1():
    net = _randomise_batchnorm(models.CifarResNet(20, in_channels=1))
    x = torch.randn(6, 1, 28, 28)
    plan = {"layer1.0.relu1": [0, 5], "layer2.1.relu1": list(range(10)), "layer3.2.relu1": [63, 1, 7]}
    conv_of = {k: k.replace("relu1", "conv1") for k in plan}
    gone = causal.removed(net, plan, conv_of, x[:1])
    zeroed = causal.masked(net, plan)
    with torch.no_grad():
        torch.testing.assert_close(gone(x), zeroed(x), atol=1e-4, rtol=1e-4)
        # zeroing the conv's output instead would not be removal: bn1 adds its shift back
        wrong = prune.zero_channels(net, "layer1.0.conv1", [0, 5])
        assert not torch.allclose(wrong(x), causal.masked(net, {"layer1.0.relu1": [0, 5]})(x), atol=1e-4)
    assert gone.layer2[1].conv1.out_channels == 22 and gone.layer2[1].conv2.in_channels == 22
    assert gone.layer2[1].conv2.out_channels == 32  # the residual stream keeps its width
    assert models.count_parameters(gone) < models.count_parameters(net)


def test_plan_sweep_and_cost_table():
    net = models.LeNet5().eval()
    sizes = {"convnet.relu1": 6, "convnet.relu3": 16}
    ranks = {"convnet.relu1": [5, 4, 3, 2, 1, 0], "convnet.relu3": list(range(16))}
    assert causal.plan(ranks, 0.5, sizes) == {"convnet.relu1": [5, 4, 3], "convnet.relu3": list(range(8))}
    assert causal.plan(ranks, 0.99, sizes)["convnet.relu1"] == [5, 4, 3, 2, 1]  # one filter always stays
    rows = causal.network_sweep(net, {"a": ranks}, sizes, [0.0, 0.5], evaluate=lambda m: 1.0, progress=False)
    assert [r["removed"] for r in rows] == [0, 11]
    conv_of = {"convnet.relu1": "convnet.c1", "convnet.relu3": "convnet.c3"}
    small = causal.removed(net, causal.plan(ranks, 0.5, sizes), conv_of, torch.zeros(1, 1, 32, 32))
    table = causal.cost_table({"unpruned": net, "half": small}, (1, 32, 32), batch_sizes=(1, 4), repeats=3,
                              warmup=1)
    assert table.loc["half", "MACs"] < table.loc["unpruned", "MACs"]
    assert table.loc["half", "params"] < table.loc["unpruned", "params"]
    assert table.loc["unpruned", "MAC reduction"] == 0 and 0 < table.loc["half", "MAC reduction"] < 1
    assert (table[["latency b1 (ms)", "latency b4 (ms)"]] > 0).all().all()


def test_bad_arguments():
    net = models.LeNet5()
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    with pytest.raises(ParameterError, match="intervention='one' is not allowed; choose one of 'zero', 'mean'"):
        causal.effects(net, "convnet.relu1", x, y, interventions=["one"])
    with pytest.raises(ParameterError, match="layer='convnet.relu9' is not in the model"):
        causal.outcomes_under(net, "convnet.relu9", x, y, [[0]])
    with pytest.raises(ParameterError, match="fraction=1.0 is not allowed"):
        causal.plan({"a": [0, 1]}, 1.0, {"a": 2})
    with pytest.raises(ParameterError, match="adjustment='all' is not allowed"):
        causal.observational_effects(np.ones((5, 2)), np.ones(5), np.ones((5, 1)), adjustments=["all"])
    with pytest.raises(ParameterError, match="outcome='f1' is not allowed"):
        causal.importance(pd.DataFrame(columns=["intervention", "outcome", "filter", "effect"]), "zero", "f1")
