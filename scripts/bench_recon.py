#!/usr/bin/env python
"""Block reconstruction's own knobs on SmolLM2-135M (issue #13): learning rate, steps and target.

Same protocol as scripts/bench_stack.py (128 × 512 sequential calibration windows of WikiText-2 validation,
PPL on 40 × 512 test windows, CPU), always `--method sparsegpt --recon block`: the rows differ only in the
`--recon-*` options. Results accumulate in docs/bench_recon.json; the table goes to docs/bench_recon.md, which
docs/BENCHMARKS.md includes.

    python scripts/bench_recon.py --list
    python scripts/bench_recon.py --work /tmp/tpbench --resume       # every row not measured yet
    python scripts/bench_recon.py --only "lr 3e-3 · target same"     # one row (all its patterns)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quality as bq  # noqa: E402  (shared: dense SmolLM2 folder, one `run` per row, BENCHMARKS.md)
import bench_stack as bs  # noqa: E402  (the sparsegpt baselines and the rendering of BENCHMARKS.md)

RESULTS = bq.ROOT / "docs" / "bench_recon.json"
DOC = bq.ROOT / "docs" / "bench_recon.md"
BASE = ["--method", "sparsegpt", "--recon", "block"]

# name -> (extra --recon-* arguments, patterns)
ROWS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "lr 1e-4": (["--recon-lr", "1e-4"], ("2:4",)),
    "lr 3e-4": (["--recon-lr", "3e-4"], ("2:4",)),
    "lr 1e-3": (["--recon-lr", "1e-3"], ("2:4",)),
    "lr 3e-3 (default)": (["--recon-lr", "3e-3"], ("2:4",)),
    "lr 1e-3 · 50 steps": (["--recon-lr", "1e-3", "--recon-steps", "50"], ("2:4",)),
    "lr 3e-3 · target same": (["--recon-lr", "3e-3", "--recon-target", "same"], ("2:4",)),
}


def render(results: dict) -> str:
    stack = json.loads(bs.RESULTS.read_text()) if bs.RESULTS.is_file() else {}
    lines = ["## Block reconstruction: learning rate, steps, target (issue #13)", "",
             "`python scripts/bench_recon.py`: `--method sparsegpt --recon block` with the row's `--recon-*` "
             "options (defaults: 25 steps of 4 windows, lr 3e-3, target dense), same protocol as the table above. "
             "Prune time is the report's `prune` phase on a shared 2-core machine.", "",
             "| row | pattern | PPL | × SparseGPT | prune (s) | recon phase (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    order = {name: i for i, name in enumerate(ROWS)}
    for r in sorted(results.values(), key=lambda r: (r["pattern"], order.get(r["name"], len(order)))):
        base = stack.get(f"sparsegpt {r['pattern']}")
        ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "-"
        recon = r["phases_s"].get("prune.recon", 0.0)
        lines.append(f"| {r['name']} | {r['pattern']} | {r['ppl']:.2f} | {ratio} | {r['prune_s']:.0f} | "
                     f"{recon:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = bq.row_parser(__doc__, "semicolon-separated row names (see --list)")
    args = ap.parse_args()
    if args.list:
        for name, (extra, patterns) in ROWS.items():
            print(f"{name:24s} {','.join(patterns):8s} {' '.join(BASE + extra)}")
        return
    work = Path(args.work)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    names = [n.strip() for n in args.only.split(";")] if args.only else list(ROWS)
    bq.PATTERNS.update(bs.PATTERNS)
    for name in [] if args.render else names:
        for pattern in ROWS[name][1]:
            key = f"{name} {pattern}"
            if args.resume and key in results:
                continue
            work.mkdir(parents=True, exist_ok=True)
            results[key] = bq.run_config(bq.dense_folder(work), work, f"recon {name}", BASE + ROWS[name][0], pattern)
            results[key]["name"] = name
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    DOC.write_text(render(results))
    bs.rerender_benchmarks()
    print(DOC.read_text())


if __name__ == "__main__":
    main()
