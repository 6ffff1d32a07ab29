"""Optimal Brain Surgeon reconstruction as SparseGPT performs it.

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", ICML 2023
(arXiv:2301.00774), Algorithm 1: with H = 2XXᵀ/N (fp32), dead inputs (H_jj = 0) neutralised, damping
λ = percdamp · mean(diag H), the upper Cholesky factor U of H⁻¹ gives the OBS quantities row by row. Columns
are processed left to right in blocks of ``blocksize``; inside a block each pruned weight's error
err = w / U_jj is propagated to the remaining columns of the block immediately, and to all later columns
once per block (the lazy batch update).

Two ways to choose what is pruned:
- adaptive (SparseGPT itself): at the start of each block (or every M columns for N:M), prune by the OBS
  saliency w² / U_jj² of the *already updated* weights;
- fixed: the mask comes from another score (``--update obs``, the "ablate" variants in Wanda's code); OBS
  then only reconstructs the kept weights and never changes the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.errors import RunError
from taylorprune.options import option
from taylorprune.prune.masks import Fallback, Pattern, _prune_lowest, build_mask
from taylorprune.prune.swap import SwapOptions, search

DAMP_RETRIES = (1.0, 10.0, 100.0)
MIN_RETRY_DAMP = 1e-4  # retries of an undamped (percdamp 0) Hessian start from this fraction


@dataclass(frozen=True)
class ObsOptions(SwapOptions):
    percdamp: float = option(0.01, "OBS damping λ as a fraction of mean diag(H) (SparseGPT: 0.01).", minimum=0,
                             below=10)
    blocksize: int = option(128, "OBS columns per lazy-update block (SparseGPT: 128).", minimum=1)
    obs_swaps: int = option(0, "After the OBS update, alternate this many times: a swap search on the updated "
                            "weights' exact error (a restored weight at its error-minimising value), then OBS "
                            "again on the new mask (0: plain OBS / SparseGPT as published).", minimum=0, maximum=20)


def obs_swaps(weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, keep: torch.Tensor,
              updated: torch.Tensor, options: ObsOptions, name: str = "") -> torch.Tensor:
    """``options.obs_swaps`` rounds of (swap search on the residual of ``updated`` → OBS on the new mask).

    The swap search takes the mask the update was made for and the updated kept weights; a swap prunes a kept
    weight at its updated value and restores a pruned one at v_j/H_jj, accepted only when the row's exact error
    drops; OBS then re-fits all kept weights of the new mask (from the dense weights), which can only lower
    that error further up to damping. Both steps keep per-row counts and N:M groups.
    """
    for _ in range(options.obs_swaps):
        keep, info, _ = search(weight, hessian, keep, pattern, options.swap_rounds, options.swap_fraction,
                               values=updated, restore="optimal")
        if not info.swaps:
            break
        updated, _, _ = obs_prune(weight, hessian, pattern, keep=keep, percdamp=options.percdamp,
                                  blocksize=options.blocksize, name=name)
    return updated


class CholeskyFailed(RunError):
    """H stayed indefinite with damping ×100 (``obs_prune`` turns it into a ``Fallback``: plain masking)."""


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹; escalate λ ×10, ×100 when H is not positive definite.

    An undamped request (``percdamp`` 0) that fails is retried from ``MIN_RETRY_DAMP`` upwards.
    """
    diag_mean = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt, factor in enumerate(DAMP_RETRIES):
        fraction = percdamp * factor if percdamp > 0 or attempt == 0 else MIN_RETRY_DAMP * factor
        damp = fraction * diag_mean
        try:
            lower = torch.linalg.cholesky(hessian + damp * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True), float(fraction)
        except torch.linalg.LinAlgError:
            continue
    raise CholeskyFailed(f"{name}: Hessian not positive definite even with damping ×100")


def _adaptive_block_mask(w1: torch.Tensor, d: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """SparseGPT's unstructured choice for one block: lowest w²/d² over the whole block (pruned = True)."""
    saliency = w1.pow(2) / d.pow(2).unsqueeze(0)
    k = int(saliency.numel() * pattern.sparsity)
    return ~_prune_lowest(saliency.reshape(1, -1), k).reshape(saliency.shape)


def obs_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: Pattern,
    keep: torch.Tensor | None = None,
    percdamp: float = 0.01,
    blocksize: int = 128,
    name: str = "",
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Return (pruned and reconstructed weight fp32, saliency used for the choice, info).

    ``keep`` given: fixed mask (only reconstruction). Otherwise SparseGPT's adaptive mask for ``pattern``.
    """
    W = weight.detach().to(torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    if keep is None:
        W[:, dead] = 0  # inputs that never fire: the weight is irrelevant, SparseGPT zeroes it
    try:
        U, damp = inverse_hessian_factor(H, percdamp, name)
    except CholeskyFailed as exc:
        score = weight.detach().to(torch.float32).abs() if keep is None else None
        mask = build_mask(score, pattern, name) if keep is None else keep.to(W.device)
        raise Fallback(f"{exc}; fell back to masking without weight update (by |W| for a solver method)",
                       weight.detach().to(torch.float32) * mask, score) from None
    pruned = torch.zeros_like(W, dtype=torch.bool) if keep is None else ~keep.to(W.device)
    if pattern.is_nm:  # N:M groups must not straddle two blocks
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    saliency = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        if keep is None and not pattern.is_nm:
            pruned[:, i1:i2] = _adaptive_block_mask(W1, d, pattern)
            saliency[:, i1:i2] = W1.pow(2) / d.pow(2).unsqueeze(0)
        for i in range(i2 - i1):
            col = i1 + i
            if keep is None and pattern.is_nm and col % pattern.m == 0:
                span = slice(i, min(i + pattern.m, i2 - i1))
                sal = W1[:, span].pow(2) / d[span].pow(2).unsqueeze(0)
                saliency[:, i1 + span.start : i1 + span.stop] = sal
                width = sal.shape[1]
                pruned[:, i1 + span.start : i1 + span.stop] = ~_prune_lowest(sal, max(0, width - pattern.n))
            w = W1[:, i]
            q = torch.where(pruned[:, col], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[pruned] = 0
    return W, saliency, {"percdamp_used": damp, "dead_inputs": int(dead.sum()), "keep": ~pruned}
