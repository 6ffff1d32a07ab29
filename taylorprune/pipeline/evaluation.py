"""Perplexity of a loaded model on a named test split or a text file (``eval``, ``run --eval``, ``sweep``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from taylorprune.calib import sampling, text
from taylorprune.evaluate.perplexity import (
    EvalResult,
    perplexity_of_windows,
    streamed_perplexity_of_windows,
    vocabulary_hash,
    windows_of,
)
from taylorprune.modeling.layout import find_layout
from taylorprune.modeling.placement import Placement, choose_placement, memory_cap
from taylorprune.pipeline.plan import resolve_seqlen


def eval_text(dataset: str, text_file: str | None) -> tuple[str, str]:
    """(text, name) for evaluation: a local file or a named test split."""
    if text_file:
        return text.read_file(text_file).joined(), str(Path(text_file).name)
    return text.evaluation_text(dataset), dataset


def eval_windows(tokenizer, dataset: str, text_file: str | None, seqlen: int,
                 max_windows: int | None) -> tuple[torch.Tensor, str]:
    """Tokenize the evaluation text once and cut its windows (fails early when the text is too short)."""
    body, label = eval_text(dataset, text_file)
    return windows_of(sampling.tokenize_cached(tokenizer, body), seqlen, max_windows, label), label


def evaluate_windows(model, tokenizer, windows: torch.Tensor, label: str, name: str, device: torch.device,
                     on_window: Callable[[int, int], None] | None = None, placement: Placement | None = None,
                     stream_batch: int = 16, batch_size: int = 1) -> EvalResult:
    """Perplexity of ``model`` on ``windows``: the whole model on ``device`` (moved there unless accelerate placed
    it), or block by block when ``placement`` streams it."""
    if placement is not None and placement.stream:
        result = streamed_perplexity_of_windows(model, find_layout(model), windows, label, name, device, on_window,
                                                stream_batch, batch_size)
    else:
        if not getattr(model, "hf_device_map", None):
            model.to(device)
        result = perplexity_of_windows(model, windows, label, name, device, on_window)
    return dataclasses.replace(result, tokenizer=vocabulary_hash(tokenizer))


def evaluate_model(model, tokenizer, name: str, dataset: str, text_file: str | None, seqlen: int | None,
                   max_windows: int | None, device: torch.device,
                   on_window: Callable[[int, int], None] | None = None, stream: bool = False,
                   max_gpu_memory: float | None = None, stream_batch: int = 16) -> EvalResult:
    """Perplexity as ``eval`` reports it; resident on the device when the model fits (with one window's logits
    beside it) unless ``stream``, streamed block by block otherwise."""
    seqlen = resolve_seqlen(seqlen, model.config, "--seqlen")
    windows, label = eval_windows(tokenizer, dataset, text_file, seqlen, max_windows)
    working = 2 * seqlen * model.config.vocab_size * 4
    with memory_cap(device, max_gpu_memory):
        placement = choose_placement(model, device, stream, max_gpu_memory, working)
        return evaluate_windows(model, tokenizer, windows, label, name, device, on_window, placement, stream_batch)
