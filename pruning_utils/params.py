"""Validation of a chapter's parameters: every error names the parameter and what is allowed."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable, Mapping


class ParameterError(ValueError):
    """A chapter or function parameter has a value outside what is allowed."""


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return ``value`` if it is one of ``allowed``, else raise a ParameterError naming ``name``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ParameterError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")
    return value


@dataclass(frozen=True)
class Param:
    """The rule for one parameter: its type, and either allowed ``choices`` or a ``lo``..``hi`` range.

    With ``many=True`` the value is a list whose every element must satisfy the rule.
    ``optional=True`` also allows None.
    """

    doc: str
    kind: type | tuple[type, ...] = object
    choices: tuple[Any, ...] | None = None
    lo: float | None = None
    hi: float | None = None
    many: bool = False
    optional: bool = False

    def allowed(self) -> str:
        """What this rule allows, in words."""
        if self.choices is not None:
            text = "one of " + ", ".join(map(repr, self.choices))
        else:
            kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
            text = " or ".join(k.__name__ for k in kinds)
            if self.lo is not None or self.hi is not None:
                text += f" in [{'-inf' if self.lo is None else self.lo}, {'inf' if self.hi is None else self.hi}]"
        if self.many:
            text = "a list, each " + text
        return text + (", or None" if self.optional else "")

    def check(self, name: str, value: Any) -> Any:
        """Return ``value`` if it satisfies the rule, else raise a ParameterError naming ``name``."""
        if value is None and self.optional:
            return value
        if self.many:
            if not isinstance(value, (list, tuple)) or len(value) == 0:
                raise ParameterError(f"{name}={value!r} is not allowed; expected {self.allowed()}")
            return [self._check_one(f"{name}[{i}]", v) for i, v in enumerate(value)]
        return self._check_one(name, value)

    def _check_one(self, name, value):
        bad = ParameterError(f"{name}={value!r} is not allowed; expected {self.allowed()} ({self.doc})")
        if self.choices is not None:
            if value not in self.choices or isinstance(value, bool) != any(isinstance(c, bool) for c in self.choices):
                raise bad
            return value
        if isinstance(value, bool) and bool not in (self.kind if isinstance(self.kind, tuple) else (self.kind,)):
            raise bad  # True is an int in Python, never a valid count or rate here
        if self.kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, self.kind):
            raise bad
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise bad
        return value


def validate(values: Mapping[str, Any], spec: Mapping[str, Param]) -> dict[str, Any]:
    """Check every entry of ``values`` against ``spec``; unknown or missing names are errors too."""
    unknown = sorted(set(values) - set(spec))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(spec))}")
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
        raise ParameterError(f"unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(spec))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SimpleNamespace(size=size, **validate(values, spec))
