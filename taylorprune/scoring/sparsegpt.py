"""SparseGPT: OBS pruning with adaptive masks and lazy batch updates.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
arXiv:2301.00774. H = 2XXᵀ/N in fp32, damping ``--percdamp`` (0.01) × mean diag, blocks of ``--blocksize``
(128); the algorithm itself lives in ``prune.obs`` and is shared with ``--update obs``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taylorprune.prune.masks import Pattern
from taylorprune.prune.obs import obs_prune
from taylorprune.scoring.registry import register


@register(
    "sparsegpt",
    needs=("hessian",),
    summary="OBS with adaptive masks, w²/[H⁻¹]²_jj (updates weights)",
    paper="Frantar & Alistarh, arXiv:2301.00774",
    solver=True,
)
def sparsegpt(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], pattern: Pattern,
              options: Mapping[str, object], name: str = ""):
    """Prune column block by column block, choosing by OBS saliency on the already-updated weights."""
    new, saliency, _ = obs_prune(weight, stats["hessian"], pattern, percdamp=float(options.get("percdamp", 0.01)),
                                 blocksize=int(options.get("blocksize", 128)), name=name)
    return new, saliency
