"""Optimal Brain Damage with the empirical Fisher diagonal: ½·W²·Σ_s g_s² (LeCun, Denker, Solla, "Optimal
Brain Damage", NeurIPS 1989), per-sample gradients of the dense model's calibration loss."""

from __future__ import annotations

import torch

from taylorprune.scoring.groups import fixed, per_weight
from taylorprune.scoring.spec import Method


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """Second-order Taylor with the empirical Fisher diagonal Σg² (= grad_l2²) as the Hessian diagonal."""
    return 0.5 * weight.pow(2) * stats["grad_l2"].to(weight.device).pow(2)


GROUP = per_weight("Σ_G ½·W²·Σ_s g_s²: the second-order (diagonal, empirical Fisher) loss change summed over the "
                   "group's weights (LLM-Pruner's element-wise second order)", score, "sum", frozenset({"grad_l2"}))

METHOD = Method("fisher", "½·W²·Σg² (OBD, empirical Fisher)", "LeCun et al., 1989", statistics=("grad_l2",),
                score=score, structured=fixed(GROUP))
