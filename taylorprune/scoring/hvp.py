"""Exact Hessian-vector products for Optimal Brain Apoptosis scores.

Chen et al., "Optimal Brain Apoptosis", ICLR 2025 (arXiv:2502.17941): the loss change of removing parameter i
is estimated to second order with the *exact* Hessian, ΔL_i ≈ g_i·δθ_i + ½·δθ_i·(H δθ)_i with δθ = −θ over all
pruned parameters, so cross-parameter (and cross-layer) curvature enters every score. H·δθ is a
Hessian-vector product, never the Hessian itself:

- ``fwd-rev`` (default): forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` — one pass gives the
  gradient (primal) and H·v (tangent);
- ``double-backward``: reverse-over-reverse, ``autograd.grad`` of the gradient with ``create_graph=True``.

Scopes:
- ``model``: the calibration loss of the whole model (mean next-token cross-entropy per window, summed over
  windows), at the dense weights, before pruning — cross-layer terms included;
- ``block``: inside the layer-by-layer engine, the block's output reconstruction objective
  ½‖f(θ+δθ; X) − f(θ; X)‖² on the (already pruned upstream) block inputs X. At δθ = 0 its gradient is zero
  and its Hessian is exactly the Gauss-Newton JᵀJ, so H·δθ = Jᵀ(J·δθ) (a jvp then a vjp) and only one
  block's graph lives in memory: the path for large models. It is the objective layer-wise methods
  (SparseGPT, Wanda) minimise per linear, lifted to the block so q/k/v/o/MLP interactions count.

Attention runs as ``eager`` during these passes: fused SDPA kernels lack forward-mode AD / double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from taylorprune.errors import RunError, UserError
from taylorprune.modeling.layout import Layout, Target

HVP_MODES = ("fwd-rev", "double-backward")
MODEL_HVP_STATS = ("oba_g", "oba_hvp")


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch to the eager attention implementation for the duration (AD-friendly)."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous in (None, "eager") or not hasattr(model, "set_attn_implementation"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def _loss_fn(model: nn.Module, names: list[str], ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    def loss(*weights: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, weights, strict=True))
        return functional_call(model, params, (ids,), {"labels": ids, "use_cache": False}, strict=False).loss

    return loss


def model_hvp(model: nn.Module, targets: list[Target], ids: torch.Tensor, mode: str = "fwd-rev"):
    """(g, H·δθ) of one window's loss w.r.t. the target weights, δθ = −W; tuples in target order."""
    weights = [t.module.weight for t in targets]
    primals = tuple(w.detach() for w in weights)
    tangents = tuple(-w.detach() for w in weights)
    if mode == "fwd-rev":
        names = [f"{t.path}.weight" for t in targets]
        return jvp(grad(_loss_fn(model, names, ids), argnums=tuple(range(len(names)))), primals, tangents)
    if mode == "double-backward":
        for w in weights:
            w.requires_grad_(True)
        try:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            g = torch.autograd.grad(loss, weights, create_graph=True)
            hv = torch.autograd.grad(g, weights, grad_outputs=tangents)
            return tuple(x.detach() for x in g), hv
        finally:
            for w in weights:
                w.requires_grad_(False)
    raise UserError(f"--hvp-mode {mode}: choose one of {', '.join(HVP_MODES)}")


def model_hvp_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    mode: str = "fwd-rev",
    device: torch.device | None = None,
    on_sample: Callable[[int], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ over windows of g and H·δθ (fp32, CPU) for every target of the dense model."""
    targets = layout.all_targets
    home = next(model.parameters()).device
    movable = device is not None and not getattr(model, "hf_device_map", None)
    if movable:
        model.to(device)
    input_device = model.get_input_embeddings().weight.device
    sums_g = [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device) for t in targets]
    sums_h = [torch.zeros_like(s) for s in sums_g]
    try:
        with eager_attention(model):
            for i, ids in enumerate(calib_ids):
                g, hv = model_hvp(model, targets, ids.unsqueeze(0).to(input_device), mode)
                for acc_g, acc_h, gi, hi in zip(sums_g, sums_h, g, hv, strict=True):
                    acc_g.add_(gi.to(torch.float32))
                    acc_h.add_(hi.to(torch.float32))
                if on_sample:
                    on_sample(i)
    finally:
        if movable:
            model.to(home)
    return _checked({t.path: {"oba_g": g.cpu(), "oba_hvp": h.cpu()} for t, g, h in zip(targets, sums_g, sums_h,
                                                                                      strict=True)})


def block_hvp(block: nn.Module, kwargs: dict, targets: list[Target], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jᵀ(J·δθ) of the block outputs w.r.t. its target weights on one batch of inputs, δθ = −W."""
    inside = {id(m): n for n, m in block.named_modules()}
    names = [f"{inside[id(t.module)]}.weight" for t in targets]
    primals = tuple(t.module.weight.detach() for t in targets)
    tangents = tuple(-p for p in primals)

    def outputs(*weights: torch.Tensor) -> torch.Tensor:
        out = functional_call(block, dict(zip(names, weights, strict=True)), (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    _, jv = jvp(outputs, primals, tangents)
    _, pullback = vjp(outputs, *primals)
    return pullback(jv)


def block_hvp_stats(runner, i: int, hidden: torch.Tensor, targets: list[Target], options) -> dict:
    """Σ over calibration batches of the block-scope H·δθ for block ``i`` (its targets only)."""
    sums = [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device) for t in targets]
    block = runner.layout.blocks[i]
    with eager_attention(runner.model):
        for chunk in hidden.split(runner.batch_size):
            for acc, hv in zip(sums, block_hvp(block, runner.block_kwargs[i], targets, chunk), strict=True):
                acc.add_(hv.to(torch.float32))
    return _checked({t.path: {"oba_block_hvp": s} for t, s in zip(targets, sums, strict=True)})


def _checked(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    for path, d in stats.items():
        for name, t in d.items():
            if not torch.isfinite(t).all():
                raise RunError(f"{path}: non-finite {name} (overflow?); rerun with --dtype float32")
    return stats
