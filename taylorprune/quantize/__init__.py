"""Weight quantization core (issue #36): grids, round-to-nearest, GPTQ and joint SparseGPT + GPTQ.

Every quantizer returns a ``QuantizedWeight`` (dequantized values plus codes, grid and group map) so exports can
store exactly what the error feedback used. The stage and exports that use these live elsewhere.
"""

from taylorprune.quantize.gptq import GptqOptions, gptq, obs_quantize
from taylorprune.quantize.grid import Grid, GridSpec, compute_grid, holds_zero
from taylorprune.quantize.joint import sparse_gptq
from taylorprune.quantize.result import QuantizedWeight
from taylorprune.quantize.rtn import rtn
from taylorprune.quantize.search import search_grid

__all__ = ["GptqOptions", "Grid", "GridSpec", "QuantizedWeight", "compute_grid", "gptq", "holds_zero",
           "obs_quantize", "rtn", "search_grid", "sparse_gptq"]
