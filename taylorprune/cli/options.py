"""CLI flags generated from declarations: run option groups (``pipeline.run_options`` and every evaluator's
options), stage kinds (``pipeline.stages``), and component options (methods', statistics' and stages' own).

A command declares only what is its own; ``with_run_options`` adds one flag per option of the groups it names and
hands the given values on as one flat mapping (``run_values``), ``with_component_options`` adds the component
flags (``--alpha``, ``--percdamp``...) and hands on only those the user set (``component_options``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import typer
from rich.markup import escape

from taylorprune.errors import UserError
from taylorprune.export.formats import format_groups
from taylorprune.options import Options, Spec, parse_assignments
from taylorprune.pipeline.components import all_options
from taylorprune.pipeline.run_options import GROUPS_OF_RUN, option_groups
from taylorprune.pipeline.stages import KINDS, STAGE_KINDS


def _help(group: str, name: str) -> str:
    """The declared help of a run option, for the hand-written commands that take the same option."""
    return escape(next(s.help for s in GROUPS_OF_RUN[group].specs() if s.name == name))


# the same options in commands whose flags are written out (eval, speed, check)
Model = Annotated[str, typer.Option(help=_help("load", "model"))]
DType = Annotated[str, typer.Option(help=_help("load", "dtype"))]
Device = Annotated[str, typer.Option(help=_help("placement", "device"))]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=_help("load", "trust_remote_code"))]
Stream = Annotated[bool, typer.Option("--stream", help=_help("placement", "stream"))]
MaxGpuMemory = Annotated[float | None, typer.Option(help=_help("placement", "max_gpu_memory"))]
StreamBatch = Annotated[int, typer.Option(help=_help("placement", "stream_batch"))]
DeviceMap = Annotated[str | None, typer.Option(help=_help("load", "device_map"))]

MethodOption = Annotated[list[str] | None, typer.Option(
    help="Component option as KEY=VALUE (repeatable), e.g. alpha=0.5; same names as the flags below.")]

PANEL = "Method, statistic and update options"
PANELS = {"load": "Model", "calib": "Calibration", "generate": "Calibration: generated text", "placement": "Placement",
          "target": "Pruning", "write": "Output"}


def _flags(spec: Spec) -> list[str]:
    if spec.kind is bool:
        return [f"{spec.flag}/--no-{spec.flag[2:]}"] if spec.default else [spec.flag]
    return [spec.flag]


def _parameter(name: str, spec: Spec, help_text: str, default: Any, shown: str | bool, panel: str
               ) -> inspect.Parameter:
    choices = f" Choices: {', '.join(spec.choices)}." if spec.choices and spec.kind is not bool else ""
    option = typer.Option(default, *_flags(spec), help=escape(help_text + choices), show_default=shown,
                          rich_help_panel=panel)
    kind = spec.kind if default is ... or (spec.kind is bool and default is not None) else spec.kind | None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def _generated(fn: Callable[..., Any], receiver: str, generated: list[inspect.Parameter],
               collect: Callable[[dict[str, Any]], Any]) -> Callable[..., Any]:
    """``fn`` with ``generated`` keyword parameters; their values reach it as ``receiver=collect(values)``."""
    own = inspect.signature(fn, eval_str=True)
    kept = [p for p in own.parameters.values() if p.name != receiver]
    clash = {p.name for p in kept} & {p.name for p in generated}
    if clash:
        raise TypeError(f"{fn.__name__}: parameters {sorted(clash)} clash with generated options")
    names = [p.name for p in generated]

    @functools.wraps(fn)
    def command(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in names}
        return fn(**kwargs, **{receiver: collect(given)})

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in kept] + generated
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    del command.__wrapped__  # typer must see the generated signature, not fn's
    return command


def group_parameters(groups: Iterable[str | type[Options]], exclude: Iterable[str] = (), stages: bool = True,
                     defaults: dict[str, Any] | None = None) -> list[inspect.Parameter]:
    """One parameter per option of the named run groups (and evaluator groups) or of an ``Options`` class a command
    takes beside them (``RuntimeOptions``: panel named after the class), and per stage kind."""
    declared = option_groups()
    skip, defaults = set(exclude), defaults or {}
    params = []
    if "write" in groups:  # a command that writes takes every output format's own flags
        groups = (*groups, *(g for g in format_groups() if g not in groups))
    for group in groups:
        if isinstance(group, type):
            cls, panel = group, group.__name__.removesuffix("Options")
        else:
            cls = declared[group]
            panel = PANELS.get(group, f"Output format: {group}" if group in format_groups() else f"Evaluation: {group}")
        for spec in cls.specs():
            if spec.name in skip:
                continue
            default = defaults.get(spec.name, ... if spec.required else spec.default)
            params.append(_parameter(spec.name, spec, spec.help, default, default is not None, panel))
    for kind in STAGE_KINDS if stages else ():
        if kind.name not in skip:
            spec = Spec(None, kind.help(), name=kind.name, kind=str, optional=True)
            params.append(_parameter(kind.name, spec, kind.help(), None, kind.default or False, "Stages"))
    return params


def with_run_options(*groups: str | type[Options], exclude: Iterable[str] = (), stages: bool = True,
                     defaults: dict[str, Any] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the flags of run option ``groups`` (and the stage kinds); ``fn`` receives ``run_values``."""
    if not groups:
        groups = tuple(option_groups())

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = group_parameters(groups, exclude, stages, defaults)
        return _generated(fn, "run_values", params, lambda given: given)

    return decorate


def with_component_options(fn: Callable[..., Any], kind: str | None = None) -> Callable[..., Any]:
    """Give a command one flag per component option (``kind``: only those of that stage kind's choices); ``fn``
    receives the given ones as ``component_options``.

    Flags default to "not given" (None), so only options the user set are passed on, where they are checked
    against the method that runs (an option of another method is an error, not silently ignored).
    """
    own = None if kind is None else {s.name for c in KINDS[kind].registry.values() for s in c.options.specs()}
    params = []
    for name, info in sorted(all_options().items()):
        if own is None or name in own:
            params.append(_parameter(name, info.spec, info.help, None, info.spec.shown_default(), PANEL))
    return _generated(fn, "component_options", params, lambda given: {k: v for k, v in given.items() if v is not None})


def component_values(flags: dict[str, Any], assignments: list[str] | None) -> dict[str, Any]:
    """Component options from their flags and ``--option KEY=VALUE`` items (the same key twice is an error)."""
    extra = parse_assignments(assignments or [])
    both = sorted(set(flags) & set(extra))
    if both:
        raise UserError(f"--{both[0].replace('_', '-')} given both as a flag and as --option; keep one")
    return {**flags, **extra}
