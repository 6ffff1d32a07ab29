"""SparseGPT and GPTQ in one pass: choose the mask by OBS saliency and quantize the kept weights, column by column.

SparseGPT's own driver does this (``opt.py --sparsity .5 --wbits 4``): inside its column loop the pruned entries
of a column are set to 0 and the column is then rounded to the grid, and the combined error is propagated. Doing
both in one loop lets the later columns compensate the rounding *and* the pruning of the earlier ones, which is
the sparsity-first order that arXiv:2405.20935 recommends, without a second pass.
"""

from __future__ import annotations

import torch

from taylorprune.errors import UserError
from taylorprune.prune.masks import Pattern, _prune_lowest
from taylorprune.prune.obs import _adaptive_block_mask
from taylorprune.quantize.gptq import Chooser, GptqOptions, obs_quantize
from taylorprune.quantize.grid import GridSpec
from taylorprune.quantize.result import QuantizedWeight


def saliency_chooser(pattern: Pattern) -> Chooser:
    """SparseGPT's adaptive mask choice as a column hook of the OBS loop (the same choice as ``obs_prune``).

    Unstructured: at the first column of each block, prune the lowest w²/U_jj² of the updated block weights
    (``_adaptive_block_mask``: exactly ⌊sparsity·entries⌋ per block). N:M: every M columns, each row prunes its
    M − N lowest of those columns.
    """

    def choose(i: int, W1: torch.Tensor, d: torch.Tensor, pruned: torch.Tensor) -> None:
        if not pattern.is_nm:
            if i == 0:
                pruned[:] = _adaptive_block_mask(W1, d, pattern)
            return
        if i % pattern.m == 0:
            span = slice(i, min(i + pattern.m, W1.shape[1]))
            saliency = W1[:, span].pow(2) / d[span].pow(2).unsqueeze(0)
            pruned[:, span] = ~_prune_lowest(saliency, max(0, saliency.shape[1] - pattern.n))

    return choose


def sparse_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, pattern: Pattern,
                options: GptqOptions | None = None, name: str = "") -> QuantizedWeight:
    """Prune ``weight`` to ``pattern`` and quantize it to ``spec`` in one OBS pass (SparseGPT's joint mode).

    Per column: the block's mask is (re)chosen from the *updated* weights by w²/U_jj², pruned entries take the
    zero-point code (value exactly 0), kept ones are rounded to the grid, and the column's error (pruning and
    rounding together) is propagated with GPTQ's lazy block updates. ``info["keep"]`` is the chosen mask.

    Differences from SparseGPT's released joint mode (``sparsegpt.py`` + ``opt.py``):
    - grid: SparseGPT uses one asymmetric per-row grid (``perchannel=True, sym=False``) computed from the dense
      weight before the loop, with fp32 scales; here any ``GridSpec`` (groups, symmetric), scales rounded to their
      stored dtype, static groups from the dense weight (like SparseGPT) or dynamic groups from the updated weights
      with this block's already-pruned entries counted as 0;
    - mask size: SparseGPT thresholds at the sorted saliency at index ⌊sparsity·entries⌋ with ``<=``, pruning one
      entry more (plus ties); here exactly ⌊sparsity·entries⌋ per block (stable sort), as ``obs_prune`` does;
    - pruned entries: SparseGPT zeroes them and rounds the 0 (its integer zero point maps 0 to 0); here they take
      the zero-point code directly: the same value, and grids without an exact 0 are refused;
    - activation order is available for unstructured masks (SparseGPT has none; default off here too) and refused
      for N:M, whose groups are consecutive columns in the original order;
    - an indefinite Hessian is retried with more damping and then falls back to RTN with magnitude-chosen masks
      (U = I); SparseGPT stops with an error.
    """
    options = options or GptqOptions(act_order=False)
    if pattern.is_nm and options.act_order:
        where = f"{name}: " if name else ""
        raise UserError(f"{where}N:M pruning with GPTQ needs --act-order off (N:M groups are consecutive input "
                        "columns in the original order)")
    return obs_quantize(weight, hessian, spec, options, chooser=saliency_chooser(pattern),
                        mask_unit=pattern.m if pattern.is_nm else 1, name=name)
