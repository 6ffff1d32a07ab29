"""GPTQ: the OBS loop of SparseGPT (``prune/obs.py``) with "round to the grid" as the column operator.

Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv:2210.17323), Algorithm 1 with lazy batch updates: H = 2XXᵀ/N (given), dead inputs
(H_jj = 0) get H_jj = 1 and a zero weight column, damping λ = percdamp·mean(diag H), U = upper Cholesky factor of
(H + λI)⁻¹; per column q = Q(w), err = (w − q)/U_jj, the rest of the block gets −err·U[j, j:], later blocks get the
block's errors at once (``blocksize`` columns).

Grids (``GridSpec``): per channel, or groups of 32/64/128 input columns,
- static groups (default): every group's grid from the original weight before the loop. llm-compressor's
  ``GPTQModifier`` always works this way (its observer computes the qparams before ``quantize_weight`` runs) and
  GPTQ's ``--static-groups`` does the same; with activation order the groups stay contiguous in the original
  column order, so checkpoints need no ``g_idx`` and GGUF blocks (contiguous by definition) can hold them;
- dynamic groups: a group's grid is computed when the loop reaches its first column, from the weights as updated
  so far. GPTQ's reference code reads ``W[:, i:i+g]``, i.e. the weights as of the *block* start (in-block updates
  live in a copy), which equals this only when groups start at block starts (g = blocksize = 128); we use the
  fully updated weights, which makes the result independent of ``blocksize`` (it is rounded up to a multiple of
  the group size so a group never straddles two blocks). With activation order, dynamic groups are contiguous in
  the *permuted* order: ``group_index`` then plays GPTQ's ``g_idx`` (llm-compressor deprecated that mode).

A grid may also be given (``grid=``): ``--observer mse|imatrix`` searches each group's scale before the loop
(``quantize.search``: the minimum squared rounding error of the starting weights, weighted by diag(H) for imatrix),
which fixes the grids like static groups. With dynamic groups the same search runs when the loop reaches a group
(``importance=``), on the weights as updated so far: error feedback moves the weights away from those a scale was
searched for (on SmolLM2 as Q4_0 in llama.cpp this measured worse than the static search, docs/bench_gguf.md,
so it stays an option). llm-compressor's counterpart is its ``mse`` observer (the min-max range shrunk by 1% steps
down to 80%, unweighted Σ|w − q|^2.4, stopping after 5 steps without gain); GPTQ's reference has only min-max.

Activation order (default on, llm-compressor's ``actorder="static"``): columns in descending diag(H) (stable sort,
so ties keep their order), un-permuted at the end. A fixed mask ``keep`` makes this quantization sparsity-aware:
a masked weight's code is the zero point (value exactly 0) and its error is propagated like a rounding error, so
kept weights compensate (llm-compressor had this as ``W_nz_mask`` until 0.13.0). Other differences to GPTQ and
llm-compressor: scales are rounded to their stored dtype before use (both use fp32 / model-dtype scales inside the
loop), grids are computed after the dead-input zeroing (matters for dead columns only), and a Hessian that is not
positive definite is retried with damping ×10 and ×100 (``inverse_hessian_factor``) before falling back to RTN
(llm-compressor falls back to RTN at once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from taylorprune.errors import UserError
from taylorprune.options import Options, option
from taylorprune.prune.obs import CholeskyFailed, inverse_hessian_factor
from taylorprune.quantize.grid import (
    Grid,
    GridSpec,
    column_groups,
    compute_dtype,
    compute_grid,
    dequantize,
    group_params,
    quantize,
    require_zero,
)
from taylorprune.quantize.result import QuantizedWeight
from taylorprune.quantize.search import search_grid

# (column in block, updated block weights, diag of U's block, pruned flags of the block): may set pruned flags
Chooser = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class GptqOptions(Options):
    percdamp: float = option(0.01, "OBS damping λ as a fraction of mean diag(H) (SparseGPT: 0.01).", minimum=0,
                             below=10)
    blocksize: int = option(128, "OBS columns per lazy-update block (SparseGPT: 128).", minimum=1)
    act_order: bool = option(True, "GPTQ: quantize columns in descending diag(H) (llm-compressor's default "
                             "actorder=static; GPTQ's --act-order).")
    static_groups: bool = option(True, "GPTQ: grids of all groups from the original weights before the loop "
                                 "(llm-compressor always; off: each group's grid from the updated weights when the "
                                 "loop reaches it, GPTQ's default).")


def aligned_blocksize(blocksize: int, *units: int) -> int:
    """``blocksize`` rounded down to a multiple of every unit (at least one of their lcm)."""
    step = math.lcm(*units) if units else 1
    return max(step, blocksize - blocksize % step)


def _static_grid(W: torch.Tensor, spec: GridSpec, grid: Grid | None, groups: int, name: str) -> Grid:
    if grid is None:
        return compute_grid(W, spec, name)
    if grid.scale.shape != (W.shape[0], groups):
        where = f"{name}: " if name else ""
        raise UserError(f"{where}a given grid has shape {tuple(grid.scale.shape)}, expected {(W.shape[0], groups)}")
    return grid


def _group_grid(x: torch.Tensor, spec: GridSpec, importance: torch.Tensor | None, name: str) -> Grid:
    """One group's grid [rows, 1] for dynamic groups: min-max, or the weighted search over its columns."""
    if importance is None:
        return group_params(x, spec)
    found = search_grid(x, replace(spec, group_size=x.shape[1]), importance, name=name)
    return Grid(found.scale[:, 0], None if found.zero is None else found.zero[:, 0],
                None if found.minimum is None else found.minimum[:, 0])


def _factor(H: torch.Tensor, percdamp: float, name: str) -> tuple[torch.Tensor, dict]:
    """U of (H + λI)⁻¹, or the identity (plain RTN, llm-compressor's fallback) when H stays indefinite."""
    try:
        U, damp = inverse_hessian_factor(H, percdamp, name)
        return U, {"percdamp_used": damp}
    except CholeskyFailed as exc:
        eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        return eye, {"fallback": f"{exc}; quantized by round-to-nearest instead"}


def obs_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, options: GptqOptions,
                 keep: torch.Tensor | None = None, chooser: Chooser | None = None, grid: Grid | None = None,
                 mask_unit: int = 1, name: str = "", importance: torch.Tensor | None = None) -> QuantizedWeight:
    """The shared loop: GPTQ, GPTQ under a fixed mask, or (with ``chooser``) SparseGPT + GPTQ jointly.

    ``chooser`` is called before every column with the block's updated weights and may mark entries of the block
    as pruned (``joint.py``); ``mask_unit`` (N:M's M) keeps its spans inside one block. ``grid``: a precomputed
    static grid (e.g. from the weighted search), which forces static groups. ``importance`` [in]: with dynamic
    groups, each group's grid is searched (``search.search_grid``) with these per-input weights instead of min-max.
    """
    cdtype = compute_dtype(weight, hessian)
    W = weight.detach().to(cdtype).clone()
    H = hessian.detach().to(device=W.device, dtype=cdtype).clone()
    rows, cols = W.shape
    groups = spec.groups(cols, name)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    masking = keep is not None or chooser is not None
    if masking:
        require_zero(spec, name)
    if keep is not None:
        pruned = ~keep.to(device=W.device, dtype=torch.bool)
        W[pruned] = 0
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = options.static_groups or spec.group_size == -1 or grid is not None
    g = cols if spec.group_size == -1 else spec.group_size
    if static:
        grid = _static_grid(W, spec, grid, groups, name)
        scale, offset = grid.scale.clone(), grid.offset.clone()
    else:
        scale = torch.zeros(rows, groups, dtype=spec.stored_dtype, device=W.device)
        offset = torch.zeros(rows, groups, dtype=torch.uint8 if spec.symmetric or spec.zero_point == "integer"
                             else spec.stored_dtype, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if options.act_order else None
    position_group = column_groups(cols, spec, W.device)  # group of the column at each loop position
    if importance is not None:
        importance = importance.to(device=W.device, dtype=cdtype)
    if perm is not None:
        W, H, pruned = W[:, perm], H[perm][:, perm], pruned[:, perm]
        importance = None if importance is None else importance[perm]
        if static:
            position_group = position_group[perm]
    U, info = _factor(H, options.percdamp, name)
    blocksize = aligned_blocksize(options.blocksize, *([] if static else [g]), mask_unit)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    group_at = position_group.tolist()  # one host copy instead of a device sync per column
    loss = torch.zeros((), dtype=cdtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, P1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2], pruned[:, i1:i2]
        d = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if chooser is not None:
                chooser(i, W1, d, P1)
            gid = group_at[col]
            if not static and col % g == 0:
                span = slice(i, i + g)
                fresh = _group_grid(torch.where(P1[:, span], torch.zeros_like(W1[:, span]), W1[:, span]), spec,
                                    None if importance is None else importance[col:col + g], name)
                scale[:, gid], offset[:, gid] = fresh.scale, fresh.offset
            w = W1[:, i]
            c = quantize(w, scale[:, gid], offset[:, gid], spec)
            if masking:  # grids that hold 0 only: the zero-point code's value is exactly 0
                c = torch.where(P1[:, i], offset[:, gid], c)
            q = dequantize(c, scale[:, gid], offset[:, gid], spec, cdtype)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
            codes[:, col] = c
            loss += err.pow(2).sum() / 2
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    group_index = position_group
    if perm is not None:
        inv = torch.argsort(perm)
        W, codes, pruned, group_index = W[:, inv], codes[:, inv], pruned[:, inv], position_group[inv]
    info.update(dead_inputs=int(dead.sum()), loss=float(loss), blocksize_used=blocksize,
                static_groups=static, keep=~pruned)
    zero = offset if spec.symmetric or spec.zero_point == "integer" else None
    minimum = None if zero is not None else offset
    return QuantizedWeight(W, codes, Grid(scale, zero, minimum), group_index, perm, info)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: GridSpec, options: GptqOptions | None = None,
         keep: torch.Tensor | None = None, grid: Grid | None = None, name: str = "",
         importance: torch.Tensor | None = None) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] with Hessian ``hessian`` [in, in] (already 2XXᵀ/N).

    ``keep``: optional fixed pruning mask (bool [out, in]); masked weights end exactly at 0, kept weights on the
    grid, and the grid must hold 0 (else a one-line ``UserError``). Returns values, codes, grid, group index and
    the act-order permutation (``QuantizedWeight``). ``importance``: per-input weights of each dynamic group's
    grid search (ignored with static groups, whose grid is given).
    """
    return obs_quantize(weight, hessian, spec, options or GptqOptions(), keep=keep, grid=grid, name=name,
                        importance=importance)
