"""``taylorprune generate``: write the text ``--calib generated`` would calibrate on to a file.

Why a command of its own: to read what the model writes before trusting it as calibration data, to reuse it
elsewhere (``--calib-file``, another tool), and to sample on a machine where the model fits on the device once,
for runs elsewhere (``--gen-cache F`` here and in the run: the same ids, checked against the model). The sampling,
the settings and the cache are those of the run (``calib.generate``), so with the same model, settings and seed
this writes the very text a run calibrates on (a run's default length is its ``--seqlen``; here the model's
default window, min(2048, max positions), unless ``--gen-length``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress

DEFAULT_SEQUENCES = 128  # as --nsamples


@opt.with_run_options("generate", stages=False)
def generate_cmd(
    model: opt.Model,
    output: Path = typer.Option(..., help="Text file to write: .txt (sequences separated by a blank line) or .jsonl "
                                "(one {\"text\": ...} a line)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    seed: int = typer.Option(0, help="Seed of the sampler (as a run's --seed)."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    trust_remote_code: opt.TrustRemoteCode = False,
    run_values: dict[str, Any] | None = None,
) -> None:
    """Sample sequences from --model (its own text, as --calib generated does) and write them to --output."""
    from taylorprune import distributed, pipeline
    from taylorprune.calib import generate
    from taylorprune.errors import UserError
    from taylorprune.export import targets
    from taylorprune.modeling import loading

    with guarded() as session:
        where = targets.check_file(output, "--output")
        if where.exists() and not overwrite:
            raise UserError(f"--output {output} already exists; pass --overwrite to replace it")
        options = generate.GenerateOptions.build(run_values or {})
        config = loading.load_config(model, trust_remote_code)
        s = generate.sampler(options, seed, DEFAULT_SEQUENCES, None, config)
        dev = pipeline.resolve_device(device)
        with progress() as bar:
            hooks = session.hooks(bar)
            hooks.phase(f"loading {model}")
            loaded = loading.load(model, dtype, None, None, trust_remote_code, config=config)
            tick = hooks.task("generating tokens", generate.sampled_tokens(loaded.tokenizer, s))
            hooks.phase(f"generating {s.sequences} sequences of {s.length} tokens on {dev}")
            hooks.current = "generating"
            corpus, record = generate.generated_corpus(loaded.model.to(dev), loaded.tokenizer, s,
                                                       options.gen_cache, model, lambda n: tick(n - 1))
        if distributed.world().writer:  # under torchrun every rank sampled its share; rank 0 writes
            _write(where, generate.decode(loaded.tokenizer, corpus.ids))
        out.print(_table(record, where))


def _write(path: Path, texts: tuple[str, ...]) -> None:
    """The texts as .jsonl records or as blank-line separated text, written to a temporary name and renamed."""
    if path.suffix == ".jsonl":
        body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    else:
        body = "\n\n".join(texts) + "\n"
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _table(record: dict, path: Path) -> Table:
    table = Table(title=f"generated from {record['model']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("sequences × tokens", f"{record['sequences']} × {record['length']}")
    table.add_row("sampling", f"temperature {record['temperature']:g}, top-p {record['top_p']:g}, seed "
                  f"{record['seed']}" + (f", prompts {record['prompts']}" if record.get("prompts") else ""))
    how = "reused from the cache" if record["reused"] else f"{record['seconds']:.2f} s"
    table.add_row("sampled tokens", f"{record['sampled_tokens']:,} ({how})")
    table.add_row("tokens/s", f"{record['tokens_per_s']:,.1f}" + (" (when generated)" if record["reused"] else ""))
    table.add_row("model fingerprint", record["fingerprint"][:16] + "…")
    table.add_row("cache", str(record["cache"]))
    table.add_row("output", str(path))
    return table
