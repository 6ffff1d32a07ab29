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
from taylorprune.prune.allocation import ALLOCATIONS, Allocation, get_allocation
from taylorprune.prune.recon import RECONS, Recon, get_recon
from taylorprune.prune.refine import REFINES, Refine, get_refine
from taylorprune.prune.structures import STRUCTURES, Structure
from taylorprune.prune.update import UPDATES, Update, get_update
from taylorprune.scoring.registry import METHODS, get_method
from taylorprune.scoring.spec import GroupScore, Method
from taylorprune.stats.registry import SOURCES, sources_for
from taylorprune.stats.source import Source

STAGES = {"allocation": ALLOCATIONS, "refine": REFINES, "update": UPDATES, "recon": RECONS, "structure": STRUCTURES}


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
    for stage, registry in STAGES.items():
        found += [f"--{stage} {x.name}" for x in registry.values() if name in {sp.name for sp in x.options.specs()}]
    return tuple(found)


@cache
def all_options() -> dict[str, OptionInfo]:
    """Every option any component declares, checked for consistency (one name, one meaning)."""
    groups = [(f"method {m.name}", m.options) for m in METHODS.values()]
    groups += [(f"{stage} {x.name}", x.options) for stage, registry in STAGES.items() for x in registry.values()]
    groups += [(f"statistic {s.name}", s.options) for s in SOURCES]
    return {name: OptionInfo(spec, _users(name)) for name, (spec, _) in merge_specs(groups).items()}


class StageConflict(UserError):
    """A stage that the method excludes (an update on a method that updates weights itself, ...)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_known(values: Mapping[str, Any]) -> None:
    known = all_options()
    unknown = [k for k in values if k not in known]
    if unknown:
        raise UserError(f"unknown option {unknown[0]} ({_flag(unknown[0])}); known options: {', '.join(sorted(known))}")


@dataclass(frozen=True)
class Components:
    """The stages of one run, each with its options: how sparsity is allocated over the linears, the method that
    scores (or solves), the mask refinement, the weight update, the block reconstruction, and the statistic
    sources they need."""

    method: Method
    method_options: Options
    refine: Refine
    refine_options: Options
    update: Update
    update_options: Options
    sources: tuple[tuple[Source, Options], ...]
    allocation: Allocation = ALLOCATIONS["uniform"]
    allocation_options: Options = ALLOCATIONS["uniform"].options()
    recon: Recon = RECONS["none"]
    recon_options: Options = RECONS["none"].options()
    structures: tuple[tuple[Structure, Options], ...] = ()  # --structure: what is removed, in processing order
    group: GroupScore | None = None  # the method's structured score (None: blocks only)

    @property
    def structured(self) -> bool:
        return bool(self.structures)

    @property
    def needs(self) -> frozenset[str]:
        if self.structured:
            return structured_needs(self.structures, self.group)
        return self.method.needs(self.method_options) | self.refine.needs | self.update.needs | self.allocation.needs

    def structure_options(self, name: str) -> Options | None:
        return next((o for s, o in self.structures if s.name == name), None)

    @property
    def stages(self) -> tuple[Options, ...]:
        return (self.method_options, self.refine_options, self.update_options, self.allocation_options,
                self.recon_options, *(o for _, o in self.structures), *(o for _, o in self.sources))

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
                "allocation": {"name": self.allocation.name, **self.allocation_options.as_dict()},
                "refine": {"name": self.refine.name, **self.refine_options.as_dict()},
                "update": {"name": self.update.name, **self.update_options.as_dict()},
                "recon": {"name": self.recon.name, **self.recon_options.as_dict()},
                "structures": {s.name: o.as_dict() for s, o in self.structures},
                "statistics": {s.name: {"scope": s.scope.value, **o.as_dict()} for s, o in self.sources}}

    def recipe(self) -> dict[str, Any]:
        """The result-changing options of every stage (cache identities of block-scope statistics)."""
        out = {"method": self.method.name, "method_options": self.method_options.identity()}
        for stage in ("allocation", "refine", "update", "recon"):
            out[stage] = getattr(self, stage).name
            out[f"{stage}_options"] = getattr(self, f"{stage}_options").identity()
        return out


def structured_needs(structures, group: GroupScore | None) -> frozenset[str]:
    """Statistics of a structured run: the group score's (width kinds only) and each structure stage's."""
    needs = frozenset().union(*(s.needs(o) for s, o in structures))
    widths = any(s.name != "blocks" for s, _ in structures)
    return needs | (group.statistics if group is not None and widths else frozenset())


def _structured(m: Method, method_options: Options, names: tuple[str, ...], values: Mapping[str, Any],
                stages: tuple[str | None, str, str, str]) -> tuple[tuple[tuple[Structure, Options], ...],
                                                                   GroupScore | None]:
    """The structure stages and the method's group score; unstructured stages are refused."""
    refine, update, allocation, recon = stages
    for flag, given, default in (("--refine", refine, "none"), ("--update", update, "none"),
                                 ("--allocation", allocation, "uniform"), ("--recon", recon, "none")):
        if given not in (default, None):
            raise StageConflict(f"{flag} {given} applies to unstructured pruning; drop it with --structure")
    structures = tuple((STRUCTURES[n], STRUCTURES[n].options.build(values)) for n in names)
    group = m.group_score(method_options)
    if group is None and any(n != "blocks" for n in names):
        having = ", ".join(sorted(x.name for x in METHODS.values() if x.structured is not None))
        raise UserError(f"--method {m.name} has no structured score with these options; for --structure "
                        f"{','.join(n for n in names if n != 'blocks')} choose one of {having} (see `taylorprune "
                        "methods NAME`)")
    return structures, group


def resolve(method: str, update: str = "none", values: Mapping[str, Any] | None = None,
            strict: bool = True, refine: str | None = None, allocation: str = "uniform",
            recon: str = "none", structures: tuple[str, ...] = ()) -> Components:
    """Typed components for ``method`` and its stages (``refine`` None: the method's default) from flat option
    ``values``; ``structures`` (``--structure``) makes it a structured run."""
    values = dict(values or {})
    check_known(values)
    m, u, a, c = get_method(method), get_update(update), get_allocation(allocation), get_recon(recon)
    method_options = m.options.build(values)
    if structures:
        chosen, group = _structured(m, method_options, structures, values, (refine, update, allocation, recon))
        needs = structured_needs(chosen, group)
        none = {k: x.options.build(values) for k, x in (("r", get_refine("none")), ("u", u), ("a", a), ("c", c))}
        made = Components(m, method_options, get_refine("none"), none["r"], u, none["u"],
                          tuple((s, s.options.build(values)) for s in sources_for(needs)), a, none["a"], c,
                          none["c"], chosen, group)
        if strict:
            check_applies(values, [made])
        return made
    r = get_refine(refine if refine is not None else m.default_refine(method_options))
    if m.updates_weights and u.name != "none":
        raise StageConflict(f"--method {m.name} updates weights itself; drop --update {u.name}")
    if m.updates_weights and r.name != "none":
        raise StageConflict(f"--method {m.name} chooses its mask itself; drop --refine {r.name}")
    if m.whole_model(method_options) is not None and (r.name, u.name, a.name, c.name) != (
            "none", "none", "uniform", "none"):
        raise StageConflict(f"--method {m.name} with these options prunes the whole model at once (one ranking "
                            "across layers, no per-layer stages); drop --refine/--update/--allocation/--recon")
    stage_options = {k: x.options.build(values) for k, x in (("r", r), ("u", u), ("a", a), ("c", c))}
    needs = m.needs(method_options) | r.needs | u.needs | a.needs
    made = Components(m, method_options, r, stage_options["r"], u, stage_options["u"],
                      tuple((s, s.options.build(values)) for s in sources_for(needs)), a, stage_options["a"], c,
                      stage_options["c"])
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
