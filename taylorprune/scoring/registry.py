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


@dataclass(frozen=True)
class Method:
    """A registered importance score: larger scores are kept."""

    name: str
    score: ScoreFn
    needs: frozenset[str] = field(default_factory=frozenset)
    summary: str = ""
    paper: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, needs: tuple[str, ...] = (), summary: str = "", paper: str = ""):
    """Decorator: register ``fn(weight_fp32, stats, options) -> scores`` under ``name``."""

    def wrap(fn: ScoreFn) -> ScoreFn:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = Method(name, fn, frozenset(needs), summary, paper)
        return fn

    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"--method {name}: unknown; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]
