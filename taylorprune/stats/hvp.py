"""Exact Hessian-vector products for Optimal Brain Apoptosis scores.

Sun et al., "Optimal Brain Apoptosis", ICLR 2025 (arXiv:2502.17941): the loss change of removing parameter i
is estimated to second order with the *exact* Hessian, ΔL_i ≈ g_i·δθ_i + ½·δθ_i·(H δθ)_i with δθ = −θ over all
pruned parameters, so cross-parameter (and cross-layer) curvature enters every score. H·δθ is a
Hessian-vector product, never the Hessian itself:

- ``blockwise`` (default): forward-over-reverse one decoder block at a time, the checkpointed form of the
  next mode. A forward sweep carries (h, ḣ) through the blocks with ``jvp`` (ḣ: the hidden states' tangent
  along δθ) and keeps only the block inputs; the head gives the output adjoint and its tangent; a backward
  sweep applies ``jvp`` to each block's ``vjp`` with tangents (ḣ_i, δθ_i, ȧ_{i+1}), which yields the gradient,
  H·δθ for the block's weights and the next adjoint pair. Exact (the chain rule applied to the gradient's own
  block-by-block composition), and only one block's second-order graph plus the logits' lives at a time;
- ``fwd-rev``: the same through the whole model at once, ``torch.func.jvp`` of ``torch.func.grad``;
- ``double-backward``: reverse-over-reverse, ``autograd.grad`` of the gradient with ``create_graph=True``.
The last two keep the whole model's second-order graph (8–11 GiB for one 512-token window of SmolLM2-135M)
and serve as references in the tests.

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

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from taylorprune.errors import RunError
from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner, patched_forwards
from taylorprune.modeling.layout import Layout, Target
from taylorprune.options import Options, option
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

HVP_MODES = ("blockwise", "fwd-rev", "double-backward")
MODEL_HVP_STATS = ("oba_g", "oba_hvp")
ALL_MODEL_STATS = ("oba_g", "oba_hvp", "oba_gn")  # oba_gn: the Gauss–Newton part of H·δθ


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
    raise ValueError(f"unknown HVP mode {mode!r}")


def _target_names(block: nn.Module, targets: list[Target]) -> list[str]:
    """Parameter names of the targets' weights relative to ``block`` (for ``functional_call``)."""
    inside = {id(m): n for n, m in block.named_modules()}
    return [f"{inside[id(t.module)]}.weight" for t in targets]


def _block_fn(block: nn.Module, targets: list[Target], kwargs: dict) -> Callable[..., torch.Tensor]:
    """Block output as a function of (hidden states, *target weights)."""
    names = _target_names(block, targets)

    def f(hidden: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        out = functional_call(block, dict(zip(names, weights, strict=True)), (hidden,), kwargs, strict=False)
        return out[0] if isinstance(out, tuple) else out

    return f


Grads = tuple[torch.Tensor, ...]


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


def _head(model: nn.Module, layout: Layout, ids: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits as a function of the last block's output: every block returns h, the model's own code does the rest."""

    def logits(h: torch.Tensor) -> torch.Tensor:
        with patched_forwards(layout.blocks, [lambda *a, **k: h] * len(layout.blocks)):
            return model(input_ids=ids, use_cache=False).logits

    return logits


def causal_lm_loss_of_logits(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """transformers' causal-LM loss with labels = inputs: mean next-token cross-entropy, logits in fp32."""
    shifted = logits[:, :-1].to(torch.float32)
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1))


def blockwise_hvp(runner, ids: torch.Tensor, gauss_newton: bool = False) -> Iterator[tuple[int, Grads, Grads, Grads]]:
    """Yield (block index, g, H·δθ, GN·δθ) of one window's loss, δθ = −W, last block first (see module doc).

    ``gauss_newton``: also the Gauss–Newton part Jᵀ(∇²_z ℓ)(J·δθ) of H·δθ (z: the logits), by one more reverse
    sweep whose cotangent is the loss Hessian applied to the logits' tangent; otherwise its entries are empty.
    A generator, so the caller folds each block's results into its sums before the next block's exist.
    """
    model, layout = runner.model, runner.layout
    hidden = runner.capture(ids)
    fns = [_block_fn(block, layout.targets[i], runner.block_kwargs[i]) for i, block in enumerate(layout.blocks)]
    weights = [tuple(t.module.weight.detach() for t in block_targets) for block_targets in layout.targets]
    states = [(hidden, torch.zeros_like(hidden))]
    for f, w in zip(fns, weights, strict=True):
        h, dh = states[-1]
        states.append(jvp(f, (h, *w), (dh, *(-x for x in w))))
    head = _head(model, layout, ids)

    def head_loss(h: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss_of_logits(head(h), ids)

    adj, dadj = jvp(grad(head_loss), (states[-1][0],), (states[-1][1],))
    gn = None
    if gauss_newton:
        z, dz = jvp(head, (states[-1][0],), (states[-1][1],))
        _, u = jvp(grad(lambda x: causal_lm_loss_of_logits(x, ids)), (z.detach(),), (dz.detach(),))
        gn = vjp(head, states[-1][0])[1](u)[0]
    for i in reversed(range(len(fns))):
        f, w = fns[i], weights[i]

        def pull(h: torch.Tensor, a: torch.Tensor, *ws: torch.Tensor, f=f) -> tuple[torch.Tensor, ...]:
            return vjp(f, h, *ws)[1](a)

        (adj, *g), (dadj, *hv) = jvp(pull, (states[i][0], adj, *w), (states[i][1], dadj, *(-x for x in w)))
        gnv: Grads = ()
        if gn is not None:
            gn, *gnv = vjp(f, states[i][0], *w)[1](gn)
        yield i, tuple(g), tuple(hv), tuple(gnv)


def model_hvp_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    mode: str = "blockwise",
    device: torch.device | None = None,
    on_sample: Callable[[int], None] | None = None,
    stats: frozenset[str] = frozenset(MODEL_HVP_STATS),
    dtype: str = "float32",
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ over windows of g, H·δθ (and GN·δθ when ``oba_gn`` is in ``stats``), fp32 on the CPU, for every target.

    ``dtype`` float32 runs a bf16/fp16 model in fp32 for the pass (second-order products overflow or lose all
    precision in half precision) and casts it back afterwards, which restores the weights exactly.
    """
    if "oba_gn" in stats and mode != "blockwise":
        raise ValueError("the Gauss–Newton part is computed in blockwise mode only")
    targets = layout.all_targets
    home, home_dtype = next(model.parameters()).device, next(model.parameters()).dtype
    upcast = dtype == "float32" and home_dtype in (torch.float16, torch.bfloat16)
    movable = device is not None and not getattr(model, "hf_device_map", None)
    if movable:
        model.to(device)
    if upcast:
        model.to(torch.float32)
    input_device = model.get_input_embeddings().weight.device
    names = [s for s in ALL_MODEL_STATS if s in stats]
    sums = {n: [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device)
                for t in targets] for n in names}
    try:
        with eager_attention(model):
            runner = BlockRunner(model, layout, input_device, stream=False)  # the model already sits there
            starts = [0]
            for block_targets in layout.targets:
                starts.append(starts[-1] + len(block_targets))
            for i, ids in enumerate(calib_ids):
                window = ids.unsqueeze(0).to(input_device)
                if mode == "blockwise":
                    parts = ((starts[b], *rest) for b, *rest in blockwise_hvp(runner, window, "oba_gn" in stats))
                else:
                    parts = [(0, *model_hvp(model, targets, window, mode), ())]
                for first, g, hv, gnv in parts:
                    for name, values in (("oba_g", g), ("oba_hvp", hv), ("oba_gn", gnv)):
                        if name in sums:
                            for j, v in enumerate(values):
                                sums[name][first + j].add_(v.to(torch.float32))
                if on_sample:
                    on_sample(i)
    finally:
        if upcast:
            model.to(home_dtype)
        if movable:
            model.to(home)
    return _checked({t.path: {n: sums[n][k].cpu() for n in names} for k, t in enumerate(targets)})


def block_hvp(block: nn.Module, kwargs: dict, targets: list[Target], hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Jᵀ(J·δθ) of the block outputs w.r.t. its target weights on one batch of inputs, δθ = −W."""
    outputs = functools.partial(_block_fn(block, targets, kwargs), hidden)
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
        block.to(torch.float32)
        kwargs = _float_kwargs(kwargs)
    try:
        with eager_attention(runner.model):
            for chunk in hidden.split(runner.batch_size):
                chunk = chunk.to(torch.float32) if upcast else chunk
                for acc, hv in zip(sums, block_hvp(block, kwargs, targets, chunk), strict=True):
                    acc.add_(hv.to(torch.float32))
    finally:
        if upcast:
            block.to(home)
    return _checked({t.path: {"oba_block_hvp": s} for t, s in zip(targets, sums, strict=True)})


def _checked(stats: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    for path, d in stats.items():
        for name, t in d.items():
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


@dataclass(frozen=True)
class ModelHvpOptions(BlockHvpOptions):
    hvp_mode: str = option("blockwise", "How exact HVPs of the whole model are taken: blockwise (jvp of each "
                           "block's vjp, one block's graph in memory), fwd-rev (jvp of grad, whole model) or "
                           "double-backward.", choices=HVP_MODES, identity=False)


def _model_compute(ctx: ModelContext, wanted: frozenset[str], options: ModelHvpOptions) -> Stats:
    tick = ctx.progress("Hessian-vector products (samples)", len(ctx.calib_ids))
    ctx.event("hvp_pass")
    return model_hvp_pass(ctx.model, ctx.layout, ctx.calib_ids, options.hvp_mode, ctx.device, tick, wanted,
                          options.hvp_dtype)


MODEL_SOURCE = Source("hvp", Scope.MODEL, ALL_MODEL_STATS,
                      "g, exact H·δθ and its Gauss–Newton part (δθ = −W) of the dense model's calibration loss, "
                      "summed over windows",
                      options=ModelHvpOptions, compute=_model_compute, cache_option="hvp_cache")
BLOCK_SOURCE = Source("hvp-block", Scope.BLOCK, ("oba_block_hvp",),
                      "Jᵀ(J·δθ) of each block's output reconstruction objective on its calibration inputs",
                      options=BlockHvpOptions, compute=block_hvp_stats, cache_option="hvp_cache")
