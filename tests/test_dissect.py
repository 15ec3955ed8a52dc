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
    assert dissect.summary(before, CATS) == {"units": 3, "concepts": 2, "units/object": 1, "concepts/object": 1,
                                             "units/color": 2, "concepts/color": 1}
    still, same = dissect.consistency(before, after)
    assert still == pytest.approx(2 / 3) and same == pytest.approx(1 / 2)


def test_levels_dissects_each_state_and_a_zeroed_unit_stops_being_interpretable():
    model, cs = indicator_case()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = {k: v.clone() for k, v in dense.items()}
    pruned["0.weight"][1] = 0.0  # the red indicator's filter is gone
    states = [{"level": 0, "weights_remaining": 1.0, "test_acc": 0.9, "state": dense},
              {"level": 1, "weights_remaining": 2 / 3, "test_acc": 0.8, "state": pruned}]
    build = lambda: nn.Sequential(nn.Conv2d(3, 3, 1, bias=False))
    rows, tables = dissect.levels(build, states, "0", cs, quantile=0.2, cutoff=0.5)
    assert rows["level"].tolist() == [0, 1] and rows["test_acc"].tolist() == [0.9, 0.8]
    assert rows["units"].tolist() == [2, 1] and rows["concepts/color"].tolist() == [1, 0]
    assert tables[1].loc[1, "iou"] == 0.0 and tables[1].loc[0, "concept"] == "lamp"
    assert rows["still interpretable"].tolist() == [1.0, 0.5] and rows["same concept"].tolist() == [1.0, 1.0]


def test_last_block_names_the_last_residual_block():
    import torchvision

    from pruning_utils import models

    assert dissect.last_block(models.CifarResNet(8, width=4)) == "layer3.0"
    assert dissect.last_block(models.CifarResNet(20, width=4)) == "layer3.2"
    assert dissect.last_block(torchvision.models.resnet18()) == "layer4.1"
    with pytest.raises(ParameterError, match="model=Sequential is not allowed"):
        dissect.last_block(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_iou_bound_is_q_over_coverage_and_no_unit_beats_it():
    model, cs = indicator_case()
    bound = dissect.iou_bound(cs, quantile=0.05)
    lamp = 12 * 9 / (12 * 64)  # a 3x3 lamp in each 8x8 image
    assert bound.loc["lamp", "coverage"] == pytest.approx(lamp) and bound.loc["lamp", "category"] == "object"
    assert bound.loc["lamp", "max_iou"] == pytest.approx(0.05 / lamp)
    assert bound.loc["wall", "max_iou"] == pytest.approx(0.05 / (1 - lamp))
    feats = dissect.layer_features(model, "0", cs.images)
    feats = feats + 0.01 * torch.rand(feats.shape)  # continuous maps: M_k covers the share q, no ties
    iou = dissect.dissect(feats, cs, quantile=0.05).iou
    for name, row in bound.iterrows():
        assert iou[:, NAMES.index(name)].max() <= 1.05 * row["max_iou"]  # M_k covers q up to a pixel
    assert iou[0, NAMES.index("lamp")] == pytest.approx(bound.loc["lamp", "max_iou"], rel=0.05)  # the lamp unit reaches it
    with pytest.raises(ParameterError, match="quantile=0 is not allowed"):
        dissect.iou_bound(cs, quantile=0)
