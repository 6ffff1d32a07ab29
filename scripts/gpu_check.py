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
      the A100 anchors of the Wanda++ paper (Wanda 55 s, SparseGPT 322 s, GBLM 5801 s / 26 GB).

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
    python scripts/gpu_check.py --only a,b               # some parts
    python scripts/gpu_check.py --smoke --out /tmp/g.md  # CPU, tiny shapes, seconds (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "taylorprune" / "assets" / "stories260K"
VALID = ROOT / "taylorprune" / "assets" / "data" / "wikitext2_valid.txt"
GIB = 2**30
ANCHORS = {"wanda": "55 s", "sparsegpt": "322 s", "gblm": "5801 s / 26 GB"}  # A100, Wanda++ (arXiv:2503.04992)


@dataclass(frozen=True)
class Shapes:
    hidden: int = 4096
    inter: int = 11008
    heads: int = 32
    kv_heads: int = 32
    vocab: int = 32000
    small_blocks: int = 4
    full_blocks: int = 32
    nsamples: int = 128
    seqlen: int = 2048
    dtype: str = "bfloat16"
    cap_nsamples: int = 32  # part (c): calibration windows beside a memory cap (their hidden states stay on the GPU)
    cap_fraction: float = 0.6  # part (c): --max-gpu-memory as a fraction of the model's size


SMOKE = Shapes(hidden=64, inter=128, heads=4, kv_heads=2, vocab=512, small_blocks=2, full_blocks=4, nsamples=8,
               seqlen=64, dtype="float32", cap_nsamples=4)
# rough seconds per row on one H100 (budgeting only; the smoke run uses none)
ESTIMATES = {"warm-up": 15, "make-small": 15, "a-wanda": 10, "a-official-wanda": 25, "a-wanda-stream": 12,
             "a-wanda-devmap": 10, "a-sparsegpt": 45, "a-official-sparsegpt": 55, "b": 40, "make-full": 40,
             "c-gblm": 45, "c-oba-block": 50, "d-wanda": 40, "d-gblm": 80, "d-sparsegpt": 300, "multi-gpu": 30}


class Bench:
    """Rows in order, each inside the time budget, each recording its own error instead of stopping the run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.shapes = SMOKE if args.smoke else Shapes()
        self.device = "cpu" if args.smoke else "cuda"
        self.start = time.perf_counter()
        self.work = Path(tempfile.mkdtemp(prefix="taylorprune-gpu-"))
        self.results: dict[str, dict] = {}
        self.notes: list[str] = []

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def wanted(self, name: str) -> bool:
        only = self.args.only
        return not only or name.split("-")[0] in only or name in only

    def row(self, name: str, fn, *a, always: bool = False, **k) -> dict | None:
        """Run ``fn`` as row ``name`` when wanted (``always``: a step others need) and the budget allows."""
        if not always and not self.wanted(name):
            return None
        estimate = 0 if self.args.smoke else ESTIMATES.get(name, 30)
        if estimate > self.left():
            self.results[name] = {"skipped": f"not run: about {estimate} s needed, {max(0, self.left()):.0f} s of "
                                  f"the {self.args.budget_s:.0f} s budget left (rerun with --only {name})"}
            return None
        t0 = time.perf_counter()
        try:
            out = fn(*a, **k) or {}
        except Exception as exc:  # one failing row must not lose the others
            out = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
        out["row_s"] = time.perf_counter() - t0
        self.results[name] = out
        print(f"[{time.perf_counter() - self.start:6.1f} s] {name}: {json.dumps(_short(out))}", flush=True)
        cleanup()
        return out


def _short(row: dict) -> dict:
    return {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in row.items() if k != "masks"}


def cleanup() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device.startswith("cuda") else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------- models
def make_model(folder: Path, shapes: Shapes, blocks: int, device: str) -> dict:
    """A random LLaMA-architecture checkpoint (initialised on ``device``, saved as safetensors) with the demo
    tokenizer (its ids are a subset of the vocabulary)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.inter,
                      num_hidden_layers=blocks, num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
                      max_position_embeddings=max(2048, shapes.seqlen), tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, shapes.dtype))
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, folder / name)
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    return {"params_b": params / 1e9, "size_gib": size / GIB}


def windows(model_dir: Path, shapes: Shapes, nsamples: int) -> torch.Tensor:
    """The calibration windows ``taylorprune run`` uses here (sequential, seed 0), for the other code paths."""
    from transformers import AutoTokenizer

    from taylorprune.calib.sampling import sample
    from taylorprune.calib.text import read_file

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return sample(tokenizer, read_file(VALID), nsamples, shapes.seqlen, 0, "sequential", cache=True)[0]


# ------------------------------------------------------------------------------------------------- our rows
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


# ------------------------------------------------------------------------------------------------- official code
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


# ------------------------------------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> Path:
    bench = Bench(args)
    s = bench.shapes
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --smoke for the CPU check)")
    card = torch.cuda.get_device_name(0) if bench.device == "cuda" else "CPU (smoke, tiny shapes)"
    small, full = bench.work / "small", bench.work / "full"
    bench.row("warm-up", ours, bench, DEMO, "wanda", nsamples=4, seqlen=64, dtype="float32", always=True)
    made_small = None
    if any(bench.wanted(x) for x in ("a", "b")):
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
    if any(bench.wanted(x) for x in ("c", "d", "c-gblm", "c-oba-block", "d-wanda", "d-gblm", "d-sparsegpt")):
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
    if ok_small and bench.device == "cuda" and torch.cuda.device_count() > 1:
        bench.row("multi-gpu", ours, bench, small, "gblm", device_map="balanced")
    elif bench.device == "cuda":
        bench.notes.append("one GPU: the backward across several GPUs (--device-map balanced) was not measured")
    out = Path(args.out) if args.out else ROOT / "docs" / "GPU.md"
    merge_previous(bench, out.with_suffix(".json"), card)
    text = render(bench, card)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    rows = {k: _short(v) for k, v in bench.results.items()}
    record = {"card": card, "shapes": bench.shapes.__dict__, "rows": rows, "notes": bench.notes}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(text)
    shutil.rmtree(bench.work, ignore_errors=True)
    return out


def merge_previous(bench: Bench, path: Path, card: str) -> None:
    """Keep rows measured by an earlier call on the same card and shapes that this call did not measure, so the
    parts can run in separate calls (``--only a,b`` then ``--only c,d``) into one docs/GPU.md."""
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if before.get("card") != card or before.get("shapes") != bench.shapes.__dict__:
        return
    merged = dict(before.get("rows", {}))
    for name, row in bench.results.items():
        if "skipped" not in row or name not in merged or "skipped" in merged[name]:
            merged[name] = row
    bench.results = merged
    bench.notes = list(dict.fromkeys(before.get("notes", []) + bench.notes))


# ------------------------------------------------------------------------------------------------- the report
def _num(row: dict | None, key: str, fmt: str = "{:.2f}") -> str:
    if not row:
        return "–"
    if "error" in row:
        return "error"
    if "skipped" in row:
        return "not run"
    value = row.get(key)
    return "–" if value is None else fmt.format(value)


def _ratio(a: dict | None, b: dict | None, key: str = "prune_s") -> str:
    if not a or not b or key not in a or key not in b or not b[key]:
        return "–"
    return f"{a[key] / b[key]:.2f}×"


def render(bench: Bench, card: str) -> str:
    r, s = bench.results, bench.shapes
    made_small, made_full = r.get("make-small"), r.get("make-full")
    lines = [f"# GPU benchmark: {card}", "",
             f"`python scripts/gpu_check.py{' --smoke' if bench.args.smoke else ''}` (torch {torch.__version__}); "
             f"random LLaMA-shaped checkpoints (hidden {s.hidden}, MLP {s.inter}, {s.heads} heads, vocabulary "
             f"{s.vocab}, {s.dtype}); {s.nsamples} × {s.seqlen} sequential calibration windows of the bundled "
             "WikiText-2 validation text; 50% unstructured.", ""]
    if made_small and "params_b" in made_small:
        lines.append(f"Small model: {s.small_blocks} blocks, {made_small['params_b']:.3g} B parameters, "
                     f"{made_small['size_gib']:.3g} GiB.")
    if made_full and "params_b" in made_full:
        lines.append(f"Full model: {s.full_blocks} blocks, {made_full['params_b']:.3g} B parameters, "
                     f"{made_full['size_gib']:.3g} GiB.")
    lines += ["", "## (a) Prune phase against the official code (same windows, same GPU)", "",
              "| run | placement | prune (s) | vs official | peak GPU (GiB) |", "| --- | --- | ---: | ---: | ---: |"]
    for name, label, ref in (("a-wanda", "wanda (auto: resident)", "a-official-wanda"),
                             ("a-wanda-stream", "wanda --stream", "a-official-wanda"),
                             ("a-wanda-devmap", "wanda --device-map auto", "a-official-wanda"),
                             ("a-official-wanda", "official prune_wanda", None),
                             ("a-sparsegpt", "sparsegpt (auto)", "a-official-sparsegpt"),
                             ("a-official-sparsegpt", "official prune_sparsegpt", None)):
        row = r.get(name)
        if row is None:
            continue
        lines.append(f"| {label} | {row.get('placement') or ('–' if ref else 'whole model on the device')} | "
                     f"{_num(row, 'prune_s')} | {_ratio(row, r.get(ref)) if ref else ''} | "
                     f"{_num(row, 'peak_gpu_gib')} |")
    if "mask_agreement" in r.get("a-official-wanda", {}):
        lines.append(f"\nWanda masks, ours vs official: {100 * r['a-official-wanda']['mask_agreement']:.3f}% of "
                     "entries agree.")
    b = r.get("b")
    lines += ["", "## (b) Gradient pass over one plain forward+backward (same model and windows)", ""]
    if b and "plain_s" in b:
        lines += ["| pass | seconds | / plain fwd+bwd |", "| --- | ---: | ---: |",
                  f"| plain forward+backward | {b['plain_s']:.2f} | 1.00× |",
                  f"| gradient pass, in memory | {b['in_memory_s']:.2f} | {b['in_memory_ratio']:.2f}× "
                  "(target ≤ 1.3×) |",
                  f"| block by block, model resident | {b['blockwise_resident_s']:.2f} | "
                  f"{b['blockwise_resident_ratio']:.2f}× |",
                  f"| block by block, streamed from CPU | {b['streamed_from_cpu_s']:.2f} | "
                  f"{b['streamed_from_cpu_ratio']:.2f}× (peak GPU {_num(b, 'streamed_peak_gpu_gib')} GiB) |"]
    else:
        lines.append(f"not measured ({(b or {}).get('error') or (b or {}).get('skipped') or 'not run'})")
    lines += ["", "## (c) A memory cap below the model's size (--max-gpu-memory, streamed)", "",
              "| method | windows | cap (GiB) | model (GiB) | placement | streamed passes | stats + prune (s) | "
              "peak GPU (GiB) |", "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
    for name, label in (("c-gblm", "gblm"), ("c-oba-block", "oba full, block scope")):
        row = r.get(name)
        if row is None:
            continue
        total = row.get("prune_s", 0.0) + row.get("stats_s", 0.0) if "prune_s" in row else None
        lines.append(f"| {label} | {s.cap_nsamples} | {_num(row, 'cap_gib', '{:.3g}')} | "
                     f"{_num(row, 'model_gib', '{:.3g}')} | "
                     f"{row.get('placement', '–')} | {', '.join(row.get('streamed', [])) or '–'} | "
                     f"{'–' if total is None else f'{total:.2f}'} | {_num(row, 'peak_gpu_gib')} |")
    lines += ["", f"## (d) {s.full_blocks} blocks at {s.nsamples} × {s.seqlen}", "",
              "| method | placement | stats (s) | prune (s) | peak GPU (GiB) | A100 anchor (Wanda++) |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
    for method in ("wanda", "gblm", "sparsegpt"):
        row = r.get(f"d-{method}")
        small_row = r.get(f"a-{method}") or {}
        if (row is None or "prune_s" not in row) and "prune_s" in small_row:  # SparseGPT's cost is per linear
            guess = small_row["prune_s"] * s.full_blocks / s.small_blocks
            lines.append(f"| {method} | – | – | ≈ {guess:.0f} (extrapolated: {s.small_blocks}-block row × "
                         f"{s.full_blocks // s.small_blocks}; not run) | – | {ANCHORS[method]} |")
            continue
        if row is None:
            continue
        lines.append(f"| {method} | {row.get('placement', '–')} | {_num(row, 'stats_s')} | {_num(row, 'prune_s')} | "
                     f"{_num(row, 'peak_gpu_gib')} | {ANCHORS[method]} |")
    problems = [f"- {k}: {v.get('error') or v.get('skipped')}" for k, v in r.items() if "error" in v or "skipped" in v]
    if problems or bench.notes:
        lines += ["", "## Notes", ""] + problems + [f"- {n}" for n in bench.notes]
    lines.append(f"\nTotal {time.perf_counter() - bench.start:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_official":
        ap = argparse.ArgumentParser()
        for flag in ("--repo", "--model", "--windows", "--method", "--dtype", "--device", "--masks"):
            ap.add_argument(flag, default=None)
        _official_child(ap.parse_args(argv[1:]))
        return
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
