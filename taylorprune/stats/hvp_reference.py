"""Reference Hessian-vector products through the whole model at once, for the tests and ``--hvp-mode``.

- ``fwd-rev``: ``torch.func.jvp`` of ``torch.func.grad`` of the loss;
- ``double-backward``: reverse-over-reverse, ``autograd.grad`` of the gradient with ``create_graph=True``;
- ``residual_hvp``: R·v = H·v − Jᵀ(∇²_z ℓ)(J·v) of any function in one piece.

They keep the whole model's second-order graph (8–11 GiB for one 512-token window of SmolLM2-135M), so the
passes themselves go block by block (``stats.hvp``), and these serve as their references.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from taylorprune.modeling.layout import Target
from taylorprune.modeling.sweep import trainable


def _loss_fn(model: nn.Module, names: list[str], ids: torch.Tensor) -> Callable[..., torch.Tensor]:
    def loss(*weights: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, weights, strict=True))
        return functional_call(model, params, (ids,), {"labels": ids, "use_cache": False}, strict=False).loss

    return loss


def model_hvp(model: nn.Module, targets: list[Target], ids: torch.Tensor, mode: str = "fwd-rev",
              tangents: tuple[torch.Tensor, ...] | None = None):
    """(g, H·δθ) of one window's loss w.r.t. the target weights, δθ = −W unless ``tangents`` gives it (one per
    target: ``--bits-budget`` takes each quantization's ΔW); tuples in target order."""
    weights = [t.module.weight for t in targets]
    primals = tuple(w.detach() for w in weights)
    if tangents is None:
        tangents = tuple(-w.detach() for w in weights)
    if mode == "fwd-rev":
        names = [f"{t.path}.weight" for t in targets]
        return jvp(grad(_loss_fn(model, names, ids), argnums=tuple(range(len(names)))), primals, tangents)
    if mode == "double-backward":
        with trainable(weights):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            g = torch.autograd.grad(loss, weights, create_graph=True)
            hv = torch.autograd.grad(g, weights, grad_outputs=tangents)
            return tuple(x.detach() for x in g), hv
    raise ValueError(f"unknown HVP mode {mode!r}")


def residual_hvp(logits_fn: Callable[..., torch.Tensor], params: tuple[torch.Tensor, ...],
                 tangents: tuple[torch.Tensor, ...], loss_of_logits: Callable[[torch.Tensor], torch.Tensor]):
    """R·v = H·v − Jᵀ(∇²_z ℓ)(J·v) of ℓ(z(θ)), z = ``logits_fn(*params)``: the residual (non Gauss–Newton) part
    of the Hessian applied to ``tangents``, in one piece for any function. ``blockwise_hvp(gauss_newton=True)``
    computes the same for a decoder stack block by block; this form is its reference in the tests."""

    def loss(*p: torch.Tensor) -> torch.Tensor:
        return loss_of_logits(logits_fn(*p))

    _, hv = jvp(grad(loss, argnums=tuple(range(len(params)))), params, tangents)
    z, dz = jvp(logits_fn, params, tangents)
    _, u = jvp(grad(loss_of_logits), (z,), (dz,))
    gn = vjp(logits_fn, *params)[1](u)
    return tuple(h - g for h, g in zip(hv, gn, strict=True))
