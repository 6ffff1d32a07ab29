"""``taylorprune speed``: prefill and decode tokens/s of a model and a baseline, in one process on one device."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out
from taylorprune.errors import UserError
from taylorprune.evaluate.llamacpp import RuntimeOptions


@opt.with_run_options(RuntimeOptions, stages=False)
def speed_cmd(
    model: opt.Model,
    baseline: str = typer.Option(..., help="The model to compare with (e.g. the dense source): folder, hub id, .gguf."),
    prefill: int = typer.Option(512, help="Tokens of the timed prefill forward."),
    decode: int = typer.Option(128, help="New tokens of the timed greedy decode (batch 1, KV cache)."),
    repeats: int = typer.Option(5, help="Interleaved timing rounds after one warm-up each (median ratio and its "
                                "spread reported)."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    json_out: Path = typer.Option(None, "--json", help="Write the measurements as JSON here."),
    trust_remote_code: opt.TrustRemoteCode = False,
    run_values: dict | None = None,
) -> None:
    """Time prefill and decode of --model and --baseline in interleaved rounds (same process, device, threads);
    print the median ratios and their spread. --runtime llamacpp times two .gguf files in llama.cpp."""
    from taylorprune import pipeline
    from taylorprune.evaluate.speed import check_positions, compare
    from taylorprune.export import targets
    from taylorprune.modeling import loading
    from taylorprune.report import jsonio

    with guarded():
        if json_out:
            targets.check_file(json_out, "--json")
        for flag, value, least in (("--prefill", prefill, 1), ("--decode", decode, 1), ("--repeats", repeats, 1)):
            if value < least:
                raise UserError(f"{flag} {value}: must be at least {least}")
        runtime = RuntimeOptions.build(run_values)
        if runtime.runtime == "llamacpp":
            from taylorprune.evaluate import llamacpp, llamacpp_speed

            llamacpp.refuse({"--dtype": dtype != "auto", "--device": device not in ("auto", "cpu")})
            result = llamacpp_speed.compare(baseline, model, prefill, decode, repeats, runtime)
        else:
            dev = pipeline.resolve_device(device)
            sides = ((baseline, "--baseline"), (model, "--model"))
            configs = [_config(loading, m, flag, trust_remote_code) for m, flag in sides]
            for name, config in zip((baseline, model), configs, strict=True):
                check_positions(config, prefill, decode, name)
            loaded = [loading.load(m, dtype, None, None, trust_remote_code, config=c).model
                      for m, c in zip((baseline, model), configs, strict=True)]
            result = compare(loaded[0], loaded[1], dev, prefill, decode, repeats)
        result["models"] = {"dense": baseline, "pruned": model}
        out.print(speed_table(result))
        if json_out:
            jsonio.dump(result, json_out)


def _config(loading, name: str, flag: str, trust_remote_code: bool):
    """The model's config; errors name the flag it came in by (loading speaks of --model)."""
    try:
        return loading.load_config(name, trust_remote_code)
    except UserError as exc:
        raise UserError(str(exc).replace(f"--model {name}", f"{flag} {name}", 1)) from None


def speed_table(result: dict) -> Table:
    table = Table(title=f"speed on {result['device']} ({result['threads']} threads, batch 1)")
    for col in ("model", "prefill tokens/s", "decode tokens/s"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for key in ("dense", "pruned"):
        r = result[key]
        table.add_row(f"{key}: {result.get('models', {}).get(key, '')}", f"{r['prefill_tok_s']:.1f}",
                      f"{r['decode_tok_s']:.1f}")
    table.add_row("ratio (model / baseline)", f"{result['prefill_ratio']:.2f}×", f"{result['decode_ratio']:.2f}×")
    (low_p, high_p), (low_d, high_d) = result["prefill_ratio_spread"], result["decode_ratio_spread"]
    table.add_row(f"spread over {result['rounds']} rounds", f"{low_p:.2f}–{high_p:.2f}", f"{low_d:.2f}–{high_d:.2f}")
    return table
