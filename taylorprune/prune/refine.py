"""Mask refinements between masking and the weight update (``--refine``); ``swap`` is the exact swap search of
``prune.swap`` on each linear's reconstruction error (XXᵀ).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taylorprune.options import NoOptions, Options, by_name
from taylorprune.prune.masks import Pattern
from taylorprune.prune.swap import SwapOptions, swap_refine

RefineFn = Callable[[torch.Tensor, torch.Tensor, Pattern, Mapping[str, torch.Tensor], Options],
                    tuple[torch.Tensor, dict]]


@dataclass(frozen=True)
class Refine:
    """A mask refinement between masking and the weight update.

    ``apply(weight fp32, keep, pattern, stats, options) -> (new keep, what it did for the report)``.
    """

    name: str
    summary: str
    apply: RefineFn
    needs: frozenset[str] = frozenset()
    options: type[Options] = NoOptions


def _swap(weight, keep, pattern, stats, options: SwapOptions):
    new, info = swap_refine(weight, stats["hessian"], keep, pattern, options.swap_rounds, options.swap_fraction)
    return new, {"rounds": info.rounds, "swaps": info.swaps, "error_before": info.error_before,
                 "error_after": info.error_after}


NONE = Refine("none", "keep the mask as scored", lambda weight, keep, pattern, stats, options: (keep, {}))
SWAP = Refine("swap", "swap search on the exact layer reconstruction error (needs XXᵀ)", _swap, frozenset({"hessian"}),
              SwapOptions)

REFINES: dict[str, Refine] = by_name(
    NONE,
    SWAP,
)
