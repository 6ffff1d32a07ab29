#!/usr/bin/env python
"""Unstructured and N:M pruning on SmolLM2-135M with every OBA mode and every stage stack (issues #11 and #13).

Protocol: calibration 128 × 512 sequential windows of WikiText-2 validation (all rows unless a row says
otherwise), evaluation on the first 40 × 512-token windows of the WikiText-2 raw test split, CPU. Each row runs
as its own `taylorprune run` process (peak RSS per row). Results accumulate in docs/bench_stack.json after every
run; the table goes to docs/bench_stack.md and docs/BENCHMARKS.md.

    python scripts/bench_stack.py --list                       # the rows
    python scripts/bench_stack.py --only "wanda,oba swap"      # some rows (all their patterns)
    python scripts/bench_stack.py --resume                     # everything not measured yet
    python scripts/bench_stack.py --render                     # redraw the tables only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (shared: dense SmolLM2 folder, one `run` per row, BENCHMARKS.md)

ROOT = bq.ROOT
RESULTS = ROOT / "docs" / "bench_stack.json"
DOC = ROOT / "docs" / "bench_stack.md"
PATTERNS = {"50%": ["--sparsity", "0.5"], "60%": ["--sparsity", "0.6"], "70%": ["--sparsity", "0.7"],
            "2:4": ["--pattern", "2:4"]}
I11 = ("50%", "60%", "2:4")
I13 = ("50%", "60%", "70%", "2:4")
OWL = ("60%", "70%")
GRAD = "{work}/grad-cache-128.safetensors"

# name -> (run arguments, patterns, issue)
ROWS: dict[str, tuple[list[str], tuple[str, ...], str]] = {
    "wanda": (["--method", "wanda"], I13, "11,13"),
    "sparsegpt": (["--method", "sparsegpt"], I13, "11,13"),
    "wanda+obs": (["--method", "wanda", "--update", "obs"], I13, "11,13"),
    "oba swap": (["--method", "oba"], I11, "11"),
    "oba swap+obs": (["--method", "oba", "--update", "obs"], I11, "11"),
    "oba swap+obs+2 obs-swaps": (["--method", "oba", "--update", "obs", "--obs-swaps", "2"], I11, "11"),
    "sparsegpt+2 obs-swaps": (["--method", "sparsegpt", "--obs-swaps", "2"], I13, "13"),
    # One exact HVP of a 512-token window costs ~25-45 s on 2 cores: the authors' 49 steps are out of reach on CPU.
    "oba released (4 steps × 2 win)": (["--method", "oba", "--oba-mode", "released", "--oba-steps", "4",
                                        "--oba-step-windows", "2"], I11, "11"),
    "oba full (model HVP 16 win)": (["--method", "oba", "--oba-mode", "full", "--nsamples", "16",
                                      "--hvp-cache", "{work}/hvp-cache-16.safetensors"], I11, "11"),
    "wanda+swap": (["--method", "wanda", "--refine", "swap"], I13, "13"),
    "wanda+recon": (["--method", "wanda", "--recon", "block"], I13, "13"),
    "wanda+swap+obs+recon": (["--method", "wanda", "--refine", "swap", "--update", "obs", "--recon", "block"], I13,
                             "13"),
    "sparsegpt+recon": (["--method", "sparsegpt", "--recon", "block"], I13, "13"),
    "sparsegpt+2 obs-swaps+recon": (["--method", "sparsegpt", "--obs-swaps", "2", "--recon", "block"], I13, "13"),
    "oba swap+obs+2 obs-swaps+recon": (["--method", "oba", "--update", "obs", "--obs-swaps", "2", "--recon",
                                        "block"], I13, "13"),
    "gblm": (["--method", "gblm", "--grad-cache", GRAD], I13, "13"),
    "gblm+obs": (["--method", "gblm", "--update", "obs", "--grad-cache", GRAD], I13, "13"),
    "gblm+swap": (["--method", "gblm", "--refine", "swap", "--grad-cache", GRAD], I13, "13"),
    "gblm+recon": (["--method", "gblm", "--recon", "block", "--grad-cache", GRAD], I13, "13"),
    "gblm+swap+obs+recon": (["--method", "gblm", "--refine", "swap", "--update", "obs", "--recon", "block",
                             "--grad-cache", GRAD], I13, "13"),
    "wanda owl": (["--method", "wanda", "--allocation", "owl"], OWL, "13"),
    "sparsegpt owl": (["--method", "sparsegpt", "--allocation", "owl"], OWL, "13"),
    "wanda+swap+obs+recon owl": (["--method", "wanda", "--refine", "swap", "--update", "obs", "--recon", "block",
                                 "--allocation", "owl"], OWL, "13"),
    "sparsegpt+2 obs-swaps+recon owl": (["--method", "sparsegpt", "--obs-swaps", "2", "--recon", "block",
                                        "--allocation", "owl"], OWL, "13"),
}


def measure(work: Path, name: str, pattern: str) -> dict:
    args, _, issue = ROWS[name]
    bq.PATTERNS.update(PATTERNS)
    row = bq.run_config(bq.dense_folder(work), work, name, args, pattern)
    timings = {k.removeprefix("prune."): round(v, 1) for k, v in row["phases_s"].items() if k.startswith("prune.")}
    return {**row, "issue": issue, "prune_parts_s": timings}


def cache_note(results: dict) -> str:
    """Which row paid for each shared statistics cache (the others read it in well under a second)."""
    payers = [f"`{key}` {r['model_stats_s']:.0f} s" for key, r in results.items()
              if key != "dense" and r.get("model_stats_s", 0.0) > 5 and any("cache" in a for a in r["args"])]
    if not payers:
        return ""
    return (" Rows with a cache option share one cache of dense-model statistics: the first such row computed it, "
            f"and its time includes that ({', '.join(payers)}); the others read it in under a second.")


def render(results: dict) -> str:
    dense = results.get("dense", {}).get("ppl")
    shown = f"{dense:.2f}" if dense else "not measured yet"
    lines = ["## Unstructured and 2:4: every OBA mode and every stage stack (issues #11, #13)", "",
             "`python scripts/bench_stack.py` on SmolLM2-135M (fp32, CPU, 2 cores); calibration 128 × 512 "
             "sequential windows of WikiText-2 validation unless the row says otherwise; PPL on the first 40 × 512 "
             f"windows of the WikiText-2 raw test split (dense {shown}).", "",
             "Stages: `+swap` = `--refine swap` (exact-HVP swap search on each linear's reconstruction error), "
             "`+obs` = `--update obs`, `+recon` = `--recon block` (Adam re-fit of each block to the dense outputs), "
             "`owl` = `--allocation owl`, `2 obs-swaps` = `--obs-swaps 2` (after OBS, twice: swap search on the "
             "updated weights' exact error, OBS re-fit). `oba swap` is `--method oba` (Wanda start + swap search). "
             "Prune time is the report's `prune` phase (plus model statistics), measured on a 2-core machine shared "
             "with other work: compare rows of the same day only." + cache_note(results), ""]
    for pattern in ("50%", "60%", "70%", "2:4"):
        rows = [r for key, r in results.items() if key != "dense" and r["pattern"] == pattern]
        if not rows:
            continue
        base = next((r for r in rows if r["name"] == "sparsegpt"), None)
        lines += [f"### {pattern}", "", "| method / stack | calib | PPL | × SparseGPT | prune + stats (s) | "
                  "× SparseGPT time | peak RSS (MiB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sorted(rows, key=lambda r: r["ppl"]):
            total = r["prune_s"] + r.get("model_stats_s", 0.0)
            ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "-"
            tratio = f"{total / (base['prune_s'] + base.get('model_stats_s', 0.0)):.2f}" if base else "-"
            lines.append(f"| {r['name']} | {r['calib_windows']} | {r['ppl']:.2f} | {ratio} | {total:.0f} | {tratio} | "
                         f"{r['rss_mib']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = bq.row_parser(__doc__, "comma-separated row names (see --list)")
    ap.add_argument("--patterns", help="comma-separated patterns to restrict to (50%%,60%%,70%%,2:4)")
    args = ap.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.list:
        list_rows(results)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ROWS)
    only_patterns = set(args.patterns.split(",")) if args.patterns else None
    if not args.render:
        if "dense" not in results:
            results["dense"] = bq.run_dense(bq.dense_folder(work), work)
        for name in names:
            for pattern in ROWS[name][1]:
                key = f"{name} {pattern}"
                if (only_patterns and pattern not in only_patterns) or (args.resume and key in results):
                    continue
                results[key] = measure(work, name, pattern)
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
                DOC.write_text(render(results))
                rerender_benchmarks()
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    DOC.write_text(render(results))
    rerender_benchmarks()
    print(DOC.read_text())


def list_rows(results: dict) -> None:
    """Every row with its patterns, a missing one marked `?`, so a rerun knows what `--resume` still measures."""
    missing = 0
    for name, (extra, patterns, issue) in ROWS.items():
        cells = [p if f"{name} {p}" in results else f"{p}?" for p in patterns]
        missing += sum(c.endswith("?") for c in cells)
        print(f"{name:34s} #{issue:6s} {','.join(cells):20s} {' '.join(extra)}")
    print(f"{missing} row/pattern pairs not measured yet (marked ?)")


def rerender_benchmarks() -> None:
    """docs/BENCHMARKS.md again, with this section in it."""
    if bq.RESULTS.is_file():
        bq.DOC.write_text(bq.render(json.loads(bq.RESULTS.read_text())))


if __name__ == "__main__":
    main()
