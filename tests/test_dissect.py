from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from pruning_utils import dissect
from pruning_utils.broden import ConceptSet
from pruning_utils.params import ParameterError

NAMES = ("-", "lamp", "wall", "red", "blue")
CATEGORY = np.array([-1, 0, 0, 1, 1])  # lamp, wall: object; red, blue: color
CATS = ("object", "color")


def concept_set(images, masks, has):
    return ConceptSet(images, torch.as_tensor(masks), torch.as_tensor(has), NAMES, CATEGORY, CATS)


def test_threshold_equals_numpy_quantile():
    feats = torch.randn(3, 4, 5, 5)
    t = dissect.unit_thresholds(feats, 0.005)
    for k in range(4):
        expected = np.quantile(feats[:, k].numpy().ravel().astype(np.float64), 0.995)
        assert t[k].item() == pytest.approx(expected, rel=1e-6)
    # 75 values per unit: position 0.995 * 74 = 73.6 lies between the two largest, so only the largest exceeds
    assert (feats > t.view(1, -1, 1, 1)).sum((0, 2, 3)).tolist() == [1, 1, 1, 1]
    with pytest.raises(ParameterError, match="quantile=1.5 is not allowed"):
        dissect.unit_thresholds(feats, 1.5)


def test_hand_computed_iou_counts_only_images_with_the_category():
    # one unit, two 2x2 images; image A has object labels only, image B colour labels only
    unit = torch.tensor([[[[1., 1.], [0., 0.]]], [[[1., 1.], [1., 0.]]]])
    masks = torch.zeros(2, 1, 2, 2, dtype=torch.long)
    masks[0, 0] = torch.tensor([[1, 0], [1, 0]])  # lamp in image A
    masks[1, 0] = 3  # red everywhere in image B
    cs = concept_set(torch.zeros(2, 3, 2, 2), masks, [[True, False], [False, True]])
    iou = dissect.iou_matrix(unit, cs, torch.tensor([0.5]))
    # lamp: |M ∩ L| = 1, |M| = 2 and |L| = 2 in A only -> 1 / 3 (B's 3 mask pixels not counted: 1 / 6)
    assert iou[0, 1].item() == pytest.approx(1 / 3)
    # red: B only, |M ∩ L| = 3, |M ∪ L| = 4 -> 3 / 4 (A's 2 mask pixels not counted)
    assert iou[0, 3].item() == pytest.approx(3 / 4)
    assert iou[0, 0].item() == 0 and iou[0, 2].item() == 0 and iou[0, 4].item() == 0


def indicator_case():
    """Scenes with a lamp and a red patch, and a 1x1 conv whose unit 0 is the lamp indicator, unit 1 the
    red one and unit 2 noise."""
    torch.manual_seed(0)
    n, s = 12, 8
    masks = torch.zeros(n, 2, s, s, dtype=torch.long)
    masks[:, 0] = 2  # wall ...
    masks[:, 1] = 4  # ... and blue everywhere, except:
    for i in range(n):
        y, x = torch.randint(0, 5, (2,)).tolist()
        masks[i, 0, y:y + 3, x:x + 3] = 1  # a lamp
        masks[i, 1, y:y + 4, x:x + 2] = 3  # a red patch
    images = torch.stack([(masks[:, 0] == 1).float(), (masks[:, 1] == 3).float(), torch.rand(n, s, s)], 1)
    model = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
    return model, concept_set(images, masks, torch.ones(n, 2, dtype=torch.bool))


def test_indicator_unit_gets_its_concept_with_iou_one():
    model, cs = indicator_case()
    feats = dissect.layer_features(model, "0", cs.images)
    # each concept covers under 20% of the pixels, so the level-0.2 threshold is 0 and M_k is the indicator
    table = dissect.units_table(dissect.dissect(feats, cs, quantile=0.2), cutoff=0.04)
    assert table.loc[0, "concept"] == "lamp" and table.loc[0, "category"] == "object"
    assert table.loc[1, "concept"] == "red" and table.loc[1, "category"] == "color"
    assert table.loc[0, "iou"] == pytest.approx(1.0) and table.loc[1, "iou"] == pytest.approx(1.0)
    assert table.loc[2, "iou"] < 0.5  # the noise unit matches nothing well
    assert dissect.top_images(feats, 0, 3).shape == (3,)


def test_summary_and_consistency():
    before = pd.DataFrame({"concept": ["lamp", "red", "red", "wall"], "category": ["object", "color", "color", "object"],
                           "iou": [0.2, 0.1, 0.06, 0.01], "interpretable": [True, True, True, False]})
    after = pd.DataFrame({"concept": ["lamp", "blue", "red", "wall"], "category": ["object", "color", "color", "object"],
                          "iou": [0.2, 0.1, 0.01, 0.09], "interpretable": [True, True, False, True]})
    assert dissect.summary(before, CATS) == {"units": 3, "concepts": 2, "alive": 4, "units/object": 1,
                                             "concepts/object": 1, "units/color": 2, "concepts/color": 1}
    still, same = dissect.consistency(before, after)
    assert still == pytest.approx(2 / 3) and same == pytest.approx(1 / 2)


def test_last_block_names_the_last_residual_block():
    import torchvision

    from pruning_utils import models

    assert dissect.last_block(models.CifarResNet(8, width=4)) == "layer3.0"
    assert dissect.last_block(models.CifarResNet(20, width=4)) == "layer3.2"
    assert dissect.last_block(torchvision.models.resnet18()) == "layer4.1"
    with pytest.raises(ParameterError, match="model=Sequential is not allowed"):
        dissect.last_block(nn.Sequential(nn.Conv2d(3, 3, 1)))



def coverage_case():
    """Two 4x4 images whose single unit fires on a known 2x2 block (its maps are at label resolution, so
    upsampling changes nothing): image A carries objects and colours, image B colours only."""
    feats = torch.zeros(2, 1, 4, 4)
    feats[0, 0, :2, :2] = 1.0  # A: the block covers the lamp's top half
    feats[1, 0, 2:, 2:] = 1.0  # B: a block in the corner
    masks = torch.zeros(2, 2, 4, 4, dtype=torch.long)
    masks[0, 0] = 2  # wall everywhere in A ...
    masks[0, 0, :, :2] = 1  # ... but a lamp on the left half (8 of 16 pixels)
    masks[:, 1] = 4  # blue everywhere ...
    masks[:, 1, 3:, :] = 3  # ... but the bottom row is red (4 of 16 pixels per image)
    return feats, concept_set(torch.zeros(2, 3, 4, 4), masks, [[True, True], [False, True]])


def test_mask_coverage_is_measured_and_the_bound_is_min_over_max_with_it():
    feats, cs = coverage_case()
    d = dissect.dissect(feats, cs, quantile=0.3)  # T_k = 0: M_k is exactly the two 2x2 blocks
    # objects: image A only, 4 of its 16 pixels; colours: both images, 8 of 32 pixels
    np.testing.assert_allclose(d.coverage, [[4 / 16, 8 / 32]])
    bound = dissect.iou_bound(cs, d.coverage)
    for name, c in (("lamp", 8 / 16), ("wall", 8 / 16), ("red", 8 / 32), ("blue", 24 / 32)):
        m = d.coverage[0, CATS.index(bound.loc[name, "category"])]
        assert bound.loc[name, "coverage"] == pytest.approx(c)
        assert bound.loc[name, "max_iou"] == pytest.approx(min(m, c) / max(m, c))
        assert d.iou[0, NAMES.index(name)] <= bound.loc[name, "max_iou"] + 1e-6
    assert d.iou[0, NAMES.index("lamp")] == pytest.approx(bound.loc["lamp", "max_iou"])  # block inside the lamp
    # a mask taken to cover more than it does (e.g. q, for masks that upsampling thinned) overstates the bound
    assert dissect.iou_bound(cs, [[0.3, 0.3]]).loc["lamp", "max_iou"] > bound.loc["lamp", "max_iou"]
    with pytest.raises(ParameterError, match="mask_coverage of shape"):
        dissect.iou_bound(cs, [[0.1, 0.2, 0.3]])


def test_a_constant_unit_is_dead_and_never_interpretable():
    feats, cs = coverage_case()
    feats = torch.cat([feats, torch.full_like(feats, 0.7)], 1)  # unit 1: one constant, as a pruned filter
    table = dissect.units_table(dissect.dissect(feats, cs, quantile=0.3), cutoff=0.0)
    assert table["alive"].tolist() == [True, False]
    assert not table.loc[1, "interpretable"] and table.loc[1, "iou"] == 0.0


def test_best_setting_maximises_the_mean_gap_and_breaks_ties_towards_the_paper():
    sweep = pd.DataFrame({"quantile": [0.005, 0.005, 0.02, 0.02, 0.05], "cutoff": [0.04, 0.08, 0.04, 0.08, 0.04],
                          "gap": [2.0, 1.0, 9.0, 9.0, 8.9]}).set_index(["quantile", "cutoff"])
    assert dissect.best_setting(sweep) == (0.02, 0.04)
    assert dissect.best_setting(sweep.drop(index=(0.02, 0.04))) == (0.02, 0.08)
    with pytest.raises(ParameterError, match="sweep is empty"):
        dissect.best_setting(sweep.iloc[:0])


def test_chosen_setting_separates_a_planted_network_from_its_null():
    model, cs = indicator_case()
    null = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False))
    pruning = dissect.Pruning([0], {}, lambda: nn.Sequential(nn.Conv2d(3, 3, 1, bias=False)), "0",
                              [{"state": model.state_dict(), "init": null.state_dict(), "test_acc": 1.0}], {})
    choice = dissect.choose_setting(pruning, SimpleNamespace(tune=cs), [0.05, 0.2], [0.1, 0.5, 0.9])
    chosen = choice.sweep.set_index(["quantile", "cutoff"]).loc[(choice.quantile, choice.cutoff)]
    assert chosen[dissect.TRAINED] == 2 and chosen[dissect.NULL] <= 1  # the lamp and red units; the null few
    assert choice.summary()["gap"].max() == choice.summary().loc[(choice.quantile, choice.cutoff), "gap"]


def test_random_init_resnet_has_few_interpretable_units_at_a_separating_setting(tmp_path):
    from pruning_utils import broden, models

    data = broden.load(broden.generate(tmp_path / "scenes", 0, 64, size=32, seed=5))
    cs = broden.concept_set(data)
    torch.manual_seed(3)
    net = models.CifarResNet(8, num_classes=4, width=8).eval()
    feats = dissect.layer_features(net, dissect.last_block(net), cs.images)
    table = dissect.units_table(dissect.dissect(feats, cs, quantile=0.02), cutoff=0.08)
    assert table["interpretable"].sum() <= 0.25 * len(table)  # 32 units, random weights


def test_null_state_is_the_initial_weights_under_the_levels_mask():
    init = {"conv.weight": torch.arange(1.0, 5.0).view(2, 2, 1, 1), "bn.weight": torch.ones(2),
            "bn.running_mean": torch.zeros(2), "fc.weight": torch.ones(2, 2)}
    state = {"conv.weight": torch.tensor([0.0, 3.0, 0.0, -1.0]).view(2, 2, 1, 1), "bn.weight": torch.zeros(2),
             "bn.running_mean": torch.full((2,), 5.0), "fc.weight": torch.tensor([[0.0, 2.0], [1.0, 1.0]])}
    null = dissect.null_state(init, state)
    assert null["conv.weight"].flatten().tolist() == [0.0, 2.0, 0.0, 4.0]
    assert null["fc.weight"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert null["bn.weight"].tolist() == [1.0, 1.0] and null["bn.running_mean"].tolist() == [0.0, 0.0]


SHARES = [1.0, 0.64, 0.41, 0.262, 0.168, 0.107, 0.069]
FIG_CATS = ("color", "object", "texture", "scene")


def study(units_at_168=(20, 19, 21), accuracy_shift=0.0):
    """A hand-made Dissected of three trials and seven levels at two settings, with known answers."""
    rows = []
    for t in range(3):
        for lv, w in enumerate(SHARES):
            units = {0: 20, 4: units_at_168[t], 5: 18, 6: 12}.get(lv, 20)
            high = 10 if lv < 6 else 3 + t % 2  # objects + scenes: 10 -> 3 or 4 units
            low = 10 if lv < 6 else 8  # colours + textures: 10 -> 8
            acc = 0.93 - (0.01 + 0.001 * t if lv == 5 else 0.05 if lv == 6 else 0.0) + (accuracy_shift if lv else 0)
            for setting in ("paper", "chosen"):
                for network, n in (("trained", units), ("random init", 3 + t)):
                    cats = {"units/object": high // 2, "units/scene": high - high // 2, "units/color": low // 2,
                            "units/texture": low - low // 2} if network == "trained" else {
                        f"units/{c}": 0 for c in FIG_CATS}
                    rows.append({"variant": dissect.MAIN, "trial": t, "seed": t, "level": lv,
                                 "weights_remaining": w, "test_acc": acc, "network": network, "setting": setting,
                                 "units": n, "concepts": n // 2, "alive": 32, **cats,
                                 **{f"concepts/{c}": 1 for c in FIG_CATS}, "chance": n / 32,
                                 "still interpretable": [0.85, 0.9, 0.8][t] if lv else 1.0,
                                 "same concept": [0.75, 0.8, 0.7][t] if lv else 1.0})
    return dissect.Dissected({"paper": (0.005, 0.04), "chosen": (0.02, 0.08)}, FIG_CATS, 32, 8, pd.DataFrame(rows),
                             {}, {}, None)


def test_measures_on_a_hand_made_study():
    dis = study()
    assert dissect.nearest_level(dis.of("chosen"), 0.168) == 4 and dissect.nearest_level(dis.of("chosen"), 0.11) == 5
    assert dissect.separation(dis, "chosen").mean == pytest.approx(20 - 4)
    change = dissect.relative_change(dis, "chosen", 0.168)
    assert change.values == pytest.approx((0.0, -0.05, 0.05))
    assert dissect.accuracy_change(dis, 0.10).values == pytest.approx((-0.01, -0.011, -0.012))
    loss = dissect.higher_level_loss(dis, "chosen")
    assert loss.values == pytest.approx(((1 - 0.3) - 0.2, (1 - 0.4) - 0.2, (1 - 0.3) - 0.2))
    still, same = dissect.consistency_at(dis, "chosen", 0.11)
    assert still.mean == pytest.approx(0.85) and same.mean == pytest.approx(0.75)


def test_claims_of_a_hand_made_study_come_out_either_way():
    from pruning_utils.claims import Verdict

    verdicts = {r.claim.key: r.verdict for r in dissect.claim_results(study())}
    assert verdicts["dis-premise-chosen"] is Verdict.HOLDS and verdicts["dis-hypothesis-a"] is Verdict.HOLDS
    assert verdicts["dis-accuracy-flat"] is Verdict.HOLDS and verdicts["dis-accuracy-drop"] is Verdict.HOLDS
    assert verdicts["dis-higher-first"] is Verdict.HOLDS and verdicts["dis-still"] is Verdict.HOLDS
    verdicts = {r.claim.key: r.verdict for r in dissect.claim_results(study((10, 11, 9), accuracy_shift=-0.05))}
    assert verdicts["dis-hypothesis-a"] is Verdict.DOES_NOT_HOLD  # half the units gone at 16.8%
    assert verdicts["dis-accuracy-flat"] is Verdict.DOES_NOT_HOLD
    short = study()
    short.curves = short.curves[short.curves["level"] <= 2]  # the runs stop at 41% of the weights
    verdicts = {r.claim.key: r.verdict for r in dissect.claim_results(short)}
    assert verdicts["dis-hypothesis-a"] is Verdict.UNTESTABLE and verdicts["dis-still"] is Verdict.UNTESTABLE


def test_bad_chapter_parameters_are_rejected_with_their_names():
    from pruning_utils import presets

    with pytest.raises(ParameterError, match="lr=nan is not allowed"):
        presets.chapter_params("dissection", "smoke", lr=float("nan"))
    with pytest.raises(ParameterError, match="sweep_cutoffs=.*appear"):
        presets.chapter_params("dissection", "smoke", sweep_cutoffs=[0.08, 0.08])
    with pytest.raises(ParameterError, match="rate=True is not allowed"):
        presets.chapter_params("dissection", "smoke", rate=True)
    P = presets.chapter_params("dissection", "smoke", sweep_cutoffs=[0.2, 0.04, 0.1])
    assert P.sweep_cutoffs == [0.04, 0.1, 0.2]  # canonical order: the choice never depends on the order given
    with pytest.raises(ParameterError, match="tune_images=300 is not allowed"):
        dissect.scenes(presets.chapter_params("dissection", "smoke", tune_images=300))
