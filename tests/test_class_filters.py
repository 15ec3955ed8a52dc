import numpy as np
import pytest
import torch
from torch import nn

from pruning_utils import class_filters as cf
from pruning_utils.models import CifarResNet
from pruning_utils.params import ParameterError

PLANTED = torch.tensor([[1, 4, 6], [0, 2, 7], [3, 5, 9]])  # S_y of three classes over d = 10 features


def planted(n_per_class=50, d=10, seed=0):
    """Class y's instances are large exactly on PLANTED[y] and small (noise in [0, 0.5)) elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(PLANTED)).repeat_interleave(n_per_class)
    x = 0.5 * torch.rand(len(labels), d, generator=gen)
    x[torch.arange(len(labels))[:, None], PLANTED[labels]] = 1.0 + torch.rand(len(labels), 3, generator=gen)
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
    assert ranks.tolist() == [[2, 0, 1, 3], [0, 2, 1, 3], [3, 1, 2, 0]]  # the tie 0.7/0.7 goes to index 0
    hist = cf.class_histograms(ranks, torch.tensor([0, 0, 1]), k1=2, n_classes=2)
    assert hist.tolist() == [[1, 1, 2, 0], [0, 1, 0, 1]]
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


def test_r_a_grid_on_planted_data():
    x, y = planted()
    xt, yt = planted(seed=1)
    lin = nn.Linear(10, 3)
    with torch.no_grad():  # a layer that reads only the planted features, so S_y = PLANTED loses nothing
        lin.weight.copy_(torch.from_numpy(cf.feature_use(PLANTED, 10)) * 2.0 - 1.0)
        lin.bias.zero_()
    grid = cf.r_a_grid(lin, x, y, xt, yt, k1s=[1, 3, 10], k2s=[1, 3, 10])
    assert np.isnan(grid[0, 1]) and np.isnan(grid[1, 2]) and not np.isnan(grid[2, 0])
    assert grid[1, 1] == 1.0 and grid[2, 2] == 1.0  # k2 = k1 = 3 finds the planted sets; 10 keeps all
    out = cf.relative_accuracy(lin, PLANTED, xt, yt)
    assert out["A_f"] == 1.0 and out["r_A"] == 1.0


def test_retrain_touches_only_the_decomposed_weights_and_lowers_the_loss():
    x, y = planted(n_per_class=100)
    lin = nn.Linear(10, 3)
    head = cf.DecomposedLinear(lin, PLANTED)
    threads = torch.get_num_threads()
    trained, hist = cf.retrain(head, x, y, epochs=3, lr=1e-2, batch_size=30, test=(x, y))
    assert torch.get_num_threads() == threads  # the single-thread loop restores the setting
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
