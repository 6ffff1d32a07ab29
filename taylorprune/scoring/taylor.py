"""First-order Taylor importance |W ⊙ Σ_s g_s|: the element-wise first order of LLM-Pruner (Ma, Fang, Wang,
"LLM-Pruner: On the Structural Pruning of Large Language Models", NeurIPS 2023), gradients of the dense
model's calibration loss summed over windows.

Structured (``--structure``): ``--taylor-group vector`` (LLM-Pruner's vector-wise importance) scores a group by
|Σ_G W·Σg|, the first-order loss change of removing the whole group at once (signed terms summed over every
weight of the group, then the absolute value); ``element`` by Σ_G |W·Σg| (LLM-Pruner's element-wise
importance summed over the group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taylorprune.options import Options, option
from taylorprune.scoring.groups import per_weight
from taylorprune.scoring.spec import Method


@dataclass(frozen=True)
class TaylorOptions(Options):
    taylor_group: str = option("vector", "--structure runs: vector (|Σ_G W·g|, LLM-Pruner's vector-wise) or element "
                               "(Σ_G |W·g|) importance of a group.", choices=("vector", "element"))


def first_order(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """g·W, signed: −g·δW with δW = −W."""
    return weight * stats["grad_sum"].to(weight.device)


def score(weight: torch.Tensor, stats, options) -> torch.Tensor:
    """|ΔL| ≈ |g·δW| with δW = −W: the first-order loss change of removing W."""
    return first_order(weight, stats, options).abs()


GROUPS = {"vector": per_weight("|Σ_G W·Σg|: first-order loss change of removing the whole group (LLM-Pruner "
                               "vector-wise)", first_order, "abs-sum", frozenset({"grad_sum"})),
          "element": per_weight("Σ_G |W·Σg|: element-wise first-order importance summed over the group (LLM-Pruner "
                                "element-wise)", score, "sum", frozenset({"grad_sum"}))}

METHOD = Method("taylor", "|W·Σg| (first-order Taylor)", "Ma et al., NeurIPS 2023", statistics=("grad_sum",),
                options=TaylorOptions, score=score, structured=lambda o: GROUPS[o.taylor_group])
