"""Per-tensor GGUF type mixes: llama.cpp's ``Q4_K_M`` rule and its fallbacks for row widths a block type cannot
split, as plain data the writer applies (an override map {GGUF tensor name: type}).

Why a map and not "Q4_K everywhere": ``llama-quantize … Q4_K_M`` gives the tensors that hurt most when coarse more
bits, and files called Q4_K_M are expected to look like that. The rule, as ``src/llama-quant.cpp`` states it for a
dense (non-MoE, non-Falcon) model, without user overrides:

* ``output.weight`` (or ``token_embd.weight`` when the embeddings are tied and there is no output tensor): Q6_K,
  or Q8_0 when its row width (``n_embd``) is no multiple of 256;
* ``blk.N.attn_v.weight`` and ``blk.N.ffn_down.weight``: Q6_K in the layers ``use_more_bits`` names — the first
  eighth, the last eighth, and every third layer in between — Q4_K elsewhere;
* every other 2-D weight (incl. an untied ``token_embd``): Q4_K; 1-D tensors (norms) stay F32.

Then, as llama.cpp's ``tensor_type_fallback``: a K-quant on a row width that is no multiple of 256 becomes Q5_0
(from Q4_K) or Q8_0 (from Q6_K), and a 32-weight type on a width that is no multiple of 32 becomes F16.
Not reproduced: the 70B-only bump of attn_v to Q5_K and the MoE rules (the writer covers dense LLaMA and Gemma 3,
whose tensors the rule names alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as QT

from taylorprune.export import gguf_kquants as gk

_K_FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q6_K: QT.Q8_0}  # llama.cpp's tensor_type_fallback for our K types
_LEGACY_BLOCK = 32


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: first and last eighth, every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def q4_k_m_types(n_layer: int, n_embd: int, tied: bool) -> dict[str, QT]:
    """The Q4_K_M type of every 2-D llama tensor whose type differs from the base Q4_K (see the module doc)."""
    head = QT.Q6_K if n_embd % gk.QK_K == 0 else QT.Q8_0
    types = {"token_embd.weight" if tied else "output.weight": head}
    for i in range(n_layer):
        if use_more_bits(i, n_layer):
            types[f"blk.{i}.attn_v.weight"] = types[f"blk.{i}.ffn_down.weight"] = QT.Q6_K
    return types


@dataclass(frozen=True)
class Preset:
    """A named mix: the base type of 2-D tensors, the file type it is labelled with, its per-tensor map."""

    name: str
    base: QT
    file_type: gguf.LlamaFileType

    def types(self, config) -> dict[str, QT]:
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return q4_k_m_types(int(config.num_hidden_layers), int(config.hidden_size), tied)


PRESETS = {"Q4_K_M": Preset("Q4_K_M", QT.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M)}


def fallback_type(chosen: QT, width: int) -> QT:
    """The type llama.cpp falls back to when ``chosen``'s blocks do not divide a row of ``width`` weights."""
    t = _K_FALLBACK.get(chosen, chosen)
    return t if t != chosen and width % _LEGACY_BLOCK == 0 else QT.F16
