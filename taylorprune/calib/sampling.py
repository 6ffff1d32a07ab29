"""Cut calibration windows of ``seqlen`` tokens out of a corpus.

``random`` is the papers' sampler (SparseGPT/Wanda/GBLM ``get_loaders``): a ``random.Random(seed)`` picks
one start position per sample in a long text, or, for documents (C4), a random document longer than
``seqlen`` and a random window inside it. ``sequential`` tokenizes the whole text once and takes the first
``nsamples`` non-overlapping windows, which makes runs comparable token for token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import asdict, dataclass

import torch

from taylorprune.calib.cache import cached_ids, tokenizer_fingerprint
from taylorprune.calib.text import Corpus
from taylorprune.errors import UserError

SAMPLINGS = ("random", "sequential")


@dataclass(frozen=True)
class CalibSpec:
    """Everything that determines the calibration tokens; recorded in reports and cache metadata."""

    source: str
    nsamples: int
    seqlen: int
    seed: int
    sampling: str
    text_sha256: str = ""
    bos: int | None = None  # every window starts with this token (families that always run after one: Gemma)

    @property
    def tokens(self) -> int:
        return self.nsamples * self.seqlen

    def describe(self) -> dict:
        return dict(asdict(self), tokens=self.tokens)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, exactly as ``tokenizer(text, return_tensors="pt")``; returns 1-D ids."""
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than model_max_length" is expected here
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(level)


def _too_short(corpus: Corpus, have: int, spec_n: int, seqlen: int) -> UserError:
    return UserError(
        f"calibration text {corpus.name} has {have} tokens, too short for {spec_n} windows of {seqlen} "
        f"tokens; lower --nsamples or --seqlen, or give a longer text"
    )


def _random_from_text(ids: torch.Tensor, n: int, seqlen: int, rng: random.Random, corpus: Corpus):
    if ids.numel() <= seqlen:
        raise _too_short(corpus, ids.numel(), n, seqlen)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def _random_from_docs(tokenizer, corpus: Corpus, n: int, seqlen: int, rng: random.Random):
    docs = corpus.docs or ()
    encoded: dict[int, torch.Tensor] = {}
    long_enough = None
    windows = []
    for _ in range(n):
        for _attempt in range(100 * max(1, len(docs))):
            i = rng.randint(0, len(docs) - 1)
            if i not in encoded:
                encoded[i] = tokenize(tokenizer, docs[i])
            if encoded[i].numel() > seqlen:
                break
        else:
            long_enough = long_enough or sum(tokenize(tokenizer, d).numel() > seqlen for d in docs)
            raise UserError(
                f"{corpus.name}: {long_enough} documents are longer than {seqlen} tokens; lower --seqlen "
                "or use --calib-sampling sequential"
            )
        ids = encoded[i]
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def sample(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int, sampling: str, cache: bool = False,
           bos: int | None = None):
    """Return (input_ids [nsamples, seqlen], CalibSpec); ``cache``: through the on-disk token cache
    (``calib.cache``: a hit skips tokenizing, and gives the very same ids). ``bos``: every window is that token
    followed by ``seqlen - 1`` text tokens (the text's own leading BOS dropped), as the model always runs."""
    if nsamples < 1:
        raise UserError(f"--nsamples {nsamples}: must be at least 1")
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen}: must be at least 2")
    if sampling not in SAMPLINGS:
        raise UserError(f"--calib-sampling {sampling}: choose random or sequential")
    text = corpus.joined()
    if not text.strip():
        raise UserError(f"calibration text {corpus.name} is empty")
    spec = CalibSpec(corpus.name, nsamples, seqlen, seed, sampling, hashlib.sha256(text.encode()).hexdigest(), bos)
    if not cache or corpus.ids is not None:  # ids need no tokenizing: nothing to cache
        return _with_bos(tokenizer, corpus, text, spec), spec
    documents = len(corpus.docs) if corpus.docs is not None else None  # documents are sampled differently
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "text_sha256": spec.text_sha256, "documents": documents,
           "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "sampling": sampling, "bos": bos}
    return cached_ids("calibration", key, lambda: _with_bos(tokenizer, corpus, text, spec)), spec


def _with_bos(tokenizer, corpus: Corpus, text: str, spec: CalibSpec) -> torch.Tensor:
    if spec.bos is None:
        return _windows(tokenizer, corpus, text, spec)
    shorter = dataclasses.replace(spec, seqlen=spec.seqlen - 1)
    body = _windows(_Unprefixed(tokenizer, spec.bos), corpus, text, shorter)
    return torch.cat([torch.full((len(body), 1), spec.bos, dtype=body.dtype), body], dim=1)


class _Unprefixed:
    """A tokenizer whose texts lose their leading BOS (windows get their own); otherwise the tokenizer itself."""

    def __init__(self, tokenizer, bos: int) -> None:
        self.tokenizer, self.bos = tokenizer, bos

    def __call__(self, text: str, **kwargs):
        out = self.tokenizer(text, **kwargs)
        ids = out.input_ids
        if ids.shape[-1] and int(ids[0, 0]) == self.bos:
            out["input_ids"] = ids[:, 1:]
        return out


def _windows(tokenizer, corpus: Corpus, text: str, spec: CalibSpec) -> torch.Tensor:
    rng = random.Random(spec.seed)
    nsamples, seqlen = spec.nsamples, spec.seqlen
    if spec.sampling == "random" and corpus.docs is not None:
        return _random_from_docs(tokenizer, corpus, nsamples, seqlen, rng)
    ids = stream(tokenizer, corpus, text)
    if spec.sampling == "random":
        return _random_from_text(ids, nsamples, seqlen, rng, corpus)
    if ids.numel() < nsamples * seqlen:
        raise _too_short(corpus, ids.numel(), nsamples, seqlen)
    return ids[: nsamples * seqlen].view(nsamples, seqlen).clone()


def stream(tokenizer, corpus: Corpus, text: str) -> torch.Tensor:
    """The corpus as one 1-D token stream: its own ids where it has them (generated text; a leading BOS dropped
    when windows get their own), else the text tokenized once."""
    if corpus.ids is None:
        return tokenize(tokenizer, text)
    ids = corpus.ids.flatten()
    bos = tokenizer.bos if isinstance(tokenizer, _Unprefixed) else None
    return ids[1:] if bos is not None and ids.numel() and int(ids[0]) == bos else ids


def corpus_ids(tokenizer, corpus: Corpus, bos: int | None = None) -> torch.Tensor:
    """The corpus's token stream for sequential windows (recovery): its own ids, or its text through the token
    cache (``tokenize_cached``); ``bos``: the stream loses its leading BOS (each window gets one)."""
    if corpus.ids is None:
        return tokenize_cached(tokenizer, corpus.joined(), bos)
    return stream(tokenizer if bos is None else _Unprefixed(tokenizer, bos), corpus, "")


def tokenize_cached(tokenizer, text: str, bos: int | None = None) -> torch.Tensor:
    """``tokenize`` through the on-disk token cache (evaluation texts: the same text, tokenizer, ids); ``bos``:
    the text's own leading BOS is dropped (its windows get one each)."""
    key = {"tokenizer": tokenizer_fingerprint(tokenizer), "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
           **({"unprefixed": bos} if bos is not None else {})}
    chosen = tokenizer if bos is None else _Unprefixed(tokenizer, bos)
    return cached_ids("text", key, lambda: tokenize(chosen, text))
