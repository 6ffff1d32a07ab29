"""Inference speed: prefill and decode tokens/s of a causal LM, the way a user runs it (batch 1, KV cache).

- prefill: one forward over ``prefill`` tokens (no cache kept): prefill / seconds;
- decode: after a short prompt, ``decode`` greedy steps of one token each with the KV cache: decode / seconds
  of the steps only.

Inputs are fixed token ids (a deterministic sequence over the vocabulary), so dense and pruned models see the
same work. Each measurement is the median of ``repeats`` after one warm-up; CUDA is synchronised around every
timing. Compare two models only from one call (same process, device and threads).
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable

import torch

PROMPT = 16


def _ids(vocab: int, length: int, device) -> torch.Tensor:
    return (torch.arange(length, device=device).view(1, -1) * 7919 + 11) % max(vocab - 1, 1) + 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _prefill(model, ids: torch.Tensor) -> None:
    model(input_ids=ids, use_cache=False)


def _cache_name(model) -> str:
    """The KV-cache keyword of this transformers version (``cache`` replaced ``past_key_values``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, steps: int) -> Callable[[], None]:
    """Prefill the prompt (untimed); returns the timed part: ``steps`` single-token forwards with the cache."""
    name = _cache_name(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)

    def steps_fn() -> None:
        nonlocal cache, nxt
        for _ in range(steps):
            out = model(input_ids=nxt, use_cache=True, **{name: cache})
            cache, nxt = getattr(out, name), out.logits[:, -1:].argmax(-1)

    return steps_fn


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def measure(model, device: torch.device, prefill: int = 512, decode: int = 128, repeats: int = 3) -> dict:
    """{prefill_tok_s, decode_tok_s, ...} of ``model`` (already on ``device``)."""
    vocab = model.config.get_text_config().vocab_size
    long_ids, prompt = _ids(vocab, prefill, device), _ids(vocab, PROMPT, device)
    prefill_s, decode_s = [], []
    for r in range(repeats + 1):  # the first round warms up
        p = _timed(lambda: _prefill(model, long_ids), device)
        d = _timed(_decode(model, prompt, decode), device)
        if r:
            prefill_s.append(p)
            decode_s.append(d)
    pm, dm = statistics.median(prefill_s), statistics.median(decode_s)
    return {"prefill_tokens": prefill, "decode_tokens": decode, "repeats": repeats, "prefill_s": pm, "decode_s": dm,
            "prefill_tok_s": prefill / pm, "decode_tok_s": decode / dm}


def compare(dense, pruned, device: torch.device, prefill: int = 512, decode: int = 128, repeats: int = 3,
            threads: int | None = None) -> dict:
    """Both models measured in turn in this process on ``device``; ratios pruned / dense."""
    rows = {}
    for name, model in (("dense", dense), ("pruned", pruned)):
        if not getattr(model, "hf_device_map", None):
            model.to(device)
        rows[name] = measure(model, device, prefill, decode, repeats)
    return {**rows, "device": str(device), "threads": threads or torch.get_num_threads(),
            "prefill_ratio": rows["pruned"]["prefill_tok_s"] / rows["dense"]["prefill_tok_s"],
            "decode_ratio": rows["pruned"]["decode_tok_s"] / rows["dense"]["decode_tok_s"]}
