"""Prefill and decode speed of two GGUF files in llama.cpp (``taylorprune speed --runtime llamacpp``).

Speed: as ``evaluate.speed`` times two models in PyTorch, two GGUF files here: per round a prefill of ``prefill``
tokens from an empty cache (one ``llama_decode`` call, logits of the last token only) and, after a 16-token prompt,
``decode`` greedy single-token steps with the KV cache; one warm-up each, then interleaved rounds (AB, BA, ...),
the median per-round ratio and its spread. Threads: ``--llamacpp-threads`` (default PyTorch's thread count, what
the transformers runtime uses) for both prefill and decode.
"""

from __future__ import annotations

import time

from taylorprune.errors import UserError
from taylorprune.evaluate.llamacpp import (
    RuntimeOptions,
    _synchronize,
    _version,
    file_info,
    gguf_file,
    last_logits,
    load,
)
from taylorprune.evaluate.speed import PROMPT, _ids, interleaved_summary


def _round(llm, prefill: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one timing round of a model loaded without ``logits_all``."""

    vocab = llm.n_vocab()
    long_ids, prompt = _ids(vocab, prefill, "cpu")[0].tolist(), _ids(vocab, PROMPT, "cpu")[0].tolist()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(long_ids)
    _synchronize(llm)
    prefill_s = time.perf_counter() - t0
    llm.reset()
    llm.eval(prompt)
    nxt = int(last_logits(llm).argmax())
    t0 = time.perf_counter()
    for _ in range(decode):
        llm.eval([nxt])
        nxt = int(last_logits(llm).argmax())
    return prefill_s, time.perf_counter() - t0


def compare(baseline: str, model: str, prefill: int = 512, decode: int = 128, rounds: int = 5,
            runtime: RuntimeOptions | None = None) -> dict:
    """``evaluate.speed.compare`` for two GGUF files in llama.cpp: the same record (ratios model / baseline)."""

    runtime = runtime or RuntimeOptions(runtime="llamacpp")
    files = {"dense": gguf_file(baseline, "--baseline"), "pruned": gguf_file(model, "--model")}
    n_ctx = max(prefill, PROMPT + decode)
    for key, flag in (("dense", "--baseline"), ("pruned", "--model")):
        limit = file_info(files[key], flag).context_length
        if limit and n_ctx > limit:
            raise UserError(f"{flag} {files[key]}: supports {limit} positions; lower the prefill / decode tokens")
    models = {}
    try:
        for key, flag in (("dense", "--baseline"), ("pruned", "--model")):
            models[key] = load(files[key], n_ctx, runtime, logits_all=False, flag=flag)
        for llm in models.values():  # warm-up: weights paged in, threads and buffers set up
            _round(llm, prefill, decode)
        times: dict[str, list[tuple[float, float]]] = {"dense": [], "pruned": []}
        for r in range(rounds):
            for key in ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense"):
                times[key].append(_round(models[key], prefill, decode))
    finally:
        for llm in models.values():
            llm.close()
    out = interleaved_summary(times, prefill, decode)
    gpu = runtime.llamacpp_gpu_layers
    return {**out, "prefill_tokens": prefill, "decode_tokens": decode, "rounds": rounds,
            "order": "one warm-up each, then rounds alternating AB / BA",
            "device": "llama.cpp " + (f"({'all' if gpu < 0 else gpu} layers on the GPU)" if gpu else "cpu"),
            "threads": runtime.threads, "runtime": "llamacpp", "llama_cpp_python": _version()}


