import pytest

from pruning_utils.params import Param, ParameterError, check_choice, validate
from pruning_utils.presets import CHAPTERS, chapter_params

SPEC = {
    "depth": Param("tree depth", int, lo=1, hi=10),
    "rate": Param("learning rate", float, lo=0.0),
    "agg": Param("aggregation", choices=("mean", "max")),
    "layers": Param("layers", choices=("c1", "c3"), many=True),
    "k": Param("top k", int, lo=1, optional=True),
}
GOOD = {"depth": 3, "rate": 1, "agg": "mean", "layers": ["c1"], "k": None}


def test_valid_values_pass_and_ints_become_floats():
    out = validate(GOOD, SPEC)
    assert out["rate"] == 1.0 and isinstance(out["rate"], float)
    assert out["layers"] == ["c1"] and out["k"] is None


@pytest.mark.parametrize("name,value,message", [
    ("depth", 0, r"depth=0 is not allowed; expected int in \[1, 10\]"),
    ("depth", 2.5, r"depth=2.5 is not allowed; expected int"),
    ("depth", True, r"depth=True is not allowed"),
    ("rate", "fast", r"rate='fast' is not allowed; expected float"),
    ("agg", "median", r"agg='median' is not allowed; expected one of 'mean', 'max'"),
    ("layers", ["c1", "c9"], r"layers\[1\]='c9' is not allowed; expected a list, each one of 'c1', 'c3'"),
    ("layers", [], r"layers=\[\] is not allowed; expected a list"),
    ("k", 0, r"k=0 is not allowed"),
])
def test_bad_values_name_parameter_and_allowed(name, value, message):
    with pytest.raises(ParameterError, match=message):
        validate({**GOOD, name: value}, SPEC)


def test_unknown_and_missing_parameters():
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) dpeth; allowed: agg, depth"):
        validate({**GOOD, "dpeth": 3}, SPEC)
    with pytest.raises(ParameterError, match=r"missing parameter\(s\) rate"):
        validate({k: v for k, v in GOOD.items() if k != "rate"}, SPEC)


def test_check_choice():
    assert check_choice("x", "a", ("a", "b")) == "a"
    with pytest.raises(ParameterError, match="x='c' is not allowed; choose one of 'a', 'b'"):
        check_choice("x", "c", ("a", "b"))


def test_chapter_params_take_preset_and_overrides():
    p = chapter_params("baselines", "smoke")
    assert (p.size, p.seed, p.download, p.resnet_epochs) == ("smoke", 0, False, None)
    p = chapter_params("baselines", "full", seed=3, resnet_epochs=None)
    assert (p.seed, p.download) == (3, True)
    with pytest.raises(ParameterError, match="size='huge' is not allowed"):
        chapter_params("baselines", "huge")
    with pytest.raises(ParameterError, match="resnet_depth=21 is not allowed"):
        chapter_params("baselines", resnet_depth=21)
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) lr"):
        chapter_params("baselines", lr=0.1)


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_every_preset_is_valid(chapter):
    spec, sizes = CHAPTERS[chapter]
    assert set(sizes) == {"smoke", "default", "full"}
    for size in sizes:
        validate(sizes[size], spec)  # raises if a preset breaks its own rules
