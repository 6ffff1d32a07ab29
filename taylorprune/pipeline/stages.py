"""The one registry of stage kinds: what a run can do besides its method's score, each declared once.

A ``StageKind`` is a flag (``--refine``) whose value picks a choice from the kind's registry (``prune.refine
.REFINES``), the choice that means "off", the default, its scope (``linear``: for each pruned linear after its
mask; ``block``: for each block after its linears; ``model``: once over the model before the engine; ``after``:
once after the pruning phases), which pruning it belongs to (unstructured masks, structure removal, or any), how
the phase that runs it calls a choice (``step``), and when a method excludes it. A linear kind also says whether
it works without masks (``needs_masks``), whether it runs on a solver's output (``final``: last, on the linear's
final weight, after a solver, the other linear stages or a fallback; a linear kind that is neither refused nor
final is refused for solvers, never silently skipped), which other kinds it excludes, what it adds to the output
(``stores``: a grid the output format must hold), its checks before loading (``check``: a grid without an exact 0
is refused with masks) and on the loaded model (``prepare``), and its record over all linears (``report``). The
CLI flags and help, ``--option`` ownership, sweep ``--variants``, the report's record of what ran, cache recipes
and every refusal are derived from these declarations.

Adding a stage kind is one registry of choices (in ``prune/``, or its own package as ``quantize/``) plus one
``StageKind`` line in ``STAGE_KINDS``; adding a choice to a kind is one entry in its registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from taylorprune.errors import UserError
from taylorprune.options import Options
from taylorprune.prune.allocation import ALLOCATIONS
from taylorprune.prune.recon import RECONS
from taylorprune.prune.refine import REFINES
from taylorprune.prune.structures import STRUCTURES, parse_structures
from taylorprune.prune.update import UPDATES
from taylorprune.quantize.grid import require_zero
from taylorprune.quantize.stage import QUANTIZERS, check_targets, plan_budget, summarize
from taylorprune.recover.registry import RECOVERS
from taylorprune.scoring.spec import Method
from taylorprune.stats.registry import source_of

SCOPES = ("linear", "block", "model", "after")  # per linear, per block, over the model first, after the pruning
UNSTRUCTURED, STRUCTURED, ANY = "unstructured", "structured", "any"  # which pruning phase a stage belongs to

# (method, its options, the chosen value) -> why the method excludes the stage, or None
Refusal = Callable[[Method, Options, str], str | None]


def _never(method: Method, options: Options, value: str) -> str | None:
    return None


@dataclass(frozen=True)
class StageKind:
    """One kind of stage; a method may bring its own value for a kind the run does not give (``Method.stages``)."""

    name: str
    summary: str
    registry: Mapping[str, Any]
    off: str | None
    default: str | None  # when neither the run nor the method (``Method.stages``) gives a value
    scope: str
    applies: str
    step: Callable[..., Any] | None = None  # how the phase running this scope calls a choice (see below)
    refuse: Refusal = _never
    several: bool = False  # a comma-separated list of choices (--structure heads,neurons)
    note: str = ""  # said after the choices in the flag's help
    method_default: bool = False  # some methods bring their own value (said in the help)
    needs_masks: bool = True  # unstructured kinds: refused without --sparsity/--pattern (False: runs without)
    final: bool = False  # linear kinds: runs last on the linear's final weight, a solver's output included
    excludes: tuple[str, ...] = ()  # kinds that cannot run with this one (said with ``note``)
    stores: Callable[[Stage], Any] | None = None  # what the output must hold for this stage (a grid), or None
    check: Callable[[Stage, Any], None] | None = None  # checks against the run's pattern (None: no masks), unloaded
    # checks on the loaded model's targets, before heavy work (skipping the named linears, whose input widths a
    # structured phase changes first; they are checked again on the compact model)
    prepare: Callable[[Stage, Any, frozenset[str]], None] | None = None
    report: Callable[[Stage, list[dict]], dict] | None = None  # the run's record of this stage, over the linears
    # linear kinds: a plan on the dense model before the engine (model context, dense model-scope statistics, the
    # options of a statistic source) -> ({target path: what the step gets as work.assigned}, the run's record)
    plan: Callable[[Stage, Any, Mapping, Callable], tuple[dict, dict]] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    def choices(self) -> list[str]:
        """The values that turn the stage on (sweep variants)."""
        return [n for n in self.registry if n != self.off]

    def parse(self, value: str | None) -> tuple[str, ...]:
        """The chosen names of a given value (several for a list kind); unknown names are one-line errors."""
        if value is None or value == self.off:
            return ()
        if self.several:
            return parse_structures(value)
        if value not in self.registry:
            raise UserError(f"{self.flag} {value}: choose one of {', '.join(self.registry)}")
        return (value,)

    def help(self) -> str:
        entries = "; ".join(f"{c.name} ({c.summary})" for c in self.registry.values())
        default = f" [default: the method's own, else {self.default}]" if self.method_default else ""
        return f"{self.summary}: {entries}{default}." + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class Stage:
    """A chosen stage of a run: its kind, the registry entry and that entry's options."""

    kind: StageKind
    choice: Any
    options: Options

    @property
    def name(self) -> str:
        return self.choice.name

    @property
    def off(self) -> bool:
        return self.choice.name == self.kind.off

    @property
    def needs(self) -> frozenset[str]:
        needs = getattr(self.choice, "needs", frozenset())
        return frozenset(needs(self.options) if callable(needs) else needs)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.options.as_dict()}


# ---------------------------------------------------------------------------------------- how scopes call choices
# linear: step(stage, work) with work.weight (fp32 dense), .keep, .pattern, .stats, .path, .new, .record
def _refine_step(stage: Stage, work) -> None:
    work.keep, info = stage.choice.apply(work.weight, work.keep, work.pattern, work.stats, stage.options)
    if info:
        work.record[stage.kind.name] = info


def _update_step(stage: Stage, work) -> None:
    work.new = stage.choice.apply(work.weight, work.keep, work.pattern, work.stats, stage.options, work.path)


# block: step(stage, runner, block index, inputs, goal outputs, linears, seed, first block of the fit, what the fit
# trains: None for the weights under their masks) -> what the report records
def _recon_step(stage: Stage, runner, i: int, inputs, goal, linears, seed: int, first: int | None = None,
                trainer=None) -> dict:
    return stage.choice.apply(runner, i, inputs, goal, linears, stage.options, seed, first=first, trainer=trainer)


# model (unstructured): step(stage, layout, dense statistics, pattern) -> ({target path: pattern}, report info)
def _allocation_step(stage: Stage, layout, stats, pattern):
    return stage.choice.allocate(layout, stats, pattern, stage.options)


# linear, final: step(stage, work) with work.current (the linear's weight so far), .keep (None: no masks), .dtype,
# .assigned (the plan's grid for this linear, or None); sets work.new, work.quantized (what the writer keeps) and
# the linear's record
def _quantize_step(stage: Stage, work) -> None:
    work.new, work.quantized, info = stage.choice.apply(work.current, work.keep, work.stats, stage.options,
                                                        work.path, work.dtype, work.assigned)
    work.record[stage.kind.name] = info


def _quantize_plan(stage: Stage, ctx, dense: Mapping, options_of: Callable) -> tuple[dict, dict]:
    return plan_budget(stage.choice, stage.options, ctx, dense, options_of(source_of("grad_sum")).grad_scale)


def _quantize_check(stage: Stage, pattern) -> None:
    if pattern is not None:
        require_zero(stage.options.spec())
        if getattr(stage.options, "bits_budget", None) is not None:
            raise UserError("--bits-budget places bits on the dense weights and does not go with --sparsity / "
                            "--pattern yet; quantize without masks, or drop --bits-budget")


def _solver_refuses(what: str) -> Refusal:
    def refuse(method: Method, options: Options, value: str) -> str | None:
        return f"--method {method.name} {what}" if method.updates_weights else None

    return refuse


ALLOCATION = StageKind("allocation", "How sparsity is split over the layers", ALLOCATIONS, "uniform", "uniform",
                       "model", UNSTRUCTURED, _allocation_step)
REFINE = StageKind("refine", "Mask refinement between masking and the update", REFINES, "none", "none", "linear",
                   UNSTRUCTURED, _refine_step, _solver_refuses("chooses its mask itself"), method_default=True)
UPDATE = StageKind("update", "Weight update after masking", UPDATES, "none", "none", "linear", UNSTRUCTURED,
                   _update_step, _solver_refuses("updates weights itself"))
QUANTIZE = StageKind("quantize", "Weight quantization of every target linear, last (weights only)", QUANTIZERS,
                     "none", "none", "linear", UNSTRUCTURED, _quantize_step, needs_masks=False, final=True,
                     note="After the mask and the other linear stages, or on a solver's output, masks kept; alone "
                     "(no --sparsity/--pattern) it quantizes without pruning. --recon block and --recover distill "
                     "then train on the grid (--quant-train): every weight stays on it, every masked one 0, and the "
                     "codes written follow the trained weights.",
                     stores=lambda stage: stage.choice.grid_kind(stage.options),
                     check=_quantize_check, plan=_quantize_plan,
                     prepare=lambda stage, layout, resized: check_targets(stage.options, layout, resized),
                     report=lambda stage, linears: {"method": stage.name, **stage.options.as_dict(),
                                                    **summarize(linears, "quantize")})
RECON = StageKind("recon", "Block stage after a block is pruned (its masks, or its structures when no masks follow)",
                  RECONS, "none", "none", "block", ANY, _recon_step)
STRUCTURE = StageKind("structure", "Structured pruning: remove", STRUCTURES, None, None, "model", STRUCTURED,
                      several=True, note="Comma-separated to combine. The output is a smaller dense model (tensors "
                      "and config.json shrink).")

RECOVER = StageKind("recover", "Recovery after pruning, before writing", RECOVERS, "none", "none", "after", ANY,
                    note="Trains the pruned model toward the dense one on calibration-source text; masks and "
                    "compact shapes stay.")

# the order they run in
STAGE_KINDS: tuple[StageKind, ...] = (STRUCTURE, ALLOCATION, REFINE, UPDATE, QUANTIZE, RECON, RECOVER)
KINDS: dict[str, StageKind] = {k.name: k for k in STAGE_KINDS}


def variant_values() -> dict[str, tuple[str, str]]:
    """{choice: (kind, choice)} for every value that turns an unstructured stage on (``obs``: update obs), the
    tokens of sweep ``--variants``; a choice name shared by two kinds would be ambiguous there."""
    found: dict[str, tuple[str, str]] = {}
    for kind in STAGE_KINDS:
        if kind.applies == STRUCTURED:
            continue
        for name in kind.choices():
            if name in found:
                raise TypeError(f"stage value {name!r} is ambiguous ({found[name][0]} and {kind.name})")
            found[name] = (kind.name, name)
    return found
