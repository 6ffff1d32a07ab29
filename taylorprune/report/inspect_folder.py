"""``taylorprune inspect``: what a written folder really holds, read from its weights rather than believed.

The report a run writes says what the run intended; this reads the safetensors back (lazily, one tensor at a
time) so a folder that was copied, re-saved, quantized or fine-tuned since is described as it is now.
"""

from __future__ import annotations

import json
from pathlib import Path

from taylorprune.errors import UserError
from taylorprune.export.save import REPORT_NAME
from taylorprune.report import weights


def read_report(folder: Path) -> dict | None:
    """The folder's taylorprune report, None without one; an unreadable one is an error, not silence."""
    path = folder / REPORT_NAME
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable taylorprune report ({exc})") from None
    if not isinstance(report, dict):
        raise UserError(f"{path}: not a taylorprune report (expected a JSON object)")
    return report


def report_summary(report: dict, rows: list[weights.TensorSparsity]) -> dict:
    """The few report fields worth seeing next to the weights, and whether the two agree.

    Agreement is judged over the linears the report lists (a ``--targets`` run prunes only some), so
    ``weights_sparsity`` is None when the scanned tensors do not cover them all.
    """
    listed = {f"{lin['name']}.weight" for lin in report.get("linears") or [] if isinstance(lin, dict)}
    covered = [r for r in rows if r.name in listed]
    on_disk = weights.total(covered)[2] if listed and len(covered) == len(listed) else None
    claimed = report.get("achieved_sparsity")
    return {
        "method": report.get("method"),
        "update": report.get("update"),
        "pattern": report.get("pattern"),
        "target_sparsity": report.get("sparsity"),
        "achieved_sparsity": claimed,
        "weights_sparsity": on_disk,
        "matches_weights": None if on_disk is None or claimed is None else abs(float(claimed) - on_disk) < 1e-9,
        "linears": len(listed),
        "calibration": report.get("calibration"),
        "evaluation": _perplexity(report.get("evaluation")),
        "metrics": report.get("metrics") or {},
        "source": (report.get("source") or {}).get("model"),
        "taylorprune": (report.get("versions") or {}).get("taylorprune"),
        "structured": _structured(report.get("structured")),
        "quantize": _quantize(report.get("quantize")),
        "write": report.get("write") if isinstance(report.get("write"), dict) else None,
    }


def _quantize(record) -> dict | None:
    """A quantized run's grid and bits per weight (None when nothing was quantized)."""
    if not isinstance(record, dict):
        return None
    return {k: record.get(k) for k in ("method", "wbits", "group_size", "symmetric", "bits_per_weight", "linears")}


def _perplexity(evaluation) -> dict | None:
    """The perplexity record of a report (reports before evaluators kept it as the whole ``evaluation``)."""
    if isinstance(evaluation, dict) and isinstance(evaluation.get("perplexity"), dict):
        return evaluation["perplexity"]
    return evaluation or None


def _structured(record) -> dict | None:
    """A structured run's widths, parameters and sizes (None for masks)."""
    if not isinstance(record, dict):
        return None
    return {k: record.get(k) for k in ("kinds", "config", "parameters", "file_bytes")}


def inspect_folder(folder: Path) -> dict:
    """Per-linear sparsity and N:M compliance, totals, and the report summary (JSON-ready).

    Linears are chosen by the block rule of ``weights`` (not the report's list), so the totals of a pruned
    folder and of its dense source are computed over the same tensors and can be compared.
    """
    if not folder.is_dir():
        raise UserError(f"DIR {folder}: no such folder" if not folder.exists() else f"DIR {folder}: not a folder")
    rows = weights.scan(folder)
    numel, zeros, sparsity = weights.total(rows)
    report = read_report(folder)
    return {
        "folder": str(folder),
        "linears": [r.to_dict() for r in rows],
        "total": {"linears": len(rows), "numel": numel, "zeros": zeros, "sparsity": sparsity},
        "nm_patterns": weights.common_nm(rows),
        "report": report_summary(report, rows) if report is not None else None,
    }
