"""One block sweep for every pass: the decoder blocks visit the compute device one after another.

Every pass that goes block by block (perplexity, depth scores, gradients, HVPs, statistics hooks, the
layer-by-layer and the structured engines, reconstruction) is ``block_sweep``: for each block in order (or in
reverse), the block is on the device for the duration of a ``step`` that carries some state from block to
block; the block visited next is prefetched meanwhile. ``forward`` is the common case: hidden states carried
through the blocks, with an optional ``visit`` (statistics, pruning) while each block is on the device.

The loss and the autograd switches the passes share live here too: ``next_token_loss`` (the causal-LM loss
every pass computes from logits) and ``trainable`` (weights that take gradients for the duration).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F

from taylorprune.modeling.blocks import BlockRunner

Carry = TypeVar("Carry")
Tick = Callable[[int], None]


def block_sweep(runner: BlockRunner, carry: Carry, step: Callable[[int, Carry], Carry], *,
                blocks: Sequence[int] | None = None, reverse: bool = False, write: bool = True,
                on_block: Tick | None = None) -> Carry:
    """``carry = step(i, carry)`` for every block ``i`` (``blocks``, default all; ``reverse``: last first), each
    with block ``i`` on the device and the next one's copy under way. ``write``: the steps change weights (copied
    back to CPU memory when streamed)."""
    order = list(range(len(runner.layout.blocks)) if blocks is None else blocks)
    if reverse:
        order.reverse()
    for k, i in enumerate(order):
        after = order[k + 1] if k + 1 < len(order) else None
        with runner.on_device(i, write=write, prefetch=after):
            carry = step(i, carry)
        if on_block is not None:
            on_block(i)
    return carry


def forward(runner: BlockRunner, hidden: torch.Tensor | None, *, start: int = 0, stop: int | None = None,
            visit: Callable[[int, torch.Tensor | None], torch.Tensor | None] | None = None, write: bool = True,
            last: bool = True, on_block: Tick | None = None) -> torch.Tensor | None:
    """``hidden`` through blocks ``start`` .. ``stop - 1``; returns the last block's output (``hidden`` None: the
    blocks are only visited, for work that needs no activations).

    ``visit(i, inputs)`` runs while block ``i`` is on the device, before its forward: it may change the block
    (pruning) and may return the block's output when it computed it anyway (else the block runs once more).
    ``last`` False: the final block is visited but not run (its output would not be used).
    """
    stop = len(runner.layout.blocks) if stop is None else stop

    def step(i: int, h: torch.Tensor | None) -> torch.Tensor | None:
        out = visit(i, h) if visit is not None else None
        if h is None:
            return None
        if out is None and (last or i < stop - 1):
            out = runner.run(i, h)
        return h if out is None else out

    return block_sweep(runner, hidden, step, blocks=range(start, stop), write=write, on_block=on_block)


def in_sweeps(count: int, per_sweep: int) -> Iterator[slice]:
    """Consecutive slices of ``count`` windows, ``per_sweep`` at a time (one block-by-block sweep each)."""
    for start in range(0, count, max(1, per_sweep)):
        yield slice(start, min(count, start + max(1, per_sweep)))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits (fp32) against the next token of ``ids``: transformers' causal-LM
    loss with labels = inputs, the quantity perplexity, gradients and HVPs are taken of."""
    shifted = logits[:, :-1].to(torch.float32)
    target = ids[:, 1:].to(shifted.device)
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1), reduction=reduction)


@contextlib.contextmanager
def trainable(params: Iterable[torch.nn.Parameter]) -> Iterator[list[torch.nn.Parameter]]:
    """``params`` take gradients for the duration; afterwards they are frozen again and hold no ``.grad``."""
    params = list(params)
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
