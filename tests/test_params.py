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
    ("rate", float("nan"), r"rate=nan is not allowed: not a finite number"),
    ("rate", float("inf"), r"rate=inf is not allowed: not a finite number"),
    ("depth", 3.0, r"depth=3.0 is not allowed; expected int"),  # a float is not an int, even 3.0
    ("layers", ["c1", "c1"], r"layers=\['c1', 'c1'\] is not allowed: 'c1' appear\(s\) more than once"),
    ("depth", 2.5, r"depth=2.5 is not allowed; expected int"),
    ("depth", True, r"depth=True is not allowed"),
    ("rate", "fast", r"rate='fast' is not allowed; expected float"),
    ("agg", "median", r"agg='median' is not allowed; expected one of 'mean', 'max'"),
    ("layers", ["c1", "c9"], r"layers=\['c1', 'c9'\]: element \[1\] = 'c9' is not allowed; expected a list, each one of"),
    ("layers", [], r"layers=\[\] is not allowed; expected a list"),
    ("k", 0, r"k=0 is not allowed"),
])
def test_bad_values_name_parameter_and_allowed(name, value, message):
    with pytest.raises(ParameterError, match=message):
        validate({**GOOD, name: value}, SPEC)


def test_unknown_and_missing_parameters():
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) 'dpeth' \(did you mean 'depth'\?\); known: agg, depth"):
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
    p = chapter_params("baselines", "full", seeds=[3], resnet_epochs=None)
    assert (p.seed, p.seeds, p.download) == (3, [3], True)
    with pytest.raises(ParameterError, match="size='huge' is not allowed"):
        chapter_params("baselines", "huge")
    with pytest.raises(ParameterError, match="resnet_depth=21 is not allowed"):
        chapter_params("baselines", resnet_depth=21)
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) 'lr'"):
        chapter_params("baselines", lr=0.1)


@pytest.mark.parametrize("chapter", sorted(CHAPTERS))
def test_every_preset_is_valid(chapter):
    spec, sizes = CHAPTERS[chapter]
    assert set(sizes) == {"smoke", "default", "full"}
    for size in sizes:
        validate(sizes[size], spec)  # raises if a preset breaks its own rules


def test_lists_are_canonical_whatever_order_the_user_wrote():
    spec = {"layers": Param("layers", choices=("c1", "c3", "c5"), many=True),
            "fractions": Param("fractions", float, lo=0.0, hi=1.0, many=True),
            "order": Param("order matters", int, lo=0, many=True, ordered=True)}
    out = validate({"layers": ["c5", "c1"], "fractions": [0.9, 0.1, 0.5], "order": [3, 1]}, spec)
    assert out == {"layers": ["c1", "c5"], "fractions": [0.1, 0.5, 0.9], "order": [3, 1]}


def test_choices_are_type_strict():
    rule = Param("depth", choices=(8, 14, 20))
    assert rule.check("resnet_depth", 20) == 20
    for bad in (20.0, True, "20"):
        with pytest.raises(ParameterError, match="resnet_depth=.* is not allowed; expected one of 8, 14, 20"):
            rule.check("resnet_depth", bad)
    with pytest.raises(ParameterError, match="x=1 is not allowed"):
        check_choice("x", 1, (True, False))  # 1 == True, but not a bool


def test_seeds_are_bounded_to_what_every_library_accepts():
    with pytest.raises(ParameterError, match=r"seeds=\[0, 4294967296\]: element \[1\] = 4294967296 is not allowed"):
        chapter_params("baselines", seeds=[0, 2**32])
    with pytest.raises(ParameterError, match=r"seeds=\[True\]"):
        chapter_params("baselines", seeds=[True])
    assert chapter_params("baselines", seeds=[2**32 - 1]).seed == 2**32 - 1
