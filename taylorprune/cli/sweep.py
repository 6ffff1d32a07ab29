"""``taylorprune sweep``: methods × sparsities (× N:M patterns) on one model; results.json, a table, a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from taylorprune.cli import options as opt
from taylorprune.cli.console import err, guarded, out, progress, progress_hooks
from taylorprune.scoring.registry import BASELINES

DEFAULT_SPARSITIES = "0.3,0.5,0.6,0.7"


@opt.with_component_options
def sweep(
    model: opt.Model,
    out_dir: Path = typer.Option(..., "--out", help="Folder for results.json, results.md, ppl_vs_sparsity.png."),
    methods: str = typer.Option(",".join(BASELINES), help="Comma-separated methods (see `taylorprune methods`)."),
    sparsities: str = typer.Option(DEFAULT_SPARSITIES, help="Comma-separated unstructured sparsities."),
    patterns: str = typer.Option("unstructured", help="Comma-separated: unstructured and/or N:M (e.g. 2:4)."),
    variants: str = typer.Option("plain", help="Comma-separated stage stacks run for every method, each plain or "
                                 "+-joined stage values, e.g. plain,obs,swap+obs,swap+obs+block (refine swap, update "
                                 "obs, recon block, allocation owl)."),
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
    stream: opt.Stream = False,
    max_gpu_memory: opt.MaxGpuMemory = None,
    stream_batch: opt.StreamBatch = 16,
    eval_dataset: opt.EvalDataset = "wikitext2",
    eval_text_file: opt.EvalTextFile = None,
    eval_seqlen: opt.EvalSeqLen = None,
    max_windows: opt.MaxWindows = None,
    keep_models: bool = typer.Option(False, help="Also write every pruned model under OUT/models/<name>."),
    overwrite: bool = typer.Option(False, help="Replace results (and kept models) already in --out."),
    trust_remote_code: opt.TrustRemoteCode = False,
    allocation: opt.Allocation = "uniform",
    refine: opt.Refine = None,
    update: opt.Update = "none",
    recon: opt.Recon = "none",
    option: opt.MethodOption = None,
    component_options: dict[str, Any] | None = None,
) -> None:
    """Prune one model with methods × sparsities (× N:M patterns), evaluate each, tabulate and plot.

    Component options (flags or --option) apply to every point whose method takes them.
    """
    from taylorprune import pipeline
    from taylorprune.report import sweep as sw

    with guarded() as session:
        points = sw.grid(sw.parse_methods(methods), sw.parse_sparsities(sparsities), sw.parse_patterns(patterns),
                         sw.parse_variants(variants))
        base = pipeline.RunOptions(
            model=model, output=str(out_dir), group=group, targets=targets, calib=calib, calib_file=calib_file,
            nsamples=nsamples, seqlen=seqlen, seed=seed, calib_sampling=calib_sampling, batch_size=batch_size,
            dtype=dtype, device=device, stream=stream, max_gpu_memory=max_gpu_memory, stream_batch=stream_batch,
            overwrite=overwrite, trust_remote_code=trust_remote_code,
            eval_dataset=eval_dataset, eval_text_file=eval_text_file, eval_seqlen=eval_seqlen,
            max_windows=max_windows, allocation=allocation, refine=refine, update=update, recon=recon,
            method_options=opt.component_values(component_options or {}, option),
        )
        plan = sw.Sweep(base, out_dir, points, keep_models)
        sw.validate(plan)
        for note in plan.skipped:
            err.print(f"[yellow]skipped[/] {note}", highlight=False, soft_wrap=True)
        with progress() as bar:
            hooks_for, on_row = _sweep_progress(bar, len(points), session)
            results = sw.run_sweep(plan, hooks_for, on_row)
        show_sweep(results, out_dir)


def _sweep_progress(bar, points: int, session):
    """Hooks per grid point: one overall bar, the point's own bars cleared when the next point starts."""
    from taylorprune.pipeline import Hooks

    overall = bar.add_task("sweep", total=points + 1)

    def hooks_for(i: int, name: str) -> Hooks:
        for task in list(bar.task_ids):
            if task != overall:
                bar.remove_task(task)
        inner = progress_hooks(bar)
        label = f"[{i}/{points}] {name}"
        bar.update(overall, description=label)
        return session.remember(Hooks(phase=lambda phase: bar.update(overall, description=f"{label}: {phase}"),
                                      task=inner.task, windows=inner.windows))

    def on_row(row: dict) -> None:
        bar.advance(overall)
        if row.get("error"):
            err.print(f"[red]✗[/] {row['name']}: {row['error']}", highlight=False, soft_wrap=True)
            return
        err.print(f"[green]✓[/] {row['name']}: perplexity {row['perplexity']:.3f}, sparsity "
                  f"{row['achieved_sparsity']:.4f}", highlight=False)

    return hooks_for, on_row


def show_sweep(results: dict, out_dir: Path) -> None:
    from taylorprune.report import sweep as sw

    dense = results["dense"]["perplexity"]
    table = Table(title=f"sweep: {sw.model_label(results['model'])}")
    for col, justify in (("method", "left"), ("pattern", "left"), ("sparsity", "right"), ("achieved", "right"),
                         ("perplexity", "right"), ("vs dense", "right"), ("prune s", "right")):
        table.add_column(col, justify=justify)
    for r in [results["dense"], *results["rows"]]:
        ratio = r["perplexity"] / dense if math.isfinite(dense) and dense > 0 else math.nan
        table.add_row(r["method"], r["pattern"], f"{r['sparsity']:.2f}", f"{r['achieved_sparsity']:.4f}",
                      f"{r['perplexity']:.3f}", f"{ratio:.2f}×", f"{r['prune_s'] + r['model_statistics_s']:.2f}")
    out.print(table)
    out.print(f"wrote {out_dir / sw.RESULTS_JSON}, {out_dir / sw.RESULTS_MD}, {out_dir / sw.PLOT}", highlight=False)
