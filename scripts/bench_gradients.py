#!/usr/bin/env python
"""Cost of the gradient pass on SmolLM2-135M against one plain forward+backward over the same tokens.

Plain: every parameter requires grad, ``loss.backward()``, ``zero_grad(set_to_none=True)`` per window (what a
training step without the optimizer costs). Gradient pass: taylorprune's ``gradient_pass`` collecting
grad_l1 and grad_l2 (what ``--method gblm`` runs). Same windows (sequential WikiText-2 validation), same
process, alternating order to share warm-up. Writes docs/bench_gradients.json; bench_quality.py renders it.

    python scripts/bench_gradients.py --nsamples 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from taylorprune.calib.sampling import sample
from taylorprune.calib.text import read_file
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.loading import load
from taylorprune.stats.gradients import causal_lm_loss, gradient_pass

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
OUT = ROOT / "docs" / "bench_gradients.json"


def plain(model, ids) -> float:
    model.requires_grad_(True)
    t0 = time.perf_counter()
    for row in ids:
        causal_lm_loss(model, row[None]).backward()
        model.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - t0
    model.requires_grad_(False)
    return elapsed


def ours(model, layout, ids) -> float:
    t0 = time.perf_counter()
    gradient_pass(model, layout, ids, frozenset({"grad_l1", "grad_l2"}))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/taylorprune-bench/smollm2-135m-dense")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    loaded = load(args.model)
    layout = find_layout(loaded.model)
    ids, _ = sample(loaded.tokenizer, read_file(CALIB), args.nsamples, args.seqlen, 0, "sequential")
    ours(loaded.model, layout, ids[:2])  # warm-up
    times = {"plain_fwd_bwd_s": [], "gradient_pass_s": []}
    for _ in range(args.repeats):
        times["plain_fwd_bwd_s"].append(plain(loaded.model, ids))
        times["gradient_pass_s"].append(ours(loaded.model, layout, ids))
    best = {k: min(v) for k, v in times.items()}
    result = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": torch.get_num_threads(),
              "runs": times, **best, "ratio": best["gradient_pass_s"] / best["plain_fwd_bwd_s"],
              "command": f"python scripts/bench_gradients.py --nsamples {args.nsamples}"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
