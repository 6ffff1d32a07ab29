"""How a family of statistics is computed: its scope, its options and its cache.

Scopes (where in a run the statistic is computed):

- ``linear``: a forward hook on a target's inputs while its (already upstream-pruned) block runs on the
  calibration windows inside the layer-by-layer engine (activation norms, XXᵀ);
- ``block``: a function of one whole block and its calibration inputs, inside the engine (block-scope HVPs);
- ``model``: one pass over the dense model before the engine starts (gradients, model-scope HVPs).

Statistics computed by the same pass share one ``Source`` (and one cache file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
from torch import nn

from taylorprune.modeling.layout import Layout
from taylorprune.modeling.placement import Placement
from taylorprune.options import NoOptions, Options

Stats = dict[str, dict[str, torch.Tensor]]  # {target path: {statistic: tensor}}


class Scope(str, Enum):
    LINEAR = "linear"
    BLOCK = "block"
    MODEL = "model"


class Accumulator(Protocol):
    """Folds a linear's inputs batch by batch; ``reduce`` sums what it holds over the ranks of a data-parallel
    run (every rank calls it, in the same order) before ``result``."""

    def add(self, x: torch.Tensor) -> None: ...

    def reduce(self) -> None: ...

    def result(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class Source:
    """One way of computing ``outputs``.

    - ``accumulator(linear)`` (linear scope): folds each batch of the linear's inputs; one output;
    - ``compute`` (block scope): ``(runner, block index, inputs, targets, options) -> Stats``;
    - ``compute`` (model scope): ``(ModelContext, wanted outputs, options) -> Stats``.
    ``cache_option`` names the option that holds a cache file for these statistics (None: never cached);
    ``cache_together`` are outputs computed together whenever one of them is and a cache file is written, so
    the file serves the sibling statistics later (GBLM's l1 and l2 reductions); ``revision`` is part of every
    cache identity, so a file written before a change of meaning is refused instead of misread.
    """

    name: str
    scope: Scope
    outputs: tuple[str, ...]
    summary: str
    options: type[Options] = NoOptions
    accumulator: Callable[[nn.Linear], Accumulator] | None = None
    compute: Callable[..., Stats] | None = None
    cache_option: str | None = None
    cache_together: tuple[str, ...] = ()
    revision: int = 1  # raised when what a cache file holds changes meaning (a renamed statistic)

    def __post_init__(self) -> None:
        linear = self.scope is Scope.LINEAR
        if linear != (self.accumulator is not None) or linear == (self.compute is not None):
            raise TypeError(f"statistic source {self.name}: linear scope takes an accumulator, others compute")
        if linear and len(self.outputs) != 1:
            raise TypeError(f"statistic source {self.name}: an accumulator yields one statistic")


@dataclass
class ModelContext:
    """What a model-scope pass may use: the dense model, its targets, the calibration windows, progress, and where
    the weights live (``placement``; None: wherever they are, the whole-model passes move them to ``device``).

    ``stream_batch``: calibration windows per block-by-block sweep (each block visits the device once per sweep
    and direction); ``batch_size``: windows per forward call inside a sweep.
    """

    model: nn.Module
    layout: Layout
    calib_ids: torch.Tensor
    device: torch.device
    progress: Callable[[str, int], Callable[[int], None]] = lambda name, total: (lambda i: None)
    events: list[str] | None = None
    placement: Placement | None = None
    stream_batch: int = 16
    batch_size: int = 1

    def event(self, name: str) -> None:
        if self.events is not None:
            self.events.append(name)

    def blockwise(self, extra_bytes: int) -> bool:
        """Whether a pass goes block by block: the weights are streamed, or the whole model plus the pass's own
        ``extra_bytes`` would not fit on the device next to each other."""
        return self.placement is not None and not self.placement.fits(extra_bytes)
