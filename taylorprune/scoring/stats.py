"""Per-linear statistics gathered from the inputs a linear sees while its block runs on calibration data.

Every accumulator works in fp32 whatever the model dtype, so bf16/fp16 models do not lose precision or
overflow in the sums. The registry maps a statistic name (what a method ``needs``) to its accumulator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from taylorprune.scoring.hvp import block_hvp_stats


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

    def result(self) -> torch.Tensor:
        return self.xxt * (2.0 / max(self.nseq, 1))


BLOCK_STATS: dict[str, Callable[[nn.Linear], object]] = {"act_norm_sq": ActNormSq, "hessian": Hessian}

# Statistics of a whole block (not of one linear's inputs): fn(runner, block index, inputs, targets, options).
BLOCK_FN_STATS: dict[str, Callable[..., dict]] = {"oba_block_hvp": block_hvp_stats}


def collect_hooks(linears: dict[str, nn.Linear], needs: frozenset[str]) -> tuple[dict, list]:
    """Attach accumulators for ``needs`` to each linear; returns ({path: {stat: acc}}, hook handles)."""
    accs: dict[str, dict[str, object]] = {}
    handles = []
    for path, linear in linears.items():
        accs[path] = {name: BLOCK_STATS[name](linear) for name in needs if name in BLOCK_STATS}
        if not accs[path]:
            continue

        def hook(_mod, args, _out, acc=accs[path]):
            for a in acc.values():
                a.add(args[0])

        handles.append(linear.register_forward_hook(hook))
    return accs, handles
