"""SparseGPT: OBS pruning with adaptive masks and lazy batch updates.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
arXiv:2301.00774. H = 2XXᵀ/N in fp32, damping ``--percdamp`` (0.01) × mean diag, blocks of ``--blocksize``
(128); the algorithm itself lives in ``prune.obs`` and is shared with ``--update obs``.

``--obs-swaps N`` (default 0, SparseGPT as published) is our extension: after SparseGPT, N rounds of a swap search
on the updated weights' exact layer error followed by an OBS re-fit of the new mask (``prune.obs.obs_swaps``).
"""

from __future__ import annotations

import torch

from taylorprune.prune.masks import Pattern
from taylorprune.prune.obs import ObsOptions, obs_prune, obs_swaps
from taylorprune.scoring.spec import Method


def solve(weight: torch.Tensor, stats, pattern: Pattern, options: ObsOptions, name: str = ""):
    """Prune column block by column block, choosing by OBS saliency on the already-updated weights."""
    new, saliency, info = obs_prune(weight, stats["hessian"], pattern, percdamp=options.percdamp,
                                    blocksize=options.blocksize, name=name)
    return obs_swaps(weight, stats["hessian"], pattern, info["keep"], new, options, name), saliency


METHOD = Method("sparsegpt", "OBS with adaptive masks, w²/[H⁻¹]²_jj (updates weights)",
                "Frantar & Alistarh, arXiv:2301.00774", statistics=("hessian",), options=ObsOptions, solve=solve)
