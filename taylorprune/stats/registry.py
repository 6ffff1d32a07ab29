"""The one registry of statistics: every statistic a method may need, with the source that computes it.

Adding a statistic is one module that declares a ``Source`` plus one line in ``SOURCES``.
"""

from __future__ import annotations

from collections.abc import Iterable

from taylorprune.errors import UserError
from taylorprune.stats import gradients, hooks, hvp, hvp_block
from taylorprune.stats.source import Scope, Source

SOURCES: tuple[Source, ...] = (
    hooks.ACT_NORM_SQ,
    hooks.HESSIAN,
    hooks.DENSE_ACT_NORM_SQ,
    gradients.SOURCE,
    hvp.MODEL_SOURCE,
    hvp_block.BLOCK_SOURCE,
)


def _index(sources: Iterable[Source]) -> dict[str, Source]:
    out: dict[str, Source] = {}
    for source in sources:
        for name in source.outputs:
            if name in out:
                raise TypeError(f"statistic {name!r} declared by {out[name].name} and {source.name}")
            out[name] = source
    return out


STATISTICS: dict[str, Source] = _index(SOURCES)


def source_of(name: str) -> Source:
    if name not in STATISTICS:
        raise UserError(f"unknown statistic {name!r}; known: {', '.join(sorted(STATISTICS))}")
    return STATISTICS[name]


def sources_for(needs: Iterable[str]) -> list[Source]:
    """The sources that compute ``needs``, in registry order."""
    wanted = {source_of(n).name for n in needs}
    return [s for s in SOURCES if s.name in wanted]


def of_scope(needs: Iterable[str], scope: Scope) -> frozenset[str]:
    return frozenset(n for n in needs if source_of(n).scope is scope)
