"""Wanda: S_ij = |W_ij| · ‖X_j‖₂, compared within each output row.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models",
arXiv:2306.11695 (ICLR 2024). ‖X_j‖₂ is the norm of input feature j over all calibration tokens; the
reference divides the squared norm by the number of sequences, which does not change a per-row or
per-matrix ranking, and we keep that scale so GBLM's sum with a gradient term matches its reference.
"""

from __future__ import annotations

import torch

from taylorprune.scoring.groups import fixed, per_weight
from taylorprune.scoring.spec import Method


def activation_term(weight: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """|W| · sqrt(scaler_row), broadcast over output rows (shared with gradient-based scores)."""
    return weight.abs() * act_norm_sq.to(weight.device).sqrt().unsqueeze(0)


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """A weight matters when it is large *and* its input feature carries large activations."""
    return activation_term(weight, stats["act_norm_sq"])


GROUP = per_weight("Σ_G |W|·‖X_j‖₂: Wanda's score summed over the group's weights in every member linear, "
                   "activations of the already-pruned model (Wanda-sp, the structured Wanda of An et al., FLAP, AAAI "
                   "2024)", score, "sum", frozenset({"act_norm_sq"}))

METHOD = Method("wanda", "|W|·‖X‖₂ (weights and activations)", "Sun et al., arXiv:2306.11695",
                statistics=("act_norm_sq",), score=score, structured=fixed(GROUP))
