"""llama.cpp as a measuring runtime: ``taylorprune eval`` and ``speed`` with ``--runtime llamacpp`` run a GGUF file in
llama.cpp through llama-cpp-python (the optional extra ``pip install "taylorprune[llamacpp]"``, which builds
llama.cpp from source), so what is measured is what llama.cpp makes of the file (its tokenizer, its kernels, its
reading of every tensor and metadata key), not transformers' dequantized copy.

Perplexity follows ``llama-perplexity``'s default protocol (llama.cpp ``tools/perplexity``, no ``--ppl-stride``):

- the whole text is tokenized once by the file's own tokenizer in llama.cpp, with the vocabulary's BOS first when it
  adds one (special tokens not parsed);
- it is cut into non-overlapping chunks of ``n_ctx`` = ``--seqlen`` tokens (the remainder dropped; fewer than
  2·n_ctx tokens is refused, as llama-perplexity refuses it); ``--max-windows`` is its ``--chunks``;
- each chunk runs from an empty KV cache, its first token replaced by BOS when the vocabulary adds one, and only its
  second half is scored: the logits at positions ``n_ctx/2 … n_ctx-2`` predict the token after each, so every
  scored token has at least n_ctx/2 tokens of context (n_ctx − n_ctx/2 − 1 tokens a chunk);
- PPL = exp(mean NLL over every scored token), the NLL a log-softmax of llama.cpp's fp32 logits (in float64
  here), with llama-perplexity's ± (the standard error of the mean NLL, times PPL).

That is not the papers' protocol of ``--runtime transformers`` (every shifted token of a window scored), so the
record says ``runtime`` and ``protocol``, and its ``tokenizer`` is the file's vocabulary hash (``gguf:…``): ``check``
never takes the two for the same setting.

Speed: ``evaluate.llamacpp_speed``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from taylorprune.errors import UserError
from taylorprune.evaluate.perplexity import eval_text
from taylorprune.modeling.loading import resolve_seqlen
from taylorprune.options import Options, option

RUNTIMES = ("transformers", "llamacpp")
INSTALL = 'pip install "taylorprune[llamacpp]"'
PROTOCOL = "llama-perplexity: non-overlapping n_ctx chunks, BOS first, second half of each chunk scored"


@dataclass(frozen=True)
class RuntimeOptions(Options):
    runtime: str = option("transformers", "Runtime that runs --model: transformers (PyTorch, the papers' perplexity "
                          "protocol), or llamacpp: the .gguf file in llama.cpp through llama-cpp-python "
                          f"({INSTALL}), perplexity by llama-perplexity's protocol (second half of each window "
                          "scored).", choices=RUNTIMES)
    llamacpp_threads: int | None = option(None, "llama.cpp: CPU threads for prefill and decode (default: PyTorch's "
                                          "thread count).", minimum=1, identity=False)
    llamacpp_gpu_layers: int = option(0, "llama.cpp: layers offloaded to the GPU (-1: all; needs a GPU build of "
                                      "llama-cpp-python).", minimum=-1, identity=False)

    def check(self) -> None:
        if self.runtime != "llamacpp":
            for name, default in (("llamacpp_threads", None), ("llamacpp_gpu_layers", 0)):
                if getattr(self, name) != default:
                    raise UserError(f"--{name.replace('_', '-')} applies to --runtime llamacpp")
            return
        library()

    @property
    def threads(self) -> int:
        import torch

        return self.llamacpp_threads or torch.get_num_threads()


def library():
    """The ``llama_cpp`` module, or the one-line error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(f"--runtime llamacpp needs llama-cpp-python, which is not installed: {INSTALL} (it builds "
                        "llama.cpp from source)") from None
    return llama_cpp


def refuse(flags: dict[str, object]) -> None:
    """One line for the first transformers-only flag given with --runtime llamacpp (``flags``: flag -> set?)."""
    for flag, given in flags.items():
        if given:
            raise UserError(f"{flag} applies to --runtime transformers; llama.cpp runs the file's own tensor types "
                            "(--llamacpp-gpu-layers offloads layers to a GPU)")


# ------------------------------------------------------------------------------------------ the file
def gguf_file(path: str, flag: str = "--model") -> Path:
    file = Path(path).expanduser()
    if file.suffix != ".gguf":
        raise UserError(f"{flag} {path}: --runtime llamacpp runs a .gguf file (write one with --format gguf or "
                        "taylorprune export --format gguf)")
    if not file.is_file():
        raise UserError(f"{flag} {path}: GGUF file not found")
    return file


def _field(reader, key: str):
    """A metadata value of a GGUF (strings decoded; arrays as lists); None when absent."""
    found = reader.fields.get(key)
    if found is None:
        return None
    values = [found.parts[i] for i in found.data]
    values = [bytes(v).decode("utf-8", "replace") if v.dtype == np.uint8 else v.item() for v in values]
    return values if len(values) != 1 or key.endswith(".tokens") else values[0]


@dataclass(frozen=True)
class FileInfo:
    context_length: int | None
    vocabulary: str  # hash of the file's token list: "gguf:…"


def file_info(file: Path, flag: str = "--model") -> FileInfo:
    """What the file's metadata says before llama.cpp loads it (cheap: the header only is parsed)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(file))
    except Exception as exc:  # the reader raises its own errors on a damaged or truncated file
        raise UserError(f"{flag} {file}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    context = _field(reader, f"{arch}.context_length") if arch else None
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    digest = hashlib.sha256(json.dumps(tokens, ensure_ascii=False).encode()).hexdigest()[:16]
    return FileInfo(int(context) if context else None, f"gguf:{digest}")


def _reason(text: str, exc: BaseException) -> str:
    """The lines of llama.cpp's log that say why a load failed (else the Python exception)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for word in ("error", "failed"):
        found = list(dict.fromkeys(line for line in lines if word in line.lower()))
        if found:
            return "; ".join(found[:2])
    return str(exc).strip() or type(exc).__name__


def load(file: Path, n_ctx: int, runtime: RuntimeOptions, logits_all: bool, flag: str = "--model", **params):
    """A ``llama_cpp.Llama`` of ``file`` with an ``n_ctx`` context (one decode call per ``n_ctx`` tokens) and
    llama.cpp's defaults otherwise (an F16 KV cache; ``params`` go to ``Llama``); a file llama.cpp refuses is a
    one-line error with llama.cpp's own reason (its log, captured while loading)."""
    lib = library()
    log: list[str] = []

    @lib.llama_log_callback
    def collect(level, text, user_data):  # llama.cpp's log while loading, otherwise thrown away by verbose=False
        log.append(text.decode("utf-8", "replace") if text else "")

    lib.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        return lib.Llama(model_path=str(file), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all,
                         n_threads=runtime.threads, n_threads_batch=runtime.threads,
                         n_gpu_layers=runtime.llamacpp_gpu_layers, verbose=False, **params)
    except (ValueError, RuntimeError, OSError) as exc:
        raise UserError(f"{flag} {file}: llama.cpp cannot load it ({_reason(''.join(log), exc)})") from None
    finally:
        _restore_log(lib)


def _restore_log(lib) -> None:
    try:
        from llama_cpp import _logger

        lib.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    except (ImportError, AttributeError):  # another layout of llama-cpp-python: llama.cpp's default (stderr)
        lib.llama_log_set(None, ctypes.c_void_p(0))


def _synchronize(llm) -> None:
    sync = getattr(library(), "llama_synchronize", None)
    if sync is not None:
        sync(llm.ctx)


def last_logits(llm) -> np.ndarray:
    """The logits of the last token the last ``eval`` decoded (fp32, [n_vocab])."""
    return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))


def logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """[len(tokens), n_vocab] fp32 logits of ``tokens`` decoded from an empty KV cache (needs ``logits_all``)."""
    llm.reset()
    llm.eval(list(tokens))
    return llm.scores[: len(tokens)]


def _positions(info: FileInfo, wanted: int | None, flag: str) -> int:

    return resolve_seqlen(wanted, SimpleNamespace(max_position_embeddings=info.context_length), flag)


# ------------------------------------------------------------------------------------------ perplexity
def second_half_nll(chunk_logits: np.ndarray, chunk: Sequence[int]) -> np.ndarray:
    """llama-perplexity's per-token NLL of one chunk: the logits at positions n/2 … n-2 scoring the next token."""
    n = len(chunk)
    first = n // 2
    rows = np.asarray(chunk_logits[first:n - 1], dtype=np.float64)
    targets = np.asarray(chunk[first + 1:n], dtype=np.int64)
    top = rows.max(axis=1)
    log_sum = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
    return log_sum - rows[np.arange(len(targets)), targets]


def chunk_perplexity(tokens: Sequence[int], n_ctx: int, bos: int | None, logits_of: Callable[[list[int]], np.ndarray],
                     max_chunks: int | None = None, name: str = "text",
                     on_window: Callable[[int, int], None] | None = None) -> dict:
    """llama-perplexity's protocol over ``tokens`` (already tokenized with BOS first when ``bos`` is not None);
    ``logits_of(chunk)`` decodes one chunk from an empty cache."""
    if n_ctx < 3:
        raise UserError(f"--seqlen {n_ctx}: llama-perplexity scores the second half of each window; use at least 3")
    if len(tokens) < 2 * n_ctx:
        raise UserError(f"evaluation text {name} has {len(tokens)} tokens in llama.cpp; llama-perplexity needs at "
                        f"least {2 * n_ctx} (two windows of {n_ctx})")
    chunks = len(tokens) // n_ctx if max_chunks is None else min(max_chunks, len(tokens) // n_ctx)
    total, squares, count = 0.0, 0.0, 0
    for i in range(chunks):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        nll = second_half_nll(logits_of(chunk), chunk)
        total, squares, count = total + float(nll.sum()), squares + float((nll ** 2).sum()), count + len(nll)
        if on_window:
            on_window(i + 1, chunks)
    mean = total / count
    ppl = math.exp(mean) if math.isfinite(mean) and mean < 709.0 else float("inf")
    variance = squares / count - mean * mean
    error = math.sqrt(variance / (count - 1)) * ppl if variance > 0 and count > 1 and math.isfinite(ppl) else None
    return {"perplexity": ppl, "perplexity_error": error, "nll": mean, "windows": chunks, "seqlen": n_ctx,
            "tokens": chunks * n_ctx, "scored_tokens": count, "bos": bos}


def perplexity(model: str, options, runtime: RuntimeOptions,
               on_window: Callable[[int, int], None] | None = None) -> dict:
    """The ``perplexity`` record of a GGUF file run in llama.cpp (``options``: the perplexity evaluator's own:
    data set or text file, ``eval_seqlen`` as n_ctx, ``max_windows`` as llama-perplexity's ``--chunks``)."""

    file = gguf_file(model)
    info = file_info(file)
    n_ctx = _positions(info, options.eval_seqlen, "--seqlen")
    body, label = eval_text(options.eval_dataset, options.eval_text_file)
    llm = load(file, n_ctx, runtime, logits_all=True)
    try:
        tokens = llm.tokenize(body.encode("utf-8"), add_bos=True, special=False)
        start = llm.tokenize(b"", add_bos=True, special=False)  # [BOS] when the vocabulary adds one, else []
        bos = start[0] if start else None
        t0 = time.perf_counter()
        record = chunk_perplexity(tokens, n_ctx, bos, lambda chunk: logits(llm, chunk), options.max_windows, label,
                                  on_window)
        seconds = time.perf_counter() - t0
    finally:
        llm.close()
    return {**record, "dataset": label, "model": model, "tokenizer": info.vocabulary, "runtime": "llamacpp",
            "protocol": PROTOCOL, "text_tokens": len(tokens), "seconds": seconds, "threads": runtime.threads,
            "gpu_layers": runtime.llamacpp_gpu_layers, "llama_cpp_python": _version()}


def _version() -> str:
    return str(getattr(library(), "__version__", "unknown"))


def rows(record: dict) -> list[tuple[str, str]]:
    """The summary line of a llama.cpp perplexity record."""
    error = f" ± {record['perplexity_error']:.3f}" if record.get("perplexity_error") is not None else ""
    return [(f"perplexity in llama.cpp ({record['dataset']}, {record['windows']}×{record['seqlen']}, second half of "
             f"each window scored)", f"{record['perplexity']:.3f}{error}")]
