"""The choices of ``--recover`` (a stage kind of ``pipeline.stages``): none, or distillation from the dense model."""

from __future__ import annotations

from dataclasses import dataclass

from taylorprune.options import NoOptions, Options, by_name
from taylorprune.recover.distill import RecoverOptions


@dataclass(frozen=True)
class Recover:
    """A recovery after pruning; the recover phase runs it when ``trains``."""

    name: str
    summary: str
    trains: bool
    options: type[Options] = NoOptions


NONE = Recover("none", "no recovery", False)
DISTILL = Recover("distill", "train the pruned model toward the dense one: KL of the next-token distributions",
                  True, RecoverOptions)

RECOVERS: dict[str, Recover] = by_name(
    NONE,
    DISTILL,
)
