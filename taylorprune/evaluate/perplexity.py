"""Perplexity as SparseGPT / Wanda / GBLM-Pruner measure it.

The evaluation text is tokenized once as a whole, cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped), and each window's mean next-token NLL over its ``seqlen - 1`` shifted
positions is averaged over windows; PPL = exp(mean NLL). Logits are upcast to fp32 for the loss.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from taylorprune.calib.sampling import tokenize
from taylorprune.errors import UserError
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    model: str
    tokenizer: str = ""  # vocabulary fingerprint: same windows × seqlen can still mean different tokens

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of the vocabulary, so results made with different tokenizers are never compared."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def windows_of(ids: torch.Tensor, seqlen: int, max_windows: int | None, name: str) -> torch.Tensor:
    """[windows, seqlen] non-overlapping windows of a 1-D token tensor; remainder dropped."""
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen}: must be at least 2")
    count = ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: must be at least 1")
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"evaluation text {name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: count * seqlen].view(count, seqlen)


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> float:
    """Mean NLL of one [1, seqlen] window over its shifted tokens."""
    return _nll(model(input_ids=window, use_cache=False).logits, window)


def _nll(logits: torch.Tensor, window: torch.Tensor) -> float:
    logits = logits[:, :-1].to(torch.float32)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1)).item()


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int,
    dataset: str,
    model_name: str,
    max_windows: int | None = None,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Evaluate ``model`` on ``text``; ``on_window(i, total)`` reports progress."""
    ids = windows_of(tokenize(tokenizer, text), seqlen, max_windows, dataset)
    result = perplexity_of_windows(model, ids, dataset, model_name, device, on_window)
    return replace(result, tokenizer=tokenizer_fingerprint(tokenizer))


def perplexity_of_windows(
    model,
    ids: torch.Tensor,
    dataset: str,
    model_name: str,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Perplexity over pre-cut [windows, seqlen] token windows."""
    nlls = []
    for i, window in enumerate(ids):
        nlls.append(window_nll(model, window.unsqueeze(0).to(device)))
        if on_window:
            on_window(i + 1, len(ids))
    return _result(nlls, ids, dataset, model_name)


@torch.no_grad()
def streamed_perplexity_of_windows(
    model,
    layout: Layout,
    ids: torch.Tensor,
    dataset: str,
    model_name: str,
    device: torch.device | str = "cpu",
    on_window: Callable[[int, int], None] | None = None,
    windows_per_sweep: int = 16,
    batch_size: int = 1,
) -> EvalResult:
    """``perplexity_of_windows`` for a model that stays where it is (CPU memory): per sweep of windows, every
    block visits ``device`` once (the next one copied while the current one computes), then the model's own
    final norm and head give each window's logits. Equal to the whole-model forward up to float round-off."""
    runner = BlockRunner(model, layout, torch.device(device), batch_size, stream=True)
    nlls = []
    try:
        for start in range(0, len(ids), windows_per_sweep):
            batch = ids[start:start + windows_per_sweep]
            hidden = runner.capture(batch)
            for i in range(len(layout.blocks)):
                with runner.on_device(i, write=False):
                    hidden = runner.run(i, hidden)
            with runner.outside_on_device(head=True):
                for k in range(len(batch)):
                    window = batch[k:k + 1].to(runner.input_device)
                    nlls.append(_nll(runner.head(window, hidden[k:k + 1]).logits, window))
                    if on_window:
                        on_window(start + k + 1, len(ids))
    finally:
        runner.streamer.close()
    return _result(nlls, ids, dataset, model_name)


def _result(nlls: list[float], ids: torch.Tensor, dataset: str, model_name: str) -> EvalResult:
    nlls = [n if math.isfinite(n) else float("inf") for n in nlls]
    mean = sum(nlls) / len(nlls)
    ppl = math.exp(mean) if mean < 709.0 else float("inf")
    return EvalResult(ppl, dataset, ids.shape[1], len(ids), int(ids.numel()), model_name)
