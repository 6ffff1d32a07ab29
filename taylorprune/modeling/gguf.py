"""GGUF checkpoints as plain models: transformers' GGUF loader dequantizes them, and what it leaves undone is done
here (a model tagged as GGUF cannot be saved; non-persistent buffers stay unloaded; the metadata is read for the
config and again for the tokenizer)."""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any

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


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def scalar_metadata(path) -> dict[str, Any]:
    """The scalar and string keys of a GGUF file's header, arrays skipped: gguf-py's reader parses every piece of
    Gemma's 262k-token vocabulary (seconds) where a config needs two numbers. Stops at an array of arrays."""
    out: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return out
        _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == _ARRAY:
                etype, count = struct.unpack("<IQ", f.read(12))
                if etype == _STRING:
                    for _ in range(count):
                        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
                elif etype in _SCALARS:
                    f.seek(count * struct.calcsize(_SCALARS[etype]), 1)
                else:
                    break
            elif vtype == _STRING:
                out[key] = string()
            else:
                fmt = "<" + _SCALARS[vtype]
                (out[key],) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
    return out


def gemma3_query_scalar(n_layer: int, hidden: int, head_dim: int, n_head: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's gemma3 computes with (it reads none from the file): head_dim, or
    n_embd / n_head for the 62-layer 27B (llama.cpp's LLM_TYPE_27B)."""
    return hidden // n_head if n_layer == 62 else head_dim


def complete_config(config, path) -> None:
    """What transformers' GGUF loader leaves out of a Gemma 3 config, set as llama.cpp reads the same file: the
    attention scale (transformers keeps ``Gemma3TextConfig``'s ``query_pre_attn_scalar`` 256 whatever the head
    size; llama.cpp scales by 1/sqrt(head_dim), or n_embd / n_head for the 62-layer 27B) and the global layers'
    linear RoPE scaling (``gemma3.rope.scaling.*``, which transformers does not read: Gemma-3-4b and larger)."""
    if getattr(config, "model_type", None) != "gemma3_text":
        return
    config.query_pre_attn_scalar = gemma3_query_scalar(int(config.num_hidden_layers), int(config.hidden_size),
                                                        int(config.head_dim), int(config.num_attention_heads))
    meta = scalar_metadata(path)
    factor = meta.get("gemma3.rope.scaling.factor")
    if meta.get("gemma3.rope.scaling.type") == "linear" and factor and factor != 1.0:
        config.rope_parameters["full_attention"].update(rope_type="linear", factor=float(factor))
