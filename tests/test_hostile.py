"""A hostile but fair user, every chapter, every parameter: each bad value must stop the chapter with an
error that names the parameter as written and what it allows (never a crash far from the cause, never a
silent run). The cases are generated from each parameter's own rule, so a parameter added later is
covered too; ``pytest -s tests/test_hostile.py`` prints the count of cases and their outcomes."""
from __future__ import annotations

import collections
import math

import pytest

from pruning_utils.params import Param, ParameterError
from pruning_utils.presets import CHAPTERS, chapter_params


def _one_bad(rule: Param) -> list[tuple[str, object]]:
    """Bad single values for ``rule``: (what, value)."""
    cases = [("a string", "not-a-value"), ("a dict", {"a": 1}), ("NaN", math.nan), ("infinity", math.inf),
             ("-infinity", -math.inf), ("a bool", True)]
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    if rule.choices is not None:
        cases.append(("an unknown choice", "no-such-choice"))
        if any(isinstance(c, int) and not isinstance(c, bool) for c in rule.choices):
            cases.append(("a float for an int choice", float(next(c for c in rule.choices if isinstance(c, int)))))
        return [c for c in cases if not any(c[1] == ch and type(c[1]) is type(ch) for ch in rule.choices)]
    if str in kinds:  # a path: any string is a name; a missing folder is the data's error (test_data)
        cases = [c for c in cases if c[0] != "a string"]
    if bool in kinds:
        return [c for c in cases if c[0] != "a bool"] + [("an int for a bool", 1)]
    if int in kinds and float not in kinds:
        ok = int(rule.lo if rule.lo is not None else 0)
        cases.append(("a float for an int", float(ok) + 0.0))
        cases.append(("a fractional float", ok + 0.5))
    if rule.lo is not None:
        cases.append(("below the range", rule.lo - 1))
    if rule.hi is not None:
        cases.append(("above the range", rule.hi + 1))
    return cases


def _cases():
    for chapter, (spec, sizes) in sorted(CHAPTERS.items()):
        good = sizes["smoke"]
        for name, rule in sorted(spec.items()):
            bad = _one_bad(rule)
            if rule.many:
                fine = good[name] if good.get(name) else None
                first = fine[0] if fine else None
                bad = [(f"{what} in the list", [value] if first is None else [first, value]) for what, value in bad]
                bad += [("an empty list", []), ("a bare value", "x")]
                if first is not None:
                    bad.append(("a duplicate", [first, first]))
            for what, value in bad:
                yield pytest.param(chapter, name, value, id=f"{chapter}-{name}-{what}")


CASES = list(_cases())
OUTCOMES: collections.Counter = collections.Counter()


@pytest.mark.parametrize("chapter,name,value", CASES)
def test_bad_value_stops_with_the_parameter_named(chapter, name, value):
    try:
        chapter_params(chapter, "smoke", **{name: value})
    except ParameterError as e:
        message = str(e)
        named = message.startswith(f"{name}=")
        OUTCOMES["clear error naming the parameter" if named else "error naming another parameter"] += 1
        assert named, f"{chapter}: {name}={value!r} gave an error that names something else: {message}"
        assert "allowed" in message, message
        return
    except Exception as e:  # a crash with a traceback only
        OUTCOMES["crash"] += 1
        raise AssertionError(f"{chapter}: {name}={value!r} crashed: {type(e).__name__}: {e}") from e
    OUTCOMES["accepted silently"] += 1
    raise AssertionError(f"{chapter}: {name}={value!r} was accepted")


def test_unknown_names_are_refused_in_every_chapter():
    for chapter, (spec, _) in CHAPTERS.items():
        name = sorted(spec)[-1]
        with pytest.raises(ParameterError, match=rf"unknown parameter\(s\) '{name}x' \(did you mean '{name}'"):
            chapter_params(chapter, "smoke", **{name + "x": 1})


def test_the_campaign_is_large_and_clean():
    """Runs last (file order): every case above ended in a clear error naming its parameter."""
    print(f"\nhostile cases: {len(CASES)} over {len(CHAPTERS)} chapters; outcomes: {dict(OUTCOMES)}")
    assert len(CASES) > 300
    if OUTCOMES:  # the parametrised cases ran in this session
        assert set(OUTCOMES) == {"clear error naming the parameter"}, dict(OUTCOMES)
