"""Perplexity as SparseGPT / Wanda / GBLM-Pruner measure it (the ``perplexity`` evaluator, ``--eval``).

The evaluation text is tokenized once as a whole, cut into non-overlapping windows of ``seqlen`` tokens
(the remainder is dropped), and each window's mean next-token NLL over its ``seqlen - 1`` shifted
positions is averaged over windows; PPL = exp(mean NLL). Logits are upcast to fp32 for the loss. A streamed
model goes block by block (one sweep per ``--stream-batch`` windows), the model's own head giving the logits.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from taylorprune import distributed
from taylorprune.calib import sampling, text
from taylorprune.errors import UserError
from taylorprune.evaluate.spec import EvalContext, Evaluator
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout, find_layout
from taylorprune.modeling.loading import resolve_seqlen, window_start
from taylorprune.modeling.placement import logits_bytes
from taylorprune.modeling.sweep import forward, in_sweeps, next_token_loss
from taylorprune.options import Options, option


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    dataset: str
    seqlen: int
    windows: int
    tokens: int
    model: str
    tokenizer: str = ""  # vocabulary hash: the same windows × seqlen can still mean different tokens
    bos: int | None = None  # every window started with this token (``modeling.loading.window_start``)

    def to_dict(self) -> dict:
        return asdict(self)


def vocabulary_hash(tokenizer) -> str:
    """Short hash of the vocabulary, so results made with different tokenizers are never compared (kept as it was
    so older results stay comparable; ``calib.cache.tokenizer_fingerprint`` is the full identity)."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def windows_of(ids: torch.Tensor, seqlen: int, max_windows: int | None, name: str,
               bos: int | None = None) -> torch.Tensor:
    """[windows, seqlen] non-overlapping windows of a 1-D token tensor; remainder dropped. ``bos``: each window is
    that token followed by ``seqlen - 1`` text tokens."""
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen}: must be at least 2")
    span = seqlen - (bos is not None)
    count = ids.numel() // span
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max-windows {max_windows}: must be at least 1")
        count = min(count, max_windows)
    if count == 0:
        raise UserError(f"evaluation text {name} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: count * span].view(count, span)
    if bos is None:
        return windows
    return torch.cat([torch.full((count, 1), bos, dtype=windows.dtype), windows], dim=1)


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> float:
    """Mean NLL of one [1, seqlen] window over its shifted tokens."""
    return next_token_loss(model(input_ids=window, use_cache=False).logits, window).item()


def perplexity(model, tokenizer, body: str, seqlen: int, dataset: str, model_name: str,
               max_windows: int | None = None, device: torch.device | str = "cpu",
               on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate ``model`` on the text ``body``; ``on_window(i, total)`` reports progress."""
    ids = windows_of(sampling.tokenize(tokenizer, body), seqlen, max_windows, dataset)
    result = perplexity_of_windows(model, ids, dataset, model_name, device, on_window)
    return replace(result, tokenizer=vocabulary_hash(tokenizer))


def perplexity_of_windows(model, ids: torch.Tensor, dataset: str, model_name: str,
                          device: torch.device | str = "cpu",
                          on_window: Callable[[int, int], None] | None = None) -> EvalResult:
    """Perplexity over pre-cut [windows, seqlen] token windows, the whole model on ``device``."""
    nlls = []
    for i, window in enumerate(ids):
        nlls.append(window_nll(model, window.unsqueeze(0).to(device)))
        if on_window:
            on_window(i + 1, len(ids))
    return _result(nlls, ids, dataset, model_name)


@torch.no_grad()
def streamed_perplexity_of_windows(model, layout: Layout, ids: torch.Tensor, dataset: str, model_name: str,
                                   device: torch.device | str = "cpu",
                                   on_window: Callable[[int, int], None] | None = None,
                                   windows_per_sweep: int = 16, batch_size: int = 1) -> EvalResult:
    """``perplexity_of_windows`` for a model that stays where it is (CPU memory): per sweep of windows, every
    block visits ``device`` once (the next one copied while the current one computes), then the model's own
    final norm and head give each window's logits. Equal to the whole-model forward up to float round-off."""
    runner = BlockRunner(model, layout, torch.device(device), batch_size, stream=True)
    nlls = []
    try:
        for part in in_sweeps(len(ids), windows_per_sweep):
            batch = ids[part]
            hidden = forward(runner, runner.capture(batch), write=False)
            with runner.outside_on_device(head=True):
                for k in range(len(batch)):
                    window = batch[k:k + 1].to(runner.input_device)
                    nlls.append(next_token_loss(runner.head(window, hidden[k:k + 1]).logits, window).item())
                    if on_window:
                        on_window(part.start + k + 1, len(ids))
    finally:
        runner.streamer.close()
    return _result(nlls, ids, dataset, model_name)


def _result(nlls: list[float], ids: torch.Tensor, dataset: str, model_name: str) -> EvalResult:
    """Perplexity of the windows' mean NLL; in a data-parallel run ``nlls`` are this rank's windows and the sum
    and count are taken over every rank's."""
    nlls = [n if math.isfinite(n) else float("inf") for n in nlls]
    count = round(distributed.all_sum_number(len(nlls)))
    mean = distributed.all_sum_number(sum(nlls)) / count
    ppl = math.exp(mean) if mean < 709.0 else float("inf")
    return EvalResult(ppl, dataset, ids.shape[1], count, count * ids.shape[1], model_name)


# ------------------------------------------------------------------------------------------ the evaluator
@dataclass(frozen=True)
class PerplexityOptions(Options):
    eval: bool = option(False, "Evaluate the perplexity of the pruned model (papers' protocol).", identity=False)
    eval_dataset: str | None = option(None, f"Eval data set (default wikitext2 unless --eval-text-file): "
                                      f"{', '.join(text.EVAL_DATASETS)} (test splits).", choices=text.EVAL_DATASETS)
    eval_text_file: str | None = option(None, "Evaluate on this text file instead (.txt, or .jsonl with 'text').")
    eval_seqlen: int | None = option(None, "Eval window length (default: min(2048, max positions)).", minimum=2)
    max_windows: int | None = option(None, "Evaluate at most this many windows.", minimum=1)

    def check(self) -> None:
        if self.eval_text_file and not Path(self.eval_text_file).expanduser().is_file():
            raise UserError(f"--eval-text-file {self.eval_text_file}: file not found")
        if self.eval_text_file and self.eval_dataset:
            raise UserError(f"--eval-dataset {self.eval_dataset} and --eval-text-file {self.eval_text_file} both name "
                            "the evaluation text; keep one")


# how ``eval`` and ``check`` spell the options ``run`` calls --eval-*
SHORT_FLAGS = {"--eval-dataset": "--dataset", "--eval-text-file": "--text-file", "--eval-seqlen": "--seqlen"}


def short_options(dataset: str | None, text_file: str | None, seqlen: int | None, max_windows: int | None
                  ) -> PerplexityOptions:
    """The evaluator's options from ``eval``'s and ``check``'s own flags; errors name those flags."""
    try:
        return PerplexityOptions.build({"eval": True, "eval_dataset": dataset, "eval_text_file": text_file,
                                        "eval_seqlen": seqlen, "max_windows": max_windows})
    except UserError as exc:
        message = str(exc)
        for long, short in SHORT_FLAGS.items():
            message = message.replace(long, short)
        raise UserError(message) from None


def eval_text(dataset: str | None, text_file: str | None) -> tuple[str, str]:
    """(text, name) for evaluation: a local file or a named test split (wikitext2 when none is named)."""
    if text_file:
        return text.read_file(text_file).joined(), str(Path(text_file).name)
    return text.evaluation_text(dataset or "wikitext2"), dataset or "wikitext2"


def prepare(ctx: EvalContext, options: PerplexityOptions) -> tuple[torch.Tensor, str, int | None]:
    """Tokenize the evaluation text once and cut its windows (a too-short text fails here, before pruning)."""
    seqlen = resolve_seqlen(options.eval_seqlen, ctx.config, "--eval-seqlen")
    body, label = eval_text(options.eval_dataset, options.eval_text_file)
    bos = window_start(ctx.config, ctx.tokenizer)
    ids = sampling.tokenize_cached(ctx.tokenizer, body, bos)
    return windows_of(ids, seqlen, options.max_windows, label, bos), label, bos


def run(ctx: EvalContext, options: PerplexityOptions, prepared) -> dict:
    """Perplexity of ``ctx.model``: whole on the device (moved there unless accelerate placed it), or block by
    block when its placement streams it."""
    windows, label, bos = prepared if prepared is not None else prepare(ctx, options)
    share = distributed.world().share(len(windows))  # every window in one process
    windows = windows[share.start:share.stop]
    if ctx.placement is not None and ctx.placement.stream:
        ctx.events.append("streamed:evaluation")
        result = streamed_perplexity_of_windows(ctx.model, find_layout(ctx.model), windows, label, ctx.name,
                                                ctx.device, ctx.on_window, ctx.stream_batch, ctx.batch_size)
    else:
        if not getattr(ctx.model, "hf_device_map", None):
            ctx.model.to(ctx.device)
        result = perplexity_of_windows(ctx.model, windows, label, ctx.name, ctx.device, ctx.on_window)
    return replace(result, tokenizer=vocabulary_hash(ctx.tokenizer), bos=bos).to_dict()


def _check(options: PerplexityOptions, config) -> None:
    resolve_seqlen(options.eval_seqlen, config, "--eval-seqlen")


EVALUATOR = Evaluator("perplexity", "perplexity on held-out text (papers' protocol)", run,
                      metrics=lambda record: {"perplexity": record["perplexity"]}, options=PerplexityOptions,
                      switch="eval", prepare=prepare, check=_check,
                      working_bytes=lambda o, config: logits_bytes(config, resolve_seqlen(o.eval_seqlen, config)),
                      settings=("dataset", "seqlen", "windows", "tokens", "tokenizer", "bos"),
                      label="evaluating perplexity", sharded=True,
                      rows=lambda r: [(f"perplexity ({r['dataset']}, {r['windows']}×{r['seqlen']})",
                                       f"{r['perplexity']:.3f}")])
