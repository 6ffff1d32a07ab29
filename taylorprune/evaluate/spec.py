"""What an evaluator declares about itself, in its own module (as a method does in ``scoring.spec``).

An ``Evaluator`` measures a model in memory and returns a record (JSON-ready) that goes into the report under
its name. It declares its typed options (which become flags of ``run``, ``sweep`` and ``eval``; ``switch`` names
the boolean option that turns it on), a cheap ``prepare`` run before any heavy work (tokenizing the evaluation
text fails now, not after an hour of pruning), the ``metrics`` its record yields (what ``check`` gates on and the
sweep tabulates and plots), whether higher or lower is better, and the record fields two results must share to
be comparable (``settings``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from taylorprune.modeling.placement import Placement
from taylorprune.options import NoOptions, Options

Tick = Callable[[int], None]


@dataclass
class EvalContext:
    """The model under evaluation and what an evaluator may use: where it lives (``placement``: None means
    wherever it is, moved to ``device`` whole), windows per block sweep, progress callbacks, and ``baseline``,
    which loads the dense source model on demand (for comparisons such as speed)."""

    model: nn.Module
    tokenizer: Any
    name: str
    device: torch.device
    placement: Placement | None = None
    stream_batch: int = 16
    batch_size: int = 1
    progress: Callable[[str, int], Tick] = lambda name, total: (lambda i: None)
    on_window: Callable[[int, int], None] | None = None
    baseline: Callable[[], nn.Module] | None = None
    events: list[str] = field(default_factory=list)

    @property
    def config(self):
        return self.model.config


Prepare = Callable[[EvalContext, Options], Any]
Run = Callable[[EvalContext, Options, Any], dict]


@dataclass(frozen=True)
class Evaluator:
    """A registered evaluator: ``run(context, options, prepared) -> record``."""

    name: str
    summary: str
    run: Run
    metrics: Callable[[dict], dict[str, float]]
    options: type[Options] = NoOptions
    switch: str | None = None  # the bool option that turns it on (None: on whenever its options are given)
    prepare: Prepare | None = None
    check: Callable[[Options, Any], None] | None = None  # (options, model config): before any weight is loaded
    working_bytes: Callable[[Options, Any], int] | None = None  # device memory beside the weights (placement)
    higher_is_better: bool = False
    settings: tuple[str, ...] = ()
    label: str = ""  # what the progress line says while it runs
    rows: Callable[[dict], list[tuple[str, str]]] = lambda record: []  # (what, value) lines of a run's summary
    # True: ``run`` shards its windows over the ranks of a data-parallel run and sums what they measured; False:
    # only rank 0 runs it (the others skip it)
    sharded: bool = False

    def enabled(self, options: Options) -> bool:
        return bool(getattr(options, self.switch)) if self.switch else True

    def comparable(self, a: dict, b: dict) -> list[str]:
        """'field: a vs b' for every setting the two records both have and do not share."""
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in self.settings if k in a and k in b and a[k] != b[k]]
