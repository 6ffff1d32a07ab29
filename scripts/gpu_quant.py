"""Part (g) of scripts/gpu_check.py: GPTQ on the full-depth 7B shape (issue #36).

``--quantize gptq --wbits 4 --group-size 128`` alone (no pruning; our defaults, which are llm-compressor's W4A16:
symmetric, activation order with static groups, fp16 scales, damping 0.01, 128-column blocks) on the 32-block
random LLaMA-7B-shaped checkpoint of part (d), the same calibration windows, in one process on one GPU: the GPTQ
solves' seconds, the run's and the peak GPU memory. The anchor beside it is llm-compressor's published figure for
Llama-3-8B on one GPU (745 s; its own calibration, not ours): another model and setting, so read the ratio as an
order of magnitude, not a race.
"""

from __future__ import annotations

import time
from pathlib import Path

from gpu_common import VALID, Bench, cleanup, peak_gib, sync

ANCHOR_S = 745.0  # llm-compressor, GPTQ W4A16 on Llama-3-8B, one GPU (issue #36)


def gptq(bench: Bench, model_dir: Path) -> dict:
    """One in-process quantize-only run (what ``taylorprune run --quantize gptq`` does before writing)."""
    from taylorprune import pipeline

    s = bench.shapes
    group = 128 if s.hidden % 128 == 0 else -1  # the smoke shapes are narrower than a group
    options = pipeline.RunOptions(model=str(model_dir), output=str(bench.work / "unused"), quantize="gptq", wbits=4,
                                  group_size=group, calib_file=str(VALID), calib_sampling="sequential",
                                  nsamples=s.nsamples, seqlen=s.seqlen, dtype=s.dtype, device=bench.device,
                                  overwrite=True)
    cleanup()
    t0 = time.perf_counter()
    state = pipeline.prune(options)
    sync(bench.device)
    record = state.records.get("quantize") or {}
    out = {"phases_s": {k: round(v, 3) for k, v in state.phases_s.items()}, "total_s": time.perf_counter() - t0,
           "placement": state.placement.mode if state.placement else None, "peak_gpu_gib": peak_gib(bench.device),
           "group_size": group, "linears": record.get("linears"), "off_grid": record.get("off_grid_in_model_dtype"),
           "prune_s": state.phases_s.get("prune", 0.0), "quantize_s": state.phases_s.get("prune.quantize", 0.0)}
    del state
    return out


def render(bench: Bench) -> list[str]:
    g, s = bench.results.get("g-gptq"), bench.shapes
    lines = ["", f"## (g) GPTQ W4 on {s.full_blocks} blocks at {s.nsamples} × {s.seqlen} (issue #36)", ""]
    if not g or "quantize_s" not in g:
        return lines + [f"not measured ({(g or {}).get('error') or (g or {}).get('skipped') or 'not run'})"]
    peak = "–" if g["peak_gpu_gib"] is None else f"{g['peak_gpu_gib']:.2f}"
    phases = ", ".join(f"{k} {v:.2f}" for k, v in g["phases_s"].items())
    return lines + ["| grid | linears | placement | GPTQ solves (s) | prune phase (s) | whole run (s) | peak GPU (GiB) "
                    "| anchor |", "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |",
                    f"| W4 g{g['group_size']} symmetric, static groups | {g['linears']} | {g['placement']} | "
                    f"{g['quantize_s']:.2f} | {g['prune_s']:.2f} | {g['total_s']:.2f} | {peak} | llm-compressor, "
                    f"Llama-3-8B, one GPU: {ANCHOR_S:.0f} s |", "",
                    f"Weights off the grid after the run: {g['off_grid']}. Phases (s): {phases}."]
