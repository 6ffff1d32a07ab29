"""Group scores built from a per-weight term reduced over each structure's weights (``prune.structures``).

A method declares ``structured=`` with ``per_weight(summary, term, reduce, statistics)``: ``term`` gives a value
per weight of every member linear (the method's own score, or a signed term), ``reduce`` is ``sum`` (Σ over
the group), ``abs-sum`` (|Σ|) or ``l2`` (sqrt Σ²), see ``prune.structures.groups.reduce_groups``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from taylorprune.prune.structures import Groups, reduce_groups
from taylorprune.scoring.spec import GroupScore, ScoreFn


def per_weight(summary: str, term: ScoreFn, reduce: str, statistics: frozenset[str] = frozenset()) -> GroupScore:
    """A group score Σ/|Σ|/‖·‖ over the group's weights of ``term(weight, stats, options)``."""

    def score(groups: Groups, stats, options) -> torch.Tensor:
        elements = {}
        for m in groups.members:
            weight = m.module.weight.detach().to(torch.float32)
            elements[m.path] = term(weight, stats.get(m.path, {}), options)
        return reduce_groups(groups, elements, reduce)

    return GroupScore(summary, score=score, statistics=frozenset(statistics))


def fixed(group: GroupScore) -> Callable[[object], GroupScore]:
    """``structured=`` for a method whose group score does not depend on its options."""
    return lambda options: group
