"""How the model's sparsity is split over its linears (``--allocation``).

- ``uniform``: every target gets the requested sparsity (per row or per matrix, ``--group``).
- ``owl``: OWL, Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs
  to High Sparsity", ICML 2024, arXiv:2310.05175. For each decoder block, the outlier ratio D_l is the share
  of its Wanda scores |W|·‖X‖₂ (all its target linears together, activations of the *dense* model) above
  M × their mean; the ratios are scaled to [0, 2λ], shifted to mean 1 − s and used as the block's density
  (the authors' code: ``(D − min)/(max − min)·2λ − mean + (1 − s)``; defaults M = 5, λ = 0.08). Blocks with
  more outliers keep more weights. Unlike the reference, the per-linear prune counts are then rounded so that
  the model's total sparsity is exactly the requested one (largest remainders get the extra weight).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from taylorprune.errors import UserError
from taylorprune.modeling.layout import Layout
from taylorprune.options import NoOptions, Options, by_name, option
from taylorprune.prune.masks import Pattern

Allocate = Callable[[Layout, Mapping[str, Mapping[str, torch.Tensor]], Pattern, Options],
                    tuple[dict[str, Pattern], dict]]


@dataclass(frozen=True)
class OwlOptions(Options):
    owl_lambda: float = option(0.08, "OWL λ: block densities spread over ±λ around 1 − sparsity.", minimum=0,
                               below=0.5)
    owl_m: float = option(5.0, "OWL M: a weight is an outlier when its Wanda score exceeds M × the block's mean.",
                          above=0)


@dataclass(frozen=True)
class Allocation:
    """``allocate(layout, dense statistics, pattern, options) -> ({target path: pattern}, report info)``."""

    name: str
    summary: str
    allocate: Allocate
    needs: frozenset[str] = frozenset()
    options: type[Options] = NoOptions
    unstructured_only: bool = False

    def check(self, pattern: Pattern) -> None:
        if self.unstructured_only and pattern.is_nm:
            raise UserError(f"--allocation {self.name} spreads unstructured sparsity over layers; give --sparsity, "
                            "not --pattern")


MAX_SPARSITY = 0.99  # no linear loses more than this (OWL's own clamp), even to make the total exact


def exact_counts(numels: list[int], sparsities: list[float], total_sparsity: float) -> list[int]:
    """Integer prune counts near ``sparsities`` whose sum is exactly round(total_sparsity × Σ numels), none above
    ``MAX_SPARSITY`` of its linear (a total that cannot be reached so is an error)."""
    want = round(total_sparsity * sum(numels))
    caps = [int(MAX_SPARSITY * n) for n in numels]
    if sum(caps) < want:
        raise UserError(f"--sparsity {total_sparsity:g} with this allocation would empty whole layers (more than "
                        f"{MAX_SPARSITY:.0%} of a linear); lower --owl-lambda or --sparsity")
    raw = [min(max(s, 0.0), MAX_SPARSITY) * n for s, n in zip(sparsities, numels, strict=True)]
    counts = [min(int(r), c) for r, c in zip(raw, caps, strict=True)]
    by_remainder = sorted(range(len(raw)), key=lambda k: raw[k] - counts[k], reverse=True)
    while sum(counts) < want:  # largest remainders first get one more, then round-robin up to the caps
        for k in by_remainder:
            if sum(counts) < want and counts[k] < caps[k]:
                counts[k] += 1
    while sum(counts) > want:
        for k in reversed(by_remainder):
            if sum(counts) > want and counts[k] > 0:
                counts[k] -= 1
    return counts


def outlier_ratios(layout: Layout, stats, m: float) -> list[float | None]:
    """Per block: % of its Wanda scores above ``m`` × their mean (None for a block without targets)."""
    ratios: list[float | None] = []
    for block_targets in layout.targets:
        if not block_targets:
            ratios.append(None)
            continue
        metric = torch.cat([(t.module.weight.detach().float().abs().cpu()
                             * stats[t.path]["dense_act_norm_sq"].float().sqrt().cpu().unsqueeze(0)).flatten()
                            for t in block_targets])
        ratios.append(float((metric > m * metric.mean()).float().mean()) * 100)
    return ratios


def block_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL's mapping from outlier ratios to block sparsities (mean = ``sparsity``)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    spread = (r - r.min()) / (r.max() - r.min()) * 2 * lam if r.max() > r.min() else torch.zeros_like(r)
    density = spread - spread.mean() + (1 - sparsity)
    return [float(x) for x in (1 - density).clamp(0.0, 0.99)]


def _uniform(layout, stats, pattern, options):
    return {t.path: pattern for t in layout.all_targets}, {}


def _owl(layout, stats, pattern: Pattern, options: OwlOptions):
    ratios = outlier_ratios(layout, stats, options.owl_m)
    present = [r for r in ratios if r is not None]
    per_block = iter(block_sparsities(present, pattern.sparsity, options.owl_lambda))
    sparsity = {i: next(per_block) for i, r in enumerate(ratios) if r is not None}
    targets = [(i, t) for i, ts in enumerate(layout.targets) for t in ts]
    counts = exact_counts([t.module.weight.numel() for _, t in targets], [sparsity[i] for i, _ in targets],
                          pattern.sparsity)
    patterns = {t.path: replace(pattern, sparsity=c / t.module.weight.numel(), count=c)
                for (_, t), c in zip(targets, counts, strict=True)}
    pruned, total = [0] * len(ratios), [0] * len(ratios)
    for (i, t), c in zip(targets, counts, strict=True):
        pruned[i] += c
        total[i] += t.module.weight.numel()
    info = {"outlier_ratio_pct": ratios, "owl_block_sparsity": [sparsity.get(i) for i in range(len(ratios))],
            "block_sparsity": [pruned[i] / total[i] if total[i] else None for i in range(len(ratios))]}
    return patterns, info


UNIFORM = Allocation("uniform", "the same sparsity in every target", _uniform)
OWL = Allocation("owl", "OWL: more weights kept in blocks with more activation outliers", _owl,
                 frozenset({"dense_act_norm_sq"}), OwlOptions, unstructured_only=True)

ALLOCATIONS: dict[str, Allocation] = by_name(
    UNIFORM,
    OWL,
)
