"""Find decoder blocks and their prunable linears without model-specific code.

Every HF decoder-only model lists its block class in ``_no_split_modules`` (so accelerate never splits a
block across devices); the ``nn.ModuleList`` holding instances of that class is the stack of decoder
blocks. Target linears are the ``nn.Linear`` modules inside a block, so ``lm_head`` and embeddings are
never pruned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from taylorprune.errors import UserError


@dataclass(frozen=True)
class Target:
    """One prunable linear: its path in ``model.named_modules()`` and the module itself."""

    path: str
    module: nn.Linear


@dataclass(frozen=True)
class Layout:
    """The decoder stack of a model: path of the block list, the blocks, and per-block targets."""

    blocks_path: str
    blocks: nn.ModuleList
    targets: list[list[Target]]

    @property
    def all_targets(self) -> list[Target]:
        return [t for block in self.targets for t in block]

    @property
    def first_target_block(self) -> int:
        """Index of the first block with targets (blocks before it only carry activations forward)."""
        return next((i for i, targets in enumerate(self.targets) if targets), len(self.blocks))

    def target_starts(self) -> list[int]:
        """Index of each block's first target in ``all_targets`` (and the total count last)."""
        starts = [0]
        for block_targets in self.targets:
            starts.append(starts[-1] + len(block_targets))
        return starts


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (path, ModuleList) of the decoder blocks."""
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
    ]
    for name, mod in candidates:
        if type(mod[0]).__name__ in block_classes:
            return name, mod
    homogeneous = [(n, m) for n, m in candidates if len({type(b) for b in m}) == 1]
    if homogeneous:
        return max(homogeneous, key=lambda nm: len(nm[1]))
    raise UserError(
        f"{type(model).__name__} has no stack of decoder blocks that taylorprune understands; supported are "
        "decoder-only causal LMs whose blocks hold nn.Linear projections (LLaMA, Mistral, Qwen2, Gemma, ...)"
    )


def find_layout(model: nn.Module, targets_regex: str | None = None) -> Layout:
    """Locate blocks and the linears to prune; ``targets_regex`` is matched (re.search) on module paths."""
    try:
        pattern = re.compile(targets_regex) if targets_regex else None
    except re.error as exc:
        raise UserError(f"--targets {targets_regex!r} is not a valid regular expression: {exc}") from None
    blocks_path, blocks = find_blocks(model)
    per_block: list[list[Target]] = []
    for i, block in enumerate(blocks):
        found = []
        for name, mod in block.named_modules():
            path = f"{blocks_path}.{i}.{name}"
            if isinstance(mod, nn.Linear) and (pattern is None or pattern.search(path)):
                found.append(Target(path, mod))
        per_block.append(found)
    if not any(per_block):
        hint = f" matching --targets {targets_regex!r}" if targets_regex else ""
        example = next((n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)), "q_proj")
        raise UserError(
            f"no nn.Linear inside the decoder blocks{hint}; paths look like '{blocks_path}.0.{example}'"
        )
    return Layout(blocks_path, blocks, per_block)
