#!/usr/bin/env python
"""One short GPU check for sessions lent an accelerator: CUDA paths, bf16/fp16, memory and speed.

Builds a random LLaMA-architecture checkpoint (~0.5B parameters, bf16) with the bundled demo tokenizer, then
runs `taylorprune run` on CUDA for a few methods and dtypes (block streaming: the model stays on the CPU and
one block at a time visits the GPU), and the bundled stories260K on CPU and CUDA to compare masks. Writes
docs/GPU.md with the card's name. Needs no network and nothing outside the repository.

    python scripts/gpu_check.py            # on the GPU machine
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "taylorprune" / "assets" / "stories260K"
CALIB = ["--calib", "wikitext2-valid", "--calib-sampling", "sequential", "--nsamples", "32", "--seqlen", "512"]
RUNS = [("wanda", "bfloat16", []), ("sparsegpt", "bfloat16", []), ("gblm", "bfloat16", []),
        ("gblm", "float16", []), ("oba", "bfloat16", ["--hvp-scope", "block", "--nsamples", "8"])]


def make_model(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=512, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)


def run(model: Path, out: Path, method: str, dtype: str, extra: list[str], device: str = "cuda") -> dict:
    cmd = [sys.executable, "-m", "taylorprune", "run", "--model", str(model), "--method", method, "--sparsity", "0.5",
           "--dtype", dtype, "--device", device, *CALIB, *extra, "--output", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        return {"method": method, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1:]}
    rep = json.loads((out / "taylorprune_report.json").read_text())
    return {"method": method, "dtype": dtype, "wall_s": wall, "prune_s": rep["phases_s"]["prune"],
            "stats_s": rep["phases_s"].get("model_statistics", 0.0), "sparsity": rep["achieved_sparsity"],
            "cuda_mib": rep["peak_memory_mib"].get("cuda_mib"), "rss_mib": rep["peak_memory_mib"]["rss_mib"]}


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    card = torch.cuda.get_device_name(0)
    work = Path(tempfile.mkdtemp())
    make_model(work / "model")
    rows = [run(work / "model", work / f"out-{i}", m, d, e) for i, (m, d, e) in enumerate(RUNS)]
    masks = {}
    for device in ("cpu", "cuda"):
        run(DEMO, work / f"demo-{device}", "wanda", "float32", [], device)
        from safetensors.torch import load_file

        masks[device] = {k: v != 0 for k, v in load_file(work / f"demo-{device}" / "model.safetensors").items()}
    agree = sum(int((masks["cpu"][k] == masks["cuda"][k]).sum()) for k in masks["cpu"])
    total = sum(v.numel() for v in masks["cpu"].values())
    lines = [f"# GPU check: {card}", "", f"`python scripts/gpu_check.py` (torch {torch.__version__}); random LLaMA "
             "2048-d, 8 layers, GQA 16/4, bf16 on disk; 32 × 512 calibration windows, 50% unstructured.", "",
             "| method | dtype | wall (s) | dense stats (s) | prune (s) | sparsity | peak CUDA (MiB) | peak RSS |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['dtype']} | error: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['method']} | {r['dtype']} | {r['wall_s']:.1f} | {r['stats_s']:.1f} | {r['prune_s']:.1f}"
                         f" | {r['sparsity']:.4f} | {r['cuda_mib'] or 0:.0f} | {r['rss_mib']:.0f} |")
    lines += ["", f"stories260K wanda 50% masks, CPU vs CUDA (fp32): {agree}/{total} entries agree."]
    (ROOT / "docs" / "GPU.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
