"""Weight updates applied after a mask is chosen; ``--update`` picks one for any scoring method.

- ``none``: zero the pruned weights, keep the others (Wanda, magnitude, GBLM as published).
- ``obs``: keep the mask and reconstruct the kept weights with SparseGPT's OBS updates (``prune.obs``), the
  "ablate" variants of Wanda's code; needs the layer Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taylorprune.options import NoOptions, Options, by_name
from taylorprune.prune.masks import Pattern
from taylorprune.prune.obs import ObsOptions, obs_prune, obs_swaps

ApplyFn = Callable[[torch.Tensor, torch.Tensor, Pattern, Mapping[str, torch.Tensor], Options, str], torch.Tensor]


@dataclass(frozen=True)
class Update:
    """A weight update: ``apply(weight fp32, keep mask, pattern, stats, options, name) -> new weight``."""

    name: str
    summary: str
    apply: ApplyFn
    needs: frozenset[str] = frozenset()
    options: type[Options] = NoOptions


def _none(weight, keep, pattern, stats, options, name):
    return weight * keep


def _obs(weight, keep, pattern, stats, options: ObsOptions, name):
    new, _, _ = obs_prune(weight, stats["hessian"], pattern, keep=keep, percdamp=options.percdamp,
                          blocksize=options.blocksize, name=name)
    return obs_swaps(weight, stats["hessian"], pattern, keep, new, options, name)


NONE = Update("none", "zero the pruned weights", _none)
OBS = Update("obs", "reconstruct kept weights with SparseGPT's OBS (mask fixed)", _obs, frozenset({"hessian"}),
             ObsOptions)

UPDATES: dict[str, Update] = by_name(
    NONE,
    OBS,
)
