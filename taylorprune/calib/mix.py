"""Mixed calibration sources (``--calib-mix wikitext2-valid:0.5,generated:0.5``): windows from several texts in
given proportions.

Why: one source is one domain. Text the model writes (``generated``) holds what the model does but only that;
real text holds a domain but maybe not the model's. A mix keeps the statistics (and recovery's training signal)
from leaning on one of them, and the report says which windows came from where.

Each entry is a named source (``text.CALIB_SOURCES``), or a .txt / .jsonl file, with a weight above 0 (weights are
relative: 1,1 is 0.5,0.5). The window counts are the weights' exact shares of the total (largest remainder, ties
to the earlier entry; every source gets at least one window or the mix is refused), each source is sampled as it
would be alone, with its own seed (``seed + its index``), and the windows are shuffled together by a generator
seeded with ``seed``: the same options give the same windows in the same order.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from taylorprune.calib import sampling
from taylorprune.calib.text import CALIB_SOURCES, Corpus
from taylorprune.errors import UserError


@dataclass(frozen=True)
class Entry:
    """One source of a mix and its relative weight."""

    source: str
    weight: float

    @property
    def named(self) -> bool:
        return self.source in CALIB_SOURCES


def parse(text: str) -> tuple[Entry, ...]:
    """``SOURCE:WEIGHT,...`` checked: known sources or existing files, weights above 0, no source twice."""
    entries: list[Entry] = []
    for item in (part.strip() for part in text.split(",")):
        source, sep, raw = item.rpartition(":")
        source = source.strip()
        if not sep or not source:
            raise UserError(f"--calib-mix {item}: expected SOURCE:WEIGHT, e.g. wikitext2-valid:0.5,generated:0.5")
        try:
            weight = float(raw)
        except ValueError:
            raise UserError(f"--calib-mix {item}: the weight {raw!r} is not a number") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UserError(f"--calib-mix {item}: the weight must be above 0")
        if source not in CALIB_SOURCES and not Path(source).expanduser().is_file():
            raise UserError(f"--calib-mix {item}: unknown source {source!r}; name one of {', '.join(CALIB_SOURCES)} "
                            "or an existing .txt/.jsonl file")
        if any(e.source == source for e in entries):
            raise UserError(f"--calib-mix: {source} given twice")
        entries.append(Entry(source, weight))
    return tuple(entries)


def describe(entries: tuple[Entry, ...]) -> str:
    """The mix as one source name (recorded as the calibration's ``source``, and in cache identities)."""
    return ",".join(f"{e.source}:{e.weight:g}" for e in entries)


def proportional(total: int, weights: list[float]) -> list[int]:
    """``total`` split in proportion to ``weights``, exactly (largest remainder; ties to the earlier entry)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[: total - sum(counts)]:
        counts[k] += 1
    return counts


def counts_for(total: int, entries: tuple[Entry, ...], what: str) -> list[int]:
    """Each source's share of ``total`` windows; a source left without one is a one-line error (``what``: the
    option that sets the total)."""
    counts = proportional(total, [e.weight for e in entries])
    for entry, count in zip(entries, counts, strict=True):
        if count == 0:
            raise UserError(f"{what} {total}: too few windows for --calib-mix {describe(entries)} ({entry.source} "
                            "would get none); raise it or the source's weight")
    return counts


def sample(tokenizer, corpora: list[tuple[Entry, Corpus]], nsamples: int, seqlen: int, seed: int, how: str,
           cache: bool = False, bos: int | None = None) -> tuple[torch.Tensor, sampling.CalibSpec, dict]:
    """(windows [nsamples, seqlen], CalibSpec of the mix, record): every source's share sampled as it would be
    alone, then shuffled together; the record lists the sources and the source of every window."""
    entries = tuple(e for e, _ in corpora)
    counts = counts_for(nsamples, entries, "--nsamples")
    parts, shas, sources = [], [], []
    for k, ((entry, corpus), count) in enumerate(zip(corpora, counts, strict=True)):
        ids, spec = sampling.sample(tokenizer, corpus, count, seqlen, seed + k, how, cache=cache, bos=bos)
        parts.append(ids)
        shas.append(spec.text_sha256)
        sources.append({"source": entry.source, "weight": entry.weight, "windows": count, "seed": seed + k,
                        "text_sha256": spec.text_sha256})
    order = torch.randperm(nsamples, generator=torch.Generator().manual_seed(seed))
    owner = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])[order]
    digest = hashlib.sha256("|".join(f"{e.source}:{e.weight!r}:{s}" for e, s in zip(entries, shas, strict=True))
                            .encode()).hexdigest()
    spec = sampling.CalibSpec(describe(entries), nsamples, seqlen, seed, how, digest, bos)
    record = {"sources": sources, "window_sources": [entries[int(k)].source for k in owner]}
    return torch.cat(parts)[order], spec, record
