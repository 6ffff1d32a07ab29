"""Importance-weighted scale search for round-to-nearest, in the spirit of llama.cpp's imatrix quantization.

Plain min-max grids spend resolution on the largest weight of a group whatever its input's energy. With per-input
importance a_j (diag(XXᵀ), i.e. llama.cpp's imatrix ``in_sum2`` or diag(H)/2), a smaller scale that clips a
rarely-active extreme can lower the layer's output error. For every group we try a few scales and keep the one
with the lowest weighted squared error Σ_j a_j (w_j − Q(w_j))², Q being round-to-nearest on that grid.

Candidates: the min-max scale s₀ times h/(h + 0.1·k) for k = −steps..steps (h = maxq/2), the spacing llama.cpp
uses in ``make_qx_quants`` (iscale = (nmax + 0.1·is)/max, is = −9..9); and for each candidate, optionally, its
least-squares refit s* = Σ a·(w − c)·l / Σ a·l² for the codes l it produced (c = m for the float kind, else 0).
Every candidate is rounded to the stored dtype and its codes re-rounded to nearest before it is scored, and the
min-max grid itself is one of the candidates, so the result never has a higher weighted error than min-max RTN.

How this differs from llama.cpp (``ggml-quants.c``):
- llama.cpp weights each element by imatrix_j · sqrt(σ² + w_j²) (σ² = mean square of the row); we use the given
  importance as is, and ``element_weights(..., llama_cpp=True)`` builds llama.cpp's form when wanted;
- llama.cpp keeps the codes of the best candidate and stores the refit scale without re-rounding, and compares
  candidates by its closed-form objective; we re-round so the codes are always RTN on the final stored grid (what
  GPTQ and dequantization assume);
- Q4_0/Q5_0 put the signed extreme on the −2^(b−1) side (d may be negative); our symmetric grid is
  compressed-tensors' (positive scale, extreme at ±(2^b − 1)/2 steps);
- Q4_1/K-quants (``make_qkx2/3_quants``) fit scale and minimum jointly and iteratively; for the float-minimum kind
  we search the scale only, m stays the group minimum; integer zero points are recomputed from each scale;
- Q8_0 ignores the imatrix; we do not special-case 8 bits.
"""

from __future__ import annotations

import torch

from taylorprune.quantize.grid import (
    Grid,
    GridSpec,
    compute_dtype,
    dequantize,
    grouped,
    minmax,
    params_from,
    quantize,
)

STEPS = 9  # llama.cpp's is = −9..9


def element_weights(weight: torch.Tensor, importance: torch.Tensor, llama_cpp: bool = False) -> torch.Tensor:
    """Per-element weights [out, in] from per-input importance [in] (or already [out, in]).

    ``llama_cpp``: multiply by sqrt(σ² + w²) with σ² the row's mean square, as ``quantize_row_q4_0_impl`` does.
    """
    w = weight.to(compute_dtype(weight))
    out = importance.to(w.dtype).expand_as(w) if importance.dim() == 1 else importance.to(w.dtype)
    if llama_cpp:
        sigma2 = w.pow(2).mean(dim=1, keepdim=True)
        out = out * torch.sqrt(sigma2 + w.pow(2))
    return out


def _error(x: torch.Tensor, a: torch.Tensor, grid: Grid, spec: GridSpec) -> torch.Tensor:
    """Weighted squared error per group (x, a: [out, groups, width]; grid: [out, groups])."""
    scale, offset = grid.scale.unsqueeze(-1), grid.offset.unsqueeze(-1)
    values = dequantize(quantize(x, scale, offset, spec), scale, offset, spec, x.dtype)
    return (a * (x - values).pow(2)).sum(dim=-1)


def _refit(x: torch.Tensor, a: torch.Tensor, grid: Grid, spec: GridSpec, xmin: torch.Tensor) -> Grid:
    """Least-squares scale for the codes ``grid`` gives, keeping its zero point (or minimum)."""
    scale, offset = grid.scale.unsqueeze(-1), grid.offset.unsqueeze(-1)
    codes = quantize(x, scale, offset, spec).to(x.dtype)
    if grid.zero is not None:
        levels, base = codes - offset.to(x.dtype), torch.zeros_like(x)
    else:
        levels, base = codes, offset.to(x.dtype).expand_as(x)
    num = (a * (x - base) * levels).sum(dim=-1)
    den = (a * levels.pow(2)).sum(dim=-1)
    fitted = torch.where((den > 0) & (num > 0), num / den.clamp(min=torch.finfo(x.dtype).tiny), grid.scale.to(x.dtype))
    if grid.zero is not None:
        stored = params_from(fitted, xmin, spec)  # rounds the scale; keep the candidate's zero point below
        return Grid(stored.scale, grid.zero, None)
    return Grid(params_from(fitted, xmin, spec).scale, None, grid.minimum)


def _take(best: Grid, other: Grid, better: torch.Tensor) -> Grid:
    def pick(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.where(better, b, a)

    return Grid(pick(best.scale, other.scale), pick(best.zero, other.zero), pick(best.minimum, other.minimum))


def search_grid(weight: torch.Tensor, spec: GridSpec, importance: torch.Tensor, steps: int = STEPS,
                refit: bool = True, llama_cpp: bool = False, name: str = "") -> Grid:
    """Grid [out, groups] minimising Σ a·(w − Q(w))² per group over the candidates described in the module doc.

    ``importance``: per input column [in] (diag of XXᵀ) or per element [out, in]; ``steps`` = 0 gives min-max.
    """
    a = grouped(element_weights(weight, importance, llama_cpp), spec, name)
    x = grouped(weight.to(a.dtype), spec, name)
    raw, xmin = minmax(x, spec)
    best = params_from(raw, xmin, spec)
    best_err = _error(x, a, best, spec)
    half = spec.maxq / 2
    for k in range(-steps, steps + 1):
        candidate = best if k == 0 else params_from(raw * (half / (half + 0.1 * k)), xmin, spec)
        tries = [candidate] if k else []
        if refit:
            tries.append(_refit(x, a, candidate, spec, xmin))
        for grid in tries:
            err = _error(x, a, grid, spec)
            better = err < best_err
            best, best_err = _take(best, grid, better), torch.where(better, err, best_err)
    return best
