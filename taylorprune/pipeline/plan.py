"""``RunOptions`` (what the user asked for) checked and resolved into a ``Plan`` (what will run).

``validate`` resolves the components and the pattern, settles the run's facts (its declared kind and what it asks
for, ``RunFacts``), keeps the phases of the one ordered registry ``PHASES`` that declare they are wanted, and runs
every check that needs no weights (each phase's own checks among them): components and their options, pattern,
device, dtype, calibration and evaluation inputs, output folder, free disk, and the model's config (sequence
lengths, the widths a structured run leaves). The phases then work from the plan alone, so nothing is parsed twice.
"""

from __future__ import annotations

import torch

from taylorprune import distributed
from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.pipeline.components import Components, resolve
from taylorprune.pipeline.phases.calibration import Calibration
from taylorprune.pipeline.phases.evaluation import Evaluation
from taylorprune.pipeline.phases.load import Load
from taylorprune.pipeline.phases.recover import Recover
from taylorprune.pipeline.phases.structured import Structured, head_mode
from taylorprune.pipeline.phases.unstructured import Unstructured
from taylorprune.pipeline.phases.write import Write
from taylorprune.pipeline.run_options import RunKind, RunOptions
from taylorprune.pipeline.stages import KINDS, STAGE_KINDS
from taylorprune.pipeline.stages import UNSTRUCTURED as MASKING
from taylorprune.pipeline.state import Phase, Plan, RunFacts, StructuredPlan
from taylorprune.prune.masks import parse_pattern
from taylorprune.prune.structures import Shape, check_config, removal_counts

# Every phase, in run order: a run has those that declare they are wanted (``Phase.wanted``). A new phase is
# one line here.
PHASES: tuple[Phase, ...] = (
    Load(),
    Calibration(),
    Structured(),
    Unstructured(),
    Recover(),
    Evaluation(),
    Write(),
)
WRITE = next(p for p in PHASES if isinstance(p, Write))  # what ``pipeline.write`` runs on a pruned state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


AMOUNT = ("structure_ratio", "target_params", "width_multiple")


def _no_structures(opts: RunOptions) -> None:
    for name in AMOUNT:
        if name in opts.method_options:
            raise UserError(f"--{name.replace('_', '-')} applies to structured pruning; add --structure "
                            "neurons|heads|blocks")


def _amount(parts: Components) -> tuple[float | None, float | None]:
    """(structure ratio, parameter target) of the structure stages (every structure takes the same two)."""
    options = parts.structures[0][1]
    return options.structure_ratio, options.target_params


def _check_structured(opts: RunOptions, kinds: tuple[str, ...], parts: Components) -> None:
    """The structure stage's amount, and what does not go with structures (config not needed)."""
    t = opts.target
    ratio, target = _amount(parts)
    if t.targets is not None:
        raise UserError("--targets does not apply with --structure (structures span several linears)")
    if ratio is None and target is None:
        if t.sparsity is not None and t.pattern is None:
            raise UserError(f"--structure {','.join(kinds)} --sparsity {t.sparsity:g}: the fraction of each structure "
                            f"removed is --structure-ratio {t.sparsity:g} (--sparsity is the unstructured sparsity "
                            "pruned after the structures, e.g. --structure neurons --structure-ratio 0.2 --pattern "
                            "2:4)")
        raise UserError("with --structure give --structure-ratio R (fraction of each structure removed in every "
                        "block) or --target-params P (fraction of all parameters to remove)")
    if ratio is not None and target is not None:
        raise UserError("give one of --structure-ratio and --target-params, not both")
    if target is not None and len(kinds) > 1:
        raise UserError("--target-params takes one --structure; combine structures with --structure-ratio")


def _structured_plan(kinds: tuple[str, ...], parts: Components, config) -> StructuredPlan:
    ratio, target = _amount(parts)
    mode, counts = head_mode(parts), None
    if ratio is not None:
        counts = removal_counts(kinds, ratio, Shape.of(config), mode)
        check_config(config, counts, Shape.of(config), mode, f"--structure-ratio {ratio:g}")
    return StructuredPlan(kinds, ratio, target, counts)


def derive_phases(facts: RunFacts) -> tuple[Phase, ...]:
    """The phases of a run with ``facts``, in registry order: those that declare they are wanted."""
    return tuple(phase for phase in PHASES if phase.wanted(facts))


def _recovers(opts: RunOptions) -> bool:
    return KINDS["recover"].parse(opts.stages.get("recover")) != ()


def _maskless(opts: RunOptions) -> bool:
    """A stage that works without masks is on (``--quantize`` alone): the unstructured phase runs without them."""
    return any(k.applies == MASKING and not k.needs_masks and k.parse(opts.stages.get(k.name))
               for k in STAGE_KINDS)


def _check_kind(opts: RunOptions, prunes: bool) -> None:
    """What the declared kind of run does not do: an export writes the model as it is, a recovery trains it as it
    is (both from their commands, which offer no pruning flags: this guards the Python API)."""
    if opts.kind == RunKind.EXPORT and (prunes or _recovers(opts)):
        raise UserError("export writes the model as it is; prune, quantize or recover with `taylorprune run`")
    if opts.kind == RunKind.RECOVER and (prunes or not _recovers(opts)):
        raise UserError("recover trains the model as it is (--recover distill); prune or quantize with "
                        "`taylorprune run`")


def validate(opts: RunOptions, convert: bool = False) -> Plan:
    """Everything that can be checked before loading weights; returns the plan the phases follow. ``convert``:
    the former spelling of ``kind=export`` (the model written as it is: load, evaluate if asked, write)."""
    if convert and opts.kind != RunKind.EXPORT:
        opts = opts.replace(kind=RunKind.EXPORT)
    kinds = KINDS["structure"].parse(opts.stages.get("structure"))
    t = opts.target
    if not kinds:
        _no_structures(opts)
    masks = t.sparsity is not None or t.pattern is not None
    maskless = not masks and _maskless(opts)
    _check_kind(opts, bool(kinds) or masks or maskless)
    unstructured = (not kinds or masks or maskless) and opts.kind == RunKind.RUN
    parts = resolve(t.method, opts.stages, opts.method_options, unstructured=unstructured, masks=not maskless)
    if kinds:
        _check_structured(opts, kinds, parts)
    if maskless and opts.write.save_scores:
        raise UserError("--save-scores writes the method's scores; add --sparsity or --pattern (without them no "
                        "method scores the weights)")
    pattern = parse_pattern(t.sparsity, t.pattern, t.group) if unstructured and not maskless else None
    evaluators = tuple(opts.evaluators())
    device = resolve_device(opts.placement.device)
    dtype = loading.torch_dtype(opts.load.dtype)
    config = loading.load_config(opts.model, opts.load.trust_remote_code)
    seqlen = loading.resolve_seqlen(opts.calib.seqlen, config)
    structured = _structured_plan(kinds, parts, config) if kinds else None
    facts = RunFacts(opts.kind, structured=bool(kinds), unstructured=unstructured, recovers=_recovers(opts),
                     evaluators=bool(evaluators))
    phases = derive_phases(facts)
    plan = Plan(opts, parts, pattern, device, dtype, config, seqlen, structured, evaluators, phases)
    for phase in plan.phases:
        phase.check(plan)
    _check_data_parallel(plan)
    return plan


def _check_data_parallel(plan: Plan) -> None:
    """What a data-parallel run (several processes) cannot do yet, refused before any weight is loaded."""
    world = distributed.world()
    if not world.active:
        return
    parts = plan.parts
    refused = []
    if plan.pattern is not None and plan.whole_model is not None:
        refused.append(f"--method {parts.method.name} with these options (a whole-model procedure)")
    if plan.structured is not None and parts.group is not None and parts.group.select is not None:
        refused.append(f"--method {parts.method.name}'s structure selection (a whole-model procedure)")
    if refused:
        raise UserError(f"{'; '.join(refused)}: not data-parallel yet; run it in one process")
    if plan.calibrated and plan.opts.calib.nsamples < world.size:
        raise UserError(f"--nsamples {plan.opts.calib.nsamples}: fewer calibration windows than the {world.size} "
                        "processes; each takes a share of them")
