"""Magnitude pruning: |W|, no calibration data (Han, Pool, Tran, Dally, "Learning both Weights and Connections
for Efficient Neural Networks", NeurIPS 2015)."""

from __future__ import annotations

import torch

from taylorprune.scoring.spec import Method


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """Weights of small absolute value matter least."""
    return weight.abs()


METHOD = Method("magnitude", "|W| (no calibration data)", "Han et al., NeurIPS 2015", score=score)
