#!/usr/bin/env python
"""Cost of OBA's model-scope HVP pass on SmolLM2-135M: time and peak RSS per mode, against one plain
forward+backward over the same windows.

Each measurement runs in its own process (so peak RSS is its own): ``plain`` (every parameter requires grad,
``loss.backward()`` per window), then ``model_hvp_pass`` in each mode (``blockwise``: the default, one
block's second-order graph at a time; ``fwd-rev`` and ``double-backward``: the whole model's graph). Same
sequential WikiText-2 validation windows. Writes docs/bench_hvp.json; bench_quality.py renders it.

    python scripts/bench_hvp.py --nsamples 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import CALIB, ROOT, plain  # noqa: E402

OUT = ROOT / "docs" / "bench_hvp.json"
MODES = ("plain", "blockwise", "fwd-rev", "double-backward")


def measure(model_dir: str, mode: str, nsamples: int, seqlen: int) -> dict:
    """One mode in this process: seconds for the pass and the process's peak RSS."""
    import torch

    from taylorprune.calib.sampling import sample
    from taylorprune.calib.text import read_file
    from taylorprune.modeling.layout import find_layout
    from taylorprune.modeling.loading import load
    from taylorprune.stats.hvp import model_hvp_pass

    loaded = load(model_dir)
    ids, _ = sample(loaded.tokenizer, read_file(CALIB), nsamples, seqlen, 0, "sequential")
    if mode == "plain":
        seconds = plain(loaded.model, ids)
    else:
        t0 = time.perf_counter()
        model_hvp_pass(loaded.model, find_layout(loaded.model), ids, mode)
        seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "peak_rss_mib": rss, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/taylorprune-bench/smollm2-135m-dense")
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode and print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.nsamples, args.seqlen)))
        return
    rows = []
    for mode in MODES:
        cmd = [sys.executable, __file__, "--model", args.model, "--nsamples", str(args.nsamples), "--seqlen",
               str(args.seqlen), "--one", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    plain = rows[0]["seconds"]
    for r in rows:
        r["ratio_to_plain"] = r["seconds"] / plain
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows,
              "command": f"python scripts/bench_hvp.py --nsamples {args.nsamples}"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
