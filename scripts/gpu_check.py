#!/usr/bin/env python
"""The GPU benchmark of issue #14: speed against the official code, streaming, and a full-depth 7B shape.

Writes docs/GPU.md (and GPU.json beside it) with the card's name and four parts, on random LLaMA-7B-shaped
checkpoints (hidden 4096, MLP 11008, 32 heads, vocabulary 32000, bf16) with the bundled stories260K tokenizer,
calibrated on 128 × 2048 sequential windows of the bundled WikiText-2 validation text:

  (a) 4 decoder blocks: the Wanda and SparseGPT prune phases of taylorprune (model kept on the GPU because it
      fits, forced block streaming with prefetch, --device-map auto) against the official locuslab/wanda code
      (prune_wanda / prune_sparsegpt) on the same windows and GPU, and how many mask entries agree;
  (b) the gradient pass (GBLM's statistics) over one plain forward+backward of the same model and tokens
      (target ≤ 1.3×), in memory, block by block on the resident model, and streamed from CPU memory;
  (c) peak GPU memory of gblm and oba (block scope) with --max-gpu-memory below the model's size (streamed);
  (d) 32 decoder blocks (6.7B parameters) through wanda, gblm and sparsegpt with times and peak memory, beside
      the A100 anchors of the Wanda++ paper (Wanda 55 s, SparseGPT 322 s, GBLM 5801 s / 26 GB);
  (e) with N > 1 GPUs visible: SparseGPT and GBLM on the small model under torchrun with N ranks against one
      process; (f) recovery by distillation with LoRA on the full model (s per 1k tokens, peak memory)
      (scripts/gpu_ranks.py).

The official code is taken from --official DIR (a checkout of github.com/locuslab/wanda), else $WANDA_REPO,
else cloned into a scratch folder outside the repository; without network its rows are skipped with a note.
Rows run in order (a, b, c, d) inside a time budget (--budget-s, 420 s by default, so that the script stays
under 8 minutes on one H100): a row starts only when its estimated time fits what is left, the others are
listed as not run. All four parts together need about 13 minutes (SparseGPT on 32 blocks alone about 5), so
they are meant for two calls; a later call keeps the rows an earlier one measured on the same card (GPU.json).
SparseGPT's 32-block time, when not run, is extrapolated from the 4-block row (its cost is per linear). Every
row catches its own errors.

    python scripts/gpu_check.py                          # on the GPU machine: docs/GPU.md (a, b, c; d if time)
    python scripts/gpu_check.py --only d                 # second call: the 32-block rows
    python scripts/gpu_check.py --only g                 # GPTQ on the 7B shape (about 5 minutes)
    python scripts/gpu_check.py --only a,b               # some parts
    python scripts/gpu_check.py --smoke --out /tmp/g.md  # CPU, tiny shapes, seconds (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, however this file is loaded

from gpu_common import DEMO, ROOT, VALID, Bench, _short, cleanup, make_model, peak_gib, sync, windows  # noqa: E402
from gpu_official import agreement, official, official_repo  # noqa: E402
from gpu_quant import gptq  # noqa: E402
from gpu_quant import render as render_quant  # noqa: E402
from gpu_ranks import render as render_more  # noqa: E402
from gpu_ranks import rows as more_rows  # noqa: E402
from gpu_render import merge_previous, render  # noqa: E402


def ours(bench: Bench, model_dir: Path, method: str, nsamples: int | None = None, keep_masks: bool = False,
         **extra) -> dict:
    """One in-process ``pipeline.prune`` (what ``taylorprune run`` does before writing) with its phase times."""
    from taylorprune import pipeline

    s = bench.shapes
    options = dict(model=str(model_dir), output=str(bench.work / "unused"), method=method, sparsity=0.5,
                   calib_file=str(VALID), calib_sampling="sequential", nsamples=nsamples or s.nsamples,
                   seqlen=s.seqlen, dtype=s.dtype, device=bench.device, overwrite=True)
    options.update(extra)
    cleanup()
    t0 = time.perf_counter()
    pruned = pipeline.prune(pipeline.RunOptions(**options))
    sync(bench.device)
    phases = pruned.phases_s
    out = {"prune_s": phases.get("prune", 0.0), "stats_s": phases.get("model_statistics", 0.0),
           "load_s": phases.get("load", 0.0), "total_s": time.perf_counter() - t0,
           "placement": pruned.placement.mode if pruned.placement else None,
           "streamed": [e.split(":", 1)[1] for e in pruned.events if e.startswith("streamed:")],
           "peak_gpu_gib": peak_gib(bench.device), "sparsity": pruned.achieved_sparsity}
    if keep_masks:
        from taylorprune.modeling.layout import find_layout

        out["masks"] = {t.path: t.module.weight.ne(0).cpu() for t in find_layout(pruned.loaded.model).all_targets}
    del pruned
    return out


def gradient_ratio(bench: Bench, model_dir: Path) -> dict:
    """(b): gradient pass / plain forward+backward over the same windows, three ways."""
    from taylorprune.modeling import loading
    from taylorprune.modeling.layout import find_layout
    from taylorprune.stats.gradients import causal_lm_loss, gradient_pass, streamed_gradient_pass

    s, device = bench.shapes, bench.device
    ids = windows(model_dir, s, s.nsamples)
    model = loading.load(str(model_dir), s.dtype).model.to(device)
    layout = find_layout(model)

    def plain(model, rows) -> float:
        model.requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        for row in rows:
            causal_lm_loss(model, row[None].to(device)).backward()
            model.zero_grad(set_to_none=True)
        sync(device)
        model.requires_grad_(False)
        return time.perf_counter() - t0

    def timed(fn, *a, **k) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn(*a, **k)
        sync(device)
        return time.perf_counter() - t0

    wanted = frozenset({"grad_l2"})
    plain(model, ids[:2])
    gradient_pass(model, layout, ids[:2], wanted, device=torch.device(device))  # warm-up
    out = {"plain_s": plain(model, ids)}
    out["in_memory_s"] = timed(gradient_pass, model, layout, ids, wanted, device=torch.device(device))
    out["blockwise_resident_s"] = timed(streamed_gradient_pass, model, layout, ids, wanted, device=device)
    model.to("cpu")
    cleanup()
    out["streamed_from_cpu_s"] = timed(streamed_gradient_pass, model, layout, ids, wanted, device=device)
    out["streamed_peak_gpu_gib"] = peak_gib(device)
    for key in ("in_memory_s", "blockwise_resident_s", "streamed_from_cpu_s"):
        out[key.replace("_s", "_ratio")] = out[key] / out["plain_s"]
    del model
    return out


def run(args: argparse.Namespace) -> Path:
    bench = Bench(args)
    s = bench.shapes
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke for the CPU check)")
    card = torch.cuda.get_device_name(0) if bench.device == "cuda" else "CPU (smoke, tiny shapes)"
    small, full = bench.work / "small", bench.work / "full"
    bench.row("warm-up", ours, bench, DEMO, "wanda", nsamples=4, seqlen=64, dtype="float32", always=True)
    made_small = None
    if any(bench.wanted(x) for x in ("a", "b", "e")):
        made_small = bench.row("make-small", make_model, small, s, s.small_blocks, bench.device, always=True)
    ok_small = made_small is not None and "error" not in made_small and "skipped" not in made_small
    masks_file = bench.work / "official_wanda_masks.safetensors"
    repo = official_repo(bench) if ok_small and bench.wanted("a") else None
    if ok_small:
        mine = bench.row("a-wanda", ours, bench, small, "wanda", keep_masks=repo is not None)
        if repo is not None:
            theirs = bench.row("a-official-wanda", official, bench, repo, small, "wanda", masks_file)
            if mine and "masks" in mine and theirs and masks_file.is_file():
                theirs["mask_agreement"] = agreement(mine.pop("masks"), masks_file)
        if mine:
            mine.pop("masks", None)
        bench.row("a-wanda-stream", ours, bench, small, "wanda", stream=True)
        if bench.device == "cuda":
            bench.row("a-wanda-devmap", ours, bench, small, "wanda", device_map="auto")
        bench.row("a-sparsegpt", ours, bench, small, "sparsegpt")
        if repo is not None:
            bench.row("a-official-sparsegpt", official, bench, repo, small, "sparsegpt", None)
        bench.row("b", gradient_ratio, bench, small)
    made_full = None
    if any(bench.wanted(x) for x in ("c", "d", "f", "g", "c-gblm", "c-oba-block", "d-wanda", "d-gblm",
                                     "d-sparsegpt")):
        made_full = bench.row("make-full", make_model, full, s, s.full_blocks, bench.device, always=True)
    if made_full is not None and "error" not in made_full and "skipped" not in made_full:
        cap = round(made_full["size_gib"] * s.cap_fraction, 4)
        for name, method, extra in (("c-gblm", "gblm", {}),
                                    ("c-oba-block", "oba", {"oba_mode": "full", "hvp_scope": "block"})):
            row = bench.row(name, ours, bench, full, method, nsamples=s.cap_nsamples, max_gpu_memory=cap,
                            method_options=extra)
            if row is not None:
                row.update(cap_gib=cap, model_gib=made_full["size_gib"])
        for method in ("wanda", "gblm", "sparsegpt"):
            bench.row(f"d-{method}", ours, bench, full, method)
        bench.row("g-gptq", gptq, bench, full)
    ok_full = made_full is not None and "error" not in made_full and "skipped" not in made_full
    if any(bench.wanted(x) for x in ("e", "f")):
        more_rows(bench, small if ok_small else None, full if ok_full else None)
    if ok_small and bench.device == "cuda" and torch.cuda.device_count() > 1:
        bench.row("multi-gpu", ours, bench, small, "gblm", device_map="balanced")
    elif bench.device == "cuda":
        bench.notes.append("one GPU: the backward across several GPUs (--device-map balanced) was not measured")
    out = Path(args.out) if args.out else ROOT / "docs" / "GPU.md"
    merge_previous(bench, out.with_suffix(".json"), card)
    text = render(bench, card, render_more(bench) + render_quant(bench))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    rows = {k: _short(v) for k, v in bench.results.items()}
    record = {"card": card, "shapes": bench.shapes.__dict__, "rows": rows, "notes": bench.notes}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    shutil.rmtree(bench.work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (seconds): checks the script itself")
    ap.add_argument("--out", default=None, help="markdown to write [default: docs/GPU.md]")
    ap.add_argument("--official", default=None, help="checkout of github.com/locuslab/wanda")
    ap.add_argument("--only", default="", help="comma-separated parts (a,b,c,d) or row names")
    ap.add_argument("--budget-s", type=float, default=420.0, help="seconds of rows to start at most")
    args = ap.parse_args(argv)
    args.only = {x.strip() for x in args.only.split(",") if x.strip()}
    if args.smoke and args.out is None:
        raise SystemExit("--smoke writes no docs/GPU.md: give --out")
    run(args)


if __name__ == "__main__":
    main()
