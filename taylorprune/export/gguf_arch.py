"""What differs between the GGUF architectures our writer writes, declared once per architecture, so that the writer
(:mod:`taylorprune.export.gguf_writer`) stays one code path and a new architecture is one more declaration.

Each :class:`Arch` says what llama.cpp's HF→GGUF converter does for it and what llama.cpp's graph of it reads:

* the GGUF tensor name of every decoder-layer module (the linears are named alike; the norms are not: llama's
  ``post_attention_layernorm`` is ``ffn_norm``, Gemma 3's is ``post_attention_norm`` and its
  ``pre_feedforward_layernorm`` is ``ffn_norm``);
* whether Q/K rows are permuted from HF's rotate-half order to GGML's interleaved RoPE (llama: yes; Gemma 3 runs
  neox-style RoPE, which reads HF's order);
* an offset added to every ``*norm.weight``: Gemma's RMSNorm multiplies by ``1 + w``, llama.cpp's by ``w``, so the
  converter writes ``w + 1`` (transformers' GGUF loader subtracts 1 back for Gemma);
* the architecture that holds per-layer widths (llama: ``deci``), or none: llama.cpp's ``gemma3`` reads one
  feed-forward width and one head count for all layers, so uneven widths are refused;
* the metadata only it writes (RoPE bases and scaling, the sliding window) and what its llama.cpp graph cannot
  compute (:attr:`Arch.refuses`, one line, before anything is written).

Gemma 3 in llama.cpp (``llama_load_hparams`` for ``LLM_ARCH_GEMMA3``): every 6th layer global, the others sliding
(``set_swa_pattern(6)``), local RoPE base 10000 unscaled, attention scale 1/sqrt(head_dim) (1/sqrt(n_embd/n_head)
for the 62-layer 27B), no attention or final-logit soft-capping, GELU (tanh) gates, embeddings scaled by
sqrt(n_embd) inside the graph; none of these are read from the file, so a model that differs is refused.
Transformers' GGUF loader assumes the same pattern and local base (``Gemma3TextConfig`` defaults), reads
``rope.freq_base`` as the global base, and neither the attention scale nor the RoPE scaling
(:func:`taylorprune.modeling.gguf.complete_config` restores both as llama.cpp reads them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import gguf

from taylorprune.modeling.gguf import gemma3_query_scalar

LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
GEMMA3_SWA_PATTERN, GEMMA3_LOCAL_BASE = 6, 10000.0


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture as our writer writes it (see the module doc for each field's why)."""

    name: str  # general.architecture and the prefix of its metadata keys
    layer: Mapping[str, str]  # HF module path inside a decoder layer -> GGUF tensor stem
    permute_qk: bool  # Q/K rows to GGML's interleaved RoPE order
    norm_offset: float  # added to every *norm.weight
    uneven: str | None  # the architecture for per-layer widths; None: llama.cpp holds one width, refused
    metadata: Callable[[gguf.GGUFWriter, Any], None]  # the keys only this architecture writes
    refuses: Callable[[Any, int, int], str | None] = field(default=lambda config, head_dim, n_head: None)


def _rope_params(config) -> dict:
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _llama_metadata(writer: gguf.GGUFWriter, config) -> None:
    params = _rope_params(config)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise NotImplementedError(f"rope type {kind!r} is not written to GGUF yet (llama.cpp needs rope_freqs)")
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))


def gemma3_rope(config) -> tuple[dict, dict]:
    """(global, sliding) RoPE parameters of a Gemma 3 config, from transformers 5's per-layer-type
    ``rope_parameters`` or 4.x's ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling``."""
    params = _rope_params(config)
    full = dict(params.get("full_attention") or ({} if "sliding_attention" in params else params))
    local = dict(params.get("sliding_attention") or {})
    full.setdefault("rope_theta", getattr(config, "rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", getattr(config, "rope_local_base_freq", GEMMA3_LOCAL_BASE))
    return full, local


def gemma3_layer_types(n_layer: int) -> list[str]:
    """The layer types llama.cpp's gemma3 assumes (and transformers' default): every 6th layer global."""
    return ["full_attention" if (i + 1) % GEMMA3_SWA_PATTERN == 0 else "sliding_attention" for i in range(n_layer)]


def _gemma3_metadata(writer: gguf.GGUFWriter, config) -> None:
    full, _ = gemma3_rope(config)
    writer.add_rope_freq_base(float(full["rope_theta"]))
    if full.get("rope_type", full.get("type", "default")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    writer.add_sliding_window(int(config.sliding_window))


def _gemma3_refuses(config, head_dim: int, n_head: int) -> str | None:
    """What llama.cpp's gemma3 graph would compute differently from this model (it reads none of it)."""
    n_layer = int(config.num_hidden_layers)
    full, local = gemma3_rope(config)
    kinds = (full.get("rope_type", full.get("type", "default")), local.get("rope_type", local.get("type", "default")))
    types = list(getattr(config, "layer_types", None) or gemma3_layer_types(n_layer))
    scalar = gemma3_query_scalar(n_layer, int(config.hidden_size), head_dim, n_head)
    if kinds[0] not in ("default", "linear", None) or kinds[1] not in ("default", None):
        return f"RoPE {kinds[0]} (global) / {kinds[1]} (sliding); llama.cpp's gemma3 reads default or linear (global)"
    if not math.isclose(float(local["rope_theta"]), GEMMA3_LOCAL_BASE):
        return f"the sliding layers' RoPE base is {local['rope_theta']}; llama.cpp's gemma3 fixes it at 10000"
    if not getattr(config, "sliding_window", None) or types != gemma3_layer_types(n_layer):
        return ("llama.cpp's gemma3 makes every 6th layer global and the others sliding; this model's layer_types "
                f"are {''.join('G' if t == 'full_attention' else 'S' for t in types)} (sliding window "
                f"{getattr(config, 'sliding_window', None)})")
    if not math.isclose(float(config.query_pre_attn_scalar), scalar):
        return (f"query_pre_attn_scalar is {config.query_pre_attn_scalar}; llama.cpp's gemma3 scales attention by "
                f"1/sqrt({scalar})")
    caps = [k for k in ("attn_logit_softcapping", "final_logit_softcapping") if getattr(config, k, None)]
    if caps or getattr(config, "use_bidirectional_attention", False):
        return f"{', '.join(caps) or 'bidirectional attention'} is not in llama.cpp's gemma3 graph"
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        return f"activation {config.hidden_activation}; llama.cpp's gemma3 gates with GELU (tanh)"
    return None


LLAMA = Arch("llama", {**LINEARS, "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"},
             permute_qk=True, norm_offset=0.0, uneven="deci", metadata=_llama_metadata)
GEMMA3 = Arch("gemma3", {**LINEARS, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                         "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
                         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"},
              permute_qk=False, norm_offset=1.0, uneven=None, metadata=_gemma3_metadata, refuses=_gemma3_refuses)
BY_MODEL_TYPE = {"llama": LLAMA, "gemma3_text": GEMMA3}  # config.json's model_type -> what we write
BY_FILE = {"llama": LLAMA, "deci": LLAMA, "gemma3": GEMMA3}  # general.architecture -> how to read names back


def for_model_type(model_type: str | None) -> Arch:
    """The architecture a model of ``model_type`` is written as; NotImplementedError for one we do not write."""
    if model_type not in BY_MODEL_TYPE:
        raise NotImplementedError(f"GGUF export covers {', '.join(BY_MODEL_TYPE)}, not {model_type}")
    return BY_MODEL_TYPE[model_type]


def for_file(architecture: str | None) -> Arch:
    """How a GGUF file's tensor names read back (llama's names for an architecture we do not write)."""
    return BY_FILE.get(str(architecture), LLAMA)
