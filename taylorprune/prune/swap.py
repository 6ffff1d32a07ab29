"""Mask refinement by swap search on each linear's exact reconstruction error.

For one linear with weights W (rows × cols), keep-mask M and pruned set S = 1 − M, removing the pruned weights
changes the layer output by −(W⊙S)·X; its squared error summed over calibration tokens is, row by row,

    e_r = u_r · H · u_rᵀ,   u = W⊙S,   H = XXᵀ (SparseGPT's statistic, any positive scale).

This quadratic is exact, so the change of e_r when one weight is pruned or restored is an exact Hessian-vector
product of the removal (OBA's idea, on the objective where the quadratic model has no error). With V = U·H,
d = diag H and

    c = W⊙V + ½·d⊙W² − S⊙d⊙W²

pruning kept weight i changes e_r by 2c_i, restoring pruned weight j by −2c_j, and swapping them by
2c_i − 2c_j − 2·w_i·w_j·H_ij (exact). Each round, every row pairs its cheapest kept weights with its costliest
pruned ones (``swap_fraction`` of the columns), sorts the pairs by their exact single-swap gain, and takes
the prefix of that list whose exact joint change (interactions included) lowers the row's error most; a row
where no prefix helps takes its single best pair if that pair alone lowers the error. Rounds stop after
``swap_rounds`` or when no row changes; only rows that changed in a round are searched in the next (an
unchanged row would propose the same swaps again). Swaps exchange one kept and one pruned weight of the same
row (for N:M, of the same group of M columns), so per-row sparsity and N:M patterns hold exactly, and no row's
error ever rises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.options import Options, option
from taylorprune.prune.masks import Pattern

GRID = 32  # at most this many cheapest kept × costliest pruned per row are tried as single swaps


@dataclass(frozen=True)
class SwapOptions(Options):
    swap_rounds: int = option(10, "Swap-search rounds at most (each: one proposal per row, exact check).",
                              minimum=1, maximum=1000)
    swap_fraction: float = option(0.02, "Pairs proposed per row and round, as a fraction of the row's columns.",
                                  above=0, maximum=0.5)


@dataclass
class SwapInfo:
    rounds: int
    swaps: int
    error_before: float
    error_after: float


def row_errors(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """e_r = (w⊙s)_r · H · (w⊙s)_rᵀ for every row (fp32)."""
    u = weight * pruned
    return ((u @ hessian) * u).sum(1)


def _take_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x[r, idx[r, ...]] for every row r (a flat gather: advanced indexing is far slower on large index sets)."""
    return x.gather(1, idx.reshape(idx.shape[0], -1)).view(idx.shape)


def _swap_gain(c: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, i: torch.Tensor,
               j: torch.Tensor) -> torch.Tensor:
    """Exact change of a row's error when kept ``i`` and pruned ``j`` swap: 2c_i − 2c_j − 2·a_i·b_j·H_ij."""
    h = torch.take(H, i * H.shape[1] + j)
    return 2 * (_take_rows(c, i) - _take_rows(c, j)) - 2 * _take_rows(A, i) * _take_rows(B, j) * h


def _pairs(c: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, pruned: torch.Tensor,
           pattern: Pattern, k: int):
    """The ``k`` proposed swaps of every row as (kept i, pruned j, exact gain; inf where there is no pair).

    Unstructured: the k cheapest kept weights paired in order with the k costliest pruned ones. N:M: in each
    group of M columns its cheapest kept and costliest pruned weight; the k groups whose pair gains most to
    first order.
    """
    inf = torch.tensor(float("inf"), dtype=c.dtype, device=c.device)
    if not pattern.is_nm:
        k = min(k, c.shape[1])
        ci, i = torch.topk(torch.where(pruned, inf, c), k, dim=1, largest=False)
        cj, j = torch.topk(torch.where(pruned, c, -inf), k, dim=1, largest=True)
        ok = torch.isfinite(ci) & torch.isfinite(cj)
    else:
        rows, cols, m = c.shape[0], c.shape[1], pattern.m
        groups = (cols - cols % m) // m
        cg, pg = c[:, : groups * m].reshape(rows, groups, m), pruned[:, : groups * m].reshape(rows, groups, m)
        ci, ii = torch.where(pg, inf, cg).min(dim=2)
        cj, jj = torch.where(pg, cg, -inf).max(dim=2)
        first, g = torch.topk(ci - cj, min(k, groups), dim=1, largest=False)
        i, j = g * m + ii.gather(1, g), g * m + jj.gather(1, g)
        ok = torch.isfinite(first)
    return i, j, torch.where(ok, _swap_gain(c, A, B, H, i, j), inf)


def _best_single(c: torch.Tensor, A: torch.Tensor, B: torch.Tensor, H: torch.Tensor, i, j, gain):
    """Each row's best single swap (i, j, exact gain) over the combinations of the kept and the pruned weights of
    its first ``GRID`` proposals."""
    g = min(i.shape[1], GRID)
    gi, gj, ok = i[:, :g], j[:, :g], torch.isfinite(gain[:, :g])
    grid = _swap_gain(c, A, B, H, gi.unsqueeze(2).expand(-1, -1, g), gj.unsqueeze(1).expand(-1, g, -1))
    grid = torch.where(ok.unsqueeze(2) & ok.unsqueeze(1), grid, float("inf")).flatten(1)
    value, best = grid.min(dim=1)
    return gi.gather(1, (best // g)[:, None]), gj.gather(1, (best % g)[:, None]), value


def _change(A: torch.Tensor, B: torch.Tensor, i: torch.Tensor, j: torch.Tensor, use: torch.Tensor):
    """The change of the residual U as (columns, values) per row: +a_i where i is pruned, −b_j where j is
    restored."""
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    cols = torch.cat([i, j], dim=1)
    vals = torch.cat([torch.where(use, A.gather(1, i), zero), torch.where(use, -B.gather(1, j), zero)], dim=1)
    return cols, vals


def _product(shape, H: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """ΔU·H for a ΔU with few entries per row (a sparse product: a dense one would cost a full matmul)."""
    rows = torch.arange(shape[0], device=H.device).unsqueeze(1).expand_as(cols)
    keep = vals != 0
    delta = torch.sparse_coo_tensor(torch.stack([rows[keep], cols[keep]]), vals[keep], shape,
                                    check_invariants=False)
    return torch.sparse.mm(delta, H)


def _prefix_changes(H: torch.Tensor, V: torch.Tensor, A: torch.Tensor, B: torch.Tensor, i: torch.Tensor,
                    j: torch.Tensor, valid: torch.Tensor, budget: int = 1 << 22) -> torch.Tensor:
    """Exact change of each row's error for every prefix of its swap list: (rows, pairs), column s − 1 for the
    first s pairs (invalid pairs left out).

    A prefix changes the residual by δ (+a_i at its kept columns i, −b_j at its pruned columns j), and the error
    by 2δ·v + δ·H·δ; the quadratic part of every prefix is a 2-D cumulative sum of the pairs' interaction terms,
    built from H's entries at the rows' columns, in chunks of rows of at most ``budget`` entries.
    """
    di = torch.where(valid, A.gather(1, i), 0.0)
    dj = torch.where(valid, -B.gather(1, j), 0.0)
    linear = (2 * (di * V.gather(1, i) + dj * V.gather(1, j))).cumsum(1)
    k, n = i.shape[1], H.shape[1]
    quad = torch.empty_like(linear)
    step = max(1, budget // max(1, 4 * k * k))

    def block(x, y):  # H[x_t, y_t'] for every row: (rows, pairs, pairs)
        return torch.take(H, x.unsqueeze(2) * n + y.unsqueeze(1))

    for r in range(0, i.shape[0], step):
        ci, cj, ai, aj = i[r: r + step], j[r: r + step], di[r: r + step], dj[r: r + step]
        terms = (ai.unsqueeze(2) * ai.unsqueeze(1) * block(ci, ci) + 2 * ai.unsqueeze(2) * aj.unsqueeze(1) *
                 block(ci, cj) + aj.unsqueeze(2) * aj.unsqueeze(1) * block(cj, cj))
        quad[r: r + step] = terms.cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)
    return linear + quad


def _apply(pruned: torch.Tensor, i: torch.Tensor, j: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """``pruned`` with kept i → pruned and pruned j → kept where ``use``."""
    out = pruned.clone()
    rows = torch.arange(pruned.shape[0], device=pruned.device).unsqueeze(1).expand_as(i)
    out[rows[use], i[use]] = True
    out[rows[use], j[use]] = False
    return out


def swap_refine(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, pattern: Pattern,
                rounds: int = 10, fraction: float = 0.02) -> tuple[torch.Tensor, SwapInfo]:
    """A keep-mask with the same per-row (and per-group) counts as ``keep`` and no row error higher."""
    new, info, _ = search(weight, hessian, keep, pattern, rounds, fraction)
    return new, info


def search(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, pattern: Pattern, rounds: int = 10,
           fraction: float = 0.02, values: torch.Tensor | None = None,
           restore: str = "dense") -> tuple[torch.Tensor, SwapInfo, torch.Tensor]:
    """The swap search on the residual U = W − A⊙keep: (keep, info, A).

    ``values`` A holds the kept weights' current values (default: W itself, no update yet). A pruned weight is
    pruned by its value a_i; a restored weight j gets b_j: its dense value (``restore`` dense) or, after an
    update, the value that alone minimises the row's error, v_j/H_jj (``optimal``). Costs generalise to
    c = A⊙V + ½·d⊙A² for kept and B⊙V − ½·d⊙B² for pruned weights (V = U·H), a swap changing the row's error by
    2c_i − 2c_j − 2·a_i·b_j·H_ij; A is returned with the restored weights' values.
    """
    W = weight.to(torch.float32)
    H = hessian.to(device=W.device, dtype=torch.float32)
    d = torch.diagonal(H)
    A = W.clone() if values is None else values.to(device=W.device, dtype=torch.float32).clone()
    if pattern.is_nm and any(int(r) != pattern.n for r in keep[:, : W.shape[1] - W.shape[1] % pattern.m]
                             .reshape(W.shape[0], -1, pattern.m).sum(2).unique()):
        return keep, SwapInfo(0, 0, 0.0, 0.0), A  # groups not exactly N:M (dead columns): leave the mask alone
    pruned = ~keep.to(W.device)
    U = W - A * ~pruned
    V = U @ H
    err = (U * V).sum(1)
    before = float(err.sum())
    k = max(1, int(round(fraction * W.shape[1])))
    total, done = 0, 0
    active = torch.arange(W.shape[0], device=W.device)
    for step in range(1, rounds + 1):
        # a row that took no swap is unchanged, and would propose (and reject) the same swaps again: only the
        # rows that changed in the last round are searched
        rows = _Rows(W[active], A[active], V[active], pruned[active], err[active])
        changed, swaps = _round(rows, H, d, pattern, k, restore)
        if not changed.any():
            break
        A[active], V[active], pruned[active], err[active] = rows.A, rows.V, rows.pruned, rows.err
        active = active[changed]
        total += swaps
        done = step
    return ~pruned, SwapInfo(done, total, before, float(err.sum())), A


@dataclass
class _Rows:
    """The swap search's state on a subset of rows: weights, kept values, V = U·H, pruned set, row errors."""

    W: torch.Tensor
    A: torch.Tensor
    V: torch.Tensor
    pruned: torch.Tensor
    err: torch.Tensor


EPS = 1e-6  # relative: a swap must lower the row's error by more than fp32 round-off to be taken


def _round(s: _Rows, H: torch.Tensor, d: torch.Tensor, pattern: Pattern, k: int, restore: str):
    """One round of swaps on the rows of ``s`` (updated in place): (rows that changed, swaps taken)."""
    W, A, V, pruned, err = s.W, s.A, s.V, s.pruned, s.err
    B = W if restore == "dense" else torch.where(d > 0, V / d.clamp_min(torch.finfo(W.dtype).tiny), 0.0)
    E = torch.where(pruned, B, A)  # c = E⊙V ± ½·d⊙E² (+ kept, − pruned), in three passes over the rows
    c = E * (V + torch.where(pruned, -0.5 * d, 0.5 * d) * E)
    i, j, gain = _pairs(c, A, B, H, pruned, pattern, k)
    gain, order = gain.sort(dim=1)  # most helpful single swaps first
    i, j = i.gather(1, order), j.gather(1, order)
    tol = EPS * err.abs().clamp_min(torch.finfo(torch.float32).tiny)
    valid = gain < -tol[:, None]
    # each row takes the prefix of its sorted swaps (valid ones: the gains are sorted) that lowers its exact
    # error most
    prefix = _prefix_changes(H, V, A, B, i, j, valid)  # exact change of the error for every prefix length
    best, length = prefix.min(dim=1)
    ok = valid[:, 0] & (best < -tol)
    taken = valid & (torch.arange(i.shape[1], device=i.device) <= length[:, None]) & ok[:, None]
    change = torch.where(ok, best, 0.0)
    si, sj = torch.zeros_like(i[:, :1]), torch.zeros_like(j[:, :1])
    single = torch.zeros_like(valid[:, :1])
    open_rows = (~taken.any(1)).nonzero().flatten()
    if open_rows.numel() and not pattern.is_nm:  # the best single swap among cheapest × costliest pairs
        bi, bj, bg = _best_single(c[open_rows], A[open_rows], B[open_rows], H, i[open_rows], j[open_rows],
                                  gain[open_rows])
        ok = bg < -tol[open_rows]
        rows = open_rows[ok]
        si[rows], sj[rows], single[rows] = bi[ok], bj[ok], True
        change[rows] = bg[ok]
    # V = U·H follows the accepted changes: one sparse product for the round
    cols, vals = _change(A, B, torch.cat([i, si], 1), torch.cat([j, sj], 1), torch.cat([taken, single], 1))
    V += _product(V.shape, H, cols, vals)
    s.A = _restore_values(_restore_values(A, B, j, taken), B, sj, single)
    s.pruned = _apply(_apply(pruned, i, j, taken), si, sj, single)
    s.err = err + change
    return taken.any(1) | single[:, 0], int(taken.sum() + single.sum())


def _restore_values(A: torch.Tensor, B: torch.Tensor, j: torch.Tensor, use: torch.Tensor) -> torch.Tensor:
    """A with the restored weights ``j`` (where ``use``) at their restore values."""
    rows = torch.arange(A.shape[0], device=A.device).unsqueeze(1).expand_as(j)
    out = A.clone()
    out[rows[use], j[use]] = B[rows[use], j[use]]
    return out
