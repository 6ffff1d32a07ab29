"""Exact curvature of the model's loss along candidate changes of one linear's weight (``--bits-budget``).

The prediction of ``quantize.sensitivity`` needs ΔwᵀHΔw for every (linear, configuration): an exact
Hessian-vector product of the loss along that linear's ΔW. ``stats.hvp_reference.model_hvp`` does one through the
whole model per candidate. Here the same numbers (up to float round-off; tests/test_bits_budget.py) cost less:

- the blocks before the linear's own do not depend on its weight: their output, the block's input, is computed
  once per block without a graph (``BlockRunner``, blocks visited in order), and each loss is taken from the
  linear's block on, through the model's own final norm, head and loss (``BlockRunner.head``);
- the gradient with its graph, g = ∂L/∂W (``create_graph``), is the same for every candidate of one linear: one
  forward and one first backward per chunk of windows, then one second backward per candidate, HΔw = ∂(g·Δw)/∂W.

Attention must be eager (double backward), as ``sensitivity.plan_bits`` sets it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from taylorprune.modeling.blocks import BlockRunner
from taylorprune.modeling.layout import Layout, Target
from taylorprune.modeling.sweep import trainable

CHUNK = 8  # windows per forward / HVP call


class Curvature:
    """Σ over windows of ΔwᵀH_wΔw (H_w: the Hessian of window w's mean next-token loss) for a linear's candidates;
    keeps the inputs of the last block asked for, so targets asked in block order cost one pass of the prefix."""

    def __init__(self, model: nn.Module, layout: Layout, ids: torch.Tensor, device: torch.device,
                 chunk: int = CHUNK) -> None:
        self.runner = BlockRunner(model, layout, device, batch_size=chunk, stream=False)
        self.ids, self.chunk = ids, chunk
        self._block, self._inputs = -1, None

    def inputs(self, block: int) -> torch.Tensor:
        """Inputs of decoder block ``block`` for every window [n, seqlen, hidden], without a graph."""
        if self._inputs is None or block < self._block:
            self._inputs, self._block = self.runner.capture(self.ids), 0
        while self._block < block:
            self._inputs = self.runner.run(self._block, self._inputs)
            self._block += 1
        return self._inputs

    def quadratic(self, target: Target, block: int, deltas: Sequence[torch.Tensor]) -> list[float]:
        """Σ_w ΔwᵀH_wΔw for each of ``deltas`` (same shape as ``target``'s weight), ``block``: the target's."""
        hidden, weight = self.inputs(block), target.module.weight
        deltas = [d.to(weight.device, weight.dtype) for d in deltas]
        totals = [0.0] * len(deltas)
        last = len(self.runner.layout.blocks)
        with trainable([weight]), torch.enable_grad():
            for h, ids in zip(hidden.split(self.chunk), self.ids.split(self.chunk), strict=True):
                x = h
                for k in range(block, last):
                    x = self.runner.call(k, x)
                loss = self.runner.head(ids, x, labels=True).loss  # the chunk's mean: windows of equal length
                (g,) = torch.autograd.grad(loss, [weight], create_graph=True)
                for c, d in enumerate(deltas):
                    (hv,) = torch.autograd.grad(g, [weight], grad_outputs=d, retain_graph=c < len(deltas) - 1)
                    totals[c] += float((d * hv).sum()) * ids.shape[0]
        return totals
