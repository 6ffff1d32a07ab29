#!/usr/bin/env python
"""SmolLM2-135M sweep: wanda, gblm, sparsegpt, oba × sparsity 0.3–0.7 (unstructured) and 2:4.

Same protocol as scripts/bench_quality.py (32 × 512 sequential calibration windows of WikiText-2 validation,
first 40 × 512 windows of the WikiText-2 raw test split) and the same dense folder and statistic caches, so
the gradient and HVP passes are paid once across both benchmarks. Copies the sweep's results.json, table and
plot to docs/sweep_smollm2.{json,md,png}; scripts/bench_quality.py puts the table and plot into
docs/BENCHMARKS.md.

    python scripts/bench_sweep.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CALIB_ARGS, DOC, EVAL_ARGS, GRAD_CACHE, HVP_CACHE, ROOT, dense_folder  # noqa: E402

METHODS = "wanda,gblm,sparsegpt,oba"
SPARSITIES = "0.3,0.5,0.6,0.7"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/taylorprune-bench", help="scratch folder (shared with bench_quality)")
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--sparsities", default=SPARSITIES)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = dense_folder(work)
    out = work / "sweep"
    cmd = [sys.executable, "-m", "taylorprune", "sweep", "--model", str(model), "--methods", args.methods,
           "--sparsities", args.sparsities, "--patterns", "unstructured,2:4", "--nsamples", "32", *CALIB_ARGS,
           *EVAL_ARGS, "--device", "cpu", "--out", str(out), "--overwrite",
           "--option", f"grad_cache={GRAD_CACHE.format(work=work)}",
           "--option", f"hvp_cache={HVP_CACHE.format(work=work)}"]
    print("+", " ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"sweep took {time.perf_counter() - t0:.0f} s")
    docs = ROOT / "docs"
    for src, dst in (("results.json", "sweep_smollm2.json"), ("results.md", "sweep_smollm2.md"),
                     ("ppl_vs_sparsity.png", "sweep_smollm2.png")):
        shutil.copyfile(out / src, docs / dst)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_quality.py"), "--only", "render"], check=True)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
