"""``taylorprune sweep``: methods × sparsities (× N:M patterns) on one model; results.json, a table, a plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from taylorprune import distributed
from taylorprune.cli import options as opt
from taylorprune.cli.console import err, guarded, out, progress, progress_hooks
from taylorprune.errors import UserError
from taylorprune.scoring.registry import BASELINES

DEFAULT_SPARSITIES = "0.3,0.5,0.6,0.7"
# what the sweep decides per grid point itself, or gives its own flags for
OWN = ("method", "sparsity", "pattern", "target_params", "structure", "eval")


@opt.with_component_options
@opt.with_run_options("load", "calib", "generate", "placement", "target", "perplexity", "speed", exclude=OWN)
def sweep(
    out_dir: Path = typer.Option(..., "--out", help="Folder for results.json, results.md, ppl_vs_sparsity.png."),
    methods: str = typer.Option(",".join(BASELINES), help="Comma-separated methods (see `taylorprune methods`)."),
    sparsities: str = typer.Option(DEFAULT_SPARSITIES, help="Comma-separated unstructured sparsities."),
    patterns: str = typer.Option("unstructured", help="Comma-separated: unstructured and/or N:M (e.g. 2:4)."),
    variants: str = typer.Option("plain", help="Comma-separated stage stacks run for every method, each plain or "
                                 "+-joined stage values, e.g. plain,obs,swap+obs,swap+obs+block (refine swap, update "
                                 "obs, recon block, allocation owl)."),
    metric: str = typer.Option("perplexity", help="Metric of the table and the plot (any evaluator's: perplexity, "
                               "prefill_ratio with --speed, ...)."),
    keep_models: bool = typer.Option(False, help="Also write every pruned model under OUT/models/<name>."),
    overwrite: bool = typer.Option(False, help="Replace results (and kept models) already in --out."),
    option: opt.MethodOption = None,
    run_values: dict[str, Any] | None = None,
    component_options: dict[str, Any] | None = None,
) -> None:
    """Prune one model with methods × sparsities (× N:M patterns), evaluate each, tabulate and plot.

    Component options (flags or --option) apply to every point whose method takes them.
    """
    from taylorprune import pipeline
    from taylorprune.pipeline import sweep as sw
    from taylorprune.report import sweep as results_files

    with guarded() as session:
        if distributed.world().active:
            raise UserError("sweep: not data-parallel yet (its results files would be written by every process); "
                            "run it in one process, or launch each point as its own `run`")
        points = sw.grid(sw.parse_methods(methods), sw.parse_sparsities(sparsities), sw.parse_patterns(patterns),
                         sw.parse_variants(variants))
        base = pipeline.RunOptions(**run_values, output=str(out_dir), overwrite=overwrite, eval=True,
                                   method_options=opt.component_values(component_options or {}, option))
        plan = sw.Sweep(base, out_dir, points, keep_models)
        sw.check(plan)
        for note in plan.skipped:
            err.print(f"[yellow]skipped[/] {note}", highlight=False, soft_wrap=True)
        with progress() as bar:
            hooks_for, on_row = _sweep_progress(bar, len(points), session, plan, metric)
            rows = sw.run_sweep(plan, hooks_for, on_row)
        show_sweep(results_files.build_results(plan, rows[0], rows[1:], metric), out_dir)


def _sweep_progress(bar, points: int, session, plan, metric: str):
    """Hooks per grid point: one overall bar, the point's own bars cleared when the next point starts; each row
    printed and the results files rewritten as it finishes (an interrupted sweep keeps what it finished)."""
    from taylorprune.pipeline import Hooks
    from taylorprune.report import sweep as results_files

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

    def on_row(row: dict, dense: dict, rows: list[dict]) -> None:
        bar.advance(overall)
        if rows:
            results_files.write_results(results_files.build_results(plan, dense, rows, metric), plan.out.expanduser())
        if row.get("error"):
            err.print(f"[red]✗[/] {row['name']}: {row['error']}", highlight=False, soft_wrap=True)
            return
        err.print(f"[green]✓[/] {row['name']}: {metric} {results_files.value(row, metric):.3f}, sparsity "
                  f"{row['achieved_sparsity']:.4f}", highlight=False)

    return hooks_for, on_row


def show_sweep(results: dict, out_dir: Path) -> None:
    from taylorprune.report import sweep as sw

    metric = results["metric"]
    dense = sw.value(results["dense"], metric)
    table = Table(title=f"sweep: {sw.model_label(results['model'])}")
    for col, justify in (("method", "left"), ("pattern", "left"), ("sparsity", "right"), ("achieved", "right"),
                         (metric, "right"), ("vs dense", "right"), ("prune s", "right")):
        table.add_column(col, justify=justify)
    for r in [results["dense"], *results["rows"]]:
        mine = sw.value(r, metric)
        ratio = mine / dense if math.isfinite(dense) and dense > 0 else math.nan
        table.add_row(r["method"], r["pattern"], f"{r['sparsity']:.2f}", f"{r['achieved_sparsity']:.4f}",
                      f"{mine:.3f}", f"{ratio:.2f}×", f"{r['prune_s'] + r['model_statistics_s']:.2f}")
    out.print(table)
    out.print(f"wrote {out_dir / sw.RESULTS_JSON}, {out_dir / sw.RESULTS_MD}, {out_dir / sw.plot_name(metric)}",
              highlight=False)
