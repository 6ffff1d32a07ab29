"""``taylorprune eval``: perplexity of any model folder, hub id or GGUF file with the papers' protocol."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress
from taylorprune.errors import UserError


def eval_cmd(
    model: opt.Model,
    dataset: str = typer.Option("wikitext2", help=f"Test split: {', '.join(EVAL_DATASETS)}."),
    text_file: str = typer.Option(None, help="Evaluate on this text file instead of --dataset."),
    seqlen: int = typer.Option(None, help="Window length [default: min(2048, max positions)]."),
    max_windows: opt.MaxWindows = None,
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON here."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    device_map: str = typer.Option(None, help="accelerate device map (auto, balanced, ...)."),
    stream: opt.Stream = False,
    max_gpu_memory: opt.MaxGpuMemory = None,
    stream_batch: opt.StreamBatch = 16,
    trust_remote_code: opt.TrustRemoteCode = False,
) -> None:
    """Perplexity with the papers' protocol: text tokenized once, non-overlapping windows."""
    from taylorprune import pipeline
    from taylorprune.modeling import loading

    with guarded() as session:
        if dataset not in EVAL_DATASETS and not text_file:
            raise UserError(f"--dataset {dataset}: choose one of {', '.join(EVAL_DATASETS)} or give --text-file")
        if text_file and not Path(text_file).expanduser().is_file():
            raise UserError(f"--text-file {text_file}: file not found")
        if max_windows is not None and max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: must be at least 1")
        pipeline.check_placement(stream, max_gpu_memory, stream_batch, device_map)
        dev = pipeline.resolve_device(device)
        config = loading.load_config(model, trust_remote_code)
        pipeline.resolve_seqlen(seqlen, config)
        with progress() as bar:
            hooks = session.hooks(bar)
            hooks.current = "loading model"
            loaded = loading.load(model, dtype, device_map, None, trust_remote_code, config=config)
            hooks.current = "evaluating perplexity"
            result = pipeline.evaluate_model(loaded.model, loaded.tokenizer, model, dataset, text_file, seqlen,
                                             max_windows, dev, hooks.windows, stream, max_gpu_memory, stream_batch)
        out.print(f"perplexity {result.perplexity:.4f}  ({result.dataset}, {result.windows} windows × "
                  f"{result.seqlen} tokens)", highlight=False)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
