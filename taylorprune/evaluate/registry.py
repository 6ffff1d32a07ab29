"""The one registry of evaluators: one line per evaluator module.

``run``, ``eval``, ``sweep`` and ``check`` find evaluators only here: their flags come from each evaluator's
options, the report holds each one's record under its name, and ``check`` gates on any metric they declare.
"""

from __future__ import annotations

from taylorprune.errors import UserError
from taylorprune.evaluate import perplexity, speed, zeroshot
from taylorprune.evaluate.spec import Evaluator


def _index(*evaluators: Evaluator) -> dict[str, Evaluator]:
    out: dict[str, Evaluator] = {}
    for e in evaluators:
        if e.name in out:
            raise TypeError(f"evaluator {e.name!r} registered twice")
        if e.switch is not None and e.switch not in {s.name for s in e.options.specs()}:
            raise TypeError(f"evaluator {e.name}: switch {e.switch!r} is not one of its options")
        out[e.name] = e
    return out


EVALUATORS: dict[str, Evaluator] = _index(
    perplexity.EVALUATOR,
    speed.EVALUATOR,
    zeroshot.EVALUATOR,
)


def get_evaluator(name: str) -> Evaluator:
    if name not in EVALUATORS:
        raise UserError(f"unknown evaluator {name!r}; registered: {', '.join(EVALUATORS)}")
    return EVALUATORS[name]


def evaluator_of(metric: str, records: dict[str, dict]) -> Evaluator | None:
    """The evaluator whose record in ``records`` yields ``metric`` (None: no such metric there)."""
    for name, record in records.items():
        if name in EVALUATORS and metric in EVALUATORS[name].metrics(record):
            return EVALUATORS[name]
    return None
