"""The official locuslab/wanda code as a baseline of scripts/gpu_check.py: its checkout, and its prune functions run
in a child process of their own (they set global TF32 flags) on the same windows, with mask agreement.

    python scripts/gpu_official.py _official --repo DIR --model DIR --windows F --method wanda ...  (the child)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_common import Bench, peak_gib, sync, windows


def official_repo(bench: Bench) -> Path | None:
    """A checkout of locuslab/wanda: --official, $WANDA_REPO, or a shallow clone into a scratch folder."""
    for candidate in (bench.args.official, os.environ.get("WANDA_REPO")):
        if candidate and (Path(candidate) / "lib" / "prune.py").is_file():
            return Path(candidate)
    if bench.args.smoke:
        bench.notes.append("official code: not used in --smoke without --official DIR")
        return None
    target = bench.work / "wanda"
    try:
        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/locuslab/wanda", str(target)],
                       check=True, capture_output=True, timeout=60)
        return target
    except (OSError, subprocess.SubprocessError) as exc:
        bench.notes.append(f"official code: unavailable ({type(exc).__name__}: no network?); pass --official DIR "
                           "with a checkout of github.com/locuslab/wanda to add its rows")
        return None


def official(bench: Bench, repo: Path, model_dir: Path, method: str, masks: Path | None) -> dict:
    """The official prune function in its own process (it sets global TF32 flags), timed around the call."""
    ids = windows(model_dir, bench.shapes, bench.shapes.nsamples)
    ids_file = bench.work / "windows.pt"
    torch.save(ids, ids_file)
    cmd = [sys.executable, __file__, "_official", "--repo", str(repo), "--model", str(model_dir), "--windows",
           str(ids_file), "--method", method, "--dtype", bench.shapes.dtype, "--device", bench.device]
    if masks is not None:
        cmd += ["--masks", str(masks)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, bench.left() + 60))
    if proc.returncode:
        raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _official_child(args: argparse.Namespace) -> None:
    """Child process: load as the official main.py does (device_map auto), feed our windows, time prune_*."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    sys.path.insert(0, args.repo)
    import lib.prune as official_prune  # the official module (locuslab/wanda)

    device = torch.device(args.device)
    if device.type != "cuda":  # CPU smoke runs: their SparseGPT synchronises CUDA unconditionally
        torch.cuda.synchronize = lambda *a, **k: None
    ids = torch.load(args.windows)
    kwargs = {"device_map": "auto"} if device.type == "cuda" else {}
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **kwargs).eval()
    model.seqlen = ids.shape[1]
    if not hasattr(model, "hf_device_map"):
        model.hf_device_map = {"": str(device)}
    _rotary_shim(model)
    official_prune.get_loaders = lambda *a, **k: ([(row[None], None) for row in ids], None)
    opts = SimpleNamespace(nsamples=len(ids), seed=0, sparsity_ratio=0.5, use_variant=False)
    prune = official_prune.prune_wanda if args.method == "wanda" else official_prune.prune_sparsegpt
    with contextlib.redirect_stdout(sys.stderr):
        sync(args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        prune(opts, model, None, device, prune_n=0, prune_m=0)
        sync(args.device)
        elapsed = time.perf_counter() - t0
    if args.masks:
        from safetensors.torch import save_file

        masks = {n: m.weight.ne(0).cpu().contiguous() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
        save_file(masks, args.masks)
    print(json.dumps({"prune_s": elapsed, "peak_gpu_gib": peak_gib(args.device)}))


def _rotary_shim(model) -> None:
    """transformers 5 decoder layers need ``position_embeddings``; the official code (written for 4.3x, whose
    attention computed rotary itself) passes only ``position_ids``: compute them per call, as 4.3x did."""
    rotary = model.model.rotary_emb

    def add_rotary(_module, args, kwargs):
        if kwargs.get("position_embeddings") is None:
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_ids")
            if positions is None:
                positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            kwargs["position_embeddings"] = rotary(hidden, positions.to(hidden.device))
        return args, kwargs

    for layer in model.model.layers:
        layer.register_forward_pre_hook(add_rotary, with_kwargs=True)


def agreement(ours_masks: dict, path: Path) -> float:
    from safetensors.torch import load_file

    theirs = load_file(str(path))
    same = sum(int((ours_masks[k] == v).sum()) for k, v in theirs.items())
    return same / sum(v.numel() for v in theirs.values())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    for flag in ("--repo", "--model", "--windows", "--method", "--dtype", "--device", "--masks"):
        ap.add_argument(flag, default=None)
    _official_child(ap.parse_args(sys.argv[2:] if sys.argv[1:2] == ["_official"] else sys.argv[1:]))
