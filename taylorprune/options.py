"""Typed options, declared once by the component that uses them (a method, a statistic, a weight update).

A component's options are a frozen dataclass deriving from ``Options`` whose fields are made with
``option(...)``: type, default, help and validation in one place. Everything else is derived from that
declaration: the CLI flags of ``run`` and ``sweep`` (``--alpha``), ``--option KEY=VALUE`` parsing, the
``methods`` listing, cache identities and the report. Values may arrive typed (Python API, CLI flags) or as
text (``--option``); ``Options.build`` converts, validates and fails with one line naming the flag.

The same name may be declared by several components (``percdamp`` by SparseGPT and by ``--update obs``) only
with the same type and default, so one flag means one thing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from taylorprune.errors import UserError

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Spec:
    """What ``option(...)`` declares about one field; ``name`` and ``kind`` are filled in from the class."""

    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    identity: bool = True  # changes the result (False: cache paths, performance switches)
    memory_hint: str | None = None  # how this option lowers peak memory (named in out-of-memory errors)
    required: bool = False  # no default: a value must be given (``--model``)
    name: str = ""
    kind: type = str
    optional: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def same_as(self, other: Spec) -> bool:
        return (self.kind, self.default, self.choices, self.optional) == (other.kind, other.default, other.choices,
                                                                         other.optional)

    def shown_default(self) -> str:
        if self.default is None:
            return "none"
        if self.kind is bool:
            return "on" if self.default else "off"
        return str(self.default)

    def convert(self, value: Any) -> Any:
        """``value`` (typed, or text from ``--option``) as this option's type, validated."""
        if value is None or (isinstance(value, str) and self.optional and value.lower() in ("", "none", "null")):
            if self.optional:
                return None
            raise UserError(f"{self.flag}: a value is required")
        out = self._typed(value)
        self._check(out)
        return out

    def _typed(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in TRUE | FALSE:
                return text in TRUE
            raise UserError(f"{self.flag} {value}: expected true or false")
        if self.kind in (int, float):
            if isinstance(value, bool):
                raise UserError(f"{self.flag} {value}: expected a number")
            try:
                number = self.kind(value) if self.kind is float else _as_int(value)
            except (TypeError, ValueError):
                what = "a whole number" if self.kind is int else "a number"
                raise UserError(f"{self.flag} {value}: expected {what}") from None
            if self.kind is float and not math.isfinite(number):
                raise UserError(f"{self.flag} {value}: expected a finite number")
            return number
        return str(value)

    def _check(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise UserError(f"{self.flag} {value}: choose one of {', '.join(self.choices)}")
        bounds = ((self.minimum, lambda v, b: v >= b, "at least"), (self.maximum, lambda v, b: v <= b, "at most"),
                  (self.above, lambda v, b: v > b, "above"), (self.below, lambda v, b: v < b, "below"))
        for bound, ok, words in bounds:
            if bound is not None and not ok(value, bound):
                shown = f"{value:g}" if isinstance(value, float) else value
                raise UserError(f"{self.flag} {shown}: must be {words} {bound:g}")


def _as_int(value: Any) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip())


def option(default: Any, help: str, *, choices: Iterable[str] | None = None, minimum: float | None = None,
           maximum: float | None = None, above: float | None = None, below: float | None = None,
           identity: bool = True, memory_hint: str | None = None, required: bool = False) -> Any:
    """A dataclass field of an ``Options`` class, with everything the CLI and the checks need."""
    spec = Spec(default, help, tuple(choices) if choices is not None else None, minimum, maximum, above, below,
                identity, memory_hint, required)
    return field(default=default, metadata={"taylorprune": spec})


def _kind(hint: Any) -> tuple[type, bool]:
    """(base type, optional) of an annotation such as ``float`` or ``str | None``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), False
    return hint, False


@dataclass(frozen=True)
class Options:
    """Base of every component's options (a frozen dataclass of ``option(...)`` fields)."""

    _specs: ClassVar[dict[type, tuple[Spec, ...]]] = {}

    @classmethod
    def specs(cls) -> tuple[Spec, ...]:
        """The declared options, with names and types filled in."""
        if cls not in Options._specs:
            hints = typing.get_type_hints(cls)
            found = []
            for f in dataclasses.fields(cls):
                spec = f.metadata.get("taylorprune")
                if spec is None:
                    raise TypeError(f"{cls.__name__}.{f.name} is not declared with option(...)")
                kind, optional = _kind(hints[f.name])
                found.append(dataclasses.replace(spec, name=f.name, kind=kind, optional=optional))
            Options._specs[cls] = tuple(found)
        return Options._specs[cls]

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> Options:
        """An instance from the entries of ``values`` this class declares (others are ignored), validated."""
        missing = [s.flag for s in cls.specs() if s.required and values.get(s.name) is None]
        if missing:
            raise UserError(f"{missing[0]} is required")
        given = {s.name: s.convert(values[s.name]) for s in cls.specs() if s.name in values}
        made = cls(**given)
        made.check()
        made.check_given(frozenset(given))
        return made

    def check(self) -> None:
        """Cross-field validation; override where options constrain each other."""

    def check_given(self, given: frozenset[str]) -> None:
        """Validation of what was given (not defaulted); override where an option only applies to some settings
        of another (an option of another mode is an error, not silently ignored)."""

    def as_dict(self) -> dict[str, Any]:
        return {s.name: getattr(self, s.name) for s in self.specs()}

    def identity(self) -> dict[str, str]:
        """The options that change results, as text (cache identities and recipes)."""
        return {s.name: json.dumps(getattr(self, s.name)) for s in self.specs() if s.identity}


@dataclass(frozen=True)
class NoOptions(Options):
    """For components without options."""


def merge_specs(groups: Iterable[tuple[str, type[Options]]]) -> dict[str, tuple[Spec, list[str]]]:
    """{option name: (spec, users)} over components; a name declared twice must mean the same option."""
    merged: dict[str, tuple[Spec, list[str]]] = {}
    for user, cls in groups:
        for spec in cls.specs():
            if spec.name in merged:
                known, users = merged[spec.name]
                if not known.same_as(spec):
                    raise TypeError(f"option {spec.name!r} of {user} differs from the one of {', '.join(users)}")
                users.append(user)
            else:
                merged[spec.name] = (spec, [user])
    return merged


def by_name(*entries: Any) -> dict[str, Any]:
    """A registry of declared components (anything with a ``name``), in the order given; a name twice is an error.
    Registering a component is one line: its declaration in the registry's ``by_name(...)``."""
    out: dict[str, Any] = {}
    for entry in entries:
        if entry.name in out:
            raise TypeError(f"{entry.name!r} registered twice")
        out[entry.name] = entry
    return out


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """``--option KEY=VALUE`` items as text values (converted later by the option's own type)."""
    parsed: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().removeprefix("--").replace("-", "_")
        if not sep or not key:
            raise UserError(f"--option {item}: expected KEY=VALUE, e.g. alpha=0.5")
        if key in parsed:
            raise UserError(f"--option {key} given twice")
        parsed[key] = raw.strip()
    return parsed
