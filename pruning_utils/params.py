"""Validation of a chapter's parameters: every error names the parameter and what is allowed."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Mapping


class ParameterError(ValueError):
    """A chapter or function parameter has a value outside what is allowed."""


def _same_choice(value: Any, choice: Any) -> bool:
    """``value`` equals ``choice`` and has its type: 20.0 is not the choice 20, True is not 1."""
    return type(value) is type(choice) and value == choice


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed`` (same type too), else raise a ParameterError naming
    ``name``."""
    allowed = tuple(allowed)
    try:
        ok = any(_same_choice(value, c) for c in allowed)
    except Exception:  # an object whose == misbehaves is not a choice either
        ok = False
    if not ok:
        raise ParameterError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    return value


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
    """The known names closest to ``name`` (difflib), for 'did you mean' messages."""
    return difflib.get_close_matches(name, list(known), n=n, cutoff=0.5)


def unknown_error(unknown: Iterable[str], known: Iterable[str], what: str = "parameter") -> ParameterError:
    """A ParameterError naming each unknown name and the closest known ones."""
    known = sorted(known)
    parts = []
    for name in sorted(unknown):
        near = closest(name, known)
        parts.append(f"{name!r}" + (f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""))
    return ParameterError(f"unknown {what}(s) {', '.join(parts)}; known: {', '.join(known)}")


@dataclass(frozen=True)
class Param:
    """The rule for one parameter: its type, and either allowed ``choices`` or a ``lo``..``hi`` range.

    With ``many=True`` the value is a non-empty list without repeats whose every element satisfies the
    rule; it is returned in a canonical order (the order of ``choices``, or ascending), so that no result
    depends on the order a user wrote the list in, unless ``ordered=True``. ``optional=True`` also allows
    None. Floats must be finite; an int parameter takes neither a float (20.0) nor a bool.
    """

    doc: str
    kind: type | tuple[type, ...] = object
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    many: bool = False
    optional: bool = False
    ordered: bool = False

    def allowed(self) -> str:
        """What this rule allows, in words."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            text = " or ".join(k.__name__ for k in kinds)
            if self.lo is not None and self.hi is not None:
                text += f" in [{self.lo}, {self.hi}]"
            elif self.lo is not None:
                text += f", {self.lo} or more"
            elif self.hi is not None:
                text += f", {self.hi} or less"
        if self.many:
            text = "a list, each " + text
        return text + (", or None" if self.optional else "")

    def check(self, name: str, value: Any) -> Any:
        """Return ``value`` if it satisfies the rule, else raise a ParameterError naming ``name``."""
        if value is None and self.optional:
            return value
        if self.many:
            if not isinstance(value, (list, tuple)) or len(value) == 0:
                raise ParameterError(f"{name}={value!r} is not allowed; expected {self.allowed()} ({self.doc})")
            checked = [self._check_one(f"{name}[{i}]", v, whole=(name, value)) for i, v in enumerate(value)]
            repeats = sorted({repr(v) for i, v in enumerate(checked) if v in checked[:i]})
            if repeats:
                raise ParameterError(f"{name}={list(value)!r} is not allowed: {', '.join(repeats)} "
                                     "appear(s) more than once; give each value once")
            if self.ordered:
                return checked
            if self.choices is not None:
                return [c for c in self.choices if c in checked]
            return sorted(checked)
        return self._check_one(name, value)

    def _check_one(self, name, value, whole=None):
        shown = f"{name}={value!r}" if whole is None else f"{whole[0]}={list(whole[1])!r}: element {name[len(whole[0]):]} = {value!r}"
        bad = ParameterError(f"{shown} is not allowed; expected {self.allowed()} ({self.doc})")
        if self.choices is not None:
            try:
                ok = any(_same_choice(value, c) for c in self.choices)
            except Exception:
                ok = False
            if not ok:
                raise bad
            return value
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise bad  # True is an int in Python, never a valid count or rate here
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind):
            raise bad
        if isinstance(value, float) and not math.isfinite(value):
            raise ParameterError(f"{shown} is not allowed: not a finite number; expected {self.allowed()} "
                                 f"({self.doc})")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise bad
        return value


def validate(values: Mapping[str, Any], spec: Mapping[str, Param]) -> dict[str, Any]:
    """Check every entry of ``values`` against ``spec``; unknown or missing names are errors too."""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise unknown_error(unknown, spec)
    missing = sorted(set(spec) - set(values))
    if missing:
        raise ParameterError(f"missing parameter(s) {', '.join(missing)}")
    return {name: spec[name].check(name, values[name]) for name in spec}


def resolve(spec: Mapping[str, Param], sizes: Mapping[str, Mapping[str, Any]], size: str,
            overrides: Mapping[str, Any]) -> SimpleNamespace:
    """Take the named run size's preset, apply the overrides that are not None, and validate the result."""
    check_choice("size", size, sizes)
    values = dict(sizes[size])
    unknown = sorted(set(overrides) - set(spec))
    if unknown:
        raise unknown_error(unknown, spec)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SimpleNamespace(size=size, **validate(values, spec))
