"""Gradient-based scores built on the gradient pass (``scoring.gradients``).

- ``gblm``: GBLM-Pruner, Das, Ma, Shen, "Beyond Size: How Gradients Shape Pruning Decisions in Large Language
  Models", arXiv:2311.04902. S = |W|·‖X_j‖₂ + α·|W|·G with G the l1 or l2 reduction of the per-sample
  gradients scaled by 100. The paper's reference code adds the two terms with α = 1 after scaling gradients by
  100, i.e. the paper's gradient weight is ``--alpha`` × ``--grad-scale``; the activation term is Wanda's.
- ``taylor``: first-order Taylor |W ⊙ Σ_s g_s| (element-wise first order of LLM-Pruner, Ma, Fang, Wang,
  "LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023).
- ``fisher``: Optimal Brain Damage with the empirical Fisher diagonal, ½·W²·Σ_s g_s² (LeCun, Denker, Solla,
  "Optimal Brain Damage", NeurIPS 1989).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taylorprune.errors import UserError
from taylorprune.scoring.registry import register
from taylorprune.scoring.wanda import activation_term

GRAD_NORMS = ("l1", "l2")


def _gblm_needs(options: Mapping[str, object]) -> frozenset[str]:
    """Only the chosen reduction (one fp32 copy of the targets less in memory); both when a gradient cache is
    written, so the cache serves either ``--grad-norm`` later."""
    norm = str(options.get("grad_norm", "l2"))
    if norm not in GRAD_NORMS:
        raise UserError(f"--grad-norm {norm}: choose l1 or l2")
    grads = {"grad_l1", "grad_l2"} if options.get("grad_cache") else {f"grad_{norm}"}
    return frozenset({"act_norm_sq", *grads})


@register(
    "gblm",
    needs=("act_norm_sq", "grad_l1", "grad_l2"),
    summary="|W|·‖X‖₂ + α·|W|·‖G‖ (activations + gradients)",
    paper="Das et al., arXiv:2311.04902",
    dynamic_needs=_gblm_needs,
)
def gblm(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], options: Mapping[str, object]):
    """Wanda's activation term plus a gradient term: weights the loss is sensitive to are kept."""
    norm = str(options.get("grad_norm", "l2"))
    if norm not in GRAD_NORMS:
        raise UserError(f"--grad-norm {norm}: choose l1 or l2")
    alpha = float(options.get("alpha", 1.0))
    grad = stats[f"grad_{norm}"].to(weight.device)
    return activation_term(weight, stats["act_norm_sq"]) + alpha * weight.abs() * grad


@register("taylor", needs=("grad_sum",), summary="|W·Σg| (first-order Taylor)", paper="Ma et al., NeurIPS 2023")
def taylor(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], options: Mapping[str, object]):
    """|ΔL| ≈ |g·δW| with δW = −W and g summed over samples: the first-order loss change of removing W."""
    return (weight * stats["grad_sum"].to(weight.device)).abs()


@register("fisher", needs=("grad_l2",), summary="½·W²·Σg² (OBD, empirical Fisher)", paper="LeCun et al., 1989")
def fisher(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], options: Mapping[str, object]):
    """Second-order Taylor with the empirical Fisher diagonal Σg² (= grad_l2²) as the Hessian diagonal."""
    return 0.5 * weight.pow(2) * stats["grad_l2"].to(weight.device).pow(2)
