"""``taylorprune check``: gate a pruned model against a baseline (exit 0 pass, 1 regression, 2 bad input)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from taylorprune.calib.text import EVAL_DATASETS
from taylorprune.cli.console import err, guarded, out, progress


def check(
    candidate: str = typer.Option(..., help="Eval JSON (`eval --json`), a taylorprune_report.json, or a model "
                                  "folder / .gguf file (evaluated now with the eval options below)."),
    baseline: str = typer.Option(None, help="Same kinds as --candidate; needed by relative limits."),
    max_ppl_increase: str = typer.Option(None, help="Allowed rise of perplexity over the baseline: 5% or 0.05 "
                                         "(candidate ppl <= baseline × 1.05)."),
    max_ppl: float = typer.Option(None, help="Absolute ceiling on the candidate's perplexity."),
    max_increase: list[str] = typer.Option(None, help="METRIC=AMOUNT (repeatable): allowed rise of a metric where "
                                           "lower is better, a percentage of the baseline (perplexity=5%) or an "
                                           "absolute amount (perplexity=2)."),
    max_drop: list[str] = typer.Option(None, help="METRIC=AMOUNT (repeatable): allowed fall of a metric where "
                                       "higher is better (prefill_ratio=10%, an accuracy=0.01)."),
    min_sparsity: float = typer.Option(None, help="Minimum sparsity read from the candidate's weights (the "
                                       "report's linears, else 2-D weights in decoder blocks)."),
    allow_mismatch: bool = typer.Option(False, help="Compare even if the evaluation settings differ."),
    dataset: str = typer.Option(None, help=f"Models only: test split ({', '.join(EVAL_DATASETS)}; default "
                                "wikitext2 unless --text-file)."),
    text_file: str = typer.Option(None, help="Models only: evaluate on this text file instead."),
    seqlen: int = typer.Option(None, help="Models only: window length (default: min(2048, max positions))."),
    max_windows: int = typer.Option(None, help="Models only: evaluate at most this many windows."),
    device: str = typer.Option("auto", help="Models only: auto, cpu, cuda, ..."),
    dtype: str = typer.Option("auto", help="Models only: auto, float32, bfloat16 or float16."),
    json_out: Path = typer.Option(None, "--json", help="Write the verdict as JSON here."),
    junit: Path = typer.Option(None, help="Write JUnit XML here (one testcase per check)."),
) -> None:
    """Gate a candidate against a baseline: exit 0 within tolerance, 1 on a regression, 2 on bad input."""
    from taylorprune.errors import RunError
    from taylorprune.export import targets
    from taylorprune.report import check as chk
    from taylorprune.report import check_sides as sides
    from taylorprune.report.junit import write_junit

    with guarded() as session:
        gates = chk.legacy_gates(max_ppl_increase, max_ppl)
        gates += [chk.parse_gate(g, "increase", "--max-increase") for g in max_increase or []]
        gates += [chk.parse_gate(g, "drop", "--max-drop") for g in max_drop or []]
        chk.validate_gates(gates, min_sparsity, baseline is not None)
        settings = sides.EvalSettings(dataset, text_file, seqlen, max_windows, device, dtype)
        cand_path = sides.existing(candidate, "--candidate")
        base_path = sides.existing(baseline, "--baseline") if baseline is not None else None
        read = [p for p in (cand_path, base_path) if p is not None and p.is_file()]
        targets.check_files((("--json", json_out), ("--junit", junit)), read)
        weights_dir = sides.weights_folder(cand_path) if min_sparsity is not None else None
        if sides.is_model(cand_path) or (base_path is not None and sides.is_model(base_path)):
            sides.validate_eval_settings(settings)
        with progress() as bar:
            base, cand = sides.load_sides(base_path, cand_path, settings, allow_mismatch, lambda: session.hooks(bar),
                                          note)
        sparsity = sides.candidate_sparsity(weights_dir) if weights_dir is not None else None
        verdict = chk.verdict(base, cand, gates, sparsity, min_sparsity, allow_mismatch)
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


def note(text: str) -> None:
    """A line on stderr about how an input was read (an older report's layout): worth knowing, not a failure."""
    err.print(f"[cyan]note:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _check_cells(value: float | None, limit: float, relative: bool) -> tuple[str, str]:
    if value is None or not math.isfinite(value):
        shown = str(value)
    elif relative:
        shown = f"{value:+.2%}"
    else:
        shown = f"{value:.4f}"
    return shown, (f"{limit:+.2%}" if relative else f"{limit:g}")


def show_verdict(verdict) -> None:
    table = Table(title="taylorprune check")
    for col, justify in (("check", "left"), ("value", "right"), ("limit", "right"), ("result", "left")):
        table.add_column(col, justify=justify)
    for c in verdict.checks:
        value, limit = _check_cells(c.value, c.limit, c.relative)
        table.add_row(c.name, value, limit, "[green]pass[/]" if c.passed else "[bold red]FAIL[/]")
    sides = [("candidate", verdict.candidate)] + ([("baseline", verdict.baseline)] if verdict.baseline else [])
    parts = [f"{name} {', '.join(f'{k} {v:.4f}' for k, v in side['metrics'].items() if isinstance(v, float | int))}"
             for name, side in reversed(sides)]
    table.caption = " · ".join(parts)
    out.print(table)
    out.print("[green]passed[/]" if verdict.passed else "[bold red]failed[/]")
