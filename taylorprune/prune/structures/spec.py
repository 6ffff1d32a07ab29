"""The structures ``--structure`` removes for real, and the options of each (one ``Structure`` per kind).

A *group* is everything that goes when one structure goes (``structures.groups``):

- ``neurons``: MLP channel j = row j of gate_proj and up_proj and column j of down_proj (its consumer);
- ``heads``, ``--head-mode query-heads``: query head h = its head_dim rows of q_proj and columns of o_proj; the
  same number is removed from every KV group, so num_attention_heads stays a multiple of num_key_value_heads;
- ``heads``, ``--head-mode kv-groups``: KV group g = key and value head g (rows of k_proj, v_proj) with its query
  heads (rows of q_proj, columns of o_proj); the q-per-kv ratio is unchanged;
- ``blocks``: whole decoder blocks (``structures.depth``).

Widths stay uniform: every decoder block loses the same count of each structure (``structures.shape``), so the
output has one intermediate_size and one head count and is a standard architecture; head_dim never changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from taylorprune.errors import UserError
from taylorprune.options import Options, by_name, option

KINDS = ("neurons", "heads", "blocks")
WIDTH_KINDS = ("heads", "neurons")  # order inside a block: attention first, then the MLP it feeds
HEAD_MODES = ("kv-groups", "query-heads")
BLOCK_SCORES = ("influence", "loss")
# Statistics taken on the consumer of a kind's groups only (down_proj, o_proj): its XXᵀ, for compensation and the
# scores that read the consumer's reconstruction error; every other statistic is taken on all member linears.
CONSUMER_STATS = frozenset({"hessian"})


def _compensate():
    return option(True, "Refit the consumer of removed channels (down_proj for neurons, o_proj for heads) by least "
                  "squares on the calibration activations of its kept inputs (off: plain removal, for ablations).")


def _percdamp():
    return option(0.01, "Compensation: dampening of H_KK as a fraction of its mean diagonal.", minimum=0)


@dataclass(frozen=True)
class AmountOptions(Options):
    """How much of a structure goes: the structure stage's own amount, so that --sparsity keeps one meaning (the
    unstructured sparsity a run may prune after the structures)."""

    structure_ratio: float | None = option(None, "Fraction of each structure removed in every block (of blocks: of "
                                           "the model's blocks).", above=0, below=1)
    target_params: float | None = option(None, "Instead of --structure-ratio: fraction of all parameters to remove "
                                         "(the smallest uniform count reaching it).", above=0, below=1)
    width_multiple: int | None = option(None, "Keep every FFN width and attention width (query heads x head size) a "
                                        "multiple of N weights, removing more where needed, so a quantization group "
                                        "or GGUF block divides every row (default: what the output needs: the "
                                        "--quantize group size, and for --format gguf the blocks of --gguf-type: 32, "
                                        "or 256 for K-quants; 1 for float output).", minimum=1)


@dataclass(frozen=True)
class NeuronOptions(AmountOptions):
    compensate: bool = _compensate()
    compensate_damp: float = _percdamp()


@dataclass(frozen=True)
class HeadOptions(AmountOptions):
    head_mode: str = option("kv-groups", "kv-groups (remove whole KV groups: a key/value head with its query heads) "
                            "or query-heads (the same number of query heads from every KV group).",
                            choices=HEAD_MODES)
    compensate: bool = _compensate()
    compensate_damp: float = _percdamp()


@dataclass(frozen=True)
class BlockOptions(AmountOptions):
    block_score: str = option("influence", "How decoder blocks are ranked: influence (1 − cosine of a block's input "
                              "and output, ShortGPT) or loss (exact calibration-loss increase when the block is "
                              "skipped, one forward per block).", choices=BLOCK_SCORES)


@dataclass(frozen=True)
class Structure:
    """One kind of structure: its options and the statistics its stage needs (the consumer's XXᵀ to compensate)."""

    name: str
    summary: str
    options: type[Options]

    def needs(self, options: Options) -> frozenset[str]:
        return CONSUMER_STATS if getattr(options, "compensate", False) else frozenset()


STRUCTURES: dict[str, Structure] = by_name(
    Structure("neurons", "MLP channels: rows of gate/up, columns of down_proj", NeuronOptions),
    Structure("heads", "attention heads (whole KV groups or query heads per group)", HeadOptions),
    Structure("blocks", "whole decoder blocks (depth)", BlockOptions),
)


def parse_structures(text: str) -> tuple[str, ...]:
    """``--structure neurons,heads`` as names in processing order (blocks first, then heads, then neurons)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in STRUCTURES]
    if not names or bad:
        raise UserError(f"--structure {text}: choose from {', '.join(KINDS)} (comma-separated to combine)")
    if len(set(names)) != len(names):
        raise UserError(f"--structure {text}: a structure is named twice")
    return tuple(n for n in ("blocks", *WIDTH_KINDS) if n in names)


def count_of(ratio: float, total: int) -> int:
    """Structures removed out of ``total`` for a ratio: rounded half up."""
    return int(math.floor(ratio * total + 0.5))
