"""Weight updates applied after a mask is chosen; ``--update`` picks one for any scoring method.

- ``none``: zero the pruned weights, keep the others (Wanda, magnitude, GBLM as published).
- ``obs``: keep the mask and reconstruct the kept weights with SparseGPT's OBS updates (``prune.obs``), the
  "ablate" variants of Wanda's code; needs the layer Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from taylorprune.errors import UserError
from taylorprune.prune.masks import Pattern
from taylorprune.prune.obs import obs_prune


@dataclass(frozen=True)
class Update:
    name: str
    needs: frozenset[str]
    apply: Callable[[torch.Tensor, torch.Tensor, Pattern, Mapping[str, torch.Tensor], Mapping, str], torch.Tensor]


def _none(weight, keep, pattern, stats, options, name):
    return weight * keep


def _obs(weight, keep, pattern, stats, options, name):
    new, _, _ = obs_prune(weight, stats["hessian"], pattern, keep=keep, percdamp=float(options.get("percdamp", 0.01)),
                          blocksize=int(options.get("blocksize", 128)), name=name)
    return new


UPDATES: dict[str, Update] = {
    "none": Update("none", frozenset(), _none),
    "obs": Update("obs", frozenset({"hessian"}), _obs),
}


def get_update(name: str) -> Update:
    if name not in UPDATES:
        raise UserError(f"--update {name}: choose one of {', '.join(UPDATES)}")
    return UPDATES[name]
