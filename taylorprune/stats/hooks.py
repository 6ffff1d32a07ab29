"""Linear-scope statistics: gathered by forward hooks from the inputs a linear sees while its block runs.

Every accumulator works in fp32 whatever the model dtype, so bf16/fp16 models do not lose precision or
overflow in the sums.
"""

from __future__ import annotations

import torch
from torch import nn

from taylorprune import distributed
from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.sweep import forward
from taylorprune.stats.source import ModelContext, Scope, Source, Stats


class ActNormSq:
    """Σ over calibration tokens of x_j², divided by the number of calibration sequences.

    This is the ``scaler_row`` of the Wanda reference (and of GBLM-Pruner, which adds it to a gradient term,
    so the scale matters there): sqrt of it is ‖X_j‖₂ / sqrt(N) with N the number of sequences.
    """

    def __init__(self, linear: nn.Linear) -> None:
        self.sumsq = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.nseq = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        self.nseq += x.shape[0] if x.dim() == 3 else 1
        self.sumsq += x.reshape(-1, x.shape[-1]).pow(2).sum(dim=0)

    def reduce(self) -> None:
        """Sum over the ranks of a data-parallel run (each saw its own windows)."""
        distributed.all_sum(self.sumsq)
        self.nseq = round(distributed.all_sum_number(self.nseq))

    def result(self) -> torch.Tensor:
        return self.sumsq / max(self.nseq, 1)


class Hessian:
    """SparseGPT's layer Hessian H = 2XXᵀ/N over all calibration tokens, N the number of sequences."""

    def __init__(self, linear: nn.Linear) -> None:
        n = linear.in_features
        self.xxt = torch.zeros(n, n, dtype=torch.float32, device=linear.weight.device)
        self.nseq = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().to(torch.float32)
        self.nseq += x.shape[0] if x.dim() == 3 else 1
        flat = x.reshape(-1, x.shape[-1])
        self.xxt.addmm_(flat.T, flat)

    def reduce(self) -> None:
        """Sum over the ranks of a data-parallel run (each saw its own windows)."""
        distributed.all_sum(self.xxt)
        self.nseq = round(distributed.all_sum_number(self.nseq))

    def result(self) -> torch.Tensor:
        return self.xxt * (2.0 / max(self.nseq, 1))


ACT_NORM_SQ = Source("act_norm_sq", Scope.LINEAR, ("act_norm_sq",),
                     "Σ x_j² of each input feature over calibration tokens / sequences (Wanda's scaler_row)",
                     accumulator=ActNormSq)
HESSIAN = Source("hessian", Scope.LINEAR, ("hessian",), "H = 2XXᵀ/N of each linear's inputs (SparseGPT)",
                 accumulator=Hessian)


def dense_activations(ctx: ModelContext, wanted: frozenset[str], options) -> Stats:
    """Σx² of every target's inputs on the *dense* model, blocks run one after another on dense outputs (the
    pre-pass of layer-wise allocations such as OWL, before any block is pruned)."""
    runner = BlockRunner(ctx.model, ctx.layout, ctx.device)
    tick = ctx.progress("dense activation pass (blocks)", len(ctx.layout.blocks))
    out: Stats = {}

    def visit(i: int, hidden: torch.Tensor) -> torch.Tensor:
        targets = ctx.layout.targets[i]
        accs = {t.path: ActNormSq(t.module) for t in targets}
        handles = [t.module.register_forward_hook(lambda m, a, o, acc=accs[t.path]: acc.add(a[0])) for t in targets]
        try:
            hidden = runner.run(i, hidden)
        finally:
            for h in handles:
                h.remove()
        for acc in accs.values():
            acc.reduce()
        out.update({path: {"dense_act_norm_sq": acc.result().cpu()} for path, acc in accs.items()})
        return hidden

    forward(runner, runner.capture(ctx.calib_ids), visit=visit, on_block=tick)
    return out


DENSE_ACT_NORM_SQ = Source("dense-activations", Scope.MODEL, ("dense_act_norm_sq",),
                           "Σ x_j² of each input feature on the dense model (OWL's outlier ratios)",
                           compute=dense_activations)
