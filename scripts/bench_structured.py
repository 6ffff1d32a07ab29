#!/usr/bin/env python
"""Structured pruning benchmark (issue #12): every structured score with and without compensation at 10/20/30%
fewer total parameters, the LLM-Pruner-style baseline (taylor, vector-wise, no compensation) in the same table,
depth pruning rows, parameters, file size and prefill/decode tokens/s ratios to dense.

Protocol: SmolLM2-135M dense fp32 folder (dequantized from ../shared's GGUF once), calibration 128 × 512 sequential
windows of WikiText-2 validation, evaluation on the first 40 × 512 windows of the WikiText-2 raw test split, CPU.
Each configuration runs as its own `taylorprune run --structure ... --target-params P --speed` process (the
speed of the dense and the pruned model is measured in that process, on the same device). Results accumulate in
docs/bench_structured.json (``--resume`` skips rows already there); the table goes to docs/bench_structured.md
and into docs/BENCHMARKS.md between markers.

    python scripts/bench_structured.py                       # the full table (hours on 2 CPU cores)
    python scripts/bench_structured.py --only wanda,taylor   # some scores
    python scripts/bench_structured.py --render              # redraw the tables only
    python scripts/bench_structured.py --smoke               # stories260K, few windows: proves the script works
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_quality import CALIB, GGUF, TEST, dense_folder  # noqa: E402

DOCS = ROOT / "docs"
BEGIN, END = "<!-- bench_structured:begin -->", "<!-- bench_structured:end -->"
GRAD = ["--grad-cache", "{work}/grad-cache-structured-{nsamples}.safetensors"]

# name -> (structure, `run` arguments); compensation on/off is crossed with every width score.
SCORES: dict[str, list[str]] = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "taylor": ["--method", "taylor", *GRAD],
    "taylor-element": ["--method", "taylor", "--taylor-group", "element", *GRAD],
    "fisher": ["--method", "fisher", *GRAD],
    "gblm": ["--method", "gblm", *GRAD],
    "oba-recon": ["--method", "oba"],
    "sparsegpt-obs": ["--method", "sparsegpt"],
    # The authors use ~50 steps; one residual HVP of a 512-token window costs ~30 s on 2 cores, so 5 steps × 4
    # windows (~10 min of HVPs a run) stand in for it here.
    "oba-released": ["--method", "oba", "--oba-mode", "released", "--oba-steps", "5", "--oba-step-windows", "4"],
}
DEPTH: dict[str, list[str]] = {
    "blocks-influence": ["--block-score", "influence"],
    "blocks-loss": ["--block-score", "loss"],
    # L·(L+1)/2 block forwards: on 128 windows ~45 minutes on 2 cores; 16 windows (a row's --nsamples comes after
    # the protocol's and wins)
    "blocks-loss (16 windows)": ["--block-score", "loss", "--nsamples", "16"],
}
BASELINE = "taylor, no compensation"  # LLM-Pruner-style: vector-wise first-order Taylor, no weight update
TARGETS = (0.1, 0.2, 0.3)


def configs(names: set[str] | None) -> list[tuple[str, str, list[str]]]:
    """(row name, structure, arguments) of every configuration."""
    rows = []
    for name, args in SCORES.items():
        if names is None or name in names:
            rows.append((f"{name}, compensation", "neurons", args))
            rows.append((f"{name}, no compensation", "neurons", [*args, "--no-compensate"]))
    for name, args in DEPTH.items():
        if names is None or name in names:
            rows.append((name, "blocks", args))
    return rows


def planned(args: argparse.Namespace) -> dict[str, tuple[str, str, list[str], float]]:
    """Row key -> (name, structure, arguments, target), in run order: ``--keys`` as given, else every selected
    configuration at every ``--targets`` fraction."""
    keys = [k.strip() for k in args.keys.split(";")] if args.keys else None
    names = set(args.only.split(",")) if args.only and not keys else None
    targets = TARGETS if keys else tuple(float(t) for t in args.targets.split(","))
    rows = {f"{name} @ {target}": (name, structure, extra, target)
            for name, structure, extra in configs(names) for target in targets}
    if keys is None:
        return rows
    if unknown := [k for k in keys if k not in rows]:
        sys.exit(f"unknown row keys: {unknown}")
    return {k: rows[k] for k in keys}


def taylorprune(*args: str) -> None:
    print("+ taylorprune", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "taylorprune", *args], check=True)


def protocol(smoke: bool) -> dict:
    if smoke:
        data = ROOT / "taylorprune" / "assets" / "data"
        return {"calib": ["--calib-file", str(data / "wikitext2_valid.txt"), "--calib-sampling", "sequential",
                          "--nsamples", "8", "--seqlen", "128"],
                "eval": ["--eval-text-file", str(data / "wikitext2_raw_test.txt"), "--eval-seqlen", "128",
                         "--max-windows", "4"], "nsamples": 8, "model": "stories260K (bundled)"}
    return {"calib": ["--calib-file", str(CALIB), "--calib-sampling", "sequential", "--nsamples", "128",
                      "--seqlen", "512"],
            "eval": ["--eval-text-file", str(TEST), "--eval-seqlen", "512", "--max-windows", "40"], "nsamples": 128,
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)"}


def run_dense(model: Path, work: Path, proto: dict) -> dict:
    out = work / "dense-eval.json"
    ev = proto["eval"]
    taylorprune("eval", "--model", str(model), "--text-file", ev[1], "--seqlen", ev[3], "--max-windows", ev[5],
                "--json", str(out), "--device", "cpu")
    from taylorprune.modeling.loading import load

    loaded = load(str(model))
    params = sum(p.numel() for p in {id(p): p for p in loaded.model.parameters()}.values())
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    return {"name": "dense", "ppl": json.loads(out.read_text())["perplexity"], "parameters": params, "bytes": size}


def run_config(model: Path, work: Path, proto: dict, name: str, structure: str, args: list[str],
               target: float) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{target}")
    out = work / slug
    args = [a.format(work=work, nsamples=proto["nsamples"]) for a in args]
    taylorprune("run", "--model", str(model), "--structure", structure, "--target-params", str(target),
                *proto["calib"], *args, *proto["eval"], "--eval", "--speed", "--device", "cpu", "--output", str(out),
                "--overwrite")
    rep = json.loads((out / "taylorprune_report.json").read_text())
    st = rep["structured"]
    return {"name": name, "structure": structure, "target": target, "ppl": rep["metrics"]["perplexity"],
            "parameters": st["parameters"]["after"], "removed_fraction": st["parameters"]["removed_fraction"],
            "bytes": st["file_bytes"]["after"], "config": st["config"], "speed": st["speed"],
            "prune_s": sum(v for k, v in rep["phases_s"].items() if k in ("model_statistics", "select", "prune",
                                                                            "blocks")),
            "args": args}


def best_lines(results: dict, dense: dict) -> list[str]:
    lines = []
    for target in TARGETS:
        rows = [r for r in results.values() if r.get("target") == target]
        if not rows:
            continue
        best = min(rows, key=lambda r: r["ppl"])
        base = next((r for r in rows if r["name"] == BASELINE), None)
        same = [r["speed"] for r in rows if r["config"] == best["config"]]  # one architecture: pool its timings
        text = (f"- {target:.0%} fewer parameters: best **{best['name']}** ({best['structure']}), PPL "
                f"{best['ppl']:.2f} = {best['ppl'] / dense['ppl']:.2f}× dense; its architecture "
                f"({len(same)} runs) decodes {median(s['decode_ratio'] for s in same):.2f}× and prefills "
                f"{median(s['prefill_ratio'] for s in same):.2f}× dense (median)")
        if base is not None:
            text += f"; LLM-Pruner-style baseline PPL {base['ppl']:.2f} ({1 - best['ppl'] / base['ppl']:.0%} lower)"
        lines.append(text)
    return lines


def render(results: dict, proto: dict, smoke: bool) -> str:
    dense = results["dense"]
    lines = ["## Structured pruning" + (" (smoke configuration)" if smoke else ""), "",
             f"{proto['model']}: {dense['parameters']:,} parameters, {dense['bytes'] / 2**20:.1f} MiB of weights, "
             f"PPL {dense['ppl']:.2f}. Calibration `{' '.join(proto['calib'][2:])}` sequential windows; evaluation "
             f"`{' '.join(proto['eval'][2:])}`. Rows remove neurons (one intermediate_size for every block) or whole "
             "blocks, with `--target-params P`: the smallest uniform count reaching P of all parameters (embeddings "
             "included). Tokens/s: prefill of 512 tokens and greedy decode of 128 tokens, batch 1, dense and pruned "
             "timed in the same `run --speed` process (median of 3 after a warm-up). `taylor, no compensation` is "
             "the LLM-Pruner-style baseline (vector-wise first-order Taylor, no weight update).", "",
             "Made by `python scripts/bench_structured.py` (raw numbers in `docs/bench_structured.json`).", "",
             "| target | structure | score | removed | PPL | × dense | width | MiB | prefill × | decode × | prune s |",
             "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    rows = sorted((r for k, r in results.items() if k != "dense"), key=lambda r: (r["target"], r["ppl"]))
    for r in rows:
        c = r["config"]
        width = f"{c['num_hidden_layers']}L × {c['intermediate_size']}"
        cells = [f"{r['target']:.0%}", r["structure"], r["name"], f"{r['removed_fraction']:.1%}", f"{r['ppl']:.2f}",
                 f"{r['ppl'] / dense['ppl']:.2f}", width, f"{r['bytes'] / 2**20:.1f}",
                 f"{r['speed']['prefill_ratio']:.2f}", f"{r['speed']['decode_ratio']:.2f}", f"{r['prune_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *best_lines(results, dense)]
    return "\n".join(lines) + "\n"


def into_benchmarks(section: str) -> None:
    """Refresh docs/BENCHMARKS.md: through bench_quality's renderer where it includes docs/bench_structured.md
    (its ``SECTIONS``), else by putting the section between markers (appended the first time)."""
    import bench_quality

    if hasattr(bench_quality, "SECTIONS") and bench_quality.RESULTS.is_file():
        bench_quality.DOC.write_text(bench_quality.render(json.loads(bench_quality.RESULTS.read_text())))
        return
    doc = DOCS / "BENCHMARKS.md"
    text = doc.read_text() if doc.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def measure(args: argparse.Namespace, work: Path, proto: dict, results: dict, results_path: Path, doc: Path) -> None:
    """Run the planned rows (and the dense reference), saving the results after each."""
    if not args.smoke and not GGUF.is_file():
        sys.exit(f"{GGUF} not found")
    model = ROOT / "taylorprune" / "assets" / "stories260K" if args.smoke else dense_folder(work)
    if not (args.resume and "dense" in results):
        results["dense"] = run_dense(model, work, proto)
    for key, (name, structure, extra, target) in planned(args).items():
        if args.resume and key in results:
            continue
        results[key] = run_config(model, work, proto, name, structure, extra, target)
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        doc.write_text(render(results, proto, args.smoke))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated score names (see SCORES / DEPTH) to (re)run")
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)), help="fractions of parameters to remove")
    ap.add_argument("--work", default="/tmp/taylorprune-bench-structured", help="scratch folder for models")
    ap.add_argument("--keys", help="semicolon-separated row keys to run, in this order (e.g. 'taylor, no "
                    "compensation @ 0.2;wanda, compensation @ 0.2'); overrides --only and --targets")
    ap.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    ap.add_argument("--render", action="store_true", help="only redraw the tables from the results file")
    ap.add_argument("--smoke", action="store_true", help="stories260K, 8 calibration windows of 128, 4 eval windows; "
                    "writes under --work, not docs/")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    proto = protocol(args.smoke)
    out = work if args.smoke else DOCS
    results_path, doc = out / "bench_structured.json", out / "bench_structured.md"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if not args.render:
        measure(args, work, proto, results, results_path, doc)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    section = render(results, proto, args.smoke)
    doc.write_text(section)
    if not args.smoke:
        into_benchmarks(section)
    print(section)


if __name__ == "__main__":
    main()
