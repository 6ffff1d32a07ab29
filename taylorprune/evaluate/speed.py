"""Inference speed: prefill and decode tokens/s of a causal LM against a baseline (the ``speed`` evaluator).

As a user runs it (batch 1, KV cache):

- prefill: one forward over ``prefill`` tokens (no cache kept): prefill / seconds;
- decode: after a short prompt, ``decode`` greedy steps of one token each with the KV cache: decode / seconds
  of the steps only.

Inputs are fixed token ids (a deterministic sequence over the vocabulary), so both models see the same work.
A load burst on a shared machine must not land on one side only, so the two models are timed in interleaved
rounds after one warm-up each: round r times them in the order AB when r is even and BA when it is odd, and the
result is the median over rounds of the per-round ratio (model / baseline), with its spread (the lowest and
highest per-round ratio). CUDA is synchronised around every timing.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from taylorprune.errors import UserError
from taylorprune.evaluate.spec import EvalContext, Evaluator
from taylorprune.options import Options, option

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


def _round(model, device: torch.device, prefill: int, decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of one timing round."""
    vocab = model.config.get_text_config().vocab_size
    long_ids, prompt = _ids(vocab, prefill, device), _ids(vocab, PROMPT, device)
    return _timed(lambda: _prefill(model, long_ids), device), _timed(_decode(model, prompt, decode), device)


def _summary(times: list[tuple[float, float]], prefill: int, decode: int) -> dict:
    pm, dm = statistics.median(t[0] for t in times), statistics.median(t[1] for t in times)
    return {"prefill_s": pm, "decode_s": dm, "prefill_tok_s": prefill / pm, "decode_tok_s": decode / dm}


def compare(dense, pruned, device: torch.device, prefill: int = 512, decode: int = 128, rounds: int = 5,
            threads: int | None = None) -> dict:
    """Both models timed in interleaved rounds (see the module doc); ratios pruned / dense."""
    device = torch.device(device)
    models = {"dense": dense, "pruned": pruned}
    for model in models.values():
        if not getattr(model, "hf_device_map", None):
            model.to(device)
    for model in models.values():  # warm-up: kernels, allocator, caches
        _round(model, device, prefill, decode)
    times: dict[str, list[tuple[float, float]]] = {"dense": [], "pruned": []}
    for r in range(rounds):
        for name in ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense"):
            times[name].append(_round(models[name], device, prefill, decode))
    out = interleaved_summary(times, prefill, decode)
    return {**out, "prefill_tokens": prefill, "decode_tokens": decode, "rounds": rounds,
            "order": "one warm-up each, then rounds alternating AB / BA", "device": str(device),
            "threads": threads or torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ the evaluator
@dataclass(frozen=True)
class SpeedOptions(Options):
    speed: bool = option(False, "Time prefill and decode of the dense and the pruned model (interleaved rounds, "
                         "same process and device); tokens/s and ratios go in the report.", identity=False)
    speed_prefill: int = option(512, "Speed: tokens of the timed prefill forward.", minimum=1, identity=False)
    speed_decode: int = option(128, "Speed: new tokens of the timed greedy decode (batch 1, KV cache).", minimum=1,
                               identity=False)
    speed_rounds: int = option(5, "Speed: interleaved timing rounds after one warm-up (median ratio reported).",
                               minimum=1, identity=False)


def check_positions(config, prefill: int, decode: int, name: str = "--model") -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max(prefill, PROMPT + decode) > limit:
        raise UserError(f"{name}: supports {limit} positions; lower the prefill / decode tokens")


def run(ctx: EvalContext, options: SpeedOptions, prepared) -> dict:
    if ctx.baseline is None:
        raise UserError("speed needs the dense model to compare with")
    dense = ctx.baseline()
    try:
        return compare(dense, ctx.model, ctx.device, options.speed_prefill, options.speed_decode, options.speed_rounds)
    finally:
        del dense


def summary_rows(r: dict) -> list[tuple[str, str]]:
    """Tokens/s of both models and the median ratio with its spread over the rounds."""
    out = []
    for kind, digits in (("prefill", 0), ("decode", 1)):
        low, high = r[f"{kind}_ratio_spread"]
        out.append((f"{kind} tokens/s (pruned / dense)", f"{r['pruned'][f'{kind}_tok_s']:.{digits}f} / "
                    f"{r['dense'][f'{kind}_tok_s']:.{digits}f} = {r[f'{kind}_ratio']:.2f}× ({low:.2f}–{high:.2f})"))
    return out


EVALUATOR = Evaluator("speed", "prefill and decode tokens/s against the dense model, interleaved rounds", run,
                      metrics=lambda r: {"prefill_ratio": r["prefill_ratio"], "decode_ratio": r["decode_ratio"]},
                      options=SpeedOptions, switch="speed", higher_is_better=True,
                      check=lambda o, config: check_positions(config, o.speed_prefill, o.speed_decode),
                      settings=("prefill_tokens", "decode_tokens", "device", "threads"),
                      label="timing prefill and decode (dense and pruned, interleaved)", rows=summary_rows)


def interleaved_summary(times: dict[str, list[tuple[float, float]]], prefill: int, decode: int) -> dict:
    """Per model tokens/s, and per round the dense ÷ pruned time ratios (median and spread) of prefill and decode:
    the one summary of interleaved rounds, whichever runtime timed them."""
    ratios = {kind: [d[k] / p[k] for d, p in zip(times["dense"], times["pruned"], strict=True)]
              for k, kind in enumerate(("prefill", "decode"))}
    out: dict = {name: _summary(t, prefill, decode) for name, t in times.items()}
    for kind, values in ratios.items():
        out[f"{kind}_ratio"] = statistics.median(values)
        out[f"{kind}_ratio_spread"] = [min(values), max(values)]
    return out
