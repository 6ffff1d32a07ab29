"""docs/GPU.md of scripts/gpu_check.py: rows kept from earlier calls on the same card, and the markdown."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from gpu_common import ANCHORS, Bench


def merge_previous(bench: Bench, path: Path, card: str) -> None:
    """Keep rows measured by an earlier call on the same card and shapes that this call did not measure, so the
    parts can run in separate calls (``--only a,b`` then ``--only c,d``) into one docs/GPU.md."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if before.get("card") != card or before.get("shapes") != bench.shapes.__dict__:
        return
    merged = dict(before.get("rows", {}))
    for name, row in bench.results.items():
        if "skipped" not in row or name not in merged or "skipped" in merged[name]:
            merged[name] = row
    bench.results = merged
    bench.notes = list(dict.fromkeys(before.get("notes", []) + bench.notes))


def _num(row: dict | None, key: str, fmt: str = "{:.2f}") -> str:
    if not row:
        return "–"
    if "error" in row:
        return "error"
    if "skipped" in row:
        return "not run"
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def _ratio(a: dict | None, b: dict | None, key: str = "prune_s") -> str:
    if not a or not b or key not in a or key not in b or not b[key]:
        return "–"
    return f"{a[key] / b[key]:.2f}×"


def render(bench: Bench, card: str, more: list[str] | None = None) -> str:
    r, s = bench.results, bench.shapes
    made_small, made_full = r.get("make-small"), r.get("make-full")
    lines = [f"# GPU benchmark: {card}", "",
             f"`python scripts/gpu_check.py{' --smoke' if bench.args.smoke else ''}` (torch {torch.__version__}); "
             f"random LLaMA-shaped checkpoints (hidden {s.hidden}, MLP {s.inter}, {s.heads} heads, vocabulary "
             f"{s.vocab}, {s.dtype}); {s.nsamples} × {s.seqlen} sequential calibration windows of the bundled "
             "WikiText-2 validation text; 50% unstructured.", ""]
    if made_small and "params_b" in made_small:
        lines.append(f"Small model: {s.small_blocks} blocks, {made_small['params_b']:.3g} B parameters, "
                     f"{made_small['size_gib']:.3g} GiB.")
    if made_full and "params_b" in made_full:
        lines.append(f"Full model: {s.full_blocks} blocks, {made_full['params_b']:.3g} B parameters, "
                     f"{made_full['size_gib']:.3g} GiB.")
    lines += ["", "## (a) Prune phase against the official code (same windows, same GPU)", "",
              "| run | placement | prune (s) | vs official | peak GPU (GiB) |", "| --- | --- | ---: | ---: | ---: |"]
    for name, label, ref in (("a-wanda", "wanda (auto: resident)", "a-official-wanda"),
                             ("a-wanda-stream", "wanda --stream", "a-official-wanda"),
                             ("a-wanda-devmap", "wanda --device-map auto", "a-official-wanda"),
                             ("a-official-wanda", "official prune_wanda", None),
                             ("a-sparsegpt", "sparsegpt (auto)", "a-official-sparsegpt"),
                             ("a-official-sparsegpt", "official prune_sparsegpt", None)):
        row = r.get(name)
        if row is None:
            continue
        lines.append(f"| {label} | {row.get('placement') or ('–' if ref else 'whole model on the device')} | "
                     f"{_num(row, 'prune_s')} | {_ratio(row, r.get(ref)) if ref else ''} | "
                     f"{_num(row, 'peak_gpu_gib')} |")
    if "mask_agreement" in r.get("a-official-wanda", {}):
        lines.append(f"\nWanda masks, ours vs official: {100 * r['a-official-wanda']['mask_agreement']:.3f}% of "
                     "entries agree.")
    b = r.get("b")
    lines += ["", "## (b) Gradient pass over one plain forward+backward (same model and windows)", ""]
    if b and "plain_s" in b:
        lines += ["| pass | seconds | / plain fwd+bwd |", "| --- | ---: | ---: |",
                  f"| plain forward+backward | {b['plain_s']:.2f} | 1.00× |",
                  f"| gradient pass, in memory | {b['in_memory_s']:.2f} | {b['in_memory_ratio']:.2f}× "
                  "(target ≤ 1.3×) |",
                  f"| block by block, model resident | {b['blockwise_resident_s']:.2f} | "
                  f"{b['blockwise_resident_ratio']:.2f}× |",
                  f"| block by block, streamed from CPU | {b['streamed_from_cpu_s']:.2f} | "
                  f"{b['streamed_from_cpu_ratio']:.2f}× (peak GPU {_num(b, 'streamed_peak_gpu_gib')} GiB) |"]
    else:
        lines.append(f"not measured ({(b or {}).get('error') or (b or {}).get('skipped') or 'not run'})")
    lines += ["", "## (c) A memory cap below the model's size (--max-gpu-memory, streamed)", "",
              "| method | windows | cap (GiB) | model (GiB) | placement | streamed passes | stats + prune (s) | "
              "peak GPU (GiB) |", "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for name, label in (("c-gblm", "gblm"), ("c-oba-block", "oba full, block scope")):
        row = r.get(name)
        if row is None:
            continue
        total = row.get("prune_s", 0.0) + row.get("stats_s", 0.0) if "prune_s" in row else None
        lines.append(f"| {label} | {s.cap_nsamples} | {_num(row, 'cap_gib', '{:.3g}')} | "
                     f"{_num(row, 'model_gib', '{:.3g}')} | "
                     f"{row.get('placement', '–')} | {', '.join(row.get('streamed', [])) or '–'} | "
                     f"{'–' if total is None else f'{total:.2f}'} | {_num(row, 'peak_gpu_gib')} |")
    lines += ["", f"## (d) {s.full_blocks} blocks at {s.nsamples} × {s.seqlen}", "",
              "| method | placement | stats (s) | prune (s) | peak GPU (GiB) | A100 anchor (Wanda++) |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    for method in ("wanda", "gblm", "sparsegpt"):
        row = r.get(f"d-{method}")
        small_row = r.get(f"a-{method}") or {}
        if (row is None or "prune_s" not in row) and "prune_s" in small_row:  # SparseGPT's cost is per linear
            guess = small_row["prune_s"] * s.full_blocks / s.small_blocks
            lines.append(f"| {method} | – | – | ≈ {guess:.0f} (extrapolated: {s.small_blocks}-block row × "
                         f"{s.full_blocks // s.small_blocks}; not run) | – | {ANCHORS[method]} |")
            continue
        if row is None:
            continue
        lines.append(f"| {method} | {row.get('placement', '–')} | {_num(row, 'stats_s')} | {_num(row, 'prune_s')} | "
                     f"{_num(row, 'peak_gpu_gib')} | {ANCHORS[method]} |")
    lines += more or []
    problems = [f"- {k}: {v.get('error') or v.get('skipped')}" for k, v in r.items() if "error" in v or "skipped" in v]
    if problems or bench.notes:
        lines += ["", "## Notes", ""] + problems + [f"- {n}" for n in bench.notes]
    lines.append(f"\nTotal {time.perf_counter() - bench.start:.0f} s.")
    return "\n".join(lines) + "\n"

