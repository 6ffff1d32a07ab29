#!/usr/bin/env python
"""Accuracy beside perplexity on SmolLM2-135M for the main rows (issue #24): dense, SparseGPT, SparseGPT + recon,
the best structured rows (and the recovery rows, issue #23).

Protocol: as scripts/bench_quality.py (calibration 128 × 512 sequential windows of WikiText-2 validation;
perplexity on the first 40 × 512 windows of the WikiText-2 raw test split) plus `--tasks wikitext_lastword`
(the bundled LAMBADA-style task: 500 WikiText-2 test paragraphs, is the last word the greedy continuation; acc),
zero-shot, through lm-eval in the same `taylorprune run` process as the pruning (`taylorprune eval` for dense).
Results accumulate in docs/bench_zeroshot.json (``--resume`` skips rows already there); the table goes to
docs/bench_zeroshot.md and into docs/BENCHMARKS.md.

    python scripts/bench_zeroshot.py            # every row (about 40 minutes on 2 CPU cores)
    python scripts/bench_zeroshot.py --only dense,sparsegpt-50
    python scripts/bench_zeroshot.py --render
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quality import CALIB_ARGS, DOC, EVAL_ARGS, RESULTS, TEST, dense_folder, render, row_parser, taylorprune  # noqa: E402

DOCS = ROOT / "docs"
JSON, MD = DOCS / "bench_zeroshot.json", DOCS / "bench_zeroshot.md"
TASKS = ["--tasks", "wikitext_lastword", "--tasks-batch-size", "4"]
CALIB = [*CALIB_ARGS, "--nsamples", "128"]
# name -> (what it is, `run` arguments); "dense" is evaluated, not pruned
ROWS: dict[str, tuple[str, list[str]]] = {
    "dense": ("dense", []),
    "sparsegpt-50": ("SparseGPT 50%", ["--method", "sparsegpt", "--sparsity", "0.5"]),
    "sparsegpt-recon-50": ("SparseGPT + recon block 50%", ["--method", "sparsegpt", "--sparsity", "0.5",
                                                           "--recon", "block"]),
    "sparsegpt-recon-2of4": ("SparseGPT + recon block 2:4", ["--method", "sparsegpt", "--pattern", "2:4",
                                                             "--recon", "block"]),
    "neurons-oba-20": ("neurons, oba-recon + compensation, 20% of parameters",
                       ["--structure", "neurons", "--target-params", "0.2", "--method", "oba"]),
    "neurons-oba-30": ("neurons, oba-recon + compensation, 30% of parameters",
                       ["--structure", "neurons", "--target-params", "0.3", "--method", "oba"]),
}


def measure(model: Path, work: Path, name: str) -> dict:
    what, args = ROWS[name]
    if name == "dense":
        out = work / "dense-zeroshot.json"
        taylorprune("eval", "--model", str(model), "--text-file", str(TEST), "--seqlen", "512", "--max-windows", "40",
                    *TASKS, "--json", str(out), "--device", "cpu")
        got = json.loads(out.read_text())
        return {"what": what, "metrics": got["metrics"], "zeroshot": got["evaluation"]["zeroshot"], "prune_s": 0.0,
                "args": []}
    folder = work / f"zeroshot-{name}"
    taylorprune("run", "--model", str(model), *args, *CALIB, *EVAL_ARGS, "--eval", *TASKS, "--device", "cpu",
                "--output", str(folder), "--overwrite")
    rep = json.loads((folder / "taylorprune_report.json").read_text())
    for weights in folder.glob("*.safetensors"):  # ~0.5 GB a row; the report is what the table needs
        weights.unlink()
    removed = (rep.get("structured") or {}).get("parameters", {}).get("removed_fraction")
    return {"what": what, "metrics": rep["metrics"], "zeroshot": rep["evaluation"]["zeroshot"],
            "prune_s": rep["phases_s"].get("prune", 0.0) + rep["phases_s"].get("model_statistics", 0.0),
            "sparsity": rep.get("achieved_sparsity"), "removed_params": removed, "args": args}


def table(results: dict) -> str:
    dense = results.get("dense")
    lines = ["## Accuracy beside perplexity (issue #24)", "",
             "SmolLM2-135M-Instruct, the main rows of this page re-run with `--tasks wikitext_lastword` (the bundled "
             "LAMBADA-style task: 500 WikiText-2 test paragraphs, accuracy = the paragraph's last word is the "
             "greedy continuation; zero-shot, lm-eval in the run's own process). Calibration 128 × 512 sequential "
             "windows of WikiText-2 validation; PPL on the first 40 × 512 windows of the WikiText-2 raw test split. "
             "Made by `python scripts/bench_zeroshot.py` (raw numbers in `docs/bench_zeroshot.json`).", "",
             "| row | PPL | × dense | last-word acc | ± stderr | × dense acc | prune + stats (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        task = r["zeroshot"]["tasks"]["wikitext_lastword"]
        ppl, acc = r["metrics"]["perplexity"], task["value"]
        vs_ppl = f"{ppl / dense['metrics']['perplexity']:.2f}" if dense else "-"
        vs_acc = f"{acc / dense['zeroshot']['tasks']['wikitext_lastword']['value']:.3f}" if dense else "-"
        lines.append(f"| {r['what']} | {ppl:.2f} | {vs_ppl} | {acc:.4f} | {task['stderr']:.4f} | {vs_acc} | "
                     f"{r['prune_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = row_parser(__doc__, "comma-separated row names").parse_args()
    results = json.loads(JSON.read_text()) if JSON.is_file() else {}
    if args.list:
        print("\n".join(f"{'✓' if n in results else '?'} {n}: {w}" for n, (w, _) in ROWS.items()))
        return
    if not args.render:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        model = dense_folder(work)
        for name in (args.only.split(",") if args.only else ROWS):
            if args.resume and name in results:
                continue
            results[name] = measure(model, work, name)
            JSON.write_text(json.dumps(results, indent=2) + "\n")
            MD.write_text(table(results))
    MD.write_text(table(results))
    DOC.write_text(render(json.loads(RESULTS.read_text())))
    print(MD.read_text())


if __name__ == "__main__":
    main()
