"""The ``taylorprune`` command line (Typer): one module per command, console helpers in ``console``."""

from __future__ import annotations

import typer

from taylorprune import distributed
from taylorprune.cli import (
    check,
    console,
    evaluate,
    export,
    generate,
    imatrix,
    inspection,
    methods,
    recover,
    run,
    speed,
    sweep,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prune LLaMA-class causal LMs layer by layer and measure what it costs in perplexity.",
)
app.command("run")(run.run)
app.command("eval")(evaluate.eval_cmd)
app.command("methods")(methods.methods)
app.command("check")(check.check)
app.command("inspect")(inspection.inspect_cmd)
app.command("sweep")(sweep.sweep)
app.command("speed")(speed.speed_cmd)
app.command("recover")(recover.recover)
app.command("export")(export.export)
app.command("generate")(generate.generate_cmd)
app.command("imatrix")(imatrix.imatrix_cmd)


def main() -> None:
    """The command line; under a launcher (torchrun, accelerate launch) each process joins the data-parallel run
    first, and only rank 0 prints progress and results."""
    if distributed.launched():
        console.join_world()
    try:
        app()
    finally:
        distributed.shutdown()
