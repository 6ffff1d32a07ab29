"""Optimise kept weights under fixed masks: the loop shared by block reconstruction and recovery.

The weights' zeros are the mask: the gradient of a pruned weight is zeroed before every step and the mask
re-applied after it, so unstructured and N:M patterns hold exactly whatever the optimiser does (masks as a
constraint of the loop, as torchao's parametrizations keep them). Batches are drawn by a seeded generator, so a
run repeats exactly; a held-out loss is evaluated every ``eval_every`` steps and at the end, the weights with the
lowest one are kept, and the loop stops after ``patience`` evaluations without improvement.

Data-parallel: every rank draws the same global batch; each computes the loss of the items it holds (its
``share``), weighted by their part of the batch, and the gradients are summed over the ranks before the step, so
every rank takes the step one process would take on the whole batch (held-out losses are summed by the caller).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.modeling.sweep import trainable

EVAL_EVERY = 10


@dataclass(frozen=True)
class FitSettings:
    """How long and how the kept weights are optimised."""

    steps: int
    batch: int
    patience: int
    eval_every: int = EVAL_EVERY
    clip: float | None = None  # gradient-norm clipping (None: off)
    epochs: bool = False  # batches walk seeded permutations (each item once a pass) instead of independent draws


def batches(train_size: int, batch: int, generator: torch.Generator, epochs: bool) -> Iterator[torch.Tensor]:
    """Seeded batches of indices: independent draws without replacement within a batch, or, with ``epochs``,
    consecutive slices of one permutation after another, so every item is seen once before any is seen twice
    (a batch may straddle two passes)."""
    while not epochs:
        yield torch.randperm(train_size, generator=generator)[:batch]
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch:
            order = torch.cat([order, torch.randperm(train_size, generator=generator)])
        yield order[:batch]
        order = order[batch:]


# What a fit of some linears trains, while the context lasts: (tensors, their masks; None: free). ``plain``: the
# weights themselves, masked by their zeros; ``quantize.train.on_grid`` keeps quantized linears on their grid.
Trainer = Callable[[list[nn.Linear]], AbstractContextManager[tuple[list[torch.Tensor], list[torch.Tensor | None]]]]


@contextlib.contextmanager
def plain(linears: list[nn.Linear]) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor | None]]]:
    """The linears' weights, each masked by its zeros."""
    yield [lin.weight for lin in linears], [lin.weight.detach() != 0 for lin in linears]


Optimizer = Callable[[list[torch.nn.Parameter]], tuple[torch.optim.Optimizer, object | None]]


def masked_fit(weights: list[torch.nn.Parameter], train_loss: Callable[[torch.Tensor], torch.Tensor],
               heldout_loss: Callable[[], float], train_size: int, settings: FitSettings, optimizer: Optimizer,
               generator: torch.Generator, masks: list[torch.Tensor | None] | None = None,
               on_step: Callable[[int], None] | None = None, share: range | None = None) -> dict:
    """Fit ``weights`` (their zeros fixed) to ``train_loss(batch indices)``; returns steps and held-out losses
    (before, best, and the (step, loss) curve of every evaluation, which shows whether training had settled).

    ``optimizer(weights)`` gives (optimiser, learning-rate scheduler or None); batches are ``settings.batch``
    indices of ``train_size`` training items (``batches``). ``masks`` overrides the masks
    read from the zeros (None for a weight that is free everywhere: adapters that start at zero). ``share``: the
    training items this rank holds in a data-parallel run; ``train_loss`` then gets positions within the share.
    """
    masks = [w.detach() != 0 for w in weights] if masks is None else masks
    with trainable(weights):
        opt, schedule = optimizer(weights)
        with torch.no_grad():
            first = best = heldout_loss()
        best_state = [w.detach().clone() for w in weights]
        bad, step, curve = 0, 0, [(0, first)]
        draws = batches(train_size, settings.batch, generator, settings.epochs)
        for step in range(1, settings.steps + 1):
            pick = next(draws)
            opt.zero_grad(set_to_none=True)
            _backward(weights, train_loss, pick, share)
            _mask([w.grad for w in weights], masks)
            if settings.clip is not None:
                torch.nn.utils.clip_grad_norm_(weights, settings.clip)
            opt.step()
            if schedule is not None:
                schedule.step()
            with torch.no_grad():
                _mask(weights, masks)
            if on_step is not None:
                on_step(step)
            if step % settings.eval_every and step != settings.steps:
                continue
            with torch.no_grad():
                now = heldout_loss()
            curve.append((step, now))
            if now < best:
                best, bad = now, 0
                best_state = [w.detach().clone() for w in weights]
            else:
                bad += 1
                if bad >= settings.patience:
                    break
        with torch.no_grad():
            for w, b in zip(weights, best_state, strict=True):
                w.copy_(b)
    return {"steps": step, "heldout_before": first, "heldout_after": best, "heldout_curve": curve}


def _mask(tensors: list[torch.Tensor | None], masks: list[torch.Tensor | None]) -> None:
    """Zero the pruned entries of ``tensors`` (weights or their gradients) in one foreach call: a per-tensor
    loop is a kernel launch per weight, twice a step."""
    pairs = [(t, m) for t, m in zip(tensors, masks, strict=True) if t is not None and m is not None]
    if pairs:
        torch._foreach_mul_([t for t, _ in pairs], [m for _, m in pairs])


def _backward(weights: list[torch.nn.Parameter], train_loss: Callable[[torch.Tensor], torch.Tensor],
              pick: torch.Tensor, share: range | None) -> None:
    """Gradients of the batch ``pick``'s mean loss: of the whole batch in one process; of this rank's items,
    weighted by their part of the batch and summed over the ranks, in a data-parallel run."""
    if share is None:
        train_loss(pick).backward()
        return
    local = [g - share.start for g in pick.tolist() if g in share]
    if local:
        (train_loss(torch.tensor(local)) * (len(local) / len(pick))).backward()
    for w in weights:
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        distributed.all_sum(w.grad)
