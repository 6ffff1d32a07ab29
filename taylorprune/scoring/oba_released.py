"""The unstructured pruning recipe of OBA's released code, on LLaMA-class models (``--oba-mode released``).

Per step k = 1..K (K = ``--oba-steps``, 49 in the authors' scripts):

1. on the current (masked) model, over this step's calibration windows, the residual Hessian-vector product
   R·δθ = H·δθ − Jᵀ(∇²_z ℓ)(J·δθ) with δθ = −θ (``stats.hvp``, blockwise, exact);
2. I = δθ ⊙ (R·δθ) = θ ⊙ (R·θ), added signed to a running sum G that is never reset (as theirs), count += windows;
3. score = |G|/count / (max over the linear + 1e-6) + |W|;
4. one global threshold keeps the ⌊d_k·N⌋ highest scores of all N target weights, d_k = (1−s)^{k/K};
   weights pruned before stay pruned (score −inf), the rest are zeroed.

N:M patterns take one step and keep N of every M by the same score.
"""

from __future__ import annotations

import torch

from taylorprune.modeling.layout import Target
from taylorprune.prune.masks import Pattern, global_keep, nm_mask
from taylorprune.stats.hvp import model_hvp_pass, streaming
from taylorprune.stats.source import ModelContext


def normalized_score(importance_sum: torch.Tensor, count: int, weight: torch.Tensor) -> torch.Tensor:
    """|Σ I|/count divided by its maximum over the linear (+1e-6), plus |W| (the authors' ``max`` normaliser)."""
    mean = importance_sum.abs() / max(count, 1)
    return (mean / (mean.max() + 1e-6) + weight.abs().to(mean.dtype)).to(torch.float32)


def densities(sparsity: float, steps: int) -> list[float]:
    """Kept fraction after each step: (1 − s)^{k/K}, the exponential schedule of their script."""
    return [(1.0 - sparsity) ** (k / steps) for k in range(1, steps + 1)]


def _step_windows(calib_ids: torch.Tensor, per_step: int, step: int) -> torch.Tensor:
    if per_step <= 0 or per_step >= len(calib_ids):
        return calib_ids
    start = (step * per_step) % len(calib_ids)
    idx = [(start + i) % len(calib_ids) for i in range(per_step)]
    return calib_ids[idx]


def residual_importance(ctx: ModelContext, windows: torch.Tensor, dtype: str = "float32") -> list[torch.Tensor]:
    """Σ over ``windows`` of δθ ⊙ (R·δθ) for every target (fp64), δθ = −W of the current model."""
    tick = ctx.progress("residual HVPs (windows)", len(windows))
    wanted = frozenset({"hvp", "hvp_gn"})
    stats = model_hvp_pass(ctx.model, ctx.layout, windows, "blockwise", ctx.device, tick, wanted, dtype,
                           **streaming(ctx, wanted, dtype))
    out = []
    for t in ctx.layout.all_targets:
        delta = -t.module.weight.detach().to(torch.float64).cpu()
        residual = stats[t.path]["hvp"].double() - stats[t.path]["hvp_gn"].double()
        out.append(delta * residual)
    return out


def released_prune(ctx: ModelContext, pattern: Pattern, options) -> dict[str, torch.Tensor]:
    """Prune the targets in place as the released OBA code does; returns each target's final fp32 scores."""
    targets: list[Target] = ctx.layout.all_targets
    sums = [torch.zeros(t.module.weight.shape, dtype=torch.float64) for t in targets]
    pruned = [torch.zeros(t.module.weight.shape, dtype=torch.bool) for t in targets]
    count = 0
    steps = 1 if pattern.is_nm else options.oba_steps
    plan = densities(pattern.sparsity, steps)
    total = sum(t.module.weight.numel() for t in targets)
    scores: list[torch.Tensor] = []
    tick = ctx.progress("OBA steps", steps)
    for k, density in enumerate(plan):
        windows = _step_windows(ctx.calib_ids, options.oba_step_windows, k)
        for acc, imp in zip(sums, residual_importance(ctx, windows, options.hvp_dtype),
                            strict=True):
            acc.add_(imp)
        count += len(windows)
        scores = [normalized_score(s, count, t.module.weight.detach().cpu()) for s, t in zip(sums, targets,
                                                                                             strict=True)]
        if pattern.is_nm:
            keeps = [nm_mask(s, pattern.n, pattern.m) for s in scores]
        else:
            ranked = [torch.where(p, torch.full_like(s, -torch.inf), s) for s, p in zip(scores, pruned, strict=True)]
            keeps = global_keep(ranked, int(density * total))
            keeps = [m.view(s.shape) for m, s in zip(keeps, scores, strict=True)]
        with torch.no_grad():
            for t, keep, p in zip(targets, keeps, pruned, strict=True):
                p |= ~keep
                t.module.weight.mul_(keep.to(t.module.weight.device, t.module.weight.dtype))
        tick(k)
    return {t.path: s for t, s in zip(targets, scores, strict=True)}
