"""``RunOptions`` (what the user asked for) checked and resolved into a ``Plan`` (what will run).

``validate`` resolves the components and the pattern, picks the phases the run needs, and runs every check
that needs no weights (each phase's own checks among them): components and their options, pattern, device,
dtype, calibration and evaluation inputs, output folder, free disk, and the model's config (sequence lengths,
the widths a structured run leaves). The phases then work from the plan alone, so nothing is parsed twice.
"""

from __future__ import annotations

import torch

from taylorprune.errors import UserError
from taylorprune.modeling import loading
from taylorprune.pipeline.components import Components, resolve
from taylorprune.pipeline.phases.calibration import Calibration
from taylorprune.pipeline.phases.evaluation import Evaluation
from taylorprune.pipeline.phases.load import Load
from taylorprune.pipeline.phases.structured import Structured, head_mode
from taylorprune.pipeline.phases.unstructured import Unstructured
from taylorprune.pipeline.phases.write import Write
from taylorprune.pipeline.run_options import RunOptions
from taylorprune.pipeline.state import Phase, Plan, StructuredPlan
from taylorprune.prune.masks import Pattern, parse_pattern
from taylorprune.prune.structures import Shape, check_config, parse_structures, removal_counts

LOAD, CALIBRATION, STRUCTURED, UNSTRUCTURED, EVALUATION, WRITE = (Load(), Calibration(), Structured(),
                                                                  Unstructured(), Evaluation(), Write())


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


def _structured(opts: RunOptions) -> tuple[str, ...]:
    """The structures asked for, and the checks of the options that go with them (config not needed)."""
    t = opts.target
    if opts.stages.get("structure") is None:
        if t.target_params is not None:
            raise UserError("--target-params applies to structured pruning; add --structure neurons|heads|blocks")
        return ()
    kinds = parse_structures(opts.stages["structure"])
    if t.pattern is not None:
        raise UserError("--pattern is for unstructured pruning; with --structure give --sparsity (the fraction of "
                        "each structure removed) or --target-params")
    if t.targets is not None:
        raise UserError("--targets does not apply with --structure (structures span several linears)")
    if (t.sparsity is None) == (t.target_params is None):
        raise UserError("with --structure give exactly one of --sparsity (fraction of each structure removed in "
                        "every block) and --target-params (fraction of all parameters to remove)")
    for flag, value in (("--sparsity", t.sparsity), ("--target-params", t.target_params)):
        if value is not None and not 0.0 < value < 1.0:
            raise UserError(f"{flag} {value}: must be between 0 and 1 (exclusive)")
    if t.target_params is not None and len(kinds) > 1:
        raise UserError("--target-params takes one --structure; combine structures with --sparsity")
    return kinds


def _structured_plan(kinds: tuple[str, ...], opts: RunOptions, parts: Components, config) -> StructuredPlan:
    t, mode = opts.target, head_mode(parts)
    counts = None
    if t.sparsity is not None:
        counts = removal_counts(kinds, t.sparsity, Shape.of(config), mode)
        check_config(config, counts, Shape.of(config), mode, f"--sparsity {t.sparsity:g}")
    return StructuredPlan(kinds, t.sparsity, t.target_params, counts)


def phases_of(structured: bool, evaluators) -> tuple[Phase, ...]:
    """The phases of a run, in order: each only when the run asks for it."""
    middle = (STRUCTURED,) if structured else (UNSTRUCTURED,)
    return (LOAD, CALIBRATION, *middle, *((EVALUATION,) if evaluators else ()), WRITE)


def validate(opts: RunOptions) -> Plan:
    """Everything that can be checked before loading weights; returns the plan the phases follow."""
    kinds = _structured(opts)
    parts = resolve(opts.target.method, opts.stages, opts.method_options)
    t = opts.target
    pattern = (Pattern(t.sparsity if t.sparsity is not None else t.target_params) if kinds
               else parse_pattern(t.sparsity, t.pattern, t.group))
    evaluators = tuple(opts.evaluators())
    device = resolve_device(opts.placement.device)
    dtype = loading.torch_dtype(opts.load.dtype)
    config = loading.load_config(opts.model, opts.load.trust_remote_code)
    seqlen = loading.resolve_seqlen(opts.calib.seqlen, config)
    structured = _structured_plan(kinds, opts, parts, config) if kinds else None
    plan = Plan(opts, parts, pattern, device, dtype, config, seqlen, structured, evaluators,
                phases_of(bool(kinds), evaluators))
    for phase in plan.phases:
        phase.check(plan)
    return plan
