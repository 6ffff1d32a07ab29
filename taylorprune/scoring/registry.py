"""The one registry of pruning methods; the CLI lists and finds methods only through it.

A method declares the statistics it needs (names from ``scoring.stats``); the engine collects exactly those
and hands them to ``score``. No method-specific code lives in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from taylorprune.errors import UserError

ScoreFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, object]], torch.Tensor]
# A solver chooses the mask and the new weights together (SparseGPT): (weight, stats, pattern, options, name)
# -> (new weight fp32 with zeros, scores it chose by).
SolverFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Method:
    """A registered importance score: larger scores are kept."""

    name: str
    score: ScoreFn
    needs: frozenset[str] = field(default_factory=frozenset)
    summary: str = ""
    paper: str = ""
    solver: SolverFn | None = None
    dynamic_needs: Callable[[Mapping[str, object]], frozenset[str]] | None = None

    def needs_for(self, options: Mapping[str, object]) -> frozenset[str]:
        """Statistics for these options (OBA's scope decides between model- and block-scope HVPs)."""
        return self.dynamic_needs(options) if self.dynamic_needs else self.needs


METHODS: dict[str, Method] = {}


def register(name: str, needs: tuple[str, ...] = (), summary: str = "", paper: str = "", solver: bool = False,
             dynamic_needs: Callable[[Mapping[str, object]], frozenset[str]] | None = None):
    """Decorator: register ``fn(weight_fp32, stats, options) -> scores`` under ``name``.

    With ``solver=True`` the function is a ``SolverFn`` that picks mask and weights itself.
    """

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        score = _solver_only if solver else fn
        METHODS[name] = Method(name, score, frozenset(needs), summary, paper, fn if solver else None, dynamic_needs)
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method {name}: unknown; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _solver_only(weight, stats, options):
    raise TypeError("this method chooses its mask while updating weights; call its solver")
