"""Depth pruning (``--structure blocks``): rank whole decoder blocks on the dense model and delete the lowest.

Scores (``--block-score``), both computed on the calibration windows:

- ``influence``: Block Influence of ShortGPT (Men et al., "ShortGPT: Layers in Large Language Models are More
  Redundant Than You Expect", 2024): 1 − mean over tokens of cos(block input, block output) (a sum and a count,
  so a data-parallel run sums both over its ranks). A block that barely
  turns its input is the cheapest to drop. One forward per block.
- ``loss``: the exact increase of the calibration loss (mean next-token cross-entropy) when the block alone is
  skipped (its output replaced by its input), everything else dense. Blocks before it run once; the blocks after
  it run again per candidate, so L·(L+1)/2 block forwards in all.

Deleting blocks renumbers the rest (their attention ``layer_idx``, used by the KV cache) and drops their entries
from every per-layer list of the config (``layer_types`` and the like); num_hidden_layers shrinks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.errors import RunError
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.sweep import forward, next_token_loss
from taylorprune.prune.structures.groups import choose
from taylorprune.prune.structures.spec import BlockOptions


@torch.no_grad()
def block_influence(runner: BlockRunner, hidden: torch.Tensor, tick: Callable[[int], None]) -> torch.Tensor:
    """1 − mean cos(input, output) per block, blocks run one after another (dense)."""
    sums = []

    def visit(i: int, inputs: torch.Tensor) -> torch.Tensor:
        out = runner.run(i, inputs)
        cos = torch.nn.functional.cosine_similarity(inputs.to(torch.float32), out.to(torch.float32), dim=-1)
        sums.append(cos.to(torch.float64).sum().item())
        return out

    forward(runner, hidden, visit=visit, on_block=tick)
    tokens = distributed.all_sum_number(hidden.shape[0] * hidden.shape[1])  # every rank's tokens
    return 1.0 - distributed.all_sum(torch.tensor(sums, dtype=torch.float64)) / tokens


def _loss_from(runner: BlockRunner, start: int, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of ``ids`` when blocks ``start``.. run on ``hidden`` (the model's own head)."""
    hidden = forward(runner, hidden, start=start)
    losses = []
    with runner.outside_on_device(head=True):
        for h, chunk in zip(hidden.split(runner.batch_size), ids.split(runner.batch_size), strict=True):
            losses.append(next_token_loss(runner.head(chunk, h).logits, chunk, "sum").item())
    tokens = distributed.all_sum_number(ids.shape[0] * (ids.shape[1] - 1))  # every rank's predicted tokens
    return distributed.all_sum_number(sum(losses)) / tokens


@torch.no_grad()
def skip_loss(runner: BlockRunner, hidden: torch.Tensor, ids: torch.Tensor,
              tick: Callable[[int], None]) -> tuple[torch.Tensor, float]:
    """(loss increase per skipped block, dense loss) on the calibration windows ``ids``."""
    dense = _loss_from(runner, 0, hidden, ids)
    scores = []

    def visit(i: int, inputs: torch.Tensor) -> None:
        scores.append(_loss_from(runner, i + 1, inputs, ids) - dense)  # block i skipped: its input goes on

    forward(runner, hidden, visit=visit, on_block=tick)
    return torch.tensor(scores, dtype=torch.float64), dense


def drop_blocks(model: nn.Module, blocks: nn.ModuleList, drop: list[int]) -> None:
    """Delete blocks ``drop`` from the stack in place, renumber the rest and shrink the config's per-layer lists."""
    total = len(blocks)
    kept = [b for i, b in enumerate(blocks) if i not in set(drop)]
    for new, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    while len(blocks):
        del blocks[len(blocks) - 1]
    for block in kept:
        blocks.append(block)
    config = getattr(model.config, "text_config", None) or model.config
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and not key.startswith("_"):
            setattr(config, key, [v for i, v in enumerate(value) if i not in set(drop)])
    config.num_hidden_layers = len(kept)


def prune_depth(runner: BlockRunner, calib_ids: torch.Tensor, options: BlockOptions, count: int,
                tick: Callable[[int], None]) -> dict:
    """Rank the blocks on the dense model, delete the ``count`` lowest; returns what the report records."""
    hidden = runner.capture(calib_ids)
    extra = {}
    if options.block_score == "influence":
        scores = block_influence(runner, hidden, tick)
    else:
        scores, extra["dense_calibration_loss"] = skip_loss(runner, hidden, calib_ids, tick)
    if not torch.isfinite(scores).all():
        raise RunError(f"non-finite block scores ({options.block_score}); try --dtype float32")
    drop = choose(scores, count).tolist()
    drop_blocks(runner.model, runner.layout.blocks, drop)
    return {"block_score": options.block_score, "block_scores": scores.tolist(), "blocks_removed": drop, **extra}
