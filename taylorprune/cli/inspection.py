"""``taylorprune inspect``: per-linear sparsity and N:M compliance of any Hugging Face folder, read lazily."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from taylorprune.cli.console import guarded, out


def inspect_cmd(
    folder: Path = typer.Argument(..., help="A Hugging Face model folder with *.safetensors (plain, or "
                                  "compressed-tensors pack-quantized)."),
    json_out: Path = typer.Option(None, "--json", help="Write the per-linear table and summary as JSON here."),
) -> None:
    """Per-linear grid, zeros, sparsity and N:M compliance read from the weight files (no model is loaded)."""
    from taylorprune.export import targets
    from taylorprune.report import jsonio
    from taylorprune.report.inspect_folder import inspect_folder

    with guarded():
        if json_out:  # before the tables: a table printed ahead of a failure reads as success
            targets.check_file(json_out, "--json")
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
    columns = (("shape", "right"), ("dtype", "left"), ("grid", "left"), ("zeros", "right"), ("sparsity", "right"),
               ("N:M held", "left"))
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=True)
    for r in info["linears"]:
        shape = "×".join(map(str, r["shape"]))
        nm = " ".join(r["nm"]) or "-"
        table.add_row(r["name"].removesuffix(".weight"), shape, r["dtype"], grid_text(r.get("grid")),
                      f"{r['zeros']:,}", f"{r['sparsity']:.4f}", nm)
    return table


def grid_text(grid: dict | None) -> str:
    """'4b g32 sym' (``ch``: one group per output channel) for a quantized linear, '-' for a float one; the scale
    dtype is in the JSON."""
    if not grid:
        return "-"
    group = "ch" if grid["group_size"] == -1 else f"g{grid['group_size']}"
    return f"{grid['wbits']}b {group} {'sym' if grid['symmetric'] else 'asym'}"


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
    st = rep.get("structured")
    if st:
        params, size, widths = st.get("parameters") or {}, st.get("file_bytes") or {}, st.get("config") or {}
        table.add_row("structures removed", ", ".join(st.get("kinds") or []))
        table.add_row("widths", ", ".join(f"{k}={v}" for k, v in widths.items()))
        if params:
            table.add_row("parameters before → after", f"{params['before']:,} → {params['after']:,}")
        if size.get("after"):
            table.add_row("weight bytes before → after", f"{size['before']:,} → {size['after']:,}")
    q = rep.get("quantize")
    if q:
        table.add_row("quantization", f"{q.get('method')} {q.get('wbits')}-bit, group {q.get('group_size')}, "
                      f"{'symmetric' if q.get('symmetric') else 'asymmetric'}")
        if q.get("bits_per_weight") is not None:
            table.add_row("bits per quantized weight (scales counted)", _num(q["bits_per_weight"], 3))
    written = rep.get("write")
    if written:
        table.add_row(f"weight bytes ({written.get('format')})", f"{written.get('file_bytes'):,}")
    table.add_row("taylorprune version", str(rep["taylorprune"]))
    return table


def _num(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else str(value)
