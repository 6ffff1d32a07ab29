"""Block-scope HVPs (``--hvp-scope block``): inside the layer-by-layer engine, the Gauss–Newton product of each
block's output reconstruction objective ½‖f(θ+δθ; X) − f(θ; X)‖² on the (already pruned upstream) block inputs X.

At δθ = 0 its gradient is zero and its Hessian is exactly JᵀJ, so H·δθ = Jᵀ(J·δθ) (a jvp then a vjp) and only
one block's graph lives in memory: the path for large models. It is the objective layer-wise methods
(SparseGPT, Wanda) minimise per linear, lifted to the block so q/k/v/o/MLP interactions count. Also here: what
every HVP pass shares (``hvp_dtype``, the finiteness check).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import jvp, vjp

from taylorprune import distributed
from taylorprune.errors import RunError
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import block_function
from taylorprune.modeling.layout import Target
from taylorprune.modeling.streaming import moved
from taylorprune.options import Options, option
from taylorprune.stats.source import Scope, Source


def block_hvp(block: nn.Module, kwargs: dict, targets: list[Target], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jᵀ(J·δθ) of the block outputs w.r.t. its target weights on one batch of inputs, δθ = −W."""
    outputs = functools.partial(block_function(block, targets, kwargs), hidden)
    primals = tuple(t.module.weight.detach() for t in targets)
    tangents = tuple(-p for p in primals)
    _, jv = jvp(outputs, primals, tangents)
    _, pullback = vjp(outputs, *primals)
    return pullback(jv)


def _float_kwargs(kwargs: dict) -> dict:
    """Block keyword arguments with floating tensors (rotary cos/sin, masks) in fp32."""

    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(torch.float32)
        if isinstance(v, tuple):
            return tuple(cast(x) for x in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}


def block_hvp_stats(runner, i: int, hidden: torch.Tensor, targets: list[Target], options) -> dict:
    """Σ over calibration batches of the block-scope H·δθ for block ``i`` (its targets only); a half-precision
    block runs in fp32 for it when ``hvp_dtype`` is float32 (cast back afterwards, exactly)."""
    sums = [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device) for t in targets]
    block = runner.layout.blocks[i]
    kwargs = runner.block_kwargs[i]
    home = next(block.parameters()).dtype
    upcast = getattr(options, "hvp_dtype", "float32") == "float32" and home in (torch.float16, torch.bfloat16)
    if upcast:
        kwargs = _float_kwargs(kwargs)
    with moved(block, dtype=torch.float32 if upcast else None), eager_attention(runner.model):
        for chunk in hidden.split(runner.batch_size):
            chunk = chunk.to(torch.float32) if upcast else chunk
            for acc, hv in zip(sums, block_hvp(block, kwargs, targets, chunk), strict=True):
                acc.add_(hv.to(torch.float32))
    return checked({t.path: {"block_hvp": s} for t, s in zip(targets, sums, strict=True)})


def checked(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """HVP sums over this rank's windows summed over the ranks of a data-parallel run, then checked finite."""
    for path, d in stats.items():
        for name, t in d.items():
            distributed.all_sum(t)
            if not torch.isfinite(t).all():
                raise RunError(f"{path}: non-finite {name} (overflow?); rerun with --dtype float32")
    return stats


def dtype_option():
    """``hvp_dtype``, declared once for every component that takes Hessian-vector products."""
    return option("float32", "Precision of HVP passes: float32 (a bf16/fp16 model is upcast for them, then cast "
                  "back exactly) or model (the model's own dtype).", choices=("float32", "model"))


@dataclass(frozen=True)
class BlockHvpOptions(Options):
    hvp_cache: str | None = option(None, "HVP cache (.safetensors): reused when it was made the same way (model, "
                                   "calibration, dtype; for block scope also the pruning recipe), else written.",
                                   identity=False)
    hvp_dtype: str = dtype_option()


BLOCK_SOURCE = Source("hvp-block", Scope.BLOCK, ("block_hvp",),
                      "Jᵀ(J·δθ) of each block's output reconstruction objective on its calibration inputs",
                      options=BlockHvpOptions, compute=block_hvp_stats, cache_option="hvp_cache", revision=2)
