"""What every quantizer returns: the dequantized weight together with what a checkpoint stores.

Keeping codes, grid and column→group map side by side lets exports pack exactly the values the error feedback
used, and lets tests check that each value is scale·(q − zero) of its own group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from taylorprune.quantize.grid import Grid, GridSpec, dequantize_weight


@dataclass
class QuantizedWeight:
    """One quantized linear weight, all in the original column order.

    - ``values`` [out, in]: dequantized weight (the compute dtype: fp32, or fp64 for fp64 inputs);
    - ``codes`` [out, in] uint8 in [0, 2^wbits − 1];
    - ``grid``: parameters ``[out, groups]``;
    - ``group_index`` [in]: group of each input column. Contiguous (column // group size) unless dynamic groups
      were combined with activation order, where groups follow the permuted order (GPTQ's ``g_idx``);
    - ``perm``: the activation-order permutation used during the loop (None without act order);
    - ``info``: numbers for the report (damping used, dead inputs, fallbacks, loss).
    """

    values: torch.Tensor
    codes: torch.Tensor
    grid: Grid
    group_index: torch.Tensor
    perm: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def rebuild(self, spec: GridSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Values recomputed from codes and grid, as a runtime would dequantize them."""
        return dequantize_weight(self.codes, self.grid, spec, self.group_index, dtype)

    @property
    def contiguous_groups(self) -> bool:
        """True when no ``g_idx`` is needed: every group is a run of consecutive columns in order."""
        if self.group_index.numel() < 2:
            return True
        return bool((self.group_index[1:] >= self.group_index[:-1]).all())
