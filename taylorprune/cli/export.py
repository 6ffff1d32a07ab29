"""``taylorprune export``: write a model as it is in another output format (a folder we wrote, any HF folder, a hub
id or a GGUF file, to safetensors, compressed-tensors or GGUF), with the same checks, verification and report as a
run: ``run``'s phases without calibration and pruning (load, evaluate if asked, write), those of the ``export`` kind
its options declare."""

from __future__ import annotations

from typing import Any

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, progress
from taylorprune.cli.run import show_summary
from taylorprune.pipeline.run_options import RunKind


@opt.with_run_options("load", "placement", "write", "perplexity", "speed", "zeroshot", stages=False,
                      exclude=("save_scores", "plots"))
def export(run_values: dict[str, Any] | None = None) -> None:
    """Write --model in --format (its weights as they are) to --output."""
    from taylorprune import pipeline

    with guarded() as session:
        opts = pipeline.RunOptions(**run_values, kind=RunKind.EXPORT)
        with progress() as bar:
            report = pipeline.run(opts, session.hooks(bar))
        show_summary(report)
