"""The components of a run (a method, its stages, the statistic sources) with their typed options, resolved once.

Option values come in as one flat mapping (CLI flags, ``--option KEY=VALUE``, the Python API); each component
takes the names it declares. A name no component declares is an error listing the known ones; a name that
only components this run does not use declare is an error saying who uses it (``strict``), so a misspelt or
misplaced option never goes unnoticed. Stage values come in as {kind: value} (``--refine swap``); everything
about a kind (its default, what it applies to, which methods exclude it) is its ``StageKind``'s declaration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from taylorprune.errors import UserError
from taylorprune.options import Options, Spec, merge_specs
from taylorprune.pipeline.stages import ANY, KINDS, STAGE_KINDS, STRUCTURED, UNSTRUCTURED, Stage, StageKind
from taylorprune.prune.structures import Structure
from taylorprune.scoring.registry import METHODS, get_method
from taylorprune.scoring.spec import GroupScore, Method
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


def _declares(options: type[Options], name: str) -> bool:
    return name in {sp.name for sp in options.specs()}


def _users(name: str) -> tuple[str, ...]:
    """Methods (and stage values such as ``--update obs``) that take option ``name``, directly or through their
    statistics."""
    found = [m.name for m in METHODS.values()
             if any(_declares(g, name) for g in [m.options] + [s.options for s in sources_for(m.statistics)])]
    for kind in STAGE_KINDS:
        found += [f"{kind.flag} {x.name}" for x in kind.registry.values() if _declares(x.options, name)]
    return tuple(found)


@cache
def all_options() -> dict[str, OptionInfo]:
    """Every option any component declares, checked for consistency (one name, one meaning)."""
    groups = [(f"method {m.name}", m.options) for m in METHODS.values()]
    groups += [(f"{kind.name} {x.name}", x.options) for kind in STAGE_KINDS for x in kind.registry.values()]
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
    """A method with its options, the run's stages (every single-valued kind, off ones included, plus one stage
    per structure), the statistic sources they need, and the method's structured score."""

    method: Method
    method_options: Options
    stages: tuple[Stage, ...]
    sources: tuple[tuple[Source, Options], ...]
    group: GroupScore | None = None  # the method's structured score (None: blocks only)
    unstructured: bool = True  # the unstructured phase runs (after the structures, when there are any)
    masks: bool = True  # it masks weights with the method (False: only the stages that need no masks run there)

    def stage(self, kind: str) -> Stage | None:
        return next((s for s in self.stages if s.kind.name == kind), None)

    def active(self, scope: str, phase: str = UNSTRUCTURED) -> list[Stage]:
        """The stages that are on, of one scope, that a pruning phase runs (its own and those of any phase)."""
        return [s for s in self.stages if not s.off and s.kind.scope == scope and s.kind.applies in (phase, ANY)]

    @property
    def structures(self) -> tuple[tuple[Structure, Options], ...]:
        return tuple((s.choice, s.options) for s in self.stages if s.kind.applies == STRUCTURED)

    @property
    def structured(self) -> bool:
        return bool(self.structures)

    def structure_options(self, name: str) -> Options | None:
        return next((o for s, o in self.structures if s.name == name), None)

    @property
    def structured_needs(self) -> frozenset[str]:
        """Statistics of the structured phase (the group score's and the structure stages')."""
        return structured_needs(self.structures, self.group) if self.structured else frozenset()

    @property
    def unstructured_needs(self) -> frozenset[str]:
        """Statistics of the unstructured phase (the method's and its stages')."""
        if not self.unstructured:
            return frozenset()
        stages = frozenset().union(*(s.needs for s in self.stages if s.kind.applies in (UNSTRUCTURED, ANY)))
        return (self.method.needs(self.method_options) if self.masks else frozenset()) | stages

    @property
    def needs(self) -> frozenset[str]:
        return self.structured_needs | self.unstructured_needs

    @property
    def all_options(self) -> tuple[Options, ...]:
        return (self.method_options, *(s.options for s in self.stages), *(o for _, o in self.sources))

    def options_of(self, source: Source) -> Options:
        for s, opts in self.sources:
            if s.name == source.name:
                return opts
        return source.options.build({})

    def option_names(self) -> set[str]:
        return {sp.name for g in self.all_options for sp in g.specs()}

    def memory_hints(self) -> list[str]:
        """Options of this run that lower peak memory (suggested when it runs out)."""
        return list(dict.fromkeys(sp.memory_hint for g in self.all_options for sp in g.specs() if sp.memory_hint))

    def names(self) -> dict[str, str]:
        """{kind: chosen value} of the single-valued kinds (the report's summary of what ran)."""
        return {s.kind.name: s.name for s in self.stages if not s.kind.several}

    def describe(self) -> dict[str, Any]:
        """Resolved options of every component (the report's record of what ran)."""
        out: dict[str, Any] = {"method": {"name": self.method.name, **self.method_options.as_dict()}}
        out.update({s.kind.name: s.describe() for s in self.stages if not s.kind.several})
        out["structures"] = {s.name: o.as_dict() for s, o in self.structures}
        out["statistics"] = {s.name: {"scope": s.scope.value, **o.as_dict()} for s, o in self.sources}
        return out

    def recipe(self) -> dict[str, Any]:
        """The result-changing options of every stage (cache identities of block-scope statistics)."""
        out = {"method": self.method.name, "method_options": self.method_options.identity()}
        for s in self.stages:
            if s.kind.applies in (UNSTRUCTURED, ANY):
                out[s.kind.name] = s.name
                out[f"{s.kind.name}_options"] = s.options.identity()
        return out


def structured_needs(structures, group: GroupScore | None) -> frozenset[str]:
    """Statistics of a structured run: the group score's (width kinds only) and each structure stage's."""
    needs = frozenset().union(*(s.needs(o) for s, o in structures))
    widths = any(s.name != "blocks" for s, _ in structures)
    return needs | (group.statistics if group is not None and widths else frozenset())


def _value(kind: StageKind, given: str | None, m: Method, method_options: Options) -> str:
    if given is not None:
        return given
    own = m.default_stage(kind.name, method_options)
    return own if own is not None else kind.default


def _off_without(kind: StageKind, given: str | None, unstructured: bool, masks: bool) -> bool:
    """Whether an unstructured kind is off because the run has no unstructured phase or no masks (given: refused)."""
    if kind.applies != UNSTRUCTURED or (unstructured and (masks or not kind.needs_masks)):
        return False
    if given not in (None, kind.off):
        if not unstructured:
            raise StageConflict(f"{kind.flag} {given} applies to unstructured pruning; drop it with --structure, or "
                                "add --sparsity / --pattern to mask the weights the structures leave")
        raise StageConflict(f"{kind.flag} {given} works on masks; add --sparsity or --pattern (without them only "
                            "the stages that need no masks run, such as --quantize)")
    return True


def _refusal(kind: StageKind, m: Method, method_options: Options, value: str, masks: bool) -> str | None:
    """Why the method excludes this stage: its own declaration, or a solver that the linear kind would not follow."""
    if value == kind.off:
        return None
    reason = kind.refuse(m, method_options, value)
    if reason is None and masks and kind.scope == "linear" and m.updates_weights and not kind.final:
        reason = f"--method {m.name} chooses mask and weights itself, and {kind.flag} does not run after it"
    return reason


def _stages(m: Method, method_options: Options, given: Mapping[str, str | None], values: Mapping[str, Any],
            unstructured: bool, masks: bool = True) -> tuple[Stage, ...]:
    structures = KINDS["structure"].parse(given.get("structure"))
    stages = []
    for kind in STAGE_KINDS:
        if kind.several:
            names = structures if kind.applies == STRUCTURED else kind.parse(given.get(kind.name))
            stages += [Stage(kind, kind.registry[n], kind.registry[n].options.build(values)) for n in names]
            continue
        value = _value(kind, given.get(kind.name), m, method_options)
        if _off_without(kind, given.get(kind.name), unstructured, masks):
            value = kind.off
        kind.parse(value)
        reason = _refusal(kind, m, method_options, value, masks)
        if reason:
            raise StageConflict(f"{reason}; drop {kind.flag} {value}")
        stages.append(Stage(kind, kind.registry[value], kind.registry[value].options.build(values)))
    _check_excludes(stages)
    return tuple(stages)


def _check_excludes(stages: list[Stage]) -> None:
    on = {s.kind.name: s for s in stages if not s.off}
    for stage in on.values():
        clash = next((on[k] for k in stage.kind.excludes if k in on), None)
        if clash is not None:
            raise StageConflict(f"{stage.kind.flag} {stage.name} and {clash.kind.flag} {clash.name} do not go "
                                f"together ({clash.kind.flag} would change the weights {stage.kind.flag} set); "
                                "drop one")


def _group(m: Method, method_options: Options, stages: tuple[Stage, ...]) -> GroupScore | None:
    widths = [s.name for s in stages if s.kind.applies == STRUCTURED and s.name != "blocks"]
    if not any(s.kind.applies == STRUCTURED for s in stages):
        return None
    group = m.group_score(method_options)
    if group is None and widths:
        having = ", ".join(sorted(x.name for x in METHODS.values() if x.structured is not None))
        raise UserError(f"--method {m.name} has no structured score with these options; for --structure "
                        f"{','.join(widths)} choose one of {having} (see `taylorprune methods NAME`)")
    return group


def _check_whole_model(m: Method, method_options: Options, stages: tuple[Stage, ...], unstructured: bool) -> None:
    if not unstructured or m.whole_model(method_options) is None:  # (``unstructured``: masks by the method)
        return
    on = [s for s in stages if s.kind.applies == UNSTRUCTURED and not s.off]
    if on:
        flags = "/".join(k.flag for k in STAGE_KINDS if k.applies == UNSTRUCTURED)
        raise StageConflict(f"--method {m.name} with these options prunes the whole model at once (one ranking "
                            f"across layers, no per-layer stages); drop {flags}")


def resolve(method: str, stages: Mapping[str, str | None] | None = None, values: Mapping[str, Any] | None = None,
            strict: bool = True, unstructured: bool | None = None, masks: bool = True) -> Components:
    """Typed components for ``method`` and the given stage values ({kind: value}; a kind not given takes the
    method's own value, else its default) from flat option ``values``. A ``structure`` makes it a structured run;
    ``unstructured`` says whether the unstructured phase runs (default: only without structures), ``masks``
    whether the method masks weights there (False: only stages that need no masks, ``--quantize`` alone)."""
    values = dict(values or {})
    check_known(values)
    stages = dict(stages or {})
    if unstructured is None:
        unstructured = not KINDS["structure"].parse(stages.get("structure"))
    m = get_method(method)
    method_options = m.options.build(values)
    chosen = _stages(m, method_options, stages, values, unstructured, masks)
    _check_whole_model(m, method_options, chosen, unstructured and masks)
    group = _group(m, method_options, chosen)
    partial = Components(m, method_options, chosen, (), group, unstructured, masks)
    sources = tuple((s, s.options.build(values)) for s in sources_for(partial.needs))
    made = Components(m, method_options, chosen, sources, group, unstructured, masks)
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
