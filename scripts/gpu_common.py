"""What every part of scripts/gpu_check.py shares: shapes, the time budget, random checkpoints, windows, timers."""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


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


ESTIMATES = {"warm-up": 15, "make-small": 15, "a-wanda": 10, "a-official-wanda": 25, "a-wanda-stream": 12,
             "a-wanda-devmap": 10, "a-sparsegpt": 45, "a-official-sparsegpt": 55, "b": 40, "make-full": 40,
             "c-gblm": 45, "c-oba-block": 50, "d-wanda": 40, "d-gblm": 80, "d-sparsegpt": 300, "multi-gpu": 30,
             "e-sparsegpt-1": 60, "e-sparsegpt": 45, "e-gblm-1": 60, "e-gblm": 45, "f-recover-lora": 120,
             "g-gptq": 300}


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

