"""GGUF checkpoints as plain models: transformers' GGUF loader dequantizes them, and what it leaves undone is done
here (a model tagged as GGUF cannot be saved; non-persistent buffers stay unloaded; the metadata is read for the
config and again for the tokenizer)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from taylorprune.errors import UserError


def strip_quantizer(model: nn.Module, dtype: torch.dtype | str) -> nn.Module:
    """Rebuild a GGUF-loaded model as a plain one: transformers refuses to save a model tagged as gguf."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target = model.dtype if dtype == "auto" else dtype
    config.dtype = target
    # Parameters on the meta device (filled from the GGUF's tensors below), buffers built for real by the modules'
    # own constructors: non-persistent ones (rotary inv_freq, Gemma's embed_scale) are in no checkpoint.
    with init_empty_weights(include_buffers=False):
        plain = AutoModelForCausalLM.from_config(config, dtype=target)
    plain.load_state_dict({k: v.to(target) for k, v in model.state_dict().items()}, assign=True)
    plain.tie_weights()
    materialize_buffers(plain)
    plain.generation_config = model.generation_config
    return plain.eval()


def materialize_buffers(model: nn.Module) -> None:
    """Recompute buffers left on the meta device (a GGUF load leaves the rotary ``inv_freq`` there).

    Non-persistent buffers are not in any checkpoint; a module that derives them from the config (rotary
    embeddings) is rebuilt on the CPU and its buffers copied over.
    """
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise UserError(f"{name}: buffers {', '.join(meta)} were not loaded and cannot be recomputed")
        with torch.device("cpu"):
            fresh = type(module)(config=config)
        for b in meta:
            setattr(module, b, getattr(fresh, b))
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))


_GGUF_METADATA: dict[tuple, dict] = {}


def metadata_once(read):
    """``load_gguf_checkpoint`` with its metadata-only reads (``return_tensors=False``) made once per file and
    process: transformers reads a GGUF's metadata for the config and again for the tokenizer's config (about 20 s
    each for Gemma-3-270m's 262k-token vocabulary); the weights are read once either way."""

    def once(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return read(path, return_tensors, *args, **kwargs)
        stat = Path(path).stat()
        key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _GGUF_METADATA:
            _GGUF_METADATA[key] = read(path, return_tensors=False)
        return copy.deepcopy(_GGUF_METADATA[key])

    once.wrapped = read
    return once
