"""GBLM-Pruner: S = |W|·‖X_j‖₂ + α·|W|·G.

Das, Ma, Shen, "Beyond Size: How Gradients Shape Pruning Decisions in Large Language Models",
arXiv:2311.04902. G is the l1 or l2 reduction over calibration windows of the per-sample gradients scaled by
100 (``--grad-scale``). The reference code adds the two terms with α = 1 after scaling the gradients by 100,
so the paper's gradient weight is ``--alpha`` × ``--grad-scale``; the activation term is Wanda's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.options import Options, option
from taylorprune.scoring.groups import per_weight
from taylorprune.scoring.spec import Method
from taylorprune.scoring.wanda import activation_term


@dataclass(frozen=True)
class GblmOptions(Options):
    alpha: float = option(1.0, "Weight of the gradient term (the paper's α is alpha × grad-scale).", minimum=0)
    grad_norm: str = option("l2", "Reduce per-sample gradients over windows with l1 (Σ|g|) or l2 (sqrt Σg²).",
                            choices=("l1", "l2"))


def score(weight: torch.Tensor, stats, options: GblmOptions) -> torch.Tensor:
    """Wanda's activation term plus a gradient term: weights the loss is sensitive to are kept."""
    grad = stats[f"grad_{options.grad_norm}"].to(weight.device)
    return activation_term(weight, stats["act_norm_sq"]) + options.alpha * weight.abs() * grad


METHOD = Method(
    "gblm", "|W|·‖X‖₂ + α·|W|·‖G‖ (activations + gradients)", "Das et al., arXiv:2311.04902",
    statistics=("act_norm_sq", "grad_l1", "grad_l2"), options=GblmOptions, score=score,
    select=lambda o: frozenset({"act_norm_sq", f"grad_{o.grad_norm}"}),
    structured=lambda o: per_weight("Σ_G (|W|·‖X_j‖₂ + α·|W|·G): the GBLM score summed over the group's weights",
                                    score, "sum", frozenset({"act_norm_sq", f"grad_{o.grad_norm}"})),
)
