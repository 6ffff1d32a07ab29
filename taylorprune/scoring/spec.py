"""What a pruning method declares about itself, in its own module.

A ``Method`` is everything the rest of taylorprune knows about it: its typed options (defaults, help,
validation), the statistics it needs (possibly depending on its options), how it scores a weight matrix
(or, for a solver such as SparseGPT, how it picks the mask and new weights together), a one-line summary and
its paper. The CLI flags, ``--option`` parsing, ``taylorprune methods``, cache identities, the sweep and the
report are all derived from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taylorprune.options import NoOptions, Options
from taylorprune.prune.masks import Pattern
from taylorprune.prune.structures import Groups
from taylorprune.stats.source import ModelContext

# (weight fp32, {statistic: tensor}, options) -> scores, larger = more important (kept)
ScoreFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Options], torch.Tensor]
# (weight fp32, stats, pattern, options, module path) -> (new weight fp32 with zeros, scores it chose by)
SolveFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Pattern, Options, str],
                   tuple[torch.Tensor, torch.Tensor]]
# Prunes the whole model's targets in place (global ranking, multi-step schedules); returns {path: fp32 scores}.
ModelPruneFn = Callable[[ModelContext, Pattern, Options], dict[str, torch.Tensor]]
# (one block's groups of one kind, {target path: {statistic: tensor}}, options) -> one score per group (kept: high)
GroupFn = Callable[[Groups, Mapping[str, Mapping[str, torch.Tensor]], Options], torch.Tensor]
# Chooses the removed groups of every block before any is removed (global schedules with recomputation):
# (context, {kind: per-block count}, {kind: groups of each block}, options) -> {(kind, block): dropped indices}
GroupSelectFn = Callable[..., dict[tuple[str, int], torch.Tensor]]


@dataclass(frozen=True)
class GroupScore:
    """How a method scores whole structures (``--structure``): ``summary`` says exactly what is computed;
    ``score`` gives one value per group of a block (lowest removed, within the block), ``statistics`` are what it
    reads. ``select`` instead picks the removed groups of all blocks itself (multi-step, on the whole model)."""

    summary: str
    score: GroupFn | None = None
    statistics: frozenset[str] = frozenset()
    select: GroupSelectFn | None = None


@dataclass(frozen=True)
class Method:
    """A registered pruning method.

    ``statistics`` lists every statistic the method may need; ``select`` picks those a given set of options
    needs (default: all of them). ``stages`` gives the stage values the method runs with when the run does not
    give them (``{"refine": "swap"}``).
    ``prune_model`` returns, for options that ask for it, a function that prunes the whole model itself instead
    of the layer-by-layer engine (global ranking across layers, schedules with recomputation). ``structured``
    returns how the method scores whole structures (neurons, heads) for ``--structure``.
    """

    name: str
    summary: str
    paper: str
    statistics: tuple[str, ...] = ()
    options: type[Options] = NoOptions
    score: ScoreFn | None = None
    solve: SolveFn | None = None
    select: Callable[[Options], frozenset[str]] | None = None
    stages: Callable[[Options], dict[str, str]] | None = None
    prune_model: Callable[[Options], ModelPruneFn | None] | None = None
    structured: Callable[[Options], GroupScore] | None = None

    def __post_init__(self) -> None:
        if (self.score is None) == (self.solve is None):
            raise TypeError(f"method {self.name}: give exactly one of score and solve")

    @property
    def updates_weights(self) -> bool:
        """A solver chooses mask and new weights itself, so ``--update`` does not apply."""
        return self.solve is not None

    def whole_model(self, options: Options) -> ModelPruneFn | None:
        return self.prune_model(options) if self.prune_model else None

    def default_stage(self, kind: str, options: Options) -> str | None:
        """The method's own value for stage ``kind`` with these options (None: the kind's default)."""
        return (self.stages(options) if self.stages else {}).get(kind)

    def group_score(self, options: Options) -> GroupScore | None:
        """The structured score for these options, None when the method has none."""
        return self.structured(options) if self.structured else None

    def needs(self, options: Options) -> frozenset[str]:
        chosen = self.select(options) if self.select else frozenset(self.statistics)
        extra = chosen - set(self.statistics)
        if extra:
            raise TypeError(f"method {self.name} selected undeclared statistics {sorted(extra)}")
        return chosen
