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

from taylorprune.calib import mix, sampling
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
    ids = sampling.corpus_ids(tokenizer, corpus, bos)
    count = window_count(ids.numel() // width, options, seqlen, corpus.name)
    windows = ids[: count * width].view(count, width).clone()
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=windows.dtype), windows], dim=1)
    held = options.recover_heldout
    return windows[:-held], windows[-held:]


def mixed_windows(tokenizer, corpora: list[tuple[mix.Entry, Corpus]], options, seqlen: int, bos: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """(training windows, held-out windows, one record per source) of a mix: the held-out windows are split over
    the sources by weight (at least one each, so every source is measured), and so are the training windows
    (``--recover-windows`` minus the held-out ones, by default steps x batch, each source capped at what it holds);
    each source's windows are its first sequential ones, its last held out, as for one source."""
    entries = tuple(e for e, _ in corpora)
    width = seqlen - (bos is not None)
    held = mix.counts_for(options.recover_heldout, entries, "--recover-heldout")
    total = options.recover_windows or options.recover_steps * options.recover_batch + options.recover_heldout
    if total <= options.recover_heldout:
        raise UserError(f"--recover-heldout {options.recover_heldout}: at least one of the --recover-windows "
                        f"{total} must train; hold out at most {total - 1}")
    train = mix.proportional(total - options.recover_heldout, [e.weight for e in entries])
    trains, helds, records = [], [], []
    for (entry, corpus), n_held, n_train in zip(corpora, held, train, strict=True):
        ids = sampling.corpus_ids(tokenizer, corpus, bos)
        holds = ids.numel() // width
        where = f"{entry.source} holds {holds} windows of {seqlen} tokens"
        if holds <= n_held:
            raise UserError(f"--recover-heldout {options.recover_heldout}: {where}, {n_held} of them held out and at "
                            "least one to train; give it more text or a larger weight")
        if options.recover_windows is not None and n_train + n_held > holds:
            raise UserError(f"--recover-windows {options.recover_windows}: {where}, {n_train + n_held} asked of it; "
                            "lower --recover-windows or --recover-seqlen, or give a longer text")
        n_train = min(n_train, holds - n_held)
        windows = ids[: (n_train + n_held) * width].view(n_train + n_held, width).clone()
        if bos is not None:
            windows = torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)
        trains.append(windows[:n_train])
        helds.append(windows[n_train:])
        records.append({"source": entry.source, "weight": entry.weight, "train": n_train, "heldout": n_held})
    return torch.cat(trains), torch.cat(helds), records
