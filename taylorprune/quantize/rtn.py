"""Round-to-nearest quantization of one weight: the baseline GPTQ is measured against, and llama.cpp's quantizer.

Without importance this is llm-compressor's ``QuantizationModifier`` / GPTQ's RTN baseline: a min-max grid per
group, every weight rounded independently. With importance (diag(XXᵀ)) the grid comes from the weighted scale
search in ``search.py`` (llama.cpp's imatrix idea); the rounding itself stays nearest.

A pruning mask ``keep`` is honoured exactly: masked weights get the zero-point code, whose value is scale·0 = 0,
and the grid is computed from the kept weights only (masked entries count as the 0 they become). Grids that
cannot store 0 are refused.
"""

from __future__ import annotations

import torch

from taylorprune.quantize.grid import (
    GridSpec,
    column_groups,
    compute_dtype,
    compute_grid,
    dequantize_weight,
    quantize_weight,
    require_zero,
)
from taylorprune.quantize.result import QuantizedWeight
from taylorprune.quantize.search import search_grid


def rtn(weight: torch.Tensor, spec: GridSpec, importance: torch.Tensor | None = None,
        keep: torch.Tensor | None = None, name: str = "", **search: object) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] to nearest on ``spec``'s grid.

    ``importance``: per input column [in] or per element; turns on the weighted scale search (``search`` passes
    its ``steps``/``refit``/``llama_cpp`` options). ``keep``: bool [out, in]; False entries end exactly at 0.
    """
    W = weight.detach().to(compute_dtype(weight))
    if keep is not None:
        require_zero(spec, name)
        keep = keep.to(device=W.device, dtype=torch.bool)
        W = torch.where(keep, W, torch.zeros_like(W))
    if importance is None:
        grid = compute_grid(W, spec, name)
    else:
        grid = search_grid(W, spec, importance.to(W.device), name=name, **search)
    group_index = column_groups(W.shape[1], spec, W.device)
    codes = quantize_weight(W, grid, spec, group_index)
    if keep is not None:
        codes = torch.where(keep, codes, grid.zero[:, group_index])
    values = dequantize_weight(codes, grid, spec, group_index, W.dtype)
    info = {"method": "rtn", "importance": importance is not None}
    return QuantizedWeight(values, codes, grid, group_index, None, info)
