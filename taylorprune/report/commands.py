"""CLI commands of the report package (registered on the main Typer app by ``taylorprune.cli``).

Only option parsing and rendering live here; the work is in ``check``, ``inspect_folder`` and ``sweep`` so
tests and scripts can call it without the CLI. ``taylorprune.cli`` is imported lazily because it imports
this module while it is being built.
"""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from taylorprune import cli_options as opt
from taylorprune.calib.text import EVAL_DATASETS

DEFAULT_SPARSITIES = "0.3,0.5,0.6,0.7"


def register(app: typer.Typer) -> None:
    """Attach check / inspect / sweep to ``app``."""
    app.command("check")(check)
    app.command("inspect")(inspect_cmd)
    app.command("sweep")(sweep)


# --------------------------------------------------------------------------------------------------- check


def check(
    candidate: str = typer.Option(..., help="Eval JSON (`eval --json`), a taylorprune_report.json, or a model "
                                  "folder (evaluated now with the eval options below)."),
    baseline: str = typer.Option(None, help="Same kinds as --candidate; needed by --max-ppl-increase."),
    max_ppl_increase: str = typer.Option(None, help="Allowed rise over the baseline: 5% or 0.05 "
                                         "(candidate ppl <= baseline × 1.05)."),
    max_ppl: float = typer.Option(None, help="Absolute ceiling on the candidate's perplexity."),
    min_sparsity: float = typer.Option(None, help="Minimum sparsity read from the candidate's weights (the "
                                       "report's linears, else 2-D weights in decoder blocks)."),
    allow_mismatch: bool = typer.Option(False, help="Compare even if dataset/seqlen/windows/tokens differ."),
    dataset: str = typer.Option("wikitext2", help=f"Folders only: test split ({', '.join(EVAL_DATASETS)})."),
    text_file: str = typer.Option(None, help="Folders only: evaluate on this text file instead."),
    seqlen: int = typer.Option(None, help="Folders only: window length [default: min(2048, max positions)]."),
    max_windows: int = typer.Option(None, help="Folders only: evaluate at most this many windows."),
    device: str = typer.Option("auto", help="Folders only: auto, cpu, cuda, ..."),
    dtype: str = typer.Option("auto", help="Folders only: auto, float32, bfloat16 or float16."),
    json_out: Path = typer.Option(None, "--json", help="Write the verdict as JSON here."),
    junit: Path = typer.Option(None, help="Write JUnit XML here (one testcase per check)."),
) -> None:
    """Gate a candidate against a baseline: exit 0 within tolerance, 1 on a regression, 2 on bad input."""
    from taylorprune.cli import _progress_hooks, err, guarded, progress
    from taylorprune.errors import RunError
    from taylorprune.report import check as chk
    from taylorprune.report.junit import write_junit

    with guarded():
        limits = chk.Limits(chk.parse_increase(max_ppl_increase) if max_ppl_increase is not None else None,
                            max_ppl, min_sparsity)
        chk.validate_limits(limits, baseline is not None)
        settings = chk.EvalSettings(dataset, text_file, seqlen, max_windows, device, dtype)
        cand_path = chk.existing(candidate, "--candidate")
        base_path = chk.existing(baseline, "--baseline") if baseline is not None else None
        weights_dir = chk.weights_folder(cand_path) if min_sparsity is not None else None
        if cand_path.is_dir() or (base_path is not None and base_path.is_dir()):
            chk.validate_eval_settings(settings)
        with progress() as bar:
            base, cand = chk.load_sides(base_path, cand_path, settings, allow_mismatch, lambda: _progress_hooks(bar))
        sparsity = chk.candidate_sparsity(weights_dir) if weights_dir is not None else None
        verdict = chk.verdict(base, cand, limits, sparsity, allow_mismatch)
        if verdict.mismatch:
            err.print(f"[yellow]warning:[/] compared despite different eval settings: {'; '.join(verdict.mismatch)}",
                      highlight=False, soft_wrap=True)
        show_verdict(verdict)
        if json_out:
            chk.write_json(verdict, json_out)
        if junit:
            write_junit(verdict, junit)
        if not verdict.passed:
            failed = [c for c in verdict.checks if not c.passed]
            raise RunError(f"regression: {len(failed)} of {len(verdict.checks)} checks failed "
                           f"({'; '.join(c.detail for c in failed)})")


def _check_cells(name: str, value: float | None, limit: float) -> tuple[str, str]:
    if value is None or not math.isfinite(value):
        shown = str(value)
    elif name == "ppl_increase":
        shown = f"{value:+.2%}"
    else:
        shown = f"{value:.4f}"
    return shown, (f"{limit:+.2%}" if name == "ppl_increase" else f"{limit:g}")


def show_verdict(verdict) -> None:
    from taylorprune.cli import out

    table = Table(title="taylorprune check")
    for col, justify in (("check", "left"), ("value", "right"), ("limit", "right"), ("result", "left")):
        table.add_column(col, justify=justify)
    for c in verdict.checks:
        value, limit = _check_cells(c.name, c.value, c.limit)
        table.add_row(c.name, value, limit, "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    cand = verdict.candidate
    parts = [f"candidate ppl {cand['perplexity']:.4f}"]
    if verdict.baseline is not None:
        parts.insert(0, f"baseline ppl {verdict.baseline['perplexity']:.4f}")
    table.caption = f"{' · '.join(parts)} ({cand['dataset']}, {cand['windows']}×{cand['seqlen']})"
    out.print(table)
    out.print("[green]passed[/]" if verdict.passed else "[bold red]failed[/]")


# ------------------------------------------------------------------------------------------------- inspect


def inspect_cmd(
    folder: Path = typer.Argument(..., help="A Hugging Face model folder with *.safetensors."),
    json_out: Path = typer.Option(None, "--json", help="Write the per-linear table and summary as JSON here."),
) -> None:
    """Per-linear sparsity and N:M compliance read lazily from the safetensors (no model is loaded)."""
    from taylorprune.cli import guarded, out
    from taylorprune.report import jsonio
    from taylorprune.report.inspect_folder import inspect_folder

    with guarded():
        info = inspect_folder(folder.expanduser())
        out.print(linears_table(info))
        out.print(totals_table(info))
        if info["report"] is not None:
            out.print(report_table(info["report"]))
        if json_out:
            jsonio.dump(info, json_out)


def linears_table(info: dict) -> Table:
    table = Table(title=f"linears in {info['folder']}")
    table.add_column("linear", overflow="fold")
    for col, justify in (("shape", "right"), ("dtype", "left"), ("sparsity", "right"), ("N:M held", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in info["linears"]:
        shape = "×".join(map(str, r["shape"]))
        nm = " ".join(r["nm"]) or "-"
        table.add_row(r["name"].removesuffix(".weight"), shape, r["dtype"], f"{r['sparsity']:.4f}", nm)
    return table


def totals_table(info: dict) -> Table:
    t = info["total"]
    table = Table(title="totals", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("linears", str(t["linears"]))
    table.add_row("weights", f"{t['numel']:,}")
    table.add_row("zeros", f"{t['zeros']:,}")
    table.add_row("sparsity", f"{t['sparsity']:.4f}")
    table.add_row("N:M held by every linear", ", ".join(info["nm_patterns"]) or "none")
    return table


def report_table(rep: dict) -> Table:
    table = Table(title="taylorprune report", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("method", f"{rep['method']} (update: {rep['update']})")
    table.add_row("pattern", str(rep["pattern"]))
    table.add_row("source", str(rep["source"]))
    table.add_row("achieved sparsity (report)", _num(rep["achieved_sparsity"]))
    agree = {True: "[green]yes[/]", False: "[bold red]NO[/]", None: "n/a"}[rep["matches_weights"]]
    table.add_row("weights agree with report", agree)
    if rep["calibration"]:
        cal = rep["calibration"]
        table.add_row("calibration", f"{cal.get('source')}: {cal.get('nsamples')}×{cal.get('seqlen')} tokens")
    if rep["evaluation"]:
        ev = rep["evaluation"]
        table.add_row(f"perplexity ({ev.get('dataset')}, {ev.get('windows')}×{ev.get('seqlen')})",
                      _num(ev.get("perplexity"), 3))
    table.add_row("taylorprune version", str(rep["taylorprune"]))
    return table


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value)


# --------------------------------------------------------------------------------------------------- sweep


def sweep(
    model: opt.Model,
    out_dir: Path = typer.Option(..., "--out", help="Folder for results.json, results.md, ppl_vs_sparsity.png."),
    methods: str = typer.Option("magnitude,wanda", help="Comma-separated methods (see `taylorprune methods`)."),
    sparsities: str = typer.Option(DEFAULT_SPARSITIES, help="Comma-separated unstructured sparsities."),
    patterns: str = typer.Option("unstructured", help="Comma-separated: unstructured and/or N:M (e.g. 2:4)."),
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
    eval_dataset: opt.EvalDataset = "wikitext2",
    eval_text_file: opt.EvalTextFile = None,
    eval_seqlen: opt.EvalSeqLen = None,
    max_windows: opt.MaxWindows = None,
    keep_models: bool = typer.Option(False, help="Also write every pruned model under OUT/models/<name>."),
    overwrite: bool = typer.Option(False, help="Replace results (and kept models) already in --out."),
    trust_remote_code: opt.TrustRemoteCode = False,
    option: list[str] = typer.Option([], help="Method option KEY=VALUE for every point (repeatable), as in "
                                     "`run`, e.g. alpha=0.5 or grad_scale=100."),
) -> None:
    """Prune one model with methods × sparsities (× N:M patterns), evaluate each, tabulate and plot."""
    from taylorprune import pipeline
    from taylorprune.cli import guarded, parse_method_options, progress
    from taylorprune.report import sweep as sw

    with guarded():
        points = sw.grid(sw.parse_methods(methods), sw.parse_sparsities(sparsities), sw.parse_patterns(patterns))
        base = pipeline.RunOptions(
            model=model, output=str(out_dir), group=group, targets=targets, calib=calib, calib_file=calib_file,
            nsamples=nsamples, seqlen=seqlen, seed=seed, calib_sampling=calib_sampling, batch_size=batch_size,
            dtype=dtype, device=device, overwrite=overwrite, trust_remote_code=trust_remote_code,
            eval_dataset=eval_dataset, eval_text_file=eval_text_file, eval_seqlen=eval_seqlen,
            max_windows=max_windows, method_options=parse_method_options(option),
        )
        run_opts, user_caches = sw.with_shared_caches(base, out_dir.expanduser())
        plan = sw.Sweep(run_opts, out_dir, points, keep_models, user_caches)
        with progress() as bar:
            hooks_for, on_row = _sweep_progress(bar, len(points))
            results = sw.run_sweep(plan, hooks_for, on_row)
        show_sweep(results, out_dir)


def _sweep_progress(bar, points: int):
    """Hooks per grid point: one overall bar, the point's own bars cleared when the next point starts."""
    from taylorprune.cli import _progress_hooks, err
    from taylorprune.pipeline import Hooks

    overall = bar.add_task("sweep", total=points + 1)

    def hooks_for(i: int, name: str) -> Hooks:
        for task in list(bar.task_ids):
            if task != overall:
                bar.remove_task(task)
        inner = _progress_hooks(bar)
        label = f"[{i}/{points}] {name}"
        bar.update(overall, description=label)
        return Hooks(phase=lambda phase: bar.update(overall, description=f"{label}: {phase}"), task=inner.task,
                     windows=inner.windows)

    def on_row(row: dict) -> None:
        bar.advance(overall)
        if row.get("error"):
            err.print(f"[red]✗[/] {row['name']}: {row['error']}", highlight=False, soft_wrap=True)
            return
        err.print(f"[green]✓[/] {row['name']}: perplexity {row['perplexity']:.3f}, sparsity "
                  f"{row['achieved_sparsity']:.4f}", highlight=False)

    return hooks_for, on_row


def show_sweep(results: dict, out_dir: Path) -> None:
    from taylorprune.cli import out
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
