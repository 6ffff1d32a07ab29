"""Exact Hessian-vector products of the whole model's loss (Optimal Brain Apoptosis scores).

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

Streamed (``--stream``, or weights that do not fit beside the pass): ``blockwise`` with the model left in CPU
memory, each block visiting the device once per sweep of ``--stream-batch`` windows and direction, the block
inputs and tangents waiting in CPU memory, a half-precision block upcast on the device only. Equal to the
in-memory pass up to float round-off (tests/test_streamed_passes.py).

Scope: the calibration loss of the whole model (mean next-token cross-entropy per window, summed over windows),
at the dense weights, before pruning — cross-layer terms included (the block scope is ``stats.hvp_block``; the
whole-model reference modes are ``stats.hvp_reference``). Statistics: ``loss_grad`` (g), ``hvp`` (H·δθ) and
``hvp_gn`` (its Gauss–Newton part).

Attention runs as ``eager`` during these passes: fused SDPA kernels lack forward-mode AD / double backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import grad, jvp, vjp

from taylorprune.modeling.attention import eager_attention
from taylorprune.modeling.blocks import BlockRunner, block_function
from taylorprune.modeling.layout import Layout
from taylorprune.modeling.placement import hvp_bytes, model_bytes
from taylorprune.modeling.streaming import moved
from taylorprune.modeling.sweep import block_sweep, in_sweeps, next_token_loss
from taylorprune.options import option
from taylorprune.stats.hvp_block import BlockHvpOptions, checked
from taylorprune.stats.hvp_reference import model_hvp
from taylorprune.stats.source import ModelContext, Scope, Source, Stats

HVP_MODES = ("blockwise", "fwd-rev", "double-backward")
MODEL_HVP_STATS = ("loss_grad", "hvp")
ALL_MODEL_STATS = ("loss_grad", "hvp", "hvp_gn")  # hvp_gn: the Gauss–Newton part of H·δθ

Grads = tuple[torch.Tensor, ...]
Fold = Callable[[int, Grads, Grads, Grads], None]


def blockwise_hvp(runner: BlockRunner, ids: torch.Tensor, fold: Fold, gauss_newton: bool = False) -> None:
    """``fold(block index, g, H·δθ, GN·δθ)`` of the loss summed over the windows ``ids`` (each window's mean
    next-token cross-entropy), δθ = −W, last block first (see module doc); fp32 sums.

    Windows go through in chunks of ``runner.batch_size``; each block visits the device once per sweep (a
    streaming runner moves it; the block inputs and tangents then wait in CPU memory when the device is not the
    CPU). Blocks before the first one with targets carry a zero tangent, so they run a plain forward.
    ``gauss_newton``: also the Gauss–Newton part Jᵀ(∇²_z ℓ)(J·δθ) of H·δθ (z: the logits), by one more reverse
    sweep whose cotangent is the loss Hessian applied to the logits' tangent; otherwise its entries are empty.
    Each block's results are folded before the next block's exist.
    """
    layout = runner.layout
    first = layout.first_target_block
    offload = runner.stream and runner.device.type != "cpu"
    keep = (lambda t: t.to("cpu")) if offload else (lambda t: t)
    windows = list(ids.split(runner.batch_size))
    hidden = runner.capture(ids)
    h = list(hidden.split(runner.batch_size))
    del hidden
    states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def forward_step(i: int, carry):
        h, dh = carry
        if i < first:
            return [runner.run(i, x) for x in h], dh
        f = block_function(layout.blocks[i], layout.targets[i], runner.block_kwargs[i])
        w = tuple(t.module.weight.detach() for t in layout.targets[i])
        states[i] = [(keep(x), keep(dx)) for x, dx in zip(h, dh, strict=True)]
        outs = [jvp(f, (x, *w), (dx, *(-v for v in w))) for x, dx in zip(h, dh, strict=True)]
        return [o[0] for o in outs], [o[1] for o in outs]

    h, dh = block_sweep(runner, (h, [torch.zeros_like(x) for x in h]), forward_step, write=False)
    adjoints = _head_adjoints(runner, windows, h, dh, gauss_newton)
    del h, dh

    def backward_step(i: int, carry):
        adj, dadj, gn = carry
        f = block_function(layout.blocks[i], layout.targets[i], runner.block_kwargs[i])
        w = tuple(t.module.weight.detach() for t in layout.targets[i])
        sums: list[list[torch.Tensor]] = [[], [], []]
        for c, (x, dx) in enumerate(states.pop(i)):
            x, dx = x.to(runner.device), dx.to(runner.device)

            def pull(h: torch.Tensor, a: torch.Tensor, *ws: torch.Tensor, f=f) -> tuple[torch.Tensor, ...]:
                return vjp(f, h, *ws)[1](a)

            (adj[c], *g), (dadj[c], *hv) = jvp(pull, (x, adj[c], *w), (dx, dadj[c], *(-v for v in w)))
            gnv: list[torch.Tensor] = []
            if gn is not None:
                gn[c], *gnv = vjp(f, x, *w)[1](gn[c])
            for acc, values in zip(sums, (g, hv, gnv), strict=True):
                _add(acc, values)
        fold(i, tuple(sums[0]), tuple(sums[1]), tuple(sums[2]))
        return carry

    block_sweep(runner, adjoints, backward_step, blocks=range(first, len(layout.blocks)), reverse=True, write=False)


def _add(sums: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    if not sums:
        sums.extend(v.to(torch.float32) for v in values)
    else:
        for acc, v in zip(sums, values, strict=True):
            acc.add_(v.to(torch.float32))


def _head_adjoints(runner: BlockRunner, windows: list[torch.Tensor], h: list[torch.Tensor], dh: list[torch.Tensor],
                   gauss_newton: bool):
    """Per chunk of windows: the adjoint of the last hidden state, its tangent along δθ, and (``gauss_newton``)
    the Gauss–Newton cotangent Jᵀ_head(∇²_z ℓ)(ż); ℓ = the chunk's summed window losses."""
    adj, dadj, gn = [], [], [] if gauss_newton else None
    with runner.outside_on_device(head=True):
        for ids, x, dx in zip(windows, h, dh, strict=True):
            ids = ids.to(runner.input_device)
            count = ids.shape[0]

            def head(z: torch.Tensor, ids=ids) -> torch.Tensor:
                return runner.head(ids, z).logits

            def loss_of_logits(z: torch.Tensor, ids=ids, count=count) -> torch.Tensor:
                return next_token_loss(z, ids) * count  # windows of equal length: Σ of window means

            a, da = jvp(grad(lambda z: loss_of_logits(head(z))), (x,), (dx,))
            adj.append(a)
            dadj.append(da)
            if gn is not None:
                z, dz = jvp(head, (x,), (dx,))
                _, u = jvp(grad(loss_of_logits), (z.detach(),), (dz.detach(),))
                gn.append(vjp(head, x)[1](u)[0])
    return adj, dadj, gn


def _folder(sums: dict[str, list[torch.Tensor]], starts: list[int]) -> Fold:
    """A ``Fold`` adding each block's results into the per-target ``sums`` (``starts``: first target of a block)."""

    def fold(block: int, g: Grads, hv: Grads, gnv: Grads) -> None:
        for name, values in (("loss_grad", g), ("hvp", hv), ("hvp_gn", gnv)):
            if name in sums:
                for j, v in enumerate(values):
                    acc = sums[name][starts[block] + j]
                    acc.add_(v.to(acc.device, torch.float32))

    return fold


def model_hvp_pass(
    model: nn.Module,
    layout: Layout,
    calib_ids: torch.Tensor,
    mode: str = "blockwise",
    device: torch.device | None = None,
    on_sample: Callable[[int], None] | None = None,
    stats: frozenset[str] = frozenset(MODEL_HVP_STATS),
    dtype: str = "float32",
    stream: bool = False,
    windows_per_sweep: int = 16,
    batch_size: int = 1,
) -> dict[str, dict[str, torch.Tensor]]:
    """Σ over windows of g, H·δθ (and GN·δθ when ``hvp_gn`` is in ``stats``), fp32 on the CPU, for every target.

    ``dtype`` float32 runs a bf16/fp16 model in fp32 for the pass (second-order products overflow or lose all
    precision in half precision) and casts it back afterwards, which restores the weights exactly.
    ``stream``: the model stays where it is and blocks visit ``device`` one at a time (always ``blockwise``),
    ``windows_per_sweep`` windows per sweep in forward calls of ``batch_size``; half-precision blocks are upcast
    on the device only, the stored weights are never touched.
    """
    if stream:
        return _streamed_hvp_pass(model, layout, calib_ids, device or torch.device("cpu"), on_sample, stats, dtype,
                                  windows_per_sweep, batch_size)
    if "hvp_gn" in stats and mode != "blockwise":
        raise ValueError("the Gauss–Newton part is computed in blockwise mode only")
    targets = layout.all_targets
    home_dtype = next(model.parameters()).dtype
    upcast = dtype == "float32" and home_dtype in (torch.float16, torch.bfloat16)
    movable = device is not None and not getattr(model, "hf_device_map", None)
    names = [s for s in ALL_MODEL_STATS if s in stats]
    with moved(model, device if movable else None, torch.float32 if upcast else None), eager_attention(model):
        input_device = model.get_input_embeddings().weight.device
        sums = {n: [torch.zeros(t.module.weight.shape, dtype=torch.float32, device=t.module.weight.device)
                    for t in targets] for n in names}
        runner = BlockRunner(model, layout, input_device, stream=False)  # the model already sits there
        fold = _folder(sums, layout.target_starts())
        for i, ids in enumerate(calib_ids):
            window = ids.unsqueeze(0).to(input_device)
            if mode == "blockwise":
                blockwise_hvp(runner, window, fold, "hvp_gn" in stats)
            else:
                fold(0, *model_hvp(model, targets, window, mode), ())
            if on_sample:
                on_sample(i)
    return checked({t.path: {n: sums[n][k].cpu() for n in names} for k, t in enumerate(targets)})


def _streamed_hvp_pass(model, layout, calib_ids, device, on_sample, stats, dtype, windows_per_sweep, batch_size):
    home_dtype = next(model.parameters()).dtype
    upcast = dtype == "float32" and home_dtype in (torch.float16, torch.bfloat16)
    runner = BlockRunner(model, layout, torch.device(device), batch_size, stream=True,
                         dtype=torch.float32 if upcast else None)
    targets = layout.all_targets
    names = [s for s in ALL_MODEL_STATS if s in stats]
    sums = {n: [torch.zeros(t.module.weight.shape, dtype=torch.float32) for t in targets] for n in names}
    fold = _folder(sums, layout.target_starts())
    try:
        with eager_attention(model):
            for part in in_sweeps(len(calib_ids), windows_per_sweep):
                blockwise_hvp(runner, calib_ids[part], fold, "hvp_gn" in stats)
                for k in range(part.start, part.stop):
                    if on_sample:
                        on_sample(k)
    finally:
        runner.streamer.close()
    return checked({t.path: {n: sums[n][k] for n in names} for k, t in enumerate(targets)})


def in_memory_bytes(ctx: ModelContext, wanted: frozenset[str], dtype: str) -> int:
    """Device memory ``model_hvp_pass`` needs beside the weights (``placement.hvp_bytes``)."""
    param = next(ctx.model.parameters())
    upcast = dtype == "float32" and param.dtype in (torch.float16, torch.bfloat16)
    numel = sum(t.module.weight.numel() for t in ctx.layout.all_targets)
    return hvp_bytes(ctx.model.config, numel, len(wanted), ctx.calib_ids.shape[-1],
                     model_bytes(ctx.model) if upcast else 0)


def streaming(ctx: ModelContext, wanted: frozenset[str], dtype: str) -> dict:
    """``model_hvp_pass`` arguments for ``ctx``: block by block when the weights are streamed or the whole-model
    pass would not fit next to them."""
    stream = ctx.blockwise(in_memory_bytes(ctx, wanted, dtype))
    if stream:
        ctx.event("streamed:hvp")
    return {"stream": stream, "windows_per_sweep": ctx.stream_batch, "batch_size": ctx.batch_size}


@dataclass(frozen=True)
class ModelHvpOptions(BlockHvpOptions):
    hvp_mode: str = option("blockwise", "How exact HVPs of the whole model are taken: blockwise (jvp of each "
                           "block's vjp, one block's graph in memory), fwd-rev (jvp of grad, whole model) or "
                           "double-backward; a streamed pass (--stream, or a model that does not fit) is always "
                           "blockwise.", choices=HVP_MODES, identity=False)


def _model_compute(ctx: ModelContext, wanted: frozenset[str], options: ModelHvpOptions) -> Stats:
    tick = ctx.progress("Hessian-vector products (samples)", len(ctx.calib_ids))
    ctx.event("hvp_pass")
    return model_hvp_pass(ctx.model, ctx.layout, ctx.calib_ids, options.hvp_mode, ctx.device, tick, wanted,
                          options.hvp_dtype, **streaming(ctx, wanted, options.hvp_dtype))


MODEL_SOURCE = Source("hvp", Scope.MODEL, ALL_MODEL_STATS,
                      "g, exact H·δθ and its Gauss–Newton part (δθ = −W) of the dense model's calibration loss, "
                      "summed over windows",
                      options=ModelHvpOptions, compute=_model_compute, cache_option="hvp_cache", revision=2)
