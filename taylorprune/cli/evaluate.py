"""``taylorprune eval``: perplexity of any model folder, hub id or GGUF file with the papers' protocol."""

from __future__ import annotations

from pathlib import Path

import typer

from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress
from taylorprune.errors import UserError
from taylorprune.evaluate.llamacpp import RuntimeOptions
from taylorprune.pipeline.run_options import PlacementOptions


@opt.with_run_options("zeroshot", RuntimeOptions, stages=False)
def eval_cmd(
    model: opt.Model,
    dataset: str = typer.Option(None, help=f"Test split (default wikitext2 unless --text-file): "
                                f"{', '.join(EVAL_DATASETS)}."),
    text_file: str = typer.Option(None, help="Evaluate on this text file instead of --dataset."),
    seqlen: int = typer.Option(None, help="Window length (default: min(2048, max positions))."),
    max_windows: int = typer.Option(None, help="Evaluate at most this many windows."),
    json_out: Path = typer.Option(None, "--json", help="Write the result as JSON here."),
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    device_map: opt.DeviceMap = None,
    stream: opt.Stream = False,
    max_gpu_memory: opt.MaxGpuMemory = None,
    stream_batch: opt.StreamBatch = 16,
    trust_remote_code: opt.TrustRemoteCode = False,
    perplexity: bool = typer.Option(True, help="Measure perplexity (off: only the --tasks)."),
    run_values: dict | None = None,
) -> None:
    """Perplexity with the papers' protocol (text tokenized once, non-overlapping windows), and zero-shot accuracy
    of lm-eval tasks with --tasks; with --runtime llamacpp, a .gguf file's perplexity in llama.cpp (llama-perplexity's
    protocol)."""
    from taylorprune import pipeline
    from taylorprune.evaluate import zeroshot
    from taylorprune.evaluate.perplexity import EVALUATOR, short_options
    from taylorprune.export import targets
    from taylorprune.modeling import loading
    from taylorprune.report import jsonio

    with guarded() as session:
        if json_out:
            targets.check_file(json_out, "--json")
        chosen = [(EVALUATOR, short_options(dataset, text_file, seqlen, max_windows))] if perplexity else []
        tasks = zeroshot.ZeroShotOptions.build(run_values)
        runtime = RuntimeOptions.build(run_values)
        if runtime.runtime == "llamacpp":
            from taylorprune.evaluate import llamacpp

            llamacpp.refuse({"--tasks": tasks.tasks, "--no-perplexity": not perplexity, "--dtype": dtype != "auto",
                             "--device": device not in ("auto", "cpu"), "--device-map": device_map, "--stream": stream,
                             "--max-gpu-memory": max_gpu_memory})
            with progress() as bar:
                hooks = session.hooks(bar)
                hooks.current = "evaluating perplexity in llama.cpp"
                records = {"perplexity": llamacpp.perplexity(model, chosen[0][1], runtime, hooks.windows)}
            rows = llamacpp.rows(records["perplexity"])
        else:
            if tasks.tasks:
                zeroshot.EVALUATOR.check(tasks, None)
                chosen.append((zeroshot.EVALUATOR, tasks))
            if not chosen:
                raise UserError("nothing to evaluate: --no-perplexity needs --tasks")
            placement = PlacementOptions.build({"device": device, "stream": stream, "max_gpu_memory": max_gpu_memory,
                                                "stream_batch": stream_batch})
            pipeline.check_placement(stream, max_gpu_memory, device_map)
            dev = pipeline.resolve_device(device)
            config = loading.load_config(model, trust_remote_code)
            loading.resolve_seqlen(seqlen, config)
            with progress() as bar:
                hooks = session.hooks(bar)
                hooks.current = "loading model"
                loaded = loading.load(model, dtype, device_map, None, trust_remote_code, config=config)
                records = pipeline.evaluate_model(loaded.model, loaded.tokenizer, model, chosen, dev, hooks,
                                                  placement.stream, placement.max_gpu_memory, placement.stream_batch)
            rows = [row for evaluator, _ in chosen for row in evaluator.rows(records[evaluator.name])]
        for what, value in rows:
            out.print(f"{what}: {value}", highlight=False)
        if json_out:
            jsonio.dump({**records.get("perplexity", {}), "evaluation": records, "metrics": pipeline.metrics(records)},
                        json_out, "--json")
