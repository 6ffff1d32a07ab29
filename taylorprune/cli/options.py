"""CLI options: those shared by several commands (run, sweep, eval, check), declared once as annotated types,
and the component options (``--alpha``, ``--percdamp``...) generated from the methods', statistics' and
updates' own declarations.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from taylorprune.calib.sampling import SAMPLINGS
from taylorprune.calib.text import CALIB_SOURCES, EVAL_DATASETS
from taylorprune.prune.allocation import ALLOCATIONS
from taylorprune.prune.recon import RECONS
from taylorprune.prune.refine import REFINES
from taylorprune.prune.structures import STRUCTURES
from taylorprune.prune.update import UPDATES

Model = Annotated[str, typer.Option(help="HF folder, hub id, .gguf file, or 'demo' (bundled stories260K).")]
Group = Annotated[str, typer.Option(help="Unstructured comparison group: row (Wanda) or layer.")]
Targets = Annotated[str | None, typer.Option(help="Regex on module paths selecting the linears to prune.")]
Calib = Annotated[str, typer.Option(help=f"Calibration data set: {', '.join(CALIB_SOURCES)}.")]
CalibFile = Annotated[str | None, typer.Option(help="Calibration text file (.txt, or .jsonl with 'text').")]
NSamples = Annotated[int, typer.Option(help="Number of calibration windows.")]
SeqLen = Annotated[int | None, typer.Option(help="Calibration tokens per window [default: min(2048, max positions)].")]
Seed = Annotated[int, typer.Option(help="Seed of the calibration sampler.")]
CalibSampling = Annotated[str, typer.Option(help=f"Window sampler: {', '.join(SAMPLINGS)}.")]
BatchSize = Annotated[int, typer.Option(help="Windows per forward while calibrating.")]
DType = Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")]
Device = Annotated[str, typer.Option(help="Compute device: auto, cpu, cuda, cuda:1, ...")]
Stream = Annotated[bool, typer.Option(
    "--stream", help="Keep the model in CPU memory and bring one decoder block at a time to the device, for every "
    "pass (statistics, pruning, evaluation), on any device (default: only when the model does not fit).")]
MaxGpuMemory = Annotated[float | None, typer.Option(
    help="GiB of device memory this run may use: the model stays on the GPU when it fits under this (with its "
    "working set), else it streams; also caps PyTorch's CUDA allocator (default: the free memory).")]
StreamBatch = Annotated[int, typer.Option(
    help="Calibration or evaluation windows per block-by-block sweep: each block visits the device once per sweep "
    "(more: fewer transfers, more memory for stored block inputs).")]
Overwrite = Annotated[bool, typer.Option(help="Replace an existing output.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Allow model code from the checkpoint (off: never run it).")]
EvalDataset = Annotated[str, typer.Option(help=f"Eval data set: {', '.join(EVAL_DATASETS)}.")]
EvalTextFile = Annotated[str | None, typer.Option(help="Evaluate on this text file instead.")]
EvalSeqLen = Annotated[int | None, typer.Option(help="Eval window length [default: min(2048, max positions)].")]
MaxWindows = Annotated[int | None, typer.Option(help="Evaluate at most this many windows.")]
Refine = Annotated[str | None, typer.Option(help="Mask refinement between masking and the update: " + "; ".join(
    f"{r.name} ({r.summary})" for r in REFINES.values()) + " [default: the method's own, else none].")]
Update = Annotated[str, typer.Option(help="Weight update after masking: " + "; ".join(
    f"{u.name} ({u.summary})" for u in UPDATES.values()) + ".")]
Allocation = Annotated[str, typer.Option(help="How sparsity is split over the layers: " + "; ".join(
    f"{a.name} ({a.summary})" for a in ALLOCATIONS.values()) + ".")]
Recon = Annotated[str, typer.Option(help="Block stage after the linears of a block are pruned: " + "; ".join(
    f"{r.name} ({r.summary})" for r in RECONS.values()) + ".")]
Structure = Annotated[str | None, typer.Option(help="Structured pruning: remove " + "; ".join(
    f"{s.name} ({s.summary})" for s in STRUCTURES.values()) + ", comma-separated to combine. The output is a smaller "
    "dense model (tensors and config.json shrink).")]
MethodOption = Annotated[list[str] | None, typer.Option(
    help="Component option as KEY=VALUE (repeatable), e.g. alpha=0.5; same names as the flags below.")]

PANEL = "Method, statistic and update options"


def _parameter(name: str) -> inspect.Parameter:
    from taylorprune.pipeline.components import all_options

    info = all_options()[name]
    spec = info.spec
    decls = [f"{spec.flag}/--no-{spec.flag[2:]}"] if spec.kind is bool else [spec.flag]
    help_text = info.help + (f" Choices: {', '.join(spec.choices)}." if spec.choices else "")
    default = typer.Option(None, *decls, help=help_text, show_default=spec.shown_default(), rich_help_panel=PANEL)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=spec.kind | None)


def with_component_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command one flag per component option; ``fn`` receives the given ones as ``component_options``.

    Flags default to "not given" (None), so only options the user set are passed on, where they are checked
    against the method that runs (an option of another method is an error, not silently ignored).
    """
    from taylorprune.pipeline.components import all_options

    own = inspect.signature(fn, eval_str=True)
    kept = [p for p in own.parameters.values() if p.name != "component_options"]
    generated = [_parameter(name) for name in sorted(all_options())]
    clash = {p.name for p in kept} & {p.name for p in generated}
    if clash:
        raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} clash with component options")

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {p.name: kwargs.pop(p.name) for p in generated}
        return fn(**kwargs, component_options={k: v for k, v in given.items() if v is not None})

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept] + generated
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must see the generated signature, not fn's
    return command


def component_values(flags: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    """Component options from their flags and ``--option KEY=VALUE`` items (the same key twice is an error)."""
    from taylorprune.errors import UserError
    from taylorprune.options import parse_assignments

    extra = parse_assignments(assignments or [])
    both = sorted(set(flags) & set(extra))
    if both:
        raise UserError(f"--{both[0].replace('_', '-')} given both as a flag and as --option; keep one")
    return {**flags, **extra}
