"""``taylorprune imatrix``: write the importance matrix of a model on our calibration windows, for
``llama-quantize --imatrix`` (and for our own ``--imatrix FILE``).

Why a command of its own: llama-imatrix needs a llama.cpp build and a GGUF file, and it sees llama.cpp's
tokenization of a text, not the windows a run calibrates on. This one takes the run's calibration flags (the
same sampler, cache and windows) and any model taylorprune loads, a pruned compact folder included (its widths
are per layer, and so are the entries), so llama.cpp can quantize a pruned model with that model's own
activations. The statistic is ``stats.imatrix_pass``: Σx² per input column of every decoder linear over the
windows, in a plain forward (no KV cache between windows).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress

SUFFIXES = (".gguf", ".dat")


@opt.with_run_options("calib", stages=False, exclude=("calib_mix", "batch_size"))
def imatrix_cmd(
    model: opt.Model,
    output: Path = typer.Option(..., help="File to write: .gguf (llama.cpp's current imatrix format) or .dat "
                                "(the legacy one)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    trust_remote_code: opt.TrustRemoteCode = False,
    run_values: dict[str, Any] | None = None,
) -> None:
    """Σx² per input column of every decoder linear of --model over the calibration windows, written as a
    llama.cpp imatrix for llama-quantize --imatrix (or taylorprune export --imatrix)."""
    from taylorprune import pipeline
    from taylorprune.calib.text import GENERATED
    from taylorprune.errors import UserError
    from taylorprune.export import imatrix, targets
    from taylorprune.modeling import loading
    from taylorprune.pipeline.phases.calibration import load_calibration
    from taylorprune.pipeline.run_options import CalibOptions
    from taylorprune.stats.imatrix_pass import gguf_names, model_imatrix

    with guarded() as session:
        if output.suffix not in SUFFIXES:
            raise UserError(f"--output {output}: an imatrix file ends in .gguf (current format) or .dat (legacy)")
        where = targets.check_file(output, "--output")
        if where.exists() and not overwrite:
            raise UserError(f"--output {output} already exists; pass --overwrite to replace it")
        calib = CalibOptions.build(run_values or {})
        if calib.calib == GENERATED:
            raise UserError("--calib generated: write the text with `taylorprune generate` first and pass it as "
                            "--calib-file")
        config = loading.load_config(model, trust_remote_code)
        seqlen = loading.resolve_seqlen(calib.seqlen, config)
        dev = pipeline.resolve_device(device)
        with progress() as bar:
            hooks = session.hooks(bar)
            hooks.phase(f"loading {model}")
            loaded = loading.load(model, dtype, None, None, trust_remote_code, config=config)
            gguf_names(loaded.model)  # refuse a model llama.cpp cannot name before tokenizing
            hooks.phase("tokenizing calibration text")
            ids, spec = load_calibration(calib, loaded.tokenizer, seqlen,
                                         loading.window_start(loaded.model.config, loaded.tokenizer))
            hooks.phase(f"Σx² of every decoder linear over {spec.nsamples} × {spec.seqlen} tokens on {dev}")
            hooks.current = "collecting the importance matrix"
            mat = model_imatrix(loaded.model, ids, dev, datasets=[spec.source], progress=hooks.task)
        _write(where, mat, imatrix)
        out.print(_table(mat, spec, where))


def _write(path: Path, mat, imatrix) -> None:
    """Written beside the target and renamed into place: an interrupted write leaves no half file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        (imatrix.write_legacy if path.suffix == ".dat" else imatrix.write_imatrix)(tmp, mat)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _table(mat, spec, path: Path) -> Table:
    table = Table(title="importance matrix")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("entries (decoder linears)", str(len(mat.sums)))
    table.add_row("windows × tokens", f"{spec.nsamples} × {spec.seqlen} ({spec.tokens:,} tokens)")
    table.add_row("calibration", f"{spec.source} ({spec.sampling}, seed {spec.seed})")
    table.add_row("format", "legacy .dat" if path.suffix == ".dat" else "GGUF")
    table.add_row("output", str(path))
    return table
