"""The widths structured pruning changes: counts per block, the config they leave, and its validation.

Every decoder block loses the same count of each structure (``removal_counts``: ratio × its count, rounded), so
the output has uniform widths; ``counts_for_target`` finds the fewest that remove a fraction of all parameters;
``check_config`` refuses widths the model's config class would refuse, before any work.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

from taylorprune.errors import UserError
from taylorprune.modeling.layout import Layout
from taylorprune.prune.structures.groups import groups_of
from taylorprune.prune.structures.spec import count_of
from taylorprune.prune.structures.surgery import count_parameters


@dataclass(frozen=True)
class Shape:
    """The widths of a LLaMA-class config that structured pruning changes."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> Shape:
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        kv = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(text.num_hidden_layers, heads, kv, head_dim, text.intermediate_size)


def removal_counts(kinds: tuple[str, ...], ratio: float, shape: Shape, head_mode: str) -> dict[str, int]:
    """Per kind, how many structures go in every block (blocks: in the model); bad requests are one-line errors.

    Heads count query heads: in kv-groups mode ``ratio`` × KV groups go (each with its query heads), in
    query-heads mode ``ratio`` × query heads, which must split evenly over the KV groups.
    """
    counts = {}
    for kind in kinds:
        if kind == "blocks":
            counts[kind] = _checked(count_of(ratio, shape.layers), shape.layers, ratio, "decoder blocks",
                                    "drops every block")
        elif kind == "neurons":
            counts[kind] = _checked(count_of(ratio, shape.intermediate), shape.intermediate, ratio, "MLP neurons",
                                    "leaves no neuron")
        elif head_mode == "kv-groups":
            hint = (f" (the model has {shape.kv_heads} KV head{'s' if shape.kv_heads > 1 else ''}: remove query heads "
                    "from every KV group instead with --head-mode query-heads)" if shape.heads > shape.kv_heads else "")
            groups = _checked(count_of(ratio, shape.kv_heads), shape.kv_heads, ratio, "KV groups", "leaves no head",
                              hint if shape.kv_heads <= 2 else "")
            counts[kind] = groups * (shape.heads // shape.kv_heads)
        else:
            heads = _checked(count_of(ratio, shape.heads), shape.heads, ratio, "query heads", "leaves no head")
            if heads % shape.kv_heads:
                per = shape.heads // shape.kv_heads
                fine = ", ".join(f"{k / per:.2f} ({k * shape.kv_heads} heads)" for k in range(1, per))
                raise UserError(f"--structure-ratio {ratio:g} removes {heads} of {shape.heads} query heads per block, "
                                f"not a multiple of the {shape.kv_heads} KV groups (GQA keeps the same number of query "
                                f"heads in every group); use one of: {fine or 'none (one query head per group)'}")
            counts[kind] = heads
    return counts


def widths_after(counts: Mapping[str, int], shape: Shape, head_mode: str) -> dict[str, int]:
    """The config widths once ``counts`` are removed."""
    heads = counts.get("heads", 0)
    kv_gone = heads // (shape.heads // shape.kv_heads) if head_mode == "kv-groups" else 0
    return {"num_hidden_layers": shape.layers - counts.get("blocks", 0), "num_attention_heads": shape.heads - heads,
            "num_key_value_heads": shape.kv_heads - kv_gone, "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate - counts.get("neurons", 0)}


def aligned_counts(counts: Mapping[str, int], shape: Shape, head_mode: str, multiple: int) -> dict[str, int]:
    """``counts`` removing more where needed so every kept width a linear reads is a multiple of ``multiple``
    weights: the FFN width (down_proj's input) and the attention width (o_proj's input, query heads × head size).
    Why: a quantization group or a GGUF block that does not divide a row cannot hold it (llama.cpp silently falls
    back to another type). Only ever more removal, so ``--target-params``' "at least" still holds."""
    out = dict(counts)
    if multiple <= 1:
        return out
    if "neurons" in out:
        kept = shape.intermediate - out["neurons"]
        kept -= kept % multiple
        if kept <= 0:
            raise UserError(f"--width-multiple {multiple}: removing {counts['neurons']} of {shape.intermediate} MLP "
                            "neurons leaves no width that is a multiple of it; lower it or remove fewer")
        out["neurons"] = shape.intermediate - kept
    if "heads" in out:
        step = shape.heads // shape.kv_heads if head_mode == "kv-groups" else shape.kv_heads
        heads = out["heads"]
        while (shape.heads - heads) * shape.head_dim % multiple:
            heads += step
            if heads >= shape.heads:
                raise UserError(f"--width-multiple {multiple}: no head count below {shape.heads} keeps the attention "
                                f"width (heads × {shape.head_dim}) a multiple of it; lower it")
        out["heads"] = heads
    return out


def set_widths(config, widths: Mapping[str, int]) -> None:
    """Write ``widths`` into ``config`` (its text config), per-layer lists cut to the new depth."""
    text = getattr(config, "text_config", None) or config
    layers = text.num_hidden_layers
    for key, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == layers and not key.startswith("_"):
            setattr(text, key, value[: widths["num_hidden_layers"]])
    for key, value in widths.items():
        setattr(text, key, value)


def check_config(config, counts: Mapping[str, int], shape: Shape, head_mode: str, flag: str) -> None:
    """Refuse, before any work, widths the model's own config class would refuse when the output is saved or loaded
    (LlamaConfig wants num_attention_heads to divide hidden_size, even with an explicit head_dim)."""
    validate = getattr(config, "validate", None)
    if validate is None:
        return
    probe = copy.deepcopy(config)
    widths = widths_after(counts, shape, head_mode)
    set_widths(probe, widths)
    try:
        probe.validate()
    except Exception as exc:  # transformers raises its own validation error types
        cause = getattr(exc, "__cause__", None) or exc
        reason = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise UserError(f"{flag} leaves {widths['num_attention_heads']} attention heads / "
                        f"{widths['num_key_value_heads']} KV heads, a config {type(config).__name__} refuses "
                        f"({reason}); choose another ratio or --head-mode") from None


def _checked(count: int, total: int, ratio: float, what: str, all_gone: str, hint: str = "") -> int:
    if count >= total:
        raise UserError(f"--structure-ratio {ratio:g} removes {count} of {total} {what}: that {all_gone}; lower it"
                        f"{hint}")
    if count < 1:
        raise UserError(f"--structure-ratio {ratio:g} removes none of the {total} {what} (rounded); raise it to at "
                        f"least {0.5 / total:.3g}{hint}")
    return count


def counts_for_target(kind: str, fraction: float, model, layout: Layout, head_mode: str,
                      multiple: int = 1) -> dict[str, int]:
    """Per-block count of ``kind`` (blocks: in the model) removing at least ``fraction`` of all parameters, every
    kept width a multiple of ``multiple`` (``aligned_counts``)."""
    total = count_parameters(model)
    shape = Shape.of(model.config)
    if kind == "blocks":
        unit, units = sum(p.numel() for p in layout.blocks[0].parameters()), shape.layers
        step = 1
    else:
        groups = groups_of(kind, layout.blocks[0], f"{layout.blocks_path}.0", 0, head_mode)
        step = groups.chunk and groups.size // groups.chunk or 1  # query heads: one per KV group at a time
        unit, units = groups.params_per_group() * step * len(layout.blocks), groups.size // step
    need = math.ceil(fraction * total / unit - 1e-9)
    if need >= units:
        raise UserError(f"--target-params {fraction:g}: removing {kind} alone cannot reach it ({total:,} parameters, "
                        f"{unit * (units - 1):,} at most without removing every one); lower it or add structures")
    ratio_units = max(need, 1) * step
    if kind == "heads" and head_mode == "kv-groups":
        counts = removal_counts((kind,), ratio_units / shape.kv_heads, shape, head_mode)
    else:
        total_units = {"blocks": shape.layers, "neurons": shape.intermediate, "heads": shape.heads}[kind]
        counts = removal_counts((kind,), ratio_units / total_units, shape, head_mode)
    counts = aligned_counts(counts, shape, head_mode, multiple)
    check_config(model.config, counts, shape, head_mode, f"--target-params {fraction:g}")
    return counts
