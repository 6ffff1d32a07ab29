"""On-disk cache of token ids (calibration windows, tokenized evaluation texts), so repeated runs skip tokenizing.

Never required and never trusted blindly: an entry is a safetensors file named by the sha256 of its key and
holding that key in its metadata, used only when the key matches exactly; anything unreadable is recomputed
and rewritten; a cache that cannot be written is skipped silently. Files are written to a temporary name
beside the target and renamed, so a reader never sees half a file.

Location: ``$TAYLORPRUNE_CACHE`` (``off``, ``0`` or ``none`` disables it), else ``$XDG_CACHE_HOME/taylorprune``,
else ``~/.cache/taylorprune``. The key holds the tokenizer's fingerprint (its class, its whole ``tokenizers``
pipeline or vocabulary, special-token settings), the text's sha256, the sampler settings and the versions of
transformers and tokenizers, so a change in any of them is a miss, never a stale hit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

OFF = {"off", "0", "none", "false", ""}
_VOLATILE = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only",
             "_commit_hash", "cache_dir"}  # where the files were, not what they do


def cache_dir() -> Path | None:
    """The cache folder, or None when disabled."""
    env = os.environ.get("TAYLORPRUNE_CACHE")
    if env is not None:
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "taylorprune"


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of everything that decides how ``tokenizer`` turns text into ids (not where its files are)."""
    import tokenizers
    import transformers

    h = hashlib.sha256(f"{type(tokenizer).__name__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items() if k not in _VOLATILE}
    settings.update({k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "padding_side")})
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _entry(kind: str, key: dict) -> tuple[Path | None, str]:
    text = json.dumps({"kind": kind, **key}, sort_keys=True, default=str)
    folder = cache_dir()
    name = hashlib.sha256(text.encode()).hexdigest()
    return (folder / "tokens" / f"{name}.safetensors" if folder else None), text


def _read(path: Path, key: str) -> torch.Tensor | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("ids")
    except Exception:  # missing, truncated, not safetensors: recompute
        return None


def _write(path: Path, ids: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        save_file({"ids": ids.contiguous()}, tmp, metadata={"key": key})
        os.replace(tmp, path)
        tmp = None
    except OSError:  # read-only or full disk: the cache is an optimisation, never a requirement
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def cached_ids(kind: str, key: dict, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``compute()`` (an integer tensor), or the cached result of the same ``kind`` and ``key``."""
    path, text = _entry(kind, key)
    if path is None:
        return compute()
    hit = _read(path, text) if path.is_file() else None
    if hit is not None:
        return hit
    ids = compute()
    _write(path, ids, text)
    return ids
