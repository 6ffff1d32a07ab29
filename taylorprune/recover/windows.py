"""The recovery windows: sequential, non-overlapping windows of the calibration source, the last ones held out.

By default (``--recover-windows`` none) recovery takes every window the source holds, but no more than training
can read (steps × batch) plus the held-out ones: the measured best (docs/BENCHMARKS.md) is all 534 windows of
WikiText-2 validation at 512 tokens. A count the source cannot give (``--recover-windows`` or
``--recover-heldout`` beyond it) is a one-line error naming the limit, raised while the text is tokenized, right
after loading and before any pruning or training; it is never clamped silently, so the report's windows are the
ones asked for.
"""

from __future__ import annotations

import torch

from taylorprune.calib import sampling
from taylorprune.calib.text import Corpus
from taylorprune.errors import UserError


def window_count(holds: int, options, seqlen: int, source: str) -> int:
    """Windows recovery uses (training + held out) when the source ``holds`` that many of ``seqlen`` tokens."""
    asked, held = options.recover_windows, options.recover_heldout
    where = f"the calibration text {source} holds {holds} windows of {seqlen} tokens"
    if asked is not None and asked > holds:
        raise UserError(f"--recover-windows {asked}: {where}; lower --recover-windows or --recover-seqlen, or give "
                        "a longer text")
    if held >= holds:
        raise UserError(f"--recover-heldout {held}: {where}, and at least one must train; hold out at most "
                        f"{max(holds - 1, 0)}")
    if asked is not None and held >= asked:
        raise UserError(f"--recover-heldout {held}: at least one of the --recover-windows {asked} must train; hold "
                        f"out at most {asked - 1}")
    if asked is not None:
        return asked
    return min(holds, options.recover_steps * options.recover_batch + held)


def recovery_windows(tokenizer, corpus: Corpus, options, seqlen: int, bos: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, held-out windows) of ``corpus``: the same ids ``sampling.sample`` cuts sequentially
    (``bos``: each window is that token and ``seqlen - 1`` text tokens), the text tokenized once (token cache)."""
    text = corpus.joined()
    if not text.strip():
        raise UserError(f"recovery: calibration text {corpus.name} is empty")
    width = seqlen - (bos is not None)
    ids = sampling.tokenize_cached(tokenizer, text, bos)
    count = window_count(ids.numel() // width, options, seqlen, corpus.name)
    windows = ids[: count * width].view(count, width).clone()
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=windows.dtype), windows], dim=1)
    held = options.recover_heldout
    return windows[:-held], windows[-held:]
