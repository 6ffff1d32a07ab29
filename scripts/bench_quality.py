#!/usr/bin/env python
"""Quality/cost benchmark on SmolLM2-135M: every configured method at 50% and 2:4, plus dense.

Protocol (issue #2): calibration 128 × 512 sequential windows of WikiText-2 validation, evaluation on the
first 40 windows × 512 tokens of the WikiText-2 raw test split. Each configuration runs as its own
`taylorprune run` process so peak RSS is per run. Results accumulate in docs/bench_results.json (rerun
a subset with --only) and the table is rewritten to docs/BENCHMARKS.md.

    python scripts/bench_quality.py                      # everything
    python scripts/bench_quality.py --only wanda,gblm-l2 # some rows
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GGUF = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIB = SHARED / "data" / "wikitext-2" / "valid.txt"
TEST = SHARED / "data" / "wikitext-2-raw" / "test.txt"
RESULTS = ROOT / "docs" / "bench_results.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"
SECTIONS = [ROOT / "docs" / name for name in ("bench_recover.md", "bench_distributed.md", "bench_zeroshot.md",
                                              "bench_gemma.md",
                                              "bench_stack.md", "bench_recon.md", "bench_structured.md",
                                              "bench_quant.md", "bench_gguf.md")]

CALIB_ARGS = ["--calib-file", str(CALIB), "--calib-sampling", "sequential", "--seqlen", "512"]
EVAL_ARGS = ["--eval-text-file", str(TEST), "--eval-seqlen", "512", "--max-windows", "40"]
PATTERNS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"]}

# name -> extra `run` arguments; later issues add rows here.
# On 2 CPU cores the full 128-window protocol costs ~10 min a run, so the issue-#2 rows use it and every other
# method calibrates on 32 × 512 windows, next to a wanda row at the same size for reference. Same evaluation.
SMALL = ["--nsamples", "32"]
GRAD_CACHE = "{work}/grad-cache-32.safetensors"  # first gradient run computes (and is timed), later ones reuse
HVP_CACHE = "{work}/hvp-cache-32.safetensors"
CONFIGS: dict[str, list[str]] = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "wanda (32 win)": ["--method", "wanda", *SMALL],
    "gblm-l2 (32 win)": ["--method", "gblm", "--grad-norm", "l2", "--grad-cache", GRAD_CACHE, *SMALL],
    "gblm-l1 (32 win)": ["--method", "gblm", "--grad-norm", "l1", "--grad-cache", GRAD_CACHE, *SMALL],
    "fisher (32 win)": ["--method", "fisher", "--grad-cache", GRAD_CACHE, *SMALL],
    "taylor (32 win)": ["--method", "taylor", "--grad-cache", GRAD_CACHE, *SMALL],
    "sparsegpt (32 win)": ["--method", "sparsegpt", *SMALL],
    "oba-model (32 win)": ["--method", "oba", "--hvp-scope", "model", "--hvp-cache", HVP_CACHE, *SMALL],
    "oba-model norm=max (32 win)": ["--method", "oba", "--hvp-scope", "model", "--hvp-cache", HVP_CACHE,
                                    "--oba-normalize", "max", *SMALL],
    "oba-block (32 win)": ["--method", "oba", "--hvp-scope", "block", *SMALL],
    "wanda+obs (32 win)": ["--method", "wanda", "--update", "obs", *SMALL],
    "gblm-l2+obs (32 win)": ["--method", "gblm", "--update", "obs", "--grad-cache", GRAD_CACHE, *SMALL],
    "oba-model+obs (32 win)": ["--method", "oba", "--hvp-scope", "model", "--hvp-cache", HVP_CACHE, "--update", "obs",
                               *SMALL],
}


def dense_folder(work: Path) -> Path:
    """SmolLM2 dequantized once from GGUF to an fp32 HF folder (loading GGUF costs ~25 s a time)."""
    folder = work / "smollm2-135m-dense"
    if not (folder / "config.json").is_file():
        from taylorprune.export.save import save_model
        from taylorprune.modeling.loading import load

        loaded = load(str(GGUF))
        save_model(loaded.model, loaded.tokenizer, folder)
    return folder


def taylorprune(*args: str) -> None:
    cmd = [sys.executable, "-m", "taylorprune", *args]
    print("+ taylorprune", " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def run_dense(model: Path, work: Path) -> dict:
    out = work / "dense.json"
    t0 = time.perf_counter()
    taylorprune("eval", "--model", str(model), "--text-file", str(TEST), "--seqlen", "512", "--max-windows", "40",
                "--json", str(out), "--device", "cpu")
    ev = json.loads(out.read_text())
    return {"name": "dense", "pattern": "-", "ppl": ev["perplexity"], "prune_s": 0.0, "rss_mib": None,
            "eval_s": time.perf_counter() - t0, "windows": ev["windows"]}


def splice(section: str) -> None:
    """Put ``section`` into docs/BENCHMARKS.md: replacing its earlier copy, else right after the page title."""
    text = DOC.read_text()
    head = section.split("\n", 1)[0]
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + section.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        title, rest = text.split("\n", 1)
        text = title + "\n\n" + section.rstrip() + "\n" + rest
    DOC.write_text(text)


def row_parser(doc: str | None, only_help: str) -> argparse.ArgumentParser:
    """The arguments every row benchmark shares: --only, --work, --resume, --list, --render."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help=only_help)
    ap.add_argument("--work", default="/tmp/taylorprune-bench", help="scratch folder for models and caches")
    ap.add_argument("--resume", action="store_true", help="skip rows already measured")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--render", action="store_true", help="only redraw the tables")
    return ap


def run_config(model: Path, work: Path, name: str, extra: list[str], pattern: str) -> dict:
    slug = "".join(c if c.isalnum() else "-" for c in name)
    out = work / f"{slug}-{pattern.replace(':', 'of').replace('%', '')}"
    extra = [a.format(work=work) for a in extra]
    extra = extra if "--nsamples" in extra else [*extra, "--nsamples", "128"]
    taylorprune("run", "--model", str(model), *extra, *PATTERNS[pattern], *CALIB_ARGS, *EVAL_ARGS,
                "--device", "cpu", "--output", str(out), "--overwrite", "--eval")
    rep = json.loads((out / "taylorprune_report.json").read_text())
    for weights in out.glob("*.safetensors"):  # ~0.5 GB a row; the report is what the table needs
        weights.unlink()
    return {"name": name, "pattern": pattern, "ppl": rep["metrics"]["perplexity"],
            "prune_s": rep["phases_s"]["prune"], "rss_mib": rep["peak_memory_mib"]["rss_mib"],
            "model_stats_s": rep["phases_s"].get("model_statistics", 0.0),
            "phases_s": rep["phases_s"], "achieved_sparsity": rep["achieved_sparsity"],
            "windows": rep["evaluation"]["perplexity"]["windows"], "args": extra,
            "calib_windows": (rep["calibration"] or {}).get("nsamples", 0)}


def render(results: dict) -> str:
    rows = sorted(results.values(), key=lambda r: (r["pattern"] != "-", r["pattern"], r["ppl"]))
    lines = ["# Benchmarks", ""]
    for section in SECTIONS:  # newer benchmarks, each written by its own script
        if section.is_file():
            lines += [section.read_text().rstrip(), ""]
    lines += [
        "## Methods at 50% and 2:4 (issues #2–#5)",
        "",
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32, 30 layers, 210 target linears), CPU (2 cores).",
        "Calibration: sequential windows of 512 tokens of WikiText-2 validation, 128 of them for the issue-#2 rows",
        "(magnitude uses none) and 32 for the others (the calib column; ~10 min a run at 128 on 2 cores). Evaluation:",
        "first 40 windows × 512",
        "tokens of the WikiText-2 raw test split. Prune time is the `prune` phase of the report (calibration",
        "forwards, statistics, scoring, masking, propagation); peak RSS is the whole `taylorprune run` process.",
        "",
        "Made by `python scripts/bench_quality.py` (raw numbers in `docs/bench_results.json`; `--resume` continues",
        "an interrupted run, `--only NAME,...` reruns rows). Wall times come from a shared 2-core machine on which",
        "tests sometimes ran beside the benchmark: read them as upper bounds; PPL and RSS are unaffected.",
        "",
        "Gradient methods share one gradient cache: the first run that needs a statistic computes it (its",
        "`dense stats` column is the gradient pass), later runs read it (a few tenths of a second).",
        "",
        "| method | pattern | calib | PPL (40×512) | dense stats (s) | prune time (s) | peak RSS (MiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        rss = f"{r['rss_mib']:.0f}" if r.get("rss_mib") else "-"
        stats = f"{r.get('model_stats_s', 0.0):.1f}"
        calib = r.get("calib_windows") or "-"
        cells = [r["name"], r["pattern"], calib, f"{r['ppl']:.2f}", stats, f"{r['prune_s']:.1f}", rss]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    grad = ROOT / "docs" / "bench_gradients.json"
    if grad.is_file():
        g = json.loads(grad.read_text())
        lines += ["", "## Gradient pass cost", "",
                  f"`{g['command']}` ({g['nsamples']} windows × {g['seqlen']} tokens, {g['threads']} threads, best "
                  "of repeats):", "",
                  "| plain forward+backward (s) | gradient pass, l1+l2 (s) | ratio |", "| ---: | ---: | ---: |",
                  f"| {g['plain_fwd_bwd_s']:.1f} | {g['gradient_pass_s']:.1f} | {g['ratio']:.2f} |"]
    if "gblm-l2 (32 win) 50%" in results and "wanda (32 win) 50%" in results:
        g, w = results["gblm-l2 (32 win) 50%"]["rss_mib"], results["wanda (32 win) 50%"]["rss_mib"]
        lines += ["", "Peak RSS of `run --method gblm --grad-cache F` (cache miss: gradient pass computed, l1 and l2 "
                  f"written) / `run --method wanda`, same model and calibration: {g:.0f} / {w:.0f} MiB = "
                  f"**{g / w:.2f}×** (without a cache and with checkpointing: see below)."]
    lines += hvp_section() + sweep_section()
    for extra in (ROOT / "docs" / "benchmarks_notes.md", ROOT / "docs" / "bench_memory.md"):
        if extra.is_file():
            lines += ["", extra.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def hvp_section() -> list[str]:
    """docs/bench_hvp.json (scripts/bench_hvp.py): OBA's model-scope HVP pass per mode."""
    path = ROOT / "docs" / "bench_hvp.json"
    if not path.is_file():
        return []
    h = json.loads(path.read_text())
    lines = ["", "## HVP pass cost (OBA, model scope)", "",
             f"`{h['command']}` ({h['nsamples']} windows × {h['seqlen']} tokens, each mode in its own process; "
             "`plain` is one forward+backward per window with every parameter requiring grad):", "",
             "| mode | seconds | ratio to plain fwd+bwd | peak RSS (MiB) |", "| --- | ---: | ---: | ---: |"]
    for r in h["rows"]:
        lines.append(f"| {r['mode']} | {r['seconds']:.1f} | {r['ratio_to_plain']:.2f} | {r['peak_rss_mib']:.0f} |")
    return lines


def sweep_section() -> list[str]:
    """docs/sweep_smollm2.md and .png (scripts/bench_sweep.py)."""
    path = ROOT / "docs" / "sweep_smollm2.md"
    if not path.is_file():
        return []
    table = path.read_text().split("\n", 1)[1].strip()  # drop the sweep's own title
    return ["", "## Sweep: sparsity 0.3–0.7 and 2:4", "",
            "`python scripts/bench_sweep.py` (`taylorprune sweep`, same calibration and evaluation as above; raw",
            "numbers in `docs/sweep_smollm2.json`):", "", table, "", "![PPL vs sparsity](sweep_smollm2.png)"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated config names (and 'dense') to (re)run; 'render' only redraws")
    ap.add_argument("--work", default="/tmp/taylorprune-bench", help="scratch folder for models")
    ap.add_argument("--resume", action="store_true", help="skip rows already in docs/bench_results.json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    wanted = set(args.only.split(",")) if args.only else {"dense", *CONFIGS}
    model = dense_folder(work)
    if "dense" in wanted and not (args.resume and "dense" in results):
        results["dense"] = run_dense(model, work)
    for name, extra in CONFIGS.items():
        if name not in wanted:
            continue
        for pattern in PATTERNS:
            if args.resume and f"{name} {pattern}" in results:
                continue
            results[f"{name} {pattern}"] = run_config(model, work, name, extra, pattern)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            DOC.write_text(render(results))
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    DOC.write_text(render(results))
    print(DOC.read_text())


if __name__ == "__main__":
    main()
