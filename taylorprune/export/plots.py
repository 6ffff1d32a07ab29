"""Figures for sweeps and run reports, drawn with matplotlib's Agg renderer.

``Figure`` is used directly (not ``pyplot``): no process-wide backend switch, no GUI, no figure registry to leak
into, so plotting is safe on headless CI machines and inside tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

BLOCK_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
NM_MARKERS = "sD^v<>p*"


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120)


def _value(row: dict, metric: str):
    return (row.get("metrics") or {}).get(metric, row.get(metric))


def _finite(rows: Iterable[dict], metric: str = "perplexity") -> list[dict]:
    """Rows whose metric can sit on a log axis (a collapsed model's inf perplexity cannot)."""
    return [r for r in rows if isinstance(_value(r, metric), int | float) and math.isfinite(_value(r, metric))
            and _value(r, metric) > 0]


def plot_sweep(rows: list[dict], dense: dict | None, model: str, path: Path, eval_label: str = "",
               metric: str = "perplexity") -> None:
    """A metric (log) against sparsity: a line per method (unstructured), N:M points as markers, dense as
    reference."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    nm = list(dict.fromkeys(r["pattern"] for r in rows if r["pattern"] != "unstructured"))
    markers = {p: NM_MARKERS[i % len(NM_MARKERS)] for i, p in enumerate(nm)}  # one shape per N:M pattern
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        mine = _finite((r for r in rows if r["method"] == method), metric)
        line = sorted((r for r in mine if r["pattern"] == "unstructured"), key=lambda r: r["sparsity"])
        color = f"C{i % 10}"  # one colour per method
        if line:
            ax.plot([r["sparsity"] for r in line], [_value(r, metric) for r in line], "o-", color=color, label=method)
        for r in mine:
            if r["pattern"] != "unstructured":
                ax.plot([r["sparsity"]], [_value(r, metric)], markers[r["pattern"]], color=color, markersize=9,
                        linestyle="none", label=f"{method} {r['pattern']}")
    if dense and _finite([dense], metric):
        ax.axhline(_value(dense, metric), color="0.4", linestyle="--", linewidth=1,
                   label=f"dense ({_value(dense, metric):.2f})")
    if _finite(rows, metric) or (dense and _finite([dense], metric)):
        ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"{metric}{f' ({eval_label})' if eval_label else ''}, log scale")
    ax.set_title(f"{model}: {metric} vs sparsity")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def plot_layer_sparsity(report: dict, path: Path) -> None:
    """Sparsity of every pruned linear by decoder block, one line per projection; the target as reference.

    Shows at a glance whether a run pruned evenly (Wanda per row: flat lines) or moved sparsity between
    layers (``--group layer``, ``--targets``). ``report`` is a ``taylorprune_report.json`` dict.
    """
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    series: dict[str, list[tuple[int, float]]] = {}
    for i, lin in enumerate(report.get("linears") or []):
        found = BLOCK_INDEX.search(f".{lin['name']}.")
        block = int(found.group(1)) if found else i
        series.setdefault(lin["name"].rsplit(".", 1)[-1], []).append((block, float(lin["sparsity"])))
    for kind, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", markersize=4, label=kind)
    if report.get("sparsity") is not None:
        ax.axhline(float(report["sparsity"]), color="0.4", linestyle="--", linewidth=1,
                   label=f"target {float(report['sparsity']):g}")
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_title(f"{report.get('method', '?')} · {report.get('pattern', '?')}: per-layer sparsity")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    _save(fig, path)
