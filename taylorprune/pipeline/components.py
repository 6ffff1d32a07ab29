"""The components of a run (method, weight update, statistic sources) with their typed options, resolved once.

Option values come in as one flat mapping (CLI flags, ``--option KEY=VALUE``, the Python API); each component
takes the names it declares. A name no component declares is an error listing the known ones; a name that
only components this run does not use declare is an error saying who uses it (``strict``), so a misspelt or
misplaced option never goes unnoticed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from taylorprune.errors import UserError
from taylorprune.options import Options, Spec, merge_specs
from taylorprune.prune.refine import REFINES, Refine, get_refine
from taylorprune.prune.update import UPDATES, Update, get_update
from taylorprune.scoring.registry import METHODS, get_method
from taylorprune.scoring.spec import Method
from taylorprune.stats.registry import SOURCES, sources_for
from taylorprune.stats.source import Source


@dataclass(frozen=True)
class OptionInfo:
    """One option as the CLI shows it: its declaration and who uses it."""

    spec: Spec
    used_by: tuple[str, ...]

    @property
    def help(self) -> str:
        return f"[{', '.join(self.used_by)}] {self.spec.help}"


def _users(name: str) -> tuple[str, ...]:
    """Methods (and ``--update`` values) that take option ``name``, directly or through their statistics."""
    found = []
    for m in METHODS.values():
        groups = [m.options] + [s.options for s in sources_for(m.statistics)]
        if any(name in {sp.name for sp in g.specs()} for g in groups):
            found.append(m.name)
    for r in REFINES.values():
        if name in {sp.name for sp in r.options.specs()}:
            found.append(f"--refine {r.name}")
    for u in UPDATES.values():
        if name in {sp.name for sp in u.options.specs()}:
            found.append(f"--update {u.name}")
    return tuple(found)


@cache
def all_options() -> dict[str, OptionInfo]:
    """Every option any component declares, checked for consistency (one name, one meaning)."""
    groups = [(f"method {m.name}", m.options) for m in METHODS.values()]
    groups += [(f"refine {r.name}", r.options) for r in REFINES.values()]
    groups += [(f"update {u.name}", u.options) for u in UPDATES.values()]
    groups += [(f"statistic {s.name}", s.options) for s in SOURCES]
    return {name: OptionInfo(spec, _users(name)) for name, (spec, _) in merge_specs(groups).items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_known(values: Mapping[str, Any]) -> None:
    known = all_options()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"unknown option {unknown[0]} ({_flag(unknown[0])}); known options: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Components:
    """Method, mask refinement, weight update and statistic sources of one run, each with its options."""

    method: Method
    method_options: Options
    refine: Refine
    refine_options: Options
    update: Update
    update_options: Options
    sources: tuple[tuple[Source, Options], ...]

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs(self.method_options) | self.refine.needs | self.update.needs

    @property
    def stages(self) -> tuple[Options, ...]:
        return (self.method_options, self.refine_options, self.update_options, *(o for _, o in self.sources))

    def options_of(self, source: Source) -> Options:
        for s, opts in self.sources:
            if s.name == source.name:
                return opts
        return source.options.build({})

    def option_names(self) -> set[str]:
        return {sp.name for g in self.stages for sp in g.specs()}

    def memory_hints(self) -> list[str]:
        """Options of this run that lower peak memory (suggested when it runs out)."""
        return list(dict.fromkeys(sp.memory_hint for g in self.stages for sp in g.specs() if sp.memory_hint))

    def describe(self) -> dict[str, Any]:
        """Resolved options of every component (the report's record of what ran)."""
        return {"method": {"name": self.method.name, **self.method_options.as_dict()},
                "refine": {"name": self.refine.name, **self.refine_options.as_dict()},
                "update": {"name": self.update.name, **self.update_options.as_dict()},
                "statistics": {s.name: {"scope": s.scope.value, **o.as_dict()} for s, o in self.sources}}

    def recipe(self) -> dict[str, Any]:
        """The result-changing options of every stage (cache identities of block-scope statistics)."""
        return {"method": self.method.name, "method_options": self.method_options.identity(),
                "refine": self.refine.name, "refine_options": self.refine_options.identity(),
                "update": self.update.name, "update_options": self.update_options.identity()}


def resolve(method: str, update: str = "none", values: Mapping[str, Any] | None = None,
            strict: bool = True, refine: str | None = None) -> Components:
    """Typed components for ``method``, ``refine`` (None: the method's default) and ``update`` from flat option
    ``values``."""
    values = dict(values or {})
    check_known(values)
    m, u = get_method(method), get_update(update)
    method_options = m.options.build(values)
    r = get_refine(refine if refine is not None else m.default_refine(method_options))
    if m.updates_weights and u.name != "none":
        raise UserError(f"--method {m.name} updates weights itself; drop --update {u.name}")
    if m.updates_weights and r.name != "none":
        raise UserError(f"--method {m.name} chooses its mask itself; drop --refine {r.name}")
    if m.whole_model(method_options) is not None and (r.name, u.name) != ("none", "none"):
        raise UserError(f"--method {m.name} with these options prunes the whole model at once (no per-layer "
                        f"stages); drop --refine/--update")
    refine_options, update_options = r.options.build(values), u.options.build(values)
    needs = m.needs(method_options) | r.needs | u.needs
    made = Components(m, method_options, r, refine_options, u, update_options,
                      tuple((s, s.options.build(values)) for s in sources_for(needs)))
    if strict:
        check_applies(values, [made])
    return made


def check_applies(values: Iterable[str], runs: list[Components]) -> None:
    """Every given option is used by at least one of ``runs`` (else: which methods would use it)."""
    used = set().union(*(c.option_names() for c in runs))
    for name in values:
        if name not in used:
            methods = ", ".join(sorted({c.method.name for c in runs}))
            users = ", ".join(all_options()[name].used_by)
            raise UserError(f"{_flag(name)} does not apply to --method {methods} (it is an option of {users})")
