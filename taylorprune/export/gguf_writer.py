"""Write a GGUF from an HF ``LlamaForCausalLM`` or ``Gemma3ForCausalLM`` (config + state dict + tokenizer).

What llama.cpp's HF→GGUF converter does for them, redone here so that the weights can be quantized by our own block
packers (:mod:`taylorprune.export.gguf_blocks`), including blocks packed from GPTQ grids. What differs between the
architectures (tensor names of the norms, Q/K permutation, Gemma's norm + 1, their own metadata and refusals) is
declared in :mod:`taylorprune.export.gguf_arch`; everything else is common:

* ``<arch>.*`` metadata (context/embedding/feed-forward length, block count, head counts incl. KV, rope dimension
  count, key/value length, RMS eps, vocab size, and the architecture's own keys: llama's rope freq base, Gemma 3's
  global base, linear rope scaling and sliding window), ``general.file_type`` and ``general.quantization_version``;
* converter tensor names (``token_embd``, ``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``, the norms,
  ``output_norm``, ``output``; none for tied embeddings);
* for llama, the row permutation of ``attn_q`` (by ``n_head``) and ``attn_k`` (by ``n_head_kv``) from HF's
  rotate-half layout to GGML's interleaved RoPE: ``w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).reshape(rows,
  cols)``;
* a per-tensor type map: 1-D tensors (norms) F32, everything else the requested type (or a preset's per-tensor
  mix, :mod:`taylorprune.export.gguf_mix`: ``Q4_K_M``), except that a block type needs the row width (``ne[0]`` =
  the input dimension, HF's last dim) to be a multiple of its block (32; 256 for Q4_K/Q6_K), else llama.cpp's
  fallback (Q4_K -> Q5_0, Q6_K -> Q8_0; F16 when 32 does not divide it either) with a warning naming the tensor;
* SentencePiece (``tokenizer.ggml.model = "llama"``) tokenizer metadata: tokens, scores, token types, special ids;
  a byte-level BPE vocabulary (GPT-2 style, SmolLM2's) as ``gpt2`` with its merges and llama.cpp's pre-tokenizer name;
  copied from the GGUF the model was loaded from, when there is one (:func:`gguf_tokenizer.copy_tokenizer`).

Per-layer widths that differ (pruned FFNs/heads) are refused for Gemma 3 (llama.cpp's ``gemma3`` reads one width)
and written for llama as per-layer arrays under llama.cpp's ``deci`` architecture (the same tensors and graph, one
width per layer): llama.cpp's ``llama`` reads a single FFN width and head count for every layer and refuses such a
file (``check_tensor_dims: tensor 'blk.1.ffn_gate.weight' has wrong shape``). Transformers' GGUF loader reads
neither ``deci`` nor per-layer arrays. The head size is written as ``attention.key_length``/``value_length``:
llama.cpp otherwise takes it as embedding / heads, which a model pruned to fewer heads no longer satisfies
(``invalid n_rot``).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT

from taylorprune.export import gguf_arch as ga
from taylorprune.export import gguf_blocks as gb
from taylorprune.export import gguf_mix as mix
from taylorprune.export.gguf_tokenizer import add_tokenizer, copy_tokenizer

FILE_TYPES = {
    QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16, QT.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    # llama-quantize's plain "Q4_K" is its Q4_K_M file type (also with --pure, every tensor Q4_K)
    QT.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, QT.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def as_qtype(t) -> QT:
    return t if isinstance(t, QT) else QT[str(t).upper()]


def gguf_name(hf_name: str, arch: ga.Arch = ga.LLAMA) -> str | None:
    """Converter tensor name for an HF parameter of ``arch``; None for what GGUF does not store (rotary buffers)."""
    if hf_name in ga.TOP:
        return ga.TOP[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in arch.layer:
        return f"blk.{m.group(1)}.{arch.layer[m.group(2)]}.{m.group(3)}"
    if ".rotary_emb." in hf_name and hf_name.endswith("inv_freq"):
        return None
    raise ValueError(f"{hf_name}: no GGUF name for this tensor")


def hf_name(name: str, arch: ga.Arch = ga.LLAMA) -> str:
    """The HF parameter name of a converter tensor name of ``arch`` (the inverse of ``gguf_name``; unknown names as
    given)."""
    top = {v: k for k, v in ga.TOP.items()}
    m = re.match(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$", name)
    layer = {v: k for k, v in arch.layer.items()}
    if m and m.group(2) in layer:
        return f"model.layers.{m.group(1)}.{layer[m.group(2)]}.{m.group(3)}"
    return top.get(name, name)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> GGML interleaved rows, per head. Works on floats or on packed block rows alike
    (blocks run along a row, so moving whole rows keeps them intact); 1-D biases are permuted as a column."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    tail = w.shape[1:]
    return w.reshape(n_head, 2, rows // n_head // 2, *tail).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFReport:
    path: Path
    file_type: QT
    types: dict[str, QT] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def choose_type(
    name: str, shape: tuple[int, ...], requested: QT, overrides: dict | None = None
) -> tuple[QT, str | None]:
    """(type, warning or None) for a GGUF tensor: norms and other 1-D tensors F32; an override (by GGUF name or
    regex) or the requested type; a block type on a row width its blocks do not divide falls back as llama.cpp
    does (:func:`mix.fallback_type`: Q4_K -> Q5_0, Q6_K -> Q8_0, else F16)."""
    if len(shape) == 1:
        return QT.F32, None
    chosen = requested
    for pattern, t in (overrides or {}).items():
        if pattern == name or re.fullmatch(pattern, name):
            chosen = as_qtype(t)
            break
    if chosen in gb.BLOCK_WEIGHTS and shape[-1] % gb.BLOCK_WEIGHTS[chosen]:
        t = mix.fallback_type(chosen, shape[-1])
        return t, (f"{name}: row width {shape[-1]} is not a multiple of {gb.BLOCK_WEIGHTS[chosen]}; "
                   f"written as {t.name} instead of {chosen.name}")
    return chosen, None


def _scalar_or_list(values: list[int]):
    return values[0] if len(set(values)) == 1 else values


def _uneven(arch: ga.Arch, widths: dict[str, list[int]]) -> bool:
    """Whether the layers' widths differ; a one-line ValueError naming them for an architecture that holds one."""
    differ = {key: values for key, values in widths.items() if len(set(values)) > 1}
    if differ and arch.uneven is None:
        raise ValueError(f"llama.cpp's {arch.name} reads one width for all layers; this model's differ: "
                         + "; ".join(f"{key} {values}" for key, values in differ.items()))
    return bool(differ)


def write_gguf(path, config, state_dict, tokenizer=None, *, qtype="F32", overrides: dict | None = None,
               importance: dict | None = None, packed: dict | None = None, name: str | None = None,
               tokenizer_source=None) -> GGUFReport:
    """Write ``state_dict`` (HF names of ``config.model_type``: llama or gemma3_text; any torch/numpy floats) as a
    GGUF of its architecture (:mod:`gguf_arch`) at ``path``; what llama.cpp cannot run is a one-line ValueError
    (NotImplementedError for another architecture) before anything is written.

    ``qtype``: F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q4_K/Q6_K for every 2-D tensor (see :func:`choose_type`), or a
    preset of :data:`mix.PRESETS` (``Q4_K_M``: its per-tensor map, under ``overrides``); ``overrides``:
    {GGUF name or regex: type}; ``importance``: {HF name: per-input-column importance} for the weighted search;
    ``packed``: {HF name: (type, raw blocks [rows, bytes])} already packed (e.g. by :func:`gb.q4_0_from_sym_grid`
    from a GPTQ run), in HF row order: the Q/K permutation is applied to them here; ``tokenizer_source``: a GGUF
    whose tokenizer metadata is copied (the file the model was loaded from), else it is built from ``tokenizer``.
    """
    arch = ga.for_model_type(getattr(config, "model_type", None) or "llama")
    preset = None if isinstance(qtype, QT) else mix.PRESETS.get(str(qtype).upper())
    requested, path = (preset.base if preset else as_qtype(qtype)), Path(path)
    if requested not in FILE_TYPES:
        raise ValueError(f"unsupported GGUF type {requested.name}; choose from {', '.join(t.name for t in FILE_TYPES)}")
    if preset is not None:  # a user's overrides are matched first (as llama-quantize --tensor-type), then the map
        overrides = dict(overrides or {})
        overrides.update({k: v for k, v in preset.types(config).items() if k not in overrides})
    packed, importance = packed or {}, importance or {}
    sd = {k: v for k, v in state_dict.items() if gguf_name(k, arch) is not None}
    n_layer = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def rows_of(hf):
        return (packed[hf][1] if hf in packed else sd[hf]).shape[0]

    n_head = [rows_of(f"model.layers.{i}.self_attn.q_proj.weight") // head_dim for i in range(n_layer)]
    n_head_kv = [rows_of(f"model.layers.{i}.self_attn.k_proj.weight") // head_dim for i in range(n_layer)]
    n_ff = [rows_of(f"model.layers.{i}.mlp.gate_proj.weight") for i in range(n_layer)]
    uneven = _uneven(arch, {"feed_forward_length": n_ff, "head_count": n_head, "head_count_kv": n_head_kv})
    reason = arch.refuses(config, int(head_dim), n_head[0])
    if reason:
        raise ValueError(f"llama.cpp's {arch.name} cannot run this model: {reason}")

    writer = gguf.GGUFWriter(str(path), arch.uneven if uneven else arch.name)
    writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or arch.name)).name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(n_layer))
    writer.add_feed_forward_length(_scalar_or_list(n_ff))
    writer.add_head_count(_scalar_or_list(n_head))
    writer.add_head_count_kv(_scalar_or_list(n_head_kv))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_key_length(int(head_dim))
    writer.add_value_length(int(head_dim))
    arch.metadata(writer, config)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(int(preset.file_type if preset else FILE_TYPES[requested]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    copied = bool(tokenizer_source) and copy_tokenizer(writer, tokenizer_source, int(config.vocab_size))
    if not copied and tokenizer is not None:
        add_tokenizer(writer, tokenizer, int(config.vocab_size))

    report = GGUFReport(path, requested)
    names = list(sd) + [k for k in packed if k not in sd]
    if getattr(config, "tie_word_embeddings", False):
        names = [k for k in names if k != "lm_head.weight"]  # llama.cpp reuses token_embd
    for hf in names:
        gname = gguf_name(hf, arch)
        layer = _LAYER_RE.match(hf)
        heads = None
        if arch.permute_qk and layer and layer.group(2) in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = (n_head if layer.group(2) == "self_attn.q_proj" else n_head_kv)[int(layer.group(1))]
        if hf in packed:  # raw block rows: permuting whole rows keeps every block intact
            t, raw = as_qtype(packed[hf][0]), gb._np(packed[hf][1], np.uint8)
            raw = permute_rows(raw, heads) if heads is not None else raw
        else:
            w = gb._np(sd[hf], np.float32)
            w = permute_rows(w, heads) if heads is not None else w
            if gname.endswith("norm.weight") and arch.norm_offset:
                w = w + np.float32(arch.norm_offset)
            t, warning = choose_type(gname, w.shape, requested, overrides)
            if warning:
                warnings.warn(warning, stacklevel=2)
                report.fallbacks.append(warning)
            raw = gb.quantize(w, t, importance.get(hf)) if w.ndim > 1 else gb.encode_float(w, t)
        writer.add_tensor(gname, np.ascontiguousarray(raw), raw_dtype=t)
        report.types[gname] = t
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return report


def write_model_gguf(path, model, tokenizer=None, **kwargs) -> GGUFReport:
    """:func:`write_gguf` for a loaded ``LlamaForCausalLM`` or ``Gemma3ForCausalLM``."""
    return write_gguf(path, model.config, model.state_dict(), tokenizer, **kwargs)
