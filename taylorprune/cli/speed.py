"""``taylorprune speed``: prefill and decode tokens/s of a model and a baseline, in one process on one device."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out
from taylorprune.errors import UserError


def speed_cmd(
    model: opt.Model,
    baseline: str = typer.Option(..., help="The model to compare with (e.g. the dense source): folder, hub id, .gguf."),
    prefill: int = typer.Option(512, help="Tokens of the timed prefill forward."),
    decode: int = typer.Option(128, help="New tokens of the timed greedy decode (batch 1, KV cache)."),
    repeats: int = typer.Option(3, help="Timed repeats (median) after one warm-up."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    json_out: Path = typer.Option(None, "--json", help="Write the measurements as JSON here."),
    trust_remote_code: opt.TrustRemoteCode = False,
) -> None:
    """Time prefill and decode of --model and --baseline in turn (same process, device, threads); print the ratios."""
    from taylorprune import pipeline
    from taylorprune.evaluate.speed import PROMPT, compare
    from taylorprune.modeling import loading

    with guarded():
        for flag, value, least in (("--prefill", prefill, 1), ("--decode", decode, 1), ("--repeats", repeats, 1)):
            if value < least:
                raise UserError(f"{flag} {value}: must be at least {least}")
        dev = pipeline.resolve_device(device)
        configs = [loading.load_config(m, trust_remote_code) for m in (baseline, model)]
        for name, config in zip((baseline, model), configs, strict=True):
            limit = getattr(config, "max_position_embeddings", None)
            if limit and max(prefill, PROMPT + decode) > limit:
                raise UserError(f"{name}: supports {limit} positions; lower --prefill / --decode")
        loaded = [loading.load(m, dtype, None, None, trust_remote_code, config=c).model
                  for m, c in zip((baseline, model), configs, strict=True)]
        result = compare(loaded[0], loaded[1], dev, prefill, decode, repeats)
        result["models"] = {"dense": baseline, "pruned": model}
        out.print(speed_table(result))
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(result, indent=2) + "\n")


def speed_table(result: dict) -> Table:
    table = Table(title=f"speed on {result['device']} ({result['threads']} threads, batch 1)")
    for col in ("model", "prefill tokens/s", "decode tokens/s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key in ("dense", "pruned"):
        r = result[key]
        table.add_row(f"{key}: {result.get('models', {}).get(key, '')}", f"{r['prefill_tok_s']:.1f}",
                      f"{r['decode_tok_s']:.1f}")
    table.add_row("ratio (model / baseline)", f"{result['prefill_ratio']:.2f}×", f"{result['decode_ratio']:.2f}×")
    return table
