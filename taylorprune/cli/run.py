"""``taylorprune run``: prune a model and write it as a Hugging Face folder with its report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import guarded, out, progress
from taylorprune.scoring.registry import DEFAULT_METHOD


@opt.with_component_options
def run(
    model: opt.Model,
    output: Path = typer.Option(..., help="Folder to write (created atomically; must not exist)."),
    method: str = typer.Option(DEFAULT_METHOD, help="Pruning method; see `taylorprune methods`."),
    sparsity: float = typer.Option(None, help="Fraction of weights to prune in each target, e.g. 0.5; with "
                                   "--structure the fraction of each structure removed in every block (of blocks: "
                                   "of the model's blocks)."),
    structure: opt.Structure = None,
    target_params: float = typer.Option(None, help="With --structure instead of --sparsity: fraction of all "
                                        "parameters to remove (the smallest uniform count reaching it)."),
    speed: bool = typer.Option(False, "--speed", help="With --structure: time prefill (512 tokens) and decode (128 "
                               "tokens) of the dense and the pruned model; tokens/s and ratios go in the report."),
    pattern: str = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4 (keep N of every M)."),
    group: opt.Group = "row",
    targets: opt.Targets = None,
    calib: opt.Calib = "c4",
    calib_file: opt.CalibFile = None,
    nsamples: opt.NSamples = 128,
    seqlen: opt.SeqLen = None,
    seed: opt.Seed = 0,
    calib_sampling: opt.CalibSampling = "random",
    batch_size: opt.BatchSize = 1,
    dtype: opt.DType = "auto",
    device: opt.Device = "auto",
    device_map: str = typer.Option(None, help="accelerate device map (auto, balanced, sequential, cpu)."),
    offload_folder: str = typer.Option(None, help="Folder for accelerate's disk offload."),
    stream: opt.Stream = False,
    max_gpu_memory: opt.MaxGpuMemory = None,
    stream_batch: opt.StreamBatch = 16,
    overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
    trust_remote_code: opt.TrustRemoteCode = False,
    eval: bool = typer.Option(False, "--eval", help="Evaluate perplexity of the pruned model."),
    eval_dataset: opt.EvalDataset = "wikitext2",
    eval_text_file: opt.EvalTextFile = None,
    eval_seqlen: opt.EvalSeqLen = None,
    max_windows: opt.MaxWindows = None,
    allocation: opt.Allocation = "uniform",
    refine: opt.Refine = None,
    update: opt.Update = "none",
    recon: opt.Recon = "none",
    save_scores: str = typer.Option(None, help="Write each target's fp32 scores (.safetensors, module paths)."),
    plots: bool = typer.Option(False, "--plots", help="Also write layer_sparsity.png into the output."),
    option: opt.MethodOption = None,
    component_options: dict[str, Any] | None = None,
) -> None:
    """Prune a model and write it as a Hugging Face folder with taylorprune_report.json."""
    from taylorprune.pipeline import RunOptions
    from taylorprune.pipeline import run as run_pipeline

    with guarded() as session:
        opts = RunOptions(
            model=model, output=str(output), method=method, sparsity=sparsity, pattern=pattern, group=group,
            targets=targets, calib=calib, calib_file=calib_file, nsamples=nsamples, seqlen=seqlen, seed=seed,
            calib_sampling=calib_sampling, batch_size=batch_size, dtype=dtype, device=device,
            device_map=device_map, offload_folder=offload_folder, stream=stream, max_gpu_memory=max_gpu_memory,
            stream_batch=stream_batch, overwrite=overwrite,
            trust_remote_code=trust_remote_code, eval=eval, eval_dataset=eval_dataset,
            eval_text_file=eval_text_file, eval_seqlen=eval_seqlen, max_windows=max_windows,
            allocation=allocation, refine=refine, update=update, recon=recon,
            save_scores=save_scores, plots=plots,
            method_options=opt.component_values(component_options or {}, option), structure=structure,
            target_params=target_params, speed=speed,
        )
        with progress() as bar:
            report = run_pipeline(opts, session.hooks(bar))
        show_summary(report)


def show_summary(report: dict) -> None:
    table = Table(title=f"taylorprune {report['method']} · {report['pattern']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("target linears", str(len(report["linears"])))
    if report.get("structured"):
        structured_rows(table, report["structured"])
    else:
        table.add_row("achieved sparsity", f"{report['achieved_sparsity']:.4f}")
    for phase, secs in report["phases_s"].items():
        if "." not in phase:
            table.add_row(f"{phase} time", f"{secs:.2f} s")
    table.add_row("process wall time", f"{report['wall_s']:.2f} s")
    placement = report.get("placement") or {}
    if placement:
        table.add_row("model placement", f"{placement['mode']} ({placement['reason']})")
    table.add_row("peak RSS", f"{report['peak_memory_mib']['rss_mib']:.0f} MiB")
    if report.get("evaluation"):
        ev = report["evaluation"]
        table.add_row(f"perplexity ({ev['dataset']}, {ev['windows']}×{ev['seqlen']})", f"{ev['perplexity']:.3f}")
    table.add_row("output", report["options"]["output"])
    out.print(table)


def structured_rows(table: Table, st: dict) -> None:
    """What a structured run removed, and what it saved."""
    if st.get("depth"):
        table.add_row("blocks removed", ", ".join(map(str, st["depth"]["blocks_removed"])))
    widths = st["config"]
    table.add_row("widths now", f"{widths['num_hidden_layers']} blocks, {widths['num_attention_heads']} heads / "
                  f"{widths['num_key_value_heads']} KV, intermediate {widths['intermediate_size']}")
    params = st["parameters"]
    table.add_row("parameters", f"{params['before']:,} → {params['after']:,} (−{params['removed_fraction']:.1%})")
    size = st["file_bytes"]
    if size.get("after"):
        table.add_row("weight files", f"{size['before'] / 2**20:.1f} → {size['after'] / 2**20:.1f} MiB")
    if st.get("speed"):
        sp = st["speed"]
        table.add_row("prefill tokens/s (pruned/dense)", f"{sp['pruned']['prefill_tok_s']:.0f} / "
                      f"{sp['dense']['prefill_tok_s']:.0f} = {sp['prefill_ratio']:.2f}×")
        table.add_row("decode tokens/s (pruned/dense)", f"{sp['pruned']['decode_tok_s']:.1f} / "
                      f"{sp['dense']['decode_tok_s']:.1f} = {sp['decode_ratio']:.2f}×")
