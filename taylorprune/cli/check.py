"""``taylorprune check``: gate a pruned model against a baseline (exit 0 pass, 1 regression, 2 bad input)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.table import Table

from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.cli.console import err, guarded, out, progress


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
    from taylorprune.errors import RunError
    from taylorprune.report import check as chk
    from taylorprune.report.junit import write_junit

    with guarded() as session:
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
            base, cand = chk.load_sides(base_path, cand_path, settings, allow_mismatch, lambda: session.hooks(bar))
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
