"""A sweep's results files: results.json (strict JSON), results.md (a table), and the plot of a metric.

The runner is ``pipeline.sweep``; this module only renders what it returns. Any metric an evaluator declares can
be tabulated and plotted (``--metric``, default perplexity); rows keep every metric.
"""

from __future__ import annotations

import math
from pathlib import Path

from taylorprune.export import plots
from taylorprune.pipeline import versions
from taylorprune.pipeline.sweep import RESULTS_JSON, Sweep
from taylorprune.report import jsonio

RESULTS_MD = "results.md"
DEFAULT_METRIC = "perplexity"


def plot_name(metric: str) -> str:
    return "ppl_vs_sparsity.png" if metric == DEFAULT_METRIC else f"{metric}_vs_sparsity.png"


def build_results(sweep: Sweep, dense: dict, rows: list[dict], metric: str = DEFAULT_METRIC) -> dict:
    ev = ((dense.get("evaluation") or {}).get("perplexity")) or {}
    return {
        "model": sweep.run.model,
        "metric": metric,
        "evaluation": {k: ev[k] for k in ("dataset", "seqlen", "windows", "tokens") if k in ev},
        "calibration": next((r["calibration"] for r in rows if r.get("calibration")), None),
        "dense": dense,
        "rows": rows,
        "versions": versions(),
    }


def write_results(results: dict, out: Path) -> None:
    """results.json (strict JSON: a collapsed model's inf perplexity is null), results.md, the plot."""
    metric = results.get("metric", DEFAULT_METRIC)
    jsonio.dump(results, out / RESULTS_JSON)
    (out / RESULTS_MD).write_text(markdown(results))
    ev = results["evaluation"]
    label = f"{ev['dataset']}, {ev['windows']}×{ev['seqlen']}" if metric == DEFAULT_METRIC and ev else ""
    plots.plot_sweep(results["rows"], results["dense"], model_label(results["model"]), out / plot_name(metric),
                     label, metric)


def model_label(model: str) -> str:
    """'stories260K' for a folder path, the hub id as given otherwise."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def value(row: dict, metric: str) -> float:
    """A row's value of ``metric`` (nan when the row has none: a failed point, an evaluator that did not run)."""
    got = (row.get("metrics") or {}).get(metric)
    return float(got) if isinstance(got, int | float) else math.nan


def markdown(results: dict) -> str:
    metric = results.get("metric", DEFAULT_METRIC)
    ev = results["evaluation"]
    dense = value(results["dense"], metric)
    where = f" on {ev['dataset']} ({ev['windows']} windows × {ev['seqlen']} tokens)" if metric == DEFAULT_METRIC else ""
    lines = [
        f"# Sweep: {model_label(results['model'])}",
        "",
        f"{metric.capitalize()}{where}; dense {_fmt(dense)}.",
        "",
        f"| method | pattern | sparsity | achieved | {metric} | vs dense | prune s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in [results["dense"], *results["rows"]]:
        mine = value(r, metric)
        ratio = mine / dense if math.isfinite(dense) and dense > 0 else math.nan
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.2f} | {r['achieved_sparsity']:.4f} | "
                     f"{_fmt(mine)} | {_fmt(ratio, '×')} | {r['prune_s'] + r['model_statistics_s']:.2f} |")
    failed = [r for r in results["rows"] if r.get("error")]
    if failed:
        lines += ["", "Failed points:", ""] + [f"- {r['name']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def _fmt(number: float, suffix: str = "") -> str:
    return f"{number:.3f}{suffix}" if math.isfinite(number) else str(number)
