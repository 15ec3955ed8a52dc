"""Chapter 1: the trees on filter scores (pruning_utils.trees) and the chapter's analysis
(pruning_utils.decision_trees) on small hand-made cases whose answers are known."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pruning_utils import baselines, claims, criteria, data, decision_trees, models, presets, runtime, trees
from pruning_utils.claims import Verdict
from pruning_utils.params import ParameterError


@pytest.fixture(autouse=True)
def _one_thread():
    with runtime.threads(1):
        yield


def planted(n=600, n_features=8, j=5, seed=0):
    """Only feature j predicts the label (4 classes); the rest is noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(size=(n, n_features))
    x[:, j] = y + 0.1 * rng.normal(size=n)
    return x, y


@pytest.mark.parametrize("n,d", [(1, 1), (2, 1), (6, 3), (16, 4), (120, 7), (1000, 10)])
def test_depth_is_nearest_integer_to_log2(n, d):
    assert trees.depth_for(n) == d


@pytest.mark.parametrize("reading", trees.READINGS)
def test_each_single_tree_ranks_the_planted_feature_first(reading):
    x, y = planted()
    gain = trees.tree_gain(x, y, reading)
    assert gain.shape == (8,) and gain.argmax() == 5
    assert gain[5] > 10 * np.delete(gain, 5).max()


def test_xgboost_reading_is_one_round_ranked_by_its_own_gain_not_weight():
    x, y = planted()
    tree = trees.fit_tree(x, y, "xgboost")
    booster = tree.get_booster()
    assert booster.num_boosted_rounds() == 1 and tree.max_depth == 3  # round(log2 8)
    own = booster.get_score(importance_type="gain")
    gain = trees.tree_gain(x, y, "xgboost")
    np.testing.assert_allclose(gain[[int(k[1:]) for k in own]], list(own.values()))
    assert own != booster.get_score(importance_type="weight")
    boosted = trees.importance(trees.fit_boosted(x, y, 20), 8)  # another model's gain is another ranking
    assert not np.allclose(gain, boosted)


def test_cart_reading_is_one_sklearn_tree_at_the_depth_rule():
    x, y = planted(n_features=16)
    tree = trees.fit_tree(x, y, "cart")
    assert tree.get_depth() <= 4 and tree.max_depth == 4
    np.testing.assert_allclose(trees.importance(tree, 16), tree.feature_importances_)


def test_removal_steps_add_the_point_just_past_a_share():
    ks = trees.removal_steps(120, 12, (0.9,))
    assert ks[0] == 0 and ks[-1] == 119 and 109 in ks  # 109 of 120 removed is the fewest above 90%
    assert list(trees.removal_steps(6, 12, (0.9,))) == [0, 1, 2, 3, 4, 5]  # 6 of 6 would leave nothing
    with pytest.raises(ParameterError, match="steps=1"):
        trees.removal_steps(6, 1)


def test_best_case_pruning_keeps_accuracy_until_the_feature_goes():
    x, y = planted()
    xt, yt = planted(seed=1)
    orders = trees.removal_orders(trees.tree_gain(x, y, "xgboost"))
    assert orders["best"][-1] == 5 and orders["worst"][0] == 5
    removed = trees.removal_steps(8, 8)
    best = trees.pruning_curve(x, y, xt, yt, orders["best"], removed).mean(1)
    worst = trees.pruning_curve(x, y, xt, yt, orders["worst"], removed).mean(1)
    np.testing.assert_array_equal(removed, np.arange(8))
    assert best.min() > 0.95  # feature 5 is the last one left, never removed
    assert worst[0] > 0.95 and worst[1:].max() < 0.45  # chance is 0.25


def test_top_map_counts_by_hand():
    scores = np.array([[0.1, 0.9, 0.0], [0.8, 0.2, 0.1], [0.3, 0.5, 0.4], [0.0, 0.1, 0.2]])
    labels = np.array([0, 1, 1, 0])
    np.testing.assert_array_equal(trees.top_map_counts(scores, labels, 2), [[0, 1], [1, 1], [1, 0]])
    np.testing.assert_array_equal(trees.top_map_counts(scores, labels, 2, rank=2), [[1, 1], [0, 0], [1, 1]])


def test_bad_reading_and_threads():
    with pytest.raises(ParameterError, match="reading='lightgbm' is not allowed"):
        trees.fit_tree(*planted(), reading="lightgbm")
    with pytest.raises(ParameterError, match="threads=0"):
        trees.fit_boosted(*planted(), n_estimators=1, threads=0)
    with pytest.raises(ParameterError, match="reading='c4.5'"):
        criteria.make("gain", reading="c4.5")


def test_gain_criterion_is_the_single_trees_gain_on_the_filter_scores():
    torch.manual_seed(0)
    net = models.LeNet5().eval()
    x, y = torch.rand(200, 1, 32, 32), torch.arange(200) % 10
    for layer, (conv, act) in models.LENET5_LAYERS.items():
        scores = decision_trees.filter_scores(net, x, [layer])[layer]
        for reading in trees.READINGS:
            got = criteria.score("gain", net, criteria.Target(conv, act), criteria.Data(x, y), reading=reading)
            np.testing.assert_allclose(got, trees.tree_gain(scores, y.numpy(), reading))
    with pytest.raises(ParameterError, match="needs the activation"):
        criteria.score("gain", net, criteria.Target("convnet.c1"), criteria.Data(x, y))


def test_estimate_over_seeds_or_over_the_images_of_one_seed():
    a = np.array([1, 1, 0, 1])
    one = decision_trees.estimate([a])
    assert one.n == 4 and one.mean == 0.75 and one.lo < 0.75 < one.hi
    several = decision_trees.estimate([a, np.array([1, 1, 1, 1]), np.array([[1, 0, 0, 1], [1, 0, 1, 1]])])
    assert several.n == 3 and several.values == (0.75, 1.0, 0.625)  # leading axes averaged first


def test_reading_gap_and_kept_by_hand():
    # 4 features, removals 0..3; on two images best is right everywhere, worst only before any removal
    best = np.ones((4, 2), bool)
    worst = np.array([[1, 1], [0, 1], [0, 0], [0, 0]], bool)
    r = decision_trees.Reading(np.arange(4.0), best[0], np.arange(4), best, worst)
    # image 0: gaps 0, 1, 1, 1 at f = 0, 1/4, 2/4, 3/4: area 0.125 + 0.25 + 0.25 = 0.625 over 0.75
    # image 1: gaps 0, 0, 1, 1: area 0.125 + 0.25 = 0.375 over 0.75
    np.testing.assert_allclose(r.gap(), [0.625 / 0.75, 0.375 / 0.75])
    np.testing.assert_array_equal(r.kept(0.7), best[3])  # floor(2.8) + 1 = 3 removed
    assert r.kept(0.9) is None  # 4 of 4 would be all of them


# --- the chapter's pipeline on a random LeNet5 and random images (seconds) ----------------------------------

def _fake_baseline(name, P, seed, **_):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = models.LeNet5().eval()
    split = lambda n: data.Split(torch.rand(n, 1, 32, 32, generator=gen), torch.arange(n) % 10,  # noqa: E731
                                 data.DIGITS, "fake")
    r = baselines.recipe("lenet5", "smoke")
    return baselines.Baseline(name, seed, net, r, {"test_acc": 0.1, "n_train": 300}, split(300), split(100))


def _params(layers):
    """The chapter's smoke parameters, made smaller; ``layers`` set after validation, in the order given
    (validation would put them in network order, and the package must not depend on that)."""
    P = presets.chapter_params("decision_trees", "smoke", seeds=[0, 1], device="cpu", topk=3, n_estimators=3,
                               pruning_steps=3, compare_estimators=2, random_rankings=2, finetune_images=64)
    P.layers = list(layers)
    return P


@pytest.fixture(scope="module")
def pipeline():
    mp = pytest.MonkeyPatch()
    mp.setattr(baselines, "get", _fake_baseline)
    with runtime.threads(1):
        out = {}
        for key, layers in (("forward", ["conv1", "conv2", "conv3"]), ("reversed", ["conv3", "conv2", "conv1"])):
            P = _params(layers)
            study = decision_trees.tree_study(P)
            aggs = decision_trees.aggregation_study(P, study)
            cnn = decision_trees.cnn_pruning(P, study)
            out[key] = (P, study, aggs, cnn, decision_trees.claim_results(P, study, aggs, cnn))
    mp.undo()
    return out


def test_pipeline_gives_every_claim_of_the_chapter_once(pipeline):
    *_, results = pipeline["forward"]
    keys = [r.claim.key for r in results]
    assert keys == [c.key for c in claims.of_chapter("01_decision_tree_pruning")]
    for r in results:
        assert r.verdict in Verdict
        for est in r.parts.values():
            assert est.n == 2  # two seeds
    parts = decision_trees.parts_table(results)
    assert len(parts) == sum(len(r.parts) for r in results) and set(parts.verdict) <= {v.value for v in Verdict}
    cnn = next(r for r in results if r.claim.key == "dt-cnn-random")
    assert set(cnn.parts) == {f"{layer}, {ft}" for layer in ("conv1", "conv2", "conv3")
                              for ft in ("no fine-tuning", "fine-tuned")}  # no layer silently dropped


def test_the_order_of_layers_changes_nothing(pipeline):
    a, b = pipeline["forward"][-1], pipeline["reversed"][-1]
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]
    assert pipeline["reversed"][1].layers == ["conv1", "conv2", "conv3"]


def test_cnn_rows_are_compared_at_equal_target_fractions_in_every_layer(pipeline):
    P, study, _, cnn, _ = pipeline["forward"]
    rows = cnn.rows
    assert set(rows.layer) == {"conv1", "conv2", "conv3"} and set(rows.target_fraction) == {0.5}
    assert set(rows.criterion) == {"gain", "L1", "random"} and len(cnn.correct) == len(rows) == len(cnn.correct_ft)
    per = rows.groupby(["net_seed", "layer", "criterion"]).size()
    assert (per.xs("random", level="criterion") == P.random_rankings).all()
    # the recorded per-image correctness is what the sweep reported
    np.testing.assert_allclose([c.mean() for c in cnn.correct], rows.accuracy)
    np.testing.assert_allclose([c.mean() for c in cnn.correct_ft], rows.accuracy_finetuned)
    # gain's order is the one the criterion gives on the tree study's images
    run = study.runs[0]
    conv, act = models.LENET5_LAYERS["conv3"]
    gain = criteria.score("gain", run.baseline.model, criteria.Target(conv, act),
                          criteria.Data(run.tree_train.x, run.tree_train.y), seed=run.seed)
    np.testing.assert_allclose(gain, run.layers["conv3"].single["xgboost"].gain)


def test_cnn_difference_is_paired_and_averages_the_random_rankings():
    rows, correct = [], []
    for crit, seed, c in (("gain", None, [1, 1, 1, 0]), ("L1", None, [1, 0, 1, 0]), ("random", 0, [0, 0, 1, 0]),
                          ("random", 1, [1, 0, 0, 0])):
        rows.append({"net_seed": 0, "layer": "conv2", "criterion": crit, "seed": seed, "target_fraction": 0.5,
                     "fraction": 0.5, "accuracy": np.mean(c)})
        correct.append(np.array(c, bool))
    import pandas as pd

    cnn = decision_trees.CNNPruning(SimpleNamespace(finetune_epochs=0), pd.DataFrame(rows), correct, None)
    assert cnn.difference("conv2", "L1").mean == pytest.approx(0.25)
    assert cnn.difference("conv2", "random").mean == pytest.approx(0.75 - 0.25)
    assert cnn.difference("conv2", "random").n == 4  # one seed: over its test images


def _study_with_gaps(gaps: dict[str, float], seeds=(0, 1, 2)) -> decision_trees.TreeStudy:
    """A tree study whose Fig. 4 gaps are ``gaps`` (give or take a little per seed)."""
    runs = []
    for s in seeds:
        layers = {}
        for name, g in gaps.items():
            n_img = 200
            best = np.ones((2, n_img), bool)
            worst = np.ones((2, n_img), bool)
            worst[1, :int(round((g + 0.01 * s) * n_img))] = False
            reading = decision_trees.Reading(np.ones(10), best[0], np.array([0, 9]), best, worst)
            layers[name] = decision_trees.LayerTrees(name, 10, 3, (10, 1, 1), best[0],
                                                     {r: reading for r in trees.READINGS})
        runs.append(decision_trees.SeedTrees(s, None, None, None, {}, layers))
    return decision_trees.TreeStudy(SimpleNamespace(), runs)


@pytest.mark.parametrize("gaps,verdict", [
    ({"conv1": 0.0, "conv2": 0.05, "conv3": 0.4}, Verdict.HOLDS),  # none, marginal, drastic
    ({"conv1": 0.0, "conv2": 0.11, "conv3": 0.15}, Verdict.DOES_NOT_HOLD),  # conv2 close to conv3: not marginal
    ({"conv1": 0.2, "conv2": 0.05, "conv3": 0.4}, Verdict.DOES_NOT_HOLD),  # a gap at conv1
    ({"conv1": 0.0, "conv2": 0.02, "conv3": 0.08}, Verdict.DOES_NOT_HOLD),  # nothing drastic at conv3
])
def test_fig4_rule_weighs_every_layer(gaps, verdict):
    study = _study_with_gaps(gaps)
    # the gap is the mean over the curve: 0 at the first point and g at the second, so the area is g / 2
    assert study.gap("conv3", "xgboost").mean == pytest.approx(gaps["conv3"] / 2 + 0.005, abs=1e-3)
    assert decision_trees._fig4_claim(_study_with_gaps({k: 2 * v for k, v in gaps.items()}), "xgboost",
                                      "").verdict is verdict
    assert decision_trees._fig4_claim(_study_with_gaps({"conv3": 0.4}), "cart", "").verdict is Verdict.UNTESTABLE


def test_a_run_on_one_layer_without_pruning_or_fine_tuning_says_what_it_cannot_test(monkeypatch):
    monkeypatch.setattr(baselines, "get", _fake_baseline)
    P = _params(["conv3"])
    P.seeds, P.finetune_epochs, P.cnn_fractions, P.random_rankings = [0], 0, [0.0], 1
    study = decision_trees.tree_study(P)
    aggs = decision_trees.aggregation_study(P, study)
    cnn = decision_trees.cnn_pruning(P, study)
    results = {r.claim.key: r for r in decision_trees.claim_results(P, study, aggs, cnn)}
    for key in ("dt-depth", "dt-fig4-xgboost", "dt-aggregation", "dt-cnn-random", "dt-cnn-l1"):
        assert results[key].verdict is Verdict.UNTESTABLE and results[key].note, key
    assert results["dt-kept-cart"].verdict is not Verdict.UNTESTABLE
    assert results["dt-lenet5"].estimate.method == "paired over test images"  # one seed: over its images
    numbers = {**study.numbers(), **aggs.numbers(), **cnn.numbers(),
               **decision_trees.sentences(list(results.values()))}
    assert np.isnan([numbers["xgb_conv1"], numbers["agg_topk_conv2"], numbers["cnn_L1_conv3_ft"]]).all()
    assert "one measured here" in numbers["table1_sentence"]
    assert aggs.table().empty and not cnn.finetuned
    for make in (study.table1, study.gaps_table, study.figure_gain, study.figure_pruning, study.figure_maps,
                 cnn.table, cnn.cost_table, cnn.figure):
        make()
    assert study.histogram("conv2")[2] == 16  # a layer the run did not score is scored for Fig. 2


def test_the_table1_sentence_follows_the_verdicts():
    E = claims.Estimate
    near, far, wide = E(0.0, -0.01, 0.01, 3), E(0.2, 0.1, 0.3, 3), E(0.0, -0.1, 0.1, 3)

    def sentence(xgb, cart):
        return decision_trees.sentences([claims.decide("dt-table1-xgboost", xgb),
                                         claims.decide("dt-table1-cart", cart)])["table1_sentence"]

    layers = ("conv1", "conv2", "conv3")
    text = sentence(dict(zip(layers, (near, far, wide))), dict.fromkeys(layers, far))
    assert text.startswith("One XGBoost round is within 0.05 of the paper at conv1, more than 0.05 away at conv2, "
                           "undecided at conv3; one CART tree is more than 0.05 away at conv1, conv2, conv3.")
    assert text.endswith("No reading reproduces all three of the paper's single-tree numbers.")
    assert sentence(dict.fromkeys(layers, near), dict.fromkeys(layers, far)).endswith(
        "One XGBoost round reproduces all three of the paper's single-tree numbers.")
    assert sentence(dict.fromkeys(layers, wide), dict.fromkeys(layers, far)).endswith("this run cannot tell.")
