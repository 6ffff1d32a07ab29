"""First-order Taylor importance |W ⊙ Σ_s g_s|: the element-wise first order of LLM-Pruner (Ma, Fang, Wang,
"LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023), gradients of the dense
model's calibration loss summed over windows."""

from __future__ import annotations

import torch

from taylorprune.scoring.spec import Method


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """|ΔL| ≈ |g·δW| with δW = −W: the first-order loss change of removing W."""
    return (weight * stats["grad_sum"].to(weight.device)).abs()


METHOD = Method("taylor", "|W·Σg| (first-order Taylor)", "Ma et al., NeurIPS 2023", statistics=("grad_sum",),
                score=score)
