"""SparseGPT: OBS pruning with adaptive masks and lazy batch updates.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023,
arXiv:2301.00774. H = 2XXᵀ/N in fp32, damping ``--percdamp`` (0.01) × mean diag, blocks of ``--blocksize``
(128); the algorithm itself lives in ``prune.obs`` and is shared with ``--update obs``.

``--obs-swaps N`` (default 0, SparseGPT as published) is our extension: after SparseGPT, N rounds of a swap search
on the updated weights' exact layer error followed by an OBS re-fit of the new mask (``prune.obs.obs_swaps``).

Structured (``--structure neurons|heads``): the structured OBS of ZipLM (Kurtic, Frantar, Alistarh, NeurIPS
2023) and SlimGPT (Ling et al., NeurIPS 2024) on the consumer of the removed channels (down_proj, o_proj): a
group costs tr(W_G·((H⁻¹)_GG)⁻¹·W_Gᵀ), the error left after removing it and refitting the other columns
optimally; groups are ranked once per block (SlimGPT removes them greedily, updating H⁻¹ in between) and the
refit is the structure stage's compensation (``--compensate``, least squares over the whole removed set).
"""

from __future__ import annotations

import torch

from taylorprune.prune.masks import Pattern
from taylorprune.prune.obs import ObsOptions, obs_prune, obs_swaps
from taylorprune.prune.structures import Groups
from taylorprune.scoring.groups import fixed
from taylorprune.scoring.spec import GroupScore, Method


def solve(weight: torch.Tensor, stats, pattern: Pattern, options: ObsOptions, name: str = ""):
    """Prune column block by column block, choosing by OBS saliency on the already-updated weights."""
    new, saliency, info = obs_prune(weight, stats["hessian"], pattern, percdamp=options.percdamp,
                                    blocksize=options.blocksize, name=name)
    return obs_swaps(weight, stats["hessian"], pattern, info["keep"], new, options, name), saliency


def obs_cost(groups: Groups, hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The consumer's reconstruction error left after removing one group's inputs *and* refitting the other
    columns optimally (structured OBS, Kurtic et al. ZipLM 2023, Ling et al. SlimGPT 2024):
    tr(W_G·((H⁻¹)_GG)⁻¹·W_Gᵀ), H = 2XXᵀ/N damped by ``percdamp`` × its mean diagonal."""
    c = groups.consumer
    w = c.module.weight.detach().to(torch.float64)
    h = hessian.to(w.device, torch.float64)
    h = h + percdamp * torch.diagonal(h).mean().clamp_min(1e-12) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                              device=h.device)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    out = torch.empty(groups.size, dtype=torch.float64)
    for g, cols in enumerate(c.index):
        cols = cols.to(w.device)
        wg = w[:, cols]
        out[g] = (torch.linalg.solve(hinv[cols][:, cols], wg.T) * wg.T).sum().cpu()
    return out


GROUP = GroupScore("tr(W_G·((H⁻¹)_GG)⁻¹·W_Gᵀ): structured OBS cost on the consumer (down_proj / o_proj), the error "
                   "left after removing the group and refitting the other inputs (ZipLM, SlimGPT), H = 2XXᵀ/N",
                   score=lambda groups, stats, options: obs_cost(groups, stats[groups.consumer.path]["hessian"],
                                                                 options.percdamp),
                   statistics=frozenset({"hessian"}))

METHOD = Method("sparsegpt", "OBS with adaptive masks, w²/[H⁻¹]²_jj (updates weights)",
                "Frantar & Alistarh, arXiv:2301.00774", statistics=("hessian",), options=ObsOptions, solve=solve,
                structured=fixed(GROUP))
