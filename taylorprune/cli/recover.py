"""``taylorprune recover``: recovery by distillation for a model pruned earlier or by another tool.

The pruned model's masks are its zeros (kept exactly), compact shapes stay, and the teacher is the dense model
it came from; the run is ``run``'s phases without pruning: load, calibration text, recover, (evaluate), write,
because the options it builds declare the ``recover`` kind (``--teacher`` only names the teacher).
"""

from __future__ import annotations

import functools
from typing import Any

import typer

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, progress
from taylorprune.cli.run import show_summary
from taylorprune.pipeline.run_options import RunKind


@functools.partial(opt.with_component_options, kind="recover")
@opt.with_run_options("load", "calib", "generate", "placement", "write", "perplexity", "speed", "zeroshot",
                      stages=False, exclude=("save_scores", "plots"))
def recover(
    teacher: str = typer.Option(..., help="The dense model the pruned one came from: folder, hub id or .gguf."),
    option: opt.MethodOption = None,
    run_values: dict[str, Any] | None = None,
    component_options: dict[str, Any] | None = None,
) -> None:
    """Recover a pruned model (--model) by distillation from its dense teacher; write the result to --output."""
    from taylorprune import pipeline

    with guarded() as session:
        values = {**opt.component_values(component_options or {}, option), "recover_teacher": teacher}
        opts = pipeline.RunOptions(**run_values, kind=RunKind.RECOVER, recover="distill", method_options=values)
        with progress() as bar:
            report = pipeline.run(opts, session.hooks(bar))
        show_summary(report)
