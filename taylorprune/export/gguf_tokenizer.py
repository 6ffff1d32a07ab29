"""Tokenizer metadata of a GGUF we write, as llama.cpp's HF→GGUF converter writes it: SentencePiece vocabularies as
``llama`` (tokens, scores, token types from the ``.model`` file when there is one), byte-level BPE ones as ``gpt2``
with their merges and a pre-tokenizer name (``gpt-2``, or ``smollm`` for digits split first; another pre-tokenizer is
written as ``default``, with a warning). SmolLM2's BPE vocabulary written as ``llama`` loads, then crashes llama.cpp
at the first tokenization (``llama_vocab::byte_to_token``)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import gguf

# SentencePiece piece kinds -> GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores, token types: from the SentencePiece model file when the tokenizer has one (as the converter
    does), else from the HF vocabulary (scores −id, types from the special/added tokens and ``<0xXX>`` pieces).
    Padded to ``vocab_size`` with ``[PAD{i}]`` unused tokens, as the converter does."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and Path(vocab_file).is_file() and str(vocab_file).endswith(".model"):
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(vocab_file))
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i))
            scores.append(float(sp.get_score(i)))
            types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                         UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
        for piece, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):  # added tokens
            if i >= len(tokens) and i < vocab_size:
                tokens += [f"[PAD{j}]" for j in range(len(tokens), i)]
                scores += [-1000.0] * (i - len(scores))
                types += [UNUSED] * (i - len(types))
                tokens.append(piece), scores.append(-1000.0), types.append(USER_DEFINED)
    else:
        by_id = {i: piece for piece, i in tokenizer.get_vocab().items()}
        special = set(getattr(tokenizer, "all_special_ids", []))
        added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        tokens, scores, types = [], [], []
        for i in range(max(by_id) + 1 if by_id else 0):
            piece = by_id.get(i, f"[PAD{i}]")
            tokens.append(piece)
            scores.append(-float(i))
            types.append(UNKNOWN if i == tokenizer.unk_token_id else CONTROL if i in special else
                         USER_DEFINED if i in added else UNUSED if i not in by_id else
                         BYTE if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else NORMAL)
    n = len(tokens)
    tokens += [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores += [-1000.0] * (vocab_size - n)
    types += [UNUSED] * (vocab_size - n)
    return tokens, scores, types


# llama.cpp's pre-tokenizer names for the HF pre-tokenizer sequences of byte-level BPE vocabularies
PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}


def byte_level_bpe(tokenizer) -> tuple[str, list[str]] | None:
    """(llama.cpp pre-tokenizer name, merges) of a byte-level BPE tokenizer (GPT-2 style: llama.cpp's ``gpt2``
    vocabulary); None for a SentencePiece-style one (``llama``). Written as SentencePiece, a byte-level vocabulary
    loads in llama.cpp but its first tokenization aborts the process (``llama_vocab::byte_to_token``: no
    ``<0xXX>`` byte pieces to fall back on)."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or (vocab_file and str(vocab_file).endswith(".model") and Path(vocab_file).is_file()):
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or not model.get("merges"):
        return None
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = tuple(step.get("type") for step in steps)
    if "ByteLevel" not in kinds:
        return None
    name = PRE_TOKENIZERS.get(kinds)
    if name is None:
        name = "default"
        warnings.warn(f"byte-level BPE pre-tokenizer {'+'.join(map(str, kinds))} has no llama.cpp name here; written "
                      "as 'default' (llama.cpp may split text differently from transformers)", stacklevel=3)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return name, merges


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    tokens, scores, types = tokenizer_vocab(tokenizer, vocab_size)
    bpe = byte_level_bpe(tokenizer)
    writer.add_tokenizer_model("gpt2" if bpe else "llama")
    writer.add_tokenizer_pre(bpe[0] if bpe else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if bpe:
        writer.add_token_merges(bpe[1])
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
             "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}[kind](int(tid))
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    if "add_bos_token" in init:
        writer.add_add_bos_token(bool(init["add_bos_token"]))
    if "add_eos_token" in init:
        writer.add_add_eos_token(bool(init["add_eos_token"]))


def copy_tokenizer(writer: gguf.GGUFWriter, source, vocab_size: int) -> bool:
    """Copy every ``tokenizer.*`` key of the GGUF ``source`` (the file the model was loaded from) with its types;
    False, copying nothing, when it holds no vocabulary of ``vocab_size`` tokens. Why not rebuild it: transformers
    rebuilds a GGUF's tokenizer without the file's scores and token types (Gemma's from its token order, multi-space
    pieces respelled), so a rebuilt vocabulary would tokenize differently in llama.cpp than the source did."""
    fields = gguf.GGUFReader(str(source)).fields
    tokens = fields.get("tokenizer.ggml.tokens")
    if "tokenizer.ggml.model" not in fields or tokens is None or len(tokens.data) != vocab_size:
        return False
    for key, f in fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if f.types[0] == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    return True
