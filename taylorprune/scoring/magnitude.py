"""Magnitude pruning: S = |W|.

Han et al., "Learning both Weights and Connections for Efficient Neural Networks", NeurIPS 2015; the
layer-wise LLM baseline of Sun et al. (Wanda, 2023) and Frantar & Alistarh (SparseGPT, 2023).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taylorprune.scoring.registry import register


@register("magnitude", summary="|W| (no calibration data)", paper="Han et al., NeurIPS 2015")
def magnitude(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], options: Mapping[str, object]):
    """Weights of small absolute value matter least; needs no calibration statistics."""
    return weight.abs()
