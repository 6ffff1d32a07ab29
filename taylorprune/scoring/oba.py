"""Optimal Brain Apoptosis scores with exact Hessian-vector products.

Sun, Fang, Wang, Jiang, Kong, Hu, Fang, Xu, "Optimal Brain Apoptosis", ICLR 2025, arXiv:2502.17941: importance of
parameter i is the second-order Taylor estimate of the loss change when it is removed together with all
others, ΔL_i ≈ g_i·δθ_i + ½·δθ_i·(H δθ)_i with δθ = −θ, and the score is |ΔL_i|. OBA computes it for CNNs and
ViTs; here for LLaMA-class models, with the HVP from ``scoring.hvp`` (``--hvp-scope model`` or ``block``).

The first-order term is off by default (``--oba-first-order`` turns it on): OBA's estimate is built on the
second-order term, and the calibration loss of a trained LM sits near a minimum where g is mostly noise of
the sample. In block scope the objective is a reconstruction error whose gradient at the dense point is zero,
so the option has no effect there.

``--oba-normalize max`` applies the authors' released recipe for unstructured pruning (NEU-REAL/OBA,
``unstructured_prune``): each layer's |ΔL| is divided by its maximum and |W| is added, which keeps weights
whose second-order term happens to be near zero from being ranked below far smaller ones. The default
``none`` is the paper's score as written. On SmolLM2-135M at 50% (10 test windows, cached HVPs of 32
calibration windows) the recipe brings OBA from PPL 1115 to 225, still far behind Wanda: docs/BENCHMARKS.md.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from taylorprune.errors import UserError
from taylorprune.scoring.registry import register

HVP_SCOPES = ("model", "block")
NORMALIZE = ("none", "max")


def _needs(options: Mapping[str, object]) -> frozenset[str]:
    scope = str(options.get("hvp_scope", "model"))
    if scope not in HVP_SCOPES:
        raise UserError(f"--hvp-scope {scope}: choose model or block")
    if str(options.get("oba_normalize", "none")) not in NORMALIZE:
        raise UserError(f"--oba-normalize {options['oba_normalize']}: choose none or max")
    return frozenset({"oba_g", "oba_hvp"}) if scope == "model" else frozenset({"oba_block_hvp"})


@register(
    "oba",
    needs=("oba_g", "oba_hvp"),
    summary="|g·δθ + ½·δθ·(Hδθ)|, δθ = −W, exact HVP",
    paper="Sun et al., arXiv:2502.17941",
    dynamic_needs=_needs,
)
def oba(weight: torch.Tensor, stats: Mapping[str, torch.Tensor], options: Mapping[str, object]):
    """Second-order Taylor loss change of removing each weight, cross-parameter curvature included."""
    delta = -weight
    hv = stats["oba_hvp"] if "oba_hvp" in stats else stats["oba_block_hvp"]
    change = 0.5 * delta * hv.to(weight.device)
    if options.get("oba_first_order", False) and "oba_g" in stats:
        change = change + stats["oba_g"].to(weight.device) * delta
    if options.get("oba_normalize", "none") == "max":
        return change.abs() / change.abs().max().clamp_min(1e-30) + weight.abs()
    return change.abs()
