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

from dataclasses import dataclass

import torch

from taylorprune.options import Options, option
from taylorprune.scoring.spec import Method

HVP_SCOPES = ("model", "block")
NORMALIZE = ("none", "max")


@dataclass(frozen=True)
class ObaOptions(Options):
    hvp_scope: str = option("model", "Hessian of the whole model's calibration loss (model), or of each block's "
                            "output reconstruction inside the engine (block; for large models).", choices=HVP_SCOPES,
                            memory_hint="--hvp-scope block")
    oba_first_order: bool = option(False, "Add the first-order term g·δθ (off, as OBA).")
    oba_normalize: str = option("none", "none (the score as written) or max (per-layer |ΔL|/max + |W|, the "
                                "authors' unstructured recipe).", choices=NORMALIZE)


def _needs(options: ObaOptions) -> frozenset[str]:
    return frozenset({"oba_g", "oba_hvp"}) if options.hvp_scope == "model" else frozenset({"oba_block_hvp"})


def score(weight: torch.Tensor, stats, options: ObaOptions) -> torch.Tensor:
    """Second-order Taylor loss change of removing each weight, cross-parameter curvature included."""
    delta = -weight
    hv = stats["oba_hvp"] if "oba_hvp" in stats else stats["oba_block_hvp"]
    change = 0.5 * delta * hv.to(weight.device)
    if options.oba_first_order and "oba_g" in stats:
        change = change + stats["oba_g"].to(weight.device) * delta
    if options.oba_normalize == "max":
        return change.abs() / change.abs().max().clamp_min(1e-30) + weight.abs()
    return change.abs()


METHOD = Method("oba", "|g·δθ + ½·δθ·(Hδθ)|, δθ = −W, exact HVP", "Sun et al., arXiv:2502.17941",
                statistics=("oba_g", "oba_hvp", "oba_block_hvp"), options=ObaOptions, score=score, select=_needs)
