"""Perplexity of a loaded model on a named test split or a text file (``eval``, ``run --eval``, ``sweep``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from taylorprune.calib import sampling, text
from taylorprune.evaluate.perplexity import EvalResult, perplexity_of_windows, tokenizer_fingerprint, windows_of
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
    return windows_of(sampling.tokenize(tokenizer, body), seqlen, max_windows, label), label


def evaluate_windows(model, tokenizer, windows: torch.Tensor, label: str, name: str, device: torch.device,
                     on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    if not getattr(model, "hf_device_map", None):
        model.to(device)
    result = perplexity_of_windows(model, windows, label, name, device, on_window)
    return dataclasses.replace(result, tokenizer=tokenizer_fingerprint(tokenizer))


def evaluate_model(model, tokenizer, name: str, dataset: str, text_file: str | None, seqlen: int | None,
                   max_windows: int | None, device: torch.device,
                   on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    windows, label = eval_windows(tokenizer, dataset, text_file, resolve_seqlen(seqlen, model.config, "--seqlen"),
                                  max_windows)
    return evaluate_windows(model, tokenizer, windows, label, name, device, on_window)
