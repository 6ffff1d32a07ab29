"""Teacher-written calibration text (``--calib generated``): sequences sampled from the dense model itself.

Why: calibration and distillation only need inputs on which the dense model behaves as it does in use. Text the
model writes is by construction on its own distribution (what data-free compression, e.g. LLM-QAT, calibrates
on), needs no data set (offline, no licence question, no domain picked for the user), and for a chat or code
model is closer to what it will serve than WikiText. Its weakness is that it only holds what the model already
says: mixing it with real text (``calib.mix``) keeps both.

Each sequence starts from BOS (the first token is then drawn from the model's own unconditional distribution) or
from one of ``--gen-prompts`` (in turn), and is sampled to ``--gen-length`` tokens at ``--gen-temperature`` with
nucleus ``--gen-top-p``; an end-of-text token is kept like any other and the model writes on after it (as after
a document boundary in packed pre-training), so every sequence has the same length. Batches of ``--gen-batch``
sequences run with a KV cache made fresh for the batch (one batch's keys never leak into the next) and a
generator seeded from ``--seed`` and the batch's index, so the ids depend on model, settings and seed only, not
on the number of processes: under torchrun each rank samples its share of the batches and the rows are summed
into place (every other rank's rows are zeros). The ids are cached on disk (``calib.gen_cache``).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from taylorprune import distributed
from taylorprune.calib import gen_cache
from taylorprune.calib.cache import tokenizer_fingerprint
from taylorprune.calib.text import GENERATED, Corpus
from taylorprune.errors import UserError
from taylorprune.modeling.fingerprint import model_fingerprint
from taylorprune.modeling.loading import resolve_seqlen
from taylorprune.options import Options, option


@dataclass(frozen=True)
class GenerateOptions(Options):
    gen_samples: int | None = option(None, "Generated calibration: sequences to sample (default: --nsamples).",
                                     minimum=1)
    gen_length: int | None = option(None, "Generated calibration: tokens per sequence, its start included "
                                    "(default: the calibration --seqlen; at most the model's max positions).",
                                    minimum=2)
    gen_temperature: float = option(1.0, "Generated calibration: sampling temperature.", above=0)
    gen_top_p: float = option(1.0, "Generated calibration: nucleus sampling mass, in (0, 1] (1: the whole "
                              "distribution).", above=0, maximum=1)
    gen_prompts: str | None = option(None, "Generated calibration: file of short prompts, one a line, each "
                                     "sequence starting from one in turn (default: BOS alone, the first token "
                                     "drawn from the model's unconditional distribution).")
    gen_batch: int = option(16, "Generated calibration: sequences sampled together (part of the cache identity: "
                            "batching changes the random draws).", minimum=1)
    gen_cache: str | None = option(None, "Generated calibration: file of the sampled token ids, reused when model, "
                                   "settings and seed match, refused when not, written when absent (default: the "
                                   "token cache folder).", identity=False)

    def check(self) -> None:
        if self.gen_prompts and not Path(self.gen_prompts).expanduser().is_file():
            raise UserError(f"--gen-prompts {self.gen_prompts}: file not found")


@dataclass(frozen=True)
class Sampler:
    """Everything that decides the sampled ids (with the model's weights): the cache identity."""

    sequences: int
    length: int
    temperature: float
    top_p: float
    batch: int
    seed: int
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None

    def identity(self) -> dict:
        prompts = hashlib.sha256("\n".join(self.prompts).encode()).hexdigest() if self.prompts else None
        return {"sequences": self.sequences, "length": self.length, "temperature": self.temperature,
                "top_p": self.top_p, "batch": self.batch, "seed": self.seed, "prompts_sha256": prompts}


def sampler(options: GenerateOptions, seed: int, sequences: int, length: int | None, config) -> Sampler:
    """The sampler of ``options``: ``sequences`` and ``length`` are the defaults (the calibration's); a length
    beyond the model's positions is a one-line error, before any weight is loaded."""
    length = resolve_seqlen(options.gen_length or length, config, "--gen-length")
    prompts = read_prompts(options.gen_prompts) if options.gen_prompts else ()
    return Sampler(options.gen_samples or sequences, length, options.gen_temperature, options.gen_top_p,
                   options.gen_batch, seed, prompts, options.gen_prompts)


def read_prompts(path: str) -> tuple[str, ...]:
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        raise UserError(f"--gen-prompts {path}: not a readable UTF-8 text file") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise UserError(f"--gen-prompts {path}: no prompt in it (one a line)")
    return prompts


def starts(tokenizer, s: Sampler) -> list[list[int]]:
    """The first tokens of each sequence: BOS, or BOS and a prompt's tokens (in turn over the prompts)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if not s.prompts:
        if bos is None:
            raise UserError("the model's tokenizer has no BOS token to start generating from; give --gen-prompts")
        return [[bos]] * s.sequences
    encoded = []
    for prompt in s.prompts:
        ids = tokenizer(prompt).input_ids
        ids = ids if bos is None or (ids and ids[0] == bos) else [bos, *ids]
        if len(ids) >= s.length:
            raise UserError(f"--gen-prompts: the prompt {prompt[:40]!r} has {len(ids)} tokens, not shorter than "
                            f"--gen-length {s.length}")
        encoded.append(ids)
    return [encoded[i % len(encoded)] for i in range(s.sequences)]


def nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling probabilities at ``temperature``, keeping the fewest most likely tokens whose mass reaches
    ``top_p`` (the most likely token always stays)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    ranked, order = probs.sort(dim=-1, descending=True)
    ranked = ranked.masked_fill(ranked.cumsum(-1) - ranked >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, ranked)


def _cache_argument(model) -> str:
    """The forward's KV-cache argument: ``cache`` (transformers 5.25 on), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@contextlib.contextmanager
def _threads(model, batch: int) -> Iterator[None]:
    """On a CPU, decode with one thread unless more are clearly faster: a decode step is a few tiny matmuls where
    threads mostly wait for each other (stories260K, 16 sequences, 2 shared cores: 2.3 ms a step with one thread,
    8 to 100 ms with two). An explicit ``OMP_NUM_THREADS`` is kept."""
    device, many = next(model.parameters()).device, torch.get_num_threads()
    if device.type != "cpu" or many == 1 or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    ids = torch.ones(batch, 1, dtype=torch.long)

    def pace(threads: int) -> float:
        torch.set_num_threads(threads)
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)  # warm-up
            t0 = time.perf_counter()
            for _ in range(3):
                model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t0

    chosen = many if pace(many) * 1.25 < pace(1) else 1
    torch.set_num_threads(chosen)
    try:
        yield
    finally:
        torch.set_num_threads(many)


@torch.no_grad()
def sample_batch(model, first: list[list[int]], s: Sampler, generator: torch.Generator,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """[len(first), s.length] ids: each row its start tokens then sampled ones; a fresh KV cache for this batch.
    Starts of different lengths are left-padded (masked, positions counted from each row's first real token)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width, shortest = max(map(len, first)), min(map(len, first))
    ids = torch.zeros(len(first), width, dtype=torch.long)
    mask = torch.zeros(len(first), width, dtype=torch.long)
    for row, tokens in enumerate(first):
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, width - len(tokens):] = 1
    ids, mask = ids.to(device), mask.to(device)
    padded = width != shortest
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = {_cache_argument(model): DynamicCache()}  # never shared with another batch or call
    out = model(input_ids=ids, attention_mask=mask if padded else None, position_ids=positions, use_cache=True,
                logits_to_keep=1, **cache)
    steps = s.length - shortest
    made = [ids]
    for step in range(steps):
        token = torch.multinomial(nucleus(out.logits[:, -1], s.temperature, s.top_p), 1, generator=generator)
        made.append(token)
        if on_step is not None:
            on_step(len(first))
        if step + 1 == steps:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token, attention_mask=mask if padded else None, position_ids=positions,
                    use_cache=True, logits_to_keep=1, **cache)
    full = torch.cat(made, dim=1).cpu()
    return torch.stack([full[row, width - len(tokens):][: s.length] for row, tokens in enumerate(first)])


def sample_ids(model, tokenizer, s: Sampler, on_tokens: Callable[[int], None] | None = None) -> torch.Tensor:
    """[s.sequences, s.length] ids; data-parallel: each rank samples its share of the batches, gathered in order."""
    first = starts(tokenizer, s)
    batches = [range(k, min(k + s.batch, s.sequences)) for k in range(0, s.sequences, s.batch)]
    out = torch.zeros(s.sequences, s.length, dtype=torch.long)
    device = next(model.parameters()).device
    done = 0

    def step(count: int) -> None:
        nonlocal done
        done += count
        if on_tokens is not None:
            on_tokens(done)

    was_training = model.training
    model.eval()
    try:
        with _threads(model, s.batch):
            for k in distributed.world().share(len(batches)):
                rows = batches[k]
                seed = (s.seed * 1_000_003 + 7919 * (k + 1)) % 2**63
                generator = torch.Generator(device=device).manual_seed(seed)
                out[rows.start:rows.stop] = sample_batch(model, first[rows.start:rows.stop], s, generator, step)
    finally:
        model.train(was_training)
    return distributed.all_sum(out)


def sampled_tokens(tokenizer, s: Sampler) -> int:
    """Tokens the model samples (its starts excluded): what tokens/s counts."""
    return sum(s.length - len(t) for t in starts(tokenizer, s))


def decode(tokenizer, ids: torch.Tensor) -> tuple[str, ...]:
    """Each sequence as text (special tokens dropped), as ``taylorprune generate`` writes it."""
    return tuple(tokenizer.decode(row.tolist(), skip_special_tokens=True) for row in ids)


def generated_corpus(model, tokenizer, s: Sampler, cache_file: str | None = None, model_name: str = "",
                     on_tokens: Callable[[int], None] | None = None) -> tuple[Corpus, dict]:
    """(the generated corpus, its record): the ids from the cache when model (weights fingerprint), tokenizer,
    settings and seed match, else sampled now and cached. ``cache_file``: the user's own cache file, refused with
    one line when it was made otherwise (another model, other settings)."""
    key = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer), **s.identity()}
    path = Path(cache_file).expanduser() if cache_file else gen_cache.default_path(key)
    found = None
    if distributed.world().writer:  # rank 0 reads; a refusal or a hit is every rank's
        try:
            found = gen_cache.load(path, key, explicit=cache_file is not None) if path else None
        except UserError as exc:
            found = exc
    found = distributed.share_object(found, 0)
    if isinstance(found, UserError):
        raise found
    if found is not None:
        ids, record = found
        record = {**record, "reused": True}
    else:
        t0 = time.perf_counter()
        ids = sample_ids(model, tokenizer, s, on_tokens)
        seconds = time.perf_counter() - t0
        sampled = sampled_tokens(tokenizer, s)
        record = {"fingerprint": key["model"], **s.identity(), "prompts": s.prompts_file, "tokens": ids.numel(),
                  "sampled_tokens": sampled, "seconds": round(seconds, 3),
                  "tokens_per_s": round(sampled / max(seconds, 1e-9), 1), "world_size": distributed.world().size,
                  "device": str(next(model.parameters()).device), "reused": False}
        if path is not None and distributed.world().writer:
            gen_cache.save(path, ids, key, record, explicit=cache_file is not None)
    record = {**record, "model": model_name, "cache": None if path is None else str(path)}
    texts = decode(tokenizer, ids)
    return Corpus(GENERATED, text="\n\n".join(texts), ids=ids), record
