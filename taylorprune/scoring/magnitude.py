"""Magnitude pruning: |W|, no calibration data (Han, Pool, Tran, Dally, "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015)."""

from __future__ import annotations

import torch

from taylorprune.scoring.groups import fixed, per_weight
from taylorprune.scoring.spec import Method


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """Weights of small absolute value matter least."""
    return weight.abs()


GROUP = per_weight("‖W_G‖₂: the L2 norm of all the group's weights (every member linear), no calibration",
                   lambda weight, stats, options: weight, "l2")

METHOD = Method("magnitude", "|W| (no calibration data)", "Han et al., NeurIPS 2015", score=score,
                structured=fixed(GROUP))
