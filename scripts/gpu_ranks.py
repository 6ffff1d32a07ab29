"""Parts (e) and (f) of scripts/gpu_check.py: data-parallel ranks (issue #25) and recovery (issue #23).

(e) ``torchrun --standalone --nproc-per-node N -m taylorprune run`` on the small model, N = every visible GPU (2
    gloo processes on the CPU in smoke mode), SparseGPT and GBLM: statistics + prune seconds of rank 0's report,
    against the same command in one process (same windows).
(f) ``--recover distill --recover-weights lora`` on the full-depth model: seconds per 1k recovery tokens and the
    peak GPU memory of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_common import VALID, Bench, peak_gib, sync

RANKED = ("sparsegpt", "gblm")


def ranks(bench: Bench) -> int:
    """Processes of part (e): one per visible GPU (at least 2 to be worth a row), 2 CPU processes when smoking."""
    if bench.args.smoke:
        return 2
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def ranked(bench: Bench, model_dir: Path, method: str, count: int) -> dict:
    """One data-parallel ``run`` of ``method`` on ``model_dir`` with ``count`` ranks (rank 0's report)."""
    s, out = bench.shapes, bench.work / f"ranked-{method}"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(count)] if count > 1 else []
    cmd = [sys.executable, *launch, "-m", "taylorprune", "run", "--model", str(model_dir), "--method", method,
           "--sparsity", "0.5", "--calib-file", str(VALID), "--calib-sampling", "sequential", "--nsamples",
           str(s.nsamples), "--seqlen", str(s.seqlen), "--dtype", s.dtype, "--device", bench.device, "--output",
           str(out), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if bench.args.smoke else dict(os.environ)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    report = json.loads((out / "taylorprune_report.json").read_text())
    phases = report["phases_s"]
    return {"ranks": count, "stats_s": phases.get("model_statistics", 0.0), "prune_s": phases.get("prune", 0.0),
            "total_s": time.perf_counter() - t0, "sparsity": report["achieved_sparsity"],
            "world_size": report["world_size"]}


def recover_lora(bench: Bench, model_dir: Path) -> dict:
    """Wanda 50% then LoRA recovery on ``model_dir``: time per 1k recovery tokens, peak GPU memory."""
    from taylorprune import pipeline

    s = bench.shapes
    steps = 4 if bench.args.smoke else 8
    opts = pipeline.RunOptions(model=str(model_dir), output=str(bench.work / "unused"), method="wanda",
                               sparsity=0.5, calib_file=str(VALID), calib_sampling="sequential", nsamples=4,
                               seqlen=s.seqlen, dtype=s.dtype, device=bench.device, overwrite=True,
                               recover="distill",
                               method_options={"recover_weights": "lora", "recover_steps": steps, "recover_batch": 1,
                                               "recover_windows": steps + 2, "recover_heldout": 1,
                                               "recover_checkpoint": True})
    pruned = pipeline.prune(opts)
    sync(bench.device)
    rec = pruned.records["recover"]
    out = {"steps": rec["steps"], "tokens_seen": rec["tokens_seen"], "seconds": rec["seconds"],
           "s_per_1k_tokens": 1000 * rec["seconds"] / max(rec["tokens_seen"], 1), "kl_before": rec["kl_before"],
           "kl_after": rec["kl_after"], "peak_gpu_gib": peak_gib(bench.device)}
    del pruned
    return out


def rows(bench: Bench, small: Path | None, full: Path | None) -> None:
    count = ranks(bench)
    if small is not None and count >= 2:
        for method in RANKED:
            bench.row(f"e-{method}-1", ranked, bench, small, method, 1)
            bench.row(f"e-{method}", ranked, bench, small, method, count)
    elif small is not None:
        bench.notes.append("one GPU: part (e), data-parallel ranks, was not measured")
    if full is not None:
        bench.row("f-recover-lora", recover_lora, bench, full)


def render(bench: Bench) -> list[str]:
    r, s = bench.results, bench.shapes
    lines = []
    if any(f"e-{m}" in r for m in RANKED):
        lines += ["", f"## (e) Data-parallel ranks ({s.small_blocks} blocks, same windows as (a))", "",
                  "| method | ranks | stats + prune (s) | one process (s) | speed-up |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for method in RANKED:
            row, one = r.get(f"e-{method}") or {}, r.get(f"e-{method}-1") or {}
            if "prune_s" not in row:
                continue
            mine = row["stats_s"] + row["prune_s"]
            base = one["stats_s"] + one["prune_s"] if "prune_s" in one else None
            lines.append(f"| {method} | {row['ranks']} | {mine:.2f} | {'–' if base is None else f'{base:.2f}'} | "
                         f"{'–' if base is None else f'{base / mine:.2f}×'} |")
    f = r.get("f-recover-lora") or {}
    if "seconds" in f:
        peak = "–" if f["peak_gpu_gib"] is None else f"{f['peak_gpu_gib']:.2f}"
        lines += ["", f"## (f) Recovery with LoRA ({s.full_blocks} blocks, {s.seqlen}-token windows)", "",
                  "| steps | tokens | s per 1k tokens | held-out KL before → after | peak GPU (GiB) |",
                  "| ---: | ---: | ---: | --- | ---: |",
                  f"| {f['steps']} | {f['tokens_seen']} | {f['s_per_1k_tokens']:.2f} | {f['kl_before']:.4f} → "
                  f"{f['kl_after']:.4f} | {peak} |"]
    return lines

