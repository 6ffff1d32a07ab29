"""``taylorprune methods``: the registered methods, the statistics and options each takes (from their specs)."""

from __future__ import annotations

import inspect
import json
import re

import typer
from rich.markup import escape
from rich.table import Table

from taylorprune.cli.console import guarded, out


def _option_specs(method) -> list:
    from taylorprune.stats.registry import sources_for

    groups = [method.options] + [s.options for s in sources_for(method.statistics)]
    seen: dict[str, object] = {}
    for g in groups:
        for spec in g.specs():
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def _structured(method) -> dict[str, str]:
    from taylorprune.scoring.registry import group_summaries

    return group_summaries(method) if method.structured is not None else {}


def record(method) -> dict:
    """A method's declaration as plain data (``methods --json``)."""
    from taylorprune.stats.registry import STATISTICS

    return {"name": method.name, "summary": method.summary, "paper": method.paper,
            "updates_weights": method.updates_weights,
            "structured": _structured(method),
            "statistics": {s: STATISTICS[s].scope.value for s in method.statistics},
            "options": [{"name": s.name, "flag": s.flag, "type": s.kind.__name__, "default": s.default,
                         "choices": list(s.choices) if s.choices else None, "help": s.help}
                        for s in _option_specs(method)]}


def methods(
    name: str = typer.Argument(None, help="Show one method in detail: its description and options."),
    as_json: bool = typer.Option(False, "--json", help="Print every method's declaration as JSON."),
) -> None:
    """List the registered pruning methods, the statistics they need and their options."""
    from taylorprune.scoring.registry import METHODS, get_method
    from taylorprune.stats.registry import STATISTICS

    with guarded():
        if as_json:
            chosen = [get_method(name)] if name else sorted(METHODS.values(), key=lambda m: m.name)
            print(json.dumps([record(m) for m in chosen], indent=2, ensure_ascii=False))
            return
        if name is not None:
            show_method(get_method(name))
            return
        table = Table(title="registered methods (taylorprune methods NAME for details)")
        for col in ("method", "score", "structured score (--structure)", "statistics (scope)", "options (defaults)",
                    "paper"):
            table.add_column(col)
        for m in sorted(METHODS.values(), key=lambda m: m.name):
            stats = ", ".join(f"{s} ({STATISTICS[s].scope.value})" for s in m.statistics) or "-"
            options = ", ".join(f"{s.name}={s.shown_default()}" for s in _option_specs(m)) or "-"
            structured = "; ".join(f"{w + ': ' if w else ''}{s.split(':')[0]}" for w, s in _structured(m).items())
            table.add_row(m.name, escape(m.summary), escape(structured or "-"), stats, escape(options), m.paper)
        out.print(table)


def reflow(doc: str) -> str:
    """A docstring as paragraphs of one line each; a bullet ("- ") starts a new line, as it does in the source."""
    paragraphs = []
    for para in inspect.cleandoc(doc).split("\n\n"):
        items = re.split(r"\n\s*(?=- )", para)
        paragraphs.append("\n".join(" ".join(item.split()) for item in items))
    return "\n\n".join(paragraphs)


def show_method(method) -> None:
    from taylorprune.stats.registry import sources_for

    out.print(f"[bold]{method.name}[/]: {escape(method.summary)} ({method.paper})", highlight=False)
    doc = inspect.getmodule(method.score or method.solve).__doc__ or ""
    out.print(escape(reflow(doc)), highlight=False)
    table = Table(title="options")
    for col in ("flag", "default", "meaning"):
        table.add_column(col)
    for spec in _option_specs(method):
        choices = f" ({', '.join(spec.choices)})" if spec.choices else ""
        table.add_row(spec.flag, escape(spec.shown_default()), escape(spec.help + choices))
    out.print(table)
    groups = _structured(method)
    if not groups:
        out.print("structured score (--structure neurons|heads): none", highlight=False)
    for when, summary in groups.items():
        out.print(escape(f"structured score (--structure neurons|heads{', ' + when if when else ''}): {summary}"),
                  highlight=False)
    if groups:
        out.print("structured ranking: within each block, the same count of each structure in every block (uniform "
                  "widths); --structure blocks ranks blocks over the model by --block-score instead.", highlight=False)
    for source in sources_for(method.statistics):
        out.print(escape(f"statistic {', '.join(source.outputs)} ({source.scope.value} scope): {source.summary}"),
                  highlight=False)
