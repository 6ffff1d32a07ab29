"""OBA's structured scores (``--method oba --structure neurons|heads``).

- ``--oba-mode released`` (the authors' structured recipe, NEU-REAL/OBA ``oba_importance.py``, ``importance.py``,
  ``conduct_pruning.py``): per step, on the current model with the structures chosen so far zeroed, the
  per-parameter importance I = δθ ⊙ (R·δθ) with δθ = −θ and R = H − Jᵀ(∇²_z ℓ)J the residual (cross-layer, non
  Gauss–Newton) part of the Hessian of the calibration loss, exact (``stats.hvp``, blockwise), summed signed over
  the step's windows and over all steps so far (never reset, as their accumulator). For each group and each of
  its member linears: |Σ over the group's parameters of that sum| / windows (abs of the mean over batches, per
  layer); the group's importance is the mean over its members, divided by the maximum over the block's groups
  of that kind (max normalisation). ``--oba-steps`` steps (the authors use ~50) remove structures on the
  exponential schedule of the unstructured recipe (removed after step k: n·(1 − (1−r)^{k/K}) / r of the n to go,
  rounded), recomputing the HVPs in between, ``--oba-step-windows`` windows per step (0: all).
  Difference from their code: the ranking is within each block (the same count of each structure per block, so
  the output is a standard architecture) instead of global over layers, which gives every layer its own width.
- ``--oba-mode swap`` (default; our adaptation for LLMs, matching the unstructured swap mode's objective): the
  exact second-order change of the removal on the layer reconstruction objective, where the quadratic model is
  exact: removing group G's inputs of its consumer (down_proj for a neuron, o_proj for a head) changes the
  consumer's output by −W[:, G]·X_G, so its cost is δθ_G·H·δθ_G = tr(W_G H_GG W_Gᵀ) with H = 2XXᵀ/N of the
  consumer's inputs on the already-pruned model. Groups are ranked within each block by that cost (cross-group
  terms within a block are left out).
"""

from __future__ import annotations

import torch

from taylorprune.prune.structures import Groups, choose, groups_to_remove, zero
from taylorprune.scoring.oba_released import _step_windows, residual_importance
from taylorprune.scoring.spec import GroupScore
from taylorprune.stats.source import ModelContext


def removal_cost(groups: Groups, hessian: torch.Tensor) -> torch.Tensor:
    """Exact increase of the consumer's reconstruction error ‖ΔW·X‖² (H = 2XXᵀ/N) when one group's inputs
    vanish and nothing else changes: δθ_G·H·δθ_G = tr(W_G H_GG W_Gᵀ), δθ_G = −W[:, G]."""
    c = groups.consumer
    w = c.module.weight.detach().to(torch.float64)
    h = hessian.to(w.device, torch.float64)
    out = torch.empty(groups.size, dtype=torch.float64)
    for g, cols in enumerate(c.index):
        cols = cols.to(w.device)
        wg = w[:, cols]
        out[g] = ((wg @ h[cols][:, cols]) * wg).sum().cpu()
    return out


def recon_cost(groups: Groups, stats, options) -> torch.Tensor:
    return removal_cost(groups, stats[groups.consumer.path]["hessian"])


RECON = GroupScore("δθ_G·H·δθ_G = tr(W_G·H_GG·W_Gᵀ): exact increase of the consumer's (down_proj / o_proj) "
                   "reconstruction error when the group's inputs vanish, H = 2XXᵀ/N of its inputs",
                   score=recon_cost, statistics=frozenset({"hessian"}))


def schedule(total: int, ratio: float, steps: int) -> list[int]:
    """Groups removed after each step, exponential as the unstructured recipe's densities; ends at ``total``."""
    ratio = min(max(ratio, 1e-9), 1.0 - 1e-9)
    return [round(total * (1.0 - (1.0 - ratio) ** (k / steps)) / ratio) for k in range(1, steps + 1)]


def _member_sums(groups: Groups, importance: dict[str, torch.Tensor]) -> torch.Tensor:
    """[members, groups]: Σ of the importance over each group's parameters in each member."""
    return torch.stack([m.take(importance[m.path].to(torch.float64)).sum(dim=1).cpu() for m in groups.members])


def normalized(sums: torch.Tensor, windows: int) -> torch.Tensor:
    """Mean over members of |Σ I| / windows, divided by its maximum over the block's groups."""
    score = (sums.abs() / max(windows, 1)).mean(dim=0)
    return score / score.max().clamp_min(1e-30)


def _target(groups: Groups, count: int, k: int, steps: int, plans: dict) -> int:
    """Groups to have removed after step ``k`` (the same number in every chunk of a chunked kind)."""
    total = groups_to_remove(groups, count)
    runs = groups.size // groups.chunk if groups.chunk else 1
    key = (groups.kind, total, runs, steps)
    if key not in plans:
        plans[key] = schedule(total // runs, total / groups.size, steps)
    return plans[key][k] * runs


@torch.no_grad()
def _restore(saved: dict) -> None:
    for module, (weight, bias) in saved.items():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def released_select(ctx: ModelContext, counts: dict[str, int], blocks: dict[str, list[Groups]],
                    options) -> dict[tuple[str, int], torch.Tensor]:
    """The removed groups of every block, chosen step by step as the authors do (see the module doc); the model
    comes back unchanged."""
    members = {id(m.module): m.module for gs in blocks.values() for g in gs for m in g.members}
    saved = {mod: (mod.weight.detach().clone(), None if mod.bias is None else mod.bias.detach().clone())
             for mod in members.values()}
    sums = {(kind, g.block): torch.zeros(len(g.members), g.size, dtype=torch.float64)
            for kind, gs in blocks.items() for g in gs}
    removed = {key: torch.zeros(0, dtype=torch.long) for key in sums}
    steps, windows, plans = options.oba_steps, 0, {}
    tick = ctx.progress("OBA structured steps", steps)
    try:
        for k in range(steps):
            chunk = _step_windows(ctx.calib_ids, options.oba_step_windows, k)
            importance = dict(zip([t.path for t in ctx.layout.all_targets],
                                  residual_importance(ctx, chunk, options.hvp_dtype), strict=True))
            windows += len(chunk)
            for kind, gs in blocks.items():
                for g in gs:
                    key = (kind, g.block)
                    sums[key] += _member_sums(g, importance)
                    score = normalized(sums[key], windows)
                    score[removed[key]] = -1.0  # chosen before: stays chosen (scores are ≥ 0)
                    removed[key] = choose(score, _target(g, counts[kind], k, steps, plans), g.chunk)
                    zero(g, removed[key])
            tick(k)
    finally:
        _restore(saved)
    return removed


RELEASED = GroupScore("authors' recipe: mean over member linears of |Σ_G δθ⊙(R·δθ)| / windows (R: residual Hessian, "
                      "exact HVPs), max-normalised per block, --oba-steps steps with recomputation (the authors rank "
                      "globally)", select=released_select)
